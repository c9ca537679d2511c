//! The raw command protocol as the cloud sees it: every payload is answered,
//! a bad one is rejected with a reason, and a `set` writes all or nothing.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value as Json};

use super::*;
use crate::config::Config;
use crate::point::{Encoded, Point, Value};

const PUMP: &str = "\
buses:
  b:
    tcp: { host: 127.0.0.1, port: 5020 }
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: { coil: 0, values: { on: true, off: false } }
      deviceAttrib.setpoint:    { holding: 10, type: f32, min: 0, max: 80 }
      deviceAttrib.reset:       { holding: 20, access: write }
      deviceData.temperature:   { input: 0, type: i16, scale: 0.1 }
devices:
  pump-1:
    bus: b
    unit: 1
    profile: pump
";

const MOTOR: &str = "deviceAttrib.motorStatus";
const RESET: &str = "deviceAttrib.reset";
const SETPOINT: &str = "deviceAttrib.setpoint";
const TEMPERATURE: &str = "deviceData.temperature";

fn points() -> Vec<Point> {
    let config = Config::parse(PUMP, Path::new("gw.yaml")).unwrap_or_else(|e| panic!("the test profile is valid:\n{e}"));
    config.devices[0].points.to_vec()
}

fn index(points: &[Point], path: &str) -> usize {
    points.iter().position(|p| p.path == path).unwrap_or_else(|| panic!("no point {path}"))
}

/// The reason a payload is rejected; fails if it is accepted.
fn rejection(payload: &[u8]) -> String {
    let cmd = parse(payload);
    match cmd.request {
        Err(why) => {
            assert!(!why.is_empty(), "a rejection has a reason");
            why
        }
        Ok(r) => panic!("{:?} was accepted as {r:?}", String::from_utf8_lossy(&payload[..payload.len().min(200)])),
    }
}

fn request(payload: &str) -> Request {
    match parse(payload.as_bytes()).request {
        Ok(r) => r,
        Err(why) => panic!("{payload} was rejected: {why}"),
    }
}

fn leaves_of(payload: &str) -> Vec<(String, Json)> {
    match request(payload) {
        Request::Set(leaves) => leaves,
        other => panic!("{payload} is not a set: {other:?}"),
    }
}

fn set(points: &[Point], payload: &str) -> Result<Vec<(usize, Encoded)>, BTreeMap<String, String>> {
    check_set(points, &leaves_of(payload))
}

fn set_errors(points: &[Point], payload: &str) -> BTreeMap<String, String> {
    match set(points, payload) {
        Err(errors) => errors,
        Ok(writes) => panic!("{payload} was accepted: {writes:?}"),
    }
}

fn get(points: &[Point], paths: &[&str]) -> Result<Vec<usize>, BTreeMap<String, String>> {
    let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
    check_get(points, Some(&paths))
}

fn assert_contains(text: &str, words: &[&str]) {
    for w in words {
        assert!(text.contains(w), "{text:?} should contain {w:?}");
    }
}

// ---------------------------------------------------------------------------
// parse: every bad payload is a rejection with a reason, never a panic

