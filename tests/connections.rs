//! End to end on the cloud side: MQTT 5 request-response, presence, and the
//! outbox across a broker outage.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use serde_json::json;
use support::mqtt::{Mqtt, Options, PublishProperties};
use support::{free_port, pump_config, start, Cloud, PUMP_PROFILE};
use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::mqtt::{Access, EmbeddedBroker};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt5_command_is_answered_on_its_response_topic_with_its_correlation_data() {
    let h = start(&mqtt5_pump()).await;

    let options = Options::new("cloud-v5").mqtt5().keep_alive(Duration::from_secs(30)).subscribe(["app/replies/42"]).wait(WAIT);
    let mut cloud = Mqtt::connect(h.mqtt_port, options).await.expect("SUBACK");

    let props = PublishProperties {
        response_topic: Some("app/replies/42".into()),
        correlation_data: Some(Bytes::from_static(b"req-7")),
        user_properties: vec![("trace".into(), "abc".into())],
        ..Default::default()
    };
    let cmd = json!({"id": "v5", "get": ["deviceAttrib.motorStatus"]}).to_string();
    cloud.publish_with("site/pump/cmd", cmd, props).await.expect("publish");

    let answer = cloud.next(WAIT).await.expect("an answer");
    assert_eq!(answer.topic, "app/replies/42");
    let p = answer.properties.expect("properties on the answer");
    assert_eq!(p.correlation_data.as_deref(), Some(&b"req-7"[..]));
    assert!(p.user_properties.contains(&("trace".into(), "abc".into())), "{:?}", p.user_properties);
    let doc: serde_json::Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert_eq!((doc["status"].as_str(), doc["id"].as_str()), (Some("succeeded"), Some("v5")), "{doc}");
    h.gateway.shutdown().await;
}

/// The pump on MQTT 5, answering on `app/replies/...` response topics too.
fn mqtt5_pump() -> String {
    pump_config("      response_topics: [site/pump/rsp, \"app/replies/+\"]")
        .replace("  local: { embedded: { listen: \"127.0.0.1:{MQTT}\" } }", "  local: { embedded: { listen: \"127.0.0.1:{MQTT}\" }, mqtt_version: 5 }")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_topic_the_twin_does_not_allow_is_refused_and_nothing_runs() {
    let h = start(&mqtt5_pump()).await;
    let options = Options::new("cloud-v5-bad").mqtt5().keep_alive(Duration::from_secs(30)).subscribe(["site/pump/rsp"]).wait(WAIT);
    let mut cloud = Mqtt::connect(h.mqtt_port, options).await.expect("SUBACK");

    // Another device's command topic: the gateway must not publish there.
    let props = PublishProperties {
        response_topic: Some("site/boiler/cmd".into()),
        correlation_data: Some(Bytes::from_static(b"req-8")),
        ..Default::default()
    };
    let cmd = json!({"id": "evil", "set": {"deviceAttrib": {"motorStatus": "on"}}}).to_string();
    cloud.publish_with("site/pump/cmd", cmd, props).await.expect("publish");

    let answer = cloud.next(WAIT).await.expect("an answer");
    assert_eq!(answer.topic, "site/pump/rsp", "answered on the twin's own topic");
    assert_eq!(answer.properties.and_then(|p| p.correlation_data).as_deref(), Some(&b"req-8"[..]));
    let doc: serde_json::Value = serde_json::from_slice(&answer.payload).expect("JSON");
    assert_eq!(doc["status"], "rejected", "{doc}");
    assert!(doc["error"].as_str().is_some_and(|e| e.contains("site/boiler/cmd") && e.contains("response_topics")), "{doc}");
    assert!(h.sim.writes().is_empty(), "nothing written");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_says_online_after_connect_and_offline_after_a_graceful_stop() {
    let broker_port = free_port();
    let _broker = EmbeddedBroker::start(format!("127.0.0.1:{broker_port}").parse().expect("addr"), Access::anyone()).expect("broker");
    let mut cloud = Cloud::connect(broker_port, &["site/gw/status"]).await;
    let gateway = Gateway::start(&remote_config(broker_port, "presence: { topic: site/gw/status, online: up, offline: down }")).await.expect("start");

    let online = cloud.next_raw("site/gw/status", WAIT).await;
    assert_eq!(online, b"up");
    gateway.shutdown().await;
    let offline = cloud.next_raw("site/gw/status", WAIT).await;
    assert_eq!(offline, b"down");
}

/// A gateway on a broker it does not own, with one pump on its simulator.
fn remote_config(broker_port: u16, connection_extra: &str) -> Config {
    let modbus = free_port();
    let yaml = format!(
        r#"
connections:
  remote:
    url: mqtt://127.0.0.1:{broker_port}
    client_id: gw-{broker_port}
    reconnect: {{ min: 200ms, max: 1s }}
    {connection_extra}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 300ms }}
{PUMP_PROFILE}
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: 100ms
    twin: {{ connection: remote, telemetry: site/pump/telemetry, telemetry_interval: 200ms }}
simulators:
  sim: {{ listen: "127.0.0.1:{modbus}", serves: [pump] }}
"#
    );
    let yaml = yaml + &format!("state_dir: {}\n", support::fresh_state_dir(format!("remote-{broker_port}")).display());
    Config::parse(&yaml, Path::new("remote.yaml")).expect("valid")
}

