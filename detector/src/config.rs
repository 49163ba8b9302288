//! The configuration file (TOML). Every field is optional and defaulted; an
//! unknown or invalid field is refused with the file, line and field named.
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
    /// Export one series per active storm (labels comm, destination). Any
    /// local user can read a loopback port: turn this off if process names
    /// and destinations are sensitive on this host.
    pub per_storm: bool,
    /// At most this many per-storm series.
    pub per_storm_max: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9471".into(),
            per_storm: true,
            per_storm_max: 50,
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
}

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
        Self::parse(&text, path)
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
        if !["auto", "always", "never"].contains(&config.probes.on_demand.as_str()) {
            return Err(bad(
                "probes.on_demand",
                &config.probes.on_demand,
                "must be auto, always or never",
            ));
        }
        Ok(config)
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
}
