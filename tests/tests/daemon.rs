//! The daemon as an operator meets it: a real `stormguard daemon` with a
//! temporary socket and database, real storming children, the CLI, the
//! API under hostile input, access control, and the metrics endpoint.
use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use stormguard_tests::{
    ChildGuard, Daemon, closed_port, stormguard, stormguard_bin, time_scale, wait_for,
};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

fn tmp(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sg-daemon-{tag}-{}", std::process::id()))
}

/// Every daemon sees every process on the host, so two tests storming at
/// once see each other's storms (two active incidents where one is
/// expected), and while 1,000 processes storm, each other daemon running
/// competes for the CPU with the one under test. Tests that storm run
/// alone; the others may run beside each other.
static STORMS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Waits until no other test of this file runs a daemon.
fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    // A failed test poisons it; the next one may still run.
    STORMS.write().unwrap_or_else(|e| e.into_inner())
}

/// Waits until no test of this file is storming.
fn no_storm() -> std::sync::RwLockReadGuard<'static, ()> {
    STORMS.read().unwrap_or_else(|e| e.into_inner())
}

/// A storming client: tight refused connects to a closed port for `secs`.
fn spawn_storm(port: &str, secs: &str) -> ChildGuard {
    ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["storm", "--addr", port, "--secs", secs])
            .stdout(Stdio::null()),
    )
}

