//! What a reload changes: a pure comparison of the running config with a
//! newly validated one, decided before anything is touched.
//!
//! Devices and buses are compared by name, with everything that makes them
//! what they are: a device whose points, unit, poll, commands or twin
//! changed is restarted; one whose bus changed is restarted with the bus.
//! Connections, the embedded broker's listener, the HTTP listener and the
//! state directory are not reloaded: sessions, outboxes and sockets would
//! have to be rebuilt, which is what a restart does. A change to any of
//! them refuses the whole reload (nothing is half-applied), and says which
//! ones and how to apply them. Simulators (the demo's) are left running as
//! they are, with a warning.

use crate::config::{Config, Device};

/// What a reload does, by name.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Buses to start.
    pub add_buses: Vec<String>,
    /// Buses to stop (after their devices).
    pub remove_buses: Vec<String>,
    /// Buses whose settings changed: stopped and started again, with every
    /// device on them.
    pub restart_buses: Vec<String>,
    /// Devices to start.
    pub add_devices: Vec<String>,
    /// Devices to stop.
    pub remove_devices: Vec<String>,
    /// Devices to stop and start again, with what changed.
    pub restart_devices: Vec<(String, String)>,
    /// Devices left running as they are.
    pub unchanged: usize,
    /// What the reload leaves as it was, though it changed in the file.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Whether the reload changes nothing that runs.
    pub fn is_empty(&self) -> bool {
        self.add_buses.is_empty()
            && self.remove_buses.is_empty()
            && self.restart_buses.is_empty()
            && self.add_devices.is_empty()
            && self.remove_devices.is_empty()
            && self.restart_devices.is_empty()
    }
}

/// Compares the running config with the new one. `Err` lists each change
/// that needs a restart; then nothing is to be applied.
pub fn plan(old: &Config, new: &Config) -> Result<Plan, Vec<String>> {
    let mut refused = Vec::new();
    if old.connections.len() != new.connections.len() || old.connections.iter().zip(&new.connections).any(|(a, b)| a.name != b.name) {
        refused.push("the list of connections changed".to_string());
    } else {
        for (a, b) in old.connections.iter().zip(&new.connections) {
            if a != b {
                refused.push(format!("connection `{}` changed", a.name));
            }
        }
    }
    if old.state_dir != new.state_dir {
        refused.push("state_dir changed".to_string());
    }
    if old.http != new.http {
        refused.push("http changed".to_string());
    }
    if !refused.is_empty() {
        return Err(refused);
    }

    let mut plan = Plan::default();
    if old.simulators != new.simulators {
        plan.warnings.push("simulators changed: a reload leaves them as they were; restart the gateway to apply".to_string());
    }
    if old.shutdown_timeout != new.shutdown_timeout {
        plan.warnings.push("shutdown_timeout changed: it applies from now on".to_string());
    }
    for b in &new.buses {
        match old.buses.iter().find(|o| o.name == b.name) {
            None => plan.add_buses.push(b.name.clone()),
            Some(o) if o != b => plan.restart_buses.push(b.name.clone()),
            Some(_) => {}
        }
    }
    for o in &old.buses {
        if !new.buses.iter().any(|b| b.name == o.name) {
            plan.remove_buses.push(o.name.clone());
        }
    }
    for d in &new.devices {
        let Some(o) = old.devices.iter().find(|o| o.name == d.name) else {
            plan.add_devices.push(d.name.clone());
            continue;
        };
        let bus = &new.buses[d.bus].name;
        let changed = if plan.restart_buses.contains(bus) {
            vec![format!("bus {bus}")]
        } else {
            differences(old, o, new, d)
        };
        if changed.is_empty() {
            plan.unchanged += 1;
        } else {
            plan.restart_devices.push((d.name.clone(), changed.join(", ")));
        }
    }
    for o in &old.devices {
        if !new.devices.iter().any(|d| d.name == o.name) {
            plan.remove_devices.push(o.name.clone());
        }
    }
    Ok(plan)
}

