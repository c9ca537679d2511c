//! What the user wrote in `gateway.yaml`, field for field, and what each
//! field means.
//!
//! These types only describe the file's shape: serde rejects unknown keys and
//! wrong YAML types here, with a line and column. Everything that needs a
//! judgement (ranges, references, overlaps) happens in `validate.rs`, which
//! turns these types into the runtime types of `config/mod.rs`; nothing outside
//! `config/` sees a raw type. Values that `validate` must point at are wrapped
//! in `Spanned` so that its messages carry `FILE:LINE:COL`.
//!
//! The doc comment of each field is its reference documentation: `twinbus
//! schema` turns these types into a JSON Schema (schemars), with the comments
//! as descriptions, for editors to complete and check `gateway.yaml`. A
//! `Spanned<T>` field is described as the `T` it holds.

use std::collections::BTreeMap;

use schemars::JsonSchema;
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

impl JsonSchema for Key {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "String".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        String::json_schema(generator)
    }
}

pub(crate) type S<T> = Spanned<T>;
pub(crate) type Map<T> = BTreeMap<Key, T>;

/// twinbus gateway configuration (gateway.yaml): MQTT connections, fieldbuses,
/// device profiles, devices with their cloud twins, and simulators.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "twinbus gateway.yaml")]
pub(crate) struct RawConfig {
    /// MQTT sessions, by name. One connection can serve many twins (AWS
    /// style), or each twin its own (OCI style).
    #[serde(default)]
    pub(crate) connections: Map<RawConnection>,
    /// Fieldbus lines, by name: each has one owner that serializes every
    /// transaction on it.
    #[serde(default)]
    pub(crate) buses: Map<RawBus>,
    /// Device models (the points and commands of one product), by name.
    #[serde(default)]
    pub(crate) profiles: Map<RawProfile>,
    /// Devices, by name: a bus, a unit id, points, and the cloud twin.
    #[serde(default)]
    pub(crate) devices: Map<RawDevice>,
    /// Built-in Modbus TCP slaves serving configured devices (demos, tests).
    #[serde(default)]
    pub(crate) simulators: Map<RawSimulator>,
    /// Where the store lives (outbox, command ids, shadow versions). Default:
    /// `$STATE_DIRECTORY`, else `twinbus-state/` beside this file.
    #[schemars(with = "Option<String>")]
    pub(crate) state_dir: Option<S<String>>,
    /// How long a graceful stop may take, however many devices are dead
    /// (default `10s`; keep it below the service manager's stop timeout).
    #[schemars(with = "Option<String>")]
    pub(crate) shutdown_timeout: Option<S<String>>,
    /// One HTTP listener for Prometheus metrics (`/metrics`), health
    /// (`/healthz`, `/readyz`) and the local web console (`/console/`, with
    /// `console: true`). Off unless set.
    #[schemars(with = "Option<RawHttp>")]
    pub(crate) http: Option<S<RawHttp>>,
}

/// The HTTP listener for metrics and health.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    /// `address:port`; beyond loopback only with `username` and a password.
    #[schemars(with = "String")]
    pub(crate) listen: S<String>,
    /// User name of the HTTP basic authentication every request then needs.
    #[schemars(with = "Option<String>")]
    pub(crate) username: Option<S<String>>,
    /// Its password, inline (prefer `${ENV_VAR}` or `password_file`).
    #[schemars(with = "Option<String>")]
    pub(crate) password: Option<S<String>>,
    /// A file holding the password (a regular file, at most 64 KiB).
    #[schemars(with = "Option<String>")]
    pub(crate) password_file: Option<S<String>>,
    /// The local web console on `/console/` (default off): devices online or
    /// offline, every point's live value and recent history, the last
    /// commands, the cloud links, pushed to the page as they change. `true`
    /// shows it read-only; `{ write: true }` also lets a person write points
    /// from it.
    #[schemars(with = "Option<RawConsole>")]
    pub(crate) console: Option<S<RawConsole>>,
}

/// `console: true | false`, or `console: { write: true }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RawConsole {
    pub(crate) enabled: bool,
    pub(crate) write: bool,
}

