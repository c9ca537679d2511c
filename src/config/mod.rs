//! The configuration: load `gateway.yaml`, check all of it, hand out runtime types.
//!
//! Loading happens in two passes. serde (through serde-saphyr) checks the
//! file's shape and stops at the first structural problem: YAML syntax, an
//! unknown key, a wrong type. Then `validate` checks every judgement call
//! (ranges, references, overlaps, conflicts) and reports **all** problems at
//! once, each as `FILE:LINE:COL: path.to.field: what is wrong (what would be
//! valid)`. Only a fully valid file produces a [`Config`]; the runtime never
//! sees unvalidated input.
//!
//! Secrets: any string value in `connections` and `buses` may contain
//! `${NAME}`, replaced by the environment variable `NAME` after parsing (a
//! missing variable is an error; `$${` writes a literal `${`). A password can
//! also come from `password_file`. Inline passwords work but draw a warning.
#![deny(missing_docs)]

mod budget;
mod polls;
mod raw;
mod shadows;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use std::sync::Arc;

use crate::point::Point;

/// A fully validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub source: PathBuf,
    /// MQTT sessions, by name.
    pub connections: Vec<Connection>,
    /// Fieldbuses, by name.
    pub buses: Vec<Bus>,
    /// Devices, each on one bus.
    pub devices: Vec<Device>,
    /// Built-in Modbus TCP simulators to start with the gateway.
    pub simulators: Vec<Simulator>,
    /// Things that work but deserve a look (e.g. an inline password).
    pub warnings: Vec<String>,
    /// Where the store lives: the outbox, command ids, shadow versions.
    pub state_dir: PathBuf,
    /// How long a graceful stop may take before what is left is aborted.
    pub shutdown_timeout: Duration,
    /// The HTTP listener for metrics and health, if any.
    pub http: Option<HttpSettings>,
}

/// The HTTP listener (metrics, health, console).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpSettings {
    /// Address to listen on (loopback unless a login is set).
    pub listen: SocketAddr,
    /// Basic authentication asked of every request, if set.
    pub credentials: Option<Credentials>,
    /// The local web console on `/console/`, if enabled.
    pub console: Option<ConsoleSettings>,
}

/// The local web console.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleSettings {
    /// Whether a person may write points from it (validation ensures the
    /// listener then has a login).
    pub write: bool,
}

/// One MQTT session.
#[derive(Debug, Clone, PartialEq)]
pub struct Connection {
    /// Name used by `devices.*.twin.connection`.
    pub name: String,
    /// Where the broker is.
    pub broker: Broker,
    /// MQTT client id.
    pub client_id: String,
    /// MQTT keep-alive interval.
    pub keep_alive: Duration,
    /// User name and password, if the broker wants them.
    pub credentials: Option<Credentials>,
    /// MQTT protocol version.
    pub version: MqttVersion,
    /// Start a new session on every connect (true), or resume the broker's.
    pub clean_session: bool,
    /// Proxy to reach a remote broker through.
    pub proxy: Option<Proxy>,
    /// Online/offline status topic; `offline` is also the Last Will.
    pub presence: Option<Presence>,
    /// Shortest wait before reconnecting (doubles up to `reconnect_max`).
    pub reconnect_min: Duration,
    /// Longest wait before reconnecting.
    pub reconnect_max: Duration,
    /// Bounds of the messages kept until the broker acknowledges them.
    pub outbox: OutboxSettings,
    /// What the broker allows this connection (AWS IoT Core's quotas for
    /// `*.amazonaws.com` unless configured): subscriptions are sent in
    /// batches within them, publishes are paced to them.
    pub limits: BrokerLimits,
}

/// What a broker allows one connection; `None` is no limit. `twinbus check`
/// refuses a configuration that cannot stay within them, and at run time
/// subscriptions go out in batches and publishes are paced to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BrokerLimits {
    /// Most topic filters in one SUBSCRIBE (AWS: 8, hard).
    pub filters_per_subscribe: Option<usize>,
    /// Most subscriptions on one connection (AWS: 50 by default, adjustable).
    pub subscriptions: Option<usize>,
    /// Most publishes per second on one connection (AWS: 100, hard).
    pub publishes_per_second: Option<u32>,
    /// Most payload bytes per second on one connection (AWS: 512 KiB).
    pub bytes_per_second: Option<usize>,
    /// Largest payload of one publish (AWS: 128 KiB).
    pub max_payload: Option<usize>,
}

