//! The outbox: what must reach the broker, kept until the broker has it.
//!
//! rumqttc's `publish` returning `Ok` only means queued, a clean-session
//! reconnect drops whatever it had in flight, and a crash loses its memory.
//! So every publish goes through this queue first: it is written to the store
//! before it is handed to rumqttc (the connection actor does the I/O; this
//! file only decides), and it leaves only when its PUBACK arrives. Entries are
//! handed to rumqttc in order, at most `window` at a time; rumqttc reports the
//! packet id it gives each (in the same order), which is how a PUBACK finds
//! its entry. After a reconnect without a session, everything unacknowledged
//! goes back to the front, in order, and is sent again (so a message can
//! arrive twice, never zero times). A lost link never drops an entry.
//!
//! Bounded, with a stated policy: by count, by bytes and by age. When a bound
//! is reached, waiting entries are dropped oldest first from the least
//! important class: telemetry, then shadow reports, then answers and command
//! states (see [`Class`]); entries in flight are never dropped. Only the
//! first entries keep their payload in memory; the others are read back from
//! the store when their turn comes, so a long outage costs disk, not memory.
//!
//! Paced, when the broker limits a connection's publishes (AWS IoT Core: 100
//! per second, 512 KiB per second): [`Outbox::next`] then says when the next
//! one may go ([`Next::Paced`]), answers, command states and shadow requests
//! go before waiting telemetry and reports (order is kept within each of the
//! two), and while the pace holds messages back a new telemetry document or
//! shadow report joins the one still waiting on its topic ([`Coalesce`])
//! instead of lengthening the queue. Only what was queued on this connection
//! is joined: a backlog from an outage is history, and goes out whole.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use tokio::time::Instant;

use super::session::Properties;

mod coalesce;
mod pace;

pub use coalesce::Coalesce;
pub(crate) use pace::Pace;

/// What a message is, which decides what is dropped first when the outbox is
/// full, and whether it is worth keeping across a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Only meaningful on this connection (presence, a shadow `get`): never
    /// written to the store, dropped first.
    Volatile,
    /// Telemetry documents.
    Telemetry,
    /// Shadow reported state.
    Report,
    /// Command answers and command states: dropped last.
    Answer,
}

impl Class {
    const ALL: [Class; 4] = [Class::Volatile, Class::Telemetry, Class::Report, Class::Answer];

    fn index(self) -> usize {
        self as usize
    }

    /// For logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Class::Volatile => "volatile",
            Class::Telemetry => "telemetry",
            Class::Report => "report",
            Class::Answer => "answer",
        }
    }

    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<Class> {
        Class::ALL.get(usize::from(code)).copied()
    }
}

/// One message to deliver.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    /// Send order; also the entry's key in the store.
    pub(crate) seq: u64,
    pub(crate) class: Class,
    pub(crate) topic: String,
    /// `None` while it is only on disk.
    pub(crate) payload: Option<Bytes>,
    /// Payload bytes (known even when the payload is on disk).
    pub(crate) size: usize,
    pub(crate) retain: bool,
    pub(crate) properties: Option<Properties>,
    /// Epoch ms when it was queued, for `max_age`.
    pub(crate) created_ms: u64,
    /// Whether a newer message on its topic may join it while it waits (not
    /// kept in the store: after a restart it is history).
    pub(crate) coalesce: Option<Coalesce>,
}

impl Entry {
    pub(crate) fn new(class: Class, topic: String, payload: Bytes, retain: bool, properties: Option<Properties>, created_ms: u64) -> Entry {
        Entry { seq: 0, class, size: payload.len(), topic, payload: Some(payload), retain, properties, created_ms, coalesce: None }
    }

    /// Answers, command states and shadow requests: what a cloud waits for.
    fn is_prompt(&self) -> bool {
        matches!(self.class, Class::Answer | Class::Volatile)
    }
}

/// The bounds of an outbox.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Limits {
    pub(crate) max_messages: usize,
    pub(crate) max_bytes: usize,
    pub(crate) max_age_ms: u64,
    /// Largest payload the broker takes; a bigger one would close the
    /// connection at every attempt, so it is refused here.
    pub(crate) max_payload: usize,
}

/// Why an entry left without being delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DropReason {
    /// The outbox reached `max_messages` or `max_bytes`.
    Full,
    /// Older than `max_age`.
    Expired,
    /// Larger than the broker takes.
    TooLarge,
    /// The broker acknowledged it with an MQTT 5 error reason code.
    Refused,
}

