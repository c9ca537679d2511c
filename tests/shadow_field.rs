//! What an acceptance run (shadow service emulator, Mosquitto, pymodbus) and a
//! review found in the field, each end to end through the quota proxy: a
//! command whose ttl ran out while it was late, waited or was redelivered;
//! a refusal reason that outlived its refusal; a `get` that was never
//! answered; a shadow deleted and created again with a lower version.

mod support;

use std::time::Duration;

use serde_json::{json, Value as Json};
use support::shadow::ShadowService;
use support::site::{gateway, Site};
use support::{free_port, Cloud};
use twinbus::gateway::Gateway;
use twinbus::point::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A `relay-command` with this id and ttl (seconds) that publishes to `topic`.
fn relay(topic: &str, id: &str, ttl: u64) -> Json {
    json!({"relay-command": {"id": id, "message": "hello", "topic": topic, "ttl": ttl}})
}

/// Waits until command `id` is reported `FAILURE` for an expired ttl.
async fn expires(svc: &ShadowService, thing: &str, id: &str) {
    let doc = svc.wait_for_reported(thing, None, WAIT, |r| r["command"][id]["state"] == "FAILURE").await;
    let reason = doc["state"]["reported"]["command"][id]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("expired"), "{id}: {reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_stamped_600_s_ago_with_a_ttl_of_300_s_fails_as_expired() {
    let site = Site::new("ttl-late").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let topic = format!("cmd/{}/relay", free_port());
    let mut cloud = Cloud::connect(site.broker_port, &[&topic]).await;
    let (gw, _sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;

    // The delta itself comes late: written, and stamped, ten minutes ago.
    svc.set_clock_offset(-600);
    svc.set_desired("pump-1", None, json!({"command": [relay(&topic, "late", 300)]})).await;
    svc.set_clock_offset(0);

    expires(&svc, "pump-1", "late").await;
    assert!(cloud.try_next_on(&topic, Duration::from_millis(300)).await.is_none(), "not relayed");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_queued_behind_a_long_one_fails_as_expired_when_its_turn_comes() {
    let site = Site::new("ttl-queued").await;
    let svc = ShadowService::start(site.broker_port, &[("drive-1", None)]).await;
    let topic = format!("cmd/{}/relay", free_port());
    let mut cloud = Cloud::connect(site.broker_port, &[&topic]).await;
    let config = site.parse(
        r#"
profiles:
  drive:
    points:
      deviceAttrib.speed: { holding: 10, type: f32, min: 0, max: 80 }
    commands:
      hold: { steps: [ { wait: 4s } ] }
devices:
  drive-1: { bus: line, unit: 1, profile: drive, twin: { connection: aws, shadow: { thing: drive-1, running_interval: 10s } } }
simulators:
  sim: { listen: "127.0.0.1:{MODBUS}", serves: [drive-1] }
"#,
    );
    let gw = Gateway::start(&config).await.expect("start");
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["connected"] == true).await;

    svc.set_desired("drive-1", None, json!({"command": [{"hold": {"id": "h-1"}}]})).await;
    svc.wait_for_update("drive-1", None, WAIT, |u| u["state"]["reported"]["command"]["h-1"]["state"] == "RUNNING").await;
    // Two seconds to live, and four seconds of `hold` ahead of it.
    svc.set_desired("drive-1", None, json!({"command": [{"hold": {"id": "h-1"}}, relay(&topic, "behind", 2)]})).await;

    expires(&svc, "drive-1", "behind").await;
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["command"]["h-1"]["state"] == "SUCCESS").await;
    assert!(cloud.try_next_on(&topic, Duration::from_millis(300)).await.is_none(), "not relayed");
    gw.shutdown().await;
}

/// A persistent session (`clean_session: false`) keeps the delta at the
/// broker while the gateway is away, and hands it over at once on the next
/// connect, stamped when it was written: 12 s ago on the service's clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_by_a_persistent_session_after_its_ttl_fails_as_expired() {
    let site = Site::new("ttl-redelivered").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let topic = format!("cmd/{}/relay", free_port());
    let mut cloud = Cloud::connect(site.broker_port, &[&topic]).await;
    let body = format!(
        "{}devices:\n  pump-1: {{ bus: line, unit: 1, profile: pump, poll: 200ms, twin: {{ connection: aws, shadow: {{ thing: pump-1 }} }} }}\nsimulators:\n  sim: {{ listen: \"127.0.0.1:{{MODBUS}}\", serves: [pump-1] }}\n",
        support::PUMP_PROFILE
    );
    let config = site.parse_with(&site.connection("aws", "    clean_session: false\n"), &body);
    let gw = Gateway::start(&config).await.expect("start");
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    gw.shutdown().await;

    svc.set_desired("pump-1", None, json!({"command": [relay(&topic, "queued", 5)]})).await;
    svc.set_clock_offset(12);
    let gw = Gateway::start(&config).await.expect("restart");

    expires(&svc, "pump-1", "queued").await;
    assert!(cloud.try_next_on(&topic, Duration::from_millis(300)).await.is_none(), "not relayed");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reason_is_removed_once_desired_no_longer_asks_for_the_refused_value() {
    let site = Site::new("reasons").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    let explained = |r: &Json| r["twinbus"]["errors"]["deviceAttrib.motorStatus"].is_string();

    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "sideways"}})).await;
    svc.wait_for_reported("pump-1", None, WAIT, explained).await;
    // What the device holds already: the service sends no delta at all.
    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "off"}})).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| !explained(r)).await;

    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "sideways"}})).await;
    svc.wait_for_reported("pump-1", None, WAIT, explained).await;
    // Withdrawn: no delta either.
    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": null}})).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| !explained(r)).await;
    assert_eq!(sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("off".into())));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reason_withdrawn_while_the_gateway_was_down_is_removed_at_the_next_sync() {
    let site = Site::new("reasons-restart").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, _sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    let explained = |r: &Json| r["twinbus"]["errors"]["deviceAttrib.motorStatus"].is_string();
    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "sideways"}})).await;
    svc.wait_for_reported("pump-1", None, WAIT, explained).await;
    gw.shutdown().await;

    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "off"}})).await;
    let (gw, _sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true && !explained(r)).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_that_is_never_answered_is_asked_again() {
    let site = Site::new("lost-get").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"mode": "manual"}})).await;
    svc.drop_next_gets("pump-1", None, 1);
    let (gw, sim) = gateway(&site).await;

    svc.wait_for_reported("pump-1", None, Duration::from_secs(15), |r| r["deviceAttrib"]["mode"] == "manual").await;
    assert!(svc.gets_received("pump-1", None) >= 2);
    assert_eq!(sim.value(1, "deviceAttrib.mode"), Some(Value::Text("manual".into())));
    gw.shutdown().await;
}

