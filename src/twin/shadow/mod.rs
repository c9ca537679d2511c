//! The AWS IoT device shadow adapter: one task per shadow a device is bound to.
//!
//! On every (re)connect, once the subscriptions are granted, it asks for the
//! shadow (`get`), applies its `state.delta`, and reports what the device
//! actually holds; while connected it applies each `update/delta`. Desired
//! values are checked like raw commands (known, writable, type, labels,
//! limits); refused ones are not written and are explained under
//! `reported.<errors_key>` until desired no longer asks for them. What is
//! written is read back, and the read-back is reported. `desired.command`
//! may hold an array of commands (`relay-command` is built in, the rest are
//! the device's named commands); each runs at most once, across restarts,
//! and not at all once older than its `ttl` on the service's clock.
//!
//! Every decision is made by [`core::Core`], a state machine without I/O
//! with its own unit tests; this file is its shell: it feeds it messages,
//! device snapshots, the results of what it asked and its timer, and carries
//! out what it returns (publish, record in the store, write to the device,
//! run a command), one thing at a time, in order.

mod clock;
mod core;
pub(crate) mod doc;

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::core::{Action, Core, Input, Remembered, Setup, Work};
use crate::config::{CommandDef, ShadowBinding};
use crate::device::DeviceHandle;
use crate::journal::{Entry, Source};
use crate::mqtt::{ConnectionHandle, Inbox, Message, Publish};
use crate::store::Store;

/// The decisions of one shadow adapter for a sequence of messages, without
/// I/O, for the fuzz target and its corpus replay (which check every write
/// against the points' limits); not an API. `messages` are (topic suffix,
/// payload): `/update/delta`, `/get/accepted` (the adapter's first `get`
/// carries the client token `fuzz-1`), ... The device's first shadow serves
/// them; every write lands and reads back as written; every command runs
/// and succeeds. Returns the writes asked for, in order, or an error when
/// the adapter keeps asking for work without settling (a loop).
#[doc(hidden)]
pub fn replay(device: &crate::config::Device, messages: &[(&str, &[u8])]) -> Result<Vec<Vec<(usize, crate::point::Encoded)>>, String> {
    let Some(binding) = device.twin.as_ref().and_then(|t| t.shadows.first()).cloned() else { return Ok(Vec::new()) };
    let points = Arc::clone(&device.points);
    let setup = Setup { key: "fuzz".into(), points: points.clone(), mine: binding.points.clone(), commands: device.commands.clone(), token_prefix: "fuzz".into(), binding };
    let mut core = Core::new(setup, Remembered::default());
    let mut writes = Vec::new();
    let mut inputs: VecDeque<Input> = VecDeque::from([Input::SessionUp]);
    inputs.extend(messages.iter().map(|(suffix, payload)| Input::Message { suffix: (*suffix).to_string(), payload: payload.to_vec() }));
    for _ in 0..10_000 {
        let Some(input) = inputs.pop_front() else { return Ok(writes) };
        let mut results = VecDeque::new();
        for action in core.handle(input, Instant::now()) {
            match action {
                Action::Publish(_) | Action::Record(_) => {}
                Action::Write(w) => {
                    let values = w
                        .iter()
                        .filter_map(|(i, e)| Some((*i, points.get(*i)?.read_back(e).ok()?)))
                        .collect();
                    writes.push(w);
                    results.push_back(Input::Written(crate::device::Outcome { values, error: None }));
                }
                Action::Run { id, .. } => {
                    results.push_back(Input::Started { id: id.clone() });
                    results.push_back(Input::Ran { id, result: Ok(()) });
                }
            }
        }
        // What the shell would feed back comes before the next message.
        while let Some(r) = results.pop_back() {
            inputs.push_front(r);
        }
    }
    Err("the shadow adapter did not settle within 10000 steps".to_string())
}

/// The topics a shadow adapter must be subscribed to.
pub fn shadow_topics(binding: &ShadowBinding) -> Vec<String> {
    let p = binding.prefix();
    ["get/accepted", "get/rejected", "update/delta", "update/accepted", "update/rejected"].iter().map(|s| format!("{p}/{s}")).collect()
}

/// What a shadow adapter receives: the messages on its topics, and a signal
/// that some were dropped while it could not take them.
#[derive(Debug)]
pub struct ShadowInbox {
    pub messages: mpsc::Receiver<Message>,
    pub overflow: Arc<Notify>,
}

/// The connection's side of a [`ShadowInbox`]: a full inbox drops the
/// message and wakes `overflow`; the adapter then fetches the whole shadow
/// again, which still holds whatever a dropped delta carried.
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
            tracing::warn!("a shadow message arrived while its adapter could not take it: it will fetch the shadow again");
            self.overflow.notify_one();
        }
        Vec::new()
    }
}

/// What the adapter is waiting for from the device: a write's read-back or
/// a named command's end.
type Operation = Pin<Box<dyn Future<Output = Input> + Send>>;

