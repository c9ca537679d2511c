//! The commissioning commands through the binary, against the built-in
//! simulator: what a technician types and what they see, exit codes included.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{free_port, PUMP_PROFILE};
use twinbus::config::Config;
use twinbus::point::{Table, Value};
use twinbus::sim::SimHandle;
use tokio_util::sync::CancellationToken;

/// A config with the pump on a simulator that this test starts itself (the
/// CLI must not start simulators: it talks to the field as it is).
struct Bench {
    file: PathBuf,
    sim: SimHandle,
    _stop: tokio_util::sync::DropGuard,
}

async fn bench(name: &str) -> Bench {
    let modbus = free_port();
    let dir = support::fresh_state_dir(format!("cli-{name}"));
    std::fs::create_dir_all(&dir).expect("dir");
    let yaml = format!(
        "connections:\n  local: {{ embedded: {{ listen: \"127.0.0.1:{mqtt}\" }} }}\nbuses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 200ms, retries: 0 }}\n{PUMP_PROFILE}devices:\n  pump: {{ bus: line, unit: 1, profile: pump }}\n  ghost: {{ bus: line, unit: 9, profile: pump }}\nsimulators:\n  sim: {{ listen: \"127.0.0.1:{modbus}\", serves: [pump], initial: {{ deviceData.temperature: 21.5, deviceAttrib.setpoint: 40 }} }}\nstate_dir: {state}\n",
        mqtt = free_port(),
        state = dir.join("state").display()
    );
    let file = dir.join("gateway.yaml");
    std::fs::write(&file, &yaml).expect("write config");
    let config = Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let stop = CancellationToken::new();
    let sim = twinbus::sim::start(&config.simulators[0], stop.clone()).await.expect("simulator");
    Bench { file, sim, _stop: stop.drop_guard() }
}

fn twinbus(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_twinbus")).arg("-c").arg(config).args(args).output().expect("run twinbus")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

async fn run(config: &Path, args: &[&str]) -> Output {
    let (config, args): (PathBuf, Vec<String>) = (config.to_path_buf(), args.iter().map(|a| a.to_string()).collect());
    tokio::task::spawn_blocking(move || twinbus(&config, &args.iter().map(String::as_str).collect::<Vec<_>>())).await.expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_prints_what_the_device_holds() {
    let b = bench("read").await;
    let out = run(&b.file, &["read", "pump"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("deviceData.temperature") && l.ends_with("21.5")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("deviceAttrib.motorStatus") && l.ends_with("off")), "{stdout}");
    let group = run(&b.file, &["read", "pump", "deviceAttrib"]).await;
    assert!(!text(&group.stdout).contains("deviceData"), "a group reads only what is under it");
    assert!(b.sim.writes().is_empty(), "reading writes nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_goes_through_the_cloud_checks_and_reads_back() {
    let b = bench("write").await;
    let ok = run(&b.file, &["write", "pump", "deviceAttrib.motorStatus", "on"]).await;
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    assert!(text(&ok.stdout).contains("deviceAttrib.motorStatus  on"), "{}", text(&ok.stdout));
    assert_eq!(b.sim.value(1, "deviceAttrib.motorStatus"), Some(Value::Text("on".into())));
    let writes = b.sim.writes();
    assert_eq!((writes.len(), writes[0].table), (1, Table::Coil));

    // Over the limit, between steps, read-only, unknown: refused, exit 3, nothing written.
    for (point, value, why) in [
        ("deviceAttrib.setpoint", "95", "above the maximum"),
        ("deviceData.temperature", "20", "read"),
        ("deviceAttrib.nope", "1", "unknown point"),
        ("deviceAttrib.mode", "\"turbo\"", "turbo"),
    ] {
        let out = run(&b.file, &["write", "pump", point, value]).await;
        assert_eq!(out.status.code(), Some(3), "{point}={value}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(why), "{point}={value}: {}", text(&out.stderr));
    }
    assert_eq!(b.sim.writes().len(), 1, "no write after the refused ones");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_does_not_answer_is_exit_status_4() {
    let b = bench("ghost").await;
    let out = run(&b.file, &["read", "ghost"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no answer"), "{}", text(&out.stderr));
    let unknown = run(&b.file, &["read", "boiler"]).await;
    assert_eq!(unknown.status.code(), Some(3));
    assert!(text(&unknown.stderr).contains("devices: ghost, pump"), "{}", text(&unknown.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_finds_the_units_that_answer() {
    let b = bench("scan").await;
    let out = run(&b.file, &["scan", "line", "--units", "1-4", "--address", "10"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("unit   1: answers (holding 10 = "), "{stdout}");
    assert!(stdout.contains("1 of 4 units answer on line: 1"), "{stdout}");
    // Register 5 is not configured: the simulator refuses it, and that still proves the unit.
    let refusing = run(&b.file, &["scan", "line", "--units", "1", "--address", "5"]).await;
    assert!(text(&refusing.stdout).contains("unit   1: answers, refusing this read with exception 0x02"), "{}", text(&refusing.stdout));
}
