//! `stormguard doctor` as a user runs it: as root every signal is listed
//! and the self-test counts its own traffic exactly; without capabilities
//! it still checks what it can, exits 2 and prints one FAIL line per
//! problem with its fix.
use std::{
    collections::BTreeMap,
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use stormguard::kernel::coverage::name;
use stormguard_tests::{scaled, skip_or_fail, stormguard_bin};

/// Every signal, in the order doctor lists them.
const SIGNALS: [&str; 10] = [
    name::CONNECTS,
    name::CONNECT_ERRORS,
    name::RESETS,
    name::SYN_RETRANSMITS,
    name::SENDS,
    name::RECEIVES,
    name::PROCESSES,
    name::UDP_DESTINATIONS,
    name::SYSCALL_PROBES,
    name::TLS_PLAINTEXT,
];

/// The self-test's counts: key → expected. `tcp_refused_v6.*` only when
/// the namespace has IPv6 loopback.
const EXPECTED: [(&str, u64); 14] = [
    ("tcp_refused_v4.attempts", 20),
    ("tcp_refused_v4.failures", 20),
    ("tcp_refused_v4.econnrefused", 20),
    ("tcp_refused_v4.resets", 20),
    ("tcp_ok.attempts", 1),
    ("tcp_ok.established", 1),
    ("tcp_ok.exchanges", 1),
    (
        "tcp_ok.request_bytes",
        "stormguard doctor ping\n".len() as u64,
    ),
    ("tcp_ok.response_bytes", "pong\n".len() as u64),
    ("udp_unconnected.sends", 10),
    ("udp_connected.connects", 1),
    ("udp_connected.sends", 10),
    ("thread_exit.exits", 1),
    ("unexpected.records", 0),
];
const EXPECTED_V6: [(&str, u64); 2] = [
    ("tcp_refused_v6.attempts", 5),
    ("tcp_refused_v6.econnrefused", 5),
];

fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_fail(
        what,
        &"doctor's tests need root (to load eBPF, or to drop it)",
    );
    false
}

fn doctor(args: &[&str]) -> Output {
    Command::new(stormguard_bin())
        .arg("doctor")
        .args(args)
        .output()
        .expect("run stormguard doctor")
}

/// doctor as `nobody` with no capabilities at all.
fn doctor_as_nobody(args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .arg(stormguard_bin())
        .arg("doctor")
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report:#}"))
}

/// True (after skip_or_fail) when the programs could not load here.
fn programs_failed(report: &Value, what: &str) -> bool {
    let c = check(report, "programs");
    if c["status"] == "fail" {
        skip_or_fail(what, &c["detail"]);
        return true;
    }
    false
}

