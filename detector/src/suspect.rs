//! Which processes are suspect, and whether the on-demand probes should be
//! attached. A stand-in until the detection engine exists: a process is
//! suspect after failed connects above a rate for a sustained time. Pure,
//! with the clock passed in, so hysteresis and the attach cap are tested
//! without a kernel.
use std::collections::{BTreeSet, HashMap};

use serde::Serialize;

/// Thresholds. Defaults: 10 failures/s for 2 s to suspect; below half that
/// for 5 s to clear; probes on for at most 60 s, then off for 60 s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SuspectConfig {
    pub fail_rate: f64,
    pub sustain_ns: u64,
    pub clear_ns: u64,
    pub max_attached_ns: u64,
    pub cooldown_ns: u64,
}

const SEC: u64 = 1_000_000_000;

impl Default for SuspectConfig {
    fn default() -> Self {
        SuspectConfig {
            fail_rate: 10.0,
            sustain_ns: 2 * SEC,
            clear_ns: 5 * SEC,
            max_attached_ns: 60 * SEC,
            cooldown_ns: 60 * SEC,
        }
    }
}

#[derive(Debug, Default)]
struct PidState {
    /// Start of the current run of intervals above the rate.
    above_since: Option<u64>,
    /// Start of the current run of intervals below the clearing rate.
    calm_since: Option<u64>,
    suspect: bool,
}

/// Whether the on-demand probes should be attached, and for whom.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProbePlan {
    pub attach: bool,
    pub suspects: Vec<u32>,
    /// The cap ended the last attachment; probes stay off until this time.
    pub cooling_down_until_ns: Option<u64>,
    /// When the current attachment started.
    pub attached_since_ns: Option<u64>,
}

#[derive(Debug)]
pub struct SuspectTracker {
    cfg: SuspectConfig,
    pids: HashMap<u32, PidState>,
    attached_since: Option<u64>,
    cooldown_until: Option<u64>,
}

impl SuspectTracker {
    pub fn new(cfg: SuspectConfig) -> Self {
        SuspectTracker {
            cfg,
            pids: HashMap::new(),
            attached_since: None,
            cooldown_until: None,
        }
    }

    /// Feeds one finished interval `[now - interval, now)` with failed
    /// connects per pid, and returns the plan for the probes.
    pub fn update(
        &mut self,
        now: u64,
        interval_ns: u64,
        failures: &HashMap<u32, u64>,
    ) -> ProbePlan {
        let start = now.saturating_sub(interval_ns);
        let secs = interval_ns.max(1) as f64 / SEC as f64;
        let pids: BTreeSet<u32> = self.pids.keys().chain(failures.keys()).copied().collect();
        for pid in pids {
            let rate = failures.get(&pid).copied().unwrap_or(0) as f64 / secs;
            let st = self.pids.entry(pid).or_default();
            if rate >= self.cfg.fail_rate {
                let since = *st.above_since.get_or_insert(start);
                if now - since >= self.cfg.sustain_ns {
                    st.suspect = true;
                }
            } else {
                st.above_since = None;
            }
            if rate < self.cfg.fail_rate / 2.0 {
                let since = *st.calm_since.get_or_insert(start);
                if now - since >= self.cfg.clear_ns {
                    st.suspect = false;
                }
            } else {
                st.calm_since = None;
            }
        }
        self.pids
            .retain(|_, st| st.suspect || st.above_since.is_some());
        let suspects: Vec<u32> = {
            let mut v: Vec<u32> = self
                .pids
                .iter()
                .filter(|(_, s)| s.suspect)
                .map(|(p, _)| *p)
                .collect();
            v.sort_unstable();
            v
        };
        if self.cooldown_until.is_some_and(|t| now >= t) {
            self.cooldown_until = None;
        }
        let want = !suspects.is_empty();
        match self.attached_since {
            Some(since) if now - since >= self.cfg.max_attached_ns => {
                self.attached_since = None;
                self.cooldown_until = Some(now + self.cfg.cooldown_ns);
            }
            Some(_) if !want => self.attached_since = None,
            None if want && self.cooldown_until.is_none() => self.attached_since = Some(now),
            _ => {}
        }
        ProbePlan {
            attach: self.attached_since.is_some(),
            suspects,
            cooling_down_until_ns: self.cooldown_until,
            attached_since_ns: self.attached_since,
        }
    }

    /// A process exited: forget it so a reused pid starts fresh.
    pub fn forget(&mut self, pid: u32) {
        self.pids.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fails(pid: u32, n: u64) -> HashMap<u32, u64> {
        HashMap::from([(pid, n)])
    }

    #[test]
    fn suspect_after_two_seconds_above_rate_then_clears_with_hysteresis() {
        let mut t = SuspectTracker::new(SuspectConfig::default());
        assert!(
            !t.update(SEC, SEC, &fails(7, 50)).attach,
            "1 s is not sustained"
        );
        let p = t.update(2 * SEC, SEC, &fails(7, 50));
        assert!(p.attach);
        assert_eq!(p.suspects, vec![7]);
        // Between half the rate and the rate: stays suspect (hysteresis).
        for s in 3..=12 {
            assert!(t.update(s * SEC, SEC, &fails(7, 6)).attach, "at {s} s");
        }
        // Below half the rate: clears after 5 s.
        for s in 13..=16 {
            assert!(t.update(s * SEC, SEC, &fails(7, 1)).attach, "at {s} s");
        }
        let p = t.update(17 * SEC, SEC, &fails(7, 1));
        assert!(!p.attach);
        assert!(p.suspects.is_empty());
    }

    #[test]
    fn a_dip_restarts_the_sustain_window() {
        let mut t = SuspectTracker::new(SuspectConfig::default());
        t.update(SEC, SEC, &fails(7, 50));
        assert!(!t.update(2 * SEC, SEC, &fails(7, 2)).attach);
        assert!(!t.update(3 * SEC, SEC, &fails(7, 50)).attach);
        assert!(t.update(4 * SEC, SEC, &fails(7, 50)).attach);
    }

    #[test]
    fn attach_time_is_capped_then_cools_down() {
        let cfg = SuspectConfig {
            max_attached_ns: 10 * SEC,
            cooldown_ns: 5 * SEC,
            ..Default::default()
        };
        let mut t = SuspectTracker::new(cfg);
        let mut attached = Vec::new();
        for s in 1..=30 {
            attached.push(t.update(s * SEC, SEC, &fails(7, 100)).attach);
        }
        // on at 2 s, off at 12 s (cap), back at 17 s, off at 27 s.
        let on: Vec<u64> = (1..=30).filter(|s| attached[*s as usize - 1]).collect();
        assert_eq!(
            on,
            [(2..12).collect::<Vec<_>>(), (17..27).collect()].concat()
        );
    }

    #[test]
    fn healthy_processes_are_not_kept() {
        let mut t = SuspectTracker::new(SuspectConfig::default());
        for pid in 0..1000 {
            t.update(SEC, SEC, &fails(pid, 1));
        }
        assert!(t.pids.is_empty());
    }
}
