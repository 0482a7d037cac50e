//! The endpoints of a version, and which one a request goes to.
//!
//! Without discovery a version has one endpoint: its `upstream` as written,
//! usually a ClusterIP Service, where kube-proxy picks the pod per
//! connection. With `discovery = "dns"` the upstream names a headless
//! Service, and the endpoints are every address its DNS name resolves to,
//! one per ready pod, refreshed in the background ([`spawn_refresh`]).
//!
//! Each request picks an endpoint by **power of two choices** on requests
//! in flight: two endpoints at random, the one with fewer requests under
//! way. It needs no clock, no tuning and no shared state beyond a counter
//! per endpoint, reacts to a slow pod within one request (its count
//! grows), and cannot herd every request onto one "best" endpoint the way
//! least-loaded or a stale EWMA can. (docs/operations.md has the numbers.)
//!
//! An endpoint that fails [`EJECT_AFTER`] times in a row (connect failures,
//! or answers that count as errors) is **ejected**: it gets no requests for
//! [`EJECTION_BASE`] times the number of its ejections so far, up to
//! [`EJECTION_MAX`]. At most [`MAX_EJECTED_PERCENT`] of a version's
//! endpoints are ejected at once, so a version with one endpoint (the
//! ClusterIP case) never is: its failures are the rollback judgment's to
//! weigh. Ejection acts per pod and at once; the judgment weighs the
//! version as a whole, so one bad pod among healthy ones is ejected before
//! its errors add up to a rollback.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::uri::Authority;

use crate::metrics::VersionMetrics;

/// Failures in a row that eject an endpoint (Envoy's consecutive_5xx).
pub(crate) const EJECT_AFTER: u32 = 5;
/// The first ejection's length; the n-th lasts n times as long.
pub(crate) const EJECTION_BASE: Duration = Duration::from_secs(30);
/// No ejection lasts longer.
pub(crate) const EJECTION_MAX: Duration = Duration::from_secs(300);
/// At most this share of a version's endpoints is ejected at once.
pub(crate) const MAX_EJECTED_PERCENT: usize = 50;
/// Refresh bounds: the DNS TTL is honoured between these.
pub(crate) const REFRESH_MIN: Duration = Duration::from_secs(1);
pub(crate) const REFRESH_MAX: Duration = Duration::from_secs(30);
/// The refresh period when an answer carries no usable TTL.
pub(crate) const REFRESH_DEFAULT: Duration = Duration::from_secs(5);
/// A lookup that takes longer has failed.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Every address of a host, and how long the answer may be kept; or why
/// the lookup failed.
pub(crate) type Lookup = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(Vec<IpAddr>, Option<Duration>), String>> + Send>,
>;

/// A name resolver (`dns::Dns`; a test can bring its own).
pub(crate) trait Resolve: Send + Sync + std::fmt::Debug {
    fn lookup(&self, host: String) -> Lookup;
}

/// One address of a version.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    /// `addr` as the connection pools key it.
    pub(crate) authority: Authority,
    in_flight: AtomicUsize,
    failures_in_a_row: AtomicU32,
    /// Milliseconds since the set's epoch until which it gets no requests;
    /// 0 when it is not ejected.
    ejected_until: AtomicU64,
    ejections: AtomicU32,
}

impl Endpoint {
    fn new(addr: SocketAddr, authority: Authority) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            addr,
            authority,
            in_flight: AtomicUsize::new(0),
            failures_in_a_row: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        })
    }

    fn ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Relaxed) > now_ms
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Relaxed)
    }
}

/// What discovery last did, for `/status`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Refresh {
    pub(crate) last_success: Option<SystemTime>,
    pub(crate) last_error: Option<(SystemTime, String)>,
}

/// A version's endpoints.
#[derive(Debug)]
pub(crate) struct Endpoints {
    /// The upstream as written: the name discovery resolves.
    pub(crate) upstream: Authority,
    pub(crate) discovery: bool,
    list: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Set once the first lookup has answered (or at once without
    /// discovery); requests wait for it, up to their connect timeout.
    ready: tokio::sync::watch::Sender<bool>,
    epoch: Instant,
    refresh: Mutex<Refresh>,
    metrics: Arc<VersionMetrics>,
}

/// A request's hold on an endpoint: counted in its requests in flight
/// until dropped, and the place its outcome is reported.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) endpoint: Arc<Endpoint>,
    set: Arc<Endpoints>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Relaxed);
    }
}

