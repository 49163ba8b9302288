//! Types shared by the kernel programs (`detector-ebpf`) and the user side
//! (`detector`).
//!
//! Everything here is `#[repr(C)]` with explicit `_pad` fields: map keys are
//! hashed byte for byte, and implicit padding would carry stack garbage from
//! the eBPF side (two equal keys would land in two slots). The user side
//! zeroes the same padding. `tests/layout.rs` pins every size and offset, so
//! a change to one side that the other does not follow fails a test rather
//! than decoding garbage.
#![no_std]

/// What an [`Event`] in the `EVENTS` ring buffer reports.
pub mod kind {
    /// A TCP connect() that reached SYN_SENT has finished: established,
    /// failed with an errno, or closed before an answer.
    pub const TCP_OUTCOME: u8 = 1;
    /// A TCP connect() that passed the cgroup connect hook but never reached
    /// SYN_SENT (e.g. ENETUNREACH). The errno is only known while the
    /// on-demand `sys_exit_connect` probe is attached; otherwise it is 0.
    pub const TCP_PRE_SYN_FAIL: u8 = 2;
    /// connect() on a UDP socket.
    pub const UDP_CONNECT: u8 = 3;
    /// One successful UDP send (connected or not); `aux` holds the bytes sent.
    pub const UDP_SEND: u8 = 4;
    /// A task was forked: `tgid` is the parent's tgid, `aux` the child's pid.
    pub const PROC_FORK: u8 = 5;
    /// A process called exec: `tgid` is the process, `comm` its new name.
    pub const PROC_EXEC: u8 = 6;
    /// A task exited: `aux` is its pid (thread id); `flags` has
    /// [`super::flags::GROUP_DEAD`] when it was the last thread of `tgid`.
    pub const PROC_EXIT: u8 = 7;
    /// One request/response on a client TCP connection: `aux` bytes sent
    /// (consecutive sends), `aux2` bytes received before the next send;
    /// `hash` the request's content fingerprint (0 when not probed).
    pub const TCP_EXCHANGE: u8 = 8;
    /// A client TCP connection ended: `start_ns` when it was established,
    /// `aux`/`aux2` total bytes sent/received (saturating).
    pub const TCP_CONN_END: u8 = 9;
    /// A datagram received on a connected UDP socket; `aux` bytes;
    /// `head` its first bytes when the receiver was probed.
    pub const UDP_RECV: u8 = 10;
    /// An ICMP error reported on a UDP socket (`sock:inet_sk_error_report`,
    /// e.g. port unreachable → ECONNREFUSED): `errno`, destination from the
    /// report's tuple, process of the task it fired in (the sender's on
    /// loopback; the netns is unknown, 0).
    pub const UDP_ERROR: u8 = 11;
}

/// How a [`kind::TCP_OUTCOME`] ended.
pub mod outcome {
    /// SYN_SENT → ESTABLISHED.
    pub const ESTABLISHED: u8 = 1;
    /// SYN_SENT → CLOSE followed by an error report; `errno` says why.
    pub const FAILED: u8 = 2;
    /// SYN_SENT → CLOSE with no error report (the application closed the
    /// socket while it was connecting, or the kernel gave up without one).
    pub const CLOSED: u8 = 3;
}

/// Bits of [`Event::flags`].
pub mod flags {
    /// A RST arrived while the socket was in SYN_SENT.
    pub const RST: u8 = 1;
    /// On [`super::kind::PROC_EXIT`]: the whole thread group is gone.
    pub const GROUP_DEAD: u8 = 2;
    /// On [`super::kind::TCP_EXCHANGE`]: the connection's first request
    /// (its connect was already counted as the attempt).
    pub const FIRST_EXCHANGE: u8 = 4;
    /// On [`super::kind::UDP_SEND`]: sent on a connected socket, whose
    /// replies are counted (so a missing reply means something).
    pub const CONNECTED: u8 = 8;
    /// [`super::Event::head`] holds bytes read from the process's buffer.
    pub const HEAD: u8 = 16;
}

/// How many bytes of a reply (or of a DNS query's question) a record
/// carries in [`Event::head`]: enough for an HTTP status line, a DNS
/// header, a PostgreSQL ErrorResponse's SQLSTATE or a Redis error word.
pub const HEAD_BYTES: usize = 32;

/// Address families as the kernel spells them.
pub const AF_INET: u16 = 2;
/// Address families as the kernel spells them.
pub const AF_INET6: u16 = 10;
/// IPPROTO_TCP.
pub const IPPROTO_TCP: u16 = 6;
/// IPPROTO_UDP.
pub const IPPROTO_UDP: u16 = 17;

