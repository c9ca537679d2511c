//! The gateway as a separate process, so that its CPU time and memory are
//! its own (the simulators, the broker and the bench's clients run elsewhere).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The release binary, built first if needed (`cargo run --example` does not build it).
pub fn twinbus_binary() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo).args(["build", "--release", "--quiet", "--bin", "twinbus"]).current_dir(root).status()?;
    anyhow::ensure!(status.success(), "cargo build --release --bin twinbus failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    Ok(target.join("release/twinbus"))
}

/// A running child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
}

impl Proc {
    /// Starts `binary args…`, its output in `log`.
    pub fn start(binary: &Path, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(log)?;
        let child = Command::new(binary).args(args).env("RUST_LOG", "warn").stdout(out.try_clone()?).stderr(out).stdin(Stdio::null()).spawn()?;
        Ok(Proc { child })
    }

    /// Resident memory now, and how much of it is the process's own.
    pub fn memory(&self) -> Memory {
        let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", self.child.id())).unwrap_or_default();
        let field = |name: &str| {
            rollup.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
        };
        Memory { rss_kib: field("Rss:"), anon_kib: field("Anonymous:") }
    }

    /// CPU time used so far (user + system), from /proc/PID/stat.
    pub fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        Duration::from_millis(ticks * 1000 / clock_ticks())
    }

    /// Whether it is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Resident memory of a process, in KiB.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// All of it (what `ps` and `top` show as RSS).
    pub rss_kib: u64,
    /// Its heap and stacks, which only it can use. The rest of the RSS is the
    /// binary's and the C library's code mapped from the page cache: shared
    /// with every other process that maps them, and dropped by the kernel
    /// under memory pressure instead of being swapped.
    pub anon_kib: u64,
}

impl Memory {
    /// `"R MiB (own: A MiB)"`.
    pub fn show(&self) -> String {
        format!("{:.1} MiB (own {:.1})", self.rss_kib as f64 / 1024.0, self.anon_kib as f64 / 1024.0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn clock_ticks() -> u64 {
    // getconf CLK_TCK; 100 on every Linux this runs on.
    Command::new("getconf").arg("CLK_TCK").output().ok().and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok()).unwrap_or(100)
}

/// A port free on loopback now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A fresh directory under the temp dir for one run.
pub fn run_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("twinbus-bench-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
