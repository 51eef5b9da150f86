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
        of: Option<[u8; 8]>,
        out: &mut impl FnMut(Update<'_>),
    ) {
        let Some(session) = self.sessions.get_mut(&skaddr) else {
            return;
        };
        let Some(request) = session.requests.as_mut().and_then(|r| r.answered(sent, of)) else {
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
mod memory;
#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
mod request_spans;
