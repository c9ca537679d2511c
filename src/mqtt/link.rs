//! The link: the gateway's own transport under rumqttc.
//!
//! Why it exists: rumqttc closes the connection when a packet exceeds its
//! size limit, and a broker redelivers an unacknowledged message at every
//! reconnect, so one oversized command on a persistent session kept every
//! twin of that connection offline for good (issue 7). rumqttc has no hook to
//! skip a packet and none for a custom connector, but it can connect to a
//! Unix socket. So each connection gets a link: it listens on a Unix socket
//! in a private directory, rumqttc always connects there, and for each
//! connection rumqttc makes, the link dials the real broker (TCP, TLS,
//! WebSocket, HTTP CONNECT or SOCKS5 proxy: `dial.rs`) and relays the bytes.
//!
//! The relay frames MQTT in both directions (`frame.rs`, sans IO). A broker's
//! PUBLISH larger than [`READ_LIMIT`] never reaches rumqttc: the link reads
//! its topic and packet id, acknowledges it to the broker itself (between
//! two of rumqttc's packets, as soon as it has the id, so that a connection
//! lost while the rest streams past does not bring it back), counts it
//! (`twinbus_mqtt_oversized_total`), logs it, reports it to the connection
//! actor, which has it answered, and lets the rest stream past in constant
//! memory. Meanwhile it answers rumqttc's pings itself (the broker's answer
//! waits behind that packet; on a slow link rumqttc's keep-alive would run
//! out). Packets no broker may send are dropped, counted and logged the same
//! way. Everything else passes through unchanged. So no well-formed packet a
//! broker sends can close the connection, and a redelivered message cannot
//! cause a reconnect loop.
//!
//! The link also knows why an attempt failed (DNS, refused, certificate,
//! proxy, WebSocket status), which rumqttc, seeing only a closed socket,
//! cannot: it reports that to the actor ([`LinkEvent::Failed`]) before it
//! closes rumqttc's socket, so the actor has it when rumqttc's error comes.
//!
//! The socket directory (`$TMPDIR/twinbus-PID`, mode 0700) is removed when
//! the last link stops; the link accepts only peers running as our own user,
//! since whoever connects gets a session with the gateway's credentials.

mod dial;
mod frame;

use std::collections::{HashSet, VecDeque};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) use dial::Target;
use frame::{Ack, Inbound, Out, Outbound, Report};

use super::session::Properties;

/// The largest broker packet handed to rumqttc, in bytes on the wire. Well
/// above the 256 KiB command limit, so that a command up to this size is
/// read whole and refused with its id; a larger one is refused without.
pub(crate) const READ_LIMIT: usize = 1024 * 1024;

/// How long reaching the broker may take (TCP, proxy, TLS, WebSocket);
/// below rumqttc's 10 s connection timeout, so that the real cause arrives
/// before rumqttc gives up on its own.
const DIAL_TIMEOUT: Duration = Duration::from_secs(8);

/// Bytes rumqttc may send while the broker is being dialed (its CONNECT).
const MAX_EARLY: usize = 64 * 1024;

/// Each direction's read buffer. Packets are parsed as a stream, so its size
/// only sets how many reads a large packet takes; it is paid per connection
/// (zeroed, so resident), and at 64 KiB two of them were 128 KiB of every
/// OCI-style twin's 127 KiB.
const BUF: usize = 8 * 1024;

/// What the link tells the connection actor.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// Why an attempt failed or a connection ended, in words for `session::explain`.
    Failed(String),
    /// A message too large to read was discarded and acknowledged;
    /// `bytes` is its payload's size.
    Oversized { topic: String, bytes: usize, properties: Option<Properties> },
}

/// What every relay of one link shares.
#[derive(Debug)]
struct Ctx {
    connection: String,
    target: Target,
    v5: bool,
    events: mpsc::UnboundedSender<LinkEvent>,
    /// Packet ids the link answered with a PUBREC; see `Inbound::feed`.
    released: Mutex<HashSet<u16>>,
}

/// Starts the link of one connection; returns the socket path for rumqttc.
/// Runs until `cancel` fires.
pub(crate) fn start(
    connection: &str,
    target: Target,
    v5: bool,
    events: mpsc::UnboundedSender<LinkEvent>,
    tasks: &crate::lifecycle::Tasks,
    cancel: CancellationToken,
) -> anyhow::Result<PathBuf> {
    let bound = Bound::new().map_err(|e| {
        anyhow::anyhow!("cannot open the link's Unix socket under {} (set TMPDIR to a short, writable directory): {e}", std::env::temp_dir().display())
    })?;
    let path = bound.file.0.clone();
    let ctx = Arc::new(Ctx { connection: connection.to_string(), target, v5, events, released: Mutex::new(HashSet::new()) });
    tasks.spawn(&format!("connection {connection} (link)"), serve(bound, ctx, cancel));
    Ok(path)
}

