//! The client's request body on its way to the upstream. Once it is handed
//! to the upstream connection the request path no longer holds it, so a
//! hook on it notes how the client's side ended, and the request path reads
//! that note when the exchange fails: a body the client broke, abandoned or
//! sent too slowly is the client's fault, never the version's.
//!
//! "Too slowly" is a pace: a body must arrive at [`Pace::min_rate`] on
//! average, after a grace of [`Pace::grace`] (Apache's mod_reqtimeout works
//! the same way). A client trickling a megabyte at a kilobyte a second,
//! or stalling mid-body, cannot hold a connection and an upstream request
//! open for ever: its body ends with an error, and it gets a 408.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::mirror::Tee;
use crate::body::{BodyHook, End, Hooked};
use crate::metrics::ClientErrorKind;

/// The client's body, streamed upstream at a bounded pace, with its fate
/// noted.
pub(crate) type ClientBody = Hooked<Paced, Upload>;

const STREAMING: u8 = 0;
const COMPLETE: u8 = 1;
const MALFORMED: u8 = 2;
const ABORTED: u8 = 3;
const TOO_SLOW: u8 = 4;

/// How fast a request body must arrive.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Time allowed before the rate counts: a body's first bytes, a client's
    /// pause to think.
    pub(crate) grace: Duration,
    /// Bytes per second, on average from the body's start, after the grace.
    pub(crate) min_rate: u64,
}

/// A request body that fails when it falls behind its [`Pace`].
pub(crate) struct Paced {
    inner: Incoming,
    pace: Pace,
    start: Instant,
    received: u64,
    /// `None` for a body with nothing in it: no timer for a GET.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The copy `[mirror]` makes of the body, if this request is copied.
    /// Boxed: every request's body carries the field, few use it, and the
    /// request's future is moved by value.
    tee: Option<Box<Tee>>,
}

/// Why a paced body failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PacedError {
    #[error(transparent)]
    Body(#[from] hyper::Error),
    #[error("the request body arrived slower than {min_rate} bytes/s after {}", humantime::format_duration(*.grace))]
    TooSlow { min_rate: u64, grace: Duration },
}

impl Paced {
    fn new(inner: Incoming, pace: Pace, tee: Option<Box<Tee>>) -> Self {
        let start = Instant::now();
        let deadline = (!inner.is_end_stream())
            .then(|| Box::pin(tokio::time::sleep_until(start + pace.grace)));
        Paced {
            inner,
            pace,
            start,
            received: 0,
            deadline,
            tee,
        }
    }

    /// The grace, plus a second for every `min_rate` bytes received.
    fn next_deadline(&self) -> Instant {
        let earned =
            Duration::from_secs_f64(self.received as f64 / self.pace.min_rate.max(1) as f64);
        self.start + self.pace.grace + earned
    }
}

impl Body for Paced {
    type Data = Bytes;
    type Error = PacedError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, PacedError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                    let next = this.next_deadline();
                    if let Some(deadline) = &mut this.deadline {
                        deadline.as_mut().reset(next);
                    }
                    if let Some(tee) = &mut this.tee {
                        tee.push(data);
                    }
                }
                // hyper stops polling a body whose length says it is over,
                // so its end is seen here as well as at `None`.
                if this.inner.is_end_stream() {
                    if let Some(tee) = this.tee.take() {
                        (*tee).finish();
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // A failed body leaves no whole copy: the tee's drop counts it.
            Poll::Ready(Some(Err(e))) => {
                this.tee = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if let Some(tee) = this.tee.take() {
                    (*tee).finish();
                }
                Poll::Ready(None)
            }
            Poll::Pending => match this.deadline.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Some(Err(PacedError::TooSlow {
                    min_rate: this.pace.min_rate,
                    grace: this.pace.grace,
                }))),
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The hook on the body; the request path keeps the other end.
pub(crate) struct Upload(Arc<AtomicU8>);

/// How the client's body is doing, readable after it was handed away.
#[derive(Debug, Clone)]
pub(crate) struct UploadState(Option<Arc<AtomicU8>>);

/// Wrap the client's body. A request without one needs no note, no timer
/// and no allocation beyond the wrapper: its body is over before it starts.
pub(crate) fn watch(
    body: Incoming,
    pace: Pace,
    tee: Option<Box<Tee>>,
) -> (ClientBody, UploadState) {
    let empty = body.is_end_stream();
    let paced = Paced::new(body, pace, tee);
    if empty {
        return (Hooked::plain(paced), UploadState(None));
    }
    let state = Arc::new(AtomicU8::new(STREAMING));
    (
        Hooked::new(paced, Upload(state.clone())),
        UploadState(Some(state)),
    )
}

impl UploadState {
    /// The client's fault, if the exchange failed because of its body.
    /// `timed_out` is true when the upstream deadline passed: while the
    /// client is still sending, the upstream cannot be blamed for waiting.
    pub(crate) fn fault(&self, timed_out: bool) -> Option<ClientErrorKind> {
        let state = self.0.as_ref().map_or(COMPLETE, |s| s.load(Relaxed));
        match state {
            MALFORMED => Some(ClientErrorKind::Malformed),
            ABORTED => Some(ClientErrorKind::Aborted),
            TOO_SLOW => Some(ClientErrorKind::Timeout),
            STREAMING if timed_out => Some(ClientErrorKind::Timeout),
            _ => None,
        }
    }
}

impl BodyHook<PacedError> for Upload {
    fn end(self, how: End<'_, PacedError>) {
        let state = match how {
            End::Complete | End::Dropped { empty: true } => COMPLETE,
            End::Failed(PacedError::TooSlow { .. }) => TOO_SLOW,
            End::Failed(PacedError::Body(e)) => classify(e),
            // The upstream side stopped reading (it answered early, or its
            // connection failed): nothing the client did.
            End::Dropped { empty: false } => return,
        };
        self.0.store(state, Relaxed);
    }
}

/// A body hyper could not read from the client: invalid framing (a bad
/// chunk size, a bad chunk extension) is malformed; anything else (the
/// connection closed mid-body, an HTTP/2 stream reset) is the client going
/// away.
fn classify(e: &hyper::Error) -> u8 {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
            ) {
                return MALFORMED;
            }
        }
        source = s.source();
    }
    if e.is_parse() {
        MALFORMED
    } else {
        ABORTED
    }
}
