//! One MQTT connection: a poll task and an actor that owns the outbox.
//!
//! The poll task only drives rumqttc's event loop and forwards its events; it
//! is never interrupted mid-connect, and after an error it waits (exponential
//! backoff with jitter, capped) before the next attempt. The actor owns the
//! [`Outbox`], routes incoming publishes by topic to the twin adapters,
//! resubscribes and publishes `online` after every CONNACK (rumqttc does
//! neither), and hands publishes to rumqttc with `try_publish`, so nothing
//! ever awaits rumqttc's request channel.
//!
//! Connection errors are logged once per outage as one line that says what
//! to check; the same error repeating is logged at debug level. The cause is
//! the link's when it has one (rumqttc only sees the link's socket close).
//! A message the link refused to read for its size reaches its route all
//! the same, marked `oversized`, so that it is answered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::link::{LinkEvent, Target};
use super::outbox::{Entry, Outbox};
use super::session::{self, Client, Ev, EventLoop, Properties};
use crate::config::{Broker, Connection, MqttVersion, ProxyKind};

/// QoS 1 publishes handed to rumqttc and not yet acknowledged, at most.
const WINDOW: usize = 64;

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

/// Topic → the adapter's inbox. Exact topics only (no wildcards).
pub type Routes = HashMap<String, Route>;

/// Where messages on one topic go.
#[derive(Clone, Debug)]
pub struct Route {
    inbox: mpsc::Sender<Message>,
    /// Woken when a message had to be dropped because the inbox was full, for
    /// an adapter that can recover what it missed (a shadow asks for the
    /// whole document again). The connection never waits on an adapter.
    overflow: Option<Arc<Notify>>,
}

impl Route {
    pub fn new(inbox: mpsc::Sender<Message>) -> Route {
        Route { inbox, overflow: None }
    }

    pub fn with_overflow(inbox: mpsc::Sender<Message>, overflow: Arc<Notify>) -> Route {
        Route { inbox, overflow: Some(overflow) }
    }
}

#[derive(Debug)]
enum Cmd {
    Publish(Entry),
    Close { deadline: Duration, done: oneshot::Sender<bool> },
}

/// How twin adapters publish on a connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    /// Connection name, for logs.
    pub name: String,
    tx: mpsc::Sender<Cmd>,
    sessions: watch::Receiver<u64>,
}

impl ConnectionHandle {
    /// Queues a QoS 1 publish in the outbox. Waits when the actor is busy.
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.send(Entry::new(topic.to_string(), payload.into(), false, None)).await;
    }

    /// Queues an answer carrying MQTT 5 properties (correlation data, user properties).
    pub async fn publish_reply(&self, topic: &str, payload: Vec<u8>, properties: Properties) {
        self.send(Entry::new(topic.to_string(), payload.into(), false, Some(properties))).await;
    }

    async fn send(&self, entry: Entry) {
        if self.tx.send(Cmd::Publish(entry)).await.is_err() {
            tracing::warn!(connection = %self.name, "publish dropped: the connection is closed");
        }
    }

    /// Counts sessions that are up with their subscriptions acknowledged:
    /// changes after every (re)connect's SUBACK. A shadow syncs on each change.
    pub fn sessions(&self) -> watch::Receiver<u64> {
        self.sessions.clone()
    }

    /// Graceful close: publishes `offline` presence, waits until every queued
    /// message is acknowledged (or `deadline`), then disconnects. Returns
    /// whether everything was delivered.
    pub async fn close(&self, deadline: Duration) -> bool {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Cmd::Close { deadline, done }).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

