//! The console's picture of the site, without I/O: what the page shows, and
//! the little it remembers that the rest of the gateway does not.
//!
//! The gateway itself keeps only the present (a device's last snapshot, a
//! connection's state). The console adds, in memory and bounded:
//! - each numeric point's recent history, for its chart: the last
//!   [`HISTORY`], at most one sample per [`SAMPLE_EVERY`] of the clock (the
//!   newest reading in it), so at most
//!   [`SAMPLES`] samples of 16 bytes per point, however fast the device is
//!   polled (about 4.7 KiB per point, 470 KiB for 100 points);
//! - when each point's value last changed;
//! - the times of each device's last [`PERIODS`] polls, for the poll period
//!   it achieves (versus the one configured);
//! - the bus counters at the last look, for transactions per second.
//!
//! Time comes in as arguments (wall clock for what the page shows, a
//! monotonic instant for rates), and the bus and outbox figures come in as
//! the Prometheus text of `/metrics`, so every rule here is tested without a
//! clock or a gateway.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value as Json};

use super::prom;
use crate::device::{Health, Snapshot};
use crate::journal::Entry;
use crate::point::{Encoded, Point, Table, Value};
use crate::twin::epoch_ms;
use crate::twin::json::to_json;

/// How far back a point's chart goes.
pub const HISTORY: Duration = Duration::from_secs(300);
/// A point's history keeps one sample (the newest) per this much of the clock.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// Samples kept per point: [`HISTORY`] / [`SAMPLE_EVERY`].
pub const SAMPLES: usize = 300;
/// Polls whose intervals are averaged into the achieved poll period.
pub const PERIODS: usize = 10;
/// Bus rates are worked out over windows of at least this...
const RATE_MIN: Duration = Duration::from_secs(1);
/// ...and at most this: an older sample says nothing about "now".
const RATE_MAX: Duration = Duration::from_secs(10);

/// What the console shows of a device that never changes.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Its name under `devices:`.
    pub name: String,
    /// The name of its bus.
    pub bus: String,
    /// Its unit id.
    pub unit: u8,
    /// The poll period configured.
    pub poll: Duration,
    /// Its points, in the device actor's order.
    pub points: Arc<Vec<Point>>,
}

/// What the console shows of a connection that never changes.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// Its name under `connections:`.
    pub name: String,
    /// Where it connects, for a person (no credentials).
    pub broker: String,
}

/// The whole picture; see the module docs.
#[derive(Debug)]
pub struct Model {
    connections: Vec<Conn>,
    buses: Vec<Bus>,
    /// By name: the overview lists them in this order.
    devices: BTreeMap<String, Dev>,
    /// When the metrics were last read.
    metrics_at: Option<Instant>,
}

#[derive(Debug)]
struct Conn {
    info: ConnectionInfo,
    connected: bool,
    last_error: Option<(String, SystemTime)>,
    outbox: Option<f64>,
}

#[derive(Debug)]
struct Bus {
    name: String,
    counts: prom::Transactions,
    per_second: Option<f64>,
    /// The total at the last look, for the next rate.
    last: Option<(Instant, f64)>,
}

#[derive(Debug)]
struct Dev {
    info: DeviceInfo,
    snapshot: Arc<Snapshot>,
    points: Vec<Track>,
    /// The times of the last polls, oldest first.
    polls: VecDeque<SystemTime>,
}

/// What is remembered of one point.
#[derive(Debug, Default)]
struct Track {
    /// The last value read, kept while the device is offline.
    known: Option<Value>,
    /// When `known` last changed (not set by the first reading).
    changed: Option<SystemTime>,
    /// (epoch ms, value), oldest first; numeric values only.
    history: VecDeque<(u64, f64)>,
}

impl Model {
    /// A model of these connections, buses and devices, nothing seen yet.
    pub fn new(connections: Vec<ConnectionInfo>, buses: Vec<String>, devices: Vec<DeviceInfo>) -> Model {
        let mut m = Model {
            connections: connections.into_iter().map(|info| Conn { info, connected: false, last_error: None, outbox: None }).collect(),
            buses: Vec::new(),
            devices: BTreeMap::new(),
            metrics_at: None,
        };
        m.sync(buses, devices);
        m
    }

