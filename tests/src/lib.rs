//! Helpers for the integration tests, which load the real eBPF programs and
//! drive real client processes (`src/bin/stormclient.rs`).
//!
//! Policy: with `CI=true` or `STORMGUARD_REQUIRE_EBPF=1` (set by
//! `cargo xtask test`) a test whose eBPF cannot load fails; otherwise it is
//! skipped with the reason printed.
use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use stormguard::{
    flows::{FlowCounts, FlowTable},
    ingest::{Observation, Proto},
    kernel::{EventRing, Sensors, monotonic_ns},
};

/// True when a test that cannot load eBPF must fail rather than skip.
pub fn ebpf_required() -> bool {
    let set = |k: &str| {
        std::env::var(k)
            .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
            .unwrap_or(false)
    };
    set("CI") || set("STORMGUARD_REQUIRE_EBPF")
}

/// How many times slower than the host this machine runs the tests:
/// `STORMGUARD_TIME_SCALE` (`cargo xtask vmtest` sets it for emulated
/// kernels), at least 1; 1 when unset.
pub fn time_scale() -> f64 {
    std::env::var("STORMGUARD_TIME_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|f| f.is_finite())
        .map_or(1.0, |f| f.max(1.0))
}

/// A time bound stretched by [`time_scale`] (unchanged at 1).
pub fn scaled(d: Duration) -> Duration {
    let f = time_scale();
    if f == 1.0 { d } else { d.mul_f64(f) }
}

/// Applies the policy above to a failed load.
pub fn skip_or_fail(what: &str, err: &dyn std::fmt::Display) {
    if ebpf_required() {
        panic!("{what}: eBPF could not load and this run requires it: {err}");
    }
    eprintln!(
        "SKIPPED {what}: eBPF could not load ({err}); run as root, or via `cargo xtask test`"
    );
}

/// Loaded sensors plus everything they reported.
pub struct Capture {
    pub sensors: Sensors,
    ring: EventRing,
    pub observations: Vec<Observation>,
    pub decode_errors: usize,
}

impl Capture {
    /// Loads the sensors, or returns None after [`skip_or_fail`].
    pub fn start(what: &str) -> Option<Capture> {
        match Sensors::load() {
            Ok(mut sensors) => {
                let ring = sensors.take_events().expect("ring buffer");
                Some(Capture {
                    sensors,
                    ring,
                    observations: Vec::new(),
                    decode_errors: 0,
                })
            }
            Err(e) => {
                skip_or_fail(what, &e);
                None
            }
        }
    }

    /// Reads what is in the ring now.
    pub fn drain(&mut self) -> usize {
        let (obs, errs) = (&mut self.observations, &mut self.decode_errors);
        self.ring.drain(|r| match r {
            Ok(o) => obs.push(o),
            Err(_) => *errs += 1,
        })
    }

    /// Waits for a child while draining the ring, so a long wait (a 3 s
    /// timeout) cannot overflow it with the rest of the host's events.
    /// The timeout is [`scaled`].
    pub fn wait_child(&mut self, mut child: ChildGuard, timeout: Duration) -> String {
        let timeout = scaled(timeout);
        let end = Instant::now() + timeout;
        while child.0.try_wait().expect("wait").is_none() {
            assert!(Instant::now() < end, "child did not finish in {timeout:?}");
            self.drain();
            std::thread::sleep(Duration::from_millis(20));
        }
        child.finish(Duration::from_secs(1))
    }

    /// Drains until the ring has been quiet for 300 ms (at most 10 s; both
    /// [`scaled`]), then collects attempts that closed without an error
    /// report.
    pub fn settle(&mut self) {
        let end = Instant::now() + scaled(Duration::from_secs(10));
        let quiet = scaled(Duration::from_millis(300));
        let mut quiet_since = Instant::now();
        while Instant::now() < end {
            if self.drain() > 0 {
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() > quiet {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let closed = self
            .sensors
            .sweep_closed(monotonic_ns(), 0)
            .expect("sweep CLOSED");
        for ev in closed {
            self.observations
                .push(stormguard::ingest::decode::from_event(&ev).expect("decode swept"));
        }
        assert_eq!(self.decode_errors, 0, "undecodable records");
        let stats = self.sensors.stats().expect("stats");
        assert_eq!(stats.ring_drops, 0, "ring buffer dropped records");
    }

    /// Counts of one process towards one destination.
    pub fn flow(&self, pid: u32, proto: Proto, dest: SocketAddr) -> FlowCounts {
        let mut table = FlowTable::new();
        for o in &self.observations {
            table.observe(o);
        }
        table
            .take_interval()
            .into_iter()
            .find(|r| {
                r.key.pid == pid
                    && r.key.dest.proto == proto
                    && r.key.dest.addr == dest.ip()
                    && r.key.dest.port == dest.port()
            })
            .map(|r| r.counts)
            .unwrap_or_default()
    }

    /// Every process that has a flow to `dest`, with its attempts.
    pub fn pids_towards(&self, proto: Proto, dest: SocketAddr) -> Vec<(u32, u64)> {
        let mut table = FlowTable::new();
        for o in &self.observations {
            table.observe(o);
        }
        let mut v: Vec<(u32, u64)> = table
            .take_interval()
            .into_iter()
            .filter(|r| {
                r.key.dest.proto == proto
                    && r.key.dest.addr == dest.ip()
                    && r.key.dest.port == dest.port()
            })
            .map(|r| (r.key.pid, r.counts.attempts))
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of connect observations made by `pid`, to anywhere.
    pub fn connects_by(&self, pid: u32) -> usize {
        self.observations
            .iter()
            .filter(|o| matches!(o, Observation::Connect { pid: p, .. } if *p == pid))
            .count()
    }
}

/// A child process killed when the guard is dropped (a failing test must
/// not leave a storm running).
pub struct ChildGuard(pub Child);

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        ChildGuard(cmd.spawn().expect("spawn child"))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// Waits for the child and returns its stdout, failing on a bad exit.
    /// The timeout is [`scaled`].
    pub fn finish(mut self, timeout: Duration) -> String {
        let timeout = scaled(timeout);
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait().expect("wait") {
                let mut out = String::new();
                if let Some(mut s) = self.0.stdout.take() {
                    use std::io::Read;
                    s.read_to_string(&mut out).expect("child stdout");
                }
                assert!(status.success(), "child failed: {status}; stdout: {out}");
                return out;
            }
            assert!(Instant::now() < end, "child did not finish in {timeout:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port with nothing listening (bound, then released).
pub fn closed_port(v6: bool) -> SocketAddr {
    let bind = if v6 { "[::1]:0" } else { "127.0.0.1:0" };
    let l = TcpListener::bind(bind).expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    addr
}

/// A network namespace created for a test and deleted when dropped.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn create(tag: &str) -> NetNs {
        let name = format!("sg-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// A command run inside the namespace (`ip netns exec` execs it, so the
    /// child's pid is the command's pid).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a setup command, failing the test with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (cargo xtask test installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `stormguard` binary of this build (built by `cargo xtask test`
/// before the tests; cargo does not build a dependency's binaries).
pub fn stormguard_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/stormguard
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("stormguard"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p detector` first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// Names of the programs behind the BPF links that process `pid` holds,
/// seen from outside: link ids from /proc/PID/fdinfo, program names from
/// `bpftool`. (aya attaches tracepoints as bpf_links and closes the perf
/// fd, so `bpftool perf show` lists nothing.)
pub fn attached_programs(pid: u32) -> Vec<String> {
    let mut link_ids = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for entry in dir.flatten() {
            let Ok(info) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix("link_id:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
            {
                link_ids.push(id);
            }
        }
    }
    if link_ids.is_empty() {
        return Vec::new();
    }
    let links: serde_json::Value =
        serde_json::from_str(&run("bpftool", &["-j", "link", "show"])).expect("bpftool link json");
    let progs: serde_json::Value =
        serde_json::from_str(&run("bpftool", &["-j", "prog", "show"])).expect("bpftool prog json");
    let name_of = |prog_id: &serde_json::Value| {
        progs
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| &p["id"] == prog_id)
            .and_then(|p| p["name"].as_str())
            .unwrap_or("?")
            .to_string()
    };
    let mut names: Vec<String> = links
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["id"].as_u64().is_some_and(|id| link_ids.contains(&id)))
        .map(|l| name_of(&l["prog_id"]))
        .collect();
    names.sort();
    names
}

/// Lines of a child's pipe, read on a thread so a test can wait with a bound.
pub fn lines(pipe: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The live pipeline under the real sensors, recorded to a file, ticked
/// every 100 ms like `watch` — for scenario tests that compare live
/// verdicts with the replay of the recording.
pub struct LiveRun {
    pub sensors: Sensors,
    ring: EventRing,
    pub pipe: stormguard::pipeline::Pipeline,
    pub recording: PathBuf,
    pub changes: Vec<stormguard::detect::VerdictChange>,
    next_tick: u64,
}

impl LiveRun {
    pub fn start(what: &str) -> Option<LiveRun> {
        let mut sensors = match Sensors::load() {
            Ok(s) => s,
            Err(e) => {
                skip_or_fail(what, &e);
                return None;
            }
        };
        let ring = sensors.take_events().expect("ring buffer");
        let mut pipe = stormguard::pipeline::Pipeline::new(
            stormguard::detect::DetectConfig::default(),
            stormguard::detect::probes::ProbeConfig::default(),
            stormguard::pipeline::OnDemand::Auto,
        );
        let recording = std::env::temp_dir().join(format!(
            "sg-{what}-{}-{}.jsonl",
            std::process::id(),
            monotonic_ns()
        ));
        let file = std::fs::File::create(&recording).expect("recording file");
        pipe.record_to(Box::new(std::io::BufWriter::new(file)));
        Some(LiveRun {
            sensors,
            ring,
            pipe,
            recording,
            changes: Vec::new(),
            next_tick: monotonic_ns() + stormguard::pipeline::TICK_NS,
        })
    }

    /// Drains and ticks until `done` says so or `bound` ([`scaled`])
    /// passes; returns whether `done` held.
    pub fn run_until(
        &mut self,
        bound: Duration,
        mut done: impl FnMut(&[stormguard::detect::VerdictChange]) -> bool,
    ) -> bool {
        let end = Instant::now() + scaled(bound);
        while Instant::now() < end {
            let pipe = &mut self.pipe;
            self.ring.drain(|r| match r {
                Ok(o) => pipe.observe(&o),
                Err(_) => pipe.decode_errors += 1,
            });
            let now = monotonic_ns();
            if now >= self.next_tick {
                let changes = self.pipe.tick(&mut self.sensors, now);
                // The daemon survives kernel errors; a test must not.
                assert!(
                    self.pipe.health.errors().is_empty(),
                    "kernel errors during the run: {:?}",
                    self.pipe.health.errors()
                );
                self.changes.extend(changes);
                self.next_tick = now + stormguard::pipeline::TICK_NS;
                if done(&self.changes) {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// Ends the run: flushes the recording and replays it through a fresh
    /// engine. Returns (live changes, replayed changes).
    pub fn finish(
        mut self,
    ) -> (
        Vec<stormguard::detect::VerdictChange>,
        Vec<stormguard::detect::VerdictChange>,
    ) {
        let _ = self.sensors.detach_on_demand();
        drop(self.pipe); // flushes and closes the recording
        let file = std::fs::File::open(&self.recording).expect("recording");
        let replayed = stormguard::record::replay(
            std::io::BufReader::new(file),
            stormguard::detect::DetectConfig::default(),
        )
        .expect("replay");
        let _ = std::fs::remove_file(&self.recording);
        (self.changes, replayed)
    }
}

/// A cgroup v2 directory for one test, removed when dropped.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(tag: &str) -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
        let root = stormguard::kernel::find_cgroup2(&mounts).expect("cgroup2 mount");
        let path = root.join(format!("sg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create cgroup");
        Cgroup { path }
    }

    /// The cgroup id, as `bpf_get_current_cgroup_id` reports it.
    pub fn id(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.path).expect("cgroup").ino()
    }

    /// A shell command line that moves itself into this cgroup, then execs.
    pub fn exec_in(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$0\" \"$@\"",
                self.path.display()
            ))
            .arg(program)
            .args(args);
        c
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Members must be gone first; give stragglers a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A real `stormguard daemon` on a temporary socket, database and metrics
/// port, stopped (SIGTERM) when dropped.
pub struct Daemon {
    pub child: Option<ChildGuard>,
    /// Capabilities to run with (`setpriv` spelling, see [`setpriv_caps`]);
    /// None: this process's own.
    pub caps: Option<String>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub metrics: Option<SocketAddr>,
    pub stderr: Option<std::sync::mpsc::Receiver<String>>,
}

impl Daemon {
    /// Writes a config under `dir` (extra TOML appended) and starts the
    /// daemon; None after [`skip_or_fail`] if eBPF cannot load.
    pub fn start(what: &str, dir: &std::path::Path, extra: &str) -> Option<Daemon> {
        let mut d = Daemon::configure(dir, extra);
        d.spawn(what).then_some(d)
    }

    /// The config and paths of a daemon, not started.
    fn configure(dir: &std::path::Path, extra: &str) -> Daemon {
        std::fs::create_dir_all(dir).expect("daemon dir");
        let socket = dir.join("sg.sock");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\n[store]\npath = \"{}\"\n[metrics]\nlisten = \"{port}\"\n{extra}",
                socket.display(),
                dir.join("incidents.db").display()
            ),
        )
        .expect("write config");
        Daemon {
            child: None,
            caps: None,
            dir: dir.into(),
            socket,
            config,
            metrics: Some(port),
            stderr: None,
        }
    }

    /// As [`Daemon::start`], with only the capabilities the shipped unit
    /// grants (as systemd applies them to a uid-0 service).
    pub fn start_as_unit(what: &str, dir: &std::path::Path, extra: &str) -> Option<Daemon> {
        let mut d = Daemon::configure(dir, extra);
        d.caps = Some(setpriv_caps(&unit_capabilities()));
        d.spawn(what).then_some(d)
    }

    /// (Re)starts the daemon process; false if skipped.
    pub fn spawn(&mut self, what: &str) -> bool {
        let mut cmd = match &self.caps {
            None => Command::new(stormguard_bin()),
            Some(set) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--inh-caps={set}"))
                    .arg(format!("--ambient-caps={set}"))
                    .arg(format!("--bounding-set={set}"))
                    .arg("--reuid=0")
                    .arg("--")
                    .arg(stormguard_bin());
                c
            }
        };
        let mut child = ChildGuard::spawn(
            cmd.arg("daemon")
                .arg("--config")
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let err = lines(child.0.stderr.take().expect("stderr"));
        let started = Instant::now();
        loop {
            match err.recv_timeout(scaled(Duration::from_secs(30))) {
                Ok(l) if l.contains(" ready ") || l.ends_with(" ready") => break,
                Ok(l)
                    if l.starts_with("stormguard: ") && !l.starts_with("stormguard: watching") =>
                {
                    skip_or_fail(what, &l);
                    return false;
                }
                Ok(_) => {}
                Err(e) => panic!("daemon not ready after {:?}: {e}", started.elapsed()),
            }
        }
        println!("{what}: daemon ready in {:?}", started.elapsed());
        self.child = Some(child);
        self.stderr = Some(err);
        true
    }

    /// Panics with the daemon's last words if it has exited: a test that
    /// storms reports the daemon's death as such, not as a failed query.
    pub fn assert_alive(&mut self, when: &str) {
        let c = self.child.as_mut().expect("daemon child");
        if let Some(status) = c.0.try_wait().expect("wait") {
            let said: Vec<String> = self
                .stderr
                .as_ref()
                .map(|r| r.try_iter().collect())
                .unwrap_or_default();
            panic!(
                "the daemon exited ({status}) {when}; last lines:\n{}",
                said[said.len().saturating_sub(20)..].join("\n")
            );
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.pid() as i32, libc::SIGTERM) };
            let status = c.0.wait().expect("wait for daemon");
            assert!(status.success(), "daemon exited with {status}");
        }
    }

    /// Runs a client command against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(stormguard_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("run stormguard")
    }

    /// A client command's JSON output, failing the test on an error.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "stormguard {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the `stormguard` binary with `args` and returns what it did.
pub fn stormguard<S: AsRef<std::ffi::OsStr>>(
    args: impl IntoIterator<Item = S>,
) -> std::process::Output {
    Command::new(stormguard_bin())
        .args(args)
        .output()
        .expect("run stormguard")
}

pub const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/corpus");

pub fn script(name: &str) -> String {
    format!("{CORPUS}/{name}")
}

/// A network namespace joined to the host by a veth pair made for the
/// test: servers listen inside, clients stay in the host namespace, so
/// their packets leave through the host end — a device of the daemon's
/// namespace, which it may give a qdisc — and nothing else is touched.
pub struct Link {
    pub ns: NetNs,
    pub host_dev: String,
    pub peer_ip: String,
}

impl Link {
    pub fn create(tag: &str, net: u8) -> Link {
        let ns = NetNs::create(tag);
        let n = std::process::id() % 100_000;
        let host_dev = format!("sgv{net}h{n}");
        let peer_dev = format!("sgv{net}p{n}");
        let (host_ip, peer_ip) = (format!("10.231.{net}.1"), format!("10.231.{net}.2"));
        run(
            "ip",
            &[
                "link", "add", &host_dev, "type", "veth", "peer", "name", &peer_dev,
            ],
        );
        let link = Link {
            ns,
            host_dev,
            peer_ip,
        };
        run("ip", &["link", "set", &peer_dev, "netns", &link.ns.name]);
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{host_ip}/30"),
                "dev",
                &link.host_dev,
            ],
        );
        run("ip", &["link", "set", &link.host_dev, "up"]);
        let n = &link.ns.name;
        let peer = format!("{}/30", link.peer_ip);
        run("ip", &["-n", n, "addr", "add", &peer, "dev", &peer_dev]);
        run("ip", &["-n", n, "link", "set", &peer_dev, "up"]);
        link
    }

    /// The host end's root qdisc, as `tc` prints it.
    pub fn root_qdisc(&self) -> String {
        run("tc", &["qdisc", "show", "dev", &self.host_dev, "root"])
    }

    /// A DNS server on the peer's port 53 answering every question with
    /// `rcode` (0: an answer; 2: SERVFAIL).
    pub fn dns_server(&self, rcode: u8) -> (ChildGuard, u16) {
        let rcode = rcode.to_string();
        self.server(&[
            "dns",
            "--rcode",
            &rcode,
            "--bind",
            &self.peer_ip,
            "--port",
            "53",
        ])
    }

    /// `python3 servers.py ARGS` inside the namespace, and the port it bound.
    pub fn server(&self, args: &[&str]) -> (ChildGuard, u16) {
        let mut child = ChildGuard::spawn(
            self.ns
                .command("python3")
                .arg(script("servers.py"))
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null()),
        );
        let out = lines(child.0.stdout.take().expect("stdout"));
        let line = out
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("servers.py {args:?} did not start: {e}"));
        let port: serde_json::Value = serde_json::from_str(&line).expect("port line");
        (child, port["port"].as_u64().expect("port") as u16)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.host_dev])
            .status();
    }
}

/// The capabilities `packaging/stormguard.service` grants
/// (`CapabilityBoundingSet=`, which the service tests check equal to
/// `AmbientCapabilities=`).
pub fn unit_capabilities() -> std::collections::BTreeSet<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/stormguard.service");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("CapabilityBoundingSet="))
        .flat_map(|v| v.split_whitespace().map(str::to_string))
        .collect()
}

/// `-all,+bpf,+perfmon,...` as setpriv spells a capability set; `-all`
/// first so nothing inherited from the test's own (full) sets survives.
pub fn setpriv_caps(caps: &std::collections::BTreeSet<String>) -> String {
    let mut s = String::from("-all");
    for c in caps {
        s.push_str(",+");
        s.push_str(&c.trim_start_matches("CAP_").to_ascii_lowercase());
    }
    s
}

/// Polls `f` every 200 ms until it returns Some, up to `bound` ([`scaled`]);
/// the value and how long it took.
pub fn wait_for<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let bound = scaled(bound);
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
