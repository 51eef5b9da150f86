//! An in-process OTLP receiver, so tests can check what the daemon really puts on
//! the wire: gRPC (the tonic-generated trace and metrics services) and
//! HTTP/protobuf (`POST /v1/traces`, `/v1/metrics`), each on its own 127.0.0.1
//! port, served from a background thread with its own tokio runtime.
//! [`Receiver::start_tls`] serves both over TLS.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    io::Read as _,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, mpsc},
    thread,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::{DefaultBodyLimit, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::post,
};
use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::{AnyValue, KeyValue, any_value},
    metrics::v1::{NumberDataPoint, metric, number_data_point},
};
use prost::Message;
use tonic::{
    codec::CompressionEncoding,
    transport::{Server, server::TcpIncoming},
};

use super::tls::{ServerTls, serve_https};

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Double(f64),
    Bool(bool),
    /// Arrays, maps, bytes: their debug form, enough to tell they were there.
    Other(String),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

/// One span as received, flattened together with its resource and scope.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    /// "grpc" or "http".
    pub transport: &'static str,
    pub resource: BTreeMap<String, Value>,
    pub scope_name: String,
    /// Lowercase hex, 32 characters.
    pub trace_id: String,
    /// Lowercase hex, 16 characters.
    pub span_id: String,
    /// "" for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client, 4 producer, 5 consumer.
    pub kind: i32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: BTreeMap<String, Value>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub status_message: String,
    /// The span's links, in the order sent.
    pub links: Vec<ReceivedLink>,
    /// Links the sender left out of `links` (OTLP `dropped_links_count`).
    pub dropped_links_count: u32,
    /// The span's events, in the order sent.
    pub events: Vec<ReceivedEvent>,
    /// Events the sender left out (OTLP `dropped_events_count`).
    pub dropped_events_count: u32,
    /// The W3C `tracestate`, as sent ("" when none): for a trace kept by
    /// probability, the OpenTelemetry entry `ot=th:<threshold>`.
    pub trace_state: String,
    /// OTLP `Span.flags`: the W3C trace flags in bits 0-7 (0x01 sampled, 0x02
    /// random trace id); bit 8 says whether the parent's remoteness is known,
    /// bit 9 that it is remote.
    pub flags: u32,
}

/// One OTLP span link, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedLink {
    /// Lowercase hex, 32 characters.
    pub trace_id: String,
    /// Lowercase hex, 16 characters.
    pub span_id: String,
    /// OTLP `Link.flags`: the W3C trace flags in bits 0-7; bit 8 says whether
    /// the linked context is known to be remote, bit 9 that it is.
    pub flags: u32,
    pub attributes: BTreeMap<String, Value>,
}

/// One OTLP span event, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedEvent {
    pub time_ns: u64,
    pub name: String,
    pub attributes: BTreeMap<String, Value>,
}

impl ReceivedEvent {
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key)?.as_str()
    }

    pub fn int_attr(&self, key: &str) -> Option<i64> {
        self.attributes.get(key)?.as_int()
    }
}

impl ReceivedLink {
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key)?.as_str()
    }
}

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&Value> {
        self.attributes.get(key)
    }

    /// Its resource's `service.name`.
    pub fn service_name(&self) -> Option<&str> {
        match self.resource.get("service.name") {
            Some(Value::Str(name)) => Some(name),
            _ => None,
        }
    }

    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attr(key)?.as_str()
    }

    pub fn int_attr(&self, key: &str) -> Option<i64> {
        self.attr(key)?.as_int()
    }

    pub fn bool_attr(&self, key: &str) -> Option<bool> {
        match self.attr(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_ns.saturating_sub(self.start_ns)
    }
}

