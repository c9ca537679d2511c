//! The raw command-response protocol (OCI IoT style), as pure functions.
//!
//! A command is a JSON object on the device's commands topic:
//! `{"id": "c-42", "set": {"deviceAttrib": {"motorStatus": "on"}}}`,
//! `{"id": "c-43", "get": ["deviceAttrib.motorStatus"]}` (or `"get": "*"`), or
//! `{"shutdown": true}`. Every payload gets exactly one answer on the
//! responses topic, including payloads that are not JSON at all:
//! `{"status": "succeeded" | "failed" | "rejected", "time", "id", "values",
//! "errors", "error"}`. `rejected` means nothing was written.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value as Json};

use super::json::{from_json, insert, leaves, to_json};
use crate::point::{Encoded, Point, Value};

/// Largest command accepted, as in OCI IoT.
pub const MAX_COMMAND_BYTES: usize = 256 * 1024;
/// Longest `id` echoed in answers.
pub const MAX_ID_BYTES: usize = 256;
/// Most per-field errors in one answer; a command with more gets a count.
const MAX_ERRORS: usize = 20;
/// Known points listed in an "unknown point" reason.
const MAX_LISTED: usize = 20;
/// The key under which `cap` says how many more fields are invalid.
const MORE: &str = "...";

/// What a command asks for, after parsing (not yet checked against points).
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// Write these leaves (dotted path, JSON value).
    Set(Vec<(String, Json)>),
    /// Read these paths (`None` = every readable point).
    Get(Option<Vec<String>>),
    /// Stop the gateway.
    Shutdown,
}

impl Request {
    /// `set`, `get` or `shutdown`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Set(_) => "set",
            Request::Get(_) => "get",
            Request::Shutdown => "shutdown",
        }
    }
}

/// A parsed command: its id (echoed in the answer) and what it asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// The sender's id (string or number).
    pub id: Option<Json>,
    /// The id exactly as its JSON text, which is what identifies a command:
    /// `7`, `7.0` and `"7"` are three ids, and a number too large for a u64
    /// is neither rounded nor merged with its neighbours. Answers echo it.
    pub id_text: Option<String>,
    /// The request, or why the payload is not a valid command.
    pub request: Result<Request, String>,
}

/// Reads only the `id` of a command, as its raw JSON text.
#[derive(serde::Deserialize)]
struct IdProbe<'a> {
    #[serde(borrow, default)]
    id: Option<&'a serde_json::value::RawValue>,
}

