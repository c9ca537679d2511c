//! The device actor: one task per Modbus device, owner of that device's state.
//!
//! It polls the device's readable points on a schedule, executes writes and
//! reads asked for by twin adapters, and reads written points back so that
//! the cloud learns what the device really holds. It publishes a [`Snapshot`]
//! after every poll: values plus health. A device that stops answering is
//! marked offline with the reason, its values are dropped (never reported
//! stale), and it is polled on a backoff schedule until it answers again.
//!
//! Commands are served between the reads of a poll cycle, and the bus owner
//! puts them ahead of other devices' polls. The actor never sees MQTT or JSON:
//! it gets validated, encoded writes ([`Encoded`]) and returns typed values.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Device, ReadLimits};
use crate::modbus::{plan_reads, plan_writes, BusError, BusHandle, Op, Priority, Reply, WriteOp};
use crate::point::{Encoded, Point, Value};

/// Longest wait between two polls of an offline device.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
#[derive(Clone, Debug)]
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
}

/// The result of a command: the values read back, and what went wrong.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// (point index, value read from the device).
    pub values: Vec<(usize, Value)>,
    /// Set when any write or read failed; the command then failed.
    pub error: Option<String>,
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
}

/// Starts the actor of one device on `tasks`. When `cancel` fires it stops
/// polling at once (a poll on the wire finishes there: the bus owner never
/// cuts a transaction), finishes the command it is executing, and answers
/// those still queued with "shutting down" without touching the device.
pub fn spawn_device(device: &Device, bus: BusHandle, retries: u8, tasks: &crate::lifecycle::Tasks, cancel: CancellationToken) -> DeviceHandle {
    let points = Arc::new(device.points.clone());
    let n = points.len();
    let empty = Snapshot { values: vec![None; n], errors: vec![None; n], health: Health::Unknown, at: SystemTime::now() };
    let (state_tx, state) = watch::channel(Arc::new(empty.clone()));
    let (tx, rx) = mpsc::channel(32);
    let actor = DeviceActor {
        name: device.name.clone(),
        unit: device.unit,
        points: points.clone(),
        limits: device.read,
        mask_write: device.mask_write,
        poll: device.poll,
        retries,
        bus,
        rx,
        state_tx,
        current: empty,
        failures: 0,
    };
    tasks.spawn(&format!("device {}", device.name), actor.run(cancel));
    DeviceHandle { name: device.name.clone(), points, tx, state }
}

struct DeviceActor {
    name: String,
    unit: u8,
    points: Arc<Vec<Point>>,
    limits: ReadLimits,
    mask_write: bool,
    poll: Duration,
    retries: u8,
    bus: BusHandle,
    rx: mpsc::Receiver<Msg>,
    state_tx: watch::Sender<Arc<Snapshot>>,
    current: Snapshot,
    /// Consecutive poll cycles that found the device unreachable.
    failures: u32,
}

