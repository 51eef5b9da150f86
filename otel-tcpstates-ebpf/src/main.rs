//! Kernel side of otel-tcpstates: one handler on `sock:inet_sock_set_state` that
//! filters, measures the time spent in the previous state, and queues an [`Event`].
#![no_std]
#![no_main]
// The BPF target has no compare-and-swap, so core's atomics have no
// read-modify-write methods; the intrinsic compiles to the BPF atomic add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod h2;
mod http;
mod incidents;
mod tls;

use aya_ebpf::{
    EbpfContext as _, Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        generated::{bpf_get_current_cgroup_id, bpf_get_current_comm},
    },
    macros::{map, tracepoint},
    maps::{LruHashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
};
use otel_tcpstates_common::{
    AF_INET, AF_INET6, Config, DEFAULT_RING_BUFFER_BYTES, DEFAULT_SOCKET_MAP_ENTRIES, Event,
    IPPROTO_TCP, NetnsOffsets, PORT_BITMAP_WORDS, SocketState, TASK_COMM_LEN, TcpFacts, TcpOffsets,
    is_v4_mapped, lost, socket_flag, tcp_state,
};

/// The tracepoint's record (stable since Linux 4.16). Userspace checks it against
/// the kernel's format file before loading, because the fields are read directly
/// from the context at these fixed offsets (cheaper than bpf_probe_read).
#[repr(C)]
struct Args {
    _common: u64,
    skaddr: u64,
    oldstate: i32,
    newstate: i32,
    sport: u16,
    dport: u16,
    family: u16,
    protocol: u16,
    saddr: u32,
    daddr: u32,
    saddr_v6: [u64; 2],
    daddr_v6: [u64; 2],
}

#[unsafe(no_mangle)]
static CONFIG: Global<Config> = Global::new(Config {
    pid: 0,
    exclude_pid: 0,
    family: 0,
    filter_local_ports: 0,
    filter_remote_ports: 0,
});

#[unsafe(no_mangle)]
static TCP_OFFSETS: Global<TcpOffsets> = Global::new(TcpOffsets {
    enabled: 0,
    bytes_acked: 0,
    bytes_received: 0,
    srtt_us: 0,
    total_retrans: 0,
    segs_in: 0,
    segs_out: 0,
    sk_err: 0,
});

#[unsafe(no_mangle)]
static NETNS_OFFSETS: Global<NetnsOffsets> = Global::new(NetnsOffsets {
    sk_net: 0,
    ns_inum: 0,
});

// Port filters as bitmaps: one bit test per event instead of a map lookup.
#[unsafe(no_mangle)]
static LOCAL_PORTS: [u64; PORT_BITMAP_WORDS] = [0; PORT_BITMAP_WORDS];
#[unsafe(no_mangle)]
static REMOTE_PORTS: [u64; PORT_BITMAP_WORDS] = [0; PORT_BITMAP_WORDS];

/// Wake the reader only once this many bytes are queued; it polls on a short
/// timer otherwise, so a busy host does not pay a wakeup per event.
#[unsafe(no_mangle)]
static WAKEUP_BYTES: Global<u64> = Global::new(DEFAULT_RING_BUFFER_BYTES as u64 / 4);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(DEFAULT_RING_BUFFER_BYTES, 0);

/// Socket address → when it entered its current state and who owns it. LRU so
/// sockets whose CLOSE is never seen cannot fill it up.
#[map]
static SOCKETS: LruHashMap<u64, SocketState> =
    LruHashMap::with_max_entries(DEFAULT_SOCKET_MAP_ENTRIES, 0);

/// Listening sockets remembered, and (network namespace, family, port) keys.
const LISTENER_SOCKET_ENTRIES: u32 = 8192;
const LISTENER_KEY_ENTRIES: u32 = 4096;

/// A listening socket: where it listens, who made it listen, and its
/// neighbours among the live listeners of its key, newest first, so that when
/// the key's owner closes the next newest takes over in a few lookups (walking
/// the map with `bpf_for_each_map_elem` would need Linux 5.13; this program
/// loads on 5.8). Concurrent `listen()`s on one key may lose a neighbour: the
/// key then goes at the owner's close, as it did before there was a list.
#[repr(C)]
#[derive(Clone, Copy)]
struct Listener {
    key: u64,
    /// The next newer and older live listener of the key (0: none).
    newer: u64,
    older: u64,
    owner_pid: u32,
    _pad: u32,
}

