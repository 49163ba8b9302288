//! `stormguard doctor`: can stormguard work on this host, and what does it
//! see here? Checks the environment (capabilities, tracefs, cgroup v2, BTF,
//! kernel), loads and attaches the programs, lists every signal with what
//! a gap costs, then makes known traffic in a network namespace of its own
//! and checks the exact counts the sensors saw of it (see [`selftest`]).
//!
//! One line per check: `ok`, `WARN` (works, with a cost), `FAIL` (with its
//! fix) or `skip`. Exit status: 0 when everything required works (warnings
//! allowed); 2 when the environment stops stormguard — missing
//! capabilities, tracefs or cgroup v2 not mounted, a kernel that cannot
//! show connects, no network namespace for the self-test — the status
//! `watch` and `daemon` exit with for the same problems; 1 when the
//! programs loaded but the self-test miscounted a signal this kernel has,
//! or could not run its traffic.
mod selftest;

use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use clap::Args;
use serde::Serialize;

use crate::kernel::{
    self, KernelError, Sensors, Signal,
    caps::{self, Capability},
    coverage::{self, name},
    tracefs,
};
pub use selftest::{Count, REFUSED_V4, REFUSED_V6, SelfTest, UDP_SENDS};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Print one JSON object (checks, signals, self-test counts, verdict).
    #[arg(long)]
    pub json: bool,
}

/// Exit status for problems of the environment (as `watch` and `daemon`).
pub const EXIT_ENVIRONMENT: u8 = 2;
/// Exit status for a self-test that miscounted or could not run.
pub const EXIT_SELFTEST: u8 = 1;

/// Returned when a required check failed; carries the exit status.
#[derive(Debug, thiserror::Error)]
#[error("doctor: {failed} required check(s) failed")]
pub struct Failed {
    pub failed: usize,
    pub exit_code: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
    Skip,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
            Status::Skip => "skip",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
struct Check {
    section: &'static str,
    name: String,
    status: Status,
    detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
    /// What detection loses (warnings).
    #[serde(skip_serializing_if = "Option::is_none")]
    costs: Option<String>,
    /// Exit status a failure calls for.
    #[serde(skip)]
    exit: u8,
}

impl Check {
    fn new(section: &'static str, name: impl Into<String>, status: Status, detail: String) -> Self {
        Check {
            section,
            name: name.into(),
            status,
            detail,
            fix: None,
            costs: None,
            exit: 0,
        }
    }

    fn fail(mut self, exit: u8, fix: impl Into<String>) -> Self {
        self.status = Status::Fail;
        self.exit = exit;
        self.fix = Some(fix.into());
        self
    }

    fn costs(mut self, costs: &str) -> Self {
        self.costs = Some(costs.to_string());
        self
    }

    /// `ok   name: detail`, `WARN name: detail — costs: …`,
    /// `FAIL name: detail — fix: …`; always one line.
    fn line(&self) -> String {
        let mut s = format!("{:<4} {}: {}", self.status.label(), self.name, self.detail);
        if let Some(c) = &self.costs {
            let _ = write!(s, " — costs: {c}");
        }
        if let Some(f) = &self.fix {
            let _ = write!(s, " — fix: {f}");
        }
        s.replace('\n', " ")
    }
}

/// A signal as the report shows it.
#[derive(Debug, Serialize)]
struct SignalView {
    #[serde(flatten)]
    signal: Signal,
    /// "ok", "stand-in", "partial" or "missing".
    status: &'static str,
}

/// Everything doctor found.
#[derive(Debug, Serialize)]
struct Report {
    version: &'static str,
    kernel: String,
    pid: u32,
    checks: Vec<Check>,
    signals: Vec<SignalView>,
    selftest: Option<SelfTest>,
    /// "ok" or "fail".
    verdict: &'static str,
    exit_code: u8,
}

pub fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let report = examine();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .count();
    if report.exit_code == 0 {
        Ok(())
    } else {
        Err(Failed {
            failed,
            exit_code: report.exit_code,
        }
        .into())
    }
}

