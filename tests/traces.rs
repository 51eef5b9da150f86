//! Traces on the wire: the real daemon exports over OTLP (gRPC, HTTP, and through
//! the independent rotel collector) to a receiver in the test, while the test opens
//! and closes real connections.
mod support;

use std::{
    net::{TcpListener, TcpStream},
    os::fd::AsFd as _,
    thread,
    time::{Duration, Instant},
};

use nix::sys::{
    signal::Signal,
    socket::{setsockopt, sockopt::Linger},
};
use support::{
    otlp::{
        FAST, KIND_CLIENT, KIND_INTERNAL, KIND_SERVER, ROOT, ReceivedSpan, Receiver, STATUS_ERROR,
        STATUS_UNSET, Value, WAIT, names, trace_of,
    },
    rotel::Rotel,
    *,
};

fn str_attr<'a>(span: &'a ReceivedSpan, key: &str) -> &'a str {
    span.str_attr(key)
        .unwrap_or_else(|| panic!("{} has no string {key}: {:?}", span.name, span.attributes))
}

fn int_attr(span: &ReceivedSpan, key: &str) -> i64 {
    span.int_attr(key)
        .unwrap_or_else(|| panic!("{} has no int {key}: {:?}", span.name, span.attributes))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// One client and one accepted socket, exported over gRPC, checked against the
/// kernel-measured durations the same daemon prints.
#[test]
fn grpc_traces_match_the_kernel() {
    if !root_or_skip("grpc_traces_match_the_kernel") {
        return;
    }
    let rx = Receiver::start();
    let endpoint = rx.grpc_endpoint();
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--print",
            "-s",
        ],
        FAST,
    );
    let (listener, server) = listen("127.0.0.1");
    let (client, _) = connect_hold_close(&listener, Duration::from_millis(200));
    let (cp, sp) = (client.port(), server.port());
    let spans = rx.wait_for(WAIT, |s| {
        trace_of(s, cp, sp).is_some() && trace_of(s, sp, cp).is_some()
    });
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    let text = rows(&done.lines, false);
    let me = std::process::id() as i64;
    let comm = thread_comm();

    for (local, peer, kind, states, role) in [
        (
            cp,
            sp,
            KIND_CLIENT,
            ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"],
            "client",
        ),
        (
            sp,
            cp,
            KIND_SERVER,
            ["SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK"],
            "server",
        ),
    ] {
        let (root, children) = trace_of(&spans, local, peer)
            .unwrap_or_else(|| panic!("no trace for {local}->{peer} in {spans:#?}"));
        // The tree: one root, the states in order, each a child of the root.
        let in_trace = spans.iter().filter(|s| s.trace_id == root.trace_id);
        assert_eq!(in_trace.filter(|s| s.parent_span_id.is_empty()).count(), 1);
        assert_eq!(names(&children), states, "{role}");
        for child in &children {
            assert_eq!(child.parent_span_id, root.span_id);
            assert_eq!(child.kind, KIND_INTERNAL);
            assert_eq!(child.status_code, STATUS_UNSET);
            assert_eq!(str_attr(child, "tcpstates.state"), child.name);
            assert_eq!(int_attr(child, "network.local.port"), i64::from(local));
        }
        for pair in children.windows(2) {
            assert_eq!(pair[0].end_ns, pair[1].start_ns, "states follow each other");
            assert_eq!(str_attr(&pair[0], "tcpstates.next_state"), pair[1].name);
        }
        assert_eq!(
            (root.start_ns, root.end_ns),
            (children[0].start_ns, children[3].end_ns)
        );
        assert_eq!(str_attr(&children[3], "tcpstates.next_state"), "CLOSE");

        // Root: kind, status, semantic-convention attributes, owner.
        assert_eq!(root.kind, kind, "{role}");
        assert_eq!(root.status_code, STATUS_UNSET);
        assert_eq!(str_attr(&root, "network.transport"), "tcp");
        assert_eq!(str_attr(&root, "network.type"), "ipv4");
        assert_eq!(str_attr(&root, "network.local.address"), "127.0.0.1");
        assert_eq!(str_attr(&root, "network.peer.address"), "127.0.0.1");
        assert_eq!(int_attr(&root, "network.peer.port"), i64::from(peer));
        assert_eq!(int_attr(&root, "client.port"), i64::from(cp));
        assert_eq!(int_attr(&root, "server.port"), i64::from(sp));
        assert_eq!(str_attr(&root, "client.address"), "127.0.0.1");
        assert_eq!(int_attr(&root, "process.pid"), me, "{role}");
        assert_eq!(str_attr(&root, "process.executable.name"), comm, "{role}");
        assert_eq!(str_attr(&root, "tcpstates.role"), role);
        assert_eq!(root.bool_attr("tcpstates.begin_seen"), Some(true));
        assert_eq!(str_attr(&root, "tcpstates.end_reason"), "closed");
        assert_eq!(
            root.resource.get("service.name"),
            Some(&Value::Str("otel-tcpstates".into()))
        );
        assert_eq!(
            root.resource.get("host.name"),
            Some(&Value::Str(hostname()))
        );
        assert_eq!(
            root.resource.get("telemetry.sdk.language"),
            Some(&Value::Str("rust".into()))
        );
        assert_eq!(root.transport, "grpc");

        // Each state lasted exactly what the kernel measured and the text shows.
        let sock = socket_rows(&text, |r| r.lport == local && r.rport == peer);
        assert_eq!(sock.len(), 5, "{sock:#?}");
        for (child, row) in children.iter().zip(&sock[1..]) {
            assert_eq!(child.name, row.old);
            assert_eq!(
                format!("{:.3}", child.duration_ns() as f64 / 1e6),
                format!("{:.3}", row.ms),
                "{role} {}",
                child.name
            );
        }
        assert!(
            children[1].duration_ns() >= 200_000_000,
            "held ESTABLISHED 200 ms"
        );
        assert_eq!(str_attr(&root, "tcpstates.skaddr"), sock[0].skaddr);
    }
}