/// A key's owner: its newest live listener, whose process owns the connections
/// accepted there when the packet programs cannot tell which listener took one.
#[repr(C)]
#[derive(Clone, Copy)]
struct PortOwner {
    newest: u64,
    owner_pid: u32,
    _pad: u32,
}

/// Listener address → [`Listener`]. LRU: one whose CLOSE was never seen cannot
/// fill it.
#[map]
static LISTENER_SOCKETS: LruHashMap<u64, Listener> =
    LruHashMap::with_max_entries(LISTENER_SOCKET_ENTRIES, 0);

/// [`listener_key`] → [`PortOwner`].
#[map]
static LISTENERS: LruHashMap<u64, PortOwner> =
    LruHashMap::with_max_entries(LISTENER_KEY_ENTRIES, 0);

/// Records the ring buffer had no room for, per CPU, one slot per kind
/// ([`otel_tcpstates_common::lost`]).
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost::KINDS, 0);

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    // SAFETY: the tracepoint context points at a record with this layout, which
    // userspace verified against the running kernel before loading us.
    let args = unsafe { &*ctx.as_ptr().cast::<Args>() };
    handle(args);
    0
}

#[inline(always)]
pub(crate) fn port_in(bitmap: &[u64; PORT_BITMAP_WORDS], port: u16) -> bool {
    let word = (port >> 6) as usize;
    // SAFETY: word < 1024 since port < 65536; volatile so the loader's values are
    // read rather than the all-zero initialiser being constant-folded.
    let bits = unsafe { core::ptr::read_volatile(bitmap.as_ptr().add(word)) };
    bits & (1u64 << (port & 63)) != 0
}

/// Reads a context field with one load at a constant offset: the verifier rejects
/// the pointer arithmetic of a memcpy from the context.
#[inline(always)]
fn load<T: Copy>(field: &T) -> T {
    // SAFETY: `field` is a reference into the tracepoint record.
    unsafe { core::ptr::read_volatile(field) }
}

/// An address as the event stores it: IPv4 in the first 4 bytes, in network order.
#[inline(always)]
fn address(v4: Option<u32>, v6: [u64; 2]) -> [u8; 16] {
    let mut out = [0u8; 16];
    match v4 {
        Some(v4) => out[..4].copy_from_slice(&v4.to_ne_bytes()),
        None => {
            out[..8].copy_from_slice(&v6[0].to_ne_bytes());
            out[8..].copy_from_slice(&v6[1].to_ne_bytes());
        }
    }
    out
}

/// The inode number of the network namespace of socket `skaddr`, or 0 when BTF
/// did not say where it is.
#[inline(always)]
pub(crate) fn netns_of(skaddr: u64) -> u32 {
    let offsets = NETNS_OFFSETS.load();
    if offsets.sk_net == 0 {
        return 0;
    }
    match read_field::<u64>(skaddr, offsets.sk_net) {
        0 => 0,
        net => read_field(net, offsets.ns_inum),
    }
}

/// A listener's key: sockets in different network namespaces (pods) may listen
/// on one port, each for its own connections.
#[inline(always)]
pub(crate) fn listener_key(netns: u32, family: u16, port: u16) -> u64 {
    (u64::from(netns) << 32) | (u64::from(family) << 16) | u64::from(port)
}

/// Whether an `-4` or `-6` filter (`wanted`, non-zero) keeps a socket of
/// `family` with these IPv6 addresses (as words): an IPv6 socket with
/// IPv4-mapped addresses (a dual-stack server's IPv4 client) speaks IPv4, and
/// one on `::` without a peer (a listener on any address) may serve both.
#[inline(always)]
pub(crate) fn family_wanted(wanted: u16, family: u16, saddr: [u64; 2], daddr: [u64; 2]) -> bool {
    if family != AF_INET6 {
        return family == wanted;
    }
    if is_v4_mapped(saddr) || is_v4_mapped(daddr) {
        return wanted == AF_INET;
    }
    wanted == AF_INET6 || (saddr == [0; 2] && daddr == [0; 2])
}

