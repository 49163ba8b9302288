//! Who a pid is: name, parent, cgroup, executable and command line. Fed by
//! fork/exec/exit records, seeded from /proc at start-up, and completed
//! from /proc for pids that touch the network.
//!
//! [`ProcessTable::observe`] runs for every ring record and never touches
//! the filesystem: a pid that needs its details is queued, and the service
//! loop reads a bounded number of them per tick with
//! [`ProcessTable::resolve_pending`] — so a flood of new processes costs
//! the drain nothing. [`ProcessTable::describe`] still reads at once, for
//! callers that need the answer now (not for the hot path).
//!
//! A pid names one process only together with its start time (field 22 of
//! /proc/PID/stat): cached details are checked against it, so a reused pid
//! is read afresh instead of wearing its predecessor's name. The table is
//! bounded; when full, exited processes go first, then the least recently
//! used, and every eviction is counted.
use std::{
    collections::{HashMap, VecDeque},
    fs,
    path::{Path, PathBuf},
};

use serde::Serialize;

use super::{
    Comm, Observation,
    bounded::{TableUsage, batch, lowest},
    service::{Service, ServiceResolver},
};

/// A budget for [`ProcessTable::resolve_pending`] per 100 ms tick: 640
/// processes a second, each a handful of small /proc reads (well under a
/// millisecond per tick), ahead of what the 1 s interval rows name.
pub const READS_PER_TICK: usize = 64;

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
    /// In the queue of pids to read from /proc.
    #[serde(skip)]
    queued: bool,
    /// When last observed or described (the table's own counter): the
    /// least recently used live process is evicted first.
    #[serde(skip)]
    touched: u64,
}

