//! Enforcement: budgets the kernel holds a storm to, and the safety
//! rules around them. Downstream of detection (storm verdicts make
//! automatic budgets) and beside the API (manual budgets).
//!
//! - [`request`]: what callers ask and see; [`config`]: `[enforce]`;
//! - [`target`]: pid / cgroup / unit → kernel id, refusing protected ones;
//! - [`table`]: the budgets, pure; [`persist`]: manual ones across restarts;
//! - [`kernel`]: the enforcement object, attached only while a budget exists;
//! - [`sockets`]: sockets open before their budget, found by cookie;
//! - [`qdisc`]: the htb qdisc slowed packets wait in, journaled;
//! - [`tally`]: successes seen, the deposits of retry budgets.
pub mod config;
pub mod kernel;
pub mod persist;
pub mod qdisc;
pub mod request;
pub mod sockets;
pub mod table;
pub mod tally;
pub mod target;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Mutex,
};

use detector_common::enforce::{Counters, EnforceConfig as KernelConfig, SockNote, scope, sock};
use serde::Serialize;

pub use request::{
    BudgetView, Control, DestSpec, EnforceError, Release, TargetSpec, ThrottleRequest,
};

use self::{
    config::{EnforceConfig, Mode},
    kernel::Programs,
    qdisc::{ClassRate, Shaper},
    table::{Draft, Entry, Limit, Origin, Table},
    target::Host,
};
use crate::detect::{State, Subject, VerdictChange};

/// htb's class runs this much faster than the egress program's own
/// bucket, which counts each request allowed or slowed: the program takes
/// tokens as requests arrive and gets deposits in lumps, htb as they
/// leave, so with equal rates a paced storm's requests can look allowed
/// to the program while htb holds each back. A class a fifth faster keeps
/// the program's bucket the stricter one, so a storm held back is counted
/// slowed (and its budget kept), at the cost of a storm getting up to a
/// fifth more than its budget through.
const CLASS_MARGIN: f64 = 1.2;

/// A storm budget that held nothing back for this long may be lifted.
/// Longer than glibc's resolver timeout (5 s): a query lost while the
/// qdisc goes in stalls a DNS storm that long, and that stall is not the
/// storm's end.
const HOLD_WINDOW_NS: u64 = 6_000_000_000;

/// Successes per second of a retry budget's caller, over whole seconds:
/// its class rate follows them (deposits come every tick, in lumps).
#[derive(Debug, Clone, Copy)]
struct SuccessRate {
    count: u64,
    since_ns: u64,
    per_s: f64,
}

impl SuccessRate {
    fn new(now_ns: u64) -> Self {
        SuccessRate {
            count: 0,
            since_ns: now_ns,
            per_s: 0.0,
        }
    }

    fn add(&mut self, n: u64, now_ns: u64) {
        self.count += n;
        let elapsed = now_ns.saturating_sub(self.since_ns);
        if elapsed >= 1_000_000_000 {
            self.per_s = self.count as f64 * 1e9 / elapsed as f64;
            self.count = 0;
            self.since_ns = now_ns;
        }
    }
}

/// Wall clock, Unix ms.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Enforcement as `status` and metrics show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct EnforceSummary {
    pub mode: String,
    pub budgets: usize,
    pub max_budgets: usize,
    /// The enforcement hooks are attached (only while a budget exists).
    pub attached: bool,
    /// Decisions of every budget since start, released ones included.
    pub allowed: u64,
    pub slowed: u64,
    pub denied: u64,
    /// What dry-run budgets would have denied.
    pub would_deny: u64,
    /// What dry-run budgets would have slowed.
    #[serde(default)]
    pub would_slow: u64,
    /// Storms that got no budget: protected, UDP, or the table full.
    pub not_enforced: u64,
    /// Kernel or file errors while enforcing, survived.
    pub errors: u64,
    pub last_error: Option<String>,
    /// Devices carrying stormguard's htb qdisc now (slowing).
    #[serde(default)]
    pub shaped_devices: Vec<String>,
}

