use std::net::Ipv4Addr;

use otel_tcpstates_common::tcp_state::*;

use super::*;

pub(crate) const SK: u64 = 0xffff_8881_0000_1000;

/// A transition of socket `sk` at kernel time `ts`, `delta` ns after the previous.
pub(crate) fn ev(sk: u64, ts: u64, delta: u64, old: u8, new: u8, lport: u16) -> TcpEvent {
    let mut comm = [0u8; 16];
    comm[..4].copy_from_slice(b"test");
    ev_as(sk, ts, delta, old, new, lport, 4242, comm)
}

/// [`ev`] made by task `pid` named `comm`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn ev_as(
    sk: u64,
    ts: u64,
    delta: u64,
    old: u8,
    new: u8,
    lport: u16,
    pid: u32,
    comm: [u8; 16],
) -> TcpEvent {
    let raw = otel_tcpstates_common::Event {
        skaddr: sk,
        ts_ns: ts,
        delta_ns: delta,
        cgroup_id: 0,
        facts: Default::default(),
        saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        daddr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        pid,
        owner_pid: 0,
        comm,
        sport: lport,
        dport: 8080,
        family: otel_tcpstates_common::AF_INET,
        oldstate: old,
        newstate: new,
        netns: 0,
        _pad: 0,
    };
    crate::kernel::event::decode(&crate::kernel::event::tests::record(&raw)).unwrap()
}

/// What the table reported, flattened for comparison.
#[derive(Debug, PartialEq)]
pub(crate) enum Got {
    State(&'static str, u32, u64, u64, Option<&'static str>),
    Ended(u64, EndReason),
}

fn name(state: TcpState) -> &'static str {
    otel_tcpstates_common::tcp_state::name(state.0).unwrap()
}

/// Applies `events`, then lets the reset grace pass: sockets that waited for
/// an RST after their CLOSE end last.
pub(crate) fn run(table: &mut SessionTable, events: &[TcpEvent]) -> (Vec<Got>, Vec<Session>) {
    run_then(table, events, Some(u64::MAX))
}

/// Applies `events`; sockets still waiting for their reset stay in the table.
fn run_waiting(table: &mut SessionTable, events: &[TcpEvent]) -> (Vec<Got>, Vec<Session>) {
    run_then(table, events, None)
}

fn run_then(
    table: &mut SessionTable,
    events: &[TcpEvent],
    expire_at: Option<u64>,
) -> (Vec<Got>, Vec<Session>) {
    let mut got = Vec::new();
    let mut sessions = Vec::new();
    let mut collect = |update: Update<'_>| match update {
        Update::RequestEnded(..) => {}
        Update::StateEnded(_, e) => got.push(Got::State(
            name(e.state),
            e.index,
            e.start_ns,
            e.end_ns,
            e.next.map(name),
        )),
        Update::SessionEnded(s, end, reason) => {
            got.push(Got::Ended(end, reason));
            sessions.push(s.clone());
        }
    };
    for event in events {
        table.apply(event, &mut collect);
    }
    if let Some(now) = expire_at {
        table.expire_closing(now, &mut collect);
    }
    (got, sessions)
}

pub(crate) fn client_events(sk: u64, t0: u64) -> Vec<TcpEvent> {
    vec![
        ev(sk, t0, 0, CLOSE, SYN_SENT, 0),
        ev(sk, t0 + 50, 50, SYN_SENT, ESTABLISHED, 40000),
        ev(sk, t0 + 1050, 1000, ESTABLISHED, FIN_WAIT1, 40000),
        ev(sk, t0 + 1060, 10, FIN_WAIT1, FIN_WAIT2, 40000),
        ev(sk, t0 + 1065, 5, FIN_WAIT2, CLOSE, 40000),
    ]
}

fn table(capacity: usize) -> SessionTable {
    SessionTable::new(NonZeroUsize::new(capacity).unwrap())
}

