//! The per-socket session table: follows each socket from its first seen transition
//! to its CLOSE, and reports each state it left and each session that ended.
//!
//! It knows nothing of OpenTelemetry; `spans` turns what it reports into spans.
use std::{
    collections::{HashMap, VecDeque},
    hash::BuildHasher as _,
    net::IpAddr,
    num::NonZeroUsize,
};

use foldhash::fast::RandomState;
use lru::LruCache;
use otel_tcpstates_common::tcp_state;

use crate::{
    kernel::event::{Comm, Ends, Family, Happened, Incident, TcpEvent, TcpFacts, TcpState},
    kernel::traceparent::Link,
    sessions::incidents::{IncidentCounts, RetransmitKind, SpanEvent, SpanEvents, What},
    sessions::links::{Added, Links},
    sessions::outcome::{CloseFacts, ErrorType},
    sessions::requests::{Admit, Handshake, MAX_PENDING, Request, RequestEnded, Requests},
};

/// How long, in kernel time, the last span of a socket that may have been
/// aborted waits for the RST the kernel sends after it entered CLOSE:
/// microseconds later in the same system call or softirq, or, from the kernel's
/// time-wait socket, when the peer's request that crossed our FIN arrives. It
/// runs on what the ring buffer has delivered, not on the clock: see
/// [`SessionTable::expire_closing`].
pub const RESET_GRACE_NS: u64 = 20_000_000;

/// SYN-ACK retransmissions remembered for connections whose socket does not
/// exist yet (it is created when the handshake completes).
const SYNACK_CONNECTIONS: usize = 4096;

/// Connections whose session waited for an RST and ended, remembered so that an
/// RST that comes later still is counted as late, not as unmatched (the kernel's
/// time-wait socket may send one for up to a minute).
const ENDED_CONNECTIONS: usize = 4096;
/// Links the table keeps for all its sessions together, per socket it can hold
/// (`--max-sockets`): a socket keeps up to 64 ([`crate::sessions::links::MAX_LINKS`])
/// while the table's total is under this many times its capacity. Memory then
/// stays bounded by `--max-sockets` whatever the requests per connection (64
/// links on each of 65,536 sockets would be 113 MiB).
pub const LINKS_PER_SOCKET: usize = 4;
/// The same for span events (incidents), in the open states and the states held.
pub const EVENTS_PER_SOCKET: usize = 4;
/// Requests in flight (each a span to come in its application's trace), on
/// average per socket the table holds: past this, sampled requests are counted,
/// not made spans.
pub const REQUESTS_PER_SOCKET: usize = 1;
/// Handshake incidents kept to copy onto the span of the request a connection
/// was opened for.
const HANDSHAKE_EVENTS: usize = 8;

/// A connection's ends: (local address, port, remote address, port).
type Tuple = Ends;

/// How the socket came to be, as far as its first seen transition tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Active open: connect().
    Client,
    /// Accepted from a listener.
    Server,
    /// A listening socket.
    Listener,
    /// Already open when the tracer started, in a state that does not tell.
    Unknown,
}

impl Role {
    /// The name spans and metrics give it (`tcpstates.role`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Server => "server",
            Self::Listener => "listener",
            Self::Unknown => "unknown",
        }
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The socket reached CLOSE.
    Closed,
    /// Pushed out of the full table by a newer socket.
    Evicted,
    /// The tracer is shutting down.
    Shutdown,
    /// A new socket appeared at the same kernel address before this one's CLOSE
    /// was seen (its last transitions were lost).
    Replaced,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Evicted => "evicted",
            Self::Shutdown => "shutdown",
            Self::Replaced => "replaced",
        }
    }
}

/// The process that owns a socket, learned from a transition only a system call on
/// the socket makes (so the task on the CPU is the owner, not a softirq's victim).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub comm: Comm,
    /// cgroup v2 id of the owner when it acted (its container, if any).
    pub cgroup_id: u64,
}

/// One socket's life so far.
#[derive(Clone, Debug)]
pub struct Session {
    pub skaddr: u64,
    /// The trace the socket's spans go in: a keyed hash of (address, birth), random
    /// per run, so its low 56 bits are uniformly random (what sampling decides on).
    pub trace_id: [u8; 16],
    /// Kernel time the socket was first seen (or entered the state it was first
    /// seen leaving, when the kernel knew that).
    pub birth_ns: u64,
    /// Whether the socket's creation (connect, listen, accept) was seen.
    pub begin_seen: bool,
    pub role: Role,
    /// The socket's family (an IPv6 socket may carry an IPv4 connection).
    pub family: Family,
    /// The connection's addresses (see [`TcpEvent::local_addr`]).
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub owner: Option<Owner>,
    /// Why the connection failed, once it reached CLOSE.
    pub error: Option<ErrorType>,
    /// The state the socket is in and since when; `None` start when unknown.
    pub state: TcpState,
    pub state_since_ns: Option<u64>,
    /// State spans reported so far: numbers the next one.
    pub states_ended: u32,
    /// Read from the kernel at CLOSE.
    pub facts: Option<TcpFacts>,
    /// Task on the CPU at the latest transition (the owner, for tcplife, when no
    /// system call on the socket was seen).
    pub last_pid: u32,
    pub last_comm: Comm,
    /// Trace contexts of the HTTP requests seen on the socket.
    pub links: Links,
    /// Whether the table holds the states this session ends (see
    /// [`SessionTable::holding_states`]).
    pub holds: bool,
    /// How long the handshake state (SYN_SENT or SYN_RECV) lasted, once it ended.
    pub handshake_ns: Option<u64>,
    /// The states ended so far, oldest first, when the table holds them (see
    /// [`SessionTable::holding_states`]): they wait here for a decision made when
    /// the session ends.
    pub held: Vec<StateEnded>,
    /// Incidents in the current state, for its span.
    pub events: SpanEvents,
    pub counts: IncidentCounts,
    /// The congestion state (`tcp_ca_state`) the kernel last reported.
    pub ca_state: u8,
    /// An aborted socket's CLOSE, waiting for its RST.
    pub closing: Option<Box<Closing>>,
    /// The sampled requests seen on the socket: those in flight, and counts.
    pub requests: Option<Box<Requests>>,
    /// The handshake's incidents (SYN or SYN-ACK retransmissions), for the span
    /// of the request the connection was opened for.
    pub handshake_events: Option<Box<SpanEvents>>,
}

/// A CLOSE whose last span waits for the RST that follows it.
#[derive(Clone, Debug)]
pub struct Closing {
    pub ended: StateEnded,
    pub close_ns: u64,
}

impl Session {
    /// Whether the connection is IPv4 (whatever the socket's family).
    pub fn is_ipv4(&self) -> bool {
        self.local_addr.is_ipv4()
    }
}

/// Where a socket listens: its network namespace (pods on one node may each
/// listen on a port), its family (a dual-stack listener's IPv4 connections are
/// IPv6 sockets), its port.
type ListenerKey = (u32, Family, u16);

fn listener_key(event: &TcpEvent) -> ListenerKey {
    (event.netns, event.family, event.local_port)
}

/// A state the socket left: one child span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateEnded {
    pub state: TcpState,
    /// 0-based position among the session's state spans.
    pub index: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The state it moved to; `None` when the span was cut short (eviction, shutdown).
    pub next: Option<TcpState>,
    /// Task on the CPU at the transition out (bcc's C-PID/C-COMM).
    pub pid: u32,
    pub comm: Comm,
    /// Set when the transition out was a failure (e.g. SYN_SENT → CLOSE).
    pub error: Option<ErrorType>,
    /// Why the span was cut short, when it was.
    pub cut_short: Option<EndReason>,
    /// The incidents in the state.
    pub events: Option<Box<SpanEvents>>,
}

/// What the table reports, in order, as events arrive.
pub enum Update<'a> {
    StateEnded(&'a Session, &'a StateEnded),
    /// A sampled request's span ends (its answer came, or the session ends:
    /// then before its [`Update::SessionEnded`]).
    RequestEnded(&'a Session, &'a RequestEnded),
    SessionEnded(&'a Session, u64, EndReason),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableStats {
    pub started: u64,
    pub closed: u64,
    pub evicted: u64,
    pub replaced: u64,
    /// Incidents of sockets the table does not follow (ended, or never seen).
    pub incidents_unmatched: u64,
    /// RSTs sent for a connection whose session had already ended (its trace
    /// gone out without them): the kernel's time-wait socket answering a request
    /// long after our FIN, or an RST that came after [`RESET_GRACE_NS`].
    pub resets_late: u64,
    /// Links not kept: past a socket's 64, or past the table's bound
    /// ([`LINKS_PER_SOCKET`]). Each root's `dropped_links_count` says its own.
    pub links_not_kept: u64,
    /// Span events not kept: past a span's 64, or past the table's bound
    /// ([`EVENTS_PER_SOCKET`]). Each span's `dropped_events_count` says its own.
    pub events_not_kept: u64,
    /// Sampled requests seen on the sockets followed.
    pub requests_sampled: u64,
    /// Request spans made (each ended: answered, or its session ended).
    pub request_spans: u64,
    /// Sampled requests made no span: past a socket's in flight or repeats, or
    /// the table's bound ([`REQUESTS_PER_SOCKET`]).
    pub requests_not_kept: u64,
}

/// Slots for links and events the table's sessions have now (each socket's
/// grow in steps of 8), and their bounds.
#[derive(Clone, Copy, Debug, Default)]
struct Budget {
    links: usize,
    events: usize,
    /// Requests in flight.
    requests: usize,
    max_links: usize,
    max_events: usize,
    max_requests: usize,
}

impl Budget {
    /// Keeps `event` in `events` if the span and the table have room; counts it
    /// otherwise.
    fn event(&mut self, events: &mut SpanEvents, event: SpanEvent, stats: &mut TableStats) {
        match events.add(event, self.max_events.saturating_sub(self.events)) {
            Some(slots) => self.events += slots,
            None => stats.events_not_kept += 1,
        }
    }

    /// A session left the table with everything it kept.
    fn release(&mut self, session: &Session) {
        let held: usize = session.held.iter().map(event_slots).sum();
        let closing = session
            .closing
            .as_ref()
            .map_or(0, |c| event_slots(&c.ended));
        self.links -= session.links.kept.capacity();
        self.events -= session.events.kept.capacity() + held + closing;
        if let Some(requests) = &session.requests {
            for request in &requests.pending {
                self.request_gone(request);
            }
        }
    }

    /// A request in flight left the table with its events.
    fn request_gone(&mut self, request: &Request) {
        self.requests -= 1;
        self.events -= request.events.kept.capacity();
    }
}

