//! Span records to OTLP bytes: an `ExportTraceServiceRequest` written straight
//! into a reused buffer with prost's wire primitives. The resource and scope are
//! encoded once each (with opentelemetry-proto's types: they are small and rare);
//! a span's attributes are written from the record, their keys constant.
use std::{collections::HashMap, hash::Hash, net::IpAddr};

use foldhash::fast::RandomState;
use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value},
    resource::v1::Resource,
};
use prost::{
    Message as _,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint},
};

use crate::{
    kernel::event::{Comm, TcpState},
    kernel::traceparent,
    otlp::spans::{self, Body, EventRecords, ResourceKey, SpanRecord, attr, event as span_event},
    sampling::threshold::Threshold,
    sessions::incidents::{What, congestion_name, reset_reason_name},
    sessions::links::Links,
    sessions::outcome::errno_name,
    sessions::table::{EndReason, Role},
};

/// OTLP's span flags: the W3C trace flags (sampled, and random: the trace ids are
/// keyed hashes, so their low 56 bits are random as W3C Trace Context Level 2
/// means it) and "the parent's remoteness is known" (it is never remote).
const SPAN_FLAGS: u32 = 0x01 | 0x02 | 0x100;
const STATUS_ERROR: u64 = 2;

/// Field numbers, from opentelemetry/proto/trace/v1/trace.proto and common.proto.
mod field {
    pub const RESOURCE_SPANS: u32 = 1;
    pub const RS_RESOURCE: u32 = 1;
    pub const RS_SCOPE_SPANS: u32 = 2;
    pub const SS_SCOPE: u32 = 1;
    pub const SS_SPANS: u32 = 2;
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const EVENTS: u32 = 11;
    pub const DROPPED_EVENTS_COUNT: u32 = 12;
    pub const EVENT_TIME: u32 = 1;
    pub const EVENT_NAME: u32 = 2;
    pub const EVENT_ATTRIBUTES: u32 = 3;
    pub const LINKS: u32 = 13;
    pub const DROPPED_LINKS_COUNT: u32 = 14;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    pub const STATUS_MESSAGE: u32 = 2;
    pub const STATUS_CODE: u32 = 3;
    pub const KV_KEY: u32 = 1;
    pub const KV_VALUE: u32 = 2;
    pub const ANY_STRING: u32 = 1;
    pub const ANY_BOOL: u32 = 2;
    pub const ANY_INT: u32 = 3;
    pub const LINK_TRACE_ID: u32 = 1;
    pub const LINK_SPAN_ID: u32 = 2;
    pub const LINK_ATTRIBUTES: u32 = 4;
    pub const LINK_FLAGS: u32 = 6;
}

/// A link's flags: the W3C trace flags, and "the context is remote" (it came in a
/// request's header), known.
const LINK_REMOTE_FLAGS: u32 = 0x100 | 0x200;
/// A request span's link to its connection: sampled, and not remote (this
/// process made that span).
const CONNECTION_LINK_FLAGS: u32 = 0x01 | 0x100;

/// The resource attributes every span carries (service, host, SDK, those of
/// `OTEL_RESOURCE_ATTRIBUTES`), as OTLP key-values.
pub type BaseResource = Vec<KeyValue>;

/// Formatted text of recurring values (addresses, command names), bounded.
struct Texts<K>(HashMap<K, Box<str>, RandomState>);

impl<K: Eq + Hash + Copy> Texts<K> {
    /// Past this many distinct values the cache starts over.
    const MAX: usize = 4096;

    fn new() -> Self {
        Self(HashMap::default())
    }

    fn get(&mut self, key: K, format: impl FnOnce(K) -> String) -> &str {
        if self.0.len() >= Self::MAX && !self.0.contains_key(&key) {
            self.0.clear();
        }
        self.0.entry(key).or_insert_with(|| format(key).into())
    }
}

/// The spans of one resource in the request being built.
struct Group {
    key: ResourceKey,
    /// Encoded `Span` messages, each with its field key and length.
    spans: Vec<u8>,
}

/// Builds export requests from span records.
pub struct Encoder {
    base: BaseResource,
    scope: Vec<u8>,
    /// Encoded `Resource` messages by key, built once each (bounded).
    resources: HashMap<ResourceKey, Vec<u8>, RandomState>,
    ips: Texts<IpAddr>,
    comms: Texts<Comm>,
    groups: Vec<Group>,
    spans: usize,
    fixed: Fixed,
    /// The `trace_state` field of the spans kept by the one threshold in force.
    trace_state: Option<(Threshold, Vec<u8>)>,
}

/// The encoded bytes of fields whose values come from a small set: each written
/// once, here, and copied into every span.
struct Fixed {
    /// `network.transport` and `network.type`, by IPv4 (0) or IPv6 (1).
    network: [Vec<u8>; 2],
    /// By state number: the span's name field, `tcpstates.state`, `tcpstates.next_state`.
    name: Vec<Vec<u8>>,
    state: Vec<Vec<u8>>,
    next_state: Vec<Vec<u8>>,
    role: Vec<Vec<u8>>,
    end_reason: Vec<Vec<u8>>,
    begin_seen: [Vec<u8>; 2],
}

impl Fixed {
    fn new() -> Self {
        fn written(write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
            let mut out = Vec::new();
            write(&mut out);
            out
        }
        let network = |version: &[u8]| {
            written(|out| {
                str_attr(out, attr::NETWORK_TRANSPORT, b"tcp");
                str_attr(out, attr::NETWORK_TYPE, version);
            })
        };
        let states = |write: fn(&mut Vec<u8>, &[u8])| {
            (0..=u8::MAX)
                .map(|n| written(|out| write(out, spans::state_name(TcpState(n)).as_bytes())))
                .collect()
        };
        let reasons = [
            EndReason::Closed,
            EndReason::Evicted,
            EndReason::Shutdown,
            EndReason::Replaced,
        ];
        let roles = [Role::Client, Role::Server, Role::Listener, Role::Unknown];
        Self {
            network: [network(b"ipv4"), network(b"ipv6")],
            name: states(|out, name| bytes(out, field::NAME, name)),
            state: states(|out, name| str_attr(out, attr::STATE, name)),
            next_state: states(|out, name| str_attr(out, attr::NEXT_STATE, name)),
            // Indexed by discriminant: the arrays above are in declaration order.
            role: roles
                .map(|r| written(|out| str_attr(out, attr::ROLE, r.as_str().as_bytes())))
                .to_vec(),
            end_reason: reasons
                .map(|r| written(|out| str_attr(out, attr::END_REASON, r.as_str().as_bytes())))
                .to_vec(),
            begin_seen: [false, true].map(|b| written(|out| bool_attr(out, attr::BEGIN_SEEN, b))),
        }
    }
}

/// Distinct resources kept between requests (with their buffers).
const MAX_GROUPS: usize = 64;
/// Room made before each span: more than the largest one takes.
const SPAN_RESERVE: usize = 2048;

