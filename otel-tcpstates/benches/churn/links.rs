//! What span links cost (issue 13): the daemon exporting OTLP/gRPC to a receiver in
//! this process, once with `--no-links` and once with links (its `cgroup_skb`
//! programs `http_egress` and `http_ingress` on the cgroup v2 root), side by side
//! under three workloads: the churn, one bulk loopback connection (at least 1 GiB
//! measured), and wrk against nginx over keep-alive: without a header, with one
//! fixed W3C `traceparent` on every request (it repeats on each connection: a
//! socket makes at most 1 + 4 `tcp.request` spans of it), and with a distinct
//! sampled `traceparent` on every request (each makes a `tcp.request` span per end
//! of its connection, two on loopback). Per run: the workload's rate, the packet
//! programs' runs/s and ns per run (`bpftool`, `kernel.bpf_stats_enabled`), the
//! daemon's CPU; under wrk, the `tcp.request` spans and links that reached the
//! receiver from the measured window and the daemon's CPU per request span; then
//! on ÷ off against the goals.

use std::{
    collections::HashSet,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{
    Churn, DAEMON_PROG, Exited, Mode, Options, ProgStats, Tracer,
    bulk::Bulk,
    cpu_seconds, lost_events, machine_user_seconds, median,
    nginx::{Nginx, Requests},
    otlp, otlp_args, prog_stats, progs, settled_count, summary, thread_cpu_seconds,
};

/// bpftool's names for the daemon's packet programs, in the table's order.
const PACKET_PROGS: [&str; 2] = ["http_egress", "http_ingress"];
/// The header wrk sends on every request in the fixed-traceparent case.
const TRACEPARENT: &str = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
/// The span the daemon makes of each sampled request (per end of its connection).
const REQUEST_SPAN: &str = "tcp.request";
/// After a wrk run, the receiver's counts of request spans and links are final
/// once they have not moved for this long (the daemon exports every second)...
const SETTLE_QUIET: Duration = Duration::from_millis(1500);
/// ...or once this much has passed (noted).
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// How long the packet programs may take to show up once the daemon traces.
const PROGS_TIMEOUT: Duration = Duration::from_secs(10);
/// The bulk window goes on until at least this much has moved...
const BULK_MIN_BYTES: u64 = 1 << 30;
/// ...but not longer than this.
const BULK_LIMIT: Duration = Duration::from_secs(120);
/// The gap under which two rates are "within noise" (see BENCHMARKS.md, Noise).
const NOISE: f64 = 0.05;
/// Other processes' CPU (% of one CPU) over which a run is not a fair measurement:
/// on two cores, a build or a test elsewhere takes much of the workload's share.
const BUSY_PCT: f64 = 10.0;

/// One measured workload under one daemon.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Case {
    Churn,
    Bulk,
    Wrk,
    /// One fixed traceparent on every request: mostly repeats.
    WrkFixed,
    /// A distinct sampled traceparent on every request.
    WrkTraceparents,
}

impl Case {
    fn of(mode: Mode) -> &'static [Case] {
        match mode {
            Mode::LinksChurn => &[Case::Churn],
            Mode::LinksBulk => &[Case::Bulk],
            Mode::LinksWrk => &[Case::Wrk, Case::WrkFixed, Case::WrkTraceparents],
            _ => &[],
        }
    }

    fn label(self) -> &'static str {
        match self {
            Case::Churn => "churn, conns/s",
            Case::Bulk => "bulk, 1 connection, GB/s",
            Case::Wrk => "wrk → nginx, no header, requests/s",
            Case::WrkFixed => {
                "wrk → nginx, one fixed traceparent on every request (repeats), requests/s"
            }
            Case::WrkTraceparents => {
                "wrk → nginx, a distinct sampled traceparent on every request, requests/s"
            }
        }
    }

    /// What wrk sends (wrk cases only).
    fn requests(self) -> Option<Requests> {
        match self {
            Case::Wrk => Some(Requests::Plain),
            Case::WrkFixed => Some(Requests::Header(TRACEPARENT)),
            Case::WrkTraceparents => Some(Requests::DistinctTraceparents),
            Case::Churn | Case::Bulk => None,
        }
    }

    fn digits(self) -> usize {
        match self {
            Case::Bulk => 2,
            _ => 0,
        }
    }

    /// The least on ÷ off the issue accepts, and how it says so.
    fn goal(self) -> Option<(f64, &'static str)> {
        match self {
            Case::Bulk => Some((0.97, "bulk: GB/s on ÷ off ≥ 0.97")),
            Case::Churn => Some((1.0 - NOISE, "churn: conns/s on ÷ off within noise (≥ 0.95)")),
            Case::WrkTraceparents => Some((
                0.95,
                "wrk → nginx, a distinct sampled traceparent on every request: requests/s \
                 on ÷ off ≥ 0.95",
            )),
            Case::Wrk | Case::WrkFixed => None,
        }
    }
}