#[inline(always)]
fn handle(args: &Args) {
    if args.protocol != IPPROTO_TCP {
        return;
    }
    let config = CONFIG.load();
    let family = args.family;
    if config.family != 0
        && !family_wanted(
            config.family,
            family,
            [load(&args.saddr_v6[0]), load(&args.saddr_v6[1])],
            [load(&args.daddr_v6[0]), load(&args.daddr_v6[1])],
        )
    {
        return;
    }
    let sport = args.sport;
    let dport = args.dport;
    if config.filter_local_ports != 0 && !port_in(&LOCAL_PORTS, sport) {
        return;
    }
    if config.filter_remote_ports != 0 && !port_in(&REMOTE_PORTS, dport) {
        return;
    }

    let skaddr = args.skaddr;
    let oldstate = args.oldstate as u8;
    let newstate = args.newstate as u8;
    // One clock read serves the delta, the event and the stored entry, so a socket's
    // deltas add up exactly to its lifetime.
    let now = unsafe { bpf_ktime_get_ns() };
    let pid = (bpf_get_current_pid_tgid() >> 32) as u32;

    let known = SOCKETS.get_ptr_mut(&skaddr);
    // A socket that begins now owes nothing to an entry at its address: that is
    // a previous socket's whose CLOSE the kernel skipped (see `recursion_misses`).
    let begins = tcp_state::begins(oldstate, newstate);
    let (delta_ns, mut owner_pid) = match known {
        // SAFETY: the pointer comes from a successful lookup; the socket lock
        // serialises transitions of one socket, so no one else writes it now.
        Some(state) if !begins => unsafe {
            (now.wrapping_sub((*state).since_ns), (*state).owner_pid)
        },
        _ => (0, 0),
    };
    // SAFETY: as above.
    if begins && known.is_some_and(|state| unsafe { (*state).flags } & socket_flag::LISTENER != 0) {
        // A listener whose CLOSE was skipped: it is gone.
        listener_gone(skaddr, None);
    }
    let by_owner = tcp_state::entered_by_owner(newstate);
    // Only listeners and what they clone need the namespace (two reads).
    let netns = if newstate == tcp_state::LISTEN || oldstate == tcp_state::LISTEN {
        netns_of(skaddr)
    } else {
        0
    };
    let listener_key = listener_key(netns, family, sport);
    let mut handoff = None;
    if by_owner {
        owner_pid = pid;
        if newstate == tcp_state::LISTEN {
            listener_opened(skaddr, listener_key, pid);
        }
    } else if oldstate == tcp_state::LISTEN {
        if newstate == tcp_state::SYN_RECV {
            // A connection cloned from a listener belongs to the listener's process
            // (the clone shares its namespace): exactly the one that took it when
            // the packet program handed its segment over, else the key's owner.
            handoff = http::take_handoff(args, family, sport, dport);
            owner_pid = match handoff {
                // SAFETY: this CPU's slot, just matched.
                Some(slot) => unsafe { (*slot).owner_pid },
                // SAFETY: plain values from a successful lookup.
                None => unsafe { LISTENERS.get(&listener_key) }.map_or(0, |port| port.owner_pid),
            };
        } else if newstate == tcp_state::CLOSE {
            listener_gone(skaddr, Some(listener_key));
        }
    }
    if newstate == tcp_state::CLOSE {
        let _ = SOCKETS.remove(&skaddr);
    } else if let Some(state) = known {
        // SAFETY: as above. No packet of a socket that begins has been seen yet.
        unsafe {
            if begins {
                // Nor its verdicts or congestion state.
                *state = SocketState::default();
            }
            (*state).since_ns = now;
            (*state).owner_pid = owner_pid;
            if newstate == tcp_state::LISTEN {
                (*state).flags |= socket_flag::LISTENER;
            }
        }
    } else {
        let state = SocketState {
            since_ns: now,
            owner_pid,
            flags: if newstate == tcp_state::LISTEN {
                socket_flag::LISTENER
            } else {
                0
            },
            ..SocketState::default()
        };
        let _ = SOCKETS.insert(&skaddr, &state, 0);
    }

    if (config.pid != 0 && owner_pid != config.pid)
        || (config.exclude_pid != 0 && owner_pid == config.exclude_pid)
    {
        return;
    }

    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        count_lost(lost::STATE_CHANGES);
        return;
    };
    let facts = if newstate == tcp_state::CLOSE {
        read_facts(skaddr)
    } else {
        TcpFacts::default()
    };
    let cgroup_id = if by_owner {
        // SAFETY: helper without arguments, always callable from tracepoints.
        unsafe { bpf_get_current_cgroup_id() }
    } else {
        0
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned Event-sized slot;
    // every field is written before submit.
    unsafe {
        (*event).skaddr = skaddr;
        (*event).ts_ns = now;
        (*event).delta_ns = delta_ns;
        (*event).cgroup_id = cgroup_id;
        (*event).facts = facts;
        if family == AF_INET {
            (*event).saddr = address(Some(load(&args.saddr)), [0; 2]);
            (*event).daddr = address(Some(load(&args.daddr)), [0; 2]);
        } else {
            let s = [load(&args.saddr_v6[0]), load(&args.saddr_v6[1])];
            let d = [load(&args.daddr_v6[0]), load(&args.daddr_v6[1])];
            (*event).saddr = address(None, s);
            (*event).daddr = address(None, d);
        }
        (*event).pid = pid;
        (*event).owner_pid = owner_pid;
        if bpf_get_current_comm((*event).comm.as_mut_ptr().cast(), TASK_COMM_LEN as u32) != 0 {
            (*event).comm = [0; TASK_COMM_LEN];
        }
        (*event).sport = sport;
        (*event).dport = dport;
        (*event).family = family;
        (*event).oldstate = oldstate;
        (*event).newstate = newstate;
        (*event).netns = netns;
        (*event)._pad = 0;
    }
    entry.submit(wakeup_flags());
    if let Some(slot) = handoff {
        // After the connection's first event, so its session exists for the link.
        http::link_handed_off(skaddr, slot, now);
    }
}

