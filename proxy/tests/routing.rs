//! `[sticky]`, `[override]` and `[mirror]` against real servers: keys stay
//! on their version (across processes and restarts too) and move only as
//! the weights say; the override header reaches a weight-0 version but never
//! a rolled-back one; copies reach the mirror version without the primary
//! ever waiting for them, and they feed its rollback.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A GET /ping with extra headers.
async fn get_with(
    c: &TestClient,
    addr: SocketAddr,
    headers: &[(&str, &str)],
) -> Result<Answer, BoxError> {
    common::get_with(c, addr, "/ping", headers).await
}

/// The version each of `keys` reaches, sending its key in `x-user-id`.
async fn versions_by_key(c: &TestClient, addr: SocketAddr, keys: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let a = get_with(c, addr, &[("x-user-id", k)]).await.unwrap();
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        out.push(a.version().to_owned());
    }
    out
}

fn keys(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("user-{i}")).collect()
}

const STICKY_HEADER: &str = "\n[sticky]\nheader = \"x-user-id\"\n";

/// One request a [`Recorder`] upstream received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    headers: http::HeaderMap,
    body: Bytes,
}

/// How a [`Recorder`] answers.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    Status(u16),
    /// Never answers (the connection stays open).
    Hang,
}

/// An upstream on 127.0.0.1:0 that records every request it reads in full
/// and answers as told, with `x-ping-version` set to its name.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    async fn start(name: &'static str, behaviour: Behaviour) -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    let seen = seen.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                            let seen = seen.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                seen.lock().unwrap().push(Seen {
                                    method: parts.method.to_string(),
                                    headers: parts.headers,
                                    body,
                                });
                                let status = match behaviour {
                                    Behaviour::Status(s) => s,
                                    Behaviour::Hang => {
                                        std::future::pending::<()>().await;
                                        unreachable!()
                                    }
                                };
                                Ok::<_, Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .header("x-ping-version", name)
                                        .body(Full::new(Bytes::from_static(b"recorded")))
                                        .unwrap(),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Recorder { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(text, name, labels).unwrap_or(0.0)
}