impl BrokerLimits {
    /// AWS IoT Core's message broker quotas (per connection).
    pub const AWS_IOT_CORE: BrokerLimits = BrokerLimits {
        filters_per_subscribe: Some(8),
        subscriptions: Some(50),
        publishes_per_second: Some(100),
        bytes_per_second: Some(512 * 1024),
        max_payload: Some(128 * 1024),
    };
}

/// Bounds of a connection's outbox; past one, waiting messages are dropped
/// oldest first, telemetry before shadow reports before answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutboxSettings {
    /// Most messages kept.
    pub max_messages: usize,
    /// Most payload bytes kept.
    pub max_bytes: usize,
    /// Messages older than this are dropped.
    pub max_age: Duration,
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 3.1.1 (protocol level 4).
    V311,
    /// MQTT 5.
    V5,
}

/// A proxy between the gateway and a remote broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Proxy {
    /// HTTP CONNECT or SOCKS5.
    pub kind: ProxyKind,
    /// Proxy host.
    pub host: String,
    /// Proxy port.
    pub port: u16,
    /// Proxy login, if it wants one.
    pub credentials: Option<Credentials>,
}

/// Proxy protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// HTTP CONNECT (`http://`).
    Http,
    /// SOCKS5 (`socks5://`).
    Socks5,
}

/// The connection's status topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    /// Topic.
    pub topic: String,
    /// Payload published after every connect.
    pub online: String,
    /// Payload of the Last Will and of a graceful shutdown.
    pub offline: String,
    /// Whether the broker should keep the last status.
    pub retain: bool,
}

/// How a connection reaches its broker.
#[derive(Debug, Clone, PartialEq)]
pub enum Broker {
    /// A broker inside the gateway process, listening on `listen`.
    Embedded {
        /// Address the embedded broker listens on (loopback unless configured).
        listen: SocketAddr,
        /// Who may connect, and to which topics.
        access: BrokerAccess,
    },
    /// A remote broker.
    Remote {
        /// Host name or address.
        host: String,
        /// TCP port.
        port: u16,
        /// TLS settings, for `mqtts://` and `wss://`.
        tls: Option<Tls>,
        /// For `ws://` and `wss://`: the HTTP path (default `/mqtt`).
        websocket_path: Option<String>,
    },
}

/// Who may use the embedded broker. The gateway's own session always may
/// (with a secret made at start, so nobody else can take its client id).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BrokerAccess {
    /// Named logins. Empty: clients connect without one, on loopback only,
    /// with the twins' permissions.
    pub users: Vec<BrokerUser>,
    /// Most client connections at once.
    pub max_connections: usize,
}

/// A login on the embedded broker.
#[derive(Debug, Clone, PartialEq)]
pub struct BrokerUser {
    /// User name.
    pub name: String,
    /// Its password.
    pub password: Secret,
    /// Topic filters it may publish to; `None`: the twins' command and
    /// shadow topics.
    pub publish: Option<Vec<String>>,
    /// Topic filters it may subscribe to; `None`: the twins' answers,
    /// telemetry, presence and shadow topics.
    pub subscribe: Option<Vec<String>>,
}

/// TLS settings of a remote connection.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tls {
    /// PEM file with the CA certificates to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate chain for mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate.
    pub key: Option<PathBuf>,
    /// ALPN protocols to offer.
    pub alpn: Vec<String>,
}

/// MQTT user name and password.
#[derive(Clone, PartialEq)]
pub struct Credentials {
    /// User name (not secret).
    pub username: String,
    /// Password; printed as `***` by `Debug`.
    pub password: Secret,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).field("password", &self.password).finish()
    }
}