impl Encoder {
    pub fn new(base: BaseResource) -> Self {
        let scope = InstrumentationScope {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        Self {
            base,
            scope: scope.encode_to_vec(),
            resources: HashMap::default(),
            ips: Texts::new(),
            comms: Texts::new(),
            groups: Vec::new(),
            spans: 0,
            fixed: Fixed::new(),
            trace_state: None,
        }
    }

    /// Spans in the request being built.
    pub fn len(&self) -> usize {
        self.spans
    }

    /// Encoded bytes of the spans in the request being built.
    pub fn bytes(&self) -> usize {
        self.groups.iter().map(|g| g.spans.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.spans == 0
    }

    /// Adds one span to the request being built.
    pub fn add(&mut self, record: &SpanRecord) {
        let at = match self.groups.iter().position(|g| g.key == record.resource) {
            Some(at) => at,
            None => {
                // Groups are kept, buffers and all, for the next requests: bounded.
                if self.groups.len() >= MAX_GROUPS {
                    self.groups.retain(|g| !g.spans.is_empty());
                }
                self.groups.push(Group {
                    key: record.resource,
                    spans: Vec::with_capacity(64 * 1024),
                });
                self.groups.len() - 1
            }
        };
        let mut out = std::mem::take(&mut self.groups[at].spans);
        out.reserve(SPAN_RESERVE);
        encode_key(field::SS_SPANS, WireType::LengthDelimited, &mut out);
        // The span's length goes before it: two bytes are kept for it, a span's
        // length always being one that takes two bytes as a varint (its fixed
        // fields alone are over 127 bytes); otherwise it is moved.
        let at_len = out.len();
        out.extend_from_slice(&[0, 0]);
        self.span(record, &mut out);
        let len = out.len() - at_len - 2;
        if (128..16384).contains(&len) {
            out[at_len] = (len & 0x7f) as u8 | 0x80;
            out[at_len + 1] = (len >> 7) as u8;
        } else {
            let span = out.split_off(at_len + 2);
            out.truncate(at_len);
            encode_varint(len as u64, &mut out);
            out.extend_from_slice(&span);
        }
        self.groups[at].spans = out;
        self.spans += 1;
    }

    /// Appends the request built so far to `out` (after the transport's framing)
    /// and starts a new one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        for group in self.groups.iter_mut().filter(|g| !g.spans.is_empty()) {
            if self.resources.len() >= 1024 && !self.resources.contains_key(&group.key) {
                self.resources.clear();
            }
            let resource = self
                .resources
                .entry(group.key)
                .or_insert_with(|| resource(&self.base, group.key).encode_to_vec());
            let scope_spans = len_field(self.scope.len()) + group.spans.len();
            let resource_spans = len_field(resource.len()) + len_field(scope_spans);
            out.reserve(resource_spans + 8);
            encode_key(field::RESOURCE_SPANS, WireType::LengthDelimited, out);
            encode_varint(resource_spans as u64, out);
            encode_key(field::RS_RESOURCE, WireType::LengthDelimited, out);
            encode_varint(resource.len() as u64, out);
            out.extend_from_slice(resource);
            encode_key(field::RS_SCOPE_SPANS, WireType::LengthDelimited, out);
            encode_varint(scope_spans as u64, out);
            encode_key(field::SS_SCOPE, WireType::LengthDelimited, out);
            encode_varint(self.scope.len() as u64, out);
            out.extend_from_slice(&self.scope);
            out.extend_from_slice(&group.spans);
            group.spans.clear();
        }
        self.spans = 0;
    }

    fn span(&mut self, r: &SpanRecord, out: &mut Vec<u8>) {
        bytes(out, field::TRACE_ID, &r.trace_id);
        bytes(out, field::SPAN_ID, &r.span_id);
        if let Some(threshold) = r.threshold {
            out.extend_from_slice(self.trace_state(threshold));
        }
        if let Some(parent) = &r.parent_span_id {
            bytes(out, field::PARENT_SPAN_ID, parent);
        }
        match r.body {
            Body::State { state, .. } => out.extend_from_slice(&self.fixed.name[state.0 as usize]),
            Body::Root { .. } => bytes(out, field::NAME, spans::ROOT_NAME.as_bytes()),
            Body::Request { .. } => bytes(out, field::NAME, spans::REQUEST_NAME.as_bytes()),
        }
        varint(out, field::KIND, r.kind() as u64);
        fixed64(out, field::START, r.start_unix_ns);
        fixed64(out, field::END, r.end_unix_ns);

        out.extend_from_slice(&self.fixed.network[usize::from(r.local.0.is_ipv6())]);
        self.ip_attr(out, attr::LOCAL_ADDRESS, r.local.0);
        int_attr(out, attr::LOCAL_PORT, r.local.1.into());
        self.ip_attr(out, attr::PEER_ADDRESS, r.peer.0);
        int_attr(out, attr::PEER_PORT, r.peer.1.into());
        match r.body {
            Body::State {
                state,
                next,
                cut_short,
                events: _,
            } => {
                out.extend_from_slice(&self.fixed.state[state.0 as usize]);
                if let Some((next, pid, comm)) = next {
                    out.extend_from_slice(&self.fixed.next_state[next.0 as usize]);
                    int_attr(out, attr::TRANSITION_PID, pid.into());
                    self.comm_attr(out, attr::TRANSITION_COMM, comm);
                }
                if let Some(reason) = cut_short {
                    out.extend_from_slice(&self.fixed.end_reason[reason as usize]);
                }
            }
            Body::Root {
                role,
                owner,
                facts,
                skaddr,
                begin_seen,
                end_reason,
                links: _,
                kept_by,
                counts,
            } => {
                self.ends(out, r);
                if let Some((pid, comm)) = owner {
                    int_attr(out, attr::PROCESS_PID, pid.into());
                    self.comm_attr(out, attr::PROCESS_EXECUTABLE_NAME, comm);
                }
                if let Some(facts) = facts {
                    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    int_attr(out, attr::BYTES_ACKED, int(facts.bytes_acked));
                    int_attr(out, attr::BYTES_RECEIVED, int(facts.bytes_received));
                    int_attr(out, attr::SRTT_US, (facts.srtt_us_x8 >> 3).into());
                    int_attr(out, attr::TOTAL_RETRANS, facts.total_retrans.into());
                    int_attr(out, attr::SEGS_IN, facts.segs_in.into());
                    int_attr(out, attr::SEGS_OUT, facts.segs_out.into());
                }
                let mut hex = [0u8; 16];
                str_attr(out, attr::SKADDR, hex_u64(skaddr, &mut hex));
                out.extend_from_slice(&self.fixed.role[role as usize]);
                out.extend_from_slice(&self.fixed.begin_seen[usize::from(begin_seen)]);
                out.extend_from_slice(&self.fixed.end_reason[end_reason as usize]);
                if !kept_by.is_empty() {
                    str_attr(out, attr::SAMPLING_KEPT_BY, kept_by.names().as_bytes());
                }
                if let Some(counts) = counts {
                    int_attr(out, attr::RETRANSMITS, counts.retransmits.into());
                    int_attr(out, attr::RESETS_SENT, counts.resets_sent.into());
                    int_attr(out, attr::RESETS_RECEIVED, counts.resets_received.into());
                }
            }
            Body::Request {
                role,
                owner,
                direction,
                trace_flags: _,
                method,
                handshake,
                answer_ns,
                state,
                connection: _,
                events: _,
            } => {
                self.ends(out, r);
                if let Some((pid, comm)) = owner {
                    int_attr(out, attr::PROCESS_PID, pid.into());
                    self.comm_attr(out, attr::PROCESS_EXECUTABLE_NAME, comm);
                }
                str_attr(
                    out,
                    attr::HTTP_REQUEST_METHOD,
                    traceparent::method_name(method).as_bytes(),
                );
                str_attr(out, attr::LINK_DIRECTION, direction.as_str().as_bytes());
                out.extend_from_slice(&self.fixed.role[role as usize]);
                out.extend_from_slice(&self.fixed.state[state.0 as usize]);
                bool_attr(out, attr::CONNECTION_NEW, handshake.is_some());
                if let Some((state, duration_ns)) = handshake {
                    str_attr(
                        out,
                        attr::HANDSHAKE_STATE,
                        spans::state_name(state).as_bytes(),
                    );
                    if let Some(ns) = duration_ns {
                        int_attr(out, attr::HANDSHAKE_US, micros(ns));
                    }
                }
                bool_attr(out, attr::REQUEST_ANSWERED, answer_ns.is_some());
                if let Some(ns) = answer_ns {
                    int_attr(out, attr::REQUEST_ANSWER_US, micros(ns));
                }
            }
        }
        if let Some(error) = r.error {
            str_attr(out, attr::ERROR_TYPE, error.as_str().as_bytes());
        }
        // In field order, as prost writes them: events, links, status, flags.
        match &r.body {
            Body::State {
                events: Some(events),
                ..
            } => write_events(out, events),
            Body::Root {
                links: Some(links), ..
            } => write_links(out, links),
            Body::Request {
                events, connection, ..
            } => {
                if let Some(events) = events {
                    write_events(out, events);
                }
                write_connection_link(out, *connection);
            }
            _ => {}
        }
        if let Some(error) = r.error {
            let message = error.message();
            let len = len_field(message.len()) + 1 + encoded_len_varint(STATUS_ERROR);
            encode_key(field::STATUS, WireType::LengthDelimited, out);
            encode_varint(len as u64, out);
            bytes(out, field::STATUS_MESSAGE, message.as_bytes());
            varint(out, field::STATUS_CODE, STATUS_ERROR);
        }
        encode_key(field::FLAGS, WireType::ThirtyTwoBit, out);
        let flags = match r.body {
            // In the application's trace, under a span of another process.
            Body::Request { trace_flags, .. } => u32::from(trace_flags) | LINK_REMOTE_FLAGS,
            _ => SPAN_FLAGS,
        };
        out.extend_from_slice(&flags.to_le_bytes());
    }

