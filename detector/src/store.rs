//! The incident history: SQLite (bundled), WAL mode, one row per incident
//! with the queried fields as columns and the rest as JSON. It survives
//! daemon restarts and crashes; retention by age and count.
//!
//! ## Files are 0600 whatever the umask
//! Incidents name other users' processes, command lines and destinations,
//! so the database and its `-wal` and `-shm` files are readable by root
//! only. [`Store::open`] creates the database file itself with mode 0600
//! (and tightens an existing one) before SQLite opens it; SQLite then
//! creates `-wal` and `-shm` with the database file's own mode (its
//! `robust_open` fchmods them to it, ignoring the umask), and `open` checks
//! them too. Setting the process umask around the open was the other way,
//! and is racy: the umask is per process, and the daemon has other threads
//! creating files (recordings, sockets) at the same time.
//!
//! ## A corrupt database is moved aside, not fatal
//! A file that is not SQLite, or that fails `PRAGMA quick_check`, is renamed
//! to `<path>.corrupt-<unix secs>` (its `-wal`/`-shm` beside it as
//! `<path>.corrupt-<secs>-wal`, so SQLite can still open the pair for
//! forensics) with a warning naming both paths, and a fresh database is
//! created: the daemon must come up to record the next storm.
use std::{
    fs::OpenOptions,
    io::Read as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};

use crate::incident::{Incident, Sink, SinkError};

/// Mode of every file the store creates.
pub const FILE_MODE: u32 = 0o600;

/// The first 16 bytes of every SQLite 3 database.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {path}: {cause}")]
    CreateDir { path: String, cause: std::io::Error },
    /// Creating the database file, or making it (or its -wal/-shm) 0600.
    #[error("cannot create {path} with mode 0600: {cause}")]
    CreateFile { path: String, cause: std::io::Error },
    #[error("incident database {path}: {cause}")]
    Open {
        path: String,
        cause: rusqlite::Error,
    },
    /// A corrupt database could not be renamed out of the way.
    #[error("incident database {path} is corrupt and cannot be moved to {aside}: {cause}")]
    MoveAside {
        path: String,
        aside: String,
        cause: std::io::Error,
    },
    #[error("incident database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("incident {id} is not valid JSON: {cause}")]
    Corrupt { id: i64, cause: serde_json::Error },
    /// [`Store::put`] needs the number the caller assigned (≥ 1).
    #[error("incident number {number} is not valid: numbers start at 1")]
    BadNumber { number: i64 },
}

pub struct Store {
    conn: Connection,
}

/// What is wrong with a database file, when something is.
#[derive(Debug, PartialEq)]
enum Damage {
    NotSqlite,
    QuickCheck(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::NotSqlite => f.write_str("not a SQLite database"),
            Damage::QuickCheck(r) => write!(f, "PRAGMA quick_check: {r}"),
        }
    }
}

/// `path` with `suffix` appended to its file name (`db` → `db-wal`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Creates `path` if missing, and makes it 0600 either way (fchmod, so
/// neither the umask nor an older, looser file survives).
fn ensure_private(path: &Path, create: bool) -> Result<(), StoreError> {
    let err = |cause| StoreError::CreateFile {
        path: path.display().to_string(),
        cause,
    };
    let file = match OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .mode(FILE_MODE)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if !create && e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    let mode = file.metadata().map_err(err)?.permissions().mode() & 0o7777;
    if mode != FILE_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
            .map_err(err)?;
    }
    Ok(())
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether the file at `path` is damaged. Errors other than "not a
/// database" / "corrupt" (a lock held elsewhere, EACCES) are not damage:
/// they are returned, and nothing is moved.
fn inspect(path: &Path) -> Result<Option<Damage>, StoreError> {
    let open_err = |cause| StoreError::Open {
        path: path.display().to_string(),
        cause,
    };
    let mut head = Vec::with_capacity(16);
    match std::fs::File::open(path) {
        Ok(f) => {
            f.take(16)
                .read_to_end(&mut head)
                .map_err(|cause| StoreError::CreateFile {
                    path: path.display().to_string(),
                    cause,
                })?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(cause) => {
            return Err(StoreError::CreateFile {
                path: path.display().to_string(),
                cause,
            });
        }
    }
    // An empty file is a database SQLite has yet to write.
    if head.is_empty() {
        return Ok(None);
    }
    if head.as_slice() != SQLITE_MAGIC {
        return Ok(Some(Damage::NotSqlite));
    }
    let conn =
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE).map_err(open_err)?;
    let verdict: Result<Vec<String>, rusqlite::Error> = conn
        .prepare("PRAGMA quick_check")
        .and_then(|mut st| st.query_map([], |r| r.get(0))?.collect());
    match verdict {
        Ok(rows) if rows.len() == 1 && rows[0] == "ok" => Ok(None),
        Ok(rows) => Ok(Some(Damage::QuickCheck(rows.join("; ")))),
        Err(e) if is_damage(&e) => Ok(Some(Damage::QuickCheck(e.to_string()))),
        Err(e) => Err(open_err(e)),
    }
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt)
    )
}

