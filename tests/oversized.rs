//! A message too large for the gateway to read must not take its connection
//! down (issue 7). The embedded broker cannot play this part (rmqtt itself
//! refuses packets over 1 MiB), so a fake broker on loopback does: just
//! enough MQTT 3.1.1 to accept the gateway, then a 2 MiB command followed by
//! normal ones, as Mosquitto (no size limit by default) would deliver them.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::{ConnAck, ConnectReturnCode, Packet, PubAck, Publish, QoS, SubAck, SubscribeReasonCode};
use serde_json::{json, Value as Json};
use support::{free_port, PUMP_PROFILE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use twinbus::config::Config;
use twinbus::gateway::Gateway;

const WAIT: Duration = Duration::from_secs(10);
const BIG: usize = 2 * 1024 * 1024;
/// Larger than anything the gateway sends; the fake broker reads with it.
const MAX: usize = 4 * BIG;

fn config(broker: u16, clean_session: bool) -> Config {
    let modbus = free_port();
    let yaml = format!(
        r#"
connections:
  cloud:
    url: mqtt://127.0.0.1:{broker}
    client_id: gw-oversized
    clean_session: {clean_session}
    reconnect: {{ min: 100ms, max: 500ms }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 300ms }}
{PUMP_PROFILE}
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: 1s
    twin: {{ connection: cloud, commands: site/pump/cmd, responses: site/pump/rsp }}
simulators:
  sim: {{ listen: "127.0.0.1:{modbus}", serves: [pump] }}
"#
    );
    Config::parse(&yaml, Path::new("oversized.yaml")).expect("valid")
}

/// One client connection of the fake broker: packets in on a channel,
/// packets out through a writer task, so a 2 MiB write never blocks reading.
struct Conn {
    incoming: mpsc::UnboundedReceiver<Packet>,
    outgoing: mpsc::UnboundedSender<Packet>,
}

impl Conn {
    fn new(socket: TcpStream) -> Conn {
        let (mut rd, mut wr) = socket.into_split();
        let (in_tx, incoming) = mpsc::unbounded_channel();
        let (outgoing, mut out_rx) = mpsc::unbounded_channel::<Packet>();
        tokio::spawn(async move {
            let mut buf = BytesMut::new();
            loop {
                match Packet::read(&mut buf, MAX) {
                    Ok(p) => {
                        if in_tx.send(p).is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(rumqttc::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("the gateway sent something unreadable: {e:?}"),
                }
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        });
        tokio::spawn(async move {
            while let Some(p) = out_rx.recv().await {
                let mut bytes = BytesMut::new();
                p.write(&mut bytes, MAX).expect("encodable");
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        Conn { incoming, outgoing }
    }

    async fn next(&mut self) -> Packet {
        tokio::time::timeout(WAIT, self.incoming.recv()).await.expect("a packet in time").expect("the gateway is still connected")
    }

    fn send(&self, p: Packet) {
        self.outgoing.send(p).expect("writer alive");
    }

    /// CONNECT → CONNACK, SUBSCRIBE → SUBACK.
    async fn accept_session(&mut self) {
        assert!(matches!(self.next().await, Packet::Connect(..)), "CONNECT first");
        self.send(Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)));
        match self.next().await {
            Packet::Subscribe(s) => {
                let codes = s.filters.iter().map(|_| SubscribeReasonCode::Success(QoS::AtLeastOnce)).collect();
                self.send(Packet::SubAck(SubAck::new(s.pkid, codes)));
            }
            other => panic!("SUBSCRIBE expected, got {other:?}"),
        }
    }
}

fn command(pkid: u16, payload: impl Into<Bytes>) -> Packet {
    let mut p = Publish::from_bytes("site/pump/cmd", QoS::AtLeastOnce, payload.into());
    p.pkid = pkid;
    Packet::Publish(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_too_large_to_read_is_refused_acknowledged_and_the_connection_stays_up() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let gateway = Gateway::start(&config(port, false)).await.expect("start");
    let (socket, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("the gateway connects").expect("accept");
    let mut conn = Conn::new(socket);
    conn.accept_session().await;

    // Well-formed JSON, so only its size can be the reason for the refusal.
    let mut big = br#"{"id":"big","get":""#.to_vec();
    big.resize(BIG - 2, b'x');
    big.extend_from_slice(br#""}"#);
    conn.send(command(1, big));
    let ids: Vec<String> = (1..=5).map(|n| format!("after-{n}")).collect();
    for (n, id) in ids.iter().enumerate() {
        conn.send(command(n as u16 + 2, json!({"id": id, "get": ["deviceAttrib.setpoint"]}).to_string()));
    }

    let mut answers: Vec<Json> = Vec::new();
    let mut acked = Vec::new();
    while answers.len() < 6 || acked.len() < 6 {
        match conn.next().await {
            Packet::Publish(p) => {
                assert_eq!(p.topic, "site/pump/rsp");
                conn.send(Packet::PubAck(PubAck::new(p.pkid)));
                answers.push(serde_json::from_slice(&p.payload).expect("JSON answer"));
            }
            Packet::PubAck(a) => acked.push(a.pkid),
            Packet::PingReq => conn.send(Packet::PingResp),
            other => panic!("unexpected {other:?}"),
        }
    }
    acked.sort_unstable();
    assert_eq!(acked, vec![1, 2, 3, 4, 5, 6], "the oversized message is acknowledged too, so a broker never redelivers it");

    let refused = &answers[0];
    assert_eq!(refused["status"], "rejected", "{refused}");
    assert_eq!(refused["error"], "the payload is 2097152 bytes; the limit is 262144 bytes", "{refused}");
    assert!(refused.get("id").is_none(), "it was never read, so it has no id: {refused}");
    for (answer, id) in answers[1..].iter().zip(&ids) {
        assert_eq!((answer["status"].as_str(), answer["id"].as_str()), (Some("succeeded"), Some(id.as_str())), "{answer}");
    }

    // The same connection carried it all: rumqttc never reconnected.
    assert!(tokio::time::timeout(Duration::from_secs(1), listener.accept()).await.is_err(), "no second CONNECT");
    gateway.shutdown().await;
}
