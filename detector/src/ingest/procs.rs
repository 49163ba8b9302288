//! Who a pid is: name, parent, cgroup, executable and command line. Fed by
//! fork/exec/exit records, seeded from /proc at start-up, and completed
//! from /proc the first time a pid is shown (cheap, and only for pids that
//! touch the network).
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{Comm, Observation};

/// What is known of one process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: Option<u32>,
    pub comm: Comm,
    /// cgroup v2 path ("/system.slice/nginx.service"), if readable.
    pub cgroup: Option<String>,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: Option<u32>,
    /// Start time in clock ticks since boot (/proc/PID/stat field 22): with
    /// the pid, it names one process even after the pid is reused.
    pub start_time: Option<u64>,
    #[serde(skip)]
    details_read: bool,
    #[serde(skip)]
    exited: bool,
}

/// Processes by pid, bounded so a fork bomb cannot grow it without limit.
pub struct ProcessTable {
    proc_root: PathBuf,
    procs: HashMap<u32, ProcessInfo>,
    capacity: usize,
}

/// Parses the ppid and comm out of /proc/PID/stat ("pid (comm) state ppid …";
/// comm may contain spaces and parentheses, so split at the last ')').
pub fn parse_stat(stat: &str) -> Option<(Comm, u32)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = Comm::from(&stat[open + 1..close]);
    let mut rest = stat[close + 1..].split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((comm, ppid))
}

/// Field 22 of /proc/PID/stat: start time in clock ticks after boot.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let close = stat.rfind(')')?;
    // Fields after the comm start at field 3 (state).
    stat[close + 1..].split_whitespace().nth(19)?.parse().ok()
}

/// The systemd unit and the container id a cgroup path names, if any:
/// "/system.slice/nginx.service" → unit nginx.service;
/// ".../docker-<64 hex>.scope" or ".../cri-containerd-<id>.scope" or
/// "/docker/<id>" → that container.
pub fn unit_and_container(cgroup: &str) -> (Option<String>, Option<String>) {
    let is_id = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let mut unit = None;
    let mut container = None;
    for part in cgroup.split('/') {
        let stem = part.strip_suffix(".scope").unwrap_or(part);
        let id = stem.rsplit(['-', ':']).next().unwrap_or(stem);
        if is_id(id) {
            container = Some(id.to_string());
        } else if part.ends_with(".service") || part.ends_with(".scope") {
            unit = Some(part.to_string());
        }
    }
    (unit, container)
}

/// The cgroup v2 path from /proc/PID/cgroup (the "0::" line).
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

impl ProcessTable {
    pub fn new(proc_root: impl Into<PathBuf>, capacity: usize) -> Self {
        ProcessTable {
            proc_root: proc_root.into(),
            procs: HashMap::new(),
            capacity,
        }
    }

    /// Learns every process already running.
    pub fn scan(&mut self) {
        let Ok(dir) = fs::read_dir(&self.proc_root) else {
            return;
        };
        for entry in dir.flatten() {
            if let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok())
                && let Some(info) = self.read_stat(pid)
            {
                self.insert(info);
            }
        }
    }

    fn read_stat(&self, pid: u32) -> Option<ProcessInfo> {
        let stat = fs::read_to_string(self.proc_root.join(pid.to_string()).join("stat")).ok()?;
        let (comm, ppid) = parse_stat(&stat)?;
        Some(ProcessInfo {
            pid,
            ppid: Some(ppid),
            comm,
            ..Default::default()
        })
    }

    fn insert(&mut self, info: ProcessInfo) {
        if self.procs.len() >= self.capacity && !self.procs.contains_key(&info.pid) {
            // Forget exited ones first; if none, refuse rather than grow.
            self.reap();
            if self.procs.len() >= self.capacity {
                return;
            }
        }
        self.procs.insert(info.pid, info);
    }

    /// Follows fork, exec and exit records.
    pub fn observe(&mut self, obs: &Observation) {
        match *obs {
            Observation::Fork {
                parent,
                child,
                comm,
                ..
            } => {
                // Thread creation also arrives as a fork; a thread's entry
                // is dropped again when it exits.
                let cgroup = self.procs.get(&parent).and_then(|p| p.cgroup.clone());
                self.insert(ProcessInfo {
                    pid: child,
                    ppid: Some(parent),
                    comm,
                    cgroup,
                    ..Default::default()
                });
            }
            Observation::Exec { pid, comm, .. } => {
                let entry = self.procs.entry(pid).or_insert_with(|| ProcessInfo {
                    pid,
                    ..Default::default()
                });
                entry.comm = comm;
                entry.exe = None;
                entry.cmdline = None;
                entry.details_read = false;
            }
            Observation::Exit {
                pid,
                tid,
                group_dead,
                ..
            } => {
                if tid != pid
                    && let Some(t) = self.procs.get_mut(&tid)
                {
                    t.exited = true;
                }
                if group_dead && let Some(p) = self.procs.get_mut(&pid) {
                    p.exited = true;
                }
            }
            _ => {}
        }
    }

    /// Everything known of `pid`, reading /proc once for what is missing.
    pub fn describe(&mut self, pid: u32) -> ProcessInfo {
        if !self.procs.contains_key(&pid) {
            let info = self.read_stat(pid).unwrap_or(ProcessInfo {
                pid,
                ..Default::default()
            });
            self.insert(info.clone());
            if !self.procs.contains_key(&pid) {
                return info;
            }
        }
        let root = self.proc_root.join(pid.to_string());
        let Some(info) = self.procs.get_mut(&pid) else {
            return ProcessInfo {
                pid,
                ..Default::default()
            };
        };
        if !info.details_read && !info.exited {
            info.details_read = true;
            read_details(&root, info);
        }
        info.clone()
    }

    /// Drops processes that have exited. Called after each interval is
    /// reported, so the last interval of a short-lived process is named.
    pub fn reap(&mut self) {
        self.procs.retain(|_, p| !p.exited);
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }
}

