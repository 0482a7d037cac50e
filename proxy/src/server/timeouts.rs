//! How long a client may hold a connection without doing its part. hyper
//! has one timer for HTTP/1 (`header_read_timeout`) that starts when it
//! begins waiting for a request head, so it bounds an idle keep-alive
//! connection and a slow request head alike (hyper#3828). Cloud load
//! balancers and client pools keep idle connections for 60 s or more, and a
//! proxy that closes first races them: a request sent at that moment fails.
//! So the clock is kept here, in an IO wrapper, with one deadline per phase:
//!
//! - **idle** (no request under way): `idle_timeout` from the end of the
//!   last answer (or from the start of the connection);
//! - **head** (the first bytes of a request have arrived): `header_timeout`
//!   from its first byte, however slowly the rest trickles in (slowloris);
//! - **busy** (hyper has the whole head, the answer is being made): no read
//!   deadline here (the request body has its own, in `forward::upload`),
//!   but a client that takes no bytes of the answer for `idle_timeout`
//!   (a slow reader holding the response in memory) is cut.
//!
//! The request path tells the wrapper which phase it is in through the
//! connection's [`Activity`]: a request starts when hyper calls the
//! service, and ends when its answer's body is over. A connection upgraded
//! to a tunnel (WebSocket) leaves all of this behind.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Requests a client may give up on (cancel, or reset its HTTP/2 stream)
/// after the proxy accepted them, within [`CANCEL_PERIOD`], before its
/// connection is closed (HTTP/2: with GOAWAY). Each costs the proxy an
/// upstream connection, closed mid-request, so a client resetting streams
/// as fast as it opens them would churn through the upstream's ports (the
/// "rapid reset" attack, after acceptance, where hyper's own limit on
/// resets before acceptance does not see it). A browser that navigates away
/// cancels a handful.
pub(crate) const MAX_CANCELS: u32 = 100;
pub(crate) const CANCEL_PERIOD: Duration = Duration::from_secs(10);

/// What the request path tells a connection's IO about its requests.
#[derive(Debug)]
pub(crate) struct Activity {
    /// Requests whose answer is not over yet.
    in_flight: AtomicU32,
    /// Requests started, ever: a change means the connection was busy.
    started: AtomicU64,
    /// The connection became a tunnel: no more HTTP, no more deadlines.
    tunnel: AtomicBool,
    /// Cancels in the current period, and when it started (ms since
    /// `epoch`).
    cancels: AtomicU32,
    period_start: AtomicU64,
    epoch: std::time::Instant,
    /// Woken when the cancels go over the limit.
    abused: tokio::sync::Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicU32::new(0),
            started: AtomicU64::new(0),
            tunnel: AtomicBool::new(false),
            cancels: AtomicU32::new(0),
            period_start: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            abused: tokio::sync::Notify::new(),
        }
    }
}

impl Activity {
    pub(crate) fn request_started(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
    }

    pub(crate) fn request_ended(&self) {
        self.in_flight.fetch_sub(1, Relaxed);
    }

    pub(crate) fn upgraded(&self) {
        self.tunnel.store(true, Relaxed);
    }

    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// A number that changes whenever a request starts.
    pub(crate) fn generation(&self) -> u64 {
        self.started.load(Relaxed)
    }

    /// The client gave up on a request it had sent (after hyper accepted
    /// it). Over [`MAX_CANCELS`] in one [`CANCEL_PERIOD`], the connection is
    /// told to close.
    pub(crate) fn cancelled(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let start = self.period_start.load(Relaxed);
        if now.saturating_sub(start) > CANCEL_PERIOD.as_millis() as u64
            && self
                .period_start
                .compare_exchange(start, now, Relaxed, Relaxed)
                .is_ok()
        {
            self.cancels.store(0, Relaxed);
        }
        if self.cancels.fetch_add(1, Relaxed) + 1 == MAX_CANCELS + 1 {
            tracing::warn!(limit = MAX_CANCELS, period = ?CANCEL_PERIOD, "a client cancelled too many requests; closing its connection");
            self.abused.notify_one();
        }
    }

