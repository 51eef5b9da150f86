//! Requests inside HTTP/2 (issue 30): a real gRPC app from the registries
//! (`@grpc/grpc-js` with the OpenTelemetry gRPC instrumentation, which puts
//! each call's `traceparent` in its HEADERS, HPACK-coded: Huffman, and its name
//! from the dynamic table after the first call) makes calls one after another
//! over one connection, plaintext (`h2c`) or over TLS. The daemon, running
//! before the app starts, decodes each request's headers and links every
//! call's `traceparent` on both ends of the connection, exactly once and in
//! order; each sampled call's `tcp.request` spans are answered by its own
//! stream's response.
mod support;

use support::{
    app_links::{check_links, check_request_spans, root},
    apps::{App, Calls, DELAY_MS, LONG, run_grpc},
    load,
    otlp::{ReceivedSpan, Receiver},
    *,
};

/// Runs the gRPC app with the daemon linking (`--tls` too over TLS), and
/// checks the links and request spans.
fn grpc_calls_are_linked(test: &str, kind: Calls, family: u8, tls: bool, ratio: f64) {
    if !root_or_skip(test) {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let tracer = Tracer::linking_to(&rx, if tls { &["--tls"] } else { &[] });
    let app = run_grpc(&rx.http_endpoint(), family, kind, 8, ratio, tls);
    assert_eq!(app.requests.len(), 8);
    let (client, server) = (app.requests[0].client_port, app.requests[0].server_port);
    let both = |spans: &[ReceivedSpan]| {
        root(spans, client, server).is_some() && root(spans, server, client).is_some()
    };
    rx.wait_for(LONG, both);
    let done = tracer.stop();
    assert!(done.status.success(), "{:?}", done.stderr);
    let spans = rx.spans();
    check_links(&spans, &app);
    check_request_spans(&spans, &app);
    if kind == Calls::Multiplexed {
        check_own_answers(&spans, &app);
    }
}

/// Calls answered in the reverse order of their making: each `tcp.request`
/// span lasts at least its own call's wait, on both ends, so the answer that
/// ended it was its stream's (the first answer, the last call's, would end
/// the first call's span too early).
fn check_own_answers(spans: &[ReceivedSpan], app: &App) {
    let calls = app.requests.len() as u64;
    for request in app.requests.iter().filter(|r| r.sampled) {
        let n = request.call.expect("the call's number");
        let wait_ns = (calls - n) * DELAY_MS * 1_000_000;
        let ends: Vec<&ReceivedSpan> = spans
            .iter()
            .filter(|s| s.name == "tcp.request" && s.trace_id == request.trace_id)
            .collect();
        assert_eq!(ends.len(), 2, "{request:?}");
        for span in ends {
            assert!(
                span.end_ns - span.start_ns >= wait_ns,
                "call {n}: {} ns, its answer came after {wait_ns} ns at least: {span:#?}",
                span.end_ns - span.start_ns
            );
        }
    }
}

#[test]
fn grpc_unary_calls_over_h2c_ipv4() {
    grpc_calls_are_linked(
        "grpc_unary_calls_over_h2c_ipv4",
        Calls::Unary,
        4,
        false,
        1.0,
    );
}

#[test]
fn grpc_streaming_calls_over_h2c_ipv6() {
    grpc_calls_are_linked(
        "grpc_streaming_calls_over_h2c_ipv6",
        Calls::Stream,
        6,
        false,
        1.0,
    );
}

#[test]
fn grpc_unary_calls_over_tls_ipv6() {
    grpc_calls_are_linked("grpc_unary_calls_over_tls_ipv6", Calls::Unary, 6, true, 1.0);
}

#[test]
fn grpc_streaming_calls_over_tls_ipv4() {
    grpc_calls_are_linked(
        "grpc_streaming_calls_over_tls_ipv4",
        Calls::Stream,
        4,
        true,
        1.0,
    );
}

/// Half the calls sampled: every call is still linked, and only the sampled
/// ones have request spans, each answered by its own stream.
#[test]
fn grpc_unary_calls_half_sampled_over_h2c_ipv4() {
    grpc_calls_are_linked(
        "grpc_unary_calls_half_sampled_over_h2c_ipv4",
        Calls::Unary,
        4,
        false,
        0.5,
    );
}

/// Eight calls in flight at once on one connection, answered last first: each
/// is linked once on both ends, and its request spans end with its own
/// stream's answer.
#[test]
fn grpc_multiplexed_calls_over_h2c_ipv6() {
    grpc_calls_are_linked(
        "grpc_multiplexed_calls_over_h2c_ipv6",
        Calls::Multiplexed,
        6,
        false,
        1.0,
    );
}

#[test]
fn grpc_multiplexed_calls_over_tls_ipv4() {
    grpc_calls_are_linked(
        "grpc_multiplexed_calls_over_tls_ipv4",
        Calls::Multiplexed,
        4,
        true,
        1.0,
    );
}
