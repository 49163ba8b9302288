//! Incidents: one per storm, from the first storm verdict until the storm
//! is resolved. Each carries who (process identity, service or container),
//! where, how many processes, failing how, whether it backed off, and the
//! attempt rate second by second; the tracker keeps them in the store as
//! they evolve, so a crash loses at most a second.
//!
//! # One storm, one incident
//!
//! When many processes storm one destination together — 1,000 children of
//! one parent, the workers of a service — the engine reports a storm for
//! every child's flow *and* for the parent and cgroup roll-ups. An operator
//! needs one incident that says "1,000 processes", not 1,002 incidents (nor
//! 2,004 SQLite writes a second). So, per destination, storming subjects
//! rank
//!
//! ```text
//! parent roll-up  >  cgroup roll-up  >  flow
//! ```
//!
//! and a subject whose storm is covered by one above it becomes a *member*
//! of that one's incident instead of an incident of its own. A flow is
//! covered by its process's parent roll-up and its cgroup roll-up (the
//! keys the engine rolled it up by, from [`Groups`]); a cgroup roll-up is
//! covered by a parent roll-up with a member in that cgroup.
//!
//! Why the parent wins over the cgroup: its roll-up holds exactly the
//! children, and it names the process that keeps spawning them — the one
//! to fix or stop — while a cgroup may hold unrelated processes too. The
//! cgroup (path, unit, container) is still recorded in the parent's
//! incident, and its member count if larger.
//!
//! Why *defer* rather than open and merge: roll-ups turn suspect as soon as
//! several processes fail at a rate, usually before any one child has made
//! enough attempts to storm on its own. A storming subject with a suspect
//! (not yet storming) roll-up above it waits — at most [`DEFER_MAX_MS`] —
//! for that roll-up to decide: if it storms, the subject joins its
//! incident; if it calms down, the subject gets its own incident, dated
//! from when it started to wait. So the 1,000 per-child incidents are never
//! written, and `incidents` never lists rows that exist only to say
//! "merged". Merging is still needed when a process storms alone first (its
//! incident is right: it is alone) and siblings join later: when their
//! roll-up's incident opens, the earlier incident is closed with
//! `end_reason` "merged into inc-N" and its process listed as a member.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{
    detect::{Engine, State, Subject, VerdictChange, groups::Groups},
    ingest::{Comm, Destination, procs::ProcessTable, service::Service},
};

/// Longest timeline kept, in seconds (one point per second).
pub const TIMELINE_MAX: usize = 3_600;

/// Longest a storming subject waits for a suspect roll-up above it to
/// storm (and take it in) or calm down (and leave it its own incident).
/// Roll-ups reach a verdict within a second or two of their members.
pub const DEFER_MAX_MS: i64 = 3_000;

/// Most member pids an incident lists.
pub const MEMBERS_MAX: usize = 64;

/// Most members `top_members` names.
pub const TOP_MEMBERS: usize = 8;

/// One process of a group incident.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub pid: u32,
    /// Empty when not known (the process is gone and was never named).
    pub comm: String,
    /// Attempts in its current (or last known) run.
    pub attempts: u64,
}

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
    /// The service it belongs to: systemd unit, container, Kubernetes pod
    /// (see `ingest::service`). None in incidents recorded before it was
    /// kept, or when the cgroup could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
    pub proto: String,
    pub destination: String,
    pub netns: u64,
    /// Unix milliseconds.
    pub started_at: i64,
    pub updated_at: i64,
    pub ended_at: Option<i64>,
    /// "resolved", "daemon stopped", or "merged into inc-N" when a group
    /// incident took this one in.
    pub end_reason: Option<String>,
    pub peak_rate: f64,
    pub total_attempts: u64,
    pub total_failures: u64,
    pub failure_mix: Vec<(String, u32)>,
    pub gap_histogram: Vec<(String, u32)>,
    pub median_gap_us: Option<u32>,
    pub backoff: String,
    pub explanation: String,
    /// Attempts per second, one point per second since it was opened.
    pub timeline: Vec<f32>,
    /// Processes in it (roll-ups list their member flows' pids, at most
    /// [`MEMBERS_MAX`]).
    pub members: Vec<u32>,
    /// Distinct processes that took part: 1 for a flow; for a group, the
    /// most the engine counted in one run of the roll-up (or of a roll-up
    /// merged into it), at least the members listed. 0 in incidents
    /// recorded before it was kept (see [`Incident::processes`]).
    #[serde(default)]
    pub member_count: u64,
    /// The members with the most attempts, busiest first (groups only).
    #[serde(default)]
    pub top_members: Vec<Member>,
    pub syscalls_per_s: Option<f64>,
    /// The call stacks its connects and sends came from, most calls first
    /// (see `stacks`); empty until the first is resolved, and kept when
    /// the processes are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stacks: Vec<crate::stacks::StackShare>,
    /// CPU and memory of its processes while it lasts, and the host's
    /// CPU (see `cost`); None until the first sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<crate::cost::Cost>,
}

impl Incident {
    pub fn set_number(&mut self, n: i64) {
        self.number = n;
        self.id = format!("inc-{n}");
    }

    /// How many processes took part, also for incidents recorded before
    /// `member_count` was kept.
    pub fn processes(&self) -> u64 {
        match (self.member_count, self.kind.as_str()) {
            (0, "flow") => 1,
            (0, _) => self.members.len() as u64,
            (n, _) => n,
        }
    }
}

