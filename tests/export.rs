//! The export path against collectors that push back or misbehave: the real daemon
//! traces real connections and exports to a collector the test scripts. Retries
//! follow OTLP's rules and resend until accepted, each span arriving once; partial
//! success counts the rejected spans as failed; a hostile or broken collector costs
//! a counted failure and one log line, never a panic, a stall or unbounded memory.
mod support;

use std::{
    collections::HashSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sys::{
    signal::Signal,
    socket::{setsockopt, sockopt::Linger},
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
    trace_service_server::{TraceService, TraceServiceServer},
};
use prost::Message as _;
use support::{
    load::{Stats, wait_until},
    *,
};

/// Each request's whole budget, retries included: short, so failures come soon.
const TIMEOUT_MS: &str = "1000";
const SHUTDOWN: Duration = Duration::from_secs(5);

/// What a scripted collector received: per request, when, and its span ids (none
/// if it could not decode it).
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Request>>>, Arc<Mutex<Vec<Vec<u8>>>>);

/// When a request came, and the ids of its spans.
type Request = (Instant, Vec<Vec<u8>>);

impl Log {
    fn record(&self, body: &[u8]) -> usize {
        self.1.lock().unwrap().push(body.to_vec());
        let ids = ExportTraceServiceRequest::decode(body)
            .map(|r| {
                r.resource_spans
                    .into_iter()
                    .flat_map(|rs| rs.scope_spans)
                    .flat_map(|ss| ss.spans)
                    .map(|s| s.span_id)
                    .collect()
            })
            .unwrap_or_default();
        let mut log = self.0.lock().unwrap();
        log.push((Instant::now(), ids));
        log.len() - 1
    }

    fn requests(&self) -> Vec<Request> {
        self.0.lock().unwrap().clone()
    }

    /// The bodies as received.
    fn bodies(&self) -> Vec<Vec<u8>> {
        self.1.lock().unwrap().clone()
    }
}

/// One reply of a scripted OTLP/HTTP collector.
enum Reply {
    Http {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: Vec<u8>,
    },
    /// A 200 that promises a 100 MB body and streams it until the client leaves.
    Huge,
    /// Headers and part of the body, then a reset.
    CutByReset,
}

fn protobuf(status: u16, response: &ExportTraceServiceResponse) -> Reply {
    Reply::Http {
        status,
        headers: vec![("content-type", "application/x-protobuf".into())],
        body: response.encode_to_vec(),
    }
}

fn accepted() -> Reply {
    protobuf(200, &ExportTraceServiceResponse::default())
}

/// An HTTP/1.1 server on 127.0.0.1 that answers request `n` with `script(n)`.
struct Scripted {
    addr: SocketAddr,
    log: Log,
    stop: Arc<AtomicBool>,
}

impl Scripted {
    fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Log::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopped) = (log.clone(), Arc::clone(&stop));
        let script = Arc::new(script);
        thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (seen, script) = (seen.clone(), Arc::clone(&script));
                        thread::spawn(move || serve(stream, &seen, &*script));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Scripted { addr, log, stop }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// HTTP/1.1 with keep-alive: requests in turn, each answered by the script. A
/// client speaking HTTP/2 gets a 400 and the connection closed, as an HTTP/1.1
/// server would do.
fn serve(stream: TcpStream, log: &Log, script: &dyn Fn(usize) -> Reply) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line.starts_with("PRI ") {
            let _ = stream.write_all(
                b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            );
            return;
        }
        let mut length = 0;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let n = log.record(&body);
        match script(n) {
            Reply::Http {
                status,
                headers,
                body,
            } => {
                let mut head = format!(
                    "HTTP/1.1 {status} Scripted\r\ncontent-length: {}\r\n",
                    body.len()
                );
                for (name, value) in headers {
                    head.push_str(&format!("{name}: {value}\r\n"));
                }
                head.push_str("\r\n");
                if stream
                    .write_all(head.as_bytes())
                    .and_then(|()| stream.write_all(&body))
                    .is_err()
                {
                    return;
                }
            }
            Reply::Huge => {
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 104857600\r\n\r\n",
                );
                let chunk = vec![0x0a; 64 * 1024];
                while stream.write_all(&chunk).is_ok() {}
                return;
            }
            Reply::CutByReset => {
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 100\r\n\r\n\x0a\x02",
                );
                thread::sleep(Duration::from_millis(20));
                setsockopt(
                    &stream.as_fd(),
                    Linger,
                    &libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    },
                )
                .unwrap();
                return;
            }
        }
    }
}

