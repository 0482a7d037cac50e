//! gRPC through the proxy, with a real gRPC client (tonic) and h2c
//! upstreams (`protocol = "h2c"`): every call shape with its trailers, the
//! split, gRPC failures as rollback evidence (and client-fault codes not),
//! a GOAWAY mid-load, a dead upstream, `grpc-timeout`, tonic's health
//! service as a real server, and plain HTTP to ping-backend over h2c. gRPC
//! over the TLS front door is in `tls.rs`, with the other TLS tests.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::grpc::*;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Empty;

/// An address where nothing listens: port 1 of a loopback address no test
/// binds. (A port bound and then closed can be handed to another test's
/// listener running in parallel, which then accepts and never answers.)
async fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 254], 1))
}

/// `n` unary calls, `concurrency` at a time; the answers in order.
async fn calls(
    channel: &tonic::transport::Channel,
    n: usize,
    concurrency: usize,
) -> Vec<Result<String, tonic::Status>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = concurrency.min(n - out.len());
        let answers = futures_util::future::join_all(
            (0..batch).map(|i| unary(channel, if i % 2 == 0 { "a" } else { "b" })),
        )
        .await;
        out.extend(answers.into_iter().map(|r| r.map(|a| a.into_inner().text)));
    }
    out
}

fn grpc_calls(text: &str, version: &str, status: &str) -> f64 {
    sample(
        text,
        "canary_proxy_grpc_requests_total",
        &[("version", version), ("grpc_status", status)],
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_shape_passes_through_with_its_trailers() {
    let up = grpc_upstream("stable", Behaviour::default()).await;
    let proxy = TestProxy::start(&h2c_routes(&[("stable", up.addr, 100)], None)).await;
    let ch = channel(proxy.addr).await;

    let answer = unary(&ch, "hello").await.expect("a unary call");
    assert_eq!(answer.get_ref().text, "stable:hello");
    assert_eq!(
        answer
            .metadata()
            .get("x-served-by")
            .map(|v| v.to_str().unwrap()),
        Some("stable"),
        "the upstream's trailers reach the client"
    );

    // Each echo comes back before the next message is sent: both
    // directions stream at once, through the proxy.
    let mut bidi = Bidi::open(&ch).await.expect("a bidirectional call");
    for word in ["one", "two", "three"] {
        assert_eq!(bidi.say(word).await.unwrap(), format!("stable:{word}"));
    }
    let trailers = bidi.close().await.expect("the call ends OK");
    assert_eq!(trailers.get("x-served-by").unwrap(), "stable");

    let collected = collect(&ch, &["x", "y", "z"]).await.unwrap();
    assert_eq!(collected.text, "stable:x,y,z");

    let (texts, trailers) = count(&ch, 4).await.unwrap();
    assert_eq!(texts, ["stable:0", "stable:1", "stable:2", "stable:3"]);
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("x-served-by").unwrap(), "stable");

    let status = proxy.status().await;
    assert_eq!(status["versions"][0]["protocol"], "h2c");
    let text = proxy.metrics().await;
    assert_eq!(grpc_calls(&text, "stable", "OK"), 4.0);
    // Four calls, one after another: one HTTP/2 connection carried them.
    assert_eq!(up.connections.load(Ordering::Relaxed), 1);
    assert_eq!(
        by_version(
            &text,
            "canary_proxy_upstream_connections_opened_total",
            "stable"
        ),
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_of_calls_is_within_binomial_tolerance_over_few_connections() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("canary_proxy=debug")
        .with_test_writer()
        .try_init();
    let stable = grpc_upstream("stable", Behaviour::default()).await;
    let canary = grpc_upstream("canary", Behaviour::default()).await;
    let proxy = TestProxy::start(&h2c_routes(
        &[("stable", stable.addr, 90), ("canary", canary.addr, 10)],
        None,
    ))
    .await;
    let ch = channel(proxy.addr).await;
    let n = 3000;
    let answers = calls(&ch, n, 32).await;
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        failed.first()
    );
    let to_canary = answers
        .iter()
        .filter(|a| served_by(a.as_ref().unwrap()) == "canary")
        .count();
    // 5 sigma of a binomial(3000, 0.1): 82 calls.
    let sigma = (n as f64 * 0.1 * 0.9).sqrt();
    let expected = n as f64 * 0.1;
    assert!(
        (to_canary as f64 - expected).abs() <= 5.0 * sigma,
        "{to_canary} of {n} calls reached the canary, expected {expected} +- {:.0}",
        5.0 * sigma
    );
    // 32 calls at a time are streams on a few connections, not a
    // connection each: at most 4 per event loop and upstream.
    let opened = stable.connections.load(Ordering::Relaxed);
    assert!(
        (1..=8).contains(&opened),
        "{opened} connections to stable for {n} calls"
    );
    let text = proxy.metrics().await;
    assert_eq!(
        grpc_calls(&text, "stable", "OK") + grpc_calls(&text, "canary", "OK"),
        n as f64
    );
    proxy.shutdown().await;
}

const ROLLBACK: &str = "target = \"stable\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_failing_every_call_with_internal_is_rolled_back() {
    let stable = grpc_upstream("stable", Behaviour::default()).await;
    // HTTP 200, a message, then grpc-status 13 in the trailers: healthy
    // to anything that reads only the HTTP status.
    let canary = grpc_upstream(
        "canary",
        Behaviour {
            status: 13,
            ..Behaviour::default()
        },
    )
    .await;
    let proxy = TestProxy::start(&h2c_routes(
        &[("stable", stable.addr, 50), ("canary", canary.addr, 50)],
        Some(ROLLBACK),
    ))
    .await;
    let ch = channel(proxy.addr).await;
    let mut internal = 0;
    for _ in 0..200 {
        for answer in calls(&ch, 4, 4).await {
            if let Err(status) = answer {
                assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
                internal += 1;
            }
        }
        if proxy.status().await["versions"][1]["rolled_back"] == true {
            break;
        }
    }
    let status = proxy.status().await;
    let canary_view = &status["versions"][1];
    assert_eq!(canary_view["rolled_back"], true, "never rolled back");
    assert_eq!(canary_view["rollback"]["criterion"], "errors");
    // The default floor is 10 judged calls; at a 100% error rate the
    // judgment needs little more.
    assert!(
        (10..=60).contains(&internal),
        "{internal} INTERNAL answers before the rollback"
    );
    let text = proxy.metrics().await;
    assert_eq!(grpc_calls(&text, "canary", "INTERNAL"), internal as f64);
    // After the rollback every call reaches stable and succeeds.
    let after = calls(&ch, 50, 10).await;
    assert!(after
        .iter()
        .all(|a| a.as_ref().is_ok_and(|t| served_by(t) == "stable")));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_answering_not_found_is_not_rolled_back() {
    let stable = grpc_upstream("stable", Behaviour::default()).await;
    // NOT_FOUND is the client asking for what does not exist: not a fault
    // of the version. Trailers-only, the other shape of a gRPC failure.
    let canary = grpc_upstream(
        "canary",
        Behaviour {
            status: 5,
            trailers_only: true,
            ..Behaviour::default()
        },
    )
    .await;
    let proxy = TestProxy::start(&h2c_routes(
        &[("stable", stable.addr, 50), ("canary", canary.addr, 50)],
        Some(ROLLBACK),
    ))
    .await;
    let ch = channel(proxy.addr).await;
    let answers = calls(&ch, 400, 8).await;
    let not_found = answers
        .iter()
        .filter(|a| matches!(a, Err(s) if s.code() == tonic::Code::NotFound))
        .count();
    assert!(not_found > 100, "only {not_found} calls reached the canary");
    assert_eq!(
        answers.iter().filter(|a| a.is_ok()).count() + not_found,
        400
    );
    let status = proxy.status().await;
    assert_eq!(status["versions"][1]["rolled_back"], false);
    let text = proxy.metrics().await;
    assert_eq!(grpc_calls(&text, "canary", "NOT_FOUND"), not_found as f64);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_sending_goaway_mid_load_fails_no_call() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("canary_proxy=debug")
        .with_test_writer()
        .try_init();
    // Every upstream connection is shut down gracefully after 40 calls, as
    // a pod going away does; calls keep arriving 16 at a time.
    let up = grpc_upstream(
        "stable",
        Behaviour {
            goaway_after: Some(40),
            ..Behaviour::default()
        },
    )
    .await;
    let proxy = TestProxy::start(&h2c_routes(&[("stable", up.addr, 100)], None)).await;
    let ch = channel(proxy.addr).await;
    let n = 2000;
    let answers = calls(&ch, n, 16).await;
    let failed: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} calls failed: {:?}",
        failed.len(),
        failed.first()
    );
    let opened = up.connections.load(Ordering::Relaxed);
    assert!(
        opened >= 10,
        "only {opened} connections: the GOAWAYs did not happen as planned"
    );
    let text = proxy.metrics().await;
    assert_eq!(grpc_calls(&text, "stable", "OK"), n as f64);
    proxy.shutdown().await;
}

