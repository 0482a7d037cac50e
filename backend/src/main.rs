//! The `ping-backend` binary: flags, logging, the bind, the ready line, and the
//! signals that start a graceful shutdown. Everything else lives in the library.
#![forbid(unsafe_code)]

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use clap::Parser;
use ping_backend::flags::Flags;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Exits with clap's one-line message (and code 2) on a bad flag or env var.
    let flags = Flags::parse();
    init_tracing();
    match run(flags) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the whole cause chain: a user reads it in `kubectl logs`.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[tokio::main]
async fn run(flags: Flags) -> anyhow::Result<()> {
    // Installed before binding so that a SIGTERM arriving right after the
    // "listening on" line starts a graceful shutdown instead of killing us.
    let shutdown = shutdown_signal().context("cannot install the SIGTERM/SIGINT handlers")?;
    let listener = TcpListener::bind(&flags.listen).await.map_err(|err| {
        anyhow!(
            "--listen {}: cannot bind: {err}; give an address like 0.0.0.0:8080",
            flags.listen
        )
    })?;
    ready_line(listener.local_addr()?);
    ping_backend::serve(listener, flags.config(), shutdown).await?;
    Ok(())
}

/// One line of JSON on stdout once the listener is bound (logs go to stderr), so
/// a script or test started with `--listen 127.0.0.1:0` learns the port without
/// parsing log text: `{"listening":{"addr":"127.0.0.1:41236"}}`. Connections made
/// as soon as it is read wait in the listen backlog until `serve` accepts them.
fn ready_line(addr: SocketAddr) {
    // Written by hand: an address's text holds no character JSON escapes, and
    // the binary needs no JSON library for this one line.
    let line = format!(r#"{{"listening":{{"addr":"{addr}"}}}}"#);
    let mut stdout = std::io::stdout().lock();
    // Nobody reading stdout is no reason to stop serving.
    if let Err(err) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        tracing::warn!(error = %err, "cannot print the ready line on stdout");
    }
}

/// Logs go to stderr as structured lines; RUST_LOG overrides the `info` default.
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// A future that resolves on the first SIGTERM (what Kubernetes sends) or SIGINT
/// (Ctrl-C). The handlers are registered when this returns, not when first polled.
#[cfg(unix)]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "received {name}: starting graceful shutdown");
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("received Ctrl-C: starting graceful shutdown");
    })
}
