//! Per-request balancing over the endpoints DNS discovery finds
//! (`discovery = "dns"`), against a real DNS server in the test
//! (`common::dns`, hickory-server) and ping backends on 127.0.0.2, .3, .4,
//! ... (Linux routes all of 127/8 to loopback), all on one port as a
//! headless Service's pods are. Each backend reports its own name in
//! `x-ping-version`, so a client sees which pod answered.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns::DnsServer;
use common::*;
use http::StatusCode;

const NAME: &str = "pods.test.";

/// `names.len()` ping backends on 127.0.0.2, .3, ... sharing one port.
async fn pods(names: &[&str], error_rates: &[f64]) -> (u16, Vec<ping_backend::Handle>) {
    'again: for _ in 0..20 {
        let mut handles = Vec::new();
        let mut port = 0;
        for (i, name) in names.iter().enumerate() {
            let config = ping_backend::Config {
                version: (*name).into(),
                error_rate: error_rates.get(i).copied().unwrap_or(0.0),
                latency: Duration::ZERO,
                drain_delay: Duration::ZERO,
                shutdown_timeout: Duration::from_secs(5),
            };
            let addr = format!("127.0.0.{}:{port}", 2 + i);
            match ping_backend::spawn(&addr, config).await {
                Ok(h) => {
                    port = h.addr().port();
                    handles.push(h);
                }
                // The port is taken on this address: try another port.
                Err(_) => continue 'again,
            }
        }
        return (port, handles);
    }
    panic!(
        "no port free on 127.0.0.2..{} after 20 tries",
        1 + names.len()
    );
}

fn ips(handles: &[&ping_backend::Handle]) -> Vec<IpAddr> {
    handles.iter().map(|h| h.addr().ip()).collect()
}

fn routes_for(port: u16, rollback: bool, stable: Option<SocketAddr>) -> String {
    let mut text = String::new();
    if let Some(stable) = stable {
        text.push_str(&format!(
            "[versions.stable]\nupstream = \"http://{stable}\"\nweight = 50\n\n"
        ));
    }
    let weight = if stable.is_some() { 50 } else { 100 };
    text.push_str(&format!(
        "[versions.canary]\nupstream = \"http://pods.test:{port}\"\nweight = {weight}\ndiscovery = \"dns\"\n"
    ));
    if rollback {
        text.push_str("\n[rollback]\ntarget = \"stable\"\n");
    }
    text
}

async fn proxy_on(dns: &DnsServer, routes: &str) -> TestProxy {
    let server = dns.addr;
    TestProxy::start_with(routes, |c| c.dns_server = Some(server)).await
}

/// Answers by pod name; the first failure, if any.
#[derive(Default)]
struct Tally {
    by_pod: HashMap<String, u64>,
    failed: u64,
    first_failure: Option<String>,
    /// When each pod answered first.
    first_seen: HashMap<String, Instant>,
}

impl Tally {
    fn add(&mut self, answer: Result<Answer, BoxError>) {
        match answer {
            Ok(a) if a.status == StatusCode::OK => {
                let pod = a.version().to_string();
                self.first_seen
                    .entry(pod.clone())
                    .or_insert_with(Instant::now);
                *self.by_pod.entry(pod).or_default() += 1;
            }
            other => {
                self.failed += 1;
                self.first_failure
                    .get_or_insert_with(|| format!("{other:?}"));
            }
        }
    }
}

/// `clients` clients sending GET /ping one after another until `stop` or
/// `limit`; everything goes into `tally`.
fn load(
    addr: SocketAddr,
    clients: usize,
    limit: Duration,
    tally: Arc<Mutex<Tally>>,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let deadline = Instant::now() + limit;
    (0..clients)
        .map(|_| {
            let (tally, stop) = (tally.clone(), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 20_000 {
                    n += 1;
                    let a = get(&c, addr, "/ping").await;
                    tally.lock().unwrap().add(a);
                }
            })
        })
        .collect()
}

