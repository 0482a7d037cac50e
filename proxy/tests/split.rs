//! The weighted split, measured end to end: real ping backends on loopback,
//! a real proxy, a few concurrent keep-alive clients, and the version of
//! every answer read from the `x-ping-version` header the backend sets.
//!
//! Tolerance: each request goes to the canary independently with
//! probability p = canary weight / total weight, so over n requests the
//! canary count is Binomial(n, p): mean n*p, standard deviation
//! sigma = sqrt(n*p*(1-p)). Every assertion allows 5 sigma either side of
//! the mean; a correct proxy fails that with probability below 1e-6 per
//! ratio (normal approximation), while a wrong split (say 85/15 instead of
//! 90/10, 200 requests off at n = 4000) is far outside it. Where p is 0 or 1,
//! sigma is 0 and the count must be exact.

mod common;

use std::time::Duration;

use common::*;

/// Concurrent clients, each with its own keep-alive connection pool, so
/// the proxy sees several connections as it would behind a load balancer.
const CLIENTS: u64 = 4;

/// Send `n` GET /ping through a proxy in front of `v1` (weight `stable`) and
/// `v2` (weight `canary`); return how many answers came from v2. Every
/// answer must be a 200 "pong" from one of the two backends.
async fn canary_count(stable: u64, canary: u64, n: u64) -> u64 {
    let b1 = backend("v1", 0.0, Duration::ZERO).await;
    let b2 = backend("v2", 0.0, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", b1.addr(), stable), ("canary", b2.addr(), canary)],
        None,
    ))
    .await;
    let addr = proxy.addr;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let c = client();
            let (mut v1, mut v2) = (0u64, 0u64);
            for _ in 0..n / CLIENTS {
                let a = get(&c, addr, "/ping").await.expect("the proxy answers");
                assert_eq!(
                    (a.status.as_u16(), a.body.as_str()),
                    (200, "pong"),
                    "every request is answered by a backend"
                );
                match a.version() {
                    "v1" => v1 += 1,
                    "v2" => v2 += 1,
                    other => panic!("answer from an unknown version {other:?}"),
                }
            }
            (v1, v2)
        }));
    }
    let (mut v1, mut v2) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.expect("client task");
        v1 += a;
        v2 += b;
    }
    assert_eq!(v1 + v2, n, "every request was counted once");

    // The proxy's own per-version counters agree with what the clients saw.
    let text = proxy.metrics().await;
    let counted = |version: &str| {
        sample(
            &text,
            "canary_proxy_requests_total",
            &[("version", version), ("code", "200")],
        )
        .unwrap_or(0.0) as u64
    };
    assert_eq!(
        (counted("stable"), counted("canary")),
        (v1, v2),
        "canary_proxy_requests_total matches the answers"
    );

    proxy.shutdown().await;
    b1.shutdown().await.unwrap();
    b2.shutdown().await.unwrap();
    v2
}

/// Assert `count` canary answers out of `n` fit Binomial(n, p) within 5 sigma.
fn assert_binomial(count: u64, n: u64, p: f64) {
    let mean = n as f64 * p;
    let sigma = (n as f64 * p * (1.0 - p)).sqrt();
    let tolerance = 5.0 * sigma;
    assert!(
        (count as f64 - mean).abs() <= tolerance,
        "canary got {count} of {n}; expected {mean:.1} +- {tolerance:.1} (5 sigma, sigma = sqrt(n p (1-p)) = {sigma:.2}, p = {p})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_90_10_within_5_sigma() {
    // n = 4000, p = 0.1: mean 400, sigma = 18.97, accepted 306..=494.
    let n = 4000;
    assert_binomial(canary_count(90, 10, n).await, n, 0.1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_50_50_within_5_sigma() {
    // n = 4000, p = 0.5: mean 2000, sigma = 31.62, accepted 1842..=2158.
    let n = 4000;
    assert_binomial(canary_count(50, 50, n).await, n, 0.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_100_0_sends_everything_to_stable() {
    // p = 0: sigma is 0, so not a single request may reach the canary.
    let n = 4000;
    assert_eq!(canary_count(100, 0, n).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_0_100_sends_everything_to_canary() {
    // p = 1: sigma is 0, so every request must reach the canary.
    let n = 4000;
    assert_eq!(canary_count(0, 100, n).await, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_9999_1_sends_about_one_in_ten_thousand_to_canary() {
    // n = 20000, p = 1/10000: mean 2, sigma = sqrt(20000 * 0.0001 * 0.9999)
    // = 1.414, so 5 sigma accepts 0..=9 canary answers. The normal
    // approximation is poor this far in the tail, so the exact bound, for
    // the record: with Poisson(2), P(X >= 10) = 4.6e-5. Rounding the weight
    // to 1% (or treating 9999/1 as 99/1) would send about 200, and 50/50
    // about 10000: both fail.
    let n = 20_000;
    let canary = canary_count(9999, 1, n).await;
    assert_binomial(canary, n, 1.0 / 10_000.0);
    assert!(canary <= 9, "canary got {canary} of {n}");
}
