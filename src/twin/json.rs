//! Point paths and typed values ⇄ nested JSON documents.

use serde_json::{Map, Value as Json};

use crate::point::Value;

/// A typed value as JSON. Non-finite floats (a device can hold NaN) become null.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::UInt(u) => Json::from(*u),
        Value::Float(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Text(s) => Json::String(s.clone()),
    }
}

/// A JSON scalar as a typed value; objects, arrays and null are refused.
pub fn from_json(j: &Json) -> Result<Value, String> {
    match j {
        Json::Bool(b) => Ok(Value::Bool(*b)),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Value::Int(i))
            } else if let Some(u) = n.as_u64() {
                Ok(Value::UInt(u))
            } else {
                n.as_f64().map(Value::Float).ok_or_else(|| format!("{n} is not a usable number"))
            }
        }
        Json::String(s) => Ok(Value::Text(s.clone())),
        Json::Null => Err("expected a value, got null".to_string()),
        Json::Array(_) => Err("expected a value, got an array".to_string()),
        Json::Object(_) => Err("expected a value, got an object".to_string()),
    }
}

/// Inserts `value` at the dotted `path` of `doc`, creating objects on the way.
pub fn insert(doc: &mut Map<String, Json>, path: &str, value: Json) {
    let mut node = doc;
    let mut segments = path.split('.').peekable();
    while let Some(seg) = segments.next() {
        if segments.peek().is_none() {
            node.insert(seg.to_string(), value);
            return;
        }
        let entry = node.entry(seg.to_string()).or_insert_with(|| Json::Object(Map::new()));
        if !entry.is_object() {
            *entry = Json::Object(Map::new());
        }
        match entry {
            Json::Object(m) => node = m,
            _ => return,
        }
    }
}

/// Walks a nested `set` document and returns (dotted path, leaf) pairs. A
/// leaf is any value at a path in `is_point`, or any non-object.
pub fn leaves<'a>(doc: &'a Map<String, Json>, is_point: &dyn Fn(&str) -> bool) -> Vec<(String, &'a Json)> {
    let mut out = Vec::new();
    walk(doc, "", is_point, &mut out);
    out
}

fn walk<'a>(doc: &'a Map<String, Json>, prefix: &str, is_point: &dyn Fn(&str) -> bool, out: &mut Vec<(String, &'a Json)>) {
    for (k, v) in doc {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            Json::Object(m) if !is_point(&path) && !m.is_empty() => walk(m, &path, is_point, out),
            _ => out.push((path, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_paths_nest_into_one_document() {
        let mut doc = Map::new();
        insert(&mut doc, "deviceAttrib.motorStatus", json!("on"));
        insert(&mut doc, "deviceAttrib.setpoint", json!(42.5));
        insert(&mut doc, "deviceData.temperature", json!(21.5));
        assert_eq!(Json::Object(doc), json!({"deviceAttrib": {"motorStatus": "on", "setpoint": 42.5}, "deviceData": {"temperature": 21.5}}));
    }

    #[test]
    fn a_set_document_flattens_to_point_paths() {
        let doc = json!({"deviceAttrib": {"motorStatus": "on", "deep": {"x": 1}}, "top": 2});
        let Json::Object(m) = &doc else { panic!("object") };
        let mut got: Vec<(String, Json)> = leaves(m, &|p| p == "deviceAttrib.motorStatus").into_iter().map(|(p, v)| (p, v.clone())).collect();
        got.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(got, vec![
            ("deviceAttrib.deep.x".to_string(), json!(1)),
            ("deviceAttrib.motorStatus".to_string(), json!("on")),
            ("top".to_string(), json!(2)),
        ]);
    }

    #[test]
    fn non_finite_floats_become_null_and_containers_are_not_values() {
        assert_eq!(to_json(&Value::Float(f64::NAN)), Json::Null);
        assert!(from_json(&json!({"a": 1})).is_err());
        assert!(from_json(&json!([1])).is_err());
        assert_eq!(from_json(&json!(u64::MAX)), Ok(Value::UInt(u64::MAX)));
    }
}
