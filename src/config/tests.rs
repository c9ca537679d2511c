//! What a technician meets when editing `gateway.yaml`: the shipped file
//! loads, structural mistakes stop with `FILE:LINE:COL`, and every semantic
//! mistake is reported at once at the line of the offending value.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::point::{Access, DataType, Number, Table, Value};

/// A connection, an RTU and a TCP bus, and a pump profile; devices follow.
const HEAD: &str = "\
connections:
  cloud:
    embedded:
      listen: 127.0.0.1:1883
buses:
  line:
    rtu:
      port: /dev/ttyUSB0
      baud: 9600
  plc:
    tcp:
      host: 10.0.0.5
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint: { holding: 10, type: f32, min: 0, max: 80 }
      deviceData.temperature: { input: 0, type: i16, scale: 0.1 }
";

/// The smallest complete, valid document.
const BASE_DEVICES: &str = "\
devices:
  pump-1:
    bus: line
    unit: 1
    profile: pump
    twin:
      connection: cloud
      commands: pump/cmd
      responses: pump/rsp
      telemetry: pump/tel
";

fn base() -> String {
    format!("{HEAD}{BASE_DEVICES}")
}

/// `HEAD` plus the given `devices:` block body (already indented).
fn with_devices(devices: &str) -> String {
    format!("{HEAD}devices:\n{devices}")
}

/// A device `d` on the RTU bus whose own points are `points`, one per line
/// (written unindented here), plus a read-only filler point far away, so that
/// a refused point does not also leave the device without points.
fn with_points(points: &str) -> String {
    let mut out = format!("{HEAD}devices:\n  d:\n    bus: line\n    unit: 1\n    points:\n");
    for line in points.lines().filter(|l| !l.trim().is_empty()) {
        out.push_str("      ");
        out.push_str(line.trim());
        out.push('\n');
    }
    out.push_str("      zz.filler: { input: 9000 }\n");
    out
}

/// The device's point with this path.
fn point_of<'a>(config: &'a Config, path: &str) -> &'a crate::point::Point {
    config.devices[0].points.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no point {path}"))
}

/// Inserts `extra` right after the first occurrence of `after`.
fn insert_after(text: &str, after: &str, extra: &str) -> String {
    let i = text.find(after).unwrap_or_else(|| panic!("{after:?} not in the document")) + after.len();
    format!("{}{extra}{}", &text[..i], &text[i..])
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, Path::new("gw.yaml"))
}

fn valid(text: &str) -> Config {
    match parse(text) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid configuration, got:\n{e}\n--- document ---\n{text}"),
    }
}

fn problems(text: &str) -> Vec<String> {
    match parse(text) {
        Err(ConfigError::Invalid { problems }) => problems,
        Err(e) => panic!("expected semantic problems, got another error:\n{e}\n--- document ---\n{text}"),
        Ok(_) => panic!("expected semantic problems, but the configuration was accepted\n--- document ---\n{text}"),
    }
}

fn structure(text: &str) -> String {
    match parse(text) {
        Err(ConfigError::Structure { message }) => message,
        Err(e) => panic!("expected a structural error, got another error:\n{e}\n--- document ---\n{text}"),
        Ok(_) => panic!("expected a structural error, but the configuration was accepted\n--- document ---\n{text}"),
    }
}

/// The 1-based line of the only line containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    let hits: Vec<usize> = text.lines().enumerate().filter(|(_, l)| l.contains(needle)).map(|(i, _)| i + 1).collect();
    assert_eq!(hits.len(), 1, "{needle:?} must occur on exactly one line, found on {hits:?}\n{text}");
    hits[0]
}

/// Asserts that one problem sits at `line`, names `path` and contains every
/// word; returns it.
fn expect_problem<'a>(problems: &'a [String], line: usize, path: &str, words: &[&str]) -> &'a str {
    let prefix = format!("gw.yaml:{line}:");
    let named = format!(" {path}: ");
    let found = problems
        .iter()
        .find(|p| p.starts_with(&prefix) && p.contains(&named) && words.iter().all(|w| p.contains(w)));
    match found {
        Some(p) => p,
        None => panic!(
            "no problem at line {line} for `{path}` containing {words:?}; got:\n{}",
            problems.join("\n")
        ),
    }
}

/// Asserts there is exactly one problem, at `line`, for `path`, with `words`.
fn only_problem(text: &str, line: usize, path: &str, words: &[&str]) -> String {
    let ps = problems(text);
    assert_eq!(ps.len(), 1, "expected exactly one problem, got:\n{}", ps.join("\n"));
    expect_problem(&ps, line, path, words).to_string()
}

fn assert_line_col_prefix(message: &str, line: usize) {
    let prefix = format!("gw.yaml:{line}:");
    assert!(message.starts_with(&prefix), "message should start with {prefix:?}:\n{message}");
    let col = message[prefix.len()..].split(':').next().unwrap_or("");
    assert!(col.parse::<usize>().is_ok_and(|c| c > 0), "message should carry a column after the line:\n{message}");
}

// ---------------------------------------------------------------------------
// The shipped file

#[test]
fn the_shipped_gateway_yaml_is_valid_and_describes_the_demo() {
    let config = Config::parse(include_str!("../../gateway.yaml"), Path::new("gateway.yaml"))
        .unwrap_or_else(|e| panic!("the shipped gateway.yaml must load:\n{e}"));
    assert!(config.warnings.is_empty(), "the demo draws no warnings: {:?}", config.warnings);

    assert_eq!(config.connections.len(), 1);
    let local = &config.connections[0];
    assert_eq!(local.name, "local");
    match &local.broker {
        Broker::Embedded { listen, .. } => assert_eq!(listen.to_string(), "127.0.0.1:1883"),
        other => panic!("the demo runs its own broker, got {other:?}"),
    }
    assert!(local.credentials.is_none());

    assert_eq!(config.buses.len(), 1);
    assert_eq!(config.buses[0].transport, Transport::Tcp { host: "127.0.0.1".into(), port: 5020 });
    assert_eq!(config.buses[0].timeout, Duration::from_millis(500));
    assert_eq!(config.buses[0].retries, 1);

    assert_eq!(config.devices.len(), 1);
    let pump = config.device("demo-pump").expect("device demo-pump");
    assert_eq!(pump.unit, 1);
    assert_eq!(pump.bus, 0);
    assert_eq!(pump.poll, Duration::from_secs(1));
    let paths: Vec<&str> = pump.points.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths, [
        "deviceAttrib.mode",
        "deviceAttrib.motorStatus",
        "deviceAttrib.setpoint",
        "deviceData.runHours",
        "deviceData.running",
        "deviceData.temperature",
    ]);
    let point = |p: &str| pump.points.iter().find(|x| x.path == p).unwrap();
    let setpoint = point("deviceAttrib.setpoint");
    assert_eq!((setpoint.location.table, setpoint.location.address), (Table::HoldingRegister, 10));
    assert_eq!((setpoint.data_type, setpoint.min, setpoint.max), (DataType::F32, Some(Number::Int(0)), Some(Number::Int(80))));
    assert_eq!(setpoint.access, Access::ReadWrite);
    let temperature = point("deviceData.temperature");
    assert_eq!((temperature.data_type, temperature.scale, temperature.deadband), (DataType::I16, 0.1, 0.2));
    assert_eq!(temperature.access, Access::Read);
    assert_eq!(point("deviceData.running").location.table, Table::InputRegister);
    assert_eq!(point("deviceData.runHours").data_type, DataType::U32);
    assert_eq!(point("deviceAttrib.motorStatus").location.table, Table::Coil);
    assert_eq!(point("deviceAttrib.mode").labels.len(), 2);

    let twin = pump.twin.as_ref().expect("the pump has a twin");
    assert_eq!(twin.connection, 0);
    assert_eq!(twin.commands.as_deref(), Some("iot/v1/cmd"));
    assert_eq!(twin.responses.as_deref(), Some("iot/v1/rsp"));
    assert_eq!(twin.telemetry.as_deref(), Some("iot/v1/telemetry"));
    assert_eq!(twin.telemetry_interval, Duration::from_secs(5));
    assert!(twin.allow_shutdown);

    assert_eq!(config.simulators.len(), 1);
    let sim = &config.simulators[0];
    assert_eq!(sim.name, "demo-sim");
    assert_eq!(sim.listen.to_string(), "127.0.0.1:5020");
    assert_eq!(sim.devices.len(), 1);
    let served = &sim.devices[0];
    assert_eq!(served.unit, 1);
    assert_eq!(served.points, pump.points);
    let mut initial: Vec<&str> = served.initial.iter().map(|(p, _)| p.as_str()).collect();
    initial.sort_unstable();
    assert_eq!(initial, ["deviceAttrib.setpoint", "deviceData.runHours", "deviceData.temperature"]);
    assert_eq!(served.drift, ["deviceData.temperature"]);
    assert_eq!(served.mirror, [("deviceData.running".to_string(), "deviceAttrib.motorStatus".to_string())]);
}

#[test]
fn the_base_document_of_these_tests_is_valid() {
    let config = valid(&base());
    assert_eq!(config.devices.len(), 1);
    assert_eq!(config.devices[0].points.len(), 3);
    assert_eq!(config.source, Path::new("gw.yaml"));
}

#[test]
fn load_names_a_missing_file() {
    let path = std::env::temp_dir().join(format!("twinbus-no-such-file-{}.yaml", std::process::id()));
    let err = Config::load(&path).expect_err("a missing file cannot load");
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot read"), "{err}");
}

// ---------------------------------------------------------------------------
// Structural errors: serde stops at the first one, with a line and column

#[test]
fn a_yaml_syntax_error_names_file_line_and_column() {
    let text = base().replace("    unit: 1\n", "    unit: 1: 2\n");
    let line = line_of(&text, "unit: 1: 2");
    let message = structure(&text);
    assert_line_col_prefix(&message, line);
}

