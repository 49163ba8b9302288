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
        source::{Process, Source},
    },
};

use super::Frame;

/// Module names of runtimes whose own frames are interpreted code: their
/// native frames are named, the interpreted ones are not.
const INTERPRETERS: [&str; 6] = ["python", "libpython", "node", "libnode", "libjvm", "ruby"];

/// One symbolizer for the daemon's life; blazesym caches each file it
/// parses, and [`Symbols::forget`] drops a process's cached maps.
pub struct Symbols {
    symbolizer: Symbolizer,
}

impl Default for Symbols {
    fn default() -> Self {
        Symbols {
            symbolizer: Symbolizer::new(),
        }
    }
}

impl Symbols {
    /// Frames for `addrs` (lookup addresses, innermost first) of `pid`;
    /// an inlined call becomes a frame of its own. Errors when the process
    /// cannot be read (gone, or not permitted).
    pub fn symbolize(&self, pid: u32, addrs: &[u64]) -> Result<Vec<Frame>, String> {
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
            match s {
                Symbolized::Sym(sym) => {
                    let module = sym
                        .module
                        .as_ref()
                        .map(|m| m.to_string_lossy().into_owned());
                    // Innermost inlined call first, then outward.
                    for inl in sym.inlined.iter().rev() {
                        let here = inl.code_info.as_ref().map(location);
                        out.push(Frame {
                            addr: *addr,
                            function: Some(inl.name.to_string()),
                            file: here.as_ref().map(|h| h.0.clone()),
                            line: here.as_ref().and_then(|h| h.1),
                            module: module.clone(),
                            inlined: true,
                        });
                    }
                    let own = sym.code_info.as_deref().map(location);
                    out.push(Frame {
                        addr: *addr,
                        function: Some(sym.name.to_string()),
                        file: own.as_ref().map(|h| h.0.clone()),
                        line: own.as_ref().and_then(|h| h.1),
                        module,
                        inlined: false,
                    });
                }
                Symbolized::Unknown(_) => out.push(Frame {
                    addr: *addr,
                    ..Frame::default()
                }),
            }
        }
        Ok(out)
    }

    /// Drops what is cached of a process (it has exited).
    pub fn forget(&mut self, pid: u32) {
        let _ = self
            .symbolizer
            .evict(&evict::Evict::Process(evict::Process::new(Pid::from(pid))));
    }
}

/// File (with its directory when known) and line.
fn location(c: &blazesym::symbolize::CodeInfo<'_>) -> (String, Option<u32>) {
    (c.to_path().to_string_lossy().into_owned(), c.line)
}

/// Whether a frame's module is an interpreter or VM, whose interpreted
/// frames are not resolved.
pub fn is_interpreter(module: &str) -> bool {
    let name = module.rsplit('/').next().unwrap_or(module);
    INTERPRETERS.iter().any(|i| name.starts_with(i))
}
