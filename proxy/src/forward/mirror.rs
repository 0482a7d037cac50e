//! `[mirror]`: a copy of a share of the requests other versions serve goes
//! to the mirror version too, for a dark launch (docs/routing.md). The
//! client only ever gets the primary's answer; the copy's is read to its
//! end, judged like a served answer, and dropped.
//!
//! The primary never waits for a copy. A bodiless request's copy is sent
//! from a task of its own at once. A request with a body is copied as the
//! body passes to the primary ([`Tee`], on the body in `upload`): the bytes
//! are copied, up to `max_body`, and the copy is sent when the body ends.
//! A copy holds a slot of `max_in_flight` from its choice to its end (body
//! buffer included), so copies hold at most `max_in_flight x max_body`
//! bytes; with no slot free, the copy is dropped, and counted. Each copy's
//! whole exchange, head and body, is bounded by `timeout`.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use http_body_util::{BodyExt, Either, Full};
use prometheus::IntGauge;

use super::observe::Recorder;
use super::{grpc, headers, UpstreamBody};
use crate::guard::Outcome;
use crate::metrics::{Metrics, UpstreamErrorKind};
use crate::routes::Mirror;
use crate::snapshot::Snapshot;
use crate::upstream::{SendError, Upstreams};

/// Marks a copy, so that the application can tell it from a user's request
/// and skip what must happen once (an email, a payment).
pub(super) const MIRROR_HEADER: HeaderName = HeaderName::from_static("x-canary-mirror");

/// What a copy needs to go out, apart from its body.
pub(crate) struct Copy {
    snap: Arc<Snapshot>,
    mirror: Mirror,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    host: Option<HeaderValue>,
    te_trailers: bool,
    grpc: bool,
    upstreams: Arc<Upstreams<UpstreamBody>>,
    recorder: Arc<Recorder>,
    _slot: Slot,
}

/// The request being copied, as it is sent to the primary.
pub(super) struct Request<'a> {
    pub(super) method: &'a Method,
    pub(super) uri: &'a Uri,
    pub(super) headers: &'a HeaderMap,
    pub(super) host: Option<&'a HeaderValue>,
    pub(super) te_trailers: bool,
    pub(super) grpc: bool,
    /// The body's length when it is known: `Some(0)` for none.
    pub(super) body_len: Option<u64>,
    pub(super) body_empty: bool,
}

/// Where a chosen copy's body comes from.
pub(crate) enum Chosen {
    /// A bodiless request: send it now.
    Now(Box<Copy>),
    /// Wait for the body: the tee goes on the client's body.
    Tee(Box<Tee>),
}

/// Whether the request that `served` serves is copied. `None` costs one
/// branch when `[mirror]` is off or its share is 0.
pub(super) fn choose(
    snap: &Arc<Snapshot>,
    served: usize,
    req: Request<'_>,
    upstreams: &Arc<Upstreams<UpstreamBody>>,
    recorder: &Arc<Recorder>,
) -> Option<Chosen> {
    let m = snap.table.mirror.as_ref()?;
    if m.share <= 0.0
        || served == m.version
        // A rolled-back mirror gets no more copies, until its reset.
        || snap.versions[m.version].rollback.is_some()
        || !m.methods.contains(req.method)
        || (m.share < 1.0 && fastrand::f64() >= m.share)
    {
        return None;
    }
    let metrics = &recorder.metrics;
    let name = &snap.versions[m.version].name;
    if !req.body_empty && req.body_len.is_some_and(|len| len > m.max_body) {
        metrics.mirror_dropped(name, "body_too_large");
        return None;
    }
    let Some(slot) = Slot::take(metrics, m.max_in_flight) else {
        metrics.mirror_dropped(name, "full");
        return None;
    };
    let mut headers = req.headers.clone();
    headers.insert(MIRROR_HEADER, HeaderValue::from_static("1"));
    let copy = Copy {
        snap: snap.clone(),
        mirror: m.clone(),
        method: req.method.clone(),
        uri: req.uri.clone(),
        headers,
        host: req.host.cloned(),
        te_trailers: req.te_trailers,
        grpc: req.grpc,
        upstreams: upstreams.clone(),
        recorder: recorder.clone(),
        _slot: slot,
    };
    Some(if req.body_empty {
        Chosen::Now(Box::new(copy))
    } else {
        let capacity = req.body_len.unwrap_or(0).min(m.max_body) as usize;
        Chosen::Tee(Box::new(Tee {
            buf: BytesMut::with_capacity(capacity),
            limit: m.max_body as usize,
            copy: Some(copy),
        }))
    })
}

/// A copy of the client's body as it passes to the primary. Dropped before
/// the body's end, the copy is dropped too, and counted.
pub(crate) struct Tee {
    buf: BytesMut,
    limit: usize,
    copy: Option<Copy>,
}

