//! The write rule as a property, over every numeric type in every word and
//! byte order, a range of scales and offsets, and limits anywhere in the
//! type's range (2^53 and the ends of i64 and u64 included): a write that is
//! accepted reads back as what was asked and lies within the limits; a value
//! outside the limits, or between two steps of a scale, is refused.
//!
//! What "reads back as what was asked" means, by kind of point:
//! - unscaled integer: the same integer, exactly;
//! - scaled integer: the reading of the step the value is on, which is the
//!   value itself when it is such a reading (as any value a read returned
//!   is), and a step is taken only within the tolerance the README states;
//! - unscaled f64: the same f64, bit for bit;
//! - unscaled f32: the f32 nearest to the value, read as its shortest decimal;
//! - scaled f32 or f64: the float nearest to (value − offset) / scale, read
//!   back as that × scale + offset; there are no steps to be on.
//!
//! The expectations here do not borrow the codec's arithmetic: readings are
//! worked out with integers on the decimal digits of scale and offset, and
//! integers are compared with floats on their exact values.

use std::cmp::Ordering;

use super::*;

/// Cases per property at least (PROPTEST_CASES may ask for more); each case
/// checks a few dozen values, about 150 000 writes in all.
const CASES: u32 = 3000;

/// Scale and offset pairs as decimal text; unscaled points come up often.
fn scaling() -> impl Strategy<Value = (&'static str, &'static str)> {
    let scales: Vec<&str> = SCALES.iter().copied().chain(["-0.5", "0.0001"]).collect();
    prop_oneof![
        2 => Just(("1", "0")),
        3 => (prop::sample::select(scales), prop::sample::select(OFFSETS.to_vec())),
    ]
}

fn integer_type() -> impl Strategy<Value = DataType> {
    prop_oneof![
        Just(DataType::U16),
        Just(DataType::I16),
        Just(DataType::U32),
        Just(DataType::I32),
        Just(DataType::U64),
        Just(DataType::I64),
    ]
}

/// The raw range of an integer type, written out independently of the codec.
fn range(t: DataType) -> (i128, i128) {
    match t {
        DataType::U16 => (0, 65_535),
        DataType::I16 => (-32_768, 32_767),
        DataType::U32 => (0, 4_294_967_295),
        DataType::I32 => (-2_147_483_648, 2_147_483_647),
        DataType::U64 => (0, 18_446_744_073_709_551_615),
        DataType::I64 => (-9_223_372_036_854_775_808, 9_223_372_036_854_775_807),
        _ => (0, 0),
    }
}

const TWO_53: i128 = 1 << 53;

/// Raw values in `lo..=hi`, weighted to where mistakes hide: the ends of the
/// type, ±2^53 and zero.
fn raw_in((lo, hi): (i128, i128)) -> BoxedStrategy<i128> {
    prop_oneof![
        4 => lo..=hi,
        1 => (0i128..3).prop_map(move |d| lo + d),
        1 => (0i128..3).prop_map(move |d| hi - d),
        2 => (-3i128..=3).prop_map(|d| TWO_53 + d),
        2 => (-3i128..=3).prop_map(|d| d - TWO_53),
        2 => -2_000i128..2_000,
    ]
    .prop_map(move |r| r.clamp(lo, hi))
    .boxed()
}

/// A number as the oracle sees it: exact, compared without rounding.
#[derive(Clone, Copy, Debug)]
enum Exact {
    Int(i128),
    Float(f64),
}

impl Exact {
    fn of(value: &Value) -> Option<Exact> {
        match *value {
            Value::Int(i) => Some(Exact::Int(i.into())),
            Value::UInt(u) => Some(Exact::Int(u.into())),
            Value::Float(f) => Some(Exact::Float(f)),
            _ => None,
        }
    }

    fn number(self) -> Number {
        match self {
            Exact::Int(i) => Number::Int(i),
            Exact::Float(f) => Number::Float(f),
        }
    }

    fn value(self) -> Value {
        match self {
            Exact::Int(i) => match (i64::try_from(i), u64::try_from(i)) {
                (Ok(i), _) => Value::Int(i),
                (_, Ok(u)) => Value::UInt(u),
                // Past every integer type: JSON would hand it over as a float.
                _ => Value::Float(i as f64),
            },
            Exact::Float(f) => Value::Float(f),
        }
    }

