//! End to end: a write whose reply is lost is read back before anything is
//! sent again, and a trigger point is never sent twice. The simulator can
//! carry out a request and drop its reply, and records every write it
//! receives, so each test counts what reached the device.

mod support;

use serde_json::json;
use support::{start, Cloud, Harness};
use twinbus::point::Table;

/// A pump with a setpoint, a trigger (`reset`) and a plain register
/// (`speed`). The simulator makes `reset` and `speed` read back 0 whatever
/// is written (they follow `zero`), like a pulse register that the device
/// clears as soon as it has acted. Polls are an hour apart: after the first
/// one, every request is a command's.
const CONFIG: &str = r#"
connections:
  local: { embedded: { listen: "127.0.0.1:{MQTT}" } }
buses:
  line: { tcp: { host: 127.0.0.1, port: {MODBUS} }, timeout: 300ms, retries: 1 }
profiles:
  pump:
    points:
      deviceAttrib.setpoint: { holding: 10, type: f32, min: 0, max: 80 }
      deviceAttrib.reset:    { holding: 20, trigger: true }
      deviceAttrib.speed:    { holding: 21 }
      deviceData.zero:       { input: 5 }
devices:
  pump:
    bus: line
    unit: 1
    profile: pump
    poll: 1h
    twin: { connection: local, commands: site/pump/cmd, responses: site/pump/rsp }
simulators:
  sim:
    listen: "127.0.0.1:{MODBUS}"
    serves: [pump]
    mirror: { deviceAttrib.reset: deviceData.zero, deviceAttrib.speed: deviceData.zero }
"#;

/// The gateway, once a `get` found the device online (an online device
/// gets its retries).
async fn online() -> (Harness, Cloud) {
    let h = start(CONFIG).await;
    let mut cloud = Cloud::connect(h.mqtt_port, &["site/pump/rsp"]).await;
    let answer = cloud.command(&json!({"id": "hello", "get": "*"})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    (h, cloud)
}

/// Writes the simulator received at holding register `address`.
fn writes_at(h: &Harness, address: u16) -> usize {
    h.sim.writes().iter().filter(|w| w.table == Table::HoldingRegister && w.address == address).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_reply_was_lost_but_which_landed_is_not_sent_again() {
    let (h, mut cloud) = online().await;
    h.sim.drop_replies(1, 1);

    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"setpoint": 55}}})).await;

    assert_eq!(answer["status"], "succeeded", "the read-back shows it landed: {answer}");
    assert_eq!(answer["values"]["deviceAttrib"]["setpoint"], 55.0);
    assert_eq!(writes_at(&h, 10), 1, "written once: {:?}", h.sim.writes());
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_point_is_written_once_even_when_its_reply_is_lost() {
    let (h, mut cloud) = online().await;
    h.sim.drop_replies(1, 1);

    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"reset": 1}}})).await;

    // The device took it and cleared it at once: the read-back cannot tell
    // "acted on" from "never arrived", so a trigger is not sent again and
    // the answer says what the device shows.
    assert_eq!(writes_at(&h, 20), 1, "a trigger is never sent twice: {:?}", h.sim.writes());
    assert_eq!(answer["status"], "failed", "{answer}");
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("trigger") && e.contains("no answer")), "{answer}");
    assert_eq!(answer["values"]["deviceAttrib"]["reset"], 0, "what the read-back shows: {answer}");
    h.gateway.shutdown().await;
}

/// The same lost reply on a plain register that reads back otherwise: it is
/// sent again (once, `retries: 1`). What `trigger: true` prevents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_write_that_does_not_read_back_is_sent_again_once() {
    let (h, mut cloud) = online().await;
    h.sim.drop_replies(1, 1);

    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"speed": 7}}})).await;

    assert_eq!(writes_at(&h, 21), 2, "verified, then sent again: {:?}", h.sim.writes());
    assert_eq!(answer["values"]["deviceAttrib"]["speed"], 0, "the answer reports what the device holds: {answer}");
    h.gateway.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_is_never_merged_with_its_neighbours() {
    let (h, mut cloud) = online().await;

    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"reset": 1, "speed": 3}}})).await;

    assert_eq!(answer["status"], "succeeded", "{answer}");
    let addresses: Vec<(u16, usize)> = h.sim.writes().iter().map(|w| (w.address, w.values.len())).collect();
    assert_eq!(addresses, vec![(20, 1), (21, 1)], "two requests for two contiguous registers");
    h.gateway.shutdown().await;
}

/// A device that stopped answering costs a write and a verify read the
/// first time (it might have been a lost reply); once it is known offline,
/// a write costs one request and one timeout, with no read-back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_a_device_known_offline_costs_one_request() {
    let (h, mut cloud) = online().await;
    h.sim.set_silent(1, true);

    let before = h.sim.requests();
    let answer = cloud.command(&json!({"id": "1", "set": {"deviceAttrib": {"setpoint": 20}}})).await;
    assert_eq!(answer["status"], "failed", "{answer}");
    assert!(answer["error"].as_str().is_some_and(|e| e.contains("unknown")), "whether it landed is unknown: {answer}");
    assert_eq!(h.sim.requests() - before, 2, "the write and one verify read");

    let before = h.sim.requests();
    let answer = cloud.command(&json!({"id": "2", "set": {"deviceAttrib": {"setpoint": 30}}})).await;
    assert_eq!(answer["status"], "failed", "{answer}");
    assert_eq!(h.sim.requests() - before, 1, "one write, nothing more");
    h.gateway.shutdown().await;
}

/// Tools outside the device actors (commissioning) use one-off calls: a
/// read is asked again after silence, a write is sent once whatever the
/// retries, since nothing there reads it back first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_call_asks_a_read_again_but_sends_a_write_once() {
    use twinbus::modbus::{spawn_bus, BusError, Op, Priority, Reply};

    let h = start(CONFIG).await;
    let config = twinbus::config::Config::parse(
        &CONFIG.replace("{MQTT}", "1883").replace("{MODBUS}", &h.sim.addr.port().to_string()),
        std::path::Path::new("test.yaml"),
    )
    .expect("valid");
    let (tasks, _failures) = twinbus::lifecycle::Tasks::new();
    let bus = spawn_bus(config.buses[0].clone(), &tasks);

    let read = bus.call(Priority::Command, 1, Op::ReadHoldingRegisters(20, 2), 2).await;
    assert_eq!(read, Ok(Reply::Words(vec![0, 0])));

    h.sim.set_silent(1, true);
    let before = h.sim.requests();
    let write = bus.call(Priority::Command, 1, Op::WriteRegisters(20, vec![1]), 2).await;
    assert!(matches!(write, Err(BusError::Timeout(_))), "{write:?}");
    assert_eq!(h.sim.requests() - before, 1, "a write is sent once");
    let before = h.sim.requests();
    let read = bus.call(Priority::Poll, 1, Op::ReadHoldingRegisters(20, 1), 2).await;
    assert!(matches!(read, Err(BusError::Timeout(_))), "{read:?}");
    assert_eq!(h.sim.requests() - before, 3, "a read is asked again twice");
    tasks.stopping();
    drop(bus);
    h.gateway.shutdown().await;
}
