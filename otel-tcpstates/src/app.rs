//! Wires the pipeline: preflight → load → drain the ring buffer → text output and/or
//! the trace pipeline, until a signal arrives.
use std::{
    io::{self, BufWriter, StdoutLock},
    time::Duration,
};

use anyhow::{Context as _, Result};
use otel_tcpstates_common::TcpOffsets;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Cli,
    clock::{self, WallClock},
    event::TcpEvent,
    export::{self, Protocol},
    loader::{self, Filters, Probe},
    output::{Layout, life::LifeWriter, text::TextWriter},
    preflight,
    reader::EventReader,
    sessions::{EndReason, SessionTable},
    spans::MapperOptions,
    traces::Traces,
};

/// How often a growing lost-event count is reported while running.
const LOST_REPORT_EVERY: Duration = Duration::from_secs(1);
const LOST_ADVICE: &str = "raise --ring-buffer-mib or lower --poll-ms";
/// How often the kernel-to-wall-clock offset is measured again (NTP may step it).
const CLOCK_RESYNC_EVERY: Duration = Duration::from_secs(60);

type Stdout = BufWriter<StdoutLock<'static>>;

/// Where events go: tcpstates lines, or the session table, whose updates feed
/// tcplife lines and/or traces.
struct Sinks {
    /// Events decoded so far.
    seen: u64,
    text: Option<TextWriter<Stdout>>,
    table: Option<SessionTable>,
    life: Option<LifeWriter<Stdout>>,
    traces: Option<Traces>,
}

impl Sinks {
    fn event(&mut self, event: &TcpEvent) -> io::Result<()> {
        let Self {
            seen,
            text,
            table,
            life,
            traces,
        } = self;
        *seen += 1;
        if let Some(text) = text {
            text.event(event)?;
        }
        let Some(table) = table else {
            return Ok(());
        };
        if let Some(traces) = traces {
            traces.observe(event);
        }
        let mut written = Ok(());
        table.apply(event, &mut |update| {
            if let Some(traces) = traces {
                traces.send(&update);
            }
            if let Some(life) = life
                && written.is_ok()
            {
                written = life.update(&update);
            }
        });
        written
    }

