//! The real-client corpus (issue 7, item 10): real third-party clients —
//! curl, Python requests/urllib3, redis-py, psql, Java's HttpClient, Node's
//! http module, glibc's resolver, wrk, ab, redis-benchmark, nc — driven
//! against real servers that each case starts itself (its own HTTP, TLS,
//! UDP, DNS, Redis and PostgreSQL servers, on loopback or in a network
//! namespace the case creates), under the real eBPF sensors and the live,
//! recorded pipeline ([`LiveRun`]).
//!
//! Why real clients: the synthetic `stormclient` of `scenarios.rs` shows the
//! engine's rules work on the patterns they were written for; this corpus
//! shows whether they survive what real programs do on the wire (connection
//! pools, TLS, SCRAM exchanges, glibc's resolver sockets, a new process per
//! request) — including the healthy programs that look most like storms.
//!
//! How a case is judged: every case gets its own server and so its own
//! destination. A case is FLAGGED when any verdict change whose
//! `subject.dest()` is that destination reaches [`State::Storm`] (whatever
//! the subject — one process, its parent, its cgroup, or groups added
//! later); a healthy case must also have no storm of any subject that
//! involves its clients or servers. The verdict is asserted exactly, the
//! live verdicts must equal the replay of the recording, and each client
//! must have done what the case claims (every attempt failed, fast enough to
//! be a storm; or every attempt succeeded, at the intended pace), with the
//! rate it achieved printed. Time to flag is the storm change's `ts_ns`
//! minus the case's start, both CLOCK_MONOTONIC, and includes the client's
//! own start-up (a JVM compiling its source: about 2 s).
//!
//! Each case prints one markdown row, `| case | client | expected | got |
//! time to flag |`, for the README's table. Cases run one at a time (a
//! mutex) because they measure rates on a shared 2-core machine. Every
//! client is bounded in count and in time and stops by itself within 10 s;
//! all processes a case starts are killed (by process group) when it ends.
//!
//! Tools: `cargo xtask test` installs them (xtask/src/corpus_tools.rs).
//! With `CI=true` or `STORMGUARD_REQUIRE_EBPF=1` a missing tool or eBPF that
//! cannot load fails the case; otherwise the case is skipped with the
//! reason printed.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{Mutex, MutexGuard, mpsc::Receiver},
    time::{Duration, Instant},
};

use stormguard::{
    detect::{State, Subject, VerdictChange},
    ingest::Proto,
    kernel::monotonic_ns,
};
use stormguard_tests::{ChildGuard, LiveRun, NetNs, closed_port, ebpf_required, lines, run};

static SERIAL: Mutex<()> = Mutex::new(());

/// Scripts the cases run (servers, Python clients, the Java and Node ones).
const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus");

/// How long a storm may take to be flagged, from the case's start.
const FLAG_BOUND: Duration = Duration::from_secs(10);
/// Clients stop by themselves well before this; past it the case fails.
const CLIENT_BOUND: Duration = Duration::from_secs(20);
/// Pumping after the clients stop, so the verdicts about their end settle.
const SETTLE: Duration = Duration::from_millis(500);
/// How long every load loop runs (each is also bounded by a count).
const LOOP_SECS: u32 = 4;
/// The least rate a storm client must reach: the engine's default
/// `storm_rate` is 15 attempts/s, so a slower "storm" would test nothing.
const STORM_MIN_RATE: f64 = 20.0;

const REDIS_PASSWORD: &str = "corpus-right";
const PG_PASSWORD: &str = "corpus-right";
/// What the resolver namespaces see as /etc/resolv.conf: their own
/// loopback only (the namespace has no other interface, so nothing can
/// reach the host's resolver), with a 1 s timeout so no lookup can hang.
const RESOLV_CONF: &str = "nameserver 127.0.0.1\noptions timeout:1\n";
/// A name in no hosts file; the trailing dot stops search-list expansion.
const LOOKUP_NAME: &str = "storm.example.";

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// A process the case started, in its own process group so that dropping
/// it kills everything it started too (the curl of a shell loop, the
/// workers of a launcher) — a failing case must not leave load running.
struct Proc {
    what: String,
    guard: ChildGuard,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    started: Instant,
    exit: Option<(ExitStatus, Duration)>,
}

impl Proc {
    fn spawn(what: &str, cmd: &mut Command) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Bash's EPOCHREALTIME and every tool's number format: C locale.
            .env("LC_ALL", "C")
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .process_group(0);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = lines(child.stdout.take().expect("stdout"));
        let stderr = lines(child.stderr.take().expect("stderr"));
        Proc {
            what: what.into(),
            guard: ChildGuard(child),
            stdout,
            stderr,
            started,
            exit: None,
        }
    }

    fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Whether it has exited; notes its status and run time the first time.
    fn exited(&mut self) -> bool {
        if self.exit.is_none()
            && let Some(st) = self.guard.0.try_wait().expect("wait")
        {
            self.exit = Some((st, self.started.elapsed()));
        }
        self.exit.is_some()
    }

    /// Everything it printed on one stream, once that stream is closed
    /// (bounded: a grandchild holding the pipe cannot hang the case).
    fn all(rx: &Receiver<String>) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(l) = rx.recv_timeout(Duration::from_secs(2)) {
            v.push(l);
        }
        v
    }

    /// What it printed on stderr so far (for failure messages).
    fn stderr_now(&self) -> String {
        self.stderr.try_iter().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: signalling the process group this test created (its
        // leader is our child, not yet reaped by ChildGuard's drop).
        unsafe { libc::kill(-(self.pid() as i32), libc::SIGKILL) };
    }
}

