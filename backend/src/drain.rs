//! Shutdown state: the readiness flag `/readyz` reports, and the last phase of a
//! shutdown, waiting for in-flight connections.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::server::graceful::GracefulShutdown;
use tokio::task::JoinSet;

/// Whether this backend still wants new traffic. Cloned into every connection;
/// flipped once, when shutdown begins, and never back.
#[derive(Debug, Clone, Default)]
pub(crate) struct Readiness {
    draining: Arc<AtomicBool>,
}

impl Readiness {
    pub(crate) fn is_ready(&self) -> bool {
        // Relaxed is enough: the flag guards no other data, and a request that
        // reads the old value a moment late is indistinguishable from one that
        // arrived a moment earlier.
        !self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// How the wait for in-flight connections ended.
#[derive(Debug, PartialEq)]
pub(crate) enum Finished {
    AllConnections,
    TimedOut { open: usize },
}

/// Ask every connection to finish (HTTP/1.1: close after the in-flight response,
/// or at once if idle; HTTP/2: GOAWAY) and wait up to `timeout` for them.
/// Connections still open after that are aborted, so neither the process nor a
/// test's runtime is left with server tasks behind.
pub(crate) async fn finish_connections(
    graceful: GracefulShutdown,
    mut connections: JoinSet<()>,
    timeout: Duration,
) -> Finished {
    match tokio::time::timeout(timeout, graceful.shutdown()).await {
        Ok(()) => Finished::AllConnections,
        Err(_elapsed) => {
            // Reap tasks that ended on their own so the count is the open ones.
            while connections.try_join_next().is_some() {}
            let open = connections.len();
            connections.abort_all();
            Finished::TimedOut { open }
        }
    }
}
