//! gRPC for the tests: an echo upstream written on hyper (h2c), whose
//! faults are the test's to choose (a grpc-status on every call,
//! trailers-only answers, a GOAWAY after N calls, a delay), and a real gRPC
//! client (tonic) for it.
//!
//! The echo service has four methods, one per call shape. Every answer
//! message is `"<upstream name>:<text>"`, and every answer's trailers carry
//! `x-served-by: <upstream name>`, so a test sees who answered and that the
//! trailers arrived.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// The one message type of the echo service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Msg {
    #[prost(string, tag = "1")]
    pub text: String,
}

pub fn msg(text: impl Into<String>) -> Msg {
    Msg { text: text.into() }
}

/// Unary: one message in, `"<name>:<text>"` out.
pub const UNARY: &str = "/test.Echo/Unary";
/// Bidirectional: each message is echoed as soon as it arrives.
pub const BIDI: &str = "/test.Echo/Bidi";
/// Client streaming: many in, one out with the texts joined by commas.
pub const COLLECT: &str = "/test.Echo/Collect";
/// Server streaming: one number n in, n messages `"<name>:<i>"` out.
pub const COUNT: &str = "/test.Echo/Count";

/// What the echo upstream does besides echoing.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// The grpc-status every call ends with (0, OK, by default).
    pub status: u32,
    /// Answer a failing call trailers-only: the status in the response head.
    pub trailers_only: bool,
    /// Shut each connection down gracefully (GOAWAY) once this many calls
    /// have started on it.
    pub goaway_after: Option<u64>,
    /// Wait this long before the response head.
    pub delay: Duration,
}

pub struct GrpcUpstream {
    pub addr: SocketAddr,
    /// Calls started, over all connections.
    pub calls: Arc<AtomicU64>,
    /// Connections accepted.
    pub connections: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

type Body = BoxBody<Bytes, Infallible>;

/// An h2c gRPC echo upstream on 127.0.0.1.
pub async fn grpc_upstream(name: &'static str, behaviour: Behaviour) -> GrpcUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let accept = tokio::spawn({
        let (calls, connections) = (calls.clone(), connections.clone());
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(serve(name, behaviour.clone(), stream, calls.clone()));
            }
        }
    });
    GrpcUpstream {
        addr,
        calls,
        connections,
        accept,
    }
}

async fn serve(
    name: &'static str,
    behaviour: Behaviour,
    stream: tokio::net::TcpStream,
    calls: Arc<AtomicU64>,
) {
    let started = Arc::new(AtomicU64::new(0));
    let goaway = Arc::new(Notify::new());
    let service = hyper::service::service_fn({
        let (behaviour, goaway) = (behaviour.clone(), goaway.clone());
        move |req| {
            calls.fetch_add(1, Ordering::Relaxed);
            let n = started.fetch_add(1, Ordering::Relaxed) + 1;
            if behaviour.goaway_after == Some(n) {
                goaway.notify_one();
            }
            answer(name, behaviour.clone(), req)
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = goaway.notified() => {}
    }
    // A pod shutting down: GOAWAY, the calls under way finish.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

fn encode(text: String) -> Bytes {
    let body = msg(text).encode_to_vec();
    let mut out = BytesMut::with_capacity(5 + body.len());
    out.put_u8(0);
    out.put_u32(body.len() as u32);
    out.put_slice(&body);
    out.freeze()
}

/// The next whole length-prefixed message in `buf`, if one has arrived.
fn take_message(buf: &mut BytesMut) -> Option<Msg> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return None;
    }
    buf.advance(5);
    Some(Msg::decode(buf.split_to(len).freeze()).expect("a valid Msg"))
}

async fn answer(
    name: &'static str,
    b: Behaviour,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    tokio::time::sleep(b.delay).await;
    let grpc = |r: http::response::Builder| r.header("content-type", "application/grpc");
    if b.status != 0 && b.trailers_only {
        let resp = grpc(Response::builder())
            .header("grpc-status", b.status)
            .header("grpc-message", "planted")
            .body(Empty::new().boxed())
            .unwrap();
        return Ok(resp);
    }
    let path = req.uri().path().to_owned();
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(16);
    let mut body = req.into_body();
    tokio::spawn(async move {
        let send = |text: String| tx.send(Ok(Frame::data(encode(text))));
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(m) = take_message(&mut buf) {
                if path == BIDI {
                    let _ = send(format!("{name}:{}", m.text)).await;
                }
                got.push(m.text);
            }
        }
        let mut status = b.status;
        match path.as_str() {
            UNARY | COLLECT => {
                let _ = send(format!("{name}:{}", got.join(","))).await;
            }
            COUNT => {
                let n: u32 = got.first().and_then(|t| t.parse().ok()).unwrap_or(0);
                for i in 0..n {
                    let _ = send(format!("{name}:{i}")).await;
                }
            }
            BIDI => {}
            _ => status = 12, // UNIMPLEMENTED
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from(status));
        trailers.insert("x-served-by", HeaderValue::from_static(name));
        if status != 0 {
            trailers.insert("grpc-message", HeaderValue::from_static("planted"));
        }
        let _ = tx.send(Ok(Frame::trailers(trailers))).await;
    });
    let body = StreamBody::new(ReceiverStream::new(rx)).boxed();
    Ok(grpc(Response::builder()).body(body).unwrap())
}

