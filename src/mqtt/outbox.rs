//! The outbox: what must reach the broker, kept until the broker has it.
//!
//! rumqttc's `publish` returning `Ok` only means queued, and a clean-session
//! reconnect drops whatever it had in flight. So every publish goes through
//! this queue first, and an entry leaves only when its PUBACK arrives.
//! Entries are handed to rumqttc in order, at most `window` at a time; rumqttc
//! reports the packet id it gives each (in the same order), which is how a
//! PUBACK finds its entry. After a reconnect without a session, everything
//! unacknowledged goes back to the front, in order, and is sent again (so a
//! message can arrive twice, never zero times). When the broker resumes the
//! session, rumqttc resends those itself, keeping their packet ids.
//!
//! Bounded: past `limit` entries the oldest is dropped and counted, so a
//! long outage costs memory in proportion to the limit, not to its length.
//! (On disk, surviving a restart, in a later issue.)

use std::collections::VecDeque;

use bytes::Bytes;

use super::session::Properties;

/// One message to deliver.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    pub(crate) retain: bool,
    pub(crate) properties: Option<Properties>,
    /// Connections it was lost on (set by the outbox).
    pub(crate) attempts: u8,
}

impl Entry {
    pub(crate) fn new(topic: String, payload: Bytes, retain: bool, properties: Option<Properties>) -> Entry {
        Entry { topic, payload, retain, properties, attempts: 0 }
    }
}

#[derive(Debug)]
struct Sent {
    entry: Entry,
    pkid: Option<u16>,
}

/// Connections a message may be in flight on, without a PUBACK, before it is
/// taken for the reason they close (a broker drops the link on a packet too
/// large or a topic its policy denies) and dropped, so that one bad message
/// cannot keep a connection and every twin on it down for good.
pub(crate) const MAX_ATTEMPTS: u8 = 3;

#[derive(Debug)]
pub(crate) struct Outbox {
    pending: VecDeque<Entry>,
    sent: VecDeque<Sent>,
    limit: usize,
    window: usize,
    /// Entries dropped because the outbox was full.
    pub(crate) dropped: u64,
}

impl Outbox {
    pub(crate) fn new(limit: usize, window: usize) -> Self {
        Outbox { pending: VecDeque::new(), sent: VecDeque::new(), limit: limit.max(1), window: window.max(1), dropped: 0 }
    }

    /// Messages not yet acknowledged.
    pub(crate) fn len(&self) -> usize {
        self.pending.len() + self.sent.len()
    }

    /// Adds a message; returns false when the oldest waiting one was dropped for it.
    pub(crate) fn push(&mut self, entry: Entry) -> bool {
        let mut kept_all = true;
        if self.len() >= self.limit {
            if self.pending.pop_front().is_some() {
                self.dropped += 1;
                kept_all = false;
            } else {
                // Everything is in flight: the new one is the one that cannot be kept.
                self.dropped += 1;
                return false;
            }
        }
        self.pending.push_back(entry);
        kept_all
    }

    /// Puts a message ahead of everything waiting (the `online` presence).
    pub(crate) fn push_front(&mut self, entry: Entry) {
        self.pending.push_front(entry);
    }

    /// The next message to hand to rumqttc, if the window allows.
    pub(crate) fn next_to_send(&self) -> Option<&Entry> {
        (self.sent.len() < self.window).then(|| self.pending.front()).flatten()
    }

    /// The message from `next_to_send` was accepted by rumqttc.
    pub(crate) fn mark_sent(&mut self) {
        if let Some(entry) = self.pending.pop_front() {
            self.sent.push_back(Sent { entry, pkid: None });
        }
    }

    /// rumqttc wrote a publish with this packet id: the oldest one without an id.
    pub(crate) fn on_sent(&mut self, pkid: u16) {
        if self.sent.iter().any(|s| s.pkid == Some(pkid)) {
            return; // a resend within a resumed session
        }
        if let Some(s) = self.sent.iter_mut().find(|s| s.pkid.is_none()) {
            s.pkid = Some(pkid);
        }
    }

