//! The daemon survives the storms it records (issue 9): thousands of
//! storming processes, a burst of a million records, `kill -9` while
//! incidents are written, a full disk, a corrupt database. Each test runs
//! a real `stormguard daemon` and real client processes, and each would
//! fail if the daemon died, stalled or lost what it had acknowledged.
use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use stormguard_tests::{ChildGuard, Daemon, closed_port, scaled};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

fn tmp(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sg-survive-{tag}-{}", std::process::id()))
}

/// Every daemon sees every process on the host: these tests storm, so
/// they run one at a time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A storming client: tight refused connects to `addr` for `secs`.
fn storm(addr: &str, secs: &str) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["storm", "--addr", addr, "--secs", secs])
            .stdout(Stdio::null()),
    )
}

/// A field of /proc/PID/status in kB (VmRSS, VmHWM).
fn status_kb(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The API's `status`, asked over the socket directly and timed: the
/// daemon's answer, not the start-up of a CLI process on a host busy
/// forking thousands.
fn timed_status(d: &Daemon) -> (serde_json::Value, Duration) {
    use std::io::{BufRead, Write};
    let t = Instant::now();
    let mut s = std::os::unix::net::UnixStream::connect(&d.socket).expect("connect API");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    s.write_all(b"{\"v\":1,\"method\":\"status\",\"params\":{}}\n")
        .expect("request");
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .expect("response");
    let took = t.elapsed();
    let v: serde_json::Value = serde_json::from_str(&line).expect("JSON response");
    assert_eq!(v["ok"], true, "status failed: {line}");
    (v["result"].clone(), took)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn incidents_towards(d: &Daemon, dest: &str) -> Vec<serde_json::Value> {
    d.json(&["incidents"])
        .as_array()
        .expect("incident list")
        .iter()
        .filter(|i| i["destination"] == dest)
        .cloned()
        .collect()
}

/// 2,000 processes of one parent retrying one refused port: the daemon
/// stays up and answers, the incident list stays readable (one group
/// incident, not 2,000), and its memory stays under 256 MiB.
#[test]
fn two_thousand_processes_storming_one_destination() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("2000", &tmp("2000"), "") else {
        return;
    };
    let pid = d.child.as_ref().expect("child").pid();
    let port = closed_port(false).to_string();
    let mut fanout = ChildGuard::spawn(
        Command::new(CLIENT)
            .args([
                "fanout",
                "--addr",
                &port,
                "--children",
                "2000",
                "--rate",
                "20",
                "--secs",
                "8",
            ])
            .stdout(Stdio::null()),
    );
    let started = Instant::now();
    let mut latencies = Vec::new();
    let mut most = 0;
    while started.elapsed() < scaled(Duration::from_secs(40)) {
        d.assert_alive("during the 2,000-process storm");
        let (_, took) = timed_status(&d);
        latencies.push(took);
        most = most.max(incidents_towards(&d, &port).len());
        if fanout.0.try_wait().expect("wait fanout").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = fanout.0.kill();
    let _ = fanout.0.wait();
    d.assert_alive("after the 2,000-process storm");
    let incidents = incidents_towards(&d, &port);
    let hwm_mib = status_kb(pid, "VmHWM") / 1024;
    latencies.sort();
    let processes: Vec<u64> = incidents
        .iter()
        .filter_map(|i| i["processes"].as_u64().or(i["member_count"].as_u64()))
        .collect();
    println!(
        "2,000 processes: {} incidents opened towards {port} (most listed at once {most}), \
         processes counted {processes:?}, daemon peak RSS {hwm_mib} MiB, status p50 {:?} p99 {:?} max {:?} over {} queries",
        incidents.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().expect("queries"),
        latencies.len()
    );
    assert!(
        !incidents.is_empty(),
        "the storm of 2,000 processes opened no incident"
    );
    assert!(
        incidents.len() <= 3,
        "{} incidents for one storm: the list is not readable",
        incidents.len()
    );
    assert!(hwm_mib < 256, "daemon peak RSS {hwm_mib} MiB ≥ 256 MiB");
    // The issue asks this run for the daemon to stay up and answer; the
    // < 1 s API bound belongs to the 1 M burst below. Here 2,000 runnable
    // processes share two cores with the test itself, so one slow answer
    // is the scheduler, not the daemon: the bound is generous, the figure
    // printed above.
    assert!(
        percentile(&latencies, 0.99) < scaled(Duration::from_secs(5)),
        "status p99 {:?}",
        percentile(&latencies, 0.99)
    );
    d.stop();
}

/// A million UDP datagrams in a burst beside a storm: the API keeps
/// answering (p99 < 1 s), what the ring could not take is counted and
/// shown the same in status and metrics, and the storm is still flagged.
#[test]
fn a_million_records_in_a_burst() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("burst", &tmp("burst"), "") else {
        return;
    };
    let sink = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp sink");
    let sink_addr = sink.local_addr().expect("addr").to_string();
    let port = closed_port(false).to_string();
    let started = Instant::now();
    let burst = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["udp", "--addr", &sink_addr, "--count", "1000000"])
            .stdout(Stdio::null()),
    );
    let storming = storm(&port, "6");
    let mut most_storms = 0;
    let mut latencies = Vec::new();
    let mut burst = Some(burst);
    while started.elapsed() < scaled(Duration::from_secs(60)) {
        d.assert_alive("during the burst");
        let (status, took) = timed_status(&d);
        latencies.push(took);
        most_storms = most_storms.max(status["storms_active"].as_u64().unwrap_or(0));
        if let Some(b) = burst.as_mut()
            && b.0.try_wait().expect("wait burst").is_some()
        {
            println!(
                "burst of 1,000,000 datagrams sent in {:?}",
                started.elapsed()
            );
            burst = None;
        }
        if burst.is_none() && started.elapsed() > Duration::from_secs(7) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(burst.is_none(), "the burst did not finish in time");
    drop(storming);
    // The last second's counters reach status and metrics together.
    std::thread::sleep(Duration::from_millis(1_500));
    let (status, _) = timed_status(&d);
    let metrics = reqwest_metrics(d.metrics.expect("metrics port"));
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stormguard_events_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("stormguard_events_dropped_total in /metrics");
    let shown = status["ring_drops"].as_u64().expect("ring_drops")
        + status["untracked"].as_u64().expect("untracked");
    latencies.sort();
    println!(
        "1 M burst: status p50 {:?} p99 {:?} max {:?} over {} queries; drops shown {shown}, metrics {dropped}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().expect("queries"),
        latencies.len()
    );
    assert_eq!(dropped, shown, "status and metrics disagree on drops");
    assert!(
        percentile(&latencies, 0.99) < Duration::from_secs(1),
        "status p99 {:?} during the burst",
        percentile(&latencies, 0.99)
    );
    let flagged = incidents_towards(&d, &port);
    assert_eq!(
        flagged.len(),
        1,
        "the storm inside the burst was not flagged once (most storms active at once: {most_storms}; all incidents: {})",
        d.json(&["incidents"])
    );
    d.stop();
}

