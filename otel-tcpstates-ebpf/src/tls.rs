//! The TLS programs: uprobes on OpenSSL's `SSL_write`/`SSL_write_ex` and
//! `SSL_read`/`SSL_read_ex` find the `traceparent` of HTTP/1.x requests in the
//! plaintext, before encryption on the sending end and after decryption on the
//! receiving one, and queue it as a [`LinkEvent`] for the TCP socket that
//! carried the request, exactly as the packet programs do for plaintext.
//!
//! The socket is never taken from the TLS session: stacks that encrypt into
//! memory (Node's TLS, Python's asyncio) write the ciphertext later, from their
//! event loop, and read it before they decrypt. What holds there and with a
//! socket BIO alike is the thread:
//! - a request `SSL_write` took waits in [`TLS_SENDS`] for the thread's next
//!   send on a TCP socket (`sock:sock_send_length`): inside the call with a
//!   socket BIO, right after it from the same loop with a memory BIO;
//! - a thread that reads TLS has the TCP socket it last received from noted in
//!   [`TLS_LAST_RECV`] (`sock:sock_recv_length`): inside `SSL_read` with a
//!   socket BIO, just before it with a memory BIO.
//!
//! Bounded and never waiting: LRU maps per thread, the scan of the packet
//! programs (its first [`crate::http`] bytes, in their per-CPU scratch), one
//! lookup per send or receive of any thread, and a record that finds no
//! followed socket is counted in `LOST` as a TLS request unmatched.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, tracepoint, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};
use otel_tcpstates_common::{
    IPPROTO_TCP, LinkEvent, TRACEPARENT_COPY, direction, inspect, lost, traceparent_sampled,
};

use crate::{
    EVENTS, SOCKETS, count_lost, h2,
    http::{self, Out, User},
    wakeup_flags,
};

/// Threads a map follows at once: TLS threads in flight, not sockets.
const THREADS: u32 = 8192;

/// A request in plaintext given to `SSL_write`: in [`TLS_WRITES`] during the
/// call, then, when the library took it and no send carried it inside the call,
/// in [`TLS_SENDS`] until the thread's next TCP send.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingSend {
    value: [u8; TRACEPARENT_COPY],
    method: u8,
    /// A send inside the call carried it (a socket BIO): nothing left to wait.
    sent: u8,
    _pad: [u8; 6],
    /// For `SSL_write_ex`, where the count taken goes (0 for `SSL_write`,
    /// which returns it).
    written: u64,
}

/// Requests inside an `SSL_write` call, per thread.
#[map]
static TLS_WRITES: LruHashMap<u64, PendingSend> = LruHashMap::with_max_entries(THREADS, 0);

/// Requests taken by an `SSL_write` that returned before any send carried them
/// (a memory BIO), per thread.
#[map]
static TLS_SENDS: LruHashMap<u64, PendingSend> = LruHashMap::with_max_entries(THREADS, 0);

/// An `SSL_read` in progress on a thread: where the plaintext goes, and for
/// `SSL_read_ex` where the count does (0 for `SSL_read`, which returns it).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Call {
    ssl: u64,
    buf: u64,
    readbytes: u64,
}

#[map]
static TLS_READS: LruHashMap<u64, Call> = LruHashMap::with_max_entries(THREADS, 0);

/// The TCP socket each thread that reads TLS last received from (0: none yet).
/// Only threads that called `SSL_read` are here, so the receive tracepoint
/// writes nothing for any other thread.
#[map]
static TLS_LAST_RECV: LruHashMap<u64, u64> = LruHashMap::with_max_entries(THREADS, 0);

/// An `SSL_write` in progress on an HTTP/2 connection (or one that may begin
/// it): its plaintext is walked ([`h2`]) when it returns, and the first TCP
/// send inside it names the connection's socket.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct H2Write {
    ssl: u64,
    buf: u64,
    /// As in [`PendingSend`].
    written: u64,
    /// The socket of the first TCP send inside the call (0: none yet).
    sk: u64,
}

#[map]
static TLS_H2_WRITES: LruHashMap<u64, H2Write> = LruHashMap::with_max_entries(THREADS, 0);

/// An HTTP/2 connection whose `SSL_write` took plaintext and sent nothing (a
/// memory BIO): its socket is the thread's next TCP send's.
#[map]
static TLS_H2_BINDS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(THREADS, 0);

/// The first bytes of a buffer, for the method check.
#[inline(always)]
fn start_of(buf: u64, len: usize) -> Option<[u8; 8]> {
    if len < 8 {
        return None;
    }
    // SAFETY: the helper checks the user address; a failed read is None.
    unsafe { bpf_probe_read_user(buf as *const [u8; 8]) }.ok()
}