#[derive(Default)]
struct Store {
    spans: Vec<ReceivedSpan>,
    requests: usize,
    /// Spans received, kept or not.
    span_count: u64,
    /// Set by [`Receiver::start_counting`]: spans are counted, not kept.
    count_only: bool,
    /// Set by [`Receiver::start_counting_by_name`]: spans are counted by name too,
    /// and their links.
    by_name: bool,
    /// Spans received by name (with `by_name`).
    names: BTreeMap<String, u64>,
    /// Links received on spans, and those their senders left out (OTLP
    /// `dropped_links_count`), with `by_name`.
    links: (u64, u64),
    /// Each metric's latest data point.
    metrics: BTreeMap<String, ReceivedMetric>,
    /// Each metric's data points, with their attributes, by name.
    series: BTreeMap<String, ReceivedSeries>,
    metric_requests: usize,
    /// The paths OTLP/HTTP exports were posted to.
    http_paths: BTreeSet<String>,
}

/// A metric's latest single data point, as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedMetric {
    pub value: i64,
    /// "sum" (monotonic: a counter) or "gauge".
    pub kind: &'static str,
    pub service_name: Option<String>,
    pub transport: &'static str,
}

/// A metric's data points with their attributes: the latest of each attribute set
/// (with cumulative temporality, the total so far).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReceivedSeries {
    /// "sum" (monotonic: a counter), "updown" (a sum that is not), "gauge" or
    /// "histogram".
    pub kind: &'static str,
    pub unit: String,
    pub description: String,
    /// By attribute set (its debug form): the latest point.
    pub points: BTreeMap<String, ReceivedPoint>,
}

/// One data point as received.
#[derive(Clone, Debug, PartialEq)]
pub struct ReceivedPoint {
    pub attributes: BTreeMap<String, Value>,
    pub value: PointValue,
}

#[derive(Clone, Debug, PartialEq)]
pub enum PointValue {
    Int(i64),
    Double(f64),
    Histogram {
        count: u64,
        sum: f64,
        /// One more than `bounds`: the last counts what is above the last bound.
        bucket_counts: Vec<u64>,
        bounds: Vec<f64>,
    },
}

impl ReceivedPoint {
    pub fn str_attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key)?.as_str()
    }

    pub fn int_attr(&self, key: &str) -> Option<i64> {
        self.attributes.get(key)?.as_int()
    }

    /// A counter's or gauge's value, a histogram's count.
    pub fn count(&self) -> i64 {
        match &self.value {
            PointValue::Int(v) => *v,
            PointValue::Double(v) => *v as i64,
            PointValue::Histogram { count, .. } => *count as i64,
        }
    }

    /// A histogram's sum; a number's value.
    pub fn sum(&self) -> f64 {
        match &self.value {
            PointValue::Int(v) => *v as f64,
            PointValue::Double(v) => *v,
            PointValue::Histogram { sum, .. } => *sum,
        }
    }
}

impl ReceivedSeries {
    pub fn points(&self) -> impl Iterator<Item = &ReceivedPoint> {
        self.points.values()
    }

    /// The points whose attributes include all of `want` (string or integer values,
    /// compared as text), and none of `absent`.
    pub fn matching(
        &self,
        want: &[(&str, &str)],
        absent: &[&str],
    ) -> std::vec::IntoIter<&ReceivedPoint> {
        let matched: Vec<_> = self
            .points()
            .filter(|p| {
                want.iter()
                    .all(|(key, value)| match p.attributes.get(*key) {
                        Some(Value::Str(s)) => s == value,
                        Some(Value::Int(i)) => i.to_string() == *value,
                        Some(Value::Bool(b)) => b.to_string() == *value,
                        _ => false,
                    })
                    && absent.iter().all(|key| !p.attributes.contains_key(*key))
            })
            .collect();
        matched.into_iter()
    }
}

type Shared = Arc<Mutex<Store>>;

/// A poisoned lock only means a test thread panicked while holding it; what was
/// received is still worth showing.
fn lock(store: &Shared) -> MutexGuard<'_, Store> {
    store.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The receiver's one thread: everything it does runs there (its CPU is the bench's
/// receiver cost).
pub const RECEIVER_THREAD: &str = "otlp-receiver";

