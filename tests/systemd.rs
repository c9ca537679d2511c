//! `twinbus run` under systemd's notification protocol, played by this test:
//! the release of a real process, `NOTIFY_SOCKET` and `WATCHDOG_USEC` set as
//! systemd sets them for `Type=notify` with `WatchdogSec=`.
#![cfg(unix)]

mod support;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{free_port, fresh_state_dir};

/// The service manager's end of the notification socket.
struct Manager {
    socket: UnixDatagram,
    dir: PathBuf,
}

impl Manager {
    fn new(tag: &str) -> Manager {
        let dir = fresh_state_dir(format!("systemd-{tag}"));
        std::fs::create_dir_all(&dir).expect("test dir");
        let socket = UnixDatagram::bind(dir.join("notify")).expect("bind the notify socket");
        Manager { socket, dir }
    }

    /// Starts `twinbus run` on `yaml`, as systemd would.
    fn start(&self, yaml: &str, watchdog: Option<Duration>) -> Child {
        let config = self.dir.join("gateway.yaml");
        std::fs::write(&config, yaml).expect("write the config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinbus"));
        cmd.args(["run", "-c"]).arg(&config).env("NOTIFY_SOCKET", self.dir.join("notify")).env("RUST_LOG", "warn").stdout(Stdio::null());
        // Its log, for a failing test: target/tmp/state-PID-systemd-TAG/twinbus.log.
        cmd.stderr(std::fs::File::create(self.dir.join("twinbus.log")).expect("log file"));
        cmd.env_remove("WATCHDOG_PID").env_remove("WATCHDOG_USEC");
        if let Some(w) = watchdog {
            cmd.env("WATCHDOG_USEC", w.as_micros().to_string());
        }
        cmd.spawn().expect("start twinbus")
    }

    /// The notifications received within `wait`, each one datagram.
    fn receive_for(&self, wait: Duration) -> Vec<String> {
        let end = Instant::now() + wait;
        let mut got = Vec::new();
        while let Some(m) = self.next_before(end) {
            got.push(m);
        }
        got
    }

    /// Waits for a datagram containing `line`; returns everything seen until then.
    fn wait_for(&self, line: &str, wait: Duration) -> Vec<String> {
        let end = Instant::now() + wait;
        let mut got = Vec::new();
        while let Some(m) = self.next_before(end) {
            let done = m.lines().any(|l| l == line);
            got.push(m);
            if done {
                return got;
            }
        }
        panic!("no {line} within {wait:?}; got {got:?}");
    }

    fn next_before(&self, end: Instant) -> Option<String> {
        let left = end.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())?;
        self.socket.set_read_timeout(Some(left)).expect("timeout");
        let mut buf = [0u8; 4096];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }
}

/// A gateway whose broker and device are both unreachable (closed ports).
fn cut_off_gateway(state: &Path) -> String {
    format!(
        r#"
state_dir: {state}
shutdown_timeout: 3s
connections:
  cloud:
    url: mqtt://127.0.0.1:{broker}
    client_id: systemd-test
    reconnect: {{ min: 100ms, max: 500ms }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {device} }}, timeout: 200ms, retries: 0 }}
devices:
  pump:
    bus: line
    unit: 1
    poll: 200ms
    points:
      deviceAttrib.motorStatus: {{ coil: 0, values: {{ on: true, off: false }} }}
    twin: {{ connection: cloud, commands: site/pump/cmd, responses: site/pump/rsp }}
"#,
        state = state.display(),
        broker = free_port(),
        device = free_port(),
    )
}

fn stop(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
    assert!(killed.success());
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("twinbus did not stop within 15 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn ready_then_watchdog_pings_with_the_broker_and_the_device_unreachable_then_stopping() {
    let manager = Manager::new("run");
    let mut child = manager.start(&cut_off_gateway(&manager.dir.join("state")), Some(Duration::from_millis(1000)));

    let before_ready = manager.wait_for("READY=1", Duration::from_secs(20));
    let ready = before_ready.last().expect("the READY datagram");
    assert!(ready.contains("STATUS=running: 1 devices, 1 buses, 1 connections"), "{ready}");

    // WATCHDOG_USEC=1s: a ping every 500 ms, although nothing outside answers.
    let pings = manager.receive_for(Duration::from_millis(2600)).iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).count();
    assert!(pings >= 3, "{pings} watchdog pings in 2.6 s");

    let status = stop(&mut child);
    let rest = manager.receive_for(Duration::from_millis(200));
    let stopping = rest.iter().find(|m| m.lines().any(|l| l == "STOPPING=1")).unwrap_or_else(|| panic!("no STOPPING=1 in {rest:?}"));
    assert!(stopping.contains("STATUS=stopping"), "{stopping}");
    assert_eq!(status.code(), Some(0), "a graceful stop exits 0");
}

#[test]
fn without_a_watchdog_only_ready_is_sent() {
    let manager = Manager::new("nowatchdog");
    let mut child = manager.start(&cut_off_gateway(&manager.dir.join("state")), None);
    manager.wait_for("READY=1", Duration::from_secs(20));
    let later = manager.receive_for(Duration::from_millis(1200));
    assert!(later.iter().all(|m| !m.contains("WATCHDOG=1")), "{later:?}");
    assert_eq!(stop(&mut child).code(), Some(0));
}

#[test]
fn an_invalid_config_exits_1_without_ever_being_ready() {
    let manager = Manager::new("invalid");
    let yaml = cut_off_gateway(&manager.dir.join("state")).replace("unit: 1", "unit: 300");
    let mut child = manager.start(&yaml, Some(Duration::from_secs(1)));
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(1), "systemd's RestartPreventExitStatus=1 relies on this");
    assert!(manager.receive_for(Duration::from_millis(100)).is_empty());
}
