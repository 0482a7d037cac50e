//! A body wrapper that acts once when a body is over, however it ends.
//!
//! Two bodies on the request path need exactly this shape: the upstream's
//! response body, which must return its connection to the pool when it has
//! been read to the end (`upstream`), and the body the client reads, which
//! must record its request once (`forward::observe`). Both differ only in
//! what they do, so that is the [`BodyHook`]; the polling, the one-shot
//! guarantee and the drop handling live here, once.

use std::pin::Pin;
use std::task::{Context, Poll};

use http_body::{Body, Frame, SizeHint};

/// How a body ended, as its hook hears it; exactly once per body.
pub(crate) enum End<'a, E> {
    /// Read to the end.
    Complete,
    /// The inner body failed while being read, with its error.
    Failed(&'a E),
    /// Dropped before its end: the reader (the client) went away.
    /// `empty` is true when there was nothing left to read anyway (a HEAD,
    /// 204 or 304 answer, or a length of 0 that was never polled).
    Dropped { empty: bool },
}

/// What a [`Hooked`] body does besides passing frames through, for a body
/// whose errors are `E`.
pub(crate) trait BodyHook<E> {
    /// Runs before every poll of the inner body, with the reader's context.
    fn before_poll(&mut self, _cx: &mut Context<'_>) {}
    /// Sees every frame as it passes: `trailers` for a trailers frame,
    /// `None` for data (gRPC puts its status in the trailers, and its first
    /// frame is when a call answered).
    fn on_frame(&mut self, _trailers: Option<&http::HeaderMap>) {}
    /// Runs once, when the body is over.
    fn end(self, how: End<'_, E>);
}

/// `inner`, with `hook` told how it ended.
pub(crate) struct Hooked<B: Body, H: BodyHook<B::Error>> {
    inner: B,
    hook: Option<H>,
}

impl<B: Body, H: BodyHook<B::Error>> Hooked<B, H> {
    pub(crate) fn new(inner: B, hook: H) -> Self {
        Hooked {
            inner,
            hook: Some(hook),
        }
    }

    /// A body whose end needs no action.
    pub(crate) fn plain(inner: B) -> Self {
        Hooked { inner, hook: None }
    }
}

impl<B, H> Body for Hooked<B, H>
where
    B: Body + Unpin,
    H: BodyHook<B::Error> + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        if let Some(hook) = &mut this.hook {
            hook.before_poll(cx);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(hook) = &mut this.hook {
                    hook.on_frame(frame.trailers_ref());
                }
            }
            Poll::Ready(None) => {
                if let Some(hook) = this.hook.take() {
                    hook.end(End::Complete);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(hook) = this.hook.take() {
                    hook.end(End::Failed(e));
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: Body, H: BodyHook<B::Error>> Drop for Hooked<B, H> {
    fn drop(&mut self) {
        if let Some(hook) = self.hook.take() {
            hook.end(End::Dropped {
                empty: self.inner.is_end_stream(),
            });
        }
    }
}
