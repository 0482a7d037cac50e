//! Measures how fast a ConfigMap update reaches traffic: the time from the
//! kubelet's `rename(..data_tmp, ..data)` to the first response routed by
//! the new table, over 50 swaps. Run it in release mode:
//!
//! ```sh
//! cargo run --release -p canary-proxy --example reload_latency
//! ```
//!
//! It prints a `RESULT` line that `bench/run` collects. Loopback only; 50
//! swaps, each bounded by a 5 s deadline.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;

const SWAPS: usize = 50;

#[tokio::main]
async fn main() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let all_to = |to_canary: bool| {
        let (s, c) = if to_canary { (0, 100) } else { (100, 0) };
        routes(
            &[("stable", stable.addr(), s), ("canary", canary.addr(), c)],
            None,
        )
    };
    let mut proxy = TestProxy::start(&all_to(false)).await;
    let client = client();
    let mut latencies = Vec::with_capacity(SWAPS);
    for i in 0..SWAPS {
        let to_canary = i % 2 == 0;
        let want = if to_canary { "v2" } else { "v1" };
        let text = all_to(to_canary);
        let swapped = proxy.set_routes(&text);
        let deadline = swapped + Duration::from_secs(5);
        loop {
            let a = get(&client, proxy.addr, "/ping")
                .await
                .expect("request succeeds");
            if a.version() == want {
                latencies.push(swapped.elapsed());
                break;
            }
            assert!(Instant::now() < deadline, "swap {i} not applied within 5 s");
        }
    }
    latencies.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = ms(latencies[latencies.len() / 2]);
    let max = ms(*latencies.last().unwrap());
    let min = ms(latencies[0]);
    println!("reload apply latency over {SWAPS} kubelet-style swaps (rename of ..data -> first response routed by the new table)");
    println!("RESULT reload_apply_ms n={SWAPS} min={min:.1} median={median:.1} max={max:.1}");
    proxy.shutdown().await;
}
