//! Graceful shutdown of the real binary: SIGTERM with requests in flight
//! loses none of them, keeps serving through the drain delay while
//! `/readyz` says 503, and exits 0.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const IN_FLIGHT: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_requests_in_flight_loses_none_and_exits_0() {
    let latency = Duration::from_millis(500);
    let b1 = backend("v1", 0.0, latency).await;
    let b2 = backend("v2", 0.0, latency).await;
    let cm = ConfigMapDir::new(&[(
        "routes.toml",
        routes(
            &[("stable", b1.addr(), 50), ("canary", b2.addr(), 50)],
            None,
        )
        .as_bytes(),
    )]);
    let mut proxy = spawn_proxy_binary(
        &cm.path("routes.toml"),
        // Two threads, so the in-flight requests sit on both event loops
        // and the shutdown must wait for each of them.
        &[
            "--drain-delay",
            "1s",
            "--shutdown-timeout",
            "10s",
            "--threads",
            "2",
        ],
    );
    let (addr, admin) = (proxy.addr(), proxy.admin());
    assert_eq!(
        get(&client(), admin, "/readyz").await.unwrap().status,
        StatusCode::OK,
        "ready before SIGTERM"
    );

    // Several requests, each on a connection of its own, all held by the
    // backends' latency.
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|_| tokio::spawn(async move { get(&client(), addr, "/ping").await }))
        .collect();
    eventually(
        Duration::from_secs(10),
        "all requests to be in flight at the proxy",
        || async {
            let m = metrics(admin).await;
            let in_flight: f64 = ["stable", "canary"]
                .iter()
                .filter_map(|v| sample(&m, "canary_proxy_in_flight_requests", &[("version", v)]))
                .sum();
            (in_flight as usize == IN_FLIGHT).then_some(())
        },
    )
    .await;

    proxy.child.signal("TERM");

    // Readiness drops at once, so Kubernetes takes the pod out of the
    // Service's endpoints...
    eventually(
        Duration::from_secs(5),
        "/readyz to answer 503 after SIGTERM",
        || async {
            let a = get(&client(), admin, "/readyz").await.ok()?;
            (a.status == StatusCode::SERVICE_UNAVAILABLE).then_some(())
        },
    )
    .await;
    // ...while traffic that still arrives, on a new connection, is served
    // for the whole drain delay.
    let late = get(&client(), addr, "/ping")
        .await
        .expect("a new connection is accepted during the drain delay");
    assert_eq!((late.status.as_u16(), late.body.as_str()), (200, "pong"));
    assert!(
        proxy.child.try_wait().is_none(),
        "still running during the drain delay"
    );

    // Every request that was in flight completes.
    for r in requests {
        let a = r
            .await
            .unwrap()
            .expect("an in-flight request survives the shutdown");
        assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "pong"));
        assert!(matches!(a.version(), "v1" | "v2"));
    }

    let status = eventually(Duration::from_secs(20), "the proxy to exit", || {
        let exited = proxy.child.try_wait();
        async move { exited }
    })
    .await;
    assert_eq!(
        status.code(),
        Some(0),
        "clean exit; log: {:?}",
        proxy.child.stderr_lines()
    );
    // After exit, the traffic port no longer accepts.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed after exit"
    );

    b1.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sent_nothing_does_not_hold_up_the_shutdown() {
    let b = backend("v1", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start_with(&routes(&[("stable", b.addr(), 100)], None), |c| {
        // Shorter than the header read timeout (10 s), so a shutdown that
        // waited for the silent connection would miss it.
        c.shutdown_timeout = Duration::from_secs(3);
        c.threads = 2;
    })
    .await;
    // Connected, nothing sent: a client's spare keep-alive connection, or a
    // load balancer's pre-opened one.
    let silent = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let answered = get(&client(), proxy.addr, "/ping").await.unwrap();
    assert_eq!(answered.status, StatusCode::OK);
    assert!(
        proxy.shutdown_finished().await,
        "the shutdown finished in time: the silent connection was closed, not waited for"
    );
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), async {
        silent.readable().await.unwrap();
        silent.try_read(&mut buf)
    })
    .await
    .expect("the silent connection is closed")
    .unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    b.shutdown().await.unwrap();
}
