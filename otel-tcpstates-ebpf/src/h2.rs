//! HTTP/2: walks the frames of each direction of an HTTP/2 connection and
//! queues the bytes userspace needs to read each request's `traceparent` out
//! of HPACK ([`H2Event`]): every HEADERS and CONTINUATION frame of the side
//! that sends the requests, and the 9-byte header of each HEADERS frame of the
//! side that answers (which stream was answered, when). Everything else (DATA
//! above all) is stepped over by its length, never read.
//!
//! Two sources feed it: the packet programs for plaintext `h2c` (a direction's
//! place is a TCP sequence number, so a retransmission is stepped over and a
//! gap gives the direction up), and the TLS programs for the plaintext of
//! `SSL_write`/`SSL_read` (a direction's place is the byte count of its calls).
//! A direction begins with the client's preface (the requests' side) or, on
//! the other side, with a first payload that is a SETTINGS frame (a server's
//! first frame must be one, RFC 9113, 3.4).
//!
//! Bounded and never waiting: an LRU map of the directions followed, a bounded
//! loop per segment or call, and any record the ring has no room for gives the
//! direction up and is counted (`LOST`, its own slot).
use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_probe_read_user, bpf_skb_load_bytes},
    },
    macros::map,
    maps::LruHashMap,
};
use otel_tcpstates_common::{
    H2_CHUNK, H2_PREFACE, H2_SMALL, H2Record, h2_broken, h2_flag, h2_kind, lost,
};

use crate::{EVENTS, count_lost, wakeup_flags};

/// HTTP/2 directions followed at once (two a connection).
const FLOWS: u32 = 16384;
/// Steps at most per segment or call: a frame header, or a piece of a frame's
/// payload, each. A segment of more frames than half this loses the direction.
const STEPS: u32 = 4096;
/// RFC 9113, 6: the frame types read.
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const CONTINUATION: u8 = 0x9;
const FRAME_HEADER: u32 = 9;
/// Payload bytes the record of a requests' side frame header carries with it
/// (a power of two, at most [`H2_CHUNK`] - 9).
const FIRST_PAYLOAD: u32 = 128;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    /// A socket, or an `SSL *` with its process in `pid`.
    conn: u64,
    pid: u32,
    dir: u32,
}

/// Where the walk of one direction is.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flow {
    /// Packets: the TCP sequence number of the next byte to walk (past a
    /// segment, the next frame header's when a frame not read goes on).
    next: u32,
    /// Bytes of the current frame's payload still to come (0: a frame header
    /// comes next).
    left: u32,
    /// Bytes of the next frame header already in `hdr` (one split between two
    /// segments or calls).
    have: u32,
    /// The current frame's payload goes to userspace.
    ship: u8,
    /// [`h2_flag`] bits of the records.
    flags: u8,
    /// TLS: the socket was named to userspace ([`h2_kind::BIND`]).
    pub bound: u8,
    /// The walk in progress lost its place (the direction is given up).
    lost: u8,
    /// The walk in progress: its place in the segment or call, and the end.
    /// Here and not on the stack: a map value's numbers are unknown to the
    /// verifier, so the loop's states converge at once, where exact ones on
    /// the stack made it follow each step.
    pos: u32,
    end: u32,
    /// Room for a header at any `have` below 8 (the verifier checks the
    /// largest offset and length).
    hdr: [u8; 24],
}

#[map]
static H2_FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(FLOWS, 0);

/// Where a walk reads its bytes. Two implementations, so that each program
/// gets only its own helper (a `cgroup_skb` program may not read user memory).
trait Bytes {
    /// Copies `n` (1 to 16, or 1 to [`H2_CHUNK`]) bytes at `at` of the
    /// walked range to `to`.
    fn read(&self, at: u32, to: *mut u8, n: u32) -> bool;
}

/// A segment's payload, from this packet offset on.
#[derive(Clone, Copy)]
struct Segment {
    skb: *mut __sk_buff,
    base: u32,
}

impl Bytes for Segment {
    #[inline(always)]
    fn read(&self, at: u32, to: *mut u8, n: u32) -> bool {
        // SAFETY: the caller bounds `n` to its buffer; the helper checks the
        // packet's bounds.
        unsafe { bpf_skb_load_bytes(self.skb.cast(), self.base + at, to.cast(), n) == 0 }
    }
}

/// A process's plaintext buffer.
#[derive(Clone, Copy)]
struct Plain {
    buf: u64,
}

