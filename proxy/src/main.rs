//! The `canary-proxy` binary: flags in, library calls out.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use canary_proxy::{
    AdminUrl, ForwardConfig, Listeners, RunConfig, ServerConfig, StatusOptions, StatusOutput,
    TlsConfig, WatchConfig,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "canary-proxy",
    version,
    about = "A reverse proxy for canary and blue-green releases: splits traffic between versions by weight, counts every answer per version, and rolls a failing canary back by itself."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve traffic (what the Kubernetes Deployment runs).
    Run(RunArgs),
    /// Validate a routes file without serving; run this before `kubectl apply`.
    Check {
        /// The routes file (TOML) to validate.
        path: PathBuf,
    },
    /// Show a running proxy's /status in the terminal: weights, counts, judgment, rollbacks, progress.
    #[command(after_help = STATUS_EXIT_CODES)]
    Status(StatusArgs),
    /// Run the whole system locally: two ping backends (v1 stable, v2 canary) and the proxy, with a live view.
    #[cfg(feature = "demo")]
    Demo(DemoArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Traffic listener, ADDR like 0.0.0.0:8080, or `none` to turn it off.
    #[arg(long, env = "CANARY_PROXY_LISTEN", default_value = "0.0.0.0:8080", value_parser = parse_optional_addr)]
    listen: OptionalAddr,
    /// Admin listener for /healthz, /readyz, /metrics and /status (never the traffic port).
    #[arg(
        long,
        env = "CANARY_PROXY_ADMIN_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    admin_listen: SocketAddr,
    /// The routes file; mount the ConfigMap as a directory (not subPath) so updates reach it.
    #[arg(
        long,
        env = "CANARY_PROXY_ROUTES",
        default_value = "/etc/canary-proxy/routes.toml"
    )]
    routes: PathBuf,
    #[command(flatten)]
    common: CommonArgs,
    /// After SIGTERM, keep serving this long with /readyz at 503 (e.g. 5s).
    #[arg(long, env = "CANARY_PROXY_DRAIN_DELAY", default_value = "5s", value_parser = humantime::parse_duration)]
    drain_delay: Duration,
    /// Then wait at most this long for in-flight requests (e.g. 25s).
    #[arg(long, env = "CANARY_PROXY_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    shutdown_timeout: Duration,
    /// HTTPS listener beside the plain one, ADDR like 0.0.0.0:8443; needs --tls-cert and --tls-key.
    #[arg(long, env = "CANARY_PROXY_TLS_LISTEN", value_name = "ADDR")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain, leaf first: the tls.crt of a kubernetes.io/tls Secret mounted as a directory (not subPath), so rotations reach it.
    #[arg(long, env = "CANARY_PROXY_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// PEM private key matching --tls-cert: the Secret's tls.key.
    #[arg(long, env = "CANARY_PROXY_TLS_KEY", value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// Drop an HTTPS client that has not finished the TLS handshake within this long (e.g. 10s).
    #[arg(long, env = "CANARY_PROXY_TLS_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    tls_handshake_timeout: Duration,
    /// Threads serving client connections, each with an event loop of its own; 0 means one per CPU core. New connections go to the threads in turn.
    #[arg(long, env = "CANARY_PROXY_THREADS", default_value_t = 0)]
    threads: usize,
}

const STATUS_EXIT_CODES: &str = "\
Exit codes:
  0  no version is rolled back (a healthy or complete release); also --watch stopped by Ctrl-C
  1  a version is rolled back (or the progress schedule's state is rolled_back)
  2  no valid /status document from --admin (nothing listening, a timeout, not the admin port), or a bad flag

In a cluster, forward the admin port first:
  kubectl -n canary-proxy port-forward deploy/canary-proxy 9090:9090";

#[derive(Args)]
struct StatusArgs {
    /// The proxy's admin address, http://HOST:PORT; through `kubectl port-forward`, its local end.
    #[arg(
        long,
        env = "CANARY_PROXY_ADMIN",
        default_value = "http://127.0.0.1:9090",
        value_name = "URL"
    )]
    admin: AdminUrl,
    /// `text`: the view; `json`: the /status document exactly as received (the proxy pretty-prints it).
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
    /// Redraw in place every --interval until Ctrl-C (then exit 0); while the proxy cannot be reached, show the error and keep trying. With --output json, print each document in turn.
    #[arg(long)]
    watch: bool,
    /// How often --watch fetches /status.
    #[arg(long, default_value = "2s", value_parser = parse_positive_duration)]
    interval: Duration,
    /// Give up on one fetch (connect and answer) after this long.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