impl Lease {
    /// The endpoint answered (`ok`), or failed: a connect failure, or an
    /// answer that counts as an error.
    pub(crate) fn report(&self, ok: bool) {
        let ep = &self.endpoint;
        if ok {
            ep.failures_in_a_row.store(0, Relaxed);
            return;
        }
        let failures = ep.failures_in_a_row.fetch_add(1, Relaxed) + 1;
        if failures >= EJECT_AFTER {
            self.set.try_eject(ep, failures);
        }
    }
}

impl Endpoints {
    /// One fixed endpoint: the upstream itself (no discovery).
    pub(crate) fn fixed(upstream: Authority, metrics: Arc<VersionMetrics>) -> Arc<Endpoints> {
        let endpoint = Endpoint::new(unresolved(&upstream), upstream.clone());
        let (ready, _) = tokio::sync::watch::channel(true);
        Arc::new(Endpoints {
            upstream,
            discovery: false,
            list: ArcSwap::from_pointee(vec![endpoint]),
            ready,
            epoch: Instant::now(),
            refresh: Mutex::new(Refresh::default()),
            metrics,
        })
    }

    /// Endpoints found by resolving `upstream`'s host, refreshed by a task
    /// on the current runtime for as long as the set is in use.
    pub(crate) fn discovered(
        upstream: Authority,
        metrics: Arc<VersionMetrics>,
        resolver: Arc<dyn Resolve>,
    ) -> Arc<Endpoints> {
        let (ready, _) = tokio::sync::watch::channel(false);
        let set = Arc::new(Endpoints {
            upstream,
            discovery: true,
            list: ArcSwap::from_pointee(Vec::new()),
            ready,
            epoch: Instant::now(),
            refresh: Mutex::new(Refresh::default()),
            metrics,
        });
        spawn_refresh(Arc::downgrade(&set), resolver);
        set
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn list(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.list.load_full()
    }

    pub(crate) fn refresh_state(&self) -> Refresh {
        self.refresh.lock().expect("refresh lock").clone()
    }

    /// Whether `ep` is ejected now.
    pub(crate) fn is_ejected(&self, ep: &Endpoint) -> bool {
        ep.ejected(self.now_ms())
    }

    /// Wait, at most `limit`, for the first lookup to answer.
    pub(crate) async fn wait_ready(&self, limit: Duration) {
        let mut rx = self.ready.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|r| *r)).await;
    }

    /// An endpoint for one request, by power of two choices on requests in
    /// flight, leaving out `except` (the one that just failed) and ejected
    /// ones. `None` when there is none to pick.
    pub(crate) fn pick(self: &Arc<Self>, except: Option<&Arc<Endpoint>>) -> Option<Lease> {
        let list = self.list.load();
        let now = self.now_ms();
        let usable =
            |ep: &Arc<Endpoint>| !ep.ejected(now) && except.is_none_or(|x| !Arc::ptr_eq(x, ep));
        let chosen = match list.len() {
            0 => return None,
            1 => list.first().filter(|ep| usable(ep))?.clone(),
            n => {
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let (x, y) = (&list[a], &list[b]);
                match (usable(x), usable(y)) {
                    (true, true) if y.in_flight() < x.in_flight() => y.clone(),
                    (true, _) => x.clone(),
                    (false, true) => y.clone(),
                    // Both drawn were out: choose among those left.
                    (false, false) => {
                        let left: Vec<&Arc<Endpoint>> =
                            list.iter().filter(|ep| usable(ep)).collect();
                        if left.is_empty() {
                            return None;
                        }
                        let x = left[fastrand::usize(..left.len())];
                        let y = left[fastrand::usize(..left.len())];
                        if y.in_flight() < x.in_flight() { y } else { x }.clone()
                    }
                }
            }
        };
        chosen.in_flight.fetch_add(1, Relaxed);
        Some(Lease {
            endpoint: chosen,
            set: self.clone(),
        })
    }

    fn try_eject(&self, ep: &Arc<Endpoint>, failures: u32) {
        let now = self.now_ms();
        if ep.ejected(now) {
            return;
        }
        let list = self.list.load();
        let ejected = list.iter().filter(|e| e.ejected(now)).count();
        if (ejected + 1) * 100 > list.len() * MAX_EJECTED_PERCENT {
            return;
        }
        // An endpoint that behaved for a long while starts over.
        let ended = ep.ejected_until.load(Relaxed);
        if ended > 0 && now.saturating_sub(ended) > EJECTION_MAX.as_millis() as u64 {
            ep.ejections.store(0, Relaxed);
        }
        let n = ep.ejections.fetch_add(1, Relaxed) + 1;
        let length = (EJECTION_BASE * n).min(EJECTION_MAX);
        ep.ejected_until
            .store(now + length.as_millis() as u64, Relaxed);
        ep.failures_in_a_row.store(0, Relaxed);
        self.metrics.endpoint_ejections.inc();
        tracing::warn!(version = %self.metrics.name, endpoint = %ep.addr, failures, ejected_for = %humantime::format_duration(length), "endpoint ejected: it failed {failures} times in a row; its siblings take its requests");
    }

    /// Publish a fresh set of addresses: endpoints still present keep
    /// their state (requests in flight, ejection); new ones start clean.
    fn publish(&self, addrs: &[IpAddr]) {
        let port = self.upstream.port_u16().unwrap_or(80);
        let old = self.list.load();
        let mut fresh = Vec::with_capacity(addrs.len());
        for ip in addrs {
            let addr = SocketAddr::new(*ip, port);
            if fresh.iter().any(|e: &Arc<Endpoint>| e.addr == addr) {
                continue;
            }
            match old.iter().find(|e| e.addr == addr) {
                Some(e) => fresh.push(e.clone()),
                None => {
                    let authority: Authority = addr
                        .to_string()
                        .parse()
                        .expect("a socket address is an authority");
                    fresh.push(Endpoint::new(addr, authority));
                }
            }
        }
        fresh.sort_by_key(|e| e.addr);
        let changed =
            fresh.len() != old.len() || fresh.iter().zip(old.iter()).any(|(a, b)| a.addr != b.addr);
        if changed {
            let list: Vec<String> = fresh.iter().map(|e| e.addr.to_string()).collect();
            tracing::info!(version = %self.metrics.name, upstream = %self.upstream, endpoints = %list.join(","), "endpoints changed");
        }
        self.list.store(Arc::new(fresh));
    }
}

