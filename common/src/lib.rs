//! Types shared by the eBPF program and userspace. Everything here is `#[repr(C)]`
//! plain data: the kernel writes it, userspace reads the same bytes.
#![no_std]

/// Length of `task_struct::comm`, including the NUL.
pub const TASK_COMM_LEN: usize = 16;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;

/// Number of `u64` words in a port bitmap (one bit per port 0..=65535).
pub const PORT_BITMAP_WORDS: usize = 65536 / 64;

/// Size of the event ring buffer unless the user asks for another.
pub const DEFAULT_RING_BUFFER_BYTES: u32 = 8 << 20;
/// Sockets whose current state is remembered in the kernel (LRU: old ones are dropped).
pub const DEFAULT_SOCKET_MAP_ENTRIES: u32 = 65536;

/// One TCP state change, as emitted by the kernel program.
///
/// Addresses are in network byte order; for IPv4 only the first 4 bytes are used.
/// Ports are in host byte order (the tracepoint already converts them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// Kernel address of the `struct sock`: identifies the socket while it lives.
    pub skaddr: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the transition.
    pub ts_ns: u64,
    /// Nanoseconds spent in `oldstate`; 0 when the socket's previous transition was not seen.
    pub delta_ns: u64,
    /// cgroup v2 id of the task, on transitions made by the owner (0 otherwise).
    pub cgroup_id: u64,
    /// On CLOSE, from `struct tcp_sock` (0 otherwise, or without BTF): see [`TcpFacts`].
    pub facts: TcpFacts,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Thread group id of the task on the CPU (may be unrelated in softirq context).
    pub pid: u32,
    /// Process that owns the socket as far as the kernel program knows, 0 if not yet seen.
    pub owner_pid: u32,
    pub comm: [u8; TASK_COMM_LEN],
    pub sport: u16,
    pub dport: u16,
    pub family: u16,
    pub oldstate: u8,
    pub newstate: u8,
    /// Inode number of the socket's network namespace (what `/proc/PID/ns/net`
    /// names), on transitions to and from LISTEN: the listener's key, with the
    /// family and port. 0 on other transitions, or when BTF did not say where it is.
    pub netns: u32,
    pub _pad: u32,
}

/// Connection facts read from `struct tcp_sock` when the socket reaches CLOSE.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpFacts {
    /// Sequence space the peer acknowledged (tcplife's TX): payload bytes, once
    /// however often sent, plus one for this side's SYN (a connecting socket's
    /// only) and one for its FIN.
    pub bytes_acked: u64,
    /// Sequence space received in order (tcplife's RX): payload bytes plus one for
    /// the peer's FIN.
    pub bytes_received: u64,
    /// Smoothed RTT in microseconds, times 8 (the kernel's fixed point).
    pub srtt_us_x8: u32,
    pub total_retrans: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    /// The socket's pending error (`sk_err`, an errno) as it entered CLOSE: the
    /// kernel sets it before closing a refused, timed-out or reset connection.
    pub sk_err: u32,
    pub _pad: u32,
}

/// Byte offsets of the [`TcpFacts`] fields in `struct tcp_sock`, resolved from the
/// kernel's BTF by userspace (aya-ebpf has no CO-RE field relocations).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpOffsets {
    /// Non-zero when the offsets are known; otherwise facts stay 0.
    pub enabled: u32,
    pub bytes_acked: u32,
    pub bytes_received: u32,
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub segs_in: u32,
    pub segs_out: u32,
    /// `struct sock`'s `sk_err` (read at CLOSE, and by the error report program).
    pub sk_err: u32,
}

/// Where a socket's network namespace is, resolved from the kernel's BTF by
/// userspace: `struct sock`'s `__sk_common.skc_net` (a `struct net *`), and in
/// `struct net` its `ns.inum`. 0: unknown (listeners are then keyed by family
/// and port alone).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsOffsets {
    pub sk_net: u32,
    pub ns_inum: u32,
}

