//! `cargo xtask bench`: what stormguard costs the workloads it watches.
//!
//! Six loopback workloads (`sgbench run …`) are timed under eight
//! configurations: no probes, stormguard always-on, stormguard with its
//! on-demand probes attached, stormguard as deployed (on-demand probes
//! attached only while a flow is suspect, and for how long is reported
//! per cell), the equivalent bpftrace one-liners, and the
//! floor (hand-written programs that only bump a per-CPU counter on the
//! same hooks) with and without the on-demand hooks. The machine this runs
//! on has two noisy cores, so configurations are interleaved: every round
//! runs every configuration × workload once, in an order rotated per round,
//! and each cell reports the median and min–max over rounds. Slow drift
//! (thermal, other tenants) then spreads over every configuration instead
//! of biasing whichever ran last.
//!
//! The workload process is pinned to one CPU (client and server threads
//! together: unpinned, a ping-pong between two CPUs costs 4× and flips
//! placement from run to run); the tools run on the others, and the CPU
//! they use there is reported separately (Table 3). Which hooks stormguard
//! and the floor attach is read from the tools themselves at start, so the
//! bpftrace equivalent follows the sensors and a stale floor is flagged.
//!
//! After the matrix, the enforcement section (`sgbench enforce`, one
//! process pinned to the same CPU) times what the enforcement programs add
//! to a refused connect and to UDP sends, with no programs, a budget for
//! another pid only, a budget for this pid with tokens and one exhausted,
//! the four states interleaved over rounds; then the call-stacks section,
//! and the daemon sections of [`crate::bench_daemon`] (detection latency,
//! CPU and memory per connect rate and per tracked flow, a 1 M burst).
//! Each section is `--NAME [run|only|skip]`.
//!
//! Everything lands in BENCHMARKS.md ([`crate::bench_doc`]): header,
//! targets met or not, a section per table, and the dimensionless ratios
//! that `--check` compares with the committed file — the one gate, on
//! ratios only, because absolute times on these machines are too noisy to
//! gate on (and `--check` is not run in CI for the same reason).
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    bench_daemon::{self, Bins, Sizes},
    bench_doc::{self, Header, Part, median, min_max},
};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Rounds (default 5, 2 with --quick). Each round runs every
    /// configuration × workload once; the other sections scale with it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub rounds: Option<u32>,
    /// Multiplies each workload's op count (default 1, 0.1 with --quick;
    /// 1 aims at ~0.3 s per cell without probes).
    #[arg(long)]
    pub ops_scale: Option<f64>,
    /// Wall-clock limit per cell in seconds (the op count is the other
    /// limit; whichever comes first ends the cell).
    #[arg(long, default_value_t = 1.0)]
    pub max_secs: f64,
    /// A smoke run in a few minutes: 2 rounds, op counts × 0.1, 3
    /// detection-latency runs per rate, 2 s load windows, marked QUICK in
    /// the file. Its figures are for seeing that everything runs.
    #[arg(long)]
    pub quick: bool,
    /// Run, then compare every ratio with the committed BENCHMARKS.md and
    /// fail on any that grew by more than 25% (ratios only, never absolute
    /// times). Writes the new file to target/bench/BENCHMARKS.new.md and
    /// leaves the committed one alone. Not in CI: too noisy there.
    #[arg(long)]
    pub check: bool,
    /// Where to write the markdown (default BENCHMARKS.md at the workspace
    /// root for a run of every section, workload and configuration;
    /// target/bench/BENCHMARKS.partial.md when some are left out, so that
    /// a partial run never replaces the full file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Only these workloads (comma-separated; default all).
    #[arg(long, value_delimiter = ',')]
    pub workloads: Vec<String>,
    /// Only these configurations besides the baseline (comma-separated;
    /// default all).
    #[arg(long, value_delimiter = ',')]
    pub configs: Vec<String>,
    /// CPU the workload process (client and server threads) is pinned to;
    /// default the last one. The tools run wherever the scheduler puts
    /// them (in practice the other CPUs). Unpinned, a two-thread ping-pong
    /// flips between same-CPU and cross-CPU placement and varies 4×.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Use the release binaries already built instead of building them.
    #[arg(long)]
    pub no_build: bool,
    /// Also write every sample of the matrix (ns/op per round and cell)
    /// as JSON here.
    #[arg(long)]
    pub raw: Option<PathBuf>,
    #[command(flatten)]
    pub sections: Sections,
}

/// Declares [`Sections`]: one `--NAME [run|only|skip]` option per section,
/// all with the same clap attributes (written once here), and the list of
/// them in the order they run.
macro_rules! sections {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// Which sections run. Each option takes `run` (the default),
        /// `only` (also given by the option alone, e.g. `--enforce`: only
        /// the sections named so run) or `skip`.
        #[derive(Debug, clap::Args)]
        pub struct Sections {
            $(
                $(#[doc = $doc])*
                #[arg(
                    long,
                    value_enum,
                    default_value_t = Section::Run,
                    num_args = 0..=1,
                    default_missing_value = "only"
                )]
                pub $name: Section,
            )*
        }

        impl Sections {
            /// (name, choice) of every section, in running order.
            fn all(&self) -> Vec<(&'static str, Section)> {
                vec![$((stringify!($name), self.$name)),*]
            }
        }
    };
}

sections! {
    /// The overhead matrix: every workload under every configuration,
    /// then the detection engine's throughput (~3 minutes at 5 rounds).
    matrix,
    /// The enforcement section: ns each enforcement decision adds to a
    /// refused connect, a connected UDP send and an unconnected sendto
    /// (budget for another pid only, budget with tokens, budget exhausted,
    /// against no programs; target ≤ 300 ns), in 4 × rounds short rounds
    /// (~15 s at 5 rounds).
    enforce,
    /// The call-stacks section: ns that taking stacks adds to a suspect's
    /// refused connect and connected UDP send (stacks off and on,
    /// interleaved), and symbolization time for a first-seen and a cached
    /// binary.
    stacks,
    /// Detection latency at 20, 100, 1,000 and 10,000 attempts/s against
    /// a release daemon: first attempt to storm verdict, p50/p99 over 2 ×
    /// rounds runs per rate (~1 minute at 5 rounds).
    latency,
    /// Daemon CPU and RSS at 0, 1k, 10k and 50k connects/s from several
    /// client processes, and with 100, 1k, 10k and 50k tracked flows (RSS
    /// per flow slope) (~2 minutes at 5 rounds).
    scale,
    /// A burst of 1 M records: drops counted and API latency p50/p99
    /// (~15 s).
    burst,
}

impl Sections {
    /// Whether `name` runs: named `only`, or `run` while none is `only`.
    fn runs(&self, name: &str) -> bool {
        let all = self.all();
        let any_only = all.iter().any(|(_, s)| *s == Section::Only);
        all.iter()
            .any(|(n, s)| *n == name && (*s == Section::Only || (*s == Section::Run && !any_only)))
    }

    /// Whether every section runs (the file may then replace BENCHMARKS.md).
    fn complete(&self) -> bool {
        self.all().iter().all(|(n, _)| self.runs(n))
    }
}

/// Whether a section runs, and alone or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Run,
    Only,
    Skip,
}

/// A workload of `sgbench run` and its op count at scale 1.
struct Workload {
    name: &'static str,
    ops: u64,
}

/// Op counts for ~0.3 s per cell on the reference machine without probes
/// (getpid 165 ns, refused connect 14.5 µs, connect+request/response 60 µs,
/// TCP echo 14 µs, Unix echo 9.7 µs, UDP send 2.9 µs).
const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "getpid",
        ops: 2_000_000,
    },
    Workload {
        name: "refused-connect",
        ops: 20_000,
    },
    Workload {
        name: "connect-rr",
        ops: 5_000,
    },
    Workload {
        name: "tcp-echo",
        ops: 20_000,
    },
    Workload {
        name: "unix-echo",
        ops: 30_000,
    },
    Workload {
        name: "udp-send",
        ops: 100_000,
    },
];

/// A probe configuration under which every workload is timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Config {
    Baseline,
    Sg,
    SgOd,
    SgAuto,
    Bt,
    BtOd,
    Floor,
    FloorOd,
}

