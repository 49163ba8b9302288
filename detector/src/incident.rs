//! Incidents: one per storm of a flow or roll-up, from the first storm
//! verdict until the storm is resolved. Each carries who (process identity,
//! service or container), where, how many, failing how, whether it backed
//! off, and the attempt rate second by second; the tracker keeps them in
//! the store as they evolve, so a crash loses at most a second.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{
    detect::{Engine, State, Subject, VerdictChange},
    ingest::procs::{ProcessTable, unit_and_container},
    store::{Store, StoreError},
};

/// Longest timeline kept, in seconds (one point per second).
pub const TIMELINE_MAX: usize = 3_600;

/// One incident. `id` is `inc-<number>` so it never reads as a pid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    #[serde(skip)]
    pub number: i64,
    /// "flow" (one process), "parent" (children of one process) or "cgroup".
    pub kind: String,
    pub active: bool,
    pub state: String,
    pub pid: Option<u32>,
    pub process_start: Option<u64>,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: Option<u32>,
    pub ppid: Option<u32>,
    pub cgroup_id: Option<u64>,
    pub cgroup: Option<String>,
    pub unit: Option<String>,
    pub container: Option<String>,
    pub proto: String,
    pub destination: String,
    pub netns: u64,
    /// Unix milliseconds.
    pub started_at: i64,
    pub updated_at: i64,
    pub ended_at: Option<i64>,
    pub end_reason: Option<String>,
    pub peak_rate: f64,
    pub total_attempts: u64,
    pub total_failures: u64,
    pub failure_mix: Vec<(String, u32)>,
    pub gap_histogram: Vec<(String, u32)>,
    pub median_gap_us: Option<u32>,
    pub backoff: String,
    pub explanation: String,
    /// Attempts per second, one point per second since it started.
    pub timeline: Vec<f32>,
    /// Processes in it (roll-ups list their member flows' pids).
    pub members: Vec<u32>,
    pub syscalls_per_s: Option<f64>,
}

impl Incident {
    pub fn set_number(&mut self, n: i64) {
        self.number = n;
        self.id = format!("inc-{n}");
    }
}

/// Parses "inc-42" into 42.
pub fn parse_id(s: &str) -> Option<i64> {
    s.strip_prefix("inc-")?.parse().ok().filter(|n| *n > 0)
}

/// Opens, updates and closes incidents from verdict changes.
pub struct IncidentTracker {
    open: HashMap<Subject, Incident>,
    /// Incidents opened since start (for metrics).
    pub opened: u64,
}

impl Default for IncidentTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl IncidentTracker {
    pub fn new() -> Self {
        IncidentTracker {
            open: HashMap::new(),
            opened: 0,
        }
    }

    pub fn active(&self) -> impl Iterator<Item = &Incident> {
        self.open.values()
    }

    /// Opens an incident for each new storm and closes resolved ones.
    /// Returns the incidents opened.
    pub fn on_changes(
        &mut self,
        changes: &[VerdictChange],
        engine: &Engine,
        procs: &mut ProcessTable,
        store: &Store,
        now_ms: i64,
    ) -> Result<Vec<Incident>, StoreError> {
        let mut opened = Vec::new();
        for c in changes {
            match c.to {
                State::Storm if !self.open.contains_key(&c.subject) => {
                    let mut inc = identify(&c.subject, c, procs, now_ms);
                    refresh(&mut inc, engine, &c.subject, now_ms);
                    let n = store.insert(&inc)?;
                    inc.set_number(n);
                    store.update(&inc)?;
                    self.opened += 1;
                    opened.push(inc.clone());
                    self.open.insert(c.subject, inc);
                }
                State::Resolved | State::Healthy => {
                    if let Some(mut inc) = self.open.remove(&c.subject) {
                        refresh(&mut inc, engine, &c.subject, now_ms);
                        inc.active = false;
                        inc.state = c.to.as_str().into();
                        inc.ended_at = Some(now_ms);
                        inc.end_reason = Some("resolved".into());
                        inc.explanation = c.explanation.clone();
                        store.update(&inc)?;
                    }
                }
                _ => {
                    if let Some(inc) = self.open.get_mut(&c.subject) {
                        inc.state = c.to.as_str().into();
                    }
                }
            }
        }
        Ok(opened)
    }

