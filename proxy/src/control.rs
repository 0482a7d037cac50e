//! The control plane: the only writer of the snapshot [`Store`].
//!
//! Two things change routing: a routes reload (from `watch`) and a rollback
//! verdict (from the request path, through [`Verdicts`]). Both go through
//! [`Control`], under one mutex, and both end in one publish of a whole new
//! [`Snapshot`]. The mutex is taken only on those rare events; requests
//! never touch it.
//!
//! One source of truth for each thing it keeps:
//! - the routes table and the policy: the published snapshot's `table`;
//! - "rolled back": [`Inner::latches`], which every snapshot is built from;
//! - the evidence: one [`Judgment`] per version, kept while the version's
//!   entry and the policy stay the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::HeaderValue;

use crate::clock::Clock;
use crate::guard::{Judgment, Trip, Verdicts};
use crate::metrics::{Metrics, VersionMetrics};
use crate::routes::{RollbackPolicy, RouteTable, VersionSpec};
use crate::snapshot::{RollbackRecord, Snapshot, Store, VersionRuntime};
use crate::split::Split;

/// The window `/status` counts over when the routes file has no policy.
const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

pub(crate) struct Control {
    store: Arc<Store>,
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("generation", &self.store.load().generation)
            .finish()
    }
}

struct Inner {
    loaded_at: SystemTime,
    generation: u64,
    /// Per version name, kept while the name is in the routes file.
    version_metrics: HashMap<String, Arc<VersionMetrics>>,
    /// Per version name: the evidence, and the entry and policy it was
    /// gathered under. A change of either starts a fresh judgment.
    judgments: HashMap<String, Evidence>,
    /// Latched rollbacks, with the entry they were latched for: only a
    /// change of that entry clears them.
    latches: HashMap<String, Latch>,
    reload: ReloadStatus,
}

struct Evidence {
    spec: VersionSpec,
    policy: Option<RollbackPolicy>,
    judgment: Arc<Judgment>,
}

struct Latch {
    spec: VersionSpec,
    record: Arc<RollbackRecord>,
}

/// What the watcher reports, for `/status` and metrics.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReloadStatus {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) last_success: Option<SystemTime>,
    pub(crate) last_error: Option<(SystemTime, String)>,
}

/// Result of offering new routes to the control plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Applied {
    /// A new snapshot was published.
    Published,
    /// Same content as the active table; nothing to do.
    Unchanged,
}

impl Control {
    pub(crate) fn new(
        table: RouteTable,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        let now = clock.wall();
        let mut inner = Inner {
            loaded_at: now,
            generation: 0,
            version_metrics: HashMap::new(),
            judgments: HashMap::new(),
            latches: HashMap::new(),
            reload: ReloadStatus {
                last_success: Some(now),
                ..Default::default()
            },
        };
        metrics.set_config_hash(None, &table.hash);
        metrics.config_last_success.set(unix_seconds(now));
        let snapshot = build(&mut inner, Arc::new(table), &metrics);
        Arc::new(Control {
            store: Arc::new(Store::new(snapshot, clock)),
            inner: Mutex::new(inner),
            metrics,
        })
    }

    /// The published snapshot and the clock, for the request path and the
    /// admin port.
    pub(crate) fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Offer a freshly validated table. Called by the watcher.
    pub(crate) fn apply(&self, table: RouteTable) -> Applied {
        let mut inner = self.inner.lock().unwrap();
        let now = self.store.clock().wall();
        inner.reload.last_success = Some(now);
        inner.reload.last_error = None;
        self.metrics.config_last_success.set(unix_seconds(now));
        let old = self.store.load().table.clone();
        if table == *old {
            return Applied::Unchanged;
        }
        let table = Arc::new(table);
        inner.loaded_at = now;
        inner.reload.successes += 1;
        self.metrics.config_reload(true);
        self.metrics.set_config_hash(Some(&old.hash), &table.hash);
        reset_latches(&mut inner, &table);
        let snapshot = build(&mut inner, table.clone(), &self.metrics);
        tracing::info!(
            old = %weights(&old),
            new = %weights(&table),
            hash = %table.hash,
            generation = snapshot.generation,
            "routes reloaded"
        );
        self.store.publish(snapshot);
        Applied::Published
    }

