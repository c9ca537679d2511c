//! End to end through AWS IoT style device shadows: the shadow service
//! emulator (tests/support/shadow.rs) on a broker, the gateway's shadow
//! adapter, the simulator's registers.

mod support;

use std::time::Duration;

use serde_json::{json, Value as Json};
use support::free_port;
use support::shadow::ShadowService;
use support::site::{gateway, Site};
use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::point::{Table, Value};
use twinbus::sim::SimHandle;
use twinbus::store::{CommandState, Op, Store};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_value_is_written_and_reported_from_the_read_back() {
    let metrics = twinbus::http::metrics();
    let site = Site::new("write").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, sim) = gateway(&site).await;
    // The gateway creates the shadow (404 on get) with the device's values.
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true && r["deviceAttrib"]["motorStatus"] == "off").await;

    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "on"}})).await;

    let doc = svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["motorStatus"] == "on").await;
    assert!(doc["state"].get("delta").is_none(), "desired and reported agree: {doc}");
    assert_eq!(sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));
    assert_eq!(sim.writes().iter().filter(|w| w.table == Table::Coil).count(), 1);
    assert_eq!(doc["state"]["reported"]["online"], true);
    assert_eq!(doc["state"]["reported"]["deviceData"]["temperature"], 21.5, "readable points are reported too");
    let text = metrics.render();
    let applied = r#"twinbus_shadow_versions_total{shadow="$aws/things/pump-1/shadow",outcome="applied"}"#;
    assert!(support::metric(&text, applied).is_some_and(|n| n >= 1.0), "{text}");
    gw.shutdown().await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_desired_value_is_never_written_and_is_explained_in_reported() {
    let site = Site::new("refused").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;

    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"setpoint": 500, "mode": "manual"}})).await;

    let doc = svc.wait_for_reported("pump-1", None, WAIT, |r| r["twinbus"]["errors"]["deviceAttrib.setpoint"].is_string()).await;
    let reason = doc["state"]["reported"]["twinbus"]["errors"]["deviceAttrib.setpoint"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("maximum 80"), "{reason}");
    assert_eq!(doc["state"]["reported"]["deviceAttrib"]["mode"], "manual", "the valid key of the same delta is applied");
    assert_eq!(sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(40.0)), "the refused value was not written");
    assert!(sim.writes().iter().all(|w| w.address != 10), "{:?}", sim.writes());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_set_while_the_gateway_was_down_is_applied_after_it_returns_but_an_old_one_is_not() {
    let site = Site::new("restart").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, _sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    let first = svc.set_desired("pump-1", None, json!({"deviceAttrib": {"mode": "manual"}})).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["mode"] == "manual").await;
    gw.shutdown().await;

    // While it is down: the application changes its mind.
    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "on"}})).await;
    let (gw, sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["motorStatus"] == "on").await;
    assert_eq!(sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));

    // The first delta, redelivered after the restart, carries a version the
    // gateway has already acted upon (kept on disk): it is skipped.
    let old = first["version"].as_u64().expect("version");
    svc.publish("pump-1", None, "update/delta", &json!({"state": {"deviceAttrib": {"setpoint": 12}}, "version": old, "timestamp": 1})).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(40.0)), "stale delta ignored: {:?}", sim.writes());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_commands_run_once_and_expired_ones_fail() {
    let site = Site::new("commands").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let relay = free_port(); // a unique topic name
    let mut cloud = support::Cloud::connect(site.broker_port, &[&format!("cmd/{relay}/response")]).await;
    let (gw, _sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;

    let cmd = json!([{"relay-command": {"id": "r-1", "message": "hello", "topic": format!("cmd/{relay}/response"), "ttl": 300}}]);
    svc.set_desired("pump-1", None, json!({"command": cmd})).await;
    let relayed = cloud.next_on(&format!("cmd/{relay}/response"), WAIT).await;
    assert_eq!(relayed, json!({"msg": "hello", "deviceId": "pump-1"}));
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["command"]["r-1"]["state"] == "SUCCESS").await;

    // The same command again (a redelivery, or after a restart): not run again.
    gw.shutdown().await;
    let (gw, _sim) = gateway(&site).await;
    svc.set_desired("pump-1", None, json!({"command": cmd, "deviceAttrib": {"mode": "manual"}})).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["mode"] == "manual").await;
    assert!(cloud.try_next_on(&format!("cmd/{relay}/response"), Duration::from_millis(500)).await.is_none(), "executed once");

    // Written ten minutes ago, while the gateway was down, with a five-minute
    // ttl: the sync after it returns finds it expired. (Age is measured on
    // the shadow service's clock: metadata timestamp against the document's.)
    gw.shutdown().await;
    svc.set_clock_offset(-600);
    let old = json!([{"relay-command": {"id": "r-2", "message": "late", "topic": format!("cmd/{relay}/response"), "ttl": 300}}]);
    svc.set_desired("pump-1", None, json!({"command": old})).await;
    svc.set_clock_offset(0);
    let (gw, _sim) = gateway(&site).await;
    let doc = svc.wait_for_reported("pump-1", None, WAIT, |r| r["command"]["r-2"]["state"] == "FAILURE").await;
    assert!(doc["state"]["reported"]["command"]["r-2"]["reason"].as_str().unwrap_or_default().starts_with("expired"), "{doc}");
    assert!(cloud.try_next_on(&format!("cmd/{relay}/response"), Duration::from_millis(300)).await.is_none(), "an expired command is not relayed");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_cut_off_by_a_crash_is_reported_as_an_interrupted_failure_and_not_run_again() {
    let site = Site::new("interrupted").await;
    // What a crash in the middle of command `s-1` leaves in the store.
    {
        let store = Store::open(&site.state_dir).expect("store");
        let key = "aws|$aws/things/pump-1/shadow".to_string();
        let op = Op::ShadowCommand { shadow: key, id: "s-1".into(), at_ms: 1, state: CommandState::Started };
        store.apply(vec![op]).await.expect("write");
        store.close().await;
    }
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, _sim) = gateway(&site).await;
    let doc = svc.wait_for_reported("pump-1", None, WAIT, |r| r["command"]["s-1"]["state"] == "FAILURE").await;
    let reason = doc["state"]["reported"]["command"]["s-1"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("interrupted"), "{doc}");
    gw.shutdown().await;

    // Reported once: after another restart it is a finished command like any other.
    let before = svc.updates_from_device("pump-1", None).len();
    let (gw, _sim) = gateway(&site).await;
    let synced = svc
        .wait_until(WAIT, || {
            let updates = svc.updates_from_device("pump-1", None);
            updates.get(before..).is_some_and(|new| new.iter().any(|u| u["state"]["reported"]["connected"] == true)).then_some(())
        })
        .await;
    assert!(synced.is_some(), "the restarted gateway synced");
    let again: Vec<Json> = svc.updates_from_device("pump-1", None).split_off(before);
    assert!(again.iter().all(|u| u["state"]["reported"]["command"]["s-1"].is_null()), "not reported a second time: {again:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_conflict_on_a_report_is_recovered_by_fetching_the_shadow_again() {
    let site = Site::new("conflict").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    let (gw, _sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    let gets = svc.gets_received("pump-1", None);

    svc.fail_next_update("pump-1", None, 409);
    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"mode": "manual"}})).await;

    svc.wait_for_gets("pump-1", None, gets + 1, WAIT).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["mode"] == "manual").await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_shadow_works_beside_a_classic_one() {
    let site = Site::new("named").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None), ("line-3", Some("pump-2"))]).await;
    let extra = "  pump-2:\n    bus: line\n    unit: 2\n    profile: pump\n    poll: 200ms\n    twin: { connection: aws, shadow: { thing: line-3, name: pump-2 } }\n";
    let gw = Gateway::start(&site.config(extra)).await.expect("start");
    let sim = gw.simulator("sim").expect("sim").clone();
    svc.wait_for_reported("line-3", Some("pump-2"), WAIT, |r| r["connected"] == true).await;

    svc.set_desired("line-3", Some("pump-2"), json!({"deviceAttrib": {"motorStatus": "on"}})).await;

    svc.wait_for_reported("line-3", Some("pump-2"), WAIT, |r| r["deviceAttrib"]["motorStatus"] == "on").await;
    assert_eq!(sim.value(2, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));
    assert_eq!(sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("off".into())), "the classic shadow's device is untouched");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_command_reports_running_then_success_and_a_failed_check_is_a_failure() {
    let site = Site::new("named-command").await;
    let svc = ShadowService::start(site.broker_port, &[("drive-1", None)]).await;
    let config = site.parse(
        r#"
profiles:
  drive:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { "on": true, "off": false } }
      deviceAttrib.speed: { holding: 10, type: f32, min: 0, max: 80 }
      deviceData.running: { input: 1, access: read }
    commands:
      start:
        args: { speed: { type: number, min: 0, max: 50 } }
        steps:
          - set: { deviceAttrib.speed: $speed, deviceAttrib.motorStatus: "on" }
          - wait: 700ms
          - check: { deviceData.running: 1 }
      stop-and-expect-running:
        steps:
          - set: { deviceAttrib.motorStatus: "off" }
          - check: { deviceData.running: 1 }
devices:
  drive-1:
    bus: line
    unit: 1
    profile: drive
    twin: { connection: aws, shadow: { thing: drive-1, running_interval: 200ms } }
simulators:
  sim: { listen: "127.0.0.1:{MODBUS}", serves: [drive-1], mirror: { deviceData.running: deviceAttrib.motorStatus } }
"#,
    );
    let gw = Gateway::start(&config).await.expect("start");
    let sim = gw.simulator("sim").expect("sim").clone();
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["connected"] == true).await;

    svc.set_desired("drive-1", None, json!({"command": [{"start": {"id": "s-1", "speed": 30}}]})).await;
    svc.wait_for_update("drive-1", None, WAIT, |u| u["state"]["reported"]["command"]["s-1"]["state"] == "RUNNING").await;
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["command"]["s-1"]["state"] == "SUCCESS").await;
    assert_eq!(sim.value(1, "deviceAttrib.speed"), Some(Value::Float(30.0)));
    assert_eq!(sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));

    svc.set_desired("drive-1", None, json!({"command": [{"start": {"id": "s-2", "speed": 70}}]})).await;
    let doc = svc.wait_for_reported("drive-1", None, WAIT, |r| r["command"]["s-2"]["state"] == "FAILURE").await;
    let reason = doc["state"]["reported"]["command"]["s-2"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("speed") && reason.contains("50"), "argument range enforced: {reason}");
    assert_eq!(sim.value(1, "deviceAttrib.speed"), Some(Value::Float(30.0)), "nothing written for a refused argument");

    svc.set_desired("drive-1", None, json!({"command": [{"stop-and-expect-running": {"id": "s-3"}}]})).await;
    let doc = svc.wait_for_reported("drive-1", None, WAIT, |r| r["command"]["s-3"]["state"] == "FAILURE").await;
    let reason = doc["state"]["reported"]["command"]["s-3"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("check failed"), "{reason}");
    gw.shutdown().await;
}

