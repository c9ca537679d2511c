//! What the fuzz targets check, kept apart from libFuzzer so that
//! `tests/fuzz_corpus.rs` replays every checked-in corpus file through the
//! same checks in a plain `cargo test` (it includes this file by path, so it
//! uses nothing but `twinbus`, `serde_json` and `std`).
//!
//! Three targets, each a function from bytes that panics when a property
//! does not hold:
//! - [`command`]: raw bytes as a command payload → `parse` → `check_set` /
//!   `check_get` against the device of `tests/bad_input/profile.yaml`, then
//!   the answer rendered. Any write accepted is to a configured writable
//!   point, once, and decodes back to exactly what was asked, within the
//!   point's limits; nothing is accepted for read-only or unknown points.
//! - [`write`]: bytes → one point described in YAML (any table, type, order,
//!   scale, offset, labels, access, limits) → `Config::parse` → if accepted,
//!   the config's invariants, then values as JSON text through the command
//!   path and as typed values straight into `Point::encode`, with the same
//!   oracle; every limit the config accepted can itself be written.
//! - [`config`]: any bytes → `Config::parse` is `Ok` with the invariants of
//!   a valid configuration, or an error that names the file.
//! - [`delta`]: bytes → a few shadow messages (deltas, `get` answers, ...)
//!   → the shadow adapter's state machine, serving the rich device's shadow.
//!   Every write it asks for is to a writable point and decodes to a value
//!   the point admits; it never loops.
//!
//! The oracle does not borrow the codec's comparisons: numbers are compared
//! exactly here, integers as integers and floats against integers by their
//! exact values.
#![allow(clippy::float_cmp)]

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use serde_json::Value as Json;
use twinbus::config::{Config, ConfigError, Device, Transport};
use twinbus::point::{DataType, Encoded, Number, Point, Table, Value};
use twinbus::twin::command::{answer, check_get, check_set, parse, render, summary, Request, Status, MAX_COMMAND_BYTES, MAX_ID_BYTES};
use twinbus::twin::json::from_json;
use twinbus::twin::shadow_replay;

/// Runs the target named `name` on `data` (for the corpus replay).
pub fn run(name: &str, data: &[u8]) {
    match name {
        "command" => command(data),
        "write" => write(data),
        "config" => config(data),
        "delta" => delta(data),
        other => panic!("no fuzz target named {other:?}"),
    }
}

/// The targets, by name.
pub const TARGETS: &[&str] = &["command", "write", "config", "delta"];

// ---------------------------------------------------------------------------
// command

/// The device the `command` target and the bad-input corpus write to.
pub const PROFILE: &str = include_str!("../../tests/bad_input/profile.yaml");

/// The points of the rich device (`tests/bad_input/profile.yaml`).
pub fn rich_points() -> &'static [Point] {
    static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let yaml = format!("{PROFILE}\nbuses:\n  b: {{ tcp: {{ host: 127.0.0.1 }} }}\ndevices:\n  d: {{ bus: b, unit: 1, profile: rich }}\n");
        match Config::parse(&yaml, Path::new("profile.yaml")) {
            Ok(c) => c.devices[0].points.to_vec(),
            Err(e) => panic!("tests/bad_input/profile.yaml is not a valid profile: {e}"),
        }
    })
}

/// A command payload against the rich device.
pub fn command(data: &[u8]) {
    check_command(rich_points(), data);
}

