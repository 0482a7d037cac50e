//! The request path end to end on loopback: streaming of large bodies (and
//! the proxy's memory while they flow), header rewriting, WebSocket and h2c,
//! and the status codes of failures.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Version};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::Message;

/// A hang guard for single exchanges, not a speed limit.
const HANG: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------- streaming

const STREAM_TOTAL: u64 = 200 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;
const RSS_LIMIT: u64 = 64 * 1024 * 1024;

/// A request body of `total` bytes made on the fly, one 64 KiB chunk at a
/// time, so the test never holds more than one chunk. Each chunk is a fixed
/// pseudo-random block stamped with its sequence number, so a lost,
/// repeated or reordered chunk changes the hash. The SHA-256 of everything
/// sent lands in `digest` when the body ends.
struct Generated {
    block: Bytes,
    next: u64,
    sent: u64,
    total: u64,
    hasher: Sha256,
    digest: Arc<std::sync::Mutex<Option<Vec<u8>>>>,
}

impl Generated {
    fn new(total: u64) -> Self {
        // xorshift64 from a fixed seed: the same bytes on every run.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = BytesMut::with_capacity(CHUNK);
        while block.len() < CHUNK {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            block.extend_from_slice(&x.to_le_bytes());
        }
        Generated {
            block: block.freeze(),
            next: 0,
            sent: 0,
            total,
            hasher: Sha256::new(),
            digest: Default::default(),
        }
    }
}

impl http_body::Body for Generated {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.sent >= this.total {
            if let Some(d) = this
                .digest
                .lock()
                .unwrap()
                .as_mut()
                .filter(|d| d.is_empty())
            {
                d.extend_from_slice(&std::mem::take(&mut this.hasher).finalize());
            }
            return Poll::Ready(None);
        }
        let len = CHUNK.min((this.total - this.sent) as usize);
        let mut chunk = BytesMut::from(&this.block[..len]);
        chunk[..8].copy_from_slice(&this.next.to_le_bytes());
        this.hasher.update(&chunk);
        this.next += 1;
        this.sent += len as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk.freeze()))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_echo_of_200_mb_round_trips_intact_with_proxy_rss_under_64_mb() {
    let b = backend("v1", 0.0, Duration::ZERO).await;
    let cm = ConfigMapDir::new(&[(
        "routes.toml",
        routes(&[("stable", b.addr(), 100)], None).as_bytes(),
    )]);
    let proxy = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    let addr = proxy.addr();
    let idle_rss = proxy.child.rss_bytes();
    assert!(idle_rss > 0, "RSS of the proxy process is readable");

    let body = Generated::new(STREAM_TOTAL);
    let sent_digest = body.digest.clone();
    *sent_digest.lock().unwrap() = Some(Vec::new());
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let transfer = {
        let (received, done) = (received.clone(), done.clone());
        async move {
            let c: Client<_, Generated> = Client::builder(TokioExecutor::new()).build_http();
            let req = Request::post(format!("http://{addr}/echo"))
                .body(body)
                .unwrap();
            let resp = tokio::time::timeout(HANG, c.request(req))
                .await
                .expect("response head (hang guard)")
                .expect("the proxy answers");
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.into_body();
            let mut hasher = Sha256::new();
            // Bounded: at most one frame per byte sent, each with a hang guard.
            for _ in 0..=STREAM_TOTAL {
                let Some(frame) = tokio::time::timeout(HANG, body.frame())
                    .await
                    .expect("response body keeps flowing (hang guard)")
                else {
                    break;
                };
                if let Ok(data) = frame.expect("response body frame").into_data() {
                    hasher.update(&data);
                    received.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
            done.store(true, Ordering::SeqCst);
            hasher.finalize().to_vec()
        }
    };
    // Sample the proxy's RSS every 20 ms while bytes flow (bounded in count:
    // 30000 samples is ten minutes; the transfer ends long before).
    let sampler = async {
        let (mut max, mut during) = (0u64, 0u32);
        for _ in 0..30_000 {
            if done.load(Ordering::SeqCst) {
                break;
            }
            let rss = proxy.child.rss_bytes();
            assert!(rss > 0, "the proxy is still running");
            max = max.max(rss);
            let r = received.load(Ordering::Relaxed);
            if r > 0 && r < STREAM_TOTAL {
                during += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (max, during)
    };
    let (got_digest, (max_rss, during)) = tokio::join!(transfer, sampler);

    println!(
        "proxy RSS: idle {} KiB, peak {} KiB over {during} samples while streaming",
        idle_rss >> 10,
        max_rss >> 10
    );
    assert_eq!(
        received.load(Ordering::Relaxed),
        STREAM_TOTAL,
        "all 200 MB came back"
    );
    let sent_digest = sent_digest.lock().unwrap().clone().unwrap();
    assert_eq!(
        sent_digest.len(),
        32,
        "the request body was sent to its end"
    );
    assert_eq!(
        got_digest, sent_digest,
        "the echo has the SHA-256 of what was sent"
    );
    assert!(
        during >= 3,
        "RSS was sampled only {during} times while the body flowed"
    );
    assert!(
        max_rss < RSS_LIMIT,
        "proxy RSS peaked at {} MiB while streaming 200 MB (idle: {} MiB); limit 64 MiB",
        max_rss >> 20,
        idle_rss >> 20
    );
    drop(proxy);
    b.shutdown().await.unwrap();
}

// ------------------------------------------------------------------ headers

/// An upstream that answers every request with what it received, one
/// `name: value` line per header plus `#version` and `#body` lines, and
/// with hop-by-hop response headers that the proxy must not pass on.
struct HeaderEcho {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for HeaderEcho {
    fn drop(&mut self) {
        // The accept loop owns the connections (a JoinSet): aborting it
        // closes the listener and every connection.
        self.task.abort();
    }
}

async fn header_echo() -> HeaderEcho {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            conns.spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(echo_headers)),
            );
        }
    });
    HeaderEcho { addr, task }
}