/// Flags shared by `run` and `demo`.
#[derive(Args, Clone)]
struct CommonArgs {
    /// Give up connecting to an upstream after this long (answer 502, or retry on the rollback target).
    #[arg(long, env = "CANARY_PROXY_CONNECT_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Answer 504 when an upstream sends no response head within this long; `0s` waits forever. A gRPC call is answered DEADLINE_EXCEEDED instead, and its `grpc-timeout` lowers this for that call.
    #[arg(long, env = "CANARY_PROXY_UPSTREAM_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    upstream_timeout: Duration,
    /// An upstream connection takes no new request once it is this old, so that a Service's new pods get connections (kube-proxy picks a pod per connection); `0s` keeps connections for good.
    #[arg(long, env = "CANARY_PROXY_UPSTREAM_MAX_CONNECTION_AGE", default_value = "2m", value_parser = humantime::parse_duration)]
    upstream_max_connection_age: Duration,
    /// A request body gets this long before --request-body-min-rate applies; one that falls behind is cut and answered 408.
    #[arg(long, env = "CANARY_PROXY_REQUEST_BODY_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    request_body_timeout: Duration,
    /// After --request-body-timeout, a request body must have arrived at this many bytes per second on average.
    #[arg(long, env = "CANARY_PROXY_REQUEST_BODY_MIN_RATE", default_value_t = 4096, value_parser = clap::value_parser!(u64).range(1..))]
    request_body_min_rate: u64,
    /// Drop a client connection whose request head is not complete this long after its first byte (slowloris guard); the first request of a connection counts from the connection's start.
    #[arg(long, env = "CANARY_PROXY_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    header_read_timeout: Duration,
    /// Close a keep-alive connection idle this long between requests, or whose client takes no bytes of an answer for this long; keep it above your load balancer's idle timeout (60 s on most clouds).
    #[arg(long, env = "CANARY_PROXY_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_positive_duration)]
    idle_timeout: Duration,
    /// Client connections held at once; more are closed at once and counted. 0 derives it from the memory and descriptor limits (see docs/security.md).
    #[arg(long, env = "CANARY_PROXY_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,
    /// The largest request head accepted, in bytes (431 above it), from 8192 up.
    #[arg(long, env = "CANARY_PROXY_MAX_REQUEST_HEAD", default_value_t = 65536, value_parser = clap::value_parser!(u32).range(8192..=16_777_216))]
    max_request_head: u32,
    /// Re-read the routes file this often even without file events.
    #[arg(long, env = "CANARY_PROXY_RELOAD_INTERVAL", default_value = "10s", value_parser = humantime::parse_duration)]
    reload_interval: Duration,
}

#[cfg(feature = "demo")]
#[derive(Args)]
struct DemoArgs {
    /// Routes file to start from (90/10); edit it while the demo runs. Defaults to config/demo/routes.toml, or an embedded copy.
    #[arg(long)]
    routes: Option<PathBuf>,
    /// Where the proxy listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where the admin endpoints listen.
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// Fraction (0..=1) of the canary's /ping answered with 500, to watch the rollback.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fraction)]
    canary_error_rate: f64,
    /// Latency added to each canary /ping (e.g. 50ms).
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    canary_latency: Duration,
    /// Requests per second the demo sends itself through the proxy (0 to only watch your own curls).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1000))]
    traffic: u32,
    /// Send the demo's traffic as 8 synthetic users (an x-user-id each) and show which version each reaches; the routes file needs [sticky] header = "x-user-id" (the demo's has it).
    #[arg(long)]
    sticky: bool,
    /// Step the canary up on a short [progress] schedule (10% to 100%, 5 s a step at least, on good evidence) and show it live; with --canary-error-rate 0.3, watch the rollback stop it.
    #[arg(long)]
    progressive: bool,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Clone, Copy)]
