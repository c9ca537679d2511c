//! End to end over RTU frames on TCP: a line behind a serial device server
//! (Moxa NPort, USR, Waveshare in raw TCP mode), played by the simulator
//! with `framing: rtu`. The connection is kept while units behind the
//! server stay silent, and made again when the server drops it.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{start, Cloud, PUMP_PROFILE};

const WAIT: Duration = Duration::from_secs(10);

fn config(extra_devices: &str) -> String {
    let served = if extra_devices.is_empty() { "pump" } else { "pump, dead" };
    format!(
        r#"
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{{MQTT}}" }} }}
buses:
  line: {{ rtu_tcp: {{ host: 127.0.0.1, port: {{MODBUS}}, baud: 19200 }}, timeout: 200ms, retries: 1 }}
{PUMP_PROFILE}
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: 100ms
    twin: {{ connection: local, commands: site/pump/cmd, responses: site/pump/rsp, telemetry: site/pump/telemetry }}
{extra_devices}
simulators:
  sim:
    listen: "127.0.0.1:{{MODBUS}}"
    framing: rtu
    serves: [{served}]
    initial: {{ deviceData.temperature: 21.5 }}
"#
    )
}

const DEAD: &str = "  dead: { bus: line, unit: 2, profile: pump, poll: 100ms }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_behind_a_device_server_is_polled_and_written_with_rtu_frames() {
    let h = start(&config(DEAD)).await;
    h.sim.set_silent(2, true);
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry", "site/pump/rsp"]).await;

    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["deviceData"]["temperature"].is_number()).await;
    assert_eq!(doc["deviceData"]["temperature"], 21.5, "{doc}");
    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"motorStatus": "on", "setpoint": 42.5}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["values"]["deviceAttrib"]["setpoint"], 42.5, "{answer}");
    assert_eq!(h.sim.value(1, "deviceAttrib.motorStatus"), Some(twinbus::point::Value::Text("on".into())));
    h.gateway.shutdown().await;
}

/// Unit 2 never answers: every probe of it times out. The device server is
/// there all along, so the gateway keeps its one connection (a server
/// that takes one client at a time would otherwise be redialled at every
/// probe), and unit 1 answers commands meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_unit_behind_the_device_server_costs_no_reconnect() {
    let h = start(&config(DEAD)).await;
    h.sim.set_silent(2, true);
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let from = Instant::now();
    for n in 0..3 {
        let answer = cloud.command(&json!({"id": n, "get": "*"})).await;
        assert_eq!(answer["status"], "succeeded", "{answer}");
    }
    let dead_asked = h.sim.request_log().iter().filter(|r| r.unit == 2).count();
    assert!(dead_asked >= 2, "the silent unit was asked ({dead_asked} times)");
    assert!(from.elapsed() < Duration::from_secs(3));
    assert_eq!(h.sim.connections(), 1, "one connection for the whole run");
    h.gateway.shutdown().await;
}

/// The device server restarts and drops the connection: the gateway
/// connects again and the device stays online (its retry goes over the new
/// connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_is_made_again_and_the_device_stays_online() {
    let h = start(&config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry", "site/pump/rsp"]).await;
    cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == true).await;

    h.sim.disconnect_all();
    tokio::time::sleep(Duration::from_millis(800)).await;

    assert_eq!(h.sim.connections(), 2, "connected again");
    let answer = cloud.command(&json!({"id": "after", "set": {"deviceAttrib": {"mode": "manual"}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    let log = h.sim.request_log();
    assert!(log.iter().rev().take(5).all(|r| r.answered), "polls go on: {:?}", &log[log.len().saturating_sub(5)..]);
    h.gateway.shutdown().await;
}

/// Nothing listens where the device server should be: the device is
/// offline with the reason, and connecting is not retried at every poll
/// (the attempts back off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_device_server_makes_the_device_offline_with_the_reason() {
    let closed = support::free_port();
    let yaml = config("").replace("port: {MODBUS}, baud", &format!("port: {closed}, baud"));
    let h = start(&yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/telemetry"]).await;
    let doc = cloud.wait_for("site/pump/telemetry", WAIT, |d| d["online"] == false).await;
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot connect to the device server 127.0.0.1"), "{doc}");
    h.gateway.shutdown().await;
}