// ---- sticky --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stays_on_one_version_and_keys_split_by_weight() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let v2 = backend("v2", 0.0, Duration::ZERO).await;
    let text = routes(
        &[("stable", v1.addr(), 70), ("canary", v2.addr(), 30)],
        None,
    ) + STICKY_HEADER;
    let proxy = TestProxy::start(&text).await;
    let c = client();

    let keys = keys(600);
    let first = versions_by_key(&c, proxy.addr, &keys).await;
    for _ in 0..2 {
        assert_eq!(
            versions_by_key(&c, proxy.addr, &keys).await,
            first,
            "a key changed version while the weights stayed"
        );
    }
    // Each key is a Bernoulli(0.3) draw: 5 sigma of 600 keys is 56.
    let canary = first.iter().filter(|v| *v == "v2").count() as f64;
    let sigma = (600.0f64 * 0.3 * 0.7).sqrt();
    assert!(
        (canary - 180.0).abs() <= 5.0 * sigma,
        "{canary} of 600 keys on the canary, expected 180 +- {:.0}",
        5.0 * sigma
    );

    // A request without the key is split at random, as without [sticky].
    let keyless = versions_of(&c, proxy.addr, 400).await;
    let canary = keyless.iter().filter(|v| *v == "v2").count();
    assert!(
        (60..=180).contains(&canary),
        "{canary} of 400 keyless requests on the canary"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxy_processes_and_a_restarted_one_agree_on_every_key() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let v2 = backend("v2", 0.0, Duration::ZERO).await;
    let text = routes(
        &[("stable", v1.addr(), 50), ("canary", v2.addr(), 50)],
        None,
    ) + STICKY_HEADER;
    let cm = ConfigMapDir::new(&[("routes.toml", text.as_bytes())]);
    let a = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    let b = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    let c = client();
    let keys = keys(300);
    let on_a = versions_by_key(&c, a.addr(), &keys).await;
    let on_b = versions_by_key(&c, b.addr(), &keys).await;
    assert_eq!(
        on_a, on_b,
        "two replicas sent the same keys to different versions"
    );
    assert!(
        on_a.iter().any(|v| v == "v1") && on_a.iter().any(|v| v == "v2"),
        "both versions get keys: {on_a:?}"
    );
    drop(a);
    let restarted = spawn_proxy_binary(&cm.path("routes.toml"), &[]);
    assert_eq!(
        versions_by_key(&c, restarted.addr(), &keys).await,
        on_b,
        "a restarted proxy moved keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_weight_grows_keys_only_move_to_that_version() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let v2 = backend("v2", 0.0, Duration::ZERO).await;
    let v3 = backend("v3", 0.0, Duration::ZERO).await;
    let text = |w3: u64| {
        routes(
            &[
                ("stable", v1.addr(), 60),
                ("canary", v2.addr(), 30),
                ("third", v3.addr(), w3),
            ],
            None,
        ) + STICKY_HEADER
    };
    let mut proxy = TestProxy::start(&text(10)).await;
    let c = client();
    let keys = keys(500);
    let before = versions_by_key(&c, proxy.addr, &keys).await;

    proxy.set_routes(&text(40));
    let hash = eventually(
        Duration::from_secs(10),
        "the new weights are in force",
        || async {
            let s = proxy.status().await;
            (s["versions"][2]["weight"] == 40).then_some(())
        },
    )
    .await;
    let () = hash;
    let after = versions_by_key(&c, proxy.addr, &keys).await;
    let moved: Vec<_> = before.iter().zip(&after).filter(|(b, a)| b != a).collect();
    assert!(
        moved.iter().all(|(_, a)| *a == "v3"),
        "keys moved elsewhere than to the grown version: {moved:?}"
    );
    // 10% -> 40% of 130 -> 40/130: about a quarter of the other keys move.
    assert!(
        moved.len() > 50,
        "only {} of 500 keys moved to the grown version",
        moved.len()
    );

    // And back: keys only leave the shrunk version, to where they were.
    proxy.set_routes(&text(10));
    eventually(
        Duration::from_secs(10),
        "the old weights are back",
        || async { (proxy.status().await["versions"][2]["weight"] == 10).then_some(()) },
    )
    .await;
    assert_eq!(
        versions_by_key(&c, proxy.addr, &keys).await,
        before,
        "keys did not return to where they were"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_versions_keys_go_to_the_target_and_come_back_after_the_reset() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let bad = backend("v2", 1.0, Duration::ZERO).await;
    let good = backend("v2", 0.0, Duration::ZERO).await;
    let policy = "target = \"stable\"\nerror_rate = 0.1\nmin_requests = 10\nwindow = \"60s\"";
    let text = |canary: SocketAddr| {
        routes(
            &[("stable", v1.addr(), 50), ("canary", canary, 50)],
            Some(policy),
        ) + STICKY_HEADER
    };
    let mut proxy = TestProxy::start(&text(bad.addr())).await;
    let c = client();
    let keys = keys(200);

    // Bounded: each round is 200 requests; the canary trips within a few.
    eventually(
        Duration::from_secs(30),
        "the failing canary is rolled back",
        || async {
            for k in &keys {
                let _ = get_with(&c, proxy.addr, &[("x-user-id", k)]).await;
            }
            (proxy.status().await["versions"][1]["rolled_back"] == true).then_some(())
        },
    )
    .await;
    let during = versions_by_key(&c, proxy.addr, &keys).await;
    assert!(
        during.iter().all(|v| v == "v1"),
        "a rolled-back version still got keys: {during:?}"
    );

    // The reset: the canary's entry changes (a fixed build).
    proxy.set_routes(&text(good.addr()));
    eventually(Duration::from_secs(10), "the rollback is reset", || async {
        (proxy.status().await["versions"][1]["rolled_back"] == false).then_some(())
    })
    .await;
    let after = versions_by_key(&c, proxy.addr, &keys).await;
    let canary_keys = after.iter().filter(|v| *v == "v2").count();
    assert!(
        canary_keys > 50,
        "{canary_keys} of 200 keys came back to the canary"
    );

    // The keys that came back are exactly the canary's keys by the hash: a
    // second proxy that never rolled back agrees on every one.
    let fresh = TestProxy::start(&text(good.addr())).await;
    assert_eq!(versions_by_key(&c, fresh.addr, &keys).await, after);
    fresh.shutdown().await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_cookie_gives_a_browser_a_key_and_it_stays_on_its_first_version() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let v2 = backend("v2", 0.0, Duration::ZERO).await;
    let text = routes(
        &[("stable", v1.addr(), 50), ("canary", v2.addr(), 50)],
        None,
    ) + "\n[sticky]\ncookie = \"canary-key\"\nset_cookie = true\nmax_age = \"1h\"\n";
    let proxy = TestProxy::start(&text).await;
    let c = client();
    let mut first_versions = HashMap::new();
    for browser in 0..60 {
        let first = get(&c, proxy.addr, "/ping").await.unwrap();
        let set = first
            .headers
            .get("set-cookie")
            .expect("the first answer sets the cookie")
            .to_str()
            .unwrap()
            .to_owned();
        let (pair, attrs) = set.split_once(';').unwrap();
        let (name, key) = pair.split_once('=').unwrap();
        assert_eq!(name, "canary-key");
        assert_eq!(key.len(), 32, "{set}");
        for attr in ["Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax"] {
            assert!(
                attrs.split(';').any(|a| a.trim() == attr),
                "{attr} missing in {set}"
            );
        }
        assert!(
            !set.contains("Secure"),
            "Secure on a plain-HTTP answer: {set}"
        );
        // The browser sends it back, with other cookies around it.
        let cookie = format!("theme=dark; canary-key={key}; lang=en");
        for _ in 0..3 {
            let later = get_with(&c, proxy.addr, &[("cookie", &cookie)])
                .await
                .unwrap();
            assert_eq!(later.version(), first.version(), "browser {browser} moved");
            assert!(
                later.headers.get("set-cookie").is_none(),
                "a key is set again"
            );
        }
        *first_versions
            .entry(first.version().to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(
        first_versions.len(),
        2,
        "new browsers are split over both versions: {first_versions:?}"
    );
    proxy.shutdown().await;
}

/// A client whose connections come from `ip` (a loopback address).
fn client_from(ip: IpAddr) -> Client<HttpConnector, Empty<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip));
    Client::builder(TokioExecutor::new()).build(connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_keys_every_request_from_it() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let v2 = backend("v2", 0.0, Duration::ZERO).await;
    let text = routes(
        &[("stable", v1.addr(), 50), ("canary", v2.addr(), 50)],
        None,
    ) + "\n[sticky]\nclient_address = true\n";
    let proxy = TestProxy::start(&text).await;
    let mut seen = Vec::new();
    for last in 1..=24u8 {
        let ip: IpAddr = format!("127.0.0.{last}").parse().unwrap();
        let c = client_from(ip);
        let versions = versions_of(&c, proxy.addr, 8).await;
        assert!(
            versions.iter().all(|v| *v == versions[0]),
            "{ip} was split: {versions:?}"
        );
        seen.push(versions[0].clone());
    }
    assert!(
        seen.iter().any(|v| v == "v1") && seen.iter().any(|v| v == "v2"),
        "24 addresses all went to one version: {seen:?}"
    );
    proxy.shutdown().await;
}

// ---- override ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_override_header_reaches_a_weight_zero_version_and_is_removed() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let canary = Recorder::start("v2", Behaviour::Status(200)).await;
    let text = routes(
        &[("stable", v1.addr(), 100), ("canary", canary.addr, 0)],
        None,
    ) + "\n[override]\nheader = \"x-canary-version\"\n";
    let mut proxy = TestProxy::start(&text).await;
    let c = client();
    for value in ["canary", " Canary "] {
        let a = get_with(&c, proxy.addr, &[("x-canary-version", value)])
            .await
            .unwrap();
        assert_eq!(
            a.version(),
            "v2",
            "override {value:?} did not reach the canary"
        );
    }
    let seen = canary.seen();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| !s.headers.contains_key("x-canary-version")),
        "the header reached the upstream"
    );
    // Unknown, empty: the normal split (stable takes everything).
    for value in ["nope", ""] {
        let a = get_with(&c, proxy.addr, &[("x-canary-version", value)])
            .await
            .unwrap();
        assert_eq!(a.version(), "v1", "override {value:?}");
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "canary_proxy_override_requests_total",
            &[("version", "canary")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "canary_proxy_requests_total",
            &[("version", "canary"), ("code", "200")]
        ),
        2.0,
        "an override is counted like any request"
    );

    // forward_header = true passes it on.
    proxy.set_routes(&(text.clone() + "forward_header = true\n"));
    eventually(
        Duration::from_secs(10),
        "forward_header is in force",
        || async { (proxy.status().await["override"]["forward_header"] == true).then_some(()) },
    )
    .await;
    get_with(&c, proxy.addr, &[("x-canary-version", "canary")])
        .await
        .unwrap();
    assert_eq!(
        canary.seen().last().unwrap().headers["x-canary-version"],
        "canary"
    );

    // allow_from without the client's address: the header is ignored.
    proxy.set_routes(&(text + "allow_from = [\"10.0.0.0/8\"]\n"));
    eventually(
        Duration::from_secs(10),
        "allow_from is in force",
        || async {
            (proxy.status().await["override"]["allow_from"][0] == "10.0.0.0/8").then_some(())
        },
    )
    .await;
    let a = get_with(&c, proxy.addr, &[("x-canary-version", "canary")])
        .await
        .unwrap();
    assert_eq!(
        a.version(),
        "v1",
        "a client outside allow_from picked the version"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_override_never_reaches_a_rolled_back_version() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let bad = backend("v2", 1.0, Duration::ZERO).await;
    let text = routes(
        &[("stable", v1.addr(), 100), ("canary", bad.addr(), 0)],
        Some("target = \"stable\"\nerror_rate = 0.1\nmin_requests = 10\nwindow = \"60s\""),
    ) + "\n[override]\nheader = \"x-canary-version\"\nallow_from = [\"127.0.0.0/8\"]\n";
    let proxy = TestProxy::start(&text).await;
    let c = client();
    // Override traffic alone is judged: the canary trips on it.
    eventually(
        Duration::from_secs(30),
        "the canary is rolled back on override traffic",
        || async {
            let _ = get_with(&c, proxy.addr, &[("x-canary-version", "canary")]).await;
            (proxy.status().await["versions"][1]["rolled_back"] == true).then_some(())
        },
    )
    .await;
    for _ in 0..50 {
        let a = get_with(&c, proxy.addr, &[("x-canary-version", "canary")])
            .await
            .unwrap();
        assert_eq!(
            (a.status, a.version()),
            (StatusCode::OK, "v1"),
            "the override reached a rolled-back version"
        );
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(
            &m,
            "canary_proxy_override_requests_total",
            &[("version", "stable")]
        ),
        50.0
    );
    proxy.shutdown().await;
}

