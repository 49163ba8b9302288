//! `cargo xtask vmtest [--kernel NAME]`: the kernel-facing tests on Debian's
//! own kernel builds (6.1, Debian 12's; 6.12 LTS), booted under qemu (TCG;
//! KVM only when a probe boot shows it works). The host kernel runs the
//! whole suite natively (`cargo xtask test`); here each kernel gets the
//! exact-count sensor tests, the scenarios, a daemon start/query/stop and
//! `stormguard doctor`.
//!
//! Nothing is shared with the guest at run time (the cloud kernels have no
//! 9p): everything is in the initramfs — a cached Debian rootfs, the
//! kernel's modules, and the binaries under test at the same absolute paths
//! as on the host (the tests find their binaries by path).
//!
//! The kernels boot side by side when the host has a core for each (under
//! TCG a guest runs on one host thread); each guest runs its steps one
//! after another with `--test-threads=1`, time bounds stretched by one
//! factor (`STORMGUARD_TIME_SCALE`, see [`TCG_TIME_SCALE`]).
//!
//! Cache: `~/.cache/stormguard/vmtest/` (debs by file name, unpacked
//! kernels, the rootfs archive; the first run needs root and network).
//! Output: `target/vmtest/<kernel>/` (console.log, results.txt, doctor.txt,
//! init.sh, initrd.img).
mod guest;
mod initrd;
mod kernels;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{setup::Env, tasks::ensure_packages};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// KVM if /dev/kvm works (a probe boot, remembered), else TCG.
    Auto,
    Tcg,
    Kvm,
}

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Kernel to boot: 6.1 or 6.12 (repeat for both; default: all).
    #[arg(long = "kernel", value_name = "NAME")]
    pub kernels: Vec<String>,
    /// Factor for the tests' time bounds in the guest
    /// (STORMGUARD_TIME_SCALE); default 25 under TCG, 2 under KVM.
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// How qemu runs the guest.
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Wall-clock limit for one kernel's boot and run, in minutes; qemu is
    /// killed when it passes.
    #[arg(long, default_value_t = 20)]
    pub timeout_mins: u64,
    /// Run only these test binaries (sensors, kernel_bounds, scenarios,
    /// daemon, enforce; repeat); default: all.
    #[arg(long = "only", value_name = "BINARY")]
    pub only: Vec<String>,
}

impl Default for Args {
    fn default() -> Self {
        Args {
            kernels: Vec::new(),
            time_scale: None,
            accel: Accel::Auto,
            timeout_mins: 20,
            only: Vec::new(),
        }
    }
}

/// Scenarios left out of the guest. Each runs for minutes under TCG and
/// tests the engine's verdict over time, not anything kernel-specific:
/// the host's run covers it.
const SKIPPED_SCENARIOS: [&str; 1] = [
    // Four 30-second storms in a row (2+ minutes natively).
    "a_30_second_storm_of_each_shape_holds_its_verdict",
];

/// The daemon's test in the guest: start, a storm, query, restart, explain.
const DAEMON_TESTS: [&str; 1] =
    ["a_storm_becomes_an_incident_that_survives_a_restart_and_explains"];

/// How much slower than the host the guest runs the tests. Measured under
/// single-threaded TCG with 2 vCPUs on a 2-core host, two guests side by
/// side (alone, the higher figures): loopback connects with a request each
/// at 97-195/s against the host's 2,000/s; keep-alive requests at
/// 510-1,100/s against 10,000/s; a process per attempt (120 of them) a
/// storm after 24-31 s against the host's 2 s. 25 leaves a margin over the
/// worst of these.
const TCG_TIME_SCALE: f64 = 25.0;
const KVM_TIME_SCALE: f64 = 2.0;

/// The cache directory ($XDG_CACHE_HOME or ~/.cache)/stormguard/vmtest.
fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("stormguard/vmtest")
}

/// The binaries under test, as cargo built them.
struct Built {
    stormguard: PathBuf,
    stormclient: PathBuf,
    tests: Vec<(&'static str, PathBuf)>,
}

/// Runs cargo with JSON messages; returns its compiler-artifact messages.
fn cargo_artifacts(env: &Env, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut c = env.cargo();
    c.args(args)
        .arg("--message-format=json-render-diagnostics")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!("xtask: cargo {}", args.join(" "));
    let out = c.output().context("running cargo")?;
    if !out.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["executable"].is_string())
        .collect())
}