/// Reads a server's `{"port": N}` line (servers.py prints it once it
/// accepts traffic).
fn wait_port(p: &mut Proc) -> u16 {
    match p.stdout.recv_timeout(Duration::from_secs(15)) {
        Ok(line) => serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["port"].as_u64())
            .and_then(|v| u16::try_from(v).ok())
            .unwrap_or_else(|| panic!("{}: unexpected first line {line:?}", p.what)),
        Err(e) => panic!("{} did not start ({e}): {}", p.what, p.stderr_now()),
    }
}

/// Waits until something accepts TCP connections on `addr`.
fn wait_listening(p: &mut Proc, addr: SocketAddr) {
    let end = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            !p.exited() && Instant::now() < end,
            "{} is not listening on {addr}: {}",
            p.what,
            p.stderr_now()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn script(name: &str) -> String {
    format!("{CORPUS}/{name}")
}

/// `python3 servers.py ARGS` started, with the port it bound.
fn py_server(what: &str, args: &[&str]) -> (Proc, u16) {
    let mut p = Proc::spawn(
        what,
        Command::new("python3").arg(script("servers.py")).args(args),
    );
    let port = wait_port(&mut p);
    (p, port)
}

fn py_client(what: &str, args: &[&str]) -> Proc {
    Proc::spawn(
        what,
        Command::new("python3").arg(script("clients.py")).args(args),
    )
}

/// A bash loop running `body` (one attempt; its exit status is the
/// outcome) at most `max` times and for at most `secs`, sleeping `gap`
/// between attempts if given — a new process per attempt, as shell retry
/// loops and health checks do. Prints the same JSON line as clients.py.
fn bash_loop(what: &str, body: &str, max: u32, secs: u32, gap: Option<&str>) -> Proc {
    let pause = gap
        .map(|g| format!("sleep {g}"))
        .unwrap_or_else(|| ":".into());
    let script = format!(
        r#"n=0; ok=0; fail=0; t0=${{EPOCHREALTIME/./}}; end=$((t0 + {secs} * 1000000))
while (( n < {max} && ${{EPOCHREALTIME/./}} < end )); do
  if {body} >/dev/null 2>&1; then ok=$((ok + 1)); else fail=$((fail + 1)); fi
  n=$((n + 1)); {pause}
done
us=$(( ${{EPOCHREALTIME/./}} - t0 ))
printf '{{"ops": %d, "ok": %d, "fail": %d, "secs": %d.%06d}}\n' "$n" "$ok" "$fail" $((us / 1000000)) $((us % 1000000))"#
    );
    Proc::spawn(what, Command::new("bash").arg("-c").arg(script))
}

/// A temporary directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "sg-corpus-{tag}-{}-{}",
            std::process::id(),
            monotonic_ns()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed certificate made now (nothing is shipped): (cert, key).
fn self_signed(dir: &Path) -> (String, String) {
    let cert = dir.join("cert.pem").display().to_string();
    let key = dir.join("key.pem").display().to_string();
    run(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ],
    );
    (cert, key)
}

/// A private redis-server with a password (no persistence), on a free port.
fn redis_server(dir: &Path) -> (Proc, u16) {
    let port = closed_port(false).port();
    let mut p = Proc::spawn(
        "redis-server",
        Command::new("redis-server").args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            REDIS_PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir.display().to_string(),
        ]),
    );
    wait_listening(&mut p, SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    (p, port)
}

/// The newest PostgreSQL server installed (Debian keeps each major in
/// /usr/lib/postgresql/N/bin, off PATH).
fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            ["initdb", "pg_ctl", "psql"]
                .iter()
                .all(|t| bin.join(t).exists())
                .then_some((major, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, b)| b)
}

/// A private PostgreSQL cluster for case `id`, or None (after failing under
/// CI, where the server must be there) when this host has none.
fn postgres_or_skip(id: &str) -> Option<Postgres> {
    let Some(bin) = pg_bin() else {
        let why = format!("{id}: missing the PostgreSQL server (/usr/lib/postgresql/N/bin/initdb)");
        assert!(!ebpf_required(), "{why}; `cargo xtask test` installs it");
        eprintln!("SKIPPED {why}");
        return None;
    };
    Some(Postgres::start(bin))
}

/// A private PostgreSQL cluster in a temporary directory, password
/// (SCRAM) authentication only, listening on 127.0.0.1; stopped and
/// removed when dropped. PostgreSQL refuses to run as root, so it runs as
/// the `postgres` user the Debian package creates.
struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
}

impl Postgres {
    fn start(bin: PathBuf) -> Postgres {
        let dir = TempDir::new("pg");
        let pwfile = dir.0.join("pw");
        std::fs::write(&pwfile, format!("{PG_PASSWORD}\n")).expect("pwfile");
        let d = dir.0.display().to_string();
        run("chown", &["-R", "postgres:postgres", &d]);
        run("chmod", &["700", &d]);
        let pg = Postgres {
            dir,
            bin,
            port: closed_port(false).port(),
        };
        let data = pg.data();
        pg.as_postgres(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                &format!("--pwfile={}", pwfile.display()),
                "-A",
                "scram-sha-256",
                "-N",
            ],
        );
        let opts = format!(
            "-p {} -k {d} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.port
        );
        let log = pg.dir.0.join("log").display().to_string();
        pg.as_postgres(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "30", "-o", &opts, "start",
            ],
        );
        pg
    }

    fn data(&self) -> String {
        self.dir.0.join("data").display().to_string()
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) -> String {
        let tool = self.bin.join(tool).display().to_string();
        let mut all = vec!["-u", "postgres", "--", &tool];
        all.extend_from_slice(args);
        run("runuser", &all)
    }

    /// One psql attempt as a shell command. The real client binary, not
    /// Debian's /usr/bin/psql wrapper: that is a Perl script whose start-up
    /// (~45 ms) would throttle the loop, which is not what a client does.
    fn psql(&self, password: &str) -> String {
        format!(
            "PGPASSWORD={password} PGCONNECT_TIMEOUT=2 {} -h 127.0.0.1 -p {} -U postgres -d postgres -w -X -c 'select 1'",
            self.bin.join("psql").display(),
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.data();
        let tool = self.bin.join("pg_ctl").display().to_string();
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &tool, "-D", &data])
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A network namespace whose resolver is its own 127.0.0.1:53
/// (`ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over
/// /etc/resolv.conf). Only `lo` is up inside, so the host's resolver is
/// unreachable from it: a lookup storm cannot leave the machine.
struct ResolverNs {
    ns: NetNs,
    etc: PathBuf,
}