/// Parses `data` as a command and checks what would be written or read.
pub fn check_command(points: &[Point], data: &[u8]) {
    let cmd = parse(data);
    if data.is_empty() || std::str::from_utf8(data).is_err() {
        assert!(cmd.request.is_err() && cmd.id.is_none(), "an empty or binary payload must be refused without an id: {cmd:?}");
    }
    if data.len() > MAX_COMMAND_BYTES {
        assert!(cmd.request.as_ref().is_err_and(|why| why.contains("the limit is")), "an oversized payload must be refused by its size: {cmd:?}");
    }
    if let Some(text) = &cmd.id_text {
        assert!(text.len() <= MAX_ID_BYTES, "an id longer than {MAX_ID_BYTES} bytes is kept: {} bytes", text.len());
        let id: Json = serde_json::from_str(text).unwrap_or_else(|e| panic!("the id text {text:?} is not JSON: {e}"));
        assert!(id.is_string() || id.is_number(), "an id that is neither a string nor a number is kept: {text}");
    }
    match &cmd.request {
        Ok(Request::Set(leaves)) => {
            assert!(!leaves.is_empty(), "a set with nothing in it was accepted: {cmd:?}");
            match check_set(points, leaves) {
                Ok(writes) => {
                    assert_eq!(writes.len(), leaves.len(), "every leaf is written, or nothing is: {leaves:?} → {writes:?}");
                    let mut seen = Vec::new();
                    for (i, encoded) in &writes {
                        let p = &points[*i];
                        assert!(!seen.contains(i), "{} is written twice in one command", p.path);
                        seen.push(*i);
                        let leaf: Vec<&Json> = leaves.iter().filter(|(path, _)| *path == p.path).map(|(_, v)| v).collect();
                        assert_eq!(leaf.len(), 1, "{} written for leaves {leaves:?}", p.path);
                        let asked = from_json(leaf[0]).unwrap_or_else(|e| panic!("{}: {} was written, but it is no value: {e}", p.path, leaf[0]));
                        check_accepted(p, &asked, encoded);
                    }
                }
                Err(errors) => {
                    assert!(!errors.is_empty(), "refused without a reason: {leaves:?}");
                    for (path, why) in &errors {
                        assert!(path == "..." || leaves.iter().any(|(p, _)| p == path), "a reason for a field not asked: {path}");
                        check_reason(path, why);
                    }
                    // The summary counts every bad field, also past the cap on listed ones.
                    let listed = errors.keys().filter(|k| *k != "...").count();
                    let more = errors.get("...").and_then(|m| m.split(' ').next()?.parse::<usize>().ok()).unwrap_or(0);
                    let (total, said) = (listed + more, summary(&errors));
                    assert!(said.starts_with("nothing was written: "), "{said}");
                    assert!(total == 1 || said.contains(&format!(": {total} fields are invalid (")), "{total} fields are invalid, the summary says: {said}");
                    assert!(!said.contains("(...:"), "the summary leads with the cap: {said}");
                }
            }
        }
        Ok(Request::Get(paths)) => match check_get(points, paths.as_deref()) {
            Ok(indices) => {
                for i in indices {
                    assert!(points[i].access.readable(), "a get reads the write-only point {}", points[i].path);
                }
            }
            Err(errors) => {
                assert!(!errors.is_empty());
                for (path, why) in &errors {
                    check_reason(path, why);
                }
            }
        },
        Ok(Request::Shutdown) => {}
        Err(why) => check_reason("(command)", why),
    }
    // The answer carries the id exactly as sent, and is JSON.
    let status = match &cmd.request {
        Ok(_) => Status::Succeeded,
        Err(why) => Status::Rejected(why.clone()),
    };
    let doc = answer(cmd.id.as_ref(), &status, &[], &BTreeMap::new(), 1);
    let bytes = render(&doc, cmd.id_text.as_deref());
    let back: Json = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("the answer is not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    assert!(back["status"].is_string());
    if let Some(text) = &cmd.id_text {
        let echoed = format!("\"id\":{text}");
        assert!(String::from_utf8_lossy(&bytes).contains(&echoed), "the id is not echoed as sent ({echoed}): {}", String::from_utf8_lossy(&bytes));
    }
}

/// A refusal is said in words, never as a codec's internal error.
fn check_reason(what: &str, why: &str) {
    assert!(!why.trim().is_empty(), "{what}: an empty reason");
    assert!(!why.contains("internal"), "{what}: a refusal from inside the codec (a bug, even if nothing was written): {why}");
}

// ---------------------------------------------------------------------------
// The write oracle

/// A number compared exactly.
#[derive(Clone, Copy, Debug)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn of(v: &Value) -> Option<Num> {
        match *v {
            Value::Int(i) => Some(Num::Int(i.into())),
            Value::UInt(u) => Some(Num::Int(u.into())),
            Value::Float(f) => Some(Num::Float(f)),
            _ => None,
        }
    }

    fn limit(n: Number) -> Num {
        match n {
            Number::Int(i) => Num::Int(i),
            Number::Float(f) => Num::Float(f),
        }
    }

    fn f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    /// Exact order; `None` with a NaN.
    fn cmp(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (Num::Float(a), Num::Float(b)) => a.partial_cmp(&b),
            (Num::Int(_), Num::Float(_)) => other.cmp(self).map(Ordering::reverse),
            (Num::Float(f), Num::Int(i)) => {
                if f.is_nan() {
                    return None;
                }
                // Beyond every i128 either way (and infinities).
                if f >= 1.7e38 {
                    return Some(Ordering::Greater);
                }
                if f <= -1.7e38 {
                    return Some(Ordering::Less);
                }
                // The floor of a float below 2^127 is an integer float, exactly an i128.
                let floor = f.floor();
                Some(match (floor as i128).cmp(&i) {
                    Ordering::Equal if f > floor => Ordering::Greater,
                    o => o,
                })
            }
        }
    }

    fn eq(self, other: Num) -> bool {
        self.cmp(other) == Some(Ordering::Equal)
    }
}