    /// Resolves when the client has cancelled too many requests.
    pub(crate) async fn abused(&self) {
        self.abused.notified().await
    }
}

/// The deadlines, as configured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) header_timeout: Duration,
    pub(crate) idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Head,
    Busy,
}

/// An HTTP/1 connection's IO, with the deadlines of its phase.
pub(crate) struct Timed<T> {
    inner: T,
    activity: Arc<Activity>,
    limits: Limits,
    phase: Phase,
    /// `Activity::generation` when the phase was last updated: a request can
    /// start and end between two polls of the IO.
    seen: u64,
    /// The timer, allocated once per connection. It may be set *earlier*
    /// than `deadline` (see `arm`): when it fires early, `expired` moves it
    /// on to `deadline`.
    timer: Option<Pin<Box<Sleep>>>,
    /// The armed phase's deadline.
    deadline: Instant,
    armed: bool,
    /// The busy phase's write deadline runs only while writes are stuck.
    write_stuck: bool,
}

impl<T> Timed<T> {
    /// `head_deadline`: when the first request's head must be complete (the
    /// protocol detection already counts against it).
    pub(crate) fn new(
        inner: T,
        activity: Arc<Activity>,
        limits: Limits,
        head_deadline: Instant,
    ) -> Self {
        let mut timed = Timed {
            inner,
            activity,
            limits,
            phase: Phase::Head,
            seen: 0,
            timer: None,
            deadline: head_deadline,
            armed: false,
            write_stuck: false,
        };
        timed.arm(head_deadline);
        timed
    }

    /// Arm `deadline`. A keep-alive connection re-arms twice per request
    /// (idle after the answer, head at the next first byte), each time a
    /// little later than before; moving the timer in tokio's wheel every
    /// time cost about 1% of the proxy's CPU. So the timer moves only when
    /// the deadline comes *earlier* than where it is set; when it fires
    /// early, `expired` moves it on, at most once per timeout period.
    fn arm(&mut self, deadline: Instant) {
        self.deadline = deadline;
        match &mut self.timer {
            Some(t) if t.deadline() <= deadline => {}
            Some(t) => t.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.armed = true;
    }

    /// Whether the armed deadline has passed (registering the waker if not).
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(t) = self.timer.as_mut().filter(|_| self.armed) else {
            return false;
        };
        loop {
            if t.as_mut().poll(cx).is_pending() {
                return false;
            }
            if t.deadline() >= self.deadline {
                return true;
            }
            // Fired early (see `arm`): on to the real deadline.
            t.as_mut().reset(self.deadline);
        }
    }

    /// Follow the request path's news: a request started or its answer
    /// ended since the last look.
    fn update_phase(&mut self) {
        let busy = self.activity.in_flight() > 0;
        let generation = self.activity.generation();
        let started_since = std::mem::replace(&mut self.seen, generation) != generation;
        if busy {
            if self.phase != Phase::Busy {
                self.phase = Phase::Busy;
                self.armed = false;
                self.write_stuck = false;
            }
        } else if self.phase == Phase::Busy || (self.phase == Phase::Head && started_since) {
            // The answer is over, whether or not this IO saw it under way.
            self.phase = Phase::Idle;
            self.arm(Instant::now() + self.limits.idle_timeout);
        }
    }

    fn tunnel(&self) -> bool {
        self.activity.tunnel.load(Relaxed)
    }

