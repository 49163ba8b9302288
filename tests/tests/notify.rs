//! `[[notify]]` against real receivers on loopback: a real daemon, a real
//! storm (refused connects to a closed loopback port), a webhook server
//! that fails the first POST of each event (the retry must deliver it), a
//! command notifier (a script given as argv[0], the event on its stdin),
//! and a webhook that never answers — while it hangs, incidents are still
//! recorded and closed, and the other notifiers still deliver.
//!
//! Every daemon sees every process of the host, so incidents of other
//! tests' storms may reach the receivers too: assertions look for this
//! test's storm (its pid and destination), never count everything.
use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use stormguard_tests::{ChildGuard, Daemon, closed_port, run, scaled, time_scale};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

fn tmp(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sg-notify-{tag}-{}", std::process::id()))
}

/// One POST a receiver got.
#[derive(Debug, Clone)]
struct Post {
    at: Instant,
    path: String,
    content_type: String,
    body: serde_json::Value,
    /// The status it was answered with (None: left hanging).
    status: Option<u16>,
}

/// A tiny HTTP/1.1 server on 127.0.0.1 that records every POST. `fail_first`:
/// the first POST of each (event, incident) gets a 500, later ones a 200.
/// `hang`: nothing is ever answered (the connection is held open).
struct Receiver {
    port: u16,
    posts: Arc<Mutex<Vec<Post>>>,
}

impl Receiver {
    fn start(fail_first: bool, hang: bool) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind receiver");
        let port = l.local_addr().unwrap().port();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let p = posts.clone();
        std::thread::spawn(move || {
            let mut seen: HashMap<(String, String), u32> = HashMap::new();
            let mut held = Vec::new();
            for conn in l.incoming() {
                let Ok(mut conn) = conn else { continue };
                let Some((path, content_type, body)) = read_request(&mut conn) else {
                    continue;
                };
                let body: serde_json::Value =
                    serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
                let key = (
                    body["event"].as_str().unwrap_or("").to_string(),
                    body["incident"]["id"].as_str().unwrap_or("").to_string(),
                );
                let n = seen.entry(key).or_default();
                *n += 1;
                let status = if hang {
                    None
                } else if fail_first && *n == 1 {
                    Some(500)
                } else {
                    Some(200)
                };
                p.lock().unwrap().push(Post {
                    at: Instant::now(),
                    path,
                    content_type,
                    body,
                    status,
                });
                match status {
                    Some(s) => {
                        let _ = write!(
                            conn,
                            "HTTP/1.1 {s} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                            if s == 200 {
                                "OK"
                            } else {
                                "Internal Server Error"
                            }
                        );
                    }
                    None => held.push(conn),
                }
            }
        });
        Receiver { port, posts }
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    /// POSTs about the incident of `pid` towards `dest`, with `event`.
    fn about(&self, event: &str, pid: u32, dest: &str) -> Vec<Post> {
        self.posts()
            .into_iter()
            .filter(|p| is_ours(&p.body, event, pid, dest))
            .collect()
    }
}

fn is_ours(body: &serde_json::Value, event: &str, pid: u32, dest: &str) -> bool {
    body["event"] == event
        && body["incident"]["pid"] == pid
        && body["incident"]["destination"] == dest
}

/// Reads one request: (path, content type, body).
fn read_request(conn: &mut TcpStream) -> Option<(String, String, Vec<u8>)> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let request = lines.next()?.to_string();
    let mut parts = request.split(' ');
    if parts.next()? != "POST" {
        return None;
    }
    let path = parts.next()?.to_string();
    let mut length = 0;
    let mut content_type = String::new();
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().ok()?,
                "content-type" => content_type = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((path, content_type, body))
}

