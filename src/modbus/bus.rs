//! The bus owner: the one task that talks on a line.
//!
//! RS-485 is half duplex and a Modbus TCP connection carries one transaction
//! at a time, so every request for a line goes through this task, one after
//! the other, in the order [`Queue`](super::queue) decides: a command holds
//! the line for all of its transactions and goes ahead of every poll; polls
//! of answering devices go ahead of probes of offline ones. The task keeps
//! taking requests while a transaction is on the wire, so that a device actor
//! asking for the line never waits for the line to be free just to queue.
//!
//! A poll is a device's whole poll cycle: its reads run back to back (only
//! commands and reads due sooner may go between them), and the cycle stops
//! at the first read that gets no answer, so a dying device costs one timeout, not one per
//! read. Nothing is sent twice here: retries and write verification are the
//! device actor's decisions, since only it knows whether a request may be. Every call has a timeout (tokio-modbus has none). After a
//! timeout or an I/O error the transport is dropped and reopened for the next
//! request: on TCP a late reply would otherwise answer the next request. The
//! configured `delay` of silence is kept between transactions. A transaction
//! that has started always finishes (or times out): requests are withdrawn
//! only while they wait, so a frame is never cut.
//!
//! Every transaction gets a sequence number, rising in the order the line
//! ran them, so that a device actor can tell which of two answers is newer.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_modbus::client::{Client, Context, Reader, Writer};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::Slave;

use super::queue::{LeaseId, Next, PollKind, Queue, Waiting};
use crate::config::{Bus, Transport};

/// One Modbus function with its arguments.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Function 1.
    ReadCoils(u16, u16),
    /// Function 2.
    ReadDiscreteInputs(u16, u16),
    /// Function 4.
    ReadInputRegisters(u16, u16),
    /// Function 3.
    ReadHoldingRegisters(u16, u16),
    /// Function 5 for one coil, 15 for several.
    WriteCoils(u16, Vec<bool>),
    /// Function 6 for one register, 16 for several.
    WriteRegisters(u16, Vec<u16>),
    /// Function 22: (address, AND mask, OR mask).
    MaskWriteRegister(u16, u16, u16),
}

impl Op {
    /// Whether it changes the device.
    pub fn is_write(&self) -> bool {
        matches!(self, Op::WriteCoils(..) | Op::WriteRegisters(..) | Op::MaskWriteRegister(..))
    }
}

/// What a successful transaction returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// Bits read.
    Bits(Vec<bool>),
    /// Registers read.
    Words(Vec<u16>),
    /// The write was confirmed by the device.
    Written,
}

/// Why a transaction failed. A device that answers with an exception is
/// alive; the others mean the device or the line is not answering.
#[derive(Clone, Debug, PartialEq)]
pub enum BusError {
    /// No answer within the bus timeout.
    Timeout(Duration),
    /// The device answered with a Modbus exception: its code (0x0A and 0x0B
    /// come from a Modbus gateway in front of the device, not from it).
    Exception(u8),
    /// The line could not be opened, or broke.
    Transport(String),
    /// The bus owner has stopped (shutdown).
    Closed,
}

/// Exception 0x06: the device is busy and wants the request again later;
/// it did not carry it out.
pub(crate) const BUSY: u8 = 0x06;

impl BusError {
    /// Whether the error says the device is unreachable (not merely refusing).
    /// Exceptions 0x0A (gateway path unavailable) and 0x0B (gateway target
    /// failed to respond) are a Modbus gateway's way of saying that the
    /// device behind it did not answer: the gateway is there, the device is
    /// not, so they count as silence.
    pub fn is_unreachable(&self) -> bool {
        !matches!(self, BusError::Exception(code) if !is_gateway_failure(*code))
    }

    /// Whether the device answered "busy, ask again later" (exception 0x06).
    pub fn is_busy(&self) -> bool {
        matches!(self, BusError::Exception(BUSY))
    }
}

fn is_gateway_failure(code: u8) -> bool {
    matches!(code, 0x0A | 0x0B)
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::Timeout(d) => write!(f, "no answer from the device within {}", humantime::format_duration(*d)),
            BusError::Exception(code) if is_gateway_failure(*code) => {
                write!(f, "the Modbus gateway in front of the device answered exception {}", exception_name(*code))
            }
            BusError::Exception(code) => write!(f, "the device refused: Modbus exception {}", exception_name(*code)),
            BusError::Transport(e) => write!(f, "{e}"),
            BusError::Closed => write!(f, "the bus is shutting down"),
        }
    }
}