impl Bytes for Plain {
    #[inline(always)]
    fn read(&self, at: u32, to: *mut u8, n: u32) -> bool {
        // SAFETY: the caller bounds `n` to its buffer; the helper checks the
        // user address.
        unsafe {
            bpf_probe_read_user(to.cast(), n, (self.buf + u64::from(at)) as *const c_void) == 0
        }
    }
}

/// A walk's context, shared with each step (its progress is in the flow).
#[repr(C)]
struct Walk<B> {
    bytes: B,
    flow: *mut Flow,
    key: FlowKey,
    ts_ns: u64,
}

/// Opens a record of the direction `key`, its fields but `data` written.
#[inline(always)]
fn record<const N: usize>(
    key: &FlowKey,
    kind: u8,
    flags: u8,
    ts_ns: u64,
    len: u16,
) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<H2Record<N>>> {
    let mut entry = EVENTS.reserve::<H2Record<N>>(0)?;
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned record-sized slot; the caller
    // writes `data` (or leaves it: the reader looks at `len` bytes only).
    unsafe {
        (*event).conn = key.conn;
        (*event).ts_ns = ts_ns;
        (*event).skaddr = 0;
        (*event).pid = key.pid;
        (*event).len = len;
        (*event).direction = key.dir as u8;
        (*event).kind = kind;
        (*event).flags = flags;
        (*event)._pad = [0; 7];
    }
    Some(entry)
}

/// Queues a record without data: a direction that begins or is given up
/// (`len`: why).
#[inline(always)]
fn mark(key: &FlowKey, kind: u8, flags: u8, len: u16) -> bool {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match record::<H2_SMALL>(key, kind, flags, now, len) {
        Some(entry) => {
            entry.submit(wakeup_flags());
            true
        }
        None => {
            count_lost(lost::H2);
            false
        }
    }
}