#[test]
fn as_root_every_signal_is_listed_and_the_self_test_counts_exactly() {
    let what = "doctor_as_root";
    if !root_or_skip(what) {
        return;
    }
    let out = doctor(&["--json"]);
    let report = json(&out);
    if programs_failed(&report, what) {
        return;
    }
    assert_eq!(
        out.status.code(),
        Some(0),
        "{report:#}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["verdict"], "ok");
    assert_eq!(report["exit_code"], 0);

    let signals = report["signals"].as_array().expect("signals");
    let names: Vec<&str> = signals
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, SIGNALS, "every signal, in order");
    let status: BTreeMap<&str, &str> = signals
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(status[name::CONNECTS], "ok", "connects is required");
    for s in signals {
        // A gap says what it costs.
        if s["status"] == "missing" {
            assert!(!s["without"].as_str().unwrap().is_empty(), "{s}");
        }
    }
    // Every signal is a line of its own too.
    for n in SIGNALS {
        assert!(
            report["checks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["section"] == "signals" && c["name"].as_str().unwrap().starts_with(n)),
            "no check line for {n}"
        );
    }

    let st = &report["selftest"];
    assert_eq!(st["pid"], report["pid"], "counted for doctor's own pid");
    let counts: BTreeMap<&str, &Value> = st["counts"]
        .as_array()
        .expect("counts")
        .iter()
        .map(|c| (c["key"].as_str().unwrap(), c))
        .collect();
    let mut expected: Vec<(&str, u64)> = EXPECTED.to_vec();
    if st["ipv6_skipped"].is_null() {
        expected.extend(EXPECTED_V6);
    } else {
        assert!(!counts.contains_key("tcp_refused_v6.attempts"));
    }
    assert_eq!(
        counts.len(),
        expected.len(),
        "counts: {:?}",
        counts.keys().collect::<Vec<_>>()
    );
    for (key, n) in expected {
        let c = counts
            .get(key)
            .unwrap_or_else(|| panic!("no count {key}: {st:#}"));
        assert_eq!(c["expected"].as_u64(), Some(n), "{key}: {c}");
        let needs: Vec<&str> = c["needs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        if needs.iter().all(|n| status[n] != "missing") {
            assert_eq!(c["status"], "ok", "{key}: {c}");
            assert_eq!(c["seen"].as_u64(), Some(n), "{key}: {c}");
        } else {
            assert_eq!(c["status"], "skipped", "{key}: {c}");
            assert!(
                c["note"]
                    .as_str()
                    .unwrap()
                    .contains("missing on this kernel")
            );
        }
    }
    // connects is required: these can never be skipped.
    for key in [
        "tcp_refused_v4.attempts",
        "tcp_refused_v4.failures",
        "tcp_ok.established",
    ] {
        assert_eq!(counts[key]["status"], "ok", "{key}");
    }
    let elapsed = Duration::from_millis(st["elapsed_ms"].as_u64().expect("elapsed_ms"));
    assert!(
        elapsed <= scaled(Duration::from_secs(5)),
        "self-test took {elapsed:?}"
    );
}

#[test]
fn as_root_the_text_report_has_no_failure_and_prints_the_counts() {
    let what = "doctor_text_as_root";
    if !root_or_skip(what) {
        return;
    }
    let out = doctor(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("FAIL programs:") {
        skip_or_fail(what, &text);
        return;
    }
    assert_eq!(out.status.code(), Some(0), "{text}");
    for line in text.lines() {
        assert!(!line.starts_with("FAIL"), "{text}");
    }
    for want in [
        "ok   capabilities:",
        "ok   tracefs: mounted at",
        "ok   cgroup2: mounted at",
        "ok   connects (required): via ",
        "(nothing listens): saw 20 of 20",
        "ECONNREFUSED on connects to 127.0.0.1:",
        "on a connected socket: saw 10 of 10",
        "self-test took ",
        "verdict: ok",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
}

#[test]
fn without_capabilities_it_exits_2_naming_each_missing_capability() {
    if !root_or_skip("doctor_no_caps") {
        return;
    }
    let out = doctor_as_nobody(&["--json"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let report = json(&out);
    assert_eq!(report["verdict"], "fail");
    assert_eq!(report["exit_code"], 2);
    let caps = check(&report, "capabilities");
    assert_eq!(caps["status"], "fail", "{caps}");
    let detail = caps["detail"].as_str().unwrap();
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"] {
        assert!(detail.contains(cap), "{cap} not named: {detail}");
    }
    let fix = caps["fix"].as_str().unwrap();
    assert!(fix.contains("root") && fix.contains("setcap"), "{fix}");
    // What needs no privilege is still checked.
    for name in ["kernel", "tracefs", "cgroup2", "btf"] {
        let c = check(&report, name);
        assert!(c["status"] == "ok" || c["status"] == "warn", "{c}");
    }
    // What needs them is not, and says so.
    assert_eq!(check(&report, "programs")["status"], "skip");
    assert_eq!(check(&report, "self-test")["status"], "skip");
    assert_eq!(report["signals"], Value::Array(vec![]));
    assert!(report["selftest"].is_null());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("doctor: 1 required check(s) failed"), "{err}");
}

#[test]
fn without_capabilities_the_text_has_one_fail_line_per_problem_with_its_fix() {
    if !root_or_skip("doctor_no_caps_text") {
        return;
    }
    let out = doctor_as_nobody(&[]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let fails: Vec<&str> = text.lines().filter(|l| l.starts_with("FAIL ")).collect();
    let report = json(&doctor_as_nobody(&["--json"]));
    let failed = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .count();
    // As nobody, only the capabilities are missing.
    assert_eq!(failed, 1, "{report}");
    assert_eq!(fails.len(), failed, "one line per problem:\n{text}");
    for line in &fails {
        assert!(line.contains(" — fix: "), "no fix: {line}");
    }
    let caps = fails
        .iter()
        .find(|l| l.starts_with("FAIL capabilities:"))
        .unwrap_or_else(|| panic!("no capabilities line:\n{text}"));
    assert!(
        caps.contains("CAP_BPF") && caps.contains("setcap") && caps.contains("root"),
        "{caps}"
    );
    for want in [
        "ok   tracefs:",
        "ok   cgroup2:",
        "ok   kernel:",
        "verdict: FAIL",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
}

#[test]
fn without_cap_sys_admin_the_programs_load_but_the_self_test_cannot_run() {
    let what = "doctor_no_sys_admin";
    if !root_or_skip(what) {
        return;
    }
    // Root with the three capabilities the daemon needs, as after setcap.
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-sys_admin", "--inh-caps=-all", "--"])
        .arg(stormguard_bin())
        .args(["doctor", "--json"])
        .output()
        .expect("setpriv");
    let report = json(&out);
    if programs_failed(&report, what) {
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{report:#}");
    assert_eq!(check(&report, "capabilities")["status"], "ok");
    let c = check(&report, "self-test capability");
    assert_eq!(c["status"], "fail");
    assert!(c["fix"].as_str().unwrap().contains("root"), "{c}");
    assert_eq!(check(&report, "programs")["status"], "ok");
    assert_eq!(report["signals"].as_array().unwrap().len(), SIGNALS.len());
    assert_eq!(check(&report, "self-test")["status"], "skip");
}