/// Parses "inc-42" into 42.
pub fn parse_id(s: &str) -> Option<i64> {
    s.strip_prefix("inc-")?.parse().ok().filter(|n| *n > 0)
}

/// Rank in the hierarchy above: lower owns higher.
fn rank(s: &Subject) -> u8 {
    match s {
        Subject::Parent { .. } => 0,
        Subject::Cgroup { .. } => 1,
        Subject::Flow { .. } => 2,
    }
}

/// A storming subject whose storm belongs to another's incident.
#[derive(Debug, Clone, Copy)]
struct Cover {
    owner: Subject,
    /// Its own last state, so that if the owner closes first a subject
    /// still storming gets placed again.
    state: State,
}

/// A storming subject waiting for a suspect roll-up above it.
#[derive(Debug, Clone)]
struct Deferred {
    since_ms: i64,
    comm: Comm,
    explanation: String,
}

/// Where a storming subject's storm goes.
enum Place {
    /// Into this open incident.
    Owner(Subject),
    /// Nowhere yet: a roll-up above it is suspect or storming undecided.
    Wait,
    /// Into an incident of its own.
    Own,
}

/// What placing needs to read: the engine's numbers, who processes are,
/// which roll-ups they count towards.
pub struct Context<'a> {
    pub engine: &'a Engine,
    pub procs: &'a mut ProcessTable,
    pub groups: &'a Groups,
    pub store: &'a mut dyn Sink,
    pub now_ms: i64,
}

/// Where incidents are kept. The daemon's sink is a writer thread with a
/// bounded queue (`service::writer`), so a tick never waits on SQLite and a
/// failing disk costs the history, not detection; tests use the `Store`
/// directly.
pub trait Sink {
    /// Keeps a new incident; returns the number it gets.
    fn insert(&mut self, inc: &Incident) -> Result<i64, SinkError>;
    /// Rewrites an incident (its `number` says which).
    fn update(&mut self, inc: &Incident) -> Result<(), SinkError>;
}

/// Why a [`Sink`] could not keep an incident (the store's own error,
/// boxed so this module does not depend on the store's).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SinkError(pub Box<dyn std::error::Error + Send + Sync>);

/// Most incidents open at once. Storms of many processes towards one
/// destination share one incident, so this is reached only by storms to
/// thousands of distinct destinations at once; beyond it a storm is still
/// detected, shown and counted in metrics, but gets no incident row
/// (counted in [`IncidentTracker::not_opened`]) until one closes.
pub const OPEN_MAX: usize = 1_024;

/// Call stacks an incident lists.
pub const STACKS_SHOWN: usize = 5;

