//! Unwinding a copy of a user stack (`detector_common::stack::Copy`) with
//! the `.eh_frame` call-frame information of the modules the process has
//! mapped: right through code built without frame pointers (libc's
//! syscall wrappers, `-fomit-frame-pointer` builds), which the kernel's
//! frame-pointer walk gets wrong or cuts short.
use std::{
    collections::HashMap,
    ops::{Deref, Range},
    path::PathBuf,
    sync::Arc,
};

use detector_common::stack::Copy;
use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

/// Most frames taken from one copy.
pub const FRAMES_MAX: usize = 48;
/// Most module files kept parsed.
const MODULES_MAX: usize = 32;
/// Most bytes of unwind tables kept (libc's are ~100 KiB; a large C++
/// library's a few MiB).
const MODULE_BYTES_MAX: usize = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum UnwindError {
    #[error(
        "reading /proc/{pid}/maps: {cause} (the process has exited, or reading another process's maps needs CAP_SYS_PTRACE)"
    )]
    Maps { pid: u32, cause: std::io::Error },
    #[error("the copy holds no stack")]
    Empty,
}

/// Addresses of an unwound stack, innermost first, each ready for a
/// symbol lookup (a return address minus one: the call, not the next
/// line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unwound {
    pub addrs: Vec<u64>,
    /// The walk reached the outermost frame; false when it stopped early
    /// (the copy ended, or a module had no unwind information).
    pub complete: bool,
}

/// A section's bytes, shared (framehop takes section data by value).
#[derive(Clone, Default)]
pub struct Slice(Arc<Vec<u8>>);

impl Deref for Slice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

/// The sections framehop reads: unwind tables (copied out of the file, so
/// a parsed module costs its unwind tables, not the whole binary), and
/// the address ranges it needs (`.text` only as a range: its bytes serve
/// prologue analysis, which a stack stopped at a syscall never needs).
const UNWIND_SECTIONS: [&str; 3] = [".eh_frame", ".eh_frame_hdr", ".debug_frame"];
const RANGE_SECTIONS: [&str; 2] = [".text", ".got"];

/// One executable file's unwind sections, parsed once.
struct Parsed {
    /// (svma range, bytes) by section name.
    sections: HashMap<&'static str, (Range<u64>, Option<Slice>)>,
    /// (p_vaddr, p_offset) of each loadable segment.
    segments: Vec<(u64, u64)>,
    /// Bytes held.
    size: usize,
}

impl Parsed {
    /// Reads only the headers and the sections kept (never the whole
    /// file: a browser's library is hundreds of megabytes).
    fn read(file: std::fs::File) -> Option<Parsed> {
        let cache = object::ReadCache::new(file);
        let obj = object::File::parse(&cache).ok()?;
        let mut sections = HashMap::new();
        let mut size = 0;
        for name in UNWIND_SECTIONS.into_iter().chain(RANGE_SECTIONS) {
            if let Some(s) = obj.section_by_name(name) {
                let range = s.address()..s.address() + s.size();
                let data = UNWIND_SECTIONS
                    .contains(&name)
                    .then(|| s.data().ok())
                    .flatten()
                    .map(|d| Slice(Arc::new(d.to_vec())));
                size += data.as_ref().map_or(0, |d| d.len());
                sections.insert(name, (range, data));
            }
        }
        let segments = obj
            .segments()
            .map(|s| (s.address(), s.file_range().0))
            .collect();
        Some(Parsed {
            sections,
            segments,
            size,
        })
    }

    fn data(&self, name: &str) -> Option<Slice> {
        self.sections.get(name).and_then(|(_, d)| d.clone())
    }

    fn svma(&self, name: &str) -> Option<Range<u64>> {
        self.sections.get(name).map(|(s, _)| s.clone())
    }
}

/// One executable mapping of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub offset: u64,
    /// (device, inode): the file's identity, the cache's key.
    pub file_id: (String, u64),
    pub path: String,
}

/// The executable file mappings of a maps file's text.
pub fn executable_mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let dev = f.next()?.to_string();
            let inode: u64 = f.next()?.parse().ok()?;
            let path = f.collect::<Vec<_>>().join(" ");
            if !perms.contains('x') || inode == 0 || !path.starts_with('/') {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                offset,
                file_id: (dev, inode),
                path,
            })
        })
        .collect()
}

