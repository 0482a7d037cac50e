//! Connections to the upstreams, reused across requests: HTTP/1.1
//! keep-alive connections here, and multiplexed HTTP/2 connections for a
//! version with `protocol = "h2c"` in [`http2`].
//!
//! Each HTTP/1.1 connection is driven by whoever is using it, not by a task of its
//! own: the request's task while it waits for the response head, then the
//! response body, as the client connection reads it. So the upstream side of
//! a request costs no task switch at all. hyper-util's pooled client runs
//! every connection in its own task and spawns one more task per request to
//! put the connection back; on the one core the headline benchmark gives a
//! proxy, those wake-ups were a measurable share of the cost per request
//! (docs/performance.md has the numbers).
//!
//! While a connection sits idle in the pool nobody polls it. That is safe:
//! tokio records a socket's readiness even when no task waits on it, so the
//! poll at checkout notices an upstream that closed the connection
//! meanwhile, and a request that never left for a closed connection goes to
//! another one. A sweep drops connections that have idled too long.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{Request, Response};
use http_body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::{BodyHook, End, Hooked};

pub(crate) mod http2;
mod lent;

/// How the proxy speaks to a version's upstream (`protocol` in the routes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Protocol {
    /// HTTP/1.1, one request per connection at a time (the default).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge, many requests per connection (gRPC).
    H2c,
}

impl Protocol {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
        }
    }
}

/// What a request body sent upstream must be. The pool does not care which
/// body it is: the request path decides (the client's, or none on a retry).
pub(crate) trait SendBody:
    Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + Unpin + 'static
{
    /// A body with nothing in it, for sending a bodiless request again.
    fn empty() -> Self;
}

impl SendBody for http_body_util::Empty<Bytes> {
    fn empty() -> Self {
        http_body_util::Empty::new()
    }
}

/// A pooled connection that has idled longer than this may meet the
/// upstream's own keep-alive close in flight: the upstream closes it just as
/// a request goes out on it. Many servers close idle connections after a
/// few seconds (Node.js after 5, gunicorn after 2), far sooner than this
/// pool's idle timeout, so that race is common at low traffic. A request
/// that can be sent again (idempotent, no body) is, once, on a new
/// connection, as browsers and Go's HTTP client do; it is not an error of
/// the version. Under load connections are reused within milliseconds and
/// nothing is kept for a replay.
const STALE_AFTER: Duration = Duration::from_secs(1);

type Driver<B> = http1::Connection<TokioIo<TcpStream>, B>;

#[derive(Debug, Clone)]
pub(crate) struct UpstreamConfig {
    pub(crate) connect_timeout: Duration,
    /// An idle connection older than this is closed instead of reused.
    pub(crate) idle_timeout: Duration,
    /// A connection older than this (since it was opened) takes no new
    /// request: an HTTP/1.1 one is closed when it comes back idle, an
    /// HTTP/2 one is left to finish its streams. kube-proxy picks a pod
    /// per connection, so without this a long-lived connection to a
    /// Service pins one pod for good, and pods added by a scale-up or a
    /// rolling update get nothing from the connections already open.
    pub(crate) max_age: Option<Duration>,
}

impl UpstreamConfig {
    /// Whether a connection opened at `opened` may take another request.
    pub(crate) fn young(&self, opened: Instant) -> bool {
        self.max_age.is_none_or(|max| opened.elapsed() < max)
    }
}

/// Why no response came back.
pub(crate) enum SendError<B> {
    /// Nothing reached the upstream. The request comes back when the pool
    /// still had it, so that it can go elsewhere, body and all.
    Connect(ConnectError, Option<Box<Request<B>>>),
    /// The connection failed after the request was (maybe partly) sent and
    /// before the response head arrived.
    Exchange(hyper::Error),
}

