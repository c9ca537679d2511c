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

fn config(broker: u16, clean_session: bool, keep_alive: &str) -> Config {
    let modbus = free_port();
    let yaml = format!(
        r#"
connections:
  cloud:
    url: mqtt://127.0.0.1:{broker}
    client_id: gw-oversized
    clean_session: {clean_session}
    keep_alive: {keep_alive}
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
state_dir: {state}
"#,
        state = support::fresh_state_dir(format!("oversized-{broker}")).display()
    );
    Config::parse(&yaml, Path::new("oversized.yaml")).expect("valid")
}

/// One client connection of the fake broker: packets in on a channel,
/// packets out through a writer task, so a 2 MiB write never blocks reading.
struct Conn {
    incoming: mpsc::UnboundedReceiver<Packet>,
    outgoing: mpsc::UnboundedSender<Vec<u8>>,
}

impl Conn {
    fn new(socket: TcpStream) -> Conn {
        let (mut rd, mut wr) = socket.into_split();
        let (in_tx, incoming) = mpsc::unbounded_channel();
        let (outgoing, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
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
            while let Some(bytes) = out_rx.recv().await {
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
        self.send_raw(encode(&p));
    }

    fn send_raw(&self, bytes: Vec<u8>) {
        self.outgoing.send(bytes).expect("writer alive");
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

fn encode(p: &Packet) -> Vec<u8> {
    let mut bytes = BytesMut::new();
    p.write(&mut bytes, MAX).expect("encodable");
    bytes.to_vec()
}

/// Valid JSON of exactly `BIG` bytes, so that only its size can be the
/// reason for a refusal.
fn big_command() -> Vec<u8> {
    let mut big = br#"{"id":"big","get":""#.to_vec();
    big.resize(BIG - 2, b'x');
    big.extend_from_slice(br#""}"#);
    big
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
    let gateway = Gateway::start(&config(port, false, "30s")).await.expect("start");
    let (socket, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("the gateway connects").expect("accept");
    let mut conn = Conn::new(socket);
    conn.accept_session().await;

    conn.send(command(1, big_command()));
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

/// On a slow link a large message takes longer than the keep-alive to
/// stream past, and the broker's PINGRESP waits behind it: the link answers
/// the pings itself meanwhile, so rumqttc does not give up on a live link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_message_slower_than_the_keep_alive_does_not_close_the_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let gateway = Gateway::start(&config(port, true, "5s")).await.expect("start");
    let (socket, _) = tokio::time::timeout(WAIT, listener.accept()).await.expect("the gateway connects").expect("accept");
    let mut conn = Conn::new(socket);
    conn.accept_session().await;

    // 2 MiB in 32 pieces over about 11 s: two keep-alive periods and more.
    let big = encode(&command(1, big_command()));
    let pieces: Vec<Vec<u8>> = big.chunks(big.len().div_ceil(32)).map(<[u8]>::to_vec).collect();
    let writer = conn.outgoing.clone();
    let mut streaming = tokio::spawn(async move {
        for piece in pieces {
            writer.send(piece).expect("writer alive");
            tokio::time::sleep(Duration::from_millis(350)).await;
        }
    });
    // A broker answers in order: whatever it owes waits behind the packet it is sending.
    let (mut pings, mut acked, mut answers, mut owed) = (0, Vec::new(), Vec::new(), Vec::new());
    loop {
        tokio::select! {
            done = &mut streaming => { done.expect("streamed"); break }
            p = conn.next() => match p {
                Packet::PingReq => pings += 1,
                Packet::PubAck(a) => acked.push(a.pkid),
                Packet::Publish(p) => {
                    owed.push(p.pkid);
                    answers.push(serde_json::from_slice::<Json>(&p.payload).expect("JSON answer"));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(pings >= 2, "{pings} PINGREQ(s) while the big one streamed");
    for _ in 0..pings {
        conn.send(Packet::PingResp); // late: the link answered them already and drops these
    }
    for pkid in owed {
        conn.send(Packet::PubAck(PubAck::new(pkid)));
    }
    conn.send(command(2, json!({"id": "after", "get": ["deviceAttrib.setpoint"]}).to_string()));
    while answers.len() < 2 {
        match conn.next().await {
            Packet::Publish(p) => {
                conn.send(Packet::PubAck(PubAck::new(p.pkid)));
                answers.push(serde_json::from_slice::<Json>(&p.payload).expect("JSON answer"));
            }
            Packet::PubAck(a) => acked.push(a.pkid),
            Packet::PingReq => conn.send(Packet::PingResp),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(answers[0]["status"], "rejected", "{}", answers[0]);
    assert_eq!(answers[1]["id"], "after", "{}", answers[1]);
    assert!(acked.contains(&1), "acknowledged: {acked:?}");
    assert!(tokio::time::timeout(Duration::from_secs(1), listener.accept()).await.is_err(), "no second CONNECT");
    gateway.shutdown().await;
}
