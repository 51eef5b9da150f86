//! The throughput runs: churn untraced and under each tracer, measured side by side.
use super::*;

#[derive(Default)]
pub(crate) struct Row {
    pub(crate) mode: &'static str,
    pub(crate) conns_per_s: f64,
    pub(crate) ratio: Option<f64>,
    pub(crate) ns_per_event: Option<f64>,
    /// ns/event over the floor program's, measured in the same bench.
    pub(crate) floor_ratio: Option<f64>,
    pub(crate) events_per_s: Option<f64>,
    pub(crate) cpu_s_per_m_events: Option<f64>,
    pub(crate) lost: Option<u64>,
    pub(crate) spans: Option<Spans>,
    pub(crate) peak_rss_mib: Option<f64>,
    pub(crate) exit_s: Option<f64>,
    /// Other processes' user CPU during the window, % of one CPU.
    pub(crate) other_cpu_pct: f64,
    pub(crate) notes: Vec<String>,
}

pub(crate) struct Spans {
    pub(crate) produced: u64,
    pub(crate) exported: u64,
    pub(crate) received: u64,
    /// Produced but not exported (failed or never sent).
    pub(crate) dropped: u64,
    /// Received during the measured window, per second.
    pub(crate) per_s: f64,
    pub(crate) sockets: u64,
    pub(crate) evicted: u64,
    /// The daemon's CPU (all threads) in the window per span received in it.
    pub(crate) cpu_us_per_span: Option<f64>,
    /// The receiver's own CPU in the window, % of one CPU.
    pub(crate) receiver_cpu_pct: f64,
}

impl Spans {
    /// The daemon's account (its exit summary) next to the receiver's.
    pub(crate) fn count(
        exited: &Exited,
        receiver: &otlp::Receiver,
        window: Window,
    ) -> Option<Spans> {
        let sum = summary(&exited.stderr)?;
        Some(Spans {
            produced: sum.produced,
            exported: sum.exported,
            received: settled_count(receiver, sum.exported),
            dropped: sum.failed + sum.not_sent,
            per_s: window.spans as f64 / window.secs,
            sockets: sum.sockets,
            evicted: sum.evicted,
            cpu_us_per_span: (window.spans > 0)
                .then(|| window.tracer_cpu_s / window.spans as f64 * 1e6),
            receiver_cpu_pct: 100.0 * window.receiver_cpu_s / window.secs,
        })
    }
}

/// The measured window, as far as spans go.
#[derive(Clone, Copy)]
pub(crate) struct Window {
    pub(crate) secs: f64,
    pub(crate) spans: u64,
    pub(crate) tracer_cpu_s: f64,
    pub(crate) receiver_cpu_s: f64,
}

/// What is read at both ends of the measured window.
pub(crate) struct Mark {
    pub(crate) at: Instant,
    pub(crate) completed: u64,
    pub(crate) prog: ProgStats,
    /// The tracer's user + system CPU.
    pub(crate) cpu_s: f64,
    pub(crate) received: u64,
    /// The in-process receiver's thread: user + system CPU.
    pub(crate) receiver_cpu_s: f64,
    /// User CPU of everything but us and the tracer: other work on the machine
    /// (a build, say) that would skew the run.
    pub(crate) other_user_s: f64,
}

pub(crate) fn mark(
    churn: &Churn,
    tracer: Option<&Tracer>,
    receiver: Option<&otlp::Receiver>,
) -> Result<Mark> {
    let (tracer_user, tracer_system) = match tracer {
        Some(t) => cpu_seconds(&t.pid().to_string())?,
        None => (0.0, 0.0),
    };
    let (own_user, _) = cpu_seconds("self")?;
    Ok(Mark {
        at: Instant::now(),
        completed: churn.completed(),
        prog: tracer
            .map(|t| prog_stats(t.prog_id))
            .transpose()?
            .unwrap_or_default(),
        cpu_s: tracer_user + tracer_system,
        received: receiver.map_or(0, otlp::Receiver::span_count),
        receiver_cpu_s: match receiver {
            Some(_) => thread_cpu_seconds(otlp::RECEIVER_THREAD)?,
            None => 0.0,
        },
        other_user_s: machine_user_seconds()? - own_user - tracer_user,
    })
}

