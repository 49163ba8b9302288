//! Project tasks: `cargo xtask
//! <setup|build|test|deploy-check|run|bench|soak|install|package|vmtest>`. Every
//! task except `setup` itself (and `install --no-build`) runs setup first, so
//! a fresh machine needs nothing but rustup and the two README commands.
mod bench;
mod bench_daemon;
mod bench_doc;
mod corpus_tools;
mod daemon;
mod deploy_check;
mod install;
mod package;
mod setup;
mod soak;
mod tasks;
mod vmtest;

use std::path::PathBuf;

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
    /// Check deploy/ without a cluster: the Kubernetes manifests against
    /// the schemas, the Prometheus Operator objects, the alert rules
    /// (promtool) and the metric names the dashboard and rules use against
    /// a live daemon (as root).
    DeployCheck,
    /// Measure what stormguard costs (probes against no probes, bpftrace
    /// and a minimal hand-written floor; enforcement; stacks; detection
    /// latency; daemon CPU and memory; a 1 M burst), interleaved, into
    /// BENCHMARKS.md; `--check` gates on its ratios (as root; ~10 minutes,
    /// ~2 with --quick).
    Bench(bench::BenchArgs),
    /// Build and run stormguard with the privileges it needs, e.g.
    /// `cargo xtask run -- watch`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build release and install the binary (where the unit's ExecStart
    /// points), the systemd unit and the default config (an existing config
    /// is kept). Into / (the default, as root or through sudo) also create
    /// group stormguard and reload systemd; into another ROOT, only write
    /// files under it.
    Install {
        /// Install under this directory instead of / (staging, packaging).
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Install the existing target/release/stormguard without building
        /// (and without setup).
        #[arg(long)]
        no_build: bool,
    },
    /// Build the Debian package (cargo-deb): binary, systemd unit, default
    /// config as a conffile, man pages, completions, maintainer scripts
    /// (group stormguard; purge removes config, database and group).
    Package {
        /// Also check it (as root): file list, control fields, lintian, and
        /// install, reinstall, remove and purge in a throwaway Debian root
        /// (mmdebstrap, cached under target/).
        #[arg(long)]
        check: bool,
    },
    /// Run the release daemon under a steady mixed load for N minutes and
    /// check that memory and every table stay flat (not in CI).
    Soak(soak::SoakArgs),
    /// Boot Debian's 6.1 and 6.12 kernels under qemu and run the
    /// kernel-facing tests in each (as root; minutes under TCG).
    Vmtest(vmtest::Args),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::run().map(|_| ()),
        Cmd::Build { release } => setup::run().and_then(|env| tasks::build(&env, release)),
        Cmd::Test => setup::run().and_then(|env| tasks::test(&env)),
        Cmd::DeployCheck => setup::run().and_then(|env| deploy_check::run(&env, true)),
        Cmd::Run { args } => setup::run().and_then(|env| tasks::run(&env, &args)),
        Cmd::Bench(args) => setup::run().and_then(|_| bench::run(args)),
        Cmd::Install { root, no_build } if no_build => install::run(None, &root),
        Cmd::Install { root, .. } => setup::run().and_then(|env| install::run(Some(&env), &root)),
        Cmd::Package { check } => setup::run().and_then(|env| package::run(&env, check)),
        Cmd::Soak(args) => setup::run().and_then(|_| soak::run(args)),
        Cmd::Vmtest(args) => setup::run().and_then(|env| vmtest::run(&env, args)),
    };
    if let Err(e) = result {
        eprintln!("xtask: {e:#}");
        std::process::exit(1);
    }
}
