//! A collector connection that dies silently: every packet of the daemon's
//! established connections to its collector dropped both ways (no FIN, no RST: a
//! node that vanished, conntrack pinned to a deleted pod's address), while the
//! collector still answers new connections at the same address. Export must
//! notice and go on over a new connection within the daemon's promise (30 s),
//! losing none of the spans made meanwhile, and say so: the outage line, then the
//! recovery line.
//!
//! Every test here takes [`load::serial`]: iptables rules are global, and the
//! timings must be the test's own.
mod support;

use std::{
    collections::HashSet,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use nix::sys::signal::Signal;
use support::{
    load::{self, Churn, Server, Summary},
    netfault::{Fault, established_to},
    otlp::{ROOT, Receiver},
    *,
};

/// The daemon's promise: export resumes within this long of its connection dying.
const RESUMED_WITHIN: Duration = Duration::from_secs(30);
/// How long the test waits for it, past the promise, so a failure shows how
/// late it came (or that it never did).
const WAIT: Duration = Duration::from_secs(45);
const SHUTDOWN_SECS: u64 = 10;
/// Idle for longer than the daemon's HTTP/2 keepalive interval (4 s).
const IDLE: Duration = Duration::from_secs(6);

/// Drops every packet of each of `pid`'s established connections to `port`,
/// both ways, until dropped; returns the rules and the silenced local ports.
fn silence(pid: u32, port: u16) -> (Vec<Fault>, Vec<u16>) {
    let mut local = Vec::new();
    // The daemon connects lazily: wait for its first connection.
    load::wait_until(
        "an established export connection",
        Duration::from_secs(15),
        || {
            local = established_to(pid, port);
            !local.is_empty()
        },
    );
    let faults = local
        .iter()
        .flat_map(|&l| [Fault::drop_flow(l, port), Fault::drop_flow(port, l)])
        .collect();
    (faults, local)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The daemon exporting the churn's client sockets over `protocol` with the
/// default export timeout (10 s a request, retries included): the budget the
/// transport's dead-connection detection must fit in for nothing to be lost.
fn tracer(protocol: &str, endpoint: &str, server: &Server, metrics: bool) -> Tracer {
    let port = server.port().to_string();
    let shutdown = SHUTDOWN_SECS.to_string();
    let mut env = vec![("OTEL_BSP_SCHEDULE_DELAY", "50")];
    if metrics {
        env.push(("OTEL_METRIC_EXPORT_INTERVAL", "1000"));
    } else {
        env.push(("OTEL_METRICS_EXPORTER", "none"));
    }
    Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            endpoint,
            "--otlp-protocol",
            protocol,
            "-D",
            &port,
            "--stats-interval",
            "1",
            "--shutdown-timeout",
            &shutdown,
        ],
        &env,
    )
}

/// One transport's silent outage: spans flowing, the connection silenced, the
/// time until a span of a socket opened after that arrives (over a new
/// connection: the old one passes nothing), then every span accounted for.
/// `idle`: the connection is silenced while nothing is being sent (longer
/// than the daemon's keepalive interval), and the time counts from when
/// connections are made again.
fn export_resumes_after_silence(protocol: &str, idle: bool) {
    let rx = Receiver::start();
    let (endpoint, port) = match protocol {
        "grpc" => (rx.grpc_endpoint(), rx.grpc_addr().port()),
        _ => (rx.http_endpoint(), rx.http_addr().port()),
    };
    let server = Server::start();
    let tracer = tracer(protocol, &endpoint, &server, false);
    let churn = Churn::start(server.addr(), 1, Some(20.0), None);
    let flowing = rx.wait_for(Duration::from_secs(20), |s| {
        s.iter().any(|s| s.name == ROOT)
    });
    assert!(
        flowing.iter().any(|s| s.name == ROOT),
        "{protocol}: no spans before the outage: {:?}",
        tracer.stderr()
    );

    let (churn, mut made) = if idle {
        let made = churn.stop();
        thread::sleep(IDLE);
        (None, made)
    } else {
        (Some(churn), load::Made::default())
    };
    let (faults, silenced) = silence(tracer.pid(), port);
    let churn = churn.unwrap_or_else(|| Churn::start(server.addr(), 1, Some(20.0), None));
    let (cut, cut_ns) = (Instant::now(), now_ns());
    let after_cut = |spans: &[otlp::ReceivedSpan]| spans.iter().any(|s| s.start_ns > cut_ns);
    let spans = rx.wait_for(WAIT, after_cut);
    let resumed = cut.elapsed();
    eprintln!(
        "{protocol}: silenced {silenced:?}; spans of new sockets arrived {resumed:.2?} later"
    );
    assert!(
        after_cut(&spans),
        "{protocol}: export did not resume within {WAIT:?} of its connection dying: {:?}",
        tracer.stderr()
    );
    assert!(
        resumed < RESUMED_WITHIN,
        "{protocol}: export resumed after {resumed:.2?}"
    );
    // The silenced connections given up on too (with what they carried sent again,
    // or counted failed: the summary says which).
    let mut still = Vec::new();
    let gone = || {
        still = established_to(tracer.pid(), port);
        still.iter().all(|p| !silenced.contains(p))
    };
    load::wait_until("the silenced connections given up", WAIT, gone);
    eprintln!(
        "{protocol}: silenced connections gone after {:.2?}; now {still:?}",
        cut.elapsed()
    );

    // A little more over the new connection, then every span accounted for.
    thread::sleep(Duration::from_secs(1));
    let after = churn.stop();
    made.connections += after.connections;
    made.failed += after.failed;
    made.took += after.took;
    let done = tracer.stop_with(Signal::SIGTERM);
    drop(faults);
    let summary = Summary::parse(&done.stderr);
    let received: HashSet<String> = rx.spans().into_iter().map(|s| s.span_id).collect();
    eprintln!(
        "{protocol}: {made:?}; {summary:?}; {} distinct spans received",
        received.len()
    );
    assert!(done.status.success(), "{protocol}: {:?}", done.stderr);
    summary.assert_every_span_accounted();
    assert_eq!(
        (summary.exported, summary.failed, summary.not_sent()),
        (summary.spans, 0, 0),
        "{protocol}: a span queued during the outage was lost: {summary:?}"
    );
    assert_eq!(
        received.len() as u64,
        summary.spans,
        "{protocol}: spans received vs produced"
    );
    let said = done.stderr.join("\n");
    // Over gRPC export stopped until the connection was replaced: said, and its
    // end said. Over HTTP other connections went on working, so the failure of a
    // request that began before their successes says nothing new and is not said.
    if protocol == "grpc" {
        assert!(
            said.contains("failed ("),
            "{protocol}: no outage line: {said}"
        );
        assert!(
            said.contains("works again"),
            "{protocol}: no recovery line: {said}"
        );
    }
}

