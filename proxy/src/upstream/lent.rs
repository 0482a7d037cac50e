//! A request body lent to hyper's HTTP/2 client, so that a request the
//! upstream refused can be sent again.
//!
//! hyper drops a request whose stream failed, body and all. When the
//! upstream refused that stream (see `http2::refused`), RFC 9113 section
//! 8.7 says it did not process the request, and the request may go to
//! another connection. For that the proxy needs the body back: the part
//! already sent, and the rest. So hyper gets a [`Lent`] body, which reads
//! the real body from a slot the pool keeps a handle to, and keeps a copy
//! of what it read, up to [`REPLAY_LIMIT`]. A new [`Lent`] on the same slot
//! replays the copy, then goes on with the rest; the old one, should hyper
//! still poll it, reads nothing more.
//!
//! The copy is of reference-counted chunks, not of bytes, and only up to
//! the limit: a body that outgrows it is simply not sent again (the
//! request fails as it would have without the copy). Once the response
//! head arrives the copy is dropped, since the request was processed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::SendBody;

/// How much of a request body is kept for sending it again: 16 KiB, enough
/// for the usual unary gRPC call, and small enough that every stream
/// waiting for its answer holds little.
pub(crate) const REPLAY_LIMIT: usize = 16 * 1024;

enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(d) => Frame::data(d.clone()),
            Kept::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

struct Slot<B> {
    body: B,
    kept: Vec<Kept>,
    kept_bytes: usize,
    /// The copy is incomplete (over the limit, or dropped once answered):
    /// the body cannot be sent again.
    lost: bool,
    /// Which lending may read; older ones read nothing.
    lending: u64,
}

/// The pool's handle on a lent body.
pub(crate) struct Lender<B>(Arc<Mutex<Slot<B>>>);

/// The body hyper reads.
pub(crate) struct Lent<B> {
    slot: Arc<Mutex<Slot<B>>>,
    lending: u64,
    /// Frames of the copy replayed so far.
    replayed: usize,
}

impl<B: Body<Data = Bytes> + Unpin> Lender<B> {
    pub(crate) fn new(body: B) -> Lender<B> {
        Lender(Arc::new(Mutex::new(Slot {
            body,
            kept: Vec::new(),
            kept_bytes: 0,
            lost: false,
            lending: 0,
        })))
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot<B>> {
        self.0.lock().expect("lent body lock")
    }

    /// A body for hyper that starts from the beginning; `None` when the
    /// whole of what was read is no longer at hand.
    pub(crate) fn lend(&self) -> Option<Lent<B>> {
        let mut slot = self.slot();
        if slot.lost {
            return None;
        }
        slot.lending += 1;
        Some(Lent {
            slot: self.0.clone(),
            lending: slot.lending,
            replayed: 0,
        })
    }

    /// The request was answered: nothing will be sent again.
    pub(crate) fn answered(&self) {
        let mut slot = self.slot();
        slot.lost = true;
        slot.kept = Vec::new();
    }

    /// The body itself, when none of it was read yet (to send the request
    /// elsewhere, as the HTTP/1 pool does). Whoever else holds the slot
    /// reads nothing from then on.
    pub(crate) fn into_unread(self) -> Option<B>
    where
        B: SendBody,
    {
        let mut slot = self.slot();
        if slot.lost || !slot.kept.is_empty() {
            return None;
        }
        slot.lost = true;
        slot.lending += 1;
        Some(std::mem::replace(&mut slot.body, B::empty()))
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Lent<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let mut slot = this.slot.lock().expect("lent body lock");
        if slot.lending != this.lending {
            return Poll::Ready(None);
        }
        if let Some(kept) = slot.kept.get(this.replayed) {
            this.replayed += 1;
            return Poll::Ready(Some(Ok(kept.frame())));
        }
        let polled = Pin::new(&mut slot.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if !slot.lost {
                let size = frame.data_ref().map_or(0, Bytes::len);
                if slot.kept_bytes + size > REPLAY_LIMIT {
                    slot.lost = true;
                    slot.kept = Vec::new();
                } else if let Some(data) = frame.data_ref() {
                    slot.kept.push(Kept::Data(data.clone()));
                } else if let Some(trailers) = frame.trailers_ref() {
                    slot.kept.push(Kept::Trailers(trailers.clone()));
                }
                slot.kept_bytes += size;
                this.replayed = slot.kept.len();
            }
        }
        polled
    }

    // hyper asks after every frame, to mark the last one END_STREAM
    // instead of sending an empty frame after it; an upstream may take a
    // run of empty frames for abuse (h2 does).
    fn is_end_stream(&self) -> bool {
        let slot = self.slot.lock().expect("lent body lock");
        slot.lending != self.lending
            || (self.replayed >= slot.kept.len() && slot.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let slot = self.slot.lock().expect("lent body lock");
        let pending: usize = slot
            .kept
            .get(self.replayed..)
            .unwrap_or_default()
            .iter()
            .map(|k| match k {
                Kept::Data(d) => d.len(),
                Kept::Trailers(_) => 0,
            })
            .sum();
        let pending = pending as u64;
        let rest = slot.body.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + pending);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    type Chunks = StreamBody<
        futures_util::stream::Iter<
            std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
        >,
    >;

    fn chunks(parts: &[&'static str]) -> Chunks {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn read_all<B: Body<Data = Bytes> + Unpin>(body: &mut B) -> String
    where
        B::Error: std::fmt::Debug,
    {
        let mut out = String::new();
        while let Some(frame) = body.frame().await {
            if let Ok(d) = frame.unwrap().into_data() {
                out.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
        out
    }

    #[tokio::test]
    async fn a_second_lending_replays_what_the_first_read_then_the_rest() {
        let lender = Lender::new(Full::new(Bytes::from_static(b"whole")));
        let mut first = lender.lend().unwrap();
        assert_eq!(read_all(&mut first).await, "whole");
        let mut second = lender.lend().unwrap();
        assert_eq!(read_all(&mut second).await, "whole");
        // The first lending, still held by someone, reads nothing more.
        assert!(first.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_lending_after_a_partial_read_gets_every_byte_once() {
        let lender = Lender::new(chunks(&["ab", "cd", "ef"]));
        let mut first = lender.lend().unwrap();
        let got = first.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&got[..], b"ab");
        let mut second = lender.lend().unwrap();
        assert_eq!(read_all(&mut second).await, "abcdef");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_lent_again() {
        let big: &'static str = Box::leak("x".repeat(REPLAY_LIMIT + 1).into_boxed_str());
        let lender = Lender::new(chunks(&[big]));
        let mut first = lender.lend().unwrap();
        assert_eq!(read_all(&mut first).await.len(), REPLAY_LIMIT + 1);
        assert!(lender.lend().is_none());
    }

    #[tokio::test]
    async fn an_answered_request_is_not_lent_again() {
        let lender = Lender::new(Full::new(Bytes::from_static(b"x")));
        let mut first = lender.lend().unwrap();
        read_all(&mut first).await;
        lender.answered();
        assert!(lender.lend().is_none());
    }
}
