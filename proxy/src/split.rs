//! Picking a version by weight. Pure: the caller supplies the random number,
//! so tests can drive every boundary without statistics.

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
}