/// One case under one daemon.
struct Run {
    case: Case,
    round: u64,
    links: bool,
    /// None: it failed (see the notes).
    rate: Option<f64>,
    usage: Option<Usage>,
    /// What reached the receiver from the window (wrk cases only).
    requests: Option<RequestSpans>,
    notes: Vec<String>,
}

/// A wrk window's requests and what the daemon made of them, counted once the
/// receiver's counts settled after it (the warm-up's settled before it).
#[derive(Clone, Copy, Debug)]
struct RequestSpans {
    /// Requests wrk completed in the window.
    requests: u64,
    /// `tcp.request` spans received.
    spans: u64,
    /// Links received on spans, and those the daemon left out
    /// (`dropped_links_count`).
    links: (u64, u64),
    /// The daemon's CPU seconds from the window's start until the counts settled
    /// (the window, and the export of what it made).
    daemon_cpu_s: f64,
    /// The bench's receiver thread's CPU seconds over the same span.
    receiver_cpu_s: f64,
}

impl RequestSpans {
    /// The daemon's CPU µs per request span (None: no request span).
    fn daemon_us_per_span(&self) -> Option<f64> {
        (self.spans > 0).then(|| 1e6 * self.daemon_cpu_s / self.spans as f64)
    }
}

/// Runs each links mode `opts.link_rounds` times off and on (off first in odd
/// rounds, on first in even ones), then prints the table and the goals.
pub(super) fn run(modes: &[Mode], opts: &Options) {
    let mut runs = Vec::new();
    for &mode in modes {
        for round in 1..=opts.link_rounds {
            let order = match round % 2 {
                1 => [false, true],
                _ => [true, false],
            };
            for links in order {
                let state = if links { "on" } else { "off" };
                eprintln!("[churn] {}, links {state}, round {round} ...", mode.label());
                let done = under_daemon(mode, links, round, opts);
                for r in &done {
                    let rate = r.rate.map_or("failed".into(), |v| {
                        format!("{v:.digits$}", digits = r.case.digits())
                    });
                    eprintln!("[churn] {}, links {state}: {rate}", r.case.label());
                }
                runs.extend(done);
            }
        }
    }
    print(&runs, opts);
}

/// One daemon (links on or off) through the mode's cases.
fn under_daemon(mode: Mode, links: bool, round: u64, opts: &Options) -> Vec<Run> {
    let cases = Case::of(mode);
    let failed = |err: anyhow::Error| {
        cases
            .iter()
            .map(|&case| Run {
                case,
                round,
                links,
                rate: None,
                usage: None,
                requests: None,
                notes: vec![format!("failed: {err:#}")],
            })
            .collect()
    };
    // Spans are never stored: the churn makes ~150k spans/s, wrk with distinct
    // traceparents two per request. Under wrk they are counted by name.
    let daemon = match Daemon::start(links, mode == Mode::LinksWrk) {
        Ok(daemon) => daemon,
        Err(err) => return failed(err),
    };
    let measured = match mode {
        Mode::LinksChurn => churn(&daemon, opts).map(|m| vec![m]),
        Mode::LinksBulk => bulk(&daemon, opts).map(|m| vec![m]),
        Mode::LinksWrk => wrk(&daemon, opts),
        _ => unreachable!("{} is not a links run", mode.name()),
    };
    let measured = match measured {
        Ok(measured) => measured,
        Err(err) => {
            let _ = daemon.stop();
            return failed(err);
        }
    };
    let stopped = daemon.stop();
    let mut runs: Vec<Run> = cases
        .iter()
        .zip(measured)
        .map(|(&case, mut m)| {
            if !m.usage.foreign.is_empty() {
                m.notes.push(format!(
                    "another tracer's programs were loaded during the window (ids {:?}): \
                     they ran on these packets and events too",
                    m.usage.foreign
                ));
            }
            (case, m)
        })
        .map(|(case, m)| Run {
            case,
            round,
            links,
            rate: Some(m.rate),
            usage: Some(m.usage),
            requests: m.requests,
            notes: m.notes,
        })
        .collect();
    if let Some(last) = runs.last_mut() {
        last.notes.extend(stopped.notes);
    }
    runs
}

