//! The engine under a storm of new keys: every table stays within its
//! capacity by evicting the least important entries (never a storm while a
//! healthy entry can go), counts what it evicted, forgets dead processes
//! after their expiry, ranks suspects most severe first, and gives a
//! reused pid a fresh start.
use std::net::{IpAddr, Ipv4Addr};

use super::super::{
    DetectConfig, Engine, Limits, State, Subject, TableUsage,
    synthetic::{dest, refused, run, times},
};
use crate::ingest::{Comm, ConnectOutcome, Destination, Observation, Proto};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

fn usage(e: &Engine, name: &str) -> TableUsage {
    e.tables()
        .into_iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no table {name}"))
}

/// (entries, capacity, evictions) of one table.
fn fill(e: &Engine, name: &str) -> (u64, u64, u64) {
    let u = usage(e, name);
    (u.entries, u.capacity, u.evictions)
}

/// A refused connect every `gap` from `start`, `n` gaps long.
fn looping(pid: u32, d: Destination, start: u64, gap: u64, n: usize) -> Vec<Observation> {
    times(start, std::iter::repeat_n(gap, n))
        .into_iter()
        .map(|t| refused(t, pid, d))
        .collect()
}

/// Observations of several streams in time order (stable).
fn merged(mut v: Vec<Observation>) -> Vec<Observation> {
    v.sort_by_key(|o| o.ts_ns());
    v
}

fn fork(ts: u64, parent: u32, child: u32) -> Observation {
    Observation::Fork {
        ts_ns: ts,
        parent,
        child,
        comm: Comm::from("spawner"),
    }
}

fn exit(ts: u64, pid: u32) -> Observation {
    Observation::Exit {
        ts_ns: ts,
        pid,
        tid: pid,
        group_dead: true,
    }
}

fn established(ts: u64, pid: u32, cgroup: u64, dest: Destination) -> Observation {
    Observation::Connect {
        ts_ns: ts,
        start_ns: ts,
        pid,
        comm: Comm::from("worker"),
        cgroup,
        dest,
        outcome: ConnectOutcome::Established,
        rst: false,
        syn_retransmits: 0,
    }
}

fn udp_send(ts: u64, pid: u32, dest: Destination) -> Observation {
    Observation::UdpSend {
        ts_ns: ts,
        pid,
        comm: Comm::from("x"),
        cgroup: 0,
        dest,
        bytes: 10,
        fingerprint: 0,
        sock: u64::from(pid),
        connected: false,
        question: None,
    }
}

/// The `i`th of many destinations: 10.x.y.z:80.
fn nth_dest(i: u32) -> Destination {
    Destination {
        proto: Proto::Tcp,
        addr: IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)),
        port: 80,
        netns: 1,
    }
}

fn hot(s: Option<State>) -> bool {
    matches!(s, Some(State::Storm | State::Recovering))
}

fn flow_state(e: &Engine, pid: u32, dest: Destination) -> Option<State> {
    e.subject_stats(&Subject::Flow { pid, dest })
        .map(|s| s.state)
}

#[test]
fn flows_are_capped_and_storms_outlast_healthy_flows() {
    let cfg = DetectConfig {
        max_flows: 100,
        ..Default::default()
    };
    let mut e = Engine::new(cfg);
    let d = dest(8080);
    let storms: Vec<Observation> = (1..=3)
        .flat_map(|pid| looping(pid, d, SEC, MS, 1500))
        .collect();
    run(&mut e, &merged(storms), 0);
    for pid in 1..=3 {
        assert_eq!(flow_state(&e, pid, d), Some(State::Storm));
    }
    // 500 new healthy flows, 0.1 ms apart.
    let udp = Destination {
        proto: Proto::Udp,
        ..dest(53)
    };
    for i in 0..500u32 {
        e.observe(&udp_send(
            2_600 * MS + u64::from(i) * MS / 10,
            1000 + i,
            udp,
        ));
    }
    // 503 keys into 100: full after 100, then batches of 12 (an eighth);
    // the 403 beyond are 34 batches (the last inserting 7).
    assert_eq!(fill(&e, "flows"), (95, 100, 408));
    assert_eq!(e.flow_count(), 95);
    for pid in 1..=3 {
        assert_eq!(flow_state(&e, pid, d), Some(State::Storm), "pid {pid}");
    }
    // Among the healthy, the least recently active went.
    assert!(e.verdict(1499, &udp).is_some());
    assert!(e.verdict(1000, &udp).is_none());
}

