//! The one MQTT client of the tests and the latency example: it plays the
//! cloud, a device or the shadow service against the embedded broker or Mosquitto.
//!
//! rumqttc wants its event loop polled by a task of its own, and each test double
//! used to write that loop again. [`Mqtt`] runs it once for all of them, MQTT 3.1.1
//! or 5: it subscribes again after every CONNACK (a restarted broker forgot the
//! subscriptions), keeps a [`Status`] that waits can watch (connected, subscribed,
//! SUBACKs, PUBACKs), and either queues what arrives for the `next*` waits or hands
//! it to a handler in arrival order. After a connection error it tries again every
//! 100 ms, as a client of a restarting broker must, but only as long as the [`Mqtt`]
//! lives: dropping it aborts the task, so nothing outlives its test.
//!
//! `examples/latency.rs` includes this file by path, so it uses nothing else from
//! `tests/support`, and it reports failures as [`Error`] instead of panicking; only
//! [`Message::json`] panics, for tests.
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as p5;
pub use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::{NetworkOptions, QoS};
use serde_json::Value as Json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// How long [`Mqtt::connect`] and [`Mqtt::subscribe`] wait for the broker unless
/// [`Options::wait`] says otherwise.
pub const WAIT: Duration = Duration::from_secs(10);
/// Pause after a connection error before rumqttc tries again.
const RETRY: Duration = Duration::from_millis(100);
/// rumqttc's request queue: publishes wait here for the event loop.
const REQUESTS: usize = 256;

/// Which protocol a client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V311,
    V5,
}

/// How to connect. What is not set is rumqttc's default, so that each test keeps
/// the session it had before this client existed.
#[derive(Clone, Debug)]
pub struct Options {
    client_id: String,
    version: Version,
    keep_alive: Option<Duration>,
    clean_session: bool,
    max_packet: Option<usize>,
    subscriptions: Vec<String>,
    nodelay: bool,
    wait: Duration,
    login: Option<(String, String)>,
}

impl Options {
    /// MQTT 3.1.1 with a clean session, as `client_id`.
    pub fn new(client_id: impl Into<String>) -> Options {
        Options {
            client_id: client_id.into(),
            version: Version::V311,
            keep_alive: None,
            clean_session: true,
            max_packet: None,
            subscriptions: Vec::new(),
            nodelay: false,
            wait: WAIT,
            login: None,
        }
    }

    /// Log in with a user name and password.
    pub fn login(mut self, user: &str, password: &str) -> Options {
        self.login = Some((user.to_string(), password.to_string()));
        self
    }

    /// Speak MQTT 5 (needed for publish properties).
    pub fn mqtt5(mut self) -> Options {
        self.version = Version::V5;
        self
    }

    pub fn keep_alive(mut self, keep_alive: Duration) -> Options {
        self.keep_alive = Some(keep_alive);
        self
    }

    /// `false` resumes the broker's session (MQTT 5: clean start off).
    pub fn clean_session(mut self, clean: bool) -> Options {
        self.clean_session = clean;
        self
    }

    /// The largest packet sent or accepted (rumqttc's default is 10 KiB, less than
    /// a shadow document with metadata).
    pub fn max_packet(mut self, bytes: usize) -> Options {
        self.max_packet = Some(bytes);
        self
    }

    /// Topic filters (QoS 1) subscribed after every CONNACK; [`Mqtt::connect`]
    /// returns once the broker acknowledged them.
    pub fn subscribe<T: Into<String>>(mut self, topics: impl IntoIterator<Item = T>) -> Options {
        self.subscriptions.extend(topics.into_iter().map(Into::into));
        self
    }

    /// TCP_NODELAY, for measurements: without it a small answer can wait ≈ 40 ms
    /// for the kernel (Nagle + delayed ACK).
    pub fn nodelay(mut self) -> Options {
        self.nodelay = true;
        self
    }

    /// How long connecting and subscribing wait for the broker.
    pub fn wait(mut self, wait: Duration) -> Options {
        self.wait = wait;
        self
    }
}

/// A message received.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    /// MQTT 5 only, and only when the sender set some.
    pub properties: Option<PublishProperties>,
}

impl Message {
    /// The payload as JSON. Panics, naming the topic, when it is not.
    pub fn json(&self) -> Json {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| panic!("non-JSON on {}: {e}", self.topic))
    }

    /// The payload as text, invalid UTF-8 replaced.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(&self.payload)
    }
}

/// What the event loop has seen, for waits to watch ([`Mqtt::watch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// A CONNACK came, and no error since.
    pub connected: bool,
    /// Connected, and the broker acknowledged the subscriptions sent after that
    /// CONNACK (or there are none).
    pub subscribed: bool,
    /// SUBACKs received since the start, all sessions together.
    pub subacks: u64,
    /// Filters the broker refused in those SUBACKs (a failure return code).
    pub refused: u64,
    /// PUBACKs received since the start, all sessions together.
    pub pubacks: u64,
    /// The last connection error, cleared by the next CONNACK.
    pub last_error: Option<String>,
}

