//! A test double of the AWS IoT Device Shadow service, over MQTT, on any broker.
//!
//! It plays the cloud side of classic and named shadows on the reserved topics
//! `$aws/things/<thing>/shadow[/name/<shadow>]/{get,update,delete}` and answers on
//! `.../accepted|rejected`, `.../update/delta` and `.../update/documents`, following
//! the AWS IoT Core developer guide ("Device Shadow MQTT topics", "Device Shadow
//! service documents", "Interacting with shadows", "Device Shadow error messages",
//! "Diagnosing problems with shadows"):
//!
//! - an update merges `state.desired` / `state.reported` into the shadow (nested
//!   objects merge, `null` deletes a key, `"desired": null` deletes the section,
//!   arrays and scalars replace), stamps `metadata` with epoch seconds for every leaf
//!   written, and increments `version` on every accepted update;
//! - `update/accepted` echoes the request state with its metadata, the new version,
//!   a `timestamp` and the `clientToken`; `update/documents` carries `previous` and
//!   `current`; `update/delta` is published when the request's `desired` still differs
//!   from `reported`, and carries only those attributes of the request (the full delta
//!   is in `get/accepted`'s `state.delta`). Delta is computed per leaf; arrays compare
//!   as a whole;
//! - rejections carry `code`, `message`, `timestamp` and the `clientToken`: 400 (bad
//!   JSON or shape, client token over 64 bytes, nesting deeper than [`MAX_DEPTH`]), 404
//!   (no such shadow), 409 (`version` given and not the current one), 413 (desired +
//!   reported over 8 KB after the merge, or a request state over 8 KB);
//! - a deleted shadow answers 404; recreated, its version follows the deleted one.
//!
//! Subscriptions are explicit topics, never `#`: Mosquitto does not match topics
//! starting with `$` against wildcard filters. Only the request topics are subscribed,
//! so the service never hears its own answers.
//!
//! Simplified: no things registry (any configured thing exists), no 48 h limit on
//! version continuity after a delete (a test asks for one with
//! [`ShadowService::delete_and_forget_version`]), no 429 throttling unless
//! injected, no persistent sessions.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value as Json};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::mqtt::{Mqtt, Options};

/// Desired + reported state, serialized compactly, may not exceed this (metadata does
/// not count).
pub const MAX_STATE_BYTES: usize = 8 * 1024;
/// The AWS IoT message broker's largest message.
pub const MAX_MESSAGE_BYTES: usize = 128 * 1024;
/// Levels of nesting counted from `state`: a leaf at `state.desired.a.b.c.d.e.f` (8
/// names) is the deepest accepted. AWS quotas say 8; its error text once said 6.
pub const MAX_DEPTH: usize = 8;
/// A longer `clientToken` is rejected with 400.
pub const MAX_CLIENT_TOKEN_BYTES: usize = 64;
/// How long helpers wait for the broker when not told otherwise.
const BROKER_WAIT: Duration = Duration::from_secs(10);

/// Epoch seconds; replaceable so that tests can write "old" desired values.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// `$aws/things/<thing>/shadow` or `$aws/things/<thing>/shadow/name/<name>`.
pub fn topic_prefix(thing: &str, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("$aws/things/{thing}/shadow/name/{n}"),
        None => format!("$aws/things/{thing}/shadow"),
    }
}

/// The reply topics a device-side client subscribes to for one shadow.
pub fn reply_topics(thing: &str, name: Option<&str>) -> Vec<String> {
    let p = topic_prefix(thing, name);
    ["get/accepted", "get/rejected", "update/accepted", "update/rejected", "update/delta", "update/documents", "delete/accepted", "delete/rejected"]
        .iter()
        .map(|s| format!("{p}/{s}"))
        .collect()
}

/// The standard message of a rejection code (what [`ShadowService::fail_next_update`] sends).
pub fn error_message(code: u16) -> &'static str {
    match code {
        400 => "Invalid JSON",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Thing not found",
        409 => "Version conflict",
        413 => "The payload exceeds the maximum size allowed",
        415 => "Unsupported documented encoding; supported encoding is UTF-8",
        429 => "Too Many Requests",
        _ => "Internal service failure",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Get,
    Update,
    Delete,
}

type Key = (String, Option<String>);

fn key(thing: &str, name: Option<&str>) -> Key {
    (thing.to_string(), name.map(str::to_string))
}

/// One existing shadow.
#[derive(Clone, Debug, Default)]
struct Doc {
    desired: Map<String, Json>,
    reported: Map<String, Json>,
    meta_desired: Map<String, Json>,
    meta_reported: Map<String, Json>,
    version: u64,
}

