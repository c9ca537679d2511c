//! The performance figures that do not depend on the machine, guarded
//! against the numbers committed here (issue 12): a change that makes the
//! planner send more requests, the gateway publish more than one message
//! per poll, or a telemetry document allocate per value fails here. The
//! timed figures are in the benchmark (`cargo run --release --example
//! bench`), never in a test.
//!
//! Allocations are counted by a global allocator that counts per thread,
//! so tests running side by side do not see each other's.

mod support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::time::{Duration, SystemTime};

use twinbus::config::Config;
use twinbus::device::{Health, Snapshot};
use twinbus::point::Value;

#[path = "../examples/bench/maps.rs"]
mod maps;

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counters are plain thread-locals.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        let _ = BYTES.try_with(|c| c.set(c.get() + layout.size() as u64));
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: allocated by System above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        let _ = BYTES.try_with(|c| c.set(c.get() + new_size as u64));
        // SAFETY: as in alloc.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// (allocations, bytes) made by `f` on this thread.
fn counted<T>(f: impl FnOnce() -> T) -> (T, u64, u64) {
    let (a0, b0) = (ALLOCS.with(Cell::get), BYTES.with(Cell::get));
    let out = f();
    (out, ALLOCS.with(Cell::get) - a0, BYTES.with(Cell::get) - b0)
}

/// Requests per poll cycle the planner makes for each realistic map,
/// committed: (map, requests). Each is also the computed optimum.
const REQUESTS_PER_CYCLE: &[(&str, usize)] =
    &[("energy-meter", 5), ("vfd", 4), ("plc-io", 3), ("big-block", 2), ("gapped-meter", 3), ("controller", 4), ("sparse-registers", 3)];