impl ResolverNs {
    fn create(tag: &str) -> ResolverNs {
        let ns = NetNs::create(tag);
        let etc = Path::new("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&etc).expect("/etc/netns dir");
        let r = ResolverNs { ns, etc };
        std::fs::write(r.etc.join("resolv.conf"), RESOLV_CONF).expect("resolv.conf");
        let seen = run(
            "ip",
            &["netns", "exec", &r.ns.name, "cat", "/etc/resolv.conf"],
        );
        assert_eq!(seen, RESOLV_CONF, "the namespace must use its own resolver");
        r
    }
}

impl Drop for ResolverNs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.etc);
    }
}

// ---------------------------------------------------------------------------
// What the clients achieved
// ---------------------------------------------------------------------------

/// Attempts a client made, how many succeeded or failed, over how long.
#[derive(Debug, Default, Clone, Copy)]
struct Achieved {
    ops: u64,
    ok: u64,
    fail: u64,
    secs: f64,
}

impl Achieved {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.secs.max(1e-3)
    }
}

type Parser = fn(&[String]) -> Result<Achieved, String>;

/// The JSON line clients.py, the bash loops, Java and Node print last.
fn json_report(out: &[String]) -> Result<Achieved, String> {
    let line = out
        .iter()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or("no JSON report")?;
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
    let n = |k: &str| v[k].as_u64().ok_or(format!("no {k} in {line}"));
    Ok(Achieved {
        ops: n("ops")?,
        ok: n("ok")?,
        fail: n("fail")?,
        secs: v["secs"].as_f64().ok_or(format!("no secs in {line}"))?,
    })
}

/// The number after `key` on the first line that has it.
fn field(out: &[String], key: &str) -> Option<f64> {
    out.iter().find_map(|l| {
        let rest = l.split_once(key)?.1.trim_start();
        let num: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        num.parse().ok()
    })
}

/// wrk: "N requests in 3.00s", non-2xx responses and socket errors.
fn wrk_report(out: &[String]) -> Result<Achieved, String> {
    let line = out
        .iter()
        .find(|l| l.contains(" requests in "))
        .ok_or("no request count")?;
    let (ops, rest) = line.trim().split_once(" requests in ").ok_or("format")?;
    let ops: u64 = ops.parse().map_err(|e| format!("{e}: {line}"))?;
    let secs: f64 = rest
        .split(['s', ','])
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(format!("no duration: {line}"))?;
    let mut fail = field(out, "Non-2xx or 3xx responses:").unwrap_or(0.0) as u64;
    if let Some(l) = out.iter().find(|l| l.contains("Socket errors:")) {
        fail += l
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse::<u64>().ok())
            .sum::<u64>();
    }
    Ok(Achieved {
        ops,
        ok: ops.saturating_sub(fail),
        fail,
        secs,
    })
}

/// ab: complete, failed and non-2xx requests, time taken.
fn ab_report(out: &[String]) -> Result<Achieved, String> {
    let ops = field(out, "Complete requests:").ok_or("no complete count")? as u64;
    let fail = (field(out, "Failed requests:").unwrap_or(0.0)
        + field(out, "Non-2xx responses:").unwrap_or(0.0)) as u64;
    Ok(Achieved {
        ops,
        ok: ops.saturating_sub(fail),
        fail,
        secs: field(out, "Time taken for tests:").ok_or("no time taken")?,
    })
}

/// Requests each redis-benchmark test makes (`-n`).
const REDIS_BENCH_N: u64 = 30_000;

/// redis-benchmark --csv: one `"TEST","rps",...` line per test.
fn redis_bench_report(out: &[String]) -> Result<Achieved, String> {
    let rps: Vec<f64> = out
        .iter()
        .filter(|l| l.starts_with("\"SET\"") || l.starts_with("\"GET\""))
        .filter_map(|l| l.split(',').nth(1)?.trim_matches('"').parse().ok())
        .collect();
    if rps.len() != 2 {
        return Err(format!("expected SET and GET results: {out:?}"));
    }
    let ops = REDIS_BENCH_N * 2;
    Ok(Achieved {
        ops,
        ok: ops,
        fail: 0,
        secs: rps.iter().map(|r| REDIS_BENCH_N as f64 / r).sum(),
    })
}

// ---------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Storm,
    Healthy,
}

/// The destination a case's server is at: the case is judged by it.
#[derive(Debug, Clone, Copy)]
struct Target {
    proto: Proto,
    addr: IpAddr,
    port: u16,
}

impl Target {
    fn tcp(addr: impl Into<IpAddr>, port: u16) -> Target {
        Target {
            proto: Proto::Tcp,
            addr: addr.into(),
            port,
        }
    }

