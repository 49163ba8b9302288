//! `cargo xtask package [--check]`: the Debian package, built with cargo-deb
//! from `[package.metadata.deb]` in detector/Cargo.toml.
//!
//! The man pages and shell completions are made by the release binary
//! itself (`stormguard generate`, hidden) so that xtask does not depend on
//! the detector crate (which needs the eBPF toolchain to build).
//!
//! `--check` (also the `package` stage of `cargo xtask test`) checks the
//! .deb's file list and control fields, runs lintian, and installs,
//! reinstalls, removes and purges it in a throwaway Debian root made with
//! mmdebstrap (the download is cached under target/).
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::{
    install::target_dir,
    setup::{Env, is_root, output},
    tasks::{ensure_packages, status},
};

/// The Debian package's name (`[package.metadata.deb] name`).
const NAME: &str = "stormguard";
/// The cargo-deb release used when none is installed: known to build with
/// the workspace's rustc (1.95) and to produce what the check expects.
const CARGO_DEB_VERSION: &str = "3.8.0";
/// The Debian release the package is installed into: the oldest the
/// project supports, so a build host with a newer glibc is caught here.
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";
/// The conffile, the unit and the binary, as installed.
const CONFIG: &str = "etc/stormguard/config.toml";
const UNIT: &str = "usr/lib/systemd/system/stormguard.service";
const BINARY: &str = "usr/bin/stormguard";
/// The incident database's directory (the unit's StateDirectory=), which
/// purge must remove.
const STATE_DIR: &str = "var/lib/stormguard";
/// Where the systemd stand-ins in the Debian root log their calls.
const SYSTEMD_LOG: &str = "/tmp/systemd-calls";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Where the generated man pages and completions go and the .deb is
/// written. Always the workspace's own target/ (not CARGO_TARGET_DIR):
/// cargo-deb's asset paths in detector/Cargo.toml are fixed strings.
fn package_dir() -> PathBuf {
    workspace().join("target/package")
}

/// `cargo xtask package [--check]`.
pub fn run(env: &Env, check: bool) -> anyhow::Result<()> {
    if check {
        // Fail before a minute of building, not after.
        if !is_root() {
            bail!(
                "package --check installs the .deb into a throwaway Debian root (mmdebstrap, \
                 chroot, mount -t proc): run it as root, e.g. \
                 sudo -E env PATH=\"$PATH\" cargo xtask package --check \
                 (`cargo xtask package` alone builds the .deb without root)"
            );
        }
        ensure_tools()?;
    } else {
        ensure_cargo_deb()?;
    }
    let deb = build(env)?;
    if check {
        self::check(&deb)?;
    }
    println!("xtask: package {}", deb.display());
    Ok(())
}

/// What `--check` needs (the `tools` stage of `cargo xtask test` installs
/// them too): the Debian tools with apt-get, cargo-deb with cargo install.
pub fn ensure_tools() -> anyhow::Result<()> {
    ensure_packages(&[
        ("lintian", "lintian"),
        ("mmdebstrap", "mmdebstrap"),
        ("dpkg-deb", "dpkg"),
    ])?;
    ensure_cargo_deb()
}

/// Installs cargo-deb (pinned) when `cargo deb` is not there.
fn ensure_cargo_deb() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["deb", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if installed {
        return Ok(());
    }
    println!("xtask: installing cargo-deb {CARGO_DEB_VERSION} (once)");
    status(Command::new("cargo").args([
        "install",
        "cargo-deb",
        "--locked",
        "--version",
        CARGO_DEB_VERSION,
    ]))
    .context("cannot install cargo-deb; install it with: cargo install cargo-deb --locked")
}

