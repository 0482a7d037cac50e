//! How many client connections the proxy holds at once, and the default
//! that fits the memory and the descriptors the process is given.
//!
//! An open connection costs memory whether or not it sends anything, and a
//! connection mid-request can hold up to the request-head cap in hyper's
//! read buffer. Without a limit, enough of them OOM-kill the proxy and every
//! request in flight dies with it. At the limit a new connection is
//! accepted and closed at once, and counted
//! (`canary_proxy_connections_rejected_total`): the client sees a closed
//! connection and can retry elsewhere, instead of waiting in the kernel's
//! backlog for a slot that may not come.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

/// What the process keeps for itself before any connection: the binary,
/// the runtime, the metrics registry, the routes, the upstream pools.
/// Measured at 10-15 MB resident; the rest is headroom.
const RESERVED_BYTES: u64 = 48 << 20;
/// Besides its head buffer, a connection holds hyper's connection state, a
/// write buffer, its share of the upstream pool and the kernel's socket
/// buffers (not in RSS, but in the pod's memory cgroup). Measured about
/// 12 KB for an idle HTTP/1 connection (docs/performance.md); budgeted at
/// 24 KiB.
const PER_CONNECTION_OVERHEAD: u64 = 24 << 10;
/// Descriptors kept for everything that is not a client connection.
const RESERVED_FDS: u64 = 128;
/// The default never goes below this (a tiny pod still serves) or above
/// the ceiling (a limit nobody set should not be astronomical).
const MIN_DEFAULT: u64 = 64;
const MAX_DEFAULT: u64 = 65_536;

/// The limit in force, and where it came from, for the log and the docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Derived {
    pub(crate) max: usize,
    pub(crate) why: String,
}

/// The default `--max-connections`: what the memory limit (the pod's
/// cgroup limit, if any) and the descriptor limit allow, each connection
/// budgeted at the worst it can hold (`max_request_head` plus overhead).
/// Each client connection may need one upstream connection too, so it
/// counts for two descriptors.
pub(crate) fn default_max_connections(
    max_request_head: usize,
    memory_limit: Option<u64>,
    fd_limit: Option<u64>,
) -> Derived {
    let per_connection = max_request_head as u64 + PER_CONNECTION_OVERHEAD;
    let by_memory = memory_limit.map(|m| m.saturating_sub(RESERVED_BYTES) / per_connection);
    let by_fds = fd_limit.map(|f| f.saturating_sub(RESERVED_FDS) / 2);
    let mut max = MAX_DEFAULT;
    let mut why = format!("the ceiling of {MAX_DEFAULT}");
    if let Some(m) = by_memory.filter(|m| *m < max) {
        max = m;
        why = format!(
            "the memory limit of {} MiB, less {} MiB for the process, at {} KiB per connection",
            memory_limit.unwrap_or(0) >> 20,
            RESERVED_BYTES >> 20,
            per_connection >> 10
        );
    }
    if let Some(f) = by_fds.filter(|f| *f < max) {
        max = f;
        why = format!(
            "the descriptor limit of {}, two per connection",
            fd_limit.unwrap_or(0)
        );
    }
    if max < MIN_DEFAULT {
        max = MIN_DEFAULT;
        why = format!("the floor of {MIN_DEFAULT} (the limits allow fewer; {why})");
    }
    Derived {
        max: max as usize,
        why,
    }
}

/// The memory limit of this process's cgroup (v2, then v1), if one is set.
pub(crate) fn cgroup_memory_limit() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    if let Some(v2) = read("/sys/fs/cgroup/memory.max") {
        return v2.trim().parse().ok(); // "max" means no limit
    }
    let v1: u64 = read("/sys/fs/cgroup/memory/memory.limit_in_bytes")?
        .trim()
        .parse()
        .ok()?;
    // v1 says "no limit" with a number near u64::MAX, page-aligned.
    (v1 < 1 << 60).then_some(v1)
}

/// Client connections open, against the limit.
#[derive(Debug)]
pub(crate) struct ConnectionLimit {
    open: AtomicUsize,
    max: usize,
    gauge: IntGauge,
    rejected: IntCounter,
    /// When a rejection was last logged (ms since `epoch`): a flood of them
    /// logs once a second, the counter keeps every one.
    last_logged: AtomicU64,
    epoch: Instant,
}

/// One connection's place under the limit, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<ConnectionLimit>);

impl ConnectionLimit {
    pub(crate) fn new(max: usize, gauge: IntGauge, rejected: IntCounter) -> Arc<Self> {
        Arc::new(ConnectionLimit {
            open: AtomicUsize::new(0),
            max,
            gauge,
            rejected,
            last_logged: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// A slot for a new connection, or `None` (counted) at the limit.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max).then_some(n + 1))
            .is_ok();
        if !taken {
            self.rejected.inc();
            let now = self.epoch.elapsed().as_millis() as u64;
            let last = self.last_logged.load(Relaxed);
            if now.saturating_sub(last) >= Duration::from_secs(1).as_millis() as u64
                && self
                    .last_logged
                    .compare_exchange(last, now.max(1), Relaxed, Relaxed)
                    .is_ok()
            {
                tracing::warn!(max = self.max, rejected_total = self.rejected.get(), "connection limit reached: closing new connections at once (--max-connections); logged once a second");
            }
            return None;
        }
        self.gauge.inc();
        Some(Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Relaxed);
        self.0.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_default_fits_memory_and_descriptors() {
        // A 128 MiB pod at a 64 KiB head cap: (128 - 48) MiB / 88 KiB.
        let d = default_max_connections(64 << 10, Some(128 * MIB), Some(1 << 20));
        assert_eq!(d.max, (80 * MIB / (88 << 10)) as usize);
        assert!(d.why.contains("memory limit of 128 MiB"), "{}", d.why);
        // Few descriptors: two per connection.
        let d = default_max_connections(64 << 10, Some(1 << 40), Some(1024));
        assert_eq!(d.max, (1024 - 128) / 2);
        assert!(d.why.contains("descriptor limit of 1024"), "{}", d.why);
        // No limits at all: the ceiling. Absurdly small ones: the floor.
        assert_eq!(default_max_connections(64 << 10, None, None).max, 65_536);
        assert_eq!(
            default_max_connections(64 << 10, Some(50 * MIB), None).max,
            64
        );
    }

    #[test]
    fn slots_are_given_back_and_rejections_counted() {
        let gauge = IntGauge::new("g", "g").unwrap();
        let rejected = IntCounter::new("r", "r").unwrap();
        let limit = ConnectionLimit::new(2, gauge.clone(), rejected.clone());
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        assert!(limit.try_acquire().is_none());
        assert_eq!((gauge.get(), rejected.get()), (2, 2));
        drop(a);
        assert_eq!(gauge.get(), 1);
        assert!(limit.try_acquire().is_some());
    }
}
