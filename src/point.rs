//! One point: a typed value in the twin ⇄ a Modbus location on the device.
//!
//! This is the codec every other layer relies on, so it is pure (no I/O) and
//! tested exhaustively: every data type in every word and byte order, scale and
//! offset, enum labels and write limits. The rule it enforces for writes is the
//! product's first rule: a value is turned into registers only if it fits the
//! point's type, enum and limits exactly; anything else is refused with a reason
//! and nothing is produced to write.

use std::fmt;

/// A typed value as it flows between the twin adapters and the device actors.
///
/// Created by a twin adapter from JSON (for writes) or by [`Point::decode`]
/// from registers (for reads); never contains JSON itself.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A coil, a discrete input, a bit of a register or a `bool` point.
    Bool(bool),
    /// A signed integer (unscaled `i16`/`i32`/`i64` points, and small unsigned ones).
    Int(i64),
    /// An unsigned integer too large for `Int` (only `u64` points produce it).
    UInt(u64),
    /// A float, or any value with a scale or offset applied.
    Float(f64),
    /// A string point, or an enum label.
    Text(String),
}

impl Value {
    /// The value as a number, for limits, deadbands and scaling.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Bool(b) => Some(if b { 1.0 } else { 0.0 }),
            Value::Int(i) => Some(i as f64),
            Value::UInt(u) => Some(u as f64),
            Value::Float(f) => Some(f),
            Value::Text(_) => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::UInt(u) => write!(f, "{u}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Text(s) => write!(f, "{s:?}"),
        }
    }
}

/// The four Modbus data tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// Read-write single bits (function codes 1, 5, 15).
    Coil,
    /// Read-only single bits (function code 2).
    DiscreteInput,
    /// Read-only 16-bit registers (function code 4).
    InputRegister,
    /// Read-write 16-bit registers (function codes 3, 6, 16).
    HoldingRegister,
}

impl Table {
    /// Whether the table holds single bits rather than 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }

    /// Whether the Modbus protocol allows writing this table at all.
    pub fn is_writable(self) -> bool {
        matches!(self, Table::Coil | Table::HoldingRegister)
    }

    /// The name used in `gateway.yaml` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::DiscreteInput => "discrete",
            Table::InputRegister => "input",
            Table::HoldingRegister => "holding",
        }
    }
}

/// The value type of a point, which fixes how many registers it spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataType {
    /// One bit (coil, discrete input or a bit of a register), or a register that is 0 or 1.
    Bool,
    /// One register, unsigned.
    U16,
    /// One register, two's complement.
    I16,
    /// Two registers, unsigned.
    U32,
    /// Two registers, two's complement.
    I32,
    /// Two registers, IEEE 754 single precision.
    F32,
    /// Four registers, unsigned.
    U64,
    /// Four registers, two's complement.
    I64,
    /// Four registers, IEEE 754 double precision.
    F64,
    /// `len` bytes of text, two per register, NUL-padded.
    String {
        /// Length in bytes (characters of ASCII text).
        len: u16,
    },
}

impl DataType {
    /// Registers spanned by a register point of this type.
    pub fn registers(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String { len } => len.div_ceil(2),
        }
    }

    /// The smallest and largest raw (unscaled) value of an integer type.
    fn int_range(self) -> Option<(f64, f64)> {
        Some(match self {
            DataType::Bool => (0.0, 1.0),
            DataType::U16 => (0.0, u16::MAX as f64),
            DataType::I16 => (i16::MIN as f64, i16::MAX as f64),
            DataType::U32 => (0.0, u32::MAX as f64),
            DataType::I32 => (i32::MIN as f64, i32::MAX as f64),
            DataType::U64 => (0.0, u64::MAX as f64),
            DataType::I64 => (i64::MIN as f64, i64::MAX as f64),
            _ => return None,
        })
    }

    /// The name used in `gateway.yaml` and in messages.
    pub fn name(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::F32 => "f32",
            DataType::U64 => "u64",
            DataType::I64 => "i64",
            DataType::F64 => "f64",
            DataType::String { .. } => "string",
        }
    }
}

/// Byte or word order of a multi-byte value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Order {
    /// Most significant first (the Modbus convention).
    #[default]
    Big,
    /// Least significant first.
    Little,
}

/// Who may read or write a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Polled and reported; writes are refused.
    Read,
    /// Written on request, never polled (e.g. a trigger register).
    Write,
    /// Polled, reported and writable.
    ReadWrite,
}