/// Whether an IPv6 address, as two native-order words of its bytes, is
/// IPv4-mapped (`::ffff:a.b.c.d`): an IPv6 socket talking to an IPv4 peer.
#[inline(always)]
pub const fn is_v4_mapped(words: [u64; 2]) -> bool {
    const MASK: u64 = u64::from_ne_bytes([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    const MAPPED: u64 = u64::from_ne_bytes([0, 0, 0xff, 0xff, 0, 0, 0, 0]);
    words[0] == 0 && words[1] & MASK == MAPPED
}

/// Scalar filters, set by userspace before the program is loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Only this owner process (0: any).
    pub pid: u32,
    /// Never this owner process (0: none): the tracer's own export connections.
    pub exclude_pid: u32,
    /// Only this address family (0: any).
    pub family: u16,
    /// Non-zero: only sockets whose local port is set in `LOCAL_PORTS`.
    pub filter_local_ports: u8,
    /// Non-zero: only sockets whose remote port is set in `REMOTE_PORTS`.
    pub filter_remote_ports: u8,
}

/// What the kernel remembers per socket between transitions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SocketState {
    /// When the socket entered its current state.
    pub since_ns: u64,
    /// See [`Event::owner_pid`].
    pub owner_pid: u32,
    /// What the packet programs learned of the socket's payload: [`inspect`] bits.
    /// 16 bits, so that their read-modify-write never touches `ca_state`.
    pub inspect: u16,
    /// The congestion state (`enum tcp_ca_state`) last reported for the socket:
    /// the incident program reports only changes, as the kernel also reports a
    /// state the socket is already in (Open, once per connection of a clean churn).
    pub ca_state: u8,
    /// [`socket_flag`] bits, set by the state program.
    pub flags: u8,
}

/// Bits of [`SocketState::flags`].
pub mod socket_flag {
    /// The socket listens: its packets are handshakes of connections not yet
    /// accepted, handed to the child they create (never judged HTTP or not).
    pub const LISTENER: u8 = 1;
}

/// Bits of [`SocketState::inspect`], per direction (shifted by
/// [`inspect::shift`]): whether the direction's first payload was seen, and
/// whether it was an HTTP/1.x request.
pub mod inspect {
    pub const DECIDED: u16 = 1;
    pub const HTTP: u16 = 2;
    /// A sampled request went the other way: the next payload this way is its
    /// answer, queued as an [`AnswerEvent`](super::AnswerEvent).
    pub const ANSWER: u16 = 4;
    /// The direction is HTTP/2: its frames are walked (the h2 programs' flow
    /// state) and never judged again.
    pub const H2: u16 = 8;

    /// Bit offset of a direction's flags.
    pub const fn shift(direction: u8) -> u16 {
        direction as u16 * 4
    }
}

/// Which way a request went through the socket.
pub mod direction {
    /// The socket sent it (egress): the client end.
    pub const SENT: u8 = 0;
    /// The socket received it (ingress): the server end.
    pub const RECEIVED: u8 = 1;
}

/// Bytes of a `traceparent` value the kernel copies: the 55 of version `00`, and
/// the one after, which must end the value (or be `-` in a later version).
pub const TRACEPARENT_COPY: usize = 56;

/// Whether a copied `traceparent` value's flags have the sampled bit: the low
/// bit of its last hex digit (the value is checked in userspace; an invalid one
/// makes no link whatever this says).
#[inline(always)]
pub const fn traceparent_sampled(value: &[u8; TRACEPARENT_COPY]) -> bool {
    let digit = value[54];
    let n = if digit >= b'a' {
        digit.wrapping_sub(b'a' - 10)
    } else {
        digit.wrapping_sub(b'0')
    };
    n & 1 == 1
}

/// HTTP/1.x request methods the packet programs recognise at the start of a
/// segment, numbered from 1 in [`LinkEvent::method`] by their place here.
pub const HTTP_METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// A `traceparent` header seen at the start of an HTTP/1.x request on a socket,
/// as the packet programs queue it (unchecked: userspace validates the value).
/// Told from an [`Event`] on the shared ring buffer by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkEvent {
    /// The socket, as [`Event::skaddr`] names it.
    pub skaddr: u64,
    /// Kernel CLOCK_MONOTONIC nanoseconds when the request's first segment went
    /// through the socket (out of it, or into it).
    pub ts_ns: u64,
    pub value: [u8; TRACEPARENT_COPY],
    /// 1-based index into [`HTTP_METHODS`].
    pub method: u8,
    /// [`direction::SENT`] or [`direction::RECEIVED`].
    pub direction: u8,
    pub _pad: [u8; 6],
}

