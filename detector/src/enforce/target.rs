//! From what a caller names (a pid, a cgroup path, a systemd unit) to the
//! kernel's scope and id, refusing what must never be throttled: PID 1,
//! kernel threads, stormguard itself, sshd, systemd's own units, and the
//! configured allowlist. Each refusal is one line that says why.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use detector_common::enforce::scope;

use super::{
    config::Allowlist,
    request::{EnforceError, TargetSpec},
    table::Target,
};

/// `PF_KTHREAD` in /proc/PID/stat's flags.
const PF_KTHREAD: u64 = 0x0020_0000;

/// What the rules look at, for the host this runs on.
pub struct Host<'a> {
    /// The cgroup v2 mount point.
    pub cgroup_root: &'a Path,
    /// /proc, or a fixture.
    pub proc_root: &'a Path,
    pub self_pid: u32,
    pub allow: &'a Allowlist,
}

/// A process as the rules see it.
#[derive(Debug, Default)]
struct Proc {
    comm: String,
    exe: Option<String>,
    uid: Option<u32>,
    ppid: u32,
    flags: u64,
    start_time: u64,
    /// The cgroup v2 path (`/system.slice/nginx.service`).
    cgroup: String,
}

fn read_proc(proc_root: &Path, pid: u32) -> Option<Proc> {
    let dir = proc_root.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    // comm may hold spaces and parentheses: the fields start after the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    // fields[0] is state (field 3): ppid is field 4, flags 9, starttime 22.
    let num = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let uid = std::fs::read_to_string(dir.join("status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next()?.parse().ok())
        });
    let cgroup = std::fs::read_to_string(dir.join("cgroup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .unwrap_or_default();
    Some(Proc {
        comm,
        exe: std::fs::read_link(dir.join("exe"))
            .ok()
            .map(|p| p.display().to_string()),
        uid,
        ppid: num(1)? as u32,
        flags: num(6)?,
        start_time: num(19)?,
        cgroup,
    })
}

/// The start time of a process (clock ticks since boot), to tell a pid
/// reused since from the process a budget was for.
pub fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    read_proc(proc_root, pid).map(|p| p.start_time)
}

/// Why a cgroup path may not be throttled, if it may not. `group`: the
/// whole cgroup is the target (not one process in it), so the root, a
/// slice and a group holding stormguard are refused too.
fn protected_cgroup(path: &str, host: &Host<'_>, group: bool) -> Option<String> {
    let norm = format!("/{}", path.trim_matches('/'));
    if group && norm == "/" {
        return Some("the root cgroup holds every process on the host".into());
    }
    for part in norm.split('/').filter(|p| !p.is_empty()) {
        if part == "init.scope" {
            return Some(format!("{norm} is systemd's own (init.scope, PID 1)"));
        }
        if part.starts_with("systemd-") {
            return Some(format!("{norm} is systemd's own unit `{part}`"));
        }
        if ["sshd.service", "ssh.service"].contains(&part) || part.starts_with("sshd@") {
            return Some(format!(
                "{norm} is sshd (`{part}`): remote access must keep working"
            ));
        }
        if host.allow.unit.iter().any(|u| u == part) {
            return Some(format!("unit `{part}` is in [enforce.allow] unit"));
        }
    }
    if let Some(last) = norm.rsplit('/').next()
        && group
        && last.ends_with(".slice")
    {
        return Some(format!(
            "{norm} is a slice of many units; throttle one unit or process in it"
        ));
    }
    for c in &host.allow.cgroup {
        let c = format!("/{}", c.trim_matches('/'));
        if norm == c || norm.starts_with(&format!("{c}/")) {
            return Some(format!("{norm} is below {c}, in [enforce.allow] cgroup"));
        }
    }
    // A group holding stormguard itself: it would throttle its own API.
    if group
        && let Some(own) = read_proc(host.proc_root, host.self_pid).map(|p| p.cgroup)
        && (own == norm || own.starts_with(&format!("{norm}/")))
    {
        return Some(format!("{norm} holds stormguard itself"));
    }
    None
}

/// Why a process may not be throttled, if it may not.
fn protected_process(pid: u32, p: &Proc, host: &Host<'_>) -> Option<String> {
    if pid == 1 {
        return Some("PID 1 is the init system".into());
    }
    if pid == host.self_pid {
        return Some(format!("pid {pid} is stormguard itself"));
    }
    if p.flags & PF_KTHREAD != 0 || p.ppid == 2 || pid == 2 {
        return Some(format!("pid {pid} ({}) is a kernel thread", p.comm));
    }
    let exe_base = p
        .exe
        .as_deref()
        .and_then(|e| e.rsplit('/').next())
        .unwrap_or("");
    if p.comm == "sshd" || p.comm.starts_with("sshd-") || exe_base == "sshd" {
        return Some(format!(
            "pid {pid} ({}) is sshd: remote access must keep working",
            p.comm
        ));
    }
    if p.comm == "systemd" || p.comm.starts_with("systemd-") || p.comm.starts_with("(sd-") {
        return Some(format!("pid {pid} ({}) is part of systemd", p.comm));
    }
    let allow = host.allow;
    if allow.comm.contains(&p.comm) {
        return Some(format!("pid {pid} ({}) is in [enforce.allow] comm", p.comm));
    }
    if let Some(exe) = &p.exe
        && allow.exe.iter().any(|e| e == exe)
    {
        return Some(format!("pid {pid} ({exe}) is in [enforce.allow] exe"));
    }
    if let Some(uid) = p.uid
        && allow.uid.contains(&uid)
    {
        return Some(format!(
            "pid {pid} runs as uid {uid}, in [enforce.allow] uid"
        ));
    }
    protected_cgroup(&p.cgroup, host, false).map(|why| format!("pid {pid} ({}): {why}", p.comm))
}

/// The cgroup directory of a systemd unit: the first directory of that
/// name under the cgroup root, breadth first, at most 4 levels down
/// (`/system.slice/x.service`, `/user.slice/user-1000.slice/user@1000.service/app.slice/x.service`).
fn unit_dir(root: &Path, unit: &str) -> Option<PathBuf> {
    let mut level = vec![root.to_path_buf()];
    for _ in 0..5 {
        let mut next = Vec::new();
        for dir in level {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if e.file_name() == unit {
                    return Some(e.path());
                }
                next.push(e.path());
            }
        }
        level = next;
    }
    None
}

