//! Why a connection was slow or failed (issue 19), with the kernel doing it for
//! real: iptables drops and rejects on loopback ([`netfault`]), `SO_LINGER` 0,
//! `TCP_SYNCNT` for a quick timeout, and random loss on a veth link between two
//! network namespaces of the test's own. Each case checks the span events on the
//! state spans they happened in, `error.type` on the root and the counts beside
//! the kernel's `total_retrans`.
//!
//! Every test here takes [`load::serial`]: iptables rules are global, and the
//! retransmission timings must not share the cores with another test's load.
mod support;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, OwnedFd},
    thread,
    time::Duration,
};

use nix::{
    errno::Errno,
    sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, connect, getsockname,
        socket,
    },
};
use support::{
    load::{self, abort_on_close},
    netfault::Fault,
    otlp::{FAST, ReceivedEvent, ReceivedSpan, Receiver, STATUS_ERROR, trace_of},
    *,
};

/// The kernel's initial retransmission timeout for a SYN (TCP_TIMEOUT_INIT).
const INITIAL_RTO: Duration = Duration::from_secs(1);
const PAYLOAD: usize = 1000;
/// The span events' names.
const RETRANSMIT: &str = "tcp.retransmit";
const RESET_SENT: &str = "tcp.reset.sent";
const RESET_RECEIVED: &str = "tcp.reset.received";
const ERROR: &str = "tcp.error";
const CONGESTION: &str = "tcp.congestion";
const ALL_EVENTS: [&str; 5] = [RETRANSMIT, RESET_SENT, RESET_RECEIVED, ERROR, CONGESTION];

fn start(rx: &Receiver) -> Tracer {
    let endpoint = rx.http_endpoint();
    Tracer::start_with_env(&["--otlp-endpoint", &endpoint, "--print", "-s"], FAST)
}

/// Waits until the daemon printed the CLOSE of every (local, peer) pair, stops
/// it, and returns what it exported.
fn finish(tracer: Tracer, rx: &Receiver, pairs: &[(u16, u16)]) -> Vec<ReceivedSpan> {
    tracer.stop_after_closes(pairs, &["events lost"]);
    rx.spans()
}

/// One end's trace: its root and its state spans in order.
struct End {
    root: ReceivedSpan,
    states: Vec<ReceivedSpan>,
}

impl End {
    fn of(spans: &[ReceivedSpan], local: u16, peer: u16) -> End {
        let (root, states) =
            trace_of(spans, local, peer).unwrap_or_else(|| panic!("no trace of {local} -> {peer}"));
        End { root, states }
    }

    fn state(&self, name: &str) -> &ReceivedSpan {
        self.states
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span among {:?}", self.names()))
    }

    fn names(&self) -> Vec<&str> {
        self.states.iter().map(|s| s.name.as_str()).collect()
    }

    fn error_type(&self) -> Option<&str> {
        self.root.str_attr("error.type")
    }

    fn count(&self, key: &str) -> i64 {
        self.root
            .int_attr(key)
            .unwrap_or_else(|| panic!("root has no {key}: {:?}", self.root.attributes))
    }

    /// Events named `name` on every state span but `except`.
    fn events_elsewhere(&self, except: &str, name: &str) -> usize {
        self.states
            .iter()
            .filter(|s| s.name != except)
            .map(|s| events(s, name).len())
            .sum()
    }

    fn assert_failed(&self, error_type: &str) {
        assert_eq!(self.error_type(), Some(error_type), "{:?}", self.root);
        assert_eq!(self.root.status_code, STATUS_ERROR);
        assert!(!self.root.status_message.is_empty());
    }

    fn assert_clean(&self) {
        assert_eq!(self.error_type(), None, "{:?}", self.root);
        assert_ne!(self.root.status_code, STATUS_ERROR);
        for span in &self.states {
            assert_eq!(span.events, [], "{} has events", span.name);
            assert_ne!(span.status_code, STATUS_ERROR);
        }
        assert_eq!(self.count("tcpstates.retransmits"), 0);
        assert_eq!(self.count("tcpstates.resets.sent"), 0);
        assert_eq!(self.count("tcpstates.resets.received"), 0);
    }

