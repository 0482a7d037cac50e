//! Measures how fast a failing canary loses its traffic: for a few canary
//! error rates and weights, the time from the canary's first request to the
//! rollback, and how many requests it had in its window when it tripped.
//! Run it in release mode:
//!
//! ```sh
//! cargo run --release -p canary-proxy --example rollback_detection
//! ```
//!
//! Policy: the documented defaults (error_rate 0.05, min_requests 50,
//! window 30s). Load: 4 closed-loop clients on loopback, bounded to 20,000
//! requests or 20 s per run. Prints `RESULT` lines that `bench/run` collects.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, SystemTime};

use common::*;

const RUNS: usize = 5;

#[tokio::main]
async fn main() {
    println!("rollback detection: policy error_rate=0.05 min_requests=50 window=30s, 4 closed-loop clients, {RUNS} runs each");
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    for error_rate in [0.2, 0.5, 1.0] {
        let canary = backend("v2", error_rate, Duration::ZERO).await;
        for weight in [10u64, 50] {
            let mut times = Vec::new();
            let mut requests = Vec::new();
            for _ in 0..RUNS {
                let text = routes(&[("stable", stable.addr(), 100 - weight), ("canary", canary.addr(), weight)], Some("target = \"stable\"\nerror_rate = 0.05\nmin_requests = 50\nwindow = \"30s\""));
                let proxy = TestProxy::start(&text).await;
                let started = SystemTime::now();
                let load = Load::start(proxy.addr, 4, 20_000, Duration::from_secs(20));
                // The rollback as `/status` reports it: when, and on how
                // many of the canary's requests.
                let (at, canary_requests) =
                    eventually(Duration::from_secs(25), "the rollback", || async {
                        let status = proxy.status().await;
                        let r = &status["versions"][1]["rollback"];
                        let at = humantime::parse_rfc3339(r["at"].as_str()?).ok()?;
                        Some((at, r["requests"].as_u64()?))
                    })
                    .await;
                load.finish().await;
                times.push(at.duration_since(started).unwrap_or_default().as_secs_f64() * 1000.0);
                requests.push(canary_requests);
                proxy.shutdown().await;
            }
            times.sort_by(f64::total_cmp);
            requests.sort();
            println!(
                "RESULT rollback_detection canary_error_rate={error_rate} canary_weight={weight}% runs={RUNS} time_ms_median={:.1} time_ms_max={:.1} canary_requests_median={} canary_requests_max={}",
                times[RUNS / 2],
                times[RUNS - 1],
                requests[RUNS / 2],
                requests[RUNS - 1]
            );
        }
        let _ = canary.shutdown().await;
    }
    let _ = stable.shutdown().await;
}
