//! The `twinbus` command line.
//!
//! Exit codes: 0 on success (including a graceful stop on SIGINT, SIGTERM or
//! an allowed remote shutdown); 1 when the configuration is invalid (the
//! report names file, line, column, field and what would be valid); 2 when
//! the gateway could not start or failed while running (e.g. a port in use).
//! Errors are printed once, as `twinbus: error: ...` with their causes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use twinbus::config::Config;
use twinbus::gateway::Gateway;

/// twinbus: cloud digital twins for Modbus RTU and TCP devices, over MQTT.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (used when no subcommand is given).
    #[arg(short, long, global = true, env = "TWINBUS_CONFIG", default_value = "gateway.yaml")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration and exit: 0 when valid, 1 with a report when not.
    Check,
    /// Run only the simulators of the configuration (a Modbus TCP slave).
    Simulate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
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

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rmqtt=warn,rmqtt_net=warn,rumqttc=warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_target(false).init();
}

async fn run(config: &Config) -> anyhow::Result<()> {
    let gateway = Gateway::start(config).await?;
    let remote = gateway.remote_shutdown();
    tokio::select! {
        r = stop_signal() => r?,
        () = remote.cancelled() => {}
    }
    gateway.shutdown().await;
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
    stop_signal().await?;
    cancel.cancel();
    Ok(())
}

async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await?;
    Ok(())
}