fn read_details(root: &Path, info: &mut ProcessInfo) {
    if let Ok(text) = fs::read_to_string(root.join("cgroup"))
        && let Some(cg) = parse_cgroup(&text)
    {
        info.cgroup = Some(cg);
    }
    if let Ok(exe) = fs::read_link(root.join("exe")) {
        info.exe = Some(exe.to_string_lossy().into_owned());
    }
    if let Ok(status) = fs::read_to_string(root.join("status")) {
        info.uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok());
    }
    if let Ok(stat) = fs::read_to_string(root.join("stat")) {
        info.start_time = parse_start_time(&stat);
    }
    if let Ok(raw) = fs::read(root.join("cmdline")) {
        let args: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.is_empty() {
            info.cmdline = Some(args.join(" "));
        }
    }
    if info.ppid.is_none()
        && let Ok(stat) = fs::read_to_string(root.join("stat"))
        && let Some((comm, ppid)) = parse_stat(&stat)
    {
        info.ppid = Some(ppid);
        if info.comm == Comm::default() {
            info.comm = comm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let (comm, ppid) = parse_stat("42 (my (odd) name) S 7 42 42 0 -1").unwrap();
        assert_eq!(comm.as_str(), "my (odd) name");
        assert_eq!(ppid, 7);
    }

    #[test]
    fn start_time_unit_and_container() {
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 200";
        assert_eq!(parse_start_time(stat), Some(98765));
        assert_eq!(
            unit_and_container("/system.slice/nginx.service"),
            (Some("nginx.service".into()), None)
        );
        let id = "a".repeat(64);
        assert_eq!(
            unit_and_container(&format!("/system.slice/docker-{id}.scope")),
            (None, Some(id.clone()))
        );
        assert_eq!(
            unit_and_container(&format!(
                "/kubepods/burstable/pod1/cri-containerd-{id}.scope"
            )),
            (None, Some(id.clone()))
        );
        assert_eq!(unit_and_container("/user.slice"), (None, None));
    }

    #[test]
    fn cgroup_v2_line() {
        let text = "12:cpu:/\n0::/system.slice/app.service\n";
        assert_eq!(
            parse_cgroup(text).as_deref(),
            Some("/system.slice/app.service")
        );
        assert_eq!(parse_cgroup("3:memory:/x\n"), None);
    }

    fn fake_proc(pid: u32, comm: &str, ppid: u32) -> PathBuf {
        let root = std::env::temp_dir().join(format!("sg-proc-{}-{pid}", std::process::id()));
        let dir = root.join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("stat"), format!("{pid} ({comm}) S {ppid} 1 1")).unwrap();
        fs::write(dir.join("cgroup"), "0::/test.slice\n").unwrap();
        fs::write(dir.join("cmdline"), b"client\0--storm\0").unwrap();
        root
    }

    #[test]
    fn fork_exec_exit_and_reap() {
        let root = fake_proc(100, "shell", 1);
        let mut t = ProcessTable::new(&root, 16);
        t.scan();
        assert_eq!(t.describe(100).cgroup.as_deref(), Some("/test.slice"));
        t.observe(&Observation::Fork {
            ts_ns: 1,
            parent: 100,
            child: 101,
            comm: Comm::from("shell"),
        });
        t.observe(&Observation::Exec {
            ts_ns: 2,
            pid: 101,
            comm: Comm::from("curl"),
        });
        let child = t.describe(101);
        assert_eq!(child.ppid, Some(100));
        assert_eq!(child.comm.as_str(), "curl");
        // Inherited from the parent: the child's /proc is gone (or fake).
        assert_eq!(child.cgroup.as_deref(), Some("/test.slice"));
        t.observe(&Observation::Exit {
            ts_ns: 3,
            pid: 101,
            tid: 101,
            group_dead: true,
        });
        // Still named until the interval is reported and reaped.
        assert_eq!(t.describe(101).comm.as_str(), "curl");
        t.reap();
        assert_eq!(t.len(), 1);
        assert_eq!(t.describe(100).cmdline.as_deref(), Some("client --storm"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bounded() {
        let mut t = ProcessTable::new("/nonexistent", 2);
        for child in 1..=5 {
            t.observe(&Observation::Fork {
                ts_ns: 0,
                parent: 0,
                child,
                comm: Comm::from("x"),
            });
        }
        assert_eq!(t.len(), 2);
    }
}
