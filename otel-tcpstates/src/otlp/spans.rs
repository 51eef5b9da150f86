//! Mapping sessions to span records: one trace per socket, a `tcp.session` root,
//! one child per TCP state, all timed by the kernel. A record holds what the
//! encoder writes as one OTLP span, by value: fixed size, nothing on the heap.
use std::{borrow::Cow, collections::HashMap, hash::BuildHasher, net::IpAddr};

use foldhash::fast::RandomState;
use otel_tcpstates_common::tcp_state;

use crate::{
    kernel::clock::{ClockHistory, WallClock},
    kernel::event::{Comm, TcpEvent, TcpFacts, TcpState},
    sampling::{decision::Verdict, rules::KeptBy, threshold::Threshold},
    sessions::container::ContainerId,
    sessions::container_lookups::ContainerLookups,
    sessions::incidents::{IncidentCounts, SpanEvents, What},
    sessions::links::Links,
    sessions::outcome::ErrorType,
    sessions::requests::RequestEnded,
    sessions::table::{EndReason, Role, Session, StateEnded},
};

pub const ROOT_NAME: &str = "tcp.session";
/// A sampled request's span, in its application's trace.
pub const REQUEST_NAME: &str = "tcp.request";

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
    /// A resource attribute: spans are grouped by the owner's container.
    pub const CONTAINER_ID: &str = "container.id";

    /// Connection facts read from the kernel's `struct tcp_sock` at CLOSE (root only),
    /// named and counted as the kernel does (as `ss -i` and tcp_info show them): bytes
    /// in sequence space: payload once however often sent, plus one for each SYN or
    /// FIN acknowledged (`bytes_acked`) or FIN received (`bytes_received`).
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

    /// On a root's link: `sent` (the socket sent the request) or `received`.
    pub const LINK_DIRECTION: &str = "tcpstates.link.direction";
    /// On a root's link: the request's method.
    pub const HTTP_REQUEST_METHOD: &str = "http.request.method";

    /// On the root of a trace a keep rule kept: the rules, comma-joined
    /// (`error`, `retransmit`, `slow_handshake`, `long_lived`).
    pub const SAMPLING_KEPT_BY: &str = "tcpstates.sampling.kept_by";

    /// Why the connection failed (the semantic conventions' attribute), on the
    /// root and on the state span it failed in.
    pub const ERROR_TYPE: &str = "error.type";
    /// On the root: the incidents seen in all its states (with the incident
    /// programs attached).
    pub const RETRANSMITS: &str = "tcpstates.retransmits";
    pub const RESETS_SENT: &str = "tcpstates.resets.sent";
    pub const RESETS_RECEIVED: &str = "tcpstates.resets.received";

    /// On a `tcp.retransmit` event: `syn`, `synack`, `timeout`, `fast`,
    /// `loss_probe` (or `unknown`); and, when it could not be sent, the error.
    pub const RETRANSMIT_KIND: &str = "tcpstates.retransmit.kind";
    pub const RETRANSMIT_ERROR: &str = "tcpstates.retransmit.error";
    /// On a `tcp.reset.sent` event: the kernel's reason (`sk_rst_reason`).
    pub const RESET_REASON: &str = "tcpstates.reset.reason";
    /// On a `tcp.error` event: the errno, as a number and by name.
    pub const ERRNO: &str = "tcpstates.errno";
    pub const ERRNO_NAME: &str = "tcpstates.errno.name";
    /// On a `tcp.congestion` event: the state entered (`open`, `disorder`, `cwr`,
    /// `recovery`, `loss`).
    pub const CONGESTION_STATE: &str = "tcpstates.congestion.state";

    /// On a `tcp.request` span: whether the connection was opened for the request
    /// (the first request on a connection whose opening was seen: the span then
    /// starts with the connection and covers its handshake).
    pub const CONNECTION_NEW: &str = "tcpstates.connection.new";
    /// On a `tcp.request` span of a new connection: its handshake state
    /// (`SYN_SENT`, `SYN_RECV`) and how long it took, in microseconds.
    pub const HANDSHAKE_STATE: &str = "tcpstates.handshake.state";
    pub const HANDSHAKE_US: &str = "tcpstates.handshake.duration_us";
    /// On a `tcp.request` span: whether the answer's first segment ended it
    /// (else its connection's end did), and the time from the request's first
    /// segment to the answer's, in microseconds (on the wire and in the peer).
    pub const REQUEST_ANSWERED: &str = "tcpstates.request.answered";
    pub const REQUEST_ANSWER_US: &str = "tcpstates.request.answer_us";
}