/// Processes by pid, bounded so a fork bomb cannot grow it without limit.
pub struct ProcessTable {
    proc_root: PathBuf,
    procs: HashMap<u32, ProcessInfo>,
    capacity: usize,
    evictions: u64,
    /// Pids whose details are to be read, oldest first (at most `capacity`).
    pending: VecDeque<u32>,
    /// Pids dropped from a full queue before they were read.
    pending_dropped: u64,
    /// Counts observations and descriptions: the recency of `touched`.
    clock: u64,
    /// Pids still to check in the current liveness sweep.
    to_check: Vec<u32>,
    /// Cgroup path → service, cached and bounded.
    services: ServiceResolver,
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

/// What /proc/PID/stat alone tells: name, parent, start time.
fn info_from_stat(pid: u32, stat: &str) -> Option<ProcessInfo> {
    let (comm, ppid) = parse_stat(stat)?;
    Some(ProcessInfo {
        pid,
        ppid: Some(ppid),
        comm,
        start_time: parse_start_time(stat),
        ..Default::default()
    })
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
            capacity: capacity.max(1),
            evictions: 0,
            pending: VecDeque::new(),
            pending_dropped: 0,
            clock: 0,
            to_check: Vec::new(),
            services: ServiceResolver::default(),
        }
    }

    /// Where the host's `/run` and `/var/lib` are, for container runtimes'
    /// metadata (`[services] metadata_root`).
    pub fn set_metadata_root(&mut self, root: impl Into<PathBuf>) {
        self.services = ServiceResolver::new(root);
    }

    /// The service (unit, container, pod) of `pid`, from the cgroup
    /// already known — nothing is read from /proc; the runtime's metadata
    /// file once per cgroup. None when its cgroup is not known (yet).
    pub fn service_of(&mut self, pid: u32) -> Option<Service> {
        let cgroup = self.procs.get(&pid)?.cgroup.as_deref()?;
        Some(self.services.resolve(cgroup))
    }

    /// The service of the processes in cgroup `path`.
    pub fn service_in(&mut self, path: &str) -> Service {
        self.services.resolve(path)
    }

    /// Up to `budget` tracked processes that are gone from /proc although
    /// their exit was never seen — a child that exits before its parent's
    /// fork record is written arrives as a fork *after* its exit, and
    /// would stay forever. Resumes where the last call stopped; a full
    /// round covers every entry. The caller turns each into an exit
    /// observation so every table forgets it the usual way.
    pub fn sweep_dead(&mut self, budget: usize) -> Vec<u32> {
        if self.to_check.is_empty() {
            self.to_check = self
                .procs
                .iter()
                .filter(|(_, p)| !p.exited)
                .map(|(pid, _)| *pid)
                .collect();
        }
        let mut dead = Vec::new();
        for _ in 0..budget {
            let Some(pid) = self.to_check.pop() else {
                break;
            };
            if self.procs.get(&pid).is_some_and(|p| !p.exited)
                && !self.proc_root.join(pid.to_string()).exists()
            {
                dead.push(pid);
            }
        }
        dead
    }

    /// The process table and its queue of /proc reads, for status and
    /// metrics.
    pub fn tables(&self) -> Vec<TableUsage> {
        vec![
            TableUsage::new("processes", self.procs.len(), self.capacity, self.evictions),
            TableUsage::new(
                "process_reads_pending",
                self.pending.len(),
                self.capacity,
                self.pending_dropped,
            ),
            TableUsage::new(
                "services",
                self.services.len(),
                super::service::CACHE_MAX,
                self.services.evictions,
            ),
        ]
    }

    /// What is known of `pid` now, without reading anything: safe on the
    /// hot path.
    pub fn get(&self, pid: u32) -> Option<&ProcessInfo> {
        self.procs.get(&pid)
    }

    /// Pids waiting for [`ProcessTable::resolve_pending`].
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Reads the details of up to `budget` queued pids from /proc; returns
    /// how many were read. Called by the service loop at tick time, so the
    /// cost of a burst of new processes is spread over ticks instead of
    /// stalling the ring drain; a pid that exited before its turn is
    /// skipped (its /proc is gone, or already another process's).
    pub fn resolve_pending(&mut self, budget: usize) -> usize {
        let mut read = 0;
        while read < budget
            && let Some(pid) = self.pending.pop_front()
        {
            let root = self.proc_root.join(pid.to_string());
            let Some(info) = self.procs.get_mut(&pid) else {
                continue;
            };
            info.queued = false;
            if info.exited || info.details_read {
                continue;
            }
            info.details_read = true;
            read_details(&root, info);
            read += 1;
        }
        read
    }

    /// Queues a pid for its details (it touched the network).
    fn want_details(&mut self, pid: u32, comm: Comm) {
        if !self.procs.contains_key(&pid) {
            self.insert(ProcessInfo {
                pid,
                comm,
                ..Default::default()
            });
        }
        let Some(info) = self.procs.get_mut(&pid) else {
            return;
        };
        info.touched = self.clock;
        if info.details_read || info.queued || info.exited {
            return;
        }
        info.queued = true;
        if self.pending.len() >= self.capacity
            && let Some(old) = self.pending.pop_front()
        {
            self.pending_dropped += 1;
            if let Some(o) = self.procs.get_mut(&old) {
                o.queued = false;
            }
        }
        self.pending.push_back(pid);
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
        info_from_stat(pid, &stat)
    }

    fn insert(&mut self, mut info: ProcessInfo) {
        if self.procs.len() >= self.capacity && !self.procs.contains_key(&info.pid) {
            // Exited ones first, then the least recently used.
            let victims = lowest(
                self.procs.iter().map(|(p, i)| ((!i.exited, i.touched), *p)),
                batch(self.capacity),
            );
            self.evictions += victims.len() as u64;
            for p in victims {
                self.procs.remove(&p);
            }
        }
        info.touched = self.clock;
        // A queued pid replaced by another process stays queued once.
        info.queued = self.procs.get(&info.pid).is_some_and(|p| p.queued);
        self.procs.insert(info.pid, info);
    }

    /// Follows fork, exec and exit records, and queues the pids of network
    /// records for their details. Never reads /proc.
    pub fn observe(&mut self, obs: &Observation) {
        self.clock += 1;
        match *obs {
            Observation::Connect { pid, comm, .. }
            | Observation::UdpConnect { pid, comm, .. }
            | Observation::UdpSend { pid, comm, .. }
            | Observation::Exchange { pid, comm, .. } => self.want_details(pid, comm),
            Observation::Fork {
                parent,
                child,
                comm,
                ..
            } => {
                // Thread creation also arrives as a fork; a thread's entry
                // is dropped again when it exits. A pid forked again was
                // reused: its entry is replaced, nothing carries over.
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
                // An exec under a pid that exited is a new process whose
                // fork was missed: nothing of the old one carries over.
                if self.procs.get(&pid).is_none_or(|p| p.exited) {
                    self.insert(ProcessInfo {
                        pid,
                        ..Default::default()
                    });
                }
                let clock = self.clock;
                if let Some(entry) = self.procs.get_mut(&pid) {
                    entry.comm = comm;
                    entry.exe = None;
                    entry.cmdline = None;
                    entry.touched = clock;
                    // Read again (the new program) if it was worth reading.
                    let reread = entry.details_read;
                    entry.details_read = false;
                    if reread {
                        self.want_details(pid, comm);
                    }
                }
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

    /// Everything known of `pid`, reading /proc now for what is missing.
    /// Synchronous — for a caller that needs the answer at once (an
    /// incident being opened, a row being shown), never for the per-record
    /// path. For a live process it checks the start time against the
    /// cached one, so a reused pid is read afresh.
    pub fn describe(&mut self, pid: u32) -> ProcessInfo {
        self.clock += 1;
        let root = self.proc_root.join(pid.to_string());
        if self.procs.get(&pid).is_none_or(|p| !p.exited) {
            let current = fs::read_to_string(root.join("stat"))
                .ok()
                .and_then(|s| info_from_stat(pid, &s));
            let cached_start = self.procs.get(&pid).and_then(|p| p.start_time);
            let now_start = current.as_ref().and_then(|c| c.start_time);
            if let (Some(a), Some(b)) = (cached_start, now_start)
                && a != b
            {
                // Another process under the same pid.
                self.procs.remove(&pid);
            }
            if !self.procs.contains_key(&pid) {
                self.insert(current.unwrap_or(ProcessInfo {
                    pid,
                    ..Default::default()
                }));
            }
        }
        let clock = self.clock;
        let Some(info) = self.procs.get_mut(&pid) else {
            return ProcessInfo {
                pid,
                ..Default::default()
            };
        };
        info.touched = clock;
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
    fn start_time() {
        let stat = "42 (a b) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 200";
        assert_eq!(parse_start_time(stat), Some(98765));
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

    /// Writes /proc/PID under `root` for a process started at `start`
    /// (clock ticks) running `cmdline`.
    fn fake_process(root: &Path, pid: u32, start: u64, cmdline: &str) {
        let dir = root.join(pid.to_string());
        fs::create_dir_all(&dir).unwrap();
        let stat = format!(
            "{pid} (app) S 1 {pid} {pid} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 200"
        );
        fs::write(dir.join("stat"), stat).unwrap();
        fs::write(dir.join("cmdline"), cmdline.replace(' ', "\0")).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("sg-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        root
    }

    fn connect(pid: u32) -> Observation {
        crate::detect::synthetic::refused(1, pid, crate::detect::synthetic::dest(80))
    }

    #[test]
    fn observe_never_reads_proc_and_reads_are_budgeted() {
        let root = scratch("pending");
        for pid in 1..=5 {
            fake_process(&root, pid, 100 + u64::from(pid), &format!("app --n {pid}"));
        }
        let mut t = ProcessTable::new(&root, 64);
        for pid in 1..=5 {
            t.observe(&connect(pid));
            t.observe(&connect(pid));
        }
        // Known by name, nothing read yet; each pid queued once.
        assert_eq!(
            t.get(3).map(|p| p.comm.as_str().into_owned()),
            Some("client".into())
        );
        assert_eq!(t.get(3).and_then(|p| p.cmdline.clone()), None);
        assert_eq!(t.pending(), 5);
        assert_eq!(t.resolve_pending(2), 2);
        let read = |t: &ProcessTable, pid| t.get(pid).and_then(|p| p.cmdline.clone());
        assert_eq!(read(&t, 1).as_deref(), Some("app --n 1"));
        assert_eq!(read(&t, 2).as_deref(), Some("app --n 2"));
        assert_eq!(read(&t, 3), None);
        assert_eq!(t.get(2).and_then(|p| p.start_time), Some(102));
        // An exited pid is skipped without a read (its /proc is not its).
        t.observe(&Observation::Exit {
            ts_ns: 2,
            pid: 4,
            tid: 4,
            group_dead: true,
        });
        assert_eq!(t.resolve_pending(10), 2);
        assert_eq!(read(&t, 4), None);
        assert_eq!(read(&t, 5).as_deref(), Some("app --n 5"));
        assert_eq!((t.resolve_pending(10), t.pending()), (0, 0));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_reused_pid_is_read_afresh() {
        let root = scratch("reuse");
        fake_process(&root, 300, 1000, "old --serve");
        let mut t = ProcessTable::new(&root, 64);
        assert_eq!(t.describe(300).cmdline.as_deref(), Some("old --serve"));
        // Same process (same start time): the cached details stand.
        fake_process(&root, 300, 1000, "changed");
        assert_eq!(t.describe(300).cmdline.as_deref(), Some("old --serve"));
        // Another process under the pid (its exit and fork unseen).
        fake_process(&root, 300, 2000, "new --client");
        let info = t.describe(300);
        assert_eq!(info.cmdline.as_deref(), Some("new --client"));
        assert_eq!(info.start_time, Some(2000));
        // A fork of a known pid replaces it: nothing inherited.
        t.observe(&Observation::Fork {
            ts_ns: 5,
            parent: 77,
            child: 300,
            comm: Comm::from("sh"),
        });
        let info = t.get(300).unwrap();
        assert_eq!(
            (info.ppid, info.cmdline.as_deref(), info.start_time),
            (Some(77), None, None)
        );
        // An exec after an exit (fork unseen): a stranger too.
        t.observe(&Observation::Exit {
            ts_ns: 6,
            pid: 300,
            tid: 300,
            group_dead: true,
        });
        t.observe(&Observation::Exec {
            ts_ns: 7,
            pid: 300,
            comm: Comm::from("curl"),
        });
        let info = t.get(300).unwrap();
        assert_eq!((info.ppid, info.comm.as_str().as_ref()), (None, "curl"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn processes_gone_without_an_exit_are_found_by_the_sweep() {
        let root = scratch("sweep");
        fake_process(&root, 10, 1, "alive");
        let mut t = ProcessTable::new(&root, 64);
        for child in [10, 11, 12, 13] {
            t.observe(&Observation::Fork {
                ts_ns: 1,
                parent: 1,
                child,
                comm: Comm::from("x"),
            });
        }
        // 11..13 have no /proc entry: gone, their exits never seen.
        // A budget of 2 checks two entries; the next call the other two.
        let mut dead = t.sweep_dead(2);
        assert!(dead.len() <= 2, "{dead:?}");
        dead.extend(t.sweep_dead(10));
        dead.sort_unstable();
        assert_eq!(dead, vec![11, 12, 13]);
        // Once their exits are observed, the next round finds nothing.
        for pid in dead {
            t.observe(&Observation::Exit {
                ts_ns: 2,
                pid,
                tid: pid,
                group_dead: true,
            });
        }
        assert_eq!(t.sweep_dead(10), Vec::<u32>::new());
        std::fs::remove_dir_all(&root).unwrap();
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
    fn full_table_evicts_exited_then_least_recently_used() {
        let mut t = ProcessTable::new("/nonexistent", 8);
        let fork = |child| Observation::Fork {
            ts_ns: 0,
            parent: 0,
            child,
            comm: Comm::from("x"),
        };
        for child in 1..=20 {
            t.observe(&fork(child));
        }
        // Full at 8, then one eviction per new pid (batches of 1).
        assert_eq!(t.tables()[0], TableUsage::new("processes", 8, 8, 12));
        assert!(t.get(12).is_none() && t.get(13).is_some());
        // Pid 13, the least recently used, is used again; 19 exits.
        t.describe(13);
        t.observe(&Observation::Exit {
            ts_ns: 1,
            pid: 19,
            tid: 19,
            group_dead: true,
        });
        t.observe(&fork(21));
        assert!(t.get(19).is_none(), "the exited one went first");
        t.observe(&fork(22));
        assert!(t.get(14).is_none(), "then the least recently used");
        assert!(t.get(13).is_some());
        assert_eq!(t.tables()[0], TableUsage::new("processes", 8, 8, 14));
        // And it still learns new processes.
        assert_eq!(t.get(22).and_then(|p| p.ppid), Some(0));
    }
}
