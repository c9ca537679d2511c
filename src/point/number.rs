//! Numbers compared and scaled exactly, for the write checks of `point.rs`.
//!
//! When every number was an f64, two things went wrong. Integers above 2^53
//! were rounded, so a `u64` limit of 2^53 let 2^53 + 1 through. And a scaled
//! write was snapped to the nearest step with a tolerance relative to the raw
//! value, so a large raw value let a value most of a step away through, and
//! the device got a value nobody asked for. Here an integer stays an integer
//! ([`Number::Int`]) and is compared with a float without rounding either. A
//! scaled reading is `raw × scale + offset` worked out on the decimals of the
//! scale and offset as written, then rounded once to the nearest f64. A
//! write is on a step only within `Scaling::tolerance`, which is float noise
//! and never more than a thousandth of a step.

use std::cmp::Ordering;
use std::fmt;

use super::Value;

/// A limit, or a value asked for, as a number that compares exactly.
///
/// Created by the config validation (limits, from YAML as written) and by
/// [`Number::of`] (values from JSON); compared by the point's write checks.
/// Equality and order are numeric: `Int(3) == Float(3.0)`, and
/// `Int(2^53 + 1) > Float(2^53)`, never through a rounding.
#[derive(Clone, Copy, Debug)]
pub enum Number {
    /// A whole number written without a point or an exponent: any i64 or u64, exact.
    Int(i128),
    /// Any other number, as the f64 it was read as.
    Float(f64),
}

impl Number {
    /// The number in a value (`None` for text and bools).
    pub fn of(value: &Value) -> Option<Number> {
        match *value {
            Value::Int(i) => Some(Number::Int(i.into())),
            Value::UInt(u) => Some(Number::Int(u.into())),
            Value::Float(f) => Some(Number::Float(f)),
            Value::Bool(_) | Value::Text(_) => None,
        }
    }

    /// The value a twin adapter would hand over for this number.
    pub fn to_value(self) -> Value {
        match self {
            Number::Int(i) => match (i64::try_from(i), u64::try_from(i)) {
                (Ok(i), _) => Value::Int(i),
                (_, Ok(u)) => Value::UInt(u),
                // Beyond every integer type: only a float can carry it on.
                _ => Value::Float(i as f64),
            },
            Number::Float(f) => Value::Float(f),
        }
    }

    /// The nearest f64 (exact for every float and for integers up to 2^53).
    pub fn to_f64(self) -> f64 {
        match self {
            Number::Int(i) => i as f64,
            Number::Float(f) => f,
        }
    }

    /// Whether the number is neither NaN nor infinite.
    pub fn is_finite(self) -> bool {
        match self {
            Number::Int(_) => true,
            Number::Float(f) => f.is_finite(),
        }
    }
}

impl PartialEq for Number {
    fn eq(&self, other: &Number) -> bool {
        self.partial_cmp(other) == Some(Ordering::Equal)
    }
}

impl PartialOrd for Number {
    fn partial_cmp(&self, other: &Number) -> Option<Ordering> {
        match (*self, *other) {
            (Number::Int(a), Number::Int(b)) => Some(a.cmp(&b)),
            (Number::Float(a), Number::Float(b)) => a.partial_cmp(&b),
            (Number::Float(a), Number::Int(b)) => cmp_float_int(a, b),
            (Number::Int(a), Number::Float(b)) => cmp_float_int(b, a).map(Ordering::reverse),
        }
    }
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(i) => write!(f, "{i}"),
            Number::Float(x) => f.write_str(&shown(*x)),
        }
    }
}

/// A float as a message shows it: its shortest digits, with an exponent
/// from 1e21 up and below 1e-7 (1e300 written out is 301 digits), and zero
/// as 0, never -0.
pub(crate) fn shown(x: f64) -> String {
    if x == 0.0 {
        "0".to_string()
    } else if x.is_finite() && (x.abs() >= 1e21 || x.abs() < 1e-7) {
        format!("{x:e}")
    } else {
        x.to_string()
    }
}

