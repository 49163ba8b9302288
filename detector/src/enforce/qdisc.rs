//! The qdisc that makes slowed packets leave later: an htb root qdisc
//! with handle `5347:` on each egress device governed packets use, and a
//! class per budget whose rate is the budget's. The egress hook steers a
//! governed socket's requests into its budget's class by `skb->priority`;
//! everything else finds no class and takes htb's direct path, so the
//! qdisc changes nothing for other traffic, and nothing at all once the
//! hook is gone (fail-open). Measured facts: `../shared/enforcement-facts.md`.
//!
//! A qdisc outlives the daemon, so each device is written to a journal
//! before its qdisc is added; the qdisc is removed when the last budget
//! goes, at clean exit, and — from the journal — at the next start.
//! Removing the root qdisc gives the device back its kernel default, which
//! is the only qdisc this module ever replaces: a device whose root qdisc
//! someone configured is left alone (and its traffic is not slowed).
//!
//! `tc` (iproute2) does the netlink work: it is on every host that has
//! `ip`, and its htb options are the documented interface.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    path::{Path, PathBuf},
    process::Command,
};

use detector_common::enforce::shape::{QDISC_MAJOR, class_minor};
use serde::{Deserialize, Serialize};

/// A qdisc step failed.
#[derive(Debug, thiserror::Error)]
pub enum ShapeError {
    #[error("device {ifindex} has no name (gone?)")]
    NoDevice { ifindex: u32 },
    #[error(
        "{dev} has a configured root qdisc ({kind}); stormguard adds its own only \
         in place of the kernel's default, so packets leaving {dev} are not slowed"
    )]
    Foreign { dev: String, kind: String },
    #[error("`tc {args}`: {why}")]
    Tc { args: String, why: String },
    #[error("the qdisc journal {path}: {cause}")]
    Journal { path: PathBuf, cause: io::Error },
}

/// One device in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journaled {
    pub ifindex: u32,
    pub name: String,
}

/// A class's parameters: bytes per second and burst bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassRate {
    pub bytes_per_s: u64,
    pub burst_bytes: u64,
}

impl ClassRate {
    /// Whether `other` differs enough to be worth a `tc class change`.
    fn differs(&self, other: &ClassRate) -> bool {
        let off = |a: u64, b: u64| a.abs_diff(b) * 10 > a.max(b);
        off(self.bytes_per_s, other.bytes_per_s) || off(self.burst_bytes, other.burst_bytes)
    }
}

/// A device with stormguard's qdisc, and the classes on it by slot.
#[derive(Debug)]
struct Shaped {
    name: String,
    classes: HashMap<u32, ClassRate>,
}

/// The qdiscs stormguard added, and the journal that lists them.
pub struct Shaper {
    journal: Option<PathBuf>,
    tc: PathBuf,
    shaped: BTreeMap<u32, Shaped>,
    /// Devices refused (a configured qdisc): asked once per qdisc life.
    refused: BTreeMap<u32, String>,
}

/// Where the journal lives: beside the incident database.
pub fn journal_beside(db: &Path) -> PathBuf {
    db.with_file_name("qdiscs.json")
}

impl Shaper {
    pub fn new(journal: Option<PathBuf>) -> Shaper {
        Shaper {
            journal,
            tc: PathBuf::from("tc"),
            shaped: BTreeMap::new(),
            refused: BTreeMap::new(),
        }
    }

    /// Devices with stormguard's qdisc now.
    pub fn devices(&self) -> Vec<String> {
        self.shaped.values().map(|s| s.name.clone()).collect()
    }

    /// Devices whose configured qdisc kept them from being shaped.
    pub fn refused(&self) -> Vec<String> {
        self.refused.values().cloned().collect()
    }

