//! What our span stream costs the first hop downstream (issue 20). Under the clean
//! churn, the daemon exports OTLP/gRPC at `always_on` to: the bench's counting
//! receiver itself; rotel forwarding to it; the real OpenTelemetry Collector (the
//! distribution scripts/backends.sh builds: OTLP in, batch, OTLP out) forwarding
//! to it. Rounds alternate the order. Per hop: spans delivered per second at the
//! counting receiver, and the hop's CPU (utime + stime) per thousand spans.
#[path = "../../../tests/support/backends.rs"]
mod backends;
#[path = "../../../tests/support/rotel.rs"]
#[allow(dead_code)]
mod rotel;

use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Hop {
    Direct,
    Rotel,
    Collector,
}

impl Hop {
    fn label(self) -> &'static str {
        match self {
            Hop::Direct => "bench receiver (no hop)",
            Hop::Rotel => "rotel -> bench receiver",
            Hop::Collector => "OpenTelemetry Collector v0.160.0 -> bench receiver",
        }
    }
}

/// The Collector's pipeline: OTLP in, a batch, OTLP out to the counting receiver.
const COLLECTOR_CONFIG: &str = "\
extensions:
  health_check:
receivers:
  otlp:
    protocols:
      grpc:
processors:
  batch:
exporters:
  otlp/out:
    endpoint: 127.0.0.1:4317 # set to the receiver's
    tls:
      insecure: true
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [otlp/out]
  telemetry:
    logs:
      level: warn
";

struct Window {
    hop: Hop,
    conns_per_s: f64,
    spans_per_s: f64,
    /// The hop's CPU seconds per thousand spans delivered (none for Direct).
    hop_cpu_per_k: Option<f64>,
    produced: Option<u64>,
    dropped: Option<u64>,
    notes: Vec<String>,
}

fn measure(hop: Hop, opts: &Options, config: &std::path::Path) -> Result<Window> {
    let receiver = otlp::Receiver::start_counting();
    let (endpoint, pid, _keep): (String, Option<u32>, Box<dyn std::any::Any>) = match hop {
        Hop::Direct => (receiver.grpc_endpoint(), None, Box::new(())),
        Hop::Rotel => {
            let r = rotel::Rotel::start(&receiver.grpc_endpoint());
            (r.grpc_endpoint(), Some(r.pid()), Box::new(r))
        }
        Hop::Collector => {
            let out = format!("exporters.otlp/out.endpoint={}", receiver.grpc_addr());
            let c = backends::Collector::start(config.to_str().context("config path")?, &[out]);
            (c.grpc_endpoint(), Some(c.process.pid()), Box::new(c))
        }
    };
    let tracer = Tracer::daemon(&otlp_args("grpc", &endpoint))?;
    let churn = Churn::start_clean(u64::MAX, opts.pin)?;
    thread::sleep(Duration::from_secs(opts.warmup));
    let cpu = |pid: Option<u32>| -> Result<f64> {
        match pid {
            Some(pid) => {
                let (u, s) = cpu_seconds(&pid.to_string())?;
                Ok(u + s)
            }
            None => Ok(0.0),
        }
    };
    let (t0, c0, s0, h0) = (
        Instant::now(),
        churn.completed(),
        receiver.span_count(),
        cpu(pid)?,
    );
    thread::sleep(Duration::from_secs(opts.seconds));
    let (t1, c1, s1, h1) = (
        Instant::now(),
        churn.completed(),
        receiver.span_count(),
        cpu(pid)?,
    );
    let (_, errors) = churn.stop();
    let exited = tracer.stop()?;
    let secs = t1.duration_since(t0).as_secs_f64();
    let delivered = s1 - s0;
    let mut notes = exited.problems();
    if errors > 0 {
        notes.push(format!("{errors} connections failed"));
    }
    let account = summary(&exited.stderr);
    Ok(Window {
        hop,
        conns_per_s: (c1 - c0) as f64 / secs,
        spans_per_s: delivered as f64 / secs,
        hop_cpu_per_k: pid.map(|_| (h1 - h0) / delivered.max(1) as f64 * 1000.0),
        produced: account.map(|s| s.produced),
        dropped: account.map(|s| s.failed + s.not_sent),
        notes,
    })
}

/// `--runs first-hop`: `opts.link_rounds` rounds of the three hops, the order
/// turned each round.
pub(super) fn run(opts: &Options) {
    let config = std::env::temp_dir().join(format!("otcs-first-hop-{}.yaml", std::process::id()));
    if let Err(err) = fs::write(&config, COLLECTOR_CONFIG) {
        println!("\nfirst hop: cannot write {}: {err}", config.display());
        return;
    }
    let orders = [
        [Hop::Direct, Hop::Rotel, Hop::Collector],
        [Hop::Rotel, Hop::Collector, Hop::Direct],
        [Hop::Collector, Hop::Direct, Hop::Rotel],
    ];
    let mut windows = Vec::new();
    for round in 0..opts.link_rounds {
        for hop in orders[round as usize % orders.len()] {
            eprintln!(
                "[churn] first hop: {}, round {} ...",
                hop.label(),
                round + 1
            );
            match measure(hop, opts, &config) {
                Ok(w) => windows.push(w),
                Err(err) => eprintln!("[churn] first hop: {}: failed: {err:#}", hop.label()),
            }
        }
    }
    let _ = fs::remove_file(&config);
    println!(
        "\nFirst hop: {} rounds of {} s after {} s warm-up, order turned each round; the daemon \
         at always_on over OTLP/gRPC; every connection closes with a FIN",
        opts.link_rounds, opts.seconds, opts.warmup
    );
    println!(
        "\n| hop | conns/s | spans delivered/s | hop CPU s per 1000 spans | spans produced | dropped |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let num = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
    for w in &windows {
        println!(
            "| {} | {:.0} | {:.0} | {} | {} | {} |",
            w.hop.label(),
            w.conns_per_s,
            w.spans_per_s,
            w.hop_cpu_per_k.map_or("-".into(), |c| format!("{c:.4}")),
            num(w.produced),
            num(w.dropped)
        );
    }
    for w in windows.iter().filter(|w| !w.notes.is_empty()) {
        println!("note: {}: {}", w.hop.label(), w.notes.join("; "));
    }
    for hop in [Hop::Direct, Hop::Rotel, Hop::Collector] {
        let of = |f: &dyn Fn(&Window) -> Option<f64>| {
            median(
                windows
                    .iter()
                    .filter(|w| w.hop == hop)
                    .filter_map(f)
                    .collect(),
            )
        };
        println!(
            "median {}: {:.0} spans delivered/s, {:.4} CPU s per 1000 spans",
            hop.label(),
            of(&|w| Some(w.spans_per_s)),
            of(&|w| w.hop_cpu_per_k)
        );
    }
}
