//! Subscribing within a broker's limits, and knowing when it worked.
//!
//! AWS IoT Core takes at most 8 topic filters in one SUBSCRIBE and refuses
//! the whole packet beyond that; any broker may refuse a filter (an ACL, a
//! policy, a quota) with a failure code in its SUBACK. A session only counts
//! as up, and the shadows only sync, once every filter was granted: a
//! refused one is an error that is logged and asked again with a growing
//! delay, never a session the adapters would wait on for answers that cannot
//! come. Batches go one at a time, each after the previous SUBACK, so a
//! SUBACK always answers the batch in flight (no packet-id bookkeeping) and
//! the broker is never flooded with SUBSCRIBEs at connect. No I/O here: the
//! connection actor sends what [`Step::Send`] names.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// First and longest wait before subscribing again to refused filters.
const RETRY_MIN: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(300);

/// What the actor should do next.
#[derive(Debug, PartialEq)]
pub(crate) enum Step {
    /// Send one SUBSCRIBE with these filters.
    Send(Vec<String>),
    /// Every filter is granted: the session is up.
    Up,
    /// The broker refused these filters (or they could not be sent): log it;
    /// they are asked again at [`Subscriber::retry_at`].
    Refused(Vec<String>),
    /// Nothing to do now.
    Wait,
}

#[derive(Debug)]
pub(crate) struct Subscriber {
    topics: Vec<String>,
    batch: usize,
    queue: VecDeque<Vec<String>>,
    in_flight: Option<Vec<String>>,
    refused: Vec<String>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
}

impl Subscriber {
    /// `topics` to subscribe on every connect, at most `batch` per SUBSCRIBE.
    pub(crate) fn new(topics: Vec<String>, batch: Option<usize>) -> Subscriber {
        let batch = batch.unwrap_or(usize::MAX).max(1);
        Subscriber { topics, batch, queue: VecDeque::new(), in_flight: None, refused: Vec::new(), retry_at: None, retry_delay: RETRY_MIN }
    }

    /// A new connection (CONNACK): subscribe to everything again, since a
    /// clean session forgot it all and a resumed one may have lost some.
    pub(crate) fn on_connected(&mut self) -> Step {
        self.retry_at = None;
        self.retry_delay = RETRY_MIN;
        self.start(self.topics.clone())
    }

    /// The link failed: nothing is in flight any more.
    pub(crate) fn on_link_lost(&mut self) {
        self.queue.clear();
        self.in_flight = None;
        self.refused.clear();
        self.retry_at = None;
    }

    /// The SUBACK of the batch in flight: `granted[i]` for its i-th filter.
    pub(crate) fn on_suback(&mut self, granted: &[bool], now: Instant) -> Step {
        let Some(batch) = self.in_flight.take() else { return Step::Wait };
        for (i, topic) in batch.into_iter().enumerate() {
            // A SUBACK with fewer codes than filters refused the rest.
            if !granted.get(i).copied().unwrap_or(false) {
                self.refused.push(topic);
            }
        }
        self.advance(now)
    }

    /// The batch just sent could not be queued (the client's queue is full):
    /// count it as refused for now.
    pub(crate) fn on_send_failed(&mut self, now: Instant) -> Step {
        if let Some(batch) = self.in_flight.take() {
            self.refused.extend(batch);
        }
        self.advance(now)
    }

    /// Filters to keep from now on (a device added by a reload): sent after
    /// the batch in flight while `connected`, and with the rest at every
    /// connect. Their SUBACK ends in [`Step::Up`] again, which the twins
    /// take as a new session (a shadow fetches itself).
    pub(crate) fn add(&mut self, topics: Vec<String>, connected: bool) -> Step {
        self.topics.extend(topics.iter().cloned());
        if !connected {
            return Step::Wait;
        }
        self.queue.extend(topics.chunks(self.batch).map(<[String]>::to_vec));
        if self.in_flight.is_some() {
            return Step::Wait;
        }
        match self.queue.pop_front() {
            Some(next) => {
                self.in_flight = Some(next.clone());
                Step::Send(next)
            }
            None => Step::Wait,
        }
    }

    /// Filters no longer kept (a device removed): not asked again.
    pub(crate) fn remove(&mut self, topics: &[String]) {
        self.topics.retain(|t| !topics.contains(t));
        self.refused.retain(|t| !topics.contains(t));
        for batch in &mut self.queue {
            batch.retain(|t| !topics.contains(t));
        }
        self.queue.retain(|b| !b.is_empty());
    }

    /// When refused filters are to be asked again.
    pub(crate) fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Asks again for the filters refused last time, once their time came.
    pub(crate) fn retry(&mut self, now: Instant) -> Step {
        match self.retry_at {
            Some(at) if at <= now && self.in_flight.is_none() && self.queue.is_empty() => {
                self.retry_at = None;
                let again = std::mem::take(&mut self.refused);
                self.start(again)
            }
            _ => Step::Wait,
        }
    }