/// Polls `f` every 100 ms until it returns Some, up to `bound` ([`scaled`]).
fn wait_for<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> (T, Duration) {
    let bound = scaled(bound);
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < bound, "{what}: not within {bound:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A counter of the metrics endpoint.
fn counter(d: &Daemon, name: &str) -> u64 {
    let text = run(
        "curl",
        &["-s", &format!("http://{}/metrics", d.metrics.unwrap())],
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Tests that storm run one at a time (each daemon sees the other's storm).
static STORMS: Mutex<()> = Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    STORMS.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn storm_start_and_end_reach_a_retried_webhook_and_a_command_while_a_hung_one_blocks_nothing() {
    let _alone = alone();
    let dir = tmp("e2e");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();

    // The command: a script run as argv[0] (no shell line is built); it
    // keeps its stdin, its first argument and its environment per event.
    let script = dir.join("receive");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nf=\"{out}/$STORMGUARD_EVENT-$STORMGUARD_INCIDENT\"\n\
             cat > \"$f.tmp\"\nprintf '%s' \"$1\" > \"$f.arg\"\nenv | sort > \"$f.env\"\n\
             mv \"$f.tmp\" \"$f.json\"\necho got it\n",
            out = out.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // Would create this file if anything passed it through a shell.
    let pwned = dir.join("pwned");
    let arg = format!(
        "$(touch {}); `touch {}`; x",
        pwned.display(),
        pwned.display()
    );

    let hook = Receiver::start(true, false);
    let hung = Receiver::start(false, true);
    let config = format!(
        "[[notify]]\nwebhook = \"http://127.0.0.1:{}/hook?team=sre\"\ntimeout = \"5s\"\nretries = 3\n\
         [[notify]]\ncommand = [\"{}\", {arg:?}]\ntimeout = \"5s\"\n\
         [[notify]]\nwebhook = \"http://127.0.0.1:{}/slow\"\ntimeout = \"60s\"\nretries = 0\n",
        hook.port,
        script.display(),
        hung.port
    );
    let Some(mut d) = Daemon::start("notify", &dir.join("daemon"), &config) else {
        return;
    };

    // The storming client, under a name a shell would trip over.
    let client = dir.join("st;$(touch p)");
    std::fs::copy(CLIENT, &client).unwrap();
    let comm = "st;$(touch p)";
    let port = closed_port(false).to_string();
    let secs = 3.0 * time_scale();
    let storm = ChildGuard::spawn(
        Command::new(&client)
            .args(["storm", "--addr", &port, "--secs", &secs.to_string()])
            .stdout(Stdio::null()),
    );
    let pid = storm.pid();
    let storm_started = Instant::now();

    // The start: the webhook's first POST of it failed (500), the retry
    // after the 1 s backoff got through.
    let (starts, took) = wait_for(
        "the webhook's start, retried",
        Duration::from_secs(30),
        || {
            let s = hook.about("start", pid, &port);
            (s.len() >= 2).then_some(s)
        },
    );
    println!("webhook start delivered {took:?} after the storm started (2 POSTs)");
    assert_eq!(starts.len(), 2, "{starts:#?}");
    assert_eq!(starts[0].status, Some(500));
    assert_eq!(starts[1].status, Some(200));
    let gap = starts[1].at - starts[0].at;
    assert!(
        gap >= Duration::from_millis(900) && gap < scaled(Duration::from_secs(5)),
        "retry {gap:?} after the failure, not after the 1 s backoff"
    );
    let start = &starts[1].body;
    assert_eq!(starts[1].path, "/hook?team=sre");
    assert_eq!(starts[1].content_type, "application/json");
    let id = start["incident"]["id"]
        .as_str()
        .expect("incident id")
        .to_string();
    assert!(id.starts_with("inc-"), "{start}");
    assert_eq!(start["incident"]["active"], true, "{start}");
    assert_eq!(start["incident"]["comm"], comm, "{start}");
    assert_eq!(start["incident"]["kind"], "flow", "{start}");
    assert!(!start["host"].as_str().unwrap().is_empty(), "{start}");

    // The command got the same JSON on its stdin, and its argument verbatim.
    let cmd_file = out.join(format!("start-{id}.json"));
    let (cmd_start, took) = wait_for("the command's start", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&cmd_file).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()
    });
    println!("command start delivered, {took:?} after the webhook's");
    assert!(is_ours(&cmd_start, "start", pid, &port), "{cmd_start}");
    assert_eq!(cmd_start["incident"]["id"], id.as_str());
    assert_eq!(cmd_start["incident"]["comm"], comm);
    assert_eq!(cmd_start["incident"]["exe"], client.to_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(out.join(format!("start-{id}.arg"))).unwrap(),
        arg
    );
    let env = std::fs::read_to_string(out.join(format!("start-{id}.env"))).unwrap();
    assert!(env.contains("STORMGUARD_EVENT=start\n"), "{env}");
    assert!(!env.contains("RUST_LOG") && !env.contains("HOME="), "{env}");

    // The hung webhook holds a start (ours, or that of another storm of
    // the host that came first); the daemon goes on regardless.
    let (held, took) = wait_for(
        "the hung webhook's request",
        Duration::from_secs(15),
        || hung.posts().first().cloned(),
    );
    println!(
        "hung webhook got a start ({} pid {} to {}) {took:?} later; it is never answered",
        held.body["incident"]["id"],
        held.body["incident"]["pid"],
        held.body["incident"]["destination"]
    );
    assert_eq!(held.body["event"], "start", "{:?}", held.body);
    let listed = d.json(&["incidents"]);
    let inc = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not listed while a webhook hangs: {listed}"));
    assert_eq!(inc["pid"], pid);

    storm.finish(scaled(Duration::from_secs(30)));
    let storm_ended = Instant::now();
    println!("storm ran {:?}", storm_ended - storm_started);

    // The end: recorded (the loop kept ticking) and delivered to both,
    // while the hung webhook still holds its start (60 s timeout).
    let (ends, took) = wait_for(
        "the webhook's end, retried",
        Duration::from_secs(60),
        || {
            let s = hook.about("end", pid, &port);
            (s.len() >= 2).then_some(s)
        },
    );
    println!("webhook end delivered {took:?} after the storm stopped");
    assert_eq!(ends[0].status, Some(500));
    assert_eq!(ends[1].status, Some(200));
    let end = &ends[1].body["incident"];
    assert_eq!(end["id"], id.as_str(), "{end}");
    assert_eq!(end["active"], false, "{end}");
    assert_eq!(end["end_reason"], "resolved", "{end}");
    assert!(end["ended_at"].as_i64().is_some(), "{end}");
    assert!(end["total_attempts"].as_u64().unwrap() > 100, "{end}");
    let closed = d
        .json(&["incidents"])
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(closed["active"], false, "{closed}");
    let cmd_end = out.join(format!("end-{id}.json"));
    let (cmd_end, _) = wait_for("the command's end", Duration::from_secs(15), || {
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&cmd_end).ok()?).ok()
    });
    assert!(is_ours(&cmd_end, "end", pid, &port), "{cmd_end}");
    assert_eq!(cmd_end["incident"]["end_reason"], "resolved");
    assert!(
        hung.posts().iter().all(|p| p.status.is_none()),
        "the hung receiver answered?"
    );
    assert_eq!(
        hung.posts().len(),
        1,
        "the hung webhook is still on its first"
    );
    assert!(
        storm_ended.elapsed() < Duration::from_secs(60),
        "all of it within the hung webhook's timeout"
    );

    // Counted: at least this storm's start and end to each of two.
    d.assert_alive("after the notifications");
    assert!(counter(&d, "stormguard_notify_sent_total") >= 4);
    assert!(
        !pwned.exists(),
        "something ran the argument through a shell"
    );
    assert!(!std::path::Path::new("/p").exists());
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_daemon_stopped_mid_storm_sends_the_end_before_it_exits() {
    let _alone = alone();
    let dir = tmp("stop");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("events");
    let script = dir.join("receive");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ncat >> \"{out}\"\necho >> \"{out}\"\n",
            out = out.display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = format!("[[notify]]\ncommand = [\"{}\"]\n", script.display());
    let Some(mut d) = Daemon::start("notify-stop", &dir.join("daemon"), &config) else {
        return;
    };
    let port = closed_port(false).to_string();
    let storm = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["storm", "--addr", &port, "--secs", "60"])
            .stdout(Stdio::null()),
    );
    let pid = storm.pid();
    let events = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let (_, took) = wait_for("the start", Duration::from_secs(30), || {
        events()
            .into_iter()
            .find(|e| is_ours(e, "start", pid, &port))
    });
    println!("start delivered {took:?} after the storm started");
    let stopping = Instant::now();
    d.stop();
    println!("daemon stopped in {:?}", stopping.elapsed());
    assert!(stopping.elapsed() < scaled(Duration::from_secs(15)));
    let end = events()
        .into_iter()
        .find(|e| is_ours(e, "end", pid, &port))
        .unwrap_or_else(|| panic!("no end before exit: {:?}", events()));
    assert_eq!(end["incident"]["end_reason"], "daemon stopped", "{end}");
    assert_eq!(end["incident"]["active"], false, "{end}");
    drop(storm);
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_check_refuses_bad_notify_tables_with_the_field_named() {
    let dir = tmp("check");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("c.toml");
    let store = dir.join("db");
    for (table, want) in [
        (
            "webhook = \"https://hooks.example.com/x\"",
            "[[notify]] #1: webhook: \"https://hooks.example.com/x\": https is not supported",
        ),
        (
            "command = [\"page-me\"]",
            "[[notify]] #1: command: \"page-me\" is not an absolute path",
        ),
        (
            "command = [\"/nonexistent/page-me\"]",
            "[[notify]] #1: command: \"/nonexistent/page-me\": No such file",
        ),
        (
            "command = [\"/bin/true\"]\nwebhook = \"http://127.0.0.1:1/\"",
            "[[notify]] #1: command/webhook: both are set",
        ),
        (
            "command = [\"/bin/true\"]\nshell = \"sh\"",
            "unknown field `shell`",
        ),
    ] {
        std::fs::write(
            &cfg,
            format!(
                "[store]\npath = \"{}\"\n[[notify]]\n{table}\n",
                store.display()
            ),
        )
        .unwrap();
        let out = stormguard_tests::stormguard(["config", "check", cfg.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{table}: accepted");
        assert!(err.contains(want), "{table}: {err}");
    }
    std::fs::write(
        &cfg,
        format!(
            "[store]\npath = \"{}\"\n[[notify]]\ncommand = [\"/bin/true\"]\n[[notify]]\nwebhook = \"http://127.0.0.1:9/h\"\non = [\"end\"]\n",
            store.display()
        ),
    )
    .unwrap();
    let out = stormguard_tests::stormguard(["config", "check", cfg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}