/// The metrics page over plain TCP (no HTTP client crate needed).
fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    out
}

/// `kill -9` twenty times at random moments while storms open and update
/// incidents: after each, the database passes `PRAGMA integrity_check` and
/// holds every incident the API had listed before the kill.
#[test]
fn kill_9_twenty_times_loses_nothing_acknowledged() {
    let _alone = alone();
    let dir = tmp("kill9");
    let Some(mut d) = Daemon::start("kill9", &dir, "") else {
        return;
    };
    let db = dir.join("incidents.db");
    // A small deterministic generator: "random" moments, reproducible.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    for round in 0..20 {
        // Storms towards fresh destinations: new incidents, each then
        // rewritten every second.
        let storms: Vec<ChildGuard> = (0..4)
            .map(|_| storm(&closed_port(false).to_string(), "4"))
            .collect();
        let wait = Duration::from_millis(800 + next() % 2_200);
        std::thread::sleep(wait);
        d.assert_alive("before the kill");
        let listed = d.json(&["incidents"]);
        for i in listed.as_array().expect("list") {
            acknowledged.insert(i["id"].as_str().expect("id").to_string());
        }
        let child = d.child.take().expect("daemon");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.pid() as i32, libc::SIGKILL) };
        let mut child = child;
        let _ = child.0.wait();
        drop(storms);
        let conn = rusqlite::Connection::open(&db).expect("open the database");
        let said: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity_check");
        assert_eq!(said, "ok", "round {round}: integrity_check");
        drop(conn);
        assert!(d.spawn("kill9"), "restart after kill -9");
        let now: BTreeSet<String> = d
            .json(&["incidents"])
            .as_array()
            .expect("list")
            .iter()
            .map(|i| i["id"].as_str().expect("id").to_string())
            .collect();
        let lost: Vec<&String> = acknowledged.difference(&now).collect();
        assert!(
            lost.is_empty(),
            "round {round} (killed after {wait:?}): acknowledged incidents lost: {lost:?}"
        );
        println!(
            "round {round}: killed after {wait:?}; {} incidents acknowledged, all there",
            acknowledged.len()
        );
    }
    assert!(
        acknowledged.len() >= 20,
        "only {} incidents were written in 20 rounds: the test did not exercise writes",
        acknowledged.len()
    );
    d.stop();
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount tmpfs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(dir.into())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fills the filesystem holding `path` with one file until ENOSPC.
fn fill(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let block = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    while let Ok(n) = f.write(&block) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = f.sync_all();
    written
}

