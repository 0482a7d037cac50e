//! Accepting client connections: HTTP/1.1 and h2c (and, through `tls`,
//! HTTPS with ALPN) on one listener, each connection in its own task, all of
//! them tracked so shutdown can close idle keep-alives and wait for the rest.
//!
//! The protocol is chosen before hyper sees the connection: by ALPN on TLS,
//! by the first bytes on plain TCP (`preface`). hyper-util's auto builder
//! does the same detection but keeps room for an HTTP/2 connection's state
//! in every HTTP/1 connection; choosing first saves about 5 KB per idle
//! keep-alive connection (measured in bench/memprobe).

mod limits;
mod preface;
mod timeouts;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{BodyHook, End, Hooked};
use crate::event_loops::EventLoops;
use crate::forward::{ConnInfo, Forwarder, ObservedBody};
pub(crate) use limits::{cgroup_memory_limit, default_max_connections, ConnectionLimit, Slot};
pub(crate) use preface::Detected;
use preface::Prefixed;
use timeouts::{Activity, Limits, Timed};

/// The client-side limits of `run`'s flags; docs/security.md lists them.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Time a client has to send a complete request head, from its first
    /// byte; a slowloris client is dropped after it. The first request's
    /// head also has to come within it from the connection's start.
    pub header_read_timeout: Duration,
    /// How long a keep-alive connection may sit idle between requests (and
    /// a client may take no bytes of an answer) before it is closed. Longer
    /// than the 60 s that cloud load balancers keep idle connections, so
    /// the proxy is not the side that closes first.
    pub idle_timeout: Duration,
    /// The largest request head accepted (431 above it): HTTP/1's read
    /// buffer while a head arrives, and HTTP/2's header list.
    pub max_request_head: usize,
    /// Client connections held at once, over all traffic listeners; `None`
    /// derives it from the memory and descriptors the process is given
    /// (docs/security.md, "Memory").
    pub max_connections: Option<usize>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_request_head: 64 << 10,
            max_connections: None,
        }
    }
}

/// HTTP/2 settings that bound what one client connection can make the proxy
/// hold. The flow-control windows bound request bytes buffered before the
/// upstream reads them; the send buffer bounds response bytes buffered for
/// a client that does not read; the streams bound both.
const H2_MAX_STREAMS: u32 = 100;
const H2_STREAM_WINDOW: u32 = 64 << 10;
const H2_CONNECTION_WINDOW: u32 = 256 << 10;
const H2_SEND_BUFFER: usize = 64 << 10;

/// Something that turns an accepted TCP stream into the byte stream HTTP
/// runs on (plain TCP, or a TLS handshake: see `tls`), and says which HTTP.
pub(crate) trait Acceptor: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Runs inside the connection's task, so a slow client holds no accept
    /// slot. The part that waits for the client's first bytes must end by
    /// `deadline`.
    fn accept(
        &self,
        stream: TcpStream,
        deadline: Instant,
    ) -> impl Future<Output = std::io::Result<(Self::Io, Detected)>> + Send;
    fn is_tls(&self) -> bool;
}

/// Plain TCP: h2c with prior knowledge when the first bytes are the HTTP/2
/// preface, HTTP/1.1 otherwise.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plain;

impl Acceptor for Plain {
    type Io = Prefixed<TcpStream>;

    async fn accept(
        &self,
        stream: TcpStream,
        deadline: Instant,
    ) -> std::io::Result<(Self::Io, Detected)> {
        let mut io = Prefixed::new(stream);
        let detected = io.detect(deadline).await?;
        Ok((io, detected))
    }

    fn is_tls(&self) -> bool {
        false
    }
}

/// Accept connections until `stop` is cancelled, handing each to `handle`.
/// A failed accept (usually EMFILE: out of descriptors) is logged and
/// retried after a short pause instead of spinning; the connections already
/// open keep being served.
pub(crate) async fn accept_until(
    listener: &TcpListener,
    stop: &CancellationToken,
    what: &'static str,
    mut handle: impl FnMut(TcpStream, SocketAddr),
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => handle(stream, peer),
            Err(e) => {
                tracing::error!(error = %e, listener = what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The open connections of a listener, for the shutdown sequence.
#[derive(Debug, Clone, Default)]
pub(crate) struct Connections {
    tracker: TaskTracker,
    drain: CancellationToken,
}

impl Connections {
    /// Ask every connection to finish (idle keep-alives close at once,
    /// busy ones after their in-flight requests) and wait for them all.
    pub(crate) async fn shutdown(self) {
        self.drain.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    limits: Limits,
}

impl Protocols {
    fn new(config: &ServerConfig) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            // One write per response instead of writev: see upstream.rs.
            .writev(false)
            // The read buffer holds a request head while it arrives: its
            // cap is the head cap, and hyper answers 431 above it.
            .max_buf_size(config.max_request_head.max(8192))
            // The cap itself, exact: the buffer's checks overshoot when the
            // head is complete in a read that took the buffer past its cap.
            .max_header_size(config.max_request_head)
            .timer(TokioTimer::new())
            // Header and idle deadlines are kept by `timeouts::Timed`, from a
            // request's first byte and from the last answer respectively.
            .header_read_timeout(None);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(config.max_request_head as u32)
            .max_concurrent_streams(H2_MAX_STREAMS)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_send_buf_size(H2_SEND_BUFFER);
        Protocols {
            http1,
            http2,
            limits: Limits {
                header_timeout: config.header_read_timeout,
                idle_timeout: config.idle_timeout,
            },
        }
    }
}

/// Accept until `stop` is cancelled. Returns the connections still open,
/// for the caller to close and wait for.
pub(crate) async fn serve<A: Acceptor>(
    listener: TcpListener,
    acceptor: Arc<A>,
    event_loops: Arc<EventLoops>,
    config: ServerConfig,
    limit: Arc<ConnectionLimit>,
    stop: CancellationToken,
) -> Connections {
    let connections = Connections::default();
    let protocols = Arc::new(Protocols::new(&config));
    accept_until(&listener, &stop, "traffic", |stream, peer| {
        // At the limit the connection is closed at once (see `limits`).
        let Some(slot) = limit.try_acquire() else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo::new(peer, acceptor.is_tls());
        let event_loop = event_loops.next();
        let (acceptor, forwarder) = (acceptor.clone(), event_loop.forwarder.clone());
        let (protocols, drain) = (protocols.clone(), connections.drain.clone());
        match &event_loop.runtime {
            None => {
                connections.tracker.spawn(connection(
                    stream, slot, info, acceptor, forwarder, protocols, drain,
                ));
            }
            Some(runtime) => {
                // Accepted on this runtime's reactor; it must be registered
                // with the event loop's instead.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "cannot hand the connection to a worker thread");
                        return;
                    }
                };
                let handed = async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => {
                            connection(stream, slot, info, acceptor, forwarder, protocols, drain)
                                .await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "worker thread cannot take the connection")
                        }
                    }
                };
                connections.tracker.spawn_on(handed, runtime);
            }
        }
    })
    .await;
    connections
}