/// What differs between two configs of one device, as field names.
fn differences(old_config: &Config, old: &Device, new_config: &Config, new: &Device) -> Vec<String> {
    let mut out = Vec::new();
    let mut note = |differs: bool, what: &str| {
        if differs {
            out.push(what.to_string());
        }
    };
    // Indices may shift when buses or devices are added before this one:
    // what counts is the bus's name.
    note(old_config.buses[old.bus].name != new_config.buses[new.bus].name, "bus");
    note(old.unit != new.unit, "unit");
    note(old.points != new.points, "points");
    note(old.read != new.read || old.mask_write != new.mask_write, "read/write settings");
    note(old.poll != new.poll, "poll");
    note(old.commands != new.commands, "commands");
    // Connections are the same list (else the reload was refused), so their
    // indices compare as they are.
    note(old.twin != new.twin, "twin");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const BUSES: &str = r#"
buses:
  line1:
    tcp: { host: 127.0.0.1, port: 5020 }
  line2:
    tcp: { host: 127.0.0.1, port: 5021 }
"#;

    fn config(buses: &str, devices: &str) -> Config {
        let base = r#"
state_dir: /tmp/twinbus-reload-plan
connections:
  local:
    url: mqtt://127.0.0.1:1883
profiles:
  pump:
    points:
      speed: { holding: 0, type: u16 }
      running: { coil: 0 }
"#;
        match Config::parse(&format!("{base}{buses}{devices}"), Path::new("gateway.yaml")) {
            Ok(c) => c,
            Err(e) => panic!("test config: {e}"),
        }
    }

    const TWO: &str = r#"
devices:
  pump1: { bus: line1, unit: 1, profile: pump, twin: { connection: local, commands: pumps/1/cmd, responses: pumps/1/res } }
  pump2: { bus: line2, unit: 2, profile: pump, twin: { connection: local, commands: pumps/2/cmd, responses: pumps/2/res } }
"#;

    #[test]
    fn the_same_file_changes_nothing() {
        let p = plan(&config(BUSES, TWO), &config(BUSES, TWO)).expect("reloadable");
        assert!(p.is_empty());
        assert_eq!(p.unchanged, 2);
    }

    #[test]
    fn devices_are_added_removed_and_restarted_by_name_and_the_rest_left_alone() {
        let new = r#"
devices:
  pump2: { bus: line2, unit: 2, profile: pump, poll: 5s, twin: { connection: local, commands: pumps/2/cmd, responses: pumps/2/res } }
  pump3: { bus: line1, unit: 3, profile: pump }
"#;
        let p = plan(&config(BUSES, TWO), &config(BUSES, new)).expect("reloadable");
        assert_eq!(p.add_devices, vec!["pump3"]);
        assert_eq!(p.remove_devices, vec!["pump1"]);
        assert_eq!(p.restart_devices, vec![("pump2".to_string(), "poll".to_string())]);
        assert_eq!(p.unchanged, 0);
        assert!(p.add_buses.is_empty() && p.remove_buses.is_empty() && p.restart_buses.is_empty());
    }

    #[test]
    fn a_device_moved_to_another_bus_or_twin_topic_is_restarted() {
        let new = r#"
devices:
  pump1: { bus: line2, unit: 1, profile: pump, twin: { connection: local, commands: pumps/1/cmd, responses: pumps/1/res } }
  pump2: { bus: line2, unit: 2, profile: pump, twin: { connection: local, commands: pumps/2/cmd, responses: pumps/2/answers } }
"#;
        let p = plan(&config(BUSES, TWO), &config(BUSES, new)).expect("reloadable");
        assert_eq!(p.restart_devices, vec![("pump1".to_string(), "bus".to_string()), ("pump2".to_string(), "twin".to_string())]);
    }

    #[test]
    fn a_changed_bus_restarts_with_its_devices_only() {
        let old = config(BUSES, TWO);
        let mut new = config(BUSES, TWO);
        new.buses[0].timeout *= 2;
        let p = plan(&old, &new).expect("reloadable");
        assert_eq!(p.restart_buses, vec!["line1"]);
        assert_eq!(p.restart_devices, vec![("pump1".to_string(), "bus line1".to_string())]);
        assert_eq!(p.unchanged, 1);
    }

    #[test]
    fn a_changed_connection_or_listener_refuses_the_whole_reload_naming_each() {
        let old = config(BUSES, TWO);
        let mut new = config(BUSES, TWO);
        new.connections[0].keep_alive *= 2;
        new.state_dir = "/elsewhere".into();
        new.devices.pop();
        let refused = plan(&old, &new).expect_err("needs a restart");
        assert_eq!(refused, vec!["connection `local` changed".to_string(), "state_dir changed".to_string()]);
    }

    #[test]
    fn adding_a_bus_and_a_device_before_the_others_shifts_no_one_else() {
        let buses = r#"
buses:
  line0:
    tcp: { host: 127.0.0.1, port: 5019 }
  line1:
    tcp: { host: 127.0.0.1, port: 5020 }
  line2:
    tcp: { host: 127.0.0.1, port: 5021 }
"#;
        let devices = TWO.replace("devices:\n", "devices:\n  meter: { bus: line0, unit: 9, profile: pump }\n");
        let p = plan(&config(BUSES, TWO), &config(buses, &devices)).expect("reloadable");
        assert_eq!(p.add_buses, vec!["line0"]);
        assert_eq!(p.add_devices, vec!["meter"]);
        assert!(p.restart_devices.is_empty(), "{:?}", p.restart_devices);
        assert_eq!(p.unchanged, 2);
    }
}
