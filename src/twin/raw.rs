//! The raw command adapter task: one per device with a commands topic.
//!
//! Commands for one device are executed one after the other, in arrival
//! order. Each gets exactly one answer (plus the optional early
//! `acknowledged`). A repeated id (an MQTT redelivery, a retrying cloud) is
//! not executed again: it gets the answer of the first execution.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::command::{answer, check_get, check_set, parse, summary, Request, Status};
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
    let (queue_tx, queue) = mpsc::channel(QUEUED_COMMANDS);
    tokio::join!(
        receive(inbox, queue_tx, &device.name, &responses, &conn, &stop),
        work_through(queue, &twin, &device, &responses, &conn, &stop, &shutdown),
    );
}

async fn receive(
    mut inbox: mpsc::Receiver<Message>,
    queue: mpsc::Sender<Message>,
    device: &str,
    responses: &str,
    conn: &ConnectionHandle,
    stop: &CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            m = inbox.recv() => match m { Some(m) => m, None => break },
        };
        match queue.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                metrics::counter!("twinbus_commands_busy_total", "device" => device.to_string()).increment(1);
                tracing::warn!(device = %device, waiting = QUEUED_COMMANDS, "command rejected: the device is busy");
                let why = format!("busy: {QUEUED_COMMANDS} commands are already waiting for this device; nothing was written, try again later");
                refuse(&msg, why, responses, conn).await;
            }
            Err(mpsc::error::TrySendError::Closed(msg)) => {
                refuse(&msg, "the gateway is shutting down".into(), responses, conn).await;
            }
        }
    }
    inbox.close();
    while let Some(msg) = inbox.recv().await {
        refuse(&msg, "the gateway is shutting down".into(), responses, conn).await;
    }
}

async fn work_through(
    mut queue: mpsc::Receiver<Message>,
    twin: &Twin,
    device: &DeviceHandle,
    responses: &str,
    conn: &ConnectionHandle,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) {
    let mut answered: VecDeque<(Json, Vec<u8>)> = VecDeque::new();
    loop {
        let msg = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            m = queue.recv() => match m { Some(m) => m, None => break },
        };
        let reply = ReplyTo::of(&msg, responses);
        let cmd = parse(&msg.payload);
        let id = cmd.id.clone();
        if let Some(id) = &id {
            if let Some((_, previous)) = answered.iter().find(|(seen, _)| seen == id) {
                tracing::info!(device = %device.name, id = %id, "duplicate command id: answering again, not executing");
                reply.send(conn, previous.clone()).await;
                continue;
            }
        }
        let request = match cmd.request {
            Ok(r) => r,
            Err(why) => {
                tracing::info!(device = %device.name, reason = %why, "command rejected");
                let doc = answer(id.as_ref(), &Status::Rejected(why), &[], &BTreeMap::new(), now_ms());
                reply.send(conn, doc.to_string().into_bytes()).await;
                continue;
            }
        };
        if twin.acknowledge {
            let ack = answer(id.as_ref(), &Status::Acknowledged, &[], &BTreeMap::new(), now_ms());
            reply.send(conn, ack.to_string().into_bytes()).await;
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
            answered.push_back((id, bytes.clone()));
            if answered.len() > REMEMBERED_IDS {
                answered.pop_front();
            }
        }
        reply.send(conn, bytes).await;
        if is_shutdown && twin.allow_shutdown {
            tracing::info!(device = %device.name, "shutdown requested by a remote command");
            shutdown.cancel();
        }
    }
    queue.close();
    while let Some(msg) = queue.recv().await {
        refuse(&msg, "the gateway is shutting down".into(), responses, conn).await;
    }
}

/// Answers `rejected` without executing anything.
async fn refuse(msg: &Message, why: String, responses: &str, conn: &ConnectionHandle) {
    let id = parse(&msg.payload).id;
    let doc = answer(id.as_ref(), &Status::Rejected(why), &[], &BTreeMap::new(), now_ms());
    ReplyTo::of(msg, responses).send(conn, doc.to_string().into_bytes()).await;
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