/// `SSL_write` begins with the plaintext `buf` of `len` bytes: the request it
/// starts, if any, is noted for the sends inside the call, or after it.
#[inline(always)]
fn write_begins(buf: u64, len: usize, written: u64) {
    let Some(start) = start_of(buf, len) else {
        return;
    };
    let method = http::method(&start);
    if method == 0 {
        return;
    }
    let mut pending = PendingSend {
        value: [0; TRACEPARENT_COPY],
        method,
        sent: 0,
        _pad: [0; 6],
        written,
    };
    if http::find_traceparent(
        User(buf as *const u8, len),
        method,
        Out::Value(&raw mut pending.value),
    )
    .is_some()
    {
        let tid = bpf_get_current_pid_tgid();
        if TLS_WRITES.insert(&tid, &pending, 0).is_err() {
            count_lost(lost::TLS);
        }
    }
}

// int SSL_write(SSL *ssl, const void *buf, int num)
#[uprobe]
pub fn ssl_write(ctx: ProbeContext) -> u32 {
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let num = ctx.arg::<u64>(2).unwrap_or(0) as i32;
    if buf != 0 && num > 0 {
        write_begins(buf, num as usize, 0);
        h2_write_begins(ctx.arg(0).unwrap_or(0), buf, num as u32, 0);
    }
    0
}

// int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written)
#[uprobe]
pub fn ssl_write_ex(ctx: ProbeContext) -> u32 {
    let buf: u64 = ctx.arg(1).unwrap_or(0);
    let num: u64 = ctx.arg(2).unwrap_or(0);
    if buf != 0 && num > 0 {
        let written = ctx.arg(3).unwrap_or(0);
        let num = num.min(u64::from(u32::MAX)) as u32;
        write_begins(buf, num as usize, written);
        h2_write_begins(ctx.arg(0).unwrap_or(0), buf, num, written);
    }
    0
}

/// `SSL_write` begins on connection `ssl`: noted when the connection is
/// HTTP/2, or its plaintext may begin it.
#[inline(always)]
fn h2_write_begins(ssl: u64, buf: u64, len: u32, written: u64) {
    let tid = bpf_get_current_pid_tgid();
    if ssl != 0 && h2::followed_or_starts(ssl, (tid >> 32) as u32, direction::SENT, buf, len) {
        let call = H2Write {
            ssl,
            buf,
            written,
            sk: 0,
        };
        if TLS_H2_WRITES.insert(&tid, &call, 0).is_err() {
            count_lost(lost::TLS);
        }
    }
}

/// `SSL_write` on an HTTP/2 connection returned `ret`: the plaintext it took
/// is walked, and the socket named, from inside the call or the thread's next
/// send.
#[inline(always)]
fn h2_write_ends(ret: i64) {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: plain values copied out of a successful lookup.
    let Some(call) = (unsafe { TLS_H2_WRITES.get(&tid) }).copied() else {
        return;
    };
    let _ = TLS_H2_WRITES.remove(&tid);
    let Some(taken) = count(call.written, ret) else {
        return;
    };
    let pid = (tid >> 32) as u32;
    let len = taken.min(u64::from(u32::MAX)) as u32;
    let Some(flow) = h2::plaintext(call.ssl, pid, direction::SENT, call.buf, len) else {
        return;
    };
    if call.sk != 0 {
        if followed(call.sk) {
            h2::bind(flow, call.ssl, pid, direction::SENT, call.sk);
        }
    } else if TLS_H2_BINDS.insert(&tid, &call.ssl, 0).is_err() {
        count_lost(lost::TLS);
    }
}

/// `SSL_write` returned `ret`: a request it took that no send carried yet
/// waits for the thread's next TCP send. One it did not take (the handshake
/// still going, as Node's first request on a connection meets it) waits for
/// nothing: the next send would be the handshake's.
#[inline(always)]
fn write_ends(ret: i64) {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: plain values copied out of a successful lookup.
    let Some(pending) = (unsafe { TLS_WRITES.get(&tid) }).copied() else {
        return;
    };
    let _ = TLS_WRITES.remove(&tid);
    let taken = if pending.written == 0 {
        ret > 0
    } else {
        ret == 1
    };
    if taken && pending.sent == 0 && TLS_SENDS.insert(&tid, &pending, 0).is_err() {
        count_lost(lost::TLS);
    }
}

#[uretprobe]
pub fn ssl_write_ret(ctx: RetProbeContext) -> u32 {
    let ret = i64::from(ctx.ret::<u64>() as i32);
    write_ends(ret);
    h2_write_ends(ret);
    0
}

