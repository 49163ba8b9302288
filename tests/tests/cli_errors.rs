//! What a user sees when the environment is wrong: one clear line naming
//! the problem and the fix, exit status 2, nothing left attached.
use std::process::{Command, Output};

use stormguard_tests::{skip_or_fail, stormguard_bin};

fn root_or_skip(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    skip_or_fail(
        what,
        &"these tests need root to drop capabilities and unshare mounts",
    );
    false
}

fn stderr_line(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {text}");
    lines[0].to_string()
}

#[test]
fn missing_capabilities_are_each_named() {
    if !root_or_skip("missing_capabilities") {
        return;
    }
    let bin = stormguard_bin();
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-bpf,-perfmon,-net_admin,-sys_admin",
            "--inh-caps=-all",
            "--",
        ])
        .arg(&bin)
        .args(["watch", "--duration", "1"])
        .output()
        .expect("setpriv (util-linux)");
    assert_eq!(out.status.code(), Some(2));
    let line = stderr_line(&out);
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(line.contains(cap), "{cap} not named: {line}");
    }
    assert!(!line.contains("not root"), "{line}");

    // Only one missing: only that one is named.
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-net_admin,-sys_admin",
            "--inh-caps=-all",
            "--",
        ])
        .arg(&bin)
        .args(["watch", "--duration", "1"])
        .output()
        .expect("setpriv");
    assert_eq!(out.status.code(), Some(2));
    let line = stderr_line(&out);
    assert!(line.contains("CAP_NET_ADMIN"), "{line}");
    assert!(
        !line.contains("CAP_BPF") && !line.contains("CAP_PERFMON"),
        "{line}"
    );
}

#[test]
fn unmounted_tracefs_prints_the_mount_command() {
    if !root_or_skip("unmounted_tracefs") {
        return;
    }
    // A private mount namespace where tracefs is not mounted.
    let script = format!(
        "umount /sys/kernel/tracing && exec {} watch --duration 1",
        stormguard_bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux)");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert_eq!(
        stderr_line(&out),
        "stormguard: tracefs is not mounted; mount it with: mount -t tracefs tracefs /sys/kernel/tracing"
    );
}

#[test]
fn a_missing_tracepoint_is_named() {
    if !root_or_skip("missing_tracepoint") {
        return;
    }
    // Hide the sock: tracepoints behind an empty directory, in a private
    // mount namespace.
    let empty = std::env::temp_dir().join(format!("sg-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let script = format!(
        "mount --bind {} /sys/kernel/tracing/events/sock && exec {} watch --duration 1",
        empty.display(),
        stormguard_bin().display()
    );
    let out = Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .output()
        .expect("unshare");
    std::fs::remove_dir(&empty).unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line = stderr_line(&out);
    assert!(
        line.contains("kernel has no tracepoint sock:inet_sock_set_state"),
        "{line}"
    );
}

#[test]
fn bad_arguments_are_refused_by_the_parser() {
    let out = Command::new(stormguard_bin())
        .args(["watch", "--interval-ms", "5"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--interval-ms"), "{err}");
}
