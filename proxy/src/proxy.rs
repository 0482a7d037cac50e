//! [`Proxy`]: everything wired together, started and shut down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, Readiness};
use crate::clock::SystemClock;
use crate::control::Control;
use crate::event_loops::EventLoops;
use crate::forward::ForwardConfig;
use crate::guard::Verdicts;
use crate::metrics::Metrics;
use crate::reload;
use crate::routes::{self, RoutesError};
use crate::server::{self, Acceptor, ConnectionLimit, Connections, Plain, ServerConfig};
use crate::tls::{Tls, TlsConfig, TlsError};
use crate::watch::WatchConfig;

/// Everything `canary-proxy run` is configured with, minus the sockets.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub routes: PathBuf,
    /// After SIGTERM, keep serving this long with `/readyz` at 503, because
    /// Kubernetes removes the endpoint asynchronously.
    pub drain_delay: Duration,
    /// Then wait at most this long for in-flight requests and tunnels.
    pub shutdown_timeout: Duration,
    pub server: ServerConfig,
    pub forward: ForwardConfig,
    pub watch: WatchConfig,
    /// The HTTPS listener's certificate; needed iff `Listeners::tls` is set.
    pub tls: Option<TlsConfig>,
    /// Event loops for client connections: 1 serves them on the runtime
    /// that calls [`Proxy::start`]; N > 1 starts N threads, each with an
    /// event loop of its own.
    pub threads: usize,
    /// The name server DNS discovery asks; `None` (the default) uses the
    /// system's configuration, `/etc/resolv.conf`.
    pub dns_server: Option<std::net::SocketAddr>,
}

impl RunConfig {
    pub fn new(routes: impl Into<PathBuf>) -> Self {
        RunConfig {
            routes: routes.into(),
            drain_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(25),
            server: ServerConfig::default(),
            forward: ForwardConfig::default(),
            watch: WatchConfig::default(),
            tls: None,
            threads: 1,
            dns_server: None,
        }
    }
}

/// Sockets, bound by the caller (tests bind `127.0.0.1:0`).
#[derive(Debug)]
pub struct Listeners {
    /// `None` when the plain listener is turned off.
    pub traffic: Option<TcpListener>,
    pub admin: TcpListener,
    /// The HTTPS listener, if any (needs `RunConfig::tls`).
    pub tls: Option<TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    // Not a `source`: the message already holds it whole.
    #[error("{0}\nthere is no last good routes table to fall back on at start-up; fix the file (check it with `canary-proxy check PATH`)")]
    Routes(RoutesError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("no listener: give --listen or --tls-listen an address")]
    NoListener,
    #[error("an HTTPS listener needs a certificate and a key, and a certificate needs an HTTPS listener: give --tls-listen, --tls-cert and --tls-key together")]
    TlsIncomplete,
    #[error("cannot start the worker threads: {0}; try fewer --threads")]
    Threads(#[source] std::io::Error),
}

impl From<RoutesError> for StartError {
    fn from(e: RoutesError) -> Self {
        StartError::Routes(e)
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    /// Read by the demo's live view.
    #[cfg_attr(not(feature = "demo"), allow(dead_code))]
    control: Arc<Control>,
    event_loops: Arc<EventLoops>,
    readiness: Arc<Readiness>,
    config: RunConfig,
    stop_accepting: CancellationToken,
    stop_rest: CancellationToken,
    servers: Vec<JoinHandle<Connections>>,
    traffic_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    admin_addr: SocketAddr,
}

impl Proxy {
    /// Load the routes (fatal if missing or invalid) and start serving.
    pub async fn start(config: RunConfig, listeners: Listeners) -> Result<Proxy, StartError> {
        if listeners.traffic.is_none() && listeners.tls.is_none() {
            return Err(StartError::NoListener);
        }
        if listeners.tls.is_some() != config.tls.is_some() {
            return Err(StartError::TlsIncomplete);
        }
        let bytes = routes::read(&config.routes)?;
        let table = routes::parse_at(&config.routes, &bytes)?;
        tracing::info!(routes = %config.routes.display(), hash = %table.hash, versions = %table.versions.iter().map(|v| format!("{}={}", v.name, v.weight)).collect::<Vec<_>>().join(" "), "routes loaded");
        // Like the routes, a bad certificate at start-up is fatal: there is
        // no previous one to keep serving.
        let tls = match &config.tls {
            Some(tls_config) => {
                let tls = Tls::load(tls_config.clone()).await?;
                let info = tls.info();
                tracing::info!(cert = %tls_config.cert.display(), subject = %info.subject, serial = %info.serial, "TLS certificate loaded");
                Some(tls)
            }
            None => None,
        };

        let metrics = Metrics::new();
        let control = Control::new(
            table,
            metrics,
            Arc::new(SystemClock::new()),
            crate::dns::Dns::new(config.dns_server),
        );
        let verdicts: Arc<dyn Verdicts> = control.clone();
        let event_loops = Arc::new(
            EventLoops::start(
                config.threads,
                control.store(),
                &verdicts,
                control.metrics(),
                &config.forward,
            )
            .map_err(StartError::Threads)?,
        );
        let readiness = Arc::new(Readiness::default());
        let stop_accepting = CancellationToken::new();
        let stop_rest = CancellationToken::new();

        let admin_addr = local_addr(&listeners.admin);
        tokio::spawn(admin::serve(
            listeners.admin,
            control.clone(),
            readiness.clone(),
            stop_rest.clone(),
        ));
        reload::spawn(
            config.routes.clone(),
            bytes,
            control.clone(),
            &config.watch,
            stop_rest.clone(),
        );

        spawn_progress_ticker(control.clone(), stop_rest.clone());

        let limit = connection_limit(&config.server, control.metrics());
        let start = Servers {
            event_loops: &event_loops,
            config: &config.server,
            limit: &limit,
            stop: &stop_accepting,
        };
        let mut servers = Vec::new();
        let traffic_addr = listeners.traffic.map(|listener| {
            let addr = local_addr(&listener);
            tracing::info!(%addr, "serving traffic");
            servers.push(start.spawn(listener, Plain));
            addr
        });
        let tls_addr = match (listeners.tls, tls) {
            (Some(listener), Some(tls)) => {
                let addr = local_addr(&listener);
                tls.spawn_reloader(control.metrics().clone(), &config.watch, stop_rest.clone());
                tracing::info!(%addr, "serving https");
                servers.push(start.spawn(listener, tls.acceptor()));
                Some(addr)
            }
            _ => None,
        };
        tracing::info!(addr = %admin_addr, "serving admin endpoints: /healthz /readyz /metrics /status");
        Ok(Proxy {
            control,
            event_loops,
            readiness,
            config,
            stop_accepting,
            stop_rest,
            servers,
            traffic_addr,
            tls_addr,
            admin_addr,
        })
    }