/// Slots (kept or not yet) for the events of an ended state.
fn event_slots(ended: &StateEnded) -> usize {
    ended.events.as_ref().map_or(0, |e| e.kept.capacity())
}

/// Which sessions hold the states they end: given their trace id.
type HoldIf = Box<dyn Fn(&[u8; 16]) -> bool>;

pub struct SessionTable {
    sessions: LruCache<u64, Session>,
    /// The live listeners of each key (address, owner), oldest first: an accepted
    /// socket belongs to the one the kernel names (with `SO_REUSEPORT` several
    /// processes listen on a port), else the newest, until its own owner acts.
    listeners: HashMap<ListenerKey, Vec<(u64, Owner)>>,
    stats: TableStats,
    /// Keys the trace ids.
    ids: RandomState,
    /// Which sessions keep their ended states in `held`.
    hold: Option<HoldIf>,
    kept: Budget,
    /// Sockets waiting for their RST, oldest first: (address, CLOSE time,
    /// connection).
    closing: VecDeque<(u64, u64, Tuple)>,
    /// The same sockets by their connection: the time-wait socket that sends the
    /// RST has an address of its own.
    closing_ends: HashMap<Tuple, u64>,
    /// Connections of sessions that waited for their RST and ended, for a later
    /// RST to be counted as late.
    ended: LruCache<Tuple, ()>,
    /// SYN-ACK retransmissions of connections not yet seen, by their ends.
    synacks: LruCache<Tuple, SpanEvents>,
    /// Whether the congestion states are reported (their program is attached).
    congestion_known: bool,
}

/// Whether `event` is the first transition of a new socket: created by connect() or
/// listen() (leaving CLOSE), or cloned from a listener for an incoming connection.
fn starts_socket(event: &TcpEvent) -> bool {
    event.oldstate.0 == tcp_state::CLOSE
        || (event.oldstate.0 == tcp_state::LISTEN && event.newstate.0 == tcp_state::SYN_RECV)
}

fn role_of(event: &TcpEvent) -> Role {
    match (event.oldstate.0, event.newstate.0) {
        (tcp_state::CLOSE, tcp_state::SYN_SENT) | (tcp_state::SYN_SENT, _) => Role::Client,
        (tcp_state::LISTEN, tcp_state::SYN_RECV) | (tcp_state::SYN_RECV, _) => Role::Server,
        (_, tcp_state::LISTEN) | (tcp_state::LISTEN, _) => Role::Listener,
        _ => Role::Unknown,
    }
}

impl SessionTable {
    pub fn new(capacity: NonZeroUsize) -> Self {
        Self {
            sessions: LruCache::new(capacity),
            listeners: HashMap::new(),
            stats: TableStats::default(),
            ids: RandomState::default(),
            hold: None,
            kept: Budget {
                max_links: capacity.get().saturating_mul(LINKS_PER_SOCKET),
                max_events: capacity.get().saturating_mul(EVENTS_PER_SOCKET),
                max_requests: capacity.get().saturating_mul(REQUESTS_PER_SOCKET),
                ..Budget::default()
            },
            closing: VecDeque::new(),
            closing_ends: HashMap::new(),
            ended: LruCache::new(NonZeroUsize::new(ENDED_CONNECTIONS).expect("non-zero")),
            synacks: LruCache::new(NonZeroUsize::new(SYNACK_CONNECTIONS).expect("non-zero")),
            congestion_known: true,
        }
    }

    /// Says whether the kernel reports congestion states, which name the kind of a
    /// data retransmission.
    pub fn congestion_known(mut self, known: bool) -> Self {
        self.congestion_known = known;
        self
    }

    /// Makes every session keep the states it ended in [`Session::held`] until it
    /// ends: for a consumer that decides on a whole session at its end. Memory stays
    /// bounded by the table's capacity (a session ends few states, and their
    /// events count against [`EVENTS_PER_SOCKET`]).
    pub fn holding_states(self) -> Self {
        self.holding_states_if(|_| true)
    }

    /// [`SessionTable::holding_states`] for the sessions whose trace id `hold`
    /// picks: those whose decision waits for their end (a trace already kept has
    /// no use for them).
    pub fn holding_states_if(mut self, hold: impl Fn(&[u8; 16]) -> bool + 'static) -> Self {
        self.hold = Some(Box::new(hold));
        self
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn stats(&self) -> TableStats {
        self.stats
    }

    /// The sessions open now, in no particular order (the LRU order is untouched):
    /// not those closed in the kernel and waiting for their reset.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions
            .iter()
            .map(|(_, session)| session)
            .filter(|session| session.closing.is_none())
    }