/// The outcome of one transaction, with its place in the line's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Done {
    /// Rises with every transaction the line runs; 0 when none ran (the bus
    /// had stopped). A larger number is a newer answer.
    pub seq: u64,
    /// What the device answered.
    pub result: Result<Reply, BusError>,
}

impl Done {
    fn closed() -> Done {
        Done { seq: 0, result: Err(BusError::Closed) }
    }
}

/// A poll cycle waiting for its answers: one [`Done`] per read that ran, in
/// order; the last is the failure that stopped the cycle, if one did.
pub type PendingPoll = oneshot::Receiver<Vec<Done>>;

#[derive(Debug)]
struct Job {
    unit: u8,
    /// Whose transactions these are, for the metrics.
    device: Arc<str>,
    /// Still to run, in order, each with the deadline it waits by.
    ops: VecDeque<(Op, Instant)>,
    done: Vec<Done>,
    /// The tier a poll goes back to between its reads; `None` for a call
    /// under a lease (one transaction).
    kind: Option<PollKind>,
    reply: oneshot::Sender<Vec<Done>>,
}

impl Job {
    fn new(unit: u8, device: &Arc<str>, ops: impl IntoIterator<Item = (Op, Instant)>, kind: Option<PollKind>) -> (Job, oneshot::Receiver<Vec<Done>>) {
        let (reply, answer) = oneshot::channel();
        (Job { unit, device: device.clone(), ops: ops.into_iter().collect(), done: Vec::new(), kind, reply }, answer)
    }

    /// The deadline of its next read.
    fn deadline(&self) -> Instant {
        self.ops.front().map_or_else(Instant::now, |(_, d)| *d)
    }
}

impl Waiting for Job {
    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

#[derive(Debug)]
struct LeaseAsk {
    unit: u8,
    device: Arc<str>,
    grant: oneshot::Sender<Lease>,
}

impl Waiting for LeaseAsk {
    fn abandoned(&self) -> bool {
        self.grant.is_closed()
    }
}

#[derive(Debug)]
enum Msg {
    Poll(Job),
    Lease(LeaseAsk),
    Call(LeaseId, Job),
}

/// Which tier a one-off transaction ([`BusHandle::call`]) waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Ahead of every poll, like a command.
    Command,
    /// With the routine polls.
    Poll,
}

/// The sending side of a bus; cheap to clone, one per device actor.
#[derive(Clone, Debug)]
pub struct BusHandle {
    tx: mpsc::Sender<Msg>,
    /// The device whose actor holds this handle (its transactions are
    /// counted under its name), or what else uses the line.
    device: Arc<str>,
}

impl BusHandle {
    /// This handle, for the actor of device `name`.
    pub fn for_device(&self, name: &str) -> BusHandle {
        BusHandle { tx: self.tx.clone(), device: Arc::from(name) }
    }

    /// Queues the reads of one poll cycle, each with the deadline it waits
    /// by (polls are served earliest deadline first), and returns at once;
    /// the answers come on the returned receiver. Dropping the receiver
    /// withdraws what has not started.
    pub async fn poll(&self, unit: u8, ops: Vec<(Op, Instant)>, kind: PollKind) -> PendingPoll {
        let (job, answer) = Job::new(unit, &self.device, ops, Some(kind));
        // A failed send drops the job: the receiver then says the bus is gone.
        let _ = self.tx.send(Msg::Poll(job)).await;
        answer
    }

    /// One transaction for a caller that is not a device actor (commissioning
    /// tools): `retries` extra attempts after silence for a read; a write is
    /// sent once, since only a read-back could tell whether sending it again
    /// is safe (device actors do that).
    pub async fn call(&self, priority: Priority, unit: u8, op: Op, retries: u8) -> Result<Reply, BusError> {
        let attempts = if op.is_write() { 1 } else { u16::from(retries) + 1 };
        let lease = match priority {
            Priority::Command => Some(self.lease(unit).await?),
            Priority::Poll => None,
        };
        let mut last = Done::closed();
        for _ in 0..attempts {
            last = match &lease {
                Some(lease) => lease.call(op.clone()).await,
                None => self.poll(unit, vec![(op.clone(), Instant::now())], PollKind::Routine).await.await.ok().and_then(|mut d| d.pop()).unwrap_or_else(Done::closed),
            };
            if !matches!(&last.result, Err(e) if e.is_unreachable()) {
                break;
            }
        }
        last.result
    }

