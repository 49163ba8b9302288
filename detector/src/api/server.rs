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

use super::{FlowView, MAX_REQUEST, ROOT_ONLY, Request, Response, StatusView, VERSION};
use crate::{
    detect::VerdictChange,
    enforce::{
        Control, DestSpec, EnforceError, Release, TargetSpec, ThrottleRequest,
        request::{MAX_FOR_SECS, check_retry_ratio, errno_by_name, parse_budget_id},
    },
    incident::parse_id,
    store::Store,
};

/// What the daemon loop publishes for the API to read.
pub struct Shared {
    pub status: Mutex<StatusView>,
    pub flows: Mutex<Vec<FlowView>>,
    pub db_path: PathBuf,
    /// The API's own read connection, opened on first use (WAL: it never
    /// blocks the daemon loop's writes).
    pub db: Mutex<Option<Store>>,
    pub events: broadcast::Sender<VerdictChange>,
    /// The enforcer, for `throttle`, `release` and `throttles`; `None`
    /// when this daemon runs without enforcement (they answer
    /// `unavailable`).
    pub control: Option<Arc<dyn Control>>,
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

    /// Whether peer `uid`, already let in, may call `method`: `throttle`
    /// and `release` change what other processes may do, so they are for
    /// root alone; everything else is for anyone let in. Pure.
    pub fn authorize(&self, method: &str, uid: u32) -> Result<(), Response> {
        if uid == 0 || !ROOT_METHODS.contains(&method) {
            return Ok(());
        }
        Err(Response::err(
            "permission_denied",
            format!(
                "{ROOT_ONLY}; members of group `{}` may list (`stormguard throttles`)",
                self.group_name
            ),
        ))
    }
}

/// The methods only root may call.
pub const ROOT_METHODS: [&str; 2] = ["throttle", "release"];

/// Every method, as the unknown-method error lists them.
pub const METHODS: [&str; 8] = [
    "status",
    "flows",
    "incidents",
    "explain",
    "events",
    "throttle",
    "release",
    "throttles",
];

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
    /// A manual budget (root only).
    Throttle(ThrottleRequest),
    /// Ends budgets (root only).
    Release(Release),
    /// Every budget.
    Throttles,
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
            "throttle" => parse_throttle(p).map(Call::Throttle),
            "release" => parse_release(p).map(Call::Release),
            "throttles" => Ok(Call::Throttles),
            other => Err(Response::err(
                "unknown_method",
                format!("unknown method `{other}`; methods: {}", METHODS.join(", ")),
            )),
        }
    }
}

fn bad(message: impl Into<String>) -> Response {
    Response::err("bad_request", message)
}

/// `params` as an object (`null` as an empty one), every key one of
/// `known`: a misspelt `dry_run` must not go unnoticed.
fn check_params(method: &str, params: &Value, known: &[&str]) -> Result<(), Response> {
    let map = match params {
        Value::Null => return Ok(()),
        Value::Object(map) => map,
        _ => return Err(bad(format!("{method} takes its params as an object"))),
    };
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown param `{k}`; {method} takes {}",
            known.join(", ")
        ))),
        None => Ok(()),
    }
}