/// Runs every check it can.
fn examine() -> Report {
    let mut checks = environment();
    let env_ok = !checks
        .iter()
        .any(|c| c.status == Status::Fail && c.name != "self-test capability");
    let sys_admin = has_sys_admin();
    let mut signals = Vec::new();
    let mut selftest = None;

    let mut sensors = None;
    if env_ok {
        let started = Instant::now();
        match Sensors::load() {
            Ok(s) => {
                checks.push(Check::new(
                    "programs",
                    "programs",
                    Status::Ok,
                    format!(
                        "loaded; {} always-on hooks attached in {} ms",
                        s.always_on().len(),
                        started.elapsed().as_millis()
                    ),
                ));
                sensors = Some(s);
            }
            Err(e) => checks.push(load_failure(&e)),
        }
    } else {
        checks.push(Check::new(
            "programs",
            "programs",
            Status::Skip,
            "not loaded: fix the problems above first".into(),
        ));
    }

    if let Some(s) = sensors.as_mut() {
        for sig in s.signals() {
            checks.push(signal_check(sig));
            signals.push(SignalView {
                status: signal_status(sig),
                signal: sig.clone(),
            });
        }
        checks.push(on_demand_check(s));
    } else {
        checks.push(Check::new(
            "signals",
            "signals",
            Status::Skip,
            "not checked: they are known once the programs load".into(),
        ));
    }

    match sensors.as_mut() {
        None => checks.push(Check::new(
            "selftest",
            "self-test",
            Status::Skip,
            "not run: it needs the programs loaded".into(),
        )),
        Some(_) if !sys_admin => checks.push(Check::new(
            "selftest",
            "self-test",
            Status::Skip,
            "not run: it needs CAP_SYS_ADMIN for its network namespace (see above)".into(),
        )),
        Some(s) => match s.take_events() {
            Err(e) => checks.push(
                Check::new(
                    "selftest",
                    "self-test",
                    Status::Fail,
                    format!("no ring buffer: {}", chain(&e)),
                )
                .fail(EXIT_SELFTEST, REPORT_IT),
            ),
            Ok(mut ring) => {
                let signals = s.signals().to_vec();
                match selftest::run(s, &mut ring, &signals) {
                    Ok(st) => {
                        checks.extend(selftest_checks(&st));
                        selftest = Some(st);
                    }
                    Err(selftest::SelfTestError::Namespace(e)) => checks.push(
                        Check::new(
                            "selftest",
                            "self-test",
                            Status::Fail,
                            format!("cannot create a network namespace: {e}"),
                        )
                        .fail(
                            EXIT_ENVIRONMENT,
                            "run doctor as root; in a container, allow unshare(CLONE_NEWNET) (CAP_SYS_ADMIN, no seccomp filter on unshare)",
                        ),
                    ),
                    Err(selftest::SelfTestError::Run(why)) => checks.push(
                        Check::new("selftest", "self-test", Status::Fail, why)
                            .fail(EXIT_SELFTEST, REPORT_IT),
                    ),
                }
            }
        },
    }
    // Detach everything before printing.
    drop(sensors);

    let exit_code = checks
        .iter()
        .filter(|c| c.status == Status::Fail)
        .map(|c| c.exit)
        .max()
        .unwrap_or(0);
    Report {
        version: env!("CARGO_PKG_VERSION"),
        kernel: coverage::kernel_release(),
        pid: std::process::id(),
        checks,
        signals,
        selftest,
        verdict: if exit_code == 0 { "ok" } else { "fail" },
        exit_code,
    }
}

const REPORT_IT: &str =
    "not a setup problem: report it with the output of `stormguard doctor --json`";

