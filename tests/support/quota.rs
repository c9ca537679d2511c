//! A TCP proxy that enforces AWS IoT Core's per-connection quotas in front of
//! any MQTT broker (the embedded one or Mosquitto), so that a gateway that
//! would be refused or throttled in the field fails a test here.
//!
//! Neither test broker enforces what AWS IoT Core does to one connection:
//! - a SUBSCRIBE with more than 8 topic filters: AWS closes the connection;
//! - more than 50 subscriptions: the SUBACK refuses the filters (0x80);
//! - more than 100 publishes or 512 KiB of payload in a second: the publish is
//!   throttled (dropped, so a QoS 1 publish gets no PUBACK);
//! - a payload over 128 KiB, or QoS 2: AWS closes the connection.
//!
//! The proxy does the same and records each as a violation that tests assert
//! on. It frames MQTT 3.1.1 and 5 packets in both directions (so that a SUBACK
//! it answers itself never lands inside a packet of the broker's) and reads
//! only the fields it needs; everything else passes through untouched. It
//! also keeps the time of every publish, to measure a client's pace.
//!
//! `examples/` include this file by path: it uses only std and tokio.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the proxy enforces per connection.
#[derive(Clone, Copy, Debug)]
pub struct Quotas {
    pub filters_per_subscribe: usize,
    pub subscriptions: usize,
    pub publishes_per_second: usize,
    pub bytes_per_second: usize,
    pub max_payload: usize,
}

impl Quotas {
    /// AWS IoT Core's message broker quotas.
    pub const AWS: Quotas = Quotas {
        filters_per_subscribe: 8,
        subscriptions: 50,
        publishes_per_second: 100,
        bytes_per_second: 512 * 1024,
        max_payload: 128 * 1024,
    };
}

/// Dropping it stops accepting; connections already made end with their sockets.
pub struct QuotaProxy {
    port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    violations: Mutex<Vec<String>>,
    /// Per client id, when each of its publishes arrived (forwarded or not).
    publishes: Mutex<HashMap<String, Vec<Instant>>>,
}

impl Shared {
    fn violation(&self, client: &str, what: String) {
        self.violations.lock().unwrap_or_else(PoisonError::into_inner).push(format!("{client}: {what}"));
    }
}

impl std::fmt::Debug for QuotaProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuotaProxy").field("port", &self.port).finish_non_exhaustive()
    }
}

impl Drop for QuotaProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl QuotaProxy {
    /// Listens on a free loopback port and forwards each connection to the
    /// broker on 127.0.0.1:`broker_port`.
    pub async fn start(broker_port: u16, quotas: Quotas) -> io::Result<QuotaProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let accept_shared = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shared = accept_shared.clone();
                tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(("127.0.0.1", broker_port)).await {
                        let _ = client.set_nodelay(true);
                        let _ = upstream.set_nodelay(true);
                        relay(client, upstream, quotas, shared).await;
                    }
                });
            }
        });
        Ok(QuotaProxy { port, shared, task })
    }

    /// Where clients connect.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every quota a client went over, as `client id: what`.
    pub fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The most publishes a client sent within any one second.
    pub fn peak_publishes_per_second(&self, client_id: &str) -> usize {
        let all = self.shared.publishes.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(times) = all.get(client_id) else { return 0 };
        let mut peak = 0;
        let mut start = 0;
        for (i, t) in times.iter().enumerate() {
            while *t - times[start] >= Duration::from_secs(1) {
                start += 1;
            }
            peak = peak.max(i + 1 - start);
        }
        peak
    }

    /// How many publishes a client sent in all.
    pub fn publishes(&self, client_id: &str) -> usize {
        self.shared.publishes.lock().unwrap_or_else(PoisonError::into_inner).get(client_id).map_or(0, Vec::len)
    }
}

/// One client connection, until either side closes or a quota closes it.
async fn relay(client: TcpStream, upstream: TcpStream, quotas: Quotas, shared: Arc<Shared>) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut up_rx, mut up_tx) = upstream.into_split();
    let (to_client, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(packet) = outgoing.recv().await {
            if client_tx.write_all(&packet).await.is_err() {
                break;
            }
        }
    });
    let down = to_client.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(packet)) = read_packet(&mut up_rx).await {
            if down.send(packet).is_err() {
                break;
            }
        }
    });
    let mut conn = Connection { quotas, client: String::from("?"), v5: false, subscriptions: BTreeSet::new(), window: VecDeque::new() };
    while let Ok(Some(packet)) = read_packet(&mut client_rx).await {
        match conn.inspect(&packet, &shared) {
            Verdict::Forward => {
                if up_tx.write_all(&packet).await.is_err() {
                    break;
                }
            }
            Verdict::Drop => {}
            Verdict::Answer(reply) => {
                let _ = to_client.send(reply);
            }
            Verdict::Close => break,
        }
    }
    reader.abort();
    writer.abort();
}

enum Verdict {
    Forward,
    /// Throttled: not forwarded, not answered.
    Drop,
    /// Not forwarded; this goes back to the client instead.
    Answer(Vec<u8>),
    Close,
}

struct Connection {
    quotas: Quotas,
    client: String,
    v5: bool,
    subscriptions: BTreeSet<String>,
    /// (arrival, payload bytes) of the publishes forwarded in the last second.
    window: VecDeque<(Instant, usize)>,
}

