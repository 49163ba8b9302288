//! The `stormguard` command.
use std::process::ExitCode;

use clap::Parser as _;
use stormguard::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stormguard: {e:#}");
            ExitCode::from(cli::exit_code(&e))
        }
    }
}