impl<B> std::fmt::Debug for SendError<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e, _) => f.debug_tuple("Connect").field(e).finish(),
            SendError::Exchange(e) => f.debug_tuple("Exchange").field(e).finish(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error("connect timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    // Transparent: the io error is the whole message, and must not appear a
    // second time as this error's source in the logged chain.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the handshake failed")]
    Handshake(#[source] hyper::Error),
    #[error("every HTTP/2 connection tried ended before the request could start")]
    Closed,
    #[error("no endpoint: DNS discovery has found no address for the upstream yet")]
    NoEndpoints,
    /// The connect this request waited for, opened by another, failed.
    #[error("{0}")]
    Shared(String),
}

/// The idle connections of every upstream, by authority. One pool for all
/// versions, so a reload keeps the warm connections of every upstream that
/// did not change.
#[derive(Debug)]
pub(crate) struct Upstreams<B: SendBody> {
    idle: Mutex<HashMap<PoolKey, Vec<Idle<B>>>>,
    h2: http2::Pool<B>,
    config: UpstreamConfig,
}

/// The key of both pools (this HTTP/1.1 one and HTTP/2's): an authority,
/// hashed and compared by its exact text. `Authority`'s own `Hash` is
/// case-insensitive and feeds the hasher one byte at a time: callgrind
/// measured about 930 instructions a lookup, two lookups an HTTP/1.1
/// request, 4% of the proxy's instructions per request. This is one write
/// of the whole string. Two spellings that differ only in case get separate
/// lists, which costs nothing: a version's authorities all come from one
/// text (its `upstream`, or what discovery built from it).
#[derive(Debug, Clone)]
pub(super) struct PoolKey(pub(super) Authority);

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Eq for PoolKey {}

impl Hash for PoolKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.as_str().hash(state)
    }
}

/// Lookups by `&str`, so a checkout clones nothing.
impl Borrow<str> for PoolKey {
    fn borrow(&self) -> &str {
        self.0.as_str()
    }
}

#[derive(Debug)]
struct Idle<B: SendBody> {
    conn: Conn<B>,
    since: Instant,
}

/// One HTTP/1.1 connection: the handle requests go in by, and the state
/// machine that must be polled for them to make progress.
struct Conn<B: SendBody> {
    sender: http1::SendRequest<B>,
    /// `None` once the connection has ended. Boxed: a `Conn` moves in and
    /// out of the pool on every request, and hyper's state is large.
    driver: Option<Pin<Box<Driver<B>>>>,
    /// When it was opened, for [`UpstreamConfig::max_age`].
    opened: Instant,
}

impl<B: SendBody> std::fmt::Debug for Conn<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("open", &self.driver.is_some())
            .finish()
    }
}

impl<B: SendBody> Conn<B> {
    /// Let the connection do what it can; false once it has ended. Errors
    /// need no handling here: hyper hands them to the request or the body
    /// waiting on this connection.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver {
            if let Poll::Ready(result) = driver.as_mut().poll(cx) {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
                // Dropping the driver also fails any request still waiting
                // on it, so nothing can wait forever.
                self.driver = None;
            }
        }
        self.driver.is_some()
    }

    /// Whether the next request can go out on this connection now.
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && self.sender.is_ready()
    }
}

impl<B: SendBody> Upstreams<B> {
    pub(crate) fn new(config: UpstreamConfig) -> Arc<Self> {
        Arc::new(Upstreams {
            idle: Mutex::new(HashMap::new()),
            h2: http2::Pool::new(config.clone()),
            config,
        })
    }

