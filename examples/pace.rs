//! Measurement: publishes per second of one connection serving 100 devices,
//! unpaced and then paced to AWS IoT Core's limits, and how prompt a
//! command's answer stays while telemetry is held back.
//!
//! Starts an embedded broker, the tests' quota proxy in front of it
//! (`tests/support/quota.rs`, included by path, as is the tests' MQTT
//! client), and a gateway whose one connection goes through the proxy: 100
//! simulated meters on one Modbus TCP simulator, each polled every 200 ms
//! with on-change telemetry and a full document every second; two of their
//! values drift, so the offered load is near 2 documents per second per
//! meter. One meter also takes raw commands, sent every 250 ms. Run twice:
//! with `limits: { preset: none }` (what the fleet offers), then with
//! `limits: { preset: aws }` (what the limiter lets through). The proxy
//! counts every publish and every quota a publish went over.
//!
//! Run: `cargo run --release --example pace [SECONDS]` (default 20 per run).

use std::path::Path;
use std::time::{Duration, Instant};

use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::mqtt::{Access, EmbeddedBroker};

#[path = "../tests/support/mqtt.rs"]
mod mqtt;
#[path = "../tests/support/quota.rs"]
mod quota;

use mqtt::{Mqtt, Options};
use quota::{QuotaProxy, Quotas};

const METERS: usize = 100;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn config(proxy: u16, modbus: u16, limits: &str, run: &str) -> anyhow::Result<Config> {
    let state = std::env::temp_dir().join(format!("twinbus-pace-{}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let mut devices = String::new();
    for i in 1..=METERS {
        let extra = if i == 1 { ", commands: fleet/cmd, responses: fleet/rsp" } else { "" };
        devices += &format!("  meter-{i:03}: {{ bus: line, unit: {i}, profile: meter, poll: 200ms, twin: {{ connection: aws, telemetry: fleet/meter-{i:03}, telemetry_interval: 1s{extra} }} }}\n");
    }
    let served: Vec<String> = (1..=METERS).map(|i| format!("meter-{i:03}")).collect();
    let yaml = format!(
        r#"
state_dir: {state}
connections:
  aws: {{ url: "mqtt://127.0.0.1:{proxy}", client_id: pace-gw, limits: {limits} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 500ms }}
profiles:
  meter:
    points:
      deviceData.temperature: {{ input: 0, type: i16, scale: 0.1 }}
      deviceData.power:       {{ input: 1, type: u16, scale: 0.1 }}
      deviceAttrib.mode:      {{ holding: 12, values: {{ auto: 0, manual: 1 }} }}
devices:
{devices}simulators:
  sim: {{ listen: "127.0.0.1:{modbus}", serves: [{}], drift: [deviceData.temperature, deviceData.power] }}
"#,
        served.join(", "),
        state = state.display(),
    );
    Config::parse(&yaml, Path::new("pace.yaml")).map_err(|e| anyhow::anyhow!("{e}"))
}

/// One run: what reached the broker, what the proxy saw, how long answers took.
async fn run(limits: &str, seconds: u64) -> anyhow::Result<()> {
    let (broker_port, modbus) = (free_port()?, free_port()?);
    let _broker = EmbeddedBroker::start(format!("127.0.0.1:{broker_port}").parse()?, Access::anyone())?;
    let generous = Quotas { publishes_per_second: usize::MAX, bytes_per_second: usize::MAX, ..Quotas::AWS };
    let proxy = QuotaProxy::start(broker_port, if limits.contains("none") { generous } else { Quotas::AWS }).await?;
    let gateway = Gateway::start(&config(proxy.port(), modbus, limits, limits.replace(['{', '}', ' ', ':'], "").as_str())?).await?;
    let options = Options::new(format!("pace-cloud-{broker_port}")).keep_alive(Duration::from_secs(30)).nodelay().subscribe(["fleet/rsp"]).wait(Duration::from_secs(5));
    let mut cloud = Mqtt::connect(broker_port, options).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // past the start-up burst

    let (p0, t0) = (proxy.publishes("pace-gw"), Instant::now());
    let mut answers = Vec::new();
    let mut lost = 0;
    let mut n = 0;
    while t0.elapsed() < Duration::from_secs(seconds) {
        n += 1;
        let start = Instant::now();
        cloud.publish("fleet/cmd", format!(r#"{{"id":"{n}","get":["deviceAttrib.mode"]}}"#)).await?;
        let want = format!(r#""id":"{n}""#);
        match cloud.next_matching(Duration::from_secs(5), |m| m.text().contains(&want)).await {
            Some(_) => answers.push(start.elapsed()),
            None => lost += 1,
        }
        tokio::time::sleep(Duration::from_millis(250).saturating_sub(start.elapsed())).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let published = proxy.publishes("pace-gw") - p0;
    answers.sort();
    let pct = |p: f64| answers.get(((answers.len().max(1) - 1) as f64 * p) as usize).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0);
    println!(
        "limits {limits}: {:.1} publishes/s on average over {secs:.0} s, at most {} in any one second; {} quota violations; command answers under load: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} answered, {lost} unanswered)",
        published as f64 / secs,
        proxy.peak_publishes_per_second("pace-gw"),
        proxy.violations().len(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
        answers.len(),
    );
    gateway.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())).with_writer(std::io::stderr).init();
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    println!("{METERS} meters on one connection, polled every 200 ms, telemetry on change and in full every second:");
    run("{ preset: none }", seconds).await?;
    run("{ preset: aws }", seconds).await?;
    Ok(())
}
