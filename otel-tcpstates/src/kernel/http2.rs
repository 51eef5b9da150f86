//! HTTP/2 header streams, as the kernel walks them ([`H2Event`]), turned into
//! the records HTTP/1.x requests make: a [`Record::Link`] per request that
//! carries a `traceparent`, and a [`Record::Answer`] when a sampled request's
//! stream is answered.
//!
//! The requests' side of each connection has its own HPACK decoder (RFC 7541):
//! a `traceparent` is a literal, Huffman-coded or not, its name a literal or
//! indexed in the dynamic table the earlier requests filled, so every header
//! block of the connection must be decoded in order. A block the kernel could
//! not deliver breaks the decoder: that side is given up and counted, never
//! guessed at. The answers' side needs no decoder: the kernel sends the header
//! of each HEADERS frame, and the stream it names is the answer.
//!
//! A TLS connection is known by its `SSL *` (and process) until the kernel
//! names its socket ([`h2_kind::BIND`]); the records it makes before that wait
//! for it, a few per connection.
use std::{borrow::Cow, num::NonZeroUsize};

use loona_hpack::Decoder;
use lru::LruCache;
use otel_tcpstates_common::{
    H2Event, HTTP_METHODS, TRACEPARENT_COPY, direction, h2_broken, h2_flag, h2_kind,
};

use super::{event::Record, traceparent};

/// Connections whose header streams are followed at once: each side's decoder
/// holds a dynamic table of up to [`TABLE_BYTES`] (4 KiB unless a peer says
/// more), so this bounds their memory to a few MiB.
const CONNECTIONS: usize = 1024;
/// The largest dynamic table a peer may ask a decoder for (RFC 7541, 4.2; the
/// HTTP/2 default is 4,096): more gives the side up.
const TABLE_BYTES: usize = 64 * 1024;
/// The largest frame kept whole (HTTP/2's default largest is 16 KiB): one
/// larger gives the side up.
const FRAME_BYTES: usize = 64 * 1024;
/// The largest header block decoded (a request's headers, its CONTINUATIONs
/// too): one larger gives the side up.
const BLOCK_BYTES: usize = 64 * 1024;
/// Records a TLS connection keeps while its socket is not known yet; more are
/// counted as not kept.
const HELD: usize = 16;
/// Sampled requests a connection has in flight, waiting for their answer.
const IN_FLIGHT: usize = 16;

/// RFC 9113, 6.2.
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// What the HTTP/2 decoding counted since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Http2Counts {
    /// Requests' sides given up here: a header block that did not decode (the
    /// kernel counts those it gives up itself).
    pub broken: u64,
    /// Records of a TLS connection whose socket was never named in time.
    pub not_kept: u64,
}

/// One side of a connection.
struct Side {
    requests: bool,
    /// Bytes of the side's stream not yet made into a whole frame.
    bytes: Vec<u8>,
    /// When the bytes at the front of `bytes` went through.
    front_ns: u64,
    /// A header block waiting for its CONTINUATION frames: its stream, the
    /// time of its first frame and the bytes so far.
    block: Option<(u32, u64, Vec<u8>)>,
    decoder: Option<Decoder<'static>>,
}

impl Side {
    fn new(requests: bool) -> Self {
        let decoder = requests.then(|| {
            let mut decoder = Decoder::new();
            decoder.set_max_allowed_table_size(TABLE_BYTES);
            decoder
        });
        Self {
            requests,
            bytes: Vec::new(),
            front_ns: 0,
            block: None,
            decoder,
        }
    }
}

#[derive(Default)]
struct Conn {
    sides: [Option<Side>; 2],
    /// Streams of sampled requests, waiting for their answers' HEADERS, with
    /// their parent ids: the answer ends that request's span, whatever the
    /// order the streams are answered in.
    in_flight: Vec<(u32, [u8; 8])>,
    /// A TLS connection's records made before its socket was named.
    held: Vec<Record>,
}

