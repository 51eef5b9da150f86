//! The network inside the application's own trace. Real OpenTelemetry-
//! instrumented applications from the registries (the Node.js SDK's http
//! instrumentation, `tests/apps/node/traced_node.js`; Python `requests` with its
//! instrumentation, `tests/apps/traced_requests.py`; both installed by
//! `scripts/setup.sh --test`) make plaintext HTTP/1.1 requests over loopback,
//! with keep-alive and with a new connection per request, and export their own
//! spans to the receiver the daemon exports to. Each request the application
//! sampled must get one `tcp.request` span from the daemon on each end of its
//! connection, in the application's trace under its CLIENT span, timed by the
//! kernel and linked to the connection's `tcp.session` root; an unsampled one
//! none; and sampling keeps every connection a sampled request used.
mod support;

use std::collections::BTreeMap;

use support::{
    apps::{App, AppRequest, DELAY_MS, LONG, Mode, Runtime, run_app},
    load,
    netfault::Fault,
    otlp::{KIND_CLIENT, KIND_INTERNAL, ROOT, ReceivedSpan, Receiver},
    *,
};

const DAEMON_SERVICE: &str = "otel-tcpstates";
const REQUEST: &str = "tcp.request";
/// How far a span of the daemon may seem to stick out of the application's
/// span that contains it: the two clocks' conversions to wall time.
const CLOCKS_NS: u64 = 5_000_000;

fn daemons<'a>(spans: &'a [ReceivedSpan], name: &'a str) -> impl Iterator<Item = &'a ReceivedSpan> {
    spans
        .iter()
        .filter(move |s| s.name == name && s.service_name() == Some(DAEMON_SERVICE))
}

/// The daemon's request spans in the trace of `request`.
fn request_spans<'a>(spans: &'a [ReceivedSpan], request: &AppRequest) -> Vec<&'a ReceivedSpan> {
    daemons(spans, REQUEST)
        .filter(|s| s.trace_id == request.trace_id)
        .collect()
}

/// Waits for both ends' request spans of every sampled request, then stops the
/// daemon (which ends what is still open) and returns all the receiver got.
fn collect(rx: &Receiver, tracer: Tracer, app: &App) -> Vec<ReceivedSpan> {
    let all_there = |spans: &[ReceivedSpan]| {
        app.requests
            .iter()
            .filter(|r| r.sampled)
            .all(|r| request_spans(spans, r).len() >= 2)
    };
    rx.wait_for(LONG, all_there);
    let done = tracer.stop();
    assert!(done.status.success(), "daemon: {:?}", done.stderr);
    let spans = rx.spans();
    assert!(
        all_there(&spans),
        "not every sampled request's spans came within {LONG:?}; daemon stderr: {:?}",
        done.stderr
    );
    spans
}