// ---------------------------------------------------------------------------------
// The daemon, with or without its packet programs.

struct Daemon {
    tracer: Tracer,
    receiver: otlp::Receiver,
    links: bool,
    /// The receiver counts spans by name, and links.
    by_name: bool,
    /// The maps of its tracepoint program: its packet programs share them (other
    /// daemons' programs, from tests running alongside, say, do not).
    maps: HashSet<u64>,
    /// The packet programs' ids, in [`PACKET_PROGS`] order (links on).
    packet_progs: Vec<u64>,
}

struct Stopped {
    notes: Vec<String>,
}

/// The receiver's counts once settled, and the CPU spent until then.
struct Settled {
    request_spans: u64,
    links: (u64, u64),
    daemon_cpu_s: f64,
    receiver_cpu_s: f64,
    /// Still moving after [`SETTLE_LIMIT`].
    unsettled: bool,
}

impl Daemon {
    /// The daemon exporting OTLP/gRPC to a fresh receiver (counting spans, and
    /// with `by_name` their names and links), with `--links` or `--no-links`;
    /// returns once its tracepoint program runs and, with links, its packet
    /// programs are loaded.
    fn start(links: bool, by_name: bool) -> Result<Daemon> {
        let receiver = match by_name {
            true => otlp::Receiver::start_counting_by_name(),
            false => otlp::Receiver::start_counting(),
        };
        let mut args = otlp_args("grpc", &receiver.grpc_endpoint());
        args.push(if links { "--links" } else { "--no-links" }.to_owned());
        let tracer = Tracer::daemon(&args)?;
        let maps = progs()?
            .into_iter()
            .find(|p| p.id == tracer.prog_id)
            .context("the daemon's tracepoint program is gone")?
            .maps;
        let mut daemon = Daemon {
            tracer,
            receiver,
            links,
            by_name,
            maps,
            packet_progs: Vec::new(),
        };
        if links {
            daemon.packet_progs = daemon.wait_for_packet_progs()?;
        }
        Ok(daemon)
    }

