//! Capability checks before anything is loaded, so a missing one is named
//! instead of surfacing as an EPERM from deep inside the loader.
use std::fs;

use super::KernelError;

/// A capability the sensors need, with the reason shown to the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
    pub why: &'static str,
}

pub const CAP_NET_ADMIN: Capability = Capability {
    name: "CAP_NET_ADMIN",
    bit: 12,
    why: "attach the cgroup connect/sendmsg hooks",
};
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: Capability = Capability {
    name: "CAP_PERFMON",
    bit: 38,
    why: "attach tracepoints and read kernel memory from them",
};
pub const CAP_BPF: Capability = Capability {
    name: "CAP_BPF",
    bit: 39,
    why: "load eBPF programs and create maps",
};

pub const REQUIRED: [Capability; 3] = [CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN];

/// Capabilities that only call stacks need: without them the daemon runs,
/// says so, and shows raw addresses where it cannot read a process.
pub const FOR_STACKS: [Capability; 2] = [
    Capability {
        name: "CAP_SYS_PTRACE",
        bit: 19,
        why: "read /proc/<pid>/maps of other users' and more privileged processes (call stacks are not symbolized there)",
    },
    Capability {
        name: "CAP_CHECKPOINT_RESTORE",
        bit: 40,
        why: "read binaries deleted since they started, or in another mount namespace, through /proc/<pid>/map_files (their frames are not symbolized)",
    },
];

/// Which of [`FOR_STACKS`] this process lacks (CAP_SYS_ADMIN stands in for
/// CAP_CHECKPOINT_RESTORE, not for CAP_SYS_PTRACE).
pub fn missing_for_stacks() -> Vec<Capability> {
    let mask = fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| effective(&s))
        .unwrap_or(0);
    let has = |bit: u32| mask & (1u64 << bit) != 0;
    FOR_STACKS
        .iter()
        .copied()
        .filter(|c| !(has(c.bit) || (c.bit == 40 && has(CAP_SYS_ADMIN))))
        .collect()
}

/// The effective capability mask from a /proc/PID/status text.
pub fn effective(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Which required capabilities the mask lacks. The kernel accepts
/// CAP_SYS_ADMIN in place of each of them (bpf_capable, perfmon_capable,
/// bpf_net_capable), so a process holding it lacks nothing.
pub fn missing(mask: u64) -> Vec<Capability> {
    let has = |bit: u32| mask & (1u64 << bit) != 0;
    if has(CAP_SYS_ADMIN) {
        return Vec::new();
    }
    REQUIRED.iter().copied().filter(|c| !has(c.bit)).collect()
}

/// Fails with every missing capability named.
pub fn check() -> Result<(), KernelError> {
    let status = fs::read_to_string("/proc/self/status").map_err(|cause| KernelError::Read {
        path: "/proc/self/status".into(),
        cause,
    })?;
    let mask = effective(&status).unwrap_or(0);
    let missing = missing(mask);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingCapabilities(missing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_mask() {
        let s = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective(s), Some(0x1ff_ffff_ffff));
    }

    #[test]
    fn names_each_missing_capability() {
        assert!(missing(u64::MAX).is_empty());
        assert_eq!(missing(0), REQUIRED.to_vec());
        let only_net = 1 << CAP_NET_ADMIN.bit;
        assert_eq!(missing(only_net), vec![CAP_BPF, CAP_PERFMON]);
        assert!(missing(1 << CAP_SYS_ADMIN).is_empty());
    }
}
