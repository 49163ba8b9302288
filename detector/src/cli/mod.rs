//! Command-line interface: one module per command.
pub mod watch;

use clap::{Parser, Subcommand};

use crate::kernel::KernelError;

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
    /// connecting to and how it fails. Ctrl-C detaches cleanly.
    Watch(watch::WatchArgs),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Watch(args) => rt.block_on(watch::run(args)),
    }
}

/// 2 for problems with the environment the user must fix (capabilities,
/// tracefs, kernel features), 1 for anything else.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    if e.downcast_ref::<KernelError>().is_some() {
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
