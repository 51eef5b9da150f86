//! Span records from the event loop to the collector: a queue bounded in spans
//! and in bytes that the loop never waits on (what does not fit is counted
//! dropped), a worker that batches and encodes them into requests bounded in
//! bytes, several requests in flight, and OTLP's retries within each request's
//! timeout. Counts every span: produced = exported + failed + dropped
//! (the queue full) + cut off (by the shutdown deadline).
use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::{
    otlp::config::{Batching, Target},
    otlp::encode::{BaseResource, Encoder},
    otlp::spans::SpanRecord,
    otlp::transport::{Answer, Transport},
};

/// The exporter's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpanStats {
    /// Handed to the exporter.
    pub produced: u64,
    /// Accepted by the collector.
    pub exported: u64,
    /// In batches the collector did not accept.
    pub failed: u64,
    /// Dropped because the export queue was full.
    pub dropped: u64,
    /// Cut off by the shutdown deadline: not made in time, or still queued or in
    /// flight when it passed. Exact once the exporter is shut down.
    pub cut_off: u64,
    /// Export requests that failed.
    pub export_errors: u64,
}

/// Requests sent at once: one slow round trip does not stall the stream.
pub const MAX_IN_FLIGHT: usize = 4;
/// A request is sent once its encoded spans reach this many bytes, whatever its
/// span count: requests in flight (and retried) stay bounded in memory, and well
/// under the 4 MiB a collector's gRPC receiver takes by default. A root with 64
/// links encodes to ~7 KiB: 2048 of them would be 14 MiB; 2048 spans without
/// links or events, ~0.5 MiB.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// The queue's bound in bytes, per span it may hold (`OTEL_BSP_MAX_QUEUE_SIZE`):
/// a record alone takes 280, so only records with links or events on the heap
/// meet this bound before the span count's.
pub const QUEUE_BYTES_PER_SPAN: usize = 320;
/// Records handed to the worker at a time (the event loop's cost per span is a push).
const CHUNK: usize = 1024;
/// Retries: the first wait, its growth limit; each wait is jittered ±50%.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A retry is made only with at least this much of the request's budget left: a
/// last attempt with a few milliseconds would time out whatever the collector does.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);
/// At most one line per this long for the collector's partial-success messages.
const MESSAGE_EVERY: Duration = Duration::from_secs(10);
/// How often a shutdown waiting for room in the queue looks again.
const QUEUE_POLL: Duration = Duration::from_millis(1);

enum Msg {
    Spans(Vec<SpanRecord>),
    /// Send what is batched now and wait for every request until the deadline.
    Shutdown(Instant, std::sync::mpsc::Sender<()>),
}

/// What the collector has settled, under one lock so the final figures are read
/// at one moment and nothing settles after that.
#[derive(Debug, Default)]
struct Settled {
    exported: u64,
    failed: u64,
    errors: u64,
    closed: bool,
}

struct Shared {
    /// Records sent to the worker and not yet taken into a request, and their
    /// bytes ([`SpanRecord::bytes`]).
    queued: AtomicU64,
    queued_bytes: AtomicU64,
    settled: Mutex<Settled>,
    /// Between a failure said and the next success.
    failing: AtomicBool,
    endpoint: String,
    timeout: Duration,
    last_message: Mutex<Option<Instant>>,
    /// When the last accepted attempt began: an attempt that began before it and
    /// failed says nothing new about the collector.
    last_success: Mutex<Option<Instant>>,
}

impl Shared {
    fn settle(&self, exported: u64, failed: u64) {
        let mut settled = self.settled.lock().unwrap_or_else(|e| e.into_inner());
        if settled.closed {
            return;
        }
        settled.exported += exported;
        settled.failed += failed;
        if failed > 0 && exported == 0 {
            settled.errors += 1;
        }
    }