/// Failures over OTLP/HTTP: a refused connect and an abortive close are errors.
#[test]
fn http_failed_connections_are_errors() {
    if !root_or_skip("http_failed_connections_are_errors") {
        return;
    }
    let rx = Receiver::start();
    let endpoint = rx.http_endpoint();
    let tracer = Tracer::start_with_env(&["--otlp-endpoint", &endpoint, "--print", "-s"], FAST);

    let refused_port = closed_port();
    TcpStream::connect(("127.0.0.1", refused_port)).unwrap_err();
    let (listener, server) = listen("127.0.0.1");
    let client = TcpStream::connect(server).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    let cp = client.local_addr().unwrap().port();
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(&client.as_fd(), Linger, &linger).unwrap();
    drop(client);

    let refused = |s: &[ReceivedSpan]| {
        s.iter()
            .find(|s| {
                s.name == ROOT && s.int_attr("network.peer.port") == Some(i64::from(refused_port))
            })
            .cloned()
    };
    let spans = rx.wait_for(WAIT, |s| {
        refused(s).is_some()
            && trace_of(s, cp, server.port()).is_some()
            && trace_of(s, server.port(), cp).is_some()
    });
    drop(accepted);
    drop(tracer);

    let root = refused(&spans).expect("refused connection's trace");
    assert_eq!((root.kind, root.status_code), (KIND_CLIENT, STATUS_ERROR));
    assert!(
        root.status_message.contains("refused"),
        "{}",
        root.status_message
    );
    assert_eq!(root.transport, "http");
    let children: Vec<_> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id && s.name != ROOT)
        .collect();
    assert_eq!(children.len(), 1);
    assert_eq!(
        (children[0].name.as_str(), children[0].status_code),
        ("SYN_SENT", STATUS_ERROR)
    );

    let (root, children) = trace_of(&spans, cp, server.port()).unwrap();
    assert_eq!(names(&children), ["SYN_SENT", "ESTABLISHED"]);
    assert_eq!(root.status_code, STATUS_ERROR);
    assert_eq!(root.str_attr("error.type"), Some("reset_sent"));
    assert_eq!(
        root.status_message,
        "reset sent: the connection was aborted with an RST"
    );
    assert_eq!(children[1].status_code, STATUS_ERROR);
    let (peer, _) = trace_of(&spans, server.port(), cp).unwrap();
    assert_eq!((peer.kind, peer.status_code), (KIND_SERVER, STATUS_ERROR));
}

