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
    apps::{Calls, LONG, run_grpc},
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
