//! Commissioning: talk to one device or one line from the command line,
//! without the cloud (`twinbus read`, `write`, `scan`).
//!
//! These build only the bus owner (and, for `read` and `write`, the device
//! actor) of the configuration's line, never its connections or brokers, so
//! an integrator can check wiring, unit ids and register maps before the
//! first cloud message. A write goes through exactly the checks a cloud
//! command does (`command::check_set`: known, writable, type, labels, limits,
//! scale steps) and is read back. A serial port is opened exclusively: when
//! the gateway (or anything else) holds it, these refuse with that reason
//! instead of garbling the line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value as Json;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Device};
use crate::device::{spawn_device, DeviceHandle, Outcome};
use crate::lifecycle::Tasks;
use crate::modbus::{spawn_bus, BusError, Op, Priority, Reply};
use crate::point::Value;
use crate::twin::command::{check_get, check_set};

/// Why a commissioning command failed; each has its exit status.
#[derive(Debug)]
pub enum Failure {
    /// The request does not fit the configuration (unknown device or point,
    /// a value the checks refuse): nothing was sent. Exit status 3.
    Refused(String),
    /// The device or the line failed (no answer, an exception, the port is
    /// busy). Exit status 4.
    Device(String),
}

impl Failure {
    /// The process exit status for it.
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Refused(_) => 3,
            Failure::Device(_) => 4,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Refused(why) | Failure::Device(why) => f.write_str(why),
        }
    }
}

/// One device with its bus, started for one command and stopped after.
struct Session {
    device: DeviceHandle,
    tasks: Tasks,
    cancel: CancellationToken,
}

impl Session {
    fn start(config: &Config, name: &str) -> Result<Session, Failure> {
        let device = find_device(config, name)?;
        let (tasks, _failures) = Tasks::new();
        let bus = &config.buses[device.bus];
        let bus_handle = spawn_bus(bus.clone(), &tasks);
        let cancel = CancellationToken::new();
        // Polled rarely: this session reads and writes on request only.
        let quiet = Device { poll: Duration::from_secs(86_400), twin: None, ..device.clone() };
        let handle = spawn_device(&quiet, bus_handle, bus.retries, &tasks, cancel.clone());
        Ok(Session { device: handle, tasks, cancel })
    }

    async fn stop(self) {
        self.tasks.stopping();
        self.cancel.cancel();
        drop(self.device);
        self.tasks.wait(Duration::from_secs(5)).await;
    }
}

fn find_device<'a>(config: &'a Config, name: &str) -> Result<&'a Device, Failure> {
    config.device(name).ok_or_else(|| {
        let known: Vec<&str> = config.devices.iter().map(|d| d.name.as_str()).collect();
        Failure::Refused(format!("no device named {name:?} in {} (devices: {})", config.source.display(), known.join(", ")))
    })
}

/// `twinbus read DEVICE [POINT…]`: reads the points (all readable ones when
/// none is named; a group path reads all under it) and returns a table.
pub async fn read(config: &Config, device: &str, paths: &[String]) -> Result<String, Failure> {
    let points = &find_device(config, device)?.points;
    let asked = (!paths.is_empty()).then_some(paths);
    let indices = check_get(points, asked).map_err(|errors| Failure::Refused(reasons(&errors)))?;
    let session = Session::start(config, device)?;
    let outcome = session.device.read(indices.clone()).await;
    session.stop().await;
    let table = table(config, device, &indices, &outcome);
    match outcome.error {
        Some(e) if outcome.values.is_empty() => Err(Failure::Device(e)),
        Some(e) => Ok(format!("{table}\nsome reads failed: {e}\n")),
        None => Ok(table),
    }
}

/// `twinbus write DEVICE POINT VALUE`: the value goes through the checks of
/// a cloud command, is written and read back. `value` is JSON (`42`,
/// `true`, `"on"`) or, when it is not, a label written bare (`on`).
pub async fn write(config: &Config, device: &str, path: &str, value: &str) -> Result<String, Failure> {
    let points = &find_device(config, device)?.points;
    let json: Json = serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_string()));
    let writes = check_set(points, &[(path.to_string(), json)]).map_err(|errors| Failure::Refused(format!("nothing was written: {}", reasons(&errors))))?;
    let indices: Vec<usize> = writes.iter().map(|(i, _)| *i).collect();
    let session = Session::start(config, device)?;
    let outcome = session.device.write(writes).await;
    session.stop().await;
    let table = table(config, device, &indices, &outcome);
    match outcome.error {
        Some(e) => Err(Failure::Device(format!("{e}\n{table}"))),
        None => Ok(format!("written and read back:\n{table}")),
    }
}

