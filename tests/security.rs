//! Closed by default: the embedded broker lets a client reach only the
//! twins' topics, keeps the gateway's own client id for the gateway, and asks
//! for a login when users are configured.

mod support;

use std::time::Duration;

use serde_json::json;
use support::mqtt::{Mqtt, Options};
use support::{pump_config, start, Cloud};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reaches_only_the_twins_topics() {
    let h = start(&pump_config("")).await;
    // Allowed: the twin's answers and telemetry.
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp", "site/pump/telemetry"]).await;

    // A wiretap on everything is refused, as is another device's topic.
    let spy = Mqtt::connect(h.mqtt_port, Options::new("spy")).await.expect("connects");
    spy.subscribe(["#"]).await.expect("a SUBACK");
    spy.subscribe(["site/+/rsp"]).await.expect("a SUBACK");
    assert_eq!(spy.status().refused, 2, "both refused");

    // Publishing fake telemetry is refused: subscribers never see it.
    spy.publish("site/pump/telemetry", r#"{"online":true,"forged":true}"#).await.expect("sent");
    let answer = cloud.command(&json!({"id": "after-spy", "get": "*"})).await;
    assert_eq!(answer["status"], "succeeded");
    let mut forged = 0;
    while let Some(doc) = cloud.try_next_on("site/pump/telemetry", Duration::from_millis(300)).await {
        forged += usize::from(doc["forged"] == true);
    }
    assert_eq!(forged, 0, "the forged document was dropped by the broker");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_can_take_the_gateways_client_id_and_knock_it_off() {
    let yaml = pump_config("").replace("  local: { embedded: { listen: \"127.0.0.1:{MQTT}\" } }", "  local: { embedded: { listen: \"127.0.0.1:{MQTT}\" }, client_id: gw-main }");
    let h = start(&yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    let thief = Mqtt::connect(h.mqtt_port, Options::new("gw-main").wait(Duration::from_secs(2))).await;
    assert!(thief.is_err(), "refused at CONNACK");
    // The gateway still answers, every time (it was 0 of 12 before).
    for i in 0..12 {
        let answer = cloud.command(&json!({"id": format!("k-{i}"), "get": "*"})).await;
        assert_eq!(answer["status"], "succeeded", "{answer}");
    }
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_users_configured_a_client_needs_a_login() {
    let password = std::env::var("HOME").expect("HOME");
    let yaml = pump_config("").replace(
        "  local: { embedded: { listen: \"127.0.0.1:{MQTT}\" } }",
        "  local: { embedded: { listen: \"127.0.0.1:{MQTT}\", users: { cloud: { password: \"${HOME}\" } } } }",
    );
    let h = start(&yaml).await;
    let quick = |id: &str| Options::new(id).wait(Duration::from_secs(2));
    assert!(Mqtt::connect(h.mqtt_port, quick("anon")).await.is_err(), "anonymous refused");
    assert!(Mqtt::connect(h.mqtt_port, quick("wrong").login("cloud", "guess")).await.is_err(), "wrong password refused");
    let mut cloud = Mqtt::connect(h.mqtt_port, Options::new("ok").login("cloud", &password).subscribe(["site/pump/rsp"]).wait(WAIT)).await.expect("the right login works");
    cloud.publish("site/pump/cmd", json!({"id": "u-1", "get": "*"}).to_string()).await.expect("sent");
    let answer = cloud.next(WAIT).await.expect("an answer");
    assert_eq!(answer.json()["status"], "succeeded");
    h.gateway.shutdown().await;
}
