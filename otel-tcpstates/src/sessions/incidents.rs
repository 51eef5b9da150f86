//! What a socket went through inside a state: the incidents the kernel reported
//! (retransmissions, resets, errors, congestion states), kept per state span, at
//! most [`MAX_EVENTS`] of them, and counted per session.
use std::{borrow::Cow, mem};

/// Events one span keeps; later ones are only counted.
pub const MAX_EVENTS: usize = 64;
/// Room made for events at a time: a span's list grows by this much, so it
/// wastes at most this many slots (doubling would waste up to half).
const GROW_BY: usize = 8;

/// What kind of retransmission, as the socket's state and congestion state say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetransmitKind {
    /// A SYN sent again (SYN_SENT): its timer expired.
    Syn,
    /// A SYN-ACK sent again.
    SynAck,
    /// The retransmission timer expired (congestion state Loss).
    Timeout,
    /// Duplicate ACKs or SACKs marked it lost (Disorder, CWR, Recovery).
    Fast,
    /// A tail loss probe (congestion state Open).
    LossProbe,
    /// The congestion state is not known (its tracepoint is missing).
    Unknown,
}

impl RetransmitKind {
    /// The kind a data retransmission has in congestion state `ca_state`
    /// (`enum tcp_ca_state`), when that is known.
    pub fn of_data(ca_state: Option<u8>) -> Self {
        match ca_state {
            None => Self::Unknown,
            Some(0) => Self::LossProbe,
            Some(1..=3) => Self::Fast,
            Some(_) => Self::Timeout,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Syn => "syn",
            Self::SynAck => "synack",
            Self::Timeout => "timeout",
            Self::Fast => "fast",
            Self::LossProbe => "loss_probe",
            Self::Unknown => "unknown",
        }
    }
}

/// One incident, as a span event shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum What {
    /// `err` is the kernel's (negative) error when the retransmission failed.
    Retransmit {
        kind: RetransmitKind,
        err: i32,
    },
    ResetSent {
        reason: u32,
    },
    ResetReceived,
    Error {
        errno: i32,
    },
    Congestion {
        state: u8,
    },
    /// Not an incident: on the span of the request a connection was opened for,
    /// where its handshake ended.
    Established,
    /// Not an incident: on the same span, where the request's first segment went.
    RequestSent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanEvent {
    /// Kernel CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
    pub what: What,
}

/// The events of one state span.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanEvents {
    pub kept: Vec<SpanEvent>,
    /// Events not kept (OTLP's `dropped_events_count`): beyond [`MAX_EVENTS`],
    /// or past the session table's bound on all sockets' events.
    pub dropped: u32,
}

impl SpanEvents {
    /// Keeps `event` while the span has fewer than [`MAX_EVENTS`] and room: a
    /// free slot, or `free` more (what the table's bound on all sockets' event
    /// slots has left); counts it otherwise. `Some(slots)` it took when kept.
    pub fn add(&mut self, event: SpanEvent, free: usize) -> Option<usize> {
        let (len, slots) = (self.kept.len(), self.kept.capacity());
        if len < MAX_EVENTS && (len < slots || free > 0) {
            if len == slots {
                self.kept
                    .reserve_exact(GROW_BY.min(free).min(MAX_EVENTS - len));
            }
            self.kept.push(event);
            Some(self.kept.capacity() - slots)
        } else {
            self.dropped = self.dropped.saturating_add(1);
            None
        }
    }

    /// Heap bytes the events take.
    pub fn heap_bytes(&self) -> usize {
        self.kept.capacity() * size_of::<SpanEvent>()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.dropped == 0
    }

    /// Whether an error `errno` is among the events kept.
    pub fn has_error(&self, errno: i32) -> bool {
        self.kept.iter().any(|e| e.what == What::Error { errno })
    }

    /// Moves the events out, for the span that ends now: on the heap, and only
    /// when there are any (most spans have none).
    pub fn take(&mut self) -> Option<Box<SpanEvents>> {
        (!self.is_empty()).then(|| Box::new(mem::take(self)))
    }
}

