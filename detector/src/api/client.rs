//! The CLI side of the API: blocking, one request per call.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use serde_json::Value;

use super::{Request, Response, VERSION};

/// Why a call failed, worded for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the stormguard daemon is not running (nothing listening on {}); start it with `systemctl start stormguard` or `sudo stormguard daemon`",
        .socket.display()
    )]
    NotRunning { socket: PathBuf },
    #[error(
        "permission denied on {}: only root and members of group `{group}` may query stormguard (add yourself with `sudo usermod -aG {group} $USER`, then log in again)",
        .socket.display()
    )]
    PermissionDenied { socket: PathBuf, group: String },
    /// Let in, but the method is root's alone (`throttle`, `release`).
    #[error("{message}; run it as root (sudo)")]
    NeedsRoot { message: String },
    #[error("{message}")]
    Api { code: String, message: String },
    #[error("talking to the daemon on {}: {cause}", .socket.display())]
    Io {
        socket: PathBuf,
        cause: std::io::Error,
    },
    #[error("the daemon sent something that is not a response: {0}")]
    Protocol(String),
}

pub struct Client {
    socket: PathBuf,
    group: String,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    /// Connects; `group` is only used to word a permission error.
    pub fn connect(socket: &Path, group: &str) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ClientError::NotRunning {
                    socket: socket.into(),
                }
            }
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                socket: socket.into(),
                group: group.into(),
            },
            _ => ClientError::Io {
                socket: socket.into(),
                cause: e,
            },
        })?;
        let reader = stream.try_clone().map_err(|cause| ClientError::Io {
            socket: socket.into(),
            cause,
        })?;
        Ok(Client {
            socket: socket.into(),
            group: group.into(),
            writer: stream,
            reader: BufReader::new(reader),
        })
    }

    fn io(&self, cause: std::io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            cause,
        }
    }

    fn send(&mut self, method: &str, params: Value) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(&Request {
            v: VERSION,
            method: method.into(),
            params,
        })
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| self.io(e))
    }

    fn receive(&mut self) -> Result<Value, ClientError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|e| self.io(e))?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            ));
        }
        let resp: Response = serde_json::from_str(&line)
            .map_err(|e| ClientError::Protocol(format!("{e}: {line}")))?;
        if resp.ok {
            Ok(resp.result.unwrap_or(Value::Null))
        } else {
            let e = resp.error.unwrap_or(super::ApiError {
                code: "internal".into(),
                message: "error without details".into(),
            });
            if e.code == "permission_denied" && e.message.starts_with(super::ROOT_ONLY) {
                return Err(ClientError::NeedsRoot { message: e.message });
            }
            if e.code == "permission_denied" {
                return Err(ClientError::PermissionDenied {
                    socket: self.socket.clone(),
                    group: self.group.clone(),
                });
            }
            Err(ClientError::Api {
                code: e.code,
                message: e.message,
            })
        }
    }

    /// One request, one response.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, ClientError> {
        match self.send(method, params) {
            Ok(()) => self.receive(),
            // A daemon that refuses a peer answers at once and hangs up, so
            // the request may meet a closed socket: its answer says why.
            Err(e @ ClientError::Io { .. }) => match self.receive() {
                Ok(_) | Err(ClientError::Io { .. } | ClientError::Protocol(_)) => Err(e),
                Err(answer) => Err(answer),
            },
            Err(e) => Err(e),
        }
    }

    /// Subscribes to `events` and calls `f` with each until it returns false
    /// or the daemon goes away.
    pub fn follow(mut self, mut f: impl FnMut(Value) -> bool) -> Result<(), ClientError> {
        self.send("events", Value::Null)?;
        self.receive()?;
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.reader.read_line(&mut line).map_err(|e| self.io(e))?;
            if n == 0 {
                return Ok(());
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| ClientError::Protocol(format!("{e}: {line}")))?;
            if !f(v) {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// The error of one call to a daemon that answers `answer`.
    fn refused_with(tag: &str, answer: Response) -> ClientError {
        let dir = std::env::temp_dir().join(format!("sg-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let mut out = serde_json::to_vec(&answer).unwrap();
            out.push(b'\n');
            (&s).write_all(&out).unwrap();
        });
        let e = Client::connect(&path, "stormguard")
            .unwrap()
            .call("throttle", Value::Null)
            .unwrap_err();
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        e
    }

    #[test]
    fn root_only_refusals_keep_the_daemons_words() {
        let message = format!(
            "{}; members of group `stormguard` may list (`stormguard throttles`)",
            super::super::ROOT_ONLY
        );
        let e = refused_with("root", Response::err("permission_denied", message.clone()));
        assert!(
            matches!(&e, ClientError::NeedsRoot { message: m } if *m == message),
            "{e:?}"
        );
        assert_eq!(e.to_string(), format!("{message}; run it as root (sudo)"));
        // The peer itself refused: how to join the group.
        let e = refused_with(
            "group",
            Response::err(
                "permission_denied",
                "permission denied: only root and members of group `stormguard` may use the stormguard API",
            ),
        );
        assert!(matches!(e, ClientError::PermissionDenied { .. }), "{e:?}");
        let e = refused_with("other", Response::err("unavailable", "no enforcer"));
        assert!(
            matches!(&e, ClientError::Api { code, message } if code == "unavailable" && message == "no enforcer"),
            "{e:?}"
        );
    }
}