/// The params of `throttle`, checked. Pure.
fn parse_throttle(params: &Value) -> Result<ThrottleRequest, Response> {
    const KNOWN: [&str; 10] = [
        "pid",
        "cgroup",
        "unit",
        "dest",
        "rate",
        "burst",
        "retry_ratio",
        "for_secs",
        "errno",
        "dry_run",
    ];
    check_params("throttle", params, &KNOWN)?;
    // Absent and null are the same.
    let get = |k: &str| Some(&params[k]).filter(|v| !v.is_null());

    let given: Vec<&str> = ["pid", "cgroup", "unit"]
        .into_iter()
        .filter(|k| get(k).is_some())
        .collect();
    let target = match given.as_slice() {
        [] => {
            return Err(bad(
                "throttle needs one of params.pid (a pid), params.cgroup (a cgroup v2 path) or params.unit (a systemd unit)",
            ));
        }
        [_] => {
            if let Some(v) = get("pid") {
                match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
                    Some(pid) if pid > 0 => TargetSpec::Pid(pid),
                    _ => {
                        return Err(bad(
                            "params.pid must be a pid: a whole number from 1 to 4294967295",
                        ));
                    }
                }
            } else if let Some(v) = get("cgroup") {
                match v.as_str() {
                    Some(path) if valid_cgroup(path) => TargetSpec::Cgroup(path.into()),
                    _ => {
                        return Err(bad(
                            "params.cgroup must be a cgroup v2 path below the cgroup root, as a string (e.g. /system.slice/nginx.service), without `..`",
                        ));
                    }
                }
            } else {
                match get("unit").and_then(Value::as_str) {
                    Some(unit) if valid_unit(unit) => TargetSpec::Unit(unit.into()),
                    _ => {
                        return Err(bad(
                            "params.unit must be a systemd unit name, as a string (e.g. nginx.service)",
                        ));
                    }
                }
            }
        }
        _ => {
            return Err(bad(format!(
                "throttle takes only one of params.pid, params.cgroup and params.unit (got {})",
                given.join(" and ")
            )));
        }
    };

    let dest = match get("dest") {
        None => None,
        Some(Value::String(s)) => Some(
            s.parse::<DestSpec>()
                .map_err(|e| bad(format!("params.dest: {e}")))?,
        ),
        Some(_) => {
            return Err(bad(
                "params.dest must be a string: ADDR or ADDR:PORT (IPv6 as [ADDR]:PORT)",
            ));
        }
    };

    let rate_per_s = match get("rate").and_then(Value::as_f64) {
        Some(r) if r.is_finite() && r > 0.0 => r,
        _ => {
            return Err(bad(
                "params.rate must be a number of attempts per second above 0 (e.g. 10 or 0.5)",
            ));
        }
    };

    let burst = match get("burst") {
        None => None,
        Some(v) => match v.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(b) if b >= 1 => Some(b),
            _ => {
                return Err(bad(
                    "params.burst must be a whole number of attempts from 1 to 4294967295",
                ));
            }
        },
    };

    let retry_ratio = match get("retry_ratio") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .ok_or_else(|| "not a number".to_string())
                .and_then(check_retry_ratio)
                .map_err(|_| {
                    bad("params.retry_ratio must be a number above 0 and at most 1 (e.g. 0.2)")
                })?,
        ),
    };

    let for_secs = match get("for_secs").and_then(Value::as_u64) {
        Some(s) if (1..=MAX_FOR_SECS).contains(&s) => s,
        _ => {
            return Err(bad(format!(
                "params.for_secs must be a whole number of seconds from 1 to {MAX_FOR_SECS} (7 days)"
            )));
        }
    };

    let errno = match get("errno") {
        None => None,
        Some(Value::String(name)) => {
            errno_by_name(name).map_err(|e| bad(format!("params.errno: {e}")))?;
            Some(name.clone())
        }
        Some(_) => {
            return Err(bad(
                "params.errno must be a string: an errno name such as ECONNREFUSED",
            ));
        }
    };

    let dry_run = match get("dry_run") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("params.dry_run must be true or false")),
    };

    Ok(ThrottleRequest {
        target,
        dest,
        rate_per_s,
        burst,
        retry_ratio,
        for_secs,
        errno,
        dry_run,
    })
}

/// A cgroup path names something below the root and cannot climb out.
fn valid_cgroup(path: &str) -> bool {
    !path.trim_matches('/').is_empty()
        && !path.contains('\0')
        && !path.split('/').any(|c| c == "..")
}

/// A unit name is one path component (`nginx.service`).
fn valid_unit(unit: &str) -> bool {
    !unit.is_empty() && unit != "." && unit != ".." && !unit.contains(['/', '\0'])
}

