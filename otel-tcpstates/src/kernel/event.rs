//! Decoding the kernel's ring-buffer records into [`TcpEvent`]s.
use std::{
    fmt,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use otel_tcpstates_common::TcpFacts;
use otel_tcpstates_common::{
    AF_INET, AF_INET6, AnswerEvent, Event, H2_CHUNK, H2_SMALL, H2Event, H2Small, IncidentEvent,
    LinkEvent, TASK_COMM_LEN, incident, tcp_state,
};

use crate::kernel::traceparent::{self, Link};

/// A TCP state number from include/net/tcp_states.h.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpState(pub u8);

impl fmt::Display for TcpState {
    /// The name tcpstates prints, e.g. `SYN_SENT`; unknown numbers print as digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match tcp_state::name(self.0) {
            Some(name) => f.pad(name),
            None => f.pad(&self.0.to_string()),
        }
    }
}

/// A task's `comm`: up to 15 bytes, not necessarily UTF-8.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Comm([u8; TASK_COMM_LEN]);

impl Comm {
    pub fn as_bytes(&self) -> &[u8] {
        let len = self.0.iter().position(|&b| b == 0).unwrap_or(TASK_COMM_LEN);
        &self.0[..len]
    }
}

impl From<[u8; TASK_COMM_LEN]> for Comm {
    fn from(raw: [u8; TASK_COMM_LEN]) -> Self {
        Self(raw)
    }
}

impl fmt::Display for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&String::from_utf8_lossy(self.as_bytes()))
    }
}

impl fmt::Debug for Comm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(self.as_bytes()))
    }
}

/// A socket's address family, as the kernel names it: bcc's IP column.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The IP version tcpstates prints.
    pub fn version(self) -> u8 {
        match self {
            Self::V4 => 4,
            Self::V6 => 6,
        }
    }

    /// `addr` (as [`TcpEvent`] holds it) as the kernel gave it for a socket of
    /// this family: on an IPv6 socket, an IPv4 address is IPv4-mapped (and an
    /// unspecified one was `::`).
    pub fn as_kernel_gave(self, addr: IpAddr) -> IpAddr {
        match (self, addr) {
            (Self::V6, IpAddr::V4(v4)) if v4.is_unspecified() => Ipv6Addr::UNSPECIFIED.into(),
            (Self::V6, IpAddr::V4(v4)) => v4.to_ipv6_mapped().into(),
            _ => addr,
        }
    }
}

/// A connection's two addresses as the kernel gives them for a socket of
/// `family`, turned into the addresses the connection uses: an IPv6 socket whose
/// addresses are IPv4-mapped (`::ffff:a.b.c.d`: a dual-stack server's IPv4
/// client) speaks IPv4, so both are IPv4 (`::`, not yet known, `0.0.0.0`). The
/// one place this is decided: spans, metrics and links see what it returns.
fn addresses(
    family: u16,
    saddr: &[u8; 16],
    daddr: &[u8; 16],
) -> Result<(IpAddr, IpAddr), DecodeError> {
    match family {
        AF_INET => Ok((ipv4(saddr), ipv4(daddr))),
        AF_INET6 => {
            let (s, d) = (Ipv6Addr::from(*saddr), Ipv6Addr::from(*daddr));
            let v4 = |a: Ipv6Addr| match a.is_unspecified() {
                true => Some(Ipv4Addr::UNSPECIFIED),
                false => a.to_ipv4_mapped(),
            };
            Ok(match (v4(s), v4(d)) {
                (Some(ls), Some(ld)) if !(s.is_unspecified() && d.is_unspecified()) => {
                    (ls.into(), ld.into())
                }
                _ => (s.into(), d.into()),
            })
        }
        other => Err(DecodeError::Family(other)),
    }
}