impl Access {
    /// Whether the point is polled and reported.
    pub fn readable(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }

    /// Whether the point accepts writes.
    pub fn writable(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// Where a point lives on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// The table the point is in.
    pub table: Table,
    /// Zero-based address of the first bit or register.
    pub address: u16,
    /// For a bit of a register: which bit (0 = least significant).
    pub bit: Option<u8>,
}

/// A label ⇄ raw value map (`on: true`, `auto: 0`).
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    /// What the twin sees.
    pub name: String,
    /// What the device holds (before scaling, which labels never use).
    pub raw: i64,
}

/// One configured point, validated: the runtime never sees a raw config point.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// JSON path in the twin state, e.g. `deviceAttrib.motorStatus`.
    pub path: String,
    /// Where it is on the device.
    pub location: Location,
    /// Value type.
    pub data_type: DataType,
    /// Order of the registers of a multi-register value.
    pub word_order: Order,
    /// Order of the two bytes inside each register.
    pub byte_order: Order,
    /// Engineering value = raw × scale + offset.
    pub scale: f64,
    /// See `scale`.
    pub offset: f64,
    /// Enum labels; when present, the twin sees and writes only these names.
    pub labels: Vec<Label>,
    /// Read, write or both.
    pub access: Access,
    /// Lowest engineering value a write may set.
    pub min: Option<f64>,
    /// Highest engineering value a write may set.
    pub max: Option<f64>,
    /// When non-empty, the only engineering values a write may set.
    pub allowed: Vec<f64>,
    /// Smallest change that counts as a change for report-on-change.
    pub deadband: f64,
}

/// What a write turns into on the wire.
#[derive(Clone, Debug, PartialEq)]
pub enum Encoded {
    /// Values for coils starting at the point's address.
    Bits(Vec<bool>),
    /// Values for holding registers starting at the point's address.
    Words(Vec<u16>),
    /// One bit of a holding register: needs a read-modify-write.
    RegisterBit {
        /// Bit number, 0 = least significant.
        bit: u8,
        /// New state of the bit.
        value: bool,
    },
}

impl Point {
    /// How many bits or registers the point spans.
    pub fn width(&self) -> u16 {
        if self.location.table.is_bits() || self.location.bit.is_some() {
            1
        } else {
            self.data_type.registers()
        }
    }

    /// First and last address (inclusive) the point occupies.
    pub fn span(&self) -> (u32, u32) {
        let start = u32::from(self.location.address);
        (start, start + u32::from(self.width()) - 1)
    }

    fn is_scaled(&self) -> bool {
        self.scale != 1.0 || self.offset != 0.0
    }

    /// Turns bits read from a coil or discrete-input point into its value.
    pub fn decode_bits(&self, bits: &[bool]) -> Result<Value, String> {
        let &bit = bits.first().ok_or("the device returned no bits")?;
        Ok(self.present(Raw::Int(i64::from(bit))))
    }

    /// Turns registers read from a register point into its value.
    pub fn decode_words(&self, words: &[u16]) -> Result<Value, String> {
        if let Some(bit) = self.location.bit {
            let &w = words.first().ok_or("the device returned no register")?;
            if bit > 15 {
                return Err(format!("bit {bit} is outside a 16-bit register"));
            }
            return Ok(self.present(Raw::Int(i64::from((w >> bit) & 1))));
        }
        let n = usize::from(self.data_type.registers());
        if words.len() < n {
            return Err(format!("expected {n} registers, the device returned {}", words.len()));
        }
        let bytes = self.to_bytes(&words[..n]);
        let raw = match self.data_type {
            DataType::Bool => Raw::Int(i64::from(u16::from_be_bytes([bytes[0], bytes[1]]) != 0)),
            DataType::U16 => Raw::Int(i64::from(u16::from_be_bytes([bytes[0], bytes[1]]))),
            DataType::I16 => Raw::Int(i64::from(i16::from_be_bytes([bytes[0], bytes[1]]))),
            DataType::U32 => Raw::Int(i64::from(u32::from_be_bytes(arr(&bytes)))),
            DataType::I32 => Raw::Int(i64::from(i32::from_be_bytes(arr(&bytes)))),
            DataType::F32 => Raw::Float(shortest_f64(f32::from_be_bytes(arr(&bytes)))),
            DataType::U64 => {
                let u = u64::from_be_bytes(arr(&bytes));
                match i64::try_from(u) {
                    Ok(i) => Raw::Int(i),
                    Err(_) => Raw::UInt(u),
                }
            }
            DataType::I64 => Raw::Int(i64::from_be_bytes(arr(&bytes))),
            DataType::F64 => Raw::Float(f64::from_be_bytes(arr(&bytes))),
            DataType::String { len } => {
                // The pad byte of an odd length is not part of the text.
                let bytes = &bytes[..usize::from(len)];
                let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
                let text = String::from_utf8_lossy(&bytes[..end]);
                return Ok(Value::Text(text.trim_end().to_string()));
            }
        };
        Ok(self.present(raw))
    }

