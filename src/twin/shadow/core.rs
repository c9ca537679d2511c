//! The shadow adapter's decisions, without I/O: messages, device results and
//! timer events in; publishes, store records, device writes and commands to
//! run out (like rumqttc's `state.rs` beside its event loop).
//!
//! Work arrives as documents: the whole shadow (`get/accepted`, after every
//! connect and whenever the adapter must catch up) or a delta. Each becomes a
//! job, done in order, one step at a time: its commands one by one, then its
//! values in one write. A command's ttl is judged when its turn comes, on the
//! service's clock ([`ServiceClock`]). A job's version is remembered only
//! once everything it asked was applied or explained; until then the next
//! `get` is applied in full (what was applied already is recognised by its
//! metadata timestamp and value, or its command id, and skipped).
//!
//! The adapter always knows how to catch up: a `get` without an answer is
//! asked again (5 s, doubling up to 60 s); a message with a lower version
//! than the one applied (a shadow deleted and made again, or a late one)
//! fetches the shadow; so do deltas it had no room for, a version conflict
//! and a device coming back online. Refusal reasons live under
//! `reported.<errors_key>`; each sync removes those of paths no longer in the
//! delta, so a reason never outlives its refusal.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value as Json};
use tokio::time::Instant;

use super::clock::ServiceClock;
use super::doc::{at_path, command_id, merge, metadata_timestamp, newest_timestamp, prune, short_reason};
use crate::config::{CommandDef, ShadowBinding};
use crate::device::{Health, Outcome, Snapshot};
use crate::mqtt::{topic_matches, valid_topic, Class, Coalesce, Publish};
use crate::point::{Encoded, Point, Value};
use crate::store::{Applied, CommandState, Op};
use crate::twin::json::{from_json, insert, leaves, to_json};
use crate::twin::now_ms;
use crate::twin::telemetry::Reported;

use crate::config::shadow_document::{MAX_BYTES as MAX_DOCUMENT, REPORTED_COMMANDS};

/// First and longest wait before asking again after the shadow service
/// throttled (429) or failed (5xx) a request of ours.
const RETRY_MIN: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);
/// First and longest wait for the answer to a `get` before asking again.
pub(super) const GET_MIN: Duration = Duration::from_secs(5);
const GET_MAX: Duration = Duration::from_secs(60);
/// Deltas waiting behind a long command, at most; past that the adapter
/// fetches the whole shadow once it is free.
const MAX_JOBS: usize = 16;
/// Our own requests whose answers we keep track of.
const TRACKED: usize = 64;

/// What the adapter serves, fixed at start.
#[derive(Debug, Clone)]
pub(super) struct Setup {
    pub(super) binding: ShadowBinding,
    /// Store key: the connection name keeps two accounts with one thing name apart.
    pub(super) key: String,
    /// The device's points.
    pub(super) points: Arc<Vec<Point>>,
    /// Indices of the points this shadow serves.
    pub(super) mine: Vec<usize>,
    /// The device's named commands.
    pub(super) commands: Vec<CommandDef>,
    /// Our client tokens start with this (unique per process).
    pub(super) token_prefix: String,
}

/// What the store remembers of this shadow, read once at start.
#[derive(Debug, Default)]
pub(super) struct Remembered {
    pub(super) version: Option<u64>,
    pub(super) desired: HashMap<String, Applied>,
    pub(super) commands: Vec<(String, CommandState)>,
}

/// What the adapter reacts to.
#[derive(Debug)]
pub(super) enum Input {
    /// The connection is up and subscribed.
    SessionUp,
    /// A message on one of the shadow's topics: the topic after the prefix.
    Message { suffix: String, payload: Vec<u8> },
    /// The connection dropped messages the adapter had no room for.
    Overflow,
    /// The device's latest poll.
    Snapshot(Arc<Snapshot>),
    /// The result of [`Action::Write`].
    Written(Outcome),
    /// A command of [`Action::Run`] was recorded as started and begins.
    Started { id: String },
    /// A command of [`Action::Run`] could not be recorded: it did not run.
    NotRun { id: String, error: String },
    /// A command of [`Action::Run`] ended; `Err` is its FAILURE reason.
    Ran { id: String, result: Result<(), String> },
    /// The time [`Core::deadline`] named has come.
    Timer,
    /// The gateway stops.
    Stop,
}

/// What the I/O shell must do, in order.
#[derive(Debug)]
pub(super) enum Action {
    Publish(Publish),
    /// Commit durably (a failure is logged).
    Record(Vec<Op>),
    /// Write and read back; answer with [`Input::Written`].
    Write(Vec<(usize, Encoded)>),
    /// Record `started` durably, then answer [`Input::Started`] and do the
    /// work (answer [`Input::Ran`]); if it cannot be recorded, do nothing
    /// and answer [`Input::NotRun`].
    Run { id: String, started: Op, work: Work },
}