/// A write-only point is never reported, so its delta never clears: it must
/// be applied once per desired write, not at every sync (a reset coil pulsed
/// at every reconnect would be a plant incident).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_that_persists_is_applied_once_not_at_every_sync() {
    let site = Site::new("persisting").await;
    let svc = ShadowService::start(site.broker_port, &[("panel-1", None)]).await;
    let config = site.parse(
        r#"
profiles:
  panel:
    points:
      deviceAttrib.reset: { coil: 5, access: write }
      deviceAttrib.mode: { holding: 12, values: { auto: 0, manual: 1 } }
devices:
  panel-1: { bus: line, unit: 1, profile: panel, poll: 200ms, twin: { connection: aws, shadow: { thing: panel-1 } } }
simulators:
  sim: { listen: "127.0.0.1:{MODBUS}", serves: [panel-1] }
"#,
    );
    let gw = Gateway::start(&config).await.expect("start");
    let sim = gw.simulator("sim").expect("sim").clone();
    svc.wait_for_reported("panel-1", None, WAIT, |r| r["connected"] == true).await;
    let resets = |sim: &SimHandle| sim.writes().iter().filter(|w| w.table == Table::Coil && w.address == 5).count();

    svc.set_desired("panel-1", None, json!({"deviceAttrib": {"reset": true}})).await;
    svc.wait_until(WAIT, || (resets(&sim) == 1).then_some(())).await.expect("the reset is written");
    // Another change, then a restart: both bring the persisting delta back.
    svc.set_desired("panel-1", None, json!({"deviceAttrib": {"mode": "manual"}})).await;
    svc.wait_for_reported("panel-1", None, WAIT, |r| r["deviceAttrib"]["mode"] == "manual").await;
    gw.shutdown().await;
    let gw = Gateway::start(&config).await.expect("restart");
    let sim = gw.simulator("sim").expect("sim").clone();
    svc.wait_for_reported("panel-1", None, WAIT, |r| r["connected"] == true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(resets(&sim), 0, "not pulsed again after the restart: {:?}", sim.writes());

    // Written again by the application: applied again. (Shadow metadata
    // timestamps are whole seconds: a rewrite within the same second as the
    // first write is taken for the same write.)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    svc.set_desired("panel-1", None, json!({"deviceAttrib": {"reset": true}})).await;
    svc.wait_until(WAIT, || (resets(&sim) == 1).then_some(())).await.expect("a new desired write is applied");
    gw.shutdown().await;
}