/// A cgroup directory as a path relative to the root, `/`-led.
fn relative(root: &Path, dir: &Path) -> String {
    format!(
        "/{}",
        dir.strip_prefix(root)
            .unwrap_or(dir)
            .display()
            .to_string()
            .trim_matches('/')
    )
}

/// Resolves a target, refusing a protected one.
pub fn resolve(spec: &TargetSpec, host: &Host<'_>) -> Result<Target, EnforceError> {
    match spec {
        TargetSpec::Pid(pid) => {
            let p = read_proc(host.proc_root, *pid).ok_or_else(|| {
                EnforceError::NotFound(format!(
                    "no process with pid {pid}; `stormguard top` lists the busy ones"
                ))
            })?;
            if let Some(why) = protected_process(*pid, &p, host) {
                return Err(EnforceError::Protected(format!(
                    "{why}; it is never throttled"
                )));
            }
            Ok(Target {
                spec: spec.clone(),
                scope: scope::PROCESS,
                id: *pid as u64,
                label: format!("pid {pid} ({})", p.comm),
                start_time: Some(p.start_time),
            })
        }
        TargetSpec::Cgroup(path) => {
            if path.split('/').any(|c| c == "..") {
                return Err(EnforceError::Invalid(format!(
                    "cgroup `{path}`: `..` is not allowed; give the path below {}",
                    host.cgroup_root.display()
                )));
            }
            let rel = path.trim_start_matches(&*host.cgroup_root.display().to_string());
            let dir = host.cgroup_root.join(rel.trim_start_matches('/'));
            cgroup_target(
                spec,
                &dir,
                host,
                format!("cgroup {}", relative(host.cgroup_root, &dir)),
            )
        }
        TargetSpec::Unit(unit) => {
            if unit.is_empty() || unit.contains('/') {
                return Err(EnforceError::Invalid(format!(
                    "`{unit}` is not a unit name (like nginx.service)"
                )));
            }
            let dir = unit_dir(host.cgroup_root, unit).ok_or_else(|| {
                EnforceError::NotFound(format!(
                    "no running unit `{unit}`: no cgroup of that name under {}",
                    host.cgroup_root.display()
                ))
            })?;
            cgroup_target(spec, &dir, host, format!("unit {unit}"))
        }
    }
}

