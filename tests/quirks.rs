//! End to end against the simulator playing device quirks met in the
//! field: a device that writes only with functions 5 and 6, one slow to
//! show a written value, one that answers "busy" (exception 0x06), and a
//! Modbus gateway whose device behind it does not answer (0x0A/0x0B).

mod support;

use std::time::Duration;

use serde_json::json;
use support::{free_port, http_get, metric, pump_config, start, Cloud};
use twinbus::point::Value;

const WAIT: Duration = Duration::from_secs(10);

/// The pump with device options added under `poll: 200ms`.
fn with_options(options: &str) -> String {
    pump_config("").replace("    poll: 200ms\n", &format!("    poll: 200ms\n{options}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_refuses_functions_15_and_16_is_written_with_5_and_6() {
    let h = start(&with_options("    single_writes: true\n")).await;
    h.sim.refuse_functions(1, &[15, 16]);
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"motorStatus": "on", "setpoint": 42.5, "mode": "manual"}}})).await;

    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["values"]["deviceAttrib"]["setpoint"], 42.5, "{answer}");
    assert_eq!(h.sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(42.5)));
    let functions: Vec<u8> = h.sim.writes().iter().map(|w| w.function).collect();
    assert_eq!(functions.len(), 4, "a coil, the f32's two registers one by one, the mode: {functions:?}");
    assert!(functions.iter().all(|f| *f == 5 || *f == 6), "{functions:?}");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_single_writes_such_a_device_refuses_the_command() {
    let h = start(&with_options("")).await;
    h.sim.refuse_functions(1, &[15, 16]);
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"setpoint": 42.5}}})).await;
    assert_ne!(answer["status"], "succeeded", "the simulator plays the quirk: {answer}");
    h.gateway.shutdown().await;
}

/// The device acknowledges at once but shows the value 300 ms later: the
/// read-back waits `read_back_delay`, so the answer carries the new value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_back_waits_for_a_device_slow_to_show_a_write() {
    let h = start(&with_options("    read_back_delay: 500ms\n")).await;
    h.sim.lag_writes(1, Duration::from_millis(300));
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"mode": "manual"}}})).await;

    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["values"]["deviceAttrib"]["mode"], "manual", "{answer}");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_read_back_delay_a_slow_device_shows_the_old_value() {
    let h = start(&with_options("")).await;
    h.sim.lag_writes(1, Duration::from_millis(500));
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"mode": "manual"}}})).await;
    assert_eq!(answer["values"]["deviceAttrib"]["mode"], "auto", "the simulator plays the quirk: {answer}");
    h.gateway.shutdown().await;
}

/// Exception 0x06: the write is sent again after the busy delay, and each
/// retry is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_device_is_asked_again_after_its_delay_and_the_retries_are_counted() {
    let http_port = free_port();
    let yaml = with_options("    busy: { retries: 3, delay: 50ms }\n") + &format!("http: {{ listen: \"127.0.0.1:{http_port}\" }}\n");
    let h = start(&yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let addr = h.gateway.http_addr().expect("the listener is up");
    let series = r#"twinbus_modbus_busy_retries_total{device="pump"}"#;
    let before = tokio::task::spawn_blocking(move || http_get(addr, "/metrics", None)).await.expect("join").1;

    h.sim.answer_busy(1, 2);
    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"setpoint": 55}}})).await;

    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["values"]["deviceAttrib"]["setpoint"], 55.0, "{answer}");
    assert_eq!(h.sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(55.0)));
    let after = tokio::task::spawn_blocking(move || http_get(addr, "/metrics", None)).await.expect("join").1;
    assert_eq!(metric(&after, series).unwrap_or(0.0) - metric(&before, series).unwrap_or(0.0), 2.0, "{after}");
    h.gateway.shutdown().await;
}

/// Polls too: a busy answer is asked again, and the device stays online.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_answer_to_a_poll_is_asked_again_and_the_device_stays_online() {
    let h = start(&with_options("    busy: { retries: 3, delay: 20ms }\n")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == true).await;
    h.sim.answer_busy(1, 3);
    h.sim.set_value(1, "deviceData.temperature", &Value::Float(30.0)).expect("set");
    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["deviceData"]["temperature"] == 30.0 || d["online"] == false).await;
    assert_eq!(doc["online"], true, "{doc}");
    assert!(doc.get("errors").is_none(), "no point carries the busy answer: {doc}");
    h.gateway.shutdown().await;
}

/// A Modbus gateway answering 0x0B (target failed to respond) stands for a
/// device that is not there: offline, with that reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_target_does_not_answer_makes_the_device_offline_with_that_reason() {
    let h = start(&with_options("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == true).await;

    h.sim.fail_as_gateway(1, Some(0x0B));
    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == false).await;
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("gateway") && error.to_lowercase().contains("target"), "{doc}");

    h.sim.fail_as_gateway(1, None);
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == true).await;
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_no_path_to_the_device_makes_it_offline_too() {
    let h = start(&with_options("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == true).await;
    h.sim.fail_as_gateway(1, Some(0x0A));
    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == false).await;
    assert!(doc["error"].as_str().unwrap_or_default().contains("gateway"), "{doc}");
    h.gateway.shutdown().await;
}
