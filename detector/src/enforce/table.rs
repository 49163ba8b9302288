//! The budgets the daemon holds, pure: ids, kernel slots and their
//! generations, the cap, expiry, and the kernel's view of each
//! ([`BudgetKey`] → [`Budget`]). No kernel, no clock: times come in.
use std::collections::BTreeMap;
use std::net::IpAddr;

use detector_common::enforce::{
    Budget, BudgetKey, MAX_BUDGETS, MAX_RATE_PER_S, TOKEN, kind, mode, present, scope,
};
use serde::{Deserialize, Serialize};

use super::request::{DestSpec, EnforceError, TargetSpec};
use crate::detect::Subject;

/// Whose attempts, resolved: the kernel's scope and id, and how to show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub spec: TargetSpec,
    /// `scope::PROCESS` or `scope::CGROUP`.
    pub scope: u8,
    /// Thread group id or cgroup id.
    pub id: u64,
    /// `pid 1234 (curl)`, `cgroup /x`, `unit nginx.service`.
    pub label: String,
    /// A process's start time (clock ticks since boot), so a budget never
    /// follows a reused pid.
    pub start_time: Option<u64>,
}

/// How a budget came to be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Origin {
    Manual,
    /// From a storm verdict on `subject`.
    Auto {
        subject: Subject,
        incident: Option<String>,
    },
}

/// What a budget allows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limit {
    pub rate_per_s: f64,
    pub burst: u32,
    /// Some: a retry budget, successes deposit this fraction.
    pub retry_ratio: Option<f64>,
    pub errno: u32,
    pub dry_run: bool,
}

impl Limit {
    /// Checks the numbers a caller gave.
    pub fn check(&self) -> Result<(), EnforceError> {
        if !(self.rate_per_s > 0.0 && self.rate_per_s <= MAX_RATE_PER_S as f64) {
            return Err(EnforceError::Invalid(format!(
                "rate {} is out of range: give 0 < rate ≤ {MAX_RATE_PER_S} per second",
                self.rate_per_s
            )));
        }
        if self.burst == 0 || self.burst as u64 > MAX_RATE_PER_S {
            return Err(EnforceError::Invalid(format!(
                "burst {} is out of range: give 1..={MAX_RATE_PER_S}",
                self.burst
            )));
        }
        if let Some(r) = self.retry_ratio
            && !(r > 0.0 && r <= 1.0)
        {
            return Err(EnforceError::Invalid(format!(
                "retry ratio {r} is out of range: give 0 < ratio ≤ 1"
            )));
        }
        Ok(())
    }
}

/// One budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: u64,
    pub slot: u32,
    pub generation: u32,
    pub target: Target,
    pub dest: Option<DestSpec>,
    pub limit: Limit,
    pub origin: Origin,
    /// Unix ms.
    pub created_ms: i64,
    pub expires_ms: i64,
    /// CLOCK_MONOTONIC ns, what the kernel checks.
    pub expires_ns: u64,
    /// Retry budgets: milli-tokens deposited so far.
    pub credit_milli: u64,
}

impl Entry {
    pub fn key(&self) -> BudgetKey {
        key(self.target.scope, self.target.id, self.dest.as_ref())
    }

    /// The kernel's copy.
    pub fn budget(&self) -> Budget {
        let milli = |v: f64| (v * TOKEN as f64).round().max(1.0) as u64;
        Budget {
            slot: self.slot,
            errno: self.limit.errno,
            rate_milli: milli(self.limit.rate_per_s),
            burst_milli: self.limit.burst as u64 * TOKEN as u64,
            credit_milli: self.credit_milli,
            expires_ns: self.expires_ns,
            generation: self.generation,
            kind: if self.limit.retry_ratio.is_some() {
                kind::RETRY
            } else {
                kind::RATE
            },
            mode: if self.limit.dry_run {
                mode::DRY_RUN
            } else {
                mode::ENFORCE
            },
            _pad: 0,
        }
    }

    /// Deposits for `successes` seen: each gives back its attempt's token
    /// plus the ratio. No-op for plain rates.
    pub fn deposit(&mut self, successes: u64) {
        if let Some(r) = self.limit.retry_ratio {
            let each = TOKEN as u64 + (r * TOKEN as f64).round() as u64;
            self.credit_milli = self
                .credit_milli
                .saturating_add(successes.saturating_mul(each));
        }
    }

    /// The [`present`] bit of this budget's key shape.
    pub fn shape(&self) -> u64 {
        let process = self.target.scope == scope::PROCESS;
        match (process, self.dest.map(|d| d.port.is_some())) {
            (true, Some(true)) => present::PROCESS_DEST_PORT,
            (true, Some(false)) => present::PROCESS_DEST,
            (true, None) => present::PROCESS_ANY,
            (false, Some(true)) => present::CGROUP_DEST_PORT,
            (false, Some(false)) => present::CGROUP_DEST,
            (false, None) => present::CGROUP_ANY,
        }
    }
}