#[test]
fn a_storm_becomes_an_incident_that_survives_a_restart_and_explains() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("incident", &tmp("incident"), "") else {
        return;
    };
    let port = closed_port(false).to_string();
    // Still storming when the incident is listed, also on a slow machine.
    let storm = spawn_storm(&port, &(3.0 * time_scale()).to_string());
    let pid = storm.pid();
    let (inc, took) = wait_for("the incident", Duration::from_secs(15), || {
        d.json(&["incidents"])
            .as_array()?
            .iter()
            .find(|i| i["pid"] == pid && i["destination"] == port)
            .cloned()
    });
    println!(
        "incident listed {took:?} after the storm started: {}",
        inc["id"]
    );
    let id = inc["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("inc-"), "{id}");
    assert_eq!(inc["kind"], "flow");
    assert_eq!(inc["comm"], "stormclient");
    assert_eq!(inc["exe"], CLIENT);
    assert_eq!(inc["ppid"], std::process::id());
    assert_eq!(inc["active"], true);
    assert_eq!(
        d.json(&["incidents", "--active"]).as_array().unwrap().len(),
        1
    );
    storm.finish(Duration::from_secs(30));

    // The status reports what it sees.
    // Every signal of this kernel is there (by its first-choice hook or a
    // stand-in: 14 hooks on 6.3+, more where fexit stands in for the send
    // and receive tracepoints); only TLS depends on the host's libssl.
    let status = d.json(&["status"]);
    let signals = status["signals"].as_array().unwrap();
    assert_eq!(signals.len(), 10, "{status}");
    for s in signals {
        if s["name"] != "tls_plaintext" {
            assert_eq!(s["available"], true, "signal missing: {s}");
            assert!(s["problems"].as_array().unwrap().is_empty(), "{s}");
        }
    }
    let always_on: Vec<&str> = status["always_on"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_str().unwrap())
        .collect();
    // Exactly the always-on signals' hooks, in order: 14 on 6.3+, 18 where
    // six fexit programs stand in for the send and receive tracepoints.
    let expected: Vec<&str> = signals
        .iter()
        .filter(|s| s["on_demand"] == false)
        .flat_map(|s| s["via"].as_array().unwrap().iter())
        .map(|h| h.as_str().unwrap())
        .collect();
    assert_eq!(always_on, expected, "{status}");
    let stand_ins = always_on.iter().filter(|h| h.starts_with("fexit ")).count();
    assert!(stand_ins == 0 || stand_ins == 6, "{status}");
    assert_eq!(always_on.len(), 14 + stand_ins - stand_ins / 3, "{status}");
    assert!(!status["kernel"].as_str().unwrap().is_empty(), "{status}");
    assert!(status["incidents_total"].as_u64().unwrap() >= 1, "{status}");
    assert_eq!(status["ring_drops"], 0, "{status}");

    // Restart: the incident is still there, closed.
    d.stop();
    assert!(!d.socket.exists(), "socket removed on exit");
    assert!(d.spawn("incident"));
    let after = d.json(&["incidents"]);
    let again = after
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} lost across a restart: {after}"));
    assert_eq!(again["active"], false);
    assert!(again["total_attempts"].as_u64().unwrap() > 100, "{again}");
    assert!(
        d.json(&["incidents", "--active"])
            .as_array()
            .unwrap()
            .is_empty()
    );

    // explain, by id and by pid, text and JSON.
    for target in [id.clone(), pid.to_string()] {
        let out = d.cli(&["explain", &target]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        println!("{text}");
        assert!(text.starts_with(&format!("{id} ")), "{text}");
        for needle in [
            "why        stormclient (pid",
            "100% ECONNREFUSED",
            "rate/s     ",
            "errors     ECONNREFUSED",
            "gaps ",
            "backoff    no backoff",
            &format!("parent     {}", std::process::id()),
            "cgroup     /",
            &format!("target     tcp {port}"),
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }
    assert_eq!(d.json(&["explain", &id])["id"], id.as_str());

    // An unknown id or pid: an error that says so, non-zero.
    let out = d.cli(&["explain", "inc-99999"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "stormguard: no incident inc-99999"
    );
    let out = d.cli(&["explain", "not-an-id"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither an incident id"));
}

/// One raw request line; returns the response line.
fn raw(stream: &mut UnixStream, line: &[u8]) -> serde_json::Value {
    stream.write_all(line).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut r = BufReader::new(stream.try_clone().unwrap());
    let mut resp = String::new();
    r.read_line(&mut resp).unwrap();
    serde_json::from_str(&resp).unwrap_or_else(|e| panic!("{e}: {resp:?}"))
}

#[test]
fn hostile_input_gets_errors_and_the_daemon_keeps_answering() {
    let _beside = no_storm();
    let Some(d) = Daemon::start("hostile", &tmp("hostile"), "") else {
        return;
    };
    let mut s = UnixStream::connect(&d.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = raw(&mut s, b"\x00\xff\xfe garbage \x80");
    assert_eq!(
        (r["ok"].as_bool(), r["error"]["code"].as_str()),
        (Some(false), Some("bad_request"))
    );
    let r = raw(&mut s, br#"{"v":1,"method":"reboot"}"#);
    assert_eq!(r["error"]["code"], "unknown_method");
    assert!(r["error"]["message"].as_str().unwrap().contains("reboot"));
    let r = raw(&mut s, br#"{"v":7,"method":"status"}"#);
    assert_eq!(r["error"]["code"], "unsupported_version");
    let r = raw(
        &mut s,
        br#"{"v":1,"method":"explain","params":{"id":"42"}}"#,
    );
    assert_eq!(r["error"]["code"], "bad_request");
    // Same connection still works.
    let r = raw(&mut s, br#"{"v":1,"method":"status"}"#);
    assert_eq!(r["ok"], true);

    // A 10 MB line: refused, connection closed, daemon fine.
    let big = UnixStream::connect(&d.socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let writer = {
        let mut w = big.try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..10 {
                if w.write_all(&chunk).is_err() {
                    break; // the daemon hung up, as it should
                }
            }
        })
    };
    let mut resp = String::new();
    BufReader::new(big.try_clone().unwrap())
        .read_line(&mut resp)
        .unwrap();
    let r: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(r["error"]["code"], "request_too_large", "{resp}");
    writer.join().unwrap();

    // Many connections that say nothing, then hang up.
    for _ in 0..100 {
        let _ = UnixStream::connect(&d.socket).unwrap();
    }
    let status = d.json(&["status"]);
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn peers_outside_root_and_the_group_are_refused() {
    let _beside = no_storm();
    let dir = tmp("access");
    let Some(mut d) = Daemon::start("access", &dir, "") else {
        return;
    };
    // Rewrite the config with a world-writable socket and restart: anyone
    // can connect, so SO_PEERCRED decides.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    std::fs::write(
        &d.config,
        cfg.replacen("[daemon]\n", "[daemon]\nsocket_mode = \"0666\"\n", 1),
    )
    .unwrap();
    d.stop();
    assert!(d.spawn("access"));
    let nobody = |d: &Daemon| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(stormguard_bin())
            .args(["status", "--socket"])
            .arg(&d.socket)
            .output()
            .expect("setpriv")
    };
    let out = nobody(&d);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("permission denied") && err.contains("group `stormguard`"),
        "{err}"
    );
    // The default 0660: the kernel refuses before the daemon sees it, and
    // the message is the same.
    std::fs::write(&d.config, cfg).unwrap();
    d.stop();
    assert!(d.spawn("access"));
    let mode = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o660
    );
    let out = nobody(&d);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("group `stormguard`"));
    // Root is let in.
    assert_eq!(d.json(&["status"])["pid"], d.child.as_ref().unwrap().pid());
}

#[test]
fn an_invalid_config_exits_2_naming_the_field_and_loads_nothing() {
    let dir = tmp("badcfg");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    let socket = dir.join("sg.sock");
    std::fs::write(
        &cfg,
        format!(
            "[daemon]\nsocket = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:not-a-port\"\n",
            socket.display()
        ),
    )
    .unwrap();
    let out = stormguard(["daemon", "--config", cfg.to_str().expect("UTF-8 path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("invalid config {}", cfg.display()))
            && err.contains("metrics.listen = 127.0.0.1:not-a-port"),
        "{err}"
    );
    assert!(!socket.exists(), "nothing half-applied: no socket");
    std::fs::write(&cfg, "[store]\nretention = 3\n").unwrap();
    let out = stormguard(["daemon", "--config", cfg.to_str().expect("UTF-8 path")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("retention"), "{err}");
    // config check says the same, and ok for a good file.
    let out = stormguard(["config", "check", cfg.to_str().expect("UTF-8 path")]);
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&cfg, "[store]\nretention_days = 3\n").unwrap();
    let out = stormguard(["config", "check", cfg.to_str().expect("UTF-8 path")]);
    assert!(out.status.success());
    let out = stormguard([
        "config",
        "show",
        "--config",
        cfg.to_str().expect("UTF-8 path"),
    ]);
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("retention_days = 3") && shown.contains("[detect]"),
        "{shown}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_daemon_not_running_is_said_plainly() {
    let out = stormguard(["status", "--socket", "/nonexistent/sg.sock"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("daemon is not running") && err.contains("stormguard daemon"),
        "{err}"
    );
}

#[test]
fn metrics_parse_with_a_real_prometheus_parser_and_events_and_top_follow_storms() {
    let _alone = alone();
    let Some(d) = Daemon::start("metrics", &tmp("metrics"), "per_storm = true\n") else {
        return;
    };
    // events --follow, started before the storm.
    let mut events = ChildGuard::spawn(
        Command::new(stormguard_bin())
            .args(["events", "--follow", "--json", "--socket"])
            .arg(&d.socket)
            .stdout(Stdio::piped()),
    );
    let ev_lines = stormguard_tests::lines(events.0.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    let port = closed_port(false).to_string();
    let storm = spawn_storm(&port, "3");
    let pid = storm.pid();
    let (change, took) = wait_for("a storm event", Duration::from_secs(15), || {
        ev_lines
            .try_iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(&l).expect("JSON event"))
            .find(|v| v["subject"]["pid"] == pid && v["to"] == "storm")
    });
    println!(
        "events: storm event after {took:?}: {}",
        change["explanation"]
    );

    // top, not on a terminal: plain tables, refreshed (the daemon
    // publishes flows once a second).
    let out = stormguard([
        "top",
        "--iterations",
        "4",
        "--interval-ms",
        "500",
        "--socket",
        d.socket.to_str().expect("UTF-8 path"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.contains(&pid.to_string()) && l.contains(&port) && l.ends_with("storm")),
        "{text}"
    );

    // /metrics during the storm, with curl, parsed by prometheus_client.
    let url = format!("http://{}/metrics", d.metrics.unwrap());
    let out = Command::new("curl")
        .args(["-sf", &url])
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {url} failed");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut py = Command::new("python3")
        .args([
            "-c",
            "import sys, json\n\
             from prometheus_client.parser import text_string_to_metric_families as f\n\
             out = {}\n\
             for fam in f(sys.stdin.read()):\n\
             \x20   for s in fam.samples:\n\
             \x20       out[s.name + json.dumps(s.labels, sort_keys=True)] = s.value\n\
             print(json.dumps(out))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let mut parsed = String::new();
    py.stdout
        .take()
        .unwrap()
        .read_to_string(&mut parsed)
        .unwrap();
    let status = py.wait().unwrap();
    assert!(
        status.success(),
        "prometheus_client could not parse:\n{body}"
    );
    let m: serde_json::Value = serde_json::from_str(&parsed).unwrap();
    println!("metrics: {m}");
    assert!(
        m["stormguard_storms_active{}"].as_f64().unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        m["stormguard_incidents_total{}"].as_f64().unwrap() >= 1.0,
        "{m}"
    );
    assert!(
        m[r#"stormguard_connect_attempts_total{"outcome": "failed"}"#]
            .as_f64()
            .unwrap()
            > 100.0,
        "{m}"
    );
    assert_eq!(m["stormguard_events_dropped_total{}"], 0.0);
    // What the kernel gives, per signal.
    assert_eq!(
        m[r#"stormguard_signal_available{"signal": "connects"}"#], 1.0,
        "{m}"
    );
    assert_eq!(
        m[r#"stormguard_signal_available{"signal": "sends"}"#], 1.0,
        "{m}"
    );
    assert!(
        m[r#"stormguard_signal_degraded{"signal": "receives"}"#].is_number(),
        "{m}"
    );
    let per_storm = format!(
        r#"stormguard_storm_attempts_per_second{{"comm": "stormclient", "destination": "{port}"}}"#
    );
    assert!(
        m[&per_storm].as_f64().is_some(),
        "no per-storm series {per_storm} in {m}"
    );
    storm.finish(Duration::from_secs(30));
}

#[test]
fn per_storm_series_can_be_switched_off() {
    let _alone = alone();
    let Some(d) = Daemon::start("nostorm", &tmp("nostorm"), "per_storm = false\n") else {
        return;
    };
    let port = closed_port(false).to_string();
    let storm = spawn_storm(&port, "5");
    wait_for("the incident", Duration::from_secs(15), || {
        d.json(&["incidents", "--active"])
            .as_array()?
            .first()
            .cloned()
    });
    let url = format!("http://{}/metrics", d.metrics.unwrap());
    // Metrics are refreshed once a second.
    let (body, _) = wait_for("storms_active 1", Duration::from_secs(10), || {
        let out = Command::new("curl")
            .args(["-sf", &url])
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        body.contains("stormguard_storms_active 1").then_some(body)
    });
    assert!(
        !body.contains("stormguard_storm_attempts_per_second"),
        "{body}"
    );
    storm.finish(Duration::from_secs(30));
}

/// Issue 7 item 5: 1,000 children of one parent retrying one refused port
/// together are one storm, so one incident — a parent incident that counts
/// them — not one per child (nor one more for their cgroup); and the
/// daemon lives through it.
#[test]
fn a_thousand_children_storming_one_destination_are_one_incident() {
    let _alone = alone();
    let Some(mut d) = Daemon::start("fanout", &tmp("fanout"), "") else {
        return;
    };
    let port = closed_port(false).to_string();
    let fanout = ChildGuard::spawn(
        Command::new(CLIENT)
            .args([
                "fanout",
                "--addr",
                &port,
                "--children",
                "1000",
                "--rate",
                "20",
                "--secs",
                "4",
            ])
            .stdout(Stdio::piped()),
    );
    let parent = fanout.pid();
    let started = Instant::now();
    // Incidents for this destination, checked at every poll: never more
    // than one active.
    let here = |d: &Daemon, active: bool| -> Vec<serde_json::Value> {
        let args: &[&str] = if active {
            &["incidents", "--active"]
        } else {
            &["incidents"]
        };
        d.json(args)
            .as_array()
            .expect("incident list")
            .iter()
            .filter(|i| i["destination"] == port.as_str())
            .cloned()
            .collect()
    };
    let mut group = None;
    let mut most_active = 0;
    let mut first_seen = None;
    while started.elapsed() < Duration::from_secs(20) {
        d.assert_alive(&format!("{:?} into the storm", started.elapsed()));
        let active = here(&d, true);
        most_active = most_active.max(active.len());
        assert!(
            active.len() <= 1,
            "{} active incidents for one storm after {:?}: {:?}",
            active.len(),
            started.elapsed(),
            active
                .iter()
                .map(|i| (&i["id"], &i["kind"], &i["pid"]))
                .collect::<Vec<_>>()
        );
        if let Some(i) = active.first()
            && first_seen.is_none()
        {
            first_seen = Some(started.elapsed());
            println!(
                "fanout: {} ({}) listed after {:?} with {} processes",
                i["id"],
                i["kind"],
                started.elapsed(),
                i["member_count"]
            );
        }
        if let Some(i) = active.first()
            && i["member_count"].as_u64().unwrap_or(0) >= 900
        {
            group = Some(i.clone());
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let inc = group.unwrap_or_else(|| {
        panic!(
            "no incident with ≥ 900 processes within 20 s; for {port}: {:?}",
            here(&d, false)
        )
    });
    println!(
        "fanout: one incident {} after {:?}: kind {}, {} processes, members listed {}, top {}",
        inc["id"],
        started.elapsed(),
        inc["kind"],
        inc["member_count"],
        inc["members"].as_array().map_or(0, Vec::len),
        inc["top_members"]
    );
    assert_eq!(inc["kind"], "parent", "{inc}");
    assert_eq!(inc["pid"], parent, "{inc}");
    assert_eq!(inc["comm"], "stormclient");
    let top = inc["top_members"].as_array().expect("top_members");
    assert!(
        !top.is_empty()
            && top
                .iter()
                .all(|m| m["comm"] == "stormclient" && m["attempts"].as_u64() > Some(0)),
        "{inc}"
    );
    let id = inc["id"].as_str().expect("id").to_string();

    // `explain` says how many; by a child's pid it finds the group.
    let child = inc["members"][0]
        .as_u64()
        .expect("a member pid")
        .to_string();
    for target in [id.as_str(), child.as_str()] {
        let out = d.cli(&["explain", target]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with(&format!("{id} ")), "{text}");
        let n: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("processes "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no process count in\n{text}"));
        assert!(n >= 900, "{text}");
        assert!(text.contains("busiest    stormclient (pid "), "{text}");
        if target == id {
            println!("{text}");
        }
    }
    let out = d.cli(&["incidents", "--active"]);
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("stormclient*")),
        "{table}"
    );

    fanout.finish(Duration::from_secs(60));
    d.assert_alive(&format!("{:?} into the storm", started.elapsed()));
    // Whatever else was recorded for this destination was merged into it.
    let all = here(&d, false);
    for other in all.iter().filter(|i| i["id"] != id.as_str()) {
        assert_eq!(
            other["end_reason"],
            format!("merged into {id}"),
            "a second incident for the storm: {other}"
        );
    }
    println!(
        "fanout: {} incident(s) ever for {port} (the rest merged), at most {most_active} active",
        all.len()
    );
    let status = d.json(&["status"]);
    assert_eq!(status["pid"], d.child.as_ref().unwrap().pid(), "{status}");
    println!(
        "fanout: daemon alive; ring drops {}, untracked {}",
        status["ring_drops"], status["untracked"]
    );
    d.stop();
}