    /// Retransmissions counted on the root: what the kernel counted.
    fn assert_retransmits_match_the_kernel(&self) -> i64 {
        let seen = self.count("tcpstates.retransmits");
        assert_eq!(
            seen,
            self.count("tcpstates.total_retrans"),
            "retransmissions seen vs the kernel's total_retrans"
        );
        seen
    }
}

/// The kernel's count of the socket's retransmitted segments (`TCP_INFO`).
fn total_retrans(stream: &TcpStream) -> u32 {
    support::tcp_info(stream).tcpi_total_retrans
}

fn events<'a>(span: &'a ReceivedSpan, name: &str) -> Vec<&'a ReceivedEvent> {
    span.events.iter().filter(|e| e.name == name).collect()
}

fn assert_within(span: &ReceivedSpan, event: &ReceivedEvent) {
    assert!(
        (span.start_ns..=span.end_ns).contains(&event.time_ns),
        "{} at {} is outside {} [{}, {}]",
        event.name,
        event.time_ns,
        span.name,
        span.start_ns,
        span.end_ns
    );
}

/// A TCP socket of `family` bound to the loopback with a port of its own.
fn bound_socket(v6: bool) -> (OwnedFd, u16) {
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = socket(family, SockType::Stream, SockFlag::empty(), None).unwrap();
    let port = if v6 {
        bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from("[::1]:0".parse::<std::net::SocketAddrV6>().unwrap()),
        )
        .unwrap();
        getsockname::<SockaddrIn6>(fd.as_raw_fd()).unwrap().port()
    } else {
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
        getsockname::<SockaddrIn>(fd.as_raw_fd()).unwrap().port()
    };
    (fd, port)
}

fn connect_to(fd: &OwnedFd, to: SocketAddr) -> nix::Result<()> {
    match to {
        SocketAddr::V4(v4) => connect(fd.as_raw_fd(), &SockaddrIn::from(v4)),
        SocketAddr::V6(v6) => connect(fd.as_raw_fd(), &SockaddrIn6::from(v6)),
    }
}

fn loopback(v6: bool) -> &'static str {
    if v6 { "::1" } else { "127.0.0.1" }
}