/// TCP states used by `sock:inet_sock_set_state` (include/net/tcp_states.h).
pub mod tcp_state {
    pub const ESTABLISHED: i32 = 1;
    pub const SYN_SENT: i32 = 2;
    pub const CLOSE: i32 = 7;
}

/// One record in the `EVENTS` ring buffer. Fixed size: one reserve per event,
/// no length field to trust. 136 bytes, align 8.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// CLOCK_MONOTONIC (bpf_ktime_get_ns) when the record was made.
    pub ts_ns: u64,
    /// CLOCK_MONOTONIC when the attempt started (connect hook or SYN_SENT);
    /// 0 for records that are not attempts.
    pub start_ns: u64,
    /// Network namespace cookie (SO_NETNS_COOKIE), 0 when unknown.
    pub netns: u64,
    /// cgroup v2 id of the task that made the attempt (its inode number).
    pub cgroup: u64,
    /// Content fingerprint of a request, 0 when none was taken.
    pub hash: u64,
    /// Which socket (a salted hash of its kernel address, so no kernel
    /// pointer leaves the kernel): repetition is judged per connection.
    pub sock: u64,
    /// Process (thread group) id.
    pub tgid: u32,
    /// Kind-specific: child pid (fork), thread id (exit), bytes (UDP send),
    /// SYN retransmits (TCP outcome), bytes sent (exchange).
    pub aux: u32,
    /// Kind-specific: bytes received (exchange, connection end).
    pub aux2: u32,
    /// Positive errno, 0 for none or unknown.
    pub errno: i32,
    /// Destination port, host byte order.
    pub dport: u16,
    /// [`AF_INET`] or [`AF_INET6`]; 0 for process records.
    pub family: u16,
    /// One of [`kind`].
    pub kind: u8,
    /// One of [`outcome`] for TCP outcomes, else 0.
    pub outcome: u8,
    /// Bits from [`flags`].
    pub flags: u8,
    pub _pad: u8,
    /// Destination address in network order; IPv4 uses the first 4 bytes.
    pub daddr: [u8; 16],
    /// The task's comm when the record was made.
    pub comm: [u8; 16],
    /// With [`flags::HEAD`]: the first bytes of the response
    /// ([`kind::TCP_EXCHANGE`], [`kind::UDP_RECV`]) or, for a DNS query
    /// ([`kind::UDP_SEND`] to port 53), the bytes after its 12-byte header
    /// (the name asked). Read only from processes the on-demand probes
    /// look at; zero otherwise.
    pub head: [u8; HEAD_BYTES],
}

impl Event {
    /// An all-zero event, the starting point for every record.
    pub const fn zeroed() -> Self {
        Event {
            ts_ns: 0,
            start_ns: 0,
            netns: 0,
            cgroup: 0,
            hash: 0,
            sock: 0,
            tgid: 0,
            aux: 0,
            aux2: 0,
            errno: 0,
            dport: 0,
            family: 0,
            kind: 0,
            outcome: 0,
            flags: 0,
            _pad: 0,
            daddr: [0; 16],
            comm: [0; 16],
            head: [0; HEAD_BYTES],
        }
    }
}

/// Key of the `CLOSED` map: the tuple that `inet_sk_error_report` carries
/// (it has no socket address), so the error can be joined to the attempt
/// that closed just before it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TupleKey {
    pub family: u16,
    /// Source port, host order (set once the connect hashed the socket).
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    pub _pad: u16,
    /// Destination address; IPv4 uses the first 4 bytes, the rest are zero.
    pub daddr: [u8; 16],
}

/// Where a UDP socket sends, learned from the cgroup connect/sendmsg hooks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpDest {
    pub netns: u64,
    pub dport: u16,
    pub family: u16,
    pub _pad: u32,
    pub daddr: [u8; 16],
}

/// Note left by the cgroup `sendmsg4/6` hook for the `sock_send_length`
/// that follows in the same syscall, in a per-CPU slot (a per-CPU array is
/// far cheaper than a hash map on every datagram). The thread id and socket
/// must match, or the note is someone else's (or the thread migrated CPUs
/// in between, and the send is counted with an unknown destination).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsgDest {
    /// Kernel address of the socket; joins to `sock_send_length`'s `sk`.
    pub sk: u64,
    pub tid: u32,
    pub _pad: u32,
    pub dest: UdpDest,
}