fn cgroup_target(
    spec: &TargetSpec,
    dir: &Path,
    host: &Host<'_>,
    label: String,
) -> Result<Target, EnforceError> {
    let meta = std::fs::metadata(dir)
        .ok()
        .filter(|m| m.is_dir())
        .ok_or_else(|| EnforceError::NotFound(format!("no cgroup {}", dir.display())))?;
    let rel = relative(host.cgroup_root, dir);
    if let Some(why) = protected_cgroup(&rel, host, true) {
        return Err(EnforceError::Protected(format!(
            "{why}; it is never throttled"
        )));
    }
    Ok(Target {
        spec: spec.clone(),
        scope: scope::CGROUP,
        // On cgroup v2 the id the kernel reports is the directory's inode.
        id: meta.ino(),
        label,
        start_time: None,
    })
}

/// The cgroup path of a process (for roll-up storms), when readable.
pub fn cgroup_of(proc_root: &Path, pid: u32) -> Option<String> {
    read_proc(proc_root, pid).map(|p| p.cgroup)
}

/// The path (`/a/b`) of the cgroup with this id, searched breadth first
/// at most 5 levels and 20,000 directories deep.
pub fn cgroup_path_by_id(root: &Path, id: u64) -> Option<String> {
    let mut level = vec![root.to_path_buf()];
    let mut seen = 0;
    for _ in 0..6 {
        let mut next = Vec::new();
        for dir in level {
            if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
                return Some(relative(root, &dir));
            }
            seen += 1;
            if seen > 20_000 {
                return None;
            }
            if let Ok(rd) = std::fs::read_dir(&dir) {
                next.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host<'a>(root: &'a Path, allow: &'a Allowlist) -> Host<'a> {
        Host {
            cgroup_root: root,
            proc_root: Path::new("/proc"),
            self_pid: std::process::id(),
            allow,
        }
    }

    fn refused(r: Result<Target, EnforceError>) -> String {
        match r {
            Err(EnforceError::Protected(why)) => why,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn pid_1_self_and_kernel_threads_are_refused() {
        let allow = Allowlist::default();
        let root = Path::new("/sys/fs/cgroup");
        let h = host(root, &allow);
        assert!(refused(resolve(&TargetSpec::Pid(1), &h)).contains("PID 1"));
        assert!(
            refused(resolve(&TargetSpec::Pid(std::process::id()), &h))
                .contains("stormguard itself")
        );
        assert!(refused(resolve(&TargetSpec::Pid(2), &h)).contains("kernel thread"));
        assert!(matches!(
            resolve(&TargetSpec::Pid(u32::MAX - 1), &h),
            Err(EnforceError::NotFound(_))
        ));
    }

    #[test]
    fn a_child_process_is_allowed_unless_allowlisted() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let root = Path::new("/sys/fs/cgroup");
        let allow = Allowlist::default();
        let t = resolve(&TargetSpec::Pid(pid), &host(root, &allow));
        // Our own cgroup may be protected on some hosts (a systemd-run
        // scope): only check the comm allowlist when it was allowed.
        if let Ok(t) = t {
            assert_eq!((t.scope, t.id), (scope::PROCESS, pid as u64));
            assert!(t.label.contains("sleep"), "{}", t.label);
            let allow = Allowlist {
                comm: vec!["sleep".into()],
                ..Default::default()
            };
            assert!(
                refused(resolve(&TargetSpec::Pid(pid), &host(root, &allow)))
                    .contains("[enforce.allow] comm")
            );
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn systemd_sshd_slices_and_the_root_are_refused_by_path() {
        let allow = Allowlist {
            unit: vec!["postgresql.service".into()],
            cgroup: vec!["/keep".into()],
            ..Default::default()
        };
        let h = host(Path::new("/nonexistent"), &allow);
        for (path, why) in [
            ("/", "root cgroup"),
            ("/init.scope", "init.scope"),
            ("/system.slice/systemd-journald.service", "systemd's own"),
            ("/system.slice/ssh.service", "sshd"),
            ("/system.slice", "slice"),
            ("/system.slice/postgresql.service", "[enforce.allow] unit"),
            ("/keep/app", "[enforce.allow] cgroup"),
        ] {
            let got = protected_cgroup(path, &h, true).unwrap_or_else(|| panic!("{path} allowed"));
            assert!(got.contains(why), "{path}: {got}");
        }
        assert_eq!(
            protected_cgroup("/system.slice/app.service", &h, true),
            None
        );
        assert_eq!(protected_cgroup("/keeper", &h, true), None);
        // A process in the root cgroup or a slice is judged as a process.
        assert_eq!(protected_cgroup("/", &h, false), None);
        assert_eq!(protected_cgroup("/user.slice", &h, false), None);
        assert!(protected_cgroup("/init.scope", &h, false).is_some());
    }
}
