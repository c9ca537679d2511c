//! The bad-input corpus (issue 8): hundreds of malformed or forbidden raw
//! commands, shadow deltas and configurations, each with the clear reason it
//! must be refused with, checked end to end:
//! - `bad_input/commands.txt`: sent over MQTT 5 to a gateway in-process
//!   (embedded broker, simulator); the answer's status, id, `error` and
//!   per-field `errors` are matched;
//! - `bad_input/deltas.txt`: written to an AWS shadow through the shadow
//!   service emulator (`support::shadow`, by its public API), whose deltas
//!   the gateway applies; the reason must appear under
//!   `reported.twinbus.errors` (or a command's FAILURE, or the service's own
//!   rejection);
//! - `bad_input/configs.txt`: given to `Config::parse`; every problem must be
//!   one the case expects, at its `FILE:LINE:COL`.
//!
//! Across the corpus: no write outside a configured writable point or its
//! limits (the simulator's record of every write is checked at the end, with
//! the oracle of the fuzz targets, `fuzz/src/lib.rs`), no panic, and no hang
//! (every case is bounded in time). The formats are described at the top of
//! each file.

mod support;

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code, unreachable_pub)]
mod oracle;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regex::Regex;
use serde_json::{json, Value as Json};
use support::mqtt::{Mqtt, Options, PublishProperties};
use support::shadow::ShadowService;
use support::{free_port, fresh_state_dir};
use twinbus::config::{Config, ConfigError};
use twinbus::gateway::Gateway;
use twinbus::mqtt::{Access, EmbeddedBroker};
use twinbus::sim::SimHandle;

/// How long one case may take before it counts as a hang.
const CASE: Duration = Duration::from_secs(10);

fn corpus(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_input").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// The case files

/// One case: its name, the line it starts on, and its directives in order.
#[derive(Debug)]
struct Case {
    name: String,
    line: usize,
    directives: Vec<(String, String)>,
}

impl Case {
    fn get(&self, key: &str) -> Option<&str> {
        self.directives.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// `field PATH: REGEX` style directives: (PATH, REGEX).
    fn keyed<'a>(&'a self, key: &'a str) -> impl Iterator<Item = (String, &'a str)> + 'a {
        self.directives.iter().filter_map(move |(k, v)| {
            let path = k.strip_prefix(key)?.strip_prefix(' ')?;
            Some((unescape(path).text("a path"), v.as_str()))
        })
    }

    fn label(&self) -> String {
        format!("{}:{} ({})", self.name, self.line, self.name)
    }
}

/// Cases of a `case:`-style file: `directive: value` lines, `#` comments.
fn cases(file: &str, text: &str) -> Vec<Case> {
    let mut out: Vec<Case> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, value) = line.split_once(": ").or_else(|| line.strip_suffix(':').map(|k| (k, ""))).unwrap_or_else(|| panic!("{file}:{}: not `directive: value`: {line}", n + 1));
        if key == "case" {
            out.push(Case { name: format!("{file}: {value}"), line: n + 1, directives: Vec::new() });
            continue;
        }
        let case = out.last_mut().unwrap_or_else(|| panic!("{file}:{}: a directive before the first case", n + 1));
        case.directives.push((key.to_string(), value.to_string()));
    }
    out
}

/// `<<N*TEXT>>` → TEXT N times, `{n}` in TEXT being the repetition's number.
fn expand(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<<") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find(">>").expect("a closing >>");
        let (count, unit) = after[..end].split_once('*').expect("<<N*TEXT>>");
        let count: usize = count.parse().expect("a repeat count");
        for i in 0..count {
            out.push_str(&unit.replace("{n}", &i.to_string()));
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Expands repeats, then `\n \r \t \0 \\ \xHH \u{HEX}` escapes, into bytes.
fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let text = expand(text);
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).map_err(|e| format!("\\x{hex}: {e}"))?);
            }
            Some('u') => {
                if chars.next() != Some('{') {
                    return Err("\\u needs {HEX}".into());
                }
                let hex: String = chars.by_ref().take_while(|c| *c != '}').collect();
                let c = u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32).ok_or(format!("\\u{{{hex}}}"))?;
                let mut buf = [0; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
            other => return Err(format!("unknown escape \\{other:?}")),
        }
    }
    Ok(out)
}

trait Unescaped {
    fn text(self, what: &str) -> String;
}

