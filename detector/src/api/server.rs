//! The API server: one task per connection, each peer checked with
//! SO_PEERCRED and SO_PEERGROUPS (root or a member of the configured
//! group), bounded request lines, an error response for anything
//! malformed — input never takes the daemon down.
//!
//! ## Bounded against hostile local users
//! Any local user can connect (the peer check comes after the accept), so
//! everything a connection holds is bounded ([`Limits`]): connections in
//! total (more get `busy` and are closed), the wait for each request line
//! (5 s), and `events` followers — per peer uid and in total (more get
//! `busy`), and each dropped when its socket has accepted nothing for
//! 10 s (a follower that stopped reading would otherwise hold a task and
//! its buffers forever).
use std::{
    collections::HashMap,
    future::Future,
    os::fd::AsRawFd as _,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, broadcast},
};

use super::{FlowView, MAX_REQUEST, Request, Response, StatusView, VERSION};
use crate::{detect::VerdictChange, incident::parse_id, store::Store};

/// What the daemon loop publishes for the API to read.
pub struct Shared {
    pub status: Mutex<StatusView>,
    pub flows: Mutex<Vec<FlowView>>,
    pub db_path: PathBuf,
    /// The API's own read connection, opened on first use (WAL: it never
    /// blocks the daemon loop's writes).
    pub db: Mutex<Option<Store>>,
    pub events: broadcast::Sender<VerdictChange>,
}

/// Who may talk to the API besides root.
#[derive(Debug, Clone)]
pub struct Access {
    pub group_name: String,
    /// The group's id, when the group exists.
    pub gid: Option<u32>,
}

impl Access {
    /// Root, or a member of the group: primary (`gid`) or supplementary
    /// (`groups`, from SO_PEERGROUPS).
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        if uid == 0 {
            return true;
        }
        let Some(group) = self.gid else {
            return false;
        };
        gid == group || groups.contains(&group)
    }

    /// Whether the peer of `stream` may use the API. Its credentials are
    /// the ones it had when it connected (SO_PEERCRED, SO_PEERGROUPS), so
    /// a process cannot pass a socket to one with more rights and back.
    pub fn allows_peer(&self, stream: &UnixStream) -> std::io::Result<bool> {
        let cred = stream.peer_cred()?;
        if self.allows(cred.uid(), cred.gid(), &[]) {
            return Ok(true);
        }
        if self.gid.is_none() {
            return Ok(false);
        }
        let groups = peer_groups(stream.as_raw_fd())?;
        Ok(self.allows(cred.uid(), cred.gid(), &groups))
    }

    pub fn refusal(&self) -> String {
        format!(
            "permission denied: only root and members of group `{}` may use the stormguard API",
            self.group_name
        )
    }
}

/// Supplementary groups of the peer of a connected Unix socket, as they
/// were at connect (SO_PEERGROUPS, Linux 4.13+). Starts with room for 32
/// and grows to what the kernel asks for on ERANGE (at most NGROUPS_MAX,
/// 65,536).
pub fn peer_groups(fd: std::os::fd::RawFd) -> std::io::Result<Vec<u32>> {
    const NGROUPS_MAX: usize = 65_536;
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is valid for `len` bytes, and `len` is ours.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ERANGE) || n <= groups.len() || n > NGROUPS_MAX {
            return Err(err);
        }
        groups.resize(n, 0);
    }
}

/// The bounds of [`serve_with`]; [`serve`] uses the defaults.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more get `busy` and are closed.
    pub max_connections: usize,
    /// How long a connection has to send each complete request line.
    pub request_timeout: Duration,
    /// A follower whose socket has accepted nothing this long is dropped.
    pub follower_stall: Duration,
    /// `events` followers per peer uid; more get `busy`.
    pub followers_per_uid: usize,
    /// `events` followers in total; more get `busy`.
    pub followers_total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 128,
            request_timeout: Duration::from_secs(5),
            follower_stall: Duration::from_secs(10),
            followers_per_uid: 8,
            followers_total: 64,
        }
    }
}

/// Followers now, per uid; a [`FollowerSlot`] holds one place.
#[derive(Debug, Default)]
pub struct Followers {
    by_uid: Mutex<HashMap<u32, usize>>,
}

