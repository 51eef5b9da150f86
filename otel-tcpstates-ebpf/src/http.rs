//! The packet programs: `cgroup_skb` egress and ingress, attached to the cgroup v2
//! root, find the W3C `traceparent` header of plaintext HTTP/1.x requests and queue
//! it as a [`LinkEvent`] for the socket. They never drop or change a packet.
//!
//! Cheap on the packets that matter least: one lookup of the socket's state in
//! `SOCKETS` (a socket the tracepoint program does not follow is never looked at);
//! a direction whose first payload was not an HTTP request is never looked at again;
//! on an HTTP socket only a segment that starts a request is scanned, and only its
//! first [`SCAN_BYTES`] of headers.
//!
//! A listener's segments are handshakes of connections that have no socket yet
//! (the kernel runs the ingress program on the listener, then clones the
//! connection's socket from it in the same softirq): each is handed to the state
//! program through this CPU's [`HANDOFF`] slot, with the listener's owner and,
//! when it carries a request (`TCP_DEFER_ACCEPT`, a lost final ACK),
//! its `traceparent`, for the connection it creates. A listener is never judged
//! HTTP or not.
use core::ffi::c_void;

use aya_ebpf::{
    EbpfContext as _,
    bindings::__sk_buff,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_probe_read_user, bpf_skb_load_bytes},
    },
    macros::{cgroup_skb, map},
    maps::PerCpuArray,
    programs::SkBuffContext,
};
use otel_tcpstates_common::{
    AF_INET, AF_INET6, AnswerEvent, HTTP_METHODS, LinkEvent, TRACEPARENT_COPY, direction, inspect,
    lost, socket_flag, traceparent_sampled,
};

use crate::{
    Args, CONFIG, EVENTS, SOCKETS, address, atomic_add, count_lost, h2, load as field, wakeup_flags,
};

/// How much of a request's headers is scanned for `traceparent:`.
const SCAN_BYTES: usize = 1024;
/// `\n` and `traceparent:`.
const NEEDLE: usize = 13;
/// Optional white space allowed between the colon and the value.
const MAX_OWS: usize = 4;
/// Room after the scanned bytes so the reads past a match stay inside the buffer
/// whatever the offset (the verifier checks the largest one).
const SLACK: usize = NEEDLE + MAX_OWS + TRACEPARENT_COPY;

/// Nesting levels with a scratch slot each: these programs nest on a CPU (a
/// packet's receive softirq runs `http_ingress` in the middle of an
/// `http_egress` in process context; a softirq's own transmit runs
/// `http_egress`), one per level as the kernel's own `bpf_trace` buffers are.
const LEVELS: u32 = 4;

#[repr(C)]
pub struct Scan {
    /// The claim of the program using the slot (see [`find_traceparent`]).
    claim: u64,
    bytes: [u8; SCAN_BYTES + SLACK],
}

/// Scratch for the bytes scanned, too large for the stack: per CPU, one per
/// nesting level.
#[map]
static SCAN: PerCpuArray<Scan> = PerCpuArray::with_max_entries(LEVELS, 0);

/// How many of these programs are inside [`find_traceparent`] on this CPU now:
/// the level, and so the slot, of the next one.
#[map]
static SCAN_DEPTH: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// A listener's segment, handed to the connection socket it creates.
#[repr(C)]
pub struct Handoff {
    /// Set once the slot is written, cleared when the state program reads it.
    armed: u8,
    /// The request's method (1-based) when `value` holds its `traceparent`; 0: none.
    method: u8,
    /// The listener's family (the connection's socket has it too).
    family: u16,
    local_port: u16,
    peer_port: u16,
    /// The process that made the listener listen.
    pub owner_pid: u32,
    /// As the connection's state changes will give it (IPv4-mapped on an IPv6
    /// listener).
    peer: [u8; 16],
    value: [u8; TRACEPARENT_COPY],
}

/// Per CPU: the last segment a listener received, until the state program
/// takes it (or the next one replaces it).
#[map]
static HANDOFF: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(1, 0);

#[cgroup_skb(egress)]
pub fn http_egress(ctx: SkBuffContext) -> i32 {
    inspect(&ctx, direction::SENT);
    1
}

#[cgroup_skb(ingress)]
pub fn http_ingress(ctx: SkBuffContext) -> i32 {
    inspect(&ctx, direction::RECEIVED);
    1
}

