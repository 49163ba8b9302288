//! What the real-client corpus (`tests/tests/corpus.rs`) drives, installed
//! when missing so that `cargo xtask test` passes on a fresh Debian 12
//! machine as root: CI runs on a new machine where nothing installed by hand
//! survives, and the corpus must fail (not skip) there when a tool is
//! missing. Each step checks first, so on a machine that has everything
//! this runs no package manager at all.
//!
//! The servers (PostgreSQL, Redis, HTTP, DNS) are only installed here; the
//! tests start their own instances, so no service needs to be running.
//! Nothing comes from npm: the Node case uses Node's built-in `http` module.
use std::process::Command;

use anyhow::bail;

use crate::tasks::{ensure_packages, status};

/// Commands the corpus runs, and the Debian packages that carry them.
const TOOLS: [(&str, &str); 18] = [
    ("bash", "bash"),
    ("timeout", "coreutils"),
    ("runuser", "util-linux"),
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("python3", "python3"),
    ("wrk", "wrk"),
    ("ab", "apache2-utils"),
    ("nc", "netcat-openbsd"),
    ("redis-server", "redis-server"),
    ("redis-benchmark", "redis-tools"),
    ("redis-cli", "redis-tools"),
    ("psql", "postgresql-client"),
    ("node", "nodejs"),
    // `java File.java` (single-source launch) compiles in memory: it needs
    // the JDK's compiler module, not only a runtime.
    ("java", "openjdk-17-jdk-headless"),
    ("javac", "openjdk-17-jdk-headless"),
    // pip itself, for the Python libraries below.
    ("pip3", "python3-pip"),
];

/// Python libraries the corpus imports: (module, PyPI name, Debian package).
const PYTHON: [(&str, &str, &str); 2] = [
    ("requests", "requests", "python3-requests"),
    ("redis", "redis", "python3-redis"),
];

/// Installs what the corpus needs, or fails saying what is missing.
pub fn ensure_corpus_tools() -> anyhow::Result<()> {
    ensure_packages(&TOOLS)?;
    ensure_postgres_server()?;
    ensure_python_modules()
}

/// The PostgreSQL server binaries (initdb, pg_ctl) live off PATH in
/// /usr/lib/postgresql/N/bin, so they are looked for there.
fn ensure_postgres_server() -> anyhow::Result<()> {
    let have = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("bin/initdb").exists() && e.path().join("bin/pg_ctl").exists());
    if have {
        return Ok(());
    }
    // No command on PATH names the server: a name that is never found
    // makes ensure_packages install it.
    ensure_packages(&[("stormguard-corpus-no-initdb", "postgresql")])
}

fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the Python libraries for the `python3` on PATH (the one the
/// tests run): with pip first (a pyenv or venv interpreter, as on the
/// development machines); for Debian's own interpreter, which refuses pip
/// installs (PEP 668), from Debian's packages; and only then pip past that
/// refusal.
fn ensure_python_modules() -> anyhow::Result<()> {
    let missing = || -> Vec<(&str, &str, &str)> {
        PYTHON
            .iter()
            .copied()
            .filter(|(m, _, _)| !python_has(m))
            .collect()
    };
    let want = missing();
    if want.is_empty() {
        return Ok(());
    }
    let pip: Vec<&str> = want.iter().map(|(_, p, _)| *p).collect();
    println!("xtask: installing Python libraries {pip:?} for the client corpus");
    let pip_install = |extra: &[&str]| {
        status(
            Command::new("python3")
                .args(["-m", "pip", "install", "-q"])
                .args(extra)
                .args(&pip),
        )
    };
    if pip_install(&[]).is_ok() && missing().is_empty() {
        return Ok(());
    }
    let debs: Vec<&str> = missing().iter().map(|(_, _, d)| *d).collect();
    let apt = status(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&debs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    );
    if apt.is_ok() && missing().is_empty() {
        return Ok(());
    }
    let _ = pip_install(&["--break-system-packages"]);
    let still: Vec<&str> = missing().iter().map(|(m, _, _)| *m).collect();
    if !still.is_empty() {
        bail!(
            "python3 cannot import {still:?}; install them for it (python3 -m pip install {})",
            pip.join(" ")
        );
    }
    Ok(())
}