/// AWS metadata timestamps are whole seconds. An application that writes a
/// setpoint twice within one second (a slider) must still get the second
/// value applied: same timestamp, different value, a new write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_values_written_within_one_second_are_both_applied() {
    let site = Site::new("same-second").await;
    // A frozen clock: every metadata timestamp is the same second.
    let svc = ShadowService::start_with_clock(site.broker_port, &[("pump-1", None)], std::sync::Arc::new(|| 1_800_000_000)).await;
    let (gw, sim) = gateway(&site).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;

    for setpoint in [30, 50, 30] {
        svc.set_desired("pump-1", None, json!({"deviceAttrib": {"setpoint": setpoint}})).await;
        svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["setpoint"] == setpoint as f64).await;
        assert_eq!(sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(setpoint as f64)));
    }
    let setpoint_writes = sim.writes().iter().filter(|w| w.table == Table::HoldingRegister && w.address == 10).count();
    assert_eq!(setpoint_writes, 3, "{:?}", sim.writes());
    gw.shutdown().await;
}

/// A site with one drive, `drive-1`, on the classic shadow of thing
/// `drive-1`, whose profile has `commands` (YAML, indented for `commands:`).
fn drive_config(site: &Site, commands: &str, running_interval: &str) -> Config {
    site.parse(&format!(
        r#"
profiles:
  drive:
    points:
      deviceAttrib.speed: {{ holding: 10, type: f32, min: 0, max: 80 }}
    commands:
{commands}
devices:
  drive-1:
    bus: line
    unit: 1
    profile: drive
    twin: {{ connection: aws, shadow: {{ thing: drive-1, running_interval: {running_interval} }} }}
simulators:
  sim: {{ listen: "127.0.0.1:{{MODBUS}}", serves: [drive-1] }}
"#
    ))
}

