//! Every YAML block of the README passes `twinbus check`: a reader copies
//! them as they are. A block is either a complete gateway.yaml or starts with
//! `# fragment: ...` (what it needs); a fragment is checked merged into a
//! small site that provides what fragments lean on (the buses, profiles and
//! connections of the other examples), with the secrets and certificate
//! files the examples name.

mod support;

use std::path::Path;

use serde_json::{Map, Value as Json};
use twinbus::config::Config;

/// What the README's fragments lean on, as an integrator's file would have it.
const SITE: &str = r#"
connections:
  cloud: { url: "mqtts://broker.example.com:8883", client_id: site-cloud, username: gw, password: "${MQTT_PASSWORD}" }
  aws:
    url: mqtts://a1b2c3d4e5f6g7-ats.iot.eu-west-1.amazonaws.com:8883
    client_id: site-aws
    tls: { ca: certs/AmazonRootCA1.pem, cert: certs/line3.cert.pem, key: certs/line3.private.key }
buses:
  rs485: { rtu: { port: /dev/ttyUSB0, baud: 9600, parity: even } }
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint:    { holding: 10, type: f32, min: 0, max: 80 }
      deviceData.temperature:   { input: 0, type: i16, scale: 0.1, deadband: 0.2 }
  meter:
    points:
      deviceAttrib.mode: { holding: 0 }
      deviceData.p0:     { input: 0 }
      deviceData.p10:    { input: 10 }
      deviceData.p20:    { input: 20 }
devices:
  site-pump: { bus: rs485, unit: 100, profile: pump, twin: { connection: cloud, telemetry: site/telemetry } }
"#;

/// The README's YAML blocks: (line of the opening fence, text).
fn blocks() -> Vec<(usize, String)> {
    let readme = include_str!("../README.md");
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (n, line) in readme.lines().enumerate() {
        match &mut current {
            None if line.starts_with("```yaml") || line.starts_with("```yml") => current = Some((n + 1, String::new())),
            Some(_) if line.starts_with("```") => out.extend(current.take()),
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    out
}

/// A directory with the files the examples name, and their secrets set.
fn workspace() -> std::path::PathBuf {
    let dir = support::fresh_state_dir("readme");
    for f in ["certs/AmazonRootCA1.pem", "certs/line3.cert.pem", "certs/line3.private.key", "secrets/pump-7.password", "secrets/console.password", "ca.pem"] {
        let path = dir.join(f);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("dir");
        std::fs::write(&path, "placeholder\n").expect("write");
    }
    // Read only by this test's loads (the other test here needs no secret).
    std::env::set_var("MQTT_PASSWORD", "example");
    std::env::set_var("PROXY_PASSWORD", "example");
    dir
}

fn yaml(text: &str) -> Json {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("not YAML: {e}\n{text}"))
}

/// `over` merged into `base`: mappings key by key, anything else replaced.
fn merge(base: &mut Json, over: Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k).or_insert(Json::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

fn check(dir: &Path, line: usize, text: &str) {
    let file = dir.join(format!("readme-{line}.yaml"));
    std::fs::write(&file, text).expect("write");
    if let Err(e) = Config::load(&file) {
        panic!("README.md:{line}: the YAML block fails `twinbus check`:\n{e}\n--- as checked ---\n{text}");
    }
}

#[test]
fn every_yaml_block_in_the_readme_passes_check_as_written_or_as_an_assembled_fragment() {
    let dir = workspace();
    let blocks = blocks();
    assert!(blocks.len() >= 5, "the README's examples were found: {}", blocks.len());
    for (line, text) in &blocks {
        // Parses as YAML as written, fragment or not: a reader pastes it.
        let doc = yaml(text);
        if text.starts_with("# fragment") {
            let mut site = yaml(SITE);
            merge(&mut site, doc);
            // JSON is YAML: the merged document goes through the real loader.
            let mut merged = serde_json::to_string_pretty(&site).expect("JSON");
            if let Json::Object(m) = &site {
                assert!(m.get("devices").and_then(Json::as_object).is_some_and(|d: &Map<String, Json>| !d.is_empty()));
            }
            merged.push('\n');
            check(&dir, *line, &merged);
        } else {
            check(&dir, *line, text);
        }
    }
}

#[test]
fn the_shipped_gateway_yaml_passes_check() {
    Config::load(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/gateway.yaml"))).unwrap_or_else(|e| panic!("{e}"));
}
