//! The `observe` stage: every request is recorded exactly once, when its
//! answer is over or when the client gives up on it: counted by version and
//! status, its duration observed, and what it says about the version given
//! to the version's judgment. A verdict goes to the control plane through
//! [`Verdicts`], the request path's only edge back up.
//!
//! Only the upstream's faults are evidence. A failure the client caused (a
//! malformed or abandoned body, a body too slow to arrive, a request given
//! up before the answer) is counted in `canary_proxy_client_errors_total`
//! and says nothing about errors; see [`Outcome`] for what it says about
//! latency.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};

use super::grpc;
use super::log_limit::{self, LogKind};
use super::upload::UploadState;
use super::UpstreamBody;
use crate::body::{BodyHook, End, Hooked};
use crate::endpoints::Lease;
use crate::guard::{Outcome, Verdicts};
use crate::metrics::{ClientErrorKind, Metrics, UpstreamErrorKind};
use crate::snapshot::{Snapshot, Store, VersionRuntime};
use crate::upstream::PooledBody;

/// The body the client reads: the upstream's, streamed, or the proxy's own
/// short answer. It records its request once, at its end, on an upstream
/// error mid-body, or when the client goes away (dropped unfinished, which
/// is not the upstream's fault and counts as no error).
pub(crate) type ObservedBody = Hooked<Either<PooledBody<UpstreamBody>, Full<Bytes>>, Observation>;

/// Where recordings go: the clock the evidence counts in, the verdicts, and
/// the counters of client faults. One per event loop; each request holds it
/// by one `Arc`.
pub(crate) struct Recorder {
    pub(crate) store: Arc<Store>,
    pub(crate) verdicts: Arc<dyn Verdicts>,
    pub(crate) metrics: Arc<Metrics>,
}

impl Recorder {
    /// Give `outcome` to the judgment of version `index` and, if it trips,
    /// hand the verdict to the control plane.
    pub(crate) fn judge(&self, snap: &Snapshot, v: &VersionRuntime, outcome: Outcome) {
        let target = snap.target().map(|t| &*t.judgment);
        if let Some(trip) = v.judgment.record(self.store.now(), outcome, target) {
            // A latched version's evidence no longer matters; requests still
            // in flight on an older snapshot are ignored by the control plane.
            if v.rollback.is_none() {
                self.verdicts.trip(&v.name, &v.judgment, trip);
            }
        }
    }
}

/// What every recording needs: which request, on which snapshot.
pub(crate) struct Recording {
    pub(crate) snap: Arc<Snapshot>,
    pub(crate) recorder: Arc<Recorder>,
    /// The version answering (the target, after a retry).
    pub(crate) index: usize,
    pub(crate) start: Instant,
    /// The endpoint answering, held (as one of its requests in flight)
    /// until the request is recorded, and told how it went.
    pub(crate) endpoint: Option<Lease>,
}

impl Recording {
    fn version(&self) -> &VersionRuntime {
        &self.snap.versions[self.index]
    }

    /// Count the request once, and give its outcome to the judgment.
    fn record(&self, status: u16, outcome: Outcome) {
        // Only an answer judged on errors says anything of the endpoint:
        // a client's fault says nothing.
        if let (Some(lease), Some(error)) = (&self.endpoint, outcome.error) {
            lease.report(!error);
        }
        let v = self.version();
        v.metrics.in_flight.dec();
        v.metrics.answered(status, self.start.elapsed());
        self.recorder.judge(&self.snap, v, outcome);
    }
}

/// A request between its version being picked and its answer. If the
/// client gives up in between (its future is dropped), the request is still
/// recorded once: as a client cancel, status 499.
pub(crate) struct Pending(Option<Recording>);

impl Pending {
    pub(crate) fn new(recording: Recording) -> Self {
        Pending(Some(recording))
    }

    pub(crate) fn recording(&self) -> &Recording {
        self.0.as_ref().expect("a pending request is recorded once")
    }

    /// The request moves to version `index` (the retry on the target).
    pub(crate) fn switch_to(&mut self, index: usize) {
        let rec = self.0.as_mut().expect("a pending request is recorded once");
        rec.version().metrics.in_flight.dec();
        rec.index = index;
        rec.version().metrics.in_flight.inc();
    }

    /// The endpoint that answers, held until the request is recorded.
    pub(crate) fn hold(&mut self, lease: Lease) {
        let rec = self.0.as_mut().expect("a pending request is recorded once");
        rec.endpoint = Some(lease);
    }

    /// The answer is here: its body records it from now on.
    pub(crate) fn answered(mut self) -> Recording {
        self.0.take().expect("a pending request is recorded once")
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(rec) = self.0.take() {
            rec.recorder
                .metrics
                .client_error(ClientErrorKind::Cancelled);
            // No answer came; the wait so far is evidence of slowness only
            // if it is already past `slower_than`.
            let outcome = Outcome {
                error: None,
                waited: Some(rec.start.elapsed()),
                unanswered: true,
            };
            rec.record(ClientErrorKind::Cancelled.status().as_u16(), outcome);
        }
    }
}