/// What a session saw of incidents in all its states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IncidentCounts {
    /// Retransmissions sent (SYN-ACKs included): what the kernel's
    /// `total_retrans` counts, when each carried one segment.
    pub retransmits: u32,
    pub resets_sent: u32,
    pub resets_received: u32,
}

/// A congestion state's name (`enum tcp_ca_state`), as `ss` prints it.
pub fn congestion_name(state: u8) -> Cow<'static, str> {
    Cow::Borrowed(match state {
        0 => "open",
        1 => "disorder",
        2 => "cwr",
        3 => "recovery",
        4 => "loss",
        n => return Cow::Owned(n.to_string()),
    })
}

/// The name of a sent reset's `enum sk_rst_reason` (Linux 6.10+), as the
/// tracepoint prints it.
pub fn reset_reason_name(reason: u32) -> Cow<'static, str> {
    const NAMES: [&str; 25] = [
        "NOT_SPECIFIED",
        "NO_SOCKET",
        "TCP_INVALID_ACK_SEQUENCE",
        "TCP_RFC7323_PAWS",
        "TCP_TOO_OLD_ACK",
        "TCP_ACK_UNSENT_DATA",
        "TCP_FLAGS",
        "TCP_OLD_ACK",
        "TCP_ABORT_ON_DATA",
        "TCP_TIMEWAIT_SOCKET",
        "INVALID_SYN",
        "TCP_ABORT_ON_CLOSE",
        "TCP_ABORT_ON_LINGER",
        "TCP_ABORT_ON_MEMORY",
        "TCP_STATE",
        "TCP_KEEPALIVE_TIMEOUT",
        "TCP_DISCONNECT_WITH_DATA",
        "MPTCP_RST_EUNSPEC",
        "MPTCP_RST_EMPTCP",
        "MPTCP_RST_ERESOURCE",
        "MPTCP_RST_EPROHIBIT",
        "MPTCP_RST_EWQ2BIG",
        "MPTCP_RST_EBADPERF",
        "MPTCP_RST_EMIDDLEBOX",
        "ERROR",
    ];
    match NAMES.get(reason as usize) {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(reason.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_keeps_at_most_64_events_and_counts_the_rest() {
        let mut events = SpanEvents::default();
        assert!(events.take().is_none());
        let event = |ts_ns| SpanEvent {
            ts_ns,
            what: What::ResetReceived,
        };
        assert_eq!(events.add(event(0), usize::MAX), Some(8));
        for ts_ns in 1..70 {
            events.add(event(ts_ns), usize::MAX);
        }
        assert_eq!(events.add(event(70), usize::MAX), None);
        let taken = events.take().unwrap();
        assert_eq!((taken.kept.len(), taken.dropped), (MAX_EVENTS, 7));
        // Grown by steps, not doubled: 64 events take 64 slots.
        assert_eq!(taken.kept.capacity(), MAX_EVENTS);
        assert!(events.is_empty());
        // Without room in the table an event is counted, not kept.
        assert_eq!(events.add(event(0), 0), None);
        assert_eq!((events.kept.len(), events.dropped), (0, 1));
    }

    #[test]
    fn retransmit_kinds_follow_the_congestion_state() {
        assert_eq!(RetransmitKind::of_data(Some(4)), RetransmitKind::Timeout);
        assert_eq!(RetransmitKind::of_data(Some(3)), RetransmitKind::Fast);
        assert_eq!(RetransmitKind::of_data(Some(0)), RetransmitKind::LossProbe);
        assert_eq!(RetransmitKind::of_data(None), RetransmitKind::Unknown);
        assert_eq!(congestion_name(4), "loss");
        assert_eq!(reset_reason_name(12), "TCP_ABORT_ON_LINGER");
        assert_eq!(reset_reason_name(99), "99");
    }
}
