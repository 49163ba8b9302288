//! The incident history: SQLite (bundled), WAL mode, one row per incident
//! with the queried fields as columns and the rest as JSON. It survives
//! daemon restarts and crashes; retention by age and count.
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use crate::incident::Incident;

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create {path}: {cause}")]
    CreateDir { path: String, cause: std::io::Error },
    #[error("incident database {path}: {cause}")]
    Open {
        path: String,
        cause: rusqlite::Error,
    },
    #[error("incident database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("incident {id} is not valid JSON: {cause}")]
    Corrupt { id: i64, cause: serde_json::Error },
}

pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|cause| StoreError::CreateDir {
                path: dir.display().to_string(),
                cause,
            })?;
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
        let cutoff = now_ms - i64::from(retention_days) * 86_400_000;
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
