//! The request path, one stage per file:
//!
//! 1. [`target`]: which host the request is for, or why the proxy refuses
//!    to forward it (`400` for a bad `Host`, `501` for `CONNECT`);
//! 2. this file: pick a version with `split` from the current snapshot, send
//!    the request over a pooled connection (`upstream`), and turn the
//!    outcome into the client's response;
//! 3. [`headers`]: rewrite the request for the upstream and the response for
//!    the client;
//! 4. [`retry`]: the one retry on the rollback target;
//! 5. [`upgrade`]: WebSocket tunnels;
//! 6. [`upload`]: note how the client's request body ended, so that a
//!    failure the client caused is charged to the client;
//! 7. [`observe`]: record every answer once, and pass verdicts on;
//! 8. [`answer`]: the proxy's own answers, short and with a request id;
//!    [`log_limit`]: the rate limit on the per-request log lines.
//!
//! Status codes for failures are decided in one place, [`Failure`], by the
//! failure's source. The upstream's: a connect failure, a reset before the
//! response head, or a `101` the client did not ask for is `502`, an
//! upstream timeout is `504`. The client's: a malformed request body is
//! `400`, a body too slow to arrive before the upstream deadline is `408`, a
//! client that went away is `499` (logged and counted; nobody is left to
//! read it).

mod answer;
mod choose;
mod grpc;
mod headers;
mod log_limit;
mod mirror;
mod observe;
mod retry;
mod target;
mod upgrade;
mod upload;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::body::Hooked;
use crate::endpoints::{Endpoint, Lease};
use crate::guard::{Outcome, Verdicts};
use crate::metrics::{ClientErrorKind, Metrics, UpstreamErrorKind};
use crate::snapshot::{Store, VersionRuntime};
use crate::upstream::{ConnectError, PooledBody, SendBody, SendError, UpstreamConfig, Upstreams};

use answer::RequestId;
use log_limit::LogKind;
pub(crate) use observe::ObservedBody;
use observe::{Evidence, GrpcSeen, Observation, Pending, Recorder, Recording};
use retry::Retry;
use target::Refusal;
use upload::{ClientBody, UploadState};

/// Body sent upstream: the client's, streamed; nothing, on a retry; or a
/// whole copy, for `[mirror]`.
pub(crate) type UpstreamBody = Either<ClientBody, Full<Bytes>>;

impl SendBody for UpstreamBody {
    fn empty() -> Self {
        Either::Right(Full::default())
    }
}

/// What [`Forwarder::handle`] returns: hyper's service future.
pub(crate) type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<ObservedBody>, Infallible>> + Send>>;

/// How long an upstream connection takes new requests by default: long
/// enough that reconnecting costs nothing measurable, short enough that a
/// Service's new pods get connections within minutes of a scale-up.
pub(crate) const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(120);

/// Knobs of the request path, from `run`'s flags.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    pub connect_timeout: Duration,
    /// Time allowed for the upstream's response head; `None` waits forever.
    /// Bodies stream without a deadline, so long downloads are not cut.
    pub upstream_timeout: Option<Duration>,
    pub pool_idle_timeout: Duration,
    /// No upstream connection is given a new request once it is this old
    /// (`None`: no limit); see `upstream::UpstreamConfig::max_age`.
    pub upstream_max_connection_age: Option<Duration>,
    /// A request body must arrive at `request_body_min_rate` bytes per
    /// second on average after this grace, or it is cut and answered 408
    /// (see `forward::upload`).
    pub request_body_grace: Duration,
    pub request_body_min_rate: u64,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        ForwardConfig {
            connect_timeout: Duration::from_secs(2),
            upstream_timeout: Some(Duration::from_secs(60)),
            pool_idle_timeout: Duration::from_secs(90),
            upstream_max_connection_age: Some(DEFAULT_MAX_CONNECTION_AGE),
            request_body_grace: Duration::from_secs(30),
            request_body_min_rate: 4096,
        }
    }
}

impl ForwardConfig {
    fn pace(&self) -> upload::Pace {
        upload::Pace {
            grace: self.request_body_grace,
            min_rate: self.request_body_min_rate,
        }
    }
}

