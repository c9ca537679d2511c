//! Cloud dialects: turn MQTT payloads into typed point operations and back.
//!
//! `json` maps point paths and typed values to JSON documents; `command` is
//! the raw command-response protocol (OCI IoT style) as pure functions;
//! `raw` and `telemetry` are the adapter tasks that connect a device actor to
//! an MQTT connection; `shadow` is the AWS IoT device shadow dialect.

pub mod command;
pub mod json;
mod raw;
mod sequence;
mod shadow;
mod telemetry;

pub use raw::{raw_adapter, run_commands, RawInbox, RawWorker};
pub use shadow::{replay as shadow_replay, run_shadow, shadow_inbox, shadow_topics, ShadowInbox, ShadowRoute};
pub use telemetry::{document as telemetry_document, run_telemetry};

/// Milliseconds since the Unix epoch, the `time` of every document we publish.
pub fn epoch_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `epoch_ms` of now.
pub(crate) fn now_ms() -> u64 {
    epoch_ms(std::time::SystemTime::now())
}
