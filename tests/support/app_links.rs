//! What the tests of instrumented apps check on the daemon's spans: each
//! request's `traceparent` a link on both ends of its connection, and its
//! `tcp.request` spans in the app's trace.
use super::{
    apps::App,
    otlp::{self, ROOT, ReceivedSpan},
};

/// The daemon's root of the socket with these local and peer ports.
pub fn root(spans: &[ReceivedSpan], local: u16, peer: u16) -> Option<&ReceivedSpan> {
    spans.iter().find(|s| {
        s.name == ROOT
            && s.int_attr("network.local.port") == Some(i64::from(local))
            && s.int_attr("network.peer.port") == Some(i64::from(peer))
    })
}

/// The links of a root, as (span id, direction), in order.
pub fn links(root: &ReceivedSpan) -> Vec<(String, String)> {
    root.links
        .iter()
        .map(|l| {
            (
                format!("{}-{}", l.trace_id, l.span_id),
                match l.attributes.get("tcpstates.link.direction") {
                    Some(otlp::Value::Str(d)) => d.clone(),
                    other => format!("{other:?}"),
                },
            )
        })
        .collect()
}

/// Every request's traceparent is a link on both ends of its connection,
/// exactly once and in the order of the requests: `sent` on the client's
/// socket, `received` on the server's.
pub fn check_links(spans: &[ReceivedSpan], app: &App) {
    let mut connections: Vec<(u16, u16)> = app
        .requests
        .iter()
        .map(|r| (r.client_port, r.server_port))
        .collect();
    connections.dedup();
    for (client, server) in connections {
        let expected: Vec<String> = app
            .requests
            .iter()
            .filter(|r| r.client_port == client)
            .map(|r| format!("{}-{}", r.trace_id, r.span_id))
            .collect();
        for (local, peer, direction) in [(client, server, "sent"), (server, client, "received")] {
            let root =
                root(spans, local, peer).unwrap_or_else(|| panic!("no root of {local} -> {peer}"));
            let want: Vec<(String, String)> = expected
                .iter()
                .map(|id| (id.clone(), direction.to_owned()))
                .collect();
            assert_eq!(links(root), want, "{direction} end {local} -> {peer}");
        }
    }
}

/// Each sampled request has its `tcp.request` span on both ends in the app's
/// trace, under its CLIENT span, answered.
pub fn check_request_spans(spans: &[ReceivedSpan], app: &App) {
    for request in app.requests.iter().filter(|r| r.sampled) {
        let mut directions: Vec<&str> = spans
            .iter()
            .filter(|s| s.name == "tcp.request" && s.trace_id == request.trace_id)
            .map(|s| {
                assert_eq!(s.parent_span_id, request.span_id, "{s:#?}");
                assert_eq!(
                    s.bool_attr("tcpstates.request.answered"),
                    Some(true),
                    "{s:#?}"
                );
                s.str_attr("tcpstates.link.direction").unwrap_or_default()
            })
            .collect();
        directions.sort_unstable();
        assert_eq!(directions, ["received", "sent"], "{request:?}");
    }
}
