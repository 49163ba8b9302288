//! The systemd unit as shipped (`packaging/stormguard.service`): what it
//! declares, the daemon run with exactly its capabilities and a real
//! sd_notify socket (no systemd needed: `setpriv` applies the same
//! capability sets systemd would), each of those capabilities shown to be
//! needed, its restart policy and watchdog (the daemon's pings stop when
//! it is frozen), and `systemd-analyze verify` and `security` (exposure ≤
//! 4) where systemd is installed (it must be under `CI`).
use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::{fs::MetadataExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::mpsc::Receiver,
    time::{Duration, Instant},
};

use stormguard::{
    cli::doctor::EXIT_ENVIRONMENT,
    config::Config,
    kernel::caps::{FOR_STACKS, REQUIRED},
};
use stormguard_tests::{
    ChildGuard, Link, closed_port, ebpf_required, lines, setpriv_caps, skip_or_fail, stormguard_bin,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

/// How long the daemon may take to load everything and send READY=1.
const READY_BOUND: Duration = Duration::from_secs(20);

fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(name)
}

/// A directory for one test, removed (with whatever the daemon left in it)
/// when dropped, so a failing assertion cleans up too.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("sg-service-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unit file as `key → values` per section, in file order. Enough of
/// systemd's syntax for this file: comments, sections, `key=value`,
/// backslash continuations; a key given several times keeps every value.
type Unit = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_unit(text: &str) -> Unit {
    let mut unit = Unit::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.is_empty() || line.starts_with(['#', ';'])) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let line = std::mem::take(&mut pending) + line;
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value in [{section}]: {line:?}"));
        unit.entry(section.clone())
            .or_default()
            .entry(key.trim().to_string())
            .or_default()
            .push(value.trim().to_string());
    }
    unit
}

fn shipped_unit() -> Unit {
    let path = packaging("stormguard.service");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    parse_unit(&text)
}

/// The one value of `[Service] key`, failing if absent or repeated.
fn service<'a>(unit: &'a Unit, key: &str) -> &'a str {
    match unit
        .get("Service")
        .and_then(|s| s.get(key))
        .map(Vec::as_slice)
    {
        Some([v]) => v,
        other => panic!("[Service] {key}= must be set exactly once, found {other:?}"),
    }
}

/// The capabilities a capability line grants. Refuses the forms whose
/// meaning depends on order or inversion (`~`, an empty reset), which a
/// plain set comparison would misread.
fn cap_set(unit: &Unit, key: &str) -> BTreeSet<String> {
    let values = unit
        .get("Service")
        .and_then(|s| s.get(key))
        .unwrap_or_else(|| panic!("[Service] {key}= is missing"));
    let mut caps = BTreeSet::new();
    for v in values {
        assert!(
            !v.is_empty() && !v.starts_with('~'),
            "{key}={v:?}: list the capabilities granted, no reset or ~"
        );
        caps.extend(v.split_whitespace().map(str::to_string));
    }
    caps
}

/// The unit's capabilities (CapabilityBoundingSet, checked equal to
/// AmbientCapabilities by `unit_file_declares_what_the_daemon_needs`).
fn unit_caps() -> BTreeSet<String> {
    stormguard_tests::unit_capabilities()
}

/// Linux capability numbers, as in <linux/capability.h>.
const CAP_NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

fn cap_mask(caps: &BTreeSet<String>) -> u64 {
    caps.iter()
        .map(|c| {
            let bit = CAP_NAMES
                .iter()
                .position(|n| n == c)
                .unwrap_or_else(|| panic!("unknown capability {c}"));
            1u64 << bit
        })
        .fold(0, |a, b| a | b)
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Root and setpriv are what these tests need to apply a capability set
/// (as systemd does for a uid-0 service); without them, skip or fail.
fn can_drop_caps(what: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail(what, &"running the daemon as the unit does needs root");
        return false;
    }
    if on_path("setpriv").is_none() {
        skip_or_fail(what, &"setpriv (util-linux) is not on PATH");
        return false;
    }
    true
}