/// Whether `x` passes the point's min, max and allowed, compared exactly.
fn admits(p: &Point, x: Num) -> bool {
    let above_min = p.min.is_none_or(|m| matches!(x.cmp(Num::limit(m)), Some(Ordering::Greater | Ordering::Equal)));
    let below_max = p.max.is_none_or(|m| matches!(x.cmp(Num::limit(m)), Some(Ordering::Less | Ordering::Equal)));
    let allowed = p.allowed.is_empty() || p.allowed.iter().any(|a| x.eq(Num::limit(*a)));
    above_min && below_max && allowed
}

fn is_bitwise(p: &Point) -> bool {
    p.location.table.is_bits() || p.location.bit.is_some() || p.data_type == DataType::Bool
}

fn is_scaled(p: &Point) -> bool {
    p.scale != 1.0 || p.offset != 0.0
}

fn int_range(t: DataType) -> Option<(i128, i128)> {
    Some(match t {
        DataType::U16 => (0, 65_535),
        DataType::I16 => (-32_768, 32_767),
        DataType::U32 => (0, 4_294_967_295),
        DataType::I32 => (-2_147_483_648, 2_147_483_647),
        DataType::U64 => (0, 18_446_744_073_709_551_615),
        DataType::I64 => (-9_223_372_036_854_775_808, 9_223_372_036_854_775_807),
        _ => return None,
    })
}

const TWO_53: f64 = 9_007_199_254_740_992.0;

/// The f32 nearest to a number (an integer rounded once, not through an f64).
fn nearest_f32(n: Num) -> f32 {
    match n {
        Num::Int(i) => i as f32,
        Num::Float(f) => f as f32,
    }
}

