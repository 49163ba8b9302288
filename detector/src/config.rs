//! The configuration file (TOML). Every field is optional and defaulted; an
//! unknown or invalid field is refused with the file, line and field named.
//!
//! Every number has a range ([`RANGES`]), checked at load with a message
//! naming the field and the range: durations are multiplied into
//! nanoseconds (`calm_ms`, `probes.max_attached_secs`), and a value that
//! parses but overflows there, or that makes no sense (a zero-second
//! probe window), must stop the daemon before it starts, not wrap around
//! in the middle of a storm.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::DetectConfig;

/// Where the daemon reads its configuration unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/stormguard/config.toml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Detection thresholds.
    pub detect: DetectConfig,
    pub daemon: DaemonConfig,
    pub store: StoreConfig,
    pub metrics: MetricsConfig,
    pub probes: ProbesConfig,
    /// Budgets and who is never throttled.
    pub enforce: crate::enforce::config::EnforceConfig,
    /// Naming the service (unit, container, pod) of a process.
    pub services: ServicesConfig,
    /// Commands and webhooks told when a storm starts and ends (see
    /// `notify`); none by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<crate::notify::NotifyConfig>,
}

/// Where container runtimes' metadata is read (see `ingest::service`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServicesConfig {
    /// The directory where the host's /run and /var/lib are: "/" on a
    /// host; in a container, where they are mounted (e.g. "/host").
    pub metadata_root: PathBuf,
}

impl Default for ServicesConfig {
    fn default() -> Self {
        ServicesConfig {
            metadata_root: PathBuf::from("/"),
        }
    }
}

/// The local API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// Unix socket of the API.
    pub socket: PathBuf,
    /// Group allowed to use the API besides root (the socket's group when
    /// the group exists).
    pub socket_group: String,
    /// Permissions of the socket file, octal. Peers are checked with
    /// SO_PEERCRED whatever this says.
    pub socket_mode: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from("/run/stormguard/stormguard.sock"),
            socket_group: "stormguard".into(),
            socket_mode: "0660".into(),
        }
    }
}

/// The incident history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file.
    pub path: PathBuf,
    /// Incidents older than this are deleted.
    pub retention_days: u32,
    /// At most this many incidents are kept (the oldest go first).
    pub max_incidents: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("/var/lib/stormguard/incidents.db"),
            retention_days: 30,
            max_incidents: 10_000,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve /metrics on, or "off".
    pub listen: String,
    /// Export one series per active storm (labels comm, destination). Off
    /// by default: any local user can read a loopback port, and these name
    /// other users' processes and the hosts they talk to.
    pub per_storm: bool,
    /// At most this many per-storm series.
    pub per_storm_max: usize,
    /// Export storms by service (label `service`: a systemd unit, a
    /// container's name, `namespace/pod`). On by default: services are
    /// few and named by the operator, unlike process names and peers.
    pub per_service: bool,
    /// At most this many services get their own series; the rest are
    /// summed under `service="other"`.
    pub per_service_max: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9471".into(),
            per_storm: false,
            per_storm_max: 50,
            per_service: true,
            per_service_max: 64,
        }
    }
}

/// The on-demand probes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProbesConfig {
    /// "auto" (while something is suspect), "always" or "never".
    pub on_demand: String,
    /// Longest the on-demand probes stay attached in one go.
    pub max_attached_secs: u64,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            on_demand: "auto".into(),
            max_attached_secs: 60,
        }
    }
}

/// Why a configuration file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Named `problem`, not `source`: the message already includes it, and
    /// `{:#}` would print a source twice.
    #[error("invalid config {path}: {problem}")]
    Invalid {
        path: PathBuf,
        problem: crate::detect::config::ConfigError,
    },
    /// A number outside its range (see [`RANGES`]).
    #[error(
        "invalid config {path}: [{section}] {field} = {value} is out of range: must be {range}"
    )]
    OutOfRange {
        path: PathBuf,
        section: &'static str,
        field: &'static str,
        value: String,
        range: String,
    },
    /// A `[[notify]]` table is wrong (the message names which and the field).
    #[error("invalid config {path}: {problem}")]
    Notify {
        path: PathBuf,
        problem: crate::notify::NotifyConfigError,
    },
    /// `[store] path` cannot be a database file.
    #[error("invalid config {path}: [store] path = {}: {why}", .store.display())]
    StorePath {
        path: PathBuf,
        store: PathBuf,
        why: String,
    },
}

