//! The budget decisions: at connect, find the most specific budget of the
//! caller (process, then its cgroups from the nearest up), refill its
//! token bucket, take a token or deny; note the socket it governs; at
//! egress, a governed socket's request is counted within or beyond its
//! budget and steered into its budget's htb class, which makes it leave
//! at the budget's rate (see `detector_common::enforce::shape`).
use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
        },
    },
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{SkBuffContext, SockAddrContext},
};
use detector_common::{
    IPPROTO_TCP, IPPROTO_UDP,
    enforce::{
        Bucket, Budget, BudgetKey, CGROUP_DEPTH, Counters, EnforceConfig, MAX_BUDGETS,
        MAX_DELAY_NS, MAX_SOCKETS, SockNote, TOKEN, kind, mode, present, scope, shape, sock,
    },
};

use crate::{ALLOW, DENY};

/// The most refill one decision grants.
const MAX_REFILL_NS: u64 = 10_000_000_000;
/// The highest rate a budget may have (the daemon refuses more).
const MAX_RATE_MILLI: u64 = detector_common::enforce::MAX_RATE_PER_S * TOKEN as u64;

/// Budgets by target, written by the daemon.
#[map]
pub static BUDGETS: HashMap<BudgetKey, Budget> = HashMap::with_max_entries(MAX_BUDGETS, 0);

/// Each budget's token bucket, by slot; only this program writes it.
#[map]
pub static BUCKETS: Array<Bucket> = Array::with_max_entries(MAX_BUDGETS, 0);

/// Each budget's decisions, by slot, per CPU.
#[map]
pub static COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_BUDGETS, 0);

/// Which key shapes exist, and who is never throttled.
#[map]
pub static ENFORCE_CONFIG: Array<EnforceConfig> = Array::with_max_entries(1, 0);

/// Sockets a budget governs, by cookie (see `SockNote`).
#[map]
pub static SOCK_BUDGET: LruHashMap<u64, SockNote> = LruHashMap::with_max_entries(MAX_SOCKETS, 0);

/// Egress devices governed packets left through, by ifindex: the hook
/// adds `WANTED`, the daemon answers `READY` once the qdisc is there.
#[map]
pub static SLOW_DEVICES: HashMap<u32, u32> = HashMap::with_max_entries(shape::MAX_DEVICES, 0);

/// The destination of the connect, as a key with no target yet.
#[inline(always)]
fn destination(ctx: &SockAddrContext, family: u16) -> BudgetKey {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    let (daddr, dport) = crate::sockaddr::user_dest(sa, family);
    BudgetKey {
        id: 0,
        scope: 0,
        _pad: 0,
        dport,
        family,
        _pad2: 0,
        daddr,
    }
}

/// The budget of `id` in `scope` that matches `dest`, most specific first,
/// trying only the shapes `have` says exist.
#[inline(always)]
fn find(
    key: &mut BudgetKey,
    have: u64,
    bits: [u64; 3],
    dest: &BudgetKey,
) -> Option<&'static Budget> {
    key.family = dest.family;
    key.daddr = dest.daddr;
    key.dport = dest.dport;
    if have & bits[0] != 0 {
        // SAFETY: the value is only read, and copied out before any update.
        if let Some(b) = unsafe { BUDGETS.get(*key) } {
            return Some(b);
        }
    }
    key.dport = 0;
    if have & bits[1] != 0 {
        // SAFETY: as above.
        if let Some(b) = unsafe { BUDGETS.get(*key) } {
            return Some(b);
        }
    }
    key.family = 0;
    key.daddr = [0; 16];
    if have & bits[2] != 0 {
        // SAFETY: as above.
        if let Some(b) = unsafe { BUDGETS.get(*key) } {
            return Some(b);
        }
    }
    None
}

