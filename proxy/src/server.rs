//! Accepting client connections: HTTP/1.1 and h2c (and, through `tls`,
//! HTTPS with ALPN) on one listener, each connection in its own task, all of
//! them tracked so shutdown can close idle keep-alives and wait for the rest.
//!
//! The protocol is chosen before hyper sees the connection: by ALPN on TLS,
//! by peeking for the HTTP/2 preface on plain TCP. hyper-util's auto builder
//! does the same detection but keeps room for an HTTP/2 connection's state
//! in every HTTP/1 connection; choosing first saves about 5 KB per idle
//! keep-alive connection (measured in bench/memprobe).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::forward::{Answer, ConnInfo, Forwarder};
use crate::workers::Workers;

/// What every HTTP/2 connection starts with (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Time a client has to send a complete request head; a slowloris
    /// client is dropped after it.
    pub header_read_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Something that turns an accepted TCP stream into the byte stream HTTP
/// runs on: plain TCP, or a TLS handshake (see `tls`).
pub trait Acceptor: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Runs inside the connection's task, so a slow handshake holds no
    /// accept slot.
    fn accept(
        &self,
        stream: TcpStream,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Io>> + Send;
    fn is_tls(&self) -> bool;
    /// Whether the client speaks HTTP/2 on this connection.
    fn is_h2(
        &self,
        io: &Self::Io,
        limit: Duration,
    ) -> impl Future<Output = std::io::Result<bool>> + Send;
}

/// Plain TCP: nothing to do.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Acceptor for Plain {
    type Io = TcpStream;
    async fn accept(&self, stream: TcpStream) -> std::io::Result<TcpStream> {
        Ok(stream)
    }
    fn is_tls(&self) -> bool {
        false
    }
    /// h2c with prior knowledge: the client's first bytes are the preface.
    async fn is_h2(&self, stream: &TcpStream, limit: Duration) -> std::io::Result<bool> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut buf = [0u8; 24];
        loop {
            let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
                Ok(n) => n?,
                Err(_) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no request within the header read timeout",
                    ))
                }
            };
            if n == 0 || buf[..n] != H2_PREFACE[..n] {
                // EOF or anything else is HTTP/1's to answer (or to reject).
                return Ok(false);
            }
            if n == H2_PREFACE.len() {
                return Ok(true);
            }
            // A prefix of the preface so far; peek again once more has come.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The open connections of a listener, for the shutdown sequence.
#[derive(Debug, Clone, Default)]
pub struct Connections {
    tracker: TaskTracker,
    drain: CancellationToken,
}

impl Connections {
    /// Ask every connection to finish (idle keep-alives close at once,
    /// busy ones after their in-flight requests) and wait for them all.
    pub async fn shutdown(self) {
        self.drain.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

struct Protocols {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    header_read_timeout: Duration,
}

impl Protocols {
    fn new(config: &ServerConfig) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            // One write per response instead of writev: see upstream.rs.
            .writev(false)
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout);
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2.timer(TokioTimer::new());
        Protocols {
            http1,
            http2,
            header_read_timeout: config.header_read_timeout,
        }
    }
}

/// Accept until `stop` is cancelled. Returns the connections still open,
/// for the caller to close and wait for.
pub async fn serve<A: Acceptor>(
    listener: TcpListener,
    acceptor: Arc<A>,
    workers: Arc<Workers>,
    config: ServerConfig,
    stop: CancellationToken,
) -> Connections {
    let connections = Connections::default();
    let protocols = Arc::new(Protocols::new(&config));
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Usually EMFILE: back off briefly instead of spinning; the
                // connections already open keep being served.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let info = ConnInfo::new(peer, acceptor.is_tls());
        let lane = workers.next();
        let (acceptor, forwarder) = (acceptor.clone(), lane.forwarder.clone());
        let (protocols, drain) = (protocols.clone(), connections.drain.clone());
        match &lane.runtime {
            None => {
                connections.tracker.spawn(connection(
                    stream, info, acceptor, forwarder, protocols, drain,
                ));
            }
            Some(runtime) => {
                // Accepted on this runtime's reactor; it must be registered
                // with the lane's instead.
                let stream = match stream.into_std() {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "cannot hand the connection to a worker thread");
                        continue;
                    }
                };
                let handed = async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => {
                            connection(stream, info, acceptor, forwarder, protocols, drain).await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "worker thread cannot take the connection")
                        }
                    }
                };
                connections.tracker.spawn_on(handed, runtime);
            }
        }
    }
    connections
}

/// Drive a pinned connection; when `drain` fires, ask it to shut down
/// gracefully and keep driving it until it has. A macro rather than a
/// function: a generic helper taking the shutdown as a closure defeats the
/// compiler's proof that the connection task is `Send`.
macro_rules! until_drained {
    ($conn:expr, $drain:expr) => {{
        let mut conn = $conn;
        tokio::select! {
            out = conn.as_mut() => out,
            _ = $drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

async fn connection<A: Acceptor>(
    stream: TcpStream,
    info: ConnInfo,
    acceptor: Arc<A>,
    forwarder: Arc<Forwarder>,
    protocols: Arc<Protocols>,
    drain: CancellationToken,
) {
    let peer = info.peer;
    // The handshake and the protocol choice run once and are over before
    // the first request; boxed, so the room their futures need is given
    // back instead of staying in every open connection.
    let setup = Box::pin(async {
        let io = acceptor
            .accept(stream)
            .await
            .map_err(|e| ("connection setup failed", e))?;
        match acceptor.is_h2(&io, protocols.header_read_timeout).await {
            Ok(h2) => Ok((io, h2)),
            Err(e) => Err(("no request on a new connection", e)),
        }
    });
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
    let (io, h2) = match ready {
        Ok(ready) => ready,
        Err((what, e)) => {
            tracing::debug!(%peer, error = %e, "{what}");
            return;
        }
    };
    // The future of each request is boxed (see `Forwarder::handle`): hyper
    // keeps a slot the size of the service's future in every connection,
    // idle or not, and a box there costs one allocation per request.
    let service =
        service_fn(move |req: Request<Incoming>| -> Answer { forwarder.handle(req, &info) });
    let io = TokioIo::new(io);
    let result = if h2 {
        // Boxed: h2's state is large, and would otherwise take room in
        // every HTTP/1 connection's future too.
        let conn = Box::pin(protocols.http2.serve_connection(io, service));
        until_drained!(conn, drain)
    } else {
        // Pinned where it is made: moved into a helper, it would take its
        // room in this future twice.
        let conn = std::pin::pin!(protocols
            .http1
            .serve_connection(io, service)
            .with_upgrades());
        until_drained!(conn, drain)
    };
    if let Err(e) = result {
        // Client-side trouble (malformed request, reset, timeout). hyper
        // has already answered 400/431 where HTTP allows an answer.
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
