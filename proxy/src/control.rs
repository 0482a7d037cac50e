//! The control plane: the only writer of the snapshot store.
//!
//! Two things change routing: a routes reload (from `watch`) and a rollback
//! verdict (from the request path, via `guard`). Both go through [`Control`],
//! under one mutex, and both end in one `ArcSwap::store` of a whole new
//! [`Snapshot`]. The mutex is taken only on those rare events; requests
//! never touch it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::HeaderValue;
use serde_json::{json, Value};

use crate::guard::{Totals, Window};
use crate::metrics::{Metrics, VersionMetrics};
use crate::routes::{RouteTable, VersionSpec};
use crate::snapshot::{RollbackRecord, Snapshot, VersionRuntime};
use crate::split::Split;

pub struct Control {
    store: ArcSwap<Snapshot>,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
    /// Base of the monotonic clock the guard windows count in.
    epoch: Instant,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("generation", &self.store.load().generation)
            .finish()
    }
}

struct Inner {
    table: Arc<RouteTable>,
    loaded_at: SystemTime,
    generation: u64,
    /// Per version name, kept while the name is in the routes file.
    version_metrics: HashMap<String, Arc<VersionMetrics>>,
    /// Per version name: the entry and window length the window counts for.
    windows: HashMap<String, (VersionSpec, Duration, Arc<Window>)>,
    /// Latched rollbacks, with the entry they were latched for: only a
    /// change of that entry clears them.
    latches: HashMap<String, (VersionSpec, Arc<RollbackRecord>)>,
    reload: ReloadStatus,
}

/// What the watcher reports, for `/status` and metrics.
#[derive(Debug, Clone, Default)]
pub struct ReloadStatus {
    pub successes: u64,
    pub failures: u64,
    pub last_success: Option<SystemTime>,
    pub last_error: Option<(SystemTime, String)>,
}

/// Result of offering new routes to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A new snapshot was published.
    Published,
    /// Same content as the active table; nothing to do.
    Unchanged,
}

impl Control {
    pub fn new(table: RouteTable, metrics: Arc<Metrics>) -> Arc<Self> {
        let now = SystemTime::now();
        let mut inner = Inner {
            table: Arc::new(table),
            loaded_at: now,
            generation: 0,
            version_metrics: HashMap::new(),
            windows: HashMap::new(),
            latches: HashMap::new(),
            reload: ReloadStatus {
                last_success: Some(now),
                ..Default::default()
            },
        };
        metrics.set_config_hash(None, &inner.table.hash);
        metrics.config_last_success.set(unix_seconds(now));
        let snapshot = build(&mut inner, &metrics);
        Arc::new(Control {
            store: ArcSwap::from_pointee(snapshot),
            inner: Mutex::new(inner),
            metrics,
            epoch: Instant::now(),
        })
    }

