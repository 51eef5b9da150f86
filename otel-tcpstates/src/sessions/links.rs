//! The span links of one socket: each distinct (trace id, parent id) its requests
//! carried, in order, for its `tcp.session` root.
use crate::kernel::traceparent::Link;

/// At most this many links per socket; more are counted, not kept.
pub const MAX_LINKS: usize = 64;
/// Room made for links at a time: a socket's list grows by this much, so it
/// wastes at most this many slots (doubling would waste up to half).
const GROW_BY: usize = 8;

/// The links of one socket: distinct (trace id, span id), in the order seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Links {
    pub kept: Vec<Link>,
    /// Links not kept (OTLP's `dropped_links_count`): past [`MAX_LINKS`], or
    /// past the session table's bound on all sockets' links. Those not kept are
    /// not remembered, so one seen again counts again.
    pub dropped: u32,
}

/// What became of a link offered to a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Added {
    /// Kept, taking `slots` more room for links (0 when there was room).
    Kept { slots: usize },
    /// The socket already has it.
    Known,
    /// Counted in [`Links::dropped`].
    NotKept,
}

impl Links {
    /// Keeps `link` if it is new, the socket has fewer than [`MAX_LINKS`] and
    /// it has room: a free slot, or `free` more (what the table's bound on all
    /// sockets' link slots has left).
    pub fn add(&mut self, link: Link, free: usize) -> Added {
        let same = |l: &Link| l.trace_id == link.trace_id && l.span_id == link.span_id;
        if self.kept.iter().any(same) {
            return Added::Known;
        }
        let (len, slots) = (self.kept.len(), self.kept.capacity());
        if len < MAX_LINKS && (len < slots || free > 0) {
            if len == slots {
                self.kept
                    .reserve_exact(GROW_BY.min(free).min(MAX_LINKS - len));
            }
            self.kept.push(link);
            Added::Kept {
                slots: self.kept.capacity() - slots,
            }
        } else {
            self.dropped = self.dropped.saturating_add(1);
            Added::NotKept
        }
    }

    /// Heap bytes the links take.
    pub fn heap_bytes(&self) -> usize {
        self.kept.capacity() * size_of::<Link>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::traceparent::Direction;

    fn link(n: u8) -> Link {
        Link {
            trace_id: [n; 16],
            span_id: [n; 8],
            trace_flags: 1,
            direction: Direction::Sent,
            method: 1,
        }
    }

    #[test]
    fn links_are_distinct_in_order_and_bounded() {
        let mut links = Links::default();
        assert_eq!(links.add(link(1), usize::MAX), Added::Kept { slots: 8 });
        assert_eq!(links.add(link(2), usize::MAX), Added::Kept { slots: 0 });
        assert_eq!(links.add(link(1), usize::MAX), Added::Known);
        assert_eq!(links.kept, vec![link(1), link(2)]);
        for n in 3..=70 {
            links.add(link(n), usize::MAX);
        }
        assert_eq!(links.kept.len(), MAX_LINKS);
        assert_eq!(links.kept[63], link(64));
        assert_eq!(links.dropped, 6);
        // A kept one seen again is not counted; a dropped one is not remembered.
        links.add(link(64), usize::MAX);
        assert_eq!(links.add(link(70), usize::MAX), Added::NotKept);
        assert_eq!(links.dropped, 7);
        // Grown by steps, not doubled: 64 links take 64 slots.
        assert_eq!(links.kept.capacity(), MAX_LINKS);
    }

    #[test]
    fn a_link_without_room_in_the_table_is_counted_not_kept() {
        let mut links = Links::default();
        // Room for 2: its slots grow by 2, not 8.
        assert_eq!(links.add(link(1), 2), Added::Kept { slots: 2 });
        assert_eq!(links.add(link(2), 0), Added::Kept { slots: 0 });
        assert_eq!(links.add(link(3), 0), Added::NotKept);
        assert_eq!((links.kept.len(), links.dropped), (2, 1));
        // Its own list is not the bound: a link it has is still known.
        assert_eq!(links.add(link(1), 0), Added::Known);
    }
}