    /// Follows a reload: these are the buses and devices from now on. A
    /// device that stays keeps what was seen of it; one that was restarted
    /// (its actor, hence its points, are new) or changed starts afresh, like
    /// one that was added; one that left is forgotten. Returns the names of
    /// the devices that stayed as they were.
    pub fn sync(&mut self, buses: Vec<String>, devices: Vec<DeviceInfo>) -> Vec<String> {
        let mut old_buses = std::mem::take(&mut self.buses);
        self.buses = buses
            .into_iter()
            .map(|name| match old_buses.iter().position(|b| b.name == name) {
                Some(i) => old_buses.swap_remove(i),
                None => Bus { name, counts: prom::Transactions::default(), per_second: None, last: None },
            })
            .collect();
        let mut old = std::mem::take(&mut self.devices);
        let mut kept = Vec::new();
        for info in devices {
            let dev = match old.remove(&info.name) {
                Some(d) if d.info.same_as(&info) => {
                    kept.push(info.name);
                    d
                }
                _ => Dev::new(info),
            };
            self.devices.insert(dev.info.name.clone(), dev);
        }
        kept
    }

    /// Whether a device of this name is shown.
    pub fn has_device(&self, name: &str) -> bool {
        self.devices.contains_key(name)
    }

    /// Takes in a device's snapshot (published after every poll).
    pub fn on_snapshot(&mut self, device: &str, snap: Arc<Snapshot>) {
        let Some(d) = self.devices.get_mut(device) else { return };
        if Arc::ptr_eq(&d.snapshot, &snap) || snap.health == Health::Unknown {
            return;
        }
        if d.polls.back() != Some(&snap.at) {
            d.polls.push_back(snap.at);
            if d.polls.len() > PERIODS + 1 {
                d.polls.pop_front();
            }
        }
        let at_ms = epoch_ms(snap.at);
        for ((track, point), value) in d.points.iter_mut().zip(d.info.points.iter()).zip(&snap.values) {
            let Some(v) = value else { continue };
            if track.known.as_ref() != Some(v) {
                if track.known.is_some() {
                    track.changed = Some(snap.at);
                }
                track.known = Some(v.clone());
            }
            if let Some(x) = number(point, v) {
                // One sample per whole SAMPLE_EVERY of the clock: the
                // newest reading of it, so the chart ends on the value shown.
                let every = SAMPLE_EVERY.as_millis() as u64;
                let oldest = at_ms.saturating_sub(HISTORY.as_millis() as u64);
                let h = &mut track.history;
                while h.front().is_some_and(|(t, _)| *t < oldest) {
                    h.pop_front();
                }
                match h.back_mut() {
                    Some(last) if last.0 / every == at_ms / every => *last = (at_ms, x),
                    _ => {
                        if h.len() >= SAMPLES {
                            h.pop_front();
                        }
                        // Grown by hand: doubling would round SAMPLES up to
                        // the next power of two, 70% more memory per point.
                        if h.len() == h.capacity() {
                            let want = (h.len() * 2).clamp(8, SAMPLES);
                            h.reserve_exact(want - h.len());
                        }
                        h.push_back((at_ms, x));
                    }
                }
            }
        }
        d.snapshot = snap;
    }

    /// Takes in a connection's state.
    pub fn on_connection(&mut self, connection: usize, connected: bool, last_error: Option<(String, SystemTime)>) {
        if let Some(c) = self.connections.get_mut(connection) {
            c.connected = connected;
            c.last_error = last_error;
        }
    }

    /// Whether the bus and outbox figures are old enough to read again.
    pub fn wants_metrics(&self, now: Instant) -> bool {
        self.metrics_at.is_none_or(|at| now.duration_since(at) >= RATE_MIN)
    }

    /// Takes in the text of `/metrics`: each bus's transactions (and their
    /// rate since the last look), each connection's outbox.
    pub fn on_metrics(&mut self, text: &str, now: Instant) {
        self.metrics_at = Some(now);
        let transactions = prom::transactions(text);
        for bus in &mut self.buses {
            bus.counts = transactions.get(&bus.name).copied().unwrap_or_default();
            let total = bus.counts.total();
            bus.per_second = match bus.last {
                Some((at, before)) if now.duration_since(at) <= RATE_MAX && total >= before => {
                    let secs = now.duration_since(at).as_secs_f64();
                    (secs > 0.0).then(|| (total - before) / secs)
                }
                _ => None,
            };
            bus.last = Some((now, total));
        }
        let outboxes = prom::gauge(text, "twinbus_mqtt_outbox_messages", "connection");
        for c in &mut self.connections {
            c.outbox = outboxes.get(&c.info.name).copied();
        }
    }