/// Accepts rumqttc's connections, one at a time: a new one replaces the old
/// (rumqttc reconnecting), so a dead relay never blocks the next attempt.
async fn serve(bound: Bound, ctx: Arc<Ctx>, cancel: CancellationToken) {
    let mut current: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let accepted = tokio::select! {
            a = bound.listener.accept() => a,
            () = cancel.cancelled() => break,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(connection = %ctx.connection, "the link cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        match client.peer_cred() {
            Ok(cred) if cred.uid() == bound.dir.uid => {}
            Ok(cred) => {
                tracing::warn!(connection = %ctx.connection, uid = cred.uid(), "the link refused a connection from another user");
                continue;
            }
            Err(e) => {
                tracing::warn!(connection = %ctx.connection, "the link refused a connection whose user it cannot check: {e}");
                continue;
            }
        }
        if let Some(old) = current.take() {
            old.abort();
        }
        current = Some(tokio::spawn(connect(client, ctx.clone())));
    }
    // rumqttc's DISCONNECT may still be on its way to the broker.
    if let Some(last) = current {
        let abort = last.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), last).await.is_err() {
            abort.abort();
        }
    }
}

/// One connection of rumqttc: dial the broker, then relay.
async fn connect(client: UnixStream, ctx: Arc<Ctx>) {
    let (mut from_client, to_client) = client.into_split();
    // rumqttc's CONNECT waits here while the broker is dialed; reading it
    // also tells when rumqttc gives up, so that a late failure is not
    // reported against its next attempt.
    let mut early = Vec::new();
    let dialed = tokio::select! {
        r = tokio::time::timeout(DIAL_TIMEOUT, dial::dial(&ctx.target)) => {
            r.unwrap_or_else(|_| Err(format!("no answer from {}:{} within {DIAL_TIMEOUT:?} (timed out)", ctx.target.host, ctx.target.port)))
        }
        () = client_gone(&mut from_client, &mut early) => return,
    };
    match dialed {
        Ok(broker) => {
            if let Err(cause) = relay(from_client, to_client, early, broker, &ctx).await {
                ctx.fail(cause);
            }
        }
        Err(cause) => ctx.fail(cause),
    }
}

async fn client_gone(from_client: &mut OwnedReadHalf, early: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        if early.len() > MAX_EARLY {
            std::future::pending::<()>().await;
        }
        match from_client.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => early.extend_from_slice(&buf[..n]),
        }
    }
}

/// Relays until either side closes. `Err` carries a cause on the broker's
/// side (rumqttc closing is not one: it knows why).
async fn relay(
    mut from_client: OwnedReadHalf,
    mut to_client: OwnedWriteHalf,
    early: Vec<u8>,
    broker: Box<dyn dial::Stream>,
    ctx: &Ctx,
) -> Result<(), String> {
    let (mut from_broker, mut to_broker) = tokio::io::split(broker);
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<Ack>();
    let (pings_tx, mut pings_rx) = mpsc::unbounded_channel::<()>();
    // Each side ends with Ok(true) when rumqttc has gone, Err on the broker's side.
    let ended = {
        let up = async {
            let mut outbound = Outbound::default();
            let mut acks = VecDeque::new();
            let mut out = Vec::new();
            let mut buf = vec![0u8; BUF];
            let (mut early, mut n) = (Some(early), 0);
            loop {
                let fed = match early.take() {
                    Some(e) => outbound.feed(&e, &mut acks, &mut out),
                    None => outbound.feed(&buf[..n], &mut acks, &mut out),
                };
                fed.map_err(|e| format!("the MQTT client sent {e}"))?;
                for _ in 0..outbound.take_pings() {
                    let _ = pings_tx.send(());
                }
                if !out.is_empty() {
                    to_broker.write_all(&out).await.map_err(|e| format!("writing to the broker: {e}"))?;
                    to_broker.flush().await.map_err(|e| format!("writing to the broker: {e}"))?;
                    out.clear();
                }
                n = 0;
                tokio::select! {
                    r = from_client.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return Ok(true),
                        Ok(read) => n = read,
                    },
                    Some(ack) = acks_rx.recv() => acks.push_back(ack),
                }
            }
        };
        let down = async {
            let mut inbound = Inbound::new(READ_LIMIT, ctx.v5);
            let mut out = Out::default();
            let mut buf = vec![0u8; BUF];
            loop {
                let read = tokio::select! {
                    r = from_broker.read(&mut buf) => r,
                    Some(()) = pings_rx.recv() => {
                        inbound.client_pinged();
                        continue;
                    }
                };
                let n = match read {
                    Ok(0) if inbound.connected() => return Err("the broker closed the connection".to_string()),
                    Ok(0) => return Err("the broker closed the connection before answering CONNECT".to_string()),
                    Ok(n) => n,
                    Err(e) => return Err(format!("reading from the broker: {e}")),
                };
                // A PINGREQ is announced before it is written to the broker, so
                // one whose PINGRESP is in this read is counted before it.
                while pings_rx.try_recv().is_ok() {
                    inbound.client_pinged();
                }
                let mut input = &buf[..n];
                while !input.is_empty() {
                    let used = {
                        let mut released = ctx.released.lock().unwrap_or_else(PoisonError::into_inner);
                        inbound.feed(input, &mut released, &mut out)
                    };
                    let used = used.map_err(|e| {
                        metrics::counter!("twinbus_mqtt_broker_packets_dropped_total", "connection" => ctx.connection.clone(), "packet" => "malformed").increment(1);
                        format!("the broker sent {e}: closing the connection")
                    })?;
                    input = &input[used..];
                    if !out.to_client.is_empty() {
                        if to_client.write_all(&out.to_client).await.is_err() {
                            return Ok(true); // rumqttc has gone
                        }
                        out.to_client.clear();
                    }
                    for ack in out.acks.drain(..) {
                        let _ = acks_tx.send(ack);
                    }
                    for report in out.reports.drain(..) {
                        ctx.report(report);
                    }
                }
                for _ in 0..inbound.pings_to_answer() {
                    if to_client.write_all(&frame::PINGRESP_BYTES).await.is_err() {
                        return Ok(true);
                    }
                }
            }
        };
        tokio::select! {
            r = up => r,
            r = down => r,
        }
    };
    if ended? {
        // rumqttc closed: let its last packet (DISCONNECT) reach the broker.
        let _ = tokio::time::timeout(Duration::from_secs(1), to_broker.shutdown()).await;
    }
    Ok(())
}