    fn wait_for_packet_progs(&mut self) -> Result<Vec<u64>> {
        let deadline = Instant::now() + PROGS_TIMEOUT;
        loop {
            let found = self.own_packet_progs()?;
            let ids: Vec<u64> = PACKET_PROGS
                .iter()
                .filter_map(|name| found.iter().find(|(n, _)| n == name).map(|&(_, id)| id))
                .collect();
            if ids.len() == PACKET_PROGS.len() {
                return Ok(ids);
            }
            self.tracer.ensure_running()?;
            if Instant::now() > deadline {
                bail!(
                    "links on, but the daemon's packet programs {PACKET_PROGS:?} were not \
                     loaded within {PROGS_TIMEOUT:?} (found {found:?})"
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Its packet programs, by name: (name, id).
    fn own_packet_progs(&self) -> Result<Vec<(String, u64)>> {
        Ok(progs()?
            .into_iter()
            .filter(|p| PACKET_PROGS.contains(&p.name.as_str()) && !p.maps.is_disjoint(&self.maps))
            .map(|p| (p.name, p.id))
            .collect())
    }

    /// Another tracer's programs (tracepoint or packet), by id: they would run on
    /// the workload's packets and socket events too, whatever this daemon does.
    fn foreign_progs(&self) -> Result<Vec<u64>> {
        Ok(progs()?
            .into_iter()
            .filter(|p| {
                (p.name == DAEMON_PROG || PACKET_PROGS.contains(&p.name.as_str()))
                    && p.maps.is_disjoint(&self.maps)
            })
            .map(|p| p.id)
            .collect())
    }

    /// Counters at one end of a measured window. `workload_user_s`: user CPU of
    /// the workload's own processes (nginx), which is not "other" work.
    fn mark(&self, workload_user_s: f64) -> Result<Mark> {
        let packets = self
            .packet_progs
            .iter()
            .map(|&id| prog_stats(id))
            .collect::<Result<_>>()?;
        let foreign = self.foreign_progs()?;
        let (daemon_user, daemon_system) = cpu_seconds(&self.tracer.pid().to_string())?;
        let (own_user, _) = cpu_seconds("self")?;
        // Reaped children: wrk, and bpftool (above).
        let children_user = children_user_seconds();
        Ok(Mark {
            at: Instant::now(),
            packets,
            foreign,
            daemon_cpu_s: daemon_user + daemon_system,
            receiver_cpu_s: thread_cpu_seconds(otlp::RECEIVER_THREAD)?,
            other_user_s: machine_user_seconds()?
                - own_user
                - daemon_user
                - children_user
                - workload_user_s,
        })
    }

    /// Once the receiver's request span and link counts have not moved for
    /// [`SETTLE_QUIET`] (or after [`SETTLE_LIMIT`]): they, and the daemon's and
    /// the receiver's CPU seconds then.
    fn settled(&self) -> Result<Settled> {
        let counts = || {
            (
                self.receiver.span_count_named(REQUEST_SPAN),
                self.receiver.link_count(),
            )
        };
        let start = Instant::now();
        let mut last = counts();
        let mut since = Instant::now();
        let unsettled = loop {
            if since.elapsed() >= SETTLE_QUIET {
                break false;
            }
            if start.elapsed() >= SETTLE_LIMIT {
                break true;
            }
            thread::sleep(Duration::from_millis(100));
            let now = counts();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        };
        let (user, system) = cpu_seconds(&self.tracer.pid().to_string())?;
        Ok(Settled {
            request_spans: last.0,
            links: last.1,
            daemon_cpu_s: user + system,
            receiver_cpu_s: thread_cpu_seconds(otlp::RECEIVER_THREAD)?,
            unsettled,
        })
    }

    /// Stops the daemon; notes on anything amiss: packet programs with links off
    /// (or left behind after the exit), lost events, spans not delivered, links
    /// or request spans with links off, no link with links on (under wrk).
    fn stop(self) -> Stopped {
        let mut notes = Vec::new();
        if !self.links {
            match self.own_packet_progs() {
                Ok(found) if !found.is_empty() => {
                    notes.push(format!("--no-links, yet packet programs loaded: {found:?}"))
                }
                Ok(_) => {}
                Err(err) => notes.push(format!("bpftool: {err:#}")),
            }
        }
        let exited = match self.tracer.stop() {
            Ok(exited) => exited,
            Err(err) => {
                notes.push(format!("stopping the daemon: {err:#}"));
                return Stopped { notes };
            }
        };
        notes.extend(delivery(&exited, &self.receiver));
        if lingering(&self.packet_progs) {
            notes.push("its packet programs still loaded 3 s after it exited".into());
        }
        // Counted (by name, and links) under wrk only.
        let (n, d) = self.receiver.link_count();
        let requests = self.receiver.span_count_named(REQUEST_SPAN);
        if !self.links && n + d + requests > 0 {
            notes.push(format!(
                "--no-links, yet {n} links ({d} dropped) and {requests} {REQUEST_SPAN} \
                 spans received"
            ));
        }
        if self.links && self.by_name && n + d == 0 {
            notes.push("links on, but no link received".into());
        }
        Stopped { notes }
    }
}

/// Any of `ids` still loaded 3 s after its daemon's exit.
fn lingering(ids: &[u64]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let Ok(loaded) = progs() else {
            return false;
        };
        if !loaded.iter().any(|p| ids.contains(&p.id)) {
            return false;
        }
        if Instant::now() > deadline {
            return true;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon's account of its spans against the receiver's, when they differ.
fn delivery(exited: &Exited, receiver: &otlp::Receiver) -> Vec<String> {
    let mut notes = exited.problems();
    let lost = lost_events(&exited.stderr);
    if lost > 0 {
        notes.push(format!("{lost} events lost"));
    }
    if let Some(sum) = summary(&exited.stderr) {
        let received = settled_count(receiver, sum.exported);
        let dropped = sum.failed + sum.not_sent;
        if dropped > 0 || received != sum.exported {
            notes.push(format!(
                "spans: {} produced, {} exported, {received} received, {dropped} dropped",
                sum.produced, sum.exported
            ));
        }
    }
    notes
}

/// User CPU seconds of this process's reaped children (wrk, bpftool).
fn children_user_seconds() -> f64 {
    // SAFETY: getrusage writes the struct it is given, nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    usage.ru_utime.tv_sec as f64 + usage.ru_utime.tv_usec as f64 / 1e6
}

// ---------------------------------------------------------------------------------
// Measured windows.

struct Mark {
    at: Instant,
    /// Per packet program, in [`PACKET_PROGS`] order; empty with links off.
    packets: Vec<ProgStats>,
    /// Other tracers' programs loaded then (see [`Daemon::foreign_progs`]).
    foreign: Vec<u64>,
    daemon_cpu_s: f64,
    /// The bench's OTLP receiver thread (user + system).
    receiver_cpu_s: f64,
    other_user_s: f64,
}

/// What the kernel and the daemon spent over a window.
struct Usage {
    /// Per packet program: runs/s (packets through it), ns per run.
    packets: Vec<(f64, Option<f64>)>,
    /// The packet programs' run time, % of one CPU (None: none loaded).
    packets_cpu_pct: Option<f64>,
    /// The daemon's CPU (all threads), % of one CPU.
    daemon_cpu_pct: f64,
    /// The bench's OTLP receiver thread's CPU, % of one CPU: the spans' cost at
    /// the receiving end, on the same two cores.
    receiver_cpu_pct: f64,
    /// User CPU of the rest of the machine, % of one CPU.
    other_cpu_pct: f64,
    /// Other tracers' programs loaded at either end of the window.
    foreign: Vec<u64>,
}

impl Usage {
    fn between(a: &Mark, b: &Mark) -> Usage {
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let packets = a
            .packets
            .iter()
            .zip(&b.packets)
            .map(|(a, b)| {
                let runs = b.run_cnt - a.run_cnt;
                let ns = b.run_time_ns - a.run_time_ns;
                (
                    runs as f64 / secs,
                    (runs > 0).then(|| ns as f64 / runs as f64),
                )
            })
            .collect();
        let packets_ns: u64 = a
            .packets
            .iter()
            .zip(&b.packets)
            .map(|(a, b)| b.run_time_ns - a.run_time_ns)
            .sum();
        Usage {
            packets,
            packets_cpu_pct: (!a.packets.is_empty())
                .then(|| 100.0 * packets_ns as f64 / 1e9 / secs),
            daemon_cpu_pct: 100.0 * (b.daemon_cpu_s - a.daemon_cpu_s) / secs,
            receiver_cpu_pct: 100.0 * (b.receiver_cpu_s - a.receiver_cpu_s) / secs,
            // Tick-granular counters can make it slightly negative.
            other_cpu_pct: (100.0 * (b.other_user_s - a.other_user_s) / secs).max(0.0),
            foreign: a
                .foreign
                .iter()
                .chain(&b.foreign)
                .copied()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect(),
        }
    }
}

struct Measured {
    rate: f64,
    usage: Usage,
    requests: Option<RequestSpans>,
    notes: Vec<String>,
}

/// The churn (as in the throughput runs): connections per second.
fn churn(daemon: &Daemon, opts: &Options) -> Result<Measured> {
    let churn = Churn::start(u64::MAX, opts.pin)?;
    thread::sleep(Duration::from_secs(opts.warmup));
    let a = daemon.mark(0.0)?;
    let (t0, c0) = (Instant::now(), churn.completed());
    thread::sleep(Duration::from_secs(opts.link_seconds));
    let (t1, c1) = (Instant::now(), churn.completed());
    let b = daemon.mark(0.0)?;
    let (_, errors) = churn.stop();
    let mut notes = Vec::new();
    if errors > 0 {
        notes.push(format!("{errors} connections failed"));
    }
    Ok(Measured {
        rate: (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64(),
        usage: Usage::between(&a, &b),
        requests: None,
        notes,
    })
}

/// One connection moving data as fast as it can: GB/s (10^9 bytes) over at least
/// `opts.link_seconds` and at least [`BULK_MIN_BYTES`].
fn bulk(daemon: &Daemon, opts: &Options) -> Result<Measured> {
    let bulk = Bulk::start(opts.pin)?;
    thread::sleep(Duration::from_secs(opts.warmup));
    let a = daemon.mark(0.0)?;
    let (t0, b0) = (Instant::now(), bulk.received());
    thread::sleep(Duration::from_secs(opts.link_seconds));
    while bulk.received() - b0 < BULK_MIN_BYTES && t0.elapsed() < BULK_LIMIT {
        thread::sleep(Duration::from_millis(50));
    }
    let (t1, b1) = (Instant::now(), bulk.received());
    let b = daemon.mark(0.0)?;
    bulk.stop()?;
    let bytes = b1 - b0;
    let mut notes = Vec::new();
    if bytes < BULK_MIN_BYTES {
        notes.push(format!(
            "only {:.2} GiB moved within {BULK_LIMIT:?}",
            bytes as f64 / (1u64 << 30) as f64
        ));
    }
    Ok(Measured {
        rate: bytes as f64 / t1.duration_since(t0).as_secs_f64() / 1e9,
        usage: Usage::between(&a, &b),
        requests: None,
        notes,
    })
}

/// wrk against a fresh nginx: without a header, with the fixed traceparent, then
/// with distinct ones; requests/s. Around each measured window the receiver's
/// counts settle (the warm-up's spans before it, the window's after it), so that
/// the request spans and links counted are the window's own.
/// With pinning, nginx runs on CPU 0 and wrk on CPU 1 (each one thread); the
/// daemon and the receiver are left to the scheduler.
fn wrk(daemon: &Daemon, opts: &Options) -> Result<Vec<Measured>> {
    let (nginx_cpu, wrk_cpu) = match opts.pin {
        true => (Some(0), Some(1)),
        false => (None, None),
    };
    let nginx = Nginx::start(nginx_cpu)?;
    let mut measured = Vec::new();
    for case in Case::of(Mode::LinksWrk) {
        let requests = case.requests().expect("a wrk case");
        if opts.warmup > 0 {
            nginx.wrk(opts.warmup, requests, wrk_cpu)?;
        }
        let before = daemon.settled()?;
        let a = daemon.mark(nginx.cpu_seconds().0)?;
        let result = nginx
            .wrk(opts.link_seconds, requests, wrk_cpu)
            .context("wrk")?;
        let b = daemon.mark(nginx.cpu_seconds().0)?;
        let after = daemon.settled()?;
        let mut notes = result.errors;
        if result.requests == 0 {
            notes.push("wrk made no request".into());
        }
        if before.unsettled || after.unsettled {
            notes.push(format!(
                "the receiver's counts still moved {SETTLE_LIMIT:?} after a wrk run: \
                 request spans and links not the window's alone"
            ));
        }
        measured.push(Measured {
            rate: result.requests_per_s,
            usage: Usage::between(&a, &b),
            requests: Some(RequestSpans {
                requests: result.requests,
                spans: after.request_spans - before.request_spans,
                links: (
                    after.links.0 - before.links.0,
                    after.links.1 - before.links.1,
                ),
                daemon_cpu_s: after.daemon_cpu_s - a.daemon_cpu_s,
                receiver_cpu_s: after.receiver_cpu_s - before.receiver_cpu_s,
            }),
            notes,
        });
    }
    Ok(measured)
}

// ---------------------------------------------------------------------------------
// Output.

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The mean rate of a case's runs with links on or off (failed runs left out).
fn mean_rate(runs: &[Run], case: Case, links: bool) -> Option<f64> {
    mean(
        runs.iter()
            .filter(|r| r.case == case && r.links == links)
            .filter_map(|r| r.rate),
    )
}

/// On ÷ off within one round: the two runs next to each other in time.
fn round_ratio(runs: &[Run], case: Case, round: u64) -> Option<f64> {
    let rate = |links| {
        runs.iter()
            .find(|r| r.case == case && r.round == round && r.links == links)
            .and_then(|r| r.rate)
    };
    rate(true).zip(rate(false)).map(|(on, off)| on / off)
}

fn print(runs: &[Run], opts: &Options) {
    let placement = match opts.pin {
        true => {
            "churn and bulk threads on CPU 0, nginx on CPU 0, wrk on CPU 1, the daemon not pinned"
        }
        false => "nothing pinned",
    };
    println!(
        "\nLinks off vs on: the daemon exporting OTLP/gRPC to a receiver in the bench, with \
         --no-links and with links (packet programs {} and {} on the cgroup v2 root); {} s \
         measured per run (bulk: and at least 1 GiB) after {} s warm-up; {} round(s), off \
         first in odd rounds; {placement}",
        PACKET_PROGS[0], PACKET_PROGS[1], opts.link_seconds, opts.warmup, opts.link_rounds
    );
    println!(
        "\n| workload | links | round | rate | on ÷ off (round) | {e} pkts/s | {e} ns/pkt | {i} pkts/s | {i} ns/pkt | packet programs CPU % | daemon CPU % | receiver CPU % | other CPU % |",
        e = PACKET_PROGS[0],
        i = PACKET_PROGS[1],
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    for r in runs {
        let digits = r.case.digits();
        let ratio = r
            .links
            .then(|| round_ratio(runs, r.case, r.round))
            .flatten();
        let packet = |i: usize| r.usage.as_ref().and_then(|u| u.packets.get(i));
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.case.label(),
            if r.links { "on" } else { "off" },
            r.round,
            opt(r.rate, digits),
            opt(ratio, 3),
            opt(packet(0).map(|p| p.0), 0),
            opt(packet(0).and_then(|p| p.1), 0),
            opt(packet(1).map(|p| p.0), 0),
            opt(packet(1).and_then(|p| p.1), 0),
            opt(r.usage.as_ref().and_then(|u| u.packets_cpu_pct), 1),
            opt(r.usage.as_ref().map(|u| u.daemon_cpu_pct), 0),
            opt(r.usage.as_ref().map(|u| u.receiver_cpu_pct), 0),
            opt(r.usage.as_ref().map(|u| u.other_cpu_pct), 0),
        );
    }
    print_requests(runs);
    for r in runs.iter().filter(|r| !r.notes.is_empty()) {
        let state = if r.links { "on" } else { "off" };
        println!(
            "note: {}, links {state}, round {}: {}",
            r.case.label(),
            r.round,
            r.notes.join("; ")
        );
    }

    let mut cases: Vec<Case> = Vec::new();
    for r in runs {
        if !cases.contains(&r.case) {
            cases.push(r.case);
        }
    }
    println!(
        "\nGoals: pass or fail on the median of the rounds' on ÷ off (each round's two runs \
         are next to each other in time; the median shrugs off one disturbed window)."
    );
    println!(
        "\n| goal | links off (mean) | links on (mean) | on ÷ off (means) | rounds' on ÷ off: median (min–max) | other CPU % (most) | |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for case in cases {
        let off = mean_rate(runs, case, false);
        let on = mean_rate(runs, case, true);
        let means = on.zip(off).map(|(on, off)| on / off);
        let mut rounds: Vec<f64> = (1..=opts.link_rounds)
            .filter_map(|round| round_ratio(runs, case, round))
            .collect();
        rounds.sort_by(f64::total_cmp);
        let median = (!rounds.is_empty()).then(|| {
            let mid = rounds.len() / 2;
            match rounds.len() % 2 {
                1 => rounds[mid],
                _ => (rounds[mid - 1] + rounds[mid]) / 2.0,
            }
        });
        let spread = match (median, rounds.first(), rounds.last()) {
            (Some(median), Some(least), Some(most)) if rounds.len() > 1 => {
                format!("{median:.3} ({least:.3}–{most:.3})")
            }
            (Some(median), _, _) => format!("{median:.3}"),
            _ => "-".into(),
        };
        let busiest = runs
            .iter()
            .filter(|r| r.case == case)
            .filter_map(|r| r.usage.as_ref().map(|u| u.other_cpu_pct))
            .fold(None, |most: Option<f64>, v| {
                Some(most.map_or(v, |m| m.max(v)))
            });
        let mut verdict = match (case.goal(), median) {
            (Some((least, _)), Some(median)) if median >= least => "pass".to_owned(),
            (Some(_), Some(_)) => "**FAIL**".to_owned(),
            (Some(_), None) => "not measured".to_owned(),
            (None, _) => "-".to_owned(),
        };
        if busiest.is_some_and(|pct| pct > BUSY_PCT) && case.goal().is_some() {
            verdict += " (other work on the machine: not a fair measurement)";
        }
        let goal = case
            .goal()
            .map_or(format!("{} (no goal)", case.label()), |(_, text)| {
                text.to_owned()
            });
        let digits = case.digits();
        println!(
            "| {goal} | {} | {} | {} | {spread} | {} | {verdict} |",
            opt(off, digits),
            opt(on, digits),
            opt(means, 3),
            opt(busiest, 0),
        );
    }
    print_request_summary(runs);
}

/// The wrk windows' requests and what reached the receiver from them.
fn print_requests(runs: &[Run]) {
    let wrk: Vec<(&Run, &RequestSpans)> = runs
        .iter()
        .filter_map(|r| r.requests.as_ref().map(|q| (r, q)))
        .collect();
    if wrk.is_empty() {
        return;
    }
    println!(
        "\nUnder wrk, per measured window: the `{REQUEST_SPAN}` spans and links that reached the \
         receiver (counted once its counts had not moved for {:.1} s after the warm-up and \
         after the window, so the window's own); links: on the connections' roots (64 \
         kept per socket, the rest counted as dropped) and each request span's link to its \
         connection; † from the window's start until then: the window and the export of \
         what it made; daemon µs per request span: distinct traceparents only.",
        SETTLE_QUIET.as_secs_f64()
    );
    println!(
        "\n| workload | links | round | wrk requests | {REQUEST_SPAN} spans | spans per request | links received (dropped) | daemon CPU s † | daemon µs per request span † | receiver CPU s † |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (r, q) in wrk {
        let per_request = (q.requests > 0).then(|| q.spans as f64 / q.requests as f64);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} ({}) | {:.2} | {} | {:.2} |",
            r.case.label(),
            if r.links { "on" } else { "off" },
            r.round,
            q.requests,
            q.spans,
            per_request.map_or("-".into(), |v| format!("{v:.2}")),
            q.links.0,
            q.links.1,
            q.daemon_cpu_s,
            // Elsewhere the daemon's CPU is not the request spans'.
            (r.case == Case::WrkTraceparents)
                .then(|| q.daemon_us_per_span())
                .flatten()
                .map_or("-".into(), |v| format!("{v:.1}")),
            q.receiver_cpu_s,
        );
    }
}

/// Distinct traceparents, links on: the request spans over all rounds and the
/// daemon's CPU per request span.
fn print_request_summary(runs: &[Run]) {
    let on: Vec<&RequestSpans> = runs
        .iter()
        .filter(|r| r.case == Case::WrkTraceparents && r.links)
        .filter_map(|r| r.requests.as_ref())
        .collect();
    if on.is_empty() {
        return;
    }
    let requests: u64 = on.iter().map(|q| q.requests).sum();
    let spans: u64 = on.iter().map(|q| q.spans).sum();
    let cpu_s: f64 = on.iter().map(|q| q.daemon_cpu_s).sum();
    let mut per_span: Vec<f64> = on.iter().filter_map(|q| q.daemon_us_per_span()).collect();
    per_span.sort_by(f64::total_cmp);
    let spread = match (per_span.first(), per_span.last()) {
        (Some(least), Some(most)) => format!(
            "median {:.1} µs ({least:.1}–{most:.1}) over {} window(s); all windows: {}",
            median(per_span.clone()),
            per_span.len(),
            match spans {
                0 => "-".to_owned(),
                _ => format!("{:.1} µs", 1e6 * cpu_s / spans as f64),
            }
        ),
        _ => "no request span".to_owned(),
    };
    println!(
        "\n{}, links on: {spans} `{REQUEST_SPAN}` spans received for {requests} requests \
         ({}), the daemon's CPU per request span (window and export): {spread}.",
        Case::WrkTraceparents.label(),
        match requests {
            0 => "-".to_owned(),
            _ => format!("{:.2} per request", spans as f64 / requests as f64),
        },
    );
}