#[test]
fn ending_all_ends_every_session_oldest_first() {
    let mut t = table(256);
    let opened: Vec<TcpEvent> = (0..101)
        .map(|i| ev(SK + i, 100 + i, 0, CLOSE, SYN_SENT, 0))
        .collect();
    run(&mut t, &opened);
    let mut roots = Vec::new();
    let mut states = 0;
    t.end_all(10_000, EndReason::Shutdown, &mut |u| match u {
        Update::SessionEnded(s, end, reason) => roots.push((s.skaddr, end, reason)),
        Update::StateEnded(..) => states += 1,
        Update::RequestEnded(..) => {}
    });
    // Each left in SYN_SENT: that state's span, then its root.
    assert_eq!((roots.len(), states, t.len()), (101, 101, 0));
    assert!(roots.windows(2).all(|w| w[0].0 < w[1].0), "oldest first");
    assert!(
        roots
            .iter()
            .all(|r| (r.1, r.2) == (10_000, EndReason::Shutdown))
    );
}

#[test]
fn client_lifecycle_reports_each_state_then_the_session() {
    let mut t = table(16);
    let (got, sessions) = run(&mut t, &client_events(SK, 100));
    assert_eq!(
        got,
        [
            Got::State("SYN_SENT", 0, 100, 150, Some("ESTABLISHED")),
            Got::State("ESTABLISHED", 1, 150, 1150, Some("FIN_WAIT1")),
            Got::State("FIN_WAIT1", 2, 1150, 1160, Some("FIN_WAIT2")),
            Got::State("FIN_WAIT2", 3, 1160, 1165, Some("CLOSE")),
            Got::Ended(1165, EndReason::Closed),
        ]
    );
    let s = &sessions[0];
    assert_eq!(
        (s.role, s.begin_seen, s.birth_ns),
        (Role::Client, true, 100)
    );
    assert_eq!(
        s.local_port, 40000,
        "the port connect() picked later is kept"
    );
    assert_eq!(s.local_addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_eq!(s.owner.map(|o| o.pid), Some(4242));
    assert_eq!(s.error, None);
    assert_eq!(t.len(), 0);
    assert_eq!(t.stats().closed, 1);
}

/// [`ev`] into CLOSE with the error the kernel set on the socket.
fn close_with(sk: u64, ts: u64, delta: u64, old: u8, sk_err: u32) -> TcpEvent {
    let mut event = ev(sk, ts, delta, old, CLOSE, 8080);
    event.facts.sk_err = sk_err;
    event
}

fn incident(table: &mut SessionTable, sk: u64, ts_ns: u64, happened: Happened) -> Vec<Got> {
    let mut got = Vec::new();
    let incident = Incident {
        skaddr: sk,
        ts_ns,
        happened,
    };
    table.incident(&incident, &mut |update| match update {
        Update::RequestEnded(..) => {}
        Update::StateEnded(_, e) => got.push(Got::State(
            name(e.state),
            e.index,
            e.start_ns,
            e.end_ns,
            e.next.map(name),
        )),
        Update::SessionEnded(_, end, reason) => got.push(Got::Ended(end, reason)),
    });
    got
}

/// Every state span's events and error, and each ended session's error.
fn run_full(
    table: &mut SessionTable,
    events: &[TcpEvent],
) -> (Vec<(StateEnded, Vec<What>)>, Vec<Session>) {
    let (mut states, mut sessions) = (Vec::new(), Vec::new());
    for event in events {
        table.apply_settled(event, &mut |update| match update {
            Update::RequestEnded(..) => {}
            Update::StateEnded(_, e) => {
                let what = e
                    .events
                    .iter()
                    .flat_map(|e| e.kept.iter().map(|k| k.what))
                    .collect();
                states.push((e.clone(), what));
            }
            Update::SessionEnded(s, ..) => sessions.push(s.clone()),
        });
    }
    (states, sessions)
}

#[test]
fn accepted_socket_is_a_server_and_a_reset_from_the_peer_is_named() {
    let mut t = table(16);
    let opened = [
        ev(SK, 10, 0, LISTEN, SYN_RECV, 8080),
        ev(SK, 20, 10, SYN_RECV, ESTABLISHED, 8080),
    ];
    run(&mut t, &opened);
    assert_eq!(incident(&mut t, SK, 25, Happened::ResetReceived), []);
    let (states, sessions) = run_full(&mut t, &[close_with(SK, 30, 10, ESTABLISHED, 104)]);
    assert_eq!(sessions[0].role, Role::Server);
    assert_eq!(sessions[0].error, Some(ErrorType::ResetByPeer));
    assert_eq!(sessions[0].counts.resets_received, 1);
    assert_eq!(sessions[0].owner, None, "no system call on it was seen");
    let (established, what) = &states[0];
    assert_eq!(established.error, Some(ErrorType::ResetByPeer));
    // The reset, then the error the kernel set as it closed the socket.
    assert_eq!(what, &[What::ResetReceived, What::Error { errno: 104 }]);

    let (states, refused) = run_full(
        &mut t,
        &[
            ev(SK, 40, 0, CLOSE, SYN_SENT, 0),
            close_with(SK, 41, 1, SYN_SENT, 111),
        ],
    );
    assert_eq!(refused[0].error, Some(ErrorType::ConnectionRefused));
    assert_eq!(states[0].1, [What::Error { errno: 111 }]);
}

#[test]
fn an_abort_waits_for_its_reset_and_then_ends() {
    let mut t = table(16);
    run(&mut t, &client_events(SK, 0)[..2]);
    let (got, _) = run_waiting(&mut t, &[close_with(SK, 500, 450, ESTABLISHED, 0)]);
    assert_eq!(got, [], "the last span waits for the RST");
    assert!(t.has_closing());
    let reset = Happened::ResetSent {
        state: TcpState(CLOSE),
        reason: 12,
        ends: None,
    };
    assert_eq!(
        incident(&mut t, SK, 505, reset),
        [
            Got::State("ESTABLISHED", 1, 50, 500, Some("CLOSE")),
            Got::Ended(500, EndReason::Closed),
        ]
    );
    assert!(t.is_empty());
    assert_eq!(t.stats().closed, 1);
    // A late RST of a socket already ended is only counted.
    assert_eq!(incident(&mut t, SK, 506, reset), []);
    assert_eq!(t.stats().incidents_unmatched, 1);
}

/// The connection of the sessions [`ev`] makes with local port `lport`.
fn ends(lport: u16) -> Tuple {
    (
        Ipv4Addr::new(127, 0, 0, 1).into(),
        lport,
        Ipv4Addr::new(127, 0, 0, 2).into(),
        8080,
    )
}

/// An RST from a socket the kernel program no longer follows: `state` CLOSE
/// (the socket itself, after CLOSE) or TIME_WAIT (the time-wait socket).
fn reset_of(state: u8, lport: u16) -> Happened {
    Happened::ResetSent {
        state: TcpState(state),
        reason: 8,
        ends: Some(ends(lport)),
    }
}

/// The server's side of a keep-alive connection, closed by the server after
/// its response: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, then CLOSE at 1065.
fn active_close(sk: u64) -> Vec<TcpEvent> {
    client_events(sk, 0)
}

#[test]
fn a_request_after_our_fin_is_reset_sent_from_the_socket_or_its_time_wait_socket() {
    const TIME_WAIT_SOCKET: u64 = SK + 0x5000;
    let ended = |got: &[Got]| got.iter().any(|g| matches!(g, Got::Ended(..)));
    // The request reached the socket itself (the FIN not yet acknowledged):
    // the kernel closes it and sends the RST from it.
    let mut t = table(16);
    let (got, _) = run_waiting(&mut t, &active_close(SK));
    assert!(!ended(&got), "FIN_WAIT2 -> CLOSE waits for a possible RST");
    let got = incident(&mut t, SK, 1070, reset_of(CLOSE, 40000));
    assert!(ended(&got));
    // The request reached the time-wait socket: the RST names the connection.
    let (got, _) = run_waiting(&mut t, &active_close(SK + 64));
    assert!(!ended(&got));
    let got = incident(&mut t, TIME_WAIT_SOCKET, 1080, reset_of(TIME_WAIT, 40000));
    assert!(ended(&got));
    assert!(t.is_empty() && t.closing_ends.is_empty());
    assert_eq!(t.stats().incidents_unmatched, 0);

    // The same, with the session's error read off what the table reported.
    let mut t = table(16);
    run_waiting(&mut t, &active_close(SK));
    let mut sessions = Vec::new();
    let mut collect = |u: Update<'_>| {
        if let Update::SessionEnded(s, ..) = u {
            sessions.push((s.error, s.counts));
        }
    };
    t.incident(
        &Incident {
            skaddr: TIME_WAIT_SOCKET,
            ts_ns: 1080,
            happened: reset_of(TIME_WAIT, 40000),
        },
        &mut collect,
    );
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].0, Some(ErrorType::ResetSent));
    assert_eq!(sessions[0].1.resets_sent, 1);
}

