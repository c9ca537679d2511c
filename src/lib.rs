//! twinbus: an edge gateway that gives every Modbus device a cloud digital twin.
//!
//! The data flows one way in and one way out:
//! connection (`mqtt`) → twin adapter (`twin`) → device actor (`device`) →
//! bus owner (`modbus`) → wire, and back. `config` validates everything before
//! any of it starts; `gateway` wires the parts together. See ARCHITECTURE.md.
#![warn(unreachable_pub, missing_debug_implementations)]

pub mod commission;
pub mod config;
pub mod console;
pub mod device;
pub mod gateway;
pub mod http;
pub mod journal;
pub mod lifecycle;
pub mod logs;
pub mod modbus;
pub mod memory;
pub mod mqtt;
pub mod point;
pub mod reload;
pub mod sim;
pub mod store;
pub mod systemd;
pub mod twin;