/// The daemon exporting to `endpoint`, each request given `timeout_ms` in all,
/// with stats every second.
fn tracer(protocol: &str, endpoint: &str, timeout_ms: &str) -> Tracer {
    Tracer::start_with_env(
        &[
            "--otlp-endpoint",
            endpoint,
            "--otlp-protocol",
            protocol,
            "--print",
            "-s",
            "--stats-interval",
            "1",
            "--shutdown-timeout",
            "5",
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", timeout_ms),
            ("OTEL_METRICS_EXPORTER", "none"),
        ],
    )
}

/// Stops the daemon and checks what every test here wants: a clean exit within
/// the deadline, and every span accounted for.
fn stop(tracer: Tracer) -> (Finished, load::Summary) {
    let done = tracer.stop_with(Signal::SIGTERM);
    assert!(done.status.success(), "{:?}", done.stderr);
    assert!(
        done.took < SHUTDOWN + EXIT_GRACE,
        "exit took {:?}",
        done.took
    );
    let summary = load::Summary::parse(&done.stderr);
    summary.assert_every_span_accounted();
    (done, summary)
}

/// When request `n`'s spans were sent again: a retry resends the same spans.
fn next_attempt(requests: &[Request], n: usize) -> Instant {
    let (at, spans) = &requests[n];
    assert!(!spans.is_empty(), "request {n} carried no spans");
    requests[n + 1..]
        .iter()
        .find(|(_, again)| again == spans)
        .map(|(again_at, _)| *again_at)
        .unwrap_or_else(|| panic!("request {n} (at {at:?}) was never sent again"))
}

/// Every span the collector received, once each.
fn assert_each_span_once(requests: &[Request], accepted: &[usize], spans: u64) {
    let ids: Vec<&Vec<u8>> = accepted.iter().flat_map(|&n| &requests[n].1).collect();
    let distinct: HashSet<_> = ids.iter().collect();
    assert_eq!(distinct.len(), ids.len(), "a span was accepted twice");
    assert_eq!(ids.len() as u64, spans, "accepted spans vs produced");
}

/// OTLP/HTTP: 503 with Retry-After, then 429, then accepted: the same request is
/// sent again (not before the collector said), and its spans arrive once.
#[test]
fn http_retries_honour_retry_after_and_spans_arrive_once() {
    if !root_or_skip("http_retries_honour_retry_after_and_spans_arrive_once") {
        return;
    }
    let _serial = load::serial();
    let collector = Scripted::start(|n| match n {
        0 => Reply::Http {
            status: 503,
            headers: vec![("retry-after", "1".into())],
            body: Vec::new(),
        },
        1 => Reply::Http {
            status: 429,
            headers: Vec::new(),
            body: Vec::new(),
        },
        _ => accepted(),
    });
    // The whole budget must cover the collector's wait.
    let tracer = tracer("http/protobuf", &collector.endpoint(), "5000");
    let (listener, _) = listen("127.0.0.1");
    connect_hold_close(&listener, Duration::ZERO);
    wait_until("an accepted request", Duration::from_secs(15), || {
        collector.log.requests().len() >= 3
    });
    let (done, summary) = stop(tracer);
    let requests = collector.log.requests();
    eprintln!("{} requests; {summary:?}", requests.len());
    let again = next_attempt(&requests, 0);
    assert!(
        again - requests[0].0 >= Duration::from_secs(1),
        "retried {:?} after a 503 with Retry-After: 1",
        again - requests[0].0
    );
    next_attempt(&requests, 1);
    assert_eq!(summary.failed, 0, "{summary:?}");
    assert_eq!(summary.exported, summary.spans, "{summary:?}");
    let accepted: Vec<usize> = (2..requests.len()).collect();
    assert_each_span_once(&requests, &accepted, summary.spans);
    let said = done.stderr.join("\n");
    assert!(said.contains("works again"), "{said}");
}