#[test]
fn rollups_are_capped_and_storming_ones_survive() {
    let limits = Limits {
        rollups: 16,
        ..Default::default()
    };
    let mut e = Engine::with_limits(DetectConfig::default(), limits);
    let d = dest(9000);
    let mut obs = Vec::new();
    // A parent starting a child every 25 ms, each refused once: a storm of
    // the parent's and the cgroup's roll-ups.
    let starts = times(SEC, std::iter::repeat_n(25 * MS, 120));
    for (i, t) in starts.iter().enumerate() {
        let child = 1000 + i as u32;
        obs.push(fork(*t, 100, child));
        obs.push(refused(t + MS, child, d));
        obs.push(exit(t + 2 * MS, child));
    }
    // Then 40 healthy roll-ups: one connect each to its own destination.
    let end = starts[starts.len() - 1] + 3 * MS;
    for i in 0..40u32 {
        obs.push(established(
            end + u64::from(i) * MS,
            5000 + i,
            2,
            nth_dest(i),
        ));
    }
    run(&mut e, &obs, 0);
    // 42 keys into 16: batches of 2; the 26 beyond are 13 batches.
    assert_eq!(fill(&e, "rollups"), (16, 16, 26));
    let state = |s: Subject| e.subject_stats(&s).map(|s| s.state);
    assert!(hot(state(Subject::Parent { ppid: 100, dest: d })));
    assert!(hot(state(Subject::Cgroup { cgroup: 1, dest: d })));
    assert_eq!(
        state(Subject::Cgroup {
            cgroup: 2,
            dest: nth_dest(39)
        }),
        Some(State::Healthy),
        "the newest healthy kept"
    );
    assert_eq!(
        state(Subject::Cgroup {
            cgroup: 2,
            dest: nth_dest(0)
        }),
        None,
        "the oldest healthy evicted"
    );
}

#[test]
fn exited_flows_are_capped_keeping_the_storms() {
    let limits = Limits {
        ended: 8,
        ..Default::default()
    };
    let mut e = Engine::with_limits(DetectConfig::default(), limits);
    // Ten storms (1,000/s) and ten suspects (10/s), each to its own port.
    let mut obs = Vec::new();
    for pid in 1..=10u32 {
        obs.extend(looping(pid, dest(8000 + pid as u16), SEC, MS, 1500));
    }
    for pid in 11..=20u32 {
        obs.extend(looping(pid, dest(8000 + pid as u16), SEC, 100 * MS, 15));
    }
    run(&mut e, &merged(obs), 0);
    assert_eq!(flow_state(&e, 11, dest(8011)), Some(State::Suspect));
    // All exit, suspects and storms alternating.
    for i in 1..=10u32 {
        e.observe(&exit(2_600 * MS, 10 + i));
        e.observe(&exit(2_600 * MS, i));
    }
    // 20 unsettled flows into 8, one at a time: 12 evicted, the suspects
    // first.
    assert_eq!(fill(&e, "exited_flows"), (8, 8, 12));
    let kept_storms = (1..=10u32)
        .filter(|p| hot(flow_state(&e, *p, dest(8000 + *p as u16))))
        .count();
    let kept_suspects = (11..=20u32)
        .filter(|p| flow_state(&e, *p, dest(8000 + *p as u16)).is_some())
        .count();
    assert_eq!((kept_storms, kept_suspects), (8, 0));
}