/// A group the daemon is not a member of: it must chown its socket to it,
/// as it does to group `stormguard` once an administrator creates that
/// group. That is what needs CAP_CHOWN (a member could do it without).
/// `daemon`, gid 1, qualifies on every Debian and Fedora base system.
fn foreign_group() -> (String, u32) {
    // The daemon inherits this process's groups through setpriv.
    // SAFETY: a zero-length query writes nothing and returns the count.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let mut ours = vec![0 as libc::gid_t; n.max(0) as usize];
    // SAFETY: `ours` has room for the `n` entries asked for.
    let n = unsafe { libc::getgroups(n, ours.as_mut_ptr()) };
    ours.truncate(n.max(0) as usize);
    // SAFETY: getegid has no preconditions.
    ours.push(unsafe { libc::getegid() });
    let groups = std::fs::read_to_string("/etc/group").expect("/etc/group");
    groups
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let gid = f.get(2)?.parse::<u32>().ok()?;
            let members = f.get(3).copied().unwrap_or("");
            (!ours.contains(&gid) && !members.split(',').any(|m| m == "root"))
                .then(|| (f[0].to_string(), gid))
        })
        .next()
        .expect("a group in /etc/group that root is not a member of")
}

/// A daemon started the way the unit starts it: only the unit's
/// capabilities (bounding, inheritable and ambient, as systemd sets them
/// for AmbientCapabilities=), uid 0, NOTIFY_SOCKET pointing at a socket
/// this test reads, and a config whose socket group exists.
struct Service {
    /// Removed last, after the daemon (fields drop in order).
    _dir: TempDir,
    socket: PathBuf,
    group_gid: u32,
    notify: UnixDatagram,
    child: ChildGuard,
    stderr: Receiver<String>,
    /// Every stderr line read so far, for failure messages.
    log: Vec<String>,
}

impl Service {
    fn start(tag: &str, caps: &BTreeSet<String>) -> Service {
        Service::start_with(tag, caps, None)
    }

    /// As [`Service::start`]; with `watchdog`, also the environment systemd
    /// gives a unit with `WatchdogSec=`: `WATCHDOG_USEC`, and `WATCHDOG_PID`
    /// naming the daemon (a shell exports its own pid, then execs setpriv,
    /// which execs the daemon: one pid throughout).
    fn start_with(tag: &str, caps: &BTreeSet<String>, watchdog: Option<Duration>) -> Service {
        let dir = TempDir::new(tag);
        let socket = dir.0.join("sg.sock");
        let (group, group_gid) = foreign_group();
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let config = dir.0.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\nsocket_group = \"{group}\"\n\
                 [store]\npath = \"{}\"\n[metrics]\nlisten = \"{metrics}\"\n",
                socket.display(),
                dir.0.join("incidents.db").display()
            ),
        )
        .expect("write config");
        let notify_path = dir.0.join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
        notify
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let set = setpriv_caps(caps);
        let mut cmd = match watchdog {
            None => {
                let mut c = Command::new("setpriv");
                c.env_remove("WATCHDOG_USEC");
                c
            }
            Some(timeout) => {
                let mut sh = Command::new("sh");
                sh.args(["-c", "WATCHDOG_PID=$$; export WATCHDOG_PID; exec \"$@\""])
                    .args(["sh", "setpriv"])
                    .env("WATCHDOG_USEC", timeout.as_micros().to_string());
                sh
            }
        };
        let mut child = ChildGuard::spawn(
            cmd.arg(format!("--inh-caps={set}"))
                .arg(format!("--ambient-caps={set}"))
                .arg(format!("--bounding-set={set}"))
                .arg("--reuid=0")
                .arg("--")
                .arg(stormguard_bin())
                .arg("daemon")
                .arg("--config")
                .arg(&config)
                .env("NOTIFY_SOCKET", &notify_path)
                .env_remove("WATCHDOG_PID")
                // Logs on stderr, where the test reads them, not journald.
                .env_remove("JOURNAL_STREAM")
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let stderr = lines(child.0.stderr.take().expect("stderr"));
        Service {
            _dir: dir,
            socket,
            group_gid,
            notify,
            child,
            stderr,
            log: Vec::new(),
        }
    }

    fn drain_stderr(&mut self) {
        while let Ok(l) = self.stderr.try_recv() {
            self.log.push(l);
        }
    }

    /// Waits for a notify message with the `KEY=value` line `want`. Returns
    /// Ok(elapsed), or Err(exit status) if the daemon exited first; panics
    /// after `bound`.
    fn wait_notify(&mut self, want: &str, bound: Duration) -> Result<Duration, ExitStatus> {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == want) {
                    return Ok(start.elapsed());
                }
                continue;
            }
            if let Some(status) = self.child.0.try_wait().expect("wait") {
                // Whatever it wrote last is on its way through the pipe.
                std::thread::sleep(Duration::from_millis(100));
                self.drain_stderr();
                return Err(status);
            }
            self.drain_stderr();
            assert!(
                start.elapsed() < bound,
                "no {want} within {bound:?}; daemon log:\n{}",
                self.log.join("\n")
            );
        }
    }

    /// Waits for the daemon to exit by itself, at most `bound`.
    fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100));
                self.drain_stderr();
                return status;
            }
            assert!(
                start.elapsed() < bound,
                "daemon still running after {bound:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// When each `WATCHDOG=1` arrived during `window` from `start`, as
    /// times since `start`. Panics if the daemon exits meanwhile.
    fn pings_during(&mut self, start: Instant, window: Duration) -> Vec<Duration> {
        let mut pings = Vec::new();
        let mut buf = [0u8; 4096];
        while start.elapsed() < window {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]);
                if msg.lines().any(|l| l == "WATCHDOG=1") {
                    pings.push(start.elapsed());
                }
                continue;
            }
            self.drain_stderr();
            if let Some(status) = self.child.0.try_wait().expect("wait") {
                std::thread::sleep(Duration::from_millis(100));
                self.drain_stderr();
                panic!("daemon exited ({status}):\n{}", self.log.join("\n"));
            }
        }
        pings
    }

    /// A client command's JSON output, as root with every capability (the
    /// client needs none; this is how an administrator queries).
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = Command::new(stormguard_bin())
            .args(args)
            .arg("--socket")
            .arg(&self.socket)
            .arg("--json")
            .output()
            .expect("run stormguard");
        assert!(
            out.status.success(),
            "stormguard {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    }
}

