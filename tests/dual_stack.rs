//! A dual-stack server (an IPv6 socket on `::` that also accepts IPv4, as Go,
//! Java and nginx with `[::]` listen) and IPv4 clients: the kernel names the
//! accepted sockets IPv6 with IPv4-mapped addresses (`::ffff:a.b.c.d`). Spans and
//! metrics say what they are, IPv4; `-4` keeps them; the text columns stay bcc's.
mod support;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::fd::{FromRawFd as _, IntoRawFd as _},
    thread,
    time::{Duration, Instant},
};

use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrIn6, bind, listen, setsockopt, socket,
    sockopt::Ipv6V6Only,
};
use support::{
    otlp::{KIND_SERVER, Receiver, WAIT, trace_of},
    *,
};

const DURATION: &str = "tcpstates.connection.duration";
/// Metrics every 200 ms, spans promptly.
const ENV: &[(&str, &str)] = &[
    ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
    ("OTEL_BSP_SCHEDULE_DELAY", "50"),
];

/// A listener on `[::]` with IPV6_V6ONLY off, whatever the sysctl default.
fn dual_stack_listener() -> TcpListener {
    let fd = socket(
        AddressFamily::Inet6,
        SockType::Stream,
        SockFlag::empty(),
        None,
    )
    .unwrap();
    setsockopt(&fd, Ipv6V6Only, &false).unwrap();
    let any = SockaddrIn6::from(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        0,
        0,
        0,
    ));
    use std::os::fd::AsRawFd as _;
    bind(fd.as_raw_fd(), &any).unwrap();
    listen(&fd, nix::sys::socket::Backlog::new(16).unwrap()).unwrap();
    // SAFETY: a listening TCP socket whose descriptor we own and hand over.
    unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

/// A daemon exporting to a receiver of its own, also printing CSV rows.
fn exporting(filter: &[&str]) -> (Receiver, Tracer) {
    let rx = Receiver::start();
    let endpoint = rx.grpc_endpoint();
    let mut args = vec![
        "--otlp-endpoint",
        endpoint.as_str(),
        "--otlp-protocol",
        "grpc",
        "--metrics-peer-address",
        "--print",
        "-s",
    ];
    args.extend(filter);
    let tracer = Tracer::start_with_env(&args, ENV);
    (rx, tracer)
}

