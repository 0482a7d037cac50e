//! Choosing HTTP/1.1 or h2c on a plain connection, before hyper sees it:
//! the client's first bytes either are the HTTP/2 preface (h2c with prior
//! knowledge, RFC 9113 section 3.3) or they are not.
//!
//! The bytes are read, not peeked: a peek returns at once while any byte is
//! waiting, so a client that sent part of the preface and stalled would be
//! peeked at in a loop. Reading waits for more bytes (or the end) like any
//! read, under the header-read deadline, and [`Prefixed`] hands the bytes
//! read to hyper before the rest of the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What every HTTP/2 connection starts with (RFC 9113 section 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Detected {
    /// HTTP/1.x, or bytes for HTTP/1's parser to reject.
    Http1,
    /// The complete HTTP/2 preface.
    H2,
    /// The client closed the connection before sending a byte.
    Closed,
}

/// A stream with the bytes already read from it put back in front.
#[derive(Debug)]
pub(crate) struct Prefixed<T> {
    inner: T,
    buf: [u8; H2_PREFACE.len()],
    /// `buf[start..end]` is yet to be read.
    start: u8,
    end: u8,
    /// An error from the stream met while handing out the last of `buf`,
    /// for the next read.
    error: Option<io::Error>,
}

impl<T: AsyncRead + Unpin> Prefixed<T> {
    pub(crate) fn new(inner: T) -> Self {
        Prefixed {
            inner,
            buf: [0; H2_PREFACE.len()],
            start: 0,
            end: 0,
            error: None,
        }
    }

