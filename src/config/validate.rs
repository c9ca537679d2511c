//! The semantic pass: raw config in, runtime config or every problem out.
//!
//! Each check pushes a problem and carries on, so that a technician fixes the
//! whole file in one round. A problem names its place (`FILE:LINE:COL`), the
//! field's path and what would be valid.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::raw::*;
use super::*;
use crate::point::{Access, DataType, Label, Location, Number, Order, Point, Table, Value};

/// First path segments that the telemetry and answer documents use themselves.
const RESERVED_ROOTS: &[&str] = &["time", "online", "error", "id", "status", "values", "errors", "connected", "command"];

pub(super) struct Checker<'a> {
    pub(super) file: &'a Path,
    pub(super) problems: Vec<String>,
    pub(super) warnings: Vec<String>,
}

impl Checker<'_> {
    pub(super) fn at<T>(&mut self, spanned: &Spanned<T>, path: &str, message: impl std::fmt::Display) {
        let loc = spanned.referenced;
        if loc.line() > 0 {
            self.problems.push(format!("{}:{}:{}: {path}: {message}", self.file.display(), loc.line(), loc.column()));
        } else {
            self.problems.push(format!("{}: {path}: {message}", self.file.display()));
        }
    }

    pub(super) fn key(&mut self, key: &Key, path: &str, message: impl std::fmt::Display) {
        self.at(&key.0, path, message)
    }

    pub(super) fn int<T: TryFrom<i64>>(&mut self, v: &Spanned<i64>, path: &str, lo: i64, hi: i64, what: &str) -> Option<T> {
        if v.value < lo || v.value > hi {
            self.at(v, path, format!("{} is out of range for {what} (valid: {lo} to {hi})", v.value));
            return None;
        }
        T::try_from(v.value).ok()
    }

    pub(super) fn duration(&mut self, v: Option<&Spanned<String>>, path: &str, default: Duration, min: Duration) -> Duration {
        // No setting here needs more than a day; a bound also keeps
        // arithmetic on durations (backoff doubling) from overflowing.
        self.duration_within(v, path, default, min, Duration::from_secs(86_400))
    }

    pub(super) fn duration_within(&mut self, v: Option<&Spanned<String>>, path: &str, default: Duration, min: Duration, max: Duration) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.value.trim()) {
            Ok(d) if d > max => {
                self.at(v, path, format!("{:?} is too long (at most {})", v.value, humantime::format_duration(max)));
                default
            }
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.at(v, path, format!("{:?} is too short (at least {})", v.value, humantime::format_duration(min)));
                default
            }
            Err(e) => {
                self.at(v, path, format!("{:?} is not a duration: {e} (write e.g. 300ms, 2s, 1m)", v.value));
                default
            }
        }
    }

    /// A size in bytes: a number, or a number with a unit (`64MiB`, `512KiB`,
    /// `1GB`).
    pub(super) fn size(&mut self, v: &Spanned<RawScalar>, path: &str, lo: u64, hi: u64) -> Option<usize> {
        let bytes = match &v.value {
            RawScalar::Int(n) => u64::try_from(*n).ok(),
            RawScalar::Float(_) => None,
            RawScalar::Text(t) => parse_size(t),
        };
        let human = |n: u64| format!("{} MiB", n >> 20);
        match bytes {
            Some(n) if (lo..=hi).contains(&n) => usize::try_from(n).ok(),
            Some(n) => {
                self.at(v, path, format!("{n} bytes is out of range (valid: {} KiB to {})", lo >> 10, human(hi)));
                None
            }
            None => {
                self.at(v, path, "is not a size (write e.g. 64MiB, 512KiB, or a number of bytes)");
                None
            }
        }
    }

    /// `${NAME}` → environment variable; `$${` → literal `${`.
    pub(super) fn interpolate(&mut self, v: &Spanned<String>, path: &str) -> String {
        let s = &v.value;
        let mut out = String::with_capacity(s.len());
        let mut rest = s.as_str();
        while let Some(i) = rest.find('$') {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            if let Some(t) = tail.strip_prefix("$${") {
                out.push_str("${");
                rest = t;
            } else if let Some(t) = tail.strip_prefix("${") {
                let Some(end) = t.find('}') else {
                    self.at(v, path, "unclosed `${` (write ${NAME}, or $${ for a literal ${)");
                    return out;
                };
                let name = &t[..end];
                match std::env::var(name) {
                    Ok(val) => out.push_str(&val),
                    Err(_) => self.at(v, path, format!("environment variable {name} is not set")),
                }
                rest = &t[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        out
    }
}

pub(super) fn validate(raw: RawConfig, file: &Path) -> Result<Config, ConfigError> {
    let mut c = Checker { file, problems: Vec::new(), warnings: Vec::new() };
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();

    let connections: Vec<Connection> =
        raw.connections.iter().filter_map(|(k, v)| connection(&mut c, k, v, &base)).collect();
    super::budget::check_client_ids(&mut c, &raw.connections, &connections);
    let buses: Vec<Bus> = raw.buses.iter().filter_map(|(k, v)| bus(&mut c, k, v)).collect();
    check_bus_conflicts(&mut c, &raw.buses, &buses);

    let mut profiles: HashMap<&str, Profile> = HashMap::new();
    for (k, p) in &raw.profiles {
        let path = format!("profiles.{}", k.name());
        let points = points(&mut c, &p.points, &path);
        let schedule = super::polls::schedule(&mut c, &p.points, &p.poll_paths, &points, &path);
        let quirks = super::polls::quirk_settings(&mut c, p.single_writes.as_ref(), p.read_back_delay.as_ref(), p.busy.as_ref(), &path);
        profiles.insert(k.name(), Profile { points, read: p.read.as_ref(), mask_write: p.mask_write.as_ref().map(|m| m.value), commands: &p.commands, schedule, quirks });
    }

    let mut devices = Vec::new();
    for (k, d) in &raw.devices {
        if let Some(dev) = device(&mut c, k, d, &buses, &connections, &profiles) {
            devices.push(dev);
        }
    }
    if raw.devices.is_empty() {
        c.problems.push(format!("{}: devices: no device is configured (add at least one under `devices:`)", file.display()));
    }
    check_device_conflicts(&mut c, &raw.devices, &devices, &buses);
    share_point_tables(&mut devices);

    let simulators = raw.simulators.iter().filter_map(|(k, s)| simulator(&mut c, k, s, &devices)).collect();

    // systemd's StateDirectory= sets $STATE_DIRECTORY; otherwise beside the config.
    let state_dir = match &raw.state_dir {
        Some(d) => base.join(c.interpolate(d, "state_dir")),
        None => std::env::var_os("STATE_DIRECTORY").map_or_else(|| base.join("twinbus-state"), PathBuf::from),
    };
    check_shadow_conflicts(&mut c, &raw.devices, &devices);
    super::budget::check_demand(&mut c, &raw.connections, &raw.devices, &connections, &devices);

    let http = raw.http.as_ref().and_then(|h| http(&mut c, h, &base));
    let shutdown_timeout = c.duration_within(raw.shutdown_timeout.as_ref(), "shutdown_timeout", Duration::from_secs(10), Duration::from_secs(1), Duration::from_secs(600));
    if !c.problems.is_empty() {
        return Err(ConfigError::Invalid { problems: c.problems });
    }
    Ok(Config { source: file.to_path_buf(), connections, buses, devices, simulators, warnings: c.warnings, state_dir, shutdown_timeout, http })
}

fn connection(c: &mut Checker, key: &Key, raw: &RawConnection, base: &Path) -> Option<Connection> {
    let path = format!("connections.{}", key.name());
    let broker = match (&raw.embedded, &raw.url) {
        (Some(e), None) => {
            let listen = socket_addr(c, &e.value.listen, &format!("{path}.embedded.listen"))?;
            let access = broker_access(c, &e.value, &format!("{path}.embedded"), base);
            if !listen.ip().is_loopback() && access.users.is_empty() {
                c.at(&e.value.listen, &format!("{path}.embedded.listen"), format!("{listen} is reachable from other machines: add `users:` (each with `password_file`), or listen on 127.0.0.1"));
            }
            Some(Broker::Embedded { listen, access })
        }
        (None, Some(url)) => remote(c, url, raw.tls.as_ref(), &format!("{path}.url"), base),
        (Some(_), Some(_)) => {
            c.key(key, &path, "has both `embedded` and `url` (choose one)");
            None
        }
        (None, None) => {
            c.key(key, &path, "needs `url: mqtt://host:port` (or mqtts://) or `embedded: { listen: 127.0.0.1:1883 }`");
            None
        }
    };
    let client_id = match &raw.client_id {
        Some(id) => c.interpolate(id, &format!("{path}.client_id")),
        // Two gateways of one site share a broker: a client id per host keeps
        // them from disconnecting each other.
        None => match host_name() {
            Some(host) => format!("twinbus-{host}-{}", key.name()),
            None => {
                c.warnings.push(format!(
                    "{}: {path}.client_id: this machine's host name cannot be read, so the default client id is `twinbus-gateway-{}`: two such gateways on one broker would knock each other off; set `client_id`",
                    c.file.display(),
                    key.name()
                ));
                format!("twinbus-gateway-{}", key.name())
            }
        },
    };
    if client_id.is_empty() || client_id.len() > 128 {
        c.key(key, &format!("{path}.client_id"), "must be 1 to 128 characters");
    }
    let mut keep_alive = c.duration(raw.keep_alive.as_ref(), &format!("{path}.keep_alive"), Duration::from_secs(30), Duration::from_secs(5));
    if let Some(k) = raw.keep_alive.as_ref().filter(|_| keep_alive > Duration::from_secs(65535)) {
        c.at(k, &format!("{path}.keep_alive"), "MQTT allows at most 65535s (about 18h)");
        keep_alive = Duration::from_secs(30);
    }
    let credentials = credentials(c, &raw.username, &raw.password, &raw.password_file, &key.0, &path, base);
    let version = match raw.mqtt_version.as_ref() {
        None => MqttVersion::V311,
        Some(v) => match &v.value {
            RawScalar::Int(5) | RawScalar::Float(5.0) => MqttVersion::V5,
            RawScalar::Int(4) | RawScalar::Int(3) => MqttVersion::V311,
            RawScalar::Text(t) if t == "5" || t == "5.0" => MqttVersion::V5,
            RawScalar::Text(t) if t == "3.1.1" || t == "3" || t == "4" => MqttVersion::V311,
            _ => {
                c.at(v, &format!("{path}.mqtt_version"), "valid: 3.1.1 or 5");
                MqttVersion::V311
            }
        },
    };
    let clean_session = raw.clean_session.as_ref().is_none_or(|c| c.value);
    if let (Some(cs), None) = (&raw.clean_session, &raw.client_id) {
        if !cs.value {
            c.at(cs, &format!("{path}.clean_session"), "a persistent session (clean_session: false) needs an explicit `client_id`, the key of the session on the broker");
        }
    }
    let embedded = matches!(broker, Some(Broker::Embedded { .. }));
    let proxy = raw.proxy.as_ref().and_then(|p| proxy(c, p, &format!("{path}.proxy"), base, embedded));
    let presence = raw.presence.as_ref().map(|p| {
        let topic = p.value.topic.value.trim().to_string();
        if topic.is_empty() || topic.contains(['+', '#']) {
            c.at(&p.value.topic, &format!("{path}.presence.topic"), "is not a topic name (no wildcards + or #, not empty)");
        }
        let retain = p.value.retain.unwrap_or(true);
        // rmqtt (without its retain storage) refuses a CONNECT whose Will is
        // retained on MQTT 5, which would loop forever on a refused CONNACK.
        if embedded && retain && version == MqttVersion::V5 {
            c.at(p, &format!("{path}.presence.retain"), "the embedded broker refuses a retained Last Will on MQTT 5 (set `retain: false`, or use mqtt_version 3.1.1)");
        } else if embedded && retain {
            c.warnings.push(format!("{}: {path}.presence: the embedded broker keeps no retained messages; presence is published, not retained", c.file.display()));
        }
        Presence {
            topic,
            online: p.value.online.clone().unwrap_or_else(|| "online".to_string()),
            offline: p.value.offline.clone().unwrap_or_else(|| "offline".to_string()),
            retain,
        }
    });
    let (rmin, rmax) = raw.reconnect.as_ref().map_or((None, None), |r| (r.min.as_ref(), r.max.as_ref()));
    let reconnect_min = c.duration(rmin, &format!("{path}.reconnect.min"), Duration::from_secs(1), Duration::from_millis(100));
    let mut reconnect_max = c.duration(rmax, &format!("{path}.reconnect.max"), Duration::from_secs(60), Duration::from_millis(100));
    if reconnect_max < reconnect_min {
        if let Some(m) = rmax {
            c.at(m, &format!("{path}.reconnect.max"), "is shorter than `min`");
        }
        reconnect_max = reconnect_min;
    }
    let outbox = outbox(c, raw.outbox.as_ref(), &path);
    let limits = super::budget::limits(c, raw.limits.as_ref(), &path, broker.as_ref());
    Some(Connection {
        name: key.name().to_string(),
        broker: broker?,
        client_id,
        keep_alive,
        credentials,
        version,
        clean_session,
        proxy,
        presence,
        reconnect_min,
        reconnect_max,
        outbox,
        limits,
    })
}

/// Defaults: 100,000 messages, 64 MiB, 24 hours: a day of outage for a
/// gateway sending a few messages per second, in bounded disk space.
fn outbox(c: &mut Checker, raw: Option<&RawOutbox>, path: &str) -> OutboxSettings {
    let max_messages = raw
        .and_then(|o| o.max_messages.as_ref())
        .map_or(Some(100_000), |m| c.int(m, &format!("{path}.outbox.max_messages"), 1, 10_000_000, "a message count"))
        .unwrap_or(100_000);
    let max_bytes = raw
        .and_then(|o| o.max_size.as_ref())
        .map_or(Some(64 << 20), |m| c.size(m, &format!("{path}.outbox.max_size"), 64 << 10, 16 << 30))
        .unwrap_or(64 << 20);
    let max_age = c.duration_within(
        raw.and_then(|o| o.max_age.as_ref()),
        &format!("{path}.outbox.max_age"),
        Duration::from_secs(86_400),
        Duration::from_secs(60),
        Duration::from_secs(30 * 86_400),
    );
    OutboxSettings { max_messages, max_bytes, max_age }
}

/// Logins and limits of the embedded broker.
fn broker_access(c: &mut Checker, raw: &RawEmbedded, path: &str, base: &Path) -> BrokerAccess {
    let mut users = Vec::new();
    for (k, u) in &raw.users {
        let upath = format!("{path}.users.{}", k.name());
        let name = Spanned { value: k.name().to_string(), ..k.0.clone() };
        let Some(login) = credentials(c, &Some(name), &u.password, &u.password_file, &k.0, &upath, base) else { continue };
        if login.password.expose().is_empty() {
            c.key(k, &upath, "needs `password_file` (or `password`)");
            continue;
        }
        let mut filters = |list: &Option<Vec<Spanned<String>>>, what: &str| {
            list.as_ref().map(|l| {
                l.iter()
                    .filter_map(|f| match crate::mqtt::valid_filter(&f.value) {
                        Ok(()) => Some(f.value.clone()),
                        Err(why) => {
                            c.at(f, &format!("{upath}.{what}"), format!("{:?} is not a topic filter: {why}", f.value));
                            None
                        }
                    })
                    .collect()
            })
        };
        let publish = filters(&u.publish, "publish");
        let subscribe = filters(&u.subscribe, "subscribe");
        users.push(BrokerUser { name: login.username, password: login.password, publish, subscribe });
    }
    let max_connections = raw
        .max_connections
        .as_ref()
        .map_or(Some(64), |m| c.int(m, &format!("{path}.max_connections"), 2, 100_000, "a connection count"))
        .unwrap_or(64);
    BrokerAccess { users, max_connections }
}

/// The HTTP listener: beyond loopback only with a login, since metrics name
/// every device and topic of the site.
fn http(c: &mut Checker, raw: &Spanned<RawHttp>, base: &Path) -> Option<HttpSettings> {
    let h = &raw.value;
    let listen = socket_addr(c, &h.listen, "http.listen")?;
    let credentials = credentials(c, &h.username, &h.password, &h.password_file, &h.listen, "http", base);
    if !listen.ip().is_loopback() && credentials.as_ref().is_none_or(|c| c.password.expose().is_empty()) {
        c.at(&h.listen, "http.listen", format!("{listen} is reachable from other machines: set `username` and `password_file` (or `password`), or listen on 127.0.0.1"));
        return None;
    }
    let console = match &h.console {
        Some(s) if s.value.write && credentials.as_ref().is_none_or(|c| c.password.expose().is_empty()) => {
            // A write changes the plant: who did it must be known, also on loopback.
            c.at(s, "http.console.write", "writing from the console needs a login: set `username` and `password_file` (or `password`) under `http`, or `write: false`");
            return None;
        }
        Some(s) if s.value.enabled => Some(ConsoleSettings { write: s.value.write }),
        _ => None,
    };
    Some(HttpSettings { listen, credentials, console })
}

/// `username` with `password` or `password_file`, for a broker or a proxy.
fn credentials(
    c: &mut Checker,
    username: &Option<Spanned<String>>,
    password: &Option<Spanned<String>>,
    password_file: &Option<Spanned<String>>,
    at: &Spanned<String>,
    path: &str,
    base: &Path,
) -> Option<Credentials> {
    let password = match (password, password_file) {
        (Some(p), None) => {
            if !p.value.replace("$${", "").contains("${") {
                c.warnings.push(format!(
                    "{}:{}: {path}.password: the password is written inline; prefer `password: ${{ENV_VAR}}` or `password_file`",
                    c.file.display(),
                    p.referenced.line()
                ));
            }
            Some(Secret(c.interpolate(p, &format!("{path}.password"))))
        }
        (None, Some(f)) => {
            let file = base.join(c.interpolate(f, &format!("{path}.password_file")));
            match read_secret_file(&file) {
                Ok(s) => Some(Secret(s)),
                Err(e) => {
                    c.at(f, &format!("{path}.password_file"), format!("cannot read {}: {e}", file.display()));
                    None
                }
            }
        }
        (Some(p), Some(_)) => {
            c.at(p, &format!("{path}.password"), "both `password` and `password_file` are set (choose one)");
            None
        }
        (None, None) => None,
    };
    match (username, password) {
        (Some(u), password) => {
            let username = c.interpolate(u, &format!("{path}.username"));
            Some(Credentials { username, password: password.unwrap_or(Secret(String::new())) })
        }
        (None, Some(_)) => {
            c.at(at, &format!("{path}.username"), "a password is set but no `username`");
            None
        }
        (None, None) => None,
    }
}

fn proxy(c: &mut Checker, p: &Spanned<RawProxy>, path: &str, base: &Path, embedded: bool) -> Option<Proxy> {
    if embedded {
        c.at(p, path, "the embedded broker is in the gateway itself: it needs no proxy");
        return None;
    }
    let raw = &p.value;
    let text = c.interpolate(&raw.url, &format!("{path}.url"));
    let (kind, rest, default_port) = if let Some(r) = text.strip_prefix("http://") {
        (ProxyKind::Http, r, 3128)
    } else if let Some(r) = text.strip_prefix("socks5://") {
        (ProxyKind::Socks5, r, 1080)
    } else {
        c.at(&raw.url, &format!("{path}.url"), format!("{:?}: write http://host:port or socks5://host:port", redact_url(&raw.url.value)));
        return None;
    };
    let (host, port) = match split_authority(rest, default_port) {
        Ok(hp) => hp,
        Err(why) => {
            c.at(&raw.url, &format!("{path}.url"), format!("{:?}: {why}", redact_url(&raw.url.value)));
            return None;
        }
    };
    let credentials = credentials(c, &raw.username, &raw.password, &raw.password_file, &raw.url, path, base);
    Some(Proxy { kind, host, port, credentials })
}

/// A password file: a regular file (not a FIFO that would hang `check`, nor
/// a device like /dev/zero that would fill memory) of at most 64 KiB, read
/// without its trailing line break.
fn read_secret_file(file: &Path) -> Result<String, String> {
    use std::io::Read as _;
    const MAX: u64 = 64 * 1024;
    let meta = std::fs::metadata(file).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file (a password file must be a plain file)".to_string());
    }
    if meta.len() > MAX {
        return Err(format!("{} bytes; a password file holds at most {MAX} bytes", meta.len()));
    }
    let mut text = String::new();
    std::fs::File::open(file).and_then(|f| f.take(MAX).read_to_string(&mut text)).map_err(|e| e.to_string())?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

/// A URL as it may be shown: a password in it becomes `***`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

/// `64MiB`, `512 KiB`, `1GB`, `100000`: bytes. Binary and decimal units both
/// mean what they say.
fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// This machine's host name, for default client ids; `None` when no source
/// tells it (a sandbox hiding /proc, a container without /etc/hostname).
fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .chain(std::env::var("HOSTNAME").ok())
        .map(|n| n.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').take(48).collect::<String>())
        .find(|n| !n.is_empty())
}

fn remote(c: &mut Checker, url: &Spanned<String>, tls: Option<&Spanned<RawTls>>, path: &str, base: &Path) -> Option<Broker> {
    let text = c.interpolate(url, path);
    let (scheme, rest) = match text.split_once("://") {
        Some(parts) => parts,
        None => {
            c.at(url, path, format!("{:?} is not a URL (write mqtt://host:1883 or mqtts://host:8883)", redact_url(&url.value)));
            return None;
        }
    };
    let (secure, websocket, default_port) = match scheme {
        "mqtt" | "tcp" => (false, false, 1883),
        "mqtts" | "ssl" => (true, false, 8883),
        "ws" => (false, true, 80),
        "wss" => (true, true, 443),
        other => {
            c.at(url, path, format!("unknown scheme {other:?} (valid: mqtt, mqtts, ws, wss)"));
            return None;
        }
    };
    let websocket_path = websocket.then(|| match rest.find('/') {
        Some(i) if i + 1 < rest.len() => rest[i..].to_string(),
        _ => "/mqtt".to_string(),
    });
    let (host, port) = match split_authority(rest, default_port) {
        Ok(hp) => hp,
        Err(why) => {
            // The message quotes what the user wrote, not the interpolated
            // text, which may hold a secret; and never a password in the URL.
            c.at(url, path, format!("{:?}: {why}", redact_url(&url.value)));
            return None;
        }
    };
    let tls = match (secure, tls) {
        (true, t) => Some(t.map(|t| tls_settings(c, &t.value, path, base)).unwrap_or_default()),
        (false, Some(t)) => {
            c.at(t, path, "`tls` is set but the URL has no TLS (use mqtts:// or wss://)");
            None
        }
        (false, None) => None,
    };
    Some(Broker::Remote { host, port, tls, websocket_path })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`, with an optional trailing path.
fn split_authority(rest: &str, default_port: u16) -> Result<(String, u16), String> {
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err("credentials do not belong in the URL (use `username` and `password`)".to_string());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("an IPv6 address needs a closing `]`")?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':').ok_or("expected `:port` after `]`")?)),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host (write e.g. mqtts://broker.example.com:8883)".to_string());
    }
    if !plain_host(host) {
        return Err("the host has a space or a control character".to_string());
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("{p:?} is not a port (1 to 65535)")),
        },
    };
    Ok((host.to_string(), port))
}

/// No host name or address has spaces or control characters: one that does
/// is a typo (or a stray `\n` from an environment variable), which would
/// otherwise surface only as a failed name lookup at run time.
fn plain_host(host: &str) -> bool {
    !host.chars().any(|ch| ch.is_whitespace() || ch.is_control())
}

fn tls_settings(c: &mut Checker, t: &RawTls, path: &str, base: &Path) -> Tls {
    let mut file = |v: &Option<Spanned<String>>, field: &str| -> Option<PathBuf> {
        let v = v.as_ref()?;
        let p = base.join(c.interpolate(v, &format!("{path}.tls.{field}")));
        if !p.is_file() {
            c.at(v, &format!("{path}.tls.{field}"), format!("{} does not exist or is not a file", p.display()));
        }
        Some(p)
    };
    let tls = Tls { ca: file(&t.ca, "ca"), cert: file(&t.cert, "cert"), key: file(&t.key, "key"), alpn: t.alpn.clone() };
    if tls.cert.is_some() != tls.key.is_some() {
        let v = t.cert.as_ref().or(t.key.as_ref());
        if let Some(v) = v {
            c.at(v, &format!("{path}.tls"), "a client certificate needs both `cert` and `key`");
        }
    }
    tls
}

fn socket_addr(c: &mut Checker, v: &Spanned<String>, path: &str) -> Option<SocketAddr> {
    match v.value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            c.at(v, path, format!("{:?} is not an address:port (write e.g. 127.0.0.1:1883)", v.value));
            None
        }
    }
}

fn bus(c: &mut Checker, key: &Key, raw: &RawBus) -> Option<Bus> {
    let path = format!("buses.{}", key.name());
    let given = [raw.rtu.is_some(), raw.tcp.is_some(), raw.rtu_tcp.is_some()].iter().filter(|g| **g).count();
    let mut line_baud = None;
    let transport = match (&raw.rtu, &raw.tcp, &raw.rtu_tcp) {
        _ if given > 1 => {
            c.key(key, &path, "has more than one of `rtu`, `tcp` and `rtu_tcp` (choose one)");
            None
        }
        (Some(r), None, None) => {
            let r = &r.value;
            let p = format!("{path}.rtu");
            let port = c.interpolate(&r.port, &format!("{p}.port"));
            if port.trim().is_empty() {
                c.at(&r.port, &format!("{p}.port"), "is empty (write the serial device, e.g. /dev/ttyUSB0)");
            }
            let baud = r.baud.as_ref().map_or(Some(9600), |b| c.int(b, &format!("{p}.baud"), 300, 4_000_000, "a baud rate"));
            let data_bits = r.data_bits.as_ref().map_or(Some(8), |b| c.int(b, &format!("{p}.data_bits"), 7, 8, "data bits"));
            let stop_bits = r.stop_bits.as_ref().map_or(Some(1), |b| c.int(b, &format!("{p}.stop_bits"), 1, 2, "stop bits"));
            let parity = match r.parity.unwrap_or(RawParity::Even) {
                RawParity::None => Parity::None,
                RawParity::Even => Parity::Even,
                RawParity::Odd => Parity::Odd,
            };
            // Not `?`: that would leave the bus's other fields unchecked.
            match (baud, data_bits, stop_bits) {
                (Some(baud), Some(data_bits), Some(stop_bits)) => Some(Transport::Rtu(SerialSettings { port, baud, parity, data_bits, stop_bits })),
                _ => None,
            }
        }
        (None, Some(t), None) => {
            let t = &t.value;
            let host = c.interpolate(&t.host, &format!("{path}.tcp.host"));
            if host.trim().is_empty() {
                c.at(&t.host, &format!("{path}.tcp.host"), "is empty (write the device's address, e.g. 192.168.1.50)");
            } else if !plain_host(&host) {
                c.at(&t.host, &format!("{path}.tcp.host"), format!("{:?} is not a host name or address (it has a space or a control character)", t.host.value));
            }
            let port = t.port.as_ref().map_or(Some(502), |p| c.int(p, &format!("{path}.tcp.port"), 1, 65535, "a TCP port"));
            port.map(|port| Transport::Tcp { host, port })
        }
        (None, None, Some(t)) => {
            let t = &t.value;
            let p = format!("{path}.rtu_tcp");
            let host = c.interpolate(&t.host, &format!("{p}.host"));
            if host.trim().is_empty() {
                c.at(&t.host, &format!("{p}.host"), "is empty (write the device server's address, e.g. 192.168.1.60)");
            }
            let port = c.int(&t.port, &format!("{p}.port"), 1, 65535, "a TCP port");
            line_baud = t.baud.as_ref().map_or(Some(9600), |b| c.int(b, &format!("{p}.baud"), 300, 4_000_000, "a baud rate"));
            let connect_timeout = c.duration_within(t.connect_timeout.as_ref(), &format!("{p}.connect_timeout"), Duration::from_secs(3), Duration::from_millis(10), Duration::from_secs(60));
            Some(Transport::RtuTcp { host, port: port?, connect_timeout })
        }
        _ => {
            c.key(key, &path, "needs `rtu: { port: /dev/ttyUSB0, baud: 9600 }`, `tcp: { host: 10.0.0.5, port: 502 }` or `rtu_tcp: { host: 10.0.0.6, port: 4001 }`");
            None
        }
    };
    let timeout = c.duration(raw.timeout.as_ref(), &format!("{path}.timeout"), Duration::from_millis(500), Duration::from_millis(10));
    let retries = raw.retries.as_ref().map_or(Some(1), |r| c.int(r, &format!("{path}.retries"), 0, 10, "retries"));
    let transport = transport?;
    // Modbus RTU frames are separated by 3.5 character times of silence; the
    // spec fixes it at 1.75 ms above 19200 baud.
    // A serial device server passes the gateway's frames on to its line as
    // they come: the line behind it needs the same silence as a local port.
    let baud = match &transport {
        Transport::Rtu(s) => Some(s.baud),
        Transport::RtuTcp { .. } => line_baud,
        Transport::Tcp { .. } => None,
    };
    let default_delay = match baud {
        Some(b) if b > 19200 => Duration::from_micros(1750),
        Some(b) => Duration::from_micros(u64::from(38_500_000 / b.max(1))),
        None => Duration::ZERO,
    };
    let delay = c.duration(raw.delay.as_ref(), &format!("{path}.delay"), default_delay, Duration::ZERO);
    Some(Bus { name: key.name().to_string(), transport, timeout, retries: retries?, delay })
}

fn check_bus_conflicts(c: &mut Checker, raw: &Map<RawBus>, buses: &[Bus]) {
    let mut seen: HashMap<String, &str> = HashMap::new();
    for b in buses {
        let resource = match &b.transport {
            Transport::Rtu(s) => format!("serial port {}", s.port),
            Transport::Tcp { host, port } | Transport::RtuTcp { host, port, .. } => format!("TCP endpoint {host}:{port}"),
        };
        if let Some(first) = seen.get(&resource) {
            let key = raw.keys().find(|k| k.name() == b.name);
            if let Some(key) = key {
                c.key(key, &format!("buses.{}", b.name), format!(
                    "uses the {resource} like bus `{first}`: one line has one owner (put both devices on `{first}`)"
                ));
            }
        } else {
            seen.insert(resource, &b.name);
        }
    }
}

fn read_limits(c: &mut Checker, raw: Option<&RawReadLimits>, path: &str) -> ReadLimits {
    let mut limits = ReadLimits::default();
    if let Some(r) = raw {
        if let Some(v) = &r.max_registers {
            limits.max_registers = c.int(v, &format!("{path}.read.max_registers"), 1, 125, "registers per read").unwrap_or(125);
        }
        if let Some(v) = &r.max_bits {
            limits.max_bits = c.int(v, &format!("{path}.read.max_bits"), 1, 2000, "bits per read").unwrap_or(2000);
        }
        if let Some(v) = &r.max_gap {
            limits.max_gap = c.int(v, &format!("{path}.read.max_gap"), 0, 124, "a gap").unwrap_or(0);
        }
    }
    limits
}

/// Makes devices with equal point tables hold one table: a point costs a few
/// hundred bytes, and a site of a thousand meters of one model (through a
/// profile or written out) would otherwise keep a thousand copies. Equal
/// tables are found by comparison, so a device's own points (or a copy of
/// the profile's written inline) still share when they match.
fn share_point_tables(devices: &mut [Device]) {
    let mut distinct: Vec<Arc<Vec<Point>>> = Vec::new();
    for d in devices {
        match distinct.iter().find(|t| t.len() == d.points.len() && ***t == *d.points) {
            Some(t) => d.points = Arc::clone(t),
            None => distinct.push(Arc::clone(&d.points)),
        }
    }
}

/// A profile after its own checks: what a device takes from it (the
/// device's own `read` and `mask_write` win).
struct Profile<'a> {
    points: Vec<Point>,
    read: Option<&'a RawReadLimits>,
    mask_write: Option<bool>,
    commands: &'a Map<RawCommand>,
    schedule: super::polls::Schedule,
    quirks: super::polls::QuirkSettings,
}

fn device(
    c: &mut Checker,
    key: &Key,
    raw: &RawDevice,
    buses: &[Bus],
    connections: &[Connection],
    profiles: &HashMap<&str, Profile>,
) -> Option<Device> {
    let path = format!("devices.{}", key.name());
    let bus = buses.iter().position(|b| b.name == raw.bus.value);
    if bus.is_none() {
        let known = buses.iter().map(|b| b.name.as_str()).collect::<Vec<_>>().join(", ");
        c.at(&raw.bus, &format!("{path}.bus"), format!("no bus named {:?} (defined: {known})", raw.bus.value));
    }
    let is_tcp = bus.is_some_and(|i| matches!(buses[i].transport, Transport::Tcp { .. }));
    // Modbus TCP devices are often addressed as 0 or 255; on a serial line 0
    // is broadcast and 248–255 are reserved.
    let (lo, hi) = if is_tcp { (0, 255) } else { (1, 247) };
    let unit = c.int(&raw.unit, &format!("{path}.unit"), lo, hi, "a unit id");

    let mut pts = Vec::new();
    let mut read_raw = raw.read.as_ref();
    let mut mask_write = raw.mask_write.as_ref().map(|m| m.value);
    let mut raw_commands = None;
    let mut profile_of = None;
    if let Some(p) = &raw.profile {
        match profiles.get(p.value.as_str()) {
            Some(profile) => {
                profile_of = Some(profile);
                pts.extend(profile.points.iter().cloned());
                read_raw = read_raw.or(profile.read);
                mask_write = mask_write.or(profile.mask_write);
                raw_commands = Some((profile.commands, format!("profiles.{}", p.value)));
            }
            None => {
                let known = profiles.keys().copied().collect::<Vec<_>>().join(", ");
                c.at(p, &format!("{path}.profile"), format!("no profile named {:?} (defined: {known})", p.value));
            }
        }
    }
    let own = points(c, &raw.points, &path);
    for (a, b) in nested_pairs(pts.iter().chain(&own)) {
        // Pairs within the profile or within the device were reported already.
        let a_own = own.iter().any(|p| p.path == a);
        let b_own = own.iter().any(|p| p.path == b);
        if a_own != b_own {
            let (mine, message) = if b_own {
                (&b, format!("is inside point `{a}` of the profile, which holds a value (rename one)"))
            } else {
                (&a, format!("holds a value, but the profile's point `{b}` is inside it (rename one)"))
            };
            if let Some(k) = raw.points.keys().find(|k| k.name() == mine) {
                c.key(k, &format!("{path}.points.{mine}"), message);
            }
        }
    }
    for p in own {
        if pts.iter().any(|q: &Point| q.path == p.path) {
            c.key(key, &format!("{path}.points.{}", p.path), "is also defined by the profile (rename one)");
        } else {
            pts.push(p);
        }
    }
    pts.sort_by(|a, b| a.path.cmp(&b.path));
    let unknown_profile = raw.profile.as_ref().is_some_and(|p| !profiles.contains_key(p.value.as_str()));
    if pts.is_empty() && !unknown_profile {
        c.key(key, &path, "has no points (give it `profile:` or `points:`)");
    }
    check_overlaps(c, key, &path, &pts);
    let commands = match raw_commands {
        // Checked against the merged points, once per device: a profile's
        // command may use a point the device adds.
        Some((cmds, at)) => cmds.iter().filter_map(|(k, cmd)| command(c, k, cmd, &format!("{at}.commands.{}", k.name()), &pts)).collect(),
        None => Vec::new(),
    };
    let read = read_limits(c, read_raw, &path);
    let poll = c.duration(raw.poll.as_ref(), &format!("{path}.poll"), Duration::from_secs(1), Duration::from_millis(10));
    let schedule = super::polls::schedule(c, &raw.points, &raw.poll_paths, &pts, &path);
    let groups = super::polls::groups(poll, &pts, &schedule, profile_of.map(|p| &p.schedule));
    let quirks = super::polls::quirk_settings(c, raw.single_writes.as_ref(), raw.read_back_delay.as_ref(), raw.busy.as_ref(), &path);
    let quirks = super::polls::quirks(quirks, profile_of.map(|p| p.quirks));
    let mut twin = match &raw.twin {
        Some(t) => Some(twin(c, t, &format!("{path}.twin"), connections)?),
        None => None,
    };
    if let (Some(t), Some(raw_twin)) = (twin.as_mut(), &raw.twin) {
        super::shadows::assign(c, &raw_twin.value, &mut t.shadows, &pts, &format!("{path}.twin"));
        super::shadows::check_sizes(c, &raw_twin.value, &t.shadows, &pts, &format!("{path}.twin"));
    }
    let mask_write = mask_write.unwrap_or(false);
    Some(Device { name: key.name().to_string(), bus: bus?, unit: unit?, points: Arc::new(pts), read, mask_write, poll, groups, quirks, commands, twin })
}

fn command(c: &mut Checker, key: &Key, raw: &RawCommand, path: &str, points: &[Point]) -> Option<CommandDef> {
    let name = key.name();
    if name == "relay-command" || name.is_empty() {
        c.key(key, path, "`relay-command` is built in (choose another name)");
    }
    let args: Vec<ArgDef> = raw
        .args
        .iter()
        .map(|(k, a)| ArgDef {
            name: k.name().to_string(),
            kind: match a.arg_type {
                RawArgType::Number => ArgKind::Number,
                RawArgType::Bool => ArgKind::Bool,
                RawArgType::String => ArgKind::String,
            },
            min: a.min,
            max: a.max,
        })
        .collect();
    if raw.steps.is_empty() {
        c.key(key, &format!("{path}.steps"), "has no steps (write e.g. `- set: { deviceAttrib.motorStatus: on }`)");
    }
    let mut steps = Vec::new();
    for (n, step) in raw.steps.iter().enumerate() {
        let here = format!("{path}.steps[{n}]");
        let values = |map: &indexmap::IndexMap<String, RawSimValue>, writing: bool, c: &mut Checker| -> Vec<(usize, StepValue)> {
            let mut out = Vec::new();
            for (p, v) in map {
                let Some(i) = points.iter().position(|x| &x.path == p) else {
                    c.at(step, &here, format!("no point {p:?} on this device"));
                    continue;
                };
                let point = &points[i];
                if writing && !point.access.writable() {
                    c.at(step, &here, format!("point {p:?} is read-only"));
                }
                if !writing && !point.access.readable() {
                    c.at(step, &here, format!("point {p:?} is write-only: it cannot be checked"));
                }
                let value = match v {
                    RawSimValue::Text(t) if t.starts_with('$') => {
                        let arg = &t[1..];
                        if !args.iter().any(|a| a.name == arg) {
                            c.at(step, &here, format!("`${arg}` is not an argument of this command"));
                        }
                        StepValue::Arg(arg.to_string())
                    }
                    other => {
                        let value = match other {
                            RawSimValue::Bool(b) => Value::Bool(*b),
                            RawSimValue::Int(i) => Value::Int(*i),
                            RawSimValue::Float(f) => Value::Float(*f),
                            RawSimValue::Text(t) => Value::Text(t.clone()),
                        };
                        let check = if writing { point.encode(&value) } else { point.encode_device_value(&value) };
                        if let Err(e) = check {
                            c.at(step, &here, format!("{p}: {e}"));
                        }
                        StepValue::Literal(value)
                    }
                };
                out.push((i, value));
            }
            out
        };
        match &step.value {
            RawStep::Set(m) => steps.push(Step::Set(values(m, true, c))),
            RawStep::Check(m) => steps.push(Step::Check(values(m, false, c))),
            RawStep::Wait(d) => match humantime::parse_duration(d.trim()) {
                Ok(d) => steps.push(Step::Wait(d)),
                Err(e) => c.at(step, &here, format!("{d:?} is not a duration: {e} (write e.g. 2s)")),
            },
        }
    }
    Some(CommandDef { name: name.to_string(), args, steps })
}

fn twin(c: &mut Checker, t: &Spanned<RawTwin>, path: &str, connections: &[Connection]) -> Option<Twin> {
    let raw = &t.value;
    let connection = connections.iter().position(|x| x.name == raw.connection.value);
    if connection.is_none() {
        let known = connections.iter().map(|x| x.name.as_str()).collect::<Vec<_>>().join(", ");
        c.at(&raw.connection, &format!("{path}.connection"), format!("no connection named {:?} (defined: {known})", raw.connection.value));
    }
    let mut topic = |v: &Option<Spanned<String>>, field: &str| -> Option<String> {
        let v = v.as_ref()?;
        let s = v.value.trim();
        if s.is_empty() || s.contains(['+', '#', '\0']) || s.len() > 1024 {
            c.at(v, &format!("{path}.{field}"), format!("{s:?} is not a topic name (no wildcards + or #, not empty)"));
        }
        Some(s.to_string())
    };
    let commands = topic(&raw.commands, "commands");
    let responses = topic(&raw.responses, "responses");
    let telemetry = topic(&raw.telemetry, "telemetry");
    if commands.is_some() && responses.is_none() {
        c.at(t, &format!("{path}.responses"), "commands need a `responses` topic to answer on");
    }
    let every_poll = raw.telemetry_interval.as_ref().is_some_and(|v| v.value.trim() == "every_poll");
    let telemetry_interval = if every_poll {
        Duration::from_secs(10)
    } else {
        c.duration(raw.telemetry_interval.as_ref(), &format!("{path}.telemetry_interval"), Duration::from_secs(10), Duration::from_millis(100))
    };
    let response_topics: Vec<String> = match &raw.response_topics {
        None => responses.iter().cloned().collect(),
        Some(list) => list
            .iter()
            .filter_map(|f| match crate::mqtt::valid_filter(&f.value) {
                Ok(()) => Some(f.value.clone()),
                Err(why) => {
                    c.at(f, &format!("{path}.response_topics"), format!("{:?} is not a topic filter: {why}", f.value));
                    None
                }
            })
            .collect(),
    };
    if let (Some(_), Some(list)) = (&raw.shadow, &raw.shadows) {
        c.at(list, &format!("{path}.shadows"), "has both `shadow` and `shadows` (list every shadow under `shadows`)");
    }
    if raw.shadow.is_none() && raw.shadows.as_ref().is_some_and(|l| l.value.is_empty()) {
        if let Some(list) = &raw.shadows {
            c.at(list, &format!("{path}.shadows"), "is empty (write at least one `{ thing: name }`)");
        }
    }
    let shadows: Vec<ShadowBinding> = super::shadows::raw_shadows(raw, path)
        .into_iter()
        .map(|(s, at)| ShadowBinding { reply_topics: response_topics.clone(), ..shadow(c, s, &at) })
        .collect();
    if raw.commands.is_none() && raw.telemetry.is_none() && shadows.is_empty() {
        c.at(t, path, "binds nothing: give it `commands`/`responses`, `telemetry` or `shadow`");
    }
    Some(Twin {
        connection: connection?,
        commands,
        responses,
        telemetry,
        telemetry_interval,
        every_poll,
        report_on_change: raw.report_on_change.unwrap_or(true),
        acknowledge: raw.acknowledge.unwrap_or(false),
        allow_shutdown: raw.allow_shutdown.unwrap_or(false),
        response_topics,
        shadows,
    })
}

fn shadow(c: &mut Checker, s: &Spanned<RawShadow>, path: &str) -> ShadowBinding {
    let raw = &s.value;
    // AWS IoT: thing names up to 128, shadow names up to 64 characters of [a-zA-Z0-9:_-].
    let valid = |v: &str, max: usize| !v.is_empty() && v.len() <= max && v.chars().all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, ':' | '_' | '-'));
    if !valid(&raw.thing.value, 128) {
        c.at(&raw.thing, &format!("{path}.thing"), "AWS IoT thing names are 1 to 128 characters of letters, digits, :, _ and -");
    }
    if let Some(n) = &raw.name {
        if !valid(&n.value, 64) {
            c.at(n, &format!("{path}.name"), "shadow names are 1 to 64 characters of letters, digits, :, _ and -");
        }
    }
    let errors_key = raw.errors_key.as_ref().map_or_else(|| "twinbus.errors".to_string(), |k| k.value.clone());
    if errors_key.is_empty() || errors_key.split('.').any(str::is_empty) {
        if let Some(k) = &raw.errors_key {
            c.at(k, &format!("{path}.errors_key"), "is not a dotted path (e.g. twinbus.errors)");
        }
    }
    let running_interval = c.duration(raw.running_interval.as_ref(), &format!("{path}.running_interval"), Duration::from_secs(10), Duration::from_millis(100));
    // The points are set once the device's are known, the reply topics by the twin.
    ShadowBinding { thing: raw.thing.value.clone(), name: raw.name.as_ref().map(|n| n.value.clone()), errors_key, running_interval, points: Vec::new(), reply_topics: Vec::new() }
}

/// One shadow has one owner: two devices (or one device twice) writing one
/// shadow would fight.
fn check_shadow_conflicts(c: &mut Checker, raw: &Map<RawDevice>, devices: &[Device]) {
    let mut seen: BTreeMap<(usize, String), String> = BTreeMap::new();
    for d in devices {
        let Some(t) = &d.twin else { continue };
        let raw_twin = raw.iter().find(|(k, _)| k.name() == d.name).and_then(|(_, rd)| rd.twin.as_ref());
        let raws = raw_twin.map(|rt| super::shadows::raw_shadows(&rt.value, &format!("devices.{}.twin", d.name))).unwrap_or_default();
        for (i, s) in t.shadows.iter().enumerate() {
            let here = raws.get(i).map_or_else(|| format!("devices.{}.twin.shadow", d.name), |(_, p)| p.clone());
            if let Some(first) = seen.insert((t.connection, s.prefix()), here.clone()) {
                if let Some((at, _)) = raws.get(i) {
                    c.at(*at, &here, format!("{first} is already this shadow (give each its own thing or shadow name)"));
                }
            }
        }
    }
}

fn points(c: &mut Checker, raw: &Map<RawPoint>, parent: &str) -> Vec<Point> {
    let mut out: Vec<Point> = Vec::new();
    for (k, p) in raw {
        let path = format!("{parent}.points.{}", k.name());
        if let Some(point) = point(c, k, p, &path) {
            out.push(point);
        }
    }
    for (a, b) in nested_pairs(out.iter()) {
        if let Some(key) = raw.keys().find(|k| k.name() == b) {
            c.key(key, &format!("{parent}.points.{b}"), format!("is inside point `{a}`, which holds a value (rename one)"));
        }
    }
    out
}

/// (outer, inner) paths where `inner` lies inside `outer`: `a.b` and `a.b.c`
/// cannot both exist in one JSON document.
fn nested_pairs<'a>(points: impl Iterator<Item = &'a Point> + Clone) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for a in points.clone() {
        for b in points.clone() {
            if b.path.starts_with(&format!("{}.", a.path)) {
                pairs.push((a.path.clone(), b.path.clone()));
            }
        }
    }
    pairs
}

fn point(c: &mut Checker, key: &Key, p: &RawPoint, path: &str) -> Option<Point> {
    let name = key.name();
    let valid_path = !name.is_empty()
        && name.split('.').all(|s| !s.is_empty() && s.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == '-'));
    if !valid_path {
        c.key(key, path, "is not a point path (segments of letters, digits, _ or -, joined by dots: deviceAttrib.motorStatus)");
    }
    let root = name.split('.').next().unwrap_or("");
    if RESERVED_ROOTS.contains(&root) {
        c.key(key, path, format!("`{root}` is used by twinbus's own documents (reserved: {})", RESERVED_ROOTS.join(", ")));
    }
    let tables = [(&p.coil, Table::Coil), (&p.discrete, Table::DiscreteInput), (&p.input, Table::InputRegister), (&p.holding, Table::HoldingRegister)];
    let given: Vec<_> = tables.iter().filter_map(|(v, t)| v.as_ref().map(|v| (v, *t))).collect();
    let (addr, table) = match given.as_slice() {
        [(v, t)] => (*v, *t),
        [] => {
            c.key(key, path, "needs its location: one of `coil`, `discrete`, `input` or `holding` with an address");
            return None;
        }
        _ => {
            c.key(key, path, "has more than one of `coil`, `discrete`, `input`, `holding` (choose one)");
            return None;
        }
    };
    let address: u16 = c.int(addr, &format!("{path}.{}", table.name()), 0, 65535, "an address")?;

    let bit = match &p.bit {
        Some(b) if !table.is_bits() => Some(c.int::<u8>(b, &format!("{path}.bit"), 0, 15, "a bit number")?),
        Some(b) => {
            c.at(b, &format!("{path}.bit"), format!("`bit` selects a bit of a register; a {} is already one bit", table.name()));
            return None;
        }
        None => None,
    };
    let default_type = if table.is_bits() || bit.is_some() { RawType::Bool } else { RawType::U16 };
    let raw_type = p.data_type.as_ref().map_or(default_type, |t| t.value);
    if (table.is_bits() || bit.is_some()) && raw_type != RawType::Bool {
        if let Some(t) = &p.data_type {
            c.at(t, &format!("{path}.type"), "a single bit can only be `bool`");
        }
        return None;
    }
    let data_type = match raw_type {
        RawType::Bool => DataType::Bool,
        RawType::U16 => DataType::U16,
        RawType::I16 => DataType::I16,
        RawType::U32 => DataType::U32,
        RawType::I32 => DataType::I32,
        RawType::F32 => DataType::F32,
        RawType::U64 => DataType::U64,
        RawType::I64 => DataType::I64,
        RawType::F64 => DataType::F64,
        RawType::String => match &p.length {
            Some(l) => DataType::String { len: c.int(l, &format!("{path}.length"), 1, 240, "a string length in characters")? },
            None => {
                c.key(key, &format!("{path}.length"), "a string point needs `length` (characters, two per register)");
                return None;
            }
        },
    };
    if let (Some(l), false) = (&p.length, raw_type == RawType::String) {
        c.at(l, &format!("{path}.length"), "`length` is only for `type: string`");
    }
    let width = if table.is_bits() || bit.is_some() { 1 } else { data_type.registers() };
    if u32::from(address) + u32::from(width) - 1 > 65535 {
        c.at(addr, path, format!("a {} at {address} spans {width} registers and runs past 65535", data_type.name()));
    }

    let default_access = if table.is_writable() { RawAccess::ReadWrite } else { RawAccess::Read };
    let access = match p.access.as_ref().map_or(default_access, |a| a.value) {
        RawAccess::Read => Access::Read,
        RawAccess::Write => Access::Write,
        RawAccess::ReadWrite => Access::ReadWrite,
    };
    if access.writable() && !table.is_writable() {
        if let Some(a) = &p.access {
            c.at(a, &format!("{path}.access"), format!("a {} cannot be written (only coils and holding registers can)", table.name()));
        }
    }

    let scale = p.scale.as_ref().map_or(1.0, |s| s.value);
    let offset = p.offset.as_ref().map_or(0.0, |s| s.value);
    let numeric = !matches!(data_type, DataType::Bool | DataType::String { .. });
    for (v, field) in [(&p.scale, "scale"), (&p.offset, "offset")] {
        if let Some(v) = v {
            if !numeric {
                c.at(v, &format!("{path}.{field}"), format!("`{field}` applies to numbers, not to a {}", data_type.name()));
            } else if !v.value.is_finite() || (field == "scale" && v.value == 0.0) {
                c.at(v, &format!("{path}.{field}"), format!("{} is not a usable {field}", v.value));
            }
        }
    }

    let mut labels = Vec::new();
    // Labels on a point that cannot have them are one problem, said once: not
    // also a refusal of each label by the codec (an "internal" one for a float).
    let mut labels_apply = true;
    if let Some(values) = &p.values {
        if matches!(data_type, DataType::F32 | DataType::F64 | DataType::String { .. }) || scale != 1.0 || offset != 0.0 {
            c.at(values, &format!("{path}.values"), "enum labels apply to bool and unscaled integer points");
            labels_apply = false;
        }
        for (name, raw) in &values.value {
            let raw = match raw {
                RawLabel::Bool(b) => i64::from(*b),
                RawLabel::Int(i) => *i,
            };
            if let Some(other) = labels.iter().find(|l: &&Label| l.raw == raw) {
                c.at(values, &format!("{path}.values.{name}"), format!("has the same device value {raw} as `{}`", other.name));
            }
            labels.push(Label { name: name.clone(), raw });
        }
        if labels.is_empty() {
            c.at(values, &format!("{path}.values"), "is empty (write e.g. `{ on: true, off: false }`)");
        }
    }

    let point = Point {
        path: name.to_string(),
        location: Location { table, address, bit },
        data_type,
        word_order: order(p.word_order),
        byte_order: order(p.byte_order),
        scale,
        offset,
        labels,
        access,
        min: p.min.as_ref().map(|v| number(v.value)),
        max: p.max.as_ref().map(|v| number(v.value)),
        allowed: p.allowed.as_ref().map(|v| v.value.iter().map(|a| number(a.value)).collect()).unwrap_or_default(),
        deadband: p.deadband.as_ref().map_or(0.0, |v| v.value),
        trigger: p.trigger.as_ref().is_some_and(|t| t.value),
    };
    if let Some(t) = p.trigger.as_ref().filter(|t| t.value && !access.writable()) {
        c.at(t, &format!("{path}.trigger"), "applies to points that are written (this one is read-only)");
    }
    check_limits(c, p, &point, path);
    if let Some(v) = p.values.as_ref().filter(|_| labels_apply) {
        for l in &point.labels {
            if let Err(e) = point.encode_device_value(&Value::Text(l.name.clone())) {
                c.at(v, &format!("{path}.values.{}", l.name), e);
            }
        }
    }
    Some(point)
}

fn check_limits(c: &mut Checker, p: &RawPoint, point: &Point, path: &str) {
    let limited = p.min.is_some() || p.max.is_some() || p.allowed.is_some();
    let numeric = point.labels.is_empty() && !matches!(point.data_type, DataType::Bool | DataType::String { .. });
    if limited && !numeric {
        let at = p.min.as_ref().or(p.max.as_ref());
        if let Some(v) = at {
            c.at(v, path, "`min`, `max` and `allowed` apply to numeric points (use `values` for labels)");
        } else if let Some(v) = &p.allowed {
            c.at(v, path, "`allowed` applies to numeric points (use `values` for labels)");
        }
        return;
    }
    // Each limit must be a value the point can hold exactly (a whole
    // number, on a step of the scale, an exact f32): a limit that is not is
    // a typo, or a promise the device cannot keep. The reason says what
    // would be valid.
    let holds = |c: &mut Checker, v: &Spanned<RawNumber>, field: &str| {
        let n = number(v.value);
        let problem = if n.is_finite() { point.holds(n).err() } else { Some(format!("{n} is not a usable limit (write a finite number)")) };
        if let Some(problem) = &problem {
            c.at(v, &format!("{path}.{field}"), problem);
        }
        problem.is_none()
    };
    let min = p.min.as_ref().filter(|v| holds(c, v, "min")).map(|v| number(v.value));
    let max = p.max.as_ref().filter(|v| holds(c, v, "max")).map(|v| number(v.value));
    if let (Some(lo), Some(hi), Some(at)) = (min, max, &p.min) {
        if lo > hi {
            c.at(at, &format!("{path}.min"), format!("{lo} is above max {hi}"));
        }
    }
    // An allowed value outside min..max could never be written.
    for a in p.allowed.iter().flat_map(|list| &list.value) {
        if holds(c, a, "allowed") {
            let n = number(a.value);
            if let Some(lo) = min.filter(|lo| n < *lo) {
                c.at(a, &format!("{path}.allowed"), format!("{n} is below the minimum {lo}, so it could never be written"));
            } else if let Some(hi) = max.filter(|hi| n > *hi) {
                c.at(a, &format!("{path}.allowed"), format!("{n} is above the maximum {hi}, so it could never be written"));
            }
        }
    }
    if let Some(d) = &p.deadband {
        if !(d.value >= 0.0 && d.value.is_finite()) {
            c.at(d, &format!("{path}.deadband"), "must be zero or a positive number");
        }
    }
}

fn number(n: RawNumber) -> Number {
    match n {
        RawNumber::Int(i) => Number::Int(i),
        RawNumber::Float(f) => Number::Float(f),
    }
}

fn order(o: Option<RawOrder>) -> Order {
    match o {
        Some(RawOrder::Little) => Order::Little,
        _ => Order::Big,
    }
}

/// Two writable points on the same registers would let one command clobber
/// another's value; read-only views of the same registers are fine.
fn check_overlaps(c: &mut Checker, key: &Key, path: &str, points: &[Point]) {
    let writable: Vec<&Point> = points.iter().filter(|p| p.access.writable()).collect();
    for (i, a) in writable.iter().enumerate() {
        for b in &writable[i + 1..] {
            if a.location.table != b.location.table {
                continue;
            }
            let (a0, a1) = a.span();
            let (b0, b1) = b.span();
            let same_range = a0 <= b1 && b0 <= a1;
            let distinct_bits = matches!((a.location.bit, b.location.bit), (Some(x), Some(y)) if x != y);
            if same_range && !distinct_bits {
                c.key(key, path, format!(
                    "writable points `{}` ({} {a0}..={a1}) and `{}` ({} {b0}..={b1}) overlap (make one `access: read`, or move it)",
                    a.path, a.location.table.name(), b.path, b.location.table.name()
                ));
            }
        }
    }
}

fn check_device_conflicts(c: &mut Checker, raw: &Map<RawDevice>, devices: &[Device], buses: &[Bus]) {
    let raw_of = |name: &str| raw.iter().find(|(k, _)| k.name() == name).map(|(_, d)| d);
    let mut units: BTreeMap<(usize, u8), &str> = BTreeMap::new();
    let mut topics: BTreeMap<(usize, String), (String, &str)> = BTreeMap::new();
    for d in devices {
        if let Some(first) = units.insert((d.bus, d.unit), &d.name) {
            if let Some(rd) = raw_of(&d.name) {
                c.at(&rd.unit, &format!("devices.{}.unit", d.name), format!(
                    "unit {} on bus `{}` is already used by device `{first}` (each device on a line needs its own unit id)",
                    d.unit, buses[d.bus].name
                ));
            }
        }
        let Some(t) = &d.twin else { continue };
        for (field, topic) in [("commands", &t.commands), ("responses", &t.responses), ("telemetry", &t.telemetry)] {
            let Some(topic) = topic else { continue };
            let here = format!("devices.{}.twin.{field}", d.name);
            if let Some((other, _)) = topics.insert((t.connection, topic.clone()), (here.clone(), &d.name)) {
                let at = raw_of(&d.name).and_then(|rd| rd.twin.as_ref()).and_then(|t| match field {
                    "commands" => t.value.commands.as_ref(),
                    "responses" => t.value.responses.as_ref(),
                    _ => t.value.telemetry.as_ref(),
                });
                if let Some(at) = at {
                    c.at(at, &here, format!("topic {topic:?} is already used by {other} on the same connection (give each its own topic)"));
                }
            }
        }
    }
}

fn simulator(c: &mut Checker, key: &Key, s: &RawSimulator, devices: &[Device]) -> Option<Simulator> {
    let path = format!("simulators.{}", key.name());
    let pace = s.baud.as_ref().and_then(|b| c.int::<u32>(b, &format!("{path}.baud"), 300, 4_000_000, "a baud rate"));
    let listen = match (&s.listen, &s.serial) {
        (Some(l), None) => socket_addr(c, l, &format!("{path}.listen")).map(SimListen::Tcp),
        (None, Some(p)) => Some(SimListen::Serial { path: PathBuf::from(&p.value), baud: pace.unwrap_or(9600) }),
        (Some(l), Some(_)) => {
            c.at(l, &format!("{path}.listen"), "give `listen` (TCP) or `serial`, not both");
            None
        }
        (None, None) => {
            c.key(key, &path, "has nowhere to serve (give `listen: address:port` or `serial: /dev/...`)");
            None
        }
    };
    let mut served: Vec<&Device> = Vec::new();
    for name in &s.serves {
        match devices.iter().find(|d| d.name == name.value) {
            Some(d) if served.iter().any(|x| x.unit == d.unit) => {
                c.at(name, &format!("{path}.serves"), format!("two served devices share unit {}", d.unit));
            }
            Some(d) => served.push(d),
            None => c.at(name, &format!("{path}.serves"), format!("no device named {:?}", name.value)),
        }
    }
    let find = |p: &str| served.iter().flat_map(|d| d.points.iter()).find(|x| x.path == p).cloned();
    let mut initial = Vec::new();
    for (k, v) in &s.initial {
        let Some(point) = find(k.name()) else {
            c.key(k, &format!("{path}.initial"), format!("no served device has a point {:?}", k.name()));
            continue;
        };
        let value = match &v.value {
            RawSimValue::Bool(b) => Value::Bool(*b),
            RawSimValue::Int(i) => Value::Int(*i),
            RawSimValue::Float(f) => Value::Float(*f),
            RawSimValue::Text(t) => Value::Text(t.clone()),
        };
        if let Err(e) = point.encode_device_value(&value) {
            c.at(v, &format!("{path}.initial.{}", k.name()), e);
        }
        initial.push((k.name().to_string(), value));
    }
    for d in &s.drift {
        if find(&d.value).is_none() {
            c.at(d, &format!("{path}.drift"), format!("no served device has a point {:?}", d.value));
        }
    }
    let mut mirror = Vec::new();
    for (k, leader) in &s.mirror {
        if find(k.name()).is_none() {
            c.key(k, &format!("{path}.mirror"), format!("no served device has a point {:?}", k.name()));
        }
        if find(&leader.value).is_none() {
            c.at(leader, &format!("{path}.mirror.{}", k.name()), format!("no served device has a point {:?}", leader.value));
        }
        mirror.push((k.name().to_string(), leader.value.clone()));
    }
    let devices = served
        .iter()
        .map(|d| {
            let has = |p: &str| d.points.iter().any(|x| x.path == p);
            SimulatedDevice {
                unit: d.unit,
                points: d.points.clone(),
                initial: initial.iter().filter(|(p, _)| has(p)).cloned().collect(),
                drift: s.drift.iter().map(|x| x.value.clone()).filter(|p| has(p)).collect(),
                mirror: mirror.iter().filter(|(f, _)| has(f)).cloned().collect(),
            }
        })
        .collect();
    let framing = match s.framing {
        Some(RawFraming::Rtu) => Framing::Rtu,
        Some(RawFraming::Tcp) | None => Framing::Tcp,
    };
    Some(Simulator { name: key.name().to_string(), listen: listen?, pace, devices, framing })
}
