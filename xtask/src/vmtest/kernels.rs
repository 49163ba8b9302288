//! Debian's kernel packages: the newest build of each line apt knows,
//! fetched with `apt-get download` into the cache (kept by file name, reused
//! without network), unpacked once into a vmlinuz and a cpio of the modules
//! the tests can load.
use std::{
    cmp::Ordering,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::Context as _;

use super::initrd::Cpio;
use crate::{
    setup::output,
    tasks::{ensure_packages, status},
};

/// A kernel line vmtest can boot.
pub struct Spec {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// Package names start with this ...
    prefix: &'static str,
    /// ... end with this ...
    suffix: &'static str,
    /// ... and contain this.
    contains: &'static str,
}

/// The unsigned cloud flavour: the smallest image, booted directly by qemu.
/// 6.1 is Debian 12's kernel; 6.12 LTS comes from bookworm's security
/// archive as `6.12.N+debNN`.
pub const SPECS: [Spec; 2] = [
    Spec {
        name: "6.1",
        prefix: "linux-image-6.1.",
        suffix: "-cloud-amd64-unsigned",
        contains: "",
    },
    Spec {
        name: "6.12",
        prefix: "linux-image-6.12.",
        suffix: "-cloud-amd64-unsigned",
        contains: "+deb",
    },
];

impl Spec {
    fn matches(&self, package: &str) -> bool {
        package.starts_with(self.prefix)
            && package.ends_with(self.suffix)
            && package.contains(self.contains)
    }

    /// What `--kernel` help and errors show.
    pub fn pattern(&self) -> String {
        format!("{}*{}{}", self.prefix, self.contains, self.suffix)
    }
}

/// One kernel build, ready to boot.
pub struct Kernel {
    pub package: String,
    pub version: String,
    /// `uname -r` of the image.
    pub release: String,
    pub vmlinuz: PathBuf,
    /// Its modules (a subset, see [`MODULE_DIRS`]) with fresh depmod
    /// indexes, under usr/lib/modules/RELEASE.
    pub modules_cpio: PathBuf,
}

/// Finds, fetches (if not cached) and unpacks (if not cached) the newest
/// build of `spec`.
pub fn fetch(cache: &Path, spec: &Spec) -> anyhow::Result<Kernel> {
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let (package, version) = match newest_in_apt(spec)? {
        Some(pv) => pv,
        None => newest_cached(&debs, spec)?.with_context(|| {
            format!(
                "apt knows no package {} and none is cached in {}",
                spec.pattern(),
                debs.display()
            )
        })?,
    };
    let deb = match cached_deb(&debs, &package, &version)? {
        Some(deb) => {
            println!("vmtest {}: {} (cached)", spec.name, deb.display());
            deb
        }
        None => download(&debs, &package, &version)?,
    };
    let (release, vmlinuz, modules_cpio) = unpack(cache, &deb)?;
    Ok(Kernel {
        package,
        version,
        release,
        vmlinuz,
        modules_cpio,
    })
}

/// (package, candidate version) of the newest matching package apt knows.
fn newest_in_apt(spec: &Spec) -> anyhow::Result<Option<(String, String)>> {
    let mut found = apt_candidates(spec)?;
    if found.is_empty() && crate::setup::is_root() {
        // Package lists may be missing (a fresh container): update once.
        if status(Command::new("apt-get").args(["update", "-q"])).is_ok() {
            found = apt_candidates(spec)?;
        }
    }
    Ok(found
        .into_iter()
        .max_by(|a, b| compare_versions(&a.1, &b.1)))
}

fn apt_candidates(spec: &Spec) -> anyhow::Result<Vec<(String, String)>> {
    let Ok(search) = output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        &format!("^{}", spec.prefix.replace('.', "\\.")),
    ])) else {
        return Ok(Vec::new()); // no apt: only the cache can help
    };
    let names: Vec<&str> = search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| spec.matches(n))
        .collect();
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let show = output(
        Command::new("apt-cache")
            .args(["show", "--no-all-versions"])
            .args(&names),
    )?;
    let mut found = Vec::new();
    let mut package = None;
    for line in show.lines() {
        if let Some(p) = line.strip_prefix("Package: ") {
            package = Some(p.trim().to_string());
        } else if let Some(v) = line.strip_prefix("Version: ")
            && let Some(p) = package.take()
        {
            found.push((p, v.trim().to_string()));
        }
    }
    Ok(found)
}

