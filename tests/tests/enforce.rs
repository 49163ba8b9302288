//! Enforcement (issue 10) with real eBPF: a real daemon, real clients
//! moved into a cgroup each test creates, budgets enforced by the kernel
//! at connect. Counts come from both sides: the client's own tally of
//! what connect() returned, and the daemon's per-budget counters.
use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use serde_json::Value;
use stormguard_tests::{Cgroup, ChildGuard, Daemon, Link, closed_port, run, scaled, script};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");
/// The errno the tests configure for denials, distinct from the real
/// ECONNREFUSED of a closed port so the client can tell them apart.
const DENY: &str = "EHOSTUNREACH";
const DENY_ERRNO: i32 = libc::EHOSTUNREACH;

/// Budgets are host-wide in the kernel: one test at a time.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

fn tmp(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sg-enforce-{tag}-{}", std::process::id()))
}

/// A `budgeted` client in `cg`, connecting to `addr` for `secs`.
fn client(cg: &Cgroup, addr: &str, secs: f64, rate: Option<f64>) -> ChildGuard {
    let secs = secs.to_string();
    let errno = DENY_ERRNO.to_string();
    let mut args = vec![
        "budgeted",
        "--addr",
        addr,
        "--secs",
        &secs,
        "--deny-errno",
        &errno,
    ];
    let rate_s = rate.map(|r| r.to_string());
    if let Some(r) = &rate_s {
        args.extend(["--rate", r]);
    }
    ChildGuard::spawn(
        cg.exec_in(CLIENT, &args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    )
}

/// What the client counted.
struct Counts(Value);

impl Counts {
    fn of(child: ChildGuard, timeout: Duration) -> Counts {
        let out = child.finish(timeout);
        Counts(
            serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("client said {out:?}: {e}")),
        )
    }

    fn series(&self, what: &str) -> Vec<u64> {
        self.0[what]
            .as_array()
            .unwrap_or_else(|| panic!("no {what} in {}", self.0))
            .iter()
            .map(|v| v.as_u64().expect("count"))
            .collect()
    }

    fn total(&self, what: &str) -> u64 {
        self.series(what).iter().sum()
    }

    /// Sum of `what` in buckets [from_s, to_s).
    fn window(&self, what: &str, from_s: f64, to_s: f64) -> u64 {
        let ms = self.0["bucket_ms"].as_u64().expect("bucket_ms") as f64;
        let (a, b) = (
            (from_s * 1000.0 / ms) as usize,
            (to_s * 1000.0 / ms) as usize,
        );
        self.series(what)
            .iter()
            .skip(a)
            .take(b.saturating_sub(a))
            .sum()
    }
}

fn throttles(d: &Daemon) -> Vec<Value> {
    d.json(&["throttles"]).as_array().expect("list").clone()
}