/// The database's disk fills up: detection goes on (the storm is seen and
/// counted), status says the store is failing, and once space is back the
/// incident is written after all.
#[test]
fn a_full_disk_costs_the_history_not_detection() {
    let _alone = alone();
    let dir = tmp("full");
    let fs = Tmpfs::mount(&dir, "4m");
    let Some(mut d) = Daemon::start("full disk", &dir, "") else {
        return;
    };
    let filler = dir.join("filler");
    let filled = fill(&filler);
    println!("filled the store's tmpfs with {filled} bytes");
    let port = closed_port(false).to_string();
    let storming = storm(&port, "8");
    let started = Instant::now();
    let mut seen_failing = None;
    let mut seen_storm = false;
    while started.elapsed() < scaled(Duration::from_secs(30)) {
        d.assert_alive("with a full disk");
        let (status, _) = timed_status(&d);
        seen_storm |= status["storms_active"].as_u64().unwrap_or(0) >= 1;
        if status["store"]["state"] == "failing" {
            let degraded = status["degraded"].to_string();
            assert!(
                degraded.contains("store"),
                "status does not say what is degraded: {degraded}"
            );
            seen_failing = Some(status["store"].clone());
        }
        if seen_storm && seen_failing.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "after {:?}: storm seen {seen_storm}, store {seen_failing:?}",
        started.elapsed()
    );
    assert!(seen_storm, "no storm detected while the disk was full");
    let store = seen_failing.expect("status never said the store was failing");
    assert!(
        store["last_error"].as_str().unwrap_or("").contains("full"),
        "the store's error does not say the disk is full: {store}"
    );
    // Space comes back: the writer's retry lands the incident.
    std::fs::remove_file(&filler).expect("remove filler");
    let back = Instant::now();
    loop {
        d.assert_alive("after space came back");
        let (status, _) = timed_status(&d);
        if status["store"]["state"] == "ok" && !incidents_towards(&d, &port).is_empty() {
            break;
        }
        assert!(
            back.elapsed() < scaled(Duration::from_secs(20)),
            "the incident was not written once space came back: {}",
            status["store"]
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("written {:?} after space came back", back.elapsed());
    drop(storming);
    d.stop();
    drop(d);
    drop(fs);
}

/// A database file that is not a database is moved aside with a message
/// and the daemon starts with a fresh one.
#[test]
fn a_corrupt_database_is_moved_aside() {
    let _alone = alone();
    let dir = tmp("corrupt");
    std::fs::create_dir_all(&dir).expect("dir");
    let junk = b"this is not a SQLite database, it is junk left by a crash".repeat(100);
    std::fs::write(dir.join("incidents.db"), &junk).expect("junk");
    let Some(mut d) = Daemon::start("corrupt db", &dir, "") else {
        return;
    };
    let aside: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("incidents.db.corrupt-"))
        })
        .collect();
    assert_eq!(aside.len(), 1, "the corrupt file was not moved aside once");
    assert_eq!(std::fs::read(&aside[0]).expect("aside"), junk);
    assert_eq!(d.json(&["incidents"]), serde_json::json!([]));
    d.stop();
}