/// A client TCP connection from ESTABLISHED until it ends, keyed by socket
/// address in `CONNS`: the request being sent and the response being
/// received, so one exchange becomes one record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    /// The attempt's record (process, destination, cgroup); `start_ns` is
    /// when the connection was established.
    pub tmpl: Event,
    /// Fingerprint of the current request's first send.
    pub req_hash: u64,
    pub req_sent: u32,
    pub req_recv: u32,
    pub total_sent: u32,
    pub total_recv: u32,
    /// [`conn_phase`]: what the connection did last.
    pub phase: u32,
    /// 1 when `reply_head` holds the current response's first bytes.
    pub head_set: u32,
    /// First bytes of the current response, when the receiver was probed.
    pub reply_head: [u8; HEAD_BYTES],
}

/// [`Conn::phase`] values.
pub mod conn_phase {
    pub const IDLE: u32 = 0;
    pub const SENDING: u32 = 1;
    pub const RECEIVING: u32 = 2;
}

/// Left by the on-demand `sys_enter` probe for the socket send that follows
/// in the same syscall: FNV-1a of the first [`FINGERPRINT_BYTES`] bytes,
/// whole and without the first two (a DNS transaction id changes on every
/// retry of the same query).
///
/// Kept in a per-CPU slot, like [`MsgDest`], with the thread it belongs to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    pub whole: u64,
    pub skip2: u64,
    /// Thread that is sending; 0 when the slot is empty.
    pub tid: u32,
    pub _pad: u32,
    /// The send's first [`FINGERPRINT_HEAD`] bytes (a DNS query's name
    /// starts at byte 12).
    pub head: [u8; FINGERPRINT_HEAD],
    pub _pad2: [u8; 4],
}

/// How many leading bytes of a send the fingerprint covers.
pub const FINGERPRINT_BYTES: usize = 64;
/// How many leading bytes of a send are kept beside its fingerprint.
pub const FINGERPRINT_HEAD: usize = 12 + HEAD_BYTES;

/// Tracepoint field offsets, read from tracefs format files at load time
/// and written into the programs' `.rodata` before load, so a kernel that
/// adds or moves fields still decodes correctly. All `u32` so the struct
/// has no padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Offsets {
    // sock:inet_sock_set_state
    pub ss_skaddr: u32,
    pub ss_oldstate: u32,
    pub ss_newstate: u32,
    pub ss_sport: u32,
    pub ss_dport: u32,
    pub ss_family: u32,
    pub ss_protocol: u32,
    pub ss_daddr: u32,
    pub ss_daddr_v6: u32,
    // sock:inet_sk_error_report
    pub er_error: u32,
    pub er_sport: u32,
    pub er_dport: u32,
    pub er_family: u32,
    pub er_protocol: u32,
    pub er_daddr: u32,
    pub er_daddr_v6: u32,
    // sock:sock_send_length
    pub sl_sk: u32,
    pub sl_family: u32,
    pub sl_protocol: u32,
    pub sl_ret: u32,
    // sock:sock_recv_length
    pub rl_sk: u32,
    pub rl_family: u32,
    pub rl_protocol: u32,
    pub rl_ret: u32,
    pub rl_flags: u32,
    // tcp:tcp_receive_reset
    pub rr_skaddr: u32,
    // tcp:tcp_retransmit_skb
    pub rt_skaddr: u32,
    pub rt_state: u32,
    /// `err` is absent on 6.12 and older (the tracepoint also fires for
    /// retransmits that failed to go out); [`FIELD_ABSENT`] there.
    pub rt_err: u32,
    // sched:sched_process_fork
    pub fk_child_pid: u32,
    // sched:sched_process_exit
    pub ex_pid: u32,
    pub ex_group_dead: u32,
    // syscalls:sys_exit_connect
    pub xc_ret: u32,
}

/// Offset value for an optional tracepoint field this kernel lacks.
pub const FIELD_ABSENT: u32 = u32::MAX;

/// Indices into the `STATS` per-CPU array.
///
/// The first [`anomaly::COUNT`] slots count kernel-side anomalies, one per
/// kind (the kind is the slot); then two slots per [`table`]: inserts of
/// new keys and successful deletes made by the programs, from which user
/// space derives LRU evictions (inserts − deletes − live entries).
pub mod stat {
    /// Ring buffer full: an event was lost ([`super::anomaly::RING_FULL`]).
    pub const RING_DROPS: u32 = 0;
    /// A bounded map refused an insert (an attempt could not be tracked;
    /// [`super::anomaly::MAP_INSERT`]).
    pub const MAP_FULL: u32 = 1;
    /// First per-table slot: see [`inserts`] and [`deletes`].
    pub const TABLES: u32 = super::anomaly::COUNT;
    /// Slot counting the new keys the programs inserted into `table`.
    pub const fn inserts(table: u32) -> u32 {
        TABLES + 2 * table
    }
    /// Slot counting the keys the programs deleted from `table`.
    pub const fn deletes(table: u32) -> u32 {
        TABLES + 2 * table + 1
    }
    /// A suspect's user stack walk failed (`bpf_get_stackid`: a full
    /// or colliding `STACKS`, an unreadable frame): that call is counted
    /// without a stack.
    pub const STACK_WALK_FAILED: u32 = TABLES + 2 * super::table::COUNT;
    /// A stack copy was lost (its ring full, or the stack unreadable).
    pub const STACK_COPY_LOST: u32 = STACK_WALK_FAILED + 1;
    pub const COUNT: u32 = STACK_COPY_LOST + 1;
}