fn build(env: &Env) -> anyhow::Result<Built> {
    let exe = |v: &serde_json::Value| PathBuf::from(v["executable"].as_str().unwrap_or_default());
    let kind_is = |v: &serde_json::Value, k: &str| {
        v["target"]["kind"]
            .as_array()
            .is_some_and(|ks| ks.iter().any(|x| x == k))
    };
    let sg = cargo_artifacts(env, &["build", "-p", "detector", "--bin", "stormguard"])?;
    let stormguard = sg
        .iter()
        .find(|v| v["target"]["name"] == "stormguard")
        .map(exe)
        .context("cargo built no stormguard binary")?;
    let names = ["sensors", "kernel_bounds", "scenarios", "daemon", "enforce"];
    let mut args = vec!["test", "-p", "stormguard-tests", "--no-run"];
    for n in names {
        args.extend(["--test", n]);
    }
    let arts = cargo_artifacts(env, &args)?;
    let stormclient = arts
        .iter()
        .find(|v| v["target"]["name"] == "stormclient" && kind_is(v, "bin"))
        .map(exe)
        .context("cargo built no stormclient binary")?;
    let mut tests = Vec::new();
    for n in names {
        let bin = arts
            .iter()
            .find(|v| v["target"]["name"] == n && kind_is(v, "test"))
            .map(exe)
            .with_context(|| format!("cargo built no test binary {n}"))?;
        tests.push((n, bin));
    }
    Ok(Built {
        stormguard,
        stormclient,
        tests,
    })
}

/// The tests a binary has (`--list`, run on the host: lists, runs nothing).
fn list_tests(bin: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(bin)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("running {} --list", bin.display()))?;
    if !out.status.success() {
        bail!("{} --list failed", bin.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

fn plan_steps(built: &Built) -> anyhow::Result<Vec<guest::Step>> {
    let mut steps = Vec::new();
    for (name, bin) in &built.tests {
        let all = list_tests(bin)?;
        let tests: Vec<String> = match *name {
            "scenarios" => {
                for s in SKIPPED_SCENARIOS {
                    if !all.iter().any(|t| t == s) {
                        bail!("SKIPPED_SCENARIOS names {s}, which scenarios does not have");
                    }
                }
                all.into_iter()
                    .filter(|t| !SKIPPED_SCENARIOS.contains(&t.as_str()))
                    .collect()
            }
            "daemon" => {
                for t in DAEMON_TESTS {
                    if !all.iter().any(|a| a == t) {
                        bail!("DAEMON_TESTS names {t}, which the daemon tests do not have");
                    }
                }
                DAEMON_TESTS.iter().map(|t| t.to_string()).collect()
            }
            _ => all,
        };
        if tests.is_empty() {
            bail!("{} has no tests to run", bin.display());
        }
        steps.push(guest::Step {
            name,
            bin: bin.clone(),
            tests,
        });
    }
    Ok(steps)
}

/// Whether KVM really works here: a kernel boot to its first panic (no
/// root) within a minute. Remembered per host kernel and qemu version.
fn kvm_works(cache: &Path, vmlinuz: &Path) -> bool {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return false;
    }
    let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let key = format!(
        "kvm-probe-{}",
        qemu.lines()
            .next()
            .unwrap_or("")
            .chars()
            .chain(host.trim().chars())
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
    );
    let memo = cache.join(key);
    if let Ok(v) = fs::read_to_string(&memo) {
        return v.trim() == "yes";
    }
    println!("vmtest: probing KVM (a kernel boot with -accel kvm, at most 60 s; remembered)");
    let mut child = match Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-no-reboot", "-accel", "kvm", "-cpu", "host", "-m", "256"])
        .arg("-kernel")
        .arg(vmlinuz)
        .args(["-append", "console=ttyS0 panic=-1", "-serial", "stdio"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(_) => return false,
    };
    let stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stdout), &mut s);
        s
    });
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    let works = reader.join().unwrap_or_default().contains("Kernel panic");
    println!(
        "vmtest: KVM {}",
        if works {
            "works"
        } else {
            "does not work here; using TCG"
        }
    );
    let _ = fs::write(&memo, if works { "yes\n" } else { "no\n" });
    works
}

/// One kernel's outcome.
struct Outcome {
    name: &'static str,
    line: String,
    ok: bool,
}

fn fmt_duration(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// A kernel ready to boot: its initrd assembled.
struct Prepared<'a> {
    spec: &'a kernels::Spec,
    kernel: kernels::Kernel,
    out: PathBuf,
    initrd: PathBuf,
}

