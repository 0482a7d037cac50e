//! The request path: pick a version from the current snapshot, rewrite the
//! request for it, send it over a pooled keep-alive connection (`upstream`),
//! and stream the answer back while [`ObservedBody`] records the outcome.
//!
//! Status codes for failures are decided in one place, [`Failure`]: a
//! connect failure or a reset before the response head is `502`, an upstream
//! timeout is `504`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use crate::control::Control;
use crate::guard;
use crate::metrics::UpstreamErrorKind;
use crate::snapshot::{Snapshot, VersionRuntime};
/// What [`Forwarder::handle`] returns: hyper's service future.
pub type Answer = Pin<Box<dyn Future<Output = Result<Response<ObservedBody>, Infallible>> + Send>>;

/// A request ready to go upstream, and what answering it needs later.
struct Plan {
    start: Instant,
    snap: Arc<Snapshot>,
    index: usize,
    request: Request<UpstreamBody>,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    original_host: Option<HeaderValue>,
    retry: Option<Retry>,
}

/// What a retry on the rollback target resends (a bodiless request).
struct Retry {
    method: http::Method,
    uri: Uri,
    headers: HeaderMap,
    target: usize,
}

use crate::upstream::{
    ConnectError, PooledBody, SendError, UpstreamBody, UpstreamConfig, Upstreams,
};

/// Knobs of the request path, from `run`'s flags.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response head; `None` waits forever.
    /// Bodies stream without a deadline, so long downloads are not cut.
    pub upstream_timeout: Option<Duration>,
    pub pool_idle_timeout: Duration,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Some(Duration::from_secs(60)),
            pool_idle_timeout: Duration::from_secs(90),
        }
    }
}

/// Where a request came from, for `X-Forwarded-*`. Built once per
/// connection, so keep-alive requests do not re-format the address.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    peer_ip: HeaderValue,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value");
        ConnInfo { peer, tls, peer_ip }
    }
}

pub struct Forwarder {
    control: Arc<Control>,
    upstreams: Arc<Upstreams>,
    config: ForwardConfig,
    /// Upgraded (WebSocket) tunnels, so shutdown can wait for them.
    tunnels: TaskTracker,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("config", &self.config)
            .finish()
    }
}

/// An exchange that produced no upstream response.
#[derive(Debug)]
enum Failure {
    Connect(ConnectError),
    Reset(hyper::Error),
    Timeout(Duration),
}

