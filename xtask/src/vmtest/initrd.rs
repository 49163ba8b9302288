//! The guest's initramfs: uncompressed newc cpio archives, concatenated
//! (the kernel unpacks each in turn). A Debian rootfs made once with
//! mmdebstrap and cached, each kernel's modules (cached with the kernel),
//! and a small per-run archive with /init and the binaries under test.
use std::{
    collections::BTreeSet,
    fs,
    io::{self, Write},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::tasks::{ensure_packages, status};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// A newc ("070701") cpio writer: the format the kernel's initramfs
/// unpacker reads. Entries are owned by root; parent directories are
/// emitted as needed (the unpacker does not create them).
pub struct Cpio<W: Write> {
    w: W,
    pos: u64,
    ino: u32,
    dirs: BTreeSet<String>,
}

impl<W: Write> Cpio<W> {
    pub fn new(w: W) -> Self {
        Cpio {
            w,
            pos: 0,
            ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - self.pos % 4) % 4;
        self.put(&[0u8; 3][..n as usize])
    }

    fn header(&mut self, name: &str, mode: u32, size: u64, rdev: (u32, u32)) -> io::Result<()> {
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{name}: too big for cpio")))?;
        let nlink = if mode & 0o170_000 == S_IFDIR { 2 } else { 1 };
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            size,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        let mut h = String::with_capacity(110);
        h.push_str("070701");
        for f in fields {
            h.push_str(&format!("{f:08X}"));
        }
        self.put(h.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()
    }

    /// Emits the directories above `name` not emitted yet.
    pub fn parents(&mut self, name: &str) -> io::Result<()> {
        let mut upto = 0;
        while let Some(i) = name[upto..].find('/') {
            let dir = &name[..upto + i];
            upto += i + 1;
            if !dir.is_empty() && !self.dirs.contains(dir) {
                self.dir(dir, 0o755)?;
            }
        }
        Ok(())
    }

    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.parents(name)?;
        self.dirs.insert(name.to_string());
        self.header(name, S_IFDIR | perm, 0, (0, 0))
    }

    pub fn bytes(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.parents(name)?;
        self.header(name, S_IFREG | perm, data.len() as u64, (0, 0))?;
        self.put(data)?;
        self.pad()
    }

    /// A regular file with the contents of `src`.
    pub fn file(&mut self, name: &str, perm: u32, src: &Path) -> io::Result<()> {
        self.parents(name)?;
        let mut f = fs::File::open(src)?;
        let len = f.metadata()?.len();
        self.header(name, S_IFREG | perm, len, (0, 0))?;
        let copied = io::copy(&mut f, &mut self.w)?;
        if copied != len {
            return Err(io::Error::other(format!(
                "{} changed while archived",
                src.display()
            )));
        }
        self.pos += copied;
        self.pad()
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.parents(name)?;
        self.header(name, S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
        self.put(target.as_bytes())?;
        self.pad()
    }

    pub fn char_device(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.parents(name)?;
        self.header(name, S_IFCHR | perm, 0, (major, minor))
    }

    /// Everything under `root` (sorted), as `prefix/...`; `skip` gets the
    /// archive name and leaves a directory's contents (or a file) out.
    pub fn add_tree(
        &mut self,
        root: &Path,
        prefix: &str,
        skip: &dyn Fn(&str) -> bool,
    ) -> io::Result<()> {
        let mut entries: Vec<_> = fs::read_dir(root)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
            let name = name.trim_start_matches('/').to_string();
            let path = e.path();
            let meta = fs::symlink_metadata(&path)?;
            let perm = meta.mode() & 0o7777;
            let ft = meta.file_type();
            if ft.is_dir() {
                self.dir(&name, perm)?;
                if !skip(&name) {
                    self.add_tree(&path, &name, skip)?;
                }
            } else if skip(&name) {
                continue;
            } else if ft.is_symlink() {
                let target = fs::read_link(&path)?;
                self.symlink(&name, &target.to_string_lossy())?;
            } else if ft.is_file() {
                self.file(&name, perm, &path)?;
            } else if ft.is_char_device() {
                let rdev = meta.rdev();
                self.char_device(&name, perm, libc::major(rdev), libc::minor(rdev))?;
            }
            // Sockets, fifos, block devices: none needed.
        }
        Ok(())
    }

    /// The trailer; returns the writer, flushed.
    pub fn finish(mut self) -> io::Result<W> {
        self.header("TRAILER!!!", 0, 0, (0, 0))?;
        self.w.flush()?;
        Ok(self.w)
    }
}

/// What the tests run in the guest besides their own binaries: ip (netns,
/// veth) and tc (enforcement's htb qdisc), nft, python3 with requests (the
/// enforcement tests' real clients), curl, sh, setpriv, unshare and mount,
/// modprobe (the kernel's, for nf_tables, veth, sch_htb), bpftool (for a
/// look at what is loaded).
const ROOTFS_PACKAGES: &str =
    "iproute2,nftables,python3,python3-requests,curl,kmod,util-linux,mount,procps,bpftool";

/// Paths dpkg leaves out of the rootfs (documentation and translations).
const ROOTFS_EXCLUDES: [&str; 4] = [
    "/usr/share/man/*",
    "/usr/share/doc/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
];

/// The host's Debian release (its test binaries need the same or a newer
/// glibc in the guest), bookworm if unknown.
fn host_suite() -> String {
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
                .map(|v| v.trim().trim_matches('"').to_string())
        })
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "bookworm".into())
}

