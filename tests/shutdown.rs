//! The shutdown's account: SIGTERM under full churn with the collector gone, the
//! sessions open at exit under sampling, and the losses the stats line, the exit
//! summary and the self-metrics report.
mod support;

use std::{
    net::{TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use support::{
    load::{self, Churn, Server, Stats, Summary, abort_on_close, wait_until},
    otlp::Receiver,
    *,
};

/// The line the exit watchdog prints when the orderly shutdown missed the deadline.
const FORCED: &str = "without a complete shutdown";

/// A node draining while its collector is gone: SIGTERM lands in full loopback
/// churn, every export refused (nothing listens at the collector's port). The
/// daemon finishes its shutdown by the deadline: status 0, its exit summary, every
/// span accounted for, never the watchdog's forced exit.
#[test]
fn sigterm_under_full_churn_with_the_collector_refusing_exits_with_its_summary() {
    if !root_or_skip("sigterm_under_full_churn_with_the_collector_refusing_exits_with_its_summary")
    {
        return;
    }
    let _serial = load::serial();
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
    for protocol in ["grpc", "http/protobuf"] {
        let refusing = load::quiet_port();
        let endpoint = format!("http://127.0.0.1:{refusing}");
        let me = std::process::id().to_string();
        let tracer = Tracer::start_release(
            &[
                "--otlp-endpoint",
                &endpoint,
                "--otlp-protocol",
                protocol,
                "--shutdown-timeout",
                &SHUTDOWN_TIMEOUT.as_secs().to_string(),
                // Only this process's sockets (both ends of the churn).
                "-p",
                &me,
            ],
            &[("OTEL_METRIC_EXPORT_INTERVAL", "500")],
        );
        // Listening after the tracer started, so the accepted sockets are ours too.
        let server = Server::start();
        let churn = Churn::start(server.addr(), 3, None, None);
        // Long enough for the exports to fail and be retried, and for the queue to
        // be full, as on a node whose collector is gone.
        wait_until("the export failures said", Duration::from_secs(20), || {
            tracer.stderr().iter().any(|l| l.contains("export to"))
        });
        thread::sleep(Duration::from_secs(2));
        let churned = churn.connections();
        let done = tracer.stop_with(Signal::SIGTERM);
        let made = churn.stop();
        eprintln!(
            "{protocol}: {} connections churned ({churned} before the signal); exit after {:.2?}, {}; \
             last lines: {:?}",
            made.connections,
            done.took,
            done.status,
            done.stderr.iter().rev().take(6).collect::<Vec<_>>()
        );
        assert!(
            !done.stderr.iter().any(|l| l.contains(FORCED)),
            "{protocol}: the watchdog forced the exit after {:.2?}: {:?}",
            done.took,
            done.stderr
        );
        assert!(done.status.success(), "{protocol}: {:?}", done.stderr);
        assert!(
            done.took < SHUTDOWN_TIMEOUT + EXIT_GRACE,
            "{protocol}: exit took {:.2?} with --shutdown-timeout {SHUTDOWN_TIMEOUT:?}",
            done.took
        );
        let summary = Summary::parse(&done.stderr);
        eprintln!("{protocol}: {summary:?}");
        summary.assert_every_span_accounted();
        assert!(
            summary.spans > 0 && summary.exported == 0,
            "{protocol}: nothing can be exported: {summary:?}"
        );
    }
}

/// With `--sample-ratio 0.01` and many idle connections open at SIGTERM, the
/// sessions the shutdown ends are judged by sampling as any other, even those
/// the deadline leaves no time to end and send: the spans cut off are those of
/// the kept traces only (each open session's ESTABLISHED span and its root), not
/// two for every socket. `--shutdown-timeout 0` leaves no time for any, the path
/// a large table or a slow shutdown takes for the sessions left at the deadline.
#[test]
fn sessions_cut_off_at_shutdown_count_only_the_spans_sampling_keeps() {
    if !root_or_skip("sessions_cut_off_at_shutdown_count_only_the_spans_sampling_keeps") {
        return;
    }
    let _serial = load::serial();
    // 2,001 sockets open at exit (both ends, and the listener): at 1%, about 20
    // traces kept of them.
    const CONNECTIONS: usize = 1000;
    let rx = Receiver::start();
    let me = std::process::id().to_string();
    let tracer = Tracer::start_release(
        &[
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
            "--sample-ratio",
            "0.01",
            // Only probability keeps traces: a handshake slowed by the load
            // would keep one by the rule, with one span more.
            "--no-keep-slow-handshakes",
            "--shutdown-timeout",
            "0",
            "-p",
            &me,
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "50")],
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::MAXALLOWABLE).unwrap();
    let held: Vec<(TcpStream, TcpStream)> = (0..CONNECTIONS)
        .map(|_| {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (client, listener.accept().unwrap().0)
        })
        .collect();
    // The handshakes' spans of the kept traces exported before the signal.
    thread::sleep(Duration::from_secs(2));
    let done = tracer.stop_with(Signal::SIGTERM);
    drop(held);
    assert!(done.status.success(), "{:?}", done.stderr);
    let summary = Summary::parse(&done.stderr);
    let sampling = done
        .stderr
        .iter()
        .find(|l| l.contains("sampling kept"))
        .unwrap_or_else(|| panic!("no sampling line: {:?}", done.stderr));
    let kept = load::number_before(sampling, " traces by probability");
    let by_rule = load::number_before(sampling, " by a rule");
    eprintln!(
        "{summary:?}; {kept} traces kept by probability, {by_rule} by a rule; {:?}",
        done.stderr
    );
    assert!(
        summary.open_at_exit > 2 * CONNECTIONS as u64,
        "{CONNECTIONS} connections held, both ends, and the listener: {summary:?}"
    );
    summary.assert_every_span_accounted();
    // Binomial(2001, 0.01): 20 ± 4.5.
    assert!((1..=60).contains(&kept) && by_rule == 0, "{sampling}");
    // Every kept trace's session was open at exit: its open state and its root
    // were cut off, and nothing else.
    assert_eq!(summary.cut_off, 2 * kept, "{summary:?}; {sampling}");
    assert_eq!(
        (
            summary.failed,
            summary.dropped,
            summary.exported + summary.cut_off
        ),
        (0, 0, summary.spans),
        "{summary:?}"
    );
    assert!(
        !done.stderr.iter().any(|l| l.contains("not all sent")),
        "a false warning: {:?}",
        done.stderr
    );
}

/// Incident records of a socket the table never followed are counted and shown:
/// a connection open before the daemon started, closed with a reset after, sends
/// its RST with no session to go on. The count appears in the stats line, the exit
/// summary and the self-metrics, next to the replaced sessions.
#[test]
fn incidents_of_sockets_not_traced_are_counted_everywhere() {
    if !root_or_skip("incidents_of_sockets_not_traced_are_counted_everywhere") {
        return;
    }
    const ABORTED: u64 = 5;
    let rx = Receiver::start();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    // Open before the daemon: neither it nor its kernel program knows them.
    let before: Vec<(TcpStream, TcpStream)> = (0..ABORTED)
        .map(|_| {
            let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            (client, listener.accept().unwrap().0)
        })
        .collect();
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
            "--stats-interval",
            "1",
            // Only the clients' side of this listener's connections: nothing else
            // on the machine adds to the counts.
            "-D",
            &port,
        ],
        &[
            ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    for (client, server) in before {
        abort_on_close(&client);
        drop(client);
        drop(server);
    }
    let started = Instant::now();
    wait_until(
        "a stats line with the unmatched incidents",
        Duration::from_secs(15),
        || {
            Stats::last(&tracer.stderr())
                .is_some_and(|s| s.incidents_unmatched.unwrap_or(0) >= ABORTED)
        },
    );
    let stats = Stats::last(&tracer.stderr()).unwrap();
    eprintln!("after {:.2?}: {stats:?}", started.elapsed());
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    let summary = Summary::parse(&done.stderr);
    let metrics = rx.metrics();
    let metric = |name: &str| {
        metrics
            .get(&format!("otel_tcpstates.{name}"))
            .unwrap_or_else(|| panic!("no {name} in {metrics:#?}"))
            .value
    };
    eprintln!(
        "{summary:?}; incidents.unmatched {}, sessions.replaced {}",
        metric("incidents.unmatched"),
        metric("sessions.replaced")
    );
    assert_eq!(stats.incidents_unmatched, Some(ABORTED), "{stats:?}");
    assert_eq!(summary.incidents_unmatched, Some(ABORTED), "{summary:?}");
    assert_eq!(metric("incidents.unmatched"), ABORTED as i64);
    // No address was reused with a CLOSE missed.
    assert_eq!((stats.replaced, summary.replaced), (0, 0));
    assert_eq!(metric("sessions.replaced"), 0);
}
