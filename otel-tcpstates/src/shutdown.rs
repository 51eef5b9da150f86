//! The shutdown deadline. A signal starts one, `--shutdown-timeout` long; reading
//! what the kernel queued, ending the sessions and the last exports share it, in
//! that order, so the process is gone when the user said, and whatever the
//! deadline cuts off is counted, not waited for.
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};

/// Beyond the deadline, what the exit watchdog allows before it ends the process
/// regardless: the orderly path finishes by the deadline, this covers only the
/// last log lines and the exit itself.
pub const WATCHDOG_GRACE: Duration = Duration::from_millis(400);

/// SIGINT/SIGTERM, as the rest of the daemon sees them: when the first arrived.
/// Behind it a watchdog makes sure a signal ends the process even if the orderly
/// path cannot (it may be stuck writing to a pipe nobody reads): a second signal,
/// or the deadline plus [`WATCHDOG_GRACE`], exits at once.
pub struct Stop {
    at: watch::Receiver<Option<Instant>>,
}

impl Stop {
    /// Installs the handlers and the watchdog; must run inside the tokio runtime.
    pub fn install(timeout: Duration) -> Result<Self> {
        let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
        let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        let (arrived, at) = watch::channel(None);
        tokio::spawn(async move {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            let _ = arrived.send(Some(Instant::now()));
            let forced = tokio::select! {
                _ = sigint.recv() => "a second signal",
                _ = sigterm.recv() => "a second signal",
                _ = tokio::time::sleep(timeout + WATCHDOG_GRACE) => "the shutdown deadline",
            };
            eprintln!("otel-tcpstates: exiting now on {forced}, without a complete shutdown");
            std::process::exit(1);
        });
        Ok(Self { at })
    }

    /// When the first signal arrived, if one has. Cheap enough for a hot loop to
    /// ask every few hundred events.
    pub fn requested_at(&self) -> Option<Instant> {
        *self.at.borrow()
    }

    /// Resolves once a signal has arrived (at once if one already has).
    pub async fn requested(&mut self) {
        // Err only if the watchdog task is gone, i.e. the runtime is shutting down.
        let _ = self.at.wait_for(Option::is_some).await;
    }

    /// The shutdown deadline, counted from the signal (or from now, when the
    /// daemon stops for another reason: a reader that went away).
    pub fn deadline(&self, timeout: Duration, spans: bool, metrics: bool) -> Deadline {
        let start = self.requested_at().unwrap_or_else(Instant::now);
        Deadline::starting_at(start, timeout, spans, metrics)
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    start: Instant,
    total: Duration,
    spans: bool,
    metrics: bool,
}

impl Deadline {
    /// From `start`, `total` long; `spans` and `metrics` say which exports must
    /// still get their share.
    fn starting_at(start: Instant, total: Duration, spans: bool, metrics: bool) -> Self {
        Self {
            start,
            total,
            spans,
            metrics,
        }
    }

    /// Until when the queued events are read. Exporting spans, half the time:
    /// every event read may make spans, and they need the rest to reach the
    /// collector.
    pub fn for_events(&self) -> Instant {
        if self.spans {
            self.start + self.total / 2
        } else {
            self.for_spans()
        }
    }

    /// Until when the in-flight sessions are ended and the spans flushed: all that
    /// is left but a tenth, kept for the last self-metrics (one small request).
    pub fn for_spans(&self) -> Instant {
        if self.metrics {
            self.end() - self.total / 10
        } else {
            self.end()
        }
    }

    pub fn end(&self) -> Instant {
        self.start + self.total
    }
}

/// Time left until `until`; zero once it has passed.
pub fn left(until: Instant) -> Duration {
    until.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_come_in_pipeline_order_and_end_with_the_deadline() {
        let start = Instant::now();
        let total = Duration::from_secs(1);
        for (spans, metrics) in [(false, false), (true, false), (false, true), (true, true)] {
            let d = Deadline::starting_at(start, total, spans, metrics);
            assert!(start <= d.for_events(), "{d:?}");
            assert!(d.for_events() <= d.for_spans(), "{d:?}");
            assert!(d.for_spans() <= d.end(), "{d:?}");
            assert_eq!(d.end(), start + total);
        }
        // Exporting, the spans get at least 40% of the time.
        let d = Deadline::starting_at(start, total, true, true);
        assert!(d.for_spans() - d.for_events() >= total * 4 / 10);
        // Only text: reading the queue may take all of it.
        let d = Deadline::starting_at(start, total, false, false);
        assert_eq!(d.for_events(), start + total);
    }

    #[test]
    fn no_time_means_every_share_is_now() {
        let start = Instant::now();
        let d = Deadline::starting_at(start, Duration::ZERO, true, true);
        assert_eq!(
            [d.for_events(), d.for_spans(), d.end()],
            [start, start, start]
        );
        assert_eq!(left(start), Duration::ZERO);
    }
}