    /// Applies labels, scale and offset to a raw device value.
    fn present(&self, raw: Raw) -> Value {
        if !self.labels.is_empty() {
            if let Raw::Int(i) = raw {
                if let Some(label) = self.labels.iter().find(|l| l.raw == i) {
                    return Value::Text(label.name.clone());
                }
            }
            // An unmapped raw value is reported as the number, so the cloud
            // sees what the device really holds rather than a guess.
        } else if self.data_type == DataType::Bool || self.location.table.is_bits() {
            if let Raw::Int(i) = raw {
                return Value::Bool(i != 0);
            }
        }
        if self.is_scaled() {
            let (scale, offset) = (self.scale, self.offset);
            return Value::Float(match raw {
                Raw::Int(i) => round_scaled(i as f64 * scale + offset, scale, offset),
                Raw::UInt(u) => round_scaled(u as f64 * scale + offset, scale, offset),
                // A float is finer than the steps of its scale: only the noise
                // of the arithmetic is removed, never real digits.
                Raw::Float(f) => round_significant(f * scale + offset),
            });
        }
        match raw {
            Raw::Int(i) => Value::Int(i),
            Raw::UInt(u) => Value::UInt(u),
            Raw::Float(f) => Value::Float(f),
        }
    }

    /// Checks a value against access, type, labels and limits and turns it
    /// into what to write. An `Err` says why in words meant for the person
    /// who sent it.
    pub fn encode(&self, value: &Value) -> Result<Encoded, String> {
        if !self.access.writable() {
            return Err("the point is read-only".to_string());
        }
        if !self.location.table.is_writable() {
            return Err(format!("a {} cannot be written", self.location.table.name()));
        }
        self.encode_checked(value, true)
    }

    /// Encodes a value the device itself may hold, checking only that it fits
    /// the type and labels: for the simulator, and for checking limits in the
    /// configuration. Never use it for a write that came from outside.
    pub fn encode_device_value(&self, value: &Value) -> Result<Encoded, String> {
        self.encode_checked(value, false)
    }

    fn encode_checked(&self, value: &Value, limits: bool) -> Result<Encoded, String> {
        let raw = self.raw_for_write(value, limits)?;
        if self.location.table == Table::Coil {
            return Ok(Encoded::Bits(vec![raw != RawWrite::Int(0)]));
        }
        if let Some(bit) = self.location.bit {
            return Ok(Encoded::RegisterBit { bit, value: raw != RawWrite::Int(0) });
        }
        let bytes: Vec<u8> = match (self.data_type, raw) {
            (DataType::Bool | DataType::U16 | DataType::I16, RawWrite::Int(i)) => {
                (i as u16).to_be_bytes().to_vec()
            }
            (DataType::U32 | DataType::I32, RawWrite::Int(i)) => (i as u32).to_be_bytes().to_vec(),
            (DataType::U64, RawWrite::UInt(u)) => u.to_be_bytes().to_vec(),
            (DataType::U64 | DataType::I64, RawWrite::Int(i)) => i.to_be_bytes().to_vec(),
            (DataType::F32, RawWrite::Float(f)) => (f as f32).to_be_bytes().to_vec(),
            (DataType::F64, RawWrite::Float(f)) => f.to_be_bytes().to_vec(),
            (DataType::String { len }, RawWrite::Text(ref s)) => {
                let mut b = s.as_bytes().to_vec();
                b.resize(usize::from(len.div_ceil(2)) * 2, 0);
                b
            }
            (t, r) => return Err(format!("internal: cannot encode {r:?} as {}", t.name())),
        };
        Ok(Encoded::Words(self.from_bytes(&bytes)))
    }

