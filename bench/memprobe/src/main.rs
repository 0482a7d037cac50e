//! `memprobe PORT VARIANT`: a minimal hyper server answering `pong`, set up
//! the way canary-proxy's `server` module is (`auto`) or with one change at a
//! time, so `run` can measure what each costs per idle connection.
//!
//! - `auto`: hyper-util's auto builder (h1 + h2c sniffing), header read
//!   timeout, graceful watcher: what `server.rs` does.
//! - `auto-bigfut`: the same with a service future of about 4 KiB, like a
//!   large `async fn handle`; hyper keeps a `Box<Option<S::Future>>` of that
//!   size for every connection, idle or not.
//! - `auto-bigfut-boxed`: the same future, boxed inside the service (the
//!   per-connection slot is then one pointer).
//! - `h1`: hyper's HTTP/1 builder directly (no auto sniffing), timer and
//!   header read timeout, graceful watcher.
//! - `h1-notimer`: HTTP/1 builder with nothing else.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

type Answer = Result<Response<Full<Bytes>>, Infallible>;

async fn pong(_r: Request<hyper::body::Incoming>) -> Answer {
    Ok(Response::new(Full::new(Bytes::from_static(b"pong"))))
}

async fn bigfut(r: Request<hyper::body::Incoming>) -> Answer {
    let scratch = [1u8; 4096]; // lives across the await: part of the future
    tokio::task::yield_now().await;
    let n = std::hint::black_box(&scratch)[r.uri().path().len() % 4096] as usize;
    Ok(Response::new(Full::new(Bytes::from_static(
        &b"pongpong"[..4 + n % 4],
    ))))
}

fn auto_builder() -> hyper_util::server::conn::auto::Builder<TokioExecutor> {
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    b.http2().timer(TokioTimer::new());
    b
}

fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args
        .next()
        .and_then(|p| p.parse().ok())
        .expect("usage: memprobe PORT VARIANT");
    let variant = args.next().expect("usage: memprobe PORT VARIANT");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        loop {
            let (s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let io = TokioIo::new(s);
            let w = graceful.watcher();
            match variant.as_str() {
                "auto" => {
                    tokio::spawn(async move {
                        let c = auto_builder()
                            .serve_connection_with_upgrades(io, service_fn(pong))
                            .into_owned();
                        let _ = w.watch(c).await;
                    });
                }
                "auto-bigfut" => {
                    tokio::spawn(async move {
                        let c = auto_builder()
                            .serve_connection_with_upgrades(io, service_fn(bigfut))
                            .into_owned();
                        let _ = w.watch(c).await;
                    });
                }
                "auto-bigfut-boxed" => {
                    tokio::spawn(async move {
                        let svc = service_fn(|r| {
                            Box::pin(bigfut(r)) as Pin<Box<dyn Future<Output = Answer> + Send>>
                        });
                        let c = auto_builder()
                            .serve_connection_with_upgrades(io, svc)
                            .into_owned();
                        let _ = w.watch(c).await;
                    });
                }
                "h1" => {
                    tokio::spawn(async move {
                        let c = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(Duration::from_secs(10))
                            .serve_connection(io, service_fn(pong));
                        let _ = w.watch(c).await;
                    });
                }
                "h1-notimer" => {
                    drop(w);
                    tokio::spawn(async move {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service_fn(pong))
                            .await;
                    });
                }
                other => panic!("unknown variant {other}"),
            }
        }
    });
}
