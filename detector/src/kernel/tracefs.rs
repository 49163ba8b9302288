//! Tracepoint formats read from tracefs at load time. Fields move between
//! kernels; the programs get the offsets of this kernel, and a field that is
//! missing or has an unexpected size stops the load with its name.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use detector_common::Offsets;

use super::KernelError;

/// One field of a tracepoint format: where it is and how big.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldInfo {
    pub offset: u32,
    pub size: u32,
}

/// Where tracefs is mounted, from /proc/mounts.
pub fn find_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (_dev, dir, fstype) = (parts.next()?, parts.next()?, parts.next()?);
        (fstype == "tracefs").then(|| PathBuf::from(dir))
    })
}

/// The mounted tracefs, or the error that tells how to mount it.
pub fn mount_point() -> Result<PathBuf, KernelError> {
    let mounts = fs::read_to_string("/proc/mounts").map_err(|cause| KernelError::Read {
        path: "/proc/mounts".into(),
        cause,
    })?;
    find_mount(&mounts).ok_or(KernelError::TracefsNotMounted)
}

/// Parses a tracepoint `format` file into field name → offset and size.
pub fn parse_format(text: &str) -> HashMap<String, FieldInfo> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for (i, part) in rest.split(';').enumerate() {
            let part = part.trim();
            if i == 0 {
                decl = Some(part);
            } else if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse().ok();
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "__u8 daddr_v6[16]" → "daddr_v6"
        let Some(name) = decl.split_whitespace().last() else {
            continue;
        };
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_string(), FieldInfo { offset, size });
    }
    fields
}

/// A tracepoint the sensors need.
#[derive(Debug, Clone, Copy)]
pub struct Tracepoint {
    pub category: &'static str,
    pub name: &'static str,
}

impl std::fmt::Display for Tracepoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.category, self.name)
    }
}

/// Reads format files under a tracefs mount.
pub struct Formats {
    root: PathBuf,
}

impl Formats {
    pub fn new(tracefs: &Path) -> Self {
        Formats {
            root: tracefs.join("events"),
        }
    }

    /// True when the kernel has this tracepoint.
    pub fn exists(&self, tp: Tracepoint) -> bool {
        self.root
            .join(tp.category)
            .join(tp.name)
            .join("format")
            .exists()
    }

    fn fields(&self, tp: Tracepoint) -> Result<HashMap<String, FieldInfo>, KernelError> {
        let path = self.root.join(tp.category).join(tp.name).join("format");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(parse_format(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(KernelError::MissingTracepoint(tp.to_string()))
            }
            Err(cause) => Err(KernelError::Read { path, cause }),
        }
    }