/// The long form of `console`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConsoleOptions {
    /// Let a person write points from the console (default false), through
    /// the checks of a cloud command (writable, type, labels, limits), read
    /// back, logged with the login name and listed in the device's commands.
    /// Needs `username` and a password on the listener, even on loopback.
    #[serde(default)]
    pub(crate) write: bool,
}

impl<'de> Deserialize<'de> for RawConsole {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RawConsole;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or { write: true }")
            }
            fn visit_bool<E>(self, enabled: bool) -> Result<RawConsole, E> {
                Ok(RawConsole { enabled, write: false })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<RawConsole, A::Error> {
                let o = RawConsoleOptions::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RawConsole { enabled: true, write: o.write })
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

impl JsonSchema for RawConsole {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "RawConsole".into()
    }

    fn json_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let options = generator.subschema_for::<RawConsoleOptions>();
        schemars::json_schema!({ "anyOf": [{ "type": "boolean" }, options] })
    }
}

/// One MQTT session: `embedded` (a broker inside the gateway) or `url`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConnection {
    /// A broker inside the gateway, for demos, tests and local-only sites.
    #[schemars(with = "Option<RawEmbedded>")]
    pub(crate) embedded: Option<S<RawEmbedded>>,
    /// The broker: `mqtt://host:1883`, `mqtts://host:8883`, `ws://host:80/mqtt`
    /// or `wss://host:443/mqtt`.
    #[schemars(with = "Option<String>")]
    pub(crate) url: Option<S<String>>,
    /// MQTT client id (default `twinbus-HOSTNAME-NAME`, so that two gateways
    /// never share one).
    #[schemars(with = "Option<String>")]
    pub(crate) client_id: Option<S<String>>,
    /// MQTT user name.
    #[schemars(with = "Option<String>")]
    pub(crate) username: Option<S<String>>,
    /// MQTT password, inline (draws a warning: prefer `${ENV_VAR}` or `password_file`).
    #[schemars(with = "Option<String>")]
    pub(crate) password: Option<S<String>>,
    /// A file holding the MQTT password (a regular file, at most 64 KiB).
    #[schemars(with = "Option<String>")]
    pub(crate) password_file: Option<S<String>>,
    /// MQTT keep-alive (default `30s`).
    #[schemars(with = "Option<String>")]
    pub(crate) keep_alive: Option<S<String>>,
    /// TLS for `mqtts://` and `wss://`: CA, client certificate and key, ALPN.
    #[schemars(with = "Option<RawTls>")]
    pub(crate) tls: Option<S<RawTls>>,
    /// `3.1.1` (the default) or `5`.
    #[schemars(with = "Option<RawScalar>")]
    pub(crate) mqtt_version: Option<S<RawScalar>>,
    /// `true` (default) starts a new session on every connect; `false` resumes
    /// the broker's session and queued messages (needs `client_id`).
    #[schemars(with = "Option<bool>")]
    pub(crate) clean_session: Option<S<bool>>,
    /// An HTTP CONNECT (`http://`) or SOCKS5 (`socks5://`) proxy.
    #[schemars(with = "Option<RawProxy>")]
    pub(crate) proxy: Option<S<RawProxy>>,
    /// A status topic: `online` after every connect, `offline` as the Last
    /// Will and on a graceful stop.
    #[schemars(with = "Option<RawPresence>")]
    pub(crate) presence: Option<S<RawPresence>>,
    /// Reconnect backoff: waits double from `min` to `max`, with jitter.
    pub(crate) reconnect: Option<RawReconnect>,
    /// Bounds of the messages kept on disk until the broker acknowledges them.
    pub(crate) outbox: Option<RawOutbox>,
    /// What the broker allows this connection: subscriptions, publishes and
    /// bytes per second, payload size (default: AWS IoT Core's quotas for
    /// `*.amazonaws.com` hosts, none elsewhere). The gateway keeps within them.
    #[schemars(with = "Option<RawLimits>")]
    pub(crate) limits: Option<S<RawLimits>>,
}

