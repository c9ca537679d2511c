//! One MQTT connection: a poll task and an actor that owns the outbox.
//!
//! The poll task only drives rumqttc's event loop and forwards its events; it
//! is never interrupted mid-connect, and after an error it waits (exponential
//! backoff with jitter, capped) before the next attempt. The actor owns the
//! [`Outbox`] and does its I/O: every message is written to the [`Store`]
//! before it is handed to rumqttc (with `try_publish`, so nothing ever awaits
//! rumqttc's request channel) and removed from it on PUBACK; after a restart
//! the stored messages go out first, in order. The actor also routes incoming
//! publishes by topic to the twin adapters' [`Inbox`]es, which never make it
//! wait: an inbox that cannot take a message answers for it (a raw command is
//! refused as busy) or catches up later (a shadow fetches itself again), so
//! nothing is dropped in silence. It resubscribes and publishes `online` after
//! every CONNACK (rumqttc does neither).
//!
//! Connection errors are logged once per outage as one line that says what
//! to check; the same error repeating is logged at debug level. The cause is
//! the link's when it has one (rumqttc only sees the link's socket close).
//! A message the link refused to read for its size reaches its route all
//! the same, marked `oversized`, so that it is answered.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{LinkEvent, Target};
use super::outbox::{self, Class, Coalesce, DropReason, Dropped, Entry, Limits, Next, Outbox, Pace};
use super::session::{self, Client, Ev, EventLoop, Properties};
use super::subscribe::{Step, Subscriber};
use crate::config::{Broker, Connection, MqttVersion, ProxyKind};
use crate::store::{Op, Pending, Store};

/// QoS 1 publishes handed to rumqttc and not yet acknowledged, at most.
const WINDOW: usize = 64;
/// Waiting messages that keep their payload in memory; the rest wait on disk.
const RESIDENT: usize = 256;
/// How often old messages are looked for (`outbox.max_age`).
const EXPIRY_CHECK: Duration = Duration::from_secs(60);
/// A connection held at its publish limit for long logs that it merges
/// messages at most this often.
const COALESCING_LOG: Duration = Duration::from_secs(300);

/// An incoming message, handed to the twin adapter subscribed to its topic.
#[derive(Clone, Debug)]
pub struct Message {
    /// Topic it arrived on.
    pub topic: String,
    /// Raw payload, unparsed.
    pub payload: Bytes,
    /// MQTT 5 request-response properties, when the sender set them.
    pub properties: Option<Properties>,
    /// Set when the message was too large to read: its size in bytes; the
    /// payload is then empty. The adapter answers or logs it, never parses it.
    pub oversized: Option<usize>,
}

/// Where the messages of one topic go. The connection hands over every
/// message with `offer` from its own task, so an implementation must never
/// block or wait: what it cannot take now it answers for at once (the
/// returned publishes go out like any other), or recovers later by itself.
pub trait Inbox: Send + Sync + std::fmt::Debug {
    /// Takes a message; returns what to publish in its place, if anything.
    fn offer(&self, msg: Message) -> Vec<Publish>;
}

/// Topic → the adapter's inbox. Exact topics only (no wildcards).
pub type Routes = HashMap<String, Arc<dyn Inbox>>;

/// A message to publish (QoS 1), with what it is (which decides what is
/// dropped first when the outbox is full) and store records that must be
/// committed together with it (e.g. "command X answered").
#[derive(Clone, Debug)]
pub struct Publish {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// What it is.
    pub class: Class,
    /// Ask the broker to keep it.
    pub retain: bool,
    /// MQTT 5 properties echoed with an answer.
    pub properties: Option<Properties>,
    /// Committed in the same store transaction as the message itself.
    pub records: Vec<Op>,
    /// Whether, while the connection is held at its publish limit, it may
    /// join a message still waiting on its topic (telemetry, value reports).
    pub coalesce: Option<Coalesce>,
}

