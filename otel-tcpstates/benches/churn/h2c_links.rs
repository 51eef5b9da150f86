//! What reading HTTP/2 costs (issue 30): h2load over plaintext HTTP/2 (`h2c`,
//! 32 connections, 10 streams in flight on each) against nginx, one fixed
//! sampled `traceparent` on every request, under the daemon with `--no-links`
//! and with `--links` (its packet programs walking every HEADERS frame, its
//! HPACK decoders reading each request), in alternating rounds. Per run:
//! requests/s, the daemon's CPU, the links it made, and with links the packet
//! programs' runs and ns per run; then the median of the rounds' on ÷ off
//! against the links runs' goal (≥ 0.95).
use std::{thread, time::Duration};

use anyhow::{Context as _, Result};

use super::{Options, Tracer, median, nginx::Nginx, otlp, otlp_args, prog_stats, progs};

/// The packet programs, by the names the kernel keeps.
const PACKET_PROGS: [&str; 2] = ["http_egress", "http_ingress"];
/// On every request. HPACK puts it in the dynamic table with the first
/// request of a connection and sends an index after: the daemon still decodes
/// every block, and links the context once per connection end.
const TRACEPARENT: &str = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const REQUEST_SPAN: &str = "tcp.request";
/// The least on ÷ off the links runs aim at.
const GOAL: f64 = 0.95;

struct Run {
    links: bool,
    requests_per_s: f64,
    requests: u64,
    request_spans: u64,
    /// Per packet program: (name, runs, ns per run).
    programs: Vec<(String, u64, f64)>,
    daemon_cpu_s: f64,
    notes: Vec<String>,
}

/// Runs `opts.link_rounds` rounds of links off and on (off first in odd
/// rounds), then prints the table and the goal.
pub(super) fn run(opts: &Options) {
    let (nginx_cpu, load_cpu) = match opts.pin {
        true => (Some(0), Some(1)),
        false => (None, None),
    };
    let nginx = match Nginx::start_h2c(nginx_cpu) {
        Ok(nginx) => nginx,
        Err(err) => {
            println!("\nHTTP/2: failed to start nginx: {err:#}");
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
        for links in order {
            let state = if links { "on" } else { "off" };
            eprintln!("[churn] HTTP/2, links {state}, round {round} ...");
            match one(&nginx, links, opts, load_cpu) {
                Ok(run) => {
                    eprintln!(
                        "[churn] HTTP/2, links {state}: {:.0} requests/s",
                        run.requests_per_s
                    );
                    runs.push((round, run));
                }
                Err(err) => eprintln!("[churn] HTTP/2, links {state}: failed: {err:#}"),
            }
        }
    }
    print(&runs, opts);
}

/// One daemon through one h2load window.
fn one(nginx: &Nginx, links: bool, opts: &Options, load_cpu: Option<usize>) -> Result<Run> {
    let receiver = otlp::Receiver::start_counting_by_name();
    let mut args = otlp_args("grpc", &receiver.grpc_endpoint());
    args.push(if links { "--links" } else { "--no-links" }.to_owned());
    let mut tracer = Tracer::daemon(&args)?;
    // The packet programs that share the daemon's tracepoint program's maps
    // (not another daemon's).
    let mut programs = Vec::new();
    for _ in 0..50 {
        tracer.ensure_running()?;
        let all = progs()?;
        let maps = all
            .iter()
            .find(|p| p.id == tracer.prog_id)
            .context("the daemon's tracepoint program is gone")?
            .maps
            .clone();
        programs = all
            .into_iter()
            .filter(|p| PACKET_PROGS.contains(&p.name.as_str()) && !p.maps.is_disjoint(&maps))
            .map(|p| (p.name, p.id))
            .collect::<Vec<_>>();
        if !links || programs.len() == PACKET_PROGS.len() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    if links && programs.len() != PACKET_PROGS.len() {
        anyhow::bail!("links on, but its packet programs are {programs:?}");
    }
    if opts.warmup > 0 {
        nginx.h2load(opts.warmup, Some(TRACEPARENT), load_cpu)?;
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
    let load = nginx.h2load(opts.link_seconds, Some(TRACEPARENT), load_cpu)?;
    let (b, cpu_b) = (stats(&programs)?, cpu(tracer.pid())?);
    // The daemon exports every second: the window's spans are in 3 s later.
    thread::sleep(Duration::from_secs(3));
    let request_spans = receiver.span_count_named(REQUEST_SPAN) - spans_before;
    let exited = tracer.stop()?;
    let mut notes = load.errors;
    notes.extend(exited.problems());
    Ok(Run {
        links,
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

fn print(runs: &[(u64, Run)], opts: &Options) {
    println!(
        "\nHTTP/2 (issue 30): h2load over h2c → nginx, 32 connections × 10 streams, one fixed \
         sampled traceparent on every request, {} s windows, {} alternating rounds; daemon \
         exporting OTLP/gRPC, --no-links vs --links",
        opts.link_seconds, opts.link_rounds
    );
    println!(
        "| round | links | requests/s | tcp.request spans per request | daemon CPU % | packet programs: runs per request, ns per run |"
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
            if run.links { "on" } else { "off" },
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
            let rate = |links| {
                runs.iter()
                    .find(|(r, run)| *r == round && run.links == links)
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
    let cpu_per_request: Vec<f64> = runs
        .iter()
        .filter(|(_, run)| run.links)
        .map(|(_, run)| 1e9 * run.daemon_cpu_s / run.requests.max(1) as f64)
        .collect();
    println!(
        "\nHTTP/2 links on ÷ off, requests/s: median {mid:.3} (min {min:.3}, max {max:.3}); \
         goal ≥ {GOAL}: {}; the daemon's CPU per request with links (HPACK decoding, both \
         ends): median {:.0} ns",
        if mid >= GOAL { "pass" } else { "FAIL" },
        if cpu_per_request.is_empty() {
            0.0
        } else {
            median(cpu_per_request)
        }
    );
}