    /// Exact order: a float against an integer by its floor, which is an
    /// exact integer, then by whether it has a fraction.
    fn cmp(self, other: Exact) -> Ordering {
        match (self, other) {
            (Exact::Int(a), Exact::Int(b)) => a.cmp(&b),
            (Exact::Float(a), Exact::Float(b)) => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
            (Exact::Int(_), Exact::Float(_)) => other.cmp(self).reverse(),
            (Exact::Float(f), Exact::Int(i)) => {
                if f >= 1.7e38 {
                    return Ordering::Greater;
                }
                if f <= -1.7e38 {
                    return Ordering::Less;
                }
                let floor = f.floor() as i128;
                match floor.cmp(&i) {
                    Ordering::Equal if f > f.floor() => Ordering::Greater,
                    order => order,
                }
            }
        }
    }
}

/// The f64 nearest to raw × scale + offset, on integers.
fn oracle_reading(raw: i128, scale: &str, offset: &str) -> f64 {
    let ((sm, sk), (om, ok)) = (decimal(scale), decimal(offset));
    let k = sk.max(ok);
    let n = raw * sm * 10i128.pow(k - sk) + om * 10i128.pow(k - ok);
    format!("{n}e-{k}").parse().unwrap()
}

/// The README's tolerance: 2^-50 of the value (or of the offset when that
/// is larger), and never more than a thousandth of a step.
fn oracle_tolerance(value: f64, scale: f64, offset: f64) -> f64 {
    (value.abs().max(offset.abs()) * 2f64.powi(-50)).min(scale.abs() * 1e-3)
}

/// Limits as the oracle and as the point hold them.
#[derive(Clone, Debug, Default)]
struct Limits {
    min: Option<Exact>,
    max: Option<Exact>,
    allowed: Vec<Exact>,
}

impl Limits {
    fn admit(&self, x: Exact) -> bool {
        self.min.is_none_or(|m| x.cmp(m) != Ordering::Less)
            && self.max.is_none_or(|m| x.cmp(m) != Ordering::Greater)
            && (self.allowed.is_empty() || self.allowed.iter().any(|a| x.cmp(*a) == Ordering::Equal))
    }

    fn apply(&self, p: Point) -> Point {
        Point {
            min: self.min.map(Exact::number),
            max: self.max.map(Exact::number),
            allowed: self.allowed.iter().map(|a| a.number()).collect(),
            ..p
        }
    }

    /// From limit values in any order: the smaller is the minimum.
    fn of(min: Option<Exact>, max: Option<Exact>, allowed: Vec<Exact>) -> Limits {
        let (min, max) = match (min, max) {
            (Some(a), Some(b)) if a.cmp(b) == Ordering::Greater => (Some(b), Some(a)),
            other => other,
        };
        Limits { min, max, allowed }
    }
}