/// OTLP/gRPC: one HTTP/2 connection carries every request; silenced, it must be
/// found dead (keepalive pings, the kernel's user timeout) and replaced.
#[test]
fn grpc_export_resumes_after_its_connection_dies_silently() {
    if !root_or_skip("grpc_export_resumes_after_its_connection_dies_silently") {
        return;
    }
    let _serial = load::serial();
    export_resumes_after_silence("grpc", false);
}

/// OTLP/gRPC, the connection silenced while idle: the first request after it
/// finds it dead (no pings are sent while idle: see `otlp::liveness`).
#[test]
fn grpc_export_resumes_after_its_idle_connection_died_silently() {
    if !root_or_skip("grpc_export_resumes_after_its_idle_connection_died_silently") {
        return;
    }
    let _serial = load::serial();
    export_resumes_after_silence("grpc", true);
}

/// OTLP/HTTP: a request on a silenced connection must be sent again over a new
/// one within its budget, not time out with its spans.
#[test]
fn http_export_resumes_after_its_connections_die_silently() {
    if !root_or_skip("http_export_resumes_after_its_connections_die_silently") {
        return;
    }
    let _serial = load::serial();
    export_resumes_after_silence("http/protobuf", false);
}

/// The self-metrics' OTLP/gRPC exporter (its own tonic channel) next to the
/// spans: when every connection to the collector is silenced, metrics arrive
/// again within the same promise.
#[test]
fn grpc_metrics_resume_after_their_connection_dies_silently() {
    if !root_or_skip("grpc_metrics_resume_after_their_connection_dies_silently") {
        return;
    }
    let _serial = load::serial();
    let rx = Receiver::start();
    let port = rx.grpc_addr().port();
    let server = Server::start();
    let tracer = tracer("grpc", &rx.grpc_endpoint(), &server, true);
    let _churn = Churn::start(server.addr(), 1, Some(20.0), None);
    load::wait_until("metrics exported", Duration::from_secs(20), || {
        rx.metric_requests() >= 2
    });
    // Both exporters' connections: wait for the two.
    load::wait_until("two export connections", Duration::from_secs(15), || {
        established_to(tracer.pid(), port).len() >= 2
    });
    let (faults, silenced) = silence(tracer.pid(), port);
    let cut = Instant::now();
    // A request the receiver was reading as the rules went in may still count.
    thread::sleep(Duration::from_millis(200));
    let before = rx.metric_requests();
    let mut resumed = None;
    while cut.elapsed() < WAIT {
        if rx.metric_requests() > before {
            resumed = Some(cut.elapsed());
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "silenced {silenced:?}; metrics arrived again after {resumed:.2?}; connections now {:?}",
        established_to(tracer.pid(), port)
    );
    let resumed = resumed.unwrap_or_else(|| {
        panic!(
            "metrics did not resume within {WAIT:?} of their connection dying: {:?}",
            tracer.stderr()
        )
    });
    assert!(
        resumed < RESUMED_WITHIN,
        "metrics resumed after {resumed:.2?}"
    );
    let done = tracer.stop_with(Signal::SIGTERM);
    drop(faults);
    assert!(done.status.success(), "{:?}", done.stderr);
}