#[test]
fn a_refused_connect_is_connection_refused_with_the_reset_on_syn_sent() {
    if !root_or_skip("a_refused_connect_is_connection_refused_with_the_reset_on_syn_sent") {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = start(&rx);
    let mut ends = Vec::new();
    let mut held = Vec::new();
    for v6 in [false, true] {
        let (_listener, addr) = listen(loopback(v6));
        drop(_listener);
        let (fd, local) = bound_socket(v6);
        assert_eq!(connect_to(&fd, addr), Err(Errno::ECONNREFUSED));
        ends.push((local, addr.port()));
        // Open until the end: no later socket gets its port.
        held.push(fd);
    }
    let spans = finish(tracer, &rx, &ends);
    for &(local, peer) in &ends {
        let end = End::of(&spans, local, peer);
        assert_eq!(end.names(), ["SYN_SENT"]);
        end.assert_failed("connection_refused");
        let syn_sent = end.state("SYN_SENT");
        let resets = events(syn_sent, RESET_RECEIVED);
        assert_eq!(resets.len(), 1, "{:?}", syn_sent.events);
        assert_within(syn_sent, resets[0]);
        let errors = events(syn_sent, ERROR);
        assert_eq!(errors.len(), 1, "{:?}", syn_sent.events);
        assert_eq!(errors[0].int_attr("tcpstates.errno"), Some(111));
        assert_eq!(
            errors[0].str_attr("tcpstates.errno.name"),
            Some("ECONNREFUSED")
        );
        assert_eq!(syn_sent.str_attr("error.type"), Some("connection_refused"));
        assert_eq!(syn_sent.status_code, STATUS_ERROR);
        assert_eq!(end.count("tcpstates.resets.received"), 1);
        assert_eq!(end.count("tcpstates.retransmits"), 0);
    }
}

#[test]
fn a_blackholed_syn_with_one_retry_times_out() {
    if !root_or_skip("a_blackholed_syn_with_one_retry_times_out") {
        return;
    }
    let _serial = load::serial();
    // As for one dropped SYN (below): in rare runs with a core kept busy, the
    // state change to CLOSE that the SYN timer's softirq makes never reached
    // the ring, nor was it counted as skipped. The connection is then made
    // again, at most twice more; a daemon that never shows it still fails.
    let mut attempt = 1;
    let (spans, local, port, sent_again) = loop {
        let rx = Receiver::start();
        let tracer = start(&rx);
        let (listener, addr) = listen("127.0.0.1");
        let fault = Fault::drop_syns(addr.port());
        let (fd, local) = bound_socket(false);
        set_syn_retries(&fd, 1);
        // One SYN, one retransmission 1 s later; the kernel gives up when the
        // time those retries take (3 s) has passed, and its timer may send one
        // more first.
        assert_eq!(connect_to(&fd, addr), Err(Errno::ETIMEDOUT));
        let sent_again = fault.matched() - 1;
        assert!(
            (1..=2).contains(&sent_again),
            "{sent_again} SYNs sent again"
        );
        drop(fault);
        // The CLOSE came before connect returned: the daemon shows it within
        // its poll interval, far less than this.
        let close = format!(",{local},127.0.0.1,{},SYN_SENT,CLOSE,", addr.port());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !tracer.lines().iter().any(|l| l.contains(&close))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        if attempt < 3 && !tracer.lines().iter().any(|l| l.contains(&close)) {
            eprintln!("attempt {attempt}: no SYN_SENT -> CLOSE of {local}; again");
            drop(tracer.stop());
            attempt += 1;
            continue;
        }
        let spans = finish(tracer, &rx, &[(local, addr.port())]);
        drop((fd, listener));
        break (spans, local, addr.port(), sent_again);
    };
    let end = End::of(&spans, local, port);
    end.assert_failed("timed_out");
    let syn_sent = end.state("SYN_SENT");
    // One event per SYN the kernel sent again, each where iptables saw it.
    let retransmits = events(syn_sent, RETRANSMIT);
    assert_eq!(
        retransmits.len() as u64,
        sent_again,
        "{:?}",
        syn_sent.events
    );
    for event in &retransmits {
        assert_eq!(event.str_attr("tcpstates.retransmit.kind"), Some("syn"));
        assert_within(syn_sent, event);
    }
    let errors = events(syn_sent, ERROR);
    assert_eq!(errors.len(), 1, "{:?}", syn_sent.events);
    assert_eq!(
        errors[0].str_attr("tcpstates.errno.name"),
        Some("ETIMEDOUT")
    );
    assert_eq!(end.assert_retransmits_match_the_kernel() as u64, sent_again);
}

#[test]
fn an_abortive_close_is_reset_sent_on_one_end_and_reset_by_peer_on_the_other() {
    if !root_or_skip("an_abortive_close_is_reset_sent_on_one_end_and_reset_by_peer_on_the_other") {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = start(&rx);
    let mut pairs = Vec::new();
    let mut listeners = Vec::new();
    for v6 in [false, true] {
        let (listener, addr) = listen(loopback(v6));
        let client = TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        let cp = client.local_addr().unwrap().port();
        abort_on_close(&client);
        drop(client);
        let mut buf = [0u8; 1];
        assert_eq!(
            (&server).read(&mut buf).map_err(|e| e.kind()).unwrap_err(),
            std::io::ErrorKind::ConnectionReset
        );
        pairs.push((cp, addr.port()));
        // Open until the last: an aborted connection leaves no TIME_WAIT, and a
        // later listener could get the same port.
        listeners.push(listener);
    }
    let ends: Vec<(u16, u16)> = pairs.iter().flat_map(|&(c, s)| [(c, s), (s, c)]).collect();
    let spans = finish(tracer, &rx, &ends);
    for &(cp, sp) in &pairs {
        let client = End::of(&spans, cp, sp);
        client.assert_failed("reset_sent");
        let established = client.state("ESTABLISHED");
        let sent = events(established, RESET_SENT);
        assert_eq!(sent.len(), 1, "{:?}", established.events);
        assert!(sent[0].str_attr("tcpstates.reset.reason").is_some());
        // Sent as the socket entered CLOSE: at most the grace after the span.
        assert!(sent[0].time_ns >= established.start_ns);
        assert_eq!(client.count("tcpstates.resets.sent"), 1);
        assert_eq!(client.count("tcpstates.resets.received"), 0);

        let server = End::of(&spans, sp, cp);
        server.assert_failed("reset_by_peer");
        let established = server.state("ESTABLISHED");
        let received = events(established, RESET_RECEIVED);
        assert_eq!(received.len(), 1, "{:?}", established.events);
        assert_within(established, received[0]);
        let errors = events(established, ERROR);
        assert_eq!(
            errors
                .iter()
                .map(|e| e.str_attr("tcpstates.errno.name"))
                .collect::<Vec<_>>(),
            [Some("ECONNRESET")]
        );
        assert_eq!(server.count("tcpstates.resets.received"), 1);
        assert_eq!(server.count("tcpstates.resets.sent"), 0);
    }
}

/// One connection on loopback, client closing first, with `fault` on its
/// listener's port matching exactly one packet (`what`); its spans and ports.
fn one_connection_with(fault: fn(u16) -> Fault, what: &str) -> (Vec<ReceivedSpan>, u16, u16) {
    let rx = Receiver::start();
    let tracer = start(&rx);
    let (listener, addr) = listen("127.0.0.1");
    let fault = fault(addr.port());
    let client = TcpStream::connect(addr).unwrap();
    let (server, _) = listener.accept().unwrap();
    assert_eq!(fault.matched(), 1, "{what}");
    drop(fault);
    let cp = client.local_addr().unwrap().port();
    drop(client);
    let mut buf = [0u8; 1];
    assert_eq!((&server).read(&mut buf).unwrap(), 0);
    drop(server);
    let spans = finish(tracer, &rx, &[(cp, addr.port()), (addr.port(), cp)]);
    (spans, cp, addr.port())
}

#[test]
fn one_dropped_syn_is_one_retransmit_about_one_rto_into_syn_sent_and_no_error() {
    if !root_or_skip("one_dropped_syn_is_one_retransmit_about_one_rto_into_syn_sent_and_no_error") {
        return;
    }
    let _serial = load::serial();
    // In about 1 run of 50 with a core kept busy, none of the daemon's programs
    // ran in the softirq that sent the SYN again: no record reached the ring and
    // the kernel counted no skip (`recursion_misses` stayed 0; seen with a counter
    // inside the programs). Userspace cannot see such a loss, so the connection is
    // made again then, at most twice more; a daemon that never shows the
    // retransmission still fails.
    let mut attempt = 1;
    let (spans, cp, sp) = loop {
        let (spans, cp, sp) = one_connection_with(Fault::drop_first_syn, "one SYN dropped");
        let seen = !events(End::of(&spans, cp, sp).state("SYN_SENT"), RETRANSMIT).is_empty();
        if seen || attempt == 3 {
            break (spans, cp, sp);
        }
        eprintln!("attempt {attempt}: no record of the SYN's retransmission; again");
        attempt += 1;
    };
    let end = End::of(&spans, cp, sp);
    assert_eq!(end.error_type(), None);
    assert_ne!(end.root.status_code, STATUS_ERROR);
    let syn_sent = end.state("SYN_SENT");
    let retransmits = events(syn_sent, RETRANSMIT);
    assert_eq!(retransmits.len(), 1, "{:?}", syn_sent.events);
    assert_eq!(
        retransmits[0].str_attr("tcpstates.retransmit.kind"),
        Some("syn")
    );
    assert_within(syn_sent, retransmits[0]);
    // The SYN went again when its timer expired: one initial RTO after the first,
    // which left as the span began; the handshake ended just after it.
    let after = Duration::from_nanos(retransmits[0].time_ns - syn_sent.start_ns);
    assert!(
        after >= INITIAL_RTO.mul_f64(0.9),
        "retransmitted after {after:?}"
    );
    assert_eq!(events(syn_sent, ERROR), Vec::<&ReceivedEvent>::new());
    assert_eq!(end.events_elsewhere("SYN_SENT", RETRANSMIT), 0);
    assert_eq!(end.assert_retransmits_match_the_kernel(), 1);
    End::of(&spans, sp, cp).assert_clean();
}

#[test]
fn a_dropped_data_segment_is_retransmitted_in_established_as_the_kernel_counts() {
    if !root_or_skip("a_dropped_data_segment_is_retransmitted_in_established_as_the_kernel_counts")
    {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = start(&rx);
    let (listener, addr) = listen("127.0.0.1");
    let mut client = TcpStream::connect(addr).unwrap();
    let (mut server, _) = listener.accept().unwrap();
    let fault = Fault::drop_data_segment(addr.port(), 1);
    client.write_all(&[7; PAYLOAD]).unwrap();
    let mut got = [0u8; PAYLOAD];
    server.read_exact(&mut got).unwrap();
    assert_eq!(fault.matched(), 1, "one data segment dropped");
    drop(fault);
    let cp = client.local_addr().unwrap().port();
    drop(client);
    let mut buf = [0u8; 1];
    assert_eq!(server.read(&mut buf).unwrap(), 0);
    drop(server);
    let spans = finish(tracer, &rx, &[(cp, addr.port()), (addr.port(), cp)]);
    let end = End::of(&spans, cp, addr.port());
    assert_eq!(end.error_type(), None);
    let established = end.state("ESTABLISHED");
    let retransmits = events(established, RETRANSMIT);
    assert!(!retransmits.is_empty(), "{:?}", established.events);
    for event in &retransmits {
        assert_within(established, event);
        let kind = event.str_attr("tcpstates.retransmit.kind");
        assert!(
            matches!(kind, Some("timeout" | "fast" | "loss_probe")),
            "{kind:?}"
        );
    }
    let seen = end.assert_retransmits_match_the_kernel();
    assert_eq!(seen, retransmits.len() as i64, "one segment each");
    assert_eq!(end.events_elsewhere("ESTABLISHED", RETRANSMIT), 0);
}

#[test]
fn a_lost_handshake_ack_shows_the_synack_retransmit_on_the_servers_syn_recv() {
    if !root_or_skip("a_lost_handshake_ack_shows_the_synack_retransmit_on_the_servers_syn_recv") {
        return;
    }
    let _serial = load::serial();
    let (spans, cp, sp) =
        one_connection_with(Fault::drop_handshake_ack, "one handshake ACK dropped");
    let end = End::of(&spans, sp, cp);
    assert_eq!(end.error_type(), None);
    let syn_recv = end.state("SYN_RECV");
    let retransmits = events(syn_recv, RETRANSMIT);
    assert_eq!(retransmits.len(), 1, "{:?}", syn_recv.events);
    assert_eq!(
        retransmits[0].str_attr("tcpstates.retransmit.kind"),
        Some("synack")
    );
    // The listener sent it before this socket existed (it is made when the
    // handshake completes): before the span.
    assert!(retransmits[0].time_ns <= syn_recv.start_ns);
    assert_eq!(end.assert_retransmits_match_the_kernel(), 1);
}

#[test]
fn clean_connections_have_no_error_and_no_events_ipv4_and_ipv6() {
    if !root_or_skip("clean_connections_have_no_error_and_no_events_ipv4_and_ipv6") {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = start(&rx);
    let mut ends = Vec::new();
    for v6 in [false, true] {
        let (listener, addr) = listen(loopback(v6));
        let mut client = TcpStream::connect(addr).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        client.write_all(&[1; PAYLOAD]).unwrap();
        let mut got = [0u8; PAYLOAD];
        server.read_exact(&mut got).unwrap();
        server.write_all(&got).unwrap();
        client.read_exact(&mut got).unwrap();
        let cp = client.local_addr().unwrap().port();
        drop(client);
        let mut buf = [0u8; 1];
        assert_eq!(server.read(&mut buf).unwrap(), 0);
        drop(server);
        ends.extend([(cp, addr.port()), (addr.port(), cp)]);
        // A listener closing is no failure either.
        drop(listener);
    }
    let spans = finish(tracer, &rx, &ends);
    for &(local, peer) in &ends {
        End::of(&spans, local, peer).assert_clean();
    }
    let listeners: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|s| s.str_attr("tcpstates.role") == Some("listener"))
        .collect();
    assert!(!listeners.is_empty());
    for root in listeners {
        assert_eq!(root.str_attr("error.type"), None);
        assert_ne!(root.status_code, STATUS_ERROR);
    }
    // Every event name the daemon may write is one the README names.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    for name in ALL_EVENTS {
        assert!(readme.contains(&format!("`{name}`")), "README names {name}");
    }
}

/// A bulk transfer over a link that loses 1% of the packets, between two network
/// namespaces of the test: fast retransmits, timeouts and congestion states, each
/// retransmission seen, none lost.
#[test]
fn bulk_over_a_lossy_link_counts_every_retransmission() {
    if !root_or_skip("bulk_over_a_lossy_link_counts_every_retransmission") {
        return;
    }
    let _serial = load::serial();
    let link = support::netns::LossyLink::new("inc", 0.01);
    let rx = Receiver::start();
    let tracer = start(&rx);
    // At least this much, and on until the kernel retransmitted a few times: over
    // veth a segment can be a 64 KiB GSO packet, so 8 MiB may be as few as ~250
    // packets both ways, all of which a 1% loss spares one time in twelve.
    const BYTES: usize = 8 << 20;
    const MAX_BYTES: usize = 512 << 20;
    const RETRANSMITS: u32 = 3;
    let server_addr: SocketAddr = format!("{}:5001", link.b_addr).parse().unwrap();
    let listener = link.in_b(move || TcpListener::bind(server_addr).unwrap());
    let reader = thread::spawn(move || {
        let (mut server, _) = listener.accept().unwrap();
        let mut total = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = server.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let mut client = link.in_a(move || TcpStream::connect(server_addr).unwrap());
    let cp = client.local_addr().unwrap().port();
    let chunk = vec![9u8; 1 << 16];
    let mut sent = 0;
    while sent < BYTES || (total_retrans(&client) < RETRANSMITS && sent < MAX_BYTES) {
        client.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
    client.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(reader.join().unwrap(), sent);
    drop(client);
    let spans = finish(tracer, &rx, &[(cp, 5001), (5001, cp)]);
    let sender = End::of(&spans, cp, 5001);
    assert_eq!(sender.error_type(), None);
    let seen = sender.assert_retransmits_match_the_kernel();
    assert!(
        seen >= i64::from(RETRANSMITS),
        "1% loss over {sent} bytes: the socket said it retransmitted {RETRANSMITS} times"
    );
    let established = sender.state("ESTABLISHED");
    let kept = events(established, RETRANSMIT).len() + events(established, CONGESTION).len();
    assert!(kept > 0);
    assert!(
        established.events.len() <= 64,
        "at most 64 events per span, the rest counted"
    );
    if established.events.len() == 64 {
        assert!(established.dropped_events_count > 0);
    }
    let receiver = End::of(&spans, 5001, cp);
    assert_eq!(receiver.error_type(), None);
    receiver.assert_retransmits_match_the_kernel();
}