/// What the broker allows one connection: a preset, and overrides of its values.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    /// `aws` (AWS IoT Core's quotas) or `none`.
    #[schemars(with = "Option<String>")]
    pub(crate) preset: Option<S<String>>,
    /// Topic filters in one SUBSCRIBE.
    #[schemars(with = "Option<i64>")]
    pub(crate) filters_per_subscribe: Option<S<i64>>,
    /// Subscriptions on one connection.
    #[schemars(with = "Option<i64>")]
    pub(crate) subscriptions: Option<S<i64>>,
    /// Publishes per second on one connection.
    #[schemars(with = "Option<i64>")]
    pub(crate) publishes_per_second: Option<S<i64>>,
    /// Payload bytes per second on one connection (a size: `512KiB`).
    #[schemars(with = "Option<RawScalar>")]
    pub(crate) bytes_per_second: Option<S<RawScalar>>,
    /// Largest payload (a size: `128KiB`).
    #[schemars(with = "Option<RawScalar>")]
    pub(crate) max_payload: Option<S<RawScalar>>,
}

/// A scalar YAML may spell as a number or a string (`5`, `3.1.1`).
#[derive(Clone, Debug, JsonSchema)]
#[schemars(untagged)]
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

/// A proxy between the gateway and a remote broker.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    /// `http://proxy:3128` (CONNECT) or `socks5://proxy:1080`.
    #[schemars(with = "String")]
    pub(crate) url: S<String>,
    /// Proxy user name.
    #[schemars(with = "Option<String>")]
    pub(crate) username: Option<S<String>>,
    /// Proxy password (prefer `${ENV_VAR}` or `password_file`).
    #[schemars(with = "Option<String>")]
    pub(crate) password: Option<S<String>>,
    /// A file holding the proxy password.
    #[schemars(with = "Option<String>")]
    pub(crate) password_file: Option<S<String>>,
}

/// The connection's status topic.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPresence {
    /// Topic (no wildcards).
    #[schemars(with = "String")]
    pub(crate) topic: S<String>,
    /// Payload after every connect (default `online`).
    pub(crate) online: Option<String>,
    /// Payload of the Last Will and of a graceful stop (default `offline`).
    pub(crate) offline: Option<String>,
    /// Whether the broker keeps the last status (default true).
    pub(crate) retain: Option<bool>,
}

/// Reconnect backoff.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReconnect {
    /// First wait after a lost connection (default `1s`).
    #[schemars(with = "Option<String>")]
    pub(crate) min: Option<S<String>>,
    /// Longest wait (default `60s`).
    #[schemars(with = "Option<String>")]
    pub(crate) max: Option<S<String>>,
}

/// Outbox bounds; past one, waiting messages are dropped oldest first,
/// telemetry before shadow reports before answers.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbox {
    /// Most messages kept (default 100000).
    #[schemars(with = "Option<i64>")]
    pub(crate) max_messages: Option<S<i64>>,
    /// Most payload bytes kept: a number of bytes or `64MiB`, `512KiB`
    /// (default `64MiB`).
    #[schemars(with = "Option<RawScalar>")]
    pub(crate) max_size: Option<S<RawScalar>>,
    /// Messages older than this are dropped (default `24h`, at most `30d`).
    #[schemars(with = "Option<String>")]
    pub(crate) max_age: Option<S<String>>,
}

/// The embedded broker.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEmbedded {
    /// `address:port`; beyond loopback only with `users`.
    #[schemars(with = "String")]
    pub(crate) listen: S<String>,
    /// Logins, by user name. Without any, clients connect without a login
    /// (loopback only) and reach only the twins' topics.
    #[serde(default)]
    pub(crate) users: Map<RawBrokerUser>,
    /// Most client connections at once (default 64).
    #[schemars(with = "Option<i64>")]
    pub(crate) max_connections: Option<S<i64>>,
}

