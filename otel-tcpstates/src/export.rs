//! OTLP export: where to send (flags and the standard `OTEL_*` variables), the
//! resource, and a batch processor with a bounded queue that counts what it sends.
use std::{
    collections::{BTreeMap, HashMap},
    env,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{
    Protocol as OtlpProtocol, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::{
    Resource,
    error::OTelSdkResult,
    resource::{EnvResourceDetector, ResourceDetector, TelemetryResourceDetector},
    trace::{BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanExporter, SpanProcessor as _},
};
use url::Url;

use crate::{cli::UsageError, spans::attr::SERVICE_ROUTE, tls::Trust};

const DEFAULT_SERVICE_NAME: &str = "otel-tcpstates";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "grpc" => Some(Self::Grpc),
            "http/protobuf" => Some(Self::HttpProtobuf),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        }
    }
}

/// Where and how to export, once resolved from flags and environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The endpoint given with `--otlp-endpoint` (already a full URL for HTTP); `None`
    /// leaves it to `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`.
    pub flag_endpoint: Option<String>,
    /// For messages: the endpoint in effect, whichever source it came from.
    pub endpoint: String,
    pub protocol: Protocol,
    /// Whether the tracer's own counters are exported as metrics too (unless
    /// `OTEL_METRICS_EXPORTER=none`).
    pub metrics: bool,
    /// Where those go, when it differs from what the metrics exporter would read
    /// from `OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT` itself: next to the traces.
    pub metrics_endpoint: Option<String>,
    /// CA certificates and client certificate from `OTEL_EXPORTER_OTLP_[TRACES_]*`;
    /// `None`: the system's roots alone.
    pub trust: Option<Trust>,
    /// The same from `OTEL_EXPORTER_OTLP_[METRICS_]*`.
    pub metrics_trust: Option<Trust>,
    /// Whether the metrics endpoint in effect is https://.
    pub metrics_https: bool,
}

impl Settings {
    /// How the span exporter connects. Without a flag it reads
    /// OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT itself.
    pub fn traces_transport(&self) -> Transport<'_> {
        Transport {
            endpoint: self.flag_endpoint.as_deref(),
            https: is_https(&self.endpoint),
            trust: self.trust.as_ref(),
            timeout_var: opentelemetry_otlp::OTEL_EXPORTER_OTLP_TRACES_TIMEOUT,
        }
    }

    /// How the self-metrics exporter connects: next to the traces unless its own
    /// variables say otherwise.
    pub fn metrics_transport(&self) -> Transport<'_> {
        Transport {
            endpoint: self.metrics_endpoint.as_deref(),
            https: self.metrics_https,
            trust: self.metrics_trust.as_ref(),
            timeout_var: opentelemetry_otlp::OTEL_EXPORTER_OTLP_METRICS_TIMEOUT,
        }
    }
}

/// One signal's connection: the endpoint to set (`None`: the exporter reads its
/// variables), and the TLS trust to give it.
pub struct Transport<'a> {
    endpoint: Option<&'a str>,
    https: bool,
    trust: Option<&'a Trust>,
    /// The signal's own timeout variable, e.g. OTEL_EXPORTER_OTLP_TRACES_TIMEOUT.
    timeout_var: &'static str,
}

impl Transport<'_> {
    /// Configures a gRPC exporter builder (spans or metrics).
    pub fn grpc<B: WithExportConfig + WithTonicConfig>(&self, mut builder: B) -> Result<B> {
        if let Some(url) = self.endpoint {
            builder = builder.with_endpoint(url);
        }
        // Always for https://: left to itself, opentelemetry-otlp gives tonic no
        // roots at all (its issue #2008), so nothing would verify.
        if self.https {
            let trust = self.trust.cloned().unwrap_or_default();
            builder = builder.with_tls_config(trust.tonic_config().context("setting up TLS")?);
        }
        Ok(builder)
    }

    /// Configures an HTTP exporter builder (spans or metrics).
    pub fn http<B: WithExportConfig + WithHttpConfig>(&self, mut builder: B) -> Result<B> {
        if let Some(url) = self.endpoint {
            builder = builder.with_endpoint(url);
        }
        if let Some(trust) = self.trust {
            // Our own client replaces the exporter's, timeout included; the same
            // value goes to both, as the exporter would resolve it.
            let timeout = export_timeout(self.timeout_var, env_nonempty);
            let client = trust.http_client(timeout).context("setting up TLS")?;
            builder = builder.with_timeout(timeout).with_http_client(client);
        }
        Ok(builder)
    }
}

