//! Bounds for the in-memory maps keyed by what clients send (their addresses): each map has a
//! capacity, and the entries used longest ago make room for new ones.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// Ensures `map` has room for one more entry under `capacity`, evicting the tenth of the
/// entries last used longest ago when it is full, so a flood of new keys costs one sort per
/// tenth of the capacity rather than one per key.
pub fn make_room<K: Eq + Hash + Copy, V>(
    map: &mut HashMap<K, V>,
    capacity: usize,
    last_used: impl Fn(&V) -> Instant,
) {
    if map.len() < capacity {
        return;
    }
    let mut ages: Vec<(Instant, K)> = map.iter().map(|(k, v)| (last_used(v), *k)).collect();
    let evict = (map.len() + 1 - capacity)
        .max(capacity / 10)
        .min(ages.len());
    ages.select_nth_unstable_by_key(evict.saturating_sub(1), |(at, _)| *at);
    for (_, key) in &ages[..evict] {
        map.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_oldest_entries_make_room() {
        let start = Instant::now();
        let mut map: HashMap<u32, Instant> = (0..100)
            .map(|n| (n, start + Duration::from_secs(u64::from(n))))
            .collect();
        make_room(&mut map, 100, |at| *at);
        assert_eq!(map.len(), 90);
        assert!(
            (0..10).all(|n| !map.contains_key(&n)),
            "the ten oldest went"
        );
        make_room(&mut map, 100, |at| *at);
        assert_eq!(map.len(), 90, "nothing goes while there is room");
    }
}
