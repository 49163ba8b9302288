//! Engine behaviour on synthetic traces, with exact times on the injected
//! clock.
use super::{
    DetectConfig, Engine, State, Subject,
    synthetic::{dest, failing_client, refused, run, time_to_storm, times},
};
use crate::ingest::{Comm, Observation, Proto, Reply};

/// Every table bounded, dead state expired, suspects most severe first,
/// pid reuse.
mod bounds;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

#[test]
fn a_tight_refused_loop_is_a_storm_within_a_second_with_an_explanation() {
    let changes = failing_client(std::iter::repeat_n(MS, 3000));
    let t = time_to_storm(&changes).expect("storm");
    assert!(t <= SEC, "flagged after {} ms", t / MS);
    let storm = changes.iter().find(|c| c.to == State::Storm).unwrap();
    assert_eq!(storm.from, State::Suspect);
    assert!(
        storm
            .explanation
            .starts_with("client (pid 4242) → 127.0.0.1:8080: "),
        "{}",
        storm.explanation
    );
    assert!(
        storm
            .explanation
            .contains("100% ECONNREFUSED, median gap 1 ms, no backoff"),
        "{}",
        storm.explanation
    );
    assert!(
        storm.explanation.contains("none succeeded")
            && storm
                .explanation
                .contains("× the budget (20% of requests + 10/s)"),
        "{}",
        storm.explanation
    );
    // It stops: recovering, then resolved 5 s later.
    let states: Vec<State> = changes.iter().map(|c| c.to).collect();
    assert_eq!(
        states,
        [
            State::Suspect,
            State::Storm,
            State::Recovering,
            State::Resolved
        ]
    );
}

#[test]
fn a_fixed_10ms_retry_is_a_storm_within_two_seconds() {
    let t = time_to_storm(&failing_client(std::iter::repeat_n(10 * MS, 400))).expect("storm");
    assert!(t <= 2 * SEC, "{} ms", t / MS);
}

#[test]
fn a_1s_retry_forever_is_a_persistent_failure_never_a_storm() {
    let changes = failing_client(std::iter::repeat_n(SEC, 20));
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
    let p = changes
        .iter()
        .find(|c| c.persistent_failure)
        .expect("flagged as persistent");
    assert!(
        p.explanation.ends_with(": persistent failure"),
        "{}",
        p.explanation
    );
    assert!(
        p.explanation.contains("median gap 1.0 s"),
        "{}",
        p.explanation
    );
}

#[test]
fn exponential_backoff_is_never_a_storm() {
    // 100 ms ×2 with ±20% jitter from a fixed pseudo-random sequence.
    let jitter = [0.9, 1.15, 0.82, 1.2, 1.0, 0.85, 1.1, 0.95];
    let gaps = (0..8).map(|i| (100.0 * 2f64.powi(i) * jitter[i as usize]) as u64 * MS);
    let changes = failing_client(gaps);
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
}

#[test]
fn a_burst_that_stops_is_not_a_storm() {
    // 50 connections refused at once (a pool after a restart), then nothing.
    let changes = failing_client(std::iter::repeat_n(100_000, 49));
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
}

#[test]
fn busy_healthy_traffic_is_never_suspect() {
    let d = dest(80);
    let obs: Vec<Observation> = times(SEC, std::iter::repeat_n(500_000, 10_000))
        .into_iter()
        .map(|t| established(t, 1, "ok", 1, d))
        .collect();
    let changes = run(&mut Engine::new(DetectConfig::default()), &obs, SEC);
    assert!(changes.is_empty(), "{changes:#?}");
}

/// A TCP connect that was established.
fn established(
    ts: u64,
    pid: u32,
    comm: &str,
    cgroup: u64,
    dest: crate::ingest::Destination,
) -> Observation {
    Observation::Connect {
        ts_ns: ts,
        start_ns: ts,
        pid,
        comm: Comm::from(comm),
        cgroup,
        dest,
        outcome: crate::ingest::ConnectOutcome::Established,
        rst: false,
        syn_retransmits: 0,
    }
}