/// Starts one connection. `routes` lists the topics to subscribe to on every
/// connect. Runs until closed or `cancel` fires.
pub async fn spawn_connection(conn: &Connection, routes: Routes, cancel: CancellationToken) -> anyhow::Result<ConnectionHandle> {
    let tls = match &conn.broker {
        Broker::Remote { tls: Some(tls), .. } => Some(super::tls::client_config(tls)?),
        _ => None,
    };
    let (link_tx, link) = mpsc::unbounded_channel();
    let (target, describe) = link_target(conn, tls);
    let socket = super::link::start(&conn.name, target, conn.version == MqttVersion::V5, link_tx, cancel.clone())?;
    let (client, eventloop) = session::build(conn, &socket);
    let (events_tx, events) = mpsc::channel(256);
    let poll_cancel = cancel.child_token();
    let link_up = Arc::new(AtomicBool::new(false));
    tokio::spawn(poll_loop(eventloop, events_tx, link_up.clone(), conn.reconnect_min, conn.reconnect_max, poll_cancel.clone()));

    let (tx, rx) = mpsc::channel(1024);
    let (sessions_tx, sessions) = watch::channel(0u64);
    let actor = Actor {
        conn: conn.clone(),
        target: describe,
        client,
        routes,
        topics: Vec::new(),
        outbox: Outbox::new(conn.outbox_limit, WINDOW),
        connected: false,
        link_up,
        sessions: sessions_tx,
        last_error: None,
        link,
        link_error: None,
        warned_full: false,
    };
    tokio::spawn(actor.run(rx, events, cancel, poll_cancel));
    Ok(ConnectionHandle { name: conn.name.clone(), tx, sessions })
}

