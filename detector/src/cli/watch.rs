//! `stormguard watch`: foreground view of connect attempts, failures and
//! verdicts per process × destination, one table (or JSON rows) per
//! interval — plus a row for each parent or cgroup roll-up that is not
//! healthy, since a storm of many short-lived processes is visible only
//! there (each process alone is healthy). Also the loop `record` runs.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use clap::Args;
use serde::Serialize;

use super::EngineArgs;
use crate::{
    detect::{State, Subject, Verdict},
    flows::FlowCounts,
    ingest::{Destination, Proto, service::Service},
    kernel::{self, Sensors},
    pipeline::{OnDemand, Pipeline},
    service::{self, Interval, Options},
};

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// One JSON object per row per interval instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Reporting interval in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    pub interval_ms: u64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Longest the on-demand probes stay attached in one go, in seconds.
    #[arg(long, default_value_t = 60)]
    pub probe_max_secs: u64,
    /// When to attach the on-demand syscall probes.
    #[arg(long, value_enum, default_value_t = OnDemand::Auto)]
    pub on_demand: OnDemand,
    /// Rows shown per table (JSON prints them all).
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub async fn run(args: WatchArgs) -> anyhow::Result<()> {
    let json = args.json;
    let top = args.top;
    let probe_max_secs = args.probe_max_secs;
    service::drive(
        Options {
            config: args.engine.load()?,
            interval_ms: args.interval_ms,
            duration: args.duration,
            on_demand: args.on_demand,
            probe_max_secs: args.probe_max_secs,
            record: None,
            on_ready: None,
        },
        |_, _| Ok(()),
        move |pipe, sensors, iv| {
            if json {
                print_json(pipe, &iv)
            } else {
                print_table(pipe, sensors, &iv, top, probe_max_secs)
            }
        },
    )
    .await
}

/// What a flow or roll-up did in the interval, as both JSON rows carry it.
#[derive(Debug, Serialize)]
struct Traffic {
    proto: Proto,
    destination: String,
    netns: u64,
    attempts: u64,
    attempts_per_s: f64,
    failures: u64,
    failures_per_s: f64,
    established: u64,
    main_error: Option<String>,
    errors: BTreeMap<String, u64>,
    udp_sends: u64,
    exchanges: u64,
}

impl Traffic {
    fn new(dest: &Destination, c: &FlowCounts, secs: f64) -> Self {
        Traffic {
            proto: dest.proto,
            destination: dest.to_string(),
            netns: dest.netns,
            attempts: c.attempts,
            attempts_per_s: c.attempts as f64 / secs,
            failures: c.failures,
            failures_per_s: c.failures as f64 / secs,
            established: c.established,
            main_error: c.main_error(),
            errors: c.errors(),
            udp_sends: c.udp_sends,
            exchanges: c.exchanges,
        }
    }
}

/// One JSON row.
#[derive(Debug, Serialize)]
struct JsonRow<'a> {
    time: f64,
    interval_s: f64,
    /// "flow": one process towards one destination.
    subject: &'static str,
    pid: u32,
    comm: String,
    ppid: Option<u32>,
    cgroup: Option<&'a str>,
    /// Unit, container, pod (see `ingest::service`).
    service: Option<Service>,
    exe: Option<&'a str>,
    cmdline: Option<&'a str>,
    #[serde(flatten)]
    traffic: Traffic,
    syscalls_per_s: Option<f64>,
    suspect: bool,
    verdict: &'static str,
    score: u8,
    persistent_failure: bool,
    explanation: Option<String>,
}

/// A roll-up that is not healthy: the children of one parent, or the
/// processes of one cgroup, towards one destination.
struct RollupView {
    subject: Subject,
    verdict: Verdict,
    /// Its members' counts in this interval (their flow rows, grouped the
    /// way the engine rolls them up).
    counts: FlowCounts,
    /// Most recent member pids (at most 8) and distinct members in the
    /// current run.
    members: Vec<u32>,
    member_count: usize,
    /// The parent's name, or for a cgroup its latest member's.
    comm: String,
    /// The cgroup's path (for a parent, the parent's cgroup), if known.
    cgroup: Option<String>,
    /// The parent's executable and command line.
    exe: Option<String>,
    cmdline: Option<String>,
}

impl RollupView {
    fn kind(&self) -> &'static str {
        match self.subject {
            Subject::Parent { .. } => "parent",
            Subject::Cgroup { .. } => "cgroup",
            Subject::Flow { .. } => "flow",
        }
    }
}

fn add_counts(to: &mut FlowCounts, c: &FlowCounts) {
    to.attempts += c.attempts;
    to.established += c.established;
    to.failures += c.failures;
    for (code, n) in &c.failure_codes {
        *to.failure_codes.entry(*code).or_default() += n;
    }
    to.udp_sends += c.udp_sends;
    to.exchanges += c.exchanges;
}

