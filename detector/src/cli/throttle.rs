//! `stormguard throttle`, `release` and `throttles`: manual budgets.
//!
//! Every value is checked here before the daemon sees it (the same rules
//! as the API's), so a typo is a usage error, not a round trip.
use clap::{ArgGroup, Args};
use serde_json::{Value, json};

use super::client::{ClientArgs, fmt_secs, print_json};
use crate::enforce::{
    BudgetView, DestSpec,
    request::{check_retry_ratio, errno_by_name, parse_budget_id, parse_for, parse_rate},
};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["pid", "cgroup", "unit"])))]
pub struct ThrottleArgs {
    /// Hold this process's connects.
    #[arg(long, value_name = "PID", value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,
    /// Hold the connects of every process in this cgroup v2 path
    /// (e.g. /system.slice/app.service).
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<String>,
    /// Hold the connects of every process of this systemd unit.
    #[arg(long, value_name = "NAME")]
    pub unit: Option<String>,
    /// Only connects to this destination (ADDR or ADDR:PORT; IPv6 as
    /// [ADDR]:PORT); default: every destination.
    #[arg(long, value_name = "ADDR[:PORT]")]
    pub dest: Option<DestSpec>,
    /// Attempts allowed per second: 10/s, 10/sec, 10 or 0.5/s.
    #[arg(long, value_name = "N/s", value_parser = parse_rate)]
    pub rate: f64,
    /// Attempts allowed at once before the rate applies (default: the
    /// rate, at least 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub burst: Option<u32>,
    /// Make it a retry budget: each success allows this many more
    /// attempts (above 0, at most 1).
    #[arg(long, value_name = "R", value_parser = parse_ratio)]
    pub retry_ratio: Option<f64>,
    /// How long the budget lasts: 90 (seconds), 2s, 5m, 1h; at most 7d.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_for)]
    pub for_secs: u64,
    /// What a connect beyond the budget fails with (default: from the
    /// daemon's configuration): ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, …
    #[arg(long, value_name = "NAME", value_parser = parse_errno)]
    pub errno: Option<String>,
    /// Count what would be held back, hold back nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["id", "all"])))]
pub struct ReleaseArgs {
    /// The budget to end (thr-3; see `stormguard throttles`).
    #[arg(value_name = "ID", value_parser = parse_id)]
    pub id: Option<u64>,
    /// End every budget.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ThrottlesArgs {
    #[command(flatten)]
    pub client: ClientArgs,
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number (e.g. 0.2)"))?;
    check_retry_ratio(r)
}

fn parse_errno(s: &str) -> Result<String, String> {
    errno_by_name(s).map(|_| s.to_string())
}

fn parse_id(s: &str) -> Result<u64, String> {
    parse_budget_id(s).ok_or_else(|| {
        format!("`{s}` is not a budget id (they look like thr-3; see `stormguard throttles`)")
    })
}

impl ThrottleArgs {
    /// The API's `throttle` params.
    pub fn params(&self) -> Value {
        let mut p = json!({
            "rate": self.rate,
            "for_secs": self.for_secs,
            "dry_run": self.dry_run,
        });
        if let Some(pid) = self.pid {
            p["pid"] = json!(pid);
        }
        if let Some(cgroup) = &self.cgroup {
            p["cgroup"] = json!(cgroup);
        }
        if let Some(unit) = &self.unit {
            p["unit"] = json!(unit);
        }
        if let Some(dest) = self.dest {
            p["dest"] = json!(dest.to_string());
        }
        if let Some(burst) = self.burst {
            p["burst"] = json!(burst);
        }
        if let Some(r) = self.retry_ratio {
            p["retry_ratio"] = json!(r);
        }
        if let Some(errno) = &self.errno {
            p["errno"] = json!(errno);
        }
        p
    }
}

impl ReleaseArgs {
    /// The API's `release` params.
    pub fn params(&self) -> Value {
        match self.id {
            Some(n) if !self.all => json!({"id": format!("thr-{n}")}),
            _ => json!({"all": true}),
        }
    }
}

pub fn run_throttle(args: ThrottleArgs) -> anyhow::Result<()> {
    let v = args.client.call("throttle", args.params())?;
    if args.client.json {
        return print_json(&v);
    }
    let view: BudgetView = serde_json::from_value(v)?;
    super::write_stdout(&render_throttled(&view))
}

pub fn run_release(args: ReleaseArgs) -> anyhow::Result<()> {
    let v = args.client.call("release", args.params())?;
    if args.client.json {
        return print_json(&v);
    }
    #[derive(serde::Deserialize)]
    struct Released {
        released: Vec<String>,
    }
    let r: Released = serde_json::from_value(v)?;
    super::write_stdout(&render_released(&r.released))
}

pub fn run_throttles(args: ThrottlesArgs) -> anyhow::Result<()> {
    let v = args.client.call("throttles", Value::Null)?;
    if args.client.json {
        return print_json(&v);
    }
    let list: Vec<BudgetView> = serde_json::from_value(v)?;
    super::write_stdout(&render_list(&list))
}

/// A rate without needless decimals: `10`, `0.5`, `0.33`.
fn fmt_rate(r: f64) -> String {
    let s = format!("{r:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `10/s`, or for a retry budget `10/s +20%` (floor, and the share of
/// each success it gets back).
fn fmt_budget_rate(b: &BudgetView) -> String {
    match b.retry_ratio {
        Some(r) if b.kind == "retry" => {
            format!("{}/s +{}%", fmt_rate(b.rate_per_s), fmt_rate(r * 100.0))
        }
        _ => format!("{}/s", fmt_rate(b.rate_per_s)),
    }
}

/// The line `throttle` prints.
pub fn render_throttled(b: &BudgetView) -> String {
    let dest = b.dest.as_deref().unwrap_or("every destination");
    let retry = match b.retry_ratio {
        Some(r) if b.kind == "retry" => format!(" plus {} per success", fmt_rate(r)),
        _ => String::new(),
    };
    let lasts = ((b.expires_ms - b.created_ms).max(0) as u64).div_ceil(1000);
    let beyond = if b.mode == "enforce" {
        format!("connects beyond it fail with {}", b.errno)
    } else {
        "connects beyond it are only counted".to_string()
    };
    format!(
        "{}: {} → {dest} held to {}/s{retry} (burst {}) for {}, mode {}; {beyond}\n",
        b.id,
        b.target,
        fmt_rate(b.rate_per_s),
        b.burst,
        fmt_secs(lasts),
        b.mode,
    )
}

/// What `release` prints: one line per budget ended.
pub fn render_released(ids: &[String]) -> String {
    if ids.is_empty() {
        return "no budgets\n".into();
    }
    ids.iter().map(|id| format!("released {id}\n")).collect()
}

/// The table of `throttles`, or "no budgets".
pub fn render_list(list: &[BudgetView]) -> String {
    use std::fmt::Write as _;
    if list.is_empty() {
        return "no budgets\n".into();
    }
    const HEAD: [&str; 11] = [
        "ID", "TARGET", "DEST", "KIND", "RATE", "MODE", "LEFT", "ALLOWED", "SLOWED", "DENIED",
        "ORIGIN",
    ];
    // Right-aligned: the counts.
    const NUMERIC: [bool; 11] = [
        false, false, false, false, false, false, false, true, true, true, false,
    ];
    let rows: Vec<[String; 11]> = list
        .iter()
        .map(|b| {
            [
                b.id.clone(),
                b.target.clone(),
                b.dest.clone().unwrap_or_else(|| "any".into()),
                b.kind.clone(),
                fmt_budget_rate(b),
                b.mode.clone(),
                fmt_secs(b.remaining_s),
                b.allowed.to_string(),
                b.slowed.to_string(),
                b.denied.to_string(),
                match &b.incident {
                    Some(inc) => format!("{} ({inc})", b.origin),
                    None => b.origin.clone(),
                },
            ]
        })
        .collect();
    let mut widths = HEAD.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                l.push(' ');
            }
            let w = widths[i];
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else if NUMERIC[i] {
                let _ = write!(l, "{cell:>w$}");
            } else {
                let _ = write!(l, "{cell:<w$}");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&HEAD.map(String::from));
    for row in &rows {
        line(row);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::{Parser as _, error::ErrorKind};

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        let mut argv = vec!["stormguard"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|c| c.command)
    }

    fn throttle(args: &[&str]) -> Result<ThrottleArgs, clap::Error> {
        let mut argv = vec!["throttle"];
        argv.extend_from_slice(args);
        parse(&argv).map(|c| match c {
            Command::Throttle(a) => a,
            other => panic!("{other:?}"),
        })
    }

    fn err_kind(r: Result<ThrottleArgs, clap::Error>) -> ErrorKind {
        r.expect_err("refused").kind()
    }

    #[test]
    fn throttle_arguments() {
        let a = throttle(&[
            "--pid",
            "1234",
            "--dest",
            "127.0.0.1:8080",
            "--rate",
            "10/s",
            "--burst",
            "20",
            "--retry-ratio",
            "0.2",
            "--for",
            "5m",
            "--errno",
            "ETIMEDOUT",
            "--dry-run",
            "--json",
            "--socket",
            "/tmp/x.sock",
        ])
        .unwrap();
        assert_eq!(
            a.params(),
            json!({
                "pid": 1234, "dest": "127.0.0.1:8080", "rate": 10.0, "burst": 20,
                "retry_ratio": 0.2, "for_secs": 300, "errno": "ETIMEDOUT", "dry_run": true
            })
        );
        assert!(a.client.json);
        assert_eq!(
            a.client.socket.as_deref(),
            Some(std::path::Path::new("/tmp/x.sock"))
        );

        let a = throttle(&["--unit", "nginx.service", "--rate", "0.5", "--for", "90"]).unwrap();
        assert_eq!(
            a.params(),
            json!({"unit": "nginx.service", "rate": 0.5, "for_secs": 90, "dry_run": false})
        );
        let a = throttle(&["--cgroup", "/x/y", "--rate", "3/sec", "--for", "1h"]).unwrap();
        assert_eq!(
            (a.cgroup.as_deref(), a.rate, a.for_secs),
            (Some("/x/y"), 3.0, 3600)
        );
    }

    #[test]
    fn bad_throttle_arguments_are_usage_errors() {
        let base = ["--rate", "10/s", "--for", "30s"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            throttle(&v)
        };
        // No target, two targets.
        assert_eq!(err_kind(with(&[])), ErrorKind::MissingRequiredArgument);
        assert_eq!(
            err_kind(with(&["--pid", "1", "--unit", "x.service"])),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            err_kind(with(&["--cgroup", "/x", "--unit", "x.service"])),
            ErrorKind::ArgumentConflict
        );
        // Bad values.
        for bad in [
            &["--pid", "0"][..],
            &["--pid", "1", "--dest", "example.com:80"],
            &["--pid", "1", "--burst", "0"],
            &["--pid", "1", "--retry-ratio", "1.5"],
            &["--pid", "1", "--retry-ratio", "x"],
            &["--pid", "1", "--errno", "EWHAT"],
        ] {
            let e = with(bad).expect_err("refused");
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad:?}: {e}");
        }
        for rate in ["0/s", "0", "fast", "10/min"] {
            let e = throttle(&["--pid", "1", "--rate", rate, "--for", "30s"]).expect_err(rate);
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{rate}");
        }
        for d in ["0", "8d", "soon"] {
            let e = throttle(&["--pid", "1", "--rate", "1", "--for", d]).expect_err(d);
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{d}");
        }
        // Rate and duration are required.
        assert_eq!(
            err_kind(throttle(&["--pid", "1", "--for", "30s"])),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            err_kind(throttle(&["--pid", "1", "--rate", "1"])),
            ErrorKind::MissingRequiredArgument
        );
        let msg = throttle(&["--pid", "1", "--rate", "x", "--for", "30s"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("10/s"), "{msg}");
    }

    #[test]
    fn release_and_throttles_arguments() {
        let release = |args: &[&str]| {
            let mut argv = vec!["release"];
            argv.extend_from_slice(args);
            parse(&argv).map(|c| match c {
                Command::Release(a) => a,
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(
            release(&["thr-3"]).unwrap().params(),
            json!({"id": "thr-3"})
        );
        assert_eq!(release(&["3"]).unwrap().params(), json!({"id": "thr-3"}));
        assert_eq!(
            release(&["--all", "--json"]).unwrap().params(),
            json!({"all": true})
        );
        assert_eq!(
            release(&[]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        assert_eq!(
            release(&["thr-3", "--all"]).unwrap_err().kind(),
            ErrorKind::ArgumentConflict
        );
        assert_eq!(
            release(&["inc-3"]).unwrap_err().kind(),
            ErrorKind::ValueValidation
        );
        assert!(
            matches!(parse(&["throttles", "--json"]), Ok(Command::Throttles(a)) if a.client.json)
        );
    }

    fn view() -> BudgetView {
        BudgetView {
            id: "thr-3".into(),
            origin: "manual".into(),
            target: "pid 1234 (curl)".into(),
            dest: Some("127.0.0.1:8080".into()),
            kind: "rate".into(),
            rate_per_s: 10.0,
            burst: 10,
            retry_ratio: None,
            errno: "ECONNREFUSED".into(),
            mode: "enforce".into(),
            created_ms: 1_000,
            expires_ms: 31_000,
            remaining_s: 30,
            allowed: 12,
            slowed: 0,
            denied: 345,
            incident: None,
        }
    }

    #[test]
    fn throttled_line() {
        assert_eq!(
            render_throttled(&view()),
            "thr-3: pid 1234 (curl) → 127.0.0.1:8080 held to 10/s (burst 10) for 30s, mode enforce; connects beyond it fail with ECONNREFUSED\n"
        );
        let retry = BudgetView {
            dest: None,
            kind: "retry".into(),
            rate_per_s: 0.5,
            retry_ratio: Some(0.2),
            mode: "dry-run".into(),
            expires_ms: 1_000 + 300_000,
            ..view()
        };
        assert_eq!(
            render_throttled(&retry),
            "thr-3: pid 1234 (curl) → every destination held to 0.5/s plus 0.2 per success (burst 10) for 5m, mode dry-run; connects beyond it are only counted\n"
        );
    }

    #[test]
    fn released_and_listed() {
        assert_eq!(render_released(&[]), "no budgets\n");
        assert_eq!(
            render_released(&["thr-3".into(), "thr-4".into()]),
            "released thr-3\nreleased thr-4\n"
        );
        assert_eq!(render_list(&[]), "no budgets\n");
        let auto = BudgetView {
            id: "thr-12".into(),
            origin: "auto".into(),
            target: "cgroup /system.slice/app.service".into(),
            dest: None,
            kind: "retry".into(),
            rate_per_s: 5.0,
            retry_ratio: Some(0.1),
            mode: "dry-run".into(),
            remaining_s: 252,
            allowed: 1,
            denied: 0,
            incident: Some("inc-7".into()),
            ..view()
        };
        let table = render_list(&[view(), auto]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert_eq!(
            lines[0],
            "ID     TARGET                           DEST           KIND  RATE     MODE    LEFT  ALLOWED SLOWED DENIED ORIGIN"
        );
        assert_eq!(
            lines[1],
            "thr-3  pid 1234 (curl)                  127.0.0.1:8080 rate  10/s     enforce 30s        12      0    345 manual"
        );
        assert_eq!(
            lines[2],
            "thr-12 cgroup /system.slice/app.service any            retry 5/s +10% dry-run 4m12s       1      0      0 auto (inc-7)"
        );
    }
}
