//! The enforcement object in the kernel: loaded at the first budget,
//! its connect hooks attached at the cgroup v2 root while any budget
//! exists and detached when the last one goes. Links are owned by this
//! process, so however it ends, the kernel drops them: enforcement fails
//! open.
use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr,
        cgroup_skb::CgroupSkbLinkId, cgroup_sock_addr::CgroupSockAddrLinkId,
    },
};
use detector_common::enforce::{
    Budget, BudgetKey, Counters, EnforceConfig, MAX_BUDGETS, SockNote, shape,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stormguard-enforce"));

/// The sock_addr hooks, in attach order: connects are decided there, and
/// the sockets they (and unconnected UDP sends) open are noted.
const HOOKS: [(&str, &str); 4] = [
    ("sg_enforce_connect4", "cgroup/connect4"),
    ("sg_enforce_connect6", "cgroup/connect6"),
    ("sg_enforce_sendmsg4", "cgroup/sendmsg4"),
    ("sg_enforce_sendmsg6", "cgroup/sendmsg6"),
];

/// The egress hook: counts a governed socket's requests and steers them
/// into their budget's qdisc class.
const EGRESS: (&str, &str) = ("sg_enforce_egress", "cgroup_skb/egress");

/// A kernel step of enforcement failed.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("loading the enforcement programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{program} ({hook}): {cause}")]
    Program {
        program: &'static str,
        hook: &'static str,
        cause: aya::programs::ProgramError,
    },
    #[error("map {map}: {cause}")]
    Map {
        map: &'static str,
        cause: aya::maps::MapError,
    },
    #[error("counting CPUs: {0}")]
    Cpus(std::io::Error),
    #[error("opening the cgroup root {path}: {cause}")]
    Cgroup {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A delete of a key that is not there: aya 0.14 reports the kernel's
/// ENOENT as a syscall error, not as `KeyNotFound`.
fn is_absent(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// A program of the object by name, as its type.
fn program_of<'a, P>(
    ebpf: &'a mut Ebpf,
    program: &'static str,
    hook: &'static str,
) -> Result<&'a mut P, KernelError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(program)
        .ok_or(aya::programs::ProgramError::NotLoaded)
        .and_then(|p| p.try_into())
        .map_err(|cause| KernelError::Program {
            program,
            hook,
            cause,
        })
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |cause| KernelError::Map { map, cause }
}

/// The loaded object and, while attached, its links.
pub struct Programs {
    ebpf: Ebpf,
    cgroup_root: PathBuf,
    links: Vec<(&'static str, CgroupSockAddrLinkId)>,
    egress: Option<CgroupSkbLinkId>,
}

impl Programs {
    /// Loads (verifies) the programs; attaches nothing.
    pub fn load(cgroup_root: &Path) -> Result<Self, KernelError> {
        let mut ebpf = EbpfLoader::new().load(OBJECT)?;
        for (program, hook) in HOOKS {
            let p: &mut CgroupSockAddr = program_of(&mut ebpf, program, hook)?;
            p.load().map_err(|cause| KernelError::Program {
                program,
                hook,
                cause,
            })?;
        }
        let (program, hook) = EGRESS;
        let err = |cause| KernelError::Program {
            program,
            hook,
            cause,
        };
        let p: &mut CgroupSkb = program_of(&mut ebpf, program, hook)?;
        p.load().map_err(err)?;
        Ok(Programs {
            ebpf,
            cgroup_root: cgroup_root.to_path_buf(),
            links: Vec::new(),
            egress: None,
        })
    }

    pub fn attached(&self) -> bool {
        !self.links.is_empty() || self.egress.is_some()
    }

    /// Attaches the connect hooks at the cgroup root; all or none.
    pub fn attach(&mut self) -> Result<(), KernelError> {
        if self.attached() {
            return Ok(());
        }
        for (program, hook) in HOOKS {
            let dir =
                std::fs::File::open(&self.cgroup_root).map_err(|cause| KernelError::Cgroup {
                    path: self.cgroup_root.clone(),
                    cause,
                })?;
            let p: &mut CgroupSockAddr = program_of(&mut self.ebpf, program, hook)?;
            match p.attach(dir, CgroupAttachMode::Single) {
                Ok(link) => self.links.push((program, link)),
                Err(cause) => {
                    self.detach();
                    return Err(KernelError::Program {
                        program,
                        hook,
                        cause,
                    });
                }
            }
        }
        let (program, hook) = EGRESS;
        let dir = std::fs::File::open(&self.cgroup_root).map_err(|cause| KernelError::Cgroup {
            path: self.cgroup_root.clone(),
            cause,
        });
        let attached = dir.and_then(|dir| {
            let err = |cause| KernelError::Program {
                program,
                hook,
                cause,
            };
            let p: &mut CgroupSkb = program_of(&mut self.ebpf, program, hook)?;
            p.attach(dir, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                .map_err(err)
        });
        match attached {
            Ok(link) => {
                self.egress = Some(link);
                Ok(())
            }
            Err(e) => {
                self.detach();
                Err(e)
            }
        }
    }

    /// Detaches every hook; errors are logged (the link goes with the
    /// object anyway).
    pub fn detach(&mut self) {
        if let Some(link) = self.egress.take() {
            let detached = self
                .ebpf
                .program_mut(EGRESS.0)
                .and_then(|p| <&mut CgroupSkb>::try_from(p).ok())
                .map(|p| p.detach(link));
            if let Some(Err(e)) = detached {
                tracing::warn!(program = EGRESS.0, error = %e, "detaching an enforcement hook");
            }
        }
        for (program, link) in self.links.drain(..) {
            let detached = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut CgroupSockAddr>::try_from(p).ok())
                .map(|p| p.detach(link));
            if let Some(Err(e)) = detached {
                tracing::warn!(program, error = %e, "detaching an enforcement hook");
            }
        }
    }

    /// A map of the object by name (the names are this file's own).
    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, KernelError> {
        self.ebpf
            .map_mut(name)
            .ok_or(aya::maps::MapError::InvalidName { name: name.into() })
            .map_err(map_err(name))
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, KernelError> {
        self.ebpf
            .map(name)
            .ok_or(aya::maps::MapError::InvalidName { name: name.into() })
            .map_err(map_err(name))
    }

    fn budgets(&mut self) -> Result<HashMap<&mut MapData, BudgetKey, Budget>, KernelError> {
        let m = self.map_mut("BUDGETS")?;
        HashMap::try_from(m).map_err(map_err("BUDGETS"))
    }

    pub fn put(&mut self, key: &BudgetKey, budget: &Budget) -> Result<(), KernelError> {
        self.budgets()?
            .insert(key, budget, 0)
            .map_err(map_err("BUDGETS"))
    }

    pub fn remove(&mut self, key: &BudgetKey) -> Result<(), KernelError> {
        match self.budgets()?.remove(key) {
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err("BUDGETS")(e)),
        }
    }

    /// Notes a socket already open when its budget began (found by
    /// cookie from user space) as governed by the budget at `key`.
    pub fn note_socket(&mut self, cookie: u64, note: &SockNote) -> Result<(), KernelError> {
        let m = self.map_mut("SOCK_BUDGET")?;
        let mut h: HashMap<&mut MapData, u64, SockNote> =
            HashMap::try_from(m).map_err(map_err("SOCK_BUDGET"))?;
        h.insert(cookie, note, 0).map_err(map_err("SOCK_BUDGET"))
    }

    fn devices(&mut self) -> Result<HashMap<&mut MapData, u32, u32>, KernelError> {
        let m = self.map_mut("SLOW_DEVICES")?;
        HashMap::try_from(m).map_err(map_err("SLOW_DEVICES"))
    }

    /// Egress devices governed packets left through that have no qdisc yet.
    pub fn wanted_devices(&mut self) -> Result<Vec<u32>, KernelError> {
        let devices = self.devices()?;
        let mut out = Vec::new();
        for item in devices.iter() {
            let (ifindex, state) = item.map_err(map_err("SLOW_DEVICES"))?;
            if state == shape::WANTED {
                out.push(ifindex);
            }
        }
        Ok(out)
    }

    /// Tells the egress hook that `ifindex` has the qdisc and every
    /// budget's class: its packets may be steered now.
    pub fn device_ready(&mut self, ifindex: u32) -> Result<(), KernelError> {
        self.devices()?
            .insert(ifindex, shape::READY, 0)
            .map_err(map_err("SLOW_DEVICES"))
    }

    /// Forgets every device (their qdiscs are gone): nothing is steered
    /// until the daemon has put a qdisc back.
    pub fn forget_devices(&mut self) -> Result<(), KernelError> {
        let mut devices = self.devices()?;
        let keys: Vec<u32> = devices.keys().filter_map(Result::ok).collect();
        for k in keys {
            match devices.remove(&k) {
                Ok(()) => {}
                Err(e) if is_absent(&e) => {}
                Err(e) => return Err(map_err("SLOW_DEVICES")(e)),
            }
        }
        Ok(())
    }

    /// Which key shapes exist and who is never throttled.
    pub fn configure(&mut self, config: &EnforceConfig) -> Result<(), KernelError> {
        let m = self.map_mut("ENFORCE_CONFIG")?;
        let mut a: Array<&mut MapData, EnforceConfig> =
            Array::try_from(m).map_err(map_err("ENFORCE_CONFIG"))?;
        a.set(0, config, 0).map_err(map_err("ENFORCE_CONFIG"))
    }

    /// A slot's decisions, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<Counters, KernelError> {
        if slot >= MAX_BUDGETS {
            return Ok(Counters::default());
        }
        let m = self.map("COUNTERS")?;
        let a: PerCpuArray<&MapData, Counters> =
            PerCpuArray::try_from(m).map_err(map_err("COUNTERS"))?;
        let per_cpu = a.get(&slot, 0).map_err(map_err("COUNTERS"))?;
        Ok(per_cpu.iter().fold(Counters::default(), |acc, c| Counters {
            allowed: acc.allowed + c.allowed,
            slowed: acc.slowed + c.slowed,
            denied: acc.denied + c.denied,
            expired: acc.expired + c.expired,
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        }))
    }

    /// Zeroes a slot's counters on every CPU, for a budget taking it over.
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), KernelError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| KernelError::Cpus(e))?;
        let m = self.map_mut("COUNTERS")?;
        let mut a: PerCpuArray<&mut MapData, Counters> =
            PerCpuArray::try_from(m).map_err(map_err("COUNTERS"))?;
        let zero = aya::maps::PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(KernelError::Cpus)?;
        a.set(slot, zero, 0).map_err(map_err("COUNTERS"))
    }
}

/// The network namespace cookie of this process (`SO_NETNS_COOKIE`,
/// Linux 5.14): the egress hook steers only sockets of this namespace,
/// whose devices the daemon can shape.
pub fn own_netns_cookie() -> std::io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a live socket; a u64 of the size given.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

impl Drop for Programs {
    fn drop(&mut self) {
        self.detach();
    }
}