/// Where a request came from, for `X-Forwarded-*`. Built once per
/// connection, so keep-alive requests do not re-format the address.
#[derive(Debug, Clone)]
pub(crate) struct ConnInfo {
    pub(crate) peer: SocketAddr,
    pub(crate) tls: bool,
    peer_ip: HeaderValue,
}

impl ConnInfo {
    pub(crate) fn new(peer: SocketAddr, tls: bool) -> Self {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value");
        ConnInfo { peer, tls, peer_ip }
    }
}

/// The request path of one event loop, with its own upstream pool.
pub(crate) struct Forwarder {
    recorder: Arc<Recorder>,
    upstreams: Arc<Upstreams<UpstreamBody>>,
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

/// A request ready to go upstream, and what answering it needs later.
struct Plan {
    /// Recorded once, even if the client gives up before the answer.
    pending: Pending,
    request: Request<UpstreamBody>,
    upload: UploadState,
    upgrade: Option<hyper::upgrade::OnUpgrade>,
    original_host: Option<HeaderValue>,
    retry: Option<Retry>,
    /// Idempotent and bodiless: may go out again on a new connection if a
    /// long-idle pooled one was closed under it (see `upstream`).
    replayable: bool,
    /// The rollback target, when the first version is not it and a retry
    /// there can happen at all.
    target: Option<usize>,
    call: Call,
    /// The endpoint a connect failure just came from, when the request goes
    /// to another endpoint of the same version (once).
    failed_endpoint: Option<Arc<Endpoint>>,
    /// `[sticky] set_cookie`: the key this request was routed by, for the
    /// browser to send next time.
    set_cookie: Option<HeaderValue>,
}

/// What the request asked for that outlives its hop-by-hop headers.
#[derive(Debug, Clone, Copy)]
struct Call {
    /// A gRPC call (see `grpc`).
    grpc: bool,
    /// The client's TE asked for trailers (gRPC clients do).
    te_trailers: bool,
    /// The call's own deadline (`grpc-timeout`).
    deadline: Option<Duration>,
}

/// An exchange that produced no upstream response, by whose fault.
#[derive(Debug)]
enum Failure {
    Connect(ConnectError),
    Reset(hyper::Error),
    /// The upstream answered `101 Switching Protocols` to a request that
    /// asked for no upgrade. Nothing can be done with it: the connection
    /// now speaks a protocol nobody agreed on, and an HTTP/2 client cannot
    /// even be sent a 101 (RFC 9113 8.6). It is counted as a `reset` (the
    /// kinds are connect, timeout and reset; a new kind would need a new
    /// label value): like a reset, the request reached the version and the
    /// exchange ended with no answer the client can be given.
    UnaskedUpgrade,
    Timeout(Duration),
    /// The client's request body broke, stopped, or came too slowly.
    Client(ClientErrorKind, Option<hyper::Error>),
}

impl Failure {
    /// The upstream's fault, if it is one.
    fn upstream_kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            Failure::Connect(_) => Some(UpstreamErrorKind::Connect),
            Failure::Reset(_) | Failure::UnaskedUpgrade => Some(UpstreamErrorKind::Reset),
            Failure::Timeout(_) => Some(UpstreamErrorKind::Timeout),
            Failure::Client(..) => None,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            Failure::Connect(_) | Failure::Reset(_) | Failure::UnaskedUpgrade => {
                StatusCode::BAD_GATEWAY
            }
            Failure::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Failure::Client(kind, _) => kind.status(),
        }
    }

    /// What the client reads: stable, and nothing about the version or its
    /// address (those are in [`Failure::describe`], for the log).
    fn text(&self) -> &'static str {
        match self {
            Failure::Connect(_) | Failure::Reset(_) | Failure::UnaskedUpgrade => {
                "the upstream failed"
            }
            Failure::Timeout(_) => "the upstream did not answer in time",
            Failure::Client(ClientErrorKind::Malformed, _) => "the request body is malformed",
            Failure::Client(ClientErrorKind::Timeout, _) => {
                "the request body did not arrive in time"
            }
            Failure::Client(ClientErrorKind::Aborted | ClientErrorKind::Cancelled, _) => {
                "the client went away"
            }
        }
    }

    /// The failure in full, for the log line.
    fn describe(&self, version: &VersionRuntime) -> String {
        let upstream = format!("{}://{}", version.scheme, version.authority);
        match self {
            Failure::Client(kind, e) => format!(
                "{} while sending to version {} at {upstream}{}",
                kind.describe(),
                version.name,
                e.as_ref()
                    .map(|e| format!(": {}", source_chain(e)))
                    .unwrap_or_default()
            ),
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
            Failure::UnaskedUpgrade => format!(
                "version {} at {upstream} answered 101 Switching Protocols to a request that asked for no upgrade",
                version.name
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
    pub(crate) fn new(
        store: Arc<Store>,
        verdicts: Arc<dyn Verdicts>,
        metrics: Arc<Metrics>,
        config: ForwardConfig,
    ) -> Arc<Self> {
        let upstreams = Upstreams::new(UpstreamConfig {
            connect_timeout: config.connect_timeout,
            idle_timeout: config.pool_idle_timeout,
            max_age: config.upstream_max_connection_age,
        });
        Arc::new(Forwarder {
            recorder: Arc::new(Recorder {
                store,
                verdicts,
                metrics,
            }),
            upstreams,
            config,
            tunnels: TaskTracker::new(),
        })
    }

    pub(crate) fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    pub(crate) fn upstreams(&self) -> &Arc<Upstreams<UpstreamBody>> {
        &self.upstreams
    }

    /// Serve one client request. Never fails: every failure becomes a
    /// response the client can read.
    ///
    /// The work that needs no waiting (choosing the version, rewriting the
    /// request) runs here, on the stack; the future holds only what must
    /// wait for the upstream. It is boxed, and so copied, on every request.
    pub(crate) fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        conn: &ConnInfo,
    ) -> ResponseFuture {
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
        let original_host = match target::host_of(&req) {
            Ok(host) => host,
            Err(refusal) => return Err(self.refuse(refusal, conn)),
        };
        let snap = self.recorder.store.load();
        let Some(choice) = choose::choose(
            &snap,
            req.headers_mut(),
            conn.peer.ip(),
            &conn.peer_ip,
            conn.tls,
        ) else {
            // validate() forbids all-zero weights, so this is unreachable in
            // practice; answer rather than panic if it ever is.
            let id = RequestId::new();
            if log_limit::allow(None, LogKind::NoVersion) {
                tracing::error!(request_id = %id, "no version has a weight above 0");
            }
            return Err(answer::response(
                StatusCode::SERVICE_UNAVAILABLE,
                "no version has a weight above 0",
                id,
            )
            .map(|b| Hooked::plain(Either::Right(b))));
        };
        let index = choice.index;
        if choice.overridden {
            self.recorder
                .metrics
                .override_request(&snap.versions[index].name);
        }
        let upgrade = upgrade::is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let call = Call {
            grpc: grpc::is_grpc(&parts.headers),
            te_trailers: headers::wants_trailers(&parts.headers),
            deadline: grpc::timeout(&parts.headers),
        };
        headers::prepare_headers(
            &mut parts.headers,
            conn,
            original_host.as_ref(),
            upgrade.is_some(),
        );
        let replayable =
            retry::is_idempotent(&parts.method) && body.is_end_stream() && upgrade.is_none();
        // A retry on the target can happen from a version that is not the
        // target, and not for an upgrade.
        let target = snap
            .target()
            .filter(|t| t.index != index && upgrade.is_none())
            .map(|t| t.index);
        // A failure to connect hands the request back, body and all; after
        // a reset only a copy can go again, kept only for a request with no
        // body to replay.
        let retry = (target.is_some() && body.is_end_stream()).then(|| Retry {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
        });
        let first = &snap.versions[index];
        first.metrics.in_flight.inc();
        if snap.table.mirror.is_some() {
            // Only the proxy marks a copy: a client cannot pass a request
            // off as one, to slip past what the application skips for them.
            parts.headers.remove(mirror::MIRROR_HEADER);
        }
        let copy = mirror::choose(
            &snap,
            index,
            mirror::Request {
                method: &parts.method,
                uri: &parts.uri,
                headers: &parts.headers,
                host: original_host.as_ref(),
                te_trailers: call.te_trailers,
                grpc: call.grpc,
                body_len: body.size_hint().exact(),
                body_empty: body.is_end_stream(),
            },
            &self.upstreams,
            &self.recorder,
        );
        let tee = match copy {
            None => None,
            Some(mirror::Chosen::Now(copy)) => {
                (*copy).send(Bytes::new());
                None
            }
            Some(mirror::Chosen::Tee(tee)) => Some(tee),
        };
        let (body, upload) = upload::watch(body, self.config.pace(), tee);
        let request = headers::build_request(
            parts.method,
            &parts.uri,
            parts.headers,
            first,
            original_host.as_ref(),
            call.te_trailers,
            Either::Left(body),
        );
        let pending = Pending::new(Recording {
            endpoint: None,
            snap,
            recorder: self.recorder.clone(),
            index,
            start,
        });
        Ok(Plan {
            pending,
            request,
            upload,
            upgrade,
            original_host,
            retry,
            replayable,
            target,
            call,
            failed_endpoint: None,
            set_cookie: choice.set_cookie,
        })
    }

    async fn forward(
        self: Arc<Self>,
        mut plan: Plan,
    ) -> Result<Response<ObservedBody>, Infallible> {
        let snap = plan.pending.recording().snap.clone();
        let first = &snap.versions[plan.pending.recording().index];
        // A gRPC call's own deadline can only shorten the wait.
        let limit = match (self.config.upstream_timeout, plan.call.deadline) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(Duration::MAX),
        };
        // One `.await` serves the first attempt and the retry, so this
        // future holds room for one exchange, not two.
        let outcome = loop {
            let attempt = &snap.versions[plan.pending.recording().index];
            // The request, when a failure to connect gave it back.
            let mut unsent = None;
            let lease = self.endpoint(attempt, plan.failed_endpoint.as_ref()).await;
            let Some(lease) = lease else {
                // Discovery has found no address (yet): like a connect
                // failure, nothing was sent.
                let failure = Failure::Connect(ConnectError::NoEndpoints);
                match plan.target.take() {
                    Some(target) => {
                        let target_rt = &snap.versions[target];
                        if log_limit::allow(Some(&first.name), LogKind::Retry) {
                            tracing::warn!(version = %first.name, target = %target_rt.name, "the version has no endpoint; retrying once on the rollback target");
                        }
                        self.record_failed_attempt(plan.pending.recording(), &failure);
                        first.metrics.retries.inc();
                        plan.pending.switch_to(target);
                        plan.request = headers::retarget(
                            plan.request,
                            target_rt,
                            plan.original_host.as_ref(),
                            plan.call.te_trailers,
                        );
                        continue;
                    }
                    None => break Err(failure),
                }
            };
            // No limit is a deadline that never comes: one path for both.
            // Pinned where it is made, so that `timeout` and its `.await`
            // move a reference rather than the whole exchange future (two
            // copies of it per request otherwise, by callgrind).
            let answered = {
                let exchange = std::pin::pin!(self.upstreams.send(
                    &lease.endpoint.authority,
                    attempt.protocol,
                    plan.request,
                    &attempt.metrics.upstream_connections,
                    plan.upgrade.is_some(),
                    plan.replayable,
                ));
                tokio::time::timeout(limit, exchange).await
            };
            let outcome = match answered {
                // Dropping the response closes that upstream connection,
                // which hyper has already given up on after a 101.
                Ok(Ok(resp))
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
                        && plan.upgrade.is_none() =>
                {
                    Err(Failure::UnaskedUpgrade)
                }
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(SendError::Connect(e, returned))) => {
                    unsent = returned.map(|b| *b);
                    Err(Failure::Connect(e))
                }
                Ok(Err(SendError::Exchange(e))) => Err(match plan.upload.fault(false) {
                    Some(kind) => Failure::Client(kind, Some(e)),
                    None => Failure::Reset(e),
                }),
                Err(_) => Err(match plan.upload.fault(true) {
                    Some(kind) => Failure::Client(kind, None),
                    None => Failure::Timeout(limit),
                }),
            };
            let failure = match &outcome {
                Err(failure) => failure,
                Ok(_) => {
                    plan.pending.hold(lease);
                    break outcome;
                }
            };
            // A pod that could not be reached: another pod of the same
            // version first, once, when the request came back whole. The
            // failure ejects pods, not versions: it is counted, but is no
            // evidence against the version if a sibling answers.
            if let (Failure::Connect(_), Some(request)) = (failure, unsent.take()) {
                lease.report(false);
                if plan.failed_endpoint.is_none() && attempt.endpoints.list().len() > 1 {
                    attempt.metrics.upstream_error(UpstreamErrorKind::Connect);
                    if log_limit::allow(Some(&attempt.name), LogKind::Retry) {
                        tracing::warn!(version = %attempt.name, endpoint = %lease.endpoint.addr, error = %failure.describe(attempt), "endpoint failed before answering; retrying once on another endpoint of the version");
                    }
                    plan.failed_endpoint = Some(lease.endpoint.clone());
                    plan.request = request;
                    continue;
                }
                unsent = Some(request);
            } else if failure.upstream_kind().is_some() {
                lease.report(false);
            } else {
                plan.pending.hold(lease);
            }
            let Some(target) = plan.target.take() else {
                break outcome;
            };
            let target_rt = &snap.versions[target];
            let again = match (failure, unsent, plan.retry.take()) {
                // Nothing left the proxy: the very request goes, whatever
                // its method and body.
                (Failure::Connect(_), Some(request), _) => headers::retarget(
                    request,
                    target_rt,
                    plan.original_host.as_ref(),
                    plan.call.te_trailers,
                ),
                (failure, _, Some(copy)) if copy.allowed_after(failure) => headers::build_request(
                    copy.method,
                    &copy.uri,
                    copy.headers,
                    target_rt,
                    plan.original_host.as_ref(),
                    plan.call.te_trailers,
                    Either::Right(Full::default()),
                ),
                _ => break outcome,
            };
            // The target answers instead of the client seeing a 502. The
            // failure still counts against the failed version.
            if log_limit::allow(Some(&first.name), LogKind::Retry) {
                tracing::warn!(version = %first.name, target = %target_rt.name, error = %failure.describe(first), "upstream failed before answering; retrying once on the rollback target");
            }
            self.record_failed_attempt(plan.pending.recording(), failure);
            first.metrics.retries.inc();
            plan.pending.switch_to(target);
            plan.failed_endpoint = None;
            plan.request = again;
        };
        let mut response = self.respond(
            plan.pending.answered(),
            plan.upgrade,
            plan.upload,
            plan.call,
            outcome,
        );
        if let Some(cookie) = plan.set_cookie {
            response
                .headers_mut()
                .append(http::header::SET_COOKIE, cookie);
        }
        Ok(response)
    }

    /// The client's response: the upstream's, or the proxy's own answer to
    /// a failure.
    fn respond(
        &self,
        rec: Recording,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
        upload: UploadState,
        call: Call,
        outcome: Result<Response<PooledBody<UpstreamBody>>, Failure>,
    ) -> Response<ObservedBody> {
        let waited = rec.start.elapsed();
        // Everything read from the version happens before `rec` moves into
        // the observation.
        let version = &rec.snap.versions[rec.index];
        match outcome {
            Ok(mut resp) => {
                let status = resp.status();
                let error = rec
                    .snap
                    .policy()
                    .map(|p| p.error_codes.contains(status.as_u16()))
                    .unwrap_or(status.is_server_error());
                if status == StatusCode::SWITCHING_PROTOCOLS {
                    if let Some(client_side) = upgrade {
                        upgrade::spawn_tunnel(
                            &self.tunnels,
                            client_side,
                            hyper::upgrade::on(&mut resp),
                            version.name.clone(),
                        );
                    }
                } else {
                    headers::prepare_response(resp.headers_mut());
                }
                // A trailers-only gRPC answer has its status in the headers;
                // any other has it in the trailers, which the observation
                // reads as they pass.
                let grpc = call
                    .grpc
                    .then(|| GrpcSeen::new(grpc::status_of(resp.headers())));
                let obs = Observation {
                    rec,
                    status: status.as_u16(),
                    evidence: Some(Evidence { error, waited }),
                    upload,
                    grpc,
                };
                resp.map(|b| Hooked::new(Either::Left(b), obs))
            }
            Err(failure) => {
                // The details go to the log under this id; the client gets
                // the id and a short text (see `answer`).
                let id = RequestId::new();
                let status = failure.status();
                let evidence = match &failure {
                    Failure::Client(kind, _) => {
                        if log_limit::allow(Some(&version.name), LogKind::Client(*kind)) {
                            tracing::info!(version = %version.name, kind = kind.as_str(), status = status.as_u16(), request_id = %id, error = %failure.describe(version), "request failed on the client's side; not counted against the version");
                        }
                        self.recorder.metrics.client_error(*kind);
                        None
                    }
                    upstream => {
                        let kind = upstream.upstream_kind().expect("not the client's");
                        if log_limit::allow(Some(&version.name), LogKind::Upstream(kind)) {
                            tracing::warn!(version = %version.name, kind = kind.as_str(), status = status.as_u16(), request_id = %id, error = %failure.describe(version), "upstream request failed");
                        }
                        version.metrics.upstream_error(kind);
                        Some(Evidence {
                            error: true,
                            waited,
                        })
                    }
                };
                // A gRPC call gets the answer gRPC clients expect from a
                // proxy for the upstream's failures: 200 with a grpc-status.
                let grpc_code = (call.grpc && evidence.is_some()).then_some(match failure {
                    Failure::Timeout(_) => grpc::DEADLINE_EXCEEDED,
                    _ => grpc::UNAVAILABLE,
                });
                let (answered, response) = match grpc_code {
                    Some(code) => (
                        StatusCode::OK,
                        grpc::failure_response(code, failure.text(), id),
                    ),
                    None => (status, answer::response(status, failure.text(), id)),
                };
                let obs = Observation {
                    rec,
                    status: answered.as_u16(),
                    evidence,
                    upload,
                    grpc: grpc_code.map(|c| GrpcSeen::new(Some(grpc::Code(c)))),
                };
                response.map(|b| Hooked::new(Either::Right(b), obs))
            }
        }
    }

    /// An endpoint of `v` for one attempt, other than `except`. A version
    /// whose discovery has not answered yet is waited for, up to the
    /// connect timeout: a proxy just started, or a version just added.
    async fn endpoint(&self, v: &VersionRuntime, except: Option<&Arc<Endpoint>>) -> Option<Lease> {
        if let Some(lease) = v.endpoints.pick(except) {
            return Some(lease);
        }
        if v.endpoints.discovery && except.is_none() {
            v.endpoints.wait_ready(self.config.connect_timeout).await;
            return v.endpoints.pick(None);
        }
        None
    }

    /// Count a failed attempt that another version answered: the error
    /// counts against the version that failed, in its evidence and metrics,
    /// but the request is counted once, under the version that answered.
    /// Only upstream failures are retried, so this one is the upstream's.
    fn record_failed_attempt(&self, rec: &Recording, failure: &Failure) {
        let v = &rec.snap.versions[rec.index];
        if let Some(kind) = failure.upstream_kind() {
            v.metrics.upstream_error(kind);
        }
        let outcome = Outcome {
            error: Some(true),
            waited: Some(rec.start.elapsed()),
            unanswered: false,
        };
        self.recorder.judge(&rec.snap, v, outcome);
    }
}

impl Forwarder {
    /// The proxy's answer to a request it will not forward: counted as the
    /// client's fault where a kind fits (see [`Refusal::client_error`]),
    /// never against a version, and logged at info, rate-limited.
    fn refuse(&self, refusal: Refusal, conn: &ConnInfo) -> Response<ObservedBody> {
        let id = RequestId::new();
        let status = refusal.status();
        if let Some(kind) = refusal.client_error() {
            self.recorder.metrics.client_error(kind);
        }
        if log_limit::allow(None, LogKind::Refused(refusal)) {
            tracing::info!(peer = %conn.peer, kind = refusal.as_str(), status = status.as_u16(), request_id = %id, reason = refusal.text(), "request refused; not forwarded");
        }
        answer::response(status, refusal.text(), id).map(|b| Hooked::plain(Either::Right(b)))
    }
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
