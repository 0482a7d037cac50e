//! HTTP/2 with prior knowledge to an upstream (`protocol = "h2c"`): a few
//! connections per upstream, each carrying many requests as streams.
//!
//! Unlike HTTP/1, an HTTP/2 connection serves many requests at once and
//! must be driven whether or not anyone waits on it (pings, window updates,
//! a GOAWAY), so each runs in a task of its own on the event loop that
//! opened it. A request goes to the open connection with the fewest streams
//! under way, as long as that is under the upstream's
//! SETTINGS_MAX_CONCURRENT_STREAMS; only when every connection is full is
//! another opened, up to [`MAX_CONNECTIONS`], and past that requests wait
//! in the least-loaded connection for a stream.
//!
//! A GOAWAY from the upstream (a pod shutting down) ends the connection for
//! new requests. Those in flight finish on it; hyper hands back every
//! request it had not yet started, and that request goes to another
//! connection. Since a request is only given to a connection with a free
//! stream, none is left waiting to open a stream on one that goes away.
//!
//! One race remains: a request hyper takes up just as the GOAWAY arrives
//! fails inside hyper, which then drops it. When the upstream refused the
//! stream (a GOAWAY it was above, or REFUSED_STREAM: RFC 9113 section 8.7
//! says such a request was not processed), the request is sent again on
//! another connection, whatever its method: its body was only lent to
//! hyper (see `lent`), so it is still at hand.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::lent::{Lender, Lent};
use super::{connect_tcp, ConnectError, PoolKey, SendBody, SendError, UpstreamConfig};

/// Connections per upstream and event loop. Streams, not connections, carry
/// the load; a second connection only helps when the upstream caps its
/// streams per connection.
pub(crate) const MAX_CONNECTIONS: usize = 4;

/// Attempts at a request whose connection closed before hyper started it.
const ATTEMPTS: usize = 3;

/// What a request's stream and its connection share.
#[derive(Debug)]
struct Shared {
    /// Streams under way on the connection.
    in_flight: AtomicUsize,
    /// The upstream's SETTINGS_MAX_CONCURRENT_STREAMS, as last seen.
    max_streams: AtomicUsize,
    /// The connection ended (GOAWAY, error, idle): no new requests.
    closed: AtomicBool,
    /// When the connection was opened, for the pool's maximum age.
    opened: Instant,
    /// When the last request started, in milliseconds since the pool's
    /// epoch: a connection with no streams idle longer than the pool's idle
    /// timeout is closed by the sweep.
    last_used: AtomicU64,
}

/// One request's stream: given back to its connection when dropped (with
/// the response body, or with the request if it failed).
#[derive(Debug)]
pub(crate) struct Stream(Arc<Shared>);

impl Drop for Stream {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// Whether the upstream refused the request's stream before processing it:
/// above the last stream id of a graceful GOAWAY (or opened after it), or
/// reset with REFUSED_STREAM. A GOAWAY with an error code is not enough: h2
/// hands that error to every stream, processed or not.
fn refused(e: &hyper::Error) -> bool {
    let Some(h2) = std::error::Error::source(e).and_then(|s| s.downcast_ref::<h2::Error>()) else {
        return false;
    };
    let reason = h2.reason();
    h2.is_remote()
        && (h2.is_go_away() && reason == Some(h2::Reason::NO_ERROR)
            || h2.is_reset() && reason == Some(h2::Reason::REFUSED_STREAM))
}

struct Conn<B> {
    sender: http2::SendRequest<Lent<B>>,
    shared: Arc<Shared>,
}

impl<B> Clone for Conn<B> {
    fn clone(&self) -> Self {
        Conn {
            sender: self.sender.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<B> Conn<B> {
    fn open(&self) -> bool {
        !self.shared.closed.load(Relaxed) && !self.sender.is_closed()
    }

    fn load(&self) -> usize {
        self.shared.in_flight.load(Relaxed)
    }

    fn has_room(&self) -> bool {
        self.load() < self.shared.max_streams.load(Relaxed)
    }
}

type Gate = tokio::sync::Mutex<Option<(Instant, String)>>;

/// The HTTP/2 connections of every upstream of one event loop.
pub(crate) struct Pool<B> {
    /// By the authority's text (see [`PoolKey`]): looked up on every request.
    conns: Mutex<HashMap<PoolKey, Vec<Conn<B>>>>,
    /// Per upstream, the turn to open a connection, with the last failed
    /// attempt's time and error (see [`Pool::open`]).
    gates: Mutex<HashMap<Authority, Arc<Gate>>>,
    config: UpstreamConfig,
    epoch: Instant,
}

impl<B> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("http2::Pool").finish()
    }
}

impl<B: SendBody> Pool<B> {
    pub(crate) fn new(config: UpstreamConfig) -> Self {
        Pool {
            conns: Mutex::new(HashMap::new()),
            gates: Mutex::new(HashMap::new()),
            config,
            epoch: Instant::now(),
        }
    }

