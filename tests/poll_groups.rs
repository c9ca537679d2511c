//! End to end: poll groups (each point read at its own interval, or once),
//! the fixed-rate schedule, and `telemetry_interval: every_poll`.

mod support;

use std::time::{Duration, Instant};

use support::{pump_config, start, Cloud};
use twinbus::point::Value;
use twinbus::sim::RequestRecord;

const WAIT: Duration = Duration::from_secs(10);

/// Waits until the simulator has logged `n` requests with `function`.
async fn until_requests(h: &support::Harness, function: u8, n: usize) -> Vec<RequestRecord> {
    let deadline = Instant::now() + WAIT;
    loop {
        let log = h.sim.request_log();
        if log.iter().filter(|r| r.function == function).count() >= n || Instant::now() > deadline {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn count(log: &[RequestRecord], function: u8) -> usize {
    log.iter().filter(|r| r.function == function).count()
}

/// The pump's input registers (function 4) every 100 ms, its holding
/// registers (function 3) every second, its coil (function 1) once: the
/// longest `poll_paths` pattern wins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_group_is_read_at_its_own_interval_and_a_once_point_only_at_start() {
    let yaml = pump_config("").replace(
        "    poll: 200ms\n",
        "    poll: 100ms\n    poll_paths: { deviceAttrib: 1s, deviceAttrib.motorStatus: once }\n",
    );
    let h = start(&yaml).await;
    let log = until_requests(&h, 4, 25).await;
    let fast: Vec<&RequestRecord> = log.iter().filter(|r| r.function == 4).collect();
    let span = fast[fast.len() - 1].at - fast[0].at;
    assert!(count(&log, 4) >= 25, "the fast group is read: {log:?}");
    assert_eq!(count(&log, 1), 1, "the once group is read once");
    // 25 fast reads span about 2.4 s: the 1 s group is read 2 or 3 times.
    let slow = count(&log, 3);
    assert!((2..=4).contains(&slow), "the 1 s group: {slow} reads in {span:?}");
    h.gateway.shutdown().await;
}

/// A changed value of the fast group reaches the cloud within its period,
/// although the slow group's values are not read again meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_reports_a_group_s_values_when_that_group_is_read() {
    let yaml = pump_config("").replace("    poll: 200ms\n", "    poll: 60s\n    poll_paths: { deviceData.temperature: 100ms }\n");
    let h = start(&yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["deviceData"]["temperature"] == 21.5).await;

    let asked = Instant::now();
    h.sim.set_value(1, "deviceData.temperature", &Value::Float(25.0)).expect("set");
    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["deviceData"]["temperature"] == 25.0).await;
    assert!(asked.elapsed() < Duration::from_secs(5), "reported with the fast group, not the 60 s one");
    assert!(doc.get("errors").is_none(), "{doc}");
    h.gateway.shutdown().await;
}

/// The next poll is due one period after the last was due, not after it
/// ended: with replies taking 30 ms, a 200 ms poll still comes every 200 ms
/// on average (it came every 230+ ms when counted from the end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_keeps_its_period_however_long_its_cycle_takes() {
    let h = start(&pump_config("")).await;
    h.sim.delay_replies(1, Duration::from_millis(30));
    // Skip the start (the first cycle runs before the delay is set).
    let first = until_requests(&h, 4, 3).await.len();
    let log = until_requests(&h, 4, 18).await;
    let reads: Vec<Instant> = log[first..].iter().filter(|r| r.function == 4).map(|r| r.at).collect();
    let periods = (reads.len() - 1) as u32;
    let mean = (reads[reads.len() - 1] - reads[0]) / periods;
    eprintln!("poll: 200ms, replies 30 ms, 3 reads a cycle: mean period {mean:?} over {periods} polls");
    assert!(mean >= Duration::from_millis(190) && mean <= Duration::from_millis(215), "mean period {mean:?}");
    h.gateway.shutdown().await;
}

/// `every_poll`: one full document per poll cycle, each with its own time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poll_sends_one_document_per_poll() {
    let yaml = pump_config("").replace("    poll: 200ms\n", "    poll: 50ms\n").replace("telemetry_interval: 1s", "telemetry_interval: every_poll");
    let h = start(&yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == true).await;

    let polls_before = count(&h.sim.request_log(), 4);
    let mut times = Vec::new();
    for _ in 0..20 {
        let doc = cloud.next_on("site/pump/telemetry", WAIT).await;
        assert!(doc["deviceData"]["temperature"].is_number(), "a full document: {doc}");
        times.push(doc["time"].as_u64().unwrap_or_default());
    }
    let polls = count(&h.sim.request_log(), 4) - polls_before;
    assert!(times.windows(2).all(|w| w[0] < w[1]), "each reading once, in order: {times:?}");
    // One document per poll: the reads counted since include at most the
    // cycle under way and the one reported as we started counting.
    assert!((20..=22).contains(&polls), "20 documents for {polls} polls");
    h.gateway.shutdown().await;
}

/// A slow group of 20 reads (25 ms each: half a second of line) does not
/// hold up a fast one: polls are served earliest deadline first, so the
/// fast read goes between the slow ones, and its gaps stay near its period
/// (they would reach the slow cycle's 500 ms if the cycle ran whole).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_group_keeps_its_period_while_a_long_slow_group_is_read() {
    let slow: String = (0..20).map(|i| format!("      slow.r{i}: {{ holding: {} }}\n", i * 2)).collect();
    let yaml = format!(
        r#"
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{{MQTT}}" }} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {{MODBUS}} }}, timeout: 300ms }}
devices:
  meter:
    bus: line
    unit: 1
    poll: 1s
    points:
      fast.power: {{ input: 0, poll: 200ms }}
{slow}
    twin: {{ connection: local, telemetry: site/meter/telemetry }}
simulators:
  sim:
    listen: "127.0.0.1:{{MODBUS}}"
    serves: [meter]
"#
    );
    let h = start(&yaml).await;
    h.sim.delay_replies(1, Duration::from_millis(25));
    let first = until_requests(&h, 4, 3).await.len();
    let log = until_requests(&h, 4, 18).await;
    let fast: Vec<Instant> = log[first..].iter().filter(|r| r.function == 4).map(|r| r.at).collect();
    let slow_reads = log[first..].iter().filter(|r| r.function == 3).count();
    let widest = fast.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    eprintln!("fast group 200ms beside 20 slow reads of 25 ms each: widest gap {widest:?} over {} fast reads ({slow_reads} slow reads)", fast.len());
    assert!(slow_reads >= 40, "the slow group was read meanwhile: {slow_reads} reads");
    assert!(widest < Duration::from_millis(350), "widest gap between fast reads {widest:?}");
    h.gateway.shutdown().await;
}
