//! The shutdown's account: SIGTERM under full churn with the collector gone, the
//! sessions open at exit under sampling, and the losses the stats line, the exit
//! summary and the self-metrics report.
mod support;

use std::{
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use support::{
    load::{Stats, Summary, abort_on_close, wait_until},
    otlp::Receiver,
    *,
};

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
