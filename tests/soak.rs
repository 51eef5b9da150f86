//! A long run: steady connection churn while the collector keeps going away and
//! coming back. `OTEL_TCPSTATES_SOAK_SECS` sets how long (default 60 s).
mod support;

use std::{
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use support::{
    load::{
        self, CLIENT_SPANS, CLIENT_TRANSITIONS, Churn, RssSampler, Server, Stats, Summary, rss_kib,
        wait_until,
    },
    otlp::Receiver,
    *,
};

/// Connections per second, from two clients: steady, well within what the
/// (unoptimized) daemon exports, so the collector's absence is what is tested.
const PER_SECOND: f64 = 1500.0;
/// The collector's cycle: up this long, then down this long.
const UP: Duration = Duration::from_secs(6);
const DOWN: Duration = Duration::from_secs(4);
/// Memory is compared after this: the queue, caches and allocator arenas fill up
/// in the first seconds.
const WARM_UP: Duration = Duration::from_secs(10);
/// What the peak may grow from the first half of the run to the second: allocator
/// noise, not a leak (a leak of even 100 bytes per connection is ~4 MiB a minute).
const SLACK_KIB: u64 = 8 * 1024;

/// The daemon traces only the churn's client sockets (`-D` the server's port), each
/// of which makes 3 transitions (CLOSE -> SYN_SENT -> ESTABLISHED -> CLOSE, the
/// close a reset) and 3 spans (SYN_SENT, ESTABLISHED, the root). So, exactly, with
/// N connections made:
///
/// - events seen + lost == 3 N, and none lost at this rate;
/// - sessions started == N, none evicted, none open at exit;
/// - spans produced == 3 N;
/// - exported + failed + dropped + cut off == produced;
/// - exported <= spans the receivers got <= exported + failed (a request answered
///   is counted by the receiver first; one cut off by the receiver going away may
///   have been counted by it, and then failed).
///
/// Also: the counters of the stats lines never go down; each collector instance
/// gets spans and each outage's end is said ("works again"); the daemon never
/// exits on its own, exits 0 on SIGTERM, and its peak RSS over the second half of
/// the run is within [`SLACK_KIB`] of the first half's.
#[test]
fn soak_with_a_flapping_collector() {
    if !root_or_skip("soak_with_a_flapping_collector") {
        return;
    }
    let duration = Duration::from_secs(
        std::env::var("OTEL_TCPSTATES_SOAK_SECS")
            .ok()
            .map(|s| s.parse().expect("OTEL_TCPSTATES_SOAK_SECS: seconds"))
            .unwrap_or(60),
    );
    assert!(
        duration >= WARM_UP + UP + DOWN,
        "a soak shorter than {:?} compares nothing",
        WARM_UP + UP + DOWN
    );
    // Below the ephemeral range: no client connection takes them while it is down.
    let (grpc_port, http_port) = (load::quiet_port(), load::quiet_port());
    let mut rx = Some(Receiver::start_counting_at(grpc_port, http_port));
    // Spans each collector instance got, in order.
    let mut received_by_phase = Vec::new();
    let server = Server::start();
    let port = server.port().to_string();
    let endpoint = format!("http://127.0.0.1:{grpc_port}");
    let tracer = Tracer::start_release(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--otlp-protocol",
            "grpc",
            "-D",
            &port,
            "--stats-interval",
            "5",
        ],
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000"),
        ],
    );
    let pid = tracer.pid();
    let rss = RssSampler::start(pid, Duration::from_secs(1));
    let churn = Churn::start(server.addr(), 2, Some(PER_SECOND), None);
    let started = Instant::now();
    let mut outages = 0;
    let mut phase_end = started + UP;
    while started.elapsed() < duration {
        assert!(
            rss_kib(pid).is_some(),
            "the daemon exited after {:?}: {:?}",
            started.elapsed(),
            tracer.stderr()
        );
        if Instant::now() >= phase_end {
            match rx.take() {
                Some(up) => {
                    // Closes its listeners and connections.
                    received_by_phase.push(up.stop());
                    outages += 1;
                    phase_end += DOWN;
                }
                None => {
                    rx = Some(Receiver::start_counting_at(grpc_port, http_port));
                    phase_end += UP;
                }
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let churned = started.elapsed();
    let made = churn.stop();
    let rx = rx.unwrap_or_else(|| Receiver::start_counting_at(grpc_port, http_port));

    // Every event reached the daemon: the next stats line accounts for all of them.
    let expected_events = made.client_transitions();
    wait_until(
        "a stats line counting every event",
        Duration::from_secs(15),
        || Stats::last(&tracer.stderr()).is_some_and(|s| s.seen + s.lost >= expected_events),
    );
    let stats = Stats::last(&tracer.stderr()).unwrap();
    let done = tracer.stop_with(Signal::SIGTERM);
    // The daemon is gone; every span it counted as exported has been counted here.
    received_by_phase.push(rx.stop());
    let received: u64 = received_by_phase.iter().sum();
    let recovered = done
        .stderr
        .iter()
        .filter(|l| l.contains("works again"))
        .count();
    // Outages the daemon said began: those the test made, and on a loaded machine
    // also a collector too slow to answer within an attempt's time.
    let failures_said = done
        .stderr
        .iter()
        .filter(|l| l.contains("WARN export to") && l.contains(" failed ("))
        .count();
    let summary = Summary::parse(&done.stderr);
    let samples = rss.samples();

    let peak = |from: Duration, to: Duration| {
        samples
            .iter()
            .filter(|&&(t, _)| t >= from && t < to)
            .map(|&(_, kib)| kib)
            .max()
            .unwrap_or(0)
    };
    let middle = WARM_UP + (churned - WARM_UP) / 2;
    let (first_half, second_half) = (peak(WARM_UP, middle), peak(middle, churned));
    let n = made.connections;
    eprintln!(
        "soak {churned:.1?}: {n} connections ({} failed, {:.0}/s), {outages} outages, {failures_said} said, {recovered} recoveries said; \
         {received} spans received {received_by_phase:?}; RSS peak {first_half} KiB ({WARM_UP:?}..{middle:.0?}), \
         {second_half} KiB (..{churned:.0?}), overall {} KiB; exit after {:.2?}\n  {stats:?}\n  {summary:?}",
        made.failed,
        made.per_second(),
        rss.peak_kib(),
        done.took
    );

    assert!(done.status.success(), "{:?}", done.stderr);
    assert_eq!(made.failed, 0, "{made:?}");
    assert_eq!(stats.seen + stats.lost, n * CLIENT_TRANSITIONS, "{stats:?}");
    assert_eq!(stats.lost, 0, "{stats:?}");
    assert_eq!(
        (summary.sessions, summary.evicted, summary.open_at_exit),
        (n, 0, 0),
        "{summary:?}"
    );
    assert_eq!(summary.spans, n * CLIENT_SPANS, "{summary:?}");
    summary.assert_every_span_accounted();
    // Each outage was seen as failures, and export resumed after each by itself.
    assert!(summary.failed > 0, "{summary:?}");
    assert!(
        received_by_phase.iter().all(|&n| n > 0),
        "a collector instance got nothing: {received_by_phase:?}"
    );
    // Every outage the test made was seen, and every outage said was said to end.
    assert!(recovered >= outages, "{outages} outages: {:?}", done.stderr);
    assert_eq!(recovered, failures_said, "{:?}", done.stderr);
    assert!(
        summary.exported <= received && received <= summary.exported + summary.failed,
        "{received} spans received vs {summary:?}"
    );
    // The counters only ever grow from one stats line to the next.
    let lines = Stats::all(&done.stderr);
    for pair in lines.windows(2) {
        for ((name, before), (_, after)) in
            pair[0].cumulative().into_iter().zip(pair[1].cumulative())
        {
            assert!(after >= before, "{name} went down: {pair:#?}");
        }
    }
    assert!(
        second_half <= first_half + SLACK_KIB,
        "RSS grew: peak {first_half} KiB until {middle:?}, then {second_half} KiB"
    );
}