    /// The raw (device-side) value for a write, after every check.
    fn raw_for_write(&self, value: &Value, limits: bool) -> Result<RawWrite, String> {
        if !self.labels.is_empty() {
            let names = || self.labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ");
            let Value::Text(name) = value else {
                return Err(format!("expected one of: {}; got {value}", names()));
            };
            let label = self.labels.iter().find(|l| &l.name == name);
            let label = label.ok_or_else(|| format!("unknown value {name:?}; expected one of: {}", names()))?;
            let bitwise = self.location.table.is_bits() || self.location.bit.is_some();
            let (lo, hi) = if bitwise { (0.0, 1.0) } else { self.data_type.int_range().unwrap_or((0.0, 0.0)) };
            let raw = label.raw as f64;
            if raw < lo || raw > hi {
                return Err(format!("label {name:?} maps to {}, which does not fit a {}", label.raw, self.data_type.name()));
            }
            return Ok(RawWrite::Int(label.raw));
        }
        if let DataType::String { len } = self.data_type {
            let Value::Text(s) = value else {
                return Err(format!("expected a string of at most {len} characters; got {value}"));
            };
            if !s.is_ascii() || s.len() > usize::from(len) {
                return Err(format!("expected ASCII text of at most {len} characters; got {} bytes", s.len()));
            }
            return Ok(RawWrite::Text(s.clone()));
        }
        let is_bool = self.data_type == DataType::Bool || self.location.table.is_bits() || self.location.bit.is_some();
        if is_bool {
            return match value {
                Value::Bool(b) => Ok(RawWrite::Int(i64::from(*b))),
                _ => Err(format!("expected true or false; got {value}")),
            };
        }
        let eng = match value {
            Value::Int(_) | Value::UInt(_) | Value::Float(_) => value.as_f64().unwrap_or(f64::NAN),
            Value::Bool(_) | Value::Text(_) => return Err(format!("expected a number; got {value}")),
        };
        if !eng.is_finite() {
            return Err("expected a finite number".to_string());
        }
        if let Some(min) = self.min.filter(|_| limits) {
            if eng < min {
                return Err(format!("{eng} is below the minimum {min}"));
            }
        }
        if let Some(max) = self.max.filter(|_| limits) {
            if eng > max {
                return Err(format!("{eng} is above the maximum {max}"));
            }
        }
        if limits && !self.allowed.is_empty() && !self.allowed.iter().any(|a| close(*a, eng)) {
            let list = self.allowed.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ");
            return Err(format!("{eng} is not an allowed value; allowed: {list}"));
        }
        match self.data_type {
            DataType::F32 => {
                let raw = (eng - self.offset) / self.scale;
                if raw.abs() > f64::from(f32::MAX) {
                    return Err(format!("{eng} does not fit in an f32"));
                }
                Ok(RawWrite::Float(raw))
            }
            DataType::F64 => Ok(RawWrite::Float((eng - self.offset) / self.scale)),
            t => self.raw_integer(value, eng, t),
        }
    }

    /// Integer types: exact for unscaled values, so that a u64 or i64 is never
    /// rounded through a float, and checked for fit after inverse scaling.
    fn raw_integer(&self, value: &Value, eng: f64, t: DataType) -> Result<RawWrite, String> {
        let (lo, hi) = t.int_range().unwrap_or((0.0, 0.0));
        let fits = |what: &dyn fmt::Display| format!("{what} does not fit in a {} (range {lo}..={hi})", t.name());
        if !self.is_scaled() {
            let (i, u) = match *value {
                Value::Int(i) => (Some(i), u64::try_from(i).ok()),
                Value::UInt(u) => (i64::try_from(u).ok(), Some(u)),
                _ => {
                    if eng.fract() != 0.0 {
                        return Err(format!("{eng} is not a whole number, and a {} holds whole numbers", t.name()));
                    }
                    (float_to_i64(eng), float_to_u64(eng))
                }
            };
            return match t {
                DataType::U64 => u.map(RawWrite::UInt).ok_or_else(|| fits(value)),
                DataType::I64 => i.map(RawWrite::Int).ok_or_else(|| fits(value)),
                _ => match i {
                    Some(i) if (i as f64) >= lo && (i as f64) <= hi => Ok(RawWrite::Int(i)),
                    _ => Err(fits(value)),
                },
            };
        }
        let raw = (eng - self.offset) / self.scale;
        let rounded = raw.round();
        // A value that falls between two steps of the scale cannot be written
        // exactly; refusing it beats writing a silently different value.
        if (raw - rounded).abs() > 1e-6 * rounded.abs().max(1.0) {
            return Err(format!(
                "{eng} is not a multiple of the scale {} (offset {}): the device cannot hold it exactly",
                self.scale, self.offset
            ));
        }
        if rounded < lo || rounded > hi {
            return Err(fits(&format!("{eng} (raw {rounded})")));
        }
        match t {
            DataType::U64 => float_to_u64(rounded).map(RawWrite::UInt).ok_or_else(|| fits(&rounded)),
            _ => float_to_i64(rounded).map(RawWrite::Int).ok_or_else(|| fits(&rounded)),
        }
    }

