//! Log output: text for people (colour only on a terminal) or JSON lines for
//! a log shipper, always on stderr.
//!
//! Command keys, client ids and topics come from the network and end up in
//! log lines. A newline inside one would start a forged line in journald or
//! a log file, so every event is written through [`OneLine`], which escapes
//! line breaks and other control characters inside the event (JSON output
//! escapes them itself). Policy on volume: one line per state change (a
//! device going offline or back, a connection lost or back, a command and
//! its outcome), never one per poll; `RUST_LOG=debug` shows more.

use std::io::{self, IsTerminal as _, Write};

use tracing_subscriber::fmt::MakeWriter;

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the process-wide subscriber. `RUST_LOG` filters (default: info,
/// and warnings only from the MQTT libraries).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmqtt=warn,rmqtt_net=warn,rumqttc=warn"));
    // Colour only on a terminal: journald and `docker logs` show escapes as is.
    let ansi = io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(OneLine { keep_escape: ansi });
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Writes each formatted event to stderr with its inner control characters
/// escaped; `keep_escape` lets the colour codes of a terminal through.
#[derive(Clone, Copy, Debug)]
struct OneLine {
    keep_escape: bool,
}

impl<'a> MakeWriter<'a> for OneLine {
    type Writer = OneLineWriter;

    fn make_writer(&'a self) -> OneLineWriter {
        OneLineWriter { keep_escape: self.keep_escape }
    }
}

#[derive(Debug)]
struct OneLineWriter {
    keep_escape: bool,
}

impl Write for OneLineWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter hands over one whole event per call.
        io::stderr().lock().write_all(&escape_event(buf, self.keep_escape))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `event` with control characters other than its final newline (and tabs,
/// and ESC when colours are on) written as `\n`, `\r`, `\x07`...
fn escape_event(event: &[u8], keep_escape: bool) -> Vec<u8> {
    let (body, end) = match event.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (event, &b""[..]),
    };
    let mut out = Vec::with_capacity(event.len());
    for &b in body {
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.push(b),
            0x1b if keep_escape => out.push(b),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.extend_from_slice(end);
    out
}

#[cfg(test)]
mod tests {
    use super::escape_event;

    #[test]
    fn a_newline_inside_an_event_cannot_forge_a_second_log_line() {
        let event = b"INFO command rejected reason=unknown point deviceAttrib.x\nERROR forged line\n";
        let out = String::from_utf8(escape_event(event, false)).expect("utf-8");
        assert_eq!(out, "INFO command rejected reason=unknown point deviceAttrib.x\\nERROR forged line\n");
        assert_eq!(out.matches('\n').count(), 1);
    }

    #[test]
    fn escape_codes_pass_only_when_colours_are_on() {
        assert_eq!(escape_event(b"\x1b[31mred\x1b[0m\r\n", true), b"\x1b[31mred\x1b[0m\\r\n");
        assert_eq!(escape_event(b"\x1b[31m\x07\n", false), b"\\x1b[31m\\x07\n");
    }
}