/// The first payload segment through a socket, the other way, after a sampled
/// request's (its [`LinkEvent`]): where the answer starts. Told from the other
/// records on the shared ring by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnswerEvent {
    /// The socket, as [`Event::skaddr`] names it.
    pub skaddr: u64,
    /// Kernel CLOCK_MONOTONIC nanoseconds when the segment went through.
    pub ts_ns: u64,
    /// The answer's [`direction`]: the opposite of its request's.
    pub direction: u8,
    pub _pad: [u8; 7],
}

/// The bytes of an HTTP/2 header block an [`H2Event`] carries at most (a power
/// of two: the programs bound their copies with it).
pub const H2_CHUNK: usize = 256;

/// The 24 bytes a client's HTTP/2 connection begins with (RFC 9113, 3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What an [`H2Event`] says.
pub mod h2_kind {
    /// The direction begins: a client's after its preface (it carries the
    /// requests), a server's at its first SETTINGS frame. Userspace starts a
    /// new header decoder for it.
    pub const BEGIN: u8 = 0;
    /// The next `len` bytes of the direction's header stream: on the requests'
    /// side, every HEADERS and CONTINUATION frame whole (frame header and
    /// payload); on the answers' side, the 9-byte header of each HEADERS frame.
    pub const BYTES: u8 = 1;
    /// The programs lost their place in the direction: it is given up (and
    /// counted in `LOST`). `len` says why: [`super::h2_broken`].
    pub const BROKEN: u8 = 2;
    /// The TLS connection `conn` is carried by TCP socket `skaddr`.
    pub const BIND: u8 = 3;
}

/// Why a direction was given up ([`h2_kind::BROKEN`]'s `len`).
pub mod h2_broken {
    /// A segment began past the next byte to walk: bytes were never seen.
    pub const GAP: u16 = 1;
    /// A record the ring had no room for, or bytes the kernel could not read.
    pub const LOST: u16 = 2;
    /// More frames in one segment or call than a walk takes.
    pub const STEPS: u16 = 3;
}

/// Bits of [`H2Event::flags`].
pub mod h2_flag {
    /// `conn` is a TLS connection (an `SSL *` of process `pid`), not a
    /// socket: [`super::h2_kind::BIND`] names its socket.
    pub const TLS: u8 = 1;
    /// The direction carries the requests (it began with the preface).
    pub const REQUESTS: u8 = 2;
}

/// One record of an HTTP/2 direction's header stream, as the packet programs
/// (plaintext `h2c`) or the TLS programs (plaintext before encryption and
/// after decryption) walk it: userspace keeps one HPACK decoder per direction
/// and finds each request's `traceparent`. Told from the other records on the
/// shared ring by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct H2Record<const N: usize> {
    /// The connection: a socket, as [`Event::skaddr`] names it, or with
    /// [`h2_flag::TLS`] an `SSL *` of process `pid`.
    pub conn: u64,
    /// Kernel CLOCK_MONOTONIC nanoseconds when the bytes went through.
    pub ts_ns: u64,
    /// [`h2_kind::BIND`]: the socket; 0 otherwise.
    pub skaddr: u64,
    /// The process (tgid) of a TLS connection, whose `SSL *` is unique only in
    /// it; 0 for a socket.
    pub pid: u32,
    /// Bytes of `data` used.
    pub len: u16,
    /// [`direction`] of the bytes through the socket.
    pub direction: u8,
    /// [`h2_kind`].
    pub kind: u8,
    /// [`h2_flag`] bits.
    pub flags: u8,
    pub _pad: [u8; 7],
    pub data: [u8; N],
}

/// An [`H2Record`] with room for a header block's bytes.
pub type H2Event = H2Record<H2_CHUNK>;

/// The bytes an [`H2Small`] carries at most: a frame header (the answers'
/// side's), or none (a direction that begins or is given up, a TLS socket
/// named).
pub const H2_SMALL: usize = 16;

/// An [`H2Record`] for what needs few bytes: a sixth of the ring's room.
pub type H2Small = H2Record<H2_SMALL>;

