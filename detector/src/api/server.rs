//! The API server: one task per connection, each peer checked with
//! SO_PEERCRED (root or a member of the configured group), bounded request
//! lines, an error response for anything malformed — input never takes the
//! daemon down.
use std::{
    future::Future,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader},
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
    /// Root, or a member of the group (primary or supplementary, read from
    /// /proc/PID/status of the peer).
    pub fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 {
            return true;
        }
        let Some(group) = self.gid else {
            return false;
        };
        if gid == group {
            return true;
        }
        let Some(pid) = pid else {
            return false;
        };
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .map(|g| g.split_whitespace().any(|x| x.parse() == Ok(group)))
            })
            .unwrap_or(false)
    }

    pub fn refusal(&self) -> String {
        format!(
            "permission denied: only root and members of group `{}` may use the stormguard API",
            self.group_name
        )
    }
}

/// Most connections served at once; more get `busy`.
const MAX_CONNECTIONS: usize = 64;
/// A connection idle this long is closed.
const IDLE: Duration = Duration::from_secs(120);

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    shared: Arc<Shared>,
    access: Access,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                let (shared, access, slots) = (shared.clone(), access.clone(), slots.clone());
                tokio::spawn(async move {
                    let Ok(_permit) = slots.clone().try_acquire_owned() else {
                        let mut s = stream;
                        let _ = write(&mut s, &Response::err("busy", "too many API connections; try again")).await;
                        return;
                    };
                    if let Err(e) = handle(stream, &shared, &access).await {
                        tracing::debug!(error = %e, "API connection ended");
                    }
                });
            }
        }
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
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::io::Result<Line> {
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

async fn handle(stream: UnixStream, shared: &Shared, access: &Access) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let (rd, mut wr) = stream.into_split();
    if !access.allows(cred.uid(), cred.gid(), cred.pid()) {
        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "API peer refused");
        return write(
            &mut wr,
            &Response::err("permission_denied", access.refusal()),
        )
        .await;
    }
    let mut rd = BufReader::new(rd);
    loop {
        let line = match tokio::time::timeout(IDLE, read_line(&mut rd, MAX_REQUEST)).await {
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
        let req: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                write(
                    &mut wr,
                    &Response::err("bad_request", format!("not a request: {e}")),
                )
                .await?;
                continue;
            }
        };
        if req.v != VERSION {
            write(
                &mut wr,
                &Response::err(
                    "unsupported_version",
                    format!(
                        "protocol version {} is not supported; this daemon speaks {VERSION}",
                        req.v
                    ),
                ),
            )
            .await?;
            continue;
        }
        if req.method == "events" {
            return follow_events(&mut wr, shared).await;
        }
        let resp = dispatch(&req, shared);
        write(&mut wr, &resp).await?;
    }
}

fn dispatch(req: &Request, shared: &Shared) -> Response {
    let lock_err = || Response::err("internal", "state unavailable");
    match req.method.as_str() {
        "status" => match shared.status.lock() {
            Ok(s) => Response::ok(json!(*s)),
            Err(_) => lock_err(),
        },
        "flows" => match shared.flows.lock() {
            Ok(f) => Response::ok(json!(*f)),
            Err(_) => lock_err(),
        },
        "incidents" => {
            let since = req.params["since_secs"].as_u64();
            let active = req.params["active"].as_bool().unwrap_or(false);
            let since_ms = since
                .map(|s| now_ms() - (s as i64).saturating_mul(1000))
                .unwrap_or(0);
            with_store(shared, |st| {
                st.list(since_ms, active, 1000).map(|v| json!(v))
            })
        }
        "explain" => {
            if let Some(id) = req.params["id"].as_str() {
                let Some(n) = parse_id(id) else {
                    return Response::err(
                        "bad_request",
                        format!("`{id}` is not an incident id (they look like inc-42)"),
                    );
                };
                with_store(shared, |st| st.get(n).map(|i| json!(i)))
                    .or_not_found(format!("no incident {id}"))
            } else if let Some(pid) = req.params["pid"].as_u64() {
                with_store(shared, |st| st.latest_for_pid(pid as u32).map(|i| json!(i)))
                    .or_not_found(format!("no incident for pid {pid} (is it storming?)"))
            } else {
                Response::err(
                    "bad_request",
                    "explain needs params.id (inc-N) or params.pid",
                )
            }
        }
        other => Response::err(
            "unknown_method",
            format!("unknown method `{other}`; methods: status, flows, incidents, explain, events"),
        ),
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
        match Store::open(&shared.db_path) {
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

async fn follow_events<W: AsyncWrite + Unpin>(wr: &mut W, shared: &Shared) -> std::io::Result<()> {
    let mut rx = shared.events.subscribe();
    write(wr, &Response::ok(json!("following"))).await?;
    loop {
        match rx.recv().await {
            Ok(change) => {
                let mut line = serde_json::to_vec(&change).unwrap_or_default();
                line.push(b'\n');
                wr.write_all(&line).await?;
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                let mut line = serde_json::to_vec(&json!({"lagged": n})).unwrap_or_default();
                line.push(b'\n');
                wr.write_all(&line).await?;
            }
            Err(broadcast::error::RecvError::Closed) => return Ok(()),
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
        assert!(a.allows(0, 0, None));
        assert!(a.allows(1000, 4242, None));
        assert!(!a.allows(1000, 1000, None));
        let none = Access {
            group_name: "stormguard".into(),
            gid: None,
        };
        assert!(!none.allows(1000, 1000, None));
        assert!(a.refusal().contains("group `stormguard`"));
    }
}
