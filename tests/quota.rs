//! The quota-enforcing proxy (tests/support/quota.rs) in front of the
//! embedded broker: it refuses and throttles what AWS IoT Core would, so a
//! gateway that goes over a quota fails the tests that run through it.

mod support;

use std::time::Duration;

use support::free_port;
use support::mqtt::{Mqtt, Options};
use support::quota::{QuotaProxy, Quotas};
use twinbus::mqtt::{Access, EmbeddedBroker};

async fn setup() -> (EmbeddedBroker, u16, QuotaProxy) {
    let port = free_port();
    let broker = EmbeddedBroker::start(format!("127.0.0.1:{port}").parse().expect("address"), Access::anyone()).expect("broker");
    let proxy = QuotaProxy::start(port, Quotas::AWS).await.expect("proxy");
    (broker, port, proxy)
}

fn filters(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("t/{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_with_more_than_8_filters_closes_the_connection() {
    let (_broker, _, proxy) = setup().await;
    let ok = Mqtt::connect(proxy.port(), Options::new("eight").subscribe(filters(8)).wait(Duration::from_secs(2))).await;
    assert!(ok.is_ok(), "8 filters are fine");
    let nine = Mqtt::connect(proxy.port(), Options::new("nine").subscribe(filters(9)).wait(Duration::from_secs(1))).await;
    assert!(nine.is_err(), "no SUBACK for 9 filters");
    let v = proxy.violations();
    assert!(v.first().is_some_and(|v| v.starts_with("nine: a SUBSCRIBE with 9 topic filters")), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_51st_subscription_of_a_connection_is_refused() {
    let (_broker, _, proxy) = setup().await;
    let mqtt = Mqtt::connect(proxy.port(), Options::new("many").wait(Duration::from_secs(2))).await.expect("connect");
    for batch in filters(50).chunks(5) {
        mqtt.subscribe(batch.to_vec()).await.expect("within the quota");
    }
    assert!(proxy.violations().is_empty(), "{:?}", proxy.violations());
    mqtt.subscribe(filters(5)).await.expect("subscribing again to the same filters adds none");
    mqtt.subscribe(["t/50".to_string()]).await.expect("a SUBACK comes");
    let v = proxy.violations();
    assert!(v.len() == 1 && v[0].contains("51 subscriptions"), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_beyond_100_in_a_second_are_throttled() {
    let (_broker, port, proxy) = setup().await;
    let mut listener = Mqtt::connect(port, Options::new(format!("listener-{}", free_port())).subscribe(["burst"])).await.expect("listener");
    let sender = Mqtt::connect(proxy.port(), Options::new("burst")).await.expect("sender");
    for n in 0..150 {
        sender.publish("burst", n.to_string()).await.expect("publish");
    }
    let mut received = 0;
    while listener.next(Duration::from_millis(500)).await.is_some() {
        received += 1;
    }
    assert!(received <= 100, "at most 100 reach the broker within the second: {received}");
    assert!(proxy.violations().iter().all(|v| v.contains("throttled")), "{:?}", proxy.violations());
    assert_eq!(proxy.violations().len(), 150 - received);
    assert_eq!(proxy.publishes("burst"), 150);
}

/// A gateway told its broker allows more than it does: the broker refuses
/// the subscriptions past 50, and the connection never counts as up (its
/// shadows would wait for answers that cannot come).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_subscriptions_are_refused_never_counts_as_up() {
    let (_broker, _, proxy) = setup().await;
    let devices: String = (1..=11)
        .map(|i| format!("  pump-{i:02}: {{ bus: line, unit: {i}, profile: pump, twin: {{ connection: aws, shadow: {{ thing: pump-{i:02} }} }} }}\n"))
        .collect();
    let yaml = format!(
        "state_dir: {}\nconnections:\n  aws: {{ url: \"mqtt://127.0.0.1:{}\", client_id: refused-gw, limits: {{ preset: aws, subscriptions: 100 }} }}\nbuses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: {} }}, timeout: 100ms }}\n{}devices:\n{devices}",
        support::fresh_state_dir("refused").display(),
        proxy.port(),
        free_port(),
        support::PUMP_PROFILE
    );
    let config = twinbus::config::Config::parse(&yaml, std::path::Path::new("refused.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let gateway = twinbus::gateway::Gateway::start(&config).await.expect("start");
    assert!(!gateway.wait_ready(Duration::from_secs(3)).await, "a refused subscription is not a session");
    let v = proxy.violations();
    assert!(v.iter().any(|v| v.starts_with("refused-gw: 55 subscriptions on one connection")), "{v:?}");
    assert!(v.iter().all(|v| !v.contains("topic filters")), "the SUBSCRIBEs themselves stay within 8 filters: {v:?}");
    gateway.shutdown().await;
}
