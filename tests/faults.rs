//! Faults around the daemon: the collector gone, back, or hanging; more events
//! than it can take; a signal under load; secrets in headers.
//!
//! Every test here takes [`load::serial`]: some load the machine's two cores, and
//! the others' timings and zero-loss checks must not share them.
mod support;

use std::{
    collections::HashMap,
    net::TcpStream,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use support::{
    load::{
        self, CLIENT_SPANS, CLIENT_TRANSITIONS, Churn, CpuLimit, RssSampler, Server, Stats,
        Summary, abort_on_close, lost_reported, rss_kib, wait_until,
    },
    otlp::{FAST, ROOT, ReceivedSpan, Receiver, WAIT},
    *,
};

const KIB_PER_MIB: u64 = 1024;

/// The collector is down when the daemon starts and comes back later: tracing goes
/// on, the failures are counted, and export resumes by itself.
#[test]
fn export_resumes_when_the_collector_comes_back() {
    if !root_or_skip("export_resumes_when_the_collector_comes_back") {
        return;
    }
    let _serial = load::serial();
    let port = closed_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--print",
            "-s",
            "--stats-interval",
            "1",
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
        ],
    );
    let (listener, server) = listen("127.0.0.1");
    // Traced while the collector is down.
    let (before, _) = connect_hold_close(&listener, Duration::ZERO);
    tracer.wait_for("the first connection's CLOSE", |lines| {
        rows(lines, false)
            .iter()
            .any(|r| r.lport == before.port() && r.new == "CLOSE")
    });
    // The failure is said at once; the request is retried for its timeout (2 s)
    // and then counted failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !tracer.stderr().iter().any(|l| l.contains("failed (")) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            tracer.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }
    while !Stats::last(&tracer.stderr()).is_some_and(|s| s.failed > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            tracer.stderr()
        );
        thread::sleep(Duration::from_millis(50));
    }

    let rx = Receiver::start_at(port, 0);
    let (after, _) = connect_hold_close(&listener, Duration::ZERO);
    let root_of = |s: &[support::otlp::ReceivedSpan], local: u16| {
        s.iter().any(|s| {
            s.name == "tcp.session"
                && s.int_attr("network.local.port") == Some(i64::from(local))
                && s.int_attr("network.peer.port") == Some(i64::from(server.port()))
        })
    };
    let spans = rx.wait_for(Duration::from_secs(30), |s| root_of(s, after.port()));
    assert!(
        root_of(&spans, after.port()),
        "export did not resume: {:?}",
        tracer.stderr()
    );
    // The outage's spans may still arrive (the exporter retries) or be counted
    // failed: either way, nothing is lost silently (the summary below).
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    let said = done.stderr.join("\n");
    assert!(said.contains("works again"), "{said}");
    let summary = load::Summary::parse(&done.stderr);
    assert!(summary.failed > 0, "failures must be counted: {summary:?}");
    summary.assert_every_span_accounted();
}

