//! The shadow service's clock, as far as the gateway can tell.
//!
//! A command's ttl is counted from when it was written to `desired` (its
//! metadata timestamp, on the service's clock) to when it is about to run.
//! The gateway's own wall clock cannot be trusted for "now" (a box without a
//! real-time clock boots in 1970), and the document's own `timestamp` is no
//! better: a delta that was late, queued behind a long command or
//! redelivered by a persistent session carries the time it was made. So
//! "now" is the newest service timestamp seen plus the monotonic time since
//! it arrived. Every timestamp is a lower bound of the service's time when
//! it arrives, so the estimate keeps the highest; it is trusted only once an
//! answer to one of the gateway's own requests came (made after the request
//! left, so close to the truth), never on a delta alone.

use tokio::time::Instant;

#[derive(Debug, Default)]
pub(super) struct ServiceClock {
    /// (service epoch ms, when it was seen): the best lower bound.
    best: Option<(u64, Instant)>,
    trusted: bool,
}

impl ServiceClock {
    /// A message stamped `secs` (epoch seconds) arrived at `at`; `answer`
    /// when it answers a request of ours.
    pub(super) fn observe(&mut self, secs: u64, at: Instant, answer: bool) {
        let ms = secs.saturating_mul(1000);
        let better = match self.best {
            Some((best, seen)) => ms > best.saturating_add(elapsed_ms(seen, at)),
            None => true,
        };
        if better {
            self.best = Some((ms, at));
        }
        self.trusted |= answer;
    }

    /// The service's time now (epoch ms), once an answer of the service set it.
    pub(super) fn now_ms(&self, now: Instant) -> Option<u64> {
        let (ms, seen) = self.best.filter(|_| self.trusted)?;
        Some(ms.saturating_add(elapsed_ms(seen, now)))
    }
}

fn elapsed_ms(from: Instant, to: Instant) -> u64 {
    u64::try_from(to.saturating_duration_since(from).as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_clock_is_unknown_until_an_answer_of_the_service_arrives() {
        let t0 = Instant::now();
        let mut c = ServiceClock::default();
        assert_eq!(c.now_ms(t0), None);
        c.observe(1000, t0, false);
        assert_eq!(c.now_ms(t0), None, "a delta alone may be old");
        c.observe(1000, t0, true);
        assert_eq!(c.now_ms(t0 + Duration::from_millis(2500)), Some(1_002_500), "then it moves with the monotonic clock");
    }

    #[test]
    fn an_old_timestamp_never_moves_the_clock_back() {
        let t0 = Instant::now();
        let mut c = ServiceClock::default();
        c.observe(2000, t0, true);
        c.observe(1400, t0 + Duration::from_secs(1), false);
        assert_eq!(c.now_ms(t0 + Duration::from_secs(10)), Some(2_010_000));
        c.observe(2100, t0 + Duration::from_secs(10), false);
        assert_eq!(c.now_ms(t0 + Duration::from_secs(10)), Some(2_100_000), "a newer one moves it forward");
    }
}