#[test]
fn a_misspelt_key_is_named_with_its_line_and_the_valid_keys() {
    let text = insert_after(&base(), "      baud: 9600\n", "    tiemout: 2s\n");
    let line = line_of(&text, "tiemout");
    let message = structure(&text);
    assert_line_col_prefix(&message, line);
    assert!(message.contains("tiemout"), "names the unknown key:\n{message}");
    for valid in ["timeout", "retries", "delay", "rtu", "tcp"] {
        assert!(message.contains(valid), "lists the valid key {valid}:\n{message}");
    }
}

#[test]
fn a_word_where_a_number_belongs_is_a_structural_error_at_its_line() {
    let text = base().replace("unit: 1", "unit: one");
    let line = line_of(&text, "unit: one");
    let message = structure(&text);
    assert_line_col_prefix(&message, line);
}

#[test]
fn an_unknown_type_lists_the_valid_types() {
    let text = with_points("x: { holding: 0, type: u17 }");
    let line = line_of(&text, "u17");
    let message = structure(&text);
    assert_line_col_prefix(&message, line);
    assert!(message.contains("u17"), "{message}");
    for t in ["bool", "u16", "i16", "u32", "i32", "f32", "u64", "i64", "f64", "string"] {
        assert!(message.contains(t), "lists the type {t}:\n{message}");
    }
}

#[test]
fn an_unknown_parity_lists_the_valid_parities() {
    let text = insert_after(&base(), "      baud: 9600\n", "      parity: mark\n");
    let line = line_of(&text, "parity: mark");
    let message = structure(&text);
    assert_line_col_prefix(&message, line);
    assert!(message.contains("mark"), "{message}");
    for p in ["none", "even", "odd"] {
        assert!(message.contains(p), "lists the parity {p}:\n{message}");
    }
}

// ---------------------------------------------------------------------------
// Semantic errors: all at once, each at its line, with its dotted path

#[test]
fn three_independent_mistakes_are_reported_together() {
    let text = base()
        .replace("      baud: 9600\n", "      baud: 9600\n    timeout: fast\n")
        .replace("unit: 1", "unit: 0")
        .replace("connection: cloud", "connection: clod");
    let ps = problems(&text);
    assert_eq!(ps.len(), 3, "one line per mistake:\n{}", ps.join("\n"));
    expect_problem(&ps, line_of(&text, "timeout: fast"), "buses.line.timeout", &["fast"]);
    expect_problem(&ps, line_of(&text, "unit: 0"), "devices.pump-1.unit", &["1 to 247"]);
    expect_problem(&ps, line_of(&text, "connection: clod"), "devices.pump-1.twin.connection", &["clod", "cloud"]);

    let shown = parse(&text).unwrap_err().to_string();
    assert!(shown.starts_with("3 problems in the configuration:"), "{shown}");
    assert_eq!(shown.lines().count(), 4, "a header and one line per problem:\n{shown}");
}

#[test]
fn an_unknown_bus_is_refused_and_the_defined_buses_are_listed() {
    let text = base().replace("bus: line", "bus: lien");
    let p = only_problem(&text, line_of(&text, "bus: lien"), "devices.pump-1.bus", &["\"lien\""]);
    assert!(p.contains("defined: line, plc"), "{p}");
}

#[test]
fn an_unknown_profile_is_refused_and_the_defined_profiles_are_listed() {
    let text = base().replace("profile: pump", "profile: pmup");
    let p = only_problem(&text, line_of(&text, "profile: pmup"), "devices.pump-1.profile", &["\"pmup\""]);
    assert!(p.contains("defined: pump"), "{p}");
}

#[test]
fn an_unknown_connection_is_refused_and_the_defined_connections_are_listed() {
    let text = base().replace("connection: cloud", "connection: azure");
    let p = only_problem(&text, line_of(&text, "connection: azure"), "devices.pump-1.twin.connection", &["\"azure\""]);
    assert!(p.contains("defined: cloud"), "{p}");
}

#[test]
fn unit_zero_and_unit_248_are_refused_on_a_serial_line() {
    for unit in [0, 248, 255] {
        let text = base().replace("unit: 1", &format!("unit: {unit}"));
        only_problem(&text, line_of(&text, "unit: "), "devices.pump-1.unit", &[&unit.to_string(), "valid: 1 to 247"]);
    }
}

#[test]
fn units_1_and_247_are_accepted_on_a_serial_line() {
    for unit in [1u8, 247] {
        let config = valid(&base().replace("unit: 1", &format!("unit: {unit}")));
        assert_eq!(config.devices[0].unit, unit);
    }
}

#[test]
fn units_0_and_255_are_accepted_on_a_tcp_bus_but_256_is_not() {
    for unit in [0u8, 255] {
        let config = valid(&base().replace("bus: line", "bus: plc").replace("unit: 1", &format!("unit: {unit}")));
        assert_eq!(config.devices[0].unit, unit);
    }
    let text = base().replace("bus: line", "bus: plc").replace("unit: 1", "unit: 256");
    only_problem(&text, line_of(&text, "unit: 256"), "devices.pump-1.unit", &["valid: 0 to 255"]);
}

#[test]
fn an_address_beyond_65535_is_refused() {
    let text = with_points("x: { holding: 70000 }");
    only_problem(&text, line_of(&text, "70000"), "devices.d.points.x.holding", &["70000", "0 to 65535"]);
}

#[test]
fn a_u32_at_the_last_register_runs_past_the_end() {
    let text = with_points("x: { holding: 65535, type: u32 }");
    only_problem(&text, line_of(&text, "65535"), "devices.d.points.x", &["u32", "65535", "runs past"]);
    // The last register itself is fine for a one-register type.
    valid(&with_points("x: { holding: 65535, type: u16 }"));
    valid(&with_points("x: { holding: 65534, type: u32 }"));
}

#[test]
fn two_writable_points_on_the_same_registers_are_refused() {
    let text = with_points(
        "a: { holding: 10, type: f32 }
         b: { holding: 11, type: u16 }",
    );
    let p = only_problem(&text, line_of(&text, "  d:"), "devices.d", &["overlap", "`a`", "`b`", "10..=11", "11..=11"]);
    assert!(p.contains("access: read"), "suggests the fix: {p}");
}

#[test]
fn a_read_only_view_of_writable_registers_is_accepted() {
    let config = valid(&with_points(
        "a: { holding: 10, type: f32 }
         b: { holding: 11, type: u16, access: read }",
    ));
    assert_eq!(point_of(&config, "b").access, Access::Read);
}

#[test]
fn two_bits_of_one_register_are_accepted_but_the_same_bit_twice_is_not() {
    let config = valid(&with_points(
        "alarm: { holding: 20, bit: 0 }
         ready: { holding: 20, bit: 1 }",
    ));
    assert_eq!((point_of(&config, "alarm").location.bit, point_of(&config, "ready").location.bit), (Some(0), Some(1)));
    assert_eq!((point_of(&config, "alarm").data_type, point_of(&config, "ready").data_type), (DataType::Bool, DataType::Bool));

    let text = with_points(
        "alarm: { holding: 20, bit: 3 }
         again: { holding: 20, bit: 3 }",
    );
    only_problem(&text, line_of(&text, "  d:"), "devices.d", &["overlap"]);
}

#[test]
fn a_bit_and_the_whole_register_both_writable_overlap() {
    let text = with_points(
        "alarm: { holding: 20, bit: 0 }
         word: { holding: 20 }",
    );
    only_problem(&text, line_of(&text, "  d:"), "devices.d", &["overlap"]);
}

#[test]
fn a_coil_and_a_holding_register_with_the_same_address_do_not_overlap() {
    valid(&with_points(
        "a: { coil: 5 }
         b: { holding: 5 }",
    ));
}

#[test]
fn two_devices_with_one_unit_id_on_one_bus_are_refused() {
    let text = with_devices(
        "  a:
    bus: line
    unit: 5
    profile: pump
  b:
    bus: line
    unit: 5
    profile: pump
",
    );
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{}", ps.join("\n"));
    assert!(ps[0].contains(" devices.b.unit: "), "{}", ps[0]);
    assert!(ps[0].contains("unit 5 on bus `line` is already used by device `a`"), "{}", ps[0]);
}

#[test]
fn a_duplicate_unit_is_reported_at_the_line_of_the_unit() {
    let text = with_devices(
        "  a:
    bus: line
    unit: 5
    profile: pump
  b:
    bus: line
    profile: pump
    unit: 5   # the copy
",
    );
    only_problem(&text, line_of(&text, "the copy"), "devices.b.unit", &["already used"]);
}

#[test]
fn one_unit_id_on_two_different_buses_is_accepted() {
    let config = valid(&with_devices(
        "  a:
    bus: line
    unit: 5
    profile: pump
  b:
    bus: plc
    unit: 5
    profile: pump
",
    ));
    assert_eq!(config.devices.len(), 2);
}

#[test]
fn two_devices_publishing_on_one_topic_of_one_connection_are_refused() {
    let text = with_devices(
        "  a:
    bus: line
    unit: 1
    profile: pump
    twin: { connection: cloud, telemetry: site/tel }
  b:
    bus: line
    unit: 2
    profile: pump
    twin: { connection: cloud, telemetry: site/tel }
",
    );
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{}", ps.join("\n"));
    assert!(ps[0].contains(" devices.b.twin.telemetry: "), "{}", ps[0]);
    assert!(ps[0].contains("\"site/tel\" is already used by devices.a.twin.telemetry"), "{}", ps[0]);
}

#[test]
fn a_duplicate_topic_is_reported_at_the_line_of_the_topic() {
    let text = with_devices(
        "  a:
    bus: line
    unit: 1
    profile: pump
    twin: { connection: cloud, telemetry: site/tel }
  b:
    bus: line
    unit: 2
    profile: pump
    twin:
      connection: cloud
      telemetry: site/tel   # the copy
",
    );
    only_problem(&text, line_of(&text, "the copy"), "devices.b.twin.telemetry", &["already used"]);
}

