//! What a request reads: one immutable [`Snapshot`] of the routing state,
//! published whole by the control plane (see `control`). A request loads it
//! once and keeps that `Arc` to the end, so a reload or a rollback in the
//! middle of a request never shows it half of one config and half of another.

use std::sync::Arc;
use std::time::SystemTime;

use http::uri::{Authority, Scheme};
use http::HeaderValue;

use crate::guard::Window;
use crate::metrics::VersionMetrics;
use crate::routes::{RollbackPolicy, RouteTable};
use crate::split::Split;

#[derive(Debug)]
pub struct Snapshot {
    /// The validated routes file this snapshot was built from.
    pub table: Arc<RouteTable>,
    /// Same order as `table.versions`.
    pub versions: Box<[VersionRuntime]>,
    /// Weights after rollback decisions; what `split` was built from.
    pub effective: Box<[u64]>,
    pub split: Split,
    /// When this routes content was loaded (not when a rollback republished it).
    pub loaded_at: SystemTime,
    /// Bumped on every publish, reload or rollback; tests and logs use it to
    /// tell snapshots apart.
    pub generation: u64,
}

/// Everything the request path needs about one version, precomputed.
#[derive(Debug)]
pub struct VersionRuntime {
    pub name: Arc<str>,
    pub index: usize,
    pub scheme: Scheme,
    pub authority: Authority,
    /// The upstream authority as a header value, for `rewrite_host`.
    pub authority_header: HeaderValue,
    pub rewrite_host: bool,
    pub metrics: Arc<VersionMetrics>,
    /// Shared by every snapshot until the version's entry changes.
    pub window: Arc<Window>,
    /// `Some` when rollback is on and this version may be rolled back
    /// (i.e. it is not the target).
    pub guard: Option<RollbackPolicy>,
    /// The latched rollback, if any.
    pub rollback: Option<Arc<RollbackRecord>>,
}

/// Why and when a version was rolled back; shown in `/status` and logs.
#[derive(Debug, Clone)]
pub struct RollbackRecord {
    pub at: SystemTime,
    pub ratio: f64,
    pub errors: u64,
    pub requests: u64,
    pub threshold: f64,
    pub window_secs: f64,
    pub target: String,
}

impl Snapshot {
    pub fn target(&self) -> Option<&VersionRuntime> {
        self.table
            .rollback
            .as_ref()
            .map(|r| &self.versions[r.target])
    }

    /// Configured and effective shares, 0..1, for metrics and `/status`.
    pub fn shares(&self, index: usize) -> (f64, f64) {
        let configured_total = self.table.total_weight().max(1) as f64;
        let effective_total = self.split.total().max(1) as f64;
        (
            self.table.versions[index].weight as f64 / configured_total,
            self.effective[index] as f64 / effective_total,
        )
    }
}
