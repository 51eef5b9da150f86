//! Mapping sessions to OpenTelemetry spans: one trace per socket, a `tcp.session`
//! root, one child per TCP state, all timed by the kernel.
use std::{
    borrow::Cow,
    collections::HashMap,
    hash::{BuildHasher, Hash},
    net::IpAddr,
    sync::Arc,
};

use foldhash::fast::RandomState;
use opentelemetry::{
    InstrumentationScope, KeyValue, StringValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use otel_tcpstates_common::tcp_state;

use crate::{
    clock::WallClock,
    container::ContainerResolver,
    event::{Comm, TcpEvent, TcpState},
    sessions::{EndReason, Failure, Role, Session, StateEnded},
};

pub const ROOT_NAME: &str = "tcp.session";

/// A wall-clock change smaller than this is measurement noise, not a step.
const STEP_NS: i128 = 1_000_000;

/// Attribute keys: OpenTelemetry semantic conventions, plus our own under `tcpstates.`.
pub mod attr {
    pub const NETWORK_TRANSPORT: &str = "network.transport";
    pub const NETWORK_TYPE: &str = "network.type";
    pub const LOCAL_ADDRESS: &str = "network.local.address";
    pub const LOCAL_PORT: &str = "network.local.port";
    pub const PEER_ADDRESS: &str = "network.peer.address";
    pub const PEER_PORT: &str = "network.peer.port";
    pub const CLIENT_ADDRESS: &str = "client.address";
    pub const CLIENT_PORT: &str = "client.port";
    pub const SERVER_ADDRESS: &str = "server.address";
    pub const SERVER_PORT: &str = "server.port";
    pub const PROCESS_PID: &str = "process.pid";
    pub const PROCESS_EXECUTABLE_NAME: &str = "process.executable.name";
    pub const CONTAINER_ID: &str = "container.id";

    /// Connection facts read from the kernel's `struct tcp_sock` at CLOSE (root only),
    /// named and counted as the kernel does (as `ss -i` and tcp_info show them): bytes
    /// in sequence space, so an acknowledged SYN or FIN counts as one byte.
    pub const BYTES_ACKED: &str = "tcpstates.bytes_acked";
    pub const BYTES_RECEIVED: &str = "tcpstates.bytes_received";
    pub const SRTT_US: &str = "tcpstates.srtt_us";
    pub const TOTAL_RETRANS: &str = "tcpstates.total_retrans";
    pub const SEGS_IN: &str = "tcpstates.segs_in";
    pub const SEGS_OUT: &str = "tcpstates.segs_out";

    /// Kernel address of the socket, hex (what tcpstates prints as SKADDR).
    pub const SKADDR: &str = "tcpstates.skaddr";
    /// `client`, `server`, `listener` or `unknown`.
    pub const ROLE: &str = "tcpstates.role";
    /// false when the socket was already open when the tracer first saw it.
    pub const BEGIN_SEEN: &str = "tcpstates.begin_seen";
    /// Why the span ended: `closed`, `evicted`, `shutdown` or `replaced`.
    pub const END_REASON: &str = "tcpstates.end_reason";
    /// On a state span: the state, and the one the socket moved to.
    pub const STATE: &str = "tcpstates.state";
    pub const NEXT_STATE: &str = "tcpstates.next_state";
    /// On a state span: the task on the CPU at the transition out (tcpstates' C-PID,
    /// C-COMM); in softirq context, whichever task was interrupted.
    pub const TRANSITION_PID: &str = "tcpstates.transition.pid";
    pub const TRANSITION_COMM: &str = "tcpstates.transition.comm";

    /// Carries the owning process's name to the exporter with
    /// `--service-per-process`; removed there, never exported.
    pub const SERVICE_ROUTE: &str = "otel_tcpstates.internal.service";
}

/// How spans are built.
#[derive(Clone, Copy, Debug, Default)]
pub struct MapperOptions {
    /// Tag spans with their owner's process name so the exporter can use it as the
    /// service name.
    pub service_per_process: bool,
    /// The kernel reads bytes, RTT and retransmits at CLOSE (BTF was available).
    pub facts: bool,
}

/// Builds span data from session table updates.
pub struct SpanMapper {
    clock: WallClock,
    /// Keyed hash that turns (socket address, birth) into trace and span ids: random
    /// per run, nothing to store per session.
    ids: RandomState,
    scope: InstrumentationScope,
    options: MapperOptions,
    containers: ContainerResolver,
    /// The same few addresses and command names recur in every span: format each once.
    ips: Interner<IpAddr>,
    comms: Interner<Comm>,
}

/// Shared strings for recurring values, so a span's attributes cost no formatting.
struct Interner<K>(HashMap<K, StringValue, RandomState>);

impl<K: Eq + Hash + Copy + std::fmt::Display> Interner<K> {
    /// Bound on distinct values kept; past it the cache starts over.
    const MAX: usize = 4096;

    fn new() -> Self {
        Self(HashMap::default())
    }

    fn get(&mut self, key: K) -> Value {
        if self.0.len() >= Self::MAX && !self.0.contains_key(&key) {
            self.0.clear();
        }
        let text = self
            .0
            .entry(key)
            .or_insert_with(|| StringValue::from(Arc::<str>::from(key.to_string())));
        Value::String(text.clone())
    }
}

/// A state's name without allocating (numbers the kernel may add print as digits).
fn state_name(state: TcpState) -> Cow<'static, str> {
    tcp_state::name(state.0).map_or_else(|| Cow::Owned(state.0.to_string()), Cow::Borrowed)
}