/// Serves one shadow (the points `binding.points` of the device) until
/// `stop` fires (a named command under way is finished first); then reports
/// `connected: false`.
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
    let key = format!("{}|{}", conn.name, binding.prefix());
    let remembered = remembered(&store, &key);
    let setup = Setup {
        key,
        points: device.points.clone(),
        mine: binding.points.clone(),
        commands,
        token_prefix: format!("twinbus-{}", std::process::id()),
        binding,
    };
    let prefix = setup.binding.prefix();
    let mut shell = Shell { core: Core::new(setup, remembered), prefix: prefix.clone(), device, conn, store, operation: None };
    // Started on a connection that is already up (a reload added this
    // shadow): sync now. If our subscriptions are not granted yet, the get
    // goes unanswered and the core asks again; their SUBACK also counts as
    // a new session.
    if *sessions.borrow_and_update() > 0 {
        shell.feed(Input::SessionUp).await;
    }
    loop {
        let deadline = shell.core.deadline();
        let input = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            changed = sessions.changed() => {
                if changed.is_err() { break }
                Input::SessionUp
            }
            done = poll_operation(&mut shell.operation) => done,
            m = inbox.recv() => match m {
                Some(m) if m.oversized.is_some() => {
                    // Nobody to answer, and asking for the document again would
                    // bring the same one: what it carried is lost, and said so.
                    metrics::counter!("twinbus_shadow_oversized_total", "shadow" => prefix.clone()).increment(1);
                    tracing::error!(shadow = %prefix, topic = %m.topic, bytes = m.oversized, "a shadow document too large to read was dropped: what it carried is not applied");
                    continue;
                }
                Some(m) => match m.topic.strip_prefix(&prefix) {
                    Some(suffix) => Input::Message { suffix: suffix.to_string(), payload: m.payload.to_vec() },
                    None => continue,
                },
                None => break,
            },
            () = overflow.notified() => Input::Overflow,
            changed = snapshots.changed() => {
                if changed.is_err() { break }
                let snap = snapshots.borrow_and_update().clone();
                Input::Snapshot(snap)
            }
            () = sleep_until(deadline) => Input::Timer,
        };
        shell.feed(input).await;
    }
    // A command under way finishes (within the gateway's stop deadline), so
    // that its outcome is reported rather than "interrupted" at the next start.
    if let Some(op) = shell.operation.take() {
        let done = op.await;
        shell.feed(done).await;
    }
    shell.feed(Input::Stop).await;
}

/// Reads what the store remembers of a shadow; what cannot be read is
/// logged and forgotten (the shadow syncs from scratch).
fn remembered(store: &Store, key: &str) -> Remembered {
    let log = |what: &str, e: anyhow::Error| tracing::error!(shadow = %key, "cannot read {what} from the store: {e:#}");
    Remembered {
        version: store.shadow_version(key).unwrap_or_else(|e| {
            log("the last applied version", e);
            None
        }),
        desired: store
            .desired_applied_all(key)
            .unwrap_or_else(|e| {
                log("the desired values applied", e);
                Vec::new()
            })
            .into_iter()
            .collect(),
        commands: store.shadow_commands(key).unwrap_or_else(|e| {
            log("the commands run", e);
            Vec::new()
        }),
    }
}

struct Shell {
    core: Core,
    prefix: String,
    device: DeviceHandle,
    conn: ConnectionHandle,
    store: Store,
    operation: Option<Operation>,
}

impl Shell {
    /// Hands `input` to the core and carries out what it returns, and what
    /// that returns, in order.
    async fn feed(&mut self, input: Input) {
        let mut queue: VecDeque<Action> = self.core.handle(input, Instant::now()).into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Publish(p) => self.conn.send(p).await,
                Action::Record(ops) => {
                    if let Err(e) = self.store.apply(ops).await {
                        tracing::error!(shadow = %self.prefix, store = %self.store.path().display(), "cannot record the shadow's state: {e:#}");
                    }
                }
                Action::Write(writes) => {
                    let device = self.device.clone();
                    self.operation = Some(Box::pin(async move {
                        let started = std::time::Instant::now();
                        let outcome = device.write(writes).await;
                        device.journal().record(Entry::from_outcome(Source::Shadow, None, "desired", &device.points, &outcome, started.elapsed()));
                        Input::Written(outcome)
                    }));
                }
                Action::Run { id, started, work } => {
                    // At most once: recorded before it runs, or not run at all.
                    if let Err(e) = self.store.apply(vec![started]).await {
                        queue.extend(self.core.handle(Input::NotRun { id, error: format!("{e:#}") }, Instant::now()));
                        continue;
                    }
                    queue.extend(self.core.handle(Input::Started { id: id.clone() }, Instant::now()));
                    match work {
                        Work::Relay(p) => {
                            self.conn.send(p).await;
                            self.device.journal().record(Entry::from_result(Source::Shadow, Some(&id), "relay-command", &Ok(()), Duration::ZERO));
                            queue.extend(self.core.handle(Input::Ran { id, result: Ok(()) }, Instant::now()));
                        }
                        Work::Sequence { def, body } => {
                            let device = self.device.clone();
                            self.operation = Some(Box::pin(async move {
                                let started = std::time::Instant::now();
                                let result = super::sequence::run(&def, &body, &device).await;
                                device.journal().record(Entry::from_result(Source::Shadow, Some(&id), &def.name, &result, started.elapsed()));
                                Input::Ran { id, result }
                            }));
                        }
                    }
                }
            }
        }
    }
}

/// The end of the operation under way, or never when there is none.
async fn poll_operation(op: &mut Option<Operation>) -> Input {
    match op.as_mut() {
        Some(f) => {
            let done = f.await;
            *op = None;
            done
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
