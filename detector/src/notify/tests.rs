use super::*;

fn table(text: &str) -> Result<Vec<Notifier>, String> {
    #[derive(Deserialize)]
    struct T {
        notify: Vec<NotifyConfig>,
    }
    let t: T = toml::from_str(text).map_err(|e| e.message().to_string())?;
    resolve_all(&t.notify).map_err(|e| e.to_string())
}

#[test]
fn a_command_and_a_webhook_with_defaults() {
    let n = table(
        "[[notify]]\ncommand = [\"/usr/local/bin/page-me\", \"--team\", \"sre\"]\n\
         [[notify]]\nwebhook = \"http://127.0.0.1:9000/hook?k=v\"\non = [\"end\"]\n\
         timeout = \"500ms\"\nmin_interval = \"30s\"\nretries = 0\n",
    )
    .unwrap();
    assert_eq!(
        n[0],
        Notifier {
            index: 1,
            target: Target::Command(vec![
                "/usr/local/bin/page-me".into(),
                "--team".into(),
                "sre".into()
            ]),
            on_start: true,
            on_end: true,
            timeout: Duration::from_secs(5),
            min_interval: Duration::ZERO,
            retries: 3,
        }
    );
    assert_eq!(
        n[1].target,
        Target::Webhook {
            url: "http://127.0.0.1:9000/hook?k=v".into(),
            host: "127.0.0.1".into(),
            port: 9000,
            path: "/hook?k=v".into(),
        }
    );
    assert!(!n[1].on_start && n[1].on_end);
    assert_eq!(n[1].timeout, Duration::from_millis(500));
    assert_eq!(n[1].min_interval, Duration::from_secs(30));
    assert_eq!(n[1].retries, 0);
    assert_eq!(n[1].name(), "#2 webhook 127.0.0.1:9000");
    let n = table("[[notify]]\nwebhook = \"http://[::1]\"\n").unwrap();
    assert_eq!(
        n[0].target,
        Target::Webhook {
            url: "http://[::1]".into(),
            host: "::1".into(),
            port: 80,
            path: "/".into()
        }
    );
}

