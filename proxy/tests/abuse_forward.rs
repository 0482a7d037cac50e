//! The request path against clients and upstreams that break the rules
//! (security review, issue 15): a response framed two ways, a bad or
//! missing Host, forged forwarding headers, a 101 nobody asked for,
//! CONNECT, error bodies that said too much, and a log flood from a dead
//! upstream. Every test runs on loopback against a real proxy, and every
//! load is bounded in count.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// A hang guard for single exchanges, not a speed limit.
const HANG: Duration = Duration::from_secs(30);

/// The header of the proxy's own answers that carries the request id.
const REQUEST_ID: &str = "x-canary-proxy-request-id";

// ------------------------------------------------------------------ helpers

/// An upstream written byte by byte: it reads each request head and
/// answers with `response`, whatever was asked, on as many requests and
/// connections as come. It counts the request heads it read.
struct RawUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_upstream(response: &'static [u8]) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let counted = counted.clone();
            conns.spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Bounded: a test sends a handful of bodiless requests.
                for _ in 0..1000 {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        counted.fetch_add(1, Ordering::SeqCst);
                        if stream.write_all(response).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    RawUpstream {
        addr,
        requests,
        task,
    }
}

/// An upstream that answers every request with what it received: a
/// `#path` line, then one `name: value` line per header. It counts the
/// requests it answered.
struct Echo {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_upstream() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let counted = counted.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    let mut out = format!("#path {}\n", req.uri());
                    for (name, value) in req.headers() {
                        out.push_str(&format!(
                            "{name}: {}\n",
                            value.to_str().unwrap_or("<non-ascii>")
                        ));
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(out))))
                }
            });
            conns.spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    Echo {
        addr,
        requests,
        task,
    }
}

/// The values of header `name` in an echo's answer, in order.
fn seen<'a>(echo_body: &'a str, name: &str) -> Vec<&'a str> {
    echo_body
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .collect()
}

/// An answer read off the wire.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Write `request` exactly as given on a fresh connection and read the
/// answer until the proxy closes (the requests ask it to, with
/// `Connection: close`).
async fn raw_request(addr: SocketAddr, request: &str) -> Raw {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Bounded: at most 64 KiB of answer, each read with a hang guard.
    while out.len() < 64 * 1024 {
        match tokio::time::timeout(HANG, stream.read(&mut buf))
            .await
            .expect("the proxy answers and closes (hang guard)")
        {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    Raw {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

/// The request id at the end of one of the proxy's own answers, checked
/// against the header that carries it too.
fn request_id(body: &str, header: Option<&str>) -> String {
    let id = body
        .trim_end()
        .rsplit_once("; request id ")
        .map(|(_, id)| id.to_owned())
        .unwrap_or_else(|| panic!("no request id in {body:?}"));
    assert_eq!(id.len(), 16, "16 hex digits: {id:?}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id:?}");
    assert_eq!(header, Some(id.as_str()), "the header has the body's id");
    id
}

/// A loopback port that refuses connections: bound, noted, closed.
fn dead_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn one_version(addr: SocketAddr) -> String {
    routes(&[("stable", addr, 100)], None)
}

async fn requests_total(proxy: &TestProxy, code: &str) -> Option<f64> {
    sample(
        &proxy.metrics().await,
        "canary_proxy_requests_total",
        &[("version", "stable"), ("code", code)],
    )
}

// ------------------------------------------------------------ 1. framing

/// RFC 9112 6.3: Transfer-Encoding overrides Content-Length. The proxy used
/// to pass the Content-Length on beside the de-chunked body, and hyper cut
/// the answer off: the client got nothing, the metrics a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_with_content_length_and_transfer_encoding_arrives_whole() {
    let up = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(&one_version(up.addr)).await;
    let c = client();
    for _ in 0..3 {
        let a = tokio::time::timeout(HANG, get(&c, proxy.addr, "/"))
            .await
            .expect("hang guard")
            .expect("the whole answer arrives");
        assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "hello world"));
        if let Some(len) = a.headers.get("content-length") {
            assert_eq!(len, "11", "only a length that matches the body");
        }
    }
    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "canary_proxy_upstream_errors_total",
            &[("version", "stable"), ("kind", "reset")]
        ),
        Some(0.0)
    );
    eventually(HANG, "three 200s counted", || async {
        (requests_total(&proxy, "200").await == Some(3.0)).then_some(())
    })
    .await;
    proxy.shutdown().await;
}

