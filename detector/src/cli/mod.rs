//! Command-line interface: one module per command.
pub mod record;
pub mod replay;
pub mod watch;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::{config::Config, kernel::KernelError};

/// stormguard finds runaway retry loops from inside the kernel.
#[derive(Debug, Parser)]
#[command(name = "stormguard", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the probes and print, each interval, what every process is
    /// connecting to, how it fails and the verdict. Ctrl-C detaches cleanly.
    Watch(watch::WatchArgs),
    /// Like watch, but write every observation to FILE (JSON lines) for
    /// `replay`, and print verdict changes as they happen.
    Record(record::RecordArgs),
    /// Replay a recording through the detection engine and print its
    /// verdict changes. Needs no kernel and no privileges.
    Replay(replay::ReplayArgs),
}

/// Options every engine-running command shares.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Configuration file (TOML; every field optional).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl EngineArgs {
    pub fn load(&self) -> anyhow::Result<Config> {
        Ok(Config::load(self.config.as_deref())?)
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Watch(args) => rt.block_on(watch::run(args)),
        Command::Record(args) => rt.block_on(record::run(args)),
        Command::Replay(args) => replay::run(args),
    }
}

/// 2 for problems the user must fix (capabilities, tracefs, kernel
/// features, configuration), 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<KernelError>().is_some()
        || e.downcast_ref::<crate::config::ConfigError>().is_some()
    {
        2
    } else {
        1
    }
}

/// Logs to stderr; `RUST_LOG` filters (default: info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
