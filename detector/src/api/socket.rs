//! Claiming the API socket: one daemon per socket, a stale socket file
//! replaced, the mode and group set before anyone can connect. Anything
//! else at the socket path (a file, a directory, a symlink) is an error and
//! is left alone: it may be someone's data, and a path mistyped in the
//! config must not delete it.
use std::{
    os::unix::fs::{FileTypeExt as _, PermissionsExt},
    path::PathBuf,
};

use anyhow::{Context as _, bail};
use tokio::net::UnixListener;

use super::server::Access;
use crate::config::DaemonConfig;

/// The gid of a group, if it exists.
fn group_gid(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: libc::group is plain data; all-zero is a valid value that
    // getgrnam_r overwrites.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r writes into grp and buf, both ours and sized as
    // passed; result points at grp or is null.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
}

/// Something other than a socket is at the socket path: the user must
/// move it or choose another path (exit status 2, see `cli::exit_code`).
#[derive(Debug, thiserror::Error)]
#[error("{} is not a socket (it is {kind}); remove it or set [daemon] socket to another path", .path.display())]
pub struct NotASocket {
    pub path: PathBuf,
    /// "a regular file", "a directory", "a symbolic link"...
    pub kind: &'static str,
}

/// What is at `path`, for [`NotASocket`].
fn describe(ft: std::fs::FileType) -> &'static str {
    if ft.is_file() {
        "a regular file"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "not a socket"
    }
}

/// Claims the API socket: refuses if another daemon answers on it, removes
/// a stale one, refuses anything that is not a socket, sets its mode and
/// group.
pub fn bind_socket(cfg: &DaemonConfig) -> anyhow::Result<(UnixListener, Access)> {
    let socket = &cfg.socket;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // lstat: a symlink is refused, never followed to delete its target.
    if let Ok(meta) = std::fs::symlink_metadata(socket) {
        let ft = meta.file_type();
        if !ft.is_socket() {
            return Err(NotASocket {
                path: socket.clone(),
                kind: describe(ft),
            }
            .into());
        }
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!(
                "another stormguard daemon is already serving {}; stop it first",
                socket.display()
            );
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("cannot remove the stale socket {}", socket.display()))?;
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // Validated at load.
    let mode = u32::from_str_radix(&cfg.socket_mode, 8).unwrap_or(0o660);
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", socket.display()))?;
    let gid = group_gid(&cfg.socket_group);
    if let Some(gid) = gid {
        std::os::unix::fs::chown(socket, None, Some(gid)).with_context(|| {
            format!(
                "cannot give {} to group {}",
                socket.display(),
                cfg.socket_group
            )
        })?;
    } else {
        tracing::info!(
            group = %cfg.socket_group,
            "group does not exist: only root may use the API"
        );
    }
    Ok((
        listener,
        Access {
            group_name: cfg.socket_group.clone(),
            gid,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(socket: PathBuf) -> DaemonConfig {
        DaemonConfig {
            socket,
            socket_group: "sg-no-such-group".into(),
            socket_mode: "0660".into(),
        }
    }

    #[tokio::test]
    async fn a_non_socket_at_the_path_is_refused_and_kept() {
        let dir = std::env::temp_dir().join(format!("sg-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("sg.sock");
        std::fs::write(&file, b"precious").unwrap();
        let e = bind_socket(&config(file.clone())).unwrap_err();
        assert!(e.is::<NotASocket>());
        assert_eq!(
            format!("{e:#}"),
            format!(
                "{} is not a socket (it is a regular file); remove it or set [daemon] socket to another path",
                file.display()
            )
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        let sub = dir.join("a-dir");
        std::fs::create_dir(&sub).unwrap();
        let e = bind_socket(&config(sub.clone())).unwrap_err().to_string();
        assert!(e.contains("(it is a directory)"), "{e}");
        assert!(sub.is_dir());

        let link = dir.join("link.sock");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let e = bind_socket(&config(link.clone())).unwrap_err().to_string();
        assert!(e.contains("(it is a symbolic link)"), "{e}");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");

        // A stale socket (nobody listening) is replaced.
        let stale = dir.join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
        let (listener, access) = bind_socket(&config(stale.clone())).unwrap();
        assert_eq!(access.gid, None);
        let meta = std::fs::symlink_metadata(&stale).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        // And a live one is another daemon's.
        let e = bind_socket(&config(stale.clone())).unwrap_err().to_string();
        assert!(e.contains("another stormguard daemon"), "{e}");
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