impl Followers {
    /// Takes a place for a follower of `uid`, or says why not.
    fn join(self: &Arc<Self>, uid: u32, limits: &Limits) -> Result<FollowerSlot, String> {
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        let total: usize = by_uid.values().sum();
        let mine = by_uid.get(&uid).copied().unwrap_or(0);
        if mine >= limits.followers_per_uid {
            return Err(format!(
                "too many event followers for uid {uid} (at most {})",
                limits.followers_per_uid
            ));
        }
        if total >= limits.followers_total {
            return Err(format!(
                "too many event followers (at most {})",
                limits.followers_total
            ));
        }
        *by_uid.entry(uid).or_default() += 1;
        Ok(FollowerSlot {
            followers: Arc::clone(self),
            uid,
        })
    }

    /// Followers now, in total.
    pub fn total(&self) -> usize {
        self.by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum()
    }
}

/// One follower's place; given back when dropped.
struct FollowerSlot {
    followers: Arc<Followers>,
    uid: u32,
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        let mut by_uid = self
            .followers
            .by_uid
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = by_uid.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                by_uid.remove(&self.uid);
            }
        }
    }
}

/// Serves until `shutdown` completes, with the default [`Limits`].
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    access: Access,
    shutdown: impl Future<Output = ()>,
) {
    serve_with(
        listener,
        shared,
        access,
        Limits::default(),
        Arc::default(),
        shutdown,
    )
    .await
}

/// Serves until `shutdown` completes. `followers` is shared so that a test
/// can count them.
pub async fn serve_with(
    listener: UnixListener,
    shared: Arc<Shared>,
    access: Access,
    limits: Limits,
    followers: Arc<Followers>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut backoff = super::backoff::AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            conn = listener.accept() => conn,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(error) => {
                let wait = backoff.failed("API", &error);
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            // Answered in a task of its own, bounded: a peer that does not
            // read must not hold up the accept loop.
            tokio::spawn(async move {
                let mut s = stream;
                let busy = Response::err("busy", "too many API connections; try again");
                let _ = tokio::time::timeout(Duration::from_secs(1), write(&mut s, &busy)).await;
            });
            continue;
        };
        let (shared, access, followers) = (shared.clone(), access.clone(), followers.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = handle(stream, &shared, &access, &limits, &followers).await {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
    }
}

async fn write<W: AsyncWrite + Unpin>(w: &mut W, resp: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(resp).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    w.write_all(&line).await
}

enum Line {
    Eof,
    TooLong,
    Data(Vec<u8>),
}

/// Reads one line of at most `max` bytes without buffering more than that.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Line> {
    let mut out = Vec::new();
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(if out.is_empty() {
                Line::Eof
            } else {
                Line::Data(out)
            });
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(i) => {
                out.extend_from_slice(&buf[..i]);
                r.consume(i + 1);
                return Ok(if out.len() > max {
                    Line::TooLong
                } else {
                    Line::Data(out)
                });
            }
            None => {
                let n = buf.len();
                out.extend_from_slice(buf);
                r.consume(n);
                if out.len() > max {
                    return Ok(Line::TooLong);
                }
            }
        }
    }
}

/// One request as the server understands it: what [`decode`] and
/// [`Call::parse`] make of a line, before any state is read.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Status,
    Flows,
    /// Incidents started at or after `since_ms` (unix ms).
    Incidents {
        since_ms: i64,
        active: bool,
    },
    ExplainId(i64),
    ExplainPid(u32),
    Events,
}

/// Turns a request line into a [`Request`], or the error response to send.
/// Pure: the fuzz tests feed it arbitrary bytes.
pub fn decode(line: &[u8]) -> Result<Request, Response> {
    let req: Request = serde_json::from_slice(line)
        .map_err(|e| Response::err("bad_request", format!("not a request: {e}")))?;
    if req.v != VERSION {
        return Err(Response::err(
            "unsupported_version",
            format!(
                "protocol version {} is not supported; this daemon speaks {VERSION}",
                req.v
            ),
        ));
    }
    Ok(req)
}