/// A gRPC call sent raw, to see the proxy's answer as it is on the wire.
async fn raw_call(addr: SocketAddr, grpc_timeout: Option<&str>) -> Answer {
    let mut req = Request::post(format!("http://{addr}{UNARY}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(t) = grpc_timeout {
        req = req.header("grpc-timeout", t);
    }
    let resp = h2c_client()
        .request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .expect("an answer");
    Answer {
        status: resp.status(),
        headers: resp.headers().clone(),
        body: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_h2_upstream_gives_unavailable_and_the_rollback_retry_applies() {
    let dead = dead_addr().await;
    let proxy = TestProxy::start(&h2c_routes(&[("stable", dead, 100)], None)).await;
    // On the wire: HTTP 200, content-type application/grpc, grpc-status 14.
    let answer = raw_call(proxy.addr, None).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "application/grpc");
    assert_eq!(answer.headers["grpc-status"], "14");
    let message = answer.headers["grpc-message"].to_str().unwrap();
    assert!(message.contains("request id"), "{message}");
    // And as a gRPC client sees it.
    let ch = channel(proxy.addr).await;
    let status = unary(&ch, "x").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(!status.message().contains("502"), "{status:?}");
    proxy.shutdown().await;

    // A dead canary with a rollback target: nothing left the proxy, so
    // each call goes to stable instead, and none fails.
    let stable = grpc_upstream("stable", Behaviour::default()).await;
    let proxy = TestProxy::start(&h2c_routes(
        &[("stable", stable.addr, 50), ("canary", dead, 50)],
        Some(ROLLBACK),
    ))
    .await;
    let ch = channel(proxy.addr).await;
    let answers = calls(&ch, 200, 8).await;
    assert!(
        answers
            .iter()
            .all(|a| a.as_ref().is_ok_and(|t| served_by(t) == "stable")),
        "{:?}",
        answers.iter().find(|a| a.is_err())
    );
    let text = proxy.metrics().await;
    assert!(
        sample(
            &text,
            "canary_proxy_upstream_errors_total",
            &[("version", "canary"), ("kind", "connect")]
        )
        .unwrap_or(0.0)
            > 0.0,
        "no call was sent to the dead canary first: {text}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_bounds_the_wait_for_the_upstream() {
    let slow = grpc_upstream(
        "stable",
        Behaviour {
            delay: Duration::from_secs(3),
            ..Behaviour::default()
        },
    )
    .await;
    let proxy = TestProxy::start(&h2c_routes(&[("stable", slow.addr, 100)], None)).await;
    let started = Instant::now();
    let answer = raw_call(proxy.addr, Some("200m")).await;
    let waited = started.elapsed();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["content-type"], "application/grpc");
    assert_eq!(answer.headers["grpc-status"], "4", "{:?}", answer.headers);
    // Answered at the call's deadline, not the upstream's 3 s (nor the
    // proxy's default upstream timeout).
    assert!(waited < Duration::from_secs(2), "took {waited:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_health_service_answers_through_the_proxy() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    // A real gRPC server (tonic's) as the upstream.
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("demo", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let proxy = TestProxy::start(&h2c_routes(&[("stable", addr, 100)], None)).await;
    let mut health = HealthClient::new(channel(proxy.addr).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    let answer = health.check(check("demo")).await.expect("Check answers");
    assert_eq!(answer.get_ref().status(), ServingStatus::Serving);
    // An unknown service is NOT_FOUND: the client's mistake.
    let unknown = health.check(check("nope")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    // Watch streams: the first status, then a change as it happens.
    let mut watch = health.watch(check("demo")).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);
    reporter
        .set_service_status("demo", tonic_health::ServingStatus::NotServing)
        .await;
    let next = watch.message().await.unwrap().unwrap();
    assert_eq!(next.status(), ServingStatus::NotServing);
    drop(watch);
    let text = proxy.metrics().await;
    assert_eq!(grpc_calls(&text, "stable", "OK"), 1.0);
    assert_eq!(grpc_calls(&text, "stable", "NOT_FOUND"), 1.0);
    proxy.shutdown().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_reaches_ping_backend_over_h2c_on_few_connections() {
    // Not gRPC: any request to an h2c version goes as an HTTP/2 stream.
    // ping-backend serves HTTP/1.1 and h2c on one port.
    let backend = backend("v1", 0.0, Duration::from_millis(20)).await;
    let proxy = TestProxy::start(&h2c_routes(&[("stable", backend.addr(), 100)], None)).await;
    let c = client();
    let answers =
        futures_util::future::join_all((0..64).map(|_| get(&c, proxy.addr, "/ping"))).await;
    for a in &answers {
        let a = a.as_ref().expect("an answer");
        assert_eq!(
            (a.status, a.body.as_str(), a.version()),
            (StatusCode::OK, "pong", "v1")
        );
    }
    // 64 requests at once, each 20 ms long: over HTTP/1.1 that is about
    // 64 connections; as streams, at most 4 per event loop.
    let text = proxy.metrics().await;
    let opened = by_version(
        &text,
        "canary_proxy_upstream_connections_opened_total",
        "stable",
    )
    .expect("the metric");
    assert!(
        (1.0..=8.0).contains(&opened),
        "{opened} connections for 64 requests"
    );
    proxy.shutdown().await;
}
