//! Recordings: what the sensors saw, as JSON lines, so a storm can be
//! replayed through the engine without a kernel. A line is an observation
//! or an engine tick; replaying both in order gives the live verdicts.
use std::io::{BufRead, Write};

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