/// Something the kernel did to a socket besides changing its state: a
/// retransmission, a reset, an error, a congestion state. Told from the other
/// records on the shared ring by its size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IncidentEvent {
    /// The socket, as [`Event::skaddr`] names it; for a SYN-ACK, the listener
    /// (the connection's own socket does not exist yet: the tuple names it).
    pub skaddr: u64,
    /// `bpf_ktime_get_ns()` when it happened.
    pub ts_ns: u64,
    /// What [`incident`] kind says: a retransmission's error (0: sent), a sent
    /// reset's `sk_rst_reason`, an errno, or the congestion state entered.
    pub value: i32,
    /// One of [`incident`].
    pub kind: u8,
    /// The socket's TCP state, where the tracepoint tells it (else 0).
    pub state: u8,
    pub family: u16,
    /// For a SYN-ACK, and for an RST sent by a socket the state program no
    /// longer follows (after CLOSE, or the kernel's time-wait socket): the
    /// connection's ports and addresses, as in [`Event`]; else 0.
    pub sport: u16,
    pub dport: u16,
    /// Segments a retransmission carried (what `total_retrans` adds; 0 when the
    /// kernel's BTF did not say where the count is).
    pub segs: u32,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// Kinds of [`IncidentEvent`].
pub mod incident {
    /// `tcp:tcp_retransmit_skb`: a SYN or data segment sent again.
    pub const RETRANSMIT: u8 = 1;
    /// `tcp:tcp_retransmit_synack`: a listener sent a SYN-ACK again.
    pub const RETRANSMIT_SYNACK: u8 = 2;
    /// `tcp:tcp_send_reset`: the socket sent an RST.
    pub const RESET_SENT: u8 = 3;
    /// `tcp:tcp_receive_reset`: an RST arrived for the socket.
    pub const RESET_RECEIVED: u8 = 4;
    /// `sock:inet_sk_error_report`: the socket reported an error to its owner.
    pub const ERROR: u8 = 5;
    /// `tcp:tcp_cong_state_set`: the congestion state changed.
    pub const CONGESTION: u8 = 6;
}

/// Slots of the `LOST` per-CPU counters: what the kernel programs could not
/// queue, by kind of record, so each loss is reported as what it is.
pub mod lost {
    /// State changes ([`super::Event`]) the ring buffer had no room for.
    pub const STATE_CHANGES: u32 = 0;
    /// Link records ([`super::LinkEvent`]) the ring buffer had no room for, or
    /// whose scratch space a program that interrupted them on the CPU took.
    pub const LINKS: u32 = 1;
    /// Incident records ([`super::IncidentEvent`]) the ring buffer had no room for.
    pub const INCIDENTS: u32 = 2;
    /// Listeners the kernel's listener maps could not store: their accepted
    /// connections may get no owner, or another listener's.
    pub const LISTENERS: u32 = 3;
    /// TLS requests whose TCP socket was not found (or not followed), or that
    /// the TLS programs' per-thread maps had no room for.
    pub const TLS: u32 = 4;
    /// HTTP/2 header bytes ([`super::H2Event`]) the ring buffer had no room
    /// for, or the flow maps had no room to follow: that direction is given up.
    pub const H2: u32 = 5;
    /// Number of slots.
    pub const KINDS: u32 = 6;
}