impl Publish {
    /// A message of `class` on `topic`.
    pub fn new(class: Class, topic: impl Into<String>, payload: impl Into<Bytes>) -> Publish {
        Publish { topic: topic.into(), payload: payload.into(), class, retain: false, properties: None, records: Vec::new(), coalesce: None }
    }

    /// May join a message waiting on its topic when the connection is at its
    /// publish limit; see [`Coalesce`].
    pub fn coalescing(mut self, how: Coalesce) -> Publish {
        self.coalesce = Some(how);
        self
    }

    /// With MQTT 5 properties (an answer's correlation data).
    pub fn with_properties(mut self, properties: Option<Properties>) -> Publish {
        self.properties = properties;
        self
    }

    /// With store records committed together with the message.
    pub fn recording(mut self, records: Vec<Op>) -> Publish {
        self.records = records;
        self
    }
}

#[derive(Debug)]
enum Cmd {
    Publish(Publish),
    Close { deadline: Duration, done: oneshot::Sender<bool> },
    /// A reload: topics and their inboxes to add, topics to drop.
    Routes { add: Routes, remove: Vec<String>, done: oneshot::Sender<()> },
}

/// How twin adapters publish on a connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    /// Connection name, for logs.
    pub name: String,
    tx: mpsc::Sender<Cmd>,
    sessions: watch::Receiver<u64>,
    connected: watch::Receiver<bool>,
}

impl ConnectionHandle {
    /// Queues a message in the outbox. Waits only when the actor is busy.
    pub async fn send(&self, publish: Publish) {
        if self.tx.send(Cmd::Publish(publish)).await.is_err() {
            tracing::warn!(connection = %self.name, "publish dropped: the connection is closed");
        }
    }

    /// Queues a message of `class` without properties or records.
    pub async fn publish(&self, class: Class, topic: &str, payload: Vec<u8>) {
        self.send(Publish::new(class, topic, payload)).await;
    }

