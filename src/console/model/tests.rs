use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::json;

use super::*;
use crate::config::Config;
use crate::device::{Health, Snapshot};
use crate::journal::{Entry, Source};
use crate::point::Value;

const YAML: &str = r#"
connections:
  local: { embedded: { listen: "127.0.0.1:1883" } }
buses:
  line: { tcp: { host: 127.0.0.1, port: 5020 } }
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint:    { holding: 10, type: f32, min: 0, max: 80 }
      deviceAttrib.mode:        { holding: 12, values: { auto: 0, manual: 1 } }
      deviceData.flags:         { input: 5, bit: 3 }
      deviceData.name:          { input: 20, type: string, length: 4 }
      deviceData.temperature:   { input: 0, type: i16, scale: 0.1 }
devices:
  pump: { bus: line, unit: 1, profile: pump, poll: 1s }
"#;

/// The device's points, sorted by path.
const PATHS: [&str; 6] = ["deviceAttrib.mode", "deviceAttrib.motorStatus", "deviceAttrib.setpoint", "deviceData.flags", "deviceData.name", "deviceData.temperature"];
const TEMPERATURE: usize = 5;

fn info() -> DeviceInfo {
    let config = Config::parse(YAML, Path::new("console.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let d = &config.devices[0];
    let paths: Vec<&str> = d.points.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, PATHS);
    DeviceInfo { name: d.name.clone(), bus: "line".into(), unit: d.unit, poll: d.poll, points: Arc::clone(&d.points) }
}

fn model() -> Model {
    model_of(info())
}

fn model_of(info: DeviceInfo) -> Model {
    Model::new(vec![ConnectionInfo { name: "local".into(), broker: "embedded 127.0.0.1:1883".into() }], vec!["line".into()], vec![info])
}

fn at(secs: f64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_secs_f64(secs)
}

fn ms(secs: f64) -> u64 {
    crate::twin::epoch_ms(at(secs))
}

/// A poll's snapshot at `t` seconds; offline when `temperature` is `None`.
fn snap(t: f64, temperature: Option<f64>) -> Arc<Snapshot> {
    let values = match temperature {
        Some(x) => vec![
            Some(Value::Text("auto".into())),
            Some(Value::Text("on".into())),
            Some(Value::Float(40.0)),
            Some(Value::Bool(true)),
            Some(Value::Text("P-1".into())),
            Some(Value::Float(x)),
        ],
        None => vec![None; 6],
    };
    let health = if temperature.is_some() { Health::Online } else { Health::Offline("no answer from the device within 500ms".into()) };
    Arc::new(Snapshot { errors: vec![None; 6], values, health, at: at(t), seq: 0 })
}

fn device(m: &Model, history: bool) -> Json {
    m.device("pump", &[], false, history, at(1000.0)).unwrap_or_default()
}

fn point(doc: &Json, i: usize) -> &Json {
    &doc["points"][i]
}

#[test]
fn each_point_shows_its_value_type_location_and_the_registers_that_hold_it() {
    let mut m = model();
    m.on_snapshot("pump", snap(0.0, Some(21.5)));
    let doc = device(&m, false);
    let shown: Vec<(String, String, String, String)> = (0..6)
        .map(|i| {
            let p = point(&doc, i);
            let s = |k: &str| p[k].as_str().unwrap_or("-").to_string();
            (s("path"), s("text"), s("type"), format!("{} | {}", s("where"), s("raw")))
        })
        .collect();
    let expect = [
        ("deviceAttrib.mode", "auto", "u16", "holding 12 | 0000"),
        ("deviceAttrib.motorStatus", "on", "bool", "coil 0 | 1"),
        ("deviceAttrib.setpoint", "40", "f32", "holding 10–11 | 4220 0000"),
        ("deviceData.flags", "true", "bool", "input 5 bit 3 | bit 3 = 1"),
        ("deviceData.name", "P-1", "string", "input 20–21 | 502D 3100"),
        ("deviceData.temperature", "21.5", "i16 × 0.1", "input 0 | 00D7"),
    ];
    let expect: Vec<(String, String, String, String)> = expect.iter().map(|(a, b, c, d)| (a.to_string(), b.to_string(), c.to_string(), d.to_string())).collect();
    assert_eq!(shown, expect);
    assert_eq!(point(&doc, 0)["labels"], json!(["auto", "manual"]));
    assert_eq!(point(&doc, 2)["writable"], json!(true));
    assert_eq!((point(&doc, 2)["min"].as_str(), point(&doc, 2)["max"].as_str()), (Some("0"), Some("80")));
    assert_eq!(point(&doc, TEMPERATURE)["writable"], json!(false));
    assert_eq!(point(&doc, TEMPERATURE)["value"], json!(21.5));
    assert_eq!(doc["state"], "online");
}

#[test]
fn history_keeps_one_sample_a_second_for_five_minutes_at_most() {
    let mut m = model();
    // Polled every 200 ms for 10 minutes.
    for n in 0..3000 {
        let t = f64::from(n) * 0.2;
        m.on_snapshot("pump", snap(t, Some(20.0 + f64::from(n % 50) / 10.0)));
    }
    let doc = device(&m, true);
    let history = point(&doc, TEMPERATURE)["history"].as_array().cloned().unwrap_or_default();
    assert!(history.len() <= SAMPLES && history.len() >= SAMPLES - 1, "{} samples", history.len());
    let times: Vec<u64> = history.iter().filter_map(|s| s[0].as_u64()).collect();
    assert!(times.windows(2).all(|w| w[1] / 1000 > w[0] / 1000), "at most one sample a second of the clock");
    assert_eq!(times.last(), Some(&ms(599.8)), "the newest reading is the last sample");
    let kept = m.devices.get("pump").map(|d| d.points[TEMPERATURE].history.capacity());
    assert!(kept.is_some_and(|c| c <= SAMPLES), "memory for {kept:?} samples");
    assert!(times.first().is_some_and(|t| *t >= ms(599.8 - 300.0)), "nothing older than five minutes");
    assert_eq!(point(&doc, TEMPERATURE)["sample"], history.last().cloned().unwrap_or_default());
    // Labels and booleans are charted as numbers, text is not.
    assert_eq!(point(&doc, 0)["history"].as_array().map(Vec::len), Some(history.len()));
    assert_eq!(point(&doc, 4)["history"], json!([]));
    // Without `history`, only the last sample goes out.
    assert!(device(&m, false)["points"][TEMPERATURE].get("history").is_none());
}

#[test]
fn a_change_is_dated_by_the_poll_that_saw_it_and_the_first_reading_is_not_one() {
    let mut m = model();
    m.on_snapshot("pump", snap(0.0, Some(21.5)));
    assert_eq!(device(&m, false)["points"][TEMPERATURE]["changed"], Json::Null);
    m.on_snapshot("pump", snap(1.0, Some(21.5)));
    m.on_snapshot("pump", snap(2.0, Some(22.0)));
    m.on_snapshot("pump", snap(3.0, Some(22.0)));
    assert_eq!(device(&m, false)["points"][TEMPERATURE]["changed"], json!(ms(2.0)));
    // Offline and back with the same value: no change.
    m.on_snapshot("pump", snap(4.0, None));
    m.on_snapshot("pump", snap(5.0, Some(22.0)));
    assert_eq!(device(&m, false)["points"][TEMPERATURE]["changed"], json!(ms(2.0)));
}

#[test]
fn an_offline_device_shows_why_and_no_values() {
    let mut m = model();
    m.on_snapshot("pump", snap(0.0, Some(21.5)));
    m.on_snapshot("pump", snap(1.0, None));
    let doc = device(&m, true);
    assert_eq!((doc["state"].as_str(), doc["reason"].as_str()), (Some("offline"), Some("no answer from the device within 500ms")));
    assert!(doc["points"].as_array().is_some_and(|ps| ps.iter().all(|p| p["value"].is_null() && p["raw"].is_null())));
    assert_eq!(doc["points"][TEMPERATURE]["history"].as_array().map(Vec::len), Some(1), "no sample while offline");
    assert_eq!(m.overview(at(1.0))["devices"][0]["state"], "offline");
}

#[test]
fn the_poll_period_achieved_is_the_mean_of_the_last_intervals() {
    let mut m = model();
    assert_eq!(device(&m, false)["period_ms"], Json::Null);
    m.on_snapshot("pump", snap(0.0, Some(1.0)));
    assert_eq!(device(&m, false)["period_ms"], Json::Null);
    for n in 1..=30 {
        // Slower lately: 1 s, then 1.5 s for the last ten.
        let t = if n <= 20 { f64::from(n) } else { 20.0 + 1.5 * f64::from(n - 20) };
        m.on_snapshot("pump", snap(t, Some(1.0)));
    }
    let doc = device(&m, false);
    assert_eq!((doc["period_ms"].as_u64(), doc["poll_ms"].as_u64(), doc["last_poll"].as_u64()), (Some(1500), Some(1000), Some(ms(35.0))));
}

#[test]
fn bus_rates_come_from_two_looks_at_the_counters_not_too_far_apart() {
    let mut m = model();
    let text = |ok: u32, timeouts: u32| {
        format!(
            "twinbus_modbus_transactions_total{{bus=\"line\",outcome=\"ok\"}} {ok}\ntwinbus_modbus_transactions_total{{bus=\"line\",outcome=\"timeout\"}} {timeouts}\ntwinbus_mqtt_outbox_messages{{connection=\"local\"}} 3\n"
        )
    };
    let t0 = Instant::now();
    assert!(m.wants_metrics(t0));
    m.on_metrics(&text(100, 1), t0);
    assert!(!m.wants_metrics(t0 + Duration::from_millis(500)));
    let bus = |m: &Model| m.overview(at(0.0))["buses"][0].clone();
    assert_eq!(bus(&m)["per_second"], Json::Null, "one look gives no rate");
    m.on_metrics(&text(120, 3), t0 + Duration::from_secs(2));
    assert_eq!(bus(&m), json!({"name": "line", "per_second": 11.0, "transactions": 123.0, "timeouts": 3.0, "errors": 0.0}));
    assert_eq!(m.overview(at(0.0))["connections"][0]["outbox"], json!(3.0));
    m.on_metrics(&text(130, 3), t0 + Duration::from_secs(60));
    assert_eq!(bus(&m)["per_second"], Json::Null, "a minute-old look says nothing about now");
}

#[test]
fn the_overview_lists_connections_buses_and_devices() {
    let mut m = model();
    m.on_snapshot("pump", snap(0.0, Some(21.5)));
    m.on_connection(0, false, Some(("connection refused by 127.0.0.1:1883".into(), at(0.5))));
    let o = m.overview(at(1.0));
    assert_eq!(o["time"], json!(ms(1.0)));
    assert_eq!(o["connections"][0]["connected"], json!(false));
    assert_eq!(o["connections"][0]["last_error"], json!("connection refused by 127.0.0.1:1883"));
    assert_eq!(o["connections"][0]["last_error_at"], json!(ms(0.5)));
    assert_eq!(o["devices"][0]["name"], "pump");
    assert_eq!(o["devices"][0]["state"], "online");
    assert_eq!(o["devices"][0]["bus"], "line");
    assert_eq!(o["devices"][0]["unit"], 1);
    assert_eq!(o["devices"][0]["last_poll"], json!(ms(0.0)));
}

#[test]
fn the_device_page_lists_its_commands_as_the_journal_gives_them() {
    let m = model();
    let answer = json!({"status": "rejected", "error": "nothing was written: deviceAttrib.setpoint: 95 is above the maximum 80"});
    let e = Entry::from_answer(Source::Console, Some("console-1"), "set", &answer, Duration::from_millis(3)).by("ops");
    let doc = m.device("pump", &[e], true, false, at(0.0)).unwrap_or_default();
    let c = &doc["commands"][0];
    assert_eq!((c["source"].as_str(), c["by"].as_str(), c["id"].as_str(), c["outcome"].as_str(), c["ms"].as_u64()), (Some("console"), Some("ops"), Some("console-1"), Some("rejected"), Some(3)));
    assert_eq!(doc["write"], json!(true));
    assert!(m.device("nope", &[], false, false, at(0.0)).is_none());
}

#[test]
fn a_reload_adds_removes_and_restarts_devices_and_a_device_that_stays_keeps_its_history() {
    let pump = info();
    let mut m = model_of(pump.clone());
    m.on_snapshot("pump", snap(0.0, Some(21.5)));
    m.on_snapshot("pump", snap(2.0, Some(22.0)));
    let fan = DeviceInfo { name: "fan".into(), ..pump.clone() };
    m.sync(vec!["line".into()], vec![pump.clone(), fan.clone()]);
    let names = |m: &Model| m.overview(at(3.0))["devices"].as_array().map(|ds| ds.iter().map(|d| d["name"].to_string()).collect::<Vec<_>>().join(",")).unwrap_or_default();
    assert_eq!(names(&m), r#""fan","pump""#);
    assert_eq!(device(&m, true)["points"][TEMPERATURE]["history"].as_array().map(Vec::len), Some(2), "the pump stayed");
    assert_eq!(m.device("fan", &[], false, false, at(3.0)).map(|d| d["state"].clone()), Some(json!("unknown")));
    // Restarted: a new actor, so new points.
    let restarted = DeviceInfo { points: Arc::new(pump.points.to_vec()), ..pump };
    m.sync(vec!["line".into()], vec![restarted]);
    assert_eq!(names(&m), r#""pump""#);
    assert!(!m.has_device("fan"));
    assert_eq!(device(&m, true)["points"][TEMPERATURE]["history"], json!([]));
}