    fn tc(&self, args: &[&str]) -> Result<String, ShapeError> {
        let err = |why: String| ShapeError::Tc {
            args: args.join(" "),
            why,
        };
        let out = Command::new(&self.tc)
            .args(args)
            .output()
            .map_err(|e| err(format!("{e} (is iproute2 installed?)")))?;
        if !out.status.success() {
            return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The root qdisc of `dev`: its kind and handle (`"0:"` for the
    /// kernel's default).
    fn root_qdisc(&self, dev: &str) -> Result<(String, String), ShapeError> {
        let out = self.tc(&["qdisc", "show", "dev", dev, "root"])?;
        parse_root(&out).ok_or_else(|| ShapeError::Tc {
            args: format!("qdisc show dev {dev} root"),
            why: format!("unexpected answer {out:?}"),
        })
    }

    fn write_journal(&self) -> Result<(), ShapeError> {
        let Some(path) = &self.journal else {
            return Ok(());
        };
        let list: Vec<Journaled> = self
            .shaped
            .iter()
            .map(|(&ifindex, s)| Journaled {
                ifindex,
                name: s.name.clone(),
            })
            .collect();
        let err = |cause| ShapeError::Journal {
            path: path.clone(),
            cause,
        };
        if list.is_empty() {
            return match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(err(e)),
                _ => Ok(()),
            };
        }
        let text = serde_json::to_string_pretty(&list).map_err(|e| err(io::Error::other(e)))?;
        super::persist::write_private(path, text.as_bytes()).map_err(err)
    }

    /// Puts stormguard's qdisc on `ifindex` (journaled first) with a class
    /// for each of `classes`. A device that already has it (a qdisc left
    /// by a daemon killed before its journal was read) is taken over.
    pub fn ensure(&mut self, ifindex: u32, classes: &[(u32, ClassRate)]) -> Result<(), ShapeError> {
        if self.shaped.contains_key(&ifindex) {
            return Ok(());
        }
        let name = if_name(ifindex).ok_or(ShapeError::NoDevice { ifindex })?;
        let (kind, handle) = self.root_qdisc(&name)?;
        let ours = kind == "htb" && handle == format!("{QDISC_MAJOR:x}:");
        if !ours && handle != "0:" {
            self.refused.insert(ifindex, name.clone());
            return Err(ShapeError::Foreign { dev: name, kind });
        }
        self.shaped.insert(
            ifindex,
            Shaped {
                name: name.clone(),
                classes: HashMap::new(),
            },
        );
        if let Err(e) = self.write_journal() {
            self.shaped.remove(&ifindex);
            return Err(e);
        }
        if !ours {
            let handle = format!("{QDISC_MAJOR:x}:");
            // direct_qlen: unclassified traffic must never queue short,
            // whatever the device's txqueuelen (0 on some tunnels).
            let added = self.tc(&[
                "qdisc",
                "add",
                "dev",
                &name,
                "root",
                "handle",
                &handle,
                "htb",
                "default",
                "0",
                "direct_qlen",
                "10000",
            ]);
            if let Err(e) = added {
                self.shaped.remove(&ifindex);
                let _ = self.write_journal();
                return Err(e);
            }
        }
        tracing::info!(dev = %name, "slowing: htb qdisc {QDISC_MAJOR:x}: added");
        self.set_classes(classes)
    }

    /// Makes every shaped device carry exactly `classes` (slot, rate).
    pub fn set_classes(&mut self, classes: &[(u32, ClassRate)]) -> Result<(), ShapeError> {
        let mut first_err = None;
        let devices: Vec<u32> = self.shaped.keys().copied().collect();
        for ifindex in devices {
            let (name, current) = {
                let s = &self.shaped[&ifindex];
                (s.name.clone(), s.classes.clone())
            };
            for &(slot, rate) in classes {
                if current.get(&slot).is_some_and(|c| !c.differs(&rate)) {
                    continue;
                }
                let classid = format!("{QDISC_MAJOR:x}:{:x}", class_minor(slot));
                let bits = format!("{}bit", rate.bytes_per_s.max(1) * 8);
                let burst = format!("{}b", rate.burst_bytes.max(64));
                let r = self.tc(&[
                    "class",
                    "replace",
                    "dev",
                    &name,
                    "parent",
                    &format!("{QDISC_MAJOR:x}:"),
                    "classid",
                    &classid,
                    "htb",
                    "rate",
                    &bits,
                    "ceil",
                    &bits,
                    "burst",
                    &burst,
                    "cburst",
                    &burst,
                    "quantum",
                    "1514",
                ]);
                match r {
                    Ok(_) => {
                        if let Some(s) = self.shaped.get_mut(&ifindex) {
                            s.classes.insert(slot, rate);
                        }
                    }
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            for slot in current
                .keys()
                .filter(|s| !classes.iter().any(|c| c.0 == **s))
            {
                let classid = format!("{QDISC_MAJOR:x}:{:x}", class_minor(*slot));
                // A class still holding packets cannot go; it is replaced
                // when its slot is reused, and goes with the qdisc.
                if self
                    .tc(&["class", "del", "dev", &name, "classid", &classid])
                    .is_ok()
                    && let Some(s) = self.shaped.get_mut(&ifindex)
                {
                    s.classes.remove(slot);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Removes every qdisc this daemon added (only if it is still
    /// stormguard's), and the journal.
    pub fn teardown(&mut self) -> Vec<String> {
        let shaped = std::mem::take(&mut self.shaped);
        let mut notes = Vec::new();
        for (ifindex, s) in shaped {
            notes.extend(self.remove_ours(ifindex, &s.name));
        }
        self.refused.clear();
        if let Err(e) = self.write_journal() {
            notes.push(e.to_string());
        }
        notes
    }

    /// Removes stormguard's qdisc from a device, checking it is the same
    /// device and still carries ours. Returns a note when it did not.
    fn remove_ours(&self, ifindex: u32, name: &str) -> Option<String> {
        if if_name(ifindex).as_deref() != Some(name) {
            return Some(format!("{name} (index {ifindex}) is gone: nothing to undo"));
        }
        match self.root_qdisc(name) {
            Ok((kind, handle)) if kind == "htb" && handle == format!("{QDISC_MAJOR:x}:") => {
                match self.tc(&["qdisc", "del", "dev", name, "root"]) {
                    Ok(_) => {
                        tracing::info!(dev = %name, "slowing: htb qdisc removed");
                        None
                    }
                    Err(e) => Some(e.to_string()),
                }
            }
            Ok((kind, _)) => Some(format!(
                "{name}: its root qdisc is now {kind}, not stormguard's: left alone"
            )),
            Err(e) => Some(e.to_string()),
        }
    }

    /// At start: removes the qdiscs a previous daemon journaled and did
    /// not remove (it was killed). One line per device, for the log.
    pub fn undo_journal(&mut self) -> Vec<String> {
        let Some(path) = self.journal.clone() else {
            return Vec::new();
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => return vec![format!("reading {}: {e}", path.display())],
        };
        let list: Vec<Journaled> = match serde_json::from_str(&text) {
            Ok(l) => l,
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                return vec![format!("{} is not readable ({e}); removed", path.display())];
            }
        };
        let mut notes = Vec::new();
        for j in list {
            match self.remove_ours(j.ifindex, &j.name) {
                Some(n) => notes.push(n),
                None => notes.push(format!(
                    "{}: the qdisc a previous run left was removed",
                    j.name
                )),
            }
        }
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            notes.push(format!("removing {}: {e}", path.display()));
        }
        notes
    }

    /// Whether `ifindex` carries stormguard's qdisc (as this daemon added it).
    pub fn is_shaped(&self, ifindex: u32) -> bool {
        self.shaped.contains_key(&ifindex)
    }

    /// Whether `ifindex` was refused (a configured qdisc).
    pub fn is_refused(&self, ifindex: u32) -> bool {
        self.refused.contains_key(&ifindex)
    }
}

/// `qdisc htb 5347: root refcnt 2 r2q 10 ...` → ("htb", "5347:").
fn parse_root(out: &str) -> Option<(String, String)> {
    let line = out.lines().find(|l| l.starts_with("qdisc "))?;
    let mut words = line.split_whitespace().skip(1);
    let kind = words.next()?.to_string();
    let handle = words.next()?.to_string();
    handle.ends_with(':').then_some((kind, handle))
}

/// The name of interface `ifindex` in this network namespace.
fn if_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes, as the call needs.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// The index of interface `name` (tests).
pub fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_qdisc_lines_parse() {
        assert_eq!(
            parse_root("qdisc noqueue 0: root refcnt 2 \n"),
            Some(("noqueue".into(), "0:".into()))
        );
        assert_eq!(
            parse_root("qdisc htb 5347: root refcnt 2 r2q 10 default 0 direct_packets_stat 3\n"),
            Some(("htb".into(), "5347:".into()))
        );
        assert_eq!(parse_root(""), None);
    }

    #[test]
    fn small_changes_are_not_worth_a_tc_call() {
        let a = ClassRate {
            bytes_per_s: 1000,
            burst_bytes: 2000,
        };
        let b = ClassRate {
            bytes_per_s: 1050,
            ..a
        };
        let c = ClassRate {
            bytes_per_s: 1200,
            ..a
        };
        assert!(!a.differs(&b));
        assert!(a.differs(&c));
    }

    /// Devices in a network namespace of the test's own, so the
    /// host's devices are never touched. Needs root and `ip`/`tc`.
    struct Ns(String);

    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn qdisc_is_journaled_added_replaced_and_undone_and_foreign_ones_left_alone() {
        if !can_run() {
            return;
        }
        // The shaper works on this process's namespace: run the body in a
        // thread that enters a new one.
        let name = format!("sg-qdisc-unit-{}", std::process::id());
        let st = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(st.is_ok_and(|s| s.success()), "ip netns add");
        let ns = Ns(name);
        let path = format!("/run/netns/{}", ns.0);
        let dir = std::env::temp_dir().join(format!("sg-qdisc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let journal = dir.join("qdiscs.json");
        let j2 = journal.clone();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: a netns fd; only this thread changes namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", io::Error::last_os_error());
            body(&j2);
        })
        .join()
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn can_run() -> bool {
        // SAFETY: no arguments.
        let root = unsafe { libc::geteuid() } == 0;
        let tools = Command::new("tc").arg("-V").output().is_ok();
        if !(root && tools) {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI needs root and tc for the qdisc test"
            );
            eprintln!("skipped: needs root and tc");
        }
        root && tools
    }

    fn ip(args: &[&str]) {
        let st = Command::new("ip").args(args).status().unwrap();
        assert!(st.success(), "ip {args:?}");
    }

    fn root_of(dev: &str) -> (String, String) {
        let out = Command::new("tc")
            .args(["qdisc", "show", "dev", dev, "root"])
            .output()
            .unwrap();
        parse_root(&String::from_utf8_lossy(&out.stdout)).unwrap()
    }

    fn body(journal: &Path) {
        // veth: this kernel has no dummy driver.
        ip(&[
            "link", "add", "sgd0", "type", "veth", "peer", "name", "sgd0p",
        ]);
        ip(&[
            "link", "add", "sgd1", "type", "veth", "peer", "name", "sgd1p",
        ]);
        ip(&["link", "set", "sgd0", "up"]);
        ip(&["link", "set", "sgd1", "up"]);
        let (d0, d1) = (if_index("sgd0").unwrap(), if_index("sgd1").unwrap());
        let before = root_of("sgd0");
        assert_eq!(before.1, "0:", "a new device has the kernel's default");
        let rate = ClassRate {
            bytes_per_s: 1250,
            burst_bytes: 1600,
        };

        let mut s = Shaper::new(Some(journal.to_path_buf()));
        s.ensure(d0, &[(3, rate)]).unwrap();
        assert_eq!(root_of("sgd0"), ("htb".into(), "5347:".into()));
        let listed: Vec<Journaled> =
            serde_json::from_str(&std::fs::read_to_string(journal).unwrap()).unwrap();
        assert_eq!(
            listed,
            [Journaled {
                ifindex: d0,
                name: "sgd0".into()
            }]
        );
        let classes = Command::new("tc")
            .args(["class", "show", "dev", "sgd0"])
            .output()
            .unwrap();
        let classes = String::from_utf8_lossy(&classes.stdout);
        assert!(
            classes.contains("class htb 5347:40 root") && classes.contains("rate 10Kbit"),
            "{classes}"
        );

        // A configured root qdisc is never replaced (htb, as the only
        // classful qdisc this kernel is sure to have, with its own handle).
        let st = Command::new("tc")
            .args(["qdisc", "add", "dev", "sgd1", "root", "handle", "1:", "htb"])
            .status()
            .unwrap();
        assert!(st.success());
        let e = s.ensure(d1, &[(3, rate)]).unwrap_err();
        assert!(matches!(e, ShapeError::Foreign { .. }), "{e}");
        assert_eq!(root_of("sgd1"), ("htb".into(), "1:".into()));

        // Killed: a new shaper undoes the journal.
        drop(s);
        let mut next = Shaper::new(Some(journal.to_path_buf()));
        let notes = next.undo_journal();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(root_of("sgd0"), before, "the default is back");
        assert!(!journal.exists());

        // Clean teardown removes it too, and the journal.
        next.ensure(d0, &[(0, rate)]).unwrap();
        assert!(journal.exists());
        assert!(next.teardown().is_empty());
        assert_eq!(root_of("sgd0"), before);
        assert!(!journal.exists());
        assert_eq!(root_of("sgd1"), ("htb".into(), "1:".into()));
    }
}
