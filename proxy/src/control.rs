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
use crate::endpoints::{Endpoints, Resolve};
use crate::guard::{Criterion, Judgment, Trip, Verdicts};
use crate::metrics::{Metrics, VersionMetrics};
use crate::progress::{Evidence as ProgressEvidence, Progress};
use crate::routes::{ProgressSpec, RollbackPolicy, RouteTable, VersionSpec};
use crate::snapshot::{RollbackRecord, Snapshot, Store, VersionRuntime};
use crate::split::{Rendezvous, Split};

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
    /// Per version name: its endpoints, kept while its upstream and
    /// discovery stay the same (a discovery task lives as long as they do).
    endpoints: HashMap<String, Arc<Endpoints>>,
    resolver: Arc<dyn Resolve>,
    reload: ReloadStatus,
    /// The run of the `[progress]` table, while it names the same version
    /// with the same entry and the same steps (`paused` aside).
    progress: Option<ProgressRun>,
}

impl ProgressRun {
    pub(crate) fn version_name(&self) -> &str {
        &self.entry.name
    }
}

/// One `[progress]` run and what it was started for.
pub(crate) struct ProgressRun {
    pub(crate) spec: ProgressSpec,
    /// The version's entry when the run started: a change restarts it.
    entry: VersionSpec,
    pub(crate) run: Progress,
    /// The judgment the run counts answers of.
    judgment: Option<Arc<Judgment>>,
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
        resolver: Arc<dyn Resolve>,
    ) -> Arc<Self> {
        let now = clock.wall();
        let mut inner = Inner {
            loaded_at: now,
            generation: 0,
            version_metrics: HashMap::new(),
            judgments: HashMap::new(),
            latches: HashMap::new(),
            endpoints: HashMap::new(),
            resolver,
            reload: ReloadStatus {
                last_success: Some(now),
                ..Default::default()
            },
            progress: None,
        };
        sync_progress(&mut inner, &table, clock.as_ref(), &metrics);
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
        // Before the unchanged check: restoring the last good content after
        // a bad one is a successful reload that counts nothing.
        self.metrics.config_last_reload_ok.set(1);
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
        sync_progress(
            &mut inner,
            &table,
            self.store.clock().as_ref(),
            &self.metrics,
        );
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
        self.metrics.config_last_reload_ok.set(0);
    }

    pub(crate) fn reload_status(&self) -> ReloadStatus {
        self.inner.lock().unwrap().reload.clone()
    }

    /// The `[progress]` run's view, for `/status`; `None` without one.
    pub(crate) fn progress<T>(&self, view: impl FnOnce(&ProgressRun) -> T) -> Option<T> {
        self.inner.lock().unwrap().progress.as_ref().map(view)
    }

    /// Bring the `[progress]` run up to now, and publish when its weight
    /// changed. Called a few times a second; without a run it returns at
    /// once. Each transition is logged once, with its reason.
    pub(crate) fn tick(&self) {
        let mut inner = self.inner.lock().unwrap();
        let Some(p) = inner.progress.as_mut() else {
            return;
        };
        let snap = self.store.load();
        let now = self.store.now();
        let v = &snap.versions[p.spec.version];
        if !p
            .judgment
            .as_ref()
            .is_some_and(|j| Arc::ptr_eq(j, &v.judgment))
        {
            // A policy change started a fresh judgment: count from its start.
            if p.judgment.is_some() {
                p.run.judgment_restarted();
            }
            p.judgment = Some(v.judgment.clone());
        }
        let window = snap.policy().map_or(DEFAULT_WINDOW, |r| r.window);
        let evidence = ProgressEvidence {
            judged: v.judgment.judged(Criterion::Errors).unwrap_or(0),
            clean: v.judgment.criteria().all(|c| {
                v.judgment.evidence(c).unwrap_or(0.0) < SUSPECT_EVIDENCE
                    && !v.judgment.held(c, now, window)
            }),
            rolled_back: v.rollback.is_some(),
        };
        let percent = p.run.percent(&p.spec);
        let Some(t) = p.run.update(&p.spec, now, evidence) else {
            return;
        };
        tracing::info!(
            version = %v.name,
            from_step = t.from.0,
            from_state = t.from.1.as_str(),
            step = t.to.0,
            state = t.to.1.as_str(),
            weight_percent = p.run.percent(&p.spec),
            reason = %t.reason,
            "progress"
        );
        self.metrics.set_progress(&v.name, t.to.0, t.to.1);
        if p.run.percent(&p.spec) != percent {
            let snapshot = build(&mut inner, snap.table.clone(), &self.metrics);
            self.store.publish(snapshot);
        }
    }
}