/// Checks one write the codec accepted: the point may be written, the
/// registers have the point's shape, and they read back as what was asked,
/// within the limits.
fn check_accepted(p: &Point, asked: &Value, encoded: &Encoded) {
    let name = &p.path;
    assert!(p.access.writable(), "{name}: the point is not writable, yet {asked:?} was accepted as {encoded:?}");
    assert!(p.location.table.is_writable(), "{name}: a {} was written: {encoded:?}", p.location.table.name());
    let held = match (encoded, p.location.table, p.location.bit) {
        (Encoded::Bits(bits), Table::Coil, None) => {
            assert_eq!(bits.len(), 1, "{name}: one coil, {bits:?}");
            p.decode_bits(bits)
        }
        (Encoded::RegisterBit { bit, value }, Table::HoldingRegister, Some(b)) => {
            assert_eq!(*bit, b, "{name}: the wrong bit");
            p.decode_words(&[u16::from(*value) << bit])
        }
        (Encoded::Words(words), Table::HoldingRegister, None) => {
            assert_eq!(words.len(), usize::from(p.data_type.registers()), "{name}: {words:?} for a {}", p.data_type.name());
            p.decode_words(words)
        }
        (other, table, bit) => panic!("{name}: {other:?} for a {} (bit {bit:?})", table.name()),
    };
    let held = held.unwrap_or_else(|e| panic!("{name}: {encoded:?} does not decode: {e}"));
    // A failure names the point, the value, the registers and their reading.
    macro_rules! fail {
        ($($what:tt)*) => {
            panic!("{name}: {asked:?} was accepted as {encoded:?}, which reads back as {held:?}: {}", format!($($what)*))
        };
    }

    if !p.labels.is_empty() {
        let Value::Text(label) = asked else { fail!("a labelled point took something else than a label") };
        if !p.labels.iter().any(|l| &l.name == label) {
            fail!("not one of the point's labels");
        }
        if held != Value::Text(label.clone()) {
            fail!("reads back as another label");
        }
        return;
    }
    if let DataType::String { len } = p.data_type {
        let Value::Text(s) = asked else { fail!("a string point took a non-string") };
        if !s.is_ascii() || s.len() > usize::from(len) || s.contains('\0') {
            fail!("text that is not ASCII, too long, or with a NUL");
        }
        if held != Value::Text(s.trim_end().to_string()) {
            fail!("the text reads back otherwise");
        }
        return;
    }
    if is_bitwise(p) {
        let Value::Bool(b) = asked else { fail!("a bit took something else than true or false") };
        if held != Value::Bool(*b) {
            fail!("the bit reads back otherwise");
        }
        return;
    }
    let Some(a) = Num::of(asked) else { fail!("a number point took a non-number") };
    if !a.f64().is_finite() && matches!(a, Num::Float(_)) {
        fail!("a non-finite number was written");
    }
    let Some(h) = Num::of(&held) else { fail!("reads back as no number") };
    if !admits(p, a) {
        fail!("the value asked is outside the point's limits");
    }
    if !admits(p, h) {
        fail!("the value the device will hold is outside the point's limits");
    }
    // The point without scale, offset and limits: the raw value on the device.
    let raw_point = Point { scale: 1.0, offset: 0.0, labels: Vec::new(), min: None, max: None, allowed: Vec::new(), ..p.clone() };
    let Encoded::Words(words) = encoded else { fail!("a number was not written as registers") };
    let raw = raw_point.decode_words(words).unwrap_or_else(|e| panic!("{name}: the raw value does not decode: {e}"));
    let (scale, offset) = (p.scale, p.offset);
    match (p.data_type, is_scaled(p)) {
        (DataType::F64, false) => {
            if h.f64().to_bits() != a.f64().to_bits() {
                fail!("an f64 point must hold the f64 asked, bit for bit");
            }
        }
        (DataType::F32, false) => {
            if (h.f64() as f32).to_bits() != nearest_f32(a).to_bits() {
                fail!("an f32 point must hold the f32 nearest to the value ({:?})", nearest_f32(a));
            }
        }
        (DataType::F32 | DataType::F64, true) => {
            let Value::Float(r) = raw else { fail!("a float point's raw value is not a float") };
            let want = (a.f64() - offset) / scale;
            let same = if p.data_type == DataType::F32 { (r as f32).to_bits() == (want as f32).to_bits() } else { r.to_bits() == want.to_bits() };
            if !same {
                fail!("a scaled float point must hold the float nearest to (value - offset) / scale = {want:?}, it holds {r:?}");
            }
        }
        (t, false) => {
            let (lo, hi) = int_range(t).unwrap_or_else(|| fail!("an unexpected type"));
            let Num::Int(hi_held) = h else { fail!("an integer point reads back as a float") };
            let whole = match a {
                Num::Int(i) => i,
                Num::Float(f) => {
                    if f.fract() != 0.0 || f.abs() >= TWO_53 {
                        fail!("a float with a fraction, or beyond 2^53, was taken by an integer point");
                    }
                    f as i128
                }
            };
            if whole != hi_held || !(lo..=hi).contains(&whole) {
                fail!("an integer point must hold exactly the integer asked");
            }
        }
        (t, true) => {
            let (lo, hi) = int_range(t).unwrap_or_else(|| fail!("an unexpected type"));
            let r: i128 = match raw {
                Value::Int(i) => i.into(),
                Value::UInt(u) => u.into(),
                _ => fail!("a scaled integer point's raw value is not an integer"),
            };
            if !(lo..=hi).contains(&r) {
                fail!("the raw value is outside the type");
            }
            if let Num::Int(i) = a {
                if (i as f64) as i128 != i {
                    fail!("an integer with no f64 of its own was scaled");
                }
            }
            let (av, hv) = (a.f64(), h.f64());
            // The README's tolerance, plus the rounding of the reading itself.
            let tolerance = (av.abs().max(offset.abs()) * 2f64.powi(-50)).min(scale.abs() * 1e-3);
            let ulp = hv.abs() * f64::EPSILON;
            if (hv - av).abs() > tolerance + ulp {
                fail!("a scaled integer point must hold the step the value is on (off by {:e}, tolerance {tolerance:e})", (hv - av).abs());
            }
            // The raw value is that step (while a float can tell steps apart).
            if (r as f64).abs() < 2f64.powi(50) && offset.abs() / scale.abs() < 2f64.powi(50) {
                let step = r as f64 * scale + offset;
                let slack = scale.abs() * 1e-3 + av.abs().max(offset.abs()).max(step.abs()) * 2f64.powi(-44);
                if (step - av).abs() > slack {
                    fail!("the raw value {r} is the step {step}, not the one asked");
                }
            }
        }
    }
}

/// Checks what `Point::encode` made of `asked`.
fn check_encode(p: &Point, asked: &Value) {
    match p.encode(asked) {
        Ok(encoded) => check_accepted(p, asked, &encoded),
        Err(why) => check_reason(&p.path, &why),
    }
}

