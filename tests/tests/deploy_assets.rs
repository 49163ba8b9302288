//! deploy/ against the real daemon: every metric name the Grafana
//! dashboard's queries and the Prometheus alert rules use is one a running
//! daemon serves, and the Kubernetes ConfigMap's config.toml is one the
//! daemon accepts. (`cargo xtask deploy-check` checks the rest of deploy/
//! without a daemon.)
//!
//! The names come from the daemon's /metrics, never from a list here: a
//! daemon with `per_storm = true` and `[enforce] mode = "dry-run"`, read
//! while a storm it detected is still active, so that the series that
//! exist only then (`stormguard_storm_attempts_per_second`) are there too.
use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use stormguard_tests::{ChildGuard, Daemon, closed_port, scaled, stormguard};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(path)
}

fn read(path: &str) -> String {
    let p = deploy(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// Served only after the daemon's first runtime error, which a test
/// cannot cause on purpose: these must at least be named in the source of
/// the metrics endpoint.
const AFTER_FIRST_ERROR: [&str; 1] = ["stormguard_errors_total"];

/// `stormguard_...` names in a PromQL expression (or anything else).
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("stormguard_") {
        // Not the tail of a longer identifier.
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            out.insert(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    out
}

/// Every `expr` of the dashboard (panel queries) and its variables'
/// queries, as (where, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: serde_json::Value =
        serde_json::from_str(&read("grafana/stormguard.json")).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = t["expr"].as_str() {
                out.push((format!("panel {}", p["title"]), expr.to_string()));
            }
        }
    }
    for v in dash["templating"]["list"].as_array().expect("templating") {
        let q = match &v["query"] {
            serde_json::Value::String(s) => s.clone(),
            q => q["query"].as_str().unwrap_or_default().to_string(),
        };
        out.push((format!("variable {}", v["name"]), q));
    }
    out
}

/// Every `expr:` of the rules file (one line each), as (where, expression).
fn rule_queries(path: &str) -> Vec<(String, String)> {
    let text = read(path);
    let mut out = Vec::new();
    let mut alert = String::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(a) = l.strip_prefix("- alert:") {
            alert = a.trim().to_string();
        } else if let Some(e) = l.strip_prefix("expr:") {
            let e = e.trim();
            assert!(
                !e.is_empty() && !e.starts_with(['|', '>']),
                "{path} {alert}: write expr on one line (this test reads it so)"
            );
            out.push((format!("{path} {alert}"), e.trim().to_string()));
        }
    }
    out
}

/// Metric names in a /metrics body: sample names and `# TYPE` names.
fn served_names(body: &str) -> BTreeSet<String> {
    body.lines()
        .filter_map(|l| match l.strip_prefix("# TYPE ") {
            Some(t) => t.split_whitespace().next(),
            None if l.starts_with('#') || l.is_empty() => None,
            None => l.split(['{', ' ']).next(),
        })
        .map(str::to_string)
        .collect()
}

fn metrics_body(d: &Daemon) -> String {
    let url = format!("http://{}/metrics", d.metrics.expect("metrics port"));
    let out = Command::new("curl")
        .args(["-sf", &url])
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {url} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Names in `queries` that `served` lacks, with where they are used
/// (`pending`: names that may be missing, and are reported as such).
fn missing(
    queries: &[(String, String)],
    served: &BTreeSet<String>,
    pending: &BTreeSet<String>,
) -> (Vec<String>, BTreeSet<String>) {
    let mut wrong = Vec::new();
    let mut tolerated = BTreeSet::new();
    for (place, expr) in queries {
        for name in names_in(expr) {
            if served.contains(&name) {
                continue;
            }
            if pending.contains(&name) {
                tolerated.insert(name);
            } else {
                wrong.push(format!("{name} (in {place}: {expr})"));
            }
        }
    }
    (wrong, tolerated)
}

#[test]
fn names_are_found_in_expressions() {
    let n = names_in(
        r#"sum by (outcome) (rate(stormguard_connect_attempts_total{instance=~"$i"}[5m])) / x_stormguard_no + stormguard_a:b"#,
    );
    assert_eq!(
        n.into_iter().collect::<Vec<_>>(),
        ["stormguard_a:b", "stormguard_connect_attempts_total"]
    );
    let body = "# HELP stormguard_x_total X.\n# TYPE stormguard_x_total counter\n\
                stormguard_x_total 3\nstormguard_y{a=\"b\"} 1\n";
    assert_eq!(
        served_names(body).into_iter().collect::<Vec<_>>(),
        ["stormguard_x_total", "stormguard_y"]
    );
}

#[test]
fn dashboard_and_alert_rules_use_only_metrics_the_daemon_serves() {
    let Some(d) = Daemon::start(
        "deploy-assets",
        &std::env::temp_dir().join(format!("sg-deploy-assets-{}", std::process::id())),
        "per_storm = true\n[enforce]\nmode = \"dry-run\"\n",
    ) else {
        return;
    };
    // A storm: refused connects to a closed loopback port, still going when
    // /metrics is read (the per-storm series exist only while it is active).
    let port = closed_port(false).to_string();
    let secs = (8.0 * stormguard_tests::time_scale()).to_string();
    let storm = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["storm", "--addr", &port, "--secs", &secs])
            .stdout(Stdio::null()),
    );
    let bound = scaled(Duration::from_secs(15));
    let start = Instant::now();
    let body = loop {
        let body = metrics_body(&d);
        if body.contains("\nstormguard_storm_attempts_per_second{") {
            break body;
        }
        assert!(
            start.elapsed() < bound,
            "no per-storm series within {bound:?}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let served = served_names(&body);
    println!("served: {served:?}");

    let source = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../detector/src/metrics.rs"),
    )
    .expect("detector/src/metrics.rs");
    let mut pending: BTreeSet<String> = BTreeSet::new();
    for name in AFTER_FIRST_ERROR {
        if !served.contains(name) {
            assert!(
                source.contains(name),
                "{name} is neither served nor named in detector/src/metrics.rs"
            );
            pending.insert(name.to_string());
        }
    }

    let mut queries = dashboard_queries();
    let from_dashboard = queries.len();
    queries.extend(rule_queries("prometheus/stormguard-rules.yaml"));
    assert!(from_dashboard > 10 && queries.len() > from_dashboard + 5);
    let (wrong, tolerated) = missing(&queries, &served, &pending);
    assert!(
        wrong.is_empty(),
        "metric names the daemon does not serve:\n{}\nserved: {served:?}",
        wrong.join("\n")
    );
    if !tolerated.is_empty() {
        println!(
            "NOTE: used but not served by this daemon (tolerated, see the consts): {tolerated:?}"
        );
    }
    storm.finish(Duration::from_secs(30));
}

/// The ConfigMap's config.toml, as the pod reads it, passes
/// `stormguard config check`.
#[test]
fn the_configmap_config_is_accepted_by_the_daemon() {
    let text = read("kubernetes/configmap.yaml");
    // The block scalar after `config.toml: |`, indented by 4.
    let mut lines = text.lines().skip_while(|l| l.trim() != "config.toml: |");
    assert!(lines.next().is_some(), "no config.toml in the ConfigMap");
    let toml: String = lines
        .take_while(|l| l.is_empty() || l.starts_with("    "))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    assert!(toml.contains("[metrics]"), "{toml}");
    let path = std::env::temp_dir().join(format!("sg-configmap-{}.toml", std::process::id()));
    std::fs::write(&path, &toml).unwrap();
    let out = stormguard(["config", "check", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&path);
    assert!(
        out.status.success(),
        "config check refused the ConfigMap's config.toml: {}{}\n{toml}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