/// Every HTTP/2 connection the kernel walks.
pub struct Http2 {
    conns: LruCache<(u64, u32), Conn>,
    /// The socket of each TLS connection (`SSL *`, process) named so far.
    sockets: LruCache<(u64, u32), u64>,
    pub counts: Http2Counts,
}

impl Default for Http2 {
    fn default() -> Self {
        let bound = NonZeroUsize::new(CONNECTIONS).expect("a bound above zero");
        Self {
            conns: LruCache::new(bound),
            sockets: LruCache::new(bound),
            counts: Http2Counts::default(),
        }
    }
}

/// What a header block says of its request.
#[derive(Default)]
struct Request {
    traceparent: Option<[u8; TRACEPARENT_COPY]>,
    /// A `traceparent` too short to be one.
    invalid: bool,
    method: u8,
}

impl Http2 {
    /// Takes one record of the kernel's; `out` gets the records it makes.
    pub fn record(&mut self, event: &H2Event, mut out: impl FnMut(Record)) {
        let tls = event.flags & h2_flag::TLS != 0;
        let key = (event.conn, if tls { event.pid } else { u32::MAX });
        let side = usize::from(event.direction & 1);
        match event.kind {
            h2_kind::BIND => {
                self.sockets.put(key, event.skaddr);
                if let Some(conn) = self.conns.get_mut(&key) {
                    for mut record in conn.held.drain(..) {
                        set_socket(&mut record, event.skaddr);
                        out(record);
                    }
                }
            }
            h2_kind::BEGIN => {
                let conn = self.conns.get_or_insert_mut(key, Conn::default);
                let requests = event.flags & h2_flag::REQUESTS != 0;
                if requests {
                    conn.in_flight.clear();
                }
                conn.sides[side] = Some(Side::new(requests));
            }
            h2_kind::BROKEN => {
                if let Some(conn) = self.conns.get_mut(&key)
                    && let Some(gone) = conn.sides[side].take()
                    && gone.requests
                {
                    // Counted by the kernel (`LOST`), not here.
                    tracing::debug!(
                        "an HTTP/2 connection's requests given up by the kernel ({})",
                        match event.len {
                            h2_broken::GAP => "a gap in the stream",
                            h2_broken::STEPS => "more frames in a segment than a walk takes",
                            _ => "no room on the ring, or bytes not read",
                        }
                    );
                }
            }
            h2_kind::BYTES => {
                let socket = if tls {
                    self.sockets.get(&key).copied()
                } else {
                    Some(event.conn)
                };
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                let mut made = Vec::new();
                let broken = conn.bytes(event, side, &mut made);
                if broken {
                    conn.sides[side] = None;
                    self.counts.broken += 1;
                }
                for mut record in made {
                    match socket {
                        Some(sk) => {
                            set_socket(&mut record, sk);
                            out(record);
                        }
                        None if conn.held.len() < HELD => conn.held.push(record),
                        None => self.counts.not_kept += 1,
                    }
                }
            }
            _ => {}
        }
    }

    /// A socket closed: its plaintext connection is forgotten.
    pub fn closed(&mut self, skaddr: u64) {
        self.conns.pop(&(skaddr, u32::MAX));
    }
}

fn set_socket(record: &mut Record, sk: u64) {
    match record {
        Record::Link { skaddr, .. } | Record::Answer { skaddr, .. } => *skaddr = sk,
        _ => {}
    }
}