/// The budget that governs the caller's connect to `dest`, if any, and
/// the key it was found at.
#[inline(always)]
fn budget_of(tgid: u32, have: u64, dest: &BudgetKey) -> Option<(BudgetKey, Budget)> {
    let mut key = *dest;
    key.scope = scope::PROCESS;
    key.id = tgid as u64;
    if let Some(b) = find(
        &mut key,
        have,
        [
            present::PROCESS_DEST_PORT,
            present::PROCESS_DEST,
            present::PROCESS_ANY,
        ],
        dest,
    ) {
        return Some((key, *b));
    }
    let cgroup_bits = [
        present::CGROUP_DEST_PORT,
        present::CGROUP_DEST,
        present::CGROUP_ANY,
    ];
    if have & (cgroup_bits[0] | cgroup_bits[1] | cgroup_bits[2]) == 0 {
        return None;
    }
    key.scope = scope::CGROUP;
    // SAFETY: no arguments; always safe to call.
    let own = unsafe { bpf_get_current_cgroup_id() };
    key.id = own;
    if let Some(b) = find(&mut key, have, cgroup_bits, dest) {
        return Some((key, *b));
    }
    // Ancestors, from the root down; the walk ends at the caller's own.
    for level in 1..CGROUP_DEPTH {
        // SAFETY: any level is valid; past the depth it returns 0.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == own {
            break;
        }
        key.id = id;
        if let Some(b) = find(&mut key, have, cgroup_bits, dest) {
            return Some((key, *b));
        }
    }
    None
}

/// Refills the bucket for the time passed and the credits deposited
/// (starting it over when the slot has a new budget).
#[inline(always)]
fn refill(budget: &Budget, bucket: &mut Bucket, now: u64) {
    if bucket.generation != budget.generation || bucket.last_ns == 0 {
        *bucket = Bucket {
            tokens_milli: budget.burst_milli as i64,
            last_ns: now,
            credit_seen: budget.credit_milli,
            generation: budget.generation,
            _pad: 0,
        };
    }
    // At most 10 s of refill at once: with the daemon's cap of 10^6/s
    // (10^9 milli-tokens), the product stays below 2^64 with no 128-bit
    // arithmetic, which BPF lacks.
    let elapsed = now.saturating_sub(bucket.last_ns).min(MAX_REFILL_NS);
    // Whole milli-tokens only; the remainder of the time stays for later.
    let earned = elapsed * budget.rate_milli.min(MAX_RATE_MILLI) / 1_000_000_000;
    if earned > 0 {
        bucket.last_ns = now;
        bucket.tokens_milli = bucket.tokens_milli.saturating_add(earned as i64);
    } else if budget.rate_milli == 0 {
        bucket.last_ns = now;
    }
    if budget.kind == kind::RETRY && budget.credit_milli > bucket.credit_seen {
        let credit = budget.credit_milli - bucket.credit_seen;
        bucket.credit_seen = budget.credit_milli;
        bucket.tokens_milli = bucket.tokens_milli.saturating_add(credit as i64);
    }
    let cap = budget.burst_milli as i64;
    if bucket.tokens_milli > cap {
        bucket.tokens_milli = cap;
    }
}

/// Takes a token if there is one (a connect: denied otherwise).
#[inline(always)]
fn take(budget: &Budget, bucket: &mut Bucket, now: u64) -> bool {
    refill(budget, bucket, now);
    if bucket.tokens_milli >= TOKEN {
        bucket.tokens_milli -= TOKEN;
        true
    } else {
        false
    }
}

/// Takes a token, or one owed (a send: delayed otherwise). Returns how
/// long the send waits: 0 with a token, else until the bucket would hold
/// one — each send in debt waits one interval more than the last, so a
/// storm leaves at the budget's rate, up to [`MAX_DELAY_NS`] late.
#[inline(always)]
fn take_or_wait(budget: &Budget, bucket: &mut Bucket, now: u64) -> u64 {
    refill(budget, bucket, now);
    if bucket.tokens_milli >= TOKEN {
        bucket.tokens_milli -= TOKEN;
        return 0;
    }
    let rate = budget.rate_milli.clamp(1, MAX_RATE_MILLI);
    let deficit = (TOKEN - bucket.tokens_milli) as u64;
    // deficit ≤ TOKEN + one second of rate: the product fits in 64 bits.
    // checked_div: a plain `/` by a non-constant leaves a panic path
    // (a call that never returns), which the verifier refuses.
    let Some(wait) = (deficit.min(rate + TOKEN as u64) * 1_000_000_000).checked_div(rate) else {
        return MAX_DELAY_NS;
    };
    if wait >= MAX_DELAY_NS {
        return MAX_DELAY_NS;
    }
    bucket.tokens_milli -= TOKEN;
    wait
}