fn exchange(ts: u64, pid: u32, fingerprint: u64, sent: u32) -> Observation {
    reply_exchange(ts, pid, 1, false, Reply::NotRead, fingerprint, sent)
}

fn reply_exchange(
    ts: u64,
    pid: u32,
    sock: u64,
    first: bool,
    reply: Reply,
    fingerprint: u64,
    sent: u32,
) -> Observation {
    Observation::Exchange {
        ts_ns: ts,
        pid,
        comm: Comm::from("http"),
        cgroup: 1,
        dest: dest(80),
        sent,
        received: 57,
        fingerprint,
        sock,
        first,
        reply,
    }
}

const HTTP_503: Reply = Reply::Http { status: 503 };
const HTTP_200: Reply = Reply::Http { status: 200 };

#[test]
fn the_same_request_repeated_is_suspect_and_a_storm_only_when_it_fails() {
    let ts = times(SEC, std::iter::repeat_n(MS, 3000));
    // Lengths only (replies not read yet): suspect, never storm.
    let unprobed: Vec<Observation> = ts.iter().map(|t| exchange(*t, 7, 0, 35)).collect();
    let changes = run(&mut Engine::new(DetectConfig::default()), &unprobed, SEC);
    assert_eq!(changes[0].to, State::Suspect);
    assert!(time_to_storm(&changes).is_none());
    assert!(
        changes[0]
            .explanation
            .contains("same-length 35 B request answered with 57 B"),
        "{}",
        changes[0].explanation
    );
    // Replies read after 200 ms (the probes attached): 503 every time.
    let read = |status: Reply| -> Vec<Observation> {
        ts.iter()
            .map(|t| {
                let r = if *t >= SEC + 200 * MS {
                    status
                } else {
                    Reply::NotRead
                };
                reply_exchange(*t, 7, 1, false, r, 0xabc, 35)
            })
            .collect()
    };
    let changes = run(
        &mut Engine::new(DetectConfig::default()),
        &read(HTTP_503),
        SEC,
    );
    let t = time_to_storm(&changes).expect("storm");
    assert!(t <= SEC, "{} ms", t / MS);
    let storm = changes.iter().find(|c| c.to == State::Storm).unwrap();
    assert!(
        storm.explanation.contains("HTTP 503"),
        "{}",
        storm.explanation
    );
    // The same identical requests answered 200: load, never a storm.
    let changes = run(
        &mut Engine::new(DetectConfig::default()),
        &read(HTTP_200),
        SEC,
    );
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
    // Bytes no protocol explains: unknown, never a failure.
    let changes = run(
        &mut Engine::new(DetectConfig::default()),
        &read(Reply::Unknown),
        SEC,
    );
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
}

#[test]
fn a_new_connection_per_failing_request_is_a_storm() {
    // connect, then the one request on it answered 503 — e.g. curl in a
    // shell loop (a new process each time would roll up to the parent).
    let mut obs = Vec::new();
    for (i, t) in times(SEC, std::iter::repeat_n(2 * MS, 1500))
        .into_iter()
        .enumerate()
    {
        obs.push(established(t, 9, "http", 1, dest(80)));
        obs.push(reply_exchange(
            t + MS,
            9,
            i as u64 + 1,
            true,
            HTTP_503,
            0,
            35,
        ));
    }
    let changes = run(&mut Engine::new(DetectConfig::default()), &obs, SEC);
    let t = time_to_storm(&changes).expect("storm");
    assert!(t <= SEC, "{} ms", t / MS);
    // The same with 200s: healthy load (suspect by repetition at most).
    let ok: Vec<Observation> = obs
        .into_iter()
        .map(|o| match o {
            Observation::Exchange {
                ts_ns, pid, sock, ..
            } => reply_exchange(ts_ns, pid, sock, true, HTTP_200, 0, 35),
            other => other,
        })
        .collect();
    let changes = run(&mut Engine::new(DetectConfig::default()), &ok, SEC);
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
}

