//! The trace pipeline's far end: the updates of kept traces mapped to span records,
//! handed to the delivery queue.
use std::time::{Duration, Instant};

use anyhow::Result;
use opentelemetry_sdk::Resource;

use crate::{
    kernel::clock::WallClock,
    kernel::event::TcpEvent,
    otlp::delivery::{Exporter, SpanStats},
    otlp::spans::{MapperOptions, SpanMapper, SpanRecord},
    otlp::{resource::base_resource, settings::Settings},
    sampling::decision::Kept,
};

pub struct Traces {
    mapper: SpanMapper,
    exporter: Exporter,
}

impl Traces {
    /// Must run inside the tokio runtime: the export worker is spawned on it.
    pub fn start(
        settings: &Settings,
        resource: &Resource,
        clock: WallClock,
        options: MapperOptions,
    ) -> Result<Self> {
        let exporter = Exporter::start(
            &crate::otlp::settings::target(settings),
            base_resource(resource),
            settings.batching,
        )?;
        Ok(Self {
            mapper: SpanMapper::new(clock, options),
            exporter,
        })
    }

    /// Sees each event before the session table does.
    pub fn observe(&mut self, event: &TcpEvent) {
        self.mapper.observe(event);
    }

    pub fn send(&mut self, kept: &Kept<'_>) {
        let record = self.record(kept);
        self.exporter.send(record);
    }

    /// For shutdown: see [`Exporter::send_flushing`].
    pub fn send_flushing(&mut self, kept: &Kept<'_>, deadline: Instant) {
        let record = self.record(kept);
        self.exporter.send_flushing(record, deadline);
    }

    /// Hands what was made since the last call to the export worker: once per
    /// drained batch of events.
    pub fn flush(&mut self) {
        self.exporter.flush();
    }

    fn record(&self, kept: &Kept<'_>) -> SpanRecord {
        match *kept {
            Kept::State(session, ended, verdict) => self.mapper.state_span(session, ended, verdict),
            Kept::Root(session, end_ns, reason, verdict) => {
                self.mapper.root_span(session, end_ns, reason, verdict)
            }
        }
    }

    /// Spans the shutdown deadline left no time to make (their sessions not
    /// ended): counted as produced and cut off.
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

    /// The exporter's counters; `cut_off` is exact once shut down.
    pub fn stats(&self) -> SpanStats {
        self.exporter.stats()
    }
}