/// Names of the global variables and maps in the eBPF object, used by both sides.
pub mod names {
    pub const PROGRAM: &str = "inet_sock_set_state";
    pub const CONFIG: &str = "CONFIG";
    pub const TCP_OFFSETS: &str = "TCP_OFFSETS";
    pub const NETNS_OFFSETS: &str = "NETNS_OFFSETS";
    pub const LOCAL_PORTS: &str = "LOCAL_PORTS";
    pub const REMOTE_PORTS: &str = "REMOTE_PORTS";
    pub const EVENTS: &str = "EVENTS";
    pub const SOCKETS: &str = "SOCKETS";
    pub const LOST: &str = "LOST";
    pub const LISTENERS: &str = "LISTENERS";
    pub const WAKEUP_BYTES: &str = "WAKEUP_BYTES";
    /// Offset of a segment's count in `struct sk_buff` (0: unknown).
    pub const SKB_GSO_SEGS: &str = "SKB_GSO_SEGS";
    /// The packet programs (`cgroup_skb`) that find `traceparent` headers.
    pub const HTTP_EGRESS: &str = "http_egress";
    pub const HTTP_INGRESS: &str = "http_ingress";
    pub const SCAN: &str = "SCAN";
    /// The incident programs: (program, tracepoint category, tracepoint name).
    pub const INCIDENT_PROGRAMS: [(&str, &str, &str); 5] = [
        ("tcp_retransmit_skb", "tcp", "tcp_retransmit_skb"),
        ("tcp_retransmit_synack", "tcp", "tcp_retransmit_synack"),
        ("tcp_send_reset", "tcp", "tcp_send_reset"),
        ("tcp_receive_reset", "tcp", "tcp_receive_reset"),
        ("tcp_cong_state_set", "tcp", "tcp_cong_state_set"),
    ];
    /// A raw tracepoint: its record has no socket address, its argument does.
    pub const ERROR_REPORT: &str = "inet_sk_error_report";
    /// The TLS programs' uprobes: (program, function, return probe). Names of
    /// at most 15 bytes: the kernel keeps no more of a program's name.
    pub const TLS_UPROBES: [(&str, &str, bool); 8] = [
        ("ssl_write", "SSL_write", false),
        ("ssl_write_ex", "SSL_write_ex", false),
        ("ssl_write_ret", "SSL_write", true),
        ("ssl_write_exret", "SSL_write_ex", true),
        ("ssl_read", "SSL_read", false),
        ("ssl_read_ex", "SSL_read_ex", false),
        ("ssl_read_ret", "SSL_read", true),
        ("ssl_read_exret", "SSL_read_ex", true),
    ];
    /// The TLS programs' tracepoints: (program, tracepoint category, name).
    pub const TLS_TRACEPOINTS: [(&str, &str, &str); 2] = [
        ("tls_sent", "sock", "sock_send_length"),
        ("tls_received", "sock", "sock_recv_length"),
    ];
}

/// TCP states as numbered in include/net/tcp_states.h.
pub mod tcp_state {
    pub const ESTABLISHED: u8 = 1;
    pub const SYN_SENT: u8 = 2;
    pub const SYN_RECV: u8 = 3;
    pub const FIN_WAIT1: u8 = 4;
    pub const FIN_WAIT2: u8 = 5;
    pub const TIME_WAIT: u8 = 6;
    pub const CLOSE: u8 = 7;
    pub const CLOSE_WAIT: u8 = 8;
    pub const LAST_ACK: u8 = 9;
    pub const LISTEN: u8 = 10;
    pub const CLOSING: u8 = 11;
    pub const NEW_SYN_RECV: u8 = 12;