/// The evidence level at which a version is suspect (half the trip point,
/// where the shipped alert `CanaryProxyCanaryEvidenceHigh` looks): a step
/// does not advance on it.
const SUSPECT_EVIDENCE: f64 = 0.5;

/// Start, keep or end the `[progress]` run for `table`: a new run when the
/// table names another version, other steps or timing, or the version's
/// entry changed; the same run, with `paused` as the file says, otherwise.
fn sync_progress(inner: &mut Inner, table: &RouteTable, clock: &dyn Clock, metrics: &Metrics) {
    let old = inner.progress.take();
    let Some(spec) = table.progress.clone() else {
        if let Some(old) = old {
            metrics.forget_progress(&old.entry.name);
            tracing::info!(version = %old.entry.name, "progress removed: the version's weight follows the routes file again");
        }
        return;
    };
    let entry = table.versions[spec.version].clone();
    match old {
        Some(mut run) if run.spec.same_run(&spec) && run.entry == entry => {
            run.spec = spec;
            inner.progress = Some(run);
        }
        old => {
            if let Some(old) = old {
                metrics.forget_progress(&old.entry.name);
            }
            let since_start = spec
                .start
                .map(|start| match clock.wall().duration_since(start) {
                    Ok(ago) => ago.as_nanos() as i128,
                    Err(ahead) => -(ahead.duration().as_nanos() as i128),
                });
            // The version's judgment, if it carries on (its entry and the
            // policy unchanged): the run counts only answers from now on.
            let judgment = inner
                .judgments
                .get(&entry.name)
                .filter(|e| e.spec == entry && e.policy == table.rollback)
                .map(|e| e.judgment.clone());
            let judged = judgment
                .as_ref()
                .and_then(|j| j.judged(Criterion::Errors))
                .unwrap_or(0);
            let mut run = Progress::new(clock.now(), since_start);
            run.start_count(judged);
            // The first step, if the schedule has started, before anything
            // is published: a reload never shows the version at 0 first.
            run.update(
                &spec,
                clock.now(),
                ProgressEvidence {
                    judged,
                    clean: true,
                    rolled_back: false,
                },
            );
            tracing::info!(version = %entry.name, step = run.step(), state = run.state().as_str(), weight_percent = run.percent(&spec), "progress started: {}", run.reason());
            metrics.set_progress(&entry.name, run.step(), run.state());
            inner.progress = Some(ProgressRun {
                spec,
                entry,
                run,
                judgment,
            });
        }
    }
}