/// What a budget decided, counted on this CPU.
#[inline(always)]
fn counters_of(budget: &Budget) -> Option<&'static mut Counters> {
    if budget.slot >= MAX_BUDGETS {
        return None;
    }
    let c = COUNTERS.get_ptr_mut(budget.slot)?;
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it
    // while this program runs on this CPU.
    Some(unsafe { &mut *c })
}

/// A budget's counters and bucket, and the time, if it still applies:
/// None (allow) past its expiry, counted as such, or on a map miss.
#[inline(always)]
fn live(budget: &Budget) -> Option<(&'static mut Counters, &'static mut Bucket, u64)> {
    let counters = counters_of(budget)?;
    // SAFETY: no arguments; always safe to call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= budget.expires_ns {
        counters.expired += 1;
        return None;
    }
    let bucket = BUCKETS.get_ptr_mut(budget.slot)?;
    // SAFETY: a valid element of an array map; a racing CPU can only make
    // the count off by a token.
    Some((counters, unsafe { &mut *bucket }, now))
}

/// The budget and the caller, for the sock_addr hooks: None when nothing
/// governs this caller's connect or send to `dest`.
#[inline(always)]
fn governing(dest: &BudgetKey) -> Option<(BudgetKey, Budget)> {
    let config = ENFORCE_CONFIG.get(0)?;
    if config.present == 0 {
        return None;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid <= 1 || tgid == config.self_tgid {
        return None;
    }
    budget_of(tgid, config.present, dest)
}

/// Notes the socket of a sock_addr hook as governed by the budget at `key`.
#[inline(always)]
fn note_socket(ctx: &SockAddrContext, key: &BudgetKey, mut flags: u32) {
    // SAFETY: the helpers take the program context, which ctx is.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: as above.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if ENFORCE_CONFIG
        .get(0)
        .is_some_and(|c| c.netns_cookie != 0 && c.netns_cookie == netns)
    {
        flags |= sock::LOCAL_NETNS;
    }
    let note = SockNote {
        key: *key,
        sent: 0,
        flags,
    };
    let _ = SOCK_BUDGET.insert(cookie, note, 0);
}

pub fn connect(ctx: &SockAddrContext, family: u16) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let proto = unsafe { read_volatile(&(*ctx.sock_addr).protocol) } as u16;
    let dest = destination(ctx, family);
    let Some((key, budget)) = governing(&dest) else {
        return ALLOW;
    };
    // UDP is never denied (failing fast makes a tight loop faster): its
    // sends are slowed at egress instead.
    if proto != IPPROTO_TCP {
        note_socket(ctx, &key, 0);
        return ALLOW;
    }
    let Some((counters, bucket, now)) = live(&budget) else {
        return ALLOW;
    };
    if take(&budget, bucket, now) {
        counters.allowed += 1;
        note_socket(ctx, &key, sock::CONNECT_COUNTED);
        return ALLOW;
    }
    counters.denied += 1;
    if budget.mode != mode::ENFORCE {
        note_socket(ctx, &key, sock::CONNECT_COUNTED);
        return ALLOW;
    }
    // SAFETY: sets this hook's return value; valid in cgroup sock_addr programs.
    if unsafe { bpf_set_retval(-(budget.errno as i32)) } != 0 {
        return ALLOW;
    }
    DENY
}

