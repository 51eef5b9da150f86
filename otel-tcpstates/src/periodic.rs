//! The main loop's periodic work (lost-event reports, the stats line, the clock
//! resync), due by the clock and checked by the loop itself after every drain.
//!
//! The runtime's timers fire only when its one worker thread gets to them, and
//! that thread also encodes and sends the spans: under a CPU quota and an event
//! flood it may not get there for seconds, while the loop, draining in slices,
//! still runs. A timer is used only to wake an idle loop.
use std::time::{Duration, Instant};

/// Something due every `period`, the first time one period from its start.
#[derive(Debug)]
pub struct Every {
    period: Duration,
    /// None: a period too long for the clock (`--stats-interval` in the
    /// trillions), never due.
    next: Option<Instant>,
}

impl Every {
    pub fn starting(now: Instant, period: Duration) -> Self {
        Self {
            period,
            next: now.checked_add(period),
        }
    }

    /// True once `now` has reached the due time, which then moves one period on.
    /// A loop that was held up past several due times does the work once, not
    /// once per missed period: a burst of identical reports says nothing more.
    pub fn due(&mut self, now: Instant) -> bool {
        let Some(next) = self.next.filter(|&next| now >= next) else {
            return false;
        };
        self.next = next
            .checked_add(self.period)
            .filter(|&after| after > now)
            .or_else(|| now.checked_add(self.period));
        true
    }

    /// When it is due next, if ever.
    pub fn next(&self) -> Option<Instant> {
        self.next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn due_once_per_period_from_one_period_after_the_start() {
        let start = Instant::now();
        let mut every = Every::starting(start, SECOND);
        assert!(!every.due(start));
        assert!(!every.due(start + SECOND / 2));
        assert!(every.due(start + SECOND));
        assert!(!every.due(start + SECOND + SECOND / 2));
        assert!(every.due(start + 2 * SECOND));
        assert_eq!(every.next(), Some(start + 3 * SECOND));
    }

    #[test]
    fn a_late_check_keeps_the_schedule_when_within_a_period() {
        let start = Instant::now();
        let mut every = Every::starting(start, SECOND);
        assert!(every.due(start + SECOND + SECOND / 4));
        // Still due at 2 s, not 2.25 s: reports stay about a second apart.
        assert_eq!(every.next(), Some(start + 2 * SECOND));
    }

    #[test]
    fn a_loop_held_up_for_periods_does_the_work_once() {
        let start = Instant::now();
        let mut every = Every::starting(start, SECOND);
        let late = start + 5 * SECOND + SECOND / 2;
        assert!(every.due(late));
        assert!(!every.due(late));
        assert_eq!(every.next(), Some(late + SECOND));
    }

    #[test]
    fn a_period_too_long_for_the_clock_is_never_due() {
        let start = Instant::now();
        let mut every = Every::starting(start, Duration::from_secs(u64::MAX));
        assert_eq!(every.next(), None);
        assert!(!every.due(start + 1000 * SECOND));
    }
}
