//! Claiming the API socket: one daemon per socket, a stale socket file
//! replaced, the mode and group set before anyone can connect.
use std::os::unix::fs::PermissionsExt;

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

/// Claims the API socket: refuses if another daemon answers on it, removes
/// a stale one, sets its mode and group.
pub fn bind_socket(cfg: &DaemonConfig) -> anyhow::Result<(UnixListener, Access)> {
    let socket = &cfg.socket;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if socket.exists() {
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