#[test]
fn the_kernels_own_reset_on_data_after_our_fin_is_reset_sent_not_received() {
    // shutdown(SHUT_RDWR), then data: tcp_reset on the socket (a reset
    // "received", ECONNRESET), CLOSE, then the RST it sends.
    let mut t = table(16);
    run(&mut t, &active_close(SK)[..4]);
    incident(&mut t, SK, 1064, Happened::ResetReceived);
    let (got, _) = run_waiting(&mut t, &[close_with(SK, 1065, 5, FIN_WAIT2, 104)]);
    assert_eq!(got, [], "waits for the RST that may follow");
    let mut ended = Vec::new();
    t.incident(
        &Incident {
            skaddr: SK,
            ts_ns: 1066,
            happened: reset_of(CLOSE, 40000),
        },
        &mut |u| match u {
            Update::RequestEnded(..) => {}
            Update::SessionEnded(s, ..) => ended.push((s.error, s.counts)),
            Update::StateEnded(_, e) => {
                let what: Vec<What> = e
                    .events
                    .iter()
                    .flat_map(|e| e.kept.clone())
                    .map(|e| e.what)
                    .collect();
                assert!(!what.contains(&What::ResetReceived), "{what:?}");
            }
        },
    );
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, Some(ErrorType::ResetSent));
    assert_eq!((ended[0].1.resets_sent, ended[0].1.resets_received), (1, 0));

    // A peer's RST in FIN_WAIT2 draws no RST: reset by the peer, after the grace.
    let mut t = table(16);
    run(&mut t, &active_close(SK)[..4]);
    incident(&mut t, SK, 1064, Happened::ResetReceived);
    run_waiting(&mut t, &[close_with(SK, 1065, 5, FIN_WAIT2, 104)]);
    let (_, sessions) = run(&mut t, &[]);
    assert_eq!(sessions[0].error, Some(ErrorType::ResetByPeer));
    assert_eq!(sessions[0].counts.resets_received, 1);
}