/// Builds release, generates the man pages and completions, and runs
/// cargo-deb; returns the .deb's path.
fn build(env: &Env) -> anyhow::Result<PathBuf> {
    crate::tasks::build(env, true)?;
    let binary = target_dir().join("release/stormguard");
    let dir = package_dir();
    for sub in ["man", "completions"] {
        let out = dir.join(sub);
        remove_dir_if_present(&out)?;
        // Prints the files it wrote.
        status(Command::new(&binary).args(["generate", sub]).arg(&out))
            .with_context(|| format!("{} could not generate the {sub} files", binary.display()))?;
    }
    // A .deb of an earlier version would linger beside the new one.
    if dir.is_dir() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "deb") {
                fs::remove_file(&path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
            }
        }
    }
    // --no-build: package the binary built above (by the same command as
    // every other task), the one that generated the man pages and
    // completions, not a second build with cargo-deb's own flags.
    // --strip: the release profile keeps line tables (for profiling and
    // backtraces); Debian wants installed binaries stripped (lintian:
    // unstripped-binary-or-object).
    let out = output(
        env.cargo()
            .args(["deb", "-p", "detector", "--no-build", "--strip", "--output"])
            .arg(&dir)
            .current_dir(workspace()),
    )
    .context("cargo deb failed")?;
    let deb = out
        .lines()
        .map(str::trim)
        .rfind(|l| l.ends_with(".deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo deb named no .deb in its output: {out}"))?;
    if !deb.is_file() {
        bail!(
            "cargo deb said it wrote {}, which does not exist",
            deb.display()
        );
    }
    Ok(deb)
}

fn remove_dir_if_present(dir: &Path) -> anyhow::Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

/// Every check of the package; the first failure ends it with what failed.
fn check(deb: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let binary = target_dir().join("release/stormguard");
    let files = check_file_list(deb, &binary)?;
    check_control(deb)?;
    lintian(deb)?;
    check_in_debian_root(deb)?;
    println!("xtask: files in {}:", deb.display());
    for f in &files {
        println!("  /{f}");
    }
    println!(
        "xtask: package checked in {:.1} s: {} files, control fields, lintian, install, \
         reinstall, remove and purge in Debian {SUITE}",
        started.elapsed().as_secs_f64(),
        files.len()
    );
    Ok(())
}

