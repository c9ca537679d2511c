//! Which shadow serves which point, and whether each shadow fits in 8 KB.
//!
//! AWS IoT refuses a shadow whose state (desired and reported, metadata not
//! counted) passes 8 KB, so a device with many points is bound to several
//! named shadows, each serving the points its `points` patterns match: a
//! path prefix (`deviceAttrib` is that path and everything under it) or a
//! text prefix ending in `*` (`deviceData.p1*`). At most one shadow leaves
//! `points` out, and takes the points no other shadow claims.
//!
//! Each shadow's largest possible document is worked out from its points:
//! every readable value at its widest in `reported`, every writable one in
//! `desired` and with a refusal reason in `reported.<errors_key>`, the last
//! command states, and the flags. One that can pass 8 KB is refused, with a
//! split into shadows that fit.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value as Json};

use super::raw::{RawShadow, RawTwin, S};
use super::shadow_document::{COUNTED_COMMAND_ID, MAX_BYTES, MAX_REASON_BYTES, REPORTED_COMMANDS};
use super::validate::Checker;
use super::ShadowBinding;
use crate::point::{DataType, Point};

/// The raw shadows of a twin, with their config paths, in order.
pub(super) fn raw_shadows<'a>(t: &'a RawTwin, path: &str) -> Vec<(&'a S<RawShadow>, String)> {
    match (&t.shadow, &t.shadows) {
        (Some(s), _) => vec![(s, format!("{path}.shadow"))],
        (None, Some(list)) => list.value.iter().enumerate().map(|(i, s)| (s, format!("{path}.shadows[{i}]"))).collect(),
        (None, None) => Vec::new(),
    }
}

/// Whether a pattern of `points` matches a point path.
pub(super) fn matches(pattern: &str, path: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => path == pattern || path.strip_prefix(pattern).is_some_and(|rest| rest.starts_with('.')),
    }
}

/// Gives each shadow its points (indices into `points`), checking that each
/// pattern matches something and each point has exactly one shadow.
pub(super) fn assign(c: &mut Checker, raw: &RawTwin, shadows: &mut [ShadowBinding], points: &[Point], path: &str) {
    let raws = raw_shadows(raw, path);
    if raws.len() != shadows.len() {
        return; // refused already
    }
    let patterns: Vec<Option<Vec<String>>> = raws.iter().map(|(s, _)| s.value.points.as_ref().map(|p| p.value.iter().map(|x| x.value.clone()).collect())).collect();
    let mut rest: Option<usize> = None;
    for (i, (s, at)) in raws.iter().enumerate() {
        let Some(list) = &s.value.points else {
            if let Some(first) = rest {
                c.at(*s, at, format!("only one shadow may leave out `points` (it takes the points the others do not; {} does already)", raws[first].1));
            }
            rest = Some(i);
            continue;
        };
        if list.value.is_empty() {
            c.at(list, &format!("{at}.points"), "is empty (write path prefixes, e.g. [deviceAttrib, \"deviceData.p1*\"])");
        }
        for p in &list.value {
            if p.value.is_empty() || p.value == "*" {
                c.at(p, &format!("{at}.points"), format!("{:?} is not a pattern (write a path prefix such as deviceAttrib, or a text prefix such as \"deviceData.p1*\")", p.value));
            } else if !points.iter().any(|x| matches(&p.value, &x.path)) {
                c.at(p, &format!("{at}.points"), format!("{:?} matches none of the device's points", p.value));
            }
        }
    }
    for s in shadows.iter_mut() {
        s.points.clear();
    }
    let mut unserved = Vec::new();
    // Per set of shadows claiming the same points, those points.
    let mut overlaps: std::collections::BTreeMap<Vec<usize>, Vec<&str>> = std::collections::BTreeMap::new();
    for (n, point) in points.iter().enumerate() {
        let claims: Vec<usize> = patterns.iter().enumerate().filter(|(_, p)| p.as_ref().is_some_and(|list| list.iter().any(|x| matches(x, &point.path)))).map(|(i, _)| i).collect();
        match (claims.as_slice(), rest) {
            ([one], _) => shadows[*one].points.push(n),
            ([], Some(r)) => shadows[r].points.push(n),
            ([], None) => unserved.push(point.path.clone()),
            _ => overlaps.entry(claims).or_default().push(point.path.as_str()),
        }
    }
    for (claims, paths) in overlaps {
        let names: Vec<&str> = claims.iter().map(|i| raws[*i].1.as_str()).collect();
        let shown: Vec<&str> = paths.iter().take(3).copied().collect();
        let more = if paths.len() > 3 { format!(" and {} more", paths.len() - 3) } else { String::new() };
        let last = claims[claims.len() - 1];
        c.at(raws[last].0, &format!("{}.points", raws[last].1), format!(
            "{} is claimed by {} (each point belongs to one shadow: make their patterns apart)",
            shown.iter().map(|p| format!("`{p}`")).collect::<Vec<_>>().join(", ") + &more,
            names.join(" and ")
        ));
    }
    if !unserved.is_empty() {
        if let Some((s, at)) = raws.first() {
            c.warnings.push(format!(
                "{}:{}: {at}: no shadow serves {} of the device's points ({}): they are polled but in no shadow",
                c.file.display(),
                s.referenced.line(),
                unserved.len(),
                unserved.join(", ")
            ));
        }
    }
}

