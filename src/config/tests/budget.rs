//! Broker limits per connection, and what the devices bound to a connection
//! may ask of it.

use super::*;

/// A document whose only connection is `connection` (indented under `aws:`),
/// with `devices` (already indented) after the pump profile.
fn aws_with(connection: &str, devices: &str) -> String {
    let head = HEAD.replace("  cloud:\n    embedded:\n      listen: 127.0.0.1:1883\n", &format!("  aws:\n{connection}"));
    format!("{head}devices:\n{devices}")
}

const AWS_URL: &str = "    url: mqtts://abc123-ats.iot.eu-west-1.amazonaws.com:8883\n    client_id: line3\n";
const ONE_PUMP: &str = "  pump-1: { bus: line, unit: 1, profile: pump, twin: { connection: aws, shadow: { thing: pump-1 } } }\n";

#[test]
fn an_aws_iot_endpoint_gets_aws_quotas_unless_the_file_says_otherwise() {
    let c = valid(&aws_with(AWS_URL, ONE_PUMP));
    assert_eq!(c.connections[0].limits, BrokerLimits::AWS_IOT_CORE);
    let elsewhere = valid(&base());
    assert_eq!(elsewhere.connections[0].limits, BrokerLimits::default(), "no limits elsewhere");

    let raised = valid(&aws_with(&format!("{AWS_URL}    limits: {{ subscriptions: 200, bytes_per_second: 1MiB }}\n"), ONE_PUMP));
    let l = raised.connections[0].limits;
    assert_eq!((l.subscriptions, l.bytes_per_second, l.filters_per_subscribe), (Some(200), Some(1 << 20), Some(8)), "overrides on top of the preset");
    let off = valid(&aws_with(&format!("{AWS_URL}    limits: {{ preset: none }}\n"), ONE_PUMP));
    assert_eq!(off.connections[0].limits, BrokerLimits::default());
    let local = valid(&insert_after(&base(), "      listen: 127.0.0.1:1883\n", "    limits: { preset: aws, publishes_per_second: 20 }\n"));
    assert_eq!(local.connections[0].limits.publishes_per_second, Some(20), "a test broker can play AWS");
}

#[test]
fn bad_limits_are_refused_where_they_are_written() {
    let text = aws_with(&format!("{AWS_URL}    limits: {{ preset: azure, filters_per_subscribe: 0, max_payload: 4MiB }}\n"), ONE_PUMP);
    let ps = problems(&text);
    let line = line_of(&text, "preset: azure");
    expect_problem(&ps, line, "connections.aws.limits.preset", &["azure", "valid: aws, none"]);
    expect_problem(&ps, line, "connections.aws.limits.filters_per_subscribe", &["out of range"]);
    expect_problem(&ps, line, "connections.aws.limits.max_payload", &["out of range"]);
}

#[test]
fn two_connections_with_one_client_id_on_one_broker_are_refused() {
    let text = with_devices("  pump-1: { bus: line, unit: 1, profile: pump, twin: { connection: a, telemetry: t } }\n").replace(
        "  cloud:\n    embedded:\n      listen: 127.0.0.1:1883\n",
        "  a: { url: mqtt://broker.local, client_id: gw }\n  b: { url: mqtt://broker.local:1883, client_id: gw }\n  c: { url: mqtt://other.local, client_id: gw }\n",
    );
    only_problem(&text, line_of(&text, "b: { url"), "connections.b.client_id", &["\"gw\"", "connection `a`", "its own `client_id`"]);
}

/// `n` pumps named pump-01… on connection `aws`, each bound to its own shadow.
fn pumps(n: usize) -> String {
    (1..=n).map(|i| format!("  pump-{i:02}: {{ bus: line, unit: {i}, profile: pump, twin: {{ connection: aws, shadow: {{ thing: pump-{i:02} }} }} }}\n")).collect()
}

#[test]
fn thirty_shadows_on_one_aws_connection_are_refused_with_the_split_to_make() {
    let text = aws_with(AWS_URL, &pumps(30));
    only_problem(
        &text,
        line_of(&text, "  aws:"),
        "connections.aws",
        &["150 subscriptions (30 shadows × 5 topics", "above the 50", "at most 10 shadows", "its own client_id", "connection 1: pump-01 … pump-10; connection 2: pump-11 … pump-20; connection 3: pump-21 … pump-30"],
    );
    valid(&aws_with(AWS_URL, &pumps(10)));
    valid(&aws_with(&format!("{AWS_URL}    limits: {{ subscriptions: 150 }}\n"), &pumps(30)));
}

#[test]
fn telemetry_that_cannot_fit_the_publish_limit_is_refused_and_a_worst_case_that_cannot_draws_a_warning() {
    let telemetry = |n: usize, interval: &str| -> String {
        (1..=n).map(|i| format!("  pump-{i:03}: {{ bus: plc, unit: {}, profile: pump, poll: 500ms, twin: {{ connection: aws, telemetry: t/{i}, telemetry_interval: {interval} }} }}\n", i % 250)).collect()
    };
    let text = aws_with(AWS_URL, &telemetry(60, "500ms"));
    only_problem(&text, line_of(&text, "  aws:"), "connections.aws", &["at least 120 full telemetry documents per second", "above the 100"]);
    let c = valid(&aws_with(AWS_URL, &telemetry(60, "1s")));
    assert!(c.warnings.iter().any(|w| w.contains("120 messages per second when every value changes")), "{:?}", c.warnings);
}
