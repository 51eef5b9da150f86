//! Faults around the daemon: the collector gone and back, secrets in headers.
mod support;

use std::{thread, time::Duration};

use nix::sys::signal::Signal;
use support::{otlp::Receiver, *};

/// The collector is down when the daemon starts and comes back later: tracing goes
/// on, the failures are counted, and export resumes by itself.
#[test]
fn export_resumes_when_the_collector_comes_back() {
    if !root_or_skip("export_resumes_when_the_collector_comes_back") {
        return;
    }
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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !tracer.stderr().iter().any(|l| l.contains("failed")) {
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
    assert!(
        !root_of(&spans, before.port()),
        "spans from the outage were not dropped?"
    );
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    let said = done.stderr.join("\n");
    assert!(said.contains("works again"), "{said}");
    let summary = done
        .stderr
        .iter()
        .find(|l| l.contains("sockets traced"))
        .unwrap();
    assert!(
        !summary.contains(" 0 failed"),
        "failures must be counted: {summary}"
    );
}

/// An auth token in the OTLP headers never shows in what the daemon says, even
/// with every diagnostic on and the collector failing.
#[test]
fn header_secrets_stay_out_of_logs() {
    if !root_or_skip("header_secrets_stay_out_of_logs") {
        return;
    }
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
    let number = |label: &str| -> u64 {
        let at = line
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in {line}"));
        line[..at]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        number(" events seen") >= printed as u64,
        "{line} vs {printed} rows"
    );
    assert_eq!(number(" lost"), 0, "{line}");
    assert!(
        number(" started") >= 10,
        "5 connections, 10 sockets: {line}"
    );
    assert!(number(" exported") <= number(" produced"), "{line}");
    assert_eq!(number(" failed"), 0, "{line}");
}
