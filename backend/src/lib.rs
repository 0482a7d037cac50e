//! ping-backend: the service of the tutorial this product grew from ("on request
//! ping it answers pong"), made fit for rolling updates. It runs as both the stable
//! and the canary version behind canary-proxy; the proxy's tests and demo start it
//! in-process through [`spawn`].
//!
//! # Layout
//! - [`config`]: [`Config`], the settings of one running backend.
//! - [`flags`]: the command line (clap, every flag also read from a `PING_*` env var)
//!   and the parsers that turn a bad value into a message naming its accepted form.
//! - `service`: routing of the endpoints (`/ping`, `/upload` (a ping that reads
//!   its request body first), `/echo`, `/healthz`, `/readyz`, 404 for anything
//!   else).
//! - `drain`: the readiness flag that `/readyz` reports and the last shutdown phase,
//!   waiting for in-flight connections up to the shutdown timeout.
//! - `server`: the accept loop and the shutdown sequence ([`serve`]), and the
//!   in-process [`spawn`] / [`Handle`] used by tests and the demo.
//! - `testkit` (only with the `testkit` feature, which only tests turn on): the
//!   child processes of the integration tests of both crates.
//!
//! `main.rs` only parses flags, sets up tracing, binds, prints the ready line, and
//! calls [`serve`] with a future that resolves on SIGTERM or SIGINT.
#![forbid(unsafe_code)]
// `pub` only for what the crate exports; everything else says `pub(crate)`.
#![warn(unreachable_pub)]

pub mod config;
mod drain;
pub mod flags;
mod server;
mod service;
/// For the integration tests of ping-backend and canary-proxy, not for
/// production: starts their binaries and reads the ready line they print.
#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::Config;
pub use server::{serve, spawn, Handle};
