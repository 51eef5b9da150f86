//! What sampling at the source saves (issue 18): under the same churn, every
//! connection closing cleanly (no keep rule fires), the daemon exporting OTLP/gRPC
//! with `always_on` and with `--sample-ratio 0.01`, connection metrics on in both
//! (they go to the same receiver), and the daemon printing text, in rounds that
//! alternate the order. Per mode: the daemon's CPU per million events, the bytes it
//! wrote (`/proc/PID/io` `wchar`: its sockets to the receiver, and nothing else
//! here, its text going to /dev/null being the exception that the text row shows),
//! the spans received; then the medians against the goals. And the session
//! table's memory with spans waiting: 65,536 held sockets, each having ended its
//! handshake state, at 1% against `always_on`.
use std::{thread, time::Duration};

use anyhow::{Context as _, Result};

use super::{
    Churn, Holders, Options, Tracer, cpu_seconds, fs, median, otlp, otlp_args, prog_stats, summary,
    vm_mib,
};

/// The ratio the issue measures.
const RATIO: &str = "0.01";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    AlwaysOn,
    Ratio,
    Text,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::AlwaysOn => "OTLP/gRPC, always_on",
            Kind::Ratio => "OTLP/gRPC, --sample-ratio 0.01",
            Kind::Text => "text (to /dev/null)",
        }
    }

    fn args(self, receiver: &otlp::Receiver) -> Vec<String> {
        let mut args = match self {
            Kind::Text => return Vec::new(),
            _ => otlp_args("grpc", &receiver.grpc_endpoint()),
        };
        if self == Kind::Ratio {
            args.extend(["--sample-ratio".to_owned(), RATIO.to_owned()]);
        }
        args
    }
}

/// One mode's measured window.
struct Window {
    kind: Kind,
    conns_per_s: f64,
    events: u64,
    cpu_s: f64,
    wrote: u64,
    /// OTLP modes: spans received in the window, and the daemon's exit account.
    received: Option<u64>,
    produced: Option<u64>,
    dropped: Option<u64>,
    notes: Vec<String>,
}

impl Window {
    fn cpu_per_m_events(&self) -> f64 {
        self.cpu_s / self.events.max(1) as f64 * 1e6
    }

    fn bytes_per_conn(&self, secs: f64) -> f64 {
        self.wrote as f64 / (self.conns_per_s * secs).max(1.0)
    }
}

/// A process's bytes written (write, send and the like), from `/proc/PID/io`.
fn wchar(pid: u32) -> Result<u64> {
    let io = fs::read_to_string(format!("/proc/{pid}/io"))?;
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .context("no wchar in /proc/PID/io")?
        .trim()
        .parse()
        .context("wchar")
}

fn measure(kind: Kind, opts: &Options) -> Result<Window> {
    let receiver = otlp::Receiver::start_counting();
    let tracer = Tracer::daemon(&kind.args(&receiver))?;
    let pid = tracer.pid();
    let churn = Churn::start_clean(u64::MAX, opts.pin)?;
    thread::sleep(Duration::from_secs(opts.warmup));
    let mark = || -> Result<(std::time::Instant, u64, u64, f64, u64, u64)> {
        let (user, system) = cpu_seconds(&pid.to_string())?;
        Ok((
            std::time::Instant::now(),
            churn.completed(),
            prog_stats(tracer.prog_id)?.run_cnt,
            user + system,
            wchar(pid)?,
            receiver.span_count(),
        ))
    };
    let a = mark()?;
    thread::sleep(Duration::from_secs(opts.seconds));
    let b = mark()?;
    let (_, errors) = churn.stop();
    let exited = tracer.stop()?;
    let secs = b.0.duration_since(a.0).as_secs_f64();
    let mut notes = exited.problems();
    if errors > 0 {
        notes.push(format!("{errors} connections failed"));
    }
    let account = summary(&exited.stderr);
    let otlp = kind != Kind::Text;
    Ok(Window {
        kind,
        conns_per_s: (b.1 - a.1) as f64 / secs,
        events: b.2 - a.2,
        cpu_s: b.3 - a.3,
        wrote: b.4 - a.4,
        received: otlp.then_some(b.5 - a.5),
        produced: account.as_ref().filter(|_| otlp).map(|s| s.produced),
        dropped: account
            .as_ref()
            .filter(|_| otlp)
            .map(|s| s.failed + s.not_sent),
        notes,
    })
}

