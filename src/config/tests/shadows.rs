//! A device bound to several shadows, and shadows sized to fit in 8 KB.

use super::*;

/// A device `big` with the pump profile and `n` input registers
/// `deviceData.pNNN`, whose twin is `twin` (a YAML flow mapping's body).
fn big(n: usize, twin: &str) -> String {
    let mut points = String::new();
    for i in 0..n {
        points += &format!("      deviceData.p{i:03}: {{ input: {}, type: u32, scale: 0.01 }}\n", 100 + 2 * i);
    }
    format!("{HEAD}devices:\n  big:\n    bus: line\n    unit: 1\n    profile: pump\n    points:\n{points}    twin: {{ connection: cloud, {twin} }}\n")
}

#[test]
fn a_device_too_large_for_one_shadow_is_refused_with_a_split_that_fits() {
    let text = big(240, "shadow: { thing: big }");
    let problem = only_problem(&text, line_of(&text, "shadow: { thing: big }"), "devices.big.twin.shadow", &["8192 bytes", "shadows: ["]);
    // The split it proposes is a valid configuration.
    let start = problem.find("`shadows: [").expect("a split") + 1;
    let end = problem[start..].find('`').map(|e| start + e).expect("its end");
    let split = &problem[start..end];
    let fixed = valid(&big(240, split));
    let shadows = &fixed.devices[0].twin.as_ref().expect("twin").shadows;
    assert!(shadows.len() >= 2, "{split}");
    let served: usize = shadows.iter().map(|s| s.points.len()).sum();
    assert_eq!(served, 243, "every point in exactly one shadow: {split}");
}

#[test]
fn a_device_spreads_its_points_over_shadows_by_prefix_and_one_shadow_takes_the_rest() {
    let c = valid(&big(240, r#"shadows: [ { thing: big, name: attrib }, { thing: big, name: low, points: ["deviceData.p0*"] }, { thing: big, name: high, points: ["deviceData.p1*", "deviceData.p2*"] } ]"#));
    let t = c.devices[0].twin.as_ref().expect("twin");
    let paths = |i: usize| -> Vec<&str> { t.shadows[i].points.iter().map(|n| c.devices[0].points[*n].path.as_str()).collect() };
    assert_eq!(paths(0), vec!["deviceAttrib.motorStatus", "deviceAttrib.setpoint", "deviceData.temperature"], "the rest");
    assert_eq!(paths(1).len(), 100);
    assert!(paths(1).contains(&"deviceData.p099") && !paths(1).contains(&"deviceData.p100"));
    assert_eq!(paths(2).len(), 140);
    assert_eq!(t.shadows[2].prefix(), "$aws/things/big/shadow/name/high");
}

#[test]
fn shadow_points_are_checked_all_at_once() {
    let text = big(4, r#"shadows: [ { thing: big, name: a, points: [deviceData.p0*, nowhere] }, { thing: big, name: b, points: ["deviceData.p00*"] }, { thing: big, name: c }, { thing: big, name: d } ]"#);
    let ps = problems(&text);
    let line = line_of(&text, "nowhere");
    expect_problem(&ps, line, "devices.big.twin.shadows[0].points", &["\"nowhere\" matches none"]);
    expect_problem(&ps, line, "devices.big.twin.shadows[1].points", &["claimed by devices.big.twin.shadows[0] and devices.big.twin.shadows[1]"]);
    expect_problem(&ps, line, "devices.big.twin.shadows[3]", &["only one shadow may leave out `points`"]);

    let twice = big(1, "shadow: { thing: big }, shadows: [ { thing: big, name: x } ]");
    expect_problem(&problems(&twice), line_of(&twice, "shadows: ["), "devices.big.twin.shadows", &["both `shadow` and `shadows`"]);
    let same = big(1, "shadows: [ { thing: big, name: x, points: [deviceAttrib] }, { thing: big, name: x } ]");
    expect_problem(&problems(&same), line_of(&same, "shadows: ["), "devices.big.twin.shadows[1]", &["is already this shadow"]);
}

#[test]
fn points_in_no_shadow_draw_a_warning() {
    let c = valid(&big(2, "shadow: { thing: big, points: [deviceAttrib] }"));
    assert!(c.warnings.iter().any(|w| w.contains("no shadow serves 3 of the device's points")), "{:?}", c.warnings);
}