    /// Send `req` to `authority` over a pooled connection, or a new one when
    /// none is idle. `opened` counts new connections. An `upgrade` request
    /// gets a connection of its own (`send_upgrade`). `replayable`: the
    /// request may be sent again if a long-idle pooled connection turns out
    /// to have been closed by the upstream (see [`STALE_AFTER`]).
    ///
    /// The response's body keeps the connection and drives it while the
    /// client reads; at its end the connection goes back to the pool.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        protocol: Protocol,
        req: Request<B>,
        opened: &prometheus::IntCounter,
        upgrade: bool,
        replayable: bool,
    ) -> Result<Response<PooledBody<B>>, SendError<B>> {
        if protocol == Protocol::H2c {
            let (resp, stream) = self.h2.send(authority, req, opened).await?;
            return Ok(resp.map(|body| Hooked::new(body, Held::H2 { _stream: stream })));
        }
        if upgrade {
            // Boxed for the same reason as a new connection, below.
            return Box::pin(self.send_upgrade(authority, req, opened)).await;
        }
        let req = match self.checkout(authority) {
            Some((conn, idled)) => {
                let again = (replayable && idled > STALE_AFTER).then(|| copy_head(&req));
                match self.exchange(conn, authority, req).await {
                    Ok(resp) => return Ok(resp),
                    Err(mut e) => match (e.take_message(), again) {
                        // The connection closed in the instant between
                        // checkout and sending; nothing was sent, so a new one
                        // may take it.
                        (Some(unsent), _) => unsent,
                        (None, Some(again)) => {
                            tracing::debug!(%authority, idled = ?idled, error = %e.error(), "a long-idle pooled connection failed before an answer; sending the request again on a new one");
                            again
                        }
                        (None, None) => return Err(SendError::Exchange(e.into_error())),
                    },
                }
            }
            None => req,
        };
        // Boxed: connecting is rare with a warm pool, and its future (name
        // lookup included) would otherwise make the future of every request,
        // which is copied, kilobytes larger.
        let conn = match Box::pin(self.connect(authority)).await {
            Ok(conn) => conn,
            Err(e) => return Err(SendError::Connect(e, Some(Box::new(req)))),
        };
        opened.inc();
        self.exchange(conn, authority, req)
            .await
            .map_err(|e| SendError::Exchange(e.into_error()))
    }

    /// One request on `conn`, driving it until the response head is in.
    async fn exchange(
        self: &Arc<Self>,
        mut conn: Conn<B>,
        authority: &Authority,
        req: Request<B>,
    ) -> Result<Response<PooledBody<B>>, hyper::client::conn::TrySendError<Request<B>>> {
        let mut response = std::pin::pin!(conn.sender.try_send_request(req));
        let resp = std::future::poll_fn(|cx| {
            conn.drive(cx);
            // Only driving the connection, right above, can complete the
            // response. Polled with a real waker, hyper would wake this task
            // when it hands the response over (from inside this very poll),
            // and the whole client connection would be polled once more for
            // nothing.
            response.as_mut().poll(&mut quiet())
        })
        .await?;
        let lease = Lease {
            conn,
            home: self.clone(),
            authority: authority.clone(),
        };
        Ok(resp.map(|body| Hooked::new(body, Held::H1(lease))))
    }

    /// Send an upgrade request (WebSocket) on a connection of its own, run in
    /// a task of its own, since after a `101` it becomes a tunnel that
    /// outlives this request. Such connections are never pooled.
    async fn send_upgrade(
        &self,
        authority: &Authority,
        req: Request<B>,
        opened: &prometheus::IntCounter,
    ) -> Result<Response<PooledBody<B>>, SendError<B>> {
        let Conn {
            mut sender, driver, ..
        } = match self.connect(authority).await {
            Ok(conn) => conn,
            Err(e) => return Err(SendError::Connect(e, Some(Box::new(req)))),
        };
        opened.inc();
        if let Some(driver) = driver {
            tokio::spawn(async move {
                let driver = Pin::into_inner(driver);
                if let Err(e) = driver.with_upgrades().await {
                    tracing::debug!(error = %e, "upstream upgrade connection ended with an error");
                }
            });
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(SendError::Exchange)?;
        Ok(resp.map(Hooked::plain))
    }

    /// The most recently used idle connection that can take a request now,
    /// and how long it idled.
    fn checkout(&self, authority: &Authority) -> Option<(Conn<B>, Duration)> {
        loop {
            let idle = {
                let mut pool = self.idle.lock().expect("upstream pool lock");
                pool.get_mut(authority.as_str())?.pop()?
            };
            let idled = idle.since.elapsed();
            if idled > self.config.idle_timeout {
                // The rest of the list is older still.
                if let Some(list) = self
                    .idle
                    .lock()
                    .expect("upstream pool lock")
                    .get_mut(authority.as_str())
                {
                    list.clear();
                }
                return None;
            }
            let mut conn = idle.conn;
            if !self.config.young(conn.opened) {
                // Too old: dropped, which closes it; the next one may be
                // younger.
                continue;
            }
            // Without this task's waker: the request this connection takes
            // next would wake it for nothing. The exchange polls it with the
            // real waker right after.
            if conn.reusable(&mut quiet()) {
                return Some((conn, idled));
            }
        }
    }

    fn checkin(&self, authority: Authority, conn: Conn<B>) {
        let mut pool = self.idle.lock().expect("upstream pool lock");
        pool.entry(PoolKey(authority)).or_default().push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn<B>, ConnectError> {
        let stream = connect_tcp(authority, self.config.connect_timeout).await?;
        let (sender, driver) = http1::Builder::new()
            // One write per message: the heads and bodies a proxy relays are
            // small, and copying them together is cheaper than writev.
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            opened: Instant::now(),
        })
    }

    /// Close idle connections that expired or that the upstream closed.
    /// Checkout does this lazily; the sweep also frees the descriptors when
    /// traffic stops altogether.
    pub(crate) fn sweep(&self) {
        let mut cx = quiet();
        let limit = self.config.idle_timeout;
        let mut pool = self.idle.lock().expect("upstream pool lock");
        for list in pool.values_mut() {
            list.retain_mut(|idle| {
                idle.since.elapsed() <= limit
                    && self.config.young(idle.conn.opened)
                    && idle.conn.drive(&mut cx)
            });
        }
        pool.retain(|_, list| !list.is_empty());
        drop(pool);
        self.h2.sweep();
    }

    /// Idle connections now.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let pool = self.idle.lock().expect("upstream pool lock");
        pool.values().map(Vec::len).sum()
    }

    /// Sweep every so often, on `runtime` (the one these connections are
    /// registered with), for as long as the pool exists.
    pub(crate) fn spawn_sweeper(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        let weak = Arc::downgrade(self);
        let every =
            (self.config.idle_timeout / 4).clamp(Duration::from_secs(1), Duration::from_secs(15));
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(upstreams) => upstreams.sweep(),
                    None => return,
                }
            }
        });
    }
}

