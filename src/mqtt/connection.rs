//! One MQTT session: an event-loop task and a publisher task.
//!
//! The event-loop task only polls rumqttc and forwards: incoming publishes go
//! to the channel registered for their topic; after every CONNACK it
//! resubscribes (rumqttc does not). It never awaits a publish, which would
//! deadlock when rumqttc's request channel is full. Publishing goes through
//! our own bounded queue to a second task. A lost connection is retried after
//! a fixed delay; exponential backoff and a disk outbox come with the
//! connections issue.
//!
//! `publish` returning means queued, not delivered: [`ConnectionHandle::flush`]
//! waits until the queue is empty and every QoS 1 publish has its PUBACK.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet, QoS, TlsConfiguration};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Broker, Connection};

/// Delay before reconnecting after a lost connection.
const RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Largest packet accepted or sent. Raw commands may be 256 KiB; a larger
/// packet must still arrive so that it can be answered with a clear refusal,
/// rather than break the connection (rumqttc's default is 10 KiB).
pub(crate) const MAX_PACKET: usize = 1024 * 1024;

/// An incoming message, handed to the twin adapter subscribed to its topic.
#[derive(Clone, Debug)]
pub struct Message {
    /// Topic it arrived on.
    pub topic: String,
    /// Raw payload, unparsed.
    pub payload: Bytes,
}

/// Topic → the adapter's inbox. Exact topics only (no wildcards).
pub type Routes = HashMap<String, mpsc::Sender<Message>>;

#[derive(Debug)]
struct Publish {
    topic: String,
    payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct Counters {
    /// Publishes in our queue or being handed to rumqttc.
    queued: AtomicUsize,
    /// QoS 1 publishes sent and not yet acknowledged.
    inflight: AtomicUsize,
    connected: AtomicBool,
}

/// How twin adapters publish on a connection; cheap to clone.
#[derive(Clone, Debug)]
pub struct ConnectionHandle {
    /// Connection name, for logs.
    pub name: String,
    tx: mpsc::Sender<Publish>,
    counters: Arc<Counters>,
    client: AsyncClient,
}

impl ConnectionHandle {
    /// Queues a QoS 1 publish. Waits when the queue is full (backpressure).
    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.counters.queued.fetch_add(1, Ordering::SeqCst);
        if self.tx.send(Publish { topic: topic.to_string(), payload }).await.is_err() {
            self.counters.queued.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(connection = %self.name, topic, "publish dropped: the connection is closed");
        }
    }

    /// Whether the session is up.
    pub fn is_connected(&self) -> bool {
        self.counters.connected.load(Ordering::SeqCst)
    }

    /// Waits until everything queued was acknowledged by the broker, or the deadline.
    /// Returns whether it all went out.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let wait = async {
            while self.counters.queued.load(Ordering::SeqCst) + self.counters.inflight.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }

    /// Sends DISCONNECT (after what is already queued in rumqttc).
    pub async fn disconnect(&self) {
        let _ = self.client.disconnect().await;
    }
}

/// Starts one connection. `routes` lists the topics to subscribe to on every
/// connect. The tasks end when `cancel` fires (call `flush` and `disconnect` first).
pub fn spawn_connection(conn: &Connection, routes: Routes, cancel: CancellationToken) -> anyhow::Result<ConnectionHandle> {
    let (host, port, tls) = match &conn.broker {
        Broker::Embedded { listen } => {
            let ip = if listen.ip().is_unspecified() { "127.0.0.1".to_string() } else { listen.ip().to_string() };
            (ip, listen.port(), None)
        }
        Broker::Remote { host, port, tls } => (host.clone(), *port, tls.as_ref()),
    };
    let mut options = MqttOptions::new(conn.client_id.clone(), host.clone(), port);
    options.set_keep_alive(conn.keep_alive);
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options.set_request_channel_capacity(256);
    options.set_clean_session(true);
    if let Some(c) = &conn.credentials {
        options.set_credentials(c.username.clone(), c.password.expose().to_string());
    }
    if let Some(tls) = tls {
        let config = super::tls::client_config(tls)?;
        options.set_transport(rumqttc::Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    }
    let (client, mut eventloop) = AsyncClient::new(options, 256);
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);

    let counters = Arc::new(Counters::default());
    let (tx, rx) = mpsc::channel(1024);
    let name = conn.name.clone();
    let target = format!("{host}:{port}");
    tokio::spawn(event_loop(name.clone(), target, eventloop, client.clone(), routes, counters.clone(), cancel.clone()));
    tokio::spawn(publisher(name.clone(), client.clone(), rx, counters.clone(), cancel));
    Ok(ConnectionHandle { name, tx, counters, client })
}