/// One TCP state change of one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpEvent {
    /// Kernel address of the socket: unique among live sockets, reused after close.
    pub skaddr: u64,
    /// Kernel CLOCK_MONOTONIC nanoseconds at the transition.
    pub ts_ns: u64,
    /// Nanoseconds spent in `oldstate`, measured in the kernel (0 if unknown).
    pub delta_ns: u64,
    /// cgroup v2 id of the task, on transitions made by the socket's owner (else 0).
    pub cgroup_id: u64,
    /// On CLOSE: bytes, RTT, retransmits, segments (zero without BTF).
    pub facts: TcpFacts,
    /// The socket's family (an IPv6 socket may carry an IPv4 connection).
    pub family: Family,
    /// The connection's addresses: IPv4 for an IPv6 socket's IPv4-mapped ones.
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    /// Inode number of the socket's network namespace, on transitions to and
    /// from LISTEN (0 otherwise, or without BTF).
    pub netns: u32,
    /// Process on the CPU at the transition (bcc's C-PID).
    pub pid: u32,
    /// Owner of the socket as far as the kernel has seen (0: not yet known).
    pub owner_pid: u32,
    /// Command of the task on the CPU (bcc's C-COMM).
    pub comm: Comm,
    pub oldstate: TcpState,
    pub newstate: TcpState,
}

impl TcpEvent {
    /// Whether the connection is IPv4 (whatever the socket's family).
    pub fn is_ipv4(&self) -> bool {
        self.local_addr.is_ipv4()
    }

    /// The local and remote addresses as the kernel gave them (bcc's columns).
    pub fn kernel_addrs(&self) -> (IpAddr, IpAddr) {
        (
            self.family.as_kernel_gave(self.local_addr),
            self.family.as_kernel_gave(self.remote_addr),
        )
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event ({1} bytes)")]
    Short(usize, usize),
    #[error("unknown address family {0}")]
    Family(u16),
}

/// Size of the record the kernel program writes.
pub const RECORD_SIZE: usize = size_of::<Event>();
/// Size of the record the packet programs write.
pub const LINK_RECORD_SIZE: usize = size_of::<LinkEvent>();
/// Size of the record the incident programs write.
pub const INCIDENT_RECORD_SIZE: usize = size_of::<IncidentEvent>();
/// Size of the record the packet programs write for a request's answer.
pub const ANSWER_RECORD_SIZE: usize = size_of::<AnswerEvent>();
/// Size of one HTTP/2 record ([`H2Event`]), and of a small one ([`H2Small`]).
pub const H2_RECORD_SIZE: usize = size_of::<H2Event>();
pub const H2_SMALL_RECORD_SIZE: usize = size_of::<H2Small>();

/// A connection's ends, as its socket names them: (local address, port, remote
/// address, port).
pub type Ends = (IpAddr, u16, IpAddr, u16);

/// What the kernel did to a socket besides changing its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Happened {
    /// A SYN or data segment sent again, in `state`; `err` non-zero when the
    /// retransmission failed (it was not sent). `segs`: the segments it carried
    /// (0: unknown).
    Retransmit {
        state: TcpState,
        err: i32,
        segs: u32,
    },
    /// A listener sent the SYN-ACK of the connection between `local` and `remote`
    /// again: that connection's socket does not exist yet.
    SynAckRetransmit {
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
    },
    /// The socket sent an RST, in `state`, for the kernel's `sk_rst_reason`.
    /// `ends`: the connection's, when the socket is no longer followed (it sent
    /// the RST after CLOSE, or it is the kernel's time-wait socket).
    ResetSent {
        state: TcpState,
        reason: u32,
        ends: Option<Ends>,
    },
    ResetReceived,
    /// The socket reported error `errno` to its owner.
    Error {
        errno: i32,
    },
    /// The congestion state (`tcp_ca_state`) it entered.
    Congestion {
        state: u8,
    },
}

/// One incident of one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incident {
    /// The socket (for a SYN-ACK, its listener).
    pub skaddr: u64,
    /// Kernel CLOCK_MONOTONIC nanoseconds when it happened.
    pub ts_ns: u64,
    pub happened: Happened,
}