/// The owner of listener `skaddr` listening on `key`: its own when it is
/// remembered, else the key's.
#[inline(always)]
pub(crate) fn listener_owner(skaddr: u64, key: u64) -> u32 {
    // SAFETY (both): plain values copied out of successful lookups.
    match unsafe { LISTENER_SOCKETS.get(&skaddr) } {
        Some(listener) => listener.owner_pid,
        None => unsafe { LISTENERS.get(&key) }.map_or(0, |port| port.owner_pid),
    }
}

/// Remembers a socket that started listening on `key`: the newest of the key's
/// listeners, so its owner.
#[inline(always)]
fn listener_opened(skaddr: u64, key: u64, pid: u32) {
    // SAFETY: plain values copied out of a successful lookup.
    let older = unsafe { LISTENERS.get(&key) }.map_or(0, |port| port.newest);
    let older = if older == skaddr { 0 } else { older };
    let listener = Listener {
        key,
        newer: 0,
        older,
        owner_pid: pid,
        _pad: 0,
    };
    if LISTENER_SOCKETS.insert(&skaddr, &listener, 0).is_err() {
        count_lost(lost::LISTENERS);
    }
    if older != 0
        && let Some(neighbour) = LISTENER_SOCKETS.get_ptr_mut(&older)
    {
        // SAFETY: a value of the map, from a successful lookup.
        unsafe {
            if (*neighbour).key == key {
                (*neighbour).newer = skaddr;
            }
        }
    }
    let port = PortOwner {
        newest: skaddr,
        owner_pid: pid,
        _pad: 0,
    };
    if LISTENERS.insert(&key, &port, 0).is_err() {
        count_lost(lost::LISTENERS);
    }
}

