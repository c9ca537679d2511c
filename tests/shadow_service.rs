//! The AWS IoT Device Shadow test double (tests/support/shadow.rs) against the
//! embedded broker, with a plain MQTT client playing the device.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value as Json};
use support::free_port;
use support::mqtt::{Message, Mqtt, Options};
use support::shadow::{reply_topics, topic_prefix, ShadowService, MAX_STATE_BYTES};
use twinbus::mqtt::{Access, EmbeddedBroker};

const WAIT: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(400);

/// A broker on a free port and the shadow service serving `shadows`.
async fn setup(shadows: &[(&str, Option<&str>)]) -> (EmbeddedBroker, u16, ShadowService) {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    let broker = EmbeddedBroker::start(addr, Access::anyone()).expect("embedded broker starts");
    let svc = ShadowService::start(port, shadows).await;
    (broker, port, svc)
}

/// A device-side MQTT client subscribed to every reply topic of one shadow. Keeps
/// messages it was not asked for yet, so nothing is lost between two waits.
struct Device {
    mqtt: Mqtt,
    prefix: String,
}

impl Device {
    async fn connect(port: u16, thing: &str, name: Option<&str>) -> Device {
        let options = Options::new(format!("device-{}", free_port())).max_packet(1024 * 1024).subscribe(reply_topics(thing, name)).wait(WAIT);
        let mqtt = Mqtt::connect(port, options).await.unwrap_or_else(|e| panic!("the device's client: {e}"));
        Device { mqtt, prefix: topic_prefix(thing, name) }
    }

    /// Publishes on `<prefix>/<op>`.
    async fn send(&self, op: &str, payload: impl Into<Vec<u8>>) {
        let topic = format!("{}/{op}", self.prefix);
        self.mqtt.publish(&topic, payload.into()).await.expect("publish");
    }

    /// The next message on `<prefix>/<suffix>`, others kept for later.
    async fn next(&mut self, suffix: &str) -> Json {
        self.try_next(suffix, WAIT).await.unwrap_or_else(|| panic!("nothing on {}/{suffix} within {WAIT:?}", self.prefix))
    }

    async fn try_next(&mut self, suffix: &str, wait: Duration) -> Option<Json> {
        let topic = format!("{}/{suffix}", self.prefix);
        self.mqtt.next_matching(wait, |m| m.topic == topic).await.map(|m| m.json())
    }

    /// Asserts nothing arrives on `<prefix>/<suffix>` for a little while.
    async fn assert_quiet(&mut self, suffix: &str) {
        if let Some(m) = self.try_next(suffix, QUIET).await {
            panic!("unexpected message on {}/{suffix}: {m}", self.prefix);
        }
    }

    /// Sends an update and returns the answer (accepted or rejected) with the topic
    /// suffix it came on. Adds a client token if the request has none, as SDKs do,
    /// to tell its answer from the echo of the cloud's own updates.
    async fn update(&mut self, request: &Json) -> (String, Json) {
        let mut request = request.clone();
        let token = match request.get("clientToken").and_then(Json::as_str) {
            Some(t) => t.to_string(),
            None => {
                let t = format!("dev-{}", free_port());
                request["clientToken"] = json!(t);
                t
            }
        };
        self.send("update", request.to_string()).await;
        self.answer("update", Some(&token)).await
    }

    async fn get(&mut self, payload: &str) -> (String, Json) {
        self.send("get", payload.to_string()).await;
        self.answer("get", None).await
    }

    /// The next `<op>/accepted` or `<op>/rejected`, with this client token if given.
    async fn answer(&mut self, op: &str, token: Option<&str>) -> (String, Json) {
        let accepted = format!("{}/{op}/accepted", self.prefix);
        let rejected = format!("{}/{op}/rejected", self.prefix);
        let matches = |m: &Message| {
            (m.topic == accepted || m.topic == rejected)
                && token.is_none_or(|tok| serde_json::from_slice::<Json>(&m.payload).is_ok_and(|v| v["clientToken"] == tok))
        };
        match self.mqtt.next_matching(WAIT, matches).await {
            Some(m) => (m.topic[self.prefix.len() + 1..].to_string(), m.json()),
            None => panic!("no answer to {op} on {} within {WAIT:?}", self.prefix),
        }
    }
}

