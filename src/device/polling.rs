//! The device actor's poll cycles: started when [`Liveness`] says a poll
//! group is due, handed to the bus as one job of back-to-back reads, and
//! taken in when the answers come.
//!
//! A cycle reads one poll group (a probe of an offline device: all of
//! them), each read carrying its group's deadline for the bus queue.
//! Several cycles may be under way at once, at most one per group (one
//! probe while offline), and the bus interleaves their reads by deadline;
//! each cycle's end publishes a snapshot with that group's new values.
//! Within a cycle:
//! - silence (or 0x0A/0x0B from a gateway in front) stops it there; the
//!   rest is asked again, in the probe tier, while attempts remain, else
//!   the device is offline and the other cycles are given up;
//! - a "busy" answer (0x06) asks the rest again after the device's busy
//!   delay, at most its busy retries per cycle; meanwhile the cycle waits
//!   on a timer, not on the line;
//! - another exception is that block's points' error (the device answers).
//!
//! [`Liveness`]: super::liveness::Liveness

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Instant;

use super::liveness::Start;
use super::{decode_block, DeviceActor};
use crate::modbus::{Done, PendingPoll, PollKind};

/// A poll cycle under way.
pub(super) struct Cycle {
    start: Start,
    /// (index into the actor's blocks, deadline), in the order read.
    blocks: Vec<(usize, Instant)>,
    /// Position in `blocks` of the first read the wait is for.
    next: usize,
    attempt: u8,
    busy_left: u8,
    wait: Wait,
}

enum Wait {
    /// The bus's answers to `blocks[next..]`.
    Answers(PendingPoll),
    /// The device said busy: ask again at this time.
    Resume(Pin<Box<tokio::time::Sleep>>),
}

/// What woke a cycle.
pub(super) enum Event {
    Answers(Vec<Done>),
    Resume,
}

/// How a cycle goes on after its answers.
enum Then {
    Done,
    Retry,
    Busy,
    Lost,
}

/// The next event of any cycle: (its index, the event). Never resolves
/// while there is none.
pub(super) async fn next_event(cycles: &mut [Cycle]) -> (usize, Event) {
    std::future::poll_fn(|cx| {
        for (i, c) in cycles.iter_mut().enumerate() {
            match &mut c.wait {
                // The bus dropped the request unanswered: it has stopped.
                Wait::Answers(pending) => {
                    if let Poll::Ready(answers) = Pin::new(pending).poll(cx) {
                        return Poll::Ready((i, Event::Answers(answers.unwrap_or_default())));
                    }
                }
                Wait::Resume(sleep) => {
                    if sleep.as_mut().poll(cx).is_ready() {
                        return Poll::Ready((i, Event::Resume));
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

impl DeviceActor {
    /// Starts the cycle that is due now, if any.
    pub(super) async fn start_cycle(&mut self, cycles: &mut Vec<Cycle>) {
        let Some(start) = self.liveness.start(Instant::now()) else { return };
        let blocks: Vec<(usize, Instant)> =
            start.groups.iter().flat_map(|&(g, deadline)| self.group_blocks.get(g).cloned().unwrap_or(0..0).map(move |b| (b, deadline))).collect();
        if blocks.is_empty() {
            let _ = self.liveness.finished(&start, Instant::now());
            return;
        }
        let pending = self.ask(&blocks, start.kind).await;
        cycles.push(Cycle { start, blocks, next: 0, attempt: 1, busy_left: self.quirks.busy_retries, wait: Wait::Answers(pending) });
    }

    async fn ask(&self, blocks: &[(usize, Instant)], kind: PollKind) -> PendingPoll {
        let ops = blocks.iter().filter_map(|&(b, deadline)| self.blocks.get(b).map(|block| (block.op(), deadline))).collect();
        self.bus.poll(self.unit, ops, kind).await
    }

    /// Takes in what woke cycle `i`.
    pub(super) async fn on_cycle_event(&mut self, cycles: &mut Vec<Cycle>, i: usize, event: Event) {
        if i >= cycles.len() {
            return;
        }
        let mut cycle = cycles.swap_remove(i);
        let then = match event {
            Event::Resume => Then::Busy,
            Event::Answers(answers) => self.take_answers(&mut cycle, answers),
        };
        match then {
            Then::Done => self.end(cycle),
            Then::Lost => {
                self.end(cycle);
                // The device is offline: the other reads would only add timeouts.
                for other in cycles.drain(..) {
                    self.liveness.abandoned(&other.start);
                }
            }
            Then::Retry => {
                cycle.attempt += 1;
                // A retry waits with the probes: this device has just failed
                // to answer, and must not hold up the ones that do.
                cycle.wait = Wait::Answers(self.ask(&cycle.blocks[cycle.next..], PollKind::Probe).await);
                cycles.push(cycle);
            }
            Then::Busy if matches!(cycle.wait, Wait::Resume(_)) => {
                let kind = if cycle.attempt > 1 { PollKind::Probe } else { cycle.start.kind };
                cycle.wait = Wait::Answers(self.ask(&cycle.blocks[cycle.next..], kind).await);
                cycles.push(cycle);
            }
            Then::Busy => {
                cycle.wait = Wait::Resume(Box::pin(tokio::time::sleep(self.quirks.busy_delay)));
                cycles.push(cycle);
            }
        }
    }

    fn take_answers(&mut self, cycle: &mut Cycle, answers: Vec<Done>) -> Then {
        // Shared, not cloned: the answers update `self` while they are read.
        let (blocks, points) = (Arc::clone(&self.blocks), Arc::clone(&self.points));
        for (pos, done) in (cycle.next..).zip(answers) {
            let Some(b) = cycle.blocks.get(pos).and_then(|&(b, _)| blocks.get(b)) else { break };
            match &done.result {
                Ok(reply) => {
                    for (i, v) in decode_block(&points, b.start, &b.points, reply) {
                        self.store(i, v, done.seq);
                    }
                    self.heard(done.seq);
                }
                Err(e) if e.is_busy() && cycle.busy_left > 0 => {
                    cycle.busy_left -= 1;
                    cycle.next = pos;
                    self.heard(done.seq);
                    self.count_busy();
                    return Then::Busy;
                }
                Err(e) if !e.is_unreachable() => {
                    for &i in &b.points {
                        self.store(i, Err(e.to_string()), done.seq);
                    }
                    self.heard(done.seq);
                }
                Err(_) if cycle.attempt < self.liveness.attempts(self.retries) => {
                    cycle.next = pos;
                    return Then::Retry;
                }
                Err(e) => {
                    // The bus stopped the cycle there: the rest would only add timeouts.
                    self.lost(e, done.seq);
                    return Then::Lost;
                }
            }
        }
        // Fewer answers than reads, without a failure, means the bus has
        // stopped (shutdown): nothing to conclude about the device.
        Then::Done
    }

    fn end(&mut self, cycle: Cycle) {
        let overruns = self.liveness.finished(&cycle.start, Instant::now());
        if overruns > 0 {
            // The line (or the device) cannot keep the configured period;
            // the next read starts at once, and the slots missed are skipped.
            metrics::counter!("twinbus_poll_overruns_total", "device" => self.name.clone()).increment(u64::from(overruns));
        }
        self.publish();
    }
}