    /// Replaces routes after a reload: `add` starts being subscribed (now if
    /// connected), `remove` stops. Returns once the connection took them.
    pub async fn update_routes(&self, add: Routes, remove: Vec<String>) {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Cmd::Routes { add, remove, done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Counts sessions that are up with their subscriptions acknowledged:
    /// changes after every (re)connect's SUBACK. A shadow syncs on each change.
    pub fn sessions(&self) -> watch::Receiver<u64> {
        self.sessions.clone()
    }

    /// Whether the connection is up right now.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Graceful close: publishes `offline` presence, waits until every queued
    /// message is acknowledged (or `deadline`), then disconnects. Returns
    /// whether everything was delivered; what was not stays in the store.
    pub async fn close(&self, deadline: Duration) -> bool {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Cmd::Close { deadline, done }).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// Starts one connection. `routes` lists the topics to subscribe to on every
/// connect; `store` keeps its outbox. Runs until closed or `cancel` fires;
/// both tasks are spawned on `tasks`.
pub async fn spawn_connection(
    conn: &Connection,
    routes: Routes,
    store: Store,
    tasks: &crate::lifecycle::Tasks,
    cancel: CancellationToken,
) -> anyhow::Result<ConnectionHandle> {
    let tls = match &conn.broker {
        Broker::Remote { tls: Some(tls), .. } => Some(super::tls::client_config(tls)?),
        _ => None,
    };
    let (link_tx, link) = mpsc::unbounded_channel();
    let (target, describe) = link_target(conn, tls);
    let socket = super::link::start(&conn.name, target, conn.version == MqttVersion::V5, link_tx, tasks, cancel.clone())?;
    let limits = Limits {
        max_messages: conn.outbox.max_messages,
        max_bytes: conn.outbox.max_bytes,
        max_age_ms: u64::try_from(conn.outbox.max_age.as_millis()).unwrap_or(u64::MAX),
        max_payload: conn.limits.max_payload.unwrap_or(usize::MAX).min(session::MAX_OUTGOING - 65_536),
    };
    let mut outbox = Outbox::new(limits, WINDOW, RESIDENT).with_pace(Pace::new(conn.limits.publishes_per_second, conn.limits.bytes_per_second));
    let restored = restore(&store, &conn.name, &mut outbox)?;
    if restored > 0 {
        tracing::info!(connection = %conn.name, messages = restored, "sending first what was queued before the restart");
    }

    let (client, eventloop) = session::build(conn, &socket);
    let (events_tx, events) = mpsc::channel(256);
    let poll_cancel = cancel.child_token();
    let link_up = Arc::new(AtomicBool::new(false));
    tasks.spawn(
        &format!("connection {} (event loop)", conn.name),
        poll_loop(eventloop, events_tx, link_up.clone(), conn.reconnect_min, conn.reconnect_max, poll_cancel.clone()),
    );

    let (tx, rx) = mpsc::channel(1024);
    let (sessions_tx, sessions) = watch::channel(0u64);
    let (connected_tx, connected) = watch::channel(false);
    let mut topics: Vec<String> = routes.keys().cloned().collect();
    topics.sort();
    let actor = Actor {
        conn: conn.clone(),
        target: describe,
        client,
        routes,
        subscriber: Subscriber::new(topics, conn.limits.filters_per_subscribe),
        outbox,
        store,
        removals: Vec::new(),
        warned: HashMap::new(),
        coalescing: None,
        pace_until: None,
        connected: connected_tx,
        link_up,
        sessions: sessions_tx,
        last_error: None,
        link,
        link_error: None,
    };
    tasks.spawn(&format!("connection {}", conn.name), actor.run(rx, events, cancel, poll_cancel));
    Ok(ConnectionHandle { name: conn.name.clone(), tx, sessions, connected })
}

/// Loads the messages a previous run left in the store. Only the first
/// `RESIDENT` keep their payload in memory.
fn restore(store: &Store, connection: &str, outbox: &mut Outbox) -> anyhow::Result<usize> {
    let mut entries = Vec::new();
    let mut unreadable = Vec::new();
    store.outbox_scan(connection, |seq, record| match outbox::decode(seq, record, entries.len() < RESIDENT) {
        Some(e) => entries.push(e),
        None => unreadable.push(seq),
    })?;
    if !unreadable.is_empty() {
        tracing::warn!(connection, count = unreadable.len(), "dropping stored messages this build cannot read");
        store.submit_detached(vec![Op::OutboxRemove { connection: connection.to_string(), seqs: unreadable }]);
    }
    let n = entries.len();
    outbox.restore(entries);
    Ok(n)
}

/// Where the link dials, and how logs name it.
fn link_target(conn: &Connection, tls: Option<Arc<rustls::ClientConfig>>) -> (Target, String) {
    match &conn.broker {
        Broker::Embedded { listen, .. } => {
            let host = if listen.ip().is_unspecified() { "127.0.0.1".to_string() } else { listen.ip().to_string() };
            let describe = format!("{host}:{}", listen.port());
            (Target { host, port: listen.port(), tls: None, websocket_path: None, proxy: None }, describe)
        }
        Broker::Remote { host, port, websocket_path, .. } => {
            let describe = match &conn.proxy {
                Some(p) if p.kind == ProxyKind::Socks5 => format!("{host}:{port} via SOCKS5 {}:{}", p.host, p.port),
                Some(p) => format!("{host}:{port} via HTTP proxy {}:{}", p.host, p.port),
                None => format!("{host}:{port}"),
            };
            let target = Target { host: host.clone(), port: *port, tls, websocket_path: websocket_path.clone(), proxy: conn.proxy.clone() };
            (target, describe)
        }
    }
}

/// A link must stay up this long before the backoff starts again from `min`:
/// a broker that accepts and then kicks the client (a duplicate client id, a
/// policy) must not get a reconnect every second.
const STABLE_LINK: Duration = Duration::from_secs(30);

/// Drives rumqttc; never interrupted except at shutdown. `link_up` is cleared
/// before an error is forwarded, so the actor stops handing publishes to a
/// dead link at once.
async fn poll_loop(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Result<Ev, String>>,
    link_up: Arc<AtomicBool>,
    min: Duration,
    max: Duration,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::new(min, max);
    let mut up_since: Option<Instant> = None;
    loop {
        if !link_up.load(Ordering::SeqCst) && up_since.is_none() {
            // Marks each attempt in debug logs: a gap between two tells where time went.
            tracing::debug!("connecting to the MQTT broker");
        }
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            () = cancel.cancelled() => break,
        };
        let failed = ev.is_err();
        match &ev {
            Ok(Ev::ConnAck { .. }) => {
                link_up.store(true, Ordering::SeqCst);
                up_since = Some(Instant::now());
            }
            Err(_) => {
                link_up.store(false, Ordering::SeqCst);
                if up_since.take().is_some_and(|t| t.elapsed() >= STABLE_LINK) {
                    backoff.reset();
                }
                eventloop.reset_after_error();
            }
            Ok(_) => {}
        }
        if events.send(ev).await.is_err() {
            break;
        }
        if failed {
            let wait = backoff.next();
            tracing::debug!(?wait, "waiting before the next attempt");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => break,
            }
            // Requests that reached rumqttc after the error are taken back too.
            eventloop.reset_after_error();
        }
    }
}

struct Actor {
    conn: Connection,
    target: String,
    client: Client,
    routes: Routes,
    /// Subscribes after every CONNACK, in batches; a session counts as up
    /// only once every filter is granted.
    subscriber: Subscriber,
    outbox: Outbox,
    store: Store,
    /// Acknowledged or dropped entries to remove from the store, in one
    /// (non-durable) commit per turn of the loop.
    removals: Vec<u64>,
    /// Drop reasons already warned about in this episode (reset on connect),
    /// so an outage logs one line per reason, not one per message.
    warned: HashMap<(DropReason, Class), u64>,
    /// When joined messages were last logged, while the pace has held
    /// messages back ever since.
    coalescing: Option<Instant>,
    /// When the pace lets the next publish go.
    pace_until: Option<Instant>,
    /// Whether the session is up (CONNACK seen, no error since).
    connected: watch::Sender<bool>,
    /// Set by the poll task: false as soon as it sees the link fail.
    link_up: Arc<AtomicBool>,
    sessions: watch::Sender<u64>,
    last_error: Option<String>,
    /// What the link reports: why an attempt failed, oversized messages.
    link: mpsc::UnboundedReceiver<LinkEvent>,
    /// The link's cause for the current attempt's failure, until rumqttc's error comes.
    link_error: Option<String>,
}

/// Store commits under way, in submission order: (outbox entry, its commit).
type Persisting = VecDeque<(Option<u64>, Pending)>;

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut events: mpsc::Receiver<Result<Ev, String>>,
        cancel: CancellationToken,
        poll_cancel: CancellationToken,
    ) {
        let mut persisting = Persisting::new();
        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing: Option<(Instant, oneshot::Sender<bool>)> = None;
        loop {
            self.flush_removals();
            self.feed();
            self.gauge();
            if let Some((deadline, _)) = &closing {
                if (self.outbox.len() == 0 && persisting.is_empty()) || Instant::now() >= *deadline {
                    break;
                }
            }
            let deadline = closing.as_ref().map(|(d, _)| *d);
            let resubscribe = self.subscriber.retry_at();
            let pace_until = self.pace_until;
            tokio::select! {
                () = cancel.cancelled() => break,
                cmd = rx.recv(), if closing.is_none() => match cmd {
                    Some(Cmd::Publish(p)) => self.enqueue(p, &mut persisting),
                    Some(Cmd::Routes { add, remove, done }) => {
                        self.reroute(add, &remove);
                        let _ = done.send(());
                    }
                    Some(Cmd::Close { deadline, done }) => {
                        if let Some(p) = self.conn.presence.clone() {
                            let retain = session::presence_retain(&p, &self.conn);
                            let offline = Publish { retain, ..Publish::new(Class::Volatile, p.topic, p.offline) };
                            self.enqueue(offline, &mut persisting);
                        }
                        closing = Some((Instant::now() + deadline, done));
                    }
                    None => break,
                },
                ev = events.recv() => match ev {
                    Some(Ok(ev)) => {
                        self.drain_link(&mut persisting);
                        self.on_event(ev, &mut persisting);
                    }
                    Some(Err(e)) => {
                        self.drain_link(&mut persisting);
                        self.on_error(e);
                    }
                    None => break,
                },
                Some(ev) = self.link.recv() => self.on_link(ev, &mut persisting),
                (seq, result) = next_persisted(&mut persisting) => self.on_persisted(seq, result),
                _ = expiry.tick() => {
                    let gone = self.outbox.expire(crate::twin::now_ms());
                    self.report_drops(&gone);
                }
                () = sleep_until(deadline) => {}
                () = sleep_until(pace_until) => {}
                () = sleep_until(resubscribe) => {
                    let step = self.subscriber.retry(Instant::now());
                    self.subscribe(step);
                }
            }
        }
        // Whatever is still being written must be on disk before we go.
        while !persisting.is_empty() {
            let (seq, result) = next_persisted(&mut persisting).await;
            self.on_persisted(seq, result);
        }
        self.flush_removals();
        let unsent = self.outbox.len();
        if unsent > 0 {
            tracing::info!(connection = %self.conn.name, unsent, "closing with messages the broker has not acknowledged: they stay in the store and go out after the restart");
        }
        if *self.connected.borrow() {
            self.client.try_disconnect();
            // Let the poll task put DISCONNECT on the wire.
            let _ = tokio::time::timeout(Duration::from_millis(200), async {
                while let Some(ev) = events.recv().await {
                    if ev.is_err() {
                        break;
                    }
                }
            })
            .await;
        }
        poll_cancel.cancel();
        if let Some((_, done)) = closing {
            let _ = done.send(unsent == 0);
        }
    }

    /// Queues a message: into the outbox, and into the store (with the
    /// records that ride with it) before it may be sent.
    fn enqueue(&mut self, p: Publish, persisting: &mut Persisting) {
        let Publish { topic, payload, class, retain, properties, mut records, coalesce } = p;
        let mut entry = Entry::new(class, topic, payload, retain, properties, crate::twin::now_ms());
        entry.coalesce = coalesce;
        let record = (class != Class::Volatile).then(|| outbox::encode(&entry, entry.payload.as_deref().unwrap_or_default()));
        let pushed = self.outbox.push(entry);
        self.report_drops(&pushed.dropped);
        if pushed.coalesced {
            metrics::counter!("twinbus_mqtt_coalesced_total", "connection" => self.conn.name.clone(), "class" => class.name()).increment(1);
            // Once per episode, and a sustained overload once in a while.
            let quiet = self.coalescing.is_some_and(|since| since.elapsed() < COALESCING_LOG);
            if !quiet {
                self.coalescing = Some(Instant::now());
                tracing::warn!(
                    connection = %self.conn.name,
                    "the broker's publish limit holds messages back: telemetry and shadow reports waiting on one topic are merged (newest values win) until the backlog clears; counted in twinbus_mqtt_coalesced_total"
                );
            }
        }
        let mut put = None;
        if let (true, Some(record)) = (pushed.store, record) {
            records.insert(0, Op::OutboxPut { connection: self.conn.name.clone(), seq: pushed.seq, record });
            put = Some(pushed.seq);
        }
        // Records are kept even when their message could not be (a command
        // that ran stays answered): a repeat must not run it again.
        if !records.is_empty() {
            persisting.push_back((put, self.store.submit(records, true)));
        }
    }

    fn on_persisted(&mut self, seq: Option<u64>, result: anyhow::Result<()>) {
        if let Err(e) = &result {
            metrics::counter!("twinbus_store_errors_total", "connection" => self.conn.name.clone()).increment(1);
            tracing::error!(connection = %self.conn.name, store = %self.store.path().display(), "cannot write to the store: {e:#}; sending from memory (lost if the gateway stops before the broker has it)");
        }
        if let Some(seq) = seq {
            self.outbox.persisted(seq, result.is_ok());
        }
    }

    /// Logs (once per reason and class per episode) and counts entries that
    /// left undelivered, and removes them from the store.
    fn report_drops(&mut self, dropped: &[Dropped]) {
        for d in dropped {
            metrics::counter!("twinbus_mqtt_outbox_dropped_total", "connection" => self.conn.name.clone(), "class" => d.class.name(), "reason" => d.reason.name())
                .increment(1);
            if d.stored {
                self.removals.push(d.seq);
            }
            if d.class == Class::Volatile && d.reason == DropReason::Expired {
                continue; // an old connection's presence or shadow `get`: meaningless now
            }
            let count = self.warned.entry((d.reason, d.class)).or_insert(0);
            *count += 1;
            let (name, topic, bytes, class) = (&self.conn.name, &d.topic, d.size, d.class.name());
            match d.reason {
                DropReason::TooLarge => tracing::error!(connection = %name, %topic, bytes, class, "dropping a message larger than the broker takes"),
                DropReason::Refused => tracing::error!(connection = %name, %topic, class, "the broker refused a message (an MQTT 5 error reason in its PUBACK: not authorized, quota, ...): it will not be delivered"),
                DropReason::Full if *count == 1 => tracing::warn!(
                    connection = %name,
                    class,
                    max_messages = self.conn.outbox.max_messages,
                    max_bytes = self.conn.outbox.max_bytes,
                    "outbox full: dropping the oldest {class} messages (telemetry first, answers last); counted in twinbus_mqtt_outbox_dropped_total"
                ),
                DropReason::Expired if *count == 1 => {
                    tracing::warn!(connection = %name, class, max_age = ?self.conn.outbox.max_age, "dropping {class} messages older than outbox.max_age")
                }
                _ => {}
            }
        }
    }

    fn flush_removals(&mut self) {
        if !self.removals.is_empty() {
            let seqs = std::mem::take(&mut self.removals);
            // Not durable: if a crash loses this, the message is sent once more.
            self.store.submit_detached(vec![Op::OutboxRemove { connection: self.conn.name.clone(), seqs }]);
        }
    }

    fn set_connected(&self, up: bool) {
        self.connected.send_replace(up);
        metrics::gauge!("twinbus_mqtt_connected", "connection" => self.conn.name.clone()).set(f64::from(u8::from(up)));
        if up {
            metrics::counter!("twinbus_mqtt_connects_total", "connection" => self.conn.name.clone()).increment(1);
        }
    }

    fn gauge(&self) {
        metrics::gauge!("twinbus_mqtt_outbox_messages", "connection" => self.conn.name.clone()).set(self.outbox.len() as f64);
        metrics::gauge!("twinbus_mqtt_outbox_bytes", "connection" => self.conn.name.clone()).set(self.outbox.bytes() as f64);
    }

    /// Hands waiting messages to rumqttc while connected and the window and
    /// the pace allow.
    fn feed(&mut self) {
        self.pace_until = None;
        if !*self.connected.borrow() || !self.link_up.load(Ordering::SeqCst) {
            return;
        }
        loop {
            let now = Instant::now();
            match self.outbox.next(now) {
                Next::Send(e) => {
                    let Some(payload) = e.payload.clone() else { break };
                    let topic = e.topic.clone();
                    let (retain, properties) = (e.retain, e.properties.clone());
                    match self.client.try_publish(&topic, payload, retain, properties.as_ref()) {
                        Ok(()) => self.outbox.mark_sent(now),
                        Err(_) => break, // rumqttc's queue is full: retry after its next event
                    }
                }
                Next::Load(seqs) => {
                    let found = match self.store.outbox_get(&self.conn.name, &seqs) {
                        Ok(found) => found.into_iter().filter_map(|(seq, r)| outbox::decode_payload(&r).map(|p| (seq, p))).collect(),
                        Err(e) => {
                            tracing::error!(connection = %self.conn.name, "cannot read queued messages from the store: {e:#}");
                            Vec::new()
                        }
                    };
                    let lost = self.outbox.loaded(&seqs, found);
                    self.report_drops(&lost);
                }
                Next::Paced(at) => {
                    self.pace_until = Some(at);
                    break;
                }
                Next::Wait => {
                    if self.outbox.len() == 0 {
                        self.coalescing = None;
                    }
                    break;
                }
            }
        }
    }

    fn on_event(&mut self, ev: Ev, persisting: &mut Persisting) {
        match ev {
            Ev::ConnAck { session_present } => {
                self.set_connected(true);
                tracing::info!(connection = %self.conn.name, broker = %self.target, session_present, "MQTT connected");
                self.last_error = None;
                self.link_error = None;
                self.warned.clear();
                let step = self.subscriber.on_connected();
                self.subscribe(step);
                let stale = self.outbox.on_connected(session_present);
                self.report_drops(&stale);
                if let Some(p) = self.conn.presence.clone() {
                    let retain = session::presence_retain(&p, &self.conn);
                    self.outbox.push_front(Entry::new(Class::Volatile, p.topic, p.online.into(), retain, None, crate::twin::now_ms()));
                }
            }
            Ev::SubAck { granted } => {
                let step = self.subscriber.on_suback(&granted, Instant::now());
                self.subscribe(step);
            }
            Ev::Publish { topic, payload, properties } => self.route(Message { topic, payload, properties, oversized: None }, persisting),
            Ev::PubAck { pkid, refused } => {
                if let Some((entry, stored)) = self.outbox.on_puback(pkid) {
                    if stored {
                        self.removals.push(entry.seq);
                    }
                    if refused.is_some() {
                        // MQTT 5: the broker took the message but refused it
                        // (not authorized, quota): it will not be delivered.
                        let d = Dropped { seq: entry.seq, class: entry.class, topic: entry.topic, size: entry.size, reason: DropReason::Refused, stored: false };
                        self.report_drops(&[d]);
                    }
                }
            }
            Ev::SentPublish(pkid) => self.outbox.on_sent(pkid),
            Ev::Other => {}
        }
    }

    /// A reload changed the twins on this connection: routes and
    /// subscriptions follow, the rest of the session is untouched.
    fn reroute(&mut self, add: Routes, remove: &[String]) {
        // A topic in both (a restarted device keeping its topics) only
        // changes hands: unsubscribing it would lose what arrives meanwhile.
        let dropped: Vec<String> = remove.iter().filter(|t| !add.contains_key(*t)).cloned().collect();
        for t in &dropped {
            self.routes.remove(t);
        }
        self.subscriber.remove(&dropped);
        let connected = *self.connected.borrow() && self.link_up.load(Ordering::SeqCst);
        if connected && !dropped.is_empty() {
            self.client.try_unsubscribe(&dropped);
        }
        let mut topics: Vec<String> = add.keys().filter(|t| !self.routes.contains_key(*t)).cloned().collect();
        topics.sort();
        self.routes.extend(add);
        if !topics.is_empty() {
            tracing::debug!(connection = %self.conn.name, ?topics, "subscribing to the topics of reloaded twins");
            let step = self.subscriber.add(topics, connected);
            self.subscribe(step);
        }
    }

    /// Hands a message to the adapter of its topic, which never makes us
    /// wait, and queues whatever it answers in its place.
    fn route(&mut self, msg: Message, persisting: &mut Persisting) {
        let Some(inbox) = self.routes.get(&msg.topic) else {
            metrics::counter!("twinbus_mqtt_unrouted_total", "connection" => self.conn.name.clone()).increment(1);
            match msg.oversized {
                Some(bytes) => tracing::warn!(connection = %self.conn.name, topic = %msg.topic, bytes, "an oversized message on a topic nobody handles was dropped"),
                None => tracing::debug!(connection = %self.conn.name, topic = %msg.topic, "message on a topic nobody handles"),
            }
            return;
        };
        for reply in inbox.offer(msg) {
            self.enqueue(reply, persisting);
        }
    }

    /// Carries out a step of subscribing: the next SUBSCRIBE, the session
    /// counted as up, or a refusal reported (and asked again later).
    fn subscribe(&mut self, mut step: Step) {
        loop {
            match step {
                Step::Send(batch) => match self.client.try_subscribe(&batch) {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::debug!(connection = %self.conn.name, "cannot queue a SUBSCRIBE: {e}");
                        step = self.subscriber.on_send_failed(Instant::now());
                    }
                },
                Step::Up => {
                    tracing::debug!(connection = %self.conn.name, "subscribed");
                    self.sessions.send_modify(|n| *n += 1);
                    return;
                }
                Step::Refused(topics) => {
                    let retry_in = self.subscriber.retry_at().map(|at| at.saturating_duration_since(Instant::now()));
                    tracing::error!(
                        connection = %self.conn.name,
                        ?retry_in,
                        "the broker refused {} subscription(s) {topics:?}: their twins get no messages until it grants them (check the broker's ACL or IoT policy, and its subscription quota); asking again",
                        topics.len()
                    );
                    return;
                }
                Step::Wait => return,
            }
        }
    }

    /// Takes in what the link reported before rumqttc's next event: a cause
    /// for the error it brings, or an oversized message that came before
    /// the publish it brings (the link reports before relaying further).
    fn drain_link(&mut self, persisting: &mut Persisting) {
        while let Ok(ev) = self.link.try_recv() {
            self.on_link(ev, persisting);
        }
    }

    fn on_link(&mut self, ev: LinkEvent, persisting: &mut Persisting) {
        match ev {
            LinkEvent::Failed(cause) => self.link_error = Some(cause),
            // The link logged and counted it; the adapter answers it.
            LinkEvent::Oversized { topic, bytes, properties } => {
                self.route(Message { topic, payload: Bytes::new(), properties, oversized: Some(bytes) }, persisting);
            }
        }
    }

    fn on_error(&mut self, error: String) {
        self.subscriber.on_link_lost();
        self.outbox.on_link_lost();
        let was_connected = *self.connected.borrow();
        self.set_connected(false);
        let cause = session::cause(error, self.link_error.take());
        // Compare hints, not whole errors: rustls puts the current time in
        // some (an expired certificate), which would log every attempt.
        let (hint, line) = session::explain(&cause, &self.target, &self.conn);
        if was_connected {
            tracing::warn!(connection = %self.conn.name, "MQTT connection lost: {line}; reconnecting");
        } else if self.last_error.as_deref() != Some(hint.as_str()) {
            tracing::error!(connection = %self.conn.name, "cannot connect to the MQTT broker: {line}; retrying with backoff");
        } else {
            tracing::debug!(connection = %self.conn.name, "still cannot connect: {line}");
        }
        self.last_error = Some(hint);
    }
}