    /// Record a reload that failed; the active snapshot stays.
    pub(crate) fn reload_failed(&self, error: String) {
        let mut inner = self.inner.lock().unwrap();
        inner.reload.failures += 1;
        inner.reload.last_error = Some((self.store.clock().wall(), error));
        self.metrics.config_reload(false);
    }

    pub(crate) fn reload_status(&self) -> ReloadStatus {
        self.inner.lock().unwrap().reload.clone()
    }
}

impl Verdicts for Control {
    /// Latch a rollback of `version` and publish. Ignored when the evidence
    /// is not the version's current judgment (an operator reset it since),
    /// when it is latched already, or when it is the target.
    fn trip(&self, version: &str, judgment: &Arc<Judgment>, trip: Trip) {
        let mut inner = self.inner.lock().unwrap();
        let table = self.store.load().table.clone();
        let Some(policy) = table.rollback.as_ref() else {
            return;
        };
        let Some(index) = table.index_of(version) else {
            return;
        };
        let current = inner
            .judgments
            .get(version)
            .is_some_and(|e| Arc::ptr_eq(&e.judgment, judgment));
        if !current || inner.latches.contains_key(version) || index == policy.target {
            return;
        }
        let record = Arc::new(RollbackRecord {
            at: self.store.clock().wall(),
            totals: trip.totals,
            threshold: policy.error_rate,
            window: policy.window,
            target: table.versions[policy.target].name.clone(),
        });
        inner.latches.insert(
            version.to_owned(),
            Latch {
                spec: table.versions[index].clone(),
                record: record.clone(),
            },
        );
        if let Some(vm) = inner.version_metrics.get(version) {
            vm.rollbacks.inc();
        }
        let snapshot = build(&mut inner, table.clone(), &self.metrics);
        tracing::warn!(
            version,
            ratio = format_args!("{:.4}", record.totals.ratio()),
            errors = record.totals.errors,
            requests = record.totals.requests,
            window = %humantime::format_duration(policy.window),
            threshold = record.threshold,
            target = %record.target,
            generation = snapshot.generation,
            "rolled back: error ratio above threshold; its traffic now goes to the target until its entry in the routes file changes"
        );
        self.store.publish(snapshot);
    }
}

/// Clear latches whose version entry changed, disappeared, or became the
/// target; log and count each reset.
fn reset_latches(inner: &mut Inner, table: &RouteTable) {
    let target = table.rollback.as_ref().map(|r| r.target);
    let version_metrics = &inner.version_metrics;
    inner.latches.retain(|name, latch| {
        let index = table.index_of(name);
        // (reason, whether it counts as an operator's reset of the version)
        let reset = match index {
            None => Some(("version removed from the routes file", true)),
            Some(i) if Some(i) == target => Some(("version is now the rollback target", true)),
            Some(i) if table.versions[i] != latch.spec => {
                Some(("its entry in the routes file changed", true))
            }
            // No target to send traffic to any more: a latch cannot stand.
            Some(_) if target.is_none() => Some(("the [rollback] table was removed", false)),
            Some(_) => None,
        };
        if let Some((reason, counted)) = reset {
            tracing::info!(version = %name, reason, "rollback reset: traffic follows the configured weight again");
            if counted {
                if let Some(vm) = version_metrics.get(name) {
                    vm.rollback_resets.inc();
                }
            }
        }
        reset.is_none()
    });
}