    /// Read until the first bytes decide the protocol, or `deadline`. A
    /// deadline that passes is an error (`TimedOut`): the client sent no
    /// request in time.
    pub(crate) async fn detect(&mut self, deadline: Instant) -> io::Result<Detected> {
        loop {
            let end = usize::from(self.end);
            let read = self.inner.read(&mut self.buf[end..]);
            let n = match tokio::time::timeout_at(deadline, read).await {
                Ok(n) => n?,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no request within the header read timeout",
                    ))
                }
            };
            if n == 0 {
                // EOF: nothing at all is a closed connection; a part of a
                // request is HTTP/1's to reject.
                return Ok(if end == 0 {
                    Detected::Closed
                } else {
                    Detected::Http1
                });
            }
            let end = end + n;
            self.end = end as u8;
            if self.buf[..end] != H2_PREFACE[..end] {
                return Ok(Detected::Http1);
            }
            if end == H2_PREFACE.len() {
                return Ok(Detected::H2);
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        if this.start < this.end {
            let pending = &this.buf[usize::from(this.start)..usize::from(this.end)];
            let n = pending.len().min(out.remaining());
            out.put_slice(&pending[..n]);
            this.start += n as u8;
            // The rest of the request too, if it is there: hyper sizes its
            // read buffer (8 KiB) for one read, and after a first read of
            // only these bytes it grows the buffer to 16 KiB for the rest,
            // which it keeps for the connection's life.
            if this.start == this.end && out.remaining() > 0 {
                if let Poll::Ready(Err(e)) = Pin::new(&mut this.inner).poll_read(cx, out) {
                    this.error = Some(e);
                }
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    async fn detect_after(client_sends: &[u8], close: bool) -> (io::Result<Detected>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(client_sends).await.unwrap();
        if close {
            client.shutdown().await.unwrap();
        }
        let mut p = Prefixed::new(server);
        let detected = p.detect(Instant::now() + Duration::from_millis(200)).await;
        drop(client);
        let mut replay = Vec::new();
        if detected.is_ok() {
            p.read_to_end(&mut replay).await.unwrap();
        }
        (detected, replay)
    }

    #[tokio::test]
    async fn the_preface_is_h2_and_is_replayed_to_hyper() {
        let mut sent = H2_PREFACE.to_vec();
        sent.extend_from_slice(b"\x00\x00\x00\x04");
        let (d, replay) = detect_after(&sent, true).await;
        assert_eq!(d.unwrap(), Detected::H2);
        assert_eq!(replay, sent, "every byte reaches hyper, in order");
    }

    #[tokio::test]
    async fn anything_else_is_http1_and_is_replayed() {
        let sent = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n";
        let (d, replay) = detect_after(sent, true).await;
        assert_eq!(d.unwrap(), Detected::Http1);
        assert_eq!(replay, sent);
    }

    #[tokio::test]
    async fn the_first_read_after_detection_carries_the_rest_too() {
        // hyper keeps a read buffer sized for one read; a first read of
        // only the detected bytes would make it grow the buffer to 16 KiB.
        let sent = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n";
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(sent).await.unwrap();
        let mut p = Prefixed::new(server);
        let detected = p.detect(Instant::now() + Duration::from_millis(200)).await;
        assert_eq!(detected.unwrap(), Detected::Http1);
        let mut buf = [0u8; 64];
        let n = p.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], sent);
    }

    #[tokio::test]
    async fn a_closed_connection_ends_detection() {
        let (d, _) = detect_after(b"", true).await;
        assert_eq!(d.unwrap(), Detected::Closed);
        // A part of the preface, then the end: HTTP/1 rejects or closes it.
        let (d, replay) = detect_after(b"PRI * HT", true).await;
        assert_eq!(d.unwrap(), Detected::Http1);
        assert_eq!(replay, b"PRI * HT");
    }

    #[tokio::test]
    async fn a_stalled_partial_preface_times_out() {
        let (d, _) = detect_after(b"P", false).await;
        assert_eq!(d.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    /// Property tests: whatever a client sends, in whatever pieces, the
    /// decision is the one the bytes call for, and hyper reads every byte.
    mod properties {
        use super::*;
        use futures_util::FutureExt;
        use proptest::prelude::*;

        /// Never reached: a detection that waits for bytes that will not
        /// come is caught without waiting (see `exchange`), so no case
        /// depends on the clock.
        const NEVER: Duration = Duration::from_secs(3600);

        /// What the bytes call for: H2 exactly when they start with the whole
        /// preface, Closed only when there are none, Http1 otherwise (they
        /// leave the preface, or stop part way through it).
        fn expected(sent: &[u8]) -> Detected {
            if sent.starts_with(H2_PREFACE) {
                Detected::H2
            } else if sent.is_empty() {
                Detected::Closed
            } else {
                Detected::Http1
            }
        }

        /// Bytes that follow the preface for a while, often all the way.
        fn client_bytes() -> impl Strategy<Value = Vec<u8>> {
            let tail = || prop::collection::vec(any::<u8>(), 0..40);
            prop_oneof![
                // A prefix of the preface (possibly all or none of it),
                // then anything.
                (0..=H2_PREFACE.len(), tail())
                    .prop_map(|(n, tail)| [&H2_PREFACE[..n], &tail[..]].concat()),
                // The preface with one byte replaced (perhaps by itself).
                (0..H2_PREFACE.len(), any::<u8>(), tail()).prop_map(|(i, b, tail)| {
                    let mut sent = H2_PREFACE.to_vec();
                    sent[i] = b;
                    sent.extend(tail);
                    sent
                }),
                // HTTP/1.1 requests start with a method, like "PRI" does.
                prop::sample::select(vec![
                    &b"GET / HTTP/1.1\r\n\r\n"[..],
                    b"PRI / HTTP/1.1\r\n",
                    b"P"
                ])
                .prop_map(<[u8]>::to_vec),
                prop::collection::vec(any::<u8>(), 0..64),
            ]
        }

        /// `fut`'s output if it is ready now: for a poll whose bytes are all
        /// in the pipe, which must not wait. The yield first refills tokio's
        /// cooperative budget (a poll on an empty budget is pending however
        /// ready its bytes are), so a future still pending is one that waits
        /// for bytes that will never come, or spins without them.
        async fn ready_now<F: std::future::Future>(fut: F) -> Option<F::Output> {
            tokio::task::yield_now().await;
            fut.now_or_never()
        }

        /// The client writes `sent` in pieces of the `pieces` sizes (cycled),
        /// letting the server run after each, then closes its side when
        /// `close` (and always when the bytes alone cannot decide: a strict
        /// prefix of the preface). Returns the decision and every byte read
        /// through the `Prefixed` stream after it, in reads of the `reads`
        /// sizes (cycled), or why there is none.
        fn exchange(
            sent: &[u8],
            pieces: &[usize],
            reads: &[usize],
            close: bool,
        ) -> Result<(Detected, Vec<u8>), String> {
            let close = close || H2_PREFACE.starts_with(sent);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async {
                // Room for every byte, so the client never waits for the
                // server: once it is done, all it sent is in the pipe.
                let (mut client, server) = tokio::io::duplex(sent.len() + 1);
                let (to_send, pieces) = (sent.to_vec(), pieces.to_vec());
                let writer = tokio::spawn(async move {
                    let mut rest = &to_send[..];
                    for &size in pieces.iter().cycle() {
                        if rest.is_empty() {
                            break;
                        }
                        let (piece, tail) = rest.split_at(size.min(rest.len()));
                        client.write_all(piece).await.unwrap();
                        // The server may read now, and see just this much.
                        tokio::task::yield_now().await;
                        rest = tail;
                    }
                    if close {
                        client.shutdown().await.unwrap();
                    }
                    // Open until the server has read: it must not need the end.
                    client
                });
                let mut p = Prefixed::new(server);
                let detected = {
                    let detect = p.detect(Instant::now() + NEVER);
                    tokio::pin!(detect);
                    loop {
                        // Was the client done before this poll? Then all it
                        // sent (and the end, if sent) is in the pipe, and the
                        // bytes decide now or never will.
                        let client_done = writer.is_finished();
                        match ready_now(detect.as_mut()).await {
                            Some(d) => break d,
                            None if client_done => {
                                return Err("waits for bytes though they decide, or spins".into())
                            }
                            // Still sending: the yield in ready_now let it go on.
                            None => {}
                        }
                    }
                }
                .map_err(|e| format!("detect: {e}"))?;
                let client = writer.await.unwrap();
                // Every byte is in the pipe now, so each read returns at once
                // or never will. Read as hyper would, in reads of any size,
                // up to the end (or, on an open connection, every byte sent).
                let mut replay = Vec::new();
                for &size in reads.iter().cycle() {
                    // More than was sent is wrong already; stop there.
                    if replay.len() > sent.len() || !close && replay.len() == sent.len() {
                        break;
                    }
                    let mut buf = vec![0; size];
                    match ready_now(p.read(&mut buf)).await {
                        None => {
                            return Err(format!(
                                "replay waits after {} of {} bytes",
                                replay.len(),
                                sent.len()
                            ))
                        }
                        Some(Ok(0)) => break,
                        Some(Ok(n)) => replay.extend_from_slice(&buf[..n]),
                        Some(Err(e)) => return Err(format!("replay: {e}")),
                    }
                }
                drop(client);
                Ok((detected, replay))
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig {
                // About 0.3 s in a debug build.
                cases: 4000,
                failure_persistence: None,
                ..ProptestConfig::default()
            })]

            #[test]
            fn detection_follows_the_bytes_and_replays_them_all(
                sent in client_bytes(),
                pieces in prop::collection::vec(1usize..=30, 1..8),
                reads in prop::collection::vec(1usize..=30, 1..8),
                close in any::<bool>(),
            ) {
                let (detected, replay) = exchange(&sent, &pieces, &reads, close).map_err(TestCaseError::fail)?;
                prop_assert_eq!(detected, expected(&sent));
                prop_assert_eq!(replay, sent, "every byte, in order");
            }
        }

        #[test]
        fn the_expectation_itself() {
            // The oracle above, on the cases that matter, so a mistake in it
            // cannot hide one in `detect`.
            assert_eq!(expected(b""), Detected::Closed);
            assert_eq!(expected(&H2_PREFACE[..23]), Detected::Http1);
            assert_eq!(expected(H2_PREFACE), Detected::H2);
            assert_eq!(expected(&[&H2_PREFACE[..], b"x"].concat()), Detected::H2);
            assert_eq!(expected(b"GET / HTTP/1.1"), Detected::Http1);
        }
    }
}