/// Checks one write a device received (as the simulator records it): every
/// bit or register written belongs to a writable point, no point is written
/// in part, and each point written decodes to a value its checks admit.
pub fn check_written(points: &[Point], table: Table, address: u16, values: &[u16]) -> Result<(), String> {
    let (first, last) = (u32::from(address), u32::from(address) + values.len() as u32 - 1);
    if values.is_empty() {
        return Err(format!("an empty write to {} {address}", table.name()));
    }
    let writable: Vec<&Point> = points.iter().filter(|p| p.access.writable() && p.location.table == table).collect();
    for at in first..=last {
        if !writable.iter().any(|p| p.span().0 <= at && at <= p.span().1) {
            return Err(format!("{} {at} was written, and no writable point is there", table.name()));
        }
    }
    for p in writable {
        let (start, end) = p.span();
        if end < first || start > last {
            continue;
        }
        if start < first || end > last {
            return Err(format!("{} ({} {start}..={end}) was written in part: {first}..={last}", p.path, table.name()));
        }
        let slice = &values[(start - first) as usize..=(end - first) as usize];
        let held = if table.is_bits() {
            p.decode_bits(&[slice[0] != 0])
        } else {
            // A bit of a register: the register written whole (read-modify-write or mask write).
            p.decode_words(slice)
        }
        .map_err(|e| format!("{}: {slice:?} does not decode: {e}", p.path))?;
        if !p.labels.is_empty() && !p.labels.iter().any(|l| held == Value::Text(l.name.clone())) {
            return Err(format!("{} holds {held:?}, which is none of its labels", p.path));
        }
        if let Some(n) = Num::of(&held) {
            if !p.labels.is_empty() {
                return Err(format!("{} holds {held:?}, not a label", p.path));
            }
            if !n.f64().is_finite() || !admits(p, n) {
                return Err(format!("{} holds {held:?}, outside its limits", p.path));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// write

/// Reads fuzz bytes as choices; zeros once they run out.
struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0u64, |acc, _| acc << 8 | u64::from(self.u8()))
    }

    fn below(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n.max(1)
    }

    fn pick<'s>(&mut self, options: &[&'s str]) -> &'s str {
        options[self.below(options.len())]
    }

    fn chance(&mut self, in_256: u8) -> bool {
        self.u8() < in_256
    }

    /// Up to `max` bytes of text (any bytes, lossily UTF-8).
    fn text(&mut self, max: usize) -> String {
        let n = self.below(max + 1).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        String::from_utf8_lossy(head).into_owned()
    }
}

/// Scales and offsets as a technician writes them, and odd ones.
const SCALES: &[&str] = &["0.1", "0.01", "0.5", "2", "10", "0.001", "-0.5", "0.25", "1e-3", "3", "0.2", "1.5", "100", "0.0001", "1"];
const OFFSETS: &[&str] = &["0", "5", "-40", "0.5", "273.15", "-0.1", "1000", "0.3", "-1e6", "32"];

/// Numbers that sit on the edges of the types, of 2^53 and of JSON.
const EDGES: &[&str] = &[
    "0", "-0", "-0.0", "1", "-1", "0.1", "0.3", "0.30000000000000004", "65535", "65536", "-32768", "-32769", "32767",
    "4294967295", "4294967296", "2147483647", "-2147483648", "-2147483649",
    "9007199254740991", "9007199254740992", "9007199254740993", "-9007199254740993", "9007199254740992.0", "9007199254740993.0",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
    "18446744073709551615", "18446744073709551616", "1e3", "1E3", "1.0", "1.5", "2.5e-1", "3.4028234663852886e38",
    "3.4028235677973366e38", "1152921573326323713", "-1152921573326323713", "1e308", "-1e308", "5e-324", "1e-7", "123456789012345678901234567890", "1e400",
];

/// A number as YAML or JSON text.
fn number_text(b: &mut Bytes) -> String {
    match b.below(8) {
        0 => (b.u64() as i64).to_string(),
        1 => b.u64().to_string(),
        2 => {
            let f = f64::from_bits(b.u64());
            if f.is_finite() { format!("{f:?}") } else { "1e999".to_string() }
        }
        3 => (i64::from(b.u8() as i8) * i64::from(b.u8())).to_string(),
        4 => format!("{}.{:02}", i64::from(b.u8() as i8), b.u8() % 100),
        5 => format!("{}e{}", i64::from(b.u8() as i8), i64::from(b.u8() % 24) - 6),
        6 => {
            // A value on or between steps of a likely scale.
            let k = i64::from(b.u8() as i8) * i64::from(b.u8());
            let s: f64 = b.pick(SCALES).parse().unwrap_or(1.0);
            let o: f64 = b.pick(OFFSETS).parse().unwrap_or(0.0);
            let half = if b.chance(64) { 0.5 } else { 0.0 };
            format!("{:?}", (k as f64 + half) * s + o)
        }
        _ => b.pick(EDGES).to_string(),
    }
}

/// A value for a write, as JSON text; `near` are the point's limits and labels.
fn value_text(b: &mut Bytes, near: &[String]) -> String {
    match b.below(10) {
        0..=3 => number_text(b),
        4 if !near.is_empty() => {
            let n = near[b.below(near.len())].clone();
            match (n.parse::<i128>(), n.parse::<f64>()) {
                (Ok(i), _) => (i + i128::from(b.u8() % 3) - 1).to_string(),
                (_, Ok(f)) => format!("{:?}", match b.u8() % 3 {
                    0 => f.next_down(),
                    1 => f,
                    _ => f.next_up(),
                }),
                _ => serde_json::to_string(&n).unwrap_or_default(),
            }
        }
        5 => serde_json::to_string(&b.text(12)).unwrap_or_default(),
        6 => b.pick(&["true", "false", "null", "[]", "{}", "\"on\"", "\"NaN\"", "\"Infinity\"", "NaN", "\"1\"", "[1]", "{\"v\":1}"]).to_string(),
        7 if !near.is_empty() => serde_json::to_string(&near[b.below(near.len())]).unwrap_or_default(),
        _ => number_text(b),
    }
}

