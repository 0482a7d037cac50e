//! Helpers shared by the integration tests: a small HTTP client over hyper-util's
//! legacy client and polling with a deadline. Child processes are
//! `ping_backend::testkit::Process`, shared with the proxy's tests.
// Each test file compiles this module on its own and uses a different part of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;
pub type TestClient = Client<HttpConnector, TestBody>;

/// A pooled HTTP/1.1 client: load loops reuse keep-alive connections.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A client that opens a new connection for every request, to prove that new
/// connections are accepted (a pooled one could reuse an old connection).
pub fn fresh_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http()
}

/// An h2c client (HTTP/2 with prior knowledge, no TLS).
pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

pub fn empty() -> TestBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

pub async fn get(client: &TestClient, addr: SocketAddr, path: &str) -> Result<Answer, BoxError> {
    request(client, "GET", addr, path).await
}

pub async fn request(
    client: &TestClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
) -> Result<Answer, BoxError> {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .body(empty())?;
    let response = client.request(req).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec())?,
    })
}

/// Poll `check` until it returns `Some`, or panic with `what` after `deadline`.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A request body fed chunk by chunk from a channel, so a test decides when each
/// chunk is sent and can watch the echo arrive before the body is complete.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

pub fn channel_body(buffer: usize) -> (mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = mpsc::channel(buffer);
    (tx, ChannelBody { rx }.boxed())
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|data| Ok(Frame::data(data))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