#[test]
fn a_port_check_is_not_a_failure_a_request_left_unanswered_is() {
    let conn_end = |t: u64, sent: u32| Observation::ConnEnd {
        ts_ns: t + MS,
        start_ns: t,
        pid: 5,
        comm: Comm::from("probe"),
        cgroup: 1,
        dest: dest(80),
        sent,
        received: 0,
    };
    let connect = |t: u64| established(t, 5, "probe", 1, dest(80));
    let trace = |sent: u32| -> Vec<Observation> {
        times(SEC, std::iter::repeat_n(5 * MS, 600))
            .into_iter()
            .flat_map(|t| [connect(t), conn_end(t, sent)])
            .collect()
    };
    let changes = run(&mut Engine::new(DetectConfig::default()), &trace(0), SEC);
    assert!(changes.is_empty(), "a TCP health probe: {changes:#?}");
    let changes = run(&mut Engine::new(DetectConfig::default()), &trace(40), SEC);
    assert!(time_to_storm(&changes).is_some(), "{changes:#?}");
}

#[test]
fn a_burst_of_a_thousand_failures_is_a_storm_however_short() {
    // 5,000 refused in 90 ms: a capped retry loop.
    let changes = failing_client(std::iter::repeat_n(18_000, 4_999));
    let t = time_to_storm(&changes).expect("a burst is a storm");
    assert!(t <= 200 * MS, "{} ms", t / MS);
}

fn udp_send(ts: u64, sock: u64, question: Option<[u8; 32]>) -> Observation {
    Observation::UdpSend {
        ts_ns: ts,
        pid: 11,
        comm: Comm::from("getent"),
        cgroup: 1,
        dest: crate::ingest::Destination {
            proto: Proto::Udp,
            ..dest(53)
        },
        bytes: 40,
        fingerprint: 0,
        sock,
        connected: true,
        question,
    }
}

#[test]
fn dns_refused_by_icmp_is_a_storm_naming_the_query() {
    let mut q = [0u8; 32];
    q[..23].copy_from_slice(b"\x05storm\x07example\x07invalid\x00");
    let mut obs = Vec::new();
    for (i, t) in times(SEC, std::iter::repeat_n(MS, 3000))
        .into_iter()
        .enumerate()
    {
        obs.push(udp_send(t, i as u64 + 1, Some(q)));
        obs.push(Observation::UdpError {
            ts_ns: t + 10_000,
            pid: 11,
            comm: Comm::from("getent"),
            cgroup: 1,
            dest: crate::ingest::Destination {
                proto: Proto::Udp,
                netns: 0,
                ..dest(53)
            },
            errno: libc::ECONNREFUSED,
        });
    }
    let changes = run(&mut Engine::new(DetectConfig::default()), &obs, SEC);
    let t = time_to_storm(&changes).expect("storm");
    assert!(t <= SEC, "{} ms", t / MS);
    let storm = changes.iter().find(|c| c.to == State::Storm).unwrap();
    assert!(
        storm.explanation.contains("ECONNREFUSED")
            && storm.explanation.contains("storm.example.invalid"),
        "{}",
        storm.explanation
    );
}

#[test]
fn dns_resent_without_replies_is_a_storm_answered_is_not() {
    let sends: Vec<Observation> = times(SEC, std::iter::repeat_n(10 * MS, 300))
        .into_iter()
        .map(|t| udp_send(t, 1, None))
        .collect();
    let changes = run(&mut Engine::new(DetectConfig::default()), &sends, SEC);
    assert!(time_to_storm(&changes).is_some(), "{changes:#?}");
    // Each answered (NOERROR): healthy.
    let answered: Vec<Observation> = sends
        .iter()
        .flat_map(|o| {
            [
                o.clone(),
                Observation::UdpRecv {
                    ts_ns: o.ts_ns() + MS,
                    pid: 11,
                    comm: Comm::from("getent"),
                    cgroup: 1,
                    dest: crate::ingest::Destination {
                        proto: Proto::Udp,
                        ..dest(53)
                    },
                    bytes: 60,
                    sock: 1,
                    reply: Reply::Dns {
                        rcode: 0,
                        answers: 1,
                    },
                },
            ]
        })
        .collect();
    let changes = run(&mut Engine::new(DetectConfig::default()), &answered, SEC);
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
}

