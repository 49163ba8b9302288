//! The benchmark floor: minimal programs (one per-CPU counter increment)
//! on the same hooks as the sensors, loaded from the same object. `cargo
//! xtask bench` measures them to separate what the kernel charges for any
//! program on a hook from what stormguard's own logic adds. Not used by the
//! daemon; nothing is pinned, so the kernel detaches everything when the
//! holder exits.
use std::fs::File;

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, RawTracePoint},
};
use detector_common::Offsets;

use super::{KernelError, caps, find_cgroup2, program, tracefs, tracefs::Tracepoint};

/// How a floor program attaches.
#[derive(Debug, Clone, Copy)]
enum Hook {
    Tracepoint(Tracepoint),
    /// Attach type from the program's section name; shown as given here.
    Cgroup(&'static str),
    /// A `cgroup_sock` program (`cgroup/sock_release`), likewise.
    CgroupSock(&'static str),
    RawSysEnter,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Hook::Tracepoint(tp) => write!(f, "{tp}"),
            Hook::Cgroup(name) | Hook::CgroupSock(name) => f.write_str(name),
            // Named as the sensors name it, so the bench can match lists.
            Hook::RawSysEnter => write!(f, "{}", tracefs::SYS_ENTER),
        }
    }
}

/// Floor programs in slot order (the slot is the index here; it must match
/// the constants in `detector-ebpf/src/probes/floor.rs`), and whether each
/// belongs to the on-demand set. The test below keeps it covering every
/// hook the sensors attach.
const FLOOR_PROGRAMS: [(&str, Hook, bool); 16] = [
    (
        "floor_set_state",
        Hook::Tracepoint(tracefs::SET_STATE),
        false,
    ),
    (
        "floor_error_report",
        Hook::Tracepoint(tracefs::ERROR_REPORT),
        false,
    ),
    (
        "floor_recv_reset",
        Hook::Tracepoint(tracefs::RECEIVE_RESET),
        false,
    ),
    (
        "floor_retransmit",
        Hook::Tracepoint(tracefs::RETRANSMIT),
        false,
    ),
    (
        "floor_udp_send",
        Hook::Tracepoint(tracefs::SEND_LENGTH),
        false,
    ),
    ("floor_fork", Hook::Tracepoint(tracefs::FORK), false),
    ("floor_exec", Hook::Tracepoint(tracefs::EXEC), false),
    ("floor_exit", Hook::Tracepoint(tracefs::EXIT), false),
    ("floor_connect4", Hook::Cgroup("cgroup/connect4"), false),
    ("floor_connect6", Hook::Cgroup("cgroup/connect6"), false),
    ("floor_sendmsg4", Hook::Cgroup("cgroup/sendmsg4"), false),
    ("floor_sendmsg6", Hook::Cgroup("cgroup/sendmsg6"), false),
    ("floor_sys_enter", Hook::RawSysEnter, true),
    (
        "floor_exit_connect",
        Hook::Tracepoint(tracefs::EXIT_CONNECT),
        true,
    ),
    (
        "floor_recv_length",
        Hook::Tracepoint(tracefs::RECV_LENGTH),
        false,
    ),
    (
        "floor_sock_release",
        Hook::CgroupSock("cgroup/sock_release"),
        false,
    ),
];

/// Attached floor programs. Dropping it detaches and unloads them.
pub struct FloorProbes {
    ebpf: Ebpf,
    /// Whether the on-demand floor programs are attached too.
    on_demand: bool,
    /// Hooks attached, in slot order, for the ready line.
    pub attached: Vec<String>,
}