/// A running receiver; dropping it shuts both servers down.
pub struct Receiver {
    store: Shared,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    /// Served over TLS: endpoints are https://localhost:PORT.
    tls: bool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Receiver {
    /// Starts both servers; they are listening when this returns.
    pub fn start() -> Receiver {
        Self::start_with(Store::default(), (0, 0), None)
    }

    /// Like [`Receiver::start`], both servers over TLS as `tls` says.
    pub fn start_tls(tls: ServerTls) -> Receiver {
        Self::start_with(Store::default(), (0, 0), Some(tls))
    }

    /// Like [`Receiver::start`], on given ports (0: any): a collector coming back
    /// where the daemon expects it.
    pub fn start_at(grpc_port: u16, http_port: u16) -> Receiver {
        Self::start_with(Store::default(), (grpc_port, http_port), None)
    }

    /// Like [`Receiver::start`], but spans are only counted ([`Receiver::span_count`],
    /// [`Receiver::requests`]), never stored: for load, where keeping millions of
    /// spans would cost more than receiving them.
    pub fn start_counting() -> Receiver {
        Self::start_with(
            Store {
                count_only: true,
                ..Store::default()
            },
            (0, 0),
            None,
        )
    }

    /// Like [`Receiver::start_counting`], but also counting spans by name
    /// ([`Receiver::span_count_named`]) and their links ([`Receiver::link_count`]):
    /// what a load of one kind of span made, without keeping it.
    pub fn start_counting_by_name() -> Receiver {
        Self::start_with(
            Store {
                count_only: true,
                by_name: true,
                ..Store::default()
            },
            (0, 0),
            None,
        )
    }

    /// [`Receiver::start_counting`] on given ports: a counting collector that can
    /// go away and come back where the daemon expects it.
    pub fn start_counting_at(grpc_port: u16, http_port: u16) -> Receiver {
        Self::start_with(
            Store {
                count_only: true,
                ..Store::default()
            },
            (grpc_port, http_port),
            None,
        )
    }

    fn start_with(store: Store, ports: (u16, u16), tls: Option<ServerTls>) -> Receiver {
        let store = Shared::new(Mutex::new(store));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let served = Arc::clone(&store);
        let https = tls.is_some();
        let thread = thread::Builder::new()
            .name(RECEIVER_THREAD.into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime for the OTLP receiver");
                runtime.block_on(serve(served, ports, tls, ready_tx, stopped));
                // Dropping the runtime here closes the listeners and every open
                // connection, so exporters see the receiver go away.
            })
            .expect("spawn the OTLP receiver thread");
        let (grpc_addr, http_addr) = ready_rx
            .recv()
            .expect("the OTLP receiver thread died before listening");
        Receiver {
            store,
            grpc_addr,
            http_addr,
            tls: https,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// For an OTLP/gRPC exporter: "http://127.0.0.1:PORT" (with TLS
    /// "https://localhost:PORT", the name in the certificate).
    pub fn grpc_endpoint(&self) -> String {
        self.endpoint(self.grpc_addr)
    }

    /// The base URL for an OTLP/HTTP exporter, without "/v1/traces".
    pub fn http_endpoint(&self) -> String {
        self.endpoint(self.http_addr)
    }

    fn endpoint(&self, addr: SocketAddr) -> String {
        match self.tls {
            true => format!("https://localhost:{}", addr.port()),
            false => format!("http://{addr}"),
        }
    }

    /// Everything received so far, in arrival order.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        lock(&self.store).spans.clone()
    }

    /// Export requests received over both transports (including empty ones).
    pub fn requests(&self) -> usize {
        lock(&self.store).requests
    }

    /// Each metric's latest data point, by name.
    pub fn metrics(&self) -> BTreeMap<String, ReceivedMetric> {
        lock(&self.store).metrics.clone()
    }

    /// A metric's data points with their attributes, if any arrived.
    pub fn series(&self, name: &str) -> Option<ReceivedSeries> {
        lock(&self.store).series.get(name).cloned()
    }

    /// Every metric's data points with their attributes, by name.
    pub fn all_series(&self) -> BTreeMap<String, ReceivedSeries> {
        lock(&self.store).series.clone()
    }

    /// Metrics export requests received over both transports.
    pub fn metric_requests(&self) -> usize {
        lock(&self.store).metric_requests
    }

    /// The paths OTLP/HTTP exports arrived at: "/v1/traces", or under a base
    /// path such as "/api/v1/otlp/v1/metrics".
    pub fn http_paths(&self) -> BTreeSet<String> {
        lock(&self.store).http_paths.clone()
    }

    /// Spans received so far over both transports, stored or only counted.
    pub fn span_count(&self) -> u64 {
        lock(&self.store).span_count
    }

    /// Spans named `name` received so far ([`Receiver::start_counting_by_name`]
    /// only; 0 otherwise).
    pub fn span_count_named(&self, name: &str) -> u64 {
        lock(&self.store).names.get(name).copied().unwrap_or(0)
    }

    /// Links received on spans so far, and those their senders left out (OTLP
    /// `dropped_links_count`): [`Receiver::start_counting_by_name`] only.
    pub fn link_count(&self) -> (u64, u64) {
        lock(&self.store).links
    }

    /// Polls until `done(&spans)` holds or `timeout` passes; returns the spans
    /// either way, so the caller's assertion can show what did arrive.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() >= deadline {
                return spans;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Receiver {
    /// Shuts both servers down, as dropping does, and returns the spans they got
    /// in all: a request answered before the shutdown is counted, none after.
    pub fn stop(mut self) -> u64 {
        self.shut_down();
        self.span_count()
    }

    fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// The HTTP server, plain or over TLS.
type Serving = std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// Binds both listeners, reports their addresses, and serves until `stopped`.
async fn serve(
    store: Shared,
    (grpc_port, http_port): (u16, u16),
    tls: Option<ServerTls>,
    ready: mpsc::Sender<(SocketAddr, SocketAddr)>,
    stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let grpc = tokio::net::TcpListener::bind(("127.0.0.1", grpc_port))
        .await
        .expect("bind the OTLP/gRPC receiver");
    let http = tokio::net::TcpListener::bind(("127.0.0.1", http_port))
        .await
        .expect("bind the OTLP/HTTP receiver");
    let addrs = (
        grpc.local_addr().expect("gRPC receiver address"),
        http.local_addr().expect("HTTP receiver address"),
    );

    // Collectors (rotel included) gzip by default, so accept it like a real one.
    let trace_service = TraceServiceServer::new(Grpc(Arc::clone(&store)))
        .accept_compressed(CompressionEncoding::Gzip);
    // Flow-control windows as large as grpc-go (the Collector's gRPC) grows them
    // from the bandwidth-delay product: not h2's fixed 64 KiB, which makes a
    // sender of large requests wait for a window update every 64 KiB.
    let mut builder = Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20));
    if let Some(tls) = &tls {
        builder = builder
            .tls_config(tls.grpc())
            .expect("TLS for the OTLP/gRPC receiver");
    }
    let metrics_service = MetricsServiceServer::new(Grpc(Arc::clone(&store)))
        .accept_compressed(CompressionEncoding::Gzip);
    let grpc_server = builder
        .add_service(trace_service)
        .add_service(metrics_service)
        .serve_with_incoming(TcpIncoming::from(grpc));
    let app = Router::new()
        .route("/v1/traces", post(http_export))
        .route("/v1/metrics", post(http_export_metrics))
        // Exporters given a base URL with a path (Prometheus takes OTLP under
        // /api/v1/otlp) post to the signal's path under it.
        .fallback(prefixed_export)
        // The Collector's own limit for OTLP/HTTP bodies (confighttp's 20 MiB), not
        // axum's 2 MiB: a few thousand histogram series are more than that.
        .layer(DefaultBodyLimit::max(20 << 20))
        .with_state(store);
    let http_server: Serving = match tls {
        Some(tls) => Box::pin(serve_https(http, tls, app)),
        None => Box::pin(axum::serve(http, app).into_future()),
    };

    if ready.send(addrs).is_err() {
        return; // start() is gone; nobody will ever send to us.
    }
    // Neither server returns unless its listener fails; say so, since the test
    // will then only see spans stop arriving.
    tokio::select! {
        _ = stopped => {}
        result = grpc_server => eprintln!("OTLP/gRPC receiver stopped: {result:?}"),
        result = http_server => eprintln!("OTLP/HTTP receiver stopped: {result:?}"),
    }
}

struct Grpc(Shared);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        record(&self.0, "grpc", request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        record_metrics(&self.0, "grpc", request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn http_export(
    State(store): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    take::<ExportTraceServiceRequest, ExportTraceServiceResponse>(
        &store, &uri, &headers, body, record,
    )
}

async fn http_export_metrics(
    State(store): State<Shared>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    take::<ExportMetricsServiceRequest, ExportMetricsServiceResponse>(
        &store,
        &uri,
        &headers,
        body,
        record_metrics,
    )
}

/// One OTLP/HTTP export of either signal: decoded, recorded, answered.
fn take<Req: Message + Default, Resp: Message + Default>(
    store: &Shared,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    record: fn(&Shared, &'static str, Req),
) -> Response {
    lock(store).http_paths.insert(uri.path().to_owned());
    let body = match protobuf_body(headers, body) {
        Ok(body) => body,
        Err(rejected) => return rejected,
    };
    match Req::decode(&body[..]) {
        Ok(request) => {
            record(store, "http", request);
            let response = Resp::default().encode_to_vec();
            ([(header::CONTENT_TYPE, "application/x-protobuf")], response).into_response()
        }
        Err(e) => reject(
            StatusCode::BAD_REQUEST,
            format!("not an {}: {e}", std::any::type_name::<Req>()),
        ),
    }
}

async fn prefixed_export(
    state: State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    match (&method, path) {
        (&Method::POST, p) if p.ends_with("/v1/traces") => {
            http_export(state, uri, headers, body).await
        }
        (&Method::POST, p) if p.ends_with("/v1/metrics") => {
            http_export_metrics(state, uri, headers, body).await
        }
        _ => reject(
            StatusCode::NOT_FOUND,
            format!("no OTLP signal at {method} {path}"),
        ),
    }
}

/// OTLP/HTTP with binary protobuf, maybe gzipped; JSON is not accepted, so a test
/// notices if the daemon ever sends it.
#[allow(clippy::result_large_err)]
fn protobuf_body(headers: &HeaderMap, body: Bytes) -> Result<Vec<u8>, Response> {
    let content_type = header_str(headers, header::CONTENT_TYPE);
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if media_type != "application/x-protobuf" {
        return Err(reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("want application/x-protobuf, got {content_type:?}"),
        ));
    }
    Ok(match header_str(headers, header::CONTENT_ENCODING) {
        "" | "identity" => body.to_vec(),
        "gzip" => {
            let mut plain = Vec::new();
            if let Err(e) = flate2::read::GzDecoder::new(&body[..]).read_to_end(&mut plain) {
                return Err(reject(
                    StatusCode::BAD_REQUEST,
                    format!("bad gzip body: {e}"),
                ));
            }
            plain
        }
        other => {
            return Err(reject(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("unsupported content-encoding {other:?}"),
            ));
        }
    })
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> &str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Rejections are printed too: the exporter usually only logs them, and the test
/// output is where someone will look.
fn reject(status: StatusCode, message: String) -> Response {
    eprintln!("OTLP/HTTP receiver: {status}: {message}");
    (status, message).into_response()
}

fn record(store: &Shared, transport: &'static str, request: ExportTraceServiceRequest) {
    let count: usize = request
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    // Checked before flattening, which is the costly part.
    let (count_only, by_name) = {
        let store = lock(store);
        (store.count_only, store.by_name)
    };
    if by_name {
        let mut store = lock(store);
        let store = &mut *store;
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            match store.names.get_mut(span.name.as_str()) {
                Some(n) => *n += 1,
                None => {
                    store.names.insert(span.name.clone(), 1);
                }
            }
            store.links.0 += span.links.len() as u64;
            store.links.1 += u64::from(span.dropped_links_count);
        }
    }
    let spans = if count_only {
        Vec::new()
    } else {
        flatten(transport, request)
    };
    let mut store = lock(store);
    store.requests += 1;
    store.span_count += count as u64;
    store.spans.extend(spans);
}

/// Keeps each metric's latest integer data point (for [`Receiver::metrics`]: the
/// self-metrics, integers without attributes), and every data point with its
/// attributes (for [`Receiver::series`]).
fn record_metrics(store: &Shared, transport: &'static str, request: ExportMetricsServiceRequest) {
    let mut store = lock(store);
    store.metric_requests += 1;
    for resource in request.resource_metrics {
        let service_name = resource
            .resource
            .map(|r| attributes(r.attributes))
            .and_then(|a| match a.get("service.name") {
                Some(Value::Str(name)) => Some(name.clone()),
                _ => None,
            });
        for metric in resource.scope_metrics.into_iter().flat_map(|s| s.metrics) {
            keep_series(&mut store.series, &metric);
            let (kind, points) = match metric.data {
                Some(metric::Data::Sum(sum)) if sum.is_monotonic => ("sum", sum.data_points),
                Some(metric::Data::Gauge(gauge)) => ("gauge", gauge.data_points),
                _ => continue,
            };
            let Some(value) = points.last().and_then(|p| match p.value {
                Some(number_data_point::Value::AsInt(v)) => Some(v),
                _ => None,
            }) else {
                continue;
            };
            store.metrics.insert(
                metric.name,
                ReceivedMetric {
                    value,
                    kind,
                    service_name: service_name.clone(),
                    transport,
                },
            );
        }
    }
}

/// Keeps every data point of `metric`, the latest of each attribute set.
fn keep_series(
    series: &mut BTreeMap<String, ReceivedSeries>,
    metric: &opentelemetry_proto::tonic::metrics::v1::Metric,
) {
    let number = |p: &NumberDataPoint| {
        let value = match p.value {
            Some(number_data_point::Value::AsInt(v)) => PointValue::Int(v),
            Some(number_data_point::Value::AsDouble(v)) => PointValue::Double(v),
            None => return None,
        };
        Some((p.attributes.clone(), value))
    };
    let (kind, points): (&'static str, Vec<_>) = match &metric.data {
        Some(metric::Data::Sum(sum)) => (
            if sum.is_monotonic { "sum" } else { "updown" },
            sum.data_points.iter().filter_map(number).collect(),
        ),
        Some(metric::Data::Gauge(gauge)) => (
            "gauge",
            gauge.data_points.iter().filter_map(number).collect(),
        ),
        Some(metric::Data::Histogram(histogram)) => (
            "histogram",
            histogram
                .data_points
                .iter()
                .map(|p| {
                    let value = PointValue::Histogram {
                        count: p.count,
                        sum: p.sum.unwrap_or_default(),
                        bucket_counts: p.bucket_counts.clone(),
                        bounds: p.explicit_bounds.clone(),
                    };
                    (p.attributes.clone(), value)
                })
                .collect(),
        ),
        _ => return,
    };
    let kept = series.entry(metric.name.clone()).or_default();
    kept.kind = kind;
    kept.unit.clone_from(&metric.unit);
    kept.description.clone_from(&metric.description);
    for (attributes, value) in points {
        let attributes = self::attributes(attributes);
        kept.points.insert(
            format!("{attributes:?}"),
            ReceivedPoint { attributes, value },
        );
    }
}

fn flatten(transport: &'static str, request: ExportTraceServiceRequest) -> Vec<ReceivedSpan> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let resource = resource_spans
            .resource
            .map(|r| attributes(r.attributes))
            .unwrap_or_default();
        for scope_spans in resource_spans.scope_spans {
            let scope_name = scope_spans.scope.map(|s| s.name).unwrap_or_default();
            for span in scope_spans.spans {
                let status = span.status.unwrap_or_default();
                out.push(ReceivedSpan {
                    transport,
                    resource: resource.clone(),
                    scope_name: scope_name.clone(),
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    name: span.name,
                    kind: span.kind,
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    attributes: attributes(span.attributes),
                    status_code: status.code,
                    status_message: status.message,
                    links: span
                        .links
                        .into_iter()
                        .map(|link| ReceivedLink {
                            trace_id: hex(&link.trace_id),
                            span_id: hex(&link.span_id),
                            flags: link.flags,
                            attributes: attributes(link.attributes),
                        })
                        .collect(),
                    dropped_links_count: span.dropped_links_count,
                    events: span
                        .events
                        .into_iter()
                        .map(|event| ReceivedEvent {
                            time_ns: event.time_unix_nano,
                            name: event.name,
                            attributes: attributes(event.attributes),
                        })
                        .collect(),
                    dropped_events_count: span.dropped_events_count,
                    trace_state: span.trace_state,
                    flags: span.flags,
                });
            }
        }
    }
    out
}

fn attributes(list: Vec<KeyValue>) -> BTreeMap<String, Value> {
    list.into_iter()
        .map(|kv| (kv.key, value(kv.value)))
        .collect()
}

fn value(v: Option<AnyValue>) -> Value {
    match v.and_then(|v| v.value) {
        Some(any_value::Value::StringValue(s)) => Value::Str(s),
        Some(any_value::Value::IntValue(i)) => Value::Int(i),
        Some(any_value::Value::DoubleValue(d)) => Value::Double(d),
        Some(any_value::Value::BoolValue(b)) => Value::Bool(b),
        Some(other) => Value::Other(format!("{other:?}")),
        None => Value::Other("<empty>".to_owned()),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the tests look for in exported traces.
pub const ROOT: &str = "tcp.session";

/// The server ends in `spans`: roots of kind server on `port`.
pub fn server_roots(spans: &[ReceivedSpan], port: u16) -> Vec<&ReceivedSpan> {
    spans
        .iter()
        .filter(|s| {
            s.name == ROOT
                && s.kind == KIND_SERVER
                && s.int_attr("network.local.port") == Some(i64::from(port))
        })
        .collect()
}
pub const KIND_INTERNAL: i32 = 1;
pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;
pub const STATUS_UNSET: i32 = 0;
pub const STATUS_ERROR: i32 = 2;
/// How long a test waits for spans to arrive.
pub const WAIT: Duration = Duration::from_secs(20);
/// Export promptly in tests (the default batch delay is a second).
pub const FAST: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "50")];

/// The root of the socket with these local and peer ports, and its children in order.
pub fn trace_of(
    spans: &[ReceivedSpan],
    local: u16,
    peer: u16,
) -> Option<(ReceivedSpan, Vec<ReceivedSpan>)> {
    let port = |s: &ReceivedSpan, key| s.int_attr(key).map(|p| p as u16);
    let root = spans.iter().find(|s| {
        s.name == ROOT
            && port(s, "network.local.port") == Some(local)
            && port(s, "network.peer.port") == Some(peer)
    })?;
    let mut children: Vec<ReceivedSpan> = spans
        .iter()
        .filter(|s| s.trace_id == root.trace_id && !s.parent_span_id.is_empty())
        .cloned()
        .collect();
    children.sort_by_key(|s| (s.start_ns, s.end_ns));
    Some((root.clone(), children))
}

/// The spans' names, in order.
pub fn names(spans: &[ReceivedSpan]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}