/// A gRPC collector that answers UNAVAILABLE, then RESOURCE_EXHAUSTED with a
/// RetryInfo, then takes the spans.
struct PushingBack {
    calls: Arc<AtomicUsize>,
    log: Log,
}

#[tonic::async_trait]
impl TraceService for PushingBack {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        self.log.record(&request.into_inner().encode_to_vec());
        match call {
            0 => Err(tonic::Status::unavailable("starting up")),
            1 => {
                use tonic_types::{ErrorDetails, StatusExt as _};
                Err(tonic::Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    "slow down",
                    ErrorDetails::with_retry_info(Some(Duration::from_millis(700))),
                ))
            }
            // Partial success: one span of the request refused, with a reason.
            _ => Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans: 1,
                    error_message: "span too old".into(),
                }),
            })),
        }
    }
}

/// OTLP/gRPC: UNAVAILABLE and RESOURCE_EXHAUSTED with RetryInfo are retried (the
/// second no sooner than the RetryInfo says), the same spans each time; the
/// partial success that follows counts its rejected span as failed and says why.
#[test]
fn grpc_retries_and_partial_success_add_up() {
    if !root_or_skip("grpc_retries_and_partial_success_add_up") {
        return;
    }
    let _serial = load::serial();
    let log = Log::default();
    let service = PushingBack {
        calls: Arc::new(AtomicUsize::new(0)),
        log: log.clone(),
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(
                tokio::net::TcpListener::from_std(listener).unwrap(),
            );
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service))
                .serve_with_incoming(incoming)
                .await
                .unwrap();
        });
    });
    let tracer = tracer("grpc", &format!("http://{addr}"), "5000");
    let (listener, _) = listen("127.0.0.1");
    connect_hold_close(&listener, Duration::ZERO);
    wait_until("a request taken", Duration::from_secs(15), || {
        log.requests().len() >= 3
    });
    let (done, summary) = stop(tracer);
    let requests = log.requests();
    eprintln!("{} requests; {summary:?}", requests.len());
    next_attempt(&requests, 0);
    let again = next_attempt(&requests, 1);
    assert!(
        again - requests[1].0 >= Duration::from_millis(700),
        "retried {:?} after a RetryInfo of 700 ms",
        again - requests[1].0
    );
    // Every request after the first two: accepted but for one span each.
    let taken = requests.len() as u64 - 2;
    assert_eq!(summary.failed, taken, "{summary:?}");
    assert_eq!(
        summary.exported + summary.failed,
        summary.spans,
        "{summary:?}"
    );
    let accepted: Vec<usize> = (2..requests.len()).collect();
    assert_each_span_once(&requests, &accepted, summary.spans);
    let said = done.stderr.join("\n");
    assert!(
        said.contains("rejected 1 of") && said.contains("span too old"),
        "{said}"
    );
}