/// Kinds of kernel-side anomaly: each is counted in its `STATS` slot (the
/// kind is the slot number) and logged through aya-log at most once per
/// second per CPU.
pub mod anomaly {
    /// A ring reservation failed: the record was lost.
    pub const RING_FULL: u32 = 0;
    /// A map refused an insert (full, or out of memory).
    pub const MAP_INSERT: u32 = 1;
    /// A state the programs do not expect (e.g. a TCP socket leaving
    /// SYN_SENT for something other than ESTABLISHED or CLOSE, or an entry
    /// found and then not removable).
    pub const UNEXPECTED_STATE: u32 = 2;
    /// A hook body failed on a helper (a tracepoint field unreadable…)
    /// and dropped what it was doing.
    pub const PROBE_ERROR: u32 = 3;
    pub const COUNT: u32 = 4;
    /// Names, by kind, for logs, status and metrics.
    pub const NAMES: [&str; COUNT as usize] =
        ["ring_full", "map_insert", "unexpected_state", "probe_error"];
}

/// The LRU maps whose inserts and deletes the programs count (see
/// [`stat::inserts`]), so evictions can be told apart from deletes.
pub mod table {
    pub const INFLIGHT: u32 = 0;
    pub const CLOSED: u32 = 1;
    pub const PRE_SYN: u32 = 2;
    pub const UDP_DEST: u32 = 3;
    pub const SUSPECTS: u32 = 4;
    pub const SYSCALLS: u32 = 5;
    pub const RECV_NOTES: u32 = 6;
    pub const CONNS: u32 = 7;
    pub const TLS_FP: u32 = 8;
    pub const TLS_READS: u32 = 9;
    pub const THREAD_SOCK: u32 = 10;
    pub const STACK_COUNTS: u32 = 11;
    pub const STACK_COPIED: u32 = 12;
    pub const COUNT: u32 = 13;
    /// Map names, by table number (as in the object file).
    pub const NAMES: [&str; COUNT as usize] = [
        "INFLIGHT",
        "CLOSED",
        "PRE_SYN",
        "UDP_DEST",
        "SUSPECTS",
        "SYSCALLS",
        "RECV_NOTES",
        "CONNS",
        "TLS_FP",
        "TLS_READS",
        "THREAD_SOCK",
        "STACK_COUNTS",
        "STACK_COPIED",
    ];
}

/// Map capacities; the user side reads nothing from these but the tests.
pub mod capacity {
    /// Sockets between SYN_SENT and their outcome.
    pub const INFLIGHT: u32 = 65_536;
    /// Closed attempts waiting for their error report (microseconds).
    pub const CLOSED: u32 = 8_192;
    /// Threads between the connect hook and SYN_SENT (one syscall).
    pub const PRE_SYN: u32 = 16_384;
    /// UDP sockets with a connected destination.
    pub const UDP_DEST: u32 = 65_536;
    /// Processes the on-demand probes look at (LRU: children of a suspect
    /// inherit it in the kernel, so a fork storm can only evict).
    pub const SUSPECTS: u32 = 16_384;
    /// cgroups whose processes are all suspect.
    pub const SUSPECT_CGROUPS: u32 = 256;
    /// Threads inside a receive syscall of a suspect process.
    pub const RECV_NOTES: u32 = 4_096;
    /// Client TCP connections tracked for request/response exchanges.
    pub const CONNS: u32 = 65_536;
    /// Ring buffer bytes: 4 MiB, about 40,000 records, so the 100 ms
    /// drain tick has headroom even for a host-wide burst.
    pub const EVENTS_BYTES: u32 = 4 << 20;
}

pub mod enforce;
pub mod stack;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and
    // byte arrays, and have explicit padding fields, so every bit pattern is
    // valid and no byte is uninitialised.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::UdpDest {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MsgDest {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Offsets {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Conn {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Fingerprint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::BudgetKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::Budget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::Bucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::Counters {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::EnforceConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::enforce::SockNote {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::stack::CountKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::stack::Copy {}
}