/// Spans and metrics say IPv4 with dotted addresses, with no filter and with
/// `-4`, which keeps the connection (its owner from the `::` listener); the text
/// columns stay bcc's; `-6` shows only the listener.
#[test]
fn ipv4_clients_of_a_dual_stack_server_are_ipv4() {
    if !root_or_skip("ipv4_clients_of_a_dual_stack_server_are_ipv4") {
        return;
    }
    let (rx_all, all) = exporting(&[]);
    let (rx_v4, only_v4) = exporting(&["-4"]);
    let only_v6 = Tracer::start(&["-s", "-6"]);

    let listener = dual_stack_listener();
    let sp = listener.local_addr().unwrap().port();
    let client = TcpStream::connect(("127.0.0.1", sp)).unwrap();
    let (server, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip().to_string(), "::ffff:127.0.0.1", "a mapped peer");
    let cp = client.local_addr().unwrap().port();
    (&client).write_all(b"hi\n").unwrap();
    let mut line = String::new();
    BufReader::new(&server).read_line(&mut line).unwrap();
    drop(client);
    assert_eq!((&server).read(&mut [0u8; 1]).unwrap(), 0);
    drop(server);
    drop(listener);

    let me = i64::from(std::process::id());
    for (rx, filter) in [(&rx_all, "no filter"), (&rx_v4, "-4")] {
        let spans = rx.wait_for(WAIT, |s| {
            trace_of(s, sp, cp).is_some() && trace_of(s, cp, sp).is_some()
        });
        for (local, peer, role) in [(sp, cp, "server"), (cp, sp, "client")] {
            let (root, children) = trace_of(&spans, local, peer).unwrap_or_else(|| {
                panic!("{filter}: no {role} trace {local}->{peer} in {spans:#?}")
            });
            let attr = |key| root.str_attr(key).unwrap_or_default().to_owned();
            assert_eq!(
                (
                    attr("network.type"),
                    attr("network.local.address"),
                    attr("network.peer.address")
                ),
                ("ipv4".into(), "127.0.0.1".into(), "127.0.0.1".into()),
                "{filter}, {role}: {root:#?}"
            );
            assert!(!children.is_empty(), "{filter}, {role}");
            // The server's owner came from the dual-stack listener.
            assert_eq!(root.int_attr("process.pid"), Some(me), "{filter}, {role}");
            if role == "server" {
                assert_eq!(root.kind, KIND_SERVER);
            }
        }
    }

    // The connection metrics: one server connection on the port, IPv4, dotted.
    let rx = &rx_all;
    let port = sp.to_string();
    let deadline = Instant::now() + WAIT;
    let server_points = |network: &str| {
        rx.series(DURATION).map_or(0, |s| {
            s.matching(
                &[
                    ("tcpstates.role", "server"),
                    ("server.port", &port),
                    ("network.type", network),
                    ("network.peer.address", "127.0.0.1"),
                ],
                &[],
            )
            .map(|p| p.count())
            .sum::<i64>()
        })
    };
    while server_points("ipv4") < 1 {
        assert!(
            Instant::now() < deadline,
            "no IPv4 server duration on :{sp}: {:#?}",
            rx.series(DURATION)
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server_points("ipv4"), 1);
    // Only the listener on `::` is IPv6.
    let v6_roles: Vec<String> = rx.series(DURATION).map_or(Vec::new(), |s| {
        s.matching(&[("server.port", &port), ("network.type", "ipv6")], &[])
            .map(|p| p.str_attr("tcpstates.role").unwrap_or_default().to_owned())
            .collect()
    });
    assert!(
        v6_roles.iter().all(|role| role == "listener"),
        "{:#?}",
        rx.series(DURATION)
    );

    // Text, with no filter and with -4: the accepted socket with bcc's columns
    // (the family and the address as the kernel gives them), the dual-stack
    // listener it came from, and the IPv4 client.
    for (daemon, filter) in [(all, "no filter"), (only_v4, "-4")] {
        let done = daemon.stop();
        assert!(done.status.success(), "{:?}", done.stderr);
        let text = rows(&done.lines, false);
        let accepted = socket_rows(&text, |r| {
            r.lport == sp && r.rport == cp && r.transition() == ("LISTEN", "SYN_RECV")
        });
        assert!(!accepted.is_empty(), "{filter}: no server rows: {text:#?}");
        for row in &accepted {
            assert_eq!(
                (row.ip, row.laddr.as_str(), row.raddr.as_str()),
                (6, "::ffff:127.0.0.1", "::ffff:127.0.0.1"),
                "{filter}: {row:?}"
            );
        }
        assert_eq!(
            accepted.last().unwrap().transition(),
            ("LAST_ACK", "CLOSE"),
            "{filter}: {accepted:#?}"
        );
        let listener_rows: Vec<(&str, &str)> = text
            .iter()
            .filter(|r| r.lport == sp && r.laddr == "::" && r.raddr == "::")
            .map(Row::transition)
            .collect();
        assert_eq!(
            listener_rows,
            [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")],
            "{filter}: the dual-stack listener"
        );
        let client_rows = socket_rows(&text, |r| r.lport == cp && r.rport == sp);
        assert!(
            !client_rows.is_empty()
                && client_rows
                    .iter()
                    .all(|r| r.ip == 4 && r.laddr == "127.0.0.1"),
            "{filter}: {client_rows:#?}"
        );
    }

    // -6: the listener (it is IPv6), not the IPv4 connection it accepted.
    let done = only_v6.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    let text = rows(&done.lines, false);
    let on_port: Vec<&Row> = text
        .iter()
        .filter(|r| r.lport == sp || r.rport == sp)
        .collect();
    assert!(
        on_port.iter().all(|r| r.laddr == "::" && r.raddr == "::"),
        "-6 showed IPv4 connections: {on_port:#?}"
    );
    assert_eq!(on_port.len(), 2, "-6: the listener's rows {on_port:#?}");
}
