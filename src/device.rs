//! The device actor: one task per Modbus device, owner of that device's state.
//!
//! It polls the device's readable points on a schedule (each poll group at
//! its own interval), executes writes and reads asked for by twin adapters, and reads written points back so that
//! the cloud learns what the device really holds. It publishes a [`Snapshot`]
//! after every poll, and at once when a command finds the device online or
//! offline: values plus health. A device that stops answering is marked
//! offline with the reason, its values are dropped (never reported stale),
//! and it is probed on a backoff schedule until it answers again; the first
//! answer to any transaction, a command's included, brings it back.
//!
//! The actor never waits for its own polls: it hands each read to the bus
//! and keeps taking commands while the read waits in the bus queue. A
//! command takes the line ahead of every poll ([`BusHandle::lease`]) and
//! holds it for its writes, verifications and read-back, giving it up only
//! while the device wants time (busy, or slow to show a write). The
//! decisions live in plain structs: `liveness.rs` (health and the schedule
//! of each poll group) and `verify.rs` (what to do when a write gets no
//! answer, or a busy one); this file is the I/O around them, and
//! `polling.rs` the poll cycles. Answers are ordered by the bus's transaction numbers, so
//! a poll's reply read after a command's never overwrites the newer value.
//!
//! The actor never sees MQTT or JSON: it gets validated, encoded writes
//! ([`Encoded`]) and returns typed values.

mod liveness;
mod polling;
mod verify;

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::liveness::{Change, Liveness};
use self::polling::Cycle;
use self::verify::{Expect, Step, Verdict, WriteCheck};
use crate::config::{Device, Quirks, ReadLimits};
use crate::modbus::{plan_reads, plan_writes, BusError, BusHandle, Done, Lease, Op, ReadBlock, Reply, WriteOp};
use crate::point::{Encoded, Point, Value};

/// Whether the device answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Health {
    /// Not polled yet.
    Unknown,
    /// The last transaction got an answer.
    Online,
    /// The device or its line does not answer; the reason says how.
    Offline(String),
}

/// What the device held at its last poll.
#[derive(Debug)]
pub struct Snapshot {
    /// Per point (same order as the device's points); `None` when not read
    /// (write-only, refused by the device, or the device is offline).
    pub values: Vec<Option<Value>>,
    /// Per point: why the last read failed while the device was online.
    pub errors: Vec<Option<String>>,
    /// Reachability.
    pub health: Health,
    /// When the poll finished.
    pub at: SystemTime,
    /// Numbers the snapshots the device published (after each poll cycle,
    /// and at a change of health), from 1: a reader that sees a gap knows it
    /// missed some.
    pub seq: u64,
}

impl Clone for Snapshot {
    fn clone(&self) -> Snapshot {
        Snapshot { values: self.values.clone(), errors: self.errors.clone(), health: self.health.clone(), at: self.at, seq: self.seq }
    }

    /// Field by field, so that the vectors (and an error's text) keep their
    /// allocations: the actor refills last poll's snapshot in place.
    fn clone_from(&mut self, from: &Snapshot) {
        self.values.clone_from(&from.values);
        self.errors.clone_from(&from.errors);
        self.health.clone_from(&from.health);
        self.at = from.at;
        self.seq = from.seq;
    }
}

/// The result of a command: the values read back, and what went wrong.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// (point index, value read from the device).
    pub values: Vec<(usize, Value)>,
    /// Set when any write or read failed; the command then failed.
    pub error: Option<String>,
}

impl Outcome {
    /// A command answered at a stop without touching the device.
    fn not_sent_stopping() -> Outcome {
        Outcome { values: vec![], error: Some("the gateway is shutting down; nothing was written".to_string()) }
    }
}

#[derive(Debug)]
enum Msg {
    Write { writes: Vec<(usize, Encoded)>, reply: oneshot::Sender<Outcome> },
    Read { points: Vec<usize>, reply: oneshot::Sender<Outcome> },
}

