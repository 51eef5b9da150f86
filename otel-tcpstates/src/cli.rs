//! Command-line flags, mirroring bcc's tcpstates (and tcplife's `-p`).
use std::{fmt, num::NonZeroUsize, str::FromStr, time::Duration};

use clap::{ArgAction, Parser};

use crate::sampling::{rules::KeepRules, settings::parse_ratio};

const EXAMPLES: &str = "\
Examples:
  otel-tcpstates              # trace all TCP state changes
  otel-tcpstates -t           # include timestamp column
  otel-tcpstates -T           # include time column (HH:MM:SS)
  otel-tcpstates -w           # wider columns (fit IPv6)
  otel-tcpstates -stT         # csv output, with times & timestamps
  otel-tcpstates -L 80        # only trace local port 80
  otel-tcpstates -L 80,81     # only trace local ports 80 and 81
  otel-tcpstates -D 8000-8080 # only trace remote ports 8000 to 8080
  otel-tcpstates -p 181       # only sockets owned by PID 181
  otel-tcpstates -Y           # also log each state change to the systemd journal
  otel-tcpstates --otlp-endpoint http://localhost:4318            # spans over OTLP/HTTP
  otel-tcpstates --otlp-endpoint http://localhost:4317 --otlp-protocol grpc --print
  otel-tcpstates --otlp-endpoint http://localhost:4318 --sample-ratio 0.01  # 1% of the traces,
                              # and every failed, retransmitting or slow connection";

/// What preflight checks, said where users look first.
fn after_help() -> String {
    let (major, minor) = crate::kernel::preflight::MIN_LINUX;
    format!(
        "{EXAMPLES}\n\nNeeds Linux >= {major}.{minor} (BPF ring buffer) and root, or CAP_BPF + CAP_PERFMON \
         (+ CAP_NET_ADMIN for --links; + CAP_DAC_READ_SEARCH when not root: tracefs is root's)."
    )
}

/// Trace TCP socket state changes and the time spent in each state, from the kernel (eBPF).
#[derive(Debug, Parser)]
#[command(name = "otel-tcpstates", version, after_help = after_help())]
pub struct Cli {
    /// Include a time column (HH:MM:SS)
    #[arg(short = 'T', long = "time")]
    pub time: bool,

    /// Include a timestamp column (seconds since the first event)
    #[arg(short = 't', long = "timestamp")]
    pub timestamp: bool,

    /// Wide columns (fit IPv6 addresses) and an IP version column
    #[arg(short = 'w', long = "wide")]
    pub wide: bool,

    /// Comma-separated values
    #[arg(short = 's', long = "csv")]
    pub csv: bool,

    /// Only local ports in PORTS (comma-separated ports or ranges, e.g. 80,443,8000-8080)
    #[arg(short = 'L', long = "localport", value_name = "PORTS")]
    pub localport: Option<PortSet>,

    /// Only remote ports in PORTS (comma-separated ports or ranges)
    #[arg(short = 'D', long = "remoteport", value_name = "PORTS")]
    pub remoteport: Option<PortSet>,

    /// Only IPv4 sockets
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// Only IPv6 sockets
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// Only sockets owned by this process (the one that connected, listened or closed it)
    #[arg(short = 'p', long = "pid", value_name = "PID",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pid: Option<u32>,

    /// Also log each state change to the systemd journal, with structured fields
    /// (journald's socket: /run/systemd/journal/socket, or OTEL_TCPSTATES_JOURNAL_SOCKET)
    #[arg(short = 'Y', long = "journal")]
    pub journal: bool,

    /// Export each socket as a trace to this OTLP endpoint (base URL, e.g.
    /// http://localhost:4318); also OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT
    #[arg(long = "otlp-endpoint", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// OTLP transport: grpc or http/protobuf (default; also OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL)
    #[arg(long = "otlp-protocol", value_name = "PROTOCOL", value_parser = ["grpc", "http/protobuf"])]
    pub otlp_protocol: Option<String>,

    /// Also trace the tracer's own sockets (its connections to the collector)
    #[arg(long = "trace-self")]
    pub trace_self: bool,

    /// Link each socket's root span to the HTTP/1.x and HTTP/2 (gRPC, h2c)
    /// requests that used it, from their W3C traceparent headers, and put a
    /// tcp.request span for each sampled
    /// request into its application's trace (packet programs on the cgroup v2
    /// root; needs CAP_NET_ADMIN; off by default for what it costs, see
    /// BENCHMARKS.md)
    #[arg(long = "links", overrides_with = "no_links")]
    pub links: bool,

    /// No span links: the packet programs stay unloaded (the default)
    #[arg(long = "no-links", overrides_with = "links")]
    pub no_links: bool,

    /// With --links: also read the requests inside TLS (HTTP/1.x and HTTP/2),
    /// from uprobes on OpenSSL's
    /// SSL_write/SSL_read (the system's libssl.so.3, node, and the libssl of
    /// running processes; needs CAP_SYS_ADMIN, or CAP_PERFMON and CAP_BPF). Off by
    /// default for what it costs: every SSL_write and SSL_read of every process
    /// then takes a trap into the kernel (see BENCHMARKS.md)
    #[arg(long = "tls", requires = "links")]
    pub tls: bool,