/// The kernel key of a target and destination.
pub fn key(scope: u8, id: u64, dest: Option<&DestSpec>) -> BudgetKey {
    let mut k = BudgetKey {
        id,
        scope,
        _pad: 0,
        dport: 0,
        family: 0,
        _pad2: 0,
        daddr: [0; 16],
    };
    if let Some(d) = dest {
        k.dport = d.port.unwrap_or(0);
        match d.addr {
            IpAddr::V4(a) => {
                k.family = detector_common::AF_INET;
                k.daddr[..4].copy_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                k.family = detector_common::AF_INET6;
                k.daddr = a.octets();
            }
        }
    }
    k
}

/// What a new budget is, before it has an id and a slot.
pub struct Draft {
    pub target: Target,
    pub dest: Option<DestSpec>,
    pub limit: Limit,
    pub origin: Origin,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub expires_ns: u64,
}

/// Every budget, at most `max`.
#[derive(Debug)]
pub struct Table {
    entries: BTreeMap<u64, Entry>,
    next_id: u64,
    max: usize,
    generations: Vec<u32>,
}

impl Table {
    pub fn new(max: u32) -> Self {
        Table {
            entries: BTreeMap::new(),
            next_id: 1,
            max: max.min(MAX_BUDGETS) as usize,
            generations: vec![0; MAX_BUDGETS as usize],
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.entries.values_mut()
    }

    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(&id)
    }

    /// The budget with this kernel key.
    pub fn by_key(&self, key: &BudgetKey) -> Option<&Entry> {
        self.entries.values().find(|e| e.key() == *key)
    }

    /// Adds a budget, or replaces the one with the same target and
    /// destination (keeping its id; the bucket starts over). The
    /// replaced entry, if any, is returned alongside.
    pub fn insert(&mut self, d: Draft) -> Result<(Entry, Option<Entry>), EnforceError> {
        d.limit.check()?;
        let k = key(d.target.scope, d.target.id, d.dest.as_ref());
        let old = self.entries.values().find(|e| e.key() == k).cloned();
        let (id, slot) = match &old {
            Some(o) => (o.id, o.slot),
            None => {
                if self.entries.len() >= self.max {
                    return Err(EnforceError::Full(self.max));
                }
                let used: std::collections::HashSet<u32> =
                    self.entries.values().map(|e| e.slot).collect();
                let slot = (0..MAX_BUDGETS)
                    .find(|s| !used.contains(s))
                    .ok_or(EnforceError::Full(self.max))?;
                let id = self.next_id;
                self.next_id += 1;
                (id, slot)
            }
        };
        let g = &mut self.generations[slot as usize];
        *g = g.wrapping_add(1);
        let entry = Entry {
            id,
            slot,
            generation: *g,
            target: d.target,
            dest: d.dest,
            limit: d.limit,
            origin: d.origin,
            created_ms: d.created_ms,
            expires_ms: d.expires_ms,
            expires_ns: d.expires_ns,
            credit_milli: 0,
        };
        self.entries.insert(id, entry.clone());
        Ok((entry, old))
    }

    /// Puts back a budget saved before a restart, with its id, in a free
    /// slot; its bucket starts over.
    pub fn restore(&mut self, mut e: Entry) -> Result<Entry, EnforceError> {
        e.limit.check()?;
        if self.entries.len() >= self.max {
            return Err(EnforceError::Full(self.max));
        }
        if self.entries.contains_key(&e.id) || self.by_key(&e.key()).is_some() {
            return Err(EnforceError::Invalid(format!(
                "thr-{} is there twice",
                e.id
            )));
        }
        let used: std::collections::HashSet<u32> = self.entries.values().map(|x| x.slot).collect();
        e.slot = (0..MAX_BUDGETS)
            .find(|s| !used.contains(s))
            .ok_or(EnforceError::Full(self.max))?;
        let g = &mut self.generations[e.slot as usize];
        *g = g.wrapping_add(1);
        e.generation = *g;
        e.credit_milli = 0;
        self.next_id = self.next_id.max(e.id + 1);
        self.entries.insert(e.id, e.clone());
        Ok(e)
    }

    pub fn remove(&mut self, id: u64) -> Option<Entry> {
        self.entries.remove(&id)
    }

    /// Budgets past their expiry at `now_ns`.
    pub fn expired(&self, now_ns: u64) -> Vec<u64> {
        self.entries
            .values()
            .filter(|e| e.expires_ns <= now_ns)
            .map(|e| e.id)
            .collect()
    }