/// The gateway talks to a broker it does not own; the broker goes away and
/// comes back on the same port. Telemetry produced during the outage is
/// delivered after it, each document once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_produced_while_the_broker_is_down_arrives_after_it_in_order() {
    let broker_port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{broker_port}").parse().expect("addr");
    let broker = EmbeddedBroker::start(addr, Access::anyone()).expect("broker");
    let gateway = Gateway::start(&remote_config(broker_port, "")).await.expect("start");
    let mut cloud = Cloud::connect(broker_port, &["site/pump/telemetry"]).await;
    let first = cloud.next_on("site/pump/telemetry", WAIT).await;
    assert_eq!(first["online"], true);

    broker.stop();
    let outage_started = now_ms();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let outage_ended = now_ms();
    let _broker = EmbeddedBroker::start(addr, Access::anyone()).expect("broker restarts on the same port");
    let mut cloud = Cloud::connect(broker_port, &["site/pump/telemetry"]).await;

    // Collect what arrives after the restart until a document newer than the outage shows up.
    let mut times = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        let doc = cloud.next_on("site/pump/telemetry", WAIT).await;
        let t = doc["time"].as_u64().expect("time");
        times.push(t);
        if t > outage_ended + 500 {
            break;
        }
    }
    let during: Vec<u64> = times.iter().copied().filter(|t| *t > outage_started && *t < outage_ended).collect();
    assert!(during.len() >= 4, "documents from the 1.5 s outage (one per 200 ms) were delivered: {times:?}");
    assert!(times.windows(2).all(|w| w[0] < w[1]), "in order, each once: {times:?}");
    gateway.shutdown().await;
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// OCI style: one connection per twin. A hundred of them in one process, each
/// with its own session, all answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_per_twin_connections_work_side_by_side() {
    let broker_port = free_port();
    let _broker = EmbeddedBroker::start(format!("127.0.0.1:{broker_port}").parse().expect("addr"), Access::anyone()).expect("broker");
    let modbus = free_port();
    let mut yaml = String::from("connections:\n");
    for n in 1..=100 {
        yaml += &format!("  twin-{n}: {{ url: \"mqtt://127.0.0.1:{broker_port}\", client_id: twin-{n} }}\n");
    }
    yaml += &format!("buses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 500ms }}\n{PUMP_PROFILE}\ndevices:\n");
    for n in 1..=100 {
        yaml += &format!(
            "  pump-{n}: {{ bus: line, unit: {n}, profile: pump, poll: 5s, twin: {{ connection: twin-{n}, commands: t/{n}/cmd, responses: t/{n}/rsp }} }}\n"
        );
    }
    let served: Vec<String> = (1..=100).map(|n| format!("pump-{n}")).collect();
    yaml += &format!("simulators:\n  sim: {{ listen: \"127.0.0.1:{modbus}\", serves: [{}] }}\n", served.join(", "));
    yaml += &format!("state_dir: {}\n", support::fresh_state_dir("hundred").display());
    let config = Config::parse(&yaml, Path::new("hundred.yaml")).expect("valid");
    let gateway = Gateway::start(&config).await.expect("start");

    let topics: Vec<String> = (1..=100).map(|n| format!("t/{n}/rsp")).collect();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut cloud = Cloud::connect(broker_port, &refs).await;
    for n in [1, 37, 100] {
        let cmd = json!({"id": format!("c{n}"), "set": {"deviceAttrib": {"motorStatus": "on"}}});
        // Retry until that twin's session is up (they connect in parallel).
        let mut answered = None;
        for _ in 0..50 {
            cloud.publish(&format!("t/{n}/cmd"), cmd.to_string()).await;
            answered = cloud.try_next_on(&format!("t/{n}/rsp"), Duration::from_millis(300)).await;
            if answered.is_some() {
                break;
            }
        }
        let doc = answered.unwrap_or_else(|| panic!("twin {n} never answered"));
        assert_eq!(doc["status"], "succeeded", "{doc}");
    }
    gateway.shutdown().await;
}
