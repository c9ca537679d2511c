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
