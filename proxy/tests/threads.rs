//! `--threads N`: client connections spread over N event loops, each with
//! its own upstream pool. Every loop must serve, split, reload and shut down
//! exactly as the single one does.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_threads_serve_every_connection_and_keep_the_split() {
    let b1 = backend("v1", 0.0, Duration::ZERO).await;
    let b2 = backend("v2", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start_with(
        &routes(
            &[("stable", b1.addr(), 90), ("canary", b2.addr(), 10)],
            None,
        ),
        |c| c.threads = 3,
    )
    .await;
    // Connections go to the threads in turn, so 8 keep-alive clients land on
    // all three; a thread that could not serve would fail its clients.
    let load = Load::start(proxy.addr, CLIENTS, 6000, Duration::from_secs(120));
    let (n, failed, first) = load.finish_when_done().await;
    assert_eq!(failed, 0, "no request fails: {first:?}");
    assert_eq!(n, 6000);
    let m = proxy.metrics().await;
    let answered = |v| {
        sample(
            &m,
            "canary_proxy_requests_total",
            &[("version", v), ("code", "200")],
        )
        .unwrap_or(0.0)
    };
    let (stable, canary) = (answered("stable"), answered("canary"));
    assert_eq!(stable + canary, 6000.0, "every request counted once");
    let share = canary / 6000.0;
    let sigma = (0.1f64 * 0.9 / 6000.0).sqrt();
    assert!(
        (share - 0.1).abs() < 5.0 * sigma,
        "canary share {share:.4} is 10% within 5 sigma ({:.4})",
        5.0 * sigma
    );
    // Each thread keeps a pool of its own, so no fewer connections than
    // threads that carried canary traffic, and never one per request.
    let opened = by_version(
        &m,
        "canary_proxy_upstream_connections_opened_total",
        "stable",
    )
    .unwrap_or(0.0);
    assert!(
        (3.0..=CLIENTS as f64).contains(&opened),
        "stable upstream connections: {opened} (3 threads, {CLIENTS} clients)"
    );
    proxy.shutdown().await;
    b1.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reaches_every_thread() {
    let b1 = backend("v1", 0.0, Duration::ZERO).await;
    let b2 = backend("v2", 0.0, Duration::ZERO).await;
    let mut proxy = TestProxy::start_with(
        &routes(
            &[("stable", b1.addr(), 100), ("canary", b2.addr(), 0)],
            None,
        ),
        |c| c.threads = 2,
    )
    .await;
    // Keep-alive clients opened before the reload, half on each thread.
    let clients: Vec<_> = (0..4).map(|_| client()).collect();
    for c in &clients {
        assert_eq!(get(c, proxy.addr, "/ping").await.unwrap().version(), "v1");
    }
    proxy.set_routes(&routes(
        &[("stable", b1.addr(), 0), ("canary", b2.addr(), 100)],
        None,
    ));
    eventually(Duration::from_secs(10), "the reload to apply", || async {
        let a = get(&clients[0], proxy.addr, "/ping").await.ok()?;
        (a.version() == "v2").then_some(())
    })
    .await;
    for (i, c) in clients.iter().enumerate() {
        for _ in 0..20 {
            let a = get(c, proxy.addr, "/ping").await.unwrap();
            assert_eq!(a.status, StatusCode::OK);
            assert_eq!(
                a.version(),
                "v2",
                "client {i} still routed by the old table"
            );
        }
    }
    proxy.shutdown().await;
    b1.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_requests_on_every_thread() {
    let latency = Duration::from_millis(300);
    let b = backend("v1", 0.0, latency).await;
    let proxy = TestProxy::start_with(&routes(&[("stable", b.addr(), 100)], None), |c| {
        c.threads = 2;
        c.shutdown_timeout = Duration::from_secs(10);
    })
    .await;
    let (addr, admin) = (proxy.addr, proxy.admin);
    let requests: Vec<_> = (0..6)
        .map(|_| tokio::spawn(async move { get(&client(), addr, "/ping").await }))
        .collect();
    eventually(
        Duration::from_secs(10),
        "six requests in flight",
        || async {
            let m = metrics(admin).await;
            (by_version(&m, "canary_proxy_in_flight_requests", "stable")? == 6.0).then_some(())
        },
    )
    .await;
    let finished = tokio::spawn(proxy.shutdown_finished());
    for r in requests {
        let a = r
            .await
            .unwrap()
            .expect("an in-flight request survives the shutdown");
        assert_eq!((a.status.as_u16(), a.body.as_str()), (200, "pong"));
    }
    assert!(
        finished.await.unwrap(),
        "the shutdown finished within its timeout, every thread drained"
    );
    b.shutdown().await.unwrap();
}