/// Span event names, one per kind of incident.
pub mod event {
    pub const RETRANSMIT: &str = "tcp.retransmit";
    pub const RESET_SENT: &str = "tcp.reset.sent";
    pub const RESET_RECEIVED: &str = "tcp.reset.received";
    pub const ERROR: &str = "tcp.error";
    pub const CONGESTION: &str = "tcp.congestion";
    /// On a `tcp.request` span of a new connection: the handshake ended.
    pub const ESTABLISHED: &str = "tcp.established";
    /// On a `tcp.request` span of a new connection: the request's first segment.
    pub const REQUEST_SENT: &str = "tcp.request.sent";
}

/// How spans are built.
#[derive(Clone, Copy, Debug, Default)]
pub struct MapperOptions {
    /// Name each span's service after the process that owns its socket.
    pub service_per_process: bool,
    /// The kernel reads bytes, RTT and retransmits at CLOSE (BTF was available).
    pub facts: bool,
    /// The incident programs are attached: roots count what they saw.
    pub incidents: bool,
}

/// OTLP's `SpanKind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// The resource a span goes under: `service.name` (with `--service-per-process`)
/// and `container.id`, when they are known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResourceKey {
    pub service: Option<Comm>,
    pub container: Option<ContainerId>,
}

/// An address and port.
pub type Endpoint = (IpAddr, u16);

/// One span, ready to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// `None` for the root.
    pub parent_span_id: Option<[u8; 8]>,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub resource: ResourceKey,
    pub local: Endpoint,
    pub peer: Endpoint,
    /// Makes the span's status an error, with `error.type`.
    pub error: Option<ErrorType>,
    /// The threshold that kept the trace by probability: written as its `th`.
    pub threshold: Option<Threshold>,
    pub body: Body,
}

/// What only one kind of span carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// A state the socket left.
    State {
        state: TcpState,
        /// The state it moved to, and the task on the CPU then; `None` when cut short.
        next: Option<(TcpState, u32, Comm)>,
        cut_short: Option<EndReason>,
        /// The incidents in the state: on the heap, and only for spans that had any.
        events: Option<Box<EventRecords>>,
    },
    /// A `tcp.request` span: a sampled request, in its application's trace.
    Request {
        role: Role,
        owner: Option<(u32, Comm)>,
        /// `sent` (this end made the request) or `received`.
        direction: crate::kernel::traceparent::Direction,
        /// The request's W3C trace flags: the span's own.
        trace_flags: u8,
        /// 1-based index into the HTTP methods (see [`crate::kernel::traceparent::Link::method`]).
        method: u8,
        /// The handshake it waited for: state and duration (ns); `None`
        /// when the connection was not opened for it.
        handshake: Option<(TcpState, Option<u64>)>,
        /// From the request's first segment to the answer's (ns), when it came.
        answer_ns: Option<u64>,
        /// The connection's state at the span's end.
        state: TcpState,
        /// The connection's `tcp.session` root: (trace id, span id).
        connection: ([u8; 16], [u8; 8]),
        /// The incidents while in flight, and for a new connection its
        /// handshake's end and the request's first segment (as events).
        events: Option<Box<EventRecords>>,
    },
    /// The `tcp.session` root.
    Root {
        role: Role,
        owner: Option<(u32, Comm)>,
        facts: Option<TcpFacts>,
        skaddr: u64,
        begin_seen: bool,
        end_reason: EndReason,
        /// Requests' trace contexts seen on the socket: on the heap, and only
        /// for sockets that had any.
        links: Option<Box<Links>>,
        /// The keep rules that kept the trace.
        kept_by: KeptBy,
        /// With the incident programs attached.
        counts: Option<IncidentCounts>,
    },
}

/// One span event: an incident at its wall-clock time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub unix_ns: u64,
    pub what: What,
}

/// A span's events, and how many more there were.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventRecords {
    pub kept: Vec<EventRecord>,
    pub dropped: u32,
}

impl SpanRecord {
    /// What the record takes in memory: itself, and its links or events on the
    /// heap (what the export queue's bound in bytes counts).
    pub fn bytes(&self) -> usize {
        size_of::<Self>()
            + match &self.body {
                Body::State {
                    events: Some(events),
                    ..
                }
                | Body::Request {
                    events: Some(events),
                    ..
                } => size_of::<EventRecords>() + events.kept.capacity() * size_of::<EventRecord>(),
                Body::Root {
                    links: Some(links), ..
                } => size_of::<Links>() + links.heap_bytes(),
                _ => 0,
            }
    }

    pub fn kind(&self) -> Kind {
        match self.body {
            Body::Root {
                role: Role::Client, ..
            } => Kind::Client,
            Body::Root {
                role: Role::Server, ..
            } => Kind::Server,
            _ => Kind::Internal,
        }
    }

    /// Client and server ends, as far as the role tells.
    pub fn client_server(&self) -> (Option<Endpoint>, Option<Endpoint>) {
        let (Body::Root { role, .. } | Body::Request { role, .. }) = self.body else {
            return (None, None);
        };
        match role {
            Role::Client => (Some(self.local), Some(self.peer)),
            Role::Server => (Some(self.peer), Some(self.local)),
            Role::Listener => (None, Some(self.local)),
            Role::Unknown => (None, None),
        }
    }
}