#[test]
fn one_device_answering_on_its_own_commands_topic_is_refused() {
    let text = base().replace("responses: pump/rsp", "responses: pump/cmd");
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{}", ps.join("\n"));
    assert!(ps[0].contains("devices.pump-1.twin.responses"), "{}", ps[0]);
}

#[test]
fn a_commands_topic_without_a_responses_topic_is_refused() {
    let text = base().replace("      responses: pump/rsp\n", "");
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{}", ps.join("\n"));
    let p = &ps[0];
    assert!(p.contains(" devices.pump-1.twin.responses: "), "{p}");
    assert!(p.contains("`responses` topic"), "{p}");
    // Reported inside the twin block.
    let line: usize = p.split(':').nth(1).and_then(|l| l.parse().ok()).expect("a line number");
    assert!((line_of(&text, "twin:")..=line_of(&text, "telemetry: pump/tel")).contains(&line), "{p}");
}

#[test]
fn a_wildcard_topic_is_refused() {
    let text = base().replace("telemetry: pump/tel", "telemetry: pump/#");
    only_problem(&text, line_of(&text, "pump/#"), "devices.pump-1.twin.telemetry", &["wildcards"]);
}

#[test]
fn a_max_that_a_u16_cannot_hold_is_refused() {
    let text = with_points("x: { holding: 0, max: 70000 }");
    only_problem(&text, line_of(&text, "70000"), "devices.d.points.x.max", &["70000", "u16"]);
}

#[test]
fn a_min_above_the_max_is_refused() {
    let text = with_points("x: { holding: 0, type: f32, min: 50, max: 10 }");
    only_problem(&text, line_of(&text, "min: 50"), "devices.d.points.x.min", &["50 is above max 10"]);
}

#[test]
fn a_u64_maximum_above_2_pow_53_is_kept_exactly_as_written() {
    // 2^53 + 3 has no f64 of its own: read as a float it would become 2^53 + 4.
    let config = valid(&with_points("x: { holding: 0, type: u64, max: 9007199254740995 }"));
    let x = point_of(&config, "x");
    assert!(x.encode(&Value::Int(9_007_199_254_740_995)).is_ok());
    let reason = x.encode(&Value::Int(9_007_199_254_740_996)).expect_err("above the maximum");
    assert!(reason.contains("above the maximum 9007199254740995"), "{reason}");
}

#[test]
fn a_maximum_between_two_scale_steps_is_refused_with_the_steps_around_it() {
    let text = with_points("x: { holding: 0, type: u32, scale: 0.01, max: 10000.006 }");
    let words = ["10000.006 is between two steps of 0.01: nearest valid values 10000 and 10000.01"];
    only_problem(&text, line_of(&text, "10000.006"), "devices.d.points.x.max", &words);
}

#[test]
fn a_fractional_maximum_on_an_unscaled_integer_point_names_the_whole_numbers_around_it() {
    let text = with_points("x: { holding: 0, max: 1.5 }");
    only_problem(&text, line_of(&text, "1.5"), "devices.d.points.x.max", &["1.5 is not a whole number", "nearest valid values 1 and 2"]);
}

#[test]
fn a_whole_float_limit_beyond_2_pow_53_is_refused_in_favour_of_an_integer() {
    // 1.8e19 may be the float of many integers: the limit must say which one.
    let text = with_points("x: { holding: 0, type: u64, max: 1.8e19 }");
    only_problem(&text, line_of(&text, "1.8e19"), "devices.d.points.x.max", &["18000000000000000000", "as an integer"]);
}

#[test]
fn an_f32_limit_that_an_f32_cannot_hold_is_refused_with_what_it_would_read_back_as() {
    let text = with_points("x: { holding: 0, type: f32, max: 0.123456789 }");
    only_problem(&text, line_of(&text, "0.123456789"), "devices.d.points.x.max", &["0.12345679"]);
}

#[test]
fn an_allowed_value_outside_min_and_max_is_refused_at_its_own_column() {
    let text = with_points("x: { holding: 0, min: 10, max: 100, allowed: [10, 200, 1.5] }");
    let ps = problems(&text);
    assert_eq!(ps.len(), 2, "{}", ps.join("\n"));
    let line = line_of(&text, "allowed");
    let column = |needle: &str| text.lines().nth(line - 1).and_then(|l| l.find(needle)).map(|c| c + 1);
    let above = expect_problem(&ps, line, "devices.d.points.x.allowed", &["200 is above the maximum 100"]);
    assert!(above.starts_with(&format!("gw.yaml:{line}:{}:", column("200").unwrap_or(0))), "{above}");
    let fraction = expect_problem(&ps, line, "devices.d.points.x.allowed", &["1.5 is not a whole number"]);
    assert!(fraction.starts_with(&format!("gw.yaml:{line}:{}:", column("1.5").unwrap_or(0))), "{fraction}");
}

#[test]
fn a_limit_that_is_not_a_number_is_a_structural_error() {
    let message = structure(&with_points("x: { holding: 0, max: high }"));
    assert!(message.contains("a number"), "{message}");
}

#[test]
fn limits_on_a_labelled_point_are_refused() {
    let text = with_points("x: { holding: 0, values: { auto: 0, manual: 1 }, max: 1 }");
    only_problem(&text, line_of(&text, "manual"), "devices.d.points.x", &["numeric"]);
}

#[test]
fn a_trigger_point_is_marked_and_other_points_are_not() {
    let config = valid(&with_points("reset: { holding: 20, trigger: true }\nstart: { coil: 3, trigger: false }\nspeed: { holding: 21 }"));
    assert!(point_of(&config, "reset").trigger);
    assert!(!point_of(&config, "start").trigger);
    assert!(!point_of(&config, "speed").trigger, "off by default");
}

#[test]
fn a_trigger_on_a_point_that_is_never_written_is_refused() {
    let text = with_points("count: { input: 3, trigger: true }");
    only_problem(&text, line_of(&text, "trigger"), "devices.d.points.count.trigger", &["written", "read-only"]);
    let text = with_points("count: { holding: 3, access: read, trigger: true }");
    only_problem(&text, line_of(&text, "trigger"), "devices.d.points.count.trigger", &["written"]);
}

#[test]
fn a_trigger_that_is_not_a_boolean_is_a_structural_error() {
    let message = structure(&with_points("reset: { holding: 20, trigger: yes please }"));
    assert!(message.contains("trigger") || message.contains("bool"), "{message}");
}

#[test]
fn bit_16_is_refused() {
    let text = with_points("x: { holding: 0, bit: 16 }");
    only_problem(&text, line_of(&text, "bit: 16"), "devices.d.points.x.bit", &["16", "0 to 15"]);
}

#[test]
fn a_bit_of_a_coil_is_refused() {
    let text = with_points("x: { coil: 0, bit: 1 }");
    only_problem(&text, line_of(&text, "bit: 1"), "devices.d.points.x.bit", &["already one bit"]);
}

#[test]
fn a_string_without_a_length_is_refused() {
    let text = with_points("serial: { holding: 0, type: string }");
    only_problem(&text, line_of(&text, "serial"), "devices.d.points.serial.length", &["needs `length`"]);
    let config = valid(&with_points("serial: { holding: 0, type: string, length: 10 }"));
    assert_eq!(point_of(&config, "serial").data_type, DataType::String { len: 10 });
}

#[test]
fn writing_an_input_register_is_refused() {
    let text = with_points("x: { input: 0, access: read-write }");
    only_problem(&text, line_of(&text, "read-write"), "devices.d.points.x.access", &["cannot be written"]);
    let text = with_points("x: { discrete: 0, access: write }");
    only_problem(&text, line_of(&text, "access: write"), "devices.d.points.x.access", &["cannot be written"]);
}

#[test]
fn a_zero_scale_is_refused() {
    let text = with_points("x: { holding: 0, scale: 0 }");
    only_problem(&text, line_of(&text, "scale: 0 }"), "devices.d.points.x.scale", &["not a usable scale"]);
}

#[test]
fn labels_on_a_float_are_refused() {
    let text = with_points("x: { holding: 0, type: f32, values: { low: 0, high: 1 } }");
    let ps = problems(&text);
    expect_problem(&ps, line_of(&text, "low: 0"), "devices.d.points.x.values", &["enum labels apply to bool and unscaled integer"]);
}