async fn echo_headers(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut out = format!("#version {:?}\n", req.version());
    for (name, value) in req.headers() {
        out.push_str(&format!(
            "{name}: {}\n",
            value.to_str().unwrap_or("<non-ascii>")
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    out.push_str(&format!("#body {}\n", String::from_utf8_lossy(&body)));
    let resp = Response::builder()
        .header("connection", "keep-alive, x-hop-resp")
        .header("keep-alive", "timeout=5")
        .header("x-hop-resp", "must not reach the client")
        .header("proxy-connection", "keep-alive")
        .header("upgrade", "h2c")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::from(out)))
        .unwrap();
    Ok(resp)
}

/// What the upstream saw, as `(name, value)` pairs in order.
fn seen(body: &str) -> Vec<(String, String)> {
    body.lines()
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

fn values<'a>(seen: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    seen.iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// One request over a fresh HTTP/1.1 connection, headers exactly as given.
async fn send_raw_headers(addr: SocketAddr, req: Request<Full<Bytes>>) -> Response<Bytes> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = tokio::time::timeout(HANG, sender.send_request(req))
        .await
        .expect("answer (hang guard)")
        .expect("the proxy answers");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    conn.abort();
    Response::from_parts(parts, body)
}

fn request_with_hop_by_hop(addr: SocketAddr) -> Request<Full<Bytes>> {
    Request::post(format!("http://{addr}/submit?x=1"))
        .header("host", "shop.example.com")
        .header("connection", "keep-alive, x-hop-req")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("x-hop-req", "must not reach the upstream")
        .header("proxy-connection", "keep-alive")
        .header("transfer-encoding", "chunked")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set() {
    let up = header_echo().await;
    let proxy = TestProxy::start(&routes(&[("stable", up.addr, 100)], None)).await;
    let resp = send_raw_headers(proxy.addr, request_with_hop_by_hop(proxy.addr)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = String::from_utf8_lossy(resp.body()).into_owned();
    let s = seen(&body);

    // Request side (RFC 9110 7.6.1): none of the client's hop-by-hop
    // headers, nor the header its Connection names, reach the upstream.
    for name in [
        "keep-alive",
        "te",
        "x-hop-req",
        "proxy-connection",
        "upgrade",
    ] {
        assert!(
            values(&s, name).is_empty(),
            "upstream received `{name}`: {body}"
        );
    }
    for v in values(&s, "connection") {
        assert!(
            !v.contains("x-hop-req"),
            "the client's Connection header was forwarded: {body}"
        );
    }
    // The client's chunked framing is not forwarded as a header; the proxy
    // frames the body itself (at most one Transfer-Encoding, its own).
    assert!(values(&s, "transfer-encoding").len() <= 1, "{body}");
    assert!(
        body.contains("#body hello\n"),
        "the body arrived intact: {body}"
    );
    assert!(body.contains("#version HTTP/1.1\n"), "{body}");

    // End-to-end headers pass, and the X-Forwarded-* headers describe the
    // client's hop. The request is in absolute-form (`POST http://<proxy>/
    // submit`), so its target names the host and its Host header is ignored
    // (RFC 9112 3.2.2; security review, issue 15): Host and X-Forwarded-Host
    // are the target's authority, not `shop.example.com`.
    assert_eq!(values(&s, "x-end-to-end"), ["kept"]);
    assert_eq!(values(&s, "host"), [proxy.addr.to_string()]);
    assert_eq!(values(&s, "x-forwarded-host"), [proxy.addr.to_string()]);
    assert_eq!(values(&s, "x-forwarded-proto"), ["http"]);
    assert_eq!(
        values(&s, "x-forwarded-for"),
        ["203.0.113.7, 127.0.0.1"],
        "the proxy appends the peer it saw"
    );

    // Response side: the upstream's hop-by-hop headers stop at the proxy.
    for name in ["keep-alive", "x-hop-resp", "proxy-connection", "upgrade"] {
        assert!(
            !resp.headers().contains_key(name),
            "client received `{name}`: {:?}",
            resp.headers()
        );
    }
    for v in resp.headers().get_all("connection") {
        assert!(
            !v.to_str().unwrap().contains("x-hop-resp"),
            "the upstream's Connection header was forwarded: {:?}",
            resp.headers()
        );
    }
    assert_eq!(resp.headers()["x-end-to-end"], "kept");

    // A client with no X-Forwarded-For gets one naming just its address.
    let c = client();
    let a = get(&c, proxy.addr, "/plain").await.unwrap();
    assert_eq!(values(&seen(&a.body), "x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(values(&seen(&a.body), "host"), [proxy.addr.to_string()]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_host_sends_the_upstream_authority_as_host() {
    let up = header_echo().await;
    let routes = format!(
        "[versions.stable]\nupstream = \"http://{}\"\nweight = 100\nrewrite_host = true\n",
        up.addr
    );
    let proxy = TestProxy::start(&routes).await;
    let resp = send_raw_headers(proxy.addr, request_with_hop_by_hop(proxy.addr)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let body = String::from_utf8_lossy(resp.body()).into_owned();
    let s = seen(&body);
    assert_eq!(
        values(&s, "host"),
        [up.addr.to_string()],
        "Host is the upstream's authority"
    );
    // The request is in absolute-form: its target's authority is the host
    // the client asked for (RFC 9112 3.2.2), not its Host header.
    assert_eq!(
        values(&s, "x-forwarded-host"),
        [proxy.addr.to_string()],
        "the host the client asked for survives in X-Forwarded-Host"
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------- protocols

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_proxy() {
    // Upstream: a WebSocket echo server on 127.0.0.1:0.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let upstream = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(stream)
            .await
            .expect("upstream handshake");
        // Bounded: the client sends a handful of messages, then closes.
        for _ in 0..100 {
            match ws.next().await {
                Some(Ok(m)) if m.is_text() || m.is_binary() => ws.send(m).await.unwrap(),
                // After a Close, keep polling: that sends tungstenite's
                // queued Close reply, then the stream ends.
                Some(Ok(_)) => {}
                None | Some(Err(_)) => break,
            }
        }
    });
    let proxy = TestProxy::start(&routes(&[("stable", up_addr, 100)], None)).await;

    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, resp) = tokio::time::timeout(
        HANG,
        tokio_tungstenite::client_async(format!("ws://{}/chat", proxy.addr), stream),
    )
    .await
    .expect("handshake (hang guard)")
    .expect("the proxy passes the upgrade on");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);

    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let messages = [
        Message::text("hello through the proxy"),
        Message::binary(vec![0u8, 1, 2, 254, 255]),
        Message::text("second"),
        Message::binary(big),
    ];
    for m in messages {
        ws.send(m.clone()).await.unwrap();
        let back = tokio::time::timeout(HANG, ws.next())
            .await
            .expect("echo (hang guard)")
            .expect("the tunnel is open")
            .unwrap();
        assert_eq!(back, m);
    }
    ws.close(None).await.unwrap();
    // The closing handshake completes through the tunnel: the upstream's
    // Close comes back, then the stream ends (bounded: a few frames at most).
    let mut closed = false;
    for _ in 0..10 {
        match tokio::time::timeout(HANG, ws.next())
            .await
            .expect("close reply (hang guard)")
        {
            Some(Ok(Message::Close(_))) => closed = true,
            Some(Ok(_)) => {}
            None | Some(Err(_)) => break,
        }
    }
    assert!(
        closed,
        "the upstream's Close frame came back through the proxy"
    );
    drop(ws);
    tokio::time::timeout(HANG, upstream)
        .await
        .expect("upstream sees the close (hang guard)")
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_reaches_http1_upstreams() {
    let b = backend("v1", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(&[("stable", b.addr(), 100)], None)).await;
    let c = h2c_client();
    for _ in 0..5 {
        let resp = c
            .request(
                Request::get(format!("http://{}/ping", proxy.addr))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .expect("h2c answer");
        assert_eq!(
            resp.version(),
            Version::HTTP_2,
            "the client spoke HTTP/2 to the proxy"
        );
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-ping-version"], "v1");
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "pong");
    }
    proxy.shutdown().await;
    b.shutdown().await.unwrap();

    // The upstream is spoken to in HTTP/1.1, with Host from :authority.
    let up = header_echo().await;
    let proxy = TestProxy::start(&routes(&[("stable", up.addr, 100)], None)).await;
    let a = get(&c, proxy.addr, "/h2").await.expect("h2c answer");
    assert_eq!(a.status, StatusCode::OK);
    assert!(a.body.contains("#version HTTP/1.1\n"), "{}", a.body);
    assert_eq!(values(&seen(&a.body), "host"), [proxy.addr.to_string()]);
    proxy.shutdown().await;
}

// ------------------------------------------------------------------- errors

/// The id at the end of one of the proxy's own answers (`...; request id
/// 8f3a...`), checked against the `x-canary-proxy-request-id` header.
fn request_id_of(a: &Answer) -> String {
    let id = a
        .body
        .trim_end()
        .rsplit_once("; request id ")
        .map(|(_, id)| id.to_owned())
        .unwrap_or_else(|| panic!("no request id in {:?}", a.body));
    assert_eq!(
        a.headers
            .get("x-canary-proxy-request-id")
            .and_then(|v| v.to_str().ok()),
        Some(id.as_str()),
        "the header has the body's id"
    );
    id
}

/// The stderr line of `proxy` that carries request id `id`.
async fn log_line_of(proxy: &ProxyProcess, id: &str) -> String {
    eventually(HANG, "the failure's log line", || async {
        proxy
            .child
            .stderr_lines()
            .into_iter()
            .find(|l| l.contains(&format!("request_id={id}")))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_is_502_with_an_id_and_the_version_in_the_log() {
    // A port that refuses connections: bind, note it, close it.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cm = ConfigMapDir::new(&[(
        "routes.toml",
        routes(&[("stable", dead, 100)], None).as_bytes(),
    )]);
    let proxy = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    let a = get(&client(), proxy.addr(), "/ping").await.unwrap();
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert!(a.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    // The client gets a short, stable text and an id, nothing internal
    // (security review, issue 15); the version and the cause are logged.
    let id = request_id_of(&a);
    assert_eq!(
        a.body,
        format!("502 Bad Gateway: the upstream failed; request id {id}\n")
    );
    let line = log_line_of(&proxy, &id).await;
    assert!(
        line.contains("version=stable")
            && line.contains(&dead.to_string())
            && line.contains("kind=\"connect\""),
        "the log line names the version, its upstream and the cause: {line}"
    );
    let m = metrics(proxy.admin()).await;
    assert_eq!(
        sample(
            &m,
            "canary_proxy_upstream_errors_total",
            &[("version", "stable"), ("kind", "connect")]
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_after_the_upstream_timeout() {
    let slow = backend("v1", 0.0, Duration::from_secs(2)).await;
    let cm = ConfigMapDir::new(&[(
        "routes.toml",
        routes(&[("stable", slow.addr(), 100)], None).as_bytes(),
    )]);
    let proxy = spawn_proxy_binary(&cm.path("routes.toml"), &["--upstream-timeout", "300ms"]);
    let a = get(&client(), proxy.addr(), "/ping").await.unwrap();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    let id = request_id_of(&a);
    assert_eq!(
        a.body,
        format!("504 Gateway Timeout: the upstream did not answer in time; request id {id}\n")
    );
    let line = log_line_of(&proxy, &id).await;
    assert!(
        line.contains("version=stable") && line.contains("300ms"),
        "the log line names the version and the limit: {line}"
    );
    let m = metrics(proxy.admin()).await;
    assert_eq!(
        sample(
            &m,
            "canary_proxy_upstream_errors_total",
            &[("version", "stable"), ("kind", "timeout")]
        ),
        Some(1.0)
    );
    drop(proxy);
    // `slow` still sleeps on the abandoned request; dropping the handle
    // starts its shutdown and the runtime ends it with the test.
    drop(slow);
}

/// Write `bytes` on a fresh connection and read until the proxy closes it.
/// The writer runs on its own task so the proxy may answer (and close)
/// before it has read everything.
async fn raw_exchange(addr: SocketAddr, bytes: Vec<u8>) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: at most 64 KiB of answer, each read with a hang guard.
    while out.len() < 64 * 1024 {
        match tokio::time::timeout(HANG, rd.read(&mut buf))
            .await
            .expect("the proxy answers or closes (hang guard)")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    drop(writer.await);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_the_proxy_keeps_serving() {
    let b = backend("v1", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(&[("stable", b.addr(), 100)], None)).await;
    // A 512 KiB cookie: past any sane header limit.
    let mut req = b"GET /ping HTTP/1.1\r\nHost: shop.example.com\r\nCookie: ".to_vec();
    req.extend(vec![b'a'; 512 * 1024]);
    req.extend_from_slice(b"\r\n\r\n");
    let answer = raw_exchange(proxy.addr, req).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "status line: {:?}",
        answer.lines().next()
    );

    let a = get(&client(), proxy.addr, "/ping").await.unwrap();
    assert_eq!(
        (a.status.as_u16(), a.body.as_str(), a.version()),
        (200, "pong", "v1"),
        "still serving"
    );
    proxy.shutdown().await;
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_request_gets_400_and_the_proxy_keeps_serving() {
    let b = backend("v1", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(&[("stable", b.addr(), 100)], None)).await;
    for bad in [
        &b"GET /ping HTTP/1.1\r\nHost: x\r\nthis is not a header\r\n\r\n"[..],
        b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: banana\r\n\r\n",
    ] {
        let answer = raw_exchange(proxy.addr, bad.to_vec()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "status line for {:?}: {:?}",
            String::from_utf8_lossy(bad),
            answer.lines().next()
        );
    }
    let a = get(&client(), proxy.addr, "/ping").await.unwrap();
    assert_eq!(
        (a.status.as_u16(), a.body.as_str(), a.version()),
        (200, "pong", "v1"),
        "still serving"
    );
    proxy.shutdown().await;
    b.shutdown().await.unwrap();
}
