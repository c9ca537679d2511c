//! What the user wrote in `gateway.yaml`, field for field.
//!
//! These types only describe the file's shape: serde rejects unknown keys and
//! wrong YAML types here, with a line and column. Everything that needs a
//! judgement (ranges, references, overlaps) happens in `validate.rs`, which
//! turns these types into the runtime types of `config/mod.rs`; nothing outside
//! `config/` sees a raw type. Values that `validate` must point at are wrapped
//! in `Spanned` so that its messages carry `FILE:LINE:COL`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A mapping key together with its position, ordered by its text.
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub(crate) struct Key(pub(crate) Spanned<String>);

impl Key {
    pub(crate) fn name(&self) -> &str {
        &self.0.value
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.value.cmp(&other.0.value)
    }
}

pub(crate) type S<T> = Spanned<T>;
pub(crate) type Map<T> = BTreeMap<Key, T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    #[serde(default)]
    pub(crate) connections: Map<RawConnection>,
    #[serde(default)]
    pub(crate) buses: Map<RawBus>,
    #[serde(default)]
    pub(crate) profiles: Map<RawProfile>,
    #[serde(default)]
    pub(crate) devices: Map<RawDevice>,
    #[serde(default)]
    pub(crate) simulators: Map<RawSimulator>,
    pub(crate) state_dir: Option<S<String>>,
    pub(crate) shutdown_timeout: Option<S<String>>,
    pub(crate) http: Option<S<RawHttp>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    pub(crate) listen: S<String>,
    pub(crate) username: Option<S<String>>,
    pub(crate) password: Option<S<String>>,
    pub(crate) password_file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConnection {
    pub(crate) embedded: Option<S<RawEmbedded>>,
    pub(crate) url: Option<S<String>>,
    pub(crate) client_id: Option<S<String>>,
    pub(crate) username: Option<S<String>>,
    pub(crate) password: Option<S<String>>,
    pub(crate) password_file: Option<S<String>>,
    pub(crate) keep_alive: Option<S<String>>,
    pub(crate) tls: Option<S<RawTls>>,
    pub(crate) mqtt_version: Option<S<RawScalar>>,
    pub(crate) clean_session: Option<S<bool>>,
    pub(crate) proxy: Option<S<RawProxy>>,
    pub(crate) presence: Option<S<RawPresence>>,
    pub(crate) reconnect: Option<RawReconnect>,
    pub(crate) outbox: Option<RawOutbox>,
}

/// A scalar YAML may spell as a number or a string (`5`, `3.1.1`).
#[derive(Clone, Debug)]
pub(crate) enum RawScalar {
    Int(i64),
    Float(f64),
    Text(String),
}

// The scalar enums below deserialize through a visitor rather than
// `#[serde(untagged)]`, whose only message for a wrong type is "data did not
// match any variant of untagged enum RawLabel": a visitor says what it got
// and what would be valid ("invalid type: sequence, expected true, false or
// a whole number").