async fn publisher(name: String, client: AsyncClient, mut rx: mpsc::Receiver<Publish>, counters: Arc<Counters>, cancel: CancellationToken) {
    loop {
        let p = tokio::select! {
            p = rx.recv() => match p { Some(p) => p, None => break },
            () = cancel.cancelled() => break,
        };
        if let Err(e) = client.publish(p.topic.clone(), QoS::AtLeastOnce, false, p.payload).await {
            tracing::warn!(connection = %name, topic = %p.topic, "publish failed: {e}");
        }
        counters.queued.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn event_loop(
    name: String,
    target: String,
    mut eventloop: EventLoop,
    client: AsyncClient,
    routes: Routes,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let topics: Vec<String> = routes.keys().cloned().collect();
    let mut was_down = false;
    loop {
        let event = tokio::select! {
            e = eventloop.poll() => e,
            () = cancel.cancelled() => break,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                counters.connected.store(true, Ordering::SeqCst);
                // A clean session drops what was in flight; our own outbox
                // (a later issue) will resend it. Do not wait for lost acks.
                counters.inflight.store(0, Ordering::SeqCst);
                tracing::info!(connection = %name, broker = %target, "MQTT connected");
                was_down = false;
                if !topics.is_empty() {
                    let client = client.clone();
                    let filters: Vec<rumqttc::SubscribeFilter> =
                        topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce)).collect();
                    let name = name.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.subscribe_many(filters).await {
                            tracing::warn!(connection = %name, "subscribe failed: {e}");
                        }
                    });
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack.return_codes.iter().filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)).count();
                if refused > 0 {
                    tracing::error!(connection = %name, refused, "the broker refused {refused} subscription(s): check its ACLs");
                } else {
                    tracing::debug!(connection = %name, topics = ?topics, "subscribed");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let topic = String::from_utf8_lossy(p.topic.as_ref()).into_owned();
                match routes.get(&topic) {
                    Some(inbox) => {
                        if inbox.try_send(Message { topic: topic.clone(), payload: p.payload }).is_err() {
                            metrics::counter!("twinbus_mqtt_dropped_total", "connection" => name.clone()).increment(1);
                            tracing::warn!(connection = %name, %topic, "message dropped: the twin adapter is busy");
                        }
                    }
                    None => tracing::debug!(connection = %name, %topic, "message on a topic nobody handles"),
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                let _ = counters.inflight.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                counters.inflight.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                counters.connected.store(false, Ordering::SeqCst);
            }
            Ok(_) => {}
            Err(e) => {
                counters.connected.store(false, Ordering::SeqCst);
                if !was_down {
                    tracing::warn!(connection = %name, broker = %target, "MQTT connection lost: {e}; retrying every {}s", RECONNECT_DELAY.as_secs());
                    was_down = true;
                } else {
                    tracing::debug!(connection = %name, "MQTT reconnect failed: {e}");
                }
                tokio::select! {
                    () = tokio::time::sleep(RECONNECT_DELAY) => {}
                    () = cancel.cancelled() => break,
                }
            }
        }
    }
    counters.connected.store(false, Ordering::SeqCst);
}
