//! The connection metrics: their instruments, the attributes of a session, and the
//! recording of each ended session and of the connections open now.
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, PoisonError},
};

use foldhash::fast::RandomState;
use opentelemetry::{
    KeyValue,
    metrics::{Counter, Histogram, Meter},
};
use otel_tcpstates_common::tcp_state;

use crate::{
    kernel::event::TcpState,
    metrics::series::Series,
    sessions::outcome::ErrorType,
    sessions::table::{Role, Session, SessionTable, Update},
};

/// Metric names (OpenTelemetry's `tcpstates.` namespace for ours, next to the
/// spans' attributes).
pub mod name {
    pub const DURATION: &str = "tcpstates.connection.duration";
    pub const HANDSHAKE: &str = "tcpstates.connection.handshake.duration";
    pub const RETRANSMITS: &str = "tcpstates.connection.retransmits";
    pub const IO: &str = "tcpstates.connection.io";
    pub const OPEN: &str = "tcpstates.connection.open";
    /// What every connection metric's name starts with (for the SDK's views).
    pub const PREFIX: &str = "tcpstates.connection.";
}

/// Attribute keys: semantic conventions, and the spans' `tcpstates.role`.
pub mod attr {
    pub const ROLE: &str = "tcpstates.role";
    pub const SERVER_PORT: &str = "server.port";
    pub const NETWORK_TYPE: &str = "network.type";
    pub const ERROR_TYPE: &str = "error.type";
    pub const PEER_ADDRESS: &str = "network.peer.address";
    pub const STATE: &str = "network.connection.state";
    pub const IO_DIRECTION: &str = "network.io.direction";
}

/// Histogram bucket boundaries in seconds, 1-2.5-5 per decade from 10 µs (a
/// loopback handshake) to 100 s (long connections, SYN retries): the SDK's default
/// (0 to 10,000, meant for milliseconds) would put nearly every TCP duration in
/// its first bucket.
pub const BOUNDARIES: [f64; 22] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetricsOptions {
    /// Attribute sets kept per metric; new ones beyond go to the overflow series.
    pub max_series: usize,
    /// Adds `network.peer.address` (one series per peer: mind the cap).
    pub peer_address: bool,
}

impl Default for MetricsOptions {
    fn default() -> Self {
        Self {
            max_series: 2000,
            peer_address: false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Transmit,
    Receive,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Self::Transmit => "transmit",
            Self::Receive => "receive",
        }
    }
}

/// What sets a session's series apart, compactly (the attributes it stands for
/// are built once per series, see [`Series`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeriesKey {
    pub role: Role,
    /// `None` for an unknown role, or a port not yet known.
    pub server_port: Option<u16>,
    pub ipv6: bool,
    pub error: Option<ErrorType>,
    /// With `peer_address` only.
    pub peer: Option<IpAddr>,
}

impl SeriesKey {
    pub fn of(session: &Session, peer_address: bool) -> Self {
        let server_port = match session.role {
            Role::Client => Some(session.remote_port),
            Role::Server | Role::Listener => Some(session.local_port),
            Role::Unknown => None,
        };
        Self {
            role: session.role,
            server_port: server_port.filter(|&port| port != 0),
            ipv6: !session.is_ipv4(),
            error: session.error,
            peer: Some(session.remote_addr).filter(|addr| peer_address && !addr.is_unspecified()),
        }
    }

    /// The attributes every connection metric carries.
    pub fn attributes(&self) -> Vec<KeyValue> {
        let mut out = Vec::with_capacity(6);
        out.push(KeyValue::new(attr::ROLE, self.role.as_str()));
        if let Some(port) = self.server_port {
            out.push(KeyValue::new(attr::SERVER_PORT, i64::from(port)));
        }
        let version = if self.ipv6 { "ipv6" } else { "ipv4" };
        out.push(KeyValue::new(attr::NETWORK_TYPE, version));
        if let Some(error) = self.error {
            out.push(KeyValue::new(attr::ERROR_TYPE, error.as_str()));
        }
        if let Some(peer) = self.peer {
            out.push(KeyValue::new(attr::PEER_ADDRESS, peer.to_string()));
        }
        out
    }
}