impl DropReason {
    pub(crate) fn name(self) -> &'static str {
        match self {
            DropReason::Full => "full",
            DropReason::Expired => "expired",
            DropReason::TooLarge => "too_large",
            DropReason::Refused => "refused",
        }
    }
}

/// An entry dropped undelivered: the caller removes it from the store, logs
/// and counts it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Dropped {
    pub(crate) seq: u64,
    pub(crate) class: Class,
    pub(crate) topic: String,
    pub(crate) size: usize,
    pub(crate) reason: DropReason,
    /// Whether it was written to the store (and must be removed there).
    pub(crate) stored: bool,
}

/// What [`Outbox::push`] did with a message.
#[derive(Debug, PartialEq)]
pub(crate) struct Pushed {
    /// Its sequence number: its key in the store.
    pub(crate) seq: u64,
    /// Whether to write it to the store (then report with [`Outbox::persisted`]).
    pub(crate) store: bool,
    /// What had to leave to make room (possibly the message itself, when it
    /// can never be sent or is the least important one).
    pub(crate) dropped: Vec<Dropped>,
    /// It joined the message waiting on its topic (`seq` is that one's).
    pub(crate) coalesced: bool,
}

/// What the connection actor should do next to move the queue.
#[derive(Debug, PartialEq)]
pub(crate) enum Next<'a> {
    /// Hand this entry to rumqttc, then call [`Outbox::mark_sent`].
    Send(&'a Entry),
    /// Read these entries' payloads from the store, then [`Outbox::loaded`].
    Load(Vec<u64>),
    /// Nothing can go now (empty, window full, or the next one is not on disk yet).
    Wait,
    /// The next one may go at this instant (the broker's publish limit).
    Paced(Instant),
}

#[derive(Debug)]
struct Waiting {
    entry: Entry,
    /// Written to the store (or volatile, or the store failed): may be sent.
    ready: bool,
    /// Written to the store: its payload may leave memory.
    stored: bool,
}

#[derive(Debug)]
struct Sent {
    entry: Entry,
    stored: bool,
    pkid: Option<u16>,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    /// Presence and the like: sent before anything else, never stored.
    urgent: VecDeque<Entry>,
    waiting: BTreeMap<u64, Waiting>,
    sent: VecDeque<Sent>,
    next_seq: u64,
    limits: Limits,
    window: usize,
    /// Waiting entries at the front that keep their payload in memory.
    resident: usize,
    per_class: [usize; 4],
    bytes: usize,
    /// The broker's publish limit, if it has one.
    pace: Option<Pace>,
    /// Waiting answers and shadow requests, which go first when paced.
    prompt: BTreeSet<u64>,
    /// The pace is holding messages back (set by [`Outbox::next`], cleared
    /// once nothing waits or the link is lost): new ones may join waiting ones.
    congested: bool,
    /// The first sequence number queued on the current connection: older
    /// entries are history and are never joined.
    joinable_from: u64,
    /// Per topic, the newest waiting entry a newer message may join.
    last_on_topic: HashMap<String, u64>,
}

/// Which entry [`Outbox::next`] offers; [`Outbox::mark_sent`] finds it again.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Pick {
    Urgent,
    Waiting(u64),
}

impl Outbox {
    pub(crate) fn new(limits: Limits, window: usize, resident: usize) -> Self {
        Outbox {
            urgent: VecDeque::new(),
            waiting: BTreeMap::new(),
            sent: VecDeque::new(),
            next_seq: 1,
            limits,
            window: window.max(1),
            resident: resident.max(window),
            per_class: [0; 4],
            bytes: 0,
            pace: None,
            prompt: BTreeSet::new(),
            congested: false,
            joinable_from: u64::MAX,
            last_on_topic: HashMap::new(),
        }
    }

    /// Paces what is handed to the client (the broker's publish limit).
    pub(crate) fn with_pace(mut self, pace: Option<Pace>) -> Self {
        self.pace = pace;
        self
    }

    /// Takes back what the store kept from before a restart (already stored,
    /// in sequence order; payloads may be absent).
    pub(crate) fn restore(&mut self, entries: impl IntoIterator<Item = Entry>) {
        for entry in entries {
            self.next_seq = self.next_seq.max(entry.seq + 1);
            self.account(&entry, true);
            if entry.is_prompt() {
                self.prompt.insert(entry.seq);
            }
            self.waiting.insert(entry.seq, Waiting { entry, ready: true, stored: true });
        }
        self.evict();
    }

