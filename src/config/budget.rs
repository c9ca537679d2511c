//! What a connection may ask of its broker, checked before anything starts.
//!
//! AWS IoT Core enforces per-connection quotas that neither Mosquitto nor the
//! embedded broker does: a SUBSCRIBE over 8 filters, more than 50
//! subscriptions or more than 100 publishes per second are refused or
//! throttled, and a second connection with the same client id disconnects
//! the first. A gateway that meets them only in the field fails there, so
//! `limits` (AWS IoT Core's values by default for `*.amazonaws.com`) are
//! checked here against what the devices bound to each connection need, and
//! a configuration that cannot fit is refused with the change to make.

use std::collections::BTreeMap;

use serde_json::{json, Map as JsonMap, Value as Json};

use super::raw::{Key, Map, RawConnection, RawDevice, RawLimits, S};
use super::validate::Checker;
use super::{Broker, BrokerLimits, Connection, Device};

/// Topic filters one shadow subscribes to (get accepted/rejected, update
/// delta/accepted/rejected). AWS advises against wildcards on shadow
/// topics, so each is its own subscription.
pub(crate) const FILTERS_PER_SHADOW: usize = 5;

/// The limits of one connection: the preset (by host unless named), with
/// each field the file sets.
pub(super) fn limits(c: &mut Checker, raw: Option<&S<RawLimits>>, path: &str, broker: Option<&Broker>) -> BrokerLimits {
    let aws_host = matches!(broker, Some(Broker::Remote { host, .. }) if is_aws_host(host));
    let Some(raw) = raw else {
        return if aws_host { BrokerLimits::AWS_IOT_CORE } else { BrokerLimits::default() };
    };
    let raw = &raw.value;
    let path = format!("{path}.limits");
    let mut limits = match &raw.preset {
        None if aws_host => BrokerLimits::AWS_IOT_CORE,
        None => BrokerLimits::default(),
        Some(p) => match p.value.as_str() {
            "aws" => BrokerLimits::AWS_IOT_CORE,
            "none" => BrokerLimits::default(),
            other => {
                c.at(p, &format!("{path}.preset"), format!("{other:?} is not a preset (valid: aws, none)"));
                BrokerLimits::default()
            }
        },
    };
    if let Some(v) = &raw.filters_per_subscribe {
        limits.filters_per_subscribe = c.int(v, &format!("{path}.filters_per_subscribe"), 1, 10_000, "topic filters per SUBSCRIBE");
    }
    if let Some(v) = &raw.subscriptions {
        limits.subscriptions = c.int(v, &format!("{path}.subscriptions"), 1, 1_000_000, "subscriptions per connection");
    }
    if let Some(v) = &raw.publishes_per_second {
        limits.publishes_per_second = c.int(v, &format!("{path}.publishes_per_second"), 1, 1_000_000, "publishes per second");
    }
    if let Some(v) = &raw.bytes_per_second {
        limits.bytes_per_second = c.size(v, &format!("{path}.bytes_per_second"), 1 << 10, 1 << 30);
    }
    if let Some(v) = &raw.max_payload {
        // The client itself never sends more than 1 MiB.
        limits.max_payload = c.size(v, &format!("{path}.max_payload"), 1 << 10, 1 << 20);
    }
    limits
}

/// AWS IoT Core's device data endpoints (`…-ats.iot.<region>.amazonaws.com`,
/// and `.amazonaws.com.cn` in China).
fn is_aws_host(host: &str) -> bool {
    let h = host.to_ascii_lowercase();
    h.ends_with(".amazonaws.com") || h.ends_with(".amazonaws.com.cn")
}

/// Two connections to one broker with one client id disconnect each other
/// in turn (the broker keeps only the newest), forever.
pub(super) fn check_client_ids(c: &mut Checker, raw: &Map<RawConnection>, connections: &[Connection]) {
    let mut seen: BTreeMap<(String, u16, &str), &str> = BTreeMap::new();
    for conn in connections {
        let Broker::Remote { host, port, .. } = &conn.broker else { continue };
        let endpoint = (host.to_ascii_lowercase(), *port, conn.client_id.as_str());
        if let Some(first) = seen.insert(endpoint, &conn.name) {
            let Some((key, rc)) = raw_connection(raw, &conn.name) else { continue };
            let message = format!(
                "client id {:?} is also used by connection `{first}` on the same broker, which disconnects one when the other connects (give each connection its own `client_id`)",
                conn.client_id
            );
            match &rc.client_id {
                Some(id) => c.at(id, &format!("connections.{}.client_id", conn.name), message),
                None => c.key(key, &format!("connections.{}.client_id", conn.name), message),
            }
        }
    }
}

/// The raw entry of connection `name`, for positions.
fn raw_connection<'a>(raw: &'a Map<RawConnection>, name: &str) -> Option<(&'a Key, &'a RawConnection)> {
    raw.iter().find(|(k, _)| k.name() == name)
}

/// What the devices bound to one connection ask of it.
#[derive(Debug, Default)]
struct Demand<'a> {
    subscriptions: usize,
    shadows: usize,
    command_topics: usize,
    /// Publishes per second that always go out: full telemetry documents.
    floor: f64,
    /// Publishes per second when every value changes at every poll.
    worst: f64,
    /// Payload bytes per second of the full telemetry documents.
    floor_bytes: f64,
    /// (device, subscriptions it needs), in file order.
    devices: Vec<(&'a str, usize)>,
}

