//! The raw command adapter: one per device with a commands topic.
//!
//! Two halves. The [`RawInbox`] is what the connection hands each message to,
//! from its own task, without ever waiting: it parses the command, answers a
//! repeated id at once with the first answer, and queues the rest for the
//! device; when the device already has [`QUEUED_COMMANDS`] waiting, it
//! answers `rejected` ("busy") at once. The worker ([`run_commands`])
//! executes queued commands one after the other, in arrival order. Every
//! command gets exactly one answer (plus the optional early `acknowledged`).
//!
//! Ids are kept in the store with their answers (the last 10,000 per device,
//! for at most 24 hours), so a repeated id is answered, not executed, also
//! after a restart. A `set` is recorded as started before its first write:
//! one that a crash cut off is answered `failed` ("interrupted") when the
//! gateway starts again, and never run a second time. Ids are compared by
//! their exact JSON text.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::command::{answer, check_get, check_set, parse, render, summary, too_large, Command, Request, Status};
use super::now_ms;
use crate::config::Twin;
use crate::device::{DeviceHandle, Outcome};
use crate::mqtt::{decode_publish, encode_publish, topic_matches, valid_topic, Class, ConnectionHandle, Inbox, Message, Properties, Publish};
use crate::store::{CommandState, Op, Store};

/// Commands that may wait for one device. Past that a command is answered
/// `rejected` (busy) at once rather than dropped: the cloud always hears back,
/// and a flood cannot keep a device busy for minutes with stale work.
const QUEUED_COMMANDS: usize = 32;

/// Answers kept in memory for repeated ids (the store has them too, but only
/// once their commit is done).
const RECENT_ANSWERS: usize = 256;
/// Ids kept in the store per device, and for how long.
const KEPT_IDS: usize = 10_000;
const KEPT_IDS_MS: u64 = 24 * 3600 * 1000;
/// Answers between two prunings of the stored ids.
const PRUNE_EVERY: u64 = 1000;

const INTERRUPTED: &str = "interrupted: the gateway stopped while this command ran (a crash or power loss); its outcome is unknown and it was not run again: read the device's values to see what it holds";
const SHUTTING_DOWN: &str = "the gateway is shutting down, or a reload is restarting this device; nothing was written: send the command again in a moment";

/// The receiving half: see the module docs.
#[derive(Debug)]
pub struct RawInbox {
    shared: Arc<Shared>,
    queue: mpsc::Sender<Queued>,
}

/// The executing half, run by [`run_commands`].
#[derive(Debug)]
pub struct RawWorker {
    shared: Arc<Shared>,
    queue: mpsc::Receiver<Queued>,
    /// Answers for commands a previous run left unfinished, sent first.
    interrupted: Vec<Publish>,
}

#[derive(Debug)]
struct Shared {
    device: String,
    responses: String,
    /// Filters an MQTT 5 Response Topic must fall under.
    response_topics: Vec<String>,
    store: Store,
    ids: Mutex<Ids>,
}

/// A command on its way from the inbox to the worker.
#[derive(Debug)]
struct Queued {
    cmd: Command,
    reply: ReplyTo,
}

#[derive(Debug, Default)]
struct Ids {
    /// Ids queued and not answered yet, with how many copies are queued.
    waiting: HashMap<String, usize>,
    /// The last answers handed to the connection, oldest first.
    recent: VecDeque<(String, Vec<u8>)>,
    /// The worker has stopped: new commands are refused.
    stopped: bool,
}

impl Shared {
    fn ids(&self) -> std::sync::MutexGuard<'_, Ids> {
        // A poisoned lock only means a panic elsewhere; the ids are still usable.
        self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The answer already given to `id`, from memory or from the store.
    fn answer_of(&self, id: &str) -> Option<Vec<u8>> {
        if let Some((_, a)) = self.ids().recent.iter().rev().find(|(seen, _)| seen == id) {
            return Some(a.clone());
        }
        match self.store.raw_command(&self.device, id) {
            Ok(Some((_, CommandState::Done, record))) => decode_publish(&record).map(|p| p.payload.to_vec()),
            Ok(_) => None,
            Err(e) => {
                tracing::error!(device = %self.device, "cannot read answered command ids from the store: {e:#}");
                None
            }
        }
    }

    fn answered(&self, id: &str, answer: &[u8]) {
        let mut ids = self.ids();
        unwait(&mut ids.waiting, id);
        ids.recent.push_back((id.to_string(), answer.to_vec()));
        if ids.recent.len() > RECENT_ANSWERS {
            ids.recent.pop_front();
        }
    }
}