pub(crate) fn throughput_run(mode: Mode, opts: &Options) -> Result<Row> {
    let receiver = matches!(mode, Mode::Otlp | Mode::OtlpHttp).then(otlp::Receiver::start_counting);
    let mut tracer = match (mode, &receiver) {
        (Mode::Baseline, _) => None,
        (Mode::Floor, _) => Some(Tracer::floor()?),
        (Mode::Text, _) => Some(Tracer::daemon(&[])?),
        (Mode::Otlp, Some(rx)) => Some(Tracer::daemon(&otlp_args("grpc", &rx.grpc_endpoint()))?),
        (Mode::OtlpHttp, Some(rx)) => Some(Tracer::daemon(&otlp_args(
            "http/protobuf",
            &rx.http_endpoint(),
        ))?),
        (Mode::Otlp | Mode::OtlpHttp, None) => unreachable!("a receiver is started for OTLP"),
        (Mode::Libbpf, _) => Some(Tracer::libbpf()?),
        (
            Mode::Memory
            | Mode::LinksChurn
            | Mode::LinksBulk
            | Mode::LinksWrk
            | Mode::Sampling
            | Mode::SamplingMemory
            | Mode::Incidents
            | Mode::FirstHop
            | Mode::KeepAliveMemory
            | Mode::Tls
            | Mode::H2c,
            _,
        ) => {
            bail!("not a throughput run")
        }
    };

    let churn = Churn::start(u64::MAX, opts.pin)?;
    thread::sleep(Duration::from_secs(opts.warmup));
    let start = mark(&churn, tracer.as_ref(), receiver.as_ref())?;
    thread::sleep(Duration::from_secs(opts.seconds));
    if let Some(tracer) = &mut tracer {
        tracer.ensure_running()?;
    }
    let end = mark(&churn, tracer.as_ref(), receiver.as_ref())?;
    let peak_rss_mib = tracer
        .as_ref()
        .map(|t| vm_mib(t.pid(), "VmHWM:"))
        .transpose()?;
    let (_, errors) = churn.stop();

    let secs = end.at.duration_since(start.at).as_secs_f64();
    let conns_per_s = (end.completed - start.completed) as f64 / secs;
    let mut row = Row {
        mode: mode.label(),
        conns_per_s,
        peak_rss_mib,
        // Tick-granular counters can make it slightly negative.
        other_cpu_pct: (100.0 * (end.other_user_s - start.other_user_s) / secs).max(0.0),
        ..Row::default()
    };
    if errors > 0 {
        row.notes.push(format!("{errors} connections failed"));
    }
    let Some(tracer) = tracer else {
        return Ok(row);
    };

    let events = end.prog.run_cnt - start.prog.run_cnt;
    let kernel_ns = end.prog.run_time_ns - start.prog.run_time_ns;
    row.events_per_s = Some(events as f64 / secs);
    row.ns_per_event = (events > 0).then(|| kernel_ns as f64 / events as f64);
    row.cpu_s_per_m_events = (events > 0).then(|| (end.cpu_s - start.cpu_s) / events as f64 * 1e6);

    let exited = tracer.stop()?;
    row.exit_s = Some(exited.took.as_secs_f64());
    row.lost = Some(lost_events(&exited.stderr));
    row.notes.extend(exited.problems());
    if let Some(receiver) = &receiver {
        row.spans = Spans::count(
            &exited,
            receiver,
            Window {
                secs,
                spans: end.received - start.received,
                tracer_cpu_s: end.cpu_s - start.cpu_s,
                receiver_cpu_s: end.receiver_cpu_s - start.receiver_cpu_s,
            },
        );
    }
    Ok(row)
}

pub(crate) fn otlp_args(protocol: &str, endpoint: &str) -> Vec<String> {
    [
        "--otlp-protocol",
        protocol,
        "--otlp-endpoint",
        endpoint,
        "--shutdown-timeout",
        "30",
    ]
    .map(String::from)
    .to_vec()
}

/// The receiver's count once it reaches `expected` or stops moving (the daemon
/// has exited, so anything still coming is already on the wire).
pub(crate) fn settled_count(receiver: &otlp::Receiver, expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = receiver.span_count();
    while last < expected && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(200));
        let now = receiver.span_count();
        if now == last {
            break;
        }
        last = now;
    }
    last
}