/// The next store commit to finish (in order), or never when none is under way.
async fn next_persisted(persisting: &mut Persisting) -> (Option<u64>, anyhow::Result<()>) {
    match persisting.front_mut() {
        Some((seq, pending)) => {
            let seq = *seq;
            let result = pending.await;
            persisting.pop_front();
            (seq, result)
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

/// Exponential backoff with jitter: each wait is random in [d/2, d], d doubling up to `max`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
    seed: u64,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
        Backoff { min, max, current: min, seed }
    }

    fn reset(&mut self) {
        self.current = self.min;
    }

    fn next(&mut self) -> Duration {
        // xorshift: jitter needs spread, not cryptographic quality.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let fraction = 0.5 + (self.seed % 1000) as f64 / 2000.0;
        let wait = self.current.mul_f64(fraction);
        self.current = (self.current * 2).min(self.max);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let waits: Vec<Duration> = (0..8).map(|_| b.next()).collect();
        for (i, w) in waits.iter().enumerate() {
            let d = Duration::from_millis(100 * (1u64 << i)).min(Duration::from_millis(1000));
            assert!(*w <= d && *w >= d / 2, "wait {i}: {w:?} for {d:?}");
            assert!(*w <= Duration::from_millis(1000));
        }
        b.reset();
        assert!(b.next() <= Duration::from_millis(100));
    }
}