/// Each way a collector can be broken costs the spans sent to it, counted failed,
/// and one line; the daemon goes on tracing and exits in time, its memory bounded.
#[test]
fn a_broken_collector_costs_a_counted_failure_and_one_line() {
    if !root_or_skip("a_broken_collector_costs_a_counted_failure_and_one_line") {
        return;
    }
    let _serial = load::serial();
    type Script = fn(usize) -> Reply;
    let cases: [(&str, &str, Script); 5] = [
        ("a reply that is not protobuf", "http/protobuf", |_| {
            Reply::Http {
                status: 200,
                headers: vec![("content-type", "application/x-protobuf".into())],
                body: vec![0xff; 16],
            }
        }),
        ("a wrong content type", "http/protobuf", |_| Reply::Http {
            status: 200,
            headers: vec![("content-type", "application/json".into())],
            body: b"{}".to_vec(),
        }),
        ("a 100 MB body", "http/protobuf", |_| Reply::Huge),
        ("a reset mid-reply", "http/protobuf", |_| Reply::CutByReset),
        ("an HTTP/1.1-only server on the gRPC port", "grpc", |_| {
            accepted()
        }),
    ];
    for (case, protocol, script) in cases {
        let collector = Scripted::start(script);
        let mut tracer = tracer(protocol, &collector.endpoint(), TIMEOUT_MS);
        let (listener, server) = listen("127.0.0.1");
        connect_hold_close(&listener, Duration::ZERO);
        wait_until(
            &format!("{case}: spans counted failed"),
            Duration::from_secs(20),
            || Stats::last(&tracer.stderr()).is_some_and(|s| s.failed > 0),
        );
        // Still tracing: a connection made now is printed.
        let (after, _) = connect_hold_close(&listener, Duration::ZERO);
        tracer.wait_for("the connection after the failure", |lines| {
            rows(lines, false)
                .iter()
                .any(|r| r.lport == after.port() && r.rport == server.port() && r.new == "CLOSE")
        });
        assert!(!tracer.exited(), "{case}: the daemon exited");
        let peak_kib = load::status_kib(tracer.pid(), "VmHWM:").unwrap();
        let (done, summary) = stop(tracer);
        eprintln!("{case}: peak RSS {peak_kib} KiB; {summary:?}");
        assert_eq!(summary.exported, 0, "{case}: {summary:?}");
        assert!(summary.failed > 0, "{case}: {summary:?}");
        let failures: Vec<&String> = done
            .stderr
            .iter()
            .filter(|l| l.contains("failed ("))
            .collect();
        assert_eq!(
            failures.len(),
            1,
            "{case}: said once while failing: {failures:#?}"
        );
        // The 100 MB reply is never held: well under it.
        assert!(peak_kib < 64 * 1024, "{case}: peak RSS {peak_kib} KiB");
        if protocol == "grpc" {
            assert!(
                collector
                    .log
                    .requests()
                    .iter()
                    .all(|(_, ids)| ids.is_empty()),
                "{case}: no OTLP request reached the HTTP/1.1 server"
            );
        }
    }
}

/// `OTEL_EXPORTER_OTLP_COMPRESSION=gzip`: requests go compressed (the body is gzip
/// and is the request once inflated) and a collector that inflates them gets the
/// spans, over both transports.
#[test]
fn gzip_compresses_requests_on_both_transports() {
    if !root_or_skip("gzip_compresses_requests_on_both_transports") {
        return;
    }
    let _serial = load::serial();
    let gzip = [
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_METRICS_EXPORTER", "none"),
    ];
    let collector = Scripted::start(|_| accepted());
    let tracer = Tracer::start_with_env(&["--otlp-endpoint", &collector.endpoint()], &gzip);
    let (listener, _) = listen("127.0.0.1");
    connect_hold_close(&listener, Duration::ZERO);
    wait_until("a request", Duration::from_secs(15), || {
        !collector.log.bodies().is_empty()
    });
    stop(tracer);
    let body = &collector.log.bodies()[0];
    assert_eq!(body.get(..2), Some(&[0x1f, 0x8b][..]), "not gzip");
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&body[..])
        .read_to_end(&mut inflated)
        .unwrap();
    let request = ExportTraceServiceRequest::decode(&inflated[..]).unwrap();
    assert!(!request.resource_spans.is_empty());

    let rx = support::otlp::Receiver::start();
    for (protocol, endpoint) in [
        ("grpc", rx.grpc_endpoint()),
        ("http/protobuf", rx.http_endpoint()),
    ] {
        let before = rx.span_count();
        let tracer = Tracer::start_with_env(
            &["--otlp-endpoint", &endpoint, "--otlp-protocol", protocol],
            &gzip,
        );
        connect_hold_close(&listener, Duration::ZERO);
        wait_until(
            &format!("{protocol}: spans"),
            Duration::from_secs(15),
            || rx.span_count() > before,
        );
        let (_, summary) = stop(tracer);
        assert_eq!(summary.failed, 0, "{protocol}: {summary:?}");
    }
}