#[derive(Debug)]
pub(super) enum Work {
    /// Publish this (relay-command).
    Relay(Publish),
    /// Run this named command with these arguments.
    Sequence { def: CommandDef, body: Json },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The whole shadow: its whole delta, and a full report after.
    Get,
    /// One update's delta.
    Delta,
}

#[derive(Debug)]
struct Job {
    kind: Kind,
    version: Option<u64>,
    commands: VecDeque<Pending>,
    /// Desired values still to apply (taken when their write starts).
    values: Option<Map<String, Json>>,
    metadata: Json,
    /// Leaf paths of the delta's values, for clearing old reasons.
    paths: BTreeSet<String>,
    /// What the job has to report so far (read-backs, reasons).
    reported: Map<String, Json>,
    /// Everything so far was applied or explained.
    complete: bool,
}

#[derive(Debug)]
struct Pending {
    id: String,
    element: Json,
    written: Option<u64>,
}

#[derive(Debug)]
enum Busy {
    /// A command runs; a named one (`sequence`) reports RUNNING at `next_running`.
    Command { id: String, body: Json, sequence: bool, next_running: Option<Instant> },
    Write { paths: Vec<String>, settled: Vec<(String, Applied)>, written_at: Vec<(String, Applied)> },
}

#[derive(Debug)]
struct Retry {
    at: Instant,
    report: Map<String, Json>,
}

#[derive(Debug)]
pub(super) struct Core {
    setup: Setup,
    prefix: String,
    applied_version: Option<u64>,
    /// Something asked at or below `applied_version` is not applied yet (a
    /// failed write, a command waiting for the clock): deltas then do not
    /// move the version, and the next `get` settles it.
    unresolved: bool,
    desired: HashMap<String, Applied>,
    executed: HashSet<String>,
    interrupted: Vec<String>,
    clock: ServiceClock,
    tokens: u64,
    /// Our requests waiting for an answer, with the `reported` part an
    /// update carried (to send again if it is throttled).
    ours: VecDeque<(String, Option<Map<String, Json>>)>,
    get_deadline: Option<Instant>,
    get_wait: Duration,
    sync_again: bool,
    retry: Option<Retry>,
    retry_delay: Duration,
    jobs: VecDeque<Job>,
    busy: Option<Busy>,
    sync_when_idle: bool,
    reported: Reported,
    last: Option<Arc<Snapshot>>,
    health: Health,
    listed: VecDeque<String>,
    /// Paths explained under `errors_key`, as far as we know.
    errors: BTreeSet<String>,
    /// Store records of finished commands, committed with the report that
    /// carries their final state.
    finished: Vec<Op>,
}

impl Core {
    pub(super) fn new(setup: Setup, remembered: Remembered) -> Core {
        let prefix = setup.binding.prefix();
        let interrupted = remembered.commands.iter().filter(|(_, s)| *s == CommandState::Started).map(|(id, _)| id.clone()).collect();
        let executed = remembered.commands.into_iter().map(|(id, _)| id).collect();
        let n = setup.points.len();
        Core {
            setup,
            prefix,
            applied_version: remembered.version,
            unresolved: false,
            desired: remembered.desired,
            executed,
            interrupted,
            clock: ServiceClock::default(),
            tokens: 0,
            ours: VecDeque::new(),
            get_deadline: None,
            get_wait: GET_MIN,
            sync_again: false,
            retry: None,
            retry_delay: RETRY_MIN,
            jobs: VecDeque::new(),
            busy: None,
            sync_when_idle: false,
            reported: Reported::new(n),
            last: None,
            health: Health::Unknown,
            listed: VecDeque::new(),
            errors: BTreeSet::new(),
            finished: Vec::new(),
        }
    }

    /// The next time [`Input::Timer`] is due, if any.
    pub(super) fn deadline(&self) -> Option<Instant> {
        let running = match &self.busy {
            Some(Busy::Command { next_running, .. }) => *next_running,
            _ => None,
        };
        [self.get_deadline, self.retry.as_ref().map(|r| r.at), running].into_iter().flatten().min()
    }