/// The roll-ups the engine finds not healthy, highest score first.
fn rollups(pipe: &mut Pipeline, iv: &Interval) -> Vec<RollupView> {
    let alerts: Vec<(Subject, Verdict)> = pipe
        .engine
        .alerts()
        .into_iter()
        .filter(|(s, _)| !matches!(s, Subject::Flow { .. }))
        .collect();
    if alerts.is_empty() {
        return Vec::new();
    }
    let wanted: HashSet<Subject> = alerts.iter().map(|(s, _)| *s).collect();
    let mut counts: HashMap<Subject, FlowCounts> = HashMap::new();
    for row in &iv.rows {
        let (pid, dest) = (row.key.pid, row.key.dest);
        let parent = pipe
            .engine
            .groups()
            .parent(pid)
            .map(|ppid| Subject::Parent { ppid, dest });
        let cgroup = pipe
            .engine
            .groups()
            .cgroup(pid)
            .map(|cgroup| Subject::Cgroup { cgroup, dest });
        for s in [parent, cgroup].into_iter().flatten() {
            if wanted.contains(&s) {
                add_counts(counts.entry(s).or_default(), &row.counts);
            }
        }
    }
    alerts
        .into_iter()
        .map(|(subject, verdict)| {
            let stats = pipe.engine.subject_stats(&subject);
            let latest = stats
                .as_ref()
                .map(|s| s.comm.to_string())
                .unwrap_or_default();
            let members = stats
                .as_ref()
                .map(|s| s.members.clone())
                .unwrap_or_default();
            let member_count = stats
                .as_ref()
                .map_or(0, |s| s.member_count)
                .max(members.len());
            let (comm, cgroup, exe, cmdline) = match subject {
                Subject::Parent { ppid, .. } => {
                    let info = pipe.procs.describe(ppid);
                    let comm = Some(info.comm.to_string())
                        .filter(|c| !c.is_empty())
                        .unwrap_or(latest);
                    (comm, info.cgroup, info.exe, info.cmdline)
                }
                _ => {
                    let path = members.iter().find_map(|m| pipe.procs.describe(*m).cgroup);
                    (latest, path, None, None)
                }
            };
            RollupView {
                counts: counts.remove(&subject).unwrap_or_default(),
                subject,
                verdict,
                members,
                member_count,
                comm,
                cgroup,
                exe,
                cmdline,
            }
        })
        .collect()
}

/// One JSON row of a roll-up. Flow rows' fields where they apply; `pid`
/// is absent (many processes), `ppid` or `cgroup_id` says which group.
#[derive(Debug, Serialize)]
struct RollupJsonRow<'a> {
    time: f64,
    interval_s: f64,
    /// "parent" or "cgroup".
    subject: &'static str,
    ppid: Option<u32>,
    comm: &'a str,
    cgroup_id: Option<u64>,
    cgroup: Option<&'a str>,
    service: Option<Service>,
    exe: Option<&'a str>,
    cmdline: Option<&'a str>,
    #[serde(flatten)]
    traffic: Traffic,
    verdict: &'static str,
    score: u8,
    persistent_failure: bool,
    explanation: Option<&'a str>,
    members: &'a [u32],
    member_count: usize,
}

fn print_json(pipe: &mut Pipeline, iv: &Interval) -> anyhow::Result<()> {
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let mut out = std::io::stdout().lock();
    for row in &iv.rows {
        let info = pipe.procs.describe(row.key.pid);
        let verdict = pipe.engine.verdict(row.key.pid, &row.key.dest);
        let state = verdict.as_ref().map(|v| v.state).unwrap_or(State::Healthy);
        let c = &row.counts;
        let json = JsonRow {
            time,
            interval_s: iv.secs,
            subject: "flow",
            pid: row.key.pid,
            comm: row.comm.to_string(),
            ppid: info.ppid,
            cgroup: info.cgroup.as_deref(),
            service: info.cgroup.as_deref().map(|c| pipe.procs.service_in(c)),
            exe: info.exe.as_deref(),
            cmdline: info.cmdline.as_deref(),
            traffic: Traffic::new(&row.key.dest, c, iv.secs),
            syscalls_per_s: pipe.engine.syscall_rate(row.key.pid),
            suspect: pipe.plan.suspects.contains(&row.key.pid),
            verdict: state.as_str(),
            score: verdict.as_ref().map(|v| v.score).unwrap_or(0),
            persistent_failure: verdict.as_ref().is_some_and(|v| v.persistent_failure),
            explanation: verdict
                .filter(|v| v.state != State::Healthy || v.persistent_failure)
                .map(|v| v.explanation),
        };
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
    }
    for r in rollups(pipe, iv) {
        let dest = r.subject.dest();
        let c = &r.counts;
        let json = RollupJsonRow {
            time,
            interval_s: iv.secs,
            subject: r.kind(),
            ppid: match r.subject {
                Subject::Parent { ppid, .. } => Some(ppid),
                _ => None,
            },
            comm: &r.comm,
            cgroup_id: match r.subject {
                Subject::Cgroup { cgroup, .. } => Some(cgroup),
                _ => None,
            },
            cgroup: r.cgroup.as_deref(),
            service: r.cgroup.as_deref().map(|c| pipe.procs.service_in(c)),
            exe: r.exe.as_deref(),
            cmdline: r.cmdline.as_deref(),
            traffic: Traffic::new(&dest, c, iv.secs),
            verdict: r.verdict.state.as_str(),
            score: r.verdict.score,
            persistent_failure: r.verdict.persistent_failure,
            explanation: Some(r.verdict.explanation.as_str()),
            members: &r.members,
            member_count: r.member_count,
        };
        serde_json::to_writer(&mut out, &json)?;
        writeln!(out)?;
    }
    out.flush()?;
    Ok(())
}

