//! A load generator's rate under the daemon run two ways (a part of it off,
//! then on), in alternating rounds: per window the rate, the `tcp.request`
//! spans that reached the receiver, the daemon's CPU and, with the part on,
//! its programs' runs and ns per run (`bpftool`, `kernel.bpf_stats_enabled`);
//! then the median of the rounds' on ÷ off against a goal. The TLS and HTTP/2
//! runs are this, each with its own load and programs.
use std::{thread, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{Options, Tracer, median, nginx::Wrk, otlp, otlp_args, prog_stats, progs};

const REQUEST_SPAN: &str = "tcp.request";
/// How long the part's programs may take to show up once the daemon traces.
const PROGRAMS_WAIT: Duration = Duration::from_secs(5);

/// What is compared.
pub(crate) struct Paired<'a> {
    /// Names the part in the progress lines and the table, e.g. "TLS part".
    pub(crate) what: &'static str,
    /// The table's words for off and on, e.g. "off" and "attached".
    pub(crate) states: [&'static str; 2],
    /// The daemon's flags besides its exporter's, off and on.
    pub(crate) args: [&'a [&'a str]; 2],
    /// The programs the part loads (all of them when on, none when off).
    pub(crate) programs: &'a [&'a str],
    /// One window of the load, this many seconds long.
    pub(crate) load: &'a dyn Fn(u64) -> Result<Wrk>,
}

pub(crate) struct Run {
    pub(crate) on: bool,
    pub(crate) requests_per_s: f64,
    pub(crate) requests: u64,
    pub(crate) request_spans: u64,
    /// Per program of the part that ran: (name, runs, ns per run).
    pub(crate) programs: Vec<(String, u64, f64)>,
    pub(crate) daemon_cpu_s: f64,
    pub(crate) notes: Vec<String>,
}

/// Runs `opts.link_rounds` rounds of off and on (off first in odd rounds).
pub(crate) fn rounds(opts: &Options, paired: &Paired<'_>) -> Vec<(u64, Run)> {
    let mut runs = Vec::new();
    for round in 1..=opts.link_rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for on in order {
            let state = paired.states[usize::from(on)];
            eprintln!("[churn] {} {state}, round {round} ...", paired.what);
            match one(opts, paired, on) {
                Ok(run) => {
                    eprintln!(
                        "[churn] {} {state}: {:.0} requests/s",
                        paired.what, run.requests_per_s
                    );
                    runs.push((round, run));
                }
                Err(err) => eprintln!("[churn] {} {state}: failed: {err:#}", paired.what),
            }
        }
    }
    runs
}

/// The programs of `names` that belong to this daemon: they share a map with
/// its tracepoint program, or with one that does (another daemon's do not).
fn own_programs(tracer: &mut Tracer, names: &[&str]) -> Result<Vec<(String, u64)>> {
    tracer.ensure_running()?;
    let all = progs()?;
    let mut maps = all
        .iter()
        .find(|p| p.id == tracer.prog_id)
        .context("the daemon's tracepoint program is gone")?
        .maps
        .clone();
    // One step further: `tls_received` shares a map only with the read uprobes.
    for p in &all {
        if names.contains(&p.name.as_str()) && !p.maps.is_disjoint(&maps) {
            maps.extend(p.maps.iter().copied());
        }
    }
    Ok(all
        .into_iter()
        .filter(|p| names.contains(&p.name.as_str()) && !p.maps.is_disjoint(&maps))
        .map(|p| (p.name, p.id))
        .collect())
}

