//! The `twinbus` command line.
//!
//! Exit codes: 0 on success (including a graceful stop on SIGINT, SIGTERM or
//! an allowed remote shutdown); 1 when the configuration is invalid (the
//! report names file, line, column, field and what would be valid); 2 when
//! the gateway could not start or failed while running (e.g. a port in use,
//! or one of its tasks panicked: the service manager should restart it), or
//! the command line was wrong; `read`, `write` and `scan` exit 3 when the
//! request does not fit the configuration (nothing was sent) and 4 when the
//! device or the line failed;
//! 130 when a second SIGINT/SIGTERM cut the shutdown short. SIGHUP reloads
//! the config file (see [`reload`]). Errors are printed once, as
//! `twinbus: error: ...` with their causes. Logs go to stderr, in colour only
//! on a terminal. Under systemd, `run` reports readiness, pings the watchdog
//! and announces its stop (see `twinbus::systemd`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use twinbus::config::Config;
use twinbus::gateway::Gateway;
use twinbus::logs::LogFormat;
use twinbus::systemd::{self, Note};

/// twinbus: cloud digital twins for Modbus RTU and TCP devices, over MQTT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file.
    #[arg(short, long, global = true, env = "TWINBUS_CONFIG", default_value = "gateway.yaml")]
    config: PathBuf,
    /// Log lines as readable text or as JSON objects (one per line, for a log shipper).
    #[arg(long, global = true, env = "TWINBUS_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration and exit: 0 when valid, 1 with a report when not.
    Check,
    /// Run only the simulators of the configuration (a Modbus TCP slave).
    Simulate,
    /// Print the JSON Schema of the configuration file, for editors.
    ///
    /// The repository ships it as twinbus.schema.json; gateway.yaml names it
    /// in its first line, which YAML language servers (VS Code's YAML
    /// extension, Neovim's yamlls) read to complete and check the file:
    ///
    ///     twinbus schema > twinbus.schema.json
    ///     # yaml-language-server: $schema=./twinbus.schema.json
    Schema,
    /// Read points of a device now, without the cloud.
    ///
    /// Starts only that device's bus (stop the gateway first if it holds a
    /// serial port). With no POINT, reads every readable point; a group path
    /// (deviceAttrib) reads every point under it. Exit status 3 when a point
    /// is unknown, 4 when the device or the line fails.
    ///
    ///     twinbus read pump-1
    ///     twinbus read pump-1 deviceAttrib.setpoint deviceData
    #[command(verbatim_doc_comment)]
    Read {
        /// The device, as named under `devices:`.
        device: String,
        /// Point paths or groups to read (default: every readable point).
        points: Vec<String>,
    },
    /// Write one point through the checks of a cloud command, and read it back.
    ///
    /// VALUE is JSON (42, 21.5, true, "on") or a label written bare (on).
    /// Nothing is written when the value is not allowed (exit status 3);
    /// exit status 4 when the device or the line fails.
    ///
    ///     twinbus write pump-1 deviceAttrib.setpoint 42.5
    ///     twinbus write pump-1 deviceAttrib.motorStatus on
    #[command(verbatim_doc_comment)]
    Write {
        /// The device, as named under `devices:`.
        device: String,
        /// The point's path.
        point: String,
        /// The value.
        value: String,
    },
    /// Find which unit ids answer on a bus.
    ///
    /// Sends each unit one read (holding register ADDRESS, function 3; or an
    /// input register with --input), without retries. A unit that answers,
    /// even with a Modbus exception, is there. Stop the gateway first if it
    /// holds the serial port. On RS-485 at 9600 Bd with a 300 ms timeout,
    /// 247 silent units take about 75 s: narrow --units when you can.
    ///
    ///     twinbus scan rs485
    ///     twinbus scan rs485 --units 1-20 --timeout 200ms
    #[command(verbatim_doc_comment)]
    Scan {
        /// The bus, as named under `buses:`.
        bus: String,
        /// Unit ids to probe: one (5) or a range (1-247).
        #[arg(long, default_value = "1-247", value_parser = twinbus::commission::parse_units)]
        units: std::ops::RangeInclusive<u8>,
        /// Register to read (zero-based).
        #[arg(long, default_value_t = 0)]
        address: u16,
        /// Read an input register (function 4) instead of a holding register.
        #[arg(long)]
        input: bool,
        /// How long to wait for each unit (default: the bus's timeout).
        #[arg(long, value_parser = humantime::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    twinbus::logs::init(cli.log_format);
    if let Some(Command::Schema) = cli.command {
        print!("{}", Config::schema());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("twinbus: {e}");
            return ExitCode::from(1);
        }
    };
    twinbus::memory::give_back_freed();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Check = command {
        for w in &config.warnings {
            eprintln!("twinbus: warning: {w}");
        }
        println!(
            "{}: ok ({} devices, {} buses, {} connections)",
            config.source.display(),
            config.devices.len(),
            config.buses.len(),
            config.connections.len()
        );
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("twinbus: error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let commissioning = runtime.block_on(async {
        match &command {
            Command::Read { device, points } => Some(twinbus::commission::read(&config, device, points).await),
            Command::Write { device, point, value } => Some(twinbus::commission::write(&config, device, point, value).await),
            Command::Scan { bus, units, address, input, timeout } => Some(scan(&config, bus, units.clone(), *address, *input, *timeout).await),
            _ => None,
        }
    });
    if let Some(result) = commissioning {
        return match result {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("twinbus: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    let result = runtime.block_on(async {
        match command {
            Command::Simulate => simulate(&config).await,
            _ => run(&config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("twinbus: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `twinbus scan`: a progress bar on a terminal, a line per answering unit.
async fn scan(
    config: &Config,
    bus: &str,
    units: std::ops::RangeInclusive<u8>,
    address: u16,
    input: bool,
    timeout: Option<std::time::Duration>,
) -> Result<String, twinbus::commission::Failure> {
    use std::io::IsTerminal as _;
    use twinbus::commission::Probe;
    let total = u64::from(*units.end() - *units.start()) + 1;
    let bar = match std::io::stderr().is_terminal() {
        true => indicatif::ProgressBar::new(total),
        false => indicatif::ProgressBar::hidden(),
    };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} units, {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    let mut answered = 0;
    let found = twinbus::commission::scan(config, bus, units, address, input, timeout, |unit, probe| {
        bar.inc(1);
        if *probe != Probe::Silent {
            answered += 1;
            bar.set_message(format!("{answered} answered (last: {unit})"));
        }
    })
    .await;
    bar.finish_and_clear();
    let found = found?;
    let table = if input { "input" } else { "holding" };
    let mut out = String::new();
    let mut ids = Vec::new();
    for (unit, probe) in &found {
        match probe {
            Probe::Data(words) => out.push_str(&format!("unit {unit:3}: answers ({table} {address} = {words:?})\n")),
            Probe::Exception(e) => out.push_str(&format!("unit {unit:3}: answers, refusing this read with exception {e}\n")),
            Probe::Silent => continue,
        }
        ids.push(unit.to_string());
    }
    out.push_str(&match ids.len() {
        0 => format!("no unit answered on {bus} ({} probed): check wiring, baud rate, parity and termination\n", found.len()),
        n => format!("{n} of {} units answer on {bus}: {}\n", found.len(), ids.join(", ")),
    });
    Ok(out)
}

/// Exit status after a second stop signal: the drain was cut short.
const INTERRUPTED: i32 = 130;

async fn run(config: &Config) -> anyhow::Result<()> {
    let mut gateway = Gateway::start(config).await?;
    // systemd (Type=notify): started; then a watchdog while the gateway's own parts answer.
    let status = format!("running: {} devices, {} buses, {} connections", config.devices.len(), config.buses.len(), config.connections.len());
    systemd::notify(&[Note::Ready, Note::Status(&status)]);
    let liveness = gateway.liveness();
    let watchdog = systemd::spawn_watchdog(move || {
        let liveness = liveness.clone();
        async move { liveness.check().await }
    });
    let remote = gateway.remote_shutdown();
    let mut signals = Signals::new()?;
    let failure = loop {
        tokio::select! {
            s = signals.next() => match s {
                Signal::Stop(name) => {
                    tracing::info!("{name}: stopping");
                    break None;
                }
                Signal::Hangup => reload(&mut gateway, &config.source).await,
            },
            () = remote.cancelled() => break None,
            f = gateway.failed() => break Some(f),
        }
    };
    let why = match &failure {
        Some(f) => format!("stopping: {f}"),
        None => "stopping".to_string(),
    };
    systemd::notify(&[Note::Stopping, Note::Status(&why)]);
    if let Some(w) = &watchdog {
        w.stopping();
    }
    // A second stop signal while draining means "now".
    let drained = tokio::select! {
        ok = gateway.shutdown() => ok,
        () = signals.second_stop() => {
            eprintln!("twinbus: second stop signal: exiting without finishing the shutdown");
            std::process::exit(INTERRUPTED);
        }
    };
    if let Some(f) = failure {
        anyhow::bail!("stopped because a part of the gateway failed: {f}");
    }
    if !drained {
        tracing::warn!("the shutdown deadline cut some work short (see above); unsent messages stay in the store");
    }
    Ok(())
}

/// SIGHUP: reads and checks the file again. Invalid, or changing what only
/// a restart applies: every reason is logged and the running config stays.
/// Valid: added devices start, removed ones stop, changed ones restart, the
/// rest (and every connection) runs on untouched.
async fn reload(gateway: &mut Gateway, path: &std::path::Path) {
    tracing::info!("SIGHUP: reloading {}", path.display());
    systemd::notify(&[Note::Reloading, Note::Status("reloading the configuration")]);
    let status = match Config::load(path) {
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!("reload refused, the running configuration stays: {line}");
            }
            "running; the last reload was refused (invalid configuration, see the log)".to_string()
        }
        Ok(new) => match gateway.reload(new).await {
            Ok(done) => format!("running; reloaded: {} added, {} removed, {} restarted", done.plan.add_devices.len(), done.plan.remove_devices.len(), done.plan.restart_devices.len()),
            Err(reasons) => {
                for r in &reasons {
                    tracing::error!("reload refused, the running configuration stays: {r}; restart the gateway to apply it");
                }
                "running; the last reload was refused (it needs a restart, see the log)".to_string()
            }
        },
    };
    twinbus::memory::give_back_freed();
    systemd::notify(&[Note::Ready, Note::Status(&status)]);
}

async fn simulate(config: &Config) -> anyhow::Result<()> {
    if config.simulators.is_empty() {
        anyhow::bail!("{} has no `simulators:` section", config.source.display());
    }
    let cancel = CancellationToken::new();
    for s in &config.simulators {
        twinbus::sim::start(s, cancel.clone()).await?;
    }
    let mut signals = Signals::new()?;
    while let Signal::Hangup = signals.next().await {}
    cancel.cancel();
    Ok(())
}

enum Signal {
    /// SIGINT or SIGTERM, by name.
    Stop(&'static str),
    Hangup,
}

/// The signals the gateway reacts to.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())?, hup: signal(SignalKind::hangup())? })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn next(&mut self) -> Signal {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => Signal::Stop("SIGTERM"),
                _ = self.int.recv() => Signal::Stop("SIGINT"),
                _ = self.hup.recv() => Signal::Hangup,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Signal::Stop("Ctrl-C")
        }
    }

    async fn second_stop(&mut self) {
        while let Signal::Hangup = self.next().await {}
    }
}