/// An allowed range, inclusive at both ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    Int(u64, u64),
    Float(f64, f64),
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Range::Int(lo, hi) => write!(f, "{lo}..={hi}"),
            Range::Float(lo, hi) => write!(f, "{lo}..={hi}"),
        }
    }
}

/// A number of the configuration, as read.
#[derive(Debug, Clone, Copy)]
enum Number {
    Int(u64),
    Float(f64),
}

impl Number {
    fn within(self, range: Range) -> bool {
        match (self, range) {
            (Number::Int(v), Range::Int(lo, hi)) => (lo..=hi).contains(&v),
            // NaN and infinities are outside every range.
            (Number::Float(v), Range::Float(lo, hi)) => (lo..=hi).contains(&v),
            _ => false,
        }
    }

    fn shown(self) -> String {
        match self {
            Number::Int(v) => v.to_string(),
            Number::Float(v) => v.to_string(),
        }
    }
}

/// Every number of the configuration and its range: (section, field,
/// range). Milliseconds stay ≤ a day and seconds ≤ a day, so that
/// multiplied into nanoseconds they are far below `u64::MAX` (1.8e19 ns is
/// 584 years); counts are capped where memory would run out first.
pub const RANGES: &[(&str, &str, Range)] = &[
    ("detect", "storm_rate", Range::Float(0.1, 1_000_000.0)),
    ("detect", "suspect_rate", Range::Float(0.1, 1_000_000.0)),
    ("detect", "min_span_ms", Range::Int(0, 3_600_000)),
    ("detect", "failure_ratio", Range::Float(0.01, 1.0)),
    ("detect", "repeat_ratio", Range::Float(0.01, 1.0)),
    ("detect", "backoff_growth", Range::Float(1.01, 100.0)),
    ("detect", "backoff_min_step_ms", Range::Int(0, 60_000)),
    ("detect", "short_lived_ms", Range::Int(1, 60_000)),
    ("detect", "resolve_ms", Range::Int(100, 3_600_000)),
    ("detect", "calm_ms", Range::Int(100, 3_600_000)),
    ("detect", "persistent_ms", Range::Int(100, 86_400_000)),
    ("detect", "run_gap_ms", Range::Int(10, 3_600_000)),
    ("detect", "rollup_min_pids", Range::Int(2, 100_000)),
    ("detect", "max_flows", Range::Int(1, 10_000_000)),
    ("detect", "burst_attempts", Range::Int(2, 100_000_000)),
    ("store", "retention_days", Range::Int(1, 36_500)),
    ("store", "max_incidents", Range::Int(1, 10_000_000)),
    ("metrics", "per_storm_max", Range::Int(0, 1_000)),
    ("metrics", "per_service_max", Range::Int(1, 1_000)),
    ("probes", "max_attached_secs", Range::Int(1, 86_400)),
    ("enforce", "retry_ratio", Range::Float(0.0, 1.0)),
    ("enforce", "floor_per_s", Range::Float(0.01, 1_000_000.0)),
    ("enforce", "burst", Range::Int(1, 1_000_000)),
    ("enforce", "ttl_secs", Range::Int(1, 86_400)),
    (
        "enforce",
        "max_budgets",
        Range::Int(1, detector_common::enforce::MAX_BUDGETS as u64),
    ),
];

