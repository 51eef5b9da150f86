//! The reason a connection ended, on the paths the kernel really takes when it
//! aborts one after a close has begun (issue 28): the keep-alive race, where a
//! request reaches a server that has just closed, and an abortive close after a
//! half-close. Each end's root says who sent the RST; an RST that comes after its
//! connection's trace has ended is counted, not lost.
//!
//! Every test here takes [`load::serial`]: the kernel's delayed ACKs and the
//! daemon's reading must not share the cores with another test's load.
mod support;

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    thread,
    time::{Duration, Instant},
};

use otel_tcpstates_common::tcp_state;
use support::{
    load::{self, abort_on_close},
    otlp::{self, FAST, ReceivedSpan, Receiver, STATUS_ERROR, trace_of},
    *,
};

/// How long a socket may take to reach the state the test waits for: the
/// kernel's delayed ACK is at most 200 ms; a generous margin.
const STATE_WAIT: Duration = Duration::from_secs(10);
/// How long past a CLOSE the daemon reads before it gives up on the RST that may
/// follow it (the table's `RESET_GRACE_NS`).
const RESET_GRACE: Duration = Duration::from_millis(20);
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
/// Rounds of the keep-alive race: each must hold.
const ROUNDS: usize = 5;

fn start(rx: &Receiver, extra: &[&str]) -> Tracer {
    let endpoint = rx.http_endpoint();
    let mut args = vec!["--otlp-endpoint", &endpoint, "--print", "-s"];
    args.extend_from_slice(extra);
    Tracer::start_with_env(&args, FAST)
}

/// Waits until the daemon printed the CLOSE of every (local, peer) pair, stops
/// it, and returns what it exported and what it logged.
fn finish(tracer: Tracer, rx: &Receiver, pairs: &[(u16, u16)]) -> (Vec<ReceivedSpan>, Vec<String>) {
    let done = tracer.stop_after_closes(pairs, &["events lost", "records lost"]);
    (rx.spans(), done.stderr)
}

/// The root of the trace of the socket at `local` talking to `peer`.
fn root(spans: &[ReceivedSpan], local: u16, peer: u16) -> ReceivedSpan {
    trace_of(spans, local, peer)
        .unwrap_or_else(|| panic!("no trace of {local} -> {peer}"))
        .0
}

/// `error.type` of each root, for one report of every end that failed the check.
fn error_type(root: &ReceivedSpan) -> Option<&str> {
    root.str_attr("error.type")
}

fn assert_failed(root: &ReceivedSpan, error_type: &str, what: &str) {
    assert_eq!(
        root.str_attr("error.type"),
        Some(error_type),
        "{what}: {root:?}"
    );
    assert_eq!(root.status_code, STATUS_ERROR, "{what}");
}

/// The socket's TCP state, as `TCP_INFO` reports it.
fn state_of(stream: &TcpStream) -> u8 {
    support::tcp_info(stream).tcpi_state
}

fn wait_for_state(stream: &TcpStream, state: u8, what: &str) {
    spin_until(what, || state_of(stream) == state);
}

/// Polls `done` every millisecond (the keep-alive race is about milliseconds);
/// fails the test with `what` after [`STATE_WAIT`].
fn spin_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + STATE_WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(1));
    }
}

/// Sends the ACK the kernel holds back (delayed ACK) now.
fn quickack(stream: &TcpStream) {
    let on: libc::c_int = 1;
    // SAFETY: a plain int option.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "TCP_QUICKACK: {}", std::io::Error::last_os_error());
}

/// Whether /proc/net/tcp (tcp6 for `v6`) lists a socket from the loopback's
/// `local` port to its `peer` port in FIN_WAIT2 (after close(), the kernel's
/// time-wait socket in that substate).
fn fin_wait2_listed(v6: bool, local: u16, peer: u16) -> bool {
    let (path, addr) = if v6 {
        ("/proc/net/tcp6", "00000000000000000000000001000000")
    } else {
        ("/proc/net/tcp", "0100007F")
    };
    let table = std::fs::read_to_string(path).unwrap();
    let want = (format!("{addr}:{local:04X}"), format!("{addr}:{peer:04X}"));
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 3 && (f[1], f[2]) == (&want.0, &want.1) && f[3] == "05"
    })
}

