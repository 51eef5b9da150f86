//! The incident programs: what the kernel did to a socket besides changing its
//! state (retransmissions, resets, errors, congestion states), each queued as an
//! [`IncidentEvent`] on the shared ring for the span of the state it happened in.
//!
//! As careful as the state program: they never wait (a full ring drops the event
//! and counts it in `LOST`, as an incident), and they keep to the sockets it
//! follows. A socket
//! is in `SOCKETS` only when it passed the port and family filters, so one lookup
//! there decides, with the owner filter on what it stored. Two kinds happen where
//! that lookup cannot tell: a SYN-ACK (the connection has no socket yet) and the
//! RST an abortive close sends after the socket entered CLOSE; those are filtered
//! on the addresses the tracepoint gives. So is the RST of the kernel's
//! time-wait socket (a request that arrived after our FIN), which the state
//! program never sees.
use aya_ebpf::{
    EbpfContext as _, Global,
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use otel_tcpstates_common::{AF_INET, AF_INET6, Config, IncidentEvent, incident, lost, tcp_state};

/// Offset in `struct sk_buff` of its segment count (`tcp_skb_cb.tcp_gso_segs`
/// in `cb`), from BTF; 0: unknown.
#[unsafe(no_mangle)]
static SKB_GSO_SEGS: Global<u32> = Global::new(0);

use crate::{
    CONFIG, EVENTS, LOCAL_PORTS, REMOTE_PORTS, SOCKETS, TCP_OFFSETS, count_lost, family_wanted,
    listener_key, listener_owner, netns_of, port_in, read_field, wakeup_flags,
};

/// A field of a tracepoint record at a constant, naturally aligned offset: one
/// load (the verifier allows no other context access). Offsets are those of
/// Linux 6.10 and later, which userspace checks against the format files before
/// attaching a program.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: userspace verified that the record has a field of this type here.
    unsafe { core::ptr::read_volatile(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
}

/// A field at an unaligned offset (the address arrays), copied by a helper.
#[inline(always)]
fn copied<T: Default>(ctx: &TracePointContext, offset: usize) -> T {
    // SAFETY: bpf_probe_read_kernel checks the address; a failed read gives 0.
    unsafe { bpf_probe_read_kernel(ctx.as_ptr().cast::<u8>().add(offset).cast::<T>()) }
        .unwrap_or_default()
}

#[inline(always)]
fn owner_wanted(config: &Config, owner_pid: u32) -> bool {
    !((config.pid != 0 && owner_pid != config.pid)
        || (config.exclude_pid != 0 && owner_pid == config.exclude_pid))
}

/// Whether the state program follows the socket and its owner passes the filter.
#[inline(always)]
fn followed(skaddr: u64) -> bool {
    // SAFETY: plain values copied out of a successful lookup.
    match unsafe { SOCKETS.get(&skaddr) } {
        Some(state) => owner_wanted(&CONFIG.load(), state.owner_pid),
        None => false,
    }
}

/// Whether a socket the state program cannot vouch for passes the port filters,
/// and the family filter as the state program applies it (`v6`: its local IPv6
/// address, as words, when `family` is IPv6).
#[inline(always)]
fn endpoints_wanted(config: &Config, family: u16, v6: [u64; 2], sport: u16, dport: u16) -> bool {
    // The local address tells: a mapped socket's is mapped, a connection's never `::`.
    (config.family == 0 || family_wanted(config.family, family, v6, v6))
        && (config.filter_local_ports == 0 || port_in(&LOCAL_PORTS, sport))
        && (config.filter_remote_ports == 0 || port_in(&REMOTE_PORTS, dport))
}

/// 16 address bytes as the two words [`family_wanted`] takes.
#[inline(always)]
fn words(addr: &[u8; 16]) -> [u64; 2] {
    let mut out = [0u64; 2];
    // SAFETY: 16 bytes into two u64s; read_unaligned has no alignment needs.
    unsafe {
        out[0] = core::ptr::read_unaligned(addr.as_ptr().cast::<u64>());
        out[1] = core::ptr::read_unaligned(addr.as_ptr().add(8).cast::<u64>());
    }
    out
}

/// The addresses and ports of a SYN-ACK's connection.
#[derive(Default)]
struct Tuple {
    family: u16,
    sport: u16,
    dport: u16,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

#[inline(always)]
fn emit(skaddr: u64, kind: u8, state: u8, value: i32, segs: u32, tuple: &Tuple) {
    let Some(mut entry) = EVENTS.reserve::<IncidentEvent>(0) else {
        count_lost(lost::INCIDENTS);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned slot; every field written before submit.
    unsafe {
        (*event).skaddr = skaddr;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).value = value;
        (*event).kind = kind;
        (*event).state = state;
        (*event).family = tuple.family;
        (*event).sport = tuple.sport;
        (*event).dport = tuple.dport;
        (*event).segs = segs;
        (*event).saddr = tuple.saddr;
        (*event).daddr = tuple.daddr;
    }
    entry.submit(wakeup_flags());
}

// tcp:tcp_retransmit_skb: skaddr at 16, state at 24, err at 76.
#[tracepoint]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = field(&ctx, 16);
    if followed(skaddr) {
        let state: i32 = field(&ctx, 24);
        let err: i32 = field(&ctx, 76);
        let at = SKB_GSO_SEGS.load();
        let segs = if at == 0 {
            0
        } else {
            let skbaddr: u64 = field(&ctx, 8);
            u32::from(read_field::<u16>(skbaddr, at)).max(1)
        };
        emit(
            skaddr,
            incident::RETRANSMIT,
            state as u8,
            err,
            segs,
            &Tuple::default(),
        );
    }
    0
}

// tcp:tcp_retransmit_synack: the listener at 8; the request's sport 24, dport 26,
// family 28, saddr 30, daddr 34, saddr_v6 38, daddr_v6 54.
#[tracepoint]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let config = CONFIG.load();
    let family: u16 = field(&ctx, 28);
    let sport: u16 = field(&ctx, 24);
    let dport: u16 = field(&ctx, 26);
    let mut tuple = Tuple {
        family,
        sport,
        dport,
        ..Tuple::default()
    };
    if family == AF_INET {
        let s: [u8; 4] = copied(&ctx, 30);
        let d: [u8; 4] = copied(&ctx, 34);
        tuple.saddr[..4].copy_from_slice(&s);
        tuple.daddr[..4].copy_from_slice(&d);
    } else {
        tuple.saddr = copied(&ctx, 38);
        tuple.daddr = copied(&ctx, 54);
    }
    if !endpoints_wanted(&config, family, words(&tuple.saddr), sport, dport) {
        return 0;
    }
    let listener: u64 = field(&ctx, 8);
    if config.pid != 0 || config.exclude_pid != 0 {
        let owner = listener_owner(listener, listener_key(netns_of(listener), family, sport));
        if !owner_wanted(&config, owner) {
            return 0;
        }
    }
    emit(
        listener,
        incident::RETRANSMIT_SYNACK,
        tcp_state::SYN_RECV,
        0,
        1,
        &tuple,
    );
    0
}

// tcp:tcp_send_reset: skaddr at 16 (0: no socket), state 24, reason 28, the
// source and destination as a sockaddr_in6 (or sockaddr_in) at 32 and 60.
#[tracepoint]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = field(&ctx, 16);
    if skaddr == 0 {
        return 0;
    }
    let state: i32 = field(&ctx, 24);
    let reason: u32 = field(&ctx, 28);
    let mut tuple = Tuple::default();
    if !followed(skaddr) {
        // An abortive close sends its RST after CLOSE, when the state program
        // has let the socket go; the kernel's time-wait socket, which replaced a
        // socket closed from FIN_WAIT2, resets data that arrives after our FIN.
        // Judged on the endpoints, which name the connection for userspace.
        if state as u8 != tcp_state::CLOSE && state as u8 != tcp_state::TIME_WAIT {
            return 0;
        }
        let family: u16 = field(&ctx, 32);
        tuple.family = family;
        tuple.sport = u16::from_be(field(&ctx, 34));
        tuple.dport = u16::from_be(field(&ctx, 62));
        if family == AF_INET6 {
            // sin6_addr, after a sockaddr_in6's family, port and flowinfo.
            tuple.saddr = copied(&ctx, 40);
            tuple.daddr = copied(&ctx, 68);
        } else {
            // A sockaddr_in's sin_addr, after its family and port.
            let s: [u8; 4] = copied(&ctx, 36);
            let d: [u8; 4] = copied(&ctx, 64);
            tuple.saddr[..4].copy_from_slice(&s);
            tuple.daddr[..4].copy_from_slice(&d);
        }
        let v6 = if family == AF_INET6 {
            words(&tuple.saddr)
        } else {
            [0; 2]
        };
        if !endpoints_wanted(&CONFIG.load(), family, v6, tuple.sport, tuple.dport) {
            return 0;
        }
    }
    emit(
        skaddr,
        incident::RESET_SENT,
        state as u8,
        reason as i32,
        0,
        &tuple,
    );
    0
}

