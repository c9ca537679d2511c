//! Reading and writing shadow documents: metadata timestamps, command ids,
//! merging and pruning `reported` fragments.

use serde_json::{Map, Value as Json};

use crate::config::shadow_document::MAX_REASON_BYTES;

/// The metadata timestamp of one leaf: `metadata.<path>.timestamp`.
pub(super) fn metadata_timestamp(metadata: &Json, path: &str) -> Option<u64> {
    let node = path.split('.').fold(metadata, |node, seg| &node[seg]);
    node["timestamp"].as_u64()
}

/// The newest `timestamp` anywhere in a metadata subtree: when the command
/// (or its last changed field) was written to `desired`.
pub(super) fn newest_timestamp(metadata: &Json) -> Option<u64> {
    match metadata {
        Json::Object(m) => {
            let own = m.get("timestamp").and_then(Json::as_u64);
            m.iter().filter(|(k, _)| k.as_str() != "timestamp").filter_map(|(_, v)| newest_timestamp(v)).chain(own).max()
        }
        Json::Array(a) => a.iter().filter_map(newest_timestamp).max(),
        _ => None,
    }
}

/// The command's own `id`, or one derived from the shadow, when it was
/// written, and its content (FNV-1a; stable across restarts and builds) —
/// never from the document version, which every update bumps.
pub(super) fn command_id(prefix: &str, element: &Json, written: Option<u64>) -> String {
    let given = element.as_object().and_then(|o| o.values().next()).and_then(|b| b.get("id")).and_then(|i| match i {
        Json::String(s) => Some(s.clone()),
        Json::Number(n) => Some(n.to_string()),
        _ => None,
    });
    if let Some(id) = given {
        return id;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{prefix}|{}|{element}", written.unwrap_or(0)).bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("auto-{hash:016x}")
}

/// Removes from `pending` every value that `newer` reports again.
pub(super) fn prune(pending: &mut Map<String, Json>, newer: &Map<String, Json>) {
    for (k, v) in newer {
        match (pending.get_mut(k), v) {
            (Some(Json::Object(a)), Json::Object(b)) => {
                prune(a, b);
                if a.is_empty() {
                    pending.remove(k);
                }
            }
            (Some(_), _) => {
                pending.remove(k);
            }
            (None, _) => {}
        }
    }
}

/// Deep merge; anything but two objects replaces.
pub(super) fn merge(into: &mut Map<String, Json>, from: Map<String, Json>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Json::Object(a)), Json::Object(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// The node at a dotted path, if every step is an object.
pub(super) fn at_path<'a>(doc: &'a Json, path: &str) -> &'a Json {
    path.split('.').fold(doc, |node, seg| &node[seg])
}

/// A refusal reason short enough for the shadow (the log has it whole):
/// at most `MAX_REASON_BYTES` as JSON text, escapes counted, which is what
/// `twinbus check` counts on when it sizes a shadow's document.
pub(super) fn short_reason(reason: &str) -> String {
    let bytes = |s: &str| Json::String(s.to_string()).to_string().len();
    if bytes(reason) <= MAX_REASON_BYTES {
        return reason.to_string();
    }
    let mut s = String::new();
    for ch in reason.chars() {
        s.push(ch);
        if bytes(&s) + '…'.len_utf8() > MAX_REASON_BYTES {
            s.pop();
            break;
        }
    }
    s.push('…');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_derived_command_id_depends_on_content_and_write_time_not_on_version() {
        let cmd = json!({"relay-command": {"message": "hi", "topic": "t", "ttl": 300}});
        let a = command_id("$aws/things/x/shadow", &cmd, Some(100));
        assert_eq!(a, command_id("$aws/things/x/shadow", &cmd, Some(100)), "stable");
        assert_ne!(a, command_id("$aws/things/x/shadow", &cmd, Some(101)), "a new write is a new command");
        assert_ne!(a, command_id("$aws/things/y/shadow", &cmd, Some(100)), "per shadow");
        let with_id = json!({"relay-command": {"id": "c-9", "message": "hi"}});
        assert_eq!(command_id("p", &with_id, Some(1)), "c-9");
    }

    #[test]
    fn the_newest_metadata_timestamp_is_when_a_command_was_written() {
        let m = json!({"relay-command": {"message": {"timestamp": 100}, "ttl": {"timestamp": 150}}});
        assert_eq!(newest_timestamp(&m), Some(150));
        assert_eq!(newest_timestamp(&json!(null)), None);
    }

    #[test]
    fn a_later_report_supersedes_what_a_refused_one_would_send_again() {
        let object = |v: Json| v.as_object().cloned().unwrap_or_default();
        let mut pending = object(json!({"deviceAttrib": {"speed": 30, "mode": "auto"}, "command": {"c-1": {"state": "RUNNING"}}}));
        let newer = object(json!({"deviceAttrib": {"speed": 40}, "command": {"c-1": {"state": "SUCCESS"}}}));
        prune(&mut pending, &newer);
        assert_eq!(Json::Object(pending), json!({"deviceAttrib": {"mode": "auto"}}));
    }

    #[test]
    fn a_long_reason_is_cut_at_a_character_boundary_within_its_json_bytes() {
        let long = "é\"".repeat(MAX_REASON_BYTES);
        let short = short_reason(&long);
        assert!(Json::String(short.clone()).to_string().len() <= MAX_REASON_BYTES, "{short}");
        assert!(short.ends_with('…'));
        assert_eq!(short_reason("fine"), "fine");
    }
}
