//! The AWS IoT device shadow adapter: one task per device bound to a shadow.
//!
//! On every (re)connect, once the subscriptions are acknowledged, it asks for
//! the shadow (`get`), applies its `state.delta`, and reports what the device
//! actually holds. While connected it applies each `update/delta`. A document
//! whose `version` is not newer than the last one acted upon is skipped; that
//! version is kept in the [`Store`], so a restart does not re-apply an old
//! delta. Desired values are checked like raw commands (known, writable,
//! type, labels, limits); refused ones are not written and are explained
//! under `reported.<errors_key>`, so the application sees why its delta
//! persists. What is written is read back, and the read-back is reported.
//!
//! `desired.command` may hold an array of commands (`relay-command` is built
//! in). Each has an id (given, or derived from the shadow, its `metadata`
//! timestamp and its content — never from the document version, which every
//! update bumps), is recorded in the store before it runs, and so runs at
//! most once, across restarts. A command older than its `ttl` (measured from
//! when it was written to `desired`, per its metadata) fails as `expired`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::json::{from_json, insert, leaves, to_json};
use super::now_ms;
use super::telemetry::Reported;
use crate::config::{CommandDef, ShadowBinding};
use crate::device::{DeviceHandle, Health};
use crate::mqtt::{Class, ConnectionHandle, Inbox, Message, Publish};
use crate::point::Encoded;
use crate::store::{Applied, CommandState, Op, Store};

/// AWS limit for a shadow document's state.
const MAX_DOCUMENT: usize = 8 * 1024;
/// Command states kept in `reported.command`; older ones are removed.
const REPORTED_COMMANDS: usize = 10;
/// First and longest wait before asking again after the shadow service
/// throttled (429) or failed (5xx) a request of ours.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The topics a shadow adapter must be subscribed to.
pub fn shadow_topics(binding: &ShadowBinding) -> Vec<String> {
    let p = binding.prefix();
    ["get/accepted", "get/rejected", "update/delta", "update/accepted", "update/rejected"].iter().map(|s| format!("{p}/{s}")).collect()
}

/// What a shadow adapter receives: the messages on its topics, and a signal
/// that some were dropped while it was busy (a long named command).
#[derive(Debug)]
pub struct ShadowInbox {
    pub messages: mpsc::Receiver<Message>,
    pub overflow: Arc<Notify>,
}

/// The connection's side of a [`ShadowInbox`]: a full inbox (a long named
/// command holds the adapter) drops the message and wakes `overflow`; the
/// adapter then fetches the whole shadow again, which still holds whatever
/// a dropped delta carried.
#[derive(Debug)]
pub struct ShadowRoute {
    tx: mpsc::Sender<Message>,
    overflow: Arc<Notify>,
}

/// The two ends of a shadow adapter's inbox.
pub fn shadow_inbox() -> (Arc<ShadowRoute>, ShadowInbox) {
    let (tx, messages) = mpsc::channel(64);
    let overflow = Arc::new(Notify::new());
    (Arc::new(ShadowRoute { tx, overflow: overflow.clone() }), ShadowInbox { messages, overflow })
}

impl Inbox for ShadowRoute {
    fn offer(&self, msg: Message) -> Vec<Publish> {
        if self.tx.try_send(msg).is_err() {
            metrics::counter!("twinbus_shadow_messages_deferred_total").increment(1);
            tracing::warn!("a shadow message arrived while its adapter was busy: it will fetch the shadow again");
            self.overflow.notify_one();
        }
        Vec::new()
    }
}

