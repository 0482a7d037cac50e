//! Automatic rollback against real ping backends: a bad canary is cut off,
//! a healthy one stays, thin evidence never trips, a killed canary is
//! invisible to clients, and the latch holds and resets as documented.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

fn policy(error_rate: f64, min_requests: u64) -> String {
    format!("target = \"stable\"\nerror_rate = {error_rate}\nmin_requests = {min_requests}\nwindow = \"60s\"")
}

async fn rolled_back(proxy: &TestProxy, version: &str) -> bool {
    let s = proxy.status().await;
    s["versions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v["name"] == version && v["rolled_back"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_canary_is_cut_off_and_stable_takes_everything() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.5, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 50), ("canary", canary.addr(), 50)],
        Some(&policy(0.1, 20)),
    ))
    .await;
    let c = client();

    // Sequential requests until the proxy reports the rollback, counting
    // what the canary answered on the way. Bounded: 1000 requests at most.
    let mut canary_answers = 0;
    for _ in 0..1000 {
        let a = get(&c, proxy.addr, "/ping").await.unwrap();
        if a.version() == "v2" {
            canary_answers += 1;
        }
        if rolled_back(&proxy, "canary").await {
            break;
        }
    }
    assert!(
        rolled_back(&proxy, "canary").await,
        "the canary was never rolled back"
    );
    // It needs at least min_requests = 20 canary answers; at a true error
    // rate of 0.5 the ratio is far above 0.1 by then, so 60 is plenty.
    assert!(
        (20..=60).contains(&canary_answers),
        "rolled back after {canary_answers} canary requests; expected 20..=60"
    );

    let after = versions_of(&c, proxy.addr, 2000).await;
    assert!(
        after.iter().all(|v| v == "v1"),
        "after the trip everything goes to stable (and versions_of asserts every answer was 200)"
    );

    let status = proxy.status().await;
    let canary_status = &status["versions"][1];
    assert_eq!(canary_status["effective_weight"], 0);
    assert_eq!(
        status["versions"][0]["effective_weight"], 100,
        "the canary's share went to the target"
    );
    let reason = canary_status["rollback"]["reason"].as_str().unwrap();
    assert!(reason.contains("above threshold 0.1"), "{reason}");
    let text = proxy.metrics().await;
    assert_eq!(
        by_version(&text, "canary_proxy_rollbacks_total", "canary"),
        Some(1.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_rollback_active", "canary"),
        Some(1.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_effective_weight", "canary"),
        Some(0.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_effective_weight", "stable"),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_canary_stays_over_twenty_thousand_requests() {
    let stable = backend("v1", 0.01, Duration::ZERO).await;
    let canary = backend("v2", 0.01, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 50), ("canary", canary.addr(), 50)],
        Some(&policy(0.05, 100)),
    ))
    .await;
    // 8 clients x 2500 requests. Failures here are the injected 500s, which
    // Load counts; we only need the total and the absence of a rollback.
    let load = Load::start(proxy.addr, 8, 20_000, Duration::from_secs(120));
    let (requests, _, _) = load.finish_when_done().await;
    assert_eq!(requests, 20_000);
    let text = proxy.metrics().await;
    // Same error rate as stable, far below the threshold: at min_requests =
    // 100 the chance of 6+ errors in 100 requests at p = 0.01 is 6e-4, and
    // it only falls as the window fills.
    assert_eq!(
        by_version(&text, "canary_proxy_rollbacks_total", "canary"),
        Some(0.0)
    );
    let canary_500 = sample(
        &text,
        "canary_proxy_requests_total",
        &[("version", "canary"), ("code", "500")],
    )
    .unwrap_or(0.0);
    assert!(
        canary_500 > 0.0,
        "the canary did answer some errors, and still stayed"
    );
    assert!(!rolled_back(&proxy, "canary").await);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn below_min_requests_it_never_trips_even_at_100_percent_errors() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 1.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 0), ("canary", canary.addr(), 100)],
        Some(&policy(0.05, 50)),
    ))
    .await;
    let c = client();
    for i in 1..=49 {
        let a = get(&c, proxy.addr, "/ping").await.unwrap();
        assert_eq!(
            (a.status.as_u16(), a.version()),
            (500, "v2"),
            "request {i} reaches the failing canary"
        );
    }
    assert!(
        !rolled_back(&proxy, "canary").await,
        "49 requests are below min_requests = 50"
    );
    // The 50th completes the evidence.
    get(&c, proxy.addr, "/ping").await.unwrap();
    eventually(
        Duration::from_secs(5),
        "the rollback at exactly min_requests",
        || async { rolled_back(&proxy, "canary").await.then_some(()) },
    )
    .await;
    let a = get(&c, proxy.addr, "/ping").await.unwrap();
    assert_eq!(
        (a.status.as_u16(), a.version()),
        (200, "v1"),
        "stable takes the canary's 100% share"
    );
    proxy.shutdown().await;
}