    fn start(&mut self, topics: Vec<String>) -> Step {
        self.queue = topics.chunks(self.batch).map(<[String]>::to_vec).collect();
        self.in_flight = None;
        self.refused.clear();
        match self.queue.pop_front() {
            Some(first) => {
                self.in_flight = Some(first.clone());
                Step::Send(first)
            }
            None => Step::Up,
        }
    }

    fn advance(&mut self, now: Instant) -> Step {
        if let Some(next) = self.queue.pop_front() {
            self.in_flight = Some(next.clone());
            return Step::Send(next);
        }
        if self.refused.is_empty() {
            self.retry_delay = RETRY_MIN;
            return Step::Up;
        }
        self.retry_at = Some(now + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(RETRY_MAX);
        Step::Refused(self.refused.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("t/{i}")).collect()
    }

    fn sent(step: Step) -> Vec<String> {
        match step {
            Step::Send(b) => b,
            other => panic!("expected a SUBSCRIBE, got {other:?}"),
        }
    }

    #[test]
    fn filters_go_out_in_batches_within_the_limit_one_after_the_other() {
        let now = Instant::now();
        let mut s = Subscriber::new(topics(10), Some(8));
        let first = sent(s.on_connected());
        assert_eq!(first.len(), 8);
        assert_eq!(s.on_suback(&[true; 8], now), Step::Send(topics(10)[8..].to_vec()));
        assert_eq!(s.on_suback(&[true; 2], now), Step::Up);
        assert_eq!(s.on_suback(&[true], now), Step::Wait, "a stray SUBACK changes nothing");
    }

    #[test]
    fn without_a_limit_everything_goes_in_one_subscribe_and_no_topics_is_up_at_once() {
        let now = Instant::now();
        let mut s = Subscriber::new(topics(20), None);
        assert_eq!(sent(s.on_connected()).len(), 20);
        assert_eq!(s.on_suback(&[true; 20], now), Step::Up);
        assert_eq!(Subscriber::new(Vec::new(), Some(8)).on_connected(), Step::Up);
    }

    #[test]
    fn a_refused_filter_is_an_error_that_is_asked_again_with_a_growing_delay() {
        let t0 = Instant::now();
        let mut s = Subscriber::new(topics(3), Some(2));
        sent(s.on_connected());
        assert_eq!(s.on_suback(&[true, false], t0), Step::Send(vec!["t/2".to_string()]));
        assert_eq!(s.on_suback(&[], t0), Step::Refused(vec!["t/1".to_string(), "t/2".to_string()]), "missing codes are refusals");
        assert_eq!(s.retry_at(), Some(t0 + RETRY_MIN));
        assert_eq!(s.retry(t0), Step::Wait, "not yet");
        let t1 = t0 + RETRY_MIN;
        assert_eq!(s.retry(t1), Step::Send(vec!["t/1".to_string(), "t/2".to_string()]), "only the refused ones");
        assert_eq!(s.on_suback(&[false, false], t1), Step::Refused(vec!["t/1".to_string(), "t/2".to_string()]));
        assert_eq!(s.retry_at(), Some(t1 + RETRY_MIN * 2), "the delay doubles");
        assert_eq!(sent(s.retry(t1 + RETRY_MIN * 2)).len(), 2);
        assert_eq!(s.on_suback(&[true, true], t1), Step::Up);
    }

    #[test]
    fn filters_added_while_connected_go_out_after_the_batch_in_flight_and_count_as_a_new_session() {
        let now = Instant::now();
        let mut s = Subscriber::new(topics(2), Some(8));
        sent(s.on_connected());
        assert_eq!(s.add(vec!["new/a".into()], true), Step::Wait, "one SUBSCRIBE at a time");
        assert_eq!(s.on_suback(&[true, true], now), Step::Send(vec!["new/a".to_string()]));
        assert_eq!(s.on_suback(&[true], now), Step::Up);
        assert_eq!(s.add(vec!["new/b".into()], true), Step::Send(vec!["new/b".to_string()]), "nothing in flight: at once");
        assert_eq!(s.add(vec!["later".into()], false), Step::Wait, "not connected: at the next connect");
        s.remove(&["t/0".to_string(), "new/a".to_string()]);
        let again = sent(s.on_connected());
        assert_eq!(again, vec!["t/1".to_string(), "new/b".to_string(), "later".to_string()]);
    }

    #[test]
    fn a_new_connection_starts_over_with_every_filter() {
        let now = Instant::now();
        let mut s = Subscriber::new(topics(3), Some(8));
        sent(s.on_connected());
        assert!(matches!(s.on_suback(&[false, true, true], now), Step::Refused(_)));
        s.on_link_lost();
        assert_eq!(s.retry_at(), None);
        assert_eq!(sent(s.on_connected()), topics(3));
        assert!(matches!(s.on_send_failed(now), Step::Refused(r) if r.len() == 3));
    }
}
