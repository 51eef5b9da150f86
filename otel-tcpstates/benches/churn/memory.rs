//! The memory run: many connections held at once, then a million sockets of churn.
use super::*;

/// RSS is sampled every this many sockets churned.
pub(crate) const SAMPLE_EVERY_SOCKETS: u64 = 100_000;
/// The churn part stops here even if it has not reached its count.
pub(crate) const MEMORY_CHURN_LIMIT: Duration = Duration::from_secs(240);
/// Time for the daemon to take in what the kernel has queued before a sample.
pub(crate) const SETTLE: Duration = Duration::from_secs(2);

pub(crate) struct Sample {
    pub(crate) phase: String,
    pub(crate) sockets: u64,
    pub(crate) at_s: f64,
    pub(crate) rss_mib: f64,
    /// Events the daemon has reported lost so far (it reports once a second).
    pub(crate) lost: u64,
}

/// The daemon exporting to a counting receiver, with the table full (65536 sockets
/// held open), then through a million sockets of churn; RSS sampled throughout.
pub(crate) fn memory_run(opts: &Options) -> Result<()> {
    let receiver = otlp::Receiver::start_counting();
    let endpoint = receiver.grpc_endpoint();
    let args = [
        &["--max-sockets".to_owned(), "65536".to_owned()][..],
        &otlp_args("grpc", &endpoint),
    ]
    .concat();
    let tracer = Tracer::daemon(&args)?;
    let mut samples = Samples::new(&tracer);
    samples.take("started", 0)?;

    // First the full table, on a fresh daemon: holders open their connections at a
    // pace the exporter keeps up with, so this is the table's cost, not a backlog's.
    let holders = Holders::start(opts.hold_connections)?;
    thread::sleep(SETTLE);
    let held = 2 * opts.hold_connections;
    samples.take(&format!("{held} sockets held open"), held)?;
    let peak_held = vm_mib(tracer.pid(), "VmHWM:")?;
    holders.release();
    thread::sleep(SETTLE);
    samples.take("released", held)?;

    // Then a million distinct sockets, two per connection, as fast as they come.
    let started = Instant::now();
    let churn = Churn::start(opts.memory_sockets.div_ceil(2), opts.pin)?;
    let mut next = SAMPLE_EVERY_SOCKETS;
    while !churn.finished() && started.elapsed() < MEMORY_CHURN_LIMIT {
        let sockets = 2 * churn.completed();
        if sockets >= next {
            samples.take("churn", held + sockets)?;
            next += SAMPLE_EVERY_SOCKETS;
        }
        thread::sleep(Duration::from_millis(5));
    }
    let churn_secs = started.elapsed().as_secs_f64();
    let (completed, errors) = churn.stop();
    let churned = 2 * completed;
    thread::sleep(SETTLE);
    samples.take("churn done", held + churned)?;
    let samples = samples.done();

    let peak = vm_mib(tracer.pid(), "VmHWM:")?;
    let exited = tracer.stop()?;
    println!("\nMemory run: --max-sockets 65536, OTLP/gRPC to the counting receiver");
    println!(
        "held {held} sockets open at once (peak RSS then {peak_held:.1} MiB), then churned \
         {churned} sockets in {churn_secs:.1} s ({:.0} conns/s, {errors} connections failed)",
        completed as f64 / churn_secs
    );
    print_samples(&samples);
    println!(
        "peak RSS (VmHWM) {peak:.1} MiB; events lost {}; exit took {:.1} s",
        lost_events(&exited.stderr),
        exited.took.as_secs_f64()
    );
    let whole_run = Window {
        secs: churn_secs,
        spans: 0,
        tracer_cpu_s: 0.0,
        receiver_cpu_s: 0.0,
    };
    if let Some(s) = Spans::count(&exited, &receiver, whole_run) {
        println!(
            "{} sockets traced, {} evicted; spans: {} produced, {} exported, {} received, \
             {} dropped",
            s.sockets, s.evicted, s.produced, s.exported, s.received, s.dropped
        );
    }
    for note in exited.problems() {
        println!("daemon: {note}");
    }
    Ok(())
}

/// RSS samples of the daemon, with the events it had reported lost by then.
pub(crate) struct Samples<'a> {
    pub(crate) tracer: &'a Tracer,
    pub(crate) started: Instant,
    pub(crate) taken: Vec<Sample>,
}

impl<'a> Samples<'a> {
    pub(crate) fn new(tracer: &'a Tracer) -> Self {
        Samples {
            tracer,
            started: Instant::now(),
            taken: Vec::new(),
        }
    }

    pub(crate) fn take(&mut self, phase: &str, sockets: u64) -> Result<()> {
        self.taken.push(Sample {
            phase: phase.to_owned(),
            sockets,
            at_s: self.started.elapsed().as_secs_f64(),
            rss_mib: vm_mib(self.tracer.pid(), "VmRSS:")?,
            lost: lost_events(&self.tracer.stderr_so_far()),
        });
        Ok(())
    }

    pub(crate) fn done(self) -> Vec<Sample> {
        self.taken
    }
}

pub(crate) fn print_samples(samples: &[Sample]) {
    println!("| phase | sockets so far | t (s) | RSS MiB | events lost so far |");
    println!("|---|---:|---:|---:|---:|");
    for s in samples {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} |",
            s.phase, s.sockets, s.at_s, s.rss_mib, s.lost
        );
    }
}