fn is_epoch_seconds(v: &Json) -> bool {
    v.as_u64().is_some_and(|t| (1_600_000_000..4_000_000_000).contains(&t))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_set_by_the_cloud_reaches_the_device_as_a_delta_with_metadata() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;

    let accepted = svc.set_desired("pump-1", None, json!({"deviceAttrib": {"motorStatus": "on", "setpoint": 55}})).await;

    let delta = dev.next("update/delta").await;
    assert_eq!(delta["state"], json!({"deviceAttrib": {"motorStatus": "on", "setpoint": 55}}), "{delta}");
    assert!(is_epoch_seconds(&delta["metadata"]["deviceAttrib"]["motorStatus"]["timestamp"]), "{delta}");
    assert!(is_epoch_seconds(&delta["metadata"]["deviceAttrib"]["setpoint"]["timestamp"]), "{delta}");
    assert_eq!(delta["version"], 1);
    assert!(is_epoch_seconds(&delta["timestamp"]), "{delta}");
    // The device also sees what the cloud wrote, and the before/after documents.
    let seen = dev.next("update/accepted").await;
    assert_eq!(seen, accepted);
    assert_eq!(seen["state"]["desired"]["deviceAttrib"]["setpoint"], 55);
    assert!(is_epoch_seconds(&seen["metadata"]["desired"]["deviceAttrib"]["setpoint"]["timestamp"]), "{seen}");
    let docs = dev.next("update/documents").await;
    assert!(docs.get("previous").is_none(), "a new shadow has no previous document: {docs}");
    assert_eq!(docs["current"]["version"], 1);
    assert_eq!(docs["current"]["state"]["desired"]["deviceAttrib"]["motorStatus"], "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_matching_desired_publishes_no_delta_and_clears_the_delta_from_get() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    svc.set_desired("pump-1", None, json!({"motorStatus": "on", "mode": "auto"})).await;
    dev.next("update/delta").await;

    let (topic, _) = dev.get("").await;
    assert_eq!(topic, "get/accepted");
    let (topic, accepted) = dev.update(&json!({"state": {"reported": {"motorStatus": "on"}}})).await;
    assert_eq!(topic, "update/accepted", "{accepted}");
    dev.assert_quiet("update/delta").await;

    let (topic, doc) = dev.get("").await;
    assert_eq!(topic, "get/accepted");
    assert_eq!(doc["state"]["delta"], json!({"mode": "auto"}), "only what still differs: {doc}");
    assert_eq!(doc["state"]["reported"], json!({"motorStatus": "on"}));
    assert!(is_epoch_seconds(&doc["metadata"]["reported"]["motorStatus"]["timestamp"]), "{doc}");
    assert!(is_epoch_seconds(&doc["metadata"]["desired"]["mode"]["timestamp"]), "{doc}");

    dev.update(&json!({"state": {"reported": {"mode": "auto"}}})).await;
    let (_, doc) = dev.get("").await;
    assert!(doc["state"].get("delta").is_none(), "in sync, no delta: {doc}");
    assert_eq!(svc.document("pump-1", None).expect("exists")["state"], doc["state"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_update_increments_the_version_including_the_devices_reports() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;

    let (_, a) = dev.update(&json!({"state": {"reported": {"temperature": 21.5}}})).await;
    assert_eq!(a["version"], 1);
    svc.set_desired("pump-1", None, json!({"setpoint": 40})).await;
    let (_, a) = dev.update(&json!({"state": {"reported": {"setpoint": 40}}})).await;
    assert_eq!(a["version"], 3);
    // A report that changes nothing is still an accepted update.
    let (_, a) = dev.update(&json!({"state": {"reported": {"setpoint": 40}}})).await;
    assert_eq!(a["version"], 4);

    let (_, doc) = dev.get("").await;
    assert_eq!(doc["version"], 4);
    assert_eq!(svc.version("pump-1", None), Some(4));
    assert_eq!(svc.updates_from_device("pump-1", None).len(), 3, "the cloud's own update is not the device's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_token_is_echoed_on_accepted_and_rejected_answers() {
    let (_broker, port, _svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;

    let (topic, a) = dev.update(&json!({"state": {"desired": {"x": 1}}, "clientToken": "tok-1"})).await;
    assert_eq!(topic, "update/accepted");
    assert_eq!(a["clientToken"], "tok-1");
    assert!(is_epoch_seconds(&a["timestamp"]), "{a}");
    let delta = dev.next("update/delta").await;
    assert_eq!(delta["state"], json!({"x": 1}));
    let docs = dev.next("update/documents").await;
    assert_eq!(docs["clientToken"], "tok-1");

    let (topic, g) = dev.get(r#"{"clientToken":"tok-2"}"#).await;
    assert_eq!(topic, "get/accepted");
    assert_eq!(g["clientToken"], "tok-2");

    let (topic, r) = dev.update(&json!({"state": {"desired": {"x": 2}}, "version": 99, "clientToken": "tok-3"})).await;
    assert_eq!(topic, "update/rejected");
    assert_eq!(r["clientToken"], "tok-3");

    let long = "t".repeat(65);
    dev.send("update", json!({"state": {"desired": {"x": 2}}, "clientToken": long}).to_string()).await;
    let (topic, r) = dev.answer("update", None).await;
    assert_eq!(topic, "update/rejected", "a token over 64 bytes is invalid");
    assert_eq!((r["code"].clone(), r["message"].clone()), (json!(400), json!("Invalid clientToken")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_with_a_stale_version_is_rejected_with_409_and_changes_nothing() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    svc.set_desired("pump-1", None, json!({"setpoint": 40})).await;
    svc.set_desired("pump-1", None, json!({"setpoint": 50})).await;

    let (topic, r) = dev.update(&json!({"state": {"reported": {"setpoint": 40}}, "version": 1, "clientToken": "old"})).await;

    assert_eq!(topic, "update/rejected");
    assert_eq!(r["code"], 409);
    assert_eq!(r["message"], "Version conflict");
    assert!(is_epoch_seconds(&r["timestamp"]), "{r}");
    assert_eq!(r["clientToken"], "old");
    let doc = svc.document("pump-1", None).expect("exists");
    assert_eq!(doc["version"], 2);
    assert!(doc["state"].get("reported").is_none(), "nothing applied: {doc}");

    let (topic, a) = dev.update(&json!({"state": {"reported": {"setpoint": 50}}, "version": 2})).await;
    assert_eq!(topic, "update/accepted", "the current version is accepted: {a}");
    assert_eq!(a["version"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_a_missing_shadow_answers_404_until_an_update_creates_it() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;

    let (topic, r) = dev.get(r#"{"clientToken":"g"}"#).await;
    assert_eq!(topic, "get/rejected");
    assert_eq!(r["code"], 404);
    assert_eq!(r["message"], "No shadow exists with name: pump-1");
    assert_eq!(r["clientToken"], "g");
    assert!(svc.document("pump-1", None).is_none());

    let (topic, _) = dev.update(&json!({"state": {"reported": {"online": true}}})).await;
    assert_eq!(topic, "update/accepted");
    let (topic, doc) = dev.get("").await;
    assert_eq!(topic, "get/accepted");
    assert_eq!(doc["state"]["reported"]["online"], true);
    assert_eq!(doc["version"], 1);
    assert_eq!(svc.gets_received("pump-1", None), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_over_8_kb_is_rejected_with_413() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;

    let big = "x".repeat(MAX_STATE_BYTES);
    let (topic, r) = dev.update(&json!({"state": {"reported": {"log": big}}, "clientToken": "big"})).await;
    assert_eq!(topic, "update/rejected");
    assert_eq!(r["code"], 413);
    assert_eq!(r["message"], "The payload exceeds the maximum size allowed");
    assert_eq!(r["clientToken"], "big");
    assert!(svc.document("pump-1", None).is_none());

    // Two halves, each fine alone, are too much once merged.
    let half = "y".repeat(MAX_STATE_BYTES / 2);
    let (topic, _) = dev.update(&json!({"state": {"reported": {"a": half}}})).await;
    assert_eq!(topic, "update/accepted");
    let (topic, r) = dev.update(&json!({"state": {"reported": {"b": half}}})).await;
    assert_eq!(topic, "update/rejected");
    assert_eq!(r["code"], 413);
    assert_eq!(svc.version("pump-1", None), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_answered_with_400_and_the_service_keeps_serving() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;

    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "Invalid JSON"),
        (vec![0xff, 0xfe, 0x00], "Invalid JSON"),
        (b"[1,2,3]".to_vec(), "Invalid JSON"),
        (br#"{"clientToken":"t"}"#.to_vec(), "Missing required node: state"),
        (br#"{"state":7}"#.to_vec(), "State node must be an object"),
        (br#"{"state":{"desired":[1]}}"#.to_vec(), "Desired node must be an object"),
        (br#"{"state":{"reported":"on"}}"#.to_vec(), "Reported node must be an object"),
        (br#"{"state":{"delta":{"a":1}}}"#.to_vec(), "State contains an invalid node"),
        (br#"{"state":{"reported":{"a":1}},"version":"3"}"#.to_vec(), "Invalid version"),
        (br#"{"state":{"reported":{"a":{"b":{"c":{"d":{"e":{"f":{"g":1}}}}}}}}}"#.to_vec(), "JSON contains too many levels of nesting; maximum is 8"),
    ];
    for (payload, message) in &cases {
        dev.send("update", payload.clone()).await;
        let (topic, r) = dev.answer("update", None).await;
        assert_eq!(topic, "update/rejected", "{}", String::from_utf8_lossy(payload));
        assert_eq!(r["code"], 400, "{r}");
        assert_eq!(r["message"], *message, "{}", String::from_utf8_lossy(payload));
    }
    let (topic, r) = dev.get("{oops").await;
    assert_eq!((topic.as_str(), r["code"].clone()), ("get/rejected", json!(400)));
    // Every request was recorded, and the service still works.
    assert_eq!(svc.updates_from_device("pump-1", None).len(), cases.len());
    assert_eq!(svc.updates_from_device("pump-1", None)[0], json!("{not json"));
    let (topic, a) = dev.update(&json!({"state": {"reported": {"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}}}})).await;
    assert_eq!(topic, "update/accepted", "8 levels are allowed: {a}");
    assert_eq!(a["version"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_shadow_lives_beside_the_classic_one_without_mixing() {
    let (_broker, port, svc) = setup(&[("pump-1", None), ("pump-1", Some("config"))]).await;
    let mut classic = Device::connect(port, "pump-1", None).await;
    let mut named = Device::connect(port, "pump-1", Some("config")).await;

    svc.set_desired("pump-1", Some("config"), json!({"interval": 5})).await;
    let delta = named.next("update/delta").await;
    assert_eq!(delta["state"], json!({"interval": 5}));
    classic.assert_quiet("update/delta").await;
    let (topic, r) = classic.get("").await;
    assert_eq!((topic.as_str(), r["code"].clone()), ("get/rejected", json!(404)), "{r}");

    let (_, a) = classic.update(&json!({"state": {"reported": {"interval": 1}}})).await;
    assert_eq!(a["version"], 1, "versions are per shadow");
    let (topic, doc) = named.get("").await;
    assert_eq!(topic, "get/accepted");
    assert_eq!(doc["state"]["delta"], json!({"interval": 5}), "the classic report does not touch the named shadow");
    assert_eq!(doc["version"], 1);
    assert_eq!(svc.updates_from_device("pump-1", Some("config")).len(), 0);
    assert_eq!(svc.updates_from_device("pump-1", None).len(), 1);

    svc.delete("pump-1", Some("config")).await;
    let (topic, r) = named.get("").await;
    assert_eq!(topic, "get/rejected");
    assert_eq!(r["message"], "No shadow exists with name: config");
    assert!(svc.document("pump-1", None).is_some(), "the classic shadow stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_deletes_a_key_and_its_metadata() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    svc.set_desired("pump-1", None, json!({"a": 1, "b": {"c": 2, "d": 3}})).await;

    let (_, a) = dev.update(&json!({"state": {"desired": {"a": null, "b": {"c": null}}}})).await;
    assert_eq!(a["state"]["desired"]["a"], Json::Null, "accepted echoes the request: {a}");

    let doc = svc.document("pump-1", None).expect("exists");
    assert_eq!(doc["state"]["desired"], json!({"b": {"d": 3}}), "{doc}");
    assert_eq!(doc["metadata"]["desired"].as_object().map(|m| m.len()), Some(1), "{doc}");
    assert!(doc["metadata"]["desired"]["b"].get("c").is_none(), "{doc}");

    // Emptied objects go, and `desired: null` removes the whole section.
    dev.update(&json!({"state": {"desired": {"b": {"d": null}}}})).await;
    assert!(svc.document("pump-1", None).expect("exists")["state"]["desired"].is_null());
    svc.set_desired("pump-1", None, json!({"z": 1})).await;
    dev.update(&json!({"state": {"desired": null}})).await;
    let doc = svc.document("pump-1", None).expect("exists");
    assert!(doc["state"].get("desired").is_none() && doc["state"].get("delta").is_none(), "{doc}");
    assert_eq!(doc["version"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_objects_merge_and_the_delta_is_per_leaf_with_arrays_compared_whole() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    dev.update(&json!({"state": {"reported": {"color": {"r": 255, "g": 255, "b": 0}, "list": [1, 2, 3]}}})).await;

    svc.set_desired("pump-1", None, json!({"color": {"r": 10, "g": 255}, "list": [1, 2, 3], "engine": "ON"})).await;

    let delta = dev.next("update/delta").await;
    assert_eq!(delta["state"], json!({"color": {"r": 10}, "engine": "ON"}), "{delta}");
    assert!(is_epoch_seconds(&delta["metadata"]["color"]["r"]["timestamp"]), "{delta}");
    assert!(delta["metadata"]["color"].get("g").is_none(), "metadata only for the delta's keys: {delta}");
    let doc = svc.document("pump-1", None).expect("exists");
    assert_eq!(doc["state"]["reported"]["color"], json!({"r": 255, "g": 255, "b": 0}));
    assert!(doc["metadata"]["reported"]["list"].as_array().is_some_and(|a| a.len() == 3), "arrays: one entry per element: {doc}");

    // Reporting a partial array replaces it: the whole desired array is the delta.
    dev.update(&json!({"state": {"reported": {"list": [1, 2]}}})).await;
    let (_, doc) = dev.get("").await;
    assert_eq!(doc["state"]["delta"]["list"], json!([1, 2, 3]), "{doc}");
    // A nested report merges into the object instead of replacing it.
    assert_eq!(doc["state"]["reported"]["color"], json!({"r": 255, "g": 255, "b": 0}));
    dev.update(&json!({"state": {"reported": {"color": {"r": 10}}}})).await;
    assert_eq!(svc.document("pump-1", None).expect("exists")["state"]["reported"]["color"], json!({"r": 10, "g": 255, "b": 0}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delta_message_carries_only_what_the_update_changed_while_get_carries_all() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    svc.set_desired("pump-1", None, json!({"a": 1})).await;
    dev.next("update/delta").await;

    svc.set_desired("pump-1", None, json!({"b": 2})).await;
    let delta = dev.next("update/delta").await;
    assert_eq!(delta["state"], json!({"b": 2}));
    assert_eq!(delta["version"], 2);
    let (_, doc) = dev.get("").await;
    assert_eq!(doc["state"]["delta"], json!({"a": 1, "b": 2}));

    // Desiring what is already reported sends no delta at all.
    dev.update(&json!({"state": {"reported": {"c": 3}}})).await;
    svc.set_desired("pump-1", None, json!({"c": 3})).await;
    dev.assert_quiet("update/delta").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_the_shadow_and_a_recreated_one_continues_the_version() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    dev.update(&json!({"state": {"reported": {"a": 1}}})).await;
    dev.update(&json!({"state": {"reported": {"a": 2}}})).await;

    dev.send("delete", r#"{"clientToken":"d"}"#).await;
    let (topic, d) = dev.answer("delete", None).await;
    assert_eq!(topic, "delete/accepted");
    assert_eq!(d["version"], 2);
    assert_eq!(d["clientToken"], "d");
    assert!(is_epoch_seconds(&d["timestamp"]), "{d}");
    let (topic, _) = dev.get("").await;
    assert_eq!(topic, "get/rejected");
    dev.send("delete", "").await;
    let (topic, r) = dev.answer("delete", None).await;
    assert_eq!((topic.as_str(), r["code"].clone()), ("delete/rejected", json!(404)));

    let (_, a) = dev.update(&json!({"state": {"reported": {"a": 3}}})).await;
    assert_eq!(a["version"], 3, "the version follows the deleted shadow's");
    assert_eq!(svc.document("pump-1", None).expect("exists")["state"], json!({"reported": {"a": 3}}));
    assert_eq!(svc.deletes_received("pump-1", None), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_failure_rejects_the_next_update_once() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    svc.fail_next_update("pump-1", None, 409);

    let (topic, r) = dev.update(&json!({"state": {"reported": {"a": 1}}, "clientToken": "c1"})).await;
    assert_eq!(topic, "update/rejected");
    assert_eq!((r["code"].clone(), r["message"].clone(), r["clientToken"].clone()), (json!(409), json!("Version conflict"), json!("c1")));
    assert!(svc.document("pump-1", None).is_none());

    let (topic, a) = dev.update(&json!({"state": {"reported": {"a": 1}}})).await;
    assert_eq!(topic, "update/accepted", "{a}");
    assert_eq!(svc.updates_from_device("pump-1", None).len(), 2, "both requests are recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wait_helpers_see_what_the_device_reports() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let dev = Device::connect(port, "pump-1", None).await;

    let reporter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        dev.send("get", "").await;
        dev.send("update", json!({"state": {"reported": {"connected": true}}, "clientToken": "r1"}).to_string()).await;
        dev
    });

    let doc = svc.wait_for_reported("pump-1", None, WAIT, |r| r["connected"] == true).await;
    assert_eq!(doc["version"], 1);
    let req = svc.wait_for_update("pump-1", None, WAIT, |u| u["clientToken"] == "r1").await;
    assert_eq!(req["state"]["reported"]["connected"], true);
    svc.wait_for_gets("pump-1", None, 1, WAIT).await;
    reporter.await.expect("reporter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clock_offset_backdates_the_metadata_of_what_the_cloud_writes() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;

    svc.set_clock_offset(-600);
    svc.set_desired("pump-1", None, json!({"command": [{"id": "c-1", "ttl": 60}]})).await;
    svc.set_clock_offset(0);

    let delta = dev.next("update/delta").await;
    let written = delta["metadata"]["command"][0]["id"]["timestamp"].as_u64().expect("array metadata per element");
    assert!(svc.now() - written >= 600, "{delta}");
    let (_, doc) = dev.get("").await;
    assert!(doc["timestamp"].as_u64().expect("timestamp") >= written + 600, "{doc}");
}

/// A Mosquitto broker on `port`, killed on drop; `None` when it is not installed.
struct Mosquitto(std::process::Child);

impl Mosquitto {
    async fn start(port: u16) -> Option<Mosquitto> {
        let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto", "/usr/local/sbin/mosquitto"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let child = std::process::Command::new(bin)
            .args(["-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto starts");
        let m = Mosquitto(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(m);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("mosquitto does not listen on {port}");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CI runs the gateway against Mosquitto, which never matches `$` topics with
/// wildcards: the service must work there with its explicit subscriptions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_works_on_mosquitto_when_it_is_installed() {
    let port = free_port();
    let Some(_mosquitto) = Mosquitto::start(port).await else {
        eprintln!("mosquitto not installed: skipped");
        return;
    };

    let svc = ShadowService::start(port, &[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    svc.set_desired("pump-1", None, json!({"a": 1})).await;
    assert_eq!(dev.next("update/delta").await["state"], json!({"a": 1}));
    let (topic, a) = dev.update(&json!({"state": {"reported": {"a": 1}}})).await;
    assert_eq!((topic.as_str(), a["version"].clone()), ("update/accepted", json!(2)));
}

/// On Mosquitto, which rebinds its port at once after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_resubscribes_after_the_broker_restarts() {
    let port = free_port();
    let Some(mosquitto) = Mosquitto::start(port).await else {
        eprintln!("mosquitto not installed: skipped");
        return;
    };
    let svc = ShadowService::start(port, &[("pump-1", None)]).await;
    drop(mosquitto);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!svc.is_connected());
    // Desired written while nobody can hear it is kept, not queued for later.
    svc.set_desired("pump-1", None, json!({"a": 1})).await;
    let _mosquitto = Mosquitto::start(port).await.expect("mosquitto restarts");
    svc.wait_connected(WAIT).await;

    let mut dev = Device::connect(port, "pump-1", None).await;
    dev.assert_quiet("update/delta").await;
    let (topic, doc) = dev.get("").await;
    assert_eq!(topic, "get/accepted");
    assert_eq!(doc["state"]["delta"], json!({"a": 1}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_get_is_counted_but_never_answered() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    svc.set_reported("pump-1", None, json!({"a": 1})).await;
    svc.drop_next_gets("pump-1", None, 1);

    dev.send("get", r#"{"clientToken":"lost"}"#).await;
    dev.assert_quiet("get/accepted").await;
    let (topic, doc) = dev.get(r#"{"clientToken":"next"}"#).await;
    assert_eq!((topic.as_str(), doc["clientToken"].clone()), ("get/accepted", json!("next")), "only the first is lost");
    assert_eq!(svc.gets_received("pump-1", None), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_deleted_long_ago_starts_again_at_version_1() {
    let (_broker, port, svc) = setup(&[("pump-1", None)]).await;
    let mut dev = Device::connect(port, "pump-1", None).await;
    for a in 1..=3 {
        dev.update(&json!({"state": {"reported": {"a": a}}})).await;
    }
    svc.delete_and_forget_version("pump-1", None).await;
    let (topic, d) = dev.answer("delete", None).await;
    assert_eq!((topic.as_str(), d["version"].clone()), ("delete/accepted", json!(3)));
    let (_, a) = dev.update(&json!({"state": {"reported": {"a": 4}}})).await;
    assert_eq!(a["version"], 1, "the version does not follow the deleted shadow's");
}
