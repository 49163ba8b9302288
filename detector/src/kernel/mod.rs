//! The only module that talks to aya: preflight checks, loading the kernel
//! programs with this kernel's tracepoint offsets, attaching them, and
//! reading their maps. Everything above works on decoded records.
//!
//! Fail-open by construction: nothing is pinned, so when the process exits
//! (cleanly or killed) the kernel drops every link and program.
pub mod caps;
pub mod coverage;
pub mod floor;
mod klog;
pub mod stacks;
pub mod tables;
pub mod tracefs;

use std::{collections::HashMap as StdHashMap, fs::File, path::PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, FExit, RawTracePoint, TracePoint, UProbe,
        raw_trace_point::RawTracePointLinkId,
        trace_point::TracePointLinkId,
        uprobe::{UProbeLinkId, UProbeScope},
    },
};
use detector_common::{Event, TupleKey, stat};

use aya::Btf;
use caps::Capability;
pub use coverage::Signal;
use coverage::{name, without};
pub use klog::SUSPECTS_LEFT_OUT;
pub use tables::{LoadOptions, MapUsage};

use crate::ingest::{DecodeError, Observation, decode};
use std::os::fd::{AsRawFd, RawFd};
use tracefs::Tracepoint;

/// Why the sensors could not start or stop. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The process lacks capabilities the kernel will ask for.
    #[error("missing capabilities: {}. Run as root or grant them, e.g. `setcap cap_bpf,cap_perfmon,cap_net_admin+ep $(which stormguard)`", fmt_caps(.0))]
    MissingCapabilities(Vec<Capability>),
    /// tracefs is needed to read tracepoint formats and attach to them.
    #[error("tracefs is not mounted; mount it with: mount -t tracefs tracefs /sys/kernel/tracing")]
    TracefsNotMounted,
    /// The kernel lacks a tracepoint the sensors read (optional ones are
    /// reported as gaps, not as this error).
    #[error("kernel has no tracepoint {0}")]
    MissingTracepoint(String),
    /// The kernel cannot give what connect-storm detection needs.
    #[error(
        "kernel {kernel} cannot show connect attempts to stormguard: {why}. Tested kernels: 6.1, 6.12 and 6.18 (see README, \"Kernels\"); run `stormguard doctor` for details"
    )]
    Required { kernel: String, why: String },
    /// A tracepoint lacks a field the programs read.
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    MissingField { tracepoint: String, field: String },
    /// A tracepoint field has a size the programs do not expect.
    #[error("tracepoint {tracepoint} field `{field}` is {found} bytes, expected {expected}")]
    FieldSize {
        tracepoint: String,
        field: String,
        expected: u32,
        found: u32,
    },
    /// No cgroup2 mount was found for the connect/sendmsg hooks.
    #[error(
        "no cgroup2 filesystem is mounted; mount one with: mount -t cgroup2 none /sys/fs/cgroup"
    )]
    NoCgroup2,
    /// A file the preflight reads could not be read.
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// The kernel refused the object (verifier, map creation).
    #[error("loading the eBPF object failed")]
    Load(#[from] aya::EbpfError),
    /// One program could not be loaded or attached.
    #[error("program {program} ({hook}): {cause}")]
    Program {
        program: &'static str,
        hook: String,
        cause: aya::programs::ProgramError,
    },
    /// A map is missing from the object or has an unexpected type.
    #[error("map {name}: {cause}")]
    Map {
        name: &'static str,
        cause: aya::maps::MapError,
    },
    /// A map was already taken or never built into the object.
    #[error("map {0} is not in the loaded object (already taken?)")]
    NoMap(&'static str),
}

fn fmt_caps(caps: &[Capability]) -> String {
    caps.iter()
        .map(|c| format!("{} (to {})", c.name, c.why))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The compiled kernel programs, built by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/stormguard"));

/// The always-on hooks [`Sensors::load`] attaches on a current kernel
/// (first choices; the benchmark floor must cover the same hooks).
#[cfg(test)]
const CGROUP_HOOKS: [(&str, &str); 5] = [
    ("sg_connect4", "cgroup/connect4"),
    ("sg_connect6", "cgroup/connect6"),
    ("sg_sendmsg4", "cgroup/sendmsg4"),
    ("sg_sendmsg6", "cgroup/sendmsg6"),
    ("sg_sock_release", "cgroup/sock_release"),
];

/// Always-on tracepoint programs and where they attach (first choices).
#[cfg(test)]
const ALWAYS_ON_TRACEPOINTS: [(&str, Tracepoint); 9] = [
    ("sg_set_state", tracefs::SET_STATE),
    ("sg_error_report", tracefs::ERROR_REPORT),
    ("sg_recv_reset", tracefs::RECEIVE_RESET),
    ("sg_retransmit", tracefs::RETRANSMIT),
    ("sg_send_length", tracefs::SEND_LENGTH),
    ("sg_recv_length", tracefs::RECV_LENGTH),
    ("sg_fork", tracefs::FORK),
    ("sg_exec", tracefs::EXEC),
    ("sg_exit", tracefs::EXIT),
];

/// Stand-ins for `sock:sock_send_length` before Linux 6.3: (program,
/// kernel function).
const SEND_FEXITS: [(&str, &str); 3] = [
    ("sg_tcp_sendmsg", "tcp_sendmsg"),
    ("sg_udp_sendmsg", "udp_sendmsg"),
    ("sg_udpv6_sendmsg", "udpv6_sendmsg"),
];

/// Stand-ins for `sock:sock_recv_length` before Linux 6.3.
const RECV_FEXITS: [(&str, &str); 3] = [
    ("sg_tcp_recvmsg", "tcp_recvmsg"),
    ("sg_udp_recvmsg", "udp_recvmsg"),
    ("sg_udpv6_recvmsg", "udpv6_recvmsg"),
];

/// Counters of what the kernel side lost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelStats {
    /// Records dropped because the ring buffer was full.
    pub ring_drops: u64,
    /// Inserts a bounded map refused (an attempt, a note or a child
    /// suspect not tracked); the `map_insert` kind of
    /// [`Sensors::anomalies`].
    pub map_full: u64,
}

/// On-demand links while attached.
struct OnDemand {
    sys_enter: RawTracePointLinkId,
    exit_connect: Option<TracePointLinkId>,
    /// libssl uprobes (program, link), when libssl was found.
    tls: Vec<(&'static str, UProbeLinkId)>,
}

/// The libssl uprobes: (program, symbol). SSL_read_ex shares the return
/// probe with SSL_read.
const TLS_PROBES: [(&str, &str); 6] = [
    ("sg_ssl_write", "SSL_write"),
    ("sg_ssl_write", "SSL_write_ex"),
    ("sg_ssl_read", "SSL_read"),
    ("sg_ssl_read_ex", "SSL_read_ex"),
    ("sg_ssl_read_ret", "SSL_read"),
    ("sg_ssl_read_ret", "SSL_read_ex"),
];

/// The shared libssl processes load, if this host has one: where the
/// plaintext of their TLS is (`SSL_write`/`SSL_read`).
pub fn find_libssl() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/libssl.so.3",
        "/lib/x86_64-linux-gnu/libssl.so.3",
        "/usr/lib64/libssl.so.3",
        "/usr/lib/libssl.so.3",
        "/usr/lib/aarch64-linux-gnu/libssl.so.3",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// Loaded and attached kernel sensors. Dropping it detaches everything.
pub struct Sensors {
    ebpf: Ebpf,
    on_demand: Option<OnDemand>,
    /// Suspects (pids and cgroups) left out of the kernel's maps: past
    /// their capacity, or refused by the kernel. Counted, never fatal.
    pub suspect_insert_failures: u64,
    /// The pids the last [`Sensors::set_suspects`] wrote, most severe first.
    user_suspects: Vec<u32>,
    /// Sizes and user-side counts of the bounded maps.
    tables: tables::Tables,
    /// Forwards the programs' log lines; None when it could not start.
    _log: Option<klog::KernelLog>,
    /// Signal by signal, what this kernel gives.
    signals: Vec<Signal>,
    tls_loaded: bool,
    /// The on-demand programs that loaded (an absent one is a named gap).
    sys_enter_loaded: bool,
    exit_connect_loaded: bool,
    /// Id (inode) of the cgroup v2 root, never made suspect as a whole.
    root_cgroup: Option<u64>,
    /// What the ARMED map says (see `write_armed`).
    armed_probes: bool,
    armed_cgroups: bool,
    /// Call stacks turned off (`set_stacks`).
    stacks_off: bool,
}

/// Where the cgroup v2 hierarchy is mounted, from /proc/mounts.
pub fn find_cgroup2(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (_dev, dir, fstype) = (parts.next()?, parts.next()?, parts.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(dir))
    })
}