/// What one ring-buffer record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    Transition(TcpEvent),
    /// A request on the socket carried this trace context; its first segment
    /// went through at `ts_ns`.
    Link {
        skaddr: u64,
        ts_ns: u64,
        link: Link,
    },
    /// The first payload segment the other way after a sampled request: its
    /// answer; `sent`: it went out of the socket. `of`: the request's parent
    /// id, when the answer names its request (an HTTP/2 stream's); else it is
    /// the oldest request in flight's.
    Answer {
        skaddr: u64,
        ts_ns: u64,
        sent: bool,
        of: Option<[u8; 8]>,
    },
    /// A request's `traceparent` value was not valid: no link.
    InvalidTraceparent,
    Incident(Incident),
    /// An incident record of a kind this build does not know.
    UnknownIncident,
    /// Bytes of an HTTP/2 connection's header stream, for
    /// [`super::http2::Http2`] to decode into links and answers.
    H2(H2Event),
}

impl Record {
    /// When the kernel queued it, for the records that say.
    pub fn ts_ns(&self) -> Option<u64> {
        match self {
            Self::Transition(event) => Some(event.ts_ns),
            Self::Incident(incident) => Some(incident.ts_ns),
            Self::Link { ts_ns, .. } | Self::Answer { ts_ns, .. } => Some(*ts_ns),
            Self::H2(event) => Some(event.ts_ns),
            Self::InvalidTraceparent | Self::UnknownIncident => None,
        }
    }
}

/// Decodes one ring-buffer record of either program, told apart by size. Never
/// panics, whatever the bytes.
pub fn decode_record(record: &[u8]) -> Result<Record, DecodeError> {
    if record.len() == INCIDENT_RECORD_SIZE {
        return decode_incident(record);
    }
    if record.len() == H2_SMALL_RECORD_SIZE {
        // SAFETY: exactly size_of::<H2Small>() bytes of plain data, valid for
        // any bit pattern; read_unaligned has no alignment needs.
        let small = unsafe { record.as_ptr().cast::<H2Small>().read_unaligned() };
        let mut data = [0; H2_CHUNK];
        data[..H2_SMALL].copy_from_slice(&small.data);
        return Ok(Record::H2(H2Event {
            conn: small.conn,
            ts_ns: small.ts_ns,
            skaddr: small.skaddr,
            pid: small.pid,
            len: small.len.min(H2_SMALL as u16),
            direction: small.direction,
            kind: small.kind,
            flags: small.flags,
            _pad: [0; 7],
            data,
        }));
    }
    if record.len() == H2_RECORD_SIZE {
        // SAFETY: exactly size_of::<H2Event>() bytes of plain data, valid for
        // any bit pattern; read_unaligned has no alignment needs.
        return Ok(Record::H2(unsafe {
            record.as_ptr().cast::<H2Event>().read_unaligned()
        }));
    }
    if record.len() == ANSWER_RECORD_SIZE {
        // SAFETY: exactly size_of::<AnswerEvent>() bytes of plain data, valid
        // for any bit pattern; read_unaligned has no alignment needs.
        let raw: AnswerEvent = unsafe { record.as_ptr().cast::<AnswerEvent>().read_unaligned() };
        return Ok(Record::Answer {
            skaddr: raw.skaddr,
            ts_ns: raw.ts_ns,
            sent: raw.direction == otel_tcpstates_common::direction::SENT,
            of: None,
        });
    }
    if record.len() != LINK_RECORD_SIZE {
        return decode(record).map(Record::Transition);
    }
    // SAFETY: exactly size_of::<LinkEvent>() bytes of plain data, valid for any
    // bit pattern; read_unaligned has no alignment needs.
    let raw: LinkEvent = unsafe { record.as_ptr().cast::<LinkEvent>().read_unaligned() };
    Ok(
        match traceparent::parse(&raw.value, raw.method, raw.direction) {
            Some(link) => Record::Link {
                skaddr: raw.skaddr,
                ts_ns: raw.ts_ns,
                link,
            },
            None => Record::InvalidTraceparent,
        },
    )
}

