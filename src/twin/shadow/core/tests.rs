//! The shadow adapter's decisions, message by message, with time passed in:
//! versions, ttl, retries, reasons and what may be coalesced.

use super::*;
use crate::config::Config;

const PREFIX: &str = "$aws/things/pump-1/shadow";
const T: u64 = 1_800_000_000;

fn config() -> Config {
    let yaml = r#"
connections: { aws: { url: "mqtt://127.0.0.1:1883", client_id: gw } }
buses: { line: { tcp: { host: 127.0.0.1 } } }
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint: { holding: 10, type: f32, min: 0, max: 80 }
      deviceData.temperature: { input: 0, type: i16, scale: 0.1 }
    commands:
      hold: { steps: [ { wait: 5s } ] }
devices:
  pump-1: { bus: line, unit: 1, profile: pump, twin: { connection: aws, response_topics: [relay/out], shadow: { thing: pump-1, running_interval: 1s } } }
"#;
    Config::parse(yaml, std::path::Path::new("core.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

fn setup() -> Setup {
    let c = config();
    let d = &c.devices[0];
    let binding = d.twin.as_ref().and_then(|t| t.shadows.first().cloned()).expect("a shadow");
    Setup {
        mine: binding.points.clone(),
        binding,
        key: format!("aws|{PREFIX}"),
        points: Arc::clone(&d.points),
        commands: d.commands.clone(),
        token_prefix: "tok".into(),
    }
}

/// A core whose session is up and whose first `get` is under way; returns
/// it, the time, and the get's token.
fn started(remembered: Remembered) -> (Core, Instant, String) {
    let mut core = Core::new(setup(), remembered);
    let t0 = Instant::now();
    let out = core.handle(Input::SessionUp, t0);
    let token = get_token(&out).expect("a get at every session");
    (core, t0, token)
}

fn message(suffix: &str, doc: Json) -> Input {
    Input::Message { suffix: suffix.to_string(), payload: doc.to_string().into_bytes() }
}

/// (topic, payload) of every publish.
fn published(out: &[Action]) -> Vec<(String, Json)> {
    out.iter()
        .filter_map(|a| match a {
            Action::Publish(p) => Some((p.topic.clone(), serde_json::from_slice(&p.payload).unwrap_or(Json::Null))),
            _ => None,
        })
        .collect()
}

fn get_token(out: &[Action]) -> Option<String> {
    published(out).into_iter().find(|(t, _)| t == &format!("{PREFIX}/get")).and_then(|(_, d)| d["clientToken"].as_str().map(str::to_string))
}

/// Every `state.reported` sent, merged in order.
fn reported(out: &[Action]) -> Json {
    let mut all = Map::new();
    for (t, d) in published(out) {
        if t == format!("{PREFIX}/update") {
            if let Json::Object(r) = d["state"]["reported"].clone() {
                merge(&mut all, r);
            }
        }
    }
    Json::Object(all)
}

fn records(out: &[Action]) -> Vec<Op> {
    let mut ops = Vec::new();
    for a in out {
        match a {
            Action::Record(r) => ops.extend(r.iter().cloned()),
            Action::Publish(p) => ops.extend(p.records.iter().cloned()),
            _ => {}
        }
    }
    ops
}

fn versions(out: &[Action]) -> Vec<u64> {
    records(out).into_iter().filter_map(|op| if let Op::ShadowVersion { version, .. } = op { Some(version) } else { None }).collect()
}

fn writes(out: &[Action]) -> Vec<Vec<usize>> {
    out.iter().filter_map(|a| if let Action::Write(w) = a { Some(w.iter().map(|(i, _)| *i).collect()) } else { None }).collect()
}

fn runs(out: &[Action]) -> Vec<String> {
    out.iter().filter_map(|a| if let Action::Run { id, .. } = a { Some(id.clone()) } else { None }).collect()
}

/// The get/accepted answer to `token`: version, delta, desired metadata at `ts`.
fn get_doc(token: &str, version: u64, delta: Json, ts: u64) -> Json {
    get_doc_written(token, version, delta, ts, ts)
}

/// The same, with the delta written at `written`.
fn get_doc_written(token: &str, version: u64, delta: Json, written: u64, ts: u64) -> Json {
    let mut meta = Map::new();
    stamp(&delta, &mut meta, written);
    json!({"state": {"delta": delta}, "metadata": {"desired": meta}, "version": version, "timestamp": ts, "clientToken": token})
}

fn delta_doc(version: u64, delta: Json, written: u64, ts: u64) -> Json {
    let mut meta = Map::new();
    stamp(&delta, &mut meta, written);
    json!({"state": delta, "metadata": meta, "version": version, "timestamp": ts})
}

/// Metadata as the service writes it: a timestamp per leaf, arrays per element.
fn stamp(v: &Json, meta: &mut Map<String, Json>, ts: u64) {
    if let Json::Object(m) = v {
        for (k, v) in m {
            meta.insert(k.clone(), leaf_meta(v, ts));
        }
    }
}

fn leaf_meta(v: &Json, ts: u64) -> Json {
    match v {
        Json::Object(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), leaf_meta(v, ts))).collect()),
        Json::Array(a) => Json::Array(a.iter().map(|v| leaf_meta(v, ts)).collect()),
        _ => json!({"timestamp": ts}),
    }
}