/// One point as YAML flow mapping text, chosen by the bytes.
fn point_yaml(b: &mut Bytes) -> String {
    let mut fields: Vec<String> = Vec::new();
    let table = b.pick(&["holding", "holding", "holding", "coil", "input", "discrete", "holding-bit"]);
    match table {
        "holding-bit" => fields.push(format!("holding: 0, bit: {}", b.below(18))),
        t => fields.push(format!("{t}: {}", if b.chance(8) { 65534 } else { 0 })),
    }
    if b.chance(200) {
        let t = b.pick(&["u16", "i16", "u32", "i32", "f32", "u64", "i64", "f64", "string", "bool", "u16", "i16", "u64", "i64", "f32"]);
        fields.push(format!("type: {t}"));
        if t == "string" || b.chance(4) {
            fields.push(format!("length: {}", b.below(14)));
        }
    }
    if b.chance(80) {
        fields.push(format!("word_order: {}", b.pick(&["big", "little"])));
    }
    if b.chance(80) {
        fields.push(format!("byte_order: {}", b.pick(&["big", "little"])));
    }
    if b.chance(110) {
        let s = if b.chance(40) { number_text(b) } else { b.pick(SCALES).to_string() };
        fields.push(format!("scale: {s}"));
    }
    if b.chance(80) {
        let o = if b.chance(40) { number_text(b) } else { b.pick(OFFSETS).to_string() };
        fields.push(format!("offset: {o}"));
    }
    if b.chance(60) {
        fields.push(format!("access: {}", b.pick(&["read", "write", "read-write"])));
    }
    if b.chance(40) {
        let raws = ["true", "false", "0", "1", "2", "-1", "7", "255", "65535", "65536", "-32768", "9223372036854775807", "-9223372036854775808"];
        let n = 1 + b.below(3);
        let labels: Vec<String> = (0..n).map(|i| format!("{}: {}", ["on", "off", "auto"][i], b.pick(&raws))).collect();
        fields.push(format!("values: {{ {} }}", labels.join(", ")));
    }
    if b.chance(100) {
        fields.push(format!("min: {}", number_text(b)));
    }
    if b.chance(100) {
        fields.push(format!("max: {}", number_text(b)));
    }
    if b.chance(50) {
        let n = b.below(4);
        let list: Vec<String> = (0..n).map(|_| number_text(b)).collect();
        fields.push(format!("allowed: [{}]", list.join(", ")));
    }
    format!("{{ {} }}", fields.join(", "))
}

/// One point from the bytes, then values for it.
pub fn write(data: &[u8]) {
    let mut b = Bytes { data };
    let point = point_yaml(&mut b);
    let yaml = format!("buses:\n  b: {{ tcp: {{ host: 127.0.0.1 }} }}\ndevices:\n  d:\n    bus: b\n    unit: 1\n    points:\n      p.x: {point}\n      zz.filler: {{ input: 9000 }}\n");
    let config = match Config::parse(&yaml, Path::new("fuzz.yaml")) {
        Ok(c) => c,
        Err(e) => {
            check_config_error(&e, "fuzz.yaml");
            return;
        }
    };
    check_config_invariants(&config);
    let points = &config.devices[0].points;
    let Some(p) = points.iter().find(|p| p.path == "p.x") else { panic!("the point is missing from {yaml}") };
    // Every limit a configuration accepted is a value a write can set.
    if p.access.writable() && p.location.table.is_writable() {
        let mut must_pass: Vec<Number> = p.allowed.clone();
        if p.allowed.is_empty() {
            must_pass.extend(p.min);
            must_pass.extend(p.max);
        }
        for n in must_pass {
            let v = n.to_value();
            match p.encode(&v) {
                Ok(encoded) => check_accepted(p, &v, &encoded),
                Err(why) => panic!("{yaml}\nthe limit {n:?} was accepted by the configuration, but a write of it is refused: {why}"),
            }
        }
    }
    let mut near: Vec<String> = p.min.iter().chain(&p.max).chain(&p.allowed).map(|n| n.to_string()).collect();
    near.extend(p.labels.iter().map(|l| l.name.clone()));
    let mut rounds = 0;
    while !b.is_empty() && rounds < 24 {
        rounds += 1;
        if b.chance(40) {
            // A typed value straight into the codec, NaN and infinities included.
            let v = match b.below(4) {
                0 => Value::Float(f64::from_bits(b.u64())),
                1 => Value::Int(b.u64() as i64),
                2 => Value::UInt(b.u64()),
                _ => Value::Float(f64::from(f32::from_bits(b.u64() as u32))),
            };
            check_encode(p, &v);
            continue;
        }
        let value = value_text(&mut b, &near);
        check_json_number(&value);
        let payload = format!(r#"{{"id":"w{rounds}","set":{{"p":{{"x":{value}}}}}}}"#);
        check_command(points, payload.as_bytes());
    }
}

/// A JSON number with a fraction or an exponent reads as the f64 nearest to
/// its decimal value (what Rust's own parser gives), or the codec starts from
/// a value one unit in the last place away from what was asked.
fn check_json_number(text: &str) {
    let is_number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    if !is_number || !text.contains(['.', 'e', 'E']) {
        return;
    }
    let (Ok(exact), Ok(Json::Number(n))) = (text.parse::<f64>(), serde_json::from_str::<Json>(text)) else { return };
    if let Some(read) = n.as_f64().filter(|_| exact.is_finite()) {
        assert_eq!(read.to_bits(), exact.to_bits(), "the JSON number {text} reads as {read:?}, not the nearest f64 {exact:?}");
    }
}

// ---------------------------------------------------------------------------
// config

/// Any bytes as a configuration file.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new("fuzz.yaml")) {
        Ok(c) => check_config_invariants(&c),
        Err(e) => check_config_error(&e, "fuzz.yaml"),
    }
}

