//! Command-line interface: one module per command.
//!
//! Output goes through [`write_stdout`]: a reader that goes away (`| head`)
//! ends the command quietly with status 0 instead of a panic. Errors are
//! printed by `main` as one line ([`one_line`]) with a non-zero status
//! ([`exit_code`]).
pub mod client;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod events;
pub mod explain;
pub mod generate;
pub mod incidents;
pub mod record;
pub mod replay;
pub mod status;
pub mod throttle;
pub mod top;
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
    /// Run as the system service: probes, engine, incident history, local
    /// API and Prometheus metrics.
    Daemon(daemon::DaemonArgs),
    /// Ask the daemon how it is doing.
    Status(status::StatusArgs),
    /// Live view of flows by attempts/s with verdicts.
    Top(top::TopArgs),
    /// List incidents (storms) the daemon recorded.
    Incidents(incidents::IncidentsArgs),
    /// Explain one incident: rate, errors, gaps, backoff, process.
    Explain(explain::ExplainArgs),
    /// Print verdict changes as they happen.
    Events(events::EventsArgs),
    /// Hold a process, cgroup or unit to a connect budget for a while
    /// (root only): attempts beyond it fail, or are only counted with
    /// --dry-run.
    Throttle(throttle::ThrottleArgs),
    /// End a budget (thr-N), or every one with --all (root only).
    Release(throttle::ReleaseArgs),
    /// List budgets, manual and automatic, with what each let through,
    /// slowed and denied.
    Throttles(throttle::ThrottlesArgs),
    /// Check or show the configuration.
    Config(config::ConfigArgs),
    /// Check this host: capabilities, tracefs, cgroup v2, BTF, which
    /// programs load and attach, what each gap costs, and a self-test with
    /// exact counts. Exit 0 when everything required works, 2 for the
    /// environment, 1 for a failed self-test.
    Doctor(doctor::DoctorArgs),
    /// Write man pages or shell completions (packaging; hidden from help).
    #[command(hide = true)]
    Generate(generate::GenerateArgs),
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
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    match cli.command {
        Command::Watch(args) => rt()?.block_on(watch::run(args)),
        Command::Record(args) => rt()?.block_on(record::run(args)),
        Command::Replay(args) => replay::run(args),
        Command::Daemon(args) => rt()?.block_on(daemon::run(args)),
        Command::Status(args) => status::run(args),
        Command::Top(args) => top::run(args),
        Command::Incidents(args) => incidents::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Events(args) => events::run(args),
        Command::Throttle(args) => throttle::run_throttle(args),
        Command::Release(args) => throttle::run_release(args),
        Command::Throttles(args) => throttle::run_throttles(args),
        Command::Config(args) => config::run(args),
        Command::Doctor(args) => doctor::run(args),
        Command::Generate(args) => generate::run(args),
    }
}

/// Standard output's reader went away (`stormguard incidents | head -1`).
/// Not a failure: the command ends quietly with exit status 0, as a
/// command whose reader has all it wanted should (see [`exit_code`]).
#[derive(Debug, thiserror::Error)]
#[error("standard output closed")]
pub struct StdoutClosed;

/// Writes `text` to standard output and flushes it. A closed pipe becomes
/// [`StdoutClosed`]; other errors are returned as they are. Commands write
/// through this (never `println!`, which panics on a closed pipe).
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to standard output")),
    }
}

/// Whether `e` only says that standard output was closed: the caller ends
/// with status 0 and prints nothing.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// An error as one line: `{:#}` (the whole chain, `: `-separated) with any
/// line breaks inside a message folded into spaces, so a log reader or a
/// script sees exactly one line per failure.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// 2 for problems the user must fix (capabilities, tracefs, kernel
/// features, configuration), 1 for anything else.
///
/// A closed standard output ([`StdoutClosed`]) is 0: the reader (`head`)
/// got what it wanted. 0 rather than the shell's 141 so that `set -o
/// pipefail` scripts do not fail on `stormguard incidents | head -1`.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    use crate::api::client::ClientError;
    if is_stdout_closed(e) {
        return 0;
    }
    if let Some(f) = e.downcast_ref::<doctor::Failed>() {
        return f.exit_code;
    }
    if e.downcast_ref::<KernelError>().is_some()
        || e.downcast_ref::<crate::config::ConfigError>().is_some()
        || e.downcast_ref::<crate::api::socket::NotASocket>().is_some()
        // The daemon's problems before READY: restarting cannot fix them.
        || e.downcast_ref::<crate::daemon::StartError>().is_some()
        || matches!(
            e.downcast_ref::<ClientError>(),
            Some(
                ClientError::NotRunning { .. }
                    | ClientError::PermissionDenied { .. }
                    | ClientError::NeedsRoot { .. }
            )
        )
    {
        2
    } else {
        1
    }
}

/// Logs to journald when started by systemd with its journal (JOURNAL_STREAM
/// set), else readable lines on stderr. `RUST_LOG` filters (default: info).
pub fn init_logging() {
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some()
        && let Ok(journald) = tracing_journald::layer()
    {
        let _ = registry.with(journald).try_init();
        return;
    }
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .try_init();
}

/// `s` in at most `width` columns, keeping its end — the informative part
/// of a cgroup path, a unit's or a pod's name.
pub fn keep_end(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n <= width {
        s.to_string()
    } else {
        let tail: String = s.chars().skip(n - (width - 1)).collect();
        format!("…{tail}")
    }
}