/// An auth token in the OTLP headers never shows in what the daemon says, even
/// with every diagnostic on and the collector failing.
#[test]
fn header_secrets_stay_out_of_logs() {
    if !root_or_skip("header_secrets_stay_out_of_logs") {
        return;
    }
    let _serial = load::serial();
    const SECRET: &str = "s3cr3t-t0ken-do-not-log";
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    for protocol in ["grpc", "http/protobuf"] {
        let tracer = Tracer::start_with_env(
            &[
                "--otlp-endpoint",
                &endpoint,
                "--otlp-protocol",
                protocol,
                "-vv",
            ],
            &[
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    &format!("authorization=Bearer {SECRET}"),
                ),
                ("OTEL_TCPSTATES_LOG", "trace"),
            ],
        );
        let (listener, _) = listen("127.0.0.1");
        connect_hold_close(&listener, Duration::ZERO);
        thread::sleep(Duration::from_millis(500));
        let done = tracer.stop();
        let said = done.stderr.join("\n");
        assert!(
            said.contains("failed"),
            "{protocol}: the export should have failed: {said}"
        );
        assert!(
            !said.contains(SECRET),
            "{protocol}: secret in the logs:\n{said}"
        );
    }
    // Nor in the one-line error for a malformed header list.
    let out = std::process::Command::new(BIN)
        .args(["--otlp-endpoint", &endpoint])
        .env("OTEL_EXPORTER_OTLP_HEADERS", format!("a=b,{SECRET}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains(SECRET), "{stderr}");
}

/// The one-line counters, logged at the interval asked for, agree with what the
/// daemon printed and exported.
#[test]
fn stats_line_counts_what_happened() {
    if !root_or_skip("stats_line_counts_what_happened") {
        return;
    }
    let _serial = load::serial();
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
            "--stats-interval",
            "1",
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    let (listener, _) = listen("127.0.0.1");
    let clients: Vec<u16> = (0..5)
        .map(|_| connect_hold_close(&listener, Duration::ZERO).0.port())
        .collect();
    let printed = tracer
        .wait_for("the clients' CLOSE", |lines| {
            let rows = rows(lines, false);
            clients
                .iter()
                .all(|&c| rows.iter().any(|r| r.lport == c && r.new == "CLOSE"))
        })
        .len()
        - 1;
    let before = tracer.stderr().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let line = loop {
        let stderr = tracer.stderr();
        if let Some(line) = stderr[before..].iter().find(|l| l.contains("stats:")) {
            break line.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no stats line in {stderr:?}"
        );
        thread::sleep(Duration::from_millis(50));
    };
    drop(tracer);
    let stats = load::Stats::parse(&line);
    assert!(stats.seen >= printed as u64, "{line} vs {printed} rows");
    assert_eq!(stats.lost, 0, "{line}");
    assert!(stats.started >= 10, "5 connections, 10 sockets: {line}");
    assert!(stats.exported <= stats.produced, "{line}");
    assert_eq!(stats.failed, 0, "{line}");
}

/// Whether `spans` hold the root of the client socket on `local` talking to `peer`.
fn has_root(spans: &[ReceivedSpan], local: u16, peer: u16) -> bool {
    spans.iter().any(|s| {
        s.name == ROOT
            && s.int_attr("network.local.port") == Some(i64::from(local))
            && s.int_attr("network.peer.port") == Some(i64::from(peer))
    })
}

/// The collector dies while the daemon exports to it, over each protocol: tracing
/// goes on, the failure is said and counted, and when a collector comes back at
/// the same address, export resumes by itself.
#[test]
fn export_survives_the_collector_dying_mid_run() {
    if !root_or_skip("export_survives_the_collector_dying_mid_run") {
        return;
    }
    let _serial = load::serial();
    for protocol in ["grpc", "http/protobuf"] {
        // Below the ephemeral range: no connection can take them while it is down.
        let (grpc_port, http_port) = (load::quiet_port(), load::quiet_port());
        let rx = Receiver::start_at(grpc_port, http_port);
        let (endpoint, transport) = match protocol {
            "grpc" => (rx.grpc_endpoint(), "grpc"),
            _ => (rx.http_endpoint(), "http"),
        };
        let tracer = Tracer::start_with_env(
            &[
                "--otlp-endpoint",
                &endpoint,
                "--otlp-protocol",
                protocol,
                "--print",
                "-s",
                "--stats-interval",
                "1",
            ],
            &[
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
            ],
        );
        let (listener, server) = listen("127.0.0.1");
        let sp = server.port();
        let printed_close = |client: u16| {
            tracer.wait_for("a client's CLOSE", |lines| {
                rows(lines, false)
                    .iter()
                    .any(|r| r.lport == client && r.rport == sp && r.new == "CLOSE")
            });
        };

        // Up: exported.
        let (first, _) = connect_hold_close(&listener, Duration::ZERO);
        let spans = rx.wait_for(WAIT, |s| has_root(s, first.port(), sp));
        assert!(
            has_root(&spans, first.port(), sp),
            "{protocol}: not exported"
        );
        assert!(spans.iter().all(|s| s.transport == transport), "{protocol}");

        // Down (listeners and open connections closed): still traced and printed,
        // the failure is said, and once a request's timeout (2 s) of retries has
        // passed, its spans are counted failed.
        drop(rx);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut outage = 0;
        loop {
            let (client, _) = connect_hold_close(&listener, Duration::ZERO);
            printed_close(client.port());
            outage += 1;
            let stderr = tracer.stderr();
            if outage >= 3
                && stderr.iter().any(|l| l.contains("failed ("))
                && Stats::last(&stderr).is_some_and(|s| s.failed > 0)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{protocol}: no export failure said after {outage} connections: {:?}",
                tracer.stderr()
            );
            thread::sleep(Duration::from_millis(100));
        }

        // Back at the same address: a connection made now is exported. (The
        // exporter may need a few tries to reconnect; each try is a new connection.)
        let rx = Receiver::start_at(grpc_port, http_port);
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut after = Vec::new();
        loop {
            let (client, _) = connect_hold_close(&listener, Duration::ZERO);
            after.push(client.port());
            let arrived = |s: &[ReceivedSpan]| after.iter().any(|&c| has_root(s, c, sp));
            let spans = rx.wait_for(Duration::from_secs(1), arrived);
            if arrived(&spans) {
                assert!(spans.iter().all(|s| s.transport == transport), "{protocol}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{protocol}: export did not resume: {:?}",
                tracer.stderr()
            );
        }
        wait_until("\"works again\"", Duration::from_secs(5), || {
            tracer.stderr().iter().any(|l| l.contains("works again"))
        });

        let done = tracer.stop_with(Signal::SIGTERM);
        assert!(done.status.success(), "{protocol}: {:?}", done.stderr);
        let summary = Summary::parse(&done.stderr);
        eprintln!(
            "{protocol}: {outage} connections during the outage, {} tries to resume; {summary:?}",
            after.len()
        );
        assert!(summary.failed > 0, "{protocol}: {summary:?}");
        assert!(summary.exported > 0, "{protocol}: {summary:?}");
        assert_eq!(
            summary.exported + summary.failed + summary.not_sent(),
            summary.spans,
            "{protocol}: {summary:?}"
        );
    }
}

/// The CSV row of a client socket's reset: its last transition.
fn close_row_of(client_port: u16, server_port: u16) -> String {
    format!(",127.0.0.1,{client_port},127.0.0.1,{server_port},ESTABLISHED,CLOSE,")
}

/// A collector that takes connections and never answers, while thousands of
/// connections churn: the export queue overflows and says so, but tracing never
/// waits for the exporter (each probe connection is printed promptly, every
/// transition is printed, none lost), memory stays bounded, and SIGTERM exits
/// within the shutdown timeout.
#[test]
fn hanging_collector_under_load_keeps_the_daemon_responsive() {
    if !root_or_skip("hanging_collector_under_load_keeps_the_daemon_responsive") {
        return;
    }
    let _serial = load::serial();
    // About 4 s of churn, so several exports time out while it runs.
    const CONNECTIONS: u64 = 12_000;
    const PER_SECOND: f64 = 3000.0;
    // 512 queued spans of ~1 KiB plus the daemon's ~45 MiB exporting at full churn
    // (see BENCHMARKS.md): 128 MiB leaves a wide margin, and still catches a queue
    // that grows with the backlog.
    const RSS_BOUND_MIB: u64 = 128;
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    // Printed this soon after the connection closed, under load. The daemon's own
    // bound is its poll (10 ms here) plus one drain slice (20 ms), whatever the
    // exporter does; this leaves 100 times that for a slow, busy machine.
    const PROMPT: Duration = Duration::from_secs(3);
    let collector = load::hanging_collector();
    let server = Server::start();
    let port = server.port().to_string();
    let endpoint = format!("http://{collector}");
    let tracer = Tracer::start_release(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--print",
            "-s",
            "-D",
            &port,
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
            "--stats-interval",
            "1",
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1000"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "512"),
        ],
    );
    let rss = RssSampler::start(tracer.pid(), Duration::from_millis(50));

    let churn = Churn::start(server.addr(), 3, Some(PER_SECOND), Some(CONNECTIONS));
    // While it churns, one probe connection at a time: printed within PROMPT.
    let mut probes = 0u64;
    let mut slowest = Duration::ZERO;
    while churn.connections() < CONNECTIONS {
        let probe = TcpStream::connect(server.addr()).unwrap();
        let probe_port = probe.local_addr().unwrap().port();
        abort_on_close(&probe);
        drop(probe);
        probes += 1;
        let closed = Instant::now();
        let want = close_row_of(probe_port, server.port());
        let mut seen_lines = 0;
        wait_until("a probe's CLOSE printed", PROMPT, || {
            let lines = tracer.lines();
            let found = lines[seen_lines..].iter().any(|l| l.contains(&want));
            seen_lines = lines.len();
            found
        });
        slowest = slowest.max(closed.elapsed());
        thread::sleep(Duration::from_millis(100));
    }
    let made = churn.finish_within(Duration::from_secs(40));
    assert_eq!(made.connections, CONNECTIONS, "{made:?}");
    let connections = made.connections + probes;
    let expected = made.client_transitions() + probes * CLIENT_TRANSITIONS;
    tracer.wait_for("every transition printed", |lines| {
        (lines.len() - 1) as u64 >= expected
    });
    wait_until("the spans-dropped warning", Duration::from_secs(10), || {
        tracer.stderr().iter().any(|l| l.contains("spans dropped"))
    });
    let before_stop = tracer.stderr().len();
    wait_until(
        "a stats line after the churn",
        Duration::from_secs(5),
        || {
            tracer.stderr()[before_stop..]
                .iter()
                .any(|l| l.contains("stats:"))
        },
    );
    let stats = Stats::last(&tracer.stderr()).unwrap();
    let done = tracer.stop_with(Signal::SIGTERM);
    let peak = rss.peak_kib();
    let summary = Summary::parse(&done.stderr);
    eprintln!(
        "{connections} connections in {:.2?} ({probes} probes, slowest printed after {slowest:.2?}); \
         exit after {:.2?}; peak RSS {peak} KiB; {stats:?}; {summary:?}",
        made.took, done.took
    );

    assert!(done.status.success(), "{:?}", done.stderr);
    assert!(
        done.took < SHUTDOWN_TIMEOUT + EXIT_GRACE,
        "exit took {:?} with --shutdown-timeout {SHUTDOWN_TIMEOUT:?}",
        done.took
    );
    // Nothing lost, nothing printed twice: every transition once, every CLOSE.
    let printed = rows(&done.lines, false);
    assert_eq!(printed.len() as u64, expected);
    let closes = printed
        .iter()
        .filter(|r| r.transition() == ("ESTABLISHED", "CLOSE"))
        .count() as u64;
    assert_eq!(closes, connections);
    assert_eq!(stats.lost, 0, "{stats:?}");
    assert!(
        !done.stderr.iter().any(|l| l.contains("events lost")),
        "{:?}",
        done.stderr
    );
    // The export side: all spans made, none accepted, the overflow dropped.
    assert_eq!(summary.sessions, connections, "{summary:?}");
    assert_eq!(summary.spans, connections * CLIENT_SPANS, "{summary:?}");
    assert_eq!(summary.exported, 0, "{summary:?}");
    assert!(summary.failed > 0 && summary.not_sent() > 0, "{summary:?}");
    summary.assert_every_span_accounted();
    assert!(
        peak < RSS_BOUND_MIB * KIB_PER_MIB,
        "peak RSS {peak} KiB, bound {RSS_BOUND_MIB} MiB"
    );
}