    /// Offsets of every field the programs read, with their sizes checked.
    ///
    /// Only the tracepoints of connect outcomes and of processes are
    /// required; they exist in every kernel stormguard was tested on. An
    /// optional tracepoint that is missing or changed gets
    /// [`detector_common::FIELD_ABSENT`] offsets and is returned with its
    /// problem, so the loader can use another hook or name the gap.
    pub fn offsets(&self) -> Result<(Offsets, Vec<(Tracepoint, KernelError)>), KernelError> {
        let mut o = Offsets::default();
        let mut problems = Vec::new();
        let read = |tp: Tracepoint, want: &mut [(&str, u32, &mut u32)]| {
            let fields = self.fields(tp)?;
            for (name, size, slot) in want.iter_mut() {
                let info = fields.get(*name).ok_or_else(|| KernelError::MissingField {
                    tracepoint: tp.to_string(),
                    field: name.to_string(),
                })?;
                if info.size != *size {
                    return Err(KernelError::FieldSize {
                        tracepoint: tp.to_string(),
                        field: name.to_string(),
                        expected: *size,
                        found: info.size,
                    });
                }
                **slot = info.offset;
            }
            Ok::<_, KernelError>(())
        };
        let mut optional = |tp: Tracepoint, want: &mut [(&str, u32, &mut u32)]| {
            if let Err(e) = read(tp, want) {
                for (_, _, slot) in want.iter_mut() {
                    **slot = detector_common::FIELD_ABSENT;
                }
                problems.push((tp, e));
            }
        };
        optional(
            ERROR_REPORT,
            &mut [
                ("error", 4, &mut o.er_error),
                ("sport", 2, &mut o.er_sport),
                ("dport", 2, &mut o.er_dport),
                ("family", 2, &mut o.er_family),
                ("protocol", 2, &mut o.er_protocol),
                ("daddr", 4, &mut o.er_daddr),
                ("daddr_v6", 16, &mut o.er_daddr_v6),
            ],
        );
        optional(
            SEND_LENGTH,
            &mut [
                ("sk", 8, &mut o.sl_sk),
                ("family", 2, &mut o.sl_family),
                ("protocol", 2, &mut o.sl_protocol),
                ("ret", 4, &mut o.sl_ret),
            ],
        );
        optional(
            RECV_LENGTH,
            &mut [
                ("sk", 8, &mut o.rl_sk),
                ("family", 2, &mut o.rl_family),
                ("protocol", 2, &mut o.rl_protocol),
                ("ret", 4, &mut o.rl_ret),
                ("flags", 4, &mut o.rl_flags),
            ],
        );
        optional(RECEIVE_RESET, &mut [("skaddr", 8, &mut o.rr_skaddr)]);
        optional(
            RETRANSMIT,
            &mut [
                ("skaddr", 8, &mut o.rt_skaddr),
                ("state", 4, &mut o.rt_state),
            ],
        );
        optional(EXIT_CONNECT, &mut [("ret", 8, &mut o.xc_ret)]);
        // Optional fields of present tracepoints: `err` (absent on 6.12 and older),
        // `group_dead` since 6.16.
        o.rt_err = self.optional_field(RETRANSMIT, "err", 4);
        o.ex_group_dead = self.optional_field(EXIT, "group_dead", 1);
        read(
            SET_STATE,
            &mut [
                ("skaddr", 8, &mut o.ss_skaddr),
                ("oldstate", 4, &mut o.ss_oldstate),
                ("newstate", 4, &mut o.ss_newstate),
                ("sport", 2, &mut o.ss_sport),
                ("dport", 2, &mut o.ss_dport),
                ("family", 2, &mut o.ss_family),
                ("protocol", 2, &mut o.ss_protocol),
                ("daddr", 4, &mut o.ss_daddr),
                ("daddr_v6", 16, &mut o.ss_daddr_v6),
            ],
        )?;
        read(FORK, &mut [("child_pid", 4, &mut o.fk_child_pid)])?;
        read(EXIT, &mut [("pid", 4, &mut o.ex_pid)])?;
        Ok((o, problems))
    }

    /// The offset of a field some kernels lack, or FIELD_ABSENT.
    fn optional_field(&self, tp: Tracepoint, name: &str, size: u32) -> u32 {
        match self.fields(tp).ok().and_then(|f| f.get(name).copied()) {
            Some(f) if f.size == size => f.offset,
            _ => detector_common::FIELD_ABSENT,
        }
    }
}

pub const SET_STATE: Tracepoint = Tracepoint {
    category: "sock",
    name: "inet_sock_set_state",
};
pub const ERROR_REPORT: Tracepoint = Tracepoint {
    category: "sock",
    name: "inet_sk_error_report",
};
pub const SEND_LENGTH: Tracepoint = Tracepoint {
    category: "sock",
    name: "sock_send_length",
};
pub const RECV_LENGTH: Tracepoint = Tracepoint {
    category: "sock",
    name: "sock_recv_length",
};
pub const RECEIVE_RESET: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_receive_reset",
};
pub const RETRANSMIT: Tracepoint = Tracepoint {
    category: "tcp",
    name: "tcp_retransmit_skb",
};
pub const FORK: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_process_fork",
};
pub const EXEC: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_process_exec",
};
pub const EXIT: Tracepoint = Tracepoint {
    category: "sched",
    name: "sched_process_exit",
};
pub const EXIT_CONNECT: Tracepoint = Tracepoint {
    category: "syscalls",
    name: "sys_exit_connect",
};
pub const SYS_ENTER: Tracepoint = Tracepoint {
    category: "raw_syscalls",
    name: "sys_enter",
};