/// A tonic channel to `addr` over h2c.
pub async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("a gRPC channel to the proxy")
}

fn codec() -> tonic_prost::ProstCodec<Msg, Msg> {
    tonic_prost::ProstCodec::default()
}

async fn ready(channel: &Channel) -> Result<tonic::client::Grpc<Channel>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(format!("channel not ready: {e}")))?;
    Ok(grpc)
}

/// One unary call; the answer's metadata holds its trailers too.
pub async fn unary(channel: &Channel, text: &str) -> Result<tonic::Response<Msg>, tonic::Status> {
    ready(channel)
        .await?
        .unary(
            tonic::Request::new(msg(text)),
            PathAndQuery::from_static(UNARY),
            codec(),
        )
        .await
}

/// A bidirectional call held open: each `say` waits for its echo before the
/// next message is sent, so both directions stream at once.
pub struct Bidi {
    tx: mpsc::Sender<Msg>,
    pub answers: tonic::Streaming<Msg>,
}

impl Bidi {
    pub async fn open(channel: &Channel) -> Result<Bidi, tonic::Status> {
        let (tx, rx) = mpsc::channel(4);
        let answers = ready(channel)
            .await?
            .streaming(
                tonic::Request::new(ReceiverStream::new(rx)),
                PathAndQuery::from_static(BIDI),
                codec(),
            )
            .await?
            .into_inner();
        Ok(Bidi { tx, answers })
    }

    pub async fn say(&mut self, text: &str) -> Result<String, tonic::Status> {
        self.tx
            .send(msg(text))
            .await
            .map_err(|_| tonic::Status::unknown("request stream closed"))?;
        match self.answers.message().await? {
            Some(m) => Ok(m.text),
            None => Err(tonic::Status::unknown("the answer stream ended early")),
        }
    }

    /// End the request stream, and read the answer's trailers.
    pub async fn close(mut self) -> Result<HeaderMap, tonic::Status> {
        drop(self.tx);
        while self.answers.message().await?.is_some() {}
        let trailers = self.answers.trailers().await?.unwrap_or_default();
        Ok(trailers.into_headers())
    }
}

/// A client-streaming call: the messages, then one answer.
pub async fn collect(channel: &Channel, texts: &[&str]) -> Result<Msg, tonic::Status> {
    let items: Vec<Msg> = texts.iter().map(|t| msg(*t)).collect();
    Ok(ready(channel)
        .await?
        .client_streaming(
            tonic::Request::new(tokio_stream::iter(items)),
            PathAndQuery::from_static(COLLECT),
            codec(),
        )
        .await?
        .into_inner())
}

/// A server-streaming call for `n` messages: their texts, then the trailers.
pub async fn count(channel: &Channel, n: u32) -> Result<(Vec<String>, HeaderMap), tonic::Status> {
    let mut answers = ready(channel)
        .await?
        .server_streaming(
            tonic::Request::new(msg(n.to_string())),
            PathAndQuery::from_static(COUNT),
            codec(),
        )
        .await?
        .into_inner();
    let mut texts = Vec::new();
    while let Some(m) = answers.message().await? {
        texts.push(m.text);
    }
    let trailers = answers.trailers().await?.unwrap_or_default();
    Ok((texts, trailers.into_headers()))
}

/// Who answered a message of the echo service: the part before the colon.
pub fn served_by(text: &str) -> &str {
    text.split(':').next().unwrap_or_default()
}

/// Routes text for h2c versions `(name, addr, weight)`, with an optional
/// `[rollback]` body.
pub fn h2c_routes(versions: &[(&str, SocketAddr, u64)], rollback: Option<&str>) -> String {
    super::routes(versions, rollback).replace("\nweight = ", "\nprotocol = \"h2c\"\nweight = ")
}

/// A tonic channel over TLS to `addr` (name `localhost`), with the ALPN
/// protocols of `config`: gRPC through the proxy's HTTPS front door.
pub async fn tls_channel(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Channel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    // The scheme here only names the channel; the connector does the TLS.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(connector)
        .await
        .expect("a gRPC channel over TLS")
}
