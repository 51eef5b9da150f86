//! The span links of one socket: each distinct (trace id, parent id) its requests
//! carried, in order, for its `tcp.session` root.
use crate::kernel::traceparent::Link;

/// At most this many links per socket; more are counted, not kept.
pub const MAX_LINKS: usize = 64;

/// The links of one socket: distinct (trace id, span id), in the order seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Links {
    pub kept: Vec<Link>,
    /// Links past [`MAX_LINKS`] (OTLP's `dropped_links_count`): those not kept
    /// are not remembered, so one seen again counts again.
    pub dropped: u32,
}

impl Links {
    pub fn add(&mut self, link: Link) {
        let same = |l: &Link| l.trace_id == link.trace_id && l.span_id == link.span_id;
        if self.kept.iter().any(same) {
            return;
        }
        if self.kept.len() < MAX_LINKS {
            self.kept.push(link);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::traceparent::Direction;

    #[test]
    fn links_are_distinct_in_order_and_bounded() {
        let link = |n: u8| Link {
            trace_id: [n; 16],
            span_id: [n; 8],
            trace_flags: 1,
            direction: Direction::Sent,
            method: 1,
        };
        let mut links = Links::default();
        links.add(link(1));
        links.add(link(2));
        links.add(link(1));
        assert_eq!(links.kept, vec![link(1), link(2)]);
        for n in 3..=70 {
            links.add(link(n));
        }
        assert_eq!(links.kept.len(), MAX_LINKS);
        assert_eq!(links.kept[63], link(64));
        assert_eq!(links.dropped, 6);
        // A kept one seen again is not counted; a dropped one is not remembered.
        links.add(link(64));
        links.add(link(70));
        assert_eq!(links.dropped, 7);
    }
}