#[test]
fn fire_and_forget_udp_is_never_a_storm_by_volume() {
    let obs: Vec<Observation> = times(SEC, std::iter::repeat_n(MS, 3000))
        .into_iter()
        .map(|t| match udp_send(t, 1, None) {
            Observation::UdpSend { mut dest, .. } => {
                dest.port = 8125;
                Observation::UdpSend {
                    ts_ns: t,
                    pid: 11,
                    comm: Comm::from("statsd"),
                    cgroup: 1,
                    dest,
                    bytes: 40,
                    fingerprint: 0xfeed,
                    sock: 1,
                    connected: true,
                    question: None,
                }
            }
            other => other,
        })
        .collect();
    let changes = run(&mut Engine::new(DetectConfig::default()), &obs, SEC);
    assert!(time_to_storm(&changes).is_none(), "{changes:#?}");
}

#[test]
fn a_storm_whose_replies_are_no_longer_read_stays_a_storm() {
    // 503 on keep-alive, read for 2 s, then the probes rest: the loop goes
    // on for 8 s more with the same lengths. It must hold its verdict.
    let obs: Vec<Observation> = times(SEC, std::iter::repeat_n(2 * MS, 5000))
        .into_iter()
        .map(|t| {
            let r = if t < 3 * SEC {
                HTTP_503
            } else {
                Reply::NotRead
            };
            reply_exchange(t, 7, 1, false, r, 0, 35)
        })
        .collect();
    let changes = run(&mut Engine::new(DetectConfig::default()), &obs, 0);
    let states: Vec<State> = changes.iter().map(|c| c.to).collect();
    assert_eq!(states, [State::Suspect, State::Storm], "{changes:#?}");
}

#[test]
fn short_lived_children_roll_up_to_their_parent_and_cgroup() {
    let d = dest(9000);
    let mut obs = Vec::new();
    // A parent (pid 100) starts a child every 25 ms; each connects once.
    for (i, t) in times(SEC, std::iter::repeat_n(25 * MS, 120))
        .into_iter()
        .enumerate()
    {
        let child = 1000 + i as u32;
        obs.push(Observation::Fork {
            ts_ns: t,
            parent: 100,
            child,
            comm: Comm::from("spawner"),
        });
        obs.push(refused(t + MS, child, d));
        obs.push(Observation::Exit {
            ts_ns: t + 2 * MS,
            pid: child,
            tid: child,
            group_dead: true,
        });
    }
    let changes = run(&mut Engine::new(DetectConfig::default()), &obs, SEC);
    let storms: Vec<&Subject> = changes
        .iter()
        .filter(|c| c.to == State::Storm)
        .map(|c| &c.subject)
        .collect();
    assert_eq!(
        storms,
        vec![
            &Subject::Parent { ppid: 100, dest: d },
            &Subject::Cgroup { cgroup: 1, dest: d }
        ],
        "{changes:#?}"
    );
    assert!(
        changes
            .iter()
            .all(|c| !matches!(c.subject, Subject::Flow { .. })),
        "no single child is a storm"
    );
}

#[test]
fn an_exited_storm_resolves_and_a_reused_pid_starts_fresh() {
    let d = dest(8080);
    let mut obs: Vec<Observation> = times(SEC, std::iter::repeat_n(MS, 1500))
        .into_iter()
        .map(|t| refused(t, 42, d))
        .collect();
    let end = obs.last().unwrap().ts_ns();
    obs.push(Observation::Exit {
        ts_ns: end + MS,
        pid: 42,
        tid: 42,
        group_dead: true,
    });
    let mut engine = Engine::new(DetectConfig::default());
    let changes = run(&mut engine, &obs, 7 * SEC);
    let states: Vec<State> = changes.iter().map(|c| c.to).collect();
    assert_eq!(
        states,
        [
            State::Suspect,
            State::Storm,
            State::Recovering,
            State::Resolved
        ]
    );
    assert!(
        changes[2].explanation.contains("exited"),
        "{}",
        changes[2].explanation
    );
    assert_eq!(engine.flow_count(), 0);
    assert!(
        engine.verdict(42, &d).is_none(),
        "the pid's state was dropped"
    );
}