impl Conn {
    /// Bytes of side `side`'s stream: the records they make go to `made`
    /// (their socket left for the caller). Whether the side broke.
    fn bytes(&mut self, event: &H2Event, side: usize, made: &mut Vec<Record>) -> bool {
        let Some(s) = self.sides[side].as_mut() else {
            return false;
        };
        let data = &event.data[..usize::from(event.len).min(event.data.len())];
        if s.bytes.is_empty() {
            s.front_ns = event.ts_ns;
        }
        s.bytes.extend_from_slice(data);
        let dir = event.direction;
        loop {
            if s.bytes.len() < 9 {
                return false;
            }
            let header: [u8; 9] = s.bytes[..9].try_into().expect("9 bytes");
            let len =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            let (kind, flags) = (header[3], header[4]);
            let stream =
                u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
            let ts_ns = s.front_ns;
            if !s.requests {
                // The answers' side: frame headers only, each a stream answered.
                s.bytes.drain(..9);
                s.front_ns = event.ts_ns;
                if kind == HEADERS
                    && let Some(at) = self.in_flight.iter().position(|&(st, _)| st == stream)
                {
                    let (_, of) = self.in_flight.remove(at);
                    made.push(Record::Answer {
                        skaddr: 0,
                        ts_ns,
                        sent: dir == direction::SENT,
                        of: Some(of),
                    });
                }
                continue;
            }
            if len > FRAME_BYTES {
                return true;
            }
            if s.bytes.len() < 9 + len {
                return false;
            }
            let payload: Vec<u8> = s.bytes.drain(..9 + len).skip(9).collect();
            s.front_ns = event.ts_ns;
            let fragment = match kind {
                HEADERS => {
                    let Some(fragment) = headers_fragment(&payload, flags) else {
                        return true;
                    };
                    s.block = Some((stream, ts_ns, fragment.to_vec()));
                    true
                }
                CONTINUATION => match s.block.as_mut() {
                    Some((st, _, block)) if *st == stream => {
                        block.extend_from_slice(&payload);
                        true
                    }
                    _ => return true,
                },
                _ => false,
            };
            if !fragment {
                continue;
            }
            if s.block
                .as_ref()
                .is_some_and(|(_, _, b)| b.len() > BLOCK_BYTES)
            {
                return true;
            }
            if flags & END_HEADERS == 0 {
                continue;
            }
            let (stream, ts_ns, block) = s.block.take().expect("a block begun");
            let Some(decoder) = s.decoder.as_mut() else {
                return true;
            };
            let Some(request) = decode(decoder, &block) else {
                return true;
            };
            if let Some(record) = link(&request, ts_ns, dir) {
                if let Record::Link { link, .. } = &record
                    && link.trace_flags & 1 == 1
                {
                    if self.in_flight.len() >= IN_FLIGHT {
                        self.in_flight.remove(0);
                    }
                    self.in_flight.push((stream, link.span_id));
                }
                made.push(record);
            }
        }
    }
}

/// A HEADERS frame's header block fragment: its payload without the padding
/// and the priority fields.
fn headers_fragment(payload: &[u8], flags: u8) -> Option<&[u8]> {
    let mut fragment = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = fragment.split_first()?;
        fragment = rest.get(..rest.len().checked_sub(usize::from(pad))?)?;
    }
    if flags & PRIORITY != 0 {
        fragment = fragment.get(5..)?;
    }
    Some(fragment)
}

/// Decodes a request's header block: `None` when it does not decode (the
/// decoder is then of no more use).
fn decode(decoder: &mut Decoder<'static>, block: &[u8]) -> Option<Request> {
    let mut request = Request::default();
    decoder
        .decode_with_cb(block, |name: Cow<[u8]>, value: Cow<[u8]>| {
            if name.eq_ignore_ascii_case(b"traceparent") && request.traceparent.is_none() {
                let value = value.trim_ascii();
                if value.len() < TRACEPARENT_COPY - 1 {
                    request.invalid = true;
                    return;
                }
                let mut copy = [b'\r'; TRACEPARENT_COPY];
                let n = value.len().min(TRACEPARENT_COPY);
                copy[..n].copy_from_slice(&value[..n]);
                request.traceparent = Some(copy);
            } else if &*name == b":method" {
                request.method = HTTP_METHODS
                    .iter()
                    .position(|m| *m == &*value)
                    .map_or(0, |i| i as u8 + 1);
            }
        })
        .ok()?;
    Some(request)
}