/// A `/proc/PID/status` capability field as a mask.
fn proc_caps(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("hex mask")
}

#[test]
fn unit_file_declares_what_the_daemon_needs() {
    let unit = shipped_unit();
    assert_eq!(service(&unit, "Type"), "notify");
    // The daemon sends READY=1 itself, from the main process.
    assert_eq!(service(&unit, "NotifyAccess"), "main");
    assert_eq!(service(&unit, "ExecStart"), "/usr/bin/stormguard daemon");
    // Restart=, WatchdogSec= and the start limit: see
    // `unit_restarts_a_daemon_that_died_or_stalled_after_ready`.
    assert_eq!(service(&unit, "ProtectSystem"), "strict");

    // The daemon's default paths are the directories systemd creates for
    // it: under ProtectSystem=strict nothing else is writable.
    let runtime = service(&unit, "RuntimeDirectory");
    let state = service(&unit, "StateDirectory");
    assert_eq!(service(&unit, "ConfigurationDirectory"), "stormguard");
    let defaults = Config::default();
    assert!(
        defaults
            .daemon
            .socket
            .starts_with(Path::new("/run").join(runtime)),
        "default socket {} outside RuntimeDirectory={runtime}",
        defaults.daemon.socket.display()
    );
    assert!(
        defaults
            .store
            .path
            .starts_with(Path::new("/var/lib").join(state)),
        "default database {} outside StateDirectory={state}",
        defaults.store.path.display()
    );
    assert_eq!(
        Path::new(stormguard::config::DEFAULT_PATH).parent(),
        Some(Path::new("/etc/stormguard"))
    );

    // Capabilities: the same set in both lines, including every one the
    // daemon checks for at start-up.
    let bounding = cap_set(&unit, "CapabilityBoundingSet");
    let ambient = cap_set(&unit, "AmbientCapabilities");
    assert_eq!(bounding, ambient, "bounding and ambient sets differ");
    for c in REQUIRED.iter().chain(&FOR_STACKS) {
        assert!(bounding.contains(c.name), "{} missing ({})", c.name, c.why);
    }
    assert!(
        !bounding.contains("CAP_SYS_ADMIN"),
        "CAP_SYS_ADMIN is never needed"
    );
    cap_mask(&bounding); // every name is a real capability

    // Nothing may hide other processes or the host's network from a daemon
    // that reads /proc/<pid> of every process and serves metrics.
    let get = |k: &str| unit.get("Service").and_then(|s| s.get(k)).cloned();
    for (key, bad) in [
        ("ProtectProc", &["invisible", "noaccess", "ptraceable"][..]),
        ("ProcSubset", &["pid"][..]),
        ("PrivateNetwork", &["yes", "true", "1"][..]),
        ("PrivatePIDs", &["yes", "true", "1"][..]),
        ("ProtectKernelTunables", &["yes", "true", "1"][..]),
    ] {
        if let Some(vals) = get(key) {
            assert!(
                !vals.iter().any(|v| bad.contains(&v.as_str())),
                "{key}={vals:?} would hide what the daemon watches"
            );
        }
    }
}