#[uretprobe]
pub fn ssl_write_exret(ctx: RetProbeContext) -> u32 {
    let ret = i64::from(ctx.ret::<u64>() as i32);
    write_ends(ret);
    h2_write_ends(ret);
    0
}

/// The bytes a call that returned `ret` took or gave: its return value for
/// `SSL_write`/`SSL_read` (`at` 0), or what it wrote at `at` for their `_ex`
/// forms (which return 1); `None` when it failed.
#[inline(always)]
fn count(at: u64, ret: i64) -> Option<u64> {
    if at == 0 {
        return (ret > 0).then_some(ret as u64);
    }
    if ret != 1 {
        return None;
    }
    // SAFETY: the helper checks the user address.
    unsafe { bpf_probe_read_user(at as *const u64) }.ok()
}

/// The thread's call in `calls` returned `ret`: its buffer and how many bytes
/// it took or gave, when that is some.
#[inline(always)]
fn call_ended(calls: &LruHashMap<u64, Call>, ret: i64) -> Option<(u64, u64, usize)> {
    let tid = bpf_get_current_pid_tgid();
    // SAFETY: plain values copied out of a successful lookup.
    let call = (unsafe { calls.get(&tid) }).copied()?;
    let _ = calls.remove(&tid);
    let len = count(call.readbytes, ret)?;
    (call.buf != 0).then_some((call.ssl, call.buf, len.min(u64::from(u32::MAX)) as usize))
}

/// An `SSL_read` begins: the thread is one that reads TLS from now on.
#[inline(always)]
fn read_begins(ssl: u64, buf: u64, readbytes: u64) {
    let tid = bpf_get_current_pid_tgid();
    let _ = TLS_READS.insert(
        &tid,
        &Call {
            ssl,
            buf,
            readbytes,
        },
        0,
    );
    // SAFETY: a plain lookup; the value is not kept.
    if unsafe { TLS_LAST_RECV.get(&tid) }.is_none() {
        let _ = TLS_LAST_RECV.insert(&tid, &0, 0);
    }
}

// int SSL_read(SSL *ssl, void *buf, int num)
#[uprobe]
pub fn ssl_read(ctx: ProbeContext) -> u32 {
    read_begins(ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0), 0);
    0
}

// int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes)
#[uprobe]
pub fn ssl_read_ex(ctx: ProbeContext) -> u32 {
    read_begins(
        ctx.arg(0).unwrap_or(0),
        ctx.arg(1).unwrap_or(0),
        ctx.arg(3).unwrap_or(0),
    );
    0
}

/// `SSL_read` returned `ret`: the request its plaintext starts, if any, is
/// linked to the socket the thread last received from.
#[inline(always)]
fn read_ends(ret: i64) {
    let tid = bpf_get_current_pid_tgid();
    let Some((ssl, buf, len)) = call_ended(&TLS_READS, ret) else {
        return;
    };
    let pid = (tid >> 32) as u32;
    if let Some(flow) = h2::plaintext(ssl, pid, direction::RECEIVED, buf, len as u32) {
        // HTTP/2: the socket is the one the thread last received from.
        // SAFETY: plain value copied out of a successful lookup.
        let sk = unsafe { TLS_LAST_RECV.get(&tid) }.copied().unwrap_or(0);
        if followed(sk) {
            h2::bind(flow, ssl, pid, direction::RECEIVED, sk);
        }
        return;
    }
    let Some(start) = start_of(buf, len) else {
        return;
    };
    let method = http::method(&start);
    if method == 0 {
        return;
    }
    // SAFETY: plain value copied out of a successful lookup.
    let sk = unsafe { TLS_LAST_RECV.get(&tid) }.copied().unwrap_or(0);
    if !followed(sk) {
        count_lost(lost::TLS);
        return;
    }
    let out = Out::Ring {
        sk,
        dir: direction::RECEIVED,
    };
    if http::find_traceparent(User(buf as *const u8, len), method, out) == Some(true) {
        // A sampled request: its answer is the next payload the socket sends.
        expect_answer(sk, direction::SENT);
    }
}

#[uretprobe]
pub fn ssl_read_ret(ctx: RetProbeContext) -> u32 {
    read_ends(i64::from(ctx.ret::<u64>() as i32));
    0
}

#[uretprobe]
pub fn ssl_read_exret(ctx: RetProbeContext) -> u32 {
    read_ends(i64::from(ctx.ret::<u64>() as i32));
    0
}

/// Whether the state program follows socket `sk` and its owner passes the filter.
#[inline(always)]
fn followed(sk: u64) -> bool {
    if sk == 0 {
        return false;
    }
    // SAFETY: plain values copied out of a successful lookup.
    match unsafe { SOCKETS.get(&sk) } {
        Some(state) => http::owner_wanted(state.owner_pid),
        None => false,
    }
}

