//! The budget decision at connect: find the most specific budget of the
//! caller (process, then its cgroups from the nearest up), refill its
//! token bucket, take a token or deny.
use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_ktime_get_ns,
            bpf_set_retval,
        },
    },
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
    programs::SockAddrContext,
};
use detector_common::{
    AF_INET, IPPROTO_TCP,
    enforce::{
        Bucket, Budget, BudgetKey, CGROUP_DEPTH, Counters, EnforceConfig, MAX_BUDGETS, TOKEN, kind,
        mode, present, scope,
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

/// The destination of the connect, as a key with no target yet.
#[inline(always)]
fn destination(ctx: &SockAddrContext, family: u16) -> BudgetKey {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let sa = unsafe { &*ctx.sock_addr };
    let mut words = [0u32; 4];
    // SAFETY: plain loads of context fields, one per field (the verifier
    // accepts only constant offsets from the context pointer).
    unsafe {
        if family == AF_INET {
            words[0] = read_volatile(&sa.user_ip4);
        } else {
            words[0] = read_volatile(&sa.user_ip6[0]);
            words[1] = read_volatile(&sa.user_ip6[1]);
            words[2] = read_volatile(&sa.user_ip6[2]);
            words[3] = read_volatile(&sa.user_ip6[3]);
        }
    }
    let mut daddr = [0u8; 16];
    daddr[0..4].copy_from_slice(&words[0].to_ne_bytes());
    daddr[4..8].copy_from_slice(&words[1].to_ne_bytes());
    daddr[8..12].copy_from_slice(&words[2].to_ne_bytes());
    daddr[12..16].copy_from_slice(&words[3].to_ne_bytes());
    BudgetKey {
        id: 0,
        scope: 0,
        _pad: 0,
        // SAFETY: as above.
        dport: u16::from_be(unsafe { read_volatile(&sa.user_port) } as u16),
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

/// The budget that governs the caller's connect to `dest`, if any.
#[inline(always)]
fn budget_of(tgid: u32, have: u64, dest: &BudgetKey) -> Option<Budget> {
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
        return Some(*b);
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
        return Some(*b);
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
            return Some(*b);
        }
    }
    None
}

/// Refills the bucket for the time passed and the credits deposited, then
/// takes a token if there is one.
#[inline(always)]
fn take(budget: &Budget, bucket: &mut Bucket, now: u64) -> bool {
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
    if bucket.tokens_milli >= TOKEN {
        bucket.tokens_milli -= TOKEN;
        true
    } else {
        false
    }
}

pub fn connect(ctx: &SockAddrContext, family: u16) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for this program type.
    let proto = unsafe { read_volatile(&(*ctx.sock_addr).protocol) } as u16;
    // UDP is never denied: failing fast makes a tight loop faster.
    if proto != IPPROTO_TCP {
        return ALLOW;
    }
    let Some(config) = ENFORCE_CONFIG.get(0) else {
        return ALLOW;
    };
    if config.present == 0 {
        return ALLOW;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if tgid <= 1 || tgid == config.self_tgid {
        return ALLOW;
    }
    let dest = destination(ctx, family);
    let Some(budget) = budget_of(tgid, config.present, &dest) else {
        return ALLOW;
    };
    if budget.slot >= MAX_BUDGETS {
        return ALLOW;
    }
    let Some(counters) = COUNTERS.get_ptr_mut(budget.slot) else {
        return ALLOW;
    };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else writes it
    // while this program runs on this CPU.
    let counters = unsafe { &mut *counters };
    // SAFETY: no arguments; always safe to call.
    let now = unsafe { bpf_ktime_get_ns() };
    if now >= budget.expires_ns {
        counters.expired += 1;
        return ALLOW;
    }
    let Some(bucket) = BUCKETS.get_ptr_mut(budget.slot) else {
        return ALLOW;
    };
    // SAFETY: a valid element of an array map; a racing CPU can only make
    // the count off by a token.
    if take(&budget, unsafe { &mut *bucket }, now) {
        counters.allowed += 1;
        return ALLOW;
    }
    counters.denied += 1;
    if budget.mode != mode::ENFORCE {
        return ALLOW;
    }
    // SAFETY: sets this hook's return value; valid in cgroup sock_addr programs.
    if unsafe { bpf_set_retval(-(budget.errno as i32)) } != 0 {
        return ALLOW;
    }
    DENY
}