/// The request method a payload starts with (its 1-based place in
/// [`HTTP_METHODS`]), followed by a space; 0 for none.
#[inline(always)]
pub(crate) fn method(start: &[u8; 8]) -> u8 {
    let mut i = 0;
    while i < HTTP_METHODS.len() {
        let name = HTTP_METHODS[i];
        let mut j = 0;
        let mut same = true;
        while j < name.len() {
            if start[j] != name[j] {
                same = false;
                break;
            }
            j += 1;
        }
        if same && start[name.len()] == b' ' {
            return i as u8 + 1;
        }
        i += 1;
    }
    0
}

/// `N` bytes at `offset` from the IP header, or `None` past the packet's end.
#[inline(always)]
fn load<const N: usize>(ctx: &SkBuffContext, offset: usize) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    // SAFETY: `out` has room for N bytes; the helper checks the packet's bounds.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            out.as_mut_ptr().cast(),
            N as u32,
        )
    };
    (ret == 0).then_some(out)
}

#[inline(always)]
fn inspect(ctx: &SkBuffContext, dir: u8) -> Option<()> {
    let skb = ctx.as_ptr().cast::<__sk_buff>();
    // SAFETY: the context is the kernel's __sk_buff; `sk` is the local socket
    // (NULL for packets without one). Its address is the key the tracepoint
    // program uses: the verifier lets it become a number with CAP_PERFMON.
    let sk = unsafe { (*skb).__bindgen_anon_2.sk } as u64;
    if sk == 0 {
        return None;
    }
    let state = SOCKETS.get_ptr_mut(&sk)?;
    let shift = inspect::shift(dir);
    // SAFETY: a value of the map, from a successful lookup.
    let (flags, owner, listener) = unsafe {
        (
            (*state).inspect >> shift,
            (*state).owner_pid,
            (*state).flags & socket_flag::LISTENER != 0,
        )
    };
    if listener {
        if dir == direction::RECEIVED {
            // SAFETY: the context's `family` is its socket's.
            let family = unsafe { (*skb).family } as u16;
            hand_off(ctx, family, owner);
        }
        return None;
    }
    if flags & inspect::H2 != 0 {
        let (_, payload, l4) = headers(ctx)?;
        let len = ctx.len() as usize;
        if payload < len {
            let seq = u32::from_be_bytes(load::<4>(ctx, l4 + 4)?);
            h2::segment(skb, sk, dir, payload as u32, seq, (len - payload) as u32);
        }
        return None;
    }
    let answer = flags & inspect::ANSWER != 0;
    if !answer && flags & inspect::DECIDED != 0 && flags & inspect::HTTP == 0 {
        return None;
    }
    if !owner_wanted(owner) {
        return None;
    }

    let (_, payload, l4) = headers(ctx)?;
    let len = ctx.len() as usize;
    if payload >= len {
        // No payload (an ACK): nothing is decided yet.
        return None;
    }
    if answer {
        // SAFETY: as above; a race with the other direction's program setting
        // the bit again at once can only lose that request's answer (its span
        // then ends with the connection's next request or end).
        unsafe { (*state).inspect &= !(inspect::ANSWER << shift) };
        queue_answer(sk, dir);
        if flags & inspect::DECIDED != 0 && flags & inspect::HTTP == 0 {
            return None;
        }
    }
    let start = load::<8>(ctx, payload)?;
    let method = method(&start);
    if flags & inspect::DECIDED == 0 {
        let kind = if method != 0 {
            inspect::HTTP
        } else if h2::segment_begins(
            skb,
            sk,
            dir,
            payload as u32,
            u32::from_be_bytes(load::<4>(ctx, l4 + 4)?),
            (len - payload) as u32,
        ) {
            inspect::H2
        } else {
            0
        };
        let decided = inspect::DECIDED | kind;
        // SAFETY: as above; the other direction's bits are kept. A race with the
        // other direction's program could lose a bit: it is then decided again,
        // on that direction's next payload. (No 32-bit atomics on this target.)
        unsafe { (*state).inspect |= decided << shift };
    }
    if method == 0 {
        return None;
    }
    if find_traceparent(Packet(ctx, payload), method, Out::Ring { sk, dir })? {
        // A sampled request: the next payload the other way is its answer.
        let other = inspect::shift(dir ^ 1);
        // SAFETY: as above.
        unsafe { (*state).inspect |= inspect::ANSWER << other };
    }
    Some(())
}