#[test]
fn example_config_is_every_field_at_its_default() {
    let text = std::fs::read_to_string(packaging("config.toml")).expect("packaging/config.toml");
    // Uncomment `#key = value` lines (not prose comments).
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest)
                if rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| !k.contains(' ')) =>
            {
                rest
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let parsed = Config::parse(&uncommented, Path::new("packaging/config.toml"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parsed,
        Config::default(),
        "a value differs from its default"
    );
    let keys = |t: &str| -> BTreeSet<String> {
        let mut section = String::new();
        let mut out = BTreeSet::new();
        for l in t.lines() {
            if let Some(s) = l.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = s.to_string();
            } else if !l.starts_with('#')
                && let Some((k, _)) = l.split_once(" = ")
            {
                // Comments stay (the [[notify]] example is prose: an array
                // of tables has no default to uncomment).
                out.insert(format!("{section}.{k}"));
            }
        }
        out
    };
    assert_eq!(
        keys(&uncommented),
        keys(&Config::default().to_toml()),
        "the example must list every field"
    );
    // As shipped, everything is commented out.
    assert_eq!(
        Config::parse(&text, Path::new("packaging/config.toml")).expect("parses"),
        Config::default()
    );
}

/// A request/response loop on a connected UDP socket: ARGS host port
/// secs; prints the replies per second as a JSON list.
const UDP_LOOP: &str = "import socket,sys,time,json
s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(2)
s.connect((sys.argv[1],int(sys.argv[2])))
t0=time.monotonic(); per=[]
while time.monotonic()-t0<float(sys.argv[3]):
    s.send(b'x'*32); s.recv(100)
    i=int(time.monotonic()-t0)
    while len(per)<=i: per.append(0)
    per[i]+=1
print(json.dumps(per))";