/// The handle twin adapters use to reach a device.
#[derive(Clone, Debug)]
pub struct DeviceHandle {
    /// Device name, for logs and answers.
    pub name: String,
    /// The device's points; indices in messages refer to this list.
    pub points: Arc<Vec<Point>>,
    tx: mpsc::Sender<Msg>,
    state: watch::Receiver<Arc<Snapshot>>,
    journal: crate::journal::Journal,
}

impl DeviceHandle {
    /// Writes validated values, then reads the written points back.
    pub async fn write(&self, writes: Vec<(usize, Encoded)>) -> Outcome {
        let (reply, rx) = oneshot::channel();
        self.ask(Msg::Write { writes, reply }, rx).await
    }

    /// Reads points from the device now (not from the last poll).
    pub async fn read(&self, points: Vec<usize>) -> Outcome {
        let (reply, rx) = oneshot::channel();
        self.ask(Msg::Read { points, reply }, rx).await
    }

    async fn ask(&self, msg: Msg, rx: oneshot::Receiver<Outcome>) -> Outcome {
        let stopped = || Outcome { values: vec![], error: Some("the gateway is shutting down".to_string()) };
        if self.tx.send(msg).await.is_err() {
            return stopped();
        }
        rx.await.unwrap_or_else(|_| stopped())
    }

    /// Follows the device's snapshots.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.state.clone()
    }

    /// The device's last commands, recorded by whoever answers them.
    pub fn journal(&self) -> &crate::journal::Journal {
        &self.journal
    }
}

/// Starts the actor of one device on `tasks`. It polls until `cancel` fires,
/// whether or not anything holds its handle. When `cancel` fires it stops
/// polling at once (a poll on the wire finishes there: the bus owner never
/// cuts a transaction), finishes the command it is executing, and answers
/// those still queued with "shutting down" without touching the device.
pub fn spawn_device(device: &Device, bus: BusHandle, retries: u8, tasks: &crate::lifecycle::Tasks, cancel: CancellationToken) -> DeviceHandle {
    let points = Arc::clone(&device.points);
    let n = points.len();
    let empty = Snapshot { values: vec![None; n], errors: vec![None; n], health: Health::Unknown, at: SystemTime::now(), seq: 0 };
    let (state_tx, state) = watch::channel(Arc::new(empty.clone()));
    let (tx, rx) = mpsc::channel(32);
    // Each group planned on its own: reads of two groups never share a request.
    let mut blocks = Vec::new();
    let mut group_blocks = Vec::new();
    for g in &device.groups {
        let first = blocks.len();
        blocks.extend(plan_reads(&points, &g.points, &device.read));
        group_blocks.push(first..blocks.len());
    }
    let intervals: Vec<_> = device.groups.iter().map(|g| g.every).collect();
    let actor = DeviceActor {
        name: device.name.clone(),
        unit: device.unit,
        blocks: blocks.into(),
        group_blocks,
        quirks: device.quirks,
        points: points.clone(),
        limits: device.read,
        mask_write: device.mask_write,
        retries,
        bus: bus.for_device(&device.name),
        rx,
        state_tx,
        current: empty,
        spare: None,
        seen: vec![0; n],
        liveness: Liveness::new(&intervals, Instant::now().into_std(), seed(&device.name, device.unit)),
    };
    tasks.spawn(&format!("device {}", device.name), actor.run(cancel));
    DeviceHandle { name: device.name.clone(), points, tx, state, journal: Default::default() }
}

/// The running devices by name, as reloads change them: what readiness
/// looks at. Holding a handle here keeps the device's actor alive, so a
/// device leaves the directory before it is stopped.
pub type Directory = Arc<std::sync::RwLock<std::collections::BTreeMap<String, DeviceHandle>>>;

/// Reads a directory; a poisoned lock only means a panic elsewhere.
pub fn directory(d: &Directory) -> std::sync::RwLockReadGuard<'_, std::collections::BTreeMap<String, DeviceHandle>> {
    d.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A jitter seed that differs between devices and between runs.
fn seed(name: &str, unit: u8) -> u64 {
    std::collections::hash_map::RandomState::new().hash_one((name, unit))
}