/// Where the link dials, and how logs name it.
fn link_target(conn: &Connection, tls: Option<Arc<rustls::ClientConfig>>) -> (Target, String) {
    match &conn.broker {
        Broker::Embedded { listen } => {
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
    topics: Vec<String>,
    outbox: Outbox,
    connected: bool,
    /// Set by the poll task: false as soon as it sees the link fail.
    link_up: Arc<AtomicBool>,
    sessions: watch::Sender<u64>,
    last_error: Option<String>,
    /// What the link reports: why an attempt failed, oversized messages.
    link: mpsc::UnboundedReceiver<LinkEvent>,
    /// The link's cause for the current attempt's failure, until rumqttc's error comes.
    link_error: Option<String>,
    warned_full: bool,
}

impl Actor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Cmd>,
        mut events: mpsc::Receiver<Result<Ev, String>>,
        cancel: CancellationToken,
        poll_cancel: CancellationToken,
    ) {
        self.topics = self.routes.keys().cloned().collect();
        self.topics.sort();
        let mut closing: Option<(Instant, oneshot::Sender<bool>)> = None;
        loop {
            self.feed();
            if let Some((deadline, _)) = &closing {
                if self.outbox.len() == 0 || Instant::now() >= *deadline {
                    break;
                }
            }
            let deadline = closing.as_ref().map(|(d, _)| *d);
            tokio::select! {
                () = cancel.cancelled() => break,
                cmd = rx.recv(), if closing.is_none() => match cmd {
                    Some(Cmd::Publish(entry)) => self.enqueue(entry),
                    Some(Cmd::Close { deadline, done }) => {
                        if let Some(p) = self.conn.presence.clone() {
                            let retain = session::presence_retain(&p, &self.conn);
                            self.enqueue(Entry::new(p.topic, p.offline.into(), retain, None));
                        }
                        closing = Some((Instant::now() + deadline, done));
                    }
                    None => break,
                },
                ev = events.recv() => match ev {
                    Some(Ok(ev)) => {
                        self.drain_link();
                        self.on_event(ev);
                    }
                    Some(Err(e)) => {
                        self.drain_link();
                        self.on_error(e);
                    }
                    None => break,
                },
                Some(ev) = self.link.recv() => self.on_link(ev),
                () = sleep_until(deadline) => {}
            }
        }
        let delivered = self.outbox.len() == 0;
        if !delivered {
            tracing::warn!(connection = %self.conn.name, unsent = self.outbox.len(), "closing with messages the broker has not acknowledged");
        }
        if self.connected {
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
            let _ = done.send(delivered);
        }
    }

    fn enqueue(&mut self, entry: Entry) {
        if !self.outbox.push(entry) && !self.warned_full {
            self.warned_full = true;
            tracing::warn!(connection = %self.conn.name, limit = self.conn.outbox_limit, "outbox full: dropping the oldest messages");
        }
        metrics::gauge!("twinbus_mqtt_outbox_messages", "connection" => self.conn.name.clone()).set(self.outbox.len() as f64);
    }

    /// Hands waiting messages to rumqttc while connected and the window allows.
    fn feed(&mut self) {
        if !self.connected || !self.link_up.load(Ordering::SeqCst) {
            return;
        }
        while let Some(e) = self.outbox.next_to_send() {
            let topic = e.topic.clone();
            match self.client.try_publish(&topic, e.payload.clone(), e.retain, e.properties.as_ref()) {
                Ok(()) => self.outbox.mark_sent(),
                Err(_) => break, // rumqttc's queue is full: retry after its next event
            }
        }
    }

    fn on_event(&mut self, ev: Ev) {
        match ev {
            Ev::ConnAck { session_present } => {
                self.connected = true;
                tracing::info!(connection = %self.conn.name, broker = %self.target, session_present, "MQTT connected");
                self.last_error = None;
                self.link_error = None;
                self.warned_full = false;
                if self.topics.is_empty() {
                    self.sessions.send_modify(|n| *n += 1);
                } else if let Err(e) = self.client.try_subscribe(&self.topics) {
                    tracing::warn!(connection = %self.conn.name, "subscribe failed: {e}");
                }
                for lost in self.outbox.on_connected(session_present) {
                    metrics::counter!("twinbus_mqtt_poison_dropped_total", "connection" => self.conn.name.clone()).increment(1);
                    tracing::error!(
                        connection = %self.conn.name,
                        topic = %lost.topic,
                        bytes = lost.payload.len(),
                        "dropping a message the broker refused {} times by closing the connection (too large, or a topic its policy denies)",
                        super::outbox::MAX_ATTEMPTS
                    );
                }
                if let Some(p) = self.conn.presence.clone() {
                    let retain = session::presence_retain(&p, &self.conn);
                    self.outbox.push_front(Entry::new(p.topic, p.online.into(), retain, None));
                }
            }
            Ev::SubAck { refused } => {
                if refused == 0 {
                    tracing::debug!(connection = %self.conn.name, topics = ?self.topics, "subscribed");
                } else {
                    tracing::error!(connection = %self.conn.name, refused, "the broker refused {refused} subscription(s): check its ACL for {:?}", self.topics);
                }
                self.sessions.send_modify(|n| *n += 1);
            }
            Ev::Publish { topic, payload, properties } => self.route(Message { topic, payload, properties, oversized: None }),
            Ev::PubAck { pkid, refused } => {
                if let Some(topic) = self.outbox.on_puback(pkid).filter(|_| refused.is_some()) {
                    // MQTT 5: the broker took the message but refused it
                    // (not authorized, quota): it will not be delivered.
                    tracing::error!(connection = %self.conn.name, %topic, reason = ?refused, "the broker refused a message");
                }
            }
            Ev::SentPublish(pkid) => self.outbox.on_sent(pkid),
            Ev::Other => {}
        }
    }

    /// Hands a message to the adapter of its topic, never waiting on it.
    fn route(&mut self, msg: Message) {
        let topic = msg.topic.clone();
        let Some(route) = self.routes.get(&topic) else {
            metrics::counter!("twinbus_mqtt_unrouted_total", "connection" => self.conn.name.clone()).increment(1);
            match msg.oversized {
                Some(bytes) => tracing::warn!(connection = %self.conn.name, %topic, bytes, "an oversized message on a topic nobody handles was dropped"),
                None => tracing::debug!(connection = %self.conn.name, %topic, "message on a topic nobody handles"),
            }
            return;
        };
        if route.inbox.try_send(msg).is_err() {
            metrics::counter!("twinbus_mqtt_dropped_total", "connection" => self.conn.name.clone()).increment(1);
            match &route.overflow {
                Some(overflow) => {
                    tracing::warn!(connection = %self.conn.name, %topic, "message dropped: the twin adapter is busy; it will fetch the current state again");
                    overflow.notify_one();
                }
                None => tracing::warn!(connection = %self.conn.name, %topic, "message dropped: the twin adapter is busy"),
            }
        }
    }

    /// Takes in what the link reported before rumqttc's next event: a cause
    /// for the error it brings, or an oversized message that came before
    /// the publish it brings (the link reports before relaying further).
    fn drain_link(&mut self) {
        while let Ok(ev) = self.link.try_recv() {
            self.on_link(ev);
        }
    }

    fn on_link(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::Failed(cause) => self.link_error = Some(cause),
            // The link logged and counted it; the adapter answers it.
            LinkEvent::Oversized { topic, bytes, properties } => {
                self.route(Message { topic, payload: Bytes::new(), properties, oversized: Some(bytes) });
            }
        }
    }

    fn on_error(&mut self, error: String) {
        let was_connected = std::mem::replace(&mut self.connected, false);
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