/// A refused configuration names the file in every line it reports.
fn check_config_error(e: &ConfigError, file: &str) {
    match e {
        ConfigError::Structure { message } => {
            assert!(message.starts_with(file), "a structural error that does not name the file: {message}");
        }
        ConfigError::Invalid { problems } => {
            assert!(!problems.is_empty(), "refused without a problem");
            for p in problems {
                assert!(p.starts_with(file) && p.len() > file.len() + 2, "a problem that does not name the file: {p}");
                assert!(!p.contains("internal"), "a problem from inside the codec: {p}");
            }
        }
        ConfigError::Read { .. } => panic!("parse does not read files: {e}"),
    }
}

/// What every accepted configuration guarantees the runtime.
pub fn check_config_invariants(c: &Config) {
    assert!(!c.devices.is_empty(), "a configuration without devices was accepted");
    let mut units = Vec::new();
    for d in &c.devices {
        assert!(d.bus < c.buses.len(), "{}: bus index {} of {}", d.name, d.bus, c.buses.len());
        if let Some(t) = &d.twin {
            assert!(t.connection < c.connections.len(), "{}: connection index {}", d.name, t.connection);
        }
        match c.buses[d.bus].transport {
            // RTU over TCP is a serial line behind a device server.
            Transport::Rtu(_) | Transport::RtuTcp { .. } => assert!((1..=247).contains(&d.unit), "{}: unit {} on a serial line", d.name, d.unit),
            Transport::Tcp { .. } => {}
        }
        // Every readable point is read in exactly one poll group.
        let mut grouped: Vec<usize> = d.groups.iter().flat_map(|g| g.points.iter().copied()).collect();
        grouped.sort_unstable();
        let readable: Vec<usize> = (0..d.points.len()).filter(|&i| d.points[i].access.readable()).collect();
        assert_eq!(grouped, readable, "{}: poll groups do not cover the readable points once each", d.name);
        assert!(!units.contains(&(d.bus, d.unit)), "{}: unit {} twice on one bus", d.name, d.unit);
        units.push((d.bus, d.unit));
        check_device_points(d);
    }
}