/// apt-get download's file name: `PACKAGE_VERSION_ARCH.deb`, an epoch's
/// colon written as %3a.
fn deb_prefix(package: &str, version: &str) -> String {
    format!("{package}_{}_", version.replace(':', "%3a"))
}

fn cached_deb(debs: &Path, package: &str, version: &str) -> anyhow::Result<Option<PathBuf>> {
    let prefix = deb_prefix(package, version);
    for entry in fs::read_dir(debs)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(debs.join(name)));
        }
    }
    Ok(None)
}

/// Without apt (or offline with empty lists): the newest cached deb.
fn newest_cached(debs: &Path, spec: &Spec) -> anyhow::Result<Option<(String, String)>> {
    let mut best: Option<(String, String)> = None;
    for entry in fs::read_dir(debs)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".deb") else {
            continue;
        };
        let mut parts = stem.split('_');
        let (Some(p), Some(v)) = (parts.next(), parts.next()) else {
            continue;
        };
        let v = v.replace("%3a", ":");
        if spec.matches(p)
            && best
                .as_ref()
                .is_none_or(|(_, bv)| compare_versions(&v, bv) == Ordering::Greater)
        {
            best = Some((p.to_string(), v));
        }
    }
    Ok(best)
}

fn download(debs: &Path, package: &str, version: &str) -> anyhow::Result<PathBuf> {
    let get = || {
        status(
            Command::new("apt-get")
                // Root's downloads are otherwise done as _apt, which cannot
                // write here (a harmless but noisy warning).
                .args(["download", "-q", "-o", "APT::Sandbox::User=root"])
                .arg(format!("{package}={version}"))
                .current_dir(debs),
        )
    };
    get()
        .or_else(|e| {
            // Stale lists 404: update and retry once.
            if crate::setup::is_root()
                && status(Command::new("apt-get").args(["update", "-q"])).is_ok()
            {
                get()
            } else {
                Err(e)
            }
        })
        .with_context(|| format!("cannot download {package} {version}"))?;
    cached_deb(debs, package, version)?.with_context(|| {
        format!(
            "apt-get download {package}={version} left no {}*.deb in {}",
            deb_prefix(package, version),
            debs.display()
        )
    })
}

/// Module directories (under lib/modules/RELEASE/kernel) the guest gets:
/// what the tests and daemon can ask the kernel to load — nf_tables and its
/// expressions, network devices, the crypto and lib helpers they need.
/// The cloud kernels build these as modules; the rest (storage, GPU, ...)
/// only makes the initrd bigger.
const MODULE_DIRS: [&str; 6] = [
    "net",
    "lib",
    "crypto",
    "arch",
    "fs/overlayfs",
    "drivers/net",
];

