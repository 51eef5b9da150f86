//! The trace pipeline's far end: session table updates mapped to spans, handed to
//! the exporter.
use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::Result;
use opentelemetry_sdk::Resource;

use crate::{
    clock::WallClock,
    event::TcpEvent,
    export::{Exporter, Settings},
    sessions::Update,
    spans::{MapperOptions, SpanMapper},
    stats::SpanStats,
};

pub struct Traces {
    mapper: SpanMapper,
    exporter: Exporter,
}

impl Traces {
    pub fn start(
        settings: &Settings,
        resource: &Resource,
        clock: WallClock,
        options: MapperOptions,
    ) -> Result<Self> {
        let exporter = Exporter::start(settings, resource, options.service_per_process)?;
        Ok(Self {
            mapper: SpanMapper::new(clock, options),
            exporter,
        })
    }

    /// Sees each event before the session table does.
    pub fn observe(&mut self, event: &TcpEvent) {
        self.mapper.observe(event);
    }

    pub fn send(&mut self, update: &Update<'_>) {
        let span = self.span(update);
        self.exporter.send(span);
    }

    /// For shutdown: see [`Exporter::send_flushing`].
    pub fn send_flushing(&mut self, update: &Update<'_>, deadline: Instant) {
        let span = self.span(update);
        self.exporter.send_flushing(span, deadline);
    }

    fn span(&mut self, update: &Update<'_>) -> opentelemetry_sdk::trace::SpanData {
        match *update {
            Update::StateEnded(session, ref ended) => self.mapper.state_span(session, ended),
            Update::SessionEnded(session, end_ns, reason) => {
                self.mapper.root_span(session, end_ns, reason)
            }
        }
    }

    /// Spans the shutdown deadline left no time to make (their sessions not
    /// ended): counted as produced and not sent.
    pub fn not_sent(&mut self, spans: u64) {
        self.exporter.not_sent(spans);
    }

    pub fn resync_clock(&mut self) {
        self.mapper.resync_clock();
    }

    /// Flushes, waiting at most `timeout` for the collector; the table's sessions
    /// must have been ended (and sent) already.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        self.exporter.shutdown(timeout)
    }

    /// The exporter's counters; `dropped` is exact once shut down.
    pub fn stats(&self) -> SpanStats {
        let c = self.exporter.counters();
        SpanStats {
            produced: c.produced.load(Ordering::Relaxed),
            exported: c.exported.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            dropped: self.exporter.dropped_at_least(),
            export_errors: c.errors.load(Ordering::Relaxed),
        }
    }
}