/// The record a decoded request makes, if any.
fn link(request: &Request, ts_ns: u64, dir: u8) -> Option<Record> {
    if request.invalid {
        return Some(Record::InvalidTraceparent);
    }
    let value = request.traceparent.as_ref()?;
    Some(match traceparent::parse(value, request.method, dir) {
        Some(link) => Record::Link {
            skaddr: 0,
            ts_ns,
            link,
        },
        None => Record::InvalidTraceparent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use otel_tcpstates_common::H2_CHUNK;

    const SK: u64 = 0xffff_8880_0000_1000;
    /// Two requests' header blocks from the Python `hpack` encoder, Huffman
    /// coding on: `:method POST`, `:scheme http`, `:path
    /// /otel.test.Echo/Unary`, a `traceparent`, `content-type
    /// application/grpc`. The first names `traceparent` as a literal and adds
    /// it to the dynamic table; the second takes the name from there (`7f 00`).
    const FIRST: &str = "8386448f60e92d0ba4a84af80939d8e150ecf540884d83216b1d85a93fa7001600e575c6c2f85c248d33248f34d3c58c41091e03217c8b46e8e4723742e3e2032cb215801f5f8b1d75d0620d263d4c4d6564";
    const SECOND: &str = "8386c07f00a700166a395f14acb6ebb1b2d483706c90af89f9005015a7597160025038e8c608c6f8051bab001fbf";
    const FIRST_TP: ([u8; 16], [u8; 8]) = (
        [
            0x0a, 0xf7, 0x65, 0x19, 0x16, 0xcd, 0x43, 0xdd, 0x84, 0x48, 0xeb, 0x21, 0x1c, 0x80,
            0x31, 0x9c,
        ],
        [0xb7, 0xad, 0x6b, 0x71, 0x69, 0x20, 0x33, 0x31],
    );

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn event(conn: u64, dir: u8, kind: u8, flags: u8, data: &[u8]) -> H2Event {
        let mut event = H2Event {
            conn,
            ts_ns: 1_000,
            skaddr: 0,
            pid: if flags & h2_flag::TLS != 0 { 42 } else { 0 },
            len: data.len() as u16,
            direction: dir,
            kind,
            flags,
            _pad: [0; 7],
            data: [0; H2_CHUNK],
        };
        event.data[..data.len()].copy_from_slice(data);
        event
    }

    /// Feeds `bytes` as the kernel would, in records of at most `chunk` bytes.
    fn feed(
        h2: &mut Http2,
        conn: u64,
        dir: u8,
        flags: u8,
        bytes: &[u8],
        chunk: usize,
    ) -> Vec<Record> {
        let mut out = Vec::new();
        for piece in bytes.chunks(chunk) {
            h2.record(&event(conn, dir, h2_kind::BYTES, flags, piece), |r| {
                out.push(r)
            });
        }
        out
    }

    fn begin(h2: &mut Http2, conn: u64, dir: u8, flags: u8) {
        h2.record(&event(conn, dir, h2_kind::BEGIN, flags, &[]), |_| {
            panic!("a begin makes no record")
        });
    }

    fn links(records: &[Record]) -> Vec<(u64, traceparent::Link)> {
        records
            .iter()
            .filter_map(|r| match r {
                Record::Link { skaddr, link, .. } => Some((*skaddr, *link)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn huffman_values_and_a_name_from_the_dynamic_table_make_a_link_each() {
        let mut h2 = Http2::default();
        begin(&mut h2, SK, direction::SENT, h2_flag::REQUESTS);
        let mut stream = frame(HEADERS, END_HEADERS, 1, &hex(FIRST));
        stream.extend(frame(
            0x0,
            0x1,
            1,
            b"a DATA frame, stepped over by the kernel",
        ));
        stream.extend(frame(HEADERS, END_HEADERS, 3, &hex(SECOND)));
        // Records split anywhere, frame headers too.
        for chunk in [7, 9, 256] {
            let mut h2 = Http2::default();
            begin(&mut h2, SK, direction::SENT, h2_flag::REQUESTS);
            let only_headers: Vec<u8> = [
                frame(HEADERS, END_HEADERS, 1, &hex(FIRST)),
                frame(HEADERS, END_HEADERS, 3, &hex(SECOND)),
            ]
            .concat();
            let made = feed(
                &mut h2,
                SK,
                direction::SENT,
                h2_flag::REQUESTS,
                &only_headers,
                chunk,
            );
            let made = links(&made);
            assert_eq!(made.len(), 2, "chunks of {chunk}");
            assert_eq!(
                (made[0].1.trace_id, made[0].1.span_id, made[0].1.trace_flags),
                (FIRST_TP.0, FIRST_TP.1, 1)
            );
            assert_eq!(
                made[1].1.span_id,
                [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
            );
            assert_eq!(made[1].1.trace_flags, 0);
            // POST, on the socket itself.
            assert!(made.iter().all(|(sk, l)| *sk == SK && l.method() == "POST"));
        }
        // The kernel never sends a DATA frame on; had it, the decoder would
        // have stepped over it all the same.
        let made = feed(&mut h2, SK, direction::SENT, h2_flag::REQUESTS, &stream, 64);
        assert_eq!(links(&made).len(), 2);
        assert_eq!(h2.counts, Http2Counts::default());
    }

    #[test]
    fn padding_priority_and_continuation_are_taken_off_the_block() {
        let mut h2 = Http2::default();
        begin(&mut h2, SK, direction::RECEIVED, h2_flag::REQUESTS);
        let block = hex(FIRST);
        let (head, tail) = block.split_at(20);
        // PADDED (pad length 3) and PRIORITY (5 bytes), no END_HEADERS.
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 16]);
        payload.extend_from_slice(head);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut bytes = frame(HEADERS, PADDED | PRIORITY, 5, &payload);
        bytes.extend(frame(CONTINUATION, END_HEADERS, 5, tail));
        let made = feed(
            &mut h2,
            SK,
            direction::RECEIVED,
            h2_flag::REQUESTS,
            &bytes,
            256,
        );
        let made = links(&made);
        assert_eq!(made.len(), 1);
        assert_eq!((made[0].1.trace_id, made[0].1.span_id), FIRST_TP);
    }

    #[test]
    fn only_a_sampled_requests_own_stream_answers_it() {
        let mut h2 = Http2::default();
        begin(&mut h2, SK, direction::SENT, h2_flag::REQUESTS);
        begin(&mut h2, SK, direction::RECEIVED, 0);
        // Stream 1 sampled, stream 3 not.
        let requests = [
            frame(HEADERS, END_HEADERS, 1, &hex(FIRST)),
            frame(HEADERS, END_HEADERS, 3, &hex(SECOND)),
        ]
        .concat();
        assert_eq!(
            links(&feed(
                &mut h2,
                SK,
                direction::SENT,
                h2_flag::REQUESTS,
                &requests,
                256
            ))
            .len(),
            2
        );
        // The answers' side: frame headers only. Stream 3's answer, then 1's.
        let answers = [
            &frame(HEADERS, END_HEADERS, 3, &[])[..9],
            &frame(HEADERS, END_HEADERS, 1, &[])[..9],
        ]
        .concat();
        let made = feed(&mut h2, SK, direction::RECEIVED, 0, &answers, 256);
        assert_eq!(
            made,
            [Record::Answer {
                skaddr: SK,
                ts_ns: 1_000,
                sent: false,
                of: Some(FIRST_TP.1),
            }]
        );
        // A second HEADERS on stream 1 (trailers) answers nothing more.
        let made = feed(&mut h2, SK, direction::RECEIVED, 0, &answers[9..], 256);
        assert!(made.is_empty());
    }

    #[test]
    fn a_tls_connections_records_wait_for_its_socket() {
        let mut h2 = Http2::default();
        let ssl = 0x5555_0000_1234;
        let flags = h2_flag::REQUESTS | h2_flag::TLS;
        begin(&mut h2, ssl, direction::SENT, flags);
        let bytes = frame(HEADERS, END_HEADERS, 1, &hex(FIRST));
        assert!(feed(&mut h2, ssl, direction::SENT, flags, &bytes, 256).is_empty());
        let mut bind = event(ssl, direction::SENT, h2_kind::BIND, h2_flag::TLS, &[]);
        bind.skaddr = SK;
        let mut made = Vec::new();
        h2.record(&bind, |r| made.push(r));
        let made = links(&made);
        assert_eq!(made.len(), 1);
        assert_eq!((made[0].0, made[0].1.trace_id), (SK, FIRST_TP.0));
        // Later requests go to the socket at once.
        let bytes = frame(HEADERS, END_HEADERS, 3, &hex(SECOND));
        let made = feed(&mut h2, ssl, direction::SENT, flags, &bytes, 256);
        assert_eq!(links(&made)[0].0, SK);
        // The same `SSL *` in another process is another connection.
        let mut other = event(ssl, direction::SENT, h2_kind::BYTES, flags, &bytes);
        other.pid = 43;
        h2.record(&other, |_| panic!("no decoder for it"));
    }

    #[test]
    fn a_side_given_up_or_that_does_not_decode_makes_nothing_more_and_is_counted() {
        let mut h2 = Http2::default();
        begin(&mut h2, SK, direction::SENT, h2_flag::REQUESTS);
        // The kernel lost its place.
        h2.record(
            &event(SK, direction::SENT, h2_kind::BROKEN, h2_flag::REQUESTS, &[]),
            |_| panic!("nothing"),
        );
        let bytes = frame(HEADERS, END_HEADERS, 1, &hex(FIRST));
        assert!(feed(&mut h2, SK, direction::SENT, h2_flag::REQUESTS, &bytes, 256).is_empty());
        // The kernel counted that one (`LOST`).
        assert_eq!(h2.counts.broken, 0);
        // A block that starts mid-stream: its dynamic-table index means nothing
        // to a new decoder.
        begin(&mut h2, SK, direction::SENT, h2_flag::REQUESTS);
        let bytes = frame(HEADERS, END_HEADERS, 3, &hex(SECOND));
        assert!(feed(&mut h2, SK, direction::SENT, h2_flag::REQUESTS, &bytes, 256).is_empty());
        assert_eq!(h2.counts.broken, 1);
        let bytes = frame(HEADERS, END_HEADERS, 5, &hex(FIRST));
        assert!(feed(&mut h2, SK, direction::SENT, h2_flag::REQUESTS, &bytes, 256).is_empty());
    }

    #[test]
    fn a_traceparent_too_short_is_invalid_and_links_nothing() {
        let mut h2 = Http2::default();
        begin(&mut h2, SK, direction::SENT, h2_flag::REQUESTS);
        let mut encoder = loona_hpack::Encoder::new();
        let block = encoder.encode([(&b"traceparent"[..], &b"00-abc-01"[..])]);
        let bytes = frame(HEADERS, END_HEADERS, 1, &block);
        let made = feed(&mut h2, SK, direction::SENT, h2_flag::REQUESTS, &bytes, 256);
        assert_eq!(made, [Record::InvalidTraceparent]);
        // A block without one makes no record.
        let block = encoder.encode([(&b":method"[..], &b"GET"[..])]);
        let bytes = frame(HEADERS, END_HEADERS, 3, &block);
        assert!(feed(&mut h2, SK, direction::SENT, h2_flag::REQUESTS, &bytes, 256).is_empty());
    }
}
