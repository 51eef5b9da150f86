//! Loopback connection churn, untraced and under each tracer (and under a program
//! that only counts: the floor of any tracer's kernel cost), plus a memory run of
//! the daemon over a million sockets; and the cost of span links (the daemon's packet
//! programs), links off vs on under the churn, a bulk transfer and wrk against nginx
//! (`links.rs`); sampling's savings (`sampling.rs`); the incident programs' cost
//! and the incidents handled over a lossy link (`incidents.rs`). See BENCHMARKS.md; `scripts/bench.sh` runs it.
//!
//! Needs root: it loads eBPF (through the tracers), reads `bpftool` statistics and
//! turns `kernel.bpf_stats_enabled` on for the duration (restoring it after).

#[path = "../../tests/support/otlp.rs"]
#[allow(dead_code)]
mod otlp;
// otlp.rs serves TLS through it (not used here).
#[path = "../../tests/support/tls.rs"]
#[allow(dead_code)]
mod tls;

// The links runs (links.rs) and their workloads.
#[path = "churn/bulk.rs"]
mod bulk;
#[path = "churn/firsthop.rs"]
mod firsthop;
#[path = "churn/h2c_links.rs"]
mod h2c_links;
#[path = "churn/incidents.rs"]
mod incidents;
#[path = "churn/keepalive.rs"]
mod keepalive;
#[path = "churn/links.rs"]
mod links;
#[path = "churn/nginx.rs"]
mod nginx;
#[path = "churn/paired.rs"]
mod paired;
#[path = "churn/sampling.rs"]
mod sampling;
#[path = "churn/tls_links.rs"]
mod tls_links;

use std::{
    collections::HashSet,
    fs::{self, File},
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Child, ChildStdin, Command, ExitCode, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    sys::{
        resource::{Resource, getrlimit, setrlimit},
        signal::{Signal, kill},
        socket::{
            AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, connect, listen, setsockopt,
            socket, sockopt,
        },
        time::TimeVal,
    },
    unistd::Pid,
};

const DAEMON: &str = env!("CARGO_BIN_EXE_otel-tcpstates");
const LIBBPF_TCPSTATES: &str = "/usr/sbin/tcpstates";
/// bpftool's names for the tracers' programs (both are tracepoint programs).
const DAEMON_PROG: &str = "inet_sock_set_state";
const LIBBPF_PROG: &str = "handle_set_state";
const FLOOR_PROG: &str = "count_set_state";
/// The floor program (otel-tcpstates-ebpf/src/floor.rs), built with the daemon's.
static FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstates-floor"));

const USAGE: &str = "usage: cargo bench --bench churn -- [--seconds N] [--warmup N]
    [--runs baseline,floor,text,otlp,otlp-http,libbpf,baseline,links-churn,links-bulk,links-wrk,memory,sampling,sampling-memory,incidents,first-hop,memory-keepalive,tls,h2c]
    [--link-rounds N] [--link-seconds N] [--memory-sockets N] [--hold-connections N] [--no-pin]
    [--keepalive-connections N] [--keepalive-requests N] [--daemon PATH]
  --runs links = links-churn,links-bulk,links-wrk: each the daemon exporting OTLP/gRPC with
  --no-links and with links, --link-rounds pairs (default 3, the order alternating) of
  --link-seconds measured (default 4) after --warmup
  --runs sampling: always_on, --sample-ratio 0.01 and text under the churn, --link-rounds
  rounds of --seconds each, the order turned each round; sampling-memory: the held
  connections (--hold-connections) at 1% against always_on
  --runs incidents: the churn with the incident programs and with --no-incidents,
  --link-rounds rounds of --seconds each, the order alternating; then --seconds of bulk
  transfers over a veth link losing 1% each way
  --runs first-hop: the daemon's spans to the bench receiver, through rotel and through
  the real Collector (scripts/backends.sh), --link-rounds rounds of --seconds each
  --runs memory-keepalive: the daemon with the DaemonSet's flags and environment
  (deploy/kubernetes), --keepalive-connections (default 65536) keep-alive connections
  each carrying --keepalive-requests (default 64) requests with distinct traceparents,
  then a reset, the collector accepting and never answering; its peak RSS against the
  DaemonSet's memory limit. --daemon PATH runs another build's daemon instead
  --runs tls: wrk over HTTPS against nginx with TLS, a distinct sampled traceparent on
  every request, under the daemon with --links: without and with --tls,
  --link-rounds pairs (the order alternating) of --link-seconds measured after --warmup
  --runs h2c: h2load over plaintext HTTP/2 against nginx, a fixed sampled traceparent on
  every request, under the daemon with --no-links and --links, as --runs tls";

