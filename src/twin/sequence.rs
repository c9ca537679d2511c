//! Named commands: a configured sequence of point writes, waits and checks.
//!
//! A cloud runs one by name with typed arguments (from a shadow's
//! `desired.command`). Arguments are checked against their declared type and
//! range, then every value still goes through the point's own checks, so a
//! command can never write what a direct write could not. The first failing
//! step ends the command with its reason; nothing after it runs.

use serde_json::{Map, Value as Json};

use super::json::from_json;
use crate::config::{ArgKind, CommandDef, Step, StepValue};
use crate::device::DeviceHandle;
use crate::point::{Encoded, Point, Value};

/// Fields of a command body that are not arguments.
const RESERVED: &[&str] = &["id", "ttl", "response_topic"];

/// Checks the arguments, then runs the steps. `Err` is the FAILURE reason.
pub(super) async fn run(def: &CommandDef, body: &Json, device: &DeviceHandle) -> Result<(), String> {
    let args = check_args(def, body)?;
    for (n, step) in def.steps.iter().enumerate() {
        match step {
            Step::Set(values) => {
                let mut writes: Vec<(usize, Encoded)> = Vec::new();
                for (i, v) in values {
                    let point = &device.points[*i];
                    let value = resolve(v, &args)?;
                    let enc = point.encode(&value).map_err(|e| format!("step {n}: {}: {e}", point.path))?;
                    writes.push((*i, enc));
                }
                let outcome = device.write(writes).await;
                if let Some(e) = outcome.error {
                    return Err(format!("step {n}: {e}"));
                }
            }
            Step::Wait(d) => tokio::time::sleep(*d).await,
            Step::Check(expected) => {
                let indices: Vec<usize> = expected.iter().map(|(i, _)| *i).collect();
                let outcome = device.read(indices).await;
                if let Some(e) = outcome.error {
                    return Err(format!("step {n}: {e}"));
                }
                for (i, v) in expected {
                    let point = &device.points[*i];
                    let want = resolve(v, &args)?;
                    let got = outcome.values.iter().find(|(j, _)| j == i).map(|(_, v)| v);
                    match got {
                        Some(got) if matches(point, &want, got) => {}
                        Some(got) => return Err(format!("step {n}: check failed: {} is {got}, expected {want}", point.path)),
                        None => return Err(format!("step {n}: check failed: {} could not be read", point.path)),
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_args(def: &CommandDef, body: &Json) -> Result<Map<String, Json>, String> {
    let empty = Map::new();
    let given = body.as_object().unwrap_or(&empty);
    if let Some(unknown) = given.keys().find(|k| !RESERVED.contains(&k.as_str()) && !def.args.iter().any(|a| &a.name == *k)) {
        let known: Vec<&str> = def.args.iter().map(|a| a.name.as_str()).collect();
        return Err(format!("unknown argument {unknown:?} (arguments of {}: {})", def.name, known.join(", ")));
    }
    let mut args = Map::new();
    for a in &def.args {
        let v = given.get(&a.name).ok_or_else(|| format!("missing argument {:?}", a.name))?;
        let ok = match a.kind {
            ArgKind::Number => v.as_f64().is_some_and(|x| a.min.is_none_or(|m| x >= m) && a.max.is_none_or(|m| x <= m)),
            ArgKind::Bool => v.is_boolean(),
            ArgKind::String => v.is_string(),
        };
        if !ok {
            let range = match (a.min, a.max) {
                (Some(lo), Some(hi)) => format!(" from {lo} to {hi}"),
                (Some(lo), None) => format!(" of at least {lo}"),
                (None, Some(hi)) => format!(" of at most {hi}"),
                (None, None) => String::new(),
            };
            let kind = match a.kind {
                ArgKind::Number => "number",
                ArgKind::Bool => "bool",
                ArgKind::String => "string",
            };
            return Err(format!("argument {:?} must be a {kind}{range}; got {v}", a.name));
        }
        args.insert(a.name.clone(), v.clone());
    }
    Ok(args)
}

fn resolve(v: &StepValue, args: &Map<String, Json>) -> Result<Value, String> {
    match v {
        StepValue::Literal(v) => Ok(v.clone()),
        StepValue::Arg(name) => args.get(name).ok_or_else(|| format!("missing argument {name:?}")).and_then(from_json),
    }
}

/// Equal, or for numbers within half a step of the point's resolution.
fn matches(point: &Point, want: &Value, got: &Value) -> bool {
    match (want.as_f64(), got.as_f64(), want, got) {
        (_, _, Value::Text(a), Value::Text(b)) => a == b,
        (Some(a), Some(b), _, _) => {
            let step = if point.scale != 1.0 { point.scale.abs() / 2.0 } else { 0.0 };
            (a - b).abs() <= step.max(1e-6 * a.abs().max(b.abs()).max(1.0))
        }
        _ => want == got,
    }
}