    fn header(&mut self) -> io::Result<()> {
        if let Some(text) = &mut self.text {
            text.header()?;
        }
        if let Some(life) = &mut self.life {
            life.header()?;
        }
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        if let Some(text) = &mut self.text {
            text.flush()?;
        }
        if let Some(life) = &mut self.life {
            life.flush()?;
        }
        Ok(())
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let export = export::settings(
        cli.otlp_endpoint.as_deref(),
        cli.otlp_protocol.as_deref().and_then(Protocol::parse),
    )?;
    preflight::run()?;
    let filters = Filters {
        owner_pid: cli.pid,
        // Our own export connections would trace themselves, each export making
        // spans for the next.
        exclude_owner_pid: (!cli.trace_self).then(std::process::id),
        ipv4_only: cli.ipv4,
        ipv6_only: cli.ipv6,
        local_ports: cli.localport.clone(),
        remote_ports: cli.remoteport.clone(),
    };
    // Signal handlers first: a SIGTERM during loading must not kill us with the
    // program half attached.
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    exit_watchdog(Duration::from_secs(cli.shutdown_timeout) + SHUTDOWN_GRACE)?;

    let clock = WallClock::measure();
    // Only sessions (traces, --life) report the facts read at CLOSE: plain tcpstates
    // output skips the BTF parse, and the kernel skips the reads.
    let sessions = export.is_some() || cli.life;
    let offsets = if sessions {
        loader::tcp_offsets()
    } else {
        TcpOffsets::default()
    };
    let traces = match &export {
        Some(settings) => {
            let options = MapperOptions {
                service_per_process: cli.service_per_process,
                facts: offsets.enabled != 0,
            };
            Some(Traces::start(settings, clock, options)?)
        }
        None => None,
    };
    let (probe, ring) = Probe::load(
        &filters,
        &offsets,
        cli.ring_buffer_mib << 20,
        cli.max_sockets,
    )?;
    let mut reader = EventReader::new(ring, Duration::from_millis(cli.poll_ms))
        .context("watching the ring buffer")?;

    let layout = Layout {
        time: cli.time,
        timestamp: cli.timestamp,
        wide: cli.wide,
        csv: cli.csv,
    };
    let printing = export.is_none() || cli.print;
    let stdout = || BufWriter::with_capacity(64 << 10, io::stdout().lock());
    let mut sinks = Sinks {
        seen: 0,
        text: (printing && !cli.life).then(|| TextWriter::new(layout, clock, stdout())),
        life: (printing && cli.life).then(|| LifeWriter::new(layout, clock, stdout())),
        table: sessions.then(|| SessionTable::new(cli.max_sockets)),
        traces,
    };
    // Logged once attached, like the header below.
    if let Some(settings) = &export {
        tracing::info!(
            "exporting traces over OTLP/{} to {}",
            settings.protocol.as_str(),
            settings.endpoint
        );
    }
    // The header appears only once the program is attached: a consumer that waits
    // for it knows every later transition will be seen.
    if let Err(err) = sinks.header() {
        return quiet_on_broken_pipe(err);
    }

    let mut lost_timer = tokio::time::interval(LOST_REPORT_EVERY);
    // Off (0: the branch below is disabled) unless asked for, or when exporting.
    let stats_every = match cli.stats_interval {
        Some(secs) => secs,
        None if sinks.traces.is_some() => DEFAULT_STATS_EVERY_SECS,
        None => 0,
    };
    let stats_period = Duration::from_secs(stats_every.max(1));
    let mut stats_timer =
        tokio::time::interval_at(tokio::time::Instant::now() + stats_period, stats_period);
    let mut clock_timer = tokio::time::interval_at(
        tokio::time::Instant::now() + CLOCK_RESYNC_EVERY,
        CLOCK_RESYNC_EVERY,
    );
    let mut lost_reported = 0;
    let mut dropped_reported = 0;
    let mut broken_pipe = false;
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
                let dropped = sinks.traces.as_ref().map_or(0, Traces::dropped_at_least);
                if dropped > dropped_reported {
                    tracing::warn!(
                        "at least {} spans dropped (export queue full): the collector, or the export path, cannot keep up",
                        dropped - dropped_reported
                    );
                    dropped_reported = dropped;
                }
            }
            _ = stats_timer.tick(), if stats_every > 0 => {
                tracing::info!("{}", stats_line(&sinks, probe.lost_events()?));
            }
            _ = clock_timer.tick() => {
                if let Some(traces) = &mut sinks.traces {
                    traces.resync_clock();
                }
            }
        }
        // Flush once per drained batch: prompt for pipes, no write(2) per line.
        if let Err(err) = reader
            .drain(|event| sinks.event(event))
            .and_then(|_| sinks.flush())
        {
            broken_pipe = err.kind() == io::ErrorKind::BrokenPipe;
            if !broken_pipe {
                return Err(err).context("writing output");
            }
            break;
        }
    }

    let last = if broken_pipe {
        Ok(())
    } else {
        reader
            .drain(|event| sinks.event(event))
            .and_then(|_| sinks.flush())
    };
    let lost = probe.lost_events()?;
    drop(probe);
    if lost > 0 {
        tracing::warn!("{lost} events lost in total (ring buffer full); {LOST_ADVICE}");
    }
    if reader.malformed > 0 {
        tracing::warn!("{} malformed event records skipped", reader.malformed);
    }
    if let (Some(mut traces), Some(mut table)) = (sinks.traces.take(), sinks.table.take()) {
        let in_flight = table.len();
        table.end_all(
            clock::monotonic_now_ns(),
            EndReason::Shutdown,
            &mut |update| traces.send(&update),
        );
        let flushed = traces.shutdown(Duration::from_secs(cli.shutdown_timeout));
        // Nothing is queued any more: whatever was not exported or failed was dropped.
        let summary = traces.summary(table.stats(), in_flight);
        tracing::info!(
            "{} sockets traced ({} evicted, {} open at exit), {} spans: {} exported, {} failed, {} not sent",
            summary.sessions,
            summary.evicted,
            summary.in_flight,
            summary.spans,
            summary.exported,
            summary.failed,
            summary.not_sent
        );
        if let Err(err) = flushed {
            tracing::warn!("{err:#}");
        }
    }
    last.or_else(quiet_on_broken_pipe)
}

/// How often the one-line counters are logged when exporting, unless set.
const DEFAULT_STATS_EVERY_SECS: u64 = 60;

/// The tracer's own counters, as one line.
fn stats_line(sinks: &Sinks, lost: u64) -> String {
    let mut line = format!("stats: {} events seen, {lost} lost", sinks.seen);
    if let Some(table) = &sinks.table {
        let stats = table.stats();
        line += &format!(
            "; sessions: {} in flight, {} started, {} evicted",
            table.len(),
            stats.started,
            stats.evicted
        );
    }
    if let (Some(traces), Some(table)) = (&sinks.traces, &sinks.table) {
        let s = traces.summary(table.stats(), table.len());
        line += &format!(
            "; spans: {} produced, {} exported, {} failed, at least {} dropped",
            s.spans,
            s.exported,
            s.failed,
            traces.dropped_at_least()
        );
    }
    line
}

/// Beyond the flush timeout, what an orderly exit may take (draining, ending sessions).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Makes sure a signal ends the process even if the main loop cannot: it may be stuck
/// writing to a pipe nobody reads. A second signal, or the first one's deadline,
/// exits at once.
fn exit_watchdog(deadline: Duration) -> Result<()> {
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        let forced = tokio::select! {
            _ = sigint.recv() => "a second signal",
            _ = sigterm.recv() => "a second signal",
            _ = tokio::time::sleep(deadline) => "the shutdown deadline",
        };
        eprintln!("otel-tcpstates: exiting now on {forced}, without a complete shutdown");
        std::process::exit(1);
    });
    Ok(())
}

/// A reader that went away (`| head`) ends the trace quietly, as for other filters.
fn quiet_on_broken_pipe(err: io::Error) -> Result<()> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(err).context("writing output")
    }
}