    pub(super) fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::SessionUp => {
                // Requests of the old connection are gone with it.
                self.get_deadline = None;
                self.get_wait = GET_MIN;
                self.sync_again = false;
                self.send_get(now, &mut out);
            }
            Input::Message { suffix, payload } => self.on_message(&suffix, &payload, now, &mut out),
            Input::Overflow => {
                tracing::warn!(shadow = %self.prefix, "messages were dropped while busy: fetching the shadow again");
                self.sync_later(now, &mut out);
            }
            Input::Snapshot(snap) => self.on_snapshot(snap, now, &mut out),
            Input::Written(outcome) => self.on_written(outcome, &mut out),
            Input::Started { id } => self.on_started(&id, now, &mut out),
            Input::NotRun { id, error } => {
                tracing::error!(shadow = %self.prefix, %id, "cannot record the command before running it: {error}; not running it");
                self.busy = None;
                if let Some(job) = self.jobs.front_mut() {
                    job.complete = false;
                }
            }
            Input::Ran { id, result } => self.on_ran(id, result, &mut out),
            Input::Timer => self.on_timer(now, &mut out),
            Input::Stop => self.report(json!({"connected": false}), &mut out),
        }
        self.advance(now, &mut out);
        out
    }

    // ---- Requests and answers -----------------------------------------------------

    fn token(&mut self, reported: Option<&Map<String, Json>>) -> String {
        self.tokens += 1;
        let token = format!("{}-{}", self.setup.token_prefix, self.tokens);
        self.ours.push_back((token.clone(), reported.cloned()));
        if self.ours.len() > TRACKED {
            self.ours.pop_front();
        }
        token
    }

    fn send_get(&mut self, now: Instant, out: &mut Vec<Action>) {
        let token = self.token(None);
        tracing::debug!(shadow = %self.prefix, "syncing: get");
        self.get_deadline = Some(now + self.get_wait);
        out.push(Action::Publish(Publish::new(Class::Volatile, format!("{}/get", self.prefix), json!({"clientToken": token}).to_string().into_bytes())));
    }

    /// Fetches the shadow now, or once the `get` under way is answered (its
    /// answer may be older than what made us ask).
    fn sync(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.get_deadline.is_some() {
            self.sync_again = true;
        } else {
            self.send_get(now, out);
        }
    }

    /// Fetches the shadow once the adapter is free, or now if it is.
    fn sync_later(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.busy.is_some() || !self.jobs.is_empty() {
            self.sync_when_idle = true;
        } else {
            self.sync(now, out);
        }
    }

    fn on_message(&mut self, suffix: &str, payload: &[u8], now: Instant, out: &mut Vec<Action>) {
        let doc: Json = match serde_json::from_slice(payload) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(shadow = %self.prefix, suffix, "ignoring a shadow message that is not JSON: {e}");
                return;
            }
        };
        let token = doc["clientToken"].as_str().map(str::to_string);
        let ours = token.as_deref().is_some_and(|t| self.ours.iter().any(|(o, _)| o == t));
        let answer = ours && matches!(suffix, "/get/accepted" | "/get/rejected" | "/update/accepted" | "/update/rejected");
        if let Some(ts) = doc["timestamp"].as_u64() {
            self.clock.observe(ts, now, answer);
        }
        let version = doc["version"].as_u64();
        let lower = matches!((version, self.applied_version), (Some(v), Some(a)) if v < a);
        match suffix {
            // Another client's get is not our sync: its answer would make us
            // report (and re-apply) for nothing.
            "/get/accepted" | "/get/rejected" if !ours => {}
            "/get/accepted" => {
                self.answered_get(now, out);
                self.retry_delay = RETRY_MIN;
                self.on_get(&doc, now, out);
            }
            "/get/rejected" => {
                self.answered_get(now, out);
                let code = doc["code"].as_u64().unwrap_or(0);
                if code == 404 {
                    tracing::info!(shadow = %self.prefix, "no shadow yet: creating it from the device's values");
                    self.errors.clear();
                    self.listed.clear();
                    self.report_everything(Map::new(), out);
                } else if retryable(code) {
                    tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], retry_in = ?self.retry_delay, "the shadow service refused our get for now: asking again");
                    self.schedule_retry(None, now);
                } else {
                    tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], "the shadow service refused our get");
                }
            }
            "/update/delta" => {
                if lower {
                    tracing::info!(shadow = %self.prefix, version = ?version, applied = ?self.applied_version, "a delta below the version applied: the shadow was made again, or this one is late; fetching the shadow");
                    self.count_version("stale");
                    self.sync(now, out);
                } else if version.is_some() && version == self.applied_version {
                    tracing::debug!(shadow = %self.prefix, version = ?version, "skipping a delta already applied");
                    self.count_version("repeated");
                } else {
                    self.queue(Kind::Delta, &doc, now, out);
                }
            }
            "/update/accepted" => {
                if ours {
                    self.retry_delay = RETRY_MIN;
                }
                if lower {
                    tracing::info!(shadow = %self.prefix, version = ?version, applied = ?self.applied_version, "the shadow's version went back: fetching it");
                    self.sync(now, out);
                } else if !ours && self.touches_a_reason(&doc["state"]) {
                    // Desired changed where a reason stands, and maybe to what
                    // the device holds (no delta then): a sync says.
                    self.sync_later(now, out);
                }
            }
            "/update/rejected" if ours => match doc["code"].as_u64().unwrap_or(0) {
                409 => {
                    tracing::info!(shadow = %self.prefix, "version conflict on our update: fetching the shadow again");
                    self.sync(now, out);
                }
                code if retryable(code) => {
                    tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], retry_in = ?self.retry_delay, "the shadow service refused our report for now: sending it again");
                    let part = token.as_deref().and_then(|t| self.refused_part(t));
                    self.schedule_retry(part, now);
                }
                code => tracing::warn!(shadow = %self.prefix, code, message = %doc["message"], "the shadow service refused our report"),
            },
            _ => {}
        }
    }

    fn answered_get(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.get_deadline = None;
        self.get_wait = GET_MIN;
        if std::mem::take(&mut self.sync_again) {
            self.send_get(now, out);
        }
    }

    /// Whether an update's `desired` touches a path whose refusal is explained.
    fn touches_a_reason(&self, state: &Json) -> bool {
        if self.errors.is_empty() {
            return false;
        }
        match &state["desired"] {
            Json::Null if state.get("desired").is_some() => true,
            Json::Object(desired) => leaves(desired, &|_| false).iter().any(|(path, _)| {
                self.errors.iter().any(|e| e == path || e.starts_with(&format!("{path}.")) || path.starts_with(&format!("{e}.")))
            }),
            _ => false,
        }
    }

    /// The shadow service throttled (429) or failed (5xx) our `get` or an
    /// update (`report`: what it carried): sync again after a growing delay,
    /// so that neither a pending delta nor a report (a command's outcome) is
    /// lost until the next reconnect. What else the refused update carried
    /// is sent again unless a later report superseded it.
    fn schedule_retry(&mut self, report: Option<Map<String, Json>>, now: Instant) {
        if self.retry.is_none() {
            // One step of backoff per retry, however many parts were refused.
            self.retry = Some(Retry { at: now + self.retry_delay, report: Map::new() });
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

    fn on_timer(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.get_deadline.is_some_and(|d| d <= now) {
            tracing::warn!(shadow = %self.prefix, waited = ?self.get_wait, "no answer to our get: asking again");
            self.get_wait = (self.get_wait * 2).min(GET_MAX);
            self.get_deadline = None;
            self.send_get(now, out);
        }
        if self.retry.as_ref().is_some_and(|r| r.at <= now) {
            if let Some(retry) = self.retry.take() {
                self.sync(now, out);
                if !retry.report.is_empty() {
                    self.report(Json::Object(retry.report), out);
                }
            }
        }
        if let Some(Busy::Command { id, body, next_running: Some(at), .. }) = &mut self.busy {
            if *at <= now {
                *at = now + self.setup.binding.running_interval;
                let (id, body) = (id.clone(), body.clone());
                self.running(&id, &body, out);
            }
        }
    }

    // ---- Documents become jobs ----------------------------------------------------

    fn on_get(&mut self, doc: &Json, now: Instant, out: &mut Vec<Action>) {
        if let (Some(v), Some(applied)) = (doc["version"].as_u64(), self.applied_version) {
            if v < applied {
                // A get answers with the current document, never a reordered
                // old one: a lower version means the shadow was deleted and
                // made again (AWS restarts at 1 after 48 hours).
                tracing::warn!(shadow = %self.prefix, version = v, applied, "the shadow's version went back: it was made again; starting afresh");
                out.push(Action::Record(vec![Op::ShadowReset { shadow: self.setup.key.clone(), version: 0 }]));
                self.desired.clear();
                self.applied_version = None;
            }
        }
        let reported = &doc["state"]["reported"];
        self.seed_listed(&reported["command"]);
        if let Json::Object(errors) = at_path(reported, &self.setup.binding.errors_key) {
            self.errors.extend(errors.iter().filter(|(_, v)| !v.is_null()).map(|(k, _)| k.clone()));
        }
        self.queue(Kind::Get, doc, now, out);
    }

    fn queue(&mut self, kind: Kind, doc: &Json, now: Instant, out: &mut Vec<Action>) {
        let (delta, metadata) = match kind {
            Kind::Get => (doc["state"]["delta"].clone(), doc["metadata"]["desired"].clone()),
            Kind::Delta => (doc["state"].clone(), doc["metadata"].clone()),
        };
        let mut values = match delta {
            Json::Object(m) => m,
            _ => Map::new(),
        };
        let mut job = Job {
            kind,
            version: doc["version"].as_u64(),
            commands: VecDeque::new(),
            values: None,
            metadata: metadata.clone(),
            paths: BTreeSet::new(),
            reported: Map::new(),
            complete: true,
        };
        if let Some(commands) = values.remove("command") {
            job.paths.insert("command".to_string());
            // A reason for a `command` that was not an array goes once it is one.
            let mut reason = BTreeMap::new();
            match commands {
                Json::Array(list) => {
                    for (n, element) in list.into_iter().enumerate() {
                        let written = newest_timestamp(&metadata["command"][n]);
                        let id = command_id(&self.prefix, &element, written);
                        job.commands.push_back(Pending { id, element, written });
                    }
                    reason.insert("command".to_string(), Json::Null);
                }
                _ => {
                    reason.insert("command".to_string(), json!("desired.command must be an array of commands"));
                }
            }
            self.explain(&mut job, reason);
        }
        let points = self.setup.points.clone();
        let is_point = |p: &str| points.iter().any(|x| x.path == p);
        job.paths.extend(leaves(&values, &is_point).into_iter().map(|(p, _)| p));
        if !values.is_empty() {
            tracing::info!(shadow = %self.prefix, version = ?job.version, "applying desired state");
        }
        job.values = Some(values);
        if kind == Kind::Delta && self.jobs.len() >= MAX_JOBS {
            metrics::counter!("twinbus_shadow_messages_deferred_total").increment(1);
            tracing::warn!(shadow = %self.prefix, "too many deltas wait behind a long command: fetching the shadow again once it ends");
            self.sync_later(now, out);
            return;
        }
        self.jobs.push_back(job);
    }

    // ---- Jobs, one step at a time -------------------------------------------------

    fn advance(&mut self, now: Instant, out: &mut Vec<Action>) {
        while self.busy.is_none() {
            let Some(mut job) = self.jobs.pop_front() else { break };
            if let Some(cmd) = job.commands.pop_front() {
                self.start_command(&mut job, cmd, now, out);
                self.jobs.push_front(job);
            } else if let Some(values) = job.values.take() {
                self.apply_values(&mut job, &values, out);
                self.jobs.push_front(job);
            } else {
                self.finish(job, out);
            }
        }
        if self.busy.is_none() && self.jobs.is_empty() && std::mem::take(&mut self.sync_when_idle) {
            self.sync(now, out);
        }
    }

    fn start_command(&mut self, job: &mut Job, cmd: Pending, now: Instant, out: &mut Vec<Action>) {
        let Pending { id, element, written } = cmd;
        if self.executed.contains(&id) {
            tracing::debug!(shadow = %self.prefix, %id, "command already executed: skipping");
            return;
        }
        let Some((name, body)) = element.as_object().and_then(|o| o.iter().next()).map(|(n, b)| (n.clone(), b.clone())) else {
            return self.finish_command(id, &Json::Null, failure("a command is an object such as {\"relay-command\": {...}}".into()), out);
        };
        if !body["ttl"].is_null() {
            let ttl = match &body["ttl"] {
                Json::Number(n) => n.as_f64(),
                Json::String(s) => s.trim().parse::<f64>().ok(),
                _ => None,
            };
            let Some(ttl) = ttl.filter(|t| *t >= 0.0 && t.is_finite()) else {
                return self.finish_command(id, &body, failure("\"ttl\" must be a number of seconds".into()), out);
            };
            let Some(written) = written else {
                return self.finish_command(id, &body, failure("cannot tell the command's age (no metadata timestamp)".into()), out);
            };
            let Some(service_now) = self.clock.now_ms(now) else {
                // The answer to our get sets the clock, and brings the
                // command again with the whole delta.
                tracing::info!(shadow = %self.prefix, %id, "a command with a ttl waits for the shadow service's clock (the answer to our get)");
                job.complete = false;
                return;
            };
            let age_ms = service_now.saturating_sub(written.saturating_mul(1000));
            if age_ms as f64 > ttl * 1000.0 {
                let age = age_ms / 1000;
                return self.finish_command(id, &body, failure(format!("expired: written {age}s ago, ttl {ttl}s")), out);
            }
        }
        let started = Op::ShadowCommand { shadow: self.setup.key.clone(), id: id.clone(), at_ms: now_ms(), state: CommandState::Started };
        match name.as_str() {
            "relay-command" => {
                let topic = body["topic"].as_str().unwrap_or_default();
                if !valid_topic(topic) {
                    return self.finish_command(id, &body, failure("relay-command needs a \"topic\" without wildcards".into()), out);
                }
                if !self.may_publish_to(topic) {
                    // Short: a shadow keeps 96 bytes of a reason.
                    let reason = format!("topic {topic:?} is not in the twin's response_topics");
                    return self.finish_command(id, &body, failure(reason), out);
                }
                let msg = json!({"msg": body["message"], "deviceId": self.setup.binding.thing});
                let relay = Publish::new(Class::Answer, topic, msg.to_string().into_bytes());
                self.busy = Some(Busy::Command { id: id.clone(), body, sequence: false, next_running: None });
                out.push(Action::Run { id, started, work: Work::Relay(relay) });
            }
            other => match self.setup.commands.iter().find(|c| c.name == other).cloned() {
                Some(def) => {
                    self.busy = Some(Busy::Command { id: id.clone(), body: body.clone(), sequence: true, next_running: None });
                    out.push(Action::Run { id, started, work: Work::Sequence { def, body } });
                }
                None => {
                    let mut known: Vec<&str> = self.setup.commands.iter().map(|c| c.name.as_str()).collect();
                    known.push("relay-command");
                    let reason = format!("unknown command {other:?} (known: {})", known.join(", "));
                    self.finish_command(id, &body, failure(reason), out);
                }
            },
        }
    }

    fn on_started(&mut self, id: &str, now: Instant, out: &mut Vec<Action>) {
        let Some(Busy::Command { id: busy_id, body, sequence: true, next_running }) = &mut self.busy else { return };
        if busy_id != id {
            return;
        }
        // RUNNING at once, then every `running_interval` until it ends.
        *next_running = Some(now + self.setup.binding.running_interval);
        let (id, body) = (busy_id.clone(), body.clone());
        self.running(&id, &body, out);
    }

    fn running(&mut self, id: &str, body: &Json, out: &mut Vec<Action>) {
        let running = json!({"state": "RUNNING", "time": now_ms()});
        self.publish_state(body, id, &running, out);
        self.report(json!({"command": {id: running}}), out);
    }

    fn on_ran(&mut self, id: String, result: Result<(), String>, out: &mut Vec<Action>) {
        let body = match self.busy.take() {
            Some(Busy::Command { id: busy, body, .. }) if busy == id => body,
            other => {
                self.busy = other;
                return;
            }
        };
        let state = match result {
            Ok(()) => json!({"state": "SUCCESS", "time": now_ms()}),
            Err(reason) => failure(reason),
        };
        self.finish_command(id, &body, state, out);
    }

    /// A command's final state: to its response topic, to `reported.command`
    /// (with the record that it is done), and counted in the listed ones.
    fn finish_command(&mut self, id: String, body: &Json, state: Json, out: &mut Vec<Action>) {
        self.publish_state(body, &id, &state, out);
        tracing::info!(shadow = %self.prefix, %id, state = %state["state"], reason = %state["reason"], "shadow command");
        self.executed.insert(id.clone());
        self.finished.push(Op::ShadowCommand { shadow: self.setup.key.clone(), id: id.clone(), at_ms: now_ms(), state: CommandState::Done });
        let mut states = Map::new();
        states.insert(id.clone(), state);
        self.listed.push_back(id);
        while self.listed.len() > REPORTED_COMMANDS {
            if let Some(old) = self.listed.pop_front() {
                states.insert(old, Json::Null);
            }
        }
        self.report(json!({"command": Json::Object(states)}), out);
    }

    /// Whether a cloud may make the gateway publish on `topic`: only on the
    /// twin's `response_topics` (else a shadow command could write another
    /// device's command topic).
    fn may_publish_to(&self, topic: &str) -> bool {
        self.setup.binding.reply_topics.iter().any(|f| topic_matches(f, topic))
    }

    /// Sends a command's state to its `response_topic`, when it named one
    /// the twin allows (see [`Core::may_publish_to`]).
    fn publish_state(&self, body: &Json, id: &str, state: &Json, out: &mut Vec<Action>) {
        if let Some(topic) = body["response_topic"].as_str().filter(|t| valid_topic(t)) {
            if !self.may_publish_to(topic) {
                tracing::warn!(shadow = %self.setup.binding.prefix(), %id, topic, "a command's response_topic is not among the twin's response_topics: its state is only reported in the shadow");
                return;
            }
            let mut doc = state.clone();
            doc["id"] = json!(id);
            out.push(Action::Publish(Publish::new(Class::Answer, topic, doc.to_string().into_bytes())));
        }
    }

    /// Checks each desired value (once per metadata timestamp and value) and
    /// starts one write of the valid ones; the others are explained.
    fn apply_values(&mut self, job: &mut Job, values: &Map<String, Json>, out: &mut Vec<Action>) {
        let points = self.setup.points.clone();
        let is_point = |p: &str| points.iter().any(|x| x.path == p);
        let mut writes: Vec<(usize, Encoded)> = Vec::new();
        let mut paths = Vec::new();
        let mut errors: BTreeMap<String, Json> = BTreeMap::new();
        // Values handled for good (refused), and those settled once written.
        let mut settled: Vec<(String, Applied)> = Vec::new();
        let mut written_at: Vec<(String, Applied)> = Vec::new();
        for (path, raw) in leaves(values, &is_point) {
            let written = metadata_timestamp(&job.metadata, &path).map(|timestamp| Applied { timestamp, value: raw.to_string() });
            // A delta that persists (refused, clamped, a write-only point)
            // comes back with every sync and every later delta: apply a
            // desired value once, until the application writes it again.
            let i = points.iter().position(|p| p.path == path);
            let outcome = match i {
                None => Err("unknown point".to_string()),
                Some(i) if !self.setup.mine.contains(&i) => Err("a point of another shadow of this device".to_string()),
                Some(i) => from_json(raw).and_then(|v| points[i].encode(&v)).map(|enc| (i, enc)),
            };
            if let (Some(this), Some(done)) = (&written, self.desired.get(&path)) {
                if this.is_covered_by(done) {
                    // Not applied again; but a refusal whose reason was
                    // removed (desired moved away and came back within the
                    // same second) is explained again.
                    if let (Err(e), false) = (&outcome, self.errors.contains(&path)) {
                        errors.insert(path.clone(), json!(short_reason(e)));
                    }
                    continue;
                }
            }
            match outcome {
                Ok((i, enc)) => {
                    writes.push((i, enc));
                    paths.push(path.clone());
                    written_at.extend(written.map(|ts| (path, ts)));
                }
                Err(e) => {
                    tracing::warn!(shadow = %self.prefix, point = %path, "desired value refused: {e}");
                    errors.insert(path.clone(), json!(short_reason(&e)));
                    settled.extend(written.map(|ts| (path, ts)));
                }
            }
        }
        self.explain(job, errors);
        if writes.is_empty() {
            self.settle(settled, out);
            return;
        }
        self.busy = Some(Busy::Write { paths, settled, written_at });
        out.push(Action::Write(writes));
    }

    fn on_written(&mut self, outcome: Outcome, out: &mut Vec<Action>) {
        let Some(Busy::Write { paths, mut settled, written_at }) = self.busy.take() else { return };
        let Some(mut job) = self.jobs.pop_front() else { return };
        for (i, v) in &outcome.values {
            if let Some(p) = self.setup.points.get(*i) {
                insert(&mut job.reported, &p.path, to_json(v));
                self.reported.record(*i, Some(v.clone()));
            }
        }
        let mut errors = BTreeMap::new();
        match &outcome.error {
            // Not settled: applied again at the next sync (after the device is back).
            Some(e) => {
                tracing::warn!(shadow = %self.prefix, "writing desired values failed: {e}");
                job.complete = false;
                for p in paths {
                    errors.insert(p, json!(short_reason(&format!("failed: {e}"))));
                }
            }
            None => {
                // A value that is now written clears its earlier reason.
                for p in paths {
                    errors.insert(p, Json::Null);
                }
                settled.extend(written_at);
            }
        }
        self.explain(&mut job, errors);
        self.settle(settled, out);
        self.jobs.push_front(job);
    }

    /// Puts reasons (or their removal, `null`) in the job's report.
    fn explain(&mut self, job: &mut Job, errors: BTreeMap<String, Json>) {
        if errors.is_empty() {
            return;
        }
        let mut node = Map::new();
        for (path, e) in errors {
            if e.is_null() {
                if !self.errors.remove(&path) {
                    continue; // nothing to remove
                }
            } else {
                self.errors.insert(path.clone());
            }
            node.insert(path, e);
        }
        if !node.is_empty() {
            let mut fragment = Map::new();
            insert(&mut fragment, &self.setup.binding.errors_key, Json::Object(node));
            merge(&mut job.reported, fragment);
        }
    }

    fn settle(&mut self, settled: Vec<(String, Applied)>, out: &mut Vec<Action>) {
        if settled.is_empty() {
            return;
        }
        for (path, a) in &settled {
            self.desired.insert(path.clone(), a.clone());
        }
        out.push(Action::Record(vec![Op::DesiredApplied { shadow: self.setup.key.clone(), applied: settled }]));
    }

    fn finish(&mut self, mut job: Job, out: &mut Vec<Action>) {
        if job.kind == Kind::Get {
            // Reasons of paths the delta no longer holds: what desired asks
            // now is what the device holds, or it was withdrawn.
            let gone: BTreeMap<String, Json> = self.errors.iter().filter(|p| !job.paths.contains(*p)).map(|p| (p.clone(), Json::Null)).collect();
            self.explain(&mut job, gone);
            let fragment = std::mem::take(&mut job.reported);
            self.report_everything(fragment, out);
        } else if !job.reported.is_empty() {
            let fragment = std::mem::take(&mut job.reported);
            self.report(Json::Object(fragment), out);
        }
        if !job.complete {
            self.unresolved = true;
            return;
        }
        if job.kind == Kind::Get {
            self.unresolved = false;
        } else if self.unresolved {
            return;
        }
        if let Some(v) = job.version.filter(|v| self.applied_version.is_none_or(|a| *v > a)) {
            self.applied_version = Some(v);
            self.count_version("applied");
            out.push(Action::Record(vec![Op::ShadowVersion { shadow: self.setup.key.clone(), version: v }]));
        }
    }

    /// Counts a desired-state version by what became of it: `applied`, or
    /// skipped as `repeated` (already applied) or `stale` (below the one
    /// applied). A counter has no effect on the decisions.
    fn count_version(&self, outcome: &'static str) {
        metrics::counter!("twinbus_shadow_versions_total", "shadow" => self.prefix.clone(), "outcome" => outcome).increment(1);
    }

    // ---- Reports ------------------------------------------------------------------

    /// After a restart, `reported.command` still lists earlier commands: keep
    /// counting them, oldest first, so the list stays pruned.
    fn seed_listed(&mut self, reported: &Json) {
        let Json::Object(m) = reported else { return };
        let mut ids: Vec<(u64, &String)> = m.iter().map(|(id, st)| (st["time"].as_u64().unwrap_or(0), id)).collect();
        ids.sort();
        for (_, id) in ids {
            if !self.listed.contains(id) {
                self.listed.push_back(id.clone());
            }
        }
    }

    /// Reports every readable value of this shadow, `connected`, `online`,
    /// commands a crash cut off, and `extra`.
    fn report_everything(&mut self, extra: Map<String, Json>, out: &mut Vec<Action>) {
        let mut reported = Map::new();
        let mut commands = Map::new();
        for id in std::mem::take(&mut self.interrupted) {
            tracing::warn!(shadow = %self.prefix, %id, "a command was cut off when the gateway stopped: reporting FAILURE (interrupted), not running it again");
            commands.insert(
                id.clone(),
                failure("interrupted: the gateway stopped while it ran (a crash or power loss); its outcome is unknown, and it was not run again".into()),
            );
            self.finished.push(Op::ShadowCommand { shadow: self.setup.key.clone(), id: id.clone(), at_ms: now_ms(), state: CommandState::Done });
            self.listed.push_back(id);
        }
        if !commands.is_empty() {
            reported.insert("command".into(), Json::Object(commands));
        }
        if let Some(snap) = self.last.clone() {
            let all = vec![true; self.setup.points.len()];
            self.reported.take_changes(&self.setup.points, &snap.values);
            self.add_values(&mut reported, &snap.values, &all);
            if snap.health != Health::Unknown {
                reported.insert("online".into(), json!(snap.health == Health::Online));
            }
        }
        reported.insert("connected".into(), json!(true));
        merge(&mut reported, extra);
        self.report(Json::Object(reported), out);
    }

    fn on_snapshot(&mut self, snap: Arc<Snapshot>, now: Instant, out: &mut Vec<Action>) {
        self.last = Some(snap.clone());
        if snap.health == Health::Unknown {
            return;
        }
        let mut reported = Map::new();
        if snap.health != self.health {
            reported.insert("online".into(), json!(snap.health == Health::Online));
            let back = matches!(self.health, Health::Offline(_)) && snap.health == Health::Online;
            self.health = snap.health.clone();
            if back {
                // Desired values that failed while it was away are applied now.
                self.sync(now, out);
            }
        }
        if snap.health == Health::Online {
            let moved = self.reported.take_changes(&self.setup.points, &snap.values);
            self.add_values(&mut reported, &snap.values, &moved);
        }
        if !reported.is_empty() {
            self.report(Json::Object(reported), out);
        }
    }

    fn add_values(&self, reported: &mut Map<String, Json>, values: &[Option<Value>], include: &[bool]) {
        for &i in &self.setup.mine {
            let (Some(p), Some(true), Some(Some(v))) = (self.setup.points.get(i), include.get(i), values.get(i)) else { continue };
            if p.access.readable() {
                insert(reported, &p.path, to_json(v));
            }
        }
    }

    /// Publishes `{"state":{"reported": ...}}` with the records of finished
    /// commands. A report of values alone may join one still waiting on the
    /// topic when the connection is at its publish limit; one that carries a
    /// command's state or a reason never does (a refused join would lose it).
    fn report(&mut self, reported: Json, out: &mut Vec<Action>) {
        let Json::Object(reported) = reported else { return };
        if let Some(retry) = &mut self.retry {
            prune(&mut retry.report, &reported);
        }
        let errors_root = self.setup.binding.errors_key.split('.').next().unwrap_or_default().to_string();
        let plain = !reported.contains_key("command") && !reported.contains_key(&errors_root);
        let state = json!({"reported": Json::Object(reported.clone())}).to_string().len();
        let records = std::mem::take(&mut self.finished);
        if state > MAX_DOCUMENT {
            // `twinbus check` sizes every shadow to fit; only a value far
            // wider than its type allows gets here.
            tracing::error!(shadow = %self.prefix, bytes = state, "a report exceeds the 8 KB shadow limit: not sent");
            if !records.is_empty() {
                out.push(Action::Record(records));
            }
            return;
        }
        let token = self.token(Some(&reported));
        let doc = json!({"state": {"reported": Json::Object(reported)}, "clientToken": token});
        let mut publish = Publish::new(Class::Report, format!("{}/update", self.prefix), doc.to_string().into_bytes()).recording(records);
        if plain {
            publish = publish.coalescing(Coalesce::Merge);
        }
        out.push(Action::Publish(publish));
    }
}

fn failure(reason: String) -> Json {
    json!({"state": "FAILURE", "reason": short_reason(&reason), "time": now_ms()})
}

/// Rejections that may succeed when asked again: throttling and the
/// service's own failures. 400, 413 and the like would fail the same way.
fn retryable(code: u64) -> bool {
    code == 429 || code >= 500
}

#[cfg(test)]
mod tests;