/// A pong server that can be killed the way a crashed pod dies: every
/// socket closed at once, mid-request or not, and the port refusing after.
struct Killable {
    addr: SocketAddr,
    tasks: tokio::task::JoinSet<()>,
}

impl Killable {
    async fn start(version: &'static str) -> Killable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut tasks = tokio::task::JoinSet::new();
        tasks.spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let mut resp = http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"pong"),
                        ));
                        resp.headers_mut()
                            .insert("x-ping-version", http::HeaderValue::from_static(version));
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Killable { addr, tasks }
    }

    /// Aborting the accept task drops the listener and, with it, the
    /// connection tasks: the kernel closes every socket.
    async fn kill(mut self) {
        self.tasks.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_canary_is_invisible_to_clients() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = Killable::start("v2").await;
    let canary_addr = canary.addr;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 50), ("canary", canary_addr, 50)],
        Some(&policy(0.1, 20)),
    ))
    .await;
    let c = client();
    eventually(Duration::from_secs(5), "the canary to answer", || async {
        (get(&c, proxy.addr, "/ping").await.ok()?.version() == "v2").then_some(())
    })
    .await;

    let load = Load::start(proxy.addr, 4, 40_000, Duration::from_secs(60));
    // Let traffic flow to both, then kill the canary mid-load.
    eventually(
        Duration::from_secs(10),
        "canary traffic under load",
        || async {
            let text = proxy.metrics().await;
            (sample(
                &text,
                "canary_proxy_requests_total",
                &[("version", "canary"), ("code", "200")],
            )? >= 200.0)
                .then_some(())
        },
    )
    .await;
    canary.kill().await;
    eventually(
        Duration::from_secs(10),
        "the rollback of the dead canary",
        || async { rolled_back(&proxy, "canary").await.then_some(()) },
    )
    .await;
    // Keep the load on for a while after the trip, then look at it all.
    let sent_at_trip = sample(
        &proxy.metrics().await,
        "canary_proxy_requests_total",
        &[("version", "stable"), ("code", "200")],
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "more traffic after the trip",
        || async {
            (sample(
                &proxy.metrics().await,
                "canary_proxy_requests_total",
                &[("version", "stable"), ("code", "200")],
            )? >= sent_at_trip + 500.0)
                .then_some(())
        },
    )
    .await;
    let (requests, failures, first) = load.finish().await;
    assert_eq!(
        failures, 0,
        "{failures} of {requests} requests failed; first: {first:?}"
    );
    let text = proxy.metrics().await;
    assert!(
        by_version(&text, "canary_proxy_retries_total", "canary").unwrap() >= 1.0,
        "requests that hit the dead canary were retried on stable"
    );
    let canary_errors: f64 = ["connect", "reset"]
        .iter()
        .filter_map(|k| {
            sample(
                &text,
                "canary_proxy_upstream_errors_total",
                &[("version", "canary"), ("kind", k)],
            )
        })
        .sum();
    assert!(
        canary_errors >= 1.0,
        "the failures count against the canary"
    );
    assert_eq!(
        sample(
            &text,
            "canary_proxy_requests_total",
            &[("version", "canary"), ("code", "502")]
        ),
        None,
        "no 502 reached a client"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latch_survives_unrelated_reloads_and_resets_when_the_canary_entry_changes() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let bad_canary = backend("v2", 1.0, Duration::ZERO).await;
    let good_canary = backend("v2-fixed", 0.0, Duration::ZERO).await;
    let rollback = policy(0.1, 20);
    let mut proxy = TestProxy::start(&routes(
        &[
            ("stable", stable.addr(), 50),
            ("canary", bad_canary.addr(), 50),
        ],
        Some(&rollback),
    ))
    .await;
    let c = client();
    for _ in 0..200 {
        get(&c, proxy.addr, "/ping").await.unwrap();
        if rolled_back(&proxy, "canary").await {
            break;
        }
    }
    assert!(rolled_back(&proxy, "canary").await);

    // A reload that changes only stable's weight: the latch holds.
    let only_stable = routes(
        &[
            ("stable", stable.addr(), 60),
            ("canary", bad_canary.addr(), 50),
        ],
        Some(&rollback),
    );
    proxy.set_routes(&only_stable);
    let hash = canary_proxy::content_hash(only_stable.as_bytes());
    eventually(Duration::from_secs(5), "the stable-only reload", || async {
        (proxy.status().await["routes"]["hash"] == hash.as_str()).then_some(())
    })
    .await;
    assert!(
        rolled_back(&proxy, "canary").await,
        "a reload that does not touch the canary keeps it rolled back"
    );
    assert!(versions_of(&c, proxy.addr, 200)
        .await
        .iter()
        .all(|v| v == "v1"));

    // The operator fixes the canary (a new upstream): that entry changed, so
    // the latch is cleared and the canary gets its weight again.
    proxy.set_routes(&routes(
        &[
            ("stable", stable.addr(), 60),
            ("canary", good_canary.addr(), 40),
        ],
        Some(&rollback),
    ));
    eventually(Duration::from_secs(5), "the reset", || async {
        (!rolled_back(&proxy, "canary").await).then_some(())
    })
    .await;
    let seen = versions_of(&c, proxy.addr, 400).await;
    let fixed = seen.iter().filter(|v| *v == "v2-fixed").count();
    // 40% of 400 is 160, sd = sqrt(400 * 0.4 * 0.6) ~ 9.8; 5 sigma ~ 49.
    assert!(
        (111..=209).contains(&fixed),
        "the reset canary takes its 40% again; got {fixed}/400"
    );
    let text = proxy.metrics().await;
    assert_eq!(
        by_version(&text, "canary_proxy_rollback_resets_total", "canary"),
        Some(1.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_rollback_active", "canary"),
        Some(0.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_rollbacks_total", "canary"),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_never_rolled_back_but_its_ratio_is_exposed() {
    let stable = backend("v1", 1.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 100), ("canary", canary.addr(), 0)],
        Some(&policy(0.1, 20)),
    ))
    .await;
    let c = client();
    for _ in 0..100 {
        assert_eq!(get(&c, proxy.addr, "/ping").await.unwrap().status, 500);
    }
    assert!(
        !rolled_back(&proxy, "stable").await,
        "the target has nowhere to roll back to"
    );
    let text = proxy.metrics().await;
    assert_eq!(
        by_version(&text, "canary_proxy_error_ratio", "stable"),
        Some(1.0),
        "alerts can fire on the target's ratio"
    );
    assert_eq!(
        by_version(&text, "canary_proxy_rollbacks_total", "stable"),
        Some(0.0)
    );
    proxy.shutdown().await;
}