    /// Open, and young enough for new requests (see
    /// `UpstreamConfig::max_age`). An old one is only left out: its
    /// streams under way finish, and hyper closes it once the pool's
    /// handle is gone and they are done.
    fn usable(&self, conn: &Conn<B>) -> bool {
        conn.open() && self.config.young(conn.shared.opened)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Send `req` as a stream on the least-loaded connection with room, or a
    /// new one. The returned [`Stream`] must live as long as the response
    /// body.
    pub(crate) async fn send(
        &self,
        authority: &Authority,
        req: Request<B>,
        opened: &prometheus::IntCounter,
    ) -> Result<(Response<Incoming>, Stream), SendError<B>> {
        let (mut head, body) = req.into_parts();
        let lender = Lender::new(body);
        // What hyper does not give back, should the stream be refused.
        let again = (
            head.method.clone(),
            head.uri.clone(),
            head.version,
            head.headers.clone(),
        );
        let mut lent = lender.lend();
        for _ in 0..ATTEMPTS {
            let Some(body) = lent.take() else {
                break;
            };
            let conn = match self.pick(authority) {
                Some(conn) => conn,
                None => match Box::pin(self.open(authority, opened)).await {
                    Ok(conn) => conn,
                    Err(e) => {
                        let unsent = lender
                            .into_unread()
                            .map(|b| Box::new(Request::from_parts(head, b)));
                        return Err(SendError::Connect(e, unsent));
                    }
                },
            };
            conn.shared.in_flight.fetch_add(1, Relaxed);
            conn.shared.last_used.store(self.now_ms(), Relaxed);
            let stream = Stream(conn.shared.clone());
            let mut sender = conn.sender;
            match sender
                .try_send_request(Request::from_parts(head, body))
                .await
            {
                Ok(resp) => {
                    lender.answered();
                    return Ok((resp, stream));
                }
                Err(mut e) => {
                    head = match e.take_message() {
                        // The connection ended before hyper started the
                        // request (a GOAWAY, most likely): nothing was sent.
                        Some(unsent) => unsent.into_parts().0,
                        None if refused(e.error()) => {
                            let mut rebuilt = Request::new(());
                            *rebuilt.method_mut() = again.0.clone();
                            *rebuilt.uri_mut() = again.1.clone();
                            *rebuilt.version_mut() = again.2;
                            *rebuilt.headers_mut() = again.3.clone();
                            rebuilt.into_parts().0
                        }
                        None => return Err(SendError::Exchange(e.into_error())),
                    };
                    lent = lender.lend();
                    conn.shared.closed.store(true, Relaxed);
                    tracing::debug!(%authority, error = %e.error(), again = lent.is_some(), "an HTTP/2 upstream connection refused a request before processing it");
                    if lent.is_none() {
                        return Err(SendError::Exchange(e.into_error()));
                    }
                }
            }
        }
        let unsent = lender
            .into_unread()
            .map(|b| Box::new(Request::from_parts(head, b)));
        Err(SendError::Connect(ConnectError::Closed, unsent))
    }

    /// The open connection with the fewest streams under way and room for
    /// one more; or, when every one is full and no more may be opened, the
    /// least loaded (the request waits there for a stream).
    fn pick(&self, authority: &Authority) -> Option<Conn<B>> {
        let mut conns = self.conns.lock().expect("http2 pool lock");
        let list = conns.get_mut(authority.as_str())?;
        list.retain(|c| self.usable(c));
        let least = list.iter().min_by_key(|c| c.load())?;
        if least.has_room() || list.len() >= MAX_CONNECTIONS {
            return Some(least.clone());
        }
        None
    }

    /// Open a connection, one at a time per upstream: a burst of requests
    /// that finds no room must not open a connection each, but share the
    /// first one's. Those that waited on a connect that failed fail with
    /// it instead of trying again in turn, so that a dead upstream costs
    /// each of them one connect timeout at most, as it would over HTTP/1.
    async fn open(
        &self,
        authority: &Authority,
        opened: &prometheus::IntCounter,
    ) -> Result<Conn<B>, ConnectError> {
        let asked = Instant::now();
        let gate = self
            .gates
            .lock()
            .expect("http2 gate lock")
            .entry(authority.clone())
            .or_default()
            .clone();
        let mut last_failure = gate.lock().await;
        if let Some(conn) = self.pick(authority) {
            return Ok(conn);
        }
        if let Some((at, why)) = &*last_failure {
            if *at >= asked {
                return Err(ConnectError::Shared(why.clone()));
            }
        }
        match self.connect(authority).await {
            Ok(conn) => {
                opened.inc();
                *last_failure = None;
                Ok(conn)
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<Conn<B>, ConnectError> {
        let stream = connect_tcp(authority, self.config.connect_timeout).await?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            // Notice an upstream that vanished without closing: a ping
            // every 20 s while the connection is open, idle or not.
            .keep_alive_interval(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let shared = Arc::new(Shared {
            in_flight: AtomicUsize::new(0),
            // The protocol's initial assumption until the upstream's
            // SETTINGS arrive (RFC 9113 section 6.5.2: unlimited, and hyper
            // starts at 100).
            max_streams: AtomicUsize::new(100),
            closed: AtomicBool::new(false),
            opened: Instant::now(),
            last_used: AtomicU64::new(self.now_ms()),
        });
        // The connection runs in a task of its own (see the module docs),
        // which also keeps the upstream's stream limit up to date.
        let watched = shared.clone();
        let name = authority.clone();
        tokio::spawn(async move {
            let mut connection = Box::pin(connection);
            let ended = std::future::poll_fn(|cx| {
                let polled = connection.as_mut().poll(cx);
                watched
                    .max_streams
                    .store(connection.current_max_send_streams(), Relaxed);
                polled
            })
            .await;
            watched.closed.store(true, Relaxed);
            match ended {
                Ok(()) => tracing::debug!(upstream = %name, "HTTP/2 upstream connection closed"),
                Err(e) => {
                    tracing::debug!(upstream = %name, error = %e, "HTTP/2 upstream connection ended with an error")
                }
            }
        });
        let conn = Conn { sender, shared };
        self.conns
            .lock()
            .expect("http2 pool lock")
            .entry(PoolKey(authority.clone()))
            .or_default()
            .push(conn.clone());
        Ok(conn)
    }

    /// Forget connections that ended, and close those that carried no
    /// stream for the idle timeout: an upstream that left the routes (or a
    /// pod that scaled away) must not keep a connection and its pings
    /// forever. Dropping the last handle of a connection lets hyper close
    /// it once its streams are done.
    pub(crate) fn sweep(&self) {
        let now = self.now_ms();
        let limit = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let mut conns = self.conns.lock().expect("http2 pool lock");
        for list in conns.values_mut() {
            list.retain(|c| {
                let idle =
                    c.load() == 0 && now.saturating_sub(c.shared.last_used.load(Relaxed)) > limit;
                self.usable(c) && !idle
            });
        }
        conns.retain(|_, list| !list.is_empty());
        // A gate nobody waits at is only worth keeping for a live upstream.
        self.gates
            .lock()
            .expect("http2 gate lock")
            .retain(|a, gate| Arc::strong_count(gate) > 1 || conns.contains_key(a.as_str()));
    }
}
