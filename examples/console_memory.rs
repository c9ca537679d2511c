//! Measurement: what the local web console costs, in page weight and in the
//! gateway's memory, on a site of 100 devices.
//!
//! Starts two gateway processes (the release binary) on the same site: 100
//! demo pumps (six points each, four of them numeric and two drifting),
//! polled every second from the gateway's own simulator, with the embedded
//! broker. One has `http.console: true` and is watched the way a person
//! would: its overview and one device page open as event streams the whole
//! time; the other has the HTTP listener without the console. It prints the
//! page weight, then both resident set sizes (VmRSS) every 30 s and the
//! difference: what the console adds. A point's chart history fills up in
//! five minutes, so run it for 330 s or more to see the bound reached.
//!
//! Run: `cargo build --release && cargo run --release --example console_memory [SECONDS]`
//! (default 330; `TWINBUS_BIN` names another binary).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICES: usize = 100;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn config(dir: &std::path::Path, console: bool) -> anyhow::Result<(std::path::PathBuf, SocketAddr)> {
    let (mqtt, modbus, http) = (free_port()?, free_port()?, free_port()?);
    let mut devices = String::new();
    for i in 1..=DEVICES {
        devices += &format!("  pump-{i:03}: {{ bus: line, unit: {i}, profile: pump, poll: 1s }}\n");
    }
    let served: Vec<String> = (1..=DEVICES).map(|i| format!("pump-{i:03}")).collect();
    let name = if console { "with-console" } else { "without" };
    let yaml = format!(
        r#"state_dir: {state}
connections:
  local: {{ embedded: {{ listen: "127.0.0.1:{mqtt}" }} }}
buses:
  line: {{ tcp: {{ host: 127.0.0.1, port: {modbus} }}, timeout: 500ms }}
profiles:
  pump:
    points:
      deviceAttrib.motorStatus: {{ coil: 0, values: {{ on: true, off: false }} }}
      deviceAttrib.setpoint:    {{ holding: 10, type: f32, min: 0, max: 80 }}
      deviceAttrib.mode:        {{ holding: 12, values: {{ auto: 0, manual: 1 }} }}
      deviceData.running:       {{ input: 1, access: read }}
      deviceData.temperature:   {{ input: 0, type: i16, scale: 0.1 }}
      deviceData.runHours:      {{ input: 2, type: u32 }}
devices:
{devices}http: {{ listen: "127.0.0.1:{http}", console: {console} }}
simulators:
  sim: {{ listen: "127.0.0.1:{modbus}", serves: [{served}], initial: {{ deviceData.temperature: 21.5, deviceData.runHours: 1234 }}, drift: [deviceData.temperature, deviceData.runHours] }}
"#,
        state = dir.join(format!("state-{name}")).display(),
        served = served.join(", "),
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml)?;
    Ok((path, format!("127.0.0.1:{http}").parse()?))
}

fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = raw.windows(4).position(|w| w == b"\r\n\r\n").map(|i| raw[i + 4..].to_vec()).unwrap_or_default();
    Ok((status, body))
}

/// Keeps an event stream open in a thread, counting what it receives.
fn watch(addr: SocketAddr, path: &'static str, bytes: Arc<AtomicU64>, events: Arc<AtomicU64>) {
    std::thread::spawn(move || -> anyhow::Result<()> {
        let mut s = TcpStream::connect(addr)?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n")?;
        let mut lines = BufReader::new(s);
        let mut line = String::new();
        while lines.read_line(&mut line)? > 0 {
            bytes.fetch_add(line.len() as u64, Ordering::Relaxed);
            if line.starts_with("data:") {
                events.fetch_add(1, Ordering::Relaxed);
            }
            line.clear();
        }
        Ok(())
    });
}

fn rss_kib(child: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

struct Running(Vec<Child>);

impl Drop for Running {
    fn drop(&mut self) {
        for c in &mut self.0 {
            // SIGTERM by pid, then wait: the gateway stops in order.
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let _ = c.wait();
        }
    }
}

fn main() -> anyhow::Result<()> {
    let seconds: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(330);
    let bin = std::env::var("TWINBUS_BIN").unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/twinbus").to_string());
    let dir = std::env::temp_dir().join(format!("twinbus-console-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (plain_yaml, plain_addr) = config(&dir, false)?;
    let (console_yaml, console_addr) = config(&dir, true)?;
    let spawn = |yaml: &std::path::Path| Command::new(&bin).arg("-c").arg(yaml).env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::null()).spawn();
    let running = Running(vec![spawn(&plain_yaml)?, spawn(&console_yaml)?]);
    let ready = |addr| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while get(addr, "/readyz").map(|(s, _)| s).unwrap_or(0) != 200 {
            anyhow::ensure!(Instant::now() < deadline, "{addr} not ready within 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    ready(plain_addr)?;
    ready(console_addr)?;

    let mut weight = 0;
    for path in ["/console/", "/console/app.js", "/console/app.css"] {
        let (status, body) = get(console_addr, path)?;
        anyhow::ensure!(status == 200, "{path}: {status}");
        println!("{path:<18} {:>6} bytes", body.len());
        weight += body.len();
    }
    let (_, overview) = get(console_addr, "/console/api/overview")?;
    let (_, device) = get(console_addr, "/console/api/device/pump-001")?;
    println!("page weight: {weight} bytes; data: overview {} bytes, a device page {} bytes (JSON, uncompressed)", overview.len(), device.len());

    let (bytes, events) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    watch(console_addr, "/console/events", bytes.clone(), events.clone());
    watch(console_addr, "/console/events/device/pump-001", bytes.clone(), events.clone());
    println!("{DEVICES} devices polled every second; the console's overview and one device page open for {seconds} s");
    println!("{:>6}  {:>12}  {:>12}  {:>10}  {:>12}", "s", "without kB", "console kB", "added kB", "events/s");
    let started = Instant::now();
    let mut next = 0;
    let (plain, with) = (&running.0[0], &running.0[1]);
    while started.elapsed().as_secs() <= seconds {
        if started.elapsed().as_secs() >= next {
            let (a, b) = (rss_kib(plain), rss_kib(with));
            let rate = events.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64().max(1.0);
            println!("{:>6}  {a:>12}  {b:>12}  {:>10}  {rate:>12.1}", started.elapsed().as_secs(), b as i64 - a as i64);
            next += 30;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let (a, b) = (rss_kib(plain), rss_kib(with));
    let secs = started.elapsed().as_secs_f64();
    println!(
        "after {secs:.0} s: without the console {a} kB, with it open {b} kB: the console adds {} kB; its streams sent {:.1} events/s, {:.1} kB/s",
        b as i64 - a as i64,
        events.load(Ordering::Relaxed) as f64 / secs,
        bytes.load(Ordering::Relaxed) as f64 / secs / 1024.0
    );
    drop(running);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