/// Sets the answer bit of direction `dir` on socket `sk`: its next payload
/// that way is queued as the answer (by the packet programs, when attached).
#[inline(always)]
fn expect_answer(sk: u64, dir: u8) {
    if let Some(state) = SOCKETS.get_ptr_mut(&sk) {
        // SAFETY: a value of the map, from a successful lookup; as the packet
        // programs set it.
        unsafe { (*state).inspect |= inspect::ANSWER << inspect::shift(dir) };
    }
}

/// The record `sock:sock_send_length` and `sock:sock_recv_length` share: the
/// socket at 8, its protocol at 18, the length (or error) at 20.
#[inline(always)]
fn sock_record(ctx: &TracePointContext) -> Option<u64> {
    // SAFETY: userspace checked the format file for these fields at these offsets.
    let (sk, protocol, ret) = unsafe {
        let base = ctx.as_ptr().cast::<u8>();
        (
            core::ptr::read_volatile(base.add(8).cast::<u64>()),
            core::ptr::read_volatile(base.add(18).cast::<u16>()),
            core::ptr::read_volatile(base.add(20).cast::<i32>()),
        )
    };
    (protocol == IPPROTO_TCP && ret > 0 && sk != 0).then_some(sk)
}

/// A thread sent on a socket: the request its last `SSL_write` took, if one
/// waits, went out on it.
#[tracepoint]
pub fn tls_sent(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    h2_sent(&ctx, tid);
    // Inside an `SSL_write` (a socket BIO), or after one (a memory BIO).
    let (pending, inside) = match TLS_WRITES.get_ptr_mut(&tid) {
        // SAFETY: this thread's entry, written only by this thread.
        Some(call) if unsafe { (*call).sent } == 0 => (unsafe { *call }, Some(call)),
        Some(_) => return 0,
        // SAFETY: plain values copied out of a successful lookup.
        None => match unsafe { TLS_SENDS.get(&tid) } {
            Some(pending) => (*pending, None),
            None => return 0,
        },
    };
    let Some(sk) = sock_record(&ctx) else {
        return 0;
    };
    match inside {
        // SAFETY: as above.
        Some(call) => unsafe { (*call).sent = 1 },
        None => {
            let _ = TLS_SENDS.remove(&tid);
        }
    }
    if !followed(sk) {
        count_lost(lost::TLS);
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<LinkEvent>(0) else {
        count_lost(lost::LINKS);
        return 0;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: a reserved, exclusively owned LinkEvent-sized slot, every field
    // written before submit.
    unsafe {
        (*event).skaddr = sk;
        (*event).ts_ns = bpf_ktime_get_ns();
        (*event).value = pending.value;
        (*event).method = pending.method;
        (*event).direction = direction::SENT;
        (*event)._pad = [0; 6];
    }
    entry.submit(wakeup_flags());
    if traceparent_sampled(&pending.value) {
        expect_answer(sk, direction::RECEIVED);
    }
    0
}

/// A thread sent on a socket: it names the socket of the HTTP/2 connection
/// whose `SSL_write` is in progress, or took plaintext and sent nothing.
#[inline(always)]
fn h2_sent(ctx: &TracePointContext, tid: u64) {
    if let Some(call) = TLS_H2_WRITES.get_ptr_mut(&tid) {
        // SAFETY: this thread's entry, written only by this thread.
        if unsafe { (*call).sk } == 0
            && let Some(sk) = sock_record(ctx)
        {
            // SAFETY: as above.
            unsafe { (*call).sk = sk };
        }
        return;
    }
    // SAFETY: plain value copied out of a successful lookup.
    let Some(ssl) = (unsafe { TLS_H2_BINDS.get(&tid) }).copied() else {
        return;
    };
    let Some(sk) = sock_record(ctx) else {
        return;
    };
    let _ = TLS_H2_BINDS.remove(&tid);
    let pid = (tid >> 32) as u32;
    if followed(sk)
        && let Some(flow) = h2::tls_flow(ssl, pid, direction::SENT)
    {
        h2::bind(flow, ssl, pid, direction::SENT, sk);
    }
}

/// A thread received from a socket: noted when the thread reads TLS.
#[tracepoint]
pub fn tls_received(ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid();
    let Some(last) = TLS_LAST_RECV.get_ptr_mut(&tid) else {
        return 0;
    };
    if let Some(sk) = sock_record(&ctx) {
        // SAFETY: this thread's entry, written only by this thread.
        unsafe { *last = sk };
    }
    0
}
