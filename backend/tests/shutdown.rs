//! The drain sequence of `serve`, driven through `Handle`, against real backends.
//! A request that must be "in flight" at a given moment is a POST /echo whose body
//! the test keeps open: once its first chunk has come back, the backend is
//! provably in the middle of serving it, with no timing guesswork.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use common::{channel_body, client, eventually, fresh_client, get};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ping_backend::{spawn, Config};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Generous: these deadlines only turn a hang into a failure.
const DEADLINE: Duration = Duration::from_secs(20);

/// Start a POST /echo and wait until its first chunk is echoed back.
async fn echo_in_flight(addr: SocketAddr) -> (mpsc::Sender<Bytes>, Incoming) {
    let (tx, body) = channel_body(1);
    tx.send(Bytes::from_static(b"before")).await.unwrap();
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/echo"))
        .body(body)
        .unwrap();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "before");
    (tx, body)
}

async fn listener_closed(addr: SocketAddr) -> Option<()> {
    TcpStream::connect(addr).await.is_err().then_some(())
}

#[tokio::test]
async fn drain_turns_readyz_503_and_keeps_serving_until_the_delay_ends() {
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            version: "v-drain".into(),
            drain_delay: Duration::from_secs(1),
            ..Config::default()
        },
    )
    .await
    .unwrap();
    let addr = backend.addr();
    let client = fresh_client();
    assert_eq!(
        get(&client, addr, "/readyz").await.unwrap().status,
        StatusCode::OK
    );

    let shutdown = tokio::spawn(backend.shutdown());
    eventually("readyz to turn 503", DEADLINE, || async {
        let answer = get(&client, addr, "/readyz")
            .await
            .expect("the backend stopped accepting before readyz turned 503");
        (answer.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
    })
    .await;
    // Still draining: new connections get answers, the process is still healthy.
    // (If the 1 s delay passed during these two requests the connection fails and
    // so does the test: the delay is far longer than two loopback requests.)
    let ping = get(&client, addr, "/ping").await.unwrap();
    assert_eq!((ping.status, ping.body.as_str()), (StatusCode::OK, "pong"));
    assert_eq!(ping.headers["x-ping-version"], "v-drain");
    assert_eq!(
        ping.headers["connection"], "close",
        "HTTP/1.1 clients are told to go elsewhere"
    );
    assert_eq!(
        get(&client, addr, "/healthz").await.unwrap().status,
        StatusCode::OK
    );

    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        listener_closed(addr).await.is_some(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn in_flight_requests_finish_after_the_listener_closes() {
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(60),
            ..Config::default()
        },
    )
    .await
    .unwrap();
    let addr = backend.addr();
    let (tx, mut body) = echo_in_flight(addr).await;

    let shutdown = tokio::spawn(backend.shutdown());
    eventually("the listener to close", DEADLINE, || listener_closed(addr)).await;
    assert!(
        !shutdown.is_finished(),
        "serve() returned with a request in flight"
    );

    // The request keeps streaming after the listener closed, and ends normally.
    tx.send(Bytes::from_static(b"after")).await.unwrap();
    let after = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(after, "after");
    drop(tx);
    assert!(body.frame().await.is_none(), "the echo must end cleanly");

    tokio::time::timeout(DEADLINE, shutdown)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_shutdown() {
    // A shutdown timeout far beyond the deadline: if the idle connection were
    // waited for instead of closed, the deadline would fail the test.
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(600),
            ..Config::default()
        },
    )
    .await
    .unwrap();
    let stream = TcpStream::connect(backend.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get("/ping")
        .header("host", "backend")
        .body(common::empty())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    // The connection is now idle and kept alive, `sender` still holds it open.

    tokio::time::timeout(DEADLINE, backend.shutdown())
        .await
        .expect("shutdown waited for an idle keep-alive connection")
        .unwrap();
    // The backend closed it: the client side of the connection ends too.
    tokio::time::timeout(DEADLINE, conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    drop(sender);
}

#[tokio::test]
async fn shutdown_timeout_cuts_off_requests_that_do_not_finish() {
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_millis(200),
            ..Config::default()
        },
    )
    .await
    .unwrap();
    // Never ends on its own: `tx` is held until after the shutdown.
    let (tx, mut body) = echo_in_flight(backend.addr()).await;

    tokio::time::timeout(DEADLINE, backend.shutdown())
        .await
        .expect("shutdown did not give up on a request that never finishes")
        .unwrap();
    // The cut-off connection ends the response with an error, not a clean end.
    let rest = tokio::time::timeout(DEADLINE, body.frame()).await.unwrap();
    assert!(
        matches!(rest, Some(Err(_))),
        "expected an aborted body, got {rest:?}"
    );
    drop(tx);
}

#[tokio::test]
async fn dropping_the_handle_stops_the_server() {
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            drain_delay: Duration::ZERO,
            ..Config::default()
        },
    )
    .await
    .unwrap();
    let addr = backend.addr();
    assert_eq!(
        get(&fresh_client(), addr, "/healthz").await.unwrap().status,
        StatusCode::OK
    );
    drop(backend);
    eventually("the dropped backend to stop accepting", DEADLINE, || {
        listener_closed(addr)
    })
    .await;
}