/// Queues the [`AnswerEvent`] of a payload segment that went `dir` through
/// socket `sk`, now.
#[inline(always)]
pub(crate) fn queue_answer(sk: u64, dir: u8) {
    let Some(mut entry) = EVENTS.reserve::<AnswerEvent>(0) else {
        count_lost(lost::LINKS);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned AnswerEvent-sized slot, every field
    // written before submit; the clock helper has no arguments.
    unsafe {
        (*event).skaddr = sk;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).direction = dir;
        (*event)._pad = [0; 7];
    }
    entry.submit(wakeup_flags());
}

#[inline(always)]
pub(crate) fn owner_wanted(owner: u32) -> bool {
    let config = CONFIG.load();
    !((config.pid != 0 && owner != config.pid)
        || (config.exclude_pid != 0 && owner == config.exclude_pid))
}

/// The IP version, where the TCP payload starts and where the TCP header does:
/// skb data starts at the IP header in both directions.
#[inline(always)]
fn headers(ctx: &SkBuffContext) -> Option<(u8, usize, usize)> {
    let ip = load::<10>(ctx, 0)?;
    let version = ip[0] >> 4;
    let l4 = match version {
        4 if ip[9] == 6 => usize::from(ip[0] & 0x0f) * 4,
        // IPv6 without extension headers only.
        6 if ip[6] == 6 => 40,
        _ => return None,
    };
    let tcp = load::<1>(ctx, l4 + 12)?;
    Some((version, l4 + usize::from(tcp[0] >> 4) * 4, l4))
}

/// Writes a listener's received segment into this CPU's [`HANDOFF`] slot: its
/// ends, the listener's owner, and the `traceparent` of a request it carries.
/// Every segment, the handshake's bare ACK included: it is the one that creates
/// the connection's socket when no request comes with it.
#[inline(always)]
fn hand_off(ctx: &SkBuffContext, family: u16, owner: u32) -> Option<()> {
    let (version, payload, l4) = headers(ctx)?;
    let ports = load::<4>(ctx, l4)?;
    let mut peer = [0u8; 16];
    if version == 4 {
        let v4 = load::<4>(ctx, 12)?;
        if family == AF_INET6 {
            // How an IPv6 socket names an IPv4 peer.
            peer[10] = 0xff;
            peer[11] = 0xff;
            peer[12..].copy_from_slice(&v4);
        } else {
            peer[..4].copy_from_slice(&v4);
        }
    } else if family == AF_INET6 {
        peer = load::<16>(ctx, 8)?;
    } else {
        return None;
    }
    let slot = HANDOFF.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot. The state program reads it only on this CPU,
    // after this program returned (same softirq), and checks `armed` again after
    // its copy, so a program that nests and rewrites it is caught.
    unsafe {
        (*slot).armed = 0;
        (*slot).method = 0;
        (*slot).family = if family == AF_INET { AF_INET } else { AF_INET6 };
        (*slot).peer_port = u16::from_be_bytes([ports[0], ports[1]]);
        (*slot).local_port = u16::from_be_bytes([ports[2], ports[3]]);
        (*slot).owner_pid = owner;
        (*slot).peer = peer;
    }
    if payload < ctx.len() as usize && owner_wanted(owner) {
        let start = load::<8>(ctx, payload)?;
        let method = method(&start);
        if method != 0 {
            let _ = find_traceparent(Packet(ctx, payload), method, Out::Handoff(slot));
        }
    }
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(&raw mut (*slot).armed, 1) };
    Some(())
}

/// Takes this CPU's [`HANDOFF`] slot for the connection socket the state
/// program sees cloned from a listener: the slot when it holds the segment of
/// that connection, `None` otherwise. The slot is empty afterwards.
#[inline(always)]
pub(crate) fn take_handoff(
    args: &Args,
    family: u16,
    sport: u16,
    dport: u16,
) -> Option<*mut Handoff> {
    let slot = HANDOFF.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot (see `hand_off`).
    unsafe {
        if core::ptr::read_volatile(&raw const (*slot).armed) == 0 {
            return None;
        }
        core::ptr::write_volatile(&raw mut (*slot).armed, 0);
        let peer = if family == AF_INET {
            address(Some(field(&args.daddr)), [0; 2])
        } else {
            address(None, [field(&args.daddr_v6[0]), field(&args.daddr_v6[1])])
        };
        ((*slot).family == family
            && (*slot).local_port == sport
            && (*slot).peer_port == dport
            && (*slot).peer == peer)
            .then_some(slot)
    }
}