/// A login on the embedded broker.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBrokerUser {
    /// Password, inline (prefer `${ENV_VAR}` or `password_file`).
    #[schemars(with = "Option<String>")]
    pub(crate) password: Option<S<String>>,
    /// A file holding the password.
    #[schemars(with = "Option<String>")]
    pub(crate) password_file: Option<S<String>>,
    /// Topic filters it may publish to (default: the twins' command and shadow topics).
    #[schemars(with = "Option<Vec<String>>")]
    pub(crate) publish: Option<Vec<S<String>>>,
    /// Topic filters it may subscribe to (default: the twins' answers,
    /// telemetry, presence and shadow topics).
    #[schemars(with = "Option<Vec<String>>")]
    pub(crate) subscribe: Option<Vec<S<String>>>,
}

/// TLS settings of a remote connection. Paths are relative to this file.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    /// PEM file of the CA certificates to trust instead of the system roots.
    #[schemars(with = "Option<String>")]
    pub(crate) ca: Option<S<String>>,
    /// PEM client certificate chain (mutual TLS).
    #[schemars(with = "Option<String>")]
    pub(crate) cert: Option<S<String>>,
    /// PEM private key of the client certificate (PKCS#8, RSA or EC).
    #[schemars(with = "Option<String>")]
    pub(crate) key: Option<S<String>>,
    /// ALPN protocols to offer, e.g. `[x-amzn-mqtt-ca]` for AWS IoT on port 443.
    #[serde(default)]
    pub(crate) alpn: Vec<String>,
}

/// One fieldbus line: `rtu` (a serial port) or `tcp` (Modbus TCP).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBus {
    /// Modbus RTU on a serial port.
    #[schemars(with = "Option<RawRtu>")]
    pub(crate) rtu: Option<S<RawRtu>>,
    /// Modbus TCP.
    #[schemars(with = "Option<RawTcp>")]
    pub(crate) tcp: Option<S<RawTcp>>,
    /// Modbus RTU over TCP: an RS-485 line reached through a serial device
    /// server (Moxa NPort, USR, Waveshare) in raw TCP mode, which passes RTU
    /// frames with their CRC between the socket and the line.
    #[schemars(with = "Option<RawRtuTcp>")]
    pub(crate) rtu_tcp: Option<S<RawRtuTcp>>,
    /// How long to wait for an answer (default `500ms`).
    #[schemars(with = "Option<String>")]
    pub(crate) timeout: Option<S<String>>,
    /// Extra attempts after a timeout or transport error, never after a
    /// Modbus exception (default 1).
    #[schemars(with = "Option<i64>")]
    pub(crate) retries: Option<S<i64>>,
    /// Silence kept between transactions (default: 3.5 characters on RTU and
    /// RTU over TCP, 0 on TCP).
    #[schemars(with = "Option<String>")]
    pub(crate) delay: Option<S<String>>,
}

/// Serial settings of an RTU line.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRtu {
    /// Serial device, e.g. `/dev/ttyUSB0`.
    #[schemars(with = "String")]
    pub(crate) port: S<String>,
    /// Baud rate (default 9600).
    #[schemars(with = "Option<i64>")]
    pub(crate) baud: Option<S<i64>>,
    /// `none`, `even` (default) or `odd`.
    pub(crate) parity: Option<RawParity>,
    /// 7 or 8 (default).
    #[schemars(with = "Option<i64>")]
    pub(crate) data_bits: Option<S<i64>>,
    /// 1 (default) or 2.
    #[schemars(with = "Option<i64>")]
    pub(crate) stop_bits: Option<S<i64>>,
}

/// Serial parity.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawParity {
    None,
    Even,
    Odd,
}

/// A Modbus TCP endpoint.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTcp {
    /// Host name or address.
    #[schemars(with = "String")]
    pub(crate) host: S<String>,
    /// Port (default 502).
    #[schemars(with = "Option<i64>")]
    pub(crate) port: Option<S<i64>>,
}

/// What to do when the device answers "busy" (exception 0x06).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBusy {
    /// Requests asked again, at most (0 to 10; default 3).
    #[schemars(with = "Option<i64>")]
    pub(crate) retries: Option<S<i64>>,
    /// Wait before each (default `100ms`, at most `10s`); the line serves
    /// others meanwhile.
    #[schemars(with = "Option<String>")]
    pub(crate) delay: Option<S<String>>,
}

