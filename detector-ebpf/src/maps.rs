//! Every map the programs share. Sizes come from `detector_common::capacity`;
//! all per-socket and per-thread maps are LRU so a flood of sockets or a
//! crashed consumer can only evict, never wedge the probes.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray, RingBuf, StackTrace},
};
use detector_common::{
    Conn, Event, Fingerprint, MsgDest, TupleKey, UdpDest, capacity,
    stack::{self, CountKey, Note},
    stat,
};

/// Per-attempt records to user space.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

/// Counters of what was lost (`detector_common::stat`).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// TCP sockets from CLOSE→SYN_SENT until their outcome, keyed by socket
/// address. The value is the outcome record, filled in as it goes.
#[map]
pub static INFLIGHT: LruHashMap<u64, Event> = LruHashMap::with_max_entries(capacity::INFLIGHT, 0);

/// Attempts that just closed from SYN_SENT, keyed by tuple, waiting for the
/// `inet_sk_error_report` that carries their errno (it has no socket
/// address). User space sweeps entries that never get one.
#[map]
pub static CLOSED: LruHashMap<TupleKey, Event> = LruHashMap::with_max_entries(capacity::CLOSED, 0);

/// TCP connects that passed the cgroup connect hook, keyed by thread id,
/// until SYN_SENT (same syscall) consumes them.
#[map]
pub static PRE_SYN: LruHashMap<u32, Event> = LruHashMap::with_max_entries(capacity::PRE_SYN, 0);

/// Destination of each connected UDP socket, keyed by socket address;
/// deleted when the socket is released (`cgroup/sock_release`), so a new
/// socket at a reused address never inherits it.
#[map]
pub static UDP_DEST: LruHashMap<u64, UdpDest> = LruHashMap::with_max_entries(capacity::UDP_DEST, 0);

/// Destination of the unconnected UDP send in flight on this CPU.
#[map]
pub static MSG_DEST: PerCpuArray<MsgDest> = PerCpuArray::with_max_entries(1, 0);

/// Processes the on-demand probes look at: user space writes the engine's
/// suspects (value 1), most severe first; a child forked by a suspect
/// inherits it here ([`SUSPECT_INHERITED`]), so a shell loop's next curl is
/// read from its first request. A plain hash, not LRU: a fork storm must
/// not evict the most severe suspects user space chose — a child that
/// finds the map full is not inherited (counted and logged as a refused
/// insert). Entries end with their process (exit tracepoint) or in user
/// space's sweep of dead pids.
#[map]
pub static SUSPECTS: HashMap<u32, u8> = HashMap::with_max_entries(capacity::SUSPECTS, 0);

/// [`SUSPECTS`] value written by user space: 1. [`SUSPECTS`] value of a child that inherited its parent's suspicion.
pub const SUSPECT_INHERITED: u8 = 2;

/// cgroups whose every process the on-demand probes look at (a suspect
/// cgroup roll-up: its new processes are read from their first request).
/// User space never puts the root cgroup here.
#[map]
pub static SUSPECT_CGROUPS: HashMap<u64, u8> =
    HashMap::with_max_entries(capacity::SUSPECT_CGROUPS, 0);

/// Syscalls per suspect process, per CPU (LRU: never wedges).
#[map]
pub static SYSCALLS: LruPerCpuHashMap<u32, u64> =
    LruPerCpuHashMap::with_max_entries(capacity::SUSPECTS, 0);

/// The user buffer of the receive syscall a suspect thread is in, keyed by
/// thread id: the socket receive tracepoint that fires after the copy reads
/// the reply's first bytes from it. A hash map, not a per-CPU slot, since a
/// blocking receive often wakes up on another CPU.
#[map]
pub static RECV_NOTES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(capacity::RECV_NOTES, 0);

/// Client TCP connections (went through SYN_SENT) from ESTABLISHED until
/// they end, keyed by socket address: request/response bookkeeping.
#[map]
pub static CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(capacity::CONNS, 0);

/// Content fingerprint of the send a suspect thread is making on this CPU;
/// left by the on-demand sys_enter probe, consumed by the socket send
/// tracepoint in the same syscall.
#[map]
pub static FINGERPRINTS: PerCpuArray<Fingerprint> = PerCpuArray::with_max_entries(1, 0);

/// The plaintext fingerprint of the request a suspect thread is writing
/// through libssl, taken by the `SSL_write` uprobe; the socket send that
/// follows prefers it to the ciphertext's.
#[map]
pub static TLS_FP: LruHashMap<u32, u64> = LruHashMap::with_max_entries(capacity::RECV_NOTES, 0);

/// Buffers of `SSL_read` calls in progress, by thread.
#[map]
pub static TLS_READS: LruHashMap<u32, crate::probes::tls::TlsRead> =
    LruHashMap::with_max_entries(capacity::RECV_NOTES, 0);

/// The TCP socket a probed thread last received on: where `SSL_read`'s
/// plaintext belongs.
#[map]
pub static THREAD_SOCK: LruHashMap<u32, u64> =
    LruHashMap::with_max_entries(capacity::RECV_NOTES, 0);

/// Bits user space sets (`util::ARMED_PROBES`, `util::ARMED_CGROUPS`):
/// while the on-demand probes are attached, the always-on socket
/// tracepoints look for receive notes and TLS fingerprints, so a host with
/// nothing suspect pays one array read, not hash lookups, per send and
/// receive; while some cgroup is suspect, the syscall probe looks up each
/// task's cgroup.
#[map]
pub static ARMED: Array<u32> = Array::with_max_entries(1, 0);

/// Frame-pointer user stacks of suspects' connects and sends, by id.
#[map]
pub static STACKS: StackTrace = StackTrace::with_max_entries(stack::capacity::STACKS, 0);

/// The stack `sys_enter` took for the call in progress on this CPU.
#[map]
pub static STACK_NOTE: PerCpuArray<Note> = PerCpuArray::with_max_entries(1, 0);

/// Calls per (process, destination, stack); user space takes them.
#[map]
pub static STACK_COUNTS: LruHashMap<CountKey, u64> =
    LruHashMap::with_max_entries(stack::capacity::COUNTS, 0);

/// When each process's stack was last copied (one copy a second at most).
#[map]
pub static STACK_COPIED: LruHashMap<u32, u64> =
    LruHashMap::with_max_entries(stack::capacity::COPIED, 0);

/// Copies of the top of suspects' user stacks, for unwinding.
#[map]
pub static STACK_COPIES: RingBuf = RingBuf::with_byte_size(stack::capacity::COPIES_BYTES, 0);
