//! Why a connection failed: the semantic conventions' `error.type`, read off the
//! socket's last transition, the error the kernel had set on it by then, and the
//! resets seen.
use std::borrow::Cow;

use nix::errno::Errno;
use otel_tcpstates_common::tcp_state;

use crate::kernel::event::TcpState;

/// The reason a connection failed. A listener closing, or a connection closed
/// with FINs, has none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorType {
    /// An RST answered our SYN (ECONNREFUSED).
    ConnectionRefused,
    /// The SYN or data retries ran out (ETIMEDOUT).
    TimedOut,
    /// An RST arrived on a synchronized connection (ECONNRESET, EPIPE).
    ResetByPeer,
    /// We aborted it with an RST: `SO_LINGER` 0, a close with unread data.
    ResetSent,
    /// Server side: SYN_RECV → CLOSE without an RST.
    HandshakeFailed,
    /// The application closed it before the handshake completed, no error set.
    ConnectAborted,
    /// Any other error the kernel set on the socket.
    Errno(i32),
}

/// The facts a classification reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CloseFacts {
    /// The state the socket left for CLOSE.
    pub from: Option<TcpState>,
    /// `sk_err` as it entered CLOSE (0: none, or not readable).
    pub sk_err: i32,
    pub reset_received: bool,
    pub reset_sent: bool,
    /// An RST went out just after the CLOSE: the kernel aborted the connection
    /// (`tcp_need_reset` on close, data that arrived after our FIN).
    pub aborted: bool,
}

impl ErrorType {
    /// Classifies a connection that reached CLOSE from `facts.from`.
    pub fn of(facts: CloseFacts) -> Option<Self> {
        let from = facts.from?.0;
        if from == tcp_state::LISTEN {
            return None;
        }
        let errno = Errno::from_raw(facts.sk_err);
        Some(match errno {
            Errno::ECONNREFUSED => Self::ConnectionRefused,
            Errno::ETIMEDOUT => Self::TimedOut,
            // Whatever came before: a reset "received" in FIN_WAIT1/2 with its
            // ECONNRESET is the kernel's own abort on data (tcp_reset), which the
            // RST it sends then follows; a peer's RST is never answered with one.
            _ if facts.aborted => Self::ResetSent,
            Errno::ECONNRESET | Errno::EPIPE if facts.reset_received => Self::ResetByPeer,
            Errno::ECONNRESET | Errno::EPIPE if facts.reset_sent => Self::ResetSent,
            Errno::ECONNRESET | Errno::EPIPE => Self::ResetByPeer,
            _ if facts.sk_err != 0 => Self::Errno(facts.sk_err),
            // No error set: what the transition and the resets seen tell.
            _ if facts.reset_received && from == tcp_state::SYN_SENT => Self::ConnectionRefused,
            _ if facts.reset_received => Self::ResetByPeer,
            _ if facts.reset_sent => Self::ResetSent,
            _ => match from {
                tcp_state::SYN_SENT => Self::ConnectAborted,
                tcp_state::SYN_RECV => Self::HandshakeFailed,
                // Straight to CLOSE from here is an abort: the kernel sends an RST
                // (tcp_need_reset), just after it entered CLOSE.
                tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::FIN_WAIT1 => {
                    Self::ResetSent
                }
                _ => return None,
            },
        })
    }

    /// Whether the kernel may send an RST right after this CLOSE: the socket's
    /// last span waits for it. With no error set, a CLOSE from these states is an
    /// abort (`tcp_need_reset`), or, from FIN_WAIT2, the move into the kernel's
    /// time-wait socket, which resets a request that arrives after our FIN (the
    /// keep-alive race). From FIN_WAIT1/2 with ECONNRESET and a reset seen, it may
    /// be the kernel's abort on such data (TCPAbortOnData), or a peer's RST.
    pub fn awaits_reset(facts: CloseFacts) -> bool {
        let clean = facts.sk_err == 0 && !facts.reset_received;
        match facts.from.map(|s| s.0) {
            Some(tcp_state::ESTABLISHED | tcp_state::CLOSE_WAIT | tcp_state::SYN_RECV) => clean,
            Some(tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2) => {
                clean || (facts.sk_err == Errno::ECONNRESET as i32 && facts.reset_received)
            }
            _ => false,
        }
    }

    /// The `error.type` value.
    pub fn as_str(self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Self::ConnectionRefused => "connection_refused",
            Self::TimedOut => "timed_out",
            Self::ResetByPeer => "reset_by_peer",
            Self::ResetSent => "reset_sent",
            Self::HandshakeFailed => "handshake_failed",
            Self::ConnectAborted => "connect_aborted",
            Self::Errno(n) => return errno_name(n),
        })
    }

    /// The span status message: the reason in words.
    pub fn message(self) -> Cow<'static, str> {
        match self {
            Self::ConnectionRefused => "connection refused: an RST answered the SYN".into(),
            Self::TimedOut => "timed out: the retransmissions ran out (ETIMEDOUT)".into(),
            Self::ResetByPeer => "reset by the peer: an RST arrived".into(),
            Self::ResetSent => "reset sent: the connection was aborted with an RST".into(),
            Self::HandshakeFailed => "handshake did not complete (SYN_RECV -> CLOSE)".into(),
            Self::ConnectAborted => "closed before the handshake completed".into(),
            Self::Errno(n) => format!("{}: {}", errno_name(n), Errno::from_raw(n).desc()).into(),
        }
    }
}