#[test]
fn bad_tables_are_refused_naming_the_table_the_field_and_the_fix() {
    for (text, want) in [
        (
            "[[notify]]\n",
            "[[notify]] #1: command/webhook: neither is set",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\nwebhook = \"http://h/\"\n",
            "[[notify]] #1: command/webhook: both are set",
        ),
        (
            "[[notify]]\ncommand = []\n",
            "[[notify]] #1: command: is empty",
        ),
        (
            "[[notify]]\ncommand = [\"page-me\"]\n",
            "[[notify]] #1: command: \"page-me\" is not an absolute path",
        ),
        (
            "[[notify]]\nwebhook = \"https://hooks.example.com/x\"\n",
            "[[notify]] #1: webhook: \"https://hooks.example.com/x\": https is not supported",
        ),
        (
            "[[notify]]\nwebhook = \"ftp://h/x\"\n",
            "is not an http:// URL",
        ),
        (
            "[[notify]]\nwebhook = \"http://user:pw@h/x\"\n",
            "credentials in the URL are not supported",
        ),
        (
            "[[notify]]\nwebhook = \"not a url\"\n",
            "[[notify]] #1: webhook: \"not a url\" is not a URL",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\non = [\"begin\"]\n",
            "[[notify]] #1: on: \"begin\" is not an event",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\non = []\n",
            "[[notify]] #1: on: is empty",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\n[[notify]]\ncommand = [\"/bin/true\"]\ntimeout = \"0s\"\n",
            "[[notify]] #2: timeout: \"0s\" is out of range: must be 100ms to 1m",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\ntimeout = \"5 parsecs\"\n",
            "[[notify]] #1: timeout: \"5 parsecs\" is not a duration",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\nmin_interval = \"2h\"\n",
            "[[notify]] #1: min_interval: \"2h\" is out of range: must be 0s to 1h",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\nretries = 11\n",
            "[[notify]] #1: retries: 11 is out of range: must be 0..=10",
        ),
        (
            "[[notify]]\ncommand = [\"/bin/true\"]\nretry = 1\n",
            "unknown field `retry`",
        ),
    ] {
        let e = table(text).expect_err(text);
        assert!(e.contains(want), "{text}\n→ {e}\nnot {want}");
    }
    let many = "[[notify]]\ncommand = [\"/bin/true\"]\n".repeat(MAX_NOTIFIERS + 1);
    assert_eq!(
        table(&many).unwrap_err(),
        "17 [[notify]] tables: at most 16; send to one relay that fans out instead"
    );
    assert_eq!(
        table(&"[[notify]]\ncommand = [\"/bin/true\"]\n".repeat(MAX_NOTIFIERS))
            .unwrap()
            .len(),
        MAX_NOTIFIERS
    );
}

#[test]
fn commands_must_be_executable_files() {
    let c = |p: &str| NotifyConfig {
        command: Some(vec![p.into()]),
        ..Default::default()
    };
    check_commands(&[c("/bin/sh")]).unwrap();
    let e = check_commands(&[c("/bin/sh"), c("/nonexistent/page-me")])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("[[notify]] #2: command: \"/nonexistent/page-me\": No such file"),
        "{e}"
    );
    let e = check_commands(&[c("/")]).unwrap_err().to_string();
    assert_eq!(e, "[[notify]] #1: command: \"/\" is not a file");
    let dir = std::env::temp_dir().join(format!("sg-notify-x-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("script");
    std::fs::write(&f, "#!/bin/sh\n").unwrap();
    let e = check_commands(&[c(f.to_str().unwrap())])
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("is not executable; chmod +x it"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn backoff_doubles_from_one_second_and_is_capped() {
    let s: Vec<u64> = (1..=8).map(|r| backoff(r).as_secs()).collect();
    assert_eq!(s, [1, 2, 4, 8, 16, 30, 30, 30]);
    assert_eq!(backoff(u32::MAX), BACKOFF_CAP);
}

#[test]
fn the_rate_limit_counts_pages_and_ends_follow_their_start() {
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let mut g = Gate::new(Duration::from_secs(30), true);
    assert_eq!(g.admit(EventKind::Start, "inc-1", at(0)), Admit::Send);
    // Within 30 s of the last page: dropped, and so is its end.
    assert_eq!(
        g.admit(EventKind::Start, "inc-2", at(10)),
        Admit::RateLimited
    );
    assert_eq!(g.admit(EventKind::End, "inc-2", at(12)), Admit::RateLimited);
    // The end of a page sent is always sent, whenever.
    assert_eq!(g.admit(EventKind::End, "inc-1", at(13)), Admit::Send);
    assert_eq!(
        g.admit(EventKind::Start, "inc-3", at(29)),
        Admit::RateLimited
    );
    assert_eq!(g.admit(EventKind::Start, "inc-4", at(30)), Admit::Send);
    // Rate-limited ones do not push the window.
    assert_eq!(g.admit(EventKind::Start, "inc-5", at(60)), Admit::Send);
    assert_eq!(g.admit(EventKind::End, "inc-3", at(61)), Admit::RateLimited);
    assert_eq!(g.admit(EventKind::End, "inc-4", at(61)), Admit::Send);
    assert_eq!(g.admit(EventKind::End, "inc-5", at(61)), Admit::Send);
    // Remembered once only.
    assert_eq!(g.admit(EventKind::End, "inc-3", at(62)), Admit::Send);

    // Ends only: the ends are the pages.
    let mut g = Gate::new(Duration::from_secs(30), false);
    assert_eq!(g.admit(EventKind::End, "inc-1", at(0)), Admit::Send);
    assert_eq!(g.admit(EventKind::End, "inc-2", at(1)), Admit::RateLimited);
    assert_eq!(g.admit(EventKind::End, "inc-3", at(31)), Admit::Send);

    // No limit.
    let mut g = Gate::new(Duration::ZERO, true);
    for i in 0..100 {
        let id = format!("inc-{i}");
        assert_eq!(g.admit(EventKind::Start, &id, at(0)), Admit::Send);
        assert_eq!(g.admit(EventKind::End, &id, at(0)), Admit::Send);
    }
}

#[test]
fn suppressed_incidents_are_bounded() {
    let t0 = Instant::now();
    let mut g = Gate::new(Duration::from_secs(3600), true);
    g.admit(EventKind::Start, "inc-0", t0);
    for i in 1..=SUPPRESSED_MAX + 10 {
        g.admit(EventKind::Start, &format!("inc-{i}"), t0);
    }
    assert_eq!(g.remembered(), SUPPRESSED_MAX);
    // The oldest were forgotten: their end goes out.
    assert_eq!(g.admit(EventKind::End, "inc-1", t0), Admit::Send);
    assert_eq!(
        g.admit(EventKind::End, &format!("inc-{}", SUPPRESSED_MAX + 10), t0),
        Admit::RateLimited
    );
}

fn incident(id: &str) -> Incident {
    let mut inc: Incident = serde_json::from_value(serde_json::json!({
        "id": id, "kind": "flow", "active": true, "state": "storm", "pid": 42,
        "process_start": null, "comm": "a;$(touch x)", "exe": null, "cmdline": null,
        "uid": 0, "ppid": 1, "cgroup_id": null, "cgroup": null, "unit": null,
        "container": null, "proto": "tcp", "destination": "127.0.0.1:9",
        "netns": 0, "started_at": 1, "updated_at": 1, "ended_at": null,
        "end_reason": null, "peak_rate": 100.0, "total_attempts": 10,
        "total_failures": 10, "failure_mix": [], "gap_histogram": [],
        "median_gap_us": null, "backoff": "none", "explanation": "x",
        "timeline": [], "members": [42], "syscalls_per_s": null
    }))
    .unwrap();
    inc.id = id.into();
    inc
}

fn job(kind: EventKind, inc: &Incident) -> Job {
    Job {
        kind,
        id: inc.id.clone(),
        body: Arc::new(
            serde_json::to_string(&Payload {
                event: kind,
                host: "h",
                incident: inc,
            })
            .unwrap(),
        ),
    }
}

fn notifier(target: Target, timeout: Duration) -> Notifier {
    Notifier {
        index: 1,
        target,
        on_start: true,
        on_end: true,
        timeout,
        min_interval: Duration::ZERO,
        retries: 0,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_command_gets_the_event_on_stdin_and_a_minimal_environment() {
    let dir = std::env::temp_dir().join(format!("sg-notify-cmd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    let inc = incident("inc-3");
    let n = notifier(
        Target::Command(vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat > \"$1\"; env | sort > \"$1.env\"; echo said; echo moaned >&2".into(),
            "sh".into(),
            out.to_str().unwrap().into(),
        ]),
        Duration::from_secs(5),
    );
    let detail = rt()
        .block_on(attempt(&n, &job(EventKind::Start, &inc)))
        .unwrap();
    assert_eq!(detail, "; stdout: \"said\"; stderr: \"moaned\"");
    let got: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(got["event"], "start");
    assert_eq!(got["host"], "h");
    assert_eq!(got["incident"]["id"], "inc-3");
    assert_eq!(got["incident"]["comm"], "a;$(touch x)");
    assert_eq!(got["incident"]["pid"], 42);
    let env = std::fs::read_to_string(dir.join("out.env")).unwrap();
    let names: Vec<&str> = env.lines().map(|l| l.split('=').next().unwrap()).collect();
    // sh adds PWD, SHLVL and _ of its own.
    for n in &names {
        assert!(
            [
                "PATH",
                "STORMGUARD_EVENT",
                "STORMGUARD_INCIDENT",
                "PWD",
                "SHLVL",
                "_"
            ]
            .contains(n),
            "{env}"
        );
    }
    assert!(env.contains("STORMGUARD_EVENT=start\n"), "{env}");
    assert!(env.contains("STORMGUARD_INCIDENT=inc-3\n"), "{env}");
    assert!(env.contains("PWD=/\n"), "{env}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failing_or_hanging_command_fails_and_is_killed() {
    let inc = incident("inc-4");
    let fail = notifier(
        Target::Command(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo no way >&2; exit 3".into(),
        ]),
        Duration::from_secs(5),
    );
    let e = rt()
        .block_on(attempt(&fail, &job(EventKind::End, &inc)))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "exit status: 3; stderr: \"no way\"");
    // A grandchild holding the pipes open is killed with its group.
    let hang = notifier(
        Target::Command(vec![
            "/bin/sh".into(),
            "-c".into(),
            "sleep 30 & sleep 30".into(),
        ]),
        Duration::from_millis(300),
    );
    let t = Instant::now();
    let e = rt()
        .block_on(attempt(&hang, &job(EventKind::End, &inc)))
        .unwrap_err();
    assert!(matches!(e, AttemptError::Timeout(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let e = rt()
        .block_on(attempt(
            &notifier(
                Target::Command(vec!["/nonexistent".into()]),
                Duration::from_secs(1),
            ),
            &job(EventKind::End, &inc),
        ))
        .unwrap_err();
    assert!(matches!(e, AttemptError::Spawn(_)), "{e}");
}

#[test]
fn a_webhook_needs_a_2xx_in_time() {
    use std::io::{Read as _, Write as _};
    let inc = incident("inc-5");
    // Answers each connection with `status` after reading the request.
    let server = |status: Option<u16>| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = vec![0u8; 65536];
                let n = c.read(&mut buf).unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                match status {
                    Some(s) => {
                        let _ = write!(c, "HTTP/1.1 {s} X\r\nContent-Length: 0\r\n\r\n");
                    }
                    None => std::thread::sleep(Duration::from_secs(5)),
                }
            }
        });
        (port, rx)
    };
    let hook = |port: u16, timeout: Duration| {
        notifier(
            Target::Webhook {
                url: String::new(),
                host: "127.0.0.1".into(),
                port,
                path: "/h?x=1".into(),
            },
            timeout,
        )
    };
    let (port, got) = server(Some(204));
    let detail = rt()
        .block_on(attempt(
            &hook(port, Duration::from_secs(5)),
            &job(EventKind::Start, &inc),
        ))
        .unwrap();
    assert_eq!(detail, "; HTTP 204");
    let req = got.recv_timeout(Duration::from_secs(5)).unwrap();
    assert!(req.starts_with("POST /h?x=1 HTTP/1.1\r\n"), "{req}");
    assert!(
        req.to_ascii_lowercase()
            .contains("content-type: application/json\r\n"),
        "{req}"
    );
    assert!(
        req.contains(&format!("host: 127.0.0.1:{port}\r\n")),
        "{req}"
    );
    assert!(req.contains("\"event\":\"start\""), "{req}");

    let (port, _got) = server(Some(503));
    let e = rt()
        .block_on(attempt(
            &hook(port, Duration::from_secs(5)),
            &job(EventKind::Start, &inc),
        ))
        .unwrap_err();
    assert!(matches!(e, AttemptError::Status(503)), "{e}");

    let (port, _got) = server(None);
    let t = Instant::now();
    let e = rt()
        .block_on(attempt(
            &hook(port, Duration::from_millis(300)),
            &job(EventKind::Start, &inc),
        ))
        .unwrap_err();
    assert!(matches!(e, AttemptError::Timeout(_)), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let e = rt()
        .block_on(attempt(
            &hook(port, Duration::from_secs(5)),
            &job(EventKind::Start, &inc),
        ))
        .unwrap_err();
    assert!(matches!(e, AttemptError::Connect(_)), "{e}");
}

#[test]
fn handing_over_never_waits_and_a_full_queue_drops_and_counts() {
    let counters = Counters::default();
    let table = NotifyConfig {
        command: Some(vec!["/bin/sleep".into(), "5".into()]),
        timeout: "1s".into(),
        retries: 0,
        ..Default::default()
    };
    let mut h = start(&[table], counters.clone()).unwrap().unwrap();
    let inc = incident("inc-9");
    let t = Instant::now();
    for _ in 0..300 {
        h.send(EventKind::Start, &inc);
    }
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // At most the two queues and the one being tried are kept.
    let dropped = counters.dropped.get();
    assert!(dropped >= 300 - 2 * QUEUE as u64 - 2, "{dropped}");
    assert!(!h.finish(Duration::from_millis(100)));
    assert!(start(&[], Counters::default()).unwrap().is_none());
}

#[test]
fn a_notifier_sends_in_order_through_its_rate_limit_and_counts() {
    let dir = std::env::temp_dir().join(format!("sg-notify-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let table = |file: &str, on: &[&str]| NotifyConfig {
        command: Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "cat >> \"$1\"; echo >> \"$1\"".into(),
            "sh".into(),
            dir.join(file).to_str().unwrap().into(),
        ]),
        on: on.iter().map(|o| o.to_string()).collect(),
        min_interval: "1h".into(),
        ..Default::default()
    };
    let counters = Counters::default();
    let mut h = start(
        &[table("both", &["start", "end"]), table("ends", &["end"])],
        counters.clone(),
    )
    .unwrap()
    .unwrap();
    let (one, two) = (incident("inc-1"), incident("inc-2"));
    h.send(EventKind::Start, &one);
    h.send(EventKind::Start, &two);
    h.send(EventKind::End, &two);
    h.send(EventKind::End, &one);
    assert!(h.finish(Duration::from_secs(10)));
    let got = |file: &str| -> Vec<String> {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!(
                    "{} {}",
                    v["event"].as_str().unwrap(),
                    v["incident"]["id"].as_str().unwrap()
                )
            })
            .collect()
    };
    // inc-2's start came within the hour of inc-1's: dropped, and so is
    // its end; inc-1's end follows its start.
    assert_eq!(got("both"), ["start inc-1", "end inc-1"]);
    // Ends only: the ends are the pages; inc-1's is within the hour.
    assert_eq!(got("ends"), ["end inc-2"]);
    assert_eq!(counters.sent.get(), 3);
    assert_eq!(counters.dropped.get(), 3);
    assert_eq!(counters.failed.get(), 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_end_tap_keeps_closed_incidents_only() {
    struct Null(u32);
    impl Sink for Null {
        fn insert(&mut self, _: &Incident) -> Result<i64, SinkError> {
            self.0 += 1;
            Ok(1)
        }
        fn update(&mut self, _: &Incident) -> Result<(), SinkError> {
            self.0 += 1;
            Ok(())
        }
    }
    let mut null = Null(0);
    let mut tap = EndTap::new(&mut null, true);
    let mut inc = incident("inc-1");
    tap.insert(&inc).unwrap();
    tap.update(&inc).unwrap();
    inc.active = false;
    inc.ended_at = Some(5);
    tap.update(&inc).unwrap();
    assert_eq!(tap.ended.len(), 1);
    let mut off = EndTap::new(&mut null, false);
    off.update(&inc).unwrap();
    assert!(off.ended.is_empty());
    assert_eq!(null.0, 4);
}