const CONFIGS: [Config; 8] = [
    Config::Baseline,
    Config::Sg,
    Config::SgOd,
    Config::SgAuto,
    Config::Bt,
    Config::BtOd,
    Config::Floor,
    Config::FloorOd,
];

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Baseline => "baseline",
            Config::Sg => "sg",
            Config::SgOd => "sg+od",
            Config::SgAuto => "sg-auto",
            Config::Bt => "bt",
            Config::BtOd => "bt+od",
            Config::Floor => "floor",
            Config::FloorOd => "floor+od",
        }
    }

    fn legend(self, hooks: &Hooks) -> String {
        let tps = |v: &[String]| v.iter().filter(|h| !is_cgroup(h)).count();
        let cgs = |v: &[String]| v.iter().filter(|h| is_cgroup(h)).count();
        match self {
            Config::Baseline => "no probes".into(),
            Config::Sg => format!(
                "stormguard watch --json --on-demand never (always-on: {} tracepoints + {} cgroup sock_addr hooks)",
                tps(&hooks.always_on),
                cgs(&hooks.always_on)
            ),
            Config::SgOd => format!(
                "stormguard watch --json --on-demand always (+ {})",
                hooks.on_demand.join(", ")
            ),
            Config::SgAuto => "stormguard watch --json --on-demand auto (as deployed: the on-demand hooks attach while a flow is suspect; the \"od attached\" column says how long they were)".into(),
            Config::Bt => format!(
                "bpftrace, @[pid] = count() on the same {} tracepoints (bpftrace cannot attach cgroup sock_addr hooks: not the {} others)",
                tps(&hooks.always_on),
                cgs(&hooks.always_on)
            ),
            Config::BtOd => format!(
                "bt + {}, same count (as the usual tracepoint one-liners)",
                hooks.on_demand.join(", ")
            ),
            Config::Floor => format!(
                "hand-written floor: one per-CPU counter increment per hit, on {} tracepoints + {} cgroup hooks",
                tps(&hooks.floor),
                cgs(&hooks.floor)
            ),
            Config::FloorOd => format!(
                "floor + the same on {}",
                hooks
                    .floor_od
                    .iter()
                    .filter(|h| !hooks.floor.contains(h))
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    fn is_stormguard(self) -> bool {
        matches!(self, Config::Sg | Config::SgOd | Config::SgAuto)
    }

    /// The bpftrace configuration on the same tracepoints as `self`.
    fn bpftrace(self) -> Option<Config> {
        match self {
            Config::Sg => Some(Config::Bt),
            Config::SgOd => Some(Config::BtOd),
            _ => None,
        }
    }

    /// The floor configuration stormguard's cost in `self` is judged against.
    fn floor(self) -> Option<Config> {
        match self {
            Config::Sg => Some(Config::Floor),
            Config::SgOd => Some(Config::FloorOd),
            _ => None,
        }
    }
}

/// Hook names as stormguard prints them: "category:name" for tracepoints,
/// "cgroup/connect4" and the like for cgroup hooks.
fn is_cgroup(hook: &str) -> bool {
    hook.starts_with("cgroup/")
}

/// The hooks each probed configuration attaches, learnt at start from the
/// tools themselves (stormguard's "watching" line, the floor holder's ready
/// line), so the bpftrace equivalent and the legends follow the sensors as
/// they change, and a floor that no longer matches them is reported.
#[derive(Debug, Default)]
struct Hooks {
    /// stormguard's always-on hooks.
    always_on: Vec<String>,
    /// stormguard's on-demand hooks.
    on_demand: Vec<String>,
    /// The floor holder's hooks without and with `--on-demand`.
    floor: Vec<String>,
    floor_od: Vec<String>,
}

impl Hooks {
    /// bpftrace probe list for the always-on tracepoints, plus the
    /// on-demand ones with `od`.
    fn bpftrace_probes(&self, od: bool) -> String {
        let extra: &[String] = if od { &self.on_demand } else { &[] };
        self.always_on
            .iter()
            .chain(extra)
            .filter(|h| !is_cgroup(h))
            .map(|h| format!("tracepoint:{h}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// How the floor differs from stormguard's hooks, if it does.
    fn floor_mismatch(&self) -> Option<String> {
        let sg_all: Vec<&String> = self.always_on.iter().chain(&self.on_demand).collect();
        let sg_always: Vec<&String> = self.always_on.iter().collect();
        let mut problems = Vec::new();
        for (name, floor, sg) in [
            ("floor", &self.floor, sg_always),
            ("floor+od", &self.floor_od, sg_all),
        ] {
            if floor.is_empty() {
                continue; // not measured
            }
            let missing: Vec<&str> = sg
                .iter()
                .filter(|h| !floor.contains(h))
                .map(|h| h.as_str())
                .collect();
            let extra: Vec<&str> = floor
                .iter()
                .filter(|h| !sg.contains(h))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() || !extra.is_empty() {
                problems.push(format!(
                    "{name} lacks [{}] and has extra [{}]",
                    missing.join(", "),
                    extra.join(", ")
                ));
            }
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

/// Splits "a, b, c" into hook names. stormguard names tracepoints
/// "tracepoint sock:inet_sock_set_state" (since the per-kernel coverage
/// work), the floor "sock:inet_sock_set_state": the prefix is dropped so
/// both compare, and bpftrace gets a probe name it can parse.
fn hook_list(s: &str) -> Vec<String> {
    s.split(", ")
        .map(str::trim)
        .map(|h| h.strip_prefix("tracepoint ").unwrap_or(h))
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses stormguard's "stormguard: watching; always-on hooks: a, b;
/// on-demand (always): c, d" line into (always-on, on-demand).
fn parse_watching(line: &str) -> Option<(Vec<String>, Vec<String>)> {
    let rest = line.split_once("always-on hooks: ")?.1;
    let (always_on, rest) = rest.split_once("; on-demand")?;
    let on_demand = rest.split_once("): ")?.1;
    Some((hook_list(always_on), hook_list(on_demand)))
}

/// Parses the floor holder's "sgbench: floor ready; attached: a, b" line.
fn parse_floor_ready(line: &str) -> Option<Vec<String>> {
    Some(hook_list(line.split_once("attached: ")?.1))
}

/// Starts stormguard (on-demand attached) and the floors once, reads which
/// hooks each attached, and stops them.
fn discover(plan: &Plan, paths: &Paths) -> anyhow::Result<Hooks> {
    let mut hooks = Hooks::default();
    let sg = start(Config::SgOd, plan, paths)?.context("stormguard did not start")?;
    (hooks.always_on, hooks.on_demand) = parse_watching(&sg.ready_line).with_context(|| {
        format!(
            "cannot read the hooks from stormguard's line {:?}; has its format changed?",
            sg.ready_line
        )
    })?;
    drop(sg);
    for (config, slot) in [
        (Config::Floor, &mut hooks.floor),
        (Config::FloorOd, &mut hooks.floor_od),
    ] {
        if !plan.configs.contains(&config) {
            continue;
        }
        let floor = start(config, plan, paths)?.context("the floor holder did not start")?;
        *slot = parse_floor_ready(&floor.ready_line).with_context(|| {
            format!("cannot read the floor's hooks from {:?}", floor.ready_line)
        })?;
    }
    Ok(hooks)
}

/// Binaries and paths the bench runs.
struct Paths {
    stormguard: PathBuf,
    sgbench: PathBuf,
    bpftrace: PathBuf,
}

/// Entry point of `cargo xtask bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let rounds = args.rounds.unwrap_or(if args.quick { 2 } else { 5 });
    let ops_scale = args.ops_scale.unwrap_or(if args.quick { 0.1 } else { 1.0 });
    if !(ops_scale > 0.0 && ops_scale.is_finite()) {
        bail!("--ops-scale must be a positive number");
    }
    if !(args.max_secs > 0.0 && args.max_secs.is_finite()) {
        bail!("--max-secs must be a positive number of seconds");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the bench loads eBPF programs and runs bpftrace: run it as root");
    }
    let ncpu = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cpu = args.cpu.unwrap_or(ncpu - 1);
    if cpu >= ncpu {
        bail!("--cpu {cpu}: this machine has CPUs 0–{}", ncpu - 1);
    }
    let workloads = select_workloads(&args.workloads)?;
    let configs = select_configs(&args.configs)?;
    let sections = &args.sections;
    let root = workspace_root()?;
    if !args.no_build {
        build(&root)?;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let release = target.join("release");
    let needs_bt = sections.runs("matrix")
        && configs
            .iter()
            .any(|c| matches!(c, Config::Bt | Config::BtOd));
    let paths = Paths {
        stormguard: existing(release.join("stormguard"))?,
        sgbench: existing(release.join("sgbench"))?,
        bpftrace: if needs_bt {
            ensure_bpftrace()?
        } else {
            PathBuf::from("bpftrace")
        },
    };
    let env_before = environment();
    eprintln!("bench: before: {env_before}");
    let started = Instant::now();
    let mut parts = Vec::new();
    let mut settings = vec![format!(
        "{rounds} rounds, ops scale {ops_scale}, ≤ {} s per cell, workload pinned to CPU {cpu}",
        args.max_secs
    )];
    if sections.runs("matrix") {
        let mut plan = Plan {
            rounds,
            ops_scale,
            max_secs: args.max_secs,
            cpu,
            workloads,
            configs,
            hooks: Hooks::default(),
        };
        plan.hooks = discover(&plan, &paths)?;
        eprintln!(
            "bench: {} rounds × {} configurations × {} workloads, about {} s",
            plan.rounds,
            plan.configs.len(),
            plan.workloads.len(),
            plan.estimate_secs()
        );
        let t = Instant::now();
        let m = measure(&plan, &paths)?;
        let elapsed = t.elapsed();
        let mut env = format!("before: {env_before}; after: {}", environment());
        if !m.disturbed.is_empty() {
            env.push_str(&format!(
                "\nWARNING: others had BPF programs attached during {} of {} config rounds: {}",
                m.disturbed.len(),
                plan.rounds as usize * plan.configs.len(),
                m.disturbed.join(", ")
            ));
        }
        if let Some(path) = &args.raw {
            write_raw(path, &plan, &m.samples, &m.tool_cpu)?;
        }
        let text = report(&plan, &m, elapsed, &env);
        eprint!("{text}");
        parts.push(matrix_part(&plan, &m, &text));
        let engine = engine_report(&existing(release.join("enginebench"))?, cpu)?;
        eprint!("{engine}");
        let mut p = Part::new("Detection engine");
        p.body = format!("```text{engine}```\n");
        parts.push(p);
    }
    let section_args = SectionArgs {
        rounds,
        ops_scale,
        max_secs: args.max_secs,
        cpu,
    };
    if sections.runs("enforce") {
        parts.push(ENFORCE_SECTION.run(&paths.sgbench, &section_args)?);
    }
    if sections.runs("stacks") {
        parts.push(STACKS_SECTION.run(&paths.sgbench, &section_args)?);
    }
    let bins = Bins {
        stormguard: paths.stormguard.clone(),
        sgbench: paths.sgbench.clone(),
        stormclient: existing(release.join("stormclient"))?,
    };
    let sizes = Sizes {
        latency_runs: if args.quick { 3 } else { (2 * rounds).max(10) },
        scale_rounds: if args.quick { 1 } else { rounds.min(3) },
        window_s: if args.quick { 2.0 } else { 5.0 },
        burst: 1_000_000,
    };
    if sections.runs("latency") {
        eprintln!(
            "bench: detection latency, {} runs × 4 rates, about {} s",
            sizes.latency_runs,
            sizes.latency_runs * 4 * 2
        );
        parts.push(bench_daemon::latency(&bins, &sizes)?);
        settings.push(format!("{} latency runs per rate", sizes.latency_runs));
    }
    if sections.runs("scale") {
        eprintln!(
            "bench: daemon CPU and memory, {} rounds × (4 rates + 4 flow counts), about {:.0} s",
            sizes.scale_rounds,
            f64::from(sizes.scale_rounds) * (4.0 * (sizes.window_s + 2.5) + 4.0 * 10.0)
        );
        parts.push(bench_daemon::scale(&bins, &sizes)?);
        settings.push(format!(
            "daemon load: {} round(s), {} s windows",
            sizes.scale_rounds, sizes.window_s
        ));
    }
    if sections.runs("burst") {
        eprintln!("bench: burst of {} records", sizes.burst);
        parts.push(bench_daemon::burst(&bins, &sizes)?);
    }
    if parts.is_empty() {
        bail!("every section was skipped");
    }
    let header = Header {
        quick: args.quick,
        settings: settings.join(", "),
        environment: format!("before: {env_before}; after: {}", environment()),
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let md = bench_doc::render(&root, &header, &parts);
    let committed = root.join("BENCHMARKS.md");
    // Only a run of everything may replace the committed file.
    let complete = sections.complete() && args.workloads.is_empty() && args.configs.is_empty();
    let out = match (&args.out, args.check, complete) {
        (Some(p), _, _) => p.clone(),
        (None, true, _) => target.join("bench/BENCHMARKS.new.md"),
        (None, false, true) => committed.clone(),
        (None, false, false) => target.join("bench/BENCHMARKS.partial.md"),
    };
    if args.check && out == committed {
        bail!("--check never writes the committed BENCHMARKS.md; give another --out");
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    println!("{md}");
    eprintln!("bench: wrote {}", out.display());
    if args.check {
        let old = std::fs::read_to_string(&committed).with_context(|| {
            format!(
                "reading {} (run `cargo xtask bench` on a quiet machine and commit it first)",
                committed.display()
            )
        })?;
        // A quick run against a full file (or the reverse) compares
        // figures taken with different op counts and rounds: allowed, but
        // said.
        if old.contains("**QUICK RUN**") != args.quick {
            eprintln!(
                "bench --check: WARNING: the committed file is from a {} run and this one is {}; ratios may differ for that reason alone",
                if args.quick { "full" } else { "quick" },
                if args.quick { "quick" } else { "full" }
            );
        }
        let old =
            bench_doc::parse_ratios(&old).with_context(|| format!("in {}", committed.display()))?;
        let new: bench_doc::Ratios = parts
            .iter()
            .flat_map(|p| p.ratios.iter().map(|(k, v)| (k.clone(), *v)))
            .collect();
        let c = bench_doc::compare(&old, &new);
        print!("{}", c.report());
        if c.failed() {
            bail!(
                "{} ratios regressed by more than {:.0}% against {}",
                c.regressions.len(),
                bench_doc::TOLERANCE * 100.0,
                committed.display()
            );
        }
    }
    Ok(())
}

/// What the in-process `sgbench` sections are given.
struct SectionArgs {
    rounds: u32,
    ops_scale: f64,
    max_secs: f64,
    cpu: usize,
}

/// `sgbench enforce` rounds per bench round: its rounds are short (every
/// workload under the four states back to back, ~40 ms per cell), so
/// that load from other tenants lands on all states alike.
const ENFORCE_ROUNDS_PER_ROUND: u32 = 4;

/// Seconds one `sgbench enforce` round takes at scale 1 (12 cells,
/// warm-ups and attaching included).
const ENFORCE_SECS_PER_ROUND: f64 = 0.6;

/// The enforcement section: `sgbench enforce` pinned to the workload CPU.
const ENFORCE_SECTION: SectionRun = SectionRun {
    subcommand: "enforce",
    title: "Enforcement",
    what: "enforcement section, {rounds} rounds × 3 workloads × 4 states",
    rounds_per_round: ENFORCE_ROUNDS_PER_ROUND,
    cells_per_round: 12,
    secs_per_round: ENFORCE_SECS_PER_ROUND,
};

/// The call-stacks section: `sgbench stacks` pinned to the workload CPU,
/// 4 of its rounds per bench round, each 6 cells of ~40 ms and the drains
/// between them (~0.4 s at scale 1).
const STACKS_SECTION: SectionRun = SectionRun {
    subcommand: "stacks",
    title: "Call stacks",
    what: "call-stacks section, {rounds} rounds × 2 workloads × 3 states",
    rounds_per_round: 4,
    cells_per_round: 6,
    secs_per_round: 0.4,
};

/// One `sgbench` section run as a child: bounded in time, its progress on
/// stderr, its table relayed.
struct SectionRun {
    subcommand: &'static str,
    /// Its heading in BENCHMARKS.md.
    title: &'static str,
    /// Progress line; `{rounds}` is replaced.
    what: &'static str,
    /// Section rounds per bench round.
    rounds_per_round: u32,
    cells_per_round: u32,
    secs_per_round: f64,
}

impl SectionRun {
    fn run(&self, sgbench: &Path, args: &SectionArgs) -> anyhow::Result<Part> {
        let rounds = args.rounds * self.rounds_per_round;
        // Every cell is capped at 1.1 × max_secs (warm-up included); 30 s for
        // loading and attaching.
        let cap = rounds as f64 * f64::from(self.cells_per_round) * args.max_secs * 1.1;
        let limit = Duration::from_secs_f64(cap + 30.0);
        eprintln!(
            "bench: {}, about {:.0} s",
            self.what.replace("{rounds}", &rounds.to_string()),
            (rounds as f64 * self.secs_per_round * args.ops_scale)
                .min(cap)
                .ceil()
        );
        let mut child = Command::new(sgbench)
            .arg(self.subcommand)
            .arg("--cpu")
            .arg(args.cpu.to_string())
            .arg("--rounds")
            .arg(rounds.to_string())
            .arg("--ops-scale")
            .arg(args.ops_scale.to_string())
            .arg("--max-secs")
            .arg(args.max_secs.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", sgbench.display()))?;
        // The table is a few KB: it fits in the pipe, so reading after the
        // exit cannot block.
        let Some(status) = wait_timeout(&mut child, limit)? else {
            kill_and_reap(&mut child);
            bail!(
                "sgbench {} did not finish in {limit:?}; killed",
                self.subcommand
            );
        };
        let mut out = String::new();
        if let Some(mut s) = child.stdout.take() {
            s.read_to_string(&mut out)?;
        }
        if !status.success() {
            bail!("sgbench {} failed ({status})", self.subcommand);
        }
        let mut part = Part::new(self.title);
        let (text, ratios) = split_ratios(&out)?;
        eprint!("{text}");
        part.ratios = ratios;
        part.body = format!("```text\n{}\n```\n", text.trim());
        Ok(part)
    }
}

/// Separates the `sgbench-ratios {json}` line a section prints for the
/// bench from the table it prints for people.
fn split_ratios(out: &str) -> anyhow::Result<(String, bench_doc::Ratios)> {
    let mut text = String::new();
    let mut ratios = bench_doc::Ratios::new();
    for line in out.lines() {
        match line.strip_prefix("sgbench-ratios ") {
            Some(json) => {
                let v: serde_json::Value =
                    serde_json::from_str(json).with_context(|| format!("ratios line {line:?}"))?;
                for (k, x) in v.as_object().into_iter().flatten() {
                    if let Some(x) = x.as_f64() {
                        ratios.insert(k.clone(), x);
                    }
                }
            }
            None => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    Ok((text, ratios))
}

/// Detection-engine throughput (observations per second on one core) and
/// memory per tracked flow, from the `enginebench` binary: median and
/// min–max of five runs pinned to one CPU.
fn engine_report(bin: &Path, cpu: usize) -> anyhow::Result<String> {
    let mut rates = Vec::new();
    let mut bytes = 0.0;
    let mut flows = 0;
    for _ in 0..5 {
        let out = Command::new("taskset")
            .arg("-c")
            .arg(cpu.to_string())
            .arg(bin)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                bin.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("output of {}", bin.display()))?;
        rates.push(v["observations_per_s"].as_f64().unwrap_or(0.0));
        bytes = v["bytes_per_flow"].as_f64().unwrap_or(f64::MAX);
        flows = v["flows"].as_u64().unwrap_or(0);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
    Ok(format!(
        "\nDetection engine (one thread on CPU {cpu}, 4 M synthetic observations: refused connects, exchanges, UDP sends over 5,000 flows; ticked every 100 ms of their time)\n\
         throughput      {:.2} M observations/s (min–max {:.2}–{:.2})   target ≥ 2 M/s: {}\n\
         memory per flow {bytes:.0} bytes ({flows} flows, table growth slack and roll-ups included)   target ≤ 1 KB: {}\n",
        median / 1e6,
        rates[0] / 1e6,
        rates[rates.len() - 1] / 1e6,
        verdict(median >= 2e6),
        verdict(bytes <= 1024.0),
    ))
}

fn select_workloads(names: &[String]) -> anyhow::Result<Vec<&'static Workload>> {
    if names.is_empty() {
        return Ok(WORKLOADS.iter().collect());
    }
    names
        .iter()
        .map(|n| {
            WORKLOADS.iter().find(|w| w.name == n).with_context(|| {
                let all: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
                format!("unknown workload {n:?}; known: {}", all.join(", "))
            })
        })
        .collect()
}

fn select_configs(names: &[String]) -> anyhow::Result<Vec<Config>> {
    if names.is_empty() {
        return Ok(CONFIGS.to_vec());
    }
    let mut out = vec![Config::Baseline];
    for n in names {
        let c = CONFIGS.iter().find(|c| c.name() == n).with_context(|| {
            let all: Vec<_> = CONFIGS.iter().map(|c| c.name()).collect();
            format!("unknown configuration {n:?}; known: {}", all.join(", "))
        })?;
        if !out.contains(c) {
            out.push(*c);
        }
    }
    Ok(out)
}

pub(crate) fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}

pub(crate) fn existing(path: PathBuf) -> anyhow::Result<PathBuf> {
    if path.is_file() {
        Ok(path)
    } else {
        bail!(
            "{} is missing; build it (drop --no-build, or `cargo build --release -p detector -p stormguard-tests`)",
            path.display()
        )
    }
}

/// Where `cargo xtask setup` keeps bpf-linker (the eBPF build needs it on
/// PATH).
fn bpf_linker_bin() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("/var/tmp"))
        .join("stormguard/bpf-linker/bin")
}

/// Release builds: the numbers mean nothing for a debug build.
pub(crate) fn build(root: &Path) -> anyhow::Result<()> {
    let path = format!(
        "{}:{}",
        bpf_linker_bin().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    eprintln!("bench: cargo build --release -p detector -p stormguard-tests");
    let st = Command::new(cargo)
        .current_dir(root)
        .env("PATH", path)
        .args([
            "build",
            "--release",
            "-p",
            "detector",
            "-p",
            "stormguard-tests",
        ])
        .status()
        .context("cannot run cargo")?;
    if !st.success() {
        bail!(
            "release build failed ({st}); `cargo xtask setup` installs what the eBPF build needs"
        );
    }
    Ok(())
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// The bpftrace to compare with; installs Debian's when missing (package
/// lists first: a fresh machine's are often stale).
fn ensure_bpftrace() -> anyhow::Result<PathBuf> {
    if let Some(p) = find_in_path("bpftrace") {
        return Ok(p);
    }
    if find_in_path("apt-get").is_none() {
        bail!(
            "bpftrace is not installed and there is no apt-get; install bpftrace, or run with --configs sg,sg+od,floor,floor+od"
        );
    }
    for args in [
        &["update", "-q"][..],
        &["install", "-y", "-q", "bpftrace"][..],
    ] {
        eprintln!("bench: apt-get {}", args.join(" "));
        let st = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !st.success() {
            bail!("apt-get {} failed ({st})", args.join(" "));
        }
    }
    find_in_path("bpftrace").context("bpftrace was installed but is not on PATH")
}

/// What else was going on: the 1-minute load average and how many BPF
/// links others had attached (`bpftool link show`, when bpftool exists).
/// Taken before and after the run (with none of ours attached), because
/// someone else's probes or CPU hogs shift cells and widen the ranges.
fn environment() -> String {
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    match foreign_links() {
        Some(n) => format!("load average {load}, {n} BPF links attached by others"),
        None => format!("load average {load}"),
    }
}

/// BPF links on the machine (`bpftool link show`), or None without
/// bpftool. Counted while none of ours is attached, so all are others'.
/// (bpftrace 0.17 attaches without links and does not show here.)
fn foreign_links() -> Option<usize> {
    let out = Command::new("bpftool")
        .args(["link", "show"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
            .count(),
    )
}

/// What to run.
struct Plan {
    rounds: u32,
    ops_scale: f64,
    max_secs: f64,
    cpu: usize,
    workloads: Vec<&'static Workload>,
    configs: Vec<Config>,
    /// Filled in by `discover` before the measurements.
    hooks: Hooks,
}

impl Plan {
    fn ops(&self, w: &Workload) -> u64 {
        ((w.ops as f64 * self.ops_scale).round() as u64).max(1)
    }

    /// Longest one `sgbench run` may take: warm-up (a tenth) plus the timed
    /// loop, both capped by `max_secs`, plus start-up and set-up slack.
    fn cell_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.max_secs * 1.2 + 15.0)
    }

    /// Longest a tool must stay attached for one round of one config; it
    /// is told to exit by itself after this, should the bench die.
    fn tool_lifetime_secs(&self) -> u64 {
        60 + self.workloads.len() as u64 * self.cell_timeout().as_secs()
    }

    fn estimate_secs(&self) -> u64 {
        // ~0.35 s per cell at scale 1, ~1.5 s to start and stop a tool.
        let cell = (0.35 * self.ops_scale).min(self.max_secs * 1.1) + 0.05;
        let per_round = self.configs.len() as f64 * (1.5 + self.workloads.len() as f64 * cell);
        (per_round * self.rounds as f64).round() as u64
    }
}

/// ns/op per (config, workload), one entry per round. Also used for the
/// tools' own CPU time per op.
type Samples = BTreeMap<(Config, &'static str), Vec<f64>>;

/// What the matrix measured.
#[derive(Default)]
struct Measured {
    /// ns/op per cell.
    samples: Samples,
    /// CPU time the tool itself used per op during each cell.
    tool_cpu: Samples,
    /// Share of each cell's time stormguard had its on-demand probes
    /// attached (stormguard configurations only).
    attached: Samples,
    /// Rounds of configurations measured while someone else had BPF
    /// programs attached, e.g. "round 2 sg (8 links)".
    disturbed: Vec<String>,
}

/// Runs the interleaved matrix.
fn measure(plan: &Plan, paths: &Paths) -> anyhow::Result<Measured> {
    let mut m = Measured::default();
    let nc = plan.configs.len();
    let nw = plan.workloads.len();
    for round in 0..plan.rounds as usize {
        for i in 0..nc {
            let config = plan.configs[(i + round) % nc];
            let foreign = foreign_links().unwrap_or(0);
            let mut tool = start(config, plan, paths)?;
            // Let the tool's own start-up work (first ring reads, /proc
            // scans, bpftrace's post-attach housekeeping) finish first.
            thread::sleep(Duration::from_millis(300));
            let mut line = format!("round {}/{} {:<9}", round + 1, plan.rounds, config.name());
            for j in 0..nw {
                let w = plan.workloads[(j + round) % nw];
                let cpu_before = tool.as_ref().and_then(Tool::cpu_ns);
                let t0 = Instant::now();
                let cell = run_cell(w, plan, paths)
                    .with_context(|| format!("{} under {}", w.name, config.name()))?;
                let t1 = Instant::now();
                let cpu_after = tool.as_ref().and_then(Tool::cpu_ns);
                if let Some(t) = &mut tool {
                    t.check_alive()?;
                    if config.is_stormguard() {
                        // The detach of a tick just after the cell would
                        // land after t1 and is not counted; the attach
                        // before is.
                        t.pump();
                        let on = t.on_demand_between(t0, t1);
                        m.attached
                            .entry((config, w.name))
                            .or_default()
                            .push(on.as_secs_f64() / (t1 - t0).as_secs_f64());
                    }
                }
                if let (Some(a), Some(b)) = (cpu_before, cpu_after) {
                    let per_op = b.saturating_sub(a) as f64 / cell.all_ops as f64;
                    m.tool_cpu.entry((config, w.name)).or_default().push(per_op);
                }
                line.push_str(&format!(" {}={}", w.name, fmt_ns(cell.ns_per_op)));
                m.samples
                    .entry((config, w.name))
                    .or_default()
                    .push(cell.ns_per_op);
            }
            if let Some(mut t) = tool {
                t.stop();
                if let Some(hits) = t.floor_hits() {
                    line.push_str(&format!("  [floor hits: {hits}]"));
                }
            }
            if foreign > 0 {
                line.push_str(&format!("  [{foreign} BPF links of others attached]"));
                m.disturbed.push(format!(
                    "round {} {} ({foreign} links)",
                    round + 1,
                    config.name()
                ));
            }
            eprintln!("{line}");
        }
    }
    Ok(m)
}

/// What one `sgbench run` reported.
struct Cell {
    ns_per_op: f64,
    /// Timed plus warm-up ops: everything the tool saw from this cell.
    all_ops: u64,
}

/// One `sgbench run`, pinned to the plan's CPU.
fn run_cell(w: &Workload, plan: &Plan, paths: &Paths) -> anyhow::Result<Cell> {
    let mut child = Command::new(&paths.sgbench)
        .args(["run", w.name, "--cpu"])
        .arg(plan.cpu.to_string())
        .arg("--ops")
        .arg(plan.ops(w).to_string())
        .arg("--max-secs")
        .arg(plan.max_secs.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", paths.sgbench.display()))?;
    let Some(status) = wait_timeout(&mut child, plan.cell_timeout())? else {
        kill_and_reap(&mut child);
        bail!(
            "sgbench run did not finish in {:?}; killed",
            plan.cell_timeout()
        );
    };
    // One short line each: it fit in the pipe, so reading after the exit
    // cannot block.
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut s) = child.stdout.take() {
        s.read_to_string(&mut out)?;
    }
    if let Some(mut s) = child.stderr.take() {
        s.read_to_string(&mut err)?;
    }
    if !status.success() {
        bail!("sgbench run failed ({status}): {}", err.trim());
    }
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("sgbench printed something other than JSON: {out:?}"))?;
    let field = |k: &str| v[k].as_f64().with_context(|| format!("no {k} in {out:?}"));
    Ok(Cell {
        ns_per_op: field("ns_per_op")?,
        all_ops: (field("ops")? + field("warmup_ops")?).max(1.0) as u64,
    })
}

fn wait_timeout(child: &mut Child, limit: Duration) -> anyhow::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().context("waiting for a child")? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(5));
    }
}

fn kill_and_reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A line a tool printed (stdout and stderr alike), and when it was read.
struct Line {
    text: String,
    at: Instant,
}

/// A running probe tool (stormguard, bpftrace or the floor holder).
struct Tool {
    name: &'static str,
    child: Child,
    /// The floor holder stops when this pipe closes.
    stdin: Option<ChildStdin>,
    /// Signal that makes the tool detach and exit cleanly (none for the
    /// floor holder, which stops when its stdin closes and then prints
    /// its hit counts).
    stop_signal: Option<libc::c_int>,
    lines: mpsc::Receiver<Line>,
    /// Everything it printed so far, for error messages and floor hits.
    log: Vec<String>,
    /// The line that said the probes are attached (it lists them).
    ready_line: String,
    stopped: bool,
    /// When stormguard logged attaching (true) or detaching (false) its
    /// on-demand probes, in order.
    on_demand: Vec<(Instant, bool)>,
}

/// Starts the tool of a configuration and waits until its probes are
/// attached; `None` for the baseline.
fn start(config: Config, plan: &Plan, paths: &Paths) -> anyhow::Result<Option<Tool>> {
    let life = plan.tool_lifetime_secs();
    let (mut cmd, ready, signal, name): (Command, &str, Option<libc::c_int>, &'static str) =
        match config {
            Config::Baseline => return Ok(None),
            Config::Sg | Config::SgOd | Config::SgAuto => {
                let mut c = Command::new(&paths.stormguard);
                c.args(["watch", "--json", "--on-demand"])
                    .arg(match config {
                        Config::Sg => "never",
                        Config::SgOd => "always",
                        _ => "auto",
                    })
                    .args(["--duration", &life.to_string()]);
                (c, "stormguard: watching", Some(libc::SIGTERM), "stormguard")
            }
            Config::Bt | Config::BtOd => {
                let probes = plan.hooks.bpftrace_probes(config == Config::BtOd);
                // The interval probe bounds its life should the bench die; END
                // clears the map so exiting prints nothing.
                let prog = format!(
                    "{probes} {{ @[pid] = count(); }} interval:s:{life} {{ exit(); }} END {{ clear(@); }}"
                );
                let mut c = Command::new(&paths.bpftrace);
                c.arg("-e")
                    .arg(prog)
                    // bpftrace prints this once every probe is attached ("Attaching
                    // N probes..." comes before attaching).
                    .env("__BPFTRACE_NOTIFY_PROBES_ATTACHED", "1");
                (
                    c,
                    "__BPFTRACE_NOTIFY_PROBES_ATTACHED",
                    Some(libc::SIGINT),
                    "bpftrace",
                )
            }
            Config::Floor | Config::FloorOd => {
                let mut c = Command::new(&paths.sgbench);
                c.arg("floor");
                if config == Config::FloorOd {
                    c.arg("--on-demand");
                }
                c.args(["--until-stdin-eof", "--duration", &life.to_string()]);
                (c, "sgbench: floor ready", None, "sgbench floor")
            }
        };
    // stormguard --json rows are of no interest here; the others print
    // little, and what they print is drained so they never block on a pipe.
    let stdout = if config.is_stormguard() {
        Stdio::null()
    } else {
        Stdio::piped()
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    let (tx, rx) = mpsc::channel();
    if let Some(out) = child.stdout.take() {
        drain(out, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        drain(err, tx);
    }
    let stdin = child.stdin.take();
    let mut tool = Tool {
        name,
        child,
        stdin,
        stop_signal: signal,
        lines: rx,
        log: Vec::new(),
        ready_line: String::new(),
        stopped: false,
        on_demand: Vec::new(),
    };
    tool.ready_line = tool.wait_for(ready, Duration::from_secs(60))?;
    Ok(Some(tool))
}

/// Forwards a tool's output, line by line, until it closes the stream.
fn drain(stream: impl Read + Send + 'static, tx: mpsc::Sender<Line>) {
    thread::spawn(move || {
        for text in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx
                .send(Line {
                    text,
                    at: Instant::now(),
                })
                .is_err()
            {
                break;
            }
        }
    });
}

impl Tool {
    /// Waits for the line saying the probes are attached, and returns it.
    fn wait_for(&mut self, ready: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            match self.lines.recv_timeout(Duration::from_millis(50)) {
                Ok(line) => {
                    let found = line.text.contains(ready).then(|| line.text.clone());
                    self.note(line);
                    if let Some(text) = found {
                        return Ok(text);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = self.child.wait().ok();
                    bail!(
                        "{} exited before attaching ({}):\n{}",
                        self.name,
                        st.map(|s| s.to_string()).unwrap_or_default(),
                        self.log.join("\n")
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not report its probes attached within {limit:?}:\n{}",
                    self.name,
                    self.log.join("\n")
                );
            }
        }
    }

    /// Keeps a line, and notes stormguard's on-demand attach and detach
    /// (its info log lines; the attach is logged just before attaching).
    fn note(&mut self, line: Line) {
        // `--on-demand always` attaches before it says it is watching,
        // without a log line.
        let attaching = line.text.contains("attaching on-demand probes")
            || (line.text.contains("stormguard: watching") && line.text.contains("(always)"));
        if attaching && !line.text.contains("detaching") {
            self.on_demand.push((line.at, true));
        } else if line.text.contains("detaching on-demand probes") {
            self.on_demand.push((line.at, false));
        }
        self.log.push(line.text);
    }

    /// Takes in what the tool printed so far.
    fn pump(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.note(line);
        }
    }

    /// How long the on-demand probes were attached between `t0` and `t1`.
    fn on_demand_between(&self, t0: Instant, t1: Instant) -> Duration {
        on_demand_between(&self.on_demand, t0, t1)
    }

    /// CPU time (user + system, ns) all threads of the tool used so far,
    /// from /proc/<pid>/task/*/schedstat. BPF programs run in the context
    /// of the task that hits the hook, so this is the tool's user-space
    /// side only (for stormguard: reading and aggregating the ring buffer).
    fn cpu_ns(&self) -> Option<u64> {
        crate::daemon::proc_cpu_ns(self.child.id())
    }

    /// A tool that died mid-run would turn its cells into baseline cells.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait().context("polling a tool")? {
            None => Ok(()),
            Some(st) => {
                self.stopped = true;
                self.pump();
                bail!(
                    "{} exited during the measurement ({st}):\n{}",
                    self.name,
                    self.log.join("\n")
                )
            }
        }
    }

    /// Asks the tool to detach and exit; kills it if it does not within 10 s.
    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // Closing stdin stops the floor holder; the signal stops the others.
        drop(self.stdin.take());
        if let Some(sig) = self.stop_signal {
            // SAFETY: the pid is our child and not yet reaped, so it is
            // still this process (or its zombie); signalling it is harmless.
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        }
        match wait_timeout(&mut self.child, Duration::from_secs(10)) {
            Ok(Some(_)) => {}
            _ => {
                eprintln!("bench: {} did not exit within 10 s; killing it", self.name);
                kill_and_reap(&mut self.child);
            }
        }
        // Collect what it printed on the way out (the floor's hit counts).
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
            self.note(line);
        }
    }

    /// The floor holder's hit counts per hook, compacted, once stopped.
    fn floor_hits(&self) -> Option<String> {
        let line = self.log.iter().rev().find(|l| l.starts_with("{\"hits\""))?;
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let hits = v["hits"].as_object()?;
        Some(
            hits.iter()
                .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
                .map(|(k, n)| format!("{}={}", k.rsplit([':', '/']).next().unwrap_or(k), n))
                .collect::<Vec<_>>()
                .join(" "),
        )
    }
}

/// Time within [t0, t1] covered by the attached spans of `events`
/// (attach/detach marks in order; an attach not yet detached lasts).
fn on_demand_between(events: &[(Instant, bool)], t0: Instant, t1: Instant) -> Duration {
    let mut total = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for &(at, attached) in events {
        match (attached, since) {
            (true, None) => since = Some(at),
            (false, Some(s)) => {
                total += overlap(s, at, t0, t1);
                since = None;
            }
            _ => {}
        }
    }
    if let Some(s) = since {
        total += overlap(s, t1, t0, t1);
    }
    total
}

fn overlap(a0: Instant, a1: Instant, b0: Instant, b1: Instant) -> Duration {
    a1.min(b1).saturating_duration_since(a0.max(b0))
}

impl Drop for Tool {
    fn drop(&mut self) {
        self.stop();
    }
}

/// ns with a decimal below 1 µs, where single nanoseconds matter.
fn fmt_ns(ns: f64) -> String {
    if ns.abs() < 1000.0 {
        format!("{ns:.1}")
    } else {
        format!("{ns:.0}")
    }
}

fn fmt_delta(ns: f64) -> String {
    if ns >= 0.0 {
        format!("+{}", fmt_ns(ns))
    } else {
        fmt_ns(ns)
    }
}

/// Statistics of one workload across configurations.
struct Cells<'a> {
    samples: &'a Samples,
    workload: &'static str,
}

impl Cells<'_> {
    fn get(&self, c: Config) -> Option<&Vec<f64>> {
        self.samples
            .get(&(c, self.workload))
            .filter(|v| !v.is_empty())
    }

    fn median(&self, c: Config) -> Option<f64> {
        self.get(c).map(|v| median(v))
    }

    fn overhead(&self, c: Config) -> Option<f64> {
        Some(self.median(c)? - self.median(Config::Baseline)?)
    }

    /// What counts as "not measurable" for this workload: twice the
    /// baseline's median absolute deviation over rounds, and never under
    /// 1% of the baseline. The MAD, not the range: one round disturbed by
    /// another tenant would otherwise make every difference "noise".
    fn noise(&self) -> Option<f64> {
        let base = self.get(Config::Baseline)?;
        let m = median(base);
        let dev: Vec<f64> = base.iter().map(|x| (x - m).abs()).collect();
        Some((2.0 * median(&dev)).max(m * 0.01))
    }
}

/// stormguard's overhead against the floor's on one workload.
struct VsFloor {
    /// stormguard overhead ÷ floor overhead; None when the floor's is ≤ 0.
    ratio: Option<f64>,
    /// The floor's overhead is within noise, so the ratio is unreliable.
    shaky: bool,
    /// stormguard's overhead ≤ 1.5 × the floor's + noise.
    met: bool,
}

impl VsFloor {
    fn new(cells: &Cells, sg: Config) -> Option<Self> {
        let floor = sg.floor()?;
        let (s, f, noise) = (cells.overhead(sg)?, cells.overhead(floor)?, cells.noise()?);
        Some(VsFloor {
            ratio: (f > 0.0).then(|| s / f),
            shaky: f <= noise,
            met: s <= 1.5 * f.max(0.0) + noise,
        })
    }

    /// "15.20×", "15.20×?" (floor within noise) or "—" (floor ≤ 0).
    fn ratio_text(&self) -> String {
        match self.ratio {
            Some(r) => format!("{r:.2}×{}", if self.shaky { "?" } else { "" }),
            None => "—".into(),
        }
    }
}

fn report(plan: &Plan, m: &Measured, elapsed: Duration, env: &str) -> String {
    use std::fmt::Write as _;
    let (samples, tool_cpu) = (&m.samples, &m.tool_cpu);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "\nstormguard bench: {} rounds, configurations interleaved (order rotated each round), {:.0} s; loopback only",
        plan.rounds,
        elapsed.as_secs_f64()
    );
    let _ = writeln!(o, "machine: {env}");
    let _ = writeln!(
        o,
        "workload process (client and server threads) pinned to CPU {}; tools unpinned",
        plan.cpu
    );
    let _ = writeln!(o, "configurations:");
    for c in &plan.configs {
        let _ = writeln!(o, "  {:<9} {}", c.name(), c.legend(&plan.hooks));
    }
    let _ = writeln!(
        o,
        "stormguard's hooks: always-on {}; on-demand {}",
        plan.hooks.always_on.join(", "),
        plan.hooks.on_demand.join(", ")
    );
    if let Some(m) = plan.hooks.floor_mismatch() {
        let _ = writeln!(
            o,
            "WARNING: the floor does not match stormguard's hooks ({m}): add floor programs (detector/src/kernel/floor.rs); the ÷floor ratios are off"
        );
    }
    let _ = writeln!(
        o,
        "workloads (ops per cell, at most {} s each):",
        plan.max_secs
    );
    for w in &plan.workloads {
        let _ = writeln!(o, "  {:<16} {}", w.name, plan.ops(w));
    }

    let _ = writeln!(
        o,
        "\nTable 1: ns/op, median and min–max over {} rounds; overhead = median − baseline median; od attached = share of the cell stormguard had its on-demand probes attached (median)",
        plan.rounds
    );
    let _ = writeln!(
        o,
        "{:<16} {:<9} {:>10} {:>21} {:>10} {:>11}",
        "workload", "config", "median", "min–max", "overhead", "od attached"
    );
    for w in &plan.workloads {
        let cells = Cells {
            samples,
            workload: w.name,
        };
        for (i, c) in plan.configs.iter().enumerate() {
            let Some(v) = cells.get(*c) else { continue };
            let (lo, hi) = min_max(v);
            let over = match (c, cells.overhead(*c)) {
                (Config::Baseline, _) | (_, None) => "—".to_string(),
                (_, Some(d)) => fmt_delta(d),
            };
            let attached = m
                .attached
                .get(&(*c, w.name))
                .map(|a| format!("{:.0}%", median(a) * 100.0))
                .unwrap_or_default();
            let _ = writeln!(
                o,
                "{:<16} {:<9} {:>10} {:>21} {:>10} {:>11}",
                if i == 0 { w.name } else { "" },
                c.name(),
                fmt_ns(median(v)),
                format!("{}–{}", fmt_ns(lo), fmt_ns(hi)),
                over,
                attached
            );
        }
    }

    let probe_configs: Vec<Config> = plan
        .configs
        .iter()
        .copied()
        .filter(|c| *c != Config::Baseline)
        .collect();
    let sg_configs: Vec<Config> = probe_configs
        .iter()
        .copied()
        .filter(|c| c.floor().is_some_and(|f| plan.configs.contains(&f)))
        .collect();
    let _ = writeln!(
        o,
        "\nTable 2: overhead vs baseline (ns/op, medians), noise = max(2 × the baseline's median absolute deviation, 1% of it); \
stormguard overhead ÷ floor overhead (? = the floor's overhead is within noise, ratio unreliable; — = floor overhead ≤ 0)"
    );
    let mut header = format!("{:<16} {:>8}", "workload", "noise");
    for c in &probe_configs {
        let _ = write!(header, " {:>9}", c.name());
    }
    for c in &sg_configs {
        let label = format!("{}÷{}", c.name(), c.floor().map(Config::name).unwrap_or(""));
        let _ = write!(header, " {label:>16}");
    }
    let _ = writeln!(o, "{header}");
    for w in &plan.workloads {
        let cells = Cells {
            samples,
            workload: w.name,
        };
        let mut row = format!(
            "{:<16} {:>8}",
            w.name,
            cells
                .noise()
                .map(|n| format!("±{}", fmt_ns(n)))
                .unwrap_or_default()
        );
        for c in &probe_configs {
            let cell = cells.overhead(*c).map(fmt_delta).unwrap_or_default();
            let _ = write!(row, " {cell:>9}");
        }
        for c in &sg_configs {
            let cell = VsFloor::new(&cells, *c)
                .map(|v| v.ratio_text())
                .unwrap_or_default();
            let _ = write!(row, " {cell:>16}");
        }
        let _ = writeln!(o, "{row}");
    }

    if !tool_cpu.is_empty() {
        let _ = writeln!(
            o,
            "\nTable 3: CPU time of the tool's own process per op (ns, median): user space only, e.g. stormguard reading the ring buffer; on another CPU than the workload, so not in Table 1 unless CPUs run out"
        );
        let mut header = format!("{:<16}", "workload");
        for c in &probe_configs {
            let _ = write!(header, " {:>9}", c.name());
        }
        let _ = writeln!(o, "{header}");
        for w in &plan.workloads {
            let mut row = format!("{:<16}", w.name);
            for c in &probe_configs {
                let cell = tool_cpu
                    .get(&(*c, w.name))
                    .map(|v| fmt_ns(median(v)))
                    .unwrap_or_default();
                let _ = write!(row, " {cell:>9}");
            }
            let _ = writeln!(o, "{row}");
        }
    }

    let _ = writeln!(o, "\nTargets (printed, never asserted):");
    let getpid = Cells {
        samples,
        workload: "getpid",
    };
    match (getpid.overhead(Config::Sg), getpid.noise()) {
        (Some(d), Some(n)) => {
            let _ = writeln!(
                o,
                "  always-on adds nothing measurable to getpid: {} (sg {} ns/op, noise ±{} ns)",
                if d <= n { "MET" } else { "NOT MET" },
                fmt_delta(d),
                fmt_ns(n)
            );
        }
        _ => {
            let _ = writeln!(
                o,
                "  always-on adds nothing measurable to getpid: not measured (needs getpid, baseline and sg)"
            );
        }
    }
    for c in &sg_configs {
        let mut verdicts = Vec::new();
        let mut all = true;
        for w in &plan.workloads {
            let cells = Cells {
                samples,
                workload: w.name,
            };
            if let Some(v) = VsFloor::new(&cells, *c) {
                all &= v.met;
                verdicts.push(format!(
                    "{} {}{}",
                    w.name,
                    v.ratio_text(),
                    if v.met { "" } else { " (NOT MET)" }
                ));
            }
        }
        let _ = writeln!(
            o,
            "  per-hit cost of {} within 1.5× of {}: {} — {}",
            c.name(),
            c.floor().map(Config::name).unwrap_or(""),
            if all { "MET" } else { "NOT MET" },
            verdicts.join("; ")
        );
    }
    let _ = writeln!(
        o,
        "  (met when stormguard's overhead ≤ 1.5 × the floor's + noise; same hooks, same hits per op, so overhead ratio = per-hit ratio)"
    );
    if plan
        .configs
        .iter()
        .any(|c| matches!(c, Config::Bt | Config::BtOd))
    {
        let _ = writeln!(
            o,
            "note: bpftrace cannot attach cgroup programs, so bt/bt+od lack the {} that sg and floor have ({}).",
            plan.hooks.always_on.iter().filter(|h| is_cgroup(h)).count(),
            plan.hooks
                .always_on
                .iter()
                .filter(|h| is_cgroup(h))
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        );
        if plan.cpu != 0 {
            let _ = writeln!(
                o,
                "note: bpftrace's tracepoint programs return 1, so hits on CPU 0 also build a perf sample (~+500 ns per sys_enter hit here); the workload ran on CPU {}, bpftrace's best case (--cpu 0 shows the other).",
                plan.cpu
            );
        }
    }
    o
}

/// The matrix as a BENCHMARKS.md section: a summary table of overheads
/// and ratios, the targets, the ratios `--check` compares, and the full
/// text tables.
fn matrix_part(plan: &Plan, m: &Measured, text: &str) -> Part {
    use std::fmt::Write as _;
    let mut p = Part::new("Overhead per operation");
    let probe: Vec<Config> = plan
        .configs
        .iter()
        .copied()
        .filter(|c| *c != Config::Baseline)
        .collect();
    let vs_floor: Vec<Config> = probe
        .iter()
        .copied()
        .filter(|c| c.floor().is_some_and(|f| plan.configs.contains(&f)))
        .collect();
    let vs_bt: Vec<Config> = probe
        .iter()
        .copied()
        .filter(|c| c.bpftrace().is_some_and(|b| plan.configs.contains(&b)))
        .collect();
    let _ = writeln!(
        p.body,
        "ns/op added to each workload (median over {} rounds, configurations interleaved) — the configurations are listed in the text below. \
÷floor and ÷bt are stormguard's overhead over the minimal program's and bpftrace's on the same hooks (same hits per op, so per-hit ratios; ? = the denominator is within noise). \
*od attached* is the share of each cell stormguard had its on-demand probes attached.\n",
        plan.rounds
    );
    let mut head = "| workload | baseline ns/op |".to_string();
    let mut rule = "|---|---|".to_string();
    for c in &probe {
        let _ = write!(head, " {} |", c.name());
        rule.push_str("---|");
    }
    for c in &vs_floor {
        let _ = write!(
            head,
            " {}÷{} |",
            c.name(),
            c.floor().map(Config::name).unwrap_or("")
        );
        rule.push_str("---|");
    }
    for c in &vs_bt {
        let _ = write!(
            head,
            " {}÷{} |",
            c.name(),
            c.bpftrace().map(Config::name).unwrap_or("")
        );
        rule.push_str("---|");
    }
    let attached: Vec<Config> = probe
        .iter()
        .copied()
        .filter(|c| c.is_stormguard())
        .collect();
    for c in &attached {
        let _ = write!(head, " od attached {} |", c.name());
        rule.push_str("---|");
    }
    let _ = writeln!(p.body, "{head}\n{rule}");
    for w in &plan.workloads {
        let cells = Cells {
            samples: &m.samples,
            workload: w.name,
        };
        let Some(base) = cells.median(Config::Baseline) else {
            continue;
        };
        let noise = cells.noise().unwrap_or(0.0);
        let mut row = format!("| {} | {} |", w.name, fmt_ns(base));
        for c in &probe {
            let cell = cells
                .overhead(*c)
                .map(|d| {
                    let (lo, hi) = min_max(cells.get(*c).map(Vec::as_slice).unwrap_or(&[]));
                    format!(
                        "{} ({}–{})",
                        fmt_delta(d),
                        fmt_delta(lo - base),
                        fmt_delta(hi - base)
                    )
                })
                .unwrap_or_default();
            let _ = write!(row, " {cell} |");
            if c.is_stormguard()
                && let Some(med) = cells.median(*c)
            {
                p.ratios.insert(
                    format!("overhead.{}.{}÷baseline", w.name, c.name()),
                    med / base,
                );
            }
        }
        for c in &vs_floor {
            let v = VsFloor::new(&cells, *c);
            let _ = write!(
                row,
                " {} |",
                v.as_ref().map(VsFloor::ratio_text).unwrap_or_default()
            );
            // Gated only when both overheads stand out of the noise: a
            // ratio of two differences near zero swings in sign and size.
            if let Some(VsFloor {
                ratio: Some(r),
                shaky: false,
                ..
            }) = v
                && cells.overhead(*c).is_some_and(|d| d > noise)
            {
                p.ratios.insert(
                    format!(
                        "overhead.{}.{}÷{}",
                        w.name,
                        c.name(),
                        c.floor().map(Config::name).unwrap_or("")
                    ),
                    r,
                );
            }
        }
        for c in &vs_bt {
            let b = c.bpftrace().unwrap_or(Config::Bt);
            let cell = match (cells.overhead(*c), cells.overhead(b)) {
                (Some(s), Some(t)) if t > 0.0 => {
                    let shaky = t <= noise;
                    if !shaky && s > noise {
                        p.ratios.insert(
                            format!("overhead.{}.{}÷{}", w.name, c.name(), b.name()),
                            s / t,
                        );
                    }
                    format!("{:.2}×{}", s / t, if shaky { "?" } else { "" })
                }
                _ => "—".into(),
            };
            let _ = write!(row, " {cell} |");
        }
        for c in &attached {
            let cell = m
                .attached
                .get(&(*c, w.name))
                .map(|a| format!("{:.0}%", median(a) * 100.0))
                .unwrap_or_default();
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(p.body, "{row}");
    }

    // Targets.
    let getpid = Cells {
        samples: &m.samples,
        workload: "getpid",
    };
    if let (Some(d), Some(n)) = (getpid.overhead(Config::Sg), getpid.noise()) {
        p.target(
            "always-on adds nothing measurable to getpid",
            d <= n,
            format!("sg {} ns/op, noise ±{} ns", fmt_delta(d), fmt_ns(n)),
        );
    }
    for c in &vs_floor {
        let mut all = true;
        let mut figures = Vec::new();
        for w in &plan.workloads {
            let cells = Cells {
                samples: &m.samples,
                workload: w.name,
            };
            if let Some(v) = VsFloor::new(&cells, *c) {
                all &= v.met;
                figures.push(format!(
                    "{} {}{}",
                    w.name,
                    v.ratio_text(),
                    if v.met { "" } else { " (missed)" }
                ));
            }
        }
        p.target(
            &format!(
                "{} ≤ 1.5× the minimal program ({}) per hit, every workload",
                c.name(),
                c.floor().map(Config::name).unwrap_or("")
            ),
            all,
            figures.join("; "),
        );
    }
    for c in &vs_bt {
        let b = c.bpftrace().unwrap_or(Config::Bt);
        let mut all = true;
        let mut figures = Vec::new();
        for w in &plan.workloads {
            let cells = Cells {
                samples: &m.samples,
                workload: w.name,
            };
            if let (Some(s), Some(t), Some(n)) =
                (cells.overhead(*c), cells.overhead(b), cells.noise())
            {
                let met = s <= t.max(0.0) / 3.0 + n;
                all &= met;
                figures.push(format!(
                    "{} {} vs {}{}",
                    w.name,
                    fmt_delta(s),
                    fmt_delta(t),
                    if met { "" } else { " (missed)" }
                ));
            }
        }
        p.target(
            &format!("{} ≤ 1/3 of bpftrace ({}) per hit, every workload", c.name(), b.name()),
            all,
            format!(
                "ns/op overheads {}; bpftrace lacks the {} cgroup hooks, so it has fewer hits per op",
                figures.join("; "),
                plan.hooks.always_on.iter().filter(|h| is_cgroup(h)).count()
            ),
        );
    }
    let _ = writeln!(p.body, "\n```text{}```", text);
    p
}

/// Every sample, for a closer look or a plot.
fn write_raw(
    path: &Path,
    plan: &Plan,
    samples: &Samples,
    tool_cpu: &Samples,
) -> anyhow::Result<()> {
    let cells: Vec<serde_json::Value> = samples
        .iter()
        .map(|(key, v)| {
            serde_json::json!({
                "config": key.0.name(),
                "workload": key.1,
                "ns_per_op": v,
                "tool_cpu_ns_per_op": tool_cpu.get(key),
            })
        })
        .collect();
    let doc = serde_json::json!({
        "rounds": plan.rounds,
        "ops_scale": plan.ops_scale,
        "max_secs": plan.max_secs,
        "cpu": plan.cpu,
        "cells": cells,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stormguards_hook_line() {
        let line = "stormguard: watching; always-on hooks: tracepoint sock:inet_sock_set_state, cgroup/connect4; \
on-demand (always): raw_syscalls:sys_enter, syscalls:sys_exit_connect";
        let (always_on, on_demand) = parse_watching(line).expect("parses");
        assert_eq!(always_on, ["sock:inet_sock_set_state", "cgroup/connect4"]);
        assert_eq!(
            on_demand,
            ["raw_syscalls:sys_enter", "syscalls:sys_exit_connect"]
        );
        let hooks = Hooks {
            always_on,
            on_demand,
            ..Default::default()
        };
        assert_eq!(
            hooks.bpftrace_probes(false),
            "tracepoint:sock:inet_sock_set_state"
        );
        assert_eq!(
            hooks.bpftrace_probes(true),
            "tracepoint:sock:inet_sock_set_state, tracepoint:raw_syscalls:sys_enter, \
tracepoint:syscalls:sys_exit_connect"
        );
    }

    #[test]
    fn a_floor_missing_a_hook_is_reported() {
        let hooks = Hooks {
            always_on: vec!["a:b".into(), "cgroup/connect4".into()],
            on_demand: vec!["c:d".into()],
            floor: vec!["a:b".into()],
            floor_od: vec!["a:b".into(), "cgroup/connect4".into(), "c:d".into()],
        };
        assert_eq!(
            hooks.floor_mismatch().as_deref(),
            Some("floor lacks [cgroup/connect4] and has extra []")
        );
        let line = "sgbench: floor ready; attached: a:b, cgroup/connect4";
        assert_eq!(
            parse_floor_ready(line).expect("parses"),
            ["a:b", "cgroup/connect4"]
        );
    }

    #[test]
    fn sections_run_unless_one_is_named_alone() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            sections: Sections,
        }
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
                .expect("parses")
                .sections
        };
        let all = parse(&[]);
        assert!(all.runs("matrix") && all.runs("burst") && all.complete());
        let only = parse(&["--enforce", "--latency"]);
        assert!(only.runs("enforce") && only.runs("latency"));
        assert!(!only.runs("matrix") && !only.runs("stacks") && !only.complete());
        let skip = parse(&["--stacks", "skip"]);
        assert!(skip.runs("matrix") && !skip.runs("stacks") && !skip.complete());
    }

    #[test]
    fn a_sections_ratios_line_is_taken_out_of_its_table() {
        let out = "table\nsgbench-ratios {\"enforce.w.tokens÷none\":1.25}\nlast\n";
        let (text, ratios) = split_ratios(out).expect("parses");
        assert_eq!(text, "table\nlast\n");
        assert_eq!(ratios["enforce.w.tokens÷none"], 1.25);
        assert!(split_ratios("sgbench-ratios {oops").is_err());
    }

    #[test]
    fn on_demand_time_is_clipped_to_the_cell() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        // Attached 100–300 and from 500 on; the cell is 200–600.
        let events = [(at(100), true), (at(300), false), (at(500), true)];
        assert_eq!(
            on_demand_between(&events, at(200), at(600)),
            Duration::from_millis(200)
        );
        assert_eq!(on_demand_between(&[], at(0), at(600)), Duration::ZERO);
    }

    #[test]
    fn one_disturbed_round_does_not_hide_a_difference() {
        let mut samples = Samples::new();
        // Baseline with one outlier round; the floor adds 100, sg 400.
        samples.insert(
            (Config::Baseline, "w"),
            vec![1000.0, 1010.0, 990.0, 1005.0, 3000.0],
        );
        samples.insert(
            (Config::Floor, "w"),
            vec![1105.0, 1100.0, 1110.0, 1095.0, 1100.0],
        );
        samples.insert(
            (Config::Sg, "w"),
            vec![1405.0, 1400.0, 1410.0, 1395.0, 1400.0],
        );
        let cells = Cells {
            samples: &samples,
            workload: "w",
        };
        assert_eq!(median(&samples[&(Config::Baseline, "w")]), 1005.0);
        let noise = cells.noise().expect("baseline present");
        assert!(noise < 50.0, "noise {noise}");
        let v = VsFloor::new(&cells, Config::Sg).expect("all cells present");
        assert!(!v.shaky);
        assert!(!v.met);
        assert_eq!(v.ratio_text(), "4.16×"); // (1400 − 1005) ÷ (1100 − 1005)
    }
}
