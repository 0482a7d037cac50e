//! Measures what the request path pays to record one answer: the status
//! counter, the duration histogram and the version's judgment, through the
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

use canary_proxy::bench::{judgments, Metrics, Outcome};

const N: u32 = 5_000_000;

fn per_op(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1e9 / f64::from(N)
}

fn main() {
    let metrics = Metrics::new();
    let version = metrics.version("canary");
    // The judgment a canary gets with both criteria on: the most the hot
    // path can do per answer.
    let routes = "[versions.stable]\nupstream = \"http://127.0.0.1:1\"\nweight = 90\n\
                  [versions.canary]\nupstream = \"http://127.0.0.1:2\"\nweight = 10\n\
                  [rollback]\ntarget = \"stable\"\nslower_than = \"250ms\"\n";
    let judged = judgments(routes).expect("valid routes");
    let (stable, canary) = (&judged[0], &judged[1]);
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

    // The judgment: the window counts and the sequential tests, for a
    // healthy canary (1% errors, no slow answers: it never trips).
    let now = epoch.elapsed();
    let start = Instant::now();
    for i in 0..N {
        let outcome = Outcome {
            error: Some(i % 100 == 0),
            waited: Some(latency),
            unanswered: false,
        };
        black_box(canary.record(black_box(now), outcome, Some(stable)));
    }
    let guard = per_op(start.elapsed());

    println!("metrics for one answer through the snapshot's handles (counter + histogram): {handles:.1} ns");
    println!(
        "the same with a label lookup per request, as a naive recorder would do:    {lookup:.1} ns"
    );
    println!(
        "judgment: window counts + both sequential tests (errors, latency):          {guard:.1} ns"
    );
    println!("RESULT record_cost_ns handles={handles:.1} label_lookup={lookup:.1} window={guard:.1} iterations={N} threads=1");
}