/// Everything known about one configured shadow, existing or not.
#[derive(Debug, Default)]
struct Entry {
    doc: Option<Doc>,
    /// The version of the last document, kept across a delete.
    last_version: u64,
    updates: Vec<Json>,
    gets: usize,
    deletes: usize,
    fail_next: VecDeque<u16>,
    fail_next_get: VecDeque<u16>,
    /// Get requests still to leave unanswered, as a lost message would.
    drop_gets: usize,
}

#[derive(Default)]
struct State {
    entries: HashMap<Key, Entry>,
    /// Request topic → shadow and operation.
    routes: HashMap<String, (Key, Op)>,
}

struct Outgoing {
    topic: String,
    payload: Vec<u8>,
}

struct Inner {
    state: Mutex<State>,
    clock: Clock,
    offset: AtomicI64,
    out: mpsc::UnboundedSender<Outgoing>,
    /// Bumped after every request handled or API change.
    changed: watch::Sender<u64>,
    /// Publishes handed to the publisher task.
    queued: AtomicU64,
    /// Publishes that will get no PUBACK (dropped offline, or refused by the
    /// client): with the client's PUBACK count, what [`ShadowService::wait_acked`]
    /// compares with `queued`.
    dropped: watch::Sender<u64>,
}

/// A rejection: `code`, `message`, and the client token to echo.
#[derive(Debug)]
struct Rejection {
    code: u16,
    message: String,
    token: Option<String>,
}

impl Rejection {
    fn new(code: u16, message: impl Into<String>, token: &Option<String>) -> Rejection {
        Rejection { code, message: message.into(), token: token.clone() }
    }

    fn to_json(&self, now: u64) -> Json {
        let mut m = Map::new();
        m.insert("code".into(), json!(self.code));
        m.insert("message".into(), json!(self.message));
        m.insert("timestamp".into(), json!(now));
        if let Some(t) = &self.token {
            m.insert("clientToken".into(), json!(t));
        }
        Json::Object(m)
    }
}

/// What an accepted update produces.
struct Accepted {
    accepted: Json,
    delta: Option<Json>,
    documents: Json,
}

/// The emulator. Dropping it stops its client and its publisher task.
pub struct ShadowService {
    inner: Arc<Inner>,
    /// Requests reach [`Inner::handle`] on the client's own task, in order.
    mqtt: Mqtt,
    publisher: JoinHandle<()>,
}

impl std::fmt::Debug for ShadowService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShadowService").finish_non_exhaustive()
    }
}

fn system_clock() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b))
}

impl ShadowService {
    /// Connects to the broker on 127.0.0.1:`mqtt_port`, subscribes to the request
    /// topics of `things` (thing, optional shadow name; none exists yet) and returns
    /// once the broker acknowledged the subscription.
    pub async fn start(mqtt_port: u16, things: &[(&str, Option<&str>)]) -> ShadowService {
        Self::start_with_clock(mqtt_port, things, Arc::new(system_clock)).await
    }

    /// [`ShadowService::start`] with a clock of the test's choosing (epoch seconds).
    pub async fn start_with_clock(mqtt_port: u16, things: &[(&str, Option<&str>)], clock: Clock) -> ShadowService {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let id = format!("shadow-service-{}-{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Outgoing>();
        let inner = Arc::new(Inner {
            state: Mutex::new(State::default()),
            clock,
            offset: AtomicI64::new(0),
            out: out_tx,
            changed: watch::channel(0).0,
            queued: AtomicU64::new(0),
            dropped: watch::channel(0).0,
        });
        let topics: Vec<String> = {
            let mut st = inner.lock();
            things.iter().flat_map(|(thing, name)| add_routes(&mut st, thing, *name)).collect()
        };
        let options = Options::new(id)
            .max_packet(1024 * 1024)
            .keep_alive(Duration::from_secs(30))
            .clean_session(true)
            .subscribe(topics)
            .wait(BROKER_WAIT);
        let handler = inner.clone();
        let mqtt = Mqtt::connect_handling(mqtt_port, options, move |m| handler.handle(&m.topic, &m.payload))
            .await
            .unwrap_or_else(|e| panic!("the shadow service got {e}"));

        let pub_inner = inner.clone();
        let client = mqtt.publisher();
        let status = mqtt.watch();
        let publisher = tokio::spawn(async move {
            while let Some(o) = out_rx.recv().await {
                // Offline: dropped, as AWS drops messages for a disconnected clean session.
                let online = status.borrow().connected;
                if !online || client.publish(&o.topic, o.payload).await.is_err() {
                    // Count it as settled so that nobody waits for its PUBACK.
                    pub_inner.dropped.send_modify(|n| *n += 1);
                }
            }
        });
        ShadowService { inner, mqtt, publisher }
    }

    /// Serves one more shadow (waits for the SUBACK).
    pub async fn serve(&self, thing: &str, name: Option<&str>) {
        let topics = add_routes(&mut self.inner.lock(), thing, name);
        if let Err(e) = self.mqtt.subscribe(topics).await {
            panic!("{}: {e}", topic_prefix(thing, name));
        }
    }

    /// Waits until the service is connected and subscribed again (after the broker
    /// restarted, for instance). Panics after `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) {
        if let Err(e) = self.mqtt.wait_status(timeout, |s| s.subscribed).await {
            panic!("the shadow service did not reconnect: no SUBACK {e}");
        }
    }