#[test]
fn syscall_rates_are_capped_and_expire() {
    let limits = Limits {
        syscall_rates: 8,
        ..Default::default()
    };
    let mut e = Engine::with_limits(DetectConfig::default(), limits);
    let syscalls = |ts: u64, pid: u32| Observation::Syscalls {
        ts_ns: ts,
        pid,
        count: 500,
    };
    for pid in 1..=20u32 {
        e.observe(&syscalls(SEC + u64::from(pid) * MS, pid));
    }
    assert_eq!(fill(&e, "syscall_rates"), (8, 8, 12));
    // The most recently measured kept their first measurement: a second
    // one gives a rate; an evicted pid starts over (and evicts one more).
    e.observe(&syscalls(2 * SEC, 20));
    e.observe(&syscalls(2 * SEC, 12));
    // 500 syscalls between its measurements at 1.020 s and 2 s.
    let rate = e.syscall_rate(20).expect("a rate for pid 20");
    assert!((rate - 500.0 / 0.98).abs() < 1e-6, "{rate}");
    assert_eq!(e.syscall_rate(12), None);
    assert_eq!(fill(&e, "syscall_rates"), (8, 8, 13));
    // No longer measured: forgotten.
    e.tick(40 * SEC);
    assert_eq!(fill(&e, "syscall_rates"), (0, 8, 13));
}

#[test]
fn suspects_come_most_severe_first() {
    let mut e = Engine::new(DetectConfig::default());
    let mut obs = Vec::new();
    // Five storms at 1,000, 500, 333, 250 and 200 attempts/s, listed
    // least severe first…
    for pid in (1..=5u32).rev() {
        let n = 1500 / pid as usize;
        obs.extend(looping(
            pid,
            dest(8000 + pid as u16),
            SEC,
            u64::from(pid) * MS,
            n,
        ));
    }
    // …and 25 suspects at 10/s.
    for pid in 101..=125u32 {
        obs.extend(looping(pid, dest(8000 + pid as u16), SEC, 100 * MS, 15));
    }
    run(&mut e, &merged(obs), 0);
    let v = e.suspects();
    assert_eq!(v.len(), 30);
    // Storms first, by rate (their scores are all 100)…
    assert_eq!(v[..5], [1, 2, 3, 4, 5]);
    // …then suspects, equal in score and rate, by pid.
    assert_eq!(v[5..], (101..=125).collect::<Vec<u32>>()[..]);
    // A map holding 8 keeps every storm.
    let capped: Vec<u32> = v.into_iter().take(8).collect();
    assert_eq!(capped, [1, 2, 3, 4, 5, 101, 102, 103]);
}

#[test]
fn a_reused_pid_inherits_nothing() {
    let mut e = Engine::new(DetectConfig::default());
    let d = dest(8080);
    let mut obs = vec![fork(SEC - MS, 7, 42)];
    obs.extend(looping(42, d, SEC, MS, 1500));
    obs.push(Observation::Syscalls {
        ts_ns: 2 * SEC,
        pid: 42,
        count: 10,
    });
    obs.push(Observation::Syscalls {
        ts_ns: 2_100 * MS,
        pid: 42,
        count: 10_000,
    });
    run(&mut e, &merged(obs), 0);
    assert_eq!(flow_state(&e, 42, d), Some(State::Storm));
    assert_eq!(e.groups().parent(42), Some(7));
    assert!(e.syscall_rate(42).is_some());
    assert_eq!(e.suspects(), [42]);
    // Its exit was lost; the pid is forked again by another parent.
    e.observe(&fork(2_600 * MS, 8, 42));
    assert!(e.verdict(42, &d).is_none(), "no flow inherited");
    assert_eq!(e.syscall_rate(42), None, "no syscall rate inherited");
    assert_eq!(e.groups().parent(42), None, "no parent inherited");
    assert!(e.suspects().is_empty(), "the old storm probes nobody");
    e.observe(&established(2_700 * MS, 42, 5, d));
    let v = e.verdict(42, &d).expect("a fresh flow");
    assert_eq!(v.state, State::Healthy);
    assert_eq!(e.groups().parent(42), Some(8));
    assert_eq!(e.groups().cgroup(42), Some(5));
    // The old storm is still there to settle, as an exited flow.
    assert_eq!(fill(&e, "exited_flows").0, 1);

    // An exit seen, then an exec whose fork was missed: a stranger too.
    let mut e = Engine::new(DetectConfig::default());
    let mut obs = vec![fork(SEC - MS, 7, 43)];
    obs.extend(looping(43, d, SEC, MS, 1500));
    obs.push(exit(2_600 * MS, 43));
    run(&mut e, &obs, 0);
    e.observe(&Observation::Exec {
        ts_ns: 2_700 * MS,
        pid: 43,
        comm: Comm::from("other"),
    });
    e.observe(&established(2_800 * MS, 43, 0, d));
    assert_eq!(e.verdict(43, &d).map(|v| v.state), Some(State::Healthy));
    assert_eq!((e.groups().parent(43), e.groups().cgroup(43)), (None, None));
}