/// The weights the split uses before rollback: the file's, with the
/// `[progress]` version at its step's share of all traffic and the others
/// sharing the rest by their weights.
fn progress_weights(table: &RouteTable, progress: Option<&ProgressRun>) -> Vec<u64> {
    let mut weights: Vec<u64> = table.versions.iter().map(|v| v.weight).collect();
    let Some(p) = progress else {
        return weights;
    };
    let percent = p.run.percent(&p.spec);
    let v = p.spec.version;
    let others: u64 = weights
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != v)
        .map(|(_, w)| w)
        .sum();
    if percent >= 100 || others == 0 {
        weights.iter_mut().for_each(|w| *w = 0);
        weights[v] = 1;
        return weights;
    }
    // v : others = percent : (100 - percent), in integers: every other
    // weight times (100 - percent), v's = percent x the others' sum. At
    // most 256 x 10^6 x 100, far from overflow.
    for (i, w) in weights.iter_mut().enumerate() {
        *w = if i == v {
            percent * others
        } else {
            *w * (100 - percent)
        };
    }
    weights
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
        let latency = policy.latency.as_ref();
        let record = Arc::new(RollbackRecord {
            at: self.store.clock().wall(),
            criterion: trip.criterion,
            counts: trip.window,
            judged: trip.judged,
            threshold: match (trip.criterion, latency) {
                (Criterion::Latency, Some(l)) => l.slow_rate,
                _ => policy.error_rate,
            },
            slower_than: latency.map(|l| l.slower_than),
            trip_odds: policy.trip_odds,
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
            criterion = trip.criterion.as_str(),
            reason = %record.reason(),
            target = %record.target,
            generation = snapshot.generation,
            "rolled back; its traffic now goes to the target until its entry in the routes file changes"
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
    inner.endpoints.retain(|name, set| {
        table.index_of(name).is_some_and(|i| {
            let spec = &table.versions[i];
            set.upstream == spec.upstream.authority && set.discovery == spec.discovery
        })
    });

    let mut versions = Vec::with_capacity(table.versions.len());
    for (index, spec) in table.versions.iter().enumerate() {
        let vm = inner
            .version_metrics
            .entry(spec.name.clone())
            .or_insert_with(|| Arc::new(metrics.version(&spec.name)))
            .clone();
        let judgment = match inner.judgments.get(&spec.name) {
            Some(e) if e.spec == *spec && e.policy.as_ref() == policy => e.judgment.clone(),
            _ => {
                let judged = policy.is_some_and(|p| p.target != index);
                let judgment = Arc::new(Judgment::new(window, policy, judged));
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
        let endpoints = inner
            .endpoints
            .entry(spec.name.clone())
            .or_insert_with(|| {
                let authority = spec.upstream.authority.clone();
                if spec.discovery {
                    Endpoints::discovered(authority, vm.clone(), inner.resolver.clone())
                } else {
                    Endpoints::fixed(authority, vm.clone())
                }
            })
            .clone();
        versions.push(VersionRuntime {
            name: spec.name.as_str().into(),
            index,
            scheme: spec.upstream.scheme.clone(),
            authority: spec.upstream.authority.clone(),
            authority_header: HeaderValue::from_str(spec.upstream.authority.as_str())
                .expect("an authority is a valid header value"),
            rewrite_host: spec.rewrite_host,
            protocol: spec.protocol,
            endpoints,
            metrics: vm,
            judgment,
            rollback: inner.latches.get(&spec.name).map(|l| l.record.clone()),
        });
    }

    let routed = progress_weights(&table, inner.progress.as_ref());
    let mut effective = routed.clone();
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
        // On the configured weights: a rolled-back version's keys go to
        // the target one by one (`Snapshot::serving`), and come back to it
        // after the reset, while every other key stays where it was.
        sticky: table
            .sticky
            .as_ref()
            // The weights before rollback, [progress] included: a step up
            // moves keys only to the version, and a rolled-back version's
            // keys go to the target one by one (`Snapshot::serving`).
            .map(|_| {
                Rendezvous::new(
                    table
                        .versions
                        .iter()
                        .zip(&routed)
                        .map(|(v, w)| (v.name.as_str(), *w)),
                )
            }),
        effective: effective.into(),
        versions: versions.into(),
        table,
        loaded_at: inner.loaded_at,
        generation: inner.generation,
    };
    if let Some(m) = &snapshot.table.mirror {
        metrics.mirror_configured(&snapshot.versions[m.version].name);
    }
    for v in snapshot.versions.iter() {
        let (configured, effective) = snapshot.shares(v.index);
        let tripped = v.rollback.as_ref().map(|r| r.criterion);
        metrics.set_shares(&v.name, configured, effective, tripped);
    }
    snapshot
}

/// A fresh judgment for every version of `table`, as `build` makes them.
pub(crate) fn judgments(table: &RouteTable) -> Vec<Judgment> {
    let policy = table.rollback.as_ref();
    let window = policy.map_or(DEFAULT_WINDOW, |p| p.window);
    (0..table.versions.len())
        .map(|index| Judgment::new(window, policy, policy.is_some_and(|p| p.target != index)))
        .collect()
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
    use crate::guard::Outcome;
    use crate::progress::State;
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

    fn answer(error: bool) -> Outcome {
        Outcome {
            error: Some(error),
            waited: Some(Duration::from_millis(1)),
            unanswered: false,
        }
    }

    impl Fixture {
        fn new(table: RouteTable) -> Self {
            let clock = Arc::new(ManualClock::new(SystemTime::UNIX_EPOCH + START));
            let control = Control::new(
                table,
                Metrics::new(),
                clock.clone(),
                crate::dns::Dns::new(None),
            );
            Fixture { control, clock }
        }

        fn snapshot(&self) -> Arc<Snapshot> {
            self.control.store().load()
        }

        /// Record canary answers as the request path does, passing any
        /// verdict on, until one trips or `n` are recorded. Returns how many
        /// it took to trip.
        fn canary_answers(&self, n: usize, error: bool) -> Option<usize> {
            let snap = self.snapshot();
            let (v, target) = (&snap.versions[1], &snap.versions[0].judgment);
            for i in 1..=n {
                if let Some(trip) = v
                    .judgment
                    .record(self.clock.now(), answer(error), Some(target))
                {
                    self.control.trip(&v.name, &v.judgment, trip);
                    return Some(i);
                }
            }
            None
        }

        fn rolled_back(&self) -> bool {
            self.snapshot().versions[1].rollback.is_some()
        }

        /// Trip the canary with a run of errors.
        fn trip(&self) {
            assert!(self.canary_answers(100, true).is_some(), "100 errors trip");
            assert!(self.rolled_back());
        }
    }

    fn progress_table(canary_weight: u64, progress: &str) -> RouteTable {
        let text = format!(
            "[versions.stable]\nupstream = \"http://127.0.0.1:1\"\nweight = 90\n\n\
             [versions.canary]\nupstream = \"http://127.0.0.1:2\"\nweight = {canary_weight}\n\n\
             [rollback]\n{POLICY}\n[progress]\nversion = \"canary\"\nstep_time = \"10s\"\nmin_requests = 3\n{progress}"
        );
        routes::parse(text.as_bytes()).expect("test routes are valid")
    }

    /// The canary's share of the split now, in percent.
    fn canary_percent(f: &Fixture) -> u64 {
        let snap = f.snapshot();
        100 * snap.effective[1] / snap.split.total()
    }

    #[test]
    fn progress_steps_on_the_clock_and_evidence_and_restarts_on_an_edit() {
        let f = Fixture::new(progress_table(0, "steps = [10, 50, 100]\n"));
        // The first step is published with the table, before any tick.
        assert_eq!(canary_percent(&f), 10);
        f.canary_answers(3, false);
        f.clock.advance(Duration::from_secs(10));
        f.control.tick();
        assert_eq!(canary_percent(&f), 50);
        assert_eq!(f.control.progress(|p| p.run.step()), Some(2));

        // Pausing keeps the run; other keys of the table restart it.
        f.control
            .apply(progress_table(0, "steps = [10, 50, 100]\npaused = true\n"));
        assert_eq!(canary_percent(&f), 50);
        f.control
            .apply(progress_table(0, "steps = [10, 50, 100]\n"));
        assert_eq!(f.control.progress(|p| p.run.step()), Some(2));
        f.control
            .apply(progress_table(0, "steps = [10, 60, 100]\n"));
        assert_eq!(
            (canary_percent(&f), f.control.progress(|p| p.run.step())),
            (10, Some(1))
        );

        // So does a change of the version's entry, and answers from before
        // the run do not count for its first step.
        f.canary_answers(3, false);
        f.control
            .apply(progress_table(1, "steps = [10, 60, 100]\n"));
        f.clock.advance(Duration::from_secs(10));
        f.control.tick();
        assert_eq!(
            f.control.progress(|p| p.run.state()),
            Some(State::WaitingForEvidence)
        );
        f.canary_answers(3, false);
        f.control.tick();
        assert_eq!(canary_percent(&f), 60);

        // A rollback stops it, at 0% for the version, for good.
        f.trip();
        f.clock.advance(Duration::from_secs(60));
        f.control.tick();
        assert_eq!(
            f.control.progress(|p| p.run.state()),
            Some(State::RolledBack)
        );
        assert_eq!(f.snapshot().effective[1], 0);
        // Removing the table ends the run: the file's weights again.
        f.control.apply(table(1, Some(POLICY)));
        assert!(f.control.progress(|_| ()).is_none());
    }

    #[test]
    fn a_trip_latches_and_moves_the_weight_to_the_target() {
        let f = Fixture::new(table(10, Some(POLICY)));
        f.clock.advance(Duration::from_secs(3));
        let took = f.canary_answers(100, true).expect("100 errors trip");
        let snap = f.snapshot();
        let record = snap.versions[1].rollback.as_ref().expect("latched");
        assert_eq!(record.criterion, crate::guard::Criterion::Errors);
        assert_eq!(record.counts.samples, took as u64);
        assert_eq!(record.counts.hits, took as u64);
        assert_eq!(record.judged, took as u64);
        assert_eq!(record.target, "stable");
        // The record's time is the clock's, not the system's.
        assert_eq!(
            record.at,
            SystemTime::UNIX_EPOCH + START + Duration::from_secs(3)
        );
        assert_eq!(&*snap.effective, &[100, 0]);
        assert_eq!(snap.generation, 2);
        assert!(
            record.reason().contains("above threshold 0.1"),
            "{}",
            record.reason()
        );
    }

    #[test]
    fn min_requests_is_a_floor_under_any_evidence() {
        let f = Fixture::new(table(
            10,
            Some(&POLICY.replace("min_requests = 5", "min_requests = 40")),
        ));
        assert_eq!(f.canary_answers(100, true), Some(40));
    }

    #[test]
    fn the_window_counts_follow_the_clock() {
        let f = Fixture::new(table(10, Some(POLICY)));
        assert_eq!(f.canary_answers(3, false), None);
        let judgment = f.snapshot().versions[1].judgment.clone();
        assert_eq!(judgment.totals(f.clock.now()).requests, 3);
        f.clock.advance(Duration::from_secs(11));
        assert_eq!(judgment.totals(f.clock.now()).requests, 0);
    }

    #[test]
    fn the_latch_survives_reloads_that_leave_the_version_alone() {
        let f = Fixture::new(table(10, Some(POLICY)));
        f.trip();
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
        f.trip();
        let old = f.snapshot().versions[1].judgment.clone();
        assert_eq!(f.control.apply(table(5, Some(POLICY))), Applied::Published);
        let snap = f.snapshot();
        assert!(!f.rolled_back());
        assert_eq!(&*snap.effective, &[90, 5]);
        let fresh = &snap.versions[1].judgment;
        assert_eq!(fresh.totals(f.clock.now()).requests, 0);
        assert_eq!(fresh.evidence(crate::guard::Criterion::Errors), Some(0.0));
        // A verdict reached on the old evidence is ignored.
        let stale = crate::guard::Trip {
            criterion: crate::guard::Criterion::Errors,
            window: old
                .totals(f.clock.now())
                .of(crate::guard::Criterion::Errors),
            judged: 100,
        };
        f.control.trip("canary", &old, stale);
        assert!(!f.rolled_back());
    }

    #[test]
    fn a_latch_cannot_stand_without_a_target() {
        let f = Fixture::new(table(10, Some(POLICY)));
        f.trip();
        f.control.apply(table(10, None));
        assert!(!f.rolled_back());
        assert_eq!(&*f.snapshot().effective, &[90, 10]);

        // The canary becoming the target clears it too.
        let f = Fixture::new(table(10, Some(POLICY)));
        f.trip();
        f.control
            .apply(table(10, Some(&POLICY.replace("\"stable\"", "\"canary\""))));
        assert!(!f.rolled_back());
    }

    #[test]
    fn the_target_and_a_file_without_policy_never_trip() {
        let f = Fixture::new(table(10, None));
        assert_eq!(f.canary_answers(1000, true), None);
        let f = Fixture::new(table(10, Some(POLICY)));
        let snap = f.snapshot();
        let stable = &snap.versions[0];
        for _ in 0..1000 {
            assert_eq!(
                stable.judgment.record(f.clock.now(), answer(true), None),
                None
            );
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
