//! One attempt at one receiver: a command run without a shell, or a POST.
use super::*;

/// Why one attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("cannot start: {0}")]
    Spawn(std::io::Error),
    #[error("{status}; stderr: {stderr:?}")]
    Exit { status: String, stderr: String },
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("HTTP status {0}")]
    Status(u16),
}

pub(super) async fn attempt(n: &Notifier, job: &Job) -> Result<String, AttemptError> {
    match &n.target {
        Target::Command(argv) => run_command(argv, job, n.timeout).await,
        Target::Webhook {
            host, port, path, ..
        } => post(host, *port, path, job, n.timeout).await,
    }
}

/// `s` cut to [`OUTPUT_SHOWN`] bytes (at a character boundary), lossy.
pub(super) fn shown(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    if s.len() <= OUTPUT_SHOWN {
        return s.to_string();
    }
    let mut end = OUTPUT_SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Reads a pipe to its end, keeping at most [`OUTPUT_READ_MAX`] bytes.
pub(super) async fn read_capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>) -> Vec<u8> {
    use tokio::io::AsyncReadExt as _;
    let mut kept = Vec::new();
    let Some(mut pipe) = pipe else { return kept };
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = OUTPUT_READ_MAX.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

pub(super) async fn run_command(
    argv: &[String],
    job: &Job,
    timeout: Duration,
) -> Result<String, AttemptError> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt as _;
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", COMMAND_PATH)
        .env("STORMGUARD_EVENT", job.kind.as_str())
        .env("STORMGUARD_INCIDENT", &job.id)
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so the timeout kills what it started too.
        .process_group(0);
    let mut child = cmd.spawn().map_err(AttemptError::Spawn)?;
    let pid = child.id();
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let body = job.body.clone();
    let work = async {
        let write = async move {
            if let Some(mut s) = stdin {
                // A command that does not read its stdin is not an error.
                let _ = s.write_all(body.as_bytes()).await;
                let _ = s.shutdown().await;
            }
        };
        let (_, out, err, status) = tokio::join!(
            write,
            read_capped(stdout),
            read_capped(stderr),
            child.wait()
        );
        (out, err, status)
    };
    let done = tokio::time::timeout(timeout, work).await;
    match done {
        Ok((out, err, Ok(status))) if status.success() => {
            let mut detail = String::new();
            if !out.is_empty() {
                detail.push_str(&format!("; stdout: {:?}", shown(&out)));
            }
            if !err.is_empty() {
                detail.push_str(&format!("; stderr: {:?}", shown(&err)));
            }
            Ok(detail)
        }
        Ok((_, err, Ok(status))) => Err(AttemptError::Exit {
            status: status.to_string(),
            stderr: shown(&err),
        }),
        Ok((_, _, Err(e))) => Err(AttemptError::Spawn(e)),
        Err(_) => {
            if let Some(pid) = pid {
                // SAFETY: signalling the process group we created.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(1), child.wait()).await;
            Err(AttemptError::Timeout(timeout))
        }
    }
}

pub(super) async fn post(
    host: &str,
    port: u16,
    path: &str,
    job: &Job,
    timeout: Duration,
) -> Result<String, AttemptError> {
    let work = async {
        let stream = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(AttemptError::Connect)?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, String>(io)
            .await
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let authority = if port == 80 {
            host.to_string()
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(
                hyper::header::USER_AGENT,
                concat!("stormguard/", env!("CARGO_PKG_VERSION")),
            )
            .header(hyper::header::CONNECTION, "close")
            .header("X-Stormguard-Event", job.kind.as_str())
            .body(job.body.as_str().to_string())
            .map_err(|e| AttemptError::Http(e.to_string()))?;
        let resp = send.send_request(req).await;
        conn.abort();
        let status = resp
            .map_err(|e| AttemptError::Http(e.to_string()))?
            .status();
        if status.is_success() {
            Ok(format!("; HTTP {}", status.as_u16()))
        } else {
            Err(AttemptError::Status(status.as_u16()))
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Err(AttemptError::Timeout(timeout)))
}