/// Where svma 0 of the module lies in the process: the mapping's start,
/// moved by where its file offset sits in the loadable segment that holds
/// it.
fn base_avma(m: &Mapping, p: &Parsed) -> u64 {
    let (vaddr, off) = p
        .segments
        .iter()
        .copied()
        .filter(|(_, off)| off & !0xfff <= m.offset)
        .max_by_key(|(_, off)| *off)
        .unwrap_or((m.offset, m.offset));
    m.start
        .wrapping_add(off.wrapping_sub(m.offset))
        .wrapping_sub(vaddr)
}

/// Parsed modules by file identity, bounded (the least recently used go).
pub struct Modules {
    /// Bounds: modules, bytes.
    max: (usize, usize),
    parsed: HashMap<(String, u64), (Arc<Parsed>, u64)>,
    uses: u64,
    /// Files opened and parsed since start.
    pub loads: u64,
    /// Bytes of unwind tables held.
    bytes: usize,
}

impl Default for Modules {
    fn default() -> Self {
        Modules::with_bounds(MODULES_MAX, MODULE_BYTES_MAX)
    }
}

impl Modules {
    /// Keeps at most `modules` parsed files and `bytes` of their tables.
    pub fn with_bounds(modules: usize, bytes: usize) -> Self {
        Modules {
            max: (modules, bytes),
            parsed: HashMap::new(),
            uses: 0,
            loads: 0,
            bytes: 0,
        }
    }

    /// Modules held, and the bytes of their tables.
    pub fn held(&self) -> (usize, usize) {
        (self.parsed.len(), self.bytes)
    }

    /// The module behind `m` in process `pid`: through
    /// /proc/PID/map_files (a deleted or replaced binary, another mount
    /// namespace; needs CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE), else the
    /// path under /proc/PID/root.
    fn get(&mut self, pid: u32, m: &Mapping) -> Option<Arc<Parsed>> {
        self.uses += 1;
        if let Some((p, used)) = self.parsed.get_mut(&m.file_id) {
            *used = self.uses;
            return Some(p.clone());
        }
        let candidates: [PathBuf; 2] = [
            format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end).into(),
            format!("/proc/{pid}/root{}", m.path.trim_end_matches(" (deleted)")).into(),
        ];
        let file = candidates
            .iter()
            .find_map(|p| std::fs::File::open(p).ok())?;
        let parsed = Arc::new(Parsed::read(file)?);
        self.loads += 1;
        // The least recently used go, to stay within both bounds.
        while self.parsed.len() >= self.max.0
            || (!self.parsed.is_empty() && self.bytes + parsed.size > self.max.1)
        {
            let Some(oldest) = self
                .parsed
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((p, _)) = self.parsed.remove(&oldest) {
                self.bytes -= p.size;
            }
        }
        self.bytes += parsed.size;
        self.parsed
            .insert(m.file_id.clone(), (parsed.clone(), self.uses));
        Some(parsed)
    }
}

/// The executable file mappings of a live process.
pub fn read_mappings(pid: u32) -> Result<Vec<Mapping>, UnwindError> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .map_err(|cause| UnwindError::Maps { pid, cause })?;
    Ok(executable_mappings(&maps))
}

/// Unwinds `copy` of process `pid`, whose executable mappings are `maps`
/// (the files are read through the process while it lives, else by path).
pub fn unwind(
    pid: u32,
    copy: &Copy,
    maps: &[Mapping],
    modules: &mut Modules,
) -> Result<Unwound, UnwindError> {
    if copy.len == 0 {
        return Err(UnwindError::Empty);
    }
    let mut unwinder: UnwinderX86_64<Slice> = UnwinderX86_64::new();
    for m in maps {
        let Some(p) = modules.get(pid, m) else {
            continue;
        };
        let info = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: p.svma(".text"),
            got_svma: p.svma(".got"),
            eh_frame_svma: p.svma(".eh_frame"),
            eh_frame: p.data(".eh_frame"),
            eh_frame_hdr_svma: p.svma(".eh_frame_hdr"),
            eh_frame_hdr: p.data(".eh_frame_hdr"),
            debug_frame: p.data(".debug_frame"),
            ..Default::default()
        };
        unwinder.add_module(Module::new(
            m.path.clone(),
            m.start..m.end,
            base_avma(m, &p),
            info,
        ));
    }
    let len = (copy.len as usize).min(copy.bytes.len());
    let sp = copy.sp;
    let mut read_stack = |addr: u64| -> Result<u64, ()> {
        let off = addr.checked_sub(sp).ok_or(())? as usize;
        let b = copy
            .bytes
            .get(off..off.checked_add(8).ok_or(())?)
            .ok_or(())?;
        if off + 8 > len {
            return Err(());
        }
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| ())?))
    };
    let mut cache = CacheX86_64::<_>::new();
    let mut iter = unwinder.iter_frames(
        copy.ip,
        UnwindRegsX86_64::new(copy.ip, copy.sp, copy.bp),
        &mut cache,
        &mut read_stack,
    );
    let mut addrs = Vec::new();
    let complete = loop {
        if addrs.len() >= FRAMES_MAX {
            break false;
        }
        match iter.next() {
            Ok(Some(f)) => addrs.push(lookup_address(f)),
            Ok(None) => break true,
            Err(_) => break false,
        }
    };
    Ok(Unwound { addrs, complete })
}

