//! The telemetry adapter task: one per device with a telemetry topic.
//!
//! A full document goes out every `telemetry_interval` (with the first poll
//! after the interval ends: each poll is sent at most once); between those, with
//! `report_on_change`, a document with only the values that moved beyond
//! their deadband goes out after the poll that saw the change. A change of
//! health (online ⇄ offline) is published at once. An offline device's
//! document says so and why, and carries no values: never stale ones.
//!
//! With `telemetry_interval: every_poll` a full document goes out after
//! every poll cycle instead, each on its own (never replaced by the next
//! while waiting at the broker's limit). Snapshots reach this task through
//! a latest-only channel, so that a slow cloud never slows the device; a
//! task that falls behind therefore skips snapshots, and each one skipped
//! is counted in `twinbus_telemetry_polls_skipped_total{device}` and
//! logged, not lost silently.

use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;

use super::epoch_ms;
use crate::config::Twin;
use crate::device::{DeviceHandle, Health, Snapshot};
use crate::mqtt::{Class, Coalesce, ConnectionHandle, Publish};
use crate::point::{Point, Value};

/// Publishes the device's telemetry until `stop` fires.
pub async fn run_telemetry(twin: Twin, device: DeviceHandle, conn: ConnectionHandle, stop: CancellationToken) {
    let Some(topic) = twin.telemetry.clone() else { return };
    let mut snapshots = device.watch();
    if twin.every_poll {
        return every_poll(&topic, device, conn, stop).await;
    }
    let mut ticker = tokio::time::interval(twin.telemetry_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = Reported::new(device.points.len());
    // Each poll's snapshot goes out at most once: a document's `time` is when
    // its values were read, and the cloud may key on it. A full report falls
    // due every interval and takes the next snapshot not yet sent (the ticker
    // and a poll can fire within the same millisecond).
    let mut full_due = false;
    let mut sent: Option<SystemTime> = None;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            _ = ticker.tick() => full_due = true,
            changed = snapshots.changed() => {
                if changed.is_err() { break }
            }
        }
        let snap: Arc<Snapshot> = snapshots.borrow_and_update().clone();
        if snap.health == Health::Unknown || sent == Some(snap.at) {
            continue;
        }
        // At the broker's publish limit, a document still waiting on the
        // topic takes in the next: a full one replaces it, a change merges.
        let doc = if full_due || snap.health != reported.health {
            full_due = false;
            Some((reported.full(&device.points, &snap), Coalesce::Replace))
        } else if twin.report_on_change {
            reported.changes(&device.points, &snap).map(|d| (d, Coalesce::Merge))
        } else {
            None
        };
        if let Some((doc, how)) = doc {
            sent = Some(snap.at);
            conn.send(Publish::new(Class::Telemetry, topic.as_str(), doc).coalescing(how)).await;
        }
    }
}

/// `telemetry_interval: every_poll`: one full document per snapshot.
async fn every_poll(topic: &str, device: DeviceHandle, conn: ConnectionHandle, stop: CancellationToken) {
    let mut snapshots = device.watch();
    let mut reported = Reported::new(device.points.len());
    let mut last_seq = snapshots.borrow().seq;
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            changed = snapshots.changed() => {
                if changed.is_err() { break }
            }
        }
        let snap: Arc<Snapshot> = snapshots.borrow_and_update().clone();
        let skipped = skipped(last_seq, snap.seq);
        last_seq = snap.seq;
        if skipped > 0 {
            metrics::counter!("twinbus_telemetry_polls_skipped_total", "device" => device.name.clone()).increment(skipped);
            tracing::warn!(device = %device.name, skipped, "telemetry fell behind the polls: snapshots skipped");
        }
        if snap.health == Health::Unknown {
            continue;
        }
        let doc = reported.full(&device.points, &snap);
        conn.send(Publish::new(Class::Telemetry, topic, doc)).await;
    }
}

/// Snapshots published between the one seen last (`last`) and `now`.
fn skipped(last: u64, now: u64) -> u64 {
    now.saturating_sub(last).saturating_sub(1)
}

/// What the cloud was last told, to find changes beyond the deadband.
/// Shared with the shadow adapter, which reports changes the same way.
#[derive(Debug)]
pub(super) struct Reported {
    values: Vec<Option<Value>>,
    pub(super) health: Health,
}