/// Kernel, capabilities, tracefs, cgroup v2, BTF: what can be checked
/// without loading anything (and without privileges).
fn environment() -> Vec<Check> {
    const S: &str = "environment";
    let mut out = Vec::new();
    let release = coverage::kernel_release();
    out.push(match kernel_version(&release) {
        Some(v) if v < (5, 15) => Check::new(
            S,
            "kernel",
            Status::Warn,
            format!("{release} is older than 5.15, the oldest supported"),
        )
        .costs("programs may not load; tested on 6.1, 6.12 and 6.18"),
        _ => Check::new(S, "kernel", Status::Ok, release),
    });

    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mask = caps::effective(&status).unwrap_or(0);
    let missing = caps::missing(mask);
    let sys_admin = mask & (1u64 << caps::CAP_SYS_ADMIN) != 0;
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "$(which stormguard)".into());
    out.push(if !missing.is_empty() {
        let mut detail = format!("missing {}", fmt_caps(&missing));
        if !sys_admin {
            detail += "; and CAP_SYS_ADMIN for doctor's self-test (a network namespace)";
        }
        Check::new(S, "capabilities", Status::Fail, detail).fail(
            EXIT_ENVIRONMENT,
            format!(
                "run as root (sudo stormguard doctor), or grant them: setcap cap_bpf,cap_perfmon,cap_net_admin+ep {exe}"
            ),
        )
    } else {
        let names: Vec<&str> = caps::REQUIRED.iter().map(|c| c.name).collect();
        Check::new(
            S,
            "capabilities",
            Status::Ok,
            if sys_admin {
                format!("{} (CAP_SYS_ADMIN)", names.join(", "))
            } else {
                names.join(", ")
            },
        )
    });
    if missing.is_empty() && !sys_admin {
        out.push(
            Check::new(
                S,
                "self-test capability",
                Status::Fail,
                "missing CAP_SYS_ADMIN: the self-test creates a network namespace (the daemon does not need it)".into(),
            )
            .fail(EXIT_ENVIRONMENT, "run doctor as root: sudo stormguard doctor"),
        );
    }

    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    out.push(match tracefs::find_mount(&mounts) {
        Some(p) => Check::new(
            S,
            "tracefs",
            Status::Ok,
            format!("mounted at {}", p.display()),
        ),
        None => Check::new(S, "tracefs", Status::Fail, "not mounted".into()).fail(
            EXIT_ENVIRONMENT,
            "mount -t tracefs tracefs /sys/kernel/tracing",
        ),
    });
    out.push(match kernel::find_cgroup2(&mounts) {
        Some(p) => Check::new(
            S,
            "cgroup2",
            Status::Ok,
            format!("mounted at {}", p.display()),
        ),
        None => Check::new(S, "cgroup2", Status::Fail, "not mounted".into())
            .fail(EXIT_ENVIRONMENT, "mount -t cgroup2 none /sys/fs/cgroup"),
    });
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    out.push(if btf.exists() {
        Check::new(S, "btf", Status::Ok, format!("{}", btf.display()))
    } else {
        Check::new(S, "btf", Status::Warn, format!("no {}", btf.display())).costs(
            "before Linux 6.3 the stand-ins for the send/receive tracepoints (fexit) cannot load; a kernel with CONFIG_DEBUG_INFO_BTF=y has it",
        )
    });
    out
}

fn fmt_caps(caps: &[Capability]) -> String {
    caps.iter()
        .map(|c| format!("{} (to {})", c.name, c.why))
        .collect::<Vec<_>>()
        .join(", ")
}

fn has_sys_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    caps::effective(&status).is_some_and(|m| m & (1u64 << caps::CAP_SYS_ADMIN) != 0)
}

/// (major, minor) of a release string such as "6.18.44-foo".
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// An error with its causes, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let _ = write!(s, ": {c}");
        cause = c.source();
    }
    s
}

/// Why the programs did not load, and what to do.
fn load_failure(e: &KernelError) -> Check {
    let check = |detail: String| Check::new("programs", "programs", Status::Fail, detail);
    match e {
        KernelError::MissingCapabilities(caps) => {
            check(format!("missing {}", fmt_caps(caps))).fail(
                EXIT_ENVIRONMENT,
                "run as root, or grant them: setcap cap_bpf,cap_perfmon,cap_net_admin+ep $(which stormguard)",
            )
        }
        KernelError::TracefsNotMounted => check("tracefs is not mounted".into()).fail(
            EXIT_ENVIRONMENT,
            "mount -t tracefs tracefs /sys/kernel/tracing",
        ),
        KernelError::NoCgroup2 => check("no cgroup2 filesystem is mounted".into())
            .fail(EXIT_ENVIRONMENT, "mount -t cgroup2 none /sys/fs/cgroup"),
        KernelError::Required { kernel, why } => {
            check(format!("kernel {kernel} cannot show connect attempts: {why}")).fail(
                EXIT_ENVIRONMENT,
                "use a kernel with the tracepoint sock:inet_sock_set_state and cgroup v2 connect hooks (Linux 5.15+; tested on 6.1, 6.12 and 6.18)",
            )
        }
        KernelError::MissingTracepoint(_)
        | KernelError::MissingField { .. }
        | KernelError::FieldSize { .. } => check(chain(e)).fail(
            EXIT_ENVIRONMENT,
            "this kernel lacks what the programs read: use a tested kernel (6.1, 6.12, 6.18), or report it with the output of `stormguard doctor --json`",
        ),
        _ => check(chain(e)).fail(
            EXIT_ENVIRONMENT,
            "the kernel refused the programs: report it with the output of `stormguard doctor --json` and `dmesg | tail`",
        ),
    }
}