    fn timed_out(&self) -> io::Error {
        let what = match self.phase {
            Phase::Idle => "idle keep-alive connection reached the idle timeout",
            Phase::Head => "request head not complete within the header read timeout",
            Phase::Busy => "the client took no bytes of the answer within the idle timeout",
        };
        io::Error::new(io::ErrorKind::TimedOut, what)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Timed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.tunnel() {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        this.update_phase();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    // The first byte of the next request: its head has
                    // `header_timeout` from now, however it trickles in.
                    this.phase = Phase::Head;
                    this.arm(Instant::now() + this.limits.header_timeout);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.phase != Phase::Busy && this.expired(cx) {
                    return Poll::Ready(Err(this.timed_out()));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Timed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write(cx, data);
        this.watch_write(cx, polled.is_pending())?;
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch_write(cx, polled.is_pending())?;
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch_write(cx, polled.is_pending())?;
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T> Timed<T> {
    /// While busy, a write that cannot progress starts the write deadline;
    /// one that does clears it.
    fn watch_write(&mut self, cx: &mut Context<'_>, pending: bool) -> io::Result<()> {
        if self.tunnel() {
            return Ok(());
        }
        self.update_phase();
        if self.phase != Phase::Busy {
            return Ok(());
        }
        if !pending {
            self.write_stuck = false;
            self.armed = false;
            return Ok(());
        }
        if !self.write_stuck {
            self.write_stuck = true;
            self.arm(Instant::now() + self.limits.idle_timeout);
        }
        if self.expired(cx) {
            return Err(self.timed_out());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits {
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(75),
    };

    fn timed(server: tokio::io::DuplexStream) -> (Timed<tokio::io::DuplexStream>, Arc<Activity>) {
        let activity = Arc::new(Activity::default());
        let t = Timed::new(
            server,
            activity.clone(),
            LIMITS,
            Instant::now() + LIMITS.header_timeout,
        );
        (t, activity)
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_head_must_arrive_within_the_header_timeout() {
        let (_client, server) = tokio::io::duplex(1024);
        let (mut t, _) = timed(server);
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let e = t.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.header_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gets_the_idle_timeout_and_a_head_its_own_from_its_first_byte() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut t, activity) = timed(server);
        // A request comes and is answered.
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = t.read(&mut buf).await.unwrap();
        activity.request_started();
        activity.request_ended();
        // 60 s of silence is fine: idle, not a slow head.
        let idle_from = Instant::now();
        let read = tokio::time::timeout(Duration::from_secs(60), t.read(&mut buf)).await;
        assert!(read.is_err(), "still open after 60 s idle");
        // The next request's first byte starts its header deadline.
        client.write_all(b"G").await.unwrap();
        assert_eq!(t.read(&mut buf).await.unwrap(), 1);
        let head_from = Instant::now();
        let e = t.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(head_from.elapsed(), LIMITS.header_timeout);
        assert!(idle_from.elapsed() < LIMITS.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_at_the_idle_timeout() {
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut t, activity) = timed(server);
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = t.read(&mut buf).await.unwrap();
        activity.request_started();
        activity.request_ended();
        let idle_from = Instant::now();
        let e = t.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle_from.elapsed(), LIMITS.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_that_move_later_are_kept_exactly() {
        // The timer is not moved when a deadline moves later (`arm`): it
        // fires early and moves on. Requests 8 s apart outlive the first
        // head's 10 s timer, and the idle timeout still counts, to the
        // instant, from the last answer.
        let (mut client, server) = tokio::io::duplex(1024);
        let (mut t, activity) = timed(server);
        let mut buf = [0u8; 64];
        for _ in 0..5 {
            client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            let _ = t.read(&mut buf).await.unwrap();
            activity.request_started();
            activity.request_ended();
            let read = tokio::time::timeout(Duration::from_secs(8), t.read(&mut buf)).await;
            assert!(read.is_err(), "idle for 8 s is allowed");
        }
        let idle_from = Instant::now() - Duration::from_secs(8);
        let e = t.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(idle_from.elapsed(), LIMITS.idle_timeout);
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_connection_has_no_read_deadline_and_a_tunnel_none_at_all() {
        let (_client, server) = tokio::io::duplex(1024);
        let (mut t, activity) = timed(server);
        activity.request_started();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(3600), t.read(&mut buf)).await;
        assert!(read.is_err(), "a request body may take its time here");
        activity.upgraded();
        activity.request_ended();
        let read = tokio::time::timeout(Duration::from_secs(3600), t.read(&mut buf)).await;
        assert!(read.is_err(), "a tunnel has no deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_no_bytes_of_the_answer_is_cut() {
        // A tiny pipe that the client never reads: writes get stuck.
        let (_client, server) = tokio::io::duplex(16);
        let (mut t, activity) = timed(server);
        activity.request_started();
        let started = Instant::now();
        let answer = vec![b'x'; 1024];
        let e = t.write_all(&answer).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIMITS.idle_timeout);
    }
}
