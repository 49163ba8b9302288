//! Failure kinds as small integer codes: a positive errno, or a negative
//! code for failures the kernel gave no errno for. Counting by code keeps
//! the per-event path free of allocation; names are made only for display.
use super::ConnectOutcome;

/// Closed in SYN_SENT without an error report (the caller gave up).
pub const CLOSED: i32 = -1;
/// Never reached SYN_SENT, errno unknown (on-demand probe not attached).
pub const BEFORE_SYN: i32 = -2;
/// Established, a request sent, then closed young with no response bytes.
pub const NO_RESPONSE: i32 = -3;
/// A UDP request (to a request/response peer) that got no reply before the
/// next one was sent.
pub const NO_REPLY: i32 = -4;
/// HTTP 4xx/5xx: `HTTP_BASE - status`.
pub const HTTP_BASE: i32 = -10_000;
/// DNS rcode ≠ 0: `DNS_BASE - rcode`.
pub const DNS_BASE: i32 = -20_000;
/// A PostgreSQL ErrorResponse (e.g. a failed authentication).
pub const POSTGRES_ERROR: i32 = -30_000;
/// A Redis error reply ("-ERR", "-WRONGPASS"…).
pub const REDIS_ERROR: i32 = -30_001;

/// DNS rcode names (RFC 1035, 6895).
fn rcode_name(rcode: i32) -> String {
    match rcode {
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("rcode {n}"),
    }
}

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
        NO_REPLY => "no reply",
        POSTGRES_ERROR => "PostgreSQL error",
        REDIS_ERROR => "Redis error",
        c if (HTTP_BASE - 599..=HTTP_BASE - 100).contains(&c) => {
            return format!("HTTP {}", HTTP_BASE - c);
        }
        c if (DNS_BASE - 15..DNS_BASE).contains(&c) => {
            return format!("DNS {}", rcode_name(DNS_BASE - c));
        }
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
