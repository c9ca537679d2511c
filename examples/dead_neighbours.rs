//! Benchmark: does a dead device on a line slow down the healthy one?
//!
//! Starts a gateway in-process on one Modbus TCP bus (timeout 300 ms, the
//! default one retry) against the built-in simulator, for three lines: 1
//! dead of 2 units, 10 dead of 11, and 20 dead of 200. Every unit is polled
//! every second (two requests a poll) and has a telemetry twin. Unit 1 is
//! healthy and also takes raw commands; the bench plays the cloud.
//!
//! The dead units never answer. After a warm-up in which the gateway finds
//! them dead, the bench measures:
//! - command latency: MQTT publish of a `set` → its answer on the response
//!   topic (the value written and read back), one command at a time with a
//!   random pause of 50–250 ms between them, so commands arrive at every
//!   phase of the dead units' polling;
//! - the healthy unit's poll gaps: the time between two consecutive polls of
//!   it, taken from the simulator's request log (its input-register reads:
//!   only polls read that table here).
//!
//! Targets (issue 8): command p99 ≤ 400 ms, and poll gap ≤ poll period
//! (1 s) + 400 ms.
//!
//! Two more lines, for information (no target): units that were answering
//! all go silent at the same moment (a section of the plant loses power),
//! measured from that moment. Each of them must time out once before the
//! gateway can know it is dead, so the line is busy with those timeouts for a
//! while.
//!
//! Run: `cargo run --release --example dead_neighbours [SECONDS]` (seconds
//! measured per line, default 30). Figures on a shared machine vary.

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use twinbus::config::Config;
use twinbus::gateway::Gateway;

const TIMEOUT_MS: u64 = 300;
const POLL_MS: u64 = 1000;
/// Long enough for the first poll round to find the dead units dead.
const WARM_UP: Duration = Duration::from_secs(10);

