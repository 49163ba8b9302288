//! What a storm burns: CPU and resident memory of the storming processes
//! while the storm lasts, beside the host's CPU at the same time, read
//! from /proc once a second. This answers "CPU spiked and nothing linked it
//! to a process".
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Most processes read per sample (a group incident lists many).
pub const PIDS_PER_SAMPLE: usize = 256;

/// An incident's cost, kept as it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cost {
    /// CPU of the storming processes in the last second, in cores (1.0 =
    /// one core busy all the time).
    pub cpu_cores: f64,
    pub peak_cpu_cores: f64,
    /// Their resident memory, summed.
    pub rss_bytes: u64,
    pub peak_rss_bytes: u64,
    /// The whole host's CPU in the same second: busy share of all CPUs
    /// (0–1), and how many CPUs that is of.
    pub host_cpu: f64,
    pub peak_host_cpu: f64,
    pub host_cpus: u32,
}

impl Cost {
    /// One line for people.
    pub fn summary(&self) -> String {
        format!(
            "CPU {:.2} cores (peak {:.2}), RSS {} (peak {}); host CPU {:.0}% of {} cores (peak {:.0}%)",
            self.cpu_cores,
            self.peak_cpu_cores,
            mib(self.rss_bytes),
            mib(self.peak_rss_bytes),
            100.0 * self.host_cpu,
            self.host_cpus,
            100.0 * self.peak_host_cpu
        )
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// Fields of /proc/PID/stat from the state on (index 0 is field 3): the
/// command name before them may hold spaces and parentheses.
fn stat_fields(proc: &str, pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("{proc}/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|v| v.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU ticks and resident pages of one process (utime + stime: fields
/// 14, 15; rss: field 24).
fn read_pid(proc: &str, pid: u32) -> Option<(u64, u64)> {
    let f = stat_fields(proc, pid)?;
    Some((f.get(11)? + f.get(12)?, *f.get(21)?))
}

/// CPU ticks of the children a process has reaped (cutime + cstime:
/// fields 16, 17): where the CPU of a shell loop's short-lived clients
/// goes once each has exited.
fn read_reaped(proc: &str, pid: u32) -> Option<u64> {
    let f = stat_fields(proc, pid)?;
    Some(f.get(13)? + f.get(14)?)
}

/// CPU (µs) and memory (bytes) of a cgroup v2 directory.
fn read_cgroup(dir: &std::path::Path) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
    let usec = stat
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec "))?
        .trim()
        .parse()
        .ok()?;
    let mem = std::fs::read_to_string(dir.join("memory.current"))
        .ok()
        .and_then(|m| m.trim().parse().ok())
        .unwrap_or(0);
    Some((usec, mem))
}

/// (busy, total) jiffies of all CPUs, and how many CPUs, from /proc/stat.
fn read_host(proc: &str) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("{proc}/stat")).ok()?;
    let mut lines = stat.lines();
    let all: Vec<u64> = lines
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = all.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = all.get(3).copied().unwrap_or(0) + all.get(4).copied().unwrap_or(0);
    let cpus = lines.filter(|l| l.starts_with("cpu")).count() as u32;
    Some((total.saturating_sub(idle), total, cpus.max(1)))
}

/// Samples CPU and memory; keeps the previous reading of each process to
/// turn tick counters into rates.
pub struct CostMeter {
    proc: String,
    ticks_per_s: f64,
    page: u64,
    prev: HashMap<u32, (u64, u64)>,
    /// Cores each process used in its last measured second.
    last_cpu: HashMap<u32, f64>,
    /// Previous reaped-children ticks of parents, and cgroup CPU (µs).
    reaped_prev: HashMap<u32, (u64, u64)>,
    cgroup_prev: HashMap<String, (u64, u64)>,
    /// Where cgroup v2 is mounted (None: cgroup incidents use their
    /// processes, as groups of processes do).
    cgroup_root: Option<std::path::PathBuf>,
    host_prev: Option<(u64, u64)>,
    host: (f64, u32),
}

impl Default for CostMeter {
    fn default() -> Self {
        Self::new("/proc")
    }
}

impl CostMeter {
    pub fn new(proc: &str) -> Self {
        // SAFETY: sysconf has no preconditions.
        let (hz, page) = unsafe {
            (
                libc::sysconf(libc::_SC_CLK_TCK),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        CostMeter {
            proc: proc.into(),
            ticks_per_s: if hz > 0 { hz as f64 } else { 100.0 },
            page: if page > 0 { page as u64 } else { 4096 },
            prev: HashMap::new(),
            last_cpu: HashMap::new(),
            reaped_prev: HashMap::new(),
            cgroup_prev: HashMap::new(),
            cgroup_root: std::fs::read_to_string("/proc/mounts")
                .ok()
                .and_then(|m| crate::kernel::find_cgroup2(&m)),
            host_prev: None,
            host: (0.0, 1),
        }
    }

    /// Starts a sample at `now_ns`: reads the host's CPU; forgets
    /// processes not read in the last sample.
    pub fn begin(&mut self, now_ns: u64) {
        self.prev
            .retain(|_, (_, at)| now_ns.saturating_sub(*at) < 5_000_000_000);
        let prev = &self.prev;
        self.last_cpu.retain(|pid, _| prev.contains_key(pid));
        self.reaped_prev
            .retain(|_, (_, at)| now_ns.saturating_sub(*at) < 5_000_000_000);
        self.cgroup_prev
            .retain(|_, (_, at)| now_ns.saturating_sub(*at) < 5_000_000_000);
        if let Some((busy, total, cpus)) = read_host(&self.proc) {
            if let Some((b0, t0)) = self.host_prev {
                let dt = total.saturating_sub(t0);
                if dt > 0 {
                    self.host = (busy.saturating_sub(b0) as f64 / dt as f64, cpus);
                }
            }
            self.host_prev = Some((busy, total));
        }
    }

    /// CPU (cores, since the last reading of each) and RSS (bytes) of
    /// `pids` summed; a process read for the first time counts RSS only.
    pub fn measure(&mut self, pids: &[u32], now_ns: u64) -> (f64, u64) {
        let mut cpu = 0.0;
        let mut rss = 0;
        for &pid in pids.iter().take(PIDS_PER_SAMPLE) {
            let Some((ticks, pages)) = read_pid(&self.proc, pid) else {
                self.prev.remove(&pid);
                continue;
            };
            rss += pages * self.page;
            if let Some((t0, at)) = self.prev.get(&pid) {
                let secs = now_ns.saturating_sub(*at) as f64 / 1e9;
                if secs > 0.0 {
                    let c = ticks.saturating_sub(*t0) as f64 / self.ticks_per_s / secs;
                    self.last_cpu.insert(pid, c);
                    cpu += c;
                }
            }
            self.prev.insert(pid, (ticks, now_ns));
        }
        (cpu, rss)
    }

    /// Cores the children `ppid` reaped since its last reading used (0 on
    /// the first): a parent incident's processes that have exited.
    pub fn measure_reaped(&mut self, ppid: u32, now_ns: u64) -> f64 {
        let Some(ticks) = read_reaped(&self.proc, ppid) else {
            self.reaped_prev.remove(&ppid);
            return 0.0;
        };
        let cores = match self.reaped_prev.get(&ppid) {
            Some((t0, at)) if now_ns > *at => {
                ticks.saturating_sub(*t0) as f64 / self.ticks_per_s / ((now_ns - at) as f64 / 1e9)
            }
            _ => 0.0,
        };
        self.reaped_prev.insert(ppid, (ticks, now_ns));
        cores
    }

    /// CPU (cores) and memory (bytes) of the cgroup at `path` (as
    /// /proc/PID/cgroup names it), every process in it, exited ones
    /// included; None for the root cgroup (that is the host) or when it
    /// cannot be read.
    pub fn measure_cgroup(&mut self, path: &str, now_ns: u64) -> Option<(f64, u64)> {
        let rel = path.trim_start_matches('/');
        if rel.is_empty() {
            return None;
        }
        let (usec, mem) = read_cgroup(&self.cgroup_root.as_ref()?.join(rel))?;
        let cores = match self.cgroup_prev.get(path) {
            Some((u0, at)) if now_ns > *at => {
                usec.saturating_sub(*u0) as f64 / 1e6 / ((now_ns - at) as f64 / 1e9)
            }
            _ => 0.0,
        };
        self.cgroup_prev.insert(path.to_string(), (usec, now_ns));
        Some((cores, mem))
    }

    /// The host's busy share of all CPUs in the last sample (0–1).
    pub fn host_cpu(&self) -> f64 {
        self.host.0
    }

    /// Cores `pid` used in its last measured second (storming processes
    /// only: the others are not measured).
    pub fn cpu_of(&self, pid: u32) -> Option<f64> {
        self.last_cpu.get(&pid).copied()
    }

    /// Updates `cost` with a new measurement and the host's CPU.
    pub fn apply(&self, cost: &mut Cost, (cpu, rss): (f64, u64)) {
        cost.cpu_cores = cpu;
        cost.peak_cpu_cores = cost.peak_cpu_cores.max(cpu);
        cost.rss_bytes = rss;
        cost.peak_rss_bytes = cost.peak_rss_bytes.max(rss);
        cost.host_cpu = self.host.0;
        cost.peak_host_cpu = cost.peak_host_cpu.max(self.host.0);
        cost.host_cpus = self.host.1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_process_of_ours_is_measured_in_cores_and_bytes() {
        let mut m = CostMeter::default();
        let me = std::process::id();
        let t0 = crate::kernel::monotonic_ns();
        m.begin(t0);
        let (_, rss) = m.measure(&[me], t0);
        assert!(rss > 1 << 20, "{rss}");
        // Burn ~0.3 s of CPU.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 300 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let t1 = crate::kernel::monotonic_ns();
        m.begin(t1);
        let (cpu, _) = m.measure(&[me], t1);
        assert!(cpu > 0.3 && cpu < 4.0, "{cpu} cores");
        let mut c = Cost::default();
        m.apply(&mut c, (cpu, rss));
        // /proc/stat lists the online CPUs.
        // SAFETY: sysconf has no preconditions.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as u32;
        assert_eq!(c.host_cpus, online, "{c:?}");
        // This process alone was busy ~0.3 s of the ~0.3 s.
        assert!(c.host_cpu > 0.0, "{c:?}");
        assert!(c.summary().contains("cores"));
    }

    #[test]
    fn a_command_with_spaces_and_parens_is_parsed() {
        let dir = std::env::temp_dir().join(format!("sg-cost-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("7")).unwrap();
        // Fields from the state on (index 0 is field 3).
        let mut fields = vec!["0"; 50];
        fields[0] = "S";
        fields[11] = "150";
        fields[12] = "50";
        fields[21] = "1000";
        std::fs::write(
            dir.join("7/stat"),
            format!("7 (a (b) c) {}\n", fields[..].join(" ")),
        )
        .unwrap();
        assert_eq!(read_pid(dir.to_str().unwrap(), 7), Some((200, 1000)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