/// One keep-alive exchange whose server closes after its response while the
/// client sends its next request. `after_ack`: the request leaves only once the
/// client's kernel has acknowledged the server's FIN (the server's socket is then
/// the kernel's time-wait socket); else at once, as a client that reuses a pooled
/// connection does. Returns (client port, server port), how long from before the
/// server's socket closed (`after_ack`) to after its RST, and the client, open so
/// no later connection gets its port.
fn keep_alive_race(
    listener: &TcpListener,
    after_ack: bool,
) -> ((u16, u16), Option<Duration>, TcpStream) {
    let sp = listener.local_addr().unwrap().port();
    let v6 = listener.local_addr().unwrap().is_ipv6();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let cp = client.local_addr().unwrap().port();
    let (mut server, _) = listener.accept().unwrap();
    client.write_all(REQUEST).unwrap();
    let mut got = vec![0u8; REQUEST.len()];
    server.read_exact(&mut got).unwrap();
    server.write_all(RESPONSE).unwrap();
    // The server closes right after its response (a keep-alive timeout, a
    // request limit).
    drop(server);
    let mut got = vec![0u8; RESPONSE.len()];
    client.read_exact(&mut got).unwrap();
    let mut acked = None;
    if after_ack {
        wait_for_state(&client, tcp_state::CLOSE_WAIT, "the server's FIN");
        // The server's socket closes (FIN_WAIT2 -> CLOSE) as this ACK arrives.
        acked = Some(Instant::now());
        quickack(&client);
        spin_until("the server's time-wait socket", || {
            fin_wait2_listed(v6, sp, cp)
        });
    }
    // The next request, before the client noticed the FIN.
    let _ = client.write_all(REQUEST);
    wait_for_state(&client, tcp_state::CLOSE, "the server's RST");
    ((cp, sp), acked.map(|at| at.elapsed()), client)
}