    /// Applies one transition, reporting what ended through `out`.
    pub fn apply(&mut self, event: &TcpEvent, out: &mut impl FnMut(Update<'_>)) {
        if self
            .sessions
            .peek(&event.skaddr)
            .is_some_and(|s| s.closing.is_some())
        {
            // The address is in use again: the aborted socket's RST has gone out.
            self.end_closing(event.skaddr, out);
        }
        let starts = starts_socket(event);
        if starts && let Some(old) = self.sessions.pop(&event.skaddr) {
            if old.role == Role::Listener {
                // Its CLOSE was lost: it listens no more (where, the session
                // does not keep; listeners are few).
                self.listeners.retain(|_, live| {
                    live.retain(|&(s, _)| s != old.skaddr);
                    !live.is_empty()
                });
            }
            self.stats.replaced += 1;
            self.kept.release(&old);
            finish(old, event.ts_ns, EndReason::Replaced, &mut self.stats, out);
        }
        if !self.sessions.contains(&event.skaddr) {
            self.start(event, starts, out);
        }
        let Some(session) = self.sessions.get_mut(&event.skaddr) else {
            return;
        };

        // The kernel measured how long the socket was in `oldstate`; its start is
        // exact even when an earlier transition was lost or never seen. Without a
        // kernel measurement (its own table forgot the socket), fall back on ours.
        let entered_ns = event.ts_ns.saturating_sub(event.delta_ns);
        let known_start = if starts {
            None
        } else if event.delta_ns > 0 {
            Some(entered_ns)
        } else if session.state == event.oldstate {
            session.state_since_ns
        } else {
            None
        };
        if session.state != event.oldstate
            && let Some(since) = session.state_since_ns
        {
            // Transitions were lost in between: end what we believed at the
            // point the kernel says the socket entered `oldstate`.
            let ended = StateEnded {
                state: session.state,
                index: session.states_ended,
                start_ns: since,
                end_ns: entered_ns.max(since),
                next: Some(event.oldstate),
                pid: event.pid,
                comm: event.comm,
                error: None,
                cut_short: None,
                events: session.events.take(),
            };
            report(session, ended, Some(&mut self.kept), out);
        }
        update_endpoints(session, event);
        session.last_pid = event.pid;
        session.last_comm = event.comm;
        if tcp_state::entered_by_owner(event.newstate.0) {
            let owner = Owner {
                pid: event.pid,
                comm: event.comm,
                cgroup_id: event.cgroup_id,
            };
            session.owner = Some(owner);
            if event.newstate.0 == tcp_state::LISTEN {
                let live = self.listeners.entry(listener_key(event)).or_default();
                live.retain(|&(skaddr, _)| skaddr != event.skaddr);
                live.push((event.skaddr, owner));
            }
        }
        if event.oldstate.0 == tcp_state::LISTEN && event.newstate.0 == tcp_state::CLOSE {
            listener_gone(&mut self.listeners, listener_key(event), event.skaddr);
        }
        let closes = event.newstate.0 == tcp_state::CLOSE;
        let close = CloseFacts {
            from: Some(event.oldstate),
            sk_err: event.facts.sk_err as i32,
            reset_received: session.counts.resets_received > 0,
            reset_sent: session.counts.resets_sent > 0,
            aborted: false,
        };
        if closes {
            session.error = ErrorType::of(close);
            // The error the kernel set as it closed the socket; its report
            // follows the CLOSE, too late for the kernel to tie it to the socket.
            if close.sk_err != 0 && !session.events.has_error(close.sk_err) {
                let error = SpanEvent {
                    ts_ns: event.ts_ns,
                    what: What::Error {
                        errno: close.sk_err,
                    },
                };
                self.kept.event(&mut session.events, error, &mut self.stats);
            }
        }
        let mut ended = known_start.map(|start_ns| StateEnded {
            state: event.oldstate,
            index: session.states_ended,
            start_ns,
            end_ns: event.ts_ns,
            next: Some(event.newstate),
            pid: event.pid,
            comm: event.comm,
            error: session.error.filter(|_| closes),
            cut_short: None,
            events: session.events.take(),
        });

        if closes {
            session.facts = Some(event.facts);
            if let Some(ended) = ended.take_if(|_| ErrorType::awaits_reset(close)) {
                session.closing = Some(Box::new(Closing {
                    ended,
                    close_ns: event.ts_ns,
                }));
                let ends = ends_of(session);
                self.closing.push_back((event.skaddr, event.ts_ns, ends));
                self.closing_ends.insert(ends, event.skaddr);
                return;
            }
            if let Some(ended) = ended {
                report(session, ended, Some(&mut self.kept), out);
            }
            if let Some(mut done) = self.sessions.pop(&event.skaddr) {
                self.stats.closed += 1;
                self.kept.release(&done);
                end_requests(&mut done, event.ts_ns, &mut self.stats, out);
                out(Update::SessionEnded(&done, event.ts_ns, EndReason::Closed));
            }
        } else {
            if let Some(ended) = ended {
                report(session, ended, Some(&mut self.kept), out);
            }
            session.state = event.newstate;
            session.state_since_ns = Some(event.ts_ns);
        }
    }

    /// The owner of a socket accepted from a listener of `event`'s key: the one
    /// whose process the kernel named (which listener took the connection, when
    /// the packet programs told it; else the newest), or the newest.
    fn listener_owner(&self, event: &TcpEvent) -> Option<Owner> {
        let live = self.listeners.get(&listener_key(event))?;
        live.iter()
            .rev()
            .find(|(_, owner)| owner.pid == event.owner_pid)
            .or(live.last())
            .map(|&(_, owner)| owner)
    }

    fn start(&mut self, event: &TcpEvent, begin_seen: bool, out: &mut impl FnMut(Update<'_>)) {
        let known = event.delta_ns > 0 && !begin_seen;
        let birth_ns = event
            .ts_ns
            .saturating_sub(if known { event.delta_ns } else { 0 });
        let trace_id = trace_id(&self.ids, event.skaddr, birth_ns);
        let mut session = Session {
            skaddr: event.skaddr,
            trace_id,
            birth_ns,
            begin_seen,
            role: role_of(event),
            family: event.family,
            local_addr: event.local_addr,
            local_port: event.local_port,
            remote_addr: event.remote_addr,
            remote_port: event.remote_port,
            // An accepted socket starts out owned by its listener's process.
            owner: (event.oldstate.0 == tcp_state::LISTEN)
                .then(|| self.listener_owner(event))
                .flatten(),
            error: None,
            facts: None,
            last_pid: event.pid,
            last_comm: event.comm,
            state: event.oldstate,
            state_since_ns: known.then_some(event.ts_ns.saturating_sub(event.delta_ns)),
            states_ended: 0,
            links: Links::default(),
            holds: self.hold.as_ref().is_some_and(|hold| hold(&trace_id)),
            handshake_ns: None,
            held: Vec::new(),
            events: SpanEvents::default(),
            counts: IncidentCounts::default(),
            ca_state: 0,
            closing: None,
            requests: None,
            handshake_events: None,
        };
        if event.oldstate.0 == tcp_state::LISTEN
            && !self.synacks.is_empty()
            && let Some(synacks) = self.synacks.pop(&(
                event.local_addr,
                event.local_port,
                event.remote_addr,
                event.remote_port,
            ))
        {
            // Sent by the listener before this socket existed, in its handshake.
            session.counts.retransmits += synacks.kept.len() as u32 + synacks.dropped;
            // At most a handshake's few retransmissions: kept past the bound.
            self.kept.events += synacks.kept.capacity();
            session.events = synacks;
        }
        self.stats.started += 1;
        if let Some((_, evicted)) = self.sessions.push(event.skaddr, session) {
            if evicted.closing.is_some() {
                self.stats.closed += 1;
            } else {
                self.stats.evicted += 1;
            }
            self.kept.release(&evicted);
            finish(
                evicted,
                event.ts_ns,
                EndReason::Evicted,
                &mut self.stats,
                out,
            );
        }
    }

    /// Notes an incident on the span of the state its socket is in (or, for an
    /// aborted socket waiting for its RST, on the span of the state it left).
    pub fn incident(&mut self, incident: &Incident, out: &mut impl FnMut(Update<'_>)) {
        if let Happened::SynAckRetransmit { local, remote } = incident.happened {
            let tuple = (local.0, local.1, remote.0, remote.1);
            let event = SpanEvent {
                ts_ns: incident.ts_ns,
                what: What::Retransmit {
                    kind: RetransmitKind::SynAck,
                    err: 0,
                },
            };
            // Bounded apart: a handshake's few retransmissions, of at most
            // SYNACK_CONNECTIONS connections.
            match self.synacks.get_mut(&tuple) {
                Some(events) => {
                    if events.add(event, usize::MAX).is_none() {
                        self.stats.events_not_kept += 1;
                    }
                }
                None => {
                    let mut events = SpanEvents::default();
                    events.add(event, usize::MAX);
                    if self.synacks.push(tuple, events).is_some() {
                        self.stats.incidents_unmatched += 1;
                    }
                }
            }
            return;
        }
        let congestion_known = self.congestion_known;
        let skaddr = match incident.happened {
            // Sent after CLOSE, or by the time-wait socket: it names the connection.
            Happened::ResetSent {
                ends: Some(ends), ..
            } if !self.sessions.contains(&incident.skaddr) => {
                let waiting = self.closing_ends.get(&ends).copied().filter(|&sk| {
                    self.sessions
                        .peek(&sk)
                        .is_some_and(|s| s.closing.is_some() && ends_of(s) == ends)
                });
                match waiting {
                    Some(waiting) => waiting,
                    None => {
                        if self.ended.contains(&ends) {
                            self.stats.resets_late += 1;
                        } else {
                            self.stats.incidents_unmatched += 1;
                        }
                        return;
                    }
                }
            }
            _ => incident.skaddr,
        };
        let Some(session) = self.sessions.get_mut(&skaddr) else {
            self.stats.incidents_unmatched += 1;
            return;
        };
        let what = match incident.happened {
            Happened::Retransmit { state, err, segs } => {
                if err == 0 {
                    session.counts.retransmits += segs.max(1);
                }
                let kind = match state.0 {
                    tcp_state::SYN_SENT => RetransmitKind::Syn,
                    tcp_state::SYN_RECV => RetransmitKind::SynAck,
                    _ => RetransmitKind::of_data(congestion_known.then_some(session.ca_state)),
                };
                What::Retransmit { kind, err }
            }
            Happened::ResetSent { reason, .. } => {
                session.counts.resets_sent += 1;
                What::ResetSent { reason }
            }
            Happened::ResetReceived => {
                session.counts.resets_received += 1;
                What::ResetReceived
            }
            Happened::Error { errno } => What::Error { errno },
            // A socket starts out Open, and the kernel sets Open again as the
            // handshake ends: no change, no event.
            Happened::Congestion { state } if state == session.ca_state => return,
            Happened::Congestion { state } => {
                session.ca_state = state;
                What::Congestion { state }
            }
            Happened::SynAckRetransmit { .. } => return,
        };
        let event = SpanEvent {
            ts_ns: incident.ts_ns,
            what,
        };
        if let Some(requests) = &mut session.requests {
            // Each request in flight went through it too.
            for request in &mut requests.pending {
                if let What::Retransmit { err: 0, .. } = what {
                    request.retransmits += 1;
                }
                self.kept.event(&mut request.events, event, &mut self.stats);
            }
        }
        let Some(closing) = &mut session.closing else {
            self.kept.event(&mut session.events, event, &mut self.stats);
            return;
        };
        let events = closing.ended.events.get_or_insert_default();
        self.kept.event(events, event, &mut self.stats);
        if let What::ResetSent { .. } = what {
            // The RST an abort sends: now the reason is sure, and nothing more
            // follows.
            if matches!(
                closing.ended.state.0,
                tcp_state::FIN_WAIT1 | tcp_state::FIN_WAIT2
            ) && let Some(at) = events
                .kept
                .iter()
                .rposition(|e| e.what == What::ResetReceived)
            {
                // Data after our FIN: the kernel reset the socket itself
                // (tcp_reset), then sent this. No RST came from the peer.
                events.kept.remove(at);
                session.counts.resets_received -= 1;
            }
            let facts = CloseFacts {
                from: Some(closing.ended.state),
                sk_err: session.facts.map_or(0, |f| f.sk_err as i32),
                reset_received: session.counts.resets_received > 0,
                reset_sent: true,
                aborted: true,
            };
            session.error = ErrorType::of(facts);
            closing.ended.error = session.error;
            self.end_closing(skaddr, out);
        }
    }

    /// Ends the sockets whose RST did not come within [`RESET_GRACE_NS`] of their
    /// CLOSE, now that every record up to kernel time `read_through_ns` has been
    /// read (the ring buffer's progress, not the clock: a reader that fell behind
    /// still has their records to read).
    pub fn expire_closing(&mut self, read_through_ns: u64, out: &mut impl FnMut(Update<'_>)) {
        while let Some(&(skaddr, close_ns, ends)) = self.closing.front()
            && close_ns.saturating_add(RESET_GRACE_NS) <= read_through_ns
        {
            self.closing.pop_front();
            // Gone already if it ended otherwise (evicted, its address reused).
            if self.closing_ends.get(&ends) == Some(&skaddr) {
                self.closing_ends.remove(&ends);
            }
            if self
                .sessions
                .peek(&skaddr)
                .and_then(|s| s.closing.as_ref())
                .is_some_and(|c| c.close_ns == close_ns)
            {
                self.end_closing(skaddr, out);
            }
        }
    }

    /// Whether sockets are waiting for their RST.
    pub fn has_closing(&self) -> bool {
        !self.closing.is_empty()
    }

    /// Ends a socket that reached CLOSE and waited for its RST.
    fn end_closing(&mut self, skaddr: u64, out: &mut impl FnMut(Update<'_>)) {
        if !self
            .sessions
            .peek(&skaddr)
            .is_some_and(|s| s.closing.is_some())
        {
            return;
        }
        let Some(mut done) = self.sessions.pop(&skaddr) else {
            return;
        };
        self.kept.release(&done);
        let Some(closing) = done.closing.take() else {
            return;
        };
        let ends = ends_of(&done);
        if self.closing_ends.get(&ends) == Some(&skaddr) {
            self.closing_ends.remove(&ends);
        }
        self.ended.put(ends, ());
        report(&mut done, closing.ended, None, out);
        self.stats.closed += 1;
        end_requests(&mut done, closing.close_ns, &mut self.stats, out);
        out(Update::SessionEnded(
            &done,
            closing.close_ns,
            EndReason::Closed,
        ));
    }

    /// A request on socket `skaddr` carried `link`'s trace context, its first
    /// segment at kernel time `ts_ns`. A socket not in the table (never seen, or
    /// already ended) keeps nothing. A sampled request starts its span.
    pub fn link(&mut self, skaddr: u64, ts_ns: u64, link: Link) {
        let Some(session) = self.sessions.get_mut(&skaddr) else {
            return;
        };
        let added = session
            .links
            .add(link, self.kept.max_links.saturating_sub(self.kept.links));
        match added {
            Added::Kept { slots } => self.kept.links += slots,
            Added::Known => {}
            Added::NotKept => self.stats.links_not_kept += 1,
        }
        if link.trace_flags & 1 == 0 {
            return;
        }
        self.stats.requests_sampled += 1;
        let room = self.kept.requests < self.kept.max_requests;
        let requests = session.requests.get_or_insert_default();
        if requests.admit(&link, added, room) == Admit::No {
            self.stats.requests_not_kept += 1;
            return;
        }
        // The first request on a connection whose opening was seen (its
        // traceparent the only one the socket has seen): the connection was
        // opened for it, and the request waited for its handshake.
        let first = matches!(added, Added::Kept { .. })
            && session.links.kept.len() == 1
            && session.links.dropped == 0;
        let handshake =
            (first && session.begin_seen && matches!(session.role, Role::Client | Role::Server))
                .then(|| Handshake {
                    state: TcpState(if session.role == Role::Client {
                        tcp_state::SYN_SENT
                    } else {
                        tcp_state::SYN_RECV
                    }),
                    end_ns: session.handshake_ns.map(|d| session.birth_ns + d),
                });
        let mut request = Request {
            link,
            index: requests.made,
            start_ns: if handshake.is_some() {
                session.birth_ns.min(ts_ns)
            } else {
                ts_ns
            },
            sent_ns: ts_ns,
            handshake,
            events: SpanEvents::default(),
            retransmits: 0,
        };
        if handshake.is_some()
            && let Some(events) = &session.handshake_events
        {
            for &event in &events.kept {
                if let What::Retransmit { err: 0, .. } = event.what {
                    request.retransmits += 1;
                }
                self.kept.event(&mut request.events, event, &mut self.stats);
            }
        }
        if handshake.is_some() && session.handshake_ns.is_none() {
            // Still in the handshake: its incidents so far.
            for &event in &session.events.kept {
                self.kept.event(&mut request.events, event, &mut self.stats);
            }
        }
        self.kept.requests += 1;
        requests.start(request);
        debug_assert!(requests.pending.len() <= MAX_PENDING);
    }

    /// The first payload segment the other way after a sampled request on socket
    /// `skaddr`, at kernel time `ts_ns` (`sent`: it went out of the socket): the
    /// oldest such request's span ends.
    pub fn answer(
        &mut self,
        skaddr: u64,
        ts_ns: u64,
        sent: bool,
        out: &mut impl FnMut(Update<'_>),
    ) {
        let Some(session) = self.sessions.get_mut(&skaddr) else {
            return;
        };
        let Some(request) = session.requests.as_mut().and_then(|r| r.answered(sent)) else {
            return;
        };
        self.kept.request_gone(&request);
        self.stats.request_spans += 1;
        let ended = RequestEnded {
            end_ns: ts_ns.max(request.start_ns),
            request,
            answered: true,
            state: session.state,
            error: None,
        };
        out(Update::RequestEnded(session, &ended));
    }

    /// Ends every session in flight (at kernel time `now_ns`), oldest activity
    /// first. Each ends whole, whatever time is left: what a consumer with no
    /// time to make its spans does with them is its own affair (sampling still
    /// decides which would have been sent).
    pub fn end_all(&mut self, now_ns: u64, reason: EndReason, out: &mut impl FnMut(Update<'_>)) {
        while let Some((_, session)) = self.sessions.pop_lru() {
            if session.closing.is_some() {
                self.stats.closed += 1;
            }
            self.kept.release(&session);
            finish(session, now_ns, reason, &mut self.stats, out);
        }
    }
}

#[cfg(test)]
impl SessionTable {
    /// [`SessionTable::apply`], then ends at once a socket that would wait for
    /// its RST: for the tests of what the table's updates feed.
    pub(crate) fn apply_settled(&mut self, event: &TcpEvent, out: &mut impl FnMut(Update<'_>)) {
        self.apply(event, out);
        self.expire_closing(u64::MAX, out);
    }
}

/// The connection a session's socket carries, as an RST's record names it.
fn ends_of(session: &Session) -> Tuple {
    (
        session.local_addr,
        session.local_port,
        session.remote_addr,
        session.remote_port,
    )
}

/// Listener `skaddr` of `key` listens no more; the others of its key stay.
fn listener_gone(
    listeners: &mut HashMap<ListenerKey, Vec<(u64, Owner)>>,
    key: ListenerKey,
    skaddr: u64,
) {
    if let Some(live) = listeners.get_mut(&key) {
        live.retain(|&(s, _)| s != skaddr);
        if live.is_empty() {
            listeners.remove(&key);
        }
    }
}

/// A trace id from the keyed hash of the socket's address and birth: never zero.
fn trace_id(ids: &RandomState, skaddr: u64, birth_ns: u64) -> [u8; 16] {
    let high = ids.hash_one((1u8, skaddr, birth_ns));
    let low = ids.hash_one((2u8, skaddr, birth_ns));
    (u128::from(high) << 64 | u128::from(low))
        .max(1)
        .to_be_bytes()
}

/// Reports a state the session left, and keeps it if the session holds its
/// states (moved, not copied). `in_table`: what the table keeps, when the
/// session stays in it (its events leave with the state unless held).
fn report(
    session: &mut Session,
    ended: StateEnded,
    in_table: Option<&mut Budget>,
    out: &mut impl FnMut(Update<'_>),
) {
    session.states_ended += 1;
    if matches!(ended.state.0, tcp_state::SYN_SENT | tcp_state::SYN_RECV) {
        session.handshake_ns = Some(ended.end_ns - ended.start_ns);
        if let Some(requests) = &mut session.requests {
            // A request that came with the handshake (a deferred accept).
            for request in &mut requests.pending {
                if let Some(handshake) = &mut request.handshake {
                    handshake.end_ns.get_or_insert(ended.end_ns);
                }
            }
        }
        if let Some(events) = ended.events.as_deref().filter(|e| !e.kept.is_empty()) {
            let mut kept = events.clone();
            kept.kept.truncate(HANDSHAKE_EVENTS);
            kept.kept.shrink_to_fit();
            session.handshake_events = Some(Box::new(kept));
        }
    }
    out(Update::StateEnded(session, &ended));
    if session.holds {
        session.held.push(ended);
    } else if let Some(kept) = in_table {
        kept.events -= event_slots(&ended);
    }
}

/// Ports and addresses get filled in as the socket progresses (connect() picks the
/// local port after entering SYN_SENT); keep the latest non-zero values.
fn update_endpoints(session: &mut Session, event: &TcpEvent) {
    if event.local_port != 0 {
        session.local_port = event.local_port;
    }
    if event.remote_port != 0 {
        session.remote_port = event.remote_port;
    }
    if !event.local_addr.is_unspecified() {
        session.local_addr = event.local_addr;
    }
    if !event.remote_addr.is_unspecified() {
        session.remote_addr = event.remote_addr;
    }
}

/// Ends a session that did not reach CLOSE: its open state is cut short at `end_ns`.
/// One that reached CLOSE and waits for its RST ends as closed.
/// Its links and events were released from the table's count already.
fn finish(
    mut session: Session,
    end_ns: u64,
    reason: EndReason,
    stats: &mut TableStats,
    out: &mut impl FnMut(Update<'_>),
) {
    if let Some(closing) = session.closing.take() {
        report(&mut session, closing.ended, None, out);
        end_requests(&mut session, closing.close_ns, stats, out);
        out(Update::SessionEnded(
            &session,
            closing.close_ns,
            EndReason::Closed,
        ));
        return;
    }
    if let Some(since) = session.state_since_ns {
        let ended = StateEnded {
            state: session.state,
            index: session.states_ended,
            start_ns: since,
            end_ns: end_ns.max(since),
            next: None,
            pid: 0,
            comm: Comm::default(),
            error: None,
            cut_short: Some(reason),
            events: session.events.take(),
        };
        report(&mut session, ended, None, out);
    }
    let end_ns = end_ns.max(session.birth_ns);
    end_requests(&mut session, end_ns, stats, out);
    out(Update::SessionEnded(&session, end_ns, reason));
}

/// Ends the spans of the requests still in flight as their session ends at
/// `end_ns` (what the table kept of them was released with the session).
fn end_requests(
    session: &mut Session,
    end_ns: u64,
    stats: &mut TableStats,
    out: &mut impl FnMut(Update<'_>),
) {
    let Some(pending) = session
        .requests
        .as_mut()
        .map(|r| std::mem::take(&mut r.pending))
        .filter(|p| !p.is_empty())
    else {
        return;
    };
    let state = if session.facts.is_some() {
        TcpState(tcp_state::CLOSE)
    } else {
        session.state
    };
    for request in pending {
        stats.request_spans += 1;
        let ended = RequestEnded {
            end_ns: end_ns.max(request.start_ns),
            request,
            answered: false,
            state,
            error: session.error,
        };
        out(Update::RequestEnded(session, &ended));
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use otel_tcpstates_common::tcp_state::*;

    use super::*;

    pub(crate) const SK: u64 = 0xffff_8881_0000_1000;

    /// A transition of socket `sk` at kernel time `ts`, `delta` ns after the previous.
    pub(crate) fn ev(sk: u64, ts: u64, delta: u64, old: u8, new: u8, lport: u16) -> TcpEvent {
        let mut comm = [0u8; 16];
        comm[..4].copy_from_slice(b"test");
        ev_as(sk, ts, delta, old, new, lport, 4242, comm)
    }

    /// [`ev`] made by task `pid` named `comm`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn ev_as(
        sk: u64,
        ts: u64,
        delta: u64,
        old: u8,
        new: u8,
        lport: u16,
        pid: u32,
        comm: [u8; 16],
    ) -> TcpEvent {
        let raw = otel_tcpstates_common::Event {
            skaddr: sk,
            ts_ns: ts,
            delta_ns: delta,
            cgroup_id: 0,
            facts: Default::default(),
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [127, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            pid,
            owner_pid: 0,
            comm,
            sport: lport,
            dport: 8080,
            family: otel_tcpstates_common::AF_INET,
            oldstate: old,
            newstate: new,
            netns: 0,
            _pad: 0,
        };
        crate::kernel::event::decode(&crate::kernel::event::tests::record(&raw)).unwrap()
    }

    /// What the table reported, flattened for comparison.
    #[derive(Debug, PartialEq)]
    pub(crate) enum Got {
        State(&'static str, u32, u64, u64, Option<&'static str>),
        Ended(u64, EndReason),
    }

    fn name(state: TcpState) -> &'static str {
        otel_tcpstates_common::tcp_state::name(state.0).unwrap()
    }

    /// Applies `events`, then lets the reset grace pass: sockets that waited for
    /// an RST after their CLOSE end last.
    pub(crate) fn run(table: &mut SessionTable, events: &[TcpEvent]) -> (Vec<Got>, Vec<Session>) {
        run_then(table, events, Some(u64::MAX))
    }

    /// Applies `events`; sockets still waiting for their reset stay in the table.
    fn run_waiting(table: &mut SessionTable, events: &[TcpEvent]) -> (Vec<Got>, Vec<Session>) {
        run_then(table, events, None)
    }

    fn run_then(
        table: &mut SessionTable,
        events: &[TcpEvent],
        expire_at: Option<u64>,
    ) -> (Vec<Got>, Vec<Session>) {
        let mut got = Vec::new();
        let mut sessions = Vec::new();
        let mut collect = |update: Update<'_>| match update {
            Update::RequestEnded(..) => {}
            Update::StateEnded(_, e) => got.push(Got::State(
                name(e.state),
                e.index,
                e.start_ns,
                e.end_ns,
                e.next.map(name),
            )),
            Update::SessionEnded(s, end, reason) => {
                got.push(Got::Ended(end, reason));
                sessions.push(s.clone());
            }
        };
        for event in events {
            table.apply(event, &mut collect);
        }
        if let Some(now) = expire_at {
            table.expire_closing(now, &mut collect);
        }
        (got, sessions)
    }

    pub(crate) fn client_events(sk: u64, t0: u64) -> Vec<TcpEvent> {
        vec![
            ev(sk, t0, 0, CLOSE, SYN_SENT, 0),
            ev(sk, t0 + 50, 50, SYN_SENT, ESTABLISHED, 40000),
            ev(sk, t0 + 1050, 1000, ESTABLISHED, FIN_WAIT1, 40000),
            ev(sk, t0 + 1060, 10, FIN_WAIT1, FIN_WAIT2, 40000),
            ev(sk, t0 + 1065, 5, FIN_WAIT2, CLOSE, 40000),
        ]
    }

    fn table(capacity: usize) -> SessionTable {
        SessionTable::new(NonZeroUsize::new(capacity).unwrap())
    }

    #[test]
    fn ending_all_ends_every_session_oldest_first() {
        let mut t = table(256);
        let opened: Vec<TcpEvent> = (0..101)
            .map(|i| ev(SK + i, 100 + i, 0, CLOSE, SYN_SENT, 0))
            .collect();
        run(&mut t, &opened);
        let mut roots = Vec::new();
        let mut states = 0;
        t.end_all(10_000, EndReason::Shutdown, &mut |u| match u {
            Update::SessionEnded(s, end, reason) => roots.push((s.skaddr, end, reason)),
            Update::StateEnded(..) => states += 1,
            Update::RequestEnded(..) => {}
        });
        // Each left in SYN_SENT: that state's span, then its root.
        assert_eq!((roots.len(), states, t.len()), (101, 101, 0));
        assert!(roots.windows(2).all(|w| w[0].0 < w[1].0), "oldest first");
        assert!(
            roots
                .iter()
                .all(|r| (r.1, r.2) == (10_000, EndReason::Shutdown))
        );
    }

    #[test]
    fn client_lifecycle_reports_each_state_then_the_session() {
        let mut t = table(16);
        let (got, sessions) = run(&mut t, &client_events(SK, 100));
        assert_eq!(
            got,
            [
                Got::State("SYN_SENT", 0, 100, 150, Some("ESTABLISHED")),
                Got::State("ESTABLISHED", 1, 150, 1150, Some("FIN_WAIT1")),
                Got::State("FIN_WAIT1", 2, 1150, 1160, Some("FIN_WAIT2")),
                Got::State("FIN_WAIT2", 3, 1160, 1165, Some("CLOSE")),
                Got::Ended(1165, EndReason::Closed),
            ]
        );
        let s = &sessions[0];
        assert_eq!(
            (s.role, s.begin_seen, s.birth_ns),
            (Role::Client, true, 100)
        );
        assert_eq!(
            s.local_port, 40000,
            "the port connect() picked later is kept"
        );
        assert_eq!(s.local_addr, IpAddr::V4(Ipv4Addr::LOCALHOST));
        assert_eq!(s.owner.map(|o| o.pid), Some(4242));
        assert_eq!(s.error, None);
        assert_eq!(t.len(), 0);
        assert_eq!(t.stats().closed, 1);
    }

    /// [`ev`] into CLOSE with the error the kernel set on the socket.
    fn close_with(sk: u64, ts: u64, delta: u64, old: u8, sk_err: u32) -> TcpEvent {
        let mut event = ev(sk, ts, delta, old, CLOSE, 8080);
        event.facts.sk_err = sk_err;
        event
    }

    fn incident(table: &mut SessionTable, sk: u64, ts_ns: u64, happened: Happened) -> Vec<Got> {
        let mut got = Vec::new();
        let incident = Incident {
            skaddr: sk,
            ts_ns,
            happened,
        };
        table.incident(&incident, &mut |update| match update {
            Update::RequestEnded(..) => {}
            Update::StateEnded(_, e) => got.push(Got::State(
                name(e.state),
                e.index,
                e.start_ns,
                e.end_ns,
                e.next.map(name),
            )),
            Update::SessionEnded(_, end, reason) => got.push(Got::Ended(end, reason)),
        });
        got
    }

    /// Every state span's events and error, and each ended session's error.
    fn run_full(
        table: &mut SessionTable,
        events: &[TcpEvent],
    ) -> (Vec<(StateEnded, Vec<What>)>, Vec<Session>) {
        let (mut states, mut sessions) = (Vec::new(), Vec::new());
        for event in events {
            table.apply_settled(event, &mut |update| match update {
                Update::RequestEnded(..) => {}
                Update::StateEnded(_, e) => {
                    let what = e
                        .events
                        .iter()
                        .flat_map(|e| e.kept.iter().map(|k| k.what))
                        .collect();
                    states.push((e.clone(), what));
                }
                Update::SessionEnded(s, ..) => sessions.push(s.clone()),
            });
        }
        (states, sessions)
    }

    #[test]
    fn accepted_socket_is_a_server_and_a_reset_from_the_peer_is_named() {
        let mut t = table(16);
        let opened = [
            ev(SK, 10, 0, LISTEN, SYN_RECV, 8080),
            ev(SK, 20, 10, SYN_RECV, ESTABLISHED, 8080),
        ];
        run(&mut t, &opened);
        assert_eq!(incident(&mut t, SK, 25, Happened::ResetReceived), []);
        let (states, sessions) = run_full(&mut t, &[close_with(SK, 30, 10, ESTABLISHED, 104)]);
        assert_eq!(sessions[0].role, Role::Server);
        assert_eq!(sessions[0].error, Some(ErrorType::ResetByPeer));
        assert_eq!(sessions[0].counts.resets_received, 1);
        assert_eq!(sessions[0].owner, None, "no system call on it was seen");
        let (established, what) = &states[0];
        assert_eq!(established.error, Some(ErrorType::ResetByPeer));
        // The reset, then the error the kernel set as it closed the socket.
        assert_eq!(what, &[What::ResetReceived, What::Error { errno: 104 }]);

        let (states, refused) = run_full(
            &mut t,
            &[
                ev(SK, 40, 0, CLOSE, SYN_SENT, 0),
                close_with(SK, 41, 1, SYN_SENT, 111),
            ],
        );
        assert_eq!(refused[0].error, Some(ErrorType::ConnectionRefused));
        assert_eq!(states[0].1, [What::Error { errno: 111 }]);
    }

    #[test]
    fn an_abort_waits_for_its_reset_and_then_ends() {
        let mut t = table(16);
        run(&mut t, &client_events(SK, 0)[..2]);
        let (got, _) = run_waiting(&mut t, &[close_with(SK, 500, 450, ESTABLISHED, 0)]);
        assert_eq!(got, [], "the last span waits for the RST");
        assert!(t.has_closing());
        let reset = Happened::ResetSent {
            state: TcpState(CLOSE),
            reason: 12,
            ends: None,
        };
        assert_eq!(
            incident(&mut t, SK, 505, reset),
            [
                Got::State("ESTABLISHED", 1, 50, 500, Some("CLOSE")),
                Got::Ended(500, EndReason::Closed),
            ]
        );
        assert!(t.is_empty());
        assert_eq!(t.stats().closed, 1);
        // A late RST of a socket already ended is only counted.
        assert_eq!(incident(&mut t, SK, 506, reset), []);
        assert_eq!(t.stats().incidents_unmatched, 1);
    }

    /// The connection of the sessions [`ev`] makes with local port `lport`.
    fn ends(lport: u16) -> Tuple {
        (
            Ipv4Addr::new(127, 0, 0, 1).into(),
            lport,
            Ipv4Addr::new(127, 0, 0, 2).into(),
            8080,
        )
    }

    /// An RST from a socket the kernel program no longer follows: `state` CLOSE
    /// (the socket itself, after CLOSE) or TIME_WAIT (the time-wait socket).
    fn reset_of(state: u8, lport: u16) -> Happened {
        Happened::ResetSent {
            state: TcpState(state),
            reason: 8,
            ends: Some(ends(lport)),
        }
    }

    /// The server's side of a keep-alive connection, closed by the server after
    /// its response: ESTABLISHED, FIN_WAIT1, FIN_WAIT2, then CLOSE at 1065.
    fn active_close(sk: u64) -> Vec<TcpEvent> {
        client_events(sk, 0)
    }

    #[test]
    fn a_request_after_our_fin_is_reset_sent_from_the_socket_or_its_time_wait_socket() {
        const TIME_WAIT_SOCKET: u64 = SK + 0x5000;
        let ended = |got: &[Got]| got.iter().any(|g| matches!(g, Got::Ended(..)));
        // The request reached the socket itself (the FIN not yet acknowledged):
        // the kernel closes it and sends the RST from it.
        let mut t = table(16);
        let (got, _) = run_waiting(&mut t, &active_close(SK));
        assert!(!ended(&got), "FIN_WAIT2 -> CLOSE waits for a possible RST");
        let got = incident(&mut t, SK, 1070, reset_of(CLOSE, 40000));
        assert!(ended(&got));
        // The request reached the time-wait socket: the RST names the connection.
        let (got, _) = run_waiting(&mut t, &active_close(SK + 64));
        assert!(!ended(&got));
        let got = incident(&mut t, TIME_WAIT_SOCKET, 1080, reset_of(TIME_WAIT, 40000));
        assert!(ended(&got));
        assert!(t.is_empty() && t.closing_ends.is_empty());
        assert_eq!(t.stats().incidents_unmatched, 0);

        // The same, with the session's error read off what the table reported.
        let mut t = table(16);
        run_waiting(&mut t, &active_close(SK));
        let mut sessions = Vec::new();
        let mut collect = |u: Update<'_>| {
            if let Update::SessionEnded(s, ..) = u {
                sessions.push((s.error, s.counts));
            }
        };
        t.incident(
            &Incident {
                skaddr: TIME_WAIT_SOCKET,
                ts_ns: 1080,
                happened: reset_of(TIME_WAIT, 40000),
            },
            &mut collect,
        );
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0].0, Some(ErrorType::ResetSent));
        assert_eq!(sessions[0].1.resets_sent, 1);
    }

    #[test]
    fn the_kernels_own_reset_on_data_after_our_fin_is_reset_sent_not_received() {
        // shutdown(SHUT_RDWR), then data: tcp_reset on the socket (a reset
        // "received", ECONNRESET), CLOSE, then the RST it sends.
        let mut t = table(16);
        run(&mut t, &active_close(SK)[..4]);
        incident(&mut t, SK, 1064, Happened::ResetReceived);
        let (got, _) = run_waiting(&mut t, &[close_with(SK, 1065, 5, FIN_WAIT2, 104)]);
        assert_eq!(got, [], "waits for the RST that may follow");
        let mut ended = Vec::new();
        t.incident(
            &Incident {
                skaddr: SK,
                ts_ns: 1066,
                happened: reset_of(CLOSE, 40000),
            },
            &mut |u| match u {
                Update::RequestEnded(..) => {}
                Update::SessionEnded(s, ..) => ended.push((s.error, s.counts)),
                Update::StateEnded(_, e) => {
                    let what: Vec<What> = e
                        .events
                        .iter()
                        .flat_map(|e| e.kept.clone())
                        .map(|e| e.what)
                        .collect();
                    assert!(!what.contains(&What::ResetReceived), "{what:?}");
                }
            },
        );
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].0, Some(ErrorType::ResetSent));
        assert_eq!((ended[0].1.resets_sent, ended[0].1.resets_received), (1, 0));

        // A peer's RST in FIN_WAIT2 draws no RST: reset by the peer, after the grace.
        let mut t = table(16);
        run(&mut t, &active_close(SK)[..4]);
        incident(&mut t, SK, 1064, Happened::ResetReceived);
        run_waiting(&mut t, &[close_with(SK, 1065, 5, FIN_WAIT2, 104)]);
        let (_, sessions) = run(&mut t, &[]);
        assert_eq!(sessions[0].error, Some(ErrorType::ResetByPeer));
        assert_eq!(sessions[0].counts.resets_received, 1);
    }

    #[test]
    fn an_rst_after_its_session_ended_is_counted_late_not_unmatched() {
        let mut t = table(16);
        let (_, sessions) = run(&mut t, &active_close(SK));
        assert_eq!(sessions[0].error, None, "no RST came: a clean close");
        // Much later the time-wait socket resets a request.
        assert_eq!(
            incident(
                &mut t,
                SK + 0x5000,
                9_000_000_000,
                reset_of(TIME_WAIT, 40000)
            ),
            []
        );
        assert_eq!(
            (t.stats().resets_late, t.stats().incidents_unmatched),
            (1, 0)
        );
        // An RST of a connection never seen is unmatched.
        incident(&mut t, SK + 0x6000, 9_000_000_001, reset_of(TIME_WAIT, 1));
        assert_eq!(
            (t.stats().resets_late, t.stats().incidents_unmatched),
            (1, 1)
        );
    }

    #[test]
    fn the_grace_runs_on_what_was_read_not_on_the_clock() {
        let mut t = table(16);
        run_waiting(&mut t, &active_close(SK));
        let mut ended = 0;
        // Records read up to just before the grace's end: it still waits, however
        // late the clock is.
        t.expire_closing(1065 + RESET_GRACE_NS - 1, &mut |u| {
            ended += u64::from(matches!(u, Update::SessionEnded(..)))
        });
        assert_eq!(ended, 0);
        t.expire_closing(1065 + RESET_GRACE_NS, &mut |u| {
            ended += u64::from(matches!(u, Update::SessionEnded(..)))
        });
        assert_eq!(ended, 1);
        assert!(t.closing_ends.is_empty() && t.ended.contains(&ends(40000)));
    }

    #[test]
    fn an_abort_whose_reset_never_comes_ends_after_the_grace() {
        let mut t = table(16);
        run(&mut t, &client_events(SK, 0)[..2]);
        run_waiting(&mut t, &[close_with(SK, 500, 450, ESTABLISHED, 0)]);
        let mut ended = Vec::new();
        let mut collect = |u: Update<'_>| {
            if let Update::SessionEnded(s, end, reason) = u {
                ended.push((s.error, end, reason));
            }
        };
        t.expire_closing(500 + RESET_GRACE_NS - 1, &mut collect);
        assert!(t.has_closing());
        t.expire_closing(500 + RESET_GRACE_NS, &mut collect);
        assert!(!t.has_closing() && t.is_empty());
        assert_eq!(
            ended,
            [(Some(ErrorType::ResetSent), 500, EndReason::Closed)]
        );
    }

    #[test]
    fn a_new_socket_at_the_address_ends_the_one_waiting_for_its_reset() {
        let mut t = table(16);
        run(&mut t, &client_events(SK, 0)[..2]);
        run_waiting(&mut t, &[close_with(SK, 500, 450, ESTABLISHED, 0)]);
        let (got, _) = run(&mut t, &[ev(SK, 600, 0, CLOSE, SYN_SENT, 0)]);
        assert_eq!(
            got,
            [
                Got::State("ESTABLISHED", 1, 50, 500, Some("CLOSE")),
                Got::Ended(500, EndReason::Closed),
            ]
        );
        assert_eq!(t.stats().replaced, 0);
    }

    #[test]
    fn synack_retransmits_go_to_the_socket_accepted_for_that_connection() {
        let mut t = table(16);
        let accepted = ev(SK, 2000, 0, LISTEN, SYN_RECV, 8080);
        let synack = Happened::SynAckRetransmit {
            local: (accepted.local_addr, accepted.local_port),
            remote: (accepted.remote_addr, accepted.remote_port),
        };
        let other = Happened::SynAckRetransmit {
            local: (accepted.local_addr, accepted.local_port),
            remote: (accepted.remote_addr, 1),
        };
        incident(&mut t, SK + 64, 1000, synack);
        incident(&mut t, SK + 64, 1001, other);
        let (states, _) = run_full(
            &mut t,
            &[accepted, ev(SK, 2010, 10, SYN_RECV, ESTABLISHED, 8080)],
        );
        let retransmit = What::Retransmit {
            kind: RetransmitKind::SynAck,
            err: 0,
        };
        assert_eq!(states[0].1, [retransmit]);
        let session = t.sessions().next().unwrap();
        assert_eq!(session.counts.retransmits, 1);
    }

    #[test]
    fn retransmit_kinds_follow_the_state_and_the_congestion_state() {
        let mut t = table(16);
        run(&mut t, &client_events(SK, 0)[..1]);
        let retransmit = |state: u8| Happened::Retransmit {
            state: TcpState(state),
            err: 0,
            segs: 2,
        };
        incident(&mut t, SK, 10, retransmit(SYN_SENT));
        run(&mut t, &client_events(SK, 0)[1..2]);
        incident(&mut t, SK, 60, retransmit(ESTABLISHED));
        incident(&mut t, SK, 70, Happened::Congestion { state: 4 });
        incident(&mut t, SK, 80, retransmit(ESTABLISHED));
        incident(
            &mut t,
            SK,
            90,
            Happened::Retransmit {
                state: TcpState(ESTABLISHED),
                err: -11,
                segs: 1,
            },
        );
        let (states, sessions) = run_full(&mut t, &client_events(SK, 0)[2..]);
        let kinds = |what: &[What]| -> Vec<(RetransmitKind, i32)> {
            what.iter()
                .filter_map(|w| match *w {
                    What::Retransmit { kind, err } => Some((kind, err)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            kinds(&states[0].1),
            [
                (RetransmitKind::LossProbe, 0),
                (RetransmitKind::Timeout, 0),
                (RetransmitKind::Timeout, -11)
            ]
        );
        // Segments of the retransmissions sent; the failed one sent none.
        assert_eq!(sessions[0].counts.retransmits, 2 + 2 + 2);
        assert_eq!(sessions[0].error, None);

        let mut unknown = table(16).congestion_known(false);
        run(&mut unknown, &client_events(SK, 0)[..2]);
        incident(&mut unknown, SK, 60, retransmit(ESTABLISHED));
        let (states, _) = run_full(&mut unknown, &client_events(SK, 0)[2..]);
        assert_eq!(kinds(&states[0].1), [(RetransmitKind::Unknown, 0)]);
    }

    #[test]
    fn accepted_sockets_belong_to_their_listener_until_their_owner_acts() {
        let mut t = table(16);
        let named = |name: &[u8]| {
            let mut comm = [0u8; 16];
            comm[..name.len()].copy_from_slice(name);
            comm
        };
        let (_, sessions) = run(
            &mut t,
            &[
                ev_as(1, 10, 0, CLOSE, LISTEN, 8080, 100, named(b"nginx")),
                // Cloned in softirq, on whatever task was running.
                ev_as(2, 20, 0, LISTEN, SYN_RECV, 8080, 0, named(b"swapper/0")),
                ev_as(
                    2,
                    30,
                    10,
                    SYN_RECV,
                    ESTABLISHED,
                    8080,
                    0,
                    named(b"swapper/0"),
                ),
                ev_as(3, 40, 0, LISTEN, SYN_RECV, 8080, 0, named(b"swapper/1")),
                ev_as(3, 50, 10, SYN_RECV, CLOSE, 8080, 0, named(b"swapper/1")),
                // A worker process closes the first connection.
                ev_as(
                    2,
                    60,
                    30,
                    ESTABLISHED,
                    FIN_WAIT1,
                    8080,
                    101,
                    named(b"worker"),
                ),
                ev_as(2, 70, 10, FIN_WAIT1, CLOSE, 8080, 0, named(b"swapper/0")),
                ev_as(1, 80, 70, LISTEN, CLOSE, 8080, 100, named(b"nginx")),
            ],
        );
        let session = |sk: u64| sessions.iter().find(|s| s.skaddr == sk).unwrap();
        let owner = |sk: u64| session(sk).owner.map(|o| (o.pid, o.comm.to_string()));
        assert_eq!(owner(3), Some((100, "nginx".into())), "inherited");
        assert_eq!(owner(2), Some((101, "worker".into())), "its own");
        assert_eq!(owner(1), Some((100, "nginx".into())), "the listener");
        assert_eq!(session(2).facts, Some(TcpFacts::default()), "read at CLOSE");
        assert!(t.listeners.is_empty(), "forgotten at the listener's CLOSE");
    }

    #[test]
    fn each_listener_of_a_port_keeps_its_connections_and_outlives_the_others() {
        let mut t = table(16);
        // (socket, time, old, new, task, owner the kernel named)
        let at = |sk, ts, old, new, pid, owner_pid| {
            let mut e = ev_as(sk, ts, 0, old, new, 8080, pid, [0; 16]);
            e.owner_pid = owner_pid;
            e
        };
        let (_, sessions) = run(
            &mut t,
            &[
                // Two processes listen on one port (SO_REUSEPORT).
                at(1, 10, CLOSE, LISTEN, 100, 100),
                at(2, 20, CLOSE, LISTEN, 200, 200),
                // The kernel named the listener that took each connection.
                at(11, 30, LISTEN, SYN_RECV, 0, 100),
                at(12, 40, LISTEN, SYN_RECV, 0, 200),
                // It could not tell: the newest.
                at(13, 50, LISTEN, SYN_RECV, 0, 0),
                // The newest closes; the first one's connections go on.
                at(2, 60, LISTEN, CLOSE, 200, 200),
                at(14, 70, LISTEN, SYN_RECV, 0, 100),
                at(15, 80, LISTEN, SYN_RECV, 0, 0),
                at(1, 90, LISTEN, CLOSE, 100, 100),
                at(16, 100, LISTEN, SYN_RECV, 0, 0),
            ],
        );
        assert_eq!(sessions.len(), 2, "the listeners ended");
        let owner = |sk: u64| t.sessions.peek(&sk).unwrap().owner.map(|o| o.pid);
        assert_eq!(
            [11, 12, 13, 14, 15, 16].map(owner),
            [Some(100), Some(200), Some(200), Some(100), Some(100), None]
        );
        assert!(t.listeners.is_empty());
    }

    #[test]
    fn a_listener_whose_close_was_lost_is_forgotten_when_its_address_is_reused() {
        let mut t = table(16);
        run(
            &mut t,
            &[
                ev_as(1, 10, 0, CLOSE, LISTEN, 8080, 100, [0; 16]),
                // Its CLOSE was lost; a client now has its address.
                ev(1, 20, 0, CLOSE, SYN_SENT, 0),
            ],
        );
        assert!(t.listeners.is_empty());
    }

    #[test]
    fn listeners_are_told_apart_by_namespace_and_family() {
        let mut t = table(16);
        // (socket, time, old, new, port, pid, netns)
        let at = |sk, ts, old, new, port, pid, netns| {
            let mut e = ev_as(sk, ts, 0, old, new, port, pid, [0; 16]);
            e.netns = netns;
            e
        };
        // A dual-stack listener on `::`, and its IPv4 client's socket.
        let v6 = |mut e: TcpEvent, mapped: bool| {
            e.family = Family::V6;
            if !mapped {
                (e.local_addr, e.remote_addr) = (IpAddr::from([0u16; 8]), IpAddr::from([0u16; 8]));
            }
            e
        };
        let (_, sessions) = run(
            &mut t,
            &[
                at(1, 10, CLOSE, LISTEN, 8080, 100, 1),
                at(2, 20, CLOSE, LISTEN, 8080, 200, 2),
                v6(at(3, 30, CLOSE, LISTEN, 8080, 300, 1), false),
                at(11, 40, LISTEN, SYN_RECV, 8080, 0, 1),
                at(12, 50, LISTEN, SYN_RECV, 8080, 0, 2),
                v6(at(13, 60, LISTEN, SYN_RECV, 8080, 0, 1), true),
                // Namespace 2's server goes away; namespace 1's keep theirs.
                at(2, 70, LISTEN, CLOSE, 8080, 200, 2),
                at(14, 80, LISTEN, SYN_RECV, 8080, 0, 1),
                at(15, 90, LISTEN, SYN_RECV, 8080, 0, 2),
            ],
        );
        assert_eq!(sessions.len(), 1, "only the closed listener ended");
        let owner = |sk: u64| t.sessions.peek(&sk).unwrap().owner.map(|o| o.pid);
        assert_eq!(
            [11, 12, 13, 14, 15].map(owner),
            [Some(100), Some(200), Some(300), Some(100), None]
        );
        let mapped = t.sessions.peek(&13).unwrap();
        assert!(mapped.is_ipv4() && mapped.family == Family::V6);
        assert!(!t.sessions.peek(&3).unwrap().is_ipv4(), "`::` is IPv6");
    }

    #[test]
    fn a_reused_address_is_a_new_session() {
        let mut t = table(16);
        let mut events = client_events(SK, 100);
        events.extend(client_events(SK, 5000));
        let (_, sessions) = run(&mut t, &events);
        assert_eq!(sessions.len(), 2);
        assert_eq!((sessions[0].birth_ns, sessions[1].birth_ns), (100, 5000));

        // A new socket at the address before the old one's CLOSE was seen.
        let (got, _) = run(
            &mut t,
            &[
                ev(SK, 9000, 0, CLOSE, SYN_SENT, 0),
                ev(SK, 9010, 10, SYN_SENT, ESTABLISHED, 1),
                ev(SK, 9500, 0, CLOSE, SYN_SENT, 0),
            ],
        );
        assert_eq!(
            got[1..],
            [
                Got::State("ESTABLISHED", 1, 9010, 9500, None),
                Got::Ended(9500, EndReason::Replaced),
            ]
        );
        assert_eq!(t.stats().replaced, 1);
    }

    #[test]
    fn a_holding_table_keeps_each_ended_state_and_the_handshake_time() {
        let mut t = table(16).holding_states();
        let (got, sessions) = run(&mut t, &client_events(SK, 100));
        let held: Vec<_> = sessions[0]
            .held
            .iter()
            .map(|e| (e.state, e.start_ns, e.end_ns))
            .collect();
        let reported: Vec<_> = got
            .iter()
            .filter_map(|g| match g {
                Got::State(name, _, start, end, _) => Some((*name, *start, *end)),
                Got::Ended(..) => None,
            })
            .collect();
        assert_eq!(held.len(), reported.len());
        for ((state, start, end), (name, s, e)) in held.iter().zip(&reported) {
            assert_eq!((state.to_string().as_str(), *start, *end), (*name, *s, *e));
        }
        assert_eq!(sessions[0].handshake_ns, Some(50), "SYN_SENT lasted 50 ns");
        // Without holding, nothing is kept; the handshake time is all the same.
        let mut t = table(16);
        let mut events = client_events(SK, 100);
        events.extend(client_events(SK, 5000));
        let (_, sessions) = run(&mut t, &events);
        assert!(sessions[0].held.is_empty());
        assert_eq!(sessions[0].handshake_ns, Some(50));
        // A reused address is a new trace.
        assert_ne!(sessions[0].trace_id, sessions[1].trace_id);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_active() {
        let mut t = table(2);
        let (got, sessions) = run(
            &mut t,
            &[
                ev(1, 10, 0, CLOSE, SYN_SENT, 0),
                ev(2, 20, 0, CLOSE, SYN_SENT, 0),
                ev(1, 30, 20, SYN_SENT, ESTABLISHED, 1), // 1 is now the most recent
                ev(3, 40, 0, CLOSE, SYN_SENT, 0),        // evicts 2
            ],
        );
        assert_eq!(
            got[1..],
            [
                Got::State("SYN_SENT", 0, 20, 40, None),
                Got::Ended(40, EndReason::Evicted),
            ]
        );
        assert_eq!(sessions[0].skaddr, 2);
        assert_eq!((t.len(), t.stats().evicted), (2, 1));
    }

    #[test]
    fn a_socket_open_before_the_tracer_started() {
        let mut t = table(16);
        // The kernel did not know it either: no span for the state it left.
        let (got, _) = run(
            &mut t,
            &[
                ev(SK, 1000, 0, ESTABLISHED, FIN_WAIT1, 1),
                ev(SK, 1010, 10, FIN_WAIT1, FIN_WAIT2, 1),
            ],
        );
        assert_eq!(
            got,
            [Got::State("FIN_WAIT1", 0, 1000, 1010, Some("FIN_WAIT2"))]
        );
        let mut sessions = Vec::new();
        t.end_all(2000, EndReason::Shutdown, &mut |u| {
            if let Update::SessionEnded(s, end, reason) = u {
                sessions.push((s.clone(), end, reason));
            }
        });
        let (s, end, reason) = &sessions[0];
        assert_eq!(
            (s.begin_seen, s.role, s.birth_ns),
            (false, Role::Unknown, 1000)
        );
        assert_eq!((*end, *reason), (2000, EndReason::Shutdown));

        // The kernel knew when it entered ESTABLISHED: that span is exact.
        let (got, _) = run(&mut t, &[ev(7, 5000, 300, ESTABLISHED, CLOSE_WAIT, 1)]);
        assert_eq!(
            got,
            [Got::State("ESTABLISHED", 0, 4700, 5000, Some("CLOSE_WAIT"))]
        );
    }

    #[test]
    fn lost_transitions_end_the_believed_state_where_the_kernel_says() {
        let mut t = table(16);
        let (got, _) = run(
            &mut t,
            &[
                ev(SK, 100, 0, CLOSE, SYN_SENT, 0),
                // SYN_SENT -> ESTABLISHED at 150 was lost.
                ev(SK, 400, 250, ESTABLISHED, FIN_WAIT1, 1),
            ],
        );
        assert_eq!(
            got,
            [
                Got::State("SYN_SENT", 0, 100, 150, Some("ESTABLISHED")),
                Got::State("ESTABLISHED", 1, 150, 400, Some("FIN_WAIT1")),
            ]
        );
    }
}
#[cfg(test)]
mod memory {
    //! What the sessions keep, in bytes, at the worst: every socket offered 64
    //! distinct links, 64 incidents in a state it ended (held for sampling) and
    //! 64 in the state it is in.
    use std::mem::size_of;

    use otel_tcpstates_common::tcp_state::*;

    use super::{
        tests::{SK, ev},
        *,
    };
    use crate::kernel::traceparent::Direction;

    /// What a session takes: itself, its links, its open state's events, its
    /// held states and their events (the LRU's own entry and hash slot aside).
    fn bytes(s: &Session) -> usize {
        let events = |e: &SpanEvents| e.kept.capacity() * size_of::<SpanEvent>();
        let held: usize = s
            .held
            .iter()
            .filter_map(|h| h.events.as_deref())
            .map(|e| size_of::<SpanEvents>() + events(e))
            .sum();
        size_of::<Session>()
            + s.links.kept.capacity() * size_of::<Link>()
            + events(&s.events)
            + s.held.capacity() * size_of::<StateEnded>()
            + held
            + s.requests
                .as_ref()
                .map_or(0, |r| size_of::<Requests>() + r.heap_bytes())
    }

    fn retransmit(skaddr: u64, ts_ns: u64, state: u8) -> Incident {
        Incident {
            skaddr,
            ts_ns,
            happened: Happened::Retransmit {
                state: TcpState(state),
                err: 0,
                segs: 1,
            },
        }
    }

    /// `n` sockets at their worst, in a table of `n`.
    fn worst(n: u64) -> SessionTable {
        let mut table = SessionTable::new(NonZeroUsize::new(n as usize).unwrap()).holding_states();
        let mut out = |_: Update<'_>| {};
        for i in 0..n {
            let sk = SK + i;
            table.apply(&ev(sk, 100, 0, CLOSE, SYN_SENT, 0), &mut out);
            for k in 0..64 {
                table.incident(&retransmit(sk, 110 + k, SYN_SENT), &mut out);
            }
            table.apply(&ev(sk, 300, 200, SYN_SENT, ESTABLISHED, 40000), &mut out);
            for k in 0..64 {
                table.incident(&retransmit(sk, 310 + k, ESTABLISHED), &mut out);
            }
            for k in 0..64u64 {
                let link = Link {
                    trace_id: (u128::from(i) << 64 | u128::from(k + 1)).to_be_bytes(),
                    span_id: (k + 1).to_be_bytes(),
                    trace_flags: 1,
                    direction: Direction::Sent,
                    method: 1,
                };
                table.link(sk, 320, link);
            }
        }
        table
    }

    #[test]
    fn sessions_keep_at_most_a_kibibyte_a_socket_with_links_and_events() {
        const N: u64 = 4096;
        let table = worst(N);
        assert_eq!(table.len(), N as usize);
        let sizes: Vec<usize> = table.sessions().map(bytes).collect();
        let total: usize = sizes.iter().sum();
        let most = *sizes.iter().max().unwrap();
        let per_socket = total / N as usize;
        eprintln!(
            "{N} sockets at their worst: {per_socket} bytes a socket on average, \
             {most} at most (Session itself {} bytes, a request in flight {}, a \
             socket's requests {} and their list)",
            size_of::<Session>(),
            size_of::<Request>(),
            size_of::<Requests>()
        );
        // One socket may keep all it was offered: 64 links, 64 events in each
        // of two states.
        assert!(most <= 5 * 1024, "{most} bytes in one session");
        // All of them together may not: 65,536 sockets take 64 MiB at most.
        assert!(per_socket <= 1024, "{per_socket} bytes a socket");
    }

    #[test]
    fn what_is_not_kept_is_counted_and_the_bounds_are_given_back() {
        const N: u64 = 512;
        let mut table = worst(N);
        let links: usize = table.sessions().map(|s| s.links.kept.len()).sum();
        let events: usize = table
            .sessions()
            .map(|s| {
                s.events.kept.len()
                    + s.held
                        .iter()
                        .filter_map(|h| h.events.as_deref())
                        .map(|e| e.kept.len())
                        .sum::<usize>()
            })
            .sum();
        // The first request of a socket is offered a copy of the handshake's
        // events it kept (at most 8), in the same bound.
        let on_requests: usize = table
            .sessions()
            .filter_map(|s| s.requests.as_ref())
            .flat_map(|r| r.pending.iter().map(|p| p.events.kept.len()))
            .sum();
        let offered: usize = table
            .sessions()
            .filter(|s| s.requests.as_ref().is_some_and(|r| r.made > 0))
            .filter_map(|s| s.handshake_events.as_ref())
            .map(|e| e.kept.len())
            .sum();
        let stats = table.stats();
        assert_eq!(links as u64 + stats.links_not_kept, 64 * N);
        let requests = table.stats().requests_sampled - table.stats().requests_not_kept;
        assert_eq!(requests, table.kept.requests as u64);
        assert!(table.kept.requests <= N as usize * REQUESTS_PER_SOCKET);
        assert_eq!(
            (events + on_requests) as u64 + stats.events_not_kept,
            2 * 64 * N + offered as u64
        );
        assert!(table.kept.links <= N as usize * LINKS_PER_SOCKET);
        assert!(table.kept.events <= N as usize * EVENTS_PER_SOCKET);
        // Each root says its own: dropped_links_count.
        let dropped: u64 = table.sessions().map(|s| u64::from(s.links.dropped)).sum();
        assert_eq!(dropped, stats.links_not_kept);
        table.end_all(1000, EndReason::Shutdown, &mut |_| {});
        assert!(table.is_empty());
        assert_eq!(
            (table.kept.links, table.kept.events, table.kept.requests),
            (0, 0, 0)
        );
        // Room again for the next sockets.
        let mut table = table;
        table.apply(&ev(SK, 2000, 0, CLOSE, SYN_SENT, 0), &mut |_| {});
        table.incident(&retransmit(SK, 2010, SYN_SENT), &mut |_| {});
        assert_eq!(table.sessions().next().unwrap().events.kept.len(), 1);
    }

    #[test]
    fn only_the_sessions_whose_decision_waits_hold_their_states() {
        let mut table = SessionTable::new(NonZeroUsize::new(16).unwrap())
            .holding_states_if(|trace_id| trace_id[15] % 2 == 0);
        for sk in 0..8 {
            for event in tests::client_events(SK + sk, 100) {
                table.apply(&event, &mut |update| {
                    if let Update::SessionEnded(s, ..) = update {
                        let waits = s.trace_id[15] % 2 == 0;
                        assert_eq!(s.holds, waits);
                        assert_eq!(s.held.len(), if waits { 4 } else { 0 });
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod requests {
    //! Sampled requests: each a span from its first segment (or its connection's
    //! start) to its answer's first segment, with what happened in between.
    use otel_tcpstates_common::tcp_state::*;

    use super::{
        tests::{SK, client_events, ev},
        *,
    };
    use crate::kernel::traceparent::Direction;

    fn link(n: u8, sampled: bool) -> Link {
        Link {
            trace_id: [n; 16],
            span_id: [n; 8],
            trace_flags: u8::from(sampled),
            direction: Direction::Sent,
            method: 1,
        }
    }

    fn retransmit(ts_ns: u64, state: u8) -> Incident {
        Incident {
            skaddr: SK,
            ts_ns,
            happened: Happened::Retransmit {
                state: TcpState(state),
                err: 0,
                segs: 1,
            },
        }
    }

    #[test]
    fn a_sampled_request_is_timed_from_its_first_segment_to_its_answer() {
        let mut t = SessionTable::new(NonZeroUsize::new(16).unwrap());
        let mut got = Vec::new();
        let mut rules = Vec::new();
        let mut collect = |u: Update<'_>| match u {
            Update::RequestEnded(_, e) => got.push(e.clone()),
            Update::SessionEnded(s, end, _) => {
                rules.push(crate::sampling::rules::KeepRules::default().check(s, end))
            }
            Update::StateEnded(..) => {}
        };
        let events = client_events(SK, 1000);
        // A SYN sent again: the handshake the first request waits for.
        t.apply(&events[0], &mut collect);
        t.incident(&retransmit(1020, SYN_SENT), &mut collect);
        t.apply(&events[1], &mut collect);
        t.link(SK, 1100, link(1, true));
        // Not sampled: a link, no span.
        t.link(SK, 1101, link(2, false));
        t.incident(&retransmit(1150, ESTABLISHED), &mut collect);
        // An answer the same way as the request answers nothing.
        t.answer(SK, 1190, true, &mut collect);
        t.answer(SK, 1200, false, &mut collect);
        // No request in flight: nothing.
        t.answer(SK, 1250, false, &mut collect);
        t.link(SK, 1300, link(3, true));
        for event in &events[2..] {
            t.apply_settled(event, &mut collect);
        }
        assert_eq!(got.len(), 2, "{got:#?}");
        let first = &got[0];
        // The connection was opened for it: from connect() on.
        assert_eq!(
            (first.request.start_ns, first.request.sent_ns, first.end_ns),
            (1000, 1100, 1200)
        );
        assert!(first.answered);
        assert_eq!(
            first.request.handshake,
            Some(Handshake {
                state: TcpState(SYN_SENT),
                end_ns: Some(1050)
            })
        );
        let at: Vec<u64> = first.request.events.kept.iter().map(|e| e.ts_ns).collect();
        assert_eq!(at, [1020, 1150]);
        assert_eq!(first.request.retransmits, 2);
        assert_eq!(first.state, TcpState(ESTABLISHED));
        // The second, on the same connection: from its own first segment to the
        // connection's end, which came before any answer.
        let second = &got[1];
        assert_eq!(
            (second.request.start_ns, second.end_ns, second.answered),
            (1300, 2065, false)
        );
        assert_eq!(second.request.handshake, None);
        assert_eq!((second.request.index, second.state), (1, TcpState(CLOSE)));
        assert!(second.request.events.kept.is_empty());
        let stats = t.stats();
        assert_eq!(
            (
                stats.requests_sampled,
                stats.request_spans,
                stats.requests_not_kept
            ),
            (2, 2, 0)
        );
        // The connection carried a sampled request: the rule keeps it.
        use crate::sampling::rules::KeptBy;
        assert_eq!(rules, [KeptBy::RETRANSMIT | KeptBy::SAMPLED_REQUEST]);
    }

    #[test]
    fn a_request_on_a_socket_already_open_or_in_its_handshake() {
        let mut t = SessionTable::new(NonZeroUsize::new(16).unwrap());
        let got = std::cell::RefCell::new(Vec::new());
        let mut collect = |u: Update<'_>| {
            if let Update::RequestEnded(_, e) = u {
                got.borrow_mut().push(e.clone());
            }
        };
        // Already open when the tracer started: not opened for it.
        t.apply(
            &ev(SK, 5000, 4000, ESTABLISHED, FIN_WAIT1, 80),
            &mut collect,
        );
        t.link(SK, 5100, link(1, true));
        t.apply_settled(&ev(SK, 5200, 100, FIN_WAIT1, CLOSE, 80), &mut collect);
        {
            let got = got.borrow();
            assert_eq!(got.len(), 1);
            assert_eq!(
                (got[0].request.start_ns, got[0].request.handshake),
                (5100, None)
            );
        }
        // A request that came with the handshake (a deferred accept): its
        // handshake's end is filled in when the handshake ends.
        let sk = SK + 64;
        let mut server = vec![ev(sk, 7000, 0, LISTEN, SYN_RECV, 80)];
        t.apply(&server[0], &mut collect);
        t.link(
            sk,
            7000,
            Link {
                direction: Direction::Received,
                ..link(2, true)
            },
        );
        server.push(ev(sk, 7010, 10, SYN_RECV, ESTABLISHED, 80));
        t.apply(&server[1], &mut collect);
        t.answer(sk, 7500, true, &mut collect);
        let got = got.borrow();
        let served = &got[1];
        assert_eq!(
            served.request.handshake,
            Some(Handshake {
                state: TcpState(SYN_RECV),
                end_ns: Some(7010)
            })
        );
        assert_eq!((served.request.start_ns, served.end_ns), (7000, 7500));
    }

    #[test]
    fn requests_in_flight_are_bounded_by_the_table_and_given_back() {
        // Room for one request in flight in all.
        let mut t = SessionTable::new(NonZeroUsize::new(1).unwrap());
        let spans = std::cell::Cell::new(0);
        let mut collect = |u: Update<'_>| {
            spans.set(spans.get() + usize::from(matches!(u, Update::RequestEnded(..))))
        };
        let events = client_events(SK, 1000);
        t.apply(&events[0], &mut collect);
        t.apply(&events[1], &mut collect);
        t.link(SK, 1100, link(1, true));
        t.link(SK, 1101, link(2, true));
        assert_eq!(t.stats().requests_not_kept, 1);
        t.answer(SK, 1200, false, &mut collect);
        // Its room given back.
        t.link(SK, 1300, link(3, true));
        t.answer(SK, 1400, false, &mut collect);
        assert_eq!(spans.get(), 2);
        assert_eq!(t.kept.requests, 0);
        t.link(SK, 1500, link(4, true));
        assert_eq!(t.kept.requests, 1);
        t.end_all(2000, EndReason::Shutdown, &mut collect);
        assert_eq!((spans.get(), t.kept.requests, t.kept.events), (3, 0, 0));
    }
}
