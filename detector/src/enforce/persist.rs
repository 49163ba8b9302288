//! Manual budgets survive a restart: written to a JSON file beside the
//! database (0600, replaced atomically) each time they change, read back
//! at start. Times are wall-clock there; the kernel's monotonic expiry is
//! recomputed on load.
use std::{
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use super::table::Entry;

/// Where the budgets of a daemon whose database is `db` are kept.
pub fn path_beside(db: &Path) -> PathBuf {
    db.with_file_name("throttles.json")
}

/// Writes `entries` to `path`, replacing it only once written in full.
pub fn save<'a>(path: &Path, entries: impl Iterator<Item = &'a Entry>) -> std::io::Result<()> {
    let list: Vec<&Entry> = entries.collect();
    let text = serde_json::to_vec_pretty(&list).map_err(std::io::Error::other)?;
    write_private(path, &text)
}

/// Writes `bytes` to `path` (0600), replacing it only once written in
/// full and synced: a crash leaves the old file or the new one.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The budgets saved at `path`; none when there is no file. A file that
/// does not parse is an error (the caller moves it aside).
pub fn load(path: &Path) -> std::io::Result<Vec<Entry>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}