/// A serial device server's raw TCP port, with an RTU line behind it.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRtuTcp {
    /// Host name or address of the device server.
    #[schemars(with = "String")]
    pub(crate) host: S<String>,
    /// Its raw TCP port (no default: vendors differ, e.g. 4001 on a Moxa
    /// NPort, 8899 on a USR, 4196 on a Waveshare).
    #[schemars(with = "i64")]
    pub(crate) port: S<i64>,
    /// Baud rate of the line behind it (default 9600): sets the default
    /// `delay` (3.5 characters), as on a serial port.
    #[schemars(with = "Option<i64>")]
    pub(crate) baud: Option<S<i64>>,
    /// How long connecting to the device server may take (default `3s`).
    /// After a failed attempt the next waits, from 500 ms doubling up to
    /// 10 s; requests meanwhile fail at once.
    #[schemars(with = "Option<String>")]
    pub(crate) connect_timeout: Option<S<String>>,
}

/// A device model: its points, read limits and named commands.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProfile {
    /// Points, by their path in the twin (`deviceAttrib.setpoint`).
    #[serde(default)]
    pub(crate) points: Map<RawPoint>,
    /// How reads may be merged.
    pub(crate) read: Option<RawReadLimits>,
    /// Write a `bit:` point of a holding register with function 22 (mask
    /// write), which changes only that bit in the device (default false).
    #[schemars(with = "Option<bool>")]
    pub(crate) mask_write: Option<S<bool>>,
    /// Poll intervals by path: a path prefix (`deviceData.energy`) or a
    /// text prefix ending in `*`, to an interval (`60s`) or `once`. The
    /// longest pattern matching a point wins; a point's own `poll` wins
    /// over every pattern.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub(crate) poll_paths: Map<S<String>>,
    /// Write with functions 5 and 6 only, one coil or register per request,
    /// for devices that refuse 15 and 16: several registers become several
    /// requests, in address order (default false).
    #[schemars(with = "Option<bool>")]
    pub(crate) single_writes: Option<S<bool>>,
    /// How long the device takes to show a written value: the read-back
    /// after a write (and the check of a write whose reply was lost) waits
    /// this long, without holding the line (default `0s`).
    #[schemars(with = "Option<String>")]
    pub(crate) read_back_delay: Option<S<String>>,
    /// Exception 0x06 (busy): ask again after `delay`, at most `retries`
    /// times (default 3 times, after 100ms each).
    #[schemars(with = "Option<RawBusy>")]
    pub(crate) busy: Option<S<RawBusy>>,
    /// Named commands a shadow may run, by name.
    #[serde(default)]
    pub(crate) commands: Map<RawCommand>,
}

/// A named command: typed arguments and steps.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCommand {
    /// Arguments, by name; a step refers to one as `$name`.
    #[serde(default)]
    pub(crate) args: Map<RawArg>,
    /// What to do, in order.
    #[schemars(with = "Vec<RawStep>")]
    pub(crate) steps: Vec<S<RawStep>>,
}

/// One argument of a named command.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawArg {
    /// `number`, `bool` or `string`.
    #[serde(rename = "type")]
    pub(crate) arg_type: RawArgType,
    /// Lowest accepted number.
    pub(crate) min: Option<f64>,
    /// Highest accepted number.
    pub(crate) max: Option<f64>,
}

/// JSON type of an argument.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawArgType {
    Number,
    Bool,
    String,
}

/// One step: `set: {path: value}`, `wait: 2s` or `check: {path: value}`.
/// A value written as `$name` is the argument `name`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawStep {
    /// Write these points, in the order written, then read them back.
    // In file order: a step writes its points in the order written.
    Set(#[schemars(with = "BTreeMap<String, RawSimValue>")] indexmap::IndexMap<String, RawSimValue>),
    /// Wait this long, reporting RUNNING meanwhile.
    Wait(String),
    /// Read these points; the command fails unless each holds the value.
    Check(#[schemars(with = "BTreeMap<String, RawSimValue>")] indexmap::IndexMap<String, RawSimValue>),
}

/// How reads of one device may be merged into fewer requests.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawReadLimits {
    /// Most registers in one read (default and Modbus maximum 125).
    #[schemars(with = "Option<i64>")]
    pub(crate) max_registers: Option<S<i64>>,
    /// Most bits in one read (default and Modbus maximum 2000).
    #[schemars(with = "Option<i64>")]
    pub(crate) max_bits: Option<S<i64>>,
    /// Unconfigured addresses one read may span (default 0; only if the
    /// device allows reading them).
    #[schemars(with = "Option<i64>")]
    pub(crate) max_gap: Option<S<i64>>,
}

