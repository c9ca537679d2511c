//! The raw command adapter task: one per device with a commands topic.
//!
//! Commands for one device are executed one after the other, in arrival
//! order. Each gets exactly one answer (plus the optional early
//! `acknowledged`). A repeated id (an MQTT redelivery, a retrying cloud) is
//! not executed again: it gets the answer of the first execution.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::command::{answer, check_get, check_set, parse, summary, too_large, Command, Request, Status};
use super::now_ms;
use crate::config::Twin;
use crate::device::{DeviceHandle, Outcome};
use crate::mqtt::{ConnectionHandle, Message, Properties};

/// How many answered ids each device remembers, to recognise duplicates.
const REMEMBERED_IDS: usize = 256;

/// Commands that may wait for one device. Past that a command is answered
/// `rejected` (busy) at once rather than dropped: the cloud always hears back,
/// and a flood cannot keep a device busy for minutes with stale work.
const QUEUED_COMMANDS: usize = 32;

/// Serves the commands topic of one device until `stop` fires; then answers
/// what is still queued with a refusal. `shutdown` is fired by an allowed
/// `{"shutdown": true}`.
pub async fn run_commands(
    twin: Twin,
    device: DeviceHandle,
    conn: ConnectionHandle,
    inbox: mpsc::Receiver<Message>,
    stop: CancellationToken,
    shutdown: CancellationToken,
) {
    let Some(responses) = twin.responses.clone() else { return };
    // Two halves in one task: the receiving half never waits on the device, so
    // the connection's inbox for this topic cannot fill up and lose a command.
    // They share the id bookkeeping: one task, so the lock is never
    // contended, and it is never held across an await.
    let (queue_tx, queue) = mpsc::channel(QUEUED_COMMANDS);
    let ids = Mutex::new(Ids::default());
    let adapter = Adapter { device: &device, responses: &responses, conn: &conn, ids: &ids };
    tokio::join!(receive(inbox, queue_tx, &adapter, &stop), work_through(queue, &twin, &adapter, &stop, &shutdown));
}

/// What both halves need.
struct Adapter<'a> {
    device: &'a DeviceHandle,
    responses: &'a str,
    conn: &'a ConnectionHandle,
    ids: &'a Mutex<Ids>,
}

impl Adapter<'_> {
    fn ids(&self) -> std::sync::MutexGuard<'_, Ids> {
        // A poisoned lock only means a panic elsewhere; the ids are still usable.
        self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A command on its way from the receiving half to the executing half.
struct Queued {
    msg: Message,
    cmd: Command,
}

/// Ids of commands queued and answered, to recognise a repeated id.
#[derive(Default)]
struct Ids {
    /// Queued, not answered yet (a repeat may be queued too: listed twice).
    waiting: Vec<Json>,
    /// The last answers, oldest first.
    answered: VecDeque<(Json, Vec<u8>)>,
}

impl Ids {
    fn answer_of(&self, id: &Json) -> Option<Vec<u8>> {
        self.answered.iter().find(|(seen, _)| seen == id).map(|(_, a)| a.clone())
    }

    /// One queued copy of `id` has been taken care of.
    fn unwait(&mut self, id: &Json) {
        if let Some(i) = self.waiting.iter().position(|w| w == id) {
            self.waiting.remove(i);
        }
    }

    fn done(&mut self, id: Json, answer: Vec<u8>) {
        self.unwait(&id);
        self.answered.push_back((id, answer));
        if self.answered.len() > REMEMBERED_IDS {
            self.answered.pop_front();
        }
    }
}

async fn receive(mut inbox: mpsc::Receiver<Message>, queue: mpsc::Sender<Queued>, a: &Adapter<'_>, stop: &CancellationToken) {
    loop {
        let msg = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            m = inbox.recv() => match m { Some(m) => m, None => break },
        };
        let cmd = command_of(&msg);
        let id = cmd.id.clone();
        match queue.try_send(Queued { msg, cmd }) {
            Ok(()) => a.ids().waiting.extend(id),
            Err(mpsc::error::TrySendError::Full(Queued { msg, cmd })) => {
                // A repeat of a command already answered or still waiting is
                // not "busy": it gets (or will get) the first one's answer.
                let previous = cmd.id.as_ref().map(|id| {
                    let ids = a.ids();
                    (ids.answer_of(id), ids.waiting.contains(id))
                });
                match previous {
                    Some((Some(answer), _)) => ReplyTo::of(&msg, a.responses).send(a.conn, answer).await,
                    Some((None, true)) => tracing::info!(device = %a.device.name, "repeated command id while the first is still waiting: it will answer"),
                    _ => {
                        metrics::counter!("twinbus_commands_busy_total", "device" => a.device.name.clone()).increment(1);
                        tracing::warn!(device = %a.device.name, waiting = QUEUED_COMMANDS, "command rejected: the device is busy");
                        let why = format!("busy: {QUEUED_COMMANDS} commands are already waiting for this device; nothing was written, try again later");
                        refuse(&msg, cmd.id.as_ref(), why, a).await;
                    }
                }
            }
            Err(mpsc::error::TrySendError::Closed(Queued { msg, cmd })) => {
                refuse(&msg, cmd.id.as_ref(), "the gateway is shutting down".into(), a).await;
            }
        }
    }
    inbox.close();
    while let Some(msg) = inbox.recv().await {
        refuse(&msg, command_of(&msg).id.as_ref(), "the gateway is shutting down".into(), a).await;
    }
}