    /// Registers → big-endian bytes, undoing the point's word and byte order.
    fn to_bytes(&self, words: &[u16]) -> Vec<u8> {
        let mut ordered: Vec<u16> = words.to_vec();
        if self.word_order == Order::Little {
            ordered.reverse();
        }
        let mut bytes = Vec::with_capacity(ordered.len() * 2);
        for w in ordered {
            let b = w.to_be_bytes();
            match self.byte_order {
                Order::Big => bytes.extend_from_slice(&b),
                Order::Little => bytes.extend_from_slice(&[b[1], b[0]]),
            }
        }
        bytes
    }

    /// Big-endian bytes → registers in the point's word and byte order.
    fn from_bytes(&self, bytes: &[u8]) -> Vec<u16> {
        let mut words: Vec<u16> = bytes
            .chunks(2)
            .map(|c| {
                let (hi, lo) = (c[0], c.get(1).copied().unwrap_or(0));
                match self.byte_order {
                    Order::Big => u16::from_be_bytes([hi, lo]),
                    Order::Little => u16::from_be_bytes([lo, hi]),
                }
            })
            .collect();
        if self.word_order == Order::Little {
            words.reverse();
        }
        words
    }
}

/// A raw value read from the device, before labels and scaling.
#[derive(Clone, Copy, Debug)]
enum Raw {
    Int(i64),
    UInt(u64),
    Float(f64),
}

/// A raw value to write, after every check.
#[derive(Clone, Debug, PartialEq)]
enum RawWrite {
    Int(i64),
    UInt(u64),
    Float(f64),
    Text(String),
}

fn arr<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn float_to_i64(x: f64) -> Option<i64> {
    (x >= i64::MIN as f64 && x < i64::MAX as f64).then_some(x as i64)
}

/// The f32 as the shortest decimal that reads back as the same f32: a device
/// holding 42.1f32 reports 42.1, not 42.099998474121094 (which would never
/// equal the 42.1 a cloud asked for).
fn shortest_f64(x: f32) -> f64 {
    if !x.is_finite() {
        return f64::from(x);
    }
    x.to_string().parse::<f64>().unwrap_or(f64::from(x))
}

fn float_to_u64(x: f64) -> Option<u64> {
    (x >= 0.0 && x < u64::MAX as f64).then_some(x as u64)
}

/// Rounds integer × scale + offset to the decimals the scale and offset carry,
/// so that 215 × 0.1 reads as 21.5 and not 21.500000000000004, 1 × 0.125 as
/// 0.125 and 300 − 273.15 as 26.85: the exact decimal result, which has no
/// more decimals than the scale and the offset.
fn round_scaled(x: f64, scale: f64, offset: f64) -> f64 {
    let decimals = decimals(scale).max(decimals(offset));
    if !x.is_finite() || decimals > 15 {
        return x;
    }
    let factor = 10f64.powi(decimals as i32);
    let shifted = x * factor;
    if shifted.abs() >= 9_007_199_254_740_992.0 {
        // Beyond 2^53 an f64 holds no fraction to round.
        return x;
    }
    shifted.round() / factor
}

/// Digits after the decimal point in the shortest representation of `x`.
fn decimals(x: f64) -> usize {
    x.abs().to_string().split_once('.').map_or(0, |(_, fraction)| fraction.len())
}

/// Rounds to 15 significant digits (all an f64 holds reliably), so that
/// 215.0 × 0.1 reads as 21.5 without losing any digit a float really carries.
fn round_significant(x: f64) -> f64 {
    if !x.is_finite() {
        return x;
    }
    format!("{x:.14e}").parse().unwrap_or(x)
}

#[cfg(test)]
mod tests;
