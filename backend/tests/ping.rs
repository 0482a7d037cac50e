//! The endpoints, against a real backend on 127.0.0.1:0.

mod common;

use std::time::{Duration, Instant};

use common::{client, get, h2c_client, request};
use http::{StatusCode, Version};
use ping_backend::{spawn, Config};

const ERROR_BODY: &str = "pong...BUT NOW WITH ERROR";

fn config() -> Config {
    Config {
        drain_delay: Duration::ZERO,
        ..Config::default()
    }
}

#[tokio::test]
async fn ping_answers_pong_with_the_version_header() {
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            version: "v2-canary".into(),
            ..config()
        },
    )
    .await
    .unwrap();
    let answer = get(&client(), backend.addr(), "/ping").await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "pong");
    assert_eq!(answer.headers["x-ping-version"], "v2-canary");
    backend.shutdown().await.unwrap();
}

#[tokio::test]
async fn ping_over_h2c() {
    let backend = spawn("127.0.0.1:0", config()).await.unwrap();
    let req = http::Request::builder()
        .uri(format!("http://{}/ping", backend.addr()))
        .body(common::empty())
        .unwrap();
    let response = h2c_client().request(req).await.unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-ping-version"], "v1");
    backend.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_unknown_paths() {
    let backend = spawn("127.0.0.1:0", config()).await.unwrap();
    let client = client();
    let addr = backend.addr();
    assert_eq!(
        get(&client, addr, "/healthz").await.unwrap().status,
        StatusCode::OK
    );
    assert_eq!(
        get(&client, addr, "/readyz").await.unwrap().status,
        StatusCode::OK
    );
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/pong"),
        ("POST", "/ping"),
        ("GET", "/echo"),
    ] {
        let answer = request(&client, method, addr, path).await.unwrap();
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    backend.shutdown().await.unwrap();
}

#[tokio::test]
async fn error_rate_one_fails_every_ping() {
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            error_rate: 1.0,
            version: "v3".into(),
            ..config()
        },
    )
    .await
    .unwrap();
    let client = client();
    for _ in 0..200 {
        let answer = get(&client, backend.addr(), "/ping").await.unwrap();
        assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(answer.body, ERROR_BODY);
        assert_eq!(answer.headers["x-ping-version"], "v3");
    }
    // The error rate is for /ping only: the probes stay healthy.
    assert_eq!(
        get(&client, backend.addr(), "/readyz")
            .await
            .unwrap()
            .status,
        StatusCode::OK
    );
    backend.shutdown().await.unwrap();
}

#[tokio::test]
async fn error_rate_a_quarter_fails_about_a_quarter() {
    // Each /ping fails independently with p = 0.25, so the failures among n = 4000
    // follow Binomial(n, p): mean n p = 1000, standard deviation
    // sqrt(n p (1 - p)) = sqrt(750) ~ 27.4. Accepting mean +- 5 sd (+-137) makes a
    // false alarm less likely than 1 in a million, while a backend that ignores
    // the rate (0 or 4000 failures) or gets it wrong by 0.05 (+-200) still fails.
    const N: u32 = 4000;
    const P: f64 = 0.25;
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            error_rate: P,
            ..config()
        },
    )
    .await
    .unwrap();
    let client = client();
    let mut failures = 0u32;
    for _ in 0..N {
        let answer = get(&client, backend.addr(), "/ping").await.unwrap();
        match answer.status {
            StatusCode::OK => assert_eq!(answer.body, "pong"),
            StatusCode::INTERNAL_SERVER_ERROR => {
                assert_eq!(answer.body, ERROR_BODY);
                failures += 1;
            }
            other => panic!("unexpected status {other}"),
        }
        assert_eq!(answer.headers["x-ping-version"], "v1");
    }
    let n = f64::from(N);
    let mean = n * P;
    let tolerance = 5.0 * (n * P * (1.0 - P)).sqrt();
    assert!(
        (f64::from(failures) - mean).abs() <= tolerance,
        "{failures} failures out of {N}, expected {mean} +- {tolerance:.0}"
    );
    backend.shutdown().await.unwrap();
}

#[tokio::test]
async fn latency_delays_each_ping() {
    let latency = Duration::from_millis(200);
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            latency,
            ..config()
        },
    )
    .await
    .unwrap();
    let client = client();
    // Lower bounds only: how much longer a request takes depends on the machine.
    for _ in 0..3 {
        let start = Instant::now();
        let answer = get(&client, backend.addr(), "/ping").await.unwrap();
        let took = start.elapsed();
        assert_eq!(answer.body, "pong");
        assert!(
            took >= latency,
            "a /ping took {took:?}, less than the {latency:?} latency"
        );
    }
    backend.shutdown().await.unwrap();
}

#[tokio::test]
async fn serve_refuses_a_version_that_is_no_header_value() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = Config {
        version: "v1\nx-injected: yes".into(),
        ..config()
    };
    let err = ping_backend::serve(listener, config, std::future::pending())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("version"), "{err}");
}

#[tokio::test]
async fn upload_reads_the_whole_body_then_answers_like_ping() {
    use http_body_util::{BodyExt, Full};
    let backend = spawn(
        "127.0.0.1:0",
        Config {
            version: "v7".into(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(5),
        },
    )
    .await
    .unwrap();
    let body = Full::new(bytes::Bytes::from(vec![b'x'; 256 * 1024]))
        .map_err(|never| match never {})
        .boxed();
    let req = http::Request::post(format!("http://{}/upload", backend.addr()))
        .body(body)
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-ping-version"], "v7");
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&text[..], b"pong");
    backend.shutdown().await.unwrap();
}