/// A secret string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret (one the gateway made, e.g. its login to its own broker).
    pub fn new(secret: impl Into<String>) -> Secret {
        Secret(secret.into())
    }

    /// The secret itself, for the one place that must hand it to a library.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// One fieldbus line and its owner's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Bus {
    /// Name used by `devices.*.bus`.
    pub name: String,
    /// Serial line or TCP endpoint.
    pub transport: Transport,
    /// How long to wait for a device's answer.
    pub timeout: Duration,
    /// Extra attempts after a timeout or transport error (not after an exception).
    pub retries: u8,
    /// Silence kept between two transactions (RTU inter-frame gap, slow converters).
    pub delay: Duration,
}

/// The wire of a bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// Modbus RTU on a serial port.
    Rtu(SerialSettings),
    /// Modbus TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// TCP port (502 by default).
        port: u16,
    },
    /// Modbus RTU frames over TCP, through a serial device server.
    RtuTcp {
        /// Host name or address of the device server.
        host: String,
        /// Its raw TCP port.
        port: u16,
        /// How long connecting may take.
        connect_timeout: Duration,
    },
}

/// Serial port settings of an RTU bus.
#[derive(Debug, Clone, PartialEq)]
pub struct SerialSettings {
    /// Device path, e.g. `/dev/ttyUSB0`.
    pub port: String,
    /// Baud rate.
    pub baud: u32,
    /// Parity.
    pub parity: Parity,
    /// Data bits (7 or 8).
    pub data_bits: u8,
    /// Stop bits (1 or 2).
    pub stop_bits: u8,
}

/// Serial parity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parity {
    /// No parity bit.
    None,
    /// Even parity (the Modbus RTU default).
    Even,
    /// Odd parity.
    Odd,
}

/// How the read planner may merge reads for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most registers in one read (the protocol allows 125).
    pub max_registers: u16,
    /// Most bits in one read (the protocol allows 2000).
    pub max_bits: u16,
    /// Unconfigured addresses a merged read may span; 0 reads only configured ones.
    pub max_gap: u16,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits { max_registers: 125, max_bits: 2000, max_gap: 0 }
    }
}

/// One Modbus device and its twin.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    /// Name, unique in the file.
    pub name: String,
    /// Index into [`Config::buses`].
    pub bus: usize,
    /// Modbus unit (slave) id.
    pub unit: u8,
    /// The device's points, sorted by path. Devices with equal tables (every
    /// device of a profile that adds none of its own) share one in memory.
    pub points: Arc<Vec<Point>>,
    /// How reads may be merged.
    pub read: ReadLimits,
    /// Write bits of a holding register with function 22 (mask write), which
    /// changes only those bits in the device, instead of reading the register
    /// and writing all of it back.
    pub mask_write: bool,
    /// Poll interval of the points that name none.
    pub poll: Duration,
    /// The readable points by how often they are read, fastest first
    /// (`once` last); reads of two groups never share a request.
    pub groups: Vec<PollGroup>,
    /// How the device wants to be written and asked again.
    pub quirks: Quirks,
    /// Named commands a cloud may run (from the profile).
    pub commands: Vec<CommandDef>,
    /// The cloud side, if any.
    pub twin: Option<Twin>,
}

/// Points read at one interval.
#[derive(Debug, Clone, PartialEq)]
pub struct PollGroup {
    /// The interval; `None`: once each time the device comes online.
    pub every: Option<Duration>,
    /// Indices into the device's points.
    pub points: Vec<usize>,
}

/// Device behaviours met in the field, and the options that cope with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quirks {
    /// Write with functions 5 and 6 only: one coil or register per request.
    pub single_writes: bool,
    /// How long after a write the device shows the value: the read-back
    /// (and the check of a write whose reply was lost) waits this long.
    pub read_back_delay: Duration,
    /// Times a request answered "busy" (exception 0x06) is asked again.
    pub busy_retries: u8,
    /// Wait before each of those.
    pub busy_delay: Duration,
}

impl Default for Quirks {
    fn default() -> Self {
        Quirks { single_writes: false, read_back_delay: Duration::ZERO, busy_retries: 3, busy_delay: Duration::from_millis(100) }
    }
}