/// A state's name without allocating (numbers the kernel may add print as digits).
pub fn state_name(state: TcpState) -> Cow<'static, str> {
    tcp_state::name(state.0).map_or_else(|| Cow::Owned(state.0.to_string()), Cow::Borrowed)
}

/// Listeners whose owners' containers are pinned at once (more are looked up as
/// any owner): a bound for listeners whose CLOSE is lost.
const LISTENERS_PINNED: usize = 8192;

/// Builds span records from session table updates.
pub struct SpanMapper {
    /// A session's spans all use the offset in use at its birth, for its whole
    /// life: its children are exported as its states end, so the offset they were
    /// sent with cannot be changed later, and one offset for all keeps every child
    /// inside its root (the kernel's durations are the truth; a step moves the
    /// whole session, never stretches it).
    clocks: ClockHistory,
    /// Keyed hash that turns (socket address, birth, child) into span ids: random
    /// per run, nothing to store per session (the table keys the trace ids).
    ids: RandomState,
    options: MapperOptions,
    containers: ContainerLookups,
    /// Live listeners (by address) and their owners, whose containers stay
    /// known while they listen: their connections' roots name it.
    listeners: HashMap<u64, (u32, u64)>,
}

impl SpanMapper {
    pub fn new(clock: WallClock, options: MapperOptions) -> Self {
        Self {
            clocks: ClockHistory::new(clock),
            options,
            containers: ContainerLookups::new(),
            ids: RandomState::default(),
            listeners: HashMap::new(),
        }
    }

    /// Looks at an event before the session table does: a transition made by the
    /// socket's owner is the moment to find its container, while it surely lives.
    pub fn observe(&mut self, event: &TcpEvent) {
        // Only owners' containers go on spans; a softirq's victim is anyone.
        let (old, new) = (event.oldstate.0, event.newstate.0);
        // A listener gone: it closed, or its address is a new socket's (its
        // CLOSE was lost).
        if ((old == tcp_state::LISTEN && new == tcp_state::CLOSE) || tcp_state::begins(old, new))
            && let Some((pid, cgroup_id)) = self.listeners.remove(&event.skaddr)
        {
            self.containers.unpin(pid, cgroup_id);
        }
        if event.cgroup_id == 0 || !tcp_state::entered_by_owner(new) {
            return;
        }
        if new == tcp_state::LISTEN && self.listeners.len() < LISTENERS_PINNED {
            self.listeners
                .insert(event.skaddr, (event.pid, event.cgroup_id));
            self.containers.pin(event.pid, event.cgroup_id);
        } else {
            self.containers.request(event.pid, event.cgroup_id);
        }
    }

    /// The wall clock was stepped: sessions born from kernel time `at_ns` on use
    /// `clock`.
    pub fn clock_stepped(&mut self, at_ns: u64, clock: WallClock) {
        self.clocks.stepped(at_ns, clock);
    }

    /// Whether the container of the session's owner is still being looked up.
    pub fn container_pending(&self, session: &Session) -> bool {
        session
            .owner
            .is_some_and(|owner| self.container_pending_for((owner.pid, owner.cgroup_id)))
    }

    /// The same, by the owner's (pid, cgroup id).
    pub fn container_pending_for(&self, (pid, cgroup_id): (u32, u64)) -> bool {
        self.containers.is_out(pid, cgroup_id)
    }

    /// Puts on a span of `session` made earlier the owner's container, if known now.
    pub fn add_container(&self, (pid, cgroup_id): (u32, u64), record: &mut SpanRecord) {
        record.resource.container = self.containers.cached(pid, cgroup_id);
    }

    /// The span id of a session's request span `index`.
    fn request_span_id(&self, session: &Session, index: u32) -> [u8; 8] {
        let id = self
            .ids
            .hash_one((4u8, session.skaddr, session.birth_ns, index));
        id.max(1).to_be_bytes()
    }

    fn span_id(&self, session: &Session, child: Option<u32>) -> [u8; 8] {
        let id = self
            .ids
            .hash_one((3u8, session.skaddr, session.birth_ns, child));
        id.max(1).to_be_bytes()
    }

    fn events(&self, session: &Session, events: &SpanEvents) -> Box<EventRecords> {
        Box::new(EventRecords {
            kept: events
                .kept
                .iter()
                .map(|e| EventRecord {
                    unix_ns: self.unix_ns(session, e.ts_ns),
                    what: e.what,
                })
                .collect(),
            dropped: events.dropped,
        })
    }

