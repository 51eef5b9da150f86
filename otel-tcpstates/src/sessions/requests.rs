//! The sampled requests of one socket: each becomes a `tcp.request` span in its
//! application's own trace, timed by the kernel from the request's first segment
//! (or from the connection's start, when the connection was opened for it) to
//! its answer's first segment, with the incidents in between.
use crate::{
    kernel::{event::TcpState, traceparent::Link},
    sessions::{incidents::SpanEvents, links::Added, outcome::ErrorType},
};

/// Requests a socket may have in flight at once (HTTP/1.1 pipelining, HTTP/2
/// streams); more are counted, not kept. Room is taken one request at a time,
/// and the table bounds all sockets' requests together.
pub const MAX_PENDING: usize = 16;
/// Request spans made for traceparents the socket carried before (a retry, or a
/// proxy or pooled client that reuses one context): at most this many per
/// socket, so a context that repeats does not grow its trace without bound.
pub const MAX_REPEATS: u16 = 4;

/// The handshake a request waited for: the connection was opened for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handshake {
    /// SYN_SENT (the client's) or SYN_RECV (the server's).
    pub state: TcpState,
    /// When it ended (ESTABLISHED), if it did before the request's span ended.
    pub end_ns: Option<u64>,
}

/// A sampled request in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub link: Link,
    /// 0-based among the socket's request spans: names its span.
    pub index: u32,
    /// Where its span starts: the request's first segment, or the connection's
    /// start when the connection was opened for it.
    pub start_ns: u64,
    /// When the request's first segment went through the socket.
    pub sent_ns: u64,
    /// Set when the connection was opened for this request.
    pub handshake: Option<Handshake>,
    /// The incidents while it was in flight (the handshake's too).
    pub events: SpanEvents,
    /// Segments retransmitted while it was in flight.
    pub retransmits: u32,
}

/// A request whose span ends: its answer came, or its connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestEnded {
    pub request: Request,
    pub end_ns: u64,
    /// The answer's first segment ended it (else the connection's end did).
    pub answered: bool,
    /// The connection's state then.
    pub state: TcpState,
    /// How the connection failed, when it ended in error with the request in
    /// flight.
    pub error: Option<ErrorType>,
}

/// The sampled requests of one socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// In flight, oldest first.
    pub pending: Vec<Request>,
    /// Sampled requests seen (what the `sampled_request` keep rule looks at).
    pub seen: u32,
    /// Request spans made so far: numbers the next.
    pub made: u32,
    /// Request spans not made (past [`MAX_PENDING`] or [`MAX_REPEATS`], or the
    /// table's bound).
    pub not_kept: u32,
    /// Spans made for traceparents seen before on the socket.
    repeats: u16,
    /// The parent id of the last traceparent the socket's links could not keep
    /// (past their 64): repeats of it are told by it alone (a parent id is 64
    /// random bits: enough to tell, in 8 bytes a socket).
    last_unkept: Option<[u8; 8]>,
}

/// Whether a sampled request gets a span, given what the socket's links made of
/// its traceparent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Counted in [`Requests::not_kept`].
    No,
}

impl Requests {
    /// A sampled request seen: whether it gets a span. `added`: what the
    /// socket's links made of its traceparent; `room`: whether the socket and
    /// the table have room for one more request in flight.
    pub fn admit(&mut self, link: &Link, added: Added, room: bool) -> Admit {
        self.seen = self.seen.saturating_add(1);
        let repeat = match added {
            Added::Kept { .. } => false,
            Added::Known => true,
            Added::NotKept => self.last_unkept.replace(link.span_id) == Some(link.span_id),
        };
        if !room || self.pending.len() >= MAX_PENDING || (repeat && self.repeats >= MAX_REPEATS) {
            self.not_kept = self.not_kept.saturating_add(1);
            return Admit::No;
        }
        if repeat {
            self.repeats += 1;
        }
        Admit::Yes
    }

    /// Starts the span of an admitted request.
    pub fn start(&mut self, request: Request) {
        self.made = self.made.saturating_add(1);
        // One slot at a time (a first push would make room for 4): most
        // sockets have one request in flight at most.
        self.pending.reserve_exact(1);
        self.pending.push(request);
    }