/// The params of `release`, checked. Pure.
fn parse_release(params: &Value) -> Result<Release, Response> {
    check_params("release", params, &["id", "all"])?;
    let all = match &params["all"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        _ => return Err(bad("params.all must be true or false")),
    };
    match (&params["id"], all) {
        (Value::Null, true) => Ok(Release::All),
        (Value::Null, false) => Err(bad(
            "release needs params.id (a budget id, thr-N) or params.all: true",
        )),
        (_, true) => Err(bad(
            "release takes params.id or params.all: true, not both",
        )),
        (Value::String(id), false) => {
            parse_budget_id(id)
                .map(Release::Id)
                .ok_or_else(|| {
                    bad(format!(
                        "params.id: `{id}` is not a budget id (they look like thr-3; see `stormguard throttles`)"
                    ))
                })
        }
        (_, false) => Err(bad(
            "params.id must be a string: a budget id such as thr-3",
        )),
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
        let call = decode(&line).and_then(|req| {
            // Before the params: a peer that may not call a method learns
            // nothing more of it.
            access.authorize(&req.method, cred.uid())?;
            Call::parse(&req, now_ms())
        });
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
            Ok(call @ (Call::Throttle(_) | Call::Release(_) | Call::Throttles)) => {
                control(call, shared).await
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
        Call::Throttle(_) | Call::Release(_) | Call::Throttles => {
            Response::err("internal", "enforcement calls go through `control`")
        }
    }
}

/// Message of `unavailable`, when the daemon runs without enforcement.
pub const UNAVAILABLE: &str = "enforcement is unavailable: this daemon runs without it (see its log for why); detection goes on";

/// `throttle`, `release` and `throttles`. The enforcer's calls take its
/// mutex and update kernel maps — quick, but the daemon loop may hold that
/// mutex, and this runtime also serves every other connection and the
/// metrics: so they run on the blocking pool, never on this thread.
async fn control(call: Call, shared: &Shared) -> Response {
    let Some(ctl) = shared.control.clone() else {
        return Response::err("unavailable", UNAVAILABLE);
    };
    match tokio::task::spawn_blocking(move || control_call(&*ctl, call)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "enforcement call failed");
            Response::err("internal", format!("the enforcer failed: {e}"))
        }
    }
}

