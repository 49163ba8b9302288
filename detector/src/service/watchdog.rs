//! systemd's watchdog: when the unit sets `WatchdogSec=`, systemd passes
//! `WATCHDOG_USEC` and kills (then restarts) the daemon if no `WATCHDOG=1`
//! arrives within it. The ping is sent from the service loop's tick, so a
//! loop that stalls — a blocked drain, a wedged write, a frozen process —
//! stops pinging and is restarted, which a liveness thread could not show.
use std::time::{Duration, Instant};

pub struct Watchdog {
    /// Half the timeout: systemd's advice, so one late tick is not fatal.
    every: Duration,
    last: Option<Instant>,
}

impl Watchdog {
    /// The watchdog systemd asked for, if any (and if it is meant for this
    /// process: `WATCHDOG_PID` names it).
    pub fn from_env() -> Option<Watchdog> {
        sd_notify::watchdog_enabled().map(Watchdog::every_half_of)
    }

    fn every_half_of(timeout: Duration) -> Watchdog {
        Watchdog {
            every: (timeout / 2).max(Duration::from_millis(10)),
            last: None,
        }
    }

    /// Whether a ping is due at `now` (the first one is due at once).
    fn due(&mut self, now: Instant) -> bool {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            return false;
        }
        self.last = Some(now);
        true
    }

    /// Called on every tick of the service loop; pings when due.
    pub fn tick(&mut self) {
        if self.due(Instant::now())
            && let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog])
        {
            tracing::warn!(error = %e, "cannot ping systemd's watchdog");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pings_at_half_the_timeout() {
        let mut w = Watchdog::every_half_of(Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(w.due(t0));
        assert!(!w.due(t0 + Duration::from_millis(4_999)));
        assert!(w.due(t0 + Duration::from_secs(5)));
        assert!(!w.due(t0 + Duration::from_secs(6)));
        assert!(w.due(t0 + Duration::from_secs(10)));
    }
}