/// While a long named command holds the shadow adapter, the application
/// keeps writing. Messages beyond the adapter's inbox are dropped by the
/// connection, so the adapter fetches the shadow again afterwards: the last
/// desired value is applied, not lost until the next reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deltas_that_arrive_while_a_long_command_runs_are_not_lost() {
    let site = Site::new("busy").await;
    let svc = ShadowService::start(site.broker_port, &[("drive-1", None)]).await;
    let config = drive_config(&site, "      hold: { steps: [ { wait: 6s } ] }", "10s");
    let gw = Gateway::start(&config).await.expect("start");
    let sim = gw.simulator("sim").expect("sim").clone();
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["connected"] == true).await;

    svc.set_desired("drive-1", None, json!({"command": [{"hold": {"id": "h-1"}}]})).await;
    svc.wait_for_update("drive-1", None, WAIT, |u| u["state"]["reported"]["command"]["h-1"]["state"] == "RUNNING").await;
    // Each write brings a delta and an update/accepted: more than the inbox (64) holds.
    for speed in 1..=40 {
        svc.set_desired("drive-1", None, json!({"deviceAttrib": {"speed": speed}})).await;
    }
    // (Panics unless the flood came while the command still ran.)
    svc.wait_for_reported("drive-1", None, Duration::ZERO, |r| r["command"]["h-1"]["state"] == "RUNNING").await;

    svc.wait_for_reported("drive-1", None, WAIT, |r| r["command"]["h-1"]["state"] == "SUCCESS").await;
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["deviceAttrib"]["speed"] == 40.0).await;
    assert_eq!(sim.value(1, "deviceAttrib.speed"), Some(Value::Float(40.0)));
    gw.shutdown().await;
}