struct DeviceActor {
    name: String,
    unit: u8,
    points: Arc<Vec<Point>>,
    /// The reads of every poll group, planned once (shared with each cycle's
    /// answers while they update the actor).
    blocks: Arc<[ReadBlock]>,
    /// Per poll group (as in the device's `groups`), its range of `blocks`.
    group_blocks: Vec<std::ops::Range<usize>>,
    quirks: Quirks,
    limits: ReadLimits,
    mask_write: bool,
    retries: u8,
    bus: BusHandle,
    rx: mpsc::Receiver<Msg>,
    state_tx: watch::Sender<Arc<Snapshot>>,
    current: Snapshot,
    /// The snapshot published before the last one, to be refilled by the
    /// next publish once no reader holds it.
    spare: Option<Arc<Snapshot>>,
    /// Per point: the bus transaction number its value (or error) came from.
    seen: Vec<u64>,
    liveness: Liveness,
}

impl DeviceActor {
    async fn run(mut self, cancel: CancellationToken) {
        let mut cycles: Vec<Cycle> = Vec::new();
        let mut inbox_open = true;
        loop {
            let due = self.liveness.due().map(Instant::from_std);
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                (i, event) = polling::next_event(&mut cycles) => self.on_cycle_event(&mut cycles, i, event).await,
                msg = self.rx.recv(), if inbox_open => match msg {
                    Some(msg) => self.handle(msg, &cancel).await,
                    // No adapter left (or none ever): keep polling until cancelled.
                    None => inbox_open = false,
                },
                () = until(due) => self.start_cycle(&mut cycles).await,
            }
        }
        // Dropping the cycles withdraws polls still waiting in the bus queue.
        drop(cycles);
        // Answer what is still queued without touching the device: with dead
        // devices on the line, executing it could outlast any stop deadline.
        self.rx.close();
        while let Some(msg) = self.rx.recv().await {
            let stopped = Outcome::not_sent_stopping();
            match msg {
                Msg::Write { reply, .. } | Msg::Read { reply, .. } => {
                    let _ = reply.send(stopped);
                }
            }
        }
        tracing::debug!(device = %self.name, "device actor stopped");
    }

    /// The device answered transaction `seq`.
    fn heard(&mut self, seq: u64) {
        if self.liveness.answered(seq, std::time::Instant::now()) == Change::CameOnline {
            if matches!(self.current.health, Health::Offline(_)) {
                tracing::info!(device = %self.name, unit = self.unit, "device back online");
            }
            self.current.health = Health::Online;
        }
    }

    /// Transaction `seq` was the last attempt of a request, and got no answer.
    fn lost(&mut self, e: &BusError, seq: u64) {
        if self.liveness.unreachable(seq) != Change::WentOffline {
            return;
        }
        tracing::warn!(device = %self.name, unit = self.unit, reason = %e, "device offline");
        self.current.health = Health::Offline(e.to_string());
        self.current.values.iter_mut().for_each(|v| *v = None);
        self.current.errors.iter_mut().for_each(|v| *v = None);
        // Older readings still on their way are stale now.
        self.seen.iter_mut().for_each(|s| *s = (*s).max(seq));
    }

    fn store(&mut self, i: usize, v: Result<Value, String>, seq: u64) {
        if seq < self.seen[i] {
            return; // a newer answer (a command's read-back) is already in
        }
        self.seen[i] = seq;
        match v {
            Ok(v) => {
                self.current.values[i] = Some(v);
                self.current.errors[i] = None;
            }
            Err(e) => {
                self.current.values[i] = None;
                self.current.errors[i] = Some(e);
            }
        }
    }

    fn publish(&mut self) {
        self.current.at = SystemTime::now();
        self.current.seq += 1;
        // Readers (telemetry, shadows, the console) take a snapshot, look at
        // it and let go within the poll period, so the one before the last
        // is almost always free again: a poll then publishes without
        // allocating, whatever the number of values.
        let next = match self.spare.take() {
            Some(mut free) => match Arc::get_mut(&mut free) {
                Some(snapshot) => {
                    snapshot.clone_from(&self.current);
                    free
                }
                None => Arc::new(self.current.clone()),
            },
            None => Arc::new(self.current.clone()),
        };
        self.spare = Some(self.state_tx.send_replace(next));
    }

    async fn handle(&mut self, msg: Msg, cancel: &CancellationToken) {
        let health = self.current.health.clone();
        let lease = tokio::select! {
            biased;
            lease = self.bus.lease(self.unit) => Some(lease),
            // A stop while the command still waits for the line (behind dead
            // neighbours' timeouts): it has not started, so it is answered
            // without touching the device instead of running past the stop
            // deadline. A command that holds the line is finished.
            () = cancel.cancelled() => None,
        };
        let Some(lease) = lease else {
            let stopped = Outcome::not_sent_stopping();
            match msg {
                Msg::Write { reply, .. } | Msg::Read { reply, .. } => {
                    let _ = reply.send(stopped);
                }
            }
            return;
        };
        let (outcome, reply) = match lease {
            Ok(mut lease) => match msg {
                Msg::Write { writes, reply } => (self.write(&mut lease, writes).await, reply),
                Msg::Read { points, reply } => (self.read(&mut lease, &points).await, reply),
            },
            Err(e) => {
                let outcome = Outcome { values: vec![], error: Some(format!("nothing was done: {e}")) };
                match msg {
                    Msg::Write { reply, .. } | Msg::Read { reply, .. } => (outcome, reply),
                }
            }
        };
        // The lease is gone: the line is free before the answer goes out.
        if self.current.health != health {
            // Telemetry learns at once that the device is back (or gone).
            self.publish();
        }
        let _ = reply.send(outcome);
    }

    /// Runs `op` under the lease, again after silence while attempts remain,
    /// and after the busy delay while busy retries remain. Only the final
    /// silence counts against the device's health.
    async fn call(&mut self, lease: &mut Lease, op: Op) -> Done {
        let attempts = self.liveness.attempts(self.retries);
        let mut attempt = 1;
        let mut busy_left = self.quirks.busy_retries;
        loop {
            let done = lease.call(op.clone()).await;
            match &done.result {
                Err(e) if e.is_busy() && busy_left > 0 => {
                    busy_left -= 1;
                    self.heard(done.seq);
                    self.count_busy();
                    if let Err(e) = lease.pause(self.quirks.busy_delay).await {
                        return Done { seq: done.seq, result: Err(e) };
                    }
                }
                Err(e) if e.is_unreachable() && attempt < attempts => attempt += 1,
                Err(e) if e.is_unreachable() => {
                    self.lost(e, done.seq);
                    return done;
                }
                _ => {
                    self.heard(done.seq);
                    return done;
                }
            }
        }
    }

    /// Reads points now, ahead of polls; updates the snapshot too.
    async fn read(&mut self, lease: &mut Lease, indices: &[usize]) -> Outcome {
        let readable: Vec<usize> = indices.iter().copied().filter(|&i| self.points[i].access.readable()).collect();
        let mut outcome = Outcome::default();
        // Shared, not cloned: the values update `self` while they are decoded.
        let points = Arc::clone(&self.points);
        for block in plan_reads(&points, &readable, &self.limits) {
            let done = self.call(lease, block.op()).await;
            match &done.result {
                Ok(reply) => {
                    for (i, v) in decode_block(&points, block.start, &block.points, reply) {
                        match &v {
                            Ok(value) => outcome.values.push((i, value.clone())),
                            Err(e) => note(&mut outcome.error, format!("reading {}: {e}", self.points[i].path)),
                        }
                        self.store(i, v, done.seq);
                    }
                }
                Err(e) => {
                    note(&mut outcome.error, format!("reading {}: {e}", self.paths(&block.points)));
                    if e.is_unreachable() {
                        return outcome; // the other blocks would only add timeouts
                    }
                }
            }
        }
        outcome.values.sort_by_key(|(i, _)| *i);
        outcome
    }

    async fn write(&mut self, lease: &mut Lease, writes: Vec<(usize, Encoded)>) -> Outcome {
        let targets: Vec<usize> = writes.iter().map(|(i, _)| *i).collect();
        // A device known to be offline gets one attempt and no verify read:
        // a second timeout would tell nothing new.
        let known_offline = self.liveness.is_offline();
        let mut error = None;
        let mut unreachable = false;
        let mut sent = false;
        for op in plan_writes(&self.points, &writes, self.quirks.single_writes) {
            let paths = self.paths(op.points());
            let trigger = op.points().iter().any(|&i| self.points[i].trigger);
            let planned = match op {
                WriteOp::Write { op, .. } => match Expect::of(&op) {
                    Some(expect) => Ok((op, expect)),
                    None => Err(BusError::Transport(format!("{op:?} is not a write"))),
                },
                WriteOp::RegisterBits { address, bits, .. } => self.register_bits(lease, address, &bits).await,
            };
            let verdict = match planned {
                Ok((op, expect)) => {
                    sent = true;
                    let attempts = self.liveness.attempts(self.retries);
                    let q = self.quirks;
                    let check = WriteCheck::new(op, expect, trigger, attempts, known_offline).patient(q.read_back_delay, q.busy_retries, q.busy_delay);
                    self.send_write(lease, check).await
                }
                // The read of a read-modify-write failed: nothing was sent.
                Err(e) => {
                    unreachable = e.is_unreachable();
                    error = Some(format!("writing {paths}: {e}; nothing was written"));
                    break;
                }
            };
            let failure = match verdict {
                Verdict::Written => None,
                Verdict::Landed => {
                    tracing::info!(device = %self.name, points = %paths, "a write's reply was lost; the read-back shows it landed, so it is not sent again");
                    None
                }
                Verdict::Refused(e) => Some(format!("writing {paths}: {e}")),
                Verdict::NotApplied { error: e, trigger: true } => {
                    Some(format!("writing {paths}: {e}, and the device does not hold the value; a trigger point is never sent twice"))
                }
                Verdict::NotApplied { error: e, trigger: false } => Some(format!("writing {paths}: {e}, and the device does not hold the value")),
                Verdict::Unknown(e) => {
                    unreachable = true;
                    Some(format!("writing {paths}: {e}; whether the device took the write is unknown"))
                }
            };
            if let Some(f) = failure {
                tracing::warn!(device = %self.name, points = %paths, reason = %f, "write failed");
                error = Some(f);
                break;
            }
        }
        // Read back even after a failure: the cloud must learn what the device
        // holds now, including what an earlier write of this command changed.
        // Not when it stopped answering: that would only add a timeout. A
        // device slow to show a write is given its time first, with the
        // line free for others meanwhile.
        let settle = if sent && !unreachable { self.quirks.read_back_delay } else { std::time::Duration::ZERO };
        let mut outcome = if unreachable {
            Outcome::default()
        } else if let Err(e) = pause(lease, settle).await {
            Outcome { values: vec![], error: Some(format!("reading back: {e}")) }
        } else {
            self.read(lease, &targets).await
        };
        if let Some(e) = error {
            outcome.error = Some(match outcome.error {
                Some(read_error) => format!("{e}; {read_error}"),
                None => e,
            });
        }
        outcome
    }

    /// Drives one write's [`WriteCheck`] on the wire.
    async fn send_write(&mut self, lease: &mut Lease, mut check: WriteCheck) -> Verdict {
        let mut step = check.start();
        let mut silence = None;
        loop {
            let (op, verifying, wait) = match step {
                Step::Done(verdict) => {
                    if let (Verdict::Unknown(e), Some(seq)) = (&verdict, silence) {
                        self.lost(e, seq);
                    }
                    return verdict;
                }
                Step::Send(op) => (op, false, None),
                Step::Verify(op) => (op, true, None),
                Step::SendAfter(d, op) => (op, false, Some(d)),
                Step::VerifyAfter(d, op) => (op, true, Some(d)),
            };
            if let Some(d) = wait {
                if let Err(e) = lease.pause(d).await {
                    return Verdict::Unknown(e);
                }
            }
            let done = lease.call(op).await;
            match &done.result {
                Err(e) if e.is_unreachable() => silence = Some(done.seq),
                _ => self.heard(done.seq),
            }
            step = if verifying { check.on_verify(&done.result) } else { check.on_write(&done.result) };
            if done.result.as_ref().is_err_and(BusError::is_busy) && matches!(step, Step::SendAfter(..) | Step::VerifyAfter(..)) {
                self.count_busy();
            }
        }
    }

    /// A "busy" answer that will be asked again.
    fn count_busy(&self) {
        metrics::counter!("twinbus_modbus_busy_retries_total", "device" => self.name.clone()).increment(1);
    }

    /// Bits of one holding register: with `mask_write`, one function 22
    /// request that the device applies to its current value; otherwise the
    /// register is read, the bits changed, and all of it written back (a
    /// bit the device changes in between is overwritten). Either way only
    /// these bits are verified.
    async fn register_bits(&mut self, lease: &mut Lease, address: u16, bits: &[(u8, bool)]) -> Result<(Op, Expect), BusError> {
        let expect = Expect::bits(address, bits);
        if self.mask_write {
            let (and_mask, or_mask) = masks(bits);
            return Ok((Op::MaskWriteRegister(address, and_mask, or_mask), expect));
        }
        let done = self.call(lease, Op::ReadHoldingRegisters(address, 1)).await;
        let word = match done.result {
            Ok(Reply::Words(words)) => words.first().copied(),
            Ok(_) => None,
            Err(e) => return Err(e),
        };
        let Some(mut word) = word else {
            return Err(BusError::Transport("the device returned no register".to_string()));
        };
        for &(bit, on) in bits {
            let b = 1u16.checked_shl(u32::from(bit)).unwrap_or(0);
            if on {
                word |= b;
            } else {
                word &= !b;
            }
        }
        Ok((Op::WriteRegisters(address, vec![word]), expect))
    }

    fn paths(&self, indices: &[usize]) -> String {
        indices.iter().map(|&i| self.points[i].path.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// Resolves at `due`; never when there is none.
async fn until(due: Option<Instant>) {
    match due {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Gives the line up for `wait`, if any.
async fn pause(lease: &mut Lease, wait: std::time::Duration) -> Result<(), BusError> {
    if wait.is_zero() {
        return Ok(());
    }
    lease.pause(wait).await
}

/// Function 22's masks for setting and clearing `bits`: the device computes
/// `(current AND and_mask) OR (or_mask AND NOT and_mask)`.
fn masks(bits: &[(u8, bool)]) -> (u16, u16) {
    let (mut and_mask, mut or_mask) = (0xFFFF_u16, 0_u16);
    for &(bit, on) in bits {
        let b = 1u16.checked_shl(u32::from(bit)).unwrap_or(0);
        and_mask &= !b;
        if on {
            or_mask |= b;
        }
    }
    (and_mask, or_mask)
}

fn note(slot: &mut Option<String>, message: String) {
    match slot {
        Some(s) => {
            s.push_str("; ");
            s.push_str(&message);
        }
        None => *slot = Some(message),
    }
}

/// Splits one read reply into the values of the points it covers.
fn decode_block<'a>(points: &'a [Point], start: u16, indices: &'a [usize], reply: &'a Reply) -> impl Iterator<Item = (usize, Result<Value, String>)> + 'a {
    indices
        .iter()
        .map(move |&i| {
            let p = &points[i];
            let offset = usize::from(p.location.address.saturating_sub(start));
            let width = usize::from(p.width());
            let value = match reply {
                Reply::Bits(bits) => bits.get(offset..offset + width).ok_or_else(short).and_then(|b| p.decode_bits(b)),
                Reply::Words(words) => words.get(offset..offset + width).ok_or_else(short).and_then(|w| p.decode_words(w)),
                Reply::Written => Err("unexpected reply to a read".to_string()),
            };
            (i, value)
        })
}

fn short() -> String {
    "the device returned fewer values than asked for".to_string()
}

#[cfg(test)]
mod tests {
    use super::masks;

    #[test]
    fn mask_write_masks_touch_only_the_bits_written() {
        // Set bit 3, clear bit 0: the device keeps every other bit.
        let (and_mask, or_mask) = masks(&[(3, true), (0, false)]);
        let apply = |current: u16| (current & and_mask) | (or_mask & !and_mask);
        assert_eq!(apply(0b1111_0001), 0b1111_1000);
        assert_eq!(apply(0), 0b1000);
        assert_eq!(apply(0xFFFF), 0xFFFE);
    }
}