    /// `client.*` and `server.*`, as far as the span's role tells.
    fn ends(&mut self, out: &mut Vec<u8>, r: &SpanRecord) {
        let (client, server) = r.client_server();
        if let Some((addr, port)) = client {
            self.ip_attr(out, attr::CLIENT_ADDRESS, addr);
            int_attr(out, attr::CLIENT_PORT, port.into());
        }
        if let Some((addr, port)) = server {
            self.ip_attr(out, attr::SERVER_ADDRESS, addr);
            int_attr(out, attr::SERVER_PORT, port.into());
        }
    }

    /// The encoded `trace_state` field for `threshold`, made once.
    fn trace_state(&mut self, threshold: Threshold) -> &[u8] {
        if self
            .trace_state
            .as_ref()
            .is_none_or(|(t, _)| *t != threshold)
        {
            let mut field = Vec::new();
            bytes(
                &mut field,
                field::TRACE_STATE,
                threshold.trace_state().as_bytes(),
            );
            self.trace_state = Some((threshold, field));
        }
        &self.trace_state.as_ref().expect("just made").1
    }

    fn ip_attr(&mut self, out: &mut Vec<u8>, key: &str, ip: IpAddr) {
        match ip {
            // Most addresses: written straight from a table, no lookup.
            IpAddr::V4(v4) => {
                let mut text = [0u8; 15];
                let mut len = 0;
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        text[len] = b'.';
                        len += 1;
                    }
                    let digits = decimal(octet);
                    text[len..len + digits.len()].copy_from_slice(digits);
                    len += digits.len();
                }
                str_attr(out, key, &text[..len]);
            }
            IpAddr::V6(_) => {
                let text = self.ips.get(ip, |ip| ip.to_string());
                str_attr(out, key, text.as_bytes());
            }
        }
    }

    fn comm_attr(&mut self, out: &mut Vec<u8>, key: &str, comm: Comm) {
        // Protobuf strings are UTF-8; a comm need not be, and then it is written
        // as its lossy text, kept.
        match std::str::from_utf8(comm.as_bytes()) {
            Ok(text) => str_attr(out, key, text.as_bytes()),
            Err(_) => {
                let text = self.comms.get(comm, |comm| comm.to_string());
                str_attr(out, key, text.as_bytes());
            }
        }
    }
}

/// A state span's `events` and `dropped_events_count`.
fn write_events(out: &mut Vec<u8>, events: &EventRecords) {
    let mut body = Vec::with_capacity(128);
    for event in &events.kept {
        body.clear();
        // In field-number order, as prost writes them: time, name, attributes.
        fixed64(&mut body, field::EVENT_TIME, event.unix_ns);
        bytes(
            &mut body,
            field::EVENT_NAME,
            event_name(&event.what).as_bytes(),
        );
        let tag = field::EVENT_ATTRIBUTES;
        match event.what {
            What::Retransmit { kind, err } => {
                str_kv(
                    &mut body,
                    tag,
                    attr::RETRANSMIT_KIND,
                    kind.as_str().as_bytes(),
                );
                if err != 0 {
                    let name = errno_name(err.saturating_neg());
                    str_kv(&mut body, tag, attr::RETRANSMIT_ERROR, name.as_bytes());
                }
            }
            What::ResetSent { reason } => {
                let reason = reset_reason_name(reason);
                str_kv(&mut body, tag, attr::RESET_REASON, reason.as_bytes());
            }
            What::ResetReceived => {}
            What::Error { errno } => {
                int_kv(&mut body, tag, attr::ERRNO, errno.into());
                str_kv(
                    &mut body,
                    tag,
                    attr::ERRNO_NAME,
                    errno_name(errno).as_bytes(),
                );
            }
            What::Congestion { state } => {
                let state = congestion_name(state);
                str_kv(&mut body, tag, attr::CONGESTION_STATE, state.as_bytes());
            }
            What::Established | What::RequestSent => {}
        }
        bytes(out, field::EVENTS, &body);
    }
    if events.dropped > 0 {
        varint(out, field::DROPPED_EVENTS_COUNT, events.dropped.into());
    }
}