    fn worked(&self, attempt: Instant) {
        {
            let mut last = self.last_success.lock().unwrap_or_else(|e| e.into_inner());
            *last = Some(last.map_or(attempt, |at| at.max(attempt)));
        }
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("export to {} works again", self.endpoint);
        }
    }

    /// Says the first failure of an outage, once; `attempt` is when the failed
    /// attempt began.
    fn failed(&self, reason: &str, attempt: Instant) {
        let stale = self
            .last_success
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|success| attempt < success);
        if !stale && !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "export to {} failed ({reason}); tracing goes on, a request is retried for up to {:?} and spans that cannot be sent are counted as failed",
                self.endpoint,
                self.timeout
            );
        }
    }

    /// The collector's own words on a partial success, at most once per
    /// [`MESSAGE_EVERY`].
    fn said(&self, rejected: u64, spans: u64, message: &str) {
        let mut last = self.last_message.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < MESSAGE_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let message = crate::otlp::transport::printable(message);
        if rejected > 0 {
            tracing::warn!(
                "the collector at {} rejected {rejected} of {spans} spans ({message}); counted as failed",
                self.endpoint
            );
        } else {
            tracing::warn!("the collector at {} says: {message}", self.endpoint);
        }
    }
}

pub struct Exporter {
    tx: mpsc::UnboundedSender<Msg>,
    /// The shutdown deadline, for the worker as soon as the shutdown starts
    /// waiting on it: the messages queued ahead of [`Msg::Shutdown`] must not
    /// hold it past the deadline.
    stop_by: watch::Sender<Option<Instant>>,
    pending: Vec<SpanRecord>,
    shared: Arc<Shared>,
    max_queue: u64,
    max_queue_bytes: u64,
    produced: u64,
    dropped: u64,
    cut_off: u64,
    shut_down: bool,
}

impl Exporter {
    /// Starts the worker. Must run inside the tokio runtime.
    pub fn start(target: &Target, base: BaseResource, batching: Batching) -> Result<Self> {
        let transport = Arc::new(Transport::new(target)?);
        let shared = Arc::new(Shared {
            queued: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            settled: Mutex::new(Settled::default()),
            failing: AtomicBool::new(false),
            endpoint: target.url.clone(),
            timeout: batching.timeout,
            last_message: Mutex::new(None),
            last_success: Mutex::new(None),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_by, stop_at) = watch::channel(None);
        let worker = Worker {
            rx,
            stop_at,
            encoder: Encoder::new(base),
            transport,
            shared: Arc::clone(&shared),
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            batching,
        };
        tokio::spawn(worker.run());
        Ok(Self {
            tx,
            stop_by,
            pending: Vec::with_capacity(CHUNK),
            shared,
            max_queue: batching.max_queue as u64,
            max_queue_bytes: batching.max_queue.saturating_mul(QUEUE_BYTES_PER_SPAN) as u64,
            produced: 0,
            dropped: 0,
            cut_off: 0,
            shut_down: false,
        })
    }

    pub fn send(&mut self, record: SpanRecord) {
        self.produced += 1;
        self.pending.push(record);
        if self.pending.len() >= CHUNK {
            self.flush();
        }
    }

    /// Hands what is pending to the worker; what the queue has no room for is dropped.
    pub fn flush(&mut self) {
        self.hand_over(false);
    }

    /// [`Exporter::flush`]; what finds no room is counted as dropped, or as cut
    /// off when `deadline_passed` (the shutdown waited for room until then).
    fn hand_over(&mut self, deadline_passed: bool) {
        if self.pending.is_empty() {
            return;
        }
        let queued = self.shared.queued.load(Ordering::Relaxed);
        let mut room = self.max_queue.saturating_sub(queued) as usize;
        // The bytes' room, in records: those that fit, in order.
        let mut bytes_room = self
            .max_queue_bytes
            .saturating_sub(self.shared.queued_bytes.load(Ordering::Relaxed));
        let mut bytes = 0;
        for (at, record) in self.pending.iter().enumerate().take(room) {
            let cost = record.bytes() as u64;
            if cost > bytes_room {
                room = at;
                break;
            }
            bytes_room -= cost;
            bytes += cost;
        }
        if room < self.pending.len() {
            let lost = (self.pending.len() - room) as u64;
            if deadline_passed {
                self.cut_off += lost;
            } else {
                self.dropped += lost;
            }
            self.pending.truncate(room);
        }
        if self.pending.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.pending, Vec::with_capacity(CHUNK));
        self.shared
            .queued
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        self.shared.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.tx.send(Msg::Spans(chunk)).is_err() {
            // The worker is gone (only after shutdown): nothing will send them.
            self.shared.queued.store(0, Ordering::Relaxed);
            self.shared.queued_bytes.store(0, Ordering::Relaxed);
        }
    }

