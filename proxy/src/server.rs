//! Accepting client connections: HTTP/1.1 and h2c (and, through `tls`,
//! HTTPS with ALPN) on one listener, each connection in its own task, all of
//! them watched so shutdown can close idle keep-alives and wait for the rest.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::forward::{ConnInfo, Forwarder};

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
}

pub fn builder(config: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout);
    b.http2().timer(TokioTimer::new());
    b
}

/// Accept until `stop` is cancelled. Returns the handle that closes and
/// waits for the connections still open.
pub async fn serve<A: Acceptor>(
    listener: TcpListener,
    acceptor: Arc<A>,
    forwarder: Arc<Forwarder>,
    config: ServerConfig,
    stop: CancellationToken,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder(&config));
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
        tokio::spawn(connection(
            stream,
            info,
            acceptor.clone(),
            forwarder.clone(),
            builder.clone(),
            graceful.watcher(),
        ));
    }
    graceful
}

async fn connection<A: Acceptor>(
    stream: TcpStream,
    info: ConnInfo,
    acceptor: Arc<A>,
    forwarder: Arc<Forwarder>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
) {
    let io = match acceptor.accept(stream).await {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!(peer = %info.peer, error = %e, "connection setup failed");
            return;
        }
    };
    let peer = info.peer;
    let service = service_fn(move |req| {
        let forwarder = forwarder.clone();
        let info = info.clone();
        // Boxed: hyper keeps a slot the size of this future in every
        // connection, idle or not; a box costs an allocation per request and
        // saves kilobytes per idle keep-alive connection.
        Box::pin(async move { Ok::<_, Infallible>(forwarder.handle(req, info).await) })
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    if let Err(e) = watcher.watch(conn).await {
        // Client-side trouble (malformed request, reset, timeout). hyper
        // has already answered 400/431 where HTTP allows an answer.
        tracing::debug!(%peer, error = %e, "client connection ended with an error");
    }
}