impl Sensors {
    /// Checks capabilities and tracefs, reads offsets, loads the programs
    /// and attaches the always-on ones, each signal through the first hook
    /// this kernel has (see [`coverage`]). Only a kernel that cannot show
    /// connects is an error; every other gap is a warning, listed in
    /// [`Sensors::signals`]. Nothing stays attached on error.
    pub fn load() -> Result<Self, KernelError> {
        Self::load_with(LoadOptions::default())
    }

    /// [`Sensors::load`] with map sizes other than the defaults (tests
    /// shrink a map to fill it).
    pub fn load_with(opts: LoadOptions) -> Result<Self, KernelError> {
        let tables = tables::Tables::new(&opts)?;
        caps::check()?;
        let tracefs = tracefs::mount_point()?;
        let formats = tracefs::Formats::new(&tracefs);
        let (offsets, problems) = formats.offsets().map_err(|e| required(e.to_string()))?;
        let tp_problem = |tp: Tracepoint| {
            problems
                .iter()
                .find(|(p, _)| p.category == tp.category && p.name == tp.name)
                .map(|(_, e)| e.to_string())
        };
        let mounts =
            std::fs::read_to_string("/proc/mounts").map_err(|cause| KernelError::Read {
                path: "/proc/mounts".into(),
                cause,
            })?;
        let cgroup = find_cgroup2(&mounts).ok_or(KernelError::NoCgroup2)?;
        let cgroup_dir = || {
            File::open(&cgroup).map_err(|cause| KernelError::Read {
                path: cgroup.clone(),
                cause,
            })
        };

        let salt = random_salt();
        let mut loader = EbpfLoader::new();
        loader
            .override_global("OFFSETS", &offsets, true)
            .override_global("SOCK_SALT", &salt, true);
        for (name, size) in &opts.map_sizes {
            loader.map_max_entries(name, *size);
        }
        let mut ebpf = loader.load(OBJECT)?;
        let mut signals = Vec::new();

        // Connects: required.
        let mut s = Signal::new(name::CONNECTS, without::CONNECTS);
        s.required = true;
        attach_tracepoint(&mut ebpf, &mut s, "sg_set_state", tracefs::SET_STATE, None);
        for (prog, hook) in [
            ("sg_connect4", "cgroup/connect4"),
            ("sg_connect6", "cgroup/connect6"),
        ] {
            attach_cgroup(&mut ebpf, &mut s, prog, hook, cgroup_dir()?);
        }
        // The state tracepoint alone sees every connect's outcome; without
        // the cgroup hooks only pre-SYN failures and namespaces are lost.
        if !s.via.iter().any(|v| v.ends_with(tracefs::SET_STATE.name)) {
            return Err(required(s.problems.join("; ")));
        }
        signals.push(s);

        let mut s = Signal::new(name::CONNECT_ERRORS, without::CONNECT_ERRORS);
        let problem = tp_problem(tracefs::ERROR_REPORT);
        attach_tracepoint(
            &mut ebpf,
            &mut s,
            "sg_error_report",
            tracefs::ERROR_REPORT,
            problem,
        );
        signals.push(s);
        let mut s = Signal::new(name::RESETS, without::RESETS);
        let problem = tp_problem(tracefs::RECEIVE_RESET);
        attach_tracepoint(
            &mut ebpf,
            &mut s,
            "sg_recv_reset",
            tracefs::RECEIVE_RESET,
            problem,
        );
        signals.push(s);
        let mut s = Signal::new(name::SYN_RETRANSMITS, without::SYN_RETRANSMITS);
        let problem = tp_problem(tracefs::RETRANSMIT);
        attach_tracepoint(
            &mut ebpf,
            &mut s,
            "sg_retransmit",
            tracefs::RETRANSMIT,
            problem,
        );
        if offsets.rt_err == detector_common::FIELD_ABSENT && s.available() {
            s.fallback = Some(
                "no `err` field (6.12 and older): retransmits that failed to go out count too"
                    .into(),
            );
        }
        signals.push(s);

        // Sends and receives: the sock tracepoints (Linux 6.3+), else fexit
        // on the protocols' sendmsg/recvmsg.
        let mut btf = None;
        for (signal_name, lost, prog, tp, fexits) in [
            (
                name::SENDS,
                without::SENDS,
                "sg_send_length",
                tracefs::SEND_LENGTH,
                SEND_FEXITS,
            ),
            (
                name::RECEIVES,
                without::RECEIVES,
                "sg_recv_length",
                tracefs::RECV_LENGTH,
                RECV_FEXITS,
            ),
        ] {
            let mut s = Signal::new(signal_name, lost);
            match tp_problem(tp) {
                None => attach_tracepoint(&mut ebpf, &mut s, prog, tp, None),
                Some(why) => {
                    s.fallback = Some(format!("{tp} unusable here ({why}); fexit instead"));
                    let btf = btf.get_or_insert_with(Btf::from_sys_fs);
                    match btf {
                        Ok(btf) => {
                            for (prog, function) in fexits {
                                attach_fexit(&mut ebpf, &mut s, prog, function, btf);
                            }
                        }
                        Err(e) => s.problems.push(format!(
                            "{tp}: {why}; fexit needs BTF (/sys/kernel/btf/vmlinux): {e}"
                        )),
                    }
                }
            }
            signals.push(s);
        }

        let mut s = Signal::new(name::PROCESSES, without::PROCESSES);
        for (prog, tp) in [
            ("sg_fork", tracefs::FORK),
            ("sg_exec", tracefs::EXEC),
            ("sg_exit", tracefs::EXIT),
        ] {
            attach_tracepoint(&mut ebpf, &mut s, prog, tp, None);
        }
        if offsets.ex_group_dead == detector_common::FIELD_ABSENT {
            s.fallback = Some(
                "sched_process_exit has no `group_dead` (Linux < 6.16): a process ends when its main thread exits"
                    .into(),
            );
        }
        signals.push(s);

        let mut s = Signal::new(name::UDP_DESTINATIONS, without::UDP_DESTINATIONS);
        for (prog, hook) in [
            ("sg_sendmsg4", "cgroup/sendmsg4"),
            ("sg_sendmsg6", "cgroup/sendmsg6"),
        ] {
            attach_cgroup(&mut ebpf, &mut s, prog, hook, cgroup_dir()?);
        }
        // Without it a UDP socket's destination outlives the socket, and a
        // new socket at the same address may be counted towards it.
        attach_sock_release(&mut ebpf, &mut s, cgroup_dir()?);
        signals.push(s);

        // Loaded now, attached only while something is suspect.
        let mut s = Signal::new(name::SYSCALL_PROBES, without::SYSCALL_PROBES);
        s.on_demand = true;
        match program::<RawTracePoint>(&mut ebpf, "sg_sys_enter").and_then(|p| {
            p.load().map_err(|cause| KernelError::Program {
                program: "sg_sys_enter",
                hook: tracefs::SYS_ENTER.to_string(),
                cause,
            })
        }) {
            Ok(()) => s.via.push(format!("raw tracepoint {}", tracefs::SYS_ENTER)),
            Err(e) => s.problems.push(e.to_string()),
        }
        let exit_connect_loaded = match tp_problem(tracefs::EXIT_CONNECT) {
            Some(why) => {
                s.problems.push(format!("{}: {why}", tracefs::EXIT_CONNECT));
                false
            }
            None => match tracepoint(&mut ebpf, "sg_exit_connect")?.load() {
                Ok(()) => {
                    s.via.push(format!("tracepoint {}", tracefs::EXIT_CONNECT));
                    true
                }
                Err(cause) => {
                    s.problems
                        .push(format!("tracepoint {}: {cause}", tracefs::EXIT_CONNECT));
                    false
                }
            },
        };
        let sys_enter_loaded = s.via.iter().any(|v| v.starts_with("raw tracepoint"));
        signals.push(s);

        // Optional: without them TLS is judged by lengths only.
        let mut s = Signal::new(name::TLS_PLAINTEXT, without::TLS_PLAINTEXT);
        s.on_demand = true;
        let mut tls_loaded = true;
        for name in [
            "sg_ssl_write",
            "sg_ssl_read",
            "sg_ssl_read_ex",
            "sg_ssl_read_ret",
        ] {
            if let Err(e) = program::<UProbe>(&mut ebpf, name).and_then(|p| {
                p.load().map_err(|cause| KernelError::Program {
                    program: name,
                    hook: "uprobe:libssl".into(),
                    cause,
                })
            }) {
                s.problems.push(e.to_string());
                tls_loaded = false;
                break;
            }
        }
        match find_libssl() {
            Some(lib) if tls_loaded => s.via.push(format!("uprobes on {}", lib.display())),
            None => s
                .problems
                .push("no shared libssl.so.3 on this host".to_string()),
            _ => {}
        }
        signals.push(s);

        for s in signals
            .iter()
            .filter(|s| s.degraded() || s.fallback.is_some())
        {
            tracing::warn!("kernel {}: {}", coverage::kernel_release(), s.describe());
        }
        // After every program is loaded (see klog).
        let log = match klog::KernelLog::start(&mut ebpf) {
            Ok(log) => Some(log),
            Err(e) => {
                tracing::warn!("kernel-side log lines will not be shown: {e}");
                None
            }
        };
        Ok(Sensors {
            ebpf,
            on_demand: None,
            signals,
            suspect_insert_failures: 0,
            user_suspects: Vec::new(),
            tables,
            _log: log,
            tls_loaded,
            sys_enter_loaded,
            exit_connect_loaded,
            armed_probes: false,
            armed_cgroups: false,
            stacks_off: false,
            root_cgroup: {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(&cgroup).ok().map(|m| m.ino())
            },
        })
    }