    /// Waits until the line is free of other commands and of the transaction
    /// on the wire, then holds it for a command's transactions until the
    /// returned [`Lease`] is dropped. Polls wait meanwhile.
    pub async fn lease(&self, unit: u8) -> Result<Lease, BusError> {
        let (grant, granted) = oneshot::channel();
        self.tx.send(Msg::Lease(LeaseAsk { unit, device: self.device.clone(), grant })).await.map_err(|_| BusError::Closed)?;
        granted.await.map_err(|_| BusError::Closed)
    }
}

/// The line, held for one command. Hold it only across calls on it: the
/// line waits for the holder, so awaiting anything else meanwhile stalls
/// every device on the bus.
#[derive(Debug)]
pub struct Lease {
    id: LeaseId,
    unit: u8,
    device: Arc<str>,
    tx: mpsc::Sender<Msg>,
    /// Dropped with the lease, which tells the bus owner the line is free.
    held: oneshot::Sender<()>,
}

impl Lease {
    /// Runs one transaction with the lease's unit, next on the wire.
    pub async fn call(&self, op: Op) -> Done {
        let (job, answer) = Job::new(self.unit, &self.device, [(op, Instant::now())], None);
        if self.tx.send(Msg::Call(self.id, job)).await.is_err() {
            return Done::closed();
        }
        answer.await.ok().and_then(|mut d| d.pop()).unwrap_or_else(Done::closed)
    }

    /// Gives the line up for `wait` (a device that needs time: busy, or
    /// slow to show a write), so that others use it meanwhile, then waits
    /// for it again, behind the commands that asked before.
    pub async fn pause(&mut self, wait: Duration) -> Result<(), BusError> {
        let (placeholder, _) = oneshot::channel();
        drop(std::mem::replace(&mut self.held, placeholder));
        tokio::time::sleep(wait).await;
        let (grant, granted) = oneshot::channel();
        self.tx.send(Msg::Lease(LeaseAsk { unit: self.unit, device: self.device.clone(), grant })).await.map_err(|_| BusError::Closed)?;
        *self = granted.await.map_err(|_| BusError::Closed)?;
        Ok(())
    }
}

/// Starts the owner task of one bus on `tasks`. It ends when every handle
/// and lease is dropped (its device actors have stopped).
pub fn spawn_bus(bus: Bus, tasks: &crate::lifecycle::Tasks) -> BusHandle {
    // Device actors never wait long on this channel: the owner empties it
    // into its queue even while a transaction is on the wire.
    let (tx, rx) = mpsc::channel(256);
    let name = format!("bus {}", bus.name);
    let line = Line { bus, ctx: None, last_done: None, seq: 0, reconnect: Reconnect::default() };
    let owner = BusOwner { line, rx, open: true, queue: Queue::new(), released: None, leases: tx.downgrade() };
    tasks.spawn(&name, owner.run());
    BusHandle { tx, device: Arc::from("(commissioning)") }
}

struct BusOwner {
    line: Line,
    rx: mpsc::Receiver<Msg>,
    /// False once every handle and lease is gone and `rx` is empty.
    open: bool,
    queue: Queue<Job, LeaseAsk>,
    /// Fires when the lease holding the line is dropped.
    released: Option<oneshot::Receiver<()>>,
    /// Upgraded for each lease's calls. Weak, so that `rx` ends when the
    /// last device actor and lease are gone.
    leases: mpsc::WeakSender<Msg>,
}