/// One step of a walk: a frame header, or a piece of a frame's payload. 1
/// stops (the bytes are walked, or the direction is lost), 0 goes on.
#[inline(always)]
fn step<B: Bytes>(walk: &mut Walk<B>) -> i64 {
    // SAFETY: the walk's flow, a value of the map looked up by its caller.
    let flow = unsafe { &mut *walk.flow };
    if flow.pos >= flow.end {
        return 1;
    }
    let avail = flow.end - flow.pos;
    if flow.left > 0 {
        let mut take = if flow.left < avail { flow.left } else { avail };
        if flow.ship != 0 {
            if take > H2_CHUNK as u32 {
                take = H2_CHUNK as u32;
            }
            let Some(mut entry) =
                record::<H2_CHUNK>(&walk.key, h2_kind::BYTES, flow.flags, walk.ts_ns, 0)
            else {
                flow.lost = 1;
                return 1;
            };
            let event = entry.as_mut_ptr();
            // The same `take`, bounded for the verifier to 1..=H2_CHUNK.
            let n = ((take - 1) & (H2_CHUNK as u32 - 1)) + 1;
            // SAFETY: `n` bytes fit in `data`.
            let ok = walk
                .bytes
                .read(flow.pos, unsafe { (*event).data.as_mut_ptr() }, n);
            if !ok {
                entry.discard(0);
                flow.lost = 1;
                return 1;
            }
            // SAFETY: as above.
            unsafe { (*event).len = n as u16 };
            entry.submit(wakeup_flags());
            take = n;
        }
        flow.pos += take;
        flow.left -= take;
        return 0;
    }
    let have = flow.have & 7;
    let need = FRAME_HEADER - have;
    let n = if need < avail { need } else { avail };
    // Bounded for the verifier: `have` < 8 and `n` <= 16 stay inside `hdr`.
    let n_read = ((n - 1) & 15) + 1;
    // SAFETY: `have + n_read` <= 23 < 24.
    let to = unsafe { flow.hdr.as_mut_ptr().add(have as usize) };
    if !walk.bytes.read(flow.pos, to, n_read) {
        flow.lost = 1;
        return 1;
    }
    flow.pos += n;
    if n < need {
        // The rest of the header comes with the next segment or call.
        flow.have = have + n;
        return 1;
    }
    flow.have = 0;
    let hdr = flow.hdr;
    let len = (u32::from(hdr[0]) << 16) | (u32::from(hdr[1]) << 8) | u32::from(hdr[2]);
    let kind = hdr[3];
    let requests = flow.flags & h2_flag::REQUESTS != 0;
    let wanted = kind == HEADERS || (requests && kind == CONTINUATION);
    flow.left = len;
    flow.ship = u8::from(requests && wanted);
    if !wanted {
        return 0;
    }
    if !requests {
        // The answers' side: the frame header alone, in a small record.
        let Some(mut entry) = record::<H2_SMALL>(
            &walk.key,
            h2_kind::BYTES,
            flow.flags,
            walk.ts_ns,
            FRAME_HEADER as u16,
        ) else {
            flow.lost = 1;
            return 1;
        };
        let event = entry.as_mut_ptr();
        // SAFETY: 9 of `data`'s 16 bytes, from the header just read.
        unsafe {
            core::ptr::copy_nonoverlapping(hdr.as_ptr(), (*event).data.as_mut_ptr(), 9);
        }
        entry.submit(wakeup_flags());
        return 0;
    }
    // The requests' side: the header and as much of its payload as this
    // segment or call holds, up to [`FIRST_PAYLOAD`], in one record (most
    // requests' header blocks after a connection's first fit).
    let Some(mut entry) = record::<H2_CHUNK>(&walk.key, h2_kind::BYTES, flow.flags, walk.ts_ns, 0)
    else {
        flow.lost = 1;
        return 1;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: 9 of `data`'s bytes, from the header just read.
    unsafe {
        core::ptr::copy_nonoverlapping(hdr.as_ptr(), (*event).data.as_mut_ptr(), 9);
    }
    let rest = flow.end - flow.pos;
    let mut take = if len < rest { len } else { rest };
    if take > FIRST_PAYLOAD {
        take = FIRST_PAYLOAD;
    }
    if take > 0 {
        // Bounded for the verifier to 1..=FIRST_PAYLOAD (the same `take`).
        let n = ((take - 1) & (FIRST_PAYLOAD - 1)) + 1;
        // SAFETY: 9 + n <= 9 + FIRST_PAYLOAD bytes of `data`.
        let to = unsafe { (*event).data.as_mut_ptr().add(9) };
        if !walk.bytes.read(flow.pos, to, n) {
            entry.discard(0);
            flow.lost = 1;
            return 1;
        }
        take = n;
    }
    // SAFETY: as above.
    unsafe { (*event).len = (9 + take) as u16 };
    entry.submit(wakeup_flags());
    flow.pos += take;
    flow.left -= take;
    0
}

#[inline(never)]
extern "C" fn step_segment(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the walk on the caller's stack.
    step(unsafe { &mut *ctx.cast::<Walk<Segment>>() })
}

#[inline(never)]
extern "C" fn step_plain(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the walk on the caller's stack.
    step(unsafe { &mut *ctx.cast::<Walk<Plain>>() })
}

/// Whether the 9 bytes at the start of a direction are a server's first
/// SETTINGS frame: stream 0, no ACK, a length of whole settings.
#[inline(always)]
fn settings_first(start: &[u8; 9]) -> bool {
    let len = (u32::from(start[0]) << 16) | (u32::from(start[1]) << 8) | u32::from(start[2]);
    start[3] == SETTINGS
        && start[4] == 0
        && start[5] == 0
        && start[6] == 0
        && start[7] == 0
        && start[8] == 0
        && len % 6 == 0
        && len <= 16 * 6
}

/// Starts following a direction: `REQUESTS` in `flags` when it began with the
/// preface. Its old flow, if any (a connection that reused the address), is
/// replaced. The userspace decoder starts anew on the record queued.
#[inline(always)]
fn begin(key: &FlowKey, flags: u8, next: u32) -> Option<*mut Flow> {
    let flow = Flow {
        next,
        left: 0,
        have: 0,
        ship: 0,
        flags,
        bound: 0,
        lost: 0,
        pos: 0,
        end: 0,
        hdr: [0; 24],
    };
    if H2_FLOWS.insert(key, &flow, 0).is_err() {
        count_lost(lost::H2);
        return None;
    }
    if !mark(key, h2_kind::BEGIN, flags, 0) {
        let _ = H2_FLOWS.remove(key);
        return None;
    }
    H2_FLOWS.get_ptr_mut(key)
}

/// Gives a direction up (`why`: [`h2_broken`]): userspace drops its decoder.
#[inline(always)]
fn give_up(key: &FlowKey, flags: u8, why: u16) {
    let _ = H2_FLOWS.remove(key);
    count_lost(lost::H2);
    let _ = mark(key, h2_kind::BROKEN, flags, why);
}

/// Why a walk that stopped short of its end did.
#[inline(always)]
fn stopped(flow: *mut Flow) -> Option<u16> {
    // SAFETY: a value of the map, from a successful lookup.
    unsafe {
        if (*flow).lost != 0 {
            Some(h2_broken::LOST)
        } else if (*flow).pos < (*flow).end {
            Some(h2_broken::STEPS)
        } else {
            None
        }
    }
}

/// What a direction's first payload says about HTTP/2.
pub(crate) enum Start {
    /// Not HTTP/2.
    No,
    /// The client's preface: the requests' side; its frames begin after it.
    Preface,
    /// A server's first SETTINGS frame: the answers' side, from here.
    Settings,
}

/// Tells a direction's first bytes: the 24 of the preface or the 9 of a
/// SETTINGS frame header, read by `read` (offset, buffer).
#[inline(always)]
fn start_of(first: &[u8; 9], mut read: impl FnMut(&mut [u8; 24]) -> bool) -> Start {
    if first[..8] == H2_PREFACE[..8] {
        let mut preface = [0u8; 24];
        if read(&mut preface) && preface == *H2_PREFACE {
            return Start::Preface;
        }
        return Start::No;
    }
    if settings_first(first) {
        Start::Settings
    } else {
        Start::No
    }
}

// ---------------------------------------------------------------- packets --

/// A segment's payload start: its first 9 bytes (`None` when shorter).
#[inline(always)]
fn segment_start(skb: *mut __sk_buff, payload: u32) -> Option<[u8; 9]> {
    let mut first = [0u8; 9];
    let segment = Segment { skb, base: payload };
    segment.read(0, first.as_mut_ptr(), 9).then_some(first)
}

/// The first payload of a direction of socket `sk`, at `seq`: whether it
/// starts HTTP/2 (and then the direction is followed from it on).
#[inline(always)]
pub(crate) fn segment_begins(
    skb: *mut __sk_buff,
    sk: u64,
    dir: u8,
    payload: u32,
    seq: u32,
    seg_len: u32,
) -> bool {
    let Some(first) = segment_start(skb, payload) else {
        return false;
    };
    let segment = Segment { skb, base: payload };
    let start = start_of(&first, |to| segment.read(0, to.as_mut_ptr(), 24));
    let (flags, skip) = match start {
        Start::No => return false,
        Start::Preface => (h2_flag::REQUESTS, H2_PREFACE.len() as u32),
        Start::Settings => (0, 0),
    };
    let key = FlowKey {
        conn: sk,
        pid: 0,
        dir: u32::from(dir),
    };
    let Some(flow) = begin(&key, flags, seq.wrapping_add(skip)) else {
        return true;
    };
    walk_segment(skb, key, flow, payload, seq, seg_len);
    true
}

/// A later segment of a direction of socket `sk` that is followed.
#[inline(always)]
pub(crate) fn segment(skb: *mut __sk_buff, sk: u64, dir: u8, payload: u32, seq: u32, seg_len: u32) {
    let key = FlowKey {
        conn: sk,
        pid: 0,
        dir: u32::from(dir),
    };
    let Some(flow) = H2_FLOWS.get_ptr_mut(&key) else {
        return;
    };
    walk_segment(skb, key, flow, payload, seq, seg_len);
}

#[inline(always)]
fn walk_segment(
    skb: *mut __sk_buff,
    key: FlowKey,
    flow: *mut Flow,
    payload: u32,
    seq: u32,
    seg_len: u32,
) {
    // SAFETY: a value of the map, from a successful lookup.
    let (next, flags) = unsafe { ((*flow).next, (*flow).flags) };
    let off = next.wrapping_sub(seq) as i32;
    if off < 0 {
        // Bytes before this segment never came by: the place is lost.
        give_up(&key, flags, h2_broken::GAP);
        return;
    }
    if off as u32 >= seg_len {
        // Walked already (a retransmission).
        return;
    }
    // SAFETY: helper without arguments.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    unsafe {
        (*flow).pos = off as u32;
        (*flow).end = seg_len;
        (*flow).lost = 0;
    }
    let mut walk = Walk {
        bytes: Segment { skb, base: payload },
        flow,
        key,
        ts_ns,
    };
    // SAFETY: the callback and its context are what bpf_loop expects; `walk`
    // outlives the call.
    unsafe {
        bpf_loop(
            STEPS,
            step_segment as *mut c_void,
            (&raw mut walk).cast(),
            0,
        )
    };
    if let Some(why) = stopped(flow) {
        give_up(&key, flags, why);
        return;
    }
    // SAFETY: as above.
    unsafe {
        let mut next = seq.wrapping_add(seg_len);
        if (*flow).ship == 0 {
            // Mid-way through a payload not read (DATA): the place is the next
            // frame header's, so the segments before it may come in any order
            // (on receive, two CPUs may hand over a connection's segments out
            // of order) and are stepped over as walked already.
            next = next.wrapping_add((*flow).left);
            (*flow).left = 0;
        }
        (*flow).next = next;
    }
}