/// Queues the link of a request handed off in `slot` (taken by
/// [`take_handoff`]) for the connection socket `skaddr` it created at kernel
/// time `now`.
#[inline(always)]
pub(crate) fn link_handed_off(skaddr: u64, slot: *mut Handoff, now: u64) {
    // SAFETY: this CPU's slot, taken by this program run.
    let method = unsafe { (*slot).method };
    if method == 0 {
        return;
    }
    let Some(mut entry) = EVENTS.reserve::<LinkEvent>(0) else {
        count_lost(lost::LINKS);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned LinkEvent-sized slot, every field
    // written before submit.
    unsafe {
        (*event).skaddr = skaddr;
        (*event).ts_ns = now;
        (*event).value = (*slot).value;
        (*event).method = method;
        (*event).direction = direction::RECEIVED;
        (*event)._pad = [0; 6];
        (*slot).method = 0;
    }
    // SAFETY: as above; read after the copy.
    if unsafe { core::ptr::read_volatile(&raw const (*slot).armed) } != 0 {
        // A packet program nested and wrote the slot meanwhile.
        entry.discard(0);
        count_lost(lost::LINKS);
        return;
    }
    // SAFETY: the event's copy, ours until submit.
    let sampled = traceparent_sampled(unsafe { &(*event).value });
    entry.submit(wakeup_flags());
    if sampled && let Some(state) = SOCKETS.get_ptr_mut(&skaddr) {
        // The answer to a request that came with the handshake goes out.
        // SAFETY: a value of the map, from a successful lookup.
        unsafe { (*state).inspect |= inspect::ANSWER << inspect::shift(direction::SENT) };
    }
}

/// Where the bytes scanned come from. A trait, not an enum: each program gets
/// only its own source's helper (a `cgroup_skb` program may not call
/// `bpf_probe_read_user`).
pub(crate) trait Source {
    /// How many bytes there are to scan, at most [`SCAN_BYTES`].
    fn len(&self) -> usize;
    /// Copies the first `n` bytes (1 to [`SCAN_BYTES`]) into `to`; false when
    /// the kernel could not read them.
    fn copy(&self, to: &mut [u8; SCAN_BYTES + SLACK], n: usize) -> bool;
}

/// A segment's payload, from this offset of the packet on.
pub(crate) struct Packet<'a>(pub &'a SkBuffContext, pub usize);

impl Source for Packet<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        let len = (self.0.len() as usize).saturating_sub(self.1);
        if len > SCAN_BYTES { SCAN_BYTES } else { len }
    }

    #[inline(always)]
    fn copy(&self, to: &mut [u8; SCAN_BYTES + SLACK], n: usize) -> bool {
        if n == 0 || n > SCAN_BYTES {
            return false;
        }
        // The same `n`, in a form the verifier bounds to 1..=SCAN_BYTES whatever
        // the compiler makes of the check above.
        let n = ((n - 1) & (SCAN_BYTES - 1)) + 1;
        // SAFETY: `n` bytes fit in `to`; the helper checks the packet's bounds.
        unsafe {
            bpf_skb_load_bytes(
                self.0.as_ptr(),
                self.1 as u32,
                to.as_mut_ptr().cast(),
                n as u32,
            ) == 0
        }
    }
}

/// A process's plaintext (a TLS library's buffer), this long.
pub(crate) struct User(pub *const u8, pub usize);

impl Source for User {
    #[inline(always)]
    fn len(&self) -> usize {
        if self.1 > SCAN_BYTES {
            SCAN_BYTES
        } else {
            self.1
        }
    }

    #[inline(always)]
    fn copy(&self, to: &mut [u8; SCAN_BYTES + SLACK], n: usize) -> bool {
        // As for a packet.
        if n == 0 || n > SCAN_BYTES {
            return false;
        }
        let n = ((n - 1) & (SCAN_BYTES - 1)) + 1;
        // SAFETY: `n` bytes fit in `to`; the helper checks the user address.
        unsafe { bpf_probe_read_user(to.as_mut_ptr().cast(), n as u32, self.0.cast()) == 0 }
    }
}