impl Failure {
    fn kind(&self) -> UpstreamErrorKind {
        match self {
            Failure::Connect(_) => UpstreamErrorKind::Connect,
            Failure::Reset(_) => UpstreamErrorKind::Reset,
            Failure::Timeout(_) => UpstreamErrorKind::Timeout,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Failure::Connect(_) | Failure::Reset(_) => StatusCode::BAD_GATEWAY,
            Failure::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    fn describe(&self, version: &VersionRuntime) -> String {
        let upstream = format!("{}://{}", version.scheme, version.authority);
        match self {
            Failure::Connect(e) => format!(
                "cannot connect to version {} at {upstream}: {}",
                version.name,
                source_chain(e)
            ),
            Failure::Reset(e) => format!(
                "version {} at {upstream} closed the connection: {}",
                version.name,
                source_chain(e)
            ),
            Failure::Timeout(d) => format!(
                "version {} at {upstream} sent no response within {}",
                version.name,
                humantime::format_duration(*d)
            ),
        }
    }
}

impl Forwarder {
    pub fn new(control: Arc<Control>, config: ForwardConfig) -> Arc<Self> {
        let upstreams = Upstreams::new(UpstreamConfig {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
        });
        Arc::new(Forwarder {
            control,
            upstreams,
            config,
            tunnels: TaskTracker::new(),
        })
    }

    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    pub fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    pub fn upstreams(&self) -> &Arc<Upstreams> {
        &self.upstreams
    }

    /// Serve one client request. Never fails: every failure becomes a
    /// response the client can read.
    ///
    /// The work that needs no waiting (choosing the version, rewriting the
    /// request) runs here, on the stack; the future holds only what must
    /// wait for the upstream. It is boxed, and so copied, on every request.
    pub fn handle(self: &Arc<Self>, req: Request<Incoming>, conn: &ConnInfo) -> Answer {
        match self.prepare(req, conn) {
            Ok(plan) => Box::pin(self.clone().forward(plan)),
            Err(resp) => Box::pin(std::future::ready(Ok(resp))),
        }
    }

    // The error is the proxy's own answer to a request it cannot route;
    // both variants are moved once, on the stack, so their size is moot.
    #[allow(clippy::result_large_err)]
    fn prepare(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> Result<Plan, Response<ObservedBody>> {
        let start = Instant::now();
        let snap = self.control.load();
        let Some(index) = snap.split.pick_random() else {
            // validate() forbids all-zero weights, so this is unreachable in
            // practice; answer rather than panic if it ever is.
            return Err(local_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no version has a weight above 0\n".into(),
            ));
        };
        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let original_host = host_of(&parts.headers, &parts.uri);
        prepare_headers(
            &mut parts.headers,
            conn,
            original_host.as_ref(),
            upgrade.is_some(),
        );
        // Keep what a retry on the target needs, only where one can happen:
        // a non-target version and a request with no body to replay.
        let retry = match snap.target() {
            Some(target) if target.index != index && body.is_end_stream() && upgrade.is_none() => {
                Some(Retry {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                    target: target.index,
                })
            }
            _ => None,
        };
        let first = &snap.versions[index];
        first.metrics.in_flight.inc();
        let request = build_request(
            parts.method,
            &parts.uri,
            parts.headers,
            first,
            original_host.as_ref(),
            Either::Left(body),
        );
        Ok(Plan {
            start,
            snap,
            index,
            request,
            upgrade,
            original_host,
            retry,
        })
    }

    async fn forward(
        self: Arc<Self>,
        mut plan: Plan,
    ) -> Result<Response<ObservedBody>, Infallible> {
        let snap = plan.snap.clone();
        let index = plan.index;
        let first = &snap.versions[index];
        let limit = self.config.upstream_timeout.unwrap_or(Duration::MAX);
        let mut answered_by = index;
        // One `.await` serves the first attempt and the retry, so this
        // future holds room for one exchange, not two.
        let outcome = loop {
            let attempt = &snap.versions[answered_by];
            // No limit is a deadline that never comes: one path for both.
            let exchange = self.upstreams.send(
                &attempt.authority,
                plan.request,
                &attempt.metrics.upstream_connections,
                plan.upgrade.is_some(),
            );
            let outcome = match tokio::time::timeout(limit, exchange).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(SendError::Connect(e))) => Err(Failure::Connect(e)),
                Ok(Err(SendError::Exchange(e))) => Err(Failure::Reset(e)),
                Err(_) => Err(Failure::Timeout(limit)),
            };
            let retryable = match (&outcome, &plan.retry) {
                // Nothing of the request reached the failed version.
                (Err(Failure::Connect(_)), Some(_)) => true,
                // The connection died before a response head (a killed pod,
                // a reset pooled connection). HTTP lets a client repeat an
                // idempotent request (RFC 9110 9.2.2), and this one had no
                // body.
                (Err(Failure::Reset(_)), Some(retry)) => is_idempotent(&retry.method),
                _ => false,
            };
            let (Some(retry), true) = (plan.retry.take(), retryable) else {
                break outcome;
            };
            // The target answers instead of the client seeing a 502. The
            // failure still counts against the failed version.
            let failure = outcome.as_ref().err().unwrap();
            let target_rt = &snap.versions[retry.target];
            tracing::warn!(version = %first.name, target = %target_rt.name, error = %failure.describe(first), "upstream failed before answering; retrying once on the rollback target");
            self.record_failed_attempt(&snap, index, failure.kind());
            first.metrics.retries.inc();
            first.metrics.in_flight.dec();
            target_rt.metrics.in_flight.inc();
            plan.request = build_request(
                retry.method,
                &retry.uri,
                retry.headers,
                target_rt,
                plan.original_host.as_ref(),
                Either::Right(Empty::new()),
            );
            answered_by = retry.target;
        };
        Ok(self.respond(&snap, plan.start, plan.upgrade, answered_by, outcome))
    }

    /// The client's response: the upstream's, or the proxy's own 502/504.
    fn respond(
        &self,
        snap: &Arc<Snapshot>,
        start: Instant,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
        answered_by: usize,
        outcome: Result<Response<PooledBody>, Failure>,
    ) -> Response<ObservedBody> {
        let version = &snap.versions[answered_by];
        let observation = |status: StatusCode, error: bool| Observation {
            snap: snap.clone(),
            control: self.control.clone(),
            index: answered_by,
            status: status.as_u16(),
            start,
            error,
        };
        match outcome {
            Ok(mut resp) => {
                let status = resp.status();
                let error = snap
                    .table
                    .rollback
                    .as_ref()
                    .map(|p| p.error_codes.contains(status.as_u16()))
                    .unwrap_or(status.is_server_error());
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_side) = upgrade {
                        self.spawn_tunnel(
                            client_side,
                            hyper::upgrade::on(&mut resp),
                            version.name.clone(),
                        );
                    }
                } else {
                    strip_hop_by_hop(resp.headers_mut());
                }
                let obs = observation(status, error);
                resp.map(|b| ObservedBody {
                    inner: Either::Left(b),
                    obs: Some(obs),
                })
            }
            Err(failure) => {
                let message = failure.describe(version);
                tracing::warn!(version = %version.name, kind = failure.kind().as_str(), error = %message, "upstream request failed");
                version.metrics.upstream_error(failure.kind());
                let status = failure.status();
                let mut resp = Response::new(ObservedBody {
                    inner: Either::Right(Full::new(Bytes::from(format!("{status}: {message}\n")))),
                    obs: Some(observation(status, true)),
                });
                *resp.status_mut() = status;
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp
            }
        }
    }

    /// Count a failed attempt that another version answered: the error
    /// counts against the version that failed, in its window and metrics,
    /// but the request is counted once, under the version that answered.
    fn record_failed_attempt(&self, snap: &Snapshot, index: usize, kind: UpstreamErrorKind) {
        let v = &snap.versions[index];
        v.metrics.upstream_error(kind);
        observe_window(&self.control, v, true);
    }

    fn spawn_tunnel(
        &self,
        client: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
        version: Arc<str>,
    ) {
        self.tunnels.spawn(async move {
            let (client, upstream) = tokio::join!(client, upstream);
            match (client, upstream) {
                (Ok(c), Ok(u)) => {
                    let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                    match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                        Ok((up, down)) => tracing::debug!(%version, up, down, "tunnel closed"),
                        Err(e) => tracing::debug!(%version, error = %e, "tunnel ended with an error"),
                    }
                }
                (c, u) => tracing::warn!(%version, client = ?c.err(), upstream = ?u.err(), "upgrade failed"),
            }
        });
    }
}