impl Config {
    /// Reads `path`, or the defaults when None.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.into(),
            cause,
        })?;
        let config = Self::parse(&text, path)?;
        config.check_store_path(path)?;
        crate::notify::check_commands(&config.notify).map_err(|problem| ConfigError::Notify {
            path: path.into(),
            problem,
        })?;
        Ok(config)
    }

    /// Parses TOML text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            // toml reports a byte span; turn it into a line number.
            let line = e.span().map(|s| {
                text.as_bytes()[..s.start.min(text.len())]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1
            });
            ConfigError::Parse {
                path: path.into(),
                message: match line {
                    Some(l) => format!("line {l}: {}", e.message()),
                    None => e.message().to_string(),
                },
            }
        })?;
        config
            .detect
            .validate()
            .map_err(|problem| ConfigError::Invalid {
                path: path.into(),
                problem,
            })?;
        config.check_ranges(path)?;
        if config.store.path.is_relative() {
            return Err(ConfigError::StorePath {
                path: path.into(),
                store: config.store.path.clone(),
                why: "must be an absolute path (the daemon's working directory is /)".into(),
            });
        }
        let bad = |field: &'static str, value: &str, why: &'static str| ConfigError::Invalid {
            path: path.into(),
            problem: crate::detect::config::ConfigError::Invalid {
                field,
                value: value.to_string(),
                why,
            },
        };
        if config.metrics.listen != "off"
            && config
                .metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .is_err()
        {
            return Err(bad(
                "metrics.listen",
                &config.metrics.listen,
                "must be an address like 127.0.0.1:9471, or \"off\"",
            ));
        }
        if u32::from_str_radix(&config.daemon.socket_mode, 8).map_or(true, |m| m > 0o777) {
            return Err(bad(
                "daemon.socket_mode",
                &config.daemon.socket_mode,
                "must be octal permissions like 0660",
            ));
        }
        if crate::enforce::request::errno_by_name(&config.enforce.errno).is_err() {
            return Err(bad(
                "enforce.errno",
                &config.enforce.errno,
                "must be an errno name (ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ENETUNREACH, \
                 EPERM, EACCES, ECONNRESET, EAGAIN) or a number 1..=4095",
            ));
        }
        if config.services.metadata_root.is_relative() {
            return Err(bad(
                "services.metadata_root",
                &config.services.metadata_root.display().to_string(),
                "must be an absolute path (\"/\" on a host, where the host's /run and /var/lib \
                 are mounted in a container)",
            ));
        }
        if !["auto", "always", "never"].contains(&config.probes.on_demand.as_str()) {
            return Err(bad(
                "probes.on_demand",
                &config.probes.on_demand,
                "must be auto, always or never",
            ));
        }
        crate::notify::resolve_all(&config.notify).map_err(|problem| ConfigError::Notify {
            path: path.into(),
            problem,
        })?;
        Ok(config)
    }

    /// The value of a field named in [`RANGES`].
    fn number(&self, section: &str, field: &str) -> Option<Number> {
        let d = &self.detect;
        let int = |v: u64| Some(Number::Int(v));
        let float = |v: f64| Some(Number::Float(v));
        match (section, field) {
            ("detect", "storm_rate") => float(d.storm_rate),
            ("detect", "suspect_rate") => float(d.suspect_rate),
            ("detect", "min_span_ms") => int(d.min_span_ms),
            ("detect", "failure_ratio") => float(d.failure_ratio),
            ("detect", "repeat_ratio") => float(d.repeat_ratio),
            ("detect", "backoff_growth") => float(d.backoff_growth),
            ("detect", "backoff_min_step_ms") => int(d.backoff_min_step_ms),
            ("detect", "short_lived_ms") => int(d.short_lived_ms),
            ("detect", "resolve_ms") => int(d.resolve_ms),
            ("detect", "calm_ms") => int(d.calm_ms),
            ("detect", "persistent_ms") => int(d.persistent_ms),
            ("detect", "run_gap_ms") => int(d.run_gap_ms),
            ("detect", "rollup_min_pids") => int(d.rollup_min_pids as u64),
            ("detect", "max_flows") => int(d.max_flows as u64),
            ("detect", "burst_attempts") => int(d.burst_attempts),
            ("enforce", "retry_ratio") => float(self.enforce.retry_ratio),
            ("enforce", "floor_per_s") => float(self.enforce.floor_per_s),
            ("enforce", "burst") => int(self.enforce.burst as u64),
            ("enforce", "ttl_secs") => int(self.enforce.ttl_secs),
            ("enforce", "max_budgets") => int(self.enforce.max_budgets as u64),
            ("store", "retention_days") => int(self.store.retention_days.into()),
            ("store", "max_incidents") => int(self.store.max_incidents.into()),
            ("metrics", "per_storm_max") => int(self.metrics.per_storm_max as u64),
            ("metrics", "per_service_max") => int(self.metrics.per_service_max as u64),
            ("probes", "max_attached_secs") => int(self.probes.max_attached_secs),
            _ => None,
        }
    }

    /// Checks every number against [`RANGES`]; the first one outside is
    /// the error.
    fn check_ranges(&self, path: &Path) -> Result<(), ConfigError> {
        for &(section, field, range) in RANGES {
            let Some(value) = self.number(section, field) else {
                // A RANGES row without a field: caught by a test.
                continue;
            };
            if !value.within(range) {
                return Err(ConfigError::OutOfRange {
                    path: path.into(),
                    section,
                    field,
                    value: value.shown(),
                    range: range.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Checks on the filesystem that `[store] path` can be a database file:
    /// not a directory, and its directory exists or can be created (the
    /// nearest existing ancestor is a directory, writable when running as
    /// root as the daemon does). Nothing is created.
    pub fn check_store_path(&self, path: &Path) -> Result<(), ConfigError> {
        let store = &self.store.path;
        let bad = |why: String| ConfigError::StorePath {
            path: path.into(),
            store: store.clone(),
            why,
        };
        if store.is_dir() {
            return Err(bad(
                "is a directory; give the database file, e.g. /var/lib/stormguard/incidents.db"
                    .into(),
            ));
        }
        let mut dir = store.parent();
        while let Some(d) = dir {
            if d.as_os_str().is_empty() {
                break;
            }
            match std::fs::metadata(d) {
                Ok(m) if m.is_dir() => {
                    // SAFETY: geteuid has no preconditions.
                    let root = unsafe { libc::geteuid() } == 0;
                    if root && !writable(d) {
                        return Err(bad(format!(
                            "its directory cannot be created: {} is not writable ({})",
                            d.display(),
                            std::io::Error::last_os_error()
                        )));
                    }
                    return Ok(());
                }
                Ok(_) => {
                    return Err(bad(format!(
                        "its directory cannot be created: {} is not a directory",
                        d.display()
                    )));
                }
                // Missing, or under something that is not a directory
                // (found and named on the way up).
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    dir = d.parent()
                }
                Err(e) => {
                    return Err(bad(format!(
                        "its directory cannot be created: {}: {e}",
                        d.display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// The on-demand mode (validated at load).
    pub fn on_demand(&self) -> crate::pipeline::OnDemand {
        match self.probes.on_demand.as_str() {
            "always" => crate::pipeline::OnDemand::Always,
            "never" => crate::pipeline::OnDemand::Never,
            _ => crate::pipeline::OnDemand::Auto,
        }
    }

    /// The configuration as TOML, every field shown.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }
}

/// Whether this process may create entries in directory `d` (access(2),
/// which also reports a read-only filesystem).
fn writable(d: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(d.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated string that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(
            Config::parse("", Path::new("c.toml")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn every_section_is_optional_and_shown() {
        let c = Config::parse("[metrics]\nlisten = \"off\"\n", Path::new("c.toml")).unwrap();
        assert_eq!(c.metrics.listen, "off");
        assert_eq!(c.daemon, DaemonConfig::default());
        let shown = c.to_toml();
        assert!(
            shown.contains("[store]") && shown.contains("retention_days = 30"),
            "{shown}"
        );
        assert_eq!(Config::parse(&shown, Path::new("c.toml")).unwrap(), c);
        let e = Config::parse("[metrics]\nlisten = \"everywhere\"\n", Path::new("c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.listen = everywhere"), "{e}");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let text = "[detect]\nstorm_rate = 20.0\nstorm_rat = 3\n";
        let e = Config::parse(text, Path::new("/etc/sg.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid config /etc/sg.toml: line 3:"), "{e}");
        assert!(e.contains("storm_rat"), "{e}");
        let e = Config::parse("[detect]\nrepeat_ratio = 0\n", Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config x.toml: detect.repeat_ratio = 0: must be in (0, 1]"
        );
    }

    /// TOML text setting `section.field` to `v` (and, for the two rates,
    /// the other one too where needed, so that suspect_rate ≤ storm_rate
    /// holds and the error, if any, is about `field`).
    fn setting(section: &str, field: &str, v: &str, inside: bool) -> String {
        match field {
            "storm_rate" | "suspect_rate" if inside || field == "storm_rate" => {
                format!("[{section}]\nstorm_rate = {v}\nsuspect_rate = {v}\n")
            }
            _ => format!("[{section}]\n{field} = {v}\n"),
        }
    }

    #[test]
    fn every_number_is_checked_at_both_ends_of_its_range() {
        let path = Path::new("c.toml");
        let mut checked = 0;
        for &(section, field, range) in RANGES {
            let (inside, outside): (Vec<String>, Vec<String>) = match range {
                Range::Int(lo, hi) => (
                    vec![lo.to_string(), hi.to_string()],
                    lo.checked_sub(1)
                        .into_iter()
                        .chain([hi + 1])
                        .map(|v| v.to_string())
                        .collect(),
                ),
                Range::Float(lo, hi) => (
                    vec![format!("{lo:?}"), format!("{hi:?}")],
                    vec![
                        format!("{:?}", lo - lo.abs() / 100.0 - 1e-9),
                        format!("{:?}", hi + 0.5),
                        "nan".into(),
                        "inf".into(),
                    ],
                ),
            };
            for v in &inside {
                let c = Config::parse(&setting(section, field, v, true), path)
                    .unwrap_or_else(|e| panic!("{section}.{field} = {v} refused: {e}"));
                let got = c.number(section, field).expect("a field").shown();
                assert_eq!(got.parse::<f64>().unwrap(), v.parse::<f64>().unwrap());
                checked += 1;
            }
            for v in &outside {
                let e = Config::parse(&setting(section, field, v, false), path)
                    .expect_err(&format!("{section}.{field} = {v} accepted"))
                    .to_string();
                let ours = format!(
                    "invalid config c.toml: [{section}] {field} = {} is out of range: must be {range}",
                    v.parse::<f64>().unwrap()
                );
                // A few are refused first by the engine's own checks.
                let engines = format!("invalid config c.toml: detect.{field} = ");
                assert!(e == ours || e.starts_with(&engines), "{e}\nnot {ours}");
                checked += 1;
            }
        }
        // 18 integer fields (3 starting at 0: no value below) × 2 + 2 or 1,
        // 7 float fields × (2 + 4).
        assert_eq!(checked, 18 * 4 - 3 + 7 * 6);
    }

    #[test]
    fn every_number_of_the_config_has_a_range() {
        let shown: toml::Table = toml::from_str(&Config::default().to_toml()).unwrap();
        let mut numbers = Vec::new();
        for (section, fields) in &shown {
            for (field, v) in fields.as_table().unwrap() {
                if v.is_integer() || v.is_float() {
                    numbers.push((section.clone(), field.clone()));
                }
            }
        }
        numbers.sort();
        let mut ranged: Vec<(String, String)> = RANGES
            .iter()
            .map(|(s, f, _)| (s.to_string(), f.to_string()))
            .collect();
        ranged.sort();
        assert_eq!(numbers, ranged);
        for (s, f, _) in RANGES {
            assert!(Config::default().number(s, f).is_some(), "{s}.{f}");
        }
    }

    #[test]
    fn the_overflowing_values_of_the_issue_are_refused() {
        let e = Config::parse(
            "[detect]\ncalm_ms = 9223372036854775807\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "invalid config c.toml: [detect] calm_ms = 9223372036854775807 is out of range: must be 100..=3600000"
        );
        let e = Config::parse(
            "[probes]\nmax_attached_secs = 18446744073709551\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "invalid config c.toml: [probes] max_attached_secs = 18446744073709551 is out of range: must be 1..=86400"
        );
        let e = Config::parse(
            "[detect]\ncalm_ms = 18446744073709551615\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "invalid config c.toml: [detect] calm_ms = 18446744073709551615 is out of range: must be 100..=3600000"
        );
        // Beyond u64: a parse error naming the line.
        let e = Config::parse(
            "[detect]\ncalm_ms = 18446744073709551616\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("invalid config c.toml: line 2:"), "{e}");
    }

    #[test]
    fn per_storm_series_are_off_by_default() {
        assert!(!Config::default().metrics.per_storm);
        assert!(
            Config::parse("[metrics]\nper_storm = true\n", Path::new("c.toml"))
                .unwrap()
                .metrics
                .per_storm
        );
    }

    #[test]
    fn store_paths_that_cannot_be_a_database_are_refused() {
        let cfg = Path::new("c.toml");
        let e = Config::parse("[store]\npath = \"incidents.db\"\n", cfg)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "invalid config c.toml: [store] path = incidents.db: must be an absolute path (the daemon's working directory is /)"
        );
        let dir = std::env::temp_dir().join(format!("sg-cfg-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("a-file");
        std::fs::write(&file, b"x").unwrap();
        let check = |store: &Path| {
            Config::parse(&format!("[store]\npath = \"{}\"\n", store.display()), cfg)
                .unwrap()
                .check_store_path(cfg)
                .map_err(|e| e.to_string())
        };
        assert_eq!(
            check(&dir).unwrap_err(),
            format!(
                "invalid config c.toml: [store] path = {}: is a directory; give the database file, e.g. /var/lib/stormguard/incidents.db",
                dir.display()
            )
        );
        assert_eq!(
            check(&file.join("sub").join("db")).unwrap_err(),
            format!(
                "invalid config c.toml: [store] path = {}: its directory cannot be created: {} is not a directory",
                file.join("sub").join("db").display(),
                file.display()
            )
        );
        // Missing directories that can be created are fine; none is created.
        check(&dir.join("new").join("deeper").join("db")).unwrap();
        assert!(!dir.join("new").exists());
        check(&dir.join("db")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn notify_tables_are_checked_and_shown() {
        let text = "[[notify]]\ncommand = [\"/bin/true\", \"$(x); y\"]\n\
                    [[notify]]\nwebhook = \"http://127.0.0.1:9/h\"\non = [\"start\"]\n";
        let c = Config::parse(text, Path::new("c.toml")).unwrap();
        assert_eq!(c.notify.len(), 2);
        let shown = c.to_toml();
        assert!(shown.contains("[[notify]]"), "{shown}");
        assert_eq!(Config::parse(&shown, Path::new("c.toml")).unwrap(), c);
        assert!(!Config::default().to_toml().contains("notify"));
        let e = Config::parse(
            "[[notify]]\nwebhook = \"https://x/\"\n",
            Path::new("/etc/sg.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("invalid config /etc/sg.toml: [[notify]] #1: webhook: \"https://x/\": https is not supported"),
            "{e}"
        );
        let e = Config::parse(
            "[[notify]]\ncommand = [\"/bin/true\"]\nshell = true\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("invalid config c.toml: line 3:") && e.contains("shell"),
            "{e}"
        );
        // Files are checked at load (and by `config check`), not by parse.
        let dir = std::env::temp_dir().join(format!("sg-cfg-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            format!(
                "[store]\npath = \"{}\"\n[[notify]]\ncommand = [\"/nonexistent/page-me\"]\n",
                dir.join("db").display()
            ),
        )
        .unwrap();
        let e = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(
            e.contains("[[notify]] #1: command: \"/nonexistent/page-me\": No such file"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_notify_example_parses_once_uncommented() {
        let text = include_str!("../../packaging/config.toml");
        let from = text.find("# [[notify]]").expect("the [[notify]] example");
        let example: String = text[from..]
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("# ").unwrap_or(l)))
            .collect();
        let c = Config::parse(&example, Path::new("packaging/config.toml"))
            .unwrap_or_else(|e| panic!("{e}\n{example}"));
        assert_eq!(c.notify.len(), 2);
        assert_eq!(c.notify[1].min_interval, "30s");
    }

    mod malformed {
        use super::*;
        use crate::record::fuzz;
        use proptest::prelude::*;

        /// Every field set, at its default: what mutations start from.
        fn valid() -> Vec<u8> {
            Config::default().to_toml().into_bytes()
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            /// Arbitrary text: parsed or refused, never a panic. Text that
            /// is not blank or comments is refused unless it is TOML with
            /// known fields, which random bytes practically never are.
            #[test]
            fn arbitrary_text_never_panics(bytes in fuzz::bytes()) {
                let text = String::from_utf8_lossy(&bytes);
                let r = Config::parse(&text, Path::new("c.toml"));
                let trivial = text.lines().all(|l| {
                    let l = l.trim();
                    l.is_empty() || l.starts_with('#')
                });
                prop_assert!(trivial || r.is_err() || r.as_ref().is_ok_and(|c| *c == Config::default()),
                    "accepted {text:?}: {r:?}");
            }

            /// Mutations of a valid file: whatever is accepted is within
            /// every range (the checks ran); nothing panics.
            #[test]
            fn mutated_files_never_panic(bytes in fuzz::mutations(valid())) {
                let text = String::from_utf8_lossy(&bytes);
                if let Ok(c) = Config::parse(&text, Path::new("c.toml")) {
                    prop_assert!(c.check_ranges(Path::new("c.toml")).is_ok());
                    prop_assert!(c.detect.validate().is_ok());
                }
            }
        }
    }
}