/// Forgets a listener that closed (`key`: where it listened, when known): if it
/// was its key's owner, the next newest live listener of the key takes over;
/// only when none lives is the key forgotten.
#[inline(always)]
fn listener_gone(skaddr: u64, key: Option<u64>) {
    // SAFETY: plain values copied out of a successful lookup.
    let me = unsafe { LISTENER_SOCKETS.get(&skaddr) }.copied();
    let _ = LISTENER_SOCKETS.remove(&skaddr);
    let (key, newer, older) = match (me, key) {
        (Some(me), _) => (me.key, me.newer, me.older),
        (None, Some(key)) => (key, 0, 0),
        (None, None) => return,
    };
    // SAFETY (both blocks): values of the map, from successful lookups; a
    // neighbour of another key is a stale link, left alone.
    if newer != 0
        && let Some(neighbour) = LISTENER_SOCKETS.get_ptr_mut(&newer)
    {
        unsafe {
            if (*neighbour).key == key && (*neighbour).older == skaddr {
                (*neighbour).older = older;
            }
        }
    }
    // The next older live listener of the key: the owner if this one was.
    let mut successor = None;
    if older != 0
        && let Some(neighbour) = LISTENER_SOCKETS.get_ptr_mut(&older)
    {
        unsafe {
            if (*neighbour).key == key {
                if (*neighbour).newer == skaddr {
                    (*neighbour).newer = newer;
                }
                successor = Some((*neighbour).owner_pid);
            }
        }
    }
    let Some(port) = LISTENERS.get_ptr_mut(&key) else {
        return;
    };
    // SAFETY: a value of the map, from a successful lookup. A reader on another
    // CPU may see the owner of before or after: either was a live listener.
    unsafe {
        if (*port).newest != skaddr {
            return;
        }
        match successor {
            Some(owner_pid) => {
                (*port).newest = older;
                (*port).owner_pid = owner_pid;
            }
            None => {
                let _ = LISTENERS.remove(&key);
            }
        }
    }
}

/// Counts a record of `kind` ([`otel_tcpstates_common::lost`]) that could not be
/// queued, in this CPU's slot.
#[inline(always)]
pub(crate) fn count_lost(kind: u32) {
    if let Some(lost) = LOST.get_ptr_mut(kind) {
        // SAFETY: a valid, aligned u64 slot of this CPU's array entry, only ever
        // accessed atomically. Atomic because programs nest on a CPU (a packet's
        // softirq interrupting another program, or a preempted one): a plain
        // `+= 1` interrupted between its load and store would lose a count.
        unsafe { atomic_add(lost, 1) };
    }
}

/// `*at += n` as one atomic instruction. The value before is not returned: that
/// needs the fetching form, which the generic BPF CPU the object is built for
/// (for older kernels) does not have.
///
/// # Safety
/// `at` is a valid, aligned u64 that is only ever written atomically.
#[inline(always)]
pub(crate) unsafe fn atomic_add(at: *mut u64, n: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    // SAFETY: as the caller promises.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(at, n) };
}

/// Submit flags: wake the reader only once enough bytes are queued.
#[inline(always)]
pub(crate) fn wakeup_flags() -> u64 {
    let flags = if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= WAKEUP_BYTES.load() {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    flags as u64
}

/// Reads one field of the socket's `struct tcp_sock` (the tracepoint's `struct sock`
/// is its first member) at an offset userspace resolved from BTF.
#[inline(always)]
pub(crate) fn read_field<T: Default>(skaddr: u64, offset: u32) -> T {
    // SAFETY: bpf_probe_read_kernel checks the address; a failed read gives 0.
    unsafe { bpf_probe_read_kernel((skaddr + u64::from(offset)) as *const T) }.unwrap_or_default()
}

#[inline(always)]
fn read_facts(skaddr: u64) -> TcpFacts {
    let offsets = TCP_OFFSETS.load();
    if offsets.enabled == 0 {
        return TcpFacts::default();
    }
    TcpFacts {
        bytes_acked: read_field(skaddr, offsets.bytes_acked),
        bytes_received: read_field(skaddr, offsets.bytes_received),
        srtt_us_x8: read_field(skaddr, offsets.srtt_us),
        total_retrans: read_field(skaddr, offsets.total_retrans),
        segs_in: read_field(skaddr, offsets.segs_in),
        segs_out: read_field(skaddr, offsets.segs_out),
        sk_err: read_field(skaddr, offsets.sk_err),
        _pad: 0,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