/// Serves one shadow until `stop` fires; then reports `connected: false`.
pub async fn run_shadow(
    binding: ShadowBinding,
    commands: Vec<CommandDef>,
    device: DeviceHandle,
    conn: ConnectionHandle,
    store: Store,
    inbox: ShadowInbox,
    stop: CancellationToken,
) {
    let ShadowInbox { messages: mut inbox, overflow } = inbox;
    let mut sessions = conn.sessions();
    let mut snapshots = device.watch();
    let mut shadow = Shadow::new(binding, commands, device.clone(), conn.clone(), store);
    loop {
        let retry_at = shadow.retry.as_ref().map(|r| r.at);
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            changed = sessions.changed() => {
                if changed.is_err() { break }
                shadow.sync().await;
            }
            () = tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)), if retry_at.is_some() => shadow.retry().await,
            m = inbox.recv() => match m {
                Some(m) => shadow.on_message(&m).await,
                None => break,
            },
            () = overflow.notified() => {
                // A delta may be among what was dropped; the shadow itself
                // still holds it. Versions already applied are skipped.
                tracing::warn!(shadow = %shadow.prefix, "messages were dropped while busy: fetching the shadow again");
                shadow.sync().await;
            }
            changed = snapshots.changed() => {
                if changed.is_err() { break }
                let snap = snapshots.borrow_and_update().clone();
                shadow.on_snapshot(&snap.values, &snap.health).await;
            }
        }
    }
    shadow.report(json!({"connected": false})).await;
}

struct Shadow {
    binding: ShadowBinding,
    prefix: String,
    /// Store key: the connection name keeps two accounts with one thing name apart.
    key: String,
    device: DeviceHandle,
    conn: ConnectionHandle,
    store: Store,
    last_version: Option<u64>,
    reported: Reported,
    health: Health,
    tokens: u64,
    /// Our own client tokens still waiting for accepted/rejected, with the
    /// `reported` part an update carried (to send again if it is throttled).
    ours: VecDeque<(String, Option<Map<String, Json>>)>,
    /// What to ask again after a throttled or failed request.
    retry: Option<Retry>,
    retry_delay: Duration,
    /// Ids currently listed in `reported.command`, oldest first.
    listed_commands: VecDeque<String>,
    /// The device's named commands.
    commands: Vec<CommandDef>,
    /// Store records of commands that finished, committed with the report
    /// that carries their final state.
    finished: Vec<Op>,
    /// Commands a previous run started and never finished (it crashed):
    /// reported `FAILURE` with the next full report.
    interrupted: Vec<String>,
}

impl Shadow {
    fn new(binding: ShadowBinding, commands: Vec<CommandDef>, device: DeviceHandle, conn: ConnectionHandle, store: Store) -> Shadow {
        let prefix = binding.prefix();
        let key = format!("{}|{prefix}", conn.name);
        let last_version = store.shadow_version(&key).unwrap_or_else(|e| {
            tracing::error!(shadow = %prefix, "cannot read the last applied version from the store: {e:#}");
            None
        });
        let interrupted = store.shadow_commands_started(&key).unwrap_or_else(|e| {
            tracing::error!(shadow = %prefix, "cannot read unfinished commands from the store: {e:#}");
            Vec::new()
        });
        let n = device.points.len();
        Shadow {
            binding,
            prefix,
            key,
            device,
            conn,
            store,
            last_version,
            reported: Reported::new(n),
            health: Health::Unknown,
            tokens: 0,
            ours: VecDeque::new(),
            retry: None,
            retry_delay: RETRY_MIN,
            listed_commands: VecDeque::new(),
            commands,
            finished: Vec::new(),
            interrupted,
        }
    }

    fn token(&mut self, reported: Option<&Map<String, Json>>) -> String {
        self.tokens += 1;
        let token = format!("twinbus-{}-{}", std::process::id(), self.tokens);
        self.ours.push_back((token.clone(), reported.cloned()));
        if self.ours.len() > 64 {
            self.ours.pop_front();
        }
        token
    }

    /// The shadow service throttled (429) or failed (5xx) our `get` or an
    /// update (`report`: what it carried): sync again after a growing delay,
    /// so that neither a pending delta nor a report (a command's outcome) is
    /// lost until the next reconnect. The sync reports the device's current
    /// values; what else the refused update carried is sent again unless a
    /// later report superseded it.
    fn schedule_retry(&mut self, report: Option<Map<String, Json>>) {
        if self.retry.is_none() {
            // One step of backoff per retry, however many parts were refused.
            self.retry = Some(Retry { at: Instant::now() + self.retry_delay, report: Map::new() });
            self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        }
        if let (Some(retry), Some(r)) = (&mut self.retry, report) {
            merge(&mut retry.report, r);
        }
    }