#[test]
fn daemon_runs_with_only_the_units_capabilities() {
    const WHAT: &str = "service";
    if !can_drop_caps(WHAT) {
        return;
    }
    let caps = unit_caps();
    let mut svc = Service::start("ready", &caps);
    let pid = svc.child.pid();
    let took = match svc.wait_notify("READY=1", READY_BOUND) {
        Ok(t) => t,
        Err(status) => {
            skip_or_fail(
                WHAT,
                &format!(
                    "daemon exited ({status}) before READY=1:\n{}",
                    svc.log.join("\n")
                ),
            );
            return;
        }
    };
    println!("READY=1 after {took:?} with only {caps:?}");

    // setpriv execs the daemon: the child is the daemon, and it holds
    // exactly the unit's capabilities, no more.
    let want = cap_mask(&caps);
    for field in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:"] {
        assert_eq!(
            proc_caps(pid, field),
            want,
            "{field} of the daemon is not the unit's set {caps:?}"
        );
    }

    // The socket is claimed as configured: mode and group (the chown that
    // needs CAP_CHOWN).
    let meta = std::fs::metadata(&svc.socket).expect("socket exists");
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), svc.group_gid, "socket not given to the group");

    // Every signal works with these capabilities alone: each hook loaded
    // and attached (the always-on ones now, the on-demand ones when a
    // process is suspect), none lost for want of a capability, nothing
    // degraded. (The number of hooks is `daemon.rs`'s to pin.)
    let status = svc.json(&["status"]);
    assert!(
        status["always_on"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{status}"
    );
    let signals = status["signals"].as_array().expect("signals");
    assert!(!signals.is_empty(), "{status}");
    for s in signals {
        assert!(
            s["available"] == true && s["problems"].as_array().is_some_and(Vec::is_empty),
            "signal {} not fully available with only {caps:?}: {s}",
            s["name"]
        );
    }
    assert_eq!(status["degraded"], serde_json::json!([]), "{status}");
    assert_eq!(status["pid"], pid, "{status}");

    // A storm is seen and recorded with these capabilities alone.
    let port = closed_port(false).to_string();
    let storm = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["storm", "--addr", &port, "--secs", "3"])
            .stdout(Stdio::null()),
    );
    let storm_pid = storm.pid();
    let start = Instant::now();
    let incident = loop {
        let list = svc.json(&["incidents"]);
        if let Some(i) = list.as_array().and_then(|a| {
            a.iter()
                .find(|i| i["pid"] == storm_pid && i["destination"] == port)
        }) {
            break i.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no incident for pid {storm_pid} → {port} within 20 s: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "incident {} listed {:?} after the storm started",
        incident["id"],
        start.elapsed()
    );
    assert!(
        incident["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("inc-")),
        "{incident}"
    );
    storm.finish(Duration::from_secs(30));

    // Enforcement too: a manual budget attaches the connect hooks and the
    // kernel denies beyond it, with these capabilities alone.
    let server = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dest = server.local_addr().expect("addr").to_string();
    let client = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["budgeted", "--addr", &dest, "--secs", "3", "--rate", "200"])
            .args(["--deny-errno", &libc::EHOSTUNREACH.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    let b = svc.json(&[
        "throttle",
        "--pid",
        &client.pid().to_string(),
        "--dest",
        &dest,
        "--rate",
        "10/s",
        "--for",
        "1m",
        "--errno",
        "EHOSTUNREACH",
    ]);
    assert_eq!(b["mode"], "enforce", "{b}");
    let out: serde_json::Value =
        serde_json::from_str(client.finish(Duration::from_secs(30)).trim()).expect("client JSON");
    let denied: u64 = out["denied"]
        .as_array()
        .expect("denied")
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    println!(
        "with only the unit's capabilities, a 10/s budget denied {denied} of a 200/s client's connects"
    );
    assert!(denied > 100, "the budget denied nothing: {out}");
    drop(server);

    // Slowing too: a request/response UDP loop over a veth made for the
    // test gets a manual budget; the daemon puts its htb qdisc on the
    // host end (`tc`, CAP_NET_ADMIN, AF_NETLINK) and the loop slows.
    let link = Link::create("svc", 3);
    let (_echo, echo_port) = link.server(&["udp-echo", "--bind", &link.peer_ip]);
    let udp = ChildGuard::spawn(
        Command::new("python3")
            .args(["-c", UDP_LOOP, &link.peer_ip, &echo_port.to_string(), "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
    );
    std::thread::sleep(Duration::from_secs(1));
    let b = svc.json(&[
        "throttle",
        "--pid",
        &udp.pid().to_string(),
        "--dest",
        &format!("{}:{echo_port}", link.peer_ip),
        "--rate",
        "20/s",
        "--for",
        "1m",
    ]);
    std::thread::sleep(Duration::from_secs(2));
    let shaped = link.root_qdisc();
    let enforce = svc.json(&["status"])["enforce"].clone();
    let view = svc.json(&["throttles"]);
    println!("status enforce: {enforce}\nthrottles: {view}");
    let per_s: Vec<u64> =
        serde_json::from_str(udp.finish(Duration::from_secs(30)).trim()).expect("loop JSON");
    println!(
        "with only the unit's capabilities, a UDP loop under --rate 20/s: {per_s:?}/s; {shaped}"
    );
    assert!(
        shaped.contains("htb 5347: root"),
        "no qdisc: {shaped}\n{}",
        svc.log.join("\n")
    );
    assert!(per_s[0] > 200, "the loop was not a storm: {per_s:?}");
    assert!(per_s[3] <= 40, "not slowed: {per_s:?}");
    let udp_budget = view
        .as_array()
        .and_then(|a| a.iter().find(|x| x["id"] == b["id"]))
        .expect("the UDP budget listed");
    assert!(
        udp_budget["slowed"].as_u64().is_some_and(|n| n > 0),
        "{udp_budget}"
    );
    // The qdisc goes with the last budget.
    svc.json(&["release", "--all"]);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        link.root_qdisc().contains(" 0: root"),
        "qdisc left after release: {}",
        link.root_qdisc()
    );

    // SIGTERM, as systemctl stop sends: STOPPING=1, exit 0, socket gone.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    match svc.wait_notify("STOPPING=1", Duration::from_secs(10)) {
        Ok(t) => println!("STOPPING=1 {t:?} after SIGTERM"),
        Err(status) => panic!(
            "daemon exited ({status}) without STOPPING=1:\n{}",
            svc.log.join("\n")
        ),
    }
    let status = svc.wait_exit(Duration::from_secs(20));
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {status}\n{}",
        svc.log.join("\n")
    );
    assert!(!svc.socket.exists(), "socket left behind");
}

#[test]
fn each_capability_of_the_unit_is_needed() {
    const WHAT: &str = "service_fewer_caps";
    if !can_drop_caps(WHAT) {
        return;
    }
    let caps = unit_caps();
    for dropped in &caps {
        let mut fewer = caps.clone();
        fewer.remove(dropped);
        let tag = format!("without-{}", dropped.to_ascii_lowercase());
        let mut svc = Service::start(&tag, &fewer);
        if let Some(c) = FOR_STACKS.iter().find(|c| c.name == *dropped) {
            // Only call stacks need it: the daemon runs, and says what
            // it cannot do (status `degraded`, and the log).
            if let Err(status) = svc.wait_notify("READY=1", READY_BOUND) {
                panic!(
                    "exited ({status}) without {dropped}:\n{}",
                    svc.log.join("\n")
                );
            }
            // (status is refreshed once a second.)
            let mut degraded = String::new();
            for _ in 0..30 {
                degraded = svc.json(&["status"])["degraded"].to_string();
                if degraded != "[]" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            println!("without {dropped}: degraded {degraded}");
            assert!(
                degraded.contains(&format!("without {}", c.name)),
                "{dropped} not named: {degraded}"
            );
            continue;
        }
        let status = match svc.wait_notify("READY=1", READY_BOUND) {
            Ok(t) => panic!(
                "READY=1 after {t:?} without {dropped}: the unit grants a capability it does not need"
            ),
            Err(status) => status,
        };
        let log = svc.log.join("\n");
        println!(
            "without {dropped}: {status}: {}",
            svc.log.last().map_or("", |l| l)
        );
        assert!(!status.success(), "without {dropped}: {status}\n{log}");
        if let Some(c) = REQUIRED.iter().find(|c| c.name == *dropped) {
            // The daemon's own check: exit 2 and the capability named.
            assert_eq!(status.code(), Some(2), "without {dropped}:\n{log}");
            assert!(
                log.contains(&format!("missing capabilities: {}", c.name)),
                "{dropped} not named:\n{log}"
            );
            // The socket was bound before the load failed; it is removed
            // on the way out.
            assert!(!svc.socket.exists(), "socket left behind without {dropped}");
        }
        // (Without CAP_CHOWN the socket is already bound when the chown
        // fails, and stays: the next start removes it as stale, and under
        // systemd the RuntimeDirectory goes with the failed unit.)
    }
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Some(analyze) = systemd_analyze("systemd_analyze_verify") else {
        return;
    };
    // verify checks that ExecStart's binary exists and is executable, and
    // /usr/bin/stormguard is only there once installed: check a copy that
    // starts this build's binary instead, nothing else changed.
    let dir = TempDir::new("verify");
    let text = std::fs::read_to_string(packaging("stormguard.service")).expect("unit");
    let exec = "ExecStart=/usr/bin/stormguard ";
    assert!(text.contains(exec), "ExecStart moved");
    let copy = dir.0.join("stormguard.service");
    std::fs::write(
        &copy,
        text.replace(exec, &format!("ExecStart={} ", stormguard_bin().display())),
    )
    .expect("write copy");
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("systemd-analyze verify: {}{stderr}", out.status);
    assert!(out.status.success(), "verify failed:\n{stderr}");
    // Unknown keys and bad values are only warnings (exit 0) with the file
    // named; other units' complaints on this host are not ours.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("stormguard.service"))
        .collect();
    assert!(
        ours.is_empty(),
        "warnings about the unit:\n{}",
        ours.join("\n")
    );
}

/// A systemd time span as the unit writes them: `30s`, `10min`, `500ms`.
fn timespan(v: &str) -> Duration {
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("time span {v:?}"));
    match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(60 * n),
        _ => panic!("time span {v:?}: unit {unit:?} not handled here"),
    }
}