fn ok_outcome(values: Vec<(usize, Value)>) -> Input {
    Input::Written(Outcome { values, error: None })
}

fn relay(id: &str, ttl: u64) -> Json {
    json!({"relay-command": {"id": id, "message": "m", "topic": "relay/out", "ttl": ttl}})
}

/// Carries out a `Run` of a relay at once, as the shell does.
fn run_relay(core: &mut Core, id: &str, now: Instant) -> Vec<Action> {
    let mut out = core.handle(Input::Started { id: id.into() }, now);
    out.extend(core.handle(Input::Ran { id: id.into(), result: Ok(()) }, now));
    out
}

// ---------------------------------------------------------------------------
// Sync

#[test]
fn every_session_starts_with_a_get_whose_delta_is_written_and_reported_in_full() {
    let (mut core, t0, token) = started(Remembered::default());
    let out = core.handle(message("/get/accepted", get_doc(&token, 7, json!({"deviceAttrib": {"setpoint": 30}}), T)), t0);
    assert_eq!(writes(&out), vec![vec![1]]);
    let out = core.handle(ok_outcome(vec![(1, Value::Float(30.0))]), t0);
    let r = reported(&out);
    assert_eq!(r["deviceAttrib"]["setpoint"], 30.0, "the read-back");
    assert_eq!(r["connected"], true);
    assert_eq!(versions(&out), vec![7]);
    assert!(records(&out).iter().any(|op| matches!(op, Op::DesiredApplied { .. })));
}

#[test]
fn a_get_without_an_answer_is_asked_again_after_5_s_then_10_s() {
    let (mut core, t0, first) = started(Remembered::default());
    assert_eq!(core.deadline(), Some(t0 + GET_MIN));
    assert!(get_token(&core.handle(Input::Timer, t0 + Duration::from_secs(4))).is_none(), "not yet");
    let second = get_token(&core.handle(Input::Timer, t0 + GET_MIN)).expect("asked again");
    assert_ne!(first, second);
    assert_eq!(core.deadline(), Some(t0 + GET_MIN + GET_MIN * 2), "then after twice as long");
    // An answer to either get settles it and resets the wait.
    core.handle(message("/get/accepted", get_doc(&first, 1, json!({}), T)), t0 + Duration::from_secs(6));
    assert_eq!(core.deadline(), None);
}

#[test]
fn a_sync_asked_while_a_get_is_under_way_follows_its_answer() {
    let (mut core, t0, token) = started(Remembered::default());
    let out = core.handle(Input::Overflow, t0);
    assert!(get_token(&out).is_none(), "one get at a time");
    let out = core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    assert!(get_token(&out).is_some(), "the answer may predate what was dropped: asked again");
}

#[test]
fn a_missing_shadow_is_created_from_the_device_values() {
    let (mut core, t0, token) = started(Remembered::default());
    let snap = Snapshot { values: vec![Some(Value::Text("off".into())), Some(Value::Float(40.0)), Some(Value::Float(21.5))], errors: vec![None; 3], health: Health::Online, at: std::time::SystemTime::now(), seq: 1 };
    core.handle(Input::Snapshot(Arc::new(snap)), t0);
    let out = core.handle(message("/get/rejected", json!({"code": 404, "message": "No shadow exists", "clientToken": token})), t0);
    let r = reported(&out);
    assert_eq!((r["deviceAttrib"]["motorStatus"].clone(), r["deviceData"]["temperature"].clone(), r["connected"].clone()), (json!("off"), json!(21.5), json!(true)));
}

