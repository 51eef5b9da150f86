//! Self-telemetry: the daemon's own counters arrive as OTLP metrics next to its
//! traces, while it runs and, final, at exit.
mod support;

use std::{net::TcpStream, time::Duration};

use nix::sys::signal::Signal;
use support::{load::Summary, otlp::Receiver, *};

/// Over both transports: metrics arrive while running, and the last export agrees
/// with the exit summary and with what was printed, evictions and all.
#[test]
fn self_metrics_agree_with_the_exit_summary() {
    if !root_or_skip("self_metrics_agree_with_the_exit_summary") {
        return;
    }
    for protocol in ["grpc", "http/protobuf"] {
        let rx = Receiver::start();
        let endpoint = if protocol == "grpc" {
            rx.grpc_endpoint()
        } else {
            rx.http_endpoint()
        };
        let tracer = Tracer::start_with_env(
            &[
                "--otlp-endpoint",
                &endpoint,
                "--otlp-protocol",
                protocol,
                "--print",
                "-s",
                "--max-sockets",
                "4",
            ],
            &[
                ("OTEL_METRIC_EXPORT_INTERVAL", "200"),
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ],
        );
        let (listener, _) = listen("127.0.0.1");
        for _ in 0..3 {
            connect_hold_close(&listener, Duration::ZERO);
        }
        // Six held connections, twelve sockets, in a table of four: evictions.
        let held: Vec<_> = (0..6)
            .map(|_| {
                let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
                let server = listener.accept().unwrap().0;
                (client, server)
            })
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rx
            .metrics()
            .get("otel_tcpstates.sessions.evicted")
            .is_none_or(|m| m.value == 0)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{protocol}: no evictions reported while running: {:?}",
                rx.metrics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }

        let done = tracer.stop_with(Signal::SIGTERM);
        drop(held);
        assert!(done.status.success(), "{protocol}: {:?}", done.stderr);
        let summary = Summary::parse(&done.stderr);
        let metrics = rx.metrics();
        eprintln!("{protocol}: {summary:?}");
        let metric = |name: &str| {
            metrics
                .get(&format!("otel_tcpstates.{name}"))
                .unwrap_or_else(|| panic!("{protocol}: no {name} in {metrics:#?}"))
        };
        let printed = done.lines.len() as i64 - 1;
        let count = |n: u64| n as i64;
        let expect = [
            ("events.seen", printed),
            ("events.lost", 0),
            ("sessions.started", count(summary.sessions)),
            ("sessions.evicted", count(summary.evicted)),
            ("sessions.in_flight", 0),
            ("spans.produced", count(summary.spans)),
            ("spans.exported", count(summary.exported)),
            ("spans.failed", count(summary.failed)),
            ("spans.dropped", count(summary.dropped)),
            ("spans.cut_off", count(summary.cut_off)),
            ("export.errors", 0),
        ];
        for (name, want) in expect {
            assert_eq!(metric(name).value, want, "{protocol}: {name}; {summary:?}");
        }
        assert!(
            metric("sessions.evicted").value >= 8,
            "{protocol}: 12 held sockets, 4 slots: {summary:?}"
        );
        assert!(metric("spans.exported").value > 0, "{summary:?}");
        assert_eq!(metric("sessions.in_flight").kind, "gauge");
        for (name, _) in expect.iter().filter(|(n, _)| *n != "sessions.in_flight") {
            assert_eq!(metric(name).kind, "sum", "{protocol}: {name} is a counter");
        }
        let seen = metric("events.seen");
        assert_eq!(seen.service_name.as_deref(), Some("otel-tcpstates"));
        assert_eq!(
            seen.transport,
            if protocol == "grpc" { "grpc" } else { "http" }
        );
    }
}

/// `OTEL_METRICS_EXPORTER=none`, the standard switch, turns them off; traces go on.
#[test]
fn self_metrics_can_be_turned_off() {
    if !root_or_skip("self_metrics_can_be_turned_off") {
        return;
    }
    let rx = Receiver::start();
    let tracer = Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            &rx.grpc_endpoint(),
            "--otlp-protocol",
            "grpc",
        ],
        &[
            ("OTEL_METRICS_EXPORTER", "none"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "100"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    );
    let (listener, _) = listen("127.0.0.1");
    connect_hold_close(&listener, Duration::ZERO);
    let spans = rx.wait_for(Duration::from_secs(10), |s| {
        s.iter().any(|s| s.name == "tcp.session")
    });
    assert!(spans.iter().any(|s| s.name == "tcp.session"));
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    assert_eq!(rx.metric_requests(), 0, "{:?}", rx.metrics());
}
