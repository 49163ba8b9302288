//! `stormguard daemon`.
use std::path::PathBuf;

use clap::Args;

#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Configuration file (default: /etc/stormguard/config.toml if present).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

pub async fn run(args: DaemonArgs) -> anyhow::Result<()> {
    crate::daemon::run(args.config.as_deref()).await
}