fn unwait(waiting: &mut HashMap<String, usize>, id: &str) {
    if let Some(n) = waiting.get_mut(id) {
        *n -= 1;
        if *n == 0 {
            waiting.remove(id);
        }
    }
}

/// Builds the two halves for a device with a commands topic; `None` when the
/// twin has no responses topic (validation requires one). Commands a previous
/// run left unfinished are found here, before any message can arrive, so a
/// repeat of one is answered "interrupted" too.
///
/// `recover` is false when this process already ran an adapter for the
/// device (a reload restarts it): that one recovered what a crash left, and
/// may still be finishing a command recorded as started, which is not
/// interrupted.
pub fn raw_adapter(twin: &Twin, device: &str, store: Store, recover_unfinished: bool) -> Option<(Arc<RawInbox>, RawWorker)> {
    let responses = twin.responses.clone()?;
    let shared = Arc::new(Shared { device: device.to_string(), responses, response_topics: twin.response_topics.clone(), store, ids: Mutex::new(Ids::default()) });
    let interrupted = if recover_unfinished { recover(&shared) } else { Vec::new() };
    let (queue_tx, queue) = mpsc::channel(QUEUED_COMMANDS);
    Some((Arc::new(RawInbox { shared: shared.clone(), queue: queue_tx }), RawWorker { shared, queue, interrupted }))
}

/// Answers for the commands recorded as started and never finished.
fn recover(shared: &Shared) -> Vec<Publish> {
    let started = match shared.store.raw_commands_started(&shared.device) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(device = %shared.device, "cannot read unfinished commands from the store: {e:#}");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for (id, record) in started {
        let Some(route) = decode_publish(&record) else { continue };
        let id_json: Option<Json> = serde_json::from_str(&id).ok();
        let doc = answer(id_json.as_ref(), &Status::Failed(INTERRUPTED.to_string()), &[], &BTreeMap::new(), now_ms());
        let bytes = render(&doc, Some(&id));
        tracing::warn!(device = %shared.device, %id, "a command was cut off when the gateway stopped: answering it `failed` (interrupted), not running it again");
        shared.answered(&id, &bytes);
        let reply = ReplyTo { topic: route.topic, properties: route.properties };
        out.push(reply.publish(bytes.clone()).recording(vec![done(shared, &id, &reply, &bytes)]));
    }
    out
}

/// The store record "command `id` answered `bytes`".
fn done(shared: &Shared, id: &str, reply: &ReplyTo, bytes: &[u8]) -> Op {
    Op::RawCommand {
        device: shared.device.clone(),
        id: id.to_string(),
        at_ms: now_ms(),
        state: CommandState::Done,
        record: encode_publish(&reply.publish(bytes.to_vec())),
    }
}

impl Inbox for RawInbox {
    fn offer(&self, msg: Message) -> Vec<Publish> {
        let cmd = command_of(&msg);
        let device = &self.shared.device;
        let reply = match ReplyTo::of(&msg, &self.shared.responses, &self.shared.response_topics) {
            Ok(reply) => reply,
            Err(refused) => {
                let (fallback, why) = *refused;
                tracing::warn!(%device, "command refused: {why}");
                metrics::counter!("twinbus_commands_total", "device" => device.clone(), "outcome" => "rejected").increment(1);
                return vec![refusal(&cmd, &fallback, why)];
            }
        };
        if let Some(id) = &cmd.id_text {
            if let Some(previous) = self.shared.answer_of(id) {
                tracing::info!(%device, %id, "repeated command id: answering again, not executing");
                metrics::counter!("twinbus_commands_total", "device" => device.clone(), "outcome" => "repeated").increment(1);
                return vec![reply.publish(previous)];
            }
            if self.shared.ids().waiting.contains_key(id) {
                // Not "busy": the first copy is queued and will answer.
                tracing::info!(%device, %id, "repeated command id while the first is still waiting: it will answer");
                return Vec::new();
            }
        }
        if self.shared.ids().stopped {
            return vec![refusal(&cmd, &reply, SHUTTING_DOWN.to_string())];
        }
        let id = cmd.id_text.clone();
        let refused = match self.queue.try_send(Queued { cmd, reply }) {
            Ok(()) => {
                if let Some(id) = id {
                    *self.shared.ids().waiting.entry(id).or_insert(0) += 1;
                }
                return Vec::new();
            }
            Err(mpsc::error::TrySendError::Full(q)) => {
                metrics::counter!("twinbus_commands_total", "device" => device.clone(), "outcome" => "busy").increment(1);
                tracing::warn!(%device, waiting = QUEUED_COMMANDS, "command rejected: the device is busy");
                let why = format!("busy: {QUEUED_COMMANDS} commands are already waiting for this device; nothing was written, try again later");
                refusal(&q.cmd, &q.reply, why)
            }
            Err(mpsc::error::TrySendError::Closed(q)) => refusal(&q.cmd, &q.reply, SHUTTING_DOWN.to_string()),
        };
        vec![refused]
    }
}