/// Renames the database and its -wal/-shm out of the way; returns where
/// the database went.
fn move_aside(path: &Path, damage: &Damage) -> Result<PathBuf, StoreError> {
    let aside = with_suffix(path, &format!(".corrupt-{}", unix_secs()));
    std::fs::rename(path, &aside).map_err(|cause| StoreError::MoveAside {
        path: path.display().to_string(),
        aside: aside.display().to_string(),
        cause,
    })?;
    for suffix in ["-wal", "-shm"] {
        let from = with_suffix(path, suffix);
        let to = with_suffix(&aside, suffix);
        match std::fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(cause) => {
                return Err(StoreError::MoveAside {
                    path: from.display().to_string(),
                    aside: to.display().to_string(),
                    cause,
                });
            }
        }
    }
    tracing::warn!(
        path = %path.display(),
        aside = %aside.display(),
        %damage,
        "incident database {} is corrupt ({damage}): moved to {}; starting a fresh one",
        path.display(),
        aside.display()
    );
    Ok(aside)
}

impl Store {
    /// Opens (creating if needed) the database at `path`, mode 0600; a
    /// corrupt one is moved aside and replaced (see the module docs).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|cause| StoreError::CreateDir {
                path: dir.display().to_string(),
                cause,
            })?;
        }
        if let Some(damage) = inspect(path)? {
            move_aside(path, &damage)?;
        }
        ensure_private(path, true)?;
        // Left by an older daemon, maybe looser.
        for suffix in ["-wal", "-shm"] {
            ensure_private(&with_suffix(path, suffix), false)?;
        }
        let conn = Connection::open(path).map_err(|cause| StoreError::Open {
            path: path.display().to_string(),
            cause,
        })?;
        // WAL: readers (the API) never block the writer (the daemon loop),
        // and a crash loses at most the last transaction.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS incidents (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 active INTEGER NOT NULL,
                 started_at INTEGER NOT NULL,
                 updated_at INTEGER NOT NULL,
                 pid INTEGER,
                 body TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS incidents_started ON incidents(started_at);
             CREATE INDEX IF NOT EXISTS incidents_pid ON incidents(pid);",
        )?;
        // SQLite gives -wal/-shm the database's mode; make sure.
        for suffix in ["-wal", "-shm"] {
            ensure_private(&with_suffix(path, suffix), false)?;
        }
        Ok(Store { conn })
    }

    /// Opens an existing database for reading only, without creating,
    /// checking or moving anything: for the API, which must never race the
    /// daemon's own [`Store::open`] into moving a live database aside.
    pub fn open_reader(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|cause| StoreError::Open {
            path: path.display().to_string(),
            cause,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(2))?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(Store { conn })
    }

    /// Stores a new incident; returns its number.
    pub fn insert(&self, inc: &Incident) -> Result<i64, StoreError> {
        self.conn.execute(
            "INSERT INTO incidents (active, started_at, updated_at, pid, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![inc.active, inc.started_at, inc.updated_at, inc.pid, body(inc)],
        )?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Writes an incident under the number its caller assigned
    /// (`inc.number`, ≥ 1): inserted when new, rewritten when it exists.
    /// The writer thread numbers incidents itself (from [`Store::max_id`])
    /// so that opening one never waits for the disk.
    pub fn put(&self, inc: &Incident) -> Result<(), StoreError> {
        if inc.number < 1 {
            return Err(StoreError::BadNumber { number: inc.number });
        }
        self.conn.execute(
            "INSERT INTO incidents (id, active, started_at, updated_at, pid, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT(id) DO UPDATE SET
                 active = excluded.active,
                 started_at = excluded.started_at,
                 updated_at = excluded.updated_at,
                 pid = excluded.pid,
                 body = excluded.body",
            params![
                inc.number,
                inc.active,
                inc.started_at,
                inc.updated_at,
                inc.pid,
                body(inc)
            ],
        )?;
        Ok(())
    }

    /// The highest incident number ever used: the larger of the highest
    /// stored id and AUTOINCREMENT's high-water mark, so numbers of deleted
    /// incidents are never handed out again. 0 when none was ever stored.
    pub fn max_id(&self) -> Result<i64, StoreError> {
        let stored: Option<i64> =
            self.conn
                .query_row("SELECT MAX(id) FROM incidents", [], |r| r.get(0))?;
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'incidents'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(stored.unwrap_or(0).max(seq.unwrap_or(0)).max(0))
    }

    /// Rewrites an incident (its `number` says which).
    pub fn update(&self, inc: &Incident) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE incidents SET active = ?1, updated_at = ?2, body = ?3 WHERE id = ?4",
            params![inc.active, inc.updated_at, body(inc), inc.number],
        )?;
        Ok(())
    }

    fn rows(&self, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Incident>, StoreError> {
        let mut stmt = self.conn.prepare(sql)?;
        let rows = stmt.query_map(args, |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, text) = row?;
            let mut inc: Incident =
                serde_json::from_str(&text).map_err(|cause| StoreError::Corrupt { id, cause })?;
            inc.set_number(id);
            out.push(inc);
        }
        Ok(out)
    }

    /// Incidents started at or after `since_ms` (unix ms), newest first.
    pub fn list(
        &self,
        since_ms: i64,
        active_only: bool,
        limit: u32,
    ) -> Result<Vec<Incident>, StoreError> {
        self.rows(
            "SELECT id, body FROM incidents WHERE started_at >= ?1 AND (active = 1 OR ?2 = 0)
             ORDER BY id DESC LIMIT ?3",
            params![since_ms, active_only, limit],
        )
    }

    pub fn get(&self, number: i64) -> Result<Option<Incident>, StoreError> {
        Ok(self
            .rows(
                "SELECT id, body FROM incidents WHERE id = ?1",
                params![number],
            )?
            .pop())
    }

    /// The most recent incident of a process: its own, or a group
    /// incident that lists it as a member (a child of a storming parent has
    /// no incident of its own; see `incident`). Members live in the JSON
    /// body, so this scans; it answers one interactive `explain`.
    pub fn latest_for_pid(&self, pid: u32) -> Result<Option<Incident>, StoreError> {
        Ok(self
            .rows(
                "SELECT id, body FROM incidents WHERE pid = ?1
                     OR EXISTS (SELECT 1 FROM json_each(incidents.body, '$.members') WHERE value = ?1)
                 ORDER BY id DESC LIMIT 1",
                params![pid],
            )?
            .pop())
    }

    /// Incidents ever recorded (ids are never reused).
    pub fn total(&self) -> Result<u64, StoreError> {
        let n: Option<i64> = self
            .conn
            .query_row(
                "SELECT seq FROM sqlite_sequence WHERE name = 'incidents'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok(n.unwrap_or(0).max(0) as u64)
    }

    /// Incidents still marked active from a daemon that is gone: closed at
    /// their last update. Returns how many.
    pub fn close_dangling(&self, reason: &str) -> Result<usize, StoreError> {
        let open = self.rows("SELECT id, body FROM incidents WHERE active = 1", [])?;
        for mut inc in open.iter().cloned() {
            inc.active = false;
            inc.ended_at = Some(inc.updated_at);
            inc.end_reason = Some(reason.to_string());
            self.update(&inc)?;
        }
        Ok(open.len())
    }

    /// Deletes incidents older than `retention_days` and beyond the newest
    /// `max_incidents`. Returns how many went.
    pub fn retain(
        &self,
        now_ms: i64,
        retention_days: u32,
        max_incidents: u32,
    ) -> Result<usize, StoreError> {
        let cutoff = now_ms.saturating_sub(i64::from(retention_days) * 86_400_000);
        let by_age = self.conn.execute(
            "DELETE FROM incidents WHERE active = 0 AND started_at < ?1",
            params![cutoff],
        )?;
        let by_count = self.conn.execute(
            "DELETE FROM incidents WHERE active = 0 AND id NOT IN
                 (SELECT id FROM incidents ORDER BY id DESC LIMIT ?1)",
            params![max_incidents],
        )?;
        Ok(by_age + by_count)
    }
}

