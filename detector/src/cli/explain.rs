//! `stormguard explain <inc-id|pid>`: one incident in full.
use clap::Args;
use serde_json::json;

use super::client::{ClientArgs, fmt_secs, fmt_time, print_json, sparkline};
use crate::incident::{Incident, parse_id};

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// An incident id (inc-42) or a pid (its latest incident).
    pub target: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: ExplainArgs) -> anyhow::Result<()> {
    let params = if parse_id(&args.target).is_some() {
        json!({"id": args.target})
    } else if let Ok(pid) = args.target.parse::<u32>() {
        json!({"pid": pid})
    } else {
        anyhow::bail!(
            "`{}` is neither an incident id (inc-42) nor a pid",
            args.target
        );
    };
    let v = args.client.call("explain", params)?;
    if args.client.json {
        return print_json(&v);
    }
    let i: Incident = serde_json::from_value(v)?;
    super::write_stdout(&render(&i))
}

/// The text of `explain`.
pub fn render(i: &Incident) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<10} {v}\n"));
    let status = if i.active {
        format!("{} (active)", i.state)
    } else {
        format!("ended ({})", i.end_reason.as_deref().unwrap_or("-"))
    };
    line(&i.id, format!("{status}, {} incident", i.kind));
    line("why", i.explanation.clone());
    let who = match (i.kind.as_str(), i.pid) {
        ("flow", Some(p)) => format!("{} (pid {p})", i.comm),
        ("parent", Some(p)) => format!("children of {} (pid {p})", i.comm),
        _ => match &i.cgroup {
            Some(path) => format!(
                "processes of cgroup {path} (id {})",
                i.cgroup_id.unwrap_or(0)
            ),
            None => format!("processes of cgroup {}", i.cgroup_id.unwrap_or(0)),
        },
    };
    line("process", who);
    if i.kind != "flow" {
        // A group incident stands for every storming process in it (their
        // own storms are not incidents): say how many, and the busiest.
        line("processes", i.processes().to_string());
        if !i.top_members.is_empty() {
            let top: Vec<String> = i
                .top_members
                .iter()
                .map(|m| {
                    let comm = if m.comm.is_empty() { "?" } else { &m.comm };
                    format!("{comm} (pid {}) {} attempts", m.pid, m.attempts)
                })
                .collect();
            line("busiest", top.join(", "));
        }
    }
    if let Some(u) = i.uid {
        line("uid", u.to_string());
    }
    if let Some(p) = i.ppid {
        line("parent", p.to_string());
    }
    if let Some(e) = &i.exe {
        line("exe", e.clone());
    }
    if let Some(c) = &i.cmdline {
        line("cmdline", c.clone());
    }
    line(
        "cgroup",
        format!(
            "{}{}{}",
            i.cgroup.as_deref().unwrap_or("-"),
            i.unit
                .as_ref()
                .map(|u| format!(" (unit {u})"))
                .unwrap_or_default(),
            i.container
                .as_ref()
                .map(|c| format!(" (container {})", &c[..12.min(c.len())]))
                .unwrap_or_default()
        ),
    );
    if let Some(s) = &i.service {
        line("service", s.describe());
    }
    line(
        "target",
        format!("{} {} (netns {})", i.proto, i.destination, i.netns),
    );
    let end = i.ended_at.unwrap_or(i.updated_at);
    line(
        "when",
        format!(
            "{} for {}",
            fmt_time(i.started_at),
            fmt_secs(((end - i.started_at).max(0) / 1000) as u64)
        ),
    );
    line(
        "attempts",
        format!(
            "{} ({} failed), peak {:.0}/s{}",
            i.total_attempts,
            i.total_failures,
            i.peak_rate,
            i.syscalls_per_s
                .map(|r| format!(", {r:.0} syscalls/s while probed"))
                .unwrap_or_default()
        ),
    );
    let rates: Vec<f64> = i.timeline.iter().map(|r| *r as f64).collect();
    line(
        "rate/s",
        format!("{} ({} s)", sparkline(&rates), rates.len()),
    );
    let total: u32 = i.failure_mix.iter().map(|(_, n)| n).sum();
    let mix: Vec<String> = i
        .failure_mix
        .iter()
        .map(|(e, n)| format!("{e} {n} ({:.0}%)", 100.0 * *n as f64 / total.max(1) as f64))
        .collect();
    line(
        "errors",
        if mix.is_empty() {
            "-".into()
        } else {
            mix.join(", ")
        },
    );
    let most = i
        .gap_histogram
        .iter()
        .map(|(_, n)| *n)
        .max()
        .unwrap_or(0)
        .max(1);
    let gaps: Vec<String> = i
        .gap_histogram
        .iter()
        .map(|(l, n)| format!("{l:>9} {:<16} {n}", "█".repeat((16 * n / most) as usize)))
        .collect();
    line("gaps", gaps.join("\n           "));
    line(
        "backoff",
        format!(
            "{}{}",
            i.backoff,
            i.median_gap_us
                .map(|g| format!(", median gap {:.1} ms", g as f64 / 1000.0))
                .unwrap_or_default()
        ),
    );
    if let Some(c) = &i.cost {
        line("cost", c.summary());
    }
    if !i.stacks.is_empty() {
        line("stacks", render_stacks(&i.stacks));
    }
    if i.kind != "flow" {
        let listed = i.members.len() as u64;
        line(
            "members",
            format!(
                "{}{}",
                i.members
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                if i.processes() > listed {
                    format!(" ({listed} of {} listed)", i.processes())
                } else {
                    String::new()
                }
            ),
        );
    }
    out
}

/// Frames of a stack shown at most.
const FRAMES_SHOWN: usize = 12;

/// The top stacks, each with its share and frames (innermost first).
fn render_stacks(stacks: &[crate::stacks::StackShare]) -> String {
    use crate::stacks::Method;
    let mut out = Vec::new();
    for s in stacks {
        let how = match s.stack.method {
            Method::Unwound => "unwound",
            Method::FramePointers => "frame pointers",
        };
        out.push(format!(
            "{:.0}% of calls ({}), {how}{}",
            100.0 * s.share,
            s.calls,
            if s.stack.truncated {
                ", stack may be truncated"
            } else {
                ""
            }
        ));
        for f in s.stack.frames.iter().take(FRAMES_SHOWN) {
            let name = f.function.as_deref().unwrap_or("?");
            let at = match (&f.file, f.line) {
                (Some(file), Some(l)) => format!(" {file}:{l}"),
                (Some(file), None) => format!(" {file}"),
                _ => String::new(),
            };
            let module = f
                .module
                .as_deref()
                .map(|m| format!(" [{}]", m.rsplit('/').next().unwrap_or(m)))
                .unwrap_or_default();
            out.push(format!(
                "  {}{name}{at}{module}",
                if f.inlined { "(inlined) " } else { "" }
            ));
        }
        if s.stack.frames.len() > FRAMES_SHOWN {
            out.push(format!("  … {} more", s.stack.frames.len() - FRAMES_SHOWN));
        }
        if let Some(n) = &s.stack.note {
            out.push(format!("  note: {n}"));
        }
    }
    out.join("\n           ")
}