/// Where a found `traceparent` goes.
#[derive(Clone, Copy)]
pub(crate) enum Out {
    /// A [`LinkEvent`] for the socket `sk`, request gone `dir`.
    Ring { sk: u64, dir: u8 },
    /// This CPU's hand-off slot, for the connection the segment creates.
    Handoff(*mut Handoff),
    /// A TLS request's, until its socket is known: the value is copied here
    /// and nothing is queued.
    Value(*mut [u8; TRACEPARENT_COPY]),
}

/// Scans the request's headers in this nesting level's scratch slot; whether
/// the `traceparent` found says the request is sampled.
#[inline(always)]
pub(crate) fn find_traceparent(source: impl Source, method: u8, out: Out) -> Option<bool> {
    let depth = SCAN_DEPTH.get_ptr_mut(0)?;
    // SAFETY: a valid, aligned u64 of this CPU's entry, only written atomically:
    // a program that interrupts this one between a load and a store must not
    // undo its count. One that nests between the read and the add leaves the
    // depth as it found it; two that interleave on a preemptible kernel may read
    // the same level, and the slot's claim catches that.
    let level = unsafe {
        let level = core::ptr::read_volatile(depth);
        atomic_add(depth, 1);
        level
    };
    let found = scan_in(source, method, out, level);
    // SAFETY: as above; adding 2^64 - 1 takes the one back.
    unsafe { atomic_add(depth, u64::MAX) };
    found
}

#[inline(always)]
fn scan_in(source: impl Source, method: u8, out: Out, level: u64) -> Option<bool> {
    if level >= u64::from(LEVELS) {
        // Deeper than any nesting the kernel does: no slot is free.
        count_lost(lost::LINKS);
        return None;
    }
    let scan = SCAN.get_ptr_mut(level as u32)?;
    // SAFETY: this level's slot of this CPU. Programs that nest use the levels
    // above; one that takes this slot anyway (a preempted program's level reused
    // on a preemptible kernel) is caught by the claim below.
    let scan = unsafe { &mut *scan };
    // The claim: whoever writes the slot after this writes its own claim first,
    // so an unchanged claim at the end means the bytes are still ours. Two
    // programs on one CPU never read the clock at the same nanosecond.
    // SAFETY: helper without arguments.
    let claim = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a field of the slot; volatile so the write is not moved or elided.
    unsafe { core::ptr::write_volatile(&raw mut scan.claim, claim) };
    let n = source.len();
    if !source.copy(&mut scan.bytes, n) {
        return None;
    }
    let mut search = Search {
        scan,
        n: n as u32,
        found: 0,
    };
    // A callback per word of the headers: the verifier checks it once, where an
    // inline loop of a thousand bytes is too long a path for it.
    // SAFETY: the callback and its context are what bpf_loop expects; `search`
    // outlives the call.
    unsafe {
        bpf_loop(
            (SCAN_BYTES / 8) as u32,
            search_word as *mut c_void,
            (&raw mut search).cast(),
            0,
        )
    };
    let mut at = search.found as usize;
    if at == 0 || at > SCAN_BYTES {
        return None;
    }
    let mut ows = 0;
    while ows < MAX_OWS {
        // SAFETY: at <= SCAN_BYTES + MAX_OWS, inside `bytes`.
        let byte = unsafe { *scan.bytes.get_unchecked(at) };
        if byte != b' ' && byte != b'\t' {
            break;
        }
        at += 1;
        ows += 1;
    }
    // The value must lie within what was loaded (the scanned part of this segment).
    if at + TRACEPARENT_COPY > n {
        return None;
    }

    let (sk, dir) = match out {
        Out::Ring { sk, dir } => (sk, dir),
        Out::Value(value) => {
            // SAFETY: the caller's buffer; `at + TRACEPARENT_COPY` is within `bytes`.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    scan.bytes.as_ptr().add(at),
                    value.cast::<u8>(),
                    TRACEPARENT_COPY,
                );
            }
            // SAFETY: a field of the slot, read after the copy.
            if unsafe { core::ptr::read_volatile(&raw const scan.claim) } != claim {
                count_lost(lost::LINKS);
                return None;
            }
            // SAFETY: the caller's copy, just written.
            return Some(traceparent_sampled(unsafe { &*value }));
        }
        Out::Handoff(slot) => {
            // SAFETY: this CPU's hand-off slot (see `hand_off`); `at +
            // TRACEPARENT_COPY` is within `bytes`.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    scan.bytes.as_ptr().add(at),
                    (*slot).value.as_mut_ptr(),
                    TRACEPARENT_COPY,
                );
            }
            // SAFETY: a field of the slot, read after the copy.
            if unsafe { core::ptr::read_volatile(&raw const scan.claim) } != claim {
                count_lost(lost::LINKS);
                return None;
            }
            // SAFETY: as above.
            unsafe { (*slot).method = method };
            return Some(false);
        }
    };
    let Some(mut entry) = EVENTS.reserve::<LinkEvent>(0) else {
        count_lost(lost::LINKS);
        return None;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned LinkEvent-sized slot, every field
    // written before submit; `at + TRACEPARENT_COPY` is within `bytes`.
    unsafe {
        (*event).skaddr = sk;
        (*event).ts_ns = claim;
        core::ptr::copy_nonoverlapping(
            scan.bytes.as_ptr().add(at),
            (*event).value.as_mut_ptr(),
            TRACEPARENT_COPY,
        );
        (*event).method = method;
        (*event).direction = dir;
        (*event)._pad = [0; 6];
    }
    // SAFETY: a field of the slot, read after the copy.
    if unsafe { core::ptr::read_volatile(&raw const scan.claim) } != claim {
        // Another program wrote the slot meanwhile: the value may be its bytes.
        entry.discard(0);
        count_lost(lost::LINKS);
        return None;
    }
    // SAFETY: the event's copy, ours until submit.
    let sampled = traceparent_sampled(unsafe { &(*event).value });
    entry.submit(wakeup_flags());
    Some(sampled)
}