/// Opens, updates, merges and closes incidents from verdict changes.
pub struct IncidentTracker {
    /// Open incidents by the subject that owns them.
    open: HashMap<Subject, Incident>,
    /// Roll-ups that are not healthy, with their state (from the changes).
    rollups: HashMap<Subject, State>,
    /// Storming subjects that are members of another's incident.
    covered: HashMap<Subject, Cover>,
    /// Storming subjects waiting on a roll-up above them.
    deferred: HashMap<Subject, Deferred>,
    /// Incidents opened since start (for metrics).
    pub opened: u64,
    /// Incidents closed as merged into a group incident since start.
    pub merged: u64,
    /// Storms that got no incident because [`OPEN_MAX`] were open.
    pub not_opened: u64,
    /// [`OPEN_MAX`], smaller in tests.
    max_open: usize,
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
            rollups: HashMap::new(),
            covered: HashMap::new(),
            deferred: HashMap::new(),
            opened: 0,
            merged: 0,
            not_opened: 0,
            max_open: OPEN_MAX,
        }
    }

    /// A tracker that keeps at most `n` incidents open.
    pub fn with_max_open(n: usize) -> Self {
        IncidentTracker {
            max_open: n,
            ..Self::new()
        }
    }

    pub fn active(&self) -> impl Iterator<Item = &Incident> {
        self.open.values()
    }

    /// Storming subjects folded into another's incident, now.
    pub fn covered_count(&self) -> usize {
        self.covered.len()
    }

    /// Opens an incident for each new storm that no storm above it covers,
    /// folds covered storms into their group's incident, and closes
    /// resolved ones. Call it every tick, with or without changes: subjects
    /// waiting on a roll-up are placed here too. Returns the incidents
    /// opened.
    pub fn on_changes(
        &mut self,
        changes: &[VerdictChange],
        cx: &mut Context<'_>,
    ) -> Result<Vec<Incident>, SinkError> {
        let mut opened = Vec::new();
        // Parents, then cgroups, then flows: a roll-up's incident exists
        // before the subjects it covers are placed.
        let mut order: Vec<&VerdictChange> = changes.iter().collect();
        order.sort_by_key(|c| rank(&c.subject));
        for c in &order {
            if rank(&c.subject) < 2 {
                match c.to {
                    State::Healthy | State::Resolved => self.rollups.remove(&c.subject),
                    to => self.rollups.insert(c.subject, to),
                };
            }
        }
        for c in order {
            let s = c.subject;
            match c.to {
                State::Storm => {
                    if let Some(inc) = self.open.get_mut(&s) {
                        inc.state = c.to.as_str().into();
                    } else if let Some(cv) = self.covered.get_mut(&s) {
                        cv.state = c.to;
                    } else {
                        let since = self.deferred.remove(&s).map_or(cx.now_ms, |d| d.since_ms);
                        let d = Deferred {
                            since_ms: since,
                            comm: c.comm,
                            explanation: c.explanation.clone(),
                        };
                        self.place(s, d, cx, &mut opened)?;
                    }
                }
                State::Resolved | State::Healthy => {
                    self.deferred.remove(&s);
                    self.covered.remove(&s);
                    if let Some(mut inc) = self.open.remove(&s) {
                        refresh(&mut inc, cx.engine, &s, cx.now_ms);
                        self.group_numbers(&mut inc, &s, cx.engine);
                        inc.active = false;
                        inc.state = c.to.as_str().into();
                        inc.ended_at = Some(cx.now_ms);
                        inc.end_reason = Some("resolved".into());
                        inc.explanation = c.explanation.clone();
                        cx.store.update(&inc)?;
                        self.release(&s, cx);
                    }
                }
                to => {
                    if let Some(inc) = self.open.get_mut(&s) {
                        inc.state = to.as_str().into();
                    }
                    if let Some(cv) = self.covered.get_mut(&s) {
                        cv.state = to;
                    }
                    // No longer storming: nothing to place.
                    self.deferred.remove(&s);
                }
            }
        }
        // Those waiting: roll-ups first, so flows can join them.
        let mut waiting: Vec<Subject> = self.deferred.keys().copied().collect();
        waiting.sort_by_key(|s| (rank(s), *s));
        for s in waiting {
            if let Some(d) = self.deferred.remove(&s) {
                self.place(s, d, cx, &mut opened)?;
            }
        }
        Ok(opened)
    }

    /// Puts a storming subject into an incident: one above it, its own, or
    /// (for now) none.
    fn place(
        &mut self,
        s: Subject,
        d: Deferred,
        cx: &mut Context<'_>,
        opened: &mut Vec<Incident>,
    ) -> Result<(), SinkError> {
        match self.placement(&s, cx) {
            Place::Owner(owner) => self.cover(s, owner, State::Storm),
            Place::Wait if cx.now_ms - d.since_ms < DEFER_MAX_MS => {
                self.deferred.insert(s, d);
            }
            Place::Wait | Place::Own if self.open.len() >= self.max_open => self.not_opened += 1,
            Place::Wait | Place::Own => opened.push(self.open_incident(s, &d, cx)?),
        }
        Ok(())
    }

    /// The roll-ups that would cover `s`, preferred first.
    fn above(&self, s: &Subject, cx: &Context<'_>) -> Vec<Subject> {
        match *s {
            Subject::Parent { .. } => Vec::new(),
            Subject::Flow { pid, dest } => [
                cx.groups
                    .parent(pid)
                    .map(|ppid| Subject::Parent { ppid, dest }),
                cx.groups
                    .cgroup(pid)
                    .map(|cgroup| Subject::Cgroup { cgroup, dest }),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Subject::Cgroup { cgroup, dest } => {
                let mut parents: Vec<Subject> = self
                    .rollups
                    .keys()
                    .filter(|r| matches!(r, Subject::Parent { .. }) && r.dest() == dest)
                    .copied()
                    .collect();
                parents.sort_unstable();
                parents.retain(|p| {
                    self.member_pids(p, cx.engine)
                        .into_iter()
                        .any(|m| cx.groups.cgroup(m) == Some(cgroup))
                });
                parents
            }
        }
    }

    /// A roll-up's members: the engine's most recent ones and those its
    /// incident has listed.
    fn member_pids(&self, s: &Subject, engine: &Engine) -> Vec<u32> {
        let mut v = engine
            .subject_stats(s)
            .map(|st| st.members)
            .unwrap_or_default();
        if let Some(inc) = self.open.get(s) {
            v.extend(&inc.members);
        }
        v
    }

    fn placement(&self, s: &Subject, cx: &Context<'_>) -> Place {
        let above = self.above(s, cx);
        for r in &above {
            if self.open.contains_key(r) {
                return Place::Owner(*r);
            }
            if let Some(cv) = self.covered.get(r) {
                return Place::Owner(cv.owner);
            }
        }
        let undecided = above
            .iter()
            .any(|r| matches!(self.rollups.get(r), Some(State::Suspect | State::Storm)));
        if undecided { Place::Wait } else { Place::Own }
    }

    /// Makes `s` a member of `owner`'s incident.
    fn cover(&mut self, s: Subject, owner: Subject, state: State) {
        self.covered.insert(s, Cover { owner, state });
        if let Some(inc) = self.open.get_mut(&owner) {
            match s {
                Subject::Flow { pid, .. } => add_member(inc, pid),
                Subject::Cgroup { cgroup, .. } => {
                    inc.cgroup_id.get_or_insert(cgroup);
                }
                Subject::Parent { .. } => {}
            }
        }
    }

    /// Opens `s`'s own incident, and folds into it the open incidents of
    /// subjects it covers (they stormed before it did).
    fn open_incident(
        &mut self,
        s: Subject,
        d: &Deferred,
        cx: &mut Context<'_>,
    ) -> Result<Incident, SinkError> {
        let mut inc = identify(&s, d.comm, &d.explanation, cx.procs, d.since_ms);
        if let Subject::Cgroup { .. } = s {
            // Name the cgroup by where its members live.
            let members = cx
                .engine
                .subject_stats(&s)
                .map(|st| st.members)
                .unwrap_or_default();
            if let Some(path) = members
                .into_iter()
                .find_map(|m| cx.procs.describe(m).cgroup)
            {
                let service = cx.procs.service_in(&path);
                (inc.unit, inc.container) = (service.unit.clone(), service.container_id.clone());
                (inc.cgroup, inc.service) = (Some(path), Some(service));
            }
        }
        refresh(&mut inc, cx.engine, &s, cx.now_ms);
        let n = cx.store.insert(&inc)?;
        inc.set_number(n);
        self.opened += 1;
        self.open.insert(s, inc);
        self.fold_into(s, cx)?;
        // Subjects already storming below it join at once.
        let mut waiting: Vec<Subject> = self.deferred.keys().copied().collect();
        waiting.sort_by_key(|w| (rank(w), *w));
        for w in waiting {
            if rank(&w) > rank(&s)
                && let Place::Owner(o) = self.placement(&w, cx)
            {
                self.deferred.remove(&w);
                self.cover(w, o, State::Storm);
            }
        }
        let mut inc = self.open.remove(&s).expect("just inserted");
        self.group_numbers(&mut inc, &s, cx.engine);
        cx.store.update(&inc)?;
        self.open.insert(s, inc.clone());
        Ok(inc)
    }

    /// Closes the open incidents that `owner` covers as merged into it.
    fn fold_into(&mut self, owner: Subject, cx: &mut Context<'_>) -> Result<(), SinkError> {
        let mut below: Vec<Subject> = self
            .open
            .keys()
            .filter(|b| rank(b) > rank(&owner) && b.dest() == owner.dest())
            .copied()
            .collect();
        // Cgroups before flows: a flow under a folded cgroup follows it.
        below.sort_by_key(|b| (rank(b), *b));
        for b in below {
            let covers = match self.placement(&b, cx) {
                Place::Owner(o) => o == owner,
                _ => false,
            };
            if !covers {
                continue;
            }
            let Some(mut inc) = self.open.remove(&b) else {
                continue;
            };
            refresh(&mut inc, cx.engine, &b, cx.now_ms);
            let state = cx
                .engine
                .subject_stats(&b)
                .map_or(State::Storm, |st| st.state);
            let owner_id = self
                .open
                .get(&owner)
                .map(|o| o.id.clone())
                .unwrap_or_default();
            inc.active = false;
            inc.ended_at = Some(cx.now_ms);
            inc.end_reason = Some(format!("merged into {owner_id}"));
            cx.store.update(&inc)?;
            tracing::info!(incident = %inc.id, into = %owner_id, "incident merged into a group incident");
            self.merged += 1;
            for cv in self.covered.values_mut() {
                if cv.owner == b {
                    cv.owner = owner;
                }
            }
            if let Some(o) = self.open.get_mut(&owner) {
                for m in &inc.members {
                    add_member(o, *m);
                }
                if let Some(c) = inc.cgroup_id {
                    o.cgroup_id.get_or_insert(c);
                }
                o.member_count = o.member_count.max(inc.member_count);
            }
            self.cover(b, owner, state);
        }
        Ok(())
    }

    /// `owner`'s incident closed: its members still storming are placed
    /// again (another incident, or their own).
    fn release(&mut self, owner: &Subject, cx: &Context<'_>) {
        let freed: Vec<(Subject, State)> = self
            .covered
            .iter()
            .filter(|(_, cv)| cv.owner == *owner)
            .map(|(s, cv)| (*s, cv.state))
            .collect();
        for (s, state) in freed {
            self.covered.remove(&s);
            if state == State::Storm
                && let Some(st) = cx.engine.subject_stats(&s)
            {
                self.deferred.insert(
                    s,
                    Deferred {
                        since_ms: cx.now_ms,
                        comm: st.comm,
                        explanation: st.explanation,
                    },
                );
            }
        }
    }

    /// A group incident's member count and busiest members.
    fn group_numbers(&self, inc: &mut Incident, owner: &Subject, engine: &Engine) {
        if let Subject::Flow { .. } = owner {
            inc.member_count = 1;
            return;
        }
        let mut count = inc.member_count.max(inc.members.len() as u64);
        if let Some(st) = engine.subject_stats(owner) {
            count = count.max(st.member_count as u64);
        }
        // A roll-up merged into it may have counted more (a cgroup's
        // processes beyond the parent's children).
        for (s, cv) in &self.covered {
            if cv.owner == *owner
                && !matches!(s, Subject::Flow { .. })
                && let Some(st) = engine.subject_stats(s)
            {
                count = count.max(st.member_count as u64);
            }
        }
        inc.member_count = count;
        inc.top_members = top_members(inc, engine, owner.dest());
    }

    /// Gives each open incident the top call stacks of its processes'
    /// calls towards its destination (kept as they were when none is
    /// known now: the processes may have exited).
    pub fn annotate_stacks(&mut self, book: &crate::stacks::StackBook) {
        for (subject, inc) in self.open.iter_mut() {
            let pids: Vec<u32> = match subject {
                Subject::Flow { pid, .. } => vec![*pid],
                _ => inc.members.clone(),
            };
            let top = book.top(&pids, &subject.dest(), STACKS_SHOWN);
            if !top.is_empty() {
                inc.stacks = top;
            }
        }
    }

    /// Samples what each open incident's processes burn (CPU, RSS) and
    /// the host's CPU; once a second, before [`Self::every_second`] saves.
    pub fn annotate_cost(&mut self, meter: &mut crate::cost::CostMeter, now_ns: u64) {
        meter.begin(now_ns);
        for (subject, inc) in self.open.iter_mut() {
            let sample = match subject {
                Subject::Flow { pid, .. } => meter.measure(&[*pid], now_ns),
                // Live children, and those the parent has reaped since.
                Subject::Parent { ppid, .. } => {
                    let (cpu, rss) = meter.measure(&inc.members, now_ns);
                    (cpu + meter.measure_reaped(*ppid, now_ns), rss)
                }
                // The whole cgroup, exited processes included.
                Subject::Cgroup { .. } => match inc.cgroup.as_deref() {
                    Some(path) => meter
                        .measure_cgroup(path, now_ns)
                        .unwrap_or_else(|| meter.measure(&inc.members, now_ns)),
                    None => meter.measure(&inc.members, now_ns),
                },
            };
            meter.apply(inc.cost.get_or_insert_with(Default::default), sample);
        }
    }

    /// Once a second: appends to each open incident's timeline and saves it.
    pub fn every_second(
        &mut self,
        engine: &Engine,
        store: &mut dyn Sink,
        now_ms: i64,
    ) -> Result<(), SinkError> {
        // Subjects the engine forgot without a verdict change (evicted at
        // its bounds, or expired) leave nothing behind here either.
        let known = |s: &Subject| engine.knows(s);
        self.covered.retain(|s, _| known(s));
        self.deferred.retain(|s, _| known(s));
        self.rollups.retain(|s, _| known(s));
        let subjects: Vec<Subject> = self.open.keys().copied().collect();
        for subject in subjects {
            let Some(mut inc) = self.open.remove(&subject) else {
                continue;
            };
            refresh(&mut inc, engine, &subject, now_ms);
            self.group_numbers(&mut inc, &subject, engine);
            if inc.timeline.len() < TIMELINE_MAX {
                inc.timeline.push(
                    engine
                        .subject_stats(&subject)
                        .map(|s| s.rate as f32)
                        .unwrap_or(0.0),
                );
            }
            let saved = store.update(&inc);
            self.open.insert(subject, inc);
            saved?;
        }
        Ok(())
    }

    /// The daemon is stopping: close what is open.
    pub fn close_all(
        &mut self,
        store: &mut dyn Sink,
        now_ms: i64,
        reason: &str,
    ) -> Result<(), SinkError> {
        self.covered.clear();
        self.deferred.clear();
        self.rollups.clear();
        for (_, mut inc) in self.open.drain() {
            inc.active = false;
            inc.ended_at = Some(now_ms);
            inc.end_reason = Some(reason.into());
            store.update(&inc)?;
        }
        Ok(())
    }
}

