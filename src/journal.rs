//! What was done to each device: its last commands, whoever sent them.
//!
//! Every [`DeviceHandle`](crate::device::DeviceHandle) carries a [`Journal`].
//! The code that produces a command's answer (the raw command adapter, the
//! shadow adapter, the console's write) records it there: where it came from,
//! its id, its outcome, how long it took and the values read back. The local
//! console shows it; nothing else reads it, and nothing in it is persisted
//! (the store keeps what "at most once" needs; this is for a person looking).
//!
//! Bounded: the last [`KEPT`] entries per device, each with at most
//! [`MAX_VALUES`] values and texts cut to [`MAX_TEXT`] characters, so a flood
//! of commands or a huge `set` costs the same memory as a quiet day.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value as Json};
use tokio::sync::watch;

use crate::device::Outcome;
use crate::point::Point;

/// Entries kept per device.
pub const KEPT: usize = 50;
/// Values kept per entry (a `get "*"` of a large device lists the first ones).
pub const MAX_VALUES: usize = 32;
/// Characters kept of an id, a reason or a value's text.
pub const MAX_TEXT: usize = 240;

/// Who asked for a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A raw command on the twin's commands topic.
    Raw,
    /// An AWS IoT shadow: a desired value or a `desired.command`.
    Shadow,
    /// A person on the local console.
    Console,
}

impl Source {
    /// The name the console shows.
    pub fn name(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Shadow => "shadow",
            Source::Console => "console",
        }
    }
}

/// One command, once it has its answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// When it was answered.
    pub at: SystemTime,
    /// Where it came from.
    pub source: Source,
    /// The login name, for a command from the console.
    pub by: Option<String>,
    /// The sender's id, as its JSON text (a shadow command's id).
    pub id: Option<String>,
    /// `set`, `get`, `desired`, a named command, ...
    pub kind: String,
    /// `succeeded`, `failed` or `rejected` (the answer's status).
    pub outcome: String,
    /// Why it failed or was refused.
    pub error: Option<String>,
    /// From the moment it was taken up to its answer.
    pub latency: Duration,
    /// (point path, value read back), as in the answer.
    pub values: Vec<(String, Json)>,
}

impl Entry {
    /// An entry from a raw command's answer document (`status`, `error`,
    /// nested `values`).
    pub fn from_answer(source: Source, id: Option<&str>, kind: &str, answer: &Json, latency: Duration) -> Entry {
        let mut values = Vec::new();
        if let Some(v) = answer.get("values").and_then(Json::as_object) {
            flatten("", v, &mut values);
        }
        Entry {
            at: SystemTime::now(),
            source,
            by: None,
            id: id.map(clip),
            kind: clip(kind),
            outcome: answer.get("status").and_then(Json::as_str).unwrap_or("unknown").to_string(),
            error: answer.get("error").and_then(Json::as_str).map(clip),
            latency,
            values,
        }
    }

    /// An entry from a device write's or read's outcome.
    pub fn from_outcome(source: Source, id: Option<&str>, kind: &str, points: &[Point], outcome: &Outcome, latency: Duration) -> Entry {
        let values = outcome
            .values
            .iter()
            .take(MAX_VALUES)
            .filter_map(|(i, v)| Some((points.get(*i)?.path.clone(), clip_json(crate::twin::json::to_json(v)))))
            .collect();
        Entry {
            at: SystemTime::now(),
            source,
            by: None,
            id: id.map(clip),
            kind: clip(kind),
            outcome: if outcome.error.is_some() { "failed" } else { "succeeded" }.to_string(),
            error: outcome.error.as_deref().map(clip),
            latency,
            values,
        }
    }

    /// An entry for a command that ran without values to show (a shadow's
    /// named or relay command): `Err` is its failure reason.
    pub fn from_result(source: Source, id: Option<&str>, kind: &str, result: &Result<(), String>, latency: Duration) -> Entry {
        Entry {
            at: SystemTime::now(),
            source,
            by: None,
            id: id.map(clip),
            kind: clip(kind),
            outcome: if result.is_ok() { "succeeded" } else { "failed" }.to_string(),
            error: result.as_ref().err().map(|e| clip(e)),
            latency,
            values: Vec::new(),
        }
    }