fn event_name(what: &What) -> &'static str {
    match what {
        What::Retransmit { .. } => span_event::RETRANSMIT,
        What::ResetSent { .. } => span_event::RESET_SENT,
        What::ResetReceived => span_event::RESET_RECEIVED,
        What::Error { .. } => span_event::ERROR,
        What::Congestion { .. } => span_event::CONGESTION,
        What::Established => span_event::ESTABLISHED,
        What::RequestSent => span_event::REQUEST_SENT,
    }
}

/// A request span's link to its connection's `tcp.session` root: a span of this
/// process, in a trace it sampled.
fn write_connection_link(out: &mut Vec<u8>, (trace_id, span_id): ([u8; 16], [u8; 8])) {
    key(out, field::LINKS, WireType::LengthDelimited);
    len_varint(out, (len_field(16) + len_field(8) + 5) as u64);
    bytes(out, field::LINK_TRACE_ID, &trace_id);
    bytes(out, field::LINK_SPAN_ID, &span_id);
    key(out, field::LINK_FLAGS, WireType::ThirtyTwoBit);
    out.extend_from_slice(&CONNECTION_LINK_FLAGS.to_le_bytes());
}

/// Whole microseconds of `ns`, as an attribute's integer.
fn micros(ns: u64) -> i64 {
    i64::try_from(ns / 1000).unwrap_or(i64::MAX)
}

/// A root's `links` and `dropped_links_count`.
fn write_links(out: &mut Vec<u8>, links: &Links) {
    for link in &links.kept {
        let direction = link.direction.as_str().as_bytes();
        let method = link.method().as_bytes();
        let len = len_field(16)
            + len_field(8)
            + kv_len(attr::LINK_DIRECTION, direction)
            + kv_len(attr::HTTP_REQUEST_METHOD, method)
            + 5;
        key(out, field::LINKS, WireType::LengthDelimited);
        len_varint(out, len as u64);
        bytes(out, field::LINK_TRACE_ID, &link.trace_id);
        bytes(out, field::LINK_SPAN_ID, &link.span_id);
        str_kv(out, field::LINK_ATTRIBUTES, attr::LINK_DIRECTION, direction);
        str_kv(
            out,
            field::LINK_ATTRIBUTES,
            attr::HTTP_REQUEST_METHOD,
            method,
        );
        key(out, field::LINK_FLAGS, WireType::ThirtyTwoBit);
        let flags = u32::from(link.trace_flags) | LINK_REMOTE_FLAGS;
        out.extend_from_slice(&flags.to_le_bytes());
    }
    if links.dropped > 0 {
        varint(out, field::DROPPED_LINKS_COUNT, links.dropped.into());
    }
}

/// `n` in decimal.
fn decimal(n: u8) -> &'static [u8] {
    static DIGITS: [[u8; 3]; 256] = {
        let mut table = [[0u8; 3]; 256];
        let mut n = 0;
        while n < 256 {
            table[n] = [
                b'0' + (n / 100) as u8,
                b'0' + (n / 10 % 10) as u8,
                b'0' + (n % 10) as u8,
            ];
            n += 1;
        }
        table
    };
    let digits = &DIGITS[n as usize];
    let skip = if n >= 100 {
        0
    } else if n >= 10 {
        1
    } else {
        2
    };
    &digits[skip..]
}

/// The resource of the spans under `key`: the base with `service.name` replaced
/// and `container.id` added, as the key says.
pub fn resource(base: &BaseResource, key: ResourceKey) -> Resource {
    let string = |text: String| {
        Some(AnyValue {
            value: Some(any_value::Value::StringValue(text)),
        })
    };
    let mut attributes = base.clone();
    if let Some(service) = key.service {
        match attributes.iter_mut().find(|kv| kv.key == "service.name") {
            Some(kv) => kv.value = string(service.to_string()),
            None => attributes.push(KeyValue {
                key: "service.name".into(),
                value: string(service.to_string()),
                ..Default::default()
            }),
        }
    }
    if let Some(container) = key.container {
        attributes.push(KeyValue {
            key: attr::CONTAINER_ID.into(),
            value: string(container.to_string()),
            ..Default::default()
        });
    }
    Resource {
        attributes,
        ..Default::default()
    }
}