/// The search's state, shared with each call of [`search_word`].
#[repr(C)]
struct Search {
    scan: *mut Scan,
    /// Bytes loaded into `scan`.
    n: u32,
    /// Where the value starts, once the header is found (0 before).
    found: u32,
}

/// Looks at the headers' `index`th word for a line that starts with
/// `traceparent:`; 1 stops the search (found, past the headers or the bytes
/// loaded), 0 goes on.
#[inline(never)]
extern "C" fn search_word(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the `Search` on the caller's stack.
    let search = unsafe { &mut *ctx.cast::<Search>() };
    let base = index as usize * 8;
    if base >= SCAN_BYTES {
        return 1;
    }
    // SAFETY: the caller's per-CPU slot, valid for the whole loop.
    let bytes = unsafe { &(*search.scan).bytes };
    let n = search.n as usize;
    // SAFETY: base + 8 <= SCAN_BYTES, inside `bytes`.
    let word = unsafe { bytes.as_ptr().add(base).cast::<u64>().read_unaligned() };
    // Any '\n' in the word? (Zero bytes of word ^ "\n\n…"; a false hit is
    // checked byte by byte below.)
    let x = word ^ 0x0a0a_0a0a_0a0a_0a0a;
    if x.wrapping_sub(0x0101_0101_0101_0101) & !x & 0x8080_8080_8080_8080 == 0 {
        return 0;
    }
    let mut k = 0;
    while k < 8 {
        let at = base + k;
        if bytes[at] == b'\n' {
            if at + NEEDLE > n {
                return 1;
            }
            let next = bytes[at + 1];
            if next == b'\r' || next == b'\n' {
                // The blank line: the headers end here.
                return 1;
            }
            if next | 0x20 == b't' && is_traceparent(bytes, at + 1) {
                search.found = (at + NEEDLE) as u32;
                return 1;
            }
        }
        k += 1;
    }
    0
}

/// Whether `traceparent:` (any case) starts at `at`.
#[inline(always)]
fn is_traceparent(bytes: &[u8; SCAN_BYTES + SLACK], at: usize) -> bool {
    const NAME: &[u8; 12] = b"traceparent:";
    let mut j = 0;
    while j < NAME.len() {
        // Letters compare without case; `:` has the 0x20 bit set already.
        if bytes[at + j] | 0x20 != NAME[j] {
            return false;
        }
        j += 1;
    }
    true
}
