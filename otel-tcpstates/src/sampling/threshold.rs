//! Consistent probability sampling's arithmetic, as the OpenTelemetry specification
//! defines it (trace state probability sampling, OTEP 235): a trace is kept when
//! the low 56 bits of its trace id, its randomness, are at least the rejection
//! threshold T = (1 − p)·2^56; `ot=th:<T in hex>` on its spans tells later stages
//! the probability it was kept with.

/// 2^56: the randomness' range, and the threshold that keeps nothing.
const MAX: u64 = 1 << 56;
/// Hex digits of a full-precision threshold.
const DIGITS: usize = 14;

/// A rejection threshold in [0, 2^56]: 0 keeps every trace, 2^56 none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Threshold(u64);

impl Threshold {
    /// The threshold that keeps a trace with probability `p` in [0, 1], exact to
    /// the nearest 2^-56 (the Collector's `ProbabilityToThreshold`).
    pub fn from_probability(p: f64) -> Self {
        debug_assert!((0.0..=1.0).contains(&p));
        // p·2^56 is exact in f64 up to the rounding to 53 bits that `round` settles.
        let scaled = (p * MAX as f64).round() as u64;
        Self(MAX - scaled.min(MAX))
    }

    /// Whether the trace `trace_id` is kept: its randomness (the low 56 bits) is
    /// at least the threshold.
    pub fn keeps(self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low[1..].copy_from_slice(&trace_id[9..]);
        u64::from_be_bytes(low) >= self.0
    }

    /// Whether this threshold keeps every trace.
    pub fn keeps_all(self) -> bool {
        self.0 == 0
    }

    /// Whether it keeps none (p = 0: only the keep rules keep anything).
    pub fn keeps_none(self) -> bool {
        self.0 >= MAX
    }

    /// The probability a trace is kept with.
    pub fn probability(self) -> f64 {
        (MAX - self.0.min(MAX)) as f64 / MAX as f64
    }

    /// The W3C `tracestate` of a span kept by this threshold: `ot=th:` and the
    /// threshold as 14 hex digits, trailing zeros left out (`0` for 100%).
    pub fn trace_state(self) -> String {
        debug_assert!(!self.keeps_none(), "no trace is kept to carry it");
        let digits = format!("{:0width$x}", self.0, width = DIGITS);
        let th = match digits.trim_end_matches('0') {
            "" => "0",
            th => th,
        };
        format!("ot=th:{th}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trace id whose low 56 bits are `randomness`.
    fn id(randomness: u64) -> [u8; 16] {
        let mut id = [0xabu8; 16];
        id[8..].copy_from_slice(&randomness.to_be_bytes());
        id[8] = 0xcd; // not part of the randomness
        id
    }

    #[test]
    fn thresholds_are_written_as_the_specification_s_examples() {
        let th = |p| Threshold::from_probability(p).trace_state();
        assert_eq!(th(1.0), "ot=th:0");
        assert_eq!(th(0.5), "ot=th:8");
        assert_eq!(th(0.25), "ot=th:c");
        assert_eq!(th(0.1), "ot=th:e6666666666666");
        assert_eq!(th(0.01), "ot=th:fd70a3d70a3d71");
        assert_eq!(th(1.0 / 256.0), "ot=th:ff");
    }

    #[test]
    fn a_trace_is_kept_when_its_randomness_reaches_the_threshold() {
        let half = Threshold::from_probability(0.5);
        assert!(half.keeps(&id(MAX / 2)));
        assert!(half.keeps(&id(MAX - 1)));
        assert!(!half.keeps(&id(MAX / 2 - 1)));
        assert!(!half.keeps(&id(0)));
        let all = Threshold::from_probability(1.0);
        assert!(all.keeps_all() && all.keeps(&id(0)));
        let none = Threshold::from_probability(0.0);
        assert!(none.keeps_none() && !none.keeps(&id(MAX - 1)));
    }

    #[test]
    fn the_probability_round_trips() {
        for p in [0.0, 1e-6, 0.01, 0.1, 0.3333, 0.5, 0.9, 1.0] {
            let back = Threshold::from_probability(p).probability();
            assert!((back - p).abs() < 1e-15, "{p} -> {back}");
        }
    }
}