/// Waits until a budget exists for `target` (a `pid N (…)` label prefix).
fn wait_budget(d: &Daemon, target: &str, within: Duration) -> Value {
    let start = Instant::now();
    loop {
        if let Some(b) = throttles(d)
            .into_iter()
            .find(|b| b["target"].as_str().is_some_and(|t| t.starts_with(target)))
        {
            println!("budget for {target} after {:?}", start.elapsed());
            return b;
        }
        assert!(
            start.elapsed() < within,
            "no budget for {target} within {within:?}: {:?}",
            throttles(d)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn budget_by_id(d: &Daemon, id: &str) -> Option<Value> {
    throttles(d).into_iter().find(|b| b["id"] == id)
}

/// The pid of the client process (sh execs into it).
fn pid_of(c: &ChildGuard) -> u32 {
    c.pid()
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<u64> = stat
        .rsplit_once(')')
        .map_or("", |(_, r)| r)
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
}

/// Under `enforce`, a refused-connect storm gets the default retry budget
/// (no successes: its floor, 10/s): over 5 s the kernel lets 50 ± 20%
/// through and fails the rest with the configured errno, for 30 s with
/// one budget (no release-and-retrigger); a second, calm process to the
/// same destination is untouched; the storming process's CPU is printed.
#[test]
fn a_connect_storm_is_held_to_its_budget() {
    let _alone = alone();
    let Some(mut d) = Daemon::start(
        "enforce",
        &tmp("storm"),
        &format!("[enforce]\nmode = \"enforce\"\nerrno = \"{DENY}\"\nttl_secs = 20\n"),
    ) else {
        return;
    };
    let cg = Cgroup::create("enforce-storm");
    let addr = closed_port(false).to_string();
    let storm = client(&cg, &addr, 36.0, None);
    let pid = pid_of(&storm);
    let before = (cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let cpu_before = (cpu_ticks(pid) - before.0) as f64 / 100.0 / before.1.elapsed().as_secs_f64();
    let budget = wait_budget(&d, &format!("pid {pid} "), scaled(Duration::from_secs(15)));
    let id = budget["id"].as_str().expect("id").to_string();
    assert_eq!(budget["origin"], "auto");
    assert_eq!(budget["kind"], "retry");
    assert_eq!(budget["errno"], DENY);
    assert_eq!(budget["dest"], addr.as_str());
    // A calm neighbour to the same destination: 1 connect a second.
    let calm = client(&cg, &addr, 6.0, Some(1.0));
    // Let the burst drain, then measure 5 s of the daemon's counters.
    std::thread::sleep(Duration::from_secs(2));
    let a = budget_by_id(&d, &id).expect("budget");
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(5));
    let b = budget_by_id(&d, &id).expect("budget");
    let secs = t.elapsed().as_secs_f64();
    let allowed = b["allowed"].as_u64().unwrap() - a["allowed"].as_u64().unwrap();
    let denied = b["denied"].as_u64().unwrap() - a["denied"].as_u64().unwrap();
    let expected = 10.0 * secs;
    println!("over {secs:.2} s: {allowed} allowed (expected {expected:.0} ±20%), {denied} denied");
    assert!(
        (allowed as f64 - expected).abs() <= 0.2 * expected,
        "{allowed} allowed in {secs:.2} s, expected {expected:.0} ±20%"
    );
    assert!(
        denied > allowed * 5,
        "a storm is mostly denied: {denied} denied, {allowed} allowed"
    );
    let cpu_start = (cpu_ticks(pid), Instant::now());
    let calm = Counts::of(calm, scaled(Duration::from_secs(20)));
    assert_eq!(
        (calm.total("denied"), calm.total("other")),
        (0, 0),
        "the calm neighbour was throttled: {}",
        calm.0
    );
    assert!(calm.total("refused") >= 5, "{}", calm.0);
    // Still throttled 30 s on, by the same budget.
    while t.elapsed() < Duration::from_secs(27) {
        d.assert_alive("during the throttled storm");
        std::thread::sleep(Duration::from_secs(1));
    }
    let cpu_after =
        (cpu_ticks(pid) - cpu_start.0) as f64 / 100.0 / cpu_start.1.elapsed().as_secs_f64();
    let later = budget_by_id(&d, &id).unwrap_or_else(|| {
        panic!(
            "{id} was lifted while the storm went on: {:?}",
            throttles(&d)
        )
    });
    assert!(later["denied"].as_u64().unwrap() > b["denied"].as_u64().unwrap());
    let mine = throttles(&d)
        .into_iter()
        .filter(|b| {
            b["target"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("pid {pid} ")))
        })
        .count();
    assert_eq!(
        mine,
        1,
        "one budget, not one per retrigger: {:?}",
        throttles(&d)
    );
    let storm = Counts::of(storm, scaled(Duration::from_secs(30)));
    println!(
        "storming client: CPU {:.0}% of a core before its budget, {:.0}% under it; \
         it saw {} ECONNREFUSED from the port, {} {DENY} from the budget, errnos {}",
        cpu_before * 100.0,
        cpu_after * 100.0,
        storm.total("refused"),
        storm.total("denied"),
        storm.0["errnos"]
    );
    assert_eq!(
        storm.total("other"),
        0,
        "no errno but the port's and the budget's: {}",
        storm.0["errnos"]
    );
    assert!(storm.total("denied") > 0);
}

/// A TCP server on `bind` that accepts and closes, until dropped.
struct Acceptor {
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Acceptor {
    fn start(bind: &str) -> Acceptor {
        let l = std::net::TcpListener::bind(bind).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Acceptor { addr, stop }
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: signalling the test's own daemon child.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Enforcement programs attached at the cgroup root, as the kernel lists
/// them (`bpftool cgroup show`; names are cut to 15 characters). The
/// daemon is the only one attaching them while these tests run.
fn enforce_hooks(_daemon_pid: u32) -> usize {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
    let root = stormguard::kernel::find_cgroup2(&mounts).expect("cgroup2 mount");
    let out = run(
        "bpftool",
        &["-j", "cgroup", "show", root.to_str().expect("path")],
    );
    if out.trim().is_empty() {
        return 0;
    }
    let progs: Value = serde_json::from_str(&out).expect("bpftool cgroup json");
    progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("sg_enforce"))
        })
        .count()
}

/// Manual budgets: `observe` attaches nothing until one exists; an IPv6
/// destination is held to `--rate`; `--for 2s` ends in the kernel while
/// the daemon is frozen; protected targets are refused with a reason;
/// a manual budget survives a restart with its id; release detaches.
#[test]
fn manual_budgets_expire_in_the_kernel_and_survive_a_restart() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("manual", &tmp("manual"), "") else {
        return;
    };
    let daemon_pid = d.child.as_ref().expect("child").pid();
    assert_eq!(
        enforce_hooks(daemon_pid),
        0,
        "observe with no budget attaches nothing"
    );

    // Protected targets.
    for (pid, why) in [(1, "PID 1"), (daemon_pid, "stormguard itself")] {
        let out = d.cli(&[
            "throttle",
            "--pid",
            &pid.to_string(),
            "--rate",
            "5/s",
            "--for",
            "10s",
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "pid {pid} was throttled");
        assert!(
            err.contains(why) && err.lines().count() == 1,
            "pid {pid}: {err}"
        );
    }
    assert!(throttles(&d).is_empty());

    // IPv6, expiring while the daemon is frozen.
    let server = Acceptor::start("[::1]:0");
    let cg = Cgroup::create("enforce-manual");
    let dest = server.addr.to_string();
    let c = client(&cg, &dest, 8.0, Some(200.0));
    let pid = pid_of(&c);
    let t0_ms = wall_ms();
    let b = d.json(&[
        "throttle",
        "--pid",
        &pid.to_string(),
        "--dest",
        &dest,
        "--rate",
        "20/s",
        "--burst",
        "1",
        "--for",
        "2s",
        "--errno",
        DENY,
    ]);
    // When the budget began, in the client's seconds (a slow machine
    // takes a while to answer the command).
    let set_at = (b["created_ms"].as_i64().expect("created_ms") - t0_ms) as f64 / 1e3;
    assert_eq!(b["dest"], dest.as_str());
    assert_eq!(b["origin"], "manual");
    assert_eq!(
        enforce_hooks(daemon_pid),
        5,
        "connect4/6, sendmsg4/6 and egress attached while a budget exists"
    );
    signal(daemon_pid, libc::SIGSTOP);
    let counts = Counts::of(c, scaled(Duration::from_secs(20)));
    signal(daemon_pid, libc::SIGCONT);
    // While the kernel denied (from the bucket after the first denial to
    // the last one): what got through is the budget's rate.
    let ms = counts.0["bucket_ms"].as_u64().expect("bucket_ms") as f64 / 1e3;
    let denials = counts.series("denied");
    let first = denials.iter().position(|n| *n > 0).expect("some denials");
    let last = denials.iter().rposition(|n| *n > 0).expect("some denials");
    let (from, to) = (
        (first + 1) as f64 * ms,
        (last as f64 * ms).max((first + 2) as f64 * ms),
    );
    let ok = counts.window("ok", from, to) as f64;
    let denied = counts.window("denied", from, to);
    let rate = ok / (to - from);
    println!(
        "under --rate 20/s: {rate:.1} ok/s and {denied} denied; after expiry: {} denied",
        counts.window("denied", set_at + 2.5, 8.0)
    );
    assert!(
        (rate - 20.0).abs() <= 10.0,
        "{rate:.1}/s under a 20/s budget: {}",
        counts.0
    );
    assert!(denied > 100, "{}", counts.0);
    assert_eq!(
        counts.window("denied", set_at + 2.5, 8.0),
        0,
        "the budget outlived its --for while the daemon was frozen: {}",
        counts.0
    );
    let after = counts.window("ok", set_at + 2.5, 8.0) as f64 / (8.0 - set_at - 2.5);
    assert!(after > 100.0, "{after:.0}/s after expiry: {}", counts.0);
    // The daemon sweeps it once it runs again.
    std::thread::sleep(Duration::from_millis(500));
    assert!(throttles(&d).is_empty(), "{:?}", throttles(&d));
    assert_eq!(
        enforce_hooks(daemon_pid),
        0,
        "detached with the last budget"
    );

    // A manual budget survives a restart, with its id.
    let mut sleeper = ChildGuard::spawn(&mut cg.exec_in("sleep", &["120"]));
    let kept = d.json(&[
        "throttle",
        "--pid",
        &sleeper.pid().to_string(),
        "--rate",
        "5",
        "--for",
        "10m",
    ]);
    d.stop();
    assert!(d.spawn("manual restart"));
    let back = throttles(&d);
    assert_eq!(back.len(), 1, "{back:?}");
    assert_eq!(
        (&back[0]["id"], &back[0]["target"]),
        (&kept["id"], &kept["target"])
    );
    let released = d.json(&["release", "--all"]);
    assert_eq!(released["released"][0], kept["id"]);
    assert!(throttles(&d).is_empty());
    let _ = sleeper.0.kill();
    let _ = sleeper.0.wait();
}

/// `dry-run`: a connect storm's budget counts what it would deny and
/// denies nothing; a DNS storm's counts what it would slow, slows nothing
/// and puts no qdisc anywhere; status and metrics show it.
#[test]
fn dry_run_counts_and_limits_nothing() {
    let _alone = alone();
    let Some(d) = Daemon::start(
        "dry-run",
        &tmp("dry"),
        &format!("[enforce]\nmode = \"dry-run\"\nerrno = \"{DENY}\"\n"),
    ) else {
        return;
    };
    let cg = Cgroup::create("enforce-dry");
    // A DNS storm (SERVFAIL) beside the connect storm: it would be slowed.
    let link = Link::create("dry", 4);
    let (_dns, _) = link.dns_server(2);
    let t0 = Instant::now();
    let t0_ms = wall_ms();
    let dns = resolver_client(&cg, &tmp("dry-resolv"), &link.peer_ip, 300);
    let addr = closed_port(false).to_string();
    let storm = client(&cg, &addr, 8.0, None);
    let pid = pid_of(&storm);
    let b = wait_budget(&d, &format!("pid {pid} "), scaled(Duration::from_secs(15)));
    assert_eq!(b["mode"], "dry-run");
    let db = wait_budget(
        &d,
        &format!("pid {} ", dns.pid()),
        scaled(Duration::from_secs(15)),
    );
    assert_eq!(db["mode"], "dry-run");
    // Five seconds under the dry-run budget, then SIGINT for the report.
    let t_db = (db["created_ms"].as_i64().expect("created_ms") - t0_ms) as f64 / 1e3;
    while t0.elapsed().as_secs_f64() < t_db + 5.5 {
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(dns.pid(), libc::SIGINT);
    let dns_report = report(dns, scaled(Duration::from_secs(30)));
    let qdisc = link.root_qdisc();
    assert!(qdisc.contains(" 0: root"), "a qdisc in dry-run: {qdisc}");
    let counts = Counts::of(storm, scaled(Duration::from_secs(30)));
    assert_eq!(counts.total("denied"), 0, "dry-run denied: {}", counts.0);
    assert_eq!(counts.total("other"), 0, "{}", counts.0);
    std::thread::sleep(Duration::from_millis(1500));
    let status = d.json(&["status"]);
    let would = status["enforce"]["would_deny"]
        .as_u64()
        .expect("would_deny");
    println!(
        "dry-run: the client saw {} refusals, all from the port; the budget would have denied {would}",
        counts.total("refused")
    );
    assert!(would > 100, "{}", status["enforce"]);
    assert_eq!(status["enforce"]["denied"], 0);
    // The DNS storm went on at full speed after its budget, counted.
    let would_slow = status["enforce"]["would_slow"].as_u64().unwrap_or(0);
    let db_s = run_s(&dns_report, db["created_ms"].as_i64().expect("created_ms"));
    let late = rate_in(&dns_report, db_s + 2.0, db_s + 5.0);
    println!("dry-run: the DNS storm ran {late:.0}/s under its budget; would slow {would_slow}");
    // Its budget is 10/s (12/s slowed); unslowed it runs far faster.
    assert!(late > 50.0, "dry-run slowed the DNS storm: {dns_report}");
    assert!(would_slow > 100, "{}", status["enforce"]);
    assert_eq!(status["enforce"]["slowed"], 0, "{}", status["enforce"]);

    let metrics = ureq_get(d.metrics.expect("metrics"));
    let line = metrics
        .lines()
        .find(|l| l.starts_with("stormguard_enforce_decisions_total{kind=\"would_deny\"}"))
        .unwrap_or_else(|| panic!("no would_deny series:\n{metrics}"));
    assert!(
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() > 100.0,
        "{line}"
    );
}

fn ureq_get(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("metrics");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("response");
    body
}

/// `kill -9` of the daemon: the kernel drops its links with its last
/// file descriptor, and a throttled client's denials stop at once.
#[test]
fn kill_9_ends_denial_at_once() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("kill", &tmp("kill"), "") else {
        return;
    };
    let server = Acceptor::start("127.0.0.1:0");
    let cg = Cgroup::create("enforce-kill");
    // Long enough for a slow machine (qemu) to throttle, kill and still
    // show the client going at full speed for 2 s after.
    let c = client(&cg, &server.addr.to_string(), 10.0, Some(200.0));
    let t0 = Instant::now();
    d.json(&[
        "throttle",
        "--pid",
        &pid_of(&c).to_string(),
        "--rate",
        "1/s",
        "--burst",
        "1",
        "--for",
        "10m",
        "--errno",
        DENY,
    ]);
    std::thread::sleep(Duration::from_millis(1500));
    let killed_at = t0.elapsed().as_secs_f64();
    let mut child = d.child.take().expect("daemon");
    signal(child.pid(), libc::SIGKILL);
    let _ = child.0.wait();
    let counts = Counts::of(c, scaled(Duration::from_secs(20)));
    let ms = counts.0["bucket_ms"].as_u64().unwrap() as f64 / 1000.0;
    let last_denied = counts
        .series("denied")
        .iter()
        .rposition(|n| *n > 0)
        .map(|i| (i as f64 + 1.0) * ms)
        .expect("some denials before the kill");
    println!(
        "kill -9 at {killed_at:.2} s; last denial in the bucket ending {last_denied:.2} s ({:.0} ms after)",
        (last_denied - killed_at) * 1000.0
    );
    assert!(
        last_denied - killed_at < 1.0,
        "denials went on {:.2} s after the daemon died: {}",
        last_denied - killed_at,
        counts.0
    );
    assert!(
        counts.window("ok", killed_at + 1.0, killed_at + 3.0) > 300,
        "{}",
        counts.0
    );
}

// ---------------------------------------------------------------------------
// Slowing: keep-alive and UDP storms get latency, not errors
// ---------------------------------------------------------------------------

/// `python3 clients.py resolve NAME` in `cg`, in the host namespace but
/// with a private mount namespace whose /etc/resolv.conf names only
/// `nameserver`: glibc's resolver (getaddrinfo) as any program calls it.
fn resolver_client(cg: &Cgroup, dir: &std::path::Path, nameserver: &str, secs: u32) -> ChildGuard {
    std::fs::create_dir_all(dir).expect("dir");
    let resolv = dir.join("resolv.conf");
    // One query per lookup (A only, one attempt), answered or failed;
    // glibc's default 5 s timeout, so a slow machine's stall is no error.
    std::fs::write(
        &resolv,
        format!("nameserver {nameserver}\noptions timeout:5 attempts:1\n"),
    )
    .expect("resolv.conf");
    let secs = secs.to_string();
    ChildGuard::spawn(
        cg.exec_in(
            "unshare",
            &[
                "-m",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/resolv.conf && exec python3 \"$@\"",
                resolv.to_str().expect("UTF-8 path"),
                &script("clients.py"),
                "resolve",
                "storm.example.",
                "--secs",
                &secs,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped()),
    )
}

/// A clients.py report line.
fn report(child: ChildGuard, timeout: Duration) -> Value {
    let out = child.finish(timeout);
    let last = out.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("client said {out:?}: {e}"))
}

/// Where wall-clock instant `ms` falls in a report's run, in seconds.
fn run_s(report: &Value, ms: i64) -> f64 {
    (ms - report["t0_ms"]
        .as_i64()
        .unwrap_or_else(|| panic!("no t0_ms in {report}"))) as f64
        / 1e3
}

/// Attempts per second over [from_s, to_s) of a report's `per_s`.
fn rate_in(report: &Value, from_s: f64, to_s: f64) -> f64 {
    let per_s: Vec<u64> = report["per_s"]
        .as_array()
        .unwrap_or_else(|| panic!("no per_s in {report}"))
        .iter()
        .map(|v| v.as_u64().expect("count"))
        .collect();
    let (a, b) = (from_s.ceil() as usize, to_s.floor() as usize);
    let n: u64 = per_s.iter().skip(a).take(b.saturating_sub(a)).sum();
    n as f64 / (b - a) as f64
}

/// Waits until the host end carries stormguard's qdisc; when, in `t0`'s
/// seconds (slowing starts then, which a slow machine delays).
fn wait_shaped(link: &Link, t0: Instant, d: &Daemon) -> f64 {
    let end = Instant::now() + scaled(Duration::from_secs(15));
    loop {
        let q = link.root_qdisc();
        if q.contains("htb 5347: root") {
            return t0.elapsed().as_secs_f64();
        }
        assert!(Instant::now() < end, "no qdisc: {q}\n{}", said(d));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What the daemon logged so far, for failure messages.
fn said(d: &Daemon) -> String {
    d.stderr
        .as_ref()
        .map(|r| r.try_iter().collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

/// Wall clock, Unix ms (budgets say when they began in it).
fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Under `enforce`, a keep-alive storm answered 503 (Python requests with
/// urllib3's Retry, no backoff) and a DNS storm through glibc's resolver
/// answered SERVFAIL each get the default retry budget (no successes:
/// 10/s) and are slowed to it — ±50% over 10 s — with the same replies as
/// before and no new error: their requests wait in an htb class on the
/// egress device. The keep-alive storm keeps its one budget for 30 s.
/// When the storms end, the budgets and the qdisc go, and the device has
/// its default qdisc back.
#[test]
fn keep_alive_and_dns_storms_are_slowed_not_failed() {
    let _alone = alone();
    let Some(mut d) = Daemon::start(
        "slow",
        &tmp("slow"),
        "[enforce]\nmode = \"enforce\"\nttl_secs = 60\n",
    ) else {
        return;
    };
    let link = Link::create("slow", 1);
    let before_qdisc = link.root_qdisc();
    assert!(before_qdisc.contains(" 0: root"), "{before_qdisc}");
    let (_web, port) = link.server(&["http", "--status", "503", "--bind", &link.peer_ip]);
    let (_dns, _) = link.dns_server(2);
    let cg = Cgroup::create("enforce-slow");
    let url = format!("http://{}:{port}/", link.peer_ip);
    // The clients run until told (SIGINT, then they print their report),
    // at most 5 minutes: how soon a storm is seen depends on the machine.
    let t0 = Instant::now();
    let t0_ms = wall_ms();
    let web = ChildGuard::spawn(
        cg.exec_in(
            "python3",
            &[
                &script("clients.py"),
                "requests",
                &url,
                "--retries",
                "20",
                "--secs",
                "300",
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null()),
    );
    let dns = resolver_client(&cg, &tmp("slow-resolv"), &link.peer_ip, 300);
    let (web_pid, dns_pid) = (web.pid(), dns.pid());

    let wb = wait_budget(
        &d,
        &format!("pid {web_pid} "),
        scaled(Duration::from_secs(15)),
    );
    let web_cpu_before = cpu_ticks(web_pid) as f64 / clock_ticks() / t0.elapsed().as_secs_f64();
    let db = wait_budget(
        &d,
        &format!("pid {dns_pid} "),
        scaled(Duration::from_secs(15)),
    );
    let dns_cpu_before = cpu_ticks(dns_pid) as f64 / clock_ticks() / t0.elapsed().as_secs_f64();
    // When each budget began, in the clients' seconds.
    let since = |b: &Value| (b["created_ms"].as_i64().expect("created_ms") - t0_ms) as f64 / 1e3;
    let (t_web, t_dns) = (since(&wb), since(&db));
    println!("budgets after {t_web:.1} s (keep-alive) and {t_dns:.1} s (DNS): {wb}\n{db}");
    assert_eq!(wb["kind"], "retry");
    assert_eq!(wb["rate_per_s"], 10.0);

    // The qdisc is on the host end while the budgets exist; slowing
    // starts once it is.
    let t_q = wait_shaped(&link, t0, &d);
    let q_ms = wall_ms();
    let (web_from, dns_from) = (t_web.max(t_q) + 2.0, t_dns.max(t_q) + 2.0);
    std::thread::sleep(Duration::from_secs(1));
    let status = d.json(&["status"]);
    assert!(
        status["enforce"]["shaped_devices"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == link.host_dev.as_str())),
        "{}",
        status["enforce"]
    );

    // CPU while slowed.
    let (w0, dn0, c0) = (cpu_ticks(web_pid), cpu_ticks(dns_pid), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let secs = c0.elapsed().as_secs_f64() * clock_ticks();
    println!(
        "CPU of the storming processes, before → under budget: keep-alive {:.0}% → {:.0}%, DNS {:.0}% → {:.0}%",
        web_cpu_before * 100.0,
        (cpu_ticks(web_pid) - w0) as f64 / secs * 100.0,
        dns_cpu_before * 100.0,
        (cpu_ticks(dns_pid) - dn0) as f64 / secs * 100.0,
    );

    // A storm that goes on keeps its one budget for 30 s.
    while t0.elapsed().as_secs_f64() < (t_web + 30.0).max(web_from + 11.0).max(dns_from + 11.0) {
        std::thread::sleep(Duration::from_millis(500));
        d.assert_alive("during the keep-alive storm");
    }
    let still = budget_by_id(&d, wb["id"].as_str().expect("id")).unwrap_or_else(|| {
        panic!(
            "the keep-alive storm's budget went: {:?}\n{}",
            throttles(&d),
            said(&d)
        )
    });
    println!("keep-alive budget at +30 s: {still}");
    assert!(still["slowed"].as_u64().unwrap_or(0) > 100, "{still}");
    assert_eq!(still["denied"], 0, "nothing is denied: {still}");
    signal(web_pid, libc::SIGINT);
    signal(dns_pid, libc::SIGINT);
    let web_report = report(web, scaled(Duration::from_secs(60)));
    let dns_report = report(dns, scaled(Duration::from_secs(60)));

    // Held to 10/s ± 50% over 10 s, from 2 s after the budget and qdisc.
    // On each client's own clock: 2 s after its budget and the qdisc.
    let from = |r: &Value, b: &Value| {
        run_s(r, b["created_ms"].as_i64().expect("created_ms").max(q_ms)) + 2.0
    };
    let (web_from, dns_from) = (from(&web_report, &wb), from(&dns_report, &db));
    let web_rate = rate_in(&web_report, web_from, web_from + 10.0);
    let dns_rate = rate_in(&dns_report, dns_from, dns_from + 10.0);
    let first = |r: &Value| rate_in(r, 0.0, 1.0);
    println!(
        "keep-alive: {:.0}/s in its first second, {web_rate:.1}/s under budget; DNS: {:.0}/s, then {dns_rate:.1}/s",
        first(&web_report),
        first(&dns_report)
    );
    println!("keep-alive client: {web_report}\nDNS client: {dns_report}");
    assert!(
        (5.0..=15.0).contains(&web_rate),
        "keep-alive at {web_rate:.1}/s under a 10/s budget"
    );
    assert!(
        (5.0..=15.0).contains(&dns_rate),
        "DNS at {dns_rate:.1}/s under a 10/s budget"
    );
    // Their usual replies, and no new error: only 503s, only SERVFAIL's
    // "temporary failure".
    let finals = web_report["final"].as_object().expect("final");
    assert!(
        finals.keys().all(|k| k == "503"),
        "keep-alive saw {finals:?}"
    );
    let errors = dns_report["errors"].as_object().expect("errors");
    assert_eq!(errors.len(), 1, "one kind of DNS error: {errors:?}");
    assert!(
        errors.keys().all(|k| k.contains("Temporary failure")),
        "{errors:?}"
    );
    assert_eq!(dns_report["ok"], 0);

    // The storms are over: budgets lifted, qdisc removed, default back.
    let ended = Instant::now();
    let end = ended + scaled(Duration::from_secs(40));
    while !(throttles(&d).is_empty() && link.root_qdisc() == before_qdisc) {
        assert!(
            Instant::now() < end,
            "after the storms: {:?}, qdisc {}",
            throttles(&d),
            link.root_qdisc()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "budgets and qdisc gone {:?} after the keep-alive client ended",
        ended.elapsed()
    );
}

/// A manual `--rate` on a healthy DNS loop slows it with every answer
/// correct. `kill -9` of the daemon: the loop is back to full speed at
/// once (the hook's link closed) though the qdisc outlives the daemon;
/// the next start removes that qdisc from its journal.
#[test]
fn a_manual_rate_slows_a_healthy_dns_loop_and_kill_9_leaves_nothing_behind() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("slow-manual", &tmp("slow-manual"), "") else {
        return;
    };
    let link = Link::create("slowm", 2);
    let before_qdisc = link.root_qdisc();
    let (_dns, _) = link.dns_server(0);
    let cg = Cgroup::create("enforce-slow-manual");
    // Runs until SIGINT (then prints its report), at most 5 minutes.
    // Before the loop: an idle process's budget loads the programs (which
    // stalls a slow machine for seconds) and its one datagram brings the
    // qdisc (putting a root qdisc on a live device drops what is sent
    // during the swap; see the README). The loop then meets only its own
    // budget.
    let mut idle = ChildGuard::spawn(&mut cg.exec_in(
        "python3",
        &[
            "-c",
            "import socket,sys,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
             s.connect((sys.argv[1],53))\ntime.sleep(float(sys.argv[2]))\ns.send(b'x'*40)\n\
             time.sleep(120)",
            &link.peer_ip,
            &scaled(Duration::from_secs(2)).as_secs_f64().to_string(),
        ],
    ));
    d.json(&[
        "throttle",
        "--pid",
        &idle.pid().to_string(),
        "--dest",
        &format!("{}:53", link.peer_ip),
        "--rate",
        "5/s",
        "--for",
        "10m",
    ]);
    wait_shaped(&link, Instant::now(), &d);
    // The loop's own clock starts here (its per-second counts do).
    let t0 = Instant::now();
    let dns = resolver_client(&cg, &tmp("slow-manual-resolv"), &link.peer_ip, 300);
    let pid = dns.pid();
    std::thread::sleep(Duration::from_secs(2));
    let b = d.json(&[
        "throttle",
        "--pid",
        &pid.to_string(),
        "--dest",
        &format!("{}:53", link.peer_ip),
        "--rate",
        "20/s",
        "--for",
        "60s",
    ]);
    // Slowing starts once the qdisc is there (it already is).
    let t_q = wait_shaped(&link, t0, &d);
    let b_ms = b["created_ms"].as_i64().expect("created_ms");
    while t0.elapsed().as_secs_f64() < t_q + 5.0 {
        std::thread::sleep(Duration::from_millis(100));
    }
    // For a failure's message: what the kernel and the daemon said.
    let seen = format!(
        "{}\nthrottles: {:?}\n{}",
        run("tc", &["-s", "class", "show", "dev", &link.host_dev]),
        throttles(&d),
        said(&d)
    );
    let daemon = d.child.take().expect("daemon");
    signal(daemon.pid(), libc::SIGKILL);
    let kill_ms = wall_ms();
    drop(daemon);
    std::thread::sleep(Duration::from_secs(2));
    let left = link.root_qdisc();
    std::thread::sleep(Duration::from_secs(2));
    signal(pid, libc::SIGINT);
    let r = report(dns, scaled(Duration::from_secs(40)));
    println!("healthy DNS loop: {r}");
    let (before, under, after) = (
        rate_in(&r, 0.0, 2.0),
        rate_in(&r, run_s(&r, b_ms) + 1.0, run_s(&r, kill_ms)),
        rate_in(&r, run_s(&r, kill_ms) + 0.5, run_s(&r, kill_ms) + 3.5),
    );
    println!(
        "{before:.0}/s before, {under:.1}/s under --rate 20/s, {after:.0}/s after kill -9; qdisc left: {left}\nbefore the kill: {seen}"
    );
    assert_eq!(r["ok"], r["ops"], "every answer correct: {r}");
    assert!(
        (10.0..=30.0).contains(&under),
        "{under:.1}/s under 20/s\n{seen}"
    );
    assert!(
        after > 3.0 * under,
        "still slowed after kill -9: {after:.0}/s"
    );
    assert!(
        left.contains("htb 5347: root"),
        "the qdisc outlives the daemon: {left}"
    );

    // The budgets' processes are gone (the loop ended, the idle one is
    // stopped), so the next start restores neither, and it undoes the
    // qdisc from the journal.
    let _ = idle.0.kill();
    let _ = idle.0.wait();
    assert!(d.spawn("slow-manual restart"));
    let now = link.root_qdisc();
    assert_eq!(now, before_qdisc, "the next start removes the qdisc");
    assert!(throttles(&d).is_empty(), "{:?}", throttles(&d));
    assert!(b["id"].is_string());
}
