//! The `stormguard` command.
use std::{io::Write as _, process::ExitCode};

use clap::Parser as _;
use stormguard::cli::{self, Cli};

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    cli::init_logging();
    match cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if cli::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // Even a closed stderr must not turn a failure into a panic.
            let _ = writeln!(std::io::stderr(), "stormguard: {}", cli::one_line(&e));
            ExitCode::from(cli::exit_code(&e))
        }
    }
}

/// A backstop for output still written with `println!` (which panics when
/// the reader of a pipe has gone): that one panic ends the process quietly
/// with status 0, as [`cli::write_stdout`] does for the commands that use
/// it. Every other panic is reported as usual.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.starts_with("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info);
    }));
}