/// The one value of `[Unit] key`, failing if absent or repeated.
fn unit_key<'a>(unit: &'a Unit, key: &str) -> &'a str {
    match unit.get("Unit").and_then(|s| s.get(key)).map(Vec::as_slice) {
        Some([v]) => v,
        other => panic!("[Unit] {key}= must be set exactly once, found {other:?}"),
    }
}

#[test]
fn unit_restarts_a_daemon_that_died_or_stalled_after_ready() {
    let unit = shipped_unit();
    // Any end after READY=1 is restarted (the daemon survives its runtime
    // errors; whatever still ends it is a crash, a signal or the watchdog).
    assert_eq!(service(&unit, "Restart"), "always");
    assert_eq!(service(&unit, "RestartSec"), "5s");
    // Except the environment errors found before READY=1: exit 2, which a
    // restart cannot fix. That is the daemon's own exit code for them.
    assert_eq!(service(&unit, "RestartPreventExitStatus"), "2");
    assert_eq!(EXIT_ENVIRONMENT, 2);
    // A stalled service loop (no WATCHDOG=1 for 30 s) is killed and
    // restarted; the loop pings every 15 s from its 100-ms tick.
    assert_eq!(service(&unit, "WatchdogSec"), "30s");
    // A crash loop ends: the start limit belongs in [Unit] (systemd only
    // reads it there since v230), and it must catch a daemon that dies at
    // once: StartLimitBurst restarts RestartSec apart fit in the interval.
    assert_eq!(unit_key(&unit, "StartLimitIntervalSec"), "10min");
    assert_eq!(unit_key(&unit, "StartLimitBurst"), "5");
    for key in ["StartLimitIntervalSec", "StartLimitBurst"] {
        assert!(
            !unit.get("Service").is_some_and(|s| s.contains_key(key)),
            "{key}= belongs in [Unit]"
        );
    }
    let burst: u32 = unit_key(&unit, "StartLimitBurst").parse().expect("number");
    assert!(
        timespan(service(&unit, "RestartSec")) * burst
            < timespan(unit_key(&unit, "StartLimitIntervalSec")),
        "a crash loop would never reach the start limit"
    );
    // The stop path fits the daemon's own: SIGTERM closes incidents within
    // TimeoutStopSec (also the SIGABRT → SIGKILL delay of a watchdog kill).
    assert_eq!(service(&unit, "TimeoutStopSec"), "30s");
}

