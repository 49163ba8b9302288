//! `cargo xtask setup`: nightly `rust-src` and a bpf-linker built against
//! the nightly toolchain's own libLLVM (there is no prebuilt one for this
//! LLVM, and no system LLVM of the same major). Idempotent: each step
//! checks first and says what it did.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// What later tasks need to run cargo with the eBPF toolchain.
pub struct Env {
    /// Directory holding `bpf-linker`; prepended to PATH.
    pub bpf_linker_bin: PathBuf,
}

impl Env {
    /// A cargo command that can build the kernel programs.
    pub fn cargo(&self) -> Command {
        let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        c.env("PATH", self.path());
        c
    }

    pub fn path(&self) -> String {
        let old = std::env::var("PATH").unwrap_or_default();
        format!("{}:{old}", self.bpf_linker_bin.display())
    }
}

/// Where bpf-linker and the libLLVM links it runs with are kept: outside
/// the repository so every clone and CI run on the machine shares them.
fn prefix() -> PathBuf {
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    data.join("stormguard/bpf-linker")
}

pub fn run() -> anyhow::Result<Env> {
    ensure_rust_src()?;
    let env = ensure_bpf_linker()?;
    ensure_tracefs()?;
    Ok(env)
}

/// Runs a command for its stdout, failing with its stderr.
pub fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .stderr(std::process::Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs)")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        println!("setup: installing the nightly toolchain (for the eBPF build)");
        output(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        return Ok(());
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("setup: nightly rust-src present");
    } else {
        println!("setup: installing nightly rust-src (needed for -Z build-std=core)");
        output(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("installing rust-src for nightly")?;
    }
    Ok(())
}

/// The LLVM major of the nightly toolchain, from `rustc +nightly -vV`.
fn nightly_llvm() -> anyhow::Result<(String, String)> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let full = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .trim()
        .to_string();
    let major = full.split('.').next().unwrap_or(&full).to_string();
    let release = vv
        .lines()
        .find_map(|l| l.strip_prefix("release: "))
        .unwrap_or("?")
        .trim()
        .to_string();
    Ok((major, format!("LLVM {full} from rustc {release}")))
}

fn ensure_bpf_linker() -> anyhow::Result<Env> {
    let prefix = prefix();
    let bin = prefix.join("bin");
    let linker = bin.join("bpf-linker");
    let record = prefix.join("llvm-version");
    let (major, description) = nightly_llvm()?;
    let recorded = fs::read_to_string(&record).unwrap_or_default();
    let recorded_major = recorded.lines().next().unwrap_or("").trim().to_string();
    let runs = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if runs && recorded_major == major {
        println!(
            "setup: bpf-linker present ({}, {})",
            linker.display(),
            recorded.lines().nth(1).unwrap_or("").trim()
        );
        return Ok(Env {
            bpf_linker_bin: bin,
        });
    }
    println!(
        "setup: building bpf-linker against the nightly toolchain's libLLVM {major} into {} (about a minute)",
        prefix.display()
    );
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let toolchain_lib = Path::new(sysroot.trim()).join("lib");
    let so = fs::read_dir(&toolchain_lib)
        .with_context(|| format!("reading {}", toolchain_lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        .with_context(|| {
            format!(
                "no libLLVM.so.*-rust-* in {}; the nightly toolchain does not ship libLLVM",
                toolchain_lib.display()
            )
        })?;
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    // One link for the link step (-lLLVM), one under the versioned soname
    // for the runpath at run time (else it only starts under `rustup run`).
    for name in ["libLLVM.so", so.as_str()] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(toolchain_lib.join(&so), &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--force",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .arg("--root")
        .arg(&prefix)
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!(
            "building bpf-linker for LLVM {major} failed (see above); bpf-linker must support feature llvm-{major}"
        );
    }
    let check = output(Command::new(&linker).arg("--version"))
        .context("the freshly built bpf-linker does not start")?;
    fs::write(&record, format!("{major}\n{description}\n"))?;
    println!(
        "setup: built {} ({}), recorded {description} in {}",
        linker.display(),
        check.trim(),
        record.display()
    );
    Ok(Env {
        bpf_linker_bin: bin,
    })
}

/// Tracepoints need tracefs; mount it when we can (as root) and say so.
fn ensure_tracefs() -> anyhow::Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("tracefs"))
    {
        return Ok(());
    }
    if !is_root() {
        println!(
            "setup: tracefs is not mounted; as root run: mount -t tracefs tracefs /sys/kernel/tracing"
        );
        return Ok(());
    }
    output(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]))
        .context("mounting tracefs")?;
    println!("setup: mounted tracefs at /sys/kernel/tracing");
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
