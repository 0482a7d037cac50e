//! The accept loop and the shutdown sequence, and the in-process [`spawn`] /
//! [`Handle`] that tests and the demo use.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

/// SO_RCVBUF of each accepted connection (see the accept loop).
const RECV_BUFFER: usize = 1 << 20;

use crate::drain::{finish_connections, Finished, Readiness};
use crate::service::Routes;
use crate::Config;

/// After a failed accept (e.g. out of file descriptors) the same error usually
/// comes straight back; a short pause keeps the loop from spinning on it.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Serve on an already-bound listener until `shutdown` resolves, then run the
/// drain sequence: `/readyz` turns 503 at once; `/ping` (and every endpoint) keeps
/// being served, new connections included, for `config.drain_delay`; then the
/// listener closes and in-flight requests get up to `config.shutdown_timeout`,
/// while idle keep-alive connections are closed. Returns once that is done.
///
/// Logs `listening on ADDR` (the actual bound address) when it starts, and one
/// line per shutdown phase.
///
/// # Errors
/// `InvalidInput` if `config.version` cannot be sent as a header value.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let readiness = Readiness::default();
    let routes = Routes::new(&config, readiness.clone()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "version {:?} cannot be sent as a header value; use visible ASCII like v2",
                config.version
            ),
        )
    })?;
    let routes = Arc::new(routes);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The timers enable hyper's header read timeout (slow clients cannot hold a
    // connection open forever without sending a request) and HTTP/2 keep-alive.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());

    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();

    info!(
        version = %config.version,
        error_rate = config.error_rate,
        latency = ?config.latency,
        "listening on {}",
        listener.local_addr()?
    );

    let mut shutdown = std::pin::pin!(shutdown);
    // Armed when shutdown begins; until then it never fires.
    let mut drain_over = std::pin::pin!(tokio::time::sleep(Duration::MAX));
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        warn!(error = %err, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                };
                // Pong answers are tiny; without this Nagle's algorithm can hold
                // them back waiting for the client's delayed ACK.
                if let Err(err) = stream.set_nodelay(true) {
                    debug!(%peer, error = %err, "cannot set TCP_NODELAY");
                }
                // A fixed 1 MiB receive buffer instead of the kernel's
                // auto-tuning (up to tcp_rmem's max, 32 MB on some hosts).
                // /echo stops reading while its answer is backpressured; a
                // receive queue grown that large was seen to overflow and
                // prune, after which Linux >= 6.17 skips the peer's ACKs as
                // beyond the window and the echo crawls on retransmit
                // back-off (a 200 MB echo through the proxy stalled for a
                // minute). A ping service needs no more than this.
                if let Err(err) = socket2::SockRef::from(&stream).set_recv_buffer_size(RECV_BUFFER) {
                    debug!(%peer, error = %err, "cannot set SO_RCVBUF");
                }
                let routes = routes.clone();
                let service = service_fn(move |req| {
                    let routes = routes.clone();
                    async move { routes.handle(req).await }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                connections.spawn(async move {
                    if let Err(err) = conn.await {
                        debug!(%peer, error = %err, "connection ended with an error");
                    }
                });
            }
            // Reap finished connection tasks so the set only holds open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown, if !draining => {
                draining = true;
                readiness.start_draining();
                // A delay too long to add to now (e.g. "1000years") leaves the
                // never-firing sleep in place: drain until killed.
                if let Some(deadline) = tokio::time::Instant::now().checked_add(config.drain_delay) {
                    drain_over.as_mut().reset(deadline);
                }
                info!(drain_delay = ?config.drain_delay, "draining: readyz now 503");
            }
            () = &mut drain_over, if draining => break,
        }
    }

    drop(listener);
    info!(
        open_connections = connections.len(),
        shutdown_timeout = ?config.shutdown_timeout,
        "drain delay over: closing listener"
    );
    match finish_connections(graceful, connections, config.shutdown_timeout).await {
        Finished::AllConnections => info!("all connections finished"),
        Finished::TimedOut { open } => {
            warn!(
                open,
                "shutdown timeout reached with {open} connections open"
            )
        }
    }
    Ok(())
}

/// Bind `addr` (e.g. `"127.0.0.1:0"`), run [`serve`] on a task of the current
/// tokio runtime, and return a [`Handle`] with the bound address.
///
/// Dropping the [`Handle`] begins the same graceful shutdown as
/// [`Handle::shutdown`], in the background, so a test that forgets (or panics
/// before) the shutdown never leaks a server past its drain delay; and the task
/// ends with the runtime in any case.
pub async fn spawn(addr: &str, config: Config) -> io::Result<Handle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    // Resolves on `send` and also when the sender is dropped with the Handle.
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(serve(listener, config, shutdown));
    Ok(Handle { addr, stop, task })
}

/// A backend started by [`spawn`]. Dropping it begins a graceful shutdown.
#[derive(Debug)]
pub struct Handle {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl Handle {
    /// The address the backend listens on, with the port the OS picked.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Begin graceful shutdown and wait for [`serve`] to return: this takes at
    /// least the configured drain delay.
    pub async fn shutdown(self) -> io::Result<()> {
        let Handle { stop, task, .. } = self;
        // An error means serve() already returned; the join below reports how.
        let _ = stop.send(());
        task.await.map_err(io::Error::other)?
    }
}
