//! Measures what the request path pays to record one answer: the status
//! counter, the duration histogram and the rollback window, through the
//! handles a snapshot carries (no label lookup). Run in release mode:
//!
//! ```sh
//! cargo run --release -p canary-proxy --example record_cost
//! ```
//!
//! For comparison it also times the label lookup a naive recorder would do
//! per request (`with_label_values`). Bounded: a fixed number of iterations.

use std::hint::black_box;
use std::time::{Duration, Instant};

use canary_proxy::bench::Metrics;
use canary_proxy::bench::Window;

const N: u32 = 5_000_000;

fn per_op(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e9 / f64::from(N)
}

fn main() {
    let metrics = Metrics::new();
    let version = metrics.version("canary");
    let window = Window::new(Duration::from_secs(30));
    let epoch = Instant::now();
    let latency = Duration::from_micros(300);

    let start = Instant::now();
    for i in 0..N {
        let code = if i % 100 == 0 { 500 } else { 200 };
        version.answered(black_box(code), latency);
    }
    let handles = per_op(start.elapsed());

    // The naive way: look both series up by label on every request.
    let requests = prometheus::IntCounterVec::new(
        prometheus::Opts::new("naive_requests_total", "x"),
        &["version", "code"],
    )
    .unwrap();
    let duration = prometheus::HistogramVec::new(
        prometheus::HistogramOpts::new("naive_duration_seconds", "x"),
        &["version"],
    )
    .unwrap();
    let start = Instant::now();
    for i in 0..N {
        let code = if i % 100 == 0 { "500" } else { "200" };
        requests
            .with_label_values(&["canary", black_box(code)])
            .inc();
        duration
            .with_label_values(&["canary"])
            .observe(latency.as_secs_f64());
    }
    let lookup = per_op(start.elapsed());

    // The rollback window: one record and the sum the guard checks.
    let now = epoch.elapsed();
    let start = Instant::now();
    for i in 0..N {
        window.record(black_box(now), i % 100 == 0);
        black_box(window.totals(now));
    }
    let guard = per_op(start.elapsed());

    println!("metrics for one answer through the snapshot's handles (counter + histogram): {handles:.1} ns");
    println!(
        "the same with a label lookup per request, as a naive recorder would do:    {lookup:.1} ns"
    );
    println!(
        "rollback window: record + the sum the guard checks:                         {guard:.1} ns"
    );
    println!("RESULT record_cost_ns handles={handles:.1} label_lookup={lookup:.1} window={guard:.1} iterations={N} threads=1");
}
