//! End to end on the field side: telemetry, dead devices, shared lines.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{pump_config, start, Cloud, PUMP_PROFILE};
use twinbus::point::Value;
use twinbus::sim::RequestRecord;

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
    // The first poll's report may have gone out before we subscribed.
    let answer = cloud.command(&json!({"id": "here", "get": "*"})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");

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

/// Unit 1 answers; units 2–6 on the same line are dead, and each request
/// to one of them holds the line for a full 500 ms timeout. The simulator's
/// request log shows the order of transactions on the wire: a command for
/// unit 1 reaches the device after at most one dead-unit transaction (the
/// one on the wire when it came), and unit 1's polls never wait for two
/// (they go ahead of the probes of offline units), however many are dead.
/// The dead units have no twin: they are polled anyway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_device_waits_for_at_most_one_dead_neighbour_transaction() {
    let yaml = format!(
        r#"
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{{MQTT}}" }} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {{MODBUS}} }}, timeout: 500ms, retries: 1 }}
{PUMP_PROFILE}
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: 100ms
    twin: {{ connection: local, commands: site/pump/cmd, responses: site/pump/rsp }}
  dead-2: {{ bus: line, unit: 2, profile: pump, poll: 100ms }}
  dead-3: {{ bus: line, unit: 3, profile: pump, poll: 100ms }}
  dead-4: {{ bus: line, unit: 4, profile: pump, poll: 100ms }}
  dead-5: {{ bus: line, unit: 5, profile: pump, poll: 100ms }}
  dead-6: {{ bus: line, unit: 6, profile: pump, poll: 100ms }}
simulators:
  sim: {{ listen: "127.0.0.1:{{MODBUS}}", serves: [pump, dead-2, dead-3, dead-4, dead-5, dead-6] }}
"#
    );
    let h = start(&yaml).await;
    for unit in 2..=6 {
        h.sim.set_silent(unit, true);
    }
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    // The first round tries each dead unit once (2.5 s of timeouts); from
    // then on they are offline and probed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let from = Instant::now();

    let mut sent = Vec::new();
    for n in 0..6 {
        let value = if n % 2 == 0 { "on" } else { "off" };
        sent.push(Instant::now());
        let answer = cloud.command(&json!({"id": n, "set": {"deviceAttrib": {"motorStatus": value}}})).await;
        assert_eq!(answer["status"], "succeeded", "{answer}");
        assert_eq!(answer["values"]["deviceAttrib"]["motorStatus"], value);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let log: Vec<RequestRecord> = h.sim.request_log().into_iter().filter(|r| r.at >= from).collect();
    let dead = |r: &RequestRecord| r.unit != 1;

    for (n, t) in sent.iter().enumerate() {
        let write = log.iter().position(|r| r.unit == 1 && r.function == 5 && r.at >= *t);
        let Some(write) = write else { panic!("command {n}: no write reached the device") };
        let waited = log[..write].iter().filter(|r| r.at > *t && dead(r)).count();
        assert!(waited <= 1, "command {n} waited for {waited} dead-unit transactions");
    }
    let mut run = 0;
    for r in &log {
        run = if dead(r) { run + 1 } else { 0 };
        assert!(run <= 1, "two dead-unit transactions in a row while unit 1 had a poll due: {log:?}");
    }
    let probes = log.iter().filter(|r| dead(r)).count();
    assert!(probes >= 2, "the dead units were probed meanwhile ({probes} requests)");
    assert!(log.iter().filter(|r| dead(r)).all(|r| !r.answered));
    h.gateway.shutdown().await;
}

/// Polls are 30 s apart here, so only a command can find the device back
/// in time. Telemetry must say online after that command's first good
/// transaction, not at the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_comes_back_is_reported_online_at_its_first_good_transaction() {
    let h = start(&pump_config("").replace("poll: 200ms", "poll: 30s")).await;
    // Two clients: waiting for an answer skips other topics, and the
    // telemetry document can come before the answer.
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let mut telemetry = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;

    h.sim.set_silent(1, true);
    let answer = cloud.command(&json!({"id": "gone", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(answer["status"], "failed", "{answer}");
    // The command found the device gone: telemetry says so at once.
    telemetry.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == false).await;

    h.sim.set_silent(1, false);
    let back_from = Instant::now();
    let answer = cloud.command(&json!({"id": "back", "set": {"deviceAttrib": {"motorStatus": "off"}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    // Generous for a loaded machine; before, this waited for the next poll
    // (30 s here, up to 30 s of backoff anywhere).
    let doc = telemetry.wait_for("site/pump/telemetry", Duration::from_secs(5), |d| d["online"] == true).await;
    assert_eq!(doc["deviceAttrib"]["motorStatus"], "off", "{doc}");
    let first = h.sim.request_log().into_iter().find(|r| r.unit == 1 && r.at >= back_from && r.answered);
    assert_eq!(first.map(|r| r.function), Some(5), "the command's write was the first good transaction");
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
