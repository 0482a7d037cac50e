//! The client's request body on its way to the upstream. Once it is handed
//! to the upstream connection the request path no longer holds it, so a
//! hook on it notes how the client's side ended, and the request path reads
//! that note when the exchange fails: a body the client broke, abandoned or
//! sent too slowly is the client's fault, never the version's.

use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::Arc;

use hyper::body::Incoming;

use crate::body::{BodyHook, End, Hooked};
use crate::metrics::ClientErrorKind;

/// The client's body, streamed upstream, with its fate noted.
pub(crate) type ClientBody = Hooked<Incoming, Upload>;

const STREAMING: u8 = 0;
const COMPLETE: u8 = 1;
const MALFORMED: u8 = 2;
const ABORTED: u8 = 3;

/// The hook on the body; the request path keeps the other end.
pub(crate) struct Upload(Arc<AtomicU8>);

/// How the client's body is doing, readable after it was handed away.
#[derive(Debug, Clone)]
pub(crate) struct UploadState(Option<Arc<AtomicU8>>);

/// Wrap the client's body. A request without one needs no note, and no
/// allocation: its body is over before it starts.
pub(crate) fn watch(body: Incoming) -> (ClientBody, UploadState) {
    if http_body::Body::is_end_stream(&body) {
        return (Hooked::plain(body), UploadState(None));
    }
    let state = Arc::new(AtomicU8::new(STREAMING));
    (
        Hooked::new(body, Upload(state.clone())),
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
            STREAMING if timed_out => Some(ClientErrorKind::Timeout),
            _ => None,
        }
    }
}

impl BodyHook<hyper::Error> for Upload {
    fn end(self, how: End<'_, hyper::Error>) {
        let state = match how {
            End::Complete | End::Dropped { empty: true } => COMPLETE,
            End::Failed(e) => classify(e),
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