impl Reported {
    pub(super) fn new(n: usize) -> Self {
        Reported { values: vec![None; n], health: Health::Unknown }
    }

    fn full(&mut self, points: &[Point], snap: &Snapshot) -> Vec<u8> {
        self.health = snap.health.clone();
        self.values.clone_from(&snap.values);
        document(points, snap, |_| true)
    }

    fn changes(&mut self, points: &[Point], snap: &Snapshot) -> Option<Vec<u8>> {
        let moved = self.take_changes(points, &snap.values);
        if !moved.contains(&true) {
            return None;
        }
        Some(document(points, snap, |i| moved[i]))
    }

    /// Marks which values moved beyond their deadband since last reported,
    /// and records them as reported.
    pub(super) fn take_changes(&mut self, points: &[Point], values: &[Option<Value>]) -> Vec<bool> {
        let moved: Vec<bool> = (0..points.len()).map(|i| moved(&points[i], self.values[i].as_ref(), values[i].as_ref())).collect();
        for (i, m) in moved.iter().enumerate() {
            if *m {
                self.values[i].clone_from(&values[i]);
            }
        }
        moved
    }

    /// Records values the cloud was just told (e.g. a read-back).
    pub(super) fn record(&mut self, i: usize, value: Option<Value>) {
        self.values[i] = value;
    }
}

fn moved(point: &Point, before: Option<&Value>, now: Option<&Value>) -> bool {
    match (before, now) {
        (Some(a), Some(b)) => match (a.as_f64(), b.as_f64()) {
            (Some(x), Some(y)) if point.deadband > 0.0 => (x - y).abs() > point.deadband,
            _ => a != b,
        },
        (None, None) => false,
        _ => true,
    }
}

/// The JSON text of a telemetry document: `time`, `online`, then each
/// included value nested by its dotted path, then `errors`. Written straight
/// into one buffer: the points are sorted by path, so the values under one
/// object come one after the other and each object is opened and closed
/// once, with no map of keys and no JSON value built per point.
pub fn document(points: &[Point], snap: &Snapshot, include: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 32 * points.len());
    out.extend_from_slice(b"{\"time\":");
    write_json(&mut out, &epoch_ms(snap.at));
    if let Health::Offline(reason) = &snap.health {
        out.extend_from_slice(b",\"online\":false,\"error\":");
        write_json(&mut out, reason);
        out.push(b'}');
        return out;
    }
    out.extend_from_slice(b",\"online\":true");
    // The objects open along the previous value's path.
    let mut open: Vec<&str> = Vec::new();
    let mut any_error = false;
    for (i, p) in points.iter().enumerate() {
        let Some(v) = snap.values[i].as_ref().filter(|_| include(i)) else {
            any_error |= include(i) && snap.errors[i].is_some();
            continue;
        };
        let (parents, leaf) = p.path.rsplit_once('.').map_or(("", p.path.as_str()), |(a, b)| (a, b));
        let mut depth = 0;
        for seg in parents.split('.').filter(|s| !s.is_empty()) {
            if open.get(depth) != Some(&seg) {
                break;
            }
            depth += 1;
        }
        for _ in depth..open.len() {
            out.push(b'}');
        }
        open.truncate(depth);
        // Every object already open holds a member (the top one `time`), so
        // what comes next in it takes a comma; a new object's first does not.
        let mut comma = true;
        for seg in parents.split('.').filter(|s| !s.is_empty()).skip(depth) {
            if comma {
                out.push(b',');
            }
            write_json(&mut out, seg);
            out.extend_from_slice(b":{");
            open.push(seg);
            comma = false;
        }
        if comma {
            out.push(b',');
        }
        write_json(&mut out, leaf);
        out.push(b':');
        write_value(&mut out, v);
    }
    for _ in 0..open.len() {
        out.push(b'}');
    }
    if any_error {
        out.extend_from_slice(b",\"errors\":{");
        let mut first = true;
        for (i, p) in points.iter().enumerate() {
            if let (true, None, Some(e)) = (include(i), &snap.values[i], &snap.errors[i]) {
                if !first {
                    out.push(b',');
                }
                first = false;
                write_json(&mut out, &p.path);
                out.push(b':');
                write_json(&mut out, e);
            }
        }
        out.push(b'}');
    }
    out.push(b'}');
    out
}