// ---- mirror --------------------------------------------------------------

fn mirror_routes(stable: SocketAddr, canary: SocketAddr, mirror: &str) -> String {
    routes(&[("stable", stable, 100), ("canary", canary, 0)], None)
        + "\n[mirror]\nversion = \"canary\"\n"
        + mirror
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_reach_the_mirror_and_the_client_only_sees_the_primary() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let canary = Recorder::start("v2", Behaviour::Status(503)).await;
    let proxy = TestProxy::start(&mirror_routes(v1.addr(), canary.addr, "share = 1.0\n")).await;
    let c = client();
    let answers = versions_of(&c, proxy.addr, 100).await;
    assert!(answers.iter().all(|v| v == "v1"));
    let m = eventually(Duration::from_secs(10), "100 copies answered", || async {
        let m = proxy.metrics().await;
        (metric(
            &m,
            "canary_proxy_mirror_requests_total",
            &[("version", "canary"), ("code", "503")],
        ) == 100.0)
            .then_some(m)
    })
    .await;
    let seen = canary.seen();
    assert_eq!(seen.len(), 100);
    assert!(seen
        .iter()
        .all(|s| s.method == "GET" && s.headers["x-canary-mirror"] == "1"));
    // Copies are not requests served: the canary served none.
    assert_eq!(
        metric(
            &m,
            "canary_proxy_requests_total",
            &[("version", "canary"), ("code", "503")]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &m,
            "canary_proxy_requests_total",
            &[("version", "stable"), ("code", "200")]
        ),
        100.0
    );
    assert_eq!(metric(&m, "canary_proxy_mirror_in_flight", &[]), 0.0);
    // The mirror's own requests are not copied.
    let s = proxy.status().await;
    assert_eq!(s["mirror"]["version"], "canary");
    assert_eq!(s["mirror"]["active"], true);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_of_requests_is_copied() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let canary = Recorder::start("v2", Behaviour::Status(200)).await;
    let proxy = TestProxy::start(&mirror_routes(v1.addr(), canary.addr, "share = 0.2\n")).await;
    let c = client();
    versions_of(&c, proxy.addr, 1000).await;
    let copies = eventually(Duration::from_secs(10), "the copies have ended", || async {
        let m = proxy.metrics().await;
        (metric(&m, "canary_proxy_mirror_in_flight", &[]) == 0.0).then(|| {
            metric(
                &m,
                "canary_proxy_mirror_requests_total",
                &[("version", "canary"), ("code", "200")],
            )
        })
    })
    .await;
    // Binomial(1000, 0.2): sigma 12.6; 5 sigma is 63.
    assert!(
        (137.0..=263.0).contains(&copies),
        "{copies} copies of 1000 at share 0.2"
    );
    assert_eq!(canary.count() as f64, copies);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_mirror_never_delays_or_fails_the_primary() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let canary = Recorder::start("v2", Behaviour::Hang).await;
    let proxy = TestProxy::start(&mirror_routes(
        v1.addr(),
        canary.addr,
        "share = 1.0\ntimeout = \"20s\"\nmax_in_flight = 8\n",
    ))
    .await;
    let load = Load::start(proxy.addr, 8, 800, Duration::from_secs(60));
    let (sent, failed, first) = load.finish_when_done().await;
    assert_eq!(
        failed, 0,
        "the primary failed with a hanging mirror: {first:?}"
    );
    // Every copy waits 20 s; a primary that waited for its copy could not
    // have answered 800 requests in the 60 s the load may take.
    assert_eq!(sent, 800);
    let c = client();
    for _ in 0..20 {
        let t = Instant::now();
        get(&c, proxy.addr, "/ping").await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a primary answer took {:?}, as long as the mirror's timeout",
            t.elapsed()
        );
    }
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "canary_proxy_mirror_in_flight", &[]),
        8.0,
        "max_in_flight bounds the copies"
    );
    assert!(
        metric(
            &m,
            "canary_proxy_mirror_dropped_total",
            &[("version", "canary"), ("reason", "full")]
        ) >= 800.0
    );
    assert_eq!(canary.count(), 8);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_mirror_times_out_and_a_dead_one_costs_the_primary_nothing() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let hang = Recorder::start("v2", Behaviour::Hang).await;
    let mut proxy = TestProxy::start(&mirror_routes(
        v1.addr(),
        hang.addr,
        "share = 1.0\ntimeout = \"100ms\"\n",
    ))
    .await;
    let c = client();
    versions_of(&c, proxy.addr, 20).await;
    eventually(Duration::from_secs(10), "20 copies timed out", || async {
        let m = proxy.metrics().await;
        (metric(
            &m,
            "canary_proxy_mirror_requests_total",
            &[("version", "canary"), ("code", "timeout")],
        ) == 20.0)
            .then_some(())
    })
    .await;

    // A mirror nothing listens on.
    let dead: SocketAddr = "127.0.0.254:1".parse().unwrap();
    proxy.set_routes(&mirror_routes(v1.addr(), dead, "share = 1.0\n"));
    eventually(
        Duration::from_secs(10),
        "the dead mirror is in force",
        || async {
            let s = proxy.status().await;
            (s["versions"][1]["upstream"] == "http://127.0.0.254:1").then_some(())
        },
    )
    .await;
    let load = Load::start(proxy.addr, 4, 400, Duration::from_secs(60));
    let (sent, failed, first) = load.finish_when_done().await;
    assert_eq!(
        (sent, failed),
        (400, 0),
        "the primary failed with a dead mirror: {first:?}"
    );
    let m = eventually(Duration::from_secs(10), "the copies have ended", || async {
        let m = proxy.metrics().await;
        (metric(&m, "canary_proxy_mirror_in_flight", &[]) == 0.0).then_some(m)
    })
    .await;
    let connect = metric(
        &m,
        "canary_proxy_mirror_requests_total",
        &[("version", "canary"), ("code", "connect")],
    );
    let full = metric(
        &m,
        "canary_proxy_mirror_dropped_total",
        &[("version", "canary"), ("reason", "full")],
    );
    assert_eq!(connect + full, 400.0, "every copy is accounted for");
    assert!(connect > 0.0);
    proxy.shutdown().await;
}

