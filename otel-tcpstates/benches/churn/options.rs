//! The bench's options: which runs, how long, and the modes each run is.
use super::*;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Mode {
    Baseline,
    Floor,
    Text,
    Otlp,
    OtlpHttp,
    Libbpf,
    Memory,
    /// The churn, links off vs on.
    LinksChurn,
    /// One bulk connection, links off vs on.
    LinksBulk,
    /// wrk against nginx: no header, one fixed traceparent, a distinct sampled
    /// traceparent on every request; links off vs on.
    LinksWrk,
    /// The churn: always_on vs --sample-ratio 0.01 vs text.
    Sampling,
    /// Held sockets' memory, always_on vs 1%.
    SamplingMemory,
    /// The churn with the incident programs and without; bulk over a lossy link.
    Incidents,
    /// The churn's spans through the bench receiver, rotel and the real Collector.
    FirstHop,
    /// Keep-alive connections carrying many traceparents, the collector stalled:
    /// peak RSS against the DaemonSet's limit.
    KeepAliveMemory,
    /// wrk over HTTPS against nginx with TLS: the TLS part off vs attached.
    Tls,
    /// h2load over plaintext HTTP/2 against nginx: links off vs on.
    H2c,
}

impl Mode {
    pub(crate) const ALL: [Mode; 17] = [
        Mode::H2c,
        Mode::Tls,
        Mode::KeepAliveMemory,
        Mode::FirstHop,
        Mode::Incidents,
        Mode::Sampling,
        Mode::SamplingMemory,
        Mode::Baseline,
        Mode::Floor,
        Mode::Text,
        Mode::Otlp,
        Mode::OtlpHttp,
        Mode::Libbpf,
        Mode::Memory,
        Mode::LinksChurn,
        Mode::LinksBulk,
        Mode::LinksWrk,
    ];
    /// `--runs links`.
    pub(crate) const LINKS: [Mode; 3] = [Mode::LinksChurn, Mode::LinksBulk, Mode::LinksWrk];
    /// The untraced run comes again after the traced ones, to show drift. The
    /// links runs come after the throughput table, the memory run last.
    pub(crate) const DEFAULT: [Mode; 11] = [
        Mode::Baseline,
        Mode::Floor,
        Mode::Text,
        Mode::Otlp,
        Mode::OtlpHttp,
        Mode::Libbpf,
        Mode::Baseline,
        Mode::LinksChurn,
        Mode::LinksBulk,
        Mode::LinksWrk,
        Mode::Memory,
    ];

    /// One run's name, or `links` for all three links runs.
    pub(crate) fn parse(s: &str) -> Result<Vec<Mode>> {
        if s == "links" {
            return Ok(Mode::LINKS.to_vec());
        }
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .map(|m| vec![m])
            .with_context(|| format!("unknown run {s:?}\n{USAGE}"))
    }

    /// A churn run of one tracer (or none), a row of the throughput table.
    pub(crate) fn is_throughput(self) -> bool {
        !matches!(
            self,
            Mode::Memory
                | Mode::Sampling
                | Mode::SamplingMemory
                | Mode::Incidents
                | Mode::FirstHop
                | Mode::KeepAliveMemory
                | Mode::Tls
                | Mode::H2c
        ) && !self.is_links()
    }