// --------------------------------------------------------------- TLS calls --

/// The plaintext `buf` of `len` bytes an `SSL_write` took or an `SSL_read`
/// gave on connection `ssl` of process `pid`: walked when the direction is
/// HTTP/2. The direction's flow, when it is followed.
#[inline(always)]
pub(crate) fn plaintext(ssl: u64, pid: u32, dir: u8, buf: u64, len: u32) -> Option<*mut Flow> {
    let key = FlowKey {
        conn: ssl,
        pid,
        dir: u32::from(dir),
    };
    let plain = Plain { buf };
    let mut first = [0u8; 9];
    let known = H2_FLOWS.get_ptr_mut(&key);
    let mut skip = 0;
    let flow = if len >= 9 && plain.read(0, first.as_mut_ptr(), 9) {
        let start = start_of(&first, |to| len >= 24 && plain.read(0, to.as_mut_ptr(), 24));
        match (start, known) {
            // A preface always begins anew (an `SSL *` reused).
            (Start::Preface, _) => {
                skip = H2_PREFACE.len() as u32;
                begin(&key, h2_flag::REQUESTS | h2_flag::TLS, 0)?
            }
            (_, Some(flow)) => flow,
            (Start::Settings, None) => begin(&key, h2_flag::TLS, 0)?,
            (Start::No, None) => return None,
        }
    } else {
        known?
    };
    // SAFETY: a value of the map, from a successful lookup.
    let flags = unsafe { (*flow).flags };
    // SAFETY: helper without arguments.
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    // SAFETY: as above.
    unsafe {
        (*flow).pos = skip;
        (*flow).end = len;
        (*flow).lost = 0;
    }
    let mut walk = Walk {
        bytes: plain,
        flow,
        key,
        ts_ns,
    };
    // SAFETY: as for a segment.
    unsafe { bpf_loop(STEPS, step_plain as *mut c_void, (&raw mut walk).cast(), 0) };
    if let Some(why) = stopped(flow) {
        give_up(&key, flags, why);
        return None;
    }
    Some(flow)
}