    /// The name tcpstates prints (no `TCP_` prefix), or `None` for an unknown number.
    pub const fn name(state: u8) -> Option<&'static str> {
        Some(match state {
            ESTABLISHED => "ESTABLISHED",
            SYN_SENT => "SYN_SENT",
            SYN_RECV => "SYN_RECV",
            FIN_WAIT1 => "FIN_WAIT1",
            FIN_WAIT2 => "FIN_WAIT2",
            TIME_WAIT => "TIME_WAIT",
            CLOSE => "CLOSE",
            CLOSE_WAIT => "CLOSE_WAIT",
            LAST_ACK => "LAST_ACK",
            LISTEN => "LISTEN",
            CLOSING => "CLOSING",
            NEW_SYN_RECV => "NEW_SYN_RECV",
            _ => return None,
        })
    }

    /// Transitions that begin a socket's life: connect, listen, and a connection
    /// cloned from its listener. Nothing the kernel remembers of an earlier
    /// socket at the same address applies to it.
    pub const fn begins(oldstate: u8, newstate: u8) -> bool {
        matches!(
            (oldstate, newstate),
            (CLOSE, SYN_SENT) | (CLOSE, LISTEN) | (LISTEN, SYN_RECV)
        )
    }

    /// Transitions only a system call on the socket makes (connect, listen, close,
    /// shutdown), so the task on the CPU is the socket's owner. Others may run in
    /// softirq on whatever task happened to be interrupted.
    pub const fn entered_by_owner(newstate: u8) -> bool {
        matches!(newstate, SYN_SENT | LISTEN | FIN_WAIT1 | LAST_ACK)
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)] structs of integers and byte arrays with no padding
    // that could hold uninitialised bytes when read back.
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::SocketState {}
    unsafe impl aya::Pod for super::TcpOffsets {}
    unsafe impl aya::Pod for super::NetnsOffsets {}
    unsafe impl aya::Pod for super::LinkEvent {}
    unsafe impl aya::Pod for super::IncidentEvent {}
    unsafe impl aya::Pod for super::AnswerEvent {}
    unsafe impl aya::Pod for super::H2Event {}
    unsafe impl aya::Pod for super::H2Small {}
}

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    #[test]
    fn event_layout_has_no_padding() {
        // Userspace decodes these exact bytes; padding would hold garbage.
        assert_eq!(size_of::<Event>(), 144);
        assert_eq!(size_of::<TcpFacts>(), 40);
        assert_eq!(offset_of!(Event, saddr), 72);
        assert_eq!(offset_of!(Event, comm), 112);
        assert_eq!(offset_of!(Event, newstate), 135);
        assert_eq!(offset_of!(Event, netns), 136);
        assert_eq!(size_of::<NetnsOffsets>(), 8);
        assert_eq!(size_of::<TcpOffsets>(), 32);
        assert_eq!(size_of::<Config>(), 12);
        assert_eq!(size_of::<SocketState>(), 16);
        // Records on the shared ring are told apart by their size.
        assert_eq!(size_of::<LinkEvent>(), 80);
        assert_eq!(size_of::<IncidentEvent>(), 64);
        assert_eq!(size_of::<AnswerEvent>(), 24);
        assert_eq!(size_of::<H2Event>(), 296);
        assert_eq!(size_of::<H2Small>(), 56);
        assert_eq!(offset_of!(IncidentEvent, saddr), 32);
    }

    #[test]
    fn the_sampled_flag_is_the_low_bit_of_the_flags() {
        let value = |flags: &[u8; 2]| {
            let mut v = [b'\r'; TRACEPARENT_COPY];
            v[..55].copy_from_slice(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00");
            v[53..55].copy_from_slice(flags);
            v
        };
        for (flags, sampled) in [
            (b"00", false),
            (b"01", true),
            (b"02", false),
            (b"03", true),
            (b"0a", false),
            (b"0b", true),
            (b"fe", false),
            (b"ff", true),
        ] {
            assert_eq!(traceparent_sampled(&value(flags)), sampled, "{flags:?}");
        }
    }

    #[test]
    fn v4_mapped_addresses_are_told() {
        let words = |bytes: [u8; 16]| {
            let (a, b) = bytes.split_at(8);
            [
                u64::from_ne_bytes(a.try_into().unwrap()),
                u64::from_ne_bytes(b.try_into().unwrap()),
            ]
        };
        let mut mapped = [0u8; 16];
        mapped[10..].copy_from_slice(&[0xff, 0xff, 127, 0, 0, 1]);
        assert!(is_v4_mapped(words(mapped)));
        let mut compatible = mapped;
        compatible[10..12].copy_from_slice(&[0, 0]);
        assert!(!is_v4_mapped(words(compatible)), "::127.0.0.1");
        let mut global = mapped;
        global[0] = 0x20;
        assert!(!is_v4_mapped(words(global)));
        assert!(!is_v4_mapped(words([0; 16])), "::");
    }

    #[test]
    fn state_names_match_tcpstates() {
        assert_eq!(tcp_state::name(tcp_state::SYN_SENT), Some("SYN_SENT"));
        assert_eq!(
            tcp_state::name(tcp_state::NEW_SYN_RECV),
            Some("NEW_SYN_RECV")
        );
        assert_eq!(tcp_state::name(0), None);
        assert_eq!(tcp_state::name(13), None);
    }

    #[test]
    fn a_socket_begins_at_connect_listen_or_clone() {
        use tcp_state::*;
        assert!(begins(CLOSE, SYN_SENT) && begins(CLOSE, LISTEN) && begins(LISTEN, SYN_RECV));
        assert!(!begins(SYN_SENT, ESTABLISHED) && !begins(LISTEN, CLOSE));
        assert!(!begins(SYN_RECV, ESTABLISHED) && !begins(ESTABLISHED, CLOSE));
    }

    #[test]
    fn only_system_call_transitions_reveal_the_owner() {
        use tcp_state::*;
        let owners: [u8; 4] = [SYN_SENT, LISTEN, FIN_WAIT1, LAST_ACK];
        for state in 0..=13 {
            assert_eq!(entered_by_owner(state), owners.contains(&state), "{state}");
        }
    }
}