/// Compares a float with an integer without rounding either: the float's
/// whole part is an exact integer, and only when the two are equal does its
/// fraction decide.
fn cmp_float_int(f: f64, i: i128) -> Option<Ordering> {
    // 2^127: every i128 lies below it, and every float below it in magnitude
    // has a whole part that an i128 holds exactly.
    const BOUND: f64 = 170_141_183_460_469_231_731_687_303_715_884_105_728.0;
    if f.is_nan() {
        return None;
    }
    if f >= BOUND {
        return Some(Ordering::Greater);
    }
    if f < -BOUND {
        return Some(Ordering::Less);
    }
    let whole = f.trunc();
    match (whole as i128).cmp(&i) {
        Ordering::Equal => f.partial_cmp(&whole),
        unequal => Some(unequal),
    }
}

/// `raw × scale + offset` for one point, and its inverse for writes.
///
/// Created by `Point` for each decode and encode of a scaled point (it is
/// cheap); the scale and offset are the point's, as the configuration gave
/// them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scaling {
    scale: f64,
    offset: f64,
    /// The scale and offset as integers over one power of ten, when their
    /// shortest decimals fit: what the person wrote, without binary noise.
    decimals: Option<Decimals>,
}

#[derive(Clone, Copy, Debug)]
struct Decimals {
    scale: i128,
    offset: i128,
    places: u32,
}

/// Where a value asked for falls among the steps of a scaled point.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Step {
    /// On this raw value's step (within the tolerance).
    On(i128),
    /// Between two steps: the readings of the nearest ones in the type's range.
    Between(Option<f64>, Option<f64>),
    /// Outside the type's range; the raw value it would need, roughly.
    Outside(f64),
}

/// The float noise a value may carry and still count as on a step, relative
/// to the value (or to the offset, when that is larger): 2^-50, four units in
/// the last place. 0.1 + 0.2 = 0.30000000000000004 is one unit away from 0.3.
pub(crate) const NOISE: f64 = 4.0 * f64::EPSILON;

/// The largest tolerance, as a fraction of a step: far below one step, so a
/// value is never moved to a step a person could tell apart from it.
pub(crate) const MAX_STEP_FRACTION: f64 = 1e-3;

impl Scaling {
    pub(crate) fn new(scale: f64, offset: f64) -> Scaling {
        let decimals = (|| {
            let (s, s_places) = decimal(scale)?;
            let (o, o_places) = decimal(offset)?;
            let places = s_places.max(o_places);
            let widen = |m: i128, p: u32| m.checked_mul(10i128.checked_pow(places - p)?);
            Some(Decimals { scale: widen(s, s_places)?, offset: widen(o, o_places)?, places })
        })();
        Scaling { scale, offset, decimals }
    }

    /// What the twin reads when the device holds `raw`: the f64 nearest to
    /// `raw × scale + offset`, worked out exactly on the decimals of scale
    /// and offset (215 × 0.1 is 21.5, not 21.500000000000004).
    pub(crate) fn reading(&self, raw: i128) -> f64 {
        if let Some(d) = self.decimals {
            if let Some(n) = raw.checked_mul(d.scale).and_then(|x| x.checked_add(d.offset)) {
                return nearest(n, d.places);
            }
        }
        raw as f64 * self.scale + self.offset
    }

    /// How far a value may be from a step's reading and still be on it.
    pub(crate) fn tolerance(&self, value: f64) -> f64 {
        let noise = NOISE * value.abs().max(self.offset.abs());
        noise.min(self.scale.abs() * MAX_STEP_FRACTION)
    }

