//! HTTPS through the proxy with certificates made at test time (rcgen):
//! split and pong over h2 and HTTP/1.1, ALPN seen from the client side,
//! rotation through a kubelet-style Secret swap with no failed connection,
//! a bad pair keeping the old certificate, refused plaintext and protocol
//! mismatches, the handshake timeout, fatal start-up errors, and gRPC over
//! the TLS front door to an h2c upstream.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use canary_proxy::TlsConfig;
use canary_proxy::{Listeners, Proxy, RunConfig};
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Offered ALPN protocols, the selection expected from the client's side,
/// and the HTTP version the answers come in.
type AlpnCase = (&'static [&'static [u8]], Option<&'static [u8]>, Version);

/// A test CA and the leaf certificates it issues for `localhost`.
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// One issued pair, PEM, as a `kubernetes.io/tls` Secret holds it.
struct Leaf {
    cert: String,
    key: String,
    /// notAfter in Unix seconds (Jan 1st of 2030 + serial).
    not_after: i64,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "canary-proxy test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        Pki {
            ca: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A leaf with serial `serial`, subject CN `gen-<serial>`.
    fn issue(&self, serial: u64) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("gen-{serial}"));
        params.serial_number = Some(SerialNumber::from(serial));
        let year = 2030 + serial as i32;
        params.not_after = rcgen::date_time_ymd(year, 1, 1);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let not_after = params.not_after.unix_timestamp();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
            not_after,
        }
    }
}

fn secret_files(leaf: &Leaf) -> [(&'static str, &[u8]); 2] {
    [
        ("tls.crt", leaf.cert.as_bytes()),
        ("tls.key", leaf.key.as_bytes()),
    ]
}

/// A proxy in this process with a plain and an HTTPS listener, its
/// certificate in a kubelet-style Secret directory.
struct TlsProxy {
    https: SocketAddr,
    plain: SocketAddr,
    admin: SocketAddr,
    secret: ConfigMapDir,
    _routes: ConfigMapDir,
    proxy: Option<Proxy>,
}

impl TlsProxy {
    async fn start(routes: &str, leaf: &Leaf, tune: impl FnOnce(&mut TlsConfig)) -> TlsProxy {
        let routes_dir = ConfigMapDir::new(&[("routes.toml", routes.as_bytes())]);
        let secret = ConfigMapDir::new(&secret_files(leaf));
        let mut config = RunConfig::new(routes_dir.path("routes.toml"));
        config.drain_delay = Duration::ZERO;
        config.shutdown_timeout = Duration::from_secs(5);
        let mut tls = TlsConfig::new(secret.path("tls.crt"), secret.path("tls.key"));
        tune(&mut tls);
        config.tls = Some(tls);
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let listeners = Listeners {
            traffic: Some(bind().await.unwrap()),
            admin: bind().await.unwrap(),
            tls: Some(bind().await.unwrap()),
        };
        let proxy = Proxy::start(config, listeners).await.expect("proxy starts");
        TlsProxy {
            https: proxy.tls_addr().unwrap(),
            plain: proxy.traffic_addr().unwrap(),
            admin: proxy.admin_addr(),
            secret,
            _routes: routes_dir,
            proxy: Some(proxy),
        }
    }

    fn rotate(&mut self, files: &[(&str, &[u8])]) {
        self.secret.update(files);
    }

    async fn tls_reloads(&self, result: &str) -> f64 {
        sample(
            &metrics(self.admin).await,
            "canary_proxy_tls_reloads_total",
            &[("result", result)],
        )
        .expect("tls reload counter exported")
    }

    async fn last_reload_ok(&self) -> f64 {
        sample(
            &metrics(self.admin).await,
            "canary_proxy_tls_last_reload_successful",
            &[],
        )
        .expect("last reload gauge exported")
    }

    async fn expiry(&self) -> f64 {
        sample(
            &metrics(self.admin).await,
            "canary_proxy_tls_cert_expiry_timestamp_seconds",
            &[],
        )
        .expect("expiry gauge exported")
    }

    async fn shutdown(mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
    }
}

fn client_config(ca: &CertificateDer<'static>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    let mut config =
        rustls::ClientConfig::builder_with_provider(canary_proxy::tls_crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

/// One client connection over TLS, speaking what ALPN chose.
struct Conn {
    /// The protocol the server selected, as the client saw it.
    alpn: Option<Vec<u8>>,
    /// Serial number of the certificate the server presented.
    serial: u64,
    subject: String,
    /// Whether the TLS session was resumed from an earlier one.
    resumed: bool,
    sender: Sender,
}

fn describe(der: &[u8]) -> (u64, String) {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).expect("the server's certificate parses");
    let serial = cert.serial.to_u64_digits().first().copied().unwrap_or(0);
    (serial, cert.subject().to_string())
}

async fn connect(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<Conn, BoxError> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let session = tls.get_ref().1;
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (serial, subject) =
        describe(session.peer_certificates().ok_or("no peer certificate")?[0].as_ref());
    let io = TokioIo::new(tls);
    let sender = if alpn.as_deref() == Some(b"h2") {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        Sender::H1(s)
    };
    Ok(Conn {
        alpn,
        serial,
        subject,
        resumed,
        sender,
    })
}

impl Conn {
    /// GET /ping on this connection: the answer and the HTTP version of it.
    async fn ping(&mut self) -> Result<(Answer, Version), BoxError> {
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(
                    Request::get("/ping")
                        .header(http::header::HOST, "localhost")
                        .body(Empty::new())?,
                )
                .await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(Request::get("https://localhost/ping").body(Empty::new())?)
                    .await?
            }
        };
        let version = resp.version();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((
            Answer {
                status: parts.status,
                headers: parts.headers,
                body: String::from_utf8_lossy(&body).into_owned(),
            },
            version,
        ))
    }
}