/// Drive a pinned connection; when `drain` fires, or `idle` resolves, ask
/// it to shut down gracefully and keep driving it until it has. A macro
/// rather than a function: a generic helper taking the shutdown as a
/// closure defeats the compiler's proof that the connection task is `Send`.
macro_rules! until_drained {
    ($conn:expr, $drain:expr, $idle:expr) => {{
        let mut conn = $conn;
        tokio::select! {
            out = conn.as_mut() => out,
            _ = $drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = $idle => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// Marks a request over for its connection's [`Activity`] when dropped:
/// with its answer's body, or with its future if the client gave up first
/// (a cancel, which counts towards the connection's limit).
struct RequestDone {
    activity: Arc<Activity>,
    answered: bool,
}

impl RequestDone {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.request_started();
        RequestDone {
            activity: activity.clone(),
            answered: false,
        }
    }
}

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.activity.request_ended();
        if !self.answered {
            self.activity.cancelled();
        }
    }
}

impl<E> BodyHook<E> for RequestDone {
    fn end(self, _how: End<'_, E>) {}
}

/// Resolves once an HTTP/2 connection has had no request under way for at
/// least `idle` (between `idle` and twice that, as it is checked once per
/// `idle`).
async fn idle_for(activity: &Activity, idle: Duration) {
    loop {
        let seen = activity.generation();
        tokio::time::sleep(idle).await;
        if activity.in_flight() == 0 && activity.generation() == seen {
            return;
        }
    }
}

async fn connection<A: Acceptor>(
    stream: TcpStream,
    slot: Slot,
    info: ConnInfo,
    acceptor: Arc<A>,
    forwarder: Arc<Forwarder>,
    protocols: Arc<Protocols>,
    drain: CancellationToken,
) {
    // Held for the connection's life: its place under --max-connections.
    let _slot = slot;
    let peer = info.peer;
    // The handshake and the protocol choice run once and are over before
    // the first request; boxed, so the room their futures need is given
    // back instead of staying in every open connection.
    let deadline = Instant::now() + protocols.limits.header_timeout;
    let setup = Box::pin(acceptor.accept(stream, deadline));
    let ready = tokio::select! {
        ready = setup => ready,
        // A connection that has sent nothing yet (a client's spare, a load
        // balancer's pre-opened one) holds no request to finish: close it,
        // instead of letting the shutdown wait out the header read timeout.
        _ = drain.cancelled() => {
            tracing::debug!(%peer, "shutting down: closing a connection that sent no request");
            return;
        }
    };
    let (io, detected) = match ready {
        Ok(ready) => ready,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection setup failed");
            return;
        }
    };
    let activity = Arc::new(Activity::default());
    let requests = activity.clone();
    // The future of each request is boxed (see `Forwarder::handle`): hyper
    // keeps a slot the size of the service's future in every connection,
    // idle or not, and a box there costs one allocation per request. The
    // wrapper here adds a pointer to it.
    let service = service_fn(move |req: Request<Incoming>| {
        let mut done = RequestDone::start(&requests);
        let response = forwarder.handle(req, &info);
        async move {
            let response = response.await?;
            done.answered = true;
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                done.activity.upgraded();
            }
            Ok::<_, Infallible>(response.map(|body: ObservedBody| Hooked::new(body, done)))
        }
    });
    let result = match detected {
        Detected::Closed => return,
        Detected::H2 => {
            // Boxed: h2's state is large, and would otherwise take room in
            // every HTTP/1 connection's future too.
            let conn = Box::pin(protocols.http2.serve_connection(TokioIo::new(io), service));
            // An idle HTTP/2 connection gets a GOAWAY at the idle timeout,
            // and so does one whose client cancels too much.
            let close = async {
                tokio::select! {
                    _ = idle_for(&activity, protocols.limits.idle_timeout) => {}
                    _ = activity.abused() => {}
                }
            };
            until_drained!(conn, drain, close)
        }
        Detected::Http1 => {
            let io = Timed::new(io, activity.clone(), protocols.limits, deadline);
            // Pinned where it is made: moved into a helper, it would take
            // its room in this future twice.
            let conn = std::pin::pin!(protocols
                .http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades());
            // `Timed` closes an idle HTTP/1 connection itself.
            until_drained!(conn, drain, activity.abused())
        }
    };
    if let Err(e) = result {
        // Client-side trouble (malformed request, reset, timeout). hyper
        // has already answered 400/431 where HTTP allows an answer.
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
