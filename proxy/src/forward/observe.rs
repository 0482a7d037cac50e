//! The `observe` stage: every request is recorded exactly once, when its
//! answer is over: counted by version and status, its duration observed, and
//! its outcome given to the version's judgment. A verdict goes to the
//! control plane through [`Verdicts`], the request path's only edge back up.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};

use crate::body::{BodyHook, End, Hooked};
use crate::guard::Verdicts;
use crate::metrics::UpstreamErrorKind;
use crate::snapshot::{Snapshot, Store, VersionRuntime};
use crate::upstream::PooledBody;

/// The body the client reads: the upstream's, streamed, or the proxy's own
/// short answer. It records its request once, at its end, on an upstream
/// error mid-body, or when the client goes away (dropped unfinished, which
/// is not the upstream's fault and counts as no error).
pub(crate) type ObservedBody = Hooked<Either<PooledBody, Full<Bytes>>, Observation>;

/// Where recordings go: the clock the evidence counts in, and the verdicts.
/// One per event loop; each observation holds it by one `Arc`.
pub(super) struct Recorder {
    pub(super) store: Arc<Store>,
    pub(super) verdicts: Arc<dyn Verdicts>,
}

impl Recorder {
    /// Record one outcome in the version's judgment and, if it trips, hand
    /// the verdict to the control plane.
    pub(super) fn judge(&self, v: &VersionRuntime, error: bool) {
        // A latched version's evidence no longer matters; requests still in
        // flight on an older snapshot are ignored by the control plane.
        if let Some(trip) = v.judgment.record(self.store.now(), error) {
            if v.rollback.is_none() {
                self.verdicts.trip(&v.name, &v.judgment, trip);
            }
        }
    }
}

/// What is recorded once the response is over.
pub(crate) struct Observation {
    pub(super) snap: Arc<Snapshot>,
    pub(super) recorder: Arc<Recorder>,
    pub(super) index: usize,
    pub(super) status: u16,
    pub(super) start: Instant,
    /// The answer counts as an error for rollback (status in the error set,
    /// or the proxy's own 502/504).
    pub(super) error: bool,
}

impl Observation {
    fn finish(self, reset: bool) {
        let v = &self.snap.versions[self.index];
        v.metrics.in_flight.dec();
        v.metrics.answered(self.status, self.start.elapsed());
        if reset {
            v.metrics.upstream_error(UpstreamErrorKind::Reset);
        }
        self.recorder.judge(v, self.error || reset);
    }
}

impl BodyHook for Observation {
    fn end(self, how: End<'_>) {
        match how {
            End::Complete | End::Dropped { .. } => self.finish(false),
            End::Failed(e) => {
                let v = &self.snap.versions[self.index];
                tracing::warn!(version = %v.name, error = %e, "upstream response body failed mid-stream");
                self.finish(true);
            }
        }
    }
}
