//! The judgment of one version: its recent counts, and the rollback decision
//! made from them. Pure with respect to time: every call takes `now`, a
//! duration since a base the caller's [`crate::clock::Clock`] owns, so unit
//! tests drive the clock.
//!
//! The request path records each answer into the version's [`Judgment`]
//! with a few relaxed atomic operations (no lock, no allocation). When the
//! evidence is enough, `record` returns a [`Trip`], and the request path
//! hands it to the control plane through [`Verdicts`], the one edge that
//! goes back up the flow.
//!
//! The window is a ring of time buckets of atomics. A bucket whose epoch is
//! stale is reset by whichever thread first notices; increments racing with
//! that reset can be lost, which costs a count or two of evidence and never
//! a wrong trip on thin evidence (the `min_requests` guard sees fewer
//! requests, not more).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::routes::RollbackPolicy;

/// How many buckets a window is cut into. The window slides in steps of
/// `window / BUCKETS`: old evidence leaves at most that much late.
pub(crate) const BUCKETS: u64 = 10;

/// Where a verdict goes: the control plane, which latches and publishes.
/// The request path holds only this, not the control plane itself.
pub(crate) trait Verdicts: Send + Sync {
    /// `judgment` identifies the evidence, so that a verdict reached on
    /// evidence an operator has since reset is ignored.
    fn trip(&self, version: &str, judgment: &Arc<Judgment>, trip: Trip);
}

/// The evidence that tripped a rollback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Trip {
    pub(crate) totals: Totals,
}

/// One version's counts and, unless it is the rollback target or rollback
/// is off, the rule it is judged by. Shared by every snapshot until the
/// version's entry or the policy changes; then a fresh one starts.
#[derive(Debug)]
pub(crate) struct Judgment {
    window: Window,
    rule: Option<Rule>,
}

/// The decision's parameters, taken from the policy once.
#[derive(Debug, Clone, Copy)]
struct Rule {
    error_rate: f64,
    min_requests: u64,
}

impl Judgment {
    /// `policy` is `None` for a version that is never rolled back.
    pub(crate) fn new(window: Duration, policy: Option<&RollbackPolicy>) -> Self {
        Judgment {
            window: Window::new(window),
            rule: policy.map(|p| Rule {
                error_rate: p.error_rate,
                min_requests: p.min_requests,
            }),
        }
    }

    /// Record one answer; a `Trip` when the evidence is now enough.
    pub(crate) fn record(&self, now: Duration, error: bool) -> Option<Trip> {
        self.window.record(now, error);
        let rule = self.rule?;
        let totals = self.window.totals(now);
        rule.trips(totals).then_some(Trip { totals })
    }

    /// Whether this version can be rolled back at all.
    pub(crate) fn is_judged(&self) -> bool {
        self.rule.is_some()
    }

    /// The counts in the window ending at `now`.
    pub(crate) fn totals(&self, now: Duration) -> Totals {
        self.window.totals(now)
    }
}

impl Rule {
    /// Enough evidence, and strictly above the threshold. `min_requests` is
    /// what keeps three unlucky requests from rolling back a healthy canary
    /// at 3 a.m.
    fn trips(&self, totals: Totals) -> bool {
        totals.requests >= self.min_requests && totals.ratio() > self.error_rate
    }
}

/// Requests and errors counted over a sliding window.
#[derive(Debug)]
pub struct Window {
    bucket_nanos: u64,
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Which bucket-period this slot currently counts (`now / bucket_nanos`).
    epoch: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
}

/// Requests and errors in the window, as the decision sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
}

impl Totals {
    pub fn ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

impl Window {
    pub fn new(window: Duration) -> Self {
        let bucket_nanos = (window.as_nanos() as u64 / BUCKETS).max(1);
        Window {
            bucket_nanos,
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
        }
    }

    pub fn record(&self, now: Duration, error: bool) {
        let epoch = now.as_nanos() as u64 / self.bucket_nanos;
        let bucket = &self.buckets[(epoch % BUCKETS) as usize];
        let seen = bucket.epoch.load(Relaxed);
        if seen != epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            bucket.requests.store(0, Relaxed);
            bucket.errors.store(0, Relaxed);
        }
        bucket.requests.fetch_add(1, Relaxed);
        if error {
            bucket.errors.fetch_add(1, Relaxed);
        }
    }

    /// Sum of the buckets that fall inside the window ending at `now`.
    pub fn totals(&self, now: Duration) -> Totals {
        let current = now.as_nanos() as u64 / self.bucket_nanos;
        let oldest = current.saturating_sub(BUCKETS - 1);
        let mut t = Totals::default();
        for b in self.buckets.iter() {
            let epoch = b.epoch.load(Relaxed);
            if (oldest..=current).contains(&epoch) {
                t.requests += b.requests.load(Relaxed);
                t.errors += b.errors.load(Relaxed);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::ErrorCodes;

    fn policy(error_rate: f64, min_requests: u64) -> RollbackPolicy {
        RollbackPolicy {
            target: 0,
            error_rate,
            min_requests,
            window: Duration::from_secs(10),
            error_codes: ErrorCodes::default(),
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    fn totals(requests: u64, errors: u64) -> Totals {
        Totals { requests, errors }
    }

    #[test]
    fn counts_within_the_window() {
        let w = Window::new(S(10));
        for i in 0..10 {
            w.record(S(i), i % 2 == 0);
        }
        assert_eq!(w.totals(S(9)), totals(10, 5));
    }

    #[test]
    fn buckets_expire_as_the_window_slides() {
        let w = Window::new(S(10)); // 1 s buckets
        w.record(S(0), true);
        w.record(S(5), false);
        assert_eq!(w.totals(S(9)).requests, 2);
        // At t=10 the bucket of t=0 is out of the window; t=5 is still in.
        assert_eq!(w.totals(S(10)), totals(1, 0));
        assert_eq!(w.totals(S(15)).requests, 0);
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let w = Window::new(S(10));
        w.record(S(1), true);
        // t=11 maps to the same slot as t=1; the old counts must not leak in.
        w.record(S(11), false);
        assert_eq!(w.totals(S(11)), totals(1, 0));
    }

    #[test]
    fn min_requests_guards_thin_evidence() {
        let j = Judgment::new(S(10), Some(&policy(0.1, 20)));
        for i in 0..19 {
            assert_eq!(j.record(S(0), true), None, "request {i}");
        }
        assert_eq!(
            j.record(S(0), true),
            Some(Trip {
                totals: totals(20, 20)
            })
        );
    }

    #[test]
    fn threshold_is_strict() {
        let rule = Rule {
            error_rate: 0.1,
            min_requests: 10,
        };
        assert!(
            !rule.trips(totals(100, 10)),
            "exactly at the threshold is not above it"
        );
        assert!(rule.trips(totals(100, 11)));
    }

    #[test]
    fn an_unjudged_version_only_counts() {
        let j = Judgment::new(S(10), None);
        assert!(!j.is_judged());
        for _ in 0..100 {
            assert_eq!(j.record(S(1), true), None);
        }
        assert_eq!(j.totals(S(1)), totals(100, 100));
    }
}
