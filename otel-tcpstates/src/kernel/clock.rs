//! Kernel monotonic time (what `bpf_ktime_get_ns` returns) to wall-clock time.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_gettime};

/// The offset between CLOCK_REALTIME and CLOCK_MONOTONIC, measured once; call
/// [`WallClock::measure`] again to re-sync after the wall clock was stepped.
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
        // Bracket the realtime read with two monotonic reads and use their midpoint.
        let before = now_ns(ClockId::CLOCK_MONOTONIC);
        let real = now_ns(ClockId::CLOCK_REALTIME);
        let after = now_ns(ClockId::CLOCK_MONOTONIC);
        Self {
            offset_ns: real - (before + after) / 2,
        }
    }

    /// Whether two measurements disagree by more than `tolerance_ns`.
    pub fn offset_differs(&self, other: &WallClock, tolerance_ns: i128) -> bool {
        (self.offset_ns - other.offset_ns).abs() > tolerance_ns
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
