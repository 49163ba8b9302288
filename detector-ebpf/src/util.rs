//! Small helpers every probe uses: the clock, the current task, offsets,
//! and emitting a record with its loss counted.
use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid,
        generated::{bpf_get_current_cgroup_id, bpf_ktime_get_ns},
    },
    programs::TracePointContext,
};
use detector_common::{Event, Offsets, capacity};

use crate::maps::{ARMED, EVENTS, STATS, SUSPECT_CGROUPS, SUSPECTS};

/// Tracepoint field offsets; the loader overwrites this from tracefs.
#[unsafe(no_mangle)]
pub static OFFSETS: Offsets = Offsets {
    ss_skaddr: 0,
    ss_oldstate: 0,
    ss_newstate: 0,
    ss_sport: 0,
    ss_dport: 0,
    ss_family: 0,
    ss_protocol: 0,
    ss_daddr: 0,
    ss_daddr_v6: 0,
    er_error: 0,
    er_sport: 0,
    er_dport: 0,
    er_family: 0,
    er_protocol: 0,
    er_daddr: 0,
    er_daddr_v6: 0,
    sl_sk: 0,
    sl_family: 0,
    sl_protocol: 0,
    sl_ret: 0,
    rl_sk: 0,
    rl_family: 0,
    rl_protocol: 0,
    rl_ret: 0,
    rl_flags: 0,
    rr_skaddr: 0,
    rt_skaddr: 0,
    rt_state: 0,
    rt_err: 0,
    fk_child_pid: 0,
    ex_pid: 0,
    ex_group_dead: 0,
    xc_ret: 0,
};

/// Salt for socket ids, random per load (the loader overwrites it), so a
/// socket id reveals nothing of the kernel address it is made from.
#[unsafe(no_mangle)]
pub static SOCK_SALT: u64 = 0;

/// A stable, opaque id for a socket: its address salted and mixed
/// (splitmix64's finaliser).
#[inline(always)]
pub fn sock_id(sk: u64) -> u64 {
    // SAFETY: SOCK_SALT is a valid static; volatile so the loader's value is read.
    let mut x = sk ^ unsafe { core::ptr::read_volatile(&SOCK_SALT) };
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) | 1
}

/// The offset of one tracepoint field, e.g. `off!(ss_skaddr)`. The read is
/// volatile, or the compiler would fold in the zero default.
macro_rules! off {
    ($name:ident) => {
        // SAFETY: OFFSETS is a valid static; this reads one u32 inside it.
        unsafe { core::ptr::read_volatile(&$crate::util::OFFSETS.$name) as usize }
    };
}
pub(crate) use off;

/// Reads a field of a tracepoint record at a loader-provided offset.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, offset: usize) -> Result<T, i64> {
    // SAFETY: read_at is a bpf_probe_read_kernel of the tracepoint record;
    // a bad offset yields an error, never undefined behaviour.
    unsafe { ctx.read_at::<T>(offset).map_err(|e| e as i64) }
}

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn current() -> (u32, u32) {
    let id = bpf_get_current_pid_tgid();
    ((id >> 32) as u32, id as u32)
}

/// cgroup v2 id of the current task, for roll-ups per service/container.
#[inline(always)]
pub fn cgroup() -> u64 {
    // SAFETY: bpf_get_current_cgroup_id has no preconditions.
    unsafe { bpf_get_current_cgroup_id() }
}

#[inline(always)]
pub fn comm() -> [u8; 16] {
    bpf_get_current_comm().unwrap_or([0; 16])
}

/// Sends a record to user space; a full ring is counted, never silent.
///
/// Without a wakeup: waking the reader for every record costs a
/// self-interrupt per record (measured 5–10 µs each on this VM, the bulk of
/// the per-connect overhead), and user space drains the ring on a 100 ms
/// tick anyway. Once the ring is a quarter full the reader is woken, so a
/// burst is drained long before the ring overflows.
#[inline(always)]
pub fn emit(ev: &Event) {
    let wake = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) > (capacity::EVENTS_BYTES / 4) as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    if EVENTS.output::<Event>(ev, wake as u64).is_err() {
        crate::tables::ring_full();
    }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *p += 1 };
    }
}

/// Whether the on-demand probes look at this process: it is a suspect, a
/// suspect's child, or in a suspect cgroup.
#[inline(always)]
pub fn is_suspect(tgid: u32) -> bool {
    // SAFETY: the values are only tested for presence.
    unsafe {
        SUSPECTS.get(tgid).is_some()
            || (armed_flags() & ARMED_CGROUPS != 0 && SUSPECT_CGROUPS.get(cgroup()).is_some())
    }
}

/// [`ARMED`] bit: the on-demand probes are attached.
pub const ARMED_PROBES: u32 = 1;
/// [`ARMED`] bit: some cgroup is suspect (so every syscall of every
/// process pays the cgroup lookup only then).
pub const ARMED_CGROUPS: u32 = 2;
/// [`ARMED`] bit: take no call stacks (for measuring what they cost).
pub const ARMED_NO_STACKS: u32 = 4;

#[inline(always)]
fn armed_flags() -> u32 {
    ARMED.get(0).copied().unwrap_or(0)
}

/// Whether suspects' call stacks are taken (see [`ARMED_NO_STACKS`]).
#[inline(always)]
pub fn stacks_on() -> bool {
    armed_flags() & ARMED_NO_STACKS == 0
}

/// Whether the on-demand probes are attached (see [`ARMED`]).
#[inline(always)]
pub fn armed() -> bool {
    armed_flags() & ARMED_PROBES != 0
}