fn add_member(inc: &mut Incident, pid: u32) {
    if !inc.members.contains(&pid) && inc.members.len() < MEMBERS_MAX {
        inc.members.push(pid);
    }
}

/// The listed members with the most attempts, busiest first; a member the
/// engine no longer tracks keeps what was last known of it, and one never
/// seen with an attempt (its flow gone before the first look) is left out.
fn top_members(inc: &Incident, engine: &Engine, dest: Destination) -> Vec<Member> {
    let mut v: Vec<Member> = inc
        .members
        .iter()
        .map(|&pid| {
            let st = engine.subject_stats(&Subject::Flow { pid, dest });
            let prev = inc.top_members.iter().find(|m| m.pid == pid);
            Member {
                pid,
                comm: st
                    .as_ref()
                    .map(|s| s.comm.to_string())
                    .filter(|c| !c.is_empty())
                    .or_else(|| prev.map(|m| m.comm.clone()))
                    .unwrap_or_default(),
                attempts: st
                    .map_or(0, |s| s.run_attempts)
                    .max(prev.map_or(0, |m| m.attempts)),
            }
        })
        .filter(|m| m.attempts > 0)
        .collect();
    v.sort_by(|a, b| b.attempts.cmp(&a.attempts).then(a.pid.cmp(&b.pid)));
    v.truncate(TOP_MEMBERS);
    v
}

