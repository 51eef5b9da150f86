//! Sampled requests: each a span from its first segment (or its connection's
//! start) to its answer's first segment, with what happened in between.
use otel_tcpstates_common::tcp_state::*;

use super::{
    tests::{SK, client_events, ev},
    *,
};
use crate::kernel::traceparent::Direction;

fn link(n: u8, sampled: bool) -> Link {
    Link {
        trace_id: [n; 16],
        span_id: [n; 8],
        trace_flags: u8::from(sampled),
        direction: Direction::Sent,
        method: 1,
    }
}

fn retransmit(ts_ns: u64, state: u8) -> Incident {
    Incident {
        skaddr: SK,
        ts_ns,
        happened: Happened::Retransmit {
            state: TcpState(state),
            err: 0,
            segs: 1,
        },
    }
}

#[test]
fn a_sampled_request_is_timed_from_its_first_segment_to_its_answer() {
    let mut t = SessionTable::new(NonZeroUsize::new(16).unwrap());
    let mut got = Vec::new();
    let mut rules = Vec::new();
    let mut collect = |u: Update<'_>| match u {
        Update::RequestEnded(_, e) => got.push(e.clone()),
        Update::SessionEnded(s, end, _) => {
            rules.push(crate::sampling::rules::KeepRules::default().check(s, end))
        }
        Update::StateEnded(..) => {}
    };
    let events = client_events(SK, 1000);
    // A SYN sent again: the handshake the first request waits for.
    t.apply(&events[0], &mut collect);
    t.incident(&retransmit(1020, SYN_SENT), &mut collect);
    t.apply(&events[1], &mut collect);
    t.link(SK, 1100, link(1, true));
    // Not sampled: a link, no span.
    t.link(SK, 1101, link(2, false));
    t.incident(&retransmit(1150, ESTABLISHED), &mut collect);
    // An answer the same way as the request answers nothing.
    t.answer(SK, 1190, true, None, &mut collect);
    t.answer(SK, 1200, false, None, &mut collect);
    // No request in flight: nothing.
    t.answer(SK, 1250, false, None, &mut collect);
    t.link(SK, 1300, link(3, true));
    for event in &events[2..] {
        t.apply_settled(event, &mut collect);
    }
    assert_eq!(got.len(), 2, "{got:#?}");
    let first = &got[0];
    // The connection was opened for it: from connect() on.
    assert_eq!(
        (first.request.start_ns, first.request.sent_ns, first.end_ns),
        (1000, 1100, 1200)
    );
    assert!(first.answered);
    assert_eq!(
        first.request.handshake,
        Some(Handshake {
            state: TcpState(SYN_SENT),
            end_ns: Some(1050)
        })
    );
    let at: Vec<u64> = first.request.events.kept.iter().map(|e| e.ts_ns).collect();
    assert_eq!(at, [1020, 1150]);
    assert_eq!(first.request.retransmits, 2);
    assert_eq!(first.state, TcpState(ESTABLISHED));
    // The second, on the same connection: from its own first segment to the
    // connection's end, which came before any answer.
    let second = &got[1];
    assert_eq!(
        (second.request.start_ns, second.end_ns, second.answered),
        (1300, 2065, false)
    );
    assert_eq!(second.request.handshake, None);
    assert_eq!((second.request.index, second.state), (1, TcpState(CLOSE)));
    assert!(second.request.events.kept.is_empty());
    let stats = t.stats();
    assert_eq!(
        (
            stats.requests_sampled,
            stats.request_spans,
            stats.requests_not_kept
        ),
        (2, 2, 0)
    );
    // The connection carried a sampled request: the rule keeps it.
    use crate::sampling::rules::KeptBy;
    assert_eq!(rules, [KeptBy::RETRANSMIT | KeptBy::SAMPLED_REQUEST]);
}

#[test]
fn a_request_on_a_socket_already_open_or_in_its_handshake() {
    let mut t = SessionTable::new(NonZeroUsize::new(16).unwrap());
    let got = std::cell::RefCell::new(Vec::new());
    let mut collect = |u: Update<'_>| {
        if let Update::RequestEnded(_, e) = u {
            got.borrow_mut().push(e.clone());
        }
    };
    // Already open when the tracer started: not opened for it.
    t.apply(
        &ev(SK, 5000, 4000, ESTABLISHED, FIN_WAIT1, 80),
        &mut collect,
    );
    t.link(SK, 5100, link(1, true));
    t.apply_settled(&ev(SK, 5200, 100, FIN_WAIT1, CLOSE, 80), &mut collect);
    {
        let got = got.borrow();
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].request.start_ns, got[0].request.handshake),
            (5100, None)
        );
    }
    // A request that came with the handshake (a deferred accept): its
    // handshake's end is filled in when the handshake ends.
    let sk = SK + 64;
    let mut server = vec![ev(sk, 7000, 0, LISTEN, SYN_RECV, 80)];
    t.apply(&server[0], &mut collect);
    t.link(
        sk,
        7000,
        Link {
            direction: Direction::Received,
            ..link(2, true)
        },
    );
    server.push(ev(sk, 7010, 10, SYN_RECV, ESTABLISHED, 80));
    t.apply(&server[1], &mut collect);
    t.answer(sk, 7500, true, None, &mut collect);
    let got = got.borrow();
    let served = &got[1];
    assert_eq!(
        served.request.handshake,
        Some(Handshake {
            state: TcpState(SYN_RECV),
            end_ns: Some(7010)
        })
    );
    assert_eq!((served.request.start_ns, served.end_ns), (7000, 7500));
}

#[test]
fn requests_in_flight_are_bounded_by_the_table_and_given_back() {
    // Room for one request in flight in all.
    let mut t = SessionTable::new(NonZeroUsize::new(1).unwrap());
    let spans = std::cell::Cell::new(0);
    let mut collect =
        |u: Update<'_>| spans.set(spans.get() + usize::from(matches!(u, Update::RequestEnded(..))));
    let events = client_events(SK, 1000);
    t.apply(&events[0], &mut collect);
    t.apply(&events[1], &mut collect);
    t.link(SK, 1100, link(1, true));
    t.link(SK, 1101, link(2, true));
    assert_eq!(t.stats().requests_not_kept, 1);
    t.answer(SK, 1200, false, None, &mut collect);
    // Its room given back.
    t.link(SK, 1300, link(3, true));
    t.answer(SK, 1400, false, None, &mut collect);
    assert_eq!(spans.get(), 2);
    assert_eq!(t.kept.requests, 0);
    t.link(SK, 1500, link(4, true));
    assert_eq!(t.kept.requests, 1);
    t.end_all(2000, EndReason::Shutdown, &mut collect);
    assert_eq!((spans.get(), t.kept.requests, t.kept.events), (3, 0, 0));
}
