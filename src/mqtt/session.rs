//! One MQTT session over rumqttc, MQTT 3.1.1 or 5, behind one small API.
//!
//! rumqttc has two clients (`rumqttc` and `rumqttc::v5`) with different types
//! for the same ideas. The connection actor needs only a few of them: connect
//! options, try-publish, subscribe, disconnect, and a handful of events. This
//! file maps both onto [`Client`], [`EventLoop`] and [`Ev`], so the actor has
//! one code path. It also turns rumqttc's errors into one line that says what
//! to check ([`explain`]).

use std::path::Path;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{NetworkOptions, Outgoing, QoS};

use crate::config::{Broker, Connection, MqttVersion, Presence};

/// Largest packet sent. Answers are small; this leaves room for telemetry.
pub(crate) const MAX_OUTGOING: usize = 1024 * 1024;

/// Largest packet rumqttc accepts (MQTT 3.1.1): above the link's limit, so
/// that rumqttc never closes the connection for size (the link drops what
/// is larger before rumqttc sees it).
const MAX_INCOMING: usize = 2 * super::link::READ_LIMIT;

/// The MQTT 5 Maximum Packet Size announced in CONNECT. A broker must not
/// send this client anything larger: it discards such a message for this
/// client, silently, so it is never answered. Up to this size a message
/// crosses the network and the link refuses it with an answer; the cap keeps
/// a metered link from carrying hundreds of MiB for nothing.
pub(crate) const ANNOUNCED_MAX_PACKET: u32 = 16 * 1024 * 1024;

/// MQTT 5 request-response properties of an incoming message.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    /// Where the sender wants the answer.
    pub response_topic: Option<String>,
    /// Echoed unchanged with the answer.
    pub correlation_data: Option<Bytes>,
    /// Echoed with the answer.
    pub user_properties: Vec<(String, String)>,
}

/// What the actor reacts to.
#[derive(Debug)]
pub(crate) enum Ev {
    ConnAck { session_present: bool },
    /// A SUBACK: per filter of the SUBSCRIBE it answers, whether it was granted.
    SubAck { granted: Vec<bool> },
    Publish { topic: String, payload: Bytes, properties: Option<Properties> },
    /// A PUBACK; `refused` carries an MQTT 5 reason code of 0x80 or above.
    PubAck { pkid: u16, refused: Option<String> },
    SentPublish(u16),
    Other,
}

#[derive(Clone, Debug)]
pub(crate) enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

pub(crate) enum EventLoop {
    V4(rumqttc::EventLoop),
    V5(Box<rumqttc::v5::EventLoop>),
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventLoop")
    }
}

/// Builds the client and event loop, connecting to the link's socket at
/// `link` (rumqttc never dials the network itself). Never formats the
/// options: rumqttc's `Debug` prints the password.
pub(crate) fn build(conn: &Connection, link: &Path) -> (Client, EventLoop) {
    let socket = super::link::socket_address(link);
    let mut network = NetworkOptions::new();
    // Covers the link's dial too: CONNECT waits in the socket meanwhile.
    network.set_connection_timeout(10);
    match conn.version {
        MqttVersion::V311 => {
            let mut o = rumqttc::MqttOptions::new(conn.client_id.clone(), socket, 0);
            o.set_keep_alive(conn.keep_alive);
            o.set_max_packet_size(MAX_INCOMING, MAX_OUTGOING);
            o.set_request_channel_capacity(256);
            o.set_clean_session(conn.clean_session);
            o.set_transport(rumqttc::Transport::Unix);
            if let Some(c) = &conn.credentials {
                o.set_credentials(c.username.clone(), c.password.expose().to_string());
            }
            if let Some(p) = &conn.presence {
                o.set_last_will(rumqttc::LastWill::new(&p.topic, p.offline.clone(), QoS::AtLeastOnce, p.retain));
            }
            let (client, mut ev) = rumqttc::AsyncClient::new(o, 256);
            ev.set_network_options(network);
            (Client::V4(client), EventLoop::V4(ev))
        }
        MqttVersion::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(conn.client_id.clone(), socket, 0);
            o.set_keep_alive(conn.keep_alive);
            // Also rumqttc's own incoming limit, above the link's.
            o.set_max_packet_size(Some(ANNOUNCED_MAX_PACKET));
            o.set_request_channel_capacity(256);
            o.set_clean_start(conn.clean_session);
            if !conn.clean_session {
                // Keep the session (and queued commands) for a day offline.
                o.set_session_expiry_interval(Some(86_400));
            }
            o.set_transport(rumqttc::Transport::Unix);
            if let Some(c) = &conn.credentials {
                o.set_credentials(c.username.clone(), c.password.expose().to_string());
            }
            if let Some(p) = &conn.presence {
                o.set_last_will(p5::LastWill::new(&p.topic, p.offline.clone(), QoS5::AtLeastOnce, p.retain, None));
            }
            o.set_network_options(network);
            let (client, ev) = rumqttc::v5::AsyncClient::new(o, 256);
            (Client::V5(client), EventLoop::V5(Box::new(ev)))
        }
    }
}