/// Every budget, its kernel object and its file.
pub struct Enforcer {
    cfg: EnforceConfig,
    table: Table,
    progs: Option<Programs>,
    cgroup_root: Option<PathBuf>,
    proc_root: PathBuf,
    self_pid: u32,
    state: Option<PathBuf>,
    default_errno: u32,
    errors: u64,
    last_error: Option<String>,
    /// Decisions of budgets already released, so totals never go back
    /// (`expired` holds dry-run denials, `packets` dry-run slowings).
    retired: Counters,
    not_enforced: u64,
    /// Storms refused an automatic budget (protected): not asked again.
    refused: HashSet<Subject>,
    /// The qdiscs slowed packets wait in.
    shaper: Shaper,
    /// This namespace's cookie (0: unknown, nothing is steered).
    netns_cookie: u64,
    /// Successes per second, by budget id: a retry budget's class rate
    /// follows them.
    success_rate: HashMap<u64, SuccessRate>,
    /// Slowed + denied of each storm budget, and when it last grew: a
    /// storm whose attempts are still held back is not over.
    held: HashMap<u64, (u64, u64)>,
    /// Storm budgets whose storm the engine called resolved: lifted at
    /// the first tick that holds nothing back.
    resolving: HashSet<u64>,
}

impl Enforcer {
    /// An enforcer with no budgets and nothing loaded. `state`: where
    /// manual budgets are kept across restarts.
    pub fn new(cfg: EnforceConfig, cgroup_root: Option<PathBuf>, state: Option<PathBuf>) -> Self {
        let default_errno = request::errno_by_name(&cfg.errno).unwrap_or(libc::ECONNREFUSED as u32);
        let netns_cookie = kernel::own_netns_cookie().unwrap_or_else(|e| {
            tracing::warn!(
                "SO_NETNS_COOKIE: {e} (Linux 5.14 or later has it): keep-alive and UDP \
                 storms are counted but not slowed"
            );
            0
        });
        let journal = state.as_ref().map(|p| p.with_file_name("qdiscs.json"));
        Enforcer {
            table: Table::new(cfg.max_budgets),
            cfg,
            progs: None,
            cgroup_root,
            proc_root: PathBuf::from("/proc"),
            self_pid: std::process::id(),
            state,
            default_errno,
            errors: 0,
            last_error: None,
            retired: Counters::default(),
            not_enforced: 0,
            refused: HashSet::new(),
            shaper: Shaper::new(journal),
            netns_cookie,
            success_rate: HashMap::new(),
            held: HashMap::new(),
            resolving: HashSet::new(),
        }
    }

    /// At start: removes qdiscs a killed daemon left (from its journal).
    pub fn undo_qdiscs(&mut self) -> Vec<String> {
        self.shaper.undo_journal()
    }

    fn kernel_config(&self) -> KernelConfig {
        KernelConfig {
            present: self.table.present(),
            self_tgid: self.self_pid,
            _pad: 0,
            netns_cookie: self.netns_cookie,
        }
    }

    pub fn mode(&self) -> Mode {
        self.cfg.mode
    }

