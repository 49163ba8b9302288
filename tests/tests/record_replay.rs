//! `stormguard record` and `stormguard replay` as a user runs them: the
//! replay of a recording prints exactly the verdict changes the live run
//! printed, and a bad configuration is refused before anything runs.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use stormguard_tests::{ChildGuard, closed_port, lines, skip_or_fail, stormguard, stormguard_bin};

const CLIENT: &str = env!("CARGO_BIN_EXE_stormclient");

#[test]
fn replaying_a_recording_prints_the_live_verdicts() {
    let file = std::env::temp_dir().join(format!("sg-record-{}.jsonl", std::process::id()));
    let mut record = ChildGuard::spawn(
        Command::new(stormguard_bin())
            .arg("record")
            .arg(&file)
            .args(["--json", "--duration", "8"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let stdout = lines(record.0.stdout.take().unwrap());
    let stderr = lines(record.0.stderr.take().unwrap());
    loop {
        match stderr.recv_timeout(Duration::from_secs(30)) {
            Ok(l) if l.starts_with("stormguard: watching") => break,
            Ok(l) if l.starts_with("stormguard: ") => {
                skip_or_fail("record", &l);
                return;
            }
            Ok(_) => {}
            Err(e) => panic!("record did not start: {e}"),
        }
    }
    let port = closed_port(false).to_string();
    let storm = ChildGuard::spawn(
        Command::new(CLIENT)
            .args(["storm", "--addr", &port, "--secs", "2"])
            .stdout(Stdio::null()),
    );
    let pid = storm.pid();
    let started = Instant::now();
    storm.finish(Duration::from_secs(30));
    let status = record.0.wait().unwrap();
    assert!(status.success(), "record exited with {status}");
    // Every line up to EOF: the reader thread may still be forwarding
    // them when `wait` returns (bounded, in case the pipe stays open).
    let mut live: Vec<String> = Vec::new();
    while let Ok(l) = stdout.recv_timeout(Duration::from_secs(10)) {
        live.push(l);
    }
    let storm_line = live
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("JSON change"))
        .find(|v| v["subject"]["pid"] == pid && v["to"] == "storm")
        .unwrap_or_else(|| {
            let said: Vec<String> = stderr.try_iter().collect();
            let recorded = std::fs::read_to_string(&file).unwrap_or_default();
            let mine = recorded.lines().filter(|l| l.contains(&format!("\"pid\":{pid}"))).count();
            panic!(
                "no storm for pid {pid} in {live:#?}; record said {said:?}; {} lines recorded, {mine} of pid {pid}",
                recorded.lines().count()
            )
        });
    println!(
        "record: storm printed within {:?}: {}",
        started.elapsed(),
        storm_line["explanation"]
    );

    let out = stormguard(["replay", file.to_str().expect("UTF-8 path"), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replayed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(replayed, live, "replay differs from the live run");

    // Text output names the storm in one line.
    let out = stormguard(["replay", file.to_str().expect("UTF-8 path")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains("→ storm")
            && l.contains(&format!("(pid {pid}) → {port}:"))
            && l.contains("100% ECONNREFUSED")),
        "{text}"
    );
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn a_bad_config_is_refused_with_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("sg-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, "[detect]\nstorm_rate = 10.0\nfailure_ratio = 2.0\n").unwrap();
    let rec = dir.join("empty.jsonl");
    std::fs::write(&rec, "").unwrap();
    let out = stormguard([
        "replay",
        rec.to_str().expect("UTF-8 path"),
        "--config",
        cfg.to_str().expect("UTF-8 path"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        format!(
            "stormguard: invalid config {}: detect.failure_ratio = 2: must be in (0, 1]",
            cfg.display()
        )
    );
    std::fs::write(&cfg, "[detect]\nstorm_rate = 10.0\nstorm_rat = 3\n").unwrap();
    let out = stormguard([
        "replay",
        rec.to_str().expect("UTF-8 path"),
        "--config",
        cfg.to_str().expect("UTF-8 path"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("invalid config {}: line 3:", cfg.display()))
            && err.contains("storm_rat"),
        "{err}"
    );
    // A recording that is not one: the line is named.
    std::fs::write(&rec, "{\"tick\":{\"ts_ns\":1}}\nnot json\n").unwrap();
    let out = stormguard(["replay", rec.to_str().expect("UTF-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("line 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
