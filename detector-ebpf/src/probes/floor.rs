//! The floor for `cargo xtask bench`: the cheapest program that still does
//! something per hit (one per-CPU counter increment), on each hook the real
//! sensors use. The bench subtracts its cost from stormguard's to show what
//! stormguard's own logic costs per hit, apart from what the kernel charges
//! just for having a program on the hook. Never attached by `stormguard`.
//!
//! Slot numbers are mirrored in `detector/src/kernel/floor.rs` (`FLOOR_PROGRAMS`);
//! keep both lists in the same order.
use aya_ebpf::{macros::map, maps::PerCpuArray};

pub const SET_STATE: u32 = 0;
pub const ERROR_REPORT: u32 = 1;
pub const RECEIVE_RESET: u32 = 2;
pub const RETRANSMIT: u32 = 3;
pub const SEND_LENGTH: u32 = 4;
pub const FORK: u32 = 5;
pub const EXEC: u32 = 6;
pub const EXIT: u32 = 7;
pub const CONNECT4: u32 = 8;
pub const CONNECT6: u32 = 9;
pub const SENDMSG4: u32 = 10;
pub const SENDMSG6: u32 = 11;
pub const SYS_ENTER: u32 = 12;
pub const EXIT_CONNECT: u32 = 13;
pub const RECV_LENGTH: u32 = 14;
pub const SOCK_RELEASE: u32 = 15;
/// Number of slots in [`FLOOR_HITS`].
pub const SLOTS: u32 = 16;

/// Hits per floor program, per CPU. Per-CPU so the increment needs no
/// atomic and costs what a real sensor's cheapest bookkeeping would.
#[map]
pub static FLOOR_HITS: PerCpuArray<u64> = PerCpuArray::with_max_entries(SLOTS, 0);

/// Counts one hit of the program owning `slot`.
#[inline(always)]
pub fn hit(slot: u32) {
    if let Some(p) = FLOOR_HITS.get_ptr_mut(slot) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array; the
        // program cannot be preempted by another writer of the same slot.
        unsafe { *p += 1 };
    }
}