/// Refuses a shadow whose document can pass 8 KB, with a split that fits.
pub(super) fn check_sizes(c: &mut Checker, raw: &RawTwin, shadows: &[ShadowBinding], points: &[Point], path: &str) {
    for ((s, at), binding) in raw_shadows(raw, path).into_iter().zip(shadows) {
        let mine: Vec<&Point> = binding.points.iter().filter_map(|i| points.get(*i)).collect();
        let size = document_size(&mine, &binding.errors_key);
        if size <= MAX_BYTES {
            continue;
        }
        let hint = match split(&mine, &binding.errors_key) {
            Some(parts) => {
                let base = binding.name.clone().unwrap_or_else(|| "part".to_string());
                let list: Vec<String> = parts
                    .iter()
                    .enumerate()
                    .map(|(i, patterns)| {
                        let quoted: Vec<String> = patterns.iter().map(|p| if p.contains('*') { format!("\"{p}\"") } else { p.clone() }).collect();
                        format!("{{ thing: {}, name: {base}-{}, points: [{}] }}", binding.thing, i + 1, quoted.join(", "))
                    })
                    .collect();
                format!("bind the device to {} named shadows that fit, e.g. `shadows: [ {} ]`", parts.len(), list.join(", "))
            }
            None => "one point alone is too large for a shadow: shorten it (a `string` point's `length`) or leave it out of the shadow".to_string(),
        };
        c.at(
            s,
            &at,
            format!(
                "its document can reach {size} bytes ({} points: desired and reported values, reasons, the last {REPORTED_COMMANDS} command states), above the {MAX_BYTES} bytes AWS IoT allows a shadow: {hint}",
                mine.len()
            ),
        );
    }
}

/// The bytes of a point's widest value as JSON.
pub(super) fn widest(p: &Point) -> usize {
    let number = match p.data_type {
        DataType::Bool => 5,
        DataType::U16 => 5,
        DataType::I16 => 6,
        DataType::U32 => 10,
        DataType::I32 => 11,
        DataType::U64 | DataType::I64 => 20,
        DataType::F32 => 16,
        DataType::F64 => 24,
        // A byte that is not text becomes an escape (\u0001) or U+FFFD.
        DataType::String { len } => 6 * usize::from(len) + 2,
    };
    let scaled = p.scale != 1.0 || p.offset != 0.0;
    let number = if scaled && !matches!(p.data_type, DataType::String { .. } | DataType::Bool) { number.max(24) } else { number };
    // A label, or the raw number when the device holds a value without one.
    let label = p.labels.iter().map(|l| Json::String(l.name.clone()).to_string().len()).max().unwrap_or(0);
    number.max(label)
}

/// A JSON value of exactly `bytes` bytes.
fn filler(bytes: usize) -> Json {
    Json::String("x".repeat(bytes.saturating_sub(2)))
}

/// The largest state (`{"desired":…,"reported":…}`) a shadow of these points
/// can hold, in bytes.
pub(super) fn document_size(points: &[&Point], errors_key: &str) -> usize {
    let mut desired = Map::new();
    let mut reported = Map::new();
    let mut reasons = Map::new();
    for p in points {
        if p.access.readable() {
            crate::twin::json::insert(&mut reported, &p.path, filler(widest(p)));
        }
        if p.access.writable() {
            crate::twin::json::insert(&mut desired, &p.path, filler(widest(p)));
            reasons.insert(p.path.clone(), filler(MAX_REASON_BYTES));
        }
    }
    reasons.insert("command".into(), filler(MAX_REASON_BYTES));
    crate::twin::json::insert(&mut reported, errors_key, Json::Object(reasons));
    let mut commands = Map::new();
    for n in 0..REPORTED_COMMANDS {
        let id = format!("{n:0>width$}", width = COUNTED_COMMAND_ID);
        commands.insert(id, json!({"state": "FAILURE", "reason": filler(MAX_REASON_BYTES), "time": 1_000_000_000_000u64}));
    }
    reported.insert("command".into(), Json::Object(commands));
    reported.insert("connected".into(), json!(false));
    reported.insert("online".into(), json!(false));
    json!({"desired": desired, "reported": reported}).to_string().len()
}

