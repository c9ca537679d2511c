//! One point: a typed value in the twin ⇄ a Modbus location on the device.
//!
//! This is the codec every other layer relies on, so it is pure (no I/O) and
//! tested exhaustively: every data type in every word and byte order, scale and
//! offset, enum labels and write limits. The rule it enforces for writes is the
//! product's first rule: a value is turned into registers only if it fits the
//! point's type, enum and limits exactly; anything else is refused with a reason
//! and nothing is produced to write.
//!
//! "Exactly" is checked twice. Limits apply to the value asked for, compared
//! as numbers (integers as integers, see `number.rs`), and then the registers
//! about to be written are decoded again, as a read would, and that value too
//! must lie within the limits and be what was asked: the same integer; for a
//! scaled integer point, the reading of the step the value was on; for an
//! f32 or f64 point, the float nearest to it. A value between two steps of a
//! scale is refused with the nearest valid values, never rounded.

use std::cmp::Ordering;
use std::fmt;

mod number;

pub use number::Number;
use number::{shown, Scaling, Step};

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
            Value::Float(x) => f.write_str(&shown(*x)),
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
    fn int_range(self) -> Option<(i128, i128)> {
        Some(match self {
            DataType::Bool => (0, 1),
            DataType::U16 => (0, u16::MAX.into()),
            DataType::I16 => (i16::MIN.into(), i16::MAX.into()),
            DataType::U32 => (0, u32::MAX.into()),
            DataType::I32 => (i32::MIN.into(), i32::MAX.into()),
            DataType::U64 => (0, u64::MAX.into()),
            DataType::I64 => (i64::MIN.into(), i64::MAX.into()),
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
    /// Lowest engineering value a write may set. Kept as written (an integer
    /// stays exact) by the config validation, which also checks that the
    /// point can hold it; compared exactly by `encode`.
    pub min: Option<Number>,
    /// Highest engineering value a write may set; see `min`.
    pub max: Option<Number>,
    /// When non-empty, the only engineering values a write may set; see `min`.
    pub allowed: Vec<Number>,
    /// Smallest change that counts as a change for report-on-change.
    pub deadband: f64,
    /// A pulse, reset or counter-like register: a write of it is sent once
    /// and never again, not even after its reply is lost, and never merged
    /// with another point's write (a retry of the other would resend it).
    pub trigger: bool,
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
        // A number's registers (at most 4) are put in order on the stack: a
        // poll decodes every value of every device, and allocated twice per
        // value when this was a vector.
        let mut number = [0u8; 8];
        let mut text = Vec::new();
        let bytes: &mut [u8] = match self.data_type {
            DataType::String { .. } => {
                text.resize(2 * n, 0);
                &mut text
            }
            _ => number.get_mut(..2 * n).ok_or("a number of more than 4 registers")?,
        };
        self.to_bytes(&words[..n], bytes);
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
            let scaling = self.scaling();
            return Value::Float(match raw {
                Raw::Int(i) => scaling.reading(i.into()),
                Raw::UInt(u) => scaling.reading(u.into()),
                // A float is finer than the steps of its scale: only the noise
                // of the arithmetic is removed, never real digits.
                Raw::Float(f) => round_significant(f * self.scale + self.offset),
            });
        }
        match raw {
            Raw::Int(i) => Value::Int(i),
            Raw::UInt(u) => Value::UInt(u),
            Raw::Float(f) => Value::Float(f),
        }
    }

    fn scaling(&self) -> Scaling {
        Scaling::new(self.scale, self.offset)
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
    /// the type, labels and steps: for the simulator, and for the values a
    /// configuration gives (initial values, `check` steps). Never use it for
    /// a write that came from outside.
    pub fn encode_device_value(&self, value: &Value) -> Result<Encoded, String> {
        self.encode_checked(value, false)
    }

    /// Whether the device can hold `n` exactly: encoded (limits aside) and
    /// read back, it is `n` again. `twinbus check` asks this of every limit,
    /// so that a limit is itself a value a write can set.
    pub fn holds(&self, n: Number) -> Result<(), String> {
        let encoded = self.encode_checked(&n.to_value(), false)?;
        let held = self.read_back(&encoded)?;
        if Number::of(&held) == Some(n) {
            Ok(())
        } else {
            Err(format!("{n} cannot be held exactly by this {} point: it would read back as {held}", self.type_name()))
        }
    }

    fn encode_checked(&self, value: &Value, limits: bool) -> Result<Encoded, String> {
        let (raw, asked) = self.raw_for_write(value, limits)?;
        let encoded = self.to_encoded(raw)?;
        if let Some(asked) = asked {
            self.check_read_back(asked, &encoded, limits)?;
        }
        Ok(encoded)
    }

    fn to_encoded(&self, raw: RawWrite) -> Result<Encoded, String> {
        if self.location.table == Table::Coil {
            return Ok(Encoded::Bits(vec![raw != RawWrite::Int(0)]));
        }
        if let Some(bit) = self.location.bit {
            return Ok(Encoded::RegisterBit { bit, value: raw != RawWrite::Int(0) });
        }
        // Every integer reaching here lies in its type's range, so keeping
        // the low bytes is the two's complement encoding.
        let bytes: Vec<u8> = match (self.data_type, raw) {
            (DataType::Bool | DataType::U16 | DataType::I16, RawWrite::Int(i)) => (i as u16).to_be_bytes().to_vec(),
            (DataType::U32 | DataType::I32, RawWrite::Int(i)) => (i as u32).to_be_bytes().to_vec(),
            (DataType::U64 | DataType::I64, RawWrite::Int(i)) => (i as u64).to_be_bytes().to_vec(),
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

    /// The value a read would return once `encoded` is on the device.
    pub fn read_back(&self, encoded: &Encoded) -> Result<Value, String> {
        let decoded = match encoded {
            Encoded::Words(words) => self.decode_words(words),
            Encoded::Bits(bits) => self.decode_bits(bits),
            Encoded::RegisterBit { value, .. } => Ok(self.present(Raw::Int(i64::from(*value)))),
        };
        decoded.map_err(|e| format!("internal: the encoded value does not decode: {e}"))
    }

    /// Decodes what is about to be written and checks it is what was asked:
    /// the limits again, and the meaning of "exactly" for the point's type.
    fn check_read_back(&self, asked: Number, encoded: &Encoded, limits: bool) -> Result<(), String> {
        let held_value = self.read_back(encoded)?;
        let Some(held) = Number::of(&held_value).filter(|h| h.is_finite()) else {
            return Err(format!("{asked} does not fit in {}", self.type_name_with_article()));
        };
        let v = asked.to_f64();
        let exact = match self.data_type {
            DataType::F64 if !self.is_scaled() => held.to_f64().to_bits() == v.to_bits(),
            DataType::F32 if !self.is_scaled() => (held.to_f64() as f32).to_bits() == nearest_f32(asked).to_bits(),
            // A scaled float holds the float nearest to (v - offset) / scale:
            // there is no step to be on, and the reading is what the device has.
            DataType::F32 | DataType::F64 => true,
            _ if self.is_scaled() => (held.to_f64() - v).abs() <= self.scaling().tolerance(v),
            _ => held == asked,
        };
        if !exact {
            // A bug in this codec, never a user error: refuse rather than write.
            return Err(format!("internal: {asked} would be written as {held}"));
        }
        if limits {
            self.within_limits(held).map_err(|why| {
                if held == asked {
                    format!("{asked} {why}")
                } else {
                    format!("{asked} would be held by the device as {held}, which {why}")
                }
            })?;
        }
        Ok(())
    }

    /// Whether `x` passes min, max and allowed; the `Err` completes a
    /// sentence whose subject is the value.
    fn within_limits(&self, x: Number) -> Result<(), String> {
        if let Some(min) = self.min {
            if matches!(x.partial_cmp(&min), Some(Ordering::Less) | None) {
                return Err(format!("is below the minimum {min}"));
            }
        }
        if let Some(max) = self.max {
            if matches!(x.partial_cmp(&max), Some(Ordering::Greater) | None) {
                return Err(format!("is above the maximum {max}"));
            }
        }
        if !self.allowed.is_empty() && !self.allowed.contains(&x) {
            let list = self.allowed.iter().map(Number::to_string).collect::<Vec<_>>().join(", ");
            return Err(format!("is not an allowed value; allowed: {list}"));
        }
        Ok(())
    }

    fn type_name(&self) -> &'static str {
        self.data_type.name()
    }

    fn type_name_with_article(&self) -> String {
        match self.data_type {
            DataType::F32 | DataType::F64 | DataType::I16 | DataType::I32 | DataType::I64 => {
                format!("an {}", self.type_name())
            }
            _ => format!("a {}", self.type_name()),
        }
    }

    /// The raw (device-side) value for a write, after the type, label, step
    /// and (when `limits`) limit checks on the value asked; and that value,
    /// for a numeric point, to check again once encoded.
    fn raw_for_write(&self, value: &Value, limits: bool) -> Result<(RawWrite, Option<Number>), String> {
        if !self.labels.is_empty() {
            let names = || self.labels.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ");
            let Value::Text(name) = value else {
                return Err(format!("expected one of: {}; got {value}", names()));
            };
            let label = self.labels.iter().find(|l| &l.name == name);
            let label = label.ok_or_else(|| format!("unknown value {name:?}; expected one of: {}", names()))?;
            let bitwise = self.location.table.is_bits() || self.location.bit.is_some();
            let (lo, hi) = if bitwise { (0, 1) } else { self.data_type.int_range().unwrap_or((0, 0)) };
            if !(lo..=hi).contains(&i128::from(label.raw)) {
                return Err(format!(
                    "label {name:?} maps to {}, which does not fit a {}",
                    label.raw,
                    self.data_type.name()
                ));
            }
            return Ok((RawWrite::Int(label.raw.into()), None));
        }
        if let DataType::String { len } = self.data_type {
            let Value::Text(s) = value else {
                return Err(format!("expected a string of at most {len} characters; got {value}"));
            };
            if !s.is_ascii() || s.len() > usize::from(len) {
                return Err(format!("expected ASCII text of at most {len} characters; got {} bytes", s.len()));
            }
            if s.contains('\0') {
                // The device would hold it, but a read stops at the NUL.
                return Err("the text contains a NUL character, which would end it on the device".to_string());
            }
            return Ok((RawWrite::Text(s.clone()), None));
        }
        let is_bool = self.data_type == DataType::Bool || self.location.table.is_bits() || self.location.bit.is_some();
        if is_bool {
            return match value {
                Value::Bool(b) => Ok((RawWrite::Int(i128::from(*b)), None)),
                _ => Err(format!("expected true or false; got {value}")),
            };
        }
        let Some(asked) = Number::of(value) else {
            return Err(format!("expected a number; got {value}"));
        };
        if !asked.is_finite() {
            return Err("expected a finite number".to_string());
        }
        if limits {
            self.within_limits(asked).map_err(|why| format!("{asked} {why}"))?;
        }
        let raw = match self.data_type {
            DataType::F32 | DataType::F64 => self.raw_float(asked)?,
            t => self.raw_integer(asked, t)?,
        };
        Ok((raw, Some(asked)))
    }

    /// f32 and f64: the float nearest to (value - offset) / scale.
    fn raw_float(&self, asked: Number) -> Result<RawWrite, String> {
        let raw = match asked {
            // An integer rounded once, to its nearest f32: through an f64 it
            // could round twice and land on the f32 on its other side.
            Number::Int(i) if self.data_type == DataType::F32 && !self.is_scaled() => f64::from(i as f32),
            _ => (asked.to_f64() - self.offset) / self.scale,
        };
        let fits = match self.data_type {
            DataType::F32 => raw.abs() <= f64::from(f32::MAX),
            _ => raw.is_finite(),
        };
        if !fits {
            return Err(format!("{asked} does not fit in {}", self.type_name_with_article()));
        }
        Ok(RawWrite::Float(raw))
    }

    /// Integer types: exact for unscaled values, so that a u64 or i64 is never
    /// rounded through a float; on a step for scaled ones.
    fn raw_integer(&self, asked: Number, t: DataType) -> Result<RawWrite, String> {
        let (lo, hi) = t.int_range().unwrap_or((0, 0));
        let fits = |what: &dyn fmt::Display| format!("{what} does not fit in a {} (range {lo}..={hi})", t.name());
        if self.is_scaled() {
            return self.raw_step(asked, t, (lo, hi)).map(RawWrite::Int);
        }
        let whole = match asked {
            Number::Int(i) => i,
            Number::Float(f) if f.fract() != 0.0 => {
                let around: Vec<String> = [f.floor(), f.ceil()]
                    .iter()
                    .filter(|x| Number::Float(**x) >= Number::Int(lo) && Number::Float(**x) <= Number::Int(hi))
                    .map(|x| shown(*x))
                    .collect();
                let nearest = match around.as_slice() {
                    [] => String::new(),
                    [one] => format!(" (nearest valid value {one})"),
                    [a, b, ..] => format!(" (nearest valid values {a} and {b})"),
                };
                return Err(format!("{} is not a whole number, and a {} holds whole numbers{nearest}", shown(f), t.name()));
            }
            Number::Float(f) => {
                if Number::Float(f) < Number::Int(lo) || Number::Float(f) > Number::Int(hi) {
                    return Err(fits(&shown(f)));
                }
                if f.abs() >= TWO_POW_53 {
                    // Beyond 2^53 a float stands for several integers: the
                    // digits written may not be the ones it holds.
                    return Err(format!(
                        "{} is beyond 2^53, where a number with a decimal point or an exponent may already be rounded: give it as an integer, digits only",
                        shown(f)
                    ));
                }
                f as i128
            }
        };
        if !(lo..=hi).contains(&whole) {
            return Err(fits(&asked));
        }
        Ok(RawWrite::Int(whole))
    }

    /// A scaled integer point: the raw value of the step `asked` is on.
    fn raw_step(&self, asked: Number, t: DataType, range: (i128, i128)) -> Result<i128, String> {
        let fits = |what: &dyn fmt::Display| {
            format!("{what} does not fit in a {} (range {}..={})", t.name(), range.0, range.1)
        };
        let v = asked.to_f64();
        if Number::Float(v) != asked {
            // Beyond 2^53 not every integer has an f64, and a scaled value is one.
            return Err(format!(
                "{asked} cannot be scaled exactly: it is beyond 2^53 and has no 64-bit float of its own"
            ));
        }
        match self.scaling().step(v, range) {
            Step::On(n) => Ok(n),
            Step::Outside(q) => Err(fits(&format!("{asked} (raw {})", raw_text(q)))),
            Step::Between(below, above) => {
                let offset =
                    if self.offset != 0.0 { format!(" from the offset {}", shown(self.offset)) } else { String::new() };
                let nearest = match (below, above) {
                    (Some(b), Some(a)) => format!("nearest valid values {} and {}", shown(b), shown(a)),
                    (Some(x), None) | (None, Some(x)) => format!("nearest valid value {}", shown(x)),
                    (None, None) => "no valid value near".to_string(),
                };
                Err(format!("{asked} is between two steps of {}{offset}: {nearest}", shown(self.scale)))
            }
        }
    }

    /// Registers → big-endian bytes, undoing the point's word and byte order.
    /// Registers in the point's word and byte order → big-endian bytes, into
    /// `out` (two bytes per register).
    fn to_bytes(&self, words: &[u16], out: &mut [u8]) {
        let ordered = words.iter().enumerate().map(|(k, &w)| if self.word_order == Order::Little { words[words.len() - 1 - k] } else { w });
        for (w, pair) in ordered.zip(out.chunks_exact_mut(2)) {
            let b = w.to_be_bytes();
            pair.copy_from_slice(&match self.byte_order {
                Order::Big => b,
                Order::Little => [b[1], b[0]],
            });
        }
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
    /// Any integer type's raw value (i128 holds both i64 and u64).
    Int(i128),
    Float(f64),
    Text(String),
}

/// 2^53: the last integer before which every integer has an f64 of its own.
const TWO_POW_53: f64 = 9_007_199_254_740_992.0;

fn arr<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&bytes[..N]);
    a
}

/// The f32 nearest to a number, rounded once.
fn nearest_f32(n: Number) -> f32 {
    match n {
        Number::Int(i) => i as f32,
        Number::Float(f) => f as f32,
    }
}

/// A raw value worked out in floating point, for a message.
fn raw_text(q: f64) -> String {
    if q.abs() < 1e21 {
        q.round().to_string()
    } else {
        format!("{q:e}")
    }
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
