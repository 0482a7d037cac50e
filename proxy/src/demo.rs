//! `canary-proxy demo`: the whole system on one machine, no Kubernetes.
//!
//! It starts one in-process ping backend per version of the demo routes
//! file (v1 for the first, v2 for the second, ...), the proxy in front of
//! them, an optional trickle of traffic, and prints a line per second per
//! version. Editing the routes file changes the split live, exactly as a
//! ConfigMap edit does in a cluster.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::routes::{self, RouteTable, StickyKey};
use crate::{Listeners, Proxy, RunConfig};
use http::HeaderName;

/// The demo routes file, embedded so `demo` works from any directory.
pub(crate) const EMBEDDED_ROUTES: &str = include_str!("../../config/demo/routes.toml");
const DEFAULT_ROUTES: &str = "config/demo/routes.toml";
/// The demo's own traffic stops after this, so it never runs unbounded.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Clone)]
pub struct DemoConfig {
    pub routes: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Applied to every version except the rollback target.
    pub canary_error_rate: f64,
    pub canary_latency: Duration,
    pub traffic_per_second: u32,
    /// Send the demo's traffic as a few synthetic users, each with a fixed
    /// `x-user-id`, and show which version each one reaches.
    pub sticky: bool,
    /// Run a short `[progress]` schedule (seconds per step) on the canary.
    pub progressive: bool,
    pub duration: Option<Duration>,
    /// Timeouts and reload settings; `routes` is filled in by the demo.
    pub run: RunConfig,
}

pub async fn run(config: DemoConfig) -> anyhow::Result<()> {
    let mut routes_path = resolve_routes(config.routes.as_deref())?;
    let mut table = routes::load(&routes_path)?;
    if config.progressive && table.progress.is_none() {
        routes_path = with_progress(&routes_path, &table)?;
        table = routes::load(&routes_path)?;
    }
    if config.sticky
        && !matches!(&table.sticky, Some(s) if s.key == StickyKey::Header(HeaderName::from_static(USER_HEADER)))
    {
        bail!(
            "--sticky: {} has no [sticky] table with header = \"{USER_HEADER}\", so the demo's users would be split at random; add those two lines (config/demo/routes.toml has them)",
            routes_path.display()
        );
    }
    let backends = start_backends(&table, &config).await?;

    let traffic = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| {
            format!(
                "--listen {}: cannot bind; is another demo running? pick a free port with --listen",
                config.listen
            )
        })?;
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| {
            format!(
                "--admin-listen {}: cannot bind; pick a free port with --admin-listen",
                config.admin_listen
            )
        })?;
    let mut run = config.run.clone();
    run.routes = routes_path.clone();
    let proxy = Proxy::start(
        run,
        Listeners {
            traffic: Some(traffic),
            admin,
            tls: None,
        },
    )
    .await?;

    let listen = proxy.traffic_addr().unwrap_or(config.listen);
    println!("canary-proxy demo");
    for (spec, b) in table.versions.iter().zip(&backends) {
        println!("  backend  {:<10} {} on {}", spec.name, b.0, b.1.addr());
    }
    println!(
        "  proxy    http://{listen}   admin http://{}",
        proxy.admin_addr()
    );
    println!();
    println!(
        "open:  http://{}/                              (the live status page, in a browser)",
        proxy.admin_addr()
    );
    println!("try:   curl -i http://{listen}/ping            (x-ping-version says who answered)");
    println!(
        "       curl http://{}/status                   (weights, windows, rollback)",
        proxy.admin_addr()
    );
    println!("       curl http://{}/metrics", proxy.admin_addr());
    println!(
        "edit:  {}   (the split changes live on save)",
        routes_path.display()
    );
    if config.canary_error_rate == 0.0 {
        println!("fault: restart with --canary-error-rate 0.3 to watch the automatic rollback");
    }
    if let Some(p) = &table.progress {
        let steps: Vec<String> = p.steps.iter().map(|s| format!("{s}%")).collect();
        println!(
            "progress: {} steps through {}, {} a step at least; add paused = true to hold it",
            table.versions[p.version].name,
            steps.join(" -> "),
            humantime::format_duration(p.step_time)
        );
    }
    let users = config.sticky.then(|| {
        let names: Vec<&str> = USERS.to_vec();
        println!("users: {} send {USER_HEADER}: NAME; [sticky] keeps each on one version. Raise the canary's weight and watch: users only move to it.", names.join(", "));
        Arc::new(Users::new(
            &names,
            table.versions.iter().zip(&backends).map(|(spec, b)| (b.0.clone(), spec.name.clone())).collect(),
        ))
    });
    println!();

    let generator = (config.traffic_per_second > 0).then(|| {
        tokio::spawn(generate_traffic(
            listen,
            config.traffic_per_second,
            users.clone(),
        ))
    });
    let stop = async {
        match config.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => crate::shutdown_signal().await,
        }
    };
    tokio::select! {
        _ = stop => {}
        _ = live_view(&proxy, users.as_deref()) => {}
    }
    if let Some(g) = generator {
        g.abort();
    }
    proxy.shutdown().await;
    for (_, b) in backends {
        let _ = b.shutdown().await;
    }
    Ok(())
}