    pub(crate) fn is_links(self) -> bool {
        Mode::LINKS.contains(&self)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Baseline => "baseline",
            Mode::Floor => "floor",
            Mode::Text => "text",
            Mode::Otlp => "otlp",
            Mode::OtlpHttp => "otlp-http",
            Mode::Libbpf => "libbpf",
            Mode::Memory => "memory",
            Mode::LinksChurn => "links-churn",
            Mode::LinksBulk => "links-bulk",
            Mode::LinksWrk => "links-wrk",
            Mode::Sampling => "sampling",
            Mode::SamplingMemory => "sampling-memory",
            Mode::Incidents => "incidents",
            Mode::FirstHop => "first-hop",
            Mode::KeepAliveMemory => "memory-keepalive",
            Mode::Tls => "tls",
            Mode::H2c => "h2c",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            Mode::Baseline => "untraced",
            Mode::Floor => "floor (a program that only counts)",
            Mode::Text => "otel-tcpstates text",
            Mode::Otlp => "otel-tcpstates OTLP/gRPC",
            Mode::OtlpHttp => "otel-tcpstates OTLP/HTTP",
            Mode::Libbpf => "libbpf-tools tcpstates",
            Mode::Memory => "memory",
            Mode::LinksChurn => "links: churn",
            Mode::LinksBulk => "links: bulk",
            Mode::LinksWrk => "links: wrk against nginx",
            Mode::Sampling => "sampling: churn",
            Mode::SamplingMemory => "sampling: memory",
            Mode::Incidents => "incidents",
            Mode::FirstHop => "first hop",
            Mode::KeepAliveMemory => "memory: keep-alive connections, collector stalled",
            Mode::Tls => "TLS part: wrk over HTTPS against nginx",
            Mode::H2c => "HTTP/2: h2load over h2c against nginx",
        }
    }
}

pub(crate) struct Options {
    /// Measured seconds per throughput run.
    pub(crate) seconds: u64,
    /// Seconds of churn before measuring (the tracer's buffers and caches fill).
    pub(crate) warmup: u64,
    pub(crate) runs: Vec<Mode>,
    /// Distinct sockets the memory run churns through (two per connection).
    pub(crate) memory_sockets: u64,
    /// Connections the memory run holds open at once (two sockets each).
    pub(crate) hold_connections: u64,
    /// Pin the churn's client and server threads to CPU 0 (see [`Churn::start`]);
    /// the bulk transfer's too, and nginx and wrk to a core each (see `links.rs`).
    pub(crate) pin: bool,
    /// Links off/on pairs per links run, alternating which comes first.
    pub(crate) link_rounds: u64,
    /// Measured seconds per links run: many short alternating windows average out
    /// this machine's drift better than a few long ones.
    pub(crate) link_seconds: u64,
    /// The keep-alive memory run's connections (two sockets each) and requests on each.
    pub(crate) keepalive_connections: u64,
    pub(crate) keepalive_requests: u64,
    /// The daemon the keep-alive memory run starts, instead of this build's
    /// (another build's binary, to compare).
    pub(crate) daemon: Option<String>,
}

pub(crate) fn parse_options() -> Result<Options> {
    let mut o = Options {
        seconds: 10,
        warmup: 2,
        runs: Mode::DEFAULT.to_vec(),
        memory_sockets: 1_000_000,
        hold_connections: 32_768,
        pin: true,
        link_rounds: 3,
        link_seconds: 4,
        keepalive_connections: 65_536,
        keepalive_requests: 64,
        daemon: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .with_context(|| format!("{arg} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--bench" => {} // cargo bench passes it to every bench binary
            "--seconds" => o.seconds = value()?.parse()?,
            "--warmup" => o.warmup = value()?.parse()?,
            "--memory-sockets" => o.memory_sockets = value()?.parse()?,
            "--hold-connections" => o.hold_connections = value()?.parse()?,
            "--no-pin" => o.pin = false,
            "--keepalive-connections" => o.keepalive_connections = value()?.parse()?,
            "--keepalive-requests" => o.keepalive_requests = value()?.parse()?,
            "--daemon" => o.daemon = Some(value()?),
            "--link-rounds" => o.link_rounds = value()?.parse()?,
            "--link-seconds" => o.link_seconds = value()?.parse()?,
            "--runs" => {
                o.runs = value()?
                    .split(',')
                    .map(Mode::parse)
                    .collect::<Result<Vec<_>>>()?
                    .concat()
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    ensure!(o.seconds > 0, "--seconds must be at least 1");
    ensure!(o.link_rounds > 0, "--link-rounds must be at least 1");
    ensure!(o.link_seconds > 0, "--link-seconds must be at least 1");
    ensure!(
        o.keepalive_connections > 0 && o.keepalive_requests > 0,
        "--keepalive-connections and --keepalive-requests must be at least 1"
    );
    Ok(o)
}