    /// The overview page's data.
    pub fn overview(&self, now: SystemTime) -> Json {
        let connections: Vec<Json> = self
            .connections
            .iter()
            .map(|c| {
                json!({
                    "name": c.info.name,
                    "broker": c.info.broker,
                    "connected": c.connected,
                    "last_error": c.last_error.as_ref().map(|(e, _)| e),
                    "last_error_at": c.last_error.as_ref().map(|(_, at)| epoch_ms(*at)),
                    "outbox": c.outbox,
                })
            })
            .collect();
        let buses: Vec<Json> = self
            .buses
            .iter()
            .map(|b| {
                json!({
                    "name": b.name,
                    "per_second": b.per_second.map(|r| (r * 10.0).round() / 10.0),
                    "transactions": b.counts.total(),
                    "timeouts": b.counts.timeout,
                    "errors": b.counts.exception + b.counts.error,
                })
            })
            .collect();
        let devices: Vec<Json> = self.devices.values().map(|d| Json::Object(d.summary())).collect();
        json!({ "time": epoch_ms(now), "connections": connections, "buses": buses, "devices": devices })
    }

    /// A device page's data: its points with their values, its last
    /// commands (`journal`, newest first), and each point's whole history
    /// when `history` (else only its latest sample, which the page appends).
    pub fn device(&self, device: &str, journal: &[Entry], write: bool, history: bool, now: SystemTime) -> Option<Json> {
        let d = self.devices.get(device)?;
        let mut doc = d.summary();
        let points: Vec<Json> = (0..d.info.points.len()).map(|i| d.point(i, history)).collect();
        let commands: Vec<Json> = journal.iter().map(command).collect();
        doc.insert("time".into(), json!(epoch_ms(now)));
        doc.insert("write".into(), json!(write));
        doc.insert("history_ms".into(), json!(HISTORY.as_millis() as u64));
        doc.insert("points".into(), Json::Array(points));
        doc.insert("commands".into(), Json::Array(commands));
        Some(Json::Object(doc))
    }
}

impl DeviceInfo {
    /// Whether `other` is the same running device: the same actor (whose
    /// points a restart makes anew) on the same bus, unit and period.
    fn same_as(&self, other: &DeviceInfo) -> bool {
        Arc::ptr_eq(&self.points, &other.points) && self.bus == other.bus && self.unit == other.unit && self.poll == other.poll
    }
}

impl Dev {
    fn new(info: DeviceInfo) -> Dev {
        let n = info.points.len();
        let snapshot = Arc::new(Snapshot { values: vec![None; n], errors: vec![None; n], health: Health::Unknown, at: SystemTime::UNIX_EPOCH, seq: 0 });
        Dev { snapshot, points: (0..n).map(|_| Track::default()).collect(), polls: VecDeque::new(), info }
    }

    /// What both pages show of the device.
    fn summary(&self) -> Map<String, Json> {
        let s = &self.snapshot;
        let (state, reason) = match &s.health {
            Health::Unknown => ("unknown", None),
            Health::Online => ("online", None),
            Health::Offline(why) => ("offline", Some(why.as_str())),
        };
        let polled = self.polls.back().map(|at| epoch_ms(*at));
        let errors = s.errors.iter().filter(|e| e.is_some()).count();
        let doc = json!({
            "name": self.info.name,
            "bus": self.info.bus,
            "unit": self.info.unit,
            "state": state,
            "reason": reason,
            "last_poll": polled,
            "poll_ms": self.info.poll.as_millis() as u64,
            "period_ms": self.period().map(|p| p.as_millis() as u64),
            "point_errors": errors,
        });
        match doc {
            Json::Object(m) => m,
            _ => Map::new(),
        }
    }

    /// The mean interval between the last polls.
    fn period(&self) -> Option<Duration> {
        let first = self.polls.front()?;
        let last = self.polls.back()?;
        let n = u32::try_from(self.polls.len().checked_sub(1)?).ok().filter(|n| *n > 0)?;
        last.duration_since(*first).ok().map(|span| span / n)
    }