fn body(inc: &Incident) -> String {
    serde_json::to_string(inc).unwrap_or_else(|_| "{}".into())
}

/// Runs `f` with the process umask set to `mask`, restoring it after;
/// tests that change the umask (it is per process) run one at a time.
/// The store as a [`Sink`]: written at once, on the caller's thread (tests
/// and tools; the daemon writes through `service::writer`).
impl Sink for Store {
    fn insert(&mut self, inc: &Incident) -> Result<i64, SinkError> {
        Store::insert(self, inc).map_err(|e| SinkError(Box::new(e)))
    }

    fn update(&mut self, inc: &Incident) -> Result<(), SinkError> {
        Store::update(self, inc).map_err(|e| SinkError(Box::new(e)))
    }
}

#[cfg(test)]
pub(crate) fn with_umask<T>(mask: libc::mode_t, f: impl FnOnce() -> T) -> T {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: umask has no preconditions; the old mask is restored below.
    let old = unsafe { libc::umask(mask) };
    let out = f();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the temp dir, removed when dropped.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("sg-store-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn incident(number: i64, pid: u32, started_at: i64) -> Incident {
        let mut inc: Incident = serde_json::from_value(serde_json::json!({
            "id": "", "kind": "flow", "active": true, "state": "storm",
            "pid": pid, "process_start": null, "comm": "x", "exe": null,
            "cmdline": null, "uid": null, "ppid": null, "cgroup_id": null,
            "cgroup": null, "unit": null, "container": null, "proto": "tcp",
            "destination": "127.0.0.1:9", "netns": 0, "started_at": started_at,
            "updated_at": started_at, "ended_at": null, "end_reason": null,
            "peak_rate": 1.0, "total_attempts": 1, "total_failures": 1,
            "failure_mix": [], "gap_histogram": [], "median_gap_us": null,
            "backoff": "", "explanation": "e", "timeline": [], "members": [],
            "syscalls_per_s": null
        }))
        .expect("incident JSON");
        inc.set_number(number);
        inc
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn database_wal_and_shm_are_0600_with_umask_0() {
        let dir = TempDir::new("mode");
        let path = dir.0.join("sub").join("db.sqlite");
        with_umask(0, || {
            let st = Store::open(&path).unwrap();
            st.put(&incident(1, 7, 1_000)).unwrap();
            for p in [
                path.clone(),
                with_suffix(&path, "-wal"),
                with_suffix(&path, "-shm"),
            ] {
                assert!(p.exists(), "{} missing", p.display());
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
            drop(st);
            // A database left 0644 by an older daemon is tightened.
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let _st = Store::open(&path).unwrap();
            assert_eq!(mode(&path), 0o600);
        });
    }

    #[test]
    fn put_inserts_then_updates_by_number_and_max_id_never_goes_back() {
        let dir = TempDir::new("put");
        let st = Store::open(&dir.0.join("db.sqlite")).unwrap();
        assert_eq!(st.max_id().unwrap(), 0);
        let mut a = incident(5, 10, 1_000);
        st.put(&a).unwrap();
        let mut b = incident(3, 11, 2_000);
        b.active = false;
        st.put(&b).unwrap();
        assert_eq!(st.max_id().unwrap(), 5);
        a.active = false;
        a.updated_at = 9_000;
        a.total_attempts = 42;
        st.put(&a).unwrap();
        let got = st.get(5).unwrap().unwrap();
        assert_eq!(
            (got.active, got.updated_at, got.total_attempts),
            (false, 9_000, 42)
        );
        assert_eq!(got.id, "inc-5");
        assert_eq!(st.list(0, false, 10).unwrap().len(), 2);
        assert_eq!(st.list(0, true, 10).unwrap().len(), 0);
        // After deleting the newest, its number is still taken.
        st.retain(10_000, 30, 1).unwrap();
        assert!(st.get(5).unwrap().is_some() && st.get(3).unwrap().is_none());
        let all_gone = st.conn.execute("DELETE FROM incidents", []).unwrap();
        assert_eq!(all_gone, 1);
        assert_eq!(st.max_id().unwrap(), 5);
        assert_eq!(st.total().unwrap(), 5);
        // insert continues after the high-water mark.
        assert_eq!(st.insert(&incident(0, 1, 1)).unwrap(), 6);
        assert!(matches!(
            st.put(&incident(0, 1, 1)),
            Err(StoreError::BadNumber { number: 0 })
        ));
    }

    fn asides(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().contains(".corrupt-"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn garbage_is_moved_aside_and_a_fresh_database_created() {
        let dir = TempDir::new("garbage");
        let path = dir.0.join("db.sqlite");
        let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(&path, &garbage).unwrap();
        let st = Store::open(&path).unwrap();
        assert_eq!(st.max_id().unwrap(), 0);
        st.put(&incident(1, 1, 1)).unwrap();
        let moved = asides(&dir.0);
        assert_eq!(moved.len(), 1, "{moved:?}");
        let name = moved[0].file_name().unwrap().to_string_lossy().into_owned();
        let secs: u64 = name
            .strip_prefix("db.sqlite.corrupt-")
            .unwrap_or_else(|| panic!("{name}"))
            .parse()
            .unwrap();
        assert!(secs.abs_diff(unix_secs()) < 120, "{secs}");
        assert_eq!(std::fs::read(&moved[0]).unwrap(), garbage);
        assert_eq!(std::fs::read(&path).unwrap()[..16], SQLITE_MAGIC[..]);
    }

    #[test]
    fn a_database_failing_quick_check_is_moved_aside() {
        let dir = TempDir::new("quick");
        let path = dir.0.join("db.sqlite");
        {
            let st = Store::open(&path).unwrap();
            for n in 1..=200 {
                st.put(&incident(n, n as u32, n)).unwrap();
            }
            st.conn
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .unwrap();
        }
        // Keep the header, scribble over the pages after the first.
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 8192, "{}", bytes.len());
        for b in &mut bytes[4096..] {
            *b = 0x5a;
        }
        std::fs::write(&path, &bytes).unwrap();
        let st = Store::open(&path).unwrap();
        assert_eq!(st.max_id().unwrap(), 0);
        let moved = asides(&dir.0);
        assert_eq!(moved.len(), 1, "{moved:?}");
        assert_eq!(std::fs::read(&moved[0]).unwrap(), bytes);
    }

    #[test]
    fn a_healthy_database_is_kept() {
        let dir = TempDir::new("healthy");
        let path = dir.0.join("db.sqlite");
        Store::open(&path).unwrap().put(&incident(4, 1, 1)).unwrap();
        let st = Store::open(&path).unwrap();
        assert_eq!(st.max_id().unwrap(), 4);
        assert!(asides(&dir.0).is_empty());
        // An empty file is a database not yet written, not damage.
        let empty = dir.0.join("empty.sqlite");
        std::fs::write(&empty, b"").unwrap();
        Store::open(&empty).unwrap();
        assert!(asides(&dir.0).is_empty());
    }

    #[test]
    fn the_reader_reads_and_never_creates() {
        let dir = TempDir::new("reader");
        let path = dir.0.join("db.sqlite");
        assert!(matches!(
            Store::open_reader(&path),
            Err(StoreError::Open { .. })
        ));
        assert!(!path.exists());
        let st = Store::open(&path).unwrap();
        st.put(&incident(2, 9, 1)).unwrap();
        let r = Store::open_reader(&path).unwrap();
        assert_eq!(r.get(2).unwrap().unwrap().pid, Some(9));
        assert!(r.put(&incident(3, 9, 1)).is_err(), "the reader wrote");
    }
}