/// What one write did, checked against what may be said of every write.
fn check_write(p: &Point, limits: &Limits, asked: &Value) -> Result<Option<Exact>, TestCaseError> {
    match p.encode(asked) {
        Ok(Encoded::Words(words)) => {
            prop_assert_eq!(words.len(), usize::from(p.data_type.registers()));
            let held = p.decode_words(&words).map_err(TestCaseError::fail)?;
            let (Some(a), Some(h)) = (Exact::of(asked), Exact::of(&held)) else {
                return Err(TestCaseError::fail(format!("{asked:?} read back as {held:?}")));
            };
            prop_assert!(limits.admit(a), "{asked:?} is outside {limits:?} but was written as {words:04X?}");
            prop_assert!(limits.admit(h), "{asked:?} reads back as {held:?}, outside {limits:?}");
            Ok(Some(h))
        }
        Ok(other) => Err(TestCaseError::fail(format!("a register point wrote {other:?}"))),
        Err(reason) => {
            prop_assert!(!reason.is_empty() && !reason.starts_with("internal"), "{asked:?}: {reason}");
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: ProptestConfig::default().cases.max(CASES), ..ProptestConfig::default() })]

    #[test]
    fn an_accepted_integer_write_reads_back_as_asked_and_anything_else_is_refused(
        (t, (scale, offset), min, max, allowed, probes) in integer_type().prop_flat_map(|t| {
            let r = range(t);
            (
                Just(t),
                scaling(),
                prop::option::of(raw_in(r)),
                prop::option::of(raw_in(r)),
                prop::collection::vec(raw_in(r), 0..3),
                prop::collection::vec(raw_in(r), 6..12),
            )
        }),
        w in order(),
        b in order(),
        random in prop::collection::vec(any_value(), 4),
    ) {
        let scaled = scale != "1" || offset != "0";
        let (s, o): (f64, f64) = (scale.parse().unwrap(), offset.parse().unwrap());
        let (lo, hi) = range(t);
        // The twin's value of a raw value: the integer, or its reading.
        let eng = |raw: i128| if scaled { Exact::Float(oracle_reading(raw, scale, offset)) } else { Exact::Int(raw) };
        let limits = Limits::of(min.map(eng), max.map(eng), allowed.iter().map(|&r| eng(r)).collect());
        let p = limits.apply(Point { scale: s, offset: o, ..ordered(t, w, b) });
        // Each limit is one `twinbus check` accepts.
        for limit in limits.min.iter().chain(&limits.max).chain(&limits.allowed) {
            prop_assert!(p.holds(limit.number()).is_ok(), "{limit:?}: {:?}", p.holds(limit.number()));
        }

        // Steps are told apart by a float (and by the tolerance) well below 2^40 steps from zero.
        let resolvable = |raw: i128| raw.abs() as f64 + o.abs() / s.abs() < 2f64.powi(40);
        let probes = probes.iter().chain(&min).chain(&max).chain(&allowed);
        for &raw in probes {
            let on = eng(raw);
            // On a step: accepted exactly when within the limits, and read back as asked.
            let held = check_write(&p, &limits, &on.value())?;
            prop_assert_eq!(held.is_some(), limits.admit(on), "{:?} on {}", on, t.name());
            if let Some(h) = held {
                prop_assert_eq!(h.cmp(on), Ordering::Equal, "{:?} read back as {:?}", on, h);
            }
            if !scaled {
                // Between two integers, and the same integer as a float.
                if raw.abs() < 1 << 52 {
                    let half = Value::Float(raw as f64 + 0.5);
                    prop_assert!(check_write(&p, &limits, &half)?.is_none(), "{half:?} was written");
                }
                let whole = Value::Float(raw as f64);
                let expected = raw.abs() < TWO_53 && limits.admit(on);
                prop_assert_eq!(check_write(&p, &limits, &whole)?.is_some(), expected, "{:?}", whole);
                // Its neighbours, one past each limit among them.
                for x in [raw - 1, raw + 1] {
                    let held = check_write(&p, &limits, &Exact::Int(x).value())?;
                    prop_assert_eq!(held.is_some(), (lo..=hi).contains(&x) && limits.admit(Exact::Int(x)), "{}", x);
                }
                continue;
            }
            let Exact::Float(v) = on else { unreachable!() };
            if !resolvable(raw) {
                continue;
            }
            // Halfway to the next step: refused.
            let next = oracle_reading(raw + 1, scale, offset);
            let mid = Value::Float(v + (next - v) / 2.0);
            prop_assert!(check_write(&p, &limits, &mid)?.is_none(), "{mid:?} was written");
            // A few units in the last place off: the step, when within the tolerance.
            for noisy in [v.next_up(), v.next_down(), v.next_up().next_up().next_up().next_up().next_up()] {
                let held = check_write(&p, &limits, &Value::Float(noisy))?;
                let near = (noisy - v).abs() <= oracle_tolerance(noisy, s, o);
                let expected = near && limits.admit(Exact::Float(noisy)) && limits.admit(on);
                prop_assert_eq!(held.is_some(), expected, "{} near the step {}", noisy, v);
                if let Some(h) = held {
                    prop_assert_eq!(h.cmp(on), Ordering::Equal, "{} was written as {:?}, not the step {}", noisy, h, v);
                }
            }
        }
        // Anything at all: what is written is within the limits and near what was asked.
        for value in random {
            if let Some(held) = check_write(&p, &limits, &value)? {
                let asked = Exact::of(&value).unwrap();
                match (scaled, asked, held) {
                    (false, _, _) => prop_assert_eq!(held.cmp(asked), Ordering::Equal),
                    (true, Exact::Float(a), Exact::Float(h)) => prop_assert!((a - h).abs() <= oracle_tolerance(a, s, o), "{a} → {h}"),
                    // A scaled value is a float: an integer without an f64 of its own is refused.
                    (true, Exact::Int(a), Exact::Float(h)) => {
                        prop_assert!((a as f64) as i128 == a && (a as f64 - h).abs() <= oracle_tolerance(h, s, o), "{a} → {h}")
                    }
                    other => prop_assert!(false, "{other:?}"),
                }
            }
        }
    }

    #[test]
    fn an_accepted_float_write_reads_back_as_the_nearest_float_within_the_limits(
        f32_point in any::<bool>(),
        (scale, offset) in scaling(),
        w in order(),
        b in order(),
        limit_bits in prop::collection::vec(any::<u32>(), 0..3),
        small_limits in prop::collection::vec(-1000i64..1000, 0..3),
        values in prop::collection::vec(prop_oneof![
            any::<u64>().prop_map(f64::from_bits),
            any::<u32>().prop_map(|b| f64::from(f32::from_bits(b))),
            -1e4..1e4f64,
            // The ends of the f32 range, and one f64 past each.
            Just(f64::from(f32::MAX)),
            Just(f64::from(f32::MAX).next_up()),
            Just(f64::from(f32::MIN)),
            Just(f64::from(f32::MIN).next_down()),
        ], 8..16),
        ints in prop::collection::vec(prop_oneof![any::<i64>().prop_map(Value::Int), any::<u64>().prop_map(Value::UInt)], 2),
    ) {
        let t = if f32_point { DataType::F32 } else { DataType::F64 };
        let scaled = scale != "1" || offset != "0";
        let (s, o): (f64, f64) = (scale.parse().unwrap(), offset.parse().unwrap());
        let unlimited = Point { scale: s, offset: o, ..ordered(t, w, b) };
        // Limits a configuration could give: whole numbers, and floats the point holds exactly.
        // An f32 as a person would write it (its shortest decimal), and as its exact binary value.
        let written = |bits: u32| f32::from_bits(bits).to_string().parse::<f64>().unwrap_or(0.0);
        let candidates: Vec<Exact> = small_limits
            .iter()
            .map(|&i| Exact::Int(i.into()))
            .chain(limit_bits.iter().flat_map(|&bits| [written(bits), f64::from(f32::from_bits(bits))]).map(Exact::Float))
            .filter(|l| unlimited.holds(l.number()).is_ok())
            .collect();
        let limits = Limits::of(candidates.first().copied(), candidates.get(1).copied(), candidates.iter().skip(2).copied().collect());
        let p = limits.apply(unlimited.clone());

        let mut asked: Vec<Value> = values.into_iter().map(Value::Float).collect();
        asked.extend(ints);
        for l in &candidates {
            let Exact::Float(f) = *l else { continue };
            asked.extend([f, f.next_up(), f.next_down()].map(Value::Float));
        }
        for value in &asked {
            let held = check_write(&p, &limits, value)?;
            let Some(a) = Exact::of(value) else { continue };
            let v = match a { Exact::Int(i) => i as f64, Exact::Float(f) => f };
            if scaled {
                // No opinion on which values a scaled float takes, only that it stays within the limits (checked above).
                continue;
            }
            let fits = v.is_finite() && (!f32_point || v.abs() <= f64::from(f32::MAX));
            // What the device will hold, read back: the value, or the shortest decimal of its f32.
            let expected = if f32_point { (v as f32).to_string().parse::<f64>().unwrap() } else { v };
            let admitted = fits && limits.admit(a) && limits.admit(Exact::Float(expected));
            prop_assert_eq!(held.is_some(), admitted, "{:?} on {}", value, t.name());
            if let Some(Exact::Float(h)) = held {
                prop_assert_eq!(h.to_bits(), expected.to_bits(), "{:?} read back as {}", value, h);
            }
        }
    }

    #[test]
    fn a_label_reads_back_as_itself_and_nothing_else_is_written(
        t in integer_type(),
        raws in prop::collection::btree_set(-70_000i64..70_000, 1..5),
        w in order(),
        b in order(),
        other in any_value(),
    ) {
        let (lo, hi) = range(t);
        let labels: Vec<(String, i64)> = raws.iter().enumerate().map(|(i, &r)| (format!("l{i}"), r)).collect();
        let named: Vec<(&str, i64)> = labels.iter().map(|(n, r)| (n.as_str(), *r)).collect();
        let p = labelled(ordered(t, w, b), &named);
        for (name, raw) in &labels {
            match p.encode(&text(name)) {
                Ok(Encoded::Words(words)) => {
                    prop_assert!((lo..=hi).contains(&i128::from(*raw)));
                    prop_assert_eq!(p.decode_words(&words), Ok(text(name)));
                }
                Ok(other) => prop_assert!(false, "{other:?}"),
                Err(reason) => {
                    prop_assert!(!(lo..=hi).contains(&i128::from(*raw)), "{name} = {raw}: {reason}");
                }
            }
        }
        if !matches!(&other, Value::Text(s) if labels.iter().any(|(n, _)| n == s)) {
            prop_assert!(p.encode(&other).is_err(), "{other:?} was written to a labelled point");
        }
    }
}