    fn error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        self.errors += 1;
        let line = format!("{what}: {e}");
        tracing::warn!("{line}");
        self.last_error = Some(line);
    }

    fn host(&self) -> Result<Host<'_>, EnforceError> {
        let root = self.cgroup_root.as_deref().ok_or_else(|| {
            EnforceError::Kernel("no cgroup v2 hierarchy is mounted; budgets need it".into())
        })?;
        Ok(Host {
            cgroup_root: root,
            proc_root: &self.proc_root,
            self_pid: self.self_pid,
            allow: &self.cfg.allow,
        })
    }

    /// Loads (verifies) the programs at the first budget. It can take a
    /// while on a slow machine, so callers do it before stamping a new
    /// budget's times: `--for 2s` is two seconds of enforcement.
    fn ensure_loaded(&mut self) -> Result<(), kernel::KernelError> {
        if self.progs.is_none() {
            let root = self.cgroup_root.clone().unwrap_or_default();
            self.progs = Some(Programs::load(&root)?);
        }
        Ok(())
    }

    /// Loads and attaches the programs if needed, then writes `entry`.
    fn apply(&mut self, entry: &Entry) -> Result<(), kernel::KernelError> {
        self.ensure_loaded()?;
        let config = self.kernel_config();
        let progs = self.progs.as_mut().expect("loaded above");
        progs.reset_counters(entry.slot)?;
        progs.put(&entry.key(), &entry.budget())?;
        progs.configure(&config)?;
        progs.attach()?;
        self.note_open_sockets(entry);
        self.shape();
        Ok(())
    }

    /// The processes a budget's target covers now (a cgroup's, bounded).
    fn pids_of(&self, e: &Entry) -> Vec<u32> {
        if e.target.scope == scope::PROCESS {
            return vec![e.target.id as u32];
        }
        let Some(root) = self.cgroup_root.as_deref() else {
            return Vec::new();
        };
        let Some(rel) = target::cgroup_path_by_id(root, e.target.id) else {
            return Vec::new();
        };
        let mut dirs = vec![root.join(rel.trim_start_matches('/'))];
        let mut pids = Vec::new();
        while let Some(dir) = dirs.pop() {
            if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
            if pids.len() >= 1024 || dirs.len() >= 1024 {
                break;
            }
            if let Ok(rd) = std::fs::read_dir(&dir) {
                dirs.extend(
                    rd.flatten()
                        .filter(|d| d.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|d| d.path()),
                );
            }
        }
        pids.truncate(1024);
        pids
    }

    /// Sockets open before the budget began (a keep-alive connection, a
    /// connected UDP socket) are governed too: the hooks only see new
    /// ones, so they are found here by cookie (sock_diag lists only this
    /// namespace's sockets, which is what can be slowed).
    fn note_open_sockets(&mut self, e: &Entry) {
        let key = e.key();
        let mut noted = 0;
        for pid in self.pids_of(e) {
            let socks = match sockets::sockets_of(&self.proc_root, pid) {
                Ok(s) => s,
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                // /proc/PID/fd of another user's or a more privileged
                // process needs CAP_SYS_PTRACE, which the unit leaves
                // out: the sockets made in the process's cgroup towards
                // the budget's destination stand in for its own.
                Err(err) if err.kind() == std::io::ErrorKind::PermissionDenied => {
                    match self.sockets_by_cgroup(pid) {
                        Ok(s) => s,
                        Err(err) => {
                            self.error(&format!("listing the sockets of pid {pid}"), &err);
                            continue;
                        }
                    }
                }
                Err(err) => {
                    self.error(&format!("listing the sockets of pid {pid}"), &err);
                    continue;
                }
            };
            for s in socks {
                // Connected ones only: TCP_ESTABLISHED (connected UDP too).
                if s.state != 1 {
                    continue;
                }
                let dest_matches = e.dest.is_none_or(|d| {
                    d.addr == s.dst.ip() && d.port.is_none_or(|p| p == s.dst.port())
                });
                if !dest_matches {
                    continue;
                }
                let note = SockNote {
                    key,
                    sent: 0,
                    flags: sock::LOCAL_NETNS,
                };
                if let Some(p) = self.progs.as_mut() {
                    match p.note_socket(s.cookie, &note) {
                        Ok(()) => noted += 1,
                        Err(err) => self.error("noting an open socket", &err),
                    }
                }
            }
        }
        if noted > 0 {
            tracing::info!(
                id = e.id,
                sockets = noted,
                "open sockets governed by the budget"
            );
        }
    }

    /// The sockets made in `pid`'s cgroup (sock_diag's cgroup id).
    fn sockets_by_cgroup(&self, pid: u32) -> std::io::Result<Vec<sockets::SockInfo>> {
        use std::os::unix::fs::MetadataExt as _;
        let root = self.cgroup_root.as_deref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup v2 hierarchy")
        })?;
        let rel = target::cgroup_of(&self.proc_root, pid).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "no cgroup for the pid")
        })?;
        let id = std::fs::metadata(root.join(rel.trim_start_matches('/')))?.ino();
        sockets::sockets_where(|s| s.cgroup == id && s.state == 1)
    }

    /// The htb class each enforcing budget needs: the budget's rate (a
    /// retry budget's floor plus what its recent successes earn, so a
    /// healthy caller's class always has room) times [`CLASS_MARGIN`], and
    /// its burst, in bytes, from the mean size of the packets its sockets
    /// sent (100 B before any) plus an Ethernet header.
    fn class_rates(&self) -> Vec<(u32, ClassRate)> {
        self.table
            .iter()
            .filter(|e| !e.limit.dry_run)
            .map(|e| {
                let c = self.counters(e.slot);
                let packet = c.bytes.checked_div(c.packets).unwrap_or(100) + 14;
                let earned = e.limit.retry_ratio.map_or(0.0, |r| {
                    (1.0 + r) * self.success_rate.get(&e.id).map_or(0.0, |s| s.per_s)
                });
                let per_s = (e.limit.rate_per_s + earned) * CLASS_MARGIN;
                (
                    e.slot,
                    ClassRate {
                        bytes_per_s: (per_s * packet as f64).ceil() as u64,
                        burst_bytes: e.limit.burst.max(1) as u64 * packet,
                    },
                )
            })
            .collect()
    }

    /// Slowing's qdiscs follow the budgets: devices the egress hook
    /// reported get the qdisc and the classes, then are marked ready;
    /// classes follow the rates; with no budget left, the qdiscs go.
    fn shape(&mut self) {
        if self.table.is_empty() {
            if !self.shaper.devices().is_empty() {
                for note in self.shaper.teardown() {
                    tracing::warn!("slowing: {note}");
                }
            }
            if let Some(p) = self.progs.as_mut()
                && let Err(e) = p.forget_devices()
            {
                self.error("forgetting slowed devices", &e);
            }
            return;
        }
        let Some(progs) = self.progs.as_mut() else {
            return;
        };
        let wanted = match progs.wanted_devices() {
            Ok(w) => w,
            Err(e) => {
                self.error("reading slowed devices", &e);
                return;
            }
        };
        let rates = self.class_rates();
        if let Err(e) = self.shaper.set_classes(&rates) {
            self.error("slowing: updating a class", &e);
        }
        for ifindex in wanted {
            if self.shaper.is_refused(ifindex) {
                continue;
            }
            match self.shaper.ensure(ifindex, &rates) {
                Ok(()) => {
                    if let Some(p) = self.progs.as_mut()
                        && let Err(e) = p.device_ready(ifindex)
                    {
                        self.error("marking a device ready", &e);
                    }
                }
                Err(e) => self.error("slowing", &e),
            }
        }
    }

    /// Adds a budget: resolved, checked, written to the kernel — or
    /// nothing at all.
    fn add(&mut self, draft: Draft) -> Result<Entry, EnforceError> {
        let (entry, old) = self.table.insert(draft)?;
        if let Some(old) = &old {
            self.retire(old);
        }
        if let Err(e) = self.apply(&entry) {
            self.table.remove(entry.id);
            if let Some(old) = old {
                // Put back what was replaced; its bucket starts over.
                let _ = self.table.restore(old);
            }
            self.sync_kernel();
            return Err(EnforceError::Kernel(e.to_string()));
        }
        Ok(entry)
    }

    /// The kernel's present bits after a change, and detach when empty.
    fn sync_kernel(&mut self) {
        let config = self.kernel_config();
        let empty = self.table.is_empty();
        let Some(progs) = self.progs.as_mut() else {
            return;
        };
        let result = progs.configure(&config);
        if empty {
            progs.detach();
        }
        if let Err(e) = result {
            self.error("updating the enforcement config", &e);
        }
        if empty {
            self.shape();
        }
    }

    /// A slot's decisions so far; none before the programs are loaded or
    /// when the map cannot be read.
    fn counters(&self, slot: u32) -> Counters {
        self.progs
            .as_ref()
            .and_then(|p| p.counters(slot).ok())
            .unwrap_or_default()
    }

    /// Adds the decisions of a budget going away to the totals.
    fn retire(&mut self, e: &Entry) {
        let c = self.counters(e.slot);
        self.retired.allowed += c.allowed;
        if e.limit.dry_run {
            self.retired.expired += c.denied;
            self.retired.packets += c.slowed;
        } else {
            self.retired.slowed += c.slowed;
            self.retired.denied += c.denied;
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.table.remove(id)?;
        self.held.remove(&id);
        self.resolving.remove(&id);
        self.success_rate.remove(&id);
        self.retire(&e);
        if let Some(progs) = self.progs.as_mut()
            && let Err(err) = progs.remove(&e.key())
        {
            self.error("removing a budget from the kernel", &err);
        }
        Some(e)
    }

    fn save(&mut self) {
        let Some(path) = self.state.clone() else {
            return;
        };
        let manual = self
            .table
            .iter()
            .filter(|e| e.origin == Origin::Manual)
            .cloned()
            .collect::<Vec<_>>();
        if let Err(e) = persist::save(&path, manual.iter()) {
            self.error(&format!("saving budgets to {}", path.display()), &e);
        }
    }

    /// Puts back the manual budgets saved before a restart: those not
    /// expired and whose process is the same (pid and start time).
    /// Returns one line per budget dropped, for the log.
    pub fn restore(&mut self) -> Vec<String> {
        let Some(path) = self.state.clone() else {
            return Vec::new();
        };
        let saved = match persist::load(&path) {
            Ok(s) => s,
            Err(e) => {
                let aside = path.with_extension("json.bad");
                let _ = std::fs::rename(&path, &aside);
                return vec![format!(
                    "{} is not readable ({e}); moved to {} and started with no manual budgets",
                    path.display(),
                    aside.display()
                )];
            }
        };
        let (now, mono) = (now_ms(), crate::kernel::monotonic_ns());
        let mut notes = Vec::new();
        for mut e in saved {
            let left_ms = e.expires_ms - now;
            if left_ms <= 0 {
                notes.push(format!("thr-{} expired while the daemon was down", e.id));
                continue;
            }
            if e.target.scope == scope::PROCESS {
                let same = target::start_time(&self.proc_root, e.target.id as u32);
                if same.is_none() || same != e.target.start_time {
                    notes.push(format!("thr-{}: {} is gone", e.id, e.target.label));
                    continue;
                }
            }
            e.expires_ns = mono + left_ms as u64 * 1_000_000;
            let restored = self.table.restore(e.clone());
            match restored.map_err(|x| x.to_string()).and_then(|r| {
                self.apply(&r).map_err(|x| {
                    self.table.remove(r.id);
                    x.to_string()
                })
            }) {
                Ok(()) => notes.push(format!("thr-{} restored ({})", e.id, e.target.label)),
                Err(why) => notes.push(format!("thr-{} not restored: {why}", e.id)),
            }
        }
        self.sync_kernel();
        self.save();
        notes
    }

    /// A manual budget.
    pub fn throttle(&mut self, req: ThrottleRequest) -> Result<BudgetView, EnforceError> {
        if req.for_secs == 0 || req.for_secs > 7 * 86_400 {
            return Err(EnforceError::Invalid(format!(
                "--for {}s is out of range: give 1 s to 7 days",
                req.for_secs
            )));
        }
        let errno = match &req.errno {
            Some(name) => request::errno_by_name(name).map_err(EnforceError::Invalid)?,
            None => self.default_errno,
        };
        let target = target::resolve(&req.target, &self.host()?)?;
        self.ensure_loaded()
            .map_err(|e| EnforceError::Kernel(e.to_string()))?;
        let (now, mono) = (now_ms(), crate::kernel::monotonic_ns());
        let entry = self.add(Draft {
            target,
            dest: req.dest,
            limit: Limit {
                rate_per_s: req.rate_per_s,
                burst: req
                    .burst
                    .unwrap_or_else(|| (req.rate_per_s.ceil() as u32).max(1)),
                retry_ratio: req.retry_ratio,
                errno,
                dry_run: req.dry_run,
            },
            origin: Origin::Manual,
            created_ms: now,
            expires_ms: now + req.for_secs as i64 * 1000,
            expires_ns: mono + req.for_secs * 1_000_000_000,
        })?;
        tracing::info!(id = entry.id, target = %entry.target.label, "manual budget added");
        self.save();
        Ok(self.view(&entry))
    }

    /// Ends budgets.
    pub fn release(&mut self, which: Release) -> Result<Vec<String>, EnforceError> {
        let ids: Vec<u64> = match which {
            Release::All => self.table.iter().map(|e| e.id).collect(),
            Release::Id(id) => {
                if self.table.get(id).is_none() {
                    return Err(EnforceError::NotFound(format!(
                        "no budget thr-{id}; `stormguard throttles` lists them"
                    )));
                }
                vec![id]
            }
        };
        for id in &ids {
            self.remove(*id);
        }
        self.sync_kernel();
        self.save();
        Ok(ids.iter().map(|id| format!("thr-{id}")).collect())
    }

    /// Every budget with its counters.
    pub fn list(&self) -> Vec<BudgetView> {
        self.table.iter().map(|e| self.view(e)).collect()
    }

    fn view(&self, e: &Entry) -> BudgetView {
        let c = self.counters(e.slot);
        let now = now_ms();
        BudgetView {
            id: format!("thr-{}", e.id),
            origin: match e.origin {
                Origin::Manual => "manual".into(),
                Origin::Auto { .. } => "auto".into(),
            },
            target: e.target.label.clone(),
            dest: e.dest.map(|d| d.to_string()),
            kind: if e.limit.retry_ratio.is_some() {
                "retry".into()
            } else {
                "rate".into()
            },
            rate_per_s: e.limit.rate_per_s,
            burst: e.limit.burst,
            retry_ratio: e.limit.retry_ratio,
            errno: request::errno_name(e.limit.errno),
            mode: if e.limit.dry_run {
                "dry-run".into()
            } else {
                "enforce".into()
            },
            created_ms: e.created_ms,
            expires_ms: e.expires_ms,
            remaining_s: ((e.expires_ms - now).max(0) as u64).div_ceil(1000),
            allowed: c.allowed,
            slowed: c.slowed,
            denied: c.denied,
            incident: match &e.origin {
                Origin::Auto { incident, .. } => incident.clone(),
                Origin::Manual => None,
            },
        }
    }

    /// What a storm's subject is throttled as: a process towards one
    /// destination, or the cgroup of a roll-up towards it.
    fn storm_target(&self, subject: &Subject) -> Option<(TargetSpec, DestSpec)> {
        let dest = subject.dest();
        // UDP storms get a budget too: their connects are never denied,
        // their sends are slowed.
        let d = DestSpec {
            addr: dest.addr,
            port: Some(dest.port),
        };
        match *subject {
            Subject::Flow { pid, .. } => Some((TargetSpec::Pid(pid), d)),
            Subject::Parent { ppid, .. } => {
                target::cgroup_of(&self.proc_root, ppid).map(|c| (TargetSpec::Cgroup(c), d))
            }
            Subject::Cgroup { cgroup, .. } => {
                let root = self.cgroup_root.as_deref()?;
                target::cgroup_path_by_id(root, cgroup).map(|c| (TargetSpec::Cgroup(c), d))
            }
        }
    }

    /// Storms get a budget (in `enforce` and `dry-run`); resolved storms
    /// lose theirs. `incident` names the incident of a subject.
    pub fn on_changes(
        &mut self,
        changes: &[VerdictChange],
        incident: impl Fn(&Subject) -> Option<String>,
    ) {
        if self.cfg.mode == Mode::Observe {
            return;
        }
        for c in changes {
            let existing = self
                .table
                .iter()
                .find(
                    |e| matches!(&e.origin, Origin::Auto { subject, .. } if *subject == c.subject),
                )
                .map(|e| e.id);
            if c.to == State::Storm {
                if existing.is_some() || self.refused.contains(&c.subject) {
                    continue;
                }
                self.storm_budget(c, incident(&c.subject));
            } else if c.from == State::Storm
                && let Some(id) = existing
            {
                // Lifted at the next tick unless attempts are still held
                // back: slowed to below the storm rate is not resolved.
                self.resolving.insert(id);
            }
        }
    }

    fn storm_budget(&mut self, c: &VerdictChange, incident: Option<String>) {
        let Some((spec, dest)) = self.storm_target(&c.subject) else {
            self.not_enforced += 1;
            return;
        };
        let resolved = self.host().and_then(|h| target::resolve(&spec, &h));
        let target = match resolved {
            Ok(t) => t,
            Err(e) => {
                self.not_enforced += 1;
                tracing::info!(subject = ?c.subject, "storm not throttled: {e}");
                if self.refused.len() < 4096 {
                    self.refused.insert(c.subject);
                }
                return;
            }
        };
        if let Err(e) = self.ensure_loaded() {
            self.error("loading the enforcement programs", &e);
            return;
        }
        let (now, mono) = (now_ms(), crate::kernel::monotonic_ns());
        let ttl = self.cfg.ttl_secs;
        let draft = Draft {
            target,
            dest: Some(dest),
            limit: Limit {
                rate_per_s: self.cfg.floor_per_s,
                burst: self.cfg.burst,
                retry_ratio: (self.cfg.retry_ratio > 0.0).then_some(self.cfg.retry_ratio),
                errno: self.default_errno,
                dry_run: self.cfg.mode == Mode::DryRun,
            },
            origin: Origin::Auto {
                subject: c.subject,
                incident,
            },
            created_ms: now,
            expires_ms: now + ttl as i64 * 1000,
            expires_ns: mono + ttl * 1_000_000_000,
        };
        match self.add(draft) {
            Ok(e) => {
                tracing::info!(id = e.id, target = %e.target.label, dest = %dest, "storm budget added")
            }
            Err(e) => self.error("adding a storm's budget", &e),
        }
    }

    /// Once a tick: a storm's budget close to its expiry is renewed while
    /// `storming` says the storm goes on — before the kernel would let it
    /// lapse, so a storm that goes on is never let through for a moment —
    /// and budgets past their expiry end.
    pub fn tick(&mut self, now_ns: u64, storming: impl Fn(&Subject) -> bool) {
        // Which storm budgets still hold attempts back (slowed or denied
        // since the last tick): their storm goes on, whatever the engine
        // sees of the attempts that got through.
        let mut holding = HashSet::new();
        for e in self.table.iter() {
            let Origin::Auto { .. } = e.origin else {
                continue;
            };
            let c = self.counters(e.slot);
            let now_held = c.slowed + c.denied;
            // First seen: the budget has just begun, which counts as
            // holding back.
            let (last, grew_ns) = self.held.entry(e.id).or_insert((now_held, now_ns));
            if now_held > *last {
                *last = now_held;
                *grew_ns = now_ns;
            }
            if now_ns.saturating_sub(*grew_ns) < HOLD_WINDOW_NS {
                holding.insert(e.id);
            }
        }
        let lift: Vec<u64> = self
            .resolving
            .iter()
            .copied()
            .filter(|id| !holding.contains(id))
            .filter(|id| {
                self.table.get(*id).is_none_or(|e| match &e.origin {
                    Origin::Auto { subject, .. } => !storming(subject),
                    Origin::Manual => true,
                })
            })
            .collect();
        for id in lift {
            let (held, grew_ns) = self.held.get(&id).copied().unwrap_or_default();
            tracing::info!(
                id,
                held,
                quiet_ms = now_ns.saturating_sub(grew_ns) / 1_000_000,
                "storm resolved and nothing held back; its budget is lifted"
            );
            self.remove(id);
        }
        if !self.resolving.is_empty() || !holding.is_empty() {
            self.sync_kernel();
        }
        let ttl_ns = self.cfg.ttl_secs * 1_000_000_000;
        // Renew within a quarter of the TTL (at most 5 s) of the end.
        let lead = (ttl_ns / 4).min(5_000_000_000);
        let due: Vec<u64> = self
            .table
            .iter()
            .filter(|e| matches!(e.origin, Origin::Auto { .. }) && e.expires_ns <= now_ns + lead)
            .map(|e| e.id)
            .collect();
        for id in due {
            let Some(Origin::Auto { subject, .. }) = self.table.get(id).map(|e| &e.origin) else {
                continue;
            };
            if !storming(subject) && !holding.contains(&id) {
                continue;
            }
            let ttl = self.cfg.ttl_secs;
            let Some(e) = self.table.iter_mut().find(|e| e.id == id) else {
                continue;
            };
            e.expires_ns = now_ns + ttl_ns;
            e.expires_ms = now_ms() + ttl as i64 * 1000;
            let (key, budget) = (e.key(), e.budget());
            if let Some(p) = self.progs.as_mut()
                && let Err(err) = p.put(&key, &budget)
            {
                self.error("renewing a storm's budget", &err);
            }
        }
        let mut changed = false;
        for id in self.table.expired(now_ns) {
            tracing::info!(id, "budget expired");
            self.remove(id);
            changed = true;
        }
        if changed {
            self.sync_kernel();
            self.save();
        }
        self.shape();
    }

    /// Processes and cgroups whose successes retry budgets need.
    pub fn watched(&self) -> (HashSet<u32>, HashSet<u64>) {
        let mut pids = HashSet::new();
        let mut cgroups = HashSet::new();
        for e in self.table.iter().filter(|e| e.limit.retry_ratio.is_some()) {
            if e.target.scope == scope::PROCESS {
                pids.insert(e.target.id as u32);
            } else {
                cgroups.insert(e.target.id);
            }
        }
        (pids, cgroups)
    }

    /// Deposits successes into the retry budgets they belong to.
    pub fn credit(&mut self, successes: &[(tally::Key, u64)]) {
        let now_ns = crate::kernel::monotonic_ns();
        let mut updates = Vec::new();
        for e in self
            .table
            .iter_mut()
            .filter(|e| e.limit.retry_ratio.is_some())
        {
            let n: u64 = successes
                .iter()
                .filter(|(k, _)| {
                    let who = if e.target.scope == scope::PROCESS {
                        k.pid as u64 == e.target.id
                    } else {
                        k.cgroup == e.target.id
                    };
                    who && e
                        .dest
                        .is_none_or(|d| d.addr == k.addr && d.port.is_none_or(|p| p == k.port))
                })
                .map(|(_, n)| n)
                .sum();
            self.success_rate
                .entry(e.id)
                .or_insert_with(|| SuccessRate::new(now_ns))
                .add(n, now_ns);
            if n > 0 {
                e.deposit(n);
                updates.push((e.key(), e.budget()));
            }
        }
        for (key, budget) in updates {
            if let Some(p) = self.progs.as_mut()
                && let Err(err) = p.put(&key, &budget)
            {
                self.error("depositing into a retry budget", &err);
            }
        }
    }

    pub fn summary(&self) -> EnforceSummary {
        let mut s = EnforceSummary {
            mode: self.cfg.mode.as_str().into(),
            budgets: self.table.len(),
            max_budgets: self.table.max(),
            attached: self.progs.as_ref().is_some_and(Programs::attached),
            allowed: self.retired.allowed,
            slowed: self.retired.slowed,
            denied: self.retired.denied,
            would_deny: self.retired.expired,
            would_slow: self.retired.packets,
            not_enforced: self.not_enforced,
            errors: self.errors,
            last_error: self.last_error.clone(),
            shaped_devices: self.shaper.devices(),
        };
        for e in self.table.iter() {
            let c = self.counters(e.slot);
            s.allowed += c.allowed;
            if e.limit.dry_run {
                s.would_deny += c.denied;
                s.would_slow += c.slowed;
            } else {
                s.slowed += c.slowed;
                s.denied += c.denied;
            }
        }
        s
    }

    /// Detaches everything; manual budgets stay on disk for the next start.
    pub fn shutdown(&mut self) {
        if let Some(mut p) = self.progs.take() {
            p.detach();
        }
        for note in self.shaper.teardown() {
            tracing::warn!("slowing: {note}");
        }
    }

    pub fn state_path(&self) -> Option<&Path> {
        self.state.as_deref()
    }
}

/// The enforcer shared by the daemon loop and the API.
pub struct Handle(pub Mutex<Enforcer>);

impl Handle {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Enforcer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Control for Handle {
    fn throttle(&self, req: ThrottleRequest) -> Result<BudgetView, EnforceError> {
        self.lock().throttle(req)
    }

    fn release(&self, which: Release) -> Result<Vec<String>, EnforceError> {
        self.lock().release(which)
    }

    fn list(&self) -> Vec<BudgetView> {
        self.lock().list()
    }
}