    /// The broker acknowledged this packet id; returns the topic it was for.
    pub(crate) fn on_puback(&mut self, pkid: u16) -> Option<String> {
        let i = self.sent.iter().position(|s| s.pkid == Some(pkid))?;
        self.sent.remove(i).map(|s| s.entry.topic)
    }

    /// A new connection is up. Without a resumed session, rumqttc dropped what
    /// it had: everything unacknowledged goes back to the front, in order,
    /// except a message lost on `MAX_ATTEMPTS` connections, which is returned.
    pub(crate) fn on_connected(&mut self, session_present: bool) -> Vec<Entry> {
        let mut dropped = Vec::new();
        if session_present {
            return dropped;
        }
        while let Some(mut s) = self.sent.pop_back() {
            s.entry.attempts = s.entry.attempts.saturating_add(1);
            if s.entry.attempts >= MAX_ATTEMPTS {
                dropped.push(s.entry);
            } else {
                self.pending.push_front(s.entry);
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u32) -> Entry {
        Entry { topic: "t".into(), payload: Bytes::from(n.to_string()), retain: false, properties: None, attempts: 0 }
    }

    fn send_all(o: &mut Outbox) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(e) = o.next_to_send() {
            out.push(e.payload.clone());
            o.mark_sent();
        }
        out
    }

    #[test]
    fn an_entry_leaves_only_on_its_puback() {
        let mut o = Outbox::new(10, 10);
        o.push(entry(1));
        o.push(entry(2));
        send_all(&mut o);
        o.on_sent(7);
        o.on_sent(8);
        o.on_puback(8);
        assert_eq!(o.len(), 1);
        o.on_puback(7);
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn a_reconnect_without_session_resends_everything_unacknowledged_in_order() {
        let mut o = Outbox::new(10, 10);
        for n in 1..=3 {
            o.push(entry(n));
        }
        send_all(&mut o);
        o.on_sent(1);
        o.on_sent(2);
        o.on_puback(1);
        o.push(entry(4));
        o.on_connected(false);
        assert_eq!(send_all(&mut o), vec!["2", "3", "4"]);
    }

    #[test]
    fn a_resumed_session_leaves_resending_to_the_client() {
        let mut o = Outbox::new(10, 10);
        o.push(entry(1));
        send_all(&mut o);
        o.on_sent(1);
        o.on_connected(true);
        assert!(o.next_to_send().is_none());
        o.on_sent(1); // rumqttc resends with the same id
        o.on_puback(1);
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn the_window_limits_what_is_in_flight() {
        let mut o = Outbox::new(10, 2);
        for n in 1..=3 {
            o.push(entry(n));
        }
        assert_eq!(send_all(&mut o).len(), 2);
        o.on_sent(1);
        o.on_puback(1);
        assert_eq!(send_all(&mut o), vec!["3"]);
    }

    #[test]
    fn a_message_lost_on_every_connection_is_dropped_after_max_attempts() {
        let mut o = Outbox::new(10, 10);
        o.push(entry(1));
        for attempt in 1..=MAX_ATTEMPTS {
            assert_eq!(send_all(&mut o), vec!["1"], "attempt {attempt}");
            o.on_sent(1);
            let dropped = o.on_connected(false);
            assert_eq!(dropped.len(), usize::from(attempt == MAX_ATTEMPTS));
        }
        assert_eq!(o.len(), 0);
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_waiting_and_counts_it() {
        let mut o = Outbox::new(2, 10);
        assert!(o.push(entry(1)));
        assert!(o.push(entry(2)));
        assert!(!o.push(entry(3)));
        assert_eq!(o.dropped, 1);
        assert_eq!(send_all(&mut o), vec!["2", "3"]);
    }
}
