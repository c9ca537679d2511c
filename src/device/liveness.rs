//! Whether a device answers, and when to poll it next: decisions without I/O.
//!
//! Policy:
//! - A device that answers is polled every `poll` period, counted from when
//!   the last poll was due (a poll that started late does not push the next
//!   ones back); a poll that falls more than a period behind is not made up.
//! - The first answer to any transaction (a poll, or a command's write or
//!   read) makes the device online at once; an offline device that answers
//!   is polled again at once, so that its values come back with it.
//! - Silence makes it offline only when it is the final word of a request
//!   (after the retries an online device gets), never the first timeout of
//!   a request that later succeeds. A poll's retry waits in the probe tier
//!   (the actor decides that): the device has just failed to answer, and
//!   must not hold up the ones that do.
//! - An offline device is probed: one attempt per probe (no retries), in the
//!   lowest tier of the bus queue, after a backoff that doubles from twice
//!   the poll period up to 30 s (or the period, if longer) and is drawn at
//!   random in its upper half, so that devices that died together do not
//!   probe together.
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

/// One device's health and poll schedule. Created and driven by its actor.
#[derive(Debug)]
pub(crate) struct Liveness {
    period: Duration,
    state: State,
    /// Poll cycles that ended without an answer since the device went offline.
    failures: u32,
    /// When the next poll cycle is due.
    due: Instant,
    /// Transaction number of the newest outcome taken into account.
    newest: u64,
    /// xorshift state for the jitter; never 0.
    rng: u64,
}

impl Liveness {
    /// A device not heard from yet, first polled at `now`. Different seeds
    /// give different jitter.
    pub(crate) fn new(period: Duration, now: Instant, seed: u64) -> Self {
        Liveness { period, state: State::Unknown, failures: 0, due: now, newest: 0, rng: seed | 1 }
    }

    /// When the next poll cycle is due.
    pub(crate) fn due(&self) -> Instant {
        self.due
    }

    /// Whether the device is known not to answer.
    pub(crate) fn is_offline(&self) -> bool {
        self.state == State::Offline
    }

    /// The bus tier of this device's polls now.
    pub(crate) fn kind(&self) -> PollKind {
        if self.is_offline() {
            PollKind::Probe
        } else {
            PollKind::Routine
        }
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
                self.due = now;
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
        Change::WentOffline
    }

    /// A poll cycle ended at `now`: schedules the next one.
    pub(crate) fn cycle_done(&mut self, now: Instant) {
        if self.state == State::Offline {
            self.failures = self.failures.saturating_add(1);
            self.due = now + self.backoff();
        } else {
            self.due += self.period;
            if self.due < now {
                self.due = now;
            }
        }
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
    /// each failed probe from twice the period up to the cap.
    fn backoff(&mut self) -> Duration {
        let cap = MAX_BACKOFF.max(self.period);
        let factor = 1u32 << self.failures.min(16);
        let d = self.period.saturating_mul(factor).min(cap);
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

    fn online(now: Instant, seed: u64) -> Liveness {
        let mut l = Liveness::new(SECOND, now, seed);
        assert_eq!(l.answered(1, now), Change::CameOnline);
        l
    }

    #[test]
    fn an_answering_device_is_polled_every_period_from_when_the_poll_was_due() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        // The cycle started 300 ms late (a probe was on the wire) and took 20 ms.
        l.cycle_done(t0 + Duration::from_millis(320));
        assert_eq!(l.due(), t0 + SECOND, "the delay is not carried into the next poll");
        l.cycle_done(t0 + SECOND + Duration::from_millis(10));
        assert_eq!(l.due(), t0 + 2 * SECOND);
    }

    #[test]
    fn a_poll_more_than_a_period_late_is_not_made_up_with_a_burst() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        let late = t0 + Duration::from_millis(3500);
        l.cycle_done(late);
        assert_eq!(l.due(), late, "one poll now, not three back to back");
        l.cycle_done(late);
        assert_eq!(l.due(), late + SECOND);
    }

    #[test]
    fn an_online_device_gets_its_retries_and_routine_polls() {
        let l = online(Instant::now(), 7);
        assert_eq!(l.attempts(2), 3);
        assert_eq!(l.kind(), PollKind::Routine);
    }

    #[test]
    fn a_device_not_heard_from_yet_gets_one_attempt_but_a_routine_poll() {
        let l = Liveness::new(SECOND, Instant::now(), 7);
        assert_eq!(l.attempts(2), 1);
        assert_eq!(l.kind(), PollKind::Routine);
    }

    #[test]
    fn an_offline_device_is_probed_with_one_attempt_behind_every_poll() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        assert_eq!(l.unreachable(2), Change::WentOffline);
        assert!(l.is_offline());
        assert_eq!(l.attempts(3), 1, "no retries while offline: a probe costs one timeout");
        assert_eq!(l.kind(), PollKind::Probe);
    }

    #[test]
    fn an_offline_device_is_probed_on_a_doubling_schedule_up_to_the_cap() {
        let t0 = Instant::now();
        let mut l = online(t0, 12345);
        l.unreachable(2);
        let mut now = t0;
        for failure in 1..=8u32 {
            l.cycle_done(now);
            let wait = l.due() - now;
            let d = (SECOND * (1 << failure)).min(MAX_BACKOFF);
            assert!(wait >= d / 2 && wait <= d, "probe {failure}: waited {wait:?}, expected within [{:?}, {d:?}]", d / 2);
            now = l.due();
        }
    }

    #[test]
    fn devices_that_die_together_do_not_probe_in_lock_step() {
        let t0 = Instant::now();
        let mut dues = Vec::new();
        for seed in 1..=10u64 {
            let mut l = online(t0, seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            l.unreachable(2);
            let mut now = t0;
            for _ in 0..5 {
                l.cycle_done(now);
                now = l.due();
            }
            dues.push(now);
        }
        dues.sort();
        dues.dedup();
        assert_eq!(dues.len(), 10, "ten devices, ten different probe times: {dues:?}");
    }

    #[test]
    fn the_first_answer_brings_an_offline_device_back_and_polls_it_at_once() {
        let t0 = Instant::now();
        let mut l = online(t0, 7);
        l.unreachable(2);
        l.cycle_done(t0);
        assert!(l.due() > t0 + Duration::from_millis(900));
        // A command's write is answered before the next probe is due.
        let now = t0 + Duration::from_millis(200);
        assert_eq!(l.answered(3, now), Change::CameOnline);
        assert!(!l.is_offline());
        assert_eq!(l.due(), now, "polled at once, so the values come back with the device");
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
}