fn is_https(url: &str) -> bool {
    Url::parse(url.trim()).is_ok_and(|url| url.scheme() == "https")
}

fn env_nonempty(name: &str) -> Option<String> {
    env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// [`settings_from`] with the process environment.
pub fn settings(
    flag_endpoint: Option<&str>,
    flag_protocol: Option<Protocol>,
) -> Result<Option<Settings>, UsageError> {
    settings_from(flag_endpoint, flag_protocol, env_nonempty)
}

fn check_url(text: &str, source: &str) -> Result<Url, UsageError> {
    let url = Url::parse(text.trim()).map_err(|err| {
        UsageError(format!(
            "{source} '{text}' is not a URL ({err}); expected e.g. http://localhost:4318"
        ))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(UsageError(format!(
            "{source} '{text}' must be an http:// or https:// URL with a host"
        )));
    }
    Ok(url)
}

/// Checks a `key=value,key=value` list (OTEL_RESOURCE_ATTRIBUTES, the headers). A
/// header's value is never echoed: it may be a secret.
fn check_pairs(name: &str, text: &str, echo: bool) -> Result<(), UsageError> {
    for (at, item) in text.split(',').enumerate() {
        if item.trim().is_empty() {
            continue;
        }
        let ok = item
            .split_once('=')
            .is_some_and(|(key, _)| !key.trim().is_empty());
        if !ok {
            let shown = if echo {
                format!(" '{item}'")
            } else {
                String::new()
            };
            return Err(UsageError(format!(
                "{name}: item {}{shown} is not key=value",
                at + 1
            )));
        }
    }
    Ok(())
}

/// Resolves the export settings from flags and `env` (non-empty variables); `None`
/// when no endpoint is configured at all (the tracer then prints text only).
pub fn settings_from(
    flag_endpoint: Option<&str>,
    flag_protocol: Option<Protocol>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, UsageError> {
    let mut settings = resolve(flag_endpoint, flag_protocol, &env)?;
    if let Some(settings) = &mut settings {
        settings.metrics = match env("OTEL_METRICS_EXPORTER").as_deref().map(str::trim) {
            None | Some("otlp") => true,
            Some("none") => false,
            Some(other) => {
                return Err(UsageError(format!(
                    "OTEL_METRICS_EXPORTER='{other}' is not supported; use otlp or none"
                )));
            }
        };
        if let Some(value) = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
            check_url(&value, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")?;
        }
        settings.trust = Trust::from_vars("TRACES", &env)?;
        // The metrics go next to the traces: the same trust, unless told otherwise.
        let metrics_own = ["CERTIFICATE", "CLIENT_CERTIFICATE", "CLIENT_KEY"]
            .iter()
            .any(|var| env(&format!("OTEL_EXPORTER_OTLP_METRICS_{var}")).is_some());
        settings.metrics_trust = if metrics_own {
            Trust::from_vars("METRICS", &env)?
        } else {
            settings.trust.clone()
        };
        let metrics_url = settings
            .metrics_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .unwrap_or_else(|| settings.endpoint.clone());
        settings.metrics_https = is_https(&metrics_url);
        if let Some(value) = env("OTEL_RESOURCE_ATTRIBUTES") {
            check_pairs("OTEL_RESOURCE_ATTRIBUTES", &value, true)?;
        }
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        ] {
            if let Some(value) = env(name) {
                check_pairs(name, &value, false)?;
            }
        }
    }
    Ok(settings)
}

fn resolve(
    flag_endpoint: Option<&str>,
    flag_protocol: Option<Protocol>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Option<Settings>, UsageError> {
    let protocol = match flag_protocol {
        Some(protocol) => protocol,
        None => {
            let from_env = [
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ]
            .into_iter()
            .find_map(|name| env(name).map(|value| (name, value)));
            match from_env {
                None => Protocol::HttpProtobuf,
                Some((name, value)) => Protocol::parse(&value).ok_or_else(|| {
                    UsageError(format!(
                        "{name}='{value}' is not supported; use grpc or http/protobuf"
                    ))
                })?,
            }
        }
    };
    if let Some(flag) = flag_endpoint {
        let mut url = check_url(flag, "--otlp-endpoint")?;
        // Like OTEL_EXPORTER_OTLP_ENDPOINT: a base URL, to which HTTP adds the path.
        if protocol == Protocol::HttpProtobuf && !url.path().ends_with("/v1/traces") {
            let path = format!("{}/v1/traces", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        return Ok(Some(Settings {
            flag_endpoint: Some(url.to_string()),
            endpoint: url.to_string(),
            protocol,
            metrics: true,
            metrics_endpoint: env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
                .is_none()
                .then(|| metrics_next_to(url.as_str(), protocol)),
            trust: None,
            metrics_trust: None,
            metrics_https: false,
        }));
    }
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        if let Some(value) = env(name) {
            check_url(&value, name)?;
            // Only a traces-specific endpoint leaves the metrics exporter without
            // one of its own to read.
            let metrics_endpoint = (name == "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
                && env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_none()
                && env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none())
            .then(|| metrics_next_to(&value, protocol));
            return Ok(Some(Settings {
                flag_endpoint: None,
                endpoint: value,
                protocol,
                metrics: true,
                metrics_endpoint,
                trust: None,
                metrics_trust: None,
                metrics_https: false,
            }));
        }
    }
    Ok(None)
}

/// The metrics endpoint on the collector that takes the traces at `traces`.
fn metrics_next_to(traces: &str, protocol: Protocol) -> String {
    match protocol {
        Protocol::Grpc => traces.to_owned(),
        Protocol::HttpProtobuf => match traces.trim_end_matches('/').strip_suffix("/v1/traces") {
            Some(base) => format!("{base}/v1/metrics"),
            None => traces.to_owned(),
        },
    }
}

/// The resource every span carries: `service.name` (default `otel-tcpstates`,
/// overridden by `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES`), `host.name`, and
/// the SDK's own attributes.
pub fn resource() -> Resource {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .unwrap_or_default();
    let mut builder = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", DEFAULT_SERVICE_NAME),
            KeyValue::new("host.name", host),
        ])
        .with_attributes(TelemetryResourceDetector.detect().iter().map(kv))
        .with_attributes(EnvResourceDetector::new().detect().iter().map(kv));
    if let Some(name) = env_nonempty("OTEL_SERVICE_NAME") {
        builder = builder.with_service_name(name);
    }
    builder.build()
}

fn kv((key, value): (&opentelemetry::Key, &opentelemetry::Value)) -> KeyValue {
    KeyValue::new(key.clone(), value.clone())
}

/// What the exporter has done so far.
#[derive(Debug, Default)]
pub struct Counters {
    /// Spans handed to the batch processor.
    pub produced: AtomicU64,
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans in batches the collector did not accept (unreachable, timeout, error).
    pub failed: AtomicU64,
    /// Export requests that failed.
    pub errors: AtomicU64,
}

/// Wraps the OTLP exporter to count outcomes, to say once when export starts failing
/// and when it recovers, and, with `--service-per-process`, to send each process's
/// spans under its own `service.name`.
#[derive(Debug)]
struct Counting<E> {
    // A lock, because switching the resource takes `&mut`; the batch processor
    // exports one batch at a time, so it is never contended.
    inner: tokio::sync::Mutex<E>,
    counters: Arc<Counters>,
    failing: AtomicBool,
    endpoint: String,
    /// Set with `--service-per-process`: the base resource to derive from.
    per_process: Option<Resource>,
    /// Resources per service name, built once each.
    resources: std::sync::Mutex<HashMap<Option<String>, Resource>>,
}

/// Takes the service route attribute out of each span and groups spans by it.
fn by_service(batch: Vec<SpanData>) -> BTreeMap<Option<String>, Vec<SpanData>> {
    let mut groups: BTreeMap<Option<String>, Vec<SpanData>> = BTreeMap::new();
    for mut span in batch {
        let service = span
            .attributes
            .iter()
            .position(|kv| kv.key.as_str() == SERVICE_ROUTE)
            .map(|at| span.attributes.swap_remove(at).value.to_string());
        groups.entry(service).or_default().push(span);
    }
    groups
}

impl<E: SpanExporter> Counting<E> {
    fn resource_for(&self, base: &Resource, service: &Option<String>) -> Resource {
        let mut resources = self.resources.lock().unwrap_or_else(|e| e.into_inner());
        resources
            .entry(service.clone())
            .or_insert_with(|| match service {
                Some(name) => Resource::builder_empty()
                    .with_attributes(base.iter().map(kv))
                    .with_service_name(name.clone())
                    .build(),
                None => base.clone(),
            })
            .clone()
    }

    async fn export_all(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut inner = self.inner.lock().await;
        let Some(base) = &self.per_process else {
            return inner.export(batch).await;
        };
        let mut result = Ok(());
        for (service, spans) in by_service(batch) {
            inner.set_resource(&self.resource_for(base, &service));
            if let Err(err) = inner.export(spans).await {
                result = Err(err);
            }
        }
        result
    }
}

impl<E: SpanExporter> SpanExporter for Counting<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let result = self.export_all(batch).await;
        match &result {
            Ok(()) => {
                self.counters.exported.fetch_add(spans, Ordering::Relaxed);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("export to {} works again", self.endpoint);
                }
            }
            Err(err) => {
                self.counters.failed.fetch_add(spans, Ordering::Relaxed);
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "export to {} failed ({err}); tracing goes on, spans that cannot be sent are counted as failed",
                        self.endpoint
                    );
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.shutdown_with_timeout(timeout),
            // An export is still running (the collector hangs): nothing to wait for.
            Err(_) => Ok(()),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        match self.inner.try_lock() {
            Ok(inner) => inner.force_flush(),
            Err(_) => Ok(()),
        }
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.get_mut().set_resource(resource);
    }
}

