//! How often each point is read (poll groups), and how a device wants to be
//! written and asked again (quirks): checks and the merge of a profile's
//! settings with a device's.
//!
//! A readable point's interval is, first found: its own `poll`, then the
//! longest `poll_paths` pattern of the device or its profile that matches
//! it (the device's on the same pattern), then the device's `poll`. Points
//! of one interval form a group; reads of two groups never share a request.

use std::time::Duration;

use super::raw::{Key, Map, RawBusy, RawPoint, S};
use super::validate::Checker;
use super::{PollGroup, Quirks};
use crate::point::Point;

/// A read interval: `None` is `once` (when the device comes online).
pub(super) type Every = Option<Duration>;

/// The poll settings of a profile or a device, checked.
#[derive(Debug, Default)]
pub(super) struct Schedule {
    /// (point path, interval) of points that name their own.
    explicit: Vec<(String, Every)>,
    /// (pattern, interval) from `poll_paths`.
    patterns: Vec<(String, Every)>,
}

/// `1s`, `60s` or `once`.
fn every(c: &mut Checker, v: &S<String>, path: &str) -> Option<Every> {
    if v.value.trim() == "once" {
        return Some(None);
    }
    match humantime::parse_duration(v.value.trim()) {
        Ok(d) if d < Duration::from_millis(10) => {
            c.at(v, path, format!("{:?} is too short (at least 10ms)", v.value));
            None
        }
        Ok(d) if d > Duration::from_secs(86_400) => {
            c.at(v, path, format!("{:?} is too long (at most 1day; for a value read at start only, write `once`)", v.value));
            None
        }
        Ok(d) => Some(Some(d)),
        Err(e) => {
            c.at(v, path, format!("{:?} is neither an interval nor `once`: {e} (write e.g. 1s, 60s, once)", v.value));
            None
        }
    }
}

/// Checks the `poll` of each point and the `poll_paths` of a profile or
/// device (`parent`), whose points (its own, or with its profile's) are
/// `points`.
pub(super) fn schedule(c: &mut Checker, raw: &Map<RawPoint>, poll_paths: &Map<S<String>>, points: &[Point], parent: &str) -> Schedule {
    let mut out = Schedule::default();
    for (k, p) in raw {
        let Some(v) = &p.poll else { continue };
        let path = format!("{parent}.points.{}.poll", k.name());
        let readable = points.iter().find(|x| x.path == k.name()).is_none_or(|x| x.access.readable());
        if !readable {
            c.at(v, &path, "the point is write-only: it is never read, so it has no poll interval");
            continue;
        }
        if let Some(e) = every(c, v, &path) {
            out.explicit.push((k.name().to_string(), e));
        }
    }
    for (k, v) in poll_paths {
        let path = format!("{parent}.poll_paths.{}", k.name());
        if !valid_pattern(k.name()) {
            c.key(k, &path, format!("{:?} is not a pattern (write a path prefix such as deviceData.energy, or a text prefix such as \"deviceData.e*\")", k.name()));
            continue;
        }
        if !points.iter().any(|p| p.access.readable() && super::shadows::matches(k.name(), &p.path)) {
            pattern_matches_nothing(c, k, &path);
            continue;
        }
        if let Some(e) = every(c, v, &path) {
            out.patterns.push((k.name().to_string(), e));
        }
    }
    out
}

fn pattern_matches_nothing(c: &mut Checker, k: &Key, path: &str) {
    c.key(k, path, format!("{:?} matches no readable point (a path prefix matches that path and what is under it)", k.name()));
}

fn valid_pattern(p: &str) -> bool {
    let body = p.strip_suffix('*').unwrap_or(p);
    !p.is_empty() && !body.contains('*')
}

/// The device's poll groups: each readable point's interval (see the
/// module docs), grouped, fastest first and `once` last.
pub(super) fn groups(default: Duration, points: &[Point], own: &Schedule, profile: Option<&Schedule>) -> Vec<PollGroup> {
    let empty = Schedule::default();
    let profile = profile.unwrap_or(&empty);
    let mut groups: Vec<PollGroup> = Vec::new();
    for (i, p) in points.iter().enumerate().filter(|(_, p)| p.access.readable()) {
        let explicit = own.explicit.iter().chain(&profile.explicit).find(|(path, _)| *path == p.path).map(|(_, e)| *e);
        // Longest pattern; on a tie the device's own, which come first.
        let mut best: Option<(usize, Every)> = None;
        for (pattern, e) in own.patterns.iter().chain(&profile.patterns) {
            if super::shadows::matches(pattern, &p.path) && best.is_none_or(|(len, _)| pattern.len() > len) {
                best = Some((pattern.len(), *e));
            }
        }
        let e = explicit.or(best.map(|(_, e)| e)).unwrap_or(Some(default));
        match groups.iter_mut().find(|g| g.every == e) {
            Some(g) => g.points.push(i),
            None => groups.push(PollGroup { every: e, points: vec![i] }),
        }
    }
    groups.sort_by_key(|g| g.every.unwrap_or(Duration::MAX));
    groups
}

/// Quirk settings as written by a profile or a device, checked; `None`
/// where not written.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct QuirkSettings {
    single_writes: Option<bool>,
    read_back_delay: Option<Duration>,
    busy_retries: Option<u8>,
    busy_delay: Option<Duration>,
}

/// Checks `single_writes`, `read_back_delay` and `busy` of `parent`.
pub(super) fn quirk_settings(c: &mut Checker, single_writes: Option<&S<bool>>, read_back_delay: Option<&S<String>>, busy: Option<&S<RawBusy>>, parent: &str) -> QuirkSettings {
    let read_back_delay = read_back_delay.map(|v| c.duration_within(Some(v), &format!("{parent}.read_back_delay"), Duration::ZERO, Duration::ZERO, Duration::from_secs(10)));
    let busy_retries = busy.and_then(|b| b.value.retries.as_ref()).and_then(|r| c.int(r, &format!("{parent}.busy.retries"), 0, 10, "busy retries"));
    let busy_delay = busy.and_then(|b| b.value.delay.as_ref()).map(|v| c.duration_within(Some(v), &format!("{parent}.busy.delay"), Duration::from_millis(100), Duration::from_millis(1), Duration::from_secs(10)));
    QuirkSettings { single_writes: single_writes.map(|v| v.value), read_back_delay, busy_retries, busy_delay }
}

/// The device's quirks: its own settings, else its profile's, else the defaults.
pub(super) fn quirks(own: QuirkSettings, profile: Option<QuirkSettings>) -> Quirks {
    let p = profile.unwrap_or_default();
    let d = Quirks::default();
    Quirks {
        single_writes: own.single_writes.or(p.single_writes).unwrap_or(d.single_writes),
        read_back_delay: own.read_back_delay.or(p.read_back_delay).unwrap_or(d.read_back_delay),
        busy_retries: own.busy_retries.or(p.busy_retries).unwrap_or(d.busy_retries),
        busy_delay: own.busy_delay.or(p.busy_delay).unwrap_or(d.busy_delay),
    }
}