// tcp:tcp_receive_reset: skaddr at 8.
#[tracepoint]
pub fn tcp_receive_reset(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = field(&ctx, 8);
    if followed(skaddr) {
        emit(skaddr, incident::RESET_RECEIVED, 0, 0, 0, &Tuple::default());
    }
    0
}

// tcp:tcp_cong_state_set: skaddr at 8, cong_state at 62.
#[tracepoint]
pub fn tcp_cong_state_set(ctx: TracePointContext) -> u32 {
    let skaddr: u64 = field(&ctx, 8);
    let Some(known) = SOCKETS.get_ptr_mut(&skaddr) else {
        return 0;
    };
    let state: u8 = field(&ctx, 62);
    // SAFETY: a value of the map, from a successful lookup. Only this program
    // writes `ca_state`, under the socket's lock (as the kernel changes it).
    let owner_pid = unsafe {
        if (*known).ca_state == state {
            return 0;
        }
        (*known).ca_state = state;
        (*known).owner_pid
    };
    if owner_wanted(&CONFIG.load(), owner_pid) {
        emit(
            skaddr,
            incident::CONGESTION,
            0,
            i32::from(state),
            0,
            &Tuple::default(),
        );
    }
    0
}

/// `sock:inet_sk_error_report`, raw: the record has no socket address, the
/// argument is the socket. Its error is the one `sk_err` holds now. A socket the
/// state program no longer follows has closed, and its CLOSE event carried the
/// same error.
#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: RawTracePointContext) -> i32 {
    let skaddr: u64 = ctx.arg(0);
    let offsets = TCP_OFFSETS.load();
    if offsets.enabled == 0 || !followed(skaddr) {
        return 0;
    }
    let error: i32 = read_field(skaddr, offsets.sk_err);
    emit(skaddr, incident::ERROR, 0, error, 0, &Tuple::default());
    0
}
