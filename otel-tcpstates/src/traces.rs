//! The trace pipeline's far end: session table updates mapped to spans, handed to
//! the exporter.
use std::{sync::atomic::Ordering, time::Duration};

use anyhow::Result;

use crate::{
    clock::WallClock,
    event::TcpEvent,
    export::{self, Exporter, Settings},
    sessions::{TableStats, Update},
    spans::{MapperOptions, SpanMapper},
};

pub struct Traces {
    mapper: SpanMapper,
    exporter: Exporter,
}

/// The pipeline's counts at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub sessions: u64,
    pub evicted: u64,
    /// Still open at shutdown (their spans are marked as ended by shutdown).
    pub in_flight: usize,
    pub spans: u64,
    pub exported: u64,
    pub failed: u64,
    /// Neither exported nor failed: queued, or dropped (all dropped after shutdown).
    pub not_sent: u64,
}

impl Traces {
    pub fn start(settings: &Settings, clock: WallClock, options: MapperOptions) -> Result<Self> {
        let exporter = Exporter::start(settings, &export::resource(), options.service_per_process)?;
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
        let span = match *update {
            Update::StateEnded(session, ref ended) => self.mapper.state_span(session, ended),
            Update::SessionEnded(session, end_ns, reason) => {
                self.mapper.root_span(session, end_ns, reason)
            }
        };
        self.exporter.send(span);
    }

    /// See [`Exporter::dropped_at_least`].
    pub fn dropped_at_least(&self) -> u64 {
        self.exporter.dropped_at_least()
    }

    pub fn resync_clock(&mut self) {
        self.mapper.resync_clock();
    }

    /// Flushes, waiting at most `timeout` for the collector; the table's sessions
    /// must have been ended (and sent) already.
    pub fn shutdown(&self, timeout: Duration) -> Result<()> {
        self.exporter.shutdown(timeout)
    }

    pub fn summary(&self, table: TableStats, in_flight: usize) -> Summary {
        let counters = self.exporter.counters();
        let spans = counters.produced.load(Ordering::Relaxed);
        let exported = counters.exported.load(Ordering::Relaxed);
        let failed = counters.failed.load(Ordering::Relaxed);
        Summary {
            sessions: table.started,
            evicted: table.evicted,
            in_flight,
            spans,
            exported,
            failed,
            not_sent: spans.saturating_sub(exported + failed),
        }
    }
}