/// The same on the request side is hyper's work, pinned here: a request
/// with both is read by its chunks, its Content-Length is dropped, and the
/// connection is closed after the answer (RFC 9112 6.3), so neither the
/// upstream nor a hop in front can read its body another way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_content_length_and_transfer_encoding_is_read_by_its_chunks() {
    let b = backend("v1", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&one_version(b.addr())).await;
    let a = raw_request(
        proxy.addr,
        "POST /echo HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 3\r\n\
         Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.contains("hello"), "the whole body went up: {a:?}");
    assert_eq!(a.header("connection"), Some("close"), "{a:?}");
    let m = proxy.metrics().await;
    for kind in ["connect", "timeout", "reset"] {
        assert_eq!(
            sample(
                &m,
                "canary_proxy_upstream_errors_total",
                &[("version", "stable"), ("kind", kind)]
            ),
            Some(0.0),
            "{kind}"
        );
    }
    proxy.shutdown().await;
    b.shutdown().await.unwrap();
}

// ---------------------------------------------------------------- 2. Host

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_duplicate_or_invalid_host_is_400_and_not_forwarded() {
    let up = echo_upstream().await;
    let proxy = TestProxy::start(&one_version(up.addr)).await;
    let bad = [
        "GET /dup HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n",
        "GET /same-twice HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n",
        "GET /none HTTP/1.1\r\n",
        "GET /userinfo HTTP/1.1\r\nHost: user@a.example\r\n",
        "GET /port HTTP/1.1\r\nHost: a.example:99999\r\n",
        "GET /path HTTP/1.1\r\nHost: a.example/x\r\n",
        "GET /space HTTP/1.1\r\nHost: a example\r\n",
        "GET http://user@abs.example/ HTTP/1.1\r\nHost: abs.example\r\n",
    ];
    for head in bad {
        let a = raw_request(proxy.addr, &format!("{head}Connection: close\r\n\r\n")).await;
        assert_eq!(a.status, 400, "for {head:?}: {a:?}");
        assert!(
            a.body.starts_with("400 Bad Request: "),
            "the proxy's short answer for {head:?}: {a:?}"
        );
        request_id(&a.body, a.header(REQUEST_ID));
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 0, "none was forwarded");
    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "canary_proxy_client_errors_total",
            &[("kind", "malformed")]
        ),
        Some(bad.len() as f64),
        "counted as the client's malformed requests"
    );
    assert!(
        !m.contains("canary_proxy_requests_total{code=\"400\""),
        "not counted against a version:\n{m}"
    );

    // HTTP/1.0 may leave Host out; the client's X-Forwarded-Host does not
    // survive the missing Host.
    let a = raw_request(
        proxy.addr,
        "GET /old HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(seen(&a.body, "host"), [up.addr.to_string()]);
    assert!(seen(&a.body, "x-forwarded-host").is_empty(), "{}", a.body);
    proxy.shutdown().await;
}