    /// The request in flight the other way from `answer_sent` (whether the
    /// answer went out of the socket) that an answer ends: the one whose
    /// parent id is `of` when the answer names it (an HTTP/2 stream's, on a
    /// connection that multiplexes), else the oldest.
    pub fn answered(&mut self, answer_sent: bool, of: Option<[u8; 8]>) -> Option<Request> {
        use crate::kernel::traceparent::Direction;
        let at = self.pending.iter().position(|r| {
            (r.link.direction == Direction::Received) == answer_sent
                && of.is_none_or(|id| r.link.span_id == id)
        })?;
        let request = self.pending.remove(at);
        if self.pending.is_empty() {
            // Most sockets have no request in flight most of the time: their
            // slot goes back (112 bytes a socket, over the table).
            self.pending = Vec::new();
        }
        Some(request)
    }

    /// Heap bytes the requests in flight take, their events too.
    pub fn heap_bytes(&self) -> usize {
        self.pending.capacity() * size_of::<Request>()
            + self
                .pending
                .iter()
                .map(|r| r.events.heap_bytes())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::traceparent::Direction;

    fn link(n: u8, direction: Direction) -> Link {
        Link {
            trace_id: [n; 16],
            span_id: [n; 8],
            trace_flags: 1,
            direction,
            method: 1,
        }
    }

    fn request(n: u8, direction: Direction) -> Request {
        Request {
            link: link(n, direction),
            index: u32::from(n),
            start_ns: 0,
            sent_ns: 0,
            handshake: None,
            events: SpanEvents::default(),
            retransmits: 0,
        }
    }

    #[test]
    fn repeats_of_a_context_are_bounded_and_counted() {
        let mut requests = Requests::default();
        let kept = Added::Kept { slots: 0 };
        assert_eq!(
            requests.admit(&link(1, Direction::Sent), kept, true),
            Admit::Yes
        );
        for _ in 0..MAX_REPEATS {
            assert_eq!(
                requests.admit(&link(1, Direction::Sent), Added::Known, true),
                Admit::Yes
            );
        }
        assert_eq!(
            requests.admit(&link(1, Direction::Sent), Added::Known, true),
            Admit::No
        );
        // New contexts still get theirs.
        assert_eq!(
            requests.admit(&link(2, Direction::Sent), kept, true),
            Admit::Yes
        );
        assert_eq!((requests.seen, requests.not_kept), (7, 1));
    }

    #[test]
    fn a_context_the_links_could_not_keep_is_a_repeat_when_it_comes_again() {
        let mut requests = Requests::default();
        let unkept = link(9, Direction::Sent);
        assert_eq!(requests.admit(&unkept, Added::NotKept, true), Admit::Yes);
        for _ in 0..MAX_REPEATS {
            assert_eq!(requests.admit(&unkept, Added::NotKept, true), Admit::Yes);
        }
        assert_eq!(requests.admit(&unkept, Added::NotKept, true), Admit::No);
        assert_eq!(requests.not_kept, 1);
    }

    #[test]
    fn in_flight_requests_are_bounded_and_answered_oldest_first_by_direction() {
        let mut requests = Requests::default();
        for n in 0..MAX_PENDING as u8 {
            assert_eq!(
                requests.admit(&link(n, Direction::Sent), Added::Kept { slots: 0 }, true),
                Admit::Yes
            );
            requests.start(request(n, Direction::Sent));
        }
        assert_eq!(
            requests.admit(&link(99, Direction::Sent), Added::Kept { slots: 0 }, true),
            Admit::No
        );
        assert_eq!(
            requests.admit(&link(98, Direction::Sent), Added::Kept { slots: 0 }, false),
            Admit::No
        );
        // A request sent is answered by a segment received.
        assert_eq!(requests.answered(true, None), None);
        assert_eq!(requests.answered(false, None).map(|r| r.index), Some(0));
        assert_eq!(requests.answered(false, None).map(|r| r.index), Some(1));
        assert_eq!(requests.pending.len(), MAX_PENDING - 2);
        assert_eq!(requests.made, MAX_PENDING as u32);
    }

    #[test]
    fn an_answer_that_names_its_request_ends_that_one_whatever_its_age() {
        let mut requests = Requests::default();
        for n in 0..3 {
            requests.start(request(n, Direction::Received));
        }
        // An HTTP/2 stream answered out of order.
        let second = requests.answered(true, Some([1; 8]));
        assert_eq!(second.map(|r| r.index), Some(1));
        // Not a request in flight: none ends.
        assert_eq!(requests.answered(true, Some([9; 8])), None);
        assert_eq!(requests.answered(true, None).map(|r| r.index), Some(0));
    }
}