    /// What this kernel gives, signal by signal (see [`coverage`]).
    pub fn signals(&self) -> &[Signal] {
        &self.signals
    }

    /// Hooks attached for the life of the sensors, for `status`/`watch`:
    /// those of the signals that are not on demand.
    pub fn always_on(&self) -> Vec<String> {
        self.signals
            .iter()
            .filter(|s| !s.on_demand)
            .flat_map(|s| s.via.iter().cloned())
            .collect()
    }

    /// Takes the ring buffer of per-attempt records (once).
    pub fn take_events(&mut self) -> Result<EventRing, KernelError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(KernelError::NoMap("EVENTS"))?;
        let ring = RingBuf::try_from(map).map_err(|cause| KernelError::Map {
            name: "EVENTS",
            cause,
        })?;
        Ok(EventRing { ring })
    }

    /// True while the on-demand syscall probes are attached.
    pub fn on_demand_attached(&self) -> bool {
        self.on_demand.is_some()
    }

    /// Names of the on-demand hooks, for display.
    pub fn on_demand_hooks() -> [String; 2] {
        [
            tracefs::SYS_ENTER.to_string(),
            tracefs::EXIT_CONNECT.to_string(),
        ]
    }

    /// Attaches the syscall probes. A no-op when they already are, or
    /// when this kernel could not load them (a gap in [`Sensors::signals`]).
    pub fn attach_on_demand(&mut self) -> Result<(), KernelError> {
        if self.on_demand.is_some() || !self.sys_enter_loaded {
            return Ok(());
        }
        let sys_enter = program::<RawTracePoint>(&mut self.ebpf, "sg_sys_enter")?
            .attach(tracefs::SYS_ENTER.name)
            .map_err(|cause| KernelError::Program {
                program: "sg_sys_enter",
                hook: tracefs::SYS_ENTER.to_string(),
                cause,
            })?;
        let exit_connect = if self.exit_connect_loaded {
            match tracepoint(&mut self.ebpf, "sg_exit_connect")?
                .attach(tracefs::EXIT_CONNECT.category, tracefs::EXIT_CONNECT.name)
            {
                Ok(id) => Some(id),
                Err(cause) => {
                    // Leave nothing half-attached.
                    let _ = program::<RawTracePoint>(&mut self.ebpf, "sg_sys_enter")
                        .map(|p| p.detach(sys_enter));
                    return Err(KernelError::Program {
                        program: "sg_exit_connect",
                        hook: tracefs::EXIT_CONNECT.to_string(),
                        cause,
                    });
                }
            }
        } else {
            None
        };
        let tls = self.attach_tls();
        self.set_armed(true)?;
        self.on_demand = Some(OnDemand {
            sys_enter,
            exit_connect,
            tls,
        });
        Ok(())
    }

    /// Attaches the libssl uprobes for every process (they act only for
    /// suspects). Optional: a host without a shared libssl, or one that
    /// refuses uprobes, is judged by TLS lengths only, and says so once.
    fn attach_tls(&mut self) -> Vec<(&'static str, UProbeLinkId)> {
        let mut links = Vec::new();
        if !self.tls_loaded {
            return links;
        }
        let Some(lib) = find_libssl() else {
            return links;
        };
        for (name, symbol) in TLS_PROBES {
            let attached = program::<UProbe>(&mut self.ebpf, name)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    p.attach(symbol, &lib, UProbeScope::AllProcesses)
                        .map_err(|e| e.to_string())
                });
            match attached {
                Ok(id) => links.push((name, id)),
                Err(e) => {
                    tracing::warn!(
                        "TLS plaintext probe {symbol} in {} not attached: {e}",
                        lib.display()
                    );
                }
            }
        }
        links
    }

    /// Tells the always-on socket tracepoints whether the on-demand probes
    /// are attached (they look for receive notes and TLS fingerprints only
    /// then).
    fn set_armed(&mut self, on: bool) -> Result<(), KernelError> {
        self.armed_probes = on;
        self.write_armed()
    }

    /// Whether suspects' call stacks are taken (on unless turned off; the
    /// bench turns them off to measure what they cost).
    pub fn set_stacks(&mut self, on: bool) -> Result<(), KernelError> {
        self.stacks_off = !on;
        self.write_armed()
    }

    /// Writes the ARMED bits: 1 = on-demand probes attached, 2 = some
    /// cgroup suspect, 4 = no call stacks.
    fn write_armed(&mut self) -> Result<(), KernelError> {
        let map_err = |cause| KernelError::Map {
            name: "ARMED",
            cause,
        };
        let bits = u32::from(self.armed_probes)
            | (u32::from(self.armed_cgroups) << 1)
            | (u32::from(self.stacks_off) << 2);
        let mut armed: aya::maps::Array<_, u32> =
            aya::maps::Array::try_from(self.map_mut("ARMED")?).map_err(map_err)?;
        armed.set(0, bits, 0).map_err(map_err)
    }

    /// Whether the libssl plaintext probes are attached now.
    pub fn tls_attached(&self) -> bool {
        self.on_demand.as_ref().is_some_and(|o| !o.tls.is_empty())
    }

    /// Detaches the syscall probes and forgets their counts.
    pub fn detach_on_demand(&mut self) -> Result<(), KernelError> {
        let Some(links) = self.on_demand.take() else {
            return Ok(());
        };
        for (name, id) in links.tls {
            if let Ok(p) = program::<UProbe>(&mut self.ebpf, name) {
                let _ = p.detach(id);
            }
        }
        let a = program::<RawTracePoint>(&mut self.ebpf, "sg_sys_enter")?
            .detach(links.sys_enter)
            .map_err(|cause| KernelError::Program {
                program: "sg_sys_enter",
                hook: tracefs::SYS_ENTER.to_string(),
                cause,
            });
        let b = match links.exit_connect {
            Some(id) => tracepoint(&mut self.ebpf, "sg_exit_connect")?
                .detach(id)
                .map_err(|cause| KernelError::Program {
                    program: "sg_exit_connect",
                    hook: tracefs::EXIT_CONNECT.to_string(),
                    cause,
                }),
            None => Ok(()),
        };
        self.set_suspects(&[])?;
        self.set_suspect_cgroups(&[])?;
        self.set_armed(false)?;
        a.and(b)
    }

    /// Replaces the set of processes the on-demand probes look at.
    ///
    /// `pids` come most severe first (the caller orders them): at most the
    /// map's capacity are written, and if the map is full the ones left
    /// out are the least severe. Room is made by dropping entries the
    /// kernel added for children of a suspect (value 2) before any pid
    /// the caller chose goes without. A pid left out, or one the kernel
    /// refuses (E2BIG, ENOMEM), is counted in
    /// [`Sensors::suspect_insert_failures`] (and in
    /// [`Sensors::anomalies`]) and skipped: a process not probed is only
    /// seen less closely, which must never end the daemon. Returns how
    /// many were left out.
    ///
    /// Inherited entries end with their process (the exit tracepoint
    /// removes them) or in [`Sensors::sweep`]. Only a map missing from the
    /// object is an error.
    pub fn set_suspects(&mut self, pids: &[u32]) -> Result<usize, KernelError> {
        const SET_BY_USER: u8 = 1;
        let map_err = |cause| KernelError::Map {
            name: "SUSPECTS",
            cause,
        };
        let capacity = self.tables.capacity_of("SUSPECTS");
        let keep: Vec<u32> = {
            let mut seen = std::collections::HashSet::new();
            pids.iter().copied().filter(|p| seen.insert(*p)).collect()
        };
        let (written, left_out) = keep.split_at(keep.len().min(capacity));
        // A set: with thousands of suspects a slice search per old pid
        // would be quadratic on every tick.
        let written_set: std::collections::HashSet<u32> = written.iter().copied().collect();
        let gone: Vec<u32> = self
            .user_suspects
            .iter()
            .copied()
            .filter(|p| !written_set.contains(p))
            .collect();
        let t = detector_common::table::SUSPECTS as usize;
        let mut suspects: HashMap<_, u32, u8> =
            HashMap::try_from(self.map_mut("SUSPECTS")?).map_err(map_err)?;
        let mut deleted = 0;
        for pid in &gone {
            if suspects.remove(pid).is_ok() {
                deleted += 1;
            }
        }
        // Inherited entries that may make room, found once if needed.
        let mut inherited: Option<Vec<u32>> = None;
        let (mut inserted, mut failed) = (0, left_out.len());
        for pid in written {
            // NOEXIST first, so a new key is counted as one.
            let mut ok = match suspects.insert(pid, SET_BY_USER, NOEXIST) {
                Ok(()) => {
                    inserted += 1;
                    true
                }
                Err(e) if errno(&e) == Some(libc::EEXIST) => {
                    suspects.insert(pid, SET_BY_USER, 0).is_ok()
                }
                Err(_) => false,
            };
            if !ok {
                let spare = inherited.get_or_insert_with(|| {
                    suspects
                        .iter()
                        .filter_map(Result::ok)
                        .filter(|(_, v)| *v != SET_BY_USER)
                        .map(|(k, _)| k)
                        .collect()
                });
                while let Some(victim) = spare.pop() {
                    if suspects.remove(&victim).is_ok() {
                        deleted += 1;
                        if suspects.insert(pid, SET_BY_USER, NOEXIST).is_ok() {
                            inserted += 1;
                            ok = true;
                        }
                        break;
                    }
                }
            }
            if !ok {
                failed += 1;
            }
        }
        self.tables.inserts[t] += inserted;
        self.tables.deletes[t] += deleted;
        self.suspect_insert_failures += failed as u64;
        let mut counts: PerCpuHashMap<_, u32, u64> =
            PerCpuHashMap::try_from(self.map_mut("SYSCALLS")?).map_err(|cause| {
                KernelError::Map {
                    name: "SYSCALLS",
                    cause,
                }
            })?;
        let mut counts_deleted = 0;
        for pid in &gone {
            if counts.remove(pid).is_ok() {
                counts_deleted += 1;
            }
        }
        self.tables.deletes[detector_common::table::SYSCALLS as usize] += counts_deleted;
        self.user_suspects = written.to_vec();
        Ok(failed)
    }

    /// Replaces the cgroups whose every process the on-demand probes look
    /// at, most severe first (the caller orders them). The cgroup v2 root
    /// is never one (it holds the whole host); past the map's capacity,
    /// or refused by the kernel, the rest are left out and counted as in
    /// [`Sensors::set_suspects`]. Returns how many were left out.
    pub fn set_suspect_cgroups(&mut self, cgroups: &[u64]) -> Result<usize, KernelError> {
        let map_err = |cause| KernelError::Map {
            name: "SUSPECT_CGROUPS",
            cause,
        };
        let root = self.root_cgroup;
        let capacity = self.tables.capacity_of("SUSPECT_CGROUPS");
        let wanted: Vec<u64> = {
            let mut seen = std::collections::HashSet::new();
            cgroups
                .iter()
                .copied()
                .filter(|id| Some(*id) != root && seen.insert(*id))
                .collect()
        };
        let (written, left_out) = wanted.split_at(wanted.len().min(capacity));
        let mut map: HashMap<_, u64, u8> =
            HashMap::try_from(self.map_mut("SUSPECT_CGROUPS")?).map_err(map_err)?;
        let old: Vec<u64> = map
            .keys()
            .filter_map(Result::ok)
            .take(capacity.max(1) * 2)
            .collect();
        for id in old.iter().filter(|id| !written.contains(id)) {
            let _ = map.remove(id);
        }
        let mut failed = left_out.len();
        let mut any = false;
        for id in written {
            if map.insert(id, 1, 0).is_err() {
                failed += 1;
            } else {
                any = true;
            }
        }
        self.suspect_insert_failures += failed as u64;
        self.armed_cgroups = any;
        self.write_armed()?;
        Ok(failed)
    }

    /// The kernel's SUSPECTS map now: (pid, set by user space — false
    /// for a child that inherited its parent's suspicion), at most the
    /// map's capacity (for status and tests).
    pub fn suspect_entries(&self) -> Result<Vec<(u32, bool)>, KernelError> {
        let suspects: HashMap<_, u32, u8> =
            HashMap::try_from(self.map("SUSPECTS")?).map_err(|cause| KernelError::Map {
                name: "SUSPECTS",
                cause,
            })?;
        Ok(suspects
            .iter()
            .filter_map(Result::ok)
            .take(self.tables.capacity_of("SUSPECTS"))
            .map(|(pid, v)| (pid, v == 1))
            .collect())
    }

    /// Cumulative syscalls per suspect process, summed over CPUs.
    pub fn syscall_counts(&self) -> Result<StdHashMap<u32, u64>, KernelError> {
        let counts: PerCpuHashMap<_, u32, u64> = PerCpuHashMap::try_from(self.map("SYSCALLS")?)
            .map_err(|cause| KernelError::Map {
                name: "SYSCALLS",
                cause,
            })?;
        Ok(counts
            .iter()
            .filter_map(Result::ok)
            .map(|(pid, per_cpu)| (pid, per_cpu.iter().sum()))
            .collect())
    }

    /// What the kernel side lost so far.
    pub fn stats(&self) -> Result<KernelStats, KernelError> {
        let map_err = |cause| KernelError::Map {
            name: "STATS",
            cause,
        };
        let stats: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.map("STATS")?).map_err(map_err)?;
        let sum = |i: u32| -> Result<u64, KernelError> {
            Ok(stats.get(&i, 0).map_err(map_err)?.iter().sum())
        };
        Ok(KernelStats {
            ring_drops: sum(stat::RING_DROPS)?,
            map_full: sum(stat::MAP_FULL)?,
        })
    }

    /// Attempts that closed from SYN_SENT at least `age_ns` ago and never got
    /// an error report (the application gave up, or no errno was set):
    /// removed from the map and returned, each exactly once — the kernel
    /// reports an entry only when its own removal succeeds, and so do we.
    pub fn sweep_closed(&mut self, now_ns: u64, age_ns: u64) -> Result<Vec<Event>, KernelError> {
        let map_err = |cause| KernelError::Map {
            name: "CLOSED",
            cause,
        };
        let mut closed: HashMap<_, TupleKey, Event> =
            HashMap::try_from(self.map_mut("CLOSED")?).map_err(map_err)?;
        let stale: Vec<(TupleKey, Event)> = closed
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, ev)| now_ns.saturating_sub(ev.ts_ns) >= age_ns)
            .collect();
        let mut out = Vec::new();
        for (key, ev) in stale {
            if closed.remove(&key).is_ok() {
                out.push(ev);
            }
        }
        self.tables.deletes[detector_common::table::CLOSED as usize] += out.len() as u64;
        Ok(out)
    }

    fn map(&self, name: &'static str) -> Result<&aya::maps::Map, KernelError> {
        self.ebpf.map(name).ok_or(KernelError::NoMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut aya::maps::Map, KernelError> {
        self.ebpf.map_mut(name).ok_or(KernelError::NoMap(name))
    }
}

/// The ring buffer of records; poll its fd for readability, then drain.
pub struct EventRing {
    ring: RingBuf<MapData>,
}

/// Most records one [`EventRing::drain`] reads (about 2.7 MB, tens of
/// milliseconds of work).
pub const DRAIN_MAX: usize = 20_000;

impl EventRing {
    /// Decodes the records waiting now, at most [`DRAIN_MAX`]; returns how
    /// many were read. Undecodable records are passed on as errors, not
    /// dropped silently. Bounded so that a flood faster than the reader
    /// cannot hold it here forever: the caller ticks (verdicts, on-demand
    /// probes, signals) between turns, and what is left waits for the next.
    pub fn drain(&mut self, mut f: impl FnMut(Result<Observation, DecodeError>)) -> usize {
        let mut n = 0;
        while n < DRAIN_MAX {
            let Some(item) = self.ring.next() else { break };
            f(decode(&item));
            n += 1;
        }
        n
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// A program of the object by name, as its concrete type.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, KernelError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(KernelError::Program {
        program: name,
        hook: "-".into(),
        cause: aya::programs::ProgramError::UnexpectedProgramType,
    })?;
    prog.try_into().map_err(|cause| KernelError::Program {
        program: name,
        hook: "-".into(),
        cause,
    })
}