    pub fn traffic_addr(&self) -> Option<SocketAddr> {
        self.traffic_addr
    }

    /// The HTTPS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    #[cfg(feature = "demo")]
    pub(crate) fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// The graceful shutdown sequence: readyz 503 at once, keep serving for
    /// the drain delay, stop accepting, then wait for in-flight requests and
    /// tunnels up to the shutdown timeout. Returns true if everything
    /// finished in time.
    pub async fn shutdown(self) -> bool {
        self.readiness.start_draining();
        tracing::info!(drain_delay = %humantime::format_duration(self.config.drain_delay), "shutting down: readyz is now 503; still serving during the drain delay");
        tokio::time::sleep(self.config.drain_delay).await;

        tracing::info!(timeout = %humantime::format_duration(self.config.shutdown_timeout), "drain delay over: closing listeners, waiting for in-flight requests");
        self.stop_accepting.cancel();
        let mut open = Vec::new();
        for s in self.servers {
            if let Ok(connections) = s.await {
                open.push(connections);
            }
        }
        let tunnels: Vec<_> = self
            .event_loops
            .iter()
            .map(|l| l.forwarder.tunnels().clone())
            .collect();
        for t in &tunnels {
            t.close();
        }
        let finished = tokio::time::timeout(self.config.shutdown_timeout, async {
            futures_util::future::join_all(open.into_iter().map(|c| c.shutdown())).await;
            futures_util::future::join_all(tunnels.iter().map(|t| t.wait())).await;
        })
        .await
        .is_ok();
        if finished {
            tracing::info!("all connections finished; exiting");
        } else {
            tracing::warn!(
                tunnels = tunnels.iter().map(|t| t.len()).sum::<usize>(),
                "shutdown timeout reached with requests still in flight; exiting anyway"
            );
        }
        self.stop_rest.cancel();
        self.event_loops.stop().await;
        finished
    }
}

/// What every traffic listener is started with; only the acceptor differs.
struct Servers<'a> {
    event_loops: &'a Arc<EventLoops>,
    config: &'a ServerConfig,
    /// Shared: the limit counts the connections of every listener.
    limit: &'a Arc<ConnectionLimit>,
    stop: &'a CancellationToken,
}

impl Servers<'_> {
    fn spawn<A: Acceptor>(&self, listener: TcpListener, acceptor: A) -> JoinHandle<Connections> {
        tokio::spawn(server::serve(
            listener,
            Arc::new(acceptor),
            self.event_loops.clone(),
            self.config.clone(),
            self.limit.clone(),
            self.stop.clone(),
        ))
    }
}

/// `--max-connections`, as given or derived, logged with its reason.
fn connection_limit(config: &ServerConfig, metrics: &Metrics) -> Arc<ConnectionLimit> {
    let fds = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .ok()
        .map(|(soft, _)| soft);
    let (max, why) = match config.max_connections {
        Some(n) => (n, "--max-connections".to_string()),
        None => {
            let d = server::default_max_connections(
                config.max_request_head,
                server::cgroup_memory_limit(),
                fds,
            );
            (d.max, d.why)
        }
    };
    tracing::info!(max_connections = max, from = %why, descriptors = ?fds, "client connection limit");
    metrics.max_connections.set(max as i64);
    ConnectionLimit::new(
        max,
        metrics.connections.clone(),
        metrics.connections_rejected.clone(),
    )
}

fn local_addr(listener: &TcpListener) -> SocketAddr {
    listener
        .local_addr()
        .expect("a bound listener has an address")
}

/// Serve until `signal` resolves, then shut down gracefully.
pub async fn run(
    config: RunConfig,
    listeners: Listeners,
    signal: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let proxy = Proxy::start(config, listeners).await?;
    signal.await;
    proxy.shutdown().await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called, not when the future is first polled, so a signal that arrives in
/// between is not lost. Must be called inside the tokio runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    if let Err(e) = &term {
        tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT will stop the proxy");
    }
    let interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    if let Err(e) = &interrupt {
        tracing::error!(error = %e, "cannot listen for SIGINT");
    }
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = wait(term) => tracing::info!("SIGTERM received"),
            _ = wait(interrupt) => tracing::info!("SIGINT received"),
        }
    }
}

/// How often the `[progress]` run is brought up to date: well under the
/// shortest `step_time` (1 s), and nothing to do without a run.
const PROGRESS_TICK: Duration = Duration::from_millis(100);

fn spawn_progress_ticker(control: Arc<Control>, stop: CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROGRESS_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => control.tick(),
            }
        }
    });
}