#[test]
fn an_rst_after_its_session_ended_is_counted_late_not_unmatched() {
    let mut t = table(16);
    let (_, sessions) = run(&mut t, &active_close(SK));
    assert_eq!(sessions[0].error, None, "no RST came: a clean close");
    // Much later the time-wait socket resets a request.
    assert_eq!(
        incident(
            &mut t,
            SK + 0x5000,
            9_000_000_000,
            reset_of(TIME_WAIT, 40000)
        ),
        []
    );
    assert_eq!(
        (t.stats().resets_late, t.stats().incidents_unmatched),
        (1, 0)
    );
    // An RST of a connection never seen is unmatched.
    incident(&mut t, SK + 0x6000, 9_000_000_001, reset_of(TIME_WAIT, 1));
    assert_eq!(
        (t.stats().resets_late, t.stats().incidents_unmatched),
        (1, 1)
    );
}

#[test]
fn the_grace_runs_on_what_was_read_not_on_the_clock() {
    let mut t = table(16);
    run_waiting(&mut t, &active_close(SK));
    let mut ended = 0;
    // Records read up to just before the grace's end: it still waits, however
    // late the clock is.
    t.expire_closing(1065 + RESET_GRACE_NS - 1, &mut |u| {
        ended += u64::from(matches!(u, Update::SessionEnded(..)))
    });
    assert_eq!(ended, 0);
    t.expire_closing(1065 + RESET_GRACE_NS, &mut |u| {
        ended += u64::from(matches!(u, Update::SessionEnded(..)))
    });
    assert_eq!(ended, 1);
    assert!(t.closing_ends.is_empty() && t.ended.contains(&ends(40000)));
}