impl SpanMapper {
    pub fn new(clock: WallClock, options: MapperOptions) -> Self {
        Self {
            clock,
            options,
            containers: ContainerResolver::new(),
            ips: Interner::new(),
            comms: Interner::new(),
            ids: RandomState::default(),
            scope: InstrumentationScope::builder(env!("CARGO_PKG_NAME"))
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    /// Looks at an event before the session table does: a transition made by the
    /// socket's owner is the moment to find its container, while it surely lives.
    pub fn observe(&mut self, event: &TcpEvent) {
        if event.cgroup_id != 0 {
            self.containers.resolve(event.pid, event.cgroup_id);
        }
    }

    /// Re-measures the kernel-to-wall-clock offset, and adopts it only when the wall
    /// clock was stepped: the measurement's own jitter (a few hundred ns) would
    /// otherwise open gaps between consecutive state spans.
    pub fn resync_clock(&mut self) {
        let now = WallClock::measure();
        if now.offset_differs(&self.clock, STEP_NS) {
            self.clock = now;
        }
    }

    pub fn trace_id(&self, session: &Session) -> TraceId {
        let key = (session.skaddr, session.birth_ns);
        let high = self.ids.hash_one((1u8, key));
        let low = self.ids.hash_one((2u8, key));
        TraceId::from((u128::from(high) << 64 | u128::from(low)).max(1))
    }

    fn span_id(&self, session: &Session, child: Option<u32>) -> SpanId {
        let id = self
            .ids
            .hash_one((3u8, session.skaddr, session.birth_ns, child));
        SpanId::from(id.max(1))
    }

    fn context(&self, session: &Session, child: Option<u32>) -> SpanContext {
        SpanContext::new(
            self.trace_id(session),
            self.span_id(session, child),
            TraceFlags::SAMPLED,
            false,
            TraceState::NONE,
        )
    }

    /// A child span for a state the socket left.
    pub fn state_span(&mut self, session: &Session, ended: &StateEnded) -> SpanData {
        let mut attributes = self.network_attributes(session, 4);
        attributes.push(KeyValue::new(attr::STATE, state_name(ended.state)));
        if let Some(next) = ended.next {
            attributes.push(KeyValue::new(attr::NEXT_STATE, state_name(next)));
            attributes.push(KeyValue::new(attr::TRANSITION_PID, i64::from(ended.pid)));
            attributes.push(KeyValue::new(
                attr::TRANSITION_COMM,
                self.comms.get(ended.comm),
            ));
        }
        if let Some(reason) = ended.cut_short {
            attributes.push(KeyValue::new(attr::END_REASON, reason.as_str()));
        }
        self.route(session, &mut attributes);
        SpanData {
            span_context: self.context(session, Some(ended.index)),
            parent_span_id: self.span_id(session, None),
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: state_name(ended.state),
            start_time: self.clock.system_time(ended.start_ns),
            end_time: self.clock.system_time(ended.end_ns),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: status(ended.failure),
            instrumentation_scope: self.scope.clone(),
        }
    }

    /// The root span of a session that ended at kernel time `end_ns`.
    pub fn root_span(&mut self, session: &Session, end_ns: u64, reason: EndReason) -> SpanData {
        let mut attributes = self.network_attributes(session, 16);
        let local = (session.local_addr, session.local_port);
        let remote = (session.remote_addr, session.remote_port);
        let (client, server) = match session.role {
            Role::Client => (Some(local), Some(remote)),
            Role::Server => (Some(remote), Some(local)),
            Role::Listener => (None, Some(local)),
            Role::Unknown => (None, None),
        };
        if let Some((addr, port)) = client {
            attributes.push(KeyValue::new(attr::CLIENT_ADDRESS, self.ips.get(addr)));
            attributes.push(KeyValue::new(attr::CLIENT_PORT, i64::from(port)));
        }
        if let Some((addr, port)) = server {
            attributes.push(KeyValue::new(attr::SERVER_ADDRESS, self.ips.get(addr)));
            attributes.push(KeyValue::new(attr::SERVER_PORT, i64::from(port)));
        }
        if let Some(owner) = session.owner {
            attributes.push(KeyValue::new(attr::PROCESS_PID, i64::from(owner.pid)));
            attributes.push(KeyValue::new(
                attr::PROCESS_EXECUTABLE_NAME,
                self.comms.get(owner.comm),
            ));
            if let Some(id) = self.containers.cached(owner.pid, owner.cgroup_id) {
                attributes.push(KeyValue::new(attr::CONTAINER_ID, id));
            }
        }
        if let Some(facts) = session.facts.filter(|_| self.options.facts) {
            let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            attributes.extend([
                KeyValue::new(attr::BYTES_ACKED, int(facts.bytes_acked)),
                KeyValue::new(attr::BYTES_RECEIVED, int(facts.bytes_received)),
                KeyValue::new(attr::SRTT_US, i64::from(facts.srtt_us_x8 >> 3)),
                KeyValue::new(attr::TOTAL_RETRANS, i64::from(facts.total_retrans)),
                KeyValue::new(attr::SEGS_IN, i64::from(facts.segs_in)),
                KeyValue::new(attr::SEGS_OUT, i64::from(facts.segs_out)),
            ]);
        }
        self.route(session, &mut attributes);
        attributes.push(KeyValue::new(attr::SKADDR, format!("{:x}", session.skaddr)));
        attributes.push(KeyValue::new(attr::ROLE, role_name(session.role)));
        attributes.push(KeyValue::new(attr::BEGIN_SEEN, session.begin_seen));
        attributes.push(KeyValue::new(attr::END_REASON, reason.as_str()));
        SpanData {
            span_context: self.context(session, None),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: match session.role {
                Role::Client => SpanKind::Client,
                Role::Server => SpanKind::Server,
                Role::Listener | Role::Unknown => SpanKind::Internal,
            },
            name: Cow::Borrowed(ROOT_NAME),
            start_time: self.clock.system_time(session.birth_ns),
            end_time: self.clock.system_time(end_ns),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: status(session.failure),
            instrumentation_scope: self.scope.clone(),
        }
    }
}

impl SpanMapper {
    fn route(&mut self, session: &Session, attributes: &mut Vec<KeyValue>) {
        if self.options.service_per_process
            && let Some(owner) = session.owner
        {
            attributes.push(KeyValue::new(
                attr::SERVICE_ROUTE,
                self.comms.get(owner.comm),
            ));
        }
    }

    /// The attributes every span of a session carries, with room for `more`.
    fn network_attributes(&mut self, session: &Session, more: usize) -> Vec<KeyValue> {
        let mut attributes = Vec::with_capacity(6 + more);
        attributes.extend([
            KeyValue::new(attr::NETWORK_TRANSPORT, "tcp"),
            KeyValue::new(
                attr::NETWORK_TYPE,
                if session.is_ipv4() { "ipv4" } else { "ipv6" },
            ),
            KeyValue::new(attr::LOCAL_ADDRESS, self.ips.get(session.local_addr)),
            KeyValue::new(attr::LOCAL_PORT, i64::from(session.local_port)),
            KeyValue::new(attr::PEER_ADDRESS, self.ips.get(session.remote_addr)),
            KeyValue::new(attr::PEER_PORT, i64::from(session.remote_port)),
        ]);
        attributes
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Client => "client",
        Role::Server => "server",
        Role::Listener => "listener",
        Role::Unknown => "unknown",
    }
}

fn status(failure: Option<Failure>) -> Status {
    match failure {
        None => Status::Unset,
        Some(Failure::ConnectFailed) => {
            Status::error("connection refused or timed out (SYN_SENT -> CLOSE)")
        }
        Some(Failure::HandshakeFailed) => {
            Status::error("handshake did not complete (SYN_RECV -> CLOSE)")
        }
        Some(Failure::Reset { from }) => {
            Status::error(format!("connection reset or aborted ({from} -> CLOSE)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{num::NonZeroUsize, time::UNIX_EPOCH};

    use opentelemetry::Value;

    use super::*;
    use crate::sessions::{
        SessionTable, Update,
        tests::{SK, client_events, ev},
    };

    fn spans(events: &[crate::event::TcpEvent]) -> Vec<SpanData> {
        let mut mapper = SpanMapper::new(WallClock::measure(), MapperOptions::default());
        let mut table = SessionTable::new(NonZeroUsize::new(16).unwrap());
        let mut out = Vec::new();
        for event in events {
            table.apply(event, &mut |update| {
                out.push(match update {
                    Update::StateEnded(s, e) => mapper.state_span(s, &e),
                    Update::SessionEnded(s, end, r) => mapper.root_span(s, end, r),
                })
            });
        }
        out
    }

    fn get<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    fn ns(t: std::time::SystemTime) -> u128 {
        t.duration_since(UNIX_EPOCH).unwrap().as_nanos()
    }

    #[test]
    fn one_trace_per_socket_with_a_child_per_state() {
        let spans = spans(&client_events(SK, 1_000_000));
        let (root, children) = spans.split_last().unwrap();
        assert_eq!(root.name, ROOT_NAME);
        assert_eq!(root.span_kind, SpanKind::Client);
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(
            children.iter().map(|c| c.name.as_ref()).collect::<Vec<_>>(),
            ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
        );
        for child in children {
            assert_eq!(child.span_context.trace_id(), root.span_context.trace_id());
            assert_eq!(child.parent_span_id, root.span_context.span_id());
            assert_eq!(child.span_kind, SpanKind::Internal);
            assert_ne!(child.span_context.span_id(), root.span_context.span_id());
        }
        // Durations are the kernel's, to the nanosecond; the root covers them all.
        let durations: Vec<u128> = children
            .iter()
            .map(|c| ns(c.end_time) - ns(c.start_time))
            .collect();
        assert_eq!(durations, [50, 1000, 10, 5]);
        assert_eq!(ns(root.start_time), ns(children[0].start_time));
        assert_eq!(ns(root.end_time), ns(children[3].end_time));

        assert_eq!(get(root, attr::CLIENT_PORT), Some(&Value::I64(40000)));
        assert_eq!(get(root, attr::SERVER_PORT), Some(&Value::I64(8080)));
        assert_eq!(get(root, attr::PEER_ADDRESS), Some(&"127.0.0.2".into()));
        assert_eq!(get(root, attr::NETWORK_TYPE), Some(&"ipv4".into()));
        assert_eq!(get(root, attr::PROCESS_PID), Some(&Value::I64(4242)));
        assert_eq!(
            get(root, attr::PROCESS_EXECUTABLE_NAME),
            Some(&"test".into())
        );
        assert_eq!(get(root, attr::END_REASON), Some(&"closed".into()));
        assert_eq!(get(root, attr::BEGIN_SEEN), Some(&Value::Bool(true)));
        assert_eq!(root.status, Status::Unset);
        assert_eq!(get(&children[1], attr::STATE), Some(&"ESTABLISHED".into()));
        assert_eq!(
            get(&children[1], attr::NEXT_STATE),
            Some(&"FIN_WAIT1".into())
        );
    }

    #[test]
    fn failures_are_errors_and_reuse_is_a_new_trace() {
        use otel_tcpstates_common::tcp_state::*;
        let spans = spans(&[
            ev(SK, 10, 0, CLOSE, SYN_SENT, 0),
            ev(SK, 11, 1, SYN_SENT, CLOSE, 1),
            ev(SK, 20, 0, CLOSE, SYN_SENT, 0),
            ev(SK, 21, 1, SYN_SENT, CLOSE, 1),
        ]);
        assert_eq!(spans.len(), 4);
        for span in &spans {
            assert!(
                matches!(&span.status, Status::Error { description } if description.contains("refused")),
                "{:?}",
                span.status
            );
        }
        assert_ne!(
            spans[1].span_context.trace_id(),
            spans[3].span_context.trace_id()
        );
    }
}