/// One Modbus device and its twin.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDevice {
    /// The bus it is on.
    #[schemars(with = "String")]
    pub(crate) bus: S<String>,
    /// Modbus unit id: 1-247 on RTU, 0-255 on TCP.
    #[schemars(with = "i64")]
    pub(crate) unit: S<i64>,
    /// The profile whose points and commands it has.
    #[schemars(with = "Option<String>")]
    pub(crate) profile: Option<S<String>>,
    /// Its own points (added to the profile's).
    #[serde(default)]
    pub(crate) points: Map<RawPoint>,
    /// Read limits (win over the profile's).
    pub(crate) read: Option<RawReadLimits>,
    /// Function 22 for register bits (wins over the profile's).
    #[schemars(with = "Option<bool>")]
    pub(crate) mask_write: Option<S<bool>>,
    /// Poll intervals by path (with the profile's; the device's own win on
    /// the same pattern): a path prefix (`deviceData.energy`) or a
    /// text prefix ending in `*`, to an interval (`60s`) or `once`. The
    /// longest pattern matching a point wins; a point's own `poll` wins
    /// over every pattern.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub(crate) poll_paths: Map<S<String>>,
    /// Write with functions 5 and 6 only, one coil or register per request,
    /// for devices that refuse 15 and 16: several registers become several
    /// requests, in address order (wins over the profile's; default false).
    #[schemars(with = "Option<bool>")]
    pub(crate) single_writes: Option<S<bool>>,
    /// How long the device takes to show a written value: the read-back
    /// after a write (and the check of a write whose reply was lost) waits
    /// this long, without holding the line (wins over the profile's; default `0s`).
    #[schemars(with = "Option<String>")]
    pub(crate) read_back_delay: Option<S<String>>,
    /// Exception 0x06 (busy): ask again after `delay`, at most `retries`
    /// times (wins over the profile's; default 3 times, after 100ms each).
    #[schemars(with = "Option<RawBusy>")]
    pub(crate) busy: Option<S<RawBusy>>,
    /// Poll interval of the points that name none (default `1s`).
    #[schemars(with = "Option<String>")]
    pub(crate) poll: Option<S<String>>,
    /// The cloud side: topics and/or an AWS IoT shadow.
    #[schemars(with = "Option<RawTwin>")]
    pub(crate) twin: Option<S<RawTwin>>,
}

/// How a device appears in the cloud.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTwin {
    /// The connection (a name under `connections`).
    #[schemars(with = "String")]
    pub(crate) connection: S<String>,
    /// Topic raw commands arrive on.
    #[schemars(with = "Option<String>")]
    pub(crate) commands: Option<S<String>>,
    /// Topic command answers go to (needed with `commands`).
    #[schemars(with = "Option<String>")]
    pub(crate) responses: Option<S<String>>,
    /// Topic telemetry documents go to.
    #[schemars(with = "Option<String>")]
    pub(crate) telemetry: Option<S<String>>,
    /// Period of the full telemetry report (default `10s`), or `every_poll`:
    /// a full document after every poll cycle, none skipped (a telemetry
    /// task that falls behind the polls is counted in
    /// `twinbus_telemetry_polls_skipped_total`).
    #[schemars(with = "Option<String>")]
    pub(crate) telemetry_interval: Option<S<String>>,
    /// Between full reports, publish values that moved beyond their deadband
    /// after each poll (default true).
    pub(crate) report_on_change: Option<bool>,
    /// Send `{"status":"acknowledged"}` before executing a command (default false).
    pub(crate) acknowledge: Option<bool>,
    /// Whether `{"shutdown": true}` may stop the gateway (default false).
    pub(crate) allow_shutdown: Option<bool>,
    /// Topic filters the gateway may publish to at a cloud's request: an MQTT 5
    /// Response Topic, a shadow relay-command's topic, a command's
    /// response_topic (default: only `responses`).
    #[schemars(with = "Option<Vec<String>>")]
    pub(crate) response_topics: Option<Vec<S<String>>>,
    /// The AWS IoT device shadow this device is the twin of.
    #[schemars(with = "Option<RawShadow>")]
    pub(crate) shadow: Option<S<RawShadow>>,
    /// Several shadows sharing the device's points (each with `points`).
    #[schemars(with = "Option<Vec<RawShadow>>")]
    pub(crate) shadows: Option<S<Vec<S<RawShadow>>>>,
}