impl DeviceActor {
    async fn run(mut self, cancel: CancellationToken) {
        let mut next_poll = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                msg = self.rx.recv() => match msg {
                    Some(msg) => self.handle(msg).await,
                    None => break,
                },
                () = tokio::time::sleep_until(next_poll) => {
                    if !self.poll_cycle(&cancel).await {
                        break;
                    }
                    next_poll = Instant::now() + self.poll_delay();
                }
            }
        }
        // Answer what is still queued without touching the device: with dead
        // devices on the line, executing it could outlast any stop deadline.
        self.rx.close();
        while let Some(msg) = self.rx.recv().await {
            let stopped = Outcome { values: vec![], error: Some("the gateway is shutting down; nothing was written".to_string()) };
            match msg {
                Msg::Write { reply, .. } | Msg::Read { reply, .. } => {
                    let _ = reply.send(stopped);
                }
            }
        }
        tracing::debug!(device = %self.name, "device actor stopped");
    }

    fn poll_delay(&self) -> Duration {
        if self.failures == 0 {
            return self.poll;
        }
        let factor = 1u32 << self.failures.min(6);
        (self.poll * factor).min(MAX_BACKOFF.max(self.poll))
    }

    async fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Write { writes, reply } => {
                let outcome = self.write(writes).await;
                let _ = reply.send(outcome);
            }
            Msg::Read { points, reply } => {
                let outcome = self.read(&points, Priority::Command).await;
                let _ = reply.send(outcome);
            }
        }
    }

    /// One poll of every readable point; false when `cancel` fired in the
    /// middle (the cycle is abandoned, nothing is published).
    async fn poll_cycle(&mut self, cancel: &CancellationToken) -> bool {
        let readable: Vec<usize> = (0..self.points.len()).filter(|&i| self.points[i].access.readable()).collect();
        let blocks = plan_reads(&self.points, &readable, &self.limits);
        let mut unreachable = None;
        for block in blocks {
            // Commands go ahead of the rest of the cycle.
            while let Ok(msg) = self.rx.try_recv() {
                self.handle(msg).await;
            }
            let call = self.bus.call(Priority::Poll, self.unit, block.op(), self.retries);
            let result = tokio::select! {
                biased;
                // Dropping the call withdraws it from the bus's queue.
                () = cancel.cancelled() => return false,
                r = call => r,
            };
            match result {
                Ok(reply) => {
                    for (i, v) in decode_block(&self.points, block.start, &block.points, &reply) {
                        self.store(i, v);
                    }
                }
                Err(e) if e.is_unreachable() => {
                    unreachable = Some(e);
                    break;
                }
                Err(e) => {
                    for &i in &block.points {
                        self.store(i, Err(e.to_string()));
                    }
                }
            }
        }
        match unreachable {
            Some(e) => {
                self.failures = self.failures.saturating_add(1);
                self.set_offline(&e);
            }
            None => {
                self.failures = 0;
                self.set_health(Health::Online);
            }
        }
        self.publish();
        true
    }

    fn store(&mut self, i: usize, v: Result<Value, String>) {
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

    fn set_offline(&mut self, e: &BusError) {
        if self.current.health == Health::Online || self.current.health == Health::Unknown {
            tracing::warn!(device = %self.name, unit = self.unit, reason = %e, "device offline");
        }
        self.set_health(Health::Offline(e.to_string()));
        self.current.values.iter_mut().for_each(|v| *v = None);
        self.current.errors.iter_mut().for_each(|v| *v = None);
    }

    fn set_health(&mut self, health: Health) {
        if health == Health::Online && matches!(self.current.health, Health::Offline(_)) {
            tracing::info!(device = %self.name, unit = self.unit, "device back online");
        }
        self.current.health = health;
    }

    fn publish(&mut self) {
        self.current.at = SystemTime::now();
        self.state_tx.send_replace(Arc::new(self.current.clone()));
    }

    /// Reads points now, with command priority; updates the snapshot too.
    async fn read(&mut self, indices: &[usize], priority: Priority) -> Outcome {
        let readable: Vec<usize> = indices.iter().copied().filter(|&i| self.points[i].access.readable()).collect();
        let mut outcome = Outcome::default();
        for block in plan_reads(&self.points, &readable, &self.limits) {
            match self.bus.call(priority, self.unit, block.op(), self.retries).await {
                Ok(reply) => {
                    for (i, v) in decode_block(&self.points, block.start, &block.points, &reply) {
                        match &v {
                            Ok(value) => outcome.values.push((i, value.clone())),
                            Err(e) => note(&mut outcome.error, format!("reading {}: {e}", self.points[i].path)),
                        }
                        self.store(i, v);
                    }
                }
                Err(e) => {
                    let paths = block.points.iter().map(|&i| self.points[i].path.as_str()).collect::<Vec<_>>().join(", ");
                    note(&mut outcome.error, format!("reading {paths}: {e}"));
                    if e.is_unreachable() {
                        self.set_offline(&e);
                        self.publish();
                        return outcome;
                    }
                }
            }
        }
        self.set_health(Health::Online);
        outcome.values.sort_by_key(|(i, _)| *i);
        outcome
    }

    async fn write(&mut self, writes: Vec<(usize, Encoded)>) -> Outcome {
        let targets: Vec<usize> = writes.iter().map(|(i, _)| *i).collect();
        let mut error = None;
        for op in plan_writes(&self.points, &writes) {
            let (result, points) = match op {
                WriteOp::Write { op, points } => (self.bus.call(Priority::Command, self.unit, op, self.retries).await, points),
                WriteOp::RegisterBits { address, bits, points } => (self.write_bits(address, &bits).await, points),
            };
            if let Err(e) = result {
                let paths = points.iter().map(|&i| self.points[i].path.as_str()).collect::<Vec<_>>().join(", ");
                tracing::warn!(device = %self.name, points = %paths, reason = %e, "write failed");
                error = Some(format!("writing {paths}: {e}"));
                break;
            }
        }
        // Read back even after a failure: the cloud must learn what the device
        // holds now, including what an earlier write of this command changed.
        let mut outcome = self.read(&targets, Priority::Command).await;
        if let Some(e) = error {
            outcome.error = Some(match outcome.error {
                Some(read_error) => format!("{e}; {read_error}"),
                None => e,
            });
        }
        outcome
    }

    /// Single bits of a holding register: with `mask_write`, one function 22
    /// request that the device applies to its current value; otherwise a
    /// read, the bits changed, and the whole register written back (a bit the
    /// device changes in between is overwritten).
    async fn write_bits(&mut self, address: u16, bits: &[(u8, bool)]) -> Result<Reply, BusError> {
        if self.mask_write {
            let (and_mask, or_mask) = masks(bits);
            return self.bus.call(Priority::Command, self.unit, Op::MaskWriteRegister(address, and_mask, or_mask), self.retries).await;
        }
        let reply = self.bus.call(Priority::Command, self.unit, Op::ReadHoldingRegisters(address, 1), self.retries).await?;
        let Reply::Words(words) = reply else {
            return Err(BusError::Transport("unexpected reply to a register read".to_string()));
        };
        let mut word = *words.first().ok_or_else(|| BusError::Transport("the device returned no register".to_string()))?;
        for &(bit, on) in bits {
            if on {
                word |= 1 << bit;
            } else {
                word &= !(1 << bit);
            }
        }
        self.bus.call(Priority::Command, self.unit, Op::WriteRegisters(address, vec![word]), self.retries).await
    }
}

/// Function 22's masks for setting and clearing `bits`: the device computes
/// `(current AND and_mask) OR (or_mask AND NOT and_mask)`.
fn masks(bits: &[(u8, bool)]) -> (u16, u16) {
    let (mut and_mask, mut or_mask) = (0xFFFF_u16, 0_u16);
    for &(bit, on) in bits {
        and_mask &= !(1 << bit);
        if on {
            or_mask |= 1 << bit;
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
fn decode_block(points: &[Point], start: u16, indices: &[usize], reply: &Reply) -> Vec<(usize, Result<Value, String>)> {
    indices
        .iter()
        .map(|&i| {
            let p = &points[i];
            let offset = usize::from(p.location.address - start);
            let width = usize::from(p.width());
            let value = match reply {
                Reply::Bits(bits) => bits.get(offset..offset + width).ok_or_else(short).and_then(|b| p.decode_bits(b)),
                Reply::Words(words) => words.get(offset..offset + width).ok_or_else(short).and_then(|w| p.decode_words(w)),
                Reply::Written => Err("unexpected reply to a read".to_string()),
            };
            (i, value)
        })
        .collect()
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
