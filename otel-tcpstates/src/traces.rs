//! The trace pipeline: events through the session table, its updates mapped to
//! spans, the spans handed to the exporter.
use std::{num::NonZeroUsize, sync::atomic::Ordering, time::Duration};

use anyhow::Result;

use crate::{
    clock::{self, WallClock},
    event::TcpEvent,
    export::{self, Exporter, Settings},
    sessions::{EndReason, SessionTable, Update},
    spans::SpanMapper,
};

pub struct Traces {
    table: SessionTable,
    mapper: SpanMapper,
    exporter: Exporter,
}

/// Counts for the exit summary.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub sessions: u64,
    pub evicted: u64,
    /// Still open at shutdown (their spans are marked as ended by shutdown).
    pub in_flight: usize,
    pub spans: u64,
    pub exported: u64,
    pub failed: u64,
}

impl Traces {
    pub fn start(settings: &Settings, max_sockets: NonZeroUsize, clock: WallClock) -> Result<Self> {
        let exporter = Exporter::start(settings, &export::resource())?;
        Ok(Self {
            table: SessionTable::new(max_sockets),
            mapper: SpanMapper::new(clock),
            exporter,
        })
    }

    pub fn apply(&mut self, event: &TcpEvent) {
        let Self {
            table,
            mapper,
            exporter,
        } = self;
        table.apply(event, &mut |update| send(mapper, exporter, update));
    }

    pub fn resync_clock(&mut self) {
        self.mapper.resync_clock();
    }

    /// Ends every session in flight as ended by shutdown, then flushes, waiting at
    /// most `timeout` for the collector.
    pub fn shutdown(mut self, timeout: Duration) -> (Summary, Result<()>) {
        let Self {
            table,
            mapper,
            exporter,
        } = &mut self;
        let in_flight = table.len();
        table.end_all(
            clock::monotonic_now_ns(),
            EndReason::Shutdown,
            &mut |update| send(mapper, exporter, update),
        );
        let flushed = exporter.shutdown(timeout);
        let stats = table.stats();
        let counters = exporter.counters();
        let summary = Summary {
            sessions: stats.started,
            evicted: stats.evicted,
            in_flight,
            spans: counters.produced.load(Ordering::Relaxed),
            exported: counters.exported.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
        };
        (summary, flushed)
    }
}

fn send(mapper: &SpanMapper, exporter: &Exporter, update: Update<'_>) {
    let span = match update {
        Update::StateEnded(session, ended) => mapper.state_span(session, &ended),
        Update::SessionEnded(session, end_ns, reason) => mapper.root_span(session, end_ns, reason),
    };
    exporter.send(span);
}