fn signal_status(s: &Signal) -> &'static str {
    if !s.available() {
        "missing"
    } else if s.degraded() {
        "partial"
    } else if s.fallback.is_some() {
        "stand-in"
    } else {
        "ok"
    }
}

/// `ok` through the first choice or a stand-in; `WARN` with its cost when
/// partial or missing (`FAIL` if it is required).
fn signal_check(s: &Signal) -> Check {
    let mut label = s.name.to_string();
    if s.required {
        label += " (required)";
    }
    if s.on_demand {
        label += " (on demand)";
    }
    let via = s.via.join(", ");
    match signal_status(s) {
        "ok" => Check::new("signals", label, Status::Ok, format!("via {via}")),
        "stand-in" => Check::new(
            "signals",
            label,
            Status::Ok,
            format!(
                "via stand-in {via} ({})",
                s.fallback.as_deref().unwrap_or("")
            ),
        ),
        "partial" => Check::new(
            "signals",
            label,
            Status::Warn,
            format!("partial: via {via}; failed: {}", s.problems.join("; ")),
        )
        .costs(s.without),
        _ => {
            let c = Check::new(
                "signals",
                label,
                if s.required {
                    Status::Fail
                } else {
                    Status::Warn
                },
                format!("MISSING ({})", s.problems.join("; ")),
            )
            .costs(s.without);
            if s.required {
                c.fail(
                    EXIT_ENVIRONMENT,
                    "use a kernel with the tracepoint sock:inet_sock_set_state and cgroup v2 connect hooks",
                )
            } else {
                c
            }
        }
    }
}

/// Attaches the on-demand probes once and detaches them, when this kernel
/// loaded them: proof that they can attach when a process is suspect.
fn on_demand_check(s: &mut Sensors) -> Check {
    let loaded = s
        .signals()
        .iter()
        .any(|g| g.name == name::SYSCALL_PROBES && g.available());
    let check = |status, detail| Check::new("signals", "on-demand attach", status, detail);
    if !loaded {
        return check(
            Status::Skip,
            "not tried: the on-demand probes did not load (see syscall_probes)".into(),
        );
    }
    let tls_loaded = s
        .signals()
        .iter()
        .any(|g| g.name == name::TLS_PLAINTEXT && g.available());
    let attached = s.attach_on_demand();
    let tls = s.tls_attached();
    let detached = s.detach_on_demand();
    let hooks = Sensors::on_demand_hooks().join(", ");
    match attached.and(detached) {
        Ok(()) if tls_loaded && !tls => check(
            Status::Warn,
            format!(
                "{hooks} attached and detached, but not the libssl uprobes (the warnings on stderr say why)"
            ),
        )
        .costs(coverage::without::TLS_PLAINTEXT),
        Ok(()) => check(
            Status::Ok,
            format!(
                "{hooks} attached and detached{}",
                if tls { ", with the libssl uprobes" } else { "" }
            ),
        ),
        Err(e) => check(Status::Warn, chain(&e)).costs(coverage::without::SYSCALL_PROBES),
    }
}