    /// Whether the service is connected to the broker now.
    pub fn is_connected(&self) -> bool {
        self.mqtt.status().connected
    }

    // ---- The cloud application's side --------------------------------------------

    /// Sets `desired` as the cloud application would (an UpdateThingShadow call):
    /// merges, publishes `update/accepted`, `update/documents` and, if the device has
    /// something to do, `update/delta`, and waits until the broker took them.
    /// Returns the accepted document. Panics if the update is rejected.
    pub async fn set_desired(&self, thing: &str, name: Option<&str>, desired: Json) -> Json {
        let r = self.update(thing, name, json!({ "state": { "desired": desired } })).await;
        r.unwrap_or_else(|e| panic!("set_desired on {} rejected: {e}", topic_prefix(thing, name)))
    }

    /// Sets `reported` as if a device had (no MQTT request is recorded): for seeding.
    pub async fn set_reported(&self, thing: &str, name: Option<&str>, reported: Json) -> Json {
        let r = self.update(thing, name, json!({ "state": { "reported": reported } })).await;
        r.unwrap_or_else(|e| panic!("set_reported on {} rejected: {e}", topic_prefix(thing, name)))
    }

    /// Any update request, as the REST API would take it: `Ok(accepted document)`
    /// (also published with the delta and documents) or `Err(error document)` (not
    /// published, as for REST).
    pub async fn update(&self, thing: &str, name: Option<&str>, request: Json) -> Result<Json, Json> {
        let now = self.inner.now();
        let prefix = topic_prefix(thing, name);
        let result = {
            let mut st = self.inner.lock();
            let entry = st.entries.entry(key(thing, name)).or_default();
            let payload = request.to_string();
            update(entry, payload.as_bytes(), now)
        };
        self.inner.bump();
        match result {
            Ok(a) => {
                let seq = self.inner.send_accepted(&prefix, a.accepted.clone(), a.delta, a.documents);
                self.wait_acked(seq).await;
                Ok(a.accepted)
            }
            Err(r) => Err(r.to_json(now)),
        }
    }

    /// Deletes the shadow as the cloud application would; publishes `delete/accepted`.
    /// `false` if there was none.
    pub async fn delete(&self, thing: &str, name: Option<&str>) -> bool {
        let now = self.inner.now();
        let prefix = topic_prefix(thing, name);
        let deleted = {
            let mut st = self.inner.lock();
            let entry = st.entries.entry(key(thing, name)).or_default();
            entry.doc.take().map(|d| {
                entry.last_version = d.version;
                d.version
            })
        };
        self.inner.bump();
        match deleted {
            Some(v) => {
                let seq = self.inner.send(&format!("{prefix}/delete/accepted"), &json!({"version": v, "timestamp": now}));
                self.wait_acked(seq).await;
                true
            }
            None => false,
        }
    }

    /// Publishes anything on `<shadow prefix>/<suffix>` (e.g. a stale `update/delta`
    /// to check that the device ignores it).
    pub async fn publish(&self, thing: &str, name: Option<&str>, suffix: &str, payload: &Json) {
        let seq = self.inner.send(&format!("{}/{suffix}", topic_prefix(thing, name)), payload);
        self.wait_acked(seq).await;
    }

    /// Rejects the next update request received over MQTT for this shadow with
    /// `code` (and its standard message), once. Calls queue up.
    pub fn fail_next_update(&self, thing: &str, name: Option<&str>, code: u16) {
        self.inner.lock().entries.entry(key(thing, name)).or_default().fail_next.push_back(code);
    }

    /// Rejects the next get request received over MQTT for this shadow with
    /// `code`, once. Calls queue up.
    pub fn fail_next_get(&self, thing: &str, name: Option<&str>, code: u16) {
        self.inner.lock().entries.entry(key(thing, name)).or_default().fail_next_get.push_back(code);
    }

