//! The `twinbus` command line.
//!
//! Exit codes: 0 on success (including a graceful stop on SIGINT, SIGTERM or
//! an allowed remote shutdown); 1 when the configuration is invalid (the
//! report names file, line, column, field and what would be valid); 2 when
//! the gateway could not start or failed while running (e.g. a port in use,
//! or one of its tasks panicked: the service manager should restart it);
//! 130 when a second SIGINT/SIGTERM cut the shutdown short. SIGHUP is logged
//! and ignored (no reload yet). Errors are printed once, as
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
                Signal::Hangup => tracing::warn!("SIGHUP: reloading the configuration is not supported yet; ignored (restart the service to apply changes)"),
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