/// An errno's name, e.g. `EHOSTUNREACH`; a number the C library does not know
/// prints as one.
pub fn errno_name(n: i32) -> Cow<'static, str> {
    match Errno::from_raw(n) {
        Errno::UnknownErrno => Cow::Owned(format!("errno {n}")),
        errno => Cow::Owned(format!("{errno:?}")),
    }
}

#[cfg(test)]
mod tests {
    use tcp_state::*;

    use super::*;

    fn of(from: u8, sk_err: i32, received: bool, sent: bool) -> Option<ErrorType> {
        ErrorType::of(CloseFacts {
            from: Some(TcpState(from)),
            sk_err,
            reset_received: received,
            reset_sent: sent,
            aborted: false,
        })
    }

    #[test]
    fn the_kernels_error_decides_first() {
        assert_eq!(
            of(SYN_SENT, 111, true, false),
            Some(ErrorType::ConnectionRefused)
        );
        assert_eq!(of(SYN_SENT, 110, false, false), Some(ErrorType::TimedOut));
        assert_eq!(
            of(ESTABLISHED, 110, false, false),
            Some(ErrorType::TimedOut)
        );
        assert_eq!(
            of(ESTABLISHED, 104, true, false),
            Some(ErrorType::ResetByPeer)
        );
        assert_eq!(
            of(CLOSE_WAIT, 32, true, false),
            Some(ErrorType::ResetByPeer)
        );
        assert_eq!(of(SYN_SENT, 113, false, false), Some(ErrorType::Errno(113)));
        assert_eq!(ErrorType::Errno(113).as_str(), "EHOSTUNREACH");
        assert_eq!(
            ErrorType::Errno(113).message(),
            "EHOSTUNREACH: No route to host"
        );
    }

    #[test]
    fn without_an_error_the_transition_and_resets_tell() {
        assert_eq!(of(ESTABLISHED, 0, false, false), Some(ErrorType::ResetSent));
        assert_eq!(of(CLOSE_WAIT, 0, false, true), Some(ErrorType::ResetSent));
        assert_eq!(
            of(SYN_RECV, 0, false, false),
            Some(ErrorType::HandshakeFailed)
        );
        assert_eq!(of(SYN_RECV, 0, false, true), Some(ErrorType::ResetSent));
        assert_eq!(
            of(SYN_SENT, 0, false, false),
            Some(ErrorType::ConnectAborted)
        );
        assert_eq!(
            of(SYN_SENT, 0, true, false),
            Some(ErrorType::ConnectionRefused)
        );
        // Normal closes, and a listener closing, are no failure.
        for from in [LAST_ACK, FIN_WAIT2, CLOSING, TIME_WAIT, LISTEN] {
            assert_eq!(of(from, 0, false, false), None, "{from}");
        }
        assert_eq!(of(LISTEN, 104, true, false), None);
        assert_eq!(ErrorType::of(CloseFacts::default()), None);
    }

    #[test]
    fn an_rst_sent_after_the_close_is_an_abort_whatever_came_before() {
        let aborted = |from: u8, sk_err: i32, received: bool| {
            ErrorType::of(CloseFacts {
                from: Some(TcpState(from)),
                sk_err,
                reset_received: received,
                reset_sent: true,
                aborted: true,
            })
        };
        // Closed from FIN_WAIT2: data after our FIN, or a close with unread data.
        assert_eq!(aborted(FIN_WAIT2, 0, false), Some(ErrorType::ResetSent));
        // The kernel's tcp_reset on data in FIN_WAIT1/2 set ECONNRESET first.
        assert_eq!(aborted(FIN_WAIT1, 104, true), Some(ErrorType::ResetSent));
        assert_eq!(aborted(FIN_WAIT2, 104, true), Some(ErrorType::ResetSent));
        assert_eq!(aborted(LISTEN, 0, false), None);
    }

    #[test]
    fn only_an_abort_waits_for_its_reset() {
        let facts = |from: u8, sk_err: i32| CloseFacts {
            from: Some(TcpState(from)),
            sk_err,
            ..CloseFacts::default()
        };
        assert!(ErrorType::awaits_reset(facts(ESTABLISHED, 0)));
        assert!(ErrorType::awaits_reset(facts(SYN_RECV, 0)));
        assert!(!ErrorType::awaits_reset(facts(ESTABLISHED, 104)));
        assert!(!ErrorType::awaits_reset(facts(LAST_ACK, 0)));
        assert!(!ErrorType::awaits_reset(facts(SYN_SENT, 0)));
        assert!(!ErrorType::awaits_reset(facts(FIN_WAIT1, 110)));
        // Into the time-wait socket, which resets data that arrives after our FIN.
        assert!(ErrorType::awaits_reset(facts(FIN_WAIT2, 0)));
        // The kernel's own reset on data after our FIN, or a peer's RST.
        let reset = |from: u8| CloseFacts {
            reset_received: true,
            ..facts(from, 104)
        };
        assert!(ErrorType::awaits_reset(reset(FIN_WAIT2)));
        assert!(ErrorType::awaits_reset(reset(FIN_WAIT1)));
        assert!(!ErrorType::awaits_reset(reset(ESTABLISHED)));
        assert!(!ErrorType::awaits_reset(reset(CLOSE_WAIT)));
    }
}