/// `network.connection.state`: the semantic conventions' values (`syn_received`,
/// `fin_wait_1`, ...); a number the kernel may add prints as its digits.
pub fn state_value(state: TcpState) -> std::borrow::Cow<'static, str> {
    use tcp_state::*;
    let name = match state.0 {
        ESTABLISHED => "established",
        SYN_SENT => "syn_sent",
        SYN_RECV | NEW_SYN_RECV => "syn_received",
        FIN_WAIT1 => "fin_wait_1",
        FIN_WAIT2 => "fin_wait_2",
        TIME_WAIT => "time_wait",
        CLOSE => "closed",
        CLOSE_WAIT => "close_wait",
        LAST_ACK => "last_ack",
        LISTEN => "listen",
        CLOSING => "closing",
        other => return other.to_string().into(),
    };
    name.into()
}

/// The open connections' counts, as the last publish left them, for the SDK's
/// collection callback on its own thread.
type OpenSnapshot = Arc<Mutex<Vec<(Arc<[KeyValue]>, i64)>>>;

/// Connection metrics counted from every session the table reports.
pub struct ConnectionMetrics {
    peer_address: bool,
    duration: Histogram<f64>,
    handshake: Histogram<f64>,
    retransmits: Counter<u64>,
    io: Counter<u64>,
    /// Duration, handshake and retransmits: the same attribute sets, one lookup.
    ended: Series<SeriesKey>,
    io_series: Series<(SeriesKey, Direction)>,
    open_series: Series<(SeriesKey, u8)>,
    open: OpenSnapshot,
    /// Whether an earlier publish had connections in the overflow series: it then
    /// reports 0 rather than its last count once they are gone.
    open_overflowed: bool,
    /// Reused by each publish.
    counting: HashMap<(SeriesKey, u8), i64, RandomState>,
    overflowed: u64,
}

impl ConnectionMetrics {
    pub fn new(meter: &Meter, options: MetricsOptions) -> Self {
        let max = options.max_series.max(1);
        let open: OpenSnapshot = Arc::default();
        let observed = Arc::clone(&open);
        // Registered callbacks live as long as the provider; the handle is not needed.
        let _ = meter
            .i64_observable_up_down_counter(name::OPEN)
            .with_unit("{connection}")
            .with_description(
                "TCP connections open now, by state: the sockets the session table follows",
            )
            .with_callback(move |out| {
                let open = observed.lock().unwrap_or_else(PoisonError::into_inner);
                for (attributes, count) in open.iter() {
                    out.observe(*count, attributes);
                }
            })
            .build();
        Self {
            peer_address: options.peer_address,
            duration: meter
                .f64_histogram(name::DURATION)
                .with_unit("s")
                .with_description(
                    "How long TCP connections lasted, first state change seen to CLOSE \
                     (or to the end of their session), as the kernel timed them",
                )
                .with_boundaries(BOUNDARIES.to_vec())
                .build(),
            handshake: meter
                .f64_histogram(name::HANDSHAKE)
                .with_unit("s")
                .with_description(
                    "Time in SYN_SENT (client) or SYN_RECV (server), as the kernel timed it",
                )
                .with_boundaries(BOUNDARIES.to_vec())
                .build(),
            retransmits: meter
                .u64_counter(name::RETRANSMITS)
                .with_unit("{segment}")
                .with_description(
                    "Segments retransmitted by connections that closed (the kernel's \
                     total_retrans, read at CLOSE)",
                )
                .build(),
            io: meter
                .u64_counter(name::IO)
                .with_unit("By")
                .with_description(
                    "Bytes the peer acknowledged (transmit) and bytes received (receive) by \
                     connections that closed, read at CLOSE as the kernel counts them \
                     (bytes_acked, bytes_received): in sequence space, payload once however \
                     often sent, plus one for each SYN or FIN acknowledged and FIN received",
                )
                .build(),
            ended: Series::new(max),
            io_series: Series::new(max),
            open_series: Series::new(max),
            open,
            open_overflowed: false,
            counting: HashMap::with_hasher(RandomState::default()),
            overflowed: 0,
        }
    }

    /// Every update the session table reports (before sampling).
    pub fn update(&mut self, update: &Update<'_>) {
        let Update::SessionEnded(session, end_ns, _) = update else {
            return;
        };
        let key = SeriesKey::of(session, self.peer_address);
        let (attributes, overflowed) = self.ended.get(key, SeriesKey::attributes);
        let mut measured = 1;
        self.duration
            .record(seconds(end_ns.saturating_sub(session.birth_ns)), attributes);
        if let Some(handshake_ns) = session.handshake_ns {
            self.handshake.record(seconds(handshake_ns), attributes);
            measured += 1;
        }
        let Some(facts) = session.facts else {
            self.overflowed += if overflowed { measured } else { 0 };
            return;
        };
        self.retransmits
            .add(u64::from(facts.total_retrans), attributes);
        measured += 1;
        self.overflowed += if overflowed { measured } else { 0 };
        for (direction, bytes) in [
            (Direction::Transmit, facts.bytes_acked),
            (Direction::Receive, facts.bytes_received),
        ] {
            let (attributes, overflowed) = self.io_series.get((key, direction), |(key, dir)| {
                let mut attributes = key.attributes();
                attributes.push(KeyValue::new(attr::IO_DIRECTION, dir.as_str()));
                attributes
            });
            self.io.add(bytes, attributes);
            self.overflowed += u64::from(overflowed);
        }
    }

