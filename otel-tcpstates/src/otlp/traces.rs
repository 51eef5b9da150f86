//! The trace pipeline's far end: the updates of kept traces mapped to span records,
//! handed to the delivery queue.
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

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

/// How long a root waits for its owner's container (a walk of a large cgroup
/// tree, which runs at most once a second, can take a second or more).
const ROOT_HOLD: Duration = Duration::from_secs(5);
/// Roots held at once; more go without waiting.
const ROOTS_HELD: usize = 1024;

/// A root waiting for its owner's container: until when, the owner, the span.
type Held = (Instant, (u32, u64), SpanRecord);

pub struct Traces {
    mapper: SpanMapper,
    exporter: Exporter,
    /// The root carries the owner's `container.id`: a root whose lookup is still
    /// out waits here (a bounded time, a bounded number), in order.
    held: VecDeque<Held>,
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
            held: VecDeque::new(),
        })
    }

    /// Sees each event before the session table does.
    pub fn observe(&mut self, event: &TcpEvent) {
        self.mapper.observe(event);
    }

    pub fn send(&mut self, kept: &Kept<'_>) {
        let record = self.record(kept);
        if let Kept::Root(session, ..) = *kept
            && let Some(owner) = session.owner
            && self.held.len() < ROOTS_HELD
            && self.mapper.container_pending(session)
        {
            let owner = (owner.pid, owner.cgroup_id);
            self.held
                .push_back((Instant::now() + ROOT_HOLD, owner, record));
            return;
        }
        self.exporter.send(record);
    }

    /// For shutdown: see [`Exporter::send_flushing`]. Held roots go first, as
    /// they are.
    pub fn send_flushing(&mut self, kept: &Kept<'_>, deadline: Instant) {
        self.release(true);
        let record = self.record(kept);
        self.exporter.send_flushing(record, deadline);
    }

    /// Hands what was made since the last call to the export worker: once per
    /// drained batch of events.
    pub fn flush(&mut self) {
        self.release(false);
        self.exporter.flush();
    }

    /// Sends the held roots whose container is known now or whose time is up;
    /// `all`: every one.
    fn release(&mut self, all: bool) {
        let now = Instant::now();
        let mut waiting = VecDeque::new();
        while let Some((until, owner, mut record)) = self.held.pop_front() {
            if all || now >= until || !self.mapper.container_pending_for(owner) {
                self.mapper.add_container(owner, &mut record);
                self.exporter.send(record);
            } else {
                waiting.push_back((until, owner, record));
            }
        }
        self.held = waiting;
    }

    fn record(&self, kept: &Kept<'_>) -> SpanRecord {
        match *kept {
            Kept::State(session, ended, verdict) => self.mapper.state_span(session, ended, verdict),
            Kept::Root(session, end_ns, reason, verdict) => {
                self.mapper.root_span(session, end_ns, reason, verdict)
            }
            Kept::Request(session, ended) => self.mapper.request_span(session, ended),
        }
    }

    /// Spans of kept traces the shutdown deadline left no time to make: counted
    /// as produced and cut off.
    pub fn not_sent(&mut self, spans: u64) {
        self.exporter.not_sent(spans);
    }

    /// See [`SpanMapper::clock_stepped`].
    pub fn clock_stepped(&mut self, at_ns: u64, clock: WallClock) {
        self.mapper.clock_stepped(at_ns, clock);
    }

    /// Flushes, waiting at most `timeout` for the collector; the table's sessions
    /// must have been ended (and sent) already.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        self.release(true);
        self.exporter.shutdown(timeout)
    }

    /// The exporter's counters; `cut_off` is exact once shut down.
    pub fn stats(&self) -> SpanStats {
        self.exporter.stats()
    }
}
