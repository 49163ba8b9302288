//! What the application saw: the outcome read from the first bytes of a
//! reply (HTTP/1.x status, DNS rcode, PostgreSQL ErrorResponse, Redis error)
//! and the name a DNS query asks. A retry loop whose connects all succeed
//! fails only here — a 503 on every request, SERVFAIL on every lookup, a
//! failed login on every connection.
//!
//! Pure and total: any bytes parse to something, and bytes that do not look
//! like a known protocol are [`Reply::Unknown`] — never a failure, never a
//! panic (property-tested below).
use serde::{Deserialize, Serialize};

use super::failure;

/// A reply's outcome, as far as its first bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "proto")]
pub enum Reply {
    /// Nothing was read (the process was not probed).
    #[default]
    NotRead,
    /// Bytes were read but match no protocol we know.
    Unknown,
    /// An HTTP/1.x status line.
    Http { status: u16 },
    /// A DNS response header: its rcode and answer count.
    Dns { rcode: u8, answers: u16 },
    /// A PostgreSQL backend message: `error` for an ErrorResponse ('E'),
    /// with its SQLSTATE when the first bytes hold it.
    Postgres { error: bool, sqlstate: [u8; 5] },
    /// A RESP reply: `error` for a "-ERR …"-style error reply.
    Redis { error: bool },
}

impl Reply {
    /// Parses the first bytes of a reply from port `port` (DNS is told by
    /// its port: its header has no magic).
    pub fn parse(head: &[u8], port: u16) -> Reply {
        if head.iter().all(|b| *b == 0) {
            return Reply::Unknown;
        }
        if port == 53 {
            return dns(head).unwrap_or(Reply::Unknown);
        }
        http(head)
            .or_else(|| postgres(head))
            .or_else(|| redis(head))
            .unwrap_or(Reply::Unknown)
    }

    /// The failure code of a reply that says the request failed: HTTP 4xx
    /// and 5xx, DNS SERVFAIL/NXDOMAIN/REFUSED…, a PostgreSQL error, a
    /// Redis error. None for success and for anything unknown.
    pub fn failure(&self) -> Option<i32> {
        match *self {
            Reply::Http { status } if (400..=599).contains(&status) => {
                Some(failure::HTTP_BASE - i32::from(status))
            }
            Reply::Dns { rcode, .. } if rcode != 0 => Some(failure::DNS_BASE - i32::from(rcode)),
            Reply::Postgres { error: true, .. } => Some(failure::POSTGRES_ERROR),
            Reply::Redis { error: true } => Some(failure::REDIS_ERROR),
            _ => None,
        }
    }

    /// Whether anything was read and recognised.
    pub fn is_known(&self) -> bool {
        !matches!(self, Reply::NotRead | Reply::Unknown)
    }
}

fn digit(b: u8) -> Option<u16> {
    b.is_ascii_digit().then(|| u16::from(b - b'0'))
}

/// "HTTP/1.1 503 Service Unavailable".
fn http(h: &[u8]) -> Option<Reply> {
    let rest = h.strip_prefix(b"HTTP/1.")?;
    if rest.len() < 6 || !rest[0].is_ascii_digit() || rest[1] != b' ' {
        return None;
    }
    let status = digit(rest[2])? * 100 + digit(rest[3])? * 10 + digit(rest[4])?;
    (100..=599)
        .contains(&status)
        .then_some(Reply::Http { status })
}

/// A DNS response: QR set, opcode query; rcode in the low nibble of byte 3.
fn dns(h: &[u8]) -> Option<Reply> {
    if h.len() < 12 || h[2] & 0x80 == 0 || (h[2] >> 3) & 0x0f != 0 {
        return None;
    }
    Some(Reply::Dns {
        rcode: h[3] & 0x0f,
        answers: u16::from_be_bytes([h[6], h[7]]),
    })
}

/// A PostgreSQL ErrorResponse: 'E', a 4-byte length, then fields led by a
/// type byte ('S' severity, 'V', 'C' code…). Only 'E' with a sane length
/// and a known first field counts, so random bytes starting with 'E' do
/// not.
fn postgres(h: &[u8]) -> Option<Reply> {
    if h.len() < 8 || h[0] != b'E' {
        return None;
    }
    let len = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
    if !(8..=1 << 20).contains(&len) || !matches!(h[5], b'S' | b'V' | b'C' | b'M') {
        return None;
    }
    let mut sqlstate = [0u8; 5];
    if let Some(i) = h.windows(2).position(|w| w[0] == 0 && w[1] == b'C')
        && let Some(code) = h.get(i + 2..i + 7)
        && code.iter().all(u8::is_ascii_alphanumeric)
    {
        sqlstate.copy_from_slice(code);
    }
    Some(Reply::Postgres {
        error: true,
        sqlstate,
    })
}

/// A RESP error: '-', then an upper-case word ("ERR", "WRONGPASS",
/// "NOAUTH"…) and a space or CRLF.
fn redis(h: &[u8]) -> Option<Reply> {
    let rest = h.strip_prefix(b"-")?;
    let word = rest.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if word < 2 {
        return None;
    }
    matches!(rest.get(word), Some(b' ') | Some(b'\r') | None)
        .then_some(Reply::Redis { error: true })
}