/// Whether connection `ssl` of process `pid` is followed as HTTP/2 the way
/// `dir`, or its plaintext `buf` of `len` bytes may begin it.
#[inline(always)]
pub(crate) fn followed_or_starts(ssl: u64, pid: u32, dir: u8, buf: u64, len: u32) -> bool {
    let key = FlowKey {
        conn: ssl,
        pid,
        dir: u32::from(dir),
    };
    if H2_FLOWS.get_ptr_mut(&key).is_some() {
        return true;
    }
    let mut first = [0u8; 9];
    len >= 9
        && (Plain { buf }).read(0, first.as_mut_ptr(), 9)
        && (first[..8] == H2_PREFACE[..8] || settings_first(&first))
}

/// Names the socket `sk` of TLS connection `ssl` of process `pid` to
/// userspace, once per flow (`flow`, of one of its directions).
#[inline(always)]
pub(crate) fn bind(flow: *mut Flow, ssl: u64, pid: u32, dir: u8, sk: u64) {
    // SAFETY: a value of the map, from a successful lookup.
    if unsafe { (*flow).bound } != 0 {
        return;
    }
    let key = FlowKey {
        conn: ssl,
        pid,
        dir: u32::from(dir),
    };
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut entry) = record::<H2_SMALL>(&key, h2_kind::BIND, h2_flag::TLS, now, 0) else {
        count_lost(lost::H2);
        return;
    };
    // SAFETY: the reserved slot; the flow as above.
    unsafe {
        (*entry.as_mut_ptr()).skaddr = sk;
        (*flow).bound = 1;
    }
    entry.submit(wakeup_flags());
}

/// The flow of direction `dir` of TLS connection `ssl` of process `pid`.
#[inline(always)]
pub(crate) fn tls_flow(ssl: u64, pid: u32, dir: u8) -> Option<*mut Flow> {
    H2_FLOWS.get_ptr_mut(&FlowKey {
        conn: ssl,
        pid,
        dir: u32::from(dir),
    })
}