/// More events than userspace can take: with the daemon stopped, a flood of
/// connections overflows its 1 MiB ring buffer. The kernel side never waits for
/// the daemon (the flood runs at full speed and completes), every transition the
/// test caused is either printed or counted lost, exactly, the losses are
/// reported, and memory stays bounded.
#[test]
fn overload_losses_are_counted_and_memory_stays_bounded() {
    if !root_or_skip("overload_losses_are_counted_and_memory_stays_bounded") {
        return;
    }
    let _serial = load::serial();
    // 60,000 client transitions; a 1 MiB ring buffer holds under 11,000 events.
    const CONNECTIONS: u64 = 20_000;
    // Text mode peaks at ~22 MiB in the benchmark; a leak per lost event or a
    // runaway buffer would exceed this.
    const RSS_BOUND_MIB: u64 = 64;
    let server = Server::start();
    let port = server.port().to_string();
    // -D: only the test's client sockets, so the count is exact whatever else runs.
    let tracer = Tracer::start_release(&["-s", "-D", &port, "--ring-buffer-mib", "1"], &[]);
    let rss = RssSampler::start(tracer.pid(), Duration::from_millis(20));
    let pid = Pid::from_raw(tracer.pid() as i32);

    kill(pid, Signal::SIGSTOP).unwrap();
    let made = Churn::start(server.addr(), 2, None, Some(CONNECTIONS))
        .finish_within(Duration::from_secs(40));
    kill(pid, Signal::SIGCONT).unwrap();
    let expected = made.client_transitions();
    eprintln!(
        "flood with the daemon stopped: {} connections ({} failed) in {:.2?}, {:.0}/s",
        made.connections,
        made.failed,
        made.took,
        made.per_second()
    );
    assert_eq!(made.connections, CONNECTIONS, "{made:?}");

    // Running again, it prints what the buffer held and reports the rest as lost.
    wait_until(
        "every transition printed or reported lost",
        Duration::from_secs(20),
        || (tracer.lines().len() - 1) as u64 + lost_reported(&tracer.stderr()) >= expected,
    );
    let rss_after = rss_kib(tracer.pid()).unwrap();
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);

    let printed = rows(&done.lines, false);
    let (total_line, lost) = load::lost_in_total(&done.stderr);
    let peak = rss.peak_kib();
    eprintln!(
        "printed {}, lost {lost} of {expected} transitions; RSS after the flood {} KiB, peak {} KiB",
        printed.len(),
        rss_after,
        peak
    );
    assert!(
        lost > 0 && !printed.is_empty(),
        "printed {}, lost {lost}: the buffer did not overflow, so loss was not tested",
        printed.len()
    );
    assert_eq!(
        printed.len() as u64 + lost,
        expected,
        "printed {} + lost {lost} vs {expected} transitions caused",
        printed.len()
    );
    // Reported while running too, and the running reports add up to the total.
    assert_eq!(lost_reported(&done.stderr), lost, "{:?}", done.stderr);
    assert!(total_line.contains("--ring-buffer-mib"), "{total_line}");
    // Only the test's transitions, each of the three kinds a churned client makes.
    for row in &printed {
        assert_eq!(row.rport, server.port(), "{row:?}");
        assert!(
            matches!(
                row.transition(),
                ("CLOSE", "SYN_SENT") | ("SYN_SENT", "ESTABLISHED") | ("ESTABLISHED", "CLOSE")
            ),
            "{row:?}"
        );
    }
    assert!(
        peak < RSS_BOUND_MIB * KIB_PER_MIB,
        "peak RSS {peak} KiB, bound {RSS_BOUND_MIB} MiB"
    );
}