    /// Leaves the next `count` get requests for this shadow unanswered (as if
    /// the request or its answer were lost); they are still counted.
    pub fn drop_next_gets(&self, thing: &str, name: Option<&str>, count: usize) {
        self.inner.lock().entries.entry(key(thing, name)).or_default().drop_gets += count;
    }

    /// Deletes the shadow as the application would, long enough ago that the
    /// next one starts again at version 1 (AWS keeps the version across a
    /// delete for 48 hours only). Publishes `delete/accepted`.
    pub async fn delete_and_forget_version(&self, thing: &str, name: Option<&str>) {
        self.delete(thing, name).await;
        self.inner.lock().entries.entry(key(thing, name)).or_default().last_version = 0;
        self.inner.bump();
    }

    /// Moves the clock by `secs` (negative: into the past) for what follows.
    pub fn set_clock_offset(&self, secs: i64) {
        self.inner.offset.store(secs, Ordering::SeqCst);
    }

    /// The service's current time, epoch seconds.
    pub fn now(&self) -> u64 {
        self.inner.now()
    }

    // ---- Observation ---------------------------------------------------------------

    /// The full current shadow as `get/accepted` would carry it (`state` with
    /// `desired`, `reported`, `delta`; `metadata`; `version`; `timestamp`), or `None`.
    pub fn document(&self, thing: &str, name: Option<&str>) -> Option<Json> {
        let now = self.inner.now();
        let st = self.inner.lock();
        st.entries.get(&key(thing, name)).and_then(|e| e.doc.as_ref()).map(|d| render(d, now))
    }

    /// The current version (`None` if the shadow does not exist).
    pub fn version(&self, thing: &str, name: Option<&str>) -> Option<u64> {
        let st = self.inner.lock();
        st.entries.get(&key(thing, name)).and_then(|e| e.doc.as_ref()).map(|d| d.version)
    }

    /// Every update request received over MQTT for this shadow, in order, as sent
    /// (rejected ones too; a payload that is not JSON appears as a JSON string).
    pub fn updates_from_device(&self, thing: &str, name: Option<&str>) -> Vec<Json> {
        let st = self.inner.lock();
        st.entries.get(&key(thing, name)).map(|e| e.updates.clone()).unwrap_or_default()
    }

    /// How many `get` requests were received for this shadow.
    pub fn gets_received(&self, thing: &str, name: Option<&str>) -> usize {
        let st = self.inner.lock();
        st.entries.get(&key(thing, name)).map_or(0, |e| e.gets)
    }

    /// How many `delete` requests were received for this shadow.
    pub fn deletes_received(&self, thing: &str, name: Option<&str>) -> usize {
        let st = self.inner.lock();
        st.entries.get(&key(thing, name)).map_or(0, |e| e.deletes)
    }