/// A collector that takes connections and never answers, and a short shutdown
/// deadline: at exit, the spans still queued or in flight (and those of sockets
/// still open, ended at shutdown) are named as cut off by the deadline, apart
/// from spans dropped with the queue full (none here) and failed ones (none: no
/// request's budget ran out), and the identity holds with them.
#[test]
fn the_shutdown_deadline_cuts_off_spans_named_apart() {
    if !root_or_skip("the_shutdown_deadline_cuts_off_spans_named_apart") {
        return;
    }
    let _serial = load::serial();
    const DEADLINE: Duration = Duration::from_secs(1);
    let collector = load::hanging_collector();
    for protocol in ["grpc", "http/protobuf"] {
        let tracer = Tracer::start_with_env(
            &[
                "--otlp-endpoint",
                &format!("http://{collector}"),
                "--otlp-protocol",
                protocol,
                "--print",
                "-s",
                "--shutdown-timeout",
                "1",
            ],
            &[
                ("OTEL_BSP_SCHEDULE_DELAY", "50"),
                // Longer than the test: no request fails before the deadline.
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "60000"),
                ("OTEL_METRICS_EXPORTER", "none"),
            ],
        );
        let (listener, server) = listen("127.0.0.1");
        let mut closed = Vec::new();
        for _ in 0..3 {
            closed.push(connect_hold_close(&listener, Duration::ZERO).0.port());
        }
        // Still open at exit: ended by the shutdown, their spans made then.
        let open = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _accepted = listener.accept().unwrap();
        tracer.wait_for("the connections printed", |lines| {
            let rows = rows(lines, false);
            closed.iter().all(|&c| {
                rows.iter()
                    .any(|r| r.lport == c && r.rport == server.port() && r.new == "CLOSE")
            }) && rows
                .iter()
                .any(|r| r.lport == open.local_addr().unwrap().port() && r.new == "ESTABLISHED")
        });
        // Sent, so in flight (the batch delay is 50 ms), never answered.
        thread::sleep(Duration::from_millis(500));
        let done = tracer.stop_with(Signal::SIGTERM);
        assert!(done.status.success(), "{protocol}: {:?}", done.stderr);
        assert!(
            done.took < DEADLINE + EXIT_GRACE,
            "{protocol}: exit took {:?}",
            done.took
        );
        let line = done
            .stderr
            .iter()
            .find(|l| l.contains("sockets traced"))
            .unwrap_or_else(|| panic!("{protocol}: no exit summary: {:?}", done.stderr));
        eprintln!("{protocol}: {line}");
        assert!(
            line.contains("cut off by the shutdown deadline")
                && line.contains("dropped (export queue full)"),
            "{protocol}: the summary does not name the deadline's spans apart: {line}"
        );
        let summary = load::Summary::parse(&done.stderr);
        summary.assert_every_span_accounted();
        // 3 closed client sockets (3 spans each), and the open one's 2 at exit
        // (ESTABLISHED and its root): at least, as other loopback sockets may be
        // traced too.
        assert!(summary.spans >= 3 * 3 + 2, "{protocol}: {summary:?}");
        assert_eq!(
            (
                summary.exported,
                summary.failed,
                summary.dropped,
                summary.cut_off
            ),
            (0, 0, 0, summary.spans),
            "{protocol}: {summary:?}"
        );
        drop(open);
    }
}
