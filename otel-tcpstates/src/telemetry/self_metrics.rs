//! Self-telemetry: the tracer's own counters exported as OTLP metrics next to its
//! traces, so a fleet's collectors can alert on lost events or dropped spans.
use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use anyhow::{Context as _, Result};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry_sdk::metrics::SdkMeterProvider;

use crate::telemetry::stats::Stats;

/// Metric names; `otel_tcpstates.` keeps them apart from the SDK's own.
pub mod name {
    pub const EVENTS_SEEN: &str = "otel_tcpstates.events.seen";
    pub const EVENTS_LOST: &str = "otel_tcpstates.events.lost";
    pub const EVENTS_SKIPPED: &str = "otel_tcpstates.events.skipped";
    pub const LINKS_SEEN: &str = "otel_tcpstates.links.seen";
    pub const LINKS_LOST: &str = "otel_tcpstates.links.lost";
    pub const LINKS_INVALID: &str = "otel_tcpstates.links.invalid";
    pub const LINKS_NOT_KEPT: &str = "otel_tcpstates.links.not_kept";
    pub const REQUESTS_SAMPLED: &str = "otel_tcpstates.requests.sampled";
    pub const REQUEST_SPANS: &str = "otel_tcpstates.requests.spans";
    pub const REQUESTS_NOT_KEPT: &str = "otel_tcpstates.requests.not_kept";
    pub const SPAN_EVENTS_NOT_KEPT: &str = "otel_tcpstates.span_events.not_kept";
    pub const INCIDENTS_LOST: &str = "otel_tcpstates.incidents.lost";
    pub const INCIDENTS_SKIPPED: &str = "otel_tcpstates.incidents.skipped";
    pub const LISTENERS_LOST: &str = "otel_tcpstates.listeners.lost";
    pub const INCIDENTS_UNMATCHED: &str = "otel_tcpstates.incidents.unmatched";
    pub const RESETS_LATE: &str = "otel_tcpstates.incidents.resets_late";
    pub const SESSIONS_IN_FLIGHT: &str = "otel_tcpstates.sessions.in_flight";
    pub const SESSIONS_STARTED: &str = "otel_tcpstates.sessions.started";
    pub const SESSIONS_EVICTED: &str = "otel_tcpstates.sessions.evicted";
    pub const SESSIONS_REPLACED: &str = "otel_tcpstates.sessions.replaced";
    pub const SPANS_PRODUCED: &str = "otel_tcpstates.spans.produced";
    pub const SPANS_EXPORTED: &str = "otel_tcpstates.spans.exported";
    pub const SPANS_FAILED: &str = "otel_tcpstates.spans.failed";
    pub const SPANS_DROPPED: &str = "otel_tcpstates.spans.dropped";
    pub const SPANS_CUT_OFF: &str = "otel_tcpstates.spans.cut_off";
    pub const EXPORT_ERRORS: &str = "otel_tcpstates.export.errors";
    pub const JOURNAL_UNSENT: &str = "otel_tcpstates.journal.unsent";
    pub const METRICS_OVERFLOW: &str = "otel_tcpstates.metrics.overflow";
    pub const TRACES_KEPT_BY_PROBABILITY: &str = "otel_tcpstates.traces.kept_by_probability";
    pub const TRACES_KEPT_BY_RULE: &str = "otel_tcpstates.traces.kept_by_rule";
    pub const TRACES_SAMPLED_OUT: &str = "otel_tcpstates.traces.sampled_out";
    pub const SPANS_SAMPLED_OUT: &str = "otel_tcpstates.spans.sampled_out";
}

/// The last published value of each counter, read by the SDK's collection
/// callbacks on its own thread.
#[derive(Debug, Default)]
struct Published {
    events_seen: AtomicU64,
    events_lost: AtomicU64,
    events_skipped: AtomicU64,
    links_seen: AtomicU64,
    links_lost: AtomicU64,
    links_invalid: AtomicU64,
    links_not_kept: AtomicU64,
    requests_sampled: AtomicU64,
    request_spans: AtomicU64,
    requests_not_kept: AtomicU64,
    events_not_kept: AtomicU64,
    incidents_lost: AtomicU64,
    incidents_skipped: AtomicU64,
    listeners_lost: AtomicU64,
    incidents_unmatched: AtomicU64,
    resets_late: AtomicU64,
    in_flight: AtomicU64,
    started: AtomicU64,
    evicted: AtomicU64,
    replaced: AtomicU64,
    produced: AtomicU64,
    exported: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    cut_off: AtomicU64,
    export_errors: AtomicU64,
    journal_unsent: AtomicU64,
    metrics_overflow: AtomicU64,
    kept_by_probability: AtomicU64,
    kept_by_rule: AtomicU64,
    sampled_out: AtomicU64,
    spans_sampled_out: AtomicU64,
}

pub struct SelfMetrics {
    provider: SdkMeterProvider,
    published: Arc<Published>,
}