    fn udp(addr: impl Into<IpAddr>, port: u16) -> Target {
        Target {
            proto: Proto::Udp,
            addr: addr.into(),
            port,
        }
    }

    /// Whether a subject is about this destination. Addresses compare in
    /// canonical form: a dual-stack client (Java's HttpClient) connects
    /// its AF_INET6 socket to `::ffff:127.0.0.1`, which is 127.0.0.1.
    fn matches(&self, s: &Subject) -> bool {
        let d = s.dest();
        d.proto == self.proto
            && d.port == self.port
            && d.addr.to_canonical() == self.addr.to_canonical()
    }
}

/// What every attempt of a case's clients must have come to: a storm's
/// all fail; load and polling all succeed; a backoff twin fails like its
/// storm, only slower.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attempts {
    Fail,
    Succeed,
}

struct Case {
    id: &'static str,
    client: &'static str,
    expect: Expect,
    attempts: Attempts,
    target: Target,
    /// Attempts per second the clients must achieve for the case to test
    /// what it says: a storm must be fast, a paced healthy client must keep
    /// its pace (not secretly be a burst), a load generator must load.
    rate: (f64, f64),
}

/// Takes the serial lock and checks the tools a case needs; None means
/// skip (only allowed when eBPF is not required).
fn begin(id: &str, tools: &[&str], modules: &[&str]) -> Option<MutexGuard<'static, ()>> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut missing: Vec<String> = tools
        .iter()
        .filter(|t| {
            !Command::new("sh")
                .arg("-c")
                .arg(format!("command -v {t}"))
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|t| t.to_string())
        .collect();
    for m in modules {
        let ok = Command::new("python3")
            .args(["-c", &format!("import {m}")])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            missing.push(format!("python module {m}"));
        }
    }
    if missing.is_empty() {
        return Some(guard);
    }
    let why = format!("missing {}", missing.join(", "));
    if ebpf_required() {
        panic!("{id}: {why}; `cargo xtask test` installs them");
    }
    eprintln!("SKIPPED {id}: {why}; `cargo xtask test` installs them");
    None
}

fn subject_text(s: &Subject) -> String {
    match s {
        Subject::Flow { pid, .. } => format!("pid {pid}"),
        Subject::Parent { ppid, .. } => format!("children of {ppid}"),
        Subject::Cgroup { cgroup, .. } => format!("cgroup {cgroup}"),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    }
}

/// Whether a subject is about one of the case's own processes (by pid or
/// as their parent): a healthy case must not have those flagged either.
fn involves(s: &Subject, pids: &[u32]) -> bool {
    match s {
        Subject::Flow { pid, .. } => pids.contains(pid),
        Subject::Parent { ppid, .. } => pids.contains(ppid),
        _ => false,
    }
}

fn describe(c: &VerdictChange, start_ns: u64) -> String {
    format!(
        "+{} ms {} ({}) → {}: {}→{} score {}{}: {}",
        c.ts_ns.saturating_sub(start_ns) / 1_000_000,
        subject_text(&c.subject),
        c.comm.as_str(),
        c.subject.dest(),
        c.from.as_str(),
        c.to.as_str(),
        c.score,
        if c.persistent_failure {
            " (persistent failure)"
        } else {
            ""
        },
        c.explanation
    )
}

/// The furthest a destination's verdicts went, for the table's "got".
fn got_text(on_target: &[&VerdictChange]) -> String {
    let reached = |s: State| on_target.iter().any(|c| c.to == s);
    if reached(State::Storm) {
        "storm".into()
    } else if reached(State::Suspect) {
        "suspect (never storm)".into()
    } else if on_target.iter().any(|c| c.persistent_failure) {
        "persistent failure".into()
    } else {
        "healthy".into()
    }
}