fn config(mqtt: u16, modbus: u16, units: u8, tag: &str) -> String {
    let mut yaml = format!(
        r#"
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{mqtt}" }} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: {TIMEOUT_MS}ms }}
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: {{ coil: 0, values: {{ on: true, off: false }} }}
      deviceData.temperature:   {{ input: 0, type: i16, scale: 0.1 }}
devices:
  u1:
    bus: line
    unit: 1
    profile: pump
    poll: {POLL_MS}ms
    twin: {{ connection: local, commands: bench/cmd, responses: bench/rsp }}
"#
    );
    for u in 2..=units {
        // Each with a telemetry twin, as on a real site (and because a device
        // without any twin stopped at once before issue 8).
        let twin = format!("{{ connection: local, telemetry: bench/u{u}/data }}");
        yaml.push_str(&format!("  u{u}: {{ bus: line, unit: {u}, profile: pump, poll: {POLL_MS}ms, twin: {twin} }}\n"));
    }
    let served: Vec<String> = (1..=units).map(|u| format!("u{u}")).collect();
    yaml.push_str(&format!("simulators:\n  sim: {{ listen: \"127.0.0.1:{modbus}\", serves: [{}] }}\n", served.join(", ")));
    let dir = std::env::temp_dir().join(format!("twinbus-dead-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    yaml.push_str(&format!("state_dir: {}\n", dir.display()));
    yaml
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A cloud client subscribed to the answers: (client, answers).
async fn cloud(port: u16) -> anyhow::Result<(AsyncClient, tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>)> {
    let mut opts = MqttOptions::new(format!("bench-{port}"), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, mut ready) = tokio::sync::mpsc::unbounded_channel();
    let sub = client.clone();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub.try_subscribe("bench/rsp", QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p.payload).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready.recv()).await?;
    Ok((client, rx))
}

struct Figures {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

fn figures(mut ms: Vec<f64>) -> Figures {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| if ms.is_empty() { f64::NAN } else { ms[((ms.len() as f64 - 1.0) * p).round() as usize] };
    Figures { n: ms.len(), p50: at(0.5), p99: at(0.99), max: at(1.0) }
}

/// When the dead units stop answering.
#[derive(Clone, Copy, PartialEq)]
enum Death {
    /// Before the gateway starts: they never answer.
    Before,
    /// All at once, after every unit answered for a few seconds.
    Together,
}

async fn line(dead: u8, units: u8, death: Death, seconds: u64) -> anyhow::Result<()> {
    let (mqtt, modbus) = (free_port()?, free_port()?);
    let yaml = config(mqtt, modbus, units, &format!("{dead}-{units}"));
    let config = Config::parse(&yaml, Path::new("bench.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let gateway = Gateway::start(&config).await?;
    let sim = gateway.simulator("sim").ok_or_else(|| anyhow::anyhow!("no simulator"))?.clone();
    let silence = || {
        for u in (units - dead + 1)..=units {
            sim.set_silent(u, true);
        }
    };
    if death == Death::Before {
        silence();
    }
    if !gateway.wait_ready(Duration::from_secs(10)).await {
        anyhow::bail!("the gateway's MQTT session did not come up");
    }
    let (client, mut answers) = cloud(mqtt).await?;
    if death == Death::Before {
        tokio::time::sleep(WARM_UP).await;
    } else {
        tokio::time::sleep(Duration::from_secs(4)).await;
        silence();
    }
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let mut latencies = Vec::new();
    let (mut failed, mut lost) = (0, 0);
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut i = 0u64;
    while Instant::now() < end {
        let value = if i.is_multiple_of(2) { "on" } else { "off" };
        let cmd = format!(r#"{{"id":"{i}","set":{{"deviceAttrib":{{"motorStatus":"{value}"}}}}}}"#);
        let sent = Instant::now();
        client.publish("bench/cmd", QoS::AtLeastOnce, false, cmd).await?;
        let want = format!(r#""id":"{i}""#);
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(30), answers.recv()).await {
                Ok(Some(a)) if String::from_utf8_lossy(&a).contains(&want) => break Some(a),
                Ok(Some(_)) => continue,
                _ => break None,
            }
        };
        match answer {
            Some(a) => {
                latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                failed += usize::from(!String::from_utf8_lossy(&a).contains("succeeded"));
            }
            None => lost += 1,
        }
        i += 1;
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(50 + seed % 200)).await;
    }
    let stopped = Instant::now();

    let log: Vec<_> = sim.request_log().into_iter().filter(|r| r.at >= started && r.at <= stopped).collect();
    let polls: Vec<Instant> = log.iter().filter(|r| r.unit == 1 && r.function == 4).map(|r| r.at).collect();
    let unanswered = log.iter().filter(|r| !r.answered).count();
    let gaps: Vec<f64> = polls.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0).collect();
    let c = figures(latencies);
    let g = figures(gaps);
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let label = match death {
        Death::Before => format!("{dead:>2} dead of {units:>3}"),
        Death::Together => format!("{dead:>2} of {units:>3} die"),
    };
    let verdict = |ok: bool| match death {
        Death::Before => verdict(ok),
        Death::Together => "no target",
    };
    println!(
        "{label}: commands n={:<4} p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  ({failed} failed, {lost} unanswered; target p99 ≤ 400 ms: {})",
        c.n,
        c.p50,
        c.p99,
        c.max,
        verdict(c.p99 <= 400.0)
    );
    println!(
        "                  poll gaps n={:<4} p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  (target max ≤ {} ms: {}); {unanswered} requests to dead units",
        g.n,
        g.p50,
        g.p99,
        g.max,
        POLL_MS + 400,
        verdict(g.max <= (POLL_MS + 400) as f64)
    );
    gateway.shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    println!("one Modbus TCP line, timeout {TIMEOUT_MS} ms, 1 retry, every unit polled every {POLL_MS} ms; {seconds} s measured per line");
    println!("command latency: MQTT publish of a set → its answer (written and read back)");
    println!("dead from the start, measured after {WARM_UP:?} of warm-up:");
    for (dead, units) in [(1, 2), (10, 11), (20, 200)] {
        line(dead, units, Death::Before, seconds).await?;
    }
    println!("answering for 4 s, then silent all at once, measured from that moment:");
    for (dead, units) in [(10, 11), (20, 200)] {
        line(dead, units, Death::Together, seconds).await?;
    }
    Ok(())
}