#[test]
fn an_abort_whose_reset_never_comes_ends_after_the_grace() {
    let mut t = table(16);
    run(&mut t, &client_events(SK, 0)[..2]);
    run_waiting(&mut t, &[close_with(SK, 500, 450, ESTABLISHED, 0)]);
    let mut ended = Vec::new();
    let mut collect = |u: Update<'_>| {
        if let Update::SessionEnded(s, end, reason) = u {
            ended.push((s.error, end, reason));
        }
    };
    t.expire_closing(500 + RESET_GRACE_NS - 1, &mut collect);
    assert!(t.has_closing());
    t.expire_closing(500 + RESET_GRACE_NS, &mut collect);
    assert!(!t.has_closing() && t.is_empty());
    assert_eq!(
        ended,
        [(Some(ErrorType::ResetSent), 500, EndReason::Closed)]
    );
}

#[test]
fn a_new_socket_at_the_address_ends_the_one_waiting_for_its_reset() {
    let mut t = table(16);
    run(&mut t, &client_events(SK, 0)[..2]);
    run_waiting(&mut t, &[close_with(SK, 500, 450, ESTABLISHED, 0)]);
    let (got, _) = run(&mut t, &[ev(SK, 600, 0, CLOSE, SYN_SENT, 0)]);
    assert_eq!(
        got,
        [
            Got::State("ESTABLISHED", 1, 50, 500, Some("CLOSE")),
            Got::Ended(500, EndReason::Closed),
        ]
    );
    assert_eq!(t.stats().replaced, 0);
}

#[test]
fn synack_retransmits_go_to_the_socket_accepted_for_that_connection() {
    let mut t = table(16);
    let accepted = ev(SK, 2000, 0, LISTEN, SYN_RECV, 8080);
    let synack = Happened::SynAckRetransmit {
        local: (accepted.local_addr, accepted.local_port),
        remote: (accepted.remote_addr, accepted.remote_port),
    };
    let other = Happened::SynAckRetransmit {
        local: (accepted.local_addr, accepted.local_port),
        remote: (accepted.remote_addr, 1),
    };
    incident(&mut t, SK + 64, 1000, synack);
    incident(&mut t, SK + 64, 1001, other);
    let (states, _) = run_full(
        &mut t,
        &[accepted, ev(SK, 2010, 10, SYN_RECV, ESTABLISHED, 8080)],
    );
    let retransmit = What::Retransmit {
        kind: RetransmitKind::SynAck,
        err: 0,
    };
    assert_eq!(states[0].1, [retransmit]);
    let session = t.sessions().next().unwrap();
    assert_eq!(session.counts.retransmits, 1);
}