/// Unpacks `deb` once into cache/kernels/STEM/: (release, vmlinuz,
/// modules.cpio).
fn unpack(cache: &Path, deb: &Path) -> anyhow::Result<(String, PathBuf, PathBuf)> {
    let stem = deb
        .file_stem()
        .context("deb file name")?
        .to_string_lossy()
        .into_owned();
    let dir = cache.join("kernels").join(&stem);
    let (vmlinuz, modules, release_file) = (
        dir.join("vmlinuz"),
        dir.join("modules.cpio"),
        dir.join("release"),
    );
    if let Ok(release) = fs::read_to_string(&release_file)
        && vmlinuz.exists()
        && modules.exists()
    {
        return Ok((release.trim().to_string(), vmlinuz, modules));
    }
    ensure_packages(&[("dpkg-deb", "dpkg"), ("depmod", "kmod")])?;
    let tmp = cache.join("kernels").join(format!("{stem}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&tmp)?;
    println!("vmtest: unpacking {}", deb.display());
    if let Err(e) = status(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp)) {
        // A truncated download would fail here every time: drop it.
        let _ = fs::remove_file(deb);
        return Err(e.context(format!("{} removed; run again to fetch it", deb.display())));
    }
    let boot = tmp.join("boot");
    let image = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/", deb.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vmlinuz-"))
        .with_context(|| format!("{} has no boot/vmlinuz-*", deb.display()))?;
    let release = image["vmlinuz-".len()..].to_string();
    // bookworm's packages ship lib/modules, later ones usr/lib/modules;
    // depmod -b looks under lib/modules.
    if !tmp.join("lib/modules").exists() && tmp.join("usr/lib/modules").exists() {
        std::os::unix::fs::symlink("usr/lib", tmp.join("lib"))?;
    }
    let mods = tmp.join("lib/modules").join(&release);
    let kernel = mods.join("kernel");
    prune_modules(&kernel, &kernel, &MODULE_DIRS)?;
    status(
        Command::new("depmod")
            .arg("-b")
            .arg(&tmp)
            .arg(&release)
            .stderr(Stdio::null()),
    )
    .context("depmod for the guest's modules")?;
    fs::create_dir_all(&dir)?;
    let part = modules.with_extension("part");
    let file = fs::File::create(&part)?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    // The guest's rootfs has merged /usr: lib is a symlink to usr/lib.
    cpio.add_tree(&mods, &format!("usr/lib/modules/{release}"), &|_| false)?;
    cpio.finish()?;
    fs::rename(&part, &modules)?;
    fs::copy(boot.join(&image), &vmlinuz)?;
    fs::write(&release_file, format!("{release}\n"))?;
    fs::remove_dir_all(&tmp)?;
    Ok((release, vmlinuz, modules))
}

/// Removes everything under `dir` that is neither in nor above one of
/// `keep` (paths relative to `root`).
fn prune_modules(root: &Path, dir: &Path, keep: &[&str]) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let rel = path
            .strip_prefix(root)?
            .to_string_lossy()
            .replace('\\', "/");
        if keep
            .iter()
            .any(|k| rel == *k || rel.starts_with(&format!("{k}/")))
        {
            continue;
        }
        if path.is_dir() && keep.iter().any(|k| k.starts_with(&format!("{rel}/"))) {
            prune_modules(root, &path, keep)?;
        } else if path.is_dir() {
            fs::remove_dir_all(&path)?;
        } else {
            fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// dpkg's version order (epoch, upstream, revision; `~` sorts first).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| verrevcmp(ua, ub))
        .then_with(|| verrevcmp(ra, rb))
}

fn verrevcmp(a: &str, b: &str) -> Ordering {
    fn order(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(b'~') => -1,
            Some(c) => i32::from(c) + 256,
        }
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    let digit = |s: &[u8], k: usize| s.get(k).is_some_and(u8::is_ascii_digit);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Ordering::Greater;
        }
        if digit(b, j) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_dpkg() {
        use Ordering::*;
        for (a, b, want) in [
            ("6.1.192-3", "6.1.192-2", Greater),
            ("6.1.192-1", "6.1.190-1", Greater),
            ("6.1.99-1", "6.1.187-1", Less),
            ("6.12.117-1~deb12u1", "6.12.115-2~deb12u1", Greater),
            ("6.12.117-1~deb12u1", "6.12.117-1", Less),
            ("1:1.0-1", "2.0-1", Greater),
            ("1.0a-1", "1.0-1", Greater),
            ("1.0~rc1-1", "1.0-1", Less),
            ("6.1.187-1", "6.1.187-1", Equal),
        ] {
            assert_eq!(compare_versions(a, b), want, "{a} vs {b}");
        }
    }

    #[test]
    fn package_names_match_their_line() {
        let [k61, k612] = &SPECS;
        assert!(k61.matches("linux-image-6.1.0-53-cloud-amd64-unsigned"));
        assert!(!k61.matches("linux-image-6.1.0-53-amd64-unsigned"));
        assert!(!k61.matches("linux-image-6.12.117+deb12-cloud-amd64-unsigned"));
        assert!(k612.matches("linux-image-6.12.117+deb12-cloud-amd64-unsigned"));
        assert!(!k612.matches("linux-image-6.12.117+deb12-cloud-amd64"));
    }
}