/// Decodes one ring-buffer record. Never panics, whatever the bytes.
pub fn decode(record: &[u8]) -> Result<TcpEvent, DecodeError> {
    if record.len() < RECORD_SIZE {
        return Err(DecodeError::Short(record.len(), RECORD_SIZE));
    }
    // SAFETY: the slice holds at least size_of::<Event>() bytes, Event is plain
    // data valid for any bit pattern, and read_unaligned has no alignment needs.
    let raw: Event = unsafe { record.as_ptr().cast::<Event>().read_unaligned() };
    let (local_addr, remote_addr) = addresses(raw.family, &raw.saddr, &raw.daddr)?;
    Ok(TcpEvent {
        skaddr: raw.skaddr,
        ts_ns: raw.ts_ns,
        delta_ns: raw.delta_ns,
        cgroup_id: raw.cgroup_id,
        facts: raw.facts,
        family: if raw.family == AF_INET {
            Family::V4
        } else {
            Family::V6
        },
        local_addr,
        local_port: raw.sport,
        remote_addr,
        remote_port: raw.dport,
        netns: raw.netns,
        pid: raw.pid,
        owner_pid: raw.owner_pid,
        comm: Comm(raw.comm),
        oldstate: TcpState(raw.oldstate),
        newstate: TcpState(raw.newstate),
    })
}

fn decode_incident(record: &[u8]) -> Result<Record, DecodeError> {
    // SAFETY: exactly size_of::<IncidentEvent>() bytes of plain data, valid for
    // any bit pattern; read_unaligned has no alignment needs.
    let raw: IncidentEvent = unsafe { record.as_ptr().cast::<IncidentEvent>().read_unaligned() };
    let happened = match raw.kind {
        incident::RETRANSMIT => Happened::Retransmit {
            state: TcpState(raw.state),
            err: raw.value,
            segs: raw.segs,
        },
        incident::RETRANSMIT_SYNACK => {
            // As the connection's own socket will name them.
            let (local, remote) = addresses(raw.family, &raw.saddr, &raw.daddr)?;
            Happened::SynAckRetransmit {
                local: (local, raw.sport),
                remote: (remote, raw.dport),
            }
        }
        incident::RESET_SENT => Happened::ResetSent {
            state: TcpState(raw.state),
            reason: raw.value as u32,
            ends: match raw.family {
                0 => None,
                family => {
                    let (local, remote) = addresses(family, &raw.saddr, &raw.daddr)?;
                    Some((local, raw.sport, remote, raw.dport))
                }
            },
        },
        incident::RESET_RECEIVED => Happened::ResetReceived,
        incident::ERROR => Happened::Error { errno: raw.value },
        incident::CONGESTION => Happened::Congestion {
            state: raw.value as u8,
        },
        _ => return Ok(Record::UnknownIncident),
    };
    Ok(Record::Incident(Incident {
        skaddr: raw.skaddr,
        ts_ns: raw.ts_ns,
        happened,
    }))
}

