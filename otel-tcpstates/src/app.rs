//! Wires the pipeline: preflight → load → drain ring buffer → text output, until a
//! signal arrives.
use std::{
    io::{self, BufWriter},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
    clock::WallClock,
    loader::{Filters, Probe},
    output::text::{Layout, TextWriter},
    preflight,
    reader::EventReader,
};

/// How often a growing lost-event count is reported while running.
const LOST_REPORT_EVERY: Duration = Duration::from_secs(1);
const LOST_ADVICE: &str = "raise --ring-buffer-mib or lower --poll-ms";

pub async fn run(cli: Cli) -> Result<()> {
    preflight::run()?;
    let filters = Filters {
        owner_pid: cli.pid,
        ipv4_only: cli.ipv4,
        ipv6_only: cli.ipv6,
        local_ports: cli.localport.clone(),
        remote_ports: cli.remoteport.clone(),
    };
    // Signal handlers first: a SIGTERM during loading must not kill us with the
    // program half attached.
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;

    let (probe, ring) = Probe::load(&filters, cli.ring_buffer_mib << 20)?;
    let mut reader = EventReader::new(ring, Duration::from_millis(cli.poll_ms))
        .context("watching the ring buffer")?;

    let layout = Layout {
        time: cli.time,
        timestamp: cli.timestamp,
        wide: cli.wide,
        csv: cli.csv,
    };
    let stdout = BufWriter::with_capacity(64 << 10, io::stdout().lock());
    let mut text = TextWriter::new(layout, WallClock::measure(), stdout);
    // The header appears only once the program is attached: a consumer that waits
    // for it knows every later transition will be seen.
    if let Err(err) = text.header().and_then(|()| text.flush()) {
        return quiet_on_broken_pipe(err);
    }

    let mut lost_timer = tokio::time::interval(LOST_REPORT_EVERY);
    let mut lost_reported = 0;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            ready = reader.ready() => ready.context("waiting for events")?,
            _ = lost_timer.tick() => {
                let lost = probe.lost_events()?;
                if lost > lost_reported {
                    tracing::warn!(
                        "{} events lost (ring buffer full); {LOST_ADVICE}",
                        lost - lost_reported
                    );
                    lost_reported = lost;
                }
            }
        }
        // Flush once per drained batch: prompt for pipes, no write(2) per line.
        if let Err(err) = reader
            .drain(|event| text.event(event))
            .and_then(|_| text.flush())
        {
            return quiet_on_broken_pipe(err);
        }
    }

    let last = reader
        .drain(|event| text.event(event))
        .and_then(|_| text.flush());
    let lost = probe.lost_events()?;
    drop(probe);
    if lost > 0 {
        tracing::warn!("{lost} events lost in total (ring buffer full); {LOST_ADVICE}");
    }
    if reader.malformed > 0 {
        tracing::warn!("{} malformed event records skipped", reader.malformed);
    }
    last.or_else(quiet_on_broken_pipe)
}

/// A reader that went away (`| head`) ends the trace quietly, as for other filters.
fn quiet_on_broken_pipe(err: io::Error) -> Result<()> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(err).context("writing output")
    }
}