/// Runs vmtest for the kernels `args` selects; fails if any test failed or
/// was skipped, or a kernel could not be fetched or booted.
pub fn run_all(env: &Env, args: &Args) -> anyhow::Result<()> {
    let specs: Vec<&kernels::Spec> = if args.kernels.is_empty() {
        kernels::SPECS.iter().collect()
    } else {
        let mut v = Vec::new();
        for k in &args.kernels {
            let spec = kernels::SPECS
                .iter()
                .find(|s| s.name == k.as_str())
                .with_context(|| {
                    format!(
                        "unknown kernel {k:?}; known: {}",
                        kernels::SPECS
                            .iter()
                            .map(|s| format!("{} ({})", s.name, s.pattern()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            if !v.iter().any(|s: &&kernels::Spec| s.name == spec.name) {
                v.push(spec);
            }
        }
        v
    };
    if let Some(f) = args.time_scale
        && !(f.is_finite() && f >= 1.0)
    {
        bail!("--time-scale must be a number ≥ 1");
    }
    if !crate::setup::is_root() {
        bail!(
            "vmtest installs packages and builds the guest's rootfs with mmdebstrap: run it as root"
        );
    }
    let started = Instant::now();
    ensure_packages(&[("qemu-system-x86_64", "qemu-system-x86")])?;
    let cache = cache_dir();
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;

    // The guest's userland and the binaries: the same for every kernel.
    let rootfs = initrd::rootfs(&cache)?;
    let built = build(env)?;
    let mut steps = plan_steps(&built)?;
    if !args.only.is_empty() {
        for o in &args.only {
            if !steps.iter().any(|s| s.name == o.as_str()) {
                bail!("--only {o}: no such test binary in the guest");
            }
        }
        steps.retain(|s| args.only.iter().any(|o| o == s.name));
    }
    // target/<profile>/stormguard → target
    let target_dir = built
        .stormguard
        .parent()
        .and_then(Path::parent)
        .context("target directory")?
        .to_path_buf();
    let out_root = target_dir.join("vmtest");
    let strip_dir = out_root.join("bin");
    let mut bins = Vec::new();
    for src in [&built.stormguard, &built.stormclient]
        .into_iter()
        .chain(built.tests.iter().map(|(_, b)| b))
    {
        bins.push(initrd::Placed {
            guest: src.clone(),
            host: initrd::stripped(src, &strip_dir)?,
        });
    }

    // The real-client scripts the enforcement tests run (python3 servers
    // and clients), at their host paths like the binaries.
    let corpus = super::bench::workspace_root()?.join("tests/corpus");
    for e in fs::read_dir(&corpus).with_context(|| format!("reading {}", corpus.display()))? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "py") {
            bins.push(initrd::Placed {
                guest: path.clone(),
                host: path,
            });
        }
    }

    // Each kernel: fetched (or found in the cache).
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut fetched = Vec::new();
    for spec in specs {
        match kernels::fetch(&cache, spec) {
            Ok(k) => fetched.push((spec, k)),
            Err(e) => {
                let line = format!("vmtest {}: cannot fetch the kernel: {e:#}", spec.name);
                println!("{line}");
                outcomes.push(Outcome {
                    name: spec.name,
                    line,
                    ok: false,
                });
            }
        }
    }
    let kvm = match (args.accel, fetched.first()) {
        (Accel::Tcg, _) | (_, None) => false,
        (Accel::Kvm, _) => true,
        (Accel::Auto, Some((_, k))) => kvm_works(&cache, &k.vmlinuz),
    };
    let time_scale = args
        .time_scale
        .unwrap_or(if kvm { KVM_TIME_SCALE } else { TCG_TIME_SCALE });
    let plan = guest::Plan {
        steps,
        stormguard: built.stormguard.clone(),
        time_scale,
        ci: std::env::var("CI").ok().filter(|v| !v.is_empty()),
        step_timeout: Duration::from_secs(args.timeout_mins * 60 * 2 / 3),
        target_dir: target_dir.clone(),
    };
    let init = guest::init_script(&plan);
    fs::create_dir_all(&out_root)?;
    let run_cpio = out_root.join("run.cpio");
    initrd::run_archive(&run_cpio, &init, &bins)?;
    let mut prepared = Vec::new();
    for (spec, kernel) in fetched {
        let out = out_root.join(spec.name);
        fs::create_dir_all(&out)?;
        fs::write(out.join("init.sh"), &init)?;
        let initrd_path = out.join("initrd.img");
        let size = initrd::concat(&initrd_path, &[&rootfs, &kernel.modules_cpio, &run_cpio])?;
        println!(
            "vmtest {}: {} {} (uname -r {}), initrd {:.0} MB, {}, time scale {time_scale}",
            spec.name,
            kernel.package,
            kernel.version,
            kernel.release,
            size as f64 / 1e6,
            if kvm { "KVM" } else { "TCG" },
        );
        prepared.push(Prepared {
            spec,
            kernel,
            out,
            initrd: initrd_path,
        });
    }
    let _ = fs::remove_file(&run_cpio);

    // The boots, side by side when the host has a core for each guest
    // (under TCG a guest runs on one host thread; under KVM on two).
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let jobs = (cores / if kvm { 2 } else { 1 }).clamp(1, prepared.len().max(1));
    println!(
        "vmtest: booting {} kernel(s), {jobs} at a time; prepared in {}",
        prepared.len(),
        fmt_duration(started.elapsed())
    );
    let timeout = Duration::from_secs(args.timeout_mins * 60);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let reports: Vec<std::sync::Mutex<Option<anyhow::Result<guest::Report>>>> =
        prepared.iter().map(|_| Default::default()).collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(p) = prepared.get(i) else { break };
                    let r = boot_one(p, kvm, timeout);
                    *reports[i].lock().unwrap() = Some(r);
                }
            });
        }
    });
    for (p, r) in prepared.iter().zip(reports) {
        let outcome = match r.into_inner().unwrap() {
            Some(Ok(report)) => judge(p, &plan, &report, timeout),
            Some(Err(e)) => Outcome {
                name: p.spec.name,
                line: format!("vmtest {}: {e:#}", p.spec.name),
                ok: false,
            },
            None => unreachable!("every prepared kernel is booted"),
        };
        outcomes.push(outcome);
    }

    println!(
        "\nvmtest summary ({} in all):",
        fmt_duration(started.elapsed())
    );
    for o in &outcomes {
        println!("  {} {}", if o.ok { "ok  " } else { "FAIL" }, o.line);
    }
    let failed: Vec<&str> = outcomes.iter().filter(|o| !o.ok).map(|o| o.name).collect();
    if !failed.is_empty() {
        bail!("vmtest failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Boots one prepared kernel and collects what its guest reported.
fn boot_one(p: &Prepared, kvm: bool, timeout: Duration) -> anyhow::Result<guest::Report> {
    let results = p.out.join("results.txt");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    if kvm {
        qemu.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        // One host thread for both vCPUs: with thread=multi the guest
        // kernel oopsed now and then ("Oops: int3" in
        // syscall_exit_to_user_mode_prepare) while tracepoints were
        // attached or detached, i.e. while it live-patched its static keys
        // under a vCPU running them; multi-threaded TCG does not order
        // that cross-modifying code. About 1.5 times slower, never seen to
        // oops.
        qemu.args(["-accel", "tcg,thread=single", "-cpu", "max"]);
    }
    qemu.args(["-smp", "2", "-m", "3072"])
        .arg("-kernel")
        .arg(&p.kernel.vmlinuz)
        .arg("-initrd")
        .arg(&p.initrd)
        // panic=-1: a kernel panic ends qemu (-no-reboot) instead of
        // hanging to the timeout. mitigations=off: page-table isolation and
        // friends cost much under emulation and change nothing tested.
        .args([
            "-append",
            "console=ttyS0 panic=-1 mitigations=off",
            "-serial",
            "stdio",
            "-serial",
        ])
        .arg(format!(
            "file:{}",
            results.to_string_lossy().replace(',', ",,")
        ));
    guest::boot(
        &mut qemu,
        p.spec.name,
        &p.out.join("console.log"),
        &results,
        timeout,
    )
}

/// Turns a boot's report into the kernel's line (and doctor.txt).
fn judge(p: &Prepared, plan: &guest::Plan, report: &guest::Report, timeout: Duration) -> Outcome {
    let (spec, kernel, out) = (p.spec, &p.kernel, p.out.as_path());
    let mut ok = true;
    let mut problems: Vec<String> = Vec::new();
    let mut line = format!(
        "vmtest {}: booted {} {} (uname -r {})",
        spec.name,
        kernel.package,
        kernel.version,
        report.uname.as_deref().unwrap_or("?")
    );
    if report.uname.is_none() {
        ok = false;
        problems.push(format!(
            "the guest never reached /init{}",
            report
                .qemu_error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        ));
    } else if report.uname.as_deref() != Some(kernel.release.as_str()) {
        ok = false;
        problems.push(format!("expected uname -r {}", kernel.release));
    }
    let (mut ran, mut skipped) = (0u64, 0u64);
    let mut parts = Vec::new();
    for step in &plan.steps {
        let expected = step.tests.len() as u64;
        let Some(o) = report.steps.get(step.name) else {
            ok = false;
            skipped += expected;
            parts.push(format!("{} not run", step.name));
            continue;
        };
        let c = guest::counts(&o.lines);
        ran += c.passed + c.failed;
        let not_run = expected.saturating_sub(c.passed + c.failed);
        skipped += c.ignored + c.skipped + not_run;
        let mut part = format!("{} {}/{} passed", step.name, c.passed, expected);
        if !o.ended {
            part.push_str(" (did not finish)");
        } else if !c.summary {
            let _ = write!(part, " (exited {} without a summary)", o.rc_text);
        }
        if let Some(secs) = o.secs {
            let _ = write!(part, " in {}", fmt_duration(Duration::from_secs(secs)));
        }
        let step_ok = o.ended
            && o.rc == Some(0)
            && c.failed == 0
            && c.ignored == 0
            && c.skipped == 0
            && c.passed == expected;
        if !step_ok {
            ok = false;
            for (name, message) in &c.failures {
                problems.push(format!("{}::{name}: {message}", step.name));
            }
            if c.skipped > 0 {
                problems.push(format!("{}: {} SKIPPED lines", step.name, c.skipped));
            }
            if c.failures.is_empty() && o.ended && o.rc != Some(0) {
                problems.push(match o.rc {
                    Some(124) | Some(137) => format!(
                        "{}: killed by the guest's step limit ({})",
                        step.name,
                        fmt_duration(plan.step_timeout)
                    ),
                    _ => format!("{}: exited {}", step.name, o.rc_text),
                });
            }
        }
        parts.push(part);
    }
    // doctor
    let doctor = report.steps.get("doctor");
    let doctor_text = doctor.map(|d| d.lines.join("\n")).unwrap_or_default();
    let _ = fs::write(out.join("doctor.txt"), format!("{doctor_text}\n"));
    match doctor {
        Some(d) if d.rc_text == "missing" => {
            ok = false;
            parts.push("doctor: not available".into());
            problems.push("doctor not available (`stormguard doctor --help` failed)".into());
        }
        Some(d) if d.ended => {
            if d.rc != Some(0) {
                ok = false;
                problems.push(format!("doctor exited {} (doctor.txt)", d.rc_text));
            }
            parts.push(format!("doctor: exit {}", d.rc_text));
        }
        _ => {
            ok = false;
            parts.push("doctor: did not finish".into());
        }
    }
    let _ = write!(
        line,
        "; {}; {ran} tests ran, {skipped} skipped; boot {}, total {}",
        parts.join(", "),
        report.boot.map(fmt_duration).unwrap_or_else(|| "-".into()),
        fmt_duration(report.total)
    );
    if report.timed_out {
        ok = false;
        problems.push(format!(
            "killed qemu after {} (--timeout-mins)",
            fmt_duration(timeout)
        ));
    } else if report.uname.is_some() && !report.done {
        ok = false;
        problems.push("the guest stopped before the end of /init".into());
    }
    if let Some(e) = &report.qemu_error
        && report.uname.is_some()
    {
        ok = false;
        problems.push(e.clone());
    }
    if skipped > 0 {
        ok = false;
    }
    // One line per distinct message, with the tests that showed it.
    let mut grouped: Vec<(String, Vec<String>)> = Vec::new();
    for p in &problems {
        let (who, what) = match p.split_once(": ") {
            Some((w, m)) if w.contains("::") => (w.to_string(), m.to_string()),
            _ => (String::new(), p.clone()),
        };
        match grouped.iter_mut().find(|(m, _)| *m == what) {
            Some((_, whos)) => whos.push(who),
            None => grouped.push((what, vec![who])),
        }
    }
    println!("{line}");
    for (what, whos) in &grouped {
        let whos: Vec<&str> = whos
            .iter()
            .map(String::as_str)
            .filter(|w| !w.is_empty())
            .collect();
        if whos.is_empty() {
            println!("vmtest {}:   {what}", spec.name);
        } else {
            println!(
                "vmtest {}:   {} test(s) failed with: {what}",
                spec.name,
                whos.len()
            );
            println!("vmtest {}:     {}", spec.name, whos.join(", "));
        }
    }
    println!(
        "vmtest {}: logs in {} (console.log, results.txt, doctor.txt)",
        spec.name,
        out.display()
    );
    if let Some((what, whos)) = grouped.first() {
        let _ = write!(
            line,
            " — {} problem(s); first: {what}{}",
            grouped.len(),
            if whos.iter().any(|w| !w.is_empty()) {
                format!(" ({} tests)", whos.len())
            } else {
                String::new()
            }
        );
    }
    Outcome {
        name: spec.name,
        line,
        ok,
    }
}

/// `cargo xtask vmtest`.
pub fn run(env: &Env, args: Args) -> anyhow::Result<()> {
    run_all(env, &args)
}