fn ipv4(bytes: &[u8; 16]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The bytes the kernel would write for `event` (an [`Event`] or a [`LinkEvent`]).
    pub(crate) fn record<T: Copy>(event: &T) -> Vec<u8> {
        // SAFETY: both record types are #[repr(C)] plain data without padding.
        unsafe { std::slice::from_raw_parts((event as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    pub(crate) fn raw_v4() -> Event {
        let mut comm = [0u8; TASK_COMM_LEN];
        comm[..4].copy_from_slice(b"curl");
        let mut saddr = [0u8; 16];
        saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        let mut daddr = [0u8; 16];
        daddr[..4].copy_from_slice(&[93, 184, 216, 34]);
        Event {
            skaddr: 0xffff_9fd7_e819_2000,
            ts_ns: 5_000_000_123,
            delta_ns: 1_234_567,
            cgroup_id: 0,
            facts: TcpFacts::default(),
            saddr,
            daddr,
            pid: 22384,
            owner_pid: 22384,
            comm,
            sport: 52_000,
            dport: 80,
            family: AF_INET,
            oldstate: tcp_state::SYN_SENT,
            newstate: tcp_state::ESTABLISHED,
            netns: 0,
            _pad: 0,
        }
    }

    #[test]
    fn decodes_ipv4() {
        let event = decode(&record(&raw_v4())).unwrap();
        assert_eq!(event.local_addr, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(
            event.remote_addr,
            "93.184.216.34".parse::<IpAddr>().unwrap()
        );
        assert_eq!((event.local_port, event.remote_port), (52_000, 80));
        assert_eq!(event.comm.to_string(), "curl");
        assert_eq!(event.oldstate.to_string(), "SYN_SENT");
        assert_eq!(event.newstate, TcpState(tcp_state::ESTABLISHED));
        assert_eq!(event.delta_ns, 1_234_567);
    }

    #[test]
    fn decodes_ipv6() {
        let mut raw = raw_v4();
        raw.family = AF_INET6;
        raw.saddr = "::1".parse::<Ipv6Addr>().unwrap().octets();
        raw.daddr = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets();
        let event = decode(&record(&raw)).unwrap();
        assert_eq!(event.local_addr.to_string(), "::1");
        assert_eq!(event.remote_addr.to_string(), "2001:db8::7");
        assert!(!event.is_ipv4());
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4_but_print_as_given() {
        let mut raw = raw_v4();
        raw.family = AF_INET6;
        raw.saddr = "::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        raw.daddr = "::ffff:93.184.216.34".parse::<Ipv6Addr>().unwrap().octets();
        raw.netns = 4026531840;
        let event = decode(&record(&raw)).unwrap();
        assert_eq!(event.local_addr.to_string(), "10.0.0.1");
        assert_eq!(event.remote_addr.to_string(), "93.184.216.34");
        assert!(event.is_ipv4());
        assert_eq!((event.family, event.family.version()), (Family::V6, 6));
        assert_eq!(event.netns, 4026531840);
        let (local, remote) = event.kernel_addrs();
        assert_eq!(
            (local.to_string(), remote.to_string()),
            ("::ffff:10.0.0.1".into(), "::ffff:93.184.216.34".into())
        );
        // Before its local address is known, a mapped connect's is `::`: IPv4
        // too, so both ends agree, and printed as given.
        raw.saddr = [0; 16];
        let event = decode(&record(&raw)).unwrap();
        assert_eq!(event.local_addr.to_string(), "0.0.0.0");
        assert_eq!(event.kernel_addrs().0.to_string(), "::");
        // A listener on `::` is IPv6; so are IPv4-compatible addresses.
        raw.daddr = [0; 16];
        let event = decode(&record(&raw)).unwrap();
        assert!(!event.is_ipv4());
        raw.saddr = "::10.0.0.1".parse::<Ipv6Addr>().unwrap().octets();
        assert!(!decode(&record(&raw)).unwrap().is_ipv4());
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        let bytes = record(&raw_v4());
        for len in 0..RECORD_SIZE {
            assert_eq!(
                decode(&bytes[..len]),
                Err(DecodeError::Short(len, RECORD_SIZE))
            );
        }
        let mut raw = raw_v4();
        raw.family = 1;
        assert_eq!(decode(&record(&raw)), Err(DecodeError::Family(1)));
    }

    #[test]
    fn link_records_are_told_from_transitions_by_size() {
        let mut value = [b'\r'; otel_tcpstates_common::TRACEPARENT_COPY];
        value[..55].copy_from_slice(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let mut raw = LinkEvent {
            skaddr: 0xffff_8881_0000_0040,
            ts_ns: 77,
            value,
            method: 3,
            direction: otel_tcpstates_common::direction::RECEIVED,
            _pad: [0; 6],
        };
        let Ok(Record::Link {
            skaddr,
            ts_ns,
            link,
        }) = decode_record(&record(&raw))
        else {
            panic!("not a link");
        };
        assert_eq!((skaddr, ts_ns), (raw.skaddr, 77));
        assert!(otel_tcpstates_common::traceparent_sampled(&raw.value));
        assert_eq!(link.span_id, 0xb7ad_6b71_6920_3331u64.to_be_bytes());
        assert_eq!(
            (link.direction, link.method()),
            (traceparent::Direction::Received, "POST")
        );
        raw.value[0] = b'x';
        assert_eq!(decode_record(&record(&raw)), Ok(Record::InvalidTraceparent));
        assert_eq!(
            decode_record(&record(&raw_v4())),
            Ok(Record::Transition(decode(&record(&raw_v4())).unwrap()))
        );
        let answer = AnswerEvent {
            skaddr: 9,
            ts_ns: 78,
            direction: otel_tcpstates_common::direction::RECEIVED,
            _pad: [0; 7],
        };
        assert_eq!(
            decode_record(&record(&answer)),
            Ok(Record::Answer {
                skaddr: 9,
                ts_ns: 78,
                sent: false,
                of: None,
            })
        );
        // Six sizes, six kinds.
        let sizes = [
            RECORD_SIZE,
            LINK_RECORD_SIZE,
            INCIDENT_RECORD_SIZE,
            ANSWER_RECORD_SIZE,
            H2_RECORD_SIZE,
            H2_SMALL_RECORD_SIZE,
        ];
        assert!((1..sizes.len()).all(|i| !sizes[..i].contains(&sizes[i])));
    }

    #[test]
    fn unknown_states_and_odd_comms_still_print() {
        let mut raw = raw_v4();
        raw.oldstate = 99;
        raw.comm = [0xff; TASK_COMM_LEN];
        let event = decode(&record(&raw)).unwrap();
        assert_eq!(event.oldstate.to_string(), "99");
        assert_eq!(event.comm.as_bytes().len(), TASK_COMM_LEN);
        assert!(event.comm.to_string().contains('\u{fffd}'));
    }

    proptest::proptest! {
        /// Whatever bytes arrive, decoding returns a value or an error.
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = decode(&bytes);
            let _ = decode_record(&bytes);
        }

        /// Any well-formed record decodes to the fields it holds, extra bytes ignored.
        #[test]
        fn records_round_trip(
            skaddr: u64, ts: u64, delta: u64, pid: u32, sport: u16, dport: u16,
            old: u8, new: u8, v6: bool, addr: [u8; 16], extra in 0usize..16,
        ) {
            let mut raw = raw_v4();
            (raw.skaddr, raw.ts_ns, raw.delta_ns, raw.pid) = (skaddr, ts, delta, pid);
            (raw.sport, raw.dport, raw.oldstate, raw.newstate) = (sport, dport, old, new);
            raw.family = if v6 { AF_INET6 } else { AF_INET };
            (raw.saddr, raw.daddr) = (addr, addr);
            let mut bytes = record(&raw);
            bytes.extend(std::iter::repeat_n(0xAA, extra));
            let event = decode(&bytes).unwrap();
            proptest::prop_assert_eq!((event.skaddr, event.ts_ns, event.delta_ns, event.pid), (skaddr, ts, delta, pid));
            proptest::prop_assert_eq!((event.local_port, event.remote_port), (sport, dport));
            proptest::prop_assert_eq!((event.oldstate, event.newstate), (TcpState(old), TcpState(new)));
            let expected = if v6 {
                IpAddr::V6(Ipv6Addr::from(addr))
            } else {
                IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
            };
            // As printed, the address the kernel gave; as the connection's, the
            // same but IPv4 where it was IPv4-mapped.
            proptest::prop_assert_eq!(event.kernel_addrs().0, expected);
            proptest::prop_assert_eq!(event.local_addr, expected.to_canonical());
        }
    }
}
