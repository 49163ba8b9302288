//! build, test and run: thin wrappers over cargo with the eBPF toolchain on
//! PATH and root where the kernel requires it.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::setup::{Env, is_root};

/// Runs a command, failing with its name when it fails.
pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    println!("xtask: {}", describe(cmd));
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !st.success() {
        bail!("{} failed ({st})", describe(cmd));
    }
    Ok(())
}

/// A command as it would be typed, for messages.
pub fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn build(env: &Env, release: bool) -> anyhow::Result<()> {
    let mut c = env.cargo();
    c.args(["build", "-p", "detector"]);
    if release {
        c.arg("--release");
    }
    status(&mut c)
}

/// Tools the integration tests drive, and the Debian packages with them.
const TEST_TOOLS: [(&str, &str); 7] = [
    ("nft", "nftables"),
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    ("setpriv", "util-linux"),
    // `systemd-analyze verify` and `security` of the unit (service.rs).
    ("systemd-analyze", "systemd"),
    ("curl", "curl"),
    ("python3", "python3"),
];

/// The metrics test parses /metrics with the Prometheus project's own
/// Python parser.
fn ensure_prometheus_parser() -> anyhow::Result<()> {
    let have = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if have {
        return Ok(());
    }
    println!("xtask: installing the python prometheus_client parser");
    status(Command::new("python3").args(["-m", "pip", "install", "-q", "prometheus_client"]))
        .or_else(|_| {
            ensure_packages(&[(
                "python3-prometheus-client-check",
                "python3-prometheus-client",
            )])
        })
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Installs missing test tools with apt-get (as root).
pub fn ensure_packages(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() || !have("apt-get") {
        bail!(
            "missing packages {missing:?}; install them (Debian: apt-get install {})",
            missing.join(" ")
        );
    }
    println!("xtask: installing {missing:?}");
    let install = |update: bool| -> anyhow::Result<()> {
        if update {
            status(Command::new("apt-get").args(["update", "-q"]))?;
        }
        status(
            Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    // A fresh machine's package lists may be stale (404s): update and retry.
    install(false).or_else(|_| install(true))
}

/// Wall times of `cargo xtask test`'s stages: each printed as it ends, and
/// all of them in a table when this is dropped (so also after a failure).
#[derive(Default)]
struct Stages(Vec<(&'static str, Duration, bool)>);

impl Stages {
    fn stage(
        &mut self,
        name: &'static str,
        f: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let result = f();
        let took = start.elapsed();
        match &result {
            Ok(()) => println!("xtask: stage {name} took {:.1} s", took.as_secs_f64()),
            Err(_) => println!(
                "xtask: stage {name} failed after {:.1} s",
                took.as_secs_f64()
            ),
        }
        self.0.push((name, took, result.is_ok()));
        result
    }
}

impl Drop for Stages {
    fn drop(&mut self) {
        let width = self.0.iter().map(|(n, ..)| n.len()).fold(5, usize::max);
        println!("xtask: stage times");
        for (name, took, ok) in &self.0 {
            println!(
                "  {name:<width$} {:>8.1} s{}",
                took.as_secs_f64(),
                if *ok { "" } else { "  FAILED" }
            );
        }
        let total: Duration = self.0.iter().map(|(_, t, _)| *t).sum();
        println!("  {:<width$} {:>8.1} s", "total", total.as_secs_f64());
    }
}

/// The stages of `cargo xtask test`, in order; the first failure stops them
/// (the table of stage times is printed either way).
pub fn test(env: &Env) -> anyhow::Result<()> {
    let mut s = Stages::default();
    s.stage("tools", || {
        ensure_packages(&TEST_TOOLS)?;
        ensure_prometheus_parser()?;
        crate::package::ensure_tools()?;
        crate::corpus_tools::ensure_corpus_tools()
    })?;
    s.stage("fmt", || {
        status(env.cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    s.stage("clippy", || {
        status(
            env.cargo()
                .args(["clippy", "--all-targets", "--", "-D", "warnings"]),
        )
    })?;
    s.stage("clippy-ebpf", || clippy_ebpf(env))?;
    s.stage("test", || unit_and_integration(env))?;
    // deploy/ (Kubernetes, Prometheus rules, Grafana); the live part,
    // tests/tests/deploy_assets.rs, already ran in the test stage.
    s.stage("deploy", || crate::deploy_check::run(env, false))?;
    s.stage("install", || install_into_temporary_root(env))?;
    // The .deb: contents, lintian, install/reinstall/remove/purge in a
    // throwaway Debian root.
    s.stage("package", || crate::package::run(env, true))?;
    // The kernel-facing tests again on Debian's 6.1 and 6.12 under qemu.
    s.stage("vmtest", || {
        crate::vmtest::run_all(env, &crate::vmtest::Args::default())
    })?;
    Ok(())
}

fn clippy_ebpf(env: &Env) -> anyhow::Result<()> {
    // The kernel crate only builds for the BPF target with nightly. CARGO
    // points at a toolchain's cargo, not the rustup proxy, so ask rustup.
    status(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "-p",
                "detector-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ])
            .env("PATH", env.path())
            .env("CARGO_TARGET_DIR", "target/ebpf-clippy"),
    )
}

fn unit_and_integration(env: &Env) -> anyhow::Result<()> {
    // CLI tests run the binary; cargo does not build a dependency's bins.
    status(env.cargo().args(["build", "-p", "detector"]))?;
    let mut t = env.cargo();
    t.arg("test").env("STORMGUARD_REQUIRE_EBPF", "1");
    if !is_root() {
        // Loading eBPF needs root (or CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN).
        t.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    status(&mut t)
}

/// The README's install, built and installed into target/install-test
/// (removed first), then checked.
fn install_into_temporary_root(env: &Env) -> anyhow::Result<()> {
    let root = crate::install::target_dir().join("install-test");
    match std::fs::remove_dir_all(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", root.display())),
    }
    crate::install::run(Some(env), &root)?;
    crate::install::check(&root)
}

pub fn run(env: &Env, args: &[String]) -> anyhow::Result<()> {
    build(env, true)?;
    let bin = std::env::current_dir()?.join("target/release/stormguard");
    let mut c = if is_root() {
        Command::new(&bin)
    } else {
        println!(
            "xtask: stormguard needs CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN; running it with sudo"
        );
        let mut c = Command::new("sudo");
        c.arg(&bin);
        c
    };
    c.args(args);
    let st = c
        .status()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    std::process::exit(st.code().unwrap_or(1));
}