    /// With --tls: also read TLS requests in this file, a library or an
    /// executable that exports OpenSSL's SSL_write and SSL_read (repeatable)
    #[arg(long = "tls-library", value_name = "PATH", requires = "tls")]
    pub tls_libraries: Vec<std::path::PathBuf>,

    /// tcplife mode: one line per closed connection (owner, KiB the peer acknowledged
    /// and KiB received, lifespan)
    #[arg(long = "life")]
    pub life: bool,

    /// Export each owning process's sockets under its own service.name (its command
    /// name) instead of otel-tcpstates
    #[arg(long = "service-per-process")]
    pub service_per_process: bool,

    /// Keep each socket's trace with probability P (0 to 1), decided consistently on
    /// its trace id (spans carry `ot=th:`); failed, retransmitting and slow
    /// connections are kept whatever P says (see the --no-keep-* flags). Wins over
    /// OTEL_TRACES_SAMPLER [default: every trace]
    #[arg(long = "sample-ratio", value_name = "P", value_parser = parse_ratio)]
    pub sample_ratio: Option<f64>,

    /// With sampling: do not keep every connection that ended in error
    #[arg(long = "no-keep-errors")]
    pub no_keep_errors: bool,

    /// With sampling: leave connections that failed with these error.type values
    /// to probability, e.g. `reset_sent,connect_aborted` (comma-separated)
    #[arg(
        long = "keep-errors-except",
        value_name = "TYPES",
        value_delimiter = ','
    )]
    pub keep_errors_except: Vec<String>,

    /// No span events for retransmissions, resets, socket errors and congestion
    /// states: their tracepoint programs stay unloaded
    #[arg(long = "no-incidents")]
    pub no_incidents: bool,

    /// With sampling: do not keep every connection the kernel retransmitted on
    #[arg(long = "no-keep-retransmits")]
    pub no_keep_retransmits: bool,

    /// With sampling: keep every connection whose handshake (SYN_SENT or SYN_RECV)
    /// took at least this long
    #[arg(long = "slow-handshake", value_name = "DURATION", default_value = "100ms",
          value_parser = humantime::parse_duration)]
    pub slow_handshake: Duration,

    /// With sampling: do not keep connections for a slow handshake
    #[arg(long = "no-keep-slow-handshakes")]
    pub no_keep_slow_handshakes: bool,

    /// With sampling and links: do not keep every connection that carried a request
    /// its application sampled (the links from that request's trace then may lead
    /// nowhere; its request span is made all the same)
    #[arg(long = "no-keep-sampled-requests")]
    pub no_keep_sampled_requests: bool,

    /// With sampling: also keep every connection that lived at least this long (e.g. 30s)
    #[arg(long = "keep-longer-than", value_name = "DURATION",
          value_parser = humantime::parse_duration)]
    pub keep_longer_than: Option<Duration>,

    /// Print the text output too when exporting spans
    #[arg(long = "print")]
    pub print: bool,

    /// Sockets followed at once for traces; the least recently active is ended
    /// (its spans marked evicted) to make room
    #[arg(long = "max-sockets", value_name = "N", default_value = "65536")]
    pub max_sockets: NonZeroUsize,

    /// Attribute sets kept per connection metric (exported whenever metrics are:
    /// an OTLP endpoint, OTEL_METRICS_EXPORTER not none); measurements of new ones
    /// beyond go to one series marked otel.metric.overflow=true, and are counted
    #[arg(long = "metrics-max-series", value_name = "N", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub metrics_max_series: u64,

    /// Add each connection's peer address (network.peer.address) to the connection
    /// metrics: a series per peer, so mind --metrics-max-series
    #[arg(long = "metrics-peer-address")]
    pub metrics_peer_address: bool,

    /// On SIGTERM/SIGINT, exit within this many seconds: printing what is still
    /// queued, ending the sessions and sending the last spans share it; what does
    /// not fit is counted as lost events or spans not sent
    #[arg(long = "shutdown-timeout", value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(0..=600))]
    pub shutdown_timeout: u64,

    /// Log the tracer's own counters (events seen/lost, sessions, spans) as one line
    /// every SECS seconds; 0 turns it off [default: 60 when exporting, else off]
    #[arg(long = "stats-interval", value_name = "SECS")]
    pub stats_interval: Option<u64>,

    /// Kernel ring buffer size in MiB (a power of two); larger survives longer bursts
    #[arg(long = "ring-buffer-mib", value_name = "MIB", default_value_t = 8,
          value_parser = parse_ring_buffer_mib)]
    pub ring_buffer_mib: u32,

    /// How often to drain the ring buffer when the kernel has not woken us, in milliseconds
    #[arg(long = "poll-ms", value_name = "MS", default_value_t = 50,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub poll_ms: u64,

    /// More diagnostics on stderr (-v, -vv)
    #[arg(short = 'v', long = "verbose", action = ArgAction::Count)]
    pub verbose: u8,
}