// ---------------------------------------------------------------------------
// Versions

#[test]
fn a_delta_already_applied_is_skipped_and_one_below_it_fetches_the_shadow() {
    let (mut core, t0, token) = started(Remembered { version: Some(10), ..Remembered::default() });
    core.handle(message("/get/accepted", get_doc(&token, 12, json!({}), T)), t0);
    let same = core.handle(message("/update/delta", delta_doc(12, json!({"deviceAttrib": {"setpoint": 5}}), T, T)), t0);
    assert!(writes(&same).is_empty() && get_token(&same).is_none(), "a duplicate: nothing to do");
    let lower = core.handle(message("/update/delta", delta_doc(3, json!({"deviceAttrib": {"setpoint": 5}}), T, T)), t0);
    assert!(writes(&lower).is_empty(), "not applied on its own word");
    assert!(get_token(&lower).is_some(), "but the shadow is fetched: it may have been made again");
}

#[test]
fn a_get_with_a_lower_version_starts_afresh_and_applies_what_it_holds() {
    let done = Applied { timestamp: T, value: "30".into() };
    let remembered = Remembered { version: Some(40), desired: [("deviceAttrib.setpoint".to_string(), done)].into_iter().collect(), commands: Vec::new() };
    let (mut core, t0, token) = started(remembered);
    // Made again: version 2, and (by chance) the same value at the same second.
    let out = core.handle(message("/get/accepted", get_doc(&token, 2, json!({"deviceAttrib": {"setpoint": 30}}), T)), t0);
    assert!(records(&out).iter().any(|op| matches!(op, Op::ShadowReset { .. })), "forgets what was applied");
    assert_eq!(writes(&out), vec![vec![1]], "so the value is applied to the new shadow");
    let out = core.handle(ok_outcome(vec![(1, Value::Float(30.0))]), t0);
    assert_eq!(versions(&out), vec![2]);
    let later = core.handle(message("/update/delta", delta_doc(3, json!({"deviceAttrib": {"setpoint": 31}}), T + 1, T + 1)), t0);
    assert_eq!(writes(&later), vec![vec![1]], "and its deltas are followed");
}

#[test]
fn the_version_is_remembered_only_once_every_value_was_applied_or_explained() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    core.handle(message("/update/delta", delta_doc(2, json!({"deviceAttrib": {"setpoint": 30}}), T, T)), t0);
    let failed = core.handle(Input::Written(Outcome { values: vec![], error: Some("no answer from the device within 300ms".into()) }), t0);
    assert!(versions(&failed).is_empty(), "a failed write is neither applied nor explained for good");
    assert!(reported(&failed)["twinbus"]["errors"]["deviceAttrib.setpoint"].as_str().is_some_and(|r| r.starts_with("failed")));
    // A later delta for something else does not hide the pending value.
    core.handle(message("/update/delta", delta_doc(3, json!({"deviceAttrib": {"setpoint": 999}}), T, T)), t0);
    assert!(versions(&core.handle(Input::Timer, t0)).is_empty(), "refused, yet version 3 is not remembered over the pending value");
    // The device is back: the sync applies the pending value and settles it.
    let out = core.handle(Input::Overflow, t0);
    let token = get_token(&out).expect("a sync");
    let out = core.handle(message("/get/accepted", get_doc(&token, 4, json!({"deviceAttrib": {"setpoint": 30}}), T)), t0);
    assert_eq!(writes(&out), vec![vec![1]]);
    let out = core.handle(ok_outcome(vec![(1, Value::Float(30.0))]), t0);
    assert_eq!(versions(&out), vec![4]);
}

#[test]
fn a_desired_value_is_applied_once_per_metadata_timestamp_and_value() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    assert_eq!(writes(&core.handle(message("/update/delta", delta_doc(2, json!({"deviceAttrib": {"setpoint": 30}}), T, T)), t0)), vec![vec![1]]);
    core.handle(ok_outcome(vec![(1, Value::Float(29.5))]), t0);
    // The device clamped it: the delta persists, and comes back with the next sync.
    assert!(writes(&core.handle(message("/update/delta", delta_doc(3, json!({"deviceAttrib": {"setpoint": 30}}), T, T)), t0)).is_empty());
    assert_eq!(writes(&core.handle(message("/update/delta", delta_doc(4, json!({"deviceAttrib": {"setpoint": 50}}), T, T)), t0)), vec![vec![1]], "another value in the same second is a new write");
}

