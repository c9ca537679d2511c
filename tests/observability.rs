//! What an integrator watches: `/metrics`, `/healthz` and `/readyz` on the
//! gateway's HTTP listener, with series that move when the gateway works.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{free_port, http_get, metric, pump_config, start, Cloud};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_are_served_and_the_series_move() {
    let http_port = free_port();
    let h = start(&(pump_config("") + &format!("http: {{ listen: \"127.0.0.1:{http_port}\" }}\n"))).await;
    let addr = h.gateway.http_addr().expect("the listener is up");
    assert_eq!(addr.port(), http_port);
    let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, "/healthz", None)).await.expect("join");
    assert_eq!((status, body.as_str()), (200, "ok\n"));

    // Ready once connected, subscribed and polled.
    let mut ready = (0, String::new());
    for _ in 0..100 {
        ready = tokio::task::spawn_blocking(move || http_get(addr, "/readyz", None)).await.expect("join");
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.0, 200, "ready: {}", ready.1);

    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let succeeded = r#"twinbus_commands_total{device="pump",outcome="succeeded"}"#;
    let before = scrape(addr).await;
    let answer = cloud.command(&json!({"id": "m-1", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(answer["status"], "succeeded");
    let after = scrape(addr).await;
    assert_eq!(metric(&after, succeeded), Some(metric(&before, succeeded).unwrap_or(0.0) + 1.0), "{after}");
    assert_eq!(metric(&after, r#"twinbus_mqtt_connected{connection="local"}"#), Some(1.0), "{after}");
    assert!(metric(&after, r#"twinbus_mqtt_outbox_messages{connection="local"}"#).is_some(), "{after}");
    // Per bus and device: transactions by outcome, and how long they take.
    let series = |name: &str, outcome: Option<&str>| {
        after.lines().find(|l| {
            l.starts_with(name) && l.contains(r#"bus="line""#) && l.contains(r#"device="pump""#) && outcome.is_none_or(|o| l.contains(&format!("outcome=\"{o}\"")))
        })
    };
    let ok = series("twinbus_modbus_transactions_total{", Some("ok")).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(ok.is_some_and(|n| n >= 2.0), "polls and the command's write and read-back: {after}");
    assert!(series("twinbus_modbus_transaction_seconds_count{", None).is_some(), "{after}");
    assert!(series("twinbus_modbus_transaction_seconds_bucket{", None).is_some(), "a histogram: {after}");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_with_a_login_refuses_requests_without_it() {
    let http_port = free_port();
    let yaml = pump_config("") + &format!("http: {{ listen: \"127.0.0.1:{http_port}\", username: prom, password: \"${{HOME}}\" }}\n");
    let h = start(&yaml).await;
    let addr = h.gateway.http_addr().expect("the listener is up");
    let home = std::env::var("HOME").expect("HOME is set");
    let (anonymous, wrong, right) = tokio::task::spawn_blocking(move || {
        (http_get(addr, "/metrics", None).0, http_get(addr, "/metrics", Some("prom:guess")).0, http_get(addr, "/metrics", Some(&format!("prom:{home}"))).0)
    })
    .await
    .expect("join");
    assert_eq!((anonymous, wrong, right), (401, 401, 200));
    h.gateway.shutdown().await;
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let (status, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics", None)).await.expect("join");
    assert_eq!(status, 200);
    body
}