    fn unix_ns(&self, session: &Session, monotonic_ns: u64) -> u64 {
        let clock = self.clocks.at(session.birth_ns);
        u64::try_from(clock.unix_ns(monotonic_ns).max(0)).unwrap_or(u64::MAX)
    }

    fn resource(&self, session: &Session) -> ResourceKey {
        let Some(owner) = session.owner else {
            return ResourceKey::default();
        };
        ResourceKey {
            service: self.options.service_per_process.then_some(owner.comm),
            container: self.containers.cached(owner.pid, owner.cgroup_id),
        }
    }

    fn record(
        &self,
        session: &Session,
        child: Option<u32>,
        times: (u64, u64),
        verdict: Verdict,
        body: Body,
    ) -> SpanRecord {
        SpanRecord {
            trace_id: session.trace_id,
            span_id: self.span_id(session, child),
            parent_span_id: child.map(|_| self.span_id(session, None)),
            start_unix_ns: self.unix_ns(session, times.0),
            end_unix_ns: self.unix_ns(session, times.1),
            resource: self.resource(session),
            local: (session.local_addr, session.local_port),
            peer: (session.remote_addr, session.remote_port),
            error: None,
            threshold: verdict.threshold,
            body,
        }
    }

    /// A child span for a state the socket left.
    pub fn state_span(
        &self,
        session: &Session,
        ended: &StateEnded,
        verdict: Verdict,
    ) -> SpanRecord {
        let body = Body::State {
            state: ended.state,
            next: ended.next.map(|next| (next, ended.pid, ended.comm)),
            cut_short: ended.cut_short,
            events: ended
                .events
                .as_deref()
                .map(|events| self.events(session, events)),
        };
        SpanRecord {
            error: ended.error,
            ..self.record(
                session,
                Some(ended.index),
                (ended.start_ns, ended.end_ns),
                verdict,
                body,
            )
        }
    }

    /// The `tcp.request` span of a sampled request: in the application's trace,
    /// a child of the span that sent the request, linked to the connection's
    /// root.
    pub fn request_span(&self, session: &Session, ended: &RequestEnded) -> SpanRecord {
        let request = &ended.request;
        let mut events = self.events(session, &request.events);
        if let Some(handshake) = request.handshake {
            // Where the handshake ended and the request went out, inside a span
            // that starts with the connection.
            let at = |ts_ns, what| EventRecord {
                unix_ns: self.unix_ns(session, ts_ns),
                what,
            };
            if let Some(end_ns) = handshake.end_ns.filter(|&t| t <= ended.end_ns) {
                events.kept.push(at(end_ns, What::Established));
            }
            events.kept.push(at(request.sent_ns, What::RequestSent));
            events.kept.sort_by_key(|e| e.unix_ns);
        }
        let body = Body::Request {
            role: session.role,
            owner: session.owner.map(|owner| (owner.pid, owner.comm)),
            direction: request.link.direction,
            trace_flags: request.link.trace_flags,
            method: request.link.method,
            handshake: request.handshake.map(|h| {
                (
                    h.state,
                    h.end_ns.map(|end| end.saturating_sub(request.start_ns)),
                )
            }),
            answer_ns: ended
                .answered
                .then(|| ended.end_ns.saturating_sub(request.sent_ns)),
            state: ended.state,
            connection: (session.trace_id, self.span_id(session, None)),
            events: (!events.kept.is_empty() || events.dropped > 0).then_some(events),
        };
        SpanRecord {
            trace_id: request.link.trace_id,
            span_id: self.request_span_id(session, request.index),
            parent_span_id: Some(request.link.span_id),
            start_unix_ns: self.unix_ns(session, request.start_ns),
            end_unix_ns: self.unix_ns(session, ended.end_ns),
            resource: self.resource(session),
            local: (session.local_addr, session.local_port),
            peer: (session.remote_addr, session.remote_port),
            error: ended.error,
            // The application's sampling decided; its threshold, if any, is in
            // its own trace state, which the request did not carry to us.
            threshold: None,
            body,
        }
    }

    /// The root span of a session that ended at kernel time `end_ns`.
    pub fn root_span(
        &self,
        session: &Session,
        end_ns: u64,
        reason: EndReason,
        verdict: Verdict,
    ) -> SpanRecord {
        let body = Body::Root {
            role: session.role,
            owner: session.owner.map(|owner| (owner.pid, owner.comm)),
            facts: session.facts.filter(|_| self.options.facts),
            skaddr: session.skaddr,
            begin_seen: session.begin_seen,
            end_reason: reason,
            links: (!session.links.kept.is_empty() || session.links.dropped > 0)
                .then(|| Box::new(session.links.clone())),
            kept_by: verdict.kept_by,
            counts: self.options.incidents.then_some(session.counts),
        };
        SpanRecord {
            error: session.error,
            ..self.record(session, None, (session.birth_ns, end_ns), verdict, body)
        }
    }
}
