//! Helpers shared by the proxy's integration tests: real ping backends and a
//! real proxy on 127.0.0.1:0, a kubelet ConfigMap simulator, an HTTP client,
//! metric scraping, polling with a deadline, and the real binary as a child
//! process (through `ping_backend::testkit`, shared with the backend's tests).
// Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use canary_proxy::{Listeners, Proxy, RunConfig};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
pub use ping_backend::testkit::{Listening, Process};

pub mod dns;
pub mod grpc;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestClient = Client<HttpConnector, Empty<Bytes>>;

/// A pooled HTTP/1.1 client, as a load balancer's keep-alive clients are.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// An h2c client (HTTP/2 with prior knowledge).
pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Answer {
    /// Which ping backend answered (`x-ping-version`), or "" for the proxy.
    pub fn version(&self) -> &str {
        self.headers
            .get("x-ping-version")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

pub async fn get(client: &TestClient, addr: SocketAddr, path: &str) -> Result<Answer, BoxError> {
    get_with(client, addr, path, &[]).await
}

/// A GET with extra request headers.
pub async fn get_with(
    client: &TestClient,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, BoxError> {
    let mut req = Request::get(format!("http://{addr}{path}"));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = client.request(req.body(Empty::new())?).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Poll `f` until it returns `Some`, or panic with `what` after `timeout`.
/// Used instead of sleeps: it returns as soon as the condition holds.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A ping backend on 127.0.0.1:0 with no drain delay.
pub async fn backend(version: &str, error_rate: f64, latency: Duration) -> ping_backend::Handle {
    let config = ping_backend::Config {
        version: version.into(),
        error_rate,
        latency,
        drain_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(5),
    };
    ping_backend::spawn("127.0.0.1:0", config)
        .await
        .expect("backend starts")
}

/// Routes text for `(name, addr, weight)` versions, with an optional
/// `[rollback]` body (the lines after the table header).
pub fn routes(versions: &[(&str, SocketAddr, u64)], rollback: Option<&str>) -> String {
    let mut out = String::new();
    for (name, addr, weight) in versions {
        out.push_str(&format!(
            "[versions.{name}]\nupstream = \"http://{addr}\"\nweight = {weight}\n\n"
        ));
    }
    if let Some(r) = rollback {
        out.push_str("[rollback]\n");
        out.push_str(r);
        out.push('\n');
    }
    out
}

/// A directory laid out exactly as the kubelet lays out a ConfigMap volume,
/// updated exactly as its atomic writer does:
/// 1. write the files into a new hidden `..<timestamp>` directory;
/// 2. create the symlink `..data_tmp -> ..<timestamp>`;
/// 3. rename `..data_tmp` over `..data` (the atomic step);
/// 4. remove the previous timestamped directory.
///
/// Each key is a symlink `key -> ..data/key`, created once.
pub struct ConfigMapDir {
    pub dir: PathBuf,
    current: Option<String>,
    _temp: Option<tempfile::TempDir>,
}

static TS: AtomicU64 = AtomicU64::new(0);

impl ConfigMapDir {
    pub fn new(files: &[(&str, &[u8])]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut cm = ConfigMapDir {
            dir: temp.path().to_owned(),
            current: None,
            _temp: Some(temp),
        };
        cm.update(files);
        for (key, _) in files {
            std::os::unix::fs::symlink(format!("..data/{key}"), cm.dir.join(key)).unwrap();
        }
        cm
    }

    pub fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// One atomic update (see the type's docs). Returns the instant of the
    /// rename, the moment a watcher can first see the new content.
    pub fn update(&mut self, files: &[(&str, &[u8])]) -> Instant {
        let ts = format!(
            "..2026_11_21_12_00_00.{}",
            TS.fetch_add(1, Ordering::Relaxed)
        );
        let new_dir = self.dir.join(&ts);
        std::fs::create_dir(&new_dir).unwrap();
        for (key, content) in files {
            std::fs::write(new_dir.join(key), content).unwrap();
        }
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&ts, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        let swapped = Instant::now();
        if let Some(old) = self.current.replace(ts) {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
        swapped
    }

    /// Point `..data` at a directory that does not exist (the data
    /// directory is gone), the way a half-finished or broken update looks.
    pub fn break_data_link(&mut self) {
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink("..gone", &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
        if let Some(old) = self.current.take() {
            std::fs::remove_dir_all(self.dir.join(old)).unwrap();
        }
    }
}

/// A proxy running in this process on 127.0.0.1:0, its routes in a
/// kubelet-style ConfigMap directory.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_map: ConfigMapDir,
    proxy: Option<Proxy>,
}

impl TestProxy {
    pub async fn start(routes: &str) -> Self {
        Self::start_with(routes, |_| {}).await
    }

    pub async fn start_with(routes: &str, tune: impl FnOnce(&mut RunConfig)) -> Self {
        let config_map = ConfigMapDir::new(&[("routes.toml", routes.as_bytes())]);
        let path = config_map.path("routes.toml");
        Self::start_at(config_map, &path, tune).await
    }

    /// Start on a routes file at `path` (which need not be in `config_map`).
    pub async fn start_at(
        config_map: ConfigMapDir,
        path: &Path,
        tune: impl FnOnce(&mut RunConfig),
    ) -> Self {
        let mut config = RunConfig::new(path);
        config.drain_delay = Duration::ZERO;
        config.shutdown_timeout = Duration::from_secs(5);
        tune(&mut config);
        let traffic = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy::start(
            config,
            Listeners {
                traffic: Some(traffic),
                admin,
                tls: None,
            },
        )
        .await
        .expect("proxy starts");
        TestProxy {
            addr: proxy.traffic_addr().unwrap(),
            admin: proxy.admin_addr(),
            config_map,
            proxy: Some(proxy),
        }
    }

    pub fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().unwrap()
    }

    pub fn set_routes(&mut self, routes: &str) -> Instant {
        self.config_map
            .update(&[("routes.toml", routes.as_bytes())])
    }

    pub async fn status(&self) -> serde_json::Value {
        status(self.admin).await
    }

    pub async fn metrics(&self) -> String {
        metrics(self.admin).await
    }

    /// Shut down; true if every request and tunnel finished in time.
    pub async fn shutdown_finished(mut self) -> bool {
        match self.proxy.take() {
            Some(p) => p.shutdown().await,
            None => true,
        }
    }

    pub async fn shutdown(mut self) {
        if let Some(p) = self.proxy.take() {
            p.shutdown().await;
        }
    }
}

pub async fn status(admin: SocketAddr) -> serde_json::Value {
    let a = get(&client(), admin, "/status")
        .await
        .expect("status answers");
    assert_eq!(a.status, StatusCode::OK);
    serde_json::from_str(&a.body).expect("status is JSON")
}

pub async fn metrics(admin: SocketAddr) -> String {
    let a = get(&client(), admin, "/metrics")
        .await
        .expect("metrics answer");
    assert_eq!(a.status, StatusCode::OK);
    a.body
}

/// The value of one sample in a text exposition, by metric name and the
/// exact set of labels, e.g. `sample(&text, "canary_proxy_requests_total", &[("version","canary"),("code","500")])`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let mut found: Vec<(String, String)> = label_text
                .split(',')
                .filter(|s| !s.is_empty())
                .filter_map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
                })
                .collect();
            let mut want: Vec<(String, String)> = labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            found.sort();
            want.sort();
            (found == want).then(|| value.parse().ok()).flatten()
        })
}

