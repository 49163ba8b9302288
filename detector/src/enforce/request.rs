//! What a caller asks of the enforcer and what it shows back: the manual
//! `throttle` request, the budget view, and the errors, shared by the API
//! and the CLI. Pure: no kernel, no clock.
use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// Whose attempts a budget counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetSpec {
    Pid(u32),
    /// A cgroup v2 path, relative to the cgroup root (`/` allowed in front).
    Cgroup(String),
    /// A systemd unit (`nginx.service`): its cgroup.
    Unit(String),
}

/// A destination: an address, and a port unless every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DestSpec {
    pub addr: IpAddr,
    pub port: Option<u16>,
}

impl FromStr for DestSpec {
    type Err = String;

    /// `10.0.0.1`, `10.0.0.1:443`, `::1`, `[::1]:53`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("`{s}` is not a destination; write ADDR or ADDR:PORT (IPv6 as [ADDR]:PORT)");
        if let Ok(addr) = s.parse::<IpAddr>() {
            return Ok(DestSpec { addr, port: None });
        }
        let sa: std::net::SocketAddr = s.parse().map_err(|_| bad())?;
        if sa.port() == 0 {
            return Err(format!("`{s}`: port 0 is not a destination port"));
        }
        Ok(DestSpec {
            addr: sa.ip(),
            port: Some(sa.port()),
        })
    }
}

impl fmt::Display for DestSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.addr, self.port) {
            (a, None) => write!(f, "{a}"),
            (IpAddr::V4(a), Some(p)) => write!(f, "{a}:{p}"),
            (IpAddr::V6(a), Some(p)) => write!(f, "[{a}]:{p}"),
        }
    }
}

/// A manual budget, as `stormguard throttle` and the API's `throttle`
/// method ask for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThrottleRequest {
    pub target: TargetSpec,
    #[serde(default)]
    pub dest: Option<DestSpec>,
    /// Attempts per second (the floor of a retry budget).
    pub rate_per_s: f64,
    /// Bucket size in attempts; default: the rate, at least 1.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Makes it a retry budget: each success deposits this fraction.
    #[serde(default)]
    pub retry_ratio: Option<f64>,
    /// How long it lasts.
    pub for_secs: u64,
    /// errno name a denied connect fails with; default from the config.
    #[serde(default)]
    pub errno: Option<String>,
    /// Count what would be limited, limit nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// Which budgets `release` ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    Id(u64),
    All,
}

/// One budget as `throttles`, `status` and the API show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetView {
    /// `thr-N`.
    pub id: String,
    /// `manual` or `auto` (from a storm, in `enforce`/`dry-run` mode).
    pub origin: String,
    /// `pid 1234 (curl)`, `cgroup /x/y`, `unit nginx.service`.
    pub target: String,
    /// Destination, or absent for every destination.
    pub dest: Option<String>,
    /// `rate` or `retry`.
    pub kind: String,
    pub rate_per_s: f64,
    pub burst: u32,
    pub retry_ratio: Option<f64>,
    /// errno name of a denied connect.
    pub errno: String,
    /// `enforce` or `dry-run`.
    pub mode: String,
    /// Unix ms.
    pub created_ms: i64,
    pub expires_ms: i64,
    pub remaining_s: u64,
    pub allowed: u64,
    pub slowed: u64,
    pub denied: u64,
    /// The incident that made it (auto budgets).
    pub incident: Option<String>,
}

/// Why a throttle or release was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EnforceError {
    /// A protected process or group: never throttled.
    #[error("refused: {0}")]
    Protected(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("budget table full ({0} budgets): release one first (`stormguard throttles`)")]
    Full(usize),
    #[error("enforcement unavailable: {0}")]
    Kernel(String),
}

impl EnforceError {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            EnforceError::Protected(_) => "protected",
            EnforceError::NotFound(_) => "not_found",
            EnforceError::Invalid(_) => "bad_request",
            EnforceError::Full(_) => "full",
            EnforceError::Kernel(_) => "kernel",
        }
    }
}

/// What the API needs of the enforcer; the daemon's [`super::Enforcer`]
/// behind a mutex implements it.
pub trait Control: Send + Sync {
    /// Adds a manual budget (root only; the API checks the peer).
    fn throttle(&self, req: ThrottleRequest) -> Result<BudgetView, EnforceError>;
    /// Ends budgets; the ids ended.
    fn release(&self, which: Release) -> Result<Vec<String>, EnforceError>;
    /// Every budget with its counters.
    fn list(&self) -> Vec<BudgetView>;
}

/// `thr-N` → N.
pub fn parse_budget_id(s: &str) -> Option<u64> {
    s.strip_prefix("thr-").unwrap_or(s).parse().ok()
}

/// An errno by name (`ECONNREFUSED`) or number, for denied connects.
pub fn errno_by_name(s: &str) -> Result<u32, String> {
    const NAMES: [(&str, i32); 8] = [
        ("ECONNREFUSED", libc::ECONNREFUSED),
        ("ETIMEDOUT", libc::ETIMEDOUT),
        ("EHOSTUNREACH", libc::EHOSTUNREACH),
        ("ENETUNREACH", libc::ENETUNREACH),
        ("EPERM", libc::EPERM),
        ("EACCES", libc::EACCES),
        ("ECONNRESET", libc::ECONNRESET),
        ("EAGAIN", libc::EAGAIN),
    ];
    let upper = s.to_ascii_uppercase();
    if let Some((_, n)) = NAMES.iter().find(|(name, _)| *name == upper) {
        return Ok(*n as u32);
    }
    match s.parse::<u32>() {
        Ok(n) if (1..4096).contains(&n) => Ok(n),
        _ => Err(format!(
            "`{s}` is not an errno; use one of {}",
            NAMES.map(|(n, _)| n).join(", ")
        )),
    }
}