/// The address to look a frame up by: a return address points after its
/// call, which may be the next line (or function).
fn lookup_address(f: FrameAddress) -> u64 {
    match f {
        FrameAddress::InstructionPointer(a) => a,
        FrameAddress::ReturnAddress(a) => u64::from(a).saturating_sub(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_executable_file_mappings_are_modules() {
        let maps = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234 /usr/bin/client
55d0c0a01000-55d0c0a05000 r-xp 00001000 08:01 1234 /usr/bin/client
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7f1000028000-7f10001bd000 r-xp 00028000 08:01 99 /usr/lib/x86_64-linux-gnu/libc.so.6
7f2000000000-7f2000001000 r-xp 00000000 00:00 0 [vdso]
7f3000001000-7f3000002000 r-xp 00001000 08:01 77 /tmp/gone (deleted)
";
        let m = executable_mappings(maps);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].start, 0x55d0c0a01000);
        assert_eq!(m[0].offset, 0x1000);
        assert_eq!(m[1].path, "/usr/lib/x86_64-linux-gnu/libc.so.6");
        assert_eq!(m[2].path, "/tmp/gone (deleted)");
        assert_eq!(m[2].file_id, ("08:01".to_string(), 77));
    }

    #[test]
    fn parsed_modules_stay_within_their_bounds() {
        let me = std::process::id();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let mut files = executable_mappings(&maps);
        files.dedup_by(|a, b| a.file_id == b.file_id);
        assert!(files.len() >= 2, "{files:?}");
        let mut m = Modules::with_bounds(1, usize::MAX);
        for f in &files {
            assert!(m.get(me, f).is_some(), "{f:?}");
            assert_eq!(m.held().0, 1);
        }
        assert_eq!(m.loads, files.len() as u64);
        // A byte bound below one module's tables keeps just the newest.
        let mut m = Modules::with_bounds(8, 1);
        for f in &files {
            m.get(me, f);
        }
        assert_eq!(m.held().0, 1);
        // Within bounds, a second look is cached.
        let mut m = Modules::default();
        m.get(me, &files[0]);
        m.get(me, &files[0]);
        assert_eq!(m.loads, 1);
    }

    #[test]
    fn a_pie_text_mapping_gives_the_load_bias() {
        // PIE: text segment at p_vaddr 0x1000, file offset 0x1000, mapped at
        // 0x5555_5555_5000: svma 0 is at 0x5555_5555_4000.
        let p = Parsed {
            sections: HashMap::new(),
            segments: vec![(0, 0), (0x1000, 0x1000), (0x3db0, 0x2db0)],
            size: 0,
        };
        let m = Mapping {
            start: 0x5555_5555_5000,
            end: 0x5555_5555_6000,
            offset: 0x1000,
            file_id: ("0:0".into(), 1),
            path: "/x".into(),
        };
        assert_eq!(base_avma(&m, &p), 0x5555_5555_4000);
        // A non-PIE executable: mapped where it says (vaddr 0x401000).
        let p = Parsed {
            segments: vec![(0x400000, 0), (0x401000, 0x1000)],
            ..p
        };
        let m = Mapping {
            start: 0x401000,
            end: 0x402000,
            ..m
        };
        assert_eq!(base_avma(&m, &p), 0);
    }
}
