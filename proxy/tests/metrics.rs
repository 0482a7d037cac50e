//! The metrics an operator scrapes: exact counts per version and code,
//! series removed with their version, a clean exposition format, and a real
//! Prometheus computing the error ratio from them.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_mix_of_requests_is_counted_exactly_per_version_and_code() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 1.0, Duration::ZERO).await;
    // Port 1 of a loopback address no test binds: refused, always (a port
    // bound and closed could be reused by a parallel test's listener).
    let dead = std::net::SocketAddr::from(([127, 0, 0, 254], 1));
    let mut proxy = TestProxy::start(&routes(
        &[
            ("stable", stable.addr(), 1),
            ("canary", canary.addr(), 0),
            ("broken", dead, 0),
        ],
        None,
    ))
    .await;
    let c = client();
    let addr = proxy.addr;
    let send = |n: usize| {
        let c = c.clone();
        async move {
            for _ in 0..n {
                get(&c, addr, "/ping").await.unwrap();
            }
        }
    };

    send(40).await; // 40 x stable 200
    switch(
        &mut proxy,
        &routes(
            &[
                ("stable", stable.addr(), 0),
                ("canary", canary.addr(), 1),
                ("broken", dead, 0),
            ],
            None,
        ),
    )
    .await;
    send(20).await; // 20 x canary 500
    switch(
        &mut proxy,
        &routes(
            &[
                ("stable", stable.addr(), 0),
                ("canary", canary.addr(), 0),
                ("broken", dead, 1),
            ],
            None,
        ),
    )
    .await;
    send(5).await; // 5 x broken 502, made by the proxy

    let text = proxy.metrics().await;
    let requests = |v: &str, code: &str| {
        sample(
            &text,
            "canary_proxy_requests_total",
            &[("version", v), ("code", code)],
        )
    };
    assert_eq!(requests("stable", "200"), Some(40.0));
    assert_eq!(requests("canary", "500"), Some(20.0));
    assert_eq!(requests("broken", "502"), Some(5.0));
    assert_eq!(
        requests("canary", "200"),
        None,
        "the canary never answered 200"
    );
    assert_eq!(
        sample(
            &text,
            "canary_proxy_upstream_errors_total",
            &[("version", "broken"), ("kind", "connect")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(
            &text,
            "canary_proxy_upstream_errors_total",
            &[("version", "canary"), ("kind", "connect")]
        ),
        Some(0.0)
    );
    assert_eq!(
        by_version(
            &text,
            "canary_proxy_request_duration_seconds_count",
            "canary"
        ),
        Some(20.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_in_flight_requests", "stable"),
        Some(0.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_weight", "broken"),
        Some(1.0)
    );
    assert_eq!(
        by_version(&text, "canary_proxy_weight", "stable"),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "canary_proxy_config_reloads_total",
            &[("result", "success")]
        ),
        Some(2.0)
    );
    let hash = proxy.status().await["routes"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        sample(&text, "canary_proxy_config_info", &[("hash", &hash)]),
        Some(1.0)
    );
    assert_eq!(
        text.matches("canary_proxy_config_info{").count(),
        1,
        "only the active hash is exported"
    );
    assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);

    // A version removed from the routes file stops being exported.
    proxy.set_routes(&routes(&[("stable", stable.addr(), 1)], None));
    // Generous: it returns as soon as the reload lands, and a loaded CI
    // machine can take seconds to notice the ConfigMap swap.
    eventually(
        Duration::from_secs(20),
        "the canary's series to disappear",
        || async {
            let text = proxy.metrics().await;
            (!text.contains("version=\"canary\"") && !text.contains("version=\"broken\""))
                .then_some(())
        },
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_ratio_gauges_follow_the_rollback_window() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 1.0, Duration::ZERO).await;
    // min_requests is high so the canary is observed but never rolled back.
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 0), ("canary", canary.addr(), 1)],
        Some("target = \"stable\"\nerror_rate = 0.25\nmin_requests = 100000\nwindow = \"60s\""),
    ))
    .await;
    versions_of_any(&proxy, 10).await;
    let text = proxy.metrics().await;
    assert_eq!(
        by_version(&text, "canary_proxy_error_ratio", "canary"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "canary_proxy_error_ratio_threshold", &[]),
        Some(0.25)
    );
    let status = proxy.status().await;
    let canary_status = &status["versions"][1];
    assert_eq!(canary_status["window"]["requests"], 10);
    assert_eq!(canary_status["window"]["errors"], 10);
    assert_eq!(canary_status["rolled_back"], false);
    proxy.shutdown().await;
}

