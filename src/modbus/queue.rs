//! What goes on the wire next: the bus owner's decisions, without I/O.
//!
//! A line carries one transaction at a time, so the order of the waiting
//! requests is the whole of fairness on a bus. Three tiers, served strictly
//! in this order:
//! 1. **commands**: a device executing a cloud command asks for the line and
//!    holds it ([`Queue::push_lease`]) until its write, verification and
//!    read-back are done, so nothing else slips between them; commands of
//!    different devices take the line in the order they asked;
//! 2. **polls** of devices that answer (and of devices not heard from yet),
//!    earliest deadline first;
//! 3. **probes** of offline devices, each costing at most one timeout, first
//!    come, first served.
//!
//! A poll carries a deadline: when the next read of the same poll group
//! falls due. Serving the earliest deadline first shares the line between
//! devices, and between the groups of one device: a group read every second
//! goes ahead of one read every minute, which still comes by its own
//! deadline, so no group starves and each keeps its period while the line
//! can carry them all. A poll is a whole poll cycle: after each of its reads
//! it goes back to its tier with the deadline of its next read, ahead of
//! every poll with the same deadline ([`Queue::push_front_poll`]), so that a
//! cycle, once started, is split only by commands and by reads that are due
//! sooner.
//!
//! So a command waits for at most the one transaction already on the wire
//! (and for commands asked before it), never for a poll or a probe that has
//! not started; and a healthy device's poll waits for at most one probe,
//! however many devices on the line are dead. Within a tier, first come,
//! first served. A request whose asker has gone (it gave up, or shut down)
//! is dropped without touching the wire.
//!
//! Probes run only when no poll waits. A line whose polls alone keep it busy
//! (poll periods shorter than the line can serve) therefore delays probes as
//! well: those devices come back later, and the healthy ones are not slowed.

use std::collections::VecDeque;
use std::time::Instant;

/// A waiting request that its asker may abandon.
pub(super) trait Waiting {
    /// Whether the asker is gone, so that the request must not run.
    fn abandoned(&self) -> bool;
}

/// Which tier a poll waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollKind {
    /// A routine poll of a device that answers (or is not known yet).
    Routine,
    /// A probe of an offline device.
    Probe,
}

/// Names one grant of the line to a command.
pub(super) type LeaseId = u64;

/// The bus owner's next step.
#[derive(Debug, PartialEq)]
pub(super) enum Next<J, L> {
    /// Run this transaction on the wire.
    Run(J),
    /// Give the line to this command; it now holds it under the id.
    Grant(LeaseId, L),
    /// A command holds the line and has not sent its next request yet.
    WaitForHolder,
    /// Nothing waits.
    Idle,
}

/// The waiting requests of one line. `J` is a transaction, `L` a command's
/// request for the line.
#[derive(Debug)]
pub(super) struct Queue<J, L> {
    commands: VecDeque<L>,
    /// (deadline, arrival, poll): served by the smallest (deadline, arrival).
    polls: Vec<(Instant, u64, J)>,
    probes: VecDeque<J>,
    held: Option<Held<J>>,
    last_lease: LeaseId,
    /// Numbers the polls as they arrive; 0 is kept for started cycles.
    arrivals: u64,
}

#[derive(Debug)]
struct Held<J> {
    id: LeaseId,
    /// The holder's request; it sends one at a time.
    call: Option<J>,
}

impl<J: Waiting, L: Waiting> Queue<J, L> {
    pub(super) fn new() -> Self {
        Queue { commands: VecDeque::new(), polls: Vec::new(), probes: VecDeque::new(), held: None, last_lease: 0, arrivals: 0 }
    }

    /// A command asks for the line.
    pub(super) fn push_lease(&mut self, ask: L) {
        self.commands.push_back(ask);
    }

    /// A poll or probe asks for one transaction; a poll is due by `deadline`.
    pub(super) fn push_poll(&mut self, job: J, kind: PollKind, deadline: Instant) {
        match kind {
            PollKind::Routine => {
                self.arrivals += 1;
                self.polls.push((deadline, self.arrivals, job));
            }
            PollKind::Probe => self.probes.push_back(job),
        }
    }

