//! Call stacks (where a storm's calls come from): real clients, built here
//! with and without frame pointers and debug information, storm a closed
//! port; the daemon, holding only the shipped unit's capabilities, must
//! name the function that retries and the line of its connect() — or say
//! the stack may be truncated, never name a wrong function.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use stormguard_tests::{ChildGuard, Daemon, closed_port, scaled, skip_or_fail};

/// A Python retry loop: connect to 127.0.0.1:PORT for SECONDS (at most
/// 2,000,000 times).
const PY_LOOP: &str = "import socket, sys, time
end = time.time() + float(sys.argv[2])
n = 0
while time.time() < end and n < 2000000:
    s = socket.socket()
    try:
        s.connect(('127.0.0.1', int(sys.argv[1])))
    except OSError:
        pass
    s.close()
    n += 1
";

/// One test at a time: each runs its own daemon, which sees (and would
/// probe) the other's storms, and each needs the CPU its clients burn.
static ALONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The function every test client retries from.
const RETRY_FN: &str = "storm_retry_connect_loop";

fn corpus(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}

/// The line of `src` marked `THE CONNECT`.
fn connect_line(src: &Path) -> u32 {
    let text = std::fs::read_to_string(src).expect("client source");
    1 + text
        .lines()
        .position(|l| l.contains("THE CONNECT"))
        .expect("marked line") as u32
}

/// Builds a client; None (after skip_or_fail) when the compiler is missing.
fn build(compiler: &str, args: &[&str], src: &Path, out: &Path) -> Option<()> {
    let o = Command::new(compiler)
        .args(args)
        .arg("-o")
        .arg(out)
        .arg(src)
        .output();
    match o {
        Ok(o) if o.status.success() => Some(()),
        Ok(o) => panic!(
            "{compiler} {args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => {
            skip_or_fail("stacks", &format!("{compiler}: {e}"));
            None
        }
    }
}

struct Client {
    label: &'static str,
    src: PathBuf,
    /// Built with debug information: file and line are expected.
    debug: bool,
    /// Built without frame pointers: the right function or "truncated".
    no_fp: bool,
    child: Option<ChildGuard>,
}