/// A new connection and one /ping on it; returns the server's serial.
async fn ping_once(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Result<u64, BoxError> {
    let mut conn = connect(addr, config).await?;
    let (a, _) = conn.ping().await?;
    if a.status != StatusCode::OK || a.body != "pong" {
        return Err(format!("unexpected answer {a:?}").into());
    }
    Ok(conn.serial)
}

/// The serial that a new connection sees now.
async fn serial_now(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> u64 {
    connect(addr, config.clone())
        .await
        .expect("a new TLS connection succeeds")
        .serial
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_over_h2_and_http1_gets_pong_from_both_versions() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let pki = Pki::new();
    let leaf = pki.issue(1);
    let proxy = TlsProxy::start(
        &routes(
            &[("stable", stable.addr(), 50), ("canary", canary.addr(), 50)],
            None,
        ),
        &leaf,
        |_| {},
    )
    .await;

    let cases: [AlpnCase; 4] = [
        (BOTH, Some(b"h2"), Version::HTTP_2),
        (&[b"http/1.1", b"h2"], Some(b"h2"), Version::HTTP_2), // the server's preference wins
        (&[b"http/1.1"], Some(b"http/1.1"), Version::HTTP_11),
        (&[], None, Version::HTTP_11), // no ALPN at all: HTTP/1.1
    ];
    for (offered, selected, version) in cases {
        let mut conn = connect(proxy.https, client_config(&pki.ca_der(), offered))
            .await
            .unwrap();
        assert_eq!(
            conn.alpn.as_deref(),
            selected,
            "ALPN selection for {offered:?}"
        );
        assert_eq!((conn.serial, conn.subject.as_str()), (1, "CN=gen-1"));
        // 40 requests on one connection at 50/50: both versions show up
        // unless one is missed 40 times, probability 2 * 0.5^40 ~ 2e-12.
        let mut seen = BTreeSet::new();
        for _ in 0..40 {
            let (a, v) = conn.ping().await.unwrap();
            assert_eq!(
                (a.status, a.body.as_str(), v),
                (StatusCode::OK, "pong", version)
            );
            seen.insert(a.version().to_owned());
        }
        assert_eq!(
            seen,
            BTreeSet::from(["v1".to_owned(), "v2".to_owned()]),
            "both versions answered over {selected:?}"
        );
    }
    // The plain listener still serves beside the HTTPS one.
    let a = get(&client(), proxy.plain, "/ping").await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (StatusCode::OK, "pong"));
    // HTTPS requests are observed like plain ones.
    let text = metrics(proxy.admin).await;
    let answered: f64 = ["stable", "canary"]
        .iter()
        .map(|v| {
            sample(
                &text,
                "canary_proxy_requests_total",
                &[("version", v), ("code", "200")],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(answered, 161.0, "160 HTTPS + 1 plain requests counted");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_by_kubelet_swap_reaches_new_connections_and_fails_none() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let pki = Pki::new();
    let (gen1, gen2) = (pki.issue(1), pki.issue(2));
    let mut proxy = TlsProxy::start(
        &routes(&[("stable", stable.addr(), 100)], None),
        &gen1,
        |_| {},
    )
    .await;
    let config = client_config(&pki.ca_der(), BOTH);
    assert_eq!(proxy.expiry().await, gen1.not_after as f64);
    let mut existing = connect(proxy.https, config.clone()).await.unwrap();
    assert_eq!(existing.serial, 1);
    // The client caches sessions (rustls' default), as browsers do: the
    // checks below also prove that a session made under the old certificate
    // is not resumed after the rotation.
    let resumed = eventually(
        Duration::from_secs(5),
        "the client to resume a session",
        || async {
            connect(proxy.https, config.clone())
                .await
                .ok()
                .filter(|c| c.resumed)
        },
    )
    .await;
    assert_eq!(resumed.serial, 1);

    // New connections in a loop on 4 tasks, each bounded in count and time,
    // spanning the swap: every one must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let saw_new = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let deadline = Instant::now() + Duration::from_secs(30);
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (stop, done, saw_new, failures, config) = (
                stop.clone(),
                done.clone(),
                saw_new.clone(),
                failures.clone(),
                config.clone(),
            );
            let addr = proxy.https;
            tokio::spawn(async move {
                for _ in 0..5_000 {
                    if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                        break;
                    }
                    match ping_once(addr, config.clone()).await {
                        Ok(2) => saw_new.store(true, Ordering::Relaxed),
                        Ok(_) => {}
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "connections before the swap",
        || async { (done.load(Ordering::Relaxed) >= 20).then_some(()) },
    )
    .await;

    proxy.rotate(&secret_files(&gen2));
    eventually(
        Duration::from_secs(5),
        "a new connection to present the rotated certificate",
        || async { (serial_now(proxy.https, &config).await == 2).then_some(()) },
    )
    .await;
    let after_swap = done.load(Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "the workers to run on past the swap",
        || async {
            (saw_new.load(Ordering::Relaxed) && done.load(Ordering::Relaxed) >= after_swap + 20)
                .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed around the swap, first: {:?}",
        failures.len(),
        done.load(Ordering::Relaxed),
        failures.first()
    );

    // The connection made before the swap keeps its session and is served.
    let (a, v) = existing.ping().await.unwrap();
    assert_eq!(
        (a.status, v, existing.serial),
        (StatusCode::OK, Version::HTTP_2, 1)
    );
    let c = connect(proxy.https, config.clone()).await.unwrap();
    assert_eq!((c.serial, c.subject.as_str()), (2, "CN=gen-2"));
    assert_eq!(proxy.tls_reloads("success").await, 1.0);
    assert_eq!(proxy.tls_reloads("failure").await, 0.0);
    assert_eq!(proxy.expiry().await, gen2.not_after as f64);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_pair_keeps_the_old_certificate_and_is_counted() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let pki = Pki::new();
    let (gen1, gen2, gen3, gen4) = (pki.issue(1), pki.issue(2), pki.issue(3), pki.issue(4));
    let mut proxy = TlsProxy::start(
        &routes(&[("stable", stable.addr(), 100)], None),
        &gen1,
        |_| {},
    )
    .await;
    let config = client_config(&pki.ca_der(), BOTH);
    assert_eq!(
        proxy.tls_reloads("failure").await,
        0.0,
        "both results are exported from the start"
    );
    assert_eq!(proxy.last_reload_ok().await, 1.0);

    // A certificate with someone else's key.
    proxy.rotate(&[
        ("tls.crt", gen2.cert.as_bytes()),
        ("tls.key", gen3.key.as_bytes()),
    ]);
    eventually(
        Duration::from_secs(5),
        "the mismatched pair to be counted as a failure",
        || async { (proxy.tls_reloads("failure").await == 1.0).then_some(()) },
    )
    .await;
    assert_eq!(
        ping_once(proxy.https, config.clone()).await.unwrap(),
        1,
        "still the old certificate"
    );

    // Garbage in both files.
    proxy.rotate(&[("tls.crt", b"not a certificate"), ("tls.key", b"not a key")]);
    eventually(
        Duration::from_secs(5),
        "the garbage pair to be counted as a failure",
        || async { (proxy.tls_reloads("failure").await == 2.0).then_some(()) },
    )
    .await;
    assert_eq!(
        ping_once(proxy.https, config.clone()).await.unwrap(),
        1,
        "still the old certificate"
    );
    assert_eq!(proxy.tls_reloads("success").await, 0.0);
    assert_eq!(proxy.last_reload_ok().await, 0.0, "the last reload failed");
    assert_eq!(
        proxy.expiry().await,
        gen1.not_after as f64,
        "the gauge tracks the served certificate"
    );

    // A good pair afterwards is taken.
    proxy.rotate(&secret_files(&gen4));
    eventually(
        Duration::from_secs(5),
        "the good pair to be served",
        || async { (serial_now(proxy.https, &config).await == 4).then_some(()) },
    )
    .await;
    assert_eq!(proxy.tls_reloads("success").await, 1.0);
    assert_eq!(proxy.last_reload_ok().await, 1.0);
    assert_eq!(proxy.expiry().await, gen4.not_after as f64);
    proxy.shutdown().await;
}

/// Read until the server closes (EOF or reset), at most `limit`; returns
/// the bytes received. Panics if the connection is still open after it.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_protocol_mismatch_are_refused_without_harm_to_others() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let pki = Pki::new();
    let proxy = TlsProxy::start(
        &routes(&[("stable", stable.addr(), 100)], None),
        &pki.issue(1),
        |_| {},
    )
    .await;
    let config = client_config(&pki.ca_der(), BOTH);
    // A connection open before the bad clients, used again after them.
    let mut open = connect(proxy.https, config.clone()).await.unwrap();

    let mut plain = TcpStream::connect(proxy.https).await.unwrap();
    plain
        .write_all(b"GET /ping HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let got = read_until_closed(&mut plain, Duration::from_secs(10)).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "plaintext HTTP got an HTTP answer: {:?}",
        String::from_utf8_lossy(&got)
    );

    let err = connect(proxy.https, client_config(&pki.ca_der(), &[b"spdy/3.1"]))
        .await
        .err()
        .expect("no common ALPN protocol: refused");
    assert!(
        format!("{err:?}").contains("NoApplicationProtocol"),
        "refused with no_application_protocol: {err:?}"
    );

    assert_eq!(
        open.ping().await.unwrap().0.status,
        StatusCode::OK,
        "the open connection is unaffected"
    );
    assert_eq!(
        ping_once(proxy.https, config).await.unwrap(),
        1,
        "new HTTPS connections are served"
    );
    assert_eq!(
        get(&client(), proxy.plain, "/ping").await.unwrap().status,
        StatusCode::OK
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_dropped_after_the_timeout_while_others_are_served() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let pki = Pki::new();
    let timeout = Duration::from_millis(200);
    let proxy = TlsProxy::start(
        &routes(&[("stable", stable.addr(), 100)], None),
        &pki.issue(1),
        |t| t.handshake_timeout = timeout,
    )
    .await;
    let config = client_config(&pki.ca_der(), BOTH);

    // One client sends nothing, one stops inside its first TLS record.
    let started = Instant::now();
    let mut silent = TcpStream::connect(proxy.https).await.unwrap();
    let mut partial = TcpStream::connect(proxy.https).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01])
        .await
        .unwrap();
    // Others are served meanwhile.
    for _ in 0..5 {
        assert_eq!(ping_once(proxy.https, config.clone()).await.unwrap(), 1);
    }
    for (name, stream) in [("silent", &mut silent), ("partial", &mut partial)] {
        let got = read_until_closed(stream, Duration::from_secs(10)).await;
        assert!(
            started.elapsed() >= timeout,
            "{name} client dropped before the timeout"
        );
        assert!(!got.starts_with(b"HTTP/"), "{name}: {got:?}");
    }
    assert_eq!(ping_once(proxy.https, config).await.unwrap(), 1);
    proxy.shutdown().await;
}

// The binary: flags, fatal start-up errors naming the file, HTTPS only.

fn routes_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let path = dir.path().join("routes.toml");
    std::fs::write(
        &path,
        routes(&[("stable", "127.0.0.1:9".parse().unwrap(), 100)], None),
    )
    .unwrap();
    path
}

#[test]
fn a_missing_routes_file_at_start_up_is_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("routes.toml");
    let (code, err) = start_up_failure(&[
        "--listen",
        "127.0.0.1:0",
        "--admin-listen",
        "127.0.0.1:0",
        "--routes",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot read routes file {}", missing.display()))
            && err.contains("no last good routes table"),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
    assert_eq!(err.matches("cannot read routes file").count(), 1, "{err}");
}

/// Run to exit (bounded); returns (exit code, stderr).
fn start_up_failure(args: &[&str]) -> (Option<i32>, String) {
    let (status, stderr) = Process::run_to_exit(&mut proxy_command(args), Duration::from_secs(20));
    (status.code(), stderr)
}

#[test]
fn start_up_with_a_bad_certificate_or_key_fails_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let routes = routes_file(&dir);
    let pki = Pki::new();
    let (a, b) = (pki.issue(1), pki.issue(2));
    let path = |name: &str, content: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_owned()
    };
    let (cert, key, other_key, garbage) = (
        path("tls.crt", &a.cert),
        path("tls.key", &a.key),
        path("other.key", &b.key),
        path("garbage.pem", "hello"),
    );
    let missing = dir.path().join("missing.crt").to_str().unwrap().to_owned();
    let run = |cert: &str, key: &str| {
        start_up_failure(&[
            "--listen",
            "none",
            "--admin-listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--routes",
            routes.to_str().unwrap(),
            "--tls-cert",
            cert,
            "--tls-key",
            key,
        ])
    };

    let (code, err) = run(&missing, &key);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{missing}: cannot read the TLS certificate")),
        "{err}"
    );
    // The cause is said once, not once per layer of the error chain.
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");

    let (code, err) = run(&cert, &other_key);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "the private key in {other_key} does not belong to the certificate in {cert}"
        )),
        "{err}"
    );

    let (code, err) = run(&cert, &garbage);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{garbage}: no private key found")),
        "{err}"
    );

    let (code, err) = run(&garbage, &key);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("{garbage}: no certificate found")),
        "{err}"
    );

    // Incomplete flags, and no listener at all.
    let (code, err) = start_up_failure(&[
        "--listen",
        "none",
        "--admin-listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
        "--tls-listen",
        "127.0.0.1:0",
        "--tls-cert",
        &cert,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("missing: --tls-key PATH"), "{err}");
    let (code, err) = start_up_failure(&[
        "--listen",
        "none",
        "--admin-listen",
        "127.0.0.1:0",
        "--routes",
        routes.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("give --listen or --tls-listen an address"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_https_only_from_its_flags() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let routes_path = dir.path().join("routes.toml");
    std::fs::write(
        &routes_path,
        routes(&[("stable", stable.addr(), 100)], None),
    )
    .unwrap();
    let pki = Pki::new();
    let leaf = pki.issue(7);
    std::fs::write(dir.path().join("tls.crt"), &leaf.cert).unwrap();
    std::fs::write(dir.path().join("tls.key"), &leaf.key).unwrap();
    // HTTPS only (`--listen none`), the TLS flags given through their
    // environment variables.
    let mut proxy = ProxyProcess::start(
        proxy_command(&[
            "--listen",
            "none",
            "--drain-delay",
            "0s",
            "--routes",
            routes_path.to_str().unwrap(),
        ])
        .env("CANARY_PROXY_TLS_LISTEN", "127.0.0.1:0")
        .env("CANARY_PROXY_TLS_CERT", dir.path().join("tls.crt"))
        .env("CANARY_PROXY_TLS_KEY", dir.path().join("tls.key")),
    );
    assert_eq!(
        proxy.listening.get("traffic"),
        None,
        "--listen none: no plain listener; log: {:#?}",
        proxy.child.stderr_lines()
    );
    let addr = proxy.https();
    let mut conn = connect(addr, client_config(&pki.ca_der(), BOTH))
        .await
        .unwrap();
    assert_eq!((conn.alpn.as_deref(), conn.serial), (Some(&b"h2"[..]), 7));
    let (a, _) = conn.ping().await.unwrap();
    assert_eq!(
        (a.status, a.body.as_str(), a.version()),
        (StatusCode::OK, "pong", "v1")
    );
    proxy.child.signal("TERM");
    assert!(proxy.child.wait_exit(Duration::from_secs(20)).success());
    let log = proxy.child.stderr_lines();
    assert!(
        !log.iter().any(|l| l.contains("serving traffic")),
        "--listen none: no plain listener; log: {log:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_with_alpn_h2_reaches_an_h2c_upstream() {
    use common::grpc::*;
    let up = grpc_upstream("stable", Behaviour::default()).await;
    let pki = Pki::new();
    let leaf = pki.issue(1);
    let proxy = TlsProxy::start(
        &h2c_routes(&[("stable", up.addr, 100)], None),
        &leaf,
        |_| {},
    )
    .await;
    let ch = tls_channel(proxy.https, client_config(&pki.ca_der(), &[b"h2"])).await;
    let answer = unary(&ch, "over tls").await.expect("a unary call over TLS");
    assert_eq!(answer.get_ref().text, "stable:over tls");
    assert_eq!(answer.metadata().get("x-served-by").unwrap(), "stable");
    let mut bidi = Bidi::open(&ch)
        .await
        .expect("a bidirectional call over TLS");
    for word in ["one", "two"] {
        assert_eq!(bidi.say(word).await.unwrap(), format!("stable:{word}"));
    }
    let trailers = bidi.close().await.unwrap();
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    assert_eq!(trailers.get("x-served-by").unwrap(), "stable");
    let text = metrics(proxy.admin).await;
    assert_eq!(
        sample(
            &text,
            "canary_proxy_grpc_requests_total",
            &[("version", "stable"), ("grpc_status", "OK")]
        ),
        Some(2.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sticky_cookie_is_secure_on_https_only() {
    let stable = backend("v1", 0.0, Duration::ZERO).await;
    let canary = backend("v2", 0.0, Duration::ZERO).await;
    let pki = Pki::new();
    let leaf = pki.issue(1);
    let proxy = TlsProxy::start(
        &(routes(
            &[("stable", stable.addr(), 50), ("canary", canary.addr(), 50)],
            None,
        ) + "\n[sticky]\ncookie = \"canary-key\"\nset_cookie = true\n"),
        &leaf,
        |_| {},
    )
    .await;
    let http1: &[&[u8]] = &[b"http/1.1"];
    for offered in [BOTH, http1] {
        let mut conn = connect(proxy.https, client_config(&pki.ca_der(), offered))
            .await
            .unwrap();
        let (a, _) = conn.ping().await.unwrap();
        let cookie = a.headers["set-cookie"].to_str().unwrap();
        assert!(
            cookie.split(';').any(|attr| attr.trim() == "Secure"),
            "no Secure over HTTPS: {cookie}"
        );
    }
    let plain = get(&client(), proxy.plain, "/ping").await.unwrap();
    let cookie = plain.headers["set-cookie"].to_str().unwrap();
    assert!(
        !cookie.contains("Secure"),
        "Secure over plain HTTP: {cookie}"
    );
    proxy.shutdown().await;
}