#[test]
fn a_label_or_an_initial_value_of_the_wrong_kind_says_what_would_be_valid() {
    // Not "data did not match any variant of untagged enum RawLabel" (found
    // by the bad-input corpus).
    let text = with_points(r#"x: { holding: 0, values: { on: "1" } }"#);
    let message = structure(&text);
    assert_line_col_prefix(&message, line_of(&text, r#"on: "1""#));
    assert!(message.contains(r#"invalid type: string "1", expected true, false or a whole number"#), "{message}");
    let text = format!("{}simulators:\n  sim: {{ listen: 127.0.0.1:5020, serves: [pump-1], initial: {{ deviceAttrib.setpoint: [1] }} }}\n", base());
    let message = structure(&text);
    assert!(message.contains("invalid type: sequence, expected a point's value: true, false, a number or a string"), "{message}");
}

#[test]
fn labels_where_none_apply_are_one_problem_not_one_per_label() {
    // Each label used to be refused again by the codec, for a float with an
    // "internal: cannot encode Int(0) as f32" (found by the bad-input corpus).
    for point in [
        "x: { holding: 0, type: f32, values: { low: 0, high: 1 } }",
        "x: { holding: 0, type: string, length: 4, values: { low: 0, high: 1 } }",
        "x: { holding: 0, scale: 0.1, values: { low: 0, high: 1 } }",
    ] {
        let text = with_points(point);
        only_problem(&text, line_of(&text, "low: 0"), "devices.d.points.x.values", &["enum labels apply to bool and unscaled integer"]);
    }
}

#[test]
fn a_label_worth_2_on_a_coil_is_refused() {
    let text = with_points("x: { coil: 0, values: { on: 1, off: 0, broken: 2 } }");
    only_problem(&text, line_of(&text, "broken"), "devices.d.points.x.values.broken", &["2"]);
}

#[test]
fn two_labels_with_the_same_device_value_are_refused() {
    let text = with_points("x: { holding: 0, values: { auto: 0, manual: 1, hand: 1 } }");
    // Labels are checked in name order: `hand` comes first, `manual` repeats its value.
    let p = only_problem(&text, line_of(&text, "hand"), "devices.d.points.x.values.manual", &["same device value 1"]);
    assert!(p.contains("hand") && p.contains("manual"), "names both labels: {p}");
}

#[test]
fn a_point_under_a_reserved_root_is_refused() {
    for root in ["time", "online", "status", "values", "errors", "id", "error"] {
        let text = with_points(&format!("{root}.x: {{ holding: 0 }}"));
        only_problem(&text, line_of(&text, &format!("{root}.x")), &format!("devices.d.points.{root}.x"), &["reserved"]);
    }
    // A root that merely starts like a reserved word is fine.
    valid(&with_points("timer.x: { holding: 0 }"));
}

#[test]
fn a_point_inside_another_point_is_refused() {
    let text = with_points(
        "a.b: { holding: 0 }
         a.b.c: { holding: 1 }",
    );
    only_problem(&text, line_of(&text, "a.b.c:"), "devices.d.points.a.b.c", &["inside point `a.b`"]);
}

#[test]
fn a_device_point_inside_a_profile_point_is_refused() {
    // The profile has deviceAttrib.setpoint; the device adds deviceAttrib.setpoint.high:
    // no JSON document can hold both.
    let text = with_devices(
        "  d:
    bus: line
    unit: 1
    profile: pump
    points:
      deviceAttrib.setpoint.high: { holding: 30, access: read }
",
    );
    let ps = problems(&text);
    expect_problem(&ps, line_of(&text, "setpoint.high"), "devices.d.points.deviceAttrib.setpoint.high", &["inside point"]);
}

#[test]
fn a_device_point_with_the_path_of_a_profile_point_is_refused() {
    let text = with_devices(
        "  d:
    bus: line
    unit: 1
    profile: pump
    points:
      deviceAttrib.setpoint: { holding: 30, access: read }
",
    );
    let ps = problems(&text);
    assert!(ps.iter().any(|p| p.contains("devices.d.points.deviceAttrib.setpoint") && p.contains("also defined by the profile")), "{}", ps.join("\n"));
}

#[test]
fn a_malformed_point_path_is_refused() {
    for bad in ["\"a..b\"", "\"a b\"", "\".a\""] {
        let text = with_points(&format!("{bad}: {{ holding: 0 }}"));
        let ps = problems(&text);
        assert!(ps.iter().any(|p| p.contains("is not a point path")), "{bad}: {}", ps.join("\n"));
    }
}

#[test]
fn a_point_in_two_tables_or_none_is_refused() {
    let text = with_points("x: { holding: 0, coil: 0 }");
    only_problem(&text, line_of(&text, "      x: {"), "devices.d.points.x", &["more than one"]);
    let text = with_points("x: { type: u16 }");
    only_problem(&text, line_of(&text, "      x: {"), "devices.d.points.x", &["needs its location"]);
}

#[test]
fn a_device_without_points_is_refused() {
    let text = with_devices("  d:\n    bus: line\n    unit: 1\n");
    only_problem(&text, line_of(&text, "  d:"), "devices.d", &["no points"]);
}

#[test]
fn a_file_without_devices_is_refused() {
    let ps = problems(HEAD);
    assert!(ps.iter().any(|p| p.contains("no device is configured")), "{}", ps.join("\n"));
}

#[test]
fn two_buses_on_one_serial_port_are_refused() {
    let text = insert_after(&base(), "buses:\n", "  again:\n    rtu:\n      port: /dev/ttyUSB0\n");
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{}", ps.join("\n"));
    // Buses are checked in name order: `again` comes first, so `line` is the duplicate.
    expect_problem(&ps, line_of(&text, "  line:"), "buses.line", &["serial port /dev/ttyUSB0", "`again`"]);
}

#[test]
fn two_buses_on_one_tcp_endpoint_are_refused() {
    let text = insert_after(&base(), "buses:\n", "  twin-plc:\n    tcp: { host: 10.0.0.5, port: 502 }\n");
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{}", ps.join("\n"));
    assert!(ps[0].contains("TCP endpoint 10.0.0.5:502"), "{}", ps[0]);
}

#[test]
fn a_bus_with_both_or_neither_transport_is_refused() {
    let text = insert_after(&base(), "      host: 10.0.0.5\n", "    rtu: { port: /dev/ttyS9 }\n");
    only_problem(&text, line_of(&text, "  plc:"), "buses.plc", &["more than one of `rtu`, `tcp` and `rtu_tcp`"]);
    let text = insert_after(&base(), "buses:\n", "  empty:\n    retries: 2\n");
    only_problem(&text, line_of(&text, "  empty:"), "buses.empty", &["needs `rtu:"]);
}

#[test]
fn a_duration_that_is_not_a_duration_is_refused_with_a_hint() {
    let text = insert_after(&base(), "      baud: 9600\n", "    timeout: fast\n");
    only_problem(&text, line_of(&text, "timeout: fast"), "buses.line.timeout", &["\"fast\" is not a duration", "300ms"]);
}

#[test]
fn a_too_short_poll_is_refused() {
    let text = base().replace("    profile: pump\n", "    profile: pump\n    poll: 1ms\n");
    only_problem(&text, line_of(&text, "poll: 1ms"), "devices.pump-1.poll", &["too short", "10ms"]);
}

#[test]
fn serial_settings_outside_their_ranges_are_refused() {
    let text = base().replace("baud: 9600", "baud: 9600\n      data_bits: 9\n      stop_bits: 3");
    let ps = problems(&text);
    // The refused bus is gone, so its device reports a missing bus as well.
    assert_eq!(ps.iter().filter(|p| p.contains(" buses.line.")).count(), 2, "{}", ps.join("\n"));
    expect_problem(&ps, line_of(&text, "data_bits"), "buses.line.rtu.data_bits", &["7 to 8"]);
    expect_problem(&ps, line_of(&text, "stop_bits"), "buses.line.rtu.stop_bits", &["1 to 2"]);
}

#[test]
fn a_bad_serial_setting_does_not_hide_the_rest_of_the_bus() {
    // An invalid baud used to end the bus's checks: its retries and timeout
    // went unchecked until the baud was fixed (found by the bad-input corpus).
    let text = base().replace("      baud: 9600\n", "      baud: 0\n    retries: 99\n    timeout: 1ms\n");
    let ps = problems(&text);
    expect_problem(&ps, line_of(&text, "baud: 0"), "buses.line.rtu.baud", &["300 to 4000000"]);
    expect_problem(&ps, line_of(&text, "retries: 99"), "buses.line.retries", &["0 to 10"]);
    expect_problem(&ps, line_of(&text, "timeout: 1ms"), "buses.line.timeout", &["too short"]);
}

#[test]
fn an_ftp_url_is_refused() {
    let text = insert_after(&base(), "connections:\n", "  remote:\n    url: ftp://x\n");
    only_problem(&text, line_of(&text, "ftp://x"), "connections.remote.url", &["unknown scheme \"ftp\"", "mqtt, mqtts"]);
}

#[test]
fn a_url_without_a_scheme_or_with_a_bad_port_is_refused() {
    let text = insert_after(&base(), "connections:\n", "  remote:\n    url: broker.example.com\n");
    only_problem(&text, line_of(&text, "broker.example.com"), "connections.remote.url", &["not a URL"]);
    let text = insert_after(&base(), "connections:\n", "  remote:\n    url: mqtt://broker:0\n");
    only_problem(&text, line_of(&text, "broker:0"), "connections.remote.url", &["not a port"]);
}

#[test]
fn a_host_with_a_space_or_a_control_character_is_refused() {
    // Accepted before, to fail only at run time (found by the bad-input corpus).
    let text = base().replace("host: 10.0.0.5", "host: \"10.0.0.5\\a\"");
    only_problem(&text, line_of(&text, "10.0.0.5"), "buses.plc.tcp.host", &[r#""10.0.0.5\u{7}" is not a host name or address"#]);
    let text = base().replace("host: 10.0.0.5", "host: plc 7");
    only_problem(&text, line_of(&text, "plc 7"), "buses.plc.tcp.host", &["has a space or a control character"]);
    let text = insert_after(&base(), "connections:\n", "  remote:\n    url: \"mqtt://broker\\n.example.com\"\n");
    only_problem(&text, line_of(&text, "mqtt://broker"), "connections.remote.url", &["the host has a space or a control character"]);
}

#[test]
fn remote_urls_give_host_port_and_tls() {
    let text = insert_after(
        &base(),
        "connections:\n",
        "  plain:\n    url: mqtt://broker.example.com\n  secure:\n    url: mqtts://broker.example.com\n  v6:\n    url: mqtt://[::1]:1884\n",
    );
    let config = valid(&text);
    let broker = |name: &str| config.connections.iter().find(|c| c.name == name).unwrap().broker.clone();
    match broker("plain") {
        Broker::Remote { host, port, tls, .. } => assert_eq!((host.as_str(), port, tls.is_none()), ("broker.example.com", 1883, true)),
        other => panic!("{other:?}"),
    }
    match broker("secure") {
        Broker::Remote { host, port, tls, .. } => assert_eq!((host.as_str(), port, tls.is_some()), ("broker.example.com", 8883, true)),
        other => panic!("{other:?}"),
    }
    match broker("v6") {
        Broker::Remote { host, port, .. } => assert_eq!((host.as_str(), port), ("::1", 1884)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_ipv6_url_without_a_port_uses_the_default_port() {
    let text = insert_after(&base(), "connections:\n", "  v6:\n    url: mqtt://[::1]\n");
    let config = valid(&text);
    let v6 = config.connections.iter().find(|c| c.name == "v6").unwrap();
    match &v6.broker {
        Broker::Remote { host, port, .. } => assert_eq!((host.as_str(), *port), ("::1", 1883)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn credentials_inside_the_url_are_refused() {
    let var = "TWINBUS_TEST_PW_IN_URL";
    std::env::set_var(var, "url-secret-42");
    let text = insert_after(&base(), "connections:\n", &format!("  remote:\n    url: mqtt://gw:${{{var}}}@broker:1883\n"));
    let result = parse(&text);
    std::env::remove_var(var);
    match result {
        Ok(config) => panic!("user info in the URL was accepted; Debug shows: {config:?}"),
        Err(e) => {
            assert!(!e.to_string().contains("url-secret-42"), "the message must not show the password: {e}");
            assert!(e.to_string().contains("username"), "points to `username`/`password`: {e}");
        }
    }
}

#[test]
fn a_keep_alive_below_5_seconds_is_refused() {
    let text = insert_after(&base(), "      listen: 127.0.0.1:1883\n", "    keep_alive: 1s\n");
    only_problem(&text, line_of(&text, "keep_alive"), "connections.cloud.keep_alive", &["too short"]);
}

#[test]
fn a_keep_alive_beyond_the_mqtt_limit_is_refused() {
    let text = insert_after(&base(), "      listen: 127.0.0.1:1883\n", "    keep_alive: 1day\n");
    only_problem(&text, line_of(&text, "keep_alive"), "connections.cloud.keep_alive", &["65535"]);
}

#[test]
fn an_empty_host_or_serial_port_is_refused() {
    let text = base().replace("host: 10.0.0.5", "host: \"\"");
    only_problem(&text, line_of(&text, "host: \"\""), "buses.plc.tcp.host", &[]);
    let text = base().replace("port: /dev/ttyUSB0", "port: \"\"");
    only_problem(&text, line_of(&text, "port: \"\""), "buses.line.rtu.port", &[]);
}

#[test]
fn a_connection_with_both_embedded_and_url_is_refused() {
    let text = insert_after(&base(), "connections:\n", "  both:\n    embedded: { listen: 127.0.0.1:1884 }\n    url: mqtt://broker:1883\n");
    only_problem(&text, line_of(&text, "  both:"), "connections.both", &["both `embedded` and `url`"]);
}

#[test]
fn a_connection_with_neither_embedded_nor_url_is_refused() {
    let text = insert_after(&base(), "connections:\n", "  nowhere:\n    client_id: gw\n");
    only_problem(&text, line_of(&text, "  nowhere:"), "connections.nowhere", &["needs `url:"]);
}

#[test]
fn tls_settings_on_a_plain_mqtt_url_are_refused() {
    let text = insert_after(&base(), "connections:\n", "  remote:\n    url: mqtt://broker\n    tls:\n      alpn: [x]\n");
    let ps = problems(&text);
    assert_eq!(ps.len(), 1, "{}", ps.join("\n"));
    assert!(ps[0].contains("connections.remote.url") && ps[0].contains("mqtts://"), "{}", ps[0]);
}

#[test]
fn a_missing_ca_file_is_refused() {
    let text = insert_after(&base(), "connections:\n", "  remote:\n    url: mqtts://broker\n    tls:\n      ca: /nonexistent/twinbus-ca.pem\n");
    only_problem(&text, line_of(&text, "twinbus-ca.pem"), "connections.remote.url.tls.ca", &["does not exist"]);
}

#[test]
fn a_simulator_serving_an_unknown_device_is_refused() {
    let text = format!("{}simulators:\n  sim:\n    listen: 127.0.0.1:5020\n    serves: [pump-1, pump-9]\n", base());
    only_problem(&text, line_of(&text, "serves:"), "simulators.sim.serves", &["no device named \"pump-9\""]);
}

#[test]
fn a_simulator_initial_value_that_does_not_fit_is_refused() {
    let text = format!(
        "{}simulators:\n  sim:\n    listen: 127.0.0.1:5020\n    serves: [pump-1]\n    initial: {{ deviceAttrib.motorStatus: maybe }}\n",
        base()
    );
    only_problem(&text, line_of(&text, "maybe"), "simulators.sim.initial.deviceAttrib.motorStatus", &["maybe"]);
}

#[test]
fn a_point_written_twice_is_a_structural_error() {
    let text = with_points(
        "x: { holding: 0 }
         x: { holding: 1 }",
    );
    let message = structure(&text);
    let first = line_of(&text, "x: { holding: 0 }");
    let second = line_of(&text, "x: { holding: 1 }");
    assert!(
        message.starts_with(&format!("gw.yaml:{first}:")) || message.starts_with(&format!("gw.yaml:{second}:")),
        "points at one of the two keys:\n{message}"
    );
    assert!(message.to_lowercase().contains("duplicate"), "{message}");
}

// ---------------------------------------------------------------------------
// Secrets

fn with_secure_connection(password_lines: &str) -> String {
    insert_after(
        &base(),
        "connections:\n",
        &format!("  secure:\n    url: mqtts://broker.example.com:8883\n    username: gw\n{password_lines}"),
    )
}

fn secure(config: &Config) -> &Credentials {
    let c = config.connections.iter().find(|c| c.name == "secure").expect("connection `secure`");
    c.credentials.as_ref().expect("credentials")
}

#[test]
fn a_password_from_the_environment_is_used() {
    let var = "TWINBUS_TEST_PW_FROM_ENV";
    std::env::set_var(var, "env-secret-1");
    let result = parse(&with_secure_connection(&format!("    password: ${{{var}}}\n")));
    std::env::remove_var(var);
    let config = result.unwrap_or_else(|e| panic!("{e}"));
    let creds = secure(&config);
    assert_eq!(creds.username, "gw");
    assert_eq!(creds.password.expose(), "env-secret-1");
    assert!(config.warnings.is_empty(), "an environment password draws no warning: {:?}", config.warnings);
}

#[test]
fn variables_may_sit_inside_other_text() {
    let var = "TWINBUS_TEST_PW_INSIDE";
    std::env::set_var(var, "middle");
    let result = parse(&with_secure_connection(&format!("    password: pre-${{{var}}}-post\n")));
    std::env::remove_var(var);
    assert_eq!(secure(&result.unwrap_or_else(|e| panic!("{e}"))).password.expose(), "pre-middle-post");
}

#[test]
fn an_unset_variable_is_an_error_that_names_it() {
    let var = "TWINBUS_TEST_PW_NEVER_SET_7F3A";
    std::env::remove_var(var);
    let text = with_secure_connection(&format!("    password: ${{{var}}}\n"));
    only_problem(&text, line_of(&text, var), "connections.secure.password", &[var, "not set"]);
}

#[test]
fn an_unclosed_variable_is_an_error() {
    let text = with_secure_connection("    password: ${TWINBUS_OOPS\n");
    only_problem(&text, line_of(&text, "OOPS"), "connections.secure.password", &["unclosed"]);
}

#[test]
fn a_doubled_dollar_writes_a_literal_dollar_brace() {
    let config = valid(&with_secure_connection("    password: a$${NOT_A_VAR}b$c\n"));
    assert_eq!(secure(&config).password.expose(), "a${NOT_A_VAR}b$c");
}

#[test]
fn variables_work_in_bus_settings_too() {
    let var = "TWINBUS_TEST_SERIAL_PORT";
    std::env::set_var(var, "/dev/ttyAMA0");
    let result = parse(&base().replace("port: /dev/ttyUSB0", &format!("port: ${{{var}}}")));
    std::env::remove_var(var);
    let config = result.unwrap_or_else(|e| panic!("{e}"));
    match &config.buses.iter().find(|b| b.name == "line").unwrap().transport {
        Transport::Rtu(s) => assert_eq!(s.port, "/dev/ttyAMA0"),
        other => panic!("{other:?}"),
    }
}

fn temp_file(tag: &str, contents: &str) -> std::path::PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let path = std::env::temp_dir().join(format!("twinbus-test-{tag}-{}-{nanos}", std::process::id()));
    std::fs::write(&path, contents).expect("write a temp file");
    path
}

#[test]
fn a_password_file_is_read_and_its_trailing_newline_trimmed() {
    let file = temp_file("pw", "file-secret-2\n");
    let result = parse(&with_secure_connection(&format!("    password_file: {}\n", file.display())));
    std::fs::remove_file(&file).ok();
    let config = result.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(secure(&config).password.expose(), "file-secret-2");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn a_password_file_with_windows_line_ending_is_trimmed_but_inner_spaces_kept() {
    let file = temp_file("pw-crlf", "two words \r\n");
    let result = parse(&with_secure_connection(&format!("    password_file: {}\n", file.display())));
    std::fs::remove_file(&file).ok();
    assert_eq!(secure(&result.unwrap_or_else(|e| panic!("{e}"))).password.expose(), "two words ");
}

#[test]
fn a_missing_password_file_is_an_error_at_its_line() {
    let text = with_secure_connection("    password_file: /nonexistent/twinbus-pw\n");
    only_problem(&text, line_of(&text, "password_file"), "connections.secure.password_file", &["cannot read", "/nonexistent/twinbus-pw"]);
}

#[test]
fn password_and_password_file_together_are_refused() {
    let text = with_secure_connection("    password: x\n    password_file: /nonexistent/pw\n");
    only_problem(&text, line_of(&text, "password: x"), "connections.secure.password", &["choose one"]);
}

#[test]
fn a_password_without_a_username_is_refused() {
    let text = insert_after(&base(), "connections:\n", "  secure:\n    url: mqtts://broker\n    password: x\n");
    only_problem(&text, line_of(&text, "  secure:"), "connections.secure.username", &["no `username`"]);
}

#[test]
fn an_inline_password_works_but_draws_a_warning() {
    let text = with_secure_connection("    password: hunter2-inline\n");
    let config = valid(&text);
    assert_eq!(secure(&config).password.expose(), "hunter2-inline");
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    let w = &config.warnings[0];
    assert!(w.starts_with(&format!("gw.yaml:{}:", line_of(&text, "hunter2"))), "{w}");
    assert!(w.contains("connections.secure.password") && w.contains("inline"), "{w}");
    assert!(!w.contains("hunter2"), "the warning does not repeat the password: {w}");
}

#[test]
fn an_inline_password_with_an_escaped_dollar_still_draws_a_warning() {
    let config = valid(&with_secure_connection("    password: pa$${ss\n"));
    assert_eq!(secure(&config).password.expose(), "pa${ss");
    assert_eq!(config.warnings.len(), 1, "the password is still inline: {:?}", config.warnings);
}

#[test]
fn debug_output_never_shows_a_password() {
    let var = "TWINBUS_TEST_PW_DEBUG";
    std::env::set_var(var, "env-secret-debug");
    let file = temp_file("pw-debug", "file-secret-debug\n");
    let text = insert_after(
        &base(),
        "connections:\n",
        &format!(
            "  a:\n    url: mqtts://a.example.com\n    username: ua\n    password: inline-secret-debug\n\
             \x20 b:\n    url: mqtts://b.example.com\n    username: ub\n    password: ${{{var}}}\n\
             \x20 c:\n    url: mqtts://c.example.com\n    username: uc\n    password_file: {}\n",
            file.display()
        ),
    );
    let result = parse(&text);
    std::env::remove_var(var);
    std::fs::remove_file(&file).ok();
    let config = result.unwrap_or_else(|e| panic!("{e}"));
    let shown = format!("{config:?} {config:#?}");
    for secret in ["inline-secret-debug", "env-secret-debug", "file-secret-debug"] {
        assert!(!shown.contains(secret), "Debug shows {secret}");
    }
    assert!(shown.contains("***"), "passwords print as ***");
    assert!(shown.contains("ua") && shown.contains("ub") && shown.contains("uc"), "user names are not secret");
    assert_eq!(format!("{:?}", secure_named(&config, "b").password), "***");
}

fn secure_named<'a>(config: &'a Config, name: &str) -> &'a Credentials {
    config.connections.iter().find(|c| c.name == name).and_then(|c| c.credentials.as_ref()).expect("credentials")
}

// ---------------------------------------------------------------------------
// Defaults

#[test]
fn bus_defaults_are_one_retry_and_a_500ms_timeout() {
    let config = valid(&base());
    for bus in &config.buses {
        assert_eq!(bus.retries, 1, "{}", bus.name);
        assert_eq!(bus.timeout, Duration::from_millis(500), "{}", bus.name);
    }
}

#[test]
fn an_rtu_bus_defaults_to_9600_8e1_with_an_inter_frame_gap() {
    let config = valid(&base().replace("      baud: 9600\n", ""));
    let line = config.buses.iter().find(|b| b.name == "line").unwrap();
    assert_eq!(
        line.transport,
        Transport::Rtu(SerialSettings { port: "/dev/ttyUSB0".into(), baud: 9600, parity: Parity::Even, data_bits: 8, stop_bits: 1 })
    );
    // 3.5 characters of 11 bits at 9600 baud.
    assert_eq!(line.delay, Duration::from_micros(4010));
}

#[test]
fn a_fast_rtu_bus_keeps_the_fixed_1750_microsecond_gap() {
    let config = valid(&base().replace("baud: 9600", "baud: 115200"));
    let line = config.buses.iter().find(|b| b.name == "line").unwrap();
    assert_eq!(line.delay, Duration::from_micros(1750));
}

#[test]
fn explicit_serial_settings_and_delay_are_kept() {
    let config = valid(&base().replace(
        "      baud: 9600\n",
        "      baud: 19200\n      parity: none\n      stop_bits: 2\n      data_bits: 7\n    delay: 20ms\n    retries: 0\n    timeout: 2s\n",
    ));
    let line = config.buses.iter().find(|b| b.name == "line").unwrap();
    assert_eq!(
        line.transport,
        Transport::Rtu(SerialSettings { port: "/dev/ttyUSB0".into(), baud: 19200, parity: Parity::None, data_bits: 7, stop_bits: 2 })
    );
    assert_eq!((line.delay, line.retries, line.timeout), (Duration::from_millis(20), 0, Duration::from_secs(2)));
}

#[test]
fn a_tcp_bus_defaults_to_port_502_and_no_gap() {
    let config = valid(&base());
    let plc = config.buses.iter().find(|b| b.name == "plc").unwrap();
    assert_eq!(plc.transport, Transport::Tcp { host: "10.0.0.5".into(), port: 502 });
    assert_eq!(plc.delay, Duration::ZERO);
}

#[test]
fn device_twin_and_connection_defaults() {
    let config = valid(&base());
    let d = &config.devices[0];
    assert_eq!(d.poll, Duration::from_secs(1));
    assert_eq!(d.read, ReadLimits { max_registers: 125, max_bits: 2000, max_gap: 0 });
    let t = d.twin.as_ref().unwrap();
    assert_eq!(t.telemetry_interval, Duration::from_secs(10));
    assert!(t.report_on_change);
    assert!(!t.acknowledge);
    assert!(!t.allow_shutdown, "remote shutdown is off unless asked for");
    let c = &config.connections[0];
    assert!(c.client_id.starts_with("twinbus-") && c.client_id.ends_with("-cloud"), "{}", c.client_id);
    assert!(c.client_id.len() <= 128);
    assert_eq!(c.keep_alive, Duration::from_secs(30));
}

#[test]
fn point_defaults_follow_the_table() {
    let config = valid(&with_points(
        "c: { coil: 0 }
         di: { discrete: 0 }
         ir: { input: 0 }
         hr: { holding: 0 }",
    ));
    let p = |name: &str| point_of(&config, name).clone();
    assert_eq!((p("c").data_type, p("c").access), (DataType::Bool, Access::ReadWrite));
    assert_eq!((p("di").data_type, p("di").access), (DataType::Bool, Access::Read));
    assert_eq!((p("ir").data_type, p("ir").access), (DataType::U16, Access::Read));
    assert_eq!((p("hr").data_type, p("hr").access), (DataType::U16, Access::ReadWrite));
    assert_eq!((p("hr").scale, p("hr").offset, p("hr").deadband), (1.0, 0.0, 0.0));
}

#[test]
fn device_points_are_sorted_by_path_and_profile_read_limits_apply() {
    let text = base()
        .replace("  pump:\n    points:\n", "  pump:\n    read: { max_registers: 10, max_gap: 4 }\n    points:\n")
        .replace("    profile: pump\n", "    profile: pump\n    points:\n      aaa.first: { holding: 40, access: read }\n");
    let config = valid(&text);
    let d = &config.devices[0];
    let paths: Vec<&str> = d.points.iter().map(|p| p.path.as_str()).collect();
    let mut sorted = paths.clone();
    sorted.sort_unstable();
    assert_eq!(paths, sorted);
    assert_eq!(paths[0], "aaa.first");
    assert_eq!(d.read, ReadLimits { max_registers: 10, max_bits: 2000, max_gap: 4 });
}

// ---------------------------------------------------------------------------
// Connections: transports, sessions, proxies, presence

/// `base()` with the `cloud` connection replaced by `connection` (indented body lines).
fn with_connection(connection: &str) -> String {
    base().replace("  cloud:\n    embedded:\n      listen: 127.0.0.1:1883\n", &format!("  cloud:\n{connection}"))
}

#[test]
fn websocket_urls_keep_their_path_and_default_to_slash_mqtt() {
    let c = valid(&with_connection("    url: wss://broker.example.com/custom\n"));
    match &c.connections[0].broker {
        Broker::Remote { host, port, tls, websocket_path } => {
            assert_eq!((host.as_str(), *port, tls.is_some(), websocket_path.as_deref()), ("broker.example.com", 443, true, Some("/custom")));
        }
        other => panic!("expected a remote broker, got {other:?}"),
    }
    let c = valid(&with_connection("    url: ws://broker.example.com:8080\n"));
    match &c.connections[0].broker {
        Broker::Remote { port, tls, websocket_path, .. } => assert_eq!((*port, tls.is_none(), websocket_path.as_deref()), (8080, true, Some("/mqtt"))),
        other => panic!("expected a remote broker, got {other:?}"),
    }
}

#[test]
fn mqtt_version_accepts_3_1_1_and_5_and_refuses_others() {
    let c = valid(&with_connection("    url: mqtt://b\n    mqtt_version: 5\n"));
    assert_eq!(c.connections[0].version, MqttVersion::V5);
    let c = valid(&with_connection("    url: mqtt://b\n    mqtt_version: 3.1.1\n"));
    assert_eq!(c.connections[0].version, MqttVersion::V311);
    let text = with_connection("    url: mqtt://b\n    mqtt_version: 4.5\n");
    only_problem(&text, line_of(&text, "mqtt_version"), "connections.cloud.mqtt_version", &["3.1.1 or 5"]);
}

#[test]
fn a_persistent_session_needs_an_explicit_client_id() {
    let text = with_connection("    url: mqtt://b\n    clean_session: false\n");
    only_problem(&text, line_of(&text, "clean_session"), "connections.cloud.clean_session", &["client_id"]);
    let c = valid(&with_connection("    url: mqtt://b\n    clean_session: false\n    client_id: gw-1\n"));
    assert!(!c.connections[0].clean_session);
}

#[test]
fn proxies_are_http_or_socks5_with_their_own_login() {
    let c = valid(&with_connection("    url: mqtts://b:8883\n    proxy: { url: \"socks5://p.local\", username: u, password: secret-proxy }\n"));
    let proxy = c.connections[0].proxy.as_ref().expect("a proxy");
    assert_eq!((proxy.kind, proxy.host.as_str(), proxy.port), (ProxyKind::Socks5, "p.local", 1080));
    assert!(!format!("{c:?}").contains("secret-proxy"), "the proxy password never prints");
    let c = valid(&with_connection("    url: mqtt://b\n    proxy: { url: \"http://p.local:8080\" }\n"));
    assert_eq!(c.connections[0].proxy.as_ref().map(|p| (p.kind, p.port)), Some((ProxyKind::Http, 8080)));
    let text = with_connection("    url: mqtt://b\n    proxy: { url: \"ftp://p\" }\n");
    only_problem(&text, line_of(&text, "ftp://"), "connections.cloud.proxy.url", &["http://", "socks5://"]);
}

#[test]
fn the_embedded_broker_takes_no_proxy_and_no_retained_will_on_mqtt5() {
    let text = with_connection("    embedded: { listen: 127.0.0.1:1883 }\n    proxy: { url: \"http://p\" }\n");
    only_problem(&text, line_of(&text, "proxy"), "connections.cloud.proxy", &["embedded"]);
    let text = with_connection("    embedded: { listen: 127.0.0.1:1883 }\n    mqtt_version: 5\n    presence: { topic: gw/status }\n");
    only_problem(&text, line_of(&text, "presence"), "connections.cloud.presence.retain", &["retain: false"]);
    let c = valid(&with_connection("    embedded: { listen: 127.0.0.1:1883 }\n    mqtt_version: 5\n    presence: { topic: gw/status, retain: false }\n"));
    assert_eq!(c.connections[0].presence.as_ref().map(|p| p.offline.as_str()), Some("offline"));
}

#[test]
fn reconnect_bounds_are_durations_with_max_not_below_min() {
    let c = valid(&with_connection("    url: mqtt://b\n    reconnect: { min: 200ms, max: 5s }\n"));
    assert_eq!((c.connections[0].reconnect_min, c.connections[0].reconnect_max), (Duration::from_millis(200), Duration::from_secs(5)));
    let text = with_connection("    url: mqtt://b\n    reconnect: { min: 10s, max: 1s }\n");
    only_problem(&text, line_of(&text, "reconnect"), "connections.cloud.reconnect.max", &["shorter"]);
}

// ---------------------------------------------------------------------------
// Named commands

fn with_commands(commands: &str) -> String {
    base().replace(
        "      deviceData.temperature: { input: 0, type: i16, scale: 0.1 }\n",
        &format!("      deviceData.temperature: {{ input: 0, type: i16, scale: 0.1 }}\n    commands:\n{commands}"),
    )
}

#[test]
fn a_named_command_is_checked_against_the_points_and_its_arguments() {
    let c = valid(&with_commands(
        "      start:\n        args: { speed: { type: number, max: 50 } }\n        steps:\n          - set: { deviceAttrib.setpoint: $speed, deviceAttrib.motorStatus: \"on\" }\n          - wait: 2s\n          - check: { deviceAttrib.motorStatus: \"on\" }\n",
    ));
    let cmd = &c.devices[0].commands[0];
    assert_eq!((cmd.name.as_str(), cmd.args.len(), cmd.steps.len()), ("start", 1, 3));
    assert_eq!(cmd.steps[1], Step::Wait(Duration::from_secs(2)));
}

#[test]
fn a_named_command_refuses_bad_steps_all_at_once() {
    let text = with_commands(
        "      bad:\n        steps:\n          - set: { deviceData.temperature: 20 }\n          - set: { deviceAttrib.setpoint: 500 }\n          - set: { deviceAttrib.setpoint: $nope }\n          - wait: soon\n          - check: { nowhere: 1 }\n",
    );
    let ps = problems(&text);
    expect_problem(&ps, line_of(&text, "temperature: 20"), "profiles.pump.commands.bad.steps[0]", &["read-only"]);
    expect_problem(&ps, line_of(&text, "setpoint: 500"), "profiles.pump.commands.bad.steps[1]", &["maximum 80"]);
    expect_problem(&ps, line_of(&text, "$nope"), "profiles.pump.commands.bad.steps[2]", &["not an argument"]);
    expect_problem(&ps, line_of(&text, "wait: soon"), "profiles.pump.commands.bad.steps[3]", &["duration"]);
    expect_problem(&ps, line_of(&text, "nowhere"), "profiles.pump.commands.bad.steps[4]", &["no point"]);
    let text = with_commands("      relay-command:\n        steps:\n          - wait: 1s\n");
    only_problem(&text, line_of(&text, "relay-command:"), "profiles.pump.commands.relay-command", &["built in"]);
}

#[test]
fn mask_write_comes_from_the_profile_unless_the_device_says_otherwise() {
    let text = insert_after(&with_devices("  a: { bus: line, unit: 1, profile: pump }\n  b: { bus: line, unit: 2, profile: pump, mask_write: false }\n  c: { bus: line, unit: 3, points: { x: { holding: 5, bit: 1 } }, mask_write: true }\n"), "  pump:\n", "    mask_write: true\n");
    let c = valid(&text);
    let mask = |name: &str| c.devices.iter().find(|d| d.name == name).map(|d| d.mask_write);
    assert_eq!((mask("a"), mask("b"), mask("c")), (Some(true), Some(false), Some(true)));
    assert!(!valid(&base()).devices[0].mask_write, "off unless asked");
}

// ---------------------------------------------------------------------------
// Outbox bounds, shutdown, the HTTP listener

#[test]
fn outbox_bounds_have_defaults_and_take_sizes_with_units() {
    let c = valid(&base());
    assert_eq!(c.connections[0].outbox, OutboxSettings { max_messages: 100_000, max_bytes: 64 << 20, max_age: Duration::from_secs(86_400) });
    assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
    let text = insert_after(&base(), "      listen: 127.0.0.1:1883\n", "    outbox: { max_messages: 500, max_size: 512KiB, max_age: 2h }\n") + "shutdown_timeout: 4s\n";
    let c = valid(&text);
    assert_eq!(c.connections[0].outbox, OutboxSettings { max_messages: 500, max_bytes: 512 << 10, max_age: Duration::from_secs(7200) });
    assert_eq!(c.shutdown_timeout, Duration::from_secs(4));
}

#[test]
fn an_outbox_size_that_is_not_a_size_names_the_units() {
    let text = insert_after(&base(), "      listen: 127.0.0.1:1883\n", "    outbox: { max_size: 12 parsecs }\n");
    only_problem(&text, line_of(&text, "parsecs"), "connections.cloud.outbox.max_size", &["not a size", "MiB"]);
    let text = insert_after(&base(), "      listen: 127.0.0.1:1883\n", "    outbox: { max_size: 10 }\n");
    only_problem(&text, line_of(&text, "max_size: 10 "), "connections.cloud.outbox.max_size", &["out of range", "64 KiB"]);
}

#[test]
fn an_http_listener_beyond_loopback_needs_a_login() {
    let text = base() + "http: { listen: 0.0.0.0:9180 }\n";
    only_problem(&text, line_of(&text, "0.0.0.0:9180"), "http.listen", &["reachable from other machines", "username", "127.0.0.1"]);
    let c = valid(&(base() + "http: { listen: 127.0.0.1:9180 }\n"));
    assert_eq!(c.http.as_ref().map(|h| h.listen.port()), Some(9180));
    let c = valid(&(base() + "http: { listen: 0.0.0.0:9180, username: prom, password: \"${HOME}\" }\n"));
    assert!(c.http.as_ref().is_some_and(|h| h.credentials.is_some()));
}

#[test]
fn the_console_is_off_unless_asked_and_writing_from_it_needs_a_login() {
    let console = |text: &str| valid(&(base() + text)).http.and_then(|h| h.console);
    assert_eq!(console("http: { listen: 127.0.0.1:9180 }\n"), None);
    assert_eq!(console("http: { listen: 127.0.0.1:9180, console: false }\n"), None);
    assert_eq!(console("http: { listen: 127.0.0.1:9180, console: true }\n"), Some(ConsoleSettings { write: false }));
    assert_eq!(console("http: { listen: 127.0.0.1:9180, console: {} }\n"), Some(ConsoleSettings { write: false }));
    let login = "username: ops, password: \"${HOME}\"";
    assert_eq!(console(&format!("http: {{ listen: 127.0.0.1:9180, {login}, console: {{ write: true }} }}\n")), Some(ConsoleSettings { write: true }));

    // Even on loopback: a write must say who made it.
    let text = base() + "http:\n  listen: 127.0.0.1:9180\n  console: { write: true }\n";
    only_problem(&text, line_of(&text, "write: true"), "http.console.write", &["needs a login", "username", "password_file"]);
    let text = base() + "http:\n  listen: 127.0.0.1:9180\n  console: { write: yes, history: 1h }\n";
    let e = structure(&text);
    assert!(e.contains("history"), "{e}");
    let e = structure(&(base() + "http: { listen: 127.0.0.1:9180, console: 3 }\n"));
    assert!(e.contains("true, false or { write: true }"), "{e}");
}

#[test]
fn an_embedded_broker_beyond_loopback_needs_users_and_their_filters_are_checked() {
    let open = base().replace("listen: 127.0.0.1:1883", "listen: 0.0.0.0:1883");
    only_problem(&open, line_of(&open, "0.0.0.0:1883"), "connections.cloud.embedded.listen", &["reachable from other machines", "users"]);
    let with_users = base().replace(
        "      listen: 127.0.0.1:1883\n",
        "      listen: 0.0.0.0:1883\n      users:\n        app: { password: \"${HOME}\", publish: [\"pump/cmd\"], subscribe: [\"pump/#\"] }\n      max_connections: 10\n",
    );
    let c = valid(&with_users);
    let Broker::Embedded { access, .. } = &c.connections[0].broker else { panic!("embedded") };
    assert_eq!((access.users.len(), access.max_connections), (1, 10));
    assert_eq!(access.users[0].subscribe.as_deref(), Some(&["pump/#".to_string()][..]));
    let bad = with_users.replace("subscribe: [\"pump/#\"]", "subscribe: [\"pump/#/x\"]");
    only_problem(&bad, line_of(&bad, "pump/#/x"), "connections.cloud.embedded.users.app.subscribe", &["not a topic filter", "last"]);
}

#[test]
fn response_topics_default_to_the_twins_own_and_must_be_filters() {
    let c = valid(&base());
    assert_eq!(c.devices[0].twin.as_ref().map(|t| t.response_topics.clone()), Some(vec!["pump/rsp".to_string()]));
    let text = insert_after(&base(), "      responses: pump/rsp\n", "      response_topics: [\"app/+/replies\", \"bad#\"]\n");
    only_problem(&text, line_of(&text, "bad#"), "devices.pump-1.twin.response_topics", &["not a topic filter"]);
}

#[test]
fn a_password_inside_a_url_is_never_echoed() {
    let text = base().replace("    embedded:\n      listen: 127.0.0.1:1883\n", "    url: \"mqtts://gw:hunter2@broker.example.com:port\"\n");
    let ps = problems(&text);
    assert!(ps.iter().all(|p| !p.contains("hunter2")), "{ps:?}");
    assert!(ps.iter().any(|p| p.contains("gw:***@")), "{ps:?}");
}

#[test]
fn a_password_file_must_be_a_small_regular_file() {
    let dir = std::env::temp_dir().join(format!("twinbus-config-pwfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let big = dir.join("big");
    std::fs::write(&big, vec![b'x'; 70_000]).expect("write");
    for (file, words) in [("/dev/zero", &["not a regular file"][..]), (big.to_str().expect("utf-8"), &["at most 65536 bytes"][..]), ("/nonexistent/pw", &["cannot read"][..])] {
        let text = base().replace("      listen: 127.0.0.1:1883\n", &format!("      listen: 127.0.0.1:1883\n    username: u\n    password_file: {file}\n"));
        only_problem(&text, line_of(&text, "password_file"), "connections.cloud.password_file", words);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_committed_schema_is_the_one_the_types_generate() {
    let committed = include_str!("../../twinbus.schema.json");
    assert!(
        committed == Config::schema(),
        "twinbus.schema.json is stale: run `cargo run -- schema > twinbus.schema.json` and commit it"
    );
    let schema: serde_json::Value = serde_json::from_str(committed).expect("JSON");
    let point = &schema["$defs"]["RawPoint"];
    assert_eq!(point["additionalProperties"], false, "unknown keys are errors, in the schema too");
    assert!(point["properties"]["scale"]["description"].as_str().is_some_and(|d| d.contains("between two steps")));
    assert!(schema["properties"]["devices"].is_object() && schema["properties"]["http"].is_object());
}

mod budget;
mod shadows;

// ---------------------------------------------------------------------------
// RTU over TCP (a serial device server)

fn with_device_server(server: &str) -> String {
    base().replace("buses:\n", &format!("buses:\n  server:\n    rtu_tcp: {server}\n"))
}

#[test]
fn a_device_server_bus_keeps_the_serial_gap_of_the_line_behind_it() {
    let config = valid(&with_device_server("{ host: 10.0.0.6, port: 4001 }"));
    let server = config.buses.iter().find(|b| b.name == "server").unwrap();
    assert_eq!(server.transport, Transport::RtuTcp { host: "10.0.0.6".into(), port: 4001, connect_timeout: Duration::from_secs(3) });
    assert_eq!(server.delay, Duration::from_micros(4010), "3.5 characters at 9600 baud");
    let config = valid(&with_device_server("{ host: 10.0.0.6, port: 4001, baud: 115200, connect_timeout: 10s }"));
    let server = config.buses.iter().find(|b| b.name == "server").unwrap();
    assert_eq!(server.delay, Duration::from_micros(1750));
    assert!(matches!(server.transport, Transport::RtuTcp { connect_timeout, .. } if connect_timeout == Duration::from_secs(10)));
}

#[test]
fn a_device_server_bus_needs_its_port_and_is_an_rtu_line_for_unit_ids() {
    assert!(matches!(Config::parse(&with_device_server("{ host: 10.0.0.6 }"), Path::new("t.yaml")), Err(ConfigError::Structure { .. })));
    let text = with_device_server("{ host: 10.0.0.6, port: 4001 }").replace("    bus: line\n    unit: 1\n", "    bus: server\n    unit: 0\n");
    only_problem(&text, line_of(&text, "unit: 0"), "devices.pump-1.unit", &["valid: 1 to 247"]);
}

#[test]
fn a_device_server_and_a_modbus_tcp_bus_on_one_endpoint_are_refused() {
    let text = with_device_server("{ host: 10.0.0.5, port: 502 }");
    let problems = problems(&text);
    assert!(problems.iter().any(|p| p.contains("TCP endpoint 10.0.0.5:502")), "{problems:?}");
}

// ---------------------------------------------------------------------------
// Poll groups, device quirks, every_poll

/// The pump profile with poll settings, on device `d`.
fn grouped(profile_extra: &str, device_extra: &str) -> String {
    let head = HEAD.replace("  pump:\n    points:\n", &format!("  pump:\n{profile_extra}    points:\n"));
    format!("{head}devices:\n  d:\n    bus: line\n    unit: 1\n    profile: pump\n    poll: 1s\n{device_extra}")
}

fn intervals(c: &Config) -> Vec<(Option<Duration>, Vec<&str>)> {
    let d = &c.devices[0];
    d.groups.iter().map(|g| (g.every, g.points.iter().map(|&i| d.points[i].path.as_str()).collect())).collect()
}

#[test]
fn points_fall_into_poll_groups_by_the_longest_matching_pattern_fastest_first() {
    let c = valid(&grouped("    poll_paths: { deviceAttrib: 60s }\n", "    poll_paths: { deviceAttrib.motorStatus: once, deviceData: 200ms }\n"));
    assert_eq!(intervals(&c), vec![
        (Some(Duration::from_millis(200)), vec!["deviceData.temperature"]),
        (Some(Duration::from_secs(60)), vec!["deviceAttrib.setpoint"]),
        (None, vec!["deviceAttrib.motorStatus"]),
    ]);
}

#[test]
fn a_point_s_own_poll_wins_over_every_pattern() {
    let text = HEAD.replace("deviceData.temperature: { input: 0, type: i16, scale: 0.1 }", "deviceData.temperature: { input: 0, type: i16, scale: 0.1, poll: 5s }");
    let text = format!("{text}devices:\n  d: {{ bus: line, unit: 1, profile: pump, poll_paths: {{ deviceData: 100ms }} }}\n");
    let c = valid(&text);
    assert_eq!(intervals(&c)[0], (Some(Duration::from_secs(1)), vec!["deviceAttrib.motorStatus", "deviceAttrib.setpoint"]));
    assert_eq!(intervals(&c)[1], (Some(Duration::from_secs(5)), vec!["deviceData.temperature"]));
}

#[test]
fn a_device_without_poll_settings_has_one_group_at_its_poll() {
    let c = valid(&base());
    assert_eq!(c.devices[0].groups.len(), 1);
    assert_eq!(c.devices[0].groups[0].every, Some(Duration::from_secs(1)));
}

#[test]
fn a_poll_pattern_that_matches_nothing_or_a_bad_interval_is_refused_at_its_line() {
    let text = grouped("", "    poll_paths: { deviceInfo: 60s, deviceData: sometimes }\n");
    let ps = problems(&text);
    let line = line_of(&text, "deviceInfo");
    expect_problem(&ps, line, "devices.d.poll_paths.deviceInfo", &["matches no readable point"]);
    expect_problem(&ps, line, "devices.d.poll_paths.deviceData", &["neither an interval nor `once`"]);
}

#[test]
fn quirk_options_of_the_device_win_over_its_profile_s_and_default_otherwise() {
    let c = valid(&grouped("    single_writes: true\n    read_back_delay: 300ms\n", "    busy: { retries: 5 }\n    read_back_delay: 1s\n"));
    let q = c.devices[0].quirks;
    assert!(q.single_writes);
    assert_eq!(q.read_back_delay, Duration::from_secs(1));
    assert_eq!(q.busy_retries, 5);
    assert_eq!(q.busy_delay, Duration::from_millis(100), "the default delay");
    assert_eq!(valid(&base()).devices[0].quirks, Quirks::default());
}

#[test]
fn busy_retries_out_of_range_are_refused() {
    let text = grouped("", "    busy: { retries: 11, delay: 20s }\n");
    let ps = problems(&text);
    let line = line_of(&text, "busy:");
    expect_problem(&ps, line, "devices.d.busy.retries", &["11"]);
    expect_problem(&ps, line, "devices.d.busy.delay", &["too long"]);
}

#[test]
fn telemetry_every_poll_is_its_own_spelling_and_other_words_are_still_refused() {
    let c = valid(&insert_after(&base(), "      telemetry: pump/tel\n", "      telemetry_interval: every_poll\n"));
    assert!(c.devices[0].twin.as_ref().is_some_and(|t| t.every_poll));
    assert!(!valid(&base()).devices[0].twin.as_ref().is_some_and(|t| t.every_poll));
    let text = insert_after(&base(), "      telemetry: pump/tel\n", "      telemetry_interval: each_poll\n");
    only_problem(&text, line_of(&text, "each_poll"), "devices.pump-1.twin.telemetry_interval", &["not a duration"]);
}

#[test]
fn devices_with_equal_point_tables_share_one_in_memory() {
    let config = valid(&format!(
        "{HEAD}devices:
  pump-1: {{ bus: line, unit: 1, profile: pump }}
  pump-2: {{ bus: line, unit: 2, profile: pump }}
  # The profile's points written out: equal, so shared too.
  pump-3:
    bus: line
    unit: 3
    points:
      deviceAttrib.motorStatus: {{ coil: 0, values: {{ on: true, off: false }} }}
      deviceAttrib.setpoint: {{ holding: 10, type: f32, min: 0, max: 80 }}
      deviceData.temperature: {{ input: 0, type: i16, scale: 0.1 }}
  # One point more: its own table.
  pump-4:
    bus: line
    unit: 4
    profile: pump
    points:
      deviceData.pressure: {{ input: 1 }}
"
    ));
    let table = |name: &str| &config.devices.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} is configured")).points;
    assert!(Arc::ptr_eq(table("pump-1"), table("pump-2")));
    assert!(Arc::ptr_eq(table("pump-1"), table("pump-3")));
    assert!(!Arc::ptr_eq(table("pump-1"), table("pump-4")));
    assert_eq!(table("pump-4").len(), 4);
    assert_eq!(table("pump-1").len(), 3);
}