/// Bytes a length-delimited field with a one-byte key and `len` bytes of content takes.
fn len_field(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// The key of a field numbered below 16: one byte.
#[inline(always)]
fn key(out: &mut Vec<u8>, tag: u32, wire_type: WireType) {
    debug_assert!(tag < 16);
    out.push((tag << 3) as u8 | wire_type as u8);
}

/// prost's varint, with the one-byte case (most lengths here) inline.
#[inline(always)]
fn len_varint(out: &mut Vec<u8>, value: u64) {
    if value < 0x80 {
        out.push(value as u8);
    } else {
        encode_varint(value, out);
    }
}

#[inline(always)]
fn bytes(out: &mut Vec<u8>, tag: u32, value: &[u8]) {
    key(out, tag, WireType::LengthDelimited);
    len_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

#[inline(always)]
fn varint(out: &mut Vec<u8>, tag: u32, value: u64) {
    key(out, tag, WireType::Varint);
    len_varint(out, value);
}

/// Zero is proto3's default, left out as prost leaves it out.
#[inline(always)]
fn fixed64(out: &mut Vec<u8>, tag: u32, value: u64) {
    if value == 0 {
        return;
    }
    key(out, tag, WireType::SixtyFourBit);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A `KeyValue` in the span's attributes; `value` is the `AnyValue`'s one field,
/// `value_len` its encoded length.
#[inline(always)]
fn attr_header(out: &mut Vec<u8>, name: &str, value_len: usize) {
    kv_header(out, field::ATTRIBUTES, name, value_len);
}

/// A `KeyValue` as field `tag` of the message being written.
#[inline(always)]
fn kv_header(out: &mut Vec<u8>, tag: u32, name: &str, value_len: usize) {
    let len = len_field(name.len()) + len_field(value_len);
    key(out, tag, WireType::LengthDelimited);
    len_varint(out, len as u64);
    bytes(out, field::KV_KEY, name.as_bytes());
    key(out, field::KV_VALUE, WireType::LengthDelimited);
    len_varint(out, value_len as u64);
}

#[inline(always)]
fn str_attr(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    str_kv(out, field::ATTRIBUTES, key, value);
}

#[inline(always)]
fn str_kv(out: &mut Vec<u8>, tag: u32, key: &str, value: &[u8]) {
    kv_header(out, tag, key, len_field(value.len()));
    bytes(out, field::ANY_STRING, value);
}

/// Bytes [`str_kv`] writes.
fn kv_len(key: &str, value: &[u8]) -> usize {
    len_field(len_field(key.len()) + len_field(len_field(value.len())))
}

#[inline(always)]
fn int_attr(out: &mut Vec<u8>, key: &str, value: i64) {
    int_kv(out, field::ATTRIBUTES, key, value);
}

#[inline(always)]
fn int_kv(out: &mut Vec<u8>, tag: u32, key: &str, value: i64) {
    // int64 is a varint of the two's complement.
    let value = value as u64;
    kv_header(out, tag, key, 1 + encoded_len_varint(value));
    varint(out, field::ANY_INT, value);
}

#[inline(always)]
fn bool_attr(out: &mut Vec<u8>, key: &str, value: bool) {
    attr_header(out, key, 2);
    varint(out, field::ANY_BOOL, u64::from(value));
}

/// `value` in lowercase hex without leading zeros, as `{:x}` prints it.
fn hex_u64(value: u64, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut at = buf.len();
    let mut rest = value;
    loop {
        at -= 1;
        buf[at] = DIGITS[(rest & 0xf) as usize];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    &buf[at..]
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, Ipv6Addr},
        num::NonZeroUsize,
    };

    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        trace::v1::{ResourceSpans, ScopeSpans, Span, Status, span},
    };
    use proptest::prelude::*;

    use super::*;
    use crate::{
        kernel::clock::WallClock,
        kernel::event::{TcpFacts, TcpState},
        kernel::traceparent::{Direction, Link},
        otlp::spans::{EventRecord, Kind, MapperOptions, SpanMapper},
        sampling::{decision::Verdict, rules::KeptBy},
        sessions::container::ContainerId,
        sessions::incidents::{IncidentCounts, RetransmitKind},
        sessions::links::MAX_LINKS,
        sessions::outcome::ErrorType,
        sessions::table::{
            EndReason, Role, SessionTable, Update,
            tests::{SK, client_events, ev},
        },
    };

    fn base() -> BaseResource {
        vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue("otel-tcpstates".into())),
            }),
            ..Default::default()
        }]
    }

    fn encode(records: &[SpanRecord]) -> Vec<u8> {
        let mut encoder = Encoder::new(base());
        for record in records {
            encoder.add(record);
        }
        assert_eq!(encoder.len(), records.len());
        let mut out = Vec::new();
        encoder.finish(&mut out);
        assert!(encoder.is_empty());
        out
    }

    fn decode(bytes: &[u8]) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest::decode(bytes).expect("our bytes decode as OTLP")
    }

    /// The spans of a request with their resources' `service.name` / `container.id`.
    fn spans(request: &ExportTraceServiceRequest) -> Vec<(&Resource, &Span)> {
        request
            .resource_spans
            .iter()
            .flat_map(|rs| {
                let resource = rs.resource.as_ref().unwrap();
                rs.scope_spans
                    .iter()
                    .flat_map(move |ss| ss.spans.iter().map(move |s| (resource, s)))
            })
            .collect()
    }

    fn get<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    fn text(value: &str) -> Option<any_value::Value> {
        Some(any_value::Value::StringValue(value.into()))
    }

    fn records(
        events: &[crate::kernel::event::TcpEvent],
        options: MapperOptions,
    ) -> Vec<SpanRecord> {
        let mapper = SpanMapper::new(WallClock::measure(), options);
        let mut table = SessionTable::new(NonZeroUsize::new(16).unwrap());
        let mut out = Vec::new();
        for event in events {
            table.apply_settled(event, &mut |update| {
                out.push(match update {
                    Update::StateEnded(s, e) => mapper.state_span(s, e, Verdict::default()),
                    Update::RequestEnded(s, e) => mapper.request_span(s, e),
                    Update::SessionEnded(s, end, r) => {
                        mapper.root_span(s, end, r, Verdict::default())
                    }
                })
            });
        }
        out
    }

    #[test]
    fn one_trace_per_socket_with_a_child_per_state() {
        let bytes = encode(&records(
            &client_events(SK, 1_000_000),
            MapperOptions::default(),
        ));
        let request = decode(&bytes);
        let spans = spans(&request);
        let (&(resource, root), children) = spans.split_last().unwrap();
        assert_eq!(
            get(&resource.attributes, "service.name"),
            text("otel-tcpstates").as_ref()
        );
        assert_eq!(
            request.resource_spans[0].scope_spans[0]
                .scope
                .as_ref()
                .unwrap()
                .name,
            "otel-tcpstates"
        );
        assert_eq!(root.name, spans::ROOT_NAME);
        assert_eq!(root.kind, Kind::Client as i32);
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.trace_id.len(), 16);
        assert_eq!(root.span_id.len(), 8);
        assert_eq!(root.flags, SPAN_FLAGS);
        assert_eq!(
            children
                .iter()
                .map(|(_, c)| c.name.as_str())
                .collect::<Vec<_>>(),
            ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
        );
        for (_, child) in children {
            assert_eq!(child.trace_id, root.trace_id);
            assert_eq!(child.parent_span_id, root.span_id);
            assert_eq!(child.kind, Kind::Internal as i32);
            assert_ne!(child.span_id, root.span_id);
        }
        // Durations are the kernel's, to the nanosecond; the root covers them all.
        let durations: Vec<u64> = children
            .iter()
            .map(|(_, c)| c.end_time_unix_nano - c.start_time_unix_nano)
            .collect();
        assert_eq!(durations, [50, 1000, 10, 5]);
        assert_eq!(
            root.start_time_unix_nano,
            children[0].1.start_time_unix_nano
        );
        assert_eq!(root.end_time_unix_nano, children[3].1.end_time_unix_nano);

        let int = |v: i64| Some(any_value::Value::IntValue(v));
        let attrs = &root.attributes;
        assert_eq!(get(attrs, attr::CLIENT_PORT), int(40000).as_ref());
        assert_eq!(get(attrs, attr::SERVER_PORT), int(8080).as_ref());
        assert_eq!(get(attrs, attr::PEER_ADDRESS), text("127.0.0.2").as_ref());
        assert_eq!(get(attrs, attr::NETWORK_TYPE), text("ipv4").as_ref());
        assert_eq!(get(attrs, attr::PROCESS_PID), int(4242).as_ref());
        assert_eq!(
            get(attrs, attr::PROCESS_EXECUTABLE_NAME),
            text("test").as_ref()
        );
        assert_eq!(get(attrs, attr::END_REASON), text("closed").as_ref());
        assert_eq!(get(attrs, attr::SKADDR), text(&format!("{SK:x}")).as_ref());
        assert_eq!(
            get(attrs, attr::BEGIN_SEEN),
            Some(&any_value::Value::BoolValue(true))
        );
        assert_eq!(root.status, None);
        let established = &children[1].1.attributes;
        assert_eq!(get(established, attr::STATE), text("ESTABLISHED").as_ref());
        assert_eq!(
            get(established, attr::NEXT_STATE),
            text("FIN_WAIT1").as_ref()
        );
    }

    #[test]
    fn failures_are_errors_and_reuse_is_a_new_trace() {
        use otel_tcpstates_common::tcp_state::*;
        let refused = |sk, ts| {
            let mut close = ev(sk, ts, 1, SYN_SENT, CLOSE, 1);
            close.facts.sk_err = nix::errno::Errno::ECONNREFUSED as u32;
            close
        };
        let bytes = encode(&records(
            &[
                ev(SK, 10, 0, CLOSE, SYN_SENT, 0),
                refused(SK, 11),
                ev(SK, 20, 0, CLOSE, SYN_SENT, 0),
                refused(SK, 21),
            ],
            MapperOptions::default(),
        ));
        let request = decode(&bytes);
        let spans = spans(&request);
        assert_eq!(spans.len(), 4);
        for (_, span) in &spans {
            let status = span.status.as_ref().unwrap();
            assert_eq!(status.code, 2);
            assert!(status.message.contains("refused"), "{status:?}");
        }
        assert_ne!(spans[1].1.trace_id, spans[3].1.trace_id);
    }

    #[test]
    fn the_owners_process_and_container_make_the_resource() {
        let records = records(
            &client_events(SK, 1_000_000),
            MapperOptions {
                service_per_process: true,
                facts: false,
                incidents: false,
            },
        );
        let container = ContainerId::parse(&"ab".repeat(32)).unwrap();
        let mut with_container = records.clone();
        for record in &mut with_container {
            record.resource.container = Some(container);
        }
        let request = decode(&encode(&[records, with_container].concat()));
        assert_eq!(
            request.resource_spans.len(),
            2,
            "one per (service, container)"
        );
        let first = request.resource_spans[0].resource.as_ref().unwrap();
        let second = request.resource_spans[1].resource.as_ref().unwrap();
        assert_eq!(
            get(&first.attributes, "service.name"),
            text("test").as_ref()
        );
        assert_eq!(get(&first.attributes, attr::CONTAINER_ID), None);
        assert_eq!(
            get(&second.attributes, attr::CONTAINER_ID),
            text(&"ab".repeat(32)).as_ref()
        );
        assert!(
            request
                .resource_spans
                .iter()
                .all(|rs| rs.scope_spans[0].spans.len() == 5)
        );
    }

    fn comm() -> impl Strategy<Value = Comm> {
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(|bytes| {
            let mut raw = [0u8; 16];
            raw[..bytes.len()].copy_from_slice(&bytes);
            Comm::from(raw)
        })
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
            any::<u128>().prop_map(|a| IpAddr::V6(Ipv6Addr::from(a))),
        ]
    }

    fn reason() -> impl Strategy<Value = EndReason> {
        prop_oneof![
            Just(EndReason::Closed),
            Just(EndReason::Evicted),
            Just(EndReason::Shutdown),
            Just(EndReason::Replaced),
        ]
    }

    fn state() -> impl Strategy<Value = TcpState> {
        (1u8..=14).prop_map(TcpState)
    }

    fn error() -> impl Strategy<Value = Option<ErrorType>> {
        prop_oneof![
            Just(None),
            Just(Some(ErrorType::ConnectionRefused)),
            Just(Some(ErrorType::TimedOut)),
            Just(Some(ErrorType::ResetByPeer)),
            Just(Some(ErrorType::ResetSent)),
            Just(Some(ErrorType::HandshakeFailed)),
            Just(Some(ErrorType::ConnectAborted)),
            (-5i32..200).prop_map(|n| Some(ErrorType::Errno(n))),
        ]
    }

    fn what() -> impl Strategy<Value = What> {
        let kind = proptest::sample::select(vec![
            RetransmitKind::Syn,
            RetransmitKind::SynAck,
            RetransmitKind::Timeout,
            RetransmitKind::Fast,
            RetransmitKind::LossProbe,
            RetransmitKind::Unknown,
        ]);
        prop_oneof![
            (kind, -120i32..=0).prop_map(|(kind, err)| What::Retransmit { kind, err }),
            (0u32..30).prop_map(|reason| What::ResetSent { reason }),
            Just(What::ResetReceived),
            (0i32..140).prop_map(|errno| What::Error { errno }),
            (0u8..6).prop_map(|state| What::Congestion { state }),
        ]
    }

    fn events() -> impl Strategy<Value = Option<Box<EventRecords>>> {
        let event =
            (any::<u64>(), what()).prop_map(|(unix_ns, what)| EventRecord { unix_ns, what });
        proptest::option::of(
            (proptest::collection::vec(event, 0..=8), 0u32..3)
                .prop_map(|(kept, dropped)| Box::new(EventRecords { kept, dropped })),
        )
    }

    fn counts() -> impl Strategy<Value = Option<IncidentCounts>> {
        proptest::option::of((any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
            |(retransmits, resets_sent, resets_received)| IncidentCounts {
                retransmits,
                resets_sent,
                resets_received,
            },
        ))
    }

    fn role() -> impl Strategy<Value = Role> {
        prop_oneof![
            Just(Role::Client),
            Just(Role::Server),
            Just(Role::Listener),
            Just(Role::Unknown),
        ]
    }

    fn facts() -> impl Strategy<Value = Option<TcpFacts>> {
        proptest::option::of(
            (
                any::<u64>(),
                any::<u64>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
                any::<u32>(),
            )
                .prop_map(|(a, r, srtt, retrans, i, o)| TcpFacts {
                    bytes_acked: a,
                    bytes_received: r,
                    srtt_us_x8: srtt,
                    total_retrans: retrans,
                    segs_in: i,
                    segs_out: o,
                    sk_err: 0,
                    _pad: 0,
                }),
        )
    }

    fn links() -> impl Strategy<Value = Option<Box<Links>>> {
        let link = (
            any::<[u8; 16]>(),
            any::<[u8; 8]>(),
            any::<u8>(),
            any::<bool>(),
            0u8..=10,
        )
            .prop_map(|(trace_id, span_id, trace_flags, sent, method)| Link {
                trace_id,
                span_id,
                trace_flags,
                direction: if sent {
                    Direction::Sent
                } else {
                    Direction::Received
                },
                method,
            });
        proptest::option::of(
            (proptest::collection::vec(link, 0..=MAX_LINKS), 0u32..3)
                .prop_map(|(kept, dropped)| Box::new(Links { kept, dropped })),
        )
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            (
                state(),
                proptest::option::of((state(), any::<u32>(), comm())),
                proptest::option::of(reason()),
                events(),
            )
                .prop_map(|(state, next, cut_short, events)| Body::State {
                    state,
                    next,
                    cut_short,
                    events,
                }),
            (
                role(),
                proptest::option::of((any::<u32>(), comm())),
                facts(),
                any::<u64>(),
                any::<bool>(),
                reason(),
                links(),
                kept_by(),
                counts(),
            )
                .prop_map(
                    |(
                        role,
                        owner,
                        facts,
                        skaddr,
                        begin_seen,
                        end_reason,
                        links,
                        kept_by,
                        counts,
                    )| {
                        Body::Root {
                            role,
                            owner,
                            facts,
                            skaddr,
                            begin_seen,
                            end_reason,
                            links,
                            kept_by,
                            counts,
                        }
                    }
                ),
            (
                (
                    proptest::sample::select(vec![Role::Client, Role::Server]),
                    proptest::option::of((any::<u32>(), comm())),
                    any::<bool>(),
                    any::<u8>(),
                    0u8..12,
                ),
                (
                    proptest::option::of((state(), proptest::option::of(any::<u64>()))),
                    proptest::option::of(any::<u64>()),
                    state(),
                    (any::<[u8; 16]>(), any::<[u8; 8]>()),
                    events(),
                ),
            )
                .prop_map(
                    |(
                        (role, owner, sent, trace_flags, method),
                        (handshake, answer_ns, state, connection, events),
                    )| Body::Request {
                        role,
                        owner,
                        direction: if sent {
                            Direction::Sent
                        } else {
                            Direction::Received
                        },
                        trace_flags,
                        method,
                        handshake,
                        answer_ns,
                        state,
                        connection,
                        events,
                    }
                ),
        ]
    }

    fn record() -> impl Strategy<Value = SpanRecord> {
        (
            (
                any::<[u8; 16]>(),
                any::<[u8; 8]>(),
                proptest::option::of(any::<[u8; 8]>()),
            ),
            (any::<u64>(), any::<u64>()),
            (
                proptest::option::of(comm()),
                proptest::option::of(any::<[u8; 2]>()),
            ),
            ((ip(), any::<u16>()), (ip(), any::<u16>())),
            error(),
            proptest::option::of(0.0..=1.0f64),
            body(),
        )
            .prop_map(
                |(
                    (trace_id, span_id, parent),
                    (start, end),
                    (service, container),
                    (local, peer),
                    error,
                    probability,
                    body,
                )| {
                    SpanRecord {
                        trace_id,
                        span_id,
                        parent_span_id: parent,
                        start_unix_ns: start,
                        end_unix_ns: end,
                        // A few distinct containers, so groups recur.
                        resource: ResourceKey {
                            service,
                            container: container.map(|c| {
                                ContainerId::parse(&format!("{:02x}", c[0] % 3).repeat(32)).unwrap()
                            }),
                        },
                        local,
                        peer: if local.0.is_ipv4() == peer.0.is_ipv4() {
                            peer
                        } else {
                            local
                        },
                        error,
                        // Never the threshold that keeps nothing: no span has it.
                        threshold: probability
                            .map(|p| Threshold::from_probability(p.max(f64::EPSILON))),
                        body,
                    }
                },
            )
    }

    fn kept_by() -> impl Strategy<Value = KeptBy> {
        let rules = [
            KeptBy::ERROR,
            KeptBy::RETRANSMIT,
            KeptBy::SLOW_HANDSHAKE,
            KeptBy::LONG_LIVED,
            KeptBy::SAMPLED_REQUEST,
        ];
        proptest::collection::vec(proptest::sample::select(rules.to_vec()), 0..3)
            .prop_map(|picked| picked.into_iter().fold(KeptBy::default(), |a, b| a | b))
    }

    /// A span's events as opentelemetry-proto's types, and its dropped count.
    fn expected_events(events: &EventRecords) -> (Vec<span::Event>, u32) {
        let kv = |key: &str, value: any_value::Value| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        };
        let s = |key: &str, value: String| kv(key, any_value::Value::StringValue(value));
        let i = |key: &str, value: i64| kv(key, any_value::Value::IntValue(value));
        let kept = events
            .kept
            .iter()
            .map(|e| {
                let (name, attributes) = match e.what {
                    What::Retransmit { kind, err } => {
                        let mut a = vec![s(attr::RETRANSMIT_KIND, kind.as_str().into())];
                        if err != 0 {
                            a.push(s(attr::RETRANSMIT_ERROR, errno_name(-err).into_owned()));
                        }
                        ("tcp.retransmit", a)
                    }
                    What::ResetSent { reason } => (
                        "tcp.reset.sent",
                        vec![s(
                            attr::RESET_REASON,
                            reset_reason_name(reason).into_owned(),
                        )],
                    ),
                    What::ResetReceived => ("tcp.reset.received", vec![]),
                    What::Established => ("tcp.established", vec![]),
                    What::RequestSent => ("tcp.request.sent", vec![]),
                    What::Error { errno } => (
                        "tcp.error",
                        vec![
                            i(attr::ERRNO, errno.into()),
                            s(attr::ERRNO_NAME, errno_name(errno).into_owned()),
                        ],
                    ),
                    What::Congestion { state } => (
                        "tcp.congestion",
                        vec![s(
                            attr::CONGESTION_STATE,
                            congestion_name(state).into_owned(),
                        )],
                    ),
                };
                span::Event {
                    time_unix_nano: e.unix_ns,
                    name: name.into(),
                    attributes,
                    ..Default::default()
                }
            })
            .collect();
        (kept, events.dropped)
    }

    /// The mapping, written independently with opentelemetry-proto's types.
    fn expected(r: &SpanRecord) -> Span {
        let kv = |key: &str, value: any_value::Value| KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(value) }),
            ..Default::default()
        };
        let s = |key: &str, value: String| kv(key, any_value::Value::StringValue(value));
        let i = |key: &str, value: i64| kv(key, any_value::Value::IntValue(value));
        let mut attributes = vec![
            s(attr::NETWORK_TRANSPORT, "tcp".into()),
            s(
                attr::NETWORK_TYPE,
                if r.local.0.is_ipv4() { "ipv4" } else { "ipv6" }.into(),
            ),
            s(attr::LOCAL_ADDRESS, r.local.0.to_string()),
            i(attr::LOCAL_PORT, r.local.1.into()),
            s(attr::PEER_ADDRESS, r.peer.0.to_string()),
            i(attr::PEER_PORT, r.peer.1.into()),
        ];
        let mut span_links = Vec::new();
        let mut dropped_links_count = 0;
        let mut span_events = Vec::new();
        let mut dropped_events_count = 0;
        let (name, kind) = match r.body {
            Body::State {
                state,
                next,
                cut_short,
                ref events,
            } => {
                attributes.push(s(attr::STATE, state.to_string()));
                if let Some((next, pid, comm)) = next {
                    attributes.push(s(attr::NEXT_STATE, next.to_string()));
                    attributes.push(i(attr::TRANSITION_PID, pid.into()));
                    attributes.push(s(attr::TRANSITION_COMM, comm.to_string()));
                }
                if let Some(reason) = cut_short {
                    attributes.push(s(attr::END_REASON, reason.as_str().into()));
                }
                if let Some(events) = events {
                    (span_events, dropped_events_count) = expected_events(events);
                }
                (state.to_string(), 1)
            }
            Body::Request {
                role,
                owner,
                direction,
                trace_flags: _,
                method,
                handshake,
                answer_ns,
                state,
                connection,
                ref events,
            } => {
                let (local, peer) = (r.local, r.peer);
                let (client, server) = match role {
                    Role::Client => (local, peer),
                    _ => (peer, local),
                };
                attributes.extend([
                    s(attr::CLIENT_ADDRESS, client.0.to_string()),
                    i(attr::CLIENT_PORT, client.1.into()),
                    s(attr::SERVER_ADDRESS, server.0.to_string()),
                    i(attr::SERVER_PORT, server.1.into()),
                ]);
                if let Some((pid, comm)) = owner {
                    attributes.push(i(attr::PROCESS_PID, pid.into()));
                    attributes.push(s(attr::PROCESS_EXECUTABLE_NAME, comm.to_string()));
                }
                let b = |key: &str, value: bool| kv(key, any_value::Value::BoolValue(value));
                attributes.extend([
                    s(
                        attr::HTTP_REQUEST_METHOD,
                        traceparent::method_name(method).into(),
                    ),
                    s(attr::LINK_DIRECTION, direction.as_str().into()),
                    s(attr::ROLE, role.as_str().into()),
                    s(attr::STATE, state.to_string()),
                    b(attr::CONNECTION_NEW, handshake.is_some()),
                ]);
                if let Some((state, ns)) = handshake {
                    attributes.push(s(attr::HANDSHAKE_STATE, state.to_string()));
                    if let Some(ns) = ns {
                        attributes.push(i(attr::HANDSHAKE_US, micros(ns)));
                    }
                }
                attributes.push(b(attr::REQUEST_ANSWERED, answer_ns.is_some()));
                if let Some(ns) = answer_ns {
                    attributes.push(i(attr::REQUEST_ANSWER_US, micros(ns)));
                }
                if let Some(events) = events {
                    (span_events, dropped_events_count) = expected_events(events);
                }
                span_links = vec![span::Link {
                    trace_id: connection.0.to_vec(),
                    span_id: connection.1.to_vec(),
                    flags: 0x101,
                    ..Default::default()
                }];
                (spans::REQUEST_NAME.into(), 1)
            }
            Body::Root {
                role,
                owner,
                facts,
                skaddr,
                begin_seen,
                end_reason,
                ref links,
                kept_by,
                counts,
            } => {
                let (local, peer) = (r.local, r.peer);
                let (client, server) = match role {
                    Role::Client => (Some(local), Some(peer)),
                    Role::Server => (Some(peer), Some(local)),
                    Role::Listener => (None, Some(local)),
                    Role::Unknown => (None, None),
                };
                if let Some((a, p)) = client {
                    attributes.push(s(attr::CLIENT_ADDRESS, a.to_string()));
                    attributes.push(i(attr::CLIENT_PORT, p.into()));
                }
                if let Some((a, p)) = server {
                    attributes.push(s(attr::SERVER_ADDRESS, a.to_string()));
                    attributes.push(i(attr::SERVER_PORT, p.into()));
                }
                if let Some((pid, comm)) = owner {
                    attributes.push(i(attr::PROCESS_PID, pid.into()));
                    attributes.push(s(attr::PROCESS_EXECUTABLE_NAME, comm.to_string()));
                }
                if let Some(f) = facts {
                    let sat = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
                    attributes.extend([
                        i(attr::BYTES_ACKED, sat(f.bytes_acked)),
                        i(attr::BYTES_RECEIVED, sat(f.bytes_received)),
                        i(attr::SRTT_US, (f.srtt_us_x8 >> 3).into()),
                        i(attr::TOTAL_RETRANS, f.total_retrans.into()),
                        i(attr::SEGS_IN, f.segs_in.into()),
                        i(attr::SEGS_OUT, f.segs_out.into()),
                    ]);
                }
                attributes.push(s(attr::SKADDR, format!("{skaddr:x}")));
                attributes.push(s(attr::ROLE, role.as_str().into()));
                attributes.push(kv(
                    attr::BEGIN_SEEN,
                    any_value::Value::BoolValue(begin_seen),
                ));
                attributes.push(s(attr::END_REASON, end_reason.as_str().into()));
                if !kept_by.is_empty() {
                    attributes.push(s(attr::SAMPLING_KEPT_BY, kept_by.names()));
                }
                if let Some(c) = counts {
                    attributes.extend([
                        i(attr::RETRANSMITS, c.retransmits.into()),
                        i(attr::RESETS_SENT, c.resets_sent.into()),
                        i(attr::RESETS_RECEIVED, c.resets_received.into()),
                    ]);
                }
                if let Some(l) = links {
                    span_links = l
                        .kept
                        .iter()
                        .map(|link| span::Link {
                            trace_id: link.trace_id.to_vec(),
                            span_id: link.span_id.to_vec(),
                            attributes: vec![
                                s(attr::LINK_DIRECTION, link.direction.as_str().into()),
                                s(attr::HTTP_REQUEST_METHOD, link.method().into()),
                            ],
                            flags: u32::from(link.trace_flags) | 0x300,
                            ..Default::default()
                        })
                        .collect();
                    dropped_links_count = l.dropped;
                }
                let kind = match role {
                    Role::Client => 3,
                    Role::Server => 2,
                    _ => 1,
                };
                (spans::ROOT_NAME.into(), kind)
            }
        };
        Span {
            trace_id: r.trace_id.to_vec(),
            span_id: r.span_id.to_vec(),
            parent_span_id: r.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            trace_state: r.threshold.map(Threshold::trace_state).unwrap_or_default(),
            flags: match r.body {
                Body::Request { trace_flags, .. } => u32::from(trace_flags) | 0x300,
                _ => SPAN_FLAGS,
            },
            name,
            kind,
            start_time_unix_nano: r.start_unix_ns,
            end_time_unix_nano: r.end_unix_ns,
            attributes: {
                if let Some(e) = r.error {
                    attributes.push(s(attr::ERROR_TYPE, e.as_str().into_owned()));
                }
                attributes
            },
            links: span_links,
            dropped_links_count,
            events: span_events,
            dropped_events_count,
            status: r.error.map(|e| Status {
                message: e.message().into_owned(),
                code: 2,
            }),
            ..Default::default()
        }
    }

    proptest! {
        /// Any records, encoded and decoded with opentelemetry-proto's types, are
        /// exactly the spans the mapping defines, each under its own resource; and
        /// the bytes are the ones prost itself writes for that request.
        #[test]
        fn encoded_requests_decode_to_the_mapped_spans(
            records in proptest::collection::vec(record(), 0..40),
        ) {
            let bytes = encode(&records);
            let request = decode(&bytes);
            // One group per resource key, in order of first appearance.
            let mut keys: Vec<ResourceKey> = Vec::new();
            let mut want: Vec<ResourceSpans> = Vec::new();
            for r in &records {
                let at = match keys.iter().position(|k| *k == r.resource) {
                    Some(at) => at,
                    None => {
                        keys.push(r.resource);
                        let resource = resource(&base(), r.resource);
                        want.push(ResourceSpans {
                            resource: Some(resource),
                            scope_spans: vec![ScopeSpans {
                                scope: Some(InstrumentationScope {
                                    name: env!("CARGO_PKG_NAME").into(),
                                    version: env!("CARGO_PKG_VERSION").into(),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }],
                            ..Default::default()
                        });
                        want.len() - 1
                    }
                };
                want[at].scope_spans[0].spans.push(expected(r));
            }
            let want = ExportTraceServiceRequest { resource_spans: want };
            prop_assert_eq!(&request, &want);
            prop_assert_eq!(bytes, want.encode_to_vec());
        }
    }
}