struct OptionalAddr(Option<SocketAddr>);

fn parse_optional_addr(s: &str) -> Result<OptionalAddr, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(OptionalAddr(None));
    }
    s.parse()
        .map(|a| OptionalAddr(Some(a)))
        .map_err(|_| format!("expected an address like 0.0.0.0:8080, or `none`; got `{s}`"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than 0s (e.g. 10s)".to_string()),
        Err(e) => Err(format!("{e}; give a duration like 10s or 1m30s")),
    }
}

#[cfg(feature = "demo")]
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!(
            "must be a fraction between 0.0 and 1.0 (e.g. 0.3); got `{s}`"
        )),
    }
}

impl CommonArgs {
    fn apply(&self, config: &mut RunConfig) {
        config.forward = ForwardConfig {
            connect_timeout: self.connect_timeout,
            upstream_timeout: (!self.upstream_timeout.is_zero()).then_some(self.upstream_timeout),
            upstream_max_connection_age: (!self.upstream_max_connection_age.is_zero())
                .then_some(self.upstream_max_connection_age),
            request_body_grace: self.request_body_timeout,
            request_body_min_rate: self.request_body_min_rate,
            ..ForwardConfig::default()
        };
        config.server = ServerConfig {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_request_head: self.max_request_head as usize,
            max_connections: (self.max_connections > 0).then_some(self.max_connections),
        };
        config.watch = WatchConfig {
            interval: self.reload_interval,
            ..WatchConfig::default()
        };
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    raise_descriptor_limit();
    let result = match cli.command {
        Command::Check { path } => return check(&path),
        Command::Status(args) => return status(args),
        Command::Run(args) => run(args),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raise the soft limit on open descriptors to the hard one, as NGINX's
/// worker_rlimit_nofile and Go's runtime do: every client connection needs
/// one, and its upstream connection another, and the soft default (often
/// 1024) would cap the proxy far below what its memory allows.
fn raise_descriptor_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "descriptor limit raised to the hard limit"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the descriptor limit; the default --max-connections follows the current one")
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: logs collected by Kubernetes
    // (or read by tests) stay plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

fn check(path: &std::path::Path) -> ExitCode {
    match canary_proxy::check_routes(path) {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn status(args: StatusArgs) -> ExitCode {
    let options = StatusOptions {
        admin: args.admin,
        output: match args.output {
            OutputFormat::Text => StatusOutput::Text,
            OutputFormat::Json => StatusOutput::Json,
        },
        watch: args.watch.then_some(args.interval),
        timeout: args.timeout,
    };
    match runtime(1) {
        Ok(rt) => ExitCode::from(rt.block_on(canary_proxy::show_status(&options)).exit_code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        b.worker_threads(threads);
    }
    b.enable_all()
        .build()
        .context("cannot start the async runtime")
}

async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| {
        format!("{flag} {addr}: cannot bind; give a free local address like 0.0.0.0:8080")
    })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    // Port 0 asks the kernel for a free port each, so two zeros never collide.
    if args.listen.0 == Some(args.admin_listen) && args.admin_listen.port() != 0 {
        anyhow::bail!("--admin-listen {} is the traffic port too; the admin port must be separate so it is never exposed through the LoadBalancer", args.admin_listen);
    }
    let tls_listen = args.tls_listen;
    if let Some(addr) = tls_listen.filter(|a| a.port() != 0) {
        if addr == args.admin_listen {
            anyhow::bail!("--tls-listen {addr} is the admin port too; give the admin endpoints a port of their own");
        }
        if args.listen.0 == Some(addr) {
            anyhow::bail!("--tls-listen {addr} is the --listen address too; give HTTPS a port of its own (e.g. 0.0.0.0:8443), or turn the plain listener off with --listen none");
        }
    }
    let mut config = RunConfig::new(args.routes);
    config.tls = tls_config(
        args.tls_listen,
        args.tls_cert,
        args.tls_key,
        args.tls_handshake_timeout,
    )?;
    args.common.apply(&mut config);
    config.drain_delay = args.drain_delay;
    config.shutdown_timeout = args.shutdown_timeout;
    config.threads = match args.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // Client connections get threads of their own when there are several
    // (see workers.rs); this one thread accepts, and runs the admin
    // endpoints and the control plane.
    runtime(1)?.block_on(async move {
        let traffic = match args.listen.0 {
            Some(addr) => Some(bind(addr, "--listen").await?),
            None => None,
        };
        let admin = bind(args.admin_listen, "--admin-listen").await?;
        let tls = match tls_listen {
            Some(addr) => Some(bind(addr, "--tls-listen").await?),
            None => None,
        };
        let proxy = canary_proxy::Proxy::start(
            config,
            Listeners {
                traffic,
                admin,
                tls,
            },
        )
        .await?;
        // The handlers are in place before the ready line: a script that
        // sends SIGTERM as soon as it reads the line gets a graceful shutdown.
        let signal = canary_proxy::shutdown_signal();
        print_ready_line(&proxy);
        signal.await;
        proxy.shutdown().await;
        Ok(())
    })
}

/// One line of JSON on stdout (logs go to stderr) with the bound addresses,
/// so scripts and tests that ask for port 0 learn the ports without parsing
/// log text; null for a listener that is off. Structs rather than `json!`,
/// whose map would sort the keys.
fn print_ready_line(proxy: &canary_proxy::Proxy) {
    use std::io::Write as _;
    #[derive(serde::Serialize)]
    struct Ready {
        listening: Listening,
    }
    #[derive(serde::Serialize)]
    struct Listening {
        traffic: Option<SocketAddr>,
        https: Option<SocketAddr>,
        admin: SocketAddr,
    }
    let ready = serde_json::to_string(&Ready {
        listening: Listening {
            traffic: proxy.traffic_addr(),
            https: proxy.tls_addr(),
            admin: proxy.admin_addr(),
        },
    })
    .expect("addresses serialize");
    let mut stdout = std::io::stdout();
    // Nobody reading stdout is no reason to stop serving.
    if let Err(e) = writeln!(stdout, "{ready}").and_then(|()| stdout.flush()) {
        tracing::warn!(error = %e, "cannot print the ready line on stdout");
    }
}

/// The three TLS flags go together: say which one is missing.
fn tls_config(
    listen: Option<SocketAddr>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    handshake_timeout: Duration,
) -> anyhow::Result<Option<TlsConfig>> {
    match (listen, cert, key) {
        (None, None, None) => Ok(None),
        (Some(_), Some(cert), Some(key)) => {
            if handshake_timeout.is_zero() {
                anyhow::bail!("--tls-handshake-timeout must be more than 0s (e.g. 10s)");
            }
            Ok(Some(TlsConfig {
                handshake_timeout,
                ..TlsConfig::new(cert, key)
            }))
        }
        (listen, cert, key) => {
            let missing: Vec<&str> = [
                (
                    listen.is_none(),
                    "--tls-listen ADDR (CANARY_PROXY_TLS_LISTEN)",
                ),
                (cert.is_none(), "--tls-cert PATH (CANARY_PROXY_TLS_CERT)"),
                (key.is_none(), "--tls-key PATH (CANARY_PROXY_TLS_KEY)"),
            ]
            .into_iter()
            .filter_map(|(missing, flag)| missing.then_some(flag))
            .collect();
            anyhow::bail!(
                "HTTPS needs --tls-listen, --tls-cert and --tls-key together; missing: {}",
                missing.join(", ")
            )
        }
    }
}

#[cfg(feature = "demo")]
fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let mut run = RunConfig::new(PathBuf::new());
    args.common.apply(&mut run);
    // The demo is stopped by hand: no drain delay to sit through.
    run.drain_delay = Duration::ZERO;
    run.shutdown_timeout = Duration::from_secs(5);
    let config = canary_proxy::DemoConfig {
        routes: args.routes,
        listen: args.listen,
        admin_listen: args.admin_listen,
        canary_error_rate: args.canary_error_rate,
        canary_latency: args.canary_latency,
        traffic_per_second: args.traffic,
        sticky: args.sticky,
        progressive: args.progressive,
        duration: args.duration,
        run,
    };
    runtime(0)?.block_on(canary_proxy::run_demo(config))
}