/// A TCP connection to `authority`, set up for a proxy's exchanges.
async fn connect_tcp(authority: &Authority, limit: Duration) -> Result<TcpStream, ConnectError> {
    let port = authority.port_u16().unwrap_or(80);
    // An IPv6 literal comes bracketed in an authority.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let stream = tokio::time::timeout(limit, TcpStream::connect((host, port)))
        .await
        .map_err(|_| ConnectError::Timeout(limit))??;
    // Small request/response exchanges: never let Nagle hold a segment.
    stream.set_nodelay(true)?;
    // Notice an upstream host that vanished while a connection idles.
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive)?;
    Ok(stream)
}

/// The same request again, with an empty body: only for bodiless requests.
fn copy_head<B: SendBody>(req: &Request<B>) -> Request<B> {
    let mut again = Request::new(B::empty());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    again
}

/// A context whose waker does nothing, for polls whose outcome is read
/// right away and that must not leave this task's waker behind.
fn quiet() -> Context<'static> {
    Context::from_waker(std::task::Waker::noop())
}

/// A connection on loan to one exchange; back to the pool when the response
/// body has ended, closed if it is dropped before that.
pub(crate) struct Lease<B: SendBody> {
    conn: Conn<B>,
    home: Arc<Upstreams<B>>,
    authority: Authority,
}