/// Parses a payload. Never fails: a bad payload becomes a command whose
/// request is the reason it will be rejected.
pub fn parse(payload: &[u8]) -> Command {
    let reject = |why: String| Command { id: None, id_text: None, request: Err(why) };
    if payload.is_empty() {
        return reject(r#"the payload is empty; send a JSON object such as {"id":"1","get":"*"}"#.to_string());
    }
    if payload.len() > MAX_COMMAND_BYTES {
        // Refused unparsed, but with its id when one can be read (the link
        // hands over payloads up to 1 MiB), so the cloud knows which it was.
        let mut cmd = too_large(payload.len());
        if let Some((id, id_text)) = std::str::from_utf8(payload).ok().and_then(id_of) {
            (cmd.id, cmd.id_text) = (Some(id), Some(id_text));
        }
        return cmd;
    }
    let Ok(text) = std::str::from_utf8(payload) else {
        return reject("the payload is binary (not UTF-8 text); commands are JSON objects".to_string());
    };
    let doc: Json = match serde_json::from_str(text) {
        Ok(doc) => doc,
        Err(e) => return reject(format!("the payload is not valid JSON: {e}")),
    };
    // serde_json keeps the last of two equal keys; a command that says two
    // things about one point must not have one of them chosen silently.
    if let Some(key) = duplicate_key(text) {
        let shown: String = key.chars().flat_map(char::escape_debug).take(100).collect();
        return reject(format!("the key \"{shown}\" appears twice in one object; send each key once"));
    }
    let Json::Object(obj) = doc else {
        return reject(r#"a command is a JSON object with "set", "get" or "shutdown""#.to_string());
    };
    let id = obj.get("id").cloned();
    if let Some(id) = &id {
        if !(id.is_string() || id.is_number()) {
            return reject("\"id\" must be a string or a number".to_string());
        }
        if id.as_str().is_some_and(|s| s.len() > MAX_ID_BYTES) {
            // Not echoed: an answer must stay small whatever was sent.
            return reject(format!("\"id\" is longer than {MAX_ID_BYTES} bytes"));
        }
    }
    let id_text = match serde_json::from_str::<IdProbe>(text) {
        Ok(probe) => probe.id.map(|raw| raw.get().to_string()),
        Err(_) => return reject("the command has \"id\" more than once".to_string()),
    };
    if id_text.as_ref().is_some_and(|t| t.len() > MAX_ID_BYTES) {
        return reject(format!("\"id\" is longer than {MAX_ID_BYTES} bytes"));
    }
    let with_id = |request| Command { id: id.clone(), id_text: id_text.clone(), request };
    if let Some(unknown) = obj.keys().find(|k| !["id", "set", "get", "shutdown"].contains(&k.as_str())) {
        return with_id(Err(format!("unknown field {unknown:?} (valid: id, set, get, shutdown)")));
    }
    let asked: Vec<&str> = ["set", "get", "shutdown"].into_iter().filter(|k| obj.contains_key(*k)).collect();
    let request = match asked.as_slice() {
        ["set"] => match &obj["set"] {
            Json::Object(m) if !m.is_empty() => {
                Ok(Request::Set(leaves(m, &|_| false).into_iter().map(|(p, v)| (p, v.clone())).collect()))
            }
            _ => Err(r#""set" must be a non-empty object of point values, e.g. {"deviceAttrib":{"motorStatus":"on"}}"#.to_string()),
        },
        ["get"] => match &obj["get"] {
            Json::String(s) if s == "*" => Ok(Request::Get(None)),
            Json::String(s) => Ok(Request::Get(Some(vec![s.clone()]))),
            Json::Array(items) if !items.is_empty() => items
                .iter()
                .map(|i| i.as_str().map(str::to_string).ok_or_else(|| "\"get\" lists point paths as strings".to_string()))
                .collect::<Result<Vec<_>, _>>()
                .map(|v| Request::Get(Some(v))),
            _ => Err(r#""get" must be "*", a point path, or a list of point paths"#.to_string()),
        },
        ["shutdown"] => match obj["shutdown"] {
            Json::Bool(true) => Ok(Request::Shutdown),
            _ => Err(r#""shutdown" must be true"#.to_string()),
        },
        [] => Err(r#"the command has none of "set", "get" or "shutdown""#.to_string()),
        _ => Err(format!("the command has {} at once; send one per command", asked.join(" and "))),
    };
    with_id(request)
}

/// The id of a command too large to handle: its JSON and its exact text,
/// when it is one a command could have (a string or a number, not too long).
fn id_of(text: &str) -> Option<(Json, String)> {
    // Only an object has an id (a struct would also read `[1]` by position).
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let raw = serde_json::from_str::<IdProbe>(text).ok()?.id?;
    let id: Json = serde_json::from_str(raw.get()).ok()?;
    let fits = (id.is_string() || id.is_number()) && raw.get().len() <= MAX_ID_BYTES;
    fits.then(|| (id, raw.get().to_string()))
}

/// The first key found twice in one JSON object of `text`, if any.
fn duplicate_key(text: &str) -> Option<String> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use std::collections::HashSet;

    /// Walks any JSON value; yields the first key seen twice in an object.
    struct Walk;
    impl<'de> Visitor<'de> for Walk {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            let (mut seen, mut found) = (HashSet::new(), None);
            while let Some(key) = map.next_key::<String>()? {
                let inner = map.next_value_seed(Walk)?;
                if found.is_none() {
                    found = if seen.contains(&key) { Some(key.clone()) } else { inner };
                }
                seen.insert(key);
            }
            Ok(found)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<String>, A::Error> {
            let mut found = None;
            while let Some(inner) = seq.next_element_seed(Walk)? {
                found = found.or(inner);
            }
            Ok(found)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Option<String>, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Option<String>, E> {
            Ok(None)
        }
    }
    impl<'de> DeserializeSeed<'de> for Walk {
        type Value = Option<String>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
            d.deserialize_any(Walk)
        }
    }
    serde_json::Deserializer::from_str(text).deserialize_any(Walk).ok().flatten()
}

/// A command of `bytes` bytes, over the limit: refused unread, so without
/// its id (the connection may not even have read it: see `mqtt::Message`).
pub fn too_large(bytes: usize) -> Command {
    Command { id: None, id_text: None, request: Err(format!("the payload is {bytes} bytes; the limit is {MAX_COMMAND_BYTES} bytes")) }
}

/// Checks every leaf of a `set` against the points; either all of them are
/// valid and encoded, or nothing is written and each bad one has a reason.
pub fn check_set(points: &[Point], leaves: &[(String, Json)]) -> Result<Vec<(usize, Encoded)>, BTreeMap<String, String>> {
    let mut writes = Vec::new();
    let mut errors = BTreeMap::new();
    for (path, raw) in leaves {
        let Some(i) = points.iter().position(|p| &p.path == path) else {
            errors.insert(path.clone(), unknown_point(points, path));
            continue;
        };
        if writes.iter().any(|(j, _)| *j == i) {
            errors.insert(path.clone(), "is given more than once".to_string());
            continue;
        }
        match from_json(raw).and_then(|v| points[i].encode(&v)) {
            Ok(enc) => writes.push((i, enc)),
            Err(e) => {
                errors.insert(path.clone(), e);
            }
        }
    }
    if errors.is_empty() {
        Ok(writes)
    } else {
        Err(cap(errors))
    }
}

/// Resolves the paths of a `get` to readable points (`None` = all readable).
pub fn check_get(points: &[Point], paths: Option<&[String]>) -> Result<Vec<usize>, BTreeMap<String, String>> {
    let Some(paths) = paths else {
        return Ok((0..points.len()).filter(|&i| points[i].access.readable()).collect());
    };
    let mut found = Vec::new();
    let mut errors = BTreeMap::new();
    for path in paths {
        // A group path ("deviceAttrib") reads every readable point under it.
        let prefix = format!("{path}.");
        let matches: Vec<usize> = (0..points.len()).filter(|&i| points[i].path == *path || points[i].path.starts_with(&prefix)).collect();
        if matches.is_empty() {
            errors.insert(path.clone(), unknown_point(points, path));
        } else if matches.iter().all(|&i| !points[i].access.readable()) {
            errors.insert(path.clone(), "the point is write-only".to_string());
        } else {
            found.extend(matches.into_iter().filter(|&i| points[i].access.readable()));
        }
    }
    found.sort_unstable();
    found.dedup();
    if errors.is_empty() {
        Ok(found)
    } else {
        Err(cap(errors))
    }
}

fn unknown_point(points: &[Point], path: &str) -> String {
    let prefix = format!("{path}.");
    let under: Vec<&str> = points.iter().filter(|p| p.path.starts_with(&prefix)).map(|p| p.path.as_str()).collect();
    if !under.is_empty() {
        return format!("is a group of points ({}), not a point", under.join(", "));
    }
    let known: Vec<&str> = points.iter().map(|p| p.path.as_str()).take(MAX_LISTED).collect();
    let more = if points.len() > MAX_LISTED { ", ..." } else { "" };
    format!("unknown point (known: {}{more})", known.join(", "))
}

/// Keeps an answer's error map small: the first `MAX_ERRORS` entries, and
/// one more that says how many were left out.
fn cap(mut errors: BTreeMap<String, String>) -> BTreeMap<String, String> {
    if errors.len() > MAX_ERRORS {
        let extra = errors.len() - MAX_ERRORS;
        let kept: BTreeMap<String, String> = std::mem::take(&mut errors).into_iter().take(MAX_ERRORS).collect();
        errors = kept;
        errors.insert(MORE.to_string(), format!("{extra} more fields are invalid"));
    }
    errors
}

/// The outcome of a command, ready to be answered.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Done; values are what the device holds now.
    Succeeded,
    /// Tried, and the device or the line failed; values are what could be read.
    Failed(String),
    /// Refused before anything was written.
    Rejected(String),
    /// Received, not executed yet (the optional early answer).
    Acknowledged,
}

/// Builds an answer document.
pub fn answer(id: Option<&Json>, status: &Status, values: &[(&str, &Value)], errors: &BTreeMap<String, String>, time_ms: u64) -> Json {
    let mut doc = Map::new();
    let (name, error) = match status {
        Status::Succeeded => ("succeeded", None),
        Status::Failed(e) => ("failed", Some(e)),
        Status::Rejected(e) => ("rejected", Some(e)),
        Status::Acknowledged => ("acknowledged", None),
    };
    doc.insert("status".into(), json!(name));
    doc.insert("time".into(), json!(time_ms));
    if let Some(id) = id {
        doc.insert("id".into(), id.clone());
    }
    if !values.is_empty() {
        let mut nested = Map::new();
        for (path, v) in values {
            insert(&mut nested, path, to_json(v));
        }
        doc.insert("values".into(), Json::Object(nested));
    }
    if !errors.is_empty() {
        doc.insert("errors".into(), json!(errors));
    }
    if let Some(e) = error {
        doc.insert("error".into(), json!(e));
    }
    Json::Object(doc)
}

/// An answer as bytes, with the id exactly as the command wrote it (a JSON
/// value cannot hold `7.50` or a number beyond a u64 unchanged).
pub fn render(doc: &Json, id_text: Option<&str>) -> Vec<u8> {
    struct WithRawId<'a>(&'a Map<String, Json>, &'a serde_json::value::RawValue);
    impl serde::Serialize for WithRawId<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut map = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in self.0 {
                if k == "id" {
                    map.serialize_entry(k, self.1)?;
                } else {
                    map.serialize_entry(k, v)?;
                }
            }
            map.end()
        }
    }
    let raw = id_text.and_then(|t| serde_json::value::RawValue::from_string(t.to_string()).ok());
    match (doc, raw) {
        (Json::Object(m), Some(raw)) if m.contains_key("id") => serde_json::to_vec(&WithRawId(m, &raw)).unwrap_or_else(|_| doc.to_string().into_bytes()),
        _ => doc.to_string().into_bytes(),
    }
}

/// The one-line summary of per-field errors.
pub fn summary(errors: &BTreeMap<String, String>) -> String {
    // A capped map counts the fields it left out under MORE ("21 more ..."),
    // and that entry is no field to lead with ("..." sorts first).
    let more = errors.get(MORE).and_then(|m| m.split(' ').next()?.parse::<usize>().ok()).unwrap_or(0);
    let mut fields = errors.iter().filter(|(p, _)| p.as_str() != MORE);
    let n = fields.clone().count() + more;
    let first = fields.next().map(|(p, e)| format!("{p}: {e}")).unwrap_or_default();
    if n == 1 {
        format!("nothing was written: {first}")
    } else {
        format!("nothing was written: {n} fields are invalid ({first}; ...)")
    }
}

#[cfg(test)]
mod tests;
