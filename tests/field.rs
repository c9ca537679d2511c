//! End to end on the field side: telemetry, dead devices, shared lines.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{pump_config, start, Cloud, PUMP_PROFILE};
use twinbus::point::Value;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_carries_the_device_values_nested_by_path() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;

    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["deviceData"]["temperature"].is_number()).await;

    assert_eq!(doc["online"], true);
    assert!(doc["time"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "{doc}");
    assert_eq!(doc["deviceData"]["temperature"], 21.5);
    assert_eq!(doc["deviceAttrib"]["motorStatus"], "off");
    assert_eq!(doc["deviceAttrib"]["setpoint"], 40.0);
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_beyond_the_deadband_is_reported_before_the_next_full_report() {
    let h = start(&pump_config("").replace("telemetry_interval: 1s", "telemetry_interval: 1h")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;
    // The first full report went out after the first poll, before we subscribed.
    tokio::time::sleep(Duration::from_millis(600)).await;

    // 0.1 is inside the 0.2 deadband: not a change worth reporting.
    h.sim.set_value(1, "deviceData.temperature", &Value::Float(21.6)).expect("set");
    tokio::time::sleep(Duration::from_millis(600)).await;
    h.sim.set_value(1, "deviceData.temperature", &Value::Float(25.0)).expect("set");

    // Skip the initial full report (21.5), which may arrive after we subscribed.
    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["deviceData"]["temperature"].is_number() && d["deviceData"]["temperature"] != 21.5).await;
    assert_eq!(doc["deviceData"]["temperature"], 25.0, "the first reported change is the one beyond the deadband");
    assert!(doc["deviceAttrib"].is_null(), "only what changed: {doc}");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_device_is_reported_offline_with_the_reason_and_no_values() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry", "site/pump/rsp"]).await;
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == true).await;

    h.sim.set_silent(1, true);
    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == false).await;
    assert!(doc["error"].as_str().is_some_and(|e| e.contains("no answer")), "{doc}");
    assert!(doc["deviceData"].is_null() && doc["deviceAttrib"].is_null(), "no stale values: {doc}");

    let answer = cloud.command(&json!({"id": "x", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(answer["status"], "failed", "{answer}");
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("no answer")), "{answer}");

    h.sim.set_silent(1, false);
    let back = cloud.wait_for("site/pump/telemetry", Duration::from_secs(20), |d| d["online"] == true).await;
    assert!(back["deviceData"]["temperature"].is_number(), "values return with the device: {back}");
    h.gateway.shutdown().await;
}

/// Unit 1 answers; unit 2 on the same line is dead, and every poll of it
/// costs a full timeout, twice (one retry). Commands for unit 1 go ahead of
/// that polling, so each waits for at most the one transaction on the wire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_device_does_not_stall_a_live_one_on_the_same_line() {
    let yaml = format!(
        r#"
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{{MQTT}}" }} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {{MODBUS}} }}, timeout: 1s, retries: 3 }}
{PUMP_PROFILE}
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: 100ms
    twin: {{ connection: local, commands: site/pump/cmd, responses: site/pump/rsp }}
  dead:
    bus: line
    unit: 2
    profile: pump
    poll: 100ms
simulators:
  sim: {{ listen: "127.0.0.1:{{MODBUS}}", serves: [pump, dead] }}
"#
    );
    let h = start(&yaml).await;
    h.sim.set_silent(2, true);
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    // Let the dead device's polling occupy the line.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut slowest = Duration::ZERO;
    for n in 0..3 {
        let started = Instant::now();
        let value = if n % 2 == 0 { "on" } else { "off" };
        let answer = cloud.command(&json!({"id": n, "set": {"deviceAttrib": {"motorStatus": value}}})).await;
        assert_eq!(answer["status"], "succeeded", "{answer}");
        assert_eq!(answer["values"]["deviceAttrib"]["motorStatus"], value);
        slowest = slowest.max(started.elapsed());
    }
    // A poll of the dead unit holds the line for up to 4 × 1 s with its
    // retries; a command must never wait for more than the one in progress
    // (1 s) plus its own transactions. The margin is wide for slow machines.
    assert!(slowest < Duration::from_millis(3500), "a command waited {slowest:?} behind a dead device");
    h.gateway.shutdown().await;
}

/// A document's `time` is when its values were read. A full report due
/// while no new poll has come in waits for the next poll rather than send
/// the same reading twice (polls every 2 s, full reports every 500 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_poll_is_reported_once_even_when_reports_are_due_more_often() {
    let yaml = pump_config("").replace("poll: 200ms", "poll: 2s").replace("telemetry_interval: 1s", "telemetry_interval: 500ms");
    let h = start(&yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;

    let mut times = Vec::new();
    let end = tokio::time::Instant::now() + Duration::from_millis(4500);
    while let Some(doc) = cloud.try_next_on("site/pump/telemetry", end.saturating_duration_since(tokio::time::Instant::now())).await {
        assert!(doc["deviceData"]["temperature"].is_number(), "every report is a full one here: {doc}");
        times.push(doc["time"].as_u64().unwrap_or_default());
    }
    let mut distinct = times.clone();
    distinct.dedup();
    assert_eq!(times, distinct, "a reading was sent twice");
    assert!((2..=4).contains(&times.len()), "one report per poll (every 2 s): {times:?}");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_without_a_twin_is_polled_and_the_gateway_keeps_running() {
    let yaml = pump_config("")
        .replace("simulators:", "  meter:\n    bus: line\n    unit: 2\n    profile: pump\n    poll: 100ms\nsimulators:")
        .replace("serves: [pump]", "serves: [pump, meter]");
    let mut h = start(&yaml).await;
    // Polls of the twinless device reach the simulator, poll after poll.
    let before = h.sim.requests();
    let deadline = Instant::now() + WAIT;
    while h.sim.requests() < before + 20 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.sim.requests() >= before + 20, "the devices are polled");
    // A zero timeout polls once: a failure reported by now would be ready.
    let failure = tokio::time::timeout(Duration::ZERO, h.gateway.failed()).await;
    assert!(failure.is_err(), "no part of the gateway ended: {failure:?}");
    h.gateway.shutdown().await;
}
