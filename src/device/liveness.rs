//! Whether a device answers, and when to read each of its poll groups:
//! decisions without I/O.
//!
//! Policy:
//! - A device's readable points fall into poll groups, each with its own
//!   interval (`poll: 1s`, `60s`) or read `once`. A group is read every
//!   interval, counted from when its last read was due (a read that started
//!   late does not push the next ones back); a read that falls more than an
//!   interval behind is not made up. A `once` group is read when the device
//!   comes online: at start, and again after each time it was offline (its
//!   values were dropped then, and the device may have been replaced).
//! - Each group's read carries a deadline for the bus queue: when the
//!   group's next read falls due (`once`: a minute after it was due). The
//!   bus serves polls earliest deadline first, so a slow group's reads give
//!   way to faster ones, of this device or of others, and still come by
//!   their own deadline.
//! - Each group is read in a cycle of its own; of groups that fall due
//!   together the fastest starts first. So a fast group's cycle ends with
//!   its own reads and it is due again on time, while a slow group's reads
//!   are still on the line: a fast group never waits for a slow one to
//!   finish (the bus serves their reads by deadline), and telemetry gets
//!   each group's values as soon as that group is read.
//! - The first answer to any transaction (a poll, or a command's write or
//!   read) makes the device online at once; an offline device that answers
//!   has every group read again at once, so that its values come back with
//!   it.
//! - Silence makes it offline only when it is the final word of a request
//!   (after the retries an online device gets), never the first timeout of
//!   a request that later succeeds. A poll's retry waits in the probe tier
//!   (the actor decides that): the device has just failed to answer, and
//!   must not hold up the ones that do.
//! - An offline device is probed: one cycle at a time, one attempt per
//!   probe (no retries), in the lowest tier of the bus queue, after a
//!   backoff that doubles from twice the fastest interval up to 30 s (or
//!   that interval, if longer) and is drawn at random in its upper half, so
//!   that devices that died together do not probe together.
//! - Answers are ordered by the bus's transaction numbers: an older outcome
//!   that arrives late (a poll's reply read after a command's) never
//!   overrules a newer one.
//!
//! A device not heard from yet is polled like an online one, but with one
//! attempt: a retry protects an online device from one lost frame; a device
//! that never answered has nothing to protect.

use std::time::{Duration, Instant};

use crate::modbus::PollKind;

/// Longest wait between two probes of an offline device (unless the poll
/// period itself is longer).
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How soon a `once` group must be read after it falls due, on a line busy
/// with faster reads.
pub(crate) const ONCE_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Unknown,
    Online,
    Offline,
}

/// What an outcome changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Nothing.
    None,
    /// The device answered for the first time, or again after being offline.
    CameOnline,
    /// The device stopped answering.
    WentOffline,
}

/// One poll group's schedule.
#[derive(Clone, Debug)]
struct Group {
    /// `None`: read once per time the device comes online.
    every: Option<Duration>,
    /// When its next read is due; `None` once a `once` group was read.
    due: Option<Instant>,
    /// Whether a cycle reading it is under way.
    reading: bool,
}

/// A cycle to start: which groups, in which tier, each with its deadline.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Start {
    /// (group index, deadline of its reads), fastest group first.
    pub(crate) groups: Vec<(usize, Instant)>,
    /// Routine poll, or probe of an offline device.
    pub(crate) kind: PollKind,
}

/// One device's health and poll schedule. Created and driven by its actor.
#[derive(Debug)]
pub(crate) struct Liveness {
    groups: Vec<Group>,
    /// The fastest interval: the base of the probe backoff.
    base: Duration,
    state: State,
    /// Probes that ended without an answer since the device went offline.
    failures: u32,
    /// When the next probe is due (offline only).
    probe_due: Instant,
    probing: bool,
    /// Transaction number of the newest outcome taken into account.
    newest: u64,
    /// xorshift state for the jitter; never 0.
    rng: u64,
}