#[test]
fn retransmit_kinds_follow_the_state_and_the_congestion_state() {
    let mut t = table(16);
    run(&mut t, &client_events(SK, 0)[..1]);
    let retransmit = |state: u8| Happened::Retransmit {
        state: TcpState(state),
        err: 0,
        segs: 2,
    };
    incident(&mut t, SK, 10, retransmit(SYN_SENT));
    run(&mut t, &client_events(SK, 0)[1..2]);
    incident(&mut t, SK, 60, retransmit(ESTABLISHED));
    incident(&mut t, SK, 70, Happened::Congestion { state: 4 });
    incident(&mut t, SK, 80, retransmit(ESTABLISHED));
    incident(
        &mut t,
        SK,
        90,
        Happened::Retransmit {
            state: TcpState(ESTABLISHED),
            err: -11,
            segs: 1,
        },
    );
    let (states, sessions) = run_full(&mut t, &client_events(SK, 0)[2..]);
    let kinds = |what: &[What]| -> Vec<(RetransmitKind, i32)> {
        what.iter()
            .filter_map(|w| match *w {
                What::Retransmit { kind, err } => Some((kind, err)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(
        kinds(&states[0].1),
        [
            (RetransmitKind::LossProbe, 0),
            (RetransmitKind::Timeout, 0),
            (RetransmitKind::Timeout, -11)
        ]
    );
    // Segments of the retransmissions sent; the failed one sent none.
    assert_eq!(sessions[0].counts.retransmits, 2 + 2 + 2);
    assert_eq!(sessions[0].error, None);

    let mut unknown = table(16).congestion_known(false);
    run(&mut unknown, &client_events(SK, 0)[..2]);
    incident(&mut unknown, SK, 60, retransmit(ESTABLISHED));
    let (states, _) = run_full(&mut unknown, &client_events(SK, 0)[2..]);
    assert_eq!(kinds(&states[0].1), [(RetransmitKind::Unknown, 0)]);
}

#[test]
fn accepted_sockets_belong_to_their_listener_until_their_owner_acts() {
    let mut t = table(16);
    let named = |name: &[u8]| {
        let mut comm = [0u8; 16];
        comm[..name.len()].copy_from_slice(name);
        comm
    };
    let (_, sessions) = run(
        &mut t,
        &[
            ev_as(1, 10, 0, CLOSE, LISTEN, 8080, 100, named(b"nginx")),
            // Cloned in softirq, on whatever task was running.
            ev_as(2, 20, 0, LISTEN, SYN_RECV, 8080, 0, named(b"swapper/0")),
            ev_as(
                2,
                30,
                10,
                SYN_RECV,
                ESTABLISHED,
                8080,
                0,
                named(b"swapper/0"),
            ),
            ev_as(3, 40, 0, LISTEN, SYN_RECV, 8080, 0, named(b"swapper/1")),
            ev_as(3, 50, 10, SYN_RECV, CLOSE, 8080, 0, named(b"swapper/1")),
            // A worker process closes the first connection.
            ev_as(
                2,
                60,
                30,
                ESTABLISHED,
                FIN_WAIT1,
                8080,
                101,
                named(b"worker"),
            ),
            ev_as(2, 70, 10, FIN_WAIT1, CLOSE, 8080, 0, named(b"swapper/0")),
            ev_as(1, 80, 70, LISTEN, CLOSE, 8080, 100, named(b"nginx")),
        ],
    );
    let session = |sk: u64| sessions.iter().find(|s| s.skaddr == sk).unwrap();
    let owner = |sk: u64| session(sk).owner.map(|o| (o.pid, o.comm.to_string()));
    assert_eq!(owner(3), Some((100, "nginx".into())), "inherited");
    assert_eq!(owner(2), Some((101, "worker".into())), "its own");
    assert_eq!(owner(1), Some((100, "nginx".into())), "the listener");
    assert_eq!(session(2).facts, Some(TcpFacts::default()), "read at CLOSE");
    assert!(t.listeners.is_empty(), "forgotten at the listener's CLOSE");
}

#[test]
fn each_listener_of_a_port_keeps_its_connections_and_outlives_the_others() {
    let mut t = table(16);
    // (socket, time, old, new, task, owner the kernel named)
    let at = |sk, ts, old, new, pid, owner_pid| {
        let mut e = ev_as(sk, ts, 0, old, new, 8080, pid, [0; 16]);
        e.owner_pid = owner_pid;
        e
    };
    let (_, sessions) = run(
        &mut t,
        &[
            // Two processes listen on one port (SO_REUSEPORT).
            at(1, 10, CLOSE, LISTEN, 100, 100),
            at(2, 20, CLOSE, LISTEN, 200, 200),
            // The kernel named the listener that took each connection.
            at(11, 30, LISTEN, SYN_RECV, 0, 100),
            at(12, 40, LISTEN, SYN_RECV, 0, 200),
            // It could not tell: the newest.
            at(13, 50, LISTEN, SYN_RECV, 0, 0),
            // The newest closes; the first one's connections go on.
            at(2, 60, LISTEN, CLOSE, 200, 200),
            at(14, 70, LISTEN, SYN_RECV, 0, 100),
            at(15, 80, LISTEN, SYN_RECV, 0, 0),
            at(1, 90, LISTEN, CLOSE, 100, 100),
            at(16, 100, LISTEN, SYN_RECV, 0, 0),
        ],
    );
    assert_eq!(sessions.len(), 2, "the listeners ended");
    let owner = |sk: u64| t.sessions.peek(&sk).unwrap().owner.map(|o| o.pid);
    assert_eq!(
        [11, 12, 13, 14, 15, 16].map(owner),
        [Some(100), Some(200), Some(200), Some(100), Some(100), None]
    );
    assert!(t.listeners.is_empty());
}

#[test]
fn a_listener_whose_close_was_lost_is_forgotten_when_its_address_is_reused() {
    let mut t = table(16);
    run(
        &mut t,
        &[
            ev_as(1, 10, 0, CLOSE, LISTEN, 8080, 100, [0; 16]),
            // Its CLOSE was lost; a client now has its address.
            ev(1, 20, 0, CLOSE, SYN_SENT, 0),
        ],
    );
    assert!(t.listeners.is_empty());
}

#[test]
fn listeners_are_told_apart_by_namespace_and_family() {
    let mut t = table(16);
    // (socket, time, old, new, port, pid, netns)
    let at = |sk, ts, old, new, port, pid, netns| {
        let mut e = ev_as(sk, ts, 0, old, new, port, pid, [0; 16]);
        e.netns = netns;
        e
    };
    // A dual-stack listener on `::`, and its IPv4 client's socket.
    let v6 = |mut e: TcpEvent, mapped: bool| {
        e.family = Family::V6;
        if !mapped {
            (e.local_addr, e.remote_addr) = (IpAddr::from([0u16; 8]), IpAddr::from([0u16; 8]));
        }
        e
    };
    let (_, sessions) = run(
        &mut t,
        &[
            at(1, 10, CLOSE, LISTEN, 8080, 100, 1),
            at(2, 20, CLOSE, LISTEN, 8080, 200, 2),
            v6(at(3, 30, CLOSE, LISTEN, 8080, 300, 1), false),
            at(11, 40, LISTEN, SYN_RECV, 8080, 0, 1),
            at(12, 50, LISTEN, SYN_RECV, 8080, 0, 2),
            v6(at(13, 60, LISTEN, SYN_RECV, 8080, 0, 1), true),
            // Namespace 2's server goes away; namespace 1's keep theirs.
            at(2, 70, LISTEN, CLOSE, 8080, 200, 2),
            at(14, 80, LISTEN, SYN_RECV, 8080, 0, 1),
            at(15, 90, LISTEN, SYN_RECV, 8080, 0, 2),
        ],
    );
    assert_eq!(sessions.len(), 1, "only the closed listener ended");
    let owner = |sk: u64| t.sessions.peek(&sk).unwrap().owner.map(|o| o.pid);
    assert_eq!(
        [11, 12, 13, 14, 15].map(owner),
        [Some(100), Some(200), Some(300), Some(100), None]
    );
    let mapped = t.sessions.peek(&13).unwrap();
    assert!(mapped.is_ipv4() && mapped.family == Family::V6);
    assert!(!t.sessions.peek(&3).unwrap().is_ipv4(), "`::` is IPv6");
}

#[test]
fn a_reused_address_is_a_new_session() {
    let mut t = table(16);
    let mut events = client_events(SK, 100);
    events.extend(client_events(SK, 5000));
    let (_, sessions) = run(&mut t, &events);
    assert_eq!(sessions.len(), 2);
    assert_eq!((sessions[0].birth_ns, sessions[1].birth_ns), (100, 5000));

    // A new socket at the address before the old one's CLOSE was seen.
    let (got, _) = run(
        &mut t,
        &[
            ev(SK, 9000, 0, CLOSE, SYN_SENT, 0),
            ev(SK, 9010, 10, SYN_SENT, ESTABLISHED, 1),
            ev(SK, 9500, 0, CLOSE, SYN_SENT, 0),
        ],
    );
    assert_eq!(
        got[1..],
        [
            Got::State("ESTABLISHED", 1, 9010, 9500, None),
            Got::Ended(9500, EndReason::Replaced),
        ]
    );
    assert_eq!(t.stats().replaced, 1);
}

#[test]
fn a_holding_table_keeps_each_ended_state_and_the_handshake_time() {
    let mut t = table(16).holding_states();
    let (got, sessions) = run(&mut t, &client_events(SK, 100));
    let held: Vec<_> = sessions[0]
        .held
        .iter()
        .map(|e| (e.state, e.start_ns, e.end_ns))
        .collect();
    let reported: Vec<_> = got
        .iter()
        .filter_map(|g| match g {
            Got::State(name, _, start, end, _) => Some((*name, *start, *end)),
            Got::Ended(..) => None,
        })
        .collect();
    assert_eq!(held.len(), reported.len());
    for ((state, start, end), (name, s, e)) in held.iter().zip(&reported) {
        assert_eq!((state.to_string().as_str(), *start, *end), (*name, *s, *e));
    }
    assert_eq!(sessions[0].handshake_ns, Some(50), "SYN_SENT lasted 50 ns");
    // Without holding, nothing is kept; the handshake time is all the same.
    let mut t = table(16);
    let mut events = client_events(SK, 100);
    events.extend(client_events(SK, 5000));
    let (_, sessions) = run(&mut t, &events);
    assert!(sessions[0].held.is_empty());
    assert_eq!(sessions[0].handshake_ns, Some(50));
    // A reused address is a new trace.
    assert_ne!(sessions[0].trace_id, sessions[1].trace_id);
}

#[test]
fn a_full_table_evicts_the_least_recently_active() {
    let mut t = table(2);
    let (got, sessions) = run(
        &mut t,
        &[
            ev(1, 10, 0, CLOSE, SYN_SENT, 0),
            ev(2, 20, 0, CLOSE, SYN_SENT, 0),
            ev(1, 30, 20, SYN_SENT, ESTABLISHED, 1), // 1 is now the most recent
            ev(3, 40, 0, CLOSE, SYN_SENT, 0),        // evicts 2
        ],
    );
    assert_eq!(
        got[1..],
        [
            Got::State("SYN_SENT", 0, 20, 40, None),
            Got::Ended(40, EndReason::Evicted),
        ]
    );
    assert_eq!(sessions[0].skaddr, 2);
    assert_eq!((t.len(), t.stats().evicted), (2, 1));
}

#[test]
fn a_socket_open_before_the_tracer_started() {
    let mut t = table(16);
    // The kernel did not know it either: no span for the state it left.
    let (got, _) = run(
        &mut t,
        &[
            ev(SK, 1000, 0, ESTABLISHED, FIN_WAIT1, 1),
            ev(SK, 1010, 10, FIN_WAIT1, FIN_WAIT2, 1),
        ],
    );
    assert_eq!(
        got,
        [Got::State("FIN_WAIT1", 0, 1000, 1010, Some("FIN_WAIT2"))]
    );
    let mut sessions = Vec::new();
    t.end_all(2000, EndReason::Shutdown, &mut |u| {
        if let Update::SessionEnded(s, end, reason) = u {
            sessions.push((s.clone(), end, reason));
        }
    });
    let (s, end, reason) = &sessions[0];
    assert_eq!(
        (s.begin_seen, s.role, s.birth_ns),
        (false, Role::Unknown, 1000)
    );
    assert_eq!((*end, *reason), (2000, EndReason::Shutdown));

    // The kernel knew when it entered ESTABLISHED: that span is exact.
    let (got, _) = run(&mut t, &[ev(7, 5000, 300, ESTABLISHED, CLOSE_WAIT, 1)]);
    assert_eq!(
        got,
        [Got::State("ESTABLISHED", 0, 4700, 5000, Some("CLOSE_WAIT"))]
    );
}

#[test]
fn lost_transitions_end_the_believed_state_where_the_kernel_says() {
    let mut t = table(16);
    let (got, _) = run(
        &mut t,
        &[
            ev(SK, 100, 0, CLOSE, SYN_SENT, 0),
            // SYN_SENT -> ESTABLISHED at 150 was lost.
            ev(SK, 400, 250, ESTABLISHED, FIN_WAIT1, 1),
        ],
    );
    assert_eq!(
        got,
        [
            Got::State("SYN_SENT", 0, 100, 150, Some("ESTABLISHED")),
            Got::State("ESTABLISHED", 1, 150, 400, Some("FIN_WAIT1")),
        ]
    );
}