/// SIGTERM while 200 connections are held open and two threads churn more: the
/// daemon exits 0 within its shutdown timeout, and every session in flight is
/// ended (`shutdown`) and flushed to the collector, which is up throughout.
#[test]
fn sigterm_under_load_flushes_every_in_flight_session() {
    if !root_or_skip("sigterm_under_load_flushes_every_in_flight_session") {
        return;
    }
    let _serial = load::serial();
    const HELD: usize = 200;
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
    // 6,000 spans/s (6 per connection, both ends): load, well within what the
    // export path takes on a slow machine with another process busy on one core,
    // so the backlog at the signal is small and the shutdown's flush is what is
    // tested. Overload, which tests the ring buffer and the cut-offs instead, has
    // its own tests.
    const CHURN_PER_SECOND: f64 = 1000.0;
    let rx = Receiver::start();
    let endpoint = rx.grpc_endpoint();
    // -p: only this process's sockets, not whatever else the host runs meanwhile.
    let me = std::process::id().to_string();
    let tracer = Tracer::start_release(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
            "-p",
            &me,
        ],
        FAST,
    );
    // Listening after the tracer started, so the accepted sockets are ours too.
    // It holds each accepted socket until its client closes.
    let server = Server::start();
    let sp = server.port();
    let held: Vec<TcpStream> = (0..HELD)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    let held_ports: Vec<u16> = held
        .iter()
        .map(|c| c.local_addr().unwrap().port())
        .collect();
    wait_until(
        "the held connections accepted",
        Duration::from_secs(10),
        || server.accepted() >= HELD as u64,
    );

    let churn = Churn::start(server.addr(), 2, Some(CHURN_PER_SECOND), None);
    thread::sleep(Duration::from_secs(2)); // the load the signal lands in
    let churned_before = churn.connections();
    let done = tracer.stop_with(Signal::SIGTERM);
    let made = churn.stop();
    let summary = Summary::parse(&done.stderr);
    // The daemon is gone, and the receiver records a request before answering it:
    // every span the daemon counted as exported is here.
    let spans = rx.spans();
    // (local port, peer port) of every root ended by the shutdown, in one pass:
    // there are tens of thousands of spans.
    let mut ended: HashMap<(u16, u16), usize> = HashMap::new();
    for s in &spans {
        if s.name == ROOT && s.str_attr("tcpstates.end_reason") == Some("shutdown") {
            let port = |key| s.int_attr(key).unwrap_or(0) as u16;
            *ended
                .entry((port("network.local.port"), port("network.peer.port")))
                .or_default() += 1;
        }
    }
    let shutdown_roots = |local: u16, peer: u16| ended.get(&(local, peer)).copied().unwrap_or(0);
    let missing_clients: Vec<u16> = held_ports
        .iter()
        .copied()
        .filter(|&c| shutdown_roots(c, sp) != 1)
        .collect();
    let missing_servers: Vec<u16> = held_ports
        .iter()
        .copied()
        .filter(|&c| shutdown_roots(sp, c) != 1)
        .collect();
    let all_shutdown: usize = ended.values().sum();
    eprintln!(
        "{} connections churned ({churned_before} before the signal, {:.0}/s); exit after {:.2?}; \
         {} spans received, {all_shutdown} shutdown roots; {summary:?}",
        made.connections,
        made.per_second(),
        done.took,
        spans.len()
    );
    drop(held);

    assert!(done.status.success(), "{:?}", done.stderr);
    assert!(
        done.took < SHUTDOWN_TIMEOUT + EXIT_GRACE,
        "exit took {:?} with --shutdown-timeout {SHUTDOWN_TIMEOUT:?}",
        done.took
    );
    assert!(
        summary.open_at_exit >= 2 * HELD as u64,
        "{HELD} connections held, both ends: {summary:?}"
    );
    summary.assert_every_span_accounted();
    assert!(
        missing_clients.is_empty() && missing_servers.is_empty(),
        "held connections without exactly one shutdown root: {} clients {:?}, {} servers {:?}; {summary:?}; {:?}",
        missing_clients.len(),
        missing_clients,
        missing_servers.len(),
        missing_servers,
        done.stderr
    );
    // And every other session in flight (churned ones) too.
    assert_eq!(
        all_shutdown as u64, summary.open_at_exit,
        "shutdown roots received vs {summary:?}"
    );
}