impl BusOwner {
    async fn run(mut self) {
        tracing::debug!(bus = %self.line.bus.name, "bus owner started");
        loop {
            while let Ok(msg) = self.rx.try_recv() {
                accept(&mut self.queue, msg);
            }
            match self.queue.next() {
                Next::Run(job) => self.run_job(job).await,
                Next::Grant(id, ask) => self.grant(id, ask),
                Next::WaitForHolder => tokio::select! {
                    biased;
                    msg = self.rx.recv(), if self.open => match msg {
                        Some(msg) => accept(&mut self.queue, msg),
                        None => self.open = false,
                    },
                    () = released(&mut self.released) => {
                        if let Some(id) = self.queue.holder() {
                            self.queue.release(id);
                        }
                        self.released = None;
                    }
                },
                Next::Idle if !self.open => break,
                Next::Idle => match self.rx.recv().await {
                    Some(msg) => accept(&mut self.queue, msg),
                    None => break,
                },
            }
        }
        if let Some(mut ctx) = self.line.ctx.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), ctx.disconnect()).await;
        }
        tracing::debug!(bus = %self.line.bus.name, "bus owner stopped");
    }

    fn grant(&mut self, id: LeaseId, ask: LeaseAsk) {
        let Some(tx) = self.leases.upgrade() else {
            // Nobody could call under it: every handle is gone.
            self.queue.release(id);
            return;
        };
        let (held, released) = oneshot::channel();
        let lease = Lease { id, unit: ask.unit, device: ask.device, tx, held };
        match ask.grant.send(lease) {
            Ok(()) => self.released = Some(released),
            // The asker gave up while waiting: the line is free again.
            Err(_) => self.queue.release(id),
        }
    }

    /// Runs the next transaction of `job`, taking new requests while it is
    /// on the wire; the rest of a poll cycle goes back to the front of its
    /// tier.
    async fn run_job(&mut self, mut job: Job) {
        let Some((op, _)) = job.ops.pop_front() else {
            let _ = job.reply.send(job.done);
            return;
        };
        let device = job.device.clone();
        let transaction = self.line.transact(job.unit, &device, &op);
        tokio::pin!(transaction);
        let done = loop {
            tokio::select! {
                biased;
                done = &mut transaction => break done,
                msg = self.rx.recv(), if self.open => match msg {
                    Some(msg) => accept(&mut self.queue, msg),
                    None => self.open = false,
                },
            }
        };
        let silent = matches!(&done.result, Err(e) if e.is_unreachable());
        job.done.push(done);
        match job.kind {
            Some(kind) if !silent && !job.ops.is_empty() => {
                let deadline = job.deadline();
                self.queue.push_front_poll(job, kind, deadline);
            }
            _ => {
                let _ = job.reply.send(job.done);
            }
        }
    }
}

fn accept(queue: &mut Queue<Job, LeaseAsk>, msg: Msg) {
    match msg {
        Msg::Poll(job) => {
            let kind = job.kind.unwrap_or(PollKind::Routine);
            let deadline = job.deadline();
            queue.push_poll(job, kind, deadline);
        }
        Msg::Lease(ask) => queue.push_lease(ask),
        // A call under a lease already released was abandoned with it:
        // dropping it answers "closed".
        Msg::Call(id, job) => drop(queue.push_call(id, job)),
    }
}

async fn released(lease: &mut Option<oneshot::Receiver<()>>) {
    match lease {
        Some(r) => {
            let _ = r.await;
        }
        None => std::future::pending().await,
    }
}

/// The wire of one bus: the transport, the inter-frame delay, the timeout.
struct Line {
    bus: Bus,
    ctx: Option<Context>,
    last_done: Option<Instant>,
    seq: u64,
    reconnect: Reconnect,
}

/// When a serial device server may be dialled again: after a failed
/// attempt, from 500 ms doubling up to 10 s. Requests meanwhile fail at
/// once, so that a server that is down costs the line nothing (each
/// attempt at a blackholed address would hold it for `connect_timeout`).
#[derive(Debug, Default)]
struct Reconnect {
    failures: u32,
    not_before: Option<Instant>,
    last_error: String,
}

impl Reconnect {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(10);

    /// Why no attempt is made now, if none may be.
    fn refused(&self, now: Instant) -> Option<String> {
        let wait = self.not_before?.checked_duration_since(now)?;
        Some(format!("{}; next attempt in {}", self.last_error, humantime::format_duration(round_ms(wait))))
    }

    fn failed(&mut self, now: Instant, error: String) {
        let wait = Self::FIRST.saturating_mul(1 << self.failures.min(5)).min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        self.not_before = Some(now + wait);
        self.last_error = error;
    }

    fn connected(&mut self) {
        *self = Reconnect::default();
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis().try_into().unwrap_or(u64::MAX))
}