impl SelfMetrics {
    /// Registers the counters on `provider` (see `otlp::metrics`), which this
    /// then owns: [`SelfMetrics::shutdown`] makes its last export.
    pub fn start(provider: SdkMeterProvider) -> Self {
        let published = Arc::new(Published::default());
        register(&provider, &published);
        Self {
            provider,
            published,
        }
    }

    /// Makes `stats` what the next collection reports.
    pub fn publish(&self, stats: &Stats) {
        let p = &self.published;
        let set = |cell: &AtomicU64, value: u64| cell.store(value, Ordering::Relaxed);
        set(&p.events_seen, stats.events_seen);
        set(&p.events_lost, stats.events_lost);
        set(&p.events_skipped, stats.events_skipped);
        if let Some(s) = &stats.links {
            set(&p.links_seen, s.seen);
            set(&p.links_lost, s.lost);
            set(&p.links_invalid, s.invalid);
            set(&p.links_not_kept, s.not_kept);
            set(&p.requests_sampled, s.requests_sampled);
            set(&p.request_spans, s.request_spans);
            set(&p.requests_not_kept, s.requests_not_kept);
        }
        if let Some(s) = &stats.incidents {
            set(&p.incidents_lost, s.lost);
            set(&p.incidents_skipped, s.skipped);
            set(&p.incidents_unmatched, s.unmatched);
            set(&p.resets_late, s.resets_late);
        }
        set(&p.listeners_lost, stats.listeners_lost);
        if let Some(s) = &stats.sessions {
            set(&p.in_flight, s.in_flight);
            set(&p.started, s.started);
            set(&p.evicted, s.evicted);
            set(&p.replaced, s.replaced);
            set(&p.events_not_kept, s.events_not_kept);
        }
        if let Some(s) = &stats.spans {
            set(&p.produced, s.produced);
            set(&p.exported, s.exported);
            set(&p.failed, s.failed);
            set(&p.dropped, s.dropped);
            set(&p.cut_off, s.cut_off);
            set(&p.export_errors, s.export_errors);
        }
        if let Some(unsent) = stats.journal_unsent {
            set(&p.journal_unsent, unsent);
        }
        if let Some(overflow) = stats.metrics_overflow {
            set(&p.metrics_overflow, overflow);
        }
        if let Some(s) = &stats.sampling {
            set(&p.kept_by_probability, s.kept_by_probability);
            set(&p.kept_by_rule, s.kept_by_rule);
            set(&p.sampled_out, s.sampled_out);
            set(&p.spans_sampled_out, s.spans_sampled_out);
        }
    }

    /// Exports the last published values and stops, waiting at most `timeout`
    /// for a collector that may hang.
    pub fn shutdown(self, timeout: Duration) -> Result<()> {
        let (done, finished) = mpsc::channel();
        let provider = self.provider;
        thread::Builder::new()
            .name("metrics-shutdown".into())
            .spawn(move || {
                let _ = done.send(provider.shutdown());
            })
            .context("starting the metrics shutdown")?;
        match finished.recv_timeout(timeout) {
            Ok(result) => {
                result.map_err(|err| anyhow::anyhow!("exporting the last metrics: {err}"))
            }
            Err(_) => Err(anyhow::anyhow!(
                "exporting the last metrics: no answer within {timeout:?}"
            )),
        }
    }
}

