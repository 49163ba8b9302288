//! The configuration file (TOML). Every field is optional and defaulted; an
//! unknown or invalid field is refused with the file, line and field named.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::DetectConfig;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Detection thresholds.
    pub detect: DetectConfig,
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
        Ok(config)
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