/// Build a whole snapshot from the control state. Reuses per-version metrics
/// handles and judgments where the version's entry did not change.
fn build(inner: &mut Inner, table: Arc<RouteTable>, metrics: &Metrics) -> Snapshot {
    let policy = table.rollback.as_ref();
    let window = policy.map_or(DEFAULT_WINDOW, |p| p.window);

    // Forget versions that left the file: their series stop being exported.
    inner.version_metrics.retain(|name, vm| {
        let keep = table.index_of(name).is_some();
        if !keep {
            metrics.forget_version(vm);
        }
        keep
    });
    inner
        .judgments
        .retain(|name, _| table.index_of(name).is_some());

    let mut versions = Vec::with_capacity(table.versions.len());
    for (index, spec) in table.versions.iter().enumerate() {
        let vm = inner
            .version_metrics
            .entry(spec.name.clone())
            .or_insert_with(|| Arc::new(metrics.version(&spec.name)))
            .clone();
        let judged = policy.filter(|p| p.target != index);
        let judgment = match inner.judgments.get(&spec.name) {
            Some(e) if e.spec == *spec && e.policy.as_ref() == policy => e.judgment.clone(),
            _ => {
                let judgment = Arc::new(Judgment::new(window, judged));
                inner.judgments.insert(
                    spec.name.clone(),
                    Evidence {
                        spec: spec.clone(),
                        policy: policy.cloned(),
                        judgment: judgment.clone(),
                    },
                );
                judgment
            }
        };
        versions.push(VersionRuntime {
            name: spec.name.as_str().into(),
            index,
            scheme: spec.upstream.scheme.clone(),
            authority: spec.upstream.authority.clone(),
            authority_header: HeaderValue::from_str(spec.upstream.authority.as_str())
                .expect("an authority is a valid header value"),
            rewrite_host: spec.rewrite_host,
            metrics: vm,
            judgment,
            rollback: inner.latches.get(&spec.name).map(|l| l.record.clone()),
        });
    }

    let mut effective: Vec<u64> = table.versions.iter().map(|v| v.weight).collect();
    if let Some(p) = policy {
        for v in &versions {
            if v.rollback.is_some() {
                effective[p.target] += effective[v.index];
                effective[v.index] = 0;
            }
        }
    }
    inner.generation += 1;
    metrics
        .error_ratio_threshold
        .set(policy.map_or(0.0, |p| p.error_rate));
    let snapshot = Snapshot {
        split: Split::new(effective.iter().copied()),
        effective: effective.into(),
        versions: versions.into(),
        table,
        loaded_at: inner.loaded_at,
        generation: inner.generation,
    };
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

pub(crate) fn unix_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::routes;

    const START: Duration = Duration::from_secs(1_800_000_000);

    fn table(canary_weight: u64, rollback: Option<&str>) -> RouteTable {
        let mut text = format!(
            "[versions.stable]\nupstream = \"http://127.0.0.1:1\"\nweight = 90\n\n\
             [versions.canary]\nupstream = \"http://127.0.0.1:2\"\nweight = {canary_weight}\n"
        );
        if let Some(r) = rollback {
            text.push_str("\n[rollback]\n");
            text.push_str(r);
        }
        routes::parse(text.as_bytes()).expect("test routes are valid")
    }

    const POLICY: &str =
        "target = \"stable\"\nerror_rate = 0.1\nmin_requests = 5\nwindow = \"10s\"\n";

    struct Fixture {
        control: Arc<Control>,
        clock: Arc<ManualClock>,
    }

    impl Fixture {
        fn new(table: RouteTable) -> Self {
            let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH + START));
            let control = Control::new(table, Metrics::new(), clock.clone());
            Fixture { control, clock }
        }

        fn snapshot(&self) -> Arc<Snapshot> {
            self.control.store().load()
        }

        /// Record `n` answers of the canary, as the request path does, and
        /// pass any verdict on. Returns whether one was reached.
        fn canary_answers(&self, n: usize, error: bool) -> bool {
            let snap = self.snapshot();
            let v = &snap.versions[1];
            let mut tripped = false;
            for _ in 0..n {
                if let Some(trip) = v.judgment.record(self.clock.now(), error) {
                    tripped = true;
                    self.control.trip(&v.name, &v.judgment, trip);
                }
            }
            tripped
        }

        fn rolled_back(&self) -> bool {
            self.snapshot().versions[1].rollback.is_some()
        }
    }

    #[test]
    fn a_trip_latches_and_moves_the_weight_to_the_target() {
        let f = Fixture::new(table(10, Some(POLICY)));
        assert!(
            !f.canary_answers(4, true),
            "4 answers are below min_requests"
        );
        f.clock.advance(Duration::from_secs(3));
        assert!(f.canary_answers(1, true));
        let snap = f.snapshot();
        let record = snap.versions[1].rollback.as_ref().expect("latched");
        assert_eq!(record.totals.requests, 5);
        assert_eq!(record.totals.errors, 5);
        assert_eq!(record.target, "stable");
        // The record's time is the clock's, not the system's.
        assert_eq!(
            record.at,
            SystemTime::UNIX_EPOCH + START + Duration::from_secs(3)
        );
        assert_eq!(&*snap.effective, &[100, 0]);
        assert_eq!(snap.generation, 2);
    }

    #[test]
    fn evidence_leaves_the_window_as_the_clock_moves() {
        let f = Fixture::new(table(10, Some(POLICY)));
        assert!(!f.canary_answers(4, true));
        // Past the 10 s window, those 4 errors no longer count.
        f.clock.advance(Duration::from_secs(11));
        assert!(!f.canary_answers(4, true));
        assert!(!f.rolled_back());
        assert!(f.canary_answers(1, true));
    }

    #[test]
    fn the_latch_survives_reloads_that_leave_the_version_alone() {
        let f = Fixture::new(table(10, Some(POLICY)));
        f.canary_answers(5, true);
        assert!(f.rolled_back());
        // Stable's weight changes; the canary entry does not.
        let mut t = table(10, Some(POLICY));
        t.versions[0].weight = 80;
        t.hash = "other".into();
        assert_eq!(f.control.apply(t), Applied::Published);
        assert!(f.rolled_back());
        assert_eq!(&*f.snapshot().effective, &[90, 0]);
        // A stricter policy does not clear it either.
        let t = table(10, Some(&POLICY.replace("0.1", "0.2")));
        assert_eq!(f.control.apply(t), Applied::Published);
        assert!(f.rolled_back());
    }

    #[test]
    fn changing_the_entry_resets_the_latch_and_starts_fresh_evidence() {
        let f = Fixture::new(table(10, Some(POLICY)));
        f.canary_answers(5, true);
        let old = f.snapshot().versions[1].judgment.clone();
        assert!(f.rolled_back());
        assert_eq!(f.control.apply(table(5, Some(POLICY))), Applied::Published);
        let snap = f.snapshot();
        assert!(!f.rolled_back());
        assert_eq!(&*snap.effective, &[90, 5]);
        assert_eq!(snap.versions[1].judgment.totals(f.clock.now()).requests, 0);
        // A verdict reached on the old evidence is ignored.
        let stale = crate::guard::Trip {
            totals: old.totals(f.clock.now()),
        };
        f.control.trip("canary", &old, stale);
        assert!(!f.rolled_back());
    }

    #[test]
    fn a_latch_cannot_stand_without_a_target() {
        let f = Fixture::new(table(10, Some(POLICY)));
        f.canary_answers(5, true);
        assert!(f.rolled_back());
        f.control.apply(table(10, None));
        assert!(!f.rolled_back());
        assert_eq!(&*f.snapshot().effective, &[90, 10]);

        // The canary becoming the target clears it too.
        let f = Fixture::new(table(10, Some(POLICY)));
        f.canary_answers(5, true);
        f.control
            .apply(table(10, Some(&POLICY.replace("\"stable\"", "\"canary\""))));
        assert!(!f.rolled_back());
    }

    #[test]
    fn the_target_and_a_file_without_policy_never_trip() {
        let f = Fixture::new(table(10, None));
        assert!(!f.canary_answers(100, true));
        let f = Fixture::new(table(10, Some(POLICY)));
        let snap = f.snapshot();
        let stable = &snap.versions[0];
        for _ in 0..100 {
            assert_eq!(stable.judgment.record(f.clock.now(), true), None);
        }
    }

    #[test]
    fn identical_content_is_not_published_again() {
        let f = Fixture::new(table(10, Some(POLICY)));
        let generation = f.snapshot().generation;
        assert_eq!(f.control.apply(table(10, Some(POLICY))), Applied::Unchanged);
        assert_eq!(f.snapshot().generation, generation);
    }
}