/// A failure to reach the broker or to hand it a request.
#[derive(Debug)]
pub struct Error(String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

/// A connected client. Dropping it stops its event loop.
pub struct Mqtt {
    client: Client,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Message>,
    /// Messages a [`Mqtt::next_matching`] passed over, oldest first.
    kept: VecDeque<Message>,
    port: u16,
    wait: Duration,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt").field("port", &self.port).field("status", &*self.shared.status.borrow()).finish_non_exhaustive()
    }
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A publishing handle for another task; it does not keep the event loop alive.
#[derive(Clone, Debug)]
pub struct Publisher {
    client: Client,
}

impl Publisher {
    /// Queues a QoS 1 publish (not retained). `Ok` means rumqttc took it, not that
    /// the broker did: watch [`Status::pubacks`] for that.
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.client.publish(topic, payload.into(), None).await
    }
}

/// What the event loop and the client's methods share.
struct Shared {
    /// Filters subscribed after every CONNACK; [`Mqtt::subscribe`] adds to them.
    subscriptions: Mutex<Vec<String>>,
    status: watch::Sender<Status>,
}

impl Shared {
    fn subscriptions(&self) -> Vec<String> {
        self.subscriptions.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Where received messages go.
enum Sink {
    Queue(mpsc::UnboundedSender<Message>),
    Handler(Box<dyn Fn(Message) + Send + Sync>),
}

impl Mqtt {
    /// Connects to the broker on 127.0.0.1:`port` and returns once it is connected
    /// and has acknowledged [`Options::subscribe`]'s filters. Messages are queued
    /// for the `next*` methods.
    pub async fn connect(port: u16, options: Options) -> Result<Mqtt, Error> {
        let (tx, rx) = mpsc::unbounded_channel();
        Self::start(port, options, Sink::Queue(tx), rx).await
    }

    /// Like [`Mqtt::connect`], but every message goes to `handler`, called in
    /// arrival order on the event loop's task (so it must not block), and the
    /// `next*` methods see nothing. For a test double that answers requests.
    pub async fn connect_handling(port: u16, options: Options, handler: impl Fn(Message) + Send + Sync + 'static) -> Result<Mqtt, Error> {
        let (_, rx) = mpsc::unbounded_channel();
        Self::start(port, options, Sink::Handler(Box::new(handler)), rx).await
    }

    async fn start(port: u16, options: Options, sink: Sink, inbox: mpsc::UnboundedReceiver<Message>) -> Result<Mqtt, Error> {
        let (client, events) = build(port, &options);
        let shared = Arc::new(Shared { subscriptions: Mutex::new(options.subscriptions), status: watch::channel(Status::default()).0 });
        let task = tokio::spawn(run(events, client.clone(), shared.clone(), sink));
        let mqtt = Mqtt { client, shared, inbox, kept: VecDeque::new(), port, wait: options.wait, task };
        let what = if mqtt.shared.subscriptions().is_empty() { "CONNACK" } else { "SUBACK" };
        mqtt.wait_status(mqtt.wait, |s| s.subscribed).await.map_err(|e| Error(format!("no {what} {e}")))?;
        Ok(mqtt)
    }

    /// Subscribes to more filters (QoS 1), also after every later CONNACK, and
    /// waits for the broker's SUBACK.
    pub async fn subscribe<T: Into<String>>(&self, topics: impl IntoIterator<Item = T>) -> Result<(), Error> {
        let topics: Vec<String> = topics.into_iter().map(Into::into).collect();
        let before = self.status().subacks;
        self.shared.subscriptions.lock().unwrap_or_else(PoisonError::into_inner).extend(topics.iter().cloned());
        self.client.subscribe(&topics).await?;
        self.wait_status(self.wait, |s| s.subacks > before).await.map_err(|e| Error(format!("no SUBACK for {topics:?} {e}")))?;
        Ok(())
    }

    /// Queues a QoS 1 publish (not retained); see [`Publisher::publish`].
    pub async fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.client.publish(topic, payload.into(), None).await
    }

    /// Queues a QoS 1 publish with MQTT 5 properties (an error on MQTT 3.1.1).
    pub async fn publish_with(&self, topic: &str, payload: impl Into<Bytes>, properties: PublishProperties) -> Result<(), Error> {
        self.client.publish(topic, payload.into(), Some(properties)).await
    }

    /// A handle that publishes from another task.
    pub fn publisher(&self) -> Publisher {
        Publisher { client: self.client.clone() }
    }

    /// Sends DISCONNECT (the broker then drops no Last Will); the event loop runs on
    /// until the client is dropped.
    pub async fn disconnect(&self) -> Result<(), Error> {
        self.client.disconnect().await
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.shared.status.borrow().clone()
    }

    /// The status, to wait for a change of it.
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.shared.status.subscribe()
    }