#[test]
fn same_input_same_output() {
    let a = failing_client(std::iter::repeat_n(3 * MS, 1000));
    let b = failing_client(std::iter::repeat_n(3 * MS, 1000));
    assert_eq!(a, b);
    assert!(!a.is_empty());
}

#[test]
fn a_flow_costs_less_than_a_kilobyte() {
    let bytes = Engine::bytes_per_flow();
    assert!(bytes <= 1024, "{bytes} bytes per flow");
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Any always-failing client that backs off — base 10 ms to 1 s,
        /// factor 1.5 to 3, with up to ±20% jitter — is never a storm.
        #[test]
        fn backing_off_is_never_a_storm(
            base_ms in 10u64..=1000,
            factor in 1.5f64..=3.0,
            jitter in proptest::collection::vec(0.8f64..=1.2, 12),
        ) {
            let mut gap = base_ms as f64 * MS as f64;
            let mut gaps = Vec::new();
            let mut total = 0u64;
            for j in &jitter {
                let g = (gap * j) as u64;
                total += g;
                if total > 60 * SEC {
                    break;
                }
                gaps.push(g);
                gap *= factor;
            }
            let changes = failing_client(gaps);
            prop_assert!(time_to_storm(&changes).is_none(), "{:#?}", changes);
        }

        /// Any failing loop without backoff at ≥ 20 attempts/s for ≥ 2 s —
        /// steady or jittered ±30% — is always a storm, within those 2 s.
        #[test]
        fn a_loop_without_backoff_is_always_a_storm(
            rate in 20.0f64..=2000.0,
            secs in 2.0f64..=4.0,
            jitter in proptest::collection::vec(0.7f64..=1.3, 64),
        ) {
            let gap = 1e9 / rate;
            let n = (rate * secs) as usize;
            let gaps: Vec<u64> = (0..n).map(|i| (gap * jitter[i % jitter.len()]) as u64).collect();
            let changes = failing_client(gaps);
            let t = time_to_storm(&changes);
            prop_assert!(t.is_some_and(|t| t <= 2 * SEC), "rate {} → {:?}", rate, t);
        }
    }
}

#[test]
fn a_backlog_drained_late_is_judged_on_its_own_clock() {
    // A flood kept the drain busy: 3 s of a refused loop arrive with no
    // tick in between; the next tick still reports the storm.
    let mut engine = Engine::new(DetectConfig::default());
    engine.tick(SEC);
    for t in times(SEC + MS, std::iter::repeat_n(MS, 3000)) {
        engine.observe(&refused(t, 4242, dest(8080)));
    }
    let changes = engine.tick(5 * SEC);
    assert!(changes.iter().any(|c| c.to == State::Storm), "{changes:#?}");
}

#[test]
fn a_connection_closed_after_its_process_exited_still_counts_for_the_parent() {
    // The kernel reports a process's exit before it closes the sockets the
    // process left open: the last exchange of each child arrives after its
    // exit record and must still reach the parent's roll-up.
    let mut engine = Engine::new(DetectConfig::default());
    let mut obs = Vec::new();
    for (i, t) in times(SEC, std::iter::repeat_n(10 * MS, 300))
        .into_iter()
        .enumerate()
    {
        let child = 1000 + i as u32;
        obs.push(Observation::Fork {
            ts_ns: t,
            parent: 77,
            child,
            comm: Comm::from("sh"),
        });
        obs.push(established(t + MS, child, "curl", 0, dest(80)));
        obs.push(Observation::Exit {
            ts_ns: t + 3 * MS,
            pid: child,
            tid: child,
            group_dead: true,
        });
        // Closed when the server's FIN came, a tick or two later.
        let mut ex = reply_exchange(t + 250 * MS, child, i as u64, true, HTTP_503, 0, 82);
        if let Observation::Exchange { cgroup, .. } = &mut ex {
            *cgroup = 0;
        }
        obs.push(ex);
    }
    obs.sort_by_key(|o| o.ts_ns());
    let changes = run(&mut engine, &obs, SEC);
    assert!(
        changes
            .iter()
            .any(|c| matches!(c.subject, Subject::Parent { ppid: 77, .. }) && c.to == State::Storm),
        "{changes:#?}"
    );
}