    fn point(&self, i: usize, history: bool) -> Json {
        let p = &self.info.points[i];
        let track = &self.points[i];
        let value = self.snapshot.values.get(i).and_then(Option::as_ref);
        let mut doc = json!({
            "path": p.path,
            "type": type_text(p),
            "where": location_text(p),
            "access": access_text(p),
            "writable": p.access.writable() && p.location.table.is_writable(),
            "value": value.map(to_json),
            "text": value.map(value_text),
            "raw": value.and_then(|v| raw_text(p, v)),
            "error": self.snapshot.errors.get(i).and_then(Option::as_ref),
            "changed": track.changed.map(epoch_ms),
            "sample": track.history.back().map(|(t, x)| json!([t, x])),
        });
        if let Json::Object(m) = &mut doc {
            if !p.labels.is_empty() {
                m.insert("labels".into(), p.labels.iter().map(|l| l.name.clone()).collect());
            } else if p.data_type == crate::point::DataType::Bool || p.location.table.is_bits() || p.location.bit.is_some() {
                m.insert("labels".into(), json!([false, true]));
            }
            if let Some(min) = p.min {
                m.insert("min".into(), json!(min.to_string()));
            }
            if let Some(max) = p.max {
                m.insert("max".into(), json!(max.to_string()));
            }
            if history {
                m.insert("history".into(), track.history.iter().map(|(t, x)| json!([t, x])).collect());
            }
        }
        doc
    }
}

/// A value as a chart plots it: numbers and booleans as they are, a label
/// as its raw number; `None` for text.
fn number(p: &Point, v: &Value) -> Option<f64> {
    match v {
        Value::Text(name) => p.labels.iter().find(|l| &l.name == name).map(|l| l.raw as f64),
        other => other.as_f64().filter(|x| x.is_finite()),
    }
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        other => other.to_string(),
    }
}

/// The point's type, for the unit column: the configuration has no units,
/// so the type, with its scale and offset (what a raw 1 means).
fn type_text(p: &Point) -> String {
    let mut t = p.data_type.name().to_string();
    if p.scale != 1.0 {
        t.push_str(&format!(" × {}", p.scale));
    }
    if p.offset != 0.0 {
        t.push_str(&format!(" {} {}", if p.offset < 0.0 { "−" } else { "+" }, p.offset.abs()));
    }
    t
}

fn location_text(p: &Point) -> String {
    let loc = &p.location;
    let (first, last) = p.span();
    let mut t = if first == last { format!("{} {}", loc.table.name(), loc.address) } else { format!("{} {first}–{last}", loc.table.name()) };
    if let Some(bit) = loc.bit {
        t.push_str(&format!(" bit {bit}"));
    }
    t
}

fn access_text(p: &Point) -> &'static str {
    match (p.access.readable(), p.access.writable() && p.location.table.is_writable()) {
        (true, true) => "read-write",
        (true, false) => "read",
        (false, _) => "write",
    }
}

/// The registers (hex) or bits the device holds for `v`: the value encoded
/// again, which is exact for every type (decoding is one-to-one) except a
/// string's padding and a raw number no label names (then none is shown).
fn raw_text(p: &Point, v: &Value) -> Option<String> {
    match p.encode_device_value(v).ok()? {
        Encoded::Words(words) => Some(words.iter().map(|w| format!("{w:04X}")).collect::<Vec<_>>().join(" ")),
        Encoded::Bits(bits) => Some(bits.iter().map(|b| if *b { "1" } else { "0" }).collect()),
        Encoded::RegisterBit { bit, value } if p.location.table == Table::HoldingRegister || p.location.table == Table::InputRegister => {
            Some(format!("bit {bit} = {}", u8::from(value)))
        }
        Encoded::RegisterBit { .. } => None,
    }
}

fn command(e: &Entry) -> Json {
    json!({
        "at": epoch_ms(e.at),
        "source": e.source.name(),
        "by": e.by,
        "id": e.id,
        "kind": e.kind,
        "outcome": e.outcome,
        "error": e.error,
        "ms": e.latency.as_millis() as u64,
        "values": e.values.iter().map(|(p, v)| json!([p, v])).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests;
