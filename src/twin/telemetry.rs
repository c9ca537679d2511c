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

use serde_json::{json, Map, Value as Json};
use tokio_util::sync::CancellationToken;

use super::epoch_ms;
use super::json::{insert, to_json};
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
            conn.send(Publish::new(Class::Telemetry, topic.as_str(), doc.to_string().into_bytes()).coalescing(how)).await;
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
        conn.send(Publish::new(Class::Telemetry, topic, doc.to_string().into_bytes())).await;
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

    fn full(&mut self, points: &[Point], snap: &Snapshot) -> Json {
        self.health = snap.health.clone();
        self.values.clone_from(&snap.values);
        document(points, snap, |_| true)
    }

    fn changes(&mut self, points: &[Point], snap: &Snapshot) -> Option<Json> {
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

fn document(points: &[Point], snap: &Snapshot, include: impl Fn(usize) -> bool) -> Json {
    let mut doc = Map::new();
    doc.insert("time".into(), json!(epoch_ms(snap.at)));
    match &snap.health {
        Health::Offline(reason) => {
            doc.insert("online".into(), json!(false));
            doc.insert("error".into(), json!(reason));
            return Json::Object(doc);
        }
        _ => {
            doc.insert("online".into(), json!(true));
        }
    }
    let mut errors = Map::new();
    for (i, p) in points.iter().enumerate() {
        if !include(i) {
            continue;
        }
        if let Some(v) = &snap.values[i] {
            insert(&mut doc, &p.path, to_json(v));
        } else if let Some(e) = &snap.errors[i] {
            errors.insert(p.path.clone(), json!(e));
        }
    }
    if !errors.is_empty() {
        doc.insert("errors".into(), Json::Object(errors));
    }
    Json::Object(doc)
}


#[cfg(test)]
mod tests {
    use super::skipped;

    #[test]
    fn consecutive_snapshots_skip_nothing_and_a_gap_counts_what_it_hides() {
        assert_eq!(skipped(0, 1), 0);
        assert_eq!(skipped(7, 8), 0);
        assert_eq!(skipped(7, 10), 2);
        assert_eq!(skipped(7, 7), 0, "the same snapshot seen twice");
    }
}
