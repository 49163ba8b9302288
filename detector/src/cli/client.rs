//! What every command that queries the daemon shares: where the socket is,
//! `--json`, and turning API errors into messages a person can act on.
use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

use crate::{
    api::client::{Client, ClientError},
    config::Config,
    daemon::config_path,
};

#[derive(Debug, Args, Clone)]
pub struct ClientArgs {
    /// The daemon's API socket (default: daemon.socket from
    /// /etc/stormguard/config.toml, else /run/stormguard/stormguard.sock).
    #[arg(long, env = "STORMGUARD_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

impl ClientArgs {
    /// Connects to the daemon.
    pub fn connect(&self) -> Result<Client, ClientError> {
        // The config file only helps find the socket and name the group;
        // a broken one must not stop a query.
        let cfg = config_path(None)
            .and_then(|p| Config::load(Some(&p)).ok())
            .unwrap_or_default();
        let socket = self.socket.clone().unwrap_or(cfg.daemon.socket);
        Client::connect(&socket, &cfg.daemon.socket_group)
    }

    pub fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        self.connect()?.call(method, params)
    }
}

/// Prints a value as one JSON document.
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    super::write_stdout(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

/// A unix-milliseconds time as UTC.
pub fn fmt_time(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// A duration in seconds, short: "4m12s".
pub fn fmt_secs(secs: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(secs))
        .to_string()
        .replace(' ', "")
}

/// Eight-level bars for a series (empty for none).
pub fn sparkline(values: &[f64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().fold(0.0, f64::max);
    values
        .iter()
        .map(|v| {
            if max <= 0.0 {
                BARS[0]
            } else {
                BARS[((v / max) * 7.0).round().clamp(0.0, 7.0) as usize]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(sparkline(&[0.0, 5.0, 10.0]), "▁▅█");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_secs(252), "4m12s");
    }
}