/// Runs a case to its end and judges it (see the module doc): pumps the
/// live pipeline until every client has stopped by itself, settles,
/// replays, checks the clients did what the case claims, prints the row
/// and fails with everything that went wrong.
fn judge(
    case: &Case,
    mut live: LiveRun,
    start_ns: u64,
    mut clients: Vec<(Proc, Parser)>,
    servers: &mut [&mut Proc],
) {
    let stopped = live.run_until(CLIENT_BOUND, |_| {
        clients.iter_mut().all(|(p, _)| p.exited())
    });
    live.run_until(SETTLE, |_| false);
    let (changes, replayed) = live.finish();

    let mut failures: Vec<String> = Vec::new();
    if !stopped {
        failures.push(format!(
            "clients did not stop by themselves within {CLIENT_BOUND:?}"
        ));
    }
    let mut pids: Vec<u32> = clients.iter().map(|(p, _)| p.pid()).collect();
    for s in servers.iter_mut() {
        pids.push(s.pid());
        if s.exited() {
            failures.push(format!(
                "server {} died during the case: {}",
                s.what,
                s.stderr_now()
            ));
        }
    }

    // What the clients achieved.
    let mut total = Achieved::default();
    for (p, parse) in clients.iter_mut() {
        let Some((status, wall)) = p.exit else {
            continue;
        };
        let out = Proc::all(&p.stdout);
        let err = Proc::all(&p.stderr);
        if !status.success() {
            failures.push(format!(
                "{} exited with {status}: {}",
                p.what,
                err.join("\n")
            ));
        }
        match parse(&out) {
            Ok(a) => {
                total.ops += a.ops;
                total.ok += a.ok;
                total.fail += a.fail;
                total.secs = total.secs.max(a.secs.min(wall.as_secs_f64()));
            }
            Err(e) => failures.push(format!(
                "{}: cannot read what it achieved ({e}); stdout: {out:?}; stderr: {err:?}",
                p.what
            )),
        }
    }
    let rate = total.rate();
    println!(
        "{}: {} achieved {} attempts in {:.2} s = {rate:.0}/s; {} succeeded, {} failed",
        case.id, case.client, total.ops, total.secs, total.ok, total.fail
    );
    match case.attempts {
        Attempts::Fail if total.ok > 0 || total.fail != total.ops => failures.push(format!(
            "not a failing loop: {} of {} attempts succeeded",
            total.ok, total.ops
        )),
        Attempts::Succeed if total.fail > 0 || total.ok != total.ops => failures.push(format!(
            "not healthy traffic: {} of {} attempts failed",
            total.fail, total.ops
        )),
        _ => {}
    }
    if !(case.rate.0..=case.rate.1).contains(&rate) {
        failures.push(format!(
            "achieved {rate:.1} attempts/s, outside the {:.0}..{:.0}/s this case needs",
            case.rate.0, case.rate.1
        ));
    }

    // The verdicts.
    if changes != replayed {
        let at = changes
            .iter()
            .zip(&replayed)
            .position(|(a, b)| a != b)
            .unwrap_or(changes.len().min(replayed.len()));
        failures.push(format!(
            "replay differs from the live run ({} live changes, {} replayed; first difference at #{at}: live {:?} / replayed {:?})",
            changes.len(),
            replayed.len(),
            changes.get(at).map(|c| describe(c, start_ns)),
            replayed.get(at).map(|c| describe(c, start_ns)),
        ));
    }
    let on_target: Vec<&VerdictChange> = changes
        .iter()
        .filter(|c| case.target.matches(&c.subject))
        .collect();
    let storm = on_target.iter().find(|c| c.to == State::Storm);
    // Changes about the case's own processes towards anywhere else (a
    // server's replies, a client's other sockets): shown, and in a healthy
    // case none may be a storm.
    let involved: Vec<&VerdictChange> = changes
        .iter()
        .filter(|c| !case.target.matches(&c.subject) && involves(&c.subject, &pids))
        .collect();
    let involved_storm = involved.iter().any(|c| c.to == State::Storm);
    let got = if involved_storm && storm.is_none() {
        "storm (of a subject involving its processes)".to_string()
    } else {
        got_text(&on_target)
    };
    let ttf = storm.map(|c| Duration::from_nanos(c.ts_ns.saturating_sub(start_ns)));
    let expected = match case.expect {
        Expect::Storm => "storm",
        Expect::Healthy => "healthy",
    };
    println!(
        "| {} | {} | {expected} | {got} | {} |",
        case.id,
        case.client,
        ttf.map(|t| format!("{} ms", t.as_millis()))
            .unwrap_or_else(|| "-".into())
    );
    let history: Vec<String> = on_target
        .iter()
        .chain(&involved)
        .map(|c| describe(c, start_ns))
        .collect();
    for line in history.iter().take(12) {
        println!("{}:   {line}", case.id);
    }
    if history.len() > 12 {
        println!("{}:   … {} more changes", case.id, history.len() - 12);
    }
    let summary = if history.is_empty() {
        "no verdict change for it".to_string()
    } else {
        history.join("\n  ")
    };
    match case.expect {
        Expect::Storm => match ttf {
            None => failures.push(format!(
                "expected a storm towards {}, got {got}; its verdicts:\n  {summary}",
                describe_target(&case.target)
            )),
            Some(t) if t > FLAG_BOUND => {
                failures.push(format!("flagged only after {t:?} (bound {FLAG_BOUND:?})"))
            }
            Some(_) => {}
        },
        Expect::Healthy => {
            if storm.is_some() || involved_storm {
                failures.push(format!(
                    "expected healthy, got a storm; the verdicts:\n  {summary}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} ({}): {}",
        case.id,
        case.client,
        failures.join("\n")
    );
}

fn describe_target(t: &Target) -> String {
    let proto = match t.proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    format!("{proto} {}", SocketAddr::new(t.addr, t.port))
}

const LOCAL4: Ipv4Addr = Ipv4Addr::LOCALHOST;
const LOCAL6: Ipv6Addr = Ipv6Addr::LOCALHOST;

fn http_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}/")
}

// --- Storms: retries without backoff ---------------------------------------

#[test]
fn s1_python_requests_urllib3_retry_on_503_keep_alive_is_a_storm() {
    let Some(_serial) = begin("s1", &["python3"], &["requests"]) else {
        return;
    };
    let (mut server, port) = py_server("http 503", &["http", "--status", "503"]);
    let Some(live) = LiveRun::start("corpus-s1") else {
        return;
    };
    let start = monotonic_ns();
    let secs = LOOP_SECS.to_string();
    let client = py_client(
        "requests",
        &[
            "requests",
            &http_url(port),
            "--retries",
            "20",
            "--secs",
            &secs,
        ],
    );
    judge(
        &Case {
            id: "s1 503 keep-alive, urllib3 Retry(backoff_factor=0)",
            client: "Python requests Session + urllib3 Retry(total=20, status_forcelist=[503])",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn s2_curl_in_a_shell_loop_against_503_is_a_storm() {
    let Some(_serial) = begin("s2", &["python3", "curl", "bash"], &[]) else {
        return;
    };
    let (mut server, port) = py_server("http 503", &["http", "--status", "503"]);
    let Some(live) = LiveRun::start("corpus-s2") else {
        return;
    };
    let start = monotonic_ns();
    let client = bash_loop(
        "curl loop",
        &format!("curl -s -f -o /dev/null {}", http_url(port)),
        2000,
        LOOP_SECS,
        None,
    );
    judge(
        &Case {
            id: "s2 503, a new curl process per request",
            client: "curl in a bash loop",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn s3_java_httpclient_resending_on_503_keep_alive_is_a_storm() {
    let Some(_serial) = begin("s3", &["python3", "java", "javac"], &[]) else {
        return;
    };
    let (mut server, port) = py_server("http 503", &["http", "--status", "503"]);
    let Some(live) = LiveRun::start("corpus-s3") else {
        return;
    };
    let start = monotonic_ns();
    // Single-source launch compiles in memory; C1 and the serial GC start
    // the JVM fastest on 2 cores.
    let client = Proc::spawn(
        "java HttpRetry",
        Command::new("java")
            .args(["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"])
            .arg(script("HttpRetry.java"))
            .args([http_url(port), "20000".into(), LOOP_SECS.to_string()]),
    );
    judge(
        &Case {
            id: "s3 503 keep-alive, Java",
            client: "java.net.http.HttpClient (HTTP/1.1) resending one request",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn s4_node_http_new_connection_per_request_on_ipv6_against_503_is_a_storm() {
    let Some(_serial) = begin("s4", &["python3", "node"], &[]) else {
        return;
    };
    let (mut server, port) = py_server(
        "http 503 on ::1",
        &["http", "--status", "503", "--bind", "::1"],
    );
    let Some(live) = LiveRun::start("corpus-s4") else {
        return;
    };
    let start = monotonic_ns();
    let client = Proc::spawn(
        "node http",
        Command::new("node").arg(script("http_new_conn.js")).args([
            "::1".to_string(),
            port.to_string(),
            "20000".into(),
            LOOP_SECS.to_string(),
        ]),
    );
    judge(
        &Case {
            id: "s4 503 over IPv6 [::1], new connection per request",
            client: "Node http.get, Agent({keepAlive: false})",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL6, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

/// A TLS server answering 503, with its certificate directory.
fn tls_503_server() -> (Proc, u16, TempDir) {
    let dir = TempDir::new("tls");
    let (cert, key) = self_signed(&dir.0);
    let (server, port) = py_server(
        "https 503",
        &["http", "--status", "503", "--tls", &cert, &key],
    );
    (server, port, dir)
}

#[test]
fn s5_python_requests_over_tls_retrying_503_keep_alive_is_a_storm() {
    let Some(_serial) = begin("s5", &["python3", "openssl"], &["requests"]) else {
        return;
    };
    let (mut server, port, _dir) = tls_503_server();
    let Some(live) = LiveRun::start("corpus-s5") else {
        return;
    };
    let start = monotonic_ns();
    let url = format!("https://127.0.0.1:{port}/");
    let secs = LOOP_SECS.to_string();
    let client = py_client(
        "requests over TLS",
        &[
            "requests",
            &url,
            "--retries",
            "20",
            "--secs",
            &secs,
            "--insecure",
        ],
    );
    judge(
        &Case {
            id: "s5 503 over TLS, keep-alive",
            client: "Python requests (ssl, shared libssl) + urllib3 Retry(backoff_factor=0), verify=False",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn s5b_curl_over_tls_in_a_shell_loop_against_503_is_a_storm() {
    let Some(_serial) = begin("s5b", &["python3", "openssl", "curl", "bash"], &[]) else {
        return;
    };
    let (mut server, port, _dir) = tls_503_server();
    let Some(live) = LiveRun::start("corpus-s5b") else {
        return;
    };
    let start = monotonic_ns();
    let client = bash_loop(
        "curl https loop",
        &format!("curl -s -k -f -o /dev/null https://127.0.0.1:{port}/"),
        2000,
        LOOP_SECS,
        None,
    );
    judge(
        &Case {
            id: "s5b 503 over TLS, a new curl process (and handshake) per request",
            client: "curl -k (libcurl, shared libssl) in a bash loop",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn s6_psql_with_a_wrong_password_in_a_shell_loop_is_a_storm() {
    let Some(_serial) = begin("s6", &["bash", "runuser"], &[]) else {
        return;
    };
    let Some(pg) = postgres_or_skip("s6") else {
        return;
    };
    let Some(live) = LiveRun::start("corpus-s6") else {
        return;
    };
    let start = monotonic_ns();
    let client = bash_loop("psql loop", &pg.psql("wrong"), 1000, LOOP_SECS, None);
    judge(
        &Case {
            id: "s6 PostgreSQL: password authentication failed",
            client: "psql (libpq, SCRAM) in a bash loop, wrong PGPASSWORD",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, pg.port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [],
    );
}

#[test]
fn s7_redis_py_auth_with_a_wrong_password_in_a_loop_is_a_storm() {
    let Some(_serial) = begin("s7", &["redis-server"], &["redis"]) else {
        return;
    };
    let dir = TempDir::new("redis");
    let (mut server, port) = redis_server(&dir.0);
    let Some(live) = LiveRun::start("corpus-s7") else {
        return;
    };
    let start = monotonic_ns();
    let secs = LOOP_SECS.to_string();
    let client = py_client(
        "redis-py",
        &[
            "redis",
            "--port",
            &port.to_string(),
            "--password",
            "wrong",
            "--secs",
            &secs,
        ],
    );
    judge(
        &Case {
            id: "s7 Redis: AUTH answered -WRONGPASS",
            client: "redis-py PING loop, wrong password, library retry off",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn s8_system_resolver_against_a_dead_dns_server_is_a_storm() {
    let Some(_serial) = begin("s8", &["python3", "ip"], &[]) else {
        return;
    };
    let ns = ResolverNs::create("dnsdead");
    let Some(live) = LiveRun::start("corpus-s8") else {
        return;
    };
    let start = monotonic_ns();
    let secs = LOOP_SECS.to_string();
    let client = Proc::spawn(
        "getaddrinfo loop",
        ns.ns.command("python3").args([
            &script("clients.py"),
            "resolve",
            LOOKUP_NAME,
            "--secs",
            &secs,
        ]),
    );
    judge(
        &Case {
            id: "s8 DNS: nothing listens on 53 (ICMP port unreachable)",
            client: "glibc getaddrinfo (Python socket) in a loop, in a netns",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::udp(LOCAL4, 53),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [],
    );
}

#[test]
fn s9_urllib3_retry_without_backoff_on_refused_connects_is_a_storm() {
    let Some(_serial) = begin("s9", &["python3"], &["requests"]) else {
        return;
    };
    let port = closed_port(false).port();
    let Some(live) = LiveRun::start("corpus-s9") else {
        return;
    };
    let start = monotonic_ns();
    let secs = LOOP_SECS.to_string();
    let client = py_client(
        "requests refused",
        &[
            "requests",
            &http_url(port),
            "--retries",
            "20",
            "--secs",
            &secs,
        ],
    );
    judge(
        &Case {
            id: "s9 connection refused, urllib3 Retry(backoff_factor=0)",
            client: "Python requests + urllib3 Retry(total=20, connect=20)",
            expect: Expect::Storm,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (STORM_MIN_RATE, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [],
    );
}

// --- Healthy: load, polling, probes, backoff ---------------------------------

/// An HTTP server answering 200.
fn ok_server() -> (Proc, u16) {
    py_server("http 200", &["http", "--status", "200"])
}

#[test]
fn h1_wrk_keep_alive_load_against_200_is_healthy() {
    let Some(_serial) = begin("h1", &["python3", "wrk"], &[]) else {
        return;
    };
    let (mut server, port) = ok_server();
    let Some(live) = LiveRun::start("corpus-h1") else {
        return;
    };
    let start = monotonic_ns();
    let client = Proc::spawn(
        "wrk",
        Command::new("wrk").args(["-t1", "-c4", "-d3s", "--timeout", "2s", &http_url(port)]),
    );
    judge(
        &Case {
            id: "h1 load: identical keep-alive requests answered 200",
            client: "wrk -t1 -c4 -d3s",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::tcp(LOCAL4, port),
            rate: (500.0, f64::MAX),
        },
        live,
        start,
        vec![(client, wrk_report)],
        &mut [&mut server],
    );
}

#[test]
fn h2_ab_without_keep_alive_against_200_is_healthy() {
    let Some(_serial) = begin("h2", &["python3", "ab"], &[]) else {
        return;
    };
    let (mut server, port) = ok_server();
    let Some(live) = LiveRun::start("corpus-h2") else {
        return;
    };
    let start = monotonic_ns();
    // -t before -n: -t alone implies -n 50000.
    let client = Proc::spawn(
        "ab",
        Command::new("ab").args(["-q", "-t", "3", "-n", "3000", "-c", "2", &http_url(port)]),
    );
    judge(
        &Case {
            id: "h2 load: a new connection per request, answered 200",
            client: "ab -n 3000 -c 2 (no keep-alive)",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::tcp(LOCAL4, port),
            rate: (200.0, f64::MAX),
        },
        live,
        start,
        vec![(client, ab_report)],
        &mut [&mut server],
    );
}

#[test]
fn h3_a_health_check_poller_every_200ms_is_healthy() {
    let Some(_serial) = begin("h3", &["python3", "curl", "bash"], &[]) else {
        return;
    };
    let (mut server, port) = ok_server();
    let Some(live) = LiveRun::start("corpus-h3") else {
        return;
    };
    let start = monotonic_ns();
    let client = bash_loop(
        "health poller",
        &format!("curl -s -f -o /dev/null {}", http_url(port)),
        25,
        5,
        Some("0.2"),
    );
    judge(
        &Case {
            id: "h3 health check every 200 ms",
            client: "curl every 200 ms from a bash loop, 5 s",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::tcp(LOCAL4, port),
            rate: (3.0, 6.0),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn h4_a_tcp_port_probe_loop_is_healthy() {
    let Some(_serial) = begin("h4", &["python3", "nc", "bash"], &[]) else {
        return;
    };
    let (mut server, port) = py_server("tcp sink", &["sink"]);
    let Some(live) = LiveRun::start("corpus-h4") else {
        return;
    };
    let start = monotonic_ns();
    let client = bash_loop(
        "nc -z loop",
        &format!("nc -z 127.0.0.1 {port}"),
        400,
        3,
        Some("0.005"),
    );
    judge(
        &Case {
            id: "h4 port probe: connect and close, ~100/s, nothing sent",
            client: "nc -z (OpenBSD netcat) in a bash loop",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::tcp(LOCAL4, port),
            rate: (50.0, 200.0),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn h5_a_udp_server_with_20_client_processes_is_healthy() {
    let Some(_serial) = begin("h5", &["python3"], &[]) else {
        return;
    };
    let (mut server, port) = py_server("udp echo", &["udp-echo"]);
    let Some(live) = LiveRun::start("corpus-h5") else {
        return;
    };
    let start = monotonic_ns();
    let client = py_client(
        "20 udp clients",
        &[
            "udp-clients",
            "--port",
            &port.to_string(),
            "--procs",
            "20",
            "--count",
            "20",
            "--gap",
            "0.1",
            "--secs",
            "6",
        ],
    );
    judge(
        &Case {
            id: "h5 UDP request/reply: 20 client processes, 10/s each",
            client: "20 Python processes (half connected, half sendto) from one parent",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::udp(LOCAL4, port),
            rate: (50.0, 400.0),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn h6_urllib3_retry_with_backoff_on_503_is_healthy() {
    let Some(_serial) = begin("h6", &["python3"], &["requests"]) else {
        return;
    };
    let (mut server, port) = py_server("http 503", &["http", "--status", "503"]);
    let Some(live) = LiveRun::start("corpus-h6") else {
        return;
    };
    let start = monotonic_ns();
    // Sleeps 0, 0.4, 0.8, 1.6, 3.2 s between its 6 attempts (~6 s).
    let client = py_client(
        "requests backoff",
        &[
            "requests",
            &http_url(port),
            "--retries",
            "5",
            "--backoff",
            "0.2",
            "--calls",
            "1",
            "--secs",
            "10",
        ],
    );
    judge(
        &Case {
            id: "h6 503 keep-alive, urllib3 Retry(backoff_factor=0.2) (twin of s1)",
            client: "Python requests + urllib3 Retry(total=5, backoff_factor=0.2)",
            expect: Expect::Healthy,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (0.5, 2.0),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn h7_urllib3_retry_with_backoff_on_refused_connects_is_healthy() {
    let Some(_serial) = begin("h7", &["python3"], &["requests"]) else {
        return;
    };
    let port = closed_port(false).port();
    let Some(live) = LiveRun::start("corpus-h7") else {
        return;
    };
    let start = monotonic_ns();
    let client = py_client(
        "requests backoff refused",
        &[
            "requests",
            &http_url(port),
            "--retries",
            "5",
            "--backoff",
            "0.2",
            "--calls",
            "1",
            "--secs",
            "10",
        ],
    );
    judge(
        &Case {
            id: "h7 connection refused, urllib3 Retry(backoff_factor=0.2) (twin of s9)",
            client: "Python requests + urllib3 Retry(total=5, connect=5, backoff_factor=0.2)",
            expect: Expect::Healthy,
            attempts: Attempts::Fail,
            target: Target::tcp(LOCAL4, port),
            rate: (0.5, 2.0),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [],
    );
}

#[test]
fn h8_system_resolver_against_a_live_dns_server_is_healthy() {
    let Some(_serial) = begin("h8", &["python3", "ip"], &[]) else {
        return;
    };
    let ns = ResolverNs::create("dnsok");
    let mut server = Proc::spawn(
        "dns responder",
        ns.ns
            .command("python3")
            .args([&script("servers.py"), "dns", "--port", "53"]),
    );
    wait_port(&mut server);
    let Some(live) = LiveRun::start("corpus-h8") else {
        return;
    };
    let start = monotonic_ns();
    let secs = LOOP_SECS.to_string();
    let client = Proc::spawn(
        "getaddrinfo 20/s",
        ns.ns.command("python3").args([
            &script("clients.py"),
            "resolve",
            LOOKUP_NAME,
            "--rate",
            "20",
            "--secs",
            &secs,
        ]),
    );
    judge(
        &Case {
            id: "h8 DNS: every lookup answered, 20/s (twin of s8)",
            client: "glibc getaddrinfo (Python socket) at 20/s, in a netns",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::udp(LOCAL4, 53),
            rate: (15.0, 22.0),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [&mut server],
    );
}

#[test]
fn h9_redis_benchmark_with_the_right_password_is_healthy() {
    let Some(_serial) = begin("h9", &["redis-server", "redis-benchmark", "timeout"], &[]) else {
        return;
    };
    let dir = TempDir::new("redis");
    let (mut server, port) = redis_server(&dir.0);
    let Some(live) = LiveRun::start("corpus-h9") else {
        return;
    };
    let start = monotonic_ns();
    // redis-benchmark has no time limit of its own: timeout bounds it.
    let client = Proc::spawn(
        "redis-benchmark",
        Command::new("timeout").args([
            "10",
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-a",
            REDIS_PASSWORD,
            "-n",
            &REDIS_BENCH_N.to_string(),
            "-c",
            "4",
            "-t",
            "set,get",
            "--csv",
        ]),
    );
    judge(
        &Case {
            id: "h9 Redis load: identical GET/SET answered, right password (twin of s7)",
            client: "redis-benchmark -c 4 -t set,get",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::tcp(LOCAL4, port),
            rate: (2000.0, f64::MAX),
        },
        live,
        start,
        vec![(client, redis_bench_report)],
        &mut [&mut server],
    );
}

#[test]
fn h10_psql_queries_with_the_right_password_in_a_loop_are_healthy() {
    let Some(_serial) = begin("h10", &["bash", "runuser"], &[]) else {
        return;
    };
    let Some(pg) = postgres_or_skip("h10") else {
        return;
    };
    let Some(live) = LiveRun::start("corpus-h10") else {
        return;
    };
    let start = monotonic_ns();
    let client = bash_loop("psql loop", &pg.psql(PG_PASSWORD), 1000, 3, None);
    judge(
        &Case {
            id: "h10 PostgreSQL: successful queries, a new psql per query (twin of s6)",
            client: "psql -c 'select 1' in a bash loop, right password",
            expect: Expect::Healthy,
            attempts: Attempts::Succeed,
            target: Target::tcp(LOCAL4, pg.port),
            rate: (10.0, f64::MAX),
        },
        live,
        start,
        vec![(client, json_report)],
        &mut [],
    );
}