/// The paths the package must contain (directories aside). The man pages
/// follow the built binary's `--help` (every listed subcommand, nested
/// ones too), not the generator: a subcommand without a page fails here.
fn expected_files(binary: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut files: BTreeSet<String> = [
        BINARY,
        UNIT,
        CONFIG,
        "usr/share/doc/stormguard/copyright",
        "usr/share/doc/stormguard/changelog.Debian.gz",
        "usr/share/bash-completion/completions/stormguard",
        "usr/share/zsh/vendor-completions/_stormguard",
        "usr/share/fish/vendor_completions.d/stormguard.fish",
        "usr/share/man/man1/stormguard.1.gz",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for path in subcommands(binary, &[])? {
        files.insert(format!(
            "usr/share/man/man1/stormguard-{}.1.gz",
            path.join("-")
        ));
    }
    Ok(files)
}

/// Every subcommand path (`["config", "check"]`) under `prefix`, read from
/// the "Commands:" sections of the binary's help.
fn subcommands(binary: &Path, prefix: &[String]) -> anyhow::Result<Vec<Vec<String>>> {
    let help = output(Command::new(binary).args(prefix).arg("--help"))
        .with_context(|| format!("cannot get the help of stormguard {}", prefix.join(" ")))?;
    let mut found = Vec::new();
    let mut in_commands = false;
    for line in help.lines() {
        if line == "Commands:" {
            in_commands = true;
            continue;
        }
        if !in_commands {
            continue;
        }
        // A blank line or a new heading ends the section; descriptions
        // that wrap are indented further than the names.
        if line.trim().is_empty() || !line.starts_with("  ") {
            break;
        }
        if line.starts_with("   ") {
            continue;
        }
        let name = line.split_whitespace().next().unwrap_or_default();
        if name == "help" {
            continue;
        }
        let mut path = prefix.to_vec();
        path.push(name.to_string());
        found.extend(subcommands(binary, &path)?);
        found.push(path);
    }
    if prefix.is_empty() && found.is_empty() {
        bail!("`{} --help` lists no subcommands", binary.display());
    }
    Ok(found)
}

/// `dpkg-deb -c`: every expected path present, the binary executable,
/// no man page for a subcommand the binary does not list; and the config
/// is a conffile. Returns the package's files (without directories).
fn check_file_list(deb: &Path, binary: &Path) -> anyhow::Result<Vec<String>> {
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(deb))?;
    let mut files = Vec::new();
    let mut modes = std::collections::BTreeMap::new();
    for line in listing.lines() {
        // drwxr-xr-x 0/0 0 2026-12-07 00:00 ./usr/share/
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(mode), Some(path)) = (fields.first(), fields.get(5)) else {
            bail!("unexpected line in dpkg-deb -c: {line}");
        };
        let path = path.trim_start_matches("./").to_string();
        if path.is_empty() || path.ends_with('/') {
            continue;
        }
        modes.insert(path.clone(), mode.to_string());
        files.push(path);
    }
    let expected = expected_files(binary)?;
    let missing: Vec<&String> = expected
        .iter()
        .filter(|p| !modes.contains_key(*p))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks {missing:?} (assets in detector/Cargo.toml, or `stormguard generate`)",
            deb.display()
        );
    }
    let extra_pages: Vec<&String> = files
        .iter()
        .filter(|p| p.starts_with("usr/share/man/") && !expected.contains(*p))
        .collect();
    if !extra_pages.is_empty() {
        bail!(
            "{} has man pages for no listed subcommand: {extra_pages:?}",
            deb.display()
        );
    }
    if modes[BINARY] != "-rwxr-xr-x" {
        bail!("/{BINARY} has mode {}, expected -rwxr-xr-x", modes[BINARY]);
    }
    let conffiles = output(Command::new("dpkg-deb").arg("-I").arg(deb).arg("conffiles"))
        .context("the package has no conffiles")?;
    if !conffiles.lines().any(|l| l.trim() == format!("/{CONFIG}")) {
        bail!("/{CONFIG} is not a conffile (conffiles: {conffiles:?})");
    }
    println!(
        "xtask: {} has all {} expected files ({} man pages), /{CONFIG} a conffile",
        deb.display(),
        expected.len(),
        expected
            .iter()
            .filter(|p| p.starts_with("usr/share/man/"))
            .count()
    );
    Ok(files)
}

/// `dpkg-deb -f`: name, version (the workspace's, plus a Debian revision),
/// this machine's architecture, a dependency list, a maintainer.
fn check_control(deb: &Path) -> anyhow::Result<()> {
    let field = |name: &str| -> anyhow::Result<String> {
        Ok(
            output(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name))?
                .trim()
                .to_string(),
        )
    };
    let package = field("Package")?;
    if package != NAME {
        bail!("Package: {package:?}, expected {NAME:?}");
    }
    let version = field("Version")?;
    let workspace_version = env!("CARGO_PKG_VERSION");
    let upstream = version
        .rsplit_once('-')
        .map_or(version.as_str(), |(u, _)| u);
    if upstream != workspace_version {
        bail!(
            "Version: {version:?}, expected the workspace's {workspace_version} (plus -REVISION)"
        );
    }
    let arch = field("Architecture")?;
    let host_arch = output(Command::new("dpkg").arg("--print-architecture"))?;
    if arch != host_arch.trim() {
        bail!("Architecture: {arch:?}, expected {:?}", host_arch.trim());
    }
    let depends = field("Depends")?;
    if !depends.contains("libc6") {
        bail!("Depends: {depends:?} lacks libc6 (cargo-deb's $auto)");
    }
    let maintainer = field("Maintainer")?;
    if !(maintainer.contains('<') && maintainer.ends_with('>')) {
        bail!("Maintainer: {maintainer:?} is not `Name <address>`");
    }
    println!(
        "xtask: control: Package {package}, Version {version}, Architecture {arch}, \
         Depends {depends}, Maintainer {maintainer}"
    );
    Ok(())
}