/// The kernel reuses a closed socket's address for the next socket: each is its
/// own trace.
#[test]
fn a_reused_socket_address_is_a_new_trace() {
    if !root_or_skip("a_reused_socket_address_is_a_new_trace") {
        return;
    }
    let rx = Receiver::start();
    let endpoint = rx.http_endpoint();
    let (listener, server) = listen("127.0.0.1");
    let port = server.port().to_string();
    let tracer = Tracer::start_with_env(&["--otlp-endpoint", &endpoint, "-D", &port], FAST);
    let clients: Vec<u16> = (0..40)
        .map(|_| connect_hold_close(&listener, Duration::ZERO).0.port())
        .collect();
    let spans = rx.wait_for(WAIT, |s| {
        clients
            .iter()
            .all(|&c| trace_of(s, c, server.port()).is_some())
    });
    drop(tracer);

    let roots: Vec<ReceivedSpan> = clients
        .iter()
        .map(|&c| {
            trace_of(&spans, c, server.port())
                .expect("every client traced")
                .0
        })
        .collect();
    let mut traces: Vec<&str> = roots.iter().map(|r| r.trace_id.as_str()).collect();
    traces.sort_unstable();
    traces.dedup();
    assert_eq!(traces.len(), roots.len(), "one trace per socket");
    let mut addresses: Vec<&str> = roots
        .iter()
        .map(|r| str_attr(r, "tcpstates.skaddr"))
        .collect();
    addresses.sort_unstable();
    addresses.dedup();
    assert!(
        addresses.len() < roots.len(),
        "the kernel reused no socket address across 40 sequential sockets, so reuse was not tested"
    );
}

/// `--max-sockets 8` with 50 connections held open: 42 sessions are evicted and
/// exported as such, the 8 left are ended by the shutdown, and the counts agree.
#[test]
fn a_full_session_table_evicts_and_shutdown_flushes() {
    if !root_or_skip("a_full_session_table_evicts_and_shutdown_flushes") {
        return;
    }
    let rx = Receiver::start();
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
    let endpoint = rx.grpc_endpoint();
    // The listener exists before the tracer, so only the 50 accepted sockets count.
    let (listener, server) = listen("127.0.0.1");
    let port = server.port().to_string();
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--max-sockets",
            "8",
            "-L",
            &port,
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
            "--print",
            "-s",
        ],
        FAST,
    );
    let mut open = Vec::new();
    for _ in 0..50 {
        let client = TcpStream::connect(server).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        open.push((client, accepted));
    }
    tracer.wait_for("50 established accepted sockets", |lines| {
        rows(lines, false)
            .iter()
            .filter(|r| r.new == "ESTABLISHED")
            .count()
            == 50
    });
    let evicted = |s: &[ReceivedSpan]| {
        s.iter()
            .filter(|s| s.name == ROOT && s.str_attr("tcpstates.end_reason") == Some("evicted"))
            .count()
    };
    rx.wait_for(WAIT, |s| evicted(s) == 42);
    let done = tracer.stop_with(Signal::SIGTERM);
    eprintln!("exit after {:.2?}", done.took);
    assert!(done.status.success(), "{:?}", done.stderr);
    assert!(
        done.took < SHUTDOWN_TIMEOUT + EXIT_GRACE,
        "shutdown took {:?}",
        done.took
    );
    let spans = rx.wait_for(WAIT, |s| s.iter().filter(|s| s.name == ROOT).count() == 50);
    drop(open);

    let roots: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.name == ROOT).collect();
    let reason = |r: &&ReceivedSpan| str_attr(r, "tcpstates.end_reason").to_owned();
    let count = |why: &str| roots.iter().filter(|r| reason(r) == why).count();
    assert_eq!(
        (roots.len(), count("evicted"), count("shutdown")),
        (50, 42, 8)
    );
    for root in &roots {
        // Every accepted socket was in ESTABLISHED when ended: that span is cut
        // short at the same moment as its root, with the same reason.
        let children: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.parent_span_id == root.span_id)
            .collect();
        assert_eq!(
            names(&children.iter().map(|c| (*c).clone()).collect::<Vec<_>>()),
            ["SYN_RECV", "ESTABLISHED"]
        );
        let open_state = children.iter().find(|c| c.name == "ESTABLISHED").unwrap();
        assert_eq!(open_state.end_ns, root.end_ns);
        assert_eq!(
            open_state.str_attr("tcpstates.end_reason"),
            Some(reason(root).as_str())
        );
        assert_eq!(open_state.str_attr("tcpstates.next_state"), None);
        assert_eq!(root.kind, KIND_SERVER);
    }
    let summary = done
        .stderr
        .iter()
        .find(|l| l.contains("sockets traced"))
        .unwrap_or_else(|| panic!("no summary in {:?}", done.stderr));
    assert!(
        summary.contains(
            "50 sockets traced (42 evicted, 0 replaced, 8 open at exit), 150 spans: 150 exported, \
             0 failed"
        ),
        "{summary}"
    );
}