impl Tee {
    /// Copy a chunk of the body. The bytes are copied, not shared: a shared
    /// chunk would pin hyper's whole read buffer.
    pub(crate) fn push(&mut self, data: &Bytes) {
        if self.copy.is_none() {
            return;
        }
        if self.buf.len() + data.len() > self.limit {
            if let Some(copy) = self.copy.take() {
                copy.dropped("body_too_large");
            }
            self.buf = BytesMut::new();
            return;
        }
        self.buf.extend_from_slice(data);
    }

    /// The body ended whole: send the copy.
    pub(crate) fn finish(mut self) {
        if let Some(copy) = self.copy.take() {
            copy.send(std::mem::take(&mut self.buf).freeze());
        }
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        if let Some(copy) = self.copy.take() {
            copy.dropped("body_incomplete");
        }
    }
}

impl Copy {
    fn dropped(self, reason: &'static str) {
        let name = &self.snap.versions[self.mirror.version].name;
        self.recorder.metrics.mirror_dropped(name, reason);
    }

    /// Send the copy from a task of its own; nothing waits for it.
    pub(crate) fn send(self, body: Bytes) {
        tokio::spawn(self.exchange(body));
    }

    async fn exchange(self, body: Bytes) {
        let v = &self.snap.versions[self.mirror.version];
        let start = Instant::now();
        let lease = v.endpoints.pick(None);
        let result = match &lease {
            // Discovery has found no address: nothing can be sent.
            None => Err(UpstreamErrorKind::Connect),
            Some(lease) => {
                let req = headers::build_request(
                    self.method.clone(),
                    &self.uri,
                    self.headers.clone(),
                    v,
                    self.host.as_ref(),
                    self.te_trailers,
                    Either::Right(Full::new(body)),
                );
                let exchange = async {
                    let resp = self
                        .upstreams
                        .send(
                            &lease.endpoint.authority,
                            v.protocol,
                            req,
                            &v.metrics.upstream_connections,
                            false,
                            false,
                        )
                        .await
                        .map_err(|e| match e {
                            SendError::Connect(..) => UpstreamErrorKind::Connect,
                            SendError::Exchange(_) => UpstreamErrorKind::Reset,
                        })?;
                    let waited = start.elapsed();
                    let status = resp.status().as_u16();
                    let mut grpc_status = grpc::status_of(resp.headers());
                    // Read to the end: the answer is only whole, and the
                    // connection only reusable, once the body is.
                    let mut body = resp.into_body();
                    while let Some(frame) = body.frame().await {
                        let frame = frame.map_err(|_| UpstreamErrorKind::Reset)?;
                        if let Some(code) = frame.trailers_ref().and_then(grpc::status_of) {
                            grpc_status = Some(code);
                        }
                    }
                    Ok((status, waited, grpc_status))
                };
                match tokio::time::timeout(self.mirror.timeout, exchange).await {
                    Ok(result) => result,
                    Err(_) => Err(UpstreamErrorKind::Timeout),
                }
            }
        };
        let metrics = &self.recorder.metrics;
        let outcome = match result {
            Ok((status, waited, grpc_status)) => {
                metrics.mirror_ended(&v.name, Ok(status));
                let policy = self.snap.policy();
                let mut error = policy
                    .map(|p| p.error_codes.contains(status))
                    .unwrap_or(status >= 500);
                if self.grpc {
                    let code = grpc_status.unwrap_or(grpc::Code::OTHER);
                    error |= match policy {
                        Some(p) => p.grpc_error_codes.contains(code),
                        None => grpc::GrpcCodes::default().contains(code),
                    };
                }
                Outcome {
                    error: Some(error),
                    waited: Some(waited),
                    unanswered: false,
                }
            }
            Err(kind) => {
                metrics.mirror_ended(&v.name, Err(kind));
                Outcome {
                    error: Some(true),
                    waited: Some(start.elapsed()),
                    unanswered: false,
                }
            }
        };
        if let (Some(lease), Some(error)) = (&lease, outcome.error) {
            lease.report(!error);
        }
        // The copy's answer is evidence about the mirror version, exactly as
        // a served one would be: a canary can be stopped on shadow traffic.
        self.recorder.judge(&self.snap, v, outcome);
    }
}

/// One of `max_in_flight`, held by a copy from its choice to its end.
struct Slot(IntGauge);

impl Slot {
    fn take(metrics: &Metrics, max: u64) -> Option<Slot> {
        let gauge = metrics.mirror_in_flight.clone();
        // Two copies racing for the last slot may both give up: a copy
        // dropped now and then is the cost of no lock.
        gauge.inc();
        if gauge.get() > max as i64 {
            gauge.dec();
            return None;
        }
        Some(Slot(gauge))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.dec();
    }
}