fn print_table(
    pipe: &mut Pipeline,
    sensors: &Sensors,
    iv: &Interval,
    top: usize,
    probe_max_secs: u64,
) -> anyhow::Result<()> {
    let stats = sensors.stats()?;
    let probes = if sensors.on_demand_attached() {
        let since = pipe.plan.attached_since_ns.unwrap_or(0);
        format!(
            "attached {}s/{}s for pids {:?}",
            kernel::monotonic_ns().saturating_sub(since) / 1_000_000_000,
            probe_max_secs,
            pipe.plan.suspects
        )
    } else if pipe.plan.cooling_down_until_ns.is_some() {
        "off (attach cap reached, cooling down)".to_string()
    } else {
        "off".to_string()
    };
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\n{} flows ({} tracked) | on-demand probes: {} | ring drops {} | untracked {} | bad records {}",
        iv.rows.len(),
        pipe.engine.flow_count(),
        probes,
        stats.ring_drops,
        stats.map_full,
        pipe.decode_errors
    )?;
    writeln!(
        out,
        "{:>7} {:<15} {:<20} {:<4} {:<24} {:>9} {:>9} {:<18} {:>9} {:<10}",
        "PID",
        "COMM",
        "SERVICE",
        "PROTO",
        "DESTINATION",
        "ATTEMPT/s",
        "FAIL/s",
        "ERROR",
        "SYSCALL/s",
        "VERDICT"
    )?;
    for row in iv.rows.iter().take(top) {
        let info = pipe.procs.describe(row.key.pid);
        let c = &row.counts;
        let proto = match row.key.dest.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        let verdict = pipe
            .engine
            .verdict(row.key.pid, &row.key.dest)
            .map(|v| v.state.as_str())
            .unwrap_or("healthy");
        writeln!(
            out,
            "{:>7} {:<15} {:<20} {:<4} {:<24} {:>9.1} {:>9.1} {:<18} {:>9} {:<10}",
            row.key.pid,
            row.comm.to_string(),
            super::keep_end(
                &info
                    .cgroup
                    .as_deref()
                    .map_or_else(|| "-".to_string(), |c| pipe.procs.service_in(c).name),
                20
            ),
            proto,
            row.key.dest.to_string(),
            c.attempts as f64 / iv.secs,
            c.failures as f64 / iv.secs,
            c.main_error().as_deref().unwrap_or("-"),
            pipe.engine
                .syscall_rate(row.key.pid)
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
            verdict,
        )?;
    }
    if iv.rows.len() > top {
        writeln!(out, "… {} more (use --top or --json)", iv.rows.len() - top)?;
    }
    let groups = rollups(pipe, iv);
    if !groups.is_empty() {
        // WHO spans PID, COMM and SERVICE above, so the columns line up.
        writeln!(
            out,
            "{:>7} {:<36} {:<4} {:<24} {:>9} {:>9} {:<18} {:>9} {:<10} MEMBERS",
            "ROLL-UP",
            "PARENT / CGROUP",
            "PROTO",
            "DESTINATION",
            "ATTEMPT/s",
            "FAIL/s",
            "ERROR",
            "PROCS",
            "VERDICT"
        )?;
        for r in groups.iter().take(top) {
            let who = match r.subject {
                Subject::Parent { ppid, .. } => format!("{ppid} {}", r.comm),
                Subject::Cgroup { cgroup, .. } => r
                    .cgroup
                    .clone()
                    .unwrap_or_else(|| format!("cgroup id {cgroup}")),
                Subject::Flow { pid, .. } => pid.to_string(),
            };
            let dest = r.subject.dest();
            let c = &r.counts;
            let mut members: Vec<String> = r.members.iter().map(u32::to_string).collect();
            if r.member_count > r.members.len() {
                members.push("…".into());
            }
            writeln!(
                out,
                "{:>7} {:<36} {:<4} {:<24} {:>9.1} {:>9.1} {:<18} {:>9} {:<10} {}",
                r.kind(),
                super::keep_end(&who, 36),
                match dest.proto {
                    Proto::Tcp => "tcp",
                    Proto::Udp => "udp",
                },
                dest.to_string(),
                c.attempts as f64 / iv.secs,
                c.failures as f64 / iv.secs,
                c.main_error().as_deref().unwrap_or("-"),
                r.member_count,
                r.verdict.state.as_str(),
                members.join(" "),
            )?;
        }
    }
    for (_, v) in pipe.engine.alerts().iter().take(top) {
        writeln!(
            out,
            "  {:<10} {:>3}  {}",
            v.state.as_str().to_uppercase(),
            v.score,
            v.explanation
        )?;
    }
    out.flush()?;
    Ok(())
}
