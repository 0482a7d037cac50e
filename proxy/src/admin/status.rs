//! The `/status` document, as typed views: this file is its one definition.
//! docs/operations.md describes it field by field; tests read it by these
//! names.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::control::ReloadStatus;
use crate::guard::Totals;
use crate::snapshot::{RollbackRecord, Snapshot};

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    pub(crate) routes: RoutesView,
    pub(crate) versions: Vec<VersionView>,
    /// `null` when the routes file has no `[rollback]` table.
    pub(crate) rollback: Option<PolicyView>,
    pub(crate) reload: ReloadView,
}

/// The active routes file.
#[derive(Debug, Serialize)]
pub(crate) struct RoutesView {
    /// Content hash, as `canary-proxy check` prints it.
    pub(crate) hash: String,
    pub(crate) loaded_at: String,
    /// Bumped on every publish: reload or rollback.
    pub(crate) generation: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct VersionView {
    pub(crate) name: String,
    pub(crate) upstream: String,
    /// As configured, and its share of the configured total (0..1).
    pub(crate) weight: u64,
    pub(crate) share: f64,
    /// After rollback decisions, and its share of the effective total.
    pub(crate) effective_weight: u64,
    pub(crate) effective_share: f64,
    /// Counts over the rollback window (30 s without a policy).
    pub(crate) window: WindowView,
    pub(crate) rolled_back: bool,
    pub(crate) rollback: Option<RollbackView>,
}

#[derive(Debug, Serialize)]
pub(crate) struct WindowView {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) error_ratio: f64,
}

/// A latched rollback.
#[derive(Debug, Serialize)]
pub(crate) struct RollbackView {
    pub(crate) at: String,
    /// One line, as the log says it.
    pub(crate) reason: String,
    pub(crate) ratio: f64,
    pub(crate) errors: u64,
    pub(crate) requests: u64,
    pub(crate) threshold: f64,
    pub(crate) target: String,
}

/// The `[rollback]` policy in force.
#[derive(Debug, Serialize)]
pub(crate) struct PolicyView {
    pub(crate) target: String,
    pub(crate) error_rate: f64,
    pub(crate) min_requests: u64,
    pub(crate) window_seconds: f64,
    pub(crate) error_codes: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReloadView {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) last_success: Option<String>,
    pub(crate) last_error: Option<ReloadErrorView>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReloadErrorView {
    pub(crate) at: String,
    pub(crate) message: String,
}

impl Status {
    /// The view of `snap` at monotonic time `now`.
    pub(crate) fn new(snap: &Snapshot, reload: &ReloadStatus, now: Duration) -> Status {
        let versions = snap
            .versions
            .iter()
            .zip(snap.table.versions.iter())
            .map(|(rt, spec)| {
                let totals = rt.judgment.totals(now);
                let (share, effective_share) = snap.shares(rt.index);
                VersionView {
                    name: spec.name.clone(),
                    upstream: spec.upstream.to_string(),
                    weight: spec.weight,
                    share,
                    effective_weight: snap.effective[rt.index],
                    effective_share,
                    window: WindowView::new(totals),
                    rolled_back: rt.rollback.is_some(),
                    rollback: rt.rollback.as_deref().map(RollbackView::new),
                }
            })
            .collect();
        let rollback = snap.policy().map(|r| PolicyView {
            target: snap.table.versions[r.target].name.clone(),
            error_rate: r.error_rate,
            min_requests: r.min_requests,
            window_seconds: r.window.as_secs_f64(),
            error_codes: r.error_codes.to_string(),
        });
        Status {
            routes: RoutesView {
                hash: snap.table.hash.clone(),
                loaded_at: rfc3339(snap.loaded_at),
                generation: snap.generation,
            },
            versions,
            rollback,
            reload: ReloadView {
                successes: reload.successes,
                failures: reload.failures,
                last_success: reload.last_success.map(rfc3339),
                last_error: reload.last_error.as_ref().map(|(at, msg)| ReloadErrorView {
                    at: rfc3339(*at),
                    message: msg.clone(),
                }),
            },
        }
    }
}

impl WindowView {
    fn new(t: Totals) -> Self {
        WindowView {
            requests: t.requests,
            errors: t.errors,
            error_ratio: t.ratio(),
        }
    }
}

impl RollbackView {
    fn new(r: &RollbackRecord) -> Self {
        let t = r.totals;
        RollbackView {
            at: rfc3339(r.at),
            reason: format!(
                "error ratio {:.4} ({} errors / {} requests in {}s) above threshold {}",
                t.ratio(),
                t.errors,
                t.requests,
                r.window.as_secs_f64(),
                r.threshold
            ),
            ratio: t.ratio(),
            errors: t.errors,
            requests: t.requests,
            threshold: r.threshold,
            target: r.target.clone(),
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
