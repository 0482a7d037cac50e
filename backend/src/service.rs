//! Routing of the endpoints. One `Routes` is shared by every connection.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::drain::Readiness;
use crate::Config;

/// Every answer is either a small fixed body or, for `/echo`, the request body
/// itself passed through frame by frame.
pub(crate) type Body = Either<Full<Bytes>, Incoming>;

pub(crate) const VERSION_HEADER: &str = "x-ping-version";
const PONG: &str = "pong";
const PONG_ERROR: &str = "pong...BUT NOW WITH ERROR";

pub(crate) struct Routes {
    version: HeaderValue,
    error_rate: f64,
    latency: std::time::Duration,
    readiness: Readiness,
}

impl Routes {
    /// Fails only if the version cannot be sent as a header value.
    pub(crate) fn new(
        config: &Config,
        readiness: Readiness,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        Ok(Self {
            version: HeaderValue::from_str(&config.version)?,
            error_rate: config.error_rate,
            latency: config.latency,
            readiness,
        })
    }

    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let http1 = req.version() < Version::HTTP_2;
        let mut response = match (req.method(), req.uri().path()) {
            (&Method::GET, "/ping") => self.ping().await,
            // Like most application handlers, this one reads the whole request
            // body before it answers, so a client that sends its body slowly,
            // or breaks it off, holds the answer up. It is discarded as it
            // arrives, not kept.
            (&Method::POST, "/upload") => match drain_body(req.into_body()).await {
                Ok(()) => self.ping().await,
                Err(_) => text(StatusCode::BAD_REQUEST, "cannot read the request body"),
            },
            // The body is handed over as is, never collected: this endpoint exists
            // to prove that the proxy streams large bodies both ways.
            (&Method::POST, "/echo") => Response::new(Either::Right(req.into_body())),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
            (&Method::GET, "/readyz") if self.readiness.is_ready() => text(StatusCode::OK, "ready"),
            (&Method::GET, "/readyz") => text(StatusCode::SERVICE_UNAVAILABLE, "draining"),
            _ => text(StatusCode::NOT_FOUND, "not found"),
        };
        // While draining, tell HTTP/1.1 clients not to reuse this connection, so
        // keep-alive clients move to another pod instead of racing the close of
        // their idle connection when the drain delay ends. (HTTP/2 gets a GOAWAY
        // at that point instead, and forbids this header: RFC 9113 section 8.2.2.)
        if http1 && !self.readiness.is_ready() {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(response)
    }

    async fn ping(&self) -> Response<Body> {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        // fastrand::f64() is in [0, 1): a rate of 1.0 fails every request, 0.0 none.
        let (status, body) = if fastrand::f64() < self.error_rate {
            (StatusCode::INTERNAL_SERVER_ERROR, PONG_ERROR)
        } else {
            (StatusCode::OK, PONG)
        };
        let mut response = text(status, body);
        response
            .headers_mut()
            .insert(VERSION_HEADER, self.version.clone());
        response
    }
}

/// Read a body to its end, keeping nothing.
async fn drain_body(mut body: Incoming) -> Result<(), hyper::Error> {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        frame?;
    }
    Ok(())
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from_static(body.as_bytes()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