/// lintian with no error-level tag (warnings are printed, not fatal).
fn lintian(deb: &Path) -> anyhow::Result<()> {
    status(
        Command::new("lintian")
            .args(["--fail-on", "error", "--display-info"])
            .arg(deb),
    )
    .context("lintian found errors in the package (tags above)")
}

/// A Debian root extracted fresh from the cached mmdebstrap tarball, with
/// /proc mounted; unmounted and removed when dropped (also on failure). A
/// root left by a killed run is cleaned when the next one starts.
struct DebianRoot {
    dir: PathBuf,
}

impl DebianRoot {
    fn new(tarball: &Path) -> anyhow::Result<Self> {
        let dir = tarball.with_file_name("root");
        clean_root(&dir)?;
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let root = DebianRoot { dir };
        status(
            Command::new("tar")
                .arg("-C")
                .arg(&root.dir)
                .args(["--same-owner", "-xpf"])
                .arg(tarball),
        )
        .context("cannot extract the Debian root")?;
        status(
            Command::new("mount")
                .args(["-t", "proc", "proc"])
                .arg(root.dir.join("proc")),
        )
        .context("cannot mount /proc in the Debian root")?;
        Ok(root)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// A command run inside the root with a clean environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.dir)
            .args(args)
            .env_clear()
            // /usr/local first: the systemd stand-ins.
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        c
    }

    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        status(&mut self.command(args))
    }

    fn output(&self, args: &[&str]) -> anyhow::Result<String> {
        output(&mut self.command(args))
    }

    fn has_group(&self) -> bool {
        self.command(&["getent", "group", NAME])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Puts logging stand-ins for `systemctl` and `deb-systemd-invoke`
    /// first on PATH: the maintainer scripts' service actions can be
    /// checked (and whether the group existed when the daemon was started)
    /// without a running systemd.
    fn install_systemd_stand_ins(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = self.path("usr/local/sbin");
        fs::create_dir_all(&dir)?;
        for name in ["systemctl", "deb-systemd-invoke"] {
            let path = dir.join(name);
            fs::write(
                &path,
                format!(
                    "#!/bin/sh\n# Stand-in by cargo xtask package --check: logs the call.\n\
                     g=no; getent group {NAME} >/dev/null && g=yes\n\
                     echo \"{name} $* group=$g\" >>{SYSTEMD_LOG}\n"
                ),
            )
            .with_context(|| format!("cannot write {}", path.display()))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    }

    /// The stand-ins' calls since the last call of this (which empties the
    /// log).
    fn take_systemd_calls(&self) -> anyhow::Result<Vec<String>> {
        let log = self.path(SYSTEMD_LOG.trim_start_matches('/'));
        let text = match fs::read_to_string(&log) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", log.display())),
        };
        let _ = fs::remove_file(&log);
        Ok(text.lines().map(String::from).collect())
    }

    /// dpkg's status of the package ("install ok installed", ...), or None
    /// when dpkg does not know it.
    fn dpkg_status(&self) -> Option<String> {
        self.output(&["dpkg-query", "-W", "-f=${Status}", NAME])
            .ok()
            .map(|s| s.trim().to_string())
    }
}

impl Drop for DebianRoot {
    fn drop(&mut self) {
        if let Err(e) = clean_root(&self.dir) {
            eprintln!("xtask: {e:#}");
        }
    }
}

/// Unmounts whatever is mounted under `dir` (deepest first), then removes
/// it. Never removes while something is still mounted: removing through a
/// mount would reach outside the root.
fn clean_root(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let canonical =
        fs::canonicalize(dir).with_context(|| format!("cannot resolve {}", dir.display()))?;
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    let mut under: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(&canonical))
        .collect();
    under.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in &under {
        status(Command::new("umount").arg(m)).with_context(|| {
            format!(
                "cannot unmount {}; left {} in place",
                m.display(),
                dir.display()
            )
        })?;
    }
    fs::remove_dir_all(dir).with_context(|| format!("cannot remove {}", dir.display()))
}