#[path = "churn/options.rs"]
mod options;
use options::*;
#[path = "churn/workload.rs"]
mod workload;
use workload::*;
#[path = "churn/hold.rs"]
mod hold;
use hold::*;
#[path = "churn/kernel.rs"]
mod kernel;
use kernel::*;
#[path = "churn/tracers.rs"]
mod tracers;
use tracers::*;
#[path = "churn/throughput.rs"]
mod throughput;
use throughput::*;
#[path = "churn/memory.rs"]
mod memory;
use memory::*;

// ---------------------------------------------------------------------------------
// Output and main.

/// The middle of the values (of the two middle ones, their mean); NaN for none.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Each run's rate against the mean of the untraced runs: by default one comes
/// first and one last, so drift over the whole bench shows, and is averaged.
fn set_ratios(rows: &mut [Row]) {
    let untraced: Vec<f64> = rows
        .iter()
        .filter(|r| r.mode == Mode::Baseline.label() && r.conns_per_s > 0.0)
        .map(|r| r.conns_per_s)
        .collect();
    if untraced.is_empty() {
        return;
    }
    let mean = untraced.iter().sum::<f64>() / untraced.len() as f64;
    let floor = rows
        .iter()
        .find(|r| r.mode == Mode::Floor.label())
        .and_then(|r| r.ns_per_event);
    for row in rows {
        row.ratio = Some(row.conns_per_s / mean);
        row.floor_ratio = floor
            .zip(row.ns_per_event)
            .map(|(floor, ours)| ours / floor);
    }
}

fn print_table(rows: &[Row]) {
    let opt = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
    let num = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    println!(
        "\n| mode | conns/s | ratio | events/s | ns/event (kernel) | × floor | CPU s/M events | lost | spans produced | exported | received | dropped | spans/s | daemon µs/span | receiver CPU % | peak RSS MiB | exit s | other CPU % |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let s = r.spans.as_ref();
        println!(
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            r.mode,
            r.conns_per_s,
            opt(r.ratio, 2),
            opt(r.events_per_s, 0),
            opt(r.ns_per_event, 0),
            opt(r.floor_ratio, 2),
            opt(r.cpu_s_per_m_events, 2),
            num(r.lost),
            num(s.map(|s| s.produced)),
            num(s.map(|s| s.exported)),
            num(s.map(|s| s.received)),
            num(s.map(|s| s.dropped)),
            opt(s.map(|s| s.per_s), 0),
            opt(s.and_then(|s| s.cpu_us_per_span), 2),
            opt(s.map(|s| s.receiver_cpu_pct), 0),
            opt(r.peak_rss_mib, 1),
            opt(r.exit_s, 1),
            r.other_cpu_pct,
        );
    }
    for r in rows.iter().filter(|r| !r.notes.is_empty()) {
        println!("note: {}: {}", r.mode, r.notes.join("; "));
    }
}