/// systemd-analyze, or None (after saying so) where systemd is not
/// installed. Under `CI` it must be: `cargo xtask test` installs it.
fn systemd_analyze(what: &str) -> Option<PathBuf> {
    let found = on_path("systemd-analyze");
    if found.is_none() {
        assert!(
            !ebpf_required(),
            "{what}: systemd-analyze is not installed and this run requires it \
             (Debian: apt-get install systemd; `cargo xtask test` does)"
        );
        println!("SKIPPED {what}: systemd-analyze not installed");
    }
    found
}

/// The daemon pings systemd's watchdog about every WATCHDOG_USEC/2 after
/// READY=1; frozen (SIGSTOP), it stops, for longer than WATCHDOG_USEC —
/// so systemd would kill it — and resumes on SIGCONT.
#[test]
fn watchdog_pings_stop_while_the_daemon_is_frozen() {
    const WHAT: &str = "service_watchdog";
    if !can_drop_caps(WHAT) {
        return;
    }
    let timeout = Duration::from_secs(2);
    let mut svc = Service::start_with("watchdog", &unit_caps(), Some(timeout));
    let pid = svc.child.pid();
    match svc.wait_notify("READY=1", READY_BOUND) {
        Ok(t) => println!("READY=1 after {t:?}, WATCHDOG_USEC={}", timeout.as_micros()),
        Err(status) => {
            skip_or_fail(
                WHAT,
                &format!(
                    "daemon exited ({status}) before READY=1:\n{}",
                    svc.log.join("\n")
                ),
            );
            return;
        }
    }

    // Running: a ping about every second, never a gap systemd would kill
    // for (the window's ends count as gaps too).
    let window = Duration::from_secs(6);
    let running_start = Instant::now();
    let pings = svc.pings_during(running_start, window);
    let gaps = |pings: &[Duration], window: Duration| -> Vec<Duration> {
        let mut edges = vec![Duration::ZERO];
        edges.extend_from_slice(pings);
        edges.push(window);
        edges.windows(2).map(|w| w[1] - w[0]).collect()
    };
    let running = gaps(&pings, window);
    println!("running: {} pings in {window:?} at {pings:?}", pings.len());
    assert!(
        (4..=8).contains(&pings.len()),
        "{} pings in {window:?}, about 6 expected (every {:?}): {pings:?}",
        pings.len(),
        timeout / 2
    );
    let between = &running[1..running.len() - 1];
    assert!(
        between
            .iter()
            .all(|g| *g >= Duration::from_millis(500) && *g < timeout),
        "gaps between pings {between:?}: about {:?} expected",
        timeout / 2
    );
    assert!(
        running.iter().all(|g| *g < timeout),
        "a gap of WATCHDOG_USEC or more while running: {running:?}"
    );
    let last_running_ping = running_start + *pings.last().expect("pings");

    // Frozen: SIGSTOP, as a wedged loop would look to systemd.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let start = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .expect("stat")
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
    {
        assert!(start.elapsed() < Duration::from_secs(5), "not stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A ping sent before the stop may still be queued: not a sign of life.
    let mut buf = [0u8; 4096];
    let mut queued = 0;
    while svc.notify.recv(&mut buf).is_ok() {
        queued += 1;
    }
    let frozen_window = timeout + Duration::from_secs(1);
    let frozen = svc.pings_during(Instant::now(), frozen_window);
    println!(
        "frozen: {} pings in {frozen_window:?} ({queued} queued before the stop)",
        frozen.len()
    );
    assert!(frozen.is_empty(), "a stopped daemon pinged: {frozen:?}");

    // Thawed: pings resume at once (the first tick finds one overdue).
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let resumed = svc
        .wait_notify("WATCHDOG=1", Duration::from_secs(3))
        .unwrap_or_else(|status| panic!("daemon exited ({status}):\n{}", svc.log.join("\n")));
    let silent = last_running_ping.elapsed();
    println!("thawed: first ping {resumed:?} after SIGCONT; no ping for {silent:?}");
    assert!(
        silent > timeout,
        "silence of {silent:?} would not trip a {timeout:?} watchdog"
    );
    let after = svc.pings_during(Instant::now(), window);
    println!("after: {} pings in {window:?} at {after:?}", after.len());
    assert!(
        gaps(&after, window).iter().all(|g| *g < timeout) && after.len() >= 4,
        "pings did not resume every {:?}: {after:?}",
        timeout / 2
    );

    // Still a clean stop: STOPPING=1, exit 0.
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    if let Err(status) = svc.wait_notify("STOPPING=1", Duration::from_secs(10)) {
        panic!(
            "exited ({status}) without STOPPING=1:\n{}",
            svc.log.join("\n")
        );
    }
    let status = svc.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status}\n{}", svc.log.join("\n"));
}

/// `Overall exposure level for NAME: 2.8 OK …` from `systemd-analyze
/// security --offline=true FILE`, and the whole output.
fn exposure(analyze: &Path, file: &Path) -> (f64, String) {
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(file)
        .output()
        .expect("run systemd-analyze");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze security: {}\n{text}",
        out.status
    );
    let name = file.file_name().expect("name").to_string_lossy();
    let prefix = format!("Overall exposure level for {name}:");
    let level = text
        .lines()
        .find_map(|l| l.split_once(&prefix))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix:?} in:\n{text}"));
    (level, text)
}

#[test]
fn systemd_analyze_security_exposure_is_at_most_4() {
    let Some(analyze) = systemd_analyze("systemd_analyze_security") else {
        return;
    };
    let unit = packaging("stormguard.service");
    let (level, text) = exposure(&analyze, &unit);
    println!("systemd-analyze security --offline=true: exposure {level}");
    assert!(level <= 4.0, "exposure {level} > 4.0:\n{text}");
    // The same reading of an unhardened unit is high: the number parsed is
    // the one that moves with the sandboxing.
    let dir = TempDir::new("security");
    let bare = dir.0.join("stormguard.service");
    std::fs::write(
        &bare,
        "[Service]\nType=notify\nExecStart=/usr/bin/stormguard daemon\n",
    )
    .expect("write bare unit");
    let (bare_level, _) = exposure(&analyze, &bare);
    println!("an unhardened unit: exposure {bare_level}");
    assert!(bare_level > 9.0, "unhardened unit scored {bare_level}");
}
