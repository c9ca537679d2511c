//! End to end, the promises under stress: every command gets exactly one
//! answer through a flood; what was queued survives a restart; a command is
//! never run twice, also across a restart or a crash; a failed start leaves
//! nothing running.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::{free_port, fresh_state_dir, pump_config, Cloud, PUMP_PROFILE};
use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::mqtt::{encode_publish, Access, Class, EmbeddedBroker, Publish};
use twinbus::store::{CommandState, Op, Store};

const WAIT: Duration = Duration::from_secs(20);

/// The demo pump with a raw twin, on a broker the test owns (so that it is
/// up before the gateway and outlives it), keeping its store in `state`.
fn remote_pump(broker_port: u16, modbus_port: u16, state: &Path, poll: &str) -> Config {
    let yaml = format!(
        r#"
connections:
  remote: {{ url: "mqtt://127.0.0.1:{broker_port}", client_id: gw-{broker_port}, reconnect: {{ min: 100ms, max: 500ms }} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus_port} }}, timeout: 300ms }}
{PUMP_PROFILE}
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: {poll}
    twin: {{ connection: remote, commands: site/pump/cmd, responses: site/pump/rsp, telemetry: site/pump/telemetry, telemetry_interval: 200ms }}
simulators:
  sim: {{ listen: "127.0.0.1:{modbus_port}", serves: [pump] }}
