//! How the OTLP clients find out that a connection is dead (every packet dropped,
//! no FIN or RST: a node that vanished, conntrack pinned to a deleted pod's
//! address): within a request's default budget (`OTEL_EXPORTER_OTLP_TIMEOUT`,
//! 10 s), so the request fails with an error and is sent again over a new
//! connection instead of waiting on the dead one until TCP gives up (~15
//! minutes). Shared by the spans' transport and the metrics exporter's clients;
//! it depends on no other OTLP module.
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;

/// How long connect() may take: a collector address that drops SYNs costs this
/// much of the request's budget, not all of it, and the next address is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// TCP_USER_TIMEOUT: the kernel aborts a connection whose sent data has gone
/// unacknowledged this long. A live collector's TCP acknowledges at once however
/// slowly it answers, so only a dead path trips it; it is HTTP/1.1's only means.
pub const UNACKNOWLEDGED_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2: a PING once nothing has been read for this long while a request is
/// open; the connection is closed unless it is answered within
/// [`KEEPALIVE_TIMEOUT`]. A request waiting on a dead connection therefore fails
/// at most 4 + 3 s after the connection last said anything, with the rest of a
/// 10 s budget left to send it again. Not while idle: gRPC servers (grpc-go's
/// default policy, the OpenTelemetry Collector's) count pings without requests
/// as abuse and close the connection with `too_many_pings`; an idle connection
/// that died is found out by the first request after it, within the timeout.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(4);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// The TCP connector of both OTLP clients: [`CONNECT_TIMEOUT`] and
/// [`UNACKNOWLEDGED_TIMEOUT`], no Nagle delay, https:// URLs allowed (TLS is
/// layered on it).
pub fn tcp_connector() -> HttpConnector {
    let mut tcp = HttpConnector::new();
    tcp.enforce_http(false);
    tcp.set_nodelay(true);
    tcp.set_connect_timeout(Some(CONNECT_TIMEOUT));
    tcp.set_tcp_user_timeout(Some(UNACKNOWLEDGED_TIMEOUT));
    tcp
}
