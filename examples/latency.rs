//! Benchmark: command round trip and wire efficiency on the demo pump.
//!
//! Starts a gateway in-process (embedded broker, simulator, the demo's pump
//! profile on free loopback ports), then plays the cloud:
//! - sends N `set` commands one after the other and reports the round trip
//!   (publish → answer with read-back) as percentiles;
//! - counts Modbus requests per poll cycle (the read planner's merging) and
//!   per command (write + read-back);
//! - times a shadow delta until the read-back is reported (delta → reported).
//!
//! Run: `cargo run --release --example latency [N]`. Figures on a shared
//! machine vary; the counts do not.
//!
//! Its MQTT clients are the tests' own (`tests/support/mqtt.rs`), included by
//! path: an example cannot use a test's modules, and that file depends on
//! nothing else in `tests/support`. Both set TCP_NODELAY, or small answers
//! would wait ≈ 40 ms in the kernel and the figures would measure that.

use std::path::Path;
use std::time::{Duration, Instant};

use twinbus::config::Config;
use twinbus::gateway::Gateway;

#[path = "../tests/support/mqtt.rs"]
mod mqtt;

use mqtt::{Mqtt, Options};

const CONFIG: &str = r#"
connections:
  local: { embedded: { listen: "127.0.0.1:MQTT" } }
buses:
  line: { tcp: { host: 127.0.0.1, port: MODBUS }, timeout: 500ms, retries: 1 }
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint:    { holding: 10, type: f32, min: 0, max: 80 }
      deviceAttrib.mode:        { holding: 12, values: { auto: 0, manual: 1 } }
      deviceData.running:       { input: 1, access: read }
      deviceData.temperature:   { input: 0, type: i16, scale: 0.1, deadband: 0.2 }
      deviceData.runHours:      { input: 2, type: u32 }
devices:
  demo-pump:
    bus: line
    unit: 1
    profile: pump
    poll: POLL
    twin: { connection: local, commands: iot/v1/cmd, responses: iot/v1/rsp }
simulators:
  sim: { listen: "127.0.0.1:MODBUS", serves: [demo-pump], mirror: { deviceData.running: deviceAttrib.motorStatus } }
"#;