/// Record one request in the version's window and, for a version that may
/// be rolled back, ask the guard whether the evidence is now enough.
fn observe_window(control: &Arc<Control>, v: &VersionRuntime, error: bool) {
    let now = control.now();
    v.window.record(now, error);
    if let Some(policy) = &v.guard {
        if !v.window.is_latched() {
            let totals = v.window.totals(now);
            if guard::should_trip(policy, totals) {
                control.trip(&v.name, &v.window, totals);
            }
        }
    }
}

/// Headers that describe one connection, not the message (RFC 9110
/// section 7.6.1). A proxy must not forward them.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    if let Some(named) = headers
        .get_all(header::CONNECTION)
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .reduce(|a, b| a + "," + &b)
    {
        for name in named.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                headers.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Methods a client may repeat without changing the outcome (RFC 9110 9.2.2).
fn is_idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

/// The host the client asked for: the Host header (HTTP/1.1) or the
/// `:authority` (h2, which hyper puts in the URI).
fn host_of(headers: &HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    headers.get(header::HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

fn prepare_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
    upgrade: bool,
) {
    let upgrade_value = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(headers);
    if let Some(value) = upgrade_value {
        // An upgrade is the one hop-by-hop exchange a proxy passes on, so
        // the upstream can agree to it (RFC 9110 7.8).
        headers.insert(header::UPGRADE, value);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Append, so a chain of proxies keeps its history (the client's claim
    // stays first; the address we saw is last and the one to trust).
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        None => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

fn build_request(
    method: http::Method,
    uri: &Uri,
    mut headers: HeaderMap,
    version: &VersionRuntime,
    host: Option<&HeaderValue>,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    // Reuse the parsed path instead of formatting and re-parsing a URI.
    // hyper writes the URI as given: origin-form (`/path?query`), which is
    // what an HTTP/1.1 request to an origin server carries (RFC 9112 3.2.1).
    let upstream_uri = Uri::from(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    // Host as the client sent it, unless the version asks for rewriting.
    let host = if version.rewrite_host {
        Some(&version.authority_header)
    } else {
        host
    };
    match host {
        Some(h) => {
            headers.insert(header::HOST, h.clone());
        }
        None => {
            headers.insert(header::HOST, version.authority_header.clone());
        }
    }
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = upstream_uri;
    // Upstreams speak HTTP/1.1; an h2 client is downgraded here.
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

fn local_response(status: StatusCode, body: String) -> Response<ObservedBody> {
    let mut resp = Response::new(ObservedBody {
        inner: Either::Right(Full::new(Bytes::from(body))),
        obs: None,
    });
    *resp.status_mut() = status;
    resp
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// What is recorded once the response is over.
struct Observation {
    snap: Arc<Snapshot>,
    control: Arc<Control>,
    index: usize,
    status: u16,
    start: Instant,
    /// The answer counts as an error for rollback (status in the error set,
    /// or the proxy's own 502/504).
    error: bool,
}

impl Observation {
    fn finish(self, reset: bool) {
        let v = &self.snap.versions[self.index];
        v.metrics.in_flight.dec();
        v.metrics.answered(self.status, self.start.elapsed());
        if reset {
            v.metrics.upstream_error(UpstreamErrorKind::Reset);
        }
        observe_window(&self.control, v, self.error || reset);
    }
}

/// The response body, streamed from the upstream (or made by the proxy),
/// that records its request exactly once: at its end, on an upstream error
/// mid-body, or when the client goes away (dropped unfinished, which is not
/// the upstream's fault and counts as no error).
pub struct ObservedBody {
    inner: Either<PooledBody, Full<Bytes>>,
    obs: Option<Observation>,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(obs) = this.obs.take() {
                    obs.finish(false);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(obs) = this.obs.take() {
                    let v = &obs.snap.versions[obs.index];
                    tracing::warn!(version = %v.name, error = %e, "upstream response body failed mid-stream");
                    obs.finish(true);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(obs) = self.obs.take() {
            obs.finish(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        let conn = ConnInfo::new("127.0.0.7:5000".parse().unwrap(), false);
        prepare_headers(
            &mut h,
            &conn,
            Some(&HeaderValue::from_static("example.com")),
            false,
        );
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 127.0.0.7");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "example.com");
    }
}
