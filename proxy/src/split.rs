//! Picking a version by weight. Pure: the caller supplies the random number
//! or the sticky key, so tests can drive every boundary without statistics.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Cumulative weights of one snapshot, built once per publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Split {
    /// `ends[i]` is the sum of weights `0..=i`; version `i` owns the
    /// half-open range `ends[i-1]..ends[i]`.
    ends: Box<[u64]>,
}

impl Split {
    pub(crate) fn new(weights: impl IntoIterator<Item = u64>) -> Self {
        let mut sum = 0u64;
        let ends = weights
            .into_iter()
            .map(|w| {
                sum += w;
                sum
            })
            .collect();
        Split { ends }
    }

    pub(crate) fn total(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    /// The version owning `r`, for `r < total()`. A zero weight owns an empty
    /// range and so is never picked. `None` only when every weight is zero.
    pub(crate) fn pick(&self, r: u64) -> Option<usize> {
        // A linear scan beats a binary search for the handful of versions a
        // canary release has, and it is branch-predictor friendly at 90/10.
        self.ends.iter().position(|&end| r < end)
    }

    /// Pick with the thread-local fast RNG (wyrand). Not cryptographic, and
    /// need not be: it only has to be uniform and cheap.
    pub(crate) fn pick_random(&self) -> Option<usize> {
        match self.total() {
            0 => None,
            total => self.pick(fastrand::u64(..total)),
        }
    }
}

/// The seed of every version's own seed in [`Rendezvous`]: the ASCII bytes
/// of "canary-1". Fixed and documented (docs/routing.md), so that every
/// replica, and every restart, sends a key to the same version. The `-1`
/// leaves room for a deliberate reshuffle in a later release.
pub(crate) const STICKY_SEED: u64 = 0x6361_6e61_7279_2d31;

/// Sticky assignment by weighted rendezvous hashing: each version scores a
/// key as `weight / -ln(u)`, with `u` in (0, 1) from the key's hash under
/// that version's seed, and the highest score wins.
///
/// A version's score depends only on the key, its name and its own weight,
/// and grows with the weight. So when one weight grows, keys can only move
/// *to* that version; when one shrinks, only *away* from it; and a key
/// never moves between two versions whose weights did not change in that
/// direction. Scaling every weight by the same factor moves nothing. Over
/// many keys each version wins its weight's share: `-ln(u)/w` is an
/// exponential variable of rate `w`, and the least of several falls on each
/// with probability `w / sum`.
#[derive(Debug, Clone)]
pub(crate) struct Rendezvous {
    /// `(seed, weight, index)` of each version with a weight above 0.
    versions: Box<[(u64, f64, usize)]>,
}

impl Rendezvous {
    /// `(name, weight)` of each version, in file order.
    pub(crate) fn new<'a>(versions: impl IntoIterator<Item = (&'a str, u64)>) -> Self {
        let versions = versions
            .into_iter()
            .enumerate()
            .filter(|(_, (_, w))| *w > 0)
            .map(|(i, (name, w))| (xxh3_64_with_seed(name.as_bytes(), STICKY_SEED), w as f64, i))
            .collect();
        Rendezvous { versions }
    }

    /// The version `key` belongs to; `None` only when every weight is 0.
    pub(crate) fn pick(&self, key: &[u8]) -> Option<usize> {
        let mut best = None;
        let mut best_score = f64::NEG_INFINITY;
        for &(seed, weight, index) in self.versions.iter() {
            // The top 53 bits, centred in their interval: u is never 0 or 1,
            // so -ln(u) is finite and above 0.
            let h = xxh3_64_with_seed(key, seed);
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let score = weight / -u.ln();
            if score > best_score {
                best_score = score;
                best = Some(index);
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_follow_weights() {
        let s = Split::new([90, 10]);
        assert_eq!(s.total(), 100);
        assert_eq!(s.pick(0), Some(0));
        assert_eq!(s.pick(89), Some(0));
        assert_eq!(s.pick(90), Some(1));
        assert_eq!(s.pick(99), Some(1));
        assert_eq!(s.pick(100), None);
    }

    #[test]
    fn zero_weight_is_never_picked() {
        let s = Split::new([0, 5, 0]);
        assert!((0..5).all(|r| s.pick(r) == Some(1)));
        assert_eq!(Split::new([0, 0]).pick_random(), None);
    }

    #[test]
    fn counts_match_weights_exactly_over_the_whole_range() {
        let s = Split::new([9999, 1]);
        let canary = (0..s.total()).filter(|&r| s.pick(r) == Some(1)).count();
        assert_eq!(canary, 1);
    }

    #[test]
    fn a_key_picks_the_same_version_from_a_table_built_again() {
        let a = Rendezvous::new([("stable", 90), ("canary", 10)]);
        let b = Rendezvous::new([("stable", 90), ("canary", 10)]);
        for k in 0..1000u32 {
            let key = k.to_string();
            assert_eq!(a.pick(key.as_bytes()), b.pick(key.as_bytes()));
        }
    }

    /// The assignment is a function of the key, the names and the weights
    /// alone: pinned here, so that a change to the hash, the seed or the
    /// score (which would move every user of a running release at the
    /// upgrade) cannot pass unnoticed. Changing it is a breaking change for
    /// the CHANGELOG.
    #[test]
    fn the_assignment_is_stable_across_releases() {
        let r = Rendezvous::new([("stable", 50), ("canary", 50)]);
        let picks: String = (0..32u32)
            .map(|k| match r.pick(format!("user-{k}").as_bytes()) {
                Some(0) => 's',
                Some(1) => 'c',
                _ => '?',
            })
            .collect();
        assert_eq!(picks, PINNED_PICKS);
    }

    #[test]
    fn zero_weights_are_never_picked_by_key() {
        let r = Rendezvous::new([("a", 0), ("b", 3), ("c", 0)]);
        assert!((0..500u32).all(|k| r.pick(&k.to_le_bytes()) == Some(1)));
        assert_eq!(Rendezvous::new([("a", 0)]).pick(b"k"), None);
    }

    /// 100,000 distinct keys: each version's share is within 5 binomial
    /// sigma of its weight's, for a few splits a release goes through.
    #[test]
    fn shares_over_many_keys_follow_the_weights() {
        const KEYS: u32 = 100_000;
        for weights in [
            [90u64, 10, 0],
            [99, 1, 0],
            [50, 50, 0],
            [60, 30, 10],
            [1, 1, 98],
        ] {
            let r = Rendezvous::new(["stable", "canary", "third"].into_iter().zip(weights));
            let mut counts = [0u32; 3];
            for k in 0..KEYS {
                counts[r.pick(format!("key-{k}").as_bytes()).unwrap()] += 1;
            }
            let total: u64 = weights.iter().sum();
            for (i, &w) in weights.iter().enumerate() {
                let p = w as f64 / total as f64;
                let expected = p * KEYS as f64;
                let sigma = (KEYS as f64 * p * (1.0 - p)).sqrt();
                assert!(
                    (counts[i] as f64 - expected).abs() <= 5.0 * sigma.max(1.0),
                    "weights {weights:?}: version {i} got {} of {KEYS} keys, expected {expected:.0} +- {:.0}",
                    counts[i],
                    5.0 * sigma
                );
            }
        }
    }
}

/// Computed outside this code, from the formula docs/routing.md publishes,
/// with Python's `xxhash` package (`xxh3_64_intdigest(key, seed=...)`): the
/// documentation, a third-party XXH3 and this code agree.
#[cfg(test)]
const PINNED_PICKS: &str = "sscscccscccsccccccsscssscccsscss";

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Minimal disruption: after any change of weights, a key that
        /// moved from version a to version b did so because a's weight
        /// went down or b's went up; never between two versions whose
        /// weights did not change in that direction.
        #[test]
        fn keys_move_only_where_a_weight_change_sends_them(
            before in proptest::collection::vec(0u64..1000, 2..6),
            changes in proptest::collection::vec((0usize..6, 0u64..1000), 1..4),
            salt in any::<u64>(),
        ) {
            let names: Vec<String> = (0..before.len()).map(|i| format!("v{i}")).collect();
            let mut after = before.clone();
            for (i, w) in changes {
                let i = i % after.len();
                after[i] = w;
            }
            let old = Rendezvous::new(names.iter().map(String::as_str).zip(before.iter().copied()));
            let new = Rendezvous::new(names.iter().map(String::as_str).zip(after.iter().copied()));
            for k in 0..400u64 {
                let key = (k ^ salt).to_le_bytes();
                match (old.pick(&key), new.pick(&key)) {
                    (Some(a), Some(b)) if a != b => prop_assert!(
                        after[a] < before[a] || after[b] > before[b],
                        "key moved from v{a} ({} -> {}) to v{b} ({} -> {})",
                        before[a], after[a], before[b], after[b]
                    ),
                    _ => {}
                }
            }
        }

        /// Scaling every weight by the same factor moves no key: the
        /// shares, not the numbers, decide.
        #[test]
        fn scaling_all_weights_moves_nothing(
            weights in proptest::collection::vec(1u64..1000, 2..5),
            factor in 2u64..100,
            salt in any::<u64>(),
        ) {
            let names: Vec<String> = (0..weights.len()).map(|i| format!("v{i}")).collect();
            let a = Rendezvous::new(names.iter().map(String::as_str).zip(weights.iter().copied()));
            let b = Rendezvous::new(names.iter().map(String::as_str).zip(weights.iter().map(|w| w * factor)));
            for k in 0..200u64 {
                let key = (k ^ salt).to_le_bytes();
                prop_assert_eq!(a.pick(&key), b.pick(&key));
            }
        }
    }
}
