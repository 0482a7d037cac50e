//! canary-proxy: a reverse proxy for canary and blue-green releases.
//!
//! # Layout
//!
//! Data flows one way along each path; every module has one job.
//!
//! **Requests**, left to right:
//! `server` (accept under `server::limits`; HTTP/1.1 or h2c chosen by
//! `server::preface`, HTTPS with ALPN through `tls`; the client's deadlines
//! in `server::timeouts`) -> `forward` (`forward::target` refuses what must
//! not be forwarded; pick a version with `split` from the current
//! `snapshot`; `forward::headers` rewrites, `forward::upload` paces the
//! request body and notes how it ended, `forward::retry` retries once on
//! the target, `forward::upgrade` tunnels WebSockets, `forward::answer`
//! makes the proxy's own answers, `forward::log_limit` keeps per-request
//! logs bounded) -> `endpoints` (which address of the version: power of
//! two choices, ejection; `dns` refreshes a discovered set) -> `upstream`
//! (the keep-alive pools of each event loop, one per address) ->
//! `forward::observe` (one record per request, into `metrics` and the
//! version's `guard::Judgment`). `body` is the body wrapper both `upstream`
//! and `observe` use.
//!
//! **Config**, left to right:
//! `watch` (the ConfigMap directory, and the TLS Secret's) -> `reload` ->
//! `routes` (read, parse, validate) -> `control` (the one writer) ->
//! `snapshot::Store` (one `ArcSwap<Snapshot>`).
//!
//! **The one edge back up the flow**: a rollback verdict. The request path
//! holds it as `guard::Verdicts`, a one-method interface that `control`
//! implements; it never sees `control` itself.
//!
//! **Admin**: `admin` serves `/healthz`, `/readyz`, `/metrics` and
//! `/status` on a port of its own, from typed read-only views
//! (`admin::status`).
//!
//! Client connections run on the event loops of `event_loops` (one, or one
//! per thread with `--threads N`). Time comes from a `clock::Clock`, so the
//! judgment and the control plane run on simulated time in tests.
//!
//! **The `status` command**: `status_view` reads a running proxy's
//! `/status` over HTTP, as JSON only (never through the types of
//! `admin::status`, since the proxy may be another release), and draws it
//! in the terminal.
//!
//! `proxy` wires all of it together ([`Proxy`]); `main.rs` only parses
//! flags. `demo` (cargo feature `demo`, on by default) runs the whole thing
//! locally with two in-process ping backends.
#![forbid(unsafe_code)]
// `pub` only for what the crate exports; everything else says `pub(crate)`.
#![warn(unreachable_pub)]

mod admin;
mod body;
mod clock;
mod control;
#[cfg(feature = "demo")]
mod demo;
mod dns;
mod endpoints;
mod event_loops;
mod forward;
mod grpc_status;
mod guard;
mod metrics;
mod progress;
mod proxy;
mod reload;
mod routes;
mod server;
mod snapshot;
mod split;
mod status_view;
mod tls;
mod upstream;
mod watch;

pub use forward::ForwardConfig;
pub use proxy::{run, shutdown_signal, Listeners, Proxy, RunConfig, StartError};
pub use routes::{content_hash, RoutesError};
pub use server::ServerConfig;
pub use status_view::{show_status, AdminUrl, AdminUrlError, StatusOptions, StatusOutput, Verdict};
pub use tls::{provider as tls_crypto_provider, TlsConfig, TlsError};
pub use watch::WatchConfig;

#[cfg(feature = "demo")]
pub use demo::{run as run_demo, DemoConfig};

/// Validate the routes file at `path`: what `canary-proxy check` runs.
/// On success, the summary `check` prints.
pub fn check_routes(path: &std::path::Path) -> Result<String, RoutesError> {
    routes::load(path).map(|table| table.describe())
}

/// What the benches and examples drive directly, outside a running proxy:
/// the real decision code (`bench/detection` simulates traffic through it),
/// the evidence window and the metrics handles.
pub mod bench {
    pub use crate::clock::{Clock, ManualClock, SystemClock};
    pub use crate::guard::{Counts, Criterion, Judgment, Outcome, Totals, Trip, Window};
    pub use crate::metrics::{Metrics, VersionMetrics};

    /// The judgment of each version of a routes file, in file order, built
    /// exactly as the control plane builds them (the target's only counts).
    pub fn judgments(routes_toml: &str) -> Result<Vec<Judgment>, String> {
        let table = crate::routes::parse(routes_toml.as_bytes()).map_err(|problems| {
            problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(crate::control::judgments(&table))
    }
}
