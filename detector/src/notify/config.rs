//! The `[[notify]]` tables: what they may say, and what they resolve to.
use super::*;

/// Most `[[notify]]` tables.
pub const MAX_NOTIFIERS: usize = 16;
/// Events waiting for the notify thread; beyond, dropped and counted. Each
/// notifier's own queue has the same bound.
pub const QUEUE: usize = 64;
/// Allowed `timeout` per attempt, inclusive.
pub const TIMEOUT_MIN: Duration = Duration::from_millis(100);
pub const TIMEOUT_MAX: Duration = Duration::from_secs(60);
/// Longest `min_interval`.
pub const MIN_INTERVAL_MAX: Duration = Duration::from_secs(3600);
/// Most `retries`.
pub const RETRIES_MAX: u32 = 10;
/// First wait before a retry; doubled each retry up to [`BACKOFF_CAP`].
pub const BACKOFF_FIRST: Duration = Duration::from_secs(1);
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Bytes of a command's stdout or stderr kept; the rest is read and dropped
/// (so the command never blocks on a full pipe).
pub const OUTPUT_READ_MAX: usize = 64 * 1024;
/// Bytes of a command's output (or a webhook's error) shown in the log.
pub const OUTPUT_SHOWN: usize = 512;
/// `PATH` of a command notifier (its environment is otherwise cleared).
pub const COMMAND_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// One `[[notify]]` table, as written. Durations are humantime strings
/// ("5s", "500ms", "1m"), checked by [`NotifyConfig::resolve`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// argv of a command to run (absolute path first); the event JSON on
    /// its stdin.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// `http://host[:port]/path` to POST the event JSON to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Which events: "start", "end".
    pub on: Vec<String>,
    /// Per attempt.
    pub timeout: String,
    /// At most one page per this interval ("0s": no limit).
    pub min_interval: String,
    /// Attempts after the first one fails.
    pub retries: u32,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            command: None,
            webhook: None,
            on: vec!["start".into(), "end".into()],
            timeout: "5s".into(),
            min_interval: "0s".into(),
            retries: 3,
        }
    }
}

/// Why the `[[notify]]` tables were refused; the message names the table
/// (1-based, in file order), the field and what to do.
#[derive(Debug, thiserror::Error)]
pub enum NotifyConfigError {
    #[error(
        "{0} [[notify]] tables: at most {MAX_NOTIFIERS}; send to one relay that fans out instead"
    )]
    TooMany(usize),
    #[error("[[notify]] #{index}: {field}: {problem}")]
    Field {
        index: usize,
        field: &'static str,
        problem: String,
    },
}

/// The event a notifier is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// An incident opened.
    Start,
    /// An incident closed.
    End,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Start => "start",
            EventKind::End => "end",
        }
    }
}

/// Where a notifier sends.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// argv, `argv[0]` absolute.
    Command(Vec<String>),
    /// An `http://` URL, split for the connection.
    Webhook {
        url: String,
        host: String,
        port: u16,
        /// Path and query, at least "/".
        path: String,
    },
}

/// A checked `[[notify]]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct Notifier {
    /// 1-based position in the file, for logs.
    pub index: usize,
    pub target: Target,
    pub on_start: bool,
    pub on_end: bool,
    pub timeout: Duration,
    pub min_interval: Duration,
    pub retries: u32,
}

impl Notifier {
    /// For logs: which table, what kind, where (a webhook's host and port
    /// only: its path may hold a token).
    pub fn name(&self) -> String {
        match &self.target {
            Target::Command(argv) => format!("#{} command {}", self.index, argv[0]),
            Target::Webhook { host, port, .. } => {
                format!("#{} webhook {host}:{port}", self.index)
            }
        }
    }

    pub fn wants(&self, kind: EventKind) -> bool {
        match kind {
            EventKind::Start => self.on_start,
            EventKind::End => self.on_end,
        }
    }
}

pub(super) fn duration(
    index: usize,
    field: &'static str,
    text: &str,
    lo: Duration,
    hi: Duration,
) -> Result<Duration, NotifyConfigError> {
    let bad = |problem: String| NotifyConfigError::Field {
        index,
        field,
        problem,
    };
    let d = humantime::parse_duration(text.trim()).map_err(|e| {
        bad(format!(
            "{text:?} is not a duration ({e}); write e.g. \"5s\""
        ))
    })?;
    if d < lo || d > hi {
        return Err(bad(format!(
            "{text:?} is out of range: must be {} to {}",
            humantime::format_duration(lo),
            humantime::format_duration(hi)
        )));
    }
    Ok(d)
}