/// Refuses a connection whose devices need more subscriptions, publishes or
/// bytes per second than its broker allows, saying how to make it fit; warns
/// when only the worst case (every value changing at every poll) does not.
pub(super) fn check_demand(c: &mut Checker, raw: &Map<RawConnection>, raw_devices: &Map<RawDevice>, connections: &[Connection], devices: &[Device]) {
    for (n, conn) in connections.iter().enumerate() {
        let mut d = Demand::default();
        for dev in devices.iter().filter(|d| d.twin.as_ref().is_some_and(|t| t.connection == n)) {
            let Some(t) = &dev.twin else { continue };
            let subs = t.shadows.len() * FILTERS_PER_SHADOW + usize::from(t.commands.is_some());
            d.subscriptions += subs;
            d.shadows += t.shadows.len();
            d.command_topics += usize::from(t.commands.is_some());
            d.devices.push((dev.name.as_str(), subs));
            // Each poll group's read can bring a document (`once` groups
            // hardly count).
            let polls: f64 = dev.groups.iter().filter_map(|g| g.every).map(|e| 1.0 / e.as_secs_f64().max(0.001)).sum();
            let fastest = dev.groups.iter().filter_map(|g| g.every).min().unwrap_or(dev.poll);
            if t.telemetry.is_some() {
                // Each poll's reading goes out at most once; a full document
                // every interval, changes in between.
                let full = if t.every_poll { polls } else { 1.0 / fastest.max(t.telemetry_interval).as_secs_f64().max(0.001) };
                d.floor += full;
                d.worst += if t.report_on_change { polls } else { full };
                d.floor_bytes += full * telemetry_size(dev) as f64;
            }
            // A shadow reports what moved after each poll.
            d.worst += t.shadows.iter().filter(|s| s.points.iter().any(|i| dev.points.get(*i).is_some_and(|p| p.access.readable()))).count() as f64 * polls;
            if let Some(max) = conn.limits.max_payload {
                let size = telemetry_size(dev);
                let telemetry = raw_devices.iter().find(|(k, _)| k.name() == dev.name).and_then(|(_, rd)| rd.twin.as_ref()).and_then(|t| t.value.telemetry.as_ref());
                if let (Some(topic), true) = (telemetry, size > max) {
                    c.at(topic, &format!("devices.{}.twin.telemetry", dev.name), format!(
                        "a full telemetry document of this device can reach {size} bytes, above the {max} bytes connection `{}` allows one message (limits.max_payload): shorten its string points, or raise the limit",
                        conn.name
                    ));
                }
            }
        }
        let Some((key, rc)) = raw_connection(raw, &conn.name) else { continue };
        let at = format!("connections.{}", conn.name);
        if let Some(max) = conn.limits.subscriptions.filter(|max| d.subscriptions > *max) {
            let per = FILTERS_PER_SHADOW;
            let split = split_devices(&d.devices, max);
            c.key(
                key,
                &at,
                format!(
                    "its devices need {} subscriptions ({} shadows × {per} topics, {} command topics), above the {max} the broker allows one connection (limits.subscriptions{}): put at most {} shadows on a connection, the others on more connections to the same broker, each with its own client_id (e.g. {split}); or raise limits.subscriptions if your AWS account's quota was raised",
                    d.subscriptions,
                    d.shadows,
                    d.command_topics,
                    if rc.limits.is_none() { ", AWS IoT Core's default" } else { "" },
                    max / per,
                ),
            );
        }
        if let Some(max) = conn.limits.publishes_per_second {
            let max = f64::from(max);
            if d.floor > max {
                c.key(key, &at, format!(
                    "its devices publish at least {:.0} full telemetry documents per second, above the {max} publishes per second the broker allows one connection (limits.publishes_per_second): lengthen `telemetry_interval` (or `poll`), or put some devices on another connection with its own client_id",
                    d.floor.ceil()
                ));
            } else if d.worst > max {
                c.warnings.push(format!(
                    "{}:{}: {at}: its devices can publish {:.0} messages per second when every value changes at every poll, above the {max} the broker allows: while held at the limit, telemetry and shadow reports waiting on one topic are merged (newest values win); raise deadbands, lengthen `poll`, or spread the devices over more connections to avoid it",
                    c.file.display(),
                    key.0.referenced.line(),
                    d.worst.ceil()
                ));
            }
        }
        if let Some(max) = conn.limits.bytes_per_second {
            if d.floor_bytes > max as f64 {
                c.key(key, &at, format!(
                    "its devices' full telemetry documents need up to {:.0} bytes per second, above the {max} the broker allows one connection (limits.bytes_per_second): lengthen `telemetry_interval`, or put some devices on another connection with its own client_id",
                    d.floor_bytes.ceil()
                ));
            }
        }
    }
}

/// Devices in file order, packed into connections of at most `max`
/// subscriptions: "aws: pump-1 … pump-10; aws-2: pump-11 … pump-20".
fn split_devices(devices: &[(&str, usize)], max: usize) -> String {
    let mut groups: Vec<Vec<&str>> = vec![Vec::new()];
    let mut used = 0;
    for (name, subs) in devices {
        if used + subs > max && groups.last().is_some_and(|g| !g.is_empty()) {
            groups.push(Vec::new());
            used = 0;
        }
        used += subs;
        if let Some(g) = groups.last_mut() {
            g.push(name);
        }
    }
    groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let span = match g.as_slice() {
                [one] => one.to_string(),
                [first, .., last] => format!("{first} … {last}"),
                [] => String::new(),
            };
            format!("connection {}: {span}", i + 1)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The largest full telemetry document of a device, in bytes.
fn telemetry_size(d: &Device) -> usize {
    let mut doc = JsonMap::new();
    doc.insert("time".into(), json!(1_000_000_000_000u64));
    doc.insert("online".into(), json!(false));
    for p in d.points.iter().filter(|p| p.access.readable()) {
        crate::twin::json::insert(&mut doc, &p.path, Json::String("x".repeat(super::shadows::widest(p).saturating_sub(2))));
    }
    Json::Object(doc).to_string().len()
}