impl<B: SendBody> Lease<B> {
    fn release(mut self) {
        // One more poll lets hyper settle the finished exchange and ask for
        // the next request; a connection that cannot is not reused. No
        // waker: nothing waits on an idle connection (checkout polls it).
        if self.conn.reusable(&mut quiet()) {
            self.home.checkin(self.authority, self.conn);
        }
    }
}

/// The upstream's response body. Polling an HTTP/1.1 one also drives the
/// connection it arrives on, which no other task does; at its end the
/// connection goes back to the pool (see [`Lease`]). An HTTP/2 one gives its
/// stream back. An upgrade's body holds nothing.
pub(crate) type PooledBody<B> = Hooked<Incoming, Held<B>>;

/// What a response body holds of its connection.
pub(crate) enum Held<B: SendBody> {
    H1(Lease<B>),
    /// Held for its drop, which frees the stream on its connection.
    H2 {
        _stream: http2::Stream,
    },
}

impl<B: SendBody> BodyHook<hyper::Error> for Held<B> {
    fn before_poll(&mut self, cx: &mut Context<'_>) {
        if let Held::H1(lease) = self {
            lease.before_poll(cx);
        }
    }

    fn end(self, how: End<'_, hyper::Error>) {
        if let Held::H1(lease) = self {
            lease.end(how);
        }
    }
}

impl<B: SendBody> BodyHook<hyper::Error> for Lease<B> {
    fn before_poll(&mut self, cx: &mut Context<'_>) {
        self.conn.drive(cx);
    }