#[test]
fn dead_processes_leave_nothing_behind() {
    // 20,000 short-lived children of 4 parents, 50,000 destinations, and
    // one storming process; then every one exits.
    let mut e = Engine::new(DetectConfig::default());
    let storm_dest = dest(8080);
    let mut obs = looping(9, storm_dest, SEC, MS, 1500);
    for i in 0..20_000u32 {
        obs.push(fork(SEC + u64::from(i) * 25_000, 10 + i % 4, 100_000 + i));
    }
    for j in 0..50_000u32 {
        let ts = SEC + SEC / 2 + u64::from(j) * 20_000;
        obs.push(established(ts, 100_000 + j % 20_000, 1, nth_dest(j)));
    }
    obs.push(exit(2_550 * MS, 9));
    for i in 0..20_000u32 {
        obs.push(exit(2_550 * MS + u64::from(i) * 10_000, 100_000 + i));
    }
    let obs = merged(obs);
    let end = obs[obs.len() - 1].ts_ns();
    run(&mut e, &obs, 0);

    // 50,001 flows into 10,000 (batches of 1,250): 33 batches evicted;
    // every flow left the table with its process.
    assert_eq!(fill(&e, "flows"), (0, 10_000, 41_250));
    // Two roll-ups per connect plus the storm's cgroup one: 100,001 into
    // 16,384 (batches of 2,048): 41 batches.
    assert_eq!(fill(&e, "rollups"), (16_033, 16_384, 83_968));
    // The storm is held, as an exited flow, until it settles.
    assert_eq!(fill(&e, "exited_flows"), (1, 4_096, 0));
    assert!(hot(flow_state(&e, 9, storm_dest)));
    // Exited processes are remembered for their grace period.
    assert_eq!(fill(&e, "parents"), (20_001, 65_536, 0));
    assert_eq!(fill(&e, "forks").0, 0);

    // Past every expiry: nothing of them remains; the evictions stay
    // counted.
    let mut t = end;
    while t < end + 45 * SEC {
        t += SEC / 2;
        e.tick(t);
    }
    let left: Vec<(&str, u64)> = e
        .tables()
        .iter()
        .filter(|u| u.entries > 0)
        .map(|u| (u.name, u.entries))
        .collect();
    assert_eq!(left, []);
    let evicted: Vec<(&str, u64)> = e
        .tables()
        .iter()
        .filter(|u| u.evictions > 0)
        .map(|u| (u.name, u.evictions))
        .collect();
    assert_eq!(evicted, [("flows", 41_250), ("rollups", 83_968)]);
    assert_eq!(flow_state(&e, 9, storm_dest), None);
}

/// `knows` answers as `subject_stats` does, without building the stats.
#[test]
fn knows_agrees_with_subject_stats() {
    let mut e = Engine::new(DetectConfig::default());
    let d = dest(7070);
    let obs: Vec<Observation> = (0..200u64)
        .map(|i| refused(1_000_000_000 + i * 1_000_000, 42, d))
        .collect();
    run(&mut e, &obs, 0);
    let subjects = [
        Subject::Flow { pid: 42, dest: d },
        Subject::Flow { pid: 43, dest: d },
        Subject::Flow {
            pid: 42,
            dest: dest(7071),
        },
        Subject::Parent { ppid: 1, dest: d },
        Subject::Cgroup { cgroup: 7, dest: d },
    ];
    let known: Vec<bool> = subjects.iter().map(|s| e.knows(s)).collect();
    let stats: Vec<bool> = subjects
        .iter()
        .map(|s| e.subject_stats(s).is_some())
        .collect();
    assert_eq!(known, stats);
    assert_eq!(known[..3], [true, false, false]);
}