    /// What a refused update of ours carried, less what the reports sent
    /// after it (before the refusal came back) say again: an old `RUNNING`
    /// must not overwrite the `SUCCESS` that followed it.
    fn refused_part(&self, token: &str) -> Option<Map<String, Json>> {
        let i = self.ours.iter().position(|(o, _)| o == token)?;
        let mut part = self.ours[i].1.clone()?;
        for later in self.ours.iter().skip(i + 1).filter_map(|(_, p)| p.as_ref()) {
            prune(&mut part, later);
        }
        Some(part)
    }

    async fn retry(&mut self) {
        let Some(retry) = self.retry.take() else { return };
        self.sync().await;
        if !retry.report.is_empty() {
            self.report(Json::Object(retry.report)).await;
        }
    }

    /// Connected and subscribed: ask for the whole shadow.
    async fn sync(&mut self) {
        let token = self.token(None);
        tracing::debug!(shadow = %self.prefix, "syncing: get");
        self.conn.publish(Class::Volatile, &format!("{}/get", self.prefix), json!({"clientToken": token}).to_string().into_bytes()).await;
    }

    async fn on_message(&mut self, m: &Message) {
        let Some(suffix) = m.topic.strip_prefix(&self.prefix) else { return };
        if let Some(bytes) = m.oversized {
            // Nobody to answer, and asking for the document again would
            // bring the same one: what it carried is lost, and said so.
            metrics::counter!("twinbus_shadow_oversized_total", "shadow" => self.prefix.clone()).increment(1);
            tracing::error!(shadow = %self.prefix, topic = %m.topic, bytes, "a shadow document too large to read was dropped: what it carried is not applied");
            return;
        }
        let doc: Json = match serde_json::from_slice(&m.payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(shadow = %self.prefix, topic = %m.topic, "ignoring a shadow message that is not JSON: {e}");
                return;
            }
        };
        let token = doc["clientToken"].as_str();
        let ours = token.is_some_and(|t| self.ours.iter().any(|(o, _)| o == t));
        match suffix {
            // Another client's get is not our sync: its answer would make us
            // report (and re-apply) for nothing.
            "/get/accepted" | "/get/rejected" if !ours => {}
            "/get/accepted" => {
                self.retry_delay = RETRY_MIN;
                self.on_document(&doc, "state.delta").await;
            }
            "/update/delta" => self.on_document(&doc, "delta").await,
            "/get/rejected" => {
                let code = doc["code"].as_u64().unwrap_or(0);
                if code == 404 {
                    tracing::info!(shadow = %self.prefix, "no shadow yet: creating it from the device's values");
                    self.report_everything(Map::new()).await;
                } else if retryable(code) {
                    tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], retry_in = ?self.retry_delay, "the shadow service refused our get for now: asking again");
                    self.schedule_retry(None);
                } else {
                    tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], "the shadow service refused our get");
                }
            }
            // Not a version to remember: an application's desired update can be
            // numbered just below our report and its delta arrive after this.
            "/update/accepted" if ours => self.retry_delay = RETRY_MIN,
            "/update/accepted" => {}
            "/update/rejected" => {
                if !ours {
                    return; // someone else's update
                }
                match doc["code"].as_u64().unwrap_or(0) {
                    409 => {
                        tracing::info!(shadow = %self.prefix, "version conflict on our update: fetching the shadow again");
                        self.sync().await;
                    }
                    code if retryable(code) => {
                        tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], retry_in = ?self.retry_delay, "the shadow service refused our report for now: sending it again");
                        let part = token.and_then(|t| self.refused_part(t));
                        self.schedule_retry(part);
                    }
                    code => tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], "the shadow service refused our report"),
                }
            }
            _ => {}
        }
    }

    /// A `get/accepted` (delta under `state.delta`) or an `update/delta`
    /// (delta under `state`).
    async fn on_document(&mut self, doc: &Json, kind: &str) {
        let version = doc["version"].as_u64();
        let is_get = kind == "state.delta";
        let (delta, metadata) = if is_get {
            (doc["state"]["delta"].clone(), doc["metadata"]["desired"].clone())
        } else {
            (doc["state"].clone(), doc["metadata"].clone())
        };
        if let (true, Some(v), Some(last)) = (is_get, version, self.last_version) {
            if v < last {
                // A get answers with the current document, never a reordered
                // old one: a lower version means the shadow was deleted and
                // created again (AWS restarts at 0 after 48 hours).
                tracing::warn!(shadow = %self.prefix, version = v, last, "the shadow's version went back: it was recreated; starting afresh");
                if let Err(e) = self.store.apply(vec![Op::ShadowReset { shadow: self.key.clone(), version: v.saturating_sub(1) }]).await {
                    tracing::error!(shadow = %self.prefix, "cannot reset the stored shadow state: {e:#}");
                }
                self.last_version = Some(v.saturating_sub(1));
            }
        }
        if is_get {
            self.seed_listed_commands(&doc["state"]["reported"]["command"]);
        }
        let fresh = match (version, self.last_version) {
            (Some(v), Some(last)) => v > last,
            _ => true,
        };
        let mut reported = Map::new();
        if fresh {
            if let Json::Object(delta) = &delta {
                if !delta.is_empty() {
                    tracing::info!(shadow = %self.prefix, version = ?version, "applying desired state");
                }
                reported = self.apply(delta, &metadata, doc["timestamp"].as_u64()).await;
            }
            if let Some(v) = version {
                self.remember_version(v).await;
            }
        } else {
            tracing::debug!(shadow = %self.prefix, version = ?version, last = ?self.last_version, "skipping a shadow document that is not newer");
        }
        if is_get {
            // Every sync reports what the device holds, and that we are here.
            self.report_everything(reported).await;
        } else if !reported.is_empty() {
            self.report(Json::Object(reported)).await;
        }
    }

    async fn remember_version(&mut self, v: u64) {
        if self.last_version.is_none_or(|last| v > last) {
            self.last_version = Some(v);
            if let Err(e) = self.store.apply(vec![Op::ShadowVersion { shadow: self.key.clone(), version: v }]).await {
                tracing::error!(shadow = %self.prefix, store = %self.store.path().display(), "cannot persist the shadow version: {e:#}");
            }
        }
    }

    /// Writes the valid desired values, runs commands, and returns the
    /// `reported` fragment that says what happened.
    async fn apply(&mut self, delta: &Map<String, Json>, metadata: &Json, doc_time: Option<u64>) -> Map<String, Json> {
        let mut reported = Map::new();
        let mut values = delta.clone();
        if let Some(commands) = values.remove("command") {
            self.run_commands(&commands, &metadata["command"], doc_time, &mut reported).await;
        }
        let points = self.device.points.clone();
        let is_point = |p: &str| points.iter().any(|x| x.path == p);
        let mut writes: Vec<(usize, Encoded)> = Vec::new();
        let mut errors: BTreeMap<String, Json> = BTreeMap::new();
        // Values handled for good (written, or refused), with when they were written.
        let mut settled: Vec<(String, Applied)> = Vec::new();
        let mut written_at: Vec<(String, Applied)> = Vec::new();
        for (path, raw) in leaves(&values, &is_point) {
            let written = metadata_timestamp(metadata, &path).map(|timestamp| Applied { timestamp, value: raw.to_string() });
            if let Some(this) = &written {
                // A delta that persists (refused, clamped, a write-only point)
                // comes back with every sync and every later delta: apply a
                // desired value once, until the application writes it again.
                match self.store.desired_applied(&self.key, &path) {
                    Ok(Some(done)) if this.is_covered_by(&done) => continue,
                    Ok(_) => {}
                    Err(e) => tracing::error!(shadow = %self.prefix, "cannot read applied desired values: {e:#}"),
                }
            }
            let Some(i) = points.iter().position(|p| p.path == path) else {
                errors.insert(path.clone(), json!("unknown point"));
                settled.extend(written.map(|ts| (path, ts)));
                continue;
            };
            match from_json(raw).and_then(|v| points[i].encode(&v)) {
                Ok(enc) => {
                    writes.push((i, enc));
                    // A value that is now accepted clears its earlier error.
                    errors.insert(path.clone(), Json::Null);
                    written_at.extend(written.map(|ts| (path, ts)));
                }
                Err(e) => {
                    tracing::warn!(shadow = %self.prefix, point = %path, "desired value refused: {e}");
                    errors.insert(path.clone(), json!(e));
                    settled.extend(written.map(|ts| (path, ts)));
                }
            }
        }
        if !writes.is_empty() {
            let outcome = self.device.write(writes.clone()).await;
            for (i, v) in &outcome.values {
                insert(&mut reported, &points[*i].path, to_json(v));
                self.reported.record(*i, Some(v.clone()));
            }
            match &outcome.error {
                // Not settled: applied again on the next sync (after the device is back).
                Some(e) => {
                    tracing::warn!(shadow = %self.prefix, "writing desired values failed: {e}");
                    for (i, _) in &writes {
                        errors.insert(points[*i].path.clone(), json!(format!("failed: {e}")));
                    }
                }
                None => settled.extend(written_at),
            }
        }
        if !settled.is_empty() {
            if let Err(e) = self.store.apply(vec![Op::DesiredApplied { shadow: self.key.clone(), applied: settled }]).await {
                tracing::error!(shadow = %self.prefix, "cannot record applied desired values: {e:#}");
            }
        }
        if !errors.is_empty() {
            let mut node = Map::new();
            for (path, e) in errors {
                node.insert(path, e);
            }
            insert(&mut reported, &self.binding.errors_key, Json::Object(node));
        }
        reported
    }

    async fn run_commands(&mut self, commands: &Json, metadata: &Json, doc_time: Option<u64>, reported: &mut Map<String, Json>) {
        let Json::Array(list) = commands else {
            insert(reported, &format!("{}.command", self.binding.errors_key), json!("desired.command must be an array of commands"));
            return;
        };
        let mut states = Map::new();
        for (n, element) in list.iter().enumerate() {
            let written = newest_timestamp(&metadata[n]).or(doc_time);
            let id = command_id(&self.prefix, element, written);
            match self.store.shadow_command(&self.key, &id) {
                Ok(Some(_)) => {
                    tracing::debug!(shadow = %self.prefix, %id, "command already executed: skipping");
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    // Without the store we cannot promise "at most once": do not run.
                    tracing::error!(shadow = %self.prefix, %id, "cannot read executed commands: {e:#}; not running it");
                    continue;
                }
            }
            let started = Op::ShadowCommand { shadow: self.key.clone(), id: id.clone(), at_ms: now_ms(), state: CommandState::Started };
            if let Err(e) = self.store.apply(vec![started]).await {
                tracing::error!(shadow = %self.prefix, %id, "cannot record the command before running it: {e:#}; not running it");
                continue;
            }
            let state = self.run_command(&id, element, written, doc_time).await;
            if let Some(body) = element.as_object().and_then(|o| o.values().next()) {
                self.publish_state(body, &id, &state).await;
            }
            tracing::info!(shadow = %self.prefix, %id, state = %state["state"], "shadow command");
            states.insert(id.clone(), state);
            self.finished.push(Op::ShadowCommand { shadow: self.key.clone(), id: id.clone(), at_ms: now_ms(), state: CommandState::Done });
            self.listed_commands.push_back(id);
        }
        // Keep `reported.command` small: drop the oldest entries.
        while self.listed_commands.len() > REPORTED_COMMANDS {
            if let Some(old) = self.listed_commands.pop_front() {
                states.insert(old, Json::Null);
            }
        }
        if !states.is_empty() {
            reported.insert("command".into(), Json::Object(states));
        }
    }

    async fn run_command(&mut self, id: &str, element: &Json, written: Option<u64>, doc_time: Option<u64>) -> Json {
        let failure = |reason: String| json!({"state": "FAILURE", "reason": reason, "time": now_ms()});
        let Some((name, body)) = element.as_object().and_then(|o| o.iter().next()) else {
            return failure("a command is an object such as {\"relay-command\": {...}}".into());
        };
        if !body["ttl"].is_null() {
            let ttl = match &body["ttl"] {
                Json::Number(n) => n.as_f64(),
                Json::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            let Some(ttl) = ttl.filter(|t| *t >= 0.0) else {
                return failure("\"ttl\" must be a number of seconds".into());
            };
            // Both times from the shadow service's clock: a gateway that
            // booted without a real-time clock must not run stale commands.
            let now = doc_time.unwrap_or_else(|| now_ms() / 1000);
            let Some(at) = written else {
                return failure("cannot tell the command's age (no metadata timestamp)".into());
            };
            let age = now.saturating_sub(at);
            if age as f64 > ttl {
                return failure(format!("expired: written {age}s ago, ttl {ttl}s"));
            }
        }
        match name.as_str() {
            "relay-command" => {
                let topic = body["topic"].as_str().unwrap_or_default();
                if topic.is_empty() || topic.contains(['+', '#']) {
                    return failure("relay-command needs a \"topic\" without wildcards".into());
                }
                let msg = json!({"msg": body["message"], "deviceId": self.binding.thing});
                self.conn.publish(Class::Answer, topic, msg.to_string().into_bytes()).await;
                json!({"state": "SUCCESS", "time": now_ms()})
            }
            other => match self.commands.iter().find(|c| c.name == other).cloned() {
                Some(def) => match self.run_sequence(id, &def, body).await {
                    Ok(()) => json!({"state": "SUCCESS", "time": now_ms()}),
                    Err(reason) => failure(reason),
                },
                None => {
                    let mut known: Vec<&str> = self.commands.iter().map(|c| c.name.as_str()).collect();
                    known.push("relay-command");
                    failure(format!("unknown command {other:?} (known: {})", known.join(", ")))
                }
            },
        }
    }

    /// Runs a named command, reporting RUNNING at once and then every
    /// `running_interval` until it ends.
    async fn run_sequence(&mut self, id: &str, def: &CommandDef, body: &Json) -> Result<(), String> {
        let device = self.device.clone();
        let exec = super::sequence::run(def, body, &device);
        tokio::pin!(exec);
        let mut tick = tokio::time::interval(self.binding.running_interval);
        loop {
            tokio::select! {
                result = &mut exec => return result,
                _ = tick.tick() => {
                    let running = json!({"state": "RUNNING", "time": now_ms()});
                    self.publish_state(body, id, &running).await;
                    self.report(json!({"command": {id: running}})).await;
                }
            }
        }
    }

    /// Sends a command's state to its `response_topic`, when it named one.
    async fn publish_state(&self, body: &Json, id: &str, state: &Json) {
        if let Some(topic) = body["response_topic"].as_str().filter(|t| !t.is_empty() && !t.contains(['+', '#'])) {
            let mut doc = state.clone();
            doc["id"] = json!(id);
            self.conn.publish(Class::Answer, topic, doc.to_string().into_bytes()).await;
        }
    }

    /// After a restart, `reported.command` still lists earlier commands: keep
    /// counting them, oldest first, so the list stays pruned.
    fn seed_listed_commands(&mut self, reported: &Json) {
        let Json::Object(m) = reported else { return };
        let mut ids: Vec<(u64, &String)> = m.iter().map(|(id, st)| (st["time"].as_u64().unwrap_or(0), id)).collect();
        ids.sort();
        for (_, id) in ids {
            if !self.listed_commands.contains(id) {
                self.listed_commands.push_back(id.clone());
            }
        }
    }

    /// Reports every readable value, plus connected/online and `extra`.
    async fn report_everything(&mut self, mut extra: Map<String, Json>) {
        for id in std::mem::take(&mut self.interrupted) {
            tracing::warn!(shadow = %self.prefix, %id, "a command was cut off when the gateway stopped: reporting FAILURE (interrupted), not running it again");
            let state = json!({"state": "FAILURE", "reason": "interrupted: the gateway stopped while this command ran (a crash or power loss); its outcome is unknown and it was not run again", "time": now_ms()});
            // The id as one key (it may contain dots).
            if let Json::Object(commands) = extra.entry("command").or_insert_with(|| json!({})) {
                commands.insert(id.clone(), state);
            }
            self.finished.push(Op::ShadowCommand { shadow: self.key.clone(), id: id.clone(), at_ms: now_ms(), state: CommandState::Done });
            self.listed_commands.push_back(id);
        }
        let snap = self.device.watch().borrow().clone();
        let mut reported = Map::new();
        let all = vec![true; self.device.points.len()];
        self.reported.take_changes(&self.device.points, &snap.values);
        self.add_values(&mut reported, &snap.values, &all);
        reported.insert("connected".into(), json!(true));
        if snap.health != Health::Unknown {
            reported.insert("online".into(), json!(snap.health == Health::Online));
        }
        merge(&mut reported, extra);
        self.report(Json::Object(reported)).await;
    }

    /// After a poll: report values that moved beyond their deadband, and health changes.
    async fn on_snapshot(&mut self, values: &[Option<crate::point::Value>], health: &Health) {
        if *health == Health::Unknown {
            return;
        }
        let mut reported = Map::new();
        if *health != self.health {
            reported.insert("online".into(), json!(*health == Health::Online));
            let back = matches!(self.health, Health::Offline(_)) && *health == Health::Online;
            self.health = health.clone();
            if back {
                // Desired values that failed while it was away are applied now.
                self.sync().await;
            }
        }
        if *health == Health::Online {
            let moved = self.reported.take_changes(&self.device.points, values);
            self.add_values(&mut reported, values, &moved);
        }
        if !reported.is_empty() {
            self.report(Json::Object(reported)).await;
        }
    }

    fn add_values(&self, reported: &mut Map<String, Json>, values: &[Option<crate::point::Value>], include: &[bool]) {
        for (i, p) in self.device.points.iter().enumerate() {
            if let (true, Some(v)) = (include[i], &values[i]) {
                insert(reported, &p.path, to_json(v));
            }
        }
    }

    /// Publishes `{"state":{"reported": ...}}`, split when it would exceed the
    /// 8 KB shadow limit.
    async fn report(&mut self, reported: Json) {
        let Json::Object(reported) = reported else { return };
        for part in split(reported, MAX_DOCUMENT - 512) {
            if let Some(retry) = &mut self.retry {
                prune(&mut retry.report, &part);
            }
            let token = self.token(Some(&part));
            let doc = json!({"state": {"reported": Json::Object(part)}, "clientToken": token});
            let bytes = doc.to_string().into_bytes();
            if bytes.len() > MAX_DOCUMENT {
                tracing::warn!(shadow = %self.prefix, bytes = bytes.len(), "a reported value alone exceeds the 8 KB shadow limit: not sent");
                continue;
            }
            let records = std::mem::take(&mut self.finished);
            self.conn.send(Publish::new(Class::Report, format!("{}/update", self.prefix), bytes).recording(records)).await;
        }
        if !self.finished.is_empty() {
            // Nothing could be sent: record the commands as finished anyway.
            let records = std::mem::take(&mut self.finished);
            if let Err(e) = self.store.apply(records).await {
                tracing::error!(shadow = %self.prefix, "cannot record finished commands: {e:#}");
            }
        }
    }
}