/// The daemon's `tcp.request` span of `request` on one end: exactly one, in
/// the app's trace under its CLIENT span, on the right connection, timed by the
/// kernel inside that CLIENT span, linked to its connection's exported root.
fn check_end<'a>(
    spans: &'a [ReceivedSpan],
    app: &App,
    request: &AppRequest,
    direction: &str,
) -> &'a ReceivedSpan {
    let (local, peer) = if direction == "sent" {
        (request.client_port, request.server_port)
    } else {
        (request.server_port, request.client_port)
    };
    let found: Vec<_> = request_spans(spans, request)
        .into_iter()
        .filter(|s| s.str_attr("tcpstates.link.direction") == Some(direction))
        .collect();
    assert_eq!(found.len(), 1, "{direction} end of {request:?}: {found:#?}");
    let span = found[0];
    assert_eq!(span.parent_span_id, request.span_id, "{span:#?}");
    assert_eq!(span.kind, KIND_INTERNAL);
    // The application's trace flags (sampled), its parent in another process.
    assert_eq!(span.flags & 0x301, 0x301, "{span:#?}");
    assert_eq!(
        (
            span.int_attr("network.local.port"),
            span.int_attr("network.peer.port"),
            span.int_attr("process.pid"),
            span.str_attr("http.request.method"),
        ),
        (
            Some(i64::from(local)),
            Some(i64::from(peer)),
            Some(i64::from(app.pid)),
            Some("GET")
        ),
        "{span:#?}"
    );
    // Answered, no sooner than the server's delay.
    assert_eq!(span.bool_attr("tcpstates.request.answered"), Some(true));
    let waited = span.int_attr("tcpstates.request.answer_us").unwrap_or(0);
    // Less a millisecond: Node's timers count from its event loop's cached
    // millisecond clock, so a 20 ms delay may end up to 1 ms early.
    assert!(
        waited >= ((DELAY_MS - 1) * 1000) as i64,
        "{direction}: answered after {waited} µs, before the server's {DELAY_MS} ms delay"
    );
    // Inside the application's CLIENT span.
    let client = spans
        .iter()
        .find(|s| s.span_id == request.span_id && s.kind == KIND_CLIENT)
        .unwrap_or_else(|| panic!("the app exported no CLIENT span {}", request.span_id));
    assert!(
        span.start_ns + CLOCKS_NS >= client.start_ns && span.end_ns <= client.end_ns + CLOCKS_NS,
        "{direction} request span [{}, {}] outside the app's CLIENT span [{}, {}]",
        span.start_ns,
        span.end_ns,
        client.start_ns,
        client.end_ns
    );
    // Its link leads to its connection's root.
    assert_eq!(span.links.len(), 1, "{span:#?}");
    let link = &span.links[0];
    let root = daemons(spans, ROOT)
        .find(|r| r.trace_id == link.trace_id && r.span_id == link.span_id)
        .unwrap_or_else(|| panic!("{direction}: no root {}/{}", link.trace_id, link.span_id));
    assert_eq!(
        (
            root.int_attr("network.local.port"),
            root.int_attr("network.peer.port")
        ),
        (Some(i64::from(local)), Some(i64::from(peer))),
        "{root:#?}"
    );
    span
}

/// The whole contract for one app, mode and family, at `ratio` of the app's
/// requests sampled (the daemon keeps every trace).
fn sampled_requests_get_their_spans(test: &str, runtime: Runtime, mode: Mode, family: u8) {
    if !root_or_skip(test) {
        return;
    }
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, &[]);
    // Half sampled, by trace id: 16 requests hold both kinds but once in 2^15.
    let app = run_app(&rx.http_endpoint(), runtime, family, mode, 16, 0.5, None);
    let sampled = app.requests.iter().filter(|r| r.sampled).count();
    assert!(
        (1..app.requests.len()).contains(&sampled),
        "both kinds of request: {app:#?}"
    );
    let spans = collect(&rx, tracer, &app);

    // The first request on each connection, sampled or not.
    let mut first_on = BTreeMap::new();
    for request in &app.requests {
        first_on
            .entry(request.client_port)
            .or_insert(request.span_id.as_str());
    }
    for request in &app.requests {
        if !request.sampled {
            let got = request_spans(&spans, request);
            assert!(got.is_empty(), "an unsampled request got a span: {got:#?}");
            continue;
        }
        for (direction, state) in [("sent", "SYN_SENT"), ("received", "SYN_RECV")] {
            let span = check_end(&spans, &app, request, direction);
            // Opened for it: with a new connection each, or the first request
            // on the keep-alive connection.
            let new = first_on[&request.client_port] == request.span_id;
            assert!(new || mode == Mode::KeepAlive);
            assert_eq!(
                span.bool_attr("tcpstates.connection.new"),
                Some(new),
                "{direction} {request:?}"
            );
            if new {
                assert_eq!(span.str_attr("tcpstates.handshake.state"), Some(state));
                let names: Vec<&str> = span.events.iter().map(|e| e.name.as_str()).collect();
                assert!(
                    names.contains(&"tcp.established") && names.contains(&"tcp.request.sent"),
                    "{names:?}"
                );
            }
        }
    }
    if mode == Mode::KeepAlive {
        let ports: std::collections::BTreeSet<u16> =
            app.requests.iter().map(|r| r.client_port).collect();
        assert_eq!(ports.len(), 1, "one keep-alive connection");
    }
}

#[test]
fn node_keep_alive_requests_get_their_spans_in_the_apps_trace() {
    sampled_requests_get_their_spans(
        "node_keep_alive_requests_get_their_spans_in_the_apps_trace",
        Runtime::Node,
        Mode::KeepAlive,
        4,
    );
}

#[test]
fn node_requests_on_new_ipv6_connections_get_their_spans_in_the_apps_trace() {
    sampled_requests_get_their_spans(
        "node_requests_on_new_ipv6_connections_get_their_spans_in_the_apps_trace",
        Runtime::Node,
        Mode::New,
        6,
    );
}