/// The dropped-spans count is cumulative: it never goes down from one stats line
/// to the next, nor below it in the exit summary. Here the queue overflows while
/// the collector is down, then drains when it is back.
#[test]
fn dropped_span_count_never_goes_down() {
    if !root_or_skip("dropped_span_count_never_goes_down") {
        return;
    }
    let _serial = load::serial();
    let (grpc_port, http_port) = (load::quiet_port(), load::quiet_port());
    let server = Server::start();
    let port = server.port().to_string();
    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    // Down at the start: the queue (512) overflows.
    let tracer = Tracer::start_release(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "-D",
            &port,
            "--stats-interval",
            "1",
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "512"),
        ],
    );
    let made = Churn::start(server.addr(), 2, Some(2000.0), Some(4000))
        .finish_within(Duration::from_secs(20));
    wait_until("spans dropped", Duration::from_secs(10), || {
        Stats::last(&tracer.stderr()).is_some_and(|s| s.dropped_at_least > 0)
    });
    // Back: the queue drains; the daemon is idle once two stats lines agree.
    let rx = Receiver::start_at(grpc_port, http_port);
    let lines = Stats::all(&tracer.stderr()).len();
    wait_until("the queue drained", Duration::from_secs(20), || {
        let stats = Stats::all(&tracer.stderr());
        let settled = |s: &Stats| s.exported + s.failed;
        stats.len() >= lines + 2
            && stats[stats.len() - 1].exported > 0
            && settled(&stats[stats.len() - 1]) == settled(&stats[stats.len() - 2])
    });
    let done = tracer.stop_with(Signal::SIGTERM);
    drop(rx);
    let stats = Stats::all(&done.stderr);
    let summary = Summary::parse(&done.stderr);
    let dropped: Vec<u64> = stats.iter().map(|s| s.dropped_at_least).collect();
    eprintln!("{made:?}; dropped per stats line {dropped:?}; {summary:?}");
    assert!(
        dropped.windows(2).all(|w| w[1] >= w[0]),
        "the dropped count went down: {dropped:?}"
    );
    assert!(summary.dropped >= *dropped.last().unwrap(), "{summary:?}");
}