/// Loads the sensors' object and attaches only the floor programs: the
/// always-on set, plus the on-demand set (`raw_syscalls:sys_enter` and
/// `syscalls:sys_exit_connect`) when `on_demand_too`. Nothing stays
/// attached on error.
pub fn load(on_demand_too: bool) -> Result<FloorProbes, KernelError> {
    caps::check()?;
    let tracefs_root = tracefs::mount_point()?;
    // The floor programs read no fields, but the object is shared with the
    // sensors and is loaded the same way, so a kernel the sensors reject is
    // rejected here too instead of producing a floor nobody could use.
    let (offsets, _gaps): (Offsets, _) = tracefs::Formats::new(&tracefs_root).offsets()?;
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|cause| KernelError::Read {
        path: "/proc/mounts".into(),
        cause,
    })?;
    let cgroup = find_cgroup2(&mounts).ok_or(KernelError::NoCgroup2)?;

    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &offsets, true)
        .load(super::OBJECT)?;
    let mut attached = Vec::new();
    for (name, hook, on_demand) in FLOOR_PROGRAMS {
        if on_demand && !on_demand_too {
            continue;
        }
        let err = |cause| KernelError::Program {
            program: name,
            hook: hook.to_string(),
            cause,
        };
        match hook {
            Hook::Tracepoint(tp) => {
                let prog = super::tracepoint(&mut ebpf, name)?;
                prog.load().map_err(err)?;
                prog.attach(tp.category, tp.name).map_err(err)?;
            }
            Hook::Cgroup(_) => {
                let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
                prog.load().map_err(err)?;
                let dir = open_dir(&cgroup)?;
                // aya 0.14 attaches with bpf_link_create, which rejects the
                // other modes' flags; links are multi-attach anyway.
                prog.attach(dir, CgroupAttachMode::Single).map_err(err)?;
            }
            Hook::CgroupSock(_) => {
                let prog: &mut CgroupSock = program(&mut ebpf, name)?;
                prog.load().map_err(err)?;
                let dir = open_dir(&cgroup)?;
                prog.attach(dir, CgroupAttachMode::Single).map_err(err)?;
            }
            Hook::RawSysEnter => {
                let prog: &mut RawTracePoint = program(&mut ebpf, name)?;
                prog.load().map_err(err)?;
                prog.attach(tracefs::SYS_ENTER.name).map_err(err)?;
            }
        }
        attached.push(hook.to_string());
    }
    Ok(FloorProbes {
        ebpf,
        on_demand: on_demand_too,
        attached,
    })
}

impl FloorProbes {
    /// Hits per attached hook so far, summed over CPUs: proof that the
    /// floor really ran on the workload it was measured with.
    pub fn hits(&self) -> Result<Vec<(String, u64)>, KernelError> {
        let map_err = |cause| KernelError::Map {
            name: "FLOOR_HITS",
            cause,
        };
        let map = self
            .ebpf
            .map("FLOOR_HITS")
            .ok_or(KernelError::NoMap("FLOOR_HITS"))?;
        let hits: PerCpuArray<_, u64> = PerCpuArray::try_from(map).map_err(map_err)?;
        let mut out = Vec::new();
        for (slot, (_, hook, on_demand)) in FLOOR_PROGRAMS.iter().enumerate() {
            if *on_demand && !self.on_demand {
                continue;
            }
            let per_cpu = hits.get(&(slot as u32), 0).map_err(map_err)?;
            out.push((hook.to_string(), per_cpu.iter().sum()));
        }
        Ok(out)
    }
}

/// The cgroup2 root, opened to attach a cgroup hook to.
fn open_dir(path: &std::path::Path) -> Result<File, KernelError> {
    File::open(path).map_err(|cause| KernelError::Read {
        path: path.to_path_buf(),
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sensor hook without a floor program would make the bench compare
    /// stormguard against a floor that skips part of its work.
    #[test]
    fn the_floor_covers_every_sensor_hook_and_nothing_else() {
        let floor = |on_demand: bool| -> Vec<String> {
            let mut v: Vec<String> = FLOOR_PROGRAMS
                .iter()
                .filter(|p| p.2 == on_demand)
                .map(|p| p.1.to_string())
                .collect();
            v.sort();
            v
        };
        let mut always_on: Vec<String> = super::super::ALWAYS_ON_TRACEPOINTS
            .iter()
            .map(|(_, tp)| tp.to_string())
            .chain(
                super::super::CGROUP_HOOKS
                    .iter()
                    .map(|(_, h)| h.to_string()),
            )
            .collect();
        always_on.sort();
        let mut on_demand = super::super::Sensors::on_demand_hooks().to_vec();
        on_demand.sort();
        assert_eq!(floor(false), always_on);
        assert_eq!(floor(true), on_demand);
    }
}
