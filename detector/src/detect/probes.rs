//! When the on-demand probes (syscall rate, connect errno, content
//! fingerprints) are attached. The engine's suspect state already has
//! hysteresis; this adds a linger so a flapping suspect does not attach and
//! detach every tick, and a cap on attached time so a busy host where
//! something is always suspect does not keep syscall tracepoints on (they
//! tax every syscall on the host). Pure, with the clock passed in.
use serde::Serialize;

/// Probe timing. Defaults: linger 3 s after the last suspect; attached at
/// most 60 s in one go, then off for 60 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    pub linger_ns: u64,
    pub max_attached_ns: u64,
    pub cooldown_ns: u64,
}

const SEC: u64 = 1_000_000_000;

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            linger_ns: 3 * SEC,
            max_attached_ns: 60 * SEC,
            cooldown_ns: 60 * SEC,
        }
    }
}

/// Whether the on-demand probes should be attached, and for whom.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ProbePlan {
    pub attach: bool,
    pub suspects: Vec<u32>,
    /// The cap ended the last attachment; probes stay off until this time.
    pub cooling_down_until_ns: Option<u64>,
    /// When the current attachment started.
    pub attached_since_ns: Option<u64>,
}

#[derive(Debug)]
pub struct ProbeScheduler {
    cfg: ProbeConfig,
    attached_since: Option<u64>,
    last_suspect: Option<u64>,
    cooldown_until: Option<u64>,
}

impl ProbeScheduler {
    pub fn new(cfg: ProbeConfig) -> Self {
        ProbeScheduler {
            cfg,
            attached_since: None,
            last_suspect: None,
            cooldown_until: None,
        }
    }

    /// The plan at `now` for the engine's current suspects.
    pub fn plan(&mut self, now: u64, suspects: Vec<u32>) -> ProbePlan {
        if !suspects.is_empty() {
            self.last_suspect = Some(now);
        }
        if self.cooldown_until.is_some_and(|t| now >= t) {
            self.cooldown_until = None;
        }
        let lingering = self
            .last_suspect
            .is_some_and(|t| now.saturating_sub(t) < self.cfg.linger_ns);
        let want = !suspects.is_empty() || lingering;
        match self.attached_since {
            Some(since) if now.saturating_sub(since) >= self.cfg.max_attached_ns => {
                self.attached_since = None;
                self.cooldown_until = Some(now + self.cfg.cooldown_ns);
            }
            Some(_) if !want => self.attached_since = None,
            None if !suspects.is_empty() && self.cooldown_until.is_none() => {
                self.attached_since = Some(now)
            }
            _ => {}
        }
        ProbePlan {
            attach: self.attached_since.is_some(),
            suspects,
            cooling_down_until_ns: self.cooldown_until,
            attached_since_ns: self.attached_since,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attaches_with_a_suspect_and_lingers_after() {
        let mut s = ProbeScheduler::new(ProbeConfig::default());
        assert!(!s.plan(SEC, vec![]).attach);
        assert!(s.plan(2 * SEC, vec![7]).attach);
        // Suspect gone: still attached for the linger, then off.
        assert!(s.plan(3 * SEC, vec![]).attach);
        assert!(s.plan(4 * SEC, vec![]).attach);
        assert!(!s.plan(5 * SEC, vec![]).attach);
        // A new suspect attaches again at once.
        assert!(s.plan(6 * SEC, vec![9]).attach);
    }

    #[test]
    fn attach_time_is_capped_then_cools_down() {
        let cfg = ProbeConfig {
            linger_ns: SEC,
            max_attached_ns: 10 * SEC,
            cooldown_ns: 5 * SEC,
        };
        let mut s = ProbeScheduler::new(cfg);
        let on: Vec<u64> = (1..=30)
            .filter(|t| s.plan(t * SEC, vec![7]).attach)
            .collect();
        // on at 1 s, off at 11 s (cap), back at 16 s, off at 26 s.
        assert_eq!(
            on,
            [(1..11).collect::<Vec<_>>(), (16..26).collect()].concat()
        );
    }
}