// ---------------------------------------------------------------------------
// ttl on the service's clock

#[test]
fn a_command_with_a_ttl_waits_for_the_service_clock_and_never_trusts_a_delta_alone() {
    let (mut core, t0, token) = started(Remembered::default());
    // Redelivered by a persistent session: written, and stamped, 12 s ago.
    let redelivered = core.handle(message("/update/delta", delta_doc(5, json!({"command": [relay("r-1", 5)]}), T - 12, T - 12)), t0);
    assert!(runs(&redelivered).is_empty(), "the delta's own time may be old");
    let out = core.handle(message("/get/accepted", get_doc_written(&token, 5, json!({"command": [relay("r-1", 5)]}), T - 12, T)), t0);
    assert!(runs(&out).is_empty());
    let r = reported(&out);
    assert_eq!(r["command"]["r-1"]["state"], "FAILURE");
    assert!(r["command"]["r-1"]["reason"].as_str().is_some_and(|s| s.starts_with("expired: written 12s ago")), "{r}");
}

#[test]
fn a_late_delta_is_judged_by_the_service_clock_not_by_its_own_timestamp() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let now = t0 + Duration::from_secs(1);
    let out = core.handle(message("/update/delta", delta_doc(2, json!({"command": [relay("old", 300)]}), T - 600, T - 600)), now);
    assert!(runs(&out).is_empty());
    assert!(reported(&out)["command"]["old"]["reason"].as_str().is_some_and(|s| s.starts_with("expired: written 601s ago")));
    let fresh = core.handle(message("/update/delta", delta_doc(3, json!({"command": [relay("new", 300)]}), T + 1, T + 1)), now);
    assert_eq!(runs(&fresh), vec!["new"]);
}

#[test]
fn a_command_is_judged_when_its_turn_comes_not_when_it_arrives() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let out = core.handle(message("/update/delta", delta_doc(2, json!({"command": [{"hold": {"id": "h-1"}}]}), T, T)), t0);
    assert_eq!(runs(&out), vec!["h-1"]);
    let running = core.handle(Input::Started { id: "h-1".into() }, t0);
    assert_eq!(reported(&running)["command"]["h-1"]["state"], "RUNNING", "at once");
    // Written while hold runs, with 2 s to live.
    let queued = core.handle(message("/update/delta", delta_doc(3, json!({"command": [relay("r-2", 2)]}), T, T)), t0 + Duration::from_millis(500));
    assert!(runs(&queued).is_empty(), "waits its turn");
    assert_eq!(reported(&core.handle(Input::Timer, t0 + Duration::from_secs(1)))["command"]["h-1"]["state"], "RUNNING", "and every interval");
    let out = core.handle(Input::Ran { id: "h-1".into(), result: Ok(()) }, t0 + Duration::from_secs(5));
    let r = reported(&out);
    assert_eq!(r["command"]["h-1"]["state"], "SUCCESS");
    assert_eq!(r["command"]["r-2"]["state"], "FAILURE");
    assert!(runs(&out).is_empty(), "expired when its turn came");
}

#[test]
fn a_command_runs_once_even_when_it_comes_back_and_a_crashed_one_is_reported_interrupted() {
    let remembered = Remembered { commands: vec![("done".into(), CommandState::Done), ("cut".into(), CommandState::Started)], ..Remembered::default() };
    let (mut core, t0, token) = started(remembered);
    let out = core.handle(message("/get/accepted", get_doc(&token, 1, json!({"command": [relay("done", 300), relay("cut", 300)]}), T)), t0);
    assert!(runs(&out).is_empty(), "neither runs again");
    let r = reported(&out);
    assert!(r["command"]["cut"]["reason"].as_str().is_some_and(|s| s.starts_with("interrupted")), "{r}");
    assert!(r["command"].get("done").is_none());
    assert!(records(&out).iter().any(|op| matches!(op, Op::ShadowCommand { id, state: CommandState::Done, .. } if id == "cut")), "recorded with its report");
}