/// AWS continues a deleted shadow's version for 48 hours only: a shadow
/// created again later starts at version 1, below what the gateway applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_created_again_with_a_lower_version_is_followed() {
    let site = Site::new("recreated").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    for mode in ["manual", "auto", "manual"] {
        svc.set_desired("pump-1", None, json!({"deviceAttrib": {"mode": mode}})).await;
        svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["mode"] == mode).await;
    }

    svc.delete_and_forget_version("pump-1", None).await;
    let created = svc.set_desired("pump-1", None, json!({"deviceAttrib": {"setpoint": 55}})).await;
    assert_eq!(created["version"], 1);

    svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["setpoint"] == 55.0).await;
    assert_eq!(sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(55.0)));
    gw.shutdown().await;
}

/// 240 points under one root, 9.7 KB of `reported` alone: one shadow
/// refused the whole report. Bound to shadows that each fit (what `twinbus
/// check` proposes for it), every value reaches the cloud.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_too_large_for_one_shadow_reports_every_value_through_several() {
    let site = Site::new("large").await;
    let names = [Some("data-1"), Some("data-2"), Some("data-3")];
    let svc = ShadowService::start(site.broker_port, &names.iter().map(|n| ("big", *n)).collect::<Vec<_>>()).await;
    let mut points = String::new();
    for i in 0..240 {
        points += &format!("      deviceData.p{i:03}: {{ input: {i}, type: u32, scale: 0.01 }}\n");
    }
    let config = site.parse(&format!(
        r#"
profiles:
  big:
    points:
{points}
devices:
  big:
    bus: line
    unit: 1
    profile: big
    twin:
      connection: aws
      shadows:
        - {{ thing: big, name: data-1, points: ["deviceData.p0*"] }}
        - {{ thing: big, name: data-2, points: ["deviceData.p1*"] }}
        - {{ thing: big, name: data-3, points: ["deviceData.p2*"] }}
simulators:
  sim: {{ listen: "127.0.0.1:{{MODBUS}}", serves: [big] }}
"#
    ));
    let gw = Gateway::start(&config).await.expect("start");
    let mut reported = 0;
    for name in names {
        let doc = svc.wait_for_reported("big", name, WAIT, |r| r["connected"] == true && r["deviceData"].as_object().is_some_and(|d| !d.is_empty())).await;
        let values = doc["state"]["reported"]["deviceData"].as_object().map_or(0, |d| d.len());
        assert!(doc["state"]["reported"].to_string().len() < 8 * 1024, "{name:?} fits");
        reported += values;
    }
    assert_eq!(reported, 240, "every point in one of the shadows");
    gw.shutdown().await;
}

/// Thirty shadows need 150 subscriptions; AWS allows 50 on a connection
/// (`twinbus check` refuses them on one, and proposes three): on three
/// connections with their own client ids, each shadow syncs and follows
/// its desired state, within every quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_shadows_on_three_connections_work_within_aws_quotas() {
    let site = Site::new("thirty").await;
    let things: Vec<String> = (1..=30).map(|i| format!("pump-{i:02}")).collect();
    let svc = ShadowService::start(site.broker_port, &things.iter().map(|t| (t.as_str(), None)).collect::<Vec<_>>()).await;
    let connections = ["aws", "aws-2", "aws-3"].iter().map(|c| site.connection(c, "")).collect::<String>();
    let devices: String = (1..=30)
        .map(|i| format!("  pump-{i:02}: {{ bus: line, unit: {i}, profile: pump, poll: 500ms, twin: {{ connection: {}, shadow: {{ thing: pump-{i:02} }} }} }}\n", ["aws", "aws-2", "aws-3"][(i - 1) / 10]))
        .collect();
    let served = things.join(", ");
    let config = site.parse_with(&connections, &format!("{}devices:\n{devices}simulators:\n  sim: {{ listen: \"127.0.0.1:{{MODBUS}}\", serves: [{served}] }}\n", support::PUMP_PROFILE));
    let gw = Gateway::start(&config).await.expect("start");
    for t in &things {
        svc.wait_for_reported(t, None, WAIT, |r| r["connected"] == true).await;
    }
    for t in &things {
        svc.set_desired(t, None, json!({"deviceAttrib": {"mode": "manual"}})).await;
    }
    for t in &things {
        svc.wait_for_reported(t, None, WAIT, |r| r["deviceAttrib"]["mode"] == "manual").await;
    }
    gw.shutdown().await;
}