impl Connection {
    fn inspect(&mut self, packet: &[u8], shared: &Shared) -> Verdict {
        let Some((kind, flags, body)) = split(packet) else { return Verdict::Close };
        let mut r = Reader(body);
        match kind {
            1 => {
                // CONNECT: protocol name, level, flags, keep alive, [props], client id.
                let _ = r.string();
                self.v5 = r.u8() == Some(5);
                let _ = (r.u8(), r.take(2));
                if self.v5 {
                    r.skip_properties();
                }
                if let Some(id) = r.string() {
                    self.client = id;
                }
                Verdict::Forward
            }
            3 => self.publish(flags, &mut r, shared),
            8 => self.subscribe(&mut r, shared),
            10 => {
                let _ = r.take(2);
                if self.v5 {
                    r.skip_properties();
                }
                while let Some(filter) = r.string() {
                    self.subscriptions.remove(&filter);
                }
                Verdict::Forward
            }
            _ => Verdict::Forward,
        }
    }

    fn publish(&mut self, flags: u8, r: &mut Reader<'_>, shared: &Shared) -> Verdict {
        let qos = (flags >> 1) & 3;
        let topic = r.string().unwrap_or_default();
        if qos > 0 {
            let _ = r.take(2);
        }
        if self.v5 {
            r.skip_properties();
        }
        let size = r.0.len();
        let now = Instant::now();
        shared.publishes.lock().unwrap_or_else(PoisonError::into_inner).entry(self.client.clone()).or_default().push(now);
        if qos == 2 {
            shared.violation(&self.client, format!("QoS 2 publish on {topic} (AWS IoT Core has no QoS 2): connection closed"));
            return Verdict::Close;
        }
        if size > self.quotas.max_payload {
            shared.violation(&self.client, format!("a {size}-byte payload on {topic} (at most {}): connection closed", self.quotas.max_payload));
            return Verdict::Close;
        }
        while self.window.front().is_some_and(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1)) {
            self.window.pop_front();
        }
        if self.window.len() >= self.quotas.publishes_per_second {
            shared.violation(&self.client, format!("publish on {topic} throttled: over {} publishes within a second", self.quotas.publishes_per_second));
            return Verdict::Drop;
        }
        let bytes: usize = self.window.iter().map(|(_, b)| b).sum();
        if bytes + size > self.quotas.bytes_per_second {
            shared.violation(&self.client, format!("publish on {topic} throttled: over {} payload bytes within a second", self.quotas.bytes_per_second));
            return Verdict::Drop;
        }
        self.window.push_back((now, size));
        Verdict::Forward
    }

    fn subscribe(&mut self, r: &mut Reader<'_>, shared: &Shared) -> Verdict {
        let Some(pkid) = r.take(2).map(<[u8]>::to_vec) else { return Verdict::Close };
        if self.v5 {
            r.skip_properties();
        }
        let mut filters = Vec::new();
        while let Some(filter) = r.string() {
            let options = r.u8().unwrap_or(0);
            if options & 3 == 2 {
                shared.violation(&self.client, format!("QoS 2 subscription to {filter} (AWS IoT Core has no QoS 2)"));
            }
            filters.push(filter);
        }
        if filters.len() > self.quotas.filters_per_subscribe {
            shared.violation(
                &self.client,
                format!("a SUBSCRIBE with {} topic filters (at most {}): connection closed", filters.len(), self.quotas.filters_per_subscribe),
            );
            return Verdict::Close;
        }
        let new: BTreeSet<&String> = filters.iter().filter(|f| !self.subscriptions.contains(*f)).collect();
        if self.subscriptions.len() + new.len() > self.quotas.subscriptions {
            shared.violation(
                &self.client,
                format!("{} subscriptions on one connection (at most {}): SUBACK refuses {filters:?}", self.subscriptions.len() + new.len(), self.quotas.subscriptions),
            );
            let mut body = pkid;
            if self.v5 {
                body.push(0); // no properties
            }
            body.extend(std::iter::repeat_n(0x80, filters.len()));
            return Verdict::Answer(packet(0x90, &body));
        }
        self.subscriptions.extend(filters);
        Verdict::Forward
    }
}

/// Reads one whole packet (fixed header included); `None` at end of stream.
async fn read_packet(r: &mut (impl AsyncRead + Unpin)) -> io::Result<Option<Vec<u8>>> {
    let mut first = [0u8; 1];
    if r.read(&mut first).await? == 0 {
        return Ok(None);
    }
    let mut packet = vec![first[0]];
    let mut length: usize = 0;
    for shift in 0..4 {
        let b = r.read_u8().await?;
        packet.push(b);
        length |= usize::from(b & 0x7f) << (7 * shift);
        if b & 0x80 == 0 {
            let start = packet.len();
            packet.resize(start + length, 0);
            r.read_exact(&mut packet[start..]).await?;
            return Ok(Some(packet));
        }
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "malformed remaining length"))
}

/// (packet type, flags, body) of a whole packet.
fn split(packet: &[u8]) -> Option<(u8, u8, &[u8])> {
    let first = *packet.first()?;
    let mut i = 1;
    while packet.get(i)? & 0x80 != 0 {
        i += 1;
    }
    Some((first >> 4, first & 0x0f, packet.get(i + 1..)?))
}

/// A packet with this first byte and body.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn string(&mut self) -> Option<String> {
        let len = self.take(2).map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))?;
        self.take(len).map(|b| String::from_utf8_lossy(b).into_owned())
    }

    fn skip_properties(&mut self) {
        let mut length: usize = 0;
        for shift in 0..4 {
            let Some(b) = self.u8() else { return };
            length |= usize::from(b & 0x7f) << (7 * shift);
            if b & 0x80 == 0 {
                break;
            }
        }
        let _ = self.take(length);
    }
}