/// The points in path order, packed into as few shadows as fit, each as the
/// patterns that match exactly its points. `None` if one point alone is
/// too large.
fn split(points: &[&Point], errors_key: &str) -> Option<Vec<Vec<String>>> {
    let mut sorted: Vec<&Point> = points.to_vec();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut bins: Vec<Vec<&Point>> = vec![Vec::new()];
    for p in sorted.iter().copied() {
        let mut candidate = bins.last().cloned().unwrap_or_default();
        candidate.push(p);
        if document_size(&candidate, errors_key) <= MAX_BYTES {
            if let Some(last) = bins.last_mut() {
                last.push(p);
            }
        } else if document_size(&[p], errors_key) > MAX_BYTES {
            return None;
        } else {
            bins.push(vec![p]);
        }
    }
    let all: Vec<&str> = sorted.iter().map(|p| p.path.as_str()).collect();
    Some(bins.iter().map(|bin| cover(&bin.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(), &all)).collect())
}

/// Patterns that match every path of `bin` and no other path of `all`:
/// a whole first segment where the bin has all of it, else the shortest
/// text prefixes that tell its paths from the others.
fn cover(bin: &[&str], all: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let roots: BTreeSet<&str> = bin.iter().map(|p| p.split('.').next().unwrap_or(p)).collect();
    for root in roots {
        let group = |set: &[&str]| -> Vec<String> { set.iter().filter(|p| matches(root, p)).map(|p| p.to_string()).collect() };
        let (mine, every) = (group(bin), group(all));
        if mine.len() == every.len() {
            out.push(root.to_string());
        } else {
            narrow(&format!("{root}."), &mine, &every, &mut out);
        }
    }
    out
}

fn narrow(prefix: &str, mine: &[String], every: &[String], out: &mut Vec<String>) {
    let here = |set: &[String]| -> Vec<String> { set.iter().filter(|p| p.starts_with(prefix)).cloned().collect() };
    let (m, e) = (here(mine), here(every));
    if m.is_empty() {
        return;
    }
    if m.len() == e.len() {
        out.push(if m.len() == 1 && m[0] == prefix { prefix.to_string() } else { format!("{prefix}*") });
        return;
    }
    if m.iter().any(|p| p == prefix) {
        out.push(prefix.to_string());
    }
    let next: BTreeSet<char> = m.iter().filter_map(|p| p[prefix.len()..].chars().next()).collect();
    for ch in next {
        narrow(&format!("{prefix}{ch}"), &m, &e, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pattern_is_a_path_prefix_or_a_text_prefix_ending_in_a_star() {
        assert!(matches("deviceAttrib", "deviceAttrib.motorStatus"));
        assert!(matches("deviceAttrib", "deviceAttrib"));
        assert!(!matches("deviceAttrib", "deviceAttribX.a"), "a path prefix ends at a dot");
        assert!(matches("deviceData.p1*", "deviceData.p123"));
        assert!(!matches("deviceData.p1*", "deviceData.p2"));
    }

    #[test]
    fn a_split_covers_each_part_with_patterns_that_match_nothing_else() {
        let all: Vec<String> = (0..240).map(|n| format!("deviceData.p{n:03}")).chain(["deviceAttrib.a".to_string(), "deviceAttrib.b".to_string()]).collect();
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let bin: Vec<&str> = all.iter().copied().filter(|p| p.starts_with("deviceAttrib") || *p < "deviceData.p120").collect();
        let patterns = cover(&bin, &all);
        assert_eq!(patterns, vec!["deviceAttrib", "deviceData.p0*", "deviceData.p10*", "deviceData.p11*"]);
        for p in &all {
            let covered = patterns.iter().any(|x| matches(x, p));
            assert_eq!(covered, bin.contains(p), "{p}");
        }
    }
}