/// The cached minimal Debian root (a tarball), made once with mmdebstrap.
fn debian_tarball() -> anyhow::Result<PathBuf> {
    let cache = target_dir().join("package-check");
    fs::create_dir_all(&cache).with_context(|| format!("cannot create {}", cache.display()))?;
    let tarball = cache.join(format!("debian-{SUITE}-minbase.tar"));
    if tarball.is_file() {
        return Ok(tarball);
    }
    println!(
        "xtask: making a minimal Debian {SUITE} root with mmdebstrap (once; cached in {})",
        tarball.display()
    );
    let part = tarball.with_extension("tar.part");
    let made = status(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--format=tar", SUITE])
            .arg(&part)
            .arg(MIRROR)
            .stdin(Stdio::null()),
    )
    .with_context(|| {
        format!("mmdebstrap could not make a Debian {SUITE} root (needs root and {MIRROR})")
    })
    .and_then(|()| {
        fs::rename(&part, &tarball).with_context(|| format!("cannot rename {}", part.display()))
    });
    if made.is_err() {
        let _ = fs::remove_file(&part);
    }
    made.map(|()| tarball)
}

/// The package's life in a fresh Debian root: first as in a chroot or
/// container (no systemd running: the service must be left alone), then
/// with systemd seemingly running (the service must be started, restarted
/// and stopped).
fn check_in_debian_root(deb: &Path) -> anyhow::Result<()> {
    let tarball = debian_tarball()?;
    let root = DebianRoot::new(&tarball)?;
    let inside = "/tmp/stormguard.deb";
    fs::copy(deb, root.path(inside.trim_start_matches('/')))
        .with_context(|| format!("cannot copy {} into the Debian root", deb.display()))?;
    if root.path("run/systemd/system").exists() {
        bail!("the Debian root has /run/systemd/system: the no-systemd path would not be tested");
    }
    root.install_systemd_stand_ins()?;
    lifecycle(&root, inside)?;
    let calls = root.take_systemd_calls()?;
    if !calls.is_empty() {
        bail!("without systemd running, the maintainer scripts still called {calls:?}");
    }
    println!("xtask: without systemd running, no systemctl or deb-systemd-invoke call");
    fs::create_dir_all(root.path("run/systemd/system"))?;
    service_actions(&root, inside)
}

/// With /run/systemd/system present: install starts the service (the group
/// already there), reinstalling restarts it, remove stops it.
fn service_actions(root: &DebianRoot, inside: &str) -> anyhow::Result<()> {
    let unit = "stormguard.service";
    let steps: [(&[&str], &str, String); 3] = [
        (
            &["dpkg", "-i", inside],
            "install",
            format!("deb-systemd-invoke start {unit} group=yes"),
        ),
        (
            &["dpkg", "-i", inside],
            "reinstall",
            format!("deb-systemd-invoke restart {unit} group=yes"),
        ),
        (
            &["dpkg", "-r", NAME],
            "remove",
            format!("deb-systemd-invoke stop {unit} group=yes"),
        ),
    ];
    for (args, what, want) in steps {
        root.run(args)
            .with_context(|| format!("{what} failed with systemd running"))?;
        let calls = root.take_systemd_calls()?;
        if !calls.contains(&want) {
            bail!("{what} with systemd running: expected the call `{want}`, got {calls:?}");
        }
        let stops = calls.iter().filter(|c| c.contains(" stop ")).count();
        if what != "remove" && stops != 0 {
            bail!("{what} with systemd running stopped the service: {calls:?}");
        }
        println!("xtask: with systemd running, {what}: {}", calls.join("; "));
    }
    root.run(&["dpkg", "-P", NAME])?;
    Ok(())
}