impl NotifyConfig {
    /// Checks the table (text only; see [`check_commands`] for the files)
    /// and resolves it. `index` is 1-based.
    pub fn resolve(&self, index: usize) -> Result<Notifier, NotifyConfigError> {
        let bad = |field: &'static str, problem: String| NotifyConfigError::Field {
            index,
            field,
            problem,
        };
        let target = match (&self.command, &self.webhook) {
            (None, None) => {
                return Err(bad(
                    "command/webhook",
                    "neither is set; give command = [\"/absolute/path\", \"arg\", ...] or \
                     webhook = \"http://host:port/path\""
                        .into(),
                ));
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "command/webhook",
                    "both are set; give one per [[notify]] table (add another table for the other)"
                        .into(),
                ));
            }
            (Some(argv), None) => {
                let Some(first) = argv.first() else {
                    return Err(bad(
                        "command",
                        "is empty; give the program's absolute path first, e.g. \
                         [\"/usr/local/bin/page-me\", \"--team\", \"sre\"]"
                            .into(),
                    ));
                };
                if !first.starts_with('/') {
                    return Err(bad(
                        "command",
                        format!(
                            "{first:?} is not an absolute path; give the full path (it is run \
                             without a shell and without a PATH lookup), e.g. \"/usr/bin/{}\"",
                            first.rsplit('/').next().unwrap_or(first)
                        ),
                    ));
                }
                if argv.iter().any(|a| a.contains('\0')) {
                    return Err(bad("command", "an argument contains a NUL byte".into()));
                }
                Target::Command(argv.clone())
            }
            (None, Some(url)) => webhook(url).map_err(|p| bad("webhook", p))?,
        };
        if self.on.is_empty() {
            return Err(bad(
                "on",
                "is empty, so it would never notify; give [\"start\"], [\"end\"] or both".into(),
            ));
        }
        for o in &self.on {
            if o != "start" && o != "end" {
                return Err(bad(
                    "on",
                    format!("{o:?} is not an event; the events are \"start\" and \"end\""),
                ));
            }
        }
        if self.retries > RETRIES_MAX {
            return Err(bad(
                "retries",
                format!(
                    "{} is out of range: must be 0..={RETRIES_MAX}",
                    self.retries
                ),
            ));
        }
        Ok(Notifier {
            index,
            target,
            on_start: self.on.iter().any(|o| o == "start"),
            on_end: self.on.iter().any(|o| o == "end"),
            timeout: duration(index, "timeout", &self.timeout, TIMEOUT_MIN, TIMEOUT_MAX)?,
            min_interval: duration(
                index,
                "min_interval",
                &self.min_interval,
                Duration::ZERO,
                MIN_INTERVAL_MAX,
            )?,
            retries: self.retries,
        })
    }
}

/// Splits an `http://` URL; the error says what to write instead.
pub(super) fn webhook(url: &str) -> Result<Target, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| {
        format!("{url:?} is not a URL ({e}); write e.g. \"http://127.0.0.1:9000/hook\"")
    })?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{url:?}: https is not supported (stormguard has no TLS client); POST to a \
                 local relay over http://, e.g. \"http://127.0.0.1:9000/hook\", that forwards it"
            ));
        }
        _ => {
            return Err(format!(
                "{url:?} is not an http:// URL; write e.g. \"http://127.0.0.1:9000/hook\""
            ));
        }
    }
    let Some(authority) = uri.authority() else {
        return Err(format!("{url:?} has no host"));
    };
    if authority.as_str().contains('@') {
        return Err(format!(
            "{url:?}: credentials in the URL are not supported (they would be logged and sent \
             in clear); use a token in the path of a local relay"
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    Ok(Target::Webhook {
        url: url.to_string(),
        host: host.to_string(),
        port: authority.port_u16().unwrap_or(80),
        path: uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".into()),
    })
}

/// Checks and resolves every table.
pub fn resolve_all(tables: &[NotifyConfig]) -> Result<Vec<Notifier>, NotifyConfigError> {
    if tables.len() > MAX_NOTIFIERS {
        return Err(NotifyConfigError::TooMany(tables.len()));
    }
    tables
        .iter()
        .enumerate()
        .map(|(i, t)| t.resolve(i + 1))
        .collect()
}

/// Checks on the filesystem that each command's `argv[0]` is an executable
/// file (at load and in `config check`: a typo must stop the start, not
/// surface at the first storm).
pub fn check_commands(tables: &[NotifyConfig]) -> Result<(), NotifyConfigError> {
    use std::os::unix::fs::PermissionsExt as _;
    for (i, t) in tables.iter().enumerate() {
        let Some(first) = t.command.as_ref().and_then(|c| c.first()) else {
            continue;
        };
        let bad = |problem: String| NotifyConfigError::Field {
            index: i + 1,
            field: "command",
            problem,
        };
        match std::fs::metadata(Path::new(first)) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
            Ok(m) if m.is_file() => {
                return Err(bad(format!("{first:?} is not executable; chmod +x it")));
            }
            Ok(_) => return Err(bad(format!("{first:?} is not a file"))),
            Err(e) => {
                return Err(bad(format!(
                    "{first:?}: {e}; give the absolute path of an executable"
                )));
            }
        }
    }
    Ok(())
}
