//! Recordings: what the sensors saw, as JSON lines, so a storm can be
//! replayed through the engine without a kernel. A line is an observation
//! or an engine tick; replaying both in order gives the live verdicts.
use std::{
    io::{BufRead, Write},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::Path,
};

use serde::{Deserialize, Serialize};

use crate::{
    detect::{DetectConfig, Engine, VerdictChange},
    ingest::Observation,
};

/// One line of a recording.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Line {
    Observation(Observation),
    /// The engine was evaluated at this time.
    Tick {
        ts_ns: u64,
    },
}

/// Why a recording could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("line {line}: {cause}")]
    Parse {
        line: usize,
        cause: serde_json::Error,
    },
    #[error("reading the recording")]
    Io(#[from] std::io::Error),
}

/// Mode of a recording file: it names every process on the host and
/// where it connects, so only its owner reads it.
pub const FILE_MODE: u32 = 0o600;

/// Creates (or truncates) a recording file with mode 0600 whatever the
/// umask: created 0600, then fchmod'ed, so an existing looser file is
/// tightened too.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Writes a recording line by line.
pub struct Recorder<W: Write> {
    out: W,
}

impl<W: Write> Recorder<W> {
    pub fn new(out: W) -> Self {
        Recorder { out }
    }

    pub fn write(&mut self, line: &Line) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, line)?;
        self.out.write_all(b"\n")
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Replays a recording through a fresh engine; returns every change.
pub fn replay(input: impl BufRead, cfg: DetectConfig) -> Result<Vec<VerdictChange>, RecordError> {
    let mut engine = Engine::new(cfg);
    let mut changes = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(&line)
            .map_err(|cause| RecordError::Parse { line: i + 1, cause })?
        {
            Line::Observation(o) => engine.observe(&o),
            Line::Tick { ts_ns } => changes.extend(engine.tick(ts_ns)),
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recordings_are_0600_with_umask_0() {
        let dir = std::env::temp_dir().join(format!("sg-rec-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("r.jsonl");
        crate::store::with_umask(0, || {
            let mut r = Recorder::new(create_private(&path).unwrap());
            r.write(&Line::Tick { ts_ns: 1 }).unwrap();
            r.flush().unwrap();
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode(&path), 0o600);
            // A looser file already there is tightened and truncated.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
            drop(create_private(&path).unwrap());
            assert_eq!(mode(&path), 0o600);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        });
        std::fs::remove_dir_all(&dir).unwrap();
    }

    use proptest::prelude::*;

    /// A valid recording: a refused-connect storm and its ticks.
    fn valid_recording() -> String {
        let mut out = Vec::new();
        let mut r = Recorder::new(&mut out);
        let dest = crate::detect::synthetic::dest(9);
        for i in 0..40u64 {
            let ts = 1_000_000_000 + i * 20_000_000;
            r.write(&Line::Observation(crate::detect::synthetic::refused(
                ts, 4242, dest,
            )))
            .unwrap();
            if i % 5 == 4 {
                r.write(&Line::Tick { ts_ns: ts }).unwrap();
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_valid_recording_replays() {
        let text = valid_recording();
        replay(text.as_bytes(), DetectConfig::default()).unwrap();
    }

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Arbitrary bytes: an error (or nothing, for blank input), never
        /// a panic.
        #[test]
        fn replay_survives_arbitrary_bytes(bytes in fuzz::bytes()) {
            // Blank as the reader sees it: UTF-8 whose every line trims
            // to nothing (Unicode whitespace, e.g. a vertical tab, too).
            let blank = std::str::from_utf8(&bytes)
                .is_ok_and(|t| t.lines().all(|l| l.trim().is_empty()));
            let r = replay(&bytes[..], DetectConfig::default());
            prop_assert!(blank || r.is_err(), "accepted {:?}", String::from_utf8_lossy(&bytes));
        }

        /// Mutations of a valid recording: whatever they replay to, no panic.
        #[test]
        fn replay_survives_mutated_recordings(
            bytes in fuzz::mutations(valid_recording().into_bytes())
        ) {
            let _ = replay(&bytes[..], DetectConfig::default());
        }
    }
}

/// Generators for the malformed-input tests of the config parser, the API
/// request decoder and the replay reader.
#[cfg(test)]
pub(crate) mod fuzz {
    use proptest::prelude::*;

    /// Cases per property: thousands, in seconds.
    pub const CASES: u32 = 4_000;

    pub fn config() -> ProptestConfig {
        ProptestConfig {
            cases: CASES,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// Up to 512 arbitrary bytes, newlines and JSON-ish punctuation likely.
    pub fn bytes() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            4 => any::<u8>(),
            1 => prop::sample::select(b"{}[]\":,\n =.0123456789eE-+tfn#".to_vec()),
        ];
        prop::collection::vec(byte, 0..512)
    }

    /// One edit of a byte string.
    #[derive(Debug, Clone)]
    pub enum Edit {
        Flip(usize, u8),
        Insert(usize, u8),
        Delete(usize, usize),
        Duplicate(usize, usize),
        Truncate(usize),
        Digits(usize),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Flip(i, b)),
            (
                any::<usize>(),
                prop::sample::select(b"{}[]\":,\n-09e.".to_vec())
            )
                .prop_map(|(i, b)| Edit::Insert(i, b)),
            (any::<usize>(), 1usize..32).prop_map(|(i, n)| Edit::Delete(i, n)),
            (any::<usize>(), 1usize..64).prop_map(|(i, n)| Edit::Duplicate(i, n)),
            any::<usize>().prop_map(Edit::Truncate),
            any::<usize>().prop_map(Edit::Digits),
        ]
    }

    fn apply(mut v: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
        for e in edits {
            let len = v.len().max(1);
            match *e {
                Edit::Flip(i, b) if !v.is_empty() => v[i % len] = b,
                Edit::Insert(i, b) => v.insert(i % (v.len() + 1), b),
                Edit::Delete(i, n) if !v.is_empty() => {
                    let at = i % len;
                    let end = (at + n).min(v.len());
                    v.drain(at..end);
                }
                Edit::Duplicate(i, n) if !v.is_empty() => {
                    let at = i % len;
                    let end = (at + n).min(v.len());
                    let piece: Vec<u8> = v[at..end].to_vec();
                    v.splice(at..at, piece);
                }
                Edit::Truncate(i) => v.truncate(i % (v.len() + 1)),
                // Huge and negative numbers where digits were.
                Edit::Digits(i) if !v.is_empty() => {
                    let at = i % len;
                    if v[at].is_ascii_digit() {
                        let big: &[u8] = match i % 4 {
                            0 => b"18446744073709551615",
                            1 => b"-9223372036854775808",
                            2 => b"1e308",
                            _ => b"340282366920938463463374607431768211456",
                        };
                        v.splice(at..at + 1, big.iter().copied());
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// `valid` with 1 to 8 random edits.
    pub fn mutations(valid: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(edit(), 1..8).prop_map(move |edits| apply(valid.clone(), &edits))
    }
}
