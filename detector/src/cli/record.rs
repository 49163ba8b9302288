//! `stormguard record FILE`: run the sensors and the engine, write every
//! observation and tick to FILE, print verdict changes as they happen.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use super::EngineArgs;
use crate::{detect::VerdictChange, pipeline::OnDemand};

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// Where to write the recording (JSON lines).
    pub file: PathBuf,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    pub duration: Option<u64>,
    /// Print verdict changes as JSON.
    #[arg(long)]
    pub json: bool,
    /// When to attach the on-demand syscall probes.
    #[arg(long, value_enum, default_value_t = OnDemand::Auto)]
    pub on_demand: OnDemand,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub async fn run(args: RecordArgs) -> anyhow::Result<()> {
    let file = crate::record::create_private(&args.file)
        .with_context(|| format!("cannot create {}", args.file.display()))?;
    let out = Box::new(std::io::BufWriter::new(file));
    let json = args.json;
    crate::service::drive(
        crate::service::Options {
            config: args.engine.load()?,
            interval_ms: 1000,
            duration: args.duration,
            on_demand: args.on_demand,
            probe_max_secs: 60,
            record: Some(out),
            on_ready: None,
        },
        move |_, changes| {
            for c in changes {
                print_change(c, json)?;
            }
            Ok(())
        },
        |_, _, _| Ok(()),
    )
    .await
}

/// A verdict change, as a line of text or JSON (flushed at once: a
/// reader follows it live).
pub fn print_change(c: &VerdictChange, json: bool) -> anyhow::Result<()> {
    let line = if json {
        serde_json::to_string(c)?
    } else {
        format!(
            "{:>10.3}s {:<10} → {:<10} score {:>3}  {}",
            c.ts_ns as f64 / 1e9,
            c.from.as_str(),
            c.to.as_str(),
            c.score,
            c.explanation
        )
    };
    super::write_stdout(&(line + "\n"))
}