/// What is recorded once the response is over.
pub(crate) struct Observation {
    pub(crate) rec: Recording,
    pub(crate) status: u16,
    /// What the answer says about the version; `None` for an answer the
    /// proxy made because of the client.
    pub(crate) evidence: Option<Evidence>,
    /// How the client's request body ended: an upstream that streams its
    /// answer while the request body still arrives (an echo) fails mid-body
    /// when the client breaks its body off, and that is the client's doing.
    pub(crate) upload: UploadState,
    /// For a gRPC call: the `grpc-status` seen so far.
    pub(crate) grpc: Option<GrpcSeen>,
}

/// What the observation learns of a gRPC call as its answer passes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GrpcSeen {
    /// The `grpc-status`: from the headers of a trailers-only answer, or
    /// from the trailers.
    status: Option<grpc::Code>,
    /// When the first frame after the head passed: the first message, or
    /// the trailers. A gRPC server sends its response head early, before
    /// the call's work is done, so this is when the call answered (see
    /// [`Observation::finish`]).
    answered: Option<Duration>,
}

impl GrpcSeen {
    pub(crate) fn new(status: Option<grpc::Code>) -> Self {
        GrpcSeen {
            status,
            answered: None,
        }
    }
}

/// An answer's evidence, as far as its head: the body may still fail.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Evidence {
    pub(crate) error: bool,
    /// Time to the response head (or to the proxy's own 502/504).
    pub(crate) waited: Duration,
}

impl Observation {
    /// Count a gRPC call by its status (an answer that ended without one
    /// is `other`), and say whether that status is an error of the version.
    fn grpc_error(&self) -> bool {
        let Some(seen) = self.grpc else {
            return false;
        };
        let code = seen.status.unwrap_or(grpc::Code::OTHER);
        self.rec
            .version()
            .metrics
            .grpc_answered(code.slot(), code.label());
        match self.rec.snap.policy() {
            Some(policy) => policy.grpc_error_codes.contains(code),
            None => grpc::GrpcCodes::default().contains(code),
        }
    }

    /// How long the version took to answer, for the latency objective: the
    /// time to the response head, except for a gRPC call, whose head says
    /// nothing. There it is the time to the call's first message or its
    /// trailers: for a unary call, the time to its answer (the message and
    /// the trailers go out together); for a streaming call, the time to its
    /// first message, since a stream may stay open as long as its client
    /// wants. A call that ended with neither answered at its end, unless its
    /// head held its status (a trailers-only answer).
    fn waited(&self, head: Duration) -> Duration {
        match self.grpc {
            // A trailers-only answer (its status in the head) answered then.
            Some(seen) => seen.answered.unwrap_or(match seen.status {
                Some(_) => head,
                None => self.rec.start.elapsed(),
            }),
            None => head,
        }
    }

    fn finish(self, failed_mid_body: bool) {
        let grpc_error = self.grpc_error();
        let client_fault = failed_mid_body.then(|| self.upload.fault(false)).flatten();
        let outcome = match (self.evidence, client_fault) {
            (_, Some(kind)) => {
                self.rec.recorder.metrics.client_error(kind);
                Outcome::default()
            }
            (Some(e), None) => {
                if failed_mid_body {
                    self.rec
                        .version()
                        .metrics
                        .upstream_error(UpstreamErrorKind::Reset);
                }
                Outcome {
                    error: Some(e.error || failed_mid_body || grpc_error),
                    waited: Some(self.waited(e.waited)),
                    unanswered: false,
                }
            }
            (None, None) => Outcome::default(),
        };
        self.rec.record(self.status, outcome);
    }
}

impl BodyHook<Box<dyn std::error::Error + Send + Sync>> for Observation {
    fn on_frame(&mut self, trailers: Option<&http::HeaderMap>) {
        if let Some(seen) = &mut self.grpc {
            if seen.answered.is_none() {
                seen.answered = Some(self.rec.start.elapsed());
            }
            if let Some(code) = trailers.and_then(grpc::status_of) {
                seen.status = Some(code);
            }
        }
    }

    fn end(self, how: End<'_, Box<dyn std::error::Error + Send + Sync>>) {
        match how {
            End::Complete | End::Dropped { .. } => self.finish(false),
            End::Failed(e) => {
                let name = &self.rec.version().name;
                if self.upload.fault(false).is_none()
                    && log_limit::allow(Some(name), LogKind::MidBody)
                {
                    tracing::warn!(version = %name, error = %e, "upstream response body failed mid-stream");
                }
                self.finish(true);
            }
        }
    }
}