    /// The rest of a poll cycle that has started, whose next read is due by
    /// `deadline`: ahead of the polls with the same deadline (a probe: next
    /// among probes).
    pub(super) fn push_front_poll(&mut self, job: J, kind: PollKind, deadline: Instant) {
        match kind {
            PollKind::Routine => self.polls.push((deadline, 0, job)),
            PollKind::Probe => self.probes.push_front(job),
        }
    }

    /// The holder of `lease` asks for one transaction. Gives the request
    /// back when that lease no longer holds the line (it was released while
    /// the request was on its way).
    pub(super) fn push_call(&mut self, lease: LeaseId, job: J) -> Result<(), J> {
        match &mut self.held {
            Some(h) if h.id == lease && h.call.is_none() => {
                h.call = Some(job);
                Ok(())
            }
            _ => Err(job),
        }
    }

    /// The holder of `lease` is done with the line.
    pub(super) fn release(&mut self, lease: LeaseId) {
        if self.held.as_ref().is_some_and(|h| h.id == lease) {
            self.held = None;
        }
    }

    /// The lease holding the line, if any.
    pub(super) fn holder(&self) -> Option<LeaseId> {
        self.held.as_ref().map(|h| h.id)
    }

    /// Whether nothing waits and nobody holds the line.
    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.held.is_none() && self.commands.is_empty() && self.polls.is_empty() && self.probes.is_empty()
    }

    /// Decides the next step; see the module docs for the order.
    pub(super) fn next(&mut self) -> Next<J, L> {
        if let Some(h) = &mut self.held {
            return match h.call.take() {
                Some(job) => Next::Run(job),
                None => Next::WaitForHolder,
            };
        }
        if let Some(ask) = pop_live(&mut self.commands) {
            self.last_lease += 1;
            self.held = Some(Held { id: self.last_lease, call: None });
            return Next::Grant(self.last_lease, ask);
        }
        self.polls.retain(|(.., job)| !job.abandoned());
        let first = self.polls.iter().enumerate().min_by_key(|(_, (deadline, arrival, _))| (*deadline, *arrival)).map(|(i, _)| i);
        if let Some(i) = first {
            return Next::Run(self.polls.swap_remove(i).2);
        }
        match pop_live(&mut self.probes) {
            Some(job) => Next::Run(job),
            None => Next::Idle,
        }
    }
}