#[test]
fn a_command_that_cannot_be_recorded_does_not_run_and_its_version_is_not_remembered() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let out = core.handle(message("/update/delta", delta_doc(2, json!({"command": [relay("r", 300)]}), T, T)), t0);
    assert_eq!(runs(&out), vec!["r"]);
    let out = core.handle(Input::NotRun { id: "r".into(), error: "disk full".into() }, t0);
    assert!(versions(&out).is_empty() && reported(&out).get("command").is_none());
}

// ---------------------------------------------------------------------------
// Reasons

#[test]
fn a_reason_is_removed_at_the_next_sync_once_the_delta_no_longer_holds_its_path() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let out = core.handle(message("/update/delta", delta_doc(2, json!({"deviceAttrib": {"motorStatus": "sideways"}}), T, T)), t0);
    assert!(reported(&out)["twinbus"]["errors"]["deviceAttrib.motorStatus"].is_string());
    // Desired becomes what the device holds: no delta, only the update's echo.
    let echo = json!({"state": {"desired": {"deviceAttrib": {"motorStatus": "off"}}}, "version": 3, "timestamp": T + 1});
    let out = core.handle(message("/update/accepted", echo), t0);
    let token = get_token(&out).expect("a path with a reason changed: sync");
    let out = core.handle(message("/get/accepted", get_doc(&token, 3, json!({}), T + 1)), t0);
    assert_eq!(reported(&out)["twinbus"]["errors"], json!({"deviceAttrib.motorStatus": null}));
}

#[test]
fn reasons_left_by_an_earlier_run_are_removed_at_the_first_sync() {
    let (mut core, t0, token) = started(Remembered::default());
    let mut doc = get_doc(&token, 9, json!({"deviceAttrib": {"setpoint": 500}}), T);
    doc["state"]["reported"] = json!({"twinbus": {"errors": {"deviceAttrib.motorStatus": "unknown value \"sideways\"", "deviceAttrib.setpoint": "500 is above the maximum 80"}}});
    let out = core.handle(message("/get/accepted", doc), t0);
    assert_eq!(reported(&out)["twinbus"]["errors"]["deviceAttrib.motorStatus"], Json::Null, "desired no longer asks for it");
    assert!(reported(&out)["twinbus"]["errors"]["deviceAttrib.setpoint"].is_string(), "still refused: still explained");
}

#[test]
fn an_update_that_does_not_touch_an_explained_path_does_not_sync() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({"deviceAttrib": {"motorStatus": "sideways"}}), T)), t0);
    let other = json!({"state": {"desired": {"deviceAttrib": {"setpoint": 10}}}, "version": 2, "timestamp": T});
    assert!(get_token(&core.handle(message("/update/accepted", other), t0)).is_none());
    let withdrawn = json!({"state": {"desired": {"deviceAttrib": null}}, "version": 3, "timestamp": T});
    assert!(get_token(&core.handle(message("/update/accepted", withdrawn), t0)).is_some(), "a parent withdrawn with null touches it");
}

// ---------------------------------------------------------------------------
// Retries

#[test]
fn a_throttled_report_is_sent_again_without_what_a_later_report_replaced() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let out = core.handle(message("/update/delta", delta_doc(2, json!({"command": [{"hold": {"id": "h"}}]}), T, T)), t0);
    assert_eq!(runs(&out), vec!["h"]);
    let running = core.handle(Input::Started { id: "h".into() }, t0);
    let (_, doc) = published(&running).into_iter().find(|(t, _)| t.ends_with("/update")).expect("RUNNING report");
    let refused_token = doc["clientToken"].as_str().unwrap_or_default().to_string();
    core.handle(Input::Ran { id: "h".into(), result: Ok(()) }, t0);
    // The RUNNING report's refusal comes back after SUCCESS was sent.
    core.handle(message("/update/rejected", json!({"code": 429, "message": "Too Many Requests", "clientToken": refused_token})), t0);
    let at = core.deadline().expect("a retry");
    assert_eq!(at, t0 + RETRY_MIN);
    let out = core.handle(Input::Timer, at);
    assert!(get_token(&out).is_some(), "fetches the shadow again");
    assert!(reported(&out).get("command").is_none(), "the old RUNNING is not sent over the SUCCESS");
}

