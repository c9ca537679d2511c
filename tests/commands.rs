//! End to end: a raw command in over MQTT, registers on the simulated device,
//! the answer out with the values read back.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{pump_config, start, Cloud};
use twinbus::point::{Table, Value};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_writes_the_coil_and_answers_with_the_value_read_back() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;

    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["id"], "1");
    assert_eq!(answer["values"]["deviceAttrib"]["motorStatus"], "on");
    assert!(answer["time"].as_u64().is_some_and(|t| t > 1_600_000_000_000), "time is epoch ms: {answer}");
    assert_eq!(h.sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));
    let writes = h.sim.writes();
    assert_eq!(writes.len(), 1, "exactly one write: {writes:?}");
    assert_eq!((writes[0].table, writes[0].address, writes[0].values.clone()), (Table::Coil, 0, vec![1]));
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_reports_what_the_device_holds_not_what_was_asked() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    let answer = cloud.command(&json!({"id": 7, "set": {"deviceAttrib": {"setpoint": 33.3, "mode": "manual"}}})).await;

    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(answer["id"], 7, "numeric ids are echoed as sent");
    // Read back from the device: the f32 it holds, as its shortest decimal.
    let held = answer["values"]["deviceAttrib"]["setpoint"].as_f64().expect("setpoint read back");
    assert_eq!(held as f32, 33.3f32);
    assert_eq!(h.sim.value(1, "deviceAttrib.setpoint"), Some(Value::Float(held)));
    assert_eq!(answer["values"]["deviceAttrib"]["mode"], "manual");
    // setpoint (10-11) and mode (12) are contiguous: one request.
    let writes = h.sim.writes();
    assert_eq!(writes.len(), 1, "{writes:?}");
    assert_eq!((writes[0].address, writes[0].values.len()), (10, 3));
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_reads_points_from_the_device() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    h.sim.set_value(1, "deviceData.temperature", &Value::Float(23.4)).expect("sim accepts the value");

    let all = cloud.command(&json!({"id": "g1", "get": "*"})).await;
    assert_eq!(all["status"], "succeeded", "{all}");
    assert_eq!(all["values"]["deviceData"]["temperature"], 23.4);
    assert_eq!(all["values"]["deviceAttrib"]["setpoint"], 40.0);
    assert_eq!(all["values"]["deviceAttrib"]["motorStatus"], "off");

    let one = cloud.command(&json!({"id": "g2", "get": ["deviceAttrib.motorStatus"]})).await;
    assert_eq!(one["values"], json!({"deviceAttrib": {"motorStatus": "off"}}));
    assert!(h.sim.writes().is_empty(), "a get writes nothing");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_command_is_answered_and_writes_nothing() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    // Commands with an id: rejected, with a reason per field where there is one.
    let with_id = [
        (json!({"id": "u", "set": {"deviceAttrib": {"nope": 1}}}), Some("deviceAttrib.nope")),
        (json!({"id": "r", "set": {"deviceAttrib": {"setpoint": 500}}}), Some("deviceAttrib.setpoint")),
        (json!({"id": "ro", "set": {"deviceData": {"temperature": 20}}}), Some("deviceData.temperature")),
        (json!({"id": "t", "set": {"deviceAttrib": {"motorStatus": 1}}}), Some("deviceAttrib.motorStatus")),
        (json!({"id": "l", "set": {"deviceAttrib": {"motorStatus": "maybe"}}}), Some("deviceAttrib.motorStatus")),
        // One valid and one invalid value: the valid one is not written either.
        (json!({"id": "mix", "set": {"deviceAttrib": {"motorStatus": "on", "setpoint": -1}}}), Some("deviceAttrib.setpoint")),
        (json!({"id": "f", "sett": {}}), None),
        (json!({"id": "s", "shutdown": true}), None),
    ];
    for (cmd, field) in &with_id {
        let answer = cloud.command(cmd).await;
        assert_eq!(answer["status"], "rejected", "{cmd} → {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()), "{answer}");
        if let Some(field) = field {
            assert!(answer["errors"][field].is_string(), "reason for {field}: {answer}");
        }
    }

    // Payloads with no usable id: each gets one rejection, in order.
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let big = format!(r#"{{"id":"big","set":{{"x":"{}"}}}}"#, "a".repeat(300 * 1024));
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "JSON"),
        (vec![0xff, 0xfe, 0x00, 0x01], "binary"),
        (Vec::new(), "empty"),
        (deep.into_bytes(), "JSON"),
        (big.into_bytes(), "limit"),
        (b"[1,2]".to_vec(), "object"),
    ];
    for (payload, reason) in bad {
        cloud.publish("site/pump/cmd", payload).await;
        let answer = cloud.next_on("site/pump/rsp", WAIT).await;
        assert_eq!(answer["status"], "rejected", "{answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "expected {reason:?} in {error:?}");
    }

    assert!(h.sim.writes().is_empty(), "nothing was written: {:?}", h.sim.writes());
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_is_answered_again_but_executed_once() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let cmd = json!({"id": "once", "set": {"deviceAttrib": {"motorStatus": "on"}}});

    let first = cloud.command(&cmd).await;
    let second = cloud.command(&cmd).await;

    assert_eq!(first["status"], "succeeded");
    assert_eq!(first, second, "the duplicate gets the first answer");
    assert_eq!(h.sim.writes().len(), 1, "written once: {:?}", h.sim.writes());
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledge_comes_first_when_the_twin_asks_for_it() {
    let h = start(&pump_config("      acknowledge: true")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    cloud.publish("site/pump/cmd", json!({"id": "a", "get": "*"}).to_string()).await;
    let first = cloud.next_on("site/pump/rsp", WAIT).await;
    let second = cloud.next_on("site/pump/rsp", WAIT).await;

    assert_eq!((first["status"].as_str(), first["id"].as_str()), (Some("acknowledged"), Some("a")), "{first}");
    assert!(first["time"].is_u64());
    assert_eq!(second["status"], "succeeded");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_shutdown_is_answered_then_stops_the_gateway_when_allowed() {
    let h = start(&pump_config("      allow_shutdown: true")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let stop = h.gateway.remote_shutdown();

    let answer = cloud.command(&json!({"id": "bye", "shutdown": true})).await;

    assert_eq!(answer["status"], "succeeded", "{answer}");
    tokio::time::timeout(WAIT, stop.cancelled()).await.expect("the gateway is told to stop");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_written_in_the_order_the_command_gives_them() {
    let h = start(&pump_config("")).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;

    // The setpoint first, then the motor: never the other way round.
    let payload = r#"{"id":"o1","set":{"deviceAttrib":{"setpoint":12.5,"motorStatus":"on"}}}"#;
    cloud.publish("site/pump/cmd", payload).await;
    let answer = cloud.wait_for("site/pump/rsp", WAIT, |m| m["id"] == "o1").await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    let tables: Vec<Table> = h.sim.writes().iter().map(|w| w.table).collect();
    assert_eq!(tables, vec![Table::HoldingRegister, Table::Coil]);

    let payload = r#"{"id":"o2","set":{"deviceAttrib":{"motorStatus":"off","setpoint":0}}}"#;
    cloud.publish("site/pump/cmd", payload).await;
    cloud.wait_for("site/pump/rsp", WAIT, |m| m["id"] == "o2").await;
    let tables: Vec<Table> = h.sim.writes().iter().skip(2).map(|w| w.table).collect();
    assert_eq!(tables, vec![Table::Coil, Table::HoldingRegister]);
    h.gateway.shutdown().await;
}

/// A flood of commands for a device that cannot keep up: every command is
/// answered exactly once, those beyond the device's queue at once with a
/// `busy` refusal, none silently dropped. A repeated id is never `busy`: it
/// gets the first one's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_commands_is_answered_in_full_busy_ones_refused() {
    // Every command costs one 50 ms timeout on the silent device.
    let yaml = pump_config("").replace("timeout: 300ms, retries: 1", "timeout: 50ms, retries: 0");
    let h = start(&yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    h.sim.set_silent(1, true);

    const SENT: usize = 120;
    let cmd = |id: &str| json!({"id": id, "set": {"deviceAttrib": {"motorStatus": "on"}}}).to_string();
    for n in 0..SENT {
        cloud.publish("site/pump/cmd", cmd(&format!("f{n}"))).await;
    }
    // The queue is full now: repeats of the first command.
    cloud.publish("site/pump/cmd", cmd("f0")).await;
    cloud.publish("site/pump/cmd", cmd("f1")).await;
    let mut answers: std::collections::BTreeMap<String, Vec<serde_json::Value>> = std::collections::BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answers.len() < SENT && tokio::time::Instant::now() < deadline {
        let Some(a) = cloud.try_next_on("site/pump/rsp", Duration::from_secs(2)).await else { continue };
        answers.entry(a["id"].as_str().unwrap_or("?").to_string()).or_default().push(a);
    }
    while let Some(a) = cloud.try_next_on("site/pump/rsp", Duration::from_millis(500)).await {
        answers.entry(a["id"].as_str().unwrap_or("?").to_string()).or_default().push(a);
    }
    assert_eq!(answers.len(), SENT, "every command answered: {} of {SENT}", answers.len());
    for (id, list) in &answers {
        let repeated = id == "f0" || id == "f1";
        assert!(list.len() == 1 || (repeated && list.len() == 2), "{id} answered {} times: {list:?}", list.len());
        assert!(list.iter().all(|a| *a == list[0]), "a repeat gets the first answer: {list:?}");
    }
    let is_busy = |a: &serde_json::Value| a["error"].as_str().is_some_and(|e| e.starts_with("busy"));
    assert!(!answers["f0"].iter().any(is_busy) && !answers["f1"].iter().any(is_busy), "a repeated id is not busy: {:?} {:?}", answers["f0"], answers["f1"]);
    let firsts: Vec<_> = answers.values().map(|l| &l[0]).collect();
    let busy: Vec<_> = firsts.iter().filter(|a| is_busy(a)).collect();
    assert!(!busy.is_empty(), "a device that cannot keep up refuses some: {answers:?}");
    assert!(busy.iter().all(|a| a["status"] == "rejected"), "{busy:?}");
    let tried: Vec<_> = firsts.iter().filter(|a| !is_busy(a)).collect();
    assert!(tried.len() >= 32, "a full queue was worked through: {} tried", tried.len());
    assert!(tried.iter().all(|a| a["status"] == "failed"), "the silent device gave no answer: {tried:?}");

    // The device comes back: the next command is executed, nothing is stuck.
    h.sim.set_silent(1, false);
    let answer = cloud.command(&json!({"id": "after", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(h.sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));
    h.gateway.shutdown().await;
}

/// A bit of a holding register: with `mask_write`, one function 22 request
/// that changes only that bit in the device; without it, read the register
/// and write it back (function 6). Either way the other bits keep their value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_register_bit_is_written_with_a_mask_write_when_the_device_supports_it() {
    let yaml = r#"
connections:
  local: { embedded: { listen: "127.0.0.1:{MQTT}" } }
buses:
  line: { tcp: { host: 127.0.0.1, port: {MODBUS} }, timeout: 300ms }
profiles:
  panel:
    points:
      deviceAttrib.lamp: { holding: 30, bit: 3 }
      deviceData.word: { holding: 30, access: read }
devices:
  masked:
    bus: line
    unit: 1
    profile: panel
    mask_write: true
    twin: { connection: local, commands: site/masked/cmd, responses: site/masked/rsp }
  plain:
    bus: line
    unit: 2
    profile: panel
    twin: { connection: local, commands: site/plain/cmd, responses: site/plain/rsp }
simulators:
  sim: { listen: "127.0.0.1:{MODBUS}", serves: [masked, plain], initial: { deviceData.word: 240 } }
"#;
    let h = start(yaml).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/masked/rsp", "site/plain/rsp"]).await;

    for (name, unit, function) in [("masked", 1, 22), ("plain", 2, 6)] {
        let cmd = json!({"id": name, "set": {"deviceAttrib": {"lamp": true}}});
        cloud.publish(&format!("site/{name}/cmd"), cmd.to_string()).await;
        let answer = cloud.wait_for(&format!("site/{name}/rsp"), WAIT, |m| m["id"] == name).await;
        assert_eq!(answer["status"], "succeeded", "{answer}");
        assert_eq!(answer["values"]["deviceAttrib"]["lamp"], true, "{answer}");
        let writes: Vec<_> = h.sim.writes().into_iter().filter(|w| w.unit == unit).collect();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!((writes[0].function, writes[0].address, writes[0].values.clone()), (function, 30, vec![240 | 8]), "{name}");
        assert_eq!(h.sim.value(unit, "deviceData.word"), Some(Value::Int(248)));
    }
    h.gateway.shutdown().await;
}
