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

use super::raw::{Key, Map, RawConnection, RawLimits, S};
use super::validate::Checker;
use super::{Broker, BrokerLimits, Connection};

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