/// RFC 9112 3.2.2: with an absolute-form target, Host is ignored and the
/// target's authority is the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_names_the_host() {
    let up = echo_upstream().await;
    let proxy = TestProxy::start(&one_version(up.addr)).await;
    let a = raw_request(
        proxy.addr,
        "GET http://abs.example:8081/where?x=1 HTTP/1.1\r\nHost: other.example\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    assert!(a.body.starts_with("#path /where?x=1\n"), "{}", a.body);
    assert_eq!(seen(&a.body, "host"), ["abs.example:8081"]);
    assert_eq!(seen(&a.body, "x-forwarded-host"), ["abs.example:8081"]);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_from_the_client_follow_one_rule() {
    let up = echo_upstream().await;
    let proxy = TestProxy::start(&one_version(up.addr)).await;
    let a = raw_request(
        proxy.addr,
        "GET /who HTTP/1.1\r\nHost: shop.example\r\n\
         X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n\
         X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\
         Forwarded: for=192.0.2.1;proto=https;host=evil.example\r\n\
         X-Real-IP: 192.0.2.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 200, "{a:?}");
    // Lists are appended to: every line the client sent, then the peer.
    assert_eq!(
        seen(&a.body, "x-forwarded-for"),
        ["203.0.113.7, 198.51.100.1, 127.0.0.1"]
    );
    // Facts are what the proxy saw; Host is kept as the client sent it.
    assert_eq!(seen(&a.body, "host"), ["shop.example"]);
    assert_eq!(seen(&a.body, "x-forwarded-proto"), ["http"]);
    assert_eq!(seen(&a.body, "x-forwarded-host"), ["shop.example"]);
    // Headers the proxy does not write do not pass.
    assert!(seen(&a.body, "forwarded").is_empty(), "{}", a.body);
    assert!(seen(&a.body, "x-real-ip").is_empty(), "{}", a.body);
    proxy.shutdown().await;
}

// ------------------------------------------------------ 3. 101 and CONNECT

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_the_client_did_not_ask_for_is_a_502_counted_as_a_reset() {
    let up = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(&one_version(up.addr)).await;
    for c in [client(), h2c_client()] {
        let a = tokio::time::timeout(HANG, get(&c, proxy.addr, "/ping"))
            .await
            .expect("hang guard")
            .expect("the proxy answers");
        assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{a:?}");
        let id = request_id(
            &a.body,
            a.headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()),
        );
        assert_eq!(
            a.body,
            format!("502 Bad Gateway: the upstream failed; request id {id}\n")
        );
    }
    assert_eq!(up.requests.load(Ordering::SeqCst), 2);
    let m = proxy.metrics().await;
    assert_eq!(
        sample(
            &m,
            "canary_proxy_upstream_errors_total",
            &[("version", "stable"), ("kind", "reset")]
        ),
        Some(2.0)
    );
    eventually(HANG, "two 502s counted", || async {
        (requests_total(&proxy, "502").await == Some(2.0)).then_some(())
    })
    .await;
    assert_eq!(requests_total(&proxy, "101").await, None);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_is_501_and_not_forwarded() {
    let up = echo_upstream().await;
    let proxy = TestProxy::start(&one_version(up.addr)).await;
    let a = raw_request(
        proxy.addr,
        "CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\
         Connection: close\r\n\r\n",
    )
    .await;
    assert_eq!(a.status, 501, "{a:?}");
    assert!(
        a.body.starts_with("501 Not Implemented: "),
        "the proxy's short answer: {a:?}"
    );
    request_id(&a.body, a.header(REQUEST_ID));
    assert_eq!(up.requests.load(Ordering::SeqCst), 0, "not forwarded");
    let m = proxy.metrics().await;
    assert!(
        !m.contains("canary_proxy_requests_total{"),
        "not counted against a version:\n{m}"
    );
    // The proxy still serves.
    let a = get(&client(), proxy.addr, "/after").await.unwrap();
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.requests.load(Ordering::SeqCst), 1);
    proxy.shutdown().await;
}

// ----------------------------------------------------- 4. error bodies

/// The client reads a short, stable text and an id; the version, its
/// address and the cause are in the log line with the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_answer_shows_an_id_and_the_log_has_the_details() {
    let dead = dead_port();
    let cm = ConfigMapDir::new(&[("routes.toml", one_version(dead).as_bytes())]);
    let proxy = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    let a = get(&client(), proxy.addr(), "/ping").await.unwrap();
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    let id = request_id(
        &a.body,
        a.headers.get(REQUEST_ID).and_then(|v| v.to_str().ok()),
    );
    assert_eq!(
        a.body,
        format!("502 Bad Gateway: the upstream failed; request id {id}\n")
    );
    assert!(
        !a.body.contains("stable") && !a.body.contains(&dead.port().to_string()),
        "nothing about the version or its address: {}",
        a.body
    );
    let line = eventually(HANG, "the failure's log line", || async {
        proxy
            .child
            .stderr_lines()
            .into_iter()
            .find(|l| l.contains(&format!("request_id={id}")))
    })
    .await;
    for detail in [
        "upstream request failed",
        "version=stable",
        "kind=\"connect\"",
        &format!("http://{dead}"),
    ] {
        assert!(line.contains(detail), "{detail:?} in the log line: {line}");
    }
}