/// Longest a manual budget may last: 7 days.
pub const MAX_FOR_SECS: u64 = 7 * 24 * 3600;

/// A rate as a person writes it: `10/s`, `10/sec`, `10/second`, `10`,
/// `0.5/s`; attempts per second, finite and above 0.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let bad =
        || format!("`{s}` is not a rate; write attempts per second: 10/s, 10/sec, 10 or 0.5/s");
    let t = s.trim();
    let num = ["/second", "/sec", "/s"]
        .iter()
        .find_map(|suffix| t.strip_suffix(suffix))
        .unwrap_or(t)
        .trim();
    let n: f64 = num.parse().map_err(|_| bad())?;
    if !n.is_finite() || n <= 0.0 {
        return Err(format!(
            "`{s}`: the rate must be above 0 attempts per second"
        ));
    }
    Ok(n)
}

/// How long a budget lasts as a person writes it: `90` (seconds), `2s`,
/// `5m`, `1h`, `1h30m`; whole seconds from 1 to [`MAX_FOR_SECS`].
pub fn parse_for(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let secs = match t.parse::<u64>() {
        Ok(n) => n,
        Err(_) => {
            let d = humantime::parse_duration(t).map_err(|_| {
                format!("`{s}` is not a duration; write 90 (seconds), 2s, 5m or 1h")
            })?;
            if d.subsec_nanos() != 0 {
                return Err(format!("`{s}`: give whole seconds"));
            }
            d.as_secs()
        }
    };
    if !(1..=MAX_FOR_SECS).contains(&secs) {
        return Err(format!(
            "`{s}`: a budget lasts from 1 second to 7 days ({MAX_FOR_SECS} seconds)"
        ));
    }
    Ok(secs)
}

/// A retry ratio: the share of each success a retry budget gets back,
/// above 0 and at most 1.
pub fn check_retry_ratio(r: f64) -> Result<f64, String> {
    if r.is_finite() && r > 0.0 && r <= 1.0 {
        Ok(r)
    } else {
        Err(format!(
            "{r} is not a retry ratio; it must be above 0 and at most 1 (0.2: each success allows 0.2 retries)"
        ))
    }
}

/// The name of an errno number, for views.
pub fn errno_name(n: u32) -> String {
    crate::ingest::failure::name(n as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_with_and_without_port() {
        assert_eq!(
            "127.0.0.1:80".parse::<DestSpec>().unwrap().to_string(),
            "127.0.0.1:80"
        );
        assert_eq!("::1".parse::<DestSpec>().unwrap().port, None);
        assert_eq!("[::1]:53".parse::<DestSpec>().unwrap().port, Some(53));
        assert!("example.com:80".parse::<DestSpec>().is_err());
        assert!("1.2.3.4:0".parse::<DestSpec>().is_err());
    }

    #[test]
    fn rates_durations_and_ratios_parse() {
        for (s, want) in [
            ("10/s", 10.0),
            ("10", 10.0),
            ("10/sec", 10.0),
            ("10/second", 10.0),
            ("0.5/s", 0.5),
            (" 3 /s", 3.0),
        ] {
            assert_eq!(parse_rate(s), Ok(want), "{s}");
        }
        for s in [
            "0/s", "-1", "abc", "10/m", "", "/s", "inf", "NaN/s", "1e999",
        ] {
            assert!(parse_rate(s).is_err(), "{s}");
        }
        assert!(parse_rate("x").unwrap_err().contains("10/s"));

        for (s, want) in [
            ("90", 90),
            ("2s", 2),
            ("5m", 300),
            ("1h", 3600),
            ("1h30m", 5400),
            ("7d", MAX_FOR_SECS),
        ] {
            assert_eq!(parse_for(s), Ok(want), "{s}");
        }
        for s in ["0", "0s", "8d", "1500ms", "soon", "", "-5"] {
            assert!(parse_for(s).is_err(), "{s}");
        }
        assert!(parse_for("8d").unwrap_err().contains("7 days"));

        assert_eq!(check_retry_ratio(1.0), Ok(1.0));
        assert_eq!(check_retry_ratio(0.2), Ok(0.2));
        for r in [0.0, -0.1, 1.01, f64::NAN, f64::INFINITY] {
            assert!(check_retry_ratio(r).is_err(), "{r}");
        }
    }

    #[test]
    fn errnos_by_name_or_number() {
        assert_eq!(errno_by_name("econnrefused"), Ok(libc::ECONNREFUSED as u32));
        assert_eq!(errno_by_name("110"), Ok(110));
        assert!(errno_by_name("EWHAT").unwrap_err().contains("ECONNREFUSED"));
        assert!(errno_by_name("0").is_err());
        assert_eq!(parse_budget_id("thr-7"), Some(7));
        assert_eq!(parse_budget_id("7"), Some(7));
    }
}
