//! Reloading the configuration while the gateway runs: devices added,
//! removed and changed take effect; unchanged devices and the connection
//! run on untouched; an invalid file or a change that needs a restart
//! changes nothing. First against the library, then through the binary and
//! SIGHUP as an operator does it.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use support::{free_port, fresh_state_dir, Cloud, PUMP_PROFILE};
use tokio_util::sync::CancellationToken;
use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::point::Value;
use twinbus::sim::SimHandle;

const WAIT: Duration = Duration::from_secs(10);

/// A line with four pumps (units 1-4) on a simulator the test runs itself,
/// so that a config may name any of them without starting a simulator.
struct Line {
    mqtt: u16,
    modbus: u16,
    state: PathBuf,
    sim: SimHandle,
    _stop: tokio_util::sync::DropGuard,
}

impl Line {
    async fn new(tag: &str) -> Line {
        let (mqtt, modbus) = (free_port(), free_port());
        let state = fresh_state_dir(format!("reload-{tag}"));
        let field = format!(
            "connections:\n  local: {{ embedded: {{ listen: \"127.0.0.1:{mqtt}\" }} }}\nbuses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }} }}\n{PUMP_PROFILE}devices:\n{}simulators:\n  sim: {{ listen: \"127.0.0.1:{modbus}\", serves: [pump1, pump2, pump3, pump4] }}\nstate_dir: {}\n",
            (1..=4).map(|u| format!("  pump{u}: {{ bus: line, unit: {u}, profile: pump }}\n")).collect::<String>(),
            state.display()
        );
        let config = Config::parse(&field, Path::new("field.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let stop = CancellationToken::new();
        let sim = twinbus::sim::start(&config.simulators[0], stop.clone()).await.expect("simulator");
        Line { mqtt, modbus, state, sim, _stop: stop.drop_guard() }
    }

    /// A gateway config with these pumps (unit = the number), each with a
    /// raw twin on `site/pumpN/{cmd,rsp}`; `poll` per pump.
    fn yaml(&self, pumps: &[(u8, &str)]) -> String {
        let devices: String = pumps
            .iter()
            .map(|(u, poll)| format!("  pump{u}:\n    bus: line\n    unit: {u}\n    profile: pump\n    poll: {poll}\n    twin: {{ connection: local, commands: site/pump{u}/cmd, responses: site/pump{u}/rsp }}\n"))
            .collect();
        format!(
            "connections:\n  local: {{ embedded: {{ listen: \"127.0.0.1:{}\" }} }}\nbuses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: {} }}, timeout: 300ms }}\n{PUMP_PROFILE}devices:\n{devices}state_dir: {}\n",
            self.mqtt,
            self.modbus,
            self.state.display()
        )
    }

    fn config(&self, pumps: &[(u8, &str)]) -> Config {
        Config::parse(&self.yaml(pumps), Path::new("gateway.yaml")).unwrap_or_else(|e| panic!("{e}"))
    }
}

async fn command(cloud: &mut Cloud, pump: u8, cmd: serde_json::Value) -> serde_json::Value {
    let id = cmd["id"].clone();
    cloud.publish(&format!("site/pump{pump}/cmd"), cmd.to_string()).await;
    cloud.wait_for(&format!("site/pump{pump}/rsp"), WAIT, |m| m["id"] == id).await
}

fn topics() -> Vec<String> {
    (1..=4).map(|u| format!("site/pump{u}/rsp")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_starts_added_stops_removed_restarts_changed_and_leaves_the_rest_running() {
    let line = Line::new("apply").await;
    let mut gw = Gateway::start(&line.config(&[(1, "200ms"), (2, "200ms"), (4, "200ms")])).await.expect("start");
    assert!(gw.wait_ready(WAIT).await);
    let rsp = topics();
    let mut cloud = Cloud::connect(line.mqtt, &rsp.iter().map(String::as_str).collect::<Vec<_>>()).await;
    assert_eq!(command(&mut cloud, 4, json!({"id": "before", "get": "*"})).await["status"], "succeeded");

    let mut kept = gw.device("pump1").expect("pump1").watch();
    let mut changed = gw.device("pump2").expect("pump2").watch();
    let mut removed = gw.device("pump4").expect("pump4").watch();
    let mut link = gw.connection("local").expect("connection").connected();
    assert!(*link.borrow_and_update());

    // pump2 polls at another rate, pump3 arrives, pump4 leaves.
    let done = gw.reload(line.config(&[(1, "200ms"), (2, "300ms"), (3, "200ms")])).await.expect("reloadable");
    // Stopping a device on purpose is not a failure (one would stop the gateway).
    assert_eq!(gw.failure(), None);
    assert_eq!(done.plan.add_devices, vec!["pump3"]);
    assert_eq!(done.plan.remove_devices, vec!["pump4"]);
    assert_eq!(done.plan.restart_devices, vec![("pump2".to_string(), "poll".to_string())]);
    assert_eq!(done.plan.unchanged, 1);
    assert!(done.slow.is_empty(), "{:?}", done.slow);

    // The unchanged device's actor runs on: its snapshots keep coming.
    for _ in 0..2 {
        tokio::time::timeout(WAIT, kept.changed()).await.expect("pump1 keeps polling").expect("pump1's actor is the same one");
    }
    // The removed and the restarted device's old actors are gone.
    for (name, old) in [("pump2", &mut changed), ("pump4", &mut removed)] {
        let ended = tokio::time::timeout(WAIT, async {
            while old.changed().await.is_ok() {}
        })
        .await;
        assert!(ended.is_ok(), "{name}'s old actor stopped");
    }
    assert!(gw.device("pump4").is_none());
    // The connection was never dropped.
    assert!(!link.has_changed().unwrap_or(true), "the MQTT connection stayed up through the reload");

    // The added device answers, through the same gateway session; the
    // restarted one too. (The cloud connects again: the embedded broker
    // refused its subscription to pump3's answers before pump3 existed.)
    drop(cloud);
    let mut cloud = Cloud::connect(line.mqtt, &rsp.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let answer = command(&mut cloud, 3, json!({"id": "new", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(line.sim.value(3, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));
    let answer = command(&mut cloud, 2, json!({"id": "changed", "set": {"deviceAttrib": {"mode": "manual"}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");

    // The removed device's topic is no longer served: a command to it
    // writes nothing (pump1's answer, sent after it, shows it had its chance).
    let writes_before = line.sim.writes().len();
    cloud.publish("site/pump4/cmd", json!({"id": "gone", "set": {"deviceAttrib": {"motorStatus": "on"}}}).to_string()).await;
    let answer = command(&mut cloud, 1, json!({"id": "after", "set": {"deviceAttrib": {"mode": "manual"}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    let writes = line.sim.writes();
    assert_eq!(writes.len(), writes_before + 1, "only pump1 was written: {writes:?}");
    assert_eq!(writes[writes_before].unit, 1);
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_needs_a_restart_is_refused_whole_and_nothing_changes() {
    let line = Line::new("refused").await;
    let mut gw = Gateway::start(&line.config(&[(1, "200ms")])).await.expect("start");
    assert!(gw.wait_ready(WAIT).await);
    let mut cloud = Cloud::connect(line.mqtt, &["site/pump1/rsp", "site/pump2/rsp"]).await;

    // A new device and a changed connection: the device is not started either.
    let mut new = line.config(&[(1, "200ms"), (2, "200ms")]);
    new.connections[0].keep_alive += Duration::from_secs(1);
    let refused = gw.reload(new).await.expect_err("a connection change needs a restart");
    assert_eq!(refused, vec!["connection `local` changed".to_string()]);
    assert!(gw.device("pump2").is_none());
    assert_eq!(command(&mut cloud, 1, json!({"id": "still", "get": "*"})).await["status"], "succeeded");

    // The same file again changes nothing, and says so.
    let done = gw.reload(line.config(&[(1, "200ms")])).await.expect("reloadable");
    assert_eq!(gw.failure(), None);
    assert!(done.plan.is_empty());
    assert_eq!(done.plan.unchanged, 1);
    assert!(gw.shutdown().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_sent_while_a_device_restarts_get_exactly_one_answer() {
    let line = Line::new("inflight").await;
    let mut gw = Gateway::start(&line.config(&[(1, "200ms")])).await.expect("start");
    assert!(gw.wait_ready(WAIT).await);
    let mut cloud = Cloud::connect(line.mqtt, &["site/pump1/rsp"]).await;

    let ids: Vec<String> = (0..20).map(|i| format!("c{i}")).collect();
    for id in &ids[..10] {
        cloud.publish("site/pump1/cmd", json!({"id": id, "get": "*"}).to_string()).await;
    }
    gw.reload(line.config(&[(1, "250ms")])).await.expect("reloadable");
    assert_eq!(gw.failure(), None);
    for id in &ids[10..] {
        cloud.publish("site/pump1/cmd", json!({"id": id, "get": "*"}).to_string()).await;
    }
    let mut answered = std::collections::BTreeMap::new();
    while answered.len() < ids.len() {
        let m = cloud.next_on("site/pump1/rsp", WAIT).await;
        let id = m["id"].as_str().expect("an id").to_string();
        assert!(answered.insert(id.clone(), m.clone()).is_none(), "{id} answered twice");
        // Either it ran, or it was refused saying why; never silence.
        let ok = m["status"] == "succeeded" || (m["status"] == "rejected" && m["error"].as_str().is_some_and(|r| r.contains("reload")));
        assert!(ok, "{m}");
    }
    for id in &ids[10..] {
        assert_eq!(answered[id]["status"], "succeeded", "sent after the reload: {}", answered[id]);
    }
    assert!(gw.shutdown().await);
}

// Through the binary: what `systemctl reload` does.

struct Running {
    child: std::process::Child,
    log: PathBuf,
}

impl Running {
    fn start(config: &Path, log: PathBuf) -> Running {
        let file = std::fs::File::create(&log).expect("log file");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_twinbus"))
            .args(["run", "-c"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("twinbus runs");
        Running { child, log }
    }

    fn hangup(&self) {
        signal(self.child.id(), "-HUP");
    }

    /// Waits for `count` log lines containing `needle`; returns the log.
    async fn wait_log(&self, needle: &str, count: usize) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.matches(needle).count() >= count {
                return log;
            }
            assert!(tokio::time::Instant::now() < deadline, "no `{needle}` (x{count}) in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_an_invalid_one_keeps_the_running_config() {
    let line = Line::new("sighup").await;
    let dir = fresh_state_dir("reload-sighup-files");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("gateway.yaml");
    std::fs::write(&file, line.yaml(&[(1, "200ms")])).expect("config");
    let mut gw = Running::start(&file, dir.join("twinbus.log"));
    gw.wait_log("twinbus running", 1).await;
    let mut cloud = Cloud::connect(line.mqtt, &["site/pump1/rsp", "site/pump2/rsp"]).await;

    // An edit with a mistake: every problem logged, the old config runs on.
    let broken = line.yaml(&[(1, "200ms"), (2, "200ms")]).replace("unit: 2", "unit: 300");
    std::fs::write(&file, broken).expect("config");
    gw.hangup();
    let log = gw.wait_log("reload refused, the running configuration stays", 1).await;
    assert!(log.contains("unit"), "the log names the problem:\n{log}");
    assert_eq!(command(&mut cloud, 1, json!({"id": "a", "get": "*"})).await["status"], "succeeded");

    // Fixed: the new device comes up on the running gateway.
    std::fs::write(&file, line.yaml(&[(1, "200ms"), (2, "200ms")])).expect("config");
    gw.hangup();
    gw.wait_log("config reloaded", 1).await;
    drop(cloud);
    let mut cloud = Cloud::connect(line.mqtt, &["site/pump1/rsp", "site/pump2/rsp"]).await;
    let answer = command(&mut cloud, 2, json!({"id": "b", "set": {"deviceAttrib": {"motorStatus": "on"}}})).await;
    assert_eq!(answer["status"], "succeeded", "{answer}");
    assert_eq!(line.sim.value(2, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));

    // A changed device restarts alone; its old tasks ending is no failure
    // (a failure would stop the process, with exit status 2).
    std::fs::write(&file, line.yaml(&[(1, "300ms"), (2, "200ms")])).expect("config");
    gw.hangup();
    let log = gw.wait_log("config reloaded", 2).await;
    assert!(!log.contains("ended unexpectedly"), "{log}");
    assert_eq!(command(&mut cloud, 1, json!({"id": "c", "get": "*"})).await["status"], "succeeded");

    signal(gw.child.id(), "-TERM");
    let status = tokio::task::block_in_place(|| gw.child.wait()).expect("wait");
    assert_eq!(status.code(), Some(0));
}