/// A `state_dir:` line for a fresh store of this run.
fn state_dir(tag: &str) -> String {
    let dir = std::env::temp_dir().join(format!("twinbus-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    format!("state_dir: {}\n", dir.display())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(500);
    let (mqtt, modbus) = (free_port()?, free_port()?);

    // 1. Requests per poll cycle: poll fast for a while with no commands.
    let yaml = CONFIG.replace("MQTT", &mqtt.to_string()).replace("MODBUS", &modbus.to_string()).replace("POLL", "50ms") + &state_dir("poll");
    let config = Config::parse(&yaml, Path::new("bench.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let points = config.devices[0].points.len();
    let gateway = Gateway::start(&config).await?;
    let sim = gateway.simulator("sim").ok_or_else(|| anyhow::anyhow!("no simulator"))?.clone();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (r0, t0) = (sim.requests(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (reqs, secs) = (sim.requests() - r0, t0.elapsed().as_secs_f64());
    let cycles = secs / 0.05;
    println!("poll: {points} points, {:.2} Modbus requests per poll cycle (one per table with contiguous points)", reqs as f64 / cycles);
    gateway.shutdown().await;

    // 2. Command round trip, with slow polling so commands dominate the wire.
    let (mqtt, modbus) = (free_port()?, free_port()?);
    let yaml = CONFIG.replace("MQTT", &mqtt.to_string()).replace("MODBUS", &modbus.to_string()).replace("POLL", "10s") + &state_dir("commands");
    let config = Config::parse(&yaml, Path::new("bench.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = Gateway::start(&config).await?;
    let sim = gateway.simulator("sim").ok_or_else(|| anyhow::anyhow!("no simulator"))?.clone();

    let options = Options::new("bench-cloud").keep_alive(Duration::from_secs(30)).nodelay().subscribe(["iot/v1/rsp"]).wait(Duration::from_secs(5));
    let mut cloud = Mqtt::connect(mqtt, options).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut samples = Vec::with_capacity(n);
    let r0 = sim.requests();
    let mut failed = 0;
    for i in 0..n {
        let value = if i % 2 == 0 { "on" } else { "off" };
        let cmd = format!(r#"{{"id":"{i}","set":{{"deviceAttrib":{{"motorStatus":"{value}"}}}}}}"#);
        let start = Instant::now();
        cloud.publish("iot/v1/cmd", cmd).await?;
        let answer = cloud.next(Duration::from_secs(5)).await.ok_or_else(|| anyhow::anyhow!("command {i}: no answer within 5 s"))?;
        samples.push(start.elapsed());
        let ok = answer.text().contains("succeeded");
        failed += usize::from(!ok);
    }
    let per_command = (sim.requests() - r0) as f64 / n as f64;
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "command round trip over {n} sets (MQTT in → coil written → read back → answer out): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {failed} failed",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(1.0)
    );
    println!("Modbus requests per command: {per_command:.2} (one write, one read-back)");
    gateway.shutdown().await;

    shadow_round_trip(n.min(200)).await
}

/// 3. Shadow: the bench plays the shadow service's side of the topics: it
/// answers the gateway's `get` with 404 and publishes deltas with rising
/// versions; it times each delta until the gateway's `update` carries the
/// read-back value.
async fn shadow_round_trip(n: usize) -> anyhow::Result<()> {
    let (mqtt, modbus) = (free_port()?, free_port()?);
    let yaml = CONFIG
        .replace("MQTT", &mqtt.to_string())
        .replace("MODBUS", &modbus.to_string())
        .replace("POLL", "10s")
        .replace("twin: { connection: local, commands: iot/v1/cmd, responses: iot/v1/rsp }", "twin: { connection: local, shadow: { thing: demo-pump } }")
        + &state_dir("shadow");
    let config = Config::parse(&yaml, Path::new("bench.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;

    let prefix = "$aws/things/demo-pump/shadow";
    let gateway = Gateway::start(&config).await?;
    let options = Options::new("bench-shadow-service")
        .keep_alive(Duration::from_secs(30))
        .nodelay()
        .subscribe([format!("{prefix}/get"), format!("{prefix}/update")])
        .wait(Duration::from_secs(5));
    let mut service = Mqtt::connect(mqtt, options).await?;
    // Answer the first get with 404 so the gateway creates the shadow; then measure.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match service.next(Duration::from_millis(200)).await {
            Some(m) if m.topic.ends_with("/get") => {
                service.publish(&format!("{prefix}/get/rejected"), r#"{"code":404,"message":"No shadow exists"}"#).await?;
            }
            Some(m) if m.topic.ends_with("/update") => break,
            _ => {}
        }
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let value = if i % 2 == 0 { "on" } else { "off" };
        let delta = format!(r#"{{"state":{{"deviceAttrib":{{"motorStatus":"{value}"}}}},"version":{},"timestamp":1}}"#, i + 10);
        let start = Instant::now();
        service.publish(&format!("{prefix}/update/delta"), delta).await?;
        let want = format!(r#""motorStatus":"{value}""#);
        loop {
            let m = service.next(Duration::from_secs(5)).await.ok_or_else(|| anyhow::anyhow!("delta {i}: nothing within 5 s"))?;
            if m.topic.ends_with("/update") && m.text().contains(&want) {
                break;
            }
        }
        samples.push(start.elapsed());
    }
    samples.sort();
    let pct = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    println!(
        "shadow delta → reported over {n} deltas (update/delta in → coil written → read back → update out): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms",
        pct(0.5),
        pct(0.9),
        pct(0.99)
    );
    gateway.shutdown().await;
    Ok(())
}
