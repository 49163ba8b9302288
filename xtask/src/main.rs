//! Project tasks: `cargo xtask <setup|build|test|run|bench>`. Every task
//! except `setup` itself runs setup first, so a fresh machine needs nothing
//! but rustup and the two README commands.
mod bench;
mod corpus_tools;
mod setup;
mod tasks;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "stormguard project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the eBPF build needs (nightly rust-src, bpf-linker) and
    /// mount tracefs if it is not mounted. Idempotent.
    Setup,
    /// Build stormguard (kernel programs included).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Everything CI checks: fmt, clippy, unit and integration tests (as
    /// root, eBPF required to load).
    Test,
    /// Measure what the probes cost, interleaved, against no probes,
    /// bpftrace and a minimal hand-written floor (as root; ~3 minutes).
    Bench(bench::BenchArgs),
    /// Build and run stormguard with the privileges it needs, e.g.
    /// `cargo xtask run -- watch`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::run().map(|_| ()),
        Cmd::Build { release } => setup::run().and_then(|env| tasks::build(&env, release)),
        Cmd::Test => setup::run().and_then(|env| tasks::test(&env)),
        Cmd::Run { args } => setup::run().and_then(|env| tasks::run(&env, &args)),
        Cmd::Bench(args) => setup::run().and_then(|_| bench::run(args)),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