impl Client {
    /// Queues a QoS 1 publish without waiting; `Err` when rumqttc's queue is full.
    pub(crate) fn try_publish(&self, topic: &str, payload: Bytes, retain: bool, props: Option<&Properties>) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_publish(topic, QoS::AtLeastOnce, retain, payload).map_err(|e| e.to_string()),
            Client::V5(c) => match props {
                Some(p) => {
                    let properties = p5::PublishProperties {
                        correlation_data: p.correlation_data.clone(),
                        user_properties: p.user_properties.clone(),
                        ..Default::default()
                    };
                    c.try_publish_with_properties(topic, QoS5::AtLeastOnce, retain, payload, properties).map_err(|e| e.to_string())
                }
                None => c.try_publish(topic, QoS5::AtLeastOnce, retain, payload).map_err(|e| e.to_string()),
            },
        }
    }

    pub(crate) fn try_subscribe(&self, topics: &[String]) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)))
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(topics.iter().map(|t| p5::Filter::new(t.clone(), QoS5::AtLeastOnce)))
                .map_err(|e| e.to_string()),
        }
    }

    /// Unsubscribes, one UNSUBSCRIBE per filter (rumqttc has no batch form);
    /// failures only mean the broker keeps sending what nobody routes.
    pub(crate) fn try_unsubscribe(&self, topics: &[String]) {
        for t in topics {
            let _ = match self {
                Client::V4(c) => c.try_unsubscribe(t.clone()).map_err(|e| e.to_string()),
                Client::V5(c) => c.try_unsubscribe(t.clone()).map_err(|e| e.to_string()),
            };
        }
    }

    pub(crate) fn try_disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

impl EventLoop {
    /// After a connection error: forget events rumqttc queued for the dead
    /// link (an `Outgoing::Publish` left there would shift our packet-id
    /// mapping by one) and take back requests still in its channel, which a
    /// clean session then drops and our outbox resends.
    pub(crate) fn reset_after_error(&mut self) {
        match self {
            EventLoop::V4(ev) => {
                ev.state.events.clear();
                ev.clean();
            }
            EventLoop::V5(ev) => {
                ev.state.events.clear();
                ev.clean();
            }
        }
    }

    /// The next event, or the connection error as one explained line.
    pub(crate) async fn poll(&mut self) -> Result<Ev, String> {
        match self {
            EventLoop::V4(ev) => match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => Ok(Ev::ConnAck { session_present: a.session_present }),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a))) => Ok(Ev::SubAck {
                    granted: a.return_codes.iter().map(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)).collect(),
                }),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => Ok(Ev::Publish {
                    topic: String::from_utf8_lossy(p.topic.as_ref()).into_owned(),
                    payload: p.payload,
                    properties: None,
                }),
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(a))) => Ok(Ev::PubAck { pkid: a.pkid, refused: None }),
                Ok(rumqttc::Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Ev::SentPublish(pkid)),
                Ok(_) => Ok(Ev::Other),
                Err(e) => Err(error_chain(&e)),
            },
            EventLoop::V5(ev) => match ev.poll().await {
                Ok(rumqttc::v5::Event::Incoming(p5::Packet::ConnAck(a))) => Ok(Ev::ConnAck { session_present: a.session_present }),
                Ok(rumqttc::v5::Event::Incoming(p5::Packet::SubAck(a))) => Ok(Ev::SubAck {
                    granted: a.return_codes.iter().map(|c| matches!(c, p5::SubscribeReasonCode::Success(_))).collect(),
                }),
                Ok(rumqttc::v5::Event::Incoming(p5::Packet::Publish(p))) => {
                    let properties = p.properties.map(|pp| Properties {
                        response_topic: pp.response_topic,
                        correlation_data: pp.correlation_data,
                        user_properties: pp.user_properties,
                    });
                    Ok(Ev::Publish { topic: String::from_utf8_lossy(p.topic.as_ref()).into_owned(), payload: p.payload, properties })
                }
                Ok(rumqttc::v5::Event::Incoming(p5::Packet::PubAck(a))) => {
                    let refused = match a.reason {
                        p5::PubAckReason::Success | p5::PubAckReason::NoMatchingSubscribers => None,
                        other => Some(format!("{other:?}")),
                    };
                    Ok(Ev::PubAck { pkid: a.pkid, refused })
                }
                Ok(rumqttc::v5::Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Ev::SentPublish(pkid)),
                Ok(_) => Ok(Ev::Other),
                Err(e) => Err(error_chain(&e)),
            },
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// What failed and what to check (the hint, stable across attempts) and the
/// line to log (the hint with rumqttc's error, which may hold a timestamp).
pub(crate) fn explain(error: &str, target: &str, conn: &Connection) -> (String, String) {
    let e = error.to_ascii_lowercase();
    let hint = if e.contains("unknownissuer") || e.contains("unknown issuer") || e.contains("unknownca") {
        "the broker's certificate is not signed by a trusted CA: check `tls.ca`".to_string()
    } else if e.contains("notvalidforname") || e.contains("not valid for name") {
        format!("the broker's certificate is not valid for the host name in the URL ({target}): check the URL")
    } else if e.contains("expired") {
        "the broker's certificate has expired (or this machine's clock is wrong)".to_string()
    } else if e.contains("certificaterequired") || (e.contains("handshake") && e.contains("alert")) {
        "the broker refused the TLS handshake: it may require a client certificate (`tls.cert`, `tls.key`) it did not get or accept".to_string()
    } else if e.contains("badusernamepassword") || e.contains("badusername") || e.contains("bad user") {
        "the broker refused the login: check `username` and `password`".to_string()
    } else if e.contains("notauthorized") || e.contains("not authorized") {
        "the broker says the client is not authorized: check `username`, `password`, `client_id` and the broker's ACL".to_string()
    } else if e.contains("failed to lookup") || e.contains("name or service not known") || e.contains("dns") {
        format!("cannot resolve the broker's host name ({target}): check the URL and DNS")
    } else if e.contains("connection refused") {
        format!("nothing accepts connections at {target}: is the broker running, is the port right?")
    } else if e.contains("websocket") {
        format!("the WebSocket upgrade at {target} failed: check the URL's path and port")
    } else if e.contains("malformed") {
        format!("the broker at {target} sent a packet that cannot be read: check the broker")
    } else if e.contains("proxy") || e.contains("socks") {
        let proxy = conn.proxy.as_ref().map_or(String::new(), |p| format!(" {}:{}", p.host, p.port));
        format!("the proxy{proxy} refused or failed: check `proxy`")
    } else if e.contains("timeout") || e.contains("timed out") {
        format!("no answer from {target}: check the address, the port and the firewall")
    } else {
        format!("check the broker at {target}")
    };
    let line = format!("{hint} ({error})");
    (hint, line)
}