    /// The snapshot a request routes by, for its whole life.
    pub fn load(&self) -> Arc<Snapshot> {
        self.store.load_full()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Monotonic time for the guard windows.
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// Offer a freshly validated table. Called by the watcher.
    pub fn apply(&self, table: RouteTable) -> Applied {
        let mut inner = self.inner.lock().unwrap();
        let now = SystemTime::now();
        inner.reload.last_success = Some(now);
        inner.reload.last_error = None;
        self.metrics.config_last_success.set(unix_seconds(now));
        if table == *inner.table {
            return Applied::Unchanged;
        }
        let old = std::mem::replace(&mut inner.table, Arc::new(table));
        inner.loaded_at = now;
        inner.reload.successes += 1;
        self.metrics.config_reload(true);
        self.metrics
            .set_config_hash(Some(&old.hash), &inner.table.hash);
        self.reset_latches(&mut inner);
        let snapshot = build(&mut inner, &self.metrics);
        tracing::info!(
            old = %weights(&old),
            new = %weights(&inner.table),
            hash = %inner.table.hash,
            generation = snapshot.generation,
            "routes reloaded"
        );
        self.store.store(Arc::new(snapshot));
        Applied::Published
    }

    /// Record a reload that failed; the active snapshot stays.
    pub fn reload_failed(&self, error: String) {
        let mut inner = self.inner.lock().unwrap();
        inner.reload.failures += 1;
        inner.reload.last_error = Some((SystemTime::now(), error));
        self.metrics.config_reload(false);
    }

    pub fn reload_status(&self) -> ReloadStatus {
        self.inner.lock().unwrap().reload.clone()
    }

    /// The guard's verdict for `version`: latch a rollback and publish.
    /// `window` identifies the evidence, so a verdict computed on a window
    /// that an operator has since reset is ignored.
    pub fn trip(&self, version: &str, window: &Arc<Window>, totals: Totals) {
        let mut inner = self.inner.lock().unwrap();
        let Some(policy) = inner.table.rollback.clone() else {
            return;
        };
        let Some(index) = inner.table.index_of(version) else {
            return;
        };
        let current = inner
            .windows
            .get(version)
            .map(|(_, _, w)| Arc::ptr_eq(w, window))
            .unwrap_or(false);
        if !current || inner.latches.contains_key(version) || index == policy.target {
            return;
        }
        let record = Arc::new(RollbackRecord {
            at: SystemTime::now(),
            ratio: totals.ratio(),
            errors: totals.errors,
            requests: totals.requests,
            threshold: policy.error_rate,
            window_secs: policy.window.as_secs_f64(),
            target: inner.table.versions[policy.target].name.clone(),
        });
        window.latch();
        let spec = inner.table.versions[index].clone();
        inner
            .latches
            .insert(version.to_owned(), (spec, record.clone()));
        if let Some(vm) = inner.version_metrics.get(version) {
            vm.rollbacks.inc();
        }
        let snapshot = build(&mut inner, &self.metrics);
        tracing::warn!(
            version,
            ratio = format_args!("{:.4}", record.ratio),
            errors = record.errors,
            requests = record.requests,
            window = %humantime::format_duration(policy.window),
            threshold = record.threshold,
            target = %record.target,
            generation = snapshot.generation,
            "rolled back: error ratio above threshold; its traffic now goes to the target until its entry in the routes file changes"
        );
        self.store.store(Arc::new(snapshot));
    }

    /// Clear latches whose version entry changed, disappeared, or became
    /// the target; log and count each reset.
    fn reset_latches(&self, inner: &mut Inner) {
        let table = inner.table.clone();
        let target = table.rollback.as_ref().map(|r| r.target);
        inner.latches.retain(|name, (spec, _)| {
            let index = table.index_of(name);
            let keep = match index {
                Some(i) => table.versions[i] == *spec && Some(i) != target,
                None => false,
            };
            if !keep {
                let reason = match index {
                    None => "version removed from the routes file",
                    Some(i) if Some(i) == target => "version is now the rollback target",
                    Some(_) => "its entry in the routes file changed",
                };
                tracing::info!(version = %name, reason, "rollback reset: traffic follows the configured weight again");
                if let Some(vm) = inner.version_metrics.get(name) {
                    vm.rollback_resets.inc();
                }
            }
            keep
        });
        if table.rollback.is_none() && !inner.latches.is_empty() {
            // No target to send traffic to any more: a latch cannot stand.
            for name in inner.latches.keys() {
                tracing::info!(version = %name, "rollback reset: the [rollback] table was removed");
            }
            inner.latches.clear();
        }
    }

    /// Refresh the gauges computed from windows; called before a scrape.
    pub fn refresh_metrics(&self) {
        let snap = self.load();
        let now = self.now();
        for v in snap.versions.iter() {
            self.metrics
                .set_error_ratio(&v.name, v.window.totals(now).ratio());
        }
    }

    /// The JSON `/status` serves.
    pub fn status(&self) -> Value {
        let snap = self.load();
        let reload = self.reload_status();
        let now = self.now();
        let versions: Vec<Value> = snap
            .versions
            .iter()
            .zip(snap.table.versions.iter())
            .map(|(rt, spec)| {
                let totals = rt.window.totals(now);
                let (share, effective_share) = snap.shares(rt.index);
                json!({
                    "name": spec.name,
                    "upstream": spec.upstream.to_string(),
                    "weight": spec.weight,
                    "share": share,
                    "effective_weight": snap.effective[rt.index],
                    "effective_share": effective_share,
                    "window": { "requests": totals.requests, "errors": totals.errors, "error_ratio": totals.ratio() },
                    "rolled_back": rt.rollback.is_some(),
                    "rollback": rt.rollback.as_ref().map(|r| json!({
                        "at": rfc3339(r.at),
                        "reason": format!("error ratio {:.4} ({} errors / {} requests in {}s) above threshold {}", r.ratio, r.errors, r.requests, r.window_secs, r.threshold),
                        "ratio": r.ratio, "errors": r.errors, "requests": r.requests, "threshold": r.threshold, "target": r.target,
                    })),
                })
            })
            .collect();
        let rollback = snap.table.rollback.as_ref().map(|r| {
            json!({
                "target": snap.table.versions[r.target].name,
                "error_rate": r.error_rate,
                "min_requests": r.min_requests,
                "window_seconds": r.window.as_secs_f64(),
                "error_codes": r.error_codes.to_string(),
            })
        });
        json!({
            "routes": { "hash": snap.table.hash, "loaded_at": rfc3339(snap.loaded_at), "generation": snap.generation },
            "versions": versions,
            "rollback": rollback,
            "reload": {
                "successes": reload.successes,
                "failures": reload.failures,
                "last_success": reload.last_success.map(rfc3339),
                "last_error": reload.last_error.as_ref().map(|(at, msg)| json!({ "at": rfc3339(*at), "message": msg })),
            },
        })
    }
}

/// Build a whole snapshot from the control state. Reuses per-version metrics
/// handles and windows where the version's entry did not change.
fn build(inner: &mut Inner, metrics: &Metrics) -> Snapshot {
    let table = inner.table.clone();
    let policy = table.rollback.clone();
    let window_len = policy
        .as_ref()
        .map(|p| p.window)
        .unwrap_or(Duration::from_secs(30));

    // Forget versions that left the file: their series stop being exported.
    inner.version_metrics.retain(|name, vm| {
        let keep = table.index_of(name).is_some();
        if !keep {
            metrics.forget_version(vm);
        }
        keep
    });
    inner
        .windows
        .retain(|name, _| table.index_of(name).is_some());

    let mut versions = Vec::with_capacity(table.versions.len());
    for (index, spec) in table.versions.iter().enumerate() {
        let vm = inner
            .version_metrics
            .entry(spec.name.clone())
            .or_insert_with(|| Arc::new(metrics.version(&spec.name)))
            .clone();
        let latch = inner.latches.get(&spec.name).map(|(_, r)| r.clone());
        let window = match inner.windows.get(&spec.name) {
            Some((s, len, w)) if s == spec && *len == window_len => w.clone(),
            _ => {
                let w = Arc::new(Window::new(window_len));
                inner
                    .windows
                    .insert(spec.name.clone(), (spec.clone(), window_len, w.clone()));
                w
            }
        };
        if latch.is_some() {
            window.latch();
        }
        versions.push(VersionRuntime {
            name: spec.name.as_str().into(),
            index,
            scheme: spec.upstream.scheme.clone(),
            authority: spec.upstream.authority.clone(),
            authority_header: HeaderValue::from_str(spec.upstream.authority.as_str())
                .expect("an authority is a valid header value"),
            rewrite_host: spec.rewrite_host,
            metrics: vm,
            window,
            guard: policy.clone().filter(|p| p.target != index),
            rollback: latch,
        });
    }

    let mut effective: Vec<u64> = table.versions.iter().map(|v| v.weight).collect();
    if let Some(p) = &policy {
        for v in &versions {
            if v.rollback.is_some() {
                effective[p.target] += effective[v.index];
                effective[v.index] = 0;
            }
        }
    }
    inner.generation += 1;
    let snapshot = Snapshot {
        split: Split::new(effective.iter().copied()),
        effective: effective.into(),
        versions: versions.into(),
        table,
        loaded_at: inner.loaded_at,
        generation: inner.generation,
    };
    metrics
        .error_ratio_threshold
        .set(policy.as_ref().map(|p| p.error_rate).unwrap_or(0.0));
    for v in snapshot.versions.iter() {
        let (configured, effective) = snapshot.shares(v.index);
        metrics.set_shares(&v.name, configured, effective, v.rollback.is_some());
    }
    snapshot
}

fn weights(table: &RouteTable) -> String {
    table
        .versions
        .iter()
        .map(|v| format!("{}={}", v.name, v.weight))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