    /// Messages not yet acknowledged.
    pub(crate) fn len(&self) -> usize {
        self.urgent.len() + self.waiting.len() + self.sent.len()
    }

    /// Payload bytes not yet acknowledged.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Queues a message; see [`Pushed`].
    pub(crate) fn push(&mut self, mut entry: Entry) -> Pushed {
        if entry.size > self.limits.max_payload {
            entry.seq = self.next_seq;
            self.next_seq += 1;
            let dropped = dropped(&entry, DropReason::TooLarge, false);
            return Pushed { seq: entry.seq, store: false, dropped: vec![dropped], coalesced: false };
        }
        if let Some(seq) = self.join(&entry) {
            return Pushed { seq, store: true, dropped: self.enforce_bounds(), coalesced: true };
        }
        entry.seq = self.next_seq;
        self.next_seq += 1;
        let seq = entry.seq;
        let volatile = entry.class == Class::Volatile;
        self.account(&entry, true);
        if entry.is_prompt() {
            self.prompt.insert(seq);
        }
        if entry.coalesce.is_some() {
            self.last_on_topic.insert(entry.topic.clone(), seq);
        }
        self.waiting.insert(seq, Waiting { entry, ready: volatile, stored: false });
        let dropped = self.enforce_bounds();
        let store = !volatile && self.waiting.contains_key(&seq);
        Pushed { seq, store, dropped, coalesced: false }
    }

    /// While the pace holds messages back, a joinable message joins the one
    /// waiting on its topic, if that one was queued on this connection, is
    /// still in memory and is of its kind. Returns that one's sequence
    /// number; its new content must be stored again.
    fn join(&mut self, entry: &Entry) -> Option<u64> {
        let how = entry.coalesce?;
        if !self.congested {
            return None;
        }
        let seq = *self.last_on_topic.get(&entry.topic)?;
        let w = self.waiting.get_mut(&seq).filter(|w| seq >= self.joinable_from && w.entry.class == entry.class && w.entry.coalesce.is_some())?;
        let joined = coalesce::join(w.entry.payload.as_deref()?, entry.payload.as_deref()?, how)?;
        self.bytes = self.bytes - w.entry.size + joined.len();
        w.entry.size = joined.len();
        w.entry.payload = Some(joined);
        // Not sendable until the joined content is on disk too.
        w.ready = false;
        w.stored = false;
        Some(seq)
    }

    /// Puts a volatile message ahead of everything waiting (the `online` presence).
    pub(crate) fn push_front(&mut self, entry: Entry) {
        self.bytes += entry.size;
        self.urgent.push_back(entry);
    }

    /// The store has (`ok`) or could not take (`!ok`) entry `seq`. Either way
    /// it may now be sent; only a stored one may leave memory.
    pub(crate) fn persisted(&mut self, seq: u64, ok: bool) {
        if let Some(w) = self.waiting.get_mut(&seq) {
            w.ready = true;
            w.stored = ok;
        } else if let Some(s) = self.sent.iter_mut().find(|s| s.entry.seq == seq) {
            s.stored = ok;
        }
        self.evict();
    }