async fn post(c: &Client<HttpConnector, Full<Bytes>>, addr: SocketAddr, body: Bytes) -> StatusCode {
    let req = Request::post(format!("http://{addr}/upload"))
        .body(Full::new(body))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    resp.into_body().collect().await.unwrap();
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_copied_whole_up_to_max_body_and_post_only_when_listed() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let canary = Recorder::start("v2", Behaviour::Status(200)).await;
    let mut proxy = TestProxy::start(&mirror_routes(v1.addr(), canary.addr, "share = 1.0\n")).await;
    let c: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    // POST is not a safe method: not copied by default.
    assert_eq!(
        post(&c, proxy.addr, Bytes::from_static(b"order=1")).await,
        StatusCode::OK
    );
    proxy.set_routes(&mirror_routes(
        v1.addr(),
        canary.addr,
        "share = 1.0\nmethods = [\"POST\"]\nmax_body = 100000\n",
    ));
    eventually(Duration::from_secs(10), "POST is mirrored", || async {
        (proxy.status().await["mirror"]["methods"][0] == "POST").then_some(())
    })
    .await;
    assert_eq!(canary.count(), 0, "a POST was copied without being listed");

    let small: Bytes = (0..70_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<_>>()
        .into();
    assert_eq!(post(&c, proxy.addr, small.clone()).await, StatusCode::OK);
    let large: Bytes = vec![7u8; 100_001].into();
    assert_eq!(post(&c, proxy.addr, large).await, StatusCode::OK);
    // A streamed body (no length) that grows past max_body on the way.
    let (mut tx, body) = hyper_chunks();
    let sc: Client<HttpConnector, http_body_util::StreamBody<ChunkStream>> =
        Client::builder(TokioExecutor::new()).build_http();
    let req = Request::post(format!("http://{}/upload", proxy.addr))
        .body(body)
        .unwrap();
    let sending = tokio::spawn(async move {
        for _ in 0..4 {
            tx.send(Ok(http_body::Frame::data(Bytes::from(vec![1u8; 40_000]))))
                .await
                .unwrap();
        }
    });
    let resp = sc.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap();
    sending.await.unwrap();

    let m = eventually(Duration::from_secs(10), "the copy has ended", || async {
        let m = proxy.metrics().await;
        (metric(
            &m,
            "canary_proxy_mirror_requests_total",
            &[("version", "canary"), ("code", "200")],
        ) == 1.0)
            .then_some(m)
    })
    .await;
    let seen = canary.seen();
    assert_eq!(seen.len(), 1, "only the body within max_body is copied");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(
        seen[0].body, small,
        "the copy's body differs from the client's"
    );
    assert_eq!(
        metric(
            &m,
            "canary_proxy_mirror_dropped_total",
            &[("version", "canary"), ("reason", "body_too_large")]
        ),
        2.0
    );
    proxy.shutdown().await;
}

type ChunkStream = futures_channel_stream::Receiver;

/// A request body fed chunk by chunk, sent chunked (no length).
fn hyper_chunks() -> (
    futures_channel_stream::Sender,
    http_body_util::StreamBody<ChunkStream>,
) {
    let (tx, rx) = futures_channel_stream::channel();
    (tx, http_body_util::StreamBody::new(rx))
}

/// A bounded channel as a `Stream` of body frames, on tokio's mpsc.
mod futures_channel_stream {
    use bytes::Bytes;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    type Item = Result<http_body::Frame<Bytes>, std::convert::Infallible>;

    pub struct Sender(tokio::sync::mpsc::Sender<Item>);
    pub struct Receiver(tokio::sync::mpsc::Receiver<Item>);

    pub fn channel() -> (Sender, Receiver) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        (Sender(tx), Receiver(rx))
    }

    impl Sender {
        pub async fn send(&mut self, item: Item) -> Result<(), ()> {
            self.0.send(item).await.map_err(|_| ())
        }
    }

    impl futures_util::Stream for Receiver {
        type Item = Item;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
            self.0.poll_recv(cx)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_mirror_is_rolled_back_on_shadow_traffic_and_gets_no_more_copies() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let canary = Recorder::start("v2", Behaviour::Status(500)).await;
    let text = routes(
        &[("stable", v1.addr(), 100), ("canary", canary.addr, 0)],
        Some("target = \"stable\"\nerror_rate = 0.1\nmin_requests = 10\nwindow = \"60s\""),
    ) + "\n[mirror]\nversion = \"canary\"\nshare = 1.0\n";
    let proxy = TestProxy::start(&text).await;
    let c = client();
    // Bounded: at most 100 rounds of 5 requests.
    eventually(
        Duration::from_secs(30),
        "the mirror is rolled back on copies alone",
        || async {
            versions_of(&c, proxy.addr, 5).await;
            (proxy.status().await["versions"][1]["rolled_back"] == true).then_some(())
        },
    )
    .await;
    let s = proxy.status().await;
    assert_eq!(s["mirror"]["active"], false);
    // Let copies already sent end, then no more come.
    let settled = eventually(
        Duration::from_secs(10),
        "copies in flight have ended",
        || async {
            let m = proxy.metrics().await;
            (metric(&m, "canary_proxy_mirror_in_flight", &[]) == 0.0).then(|| canary.count())
        },
    )
    .await;
    let answers = versions_of(&c, proxy.addr, 200).await;
    assert!(answers.iter().all(|v| v == "v1"));
    // A copy takes its slot before its request's answer goes out, and holds
    // it until the mirror has answered: once none is in flight, every copy
    // of those 200 requests, if any, has reached the recorder.
    eventually(Duration::from_secs(10), "no copy in flight", || async {
        let m = proxy.metrics().await;
        (metric(&m, "canary_proxy_mirror_in_flight", &[]) == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        canary.count(),
        settled,
        "a rolled-back mirror still gets copies"
    );
    let m = proxy.metrics().await;
    assert_eq!(
        metric(&m, "canary_proxy_rollbacks_total", &[("version", "canary")]),
        1.0
    );
    // No user saw an error: the copies' 500s are only evidence.
    assert_eq!(
        metric(
            &m,
            "canary_proxy_requests_total",
            &[("version", "stable"), ("code", "500")]
        ),
        0.0
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_check_show_the_routing_tables() {
    let v1 = backend("v1", 0.0, Duration::ZERO).await;
    let text = routes(&[("stable", v1.addr(), 100), ("canary", v1.addr(), 0)], None)
        + "\n[sticky]\ncookie = \"k\"\nset_cookie = true\n\n[override]\nheader = \"x-canary-version\"\nallow_from = [\"10.1.2.3/8\"]\n\n[mirror]\nversion = \"canary\"\nshare = 0.25\n";
    let proxy = TestProxy::start(&text).await;
    let s = proxy.status().await;
    assert_eq!(s["sticky"]["key"], "cookie");
    assert_eq!(s["sticky"]["name"], "k");
    assert_eq!(s["sticky"]["max_age_seconds"], 7 * 24 * 3600);
    assert_eq!(s["override"]["header"], "x-canary-version");
    assert_eq!(s["override"]["allow_from"][0], "10.0.0.0/8");
    assert_eq!(s["mirror"]["share"], 0.25);
    assert_eq!(
        s["mirror"]["methods"],
        serde_json::json!(["GET", "HEAD", "OPTIONS"])
    );
    assert_eq!(s["mirror"]["max_body"], 65536);
    proxy.shutdown().await;

    let cm = ConfigMapDir::new(&[("routes.toml", text.as_bytes())]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_canary-proxy"))
        .arg("check")
        .arg(cm.path("routes.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "sticky: requests with the same value of the cookie `k` go to the same version",
        "override: a request whose `x-canary-version`",
        "mirror: a copy of 25% of the other versions' GET/HEAD/OPTIONS requests goes to `canary`",
    ] {
        assert!(
            stdout.contains(line),
            "check does not say {line:?}:\n{stdout}"
        );
    }
}