/// AWS throttles (429) and sometimes fails (5xx). A refused get must not
/// leave a pending delta unapplied, nor a refused report leave the shadow
/// stale, until the next reconnect: both are asked again after a delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_get_or_report_is_asked_again() {
    let site = Site::new("throttled").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None)]).await;
    svc.set_desired("pump-1", None, json!({"deviceAttrib": {"mode": "manual"}})).await;
    svc.fail_next_get("pump-1", None, 503);
    let (gw, sim) = gateway(&site).await;

    svc.wait_for_gets("pump-1", None, 2, WAIT).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["deviceAttrib"]["mode"] == "manual").await;
    assert_eq!(sim.value(1, "deviceAttrib.mode"), Some(Value::Text("manual".into())));

    // The report of a command's outcome is throttled: a sync alone would not
    // bring it back (it reports device values), so it is sent again.
    svc.fail_next_update("pump-1", None, 429);
    let relay = free_port(); // a unique topic name
    let cmd = json!([{"relay-command": {"id": "t-1", "message": "hi", "topic": format!("cmd/{relay}/response")}}]);
    svc.set_desired("pump-1", None, json!({"command": cmd})).await;
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["command"]["t-1"]["state"] == "SUCCESS").await;
    let sent = svc.updates_from_device("pump-1", None).iter().filter(|u| u["state"]["reported"]["command"]["t-1"]["state"] == "SUCCESS").count();
    assert_eq!(sent, 2, "refused once, sent again: {:?}", svc.updates_from_device("pump-1", None));
    gw.shutdown().await;
}

/// A `RUNNING` report refused while the command still runs comes back
/// (the adapter reads it) only after `SUCCESS` was reported: sending it again
/// then would leave the command `RUNNING` in the shadow for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_report_is_not_sent_again_over_a_newer_one() {
    let site = Site::new("stale-retry").await;
    let svc = ShadowService::start(site.broker_port, &[("drive-1", None)]).await;
    let config = drive_config(&site, "      hold: { steps: [ { wait: 1s } ] }", "10s");
    let gw = Gateway::start(&config).await.expect("start");
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["connected"] == true).await;
    let gets = svc.gets_received("drive-1", None);

    svc.fail_next_update("drive-1", None, 429);
    svc.set_desired("drive-1", None, json!({"command": [{"hold": {"id": "h-1"}}]})).await;
    svc.wait_for_reported("drive-1", None, WAIT, |r| r["command"]["h-1"]["state"] == "SUCCESS").await;
    let refused = &svc.updates_from_device("drive-1", None)[..];
    assert!(refused.iter().any(|u| u["state"]["reported"]["command"]["h-1"]["state"] == "RUNNING"), "RUNNING was sent (and refused): {refused:?}");
    // The retry: a sync, after which the state must still be SUCCESS.
    svc.wait_for_gets("drive-1", None, gets + 1, WAIT).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let doc = svc.document("drive-1", None).unwrap_or_default();
    assert_eq!(doc["state"]["reported"]["command"]["h-1"]["state"], "SUCCESS", "{doc}");
    gw.shutdown().await;
}

/// Onboarding by reload: a device polled without a twin gets a shadow; the
/// adapter starts on the running connection, fetches the shadow and applies
/// what the cloud desired meanwhile, without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_added_by_a_reload_syncs_on_the_running_connection() {
    let site = Site::new("reload").await;
    let svc = ShadowService::start(site.broker_port, &[("pump-1", None), ("pump-2", None)]).await;
    let body = |twin: &str| {
        format!(
            "{}devices:\n  pump-1: {{ bus: line, unit: 1, profile: pump, poll: 200ms, twin: {{ connection: aws, shadow: {{ thing: pump-1 }} }} }}\n  pump-2: {{ bus: line, unit: 2, profile: pump, poll: 200ms{twin} }}\nsimulators:\n  sim: {{ listen: \"127.0.0.1:{{MODBUS}}\", serves: [pump-1, pump-2] }}\n",
            support::PUMP_PROFILE
        )
    };
    let mut gw = Gateway::start(&site.parse(&body(""))).await.expect("start");
    let sim = gw.simulator("sim").expect("sim").clone();
    svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    let mut link = gw.connection("aws").expect("aws").connected();
    link.borrow_and_update();
    svc.set_desired("pump-2", None, json!({"deviceAttrib": {"mode": "manual"}})).await;

    let done = gw.reload(site.parse(&body(", twin: { connection: aws, shadow: { thing: pump-2 } }"))).await.expect("reloadable");
    assert_eq!(done.plan.restart_devices, vec![("pump-2".to_string(), "twin".to_string())]);
    svc.wait_for_reported("pump-2", None, WAIT, |r| r["deviceAttrib"]["mode"] == "manual").await;
    assert_eq!(sim.value(2, "deviceAttrib.mode"), Some(Value::Text("manual".into())));
    assert!(!link.has_changed().unwrap_or(true), "no reconnect");
    gw.shutdown().await;
}