/// FNV-1a: a stable key for the cache file name.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The base rootfs archive, built once per suite and package list.
pub fn rootfs(cache: &Path) -> anyhow::Result<PathBuf> {
    let suite = host_suite();
    let mut args = vec![
        "--variant=minbase".to_string(),
        format!("--include={ROOTFS_PACKAGES}"),
        // Merged /usr without the usrmerge package (which pulls in perl).
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr".to_string(),
    ];
    args.extend(
        ROOTFS_EXCLUDES
            .iter()
            .map(|p| format!("--dpkgopt=path-exclude={p}")),
    );
    let key = fnv(&format!("{suite} {}", args.join(" ")));
    let out = cache.join(format!("rootfs-{suite}-{key:016x}.cpio"));
    if out.exists() {
        return Ok(out);
    }
    ensure_packages(&[("mmdebstrap", "mmdebstrap")])?;
    let tree = cache.join(format!("rootfs-{suite}.tmp"));
    let _ = fs::remove_dir_all(&tree);
    println!(
        "vmtest: building the guest's Debian {suite} rootfs with mmdebstrap (once; about a minute)"
    );
    status(
        Command::new("mmdebstrap")
            .args(&args)
            .arg(&suite)
            .arg(&tree)
            .stdin(Stdio::null()),
    )
    .context("mmdebstrap (needs root and network once; the result is cached)")?;
    let part = out.with_extension("part");
    let mut cpio = Cpio::new(io::BufWriter::new(fs::File::create(&part)?));
    cpio.add_tree(&tree, "", &|name| {
        // Mount points the guest fills itself, apt's caches, and Python's
        // own test suite (python3's postinst needs it, the guest does not).
        matches!(
            name,
            "dev" | "proc" | "sys" | "run" | "var/cache/apt" | "var/lib/apt/lists"
        ) || (name.starts_with("usr/lib/python3") && name.ends_with("/test"))
    })
    .with_context(|| format!("archiving {}", tree.display()))?;
    // The kernel opens the console before /init runs (devtmpfs is not
    // mounted yet).
    cpio.char_device("dev/console", 0o600, 5, 1)?;
    cpio.char_device("dev/null", 0o666, 1, 3)?;
    cpio.finish()?;
    fs::rename(&part, &out)?;
    fs::remove_dir_all(&tree)?;
    Ok(out)
}

/// A binary placed at `guest` (an absolute path, the same as on the host)
/// from `host` (stripped of debug info).
pub struct Placed {
    pub guest: PathBuf,
    pub host: PathBuf,
}

/// Strips debug info from `src` into `dir` (only when `src` changed).
pub fn stripped(src: &Path, dir: &Path) -> anyhow::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let dst = dir.join(src.file_name().context("binary name")?);
    let newer = |a: &Path, b: &Path| -> bool {
        let m = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
        matches!((m(a), m(b)), (Some(x), Some(y)) if x > y)
    };
    if dst.exists() && newer(&dst, src) {
        return Ok(dst);
    }
    ensure_packages(&[("objcopy", "binutils")])?;
    let st = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(src)
        .arg(&dst)
        .status()
        .context("running objcopy")?;
    if !st.success() {
        bail!("objcopy --strip-debug {} failed", src.display());
    }
    Ok(dst)
}

/// The per-run archive: /init, /etc/hosts, and the binaries.
pub fn run_archive(path: &Path, init: &str, bins: &[Placed]) -> anyhow::Result<()> {
    let mut cpio = Cpio::new(io::BufWriter::new(fs::File::create(path)?));
    cpio.bytes("init", 0o755, init.as_bytes())?;
    cpio.bytes(
        "etc/hosts",
        0o644,
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    )?;
    for b in bins {
        let name = b.guest.to_string_lossy();
        cpio.file(name.trim_start_matches('/'), 0o755, &b.host)
            .with_context(|| format!("archiving {}", b.host.display()))?;
    }
    cpio.finish()?;
    Ok(())
}

/// Concatenates archives into one initrd file; returns its size.
pub fn concat(out: &Path, parts: &[&Path]) -> anyhow::Result<u64> {
    let mut w = io::BufWriter::new(fs::File::create(out)?);
    let mut n = 0;
    for p in parts {
        let mut f = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
        n += io::copy(&mut f, &mut w)?;
    }
    w.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_parents_come_first() {
        let mut c = Cpio::new(Vec::new());
        c.bytes("a/b/c", 0o644, b"hello").unwrap();
        c.symlink("a/l", "b").unwrap();
        let out = c.finish().unwrap();
        let text = String::from_utf8_lossy(&out);
        let names: Vec<usize> = ["a\0", "a/b\0", "a/b/c\0", "a/l\0", "TRAILER!!!\0"]
            .iter()
            .map(|n| text.find(n).unwrap_or_else(|| panic!("{n:?} missing")))
            .collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
        assert_eq!(out.len() % 4, 0);
        assert_eq!(text.matches("070701").count(), 5);
        // Each header starts on a 4-byte boundary.
        for (i, _) in text.match_indices("070701") {
            assert_eq!(i % 4, 0);
        }
    }
}