    /// With the login name of who asked.
    pub fn by(mut self, who: &str) -> Entry {
        self.by = Some(clip(who));
        self
    }
}

/// Nested `{"a": {"b": 1}}` → `[("a.b", 1)]`, at most [`MAX_VALUES`].
fn flatten(prefix: &str, map: &Map<String, Json>, out: &mut Vec<(String, Json)>) {
    for (k, v) in map {
        if out.len() >= MAX_VALUES {
            return;
        }
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Json::Object(inner) => flatten(&path, inner, out),
            other => out.push((clip(&path), clip_json(other.clone()))),
        }
    }
}

fn clip(text: &str) -> String {
    match text.char_indices().nth(MAX_TEXT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

fn clip_json(v: Json) -> Json {
    match v {
        Json::String(s) => Json::String(clip(&s)),
        other => other,
    }
}

/// One device's journal; clones share it.
#[derive(Clone, Debug)]
pub struct Journal {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    entries: Mutex<VecDeque<Entry>>,
    /// Counts entries ever recorded: what the console waits on.
    recorded: watch::Sender<u64>,
}

impl Default for Journal {
    fn default() -> Journal {
        Journal { shared: Arc::new(Shared { entries: Mutex::new(VecDeque::with_capacity(KEPT)), recorded: watch::Sender::new(0) }) }
    }
}

impl Journal {
    /// Adds an entry, dropping the oldest past [`KEPT`].
    pub fn record(&self, entry: Entry) {
        {
            // A poisoned lock only means a panic elsewhere; the list is still whole.
            let mut entries = self.shared.entries.lock().unwrap_or_else(PoisonError::into_inner);
            if entries.len() >= KEPT {
                entries.pop_front();
            }
            entries.push_back(entry);
        }
        self.shared.recorded.send_modify(|n| *n += 1);
    }

    /// The entries, newest first.
    pub fn recent(&self) -> Vec<Entry> {
        let entries = self.shared.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.iter().rev().cloned().collect()
    }

    /// Changes after every [`Journal::record`].
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.recorded.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_journal_keeps_the_last_fifty_newest_first() {
        let j = Journal::default();
        let mut changes = j.subscribe();
        for n in 0..60 {
            let answer = json!({"status": "succeeded", "values": {}});
            j.record(Entry::from_answer(Source::Raw, Some(&n.to_string()), "set", &answer, Duration::ZERO));
        }
        let recent = j.recent();
        assert_eq!(recent.len(), KEPT);
        assert_eq!(recent[0].id.as_deref(), Some("59"));
        assert_eq!(recent[KEPT - 1].id.as_deref(), Some("10"));
        assert!(changes.has_changed().unwrap_or(false));
        assert_eq!(*changes.borrow_and_update(), 60);
    }

    #[test]
    fn an_answer_gives_its_status_error_and_read_back_values_by_path() {
        let answer = json!({"status": "failed", "error": "writing x: no answer", "values": {"deviceAttrib": {"mode": "auto", "setpoint": 40.5}}});
        let e = Entry::from_answer(Source::Raw, Some("\"c-1\""), "set", &answer, Duration::from_millis(12));
        assert_eq!(e.outcome, "failed");
        assert_eq!(e.error.as_deref(), Some("writing x: no answer"));
        assert_eq!(e.values, vec![("deviceAttrib.mode".to_string(), json!("auto")), ("deviceAttrib.setpoint".to_string(), json!(40.5))]);
    }

    #[test]
    fn long_texts_and_many_values_are_cut() {
        let mut values = Map::new();
        for n in 0..100 {
            values.insert(format!("p{n:03}"), json!("x".repeat(1000)));
        }
        let answer = json!({"status": "succeeded", "values": values});
        let e = Entry::from_answer(Source::Raw, Some(&"i".repeat(1000)), "get", &answer, Duration::ZERO).by("ops");
        assert_eq!(e.values.len(), MAX_VALUES);
        assert_eq!(e.id.as_ref().map(|s| s.chars().count()), Some(MAX_TEXT + 1));
        assert!(e.values.iter().all(|(_, v)| v.as_str().is_some_and(|s| s.chars().count() == MAX_TEXT + 1)));
        assert_eq!(e.by.as_deref(), Some("ops"));
    }
}