    /// Waits until `pred` holds for the status; the error says for how long it did
    /// not, and the last connection error.
    pub async fn wait_status(&self, wait: Duration, pred: impl FnMut(&Status) -> bool) -> Result<Status, Error> {
        let mut rx = self.watch();
        let waited = tokio::time::timeout(wait, rx.wait_for(pred)).await.map(|r| r.map(|s| s.clone()));
        match waited {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) => Err(Error(format!("from 127.0.0.1:{}: the event loop ended", self.port))),
            Err(_) => {
                let last = self.status().last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
                Err(Error(format!("from 127.0.0.1:{} within {wait:?}{last}", self.port)))
            }
        }
    }

    /// The next message on any topic within `wait`.
    pub async fn next(&mut self, wait: Duration) -> Option<Message> {
        self.receive(wait, true, |_| true).await
    }

    /// The next message within `wait` that satisfies `pred`; the others are kept,
    /// in order, for later calls, which look at them first.
    pub async fn next_matching(&mut self, wait: Duration, pred: impl FnMut(&Message) -> bool) -> Option<Message> {
        self.receive(wait, true, pred).await
    }

    /// The next message within `wait` that satisfies `pred`; the others are
    /// dropped, as by a reader that wants only what comes from now on.
    pub async fn next_skipping(&mut self, wait: Duration, pred: impl FnMut(&Message) -> bool) -> Option<Message> {
        self.receive(wait, false, pred).await
    }

    async fn receive(&mut self, wait: Duration, keep: bool, mut pred: impl FnMut(&Message) -> bool) -> Option<Message> {
        if let Some(i) = self.kept.iter().position(&mut pred) {
            return self.kept.remove(i);
        }
        if !keep {
            self.kept.clear();
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // `None` once the deadline passed, or if the event loop is gone.
            let m = tokio::time::timeout_at(deadline, self.inbox.recv()).await.ok().flatten()?;
            if pred(&m) {
                return Some(m);
            }
            if keep {
                self.kept.push_back(m);
            }
        }
    }
}