/// The cause of a failed attempt: what the link saw on the broker's side,
/// unless rumqttc heard the broker refuse the login (a CONNACK code), which
/// the link relays without reading.
pub(crate) fn cause(rumqttc: String, link: Option<String>) -> String {
    match link {
        Some(link) if !rumqttc.contains("return code") => link,
        _ => rumqttc,
    }
}

/// A retained presence publish needs `retain`; the rest never is.
pub(crate) fn presence_retain(p: &Presence, conn: &Connection) -> bool {
    p.retain && !matches!(conn.broker, Broker::Embedded { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connection(extra: &str) -> Connection {
        let yaml = format!(
            "connections:\n  c:\n    url: mqtts://broker.example.com:8883\n{extra}\
             buses:\n  line: {{ tcp: {{ host: 127.0.0.1 }} }}\n\
             devices:\n  d:\n    bus: line\n    unit: 1\n    points: {{ a: {{ holding: 0 }} }}\n    twin: {{ connection: c, telemetry: t }}\n"
        );
        match crate::config::Config::parse(&yaml, Path::new("t.yaml")) {
            Ok(mut c) => c.connections.remove(0),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_links_cause_wins_unless_the_broker_refused_the_login() {
        let link = Some("TLS with b:8883: invalid peer certificate: UnknownIssuer".to_string());
        assert_eq!(cause("I/O: connection closed by peer".into(), link.clone()), link.clone().unwrap_or_default());
        let refused = "Connection refused, return code: `NotAuthorized`".to_string();
        assert_eq!(cause(refused.clone(), Some("the broker closed the connection".into())), refused);
        assert_eq!(cause("Network timeout".into(), None), "Network timeout");
    }

    #[test]
    fn the_links_causes_get_the_hints_rumqttcs_did() {
        let conn = connection("    proxy: { url: \"http://proxy.local:3128\" }\n");
        let hint = |e: &str| explain(e, "broker.example.com:8883", &conn).0;
        assert!(hint("TLS with b:8883: invalid peer certificate: UnknownIssuer").contains("trusted CA"));
        assert!(hint("reading from the broker: received fatal alert: CertificateRequired").contains("client certificate"));
        assert!(hint("cannot resolve nowhere.invalid: failed to lookup address information").contains("resolve"));
        assert!(hint("cannot connect to 127.0.0.1:1: Connection refused (os error 111)").contains("nothing accepts"));
        assert!(hint("HTTP proxy proxy.local:3128 refused CONNECT to b:8883: HTTP/1.1 407 Proxy Authentication Required")
            .contains("proxy proxy.local:3128"));
        assert!(hint("WebSocket handshake with wss://b:443/mqtt: the server answered HTTP 404 Not Found").contains("path"));
        assert!(hint("no answer from b:8883 within 8s (timed out)").contains("no answer"));
    }
}
