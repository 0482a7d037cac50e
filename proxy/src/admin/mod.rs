//! The admin port: `/healthz`, `/readyz`, `/metrics`, `/status`, and the
//! status page at `/` (see [`page`]).
//! It lives on a listener of its own so that it is never exposed through the
//! LoadBalancer with the traffic port. It only reads: typed views of the
//! published snapshot (`status`) and the metrics registry.
//!
//! It shares the process's descriptors and memory with the traffic port, so
//! it has limits of its own: HTTP/1.1 only (its clients are probes, a
//! Prometheus scraper and people with curl or a browser), a request head
//! within [`HEADER_TIMEOUT`], which also closes an idle keep-alive
//! connection, at most [`MAX_CONNECTIONS`] connections, and at most
//! [`MAX_LIFETIME`] per connection (a client that stops reading an answer
//! cannot hold it).

mod page;
mod status;

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::guard::Criterion;
use crate::server;
use status::ProgressView;
use status::{JudgmentView, Status};

/// Whether the proxy wants new traffic: `/readyz`, turned off by the
/// shutdown sequence.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    draining: AtomicBool,
}

impl Readiness {
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub(crate) fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }
}

/// A request head must be complete this long after the connection opened,
/// or after the previous answer (so it also closes idle keep-alives).
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once; more are closed at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// No admin connection lives longer than this.
pub(crate) const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// Serve the admin endpoints until `stop` is cancelled.
pub(crate) async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    readiness: Arc<Readiness>,
    stop: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(16 << 10);
    let builder = Arc::new(builder);
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    server::accept_until(&listener, &stop, "admin", |stream, peer| {
        if open.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(%peer, "admin connection limit reached; closing");
            return;
        }
        let (control, readiness, builder, stop, open) = (
            control.clone(),
            readiness.clone(),
            builder.clone(),
            stop.clone(),
            open.clone(),
        );
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&req, &control, &readiness);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(MAX_LIFETIME, conn) => {}
                _ = stop.cancelled() => {}
            }
            open.fetch_sub(1, Ordering::Relaxed);
        });
    })
    .await;
}

fn route(
    req: &Request<Incoming>,
    control: &Control,
    readiness: &Readiness,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served on the admin port\n",
        );
    }
    if let Some(asset) = page::asset(req.uri().path()) {
        return page::response(asset);
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/metrics" => {
            refresh_gauges(control);
            let mut resp = Response::new(Full::new(Bytes::from(control.metrics().encode())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/status" => {
            let store = control.store();
            // Up to this instant, not to the last tick: two replicas read at
            // the same moment agree, whatever the phase of their tickers.
            control.tick();
            let (snap, now) = (store.load(), store.now());
            let progress = control.progress(|run| {
                ProgressView::new(run, run.version_name(), now, store.clock().wall())
            });
            let status = Status::new(&snap, &control.reload_status(), now, progress);
            let mut body = serde_json::to_vec_pretty(&status).expect("status is plain JSON");
            body.push(b'\n');
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; the admin port serves / (the status page), /healthz, /readyz, /metrics and /status\n",
        ),
    }
}

/// The gauges computed from the judgments, set just before a scrape rather
/// than on every request.
fn refresh_gauges(control: &Control) {
    let store = control.store();
    let snap = store.load();
    let now = store.now();
    for v in snap.versions.iter() {
        let metrics = control.metrics();
        metrics.set_error_ratio(&v.name, v.judgment.totals(now).ratio());
        let view = JudgmentView::new(v, snap.policy(), now);
        let evidence: Vec<_> = [
            (Criterion::Errors, &view.errors),
            (Criterion::Latency, &view.latency),
        ]
        .into_iter()
        .filter_map(|(c, view)| Some((c, view.as_ref()?.evidence)))
        .collect();
        metrics.set_judgment(&v.name, &evidence, view.is_held());
        let list = v.endpoints.list();
        let ejected = list.iter().filter(|ep| v.endpoints.is_ejected(ep)).count();
        metrics.set_endpoints(&v.name, list.len() - ejected, ejected);
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