impl Unescaped for Result<Vec<u8>, String> {
    fn text(self, what: &str) -> String {
        match self {
            Ok(bytes) => String::from_utf8(bytes).unwrap_or_else(|e| panic!("{what} is not UTF-8: {e}")),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

fn regex(pattern: &str) -> Regex {
    Regex::new(pattern).unwrap_or_else(|e| panic!("bad regex {pattern:?}: {e}"))
}

fn matches(pattern: &str, text: &str) -> bool {
    regex(pattern).is_match(text)
}

/// Every write the simulator recorded is to a writable point and within its limits.
fn check_writes(sim: &SimHandle, failures: &mut Vec<String>) -> usize {
    let points = oracle::rich_points();
    let writes = sim.writes();
    for w in &writes {
        if w.unit != 1 {
            failures.push(format!("a write to unit {}: {w:?}", w.unit));
        } else if let Err(why) = oracle::check_written(points, w.table, w.address, &w.values) {
            failures.push(format!("a write outside the writable points or their limits: {why}: {w:?}"));
        }
    }
    writes.len()
}

fn report(kind: &str, total: usize, failures: &[String]) {
    assert!(failures.is_empty(), "{} of {total} {kind} cases failed:\n\n{}", failures.len(), failures.join("\n\n"));
}

// ---------------------------------------------------------------------------
// Commands

fn command_config() -> String {
    format!(
        r#"
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{{MQTT}}" }}, mqtt_version: 5 }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {{MODBUS}} }}, timeout: 300ms, retries: 1 }}
{profile}
devices:
  rich:
    bus: line
    unit: 1
    profile: rich
    poll: 1s
    twin:
      connection: local
      commands: site/rich/cmd
      responses: site/rich/rsp
      response_topics: [site/rich/rsp, "app/rich/+"]
simulators:
  sim: {{ listen: "127.0.0.1:{{MODBUS}}", serves: [rich] }}
"#,
        profile = oracle::PROFILE
    )
}

/// What a command case checks in its answer; `None` when it holds.
fn check_answer(case: &Case, raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let doc: Json = match serde_json::from_slice(raw) {
        Ok(d) => d,
        Err(e) => return Some(format!("the answer is not JSON ({e}): {text}")),
    };
    let mut wrong = Vec::new();
    let status = case.get("status").unwrap_or("rejected");
    if doc["status"] != status {
        wrong.push(format!("status {} (expected {status})", doc["status"]));
    }
    if status == "rejected" && (case.get("error").is_none() && case.keyed("field").next().is_none()) {
        wrong.push("the case expects no reason: give it `error:` or `field`".to_string());
    }
    match case.get("id") {
        Some("none") if doc.get("id").is_some() => wrong.push(format!("an id {} (expected none)", doc["id"])),
        Some("none") | None => {}
        Some(id) => {
            if !text.contains(&format!("\"id\":{id}")) {
                wrong.push(format!("the id is not echoed as {id}"));
            }
        }
    }
    if let Some(pattern) = case.get("error") {
        match doc["error"].as_str() {
            Some(e) if matches(pattern, e) => {}
            other => wrong.push(format!("error {other:?} does not match /{pattern}/")),
        }
    }
    for (path, pattern) in case.keyed("field") {
        match doc["errors"][path.as_str()].as_str() {
            Some(e) if matches(pattern, e) => {}
            other => wrong.push(format!("errors[{path:?}] = {other:?} does not match /{pattern}/")),
        }
    }
    if wrong.is_empty() {
        None
    } else {
        let shown: String = text.chars().take(2000).collect();
        Some(format!("{}\n  answer: {shown}", wrong.join("\n  ")))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_command_is_refused_with_its_reason_and_writes_nothing_outside_the_limits() {
    let cases = cases("commands.txt", &corpus("commands.txt"));
    let h = support::start(&command_config()).await;
    let options = Options::new("bad-input").mqtt5().max_packet(4 * 1024 * 1024).keep_alive(Duration::from_secs(30)).subscribe(["site/rich/rsp"]);
    let mut cloud = Mqtt::connect(h.mqtt_port, options).await.expect("the cloud's client connects");
    let started = Instant::now();
    let mut failures = Vec::new();
    for case in &cases {
        let payload: Vec<u8> = if let Some(text) = case.get("send") {
            expand(text).into_bytes()
        } else if let Some(text) = case.get("send-escaped") {
            unescape(text).unwrap_or_else(|e| panic!("{}: {e}", case.label()))
        } else if let Some(hex) = case.get("send-hex") {
            (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
        } else {
            panic!("{}: no send", case.label())
        };
        let sent = match case.get("response-topic") {
            Some(t) => {
                let topic = unescape(t).text("a response topic");
                let props = PublishProperties { response_topic: Some(topic), correlation_data: Some(Bytes::from_static(b"corpus")), ..Default::default() };
                cloud.publish_with("site/rich/cmd", payload, props).await
            }
            None => cloud.publish("site/rich/cmd", payload).await,
        };
        if let Err(e) = sent {
            failures.push(format!("{}: not sent: {e}", case.label()));
            continue;
        }
        match cloud.next_skipping(CASE, |m| m.topic == "site/rich/rsp").await {
            None => failures.push(format!("{}: no answer within {CASE:?} (a hang, or a command not answered)", case.label())),
            Some(m) => {
                if let Some(why) = check_answer(case, &m.payload) {
                    failures.push(format!("{}: {why}", case.label()));
                }
            }
        }
    }
    // Nothing else came: every command got exactly one answer.
    if let Some(extra) = cloud.next_skipping(Duration::from_millis(300), |m| m.topic == "site/rich/rsp").await {
        failures.push(format!("an answer too many: {}", extra.text()));
    }
    let writes = check_writes(&h.sim, &mut failures);
    let controls = cases.iter().filter(|c| c.get("status") == Some("succeeded")).count();
    eprintln!("commands: {} cases ({controls} controls) in {:?}; {writes} writes recorded, all checked", cases.len(), started.elapsed());
    let mut gateway = h.gateway;
    if let Ok(why) = tokio::time::timeout(Duration::from_millis(50), gateway.failed()).await {
        failures.push(format!("a part of the gateway failed: {why}"));
    }
    gateway.shutdown().await;
    report("command", cases.len(), &failures);
}

// ---------------------------------------------------------------------------
// Shadow deltas

const THING: &str = "rich-1";

fn shadow_config(broker: u16, modbus: u16, state: &Path) -> Config {
    let yaml = format!(
        r#"
state_dir: {state}
connections:
  aws:
    url: mqtt://127.0.0.1:{broker}
    client_id: gw-{broker}
    reconnect: {{ min: 200ms, max: 1s }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 300ms }}
{profile}
devices:
  {THING}:
    bus: line
    unit: 1
    profile: rich
    poll: 1s
    twin: {{ connection: aws, shadow: {{ thing: {THING} }} }}
simulators:
  sim: {{ listen: "127.0.0.1:{modbus}", serves: [{THING}] }}
"#,
        state = state.display(),
        profile = oracle::PROFILE
    );
    Config::parse(&yaml, Path::new("deltas.yaml")).unwrap_or_else(|e| panic!("{e}"))
}

/// The JSON of a delta directive (after repeats; JSON has its own escapes).
fn json_of(case: &Case, text: &str) -> Json {
    let text = expand(text);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {text}", case.label()))
}

/// The value at a dotted path of `doc`.
fn at<'a>(doc: &'a Json, path: &str) -> &'a Json {
    path.split('.').fold(doc, |node, key| &node[key])
}

/// What the case expects of the shadow's reported state, if it holds now.
fn delta_outcome(case: &Case, reported: &Json) -> Result<(), String> {
    let mut wrong = Vec::new();
    for (path, pattern) in case.keyed("reason") {
        match reported["twinbus"]["errors"][path.as_str()].as_str() {
            Some(e) if matches(pattern, e) => {}
            other => wrong.push(format!("twinbus.errors[{path:?}] = {other:?}, expected /{pattern}/")),
        }
    }
    for (id, expected) in case.keyed("command") {
        let (state, pattern) = expected.split_once(' ').unwrap_or((expected, ""));
        let commands = reported["command"].as_object().cloned().unwrap_or_default();
        let hit = commands.iter().any(|(k, v)| {
            (id == "*" || *k == id) && v["state"] == state && (pattern.is_empty() || v["reason"].as_str().is_some_and(|r| matches(pattern, r)))
        });
        if !hit {
            wrong.push(format!("no command {id} in state {state} with a reason matching /{pattern}/: {}", reported["command"]));
        }
    }
    for (path, value) in case.keyed("reported") {
        let want: Json = serde_json::from_str(value).unwrap_or_else(|e| panic!("{}: {e}", case.label()));
        if *at(reported, &path) != want {
            wrong.push(format!("reported {path} = {}, expected {want}", at(reported, &path)));
        }
    }
    if wrong.is_empty() { Ok(()) } else { Err(wrong.join("\n  ")) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_shadow_delta_is_refused_with_its_reason_and_writes_nothing_outside_the_limits() {
    let cases = cases("deltas.txt", &corpus("deltas.txt"));
    let broker_port = free_port();
    let _broker = EmbeddedBroker::start(format!("127.0.0.1:{broker_port}").parse().expect("addr"), Access::anyone()).expect("broker");
    let svc = ShadowService::start(broker_port, &[(THING, None)]).await;
    let state = fresh_state_dir(format!("deltas-{broker_port}"));
    let mut gateway = Gateway::start(&shadow_config(broker_port, free_port(), &state)).await.expect("the gateway starts");
    let sim = gateway.simulator("sim").expect("sim").clone();
    let up = svc.wait_until(CASE, || svc.document(THING, None).filter(|d| d["state"]["reported"]["connected"] == true)).await;
    assert!(up.is_some(), "the gateway reports itself connected");

    let started = Instant::now();
    let mut failures = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        // Each case writes at its own second: a value is applied once per write time.
        svc.set_clock_offset(n as i64 + 1);
        let action = if let Some(desired) = case.get("desired") {
            svc.update(THING, None, json!({"state": {"desired": json_of(case, desired)}})).await
        } else if let Some(request) = case.get("request") {
            svc.update(THING, None, json_of(case, request)).await
        } else if let Some(doc) = case.get("publish") {
            svc.publish(THING, None, "update/delta", &json_of(case, doc)).await;
            Ok(json!({}))
        } else {
            panic!("{}: no desired, request or publish", case.label())
        };
        match (case.get("rejected"), action) {
            (Some(expected), Err(doc)) => {
                let (code, pattern) = expected.split_once(' ').unwrap_or((expected, ""));
                let ok = doc["code"].to_string() == code && doc["message"].as_str().is_some_and(|m| matches(pattern, m));
                if !ok {
                    failures.push(format!("{}: the service refused with {doc}, expected {code} /{pattern}/", case.label()));
                }
            }
            (Some(expected), Ok(doc)) => failures.push(format!("{}: the service took it ({doc}), expected a refusal {expected}", case.label())),
            (None, Err(doc)) => failures.push(format!("{}: the service refused it: {doc}", case.label())),
            (None, Ok(_)) => {
                let empty = json!({});
                let seen = svc
                    .wait_until(CASE, || {
                        let doc = svc.document(THING, None)?;
                        delta_outcome(case, doc["state"].get("reported").unwrap_or(&empty)).ok()
                    })
                    .await;
                if seen.is_none() {
                    let doc = svc.document(THING, None).unwrap_or_default();
                    let why = delta_outcome(case, doc["state"].get("reported").unwrap_or(&empty)).err().unwrap_or_default();
                    failures.push(format!("{}: not within {CASE:?}:\n  {why}", case.label()));
                }
            }
        }
        // Start the next case from a clean desired state and no errors.
        let reset = json!({"state": {"desired": null, "reported": {"twinbus": null, "command": null}}});
        if let Err(e) = svc.update(THING, None, reset).await {
            failures.push(format!("{}: the reset was refused: {e}", case.label()));
        }
    }
    let writes = check_writes(&sim, &mut failures);
    let controls = cases.iter().filter(|c| c.get("control").is_some()).count();
    eprintln!("deltas: {} cases ({controls} controls) in {:?}; {writes} writes recorded, all checked", cases.len(), started.elapsed());
    if let Ok(why) = tokio::time::timeout(Duration::from_millis(50), gateway.failed()).await {
        failures.push(format!("a part of the gateway failed: {why}"));
    }
    gateway.shutdown().await;
    svc.stop().await;
    let _ = std::fs::remove_dir_all(&state);
    report("delta", cases.len(), &failures);
}

// ---------------------------------------------------------------------------
// Configurations

/// A directory the config cases refer to: a directory, a FIFO, a password
/// file too large, an empty one and a good one.
fn fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bad-input-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("a-directory")).expect("fixture dir");
    std::fs::write(dir.join("secret"), "s3cret\n").expect("secret");
    std::fs::write(dir.join("empty-secret"), "").expect("empty secret");
    std::fs::write(dir.join("huge-secret"), vec![b'x'; 70 * 1024]).expect("huge secret");
    let fifo = std::process::Command::new("mkfifo").arg(dir.join("fifo")).status().expect("mkfifo runs");
    assert!(fifo.success(), "mkfifo");
    dir
}

/// Cases of configs.txt: `=== NAME` starts one; its text runs to the next.
fn config_cases(text: &str) -> Vec<(String, usize, String)> {
    let mut out: Vec<(String, usize, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if let Some(name) = line.strip_prefix("=== ") {
            out.push((name.to_string(), n + 1, String::new()));
        } else if let Some((_, _, body)) = out.last_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    out
}

/// The lines of a refusal: the first line of a structural error, or each problem.
fn error_lines(e: &ConfigError) -> Vec<String> {
    match e {
        ConfigError::Structure { message } => vec![message.lines().next().unwrap_or_default().to_string()],
        ConfigError::Invalid { problems } => problems.clone(),
        ConfigError::Read { .. } => vec![e.to_string()],
    }
}

#[test]
fn every_bad_config_is_refused_at_its_line_and_column_with_a_clear_message() {
    let dir = fixtures();
    let file = dir.join("gateway.yaml");
    let prefix = file.display().to_string();
    let all = config_cases(&corpus("configs.txt"));
    assert!(!all.is_empty());
    let mut failures = Vec::new();
    let mut positionless = 0;
    // BAD_INPUT_DUMP=FILE writes every case's refusal, to help write a new case's `#!` lines.
    let mut dump: Vec<(&usize, Vec<String>)> = Vec::new();
    let started = Instant::now();
    for (name, line, body) in &all {
        let label = format!("configs.txt:{line} ({name})");
        let text = expand(body);
        let expected: Vec<(Option<(usize, usize)>, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("#! "))
            .filter(|e| *e != "?")
            .map(|e| {
                let (at, pattern) = e.split_once(' ').unwrap_or_else(|| panic!("{label}: `#! LINE:COL REGEX`"));
                let at = (at != "-").then(|| {
                    let (l, c) = at.split_once(':').unwrap_or_else(|| panic!("{label}: LINE:COL"));
                    (l.parse().expect("a line"), c.parse().expect("a column"))
                });
                (at, pattern.to_string())
            })
            .collect();
        // On a thread of its own, so that a hang (a FIFO read) fails the case, not the run.
        let (tx, rx) = std::sync::mpsc::channel();
        let (text_, file_) = (text.clone(), file.clone());
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(|| Config::parse(&text_, &file_).map(|_| ()));
            let _ = tx.send(outcome);
        });
        let outcome = match rx.recv_timeout(CASE) {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => {
                failures.push(format!("{label}: Config::parse panicked"));
                continue;
            }
            Err(_) => {
                failures.push(format!("{label}: Config::parse did not return within {CASE:?}"));
                continue;
            }
        };
        let Err(e) = outcome else {
            failures.push(format!("{label}: accepted"));
            continue;
        };
        let lines = error_lines(&e);
        dump.push((line, lines.iter().map(|l| l.replace(&prefix, "FILE")).collect::<Vec<_>>()));
        let mut unmatched: Vec<&String> = lines.iter().collect();
        let mut missing = Vec::new();
        for (at, pattern) in &expected {
            let head = match at {
                Some((l, c)) => format!("{prefix}:{l}:{c}: "),
                None => format!("{prefix}: "),
            };
            let found = unmatched.iter().position(|got| got.strip_prefix(&head).is_some_and(|rest| matches(pattern, rest)));
            match found {
                Some(i) => {
                    unmatched.remove(i);
                    positionless += usize::from(at.is_none());
                }
                None => missing.push(format!("{}{pattern}", head.trim_start_matches(&prefix))),
            }
        }
        if expected.is_empty() || !missing.is_empty() || !unmatched.is_empty() {
            let got: Vec<String> = lines.iter().map(|l| l.replace(&prefix, "FILE")).collect();
            failures.push(format!("{label}:\n  expected {missing:?}\n  got {got:#?}"));
        }
    }
    eprintln!("configs: {} cases in {:?} ({positionless} expected problems without a line)", all.len(), started.elapsed());
    if let Some(path) = std::env::var_os("BAD_INPUT_DUMP") {
        let doc: serde_json::Map<String, Json> = dump.into_iter().map(|(l, lines)| (l.to_string(), json!(lines))).collect();
        std::fs::write(path, Json::Object(doc).to_string()).expect("the dump is written");
    }
    let _ = std::fs::remove_dir_all(&dir);
    report("config", all.len(), &failures);
}