    /// Waits until `pred` holds for the shadow's `state.reported` (an empty object if
    /// none) and returns the full document. Panics after `timeout` with the document.
    pub async fn wait_for_reported(
        &self,
        thing: &str,
        name: Option<&str>,
        timeout: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> Json {
        let empty = json!({});
        let found = self
            .wait_until(timeout, || {
                let doc = self.document(thing, name)?;
                let reported = doc["state"].get("reported").unwrap_or(&empty);
                pred(reported).then_some(doc)
            })
            .await;
        found.unwrap_or_else(|| {
            panic!(
                "reported state of {} never matched within {timeout:?}; the shadow is {}",
                topic_prefix(thing, name),
                self.document(thing, name).map_or("absent".to_string(), |d| d.to_string())
            )
        })
    }

    /// Waits until an update request satisfying `pred` arrived over MQTT for this
    /// shadow (one that came before the call counts) and returns it.
    pub async fn wait_for_update(
        &self,
        thing: &str,
        name: Option<&str>,
        timeout: Duration,
        pred: impl Fn(&Json) -> bool,
    ) -> Json {
        let found = self.wait_until(timeout, || self.updates_from_device(thing, name).into_iter().find(|u| pred(u))).await;
        found.unwrap_or_else(|| {
            panic!(
                "no matching update from the device on {} within {timeout:?}; received {:?}",
                topic_prefix(thing, name),
                self.updates_from_device(thing, name)
            )
        })
    }

    /// Waits until at least `count` get requests arrived for this shadow.
    pub async fn wait_for_gets(&self, thing: &str, name: Option<&str>, count: usize, timeout: Duration) {
        let ok = self.wait_until(timeout, || (self.gets_received(thing, name) >= count).then_some(())).await;
        assert!(
            ok.is_some(),
            "{} get request(s) on {} expected within {timeout:?}, got {}",
            count,
            topic_prefix(thing, name),
            self.gets_received(thing, name)
        );
    }

    /// Evaluates `check` after every change until it returns `Some`, or `None` at timeout.
    pub async fn wait_until<T>(&self, timeout: Duration, check: impl Fn() -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.inner.changed.subscribe();
        loop {
            rx.borrow_and_update();
            if let Some(v) = check() {
                return Some(v);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            // A change wakes us; the short cap also covers the clock moving.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.changed()).await;
        }
    }

    /// Disconnects from the broker and stops.
    pub async fn stop(self) {
        let _ = self.mqtt.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Waits (at most [`BROKER_WAIT`]) until publish number `seq` is settled: the
    /// broker acknowledged it, or it was dropped, or the service is offline.
    async fn wait_acked(&self, seq: u64) {
        let mut status = self.mqtt.watch();
        let mut dropped = self.inner.dropped.subscribe();
        let settled = async {
            loop {
                let s = status.borrow_and_update().clone();
                if s.pubacks + *dropped.borrow_and_update() >= seq || !s.connected {
                    return;
                }
                tokio::select! {
                    r = status.changed() => if r.is_err() { return },
                    r = dropped.changed() => if r.is_err() { return },
                }
            }
        };
        let _ = tokio::time::timeout(BROKER_WAIT, settled).await;
    }
}

impl Drop for ShadowService {
    fn drop(&mut self) {
        self.publisher.abort();
    }
}

/// Registers the three request topics of a shadow; returns them.
fn add_routes(st: &mut State, thing: &str, name: Option<&str>) -> Vec<String> {
    assert!(valid_name(thing), "not a valid thing name for the shadow service: {thing:?}");
    if let Some(n) = name {
        assert!(valid_name(n) && n.len() <= 64, "not a valid shadow name: {n:?}");
    }
    let prefix = topic_prefix(thing, name);
    st.entries.entry(key(thing, name)).or_default();
    [("get", Op::Get), ("update", Op::Update), ("delete", Op::Delete)]
        .into_iter()
        .map(|(s, op)| {
            let t = format!("{prefix}/{s}");
            st.routes.insert(t.clone(), (key(thing, name), op));
            t
        })
        .collect()
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now(&self) -> u64 {
        let t = i128::from((self.clock)()) + i128::from(self.offset.load(Ordering::SeqCst));
        u64::try_from(t.max(0)).unwrap_or(0)
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Queues a publish; returns its sequence number for [`ShadowService::wait_acked`].
    fn send(&self, topic: &str, payload: &Json) -> u64 {
        let seq = self.queued.fetch_add(1, Ordering::SeqCst) + 1;
        if self.out.send(Outgoing { topic: topic.to_string(), payload: payload.to_string().into_bytes() }).is_err() {
            self.dropped.send_modify(|n| *n += 1);
        }
        seq
    }

    fn send_accepted(&self, prefix: &str, accepted: Json, delta: Option<Json>, documents: Json) -> u64 {
        let mut seq = self.send(&format!("{prefix}/update/accepted"), &accepted);
        if let Some(d) = delta {
            seq = self.send(&format!("{prefix}/update/delta"), &d);
        }
        self.send(&format!("{prefix}/update/documents"), &documents).max(seq)
    }

    /// One request from the broker. Never panics on any payload.
    fn handle(&self, topic: &str, payload: &[u8]) {
        let now = self.now();
        let mut st = self.lock();
        let Some((k, op)) = st.routes.get(topic).cloned() else { return };
        let prefix = topic_prefix(&k.0, k.1.as_deref());
        let entry = st.entries.entry(k.clone()).or_default();
        let mut out: Vec<(String, Json)> = Vec::new();
        match op {
            Op::Get => {
                entry.gets += 1;
                if entry.drop_gets > 0 {
                    entry.drop_gets -= 1;
                    drop(st);
                    self.bump();
                    return;
                }
                let injected = entry.fail_next_get.pop_front();
                match (simple_request(payload), injected) {
                    (Err(r), _) => out.push((format!("{prefix}/get/rejected"), r.to_json(now))),
                    (Ok(token), Some(code)) => {
                        out.push((format!("{prefix}/get/rejected"), Rejection::new(code, error_message(code), &token).to_json(now)));
                    }
                    (Ok(token), None) => match &entry.doc {
                        None => out.push((format!("{prefix}/get/rejected"), not_found(&k, &token).to_json(now))),
                        Some(d) => {
                            let mut doc = render(d, now);
                            with_token(&mut doc, &token);
                            out.push((format!("{prefix}/get/accepted"), doc));
                        }
                    },
                }
            }
            Op::Delete => {
                entry.deletes += 1;
                match simple_request(payload) {
                    Err(r) => out.push((format!("{prefix}/delete/rejected"), r.to_json(now))),
                    Ok(token) => match entry.doc.take() {
                        None => out.push((format!("{prefix}/delete/rejected"), not_found(&k, &token).to_json(now))),
                        Some(d) => {
                            entry.last_version = d.version;
                            let mut doc = json!({"version": d.version, "timestamp": now});
                            with_token(&mut doc, &token);
                            out.push((format!("{prefix}/delete/accepted"), doc));
                        }
                    },
                }
            }
            Op::Update => {
                entry.updates.push(
                    serde_json::from_slice(payload)
                        .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(payload).into_owned())),
                );
                let injected = entry.fail_next.pop_front();
                let result = match injected {
                    Some(code) => {
                        let token = serde_json::from_slice::<Json>(payload)
                            .ok()
                            .and_then(|v| v.get("clientToken").and_then(Json::as_str).map(str::to_string));
                        Err(Rejection::new(code, error_message(code), &token))
                    }
                    None => update(entry, payload, now),
                };
                match result {
                    Err(r) => out.push((format!("{prefix}/update/rejected"), r.to_json(now))),
                    Ok(a) => {
                        out.push((format!("{prefix}/update/accepted"), a.accepted));
                        if let Some(d) = a.delta {
                            out.push((format!("{prefix}/update/delta"), d));
                        }
                        out.push((format!("{prefix}/update/documents"), a.documents));
                    }
                }
            }
        }
        drop(st);
        for (t, p) in out {
            self.send(&t, &p);
        }
        self.bump();
    }
}

fn not_found(k: &Key, token: &Option<String>) -> Rejection {
    let name = k.1.as_deref().unwrap_or(&k.0);
    Rejection::new(404, format!("No shadow exists with name: {name}"), token)
}

fn with_token(doc: &mut Json, token: &Option<String>) {
    if let (Some(t), Json::Object(m)) = (token, doc) {
        m.insert("clientToken".into(), json!(t));
    }
}

/// A get or delete request: empty, or a JSON object with an optional `clientToken`.
fn simple_request(payload: &[u8]) -> Result<Option<String>, Rejection> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let none = None;
    let v: Json = serde_json::from_slice(payload).map_err(|_| Rejection::new(400, "Invalid JSON", &none))?;
    let Json::Object(m) = v else { return Err(Rejection::new(400, "Invalid JSON", &none)) };
    client_token(&m)
}

fn client_token(m: &Map<String, Json>) -> Result<Option<String>, Rejection> {
    match m.get("clientToken") {
        None => Ok(None),
        Some(Json::String(t)) if t.len() <= MAX_CLIENT_TOKEN_BYTES => Ok(Some(t.clone())),
        Some(_) => Err(Rejection::new(400, "Invalid clientToken", &None)),
    }
}

/// A section of a request state: absent, `null` (delete the section), or a patch.
enum Section {
    Absent,
    Null,
    Patch(Map<String, Json>),
}

fn section(state: &Map<String, Json>, name: &str, token: &Option<String>) -> Result<Section, Rejection> {
    match state.get(name) {
        None => Ok(Section::Absent),
        Some(Json::Null) => Ok(Section::Null),
        Some(Json::Object(m)) => Ok(Section::Patch(m.clone())),
        Some(_) => {
            let node = if name == "desired" { "Desired" } else { "Reported" };
            Err(Rejection::new(400, format!("{node} node must be an object"), token))
        }
    }
}

fn depth(v: &Json) -> usize {
    match v {
        Json::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        Json::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Validates and applies an update request to `entry`.
fn update(entry: &mut Entry, payload: &[u8], now: u64) -> Result<Accepted, Rejection> {
    let none = None;
    if payload.len() > MAX_MESSAGE_BYTES {
        return Err(Rejection::new(413, "The payload exceeds the maximum size allowed", &none));
    }
    let v: Json = serde_json::from_slice(payload).map_err(|_| Rejection::new(400, "Invalid JSON", &none))?;
    let Json::Object(req) = v else { return Err(Rejection::new(400, "Invalid JSON", &none)) };
    let token = client_token(&req)?;
    let version = match req.get("version") {
        None => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| Rejection::new(400, "Invalid version", &token))?),
    };
    let state = match req.get("state") {
        None => return Err(Rejection::new(400, "Missing required node: state", &token)),
        Some(Json::Object(s)) => s.clone(),
        Some(_) => return Err(Rejection::new(400, "State node must be an object", &token)),
    };
    if state.keys().any(|k| k != "desired" && k != "reported") {
        return Err(Rejection::new(400, "State contains an invalid node", &token));
    }
    let desired = section(&state, "desired", &token)?;
    let reported = section(&state, "reported", &token)?;
    // Containers from `state` down, plus the leaf's own name.
    if depth(&Json::Object(state.clone())) + 1 > MAX_DEPTH {
        return Err(Rejection::new(400, format!("JSON contains too many levels of nesting; maximum is {MAX_DEPTH}"), &token));
    }
    if Json::Object(state.clone()).to_string().len() > MAX_STATE_BYTES {
        return Err(Rejection::new(413, "The payload exceeds the maximum size allowed", &token));
    }
    let current = entry.doc.as_ref().map_or(entry.last_version, |d| d.version);
    if version.is_some_and(|v| v != current) {
        return Err(Rejection::new(409, "Version conflict", &token));
    }

    let previous = entry.doc.clone();
    let mut doc = previous.clone().unwrap_or_default();
    apply_section(&mut doc.desired, &mut doc.meta_desired, &desired, now);
    apply_section(&mut doc.reported, &mut doc.meta_reported, &reported, now);
    let size = json!({"desired": doc.desired, "reported": doc.reported}).to_string().len();
    if size > MAX_STATE_BYTES {
        return Err(Rejection::new(413, "The payload exceeds the maximum size allowed", &token));
    }
    doc.version = current + 1;

    // update/accepted: the request state, its metadata, version, timestamp, token.
    let mut meta = Map::new();
    for (name, s) in [("desired", &desired), ("reported", &reported)] {
        match s {
            Section::Absent => {}
            Section::Null => {
                meta.insert(name.into(), json!({"timestamp": now}));
            }
            Section::Patch(p) => {
                meta.insert(name.into(), Json::Object(request_meta(p, now)));
            }
        }
    }
    let mut accepted = json!({"state": state, "metadata": meta, "version": doc.version, "timestamp": now});
    with_token(&mut accepted, &token);

    // update/delta: the attributes of this request's desired that still differ.
    let delta = match &desired {
        Section::Patch(p) => {
            let d = restrict(&delta_of(&doc.desired, &doc.reported), p);
            (!d.is_empty()).then(|| {
                let mut m = json!({
                    "state": d.clone(),
                    "metadata": delta_meta(&d, &doc.meta_desired),
                    "version": doc.version,
                    "timestamp": now,
                });
                with_token(&mut m, &token);
                m
            })
        }
        _ => None,
    };

    let mut documents = Map::new();
    if let Some(p) = &previous {
        documents.insert("previous".into(), snapshot(p));
    }
    documents.insert("current".into(), snapshot(&doc));
    documents.insert("timestamp".into(), json!(now));
    let mut documents = Json::Object(documents);
    with_token(&mut documents, &token);

    entry.last_version = doc.version;
    entry.doc = Some(doc);
    Ok(Accepted { accepted, delta, documents })
}

fn apply_section(state: &mut Map<String, Json>, meta: &mut Map<String, Json>, s: &Section, now: u64) {
    match s {
        Section::Absent => {}
        Section::Null => {
            state.clear();
            meta.clear();
        }
        Section::Patch(p) => {
            merge(state, meta, p, now);
            prune(state, meta);
        }
    }
}

/// Merges `patch` into `state`: objects merge, null deletes, anything else replaces;
/// every leaf written gets a fresh timestamp in `meta`.
fn merge(state: &mut Map<String, Json>, meta: &mut Map<String, Json>, patch: &Map<String, Json>, now: u64) {
    for (k, v) in patch {
        match v {
            Json::Null => {
                state.remove(k);
                meta.remove(k);
            }
            Json::Object(p) => {
                if !matches!(state.get(k), Some(Json::Object(_))) {
                    state.insert(k.clone(), Json::Object(Map::new()));
                    meta.insert(k.clone(), Json::Object(Map::new()));
                }
                if !matches!(meta.get(k), Some(Json::Object(_))) {
                    meta.insert(k.clone(), Json::Object(Map::new()));
                }
                if let (Some(Json::Object(s)), Some(Json::Object(m))) = (state.get_mut(k), meta.get_mut(k)) {
                    merge(s, m, p, now);
                }
            }
            other => {
                state.insert(k.clone(), other.clone());
                meta.insert(k.clone(), leaf_meta(other, now));
            }
        }
    }
}

/// Drops objects left empty (by deletions) and metadata of what is gone.
fn prune(state: &mut Map<String, Json>, meta: &mut Map<String, Json>) {
    let keys: Vec<String> = state.keys().cloned().collect();
    for k in keys {
        if let Some(Json::Object(s)) = state.get_mut(&k) {
            if !matches!(meta.get(&k), Some(Json::Object(_))) {
                meta.insert(k.clone(), Json::Object(Map::new()));
            }
            if let Some(Json::Object(m)) = meta.get_mut(&k) {
                prune(s, m);
            }
            if s.is_empty() {
                state.remove(&k);
                meta.remove(&k);
            }
        }
    }
    meta.retain(|k, _| state.contains_key(k));
}

/// The metadata of a stored value: `{"timestamp"}` per leaf, arrays element-wise.
fn leaf_meta(v: &Json, now: u64) -> Json {
    match v {
        Json::Object(m) => Json::Object(m.iter().map(|(k, v)| (k.clone(), leaf_meta(v, now))).collect()),
        Json::Array(a) => Json::Array(a.iter().map(|v| leaf_meta(v, now)).collect()),
        _ => json!({"timestamp": now}),
    }
}

/// The metadata echoed in `update/accepted`: like [`leaf_meta`], nulls included.
fn request_meta(p: &Map<String, Json>, now: u64) -> Map<String, Json> {
    p.iter().map(|(k, v)| (k.clone(), leaf_meta(v, now))).collect()
}

/// Desired attributes that reported lacks or holds differently, per leaf.
fn delta_of(desired: &Map<String, Json>, reported: &Map<String, Json>) -> Map<String, Json> {
    let mut out = Map::new();
    for (k, d) in desired {
        match (d, reported.get(k)) {
            (Json::Object(dm), Some(Json::Object(rm))) => {
                let sub = delta_of(dm, rm);
                if !sub.is_empty() {
                    out.insert(k.clone(), Json::Object(sub));
                }
            }
            (_, Some(r)) if r == d => {}
            _ => {
                out.insert(k.clone(), d.clone());
            }
        }
    }
    out
}

/// The part of `delta` that `patch` (a request's desired) touched.
fn restrict(delta: &Map<String, Json>, patch: &Map<String, Json>) -> Map<String, Json> {
    let mut out = Map::new();
    for (k, p) in patch {
        match (p, delta.get(k)) {
            (_, None) | (Json::Null, _) => {}
            (Json::Object(pm), Some(Json::Object(dm))) => {
                let sub = restrict(dm, pm);
                if !sub.is_empty() {
                    out.insert(k.clone(), Json::Object(sub));
                }
            }
            (_, Some(d)) => {
                out.insert(k.clone(), d.clone());
            }
        }
    }
    out
}

/// The desired metadata of the attributes in `delta`.
fn delta_meta(delta: &Map<String, Json>, meta: &Map<String, Json>) -> Json {
    let mut out = Map::new();
    for (k, v) in delta {
        match (v, meta.get(k)) {
            (Json::Object(d), Some(Json::Object(m))) => {
                out.insert(k.clone(), delta_meta(d, m));
            }
            (_, Some(m)) => {
                out.insert(k.clone(), m.clone());
            }
            (_, None) => {}
        }
    }
    Json::Object(out)
}

/// `{"desired"?, "reported"?}` without empty sections.
fn sections(desired: &Map<String, Json>, reported: &Map<String, Json>) -> Map<String, Json> {
    let mut m = Map::new();
    if !desired.is_empty() {
        m.insert("desired".into(), Json::Object(desired.clone()));
    }
    if !reported.is_empty() {
        m.insert("reported".into(), Json::Object(reported.clone()));
    }
    m
}

/// A document as `update/documents` carries it in `previous` / `current`.
fn snapshot(d: &Doc) -> Json {
    json!({
        "state": sections(&d.desired, &d.reported),
        "metadata": sections(&d.meta_desired, &d.meta_reported),
        "version": d.version,
    })
}

/// A document as `get/accepted` carries it (without the client token).
fn render(d: &Doc, now: u64) -> Json {
    let mut state = sections(&d.desired, &d.reported);
    let delta = delta_of(&d.desired, &d.reported);
    if !delta.is_empty() {
        state.insert("delta".into(), Json::Object(delta));
    }
    json!({
        "state": state,
        "metadata": sections(&d.meta_desired, &d.meta_reported),
        "version": d.version,
        "timestamp": now,
    })
}
