//! What the sessions keep, in bytes, at the worst: every socket offered 64
//! distinct links, 64 incidents in a state it ended (held for sampling) and
//! 64 in the state it is in.
use std::mem::size_of;

use otel_tcpstates_common::tcp_state::*;

use super::{
    tests::{SK, ev},
    *,
};
use crate::kernel::traceparent::Direction;

/// What a session takes: itself, its links, its open state's events, its
/// held states and their events (the LRU's own entry and hash slot aside).
fn bytes(s: &Session) -> usize {
    let events = |e: &SpanEvents| e.kept.capacity() * size_of::<SpanEvent>();
    let held: usize = s
        .held
        .iter()
        .filter_map(|h| h.events.as_deref())
        .map(|e| size_of::<SpanEvents>() + events(e))
        .sum();
    size_of::<Session>()
        + s.links.kept.capacity() * size_of::<Link>()
        + events(&s.events)
        + s.held.capacity() * size_of::<StateEnded>()
        + held
        + s.requests
            .as_ref()
            .map_or(0, |r| size_of::<Requests>() + r.heap_bytes())
}

fn retransmit(skaddr: u64, ts_ns: u64, state: u8) -> Incident {
    Incident {
        skaddr,
        ts_ns,
        happened: Happened::Retransmit {
            state: TcpState(state),
            err: 0,
            segs: 1,
        },
    }
}

/// `n` sockets at their worst, in a table of `n`.
fn worst(n: u64) -> SessionTable {
    let mut table = SessionTable::new(NonZeroUsize::new(n as usize).unwrap()).holding_states();
    let mut out = |_: Update<'_>| {};
    for i in 0..n {
        let sk = SK + i;
        table.apply(&ev(sk, 100, 0, CLOSE, SYN_SENT, 0), &mut out);
        for k in 0..64 {
            table.incident(&retransmit(sk, 110 + k, SYN_SENT), &mut out);
        }
        table.apply(&ev(sk, 300, 200, SYN_SENT, ESTABLISHED, 40000), &mut out);
        for k in 0..64 {
            table.incident(&retransmit(sk, 310 + k, ESTABLISHED), &mut out);
        }
        for k in 0..64u64 {
            let link = Link {
                trace_id: (u128::from(i) << 64 | u128::from(k + 1)).to_be_bytes(),
                span_id: (k + 1).to_be_bytes(),
                trace_flags: 1,
                direction: Direction::Sent,
                method: 1,
            };
            table.link(sk, 320, link);
        }
    }
    table
}

#[test]
fn sessions_keep_at_most_a_kibibyte_a_socket_with_links_and_events() {
    const N: u64 = 4096;
    let table = worst(N);
    assert_eq!(table.len(), N as usize);
    let sizes: Vec<usize> = table.sessions().map(bytes).collect();
    let total: usize = sizes.iter().sum();
    let most = *sizes.iter().max().unwrap();
    let per_socket = total / N as usize;
    eprintln!(
        "{N} sockets at their worst: {per_socket} bytes a socket on average, \
         {most} at most (Session itself {} bytes, a request in flight {}, a \
         socket's requests {} and their list)",
        size_of::<Session>(),
        size_of::<Request>(),
        size_of::<Requests>()
    );
    // One socket may keep all it was offered: 64 links, 64 events in each
    // of two states, 16 requests in flight (HTTP/2 streams; 6.2 KiB in all).
    assert!(most <= 7 * 1024, "{most} bytes in one session");
    // All of them together may not: 65,536 sockets take 64 MiB at most.
    assert!(per_socket <= 1024, "{per_socket} bytes a socket");
}

#[test]
fn what_is_not_kept_is_counted_and_the_bounds_are_given_back() {
    const N: u64 = 512;
    let mut table = worst(N);
    let links: usize = table.sessions().map(|s| s.links.kept.len()).sum();
    let events: usize = table
        .sessions()
        .map(|s| {
            s.events.kept.len()
                + s.held
                    .iter()
                    .filter_map(|h| h.events.as_deref())
                    .map(|e| e.kept.len())
                    .sum::<usize>()
        })
        .sum();
    // The first request of a socket is offered a copy of the handshake's
    // events it kept (at most 8), in the same bound.
    let on_requests: usize = table
        .sessions()
        .filter_map(|s| s.requests.as_ref())
        .flat_map(|r| r.pending.iter().map(|p| p.events.kept.len()))
        .sum();
    let offered: usize = table
        .sessions()
        .filter(|s| s.requests.as_ref().is_some_and(|r| r.made > 0))
        .filter_map(|s| s.handshake_events.as_ref())
        .map(|e| e.kept.len())
        .sum();
    let stats = table.stats();
    assert_eq!(links as u64 + stats.links_not_kept, 64 * N);
    let requests = table.stats().requests_sampled - table.stats().requests_not_kept;
    assert_eq!(requests, table.kept.requests as u64);
    assert!(table.kept.requests <= N as usize * REQUESTS_PER_SOCKET);
    assert_eq!(
        (events + on_requests) as u64 + stats.events_not_kept,
        2 * 64 * N + offered as u64
    );
    assert!(table.kept.links <= N as usize * LINKS_PER_SOCKET);
    assert!(table.kept.events <= N as usize * EVENTS_PER_SOCKET);
    // Each root says its own: dropped_links_count.
    let dropped: u64 = table.sessions().map(|s| u64::from(s.links.dropped)).sum();
    assert_eq!(dropped, stats.links_not_kept);
    table.end_all(1000, EndReason::Shutdown, &mut |_| {});
    assert!(table.is_empty());
    assert_eq!(
        (table.kept.links, table.kept.events, table.kept.requests),
        (0, 0, 0)
    );
    // Room again for the next sockets.
    let mut table = table;
    table.apply(&ev(SK, 2000, 0, CLOSE, SYN_SENT, 0), &mut |_| {});
    table.incident(&retransmit(SK, 2010, SYN_SENT), &mut |_| {});
    assert_eq!(table.sessions().next().unwrap().events.kept.len(), 1);
}

#[test]
fn only_the_sessions_whose_decision_waits_hold_their_states() {
    let mut table = SessionTable::new(NonZeroUsize::new(16).unwrap())
        .holding_states_if(|trace_id| trace_id[15] % 2 == 0);
    for sk in 0..8 {
        for event in tests::client_events(SK + sk, 100) {
            table.apply(&event, &mut |update| {
                if let Update::SessionEnded(s, ..) = update {
                    let waits = s.trace_id[15] % 2 == 0;
                    assert_eq!(s.holds, waits);
                    assert_eq!(s.held.len(), if waits { 4 } else { 0 });
                }
            });
        }
    }
}