state_dir: {}
shutdown_timeout: 3s
"#,
        state.display()
    );
    Config::parse(&yaml, Path::new("remote.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

fn broker(port: u16) -> EmbeddedBroker {
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    EmbeddedBroker::start(addr, Access::anyone()).expect("broker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_of_a_flood_is_answered_exactly_once() {
    let h = support::start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let n = 2000;
    for i in 0..n {
        let value = if i % 2 == 0 { "on" } else { "off" };
        cloud.publish("site/pump/cmd", json!({"id": format!("f-{i}"), "set": {"deviceAttrib": {"motorStatus": value}}}).to_string()).await;
    }
    let mut answers: HashMap<String, Vec<Json>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while answers.len() < n && tokio::time::Instant::now() < deadline {
        let Some(a) = cloud.try_next_on("site/pump/rsp", Duration::from_secs(10)).await else { break };
        let id = a["id"].as_str().expect("every answer carries its id").to_string();
        answers.entry(id).or_default().push(a);
    }
    assert_eq!(answers.len(), n, "every id answered");
    // Anything arriving late would be a second answer.
    if let Some(extra) = cloud.try_next_on("site/pump/rsp", Duration::from_millis(500)).await {
        panic!("an answer after all were in: {extra}");
    }
    let twice: Vec<&String> = answers.iter().filter(|(_, a)| a.len() > 1).map(|(id, _)| id).collect();
    assert!(twice.is_empty(), "ids answered more than once: {twice:?}");
    let busy = answers.values().filter(|a| a[0]["error"].as_str().is_some_and(|e| e.starts_with("busy"))).count();
    let succeeded = answers.values().filter(|a| a[0]["status"] == "succeeded").count();
    assert_eq!(busy + succeeded, n, "each either ran or was refused as busy");
    assert!(succeeded >= 32, "the device's queue was used: {succeeded} succeeded, {busy} busy");
    assert_eq!(h.sim.writes().len(), succeeded, "one write per command that ran, none for a refused one");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_after_a_restart_gets_the_stored_answer_and_nothing_is_written() {
    let (broker_port, state) = (free_port(), fresh_state_dir("repeat"));
    let _broker = broker(broker_port);
    let mut cloud = Cloud::connect(broker_port, &["site/pump/rsp"]).await;

    let gateway = Gateway::start(&remote_pump(broker_port, free_port(), &state, "1s")).await.expect("start");
    assert!(gateway.wait_ready(WAIT).await);
    let first = cloud.command(&json!({"id": 12345678901234567890u64, "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(first["status"], "succeeded", "{first}");
    assert_eq!(gateway.simulator("sim").expect("sim").writes().len(), 1);
    gateway.shutdown().await;

    let gateway = Gateway::start(&remote_pump(broker_port, free_port(), &state, "1s")).await.expect("restart");
    assert!(gateway.wait_ready(WAIT).await);
    // The same id, even with other content: a retry of the same command.
    let again = cloud.command(&json!({"id": 12345678901234567890u64, "set": {"deviceAttrib": {"motorStatus": "off"}}})).await;
    assert_eq!(again, first, "the first answer, as it was");
    let other = cloud.command(&json!({"id": "12345678901234567890", "get": "*"})).await;
    assert_eq!(other["status"], "succeeded", "a string id is another id: {other}");
    assert!(gateway.simulator("sim").expect("sim").writes().is_empty(), "nothing written after the restart");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_cut_off_by_a_crash_is_answered_interrupted_at_start_and_never_run() {
    let (broker_port, state) = (free_port(), fresh_state_dir("crash"));
    // What a crash between "recorded as started" and "answered" leaves behind.
    {
        let store = Store::open(&state).expect("store");
        let route = Publish::new(Class::Answer, "site/pump/rsp", Vec::new());
        let op = Op::RawCommand { device: "pump".into(), id: "\"c-9\"".into(), at_ms: 1, state: CommandState::Started, record: encode_publish(&route) };
        store.apply(vec![op]).await.expect("write");
        store.close().await;
    }
    let _broker = broker(broker_port);
    let mut cloud = Cloud::connect(broker_port, &["site/pump/rsp"]).await;
    let gateway = Gateway::start(&remote_pump(broker_port, free_port(), &state, "1s")).await.expect("start");

    let told = cloud.wait_for("site/pump/rsp", WAIT, |a| a["id"] == "c-9").await;
    assert_eq!(told["status"], "failed", "{told}");
    assert!(told["error"].as_str().is_some_and(|e| e.starts_with("interrupted")), "{told}");
    // The cloud retries the same id: the same answer, and still nothing runs.
    let retried = cloud.command(&json!({"id": "c-9", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(retried, told);
    assert!(gateway.simulator("sim").expect("sim").writes().is_empty());
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_queued_while_the_broker_is_down_survives_a_restart_and_goes_first_in_order() {
    let (broker_port, state) = (free_port(), fresh_state_dir("queued"));
    // No broker yet: everything the first run produces stays queued.
    let gateway = Gateway::start(&remote_pump(broker_port, free_port(), &state, "100ms")).await.expect("start");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    gateway.shutdown().await;
    let restarted_at = now_ms();
    let queued = queued_messages(&state, "remote").await;
    assert!(queued >= 3, "telemetry was queued on disk: {queued}");

    let _broker = broker(broker_port);
    let mut cloud = Cloud::connect(broker_port, &["site/pump/telemetry"]).await;
    let gateway = Gateway::start(&remote_pump(broker_port, free_port(), &state, "100ms")).await.expect("restart");
    let mut times = Vec::new();
    loop {
        let doc = cloud.next_on("site/pump/telemetry", WAIT).await;
        let t = doc["time"].as_u64().expect("time");
        if t > restarted_at {
            break;
        }
        times.push(t);
    }
    assert_eq!(times.len(), queued, "every queued document, before any new one");
    assert!(times.windows(2).all(|w| w[0] < w[1]), "in order, each once: {times:?}");
    gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_stops_what_it_had_started() {
    let (mqtt_port, held) = (free_port(), std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let sim_port = held.local_addr().expect("addr").port();
    let state = fresh_state_dir("failed-start");
    let yaml = pump_config("").replace("{MQTT}", &mqtt_port.to_string()).replace("{MODBUS}", &sim_port.to_string())
        + &format!("state_dir: {}\n", state.display());
    let config = Config::parse(&yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}"));

    let e = Gateway::start(&config).await.expect_err("the simulator's port is taken");
    assert!(format!("{e:#}").contains("simulator"), "{e:#}");
    // The embedded broker it had started is gone, and so is its hold on the store.
    let _broker = broker(mqtt_port);
    Store::open(&state).expect("the store is free again");
}

/// Messages a stopped gateway left in its store for `connection`.
async fn queued_messages(state: &Path, connection: &str) -> usize {
    let store = Store::open(state).expect("store");
    let mut n = 0;
    store.outbox_scan(connection, |_, _| n += 1).expect("scan");
    store.close().await;
    n
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
