//! `stormguard incidents [--since 1h] [--active]`.
use clap::Args;
use serde_json::json;

use super::client::{ClientArgs, fmt_secs, fmt_time, print_json};
use crate::incident::Incident;

#[derive(Debug, Args)]
pub struct IncidentsArgs {
    /// Only incidents that started within this long (e.g. 30m, 1h, 2d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<std::time::Duration>,
    /// Only incidents still going on.
    #[arg(long)]
    pub active: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: IncidentsArgs) -> anyhow::Result<()> {
    let v = args.client.call(
        "incidents",
        json!({"since_secs": args.since.map(|d| d.as_secs()), "active": args.active}),
    )?;
    if args.client.json {
        return print_json(&v);
    }
    let list: Vec<Incident> = serde_json::from_value(v)?;
    super::write_stdout(&render(&list))
}

/// The table of `incidents`, or "no incidents".
pub fn render(list: &[Incident]) -> String {
    use std::fmt::Write as _;
    if list.is_empty() {
        return "no incidents\n".into();
    }
    let mut out = String::new();
    // PROCS: processes in the storm — 1 for a flow; for a group (comm
    // marked `*`: the parent's, or the cgroup's busiest member's) every
    // storming child or member, whose own storms are not listed.
    let _ = writeln!(
        out,
        "{:<9} {:<10} {:<20} {:>7} {:>7} {:<15} {:<20} {:>6} {:<26} {:>9} {:>9} {:>5} ERROR",
        "ID",
        "STATE",
        "STARTED",
        "LASTED",
        "PID",
        "COMM",
        "SERVICE",
        "PROCS",
        "DESTINATION",
        "PEAK/s",
        "ATTEMPTS",
        "CPU"
    );
    for i in list {
        let lasted = (i.ended_at.unwrap_or(i.updated_at) - i.started_at).max(0) / 1000;
        let _ = writeln!(
            out,
            "{:<9} {:<10} {:<20} {:>7} {:>7} {:<15} {:<20} {:>6} {:<26} {:>9.0} {:>9} {:>5} {}",
            i.id,
            match (i.active, i.end_reason.as_deref()) {
                (true, _) => i.state.as_str(),
                (false, Some(r)) if r.starts_with("merged") => "merged",
                (false, _) => "ended",
            },
            fmt_time(i.started_at),
            fmt_secs(lasted as u64),
            i.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            format!("{}{}", i.comm, if i.kind == "flow" { "" } else { "*" }),
            super::top::service(i.service.as_ref().map(|s| s.name.as_str()), 20),
            i.processes(),
            i.destination,
            i.peak_rate,
            i.total_attempts,
            // Peak cores the storming processes used.
            i.cost
                .as_ref()
                .map_or_else(|| "-".into(), |c| format!("{:.2}", c.peak_cpu_cores)),
            i.failure_mix
                .first()
                .map(|(e, _)| e.as_str())
                .unwrap_or("-"),
        );
    }
    out
}