fn print_machine() {
    let sh = |cmd: &str| {
        Command::new("sh")
            .args(["-c", cmd])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    println!("date: {}", sh("date -u"));
    println!("machine: {} cores, kernel {}", sh("nproc"), sh("uname -r"));
    println!(
        "{}; TIME_WAIT off during the runs (net.ipv4.tcp_max_tw_buckets=0)",
        sh("sysctl net.ipv4.ip_local_port_range net.core.somaxconn | tr '\\t\\n' ' ;'")
            .trim_end_matches(';')
    );
}

fn run() -> Result<()> {
    // `cargo test --all-targets` runs bench binaries too, but without the `--bench`
    // that `cargo bench` passes: no minutes of root-only load as a "test".
    if !std::env::args().any(|a| a == "--bench") {
        println!("churn: skipped; run it with `cargo bench --bench churn` or scripts/bench.sh");
        return Ok(());
    }
    let opts = parse_options()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "needs root (the tracers load eBPF; bpf_stats_enabled)"
    );
    let started = Instant::now();
    print_machine();
    // Per-program run time and count, for ns/event; restored on the way out.
    let _stats = Sysctl::set("kernel.bpf_stats_enabled", "1")?;
    // No TIME_WAIT, as under any sustained churn once the table is full (then
    // closing sockets skip it). Otherwise the run's speed depends on how full the
    // table happens to be (~43k vs ~52k connections/s untraced here), and the
    // client's connect() searches ports among its TIME_WAIT sockets. The tracers
    // see the same transitions either way (FIN_WAIT2 -> CLOSE).
    // The keep-alive memory run alone needs no churn (its connections end in resets):
    // the machine's TIME_WAIT setting is left alone for it.
    let churns = opts.runs.iter().any(|&m| m != Mode::KeepAliveMemory);
    let _time_wait = churns
        .then(|| Sysctl::set("net.ipv4.tcp_max_tw_buckets", "0"))
        .transpose()?;

    let mut rows = Vec::new();
    for &mode in opts.runs.iter().filter(|m| m.is_throughput()) {
        eprintln!("[churn] {} ...", mode.label());
        match throughput_run(mode, &opts) {
            Ok(row) => {
                eprintln!("[churn] {}: {:.0} conns/s", row.mode, row.conns_per_s);
                rows.push(row);
            }
            Err(err) => {
                eprintln!("[churn] {}: failed: {err:#}", mode.label());
                rows.push(Row {
                    mode: mode.label(),
                    notes: vec![format!("failed: {err:#}")],
                    ..Row::default()
                });
            }
        }
    }
    if !rows.is_empty() {
        let pinned = if opts.pin {
            "both on CPU 0"
        } else {
            "not pinned"
        };
        println!(
            "\nThroughput: {} s measured per run after {} s warm-up; churn client and server {pinned}",
            opts.seconds, opts.warmup
        );
        set_ratios(&mut rows);
        print_table(&rows);
    }
    let links_runs: Vec<Mode> = Mode::LINKS
        .into_iter()
        .filter(|m| opts.runs.contains(m))
        .collect();
    if !links_runs.is_empty() {
        links::run(&links_runs, &opts);
    }
    if opts.runs.contains(&Mode::Sampling) {
        sampling::churn_run(&opts);
    }
    if opts.runs.contains(&Mode::Tls) {
        tls_links::run(&opts);
    }
    if opts.runs.contains(&Mode::H2c) {
        h2c_links::run(&opts);
    }
    if opts.runs.contains(&Mode::FirstHop) {
        firsthop::run(&opts);
    }
    if opts.runs.contains(&Mode::Incidents) {
        incidents::run(&opts);
    }
    if opts.runs.contains(&Mode::SamplingMemory) {
        eprintln!("[churn] sampling memory run ...");
        sampling::memory_run(&opts).context("sampling memory run")?;
    }
    if opts.runs.contains(&Mode::KeepAliveMemory) {
        eprintln!("[churn] keep-alive memory run ...");
        keepalive::run(&opts).context("keep-alive memory run")?;
    }
    if opts.runs.contains(&Mode::Memory) {
        eprintln!("[churn] memory run ...");
        memory_run(&opts).context("memory run")?;
    }
    println!("\ntotal runtime {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some(FLOOR_CHILD_ARG) => floor_child(),
        Some(keepalive::KEEPALIVE_CHILD_ARG) => (|| {
            let n = |i: usize| -> Result<u64> {
                Ok(args
                    .get(i)
                    .context("--keepalive-child needs id n rounds")?
                    .parse()?)
            };
            keepalive::keepalive_child(n(2)?, n(3)? as usize, n(4)?)
        })(),
        Some(HOLD_CHILD_ARG) => args
            .get(2)
            .context("--hold-child needs a count")
            .and_then(|n| Ok(n.parse()?))
            .and_then(hold_child),
        _ => run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("churn: {err:#}");
            ExitCode::FAILURE
        }
    }
}