/// A named command: a sequence of point writes, waits and read-back checks.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandDef {
    /// Name the cloud uses.
    pub name: String,
    /// Typed arguments the steps refer to as `$name`.
    pub args: Vec<ArgDef>,
    /// What to do, in order.
    pub steps: Vec<Step>,
}

/// One argument of a named command.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgDef {
    /// Name, referred to as `$name`.
    pub name: String,
    /// Expected JSON type.
    pub kind: ArgKind,
    /// Lowest accepted number.
    pub min: Option<f64>,
    /// Highest accepted number.
    pub max: Option<f64>,
}

/// JSON type of an argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgKind {
    /// A JSON number.
    Number,
    /// `true` or `false`.
    Bool,
    /// A JSON string.
    String,
}

/// A value in a step: a literal, or an argument.
#[derive(Debug, Clone, PartialEq)]
pub enum StepValue {
    /// Written as is.
    Literal(crate::point::Value),
    /// The argument with this name.
    Arg(String),
}

/// One step of a named command.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Write these points (index into the device's points), then read them back.
    Set(Vec<(usize, StepValue)>),
    /// Wait, reporting RUNNING meanwhile.
    Wait(Duration),
    /// Read these points and fail unless each holds the value.
    Check(Vec<(usize, StepValue)>),
}

/// How a device appears in the cloud.
#[derive(Debug, Clone, PartialEq)]
pub struct Twin {
    /// Index into [`Config::connections`].
    pub connection: usize,
    /// Topic raw commands arrive on.
    pub commands: Option<String>,
    /// Topic command answers go to.
    pub responses: Option<String>,
    /// Topic telemetry documents go to.
    pub telemetry: Option<String>,
    /// Period of the full telemetry report (unused with `every_poll`).
    pub telemetry_interval: Duration,
    /// `telemetry_interval: every_poll`: a full document after every poll
    /// cycle, each one sent.
    pub every_poll: bool,
    /// Publish changed values (beyond each point's deadband) after every poll.
    pub report_on_change: bool,
    /// Send `{"status":"acknowledged"}` before executing a command.
    pub acknowledge: bool,
    /// Whether `{"shutdown": true}` may stop the gateway.
    pub allow_shutdown: bool,
    /// Topic filters the gateway may publish to at a cloud's request: an
    /// MQTT 5 Response Topic, a shadow `relay-command`'s topic, a command's
    /// `response_topic`. Others are refused, so that a command cannot make
    /// the gateway publish anywhere it may. Default: only `responses`.
    pub response_topics: Vec<String>,
    /// The AWS IoT device shadows this device is the twin of: none, one, or
    /// several that share its points (a device too large for one shadow).
    pub shadows: Vec<ShadowBinding>,
}

/// What one AWS IoT shadow may hold, and what the gateway puts in it:
/// `twinbus check` sizes every shadow with these, the adapter keeps to them.
pub mod shadow_document {
    /// AWS IoT's limit on a shadow's state (desired and reported, without
    /// metadata), in bytes.
    pub const MAX_BYTES: usize = 8 * 1024;
    /// Longest refusal reason (as JSON text) the adapter writes to a shadow.
    pub const MAX_REASON_BYTES: usize = 96;
    /// Command states kept under `reported.command`.
    pub const REPORTED_COMMANDS: usize = 10;
    /// Command id length counted when sizing a shadow.
    pub const COUNTED_COMMAND_ID: usize = 64;
}

/// A classic or named AWS IoT shadow.
#[derive(Debug, Clone, PartialEq)]
pub struct ShadowBinding {
    /// Thing name.
    pub thing: String,
    /// Shadow name; `None` for the classic shadow.
    pub name: Option<String>,
    /// Dotted path under `reported` where refused desired values are explained.
    pub errors_key: String,
    /// How often a running command's RUNNING state is repeated.
    pub running_interval: Duration,
    /// Indices of the device's points this shadow serves.
    pub points: Vec<usize>,
    /// Topic filters a `relay-command`'s topic or a command's
    /// `response_topic` must fall under (the twin's `response_topics`).
    pub reply_topics: Vec<String>,
}