    /// The key shapes present, for the kernel's fast path.
    pub fn present(&self) -> u64 {
        self.entries.values().fold(0, |acc, e| acc | e.shape())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(pid: u64, dest: Option<&str>) -> Draft {
        Draft {
            target: Target {
                spec: TargetSpec::Pid(pid as u32),
                scope: scope::PROCESS,
                id: pid,
                label: format!("pid {pid}"),
                start_time: None,
            },
            dest: dest.map(|d| d.parse().unwrap()),
            limit: Limit {
                rate_per_s: 10.0,
                burst: 5,
                retry_ratio: None,
                errno: 111,
                dry_run: false,
            },
            origin: Origin::Manual,
            created_ms: 0,
            expires_ms: 1000,
            expires_ns: 1_000_000_000,
        }
    }

    #[test]
    fn the_cap_is_held_and_slots_are_reused_with_a_new_generation() {
        let mut t = Table::new(3);
        let a = t.insert(draft(10, None)).unwrap().0;
        t.insert(draft(11, None)).unwrap();
        t.insert(draft(12, None)).unwrap();
        assert_eq!(
            t.insert(draft(13, None)).unwrap_err(),
            EnforceError::Full(3)
        );
        assert_eq!(t.len(), 3);
        t.remove(a.id).unwrap();
        let d = t.insert(draft(13, None)).unwrap().0;
        assert_eq!(d.slot, a.slot, "the freed slot is reused");
        assert_eq!(
            d.generation,
            a.generation + 1,
            "so the kernel restarts its bucket"
        );
        assert_eq!(d.id, 4, "ids are never reused");
    }

    #[test]
    fn the_same_target_and_destination_replaces_and_keeps_its_id() {
        let mut t = Table::new(8);
        let a = t.insert(draft(10, Some("127.0.0.1:80"))).unwrap().0;
        let (b, old) = t.insert(draft(10, Some("127.0.0.1:80"))).unwrap();
        assert_eq!((b.id, b.slot), (a.id, a.slot));
        assert_eq!(old.unwrap().id, a.id);
        assert_eq!(t.len(), 1);
        let c = t.insert(draft(10, Some("127.0.0.1:81"))).unwrap().0;
        assert_ne!(c.id, a.id);
    }

    #[test]
    fn shapes_keys_and_kernel_values() {
        let mut t = Table::new(8);
        let a = t.insert(draft(10, Some("[::1]:53"))).unwrap().0;
        let b = t.insert(draft(11, Some("10.0.0.1"))).unwrap().0;
        t.insert(draft(12, None)).unwrap();
        assert_eq!(
            t.present(),
            present::PROCESS_DEST_PORT | present::PROCESS_DEST | present::PROCESS_ANY
        );
        let k = a.key();
        assert_eq!((k.family, k.dport, k.daddr[15]), (10, 53, 1));
        assert_eq!(
            (b.key().family, b.key().dport, b.key().daddr[0]),
            (2, 0, 10)
        );
        let v = a.budget();
        assert_eq!(
            (v.rate_milli, v.burst_milli, v.kind, v.mode),
            (10_000, 5_000, kind::RATE, mode::ENFORCE)
        );
        assert_eq!(t.expired(999_999_999), Vec::<u64>::new());
        assert_eq!(t.expired(1_000_000_000).len(), 3);
    }

    #[test]
    fn deposits_give_back_the_token_plus_the_ratio() {
        let mut t = Table::new(8);
        let mut d = draft(10, None);
        d.limit.retry_ratio = Some(0.2);
        let mut e = t.insert(d).unwrap().0;
        e.deposit(5);
        assert_eq!(e.credit_milli, 6_000);
        assert_eq!(e.budget().kind, kind::RETRY);
        let mut plain = t.insert(draft(11, None)).unwrap().0;
        plain.deposit(5);
        assert_eq!(plain.credit_milli, 0);
    }

    #[test]
    fn numbers_out_of_range_are_refused() {
        let mut t = Table::new(8);
        for (rate, burst, ratio) in [
            (0.0, 1, None),
            (f64::NAN, 1, None),
            (2e6, 1, None),
            (1.0, 0, None),
            (1.0, 1, Some(0.0)),
            (1.0, 1, Some(1.5)),
        ] {
            let mut d = draft(10, None);
            d.limit.rate_per_s = rate;
            d.limit.burst = burst;
            d.limit.retry_ratio = ratio;
            assert!(
                matches!(t.insert(d), Err(EnforceError::Invalid(_))),
                "{rate} {burst} {ratio:?}"
            );
        }
        assert!(t.is_empty());
    }
}