    fn end(self, how: End<'_, hyper::Error>) {
        match how {
            End::Complete => self.release(),
            // A body with nothing in it (HEAD, 204, 304, length 0) may be
            // dropped without a poll; its connection is still good. Anything
            // else dropped unfinished leaves the connection mid-message, and
            // a failed one is broken: either way it closes.
            End::Dropped { empty: true } => self.release(),
            End::Dropped { empty: false } | End::Failed(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;
    use std::convert::Infallible;
    use tokio::net::TcpListener;

    /// A loopback HTTP/1.1 upstream: `/` answers "pong", `/big` 1 MiB,
    /// `/empty` 204, `/close` "bye" and closes the connection after it.
    async fn upstream() -> Authority {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let mut resp = match req.uri().path() {
                            "/big" => Response::new(Full::new(Bytes::from(vec![b'x'; 1 << 20]))),
                            "/empty" => {
                                let mut r = Response::new(Full::new(Bytes::new()));
                                *r.status_mut() = http::StatusCode::NO_CONTENT;
                                r
                            }
                            _ => Response::new(Full::new(Bytes::from_static(b"pong"))),
                        };
                        if req.uri().path() == "/close" {
                            resp.headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr.to_string().parse().unwrap()
    }

    type TestBody = Empty<Bytes>;

    fn pool(idle_timeout: Duration) -> Arc<Upstreams<TestBody>> {
        Upstreams::new(UpstreamConfig {
            connect_timeout: Duration::from_secs(2),
            idle_timeout,
            max_age: None,
        })
    }

    fn get(authority: &Authority, path: &str) -> Request<TestBody> {
        Request::get(path)
            .header(http::header::HOST, authority.as_str())
            .body(Empty::new())
            .unwrap()
    }

    async fn send(
        pool: &Arc<Upstreams<TestBody>>,
        authority: &Authority,
        path: &str,
        opened: &prometheus::IntCounter,
    ) -> Response<PooledBody<TestBody>> {
        pool.send(
            authority,
            Protocol::Http1,
            get(authority, path),
            opened,
            false,
            true,
        )
        .await
        .expect("the upstream answers")
    }

    #[tokio::test]
    async fn a_finished_exchange_returns_its_connection_for_the_next() {
        let authority = upstream().await;
        let pool = pool(Duration::from_secs(90));
        let opened = prometheus::IntCounter::new("opened", "x").unwrap();
        for i in 0..3 {
            let resp = send(&pool, &authority, "/", &opened).await;
            assert_eq!(pool.idle_count(), 0, "on loan during exchange {i}");
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"pong");
            assert_eq!(pool.idle_count(), 1, "back after exchange {i}");
        }
        assert_eq!(opened.get(), 1, "three exchanges, one connection");
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_closes_its_connection() {
        let authority = upstream().await;
        let pool = pool(Duration::from_secs(90));
        let opened = prometheus::IntCounter::new("opened", "x").unwrap();
        let mut body = send(&pool, &authority, "/big", &opened).await.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.is_data());
        drop(body);
        assert_eq!(pool.idle_count(), 0, "mid-message: not reusable");
        // An empty answer dropped without a poll leaves a good connection.
        let resp = send(&pool, &authority, "/empty", &opened).await;
        assert_eq!(resp.status(), http::StatusCode::NO_CONTENT);
        drop(resp);
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(opened.get(), 2);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_not_checked_out() {
        let authority = upstream().await;
        let pool = pool(Duration::from_secs(90));
        let opened = prometheus::IntCounter::new("opened", "x").unwrap();
        let resp = send(&pool, &authority, "/close", &opened).await;
        resp.into_body().collect().await.unwrap();
        // hyper does not keep a connection the server said it will close.
        assert_eq!(pool.idle_count(), 0);
        let resp = send(&pool, &authority, "/", &opened).await;
        resp.into_body().collect().await.unwrap();
        assert_eq!(opened.get(), 2);
        assert!(pool.checkout(&authority).is_some());
    }

    /// An upstream that answers the first request on each connection and
    /// closes the connection when a second one arrives on it: the race with
    /// an upstream's keep-alive close, made certain.
    async fn closes_after_one() -> Authority {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut served = 0;
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while let Ok(n) = s.read(&mut chunk).await {
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            continue;
                        }
                        buf.clear();
                        if served == 1 {
                            return; // closed with the request unanswered
                        }
                        served += 1;
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong")
                            .await;
                    }
                });
            }
        });
        addr.to_string().parse().unwrap()
    }

    #[tokio::test]
    async fn a_long_idle_connection_closed_under_a_replayable_request_is_replayed() {
        let authority = closes_after_one().await;
        let pool = pool(Duration::from_secs(90));
        let opened = prometheus::IntCounter::new("opened", "x").unwrap();
        let resp = send(&pool, &authority, "/", &opened).await;
        resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(STALE_AFTER + Duration::from_millis(100)).await;
        // The pooled connection takes the request and is closed under it;
        // the request goes again on a new connection, once.
        let resp = send(&pool, &authority, "/", &opened).await;
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"pong");
        assert_eq!(opened.get(), 2);
        // Not a request that may not be sent twice.
        tokio::time::sleep(STALE_AFTER + Duration::from_millis(100)).await;
        let once = pool
            .send(
                &authority,
                Protocol::Http1,
                get(&authority, "/"),
                &opened,
                false,
                false,
            )
            .await;
        assert!(
            matches!(once, Err(SendError::Exchange(_))),
            "no replay: the error"
        );
    }

    #[tokio::test]
    async fn the_sweep_closes_expired_idle_connections() {
        let authority = upstream().await;
        let pool = pool(Duration::from_millis(50));
        let opened = prometheus::IntCounter::new("opened", "x").unwrap();
        let resp = send(&pool, &authority, "/", &opened).await;
        resp.into_body().collect().await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        pool.sweep();
        assert_eq!(pool.idle_count(), 1, "not expired yet");
        tokio::time::sleep(Duration::from_millis(80)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);
        // And checkout does not hand out an expired one either.
        let resp = send(&pool, &authority, "/", &opened).await;
        resp.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(pool.checkout(&authority).is_none());
    }
}