    /// The step `value` is on, among raw values `lo..=hi`.
    pub(crate) fn step(&self, value: f64, (lo, hi): (i128, i128)) -> Step {
        let q = (value - self.offset) / self.scale;
        // Beyond ±2^100 no integer type is near: saying so avoids overflow below.
        if !q.is_finite() || q.abs() > 1.267_650_600_228_229_4e30 {
            return Step::Outside(q);
        }
        let centre = self.exact_raw(value).unwrap_or(q.round() as i128);
        // Look at the neighbours too, in order of distance so that a tie
        // keeps the raw value nearest to the centre: a reading rounds, and the
        // division without decimals may be off by a little. Far from zero
        // many raw values share one reading, and the nearest may lie just
        // outside the type while others inside it read the same: look at
        // the end of the range too.
        let edge = centre.clamp(lo, hi);
        let near = |n: i128, d: i128| n.saturating_add(d);
        let candidates = [
            centre,
            near(centre, -1),
            near(centre, 1),
            near(centre, -2),
            near(centre, 2),
            edge,
            near(edge, -1),
            near(edge, 1),
        ];
        let in_range = |n: &&i128| (lo..=hi).contains(*n);
        let distance = |n: i128| (self.reading(n) - value).abs();
        let tolerance = self.tolerance(value);
        // Far from zero several raw values can share one reading: any of
        // them in range will do, so look there first.
        let mut best: Option<(i128, f64)> = None;
        for &n in candidates.iter().filter(in_range) {
            let d = distance(n);
            if best.is_none_or(|(_, nearest)| d < nearest) {
                best = Some((n, d));
            }
        }
        if let Some((n, _)) = best.filter(|&(_, d)| d <= tolerance) {
            return Step::On(n);
        }
        if let Some(&n) = candidates.iter().find(|&&n| distance(n) <= tolerance) {
            return Step::Outside(n as f64);
        }
        if q < lo as f64 - 1.0 || q > hi as f64 + 1.0 {
            return Step::Outside(q);
        }
        let (mut below, mut above): (Option<f64>, Option<f64>) = (None, None);
        for r in candidates.iter().filter(in_range).map(|&n| self.reading(n)) {
            if r < value && below.is_none_or(|b| r > b) {
                below = Some(r);
            }
            if r > value && above.is_none_or(|a| r < a) {
                above = Some(r);
            }
        }
        if below.is_none() && above.is_none() {
            return Step::Outside(q);
        }
        Step::Between(below, above)
    }
}

impl Scaling {
    /// The raw value whose exact `raw × scale + offset` is nearest to the
    /// exact value of `value`, worked out on integers. Far from zero the f64
    /// quotient is off by more than one raw value (2^-53 of 2^64 is 2048),
    /// so the step search starts here when the numbers fit an i128.
    fn exact_raw(&self, value: f64) -> Option<i128> {
        let d = self.decimals?;
        let (mantissa, exponent) = integer_decode(value)?;
        let ten_k = 10i128.checked_pow(d.places)?;
        let (numerator, denominator) = if exponent >= 0 {
            let v = mantissa.checked_mul(1i128.checked_shl(u32::try_from(exponent).ok()?).filter(|p| *p > 0)?)?;
            (v.checked_mul(ten_k)?.checked_sub(d.offset)?, d.scale)
        } else {
            let shift = 1i128.checked_shl(exponent.unsigned_abs()).filter(|p| *p > 0)?;
            (mantissa.checked_mul(ten_k)?.checked_sub(d.offset.checked_mul(shift)?)?, d.scale.checked_mul(shift)?)
        };
        divide_rounded(numerator, denominator)
    }
}

/// A finite f64 as mantissa × 2^exponent, both exact.
fn integer_decode(x: f64) -> Option<(i128, i32)> {
    if !x.is_finite() {
        return None;
    }
    let bits = x.to_bits();
    let biased = ((bits >> 52) & 0x7FF) as i32;
    let fraction = i128::from(bits & ((1u64 << 52) - 1));
    let (mantissa, exponent) = if biased == 0 { (fraction, -1074) } else { (fraction | (1 << 52), biased - 1075) };
    Some((if x.is_sign_negative() { -mantissa } else { mantissa }, exponent))
}

/// `n / d` rounded to the nearest integer, halves away from zero.
fn divide_rounded(n: i128, d: i128) -> Option<i128> {
    let (q, r) = (n.checked_div(d)?, n.checked_rem(d)?);
    if r.unsigned_abs().checked_mul(2)? >= d.unsigned_abs() {
        let away = if (n < 0) == (d < 0) { 1 } else { -1 };
        return q.checked_add(away);
    }
    Some(q)
}

/// `x` as an integer over a power of ten, from its shortest decimal form
/// (Rust prints floats without an exponent): 0.01 → (1, 2), -273.15 →
/// (-27315, 2). `None` when the digits do not fit an i128.
fn decimal(x: f64) -> Option<(i128, u32)> {
    if !x.is_finite() {
        return None;
    }
    let text = x.to_string();
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, ""));
    let mantissa = format!("{whole}{fraction}").parse().ok()?;
    Some((mantissa, u32::try_from(fraction.len()).ok()?))
}

