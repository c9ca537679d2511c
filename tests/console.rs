//! The local web console over HTTP, as its page uses it: the overview and a
//! device's page as server-sent events, and the write from the page. (The
//! page itself is driven in a real browser by tests/browser/, from .ci/run.)

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use support::{free_port, http_get, pump_config, start, Cloud};
use twinbus::config::Config;
use twinbus::point::Value;

/// One server-sent event stream, read line by line.
struct Events {
    lines: BufReader<TcpStream>,
}

impl Events {
    fn open(addr: SocketAddr, path: &str) -> Events {
        let mut s = TcpStream::connect(addr).expect("connect to the HTTP listener");
        s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n").expect("send");
        let mut lines = BufReader::new(s);
        let mut status = String::new();
        lines.read_line(&mut status).expect("status line");
        assert!(status.contains(" 200 "), "{path}: {status}");
        Events { lines }
    }

    /// The first event whose JSON satisfies `want`, within 15 s.
    fn until(&mut self, what: &str, want: impl Fn(&Json) -> bool) -> Json {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut last = Json::Null;
        while Instant::now() < deadline {
            let mut line = String::new();
            match self.lines.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            // The body is chunked: event lines are the ones starting with `data:`.
            let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
            let Ok(doc) = serde_json::from_str::<Json>(data.trim_start()) else { continue };
            if want(&doc) {
                return doc;
            }
            last = doc;
        }
        panic!("no event with {what}; the last one: {last:#}");
    }
}

fn device<'a>(overview: &'a Json, name: &str) -> Option<&'a Json> {
    overview["devices"].as_array()?.iter().find(|d| d["name"] == name)
}

fn point<'a>(page: &'a Json, path: &str) -> Option<&'a Json> {
    page["points"].as_array()?.iter().find(|p| p["path"] == path)
}

fn http(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>, body: &str) -> (u16, Json) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let auth = auth.map(|a| format!("Authorization: Basic {}\r\n", data_encoding::BASE64.encode(a.as_bytes()))).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or(Json::Null))
}