impl Ctx {
    fn fail(&self, cause: String) {
        tracing::debug!(connection = %self.connection, "link: {cause}");
        let _ = self.events.send(LinkEvent::Failed(cause));
    }

    fn report(&self, report: Report) {
        match report {
            Report::Oversized { topic, bytes, packet, properties } => {
                metrics::counter!("twinbus_mqtt_oversized_total", "connection" => self.connection.clone()).increment(1);
                tracing::warn!(
                    connection = %self.connection,
                    %topic,
                    bytes,
                    packet,
                    limit = READ_LIMIT,
                    "a message larger than the gateway reads was discarded and acknowledged to the broker"
                );
                let _ = self.events.send(LinkEvent::Oversized { topic, bytes, properties });
            }
            Report::Dropped { packet, bytes, why } => {
                metrics::counter!("twinbus_mqtt_broker_packets_dropped_total", "connection" => self.connection.clone(), "packet" => packet).increment(1);
                tracing::warn!(connection = %self.connection, packet, bytes, "dropped a packet from the broker: {why}");
            }
        }
    }
}

/// The process's socket directory, shared by its links while any runs.
static DIR: Mutex<Weak<SocketDir>> = Mutex::new(Weak::new());
/// Names the sockets of one process apart.
static NEXT: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct SocketDir {
    path: PathBuf,
    /// Our user: the directory's owner, since we created it.
    uid: u32,
}

impl SocketDir {
    /// Always a directory of our own making, never one found in place: a
    /// name that is taken (a crashed process had our pid, or someone else
    /// made it) gets a suffix.
    fn create() -> io::Result<SocketDir> {
        let base = std::env::temp_dir();
        let pid = std::process::id();
        for n in 0..100 {
            let path = base.join(if n == 0 { format!("twinbus-{pid}") } else { format!("twinbus-{pid}.{n}") });
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let uid = std::fs::metadata(&path)?.uid();
                    return Ok(SocketDir { path, uid });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!("too many twinbus-{pid}.* directories already exist")))
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        // Under the lock: a link starting now either still finds this
        // directory alive or makes a new one, never loses one being removed.
        let _slot = DIR.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = std::fs::remove_dir(&self.path);
    }
}

/// A socket file, removed when its link stops.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A listening link socket. Fields drop in order: socket, file, directory.
#[derive(Debug)]
struct Bound {
    listener: UnixListener,
    file: SocketFile,
    dir: Arc<SocketDir>,
}

impl Bound {
    fn new() -> io::Result<Bound> {
        let mut slot = DIR.lock().unwrap_or_else(PoisonError::into_inner);
        let dir = match slot.upgrade() {
            Some(dir) => dir,
            None => {
                let dir = Arc::new(SocketDir::create()?);
                *slot = Arc::downgrade(&dir);
                dir
            }
        };
        let path = dir.path.join(format!("{}.sock", NEXT.fetch_add(1, Ordering::Relaxed)));
        let listener = UnixListener::bind(&path);
        // Released before `dir` can drop on an error: its Drop takes the lock.
        drop(slot);
        Ok(Bound { listener: listener?, file: SocketFile(path), dir })
    }
}

/// The socket path rumqttc connects to, as its "host".
pub(crate) fn socket_address(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_socket_directory_is_private_and_goes_away_with_the_last_link() {
        let (a, b) = (Bound::new().expect("bind"), Bound::new().expect("bind"));
        let dir = a.dir.path.clone();
        assert_eq!(b.dir.path, dir, "one directory per process");
        let mode = std::fs::metadata(&dir).expect("dir").mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "only the owner may enter: {mode:o}");
        let file = a.file.0.clone();
        drop(a);
        assert!(!file.exists(), "a stopped link removes its socket");
        assert!(dir.exists(), "the other link still uses the directory");
        drop(b);
        assert!(!dir.exists(), "removed with the last link");
    }
}