/// Powers of ten that an f64 holds exactly.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// The f64 nearest to `n / 10^places`.
fn nearest(n: i128, places: u32) -> f64 {
    if let Some(&p) = POW10.get(places as usize) {
        if n.unsigned_abs() <= 1 << 53 {
            // Both operands are exact, and a division rounds once.
            return n as f64 / p;
        }
    }
    // The standard library's parser rounds correctly, whatever the digits.
    format!("{n}e-{places}").parse().unwrap_or(n as f64 / 10f64.powi(places as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_and_floats_compare_without_rounding() {
        let two_53 = 1i128 << 53;
        assert!(Number::Int(two_53 + 1) > Number::Float(9_007_199_254_740_992.0));
        assert!(Number::Float(9_007_199_254_740_992.0) < Number::Int(two_53 + 1));
        assert_eq!(Number::Int(two_53), Number::Float(9_007_199_254_740_992.0));
        assert!(Number::Float(2.5) > Number::Int(2) && Number::Float(2.5) < Number::Int(3));
        assert!(Number::Float(-2.5) < Number::Int(-2) && Number::Float(-2.5) > Number::Int(-3));
        assert_eq!(Number::Float(-0.0), Number::Int(0));
        // i64::MIN is -2^63 exactly; i64::MAX and u64::MAX round up to 2^63 and 2^64.
        assert_eq!(Number::Int(i64::MIN.into()), Number::Float(i64::MIN as f64));
        assert!(Number::Int(i64::MAX.into()) < Number::Float(i64::MAX as f64));
        assert!(Number::Int(u64::MAX.into()) < Number::Float(u64::MAX as f64));
        assert!(Number::Float(f64::INFINITY) > Number::Int(u64::MAX.into()));
        assert!(Number::Float(f64::NEG_INFINITY) < Number::Int(i64::MIN.into()));
        assert_eq!(Number::Float(f64::NAN).partial_cmp(&Number::Int(0)), None);
    }

    #[test]
    fn a_reading_is_the_decimal_result_rounded_once() {
        assert_eq!(Scaling::new(0.1, 0.0).reading(215), 21.5);
        assert_eq!(Scaling::new(1.0, -273.15).reading(300), 26.85);
        assert_eq!(Scaling::new(0.01, 0.0).reading(1_000_001), 10000.01);
        // Beyond 2^53 the division shortcut no longer applies.
        assert_eq!(Scaling::new(0.01, 0.0).reading(1_234_567_890_123_456_789), 12_345_678_901_234_567.89);
    }

    #[test]
    fn a_value_is_on_a_step_only_within_the_noise_of_a_float() {
        let s = Scaling::new(0.01, 0.0);
        let u32_range = (0, i128::from(u32::MAX));
        assert_eq!(s.step(5000.01, u32_range), Step::On(500_001));
        assert_eq!(s.step(5000.003, u32_range), Step::Between(Some(5000.0), Some(5000.01)));
        assert_eq!(s.step(10000.006, u32_range), Step::Between(Some(10000.0), Some(10000.01)));
        assert_eq!(Scaling::new(0.1, 0.0).step(0.1 + 0.2, u32_range), Step::On(3));
        assert!(matches!(s.step(-0.01, u32_range), Step::Outside(_)));
        assert!(matches!(s.step(1e300, u32_range), Step::Outside(_)));
    }

    #[test]
    fn a_reading_far_beyond_2_pow_53_finds_its_step_again() {
        let s = Scaling::new(0.01, 0.0);
        let u64_range = (0, i128::from(u64::MAX));
        for raw in [u64::MAX, u64::MAX - 1, 1 << 63, (1 << 57) + 12_345] {
            let reading = s.reading(raw.into());
            let Step::On(n) = s.step(reading, u64_range) else { panic!("{reading} is a reading of {raw}") };
            assert_eq!(s.reading(n), reading, "{raw}");
        }
    }

    #[test]
    fn the_tolerance_never_exceeds_a_thousandth_of_a_step() {
        let s = Scaling::new(0.01, 0.0);
        assert!(s.tolerance(1e15) <= 0.01 * MAX_STEP_FRACTION);
        assert!(s.tolerance(0.3) < 1e-15);
    }
}
