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
}

impl<T: AsyncRead + Unpin> Prefixed<T> {
    pub(crate) fn new(inner: T) -> Self {
        Prefixed {
            inner,
            buf: [0; H2_PREFACE.len()],
            start: 0,
            end: 0,
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
        if this.start < this.end {
            let pending = &this.buf[usize::from(this.start)..usize::from(this.end)];
            let n = pending.len().min(out.remaining());
            out.put_slice(&pending[..n]);
            this.start += n as u8;
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
}