/// Generous: only turns a binary that never gets ready into a failure.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// `canary-proxy run` with `args`, listening on 127.0.0.1:0 for traffic and
/// admin unless `args` say otherwise. Those defaults are given through their
/// environment variables, which any flag overrides (`--listen none`, say); the
/// other `CANARY_PROXY_*` variables of the shell running the tests are removed,
/// so they cannot change what is tested.
pub fn proxy_command(args: &[&str]) -> Command {
    let mut command = Command::new(match option_env!("CARGO_BIN_EXE_canary-proxy") {
        Some(path) => path,
        None => panic!("only integration tests can run the binary; examples cannot"),
    });
    for (var, _) in std::env::vars_os() {
        if var.to_string_lossy().starts_with("CANARY_PROXY_") {
            command.env_remove(var);
        }
    }
    command
        .arg("run")
        .args(args)
        .env("CANARY_PROXY_LISTEN", "127.0.0.1:0")
        .env("CANARY_PROXY_ADMIN_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    command
}

/// The real `canary-proxy run` binary, and the addresses from its ready line.
/// Killed when dropped.
pub struct ProxyProcess {
    pub child: Process,
    pub listening: Listening,
}

impl ProxyProcess {
    /// Start `command` (see [`proxy_command`]) and wait for its ready line.
    pub fn start(command: &mut Command) -> ProxyProcess {
        let mut child = Process::spawn(command);
        let listening = child.listening(READY_TIMEOUT);
        ProxyProcess { child, listening }
    }

    /// The plain traffic listener; panics if it is turned off.
    pub fn addr(&self) -> SocketAddr {
        self.listening.addr("traffic")
    }

    /// The HTTPS listener; panics if it is turned off.
    pub fn https(&self) -> SocketAddr {
        self.listening.addr("https")
    }

    pub fn admin(&self) -> SocketAddr {
        self.listening.addr("admin")
    }
}

/// The real binary serving the routes file at `routes`, with `extra` flags.
pub fn spawn_proxy_binary(routes: &Path, extra: &[&str]) -> ProxyProcess {
    ProxyProcess::start(proxy_command(extra).env("CANARY_PROXY_ROUTES", routes))
}

/// Versions that answered a run of sequential requests, in order.
pub async fn versions_of(client: &TestClient, addr: SocketAddr, n: usize) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let a = get(client, addr, "/ping").await.expect("request succeeds");
        assert_eq!(a.status, StatusCode::OK, "unexpected answer: {a:?}");
        out.push(a.version().to_owned());
    }
    out
}