/// Overloaded (more events than it can read), the daemon still answers its
/// timers and SIGTERM: the running lost-event reports come about every second,
/// and it exits cleanly within its shutdown deadline while the load goes on.
///
/// The overload comes from a CPU quota on the daemon, as a container limit would
/// set one, not from the machine being slow: on a faster machine the load is
/// faster too, the daemon's share of the CPU stays the same.
#[test]
fn overload_does_not_starve_signals_and_reports() {
    if !root_or_skip("overload_does_not_starve_signals_and_reports") {
        return;
    }
    let _serial = load::serial();
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
    // Printing and exporting, the daemon takes ~0.8 µs of CPU per event (0.6 for
    // the text line, 0.2 for the session and its span: the export worker starved
    // by the quota drops its spans); the two clients make ~85k events/s here. 1%
    // of a core is then ~7x behind, on any machine: a faster one makes events
    // faster and handles each faster.
    const CPU_PERCENT: u64 = 1;
    let rx = Receiver::start_counting();
    let endpoint = rx.grpc_endpoint();
    let server = Server::start();
    let tracer = Tracer::start_release(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--print",
            "--shutdown-timeout",
            &SHUTDOWN_TIMEOUT.as_secs().to_string(),
            "--stats-interval",
            "1",
        ],
        FAST,
    );
    let limit = CpuLimit::apply(tracer.pid(), CPU_PERCENT);
    // Two clients at full speed, every socket traced: far more than it can read.
    let churn = Churn::start(server.addr(), 2, None, None);
    let before = limit.thread_times();
    thread::sleep(Duration::from_secs(5)); // the overload
    let after = limit.thread_times();
    let reports = tracer
        .stderr()
        .iter()
        .filter(|l| l.contains("events lost (ring buffer full)"))
        .count();
    // CPU time per thread in the 5 s: whether the one that reports ran at all.
    let ran: Vec<String> = after
        .iter()
        .map(|(name, total)| {
            let earlier = before.iter().find(|(n, _)| n == name).map(|(_, t)| *t);
            format!(
                "{name} {:?}",
                total.saturating_sub(earlier.unwrap_or_default())
            )
        })
        .collect();
    // The signal lands in the load, which goes on until the daemon is gone, on
    // both cores; the quota only made the overload, the exit is timed without it.
    drop(limit);
    let done = tracer.stop_with(Signal::SIGTERM);
    let made = churn.stop();
    let summary = Summary::parse(&done.stderr);
    eprintln!(
        "{made:?} ({:.0}/s); {reports} lost-event reports in 5 s (CPU time in them: {ran:?}); exit after {:.2?} \
         with --shutdown-timeout {SHUTDOWN_TIMEOUT:?}; {summary:?}; {:?}",
        made.per_second(),
        done.took,
        done.stderr
    );
    assert!(
        done.stderr
            .iter()
            .any(|l| l.contains("events lost in total")),
        "not overloaded, so nothing was tested: {:?}",
        done.stderr
    );
    assert!(
        reports >= 3,
        "{reports} lost-event reports in 5 s of overload; CPU time in them: {ran:?}"
    );
    assert!(done.status.success(), "{:?}", done.stderr);
    assert!(
        done.took < SHUTDOWN_TIMEOUT + EXIT_GRACE,
        "exit took {:?} with --shutdown-timeout {SHUTDOWN_TIMEOUT:?}",
        done.took
    );
    summary.assert_every_span_accounted();
}