/// An unconnected UDP send: its socket is governed by the budget of this
/// destination, slowed at egress.
pub fn sendmsg(ctx: &SockAddrContext, family: u16) -> i32 {
    let dest = destination(ctx, family);
    if let Some((key, _)) = governing(&dest) {
        note_socket(ctx, &key, 0);
    }
    ALLOW
}

/// Egress of a governed socket: under `enforce`, every request is steered
/// into its budget's htb class, whose rate and burst are the budget's, so
/// htb's bucket paces it — requests beyond the budget leave later, never
/// dropped. This program's own bucket mirrors htb's to count each request
/// allowed (it will not wait) or slowed (it will). Pure ACKs, and
/// a new connection's first request (its connect was the attempt), pass
/// untouched. Always passes the packet.
pub fn egress(ctx: &SkBuffContext) -> i32 {
    // SAFETY: the helper takes the program context, which ctx is.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(note) = SOCK_BUDGET.get_ptr_mut(cookie) else {
        return ALLOW;
    };
    // SAFETY: a valid map value; only this socket's packets touch it.
    let note = unsafe { &mut *note };
    // SAFETY: the value is only read, and copied out at once.
    let Some(budget) = (unsafe { BUDGETS.get(note.key) }).copied() else {
        return ALLOW;
    };
    if !carries_payload(ctx) {
        return ALLOW;
    }
    note.sent = note.sent.saturating_add(1);
    if note.sent == 1 && note.flags & sock::CONNECT_COUNTED != 0 {
        return ALLOW;
    }
    let Some((counters, bucket, now)) = live(&budget) else {
        return ALLOW;
    };
    let wait = take_or_wait(&budget, bucket, now);
    counters.packets += 1;
    counters.bytes += ctx.len() as u64;
    if wait == 0 {
        counters.allowed += 1;
    } else {
        counters.slowed += 1;
    }
    if budget.mode == mode::ENFORCE && note.flags & sock::LOCAL_NETNS != 0 {
        steer(ctx, budget.slot);
    }
    ALLOW
}

/// Puts the packet in the class of budget `slot` if the device has
/// stormguard's qdisc; otherwise reports the device to the daemon and
/// leaves the packet as it is.
#[inline(always)]
fn steer(ctx: &SkBuffContext, slot: u32) {
    // SAFETY: a plain read of a context field.
    let ifindex = unsafe { read_volatile(&(*ctx.skb.skb).ifindex) };
    // SAFETY: the value is only read.
    match unsafe { SLOW_DEVICES.get(ifindex) } {
        Some(&shape::READY) => {
            // SAFETY: a context field cgroup_skb programs may write.
            unsafe { (*ctx.skb.skb).priority = shape::priority(slot) };
        }
        Some(_) => {}
        None => {
            let _ = SLOW_DEVICES.insert(ifindex, shape::WANTED, 1);
        }
    }
}

/// Whether the packet carries data: UDP always; TCP when the segment is
/// longer than its headers.
#[inline(always)]
fn carries_payload(ctx: &SkBuffContext) -> bool {
    let len = ctx.len() as usize;
    // skb->protocol is the ethertype, network order.
    let ethertype = u16::from_be(ctx.skb.protocol() as u16);
    let (l4, ip_len) = if ethertype == 0x0800 {
        let Ok(vihl) = ctx.load::<u8>(0) else {
            return false;
        };
        let Ok(proto) = ctx.load::<u8>(9) else {
            return false;
        };
        (proto, ((vihl & 0x0f) as usize) * 4)
    } else if ethertype == 0x86dd {
        let Ok(next) = ctx.load::<u8>(6) else {
            return false;
        };
        (next, 40)
    } else {
        return false;
    };
    match l4 as u16 {
        IPPROTO_UDP => true,
        IPPROTO_TCP => {
            let Ok(off) = ctx.load::<u8>(ip_len + 12) else {
                return false;
            };
            len > ip_len + ((off >> 4) as usize) * 4
        }
        _ => false,
    }
}
