//! `stormguard replay FILE`: verdicts from a recording, no kernel needed.
use std::{fs::File, io::BufReader, path::PathBuf};

use anyhow::Context as _;
use clap::Args;

use super::EngineArgs;
use crate::record;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// A recording made by `stormguard record`.
    pub file: PathBuf,
    /// One JSON object per verdict change.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let cfg = args.engine.load()?;
    let file = File::open(&args.file)
        .with_context(|| format!("cannot open recording {}", args.file.display()))?;
    let changes = record::replay(BufReader::new(file), cfg.detect)
        .with_context(|| format!("replaying {}", args.file.display()))?;
    for c in &changes {
        super::record::print_change(c, args.json)?;
    }
    Ok(())
}