#[cfg(test)]
mod tests {
    use super::*;

    const SET_STATE_FORMAT: &str = "name: inet_sock_set_state
ID: 1432
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s\"";

    #[test]
    fn parses_names_offsets_and_sizes() {
        let f = parse_format(SET_STATE_FORMAT);
        assert_eq!(f["skaddr"], FieldInfo { offset: 8, size: 8 });
        assert_eq!(
            f["oldstate"],
            FieldInfo {
                offset: 16,
                size: 4
            }
        );
        assert_eq!(
            f["daddr_v6"],
            FieldInfo {
                offset: 56,
                size: 16
            }
        );
        assert_eq!(f["common_type"], FieldInfo { offset: 0, size: 2 });
        assert_eq!(f.len(), 4);
    }

    #[test]
    fn finds_tracefs_in_mounts() {
        let mounts = "proc /proc proc rw 0 0\ntracefs /sys/kernel/tracing tracefs rw 0 0\n";
        assert_eq!(
            find_mount(mounts),
            Some(PathBuf::from("/sys/kernel/tracing"))
        );
        assert_eq!(find_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn a_moved_field_changes_the_offset_and_a_missing_one_is_named() {
        let dir = std::env::temp_dir().join(format!("sg-tracefs-{}", std::process::id()));
        let write = |tp: Tracepoint, body: &str| {
            let d = dir.join("events").join(tp.category).join(tp.name);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("format"), body).unwrap();
        };
        let field = |n: &str, off: u32, size: u32| {
            format!("\tfield:int {n};\toffset:{off};\tsize:{size};\tsigned:0;\n")
        };
        // A kernel that put 8 extra bytes before every set_state field.
        let ss: String = [
            ("skaddr", 16, 8),
            ("oldstate", 24, 4),
            ("newstate", 28, 4),
            ("sport", 32, 2),
            ("dport", 34, 2),
            ("family", 36, 2),
            ("protocol", 38, 2),
            ("daddr", 44, 4),
            ("daddr_v6", 64, 16),
        ]
        .iter()
        .map(|(n, o, s)| field(n, *o, *s))
        .collect();
        write(SET_STATE, &ss);
        let formats = Formats::new(&dir);
        // fork is required and missing: named.
        match formats.offsets() {
            Err(KernelError::MissingTracepoint(name)) => {
                assert_eq!(name, "sched:sched_process_fork")
            }
            other => panic!("expected a missing tracepoint, got {other:?}"),
        }
        write(FORK, &field("child_pid", 12, 4));
        write(EXIT, &field("pid", 8, 4));
        // error_report is optional: missing, its offsets say so.
        let (o, problems) = formats.offsets().unwrap();
        assert_eq!(o.ss_skaddr, 16);
        assert_eq!(o.ss_daddr_v6, 64);
        assert_eq!(o.er_error, detector_common::FIELD_ABSENT);
        assert_eq!(o.ex_group_dead, detector_common::FIELD_ABSENT);
        assert!(problems.iter().any(|(tp, e)| tp.name == ERROR_REPORT.name
            && matches!(e, KernelError::MissingTracepoint(n) if n == "sock:inet_sk_error_report")));
        // Present but without a field it needs: a problem naming the field.
        let er: String = [("error", 8, 4), ("sport", 12, 2)]
            .iter()
            .map(|(n, o, s)| field(n, *o, *s))
            .collect();
        write(ERROR_REPORT, &er);
        let (o, problems) = formats.offsets().unwrap();
        assert_eq!(o.er_error, detector_common::FIELD_ABSENT);
        let named = problems.iter().any(|(_, e)| {
            matches!(e, KernelError::MissingField { tracepoint, field }
                if tracepoint == "sock:inet_sk_error_report" && field == "dport")
        });
        assert!(named, "{problems:?}");
        // group_dead present: its offset is used.
        write(EXIT, &(field("pid", 8, 4) + &field("group_dead", 12, 1)));
        assert_eq!(formats.offsets().unwrap().0.ex_group_dead, 12);
        fs::remove_dir_all(&dir).unwrap();
    }
}