#[test]
fn a_version_conflict_fetches_the_shadow_and_other_refusals_are_only_logged() {
    let (mut core, t0, token) = started(Remembered::default());
    let out = core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let (_, report) = published(&out).into_iter().find(|(t, _)| t.ends_with("/update")).expect("full report");
    let ours = report["clientToken"].as_str().unwrap_or_default().to_string();
    let out = core.handle(message("/update/rejected", json!({"code": 409, "clientToken": ours})), t0);
    assert!(get_token(&out).is_some());
    let out = core.handle(message("/update/rejected", json!({"code": 400, "clientToken": ours})), t0);
    assert!(out.is_empty());
    assert!(core.handle(message("/update/rejected", json!({"code": 409, "clientToken": "someone-else"})), t0).is_empty(), "not ours");
}

// ---------------------------------------------------------------------------
// Quotas: what may be coalesced, and waiting room

#[test]
fn a_report_of_values_may_join_a_waiting_one_but_a_command_state_or_a_reason_never_does() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let snap = |t: f64| Snapshot { values: vec![Some(Value::Text("off".into())), Some(Value::Float(40.0)), Some(Value::Float(t))], errors: vec![None; 3], health: Health::Online, at: std::time::SystemTime::now(), seq: 1 };
    let out = core.handle(Input::Snapshot(Arc::new(snap(21.0))), t0);
    let coalescable = |out: &[Action]| out.iter().filter_map(|a| if let Action::Publish(p) = a { Some(p.coalesce.is_some()) } else { None }).collect::<Vec<_>>();
    assert_eq!(coalescable(&out), vec![true]);
    let out = core.handle(message("/update/delta", delta_doc(2, json!({"command": [relay("r", 300)]}), T, T)), t0);
    let out2 = run_relay(&mut core, "r", t0);
    assert!(coalescable(&out).is_empty());
    assert_eq!(coalescable(&out2), vec![false], "the report with the command's state");
    let out = core.handle(message("/update/delta", delta_doc(3, json!({"deviceAttrib": {"motorStatus": "sideways"}}), T, T)), t0);
    assert_eq!(coalescable(&out), vec![false], "a reason");
}

#[test]
fn deltas_beyond_what_can_wait_behind_a_command_are_fetched_again_once_it_ends() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    core.handle(message("/update/delta", delta_doc(2, json!({"command": [{"hold": {"id": "h"}}]}), T, T)), t0);
    core.handle(Input::Started { id: "h".into() }, t0);
    for v in 3..(3 + MAX_JOBS as u64 + 5) {
        let out = core.handle(message("/update/delta", delta_doc(v, json!({"deviceAttrib": {"setpoint": v}}), T, T)), t0);
        assert!(get_token(&out).is_none(), "not while the command runs");
    }
    let out = core.handle(Input::Ran { id: "h".into(), result: Ok(()) }, t0);
    assert_eq!(writes(&out).len(), 1, "the first waiting delta");
    let mut out = out;
    for _ in 0..MAX_JOBS {
        out = core.handle(ok_outcome(vec![]), t0);
        if get_token(&out).is_some() {
            break;
        }
    }
    assert!(get_token(&out).is_some(), "then the shadow, for the deltas that had no room");
}

#[test]
fn a_report_over_8_kb_is_not_sent_nor_split() {
    let (mut core, t0, _) = started(Remembered::default());
    let mut out = Vec::new();
    core.report(json!({"deviceData": {"log": "x".repeat(MAX_DOCUMENT)}}), &mut out);
    assert!(published(&out).is_empty());
    let _ = t0;
}

#[test]
fn a_relay_command_to_a_topic_the_twin_does_not_allow_fails_and_publishes_nothing() {
    let (mut core, t0, token) = started(Remembered::default());
    core.handle(message("/get/accepted", get_doc(&token, 1, json!({}), T)), t0);
    let cmd = json!({"relay-command": {"id": "evil", "message": "m", "topic": "site/boiler/cmd"}});
    let out = core.handle(message("/update/delta", delta_doc(2, json!({"command": [cmd]}), T, T)), t0);
    assert!(runs(&out).is_empty(), "not run");
    assert!(!published(&out).iter().any(|(t, _)| t == "site/boiler/cmd"), "nothing relayed");
    let r = reported(&out);
    let reason = r["command"]["evil"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("site/boiler/cmd") && reason.contains("response_topics"), "{r}");
}