#[test]
fn the_keep_alive_race_is_reset_sent_on_the_server_and_reset_by_peer_on_the_client() {
    if !root_or_skip(
        "the_keep_alive_race_is_reset_sent_on_the_server_and_reset_by_peer_on_the_client",
    ) {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = start(&rx, &[]);
    let listeners = [listen("127.0.0.1").0, listen("::1").0];
    let mut pairs = Vec::new();
    let mut held = Vec::new();
    for listener in &listeners {
        for _ in 0..ROUNDS {
            for after_ack in [false, true] {
                let (pair, took, client) = keep_alive_race(listener, after_ack);
                pairs.push((pair, took));
                held.push(client);
            }
        }
    }
    let ends: Vec<(u16, u16)> = pairs
        .iter()
        .flat_map(|&((c, s), _)| [(c, s), (s, c)])
        .collect();
    let (spans, stderr) = finish(tracer, &rx, &ends);
    // The time-wait socket's RST comes when the request does: a round whose
    // request took longer than the grace after the close may miss its trace,
    // and is then counted as late (this machine being slow, not the daemon).
    let slow = pairs
        .iter()
        .filter(|(_, took)| took.is_some_and(|t| t >= RESET_GRACE))
        .count();
    let mut right = 0;
    let mut report = Vec::new();
    for &((cp, sp), took) in &pairs {
        let server = root(&spans, sp, cp);
        let client = root(&spans, cp, sp);
        let got = (error_type(&server), error_type(&client));
        if got == (Some("reset_sent"), Some("reset_by_peer")) {
            right += 1;
        }
        report.push(format!(
            "request after the FIN's ACK: {took:?}: (server, client) {got:?}"
        ));
    }
    eprintln!(
        "keep-alive race: {right} of {} right ({slow} slower than the grace)\n{}",
        pairs.len(),
        report.join("\n")
    );
    let late = late_resets(&stderr).unwrap_or(0) as usize;
    assert_eq!(right + late, pairs.len(), "{report:#?}");
    assert!(
        late <= slow,
        "{late} late, {slow} rounds slower than the grace"
    );
    for &((cp, sp), took) in &pairs {
        if took.is_some_and(|t| t >= RESET_GRACE) {
            continue;
        }
        let server = root(&spans, sp, cp);
        assert_failed(&server, "reset_sent", "the server");
        // The kernel's own abort on data is no RST from the peer.
        assert_eq!(server.int_attr("tcpstates.resets.sent"), Some(1));
        assert_eq!(server.int_attr("tcpstates.resets.received"), Some(0));
        let client = root(&spans, cp, sp);
        assert_failed(&client, "reset_by_peer", "the client");
        assert_eq!(client.int_attr("tcpstates.resets.received"), Some(1));
    }
    drop(held);
}

/// How the closing end aborts after its close began.
#[derive(Clone, Copy, Debug)]
enum HalfClose {
    /// shutdown(SHUT_WR), the peer's data left unread, close().
    FinWait2Unread,
    /// shutdown(SHUT_WR), then close() with `SO_LINGER` 0.
    FinWait2Linger,
    /// shutdown(SHUT_WR) behind data the peer does not read (the FIN cannot
    /// go), then close() with `SO_LINGER` 0.
    FinWait1Linger,
    /// The peer sent data and its FIN; close() with that data unread.
    CloseWaitUnread,
}

/// One connection whose client aborts as `how` says. Returns (client port,
/// server port) and the ends still open, so no later connection gets their ports.
fn abort_after_half_close(listener: &TcpListener, how: HalfClose) -> ((u16, u16), TcpStream) {
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let pair = (
        client.local_addr().unwrap().port(),
        listener.local_addr().unwrap().port(),
    );
    let mut buf = [0u8; 64];
    match how {
        HalfClose::FinWait2Unread | HalfClose::FinWait2Linger => {
            client.shutdown(Shutdown::Write).unwrap();
            assert_eq!(server.read(&mut buf).unwrap(), 0);
            quickack(&server);
            wait_for_state(&client, tcp_state::FIN_WAIT2, "FIN_WAIT2");
            if let HalfClose::FinWait2Unread = how {
                server.write_all(b"unread").unwrap();
                // Arrived, and left unread.
                assert!(client.peek(&mut buf).unwrap() > 0);
            } else {
                abort_on_close(&client);
            }
        }
        HalfClose::FinWait1Linger => {
            client.set_nonblocking(true).unwrap();
            let chunk = [7u8; 1 << 16];
            let mut sent = 0usize;
            // The server reads nothing: its window closes, the client's buffer fills.
            while sent < 64 << 20 {
                match (&client).write(&chunk) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
            client.shutdown(Shutdown::Write).unwrap();
            assert_eq!(state_of(&client), tcp_state::FIN_WAIT1);
            abort_on_close(&client);
        }
        HalfClose::CloseWaitUnread => {
            server.write_all(b"unread").unwrap();
            server.shutdown(Shutdown::Write).unwrap();
            wait_for_state(&client, tcp_state::CLOSE_WAIT, "CLOSE_WAIT");
            assert!(client.peek(&mut buf).unwrap() > 0);
        }
    }
    drop(client);
    wait_for_state(&server, tcp_state::CLOSE, "the client's RST");
    (pair, server)
}

/// Under 1% sampling, so each root is there only because the keep rule for
/// errors kept it.
#[test]
fn an_abortive_close_after_a_half_close_is_reset_sent_and_kept_by_the_error_rule() {
    if !root_or_skip(
        "an_abortive_close_after_a_half_close_is_reset_sent_and_kept_by_the_error_rule",
    ) {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = start(&rx, &["--sample-ratio", "0.01"]);
    let (listener, _) = listen("127.0.0.1");
    let mut cases = Vec::new();
    let mut held = Vec::new();
    for how in [
        HalfClose::FinWait2Unread,
        HalfClose::FinWait2Linger,
        HalfClose::FinWait1Linger,
        HalfClose::CloseWaitUnread,
    ] {
        for _ in 0..ROUNDS {
            let (pair, server) = abort_after_half_close(&listener, how);
            cases.push((pair, how));
            held.push(server);
        }
    }
    let ends: Vec<(u16, u16)> = cases
        .iter()
        .flat_map(|&((c, s), _)| [(c, s), (s, c)])
        .collect();
    let (spans, _) = finish(tracer, &rx, &ends);
    let mut report = Vec::new();
    let mut right = 0;
    for &((cp, sp), how) in &cases {
        let got = |local, peer| trace_of(&spans, local, peer).map(|t| t.0);
        let (closing, peer) = (got(cp, sp), got(sp, cp));
        let types = (
            closing.as_ref().map(|r| error_type(r).map(str::to_owned)),
            peer.as_ref().map(|r| error_type(r).map(str::to_owned)),
        );
        let want = (
            Some(Some("reset_sent".to_owned())),
            Some(Some("reset_by_peer".to_owned())),
        );
        if types == want {
            right += 1;
        }
        report.push(format!(
            "{how:?}: (closing, peer) {types:?} (None: no trace kept)"
        ));
    }
    eprintln!(
        "abort after a half-close: {right} of {} right\n{}",
        cases.len(),
        report.join("\n")
    );
    assert_eq!(right, cases.len(), "{report:#?}");
    for &((cp, sp), _) in &cases {
        let closing = root(&spans, cp, sp);
        assert_failed(&closing, "reset_sent", "the end that aborted");
        assert_eq!(closing.int_attr("tcpstates.resets.sent"), Some(1));
    }
    drop(held);
}

/// The number in the exit's line about RSTs that came after their trace ended.
fn late_resets(stderr: &[String]) -> Option<u64> {
    stderr.iter().find_map(|line| {
        let (_, rest) = line.split_once("] ").unwrap_or(("", line));
        let rest = rest.trim_start_matches(|c: char| !c.is_ascii_digit());
        let (n, after) = rest.split_once(' ')?;
        after
            .starts_with("RSTs came after their connection's trace had ended")
            .then(|| n.parse().ok())
            .flatten()
    })
}

/// The server's socket ended cleanly (FIN_WAIT2 → CLOSE into the kernel's
/// time-wait socket), its trace went out; much later the client's request draws
/// the time-wait socket's RST. That RST cannot change a trace already sent: it is
/// counted at exit, and no other incident is counted unmatched for it.
#[test]
fn a_reset_after_its_trace_ended_is_counted_as_late() {
    if !root_or_skip("a_reset_after_its_trace_ended_is_counted_as_late") {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = start(&rx, &[]);
    let (listener, _) = listen("127.0.0.1");
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (cp, sp) = (
        client.local_addr().unwrap().port(),
        listener.local_addr().unwrap().port(),
    );
    let (mut server, _) = listener.accept().unwrap();
    server.write_all(RESPONSE).unwrap();
    drop(server);
    let mut got = vec![0u8; RESPONSE.len()];
    client.read_exact(&mut got).unwrap();
    wait_for_state(&client, tcp_state::CLOSE_WAIT, "the server's FIN");
    quickack(&client);
    // The server's trace has ended and gone out.
    let spans = rx.wait_for(otlp::WAIT, |spans| trace_of(spans, sp, cp).is_some());
    assert!(
        trace_of(&spans, sp, cp).is_some(),
        "the server's trace went out"
    );
    assert!(
        fin_wait2_listed(false, sp, cp),
        "the time-wait socket is there"
    );
    let _ = client.write_all(REQUEST);
    wait_for_state(&client, tcp_state::CLOSE, "the server's RST");
    // The daemon has read it once a later event is printed: the listener's CLOSE.
    drop(listener);
    let (spans, stderr) = finish(tracer, &rx, &[(cp, sp), (sp, 0)]);
    let server = root(&spans, sp, cp);
    assert_eq!(error_type(&server), None, "sent before its RST: {server:?}");
    let late = late_resets(&stderr);
    eprintln!("late RSTs counted: {late:?}");
    assert_eq!(late, Some(1), "{stderr:#?}");
    assert_failed(&root(&spans, cp, sp), "reset_by_peer", "the client");
}