/// SIGTERM with no time to read what is queued (`--shutdown-timeout 0`): the
/// daemon exits at once, and what it left in the ring buffer is counted as lost,
/// exactly: every transition the test caused is printed or counted, and the
/// sessions it had begun are accounted for as spans not sent.
#[test]
fn sigterm_counts_what_the_deadline_left_unread() {
    if !root_or_skip("sigterm_counts_what_the_deadline_left_unread") {
        return;
    }
    let _serial = load::serial();
    // 30,000 transitions; 16 MiB holds about 120,000, so the ring never fills and
    // every loss is the deadline's.
    const CONNECTIONS: u64 = 10_000;
    let rx = Receiver::start();
    let endpoint = rx.grpc_endpoint();
    let server = Server::start();
    let port = server.port().to_string();
    let tracer = Tracer::start_release(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "--print",
            "-s",
            "-D",
            &port,
            "--ring-buffer-mib",
            "16",
            "--shutdown-timeout",
            "0",
        ],
        FAST,
    );
    let pid = Pid::from_raw(tracer.pid() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    let made = Churn::run(server.addr(), 2, CONNECTIONS);
    assert_eq!(made.connections, CONNECTIONS, "{made:?}");
    let expected = made.client_transitions();
    kill(pid, Signal::SIGTERM).unwrap();
    let done = tracer.stop_with(Signal::SIGCONT);
    let printed = rows(&done.lines, false).len() as u64;
    let (total_line, lost) = load::lost_in_total(&done.stderr);
    let summary = Summary::parse(&done.stderr);
    eprintln!(
        "{expected} transitions queued; {printed} printed, {lost} lost; exit after {:.2?}; {summary:?}; {:?}",
        done.took, done.stderr
    );
    assert!(done.status.success(), "{:?}", done.stderr);
    // The deadline is now.
    assert!(done.took < EXIT_GRACE, "exit took {:?}", done.took);
    assert_eq!(printed + lost, expected, "printed {printed} + lost {lost}");
    assert!(printed < expected, "everything was read: nothing cut off");
    assert!(
        total_line.contains("still queued at the shutdown deadline")
            && total_line.contains("--shutdown-timeout")
            && !total_line.contains("ring buffer full"),
        "{total_line}"
    );
    summary.assert_every_span_accounted();
}

