//! The bus owner: the one task that talks on a line.
//!
//! RS-485 is half duplex and a Modbus TCP connection carries one transaction
//! at a time, so every request for a line goes through this task, one after
//! the other. Two queues decide the order: commands (cloud writes and their
//! read-backs) always go before routine polls. A poll that times out does not
//! retry at once: its next attempt goes behind any waiting command, so a
//! command for a healthy device waits for at most one dead-device timeout.
//!
//! Every call has a timeout (tokio-modbus has none). After a timeout or an I/O
//! error the transport is dropped and reopened for the next request: on TCP a
//! late reply would otherwise answer the next request.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio_modbus::client::{Client, Context, Reader, Writer};
use tokio_modbus::slave::SlaveContext;
use tokio_modbus::{ExceptionCode, Slave};

use crate::config::Bus;

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
/// alive; the other two mean the device or the line is not answering.
#[derive(Clone, Debug, PartialEq)]
pub enum BusError {
    /// No answer within the bus timeout.
    Timeout(Duration),
    /// The device answered with a Modbus exception.
    Exception(String),
    /// The line could not be opened, or broke.
    Transport(String),
    /// The bus owner has stopped (shutdown).
    Closed,
}

impl BusError {
    /// Whether the error says the device is unreachable (not merely refusing).
    pub fn is_unreachable(&self) -> bool {
        !matches!(self, BusError::Exception(_))
    }
}

impl fmt::Display for BusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BusError::Timeout(d) => write!(f, "no answer from the device within {}", humantime::format_duration(*d)),
            BusError::Exception(e) => write!(f, "the device refused: Modbus exception {e}"),
            BusError::Transport(e) => write!(f, "{e}"),
            BusError::Closed => write!(f, "the bus is shutting down"),
        }
    }
}

/// Which queue a request goes into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Cloud commands and their read-backs.
    Command,
    /// Routine polling.
    Poll,
}

#[derive(Debug)]
struct Job {
    unit: u8,
    op: Op,
    attempts_left: u8,
    /// A command keeps its priority through its retries.
    command: bool,
    reply: oneshot::Sender<Result<Reply, BusError>>,
}

/// The sending side of a bus; cheap to clone, one per device actor.
#[derive(Clone, Debug)]
pub struct BusHandle {
    commands: mpsc::Sender<Job>,
    polls: mpsc::Sender<Job>,
}

impl BusHandle {
    /// Runs one transaction on the line, queued by priority.
    pub async fn call(&self, priority: Priority, unit: u8, op: Op, retries: u8) -> Result<Reply, BusError> {
        let (reply, answer) = oneshot::channel();
        let job = Job { unit, op, attempts_left: retries.saturating_add(1), command: priority == Priority::Command, reply };
        let queue = match priority {
            Priority::Command => &self.commands,
            Priority::Poll => &self.polls,
        };
        queue.send(job).await.map_err(|_| BusError::Closed)?;
        answer.await.unwrap_or(Err(BusError::Closed))
    }
}

/// Starts the owner task of one bus on `tasks`. It ends when every handle is
/// dropped (its device actors have stopped).
pub fn spawn_bus(bus: Bus, tasks: &crate::lifecycle::Tasks) -> BusHandle {
    let (commands, command_rx) = mpsc::channel(64);
    let (polls, poll_rx) = mpsc::channel(64);
    let name = format!("bus {}", bus.name);
    let owner = BusOwner { bus, ctx: None, last_done: None, commands: command_rx, polls: poll_rx, retry: VecDeque::new() };
    tasks.spawn(&name, owner.run());
    BusHandle { commands, polls }
}

struct BusOwner {
    bus: Bus,
    ctx: Option<Context>,
    last_done: Option<Instant>,
    commands: mpsc::Receiver<Job>,
    polls: mpsc::Receiver<Job>,
    /// Polls waiting for another attempt, served after waiting commands.
    retry: VecDeque<Job>,
}

impl BusOwner {
    async fn run(mut self) {
        tracing::debug!(bus = %self.bus.name, "bus owner started");
        while let Some(job) = self.next_job().await {
            let is_command = job.command;
            if job.reply.is_closed() {
                continue; // the asker gave up (shutdown): do not touch the wire
            }
            let result = self.transact(job.unit, &job.op).await;
            let outcome = match &result {
                Ok(_) => "ok",
                Err(BusError::Timeout(_)) => "timeout",
                Err(BusError::Exception(_)) => "exception",
                Err(_) => "error",
            };
            metrics::counter!("twinbus_modbus_transactions_total", "bus" => self.bus.name.clone(), "outcome" => outcome).increment(1);
            let retry = matches!(&result, Err(e) if e.is_unreachable()) && job.attempts_left > 1;
            if retry {
                let job = Job { attempts_left: job.attempts_left - 1, ..job };
                if is_command {
                    // Commands retry at once: nothing waits ahead of them.
                    self.retry.push_front(job);
                } else {
                    self.retry.push_back(job);
                }
            } else {
                let _ = job.reply.send(result);
            }
        }
        if let Some(mut ctx) = self.ctx.take() {
            let _ = tokio::time::timeout(Duration::from_millis(200), ctx.disconnect()).await;
        }
        tracing::debug!(bus = %self.bus.name, "bus owner stopped");
    }

    /// Command retries, new commands, then polls due for a retry, then new polls.
    async fn next_job(&mut self) -> Option<Job> {
        if self.retry.front().is_some_and(|j| j.command) {
            return self.retry.pop_front();
        }
        if let Ok(job) = self.commands.try_recv() {
            return Some(job);
        }
        if let Some(job) = self.retry.pop_front() {
            return Some(job);
        }
        tokio::select! {
            biased;
            Some(job) = self.commands.recv() => Some(job),
            Some(job) = self.polls.recv() => Some(job),
            else => None,
        }
    }

    async fn transact(&mut self, unit: u8, op: &Op) -> Result<Reply, BusError> {
        if let Some(last) = self.last_done {
            let ready = last + self.bus.delay;
            if ready > Instant::now() {
                tokio::time::sleep_until(ready.into()).await;
            }
        }
        let result = self.transact_now(unit, op).await;
        self.last_done = Some(Instant::now());
        if matches!(result, Err(BusError::Timeout(_)) | Err(BusError::Transport(_))) {
            // Rebuild the transport: a late reply must not answer the next request.
            self.ctx = None;
        }
        result
    }

    async fn transact_now(&mut self, unit: u8, op: &Op) -> Result<Reply, BusError> {
        let timeout = self.bus.timeout;
        if self.ctx.is_none() {
            let ctx = super::transport::open(&self.bus.transport, timeout)
                .await
                .map_err(|e| BusError::Transport(e.to_string()))?;
            self.ctx = Some(ctx);
        }
        let Some(ctx) = self.ctx.as_mut() else {
            return Err(BusError::Transport("the transport is not open".to_string()));
        };
        ctx.set_slave(Slave(unit));
        match tokio::time::timeout(timeout, call(ctx, op)).await {
            Err(_) => Err(BusError::Timeout(timeout)),
            Ok(Err(e)) => Err(BusError::Transport(format!("Modbus transport error: {e}"))),
            Ok(Ok(Err(code))) => Err(BusError::Exception(exception_name(code))),
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

fn exception_name(code: ExceptionCode) -> String {
    let n = u8::from(code);
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