    /// Like [`Exporter::send`], but until `deadline` waits for room in the queue
    /// instead of dropping. For shutdown, when every in-flight session is ended at
    /// once and nothing else competes for the time; while running, the event loop
    /// must never wait.
    pub fn send_flushing(&mut self, record: SpanRecord, deadline: Instant) {
        self.produced += 1;
        self.pending.push(record);
        if self.pending.len() >= CHUNK {
            self.hand_over_by(deadline);
        }
    }

    /// Hands what is pending over once the queue has room for it (or is empty,
    /// if it is smaller), waiting until `deadline` at most: what finds no room
    /// was cut off by the deadline if it passed, dropped by the small queue if not.
    fn hand_over_by(&mut self, deadline: Instant) {
        self.stop_by.send_if_modified(|at| {
            let changed = *at != Some(deadline);
            *at = Some(deadline);
            changed
        });
        let wanted = (self.pending.len() as u64).min(self.max_queue);
        while self.shared.queued.load(Ordering::Relaxed) + wanted > self.max_queue
            && Instant::now() < deadline
        {
            std::thread::sleep(QUEUE_POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
        self.hand_over(Instant::now() >= deadline);
    }

    /// Spans the shutdown deadline left no time to make: produced, never
    /// queued, so counted as cut off.
    pub fn not_sent(&mut self, spans: u64) {
        self.produced += spans;
        self.cut_off += spans;
    }

    /// Sends what is left and waits for it, at most `timeout`; whatever is not
    /// settled by then was cut off by the deadline.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        self.hand_over_by(deadline);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // What is left of the one deadline: the wait for room above may have
        // taken all of it (a full queue, a worker that cannot send).
        let finished = self.tx.send(Msg::Shutdown(deadline, done_tx)).is_ok()
            && done_rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_ok();
        let mut settled = self
            .shared
            .settled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        settled.closed = true;
        self.shut_down = true;
        let unsettled = self
            .produced
            .saturating_sub(self.dropped + self.cut_off + settled.exported + settled.failed);
        if !finished && unsettled > 0 {
            anyhow::bail!(
                "the last spans were not all sent by the shutdown deadline; \
                 the rest are counted as not sent (raise --shutdown-timeout)"
            );
        }
        Ok(())
    }

    /// The counters now; `cut_off` is exact once shut down (everything unsettled
    /// then was cut off by the deadline).
    pub fn stats(&self) -> SpanStats {
        let settled = self
            .shared
            .settled
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let cut_off = if self.shut_down {
            self.produced
                .saturating_sub(settled.exported + settled.failed + self.dropped)
        } else {
            self.cut_off
        };
        SpanStats {
            produced: self.produced,
            exported: settled.exported,
            failed: settled.failed,
            dropped: self.dropped,
            cut_off,
            export_errors: settled.errors,
        }
    }
}

struct Worker {
    rx: mpsc::UnboundedReceiver<Msg>,
    /// The shutdown deadline once the shutdown has begun.
    stop_at: watch::Receiver<Option<Instant>>,
    encoder: Encoder,
    transport: Arc<Transport>,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    batching: Batching,
}

impl Worker {
    async fn run(mut self) {
        let mut batch_started: Option<tokio::time::Instant> = None;
        loop {
            let msg = match batch_started {
                None => self.rx.recv().await,
                Some(at) => tokio::select! {
                    msg = self.rx.recv() => msg,
                    () = tokio::time::sleep_until(at + self.batching.delay) => {
                        self.dispatch().await;
                        batch_started = None;
                        continue;
                    }
                },
            };
            match msg {
                None => return,
                Some(Msg::Spans(chunk)) => {
                    if self.past_deadline() {
                        // Cut off: nothing sent now could settle in time.
                        let bytes: u64 = chunk.iter().map(|r| r.bytes() as u64).sum();
                        self.shared
                            .queued
                            .fetch_sub(chunk.len() as u64, Ordering::Relaxed);
                        self.shared.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
                        continue;
                    }
                    for record in chunk {
                        self.encoder.add(&record);
                        // Out of the queue once encoded (the rest of the chunk
                        // waits, counted, while a request waits for a slot).
                        self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                        self.shared
                            .queued_bytes
                            .fetch_sub(record.bytes() as u64, Ordering::Relaxed);
                        drop(record);
                        if self.encoder.len() >= self.batching.max_batch
                            || self.encoder.bytes() >= MAX_REQUEST_BYTES
                        {
                            self.dispatch().await;
                            batch_started = None;
                        }
                    }
                    if !self.encoder.is_empty() && batch_started.is_none() {
                        batch_started = Some(tokio::time::Instant::now());
                    }
                }
                Some(Msg::Shutdown(deadline, done)) => {
                    // The exporter set the same deadline in `stop_at` first.
                    if !self.encoder.is_empty() {
                        self.dispatch().await;
                    }
                    let deadline = tokio::time::Instant::from_std(deadline);
                    let all = MAX_IN_FLIGHT as u32;
                    let _ = tokio::time::timeout_at(deadline, self.slots.acquire_many(all)).await;
                    let _ = done.send(());
                    return;
                }
            }
        }
    }

