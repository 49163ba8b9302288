//! Runtime errors after READY: counted by kind, logged (rate-limited) and
//! survived. The daemon exists to record storms, and a storm is exactly
//! when maps fill, disks fill and file descriptors run out; an error there
//! must cost a degraded feature, never the process. Environment problems
//! found before READY are different: they end the start with exit 2 (see
//! `cli::exit_code`).
use std::{
    collections::BTreeMap,
    fmt::Display,
    time::{Duration, Instant},
};

/// Error kinds, a fixed set so they can be metric labels.
pub mod kind {
    /// Reading or writing a kernel map (sweeps, suspects, counters).
    pub const MAP: &str = "map";
    /// Attaching or detaching a program (the on-demand probes).
    pub const PROBE_ATTACH: &str = "probe_attach";
    /// The ring buffer could not be polled.
    pub const RING: &str = "ring";
    /// The incident database (writes go on in the background and retry).
    pub const STORE: &str = "store";
    /// Anything else the loop's callbacks reported.
    pub const INTERNAL: &str = "internal";
    /// Call stacks: a capability they need is missing.
    pub const STACKS: &str = "stacks";
}

/// How often one kind may be logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
pub struct Health {
    errors: BTreeMap<&'static str, u64>,
    /// What is off now, by kind, and why.
    degraded: BTreeMap<&'static str, String>,
    /// When each kind was last logged, and how many since went unlogged.
    logged: BTreeMap<&'static str, (Instant, u64)>,
}

impl Health {
    /// Counts an error of `kind` and logs it, at most once per
    /// [`LOG_EVERY`] per kind (with the number not logged in between).
    pub fn error(&mut self, kind: &'static str, what: &str, err: &dyn Display) {
        *self.errors.entry(kind).or_default() += 1;
        let now = Instant::now();
        match self.logged.get_mut(kind) {
            Some((at, skipped)) if now.duration_since(*at) < LOG_EVERY => *skipped += 1,
            Some((at, skipped)) => {
                tracing::warn!(kind, not_logged = *skipped, "{what}: {err:#}; carrying on");
                (*at, *skipped) = (now, 0);
            }
            None => {
                tracing::warn!(kind, "{what}: {err:#}; carrying on");
                self.logged.insert(kind, (now, 0));
            }
        }
    }

    /// Marks a feature as off (logged once when it goes off).
    pub fn degrade(&mut self, kind: &'static str, why: String) {
        if self.degraded.get(kind) != Some(&why) {
            tracing::warn!(kind, "degraded: {why}");
            self.degraded.insert(kind, why);
        }
    }

    /// The feature is back.
    pub fn recover(&mut self, kind: &'static str) {
        if self.degraded.remove(kind).is_some() {
            tracing::info!(kind, "recovered");
        }
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .map(|(k, n)| ((*k).to_string(), *n))
            .collect()
    }

    pub fn degraded(&self) -> Vec<String> {
        self.degraded.values().cloned().collect()
    }

    pub fn count(&self, kind: &str) -> u64 {
        self.errors.get(kind).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_every_error_and_tracks_what_is_degraded() {
        let mut h = Health::default();
        for _ in 0..1_000 {
            h.error(kind::MAP, "updating SUSPECTS", &"no space");
        }
        h.error(kind::RING, "polling the ring", &"EINTR");
        assert_eq!(h.count(kind::MAP), 1_000);
        assert_eq!(h.errors().len(), 2);
        h.degrade(kind::PROBE_ATTACH, "on-demand probes off: EMFILE".into());
        h.degrade(kind::PROBE_ATTACH, "on-demand probes off: EMFILE".into());
        assert_eq!(h.degraded(), vec!["on-demand probes off: EMFILE"]);
        h.recover(kind::PROBE_ATTACH);
        assert!(h.degraded().is_empty());
    }
}