/// The export timeout as opentelemetry-otlp resolves it: the signal's variable
/// (e.g. `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT`), the general one, its default
/// (milliseconds; an unparsable value counts as unset).
fn export_timeout(signal_var: &str, env: impl Fn(&str) -> Option<String>) -> Duration {
    [signal_var, opentelemetry_otlp::OTEL_EXPORTER_OTLP_TIMEOUT]
        .into_iter()
        .find_map(|name| env(name)?.parse().ok())
        .map_or(
            opentelemetry_otlp::OTEL_EXPORTER_OTLP_TIMEOUT_DEFAULT,
            Duration::from_millis,
        )
}

/// How often a shutdown waiting for room in the queue looks again.
const QUEUE_POLL: Duration = Duration::from_millis(1);

pub struct Exporter {
    processor: BatchSpanProcessor,
    counters: Arc<Counters>,
    /// The batch processor's queue length.
    queue: u64,
    /// What the batch processor can hold: its queue plus the batch being exported.
    capacity: u64,
    /// Once shut down nothing is queued any more.
    shut_down: bool,
    /// The highest drop count reported so far: the estimate falls when the
    /// queue drains, a count must not.
    dropped_reported: AtomicU64,
}

impl Exporter {
    /// Builds the OTLP exporter and its batch processor. Must run inside the tokio
    /// runtime: the gRPC channel's worker is spawned on it.
    pub fn start(
        settings: &Settings,
        resource: &Resource,
        service_per_process: bool,
    ) -> Result<Self> {
        let builder = opentelemetry_otlp::SpanExporter::builder();
        let transport = settings.traces_transport();
        let exporter = match settings.protocol {
            Protocol::Grpc => transport
                .grpc(builder.with_tonic().with_protocol(OtlpProtocol::Grpc))
                .and_then(|builder| Ok(builder.build()?)),
            Protocol::HttpProtobuf => transport
                .http(builder.with_http().with_protocol(OtlpProtocol::HttpBinary))
                .and_then(|builder| Ok(builder.build()?)),
        }
        .with_context(|| {
            format!(
                "setting up OTLP/{} export to {}",
                settings.protocol.as_str(),
                settings.endpoint
            )
        })?;
        let counters = Arc::new(Counters::default());
        let exporter = Counting {
            inner: tokio::sync::Mutex::new(exporter),
            counters: Arc::clone(&counters),
            failing: AtomicBool::new(false),
            endpoint: settings.endpoint.clone(),
            per_process: service_per_process.then(|| resource.clone()),
            resources: std::sync::Mutex::new(HashMap::new()),
        };
        // The SDK reads OTEL_BSP_*; where unset, favour a deeper queue (bursts of
        // connection churn) and a shorter delay than the SDK's defaults. The queue
        // is allocated up front and a queued span holds about 1 KiB, so it is also
        // what bounds the exporter's memory: 8192 spans, about 10 MiB.
        let size = |name: &str, default: usize| {
            env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n > 0)
                .unwrap_or(default)
        };
        let queue = size("OTEL_BSP_MAX_QUEUE_SIZE", 8192);
        let batch = size("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2048).min(queue);
        let mut config = BatchConfigBuilder::default()
            .with_max_queue_size(queue)
            .with_max_export_batch_size(batch);
        if env::var_os("OTEL_BSP_SCHEDULE_DELAY").is_none() {
            config = config.with_scheduled_delay(Duration::from_millis(1000));
        }
        let capacity = (queue + batch) as u64;
        let mut processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(config.build())
            .build();
        processor.set_resource(resource);
        Ok(Self {
            processor,
            counters,
            queue: queue as u64,
            capacity,
            shut_down: false,
            dropped_reported: AtomicU64::new(0),
        })
    }

