//! `cargo xtask install [--root DIR]`: build release and install the binary,
//! the systemd unit and the default config.
//!
//! The binary goes where the unit's ExecStart points (so the two cannot
//! disagree), the unit to /etc/systemd/system, the config to
//! /etc/stormguard/config.toml unless one is already there. Into `/` (the
//! default) it also creates the `stormguard` group (members may query the
//! daemon's API socket) and reloads systemd; into any other ROOT it writes
//! only under ROOT and needs no root.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::setup::{Env, is_root};

/// The group allowed to use the API socket besides root (the daemon's
/// default `[daemon] socket_group`).
const GROUP: &str = "stormguard";
/// Where the unit goes, relative to ROOT: the administrator's unit
/// directory, as the unit's own header says.
const UNIT: &str = "etc/systemd/system/stormguard.service";
/// The daemon's default config path (detector/src/config.rs), relative.
const CONFIG: &str = "etc/stormguard/config.toml";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// The cargo target directory (CARGO_TARGET_DIR if set, as cargo does).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

fn unit_source() -> PathBuf {
    workspace().join("packaging/stormguard.service")
}

fn config_source() -> PathBuf {
    workspace().join("packaging/config.toml")
}

/// The binary's path inside ROOT: the unit's ExecStart program, relative.
fn binary_in_unit() -> anyhow::Result<PathBuf> {
    let src = unit_source();
    let text =
        fs::read_to_string(&src).with_context(|| format!("cannot read {}", src.display()))?;
    let exec = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ExecStart="))
        .with_context(|| format!("no ExecStart= in {}", src.display()))?;
    // Strip systemd's prefixes (-, @, +, !, :) from the program.
    let program = exec
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches(['-', '@', '+', '!', ':']);
    let relative = Path::new(program)
        .strip_prefix("/")
        .with_context(|| format!("ExecStart={exec} in {} is not absolute", src.display()))?;
    Ok(relative.to_path_buf())
}

/// Whether ROOT is the running system's `/`.
fn is_system_root(root: &Path) -> bool {
    fs::canonicalize(root).is_ok_and(|p| p == Path::new("/"))
}

/// Builds release through `env` (None: use the existing build), then
/// installs into `root`.
pub fn run(env: Option<&Env>, root: &Path) -> anyhow::Result<()> {
    let system = is_system_root(root);
    if let Some(env) = env {
        crate::tasks::build(env, true)?;
    }
    if system && !is_root() {
        // Build as the user (no root-owned files in target/), install as root.
        println!("xtask: installing into / needs root; running the install step with sudo");
        let me = std::env::current_exe().context("cannot find the xtask binary")?;
        let mut sudo = Command::new("sudo");
        // sudo resets the environment: keep the build the step installs.
        sudo.arg("env")
            .arg(format!("CARGO_TARGET_DIR={}", target_dir().display()));
        return crate::tasks::status(
            sudo.arg(me)
                .args(["install", "--no-build", "--root"])
                .arg(root),
        );
    }
    install(root)?;
    if system {
        system_steps()
    } else {
        println!(
            "xtask: installed under {}; nothing outside it was changed (no group, no systemctl)",
            root.display()
        );
        Ok(())
    }
}

/// Copies the three files into ROOT.
fn install(root: &Path) -> anyhow::Result<()> {
    let binary = target_dir().join("release/stormguard");
    if !binary.is_file() {
        bail!(
            "{} does not exist: build it first (cargo xtask build --release)",
            binary.display()
        );
    }
    install_file(&binary, &root.join(binary_in_unit()?), 0o755)?;
    install_file(&unit_source(), &root.join(UNIT), 0o644)?;
    install_config(&config_source(), &root.join(CONFIG))
}

/// Creates `dir` and any missing parents with mode 0755 (whatever the umask).
fn make_dirs(dir: &Path) -> anyhow::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        make_dirs(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the mode of {}", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
}