/// A table's entries and evictions from status (`kernel:NAME` for maps).
fn table(status: &serde_json::Value, name: &str) -> (u64, u64) {
    let t = status["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no table {name} in status"));
    (
        t["entries"].as_u64().expect("entries"),
        t["evictions"].as_u64().expect("evictions"),
    )
}

/// 20,000 short-lived processes refused by one port, and one process
/// refused by 50,000 destinations, beside a storm: afterwards no table or
/// map holds entries of the dead processes once their expiry has passed,
/// the flows evicted at the bound are counted, and the storm — the most
/// severe — was kept and recorded.
#[test]
fn twenty_thousand_processes_and_fifty_thousand_destinations_leave_nothing_behind() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("churn", &tmp("churn"), "") else {
        return;
    };
    let closed = closed_port(false);
    let storm_at = closed_port(false).to_string();
    let started = Instant::now();
    let storming = storm(&storm_at, "20");
    let spawn = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["spawn", "--count", "20000", "--gap-ms", "0", "--"])
            .args(["tcp", "--addr", &closed.to_string(), "--count", "1"])
            .stdout(Stdio::null()),
    );
    let scatter = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["scatter", "--count", "50000", "--port"])
            .arg(closed.port().to_string())
            .stdout(Stdio::null()),
    );
    let spawned = spawn.finish(scaled(Duration::from_secs(240)));
    let scattered = scatter.finish(scaled(Duration::from_secs(120)));
    println!(
        "20,000 processes and 50,000 destinations in {:?} ({} / {})",
        started.elapsed(),
        spawned.trim(),
        scattered.trim()
    );
    drop(storming);
    d.assert_alive("after the churn");
    let (during, _) = timed_status(&d);
    let (_, flow_evictions) = table(&during, "flows");
    // 70,000 flows through a 10,000-flow table: most go by eviction (the
    // rest expire idle while the load runs, which is not counted as one).
    println!("flows evicted at the bound: {flow_evictions}");
    assert!(
        flow_evictions >= 10_000,
        "70,000 flows through a 10,000-flow table evicted only {flow_evictions}"
    );
    let kept = incidents_towards(&d, &storm_at);
    assert_eq!(kept.len(), 1, "the storm was not kept through the churn");
    // Past every expiry (idle flows 10 s, storms resolved after calm, the
    // kernel sweep once a second, map usage counted every 10 s).
    // Tables that hold only what is active: empty once all is over.
    let empty_tables = [
        "flows",
        "rollups",
        "syscall_rates",
        "process_reads_pending",
        "kernel:SYSCALLS",
        "kernel:PRE_SYN",
        "kernel:RECV_NOTES",
        "kernel:SUSPECTS",
    ];
    // Tables of processes: at most the tasks alive on the host (the test's
    // own threads fork too); 22,000 dead ones left would be far above it.
    let process_tables = ["parents", "forks", "processes"];
    let live_tasks = || {
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| std::fs::read_dir(e.path().join("task")).ok())
            .map(|t| t.count() as u64)
            .sum::<u64>()
    };
    let quiet = Instant::now();
    let left = loop {
        d.assert_alive("while the tables empty");
        let (status, _) = timed_status(&d);
        let live = live_tasks();
        let mut left: Vec<(&str, u64)> = empty_tables
            .iter()
            .map(|t| (*t, table(&status, t).0))
            .filter(|(_, n)| *n > 0)
            .collect();
        left.extend(
            process_tables
                .iter()
                .map(|t| (*t, table(&status, t).0))
                .filter(|(_, n)| *n > live),
        );
        if left.is_empty() || quiet.elapsed() > scaled(Duration::from_secs(60)) {
            println!(
                "tables after {:?} ({live} tasks alive): {}",
                quiet.elapsed(),
                status["tables"]
            );
            break left;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        left.is_empty(),
        "entries of dead processes left past their expiry: {left:?}"
    );
    d.stop();
}