// --------------------------------------------------------- 5. log flood

/// The per-request warnings are limited to 10 a second per kind and
/// version; every one held back is counted in a later summary line; the
/// metrics stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_does_not_flood_the_log() {
    const PER_SECOND: u64 = 10;
    let dead = dead_port();
    let cm = ConfigMapDir::new(&[("routes.toml", one_version(dead).as_bytes())]);
    let proxy = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    let addr = proxy.addr();
    let started = Instant::now();

    // A burst: 8 clients x 50 requests, every one a 502.
    let burst: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let c = client();
                for _ in 0..50 {
                    let a = get(&c, addr, "/ping").await.unwrap();
                    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
                }
            })
        })
        .collect();
    for task in burst {
        task.await.unwrap();
    }
    let mut sent: u64 = 400;

    // (failure lines, lines reported suppressed) in the log so far.
    let tally = || {
        let lines = proxy.child.stderr_lines();
        let failed = lines
            .iter()
            .filter(|l| l.contains("upstream request failed"))
            .count() as u64;
        let suppressed: u64 = lines
            .iter()
            .filter(|l| {
                l.contains("log lines suppressed by the rate limit")
                    && l.contains("upstream_connect")
            })
            .map(|l| {
                let n = l.split("suppressed=").nth(1).expect("a count");
                let n = n.split(|c: char| !c.is_ascii_digit()).next().unwrap();
                n.parse::<u64>().expect("a number")
            })
            .sum();
        (failed, suppressed)
    };
    // The summary of the burst's last second comes with the first failure
    // logged after it: send one request at a time, slower than the limit,
    // until every failure is either a line or in a summary (bounded: 200
    // requests, 30 s).
    let mut accounted = false;
    for _ in 0..200 {
        let (failed, suppressed) = tally();
        if failed + suppressed == sent && suppressed > 0 {
            accounted = true;
            break;
        }
        let a = get(&client(), addr, "/ping").await.unwrap();
        assert_eq!(a.status, StatusCode::BAD_GATEWAY);
        sent += 1;
        // Pacing below 10 a second, so the last window is not limited.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (failed, suppressed) = tally();
    println!(
        "{failed} failure lines and {suppressed} in summaries for {sent} failures in {:?}",
        started.elapsed()
    );
    assert!(
        accounted,
        "{failed} lines + {suppressed} suppressed != {sent} failures:\n{}",
        proxy.child.stderr_text()
    );
    let windows = started.elapsed().as_secs() + 2;
    assert!(
        failed <= PER_SECOND * windows,
        "{failed} failure lines in about {windows} s"
    );
    assert!(failed < sent / 2, "{failed} lines for {sent} failures");
    // The metrics count every failure.
    let m = metrics(proxy.admin()).await;
    assert_eq!(
        sample(
            &m,
            "canary_proxy_upstream_errors_total",
            &[("version", "stable"), ("kind", "connect")]
        ),
        Some(sent as f64)
    );
    let admin = proxy.admin();
    eventually(HANG, "every 502 counted", || async {
        let m = metrics(admin).await;
        (sample(
            &m,
            "canary_proxy_requests_total",
            &[("version", "stable"), ("code", "502")],
        ) == Some(sent as f64))
        .then_some(())
    })
    .await;
}
