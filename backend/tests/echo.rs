//! POST /echo streams the request body back, against a real backend.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{channel_body, client, BoxError};
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use ping_backend::{spawn, Config};
use sha2::{Digest, Sha256};

fn config() -> Config {
    Config {
        drain_delay: Duration::ZERO,
        ..Config::default()
    }
}

fn echo_request(addr: std::net::SocketAddr, body: common::TestBody) -> Request<common::TestBody> {
    Request::builder()
        .method("POST")
        .uri(format!("http://{addr}/echo"))
        .body(body)
        .unwrap()
}

#[tokio::test]
async fn echo_returns_a_50_mb_body_unchanged() {
    const CHUNK: usize = 64 * 1024;
    const TOTAL: usize = 50 * 1024 * 1024;
    let backend = spawn("127.0.0.1:0", config()).await.unwrap();

    // The client streams pseudo-random chunks (so a dropped or reordered chunk
    // changes the hash) and hashes what it sent as it goes.
    let (tx, body) = channel_body(4);
    let sender = tokio::spawn(async move {
        let mut rng = fastrand::Rng::with_seed(50);
        let mut sent = Sha256::new();
        let mut chunk = vec![0u8; CHUNK];
        for _ in 0..TOTAL / CHUNK {
            rng.fill(&mut chunk);
            sent.update(&chunk);
            if tx.send(Bytes::copy_from_slice(&chunk)).await.is_err() {
                break;
            }
        }
        sent.finalize()
    });

    let response = client()
        .request(echo_request(backend.addr(), body))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = Sha256::new();
    let mut received_len = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received_len += data.len();
            received.update(&data);
        }
    }
    let sent = sender.await.unwrap();
    assert_eq!(received_len, TOTAL);
    assert_eq!(
        received.finalize(),
        sent,
        "the echoed body differs from the one sent"
    );
    backend.shutdown().await.unwrap();
}

#[tokio::test]
async fn echo_answers_each_chunk_before_the_body_ends() {
    // If the backend collected the body before answering, the first chunk would
    // never come back while the request is still open; the deadline turns that
    // hang into a failure.
    let backend = spawn("127.0.0.1:0", config()).await.unwrap();
    let (tx, body) = channel_body(1);
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client().request(echo_request(backend.addr(), body)),
    )
    .await
    .expect("no response head while the request body was still open")
    .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();

    let mut next_chunk = async || -> Result<Option<Bytes>, BoxError> {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .map_err(|_| "no echo of the chunk while the request body was still open")?;
        Ok(match frame {
            Some(frame) => Some(frame?.into_data().map_err(|_| "a trailers frame")?),
            None => None,
        })
    };
    assert_eq!(next_chunk().await.unwrap().as_deref(), Some(&b"first"[..]));
    tx.send(Bytes::from_static(b"second")).await.unwrap();
    assert_eq!(next_chunk().await.unwrap().as_deref(), Some(&b"second"[..]));
    drop(tx);
    assert_eq!(
        next_chunk().await.unwrap(),
        None,
        "the echo must end with the request body"
    );
    backend.shutdown().await.unwrap();
}
