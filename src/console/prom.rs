//! Reads back the few series the console shows from the Prometheus text of
//! `/metrics`: the bus owners and connections count there already, so the
//! console shows the very numbers a Prometheus server scrapes, and needs no
//! counter of its own in their code.
//!
//! Only what `metrics-exporter-prometheus` writes needs to be understood:
//! `name{label="value",…} number` lines, values escaped with `\\`, `\"` and
//! `\n`. Anything else is skipped, never an error.

use std::collections::HashMap;

/// One bus's transactions, by outcome, since the gateway started.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Transactions {
    /// Answered.
    pub(super) ok: f64,
    /// No answer within the timeout.
    pub(super) timeout: f64,
    /// The device answered with a Modbus exception.
    pub(super) exception: f64,
    /// The line failed (connection refused, broken, ...).
    pub(super) error: f64,
}

impl Transactions {
    /// Every transaction, whatever its outcome.
    pub(super) fn total(&self) -> f64 {
        self.ok + self.timeout + self.exception + self.error
    }
}

/// `twinbus_modbus_transactions_total{bus,outcome}` by bus.
pub(super) fn transactions(text: &str) -> HashMap<String, Transactions> {
    let mut out: HashMap<String, Transactions> = HashMap::new();
    for (labels, value) in series(text, "twinbus_modbus_transactions_total") {
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let (Some(bus), Some(outcome)) = (label("bus"), label("outcome")) else { continue };
        let t = out.entry(bus.to_string()).or_default();
        match outcome {
            "ok" => t.ok += value,
            "timeout" => t.timeout += value,
            "exception" => t.exception += value,
            _ => t.error += value,
        }
    }
    out
}

/// A gauge's values by one of its labels.
pub(super) fn gauge(text: &str, name: &str, by: &str) -> HashMap<String, f64> {
    series(text, name).filter_map(|(labels, value)| labels.into_iter().find(|(n, _)| n == by).map(|(_, v)| (v, value))).collect()
}

/// The samples of series `name`: (labels, value).
fn series<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (Vec<(String, String)>, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, rest) = match rest.strip_prefix('{') {
            Some(inner) => parse_labels(inner)?,
            None => (Vec::new(), rest),
        };
        // A space, then the value (and perhaps a timestamp).
        let value = rest.strip_prefix(' ')?.split_whitespace().next()?.parse().ok()?;
        Some((labels, value))
    })
}

/// `a="x",b="y"} rest` → the labels and `rest`.
fn parse_labels(text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.to_string(), value));
        rest = after.get(end + 1..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# TYPE twinbus_modbus_transactions_total counter
twinbus_modbus_transactions_total{bus="line",outcome="ok"} 120
twinbus_modbus_transactions_total{bus="line",outcome="timeout"} 3
twinbus_modbus_transactions_total{bus="line",outcome="exception"} 1
twinbus_modbus_transactions_total{bus="line",outcome="error"} 2
twinbus_modbus_transactions_total{bus="odd \"one\"\\",outcome="ok"} 7
twinbus_modbus_transactions_total_other{bus="line",outcome="ok"} 999
# TYPE twinbus_mqtt_outbox_messages gauge
twinbus_mqtt_outbox_messages{connection="local"} 4
twinbus_mqtt_outbox_messages{connection="aws"} 0
"#;

    #[test]
    fn transactions_are_summed_by_bus_and_outcome() {
        let t = transactions(TEXT);
        assert_eq!(t.get("line"), Some(&Transactions { ok: 120.0, timeout: 3.0, exception: 1.0, error: 2.0 }));
        assert_eq!(t.get("line").map(Transactions::total), Some(126.0));
        assert_eq!(t.get("odd \"one\"\\").map(|t| t.ok), Some(7.0));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn a_gauge_is_read_by_its_label() {
        let g = gauge(TEXT, "twinbus_mqtt_outbox_messages", "connection");
        assert_eq!((g.get("local"), g.get("aws")), (Some(&4.0), Some(&0.0)));
    }

    #[test]
    fn broken_lines_are_skipped_not_fatal() {
        for junk in ["twinbus_modbus_transactions_total{bus=\"x", "twinbus_modbus_transactions_total{bus=\"x\",outcome=\"ok\"}", "twinbus_modbus_transactions_total{bus=\"x\\", "twinbus_modbus_transactions_total{} nope", "twinbus_modbus_transactions_total{bus=}"] {
            assert!(transactions(junk).is_empty(), "{junk}");
        }
    }
}