/// A classic or named AWS IoT device shadow.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawShadow {
    /// Thing name.
    #[schemars(with = "String")]
    pub(crate) thing: S<String>,
    /// Shadow name; absent for the classic shadow.
    #[schemars(with = "Option<String>")]
    pub(crate) name: Option<S<String>>,
    /// Dotted path under `reported` where refused desired values are
    /// explained (default `twinbus.errors`).
    #[schemars(with = "Option<String>")]
    pub(crate) errors_key: Option<S<String>>,
    /// How often a running command's RUNNING state is repeated (default `10s`).
    #[schemars(with = "Option<String>")]
    pub(crate) running_interval: Option<S<String>>,
    /// Which of the device's points this shadow serves: path prefixes
    /// (`deviceAttrib`), or text prefixes ending in `*` (`deviceData.p1*`).
    #[schemars(with = "Option<Vec<String>>")]
    pub(crate) points: Option<S<Vec<S<String>>>>,
}

/// One point: a path in the twin ⇄ one Modbus location, with its type,
/// order, scale, labels, access and limits. Exactly one of `coil`,
/// `discrete`, `input`, `holding`.
#[derive(Clone, Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPoint {
    /// Coil address (zero-based; read-write).
    #[schemars(with = "Option<i64>")]
    pub(crate) coil: Option<S<i64>>,
    /// Discrete input address (zero-based; read-only).
    #[schemars(with = "Option<i64>")]
    pub(crate) discrete: Option<S<i64>>,
    /// Input register address (zero-based; read-only).
    #[schemars(with = "Option<i64>")]
    pub(crate) input: Option<S<i64>>,
    /// Holding register address (zero-based: register 40011 is 10).
    #[schemars(with = "Option<i64>")]
    pub(crate) holding: Option<S<i64>>,
    /// One bit (0-15) of an input or holding register.
    #[schemars(with = "Option<i64>")]
    pub(crate) bit: Option<S<i64>>,
    /// `bool` (default for bits), `u16` (default for registers), `i16`,
    /// `u32`, `i32`, `f32`, `u64`, `i64`, `f64`, `string`.
    #[serde(rename = "type")]
    #[schemars(with = "Option<RawType>")]
    pub(crate) data_type: Option<S<RawType>>,
    /// Characters of a `string` point (two per register).
    #[schemars(with = "Option<i64>")]
    pub(crate) length: Option<S<i64>>,
    /// Order of the registers of a wider value: `big` (default) or `little`.
    pub(crate) word_order: Option<RawOrder>,
    /// Order of the bytes in a register: `big` (default) or `little`.
    pub(crate) byte_order: Option<RawOrder>,
    /// The twin sees `raw × scale + offset`; a write between two steps of
    /// the scale is refused.
    #[schemars(with = "Option<f64>")]
    pub(crate) scale: Option<S<f64>>,
    /// Added after scaling.
    #[schemars(with = "Option<f64>")]
    pub(crate) offset: Option<S<f64>>,
    /// Labels the twin reads and writes instead of numbers: `{ on: 1, off: 0 }`.
    #[schemars(with = "Option<BTreeMap<String, RawLabel>>")]
    pub(crate) values: Option<S<BTreeMap<String, RawLabel>>>,
    /// `read`, `write` or `read-write` (default read-write for coils and
    /// holding registers, read for the rest).
    #[schemars(with = "Option<RawAccess>")]
    pub(crate) access: Option<S<RawAccess>>,
    /// Lowest value a write may set (compared exactly).
    #[schemars(with = "Option<RawNumber>")]
    pub(crate) min: Option<S<RawNumber>>,
    /// Highest value a write may set (compared exactly).
    #[schemars(with = "Option<RawNumber>")]
    pub(crate) max: Option<S<RawNumber>>,
    /// The only values a write may set.
    #[schemars(with = "Option<Vec<RawNumber>>")]
    pub(crate) allowed: Option<S<Vec<S<RawNumber>>>>,
    /// The smallest change reported between full reports.
    #[schemars(with = "Option<f64>")]
    pub(crate) deadband: Option<S<f64>>,
    /// A pulse, reset or counter-like register (default false): its write is
    /// never sent twice nor merged with others, and the answer shows what
    /// the read-back found.
    #[schemars(with = "Option<bool>")]
    pub(crate) trigger: Option<S<bool>>,
    /// How often it is read: an interval (`1s`, `60s`) or `once` (when the
    /// device comes online). Default: the device's `poll`, or the longest
    /// `poll_paths` pattern that matches. Reads of different intervals are
    /// never merged into one request.
    #[schemars(with = "Option<String>")]
    pub(crate) poll: Option<S<String>>,
}

