//! W3C `traceparent` values as the packet programs copied them, checked as W3C
//! Trace Context says: a request's trace context, the target of a span link.
use otel_tcpstates_common::{HTTP_METHODS, TRACEPARENT_COPY, direction};

/// Which end of the request the socket was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The socket sent the request (the client).
    Sent,
    /// The socket received it (the server).
    Received,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sent => "sent",
            Self::Received => "received",
        }
    }
}

/// One request's trace context, as the socket saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub trace_id: [u8; 16],
    /// The parent id of the header: the span that made the request.
    pub span_id: [u8; 8],
    /// The W3C trace flags (bit 0: sampled).
    pub trace_flags: u8,
    pub direction: Direction,
    /// 1-based index into [`HTTP_METHODS`].
    pub method: u8,
}

impl Link {
    pub fn method(&self) -> &'static str {
        method_name(self.method)
    }
}

/// The name of request method `method` (1-based index into [`HTTP_METHODS`]).
pub fn method_name(method: u8) -> &'static str {
    HTTP_METHODS
        .get(usize::from(method).wrapping_sub(1))
        .and_then(|name| std::str::from_utf8(name).ok())
        .unwrap_or("_OTHER")
}

/// A `traceparent` value as the kernel copied it, with the request's method and
/// direction; `None` unless the value is valid.
pub fn parse(value: &[u8; TRACEPARENT_COPY], method: u8, dir: u8) -> Option<Link> {
    // version "-" trace-id "-" parent-id "-" trace-flags
    let (version, rest) = value.split_at(2);
    let version = hex_byte(version)?;
    if version == 0xff {
        return None;
    }
    let (trace_id, span_id, trace_flags) = (&rest[1..33], &rest[34..50], &rest[51..53]);
    if rest[0] != b'-' || rest[33] != b'-' || rest[50] != b'-' {
        return None;
    }
    // Version 00 is exactly 55 characters; a later version may go on after a '-'.
    let after = value[55];
    let ended = matches!(after, b'\r' | b'\n' | b' ' | b'\t');
    if !(ended || (version > 0 && after == b'-')) {
        return None;
    }
    let mut link = Link {
        trace_id: [0; 16],
        span_id: [0; 8],
        trace_flags: hex_byte(trace_flags)?,
        direction: if dir == direction::SENT {
            Direction::Sent
        } else {
            Direction::Received
        },
        method,
    };
    for (out, pair) in link.trace_id.iter_mut().zip(trace_id.chunks(2)) {
        *out = hex_byte(pair)?;
    }
    for (out, pair) in link.span_id.iter_mut().zip(span_id.chunks(2)) {
        *out = hex_byte(pair)?;
    }
    if link.trace_id == [0; 16] || link.span_id == [0; 8] {
        return None;
    }
    Some(link)
}

/// Two lowercase hex digits (W3C Trace Context allows no uppercase).
fn hex_byte(pair: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(pair[0])? << 4 | digit(pair[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &[u8; 55] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn copied(value: &[u8], after: u8) -> [u8; TRACEPARENT_COPY] {
        let mut out = [after; TRACEPARENT_COPY];
        out[..value.len()].copy_from_slice(value);
        out
    }

    #[test]
    fn the_specs_example_parses() {
        let link = parse(&copied(VALID, b'\r'), 1, direction::SENT).unwrap();
        assert_eq!(link.trace_id[0], 0x4b);
        assert_eq!(link.trace_id[15], 0x36);
        assert_eq!(link.span_id, 0x00f0_67aa_0ba9_02b7u64.to_be_bytes());
        assert_eq!(link.trace_flags, 1);
        assert_eq!(link.direction, Direction::Sent);
        assert_eq!(link.method(), "GET");
        let link = parse(&copied(VALID, b' '), 3, direction::RECEIVED).unwrap();
        assert_eq!(
            (link.direction, link.method()),
            (Direction::Received, "POST")
        );
    }

    #[test]
    fn invalid_values_make_no_link() {
        let with = |at: usize, byte: u8| {
            let mut v = *VALID;
            v[at] = byte;
            v
        };
        // Uppercase hex, a non-hex digit, a misplaced dash.
        assert_eq!(parse(&copied(&with(3, b'B'), b'\r'), 1, 0), None);
        assert_eq!(parse(&copied(&with(40, b'g'), b'\r'), 1, 0), None);
        assert_eq!(parse(&copied(&with(35, b'0'), b'\r'), 1, 0), None);
        // Version ff, all-zero ids.
        assert_eq!(
            parse(&copied(&[b"ff", &VALID[2..]].concat(), b'\r'), 1, 0),
            None
        );
        let zero_trace = [&VALID[..3], &[b'0'; 32][..], &VALID[35..]].concat();
        assert_eq!(parse(&copied(&zero_trace, b'\r'), 1, 0), None);
        let zero_span = [&VALID[..36], &[b'0'; 16][..], &VALID[52..]].concat();
        assert_eq!(parse(&copied(&zero_span, b'\r'), 1, 0), None);
        // Version 00 longer than 55 characters.
        assert_eq!(parse(&copied(VALID, b'0'), 1, 0), None);
        assert_eq!(parse(&copied(VALID, b'-'), 1, 0), None);
        // A later version may carry more after a dash.
        let v01 = [b"01", &VALID[2..]].concat();
        assert!(parse(&copied(&v01, b'-'), 1, 0).is_some());
        assert_eq!(parse(&copied(&v01, b'x'), 1, 0), None);
    }
}