/// Whatever the collector does, the daemon exits promptly on SIGTERM.
#[test]
fn exit_is_bounded_when_the_collector_is_unreachable_or_hangs() {
    if !root_or_skip("exit_is_bounded_when_the_collector_is_unreachable_or_hangs") {
        return;
    }
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    // Accepts connections and never answers.
    let hanging = TcpListener::bind("127.0.0.1:0").unwrap();
    let hanging_addr = hanging.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hanging.incoming() {
            held.push(conn);
        }
    });
    let cases = [
        ("unreachable", format!("http://127.0.0.1:{}", closed_port())),
        ("hanging", format!("http://{hanging_addr}")),
    ];
    for (what, endpoint) in cases {
        for protocol in ["grpc", "http/protobuf"] {
            let tracer = Tracer::start_with_env(
                &[
                    "--otlp-endpoint",
                    &endpoint,
                    "--otlp-protocol",
                    protocol,
                    "--shutdown-timeout",
                    &SHUTDOWN_TIMEOUT.as_secs().to_string(),
                ],
                &[
                    ("OTEL_BSP_SCHEDULE_DELAY", "50"),
                    ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
                ],
            );
            let (listener, _) = listen("127.0.0.1");
            connect_hold_close(&listener, Duration::ZERO);
            thread::sleep(Duration::from_millis(300));
            let done = tracer.stop_with(Signal::SIGTERM);
            eprintln!("{what} {protocol}: exit after {:.2?}", done.took);
            assert!(
                done.status.success(),
                "{what} {protocol}: {:?}",
                done.stderr
            );
            assert!(
                done.took < SHUTDOWN_TIMEOUT + EXIT_GRACE,
                "{what} {protocol}: exit took {:?} with --shutdown-timeout {SHUTDOWN_TIMEOUT:?}",
                done.took
            );
        }
    }
}

/// Through an independent collector: daemon → rotel (OTLP/gRPC) → our receiver.
#[test]
fn traces_pass_through_the_rotel_collector() {
    if !root_or_skip("traces_pass_through_the_rotel_collector") {
        return;
    }
    let rx = Receiver::start();
    let rotel = Rotel::start(&rx.grpc_endpoint());
    let endpoint = rotel.grpc_endpoint();
    let tracer = Tracer::start_with_env(
        &["--otlp-endpoint", &endpoint, "--otlp-protocol", "grpc"],
        FAST,
    );
    let started = Instant::now();
    let (listener, server) = listen("127.0.0.1");
    let (client, _) = connect_hold_close(&listener, Duration::from_millis(20));
    let spans = rx.wait_for(WAIT, |s| {
        trace_of(s, client.port(), server.port()).is_some()
    });
    drop(tracer);
    let (root, children) = trace_of(&spans, client.port(), server.port()).unwrap_or_else(|| {
        panic!(
            "nothing arrived through rotel in {:?}: {:?}",
            started.elapsed(),
            rotel.output()
        )
    });
    assert_eq!(
        names(&children),
        ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
    );
    assert!(children.iter().all(|c| c.parent_span_id == root.span_id));
    assert_eq!(root.kind, KIND_CLIENT);
    assert_eq!(
        root.resource.get("service.name"),
        Some(&Value::Str("otel-tcpstates".into()))
    );
    assert!(children[1].duration_ns() >= 20_000_000);
}