/// The name a DNS query asks, from the bytes after its 12-byte header
/// (labels: length byte, then that many bytes; ends at a zero length).
/// Truncated names end with "…".
pub fn dns_name(question: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut i = 0;
    while let Some(&len) = question.get(i) {
        if len == 0 {
            return (!out.is_empty()).then_some(out);
        }
        if len > 63 {
            return None;
        }
        let label = &question[i + 1..question.len().min(i + 1 + len as usize)];
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(std::str::from_utf8(label).ok()?);
        if label.len() < len as usize {
            out.push('…');
            return Some(out);
        }
        i += 1 + len as usize;
    }
    (!out.is_empty()).then(|| out + "…")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn head(bytes: &[u8]) -> [u8; 32] {
        let mut h = [0u8; 32];
        let n = bytes.len().min(32);
        h[..n].copy_from_slice(&bytes[..n]);
        h
    }

    #[test]
    fn http_status_lines() {
        let r = Reply::parse(&head(b"HTTP/1.1 503 Service Unavailable\r\n"), 8080);
        assert_eq!(r, Reply::Http { status: 503 });
        assert_eq!(failure::name(r.failure().unwrap()), "HTTP 503");
        let ok = Reply::parse(&head(b"HTTP/1.0 200 OK\r\n"), 80);
        assert_eq!(ok, Reply::Http { status: 200 });
        assert_eq!(ok.failure(), None);
        assert_eq!(
            Reply::parse(&head(b"HTTP/1.1 429 Too Many"), 80).failure(),
            Some(failure::HTTP_BASE - 429)
        );
        assert_eq!(Reply::parse(&head(b"HTTP/1.1 99x"), 80), Reply::Unknown);
        assert_eq!(Reply::parse(&head(b"HTTP/2 503"), 80), Reply::Unknown);
    }

    #[test]
    fn dns_rcodes() {
        // id, flags 0x8182 (response, SERVFAIL), 1 question, 0 answers.
        let servfail = [0x12, 0x34, 0x81, 0x82, 0, 1, 0, 0, 0, 0, 0, 0];
        let r = Reply::parse(&head(&servfail), 53);
        assert_eq!(
            r,
            Reply::Dns {
                rcode: 2,
                answers: 0
            }
        );
        assert_eq!(failure::name(r.failure().unwrap()), "DNS SERVFAIL");
        let refused = [0, 0, 0x81, 0x85, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(
            failure::name(Reply::parse(&head(&refused), 53).failure().unwrap()),
            "DNS REFUSED"
        );
        let ok = [0, 0, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        assert_eq!(Reply::parse(&head(&ok), 53).failure(), None);
        // A query (QR clear) is not a response.
        let query = [0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        assert_eq!(Reply::parse(&head(&query), 53), Reply::Unknown);
    }

    #[test]
    fn postgres_error_response() {
        let mut msg = vec![b'E', 0, 0, 0, 100];
        msg.extend_from_slice(b"SFATAL\0VFATAL\0C28P01\0Mpassword");
        let r = Reply::parse(&head(&msg), 5432);
        assert_eq!(
            r,
            Reply::Postgres {
                error: true,
                sqlstate: *b"28P01"
            }
        );
        assert_eq!(failure::name(r.failure().unwrap()), "PostgreSQL error");
        // 'R' (authentication request) is not an error.
        assert_eq!(
            Reply::parse(&head(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0]), 5432).failure(),
            None
        );
        // 'E' with a silly length is not PostgreSQL.
        assert_eq!(
            Reply::parse(&head(b"Eat more vegetables"), 5432),
            Reply::Unknown
        );
    }

    #[test]
    fn redis_errors() {
        for e in [
            &b"-ERR unknown command\r\n"[..],
            b"-WRONGPASS invalid",
            b"-NOAUTH\r\n",
        ] {
            let r = Reply::parse(&head(e), 6379);
            assert_eq!(r, Reply::Redis { error: true }, "{e:?}");
            assert_eq!(failure::name(r.failure().unwrap()), "Redis error");
        }
        assert_eq!(Reply::parse(&head(b"+OK\r\n"), 6379).failure(), None);
        assert_eq!(Reply::parse(&head(b"-1 degrees"), 6379), Reply::Unknown);
    }

    #[test]
    fn unknown_and_unread() {
        assert_eq!(Reply::parse(&[0; 32], 80), Reply::Unknown);
        assert_eq!(Reply::parse(b"\x16\x03\x03\x00\x5a", 443), Reply::Unknown);
        assert_eq!(Reply::Unknown.failure(), None);
        assert_eq!(Reply::NotRead.failure(), None);
        assert!(!Reply::Unknown.is_known());
    }

    #[test]
    fn dns_names() {
        let q = b"\x05storm\x07example\x07invalid\x00\x00\x01\x00\x01";
        assert_eq!(dns_name(q).as_deref(), Some("storm.example.invalid"));
        assert_eq!(dns_name(&q[..14]).as_deref(), Some("storm.example…"));
        assert_eq!(dns_name(b"\x00"), None);
        assert_eq!(dns_name(b"\xff\x00"), None);
        assert_eq!(dns_name(b"\x03a b\x00"), None);
    }

    proptest! {
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40), port in any::<u16>()) {
            let r = Reply::parse(&bytes, port);
            // Failures need a recognised protocol.
            if r.failure().is_some() {
                prop_assert!(r.is_known());
            }
            let _ = dns_name(&bytes);
        }
    }
}