/// Apply new routes and wait until the proxy reports their hash, without
/// sending traffic, so the counts above stay exact.
async fn switch(proxy: &mut TestProxy, text: &str) {
    proxy.set_routes(text);
    let hash = canary_proxy::content_hash(text.as_bytes());
    eventually(
        Duration::from_secs(5),
        "the new routes to apply",
        || async { (proxy.status().await["routes"]["hash"] == hash.as_str()).then_some(()) },
    )
    .await;
}

async fn versions_of_any(proxy: &TestProxy, n: usize) {
    let c = client();
    for _ in 0..n {
        get(&c, proxy.addr, "/ping").await.unwrap();
    }
}

fn require(tool: &str) -> String {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    assert!(!found.is_empty(), "{tool} is not installed: install the Debian package `prometheus` (apt-get install prometheus), or run ./scripts/test, which does");
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs promtool (Debian package prometheus); ./scripts/test installs it and runs this"]
async fn promtool_check_metrics_is_clean() {
    let promtool = require("promtool");
    let stable = backend("v1", 0.2, Duration::ZERO).await;
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 1)],
        Some("target = \"stable\""),
    ))
    .await;
    versions_of_any(&proxy, 20).await;
    let text = proxy.metrics().await;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics found problems:\n{report}"
    );
    proxy.shutdown().await;
}

/// Percent-encode a PromQL query for a URL query string.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn query(prom: SocketAddr, q: &str) -> Option<serde_json::Value> {
    let a = get(
        &client(),
        prom,
        &format!("/api/v1/query?query={}", encode(q)),
    )
    .await
    .ok()?;
    let v: serde_json::Value = serde_json::from_str(&a.body).ok()?;
    (v["status"] == "success").then(|| v["data"]["result"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the prometheus server (Debian package prometheus); ./scripts/test installs it and runs this"]
async fn a_real_prometheus_scrape_gives_the_expected_error_ratio() {
    let prometheus = require("prometheus");
    const CANARY_ERROR_RATE: f64 = 0.2;
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", CANARY_ERROR_RATE, Duration::ZERO).await;
    // No rollback table: this test is about counting, not about cutting off.
    let proxy = TestProxy::start(&routes(
        &[("stable", stable.addr(), 50), ("canary", canary.addr(), 50)],
        None,
    ))
    .await;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(&config, format!("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: canary-proxy\n    static_configs:\n      - targets: ['{}']\n", proxy.admin)).unwrap();
    let web = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut prom = Process::spawn(
        Command::new(prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}")),
    );

    // Steady traffic while Prometheus scrapes: bounded in count and time.
    let load = Load::start(proxy.addr, 2, 400_000, Duration::from_secs(90));
    // Prometheus needs a few scrapes before rate() over 30s has data: wait
    // until it holds at least 15 samples of the target, polling.
    eventually(
        Duration::from_secs(60),
        "Prometheus to collect 15 scrapes",
        || async {
            let r = query(web, "count_over_time(up{job=\"canary-proxy\"}[30s])").await?;
            (r[0]["value"][1].as_str()?.parse::<f64>().ok()? >= 15.0).then_some(())
        },
    )
    .await;
    let ratio_query = "sum by (version) (rate(canary_proxy_requests_total{code=~\"5..\"}[30s])) / sum by (version) (rate(canary_proxy_requests_total[30s]))";
    let result = query(web, ratio_query)
        .await
        .expect("the ratio query answers");
    let (requests, failures, _) = load.finish().await;
    // Client side, the only non-200 answers are the injected canary 500s:
    // half the traffic at 0.2 is a tenth of it.
    let client_ratio = failures as f64 / requests as f64;
    assert!(
        (client_ratio - CANARY_ERROR_RATE / 2.0).abs() < 0.03,
        "clients saw {failures} errors in {requests} requests"
    );
    assert!(prom.try_wait().is_none(), "prometheus is still running");

    let ratio_of = |version: &str| -> Option<f64> {
        result
            .as_array()?
            .iter()
            .find(|r| r["metric"]["version"] == version)?["value"][1]
            .as_str()?
            .parse()
            .ok()
    };
    // The canary's only errors are the injected ones. Over 30 s at hundreds
    // of requests per second the window holds thousands of canary answers,
    // so the binomial standard deviation of the ratio is below 0.01; 0.05 is
    // a tolerance of more than 5 sigma.
    let canary_ratio = ratio_of("canary").unwrap_or_else(|| panic!("no canary series in {result}"));
    assert!((canary_ratio - CANARY_ERROR_RATE).abs() < 0.05, "canary error ratio {canary_ratio}, expected {CANARY_ERROR_RATE} ({requests} requests sent)");
    // Stable has no 5xx at all, so its numerator series does not exist and
    // the division yields no sample for it: an operator sees no error ratio.
    assert!(
        ratio_of("stable").unwrap_or(0.0) == 0.0,
        "stable had no errors: {result}"
    );
    proxy.shutdown().await;
}