    /// Once a second: appends to each open incident's timeline and saves it.
    pub fn every_second(
        &mut self,
        engine: &Engine,
        store: &Store,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        for (subject, inc) in self.open.iter_mut() {
            refresh(inc, engine, subject, now_ms);
            if inc.timeline.len() < TIMELINE_MAX {
                inc.timeline.push(
                    engine
                        .subject_stats(subject)
                        .map(|s| s.rate as f32)
                        .unwrap_or(0.0),
                );
            }
            store.update(inc)?;
        }
        Ok(())
    }

    /// The daemon is stopping: close what is open.
    pub fn close_all(
        &mut self,
        store: &Store,
        now_ms: i64,
        reason: &str,
    ) -> Result<(), StoreError> {
        for (_, mut inc) in self.open.drain() {
            inc.active = false;
            inc.ended_at = Some(now_ms);
            inc.end_reason = Some(reason.into());
            store.update(&inc)?;
        }
        Ok(())
    }
}

/// A new incident with the identity of its subject.
fn identify(
    subject: &Subject,
    c: &VerdictChange,
    procs: &mut ProcessTable,
    now_ms: i64,
) -> Incident {
    let dest = subject.dest();
    let (kind, pid, cgroup_id) = match *subject {
        Subject::Flow { pid, .. } => ("flow", Some(pid), None),
        Subject::Parent { ppid, .. } => ("parent", Some(ppid), None),
        Subject::Cgroup { cgroup, .. } => ("cgroup", None, Some(cgroup)),
    };
    let info = pid.map(|p| procs.describe(p));
    let cgroup = info.as_ref().and_then(|i| i.cgroup.clone());
    let (unit, container) = cgroup
        .as_deref()
        .map(unit_and_container)
        .unwrap_or((None, None));
    Incident {
        id: String::new(),
        number: 0,
        kind: kind.into(),
        active: true,
        state: State::Storm.as_str().into(),
        pid,
        process_start: info.as_ref().and_then(|i| i.start_time),
        comm: info
            .as_ref()
            .map(|i| i.comm.to_string())
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| c.comm.to_string()),
        exe: info.as_ref().and_then(|i| i.exe.clone()),
        cmdline: info.as_ref().and_then(|i| i.cmdline.clone()),
        uid: info.as_ref().and_then(|i| i.uid),
        ppid: info.as_ref().and_then(|i| i.ppid),
        cgroup_id,
        cgroup,
        unit,
        container,
        proto: match dest.proto {
            crate::ingest::Proto::Tcp => "tcp".into(),
            crate::ingest::Proto::Udp => "udp".into(),
        },
        destination: dest.to_string(),
        netns: dest.netns,
        started_at: now_ms,
        updated_at: now_ms,
        ended_at: None,
        end_reason: None,
        peak_rate: 0.0,
        total_attempts: 0,
        total_failures: 0,
        failure_mix: Vec::new(),
        gap_histogram: Vec::new(),
        median_gap_us: None,
        backoff: String::new(),
        explanation: c.explanation.clone(),
        timeline: Vec::new(),
        members: Vec::new(),
        syscalls_per_s: None,
    }
}