/// Stop the clients `load` started, and wait for them.
async fn stop_load(stop: &AtomicBool, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
}

async fn run_for(addr: SocketAddr, clients: usize, n: u64) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let per = n / clients as u64;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let tally = tally.clone();
            tokio::spawn(async move {
                let c = client();
                for _ in 0..per {
                    let a = get(&c, addr, "/ping").await;
                    tally.lock().unwrap().add(a);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap()
}

fn assert_thirds(t: &Tally, pods: &[&str], what: &str) {
    let n: u64 = t.by_pod.values().sum();
    let sigma = (n as f64 * (1.0 / 3.0) * (2.0 / 3.0)).sqrt();
    for pod in pods {
        let got = t.by_pod.get(*pod).copied().unwrap_or(0) as f64;
        assert!(
            (got - n as f64 / 3.0).abs() <= 5.0 * sigma,
            "{what}: pod {pod} answered {got} of {n}: {:?}",
            t.by_pod
        );
    }
    let (max, min) = (
        t.by_pod.values().max().copied().unwrap_or(0),
        t.by_pod.values().min().copied().unwrap_or(0),
    );
    eprintln!(
        "{what}: {:?}, max/min {:.3}",
        t.by_pod,
        max as f64 / min.max(1) as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_share_concurrent_and_sequential_requests() {
    let dns = DnsServer::start().await;
    let (port, pods) = pods(&["a", "b", "c"], &[]).await;
    dns.set(NAME, &ips(&pods.iter().collect::<Vec<_>>()), 5);
    let proxy = proxy_on(&dns, &routes_for(port, false, None)).await;
    let concurrent = run_for(proxy.addr, 8, 3000).await;
    assert_eq!(concurrent.failed, 0, "{:?}", concurrent.first_failure);
    assert_thirds(&concurrent, &["a", "b", "c"], "8 concurrent clients");
    // One client, one request at a time: today's ClusterIP pool would put
    // them all on one connection, so one pod.
    let sequential = run_for(proxy.addr, 1, 600).await;
    assert_eq!(sequential.failed, 0, "{:?}", sequential.first_failure);
    assert_thirds(&sequential, &["a", "b", "c"], "one sequential client");
    let status = proxy.status().await;
    let endpoints = status["versions"][0]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 3, "{status}");
    assert!(endpoints.iter().all(|e| e["state"] == "healthy"));
    let text = proxy.metrics().await;
    assert_eq!(
        sample(
            &text,
            "canary_proxy_endpoints",
            &[("version", "canary"), ("state", "healthy")]
        ),
        Some(3.0)
    );
    assert!(
        sample(
            &text,
            "canary_proxy_dns_refreshes_total",
            &[("version", "canary"), ("result", "success")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_gets_its_share_within_two_refreshes_and_a_removed_one_costs_nothing() {
    let dns = DnsServer::start().await;
    let (port, mut pods) = pods(&["a", "b", "c"], &[]).await;
    // TTL 1 s: the proxy refreshes every second.
    dns.set(NAME, &ips(&[&pods[0], &pods[1]]), 1);
    let proxy = proxy_on(&dns, &routes_for(port, false, None)).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(
        proxy.addr,
        4,
        Duration::from_secs(30),
        tally.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!tally.lock().unwrap().by_pod.contains_key("c"));

    // Scale 2 -> 3.
    let changed = Instant::now();
    dns.set(NAME, &ips(&pods.iter().collect::<Vec<_>>()), 1);
    let first = eventually(Duration::from_secs(5), "pod c answers", || async {
        tally.lock().unwrap().first_seen.get("c").copied()
    })
    .await;
    let took = first.duration_since(changed);
    eprintln!("zone change to the first request at the new pod: {took:?}");
    assert!(took <= Duration::from_secs(2), "took {took:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A rolling update's last step: the pod leaves DNS, then stops.
    dns.set(NAME, &ips(&[&pods[0], &pods[1]]), 1);
    eventually(Duration::from_secs(5), "the proxy drops pod c", || async {
        let status = proxy.status().await;
        (status["versions"][0]["endpoints"].as_array()?.len() == 2).then_some(())
    })
    .await;
    let c = pods.remove(2);
    c.shutdown().await.unwrap();
    let before = tally.lock().unwrap().by_pod.get("c").copied();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_load(&stop, tasks).await;
    {
        let t = tally.lock().unwrap();
        assert_eq!(t.failed, 0, "{:?}", t.first_failure);
        assert_eq!(
            t.by_pod.get("c").copied(),
            before,
            "pod c got requests after it left DNS"
        );
        assert!(t.by_pod.get("c").copied().unwrap_or(0) > 0);
    }
    let status = proxy.status().await;
    assert_eq!(
        status["versions"][0]["endpoints"].as_array().unwrap().len(),
        2
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_pod_is_ejected_and_retried_with_no_client_error_and_no_rollback() {
    let dns = DnsServer::start().await;
    let stable = backend("stable", 0.0, Duration::ZERO).await;
    let (port, mut pods) = pods(&["a", "b", "c"], &[]).await;
    dns.set(NAME, &ips(&pods.iter().collect::<Vec<_>>()), 5);
    let proxy = proxy_on(&dns, &routes_for(port, true, Some(stable.addr()))).await;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = load(
        proxy.addr,
        8,
        Duration::from_secs(30),
        tally.clone(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Killed: its port refuses connections; DNS still names it.
    pods.remove(2).shutdown().await.unwrap();
    eventually(Duration::from_secs(10), "pod c ejected", || async {
        let status = proxy.status().await;
        status["versions"][1]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state"] == "ejected")
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_load(&stop, tasks).await;
    {
        let t = tally.lock().unwrap();
        assert_eq!(t.failed, 0, "{:?}", t.first_failure);
    }
    let status = proxy.status().await;
    assert_eq!(status["versions"][1]["rolled_back"], false, "{status}");
    let text = proxy.metrics().await;
    assert_eq!(
        by_version(&text, "canary_proxy_endpoint_ejections_total", "canary"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "canary_proxy_endpoints",
            &[("version", "canary"), ("state", "ejected")]
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_answering_500_is_ejected_and_the_errors_clients_see_stay_bounded() {
    let dns = DnsServer::start().await;
    // Pod c fails every request with a 500.
    let (port, pods) = pods(&["a", "b", "c"], &[0.0, 0.0, 1.0]).await;
    dns.set(NAME, &ips(&pods.iter().collect::<Vec<_>>()), 5);
    let proxy = proxy_on(&dns, &routes_for(port, false, None)).await;
    let clients = 8;
    let t = run_for(proxy.addr, clients, 2000).await;
    // Ejected after 5 failures in a row; requests already on their way to
    // it when it trips fail too: at most one per client.
    let bound = 5 + clients as u64;
    eprintln!("errors seen: {} of 2000 (bound {bound})", t.failed);
    assert!(t.failed >= 5 && t.failed <= bound, "{} errors", t.failed);
    assert!(
        !t.by_pod.contains_key("c"),
        "pod c answered OK: {:?}",
        t.by_pod
    );
    let status = proxy.status().await;
    let states: Vec<_> = status["versions"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        states
            .iter()
            .any(|(a, s)| a.starts_with(&pods[2].addr().ip().to_string()) && s == "ejected"),
        "{states:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_server_that_stops_answering_leaves_the_last_good_pods_serving() {
    let dns = DnsServer::start().await;
    let (port, pods) = pods(&["a", "b", "c"], &[]).await;
    dns.set(NAME, &ips(&pods.iter().collect::<Vec<_>>()), 1);
    let proxy = proxy_on(&dns, &routes_for(port, false, None)).await;
    let warm = run_for(proxy.addr, 2, 100).await;
    assert_eq!(warm.failed, 0);
    dns.pause();
    let text = eventually(
        Duration::from_secs(20),
        "a failed refresh counted",
        || async {
            let text = proxy.metrics().await;
            (sample(
                &text,
                "canary_proxy_dns_refreshes_total",
                &[("version", "canary"), ("result", "failure")],
            )
            .unwrap_or(0.0)
                >= 1.0)
                .then_some(text)
        },
    )
    .await;
    assert!(text.contains("canary_proxy_dns_refreshes_total"));
    let during = run_for(proxy.addr, 4, 600).await;
    assert_eq!(during.failed, 0, "{:?}", during.first_failure);
    assert_thirds(&during, &["a", "b", "c"], "while DNS is down");
    let status = proxy.status().await;
    let discovery = &status["versions"][0]["discovery"];
    assert!(discovery["last_error"]["message"].is_string(), "{status}");
    dns.resume();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_pod_gets_fewer_requests_under_concurrency() {
    // Power of two choices on requests in flight: a pod that answers in
    // 20 ms holds its requests longer, so it is the busier of a pair more
    // often, and gets less than its third.
    let dns = DnsServer::start().await;
    let (port, mut fast) = pods(&["a", "b"], &[]).await;
    let slow = ping_backend::spawn(
        &format!("127.0.0.4:{port}"),
        ping_backend::Config {
            version: "slow".into(),
            error_rate: 0.0,
            latency: Duration::from_millis(20),
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(5),
        },
    )
    .await
    .expect("port free on 127.0.0.4 too");
    fast.push(slow);
    dns.set(NAME, &ips(&fast.iter().collect::<Vec<_>>()), 5);
    let proxy = proxy_on(&dns, &routes_for(port, false, None)).await;
    let t = run_for(proxy.addr, 8, 2400).await;
    assert_eq!(t.failed, 0, "{:?}", t.first_failure);
    let n: u64 = t.by_pod.values().sum();
    let slow_share = t.by_pod.get("slow").copied().unwrap_or(0) as f64 / n as f64;
    eprintln!(
        "slow pod's share under 8 clients: {:.3} ({:?})",
        slow_share, t.by_pod
    );
    assert!(
        slow_share < 0.2,
        "the slow pod got {slow_share:.3} of the requests"
    );
    assert!(
        slow_share > 0.0,
        "the slow pod got nothing: it is not ejected, only slow"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_versions_balance_per_request_over_pods_too() {
    // Long-lived HTTP/2 connections must not pin a pod: each pod gets its
    // own few multiplexed connections, and each request picks a pod.
    let dns = DnsServer::start().await;
    let (port, pods) = pods(&["a", "b", "c"], &[]).await;
    dns.set(NAME, &ips(&pods.iter().collect::<Vec<_>>()), 5);
    let routes = routes_for(port, false, None).replace(
        "discovery = \"dns\"",
        "discovery = \"dns\"\nprotocol = \"h2c\"",
    );
    let proxy = proxy_on(&dns, &routes).await;
    let t = run_for(proxy.addr, 8, 1500).await;
    assert_eq!(t.failed, 0, "{:?}", t.first_failure);
    assert_thirds(&t, &["a", "b", "c"], "h2c, 8 concurrent clients");
    let sequential = run_for(proxy.addr, 1, 300).await;
    assert_thirds(&sequential, &["a", "b", "c"], "h2c, one sequential client");
    let text = proxy.metrics().await;
    let opened = by_version(
        &text,
        "canary_proxy_upstream_connections_opened_total",
        "canary",
    )
    .unwrap_or(0.0);
    // A few connections per pod, not one per request.
    assert!(
        (3.0..=12.0).contains(&opened),
        "{opened} connections for 1800 requests"
    );
    proxy.shutdown().await;
}