/// `--runs sampling`: `opts.link_rounds` rounds, each of the three modes, the order
/// turned each round; then the medians and the goals.
pub(super) fn churn_run(opts: &Options) {
    let orders = [
        [Kind::AlwaysOn, Kind::Ratio, Kind::Text],
        [Kind::Ratio, Kind::Text, Kind::AlwaysOn],
        [Kind::Text, Kind::AlwaysOn, Kind::Ratio],
    ];
    let mut windows = Vec::new();
    for round in 0..opts.link_rounds {
        for kind in orders[round as usize % orders.len()] {
            eprintln!(
                "[churn] sampling: {}, round {} ...",
                kind.label(),
                round + 1
            );
            match measure(kind, opts) {
                Ok(w) => {
                    eprintln!(
                        "[churn] sampling: {}: {:.0} conns/s, {:.2} CPU s/M events, {} bytes written",
                        kind.label(),
                        w.conns_per_s,
                        w.cpu_per_m_events(),
                        w.wrote
                    );
                    windows.push(w);
                }
                Err(err) => eprintln!("[churn] sampling: {}: failed: {err:#}", kind.label()),
            }
        }
    }
    let secs = opts.seconds as f64;
    println!(
        "\nSampling: {} rounds of {} s measured after {} s warm-up, order turned each round; \
         metrics export on in the OTLP modes; every connection closes cleanly",
        opts.link_rounds, opts.seconds, opts.warmup
    );
    println!(
        "\n| mode | round | conns/s | CPU s/M events | bytes written | bytes/conn | spans produced | received | dropped |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let num = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    let mut round_of = std::collections::HashMap::new();
    for w in &windows {
        let round = round_of.entry(w.kind.label()).or_insert(0);
        *round += 1;
        println!(
            "| {} | {} | {:.0} | {:.2} | {} | {:.0} | {} | {} | {} |",
            w.kind.label(),
            round,
            w.conns_per_s,
            w.cpu_per_m_events(),
            w.wrote,
            w.bytes_per_conn(secs),
            num(w.produced),
            num(w.received),
            num(w.dropped),
        );
    }
    for w in windows.iter().filter(|w| !w.notes.is_empty()) {
        println!("note: {}: {}", w.kind.label(), w.notes.join("; "));
    }
    let of = |kind: Kind, f: &dyn Fn(&Window) -> f64| {
        median(windows.iter().filter(|w| w.kind == kind).map(f).collect())
    };
    let cpu = |k| of(k, &|w| w.cpu_per_m_events());
    let bytes = |k| of(k, &|w| w.bytes_per_conn(secs));
    // Spans received per connection: ~5 with always_on.
    let spans = |k| {
        of(k, &|w| {
            w.received.unwrap_or(0) as f64 / (w.conns_per_s * secs).max(1.0)
        })
    };
    let (on, ratio, text) = (Kind::AlwaysOn, Kind::Ratio, Kind::Text);
    let dropped: u64 = windows.iter().filter_map(|w| w.dropped).sum();
    let goal = |ok: bool| if ok { "PASS" } else { "FAIL" };
    println!(
        "\nmedians: CPU s/M events always_on {:.2}, 1% {:.2}, text {:.2}; bytes/conn always_on {:.0}, 1% {:.0}; spans received/conn always_on {:.3}, 1% {:.4}",
        cpu(on),
        cpu(ratio),
        cpu(text),
        bytes(on),
        bytes(ratio),
        spans(on),
        spans(ratio)
    );
    let cpu_ratio = cpu(ratio) / cpu(on);
    println!(
        "goal: CPU(1%) ÷ CPU(always_on) = {cpu_ratio:.3} ≤ 0.75: {}",
        goal(cpu_ratio <= 0.75)
    );
    println!(
        "goal: CPU(1%) {:.2} ≤ CPU(text) {:.2}: {}",
        cpu(ratio),
        cpu(text),
        goal(cpu(ratio) <= cpu(text))
    );
    let bytes_ratio = bytes(ratio) / bytes(on);
    println!(
        "goal: bytes(1%) ÷ bytes(always_on) = {bytes_ratio:.4} ≤ 0.03: {}",
        goal(bytes_ratio <= 0.03)
    );
    let spans_ratio = spans(ratio) / spans(on);
    println!(
        "goal: spans received(1%) ÷ (always_on) = {spans_ratio:.4} ≈ 0.01, {dropped} dropped: {}",
        goal((0.005..=0.02).contains(&spans_ratio) && dropped == 0)
    );
}

/// `--runs sampling-memory`: the daemon's RSS with `opts.hold_connections`
/// connections held open (two sockets each, every one past its handshake state),
/// at 1% (each session holding its ended states for the decision at its end)
/// against `always_on`.
pub(super) fn memory_run(opts: &Options) -> Result<()> {
    let held = 2 * opts.hold_connections;
    let mut rows = Vec::new();
    for kind in [Kind::AlwaysOn, Kind::Ratio] {
        let receiver = otlp::Receiver::start_counting();
        let mut args = kind.args(&receiver);
        args.extend(["--max-sockets".to_owned(), held.max(65_536).to_string()]);
        let tracer = Tracer::daemon(&args)?;
        thread::sleep(Duration::from_secs(1));
        let before = vm_mib(tracer.pid(), "VmRSS:")?;
        let holders = Holders::start(opts.hold_connections)?;
        thread::sleep(Duration::from_secs(2));
        let with = vm_mib(tracer.pid(), "VmRSS:")?;
        let peak = vm_mib(tracer.pid(), "VmHWM:")?;
        holders.release();
        let exited = tracer.stop()?;
        rows.push((kind, before, with, peak, exited.problems()));
    }
    println!("\nSampling memory: {held} sockets held open (each past SYN_SENT or SYN_RECV)");
    println!("\n| mode | RSS before MiB | RSS held MiB | peak MiB | held − before, bytes/socket |");
    println!("|---|---:|---:|---:|---:|");
    for (kind, before, with, peak, _) in &rows {
        println!(
            "| {} | {before:.1} | {with:.1} | {peak:.1} | {:.0} |",
            kind.label(),
            (with - before) * 1048576.0 / held as f64
        );
    }
    if let [(_, b0, w0, ..), (_, b1, w1, ..)] = rows.as_slice() {
        println!(
            "states waiting at 1%: {:.1} MiB more than always_on ({:.0} bytes per held socket)",
            (w1 - b1) - (w0 - b0),
            ((w1 - b1) - (w0 - b0)) * 1048576.0 / held as f64
        );
    }
    for (kind, .., notes) in &rows {
        for note in notes {
            println!("note: {}: {note}", kind.label());
        }
    }
    Ok(())
}