/// The error for a kernel that cannot show connects, naming it.
fn required(why: String) -> KernelError {
    KernelError::Required {
        kernel: coverage::kernel_release(),
        why,
    }
}

/// Loads and attaches a tracepoint program for `signal`, or records why
/// not (`known` is a problem found in its format already).
fn attach_tracepoint(
    ebpf: &mut Ebpf,
    signal: &mut Signal,
    prog: &'static str,
    tp: Tracepoint,
    known: Option<String>,
) {
    if let Some(why) = known {
        signal.problems.push(format!("tracepoint {tp}: {why}"));
        return;
    }
    let result = tracepoint(ebpf, prog).and_then(|p| {
        let err = |cause| KernelError::Program {
            program: prog,
            hook: tp.to_string(),
            cause,
        };
        p.load().map_err(err)?;
        p.attach(tp.category, tp.name).map_err(err)
    });
    match result {
        Ok(_) => signal.via.push(format!("tracepoint {tp}")),
        Err(e) => signal.problems.push(e.to_string()),
    }
}

/// Loads and attaches a cgroup sock_addr hook at the cgroup v2 root.
fn attach_cgroup(
    ebpf: &mut Ebpf,
    signal: &mut Signal,
    prog: &'static str,
    hook: &'static str,
    dir: File,
) {
    let result = program::<CgroupSockAddr>(ebpf, prog).and_then(|p| {
        let err = |cause| KernelError::Program {
            program: prog,
            hook: hook.to_string(),
            cause,
        };
        p.load().map_err(err)?;
        p.attach(dir, CgroupAttachMode::Single).map_err(err)
    });
    match result {
        Ok(_) => signal.via.push(hook.to_string()),
        Err(e) => signal.problems.push(e.to_string()),
    }
}