/// The top stack of `pid`'s incident once it has been unwound.
fn unwound_stack(d: &Daemon, pid: u32) -> Option<Value> {
    let out = d.cli(&["explain", &pid.to_string(), "--json"]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let top = v["stacks"].get(0)?.clone();
    (top["method"] == "unwound").then_some(top)
}

fn functions(stack: &Value) -> Vec<String> {
    stack["frames"]
        .as_array()
        .expect("frames")
        .iter()
        .map(|f| f["function"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[test]
fn explain_names_the_retrying_function_and_line_from_the_units_capabilities() {
    let _alone = alone();
    let dir = std::env::temp_dir().join(format!("sg-stacks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let c_src = corpus("stack_client.c");
    let rs_src = corpus("stack_client.rs");
    let bins = [
        (
            "gcc",
            &["-g", "-O1", "-fno-omit-frame-pointer"][..],
            &c_src,
            "c_fp",
        ),
        (
            "gcc",
            &["-O2", "-fomit-frame-pointer"][..],
            &c_src,
            "c_no_fp",
        ),
        (
            "rustc",
            &["-g", "-C", "force-frame-pointers=yes", "-C", "opt-level=1"][..],
            &rs_src,
            "rust_fp",
        ),
        (
            "gcc",
            &["-g", "-O1", "-fno-omit-frame-pointer"][..],
            &c_src,
            "deleted",
        ),
    ];
    for (cc, args, src, name) in bins {
        if build(cc, args, src, &dir.join(name)).is_none() {
            return;
        }
    }
    let Some(mut d) = Daemon::start_as_unit("stacks", &dir.join("daemon"), "") else {
        return;
    };
    let mut clients = vec![
        Client {
            label: "c_fp",
            src: c_src.clone(),
            debug: true,
            no_fp: false,
            child: None,
        },
        Client {
            label: "c_no_fp",
            src: c_src.clone(),
            debug: false,
            no_fp: true,
            child: None,
        },
        Client {
            label: "rust_fp",
            src: rs_src.clone(),
            debug: true,
            no_fp: false,
            child: None,
        },
        Client {
            label: "deleted",
            src: c_src.clone(),
            debug: true,
            no_fp: false,
            child: None,
        },
    ];
    let secs = scaled(Duration::from_secs(40)).as_secs().to_string();
    for c in &mut clients {
        let port = closed_port(false).port().to_string();
        c.child = Some(ChildGuard::spawn(
            Command::new(dir.join(c.label))
                .args([&port, &secs])
                .stdout(Stdio::null()),
        ));
    }
    // An interpreter: its native frames, and a note that Python's own
    // are not resolved.
    let py_port = closed_port(false).port().to_string();
    let python = ChildGuard::spawn(
        Command::new("python3")
            .args(["-c", PY_LOOP, &py_port, &secs])
            .stdout(Stdio::null()),
    );
    // Deleted while it runs: symbolized from the process's own mapping.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::remove_file(dir.join("deleted")).expect("delete the running binary");

    let started = Instant::now();
    let deadline = scaled(Duration::from_secs(30));
    let mut stacks: Vec<Option<Value>> = vec![None; clients.len()];
    let mut py_stack = None;
    while (stacks.iter().any(Option::is_none) || py_stack.is_none()) && started.elapsed() < deadline
    {
        d.assert_alive("while clients stormed");
        for (i, c) in clients.iter().enumerate() {
            if stacks[i].is_none() {
                stacks[i] = unwound_stack(&d, c.child.as_ref().unwrap().pid());
            }
        }
        if py_stack.is_none() {
            py_stack = unwound_stack(&d, python.pid());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!("stacks resolved within {:?}", started.elapsed());
    let py = py_stack.unwrap_or_else(|| panic!("python: no unwound stack within {deadline:?}"));
    println!(
        "python's top stack: {:?}, note {}",
        functions(&py),
        py["note"]
    );
    assert!(
        py["note"]
            .as_str()
            .is_some_and(|n| n.contains("interpreted")),
        "no interpreter note: {py}"
    );
    assert!(
        py["frames"].as_array().is_some_and(|f| f
            .iter()
            .any(|f| f["module"].as_str().is_some_and(|m| m.contains("python")))),
        "no native frame of python: {py}"
    );
    drop(python);
    for (c, s) in clients.iter().zip(&stacks) {
        let pid = c.child.as_ref().unwrap().pid();
        let text = d.cli(&["explain", &pid.to_string()]);
        println!(
            "--- {} (pid {pid}):\n{}",
            c.label,
            String::from_utf8_lossy(&text.stdout)
        );
        let s = s
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no unwound stack within {deadline:?}", c.label));
        let frames = s["frames"].as_array().expect("frames");
        let names = functions(s);
        let at = names.iter().position(|n| n.contains(RETRY_FN));
        if c.no_fp {
            // The right function, or an honest "truncated"; and every
            // frame of the client's own code is one it really has.
            assert!(
                at.is_some() || s["truncated"] == true,
                "{}: neither {RETRY_FN} nor truncated: {names:?}",
                c.label
            );
            for f in frames {
                let module = f["module"].as_str().unwrap_or("");
                if module.ends_with(c.label) {
                    let name = f["function"].as_str().unwrap_or("?");
                    assert!(
                        [RETRY_FN, "main", "_start"].contains(&name),
                        "{}: a wrong name in its own code: {name} ({names:?})",
                        c.label
                    );
                }
            }
            continue;
        }
        let at = at.unwrap_or_else(|| panic!("{}: {RETRY_FN} not in {names:?}", c.label));
        // Within five (physical) frames below libc's (the innermost run
        // of them: the syscall wrapper and what it calls).
        let in_libc = |f: &Value| f["module"].as_str().is_some_and(|m| m.contains("libc.so"));
        let libc = frames
            .iter()
            .take_while(|f| in_libc(f))
            .count()
            .checked_sub(1)
            .unwrap_or_else(|| panic!("{}: the stack does not start in libc: {names:?}", c.label));
        let between = frames[libc + 1..at]
            .iter()
            .filter(|f| f["inlined"] != true)
            .count();
        assert!(
            libc < at && between < 5,
            "{}: {RETRY_FN} is {between} frames below libc: {names:?}",
            c.label
        );
        if c.debug {
            let want = connect_line(&c.src);
            let f = &frames[at];
            let file = f["file"].as_str().unwrap_or("");
            let line = f["line"].as_u64().unwrap_or(0) as u32;
            let src_name = c.src.file_name().unwrap().to_str().unwrap();
            assert!(
                file.ends_with(src_name) && line.abs_diff(want) <= 1,
                "{}: {RETRY_FN} at {file}:{line}, the connect is at {src_name}:{want}",
                c.label
            );
        }
    }
    // The cost of a storm: c_fp alone burns most of a core (a tight loop
    // of refused connects); the others stop.
    for c in &mut clients[1..] {
        drop(c.child.take());
    }
    let pid = clients[0].child.as_ref().unwrap().pid();
    std::thread::sleep(scaled(Duration::from_secs(3)));
    let inc = d.json(&["explain", &pid.to_string()]);
    let cost = &inc["cost"];
    println!("cost of c_fp's storm: {cost}");
    let peak = cost["peak_cpu_cores"].as_f64().unwrap_or(0.0);
    assert!(peak > 0.5, "c_fp's storm at {peak} cores: {cost}");
    assert!(
        cost["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0)
            && cost["host_cpus"].as_u64()
                // SAFETY: sysconf has no preconditions.
                == Some(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } as u64)
            && cost["peak_host_cpu"].as_f64().is_some_and(|h| h > 0.0),
        "{cost}"
    );
    let top = d.json(&["top", "--iterations", "1"]);
    let flow = top["flows"]
        .as_array()
        .and_then(|a| a.iter().find(|f| f["pid"] == pid))
        .unwrap_or_else(|| panic!("c_fp not in top: {top}"));
    println!("top's c_fp flow: {flow}");
    assert!(
        flow["cpu_cores"].as_f64().is_some_and(|c| c > 0.0),
        "{flow}"
    );
    let list = String::from_utf8_lossy(&d.cli(&["incidents"]).stdout).into_owned();
    println!("{list}");
    assert!(
        list.lines().next().is_some_and(|h| h.contains(" CPU ")),
        "{list}"
    );
    let metrics = Command::new("curl")
        .args(["-s", &format!("http://{}/metrics", d.metrics.unwrap())])
        .output()
        .expect("curl");
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let storm_cpu: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stormguard_storm_cpu_cores "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no stormguard_storm_cpu_cores in /metrics:\n{metrics}"));
    println!("stormguard_storm_cpu_cores {storm_cpu}");
    assert!(storm_cpu > 0.0);
    drop(clients[0].child.take());
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Processes that live about a tenth of a second each, started one after
/// another by a shell loop: their parent's storm makes each one a suspect
/// from its fork, and each one's stack must be read (mappings and all)
/// while it runs — by the time the kernel's counts are taken, once a
/// second, it has exited.
#[test]
fn short_lived_clients_of_a_shell_loop_are_symbolized() {
    let _alone = alone();
    let dir = std::env::temp_dir().join(format!("sg-stacks-short-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let src = corpus("stack_client.c");
    let bin = dir.join("short_client");
    if build("gcc", &["-g", "-O1", "-fno-omit-frame-pointer"], &src, &bin).is_none() {
        return;
    }
    let Some(mut d) = Daemon::start_as_unit("stacks_short", &dir.join("daemon"), "") else {
        return;
    };
    let port = closed_port(false).port().to_string();
    // 400 processes of 2,000 refused connects each (15–100 ms each here).
    let script = format!(
        "i=0; while [ $i -lt 400 ]; do {} {port} 5 2000 >/dev/null; i=$((i+1)); done",
        bin.display()
    );
    let looper = ChildGuard::spawn(Command::new("sh").args(["-c", &script]));
    let dest = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let deadline = scaled(Duration::from_secs(40));
    let mut found = None;
    while found.is_none() && started.elapsed() < deadline {
        d.assert_alive("while the loop ran");
        let list = d.json(&["incidents"]);
        for inc in list.as_array().into_iter().flatten() {
            if inc["destination"] != dest.as_str() || inc["kind"] == "flow" {
                continue;
            }
            let id = inc["id"].as_str().unwrap_or_default().to_string();
            let full = d.json(&["explain", &id]);
            // Among the stacks listed: on a busy machine some clients exit
            // before their mappings are read, and are listed unsymbolized.
            let named = full["stacks"].as_array().and_then(|a| {
                a.iter()
                    .find(|t| {
                        t["method"] == "unwound"
                            && functions(t).iter().any(|f| f.contains(RETRY_FN))
                    })
                    .cloned()
            });
            if let Some(top) = named {
                found = Some((id, full, top));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (id, full, top) = found.unwrap_or_else(|| {
        panic!(
            "no group incident towards {dest} with an unwound stack naming {RETRY_FN} within {deadline:?}: {}",
            d.json(&["incidents"])
        )
    });
    let text = d.cli(&["explain", &id]);
    println!(
        "found after {:?}:\n{}",
        started.elapsed(),
        String::from_utf8_lossy(&text.stdout)
    );
    let members = full["members"].as_array().map_or(0, Vec::len);
    assert!(members > 1, "one process only: {full}");
    let frames = top["frames"].as_array().expect("frames");
    let f = frames
        .iter()
        .find(|f| f["function"].as_str().is_some_and(|n| n.contains(RETRY_FN)))
        .expect("the retry frame");
    let want = connect_line(&src);
    let line = f["line"].as_u64().unwrap_or(0) as u32;
    assert!(
        f["file"]
            .as_str()
            .is_some_and(|p| p.ends_with("stack_client.c"))
            && line.abs_diff(want) <= 1,
        "{RETRY_FN} at {f}, the connect is at line {want}"
    );
    // What they burn is read from the parent's reaped children (each has
    // exited before the next second's sample).
    let mut peak = 0.0;
    while started.elapsed() < deadline {
        let inc = d.json(&["explain", &id]);
        peak = inc["cost"]["peak_cpu_cores"].as_f64().unwrap_or(0.0);
        if peak > 0.2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("the loop's children: peak {peak:.2} cores");
    assert!(
        peak > 0.2,
        "the short-lived children's CPU went unseen: {peak}"
    );
    drop(looper);
    d.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
