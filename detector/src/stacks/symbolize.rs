//! Addresses of a process to function, file and line, with blazesym: PIE
//! and shared libraries through /proc/PID/maps; deleted or replaced
//! binaries and other mount namespaces through /proc/PID/map_files (needs
//! CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE; without it, the paths in maps
//! are tried); JIT code through the runtime's perf map (/tmp/perf-PID.map,
//! Node's `--perf-basic-prof`).
use blazesym::{
    Pid,
    symbolize::{
        Input, Symbolized, Symbolizer, evict,
        source::{Elf, Process, Source},
    },
};

use super::{Frame, unwind::Mapping};

/// Module names of runtimes whose own frames are interpreted code: their
/// native frames are named, the interpreted ones are not.
const INTERPRETERS: [&str; 9] = [
    "python",
    "libpython",
    "node",
    "nodejs",
    "libnode",
    "java",
    "libjvm",
    "ruby",
    "libruby",
];

/// Files (executables, libraries) whose parsed symbols are kept at most:
/// past it the symbolizer starts afresh (blazesym caches each file it
/// parses, DWARF included, with no bound of its own).
pub const FILES_MAX: usize = 64;

/// One symbolizer, renewed when it has parsed [`FILES_MAX`] files;
/// [`Symbols::forget`] drops a process's cached maps.
pub struct Symbols {
    symbolizer: Symbolizer,
    /// Files symbolized against since the symbolizer was made.
    files: std::collections::HashSet<String>,
    /// Times the symbolizer was renewed at its bound.
    pub renewed: u64,
    max_files: usize,
}

impl Default for Symbols {
    fn default() -> Self {
        Symbols::with_files_max(FILES_MAX)
    }
}

impl Symbols {
    /// A symbolizer renewed past `n` files.
    pub fn with_files_max(n: usize) -> Self {
        Symbols {
            symbolizer: Symbolizer::new(),
            files: Default::default(),
            renewed: 0,
            max_files: n,
        }
    }

    /// Frames for `addrs` (lookup addresses, innermost first) of `pid`;
    /// an inlined call becomes a frame of its own. A process that has
    /// exited (or cannot be read) is symbolized from `snapshot`, its
    /// mappings as read when it was first flagged, through the files'
    /// paths; without one it is an error.
    pub fn symbolize(
        &mut self,
        pid: u32,
        addrs: &[u64],
        snapshot: Option<&[Mapping]>,
    ) -> Result<Vec<Frame>, String> {
        let frames = match (self.live(pid, addrs), snapshot) {
            (Ok(f), _) => f,
            (Err(_), Some(maps)) => self.through_files(maps, addrs),
            (Err(e), None) => return Err(e),
        };
        self.files
            .extend(frames.iter().filter_map(|f| f.module.clone()));
        if self.files.len() > self.max_files {
            self.symbolizer = Symbolizer::new();
            self.files.clear();
            self.renewed += 1;
        }
        Ok(frames)
    }

    /// Through the live process.
    fn live(&self, pid: u32, addrs: &[u64]) -> Result<Vec<Frame>, String> {
        let mut p = Process::new(Pid::from(pid));
        let syms = match self
            .symbolizer
            .symbolize(&Source::Process(p.clone()), Input::AbsAddr(addrs))
        {
            Ok(s) => s,
            Err(_) => {
                // No map_files without CAP_SYS_ADMIN/CAP_CHECKPOINT_RESTORE:
                // the paths maps names (not deleted binaries, not other
                // mount namespaces).
                p.map_files = false;
                self.symbolizer
                    .symbolize(&Source::Process(p), Input::AbsAddr(addrs))
                    .map_err(|e| e.to_string())?
            }
        };
        let mut out = Vec::with_capacity(addrs.len());
        for (addr, s) in addrs.iter().zip(syms) {
            push_frames(&mut out, *addr, s, None);
        }
        Ok(out)
    }

