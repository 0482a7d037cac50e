//! What a request reads: one immutable [`Snapshot`] of the routing state,
//! published whole by the control plane (see `control`) into the [`Store`].
//! A request loads it once and keeps that `Arc` to the end, so a reload or a
//! rollback in the middle of a request never shows it half of one config and
//! half of another.

use crate::endpoints::Endpoints;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use http::HeaderValue;

use crate::clock::Clock;
use crate::guard::{Counts, Criterion, Judgment};
use crate::metrics::VersionMetrics;
use crate::routes::{RollbackPolicy, RouteTable};
use crate::split::{Rendezvous, Split};
use crate::upstream::Protocol;

#[derive(Debug)]
pub(crate) struct Snapshot {
    /// The validated routes file this snapshot was built from; the one place
    /// the request path reads the policy from.
    pub(crate) table: Arc<RouteTable>,
    /// Same order as `table.versions`.
    pub(crate) versions: Box<[VersionRuntime]>,
    /// Weights after rollback decisions; what `split` was built from.
    pub(crate) effective: Box<[u64]>,
    pub(crate) split: Split,
    /// With `[sticky]`: the keyed pick, over the configured weights.
    pub(crate) sticky: Option<Rendezvous>,
    /// When this routes content was loaded (not when a rollback republished it).
    pub(crate) loaded_at: SystemTime,
    /// Bumped on every publish, reload or rollback; tests and logs use it to
    /// tell snapshots apart.
    pub(crate) generation: u64,
}

/// Everything the request path needs about one version, precomputed.
#[derive(Debug)]
pub(crate) struct VersionRuntime {
    pub(crate) name: Arc<str>,
    pub(crate) index: usize,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    /// The upstream authority as a header value, for `rewrite_host`.
    pub(crate) authority_header: HeaderValue,
    pub(crate) rewrite_host: bool,
    pub(crate) protocol: Protocol,
    /// Where its requests go: the upstream itself, or the addresses DNS
    /// discovery found; shared by every snapshot while the entry's
    /// upstream and discovery stay the same.
    pub(crate) endpoints: Arc<Endpoints>,
    pub(crate) metrics: Arc<VersionMetrics>,
    /// The version's evidence and decision; shared by every snapshot until
    /// the version's entry or the policy changes.
    pub(crate) judgment: Arc<Judgment>,
    /// The latched rollback, if any, as the control plane published it.
    pub(crate) rollback: Option<Arc<RollbackRecord>>,
}

/// Why and when a version was rolled back; shown in `/status` and logs.
#[derive(Debug, Clone)]
pub(crate) struct RollbackRecord {
    pub(crate) at: SystemTime,
    pub(crate) criterion: Criterion,
    /// The criterion's counts over the window when it tripped.
    pub(crate) counts: Counts,
    /// Answers judged on the criterion when it tripped.
    pub(crate) judged: u64,
    /// The criterion's line: `error_rate` or `slow_rate`.
    pub(crate) threshold: f64,
    pub(crate) slower_than: Option<Duration>,
    pub(crate) trip_odds: f64,
    pub(crate) window: Duration,
    pub(crate) target: String,
}

impl RollbackRecord {
    /// One line, for the log and `/status`.
    pub(crate) fn reason(&self) -> String {
        let c = self.counts;
        let window = humantime::format_duration(self.window);
        match (self.criterion, self.slower_than) {
            (Criterion::Latency, Some(limit)) => format!(
                "share of answers slower than {} above threshold {}: {} of {} in the last {window} (ratio {:.4}); shown at odds {}:1 after {} answers judged",
                humantime::format_duration(limit),
                self.threshold,
                c.hits,
                c.samples,
                c.ratio(),
                self.trip_odds,
                self.judged
            ),
            _ => format!(
                "error rate above threshold {}: {} errors / {} requests in the last {window} (ratio {:.4}); shown at odds {}:1 after {} requests judged",
                self.threshold,
                c.hits,
                c.samples,
                c.ratio(),
                self.trip_odds,
                self.judged
            ),
        }
    }
}

impl Snapshot {
    pub(crate) fn policy(&self) -> Option<&RollbackPolicy> {
        self.table.rollback.as_ref()
    }

    pub(crate) fn target(&self) -> Option<&VersionRuntime> {
        self.policy().map(|r| &self.versions[r.target])
    }

    /// The version that serves a request routed to `index`: the rollback
    /// target while `index` is rolled back, for the picks that do not go
    /// through the effective weights (a sticky key, an override).
    pub(crate) fn serving(&self, index: usize) -> usize {
        match (&self.versions[index].rollback, self.policy()) {
            (Some(_), Some(p)) => p.target,
            _ => index,
        }
    }

    /// Configured and effective shares, 0..1, for metrics and `/status`.
    pub(crate) fn shares(&self, index: usize) -> (f64, f64) {
        let configured_total = self.table.total_weight().max(1) as f64;
        let effective_total = self.split.total().max(1) as f64;
        (
            self.table.versions[index].weight as f64 / configured_total,
            self.effective[index] as f64 / effective_total,
        )
    }
}

/// The published snapshot and the clock: what the request path and the
/// admin port read. Only the control plane stores into it.
#[derive(Debug)]
pub(crate) struct Store {
    current: ArcSwap<Snapshot>,
    clock: Arc<dyn Clock>,
}

impl Store {
    pub(crate) fn new(first: Snapshot, clock: Arc<dyn Clock>) -> Self {
        Store {
            current: ArcSwap::from_pointee(first),
            clock,
        }
    }

    /// The snapshot a request routes by, for its whole life.
    pub(crate) fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Monotonic time for the evidence windows.
    pub(crate) fn now(&self) -> Duration {
        self.clock.now()
    }

    pub(crate) fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Publish a whole new snapshot. Called by `control` only.
    pub(crate) fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}
