//! Bounded tables: how full each one is, and which entries go when one is
//! full. Every user-space table that grows with input (processes, flows,
//! roll-ups, parents, UDP sockets…) has a capacity; a storm of new keys
//! evicts the least important entries instead of growing the daemon or
//! silently refusing to learn, and each eviction is counted so status and
//! metrics can say what was forgotten.
//!
//! Lives here, at the bottom of the data flow (ingest → detect →
//! pipeline), so the process table, the engine and the interval flows can
//! all use it without a module cycle; `detect` re-exports [`TableUsage`].
use serde::Serialize;

/// One table's fill and what it had to forget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TableUsage {
    /// Stable name, usable as a metrics label ("flows", "rollups"…).
    pub name: &'static str,
    pub entries: u64,
    pub capacity: u64,
    /// Entries dropped because the table was full (expiry of dead or idle
    /// entries is not eviction and is not counted).
    pub evictions: u64,
}

impl TableUsage {
    pub fn new(name: &'static str, entries: usize, capacity: usize, evictions: u64) -> Self {
        TableUsage {
            name,
            entries: entries as u64,
            capacity: capacity as u64,
            evictions,
        }
    }
}

/// How many entries a full table of `capacity` evicts at once: an eighth
/// (at least one). Choosing victims costs a pass over the table, so a full
/// table makes room for many inserts per pass rather than one — a flood of
/// new keys then costs O(1) amortised per key, not O(capacity).
pub fn batch(capacity: usize) -> usize {
    (capacity / 8).max(1)
}

/// The `n` keys of lowest rank, for eviction. Ties are broken by the key
/// so the same input evicts the same entries (a replay gives the same
/// verdicts as the live run).
pub fn lowest<K: Ord + Copy, R: Ord>(entries: impl Iterator<Item = (R, K)>, n: usize) -> Vec<K> {
    if n == 0 {
        return Vec::new();
    }
    let mut v: Vec<(R, K)> = entries.collect();
    if n < v.len() {
        v.select_nth_unstable(n);
        v.truncate(n);
    }
    v.into_iter().map(|(_, k)| k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_ranks_go_first_ties_by_key() {
        let entries = [(3, 'a'), (1, 'b'), (2, 'c'), (1, 'd'), (5, 'e')];
        let mut got = lowest(entries.into_iter(), 3);
        got.sort_unstable();
        assert_eq!(got, ['b', 'c', 'd']);
        assert_eq!(lowest(entries.into_iter(), 0), Vec::<char>::new());
        assert_eq!(lowest(entries.into_iter(), 9).len(), 5);
        // Equal ranks: the smaller key goes.
        assert_eq!(lowest([(0, 9), (0, 2), (0, 5)].into_iter(), 1), [2]);
    }

    #[test]
    fn a_batch_is_an_eighth_and_never_zero() {
        assert_eq!(
            (batch(1), batch(8), batch(100), batch(65_536)),
            (1, 1, 12, 8_192)
        );
    }
}