impl Cli {
    /// The keep rules the flags leave on.
    pub fn keep_rules(&self) -> KeepRules {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        KeepRules {
            errors: !self.no_keep_errors,
            errors_except: self.keep_errors_except.clone(),
            retransmits: !self.no_keep_retransmits,
            slow_handshake_ns: (!self.no_keep_slow_handshakes).then(|| ns(self.slow_handshake)),
            longer_than_ns: self.keep_longer_than.map(ns),
            sampled_requests: self.links && !self.no_keep_sampled_requests,
        }
    }
}

/// A set of TCP ports given as `80,443,8000-8080`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet(Vec<u16>);

impl PortSet {
    pub fn ports(&self) -> &[u16] {
        &self.0
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct PortSetError(String);

impl fmt::Display for PortSetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PortSetError {}

fn parse_port(text: &str) -> Result<u16, PortSetError> {
    match text.trim().parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        Ok(_) => Err(PortSetError(format!(
            "port '{text}' is out of range 1-65535"
        ))),
        Err(_) => Err(PortSetError(format!("'{text}' is not a port number"))),
    }
}

impl FromStr for PortSet {
    type Err = PortSetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut ports = Vec::new();
        for item in text.split(',') {
            match item.split_once('-') {
                Some((first, last)) => {
                    let (first, last) = (parse_port(first)?, parse_port(last)?);
                    if first > last {
                        return Err(PortSetError(format!("empty port range '{item}'")));
                    }
                    ports.extend(first..=last);
                }
                None => ports.push(parse_port(item)?),
            }
        }
        ports.sort_unstable();
        ports.dedup();
        Ok(PortSet(ports))
    }
}

fn parse_ring_buffer_mib(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(mib @ 1..=1024) if mib.is_power_of_two() => Ok(mib),
        _ => Err(format!("'{text}' is not a power of two from 1 to 1024")),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, error::ErrorKind};

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("otel-tcpstates").chain(args.iter().copied()))
    }

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn port_lists_and_ranges() {
        let set: PortSet = "443,80,8000-8002,80".parse().unwrap();
        assert_eq!(set.ports(), &[80, 443, 8000, 8001, 8002]);
    }

    #[test]
    fn bad_ports_are_named_in_the_error() {
        assert_eq!(
            "abc".parse::<PortSet>().unwrap_err().to_string(),
            "'abc' is not a port number"
        );
        assert_eq!(
            "80,70000".parse::<PortSet>().unwrap_err().to_string(),
            "port '70000' is out of range 1-65535"
        );
        assert!("0".parse::<PortSet>().is_err());
        assert!("90-80".parse::<PortSet>().is_err());
        assert!("".parse::<PortSet>().is_err());
    }

    #[test]
    fn bad_flags_are_usage_errors() {
        for args in [
            &["-L", "abc"][..],
            &["-D", "70000"],
            &["-4", "-6"],
            &["--bogus"],
            &["-p", "0"],
            &["-p", "x"],
            &["--ring-buffer-mib", "3"],
            &["--otlp-protocol", "http/json"],
            &["--max-sockets", "0"],
            &["--sample-ratio", "1.5"],
            &["--sample-ratio", "-1"],
            &["--slow-handshake", "fast"],
            &["--keep-longer-than", "10"],
            &["--metrics-max-series", "0"],
            &["--metrics-max-series", "many"],
        ] {
            let err = parse(args).unwrap_err();
            assert_ne!(err.kind(), ErrorKind::DisplayHelp, "{args:?}");
            assert_eq!(err.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn keep_rules_default_on_and_turn_off_one_by_one() {
        assert_eq!(
            parse(&["--links"]).unwrap().keep_rules(),
            KeepRules::default()
        );
        let rules = parse(&[
            "--no-keep-errors",
            "--slow-handshake",
            "250ms",
            "--keep-longer-than",
            "1m",
        ])
        .unwrap()
        .keep_rules();
        assert_eq!(
            rules,
            KeepRules {
                errors: false,
                errors_except: Vec::new(),
                retransmits: true,
                slow_handshake_ns: Some(250_000_000),
                longer_than_ns: Some(60_000_000_000),
                // Without links no request is seen.
                sampled_requests: false,
            }
        );
        let rules = parse(&["--no-keep-retransmits", "--no-keep-slow-handshakes"])
            .unwrap()
            .keep_rules();
        assert!(rules.errors && !rules.retransmits && rules.slow_handshake_ns.is_none());
        let rules = parse(&["--links", "--no-keep-sampled-requests"])
            .unwrap()
            .keep_rules();
        assert!(!rules.sampled_requests && rules.errors);
    }

    #[test]
    fn combined_short_flags() {
        let cli = parse(&["-stTY", "-L", "80", "-4", "-p", "42"]).unwrap();
        assert!(cli.csv && cli.timestamp && cli.time && cli.journal && cli.ipv4 && !cli.ipv6);
        assert_eq!(cli.localport.unwrap().ports(), &[80]);
        assert_eq!(cli.pid, Some(42));
        assert_eq!(
            (cli.metrics_max_series, cli.metrics_peer_address),
            (2000, false)
        );
    }
}