impl Liveness {
    /// A device not heard from yet whose groups read at these intervals
    /// (`None`: once), every group first due at `now`. Different seeds give
    /// different jitter.
    pub(crate) fn new(intervals: &[Option<Duration>], now: Instant, seed: u64) -> Self {
        let groups = intervals.iter().map(|&every| Group { every, due: Some(now), reading: false }).collect();
        let base = intervals.iter().flatten().min().copied().unwrap_or(MAX_BACKOFF);
        Liveness { groups, base, state: State::Unknown, failures: 0, probe_due: now, probing: false, newest: 0, rng: seed | 1 }
    }

    /// When [`Liveness::start`] will next have a cycle to start; `None`
    /// when nothing will fall due by itself (only `once` groups, all read).
    pub(crate) fn due(&self) -> Option<Instant> {
        if self.groups.is_empty() {
            return None;
        }
        if self.state == State::Offline {
            return (!self.probing).then_some(self.probe_due);
        }
        self.groups.iter().filter(|g| !g.reading).filter_map(|g| g.due).min()
    }

    /// The cycle to start at `now`, if one is due: a probe of every group
    /// while offline, else the fastest group due and not being read (call
    /// again for the next).
    pub(crate) fn start(&mut self, now: Instant) -> Option<Start> {
        if self.state == State::Offline {
            if self.probing || self.probe_due > now || self.groups.is_empty() {
                return None;
            }
            self.probing = true;
            let groups = (0..self.groups.len()).map(|i| (i, self.deadline(i, now))).collect();
            return Some(Start { groups, kind: PollKind::Probe });
        }
        let mut due: Vec<usize> = (0..self.groups.len()).filter(|&i| !self.groups[i].reading && self.groups[i].due.is_some_and(|d| d <= now)).collect();
        if due.is_empty() {
            return None;
        }
        // Fastest first; `once` (no interval) last.
        due.sort_by_key(|&i| self.groups[i].every.unwrap_or(Duration::MAX));
        let i = due[0];
        self.groups[i].reading = true;
        Some(Start { groups: vec![(i, self.deadline(i, now))], kind: PollKind::Routine })
    }

    /// When a read of group `i` must be done: when its next one is due.
    fn deadline(&self, i: usize, now: Instant) -> Instant {
        let g = &self.groups[i];
        let due = g.due.unwrap_or(now).min(now);
        due + g.every.unwrap_or(ONCE_DEADLINE)
    }

    /// The cycle `start` ended at `now` (its reads answered, or it stopped
    /// at a silence): schedules its groups, or the next probe. Returns how
    /// many of its groups overran: ended after their next read was due.
    ///
    /// The schedule is fixed-rate: a group's next read is due one interval
    /// after its last one was due, not after it ended, so the time a cycle
    /// takes (or waits for the line) does not stretch the period. A group
    /// that overran is read again at once, one read however many slots
    /// went by: the missed ones are skipped, not made up in a burst that
    /// would crowd the line just when it is short of time.
    pub(crate) fn finished(&mut self, start: &Start, now: Instant) -> u32 {
        self.release(start);
        if self.state == State::Offline {
            self.failures = self.failures.saturating_add(1);
            self.probe_due = now + self.backoff();
            return 0;
        }
        let mut overruns = 0;
        for &(i, _) in &start.groups {
            let g = &mut self.groups[i];
            g.due = match (g.every, g.due) {
                (Some(every), Some(due)) => {
                    let next = due + every;
                    overruns += u32::from(next < now);
                    Some(next.max(now))
                }
                (Some(every), None) => Some(now + every),
                (None, _) => None,
            };
        }
        overruns
    }

    /// The cycle `start` was given up (the device went offline in another
    /// cycle): its groups are read again when the device is back.
    pub(crate) fn abandoned(&mut self, start: &Start) {
        self.release(start);
    }

    fn release(&mut self, start: &Start) {
        for &(i, _) in &start.groups {
            if let Some(g) = self.groups.get_mut(i) {
                g.reading = false;
            }
        }
        if start.kind == PollKind::Probe {
            self.probing = false;
        }
    }

    /// Whether the device is known not to answer.
    pub(crate) fn is_offline(&self) -> bool {
        self.state == State::Offline
    }

    /// Attempts a request gets now: `retries + 1` while the device answers,
    /// one while it is offline or not heard from yet.
    pub(crate) fn attempts(&self, retries: u8) -> u8 {
        match self.state {
            State::Online => retries.saturating_add(1),
            State::Unknown | State::Offline => 1,
        }
    }

