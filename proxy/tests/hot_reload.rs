//! Hot reload from a kubelet-style ConfigMap directory: changes apply on
//! their own, bad content keeps the last good table, nothing is dropped.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_swap_from_90_10_to_0_100_sends_everything_to_canary() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let mut proxy = TestProxy::start(&routes(&[("stable", stable.addr(), 90), ("canary", canary.addr(), 10)], None)).await;
    let c = client();
    let before = proxy.status().await["routes"]["hash"].as_str().unwrap().to_owned();

    let new_routes = routes(&[("stable", stable.addr(), 0), ("canary", canary.addr(), 100)], None);
    proxy.set_routes(&new_routes);
    let new_hash = canary_proxy::routes::content_hash(new_routes.as_bytes());
    assert_ne!(before, new_hash);
    eventually(Duration::from_secs(5), "the proxy to report the new routes hash", || async {
        (proxy.status().await["routes"]["hash"] == new_hash.as_str()).then_some(())
    })
    .await;
    for _ in 0..200 {
        let a = get(&c, proxy.addr, "/ping").await.unwrap();
        assert_eq!((a.status.as_u16(), a.version()), (200, "v2"), "every request after the swap goes to the canary");
    }
    proxy.shutdown().await;
}