/// A second signal ends the shutdown at once: here the collector hangs and the
/// deadline is long, so the first signal alone would have the daemon wait for it.
#[test]
fn a_second_signal_exits_at_once() {
    if !root_or_skip("a_second_signal_exits_at_once") {
        return;
    }
    let _serial = load::serial();
    let collector = load::hanging_collector();
    let endpoint = format!("http://{collector}");
    let server = Server::start();
    let port = server.port().to_string();
    let mut tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "-D",
            &port,
            "--shutdown-timeout",
            "60",
        ],
        &[("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"), FAST[0]],
    );
    // Spans the first signal's flush would wait for: more than the queue holds.
    Churn::run(server.addr(), 2, 4000);
    let pid = Pid::from_raw(tracer.pid() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    thread::sleep(Duration::from_millis(500));
    assert!(
        !tracer.exited(),
        "exited on the first signal: nothing made it wait, so nothing was tested"
    );
    let done = tracer.stop_with(Signal::SIGINT);
    eprintln!(
        "exit after {:.2?} from the second signal; {:?}",
        done.took, done.stderr
    );
    assert_eq!(done.status.code(), Some(1), "{:?}", done.stderr);
    assert!(done.took < EXIT_GRACE, "exit took {:?}", done.took);
    assert!(
        done.stderr
            .iter()
            .any(|l| l.contains("exiting now on a second signal")),
        "{:?}",
        done.stderr
    );
}

/// SIGTERM with far more events queued in the ring buffer than one drain takes:
/// everything still queued is printed before the exit, and nothing is lost.
#[test]
fn sigterm_prints_everything_still_queued() {
    if !root_or_skip("sigterm_prints_everything_still_queued") {
        return;
    }
    let _serial = load::serial();
    // 90,000 transitions; 16 MiB holds about 120,000, so none are lost.
    const CONNECTIONS: u64 = 30_000;
    let server = Server::start();
    let port = server.port().to_string();
    let tracer = Tracer::start_release(&["-s", "-D", &port, "--ring-buffer-mib", "16"], &[]);
    let pid = Pid::from_raw(tracer.pid() as i32);
    // Stopped while the events pile up; the signal is waiting when it wakes.
    kill(pid, Signal::SIGSTOP).unwrap();
    let made = Churn::run(server.addr(), 2, CONNECTIONS);
    assert_eq!(made.connections, CONNECTIONS, "{made:?}");
    let expected = made.client_transitions();
    kill(pid, Signal::SIGTERM).unwrap();
    let done = tracer.stop_with(Signal::SIGCONT);
    let printed = rows(&done.lines, false).len() as u64;
    eprintln!(
        "{expected} transitions queued, {printed} printed after SIGTERM; exit after {:.2?}; {:?}",
        done.took, done.stderr
    );
    assert!(done.status.success(), "{:?}", done.stderr);
    assert!(
        !done.stderr.iter().any(|l| l.contains("events lost")),
        "{:?}",
        done.stderr
    );
    assert_eq!(printed, expected, "queued transitions not printed at exit");
}