impl ShadowBinding {
    /// `$aws/things/<thing>/shadow[/name/<name>]`, the prefix of its topics.
    pub fn prefix(&self) -> String {
        match &self.name {
            Some(n) => format!("$aws/things/{}/shadow/name/{n}", self.thing),
            None => format!("$aws/things/{}/shadow", self.thing),
        }
    }
}

/// A built-in Modbus TCP slave serving configured devices.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulator {
    /// Name, for logs.
    pub name: String,
    /// Where it serves: a TCP port or a serial port.
    pub listen: SimListen,
    /// The baud rate whose wire time paces each reply, if any.
    pub pace: Option<u32>,
    /// Devices served, by unit id.
    pub devices: Vec<SimulatedDevice>,
    /// Modbus TCP frames, or RTU frames over TCP (a serial device server).
    pub framing: Framing,
}

/// Where a simulator serves.
#[derive(Debug, Clone, PartialEq)]
pub enum SimListen {
    /// A TCP port (Modbus TCP, or RTU frames with `framing: rtu`).
    Tcp(SocketAddr),
    /// A serial port or pty (Modbus RTU), at this baud rate.
    Serial {
        /// The device path.
        path: PathBuf,
        /// The port's speed.
        baud: u32,
    },
}

impl fmt::Display for SimListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimListen::Tcp(addr) => write!(f, "{addr}"),
            SimListen::Serial { path, baud } => write!(f, "{} at {baud} Bd", path.display()),
        }
    }
}

/// How Modbus requests are framed on a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Modbus TCP (MBAP header, transaction ids).
    #[default]
    Tcp,
    /// RTU frames with their CRC, as a serial device server in raw TCP mode
    /// passes them between the socket and its RS-485 line.
    Rtu,
}

/// One device inside a simulator.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulatedDevice {
    /// Unit id it answers to.
    pub unit: u8,
    /// Its points (the device's points).
    pub points: Arc<Vec<Point>>,
    /// Start values, by point path.
    pub initial: Vec<(String, crate::point::Value)>,
    /// Paths of read-only numeric points that wander slowly.
    pub drift: Vec<String>,
    /// (follower, leader): the follower point reads whatever the leader holds.
    pub mirror: Vec<(String, String)>,
}

/// Why a configuration was refused.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// YAML syntax, an unknown key or a wrong type (serde stops at the first).
    Structure {
        /// `FILE:LINE:COL: message`.
        message: String,
    },
    /// Every semantic problem found.
    Invalid {
        /// One line each: `FILE:LINE:COL: path: problem (hint)`.
        problems: Vec<String>,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, error } => write!(f, "{}: cannot read: {error}", path.display()),
            ConfigError::Structure { message } => f.write_str(message),
            ConfigError::Invalid { problems } => {
                let n = problems.len();
                writeln!(f, "{n} problem{} in the configuration:", if n == 1 { "" } else { "s" })?;
                for p in problems {
                    writeln!(f, "{p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.to_path_buf(), error })?;
        Config::parse(&text, path)
    }

    /// Parses and validates configuration text; `path` names it in messages
    /// and anchors relative paths (certificates, password files).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = serde_saphyr::from_str(text).map_err(|e| structure_error(path, &e))?;
        validate::validate(raw, path)
    }

    /// The JSON Schema of the configuration file, for editors (`twinbus schema`).
    pub fn schema() -> String {
        raw::schema()
    }

    /// The device with this name.
    pub fn device(&self, name: &str) -> Option<&Device> {
        self.devices.iter().find(|d| d.name == name)
    }
}

fn structure_error(path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let rendered = e.without_snippet().to_string();
    // serde-saphyr puts the position in its own words; lead with the
    // `FILE:LINE:COL:` form that editors and CI logs make clickable.
    let message = match e.location() {
        Some(loc) if loc.line() > 0 => {
            format!("{}:{}:{}: {}\n{}", path.display(), loc.line(), loc.column(), first_line(&rendered), e)
        }
        _ => format!("{}: {rendered}", path.display()),
    };
    ConfigError::Structure { message }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

#[cfg(test)]
mod tests;