/// Loads and attaches the `cgroup/sock_release` hook that deletes a
/// released socket's state (kernel 5.9+).
fn attach_sock_release(ebpf: &mut Ebpf, signal: &mut Signal, dir: File) {
    const PROG: &str = "sg_sock_release";
    const HOOK: &str = "cgroup/sock_release";
    let result = program::<CgroupSock>(ebpf, PROG).and_then(|p| {
        let err = |cause| KernelError::Program {
            program: PROG,
            hook: HOOK.to_string(),
            cause,
        };
        p.load().map_err(err)?;
        p.attach(dir, CgroupAttachMode::Single).map_err(err)
    });
    match result {
        Ok(_) => signal.via.push(HOOK.to_string()),
        Err(e) => signal.problems.push(format!(
            "{e} (a new UDP socket at a released socket's address may be counted towards the old socket's destination)"
        )),
    }
}

/// `BPF_NOEXIST`: insert only a key that is not there yet.
const NOEXIST: u64 = 1;

/// The errno of a failed map syscall, if it carries one.
fn errno(e: &aya::maps::MapError) -> Option<i32> {
    match e {
        aya::maps::MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}

/// Loads and attaches an fexit program on a kernel function.
fn attach_fexit(
    ebpf: &mut Ebpf,
    signal: &mut Signal,
    prog: &'static str,
    function: &'static str,
    btf: &Btf,
) {
    let result = program::<FExit>(ebpf, prog).and_then(|p| {
        let err = |cause| KernelError::Program {
            program: prog,
            hook: format!("fexit/{function}"),
            cause,
        };
        p.load(function, btf).map_err(err)?;
        p.attach().map_err(err)
    });
    match result {
        Ok(_) => signal.via.push(format!("fexit {function}")),
        Err(e) => signal.problems.push(e.to_string()),
    }
}

fn tracepoint<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut TracePoint, KernelError> {
    program::<TracePoint>(ebpf, name)
}

/// Kernel features stormguard looks for, and what it found, for `status`.
/// Only tracepoints, cgroup hooks and (optionally) uprobes are used;
/// kprobes, fentry and BPF LSM are reported because production kernels
/// usually have them and a later version may use them.
pub fn features() -> Vec<(String, String)> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let found = |ok: bool, yes: String, no: &str| if ok { yes } else { no.to_string() };
    let tracefs = tracefs::find_mount(&mounts);
    let lsm = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    vec![
        (
            "tracefs".into(),
            found(
                tracefs.is_some(),
                format!(
                    "mounted at {}",
                    tracefs
                        .as_deref()
                        .unwrap_or(std::path::Path::new(""))
                        .display()
                ),
                "not mounted",
            ),
        ),
        (
            "cgroup2".into(),
            find_cgroup2(&mounts)
                .map(|p| format!("mounted at {}", p.display()))
                .unwrap_or_else(|| "not mounted".into()),
        ),
        (
            "btf".into(),
            found(
                std::path::Path::new("/sys/kernel/btf/vmlinux").exists(),
                "available (/sys/kernel/btf/vmlinux)".into(),
                "not available",
            ),
        ),
        (
            "kprobes".into(),
            found(
                tracefs
                    .as_ref()
                    .is_some_and(|t| t.join("kprobe_events").exists()),
                "available (not used)".into(),
                "not available (not needed)",
            ),
        ),
        (
            "bpf_lsm".into(),
            found(
                lsm.split(',').any(|l| l.trim() == "bpf"),
                "enabled (not used)".into(),
                "not enabled (not needed)",
            ),
        ),
    ]
}

/// A random salt for socket ids, from the kernel's random pool.
fn random_salt() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        // Unsalted ids are still mixed; only their opacity is weaker.
        monotonic_ns()
    }
}

/// CLOCK_MONOTONIC now, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Used by tests to show which tracefs the sensors would use.
pub fn tracefs_path() -> Result<PathBuf, KernelError> {
    tracefs::mount_point()
}