/// One observable instrument per counter, each reading its published value.
fn register(provider: &SdkMeterProvider, published: &Arc<Published>) {
    let meter = provider.meter("otel-tcpstates");
    type Pick = fn(&Published) -> &AtomicU64;
    let counters: [(&'static str, &'static str, &'static str, Pick); 31] = [
        (
            name::EVENTS_SEEN,
            "{event}",
            "State changes read from the kernel",
            |p| &p.events_seen,
        ),
        (
            name::EVENTS_LOST,
            "{event}",
            "State changes lost because the ring buffer was full (or still queued at the \
             shutdown deadline)",
            |p| &p.events_lost,
        ),
        (
            name::EVENTS_SKIPPED,
            "{event}",
            "State changes the kernel skipped: another BPF program was running on the CPU",
            |p| &p.events_skipped,
        ),
        (
            name::LINKS_SEEN,
            "{record}",
            "Link records (traceparent headers) read from the kernel (--links)",
            |p| &p.links_seen,
        ),
        (
            name::LINKS_LOST,
            "{record}",
            "Link records lost because the ring buffer was full (--links)",
            |p| &p.links_lost,
        ),
        (
            name::LINKS_INVALID,
            "{record}",
            "Link records whose traceparent value was not valid: no link (--links)",
            |p| &p.links_invalid,
        ),
        (
            name::LINKS_NOT_KEPT,
            "{link}",
            "Links read but not kept on their socket's root: past its 64, or past the \
             session table's bound on all sockets' links (memory) (--links)",
            |p| &p.links_not_kept,
        ),
        (
            name::REQUESTS_SAMPLED,
            "{request}",
            "Requests whose traceparent said their application sampled them (--links)",
            |p| &p.requests_sampled,
        ),
        (
            name::REQUEST_SPANS,
            "{span}",
            "tcp.request spans made in applications' traces, one per sampled request (--links)",
            |p| &p.request_spans,
        ),
        (
            name::REQUESTS_NOT_KEPT,
            "{request}",
            "Sampled requests that made no tcp.request span: past a socket's 4 in flight or \
             4 repeated traceparents, or the session table's bound (memory) (--links)",
            |p| &p.requests_not_kept,
        ),
        (
            name::SPAN_EVENTS_NOT_KEPT,
            "{event}",
            "Span events (incidents) not kept: past a span's 64, or past the session \
             table's bound on all sockets' events (memory)",
            |p| &p.events_not_kept,
        ),
        (
            name::INCIDENTS_LOST,
            "{record}",
            "Incident records lost because the ring buffer was full",
            |p| &p.incidents_lost,
        ),
        (
            name::INCIDENTS_SKIPPED,
            "{record}",
            "Incident records the kernel skipped: another BPF program was running on the CPU",
            |p| &p.incidents_skipped,
        ),
        (
            name::LISTENERS_LOST,
            "{socket}",
            "Listening sockets the kernel's listener maps could not store: connections \
             accepted from them may name no owner or another listener's",
            |p| &p.listeners_lost,
        ),
        (
            name::INCIDENTS_UNMATCHED,
            "{record}",
            "Incident records of sockets the tracer does not follow (begun before it \
             started, or already ended): on no span",
            |p| &p.incidents_unmatched,
        ),
        (
            name::RESETS_LATE,
            "{record}",
            "RST records that arrived after their connection's trace had ended: on no span",
            |p| &p.resets_late,
        ),
        (
            name::SESSIONS_STARTED,
            "{session}",
            "Sockets whose session was started",
            |p| &p.started,
        ),
        (
            name::SESSIONS_EVICTED,
            "{session}",
            "Sessions evicted from the full session table",
            |p| &p.evicted,
        ),
        (
            name::SESSIONS_REPLACED,
            "{session}",
            "Sessions ended because a new socket took their address before their CLOSE \
             was seen (lost or skipped)",
            |p| &p.replaced,
        ),
        (
            name::SPANS_PRODUCED,
            "{span}",
            "Spans handed to the exporter",
            |p| &p.produced,
        ),
        (
            name::SPANS_EXPORTED,
            "{span}",
            "Spans the collector accepted",
            |p| &p.exported,
        ),
        (
            name::SPANS_FAILED,
            "{span}",
            "Spans in export requests that failed",
            |p| &p.failed,
        ),
        (
            name::SPANS_DROPPED,
            "{span}",
            "Spans dropped because the export queue was full",
            |p| &p.dropped,
        ),
        (
            name::SPANS_CUT_OFF,
            "{span}",
            "Spans the shutdown deadline cut off: not made in time, or still queued \
             or in flight when it passed (--shutdown-timeout)",
            |p| &p.cut_off,
        ),
        (
            name::EXPORT_ERRORS,
            "{request}",
            "Span export requests that failed",
            |p| &p.export_errors,
        ),
        (
            name::JOURNAL_UNSENT,
            "{record}",
            "State changes the journal did not take (-Y)",
            |p| &p.journal_unsent,
        ),
        (
            name::METRICS_OVERFLOW,
            "{measurement}",
            "Connection metric measurements recorded into an overflow series \
             (--metrics-max-series reached)",
            |p| &p.metrics_overflow,
        ),
        (
            name::TRACES_KEPT_BY_PROBABILITY,
            "{trace}",
            "Sockets' traces kept by the sampling probability (all, with always_on)",
            |p| &p.kept_by_probability,
        ),
        (
            name::TRACES_KEPT_BY_RULE,
            "{trace}",
            "Sockets' traces the probability left out and a keep rule kept",
            |p| &p.kept_by_rule,
        ),
        (
            name::TRACES_SAMPLED_OUT,
            "{trace}",
            "Sockets' traces left out by sampling",
            |p| &p.sampled_out,
        ),
        (
            name::SPANS_SAMPLED_OUT,
            "{span}",
            "Spans of the traces left out by sampling (never produced)",
            |p| &p.spans_sampled_out,
        ),
    ];
    for (name, unit, description, pick) in counters {
        let published = Arc::clone(published);
        // Registered callbacks live as long as the provider; the handle is not needed.
        let _ = meter
            .u64_observable_counter(name)
            .with_unit(unit)
            .with_description(description)
            .with_callback(move |out| out.observe(pick(&published).load(Ordering::Relaxed), &[]))
            .build();
    }
    let published = Arc::clone(published);
    let _ = meter
        .u64_observable_gauge(name::SESSIONS_IN_FLIGHT)
        .with_unit("{session}")
        .with_description("Sessions open in the session table")
        .with_callback(move |out| out.observe(published.in_flight.load(Ordering::Relaxed), &[]))
        .build();
}