/// Install, reinstall over itself, remove and purge, checking after each
/// step what it must have done.
fn lifecycle(root: &DebianRoot, inside: &str) -> anyhow::Result<()> {
    // Install: the files, a working binary, the packaged config accepted
    // by the binary, the group.
    root.run(&["dpkg", "-i", inside])
        .context("dpkg -i failed in the Debian root")?;
    expect_status(root, Some("install ok installed"))?;
    for (rel, source) in [
        (CONFIG, workspace().join("packaging/config.toml")),
        (UNIT, workspace().join("packaging/stormguard.service")),
    ] {
        let installed =
            fs::read(root.path(rel)).with_context(|| format!("/{rel} was not installed"))?;
        if installed
            != fs::read(&source).with_context(|| format!("cannot read {}", source.display()))?
        {
            bail!("the installed /{rel} differs from {}", source.display());
        }
    }
    let version = root.output(&["stormguard", "--version"])?;
    let want = format!("stormguard {}", env!("CARGO_PKG_VERSION"));
    if version.trim() != want {
        bail!(
            "stormguard --version printed {:?}, expected {want:?}",
            version.trim()
        );
    }
    let checked = root.output(&["stormguard", "config", "check"])?;
    if checked.trim() != format!("/{CONFIG}: ok") {
        bail!("stormguard config check printed {:?}", checked.trim());
    }
    if !root.has_group() {
        bail!("postinst did not create the group {NAME}");
    }
    println!(
        "xtask: installed: {}, config check ok, group {NAME} exists",
        version.trim()
    );

    // Reinstall over itself (dpkg's upgrade path: prerm upgrade, postinst
    // configure with the old version): an edited conffile stays edited.
    let edited = {
        let mut text = fs::read_to_string(root.path(CONFIG))?;
        text.push_str("# edited by the administrator\n");
        text
    };
    fs::write(root.path(CONFIG), &edited)?;
    root.run(&["dpkg", "-i", inside])
        .context("reinstalling over itself failed")?;
    expect_status(root, Some("install ok installed"))?;
    if fs::read_to_string(root.path(CONFIG))? != edited {
        bail!("reinstalling replaced the administrator's /{CONFIG}");
    }
    if !root.has_group() {
        bail!("the group {NAME} is gone after reinstalling");
    }
    println!("xtask: reinstalled over itself: edited config kept, group kept");

    // Remove: the binary goes; the config, the database and the group stay.
    let db = root.path(STATE_DIR).join("incidents.db");
    fs::create_dir_all(root.path(STATE_DIR))?;
    fs::write(&db, b"stand-in for the incident database\n")?;
    root.run(&["dpkg", "-r", NAME]).context("dpkg -r failed")?;
    expect_status(root, Some("deinstall ok config-files"))?;
    if root.path(BINARY).exists() || root.path(UNIT).exists() {
        bail!("dpkg -r left /{BINARY} or /{UNIT}");
    }
    if !root.path(CONFIG).is_file() {
        bail!("dpkg -r removed /{CONFIG} (a conffile: only purge may)");
    }
    if !db.is_file() {
        bail!("dpkg -r removed the database /{STATE_DIR} (only purge may)");
    }
    println!("xtask: removed: binary and unit gone; config, database and group kept");

    // Purge: config, database and group gone.
    root.run(&["dpkg", "-P", NAME]).context("dpkg -P failed")?;
    expect_status(root, None)?;
    for rel in ["etc/stormguard", STATE_DIR] {
        if root.path(rel).exists() {
            bail!("dpkg -P left /{rel}");
        }
    }
    if root.has_group() {
        bail!("dpkg -P left the group {NAME}");
    }
    println!("xtask: purged: /etc/stormguard, /{STATE_DIR} and the group gone");
    Ok(())
}

/// dpkg's view of the package must be `want` (None: unknown or purged).
fn expect_status(root: &DebianRoot, want: Option<&str>) -> anyhow::Result<()> {
    let got = root.dpkg_status();
    // A purged package may still be listed as "unknown ok not-installed".
    let got = got.filter(|s| !s.ends_with("not-installed"));
    if got.as_deref() != want {
        bail!("dpkg status of {NAME} is {got:?}, expected {want:?}");
    }
    Ok(())
}