fn maps_config() -> Config {
    let mut yaml = String::from("connections:\n  local: { embedded: { listen: \"127.0.0.1:1883\" } }\nbuses:\n  line: { tcp: { host: 127.0.0.1, port: 5020 } }\nprofiles:\n");
    for (name, _) in maps::MAPS {
        yaml += &format!("  {name}: {}\n", maps::profile(name));
    }
    yaml += "devices:\n";
    for (i, (name, _)) in maps::MAPS.iter().enumerate() {
        yaml += &format!("  {name}: {{ bus: line, unit: {}, profile: {name}, twin: {{ connection: local, telemetry: t/{name} }} }}\n", i + 1);
    }
    Config::parse(&yaml, Path::new("maps.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_planner_reads_every_realistic_map_in_the_fewest_requests() {
    let config = maps_config();
    for d in &config.devices {
        let readable: Vec<usize> = (0..d.points.len()).filter(|&i| d.points[i].access.readable()).collect();
        let planned = twinbus::modbus::plan_reads(&d.points, &readable, &d.read).len();
        let committed = REQUESTS_PER_CYCLE.iter().find(|(n, _)| *n == d.name).map(|(_, r)| *r);
        assert_eq!(Some(planned), committed, "{}: requests per cycle", d.name);
        assert_eq!(planned, maps::optimum(d), "{}: the planner against the computed optimum", d.name);
    }
}

/// Allocations of one full telemetry document of 100 values, committed with
/// a little slack (the buffer, its one growth, the open-object stack, a few
/// in serde_json's float formatting). Before this document was written
/// straight into a buffer it took about 5 allocations per value.
const DOC_ALLOCATIONS_MAX: u64 = 6;
/// Bytes allocated per value of that document (the text itself is ≈ 27 per value).
const DOC_BYTES_PER_VALUE_MAX: u64 = 48;

#[test]
fn a_telemetry_document_allocates_per_document_not_per_value() {
    let yaml = format!(
        "connections:\n  local: {{ embedded: {{ listen: \"127.0.0.1:1883\" }} }}\nbuses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: 5020 }} }}\ndevices:\n  d: {{ bus: line, unit: 1, twin: {{ connection: local, telemetry: t }}, points: {{ {} }} }}\n",
        (0..100).map(|i| format!("group{}.sub.v{i:03}: {{ holding: {i}, type: i16, scale: 0.1, access: read }}", i / 10)).collect::<Vec<_>>().join(", ")
    );
    let config = Config::parse(&yaml, Path::new("doc.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let points = &config.devices[0].points;
    let snap = Snapshot {
        values: (0..100).map(|i| Some(Value::Float(f64::from(i) * 0.1 + 20.0))).collect(),
        errors: vec![None; 100],
        health: Health::Online,
        seq: 1,
        at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    let (doc, allocs, bytes) = counted(|| twinbus::twin::telemetry_document(points, &snap, |_| true));
    // The same document built the old way: a JSON tree, key by key.
    let (tree, tree_allocs, _) = counted(|| {
        let mut m = serde_json::Map::new();
        m.insert("time".into(), serde_json::json!(1_700_000_000_000u64));
        m.insert("online".into(), serde_json::json!(true));
        for (p, v) in points.iter().zip(&snap.values) {
            if let Some(v) = v {
                twinbus::twin::json::insert(&mut m, &p.path, twinbus::twin::json::to_json(v));
            }
        }
        serde_json::Value::Object(m).to_string()
    });
    assert_eq!(String::from_utf8_lossy(&doc), tree, "the document is the one the JSON tree gave");
    println!("telemetry document of 100 values: {allocs} allocations, {bytes} bytes (built as a JSON tree: {tree_allocs} allocations)");
    assert!(allocs <= DOC_ALLOCATIONS_MAX, "{allocs} allocations for one document of 100 values (committed: at most {DOC_ALLOCATIONS_MAX})");
    assert!(bytes / 100 <= DOC_BYTES_PER_VALUE_MAX, "{} bytes allocated per value (committed: at most {DOC_BYTES_PER_VALUE_MAX})", bytes / 100);
}

/// At most one telemetry message per poll, however many values change:
/// every value of this device changes at every poll (a counter the test
/// bumps), and the device is polled every 100 ms with a full report every
/// 100 ms and reports on change in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_sends_at_most_one_message_per_poll() {
    let (mqtt, modbus) = (support::free_port(), support::free_port());
    let points = (0..20).map(|i| format!("v.v{i:02}: {{ holding: {i}, access: read }}")).collect::<Vec<_>>().join(", ");
    let yaml = format!(
        "state_dir: {}\nconnections:\n  local: {{ embedded: {{ listen: \"127.0.0.1:{mqtt}\" }} }}\nbuses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }} }}\ndevices:\n  d: {{ bus: line, unit: 1, poll: 100ms, twin: {{ connection: local, telemetry: t/d, telemetry_interval: 100ms }}, points: {{ {points} }} }}\nsimulators:\n  sim: {{ listen: \"127.0.0.1:{modbus}\", serves: [d] }}\n",
        support::fresh_state_dir("perf-messages").display()
    );
    let config = Config::parse(&yaml, Path::new("messages.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let gateway = twinbus::gateway::Gateway::start(&config).await.expect("starts");
    let sim = gateway.simulator("sim").expect("simulator").clone();
    let options = support::mqtt::Options::new("perf-cloud").subscribe(["t/d"]).wait(Duration::from_secs(5));
    let mut cloud = support::mqtt::Mqtt::connect(mqtt, options).await.expect("connects");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // What the polls before the window sent is not counted.
    while cloud.next(Duration::from_millis(50)).await.is_some() {}
    let r0 = sim.requests();
    let mut messages = 0u64;
    let until = std::time::Instant::now() + Duration::from_millis(1500);
    let mut k = 0;
    while std::time::Instant::now() < until {
        k += 1;
        for i in 0..20 {
            let _ = sim.set_value(1, &format!("v.v{i:02}"), &Value::Int(k));
        }
        while cloud.next(Duration::from_millis(20)).await.is_some() {
            messages += 1;
        }
    }
    let polls = sim.requests() - r0; // one read per poll: 20 contiguous registers
    gateway.shutdown().await;
    assert!(polls >= 5, "only {polls} polls in 1.5 s");
    assert!(messages <= polls + 1, "{messages} telemetry messages for {polls} polls (at most one per poll)");
    assert!(messages >= 1, "no telemetry at all");
}

/// Allocations per poll cycle of a device of `points` registers, read in one
/// request over TCP from the built-in simulator: the bus transaction, the
/// decoding, the snapshot, and the simulator's side (everything runs on this
/// test's one thread, so the counter sees all of it), averaged over 40 cycles.
async fn allocations_per_poll(points: usize) -> f64 {
    let modbus = support::free_port();
    let pts = (0..points).map(|i| format!("v.v{i:03}: {{ holding: {i}, access: read }}")).collect::<Vec<_>>().join(", ");
    let yaml = format!(
        "state_dir: {}\nbuses:\n  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }} }}\ndevices:\n  d: {{ bus: line, unit: 1, poll: 10ms, points: {{ {pts} }} }}\nsimulators:\n  sim: {{ listen: \"127.0.0.1:{modbus}\", serves: [d] }}\n",
        support::fresh_state_dir(&format!("perf-poll-{points}")).display()
    );
    let config = Config::parse(&yaml, Path::new("poll.yaml")).unwrap_or_else(|e| panic!("{e}"));
    let gateway = twinbus::gateway::Gateway::start(&config).await.expect("starts");
    let mut snapshots = gateway.device("d").expect("device d runs").watch();
    let mut wait_polls = async |n: u64| {
        let start = snapshots.borrow().seq;
        while snapshots.borrow_and_update().seq < start + n {
            tokio::time::timeout(Duration::from_secs(10), snapshots.changed()).await.expect("a poll within 10 s").expect("the device runs");
        }
        assert_eq!(snapshots.borrow().health, Health::Online, "the simulator answers");
    };
    // The first polls connect, and fill the buffers that are reused after.
    wait_polls(5).await;
    let a0 = ALLOCS.with(Cell::get);
    wait_polls(40).await;
    let per_poll = (ALLOCS.with(Cell::get) - a0) as f64 / 40.0;
    gateway.shutdown().await;
    per_poll
}

/// Allocations a poll cycle makes, whatever its number of values, committed.
/// Measured at 17.1 for 10 and for 120 values: the request handed to the bus,
/// tokio-modbus' frames, the simulator's reply. It was 262 for 120 values
/// while each value's registers were reordered through two vectors, and
/// before that each poll also copied its snapshot (3 allocations), collected
/// the decoded block (1) and cloned the block's plan (1).
const POLL_ALLOCATIONS_MAX: f64 = 20.0;

#[tokio::test(flavor = "current_thread")]
async fn a_poll_cycle_allocates_per_request_not_per_value() {
    let small = allocations_per_poll(10).await;
    let large = allocations_per_poll(120).await;
    let per_value = (large - small) / 110.0;
    println!("allocations per poll cycle: {small:.1} for 10 values, {large:.1} for 120 ({per_value:.3} per value)");
    assert!(per_value < 0.02, "{per_value:.3} allocations per value in a poll cycle ({small:.1} for 10 values, {large:.1} for 120): something on the poll path allocates per value");
    assert!(large <= POLL_ALLOCATIONS_MAX, "{large:.1} allocations per poll cycle (committed: at most {POLL_ALLOCATIONS_MAX})");
}
