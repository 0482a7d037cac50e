//! The upstream connection pool, seen from the outside: keep-alive
//! connections are reused, a connection the upstream closed while it idled
//! is never handed a request, and idle connections are closed on time.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn opened(metrics: &str, version: &str) -> f64 {
    sample(
        metrics,
        "canary_proxy_upstream_connections_opened_total",
        &[("version", version)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_upstream_connection() {
    let up = raw_upstream().await;
    let proxy = TestProxy::start(&routes(&[("stable", up.addr, 100)], None)).await;
    let client = client();
    // GET and HEAD in turn: a HEAD answer has no body to read, so its
    // connection goes back to the pool by another path.
    for i in 0..200 {
        let method = if i % 2 == 0 {
            Method::GET
        } else {
            Method::HEAD
        };
        let req = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}/ping", proxy.addr))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = client.request(req).await.expect("the proxy answers");
        assert_eq!(resp.status(), StatusCode::OK, "request {i} ({method})");
        let body = resp.into_body().collect().await.expect("whole body");
        let expected: &[u8] = if method == Method::HEAD { b"" } else { b"ok" };
        assert_eq!(&body.to_bytes()[..], expected, "request {i} ({method})");
    }
    let m = proxy.metrics().await;
    assert_eq!(
        opened(&m, "stable"),
        1.0,
        "200 requests one after another need one upstream connection"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_open_at_most_one_connection_each() {
    let b = backend("v1", 0.0, Duration::from_millis(2)).await;
    let proxy = TestProxy::start(&routes(&[("stable", b.addr(), 100)], None)).await;
    let load = Load::start(proxy.addr, 8, 2000, Duration::from_secs(60));
    let (ok, failed, first_error) = load.finish_when_done().await;
    assert_eq!(failed, 0, "no request fails: {first_error:?}");
    assert_eq!(ok, 2000);
    let n = opened(&proxy.metrics().await, "stable");
    assert!(
        (1.0..=8.0).contains(&n),
        "8 clients at a time need between 1 and 8 upstream connections, not one per request: opened {n}"
    );
    proxy.shutdown().await;
    b.shutdown().await.unwrap();
}

/// An HTTP/1.1 upstream written out by hand, to control exactly when it
/// closes connections: it answers `200 ok` to every request (the head alone
/// to HEAD) and keeps the connection open, until the test tells it to close
/// its idle connections, without saying so first (no `Connection: close`),
/// as a server whose keep-alive timeout fires does.
struct RawUpstream {
    addr: SocketAddr,
    /// Connections the proxy closed.
    closed_by_peer: Arc<AtomicU64>,
    /// Connections this upstream closed on `close_idle`.
    closed_here: Arc<AtomicU64>,
    close_idle: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    /// Close every connection that is waiting for a request, and return once
    /// `expected` connections in all have been closed this way.
    async fn close_idle_connections(&self, expected: u64) {
        self.close_idle.send_modify(|generation| *generation += 1);
        eventually(
            Duration::from_secs(10),
            "the upstream closes its idle connections",
            || async { (self.closed_here.load(Ordering::SeqCst) == expected).then_some(()) },
        )
        .await;
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_upstream() -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed_by_peer = Arc::new(AtomicU64::new(0));
    let closed_here = Arc::new(AtomicU64::new(0));
    let (close_idle, close_rx) = tokio::sync::watch::channel(0u64);
    let (closed, closer) = (closed_by_peer.clone(), closed_here.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (closed, closer) = (closed.clone(), closer.clone());
            let mut close_rx = close_rx.clone();
            close_rx.mark_unchanged();
            tokio::spawn(async move {
                let mut stream = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut head_only = false;
                    let mut line = String::new();
                    // Idle until the first line of a request, or told to close.
                    tokio::select! {
                        read = stream.read_line(&mut line) => match read {
                            Ok(0) | Err(_) => {
                                closed.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(_) => {}
                        },
                        _ = close_rx.changed() => {
                            // Closed (FIN sent) before the count goes up.
                            drop(stream);
                            closer.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    // The rest of the request head, line by line.
                    while line != "\r\n" {
                        head_only |= line.starts_with("HEAD ");
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap_or(0);
                            }
                        }
                        line.clear();
                        match stream.read_line(&mut line).await {
                            Ok(0) | Err(_) => {
                                closed.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(_) => {}
                        }
                    }
                    let mut body = vec![0u8; length];
                    if stream.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    // A HEAD answer is the head alone (RFC 9110 9.3.2).
                    let answer = if head_only {
                        &answer[..answer.len() - 2]
                    } else {
                        &answer[..]
                    };
                    if stream.get_mut().write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    RawUpstream {
        addr,
        closed_by_peer,
        closed_here,
        close_idle,
        task,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_upstream_closed_while_idle_gets_no_request() {
    let up = raw_upstream().await;
    let proxy = TestProxy::start(&routes(&[("stable", up.addr, 100)], None)).await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    // POST is not retried, so a request sent on a dead pooled connection
    // would surface as a 502: each must find the closed one and skip it.
    for i in 0..5u64 {
        let req = Request::post(format!("http://{}/orders", proxy.addr))
            .body(Full::new(Bytes::from_static(b"{\"n\":1}")))
            .unwrap();
        let resp = client.request(req).await.expect("the proxy answers");
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            status,
            StatusCode::OK,
            "POST {i}: {}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(&body[..], b"ok");
        // The connection went back to the pool alive; now the upstream
        // closes it while it idles there.
        up.close_idle_connections(i + 1).await;
    }
    let m = proxy.metrics().await;
    assert_eq!(
        opened(&m, "stable"),
        5.0,
        "each answer came on a new connection"
    );
    for kind in ["connect", "reset", "timeout"] {
        assert_eq!(
            sample(
                &m,
                "canary_proxy_upstream_errors_total",
                &[("version", "stable"), ("kind", kind)]
            )
            .unwrap_or(0.0),
            0.0,
            "no upstream error of kind {kind}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let up = raw_upstream().await;
    let proxy = TestProxy::start_with(&routes(&[("stable", up.addr, 100)], None), |c| {
        c.forward.pool_idle_timeout = Duration::from_millis(300);
    })
    .await;
    let client = client();
    let first = get(&client, proxy.addr, "/").await.expect("first answer");
    assert_eq!(first.status, StatusCode::OK);
    // Nothing else happens: the sweep alone must close the idle connection.
    eventually(
        Duration::from_secs(10),
        "the proxy closes its idle upstream connection",
        || async { (up.closed_by_peer.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    let second = get(&client, proxy.addr, "/").await.expect("second answer");
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(
        opened(&proxy.metrics().await, "stable"),
        2.0,
        "the expired connection was not reused"
    );
    proxy.shutdown().await;
}

/// Requests one after another for about `span`, every 50 ms; returns the
/// upstream connections the proxy opened, and asserts every answer.
async fn sequential_for(proxy: &TestProxy, span: Duration) -> f64 {
    let c = client();
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed() < span && n < 200 {
        n += 1;
        let a = get(&c, proxy.addr, "/ping").await.expect("an answer");
        assert_eq!(a.status, StatusCode::OK, "request {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    opened(&proxy.metrics().await, "stable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_max_age_are_replaced_so_new_pods_get_traffic() {
    // HTTP/1.1 and h2c alike: a connection older than the max age takes no
    // new request (kube-proxy picks a pod per connection, so this is what
    // spreads a Service's traffic to pods added after it was opened).
    for protocol in ["http1", "h2c"] {
        let backend = backend("v1", 0.0, Duration::ZERO).await;
        let text = routes(&[("stable", backend.addr(), 100)], None).replace(
            "weight = 100",
            &format!("weight = 100\nprotocol = \"{protocol}\""),
        );
        let aged = TestProxy::start_with(&text, |c| {
            c.forward.upstream_max_connection_age = Some(Duration::from_millis(300));
        })
        .await;
        // About 1.5 s of requests at a 300 ms max age: 5 or 6 connections.
        let opened_aged = sequential_for(&aged, Duration::from_millis(1500)).await;
        assert!(
            (4.0..=10.0).contains(&opened_aged),
            "{protocol}: {opened_aged} connections in 1.5 s at a 300 ms max age"
        );
        aged.shutdown().await;

        let forever = TestProxy::start_with(&text, |c| {
            c.forward.upstream_max_connection_age = None;
        })
        .await;
        let opened_forever = sequential_for(&forever, Duration::from_millis(1500)).await;
        assert_eq!(opened_forever, 1.0, "{protocol}: without a max age");
        forever.shutdown().await;
    }
}