fn with_http(http: &str) -> String {
    pump_config("") + &format!("http: {{ listen: \"127.0.0.1:{}\", {http} }}\n", free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_is_off_unless_configured() {
    let h = start(&(pump_config("") + &format!("http: {{ listen: \"127.0.0.1:{}\" }}\n", free_port()))).await;
    let addr = h.gateway.http_addr().expect("the listener is up");
    let (page, api) = tokio::task::spawn_blocking(move || (http_get(addr, "/console/", None).0, http_get(addr, "/console/api/overview", None).0)).await.expect("join");
    assert_eq!((page, api), (404, 404));
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_follow_the_device_its_commands_and_its_silence() {
    let h = start(&with_http("console: true")).await;
    let addr = h.gateway.http_addr().expect("the listener is up");
    let (page, script) = tokio::task::spawn_blocking(move || (http_get(addr, "/console/", None), http_get(addr, "/console/app.js", None))).await.expect("join");
    assert_eq!(page.0, 200);
    assert!(page.1.contains("/console/app.js"), "{}", page.1);
    assert!(script.0 == 200 && script.1.contains("EventSource"));

    let mut overview = tokio::task::spawn_blocking(move || Events::open(addr, "/console/events")).await.expect("join");
    let mut overview = tokio::task::spawn_blocking(move || {
        overview.until("the pump online", |o| device(o, "pump").is_some_and(|d| d["state"] == "online"));
        overview
    })
    .await
    .expect("join");

    // A command from the cloud shows on the device's page with its outcome.
    let mut page = tokio::task::spawn_blocking(move || Events::open(addr, "/console/events/device/pump")).await.expect("join");
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let answer = cloud.command(&json!({"id": "c-1", "set": {"deviceAttrib": {"setpoint": 55}}})).await;
    assert_eq!(answer["status"], "succeeded");
    let mut page = tokio::task::spawn_blocking(move || {
        let doc = page.until("command c-1", |d| d["commands"][0]["id"] == "\"c-1\"");
        let c = &doc["commands"][0];
        assert_eq!((c["source"].as_str(), c["kind"].as_str(), c["outcome"].as_str()), (Some("raw"), Some("set"), Some("succeeded")), "{c}");
        assert_eq!(c["values"], json!([["deviceAttrib.setpoint", 55.0]]));
        page
    })
    .await
    .expect("join");

    // A value changed in the field shows with its registers.
    h.sim.set_value(1, "deviceData.temperature", &Value::Float(30.5)).expect("the simulator has the point");
    let mut page = tokio::task::spawn_blocking(move || {
        let doc = page.until("30.5 °", |d| point(d, "deviceData.temperature").is_some_and(|p| p["text"] == "30.5"));
        let p = point(&doc, "deviceData.temperature").cloned().unwrap_or_default();
        assert_eq!((p["raw"].as_str(), p["where"].as_str()), (Some("0131"), Some("input 0")));
        assert!(p["changed"].is_u64() && p["sample"][1] == json!(30.5), "{p}");
        page
    })
    .await
    .expect("join");

    // Silence: offline with the reason, on both pages, and no stale values.
    h.sim.set_silent(1, true);
    tokio::task::spawn_blocking(move || {
        let doc = page.until("the pump offline", |d| d["state"] == "offline");
        assert!(doc["reason"].as_str().is_some_and(|r| !r.is_empty()), "{doc}");
        assert_eq!(point(&doc, "deviceData.temperature").map(|p| p["value"].clone()), Some(Json::Null));
        overview.until("the pump offline", |o| device(o, "pump").is_some_and(|d| d["state"] == "offline"));
    })
    .await
    .expect("join");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_the_page_needs_the_login_is_checked_read_back_and_journaled_with_who() {
    let yaml = with_http("username: ops, password: \"${HOME}\", console: { write: true }");
    let h = start(&yaml).await;
    let addr = h.gateway.http_addr().expect("the listener is up");
    let login = format!("ops:{}", std::env::var("HOME").expect("HOME is set"));
    let write = "/console/api/device/pump/write";
    let (anonymous, refused, done, page) = tokio::task::spawn_blocking(move || {
        let anonymous = http(addr, "POST", write, None, r#"{"path":"deviceAttrib.setpoint","value":60}"#).0;
        let refused = http(addr, "POST", write, Some(&login), r#"{"path":"deviceAttrib.setpoint","value":95}"#);
        let done = http(addr, "POST", write, Some(&login), r#"{"path":"deviceAttrib.setpoint","value":60}"#);
        let page = http(addr, "GET", "/console/api/device/pump", Some(&login), "");
        (anonymous, refused, done, page)
    })
    .await
    .expect("join");
    assert_eq!(anonymous, 401);
    assert_eq!((refused.0, refused.1["status"].as_str()), (422, Some("rejected")), "{}", refused.1);
    assert!(refused.1["error"].as_str().is_some_and(|e| e.contains("80")), "{}", refused.1);
    assert_eq!((done.0, done.1["status"].as_str()), (200, Some("succeeded")), "{}", done.1);
    assert_eq!(done.1["values"]["deviceAttrib"]["setpoint"], json!(60.0), "read back: {}", done.1);
    assert_eq!(h.sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(60.0)));
    let commands = &page.1["commands"];
    assert_eq!((commands[0]["source"].as_str(), commands[0]["by"].as_str(), commands[0]["outcome"].as_str()), (Some("console"), Some("ops"), Some("succeeded")), "{commands}");
    assert_eq!(commands[1]["outcome"], "rejected");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_is_refused_when_the_console_is_read_only() {
    let h = start(&with_http("console: true")).await;
    let addr = h.gateway.http_addr().expect("the listener is up");
    let (status, answer) = tokio::task::spawn_blocking(move || http(addr, "POST", "/console/api/device/pump/write", None, r#"{"path":"deviceAttrib.setpoint","value":60}"#)).await.expect("join");
    assert_eq!((status, answer["status"].as_str()), (403, Some("rejected")));
    assert!(h.sim.writes().is_empty(), "nothing written");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_devices_on_the_open_overview() {
    let (mqtt, modbus, dead, listen) = (free_port(), free_port(), free_port(), free_port());
    let base = (pump_config("") + &format!("http: {{ listen: \"127.0.0.1:{listen}\", console: true }}\n"))
        .replace("{MQTT}", &mqtt.to_string())
        .replace("{MODBUS}", &modbus.to_string())
        + &format!("state_dir: {}\n", support::fresh_state_dir(mqtt).display());
    // A second pump, on a line where nothing answers.
    let two = base
        .replace("\nbuses:\n", &format!("\nbuses:\n  line2: {{ tcp: {{ host: 127.0.0.1, port: {dead} }}, timeout: 200ms }}\n"))
        .replace("\nsimulators:", "\n  pump2: { bus: line2, unit: 2, profile: pump, poll: 200ms }\nsimulators:");
    let parse = |yaml: &str| Config::parse(yaml, Path::new("test.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let mut gateway = twinbus::gateway::Gateway::start(&parse(&base)).await.expect("gateway starts");
    let addr = gateway.http_addr().expect("the listener is up");
    let mut overview = tokio::task::spawn_blocking(move || {
        let mut o = Events::open(addr, "/console/events");
        o.until("the pump alone", |o| device(o, "pump").is_some() && device(o, "pump2").is_none());
        o
    })
    .await
    .expect("join");
    gateway.reload(parse(&two)).await.expect("reloadable");
    let mut overview = tokio::task::spawn_blocking(move || {
        overview.until("pump2 offline", |o| device(o, "pump2").is_some_and(|d| d["state"] == "offline" && d["bus"] == "line2"));
        overview
    })
    .await
    .expect("join");
    let (status, _) = tokio::task::spawn_blocking(move || http_get(addr, "/console/api/device/pump2", None)).await.expect("join");
    assert_eq!(status, 200);
    gateway.reload(parse(&base)).await.expect("reloadable");
    tokio::task::spawn_blocking(move || overview.until("pump2 gone", |o| device(o, "pump2").is_none() && device(o, "pump").is_some())).await.expect("join");
    let (status, _) = tokio::task::spawn_blocking(move || http_get(addr, "/console/api/device/pump2", None)).await.expect("join");
    assert_eq!(status, 404);
    gateway.shutdown().await;
}
