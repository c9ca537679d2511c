//! Realistic device maps and the fewest reads that cover them.
//!
//! The optimum is computed here independently of the gateway's planner: a
//! dynamic programme over the points of each table in address order (a read
//! covers a run of points, no wider than the device allows, with no hole
//! wider than `max_gap`), so the figure "requests per cycle / optimum" checks
//! the planner instead of restating it. The guard test (tests/perf_counts.rs)
//! includes this file too.

use twinbus::config::{Device, ReadLimits};
use twinbus::point::Table;

/// (name, profile body in YAML flow style): drives, meters, I/O and controllers as their
/// manuals lay them out — holes between blocks, 32-bit values, bits of a register, a
/// device that reads at most 16 registers at once, one that tolerates holes.
pub const MAPS: &[(&str, &str)] = &[
    (
        "energy-meter",
        "{ points: { v.l1: { input: 0, type: f32 }, v.l2: { input: 2, type: f32 }, v.l3: { input: 4, type: f32 }, i.l1: { input: 6, type: f32 }, i.l2: { input: 8, type: f32 }, i.l3: { input: 10, type: f32 }, p.total: { input: 52, type: f32 }, pf: { input: 62, type: f32 }, hz: { input: 70, type: f32 }, e.import: { input: 72, type: f32 }, e.export: { input: 74, type: f32 }, e.total: { input: 342, type: f32 } } }",
    ),
    (
        "vfd",
        "{ points: { ctl.word: { holding: 8192 }, ctl.setpoint: { holding: 8193, scale: 0.01 }, st.word: { holding: 8448, access: read }, st.freq: { holding: 8449, scale: 0.01, access: read }, st.current: { holding: 8450, scale: 0.1, access: read }, st.voltage: { holding: 8451, access: read }, run: { coil: 0 }, reverse: { coil: 1 }, reset: { coil: 2 }, jog: { coil: 3 }, di.d0: { discrete: 0 }, di.d1: { discrete: 1 }, di.d2: { discrete: 2 }, di.d3: { discrete: 3 }, di.d4: { discrete: 4 }, di.d5: { discrete: 5 }, di.d6: { discrete: 6 }, di.d7: { discrete: 7 } } }",
    ),
    ("plc-io", "PLC_IO"),
    ("big-block", "BIG_BLOCK"),
    (
        "gapped-meter",
        "{ read: { max_gap: 10 }, points: { a: { input: 0 }, b: { input: 5 }, c: { input: 12 }, d: { input: 30, type: u32 }, e: { input: 100 } } }",
    ),
    (
        "controller",
        "{ read: { max_registers: 16 }, points: { pv.t1: { input: 0, type: i16, scale: 0.1 }, pv.t2: { input: 1, type: i16, scale: 0.1 }, sp: { holding: 10, type: f32 }, mode: { holding: 12, values: { auto: 0, manual: 1 } }, alarm.high: { holding: 20, bit: 0, access: read }, alarm.low: { holding: 20, bit: 1, access: read }, alarm.sensor: { holding: 20, bit: 2, access: read }, alarm.output: { holding: 20, bit: 3, access: read }, hours: { holding: 100, type: u32, access: read } } }",
    ),
    ("sparse-registers", "SPARSE"),
];

/// A profile body of the map `name` (the generated ones expanded).
pub fn profile(name: &str) -> String {
    let body = MAPS.iter().find(|(n, _)| *n == name).map_or("", |(_, b)| *b);
    match body {
        "PLC_IO" => {
            let mut p: Vec<String> = (0..32).map(|i| format!("q.q{i}: {{ coil: {i} }}")).collect();
            p.extend((0..16).map(|i| format!("i.i{i}: {{ discrete: {i} }}")));
            p.extend((0..20).map(|i| format!("r.r{i}: {{ holding: {i} }}")));
            format!("{{ points: {{ {} }} }}", p.join(", "))
        }
        "BIG_BLOCK" => format!("{{ points: {{ {} }} }}", (0..200).map(|i| format!("r.r{i:03}: {{ holding: {i}, access: read }}")).collect::<Vec<_>>().join(", ")),
        "SPARSE" => format!(
            "{{ read: {{ max_gap: 1, max_registers: 50 }}, points: {{ {} }} }}",
            (0..60).map(|i| format!("r.r{i:02}: {{ holding: {}, access: read }}", 2 * i)).collect::<Vec<_>>().join(", ")
        ),
        b => b.to_string(),
    }
}

/// The fewest reads that cover every readable point of `device`.
pub fn optimum(device: &Device) -> usize {
    let limits: &ReadLimits = &device.read;
    let mut total = 0;
    for table in [Table::Coil, Table::DiscreteInput, Table::InputRegister, Table::HoldingRegister] {
        let mut spans: Vec<(u32, u32)> = device.points.iter().filter(|p| p.access.readable() && p.location.table == table).map(|p| p.span()).collect();
        spans.sort();
        let max = u32::from(if table.is_bits() { limits.max_bits } else { limits.max_registers });
        // best[i]: fewest reads covering the first i spans.
        let n = spans.len();
        let mut best = vec![usize::MAX; n + 1];
        best[0] = 0;
        for i in 1..=n {
            // A read covering spans j..i (j counting down) is valid while it
            // fits and every hole inside it is at most max_gap wide.
            let mut end = 0u32;
            for j in (0..i).rev() {
                end = end.max(spans[j].1);
                if end - spans[j].0 >= max {
                    break;
                }
                let holes_ok = (j + 1..i).all(|k| spans[k].0 <= spans[j..k].iter().map(|s| s.1).max().unwrap_or(0) + 1 + u32::from(limits.max_gap));
                if holes_ok && best[j] != usize::MAX {
                    best[i] = best[i].min(best[j] + 1);
                }
            }
        }
        total += best[n];
    }
    total
}