/// A new incident with the identity of its subject.
pub(crate) fn identify(
    subject: &Subject,
    comm: Comm,
    explanation: &str,
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
    let service = cgroup.as_deref().map(|c| procs.service_in(c));
    let (unit, container) = service
        .as_ref()
        .map_or((None, None), |s| (s.unit.clone(), s.container_id.clone()));
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
            .unwrap_or_else(|| comm.to_string()),
        exe: info.as_ref().and_then(|i| i.exe.clone()),
        cmdline: info.as_ref().and_then(|i| i.cmdline.clone()),
        uid: info.as_ref().and_then(|i| i.uid),
        ppid: info.as_ref().and_then(|i| i.ppid),
        cgroup_id,
        cgroup,
        unit,
        container,
        service,
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
        explanation: explanation.to_string(),
        timeline: Vec::new(),
        members: Vec::new(),
        member_count: u64::from(kind == "flow"),
        top_members: Vec::new(),
        syscalls_per_s: None,
        stacks: Vec::new(),
        cost: None,
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
        add_member(inc, m);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::{
        detect::{DetectConfig, synthetic},
        ingest::Observation,
        pipeline::TICK_NS,
    };

    #[test]
    fn ids_are_prefixed() {
        assert_eq!(parse_id("inc-42"), Some(42));
        assert_eq!(parse_id("42"), None);
        assert_eq!(parse_id("inc-0"), None);
        assert_eq!(parse_id("inc-x"), None);
    }

    /// An engine, a tracker and a real store on a temporary SQLite file,
    /// driven like the daemon: ticks every 100 ms, `every_second` each
    /// second.
    struct Harness {
        dir: std::path::PathBuf,
        store: Store,
        engine: Engine,
        procs: ProcessTable,
        groups: Groups,
        tracker: IncidentTracker,
        next_tick: u64,
        opened: Vec<Incident>,
    }

    impl Harness {
        fn new(tag: &str) -> Harness {
            let dir = std::env::temp_dir().join(format!("sg-inc-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Harness {
                store: Store::open(&dir.join("db.sqlite")).unwrap(),
                dir,
                engine: Engine::new(DetectConfig::default()),
                procs: ProcessTable::new("/nonexistent", 4096),
                groups: Groups::new(),
                tracker: IncidentTracker::new(),
                next_tick: 1_000_000_000,
                opened: Vec::new(),
            }
        }

        fn tick(&mut self) {
            let t = self.next_tick;
            self.next_tick += TICK_NS;
            let changes = self.engine.tick(t);
            let now_ms = (t / 1_000_000) as i64;
            let opened = self
                .tracker
                .on_changes(
                    &changes,
                    &mut Context {
                        engine: &self.engine,
                        procs: &mut self.procs,
                        groups: &self.groups,
                        store: &mut self.store,
                        now_ms,
                    },
                )
                .unwrap();
            self.opened.extend(opened);
            if t.is_multiple_of(1_000_000_000) {
                self.tracker
                    .every_second(&self.engine, &mut self.store, now_ms)
                    .unwrap();
            }
        }

        /// Feeds observations in time order, ticking on the way.
        fn feed(&mut self, mut obs: Vec<Observation>) {
            obs.sort_by_key(|o| o.ts_ns());
            for o in obs {
                while o.ts_ns() >= self.next_tick {
                    self.tick();
                }
                self.procs.observe(&o);
                self.groups.observe(&o);
                self.engine.observe(&o);
            }
        }

        /// Ticks with nothing happening for `ns`.
        fn quiet(&mut self, ns: u64) {
            let end = self.next_tick + ns;
            while self.next_tick < end {
                self.tick();
            }
        }

        fn all(&self) -> Vec<Incident> {
            self.store.list(0, false, 10_000).unwrap()
        }

        fn active(&self) -> Vec<Incident> {
            self.store.list(0, true, 10_000).unwrap()
        }
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn fork(ts: u64, parent: u32, child: u32) -> Observation {
        Observation::Fork {
            ts_ns: ts,
            parent,
            child,
            comm: Comm::from("client"),
        }
    }

    fn in_cgroup(mut o: Observation, id: u64) -> Observation {
        if let Observation::Connect { cgroup, .. } = &mut o {
            *cgroup = id;
        }
        o
    }

    /// `pid` retrying a refused connect at `rate`/s from `start` for `secs`.
    fn retries(pid: u32, dest: Destination, start: u64, rate: u64, secs: u64) -> Vec<Observation> {
        let gap = 1_000_000_000 / rate;
        // Spread processes over the gap so they do not all attempt at once.
        let offset = u64::from(pid) * 7_919 % gap;
        (0..rate * secs)
            .map(|i| synthetic::refused(start + offset + i * gap, pid, dest))
            .collect()
    }

    #[test]
    fn open_incidents_are_bounded_and_storms_beyond_are_counted() {
        let mut h = Harness::new("cap");
        h.tracker = IncidentTracker::with_max_open(2);
        let mut obs = Vec::new();
        for pid in 1..=3u32 {
            let d = synthetic::dest(9000 + pid as u16);
            obs.extend(
                (0..3_000u64).map(|i| synthetic::refused(1_000_000_000 + i * 1_000_000, pid, d)),
            );
        }
        h.feed(obs);
        h.tick();
        assert_eq!(h.active().len(), 2);
        assert_eq!(h.tracker.opened, 2);
        // The third storm, refused once (when it turned storm).
        assert_eq!(h.tracker.not_opened, 1);
        assert_eq!(h.store.total().unwrap(), 2);
    }

    #[test]
    fn a_storm_becomes_one_incident_that_closes_when_resolved() {
        let mut h = Harness::new("one");
        let d = synthetic::dest(8080);
        h.feed(
            (0..3_000u64)
                .map(|i| synthetic::refused(1_000_000_000 + i * 1_000_000, 4242, d))
                .collect(),
        );
        h.tick();
        let list = h.active();
        assert_eq!(list.len(), 1);
        let inc = &list[0];
        assert_eq!(inc.id, "inc-1");
        assert_eq!((inc.kind.as_str(), inc.pid), ("flow", Some(4242)));
        assert_eq!((inc.member_count, inc.processes()), (1, 1));
        assert!(inc.top_members.is_empty());
        assert_eq!(inc.destination, "127.0.0.1:8080");
        assert_eq!(inc.failure_mix, vec![("ECONNREFUSED".to_string(), 3_000)]);
        assert!(inc.peak_rate >= 900.0, "{}", inc.peak_rate);
        assert_eq!(inc.timeline.len(), 3, "one point per second while open");
        // Quiet for 6 s: resolved and closed.
        h.quiet(6_000_000_000);
        assert!(h.active().is_empty());
        let closed = h.store.get(1).unwrap().unwrap();
        assert!(!closed.active);
        assert_eq!(closed.end_reason.as_deref(), Some("resolved"));
        assert_eq!(closed.total_attempts, 3_000);
        assert_eq!(h.store.total().unwrap(), 1);
    }

    #[test]
    fn a_thousand_children_storming_together_make_one_incident() {
        let mut h = Harness::new("fanout");
        let d = synthetic::dest(9);
        let elsewhere = synthetic::dest(10);
        let start = 1_000_000_000;
        let mut obs = Vec::new();
        for i in 0..1_000u32 {
            let child = 10_000 + i;
            // Forked over 0.5 s, each retrying 20 times a second for 4 s.
            let born = start + u64::from(i) * 500_000;
            obs.push(fork(born, 100, child));
            obs.extend(retries(child, d, born + 1_000, 20, 4));
        }
        // One unrelated process storming elsewhere: its own incident.
        obs.extend(retries(555, elsewhere, start, 200, 4));
        h.feed(obs);
        h.tick();
        assert!(
            h.tracker.covered_count() >= 900,
            "the children's storms are members: {}",
            h.tracker.covered_count()
        );
        let active = h.active();
        let here: Vec<&Incident> = active
            .iter()
            .filter(|i| i.destination.ends_with(":9"))
            .collect();
        assert_eq!(
            here.len(),
            1,
            "one incident for the group: {:?}",
            here.iter()
                .map(|i| (&i.id, &i.kind, i.pid))
                .collect::<Vec<_>>()
        );
        let g = here[0];
        assert_eq!((g.kind.as_str(), g.pid), ("parent", Some(100)));
        assert_eq!(g.member_count, 1_000);
        assert_eq!(g.processes(), 1_000);
        assert_eq!(g.members.len(), MEMBERS_MAX);
        assert_eq!(g.cgroup_id, Some(1), "the cgroup roll-up was folded in");
        assert_eq!(g.top_members.len(), TOP_MEMBERS);
        assert!(
            g.top_members
                .iter()
                .all(|m| m.comm == "client" && m.attempts >= 15 && g.members.contains(&m.pid)),
            "{:?}",
            g.top_members
        );
        assert!(
            g.top_members
                .windows(2)
                .all(|w| w[0].attempts >= w[1].attempts)
        );
        assert!(g.total_attempts >= 70_000, "{}", g.total_attempts);
        // `explain <child pid>` finds the group.
        let by_child = h.store.latest_for_pid(g.members[5]).unwrap().unwrap();
        assert_eq!(by_child.id, g.id);
        let other: Vec<&Incident> = active
            .iter()
            .filter(|i| i.destination.ends_with(":10"))
            .collect();
        assert_eq!(other.len(), 1);
        assert_eq!((other[0].kind.as_str(), other[0].pid), ("flow", Some(555)));
        // Never opened, rather than opened and merged: two incidents in all.
        assert_eq!(
            h.all().len(),
            2,
            "{:?}",
            h.all().iter().map(|i| &i.id).collect::<Vec<_>>()
        );
        assert_eq!((h.tracker.opened, h.tracker.merged), (2, 0));
        assert_eq!(h.opened.len(), 2);

        h.quiet(8_000_000_000);
        assert!(h.active().is_empty());
        let closed = h.store.get(g.number).unwrap().unwrap();
        assert_eq!(closed.end_reason.as_deref(), Some("resolved"));
        assert_eq!(closed.member_count, 1_000);
        assert_eq!(h.tracker.covered_count(), 0);
        assert_eq!(h.all().len(), 2);
    }

    #[test]
    fn a_process_storming_alone_first_is_merged_when_its_siblings_join() {
        let mut h = Harness::new("merge");
        let d = synthetic::dest(9);
        let start = 1_000_000_000;
        let mut obs = vec![fork(start, 100, 200)];
        obs.extend(retries(200, d, start + 1_000, 100, 6));
        h.feed(obs.clone());
        // Alone: its own incident.
        let first = h.active();
        assert_eq!(first.len(), 1);
        assert_eq!((first[0].kind.as_str(), first[0].pid), ("flow", Some(200)));
        // Then 5 siblings join.
        let t = h.next_tick;
        let mut obs = Vec::new();
        for c in 201..206 {
            obs.push(fork(t, 100, c));
            obs.extend(retries(c, d, t + 1_000, 50, 3));
        }
        obs.extend(retries(200, d, t, 100, 3));
        h.feed(obs);
        h.tick();
        let active = h.active();
        assert_eq!(active.len(), 1, "{active:?}");
        let g = &active[0];
        assert_eq!((g.kind.as_str(), g.pid), ("parent", Some(100)));
        assert_eq!(g.member_count, 6);
        assert!(g.members.contains(&200), "{:?}", g.members);
        assert_eq!(
            g.top_members[0].pid, 200,
            "the busiest: {:?}",
            g.top_members
        );
        let merged = h.store.get(first[0].number).unwrap().unwrap();
        assert!(!merged.active);
        assert_eq!(
            merged.end_reason.as_deref(),
            Some(format!("merged into {}", g.id).as_str())
        );
        assert_eq!(h.tracker.merged, 1);
        // Its latest incident is the group's, not the merged one.
        assert_eq!(h.store.latest_for_pid(200).unwrap().unwrap().id, g.id);
        assert_eq!(h.all().len(), 2);
    }

    /// `retries`, but every connect succeeds.
    fn successes(
        pid: u32,
        dest: Destination,
        start: u64,
        rate: u64,
        secs: u64,
    ) -> Vec<Observation> {
        retries(pid, dest, start, rate, secs)
            .into_iter()
            .map(|mut o| {
                if let Observation::Connect { outcome, rst, .. } = &mut o {
                    *outcome = crate::ingest::ConnectOutcome::Established;
                    *rst = false;
                }
                o
            })
            .collect()
    }

    /// Child 200 fails 100 times a second; siblings 201 and 202 connect
    /// fine 25 times a second each, so their parent's roll-up is only
    /// suspect (2/3 failing) while 200's flow storms.
    fn one_failing_two_fine(h: &mut Harness, d: Destination, secs: u64) -> u64 {
        let start = h.next_tick;
        let mut obs = Vec::new();
        for c in [200, 201, 202] {
            obs.push(fork(start, 100, c));
        }
        obs.extend(retries(200, d, start + 1_000, 100, secs));
        for c in [201, 202] {
            obs.extend(successes(c, d, start + 1_000, 25, secs));
        }
        h.feed(obs);
        start
    }

    #[test]
    fn a_storm_waits_for_a_suspect_roll_up_then_gets_its_own_incident_dated_from_its_start() {
        let mut h = Harness::new("wait");
        let d = synthetic::dest(9);
        let start = one_failing_two_fine(&mut h, d, 2);
        assert!(
            h.all().is_empty(),
            "waiting on the suspect roll-up: {:?}",
            h.all()
        );
        // The roll-up never storms: after DEFER_MAX_MS the flow has its own.
        let t = h.next_tick;
        let mut obs = retries(200, d, t, 100, 3);
        for c in [201, 202] {
            obs.extend(successes(c, d, t, 25, 3));
        }
        h.feed(obs);
        let all = h.all();
        assert_eq!(all.len(), 1, "{all:?}");
        let inc = &all[0];
        assert_eq!((inc.kind.as_str(), inc.pid), ("flow", Some(200)));
        let start_ms = (start / 1_000_000) as i64;
        assert!(
            inc.started_at >= start_ms + 400 && inc.started_at <= start_ms + 1_500,
            "dated from when it stormed, not from when the wait ended: {} vs {start_ms}",
            inc.started_at
        );
        assert!(!inc.timeline.is_empty());
    }

    #[test]
    fn a_storm_waiting_on_a_roll_up_that_then_storms_joins_it_without_an_incident_of_its_own() {
        let mut h = Harness::new("join");
        let d = synthetic::dest(9);
        one_failing_two_fine(&mut h, d, 2);
        assert!(h.all().is_empty());
        // The siblings start failing too: the roll-up storms.
        let t = h.next_tick;
        let mut obs = retries(200, d, t, 100, 2);
        for c in [201, 202] {
            obs.extend(retries(c, d, t, 25, 2));
        }
        h.feed(obs);
        h.tick();
        let all = h.all();
        assert_eq!(all.len(), 1, "{all:?}");
        let g = &all[0];
        assert_eq!((g.kind.as_str(), g.pid), ("parent", Some(100)));
        assert_eq!(g.member_count, 3);
        assert_eq!(g.top_members[0].pid, 200);
        assert_eq!((h.tracker.opened, h.tracker.merged), (1, 0));
    }

    #[test]
    fn processes_of_one_cgroup_without_a_common_parent_make_one_cgroup_incident() {
        let mut h = Harness::new("cgroup");
        let d = synthetic::dest(9);
        let mut obs = Vec::new();
        for pid in 300..305u32 {
            obs.extend(
                retries(pid, d, 1_000_000_000, 40, 3)
                    .into_iter()
                    .map(|o| in_cgroup(o, 77)),
            );
        }
        h.feed(obs);
        h.tick();
        let all = h.all();
        assert_eq!(all.len(), 1, "{all:?}");
        let g = &all[0];
        assert_eq!(
            (g.kind.as_str(), g.pid, g.cgroup_id),
            ("cgroup", None, Some(77))
        );
        assert_eq!(g.member_count, 5);
        let mut members = g.members.clone();
        members.sort_unstable();
        assert_eq!(members, vec![300, 301, 302, 303, 304]);
    }

    #[test]
    fn incidents_stored_before_member_counts_still_read() {
        let mut h = Harness::new("old");
        let d = synthetic::dest(8080);
        h.feed(retries(4242, d, 1_000_000_000, 200, 2));
        h.tick();
        let inc = h.active().pop().unwrap();
        let mut old = serde_json::to_value(&inc).unwrap();
        let body = old.as_object_mut().unwrap();
        body.remove("member_count");
        body.remove("top_members");
        let back: Incident = serde_json::from_value(old).unwrap();
        assert_eq!((back.member_count, back.processes()), (0, 1));
        assert!(back.top_members.is_empty());
        let group = Incident {
            kind: "parent".into(),
            members: vec![1, 2, 3],
            ..back
        };
        assert_eq!(group.processes(), 3);
    }

    #[test]
    fn dangling_incidents_close_and_retention_trims() {
        let dir = std::env::temp_dir().join(format!("sg-ret-{}", std::process::id()));
        let store = Store::open(&dir.join("db.sqlite")).unwrap();
        let mut procs = ProcessTable::new("/nonexistent", 16);
        let subject = Subject::Flow {
            pid: 1,
            dest: synthetic::dest(1),
        };
        for day in 0..5i64 {
            let inc = identify(&subject, Comm::from("x"), "x", &mut procs, day * 86_400_000);
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
