//! A release `stormguard daemon` started for a measurement (`soak`, the
//! bench's daemon sections): its own socket, database and config in a
//! temporary directory, asked over its Unix socket directly (not through
//! the CLI, whose start-up would be timed with it), sampled from /proc,
//! and killed and cleaned up when dropped.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// A running daemon; killed (and its directory removed) on drop.
pub struct Daemon {
    child: Child,
    pub pid: u32,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts `bin daemon` with metrics off and `extra` appended to its
    /// config (sections other than [daemon], [store], [metrics]), and waits
    /// up to 60 s for its API to answer.
    pub fn start(bin: &Path, tag: &str, extra: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("sg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let socket = dir.join("sg.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nsocket = \"{}\"\n[store]\npath = \"{}\"\n[metrics]\nlisten = \"off\"\n{extra}",
                socket.display(),
                dir.join("incidents.db").display()
            ),
        )?;
        let child = Command::new(bin)
            .args(["daemon", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the daemon")?;
        let mut d = Daemon {
            pid: child.id(),
            child,
            dir,
            socket,
        };
        let t0 = Instant::now();
        while d.status().is_err() {
            if let Some(st) = d.child.try_wait()? {
                bail!("the daemon exited at start ({st})");
            }
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("the daemon did not answer within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(d)
    }

    /// One API call and how long the answer took (connect included).
    pub fn call(&self, method: &str) -> anyhow::Result<(serde_json::Value, Duration)> {
        let t = Instant::now();
        let mut s = UnixStream::connect(&self.socket).context("connecting to the API")?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(format!("{{\"v\":1,\"method\":\"{method}\",\"params\":{{}}}}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        let took = t.elapsed();
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("API answered {line:?}"))?;
        if v["ok"] != true {
            bail!("{method} failed: {line}");
        }
        Ok((v["result"].clone(), took))
    }

    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        Ok(self.call("status")?.0)
    }

    /// A daemon that died would make every later figure meaningless.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(st) => bail!("the daemon exited ({st})"),
        }
    }

    /// VmRSS, VmHWM… of the daemon in KiB (0 if unreadable).
    pub fn status_kib(&self, field: &str) -> u64 {
        proc_status_kib(self.pid, field)
    }

    /// CPU time (user + system, all threads) the daemon used so far, ns.
    pub fn cpu_ns(&self) -> u64 {
        proc_cpu_ns(self.pid).unwrap_or(0)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM), 0 when unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time a process used so far, ns: the sum of its threads' run time
/// from /proc/PID/task/*/schedstat (ns resolution, where /proc/PID/stat
/// counts 10 ms ticks — too coarse for 1% of a core over a few seconds).
/// Threads that exited take their time with them, so take deltas over
/// windows in which the process keeps its threads (the daemon's are
/// long-lived).
pub fn proc_cpu_ns(pid: u32) -> Option<u64> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0;
    for task in dir.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}
