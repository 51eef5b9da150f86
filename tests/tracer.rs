//! End-to-end tests of the tracer against the real kernel: the real eBPF program
//! is loaded by the real binary, and the tests open real loopback connections.
mod support;

use std::{
    io::Read as _,
    net::{SocketAddr, TcpStream},
    os::fd::AsFd as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::sys::socket::{setsockopt, sockopt::Linger};
use support::*;

const CLIENT: &[(&str, &str)] = &[
    ("CLOSE", "SYN_SENT"),
    ("SYN_SENT", "ESTABLISHED"),
    ("ESTABLISHED", "FIN_WAIT1"),
    ("FIN_WAIT1", "FIN_WAIT2"),
    ("FIN_WAIT2", "CLOSE"),
];
const SERVER: &[(&str, &str)] = &[
    ("LISTEN", "SYN_RECV"),
    ("SYN_RECV", "ESTABLISHED"),
    ("ESTABLISHED", "CLOSE_WAIT"),
    ("CLOSE_WAIT", "LAST_ACK"),
    ("LAST_ACK", "CLOSE"),
];

fn both_closed(rows: &[Row], client: SocketAddr, server_port: u16) -> bool {
    let client_done = rows
        .iter()
        .any(|r| r.lport == client.port() && r.rport == server_port && r.new == "CLOSE");
    let server_done = rows
        .iter()
        .any(|r| r.lport == server_port && r.rport == client.port() && r.new == "CLOSE");
    client_done && server_done
}

/// Full client and server sequences, addresses, ports, pid/comm and durations.
fn lifecycle(ip: &str, ip_version: u8) {
    let tracer = Tracer::start(&["-s", "-t"]);
    let (listener, server) = listen(ip);
    let hold = Duration::from_millis(200);
    let (client, wall) = connect_hold_close(&listener, hold);
    let lines = tracer.wait_for("both sockets to close", |lines| {
        both_closed(&rows(lines, true), client, server.port())
    });
    drop(tracer);
    let rows = rows(&lines, true);
    let me = std::process::id();
    let comm = thread_comm();

    let c = socket_rows(&rows, |r| {
        r.lport == client.port() && r.rport == server.port()
    });
    assert_eq!(transitions(&c), CLIENT, "client rows: {c:#?}");
    let s = socket_rows(&rows, |r| {
        r.lport == server.port() && r.rport == client.port()
    });
    assert_eq!(transitions(&s), SERVER, "server rows: {s:#?}");

    for r in c.iter().chain(&s) {
        assert_eq!(r.ip, ip_version);
        assert_eq!((r.laddr.as_str(), r.raddr.as_str()), (ip, ip));
    }
    // The connect() assigns the local port after entering SYN_SENT, so the first
    // row carries port 0, as in bcc's tcpstates.
    assert_eq!(c[0].lport, 0);
    assert!(c[1..].iter().all(|r| r.lport == client.port()));
    assert!(c.iter().all(|r| r.rport == server.port()));
    assert!(
        s.iter()
            .all(|r| r.lport == server.port() && r.rport == client.port())
    );

    // Transitions made by our own system calls carry our pid and thread name.
    for r in [&c[0], &c[2], &s[3]] {
        assert_eq!((r.pid, r.comm.as_str()), (me, comm.as_str()), "{r:?}");
    }

    // ESTABLISHED lasted at least as long as we held it, and not much longer.
    for r in [&c[2], &s[2]] {
        assert!(r.ms >= 200.0, "ESTABLISHED lasted {} ms: {r:?}", r.ms);
        assert!(
            r.ms < wall.as_secs_f64() * 1e3,
            "{} ms > wall {wall:?}",
            r.ms
        );
    }

    // A socket's state durations add up to its lifetime (timestamps and durations
    // are printed at microsecond precision, so allow a few µs of rounding).
    for sock in [&c, &s] {
        let lifetime_ms =
            (sock.last().unwrap().timestamp.unwrap() - sock[0].timestamp.unwrap()) * 1e3;
        let sum_ms: f64 = sock[1..].iter().map(|r| r.ms).sum();
        assert!(
            (lifetime_ms - sum_ms).abs() < 0.005,
            "durations sum to {sum_ms} ms, lifetime {lifetime_ms} ms: {sock:#?}"
        );
        assert!(lifetime_ms >= 200.0 && lifetime_ms < wall.as_secs_f64() * 1e3);
    }
}

#[test]
fn ipv4_connection_lifecycle() {
    if root_or_skip("ipv4_connection_lifecycle") {
        lifecycle("127.0.0.1", 4);
    }
}

#[test]
fn ipv6_connection_lifecycle() {
    if root_or_skip("ipv6_connection_lifecycle") {
        lifecycle("::1", 6);
    }
}

#[test]
fn refused_connect_goes_from_syn_sent_to_close() {
    if !root_or_skip("refused_connect_goes_from_syn_sent_to_close") {
        return;
    }
    let tracer = Tracer::start(&["-s"]);
    let port = closed_port();
    let err = TcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    let lines = tracer.wait_for("the refused socket to close", |lines| {
        rows(lines, false)
            .iter()
            .any(|r| r.rport == port && r.new == "CLOSE")
    });
    let rows = rows(&lines, false);
    let sock = socket_rows(&rows, |r| r.rport == port && r.old == "SYN_SENT");
    assert_eq!(
        transitions(&sock),
        [("CLOSE", "SYN_SENT"), ("SYN_SENT", "CLOSE")]
    );
    assert_eq!(sock[0].pid, std::process::id());
}

#[test]
fn abortive_close_goes_from_established_to_close() {
    if !root_or_skip("abortive_close_goes_from_established_to_close") {
        return;
    }
    let tracer = Tracer::start(&["-s"]);
    let (listener, server) = listen("127.0.0.1");
    let client = TcpStream::connect(server).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let client_port = client.local_addr().unwrap().port();
    setsockopt(
        &client.as_fd(),
        Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(client); // sends RST
    let mut buf = [0u8; 1];
    assert!(
        (&accepted).read(&mut buf).is_err(),
        "server should see a reset"
    );
    let lines = tracer.wait_for("the aborted socket to close", |lines| {
        rows(lines, false)
            .iter()
            .any(|r| r.lport == client_port && r.new == "CLOSE")
    });
    let rows = rows(&lines, false);
    let sock = socket_rows(&rows, |r| {
        r.lport == client_port && r.rport == server.port()
    });
    assert_eq!(
        transitions(&sock),
        [
            ("CLOSE", "SYN_SENT"),
            ("SYN_SENT", "ESTABLISHED"),
            ("ESTABLISHED", "CLOSE")
        ]
    );
    assert_eq!(
        sock[2].pid,
        std::process::id(),
        "close() runs in our context"
    );
    // The peer, reset, also goes straight from ESTABLISHED to CLOSE.
    let peer = socket_rows(&rows, |r| {
        r.lport == server.port() && r.rport == client_port
    });
    assert_eq!(
        transitions(&peer).last(),
        Some(&("ESTABLISHED", "CLOSE")),
        "{peer:#?}"
    );
}

/// Opens, holds briefly and closes one connection to each listener.
fn traffic(listeners: &[&std::net::TcpListener]) -> Vec<(SocketAddr, SocketAddr)> {
    listeners
        .iter()
        .map(|l| {
            let (client, _) = connect_hold_close(l, Duration::from_millis(1));
            (client, l.local_addr().unwrap())
        })
        .collect()
}

/// Runs `args` while making connections to two IPv4 and one IPv6 listener, and
/// returns the rows seen plus (client, server) address pairs.
fn filtered(args: &[&str], extra: &[&str]) -> (Vec<Row>, Vec<(SocketAddr, SocketAddr)>) {
    let (a, _) = listen("127.0.0.1");
    let (b, _) = listen("127.0.0.1");
    let (v6, _) = listen("::1");
    let ports = [
        a.local_addr().unwrap().port().to_string(),
        b.local_addr().unwrap().port().to_string(),
    ];
    let args: Vec<&str> = args
        .iter()
        .map(|&arg| match arg {
            "{A}" => ports[0].as_str(),
            other => other,
        })
        .chain(extra.iter().copied())
        .collect();
    let tracer = Tracer::start(&args);
    let pairs = traffic(&[&a, &b, &v6]);
    // Every transition is queued in the kernel before its system call returns, and
    // the tracer drains the queue before exiting, so stopping now loses nothing.
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    (rows(&done.lines, false), pairs)
}

fn has_socket(rows: &[Row], local_port: u16, remote_port: u16) -> bool {
    rows.iter()
        .any(|r| r.lport == local_port && r.rport == remote_port)
}

#[test]
fn local_port_filter() {
    if !root_or_skip("local_port_filter") {
        return;
    }
    let (rows, pairs) = filtered(&["-s", "-L", "{A}"], &[]);
    let [(ca, sa), (cb, sb), (c6, s6)] = pairs[..] else {
        unreachable!()
    };
    // Only the socket whose local port is A: the server side of the first connection.
    let server_a = socket_rows(&rows, |r| r.lport == sa.port() && r.rport == ca.port());
    assert_eq!(transitions(&server_a), SERVER);
    assert!(rows.iter().all(|r| r.lport == sa.port()), "{rows:#?}");
    assert!(!has_socket(&rows, ca.port(), sa.port()));
    assert!(!has_socket(&rows, sb.port(), cb.port()));
    assert!(!has_socket(&rows, s6.port(), c6.port()));
}

#[test]
fn remote_port_filter() {
    if !root_or_skip("remote_port_filter") {
        return;
    }
    let (rows, pairs) = filtered(&["-s", "-D", "{A}"], &[]);
    let [(ca, sa), (cb, sb), _] = pairs[..] else {
        unreachable!()
    };
    let client_a = socket_rows(&rows, |r| r.lport == ca.port() && r.rport == sa.port());
    assert_eq!(transitions(&client_a), CLIENT);
    assert!(rows.iter().all(|r| r.rport == sa.port()), "{rows:#?}");
    assert!(!has_socket(&rows, cb.port(), sb.port()));
}

/// `-4` or `-6`: the connection of that family is kept whole, the other is gone.
fn family_filter(test: &str, flag: &str, version: u8) {
    if !root_or_skip(test) {
        return;
    }
    let (rows, pairs) = filtered(&["-s", flag], &[]);
    let [v4, _, v6] = pairs[..] else {
        unreachable!()
    };
    let ((kc, ks), (dc, ds)) = if version == 4 { (v4, v6) } else { (v6, v4) };
    assert_eq!(
        transitions(&socket_rows(&rows, |r| r.lport == kc.port() && r.rport == ks.port())),
        CLIENT
    );
    assert!(rows.iter().all(|r| r.ip == version), "{rows:#?}");
    assert!(!has_socket(&rows, dc.port(), ds.port()));
}

#[test]
fn ipv4_filter() {
    family_filter("ipv4_filter", "-4", 4);
}

#[test]
fn ipv6_filter() {
    family_filter("ipv6_filter", "-6", 6);
}

#[test]
fn pid_filter_keeps_the_owners_sockets_only() {
    if !root_or_skip("pid_filter_keeps_the_owners_sockets_only") {
        return;
    }
    let me = std::process::id().to_string();
    let (listener, server) = listen("127.0.0.1");
    let tracer = Tracer::start(&["-s", "-p", &me]);
    // Our own connection...
    let (mine, _) = connect_hold_close(&listener, Duration::from_millis(1));
    // ...and one made by another process (bash's /dev/tcp).
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{}; read -t 5 -u 3 || true",
        server.port()
    );
    let mut bash = Command::new("bash")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let (theirs, peer) = listener.accept().unwrap();
    drop(theirs); // bash sees EOF, exits and closes its socket
    assert!(bash.wait().unwrap().success());
    let started = Instant::now();
    let lines = tracer.wait_for(
        "our accepted socket of bash's connection to close",
        |lines| {
            rows(lines, false)
                .iter()
                .any(|r| r.lport == server.port() && r.rport == peer.port() && r.new == "CLOSE")
        },
    );
    // Give a wrongly kept row of bash's socket time to show up.
    thread::sleep(Duration::from_millis(100).saturating_sub(started.elapsed()));
    let done = tracer.stop();
    let rows = rows(&done.lines, false);
    assert!(lines.len() <= done.lines.len());

    assert_eq!(
        transitions(&socket_rows(&rows, |r| r.lport == mine.port()
            && r.rport == server.port())),
        CLIENT
    );
    assert!(
        !has_socket(&rows, peer.port(), server.port()),
        "bash's socket must be filtered out: {rows:#?}"
    );
    // The socket we accepted from bash is ours from the moment our close() shows
    // we own it; its earlier, softirq-driven transitions have no known owner yet.
    let accepted = socket_rows(&rows, |r| {
        r.lport == server.port() && r.rport == peer.port()
    });
    assert_eq!(
        transitions(&accepted),
        [
            ("ESTABLISHED", "FIN_WAIT1"),
            ("FIN_WAIT1", "FIN_WAIT2"),
            ("FIN_WAIT2", "CLOSE")
        ]
    );
}
