//! A site for the shadow tests: a broker (embedded, or Mosquitto with
//! `TWINBUS_TEST_BROKER=mosquitto`), the quota proxy in front of it, a
//! state directory, and gateway configurations that use them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::mqtt::{Access, EmbeddedBroker};
use twinbus::sim::SimHandle;

use super::quota::{QuotaProxy, Quotas};
use super::{free_port, PUMP_PROFILE};

/// The broker the site runs on: the embedded one, or with
/// `TWINBUS_TEST_BROKER=mosquitto` (as `.ci/run` does) a Mosquitto process.
pub enum Broker {
    Embedded(#[allow(dead_code)] EmbeddedBroker),
    Mosquitto(std::process::Child),
}

pub fn start_broker(port: u16, dir: &Path) -> Broker {
    if std::env::var("TWINBUS_TEST_BROKER").as_deref() != Ok("mosquitto") {
        return Broker::Embedded(EmbeddedBroker::start(format!("127.0.0.1:{port}").parse().expect("addr"), Access::anyone()).expect("broker"));
    }
    std::fs::create_dir_all(dir).expect("state dir");
    let conf = dir.join("mosquitto.conf");
    std::fs::write(&conf, format!("listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")).expect("conf");
    let bin = if Path::new("/usr/sbin/mosquitto").exists() { "/usr/sbin/mosquitto" } else { "mosquitto" };
    let log = std::fs::File::create(dir.join("mosquitto.log")).expect("log file");
    let child = std::process::Command::new(bin).arg("-c").arg(&conf).stdout(log.try_clone().expect("log")).stderr(log).spawn().expect("mosquitto starts");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Broker::Mosquitto(child)
}

/// A broker, and in front of it what the gateway connects to: a proxy that
/// enforces AWS IoT Core's per-connection quotas. The shadow service (AWS
/// itself) connects to the broker directly. Every quota the gateway goes
/// over fails the test when the site is dropped.
pub struct Site {
    pub broker_port: u16,
    pub modbus_port: u16,
    pub state_dir: PathBuf,
    broker: Broker,
    pub proxy: QuotaProxy,
}

impl Site {
    pub async fn new(name: &str) -> Site {
        let broker_port = free_port();
        let state_dir = std::env::temp_dir().join(format!("twinbus-shadow-{name}-{}-{broker_port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&state_dir);
        let broker = start_broker(broker_port, &state_dir);
        let proxy = QuotaProxy::start(broker_port, Quotas::AWS).await.expect("quota proxy");
        Site { broker_port, modbus_port: free_port(), state_dir, broker, proxy }
    }

    /// `body` (profiles, devices, simulators; `{MODBUS}` for the simulator's
    /// port) under this site's state directory, its broker (through the quota
    /// proxy, with AWS IoT Core's limits) as connection `aws` and its Modbus
    /// port as bus `line`.
    pub fn parse(&self, body: &str) -> Config {
        self.parse_with(&self.connection("aws", ""), body)
    }

    /// Connection `name` to this site's broker through the quota proxy, with
    /// AWS IoT Core's limits, a client id of its own, and `extra` (YAML lines
    /// indented by four) — as an entry under `connections:`.
    pub fn connection(&self, name: &str, extra: &str) -> String {
        let id = if name == "aws" { format!("gw-{}", self.broker_port) } else { format!("gw-{}-{name}", self.broker_port) };
        format!(
            "  {name}:\n    url: mqtt://127.0.0.1:{proxy}\n    client_id: {id}\n    reconnect: {{ min: 200ms, max: 1s }}\n    limits: {{ preset: aws }}\n{extra}",
            proxy = self.proxy.port()
        )
    }

    /// `body` with these `connections` entries (see [`Site::connection`]).
    pub fn parse_with(&self, connections: &str, body: &str) -> Config {
        let yaml = format!(
            r#"
state_dir: {state}
connections:
{connections}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 300ms }}
{body}"#,
            state = self.state_dir.display(),
            modbus = self.modbus_port,
            body = body.replace("{MODBUS}", &self.modbus_port.to_string()),
        );
        Config::parse(&yaml, Path::new("shadow.yaml")).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Pump `pump-1` bound to the classic shadow of thing `pump-1`, plus `extra_devices`.
    pub fn config(&self, extra_devices: &str) -> Config {
        let served = if extra_devices.contains("pump-2") { ", pump-2" } else { "" };
        self.parse(&format!(
            r#"{PUMP_PROFILE}
devices:
  pump-1:
    bus: line
    unit: 1
    profile: pump
    poll: 200ms
    twin: {{ connection: aws, response_topics: ["cmd/+/response"], shadow: {{ thing: pump-1 }} }}
{extra_devices}
simulators:
  sim: {{ listen: "127.0.0.1:{{MODBUS}}", serves: [pump-1{served}], initial: {{ deviceData.temperature: 21.5, deviceAttrib.setpoint: 40 }} }}
"#
        ))
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if let Broker::Mosquitto(child) = &mut self.broker {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
        let violations = self.proxy.violations();
        if !violations.is_empty() && !std::thread::panicking() {
            panic!("the gateway went over AWS IoT Core's quotas:\n{}", violations.join("\n"));
        }
    }
}

pub async fn gateway(site: &Site) -> (Gateway, SimHandle) {
    let gw = Gateway::start(&site.config("")).await.expect("start");
    let sim = gw.simulator("sim").expect("sim").clone();
    (gw, sim)
}