    /// Through the files a snapshot of the mappings names: each address
    /// becomes a file offset in its mapping's file (a binary deleted since
    /// is not found).
    fn through_files(&self, maps: &[Mapping], addrs: &[u64]) -> Vec<Frame> {
        let mut out = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            let Some(m) = maps.iter().find(|m| m.start <= addr && addr < m.end) else {
                out.push(Frame {
                    addr,
                    ..Frame::default()
                });
                continue;
            };
            let offset = [addr - m.start + m.offset];
            let elf = Elf::new(m.path.trim_end_matches(" (deleted)"));
            match self
                .symbolizer
                .symbolize(&Source::Elf(elf), Input::FileOffset(&offset[..]))
            {
                Ok(mut s) if !s.is_empty() => {
                    push_frames(&mut out, addr, s.remove(0), Some(&m.path));
                }
                _ => out.push(Frame {
                    addr,
                    module: Some(m.path.clone()),
                    ..Frame::default()
                }),
            }
        }
        out
    }

    /// Drops what is cached of a process (it has exited).
    pub fn forget(&mut self, pid: u32) {
        let _ = self
            .symbolizer
            .evict(&evict::Evict::Process(evict::Process::new(Pid::from(pid))));
    }
}

/// The frames of one symbolized address (an inlined call is a frame of
/// its own, innermost first); `module` when the source does not say.
fn push_frames(out: &mut Vec<Frame>, addr: u64, s: Symbolized<'_>, module: Option<&str>) {
    match s {
        Symbolized::Sym(sym) => {
            let module = sym
                .module
                .as_ref()
                .map(|m| m.to_string_lossy().into_owned())
                .or_else(|| module.map(str::to_string));
            for inl in sym.inlined.iter().rev() {
                let here = inl.code_info.as_ref().map(location);
                out.push(Frame {
                    addr,
                    function: Some(inl.name.to_string()),
                    file: here.as_ref().map(|h| h.0.clone()),
                    line: here.as_ref().and_then(|h| h.1),
                    module: module.clone(),
                    inlined: true,
                });
            }
            let own = sym.code_info.as_deref().map(location);
            out.push(Frame {
                addr,
                function: Some(sym.name.to_string()),
                file: own.as_ref().map(|h| h.0.clone()),
                line: own.as_ref().and_then(|h| h.1),
                module,
                inlined: false,
            });
        }
        Symbolized::Unknown(_) => out.push(Frame {
            addr,
            module: module.map(str::to_string),
            ..Frame::default()
        }),
    }
}

/// File (with its directory when known) and line.
fn location(c: &blazesym::symbolize::CodeInfo<'_>) -> (String, Option<u32>) {
    (c.to_path().to_string_lossy().into_owned(), c.line)
}

/// Whether a frame's module is an interpreter or VM, whose interpreted
/// frames are not resolved.
pub fn is_interpreter(module: &str) -> bool {
    // "python3.11", "libpython3.11.so.1.0", "libnode.so.108": the name
    // without ".so…" and without its version.
    let name = module.rsplit('/').next().unwrap_or(module);
    let name = name.split(".so").next().unwrap_or(name);
    let name = name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    INTERPRETERS.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_symbolizer_is_renewed_past_its_bound_of_files() {
        let me = std::process::id();
        // One address in this test binary, one in libc.
        let ours = the_symbolizer_is_renewed_past_its_bound_of_files as *const () as u64;
        let libc = libc::getpid as *const () as u64;
        let mut s = Symbols::with_files_max(1);
        let f = s.symbolize(me, &[ours], None).unwrap();
        assert!(f[0].function.is_some(), "{f:?}");
        assert_eq!(s.renewed, 0);
        let f = s.symbolize(me, &[ours, libc], None).unwrap();
        assert!(
            f.iter()
                .any(|f| f.module.as_deref().is_some_and(|m| m.contains("libc"))),
            "{f:?}"
        );
        assert_eq!(s.renewed, 1);
        assert!(s.files.is_empty());
    }

    #[test]
    fn interpreters_are_known_by_their_file_name() {
        assert!(is_interpreter("/usr/bin/python3.11"));
        assert!(is_interpreter(
            "/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0"
        ));
        assert!(is_interpreter("/usr/lib/jvm/java-17/lib/server/libjvm.so"));
        assert!(!is_interpreter("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert!(is_interpreter("/usr/bin/nodejs"));
        assert!(!is_interpreter("/opt/app/nodejs-client"));
        assert!(!is_interpreter("/opt/app/pythonista"));
    }
}