/// A sync to make again later; see [`Shadow::schedule_retry`].
struct Retry {
    at: Instant,
    report: Map<String, Json>,
}

/// Rejections that may succeed when asked again: throttling and the
/// service's own failures. 400, 413 and the like would fail the same way.
fn retryable(code: u64) -> bool {
    code == 429 || code >= 500
}

/// Splits a reported object by top-level keys into parts under `limit` bytes.
fn split(reported: Map<String, Json>, limit: usize) -> Vec<Map<String, Json>> {
    if Json::Object(reported.clone()).to_string().len() <= limit {
        return vec![reported];
    }
    tracing::warn!("a reported document exceeds the shadow size limit: sending it in parts");
    let mut parts = vec![Map::new()];
    for (k, v) in reported {
        let size = k.len() + v.to_string().len() + 4;
        let last_size = parts.last().map_or(0, |p| Json::Object(p.clone()).to_string().len());
        if last_size + size > limit && parts.last().is_some_and(|p| !p.is_empty()) {
            parts.push(Map::new());
        }
        if let Some(p) = parts.last_mut() {
            p.insert(k, v);
        }
    }
    parts
}

/// Removes from `pending` every value that `newer` reports again.
fn prune(pending: &mut Map<String, Json>, newer: &Map<String, Json>) {
    for (k, v) in newer {
        match (pending.get_mut(k), v) {
            (Some(Json::Object(a)), Json::Object(b)) => {
                prune(a, b);
                if a.is_empty() {
                    pending.remove(k);
                }
            }
            (Some(_), _) => {
                pending.remove(k);
            }
            (None, _) => {}
        }
    }
}

