//! `cargo xtask deploy-check`, and the `deploy` stage of `cargo xtask test`:
//! the Kubernetes manifests, the alert rules and the Grafana dashboard
//! under deploy/ are checked without a cluster.
//!
//! - The core objects (Namespace, ServiceAccount, ConfigMap, DaemonSet,
//!   Service) against the Kubernetes JSON schemas, strictly (an unknown
//!   field is an error), with `kubernetes-validate` from PyPI. It bundles
//!   the schemas, so once installed (into a venv under target/) it works
//!   offline. Checked against the newest version it bundles and against
//!   the oldest one the DaemonSet is meant for.
//! - What ties them together and the custom resources, whose schemas are
//!   not bundled (PodMonitor, PrometheusRule), plus the dashboard's shape:
//!   `deploy_check.py` (selectors match the pods, ports exist by name, the
//!   capabilities are the unit's, the PrometheusRule's groups are the rules
//!   file's, each alert has a test firing and one quiet).
//! - The rules with `promtool check rules` and `promtool test rules`
//!   (Debian's `prometheus` package carries promtool); the dashboard's
//!   queries are parsed by `promtool check rules` too, written as
//!   recording rules with Grafana's variables filled in.
//! - With `live`, the names in the dashboard's and the rules' queries
//!   against a running daemon's /metrics: `tests/tests/deploy_assets.rs`
//!   (also run by the `test` stage, which is why `cargo xtask test` passes
//!   `live = false` here).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{
    setup::Env,
    tasks::{ensure_packages, status},
};

/// The validator, pinned: its bundled schemas are what the manifests are
/// checked against.
const VALIDATOR: &str = "kubernetes-validate";
const VALIDATOR_VERSION: &str = "1.37.0";

/// Kubernetes versions the core objects are validated against: the newest
/// schemas `kubernetes-validate` 1.37.0 bundles, and the oldest release
/// the manifests are meant for (still in the cloud providers' extended
/// support).
const KUBERNETES_VERSIONS: [&str; 2] = ["1.37.0", "1.30.0"];

/// Manifests validated against the Kubernetes schemas.
const CORE: [&str; 5] = [
    "namespace.yaml",
    "serviceaccount.yaml",
    "configmap.yaml",
    "daemonset.yaml",
    "service.yaml",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

pub fn run(env: &Env, live: bool) -> anyhow::Result<()> {
    let root = workspace();
    let venv = ensure_validator()?;
    let k8s = root.join("deploy/kubernetes");
    for version in KUBERNETES_VERSIONS {
        status(
            Command::new(venv.join("bin/kubernetes-validate"))
                .args(["--strict", "--kubernetes-version", version])
                .args(CORE.iter().map(|f| k8s.join(f))),
        )?;
    }
    // Written out rather than passed with -c, so that the command printed
    // is one line (and one to run again by hand).
    let script = venv.join("deploy_check.py");
    std::fs::write(&script, include_str!("deploy_check.py"))
        .with_context(|| format!("cannot write {}", script.display()))?;
    let queries = venv.join("dashboard-queries.rules.yaml");
    status(
        Command::new(venv.join("bin/python"))
            .arg(&script)
            .arg(&root)
            .arg(&queries),
    )?;

    ensure_packages(&[("promtool", "prometheus")])?;
    let prom = root.join("deploy/prometheus");
    status(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(prom.join("stormguard-rules.yaml")),
    )?;
    // The dashboard's PromQL, parsed (its variables filled in).
    status(
        Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&queries),
    )?;
    // Relative rule_files: resolved from the test file's directory.
    status(
        Command::new("promtool")
            .args(["test", "rules", "stormguard-rules.test.yaml"])
            .current_dir(&prom),
    )?;

    if live {
        // The dashboard's and rules' metric names against a live daemon's
        // /metrics (a test binary does not build the daemon).
        status(env.cargo().args(["build", "-p", "detector"]))?;
        let mut t = env.cargo();
        t.args(["test", "-p", "stormguard-tests", "--test", "deploy_assets"])
            .env("STORMGUARD_REQUIRE_EBPF", "1");
        if !crate::setup::is_root() {
            t.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
        }
        status(&mut t)?;
    }
    Ok(())
}

/// A venv under target/ with the pinned validator (and the PyYAML it
/// depends on, which `deploy_check.py` uses); created or fixed when
/// missing.
fn ensure_validator() -> anyhow::Result<PathBuf> {
    let venv = crate::install::target_dir().join("deploy-venv");
    let pinned = || {
        Command::new(venv.join("bin/python"))
            .args([
                "-c",
                &format!(
                    "import importlib.metadata as m, yaml; \
                     assert m.version('{VALIDATOR}') == '{VALIDATOR_VERSION}'"
                ),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if pinned() {
        return Ok(venv);
    }
    if !venv.join("bin/pip").exists() {
        let create = || status(Command::new("python3").arg("-m").arg("venv").arg(&venv));
        if create().is_err() {
            // Debian's own python3 has venv in a package of its own; no
            // command names it, so a name never found makes it installed.
            ensure_packages(&[("stormguard-deploy-no-venv", "python3-venv")])?;
            let _ = std::fs::remove_dir_all(&venv);
            create()?;
        }
    }
    println!(
        "xtask: installing {VALIDATOR} {VALIDATOR_VERSION} into {}",
        venv.display()
    );
    status(
        Command::new(venv.join("bin/pip"))
            .args(["install", "-q"])
            .arg(format!("{VALIDATOR}=={VALIDATOR_VERSION}")),
    )
    .context("installing the Kubernetes schema validator from PyPI")?;
    if !pinned() {
        bail!(
            "{VALIDATOR} {VALIDATOR_VERSION} is still missing from {}",
            venv.display()
        );
    }
    Ok(venv)
}
