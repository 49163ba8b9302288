//! `stormguard watch` as a user runs it: a subprocess with real probes, a
//! real storming child, and the on-demand syscall probes checked from
//! outside the process.
use std::{
    process::{Command, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use stormguard_tests::{
    ChildGuard, attached_programs, closed_port, lines, skip_or_fail, stormguard_bin,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");
const ON_DEMAND: [&str; 2] = ["sg_exit_connect", "sg_sys_enter"];

fn on_demand_attached(pid: u32) -> bool {
    let progs = attached_programs(pid);
    ON_DEMAND.iter().all(|p| progs.iter().any(|n| n == p))
}

fn none_attached(pid: u32) -> bool {
    let progs = attached_programs(pid);
    !progs.iter().any(|n| ON_DEMAND.contains(&n.as_str()))
}

/// `watch` sees every process on the host: one test's storm would make the
/// other's idle moments suspect. They run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    // A failed test poisons it; the next one may still run.
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits until `ok()` holds, up to `bound`; returns the time it took.
fn wait_for(what: &str, bound: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// JSON rows printed so far for `pid`.
fn rows_for(rx: &Receiver<String>, pid: u32, seen: &mut Vec<serde_json::Value>) {
    while let Ok(line) = rx.try_recv() {
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad JSON row {line:?}: {e}"));
        if v["pid"] == pid {
            seen.push(v);
        }
    }
}

#[test]
fn watch_json_shows_a_storm_and_probes_attach_only_while_it_lasts() {
    let _alone = alone();
    let mut watch = ChildGuard::spawn(
        Command::new(stormguard_bin())
            .args([
                "watch",
                "--json",
                "--interval-ms",
                "500",
                "--duration",
                "90",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let watch_pid = watch.pid();
    let stdout = lines(watch.0.stdout.take().expect("stdout"));
    let stderr = lines(watch.0.stderr.take().expect("stderr"));
    let started = Instant::now();
    loop {
        match stderr.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.starts_with("stormguard: watching") => break,
            Ok(l) if l.starts_with("stormguard: ") => {
                skip_or_fail("watch", &l);
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("watch did not start in 30 s: {e}"),
        }
    }
    println!("watch: loaded in {:?}", started.elapsed());

    // Nothing is suspect: no syscall tracepoint may be attached.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        none_attached(watch_pid),
        "syscall probes attached while idle: {:?}",
        attached_programs(watch_pid)
    );
    assert!(
        attached_programs(watch_pid).len() >= 12,
        "always-on hooks missing: {:?}",
        attached_programs(watch_pid)
    );

    let port = closed_port(false);
    let storm = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["storm", "--addr", &port.to_string(), "--secs", "20"])
            .stdout(Stdio::null()),
    );
    let storm_pid = storm.pid();
    let storm_start = Instant::now();
    let mut seen = Vec::new();
    let row_time = wait_for(
        "a JSON row for the storming child",
        Duration::from_secs(10),
        || {
            rows_for(&stdout, storm_pid, &mut seen);
            !seen.is_empty()
        },
    );
    println!("watch: storming child's row after {row_time:?}");
    let row = &seen[0];
    assert_eq!(row["destination"], port.to_string());
    assert_eq!(row["proto"], "tcp");
    assert_eq!(row["comm"], "stormclient");
    assert_eq!(row["main_error"], "ECONNREFUSED");
    assert_eq!(row["exe"].as_str(), Some(CLIENT), "{row}");
    assert!(
        row["cmdline"]
            .as_str()
            .is_some_and(|c| c.contains("storm --addr")),
        "{row}"
    );
    assert_eq!(row["ppid"], std::process::id(), "{row}");
    assert!(
        row["cgroup"].as_str().is_some_and(|c| c.starts_with('/')),
        "{row}"
    );
    assert!(row["failures"].as_u64().unwrap_or(0) > 0 && row["failures"] == row["attempts"]);

    let attach_time = wait_for("on-demand probes attached", Duration::from_secs(15), || {
        on_demand_attached(watch_pid)
    });
    println!(
        "watch: on-demand probes attached {:?} after the storm began",
        storm_start.elapsed().max(attach_time)
    );
    // While probed, the child's rows say it is suspect and carry its syscall rate.
    wait_for(
        "a probed row with a syscall rate",
        Duration::from_secs(10),
        || {
            rows_for(&stdout, storm_pid, &mut seen);
            seen.iter()
                .any(|r| r["suspect"] == true && r["syscalls_per_s"].as_f64().unwrap_or(0.0) > 0.0)
        },
    );

    // …and the verdict column says storm, with the one-line reason.
    let storm_time = wait_for(
        "a row with a storm verdict",
        Duration::from_secs(10),
        || {
            rows_for(&stdout, storm_pid, &mut seen);
            seen.iter().any(|r| {
                r["verdict"] == "storm"
                    && r["explanation"].as_str().is_some_and(|e| {
                        e.contains("100% ECONNREFUSED") && e.contains("no backoff")
                    })
            })
        },
    );
    println!("watch: storm verdict shown {storm_time:?} after the probed row");

    drop(storm);
    let detach_time = wait_for("on-demand probes detached", Duration::from_secs(20), || {
        none_attached(watch_pid)
    });
    println!("watch: on-demand probes detached {detach_time:?} after the storm ended");

    // Ctrl-C detaches cleanly: exit 0 and no link left behind.
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(watch_pid as i32, libc::SIGINT) };
    let status = watch.0.wait().expect("wait for watch");
    assert!(status.success(), "watch exited with {status}");
    let rest: Vec<String> = stderr.try_iter().collect();
    assert!(rest.iter().any(|l| l == "stormguard: detached"), "{rest:?}");
}

/// Issue 7 item 7: a storm of short-lived processes — each connects once,
/// so every flow is healthy — is visible in `watch --json` as a roll-up row
/// of their parent, with its verdict and members.
#[test]
fn watch_json_shows_a_parent_roll_up_storming_through_short_lived_children() {
    let _alone = alone();
    let mut watch = ChildGuard::spawn(
        Command::new(stormguard_bin())
            .args([
                "watch",
                "--json",
                "--interval-ms",
                "500",
                "--duration",
                "60",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stdout = lines(watch.0.stdout.take().expect("stdout"));
    let stderr = lines(watch.0.stderr.take().expect("stderr"));
    loop {
        match stderr.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.starts_with("stormguard: watching") => break,
            Ok(l) if l.starts_with("stormguard: ") => {
                skip_or_fail("watch roll-up", &l);
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("watch did not start in 30 s: {e}"),
        }
    }
    let port = closed_port(false).to_string();
    // 400 children, one every 5 ms, each one refused connect.
    let spawner = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["spawn", "--count", "400", "--gap-ms", "5", "--"])
            .args(["tcp", "--addr", &port, "--count", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let parent = spawner.pid();
    // The children's pids seen in flow rows; how many depends on how far
    // the run got when the roll-up row came, so the count is not exact.
    let mut flow_pids = std::collections::HashSet::new();
    let mut rollup = None;
    let took = wait_for(
        "a parent roll-up row with a storm verdict",
        Duration::from_secs(20),
        || {
            while let Ok(line) = stdout.try_recv() {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("bad JSON row {line:?}: {e}"));
                if v["destination"] != port.as_str() {
                    continue;
                }
                match v["subject"].as_str() {
                    Some("flow") => {
                        // Each child connects exactly once, refused: one
                        // row of its own, with exactly that attempt.
                        assert_ne!(v["verdict"], "storm", "one connect is no storm: {v}");
                        assert_eq!(
                            (v["attempts"].as_u64(), v["failures"].as_u64()),
                            (Some(1), Some(1)),
                            "{v}"
                        );
                        let pid = v["pid"].as_u64().expect("a flow row has a pid");
                        assert!(flow_pids.insert(pid), "child {pid} has one flow row: {v}");
                    }
                    Some("parent")
                        if v["ppid"] == parent
                            && v["verdict"] == "storm"
                            && v["members"].as_array().is_some_and(|m| m.len() >= 2) =>
                    {
                        rollup = Some(v);
                    }
                    Some("parent" | "cgroup") => {}
                    other => panic!("row without a known subject ({other:?}): {v}"),
                }
            }
            rollup.is_some()
        },
    );
    let row = rollup.expect("roll-up row");
    println!("watch: parent roll-up storm row after {took:?}: {row}");
    assert_eq!(row["comm"], "stormclient", "the parent's name: {row}");
    assert_eq!(row["proto"], "tcp");
    assert!(row["pid"].is_null(), "a roll-up row is no process: {row}");
    assert!(row["member_count"].as_u64().unwrap_or(0) >= 2, "{row}");
    assert!(
        row["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m.as_u64().is_some_and(|p| p != u64::from(parent))),
        "members are the children: {row}"
    );
    assert!(
        row["explanation"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("pid {parent}")) && e.contains("ECONNREFUSED")),
        "{row}"
    );
    assert!(
        !flow_pids.is_empty() && !flow_pids.contains(&u64::from(parent)),
        "the children's own flow rows are there too, not the parent's"
    );
    spawner.finish(Duration::from_secs(30));
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(watch.pid() as i32, libc::SIGINT) };
    let status = watch.0.wait().expect("wait for watch");
    assert!(status.success(), "watch exited with {status}");
}
