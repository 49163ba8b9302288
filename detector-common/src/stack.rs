//! Call stacks of suspect processes at the call that makes an attempt or a
//! send (connect, sendto, sendmsg, sendmmsg, write, writev).
//!
//! The on-demand `sys_enter` probe walks the frame pointers
//! (`bpf_get_stackid` into `STACKS`) and leaves a [`Note`] for the hook that
//! sees the destination in the same syscall (the cgroup connect hook, the
//! socket send tracepoint); that hook counts the attempt in `STACK_COUNTS`
//! under ([`CountKey`]: process, destination, stack). Frame pointers miss
//! the caller of a frameless leaf (libc's syscall wrappers) and stop at code
//! built without them, so at most once a second per process the probe also
//! copies the top of the user stack ([`Copy`]) for user space to unwind
//! from `.eh_frame`.

/// Bytes of user stack a [`Copy`] carries at most: deep enough for a
/// Rust or C client's frames down from its retry loop to the syscall
/// (a Python or JVM client's interpreter frames are deeper, and not
/// resolved anyway).
pub const COPY_BYTES: usize = 8192;

/// The per-CPU note from `sys_enter` to the hook in the same syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Note {
    /// Thread in the syscall; 0 when the slot is empty.
    pub tid: u32,
    /// Stack id + 1 in `STACKS`; 0 when the walk failed.
    pub stack: u32,
}

/// Key of `STACK_COUNTS`: one (process, destination, stack).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CountKey {
    /// Network namespace cookie of the destination (0 when unknown).
    pub netns: u64,
    pub tgid: u32,
    /// Stack id + 1 in `STACKS`.
    pub stack: u32,
    /// Destination port, host order.
    pub dport: u16,
    pub family: u16,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub proto: u16,
    pub _pad: u16,
    /// Destination address, network order; IPv4 in the first 4 bytes.
    pub daddr: [u8; 16],
}

/// A copy of the top of a suspect thread's user stack at syscall entry,
/// with the registers an unwinder starts from. Sent on its own ring
/// (`STACK_COPIES`): it is 8 KiB, the event ring's records 136 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Copy {
    /// User instruction pointer at syscall entry.
    pub ip: u64,
    /// User stack pointer: `bytes[0]` is the byte at this address.
    pub sp: u64,
    /// User frame pointer (rbp).
    pub bp: u64,
    pub tgid: u32,
    pub tid: u32,
    /// Stack id + 1 of the frame-pointer walk taken in the same syscall.
    pub stack: u32,
    /// How many of `bytes` were read (0: the stack could not be read).
    pub len: u32,
    pub bytes: [u8; COPY_BYTES],
}

/// Capacities of the stack maps.
pub mod capacity {
    /// Distinct frame-pointer stacks kept (`STACKS`, 127 frames each).
    pub const STACKS: u32 = 2_048;
    /// (process, destination, stack) counters between two reads
    /// (`STACK_COUNTS`, LRU; user space takes them every second).
    pub const COUNTS: u32 = 4_096;
    /// Processes with a copy made in the last second (`STACK_COPIED`, LRU).
    pub const COPIED: u32 = 4_096;
    /// `STACK_COPIES` ring: about 60 copies.
    pub const COPIES_BYTES: u32 = 512 << 10;
}
