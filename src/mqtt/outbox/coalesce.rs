//! How a newer message joins one still waiting on the same topic.
//!
//! When a connection is held at its publish limit, what waits grows by one
//! document per poll per device, and the answers behind it wait with it. A
//! shadow report or a telemetry document that has not left yet can instead
//! take in a newer one on its topic: the backlog stays one document per
//! topic, nothing goes out of order within a topic, and the cloud still gets
//! the newest values. Intermediate readings merged this way are not sent;
//! the connection counts and logs every merge, so it is never silent.

use bytes::Bytes;
use serde_json::{Map, Value as Json};

/// How a message may join one waiting on its topic (set by its producer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coalesce {
    /// It says everything: it replaces the waiting one (a full telemetry
    /// document, a change of health).
    Replace,
    /// It says what changed: it is merged into the waiting one, its values
    /// winning (a telemetry change document, a shadow report of values).
    Merge,
}

/// The message that goes out in place of `waiting` and `newer`, or `None`
/// when they cannot be joined (not JSON objects): then both go.
pub(crate) fn join(waiting: &[u8], newer: &[u8], how: Coalesce) -> Option<Bytes> {
    match how {
        Coalesce::Replace => Some(Bytes::copy_from_slice(newer)),
        Coalesce::Merge => {
            let Ok(Json::Object(mut into)) = serde_json::from_slice::<Json>(waiting) else { return None };
            let Ok(Json::Object(from)) = serde_json::from_slice::<Json>(newer) else { return None };
            merge(&mut into, from);
            serde_json::to_vec(&Json::Object(into)).ok().map(Bytes::from)
        }
    }
}

/// Deep merge: objects merge, anything else (`null` included, which a
/// shadow report uses to delete a key) replaces.
fn merge(into: &mut Map<String, Json>, from: Map<String, Json>) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(Json::Object(a)), Json::Object(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn joined(a: Json, b: Json, how: Coalesce) -> Option<Json> {
        join(a.to_string().as_bytes(), b.to_string().as_bytes(), how).map(|b| serde_json::from_slice(&b).expect("JSON"))
    }

    #[test]
    fn a_change_merges_into_the_waiting_document_and_its_values_win() {
        let full = json!({"time": 1, "online": true, "deviceData": {"a": 1, "b": 2}});
        let change = json!({"time": 2, "online": true, "deviceData": {"a": 3}});
        assert_eq!(joined(full, change, Coalesce::Merge), Some(json!({"time": 2, "online": true, "deviceData": {"a": 3, "b": 2}})));
    }

    #[test]
    fn a_shadow_report_keeps_nulls_and_the_newer_client_token() {
        let a = json!({"state": {"reported": {"x": 1, "twinbus": {"errors": {"x": "bad"}}}}, "clientToken": "t1"});
        let b = json!({"state": {"reported": {"y": 2, "twinbus": {"errors": {"x": null}}}}, "clientToken": "t2"});
        assert_eq!(
            joined(a, b, Coalesce::Merge),
            Some(json!({"state": {"reported": {"x": 1, "y": 2, "twinbus": {"errors": {"x": null}}}}, "clientToken": "t2"}))
        );
    }

    #[test]
    fn a_full_document_replaces_and_what_is_not_json_is_not_merged() {
        assert_eq!(joined(json!({"a": 1}), json!({"b": 2}), Coalesce::Replace), Some(json!({"b": 2})));
        assert_eq!(join(b"not json", b"{}", Coalesce::Merge), None);
        assert_eq!(join(b"[1]", b"{}", Coalesce::Merge), None);
    }
}