    /// Called about once a second from the main loop: the connections open now, by
    /// state. Every series seen so far is reported, at 0 when none is open, so a
    /// count falls to 0 instead of staying at its last value.
    pub fn publish(&mut self, table: &SessionTable) {
        self.counting.clear();
        for session in table.sessions() {
            let key = (SeriesKey::of(session, self.peer_address), session.state.0);
            *self.counting.entry(key).or_default() += 1;
        }
        let mut snapshot = Vec::with_capacity(self.open_series.len() + 1);
        let mut in_overflow = 0;
        for (&key, &count) in &self.counting {
            let (attributes, overflowed) = self.open_series.get(key, |(key, state)| {
                let mut attributes = key.attributes();
                attributes.push(KeyValue::new(
                    attr::STATE,
                    state_value(TcpState(*state)).into_owned(),
                ));
                attributes
            });
            if overflowed {
                // One value that had no series of its own.
                self.overflowed += 1;
                in_overflow += count;
            } else {
                snapshot.push((Arc::clone(attributes), count));
            }
        }
        for (key, attributes) in self.open_series.iter() {
            if !self.counting.contains_key(key) {
                snapshot.push((Arc::clone(attributes), 0));
            }
        }
        if in_overflow > 0 || self.open_overflowed {
            snapshot.push((Arc::clone(self.open_series.overflow()), in_overflow));
            self.open_overflowed = true;
        }
        *self.open.lock().unwrap_or_else(PoisonError::into_inner) = snapshot;
    }

