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

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use twinbus::config::Config;
use twinbus::gateway::Gateway;

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

    let mut opts = MqttOptions::new("bench-cloud", "127.0.0.1", mqtt);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sub = client.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub.try_subscribe("iot/v1/rsp", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(Some(p.payload));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let _ = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut samples = Vec::with_capacity(n);
    let r0 = sim.requests();
    let mut failed = 0;
    for i in 0..n {
        let value = if i % 2 == 0 { "on" } else { "off" };
        let cmd = format!(r#"{{"id":"{i}","set":{{"deviceAttrib":{{"motorStatus":"{value}"}}}}}}"#);
        let start = Instant::now();
        client.publish("iot/v1/cmd", QoS::AtLeastOnce, false, cmd).await?;
        let answer = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?.flatten();
        samples.push(start.elapsed());
        let ok = answer.is_some_and(|a| String::from_utf8_lossy(&a).contains("succeeded"));
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
    let mut opts = MqttOptions::new("bench-shadow-service", "127.0.0.1", mqtt);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, bytes::Bytes)>();
    let sub = client.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for t in ["get", "update"] {
                        let _ = sub.try_subscribe(format!("$aws/things/demo-pump/shadow/{t}"), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload));
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    // Answer the first get with 404 so the gateway creates the shadow; then measure.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some((topic, _))) if topic.ends_with("/get") => {
                client.publish(format!("{prefix}/get/rejected"), QoS::AtLeastOnce, false, r#"{"code":404,"message":"No shadow exists"}"#).await?;
            }
            Ok(Some((topic, _))) if topic.ends_with("/update") => break,
            _ => {}
        }
    }
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let value = if i % 2 == 0 { "on" } else { "off" };
        let delta = format!(r#"{{"state":{{"deviceAttrib":{{"motorStatus":"{value}"}}}},"version":{},"timestamp":1}}"#, i + 10);
        let start = Instant::now();
        client.publish(format!("{prefix}/update/delta"), QoS::AtLeastOnce, false, delta).await?;
        let want = format!(r#""motorStatus":"{value}""#);
        loop {
            let (topic, payload) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await?.ok_or_else(|| anyhow::anyhow!("closed"))?;
            if topic.ends_with("/update") && String::from_utf8_lossy(&payload).contains(&want) {
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
