//! Kernel monotonic time (what `bpf_ktime_get_ns` returns: CLOCK_MONOTONIC, which
//! stops while the machine sleeps) to wall-clock time. The offset between the two
//! changes when the wall clock is stepped (NTP, an admin) and across a suspend, so
//! [`ClockSync`] measures it again on every drain of the ring buffer.
use std::{
    collections::VecDeque,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use nix::time::{ClockId, clock_gettime};

/// A change of the offset smaller than this is measurement noise, not a step.
pub const STEP_NS: i128 = 1_000_000;
/// A measurement whose two monotonic reads are further apart than this was
/// preempted: it cannot tell a step from noise.
const BRACKET_MAX_NS: i128 = 100_000;

/// The offset between CLOCK_REALTIME and CLOCK_MONOTONIC at one moment.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    /// realtime − monotonic, in nanoseconds.
    offset_ns: i128,
}

fn now_ns(clock: ClockId) -> i128 {
    // Both clocks are always available on Linux; a failure would mean a broken libc.
    let ts = clock_gettime(clock).unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    i128::from(ts.tv_sec()) * 1_000_000_000 + i128::from(ts.tv_nsec())
}

impl WallClock {
    pub fn measure() -> Self {
        Self::measure_bracketed().0
    }

    /// A measurement and how far apart its monotonic reads were.
    fn measure_bracketed() -> (Self, i128) {
        // Bracket the realtime read with two monotonic reads and use their midpoint.
        let before = now_ns(ClockId::CLOCK_MONOTONIC);
        let real = now_ns(ClockId::CLOCK_REALTIME);
        let after = now_ns(ClockId::CLOCK_MONOTONIC);
        let clock = Self {
            offset_ns: real - (before + after) / 2,
        };
        (clock, after - before)
    }

    /// Whether two measurements disagree by more than `tolerance_ns`.
    pub fn offset_differs(&self, other: &WallClock, tolerance_ns: i128) -> bool {
        (self.offset_ns - other.offset_ns).abs() > tolerance_ns
    }

    /// How far the wall clock was stepped from `earlier` to this one.
    pub fn seconds_after(&self, earlier: &WallClock) -> f64 {
        (self.offset_ns - earlier.offset_ns) as f64 / 1e9
    }

    /// Nanoseconds since the Unix epoch for a kernel monotonic timestamp.
    pub fn unix_ns(&self, monotonic_ns: u64) -> i128 {
        i128::from(monotonic_ns) + self.offset_ns
    }

    pub fn system_time(&self, monotonic_ns: u64) -> SystemTime {
        let ns = self.unix_ns(monotonic_ns).max(0);
        UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

/// The offset in use, measured again on every call to [`ClockSync::resync`]
/// (three vDSO reads: cheap enough for every drain) and replaced only when the wall
/// clock was stepped: adopting every measurement's jitter (a few hundred ns) would
/// open gaps between consecutive state spans.
pub struct ClockSync {
    current: WallClock,
}

impl Default for ClockSync {
    fn default() -> Self {
        Self::new()
    }
}

impl ClockSync {
    pub fn new() -> Self {
        Self {
            current: WallClock::measure(),
        }
    }

    pub fn current(&self) -> WallClock {
        self.current
    }

    /// The new offset when the wall clock was stepped since the last call.
    pub fn resync(&mut self) -> Option<WallClock> {
        let (now, _) = WallClock::measure_bracketed();
        if !now.offset_differs(&self.current, STEP_NS) {
            return None;
        }
        // Confirm with a measurement that was not preempted, so a busy CPU does
        // not pass for a step.
        let (now, bracket) = (0..3)
            .map(|_| WallClock::measure_bracketed())
            .min_by_key(|(_, bracket)| *bracket)?;
        if bracket > BRACKET_MAX_NS || !now.offset_differs(&self.current, STEP_NS) {
            return None;
        }
        self.current = now;
        Some(now)
    }
}

/// Which offset was in use from which kernel time on: a session's spans all use
/// the one in use at its birth (see [`ClockHistory::at`]).
#[derive(Clone, Debug)]
pub struct ClockHistory {
    /// (kernel time the offset was adopted, offset), oldest first, never empty.
    steps: VecDeque<(u64, WallClock)>,
}

/// Steps remembered: more steps than this during one session's life could change
/// the offset its later spans use.
const HISTORY_MAX: usize = 64;

impl ClockHistory {
    pub fn new(clock: WallClock) -> Self {
        Self {
            steps: VecDeque::from([(0, clock)]),
        }
    }

    /// The wall clock was stepped: from kernel time `at_ns` on, `clock` applies.
    pub fn stepped(&mut self, at_ns: u64, clock: WallClock) {
        if self.steps.len() >= HISTORY_MAX {
            self.steps.pop_front();
        }
        self.steps.push_back((at_ns, clock));
    }

    /// The offset in use at kernel time `monotonic_ns`. Each step is recorded at
    /// a kernel time later than any event read so far, so the answer for a given
    /// time never changes: every span of a session gets the same one.
    pub fn at(&self, monotonic_ns: u64) -> WallClock {
        self.steps
            .iter()
            .rev()
            .find(|(from, _)| *from <= monotonic_ns)
            .or(self.steps.front())
            .map_or_else(WallClock::measure, |(_, clock)| *clock)
    }
}

/// Kernel CLOCK_MONOTONIC now, in the units of `bpf_ktime_get_ns`.
pub fn monotonic_now_ns() -> u64 {
    u64::try_from(now_ns(ClockId::CLOCK_MONOTONIC)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_agree_within_noise() {
        let (a, b) = (WallClock::measure(), WallClock::measure());
        assert!(!a.offset_differs(&b, 1_000_000));
        assert!(a.offset_differs(
            &WallClock {
                offset_ns: a.offset_ns + 2_000_000
            },
            1_000_000
        ));
    }

    #[test]
    fn no_step_no_change() {
        let mut sync = ClockSync::new();
        assert!((0..1000).all(|_| sync.resync().is_none()));
    }

    #[test]
    fn a_session_keeps_the_offset_of_its_birth() {
        let old = WallClock { offset_ns: 1_000 };
        let new = WallClock {
            offset_ns: 600_000_000_000,
        };
        let mut history = ClockHistory::new(old);
        history.stepped(5_000, new);
        assert_eq!(history.at(4_999).offset_ns, old.offset_ns);
        assert_eq!(history.at(5_000).offset_ns, new.offset_ns);
        assert_eq!(history.at(u64::MAX).offset_ns, new.offset_ns);
    }

    #[test]
    fn monotonic_now_maps_to_wall_now() {
        let clock = WallClock::measure();
        let mapped = clock.system_time(monotonic_now_ns());
        let skew = match SystemTime::now().duration_since(mapped) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(skew < Duration::from_millis(5), "skew {skew:?}");
    }
}