/// The event loop: polls rumqttc until the task is aborted.
async fn run(mut events: Events, client: Client, shared: Arc<Shared>, sink: Sink) {
    loop {
        match events.poll().await {
            Ok(Seen::ConnAck) => {
                let topics = shared.subscriptions();
                shared.status.send_modify(|s| {
                    s.connected = true;
                    s.subscribed = topics.is_empty();
                    s.last_error = None;
                });
                if !topics.is_empty() {
                    if let Err(e) = client.try_subscribe(&topics) {
                        shared.status.send_modify(|s| s.last_error = Some(e.0));
                    }
                }
            }
            Ok(Seen::SubAck(refused)) => shared.status.send_modify(|s| {
                s.subscribed = s.connected;
                s.subacks += 1;
                s.refused += refused;
            }),
            Ok(Seen::PubAck) => shared.status.send_modify(|s| s.pubacks += 1),
            Ok(Seen::Publish(m)) => match &sink {
                // Fails only once the receiver is dropped, and with it this task.
                Sink::Queue(tx) => drop(tx.send(m)),
                Sink::Handler(handle) => handle(m),
            },
            Ok(Seen::Other) => {}
            Err(e) => {
                shared.status.send_modify(|s| {
                    s.connected = false;
                    s.subscribed = false;
                    s.last_error = Some(e);
                });
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// rumqttc's two clients, each with its own types for the same requests.
#[derive(Clone, Debug)]
enum Client {
    V311(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

/// rumqttc's two event loops (boxed: each is about a kilobyte).
enum Events {
    V311(Box<rumqttc::EventLoop>),
    V5(Box<rumqttc::v5::EventLoop>),
}

/// The events [`run`] reacts to, from either version.
enum Seen {
    ConnAck,
    /// With how many filters it refused.
    SubAck(u64),
    PubAck,
    Publish(Message),
    Other,
}

fn build(port: u16, o: &Options) -> (Client, Events) {
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(o.nodelay);
    match o.version {
        Version::V311 => {
            let mut mqtt = rumqttc::MqttOptions::new(&o.client_id, "127.0.0.1", port);
            mqtt.set_clean_session(o.clean_session);
            if let Some(k) = o.keep_alive {
                mqtt.set_keep_alive(k);
            }
            if let Some(n) = o.max_packet {
                mqtt.set_max_packet_size(n, n);
            }
            if let Some((user, password)) = &o.login {
                mqtt.set_credentials(user, password);
            }
            let (client, mut events) = rumqttc::AsyncClient::new(mqtt, REQUESTS);
            events.set_network_options(network);
            (Client::V311(client), Events::V311(Box::new(events)))
        }
        Version::V5 => {
            let mut mqtt = rumqttc::v5::MqttOptions::new(&o.client_id, "127.0.0.1", port);
            mqtt.set_clean_start(o.clean_session);
            if let Some(k) = o.keep_alive {
                mqtt.set_keep_alive(k);
            }
            if let Some(n) = o.max_packet {
                mqtt.set_max_packet_size(Some(u32::try_from(n).unwrap_or(u32::MAX)));
            }
            if let Some((user, password)) = &o.login {
                mqtt.set_credentials(user, password);
            }
            mqtt.set_network_options(network);
            let (client, events) = rumqttc::v5::AsyncClient::new(mqtt, REQUESTS);
            (Client::V5(client), Events::V5(Box::new(events)))
        }
    }
}

impl Client {
    async fn publish(&self, topic: &str, payload: Bytes, properties: Option<PublishProperties>) -> Result<(), Error> {
        let sent = match (self, properties) {
            (Client::V311(c), None) => c.publish(topic, QoS::AtLeastOnce, false, payload).await.map_err(|e| e.to_string()),
            (Client::V311(_), Some(_)) => Err("publish properties need MQTT 5".to_string()),
            (Client::V5(c), None) => c.publish(topic, QoS5::AtLeastOnce, false, payload).await.map_err(|e| e.to_string()),
            (Client::V5(c), Some(p)) => c.publish_with_properties(topic, QoS5::AtLeastOnce, false, payload, p).await.map_err(|e| e.to_string()),
        };
        sent.map_err(|e| Error(format!("publish on {topic}: {e}")))
    }

    async fn subscribe(&self, topics: &[String]) -> Result<(), Error> {
        let sent = match self {
            Client::V311(c) => c.subscribe_many(filters(topics)).await.map_err(|e| e.to_string()),
            Client::V5(c) => c.subscribe_many(filters5(topics)).await.map_err(|e| e.to_string()),
        };
        sent.map_err(|e| Error(format!("subscribe to {topics:?}: {e}")))
    }

    /// For the event loop, which must not wait on its own request queue.
    fn try_subscribe(&self, topics: &[String]) -> Result<(), Error> {
        let sent = match self {
            Client::V311(c) => c.try_subscribe_many(filters(topics)).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_subscribe_many(filters5(topics)).map_err(|e| e.to_string()),
        };
        sent.map_err(|e| Error(format!("subscribe to {topics:?}: {e}")))
    }

    async fn disconnect(&self) -> Result<(), Error> {
        let sent = match self {
            Client::V311(c) => c.disconnect().await.map_err(|e| e.to_string()),
            Client::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
        sent.map_err(|e| Error(format!("disconnect: {e}")))
    }
}

fn filters(topics: &[String]) -> Vec<rumqttc::SubscribeFilter> {
    topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)).collect()
}

fn filters5(topics: &[String]) -> Vec<p5::Filter> {
    topics.iter().map(|t| p5::Filter::new(t.clone(), QoS5::AtLeastOnce)).collect()
}

impl Events {
    async fn poll(&mut self) -> Result<Seen, String> {
        use rumqttc::v5::Event as E5;
        use rumqttc::{Event as E, Packet as P};
        match self {
            Events::V311(events) => match events.poll().await.map_err(|e| e.to_string())? {
                E::Incoming(P::ConnAck(_)) => Ok(Seen::ConnAck),
                E::Incoming(P::SubAck(a)) => {
                    Ok(Seen::SubAck(a.return_codes.iter().filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)).count() as u64))
                }
                E::Incoming(P::PubAck(_)) => Ok(Seen::PubAck),
                E::Incoming(P::Publish(p)) => {
                    Ok(Seen::Publish(Message { topic: p.topic, payload: p.payload, properties: None }))
                }
                _ => Ok(Seen::Other),
            },
            Events::V5(events) => match events.poll().await.map_err(|e| e.to_string())? {
                E5::Incoming(p5::Packet::ConnAck(_)) => Ok(Seen::ConnAck),
                E5::Incoming(p5::Packet::SubAck(a)) => {
                    Ok(Seen::SubAck(a.return_codes.iter().filter(|c| !matches!(c, p5::SubscribeReasonCode::Success(_))).count() as u64))
                }
                E5::Incoming(p5::Packet::PubAck(_)) => Ok(Seen::PubAck),
                E5::Incoming(p5::Packet::Publish(p)) => Ok(Seen::Publish(Message {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    properties: p.properties,
                })),
                _ => Ok(Seen::Other),
            },
        }
    }
}