/// Background load: `tasks` clients sending GET /ping in a loop until
/// stopped, at most `max_requests` in all and never past `limit`.
/// Returns (requests, failures, first failure) when stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handles: Vec<tokio::task::JoinHandle<(u64, u64, Option<String>)>>,
}

impl Load {
    pub fn start(addr: SocketAddr, tasks: usize, max_requests: u64, limit: Duration) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let deadline = Instant::now() + limit;
        let per_task = max_requests / tasks as u64;
        let handles = (0..tasks)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let c = client();
                    let (mut n, mut failed, mut first) = (0u64, 0u64, None);
                    while !stop.load(Ordering::Relaxed) && n < per_task && Instant::now() < deadline
                    {
                        n += 1;
                        match get(&c, addr, "/ping").await {
                            Ok(a) if a.status == StatusCode::OK => {}
                            other => {
                                failed += 1;
                                first.get_or_insert_with(|| format!("{other:?}"));
                            }
                        }
                    }
                    (n, failed, first)
                })
            })
            .collect();
        Load { stop, handles }
    }

    /// Wait for every client to reach its request budget (or the limit).
    pub async fn finish_when_done(self) -> (u64, u64, Option<String>) {
        self.collect().await
    }

    pub async fn finish(self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        self.collect().await
    }

    async fn collect(self) -> (u64, u64, Option<String>) {
        let mut total = (0, 0, None);
        for h in self.handles {
            let (n, f, first) = h.await.unwrap();
            total.0 += n;
            total.1 += f;
            if total.2.is_none() {
                total.2 = first;
            }
        }
        total
    }
}

/// `sample` for the common case of a metric labelled by version only.
pub fn by_version(text: &str, name: &str, version: &str) -> Option<f64> {
    sample(text, name, &[("version", version)])
}