/// One enforcement call on `ctl`, as a response.
fn control_call(ctl: &dyn Control, call: Call) -> Response {
    let failed = |e: EnforceError| Response::err(e.code(), e.to_string());
    match call {
        Call::Throttle(req) => match ctl.throttle(req) {
            Ok(view) => Response::ok(json!(view)),
            Err(e) => failed(e),
        },
        Call::Release(which) => match ctl.release(which) {
            Ok(ids) => Response::ok(json!({ "released": ids })),
            Err(e) => failed(e),
        },
        Call::Throttles => Response::ok(json!(ctl.list())),
        _ => Response::err("internal", "not an enforcement call"),
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
    use crate::enforce::BudgetView;
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

    fn throttle(params: Value) -> Result<Call, Response> {
        Call::parse(
            &Request {
                v: 1,
                method: "throttle".into(),
                params,
            },
            0,
        )
    }

    /// The message of a `bad_request`, failing on anything else.
    fn bad_request(r: Result<Call, Response>) -> String {
        let e = r.expect_err("refused").error.unwrap();
        assert_eq!(e.code, "bad_request", "{}", e.message);
        e.message
    }

    #[test]
    fn throttle_params_parse() {
        assert_eq!(
            throttle(json!({
                "pid": 1234, "dest": "127.0.0.1:8080", "rate": 10, "burst": 20,
                "retry_ratio": 0.2, "for_secs": 30, "errno": "ETIMEDOUT", "dry_run": true
            })),
            Ok(Call::Throttle(ThrottleRequest {
                target: TargetSpec::Pid(1234),
                dest: Some("127.0.0.1:8080".parse().unwrap()),
                rate_per_s: 10.0,
                burst: Some(20),
                retry_ratio: Some(0.2),
                for_secs: 30,
                errno: Some("ETIMEDOUT".into()),
                dry_run: true,
            }))
        );
        // The least: a target, a rate, a duration; null is absent.
        assert_eq!(
            throttle(
                json!({"unit": "nginx.service", "rate": 0.5, "for_secs": 604800,
                            "pid": null, "dest": null, "burst": null})
            ),
            Ok(Call::Throttle(ThrottleRequest {
                target: TargetSpec::Unit("nginx.service".into()),
                dest: None,
                rate_per_s: 0.5,
                burst: None,
                retry_ratio: None,
                for_secs: 604800,
                errno: None,
                dry_run: false,
            }))
        );
        let Ok(Call::Throttle(r)) = throttle(
            json!({"cgroup": "/system.slice/x.service", "dest": "[::1]:53", "rate": 1, "for_secs": 1, "retry_ratio": 1}),
        ) else {
            panic!("a cgroup target")
        };
        assert_eq!(
            r.target,
            TargetSpec::Cgroup("/system.slice/x.service".into())
        );
        assert_eq!(r.dest.unwrap().port, Some(53));
        assert_eq!(r.retry_ratio, Some(1.0));
    }

    #[test]
    fn bad_throttle_params_name_the_param_and_what_is_allowed() {
        let ok = json!({"pid": 1234, "rate": 10, "for_secs": 30});
        let with = |k: &str, v: Value| {
            let mut p = ok.clone();
            p[k] = v;
            bad_request(throttle(p))
        };
        let without = |k: &str| {
            let mut p = ok.clone();
            p.as_object_mut().unwrap().remove(k);
            bad_request(throttle(p))
        };
        // Targets: exactly one.
        assert!(without("pid").contains("needs one of params.pid"));
        assert!(bad_request(throttle(Value::Null)).contains("needs one of params.pid"));
        let two = with("cgroup", json!("/x"));
        assert!(
            two.contains("only one of") && two.contains("pid and cgroup"),
            "{two}"
        );
        let mut three = ok.clone();
        three["cgroup"] = json!("/x");
        three["unit"] = json!("x.service");
        assert!(bad_request(throttle(three)).contains("pid and cgroup and unit"));
        for pid in [
            json!(0),
            json!(-1),
            json!(4294967296u64),
            json!("1234"),
            json!(1.5),
        ] {
            assert!(with("pid", pid).starts_with("params.pid must be a pid"));
        }
        let mut cg = ok.clone();
        cg.as_object_mut().unwrap().remove("pid");
        for path in [
            json!(""),
            json!("/"),
            json!("/a/../../b"),
            json!("a\0b"),
            json!(7),
        ] {
            let mut p = cg.clone();
            p["cgroup"] = path.clone();
            assert!(
                bad_request(throttle(p)).starts_with("params.cgroup must be"),
                "{path}"
            );
        }
        for unit in [json!(""), json!("a/b"), json!(".."), json!(true)] {
            let mut p = cg.clone();
            p["unit"] = unit.clone();
            assert!(
                bad_request(throttle(p)).starts_with("params.unit must be"),
                "{unit}"
            );
        }
        // Destination.
        assert!(with("dest", json!("example.com:80")).starts_with("params.dest: `example.com:80`"));
        assert!(with("dest", json!(8080)).starts_with("params.dest must be a string"));
        // Rate: required, above 0.
        assert!(without("rate").starts_with("params.rate must be"));
        for rate in [json!(0), json!(-1), json!("10/s")] {
            assert!(with("rate", rate).contains("above 0"));
        }
        // Burst: 1..=u32::MAX.
        for burst in [
            json!(0),
            json!(-1),
            json!(4294967296u64),
            json!(2.5),
            json!("5"),
        ] {
            assert!(with("burst", burst).starts_with("params.burst must be"));
        }
        // Retry ratio: (0, 1].
        for r in [json!(0), json!(1.5), json!(-0.2), json!("0.2")] {
            assert!(with("retry_ratio", r).contains("above 0 and at most 1"));
        }
        // Duration: required, 1..=7 days.
        assert!(without("for_secs").starts_with("params.for_secs must be"));
        for f in [json!(0), json!(604801), json!(1.5), json!("30s")] {
            assert!(with("for_secs", f).contains("from 1 to 604800"));
        }
        // errno.
        assert!(with("errno", json!("EWHAT")).starts_with("params.errno: `EWHAT` is not an errno"));
        assert!(with("errno", json!(111)).starts_with("params.errno must be a string"));
        // dry_run.
        assert_eq!(
            with("dry_run", json!("yes")),
            "params.dry_run must be true or false"
        );
        // Misspelt or unknown params are refused, not ignored.
        let typo = with("dryrun", json!(true));
        assert!(
            typo.starts_with("unknown param `dryrun`") && typo.contains("dry_run"),
            "{typo}"
        );
        assert!(bad_request(throttle(json!([1234]))).contains("as an object"));
    }

    #[test]
    fn release_params_parse() {
        let release = |params: Value| {
            Call::parse(
                &Request {
                    v: 1,
                    method: "release".into(),
                    params,
                },
                0,
            )
        };
        assert_eq!(
            release(json!({"id": "thr-3"})),
            Ok(Call::Release(Release::Id(3)))
        );
        assert_eq!(
            release(json!({"all": true})),
            Ok(Call::Release(Release::All))
        );
        assert_eq!(
            release(json!({"id": "thr-3", "all": false})),
            Ok(Call::Release(Release::Id(3)))
        );
        assert!(bad_request(release(Value::Null)).contains("needs params.id"));
        assert!(bad_request(release(json!({"all": false}))).contains("needs params.id"));
        assert!(bad_request(release(json!({"id": "thr-3", "all": true}))).contains("not both"));
        assert!(bad_request(release(json!({"id": "inc-3"}))).contains("not a budget id"));
        assert!(bad_request(release(json!({"id": 3}))).starts_with("params.id must be a string"));
        assert!(bad_request(release(json!({"all": "yes"}))).starts_with("params.all must be"));
        assert!(bad_request(release(json!({"ids": ["thr-1"]}))).starts_with("unknown param `ids`"));
        assert_eq!(
            Call::parse(
                &Request {
                    v: 1,
                    method: "throttles".into(),
                    params: Value::Null
                },
                0
            ),
            Ok(Call::Throttles)
        );
        let e = Call::parse(
            &Request {
                v: 1,
                method: "nope".into(),
                params: Value::Null,
            },
            0,
        )
        .unwrap_err()
        .error
        .unwrap();
        assert!(
            e.message.ends_with("events, throttle, release, throttles"),
            "{}",
            e.message
        );
    }

    #[test]
    fn only_root_throttles_or_releases() {
        let a = Access {
            group_name: "stormguard".into(),
            gid: Some(4242),
        };
        for m in ["throttle", "release"] {
            assert_eq!(a.authorize(m, 0), Ok(()));
            let e = a.authorize(m, 1000).unwrap_err().error.unwrap();
            assert_eq!(e.code, "permission_denied");
            assert_eq!(
                e.message,
                "only root may throttle or release; members of group `stormguard` may list (`stormguard throttles`)"
            );
            assert!(e.message.starts_with(crate::api::ROOT_ONLY));
        }
        for m in [
            "throttles",
            "status",
            "flows",
            "incidents",
            "explain",
            "events",
            "nope",
        ] {
            assert_eq!(a.authorize(m, 1000), Ok(()), "{m}");
        }
    }

    /// An enforcer in memory: pid 1 is protected, ids count up.
    #[derive(Default)]
    struct FakeControl {
        budgets: Mutex<Vec<BudgetView>>,
    }

    impl Control for FakeControl {
        fn throttle(&self, req: ThrottleRequest) -> Result<BudgetView, EnforceError> {
            if req.target == TargetSpec::Pid(1) {
                return Err(EnforceError::Protected(
                    "pid 1 (systemd) is never throttled".into(),
                ));
            }
            let mut b = self.budgets.lock().unwrap();
            let view = BudgetView {
                id: format!("thr-{}", b.len() + 1),
                origin: "manual".into(),
                target: format!("{:?}", req.target),
                dest: req.dest.map(|d| d.to_string()),
                kind: if req.retry_ratio.is_some() {
                    "retry"
                } else {
                    "rate"
                }
                .into(),
                rate_per_s: req.rate_per_s,
                burst: req.burst.unwrap_or(1),
                retry_ratio: req.retry_ratio,
                errno: req.errno.unwrap_or_else(|| "ECONNREFUSED".into()),
                mode: if req.dry_run { "dry-run" } else { "enforce" }.into(),
                created_ms: 1_000,
                expires_ms: 1_000 + req.for_secs as i64 * 1000,
                remaining_s: req.for_secs,
                allowed: 0,
                slowed: 0,
                denied: 0,
                incident: None,
            };
            b.push(view.clone());
            Ok(view)
        }

        fn release(&self, which: Release) -> Result<Vec<String>, EnforceError> {
            let mut b = self.budgets.lock().unwrap();
            match which {
                Release::All => Ok(b.drain(..).map(|v| v.id).collect()),
                Release::Id(n) => {
                    let id = format!("thr-{n}");
                    let i = b
                        .iter()
                        .position(|v| v.id == id)
                        .ok_or_else(|| EnforceError::NotFound(format!("no budget {id}")))?;
                    Ok(vec![b.remove(i).id])
                }
            }
        }

        fn list(&self) -> Vec<BudgetView> {
            self.budgets.lock().unwrap().clone()
        }
    }

    #[test]
    fn control_calls_answer_views_ids_and_error_codes() {
        let ctl = FakeControl::default();
        let Ok(Call::Throttle(req)) = throttle(json!({"pid": 1234, "rate": 10, "for_secs": 30}))
        else {
            panic!()
        };
        let r = control_call(&ctl, Call::Throttle(req.clone()));
        assert!(r.ok, "{r:?}");
        let view: BudgetView = serde_json::from_value(r.result.unwrap()).unwrap();
        assert_eq!((view.id.as_str(), view.remaining_s), ("thr-1", 30));
        let list = control_call(&ctl, Call::Throttles).result.unwrap();
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert_eq!(list[0]["id"], "thr-1");
        let e = control_call(
            &ctl,
            Call::Throttle(ThrottleRequest {
                target: TargetSpec::Pid(1),
                ..req
            }),
        )
        .error
        .unwrap();
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("protected", "refused: pid 1 (systemd) is never throttled")
        );
        let e = control_call(&ctl, Call::Release(Release::Id(9)))
            .error
            .unwrap();
        assert_eq!(
            (e.code.as_str(), e.message.as_str()),
            ("not_found", "no budget thr-9")
        );
        assert_eq!(
            control_call(&ctl, Call::Release(Release::All)).result,
            Some(json!({"released": ["thr-1"]}))
        );
        assert_eq!(control_call(&ctl, Call::Throttles).result, Some(json!([])));
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
            Server::start_with(tag, limits, None)
        }

        fn start_with(tag: &str, limits: Limits, control: Option<Arc<dyn Control>>) -> Server {
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
                control,
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
    async fn enforcement_over_the_socket() {
        // Without an enforcer: `unavailable`, for listing too.
        let none = Server::start("no-control", Limits::default());
        let mut s = none.connect().await;
        for line in [
            r#"{"v":1,"method":"throttles"}"#,
            r#"{"v":1,"method":"release","params":{"all":true}}"#,
        ] {
            let e = call(&mut s, line).await.error.expect("unavailable");
            assert_eq!(
                (e.code.as_str(), e.message.as_str()),
                ("unavailable", UNAVAILABLE)
            );
        }
        // With one (the test runs as root, as the server tests do).
        let srv = Server::start_with(
            "control",
            Limits::default(),
            Some(Arc::new(FakeControl::default())),
        );
        let mut s = srv.connect().await;
        let r = call(
            &mut s,
            r#"{"v":1,"method":"throttle","params":{"pid":4242,"rate":10,"for_secs":30,"dry_run":true}}"#,
        )
        .await;
        let view: BudgetView = serde_json::from_value(r.result.expect("a budget")).unwrap();
        assert_eq!((view.id.as_str(), view.mode.as_str()), ("thr-1", "dry-run"));
        let list = call(&mut s, r#"{"v":1,"method":"throttles"}"#).await;
        assert_eq!(list.result.unwrap()[0]["id"], "thr-1");
        let bad = call(
            &mut s,
            r#"{"v":1,"method":"throttle","params":{"pid":4242}}"#,
        )
        .await;
        assert_eq!(bad.error.unwrap().code, "bad_request");
        let gone = call(
            &mut s,
            r#"{"v":1,"method":"release","params":{"id":"thr-1"}}"#,
        )
        .await;
        assert_eq!(gone.result, Some(json!({"released": ["thr-1"]})));
    }

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
            r#"{"v":1,"method":"throttle","params":{"pid":4242,"dest":"10.0.0.1:443","rate":10,"burst":20,"retry_ratio":0.2,"for_secs":30,"errno":"ECONNREFUSED","dry_run":true}}"#,
            r#"{"v":1,"method":"throttle","params":{"cgroup":"/system.slice/x.service","rate":0.5,"for_secs":60}}"#,
            r#"{"v":1,"method":"release","params":{"id":"thr-3"}}"#,
            r#"{"v":1,"method":"release","params":{"all":true}}"#,
            r#"{"v":1,"method":"throttles"}"#,
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
                prop::sample::select(vec![
                    "inc-1",
                    "inc-0",
                    "inc--1",
                    "inc-99999999999999999999",
                    "thr-1",
                    "thr-",
                    "10.0.0.1:443",
                    "[::1]:0",
                    "/a/../b",
                    "nginx.service",
                    "ECONNREFUSED",
                ])
                .prop_map(|s| json!(s)),
            ];
            leaf.prop_recursive(3, 24, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(
                        prop::sample::select(vec![
                            "id",
                            "pid",
                            "since_secs",
                            "active",
                            "x",
                            "cgroup",
                            "unit",
                            "dest",
                            "rate",
                            "burst",
                            "retry_ratio",
                            "for_secs",
                            "errno",
                            "dry_run",
                            "all",
                        ])
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
                method in prop::sample::select(vec![
                    "status", "flows", "incidents", "explain", "events", "throttle", "release",
                    "throttles", "nope",
                ]),
                params in json_value()
            ) {
                let line = serde_json::to_vec(&json!({"v": v, "method": method, "params": params})).unwrap();
                check(&line)?;
            }
        }
    }
}