#[test]
fn python_requests_keep_alive_get_their_spans_in_the_apps_trace() {
    sampled_requests_get_their_spans(
        "python_requests_keep_alive_get_their_spans_in_the_apps_trace",
        Runtime::Python,
        Mode::KeepAlive,
        4,
    );
}

#[test]
fn python_requests_on_new_connections_get_their_spans_in_the_apps_trace() {
    sampled_requests_get_their_spans(
        "python_requests_on_new_connections_get_their_spans_in_the_apps_trace",
        Runtime::Python,
        Mode::New,
        4,
    );
}

/// A SYN dropped once: the request waited ~1 s for its handshake, and its span
/// in the application's trace shows it, with the SYN's retransmission.
#[test]
fn a_dropped_syn_shows_its_handshake_inside_the_apps_trace() {
    if !root_or_skip("a_dropped_syn_shows_its_handshake_inside_the_apps_trace") {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, &[]);
    let port = load::quiet_port();
    let fault = Fault::drop_first_syn(port);
    let app = run_app(
        &rx.http_endpoint(),
        Runtime::Node,
        4,
        Mode::New,
        1,
        1.0,
        Some(port),
    );
    assert_eq!(fault.matched(), 1, "the first SYN was dropped");
    drop(fault);
    let spans = collect(&rx, tracer, &app);
    let request = &app.requests[0];
    let span = check_end(&spans, &app, request, "sent");
    assert_eq!(span.bool_attr("tcpstates.connection.new"), Some(true));
    let handshake_us = span.int_attr("tcpstates.handshake.duration_us").unwrap();
    // The kernel's initial retransmission timeout is 1 s.
    assert!(
        (900_000..3_000_000).contains(&handshake_us),
        "handshake of {handshake_us} µs"
    );
    assert!(span.duration_ns() >= 900_000_000, "{span:#?}");
    // The congestion states the timeout went through (Loss, then Open) aside.
    let events: Vec<(&str, Option<&str>)> = span
        .events
        .iter()
        .filter(|e| e.name != "tcp.congestion")
        .map(|e| (e.name.as_str(), e.str_attr("tcpstates.retransmit.kind")))
        .collect();
    assert_eq!(
        events,
        [
            ("tcp.retransmit", Some("syn")),
            ("tcp.established", None),
            ("tcp.request.sent", None)
        ],
        "{span:#?}"
    );
}

/// With 1% of connections sampled, every connection a sampled request used is
/// kept whole by its own rule, so every link from a request leads somewhere;
/// unsampled requests still get no span.
#[test]
fn at_one_percent_every_connection_of_a_sampled_request_is_kept() {
    if !root_or_skip("at_one_percent_every_connection_of_a_sampled_request_is_kept") {
        return;
    }
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, &["--sample-ratio", "0.01"]);
    let app = run_app(
        &rx.http_endpoint(),
        Runtime::Node,
        4,
        Mode::New,
        24,
        0.5,
        None,
    );
    let spans = collect(&rx, tracer, &app);
    let sampled = app.requests.iter().filter(|r| r.sampled).count();
    assert!((1..app.requests.len()).contains(&sampled), "{app:#?}");
    for request in &app.requests {
        let ends = [
            (request.client_port, request.server_port),
            (request.server_port, request.client_port),
        ];
        for (local, peer) in ends {
            let roots: Vec<&ReceivedSpan> = daemons(&spans, ROOT)
                .filter(|r| {
                    r.int_attr("network.local.port") == Some(i64::from(local))
                        && r.int_attr("network.peer.port") == Some(i64::from(peer))
                })
                .collect();
            let by_rule = roots.iter().any(|r| {
                r.str_attr("tcpstates.sampling.kept_by")
                    .is_some_and(|k| k.split(',').any(|k| k == "sampled_request"))
            });
            if request.sampled {
                assert_eq!(roots.len(), 1, "{local}->{peer} of {request:?}");
                assert!(by_rule, "{:#?}", roots[0]);
            } else {
                // Kept by probability (1%) or not at all, never by the rule.
                assert!(!by_rule, "{roots:#?}");
                assert!(request_spans(&spans, request).is_empty());
            }
        }
        if request.sampled {
            check_end(&spans, &app, request, "sent");
            check_end(&spans, &app, request, "received");
        }
    }
}
