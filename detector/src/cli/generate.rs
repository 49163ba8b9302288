//! `stormguard generate man DIR` and `stormguard generate completions DIR`
//! (hidden): the man pages and shell completions the .deb ships
//! (`cargo xtask package`).
//!
//! They are made by the binary itself from its own clap command, so they
//! list exactly the subcommands and options this build has, and xtask can
//! make them without depending on this crate (which needs the eBPF
//! toolchain to build).
use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Subcommand};
use clap_complete::Shell;

use super::Cli;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(subcommand)]
    pub command: GenerateCommand,
}

#[derive(Debug, Subcommand)]
pub enum GenerateCommand {
    /// Write stormguard.1 and stormguard-<subcommand>.1 (every visible
    /// subcommand, nested ones too) into DIR, uncompressed.
    Man { dir: PathBuf },
    /// Write the bash (stormguard.bash), zsh (_stormguard) and fish
    /// (stormguard.fish) completions into DIR.
    Completions { dir: PathBuf },
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let written = match args.command {
        GenerateCommand::Man { dir } => man(&dir)?,
        GenerateCommand::Completions { dir } => completions(&dir)?,
    };
    let mut text = String::new();
    for path in written {
        text.push_str(&format!("{}\n", path.display()));
    }
    super::write_stdout(&text)
}

/// Writes the man pages into `dir` (created if missing) and returns their
/// paths. Hidden subcommands (this one) get no page, as with
/// `clap_mangen::generate_to`, whose walk this is; each page's footer names
/// stormguard and its version (clap_mangen's would name the subcommand,
/// without version).
pub fn man(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fn pages(
        cmd: clap::Command,
        dir: &Path,
        source: &str,
        out: &mut Vec<PathBuf>,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            pages(sub, dir, source, out)?;
        }
        out.push(clap_mangen::Man::new(cmd).source(source).generate_to(dir)?);
        Ok(())
    }
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // Built once from the root: names become "stormguard-config-check".
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("stormguard {}", env!("CARGO_PKG_VERSION"));
    let mut written = Vec::new();
    pages(cmd, dir, &source, &mut written)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))?;
    written.sort();
    Ok(written)
}

/// Writes the bash, zsh and fish completions into `dir` (created if
/// missing) and returns their paths.
pub fn completions(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = public_command();
    [Shell::Bash, Shell::Zsh, Shell::Fish]
        .into_iter()
        .map(|shell| {
            clap_complete::generate_to(shell, &mut cmd, "stormguard", dir).with_context(|| {
                format!(
                    "cannot write the {shell} completions into {}",
                    dir.display()
                )
            })
        })
        .collect()
}

/// The command without its hidden subcommands: clap_complete, unlike
/// clap_mangen and the help, completes hidden subcommands too, and clap
/// cannot remove a subcommand, so this is a copy of the root with only the
/// visible ones (its help is the same as the real one's; a test checks).
fn public_command() -> clap::Command {
    let full = Cli::command();
    // Name and version as `#[command(name = "stormguard", version)]` sets
    // them (clap takes only static strings there).
    let mut public = clap::Command::new("stormguard")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(full.is_subcommand_required_set())
        .arg_required_else_help(full.is_arg_required_else_help_set())
        .args(full.get_arguments().cloned())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(about) = full.get_about() {
        public = public.about(about.clone());
    }
    if let Some(about) = full.get_long_about() {
        public = public.long_about(about.clone());
    }
    public
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One page per visible subcommand, nested ones included, and none for
    /// the hidden `generate`: the package's file list depends on it.
    #[test]
    fn man_pages_for_every_visible_subcommand() {
        let dir = std::env::temp_dir().join(format!("sg-generate-man-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let written = man(&dir).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        let cmd = Cli::command();
        let mut expected = vec!["stormguard.1".to_string()];
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            expected.push(format!("stormguard-{}.1", sub.get_name()));
            for nested in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
                if nested.get_name() != "help" {
                    expected.push(format!(
                        "stormguard-{}-{}.1",
                        sub.get_name(),
                        nested.get_name()
                    ));
                }
            }
        }
        expected.sort();
        assert_eq!(names, expected);
        assert!(names.contains(&"stormguard-config-check.1".to_string()));
        assert!(!names.iter().any(|n| n.contains("generate")));
        let page = fs::read_to_string(dir.join("stormguard-config-check.1")).unwrap();
        assert!(page.contains(&format!("stormguard {}", env!("CARGO_PKG_VERSION"))));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn completions_for_three_shells_without_the_hidden_command() {
        let dir = std::env::temp_dir().join(format!("sg-generate-compl-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let written = completions(&dir).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["_stormguard", "stormguard.bash", "stormguard.fish"]);
        for name in &names {
            let text = fs::read_to_string(dir.join(name)).unwrap();
            for sub in Cli::command().get_subcommands() {
                assert_eq!(
                    text.contains(sub.get_name()),
                    !sub.is_hide_set(),
                    "{name}: {}",
                    sub.get_name()
                );
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// The copy the completions are made from says what the real command
    /// says, short and long help, errors on a missing subcommand included.
    #[test]
    fn public_command_is_the_real_one_without_hidden_subcommands() {
        let mut full = Cli::command();
        let mut public = public_command();
        assert_eq!(
            public.render_long_help().to_string(),
            full.render_long_help().to_string()
        );
        assert_eq!(
            public.render_help().to_string(),
            full.render_help().to_string()
        );
        assert_eq!(public.get_name(), full.get_name());
        assert_eq!(public.render_version(), full.render_version());
        let kind = |c: clap::Command| c.try_get_matches_from(["stormguard"]).unwrap_err().kind();
        assert_eq!(kind(public_command()), kind(Cli::command()));
        let visible = |c: &clap::Command| {
            c.get_subcommands()
                .filter(|s| !s.is_hide_set())
                .map(|s| s.get_name().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(visible(&public), visible(&full));
        assert!(public.find_subcommand("generate").is_none());
        assert!(full.find_subcommand("generate").is_some());
    }
}
