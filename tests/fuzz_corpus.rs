//! The fuzz corpora, replayed: every file under `fuzz/corpus/<target>/` (the
//! seeds and every finding) goes through the same checks as under libFuzzer
//! (`fuzz/src/lib.rs`, included here by path), so a finding stays fixed
//! without cargo fuzz, and the checks themselves stay compiled and run.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code, unreachable_pub)]
mod oracle;

use std::path::Path;
use std::time::{Duration, Instant};

#[test]
fn every_fuzz_corpus_file_passes_its_targets_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    for target in oracle::TARGETS {
        let dir = root.join(target);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("a directory entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{}: no seeds", dir.display());
        for file in &files {
            let data = std::fs::read(file).expect("a corpus file");
            let started = Instant::now();
            let outcome = std::panic::catch_unwind(|| oracle::run(target, &data));
            let took = started.elapsed();
            match outcome {
                Err(e) => {
                    let why = e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()));
                    failures.push(format!("{}: {}", file.display(), why.unwrap_or_default()));
                }
                // libFuzzer's bound is 10 s in release; a debug build gets more.
                Ok(()) if took > Duration::from_secs(20) => failures.push(format!("{}: took {took:?}", file.display())),
                Ok(()) => {}
            }
        }
        counts.push(format!("{target}: {}", files.len()));
    }
    eprintln!("replayed {}", counts.join(", "));
    assert!(failures.is_empty(), "{} corpus file(s) fail:\n{}", failures.len(), failures.join("\n"));
}

/// The delta target reaches the device: a valid delta is written (so the
/// oracle above checks real writes), a refused one is not, and a delta older
/// than one applied changes nothing.
#[test]
fn the_delta_targets_seeds_write_what_is_valid_and_nothing_else() {
    let device = oracle::shadow_device();
    let path = |i: usize| device.points[i].path.clone();
    let paths = |messages: &[(&str, &[u8])]| -> Vec<Vec<String>> {
        twinbus::twin::shadow_replay(device, messages).expect("the adapter settles").into_iter().map(|w| w.into_iter().map(|(i, _)| path(i)).collect()).collect()
    };
    let valid = br#"{"state":{"deviceAttrib":{"setpoint":33.5,"motorStatus":"on"}},"version":5,"timestamp":1795631474}"#;
    let written: Vec<String> = paths(&[("/update/delta", valid)]).concat();
    assert!(written.contains(&"deviceAttrib.setpoint".to_string()) && written.contains(&"deviceAttrib.motorStatus".to_string()), "{written:?}");
    let refused = br#"{"state":{"deviceAttrib":{"setpoint":95}},"version":6,"timestamp":1795631474}"#;
    assert_eq!(paths(&[("/update/delta", refused)]), Vec::<Vec<String>>::new());
    let newer = br#"{"state":{"deviceAttrib":{"trim":5}},"version":9,"timestamp":1795631474}"#;
    let older = br#"{"state":{"deviceAttrib":{"trim":7}},"version":4,"timestamp":1795631474}"#;
    assert_eq!(paths(&[("/update/delta", newer), ("/update/delta", older)]), vec![vec!["deviceAttrib.trim".to_string()]]);
}
