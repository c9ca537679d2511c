//! The publish pace of one connection: at most so many publishes and bytes
//! in any window of a second.
//!
//! AWS IoT Core throttles a connection past 100 publishes or 512 KiB per
//! second: a throttled QoS 1 publish gets no PUBACK and is sent again later,
//! so going over costs more than waiting. The pace counts what was handed to
//! the client in a sliding window (not a token bucket, which allows twice
//! the rate across a window boundary) a little longer than a second, so that
//! jitter between here and the broker cannot squeeze one window's publishes
//! into less than a second there. A tenth of each window is kept for prompt
//! messages (answers, command states, shadow requests): telemetry and
//! reports that fill their part of the window never make an answer wait for
//! the next one.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// The window the limits are kept over: a second and 5% for jitter.
pub(crate) const WINDOW: Duration = Duration::from_millis(1050);

#[derive(Debug)]
pub(crate) struct Pace {
    per_window: Option<usize>,
    bytes_per_window: Option<usize>,
    /// (when, payload bytes) of each publish in the last window, oldest first.
    sent: VecDeque<(Instant, usize)>,
    bytes: usize,
}

impl Pace {
    /// `None` when neither limit is set: nothing to pace.
    pub(crate) fn new(per_second: Option<u32>, bytes_per_second: Option<usize>) -> Option<Pace> {
        if per_second.is_none() && bytes_per_second.is_none() {
            return None;
        }
        let per_window = per_second.map(|n| usize::try_from(n).unwrap_or(usize::MAX).max(1));
        Some(Pace { per_window, bytes_per_window: bytes_per_second.map(|b| b.max(1)), sent: VecDeque::new(), bytes: 0 })
    }

    /// When a publish of `size` bytes may go: `None` now, or the instant.
    /// A `prompt` one may use the whole window, others all but a tenth.
    pub(crate) fn wait(&self, size: usize, now: Instant, prompt: bool) -> Option<Instant> {
        let start = self.sent.partition_point(|(t, _)| *t + WINDOW <= now);
        let live = self.sent.len() - start;
        let share = |max: usize| if prompt { max } else { (max - max / 10).max(1) };
        let mut until: Option<Instant> = None;
        if let Some(max) = self.per_window.map(share) {
            if live >= max {
                // The oldest publishes must leave the window until one fits.
                until = self.sent.get(start + live - max).map(|(t, _)| *t + WINDOW);
            }
        }
        if let Some(max) = self.bytes_per_window.map(share) {
            let expired: usize = self.sent.iter().take(start).map(|(_, b)| b).sum();
            let mut in_window = self.bytes - expired;
            // Alone in a window, any message may go (a limit below the
            // largest payload would otherwise block it for ever).
            if in_window > 0 && in_window + size > max {
                for (t, b) in self.sent.iter().skip(start) {
                    in_window -= b;
                    if in_window == 0 || in_window + size <= max {
                        let at = *t + WINDOW;
                        until = Some(until.map_or(at, |u| u.max(at)));
                        break;
                    }
                }
            }
        }
        until.filter(|u| *u > now)
    }

    /// A publish of `size` bytes was handed to the client.
    pub(crate) fn sent(&mut self, size: usize, now: Instant) {
        while let Some((t, b)) = self.sent.front() {
            if *t + WINDOW > now {
                break;
            }
            self.bytes -= b;
            self.sent.pop_front();
        }
        self.sent.push_back((now, size));
        self.bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_limit_is_no_pace() {
        assert!(Pace::new(None, None).is_none());
    }

    #[test]
    fn at_most_n_publishes_go_in_any_window() {
        let t0 = Instant::now();
        let mut p = Pace::new(Some(3), None).expect("a pace");
        for i in 0..3 {
            assert_eq!(p.wait(10, t0 + Duration::from_millis(i * 100), true), None);
            p.sent(10, t0 + Duration::from_millis(i * 100));
        }
        let now = t0 + Duration::from_millis(300);
        assert_eq!(p.wait(10, now, true), Some(t0 + WINDOW), "the fourth waits for the first to leave the window");
        assert_eq!(p.wait(10, t0 + WINDOW, true), None);
        p.sent(10, t0 + WINDOW);
        assert_eq!(p.wait(10, t0 + WINDOW, true), Some(t0 + Duration::from_millis(100) + WINDOW));
    }

    #[test]
    fn a_tenth_of_the_window_is_kept_for_prompt_messages() {
        let t0 = Instant::now();
        let mut p = Pace::new(Some(100), Some(10_000)).expect("a pace");
        for _ in 0..90 {
            p.sent(10, t0);
        }
        assert_eq!(p.wait(10, t0, false), Some(t0 + WINDOW), "telemetry has used its part");
        assert_eq!(p.wait(10, t0, true), None, "an answer still goes at once");
        for _ in 0..10 {
            p.sent(10, t0);
        }
        assert_eq!(p.wait(10, t0, true), Some(t0 + WINDOW), "the whole window is the limit");
    }

    #[test]
    fn bytes_in_any_window_stay_under_the_limit_but_one_large_message_alone_may_go() {
        let t0 = Instant::now();
        let mut p = Pace::new(None, Some(1000)).expect("a pace");
        p.sent(600, t0);
        p.sent(300, t0 + Duration::from_millis(10));
        assert_eq!(p.wait(100, t0 + Duration::from_millis(20), true), None, "1000 bytes fit");
        assert_eq!(p.wait(200, t0 + Duration::from_millis(20), true), Some(t0 + WINDOW), "1100 do not: wait for the 600");
        assert_eq!(p.wait(5000, t0 + WINDOW * 3, true), None, "alone in its window, a message larger than the limit still goes");
        p.sent(5000, t0 + WINDOW * 3);
        assert_eq!(p.wait(1, t0 + WINDOW * 3, true), Some(t0 + WINDOW * 4));
    }
}