#[test]
fn an_empty_payload_is_rejected_with_an_example() {
    assert_contains(&rejection(b""), &["empty", r#"{"id":"1","get":"*"}"#]);
}

#[test]
fn a_payload_over_256_kib_is_rejected_by_size() {
    let big = vec![b' '; 300 * 1024];
    assert_contains(&rejection(&big), &["307200 bytes", "262144"]);
}

#[test]
fn a_payload_over_256_kib_is_refused_with_its_id_when_it_has_one() {
    // As the README says: up to 1 MiB a command is read, so its refusal carries its id.
    let padded = |head: &str| {
        let mut p = head.as_bytes().to_vec();
        p.resize(300 * 1024, b' ');
        p
    };
    let cmd = parse(&padded(r#"{"id":7.50,"get":"*"}"#));
    assert_eq!((cmd.id, cmd.id_text.as_deref()), (Some(json!(7.5)), Some("7.50")));
    assert!(cmd.request.is_err_and(|why| why.contains("307200 bytes")));
    for head in [r#"{"id":[1],"get":"*"}"#, r#"{"id":"a","id":"b"}"#, "[1]", "not json"] {
        let cmd = parse(&padded(head));
        assert!(cmd.id.is_none() && cmd.id_text.is_none() && cmd.request.is_err(), "{head}: {cmd:?}");
    }
    let long = format!(r#"{{"id":"{}"}}"#, "i".repeat(300));
    assert!(parse(&padded(&long)).id.is_none(), "an id over 256 bytes is not echoed");
}

#[test]
fn a_payload_of_exactly_the_limit_is_parsed() {
    let mut payload = br#"{"get":"*"}"#.to_vec();
    payload.resize(MAX_COMMAND_BYTES, b' ');
    assert_eq!(parse(&payload).request, Ok(Request::Get(None)));
    payload.push(b' ');
    assert_contains(&rejection(&payload), &["limit"]);
}

#[test]
fn invalid_utf8_is_rejected_as_binary() {
    assert_contains(&rejection(&[0xff, 0xfe, b'{', 0x80, b'}']), &["not UTF-8"]);
    assert_contains(&rejection(b"{\"get\":\"\xc3\"}"), &["not UTF-8"]);
}

#[test]
fn text_that_is_not_json_is_rejected_with_the_parser_reason() {
    assert_contains(&rejection(b"not json"), &["not valid JSON", "line 1"]);
    assert_contains(&rejection(br#"{"get":"*""#), &["not valid JSON"]);
    assert_contains(&rejection(br#"{"get":"*"} {"get":"*"}"#), &["not valid JSON"]);
}

#[test]
fn json_that_is_not_an_object_is_rejected() {
    for payload in [&b"[1,2]"[..], b"\"str\"", b"42", b"null", b"true"] {
        assert_contains(&rejection(payload), &["JSON object"]);
    }
}

#[test]
fn ten_thousand_nested_arrays_hit_the_recursion_limit_instead_of_the_stack() {
    let depth = 10_000;
    let payload = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    assert_contains(&rejection(payload.as_bytes()), &["not valid JSON", "recursion limit"]);
    let objects = format!("{{\"set\":{}1{}}}", "{\"a\":".repeat(depth), "}".repeat(depth));
    assert_contains(&rejection(objects.as_bytes()), &["recursion limit"]);
}

#[test]
fn an_id_that_is_an_object_is_rejected_and_not_echoed() {
    let cmd = parse(br#"{"id":{"x":1},"get":"*"}"#);
    assert_eq!(cmd.id, None, "an invalid id is never echoed");
    assert_contains(&cmd.request.unwrap_err(), &["\"id\"", "string or a number"]);
    for bad in ["null", "[1]", "true"] {
        let cmd = parse(format!(r#"{{"id":{bad},"get":"*"}}"#).as_bytes());
        assert_eq!(cmd.id, None, "{bad}");
        assert!(cmd.request.is_err(), "{bad}");
    }
}

#[test]
fn an_unknown_field_is_named_and_the_valid_fields_listed() {
    assert_contains(&rejection(br#"{"sett":{}}"#), &["unknown field \"sett\"", "id, set, get, shutdown"]);
}

#[test]
fn set_and_get_together_are_rejected() {
    assert_contains(&rejection(br#"{"set":{"a":1},"get":"*"}"#), &["set and get", "one per command"]);
    assert_contains(&rejection(br#"{"get":"*","shutdown":true}"#), &["get and shutdown"]);
}

#[test]
fn shutdown_must_be_true() {
    assert_contains(&rejection(br#"{"shutdown":false}"#), &["must be true"]);
    assert_contains(&rejection(br#"{"shutdown":"yes"}"#), &["must be true"]);
    assert_eq!(request(r#"{"shutdown":true}"#), Request::Shutdown);
}

#[test]
fn an_empty_set_is_rejected_with_an_example() {
    assert_contains(&rejection(br#"{"set":{}}"#), &["non-empty object", "motorStatus"]);
    assert_contains(&rejection(br#"{"set":[1]}"#), &["non-empty object"]);
    assert_contains(&rejection(br#"{"set":"on"}"#), &["non-empty object"]);
}

#[test]
fn an_empty_or_non_string_get_is_rejected() {
    assert_contains(&rejection(br#"{"get":[]}"#), &["\"*\"", "point path"]);
    assert_contains(&rejection(br#"{"get":[1]}"#), &["strings"]);
    assert_contains(&rejection(br#"{"get":["a", null]}"#), &["strings"]);
    assert_contains(&rejection(br#"{"get":7}"#), &["\"*\""]);
}

#[test]
fn an_object_without_a_request_is_rejected() {
    assert_contains(&rejection(b"{}"), &["none of"]);
    assert_contains(&rejection(br#"{"id":"1"}"#), &["none of"]);
}

#[test]
fn trailing_whitespace_and_a_newline_are_fine() {
    assert_eq!(request("  {\"get\":\"*\"}\r\n"), Request::Get(None));
}

#[test]
fn get_accepts_a_star_a_path_or_a_list_of_paths() {
    assert_eq!(request(r#"{"get":"*"}"#), Request::Get(None));
    assert_eq!(request(r#"{"get":"deviceAttrib"}"#), Request::Get(Some(vec!["deviceAttrib".into()])));
    assert_eq!(
        request(r#"{"get":["deviceAttrib.setpoint","deviceData"]}"#),
        Request::Get(Some(vec![SETPOINT.into(), "deviceData".into()]))
    );
}

#[test]
fn a_nested_set_flattens_to_dotted_paths() {
    let mut leaves = leaves_of(r#"{"set":{"deviceAttrib":{"motorStatus":"on","setpoint":42.5}}}"#);
    leaves.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(leaves, vec![(MOTOR.to_string(), json!("on")), (SETPOINT.to_string(), json!(42.5))]);
    // A dotted key means the same point.
    assert_eq!(leaves_of(r#"{"set":{"deviceAttrib.setpoint":1}}"#), vec![(SETPOINT.to_string(), json!(1))]);
}

#[test]
fn no_payload_panics() {
    let payloads: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        vec![b'{'; 1000],
        b"\xef\xbb\xbf{\"get\":\"*\"}".to_vec(),
        br#"{"set":{"":1}}"#.to_vec(),
        br#"{"set":{"a":{}}}"#.to_vec(),
        br#"{"get":""}"#.to_vec(),
        br#"{"id":1e999,"get":"*"}"#.to_vec(),
        br#"{"id":-0.0,"get":"*"}"#.to_vec(),
        br#"{"set":{"a":1e308}}"#.to_vec(),
    ];
    let points = points();
    for p in payloads {
        let cmd = parse(&p);
        if let Ok(Request::Set(leaves)) = &cmd.request {
            let _ = check_set(&points, leaves);
        }
        if let Ok(Request::Get(paths)) = &cmd.request {
            let _ = check_get(&points, paths.as_deref());
        }
    }
}

// ---------------------------------------------------------------------------
// parse: the id is echoed as sent

#[test]
fn a_string_id_is_kept_as_sent() {
    let cmd = parse(br#"{"id":"c-42","get":"*"}"#);
    assert_eq!(cmd.id, Some(json!("c-42")));
    assert_eq!(cmd.request, Ok(Request::Get(None)));
}

#[test]
fn a_number_id_is_kept_as_a_number() {
    assert_eq!(parse(br#"{"id":42,"get":"*"}"#).id, Some(json!(42)));
    assert_eq!(parse(br#"{"id":-7,"get":"*"}"#).id, Some(json!(-7)));
    assert_eq!(parse(br#"{"id":1.5,"get":"*"}"#).id, Some(json!(1.5)));
    assert_eq!(parse(br#"{"id":18446744073709551615,"get":"*"}"#).id, Some(json!(u64::MAX)));
    // "1" and 1 are different ids.
    assert_ne!(parse(br#"{"id":"1","get":"*"}"#).id, parse(br#"{"id":1,"get":"*"}"#).id);
}

#[test]
fn the_id_of_an_invalid_request_is_still_echoed() {
    for payload in [r#"{"id":"x","sett":{}}"#, r#"{"id":"x","set":{}}"#, r#"{"id":"x","shutdown":false}"#, r#"{"id":"x"}"#] {
        let cmd = parse(payload.as_bytes());
        assert_eq!(cmd.id, Some(json!("x")), "{payload}");
        assert!(cmd.request.is_err(), "{payload}");
    }
}

#[test]
fn a_payload_without_an_id_has_none() {
    assert_eq!(parse(br#"{"get":"*"}"#).id, None);
    assert_eq!(parse(b"not json").id, None);
}

// ---------------------------------------------------------------------------
// check_set: all valid, or nothing at all

#[test]
fn a_valid_set_encodes_every_write() {
    let pts = points();
    let mut writes = set(&pts, r#"{"set":{"deviceAttrib":{"motorStatus":"on","setpoint":42.5,"reset":7}}}"#).expect("valid");
    writes.sort_by_key(|(i, _)| *i);
    let mut expected = vec![
        (index(&pts, MOTOR), Encoded::Bits(vec![true])),
        (index(&pts, SETPOINT), Encoded::Words(vec![0x422A, 0x0000])),
        (index(&pts, RESET), Encoded::Words(vec![7])),
    ];
    expected.sort_by_key(|(i, _)| *i);
    assert_eq!(writes, expected);
}

#[test]
fn the_limits_themselves_are_writable() {
    let pts = points();
    assert!(set(&pts, r#"{"set":{"deviceAttrib":{"setpoint":0}}}"#).is_ok());
    assert!(set(&pts, r#"{"set":{"deviceAttrib":{"setpoint":80}}}"#).is_ok());
    assert_eq!(
        set(&pts, r#"{"set":{"deviceAttrib":{"motorStatus":"off"}}}"#),
        Ok(vec![(index(&pts, MOTOR), Encoded::Bits(vec![false]))])
    );
}

#[test]
fn one_unknown_point_refuses_the_whole_set() {
    let pts = points();
    let errors = set_errors(&pts, r#"{"set":{"deviceAttrib":{"motorStatus":"on","motorSpeed":10}}}"#);
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["deviceAttrib.motorSpeed"], "only the bad path is named: {errors:?}");
    assert_contains(&errors["deviceAttrib.motorSpeed"], &["unknown point", "known:", MOTOR, SETPOINT]);
}

#[test]
fn every_bad_leaf_is_reported() {
    let errors = set_errors(&points(), r#"{"set":{"deviceAttrib":{"setpoint":500,"motorStatus":1},"nope":1}}"#);
    assert_eq!(errors.len(), 3, "{errors:?}");
}

#[test]
fn a_setpoint_above_its_maximum_is_refused() {
    let errors = set_errors(&points(), r#"{"set":{"deviceAttrib":{"setpoint":500}}}"#);
    assert_contains(&errors[SETPOINT], &["500", "maximum 80"]);
    let errors = set_errors(&points(), r#"{"set":{"deviceAttrib":{"setpoint":-0.5}}}"#);
    assert_contains(&errors[SETPOINT], &["minimum 0"]);
}

#[test]
fn a_read_only_point_is_refused() {
    let errors = set_errors(&points(), r#"{"set":{"deviceData":{"temperature":20}}}"#);
    assert_contains(&errors[TEMPERATURE], &["read-only"]);
}

#[test]
fn a_value_of_the_wrong_type_is_refused() {
    let pts = points();
    let errors = set_errors(&pts, r#"{"set":{"deviceAttrib":{"setpoint":"on"}}}"#);
    assert_contains(&errors[SETPOINT], &["expected a number", "\"on\""]);
    let errors = set_errors(&pts, r#"{"set":{"deviceAttrib":{"motorStatus":1}}}"#);
    assert_contains(&errors[MOTOR], &["expected one of", "off", "on", "got 1"]);
    let errors = set_errors(&pts, r#"{"set":{"deviceAttrib":{"motorStatus":"running"}}}"#);
    assert_contains(&errors[MOTOR], &["unknown value \"running\""]);
    let errors = set_errors(&pts, r#"{"set":{"deviceAttrib":{"reset":1.5}}}"#);
    assert_contains(&errors[RESET], &["whole number"]);
    let errors = set_errors(&pts, r#"{"set":{"deviceAttrib":{"reset":70000}}}"#);
    assert_contains(&errors[RESET], &["does not fit", "u16"]);
}

#[test]
fn a_group_path_is_refused_as_a_group_of_points() {
    let errors = set_errors(&points(), r#"{"set":{"deviceAttrib":5}}"#);
    assert_contains(&errors["deviceAttrib"], &["is a group of points", MOTOR, SETPOINT, "not a point"]);
    let errors = set_errors(&points(), r#"{"set":{"deviceAttrib":{}}}"#);
    assert_contains(&errors["deviceAttrib"], &["group of points"]);
}

#[test]
fn a_null_an_array_or_an_object_is_not_a_value() {
    let pts = points();
    assert_contains(&set_errors(&pts, r#"{"set":{"deviceAttrib":{"setpoint":null}}}"#)[SETPOINT], &["null"]);
    assert_contains(&set_errors(&pts, r#"{"set":{"deviceAttrib":{"setpoint":[1]}}}"#)[SETPOINT], &["array"]);
    let errors = set_errors(&pts, r#"{"set":{"deviceAttrib":{"setpoint":{"value":1}}}}"#);
    assert!(errors.contains_key("deviceAttrib.setpoint.value"), "{errors:?}");
}

#[test]
fn one_point_given_twice_in_one_set_is_refused() {
    let errors = set_errors(&points(), r#"{"set":{"deviceAttrib":{"setpoint":5},"deviceAttrib.setpoint":60}}"#);
    assert!(errors.contains_key(SETPOINT), "{errors:?}");
}

// ---------------------------------------------------------------------------
// check_get

#[test]
fn get_star_reads_every_readable_point_but_not_the_write_only_one() {
    let pts = points();
    let all = check_get(&pts, None).expect("*");
    let paths: Vec<&str> = all.iter().map(|&i| pts[i].path.as_str()).collect();
    assert_eq!(paths, [MOTOR, SETPOINT, TEMPERATURE]);
}

#[test]
fn a_group_path_reads_its_readable_children() {
    let pts = points();
    let found = get(&pts, &["deviceAttrib"]).expect("group");
    assert_eq!(found, vec![index(&pts, MOTOR), index(&pts, SETPOINT)]);
    assert_eq!(get(&pts, &["deviceData"]), Ok(vec![index(&pts, TEMPERATURE)]));
}

#[test]
fn a_point_asked_twice_is_read_once() {
    let pts = points();
    let found = get(&pts, &[SETPOINT, "deviceAttrib", SETPOINT]).expect("valid");
    assert_eq!(found, vec![index(&pts, MOTOR), index(&pts, SETPOINT)]);
}

#[test]
fn an_unknown_path_is_refused_with_the_known_points() {
    let pts = points();
    let errors = get(&pts, &[SETPOINT, "deviceAttrib.motor"]).expect_err("unknown");
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["deviceAttrib.motor"], "a prefix of a name is not a group");
    assert_contains(&errors["deviceAttrib.motor"], &["unknown point", "known:", MOTOR]);
    assert!(get(&pts, &[""]).is_err());
    assert!(get(&pts, &["deviceAttrib."]).is_err());
}

#[test]
fn a_write_only_path_is_refused() {
    let errors = get(&points(), &[RESET]).expect_err("write-only");
    assert_contains(&errors[RESET], &["write-only"]);
}

// ---------------------------------------------------------------------------
// answer and summary

const T: u64 = 1_700_000_000_123;

#[test]
fn a_succeeded_answer_nests_values_by_path() {
    let on = Value::Text("on".into());
    let sp = Value::Float(42.5);
    let temp = Value::Float(21.5);
    let doc = answer(Some(&json!("c-1")), &Status::Succeeded, &[(MOTOR, &on), (SETPOINT, &sp), (TEMPERATURE, &temp)], &BTreeMap::new(), T);
    assert_eq!(
        doc,
        json!({
            "status": "succeeded",
            "time": T,
            "id": "c-1",
            "values": {"deviceAttrib": {"motorStatus": "on", "setpoint": 42.5}, "deviceData": {"temperature": 21.5}},
        })
    );
}

#[test]
fn a_succeeded_answer_without_values_has_no_values_key() {
    let doc = answer(Some(&json!(7)), &Status::Succeeded, &[], &BTreeMap::new(), T);
    assert_eq!(doc, json!({"status": "succeeded", "time": T, "id": 7}));
}

#[test]
fn a_failed_answer_carries_the_error_and_what_could_be_read() {
    let sp = Value::Float(40.0);
    let doc = answer(Some(&json!(7)), &Status::Failed("the device did not answer".into()), &[(SETPOINT, &sp)], &BTreeMap::new(), T);
    assert_eq!(
        doc,
        json!({"status": "failed", "time": T, "id": 7, "values": {"deviceAttrib": {"setpoint": 40.0}}, "error": "the device did not answer"})
    );
}

#[test]
fn a_rejected_answer_carries_the_errors_map_and_the_summary() {
    let mut errors = BTreeMap::new();
    errors.insert(SETPOINT.to_string(), "500 is above the maximum 80".to_string());
    let doc = answer(Some(&json!("c-9")), &Status::Rejected(summary(&errors)), &[], &errors, T);
    assert_eq!(
        doc,
        json!({
            "status": "rejected",
            "time": T,
            "id": "c-9",
            "errors": {"deviceAttrib.setpoint": "500 is above the maximum 80"},
            "error": "nothing was written: deviceAttrib.setpoint: 500 is above the maximum 80",
        })
    );
    assert!(doc.get("values").is_none());
}

#[test]
fn an_acknowledged_answer_is_status_time_and_id() {
    let doc = answer(Some(&json!("c-1")), &Status::Acknowledged, &[], &BTreeMap::new(), T);
    assert_eq!(doc, json!({"status": "acknowledged", "time": T, "id": "c-1"}));
}

#[test]
fn an_answer_without_an_id_has_no_id_key() {
    let doc = answer(None, &Status::Rejected("the payload is empty".into()), &[], &BTreeMap::new(), T);
    assert_eq!(doc, json!({"status": "rejected", "time": T, "error": "the payload is empty"}));
}

#[test]
fn a_value_the_device_holds_as_nan_is_answered_as_null() {
    let nan = Value::Float(f64::NAN);
    let doc = answer(None, &Status::Succeeded, &[(SETPOINT, &nan)], &BTreeMap::new(), T);
    assert_eq!(doc["values"]["deviceAttrib"]["setpoint"], Json::Null);
}

#[test]
fn the_summary_names_the_one_field_or_counts_them() {
    let mut errors = BTreeMap::new();
    errors.insert("b".to_string(), "bad b".to_string());
    assert_eq!(summary(&errors), "nothing was written: b: bad b");
    errors.insert("a".to_string(), "bad a".to_string());
    errors.insert("c".to_string(), "bad c".to_string());
    assert_eq!(summary(&errors), "nothing was written: 3 fields are invalid (a: bad a; ...)");
}

#[test]
fn a_bad_set_from_payload_to_answer_writes_nothing_and_explains_each_field() {
    let pts = points();
    let cmd = parse(br#"{"id":"c-5","set":{"deviceAttrib":{"motorStatus":"on","setpoint":500},"deviceData":{"temperature":1}}}"#);
    let Ok(Request::Set(leaves)) = &cmd.request else { panic!("{cmd:?}") };
    let errors = check_set(&pts, leaves).expect_err("two bad fields");
    let doc = answer(cmd.id.as_ref(), &Status::Rejected(summary(&errors)), &[], &errors, T);
    assert_eq!(doc["status"], "rejected");
    assert_eq!(doc["id"], "c-5");
    let errs = doc["errors"].as_object().expect("errors map");
    assert_eq!(errs.keys().collect::<Vec<_>>(), [SETPOINT, TEMPERATURE]);
    assert!(!errs.contains_key(MOTOR), "the valid field is not an error, and not written either");
    assert!(doc["error"].as_str().unwrap().starts_with("nothing was written: 2 fields are invalid"), "{doc}");
}

#[test]
fn a_payload_that_is_not_json_gets_a_rejected_answer_without_id() {
    let cmd = parse(b"\x00\x01binary");
    let why = cmd.request.clone().expect_err("binary");
    let doc = answer(cmd.id.as_ref(), &Status::Rejected(why), &[], &BTreeMap::new(), T);
    assert_eq!(doc["status"], "rejected");
    assert!(doc.get("id").is_none());
    assert!(doc["error"].as_str().is_some_and(|e| !e.is_empty()));
}

#[test]
fn an_answer_stays_small_whatever_the_command_held() {
    let points = points();
    let mut set = serde_json::Map::new();
    for n in 0..5000 {
        set.insert(format!("k{n}"), json!(1));
    }
    let cmd = parse(json!({"id": "x", "set": set}).to_string().as_bytes());
    let Ok(Request::Set(leaves)) = cmd.request else { panic!("a set") };
    let errors = check_set(&points, &leaves).expect_err("all unknown");
    assert_eq!(errors.len(), 21, "20 reasons and a count");
    assert!(errors["..."].contains("4980 more"));
    let doc = answer(cmd.id.as_ref(), &Status::Rejected(summary(&errors)), &[], &errors, 1);
    assert!(doc.to_string().len() < 8 * 1024, "{} bytes", doc.to_string().len());

    let long_id = "i".repeat(MAX_ID_BYTES + 1);
    let cmd = parse(json!({"id": long_id, "get": "*"}).to_string().as_bytes());
    assert_eq!(cmd.id, None, "a huge id is not echoed");
    assert!(cmd.request.is_err());
}

// ---------------------------------------------------------------------------
// Exact limits and scale steps, from JSON as a cloud sends it. These are the
// cases a hostile acceptance run against a real slave found written wrongly.

const METER: &str = "\
buses:
  b:
    tcp: { host: 127.0.0.1, port: 5020 }
devices:
  meter-1:
    bus: b
    unit: 1
    points:
      big.counter:  { holding: 0, type: u64, max: 9007199254740992 }
      big.offset:   { holding: 4, type: i64, min: -9007199254740992 }
      big.choice:   { holding: 8, type: u64, allowed: [9007199254740992, 9007199254740995] }
      energy.limit: { holding: 12, type: u32, scale: 0.01, max: 20000 }
      level:        { holding: 14, type: u16, scale: 0.1 }
";

/// Limits at the very ends of the 64-bit types.
const EXTREMES: &str = concat!(
    "      big.lowest:   { holding: 20, type: i64, min: -9223372036854775808, max: -9223372036854775807 }\n",
    "      big.highest:  { holding: 24, type: u64, min: 18446744073709551614 }\n",
    "      big.top:      { holding: 28, type: u64, allowed: [0, 18446744073709551615] }\n",
);

fn meter(extra: &str) -> Vec<Point> {
    let text = format!("{METER}{extra}");
    let config = Config::parse(&text, Path::new("gw.yaml")).unwrap_or_else(|e| panic!("the meter profile is valid:\n{e}"));
    config.devices[0].points.to_vec()
}

/// The registers that setting `path` to the JSON number `number` writes.
fn meter_words(points: &[Point], path: &str, number: &str) -> Vec<u16> {
    let leaves = vec![(path.to_string(), serde_json::from_str::<Json>(number).expect("a JSON number"))];
    match check_set(points, &leaves) {
        Ok(writes) => match &writes[..] {
            [(_, Encoded::Words(words))] => words.clone(),
            other => panic!("expected one register write, got {other:?}"),
        },
        Err(errors) => panic!("{path} = {number} was refused: {errors:?}"),
    }
}

/// Why setting `path` to the JSON number `number` is refused.
fn meter_refusal(points: &[Point], path: &str, number: &str) -> String {
    let leaves = vec![(path.to_string(), serde_json::from_str::<Json>(number).expect("a JSON number"))];
    match check_set(points, &leaves) {
        Err(errors) => errors[path].clone(),
        Ok(writes) => panic!("{path} = {number} was accepted: {writes:?}"),
    }
}

#[test]
fn a_u64_whose_maximum_is_2_pow_53_refuses_2_pow_53_plus_1() {
    let pts = meter("");
    let reason = meter_refusal(&pts, "big.counter", "9007199254740993");
    assert_contains(&reason, &["9007199254740993 is above the maximum 9007199254740992"]);
    assert_eq!(meter_words(&pts, "big.counter", "9007199254740992"), vec![0x0020, 0, 0, 0]);
}

#[test]
fn an_i64_whose_minimum_is_minus_2_pow_53_refuses_one_below() {
    let pts = meter("");
    let reason = meter_refusal(&pts, "big.offset", "-9007199254740993");
    assert_contains(&reason, &["-9007199254740993 is below the minimum -9007199254740992"]);
    assert_eq!(meter_words(&pts, "big.offset", "-9007199254740992"), vec![0xFFE0, 0, 0, 0]);
}

#[test]
fn a_u64_refuses_a_value_one_away_from_an_allowed_one_above_2_pow_53() {
    let pts = meter("");
    for asked in ["9007199254740993", "9007199254740994", "9007199254740996"] {
        let reason = meter_refusal(&pts, "big.choice", asked);
        assert_contains(&reason, &["not an allowed value", "9007199254740992, 9007199254740995"]);
    }
    assert_eq!(meter_words(&pts, "big.choice", "9007199254740995"), vec![0x0020, 0, 0, 3]);
}

#[test]
fn the_extremes_of_i64_and_u64_are_limits_compared_exactly() {
    let pts = meter(EXTREMES);
    assert_eq!(meter_words(&pts, "big.lowest", "-9223372036854775808"), vec![0x8000, 0, 0, 0]);
    assert_eq!(meter_words(&pts, "big.lowest", "-9223372036854775807"), vec![0x8000, 0, 0, 1]);
    assert!(meter_refusal(&pts, "big.lowest", "-9223372036854775806").contains("above the maximum -9223372036854775807"));
    assert_eq!(meter_words(&pts, "big.highest", "18446744073709551614"), vec![0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE]);
    assert!(meter_refusal(&pts, "big.highest", "18446744073709551613").contains("below the minimum 18446744073709551614"));
    assert_eq!(meter_words(&pts, "big.top", "18446744073709551615"), vec![0xFFFF; 4]);
    assert!(meter_refusal(&pts, "big.top", "18446744073709551614").contains("not an allowed value"));
}

#[test]
fn a_scaled_value_between_two_steps_is_refused_with_the_nearest_valid_values() {
    let pts = meter("");
    let cases = [("5000.003", "5000 and 5000.01"), ("2000.0004", "2000 and 2000.01"), ("10000.006", "10000 and 10000.01")];
    for (asked, around) in cases {
        let reason = meter_refusal(&pts, "energy.limit", asked);
        assert_contains(&reason, &[&format!("{asked} is between two steps of 0.01: nearest valid values {around}")]);
    }
    assert_eq!(meter_words(&pts, "energy.limit", "5000.01"), vec![0x0007, 0xA121]); // 500001
}

#[test]
fn floating_point_noise_such_as_0_1_plus_0_2_counts_as_the_step_it_misses() {
    let pts = meter("");
    assert_eq!(meter_words(&pts, "level", &format!("{}", 0.1 + 0.2)), vec![3]);
    assert_eq!(meter_words(&pts, "level", "0.3"), vec![3]);
    assert!(meter_refusal(&pts, "level", "0.31").contains("nearest valid values 0.3 and 0.4"));
}

#[test]
fn a_key_given_twice_in_one_object_is_refused_not_resolved_silently() {
    for payload in [
        r#"{"id":"d","set":{"deviceAttrib":{"setpoint":10,"setpoint":70}}}"#,
        r#"{"id":"d","set":{"deviceAttrib":{"setpoint":10},"deviceAttrib":{"motorStatus":"on"}}}"#,
        r#"{"id":"d","get":"*","get":["x"]}"#,
    ] {
        let cmd = parse(payload.as_bytes());
        let why = cmd.request.expect_err(payload);
        assert!(why.contains("appears twice"), "{payload}: {why}");
    }
    // The same key in two different objects is fine.
    let ok = parse(br#"{"id":"d","set":{"a":{"x":1},"b":{"x":2}}}"#);
    assert!(ok.request.is_ok());
}

#[test]
fn a_json_number_reads_as_the_f64_nearest_to_its_digits() {
    // serde_json's default parser can land one unit in the last place away
    // (found by the `write` fuzz target); an f64 point must hold the nearest.
    for text in ["3.132574904351965e150", "9007199254740993.0", "0.30000000000000004", "2.2250738585072011e-308", "1.7976931348623157e308"] {
        let Request::Set(leaves) = request(&format!(r#"{{"set":{{"x":{text}}}}}"#)) else { panic!("a set") };
        let read = leaves[0].1.as_f64().expect("a number");
        let nearest: f64 = text.parse().expect("Rust's parser rounds correctly");
        assert_eq!(read.to_bits(), nearest.to_bits(), "{text} read as {read:?}, not {nearest:?}");
    }
}

#[test]
fn the_summary_counts_every_invalid_field_also_past_the_cap() {
    // 25 unknown points: 20 listed, "..." says 5 more; the summary counted
    // the listed entries and led with "...: 5 more fields are invalid".
    let leaves: Vec<(String, Json)> = (0..25).map(|i| (format!("k{i:02}"), json!(i))).collect();
    let Err(errors) = check_set(&points(), &leaves) else { panic!("unknown points are refused") };
    assert_eq!(errors.len(), 21);
    assert_eq!(errors["..."], "5 more fields are invalid");
    let said = summary(&errors);
    assert!(said.starts_with("nothing was written: 25 fields are invalid (k00: unknown point (known: "), "{said}");
}