fn check_device_points(d: &Device) {
    assert!(!d.points.is_empty(), "{}: a device without points", d.name);
    for pair in d.points.windows(2) {
        assert!(pair[0].path < pair[1].path, "{}: points not sorted or a path twice: {} {}", d.name, pair[0].path, pair[1].path);
    }
    for p in d.points.iter() {
        let name = format!("{}.{}", d.name, p.path);
        assert!(!p.path.is_empty() && p.path.split('.').all(|s| !s.is_empty()), "{name}: an empty path segment");
        for q in d.points.iter() {
            assert!(!q.path.starts_with(&format!("{}.", p.path)), "{name}: {} is inside it", q.path);
        }
        assert!(!p.access.writable() || p.location.table.is_writable(), "{name}: a writable {}", p.location.table.name());
        assert!(p.span().1 <= 65_535, "{name}: runs past 65535");
        if let Some(bit) = p.location.bit {
            assert!(bit <= 15 && !p.location.table.is_bits(), "{name}: bit {bit}");
        }
        if let DataType::String { len } = p.data_type {
            assert!(len >= 1, "{name}: an empty string point");
        }
        assert!(p.scale.is_finite() && p.scale != 0.0 && p.offset.is_finite(), "{name}: scale {} offset {}", p.scale, p.offset);
        assert!(p.deadband.is_finite() && p.deadband >= 0.0, "{name}: deadband {}", p.deadband);
        if !p.labels.is_empty() {
            assert!(int_range(p.data_type).is_some() || is_bitwise(p), "{name}: labels on a {}", p.data_type.name());
            assert!(!is_scaled(p), "{name}: labels on a scaled point");
            for (i, l) in p.labels.iter().enumerate() {
                assert!(p.labels[..i].iter().all(|m| m.raw != l.raw), "{name}: two labels for {}", l.raw);
            }
        }
        let limits: Vec<Number> = p.min.iter().chain(&p.max).chain(&p.allowed).copied().collect();
        if !limits.is_empty() {
            assert!(p.labels.is_empty() && !is_bitwise(p) && !matches!(p.data_type, DataType::String { .. }), "{name}: limits on a non-numeric point");
        }
        for n in &limits {
            assert!(p.holds(*n).is_ok(), "{name}: the limit {n:?} cannot be held: {:?}", p.holds(*n));
        }
        if let (Some(lo), Some(hi)) = (p.min, p.max) {
            assert!(Num::limit(lo).cmp(Num::limit(hi)) != Some(Ordering::Greater), "{name}: min {lo} above max {hi}");
        }
        for a in &p.allowed {
            let a = Num::limit(*a);
            let within = p.min.is_none_or(|m| a.cmp(Num::limit(m)) != Some(Ordering::Less))
                && p.max.is_none_or(|m| a.cmp(Num::limit(m)) != Some(Ordering::Greater));
            assert!(within, "{name}: an allowed value outside min..max");
        }
    }
    // Two writable points never share a register (distinct bits of one may).
    let writable: Vec<&Point> = d.points.iter().filter(|p| p.access.writable()).collect();
    for (i, a) in writable.iter().enumerate() {
        for b in &writable[i + 1..] {
            if a.location.table != b.location.table {
                continue;
            }
            let ((a0, a1), (b0, b1)) = (a.span(), b.span());
            let distinct_bits = matches!((a.location.bit, b.location.bit), (Some(x), Some(y)) if x != y);
            assert!(!(a0 <= b1 && b0 <= a1) || distinct_bits, "{}: writable {} and {} overlap", d.name, a.path, b.path);
        }
    }
}

// ---------------------------------------------------------------------------
// delta

/// Where each message of a [`delta`] input arrives, chosen by its first byte.
const SUFFIXES: &[&str] = &["/update/delta", "/get/accepted", "/update/documents", "/update/accepted", "/get/rejected", "/update/rejected"];

/// The rich device with an AWS shadow.
pub fn shadow_device() -> &'static Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE.get_or_init(|| {
        let yaml = format!(
            "{PROFILE}\nconnections:\n  aws: {{ url: \"mqtt://127.0.0.1:1883\", client_id: gw }}\nbuses:\n  b: {{ tcp: {{ host: 127.0.0.1 }} }}\n\
             devices:\n  d: {{ bus: b, unit: 1, profile: rich, twin: {{ connection: aws, shadow: {{ thing: d }} }} }}\n"
        );
        match Config::parse(&yaml, Path::new("profile.yaml")) {
            Ok(mut c) => c.devices.remove(0),
            Err(e) => panic!("tests/bad_input/profile.yaml with a shadow is not valid: {e}"),
        }
    })
}

/// Shadow messages against the rich device: `data` is split at 0x1E (at
/// most 8 messages); each message's first byte picks its topic suffix, the
/// rest is its payload. The adapter's first `get` has the token `fuzz-1`.
pub fn delta(data: &[u8]) {
    let device = shadow_device();
    let messages: Vec<(&str, &[u8])> = data
        .split(|b| *b == 0x1E)
        .take(8)
        .filter_map(|m| m.split_first())
        .map(|(first, payload)| (SUFFIXES[usize::from(*first) % SUFFIXES.len()], payload))
        .collect();
    let mine = device.twin.as_ref().and_then(|t| t.shadows.first()).map(|b| b.points.clone()).unwrap_or_default();
    let writes = shadow_replay(device, &messages).unwrap_or_else(|loop_| panic!("{loop_}"));
    for write in writes {
        for (i, encoded) in write {
            let p = &device.points[i];
            assert!(mine.contains(&i), "{} is not a point of this shadow, and was written", p.path);
            assert!(p.access.writable(), "{} is not writable, and was written", p.path);
            let checked = match &encoded {
                Encoded::Words(words) => check_written(&device.points, p.location.table, p.location.address, words),
                Encoded::Bits(bits) => check_written(&device.points, p.location.table, p.location.address, &bits.iter().map(|b| u16::from(*b)).collect::<Vec<_>>()),
                Encoded::RegisterBit { .. } => {
                    if p.location.bit.is_some() {
                        Ok(())
                    } else {
                        Err(format!("{}: a bit written into a point that is not a bit", p.path))
                    }
                }
            };
            if let Err(why) = checked {
                panic!("a shadow write outside the limits: {why}");
            }
        }
    }
}