/// The command in a message; one too large to be read at all is refused by
/// its size alone (the link skipped it unread: see `mqtt::Message`).
fn command_of(msg: &Message) -> Command {
    match msg.oversized {
        Some(bytes) => too_large(bytes),
        None => parse(&msg.payload),
    }
}

/// `rejected` without executing anything, and without remembering the id:
/// the same id sent again later is a new attempt.
fn refusal(cmd: &Command, reply: &ReplyTo, why: String) -> Publish {
    let doc = answer(cmd.id.as_ref(), &Status::Rejected(why), &[], &BTreeMap::new(), now_ms());
    reply.publish(render(&doc, cmd.id_text.as_deref()))
}

/// Executes queued commands until `stop` fires; then refuses what is still
/// queued. `shutdown` is fired by an allowed `{"shutdown": true}`.
pub async fn run_commands(
    twin: Twin,
    worker: RawWorker,
    device: DeviceHandle,
    conn: ConnectionHandle,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let RawWorker { shared, mut queue, interrupted } = worker;
    for p in interrupted {
        conn.send(p).await;
    }
    let mut answers: u64 = 0;
    prune(&shared);
    loop {
        let Queued { cmd, reply } = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            m = queue.recv() => match m { Some(m) => m, None => break },
        };
        let is_shutdown = cmd.request.as_ref().is_ok_and(|r| *r == Request::Shutdown);
        let publish = execute(&twin, &shared, &device, &conn, cmd, &reply).await;
        conn.send(publish).await;
        answers += 1;
        if answers.is_multiple_of(PRUNE_EVERY) {
            prune(&shared);
        }
        if is_shutdown && twin.allow_shutdown {
            tracing::info!(device = %device.name, "shutdown requested by a remote command");
            shutdown.cancel();
        }
    }
    shared.ids().stopped = true;
    queue.close();
    while let Some(Queued { cmd, reply }) = queue.recv().await {
        if let Some(id) = &cmd.id_text {
            unwait(&mut shared.ids().waiting, id);
        }
        conn.send(refusal(&cmd, &reply, SHUTTING_DOWN.to_string())).await;
    }
}

fn prune(shared: &Shared) {
    let before_ms = now_ms().saturating_sub(KEPT_IDS_MS);
    shared.store.submit_detached(vec![Op::PruneRawCommands { device: shared.device.clone(), keep: KEPT_IDS, before_ms }]);
}

/// Runs one command; returns its answer, with the store record that marks
/// its id answered.
async fn execute(twin: &Twin, shared: &Shared, device: &DeviceHandle, conn: &ConnectionHandle, cmd: Command, reply: &ReplyTo) -> Publish {
    let Command { id, id_text, request } = cmd;
    let started = std::time::Instant::now();
    let doc = match request {
        Err(why) => {
            tracing::info!(device = %device.name, reason = %why, "command rejected");
            answer(id.as_ref(), &Status::Rejected(why), &[], &BTreeMap::new(), now_ms())
        }
        Ok(request) => {
            if twin.acknowledge {
                let ack = answer(id.as_ref(), &Status::Acknowledged, &[], &BTreeMap::new(), now_ms());
                conn.send(reply.publish(render(&ack, id_text.as_deref()))).await;
            }
            let kind = request.kind();
            let doc = match (&request, &id_text) {
                // Recorded before the first write, so that a crash in the
                // middle is answered "interrupted" and never run twice.
                (Request::Set(_), Some(text)) => {
                    let op = Op::RawCommand {
                        device: shared.device.clone(),
                        id: text.clone(),
                        at_ms: now_ms(),
                        state: CommandState::Started,
                        record: encode_publish(&reply.publish(Vec::new())),
                    };
                    match shared.store.apply(vec![op]).await {
                        Ok(()) => run(twin, device, request, id.as_ref()).await,
                        Err(e) => {
                            tracing::error!(device = %device.name, "cannot record a command before running it: {e:#}; not running it");
                            let why = format!("the gateway cannot record the command, so it cannot promise to run it only once; nothing was written ({e:#})");
                            answer(id.as_ref(), &Status::Failed(why), &[], &BTreeMap::new(), now_ms())
                        }
                    }
                }
                _ => run(twin, device, request, id.as_ref()).await,
            };
            tracing::info!(
                device = %device.name,
                id = %id_text.as_deref().unwrap_or("-"),
                status = %doc["status"].as_str().unwrap_or("?"),
                ms = started.elapsed().as_millis() as u64,
                error = %doc["error"].as_str().unwrap_or(""),
                "command {kind}"
            );
            doc
        }
    };
    let outcome = doc["status"].as_str().unwrap_or("unknown").to_string();
    metrics::counter!("twinbus_commands_total", "device" => device.name.clone(), "outcome" => outcome).increment(1);
    let bytes = render(&doc, id_text.as_deref());
    let mut publish = reply.publish(bytes.clone());
    if let Some(text) = &id_text {
        shared.answered(text, &bytes);
        publish = publish.recording(vec![done(shared, text, reply, &bytes)]);
    }
    publish
}

