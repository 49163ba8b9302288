//! `stormguard config check [PATH]` and `stormguard config show`.
use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::{config::Config, daemon::config_path};

#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a configuration file (default: /etc/stormguard/config.toml).
    Check { path: Option<PathBuf> },
    /// Print the effective configuration, every field, as TOML.
    Show {
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
    },
}

pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Check { path } => {
            let path = path.unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH));
            Config::load(Some(&path))?;
            super::write_stdout(&format!("{}: ok\n", path.display()))?;
        }
        ConfigCommand::Show { config } => {
            let path = config_path(config.as_deref());
            let cfg = Config::load(path.as_deref())?;
            let head = match &path {
                Some(p) => format!("# effective configuration: {} plus defaults", p.display()),
                None => "# effective configuration: defaults (no config file)".into(),
            };
            super::write_stdout(&format!("{head}\n{}", cfg.to_toml()))?;
        }
    }
    Ok(())
}