/// One line per count, plus what could make counts short.
fn selftest_checks(st: &SelfTest) -> Vec<Check> {
    const S: &str = "selftest";
    let mut out = Vec::new();
    let fix = if st.ring_drops > 0 {
        format!(
            "the ring buffer dropped {} records meanwhile (a busy host): run doctor again",
            st.ring_drops
        )
    } else {
        REPORT_IT.to_string()
    };
    for c in &st.counts {
        out.push(match c.status {
            "ok" => Check::new(
                S,
                c.what.clone(),
                Status::Ok,
                format!("saw {} of {}", c.seen, c.expected),
            ),
            "skipped" => Check::new(
                S,
                c.what.clone(),
                Status::Skip,
                format!("skipped: {}", c.note.as_deref().unwrap_or("")),
            ),
            _ => Check::new(
                S,
                c.what.clone(),
                Status::Fail,
                format!("saw {} of {}", c.seen, c.expected),
            )
            .fail(EXIT_SELFTEST, fix.clone()),
        });
    }
    if let Some(why) = &st.ipv6_skipped {
        out.push(Check::new(
            S,
            "TCP connects to [::1]",
            Status::Skip,
            format!("skipped: {why}"),
        ));
    }
    if st.ring_drops > 0 {
        out.push(
            Check::new(
                S,
                "ring buffer",
                Status::Warn,
                format!("{} records dropped during the self-test", st.ring_drops),
            )
            .costs("counts may be short"),
        );
    }
    if st.bad_records > 0 {
        out.push(
            Check::new(
                S,
                "records",
                Status::Warn,
                format!("{} records could not be decoded", st.bad_records),
            )
            .costs("those records are lost to detection"),
        );
    }
    out
}

/// The human report.
fn text(r: &Report) -> String {
    let mut s = format!(
        "stormguard {} doctor — kernel {}, pid {}\n",
        r.version, r.kernel, r.pid
    );
    let mut section = "";
    for c in &r.checks {
        if c.section != section {
            section = c.section;
            let title = match section {
                "environment" => "environment".to_string(),
                "programs" => "programs".to_string(),
                "signals" => "signals (what this kernel lets stormguard see)".to_string(),
                "selftest" => match &r.selftest {
                    Some(st) => format!(
                        "self-test (pid {}, in its own network namespace{})",
                        st.pid,
                        st.netns_cookie
                            .map(|c| format!(", cookie {c}"))
                            .unwrap_or_default()
                    ),
                    None => "self-test".to_string(),
                },
                other => other.to_string(),
            };
            let _ = writeln!(s, "\n{title}");
        }
        let _ = writeln!(s, "{}", c.line());
    }
    if let Some(st) = &r.selftest {
        let n = |status: &str| st.counts.iter().filter(|c| c.status == status).count();
        let _ = writeln!(
            s,
            "self-test took {:.2} s (traffic {} ms): {} counts exact, {} wrong, {} skipped",
            Duration::from_millis(st.elapsed_ms).as_secs_f64(),
            st.traffic_ms,
            n("ok"),
            n("fail"),
            n("skipped")
        );
    }
    let count = |status: Status| r.checks.iter().filter(|c| c.status == status).count();
    let _ = if r.exit_code == 0 {
        writeln!(
            s,
            "\nverdict: ok — everything required works ({} warning(s))",
            count(Status::Warn)
        )
    } else {
        writeln!(
            s,
            "\nverdict: FAIL — {} problem(s), each with its fix above (exit {})",
            count(Status::Fail),
            r.exit_code
        )
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_check_with_its_fix() {
        let c = Check::new(
            "environment",
            "tracefs",
            Status::Fail,
            "not\nmounted".into(),
        )
        .fail(EXIT_ENVIRONMENT, "mount it");
        assert_eq!(c.line(), "FAIL tracefs: not mounted — fix: mount it");
        let ok = Check::new(
            "environment",
            "btf",
            Status::Ok,
            "/sys/kernel/btf/vmlinux".into(),
        );
        assert_eq!(ok.line(), "ok   btf: /sys/kernel/btf/vmlinux");
    }

    #[test]
    fn signals_are_ok_stand_in_partial_or_missing() {
        let mut s = Signal::new(name::SENDS, coverage::without::SENDS);
        s.problems
            .push("tracepoint sock:sock_send_length: absent".into());
        let c = signal_check(&s);
        assert_eq!(c.status, Status::Warn);
        assert!(c.line().contains("MISSING") && c.line().contains("only connect storms"));
        s.problems.clear();
        s.via.push("fexit tcp_sendmsg".into());
        s.fallback = Some("no sock_send_length (Linux < 6.3)".into());
        assert_eq!(signal_status(&s), "stand-in");
        assert_eq!(signal_check(&s).status, Status::Ok);
        s.required = true;
        s.via.clear();
        s.problems.push("x".into());
        assert_eq!(signal_check(&s).exit, EXIT_ENVIRONMENT);
    }

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v857"), Some((6, 18)));
        assert_eq!(kernel_version("5.4"), Some((5, 4)));
        assert_eq!(kernel_version("(unknown)"), None);
    }
}