    /// What to do next; see [`Next`]. `now` is for the pace.
    pub(crate) fn next(&mut self, now: Instant) -> Next<'_> {
        if self.waiting.is_empty() {
            self.congested = false;
        }
        let Some(pick) = self.pick() else { return Next::Wait };
        let entry = match pick {
            Pick::Urgent => self.urgent.front(),
            Pick::Waiting(seq) => self.waiting.get(&seq).map(|w| &w.entry),
        };
        let Some(entry) = entry else { return Next::Wait };
        if let Some(at) = self.pace.as_ref().and_then(|p| p.wait(entry.size, now, entry.is_prompt())) {
            self.congested = true;
            return Next::Paced(at);
        }
        if entry.payload.is_some() {
            return Next::Send(entry);
        }
        if self.prompt.contains(&entry.seq) && self.pace.is_some() {
            return Next::Load(vec![entry.seq]);
        }
        let missing = self.waiting.values().take(self.resident).filter(|w| w.entry.payload.is_none()).map(|w| w.entry.seq).take(self.window);
        Next::Load(missing.collect())
    }

    /// The entry to offer next, if one may go (in order; when paced, prompt
    /// ones first).
    fn pick(&self) -> Option<Pick> {
        if !self.urgent.is_empty() {
            return Some(Pick::Urgent);
        }
        if self.sent.len() >= self.window {
            return None;
        }
        if self.pace.is_some() {
            if let Some(&seq) = self.prompt.first() {
                if self.waiting.get(&seq).is_some_and(|w| w.ready) {
                    return Some(Pick::Waiting(seq));
                }
            }
        }
        let front = self.waiting.values().next()?;
        front.ready.then_some(Pick::Waiting(front.entry.seq))
    }

    /// Payloads read back from the store. An entry the store no longer has
    /// cannot be sent: it is dropped and returned.
    pub(crate) fn loaded(&mut self, asked: &[u64], found: Vec<(u64, Bytes)>) -> Vec<Dropped> {
        let mut found: BTreeMap<u64, Bytes> = found.into_iter().collect();
        let mut lost = Vec::new();
        for seq in asked {
            match (found.remove(seq), self.waiting.get_mut(seq)) {
                (Some(payload), Some(w)) => w.entry.payload = Some(payload),
                (None, Some(_)) => {
                    if let Some(w) = self.take_waiting(*seq) {
                        self.account(&w.entry, false);
                        lost.push(dropped(&w.entry, DropReason::Expired, false));
                    }
                }
                _ => {}
            }
        }
        lost
    }

    /// The entry from [`Outbox::next`] was accepted by rumqttc at `now`.
    pub(crate) fn mark_sent(&mut self, now: Instant) {
        let entry = match self.pick() {
            Some(Pick::Urgent) => match self.urgent.pop_front() {
                Some(entry) => {
                    self.sent.push_back(Sent { entry, stored: false, pkid: None });
                    self.sent.back().map(|s| &s.entry)
                }
                None => None,
            },
            Some(Pick::Waiting(seq)) => match self.take_waiting(seq) {
                Some(w) => {
                    self.per_class[w.entry.class.index()] -= 1;
                    self.sent.push_back(Sent { entry: w.entry, stored: w.stored, pkid: None });
                    self.sent.back().map(|s| &s.entry)
                }
                None => None,
            },
            None => None,
        };
        let size = entry.map(|e| e.size);
        if let (Some(pace), Some(size)) = (self.pace.as_mut(), size) {
            pace.sent(size, now);
        }
    }

    /// Removes a waiting entry and what points at it.
    fn take_waiting(&mut self, seq: u64) -> Option<Waiting> {
        let w = self.waiting.remove(&seq)?;
        self.prompt.remove(&seq);
        if self.last_on_topic.get(&w.entry.topic) == Some(&seq) {
            self.last_on_topic.remove(&w.entry.topic);
        }
        Some(w)
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

    /// The broker acknowledged this packet id. Returns the entry and whether
    /// it was stored (then the caller removes it from the store).
    pub(crate) fn on_puback(&mut self, pkid: u16) -> Option<(Entry, bool)> {
        let i = self.sent.iter().position(|s| s.pkid == Some(pkid))?;
        let s = self.sent.remove(i)?;
        self.bytes -= s.entry.size;
        Some((s.entry, s.stored))
    }

    /// A new connection is up. Without a resumed session, rumqttc dropped what
    /// it had: everything unacknowledged goes back to the front, in order.
    /// Volatile entries of the old connection (an old presence, a `get`) are
    /// dropped and returned.
    pub(crate) fn on_connected(&mut self, session_present: bool) -> Vec<Dropped> {
        self.joinable_from = self.next_seq;
        let mut stale = Vec::new();
        while let Some(entry) = self.urgent.pop_front() {
            self.bytes -= entry.size;
            stale.push(dropped(&entry, DropReason::Expired, false));
        }
        if session_present {
            return stale;
        }
        while let Some(s) = self.sent.pop_back() {
            if s.entry.class == Class::Volatile {
                self.bytes -= s.entry.size;
                stale.push(dropped(&s.entry, DropReason::Expired, false));
                continue;
            }
            self.per_class[s.entry.class.index()] += 1;
            if s.entry.is_prompt() {
                self.prompt.insert(s.entry.seq);
            }
            self.waiting.insert(s.entry.seq, Waiting { entry: s.entry, ready: true, stored: s.stored });
        }
        stale
    }

    /// The link is lost: what is queued from now on is history (never
    /// joined), and nothing is held back by the pace any more.
    pub(crate) fn on_link_lost(&mut self) {
        self.congested = false;
        self.joinable_from = u64::MAX;
    }

    /// Drops waiting entries older than `max_age`.
    pub(crate) fn expire(&mut self, now_ms: u64) -> Vec<Dropped> {
        let cutoff = now_ms.saturating_sub(self.limits.max_age_ms);
        let old: Vec<u64> = self.waiting.values().filter(|w| w.ready && w.entry.created_ms < cutoff).map(|w| w.entry.seq).collect();
        old.into_iter().filter_map(|seq| self.drop_waiting(seq, DropReason::Expired)).collect()
    }

    fn enforce_bounds(&mut self) -> Vec<Dropped> {
        let mut out = Vec::new();
        while self.len() > self.limits.max_messages || self.bytes > self.limits.max_bytes {
            let Some(class) = Class::ALL.into_iter().find(|c| self.per_class[c.index()] > 0) else { break };
            let Some(seq) = self.waiting.values().find(|w| w.entry.class == class).map(|w| w.entry.seq) else { break };
            out.extend(self.drop_waiting(seq, DropReason::Full));
        }
        out
    }

    fn drop_waiting(&mut self, seq: u64, reason: DropReason) -> Option<Dropped> {
        let w = self.take_waiting(seq)?;
        self.account(&w.entry, false);
        // An entry not yet stored may still be on its way there: remove it anyway.
        Some(dropped(&w.entry, reason, w.entry.class != Class::Volatile))
    }

    fn account(&mut self, entry: &Entry, add: bool) {
        let i = entry.class.index();
        if add {
            self.per_class[i] += 1;
            self.bytes += entry.size;
        } else {
            self.per_class[i] -= 1;
            self.bytes -= entry.size;
        }
    }

    /// Lets stored payloads beyond the resident front leave memory.
    fn evict(&mut self) {
        for w in self.waiting.values_mut().skip(self.resident) {
            if w.stored {
                w.entry.payload = None;
            }
        }
    }
}