/// Writes a scalar as serde_json does (escaped strings, shortest floats).
fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    // Serializing a string or a number into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// A typed value as JSON text; a non-finite float (a device can hold NaN) is null.
fn write_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Bool(b) => write_json(out, b),
        Value::Int(i) => write_json(out, i),
        Value::UInt(u) => write_json(out, u),
        Value::Float(f) if f.is_finite() => write_json(out, f),
        Value::Float(_) => out.extend_from_slice(b"null"),
        Value::Text(s) => write_json(out, s.as_str()),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::config::Config;

    fn points() -> Vec<Point> {
        let yaml = r#"
connections:
  local: { embedded: { listen: "127.0.0.1:1883" } }
buses:
  line: { tcp: { host: 127.0.0.1, port: 5020 } }
devices:
  d:
    bus: line
    unit: 1
    twin: { connection: local, telemetry: t }
    points:
      a.b.x: { holding: 0 }
      a.b-c: { holding: 1 }
      a.b.y: { holding: 2, type: f32 }
      a.c: { coil: 0 }
      q_u-ote: { holding: 4 }
      top: { holding: 5, values: { auto: 0, manual: 1 } }
      z.deep.er.v: { holding: 6 }
"#;
        let config = Config::parse(yaml, Path::new("t.yaml")).expect("valid");
        config.devices[0].points.to_vec()
    }

    fn snap(points: &[Point]) -> Snapshot {
        let values = points
            .iter()
            .map(|p| match p.path.as_str() {
                "a.b.y" => Some(Value::Float(21.5)),
                "a.c" => Some(Value::Bool(true)),
                "top" => Some(Value::Text("auto".into())),
                "z.deep.er.v" => None,
                _ => Some(Value::Int(7)),
            })
            .collect();
        let errors = points.iter().map(|p| (p.path == "z.deep.er.v").then(|| "exception 2".to_string())).collect();
        Snapshot { values, errors, health: Health::Online, seq: 1, at: SystemTime::UNIX_EPOCH + Duration::from_millis(1234) }
    }

    #[test]
    fn a_full_document_nests_values_by_path_in_point_order_and_lists_errors_last() {
        let points = points();
        let doc = String::from_utf8(document(&points, &snap(&points), |_| true)).expect("utf-8");
        assert_eq!(doc, r#"{"time":1234,"online":true,"a":{"b-c":7,"b":{"x":7,"y":21.5},"c":true},"q_u-ote":7,"top":"auto","errors":{"z.deep.er.v":"exception 2"}}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&doc).is_ok());
    }

    #[test]
    fn a_change_document_holds_only_the_values_that_moved() {
        let points = points();
        let moved = |i: usize| points[i].path == "a.b.y" || points[i].path == "top";
        let doc = String::from_utf8(document(&points, &snap(&points), moved)).expect("utf-8");
        assert_eq!(doc, r#"{"time":1234,"online":true,"a":{"b":{"y":21.5}},"top":"auto"}"#);
    }

    #[test]
    fn an_offline_document_says_why_and_carries_no_values() {
        let points = points();
        let mut s = snap(&points);
        s.health = Health::Offline("timeout".into());
        let doc = String::from_utf8(document(&points, &s, |_| true)).expect("utf-8");
        assert_eq!(doc, r#"{"time":1234,"online":false,"error":"timeout"}"#);
    }

    #[test]
    fn a_non_finite_float_is_null() {
        let points = points();
        let mut s = snap(&points);
        for (i, p) in points.iter().enumerate() {
            s.values[i] = (p.path == "a.b.y").then_some(Value::Float(f64::NAN));
            s.errors[i] = None;
        }
        let doc = String::from_utf8(document(&points, &s, |_| true)).expect("utf-8");
        assert_eq!(doc, r#"{"time":1234,"online":true,"a":{"b":{"y":null}}}"#);
    }

    #[test]
    fn consecutive_snapshots_skip_nothing_and_a_gap_counts_what_it_hides() {
        assert_eq!(skipped(0, 1), 0);
        assert_eq!(skipped(7, 8), 0);
        assert_eq!(skipped(7, 10), 2);
        assert_eq!(skipped(7, 7), 0, "the same snapshot seen twice");
    }
}
