//! What the TLS part costs (issue 30): wrk over HTTPS against nginx with TLS
//! (both Debian's, both on the system's `libssl.so.3`), a distinct sampled
//! `traceparent` on every request, under the daemon with `--links`, once with
//! `--links` alone and once with `--tls`: its TLS programs attached (uprobes on
//! `SSL_write`/`SSL_read` and their returns, the two socket tracepoints), in
//! alternating rounds. Per run: requests/s, the `tcp.request` spans that reached
//! the receiver, and with TLS the programs' runs and ns per run (`bpftool`,
//! `kernel.bpf_stats_enabled`); then the median of the rounds' on ÷ off against
//! the goal (≥ 0.95).
use std::{path::Path, thread, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    Options, Tracer, median,
    nginx::{Nginx, Requests},
    otlp, otlp_args, prog_stats, progs,
};

/// The TLS programs, by the names the kernel keeps.
const TLS_PROGS: [&str; 10] = [
    "ssl_write",
    "ssl_write_ex",
    "ssl_write_ret",
    "ssl_write_exret",
    "ssl_read",
    "ssl_read_ex",
    "ssl_read_ret",
    "ssl_read_exret",
    "tls_sent",
    "tls_received",
];
const REQUEST_SPAN: &str = "tcp.request";
/// The least on ÷ off the issue accepts.
const GOAL: f64 = 0.95;

struct Run {
    tls: bool,
    requests_per_s: f64,
    requests: u64,
    request_spans: u64,
    /// Per TLS program that ran: (name, runs, ns per run).
    programs: Vec<(String, u64, f64)>,
    daemon_cpu_s: f64,
    notes: Vec<String>,
}

/// Runs `opts.link_rounds` rounds of TLS off and on (off first in odd rounds),
/// then prints the table and the goal.
pub(super) fn run(opts: &Options) {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/apps/certs");
    let (nginx_cpu, wrk_cpu) = match opts.pin {
        true => (Some(0), Some(1)),
        false => (None, None),
    };
    let nginx = match Nginx::start_tls(nginx_cpu, &certs) {
        Ok(nginx) => nginx,
        Err(err) => {
            println!("\nTLS part: failed to start nginx: {err:#}");
            return;
        }
    };
    let mut runs: Vec<(u64, Run)> = Vec::new();
    for round in 1..=opts.link_rounds {
        let order = if round % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for tls in order {
            let state = if tls { "attached" } else { "off" };
            eprintln!("[churn] TLS part {state}, round {round} ...");
            match one(&nginx, tls, opts, wrk_cpu) {
                Ok(run) => {
                    eprintln!(
                        "[churn] TLS part {state}: {:.0} requests/s",
                        run.requests_per_s
                    );
                    runs.push((round, run));
                }
                Err(err) => eprintln!("[churn] TLS part {state}: failed: {err:#}"),
            }
        }
    }
    print(&runs, opts);
}

/// One daemon through one wrk window.
fn one(nginx: &Nginx, tls: bool, opts: &Options, wrk_cpu: Option<usize>) -> Result<Run> {
    let receiver = otlp::Receiver::start_counting_by_name();
    let mut args = otlp_args("grpc", &receiver.grpc_endpoint());
    args.push("--links".to_owned());
    if tls {
        args.push("--tls".to_owned());
    }
    let mut tracer = Tracer::daemon(&args)?;
    let own = |tracer: &mut Tracer| -> Result<Vec<(String, u64)>> {
        tracer.ensure_running()?;
        let all = progs()?;
        let mut maps = all
            .iter()
            .find(|p| p.id == tracer.prog_id)
            .context("the daemon's tracepoint program is gone")?
            .maps
            .clone();
        // `tls_received` shares a map only with the read uprobes.
        for p in &all {
            if TLS_PROGS.contains(&p.name.as_str()) && !p.maps.is_disjoint(&maps) {
                maps.extend(p.maps.iter().copied());
            }
        }
        Ok(all
            .into_iter()
            .filter(|p| TLS_PROGS.contains(&p.name.as_str()) && !p.maps.is_disjoint(&maps))
            .map(|p| (p.name, p.id))
            .collect())
    };
    let mut programs = own(&mut tracer)?;
    for _ in 0..50 {
        if !tls || programs.len() == TLS_PROGS.len() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
        programs = own(&mut tracer)?;
    }
    if tls && programs.len() != TLS_PROGS.len() {
        bail!("TLS attached, but its programs are {programs:?}");
    }
    if !tls && !programs.is_empty() {
        bail!("without --tls, yet TLS programs loaded: {programs:?}");
    }
    if opts.warmup > 0 {
        nginx.wrk(opts.warmup, Requests::DistinctTraceparents, wrk_cpu)?;
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
    let wrk = nginx.wrk(opts.link_seconds, Requests::DistinctTraceparents, wrk_cpu)?;
    let (b, cpu_b) = (stats(&programs)?, cpu(tracer.pid())?);
    // The daemon exports every second: the window's spans are in 3 s later.
    thread::sleep(Duration::from_secs(3));
    let request_spans = receiver.span_count_named(REQUEST_SPAN) - spans_before;
    let exited = tracer.stop()?;
    let mut notes = wrk.errors;
    notes.extend(exited.problems());
    Ok(Run {
        tls,
        requests_per_s: wrk.requests_per_s,
        requests: wrk.requests,
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

fn print(runs: &[(u64, Run)], opts: &Options) {
    println!(
        "\nTLS part (issue 30): wrk over HTTPS → nginx with TLS, a distinct sampled traceparent \
         on every request, {} s windows, {} alternating rounds; daemon with --links, \
         --links alone vs with --tls",
        opts.link_seconds, opts.link_rounds
    );
    println!(
        "| round | TLS | requests/s | tcp.request spans per request | daemon CPU % | TLS programs: runs per request, ns per run |"
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
            "| {round} | {} | {:.0} | {:.2} | {:.0} | {} |",
            if run.tls { "attached" } else { "off" },
            run.requests_per_s,
            per_request(run.request_spans),
            100.0 * run.daemon_cpu_s / opts.link_seconds as f64,
            programs.join(", ")
        );
        for note in &run.notes {
            println!("|  |  |  |  |  | note: {note} |");
        }
    }
    let ratios: Vec<f64> = (1..=opts.link_rounds)
        .filter_map(|round| {
            let rate = |tls| {
                runs.iter()
                    .find(|(r, run)| *r == round && run.tls == tls)
                    .map(|(_, run)| run.requests_per_s)
            };
            rate(true).zip(rate(false)).map(|(on, off)| on / off)
        })
        .collect();
    if ratios.is_empty() {
        println!("no round completed both runs");
        return;
    }
    let (min, max) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    let mid = median(ratios);
    // The TLS programs' cost per request: their run time over the requests.
    let ns_per_request: Vec<f64> = runs
        .iter()
        .filter(|(_, run)| run.tls)
        .map(|(_, run)| {
            run.programs
                .iter()
                .map(|(_, n, ns)| *n as f64 * ns)
                .sum::<f64>()
                / run.requests.max(1) as f64
        })
        .collect();
    println!(
        "\nTLS attached ÷ off, requests/s: median {mid:.3} (min {min:.3}, max {max:.3}); \
         goal ≥ {GOAL}: {}; the TLS programs' time per request (both ends): median {:.0} ns",
        if mid >= GOAL { "pass" } else { "FAIL" },
        if ns_per_request.is_empty() {
            0.0
        } else {
            median(ns_per_request)
        }
    );
}