impl Call {
    /// The call a request makes, its parameters checked; `now_ms` is the
    /// clock `since_secs` counts back from. Pure.
    pub fn parse(req: &Request, now_ms: i64) -> Result<Call, Response> {
        let p = &req.params;
        match req.method.as_str() {
            "status" => Ok(Call::Status),
            "flows" => Ok(Call::Flows),
            "events" => Ok(Call::Events),
            "incidents" => {
                let since_ms = match &p["since_secs"] {
                    Value::Null => 0,
                    v => {
                        let Some(secs) = v.as_u64() else {
                            return Err(Response::err(
                                "bad_request",
                                "params.since_secs must be a number of seconds",
                            ));
                        };
                        let back = i64::try_from(secs).unwrap_or(i64::MAX).saturating_mul(1000);
                        now_ms.saturating_sub(back)
                    }
                };
                let active = match &p["active"] {
                    Value::Null => false,
                    Value::Bool(b) => *b,
                    _ => {
                        return Err(Response::err(
                            "bad_request",
                            "params.active must be true or false",
                        ));
                    }
                };
                Ok(Call::Incidents { since_ms, active })
            }
            "explain" => {
                if let Some(id) = p["id"].as_str() {
                    parse_id(id).map(Call::ExplainId).ok_or_else(|| {
                        Response::err(
                            "bad_request",
                            format!("`{id}` is not an incident id (they look like inc-42)"),
                        )
                    })
                } else if let Some(pid) = p["pid"].as_u64() {
                    u32::try_from(pid)
                        .map(Call::ExplainPid)
                        .map_err(|_| Response::err("bad_request", format!("{pid} is not a pid")))
                } else {
                    Err(Response::err(
                        "bad_request",
                        "explain needs params.id (inc-N) or params.pid",
                    ))
                }
            }
            other => Err(Response::err(
                "unknown_method",
                format!(
                    "unknown method `{other}`; methods: status, flows, incidents, explain, events"
                ),
            )),
        }
    }
}

async fn handle(
    stream: UnixStream,
    shared: &Shared,
    access: &Access,
    limits: &Limits,
    followers: &Arc<Followers>,
) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let allowed = access.allows_peer(&stream)?;
    let (rd, mut wr) = stream.into_split();
    if !allowed {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "API peer refused");
        let refusal = Response::err("permission_denied", access.refusal());
        return tokio::time::timeout(limits.request_timeout, write(&mut wr, &refusal))
            .await
            .unwrap_or(Ok(()));
    }
    let mut rd = BufReader::new(rd);
    loop {
        let line =
            match tokio::time::timeout(limits.request_timeout, read_line(&mut rd, MAX_REQUEST))
                .await
            {
                Err(_) | Ok(Ok(Line::Eof)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Line::TooLong)) => {
                    // The rest of the line cannot be resynchronised: answer, hang up.
                    return write(
                        &mut wr,
                        &Response::err(
                            "request_too_large",
                            format!("request longer than {MAX_REQUEST} bytes"),
                        ),
                    )
                    .await;
                }
                Ok(Ok(Line::Data(l))) => l,
            };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let call = decode(&line).and_then(|req| Call::parse(&req, now_ms()));
        let resp = match call {
            Err(resp) => resp,
            Ok(Call::Events) => {
                return match followers.join(cred.uid(), limits) {
                    Ok(_slot) => {
                        follow_events(&mut rd, &mut wr, shared, limits.follower_stall).await
                    }
                    Err(why) => write(&mut wr, &Response::err("busy", why)).await,
                };
            }
            Ok(call) => dispatch(&call, shared),
        };
        // A reply the peer does not read within the request timeout ends
        // the connection.
        match tokio::time::timeout(limits.request_timeout, write(&mut wr, &resp)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        }
    }
}

fn dispatch(call: &Call, shared: &Shared) -> Response {
    let lock_err = || Response::err("internal", "state unavailable");
    match *call {
        Call::Status => match shared.status.lock() {
            Ok(s) => Response::ok(json!(*s)),
            Err(_) => lock_err(),
        },
        Call::Flows => match shared.flows.lock() {
            Ok(f) => Response::ok(json!(*f)),
            Err(_) => lock_err(),
        },
        Call::Incidents { since_ms, active } => with_store(shared, |st| {
            st.list(since_ms, active, 1000).map(|v| json!(v))
        }),
        Call::ExplainId(n) => with_store(shared, |st| st.get(n).map(|i| json!(i)))
            .or_not_found(format!("no incident inc-{n}")),
        Call::ExplainPid(pid) => with_store(shared, |st| st.latest_for_pid(pid).map(|i| json!(i)))
            .or_not_found(format!("no incident for pid {pid} (is it storming?)")),
        // Handled by the connection (it takes the connection over).
        Call::Events => Response::err("internal", "events cannot be dispatched"),
    }
}

trait OrNotFound {
    fn or_not_found(self, message: String) -> Response;
}