/// Copies `src` to `dst` with `mode`, through a temporary file renamed over
/// `dst` (a running binary can be replaced; a reader never sees half).
fn install_file(src: &Path, dst: &Path, mode: u32) -> anyhow::Result<()> {
    let dir = dst.parent().context("destination has no directory")?;
    make_dirs(dir)?;
    let name = dst.file_name().context("destination has no file name")?;
    let tmp = dir.join(format!(".{}.xtask-tmp", name.to_string_lossy()));
    let existed = dst.exists();
    fs::copy(src, &tmp)
        .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
    let done = fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", tmp.display()))
        .and_then(|()| {
            fs::rename(&tmp, dst)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), dst.display()))
        });
    if done.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    done?;
    println!(
        "xtask: installed {} ({mode:04o}){}",
        dst.display(),
        if existed { ", replaced" } else { "" }
    );
    Ok(())
}

/// Installs the default config unless a config is already there: the
/// administrator's file is never overwritten.
fn install_config(src: &Path, dst: &Path) -> anyhow::Result<()> {
    if dst.symlink_metadata().is_ok() {
        println!(
            "xtask: kept the existing {} (not overwritten; the default is {})",
            dst.display(),
            src.display()
        );
        return Ok(());
    }
    make_dirs(dst.parent().context("destination has no directory")?)?;
    let text = fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)
        .with_context(|| format!("cannot create {}", dst.display()))?;
    f.write_all(&text)
        .with_context(|| format!("cannot write {}", dst.display()))?;
    // The umask may have taken bits off the creation mode.
    fs::set_permissions(dst, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("cannot set the mode of {}", dst.display()))?;
    println!("xtask: installed {} (0644)", dst.display());
    Ok(())
}

/// Into `/` only: the API group, systemd's view of the unit, what to run next.
fn system_steps() -> anyhow::Result<()> {
    let exists = Command::new("getent")
        .args(["group", GROUP])
        .output()
        .is_ok_and(|o| o.status.success());
    if exists {
        println!("xtask: group {GROUP} exists");
    } else {
        crate::tasks::status(Command::new("groupadd").args(["--system", GROUP]))
            .with_context(|| format!("cannot create the system group {GROUP}"))?;
        println!("xtask: created the system group {GROUP}");
    }
    println!(
        "xtask: members of group {GROUP} may query the daemon without root: usermod -aG {GROUP} USER"
    );
    if !Path::new("/run/systemd/system").exists() {
        println!(
            "xtask: systemd is not running here; start the daemon with: stormguard daemon (as root)"
        );
        return Ok(());
    }
    crate::tasks::status(Command::new("systemctl").arg("daemon-reload"))?;
    let active = Command::new("systemctl")
        .args(["is-active", "--quiet", "stormguard"])
        .status()
        .is_ok_and(|s| s.success());
    if active {
        println!(
            "xtask: stormguard is running; to run the new binary: systemctl restart stormguard"
        );
    } else {
        println!("xtask: to start it now and at boot: systemctl enable --now stormguard");
    }
    Ok(())
}

/// Checks an install into `root`: the three files with their modes, the
/// installed binary where the unit runs it and the same as the build, and
/// that it runs `--version`.
pub fn check(root: &Path) -> anyhow::Result<()> {
    let binary = root.join(binary_in_unit()?);
    for (path, mode) in [
        (binary.clone(), 0o755),
        (root.join(UNIT), 0o644),
        (root.join(CONFIG), 0o644),
    ] {
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("{} is not installed", path.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", path.display());
        }
        let got = meta.permissions().mode() & 0o7777;
        if got != mode {
            bail!("{} has mode {got:04o}, expected {mode:04o}", path.display());
        }
    }
    for (installed, source) in [
        (binary.clone(), target_dir().join("release/stormguard")),
        (root.join(UNIT), unit_source()),
        (root.join(CONFIG), config_source()),
    ] {
        let same = fs::read(&installed)
            .with_context(|| format!("cannot read {}", installed.display()))?
            == fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?;
        if !same {
            bail!("{} differs from {}", installed.display(), source.display());
        }
    }
    let out = Command::new(&binary)
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {} --version", binary.display()))?;
    let version = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !version.starts_with("stormguard ") {
        bail!(
            "{} --version failed ({}): {}{}",
            binary.display(),
            out.status,
            version.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!(
        "xtask: install into {} checked: {} runs ({})",
        root.display(),
        binary.display(),
        version.trim()
    );
    Ok(())
}
