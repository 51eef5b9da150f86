//! Bounded attribute sets: each metric keeps at most `max` series, each one's
//! attributes built once and found again by a compact key, so a measurement hashes
//! a few bytes instead of building and hashing a vector of strings.
use std::{
    collections::{HashMap, hash_map::Entry},
    hash::Hash,
    sync::Arc,
};

use foldhash::fast::RandomState;
use opentelemetry::KeyValue;

/// The attribute of the one series that takes what no series of its own could
/// (the OpenTelemetry metrics SDK specification's name for it).
pub const OVERFLOW: &str = "otel.metric.overflow";

/// One metric's series: keys to their attributes, at most `max` of them.
#[derive(Debug)]
pub struct Series<K> {
    sets: HashMap<K, Arc<[KeyValue]>, RandomState>,
    max: usize,
    overflow: Arc<[KeyValue]>,
}

impl<K: Hash + Eq> Series<K> {
    pub fn new(max: usize) -> Self {
        Self {
            sets: HashMap::with_hasher(RandomState::default()),
            max,
            overflow: Arc::new([KeyValue::new(OVERFLOW, true)]),
        }
    }

    /// The attributes of `key`'s series, built by `build` the first time, while
    /// fewer than `max` exist; otherwise the overflow series' (`true`: the caller
    /// counts what it records there).
    pub fn get(
        &mut self,
        key: K,
        build: impl FnOnce(&K) -> Vec<KeyValue>,
    ) -> (&Arc<[KeyValue]>, bool) {
        let full = self.sets.len() >= self.max;
        match self.sets.entry(key) {
            Entry::Occupied(known) => (known.into_mut(), false),
            Entry::Vacant(new) if !full => {
                let mut attributes = build(new.key());
                // In key order, as the SDK sorts them: it then finds the set at
                // its first lookup and stores it once, not in both orders.
                attributes.sort_unstable_by(|a, b| a.key.as_str().cmp(b.key.as_str()));
                (new.insert(attributes.into()), false)
            }
            Entry::Vacant(_) => (&self.overflow, true),
        }
    }

    /// The series of their own so far (the overflow series not counted).
    pub fn len(&self) -> usize {
        self.sets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sets.is_empty()
    }

    pub fn contains(&self, key: &K) -> bool {
        self.sets.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&K, &Arc<[KeyValue]>)> {
        self.sets.iter()
    }

    pub fn overflow(&self) -> &Arc<[KeyValue]> {
        &self.overflow
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(n: &u32) -> Vec<KeyValue> {
        vec![
            KeyValue::new("z.last", i64::from(*n)),
            KeyValue::new("a.first", "x"),
        ]
    }

    #[test]
    fn keys_beyond_the_cap_share_the_overflow_series() {
        let mut series = Series::new(2);
        let mut built = 0;
        let mut get = |series: &mut Series<u32>, key| {
            let (attributes, overflowed) = series.get(key, |k| {
                built += 1;
                build(k)
            });
            (attributes.to_vec(), overflowed)
        };
        let (one, over) = get(&mut series, 1);
        assert!(!over);
        assert_eq!(
            one,
            [KeyValue::new("a.first", "x"), KeyValue::new("z.last", 1)],
            "sorted by key"
        );
        assert!(!get(&mut series, 2).1);
        // Known keys keep their series once the cap is reached; new ones do not.
        assert_eq!(get(&mut series, 1), (one, false));
        let (third, over) = get(&mut series, 3);
        assert!(over);
        assert_eq!(third, [KeyValue::new(OVERFLOW, true)]);
        assert!(get(&mut series, 4).1);
        assert_eq!(series.len(), 2);
        assert!(!series.contains(&3));
        assert_eq!(
            built, 2,
            "attributes built once per series, never for overflow"
        );
    }

    #[test]
    fn a_cap_of_one_keeps_the_first() {
        let mut series = Series::new(1);
        assert!(!series.get(7, build).1);
        assert!(series.get(8, build).1);
        assert!(!series.get(7, build).1);
    }
}
