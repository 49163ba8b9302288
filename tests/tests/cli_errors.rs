//! What a user sees when the environment is wrong: one clear line naming
//! the problem and the fix, exit status 2, nothing left attached.
use std::process::{Command, Output};

use stormguard_tests::{skip_or_fail, stormguard, stormguard_bin};

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

/// Runs `stormguard args` with stdout a pipe whose read end is already
/// closed, so that its first write fails with EPIPE, whatever its timing.
fn into_closed_pipe(args: &[&str]) -> Output {
    use std::os::fd::FromRawFd as _;
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into the array we own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both are ours and open; each is owned once.
    let (read, write) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(read);
    Command::new(stormguard_bin())
        .args(args)
        .stdout(std::process::Stdio::from(write))
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("run stormguard")
}

/// A stand-in daemon: answers every request line on `socket` with
/// `result`, for as many connections as come, until the test ends.
fn fake_daemon(socket: &std::path::Path, result: serde_json::Value) {
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind");
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let result = result.clone();
            std::thread::spawn(move || {
                use std::io::{BufRead as _, Write as _};
                let mut w = conn.try_clone().expect("clone");
                for line in std::io::BufReader::new(conn).lines() {
                    if line.is_err() {
                        return;
                    }
                    let resp = serde_json::json!({"v": 1, "ok": true, "result": result});
                    if writeln!(w, "{resp}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn a_closed_pipe_ends_commands_quietly_with_status_0() {
    let dir = std::env::temp_dir().join(format!("sg-pipe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let incidents = dir.join("incidents.sock");
    fake_daemon(&incidents, serde_json::json!([]));
    let status = dir.join("status.sock");
    fake_daemon(&status, serde_json::json!({"version": "x", "pid": 1}));
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "").unwrap();
    let (inc, st) = (
        incidents.to_str().unwrap().to_string(),
        status.to_str().unwrap().to_string(),
    );
    for args in [
        vec!["config", "show"],
        vec!["config", "check", cfg.to_str().unwrap()],
        vec!["incidents", "--socket", &inc],
        vec!["incidents", "--socket", &inc, "--json"],
        vec!["status", "--socket", &st],
        vec!["status", "--socket", &st, "--json"],
        vec!["--help"],
        vec!["incidents", "--help"],
    ] {
        let out = into_closed_pipe(&args);
        assert_eq!(
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).as_ref()
            ),
            (Some(0), ""),
            "stormguard {args:?}"
        );
    }
    // The same through a shell pipeline, as a user types it.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} config show | head -1",
            stormguard_bin().display()
        ))
        .output()
        .expect("bash");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    assert!(out.stderr.is_empty(), "{out:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn numbers_out_of_range_and_bad_store_paths_exit_2_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("sg-ranges-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    let cases = [
        (
            "[detect]\ncalm_ms = 18446744073709551615\n".to_string(),
            "[detect] calm_ms = 18446744073709551615 is out of range: must be 100..=3600000"
                .to_string(),
        ),
        (
            "[probes]\nmax_attached_secs = 0\n".to_string(),
            "[probes] max_attached_secs = 0 is out of range: must be 1..=86400".to_string(),
        ),
        (
            format!("[store]\npath = \"{}\"\n", dir.display()),
            format!(
                "[store] path = {}: is a directory; give the database file, e.g. /var/lib/stormguard/incidents.db",
                dir.display()
            ),
        ),
        (
            "[store]\npath = \"relative.db\"\n".to_string(),
            "[store] path = relative.db: must be an absolute path (the daemon's working directory is /)"
                .to_string(),
        ),
    ];
    for (text, problem) in &cases {
        std::fs::write(&cfg, text).unwrap();
        let expected = format!("stormguard: invalid config {}: {problem}", cfg.display());
        for args in [
            vec!["config", "check", cfg.to_str().unwrap()],
            vec!["daemon", "--config", cfg.to_str().unwrap()],
        ] {
            let out = stormguard(&args);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
            assert_eq!(stderr_line(&out), expected, "{args:?}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn errors_are_one_line_even_when_a_message_is_not() {
    // A TOML syntax error: the parser's own message spans lines in some
    // versions; what is printed is one line, and status 2.
    let dir = std::env::temp_dir().join(format!("sg-oneline-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    for text in ["[detect\n", "[detect]\ncalm_ms = \"x\n", "a = [1,\n2,\n"] {
        std::fs::write(&cfg, text).unwrap();
        let out = stormguard(["config", "check", cfg.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let line = stderr_line(&out);
        assert!(
            line.starts_with(&format!(
                "stormguard: invalid config {}: line ",
                cfg.display()
            )),
            "{line}"
        );
    }
    // A missing socket: one line, status 2.
    let out = stormguard([
        "status",
        "--socket",
        dir.join("none.sock").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_line(&out).contains("daemon is not running"));
    std::fs::remove_dir_all(&dir).unwrap();
}