async fn work_through(mut queue: mpsc::Receiver<Queued>, twin: &Twin, a: &Adapter<'_>, stop: &CancellationToken, shutdown: &CancellationToken) {
    let device = a.device;
    loop {
        let Queued { msg, cmd } = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            m = queue.recv() => match m { Some(m) => m, None => break },
        };
        let reply = ReplyTo::of(&msg, a.responses);
        let id = cmd.id.clone();
        if let Some(id) = &id {
            let previous = a.ids().answer_of(id);
            if let Some(previous) = previous {
                tracing::info!(device = %device.name, id = %id, "duplicate command id: answering again, not executing");
                // Answered already: not remembered twice, which would push out another id.
                a.ids().unwait(id);
                reply.send(a.conn, previous).await;
                continue;
            }
        }
        let request = match cmd.request {
            Ok(r) => r,
            Err(why) => {
                tracing::info!(device = %device.name, reason = %why, "command rejected");
                let doc = answer(id.as_ref(), &Status::Rejected(why), &[], &BTreeMap::new(), now_ms());
                let bytes = doc.to_string().into_bytes();
                if let Some(id) = id {
                    a.ids().done(id, bytes.clone());
                }
                reply.send(a.conn, bytes).await;
                continue;
            }
        };
        if twin.acknowledge {
            let ack = answer(id.as_ref(), &Status::Acknowledged, &[], &BTreeMap::new(), now_ms());
            reply.send(a.conn, ack.to_string().into_bytes()).await;
        }
        let is_shutdown = request == Request::Shutdown;
        let kind = request.kind();
        let started = std::time::Instant::now();
        let doc = execute(twin, device, request, id.as_ref()).await;
        tracing::info!(
            device = %device.name,
            id = %id.as_ref().map_or_else(|| "-".to_string(), |i| i.to_string()),
            status = %doc["status"].as_str().unwrap_or("?"),
            ms = started.elapsed().as_millis() as u64,
            error = %doc["error"].as_str().unwrap_or(""),
            "command {kind}"
        );
        let bytes = doc.to_string().into_bytes();
        if let Some(id) = id {
            a.ids().done(id, bytes.clone());
        }
        reply.send(a.conn, bytes).await;
        if is_shutdown && twin.allow_shutdown {
            tracing::info!(device = %device.name, "shutdown requested by a remote command");
            shutdown.cancel();
        }
    }
    queue.close();
    while let Some(Queued { msg, cmd }) = queue.recv().await {
        refuse(&msg, cmd.id.as_ref(), "the gateway is shutting down".into(), a).await;
    }
}

/// The command a message carries; one too large to be read is refused by size.
fn command_of(msg: &Message) -> Command {
    match msg.oversized {
        Some(bytes) => too_large(bytes),
        None => parse(&msg.payload),
    }
}

/// Answers `rejected` without executing anything.
async fn refuse(msg: &Message, id: Option<&Json>, why: String, a: &Adapter<'_>) {
    let doc = answer(id, &Status::Rejected(why), &[], &BTreeMap::new(), now_ms());
    ReplyTo::of(msg, a.responses).send(a.conn, doc.to_string().into_bytes()).await;
}

async fn execute(twin: &Twin, device: &DeviceHandle, request: Request, id: Option<&Json>) -> Json {
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

/// Where an answer goes: the MQTT 5 response topic when the command named
/// one (with its correlation data and user properties echoed), else the
/// twin's responses topic.
struct ReplyTo {
    topic: String,
    properties: Option<Properties>,
}

impl ReplyTo {
    fn of(msg: &Message, responses: &str) -> ReplyTo {
        match &msg.properties {
            Some(p) => ReplyTo {
                topic: p.response_topic.clone().filter(|t| !t.is_empty() && !t.contains(['+', '#'])).unwrap_or_else(|| responses.to_string()),
                properties: Some(Properties { response_topic: None, ..p.clone() }),
            },
            None => ReplyTo { topic: responses.to_string(), properties: None },
        }
    }

    async fn send(&self, conn: &ConnectionHandle, payload: Vec<u8>) {
        match &self.properties {
            Some(p) => conn.publish_reply(&self.topic, payload, p.clone()).await,
            None => conn.publish(&self.topic, payload).await,
        }
    }
}