/// Copies the engine's current numbers into the incident.
fn refresh(inc: &mut Incident, engine: &Engine, subject: &Subject, now_ms: i64) {
    inc.updated_at = now_ms;
    let Some(s) = engine.subject_stats(subject) else {
        return;
    };
    inc.peak_rate = inc.peak_rate.max(s.rate);
    inc.total_attempts = inc.total_attempts.max(s.run_attempts);
    inc.total_failures = inc.total_failures.max(s.run_failures);
    inc.failure_mix = s.errors;
    inc.gap_histogram = s.gap_histogram;
    inc.median_gap_us = s.median_gap_us;
    inc.backoff = s.backoff;
    inc.explanation = s.explanation;
    inc.state = s.state.as_str().into();
    if s.syscalls_per_s.is_some() {
        inc.syscalls_per_s = s.syscalls_per_s;
    }
    for m in s.members {
        if !inc.members.contains(&m) && inc.members.len() < 64 {
            inc.members.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{DetectConfig, synthetic};

    #[test]
    fn ids_are_prefixed() {
        assert_eq!(parse_id("inc-42"), Some(42));
        assert_eq!(parse_id("42"), None);
        assert_eq!(parse_id("inc-0"), None);
        assert_eq!(parse_id("inc-x"), None);
    }

    #[test]
    fn a_storm_becomes_one_incident_that_closes_when_resolved() {
        let dir = std::env::temp_dir().join(format!("sg-inc-{}", std::process::id()));
        let store = Store::open(&dir.join("db.sqlite")).unwrap();
        let mut engine = Engine::new(DetectConfig::default());
        let mut procs = ProcessTable::new("/nonexistent", 16);
        let mut tracker = IncidentTracker::new();
        let d = synthetic::dest(8080);
        let mut t = 1_000_000_000u64;
        for i in 0..3_000u64 {
            engine.observe(&synthetic::refused(t, 4242, d));
            t += 1_000_000;
            if i % 100 == 99 {
                let changes = engine.tick(t);
                tracker
                    .on_changes(
                        &changes,
                        &engine,
                        &mut procs,
                        &store,
                        (t / 1_000_000) as i64,
                    )
                    .unwrap();
                if i % 1_000 == 999 {
                    tracker
                        .every_second(&engine, &store, (t / 1_000_000) as i64)
                        .unwrap();
                }
            }
        }
        let list = store.list(0, true, 10).unwrap();
        assert_eq!(list.len(), 1);
        let inc = &list[0];
        assert_eq!(inc.id, "inc-1");
        assert_eq!((inc.kind.as_str(), inc.pid), ("flow", Some(4242)));
        assert_eq!(inc.destination, "127.0.0.1:8080");
        assert_eq!(inc.failure_mix, vec![("ECONNREFUSED".to_string(), 3_000)]);
        assert!(inc.peak_rate >= 900.0, "{}", inc.peak_rate);
        assert_eq!(inc.timeline.len(), 3, "one point per second while open");
        // Quiet for 6 s: resolved and closed.
        for _ in 0..60 {
            t += 100_000_000;
            let changes = engine.tick(t);
            tracker
                .on_changes(
                    &changes,
                    &engine,
                    &mut procs,
                    &store,
                    (t / 1_000_000) as i64,
                )
                .unwrap();
        }
        assert!(store.list(0, true, 10).unwrap().is_empty());
        let closed = store.get(1).unwrap().unwrap();
        assert!(!closed.active);
        assert_eq!(closed.end_reason.as_deref(), Some("resolved"));
        assert_eq!(closed.total_attempts, 3_000);
        assert_eq!(store.total().unwrap(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dangling_incidents_close_and_retention_trims() {
        let dir = std::env::temp_dir().join(format!("sg-ret-{}", std::process::id()));
        let store = Store::open(&dir.join("db.sqlite")).unwrap();
        let mut procs = ProcessTable::new("/nonexistent", 16);
        let change = VerdictChange {
            ts_ns: 0,
            subject: Subject::Flow {
                pid: 1,
                dest: synthetic::dest(1),
            },
            comm: "x".into(),
            from: State::Suspect,
            to: State::Storm,
            score: 100,
            run_start_ns: 0,
            persistent_failure: false,
            explanation: "x".into(),
        };
        for day in 0..5i64 {
            let inc = identify(&change.subject, &change, &mut procs, day * 86_400_000);
            store.insert(&inc).unwrap();
        }
        assert_eq!(store.close_dangling("daemon stopped").unwrap(), 5);
        assert!(store.list(0, true, 10).unwrap().is_empty());
        // Keep 2 days and at most 2 incidents.
        let gone = store.retain(5 * 86_400_000, 2, 2).unwrap();
        assert_eq!(gone, 3);
        let left: Vec<String> = store
            .list(0, false, 10)
            .unwrap()
            .into_iter()
            .map(|i| i.id)
            .collect();
        assert_eq!(left, vec!["inc-5", "inc-4"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