    pub fn send(&self, span: SpanData) {
        self.counters.produced.fetch_add(1, Ordering::Relaxed);
        self.processor.on_end(span);
    }

    /// Like [`Exporter::send`], but until `deadline` waits for room in the queue
    /// instead of letting a full queue drop the span. For shutdown, when every
    /// in-flight session is ended at once and nothing else competes for the time;
    /// while running, the event loop must never wait. The batch processor exports
    /// as soon as a batch is full, so room comes as fast as the collector takes it.
    pub fn send_flushing(&mut self, span: SpanData, deadline: Instant) {
        // Fewer than `queue` spans unsettled means fewer than `queue` in the
        // queue: the span fits.
        while self.unsettled() >= self.queue && Instant::now() < deadline {
            std::thread::sleep(QUEUE_POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
        self.send(span);
    }

    /// Spans that will never be handed over: produced, never queued, so counted
    /// as dropped once shut down.
    pub fn not_sent(&self, spans: u64) {
        self.counters.produced.fetch_add(spans, Ordering::Relaxed);
    }

    /// Handed over and neither exported nor failed yet.
    fn unsettled(&self) -> u64 {
        let c = &self.counters;
        let settled = c.exported.load(Ordering::Relaxed) + c.failed.load(Ordering::Relaxed);
        c.produced.load(Ordering::Relaxed).saturating_sub(settled)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Spans certainly dropped so far because the queue was full: whatever was
    /// handed over and is neither exported, failed, nor able to fit in the queue.
    /// Exact once shut down, when nothing is left queued; never decreases.
    pub fn dropped_at_least(&self) -> u64 {
        let queued_at_most = if self.shut_down { 0 } else { self.capacity };
        let now = self.unsettled().saturating_sub(queued_at_most);
        self.dropped_reported
            .fetch_max(now, Ordering::Relaxed)
            .max(now)
    }

    /// Exports what is queued, waiting at most `timeout` (the collector may be gone).
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        self.shut_down = true;
        self.processor
            .shutdown_with_timeout(timeout)
            .map_err(|err| match err {
                opentelemetry_sdk::error::OTelSdkError::Timeout(_) => anyhow::anyhow!(
                    "the last spans were not all sent by the shutdown deadline; \
                     the rest are counted as not sent (raise --shutdown-timeout)"
                ),
                err => anyhow::anyhow!("flushing the last spans: {err}"),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_grouped_by_service_and_the_route_is_removed() {
        use opentelemetry::trace::{SpanContext, SpanId, SpanKind, Status};
        let span = |service: Option<&str>| SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "ESTABLISHED".into(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            end_time: std::time::SystemTime::UNIX_EPOCH,
            attributes: [KeyValue::new("network.transport", "tcp")]
                .into_iter()
                .chain(service.map(|s| KeyValue::new(SERVICE_ROUTE, s.to_owned())))
                .collect(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        };
        let groups = by_service(vec![
            span(Some("curl")),
            span(None),
            span(Some("curl")),
            span(Some("nginx")),
        ]);
        let sizes: Vec<(Option<&str>, usize)> = groups
            .iter()
            .map(|(k, v)| (k.as_deref(), v.len()))
            .collect();
        assert_eq!(sizes, [(None, 1), (Some("curl"), 2), (Some("nginx"), 1)]);
        assert!(groups.values().flatten().all(|s| s.attributes.len() == 1));
    }

    fn resolve(
        endpoint: Option<&str>,
        protocol: Option<Protocol>,
        vars: &[(&str, &str)],
    ) -> Result<Option<Settings>, UsageError> {
        settings_from(endpoint, protocol, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn no_endpoint_means_no_export() {
        assert_eq!(resolve(None, None, &[]), Ok(None));
        assert_eq!(
            resolve(None, None, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]),
            Ok(None)
        );
    }

    #[test]
    fn flag_endpoint_is_a_base_url_for_http() {
        let s = resolve(Some("http://collector:4318"), None, &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            s.flag_endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        let s = resolve(Some("https://c.example/otlp/"), None, &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.endpoint, "https://c.example/otlp/v1/traces");
        let s = resolve(Some("http://c:4317"), Some(Protocol::Grpc), &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.flag_endpoint.as_deref(), Some("http://c:4317/"));
    }

    #[test]
    fn environment_is_honoured_and_flags_win() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ];
        let s = resolve(None, None, &vars).unwrap().unwrap();
        assert_eq!(
            (s.protocol, s.flag_endpoint, s.endpoint.as_str()),
            (Protocol::Grpc, None, "http://a:4317")
        );
        let s = resolve(None, Some(Protocol::HttpProtobuf), &vars)
            .unwrap()
            .unwrap();
        assert_eq!(s.protocol, Protocol::HttpProtobuf);
        let traces = [(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://t:4318/v1/traces",
        )];
        let s = resolve(None, None, &[vars[0], traces[0]]).unwrap().unwrap();
        assert_eq!(s.endpoint, "http://t:4318/v1/traces");
    }

    #[test]
    fn malformed_lists_are_usage_errors_without_secrets() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318");
        let err = resolve(
            None,
            None,
            &[
                endpoint,
                (
                    "OTEL_EXPORTER_OTLP_HEADERS",
                    "authorization=ok,Bearer s3cr3t",
                ),
            ],
        )
        .unwrap_err();
        assert_eq!(err.0, "OTEL_EXPORTER_OTLP_HEADERS: item 2 is not key=value");
        let err = resolve(
            None,
            None,
            &[endpoint, ("OTEL_RESOURCE_ATTRIBUTES", "a=1,=2")],
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            "OTEL_RESOURCE_ATTRIBUTES: item 2 '=2' is not key=value"
        );
        let fine = [
            endpoint,
            ("OTEL_RESOURCE_ATTRIBUTES", "a=1, b = 2,"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x=y=z"),
        ];
        assert!(resolve(None, None, &fine).unwrap().is_some());
        // Without export they do not matter.
        assert_eq!(
            resolve(None, None, &[("OTEL_RESOURCE_ATTRIBUTES", "junk")]),
            Ok(None)
        );
    }

    #[test]
    fn metrics_go_next_to_the_traces_unless_told_otherwise() {
        let s = resolve(Some("http://c:4318"), None, &[]).unwrap().unwrap();
        assert!(s.metrics);
        assert_eq!(
            s.metrics_endpoint.as_deref(),
            Some("http://c:4318/v1/metrics")
        );
        let s = resolve(Some("http://c:4317"), Some(Protocol::Grpc), &[])
            .unwrap()
            .unwrap();
        assert_eq!(s.metrics_endpoint.as_deref(), Some("http://c:4317/"));
        let traces = (
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://t:4318/v1/traces",
        );
        let s = resolve(None, None, &[traces]).unwrap().unwrap();
        assert_eq!(
            s.metrics_endpoint.as_deref(),
            Some("http://t:4318/v1/metrics")
        );
        // Endpoints the metrics exporter reads itself win.
        for own in [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            (
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "http://m:4318/v1/metrics",
            ),
        ] {
            let s = resolve(None, None, &[traces, own]).unwrap().unwrap();
            assert_eq!(s.metrics_endpoint, None, "{own:?}");
        }
        let s = resolve(
            Some("http://c:4318"),
            None,
            &[("OTEL_METRICS_EXPORTER", "none")],
        )
        .unwrap()
        .unwrap();
        assert!(!s.metrics);
        let err = resolve(
            Some("http://c:4318"),
            None,
            &[("OTEL_METRICS_EXPORTER", "prometheus")],
        )
        .unwrap_err();
        assert!(err.0.contains("use otlp or none"), "{err}");
        let err = resolve(
            Some("http://c:4318"),
            None,
            &[("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "m:4318")],
        )
        .unwrap_err();
        assert!(
            err.0.starts_with("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_usage_errors_naming_their_source() {
        let err = resolve(Some("localhost:4317"), None, &[]).unwrap_err();
        assert!(err.0.contains("--otlp-endpoint"), "{err}");
        let err = resolve(None, None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")]).unwrap_err();
        assert!(
            err.0
                .starts_with("OTEL_EXPORTER_OTLP_ENDPOINT 'not a url' is not a URL"),
            "{err}"
        );
        let err = resolve(None, None, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).unwrap_err();
        assert!(err.0.contains("use grpc or http/protobuf"), "{err}");
        let err = resolve(Some("ftp://x"), None, &[]).unwrap_err();
        assert!(err.0.contains("http:// or https://"), "{err}");
    }
}
