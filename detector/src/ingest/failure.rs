//! Failure kinds as small integer codes: a positive errno, or a negative
//! code for failures the kernel gave no errno for. Counting by code keeps
//! the per-event path free of allocation; names are made only for display.
use super::ConnectOutcome;

/// Closed in SYN_SENT without an error report (the caller gave up).
pub const CLOSED: i32 = -1;
/// Never reached SYN_SENT, errno unknown (on-demand probe not attached).
pub const BEFORE_SYN: i32 = -2;
/// Established, then closed young with no response bytes.
pub const NO_RESPONSE: i32 = -3;

/// Label of [`BEFORE_SYN`].
pub const FAILED_BEFORE_SYN: &str = "failed before SYN";
/// Label of [`CLOSED`].
pub const CLOSED_IN_SYN_SENT: &str = "closed in SYN_SENT";

/// The failure code of a connect outcome, None for success.
pub fn code(outcome: &ConnectOutcome) -> Option<i32> {
    match *outcome {
        ConnectOutcome::Established => None,
        ConnectOutcome::Failed { errno } => Some(errno),
        ConnectOutcome::Closed => Some(CLOSED),
        ConnectOutcome::FailedBeforeSyn { errno } => Some(errno.unwrap_or(BEFORE_SYN)),
    }
}

/// How a failure code reads: "ECONNREFUSED", "failed before SYN", ….
pub fn name(code: i32) -> String {
    let name = match code {
        CLOSED => CLOSED_IN_SYN_SENT,
        BEFORE_SYN => FAILED_BEFORE_SYN,
        NO_RESPONSE => "closed with no response",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNRESET => "ECONNRESET",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EACCES => "EACCES",
        libc::EPERM => "EPERM",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPROTO => "EPROTO",
        libc::EINVAL => "EINVAL",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::ENOBUFS => "ENOBUFS",
        _ => return format!("errno {code}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes() {
        assert_eq!(name(libc::ECONNREFUSED), "ECONNREFUSED");
        assert_eq!(name(libc::ETIMEDOUT), "ETIMEDOUT");
        assert_eq!(name(9999), "errno 9999");
        assert_eq!(name(BEFORE_SYN), FAILED_BEFORE_SYN);
        assert_eq!(code(&ConnectOutcome::Established), None);
        assert_eq!(code(&ConnectOutcome::Closed), Some(CLOSED));
        assert_eq!(
            code(&ConnectOutcome::FailedBeforeSyn { errno: None }),
            Some(BEFORE_SYN)
        );
        assert_eq!(
            code(&ConnectOutcome::FailedBeforeSyn {
                errno: Some(libc::ENETUNREACH)
            }),
            Some(libc::ENETUNREACH)
        );
    }
}
