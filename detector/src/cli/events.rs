//! `stormguard events --follow`: verdict changes as they happen.
use clap::Args;

use super::client::ClientArgs;
use crate::detect::VerdictChange;

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing changes as they happen (the only mode so far; the
    /// history of storms is `stormguard incidents`).
    #[arg(long, required = true)]
    pub follow: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

pub fn run(args: EventsArgs) -> anyhow::Result<()> {
    let json = args.client.json;
    let mut failed = None;
    args.client.connect()?.follow(|v| {
        let r = if json {
            super::write_stdout(&format!("{v}\n"))
        } else {
            match serde_json::from_value::<VerdictChange>(v.clone()) {
                Ok(c) => super::record::print_change(&c, false),
                Err(_) => super::write_stdout(&format!("{v}\n")),
            }
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                failed = Some(e);
                false
            }
        }
    })?;
    failed.map_or(Ok(()), Err)
}