fn reasons(errors: &BTreeMap<String, String>) -> String {
    errors.iter().map(|(p, e)| format!("{p}: {e}")).collect::<Vec<_>>().join("; ")
}

fn table(config: &Config, device: &str, indices: &[usize], outcome: &Outcome) -> String {
    let Some(d) = config.device(device) else { return String::new() };
    let width = indices.iter().map(|&i| d.points[i].path.len()).max().unwrap_or(0);
    let mut out = String::new();
    for &i in indices {
        let p = &d.points[i];
        let shown = match outcome.values.iter().find(|(j, _)| *j == i) {
            Some((_, v)) => shown(v),
            None => "(not read)".to_string(),
        };
        let _ = writeln!(out, "{:width$}  {shown}", p.path);
    }
    out
}

fn shown(v: &Value) -> String {
    match v {
        Value::Text(t) => t.clone(),
        other => other.to_string(),
    }
}

/// What one unit id did when probed.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// Answered the read with data.
    Data(Vec<u16>),
    /// Answered with a Modbus exception: it is there, it refused this read.
    Exception(String),
    /// No answer within the timeout.
    Silent,
}

/// `twinbus scan BUS`: probes each unit id with one read (function 3 of
/// holding register `address`, or function 4 with `input`), no retries, and
/// calls `progress` after each. A unit that answers, even with an
/// exception, is there.
pub async fn scan(
    config: &Config,
    bus: &str,
    units: std::ops::RangeInclusive<u8>,
    address: u16,
    input: bool,
    timeout: Option<Duration>,
    mut progress: impl FnMut(u8, &Probe),
) -> Result<Vec<(u8, Probe)>, Failure> {
    let Some(line) = config.buses.iter().find(|b| b.name == bus) else {
        let known: Vec<&str> = config.buses.iter().map(|b| b.name.as_str()).collect();
        return Err(Failure::Refused(format!("no bus named {bus:?} (buses: {})", known.join(", "))));
    };
    let mut line = line.clone();
    if let Some(t) = timeout {
        line.timeout = t;
    }
    let (tasks, _failures) = Tasks::new();
    let handle = spawn_bus(line, &tasks);
    let op = if input { Op::ReadInputRegisters(address, 1) } else { Op::ReadHoldingRegisters(address, 1) };
    let mut found = Vec::new();
    let mut failure = None;
    for unit in units {
        let probe = match handle.call(Priority::Command, unit, op.clone(), 0).await {
            Ok(Reply::Words(w)) => Probe::Data(w),
            Ok(_) => Probe::Data(Vec::new()),
            // A Modbus gateway answering for a unit id that does not answer behind it.
            Err(e @ BusError::Exception(_)) if e.is_unreachable() => Probe::Silent,
            Err(BusError::Exception(code)) => Probe::Exception(crate::modbus::exception_name(code)),
            Err(BusError::Timeout(_)) => Probe::Silent,
            // The line itself failed (the port is busy or gone): probing on is pointless.
            Err(e) => {
                failure = Some(Failure::Device(format!("the bus {bus} failed: {e}")));
                break;
            }
        };
        progress(unit, &probe);
        found.push((unit, probe));
    }
    tasks.stopping();
    drop(handle);
    tasks.wait(Duration::from_secs(5)).await;
    match failure {
        Some(f) => Err(f),
        None => Ok(found),
    }
}

/// Parses `1-247`, `5`, `1-10` into a range of unit ids.
pub fn parse_units(text: &str) -> Result<std::ops::RangeInclusive<u8>, String> {
    let bad = || format!("{text:?} is not a unit id or a range like 1-247");
    let (a, b) = text.split_once('-').unwrap_or((text, text));
    let lo: u8 = a.trim().parse().map_err(|_| bad())?;
    let hi: u8 = b.trim().parse().map_err(|_| bad())?;
    if lo > hi {
        return Err(bad());
    }
    Ok(lo..=hi)
}

#[cfg(test)]
mod tests {
    use super::parse_units;

    #[test]
    fn unit_ranges_are_parsed_or_refused_with_the_form_to_use() {
        assert_eq!(parse_units("1-247"), Ok(1..=247));
        assert_eq!(parse_units("5"), Ok(5..=5));
        assert!(parse_units("10-2").is_err());
        assert!(parse_units("0-300").is_err());
        assert!(parse_units("x").unwrap_err().contains("1-247"));
    }
}