    /// The device answered transaction `seq` (with data or an exception).
    pub(crate) fn answered(&mut self, seq: u64, now: Instant) -> Change {
        if !self.take(seq) {
            return Change::None;
        }
        match self.state {
            State::Online => Change::None,
            State::Unknown => {
                self.state = State::Online;
                Change::CameOnline
            }
            State::Offline => {
                self.state = State::Online;
                self.failures = 0;
                for g in &mut self.groups {
                    g.due = Some(now);
                }
                Change::CameOnline
            }
        }
    }

    /// Transaction `seq` was the last attempt of a request, and got no answer.
    pub(crate) fn unreachable(&mut self, seq: u64) -> Change {
        if !self.take(seq) || self.state == State::Offline {
            return Change::None;
        }
        self.state = State::Offline;
        self.failures = 0;
        // Found dead outside a poll (by a command): probe when the next
        // read would have been due; a poll that found it dead schedules
        // the first probe when it ends.
        if let Some(next) = self.groups.iter().filter_map(|g| g.due).min() {
            self.probe_due = next;
        }
        Change::WentOffline
    }

    /// Whether `seq` is news; records it if so.
    fn take(&mut self, seq: u64) -> bool {
        if seq < self.newest {
            return false;
        }
        self.newest = seq;
        true
    }

    /// The wait before the next probe: random in [d/2, d], d doubling with
    /// each failed probe from twice the fastest interval up to the cap.
    fn backoff(&mut self) -> Duration {
        let cap = MAX_BACKOFF.max(self.base);
        let factor = 1u32 << self.failures.min(16);
        let d = self.base.saturating_mul(factor).min(cap);
        // xorshift: jitter needs spread, not cryptographic quality.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = 0.5 + (self.rng % 1001) as f64 / 2000.0;
        d.mul_f64(fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);
    const MINUTE: Duration = Duration::from_secs(60);

    /// One group read every second, online.
    fn online(now: Instant, seed: u64) -> Liveness {
        let mut l = Liveness::new(&[Some(SECOND)], now, seed);
        assert_eq!(l.answered(1, now), Change::CameOnline);
        l
    }

    /// Starts what is due at `now` and finishes it at `end`.
    fn poll(l: &mut Liveness, now: Instant, end: Instant) -> Option<Start> {
        let start = l.start(now)?;
        l.finished(&start, end);
        Some(start)
    }

    /// Starts every cycle due at `now`, then finishes them all at `end`;
    /// returns the groups read, in the order started.
    fn poll_all(l: &mut Liveness, now: Instant, end: Instant) -> Vec<usize> {
        let mut starts = Vec::new();
        while let Some(s) = l.start(now) {
            starts.push(s);
        }
        for s in &starts {
            l.finished(s, end);
        }
        starts.iter().flat_map(groups).collect()
    }

    fn groups(start: &Start) -> Vec<usize> {
        start.groups.iter().map(|(i, _)| *i).collect()
    }

    #[test]
    fn an_answering_device_is_polled_every_period_from_when_the_poll_was_due() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        // The cycle started 300 ms late (a probe was on the wire) and took 20 ms.
        let start = l.start(t0 + Duration::from_millis(300)).expect("due");
        l.finished(&start, t0 + Duration::from_millis(320));
        assert_eq!(l.due(), Some(t0 + SECOND), "the delay is not carried into the next poll");
        poll(&mut l, t0 + SECOND, t0 + SECOND + Duration::from_millis(10));
        assert_eq!(l.due(), Some(t0 + 2 * SECOND));
    }

