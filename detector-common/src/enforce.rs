//! Budgets the kernel enforces: the user side writes [`Budget`]s keyed by
//! [`BudgetKey`]; the kernel keeps each budget's token bucket in
//! [`Bucket`] (a slot of an array only the kernel writes) and its
//! decisions in [`Counters`] (per CPU). Splitting what each side writes
//! means neither ever overwrites the other's fields.

/// Budget slots: the cap on budgets, and the size of `BUCKETS`/`COUNTERS`.
pub const MAX_BUDGETS: u32 = 256;

/// One token, in the milli-tokens buckets count in.
pub const TOKEN: i64 = 1000;

/// The highest rate a budget may have, per second.
pub const MAX_RATE_PER_S: u64 = 1_000_000;

/// Whose attempts a budget counts ([`BudgetKey::scope`]).
pub mod scope {
    /// A process (thread group id).
    pub const PROCESS: u8 = 1;
    /// A cgroup (v2 id) and every cgroup below it; a systemd unit is its cgroup.
    pub const CGROUP: u8 = 2;
}

/// Bits of [`EnforceConfig::present`]: which key shapes exist, so the
/// hooks skip lookups that cannot match.
pub mod present {
    pub const PROCESS_DEST_PORT: u64 = 1;
    pub const PROCESS_DEST: u64 = 2;
    pub const PROCESS_ANY: u64 = 4;
    pub const CGROUP_DEST_PORT: u64 = 8;
    pub const CGROUP_DEST: u64 = 16;
    pub const CGROUP_ANY: u64 = 32;
}

/// [`Budget::kind`].
pub mod kind {
    /// Refills at `rate` per second up to `burst`.
    pub const RATE: u8 = 1;
    /// Finagle-style: refills at the floor `rate`, and every success the
    /// daemon sees deposits `1 + ratio` tokens (the attempt's own token
    /// back, plus the ratio).
    pub const RETRY: u8 = 2;
}

/// [`Budget::mode`].
pub mod mode {
    /// Out of budget: the connect fails.
    pub const ENFORCE: u8 = 1;
    /// Out of budget: counted as denied, but allowed.
    pub const DRY_RUN: u8 = 2;
}

/// Key of `BUDGETS`. `family == 0` matches any destination; `dport == 0`
/// any port of `daddr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BudgetKey {
    /// Thread group id or cgroup id, by `scope`.
    pub id: u64,
    pub scope: u8,
    pub _pad: u8,
    /// Destination port, host order.
    pub dport: u16,
    pub family: u16,
    pub _pad2: u16,
    /// Destination address; IPv4 uses the first 4 bytes.
    pub daddr: [u8; 16],
}

/// Value of `BUDGETS`, written only by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Index of this budget's bucket and counters.
    pub slot: u32,
    /// Positive errno a denied connect fails with.
    pub errno: u32,
    /// Refill, milli-tokens per second (the floor of a retry budget).
    pub rate_milli: u64,
    /// Bucket size, milli-tokens.
    pub burst_milli: u64,
    /// Retry budgets: every deposit so far, milli-tokens; the kernel adds
    /// what it has not yet seen.
    pub credit_milli: u64,
    /// CLOCK_MONOTONIC ns after which the budget no longer applies,
    /// checked by the kernel on every decision.
    pub expires_ns: u64,
    /// Bumped when the slot is reused, so the kernel restarts the bucket.
    pub generation: u32,
    pub kind: u8,
    pub mode: u8,
    pub _pad: u16,
}

/// A budget's token bucket, written only by the kernel (`BUCKETS[slot]`).
/// Two CPUs may race on one bucket: the worst case is a token granted
/// twice, which the tests' ±20% absorbs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub tokens_milli: i64,
    pub last_ns: u64,
    pub credit_seen: u64,
    /// The [`Budget::generation`] this state belongs to.
    pub generation: u32,
    pub _pad: u32,
}

/// Decisions of one budget on one CPU (`COUNTERS[slot]`, per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allowed: u64,
    /// Delayed instead of failed.
    pub slowed: u64,
    /// Failed (or, in dry run, would have been).
    pub denied: u64,
    /// Seen after the budget's expiry, let through.
    pub expired: u64,
    /// Payload packets of governed sockets decided at egress, and their
    /// bytes (IP length): the daemon sizes each budget's qdisc class in
    /// bytes per second from the mean packet.
    pub packets: u64,
    pub bytes: u64,
}

/// `ENFORCE_CONFIG[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnforceConfig {
    /// [`present`] bits.
    pub present: u64,
    /// The daemon's own thread group id: never throttled, whatever the maps say.
    pub self_tgid: u32,
    pub _pad: u32,
    /// The daemon's network namespace cookie: only sockets of this
    /// namespace leave through devices the daemon shapes.
    pub netns_cookie: u64,
}

/// The depth of cgroup ancestors the hooks walk for cgroup budgets.
pub const CGROUP_DEPTH: i32 = 12;

/// Sockets a budget governs, by socket cookie (`SOCK_BUDGET`): noted by
/// the connect and sendmsg hooks, or by the daemon for sockets already
/// open when the budget began. LRU: a note outlives nothing it needs to.
pub const MAX_SOCKETS: u32 = 65_536;

/// [`SockNote::flags`].
pub mod sock {
    /// The connect was counted: the connection's first request is free.
    pub const CONNECT_COUNTED: u32 = 1;
    /// The socket is in the daemon's network namespace, so its packets
    /// leave through devices the daemon can put a qdisc on.
    pub const LOCAL_NETNS: u32 = 2;
}

/// Value of `SOCK_BUDGET`: the budget whose key governs the socket, and
/// how many payload packets it sent since.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockNote {
    pub key: BudgetKey,
    pub sent: u32,
    pub flags: u32,
}

/// The most debt a bucket runs up for sends: past a second of waiting a
/// send is counted slowed without adding to the debt, so the count
/// recovers as soon as the storm calms.
pub const MAX_DELAY_NS: u64 = 1_000_000_000;

/// Slowing: a governed socket's payload packets are steered (by
/// `skb->priority`) into its budget's class of an htb qdisc the daemon
/// puts on the egress device; the class's rate is the budget's, so the
/// packets leave later instead of failing. The qdisc's default is no
/// class: everything else, and everything once the programs detach,
/// takes htb's direct path (fail-open).
pub mod shape {
    /// The htb qdisc's handle major ("SG"): it marks the qdisc as
    /// stormguard's, so it never touches a qdisc someone else made.
    pub const QDISC_MAJOR: u32 = 0x5347;
    /// Devices the egress hook reports (`SLOW_DEVICES`).
    pub const MAX_DEVICES: u32 = 64;
    /// `SLOW_DEVICES` values: the hook saw a governed packet leave here...
    pub const WANTED: u32 = 0;
    /// ...and the daemon has put the qdisc and every budget's class on it.
    pub const READY: u32 = 1;

    /// The class minor of a budget slot. The low 4 bits stay 0 so that on
    /// a device without the qdisc (pfifo_fast reads them as a band) the
    /// packet keeps the best-effort band.
    pub const fn class_minor(slot: u32) -> u32 {
        (slot + 1) << 4
    }

    /// `skb->priority` that htb maps to the class of `slot`.
    pub const fn priority(slot: u32) -> u32 {
        (QDISC_MAJOR << 16) | class_minor(slot)
    }
}
