//! Wires the pipeline: preflight → load → drain the ring buffer → text output and/or
//! the trace pipeline, until a signal arrives.
use std::{
    io::{self, BufWriter, StdoutLock},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use opentelemetry::metrics::MeterProvider as _;
use otel_tcpstates_common::TcpOffsets;

use crate::{
    cli::Cli,
    kernel::clock::{self, ClockSync},
    kernel::event::{Record, TcpEvent},
    kernel::loader::{self, Filters, KernelOffsets, Losses, Probe},
    kernel::preflight,
    kernel::reader::EventReader,
    metrics::{ConnectionMetrics, MetricsOptions},
    otlp::metrics::meter_provider,
    otlp::spans::MapperOptions,
    otlp::traces::Traces,
    otlp::{
        resource,
        settings::{self, Protocol},
    },
    output::{
        Layout,
        journal::{self, JournalWriter},
        life::LifeWriter,
        text::TextWriter,
    },
    periodic::Every,
    sampling::{
        decision::Sampling,
        settings::{Sampler, sampler_from},
    },
    sessions::table::{EndReason, SessionTable, Update},
    shutdown::{self, Deadline, Stop},
    telemetry::self_metrics::SelfMetrics,
    telemetry::stats::{ExitSummary, IncidentStats, LinkStats, SessionStats, Stats},
};

/// How often a growing lost-event count is reported while running.
const LOST_REPORT_EVERY: Duration = Duration::from_secs(1);
const LOST_ADVICE: &str = "raise --ring-buffer-mib or lower --poll-ms";
/// Why the kernel skips a program, and where to look.
const SKIPPED_WHY: &str = "another BPF program was running on the CPU, and tracepoint programs \
    do not interrupt one another; bpftool prog show lists each program's recursion_misses";

type Stdout = BufWriter<StdoutLock<'static>>;

/// Where events go: tcpstates lines, journal records, or the session table, whose
/// updates feed tcplife lines and/or the trace pipeline.
struct Sinks {
    /// Events decoded so far.
    seen: u64,
    /// The kernel-to-wall-clock offset every output uses, checked before each drain.
    clock: ClockSync,
    text: Option<TextWriter<Stdout>>,
    journal: Option<JournalWriter>,
    table: Option<SessionTable>,
    life: Option<LifeWriter<Stdout>>,
    /// Counted from every session update, before any sampling of traces.
    metrics: Option<ConnectionMetrics>,
    traces: Option<TracePipeline>,
}

/// The sampling decision, then the spans of what it kept.
struct TracePipeline {
    sampling: Sampling,
    traces: Traces,
}

impl TracePipeline {
    /// Sends the spans `update` makes of kept traces.
    fn update(&mut self, update: &Update<'_>) {
        let Self { sampling, traces } = self;
        sampling.route(update, |kept| traces.send(&kept));
    }

    /// At shutdown: sends the spans `update` makes of kept traces, the queue
    /// making room for them until `until`; after it, counts them as cut off
    /// without making them.
    ///
    /// A session the deadline leaves no time for is judged as one ended in time
    /// is: by probability, else by the keep rules on its whole life (its held
    /// states too). Only a kept trace's spans would have been sent, so only those
    /// are produced and cut off; a trace left out counts as sampled out, as it
    /// would have with time to spare. Counting every session's spans instead made
    /// `cut_off` with 1% sampling a hundred times what was ever going to be sent.
    fn end(&mut self, update: &Update<'_>, until: Instant) {
        let Self { sampling, traces } = self;
        sampling.route(update, |kept| {
            if Instant::now() < until {
                traces.send_flushing(&kept, until);
            } else {
                traces.not_sent(1);
            }
        });
    }
}

impl Sinks {
    fn record(&mut self, record: &Record) -> io::Result<()> {
        match record {
            Record::Transition(event) => self.event(event),
            Record::Link {
                skaddr,
                ts_ns,
                link,
            } => {
                if let Some(table) = &mut self.table {
                    table.link(*skaddr, *ts_ns, *link);
                }
                Ok(())
            }
            Record::Answer {
                skaddr,
                ts_ns,
                sent,
                of,
            } => self
                .with_table(|table, out| table.answer(*skaddr, *ts_ns, *sent, *of, &mut &mut *out)),
            Record::InvalidTraceparent | Record::UnknownIncident | Record::H2(_) => Ok(()),
            Record::Incident(incident) => {
                self.with_table(|table, out| table.incident(incident, &mut &mut *out))
            }
        }
    }

    fn event(&mut self, event: &TcpEvent) -> io::Result<()> {
        self.seen += 1;
        if let Some(text) = &mut self.text {
            text.event(event)?;
        }
        if let Some(journal) = &mut self.journal {
            journal.event(event);
        }
        if let Some(pipeline) = &mut self.traces {
            pipeline.traces.observe(event);
        }
        self.with_table(|table, out| table.apply(event, &mut &mut *out))
    }

    /// Measures the kernel-to-wall-clock offset again and, when the wall clock
    /// was stepped (NTP, a resume from suspend), hands every output the new one.
    fn resync_clock(&mut self) {
        let was = self.clock.current();
        let Some(clock) = self.clock.resync() else {
            return;
        };
        tracing::info!(
            "the wall clock was stepped by {:+.3} s: times from now on follow it",
            clock.seconds_after(&was)
        );
        if let Some(text) = &mut self.text {
            text.set_clock(clock);
        }
        if let Some(life) = &mut self.life {
            life.set_clock(clock);
        }
        if let Some(pipeline) = &mut self.traces {
            pipeline
                .traces
                .clock_stepped(clock::monotonic_now_ns(), clock);
        }
    }

    /// Ends the sockets whose RST is overdue, now that every record up to kernel
    /// time `read_through_ns` has been read.
    fn expire_closing(&mut self, read_through_ns: u64) -> io::Result<()> {
        if !self.table.as_ref().is_some_and(SessionTable::has_closing) {
            return Ok(());
        }
        self.with_table(|table, out| table.expire_closing(read_through_ns, &mut &mut *out))
    }

    /// Gives `apply` the session table and where its updates go: the connection
    /// metrics, the trace pipeline and tcplife lines.
    fn with_table(
        &mut self,
        apply: impl FnOnce(&mut SessionTable, &mut dyn FnMut(Update<'_>)),
    ) -> io::Result<()> {
        let Self {
            table,
            life,
            metrics,
            traces,
            ..
        } = self;
        let Some(table) = table else {
            return Ok(());
        };
        let mut written = Ok(());
        apply(table, &mut |update| {
            if let Some(metrics) = metrics {
                metrics.update(&update);
            }
            if let Some(pipeline) = traces {
                pipeline.update(&update);
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
        if let Some(pipeline) = &mut self.traces {
            pipeline.traces.flush();
        }
        if let Some(text) = &mut self.text {
            text.flush()?;
        }
        if let Some(life) = &mut self.life {
            life.flush()?;
        }
        Ok(())
    }

    /// The connections open now, for the connection metrics' next collection.
    fn publish_open_connections(&mut self) {
        if let (Some(metrics), Some(table)) = (&mut self.metrics, &self.table) {
            metrics.publish(table);
        }
    }

    /// Ends the sessions still open at exit and sends the last spans, by `until`;
    /// returns how many sessions were open (none without a trace pipeline).
    fn end_sessions(&mut self, until: Instant) -> u64 {
        let (Some(pipeline), Some(table)) = (&mut self.traces, &mut self.table) else {
            return 0;
        };
        let metrics = &mut self.metrics;
        let mut emit = |update: Update<'_>| {
            // Past the deadline nothing is made that nobody will wait for.
            if let Some(metrics) = metrics
                && Instant::now() < until
            {
                metrics.update(&update);
            }
            pipeline.end(&update, until);
        };
        // Sockets that reached CLOSE and wait for their RST are not open: they
        // end as closed, before the count of those open at exit.
        table.expire_closing(u64::MAX, &mut emit);
        let in_flight = table.len() as u64;
        table.end_all(clock::monotonic_now_ns(), EndReason::Shutdown, &mut emit);
        // Nothing is queued any more once shut down: whatever was not exported,
        // failed or dropped was cut off by the deadline.
        if let Err(err) = pipeline.traces.shutdown(shutdown::left(until)) {
            tracing::warn!("{err:#}");
        }
        in_flight
    }
}

/// The running warnings: each says what grew since the last one.
#[derive(Default)]
struct Reports {
    lost: u64,
    dropped: u64,
    /// The other losses, in the order of [`other_losses`].
    others: [u64; 6],
}

/// The losses besides state changes lost to a full ring: each count, what it
/// counts, and why (with what to do).
fn other_losses(stats: &Stats) -> [(u64, &'static str, String); 6] {
    let links = stats.links.unwrap_or_default();
    let incidents = stats.incidents.unwrap_or_default();
    let full = || format!("ring buffer full; {LOST_ADVICE}");
    [
        (
            stats.events_skipped,
            "state changes skipped by the kernel",
            SKIPPED_WHY.to_owned(),
        ),
        (links.lost, "link records lost", full()),
        (incidents.lost, "incident records lost", full()),
        (
            incidents.skipped,
            "incident records skipped by the kernel",
            SKIPPED_WHY.to_owned(),
        ),
        (
            stats.listeners_lost,
            "listening sockets not remembered",
            "the kernel's listener maps were full; their connections may name no owner".to_owned(),
        ),
        (
            links.http2_lost,
            "HTTP/2 request header streams given up",
            "a gap in the stream, a header block that did not decode, or the ring buffer full; \
             those connections' later requests make no link"
                .to_owned(),
        ),
    ]
}

impl Reports {
    fn running(&mut self, stats: &Stats, journal: Option<&mut JournalWriter>) {
        if stats.events_lost > self.lost {
            tracing::warn!(
                "{} events lost (ring buffer full); {LOST_ADVICE}",
                stats.events_lost - self.lost
            );
            self.lost = stats.events_lost;
        }
        for ((count, what, why), reported) in other_losses(stats).iter().zip(&mut self.others) {
            if *count > *reported {
                tracing::warn!("{} {what} ({why})", count - *reported);
                *reported = *count;
            }
        }
        if let Some(unsent) = journal.and_then(JournalWriter::take_unsent) {
            tracing::warn!("{unsent}");
        }
        let dropped = stats.spans.map_or(0, |s| s.dropped);
        if dropped > self.dropped {
            tracing::warn!(
                "{} spans dropped (export queue full): the collector, or the export path, cannot keep up",
                dropped - self.dropped
            );
            self.dropped = dropped;
        }
    }
}

pub async fn run(cli: Cli) -> Result<()> {
    let export = settings::settings(
        cli.otlp_endpoint.as_deref(),
        cli.otlp_protocol.as_deref().and_then(Protocol::parse),
    )?;
    let sampler = export
        .is_some()
        .then(|| sampler_from(cli.sample_ratio, |name| std::env::var(name).ok()))
        .transpose()?;
    // Before loading anything: a journal that is not there is a setup error.
    let journal = cli
        .journal
        .then(|| JournalWriter::open(journal::socket_path()))
        .transpose()?;
    preflight::run()?;
    if cli.links && export.is_none() {
        tracing::warn!("--links does nothing without an OTLP endpoint: links go on exported spans");
    }
    // Signal handlers first: a SIGTERM during loading must not kill us with the
    // program half attached.
    let shutdown_timeout = Duration::from_secs(cli.shutdown_timeout);
    let mut stop = Stop::install(shutdown_timeout)?;

    let clock = ClockSync::new();
    // Only sessions (traces, --life) report the facts read at CLOSE: plain tcpstates
    // output leaves them out, and the kernel skips the reads.
    let sessions = export.is_some() || cli.life;
    // The journal's CLOSE records say why a connection failed: from sk_err.
    let offsets = loader::kernel_offsets(
        sessions || cli.journal,
        export.is_some() && !cli.no_incidents,
    );
    let exporting = match (&export, sampler) {
        (Some(settings), Some(sampler)) => Some(Exporting::start(
            &cli,
            settings,
            sampler,
            &offsets.tcp,
            &clock,
        )?),
        _ => None,
    };
    let (mut probe, mut reader) = attach(&cli, &offsets, export.is_some())?;
    let (mut sinks, self_metrics) = Sinks::new(&cli, exporting, journal, &probe, clock);
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

    let stats_every = match cli.stats_interval {
        Some(secs) => secs,
        None if sinks.traces.is_some() => DEFAULT_STATS_EVERY_SECS,
        None => 0,
    };
    let mut watch = Watch {
        reader: &mut reader,
        probe: &mut probe,
        sinks: &mut sinks,
        self_metrics: self_metrics.as_ref(),
    };
    let broken_pipe = watch.until_stopped(&mut stop, stats_every).await?;

    // From the signal on, one deadline for everything that follows.
    let deadline = stop.deadline(
        shutdown_timeout,
        sinks.traces.is_some(),
        self_metrics.is_some(),
    );
    let Finished {
        last,
        losses,
        cut_off,
    } = finish_reading(probe, &mut reader, &mut sinks, &deadline, broken_pipe)?;
    let open_at_exit = sinks.end_sessions(deadline.for_spans());
    // The final values: every session ended, the span counts exact.
    let at_exit = stats(&sinks, &reader, &losses, cut_off);
    if let Some(summary) = ExitSummary::of(&at_exit, open_at_exit) {
        tracing::info!("{summary}");
    }
    if let Some(kept) = at_exit
        .sampling
        .filter(|kept| kept.kept_by_rule + kept.sampled_out > 0)
    {
        tracing::info!(
            "sampling kept {} traces by probability and {} by a rule; {} left out ({} spans)",
            kept.kept_by_probability,
            kept.kept_by_rule,
            kept.sampled_out,
            kept.spans_sampled_out
        );
    }
    if let Some(metrics) = self_metrics {
        sinks.publish_open_connections();
        metrics.publish(&at_exit);
        if let Err(err) = metrics.shutdown(shutdown::left(deadline.end())) {
            tracing::warn!("{err:#}");
        }
    }
    last.or_else(quiet_on_broken_pipe)
}

/// What exporting adds to the pipeline: the trace pipeline, and with OTLP metrics
/// the connection metrics and the tracer's own.
struct Exporting {
    traces: TracePipeline,
    connection_metrics: Option<ConnectionMetrics>,
    self_metrics: Option<SelfMetrics>,
}

impl Exporting {
    /// Must run inside the tokio runtime: the export workers are spawned on it.
    fn start(
        cli: &Cli,
        settings: &settings::Settings,
        sampler: Sampler,
        offsets: &TcpOffsets,
        clock: &ClockSync,
    ) -> Result<Self> {
        let resource = resource::resource();
        let (mut self_metrics, mut connection_metrics) = (None, None);
        if settings.metrics {
            let options = MetricsOptions {
                max_series: cli.metrics_max_series as usize,
                peer_address: cli.metrics_peer_address,
            };
            let provider = meter_provider(settings, &resource, options.max_series)?;
            connection_metrics = Some(ConnectionMetrics::new(
                &provider.meter("otel-tcpstates"),
                options,
            ));
            self_metrics = Some(SelfMetrics::start(provider));
        }
        let options = MapperOptions {
            service_per_process: cli.service_per_process,
            facts: offsets.enabled != 0,
            incidents: !cli.no_incidents,
        };
        Ok(Self {
            traces: TracePipeline {
                sampling: Sampling::new(sampler, cli.keep_rules()),
                traces: Traces::start(settings, &resource, clock.current(), options)?,
            },
            connection_metrics,
            self_metrics,
        })
    }
}

/// Loads and attaches the programs, and watches their ring buffer.
fn attach(cli: &Cli, offsets: &KernelOffsets, exporting: bool) -> Result<(Probe, EventReader)> {
    let (probe, ring) = Probe::load(
        &filters(cli),
        offsets,
        cli.ring_buffer_mib << 20,
        cli.max_sockets,
        // Links and incidents go on the spans of sockets: only traces have a use
        // for them.
        exporting && cli.links,
        cli.tls.then_some(cli.tls_libraries.as_slice()),
        exporting && !cli.no_incidents,
    )?;
    let reader = EventReader::new(ring, Duration::from_millis(cli.poll_ms))
        .context("watching the ring buffer")?;
    Ok((probe, reader))
}

impl Sinks {
    /// The sinks the flags ask for; the self-metrics go to the main loop.
    fn new(
        cli: &Cli,
        exporting: Option<Exporting>,
        journal: Option<JournalWriter>,
        probe: &Probe,
        clock: ClockSync,
    ) -> (Self, Option<SelfMetrics>) {
        let layout = Layout {
            time: cli.time,
            timestamp: cli.timestamp,
            wide: cli.wide,
            csv: cli.csv,
        };
        let printing = exporting.is_none() || cli.print;
        let sessions = exporting.is_some() || cli.life;
        let stdout = || BufWriter::with_capacity(64 << 10, io::stdout().lock());
        let (traces, metrics, self_metrics) = match exporting {
            Some(e) => (Some(e.traces), e.connection_metrics, e.self_metrics),
            None => (None, None, None),
        };
        let hold_if = traces.as_ref().and_then(|t| t.sampling.hold_if());
        let sinks = Sinks {
            seen: 0,
            text: (printing && !cli.life)
                .then(|| TextWriter::new(layout, clock.current(), stdout())),
            journal,
            life: (printing && cli.life)
                .then(|| LifeWriter::new(layout, clock.current(), stdout())),
            metrics,
            table: sessions.then(|| {
                let table =
                    SessionTable::new(cli.max_sockets).congestion_known(probe.congestion_known());
                match hold_if {
                    Some(hold) => table.holding_states_if(hold),
                    None => table,
                }
            }),
            traces,
            clock,
        };
        (sinks, self_metrics)
    }
}

/// What the end of reading left: the last write's outcome (a broken pipe is
/// quiet), the kernel's final loss counts and the state changes the deadline left
/// unread.
struct Finished {
    last: io::Result<()>,
    losses: Losses,
    cut_off: u64,
}

/// Detaches the programs, reads what they queued until the events' deadline and
/// reports what was lost.
fn finish_reading(
    mut probe: Probe,
    reader: &mut EventReader,
    sinks: &mut Sinks,
    deadline: &Deadline,
    broken_pipe: bool,
) -> Result<Finished> {
    // Nothing new is queued from here, so what is queued is all there is to read,
    // and the kernel's lost count is final.
    probe.detach();
    let last = if broken_pipe {
        Ok(())
    } else {
        sinks.resync_clock();
        reader
            .drain_until(deadline.for_events(), |record| sinks.record(record))
            .and_then(|_| sinks.flush())
    };
    // What the deadline left in the ring is lost too; what a reader that went
    // away (`| head`) did not want is not.
    let cut_off = if broken_pipe {
        Default::default()
    } else {
        reader.discard()
    };
    if cut_off.other > 0 {
        tracing::warn!(
            "{} link and incident records still queued at the shutdown deadline were not read",
            cut_off.other
        );
    }
    let cut_off = cut_off.transitions;
    let losses = probe.losses()?;
    drop(probe);
    report_lost_in_total(losses.state_changes + cut_off, cut_off);
    let at_exit = stats(sinks, reader, &losses, cut_off);
    for (count, what, why) in other_losses(&at_exit) {
        if count > 0 {
            tracing::warn!("{count} {what} in total ({why})");
        }
    }
    if reader.invalid_traceparents > 0 {
        tracing::info!(
            "{} traceparent headers were not valid W3C trace context: no link made of them",
            reader.invalid_traceparents
        );
    }
    if let Some(unsent) = sinks
        .journal
        .as_ref()
        .and_then(JournalWriter::unsent_in_total)
    {
        tracing::warn!("{unsent}");
    }
    if reader.malformed > 0 {
        tracing::warn!("{} malformed event records skipped", reader.malformed);
    }
    if let Some(late) = at_exit.incidents.map(|i| i.resets_late).filter(|&n| n > 0) {
        // Not a loss: a request that reached the kernel's time-wait socket long
        // after the close, whose trace could not wait for it.
        tracing::info!(
            "{late} RSTs came after their connection's trace had ended: counted here, not on its spans"
        );
    }
    Ok(Finished {
        last,
        losses,
        cut_off,
    })
}

/// The kernel-side filters the flags ask for.
fn filters(cli: &Cli) -> Filters {
    Filters {
        owner_pid: cli.pid,
        // Our own export connections would trace themselves, each export making
        // spans for the next.
        exclude_owner_pid: (!cli.trace_self).then(std::process::id),
        ipv4_only: cli.ipv4,
        ipv6_only: cli.ipv6,
        local_ports: cli.localport.as_ref().map(|set| set.ports().to_vec()),
        remote_ports: cli.remoteport.as_ref().map(|set| set.ports().to_vec()),
    }
}

/// The main loop's parts: it drains the ring into the sinks and does the periodic
/// work, until a signal or a reader that went away.
struct Watch<'a> {
    reader: &'a mut EventReader,
    probe: &'a mut Probe,
    sinks: &'a mut Sinks,
    self_metrics: Option<&'a SelfMetrics>,
}

impl Watch<'_> {
    /// Runs until a signal (false) or a broken pipe (true).
    async fn until_stopped(&mut self, stop: &mut Stop, stats_every: u64) -> Result<bool> {
        let started = Instant::now();
        let mut lost_report = Every::starting(started, LOST_REPORT_EVERY);
        let mut stats_line =
            (stats_every > 0).then(|| Every::starting(started, Duration::from_secs(stats_every)));
        // Wakes an idle loop when the next periodic work is due; a busy loop finds it
        // due on its own (see `periodic`).
        let wake = tokio::time::sleep_until(started.into());
        tokio::pin!(wake);
        let mut reports = Reports::default();
        loop {
            // The lost-event report is due every second, so there always is a next.
            let next = [Some(&lost_report), stats_line.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(Every::next)
                .min()
                .unwrap_or_else(|| Instant::now() + LOST_REPORT_EVERY);
            if wake.is_elapsed() || wake.deadline() != next.into() {
                wake.as_mut().reset(next.into());
            }
            tokio::select! {
                _ = stop.requested() => return Ok(false),
                ready = self.reader.ready() => ready.context("waiting for events")?,
                () = &mut wake => {}
            }
            let now = Instant::now();
            let report_due = lost_report.due(now);
            let line_due = stats_line.as_mut().is_some_and(|every| every.due(now));
            if report_due || line_due {
                if report_due {
                    self.sinks.publish_open_connections();
                }
                // One reading of the counters serves both when they fall due together.
                let stats = stats(self.sinks, self.reader, &self.probe.losses()?, 0);
                if report_due {
                    reports.running(&stats, self.sinks.journal.as_mut());
                    if let Some(metrics) = self.self_metrics {
                        metrics.publish(&stats);
                    }
                }
                if line_due {
                    tracing::info!("{stats}");
                }
            }
            self.sinks.resync_clock();
            // Flush once per drained batch: prompt for pipes, no write(2) per line. A
            // signal cuts the batch short: the shutdown deadline runs from its arrival.
            let sinks = &mut *self.sinks;
            if let Err(err) = self
                .reader
                .drain(
                    || stop.requested_at().is_some(),
                    |record| sinks.record(record),
                )
                .and_then(|_| sinks.expire_closing(self.reader.read_through_ns()))
                .and_then(|_| sinks.flush())
            {
                if err.kind() != io::ErrorKind::BrokenPipe {
                    return Err(err).context("writing output");
                }
                return Ok(true);
            }
        }
    }
}

/// How often the one-line counters are logged when exporting, unless set.
const DEFAULT_STATS_EVERY_SECS: u64 = 60;

/// The tracer's own counters now; `cut_off`: state changes the shutdown
/// deadline left unread, lost too.
fn stats(sinks: &Sinks, reader: &EventReader, losses: &Losses, cut_off: u64) -> Stats {
    let table = sinks.table.as_ref().map(SessionTable::stats);
    Stats {
        events_seen: sinks.seen,
        events_lost: losses.state_changes + cut_off,
        events_skipped: losses.state_changes_skipped,
        links: losses.links.map(|lost| LinkStats {
            seen: reader.links_seen,
            lost,
            invalid: reader.invalid_traceparents,
            not_kept: sinks
                .table
                .as_ref()
                .map_or(0, |table| table.stats().links_not_kept),
            requests_sampled: table.map_or(0, |t| t.requests_sampled),
            request_spans: table.map_or(0, |t| t.request_spans),
            requests_not_kept: table.map_or(0, |t| t.requests_not_kept),
            tls_unmatched: losses.tls,
            http2_lost: losses.h2.unwrap_or(0)
                + reader.http2.counts.broken
                + reader.http2.counts.not_kept,
        }),
        incidents: losses.incidents.map(|(lost, skipped)| IncidentStats {
            lost,
            skipped,
            unmatched: table.map_or(0, |t| t.incidents_unmatched),
            resets_late: table.map_or(0, |t| t.resets_late),
        }),
        listeners_lost: losses.listeners,
        sessions: sinks.table.as_ref().map(|table| {
            let s = table.stats();
            SessionStats {
                in_flight: table.len() as u64,
                started: s.started,
                evicted: s.evicted,
                replaced: s.replaced,
                events_not_kept: s.events_not_kept,
            }
        }),
        spans: sinks.traces.as_ref().map(|t| t.traces.stats()),
        sampling: sinks.traces.as_ref().map(|t| t.sampling.stats()),
        metrics_overflow: sinks.metrics.as_ref().map(ConnectionMetrics::overflowed),
        journal_unsent: sinks.journal.as_ref().map(JournalWriter::unsent),
    }
}

/// The exit's account of lost events: those the full ring buffer turned away and
/// those the shutdown deadline left unread, each with what to change.
fn report_lost_in_total(lost: u64, cut_off: u64) {
    if lost == 0 {
        return;
    }
    let full = lost - cut_off;
    match (full, cut_off) {
        (_, 0) => tracing::warn!("{lost} events lost in total (ring buffer full); {LOST_ADVICE}"),
        (0, _) => tracing::warn!(
            "{lost} events lost in total (still queued at the shutdown deadline; raise --shutdown-timeout)"
        ),
        _ => tracing::warn!(
            "{lost} events lost in total ({full} ring buffer full: {LOST_ADVICE}; \
             {cut_off} still queued at the shutdown deadline: raise --shutdown-timeout)"
        ),
    }
}

/// A reader that went away (`| head`) ends the trace quietly, as for other filters.
fn quiet_on_broken_pipe(err: io::Error) -> Result<()> {
    if err.kind() == io::ErrorKind::BrokenPipe {
        Ok(())
    } else {
        Err(err).context("writing output")
    }
}