    #[test]
    fn a_poll_more_than_a_period_late_is_not_made_up_with_a_burst() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        let late = t0 + Duration::from_millis(3500);
        poll(&mut l, late, late);
        assert_eq!(l.due(), Some(late), "one poll now, not three back to back");
        poll(&mut l, late, late);
        assert_eq!(l.due(), Some(late + SECOND));
    }

    #[test]
    fn a_cycle_that_ends_within_its_period_is_no_overrun_and_keeps_the_grid() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        let start = l.start(t0).expect("due");
        assert_eq!(l.finished(&start, t0 + Duration::from_millis(999)), 0);
        let start = l.start(t0 + SECOND + Duration::from_millis(40)).expect("due, started late");
        assert_eq!(l.finished(&start, t0 + SECOND + Duration::from_millis(990)), 0);
        assert_eq!(l.due(), Some(t0 + 2 * SECOND), "start + period, not end + period");
    }

    #[test]
    fn a_cycle_that_ends_after_its_next_slot_is_an_overrun_and_the_missed_slots_are_skipped() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        let start = l.start(t0).expect("due");
        let end = t0 + Duration::from_millis(2500);
        assert_eq!(l.finished(&start, end), 1, "one overrun, however many slots it covered");
        assert_eq!(l.due(), Some(end), "one read at once for the slots at 1 s and 2 s");
        let start = l.start(end).expect("due");
        assert_eq!(l.finished(&start, end + Duration::from_millis(100)), 0);
        assert_eq!(l.due(), Some(end + SECOND));
    }

    #[test]
    fn only_the_groups_that_overran_are_counted() {
        let t0 = Instant::now();
        let mut l = Liveness::new(&[Some(SECOND), Some(MINUTE)], t0, 7);
        l.answered(1, t0);
        let fast = l.start(t0).expect("the fast group");
        let slow = l.start(t0).expect("the slow group");
        assert_eq!(l.finished(&fast, t0 + Duration::from_millis(1500)), 1, "the 1 s group overran");
        assert_eq!(l.finished(&slow, t0 + Duration::from_millis(1500)), 0, "the 1 min group did not");
    }

    #[test]
    fn groups_due_together_start_a_cycle_each_fastest_first() {
        let t0 = Instant::now();
        let mut l = Liveness::new(&[None, Some(MINUTE), Some(SECOND)], t0, 7);
        let starts: Vec<Start> = std::iter::from_fn(|| l.start(t0)).collect();
        let order: Vec<Vec<usize>> = starts.iter().map(groups).collect();
        assert_eq!(order, vec![vec![2], vec![1], vec![0]]);
        assert_eq!(starts[0].groups[0].1, t0 + SECOND, "a group's deadline is when its next read falls due");
        assert_eq!(starts[1].groups[0].1, t0 + MINUTE);
        assert_eq!(starts[2].groups[0].1, t0 + ONCE_DEADLINE);
        assert_eq!(l.due(), None, "all three under way");
    }

    #[test]
    fn each_group_keeps_its_own_interval_and_a_once_group_is_read_once() {
        let t0 = Instant::now();
        let mut l = Liveness::new(&[Some(SECOND), Some(Duration::from_secs(3)), None], t0, 7);
        l.answered(1, t0);
        let mut reads = vec![0; 3];
        for s in 0..6u32 {
            let now = t0 + SECOND * s;
            for g in poll_all(&mut l, now, now) {
                reads[g] += 1;
            }
        }
        assert_eq!(reads, vec![6, 2, 1], "1 s: every second; 3 s: at 0 and 3; once: at start");
    }

    #[test]
    fn a_fast_group_falling_due_while_a_slow_one_is_read_starts_a_cycle_of_its_own() {
        let t0 = Instant::now();
        let mut l = Liveness::new(&[Some(SECOND), Some(MINUTE)], t0, 7);
        l.answered(1, t0);
        let fast = l.start(t0).expect("the fast group");
        let _slow = l.start(t0).expect("the slow group");
        // The fast group's cycle is answered; the slow group's reads still
        // wait on a busy line when the fast group is due again.
        l.finished(&fast, t0 + Duration::from_millis(100));
        assert_eq!(l.due(), Some(t0 + SECOND));
        let again = l.start(t0 + SECOND).expect("the fast group");
        assert_eq!(groups(&again), vec![0], "not the slow group, which is still being read");
        assert_eq!(l.start(t0 + SECOND), None);
    }

    #[test]
    fn an_online_device_gets_its_retries() {
        let l = online(Instant::now(), 7);
        assert_eq!(l.attempts(2), 3);
    }

    #[test]
    fn a_device_not_heard_from_yet_gets_one_attempt_but_a_routine_poll() {
        let t0 = Instant::now();
        let mut l = Liveness::new(&[Some(SECOND)], t0, 7);
        assert_eq!(l.attempts(2), 1);
        assert_eq!(l.start(t0).map(|s| s.kind), Some(PollKind::Routine));
    }

    #[test]
    fn an_offline_device_is_probed_with_one_attempt_behind_every_poll() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        let start = l.start(t0).expect("due");
        assert_eq!(l.unreachable(2), Change::WentOffline);
        l.finished(&start, t0);
        assert!(l.is_offline());
        assert_eq!(l.attempts(3), 1, "no retries while offline: a probe costs one timeout");
        let due = l.due().expect("a probe is due");
        assert_eq!(l.start(due).map(|s| s.kind), Some(PollKind::Probe));
        assert_eq!(l.due(), None, "one probe at a time");
    }

    #[test]
    fn an_offline_device_is_probed_on_a_doubling_schedule_up_to_the_cap() {
        let t0 = Instant::now();
        let mut l = online(t0, 12345);
        let start = l.start(t0).expect("due");
        l.unreachable(2);
        l.finished(&start, t0);
        let mut now = t0;
        for failure in 1..=8u32 {
            let due = l.due().expect("probe");
            let wait = due - now;
            let d = (SECOND * (1 << failure)).min(MAX_BACKOFF);
            assert!(wait >= d / 2 && wait <= d, "probe {failure}: waited {wait:?}, expected within [{:?}, {d:?}]", d / 2);
            now = due;
            poll(&mut l, now, now);
        }
    }

    #[test]
    fn devices_that_die_together_do_not_probe_in_lock_step() {
        let t0 = Instant::now();
        let mut dues = Vec::new();
        for seed in 1..=10u64 {
            let mut l = online(t0, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let start = l.start(t0).expect("due");
            l.unreachable(2);
            l.finished(&start, t0);
            for _ in 0..5 {
                let due = l.due().expect("probe");
                poll(&mut l, due, due);
            }
            dues.push(l.due().expect("probe"));
        }
        dues.sort();
        dues.dedup();
        assert_eq!(dues.len(), 10, "ten devices, ten different probe times: {dues:?}");
    }

    #[test]
    fn the_first_answer_brings_an_offline_device_back_and_reads_every_group_at_once() {
        let t0 = Instant::now();
        let mut l = Liveness::new(&[Some(SECOND), None], t0, 7);
        l.answered(1, t0);
        poll_all(&mut l, t0, t0);
        l.unreachable(2);
        assert!(l.due().expect("probe") >= t0 + Duration::from_millis(900));
        // A command's write is answered before the next probe is due.
        let now = t0 + Duration::from_millis(200);
        assert_eq!(l.answered(3, now), Change::CameOnline);
        assert!(!l.is_offline());
        assert_eq!(l.due(), Some(now), "polled at once, so the values come back with the device");
        assert_eq!(poll_all(&mut l, now, now), vec![0, 1], "the once group too: its values were dropped");
        assert_eq!(l.attempts(1), 2);
    }

    #[test]
    fn an_older_outcome_read_late_does_not_overrule_a_newer_one() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        // A command answered as transaction 9; a poll's timeout from
        // transaction 8 is read afterwards.
        assert_eq!(l.answered(9, t0), Change::None);
        assert_eq!(l.unreachable(8), Change::None);
        assert!(!l.is_offline());
        assert_eq!(l.unreachable(10), Change::WentOffline);
        assert_eq!(l.answered(8, t0), Change::None, "still offline");
        assert!(l.is_offline());
    }

    #[test]
    fn a_device_reported_offline_once_is_not_reported_again_until_it_answers() {
        let mut l = online(Instant::now(), 7);
        assert_eq!(l.unreachable(2), Change::WentOffline);
        assert_eq!(l.unreachable(3), Change::None);
    }

    #[test]
    fn a_device_without_readable_points_is_never_polled() {
        let mut l = Liveness::new(&[], Instant::now(), 7);
        assert_eq!(l.due(), None);
        assert_eq!(l.start(Instant::now()), None);
    }
}
