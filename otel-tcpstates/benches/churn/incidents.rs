//! What the incident programs (issue 19) cost and handle. Under the clean churn
//! (every connection closes with a FIN: almost nothing for them to report), the
//! daemon exporting OTLP/gRPC (1% sampled) with them and with `--no-incidents`, in rounds that
//! alternate the order: connections/s, the daemon's CPU per million events, and
//! each program's ns per run from bpf_stats. Then bulk transfers over a veth link
//! between two namespaces of the bench's own that drops 1% of the packets each
//! way: the incidents the daemon handled per second (span events sent, and those
//! over a span's 64 counted as dropped), against the programs' runs, none lost.
#[path = "../../../tests/support/netns.rs"]
mod netns;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
};

use super::*;

/// The daemon's incident programs, by the names bpftool shows.
const INCIDENT_PROGS: [&str; 6] = [
    "tcp_retransmit_skb",
    "tcp_retransmit_synack",
    "tcp_send_reset",
    "tcp_receive_reset",
    "tcp_cong_state_set",
    "inet_sk_error_report",
];
/// Bytes per bulk connection: enough for many retransmissions at 1% loss, few
/// enough that a connection's ESTABLISHED span keeps most of its events.
const BULK_BYTES: usize = 4 << 20;
const LOSS: f64 = 0.01;
const IO_CHUNK: usize = 64 << 10;

/// The daemon's programs (its state program, and its incident programs when
/// loaded), by name: they share its maps, other tracers' programs do not.
fn own_progs(tracer: &Tracer) -> Result<Vec<(String, u64)>> {
    let all = progs()?;
    let maps = all
        .iter()
        .find(|p| p.id == tracer.prog_id)
        .context("the daemon's tracepoint program is gone")?
        .maps
        .clone();
    Ok(all
        .into_iter()
        .filter(|p| {
            (p.name == DAEMON_PROG || INCIDENT_PROGS.contains(&p.name.as_str()))
                && !p.maps.is_disjoint(&maps)
        })
        .map(|p| (p.name, p.id))
        .collect())
}

/// Each program's run statistics, by name.
fn stats(progs: &[(String, u64)]) -> Result<Vec<(String, ProgStats)>> {
    progs
        .iter()
        .map(|(name, id)| Ok((name.clone(), prog_stats(*id)?)))
        .collect()
}

/// Per program: runs and run time between two readings.
fn delta(a: &[(String, ProgStats)], b: &[(String, ProgStats)]) -> Vec<(String, ProgStats)> {
    b.iter()
        .map(|(name, after)| {
            let before = a
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| *s)
                .unwrap_or_default();
            let d = ProgStats {
                run_time_ns: after.run_time_ns - before.run_time_ns,
                run_cnt: after.run_cnt - before.run_cnt,
            };
            (name.clone(), d)
        })
        .collect()
}

/// `sample`: at 1% (the churn: at always_on the bench's receiver, not the
/// daemon, limits the rate here and spans are dropped in both modes, which would
/// measure the export path instead of the incident programs).
fn args(incidents: bool, sample: bool, receiver: &otlp::Receiver) -> Vec<String> {
    let mut args = otlp_args("grpc", &receiver.grpc_endpoint());
    if sample {
        args.extend(["--sample-ratio".to_owned(), "0.01".to_owned()]);
    }
    if !incidents {
        args.push("--no-incidents".to_owned());
    }
    args
}

fn label(incidents: bool) -> &'static str {
    if incidents {
        "incidents on"
    } else {
        "--no-incidents"
    }
}