impl<'de> Deserialize<'de> for RawScalar {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = RawScalar;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number or a string")
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawScalar, E> {
                Ok(RawScalar::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawScalar, E> {
                Ok(i64::try_from(v).map_or(RawScalar::Float(v as f64), RawScalar::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<RawScalar, E> {
                Ok(RawScalar::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawScalar, E> {
                Ok(RawScalar::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    pub(crate) url: S<String>,
    pub(crate) username: Option<S<String>>,
    pub(crate) password: Option<S<String>>,
    pub(crate) password_file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPresence {
    pub(crate) topic: S<String>,
    pub(crate) online: Option<String>,
    pub(crate) offline: Option<String>,
    pub(crate) retain: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReconnect {
    pub(crate) min: Option<S<String>>,
    pub(crate) max: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbox {
    pub(crate) max_messages: Option<S<i64>>,
    pub(crate) max_size: Option<S<RawScalar>>,
    pub(crate) max_age: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEmbedded {
    pub(crate) listen: S<String>,
    #[serde(default)]
    pub(crate) users: Map<RawBrokerUser>,
    pub(crate) max_connections: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBrokerUser {
    pub(crate) password: Option<S<String>>,
    pub(crate) password_file: Option<S<String>>,
    pub(crate) publish: Option<Vec<S<String>>>,
    pub(crate) subscribe: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub(crate) ca: Option<S<String>>,
    pub(crate) cert: Option<S<String>>,
    pub(crate) key: Option<S<String>>,
    #[serde(default)]
    pub(crate) alpn: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBus {
    pub(crate) rtu: Option<S<RawRtu>>,
    pub(crate) tcp: Option<S<RawTcp>>,
    pub(crate) timeout: Option<S<String>>,
    pub(crate) retries: Option<S<i64>>,
    pub(crate) delay: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRtu {
    pub(crate) port: S<String>,
    pub(crate) baud: Option<S<i64>>,
    pub(crate) parity: Option<RawParity>,
    pub(crate) data_bits: Option<S<i64>>,
    pub(crate) stop_bits: Option<S<i64>>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawParity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTcp {
    pub(crate) host: S<String>,
    pub(crate) port: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    #[serde(default)]
    pub(crate) points: Map<RawPoint>,
    pub(crate) read: Option<RawReadLimits>,
    pub(crate) mask_write: Option<S<bool>>,
    #[serde(default)]
    pub(crate) commands: Map<RawCommand>,
}

/// A named command: typed arguments and steps.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCommand {
    #[serde(default)]
    pub(crate) args: Map<RawArg>,
    pub(crate) steps: Vec<S<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawArg {
    #[serde(rename = "type")]
    pub(crate) arg_type: RawArgType,
    pub(crate) min: Option<f64>,
    pub(crate) max: Option<f64>,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawArgType {
    Number,
    Bool,
    String,
}

/// One step: `set: {path: value}`, `wait: 2s` or `check: {path: value}`.
/// A value written as `$name` is the argument `name`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawStep {
    // In file order: a step writes its points in the order written.
    Set(indexmap::IndexMap<String, RawSimValue>),
    Wait(String),
    Check(indexmap::IndexMap<String, RawSimValue>),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReadLimits {
    pub(crate) max_registers: Option<S<i64>>,
    pub(crate) max_bits: Option<S<i64>>,
    pub(crate) max_gap: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDevice {
    pub(crate) bus: S<String>,
    pub(crate) unit: S<i64>,
    pub(crate) profile: Option<S<String>>,
    #[serde(default)]
    pub(crate) points: Map<RawPoint>,
    pub(crate) read: Option<RawReadLimits>,
    pub(crate) mask_write: Option<S<bool>>,
    pub(crate) poll: Option<S<String>>,
    pub(crate) twin: Option<S<RawTwin>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTwin {
    pub(crate) connection: S<String>,
    pub(crate) commands: Option<S<String>>,
    pub(crate) responses: Option<S<String>>,
    pub(crate) telemetry: Option<S<String>>,
    pub(crate) telemetry_interval: Option<S<String>>,
    pub(crate) report_on_change: Option<bool>,
    pub(crate) acknowledge: Option<bool>,
    pub(crate) allow_shutdown: Option<bool>,
    pub(crate) response_topics: Option<Vec<S<String>>>,
    pub(crate) shadow: Option<S<RawShadow>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShadow {
    pub(crate) thing: S<String>,
    pub(crate) name: Option<S<String>>,
    pub(crate) errors_key: Option<S<String>>,
    pub(crate) running_interval: Option<S<String>>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPoint {
    pub(crate) coil: Option<S<i64>>,
    pub(crate) discrete: Option<S<i64>>,
    pub(crate) input: Option<S<i64>>,
    pub(crate) holding: Option<S<i64>>,
    pub(crate) bit: Option<S<i64>>,
    #[serde(rename = "type")]
    pub(crate) data_type: Option<S<RawType>>,
    pub(crate) length: Option<S<i64>>,
    pub(crate) word_order: Option<RawOrder>,
    pub(crate) byte_order: Option<RawOrder>,
    pub(crate) scale: Option<S<f64>>,
    pub(crate) offset: Option<S<f64>>,
    pub(crate) values: Option<S<BTreeMap<String, RawLabel>>>,
    pub(crate) access: Option<S<RawAccess>>,
    pub(crate) min: Option<S<RawNumber>>,
    pub(crate) max: Option<S<RawNumber>>,
    pub(crate) allowed: Option<S<Vec<S<RawNumber>>>>,
    pub(crate) deadband: Option<S<f64>>,
}

/// A limit as written: a whole number without a point or an exponent stays
/// an exact integer (a u64 limit of 2^53 + 1 must not become 2^53 + 2 on the
/// way through an f64); anything else is the f64 it reads as.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawNumber {
    Int(i128),
    Float(f64),
}

impl<'de> Deserialize<'de> for RawNumber {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = RawNumber;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawNumber, E> {
                Ok(RawNumber::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawNumber, E> {
                Ok(RawNumber::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<RawNumber, E> {
                Ok(RawNumber::Int(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<RawNumber, E> {
                // Beyond every point type either way; the float says how far.
                Ok(i128::try_from(v).map_or(RawNumber::Float(v as f64), RawNumber::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<RawNumber, E> {
                Ok(RawNumber::Float(v))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    F32,
    U64,
    I64,
    F64,
    String,
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawOrder {
    Big,
    Little,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RawAccess {
    Read,
    Write,
    ReadWrite,
}

/// The device-side value of an enum label: `on: true` or `auto: 0`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawLabel {
    Bool(bool),
    Int(i64),
}

impl<'de> Deserialize<'de> for RawLabel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = RawLabel;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or a whole number (what the device holds for this label)")
            }
            fn visit_bool<E>(self, v: bool) -> Result<RawLabel, E> {
                Ok(RawLabel::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawLabel, E> {
                Ok(RawLabel::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawLabel, E> {
                i64::try_from(v).map(RawLabel::Int).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSimulator {
    pub(crate) listen: S<String>,
    pub(crate) serves: Vec<S<String>>,
    #[serde(default)]
    pub(crate) initial: BTreeMap<Key, S<RawSimValue>>,
    #[serde(default)]
    pub(crate) drift: Vec<S<String>>,
    #[serde(default)]
    pub(crate) mirror: BTreeMap<Key, S<String>>,
}

/// An initial value for a simulated point, as YAML spells it.
#[derive(Clone, Debug)]
pub(crate) enum RawSimValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSimValue {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl serde::de::Visitor<'_> for Visit {
            type Value = RawSimValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a point's value: true, false, a number or a string")
            }
            fn visit_bool<E>(self, v: bool) -> Result<RawSimValue, E> {
                Ok(RawSimValue::Bool(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawSimValue, E> {
                Ok(RawSimValue::Int(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawSimValue, E> {
                Ok(i64::try_from(v).map_or(RawSimValue::Float(v as f64), RawSimValue::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<RawSimValue, E> {
                Ok(RawSimValue::Float(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<RawSimValue, E> {
                Ok(RawSimValue::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visit)
    }
}