/// `--progressive` on a file without `[progress]`: the same file plus a
/// short schedule for the first version that is not the rollback target,
/// written beside a temporary copy (the original stays as it was).
fn with_progress(path: &Path, table: &RouteTable) -> anyhow::Result<PathBuf> {
    let target = table.rollback.as_ref().map(|r| r.target);
    let Some(version) = table
        .versions
        .iter()
        .enumerate()
        .find(|(i, _)| Some(*i) != target)
        .map(|(_, v)| &v.name)
    else {
        bail!(
            "--progressive: {} has no version besides the rollback target to step up",
            path.display()
        );
    };
    if target.is_none() {
        bail!("--progressive: {} has no [rollback] table; a step advances only on the judgment's evidence, so add [rollback] with target = \"stable\"", path.display());
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let dir = std::env::temp_dir().join(format!(
        "canary-proxy-demo-progressive-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let out = dir.join("routes.toml");
    std::fs::write(
        &out,
        format!("{text}\n# Added by `demo --progressive`: a schedule in seconds (docs/progressive.md).\n[progress]\nversion = \"{version}\"\nsteps = [10, 25, 50, 100]\nstep_time = \"5s\"\nmin_requests = 10\n"),
    )
    .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(out)
}

/// Use the given file, else `config/demo/routes.toml` under the current
/// directory, else write the embedded copy to a temporary file to edit.
fn resolve_routes(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let local = PathBuf::from(DEFAULT_ROUTES);
    if local.exists() {
        return Ok(local);
    }
    let dir = std::env::temp_dir().join(format!("canary-proxy-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("routes.toml");
    std::fs::write(&path, EMBEDDED_ROUTES)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

async fn start_backends(
    table: &RouteTable,
    config: &DemoConfig,
) -> anyhow::Result<Vec<(String, ping_backend::Handle)>> {
    let target = table.rollback.as_ref().map(|r| r.target).unwrap_or(0);
    let mut backends = Vec::new();
    for (i, spec) in table.versions.iter().enumerate() {
        let host = spec.upstream.authority.host();
        if !matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            bail!("versions.{}.upstream is {}: the demo starts its backends on this machine, so demo upstreams must be loopback addresses like http://127.0.0.1:18081", spec.name, spec.upstream);
        }
        let port = spec.upstream.authority.port_u16().unwrap_or(80);
        let faulty = i != target;
        let label = format!("v{}", i + 1);
        let backend_config = ping_backend::Config {
            version: label.clone(),
            error_rate: if faulty {
                config.canary_error_rate
            } else {
                0.0
            },
            latency: if faulty {
                config.canary_latency
            } else {
                Duration::ZERO
            },
            drain_delay: Duration::ZERO,
            shutdown_timeout: Duration::from_secs(2),
        };
        let handle = ping_backend::spawn(&format!("127.0.0.1:{port}"), backend_config)
            .await
            .with_context(|| {
                format!(
                    "cannot start the {} backend on 127.0.0.1:{port}; is the port in use?",
                    spec.name
                )
            })?;
        backends.push((label, handle));
    }
    Ok(backends)
}

/// The header the demo's synthetic users send their name in.
const USER_HEADER: &str = "x-user-id";
/// The demo's synthetic users, for `--sticky`.
const USERS: [&str; 8] = ["ada", "bo", "cy", "di", "ed", "flo", "gus", "hal"];

/// The version each synthetic user reached last, and how often one moved.
struct Users {
    names: Vec<String>,
    /// Backend label (`x-ping-version`) -> version name.
    labels: Vec<(String, String)>,
    last: std::sync::Mutex<Vec<Option<String>>>,
    moves: std::sync::atomic::AtomicU64,
}

impl Users {
    fn new(names: &[&str], labels: Vec<(String, String)>) -> Self {
        Users {
            names: names.iter().map(|n| n.to_string()).collect(),
            labels,
            last: std::sync::Mutex::new(vec![None; names.len()]),
            moves: Default::default(),
        }
    }

    fn answered(&self, user: usize, label: &str) {
        let version = self
            .labels
            .iter()
            .find(|(l, _)| l == label)
            .map_or(label, |(_, name)| name.as_str());
        let mut last = self.last.lock().expect("no panic holds the lock");
        if last[user].as_deref().is_some_and(|v| v != version) {
            self.moves
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        last[user] = Some(version.to_string());
    }

    /// `ada stable, bo canary, ...`, and the moves so far.
    fn line(&self) -> String {
        let last = self.last.lock().expect("no panic holds the lock");
        let users: Vec<String> = self
            .names
            .iter()
            .zip(last.iter())
            .map(|(n, v)| format!("{n} {}", v.as_deref().unwrap_or("-")))
            .collect();
        format!(
            "users: {}  (moves so far: {})",
            users.join(", "),
            self.moves.load(std::sync::atomic::Ordering::Relaxed)
        )
    }
}

/// A steady trickle of GET /ping so the live view has something to show;
/// with `users`, each request is one of theirs, in turn.
async fn generate_traffic(listen: SocketAddr, per_second: u32, users: Option<Arc<Users>>) {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("http://{listen}/ping")
        .parse()
        .expect("a socket address makes a valid URI");
    let limit = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / per_second);
    let deadline = Instant::now() + TRAFFIC_LIMIT;
    let mut sent = 0usize;
    while Instant::now() < deadline {
        tick.tick().await;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            continue;
        };
        let (client, uri, users) = (client.clone(), uri.clone(), users.clone());
        let user = sent % USERS.len();
        sent += 1;
        tokio::spawn(async move {
            let mut req = http::Request::get(uri);
            if users.is_some() {
                req = req.header(USER_HEADER, USERS[user]);
            }
            let req = req.body(Empty::new()).expect("a valid request");
            if let Ok(resp) = client.request(req).await {
                if let (Some(users), Some(label)) = (
                    &users,
                    resp.headers()
                        .get("x-ping-version")
                        .and_then(|v| v.to_str().ok()),
                ) {
                    users.answered(user, label);
                }
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            }
            drop(permit);
        });
    }
    println!(
        "demo traffic stopped after {}; the proxy keeps serving your own requests",
        humantime::format_duration(TRAFFIC_LIMIT)
    );
}

/// Print one line per version every second, and the users' line.
async fn live_view(proxy: &Proxy, users: Option<&Users>) {
    let started = Instant::now();
    let mut last: std::collections::HashMap<String, u64> = Default::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        let store = proxy.control().store();
        let snap = store.load();
        let now = store.now();
        let counts: Vec<(u64, u64)> = snap.versions.iter().map(|v| v.metrics.counts()).collect();
        let deltas: Vec<u64> = snap
            .versions
            .iter()
            .zip(&counts)
            .map(|(v, (total, _))| total - last.get(&*v.name).copied().unwrap_or(0).min(*total))
            .collect();
        let sum: u64 = deltas.iter().sum();
        for (i, v) in snap.versions.iter().enumerate() {
            let (total, errors) = counts[i];
            let share = if sum == 0 {
                0.0
            } else {
                100.0 * deltas[i] as f64 / sum as f64
            };
            let (configured, effective) = snap.shares(i);
            // The routing weight, where a rollback or [progress] moved it.
            let weight = if (configured - effective).abs() < 1e-9 {
                format!("{:>5.1}%", configured * 100.0)
            } else {
                format!("{:>5.1}% -> {:.1}%", configured * 100.0, effective * 100.0)
            };
            let w = v.judgment.totals(now);
            let state = match &v.rollback {
                Some(r) => format!(
                    "ROLLED BACK at {} ({}: ratio {:.3} > {})",
                    humantime::format_rfc3339_seconds(r.at),
                    r.criterion.as_str(),
                    r.counts.ratio(),
                    r.threshold
                ),
                None => {
                    // How close each criterion's evidence is to the trip point.
                    let evidence: Vec<String> = v
                        .judgment
                        .criteria()
                        .filter_map(|c| {
                            let e = v.judgment.evidence(c)?;
                            Some(format!("{} {:.0}%", c.as_str(), 100.0 * e))
                        })
                        .collect();
                    let role = if v.judgment.is_judged() {
                        "evidence"
                    } else if snap.policy().is_some() {
                        "rollback target, evidence"
                    } else {
                        "rollback off"
                    };
                    format!(
                        "window {}/{} errors  {role} {}",
                        w.errors,
                        w.requests,
                        if evidence.is_empty() {
                            "-".to_string()
                        } else {
                            evidence.join(", ")
                        }
                    )
                }
            };
            println!("[{:>4}s] {:<10} {:>4}/s  share {:>5.1}% (weight {weight})  requests {:>7}  errors {:>5}  {}", started.elapsed().as_secs(), v.name, deltas[i], share, total, errors, state);
            last.insert(v.name.to_string(), total);
        }
        if let Some(users) = users {
            println!("[{:>4}s] {}", started.elapsed().as_secs(), users.line());
        }
        let progress = proxy.control().progress(|run| {
            format!(
                "progress: {} step {}/{} ({}%)  {}  {}",
                run.version_name(),
                run.run.step(),
                run.spec.steps.len(),
                run.run.percent(&run.spec),
                run.run.state().as_str(),
                run.run.reason()
            )
        });
        if let Some(line) = progress {
            println!("[{:>4}s] {line}", started.elapsed().as_secs());
        }
    }
}