/// The daemon waits for its incident programs to be attached: they come after the
/// state program, which `Tracer::daemon` waited for.
fn wait_for_incident_progs(tracer: &mut Tracer) -> Result<Vec<(String, u64)>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let progs = own_progs(tracer)?;
        if progs.len() == 1 + INCIDENT_PROGS.len() {
            return Ok(progs);
        }
        tracer.ensure_running()?;
        ensure!(
            Instant::now() < deadline,
            "the daemon's incident programs were not all loaded within 30 s (found {progs:?})"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

struct ChurnWindow {
    incidents: bool,
    conns_per_s: f64,
    cpu_per_m_events: f64,
    progs: Vec<(String, ProgStats)>,
    notes: Vec<String>,
}

fn churn_window(incidents: bool, opts: &Options) -> Result<ChurnWindow> {
    let receiver = otlp::Receiver::start_counting();
    let mut tracer = Tracer::daemon(&args(incidents, true, &receiver))?;
    let progs = match incidents {
        true => wait_for_incident_progs(&mut tracer)?,
        false => own_progs(&tracer)?,
    };
    let pid = tracer.pid().to_string();
    let churn = Churn::start_clean(u64::MAX, opts.pin)?;
    thread::sleep(Duration::from_secs(opts.warmup));
    let cpu = || -> Result<f64> {
        let (user, system) = cpu_seconds(&pid)?;
        Ok(user + system)
    };
    let (t0, c0, cpu0, s0) = (Instant::now(), churn.completed(), cpu()?, stats(&progs)?);
    thread::sleep(Duration::from_secs(opts.seconds));
    let (t1, c1, cpu1, s1) = (Instant::now(), churn.completed(), cpu()?, stats(&progs)?);
    let (_, errors) = churn.stop();
    let exited = tracer.stop()?;
    let progs = delta(&s0, &s1);
    let events = progs
        .iter()
        .find(|(n, _)| n == DAEMON_PROG)
        .map_or(0, |(_, s)| s.run_cnt);
    let mut notes = exited.problems();
    if errors > 0 {
        notes.push(format!("{errors} connections failed"));
    }
    let lost = lost_events(&exited.stderr);
    if lost > 0 {
        notes.push(format!("{lost} events lost"));
    }
    Ok(ChurnWindow {
        incidents,
        conns_per_s: (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64(),
        cpu_per_m_events: (cpu1 - cpu0) / events.max(1) as f64 * 1e6,
        progs,
        notes,
    })
}

fn ns_per_run(s: &ProgStats) -> String {
    match s.run_cnt {
        0 => "-".to_owned(),
        n => format!("{:.0}", s.run_time_ns as f64 / n as f64),
    }
}

/// `--runs incidents`: the churn rounds, then the lossy bulk run.
pub(super) fn run(opts: &Options) {
    let mut windows = Vec::new();
    for round in 0..opts.link_rounds {
        let order = match round % 2 {
            0 => [true, false],
            _ => [false, true],
        };
        for incidents in order {
            eprintln!(
                "[churn] incidents: {}, round {} ...",
                label(incidents),
                round + 1
            );
            match churn_window(incidents, opts) {
                Ok(w) => {
                    eprintln!(
                        "[churn] incidents: {}: {:.0} conns/s, {:.2} CPU s/M events",
                        label(incidents),
                        w.conns_per_s,
                        w.cpu_per_m_events
                    );
                    windows.push(w);
                }
                Err(err) => eprintln!("[churn] incidents: {}: failed: {err:#}", label(incidents)),
            }
        }
    }
    print_churn(&windows, opts);
    match bulk_run(opts) {
        Ok(()) => {}
        Err(err) => println!("\nincidents: bulk over a lossy link failed: {err:#}"),
    }
}

fn print_churn(windows: &[ChurnWindow], opts: &Options) {
    println!(
        "\nIncidents under the churn: {} rounds of {} s measured after {} s warm-up, order \
         alternating; OTLP/gRPC at --sample-ratio 0.01; every connection closes with a FIN",
        opts.link_rounds, opts.seconds, opts.warmup
    );
    println!(
        "\n| mode | conns/s | CPU s/M events | inet_sock_set_state ns/run | incident programs' runs |"
    );
    println!("|---|---:|---:|---:|---:|");
    for w in windows {
        let state = w.progs.iter().find(|(n, _)| n == DAEMON_PROG);
        let incident_runs: u64 = w
            .progs
            .iter()
            .filter(|(n, _)| n != DAEMON_PROG)
            .map(|(_, s)| s.run_cnt)
            .sum();
        println!(
            "| {} | {:.0} | {:.2} | {} | {} |",
            label(w.incidents),
            w.conns_per_s,
            w.cpu_per_m_events,
            state.map_or("-".into(), |(_, s)| ns_per_run(s)),
            if w.incidents {
                incident_runs.to_string()
            } else {
                "-".into()
            },
        );
    }
    for w in windows.iter().filter(|w| !w.notes.is_empty()) {
        println!("note: {}: {}", label(w.incidents), w.notes.join("; "));
    }
    println!("\n| program (incidents on) | runs/s, median | ns/run, median |");
    println!("|---|---:|---:|");
    for name in INCIDENT_PROGS {
        let of = |f: &dyn Fn(&ProgStats) -> Option<f64>| {
            median(
                windows
                    .iter()
                    .filter(|w| w.incidents)
                    .filter_map(|w| w.progs.iter().find(|(n, _)| n == name))
                    .filter_map(|(_, s)| f(s))
                    .collect(),
            )
        };
        let rate = of(&|s| Some(s.run_cnt as f64 / opts.seconds as f64));
        let ns = of(&|s| (s.run_cnt > 0).then(|| s.run_time_ns as f64 / s.run_cnt as f64));
        println!("| {name} | {rate:.0} | {ns:.0} |");
    }
    let rates = |on: bool| -> Vec<f64> {
        windows
            .iter()
            .filter(|w| w.incidents == on)
            .map(|w| w.conns_per_s)
            .collect()
    };
    let (with, without) = (median(rates(true)), median(rates(false)));
    // The run's noise: how far one window of a mode strays from that mode's median.
    let noise = windows
        .iter()
        .map(|w| {
            let m = if w.incidents { with } else { without };
            (w.conns_per_s / m - 1.0).abs()
        })
        .fold(0.0, f64::max);
    let ratio = with / without;
    let cpu = |on: bool| {
        median(
            windows
                .iter()
                .filter(|w| w.incidents == on)
                .map(|w| w.cpu_per_m_events)
                .collect(),
        )
    };
    println!(
        "\nmedians: conns/s incidents on {with:.0}, --no-incidents {without:.0}; \
         CPU s/M events on {:.2}, off {:.2}",
        cpu(true),
        cpu(false)
    );
    println!(
        "goal: conns/s(on) ÷ conns/s(off) = {ratio:.3}, within the run's noise ±{:.3}: {}",
        noise,
        if (ratio - 1.0).abs() <= noise {
            "PASS"
        } else {
            "FAIL"
        }
    );
}

/// Bulk transfers from namespace a to b, one connection after another, each of
/// [`BULK_BYTES`], until `stop`; the bytes moved.
fn bulk(link: &netns::LossyLink, port: u16, stop: &AtomicBool) -> Result<u64> {
    let addr: SocketAddr = format!("{}:{port}", link.b_addr).parse()?;
    let listener = link
        .in_b(move || TcpListener::bind(addr))
        .context("listening in namespace b")?;
    listener.set_nonblocking(true)?;
    // The server serves until the client is through: a connection begun just
    // before `stop` still has its reader.
    let client_done = AtomicBool::new(false);
    thread::scope(|scope| {
        scope.spawn(|| {
            let mut buf = vec![0u8; IO_CHUNK];
            while !client_done.load(Relaxed) {
                match listener.accept() {
                    Ok((mut server, _)) => {
                        let _ = server.set_nonblocking(false);
                        let _ = server.set_read_timeout(Some(IO_TIMEOUT * 5));
                        while matches!(server.read(&mut buf), Ok(n) if n > 0) {}
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let chunk = vec![7u8; IO_CHUNK];
        let mut moved = 0u64;
        let _done = Done(&client_done);
        while !stop.load(Relaxed) {
            // The socket is made inside namespace a, then used from here.
            let mut client = link
                .in_a(move || TcpStream::connect_timeout(&addr, IO_TIMEOUT))
                .context("connecting from namespace a")?;
            client.set_write_timeout(Some(IO_TIMEOUT * 5))?;
            for _ in 0..BULK_BYTES / IO_CHUNK {
                client.write_all(&chunk).context("writing")?;
                moved += IO_CHUNK as u64;
            }
            client
                .shutdown(std::net::Shutdown::Write)
                .context("shutdown")?;
            // The server's FIN once it read everything: one whole connection.
            let _ = client.read(&mut [0u8; 1]);
        }
        Ok(moved)
    })
}

/// Sets its flag when dropped: on every way out of the client's loop.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

fn bulk_run(opts: &Options) -> Result<()> {
    eprintln!("[churn] incidents: bulk over a 1% loss link ...");
    let link = netns::LossyLink::new("bench", LOSS);
    let receiver = otlp::Receiver::start();
    let mut tracer = Tracer::daemon(&args(true, false, &receiver))?;
    let progs = wait_for_incident_progs(&mut tracer)?;
    let stop = AtomicBool::new(false);
    let s0 = stats(&progs)?;
    let started = Instant::now();
    let moved = thread::scope(|scope| {
        let mover = scope.spawn(|| bulk(&link, 5001, &stop));
        thread::sleep(Duration::from_secs(opts.seconds));
        stop.store(true, Relaxed);
        mover
            .join()
            .map_err(|_| anyhow::anyhow!("the bulk thread panicked"))?
    })?;
    let secs = started.elapsed().as_secs_f64();
    let s1 = stats(&progs)?;
    let exited = tracer.stop()?;
    // Every span the daemon sent: the bulk connections', and its own export
    // connection's (clean, without events).
    let spans = receiver.spans();
    let (mut sent, mut dropped, mut by_name) = (0u64, 0u64, std::collections::BTreeMap::new());
    for span in &spans {
        sent += span.events.len() as u64;
        dropped += u64::from(span.dropped_events_count);
        for e in &span.events {
            *by_name.entry(e.name.clone()).or_insert(0u64) += 1;
        }
    }
    let runs = delta(&s0, &s1);
    let lost = lost_events(&exited.stderr);
    println!(
        "\nIncidents over a lossy link: {secs:.1} s of bulk transfers of {} MiB each between two \
         namespaces, each end dropping {:.0}% of what it receives (iptables statistic)",
        BULK_BYTES >> 20,
        LOSS * 100.0
    );
    println!("\n| program | runs | runs/s | ns/run |");
    println!("|---|---:|---:|---:|");
    for (name, s) in &runs {
        println!(
            "| {name} | {} | {:.0} | {} |",
            s.run_cnt,
            s.run_cnt as f64 / secs,
            ns_per_run(s)
        );
    }
    let handled = sent + dropped;
    println!(
        "\nmoved {:.1} MiB/s; span events sent {sent} ({by_name:?}), over 64 per span and \
         counted {dropped}: {:.0} incidents handled/s; events lost {lost}",
        moved as f64 / secs / 1048576.0,
        handled as f64 / secs
    );
    for note in exited.problems() {
        println!("note: {note}");
    }
    println!(
        "goal: incidents handled, none lost: {}",
        if handled > 0 && lost == 0 {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(())
}
