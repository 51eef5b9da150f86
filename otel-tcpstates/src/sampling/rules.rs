//! Keep rules: what about a whole connection, known when it ends, keeps its trace
//! whatever the probability decision said.
use crate::sessions::table::Session;

/// Which rules keep a trace; names in the root's `tcpstates.sampling.kept_by`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeptBy(u8);

impl KeptBy {
    pub const ERROR: Self = Self(1);
    pub const RETRANSMIT: Self = Self(2);
    pub const SLOW_HANDSHAKE: Self = Self(4);
    pub const LONG_LIVED: Self = Self(8);
    pub const SAMPLED_REQUEST: Self = Self(16);
    const NAMES: [(Self, &'static str); 5] = [
        (Self::ERROR, "error"),
        (Self::RETRANSMIT, "retransmit"),
        (Self::SLOW_HANDSHAKE, "slow_handshake"),
        (Self::LONG_LIVED, "long_lived"),
        (Self::SAMPLED_REQUEST, "sampled_request"),
    ];

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn contains(self, rule: Self) -> bool {
        self.0 & rule.0 == rule.0
    }

    fn with(self, rule: Self, fired: bool) -> Self {
        if fired { self | rule } else { self }
    }

    /// The rules' names, comma-joined in a fixed order: `error,slow_handshake`.
    pub fn names(self) -> String {
        let mut names = String::new();
        for (rule, name) in Self::NAMES {
            if self.contains(rule) {
                if !names.is_empty() {
                    names.push(',');
                }
                names.push_str(name);
            }
        }
        names
    }
}

impl std::ops::BitOr for KeptBy {
    type Output = Self;

    fn bitor(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// The rules in force; each can be turned off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeepRules {
    /// Connections that ended in error (refused, reset, a handshake that failed).
    pub errors: bool,
    /// `error.type` values the error rule leaves to probability.
    pub errors_except: Vec<String>,
    /// Connections the kernel retransmitted on (`total_retrans` > 0 at CLOSE).
    pub retransmits: bool,
    /// Connections whose handshake (SYN_SENT or SYN_RECV) took at least this long.
    pub slow_handshake_ns: Option<u64>,
    /// Connections that lived at least this long.
    pub longer_than_ns: Option<u64>,
    /// Connections that carried a request its application sampled (with
    /// links): every link from a request's trace then leads to its connection.
    pub sampled_requests: bool,
}

impl Default for KeepRules {
    fn default() -> Self {
        Self {
            errors: true,
            errors_except: Vec::new(),
            retransmits: true,
            slow_handshake_ns: Some(100_000_000),
            longer_than_ns: None,
            sampled_requests: true,
        }
    }
}

impl KeepRules {
    /// Whether any rule is on: otherwise nothing needs to wait for a session's end.
    pub fn any(&self) -> bool {
        self.errors
            || self.retransmits
            || self.slow_handshake_ns.is_some()
            || self.longer_than_ns.is_some()
            || self.sampled_requests
    }

    /// The rules that keep `session`, which ended at kernel time `end_ns`.
    pub fn check(&self, session: &Session, end_ns: u64) -> KeptBy {
        let at_least = |value: Option<u64>, bound: Option<u64>| matches!((value, bound), (Some(value), Some(bound)) if value >= bound);
        KeptBy::default()
            .with(
                KeptBy::ERROR,
                self.errors
                    && session
                        .error
                        .is_some_and(|e| !self.errors_except.iter().any(|x| *x == e.as_str())),
            )
            .with(
                KeptBy::RETRANSMIT,
                self.retransmits
                    && (session.counts.retransmits > 0
                        || session.facts.is_some_and(|f| f.total_retrans > 0)),
            )
            .with(
                KeptBy::SLOW_HANDSHAKE,
                at_least(session.handshake_ns, self.slow_handshake_ns),
            )
            .with(
                KeptBy::LONG_LIVED,
                at_least(
                    Some(end_ns.saturating_sub(session.birth_ns)),
                    self.longer_than_ns,
                ),
            )
            .with(
                KeptBy::SAMPLED_REQUEST,
                self.sampled_requests && session.requests.as_ref().is_some_and(|r| r.seen > 0),
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_joined_in_a_fixed_order() {
        let all = KeptBy::LONG_LIVED
            .with(KeptBy::ERROR, true)
            .with(KeptBy::SLOW_HANDSHAKE, true)
            .with(KeptBy::RETRANSMIT, false);
        assert_eq!(all.names(), "error,slow_handshake,long_lived");
        assert_eq!(KeptBy::default().names(), "");
        assert!(KeptBy::default().is_empty());
    }
}