async fn run(twin: &Twin, device: &DeviceHandle, request: Request, id: Option<&Json>) -> Json {
    let points = &device.points;
    let no_errors = BTreeMap::new();
    let outcome = match request {
        Request::Shutdown if twin.allow_shutdown => {
            return answer(id, &Status::Succeeded, &[], &no_errors, now_ms());
        }
        Request::Shutdown => {
            let why = "remote shutdown is not allowed for this twin (set `allow_shutdown: true` in gateway.yaml)";
            return answer(id, &Status::Rejected(why.into()), &[], &no_errors, now_ms());
        }
        Request::Set(leaves) => match check_set(points, &leaves) {
            Ok(writes) => device.write(writes).await,
            Err(errors) => return answer(id, &Status::Rejected(summary(&errors)), &[], &errors, now_ms()),
        },
        Request::Get(paths) => match check_get(points, paths.as_deref()) {
            Ok(indices) => device.read(indices).await,
            Err(errors) => {
                let why = summary(&errors).replace("nothing was written", "nothing was read");
                return answer(id, &Status::Rejected(why), &[], &errors, now_ms());
            }
        },
    };
    outcome_answer(device, &outcome, id)
}

fn outcome_answer(device: &DeviceHandle, outcome: &Outcome, id: Option<&Json>) -> Json {
    let values: Vec<(&str, &crate::point::Value)> = outcome.values.iter().map(|(i, v)| (device.points[*i].path.as_str(), v)).collect();
    let status = match &outcome.error {
        None => Status::Succeeded,
        Some(e) => Status::Failed(e.clone()),
    };
    answer(id, &status, &values, &BTreeMap::new(), now_ms())
}

/// Where an answer goes: the MQTT 5 Response Topic when the command named
/// one that the twin's `response_topics` allow (with its correlation data and
/// user properties echoed), else the twin's responses topic. A Response Topic
/// outside the list is refused: it could name another device's command topic.
#[derive(Clone, Debug)]
struct ReplyTo {
    topic: String,
    properties: Option<Properties>,
}

impl ReplyTo {
    fn of(msg: &Message, responses: &str, allowed: &[String]) -> Result<ReplyTo, Box<(ReplyTo, String)>> {
        let Some(p) = &msg.properties else {
            return Ok(ReplyTo { topic: responses.to_string(), properties: None });
        };
        let properties = Some(Properties { response_topic: None, ..p.clone() });
        match p.response_topic.as_deref() {
            None | Some("") => Ok(ReplyTo { topic: responses.to_string(), properties }),
            Some(t) if valid_topic(t) && allowed.iter().any(|f| topic_matches(f, t)) => Ok(ReplyTo { topic: t.to_string(), properties }),
            Some(t) => {
                let shown: String = t.chars().flat_map(char::escape_debug).take(200).collect();
                let why = format!(
                    "the MQTT 5 response topic \"{shown}\" is not one this twin answers on (allowed: {}; set `response_topics` in gateway.yaml); nothing was executed",
                    allowed.join(", ")
                );
                Err(Box::new((ReplyTo { topic: responses.to_string(), properties }, why)))
            }
        }
    }

    fn publish(&self, payload: Vec<u8>) -> Publish {
        Publish::new(Class::Answer, self.topic.clone(), payload).with_properties(self.properties.clone())
    }
}