fn merge(into: &mut Map<String, Json>, from: Map<String, Json>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Json::Object(a)), Json::Object(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The metadata timestamp of one leaf: `metadata.<path>.timestamp`.
fn metadata_timestamp(metadata: &Json, path: &str) -> Option<u64> {
    let node = path.split('.').fold(metadata, |node, seg| &node[seg]);
    node["timestamp"].as_u64()
}

/// The newest `timestamp` anywhere in a metadata subtree: when the command
/// (or its last changed field) was written to `desired`.
fn newest_timestamp(metadata: &Json) -> Option<u64> {
    match metadata {
        Json::Object(m) => {
            let own = m.get("timestamp").and_then(Json::as_u64);
            m.iter().filter(|(k, _)| k.as_str() != "timestamp").filter_map(|(_, v)| newest_timestamp(v)).chain(own).max()
        }
        Json::Array(a) => a.iter().filter_map(newest_timestamp).max(),
        _ => None,
    }
}

/// The command's own `id`, or one derived from the shadow, when it was
/// written, and its content (FNV-1a; stable across restarts and builds).
fn command_id(prefix: &str, element: &Json, written: Option<u64>) -> String {
    let given = element.as_object().and_then(|o| o.values().next()).and_then(|b| b.get("id")).and_then(|i| match i {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    });
    if let Some(id) = given {
        return id;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{prefix}|{}|{element}", written.unwrap_or(0)).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("auto-{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_derived_command_id_depends_on_content_and_write_time_not_on_version() {
        let cmd = json!({"relay-command": {"message": "hi", "topic": "t", "ttl": 300}});
        let a = command_id("$aws/things/x/shadow", &cmd, Some(100));
        assert_eq!(a, command_id("$aws/things/x/shadow", &cmd, Some(100)), "stable");
        assert_ne!(a, command_id("$aws/things/x/shadow", &cmd, Some(101)), "a new write is a new command");
        assert_ne!(a, command_id("$aws/things/y/shadow", &cmd, Some(100)), "per shadow");
        let with_id = json!({"relay-command": {"id": "c-9", "message": "hi"}});
        assert_eq!(command_id("p", &with_id, Some(1)), "c-9");
    }

    #[test]
    fn the_newest_metadata_timestamp_is_when_a_command_was_written() {
        let m = json!({"relay-command": {"message": {"timestamp": 100}, "ttl": {"timestamp": 150}}});
        assert_eq!(newest_timestamp(&m), Some(150));
        assert_eq!(newest_timestamp(&json!(null)), None);
    }

    #[test]
    fn a_later_report_supersedes_what_a_refused_one_would_send_again() {
        let object = |v: Json| v.as_object().cloned().unwrap_or_default();
        let mut pending = object(json!({"deviceAttrib": {"speed": 30, "mode": "auto"}, "command": {"c-1": {"state": "RUNNING"}}}));
        let newer = object(json!({"deviceAttrib": {"speed": 40}, "command": {"c-1": {"state": "SUCCESS"}}}));
        prune(&mut pending, &newer);
        assert_eq!(Json::Object(pending), json!({"deviceAttrib": {"mode": "auto"}}));
    }

    #[test]
    fn an_oversized_report_is_split_by_top_level_keys() {
        let mut m = Map::new();
        for k in 0..4 {
            m.insert(format!("k{k}"), json!("x".repeat(3000)));
        }
        let parts = split(m, 7000);
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|p| Json::Object(p.clone()).to_string().len() <= 7000));
        assert_eq!(parts.iter().map(Map::len).sum::<usize>(), 4);
    }
}
