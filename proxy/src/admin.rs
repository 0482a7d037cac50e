//! The admin port: `/healthz`, `/readyz`, `/metrics` and `/status`.
//! It lives on a listener of its own so that it is never exposed through the
//! LoadBalancer with the traffic port.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::control::Control;

/// Readiness, shared by the admin port and the shutdown sequence.
#[derive(Debug, Default)]
pub struct Health {
    draining: AtomicBool,
}

impl Health {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }
}

/// Serve the admin endpoints until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    control: Arc<Control>,
    health: Arc<Health>,
    stop: CancellationToken,
) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::error!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (control, health, builder, stop) = (
            control.clone(),
            health.clone(),
            builder.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let response = route(&req, &control, &health);
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::select! {
                _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

fn route(req: &Request<Incoming>, control: &Control, health: &Health) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served on the admin port\n",
        );
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if health.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        "/metrics" => {
            control.refresh_metrics();
            let mut resp = Response::new(Full::new(Bytes::from(control.metrics().encode())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/status" => {
            let mut body =
                serde_json::to_vec_pretty(&control.status()).expect("status is plain JSON");
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
            "not found; the admin port serves /healthz, /readyz, /metrics and /status\n",
        ),
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