    /// Measurements that went to an overflow series so far (for the self-metrics):
    /// one per value recorded there for an ended session, and one per attribute
    /// set of open connections each publish turned away.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

/// Kernel nanoseconds as the seconds the metrics are in.
fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv6Addr, num::NonZeroUsize};

    use std::time::Duration;

    use opentelemetry::metrics::MeterProvider as _;
    use opentelemetry_sdk::{
        error::OTelSdkResult,
        metrics::{
            PeriodicReader, SdkMeterProvider, Temporality,
            data::{AggregatedMetrics, MetricData, ResourceMetrics},
            exporter::PushMetricExporter,
        },
    };
    use otel_tcpstates_common::tcp_state::*;

    use super::*;
    use crate::sessions::table::{
        EndReason,
        tests::{SK, client_events, ev},
    };

    /// A data point flattened: sorted attributes as text, count (or value), sum.
    type Point = (String, u64, f64);

    /// Keeps each export's points by metric (the SDK's readers for tests need
    /// features the daemon does not build with).
    #[derive(Clone, Debug, Default)]
    struct Kept(Arc<Mutex<HashMap<String, Vec<Point>>>>);

    impl PushMetricExporter for Kept {
        async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
            let mut kept = self.0.lock().unwrap();
            kept.clear();
            for m in metrics.scope_metrics().flat_map(|s| s.metrics()) {
                kept.insert(m.name().to_owned(), flatten(m.data()));
            }
            Ok(())
        }
        fn force_flush(&self) -> OTelSdkResult {
            Ok(())
        }
        fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
            Ok(())
        }
        fn temporality(&self) -> Temporality {
            Temporality::Cumulative
        }
    }

    fn text<'a>(attributes: impl Iterator<Item = &'a KeyValue>) -> String {
        let mut kv: Vec<String> = attributes
            .map(|kv| format!("{}={}", kv.key, kv.value))
            .collect();
        kv.sort();
        kv.join(",")
    }

    fn flatten(data: &AggregatedMetrics) -> Vec<Point> {
        let mut out: Vec<Point> = match data {
            AggregatedMetrics::F64(MetricData::Histogram(h)) => h
                .data_points()
                .map(|p| (text(p.attributes()), p.count(), p.sum()))
                .collect(),
            AggregatedMetrics::U64(MetricData::Sum(s)) => s
                .data_points()
                .map(|p| (text(p.attributes()), p.value(), 0.0))
                .collect(),
            AggregatedMetrics::I64(MetricData::Sum(s)) => s
                .data_points()
                .map(|p| (text(p.attributes()), p.value() as u64, 0.0))
                .collect(),
            other => panic!("unexpected data {other:?}"),
        };
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn provider() -> (SdkMeterProvider, Kept) {
        let kept = Kept::default();
        let provider = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(kept.clone()).build())
            .build();
        (provider, kept)
    }

    /// What a collection now exports.
    fn collect(provider: &SdkMeterProvider, kept: &Kept) -> HashMap<String, Vec<Point>> {
        provider.force_flush().unwrap();
        kept.0.lock().unwrap().clone()
    }

    fn points(exported: &HashMap<String, Vec<Point>>, metric: &str) -> Vec<Point> {
        exported.get(metric).cloned().unwrap_or_default()
    }

    fn table() -> SessionTable {
        SessionTable::new(NonZeroUsize::new(64).unwrap())
    }

    fn feed(metrics: &mut ConnectionMetrics, table: &mut SessionTable, events: &[TcpEvent]) {
        for event in events {
            table.apply_settled(event, &mut |update| metrics.update(&update));
        }
    }

    use crate::kernel::event::TcpEvent;

    #[test]
    fn boundaries_run_from_10_us_to_100_s_in_steps_of_1_2_5_5() {
        assert_eq!(BOUNDARIES.first(), Some(&0.00001));
        assert_eq!(BOUNDARIES.last(), Some(&100.0));
        for decade in BOUNDARIES.chunks(3) {
            if let [one, two_five, five] = decade {
                assert!((two_five / one - 2.5).abs() < 1e-9, "{decade:?}");
                assert!((five / one - 5.0).abs() < 1e-9, "{decade:?}");
            }
        }
        assert!(BOUNDARIES.windows(2).all(|w| w[0] < w[1]));
        assert!(
            BOUNDARIES
                .windows(3)
                .step_by(3)
                .all(|w| (w[2] / w[0] - 5.0).abs() < 1e-9)
        );
    }

    #[test]
    fn states_have_their_semantic_convention_values() {
        let value = |s| state_value(TcpState(s)).into_owned();
        assert_eq!(value(SYN_SENT), "syn_sent");
        assert_eq!(value(SYN_RECV), "syn_received");
        assert_eq!(value(FIN_WAIT1), "fin_wait_1");
        assert_eq!(value(CLOSE_WAIT), "close_wait");
        assert_eq!(value(200), "200");
    }

    fn session(role: Role, error: Option<ErrorType>) -> Session {
        let (mut t, mut sessions) = (table(), Vec::new());
        for event in client_events(SK, 100) {
            t.apply_settled(&event, &mut |u| {
                if let Update::SessionEnded(s, ..) = u {
                    sessions.push(s.clone());
                }
            });
        }
        let mut s = sessions.pop().unwrap();
        s.role = role;
        s.error = error;
        s.local_port = 8080;
        s.remote_port = 443;
        s
    }

    #[test]
    fn the_key_names_the_server_port_by_role() {
        let text = |s: &Session, peer| {
            let mut attributes = SeriesKey::of(s, peer).attributes();
            attributes.sort_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
            attributes
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(
            text(&session(Role::Client, None), false),
            "network.type=ipv4,server.port=443,tcpstates.role=client"
        );
        assert_eq!(
            text(
                &session(Role::Server, Some(ErrorType::HandshakeFailed)),
                false
            ),
            "error.type=handshake_failed,network.type=ipv4,server.port=8080,tcpstates.role=server"
        );
        assert_eq!(
            text(&session(Role::Listener, None), false),
            "network.type=ipv4,server.port=8080,tcpstates.role=listener"
        );
        let mut unknown = session(Role::Unknown, None);
        unknown.local_addr = IpAddr::V6(Ipv6Addr::LOCALHOST);
        unknown.remote_addr = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert_eq!(
            text(&unknown, true),
            "network.peer.address=::1,network.type=ipv6,tcpstates.role=unknown"
        );
        // Two sessions of one client to one server share their series.
        assert_eq!(
            SeriesKey::of(&session(Role::Client, None), false),
            SeriesKey::of(&session(Role::Client, None), false)
        );
    }

    #[test]
    fn every_ended_session_is_measured_and_the_cap_is_counted() {
        let (provider, kept) = provider();
        let mut metrics = ConnectionMetrics::new(
            &provider.meter("test"),
            MetricsOptions {
                max_series: 2,
                peer_address: false,
            },
        );
        let mut t = table();
        // A clean client (to port 8080), then refused connects to ports 1, 2, 3.
        feed(&mut metrics, &mut t, &client_events(SK, 100));
        for (i, port) in [1u16, 2, 3].into_iter().enumerate() {
            let sk = SK + 1 + i as u64;
            let mut refused = [
                ev(sk, 2000, 0, CLOSE, SYN_SENT, 0),
                ev(sk, 2040, 40, SYN_SENT, CLOSE, 50000),
            ];
            for e in &mut refused {
                e.remote_port = port;
            }
            // The RST that refused it set the socket's error before CLOSE.
            refused[1].facts.sk_err = nix::errno::Errno::ECONNREFUSED as u32;
            feed(&mut metrics, &mut t, &refused);
        }
        // Two open: one established, one in SYN_SENT to a third port (over the cap).
        let mut open = vec![
            ev(SK + 10, 3000, 0, CLOSE, SYN_SENT, 0),
            ev(SK + 10, 3010, 10, SYN_SENT, ESTABLISHED, 40001),
        ];
        let mut other = ev(SK + 11, 3020, 0, CLOSE, SYN_SENT, 0);
        other.remote_port = 9;
        open.push(other);
        feed(&mut metrics, &mut t, &open);
        metrics.publish(&t);
        let exported = collect(&provider, &kept);

        let client = "network.type=ipv4,server.port=8080,tcpstates.role=client";
        let refused1 =
            "error.type=connection_refused,network.type=ipv4,server.port=1,tcpstates.role=client";
        let overflow = "otel.metric.overflow=true";
        assert_eq!(
            points(&exported, name::DURATION),
            [
                (refused1.to_owned(), 1, 40e-9),
                (client.to_owned(), 1, 1065e-9),
                (overflow.to_owned(), 2, 80e-9),
            ]
        );
        assert_eq!(
            points(&exported, name::HANDSHAKE),
            [
                (refused1.to_owned(), 1, 40e-9),
                (client.to_owned(), 1, 50e-9),
                (overflow.to_owned(), 2, 80e-9),
            ]
        );
        assert_eq!(points(&exported, name::RETRANSMITS).len(), 3);
        // Two directions a session: the client's two, then all overflow.
        let io = points(&exported, name::IO);
        assert_eq!(io.len(), 3, "{io:?}");
        assert!(io[0].0.ends_with(
            "network.io.direction=receive,network.type=ipv4,server.port=8080,tcpstates.role=client"
        ));
        assert_eq!(io[2].0, overflow);
        let open = points(&exported, name::OPEN);
        assert_eq!(open.len(), 2, "{open:?}");
        // Per ended session over the cap: duration, handshake, retransmits (3 each
        // for 2 sessions); io: both directions of the 3 refused connects; the open
        // count's set turned away: none (2 open, cap 2).
        assert_eq!(metrics.overflowed(), 2 * 3 + 3 * 2);

        // Once they close, their open counts fall to 0.
        let mut closing = vec![ev(SK + 10, 4000, 990, ESTABLISHED, CLOSE, 40001)];
        let mut other = ev(SK + 11, 4000, 980, SYN_SENT, CLOSE, 40002);
        other.remote_port = 9;
        closing.push(other);
        feed(&mut metrics, &mut t, &closing);
        metrics.publish(&t);
        let exported = collect(&provider, &kept);
        let open = points(&exported, name::OPEN);
        assert!(open.iter().all(|(_, n, _)| *n == 0), "{open:?}");
    }

    /// What one ended session costs (`cargo test --release --lib -- --ignored
    /// cost --nocapture`): its five measurements on known series.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn cost_per_ended_session() {
        let (provider, _kept) = provider();
        let mut metrics =
            ConnectionMetrics::new(&provider.meter("test"), MetricsOptions::default());
        let mut sessions: Vec<Session> = (0..100u16)
            .map(|port| {
                let mut s = session(Role::Client, None);
                s.remote_port = 1000 + port;
                s
            })
            .collect();
        sessions[0].error = Some(ErrorType::ConnectionRefused);
        const ROUNDS: usize = 10_000;
        let started = std::time::Instant::now();
        for _ in 0..ROUNDS {
            for s in &sessions {
                metrics.update(&Update::SessionEnded(
                    s,
                    s.birth_ns + 12_345,
                    EndReason::Closed,
                ));
            }
        }
        let per = started.elapsed() / (ROUNDS * sessions.len()) as u32;
        eprintln!("{per:?} per ended session (5 measurements)");
    }
}