/// The address a fixed upstream is shown as: its IP and port when it is
/// written as one, else unspecified (a name, resolved at connect time).
fn unresolved(upstream: &Authority) -> SocketAddr {
    let port = upstream.port_u16().unwrap_or(80);
    let host = upstream
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    host.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, port))
        .unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port))
}

/// Resolve the set's host now and then, for as long as the set is in use
/// (a reload that drops it ends the task). Honours the answer's TTL within
/// [`REFRESH_MIN`]..[`REFRESH_MAX`]; a failed lookup, or one with no
/// address, keeps the last good endpoints, and is counted and logged.
fn spawn_refresh(set: Weak<Endpoints>, resolver: Arc<dyn Resolve>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::error!("no runtime to run DNS discovery on");
        return;
    };
    runtime.spawn(async move {
        let mut logged_failure = false;
        loop {
            let Some(host) = set.upgrade().map(|s| s.upstream.host().to_owned()) else {
                return;
            };
            let result = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup(host.clone()))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {}", humantime::format_duration(LOOKUP_TIMEOUT))));
            let Some(s) = set.upgrade() else {
                return;
            };
            let wait = match result {
                Ok((addrs, ttl)) if !addrs.is_empty() => {
                    s.publish(&addrs);
                    s.metrics.dns_refresh(true);
                    s.refresh.lock().expect("refresh lock").last_success = Some(SystemTime::now());
                    s.ready.send_replace(true);
                    if logged_failure {
                        tracing::info!(version = %s.metrics.name, %host, "DNS discovery answers again");
                        logged_failure = false;
                    }
                    ttl.unwrap_or(REFRESH_DEFAULT).clamp(REFRESH_MIN, REFRESH_MAX)
                }
                other => {
                    let why = match other {
                        Ok(_) => "no address in the answer".to_owned(),
                        Err(e) => e,
                    };
                    s.metrics.dns_refresh(false);
                    s.refresh.lock().expect("refresh lock").last_error =
                        Some((SystemTime::now(), why.clone()));
                    if !logged_failure {
                        tracing::warn!(version = %s.metrics.name, %host, error = %why, kept = s.list.load().len(), "DNS discovery failed; keeping the last good endpoints");
                        logged_failure = true;
                    }
                    // Requests waiting for a first answer need not wait on.
                    s.ready.send_replace(true);
                    REFRESH_MIN * 2
                }
            };
            drop(s);
            tokio::time::sleep(wait).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(n: usize) -> Arc<Endpoints> {
        let metrics = Arc::new(crate::metrics::Metrics::new().version("v"));
        let set = Endpoints::fixed("127.0.0.1:1".parse().unwrap(), metrics);
        let addrs: Vec<IpAddr> = (0..n)
            .map(|i| IpAddr::from([127, 0, 0, 2 + i as u8]))
            .collect();
        set.publish(&addrs);
        set
    }

    #[test]
    fn two_choices_prefer_the_endpoint_with_fewer_requests_in_flight() {
        let set = set_of(2);
        // With two endpoints every pick sees both, so requests held open
        // spread evenly whatever the random draws.
        let held: Vec<Lease> = (0..25).map(|_| set.pick(None).unwrap()).collect();
        let list = set.list();
        let (a, b) = (list[0].in_flight(), list[1].in_flight());
        assert_eq!(a + b, 25);
        assert!(a.abs_diff(b) <= 1, "{a} and {b} in flight");
        drop(held);
        assert_eq!(list[0].in_flight() + list[1].in_flight(), 0);
    }

    #[test]
    fn five_failures_in_a_row_eject_and_at_most_half_are_ejected() {
        let set = set_of(4);
        let list = set.list();
        for ep in list.iter().take(3) {
            let lease = Lease {
                endpoint: ep.clone(),
                set: set.clone(),
            };
            ep.in_flight.fetch_add(1, Relaxed);
            for _ in 0..EJECT_AFTER {
                lease.report(false);
            }
        }
        let ejected = list.iter().filter(|e| set.is_ejected(e)).count();
        assert_eq!(ejected, 2, "half of four, not three");
        // Picks avoid the ejected ones.
        for _ in 0..100 {
            let lease = set.pick(None).unwrap();
            assert!(!set.is_ejected(&lease.endpoint));
        }
        // A success resets the count: four failures, a success, four more
        // do not eject.
        let last = list[3].clone();
        last.in_flight.fetch_add(1, Relaxed);
        let lease = Lease {
            endpoint: last.clone(),
            set: set.clone(),
        };
        for _ in 0..EJECT_AFTER - 1 {
            lease.report(false);
        }
        lease.report(true);
        for _ in 0..EJECT_AFTER - 1 {
            lease.report(false);
        }
        assert!(!set.is_ejected(&last));
    }

    #[test]
    fn one_endpoint_is_never_ejected() {
        let set = set_of(1);
        let lease = set.pick(None).unwrap();
        for _ in 0..50 {
            lease.report(false);
        }
        assert!(!set.is_ejected(&lease.endpoint));
    }

    #[test]
    fn a_refresh_keeps_the_state_of_endpoints_still_there() {
        let set = set_of(2);
        let kept = set.list()[1].clone();
        let _lease = Lease {
            endpoint: kept.clone(),
            set: set.clone(),
        };
        kept.in_flight.fetch_add(1, Relaxed);
        set.publish(&[kept.addr.ip(), IpAddr::from([127, 0, 0, 9])]);
        let list = set.list();
        assert_eq!(list.len(), 2);
        assert!(list.iter().any(|e| Arc::ptr_eq(e, &kept)));
        assert_eq!(kept.in_flight(), 1);
    }

    #[test]
    fn picks_leave_out_the_one_that_just_failed() {
        let set = set_of(3);
        let failed = set.list()[0].clone();
        for _ in 0..100 {
            let lease = set.pick(Some(&failed)).unwrap();
            assert!(!Arc::ptr_eq(&lease.endpoint, &failed));
        }
        let one = set_of(1);
        let only = one.list()[0].clone();
        assert!(one.pick(Some(&only)).is_none());
    }
}