fn pop_live<T: Waiting>(queue: &mut VecDeque<T>) -> Option<T> {
    while let Some(item) = queue.pop_front() {
        if !item.abandoned() {
            return Some(item);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct Ask(&'static str, bool);

    impl Waiting for Ask {
        fn abandoned(&self) -> bool {
            self.1
        }
    }

    fn ask(name: &'static str) -> Ask {
        Ask(name, false)
    }

    fn queue() -> Queue<Ask, Ask> {
        Queue::new()
    }

    /// The same deadline for every poll: first come, first served.
    fn soon() -> Instant {
        use std::sync::OnceLock;
        static T: OnceLock<Instant> = OnceLock::new();
        *T.get_or_init(Instant::now)
    }

    /// Runs the queue as the bus owner would, with each command making one
    /// call and releasing; returns the order of what reached the wire.
    fn drain(q: &mut Queue<Ask, Ask>) -> Vec<&'static str> {
        let mut wire = Vec::new();
        loop {
            match q.next() {
                Next::Run(job) => wire.push(job.0),
                Next::Grant(id, ask) => {
                    assert!(q.push_call(id, ask).is_ok());
                    let Next::Run(job) = q.next() else { panic!("the holder's call runs next") };
                    wire.push(job.0);
                    q.release(id);
                }
                Next::WaitForHolder => panic!("nobody holds the line here"),
                Next::Idle => return wire,
            }
        }
    }

    #[test]
    fn commands_go_ahead_of_every_waiting_poll_and_probe() {
        let mut q = queue();
        q.push_poll(ask("probe dead-1"), PollKind::Probe, soon());
        q.push_poll(ask("poll pump"), PollKind::Routine, soon());
        q.push_poll(ask("probe dead-2"), PollKind::Probe, soon());
        q.push_lease(ask("command pump"));
        assert_eq!(drain(&mut q), vec!["command pump", "poll pump", "probe dead-1", "probe dead-2"]);
    }

    #[test]
    fn polls_of_answering_devices_go_ahead_of_probes_of_offline_ones() {
        let mut q = queue();
        for _ in 0..10 {
            q.push_poll(ask("probe"), PollKind::Probe, soon());
        }
        q.push_poll(ask("poll"), PollKind::Routine, soon());
        assert_eq!(q.next(), Next::Run(ask("poll")), "one poll waits for no probe that has not started");
    }

    #[test]
    fn a_command_holds_the_line_until_it_releases_it() {
        let mut q = queue();
        q.push_lease(ask("command"));
        let Next::Grant(id, _) = q.next() else { panic!("the command gets the line") };
        q.push_poll(ask("poll"), PollKind::Routine, soon());
        q.push_lease(ask("another command"));
        assert_eq!(q.next(), Next::WaitForHolder, "nothing slips in while the holder works");
        assert!(q.push_call(id, ask("write")).is_ok());
        assert_eq!(q.next(), Next::Run(ask("write")));
        assert!(q.push_call(id, ask("read back")).is_ok());
        assert_eq!(q.next(), Next::Run(ask("read back")));
        q.release(id);
        assert!(matches!(q.next(), Next::Grant(_, Ask("another command", _))), "then the next command, before the poll");
    }

    #[test]
    fn a_started_poll_cycle_goes_on_before_other_polls_but_after_commands() {
        let mut q = queue();
        q.push_poll(ask("pump, first read"), PollKind::Routine, soon());
        q.push_poll(ask("meter"), PollKind::Routine, soon());
        q.push_poll(ask("probe"), PollKind::Probe, soon());
        assert_eq!(q.next(), Next::Run(ask("pump, first read")));
        q.push_lease(ask("command"));
        q.push_front_poll(ask("pump, second read"), PollKind::Routine, soon());
        assert_eq!(drain(&mut q), vec!["command", "pump, second read", "meter", "probe"]);
    }

    #[test]
    fn a_poll_due_sooner_goes_ahead_of_one_due_later_whatever_their_arrival() {
        let mut q = queue();
        let t = soon();
        q.push_poll(ask("meter counters (every minute)"), PollKind::Routine, t + std::time::Duration::from_secs(60));
        q.push_poll(ask("pump (every second)"), PollKind::Routine, t + std::time::Duration::from_secs(1));
        q.push_poll(ask("meter power (every second)"), PollKind::Routine, t + std::time::Duration::from_secs(1));
        assert_eq!(drain(&mut q), vec!["pump (every second)", "meter power (every second)", "meter counters (every minute)"]);
    }

    #[test]
    fn a_started_slow_cycle_gives_way_to_a_faster_read_between_its_reads() {
        let mut q = queue();
        let t = soon();
        let minute = t + std::time::Duration::from_secs(60);
        q.push_poll(ask("counters, first read"), PollKind::Routine, minute);
        assert_eq!(q.next(), Next::Run(ask("counters, first read")));
        q.push_poll(ask("power"), PollKind::Routine, t + std::time::Duration::from_secs(1));
        q.push_poll(ask("other meter's counters"), PollKind::Routine, minute);
        q.push_front_poll(ask("counters, second read"), PollKind::Routine, minute);
        assert_eq!(drain(&mut q), vec!["power", "counters, second read", "other meter's counters"]);
    }

    #[test]
    fn commands_take_the_line_in_the_order_they_asked() {
        let mut q = queue();
        q.push_lease(ask("first"));
        q.push_lease(ask("second"));
        q.push_poll(ask("poll"), PollKind::Routine, soon());
        assert_eq!(drain(&mut q), vec!["first", "second", "poll"]);
    }

    #[test]
    fn a_request_whose_asker_is_gone_never_reaches_the_wire() {
        let mut q = queue();
        q.push_poll(Ask("withdrawn poll", true), PollKind::Routine, soon());
        q.push_lease(Ask("abandoned command", true));
        q.push_poll(ask("poll"), PollKind::Routine, soon());
        assert_eq!(drain(&mut q), vec!["poll"]);
        assert!(q.is_empty());
    }

    #[test]
    fn a_call_under_a_released_lease_is_given_back() {
        let mut q = queue();
        q.push_lease(ask("command"));
        let Next::Grant(id, _) = q.next() else { panic!("granted") };
        q.release(id);
        assert_eq!(q.push_call(id, ask("late")), Err(ask("late")));
        assert_eq!(q.holder(), None);
        assert_eq!(q.next(), Next::Idle);
    }
}