/// One daemon through one window of the load.
fn one(opts: &Options, paired: &Paired<'_>, on: bool) -> Result<Run> {
    let receiver = otlp::Receiver::start_counting_by_name();
    let mut args = otlp_args("grpc", &receiver.grpc_endpoint());
    args.extend(paired.args[usize::from(on)].iter().map(|a| (*a).to_owned()));
    let mut tracer = Tracer::daemon(&args)?;
    let mut programs = own_programs(&mut tracer, paired.programs)?;
    let waited = std::time::Instant::now();
    while on && programs.len() < paired.programs.len() && waited.elapsed() < PROGRAMS_WAIT {
        thread::sleep(Duration::from_millis(100));
        programs = own_programs(&mut tracer, paired.programs)?;
    }
    if on && programs.len() != paired.programs.len() {
        bail!("{} on, but its programs are {programs:?}", paired.what);
    }
    if !on && !programs.is_empty() {
        bail!("{} off, yet its programs loaded: {programs:?}", paired.what);
    }
    if opts.warmup > 0 {
        (paired.load)(opts.warmup)?;
    }
    let stats = |programs: &[(String, u64)]| -> Result<Vec<(u64, u64)>> {
        programs
            .iter()
            .map(|(_, id)| prog_stats(*id).map(|s| (s.run_cnt, s.run_time_ns)))
            .collect()
    };
    let cpu = |pid: u32| super::cpu_seconds(&pid.to_string()).map(|(u, s)| u + s);
    let spans_before = receiver.span_count_named(REQUEST_SPAN);
    let (a, cpu_a) = (stats(&programs)?, cpu(tracer.pid())?);
    let load = (paired.load)(opts.link_seconds)?;
    let (b, cpu_b) = (stats(&programs)?, cpu(tracer.pid())?);
    // The daemon exports every second: the window's spans are in 3 s later.
    thread::sleep(Duration::from_secs(3));
    let request_spans = receiver.span_count_named(REQUEST_SPAN) - spans_before;
    let exited = tracer.stop()?;
    let mut notes = load.errors;
    notes.extend(exited.problems());
    Ok(Run {
        on,
        requests_per_s: load.requests_per_s,
        requests: load.requests,
        request_spans,
        programs: programs
            .iter()
            .zip(a.iter().zip(&b))
            .map(|((name, _), (a, b))| {
                let runs = b.0 - a.0;
                let ns = if runs > 0 {
                    (b.1 - a.1) as f64 / runs as f64
                } else {
                    0.0
                };
                (name.clone(), runs, ns)
            })
            .collect(),
        daemon_cpu_s: cpu_b - cpu_a,
        notes,
    })
}

/// Prints the runs as a table: round, state, requests/s, request spans per
/// request, the daemon's CPU and the programs' runs per request × ns per run.
pub(crate) fn print_table(runs: &[(u64, Run)], opts: &Options, paired: &Paired<'_>) {
    println!(
        "| round | {} | requests/s | tcp.request spans per request | daemon CPU % | programs: runs per request, ns per run |",
        paired.what
    );
    println!("|---:|---|---:|---:|---:|---|");
    for (round, run) in runs {
        let per_request = |n: u64| n as f64 / run.requests.max(1) as f64;
        let programs: Vec<String> = run
            .programs
            .iter()
            .filter(|(_, n, _)| *n > 0)
            .map(|(name, n, ns)| format!("{name} {:.2}×{ns:.0}", per_request(*n)))
            .collect();
        println!(
            "| {round} | {} | {:.0} | {:.4} | {:.0} | {} |",
            paired.states[usize::from(run.on)],
            run.requests_per_s,
            per_request(run.request_spans),
            100.0 * run.daemon_cpu_s / opts.link_seconds as f64,
            programs.join(", ")
        );
        for note in &run.notes {
            println!("|  |  |  |  |  | note: {note} |");
        }
    }
}

/// The median, least and most of the rounds' on ÷ off requests/s; `None`
/// when no round completed both.
pub(crate) fn ratios(runs: &[(u64, Run)], opts: &Options) -> Option<(f64, f64, f64)> {
    let ratios: Vec<f64> = (1..=opts.link_rounds)
        .filter_map(|round| {
            let rate = |on| {
                runs.iter()
                    .find(|(r, run)| *r == round && run.on == on)
                    .map(|(_, run)| run.requests_per_s)
            };
            rate(true).zip(rate(false)).map(|(on, off)| on / off)
        })
        .collect();
    if ratios.is_empty() {
        return None;
    }
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    Some((median(ratios), min, max))
}

/// The median over the runs with the part on of `per_request`: ns a request.
pub(crate) fn median_on(runs: &[(u64, Run)], per_request: impl Fn(&Run) -> f64) -> f64 {
    let values: Vec<f64> = runs
        .iter()
        .filter(|(_, run)| run.on)
        .map(|(_, run)| per_request(run))
        .collect();
    if values.is_empty() {
        0.0
    } else {
        median(values)
    }
}