impl Line {
    async fn transact(&mut self, unit: u8, device: &str, op: &Op) -> Done {
        if let Some(last) = self.last_done {
            let ready = last + self.bus.delay;
            if ready > Instant::now() {
                super::timer::sleep_until(ready).await;
            }
        }
        let started = Instant::now();
        let result = self.transact_now(unit, op).await;
        self.last_done = Some(Instant::now());
        self.seq += 1;
        // Rebuild the transport: a late reply must not answer the next
        // request. RTU over TCP keeps its connection after a timeout (see
        // `transport.rs`): the device server is there, a unit behind it is not.
        let rebuild = match &result {
            Err(BusError::Transport(_)) => true,
            Err(BusError::Timeout(_)) => !matches!(self.bus.transport, Transport::RtuTcp { .. }),
            _ => false,
        };
        if rebuild {
            self.ctx = None;
        }
        let outcome = match &result {
            Ok(_) => "ok",
            Err(BusError::Timeout(_)) => "timeout",
            Err(BusError::Exception(_)) => "exception",
            Err(_) => "error",
        };
        let (bus, device) = (self.bus.name.clone(), device.to_string());
        metrics::counter!("twinbus_modbus_transactions_total", "bus" => bus.clone(), "device" => device.clone(), "outcome" => outcome).increment(1);
        if matches!(outcome, "ok" | "exception") {
            // A round trip: what the line and the device take to answer.
            metrics::histogram!("twinbus_modbus_transaction_seconds", "bus" => bus, "device" => device).record(started.elapsed().as_secs_f64());
        }
        Done { seq: self.seq, result }
    }

    async fn transact_now(&mut self, unit: u8, op: &Op) -> Result<Reply, BusError> {
        let timeout = self.bus.timeout;
        if self.ctx.is_none() {
            let backs_off = matches!(self.bus.transport, Transport::RtuTcp { .. });
            if let Some(why) = self.reconnect.refused(Instant::now()).filter(|_| backs_off) {
                return Err(BusError::Transport(why));
            }
            match super::transport::open(&self.bus.transport, timeout).await {
                Ok(ctx) => {
                    self.reconnect.connected();
                    self.ctx = Some(ctx);
                }
                Err(e) => {
                    if backs_off {
                        self.reconnect.failed(Instant::now(), e.to_string());
                    }
                    return Err(BusError::Transport(e.to_string()));
                }
            }
        }
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(BusError::Transport("the transport is not open".to_string()));
        };
        ctx.set_slave(Slave(unit));
        match tokio::time::timeout(timeout, call(ctx, op)).await {
            Err(_) => Err(BusError::Timeout(timeout)),
            Ok(Err(e)) => Err(BusError::Transport(format!("Modbus transport error: {e}"))),
            Ok(Ok(Err(code))) => Err(BusError::Exception(u8::from(code))),
            Ok(Ok(Ok(reply))) => Ok(reply),
        }
    }
}

async fn call(ctx: &mut Context, op: &Op) -> tokio_modbus::Result<Reply> {
    Ok(match op {
        Op::ReadCoils(a, n) => ctx.read_coils(*a, *n).await?.map(|mut b| {
            b.truncate(usize::from(*n));
            Reply::Bits(b)
        }),
        Op::ReadDiscreteInputs(a, n) => ctx.read_discrete_inputs(*a, *n).await?.map(|mut b| {
            b.truncate(usize::from(*n));
            Reply::Bits(b)
        }),
        Op::ReadInputRegisters(a, n) => ctx.read_input_registers(*a, *n).await?.map(Reply::Words),
        Op::ReadHoldingRegisters(a, n) => ctx.read_holding_registers(*a, *n).await?.map(Reply::Words),
        Op::WriteCoils(a, bits) if bits.len() == 1 => ctx.write_single_coil(*a, bits[0]).await?.map(|()| Reply::Written),
        Op::WriteCoils(a, bits) => ctx.write_multiple_coils(*a, bits).await?.map(|()| Reply::Written),
        Op::WriteRegisters(a, words) if words.len() == 1 => {
            ctx.write_single_register(*a, words[0]).await?.map(|()| Reply::Written)
        }
        Op::WriteRegisters(a, words) => ctx.write_multiple_registers(*a, words).await?.map(|()| Reply::Written),
        Op::MaskWriteRegister(a, and_mask, or_mask) => ctx.masked_write_register(*a, *and_mask, *or_mask).await?.map(|()| Reply::Written),
    })
}

/// `0x02 (illegal data address)`: an exception code as logs and answers show it.
pub fn exception_name(n: u8) -> String {
    let name = match n {
        1 => "illegal function",
        2 => "illegal data address",
        3 => "illegal data value",
        4 => "server device failure",
        5 => "acknowledge",
        6 => "server device busy",
        8 => "memory parity error",
        10 => "gateway path unavailable",
        11 => "gateway target device failed to respond",
        _ => "unknown",
    };
    format!("0x{n:02X} ({name})")
}