/// A limit as written: a whole number without a point or an exponent stays
/// an exact integer (a u64 limit of 2^53 + 1 must not become 2^53 + 2 on the
/// way through an f64); anything else is the f64 it reads as.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RawNumber {
    Int(i128),
    Float(f64),
}

impl JsonSchema for RawNumber {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Number".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({ "type": "number" })
    }
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

/// A point's data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
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

/// Word or byte order.
#[derive(Clone, Copy, Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawOrder {
    Big,
    Little,
}

/// What the cloud may do with a point.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum RawAccess {
    Read,
    Write,
    ReadWrite,
}

/// The device-side value of an enum label: `on: true` or `auto: 0`.
#[derive(Clone, Copy, Debug, JsonSchema)]
#[schemars(untagged)]
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

/// A built-in Modbus slave: on a TCP port (`listen`) or a serial port (`serial`).
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSimulator {
    /// `address:port` it listens on (give this or `serial`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub(crate) listen: Option<S<String>>,
    /// A serial port (or one end of a pty pair, e.g. from `socat`) it serves
    /// Modbus RTU on, instead of a TCP port (give this or `listen`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub(crate) serial: Option<S<String>>,
    /// Pace replies as an RS-485 line at this baud rate would: each reply
    /// goes out only after the request's characters, a 3.5-character gap
    /// (1.75 ms above 19200) and its own characters (11 bits each) would
    /// have crossed the wire. Also the serial port's speed. Default: no
    /// pacing (replies at once), 9600 Bd on a serial port.
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    pub(crate) baud: Option<S<i64>>,
    /// Devices it serves (by name), each on its unit id.
    #[schemars(with = "Vec<String>")]
    pub(crate) serves: Vec<S<String>>,
    /// Start values, by point path.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, RawSimValue>")]
    pub(crate) initial: BTreeMap<Key, S<RawSimValue>>,
    /// Read-only numeric points that wander slowly.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub(crate) drift: Vec<S<String>>,
    /// A status point that follows another: `{ follower: leader }`.
    #[serde(default)]
    #[schemars(with = "BTreeMap<String, String>")]
    pub(crate) mirror: BTreeMap<Key, S<String>>,
    /// `tcp` (default: Modbus TCP) or `rtu`: RTU frames with their CRC over
    /// TCP, as a serial device server in raw TCP mode passes them on (for
    /// buses with `rtu_tcp`).
    pub(crate) framing: Option<RawFraming>,
}

/// How a simulator frames Modbus on its TCP connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawFraming {
    Tcp,
    Rtu,
}

/// A value as YAML spells it (a simulator's start value, a command step's value).
#[derive(Clone, Debug, JsonSchema)]
#[schemars(untagged)]
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

/// The JSON Schema of `gateway.yaml`, pretty-printed.
pub(crate) fn schema() -> String {
    let schema = schemars::schema_for!(RawConfig);
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}