fn dropped(entry: &Entry, reason: DropReason, stored: bool) -> Dropped {
    Dropped { seq: entry.seq, class: entry.class, topic: entry.topic.clone(), size: entry.size, reason, stored }
}

/// The store's form of an entry: version, class, retain, created, topic,
/// properties, then the payload. Little-endian, lengths as u32.
pub(crate) fn encode(entry: &Entry, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + entry.topic.len() + 32);
    out.push(1);
    out.push(entry.class.code());
    out.push(u8::from(entry.retain));
    out.extend_from_slice(&entry.created_ms.to_le_bytes());
    put_bytes(&mut out, entry.topic.as_bytes());
    match &entry.properties {
        None => out.push(0),
        Some(p) => {
            out.push(1);
            match &p.correlation_data {
                None => out.push(0),
                Some(c) => {
                    out.push(1);
                    put_bytes(&mut out, c);
                }
            }
            out.extend_from_slice(&(p.user_properties.len() as u32).to_le_bytes());
            for (k, v) in &p.user_properties {
                put_bytes(&mut out, k.as_bytes());
                put_bytes(&mut out, v.as_bytes());
            }
        }
    }
    out.extend_from_slice(payload);
    out
}

/// Reads an entry back; `None` for a record this build cannot read (it is
/// then dropped, logged by the caller). `with_payload: false` leaves the
/// payload on disk.
pub(crate) fn decode(seq: u64, record: &[u8], with_payload: bool) -> Option<Entry> {
    let mut r = Reader(record);
    if r.u8()? != 1 {
        return None;
    }
    let class = Class::from_code(r.u8()?)?;
    let retain = r.u8()? != 0;
    let created_ms = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let topic = String::from_utf8(r.bytes()?.to_vec()).ok()?;
    let properties = match r.u8()? {
        0 => None,
        _ => {
            let correlation_data = match r.u8()? {
                0 => None,
                _ => Some(Bytes::copy_from_slice(r.bytes()?)),
            };
            let n = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
            let mut user_properties = Vec::new();
            for _ in 0..n {
                let k = String::from_utf8(r.bytes()?.to_vec()).ok()?;
                let v = String::from_utf8(r.bytes()?.to_vec()).ok()?;
                user_properties.push((k, v));
            }
            Some(Properties { response_topic: None, correlation_data, user_properties })
        }
    };
    let size = r.0.len();
    let payload = with_payload.then(|| Bytes::copy_from_slice(r.0));
    Some(Entry { seq, class, topic, payload, size, retain, properties, created_ms, coalesce: None })
}

/// The payload of an encoded entry.
pub(crate) fn decode_payload(record: &[u8]) -> Option<Bytes> {
    decode(0, record, true).and_then(|e| e.payload)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        self.take(usize::try_from(n).ok()?)
    }
}

#[cfg(test)]
mod tests;