    /// Whether the shutdown deadline has passed.
    fn past_deadline(&self) -> bool {
        self.stop_at.borrow().is_some_and(|at| Instant::now() >= at)
    }

    /// Encodes the batch and sends it once a slot is free, or gives it up at the
    /// shutdown deadline. While the collector is down every slot is held by a
    /// request retrying for its whole timeout: a wait for one without the
    /// deadline held the shutdown past it.
    async fn dispatch(&mut self) {
        let slot = Arc::clone(&self.slots).acquire_owned();
        let mut stop_at = self.stop_at.clone();
        let slot = tokio::select! {
            biased;
            () = deadline_passed(&mut stop_at) => None,
            slot = slot => slot.ok(),
        };
        let spans = self.encoder.len() as u64;
        let mut buf = self.transport.buffer();
        self.encoder.finish(&mut buf);
        let Some(slot) = slot else {
            // Shutting down, and no slot came free in time: cut off.
            return;
        };
        let body = self.transport.body(buf);
        let transport = Arc::clone(&self.transport);
        let shared = Arc::clone(&self.shared);
        let budget = self.batching.timeout;
        tokio::spawn(async move {
            deliver(&transport, &shared, body, spans, budget).await;
            drop(slot);
        });
    }
}

/// Resolves once a shutdown has begun and its deadline has passed; never
/// before.
async fn deadline_passed(stop_at: &mut watch::Receiver<Option<Instant>>) {
    loop {
        let at = *stop_at.borrow_and_update();
        let changed = stop_at.changed();
        match at {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => return,
                    _ = changed => {}
                }
            }
            None => {
                if changed.await.is_err() {
                    // The exporter is gone: no deadline will ever come.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

/// Sends one request until it is settled or its budget is spent, resending the
/// same bytes after a jittered, growing wait (or the collector's own).
async fn deliver(
    transport: &Transport,
    shared: &Shared,
    body: bytes::Bytes,
    spans: u64,
    budget: Duration,
) {
    let start = Instant::now();
    let mut backoff = BACKOFF_FIRST;
    loop {
        let left = budget.saturating_sub(start.elapsed());
        let attempt = Instant::now();
        let reason = match transport.send(body.clone(), left).await {
            Answer::Accepted { rejected, message } => {
                let rejected = rejected.min(spans);
                shared.settle(spans - rejected, rejected);
                shared.worked(attempt);
                if rejected > 0 || !message.is_empty() {
                    shared.said(rejected, spans, &message);
                }
                return;
            }
            Answer::Refused(reason) => {
                shared.failed(&reason, attempt);
                shared.settle(0, spans);
                return;
            }
            Answer::Retry { reason, after } => {
                shared.failed(&reason, attempt);
                let wait = after.unwrap_or_else(|| jitter(backoff));
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if start.elapsed() + wait + MIN_ATTEMPT >= budget {
                    reason
                } else {
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
        };
        tracing::debug!("giving up on a request of {spans} spans: {reason}");
        shared.settle(0, spans);
        return;
    }
}

/// `wait` scaled by a factor in [0.5, 1.5), so exporters that failed together do
/// not retry together.
fn jitter(wait: Duration) -> Duration {
    use std::hash::BuildHasher as _;
    let random = foldhash::fast::RandomState::default().hash_one(Instant::now());
    let factor = 0.5 + (random % 1000) as f64 / 1000.0;
    wait.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::{
        kernel::traceparent::{Direction, Link},
        otlp::{
            config::Protocol,
            spans::{Body, ResourceKey},
        },
        sampling::rules::KeptBy,
        sessions::{
            links::Links,
            table::{EndReason, Role},
        },
    };

    /// A root with 64 links: ~2 KiB queued, where a record alone is 280 bytes.
    fn root_with_links() -> SpanRecord {
        let mut links = Links::default();
        for n in 0..64u8 {
            let link = Link {
                trace_id: [n + 1; 16],
                span_id: [n + 1; 8],
                trace_flags: 1,
                direction: Direction::Received,
                method: 1,
            };
            links.add(link, usize::MAX);
        }
        let here = (IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
        SpanRecord {
            trace_id: [1; 16],
            span_id: [1; 8],
            parent_span_id: None,
            start_unix_ns: 1,
            end_unix_ns: 2,
            resource: ResourceKey::default(),
            local: here,
            peer: here,
            error: None,
            threshold: None,
            body: Body::Root {
                role: Role::Server,
                owner: None,
                facts: None,
                skaddr: 1,
                begin_seen: true,
                end_reason: EndReason::Closed,
                links: Some(Box::new(links.clone())),
                kept_by: KeptBy::default(),
                counts: None,
            },
        }
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_and_what_does_not_fit_is_counted_dropped() {
        // The worker is spawned on a runtime never driven: nothing leaves the queue.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let target = Target {
            url: "http://127.0.0.1:9".into(),
            protocol: Protocol::Grpc,
            headers: Vec::new(),
            gzip: false,
            trust: None,
        };
        let batching = Batching {
            max_queue: CHUNK,
            max_batch: 2048,
            delay: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
        };
        let mut exporter = Exporter::start(&target, Vec::new(), batching).unwrap();
        let root = root_with_links();
        assert!(root.bytes() > 2000, "{}", root.bytes());
        for _ in 0..CHUNK {
            exporter.send(root.clone());
        }
        exporter.flush();
        let fit = (CHUNK * QUEUE_BYTES_PER_SPAN) / root.bytes();
        let stats = exporter.stats();
        eprintln!(
            "{CHUNK} roots of {} bytes into a queue of {CHUNK} spans and {} bytes: {} dropped",
            root.bytes(),
            CHUNK * QUEUE_BYTES_PER_SPAN,
            stats.dropped
        );
        assert_eq!(
            (stats.produced, stats.dropped),
            (CHUNK as u64, (CHUNK - fit) as u64)
        );
        assert_eq!(
            exporter.shared.queued_bytes.load(Ordering::Relaxed),
            (fit * root.bytes()) as u64
        );
    }
}