impl OrNotFound for Response {
    /// A successful lookup that found nothing becomes `not_found`.
    fn or_not_found(self, message: String) -> Response {
        if self.ok && self.result.as_ref().is_none_or(Value::is_null) {
            Response::err("not_found", message)
        } else {
            self
        }
    }
}

fn with_store(
    shared: &Shared,
    f: impl FnOnce(&Store) -> Result<Value, crate::store::StoreError>,
) -> Response {
    let Ok(mut db) = shared.db.lock() else {
        return Response::err("internal", "database unavailable");
    };
    if db.is_none() {
        // Read-only, never creating or moving anything: the daemon owns
        // the database file.
        match Store::open_reader(&shared.db_path) {
            Ok(st) => *db = Some(st),
            Err(e) => return Response::err("internal", e.to_string()),
        }
    }
    match db.as_ref().map(f) {
        Some(Ok(v)) => Response::ok(v),
        Some(Err(e)) => Response::err("internal", e.to_string()),
        None => Response::err("internal", "database unavailable"),
    }
}

/// Streams verdict changes until the peer hangs up, the daemon stops, or
/// the peer's socket accepts nothing for `stall` (it stopped reading).
async fn follow_events<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    rd: &mut R,
    wr: &mut W,
    shared: &Shared,
    stall: Duration,
) -> std::io::Result<()> {
    let mut rx = shared.events.subscribe();
    let send = async |wr: &mut W, line: Vec<u8>| -> std::io::Result<bool> {
        match tokio::time::timeout(stall, wr.write_all(&line)).await {
            Ok(r) => r.map(|()| true),
            Err(_) => {
                tracing::info!("API follower dropped: it accepted nothing for {stall:?}");
                Ok(false)
            }
        }
    };
    let mut first = serde_json::to_vec(&Response::ok(json!("following"))).unwrap_or_default();
    first.push(b'\n');
    if !send(wr, first).await? {
        return Ok(());
    }
    loop {
        let next = tokio::select! {
            // A follower sends nothing more; EOF (or an error) is its hang-up,
            // seen at once rather than at the next event.
            r = rd.fill_buf() => match r {
                Ok([]) | Err(_) => return Ok(()),
                Ok(buf) => {
                    let n = buf.len();
                    rd.consume(n);
                    continue;
                }
            },
            next = rx.recv() => next,
        };
        let mut line = match next {
            Ok(change) => serde_json::to_vec(&change).unwrap_or_default(),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                serde_json::to_vec(&json!({"lagged": n})).unwrap_or_default()
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
        };
        line.push(b'\n');
        if !send(wr, line).await? {
            return Ok(());
        }
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::{State, Subject, synthetic};
    use tokio::io::AsyncReadExt as _;

    #[tokio::test]
    async fn lines_are_bounded() {
        let data = b"short\n0123456789abcdef\nrest".to_vec();
        let mut r = BufReader::new(&data[..]);
        assert!(matches!(read_line(&mut r, 8).await.unwrap(), Line::Data(l) if l == b"short"));
        assert!(matches!(read_line(&mut r, 8).await.unwrap(), Line::TooLong));
        assert!(matches!(read_line(&mut r, 8).await.unwrap(), Line::Data(l) if l == b"rest"));
        assert!(matches!(read_line(&mut r, 8).await.unwrap(), Line::Eof));
    }

    #[test]
    fn root_and_group_members_only() {
        let a = Access {
            group_name: "stormguard".into(),
            gid: Some(4242),
        };
        assert!(a.allows(0, 0, &[]));
        assert!(a.allows(1000, 4242, &[]));
        assert!(a.allows(1000, 1000, &[27, 4242]));
        assert!(!a.allows(1000, 1000, &[27, 100]));
        let none = Access {
            group_name: "stormguard".into(),
            gid: None,
        };
        assert!(!none.allows(1000, 1000, &[1000]));
        assert!(a.refusal().contains("group `stormguard`"));
    }

    #[test]
    fn requests_decode_and_parse_without_overflow() {
        let now = 1_700_000_000_000;
        let call = |line: &str| decode(line.as_bytes()).and_then(|r| Call::parse(&r, now));
        assert_eq!(call(r#"{"v":1,"method":"status"}"#), Ok(Call::Status));
        assert_eq!(
            call(r#"{"v":1,"method":"incidents","params":{"since_secs":60,"active":true}}"#),
            Ok(Call::Incidents {
                since_ms: now - 60_000,
                active: true
            })
        );
        // Far in the past saturates rather than overflowing.
        assert_eq!(
            call(r#"{"v":1,"method":"incidents","params":{"since_secs":18446744073709551615}}"#),
            Ok(Call::Incidents {
                since_ms: now - i64::MAX,
                active: false
            })
        );
        assert_eq!(
            call(r#"{"v":1,"method":"explain","params":{"id":"inc-7"}}"#),
            Ok(Call::ExplainId(7))
        );
        let code = |line: &str| call(line).unwrap_err().error.unwrap().code;
        assert_eq!(
            code(r#"{"v":1,"method":"explain","params":{"pid":4294967296}}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"v":1,"method":"incidents","params":{"since_secs":-1}}"#),
            "bad_request"
        );
        assert_eq!(
            code(r#"{"v":1,"method":"incidents","params":{"active":"yes"}}"#),
            "bad_request"
        );
        assert_eq!(code(r#"{"v":2,"method":"status"}"#), "unsupported_version");
        assert_eq!(code(r#"{"v":1,"method":"nope"}"#), "unknown_method");
        assert_eq!(code("not json"), "bad_request");
    }

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("SKIPPED: needs root to set another process's groups");
        }
        root
    }

    /// A child that takes uid/gid 65534 and supplementary `groups`, then
    /// connects to `path` and waits for the other end to close. Only raw
    /// system calls after the fork: the test process has other threads.
    fn connect_as_nobody(path: &std::path::Path, groups: &[libc::gid_t]) -> libc::pid_t {
        use std::os::unix::ffi::OsStrExt as _;
        // SAFETY: sockaddr_un is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        assert!(bytes.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: fork has no preconditions; the child below only makes
        // async-signal-safe system calls on memory prepared before it.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: async-signal-safe calls on valid pointers; _exit ends
            // the child without running the parent's destructors.
            unsafe {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    libc::_exit(10);
                }
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    libc::_exit(11);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0 || libc::connect(fd, (&raw const addr).cast(), len) != 0 {
                    libc::_exit(12);
                }
                let mut b = 0u8;
                libc::read(fd, (&raw mut b).cast(), 1);
                libc::_exit(0);
            }
        }
        pid
    }

    fn reap(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: our own child; status is ours.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "{status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sg-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn supplementary_groups_come_from_so_peergroups() {
        use std::os::unix::fs::PermissionsExt as _;
        if !root() {
            return;
        }
        let dir = temp_dir("groups");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let access = Access {
            group_name: "sg-test".into(),
            gid: Some(4242),
        };
        // Many groups: more than the first buffer holds (grown on ERANGE).
        let many: Vec<libc::gid_t> = (5000..5040).chain([4242]).collect();
        for (groups, allowed) in [
            (vec![4242], true),
            (vec![], false),
            (vec![27, 100], false),
            (many, true),
        ] {
            let child = connect_as_nobody(&path, &groups);
            let (stream, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
                .await
                .expect("the child connects")
                .unwrap();
            let cred = stream.peer_cred().unwrap();
            assert_eq!((cred.uid(), cred.gid()), (65534, 65534));
            let mut seen = peer_groups(stream.as_raw_fd()).unwrap();
            seen.sort_unstable();
            let mut want = groups.clone();
            want.sort_unstable();
            assert_eq!(seen, want);
            assert_eq!(access.allows_peer(&stream).unwrap(), allowed, "{groups:?}");
            drop(stream);
            assert_eq!(reap(child), 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    struct Server {
        dir: PathBuf,
        path: PathBuf,
        events: broadcast::Sender<VerdictChange>,
        followers: Arc<Followers>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Server {
        fn start(tag: &str, limits: Limits) -> Server {
            let dir = temp_dir(tag);
            let path = dir.join("s.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let (events, _) = broadcast::channel(1024);
            let shared = Arc::new(Shared {
                status: Mutex::new(StatusView::default()),
                flows: Mutex::new(Vec::new()),
                db_path: dir.join("db.sqlite"),
                db: Mutex::new(None),
                events: events.clone(),
            });
            let access = Access {
                group_name: "sg-test".into(),
                gid: None,
            };
            let followers = Arc::new(Followers::default());
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(serve_with(
                listener,
                shared,
                access,
                limits,
                followers.clone(),
                async move {
                    let _ = stopped.await;
                },
            ));
            Server {
                dir,
                path,
                events,
                followers,
                stop: Some(stop),
            }
        }

        async fn connect(&self) -> UnixStream {
            UnixStream::connect(&self.path).await.unwrap()
        }
    }

    impl Drop for Server {
        fn drop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Sends a request line and reads one response line.
    async fn call(s: &mut UnixStream, line: &str) -> Response {
        s.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while tokio::time::timeout(Duration::from_secs(10), s.read(&mut b))
            .await
            .expect("a response")
            .unwrap()
            == 1
        {
            if b[0] == b'\n' {
                break;
            }
            got.push(b[0]);
        }
        serde_json::from_slice(&got).unwrap_or_else(|e| panic!("{e}: {got:?}"))
    }

    /// Reads until EOF (true) or `bound` passes (false).
    async fn eof_within(s: &mut UnixStream, bound: Duration) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        let end = tokio::time::Instant::now() + bound;
        loop {
            match tokio::time::timeout_at(end, s.read(&mut buf)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => {}
            }
        }
    }

    const EVENTS: &str = r#"{"v":1,"method":"events"}"#;

    #[tokio::test]
    async fn followers_are_capped_per_uid_and_in_total() {
        let limits = Limits {
            followers_per_uid: 8,
            followers_total: 64,
            ..Limits::default()
        };
        let srv = Server::start("followers", limits);
        let mut held = Vec::new();
        for _ in 0..8 {
            let mut s = srv.connect().await;
            let r = call(&mut s, EVENTS).await;
            assert!(r.ok, "{r:?}");
            held.push(s);
        }
        assert_eq!(srv.followers.total(), 8);
        let mut ninth = srv.connect().await;
        let r = call(&mut ninth, EVENTS).await;
        let e = r.error.expect("busy");
        assert_eq!(e.code, "busy");
        assert!(e.message.contains("at most 8"), "{}", e.message);
        assert_eq!(srv.followers.total(), 8);
        // A follower that hangs up gives its place back at once.
        drop(held.pop());
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while srv.followers.total() != 7 {
            assert!(std::time::Instant::now() < end, "{}", srv.followers.total());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut again = srv.connect().await;
        assert!(call(&mut again, EVENTS).await.ok);
        assert_eq!(srv.followers.total(), 8);

        let small = Server::start(
            "followers-total",
            Limits {
                followers_total: 3,
                ..Limits::default()
            },
        );
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = small.connect().await;
            assert!(call(&mut s, EVENTS).await.ok);
            held.push(s);
        }
        let mut fourth = small.connect().await;
        let e = call(&mut fourth, EVENTS).await.error.expect("busy");
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("busy", "too many event followers (at most 3)")
        );
    }

    fn change(explanation: String) -> VerdictChange {
        VerdictChange {
            ts_ns: 1,
            subject: Subject::Flow {
                pid: 1,
                dest: synthetic::dest(9),
            },
            comm: "x".into(),
            from: State::Healthy,
            to: State::Storm,
            score: 100,
            run_start_ns: 0,
            persistent_failure: false,
            explanation,
        }
    }

    #[tokio::test]
    async fn a_follower_that_reads_nothing_is_dropped() {
        let stall = Duration::from_millis(300);
        let srv = Server::start(
            "stall",
            Limits {
                follower_stall: stall,
                ..Limits::default()
            },
        );
        let mut reader = srv.connect().await;
        assert!(call(&mut reader, EVENTS).await.ok);
        let mut sleeper = srv.connect().await;
        assert!(call(&mut sleeper, EVENTS).await.ok);
        assert_eq!(srv.followers.total(), 2);
        // 8 MiB of events: far more than a socket buffers.
        let big = "x".repeat(64 * 1024);
        let start = tokio::time::Instant::now();
        let mut read_bytes = 0usize;
        let mut buf = vec![0u8; 256 * 1024];
        for _ in 0..128 {
            srv.events.send(change(big.clone())).unwrap();
            // The reading follower keeps up.
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(5), reader.read(&mut buf)).await
            {
                assert!(n > 0, "the reader was dropped");
                read_bytes += n;
            }
        }
        // Only the one that stopped reading goes, after the stall.
        let end = start + stall * 20;
        while srv.followers.total() != 1 {
            assert!(
                tokio::time::Instant::now() < end,
                "{} followers",
                srv.followers.total()
            );
            while let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(5), reader.read(&mut buf)).await
            {
                read_bytes += n;
            }
        }
        assert!(start.elapsed() >= stall, "{:?}", start.elapsed());
        assert!(read_bytes > 64 * 1024, "{read_bytes}");
        assert!(eof_within(&mut sleeper, Duration::from_secs(10)).await);
        assert_eq!(srv.followers.total(), 1);
    }

    #[tokio::test]
    async fn connections_are_capped_and_silent_ones_closed() {
        let timeout = Duration::from_millis(300);
        let srv = Server::start(
            "conns",
            Limits {
                max_connections: 2,
                request_timeout: timeout,
                ..Limits::default()
            },
        );
        let mut a = srv.connect().await;
        let mut b = srv.connect().await;
        assert!(call(&mut a, r#"{"v":1,"method":"status"}"#).await.ok);
        let mut third = srv.connect().await;
        let mut line = String::new();
        let mut r = BufReader::new(&mut third);
        tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
            .await
            .expect("busy answer")
            .unwrap();
        let resp: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(resp.error.unwrap().code, "busy");
        // Silence past the request timeout: closed by the server.
        let start = std::time::Instant::now();
        assert!(eof_within(&mut b, Duration::from_secs(5)).await);
        assert!(eof_within(&mut a, Duration::from_secs(5)).await);
        let took = start.elapsed();
        assert!(took < timeout * 10, "{took:?}");
        // Places are free again.
        let mut c = srv.connect().await;
        assert!(call(&mut c, r#"{"v":1,"method":"status"}"#).await.ok);
        // A partial line is not a request: closed too.
        c.write_all(b"{\"v\":1,").await.unwrap();
        assert!(eof_within(&mut c, Duration::from_secs(5)).await);
    }

    mod malformed {
        use super::*;
        use crate::record::fuzz;
        use proptest::prelude::*;

        const VALID: &[&str] = &[
            r#"{"v":1,"method":"status","params":{}}"#,
            r#"{"v":1,"method":"incidents","params":{"since_secs":3600,"active":true}}"#,
            r#"{"v":1,"method":"explain","params":{"id":"inc-42"}}"#,
            r#"{"v":1,"method":"explain","params":{"pid":4242}}"#,
            r#"{"v":1,"method":"events"}"#,
        ];

        /// Any JSON value, a few levels deep.
        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(|n| json!(n)),
                any::<u64>().prop_map(|n| json!(n)),
                any::<f64>().prop_map(|f| json!(f)),
                ".{0,12}".prop_map(Value::String),
                prop::sample::select(vec!["inc-1", "inc-0", "inc--1", "inc-99999999999999999999"])
                    .prop_map(|s| json!(s)),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(
                        prop::sample::select(vec!["id", "pid", "since_secs", "active", "x"])
                            .prop_map(String::from),
                        inner,
                        0..4
                    )
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        fn check(line: &[u8]) -> Result<(), TestCaseError> {
            match decode(line).and_then(|r| Call::parse(&r, now_ms())) {
                Ok(_) => Ok(()),
                Err(resp) => {
                    prop_assert!(!resp.ok && resp.error.is_some());
                    Ok(())
                }
            }
        }

        proptest! {
            #![proptest_config(fuzz::config())]

            /// Arbitrary bytes are an error response, never a panic.
            #[test]
            fn arbitrary_bytes_are_refused(bytes in fuzz::bytes()) {
                let r = decode(&bytes).and_then(|r| Call::parse(&r, now_ms()));
                let e = r.expect_err("random bytes made a request");
                prop_assert!(!e.ok);
                prop_assert!(e.error.is_some());
            }

            /// Mutations of valid requests: a call or an error response.
            #[test]
            fn mutated_requests_never_panic(
                bytes in (0..VALID.len())
                    .prop_flat_map(|i| fuzz::mutations(VALID[i].as_bytes().to_vec()))
            ) {
                check(&bytes)?;
            }

            /// Well-formed requests with arbitrary methods and params.
            #[test]
            fn arbitrary_params_never_panic(
                v in prop_oneof![Just(1u32), any::<u32>()],
                method in prop::sample::select(vec!["status", "flows", "incidents", "explain", "events", "nope"]),
                params in json_value()
            ) {
                let line = serde_json::to_vec(&json!({"v": v, "method": method, "params": params})).unwrap();
                check(&line)?;
            }
        }
    }
}
