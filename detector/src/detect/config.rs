//! Detection thresholds. Every field has a default that passes the scenario
//! suite; a config file may override any of them.
use serde::{Deserialize, Serialize};

/// Thresholds of the detection engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectConfig {
    /// Attempts per second (over the last second) from which a failing,
    /// non-backing-off flow is a storm.
    pub storm_rate: f64,
    /// Attempts per second from which a failing flow is suspect (and the
    /// on-demand probes look closer).
    pub suspect_rate: f64,
    /// How long a run of attempts must have lasted before it can be a
    /// storm: a burst (a pool reconnecting at once) is not a loop.
    pub min_span_ms: u64,
    /// Share of attempts in the last second that failed (errno, RST,
    /// timeout, connection closed with no response, UDP with no reply).
    pub failure_ratio: f64,
    /// Share of requests in the last second identical to the one before
    /// (same lengths, and same content fingerprint once probed).
    pub repeat_ratio: f64,
    /// Growth of the gaps between attempts (median of the newest third
    /// over the oldest, rising through the middle one) that counts as backoff.
    pub backoff_growth: f64,
    /// …and by at least this much: in a tight loop the gaps are tens of
    /// microseconds and scheduling noise alone can double them.
    pub backoff_min_step_ms: u64,
    /// A connection that ends this soon with no response bytes is a failed try.
    pub short_lived_ms: u64,
    /// A storm below its criteria this long is resolved.
    pub resolve_ms: u64,
    /// A suspect flow below its criteria this long is healthy again.
    pub calm_ms: u64,
    /// A flow failing this long (at any rate) is shown as a persistent failure.
    pub persistent_ms: u64,
    /// A gap longer than this ends a run of attempts.
    pub run_gap_ms: u64,
    /// Distinct processes a roll-up (same parent or cgroup, same
    /// destination) needs in the last second to be a storm of its own.
    pub rollup_min_pids: usize,
    /// Most flows tracked; a new flow beyond it evicts the least important
    /// (healthy and least recently active first, storms last), an eighth
    /// of the table at a time, counted in [`super::Engine::tables`].
    pub max_flows: usize,
    /// Failed attempts without backoff that are a storm however soon the
    /// run ends (a capped retry loop can fire thousands in 100 ms, sooner
    /// than `min_span_ms`).
    pub burst_attempts: u64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            storm_rate: 15.0,
            suspect_rate: 5.0,
            min_span_ms: 500,
            failure_ratio: 0.8,
            repeat_ratio: 0.9,
            backoff_growth: 1.4,
            backoff_min_step_ms: 2,
            short_lived_ms: 100,
            resolve_ms: 5_000,
            calm_ms: 2_000,
            persistent_ms: 5_000,
            run_gap_ms: 10_000,
            rollup_min_pids: 3,
            max_flows: 10_000,
            burst_attempts: 1_000,
        }
    }
}

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("detect.{field} = {value}: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

impl DetectConfig {
    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, value: String, why| Err(ConfigError::Invalid { field, value, why });
        if self.storm_rate.is_nan() || self.storm_rate <= 0.0 {
            return bad("storm_rate", self.storm_rate.to_string(), "must be > 0");
        }
        if self.suspect_rate.is_nan()
            || self.suspect_rate <= 0.0
            || self.suspect_rate > self.storm_rate
        {
            return bad(
                "suspect_rate",
                self.suspect_rate.to_string(),
                "must be > 0 and ≤ storm_rate",
            );
        }
        for (field, v) in [
            ("failure_ratio", self.failure_ratio),
            ("repeat_ratio", self.repeat_ratio),
        ] {
            if v.is_nan() || v <= 0.0 || v > 1.0 {
                return bad(field, v.to_string(), "must be in (0, 1]");
            }
        }
        if self.backoff_growth.is_nan() || self.backoff_growth <= 1.0 {
            return bad(
                "backoff_growth",
                self.backoff_growth.to_string(),
                "must be > 1",
            );
        }
        if self.burst_attempts < 2 {
            return bad(
                "burst_attempts",
                self.burst_attempts.to_string(),
                "must be ≥ 2",
            );
        }
        if self.max_flows == 0 {
            return bad("max_flows", "0".into(), "must be ≥ 1");
        }
        if self.rollup_min_pids < 2 {
            return bad(
                "rollup_min_pids",
                self.rollup_min_pids.to_string(),
                "must be ≥ 2 (one process is a flow, not a roll-up)",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_partial_toml_keeps_them() {
        DetectConfig::default().validate().unwrap();
        let c: DetectConfig = toml::from_str("storm_rate = 30.0").unwrap();
        assert_eq!(c.storm_rate, 30.0);
        assert_eq!(c.min_span_ms, DetectConfig::default().min_span_ms);
    }

    #[test]
    fn nonsense_is_refused_with_the_field_named() {
        let c = DetectConfig {
            failure_ratio: 1.5,
            ..Default::default()
        };
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "detect.failure_ratio = 1.5: must be in (0, 1]"
        );
        let err = toml::from_str::<DetectConfig>("storm_rat = 3.0").unwrap_err();
        assert!(err.to_string().contains("storm_rat"), "{err}");
    }
}
