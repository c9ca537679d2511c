//! Shared test doubles: a gateway on free loopback ports with its embedded
//! broker and simulator, the cloud's side of raw commands and telemetry
//! ([`Cloud`]), and the AWS shadow service (`shadow`), both over the one test
//! MQTT client (`mqtt`); `quota` puts AWS IoT Core's per-connection quotas
//! in front of a test broker.
#![allow(dead_code, unreachable_pub)]

pub mod mqtt;
pub mod quota;
pub mod shadow;
pub mod site;

use std::path::Path;
use std::time::Duration;

use mqtt::{Mqtt, Options};
use serde_json::Value as Json;
use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::sim::SimHandle;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// An empty state directory under cargo's scratch space for tests.
pub fn fresh_state_dir(tag: impl std::fmt::Display) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("state-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A running gateway plus what a test needs to drive and observe it.
pub struct Harness {
    pub gateway: Gateway,
    pub mqtt_port: u16,
    pub sim: SimHandle,
}

/// The profile most tests use: the demo pump.
pub const PUMP_PROFILE: &str = r#"
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint:    { holding: 10, type: f32, min: 0, max: 80 }
      deviceAttrib.mode:        { holding: 12, values: { auto: 0, manual: 1 } }
      deviceData.running:       { input: 1, access: read }
      deviceData.temperature:   { input: 0, type: i16, scale: 0.1, deadband: 0.2 }
"#;

/// Starts a gateway from a YAML template in which `{MQTT}` and `{MODBUS}`
/// are replaced by free ports. The simulator must be named `sim`.
pub async fn start(template: &str) -> Harness {
    let mqtt_port = free_port();
    let modbus_port = free_port();
    let mut yaml = template.replace("{MQTT}", &mqtt_port.to_string()).replace("{MODBUS}", &modbus_port.to_string());
    if !yaml.contains("\nstate_dir:") {
        // Each gateway its own store: tests run in parallel.
        yaml.push_str(&format!("\nstate_dir: {}\n", fresh_state_dir(mqtt_port).display()));
    }
    let config = match Config::parse(&yaml, Path::new("test.yaml")) {
        Ok(c) => c,
        Err(e) => panic!("test config invalid: {e}\n{yaml}"),
    };
    let gateway = Gateway::start(&config).await.expect("gateway starts");
    assert!(gateway.wait_ready(Duration::from_secs(10)).await, "the gateway's MQTT sessions come up");
    let sim = gateway.simulator("sim").expect("a simulator named sim").clone();
    Harness { gateway, mqtt_port, sim }
}

/// The demo pump on a simulator, with a commands/responses/telemetry twin.
pub fn pump_config(extra_twin: &str) -> String {
    format!(
        r#"
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{{MQTT}}" }} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {{MODBUS}} }}, timeout: 300ms, retries: 1 }}
{PUMP_PROFILE}
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: 200ms
    twin:
      connection: local
      commands: site/pump/cmd
      responses: site/pump/rsp
      telemetry: site/pump/telemetry
      telemetry_interval: 1s
{extra_twin}
simulators:
  sim:
    listen: "127.0.0.1:{{MODBUS}}"
    serves: [pump]
    initial: {{ deviceData.temperature: 21.5, deviceAttrib.setpoint: 40 }}
    mirror: {{ deviceData.running: deviceAttrib.motorStatus }}
"#
    )
}

/// An MQTT client playing the cloud: it reads each topic from now on (messages on
/// other topics that arrive while it waits are dropped).
pub struct Cloud {
    mqtt: Mqtt,
}

impl Cloud {
    /// Connects to the broker and subscribes to `topics` (waits for SUBACK).
    pub async fn connect(port: u16, topics: &[&str]) -> Cloud {
        let options = Options::new(format!("cloud-{}", free_port()))
            .max_packet(2 * 1024 * 1024)
            .keep_alive(Duration::from_secs(30))
            .subscribe(topics.iter().copied());
        let mqtt = Mqtt::connect(port, options).await.unwrap_or_else(|e| panic!("the cloud's client: {e}"));
        Cloud { mqtt }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.mqtt.publish(topic, payload.into()).await.expect("publish");
    }

    /// The next JSON message on `topic` within `wait`.
    pub async fn next_on(&mut self, topic: &str, wait: Duration) -> Json {
        match self.try_next_on(topic, wait).await {
            Some(doc) => doc,
            None => panic!("nothing on {topic} within {wait:?}"),
        }
    }

    /// The next JSON message on `topic` within `wait`, if any.
    pub async fn try_next_on(&mut self, topic: &str, wait: Duration) -> Option<Json> {
        self.mqtt.next_skipping(wait, |m| m.topic == topic).await.map(|m| m.json())
    }

    /// The next payload on `topic` within `wait`, as bytes.
    pub async fn next_raw(&mut self, topic: &str, wait: Duration) -> Vec<u8> {
        match self.mqtt.next_skipping(wait, |m| m.topic == topic).await {
            Some(m) => m.payload.to_vec(),
            None => panic!("nothing on {topic} within {wait:?}"),
        }
    }

    /// The next message on `topic` that satisfies `pred`, skipping others.
    pub async fn wait_for(&mut self, topic: &str, wait: Duration, pred: impl Fn(&Json) -> bool) -> Json {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "no matching message on {topic} within {wait:?}");
            let m = self.next_on(topic, left).await;
            if pred(&m) {
                return m;
            }
        }
    }

    /// Sends a command and waits for the answer carrying its id (skipping an
    /// `acknowledged` one).
    pub async fn command(&mut self, cmd: &Json) -> Json {
        let id = cmd["id"].clone();
        self.publish("site/pump/cmd", cmd.to_string()).await;
        self.wait_for("site/pump/rsp", Duration::from_secs(10), |m| m["id"] == id && m["status"] != "acknowledged").await
    }
}

/// A plain HTTP/1.1 GET on loopback: (status, body). `auth` is `user:password`
/// for basic authentication.
pub fn http_get(addr: std::net::SocketAddr, path: &str, auth: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the HTTP listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let auth = auth.map(|a| format!("Authorization: Basic {}\r\n", base64(a))).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n").expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn base64(text: &str) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]) } else { '=' });
        }
    }
    out
}

/// The value of one Prometheus series (`name{labels}`) in a `/metrics` body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}
