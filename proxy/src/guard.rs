//! Per-version error accounting over a sliding window, and the rollback
//! decision. Pure with respect to time: every call takes `now` as a duration
//! since a base instant the caller owns, so unit tests drive the clock.
//!
//! The window is a ring of time buckets of atomics. Recording a request is a
//! couple of relaxed atomic adds on one bucket: no lock, no allocation. A
//! bucket whose epoch is stale is reset by whichever thread first notices;
//! increments racing with that reset can be lost, which costs a count or two
//! of evidence and never a wrong trip on thin evidence (the `min_requests`
//! guard sees fewer requests, not more).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::routes::RollbackPolicy;

/// How many buckets a window is cut into. The window slides in steps of
/// `window / BUCKETS`: old evidence leaves at most that much late.
pub const BUCKETS: u64 = 10;

#[derive(Debug)]
pub struct Window {
    bucket_nanos: u64,
    buckets: Box<[Bucket]>,
    /// Set once a rollback of this version is latched; the window is
    /// replaced (not cleared) when the operator resets the version.
    latched: AtomicBool,
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
            latched: AtomicBool::new(false),
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

    pub fn is_latched(&self) -> bool {
        self.latched.load(Relaxed)
    }

    /// Returns true for the one caller that latched it.
    pub fn latch(&self) -> bool {
        !self.latched.swap(true, Relaxed)
    }
}

/// The rollback decision: enough evidence, and strictly above the threshold.
/// `min_requests` is what keeps three unlucky requests from rolling back a
/// healthy canary at 3 a.m.
pub fn should_trip(policy: &RollbackPolicy, totals: Totals) -> bool {
    totals.requests >= policy.min_requests && totals.ratio() > policy.error_rate
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

    #[test]
    fn counts_within_the_window() {
        let w = Window::new(S(10));
        for i in 0..10 {
            w.record(S(i), i % 2 == 0);
        }
        assert_eq!(
            w.totals(S(9)),
            Totals {
                requests: 10,
                errors: 5
            }
        );
    }

    #[test]
    fn buckets_expire_as_the_window_slides() {
        let w = Window::new(S(10)); // 1 s buckets
        w.record(S(0), true);
        w.record(S(5), false);
        assert_eq!(w.totals(S(9)).requests, 2);
        // At t=10 the bucket of t=0 is out of the window; t=5 is still in.
        assert_eq!(
            w.totals(S(10)),
            Totals {
                requests: 1,
                errors: 0
            }
        );
        assert_eq!(w.totals(S(15)).requests, 0);
    }

    #[test]
    fn a_reused_slot_starts_from_zero() {
        let w = Window::new(S(10));
        w.record(S(1), true);
        // t=11 maps to the same slot as t=1; the old counts must not leak in.
        w.record(S(11), false);
        assert_eq!(
            w.totals(S(11)),
            Totals {
                requests: 1,
                errors: 0
            }
        );
    }

    #[test]
    fn min_requests_guards_thin_evidence() {
        let p = policy(0.1, 20);
        assert!(!should_trip(
            &p,
            Totals {
                requests: 19,
                errors: 19
            }
        ));
        assert!(should_trip(
            &p,
            Totals {
                requests: 20,
                errors: 3
            }
        ));
    }

    #[test]
    fn threshold_is_strict() {
        let p = policy(0.1, 10);
        assert!(
            !should_trip(
                &p,
                Totals {
                    requests: 100,
                    errors: 10
                }
            ),
            "exactly at the threshold is not above it"
        );
        assert!(should_trip(
            &p,
            Totals {
                requests: 100,
                errors: 11
            }
        ));
    }

    #[test]
    fn latch_is_taken_once() {
        let w = Window::new(S(10));
        assert!(!w.is_latched());
        assert!(w.latch());
        assert!(!w.latch());
        assert!(w.is_latched());
    }
}
