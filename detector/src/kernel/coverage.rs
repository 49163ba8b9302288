//! What this kernel lets stormguard see: one entry per signal, with the
//! hooks that give it here, what stands in where the first choice is
//! missing, and what detection loses where nothing can.
//!
//! Kernels differ (6.1 has no `sock_send_length`, 6.12 no `group_dead`);
//! a daemon that refuses to start over an optional signal is worth nothing
//! on that host, and one that silently sees less is worse. So every gap is
//! a warning at start, and `status`, `doctor` and the metrics list them.
use serde::Serialize;

/// One thing stormguard observes, and how this kernel gives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signal {
    /// Short name, also the metrics label.
    pub name: &'static str,
    /// Without it connect storms cannot be seen: the daemon will not start.
    pub required: bool,
    /// Attached only while something is suspect.
    pub on_demand: bool,
    /// Hooks that give it on this kernel (attached, or loaded for on-demand).
    pub via: Vec<String>,
    /// Set when a stand-in or an approximation is used, saying which.
    pub fallback: Option<String>,
    /// Hooks that failed, each with why.
    pub problems: Vec<String>,
    /// What detection loses without this signal.
    pub without: &'static str,
}

impl Signal {
    pub fn new(name: &'static str, without: &'static str) -> Self {
        Signal {
            name,
            required: false,
            on_demand: false,
            via: Vec::new(),
            fallback: None,
            problems: Vec::new(),
            without,
        }
    }

    /// True when at least one hook gives it.
    pub fn available(&self) -> bool {
        !self.via.is_empty()
    }

    /// True when some hook of it failed (missing or partial).
    pub fn degraded(&self) -> bool {
        !self.problems.is_empty()
    }

    /// One line for logs and `status`: "sends: via … (fallback …)" or
    /// "sends: MISSING (problem) — without it …".
    pub fn describe(&self) -> String {
        let mut s = format!("{}: ", self.name);
        if self.available() {
            s += &format!("via {}", self.via.join(", "));
            if let Some(f) = &self.fallback {
                s += &format!(" ({f})");
            }
            if self.degraded() {
                s += &format!("; partial: {}", self.problems.join("; "));
            }
        } else {
            s += &format!("MISSING ({}) — {}", self.problems.join("; "), self.without);
        }
        s
    }
}

/// Names of the signals, in the order they are listed.
pub mod name {
    pub const CONNECTS: &str = "connects";
    pub const CONNECT_ERRORS: &str = "connect_errors";
    pub const RESETS: &str = "resets";
    pub const SYN_RETRANSMITS: &str = "syn_retransmits";
    pub const SENDS: &str = "sends";
    pub const RECEIVES: &str = "receives";
    pub const PROCESSES: &str = "processes";
    pub const UDP_DESTINATIONS: &str = "udp_destinations";
    pub const SYSCALL_PROBES: &str = "syscall_probes";
    pub const TLS_PLAINTEXT: &str = "tls_plaintext";
}

/// What is lost without each signal.
pub mod without {
    pub const CONNECTS: &str = "no connect attempts are seen: stormguard cannot detect storms";
    pub const CONNECT_ERRORS: &str = "refused or unreachable connects show as `closed in SYN_SENT` without their errno, and ICMP errors on UDP are not seen";
    pub const RESETS: &str = "a reset of an established connection is not told from a close";
    pub const SYN_RETRANSMITS: &str = "SYN retransmits of a connect that times out are not counted";
    pub const SENDS: &str =
        "UDP/DNS storms and keep-alive request storms are not seen; only connect storms are";
    pub const RECEIVES: &str = "replies are not seen: keep-alive exchanges, UDP replies and HTTP/DNS/SQL error replies are not judged";
    pub const PROCESSES: &str = "parents, names and short-lived process roll-ups are not known";
    pub const UDP_DESTINATIONS: &str = "unconnected UDP sends have no destination";
    pub const SYSCALL_PROBES: &str =
        "suspects get no syscall rates, request fingerprints or pre-SYN errnos";
    pub const TLS_PLAINTEXT: &str = "TLS requests and replies are judged by their lengths only";
}

/// This kernel's release (`uname -r`), for messages.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "(unknown)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_available_fallback_and_missing_signals() {
        let mut s = Signal::new(name::SENDS, without::SENDS);
        s.problems
            .push("tracepoint sock:sock_send_length: absent".into());
        assert!(!s.available());
        let line = s.describe();
        assert!(line.starts_with("sends: MISSING (tracepoint sock:sock_send_length: absent)"));
        assert!(line.contains("only connect storms"), "{line}");
        s.via.push("fexit tcp_sendmsg".into());
        s.fallback = Some("sock_send_length is absent (Linux < 6.3)".into());
        assert!(s.available() && s.degraded());
        assert_eq!(
            s.describe(),
            "sends: via fexit tcp_sendmsg (sock_send_length is absent (Linux < 6.3)); partial: tracepoint sock:sock_send_length: absent"
        );
    }
}
