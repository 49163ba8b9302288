//! Kernel maps are bounded, and their bounds are seen: maps shrunk at
//! load fill up, and the evictions, the refused inserts (counted and
//! logged from the eBPF side through aya-log), the suspects left out and
//! the entries of dead tasks are each exactly what the test caused.
use std::{
    io::{BufRead, BufReader, Write},
    process::{ChildStdin, Command, Stdio},
    sync::{Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use stormguard::kernel::{LoadOptions, MapUsage, Sensors};
use stormguard_tests::{ChildGuard, scaled, skip_or_fail};

/// Every `log` record this process sees (aya-log forwards the programs'
/// lines to the `log` logger that is installed when the sensors load).
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Recorder;

impl log::Log for Recorder {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = format!("{} {}", record.level(), record.args());
        LINES.lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

/// Installs [`Recorder`] (once per process), then loads the sensors with
/// `sizes`, or None after [`skip_or_fail`].
fn load(what: &str, sizes: &[(&'static str, u32)]) -> Option<Sensors> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        log::set_logger(&Recorder).expect("logger");
        log::set_max_level(log::LevelFilter::Trace);
    });
    match Sensors::load_with(LoadOptions {
        map_sizes: sizes.to_vec(),
    }) {
        Ok(s) => Some(s),
        Err(e) => {
            skip_or_fail(what, &e);
            None
        }
    }
}

fn usage(sensors: &mut Sensors, name: &str) -> MapUsage {
    sensors
        .map_usage()
        .expect("map usage")
        .into_iter()
        .find(|u| u.name == name)
        .expect("map listed")
}

fn anomaly(sensors: &Sensors, kind: &str) -> u64 {
    sensors
        .anomalies()
        .expect("anomalies")
        .into_iter()
        .find(|(k, _)| *k == kind)
        .expect("kind listed")
        .1
}

/// Log lines recorded so far that contain `needle`.
fn lines_with(needle: &str) -> usize {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(needle))
        .count()
}

/// Waits (bounded, [`scaled`]) until `f` holds.
fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let timeout = scaled(timeout);
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// True when `pid` is blocked in read(2) (x86_64 syscall 0, or 63 on
/// aarch64), per /proc/PID/syscall.
fn blocked_in_read(pid: u32) -> bool {
    let s = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    let nr = s.split_whitespace().next().unwrap_or("");
    nr == if cfg!(target_arch = "aarch64") {
        "63"
    } else {
        "0"
    }
}

/// A shell that blocks reading its stdin and reads one line per wake-up:
/// a process that makes exactly one new syscall burst per line written.
struct Reader {
    child: ChildGuard,
    stdin: ChildStdin,
}

impl Reader {
    fn spawn() -> Reader {
        let mut child = ChildGuard::spawn(
            Command::new("sh")
                .args(["-c", "while read -r x; do :; done"])
                .stdin(Stdio::piped()),
        );
        let stdin = child.0.stdin.take().expect("stdin");
        Reader { child, stdin }
    }

    fn pid(&self) -> u32 {
        self.child.pid()
    }

    fn wake(&mut self) {
        self.stdin.write_all(b"\n").expect("wake reader");
    }

    /// Closes its stdin: the loop ends and the shell exits.
    fn end(self) {
        drop(self.stdin);
        self.child.finish(Duration::from_secs(10));
    }
}

/// SYSCALLS (per-CPU LRU) shrunk to 8, 24 suspects woken one at a time,
/// each inserting its key exactly once: 24 inserts, at most 8 live, and
/// every other one an eviction — then the exits delete what is left.
/// `n` reader processes, each blocked in read(2) (so alive and idle).
fn blocked_readers(n: usize) -> Vec<Reader> {
    let readers: Vec<Reader> = (0..n).map(|_| Reader::spawn()).collect();
    for r in &readers {
        wait_for("reader blocked", Duration::from_secs(10), || {
            blocked_in_read(r.pid())
        });
    }
    readers
}

#[test]
fn a_shrunk_lru_map_counts_its_evictions_exactly() {
    const CAP: u32 = 8;
    const N: usize = 24;
    let Some(mut sensors) = load("lru_evictions", &[("SYSCALLS", CAP)]) else {
        return;
    };
    let mut readers = blocked_readers(N);
    sensors.attach_on_demand().expect("on-demand probes");
    let pids: Vec<u32> = readers.iter().map(Reader::pid).collect();
    assert_eq!(sensors.set_suspects(&pids).expect("suspects"), 0);
    let before = usage(&mut sensors, "SYSCALLS");
    assert_eq!((before.entries, before.inserts), (0, 0), "{before:?}");
    for r in &mut readers {
        r.wake();
        // Done with its line and back in read(2) before the next one
        // wakes, so no key is evicted while its process is still busy.
        thread::sleep(scaled(Duration::from_millis(30)));
        wait_for("reader back in read", Duration::from_secs(10), || {
            blocked_in_read(r.pid())
        });
    }
    let full = usage(&mut sensors, "SYSCALLS");
    println!("SYSCALLS after {N} suspects: {full:?}");
    assert_eq!(full.capacity, u64::from(CAP));
    assert_eq!(full.inserts, N as u64, "one new key per suspect");
    assert_eq!(full.deletes, 0);
    assert!((1..=u64::from(CAP)).contains(&full.entries), "{full:?}");
    assert_eq!(full.evictions, N as u64 - full.entries);
    let counts = sensors.syscall_counts().expect("syscall counts");
    assert_eq!(counts.len() as u64, full.entries);
    assert!(counts.keys().all(|p| pids.contains(p)), "{counts:?}");

    // Detaching forgets the suspects' counts: deletes of the entries the
    // LRU left, not evictions. (Detached first: a suspect that is still
    // probed would count its last syscalls on its way out.)
    sensors.detach_on_demand().expect("detach");
    let ended = usage(&mut sensors, "SYSCALLS");
    assert_eq!(ended.entries, 0, "{ended:?}");
    assert_eq!(ended.inserts, full.inserts);
    assert_eq!(ended.deletes, full.entries);
    assert_eq!(ended.evictions, full.evictions, "deletes are not evictions");
    for r in readers {
        r.end();
    }
}

/// SUSPECTS (a plain hash, so a fork storm cannot evict the suspects user
/// space chose) shrunk to 8: a suspect forks 20 children; 7 inherit, 13
/// are refused — counted exactly as map_insert and logged from the
/// kernel, at most once per second per CPU. Then user-chosen suspects
/// displace inherited entries, never the other way round.
#[test]
fn a_full_map_is_counted_and_heard_in_the_log() {
    const CAP: usize = 8;
    const KIDS: usize = 20;
    let Some(mut sensors) = load("map_full_heard", &[("SUSPECTS", CAP as u32)]) else {
        return;
    };
    let script = format!(
        "import os, sys, time\n\
         sys.stdin.readline()\n\
         kids = []\n\
         for i in range({KIDS}):\n\
         \x20   pid = os.fork()\n\
         \x20   if pid == 0:\n\
         \x20       time.sleep(120)\n\
         \x20       os._exit(0)\n\
         \x20   kids.append(pid)\n\
         print(' '.join(map(str, kids)), flush=True)\n\
         sys.stdin.readline()\n\
         for k in kids:\n\
         \x20   os.kill(k, 9)\n\
         for k in kids:\n\
         \x20   os.waitpid(k, 0)\n"
    );
    let mut parent = ChildGuard::spawn(
        Command::new("python3")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut stdin = parent.0.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(parent.0.stdout.take().expect("stdout"));
    sensors.attach_on_demand().expect("on-demand probes");
    sensors.set_suspects(&[parent.pid()]).expect("suspects");
    let refused_before = anomaly(&sensors, "map_insert");
    let logged_before = lines_with("map SUSPECTS refused an insert");

    stdin.write_all(b"fork\n").expect("start forking");
    let mut kids = String::new();
    stdout.read_line(&mut kids).expect("children");
    let kids: Vec<u32> = kids
        .split_whitespace()
        .map(|k| k.parse().unwrap())
        .collect();
    assert_eq!(kids.len(), KIDS);

    let refused = anomaly(&sensors, "map_insert") - refused_before;
    assert_eq!(refused, (KIDS - (CAP - 1)) as u64, "children refused");
    let entries = sensors.suspect_entries().expect("entries");
    assert_eq!(entries.len(), CAP);
    assert_eq!(entries.iter().filter(|(_, user)| *user).count(), 1);
    let inherited: Vec<u32> = entries.iter().filter(|e| !e.1).map(|e| e.0).collect();
    assert_eq!(&kids[..CAP - 1], {
        let mut v = inherited.clone();
        v.sort_unstable_by_key(|p| kids.iter().position(|k| k == p));
        v
    });
    // The kernel's log line reaches the `log` logger; rate-limited to one
    // per second per CPU however many inserts were refused.
    wait_for("kernel log line", Duration::from_secs(5), || {
        lines_with("map SUSPECTS refused an insert") > logged_before
    });
    let cpus = thread::available_parallelism().map_or(1, usize::from);
    let logged = lines_with("map SUSPECTS refused an insert") - logged_before;
    assert!((1..=cpus).contains(&logged), "{logged} lines for {refused}");
    let line = LINES
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|l| l.contains("map SUSPECTS refused"))
        .cloned()
        .unwrap();
    assert!(line.starts_with("WARN "), "{line}");
    assert!(line.contains("(errno 7)"), "E2BIG: {line}");

    // Three more chosen suspects, most severe first: they take the place
    // of inherited entries; none is left out.
    let chosen = [parent.pid(), 4_000_001, 4_000_002, 4_000_003];
    assert_eq!(sensors.set_suspects(&chosen).expect("suspects"), 0);
    let entries = sensors.suspect_entries().expect("entries");
    assert_eq!(entries.len(), CAP);
    let mut user: Vec<u32> = entries.iter().filter(|e| e.1).map(|e| e.0).collect();
    user.sort_unstable();
    assert_eq!(user, chosen.to_vec());
    assert_eq!(sensors.suspect_insert_failures, 0);

    stdin.write_all(b"end\n").expect("end");
    drop(stdin);
    parent.finish(Duration::from_secs(20));
    sensors.detach_on_demand().expect("detach");
}

/// More suspects than SUSPECTS holds: no error, exactly its capacity
/// written — the most severe (first) ones — and the rest counted.
#[test]
fn set_suspects_keeps_the_most_severe_when_the_map_is_too_small() {
    const CAP: usize = 16;
    let Some(mut sensors) = load("suspects_capped", &[("SUSPECTS", CAP as u32)]) else {
        return;
    };
    // Most severe first; none of these pids needs to exist.
    let pids: Vec<u32> = (0..40).map(|i| 4_100_000 + i).collect();
    let left_out = sensors.set_suspects(&pids).expect("never an error");
    assert_eq!(left_out, 40 - CAP);
    assert_eq!(sensors.suspect_insert_failures, (40 - CAP) as u64);
    assert_eq!(
        anomaly(&sensors, stormguard::kernel::SUSPECTS_LEFT_OUT),
        (40 - CAP) as u64
    );
    let mut present: Vec<u32> = sensors
        .suspect_entries()
        .expect("entries")
        .into_iter()
        .map(|(p, user)| {
            assert!(user);
            p
        })
        .collect();
    present.sort_unstable();
    assert_eq!(present, pids[..CAP].to_vec());
    let u = usage(&mut sensors, "SUSPECTS");
    assert_eq!((u.entries, u.capacity, u.evictions), (16, 16, 0));

    // A new, smaller set replaces it.
    assert_eq!(sensors.set_suspects(&pids[30..34]).expect("suspects"), 0);
    let mut present: Vec<u32> = sensors
        .suspect_entries()
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect();
    present.sort_unstable();
    assert_eq!(present, pids[30..34].to_vec());
    let u = usage(&mut sensors, "SUSPECTS");
    assert_eq!((u.entries, u.inserts, u.deletes), (4, 20, 16), "{u:?}");
}

/// Notes left for threads that exit while the probes are disarmed (the
/// exit tracepoint then leaves them) are swept once the threads are gone,
/// and only then.
#[test]
fn entries_of_dead_threads_are_swept() {
    const N: usize = 12;
    let Some(mut sensors) = load("sweep_dead", &[]) else {
        return;
    };
    let mut readers = blocked_readers(N);
    sensors.attach_on_demand().expect("on-demand probes");
    let pids: Vec<u32> = readers.iter().map(Reader::pid).collect();
    sensors.set_suspects(&pids).expect("suspects");
    for r in &mut readers {
        r.wake();
    }
    // Each reader is back in read(2), with a receive note for its thread.
    wait_for("a note per reader", Duration::from_secs(10), || {
        usage(&mut sensors, "RECV_NOTES").entries == N as u64
    });
    let notes = usage(&mut sensors, "RECV_NOTES");
    sensors.detach_on_demand().expect("detach");
    // Alive: nothing to sweep.
    assert_eq!(sensors.sweep().expect("sweep"), 0);
    for r in readers {
        r.end();
    }
    assert_eq!(usage(&mut sensors, "RECV_NOTES").entries, N as u64);
    // A pass over every map fits in a few calls (other maps may hold a
    // few entries of the host's own dead threads: at least ours go).
    let mut removed = 0;
    for _ in 0..20 {
        removed += sensors.sweep().expect("sweep");
    }
    assert!(removed >= N, "{removed}");
    let swept = usage(&mut sensors, "RECV_NOTES");
    assert_eq!(swept.entries, 0, "{swept:?}");
    assert_eq!(swept.deletes, notes.deletes + N as u64);
    assert_eq!(swept.evictions, 0);
}
