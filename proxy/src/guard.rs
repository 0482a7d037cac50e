//! The judgment of one version: is its true error rate (or its share of
//! slow answers) above the line the routes file draws? docs/rollback.md
//! explains the method in plain words; this is the code it describes.
//!
//! # The test
//! Each criterion is a sequence of yes/no answers (an error or not; slower
//! than `slower_than` or not) judged against a line `p0` (`error_rate`,
//! `slow_rate`). For two alternatives above the line, at odds ratios 2 and
//! 6 against it, the judgment runs Page's CUSUM on the log-likelihood ratio
//! of "the rate is that alternative" against "the rate is the line":
//!
//! ```text
//! W_k <- max(0, W_k + ln(p_k / p0))           on a yes
//! W_k <- max(0, W_k + ln((1 - p_k) / (1 - p0))) on a no
//! ```
//!
//! and the criterion crosses when either `W_k` reaches `h = ln(2 * trip_odds)`.
//! The small alternative (2x) catches a version at twice the line in a few
//! hundred answers; the large one (6x) catches a badly broken version in a
//! few dozen. The `max(0, ...)` forgets good history, so a version that
//! goes bad after hours of good answers is caught as fast as a new one.
//!
//! Why this is safe under continuous monitoring: for any true rate at or
//! below the line, each `exp(W_k)` is dominated by a Shiryaev-Roberts
//! statistic `R_n` with `E[R_n] <= n`, so by optional stopping the expected
//! number of answers before a false crossing is at least `trip_odds`
//! (Lorden 1971; Pollak 1987), however long the version is watched. Below
//! the line the statistics drift down and false crossings become far rarer:
//! `bench/detection` computes the exact numbers.
//!
//! # The hold
//! When the rollback target itself fails at least as much as the version (a
//! shared database is down), rolling back would move traffic onto a version
//! that fails too, and end the experiment for a fault that is not the
//! version's. So the target runs the same tests on its own answers (it is
//! never rolled back), and a crossing trips only if the target shows no
//! evidence against itself right now (every statistic at 0), or if the
//! version is clearly worse than the target over the window. Otherwise it
//! is *held*: no rollback, and `/status` and `canary_proxy_rollback_held`
//! say so. When the target recovers, its statistics fall back to 0 within a
//! few hundred of its answers and the next crossing trips.
//!
//! Why the target's statistics and not its window: a window averages over
//! its whole length, so in the first seconds of an outage it still shows
//! the healthy past, while the version's statistics react within dozens of
//! answers; the statistics react as fast on both sides.
//!
//! Every statistic is capped at the trip point, so evidence piled up during
//! a long outage washes out in minutes, not hours, once it is over.
//!
//! # The hot path
//! Recording an answer is a few relaxed atomic operations: the window
//! counters and one compare-and-swap per alternative. No lock, no
//! allocation. A crossing is rare; only then does the request path compare
//! with the target and, on a trip, call the control plane through
//! [`Verdicts`], the one edge that goes back up the flow.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use crate::routes::RollbackPolicy;

/// How many buckets a window is cut into. The window slides in steps of
/// `window / BUCKETS`: old counts leave at most that much late.
pub(crate) const BUCKETS: u64 = 10;

/// The alternatives each criterion is tested at, as odds ratios against the
/// line. Chosen in bench/detection: with two, the threshold pays ln 2 for
/// the second; a third bought no detection goal and cost that again.
pub(crate) const ALTERNATIVES: [f64; 2] = [2.0, 6.0];

/// How many standard errors the version's rate must exceed the target's by
/// for the version to be "clearly worse" than a failing target. High,
/// because during a shared outage this is asked again at every crossing,
/// thousands of times an hour: at 4 the bench saw a rollback in 20 outage
/// hours; at 6 (a one-sided tail of 1e-9) none in 200.
const CLEARLY_WORSE_Z: f64 = 6.0;

/// Where a verdict goes: the control plane, which latches and publishes.
/// The request path holds only this, not the control plane itself.
pub(crate) trait Verdicts: Send + Sync {
    /// `judgment` identifies the evidence, so that a verdict reached on
    /// evidence an operator has since reset is ignored.
    fn trip(&self, version: &str, judgment: &Arc<Judgment>, trip: Trip);
}

/// What a rollback can be for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Criterion {
    /// The error rate, against `error_rate`.
    Errors,
    /// The share of answers slower than `slower_than`, against `slow_rate`.
    Latency,
}

impl Criterion {
    pub(crate) const ALL: [Criterion; 2] = [Criterion::Errors, Criterion::Latency];

    /// The `criterion` label and `/status` key.
    pub fn as_str(self) -> &'static str {
        match self {
            Criterion::Errors => "errors",
            Criterion::Latency => "latency",
        }
    }
}

/// What one answer says. `None` says nothing about that criterion: a client
/// that went away before the answer tells nothing about errors, and tells
/// about latency only once it has waited longer than `slower_than`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the answer counts as an error.
    pub error: Option<bool>,
    /// How long the upstream took to answer (the response head), or how long
    /// the request had waited without an answer.
    pub waited: Option<Duration>,
    /// True when `waited` ended without an answer (the client gave up). It
    /// is evidence of slowness only past `slower_than`.
    pub unanswered: bool,
}

/// The evidence that tripped a rollback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trip {
    pub criterion: Criterion,
    /// The criterion's counts over the window when it tripped.
    pub window: Counts,
    /// Answers judged on this criterion since the judgment started.
    pub judged: u64,
}

/// One version's counts and, when rollback is on, the tests it is judged by
/// (the target runs them too, for the hold, but never trips). Shared by
/// every snapshot until the version's entry or the policy changes; then a
/// fresh one starts.
#[derive(Debug)]
pub struct Judgment {
    window: Window,
    /// Answers slower than this are slow (with a latency objective).
    slower_than: Option<Duration>,
    rule: Option<Rule>,
    /// False for the rollback target: it is tested, never rolled back.
    judged: bool,
    /// Per criterion: when a crossing was last held, in nanoseconds since
    /// the clock's base, plus one; 0 if never.
    held_at: [AtomicU64; 2],
}

/// The decision's parameters and sequential state.
#[derive(Debug)]
struct Rule {
    errors: Cusum,
    latency: Option<Cusum>,
    min_requests: u64,
    compare_target: bool,
}

impl Judgment {
    /// The judgment of a version under `policy`. `judged` is false for the
    /// version that is never rolled back (the target): its tests run, for
    /// the comparison with the versions judged, but never trip.
    pub(crate) fn new(window: Duration, policy: Option<&RollbackPolicy>, judged: bool) -> Self {
        let rule = policy.map(|p| Rule {
            errors: Cusum::new(p.error_rate, p.trip_odds),
            latency: p
                .latency
                .as_ref()
                .map(|l| Cusum::new(l.slow_rate, p.trip_odds)),
            min_requests: p.min_requests,
            compare_target: p.compare_target,
        });
        Judgment {
            window: Window::new(window),
            slower_than: policy
                .and_then(|p| p.latency.as_ref())
                .map(|l| l.slower_than),
            judged: judged && rule.is_some(),
            rule,
            held_at: Default::default(),
        }
    }

    /// Record one answer at `now`; a [`Trip`] when the evidence is now
    /// enough. `target` is the rollback target's judgment, for the hold.
    pub fn record(
        &self,
        now: Duration,
        outcome: Outcome,
        target: Option<&Judgment>,
    ) -> Option<Trip> {
        let slow = self.is_slow(outcome);
        self.window.record(now, outcome.error, slow);
        let rule = self.rule.as_ref()?;
        let mut crossed = [false; 2];
        if let Some(error) = outcome.error {
            crossed[0] = rule.errors.record(error);
        }
        if let (Some(slow), Some(latency)) = (slow, &rule.latency) {
            crossed[1] = latency.record(slow);
        }
        if !self.judged {
            return None;
        }
        for (criterion, _) in Criterion::ALL.into_iter().zip(crossed).filter(|(_, c)| *c) {
            let cusum = rule
                .cusum(criterion)
                .expect("a criterion that crossed is judged");
            let judged = cusum.samples();
            let mine = self.window.totals(now).of(criterion);
            // The hold first, so that a shared outage is reported as held
            // even while the version is still under its floor.
            if rule.compare_target {
                if let Some(theirs) = target.and_then(|t| t.evidence_against(criterion, now)) {
                    if !clearly_worse(mine, theirs) {
                        self.held_at[criterion as usize].store(nanos(now) + 1, Relaxed);
                        continue;
                    }
                }
            }
            if judged < rule.min_requests {
                // Not yet: the statistic stays at the trip point and the
                // next answer asks again.
                continue;
            }
            return Some(Trip {
                criterion,
                window: mine,
                judged,
            });
        }
        None
    }

    /// The window counts on `criterion`, if this version shows any evidence
    /// against itself on it right now; `None` if it shows none.
    fn evidence_against(&self, criterion: Criterion, now: Duration) -> Option<Counts> {
        let cusum = self.rule.as_ref()?.cusum(criterion)?;
        (!cusum.at_rest()).then(|| self.window.totals(now).of(criterion))
    }

    fn is_slow(&self, outcome: Outcome) -> Option<bool> {
        let (limit, waited) = (self.slower_than?, outcome.waited?);
        match (outcome.unanswered, waited > limit) {
            // A client that gave up before `limit` says nothing.
            (true, false) => None,
            (_, slow) => Some(slow),
        }
    }

    /// Whether this version can be rolled back at all.
    pub fn is_judged(&self) -> bool {
        self.judged
    }

    /// The criteria this version is judged on.
    pub fn criteria(&self) -> impl Iterator<Item = Criterion> + '_ {
        Criterion::ALL
            .into_iter()
            .filter(|c| self.rule.as_ref().is_some_and(|r| r.cusum(*c).is_some()))
    }

    /// How close the evidence on `criterion` is to the trip point: 0 (none
    /// at all) to 1 (there). `None` if the version is not judged on it.
    pub fn evidence(&self, criterion: Criterion) -> Option<f64> {
        Some(self.rule.as_ref()?.cusum(criterion)?.evidence())
    }

    /// Answers judged on `criterion` since the judgment started.
    pub fn judged(&self, criterion: Criterion) -> Option<u64> {
        Some(self.rule.as_ref()?.cusum(criterion)?.samples())
    }

    /// Whether a crossing on `criterion` was held within the last `within`.
    pub fn held(&self, criterion: Criterion, now: Duration, within: Duration) -> bool {
        match self.held_at[criterion as usize].load(Relaxed) {
            0 => false,
            at => nanos(now).saturating_sub(at - 1) <= nanos(within),
        }
    }

    /// The counts in the window ending at `now`.
    pub fn totals(&self, now: Duration) -> Totals {
        self.window.totals(now)
    }
}

impl Rule {
    fn cusum(&self, criterion: Criterion) -> Option<&Cusum> {
        match criterion {
            Criterion::Errors => Some(&self.errors),
            Criterion::Latency => self.latency.as_ref(),
        }
    }
}

/// A one-sided two-proportion z-test at [`CLEARLY_WORSE_Z`].
fn clearly_worse(version: Counts, target: Counts) -> bool {
    if version.samples == 0 {
        return false;
    }
    let (n1, n2) = (version.samples as f64, target.samples as f64);
    let pooled = (version.hits + target.hits) as f64 / (n1 + n2);
    let spread = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
    let diff = version.ratio() - target.ratio();
    if spread == 0.0 {
        // All yes or all no on both sides: worse only if strictly worse.
        return diff > 0.0;
    }
    diff / spread >= CLEARLY_WORSE_Z
}

/// Page's CUSUM at each alternative, for one criterion (see the module
/// docs). The statistics are f64 bits in atomics, updated by
/// compare-and-swap, so every event loop records without a lock.
#[derive(Debug)]
struct Cusum {
    /// Per alternative: the step on a yes and on a no.
    steps: [(f64, f64); 2],
    /// The trip point, `ln(2 * trip_odds)`.
    threshold: f64,
    stats: [AtomicU64; 2],
    samples: AtomicU64,
}

impl Cusum {
    fn new(line: f64, trip_odds: f64) -> Self {
        let steps = ALTERNATIVES.map(|ratio| steps(line, ratio));
        Cusum {
            steps,
            threshold: (ALTERNATIVES.len() as f64 * trip_odds).ln(),
            stats: Default::default(),
            samples: AtomicU64::new(0),
        }
    }

    /// Add one answer; true when a statistic is at the trip point. Each is
    /// kept within [0, trip point]: reaching it is all that matters, and
    /// evidence beyond it would only keep a held decision (or the target's
    /// own evidence) from washing out once an outage is over.
    fn record(&self, yes: bool) -> bool {
        self.samples.fetch_add(1, Relaxed);
        let cap = self.threshold;
        let mut crossed = false;
        for (stat, (up, down)) in self.stats.iter().zip(self.steps) {
            let step = if yes { up } else { down };
            let next = |bits| (f64::from_bits(bits) + step).clamp(0.0, cap);
            let old = stat
                .fetch_update(Relaxed, Relaxed, |bits| Some(next(bits).to_bits()))
                .expect("the update always returns Some");
            crossed |= next(old) >= cap;
        }
        crossed
    }

    /// No evidence at all against the version right now.
    fn at_rest(&self) -> bool {
        self.stats
            .iter()
            .all(|s| s.load(Relaxed) == 0.0f64.to_bits())
    }

    fn evidence(&self) -> f64 {
        let max = self
            .stats
            .iter()
            .map(|s| f64::from_bits(s.load(Relaxed)))
            .fold(0.0, f64::max);
        (max / self.threshold).clamp(0.0, 1.0)
    }

    fn samples(&self) -> u64 {
        self.samples.load(Relaxed)
    }
}

/// The log-likelihood-ratio steps, on a yes and on a no, of the alternative
/// at `ratio` times the odds of `line` against `line` itself. Nothing is
/// above a line of 1, so such a criterion never moves.
fn steps(line: f64, ratio: f64) -> (f64, f64) {
    if line >= 1.0 {
        return (0.0, 0.0);
    }
    let odds = ratio * line / (1.0 - line);
    let alt = odds / (1.0 + odds);
    ((alt / line).ln(), ((1.0 - alt) / (1.0 - line)).ln())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Counts of one criterion: answers judged on it, and the yeses among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Counts {
    pub samples: u64,
    pub hits: u64,
}

impl Counts {
    pub fn ratio(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.hits as f64 / self.samples as f64
        }
    }
}

/// Counts over a sliding window.
#[derive(Debug)]
pub struct Window {
    bucket_nanos: u64,
    buckets: Box<[Bucket]>,
}

#[derive(Debug, Default)]
struct Bucket {
    /// Which bucket-period this slot currently counts (`now / bucket_nanos`).
    epoch: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    timed: AtomicU64,
    slow: AtomicU64,
}

/// What a window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Answers with an error verdict, and the errors among them.
    pub requests: u64,
    pub errors: u64,
    /// Answers (or abandoned waits) with a latency verdict, and the slow ones.
    pub timed: u64,
    pub slow: u64,
}

impl Totals {
    pub fn ratio(&self) -> f64 {
        self.of(Criterion::Errors).ratio()
    }

    pub fn slow_ratio(&self) -> f64 {
        self.of(Criterion::Latency).ratio()
    }

    pub fn of(&self, criterion: Criterion) -> Counts {
        match criterion {
            Criterion::Errors => Counts {
                samples: self.requests,
                hits: self.errors,
            },
            Criterion::Latency => Counts {
                samples: self.timed,
                hits: self.slow,
            },
        }
    }
}

impl Window {
    pub fn new(window: Duration) -> Self {
        let bucket_nanos = (nanos(window) / BUCKETS).max(1);
        Window {
            bucket_nanos,
            buckets: (0..BUCKETS).map(|_| Bucket::default()).collect(),
        }
    }

    /// Count one answer. A bucket whose epoch is stale is reset by whichever
    /// thread first notices; increments racing with that reset can be lost,
    /// which costs a count or two and never decides anything on its own.
    pub fn record(&self, now: Duration, error: Option<bool>, slow: Option<bool>) {
        let epoch = nanos(now) / self.bucket_nanos;
        let bucket = &self.buckets[(epoch % BUCKETS) as usize];
        let seen = bucket.epoch.load(Relaxed);
        if seen != epoch
            && bucket
                .epoch
                .compare_exchange(seen, epoch, Relaxed, Relaxed)
                .is_ok()
        {
            for counter in [
                &bucket.requests,
                &bucket.errors,
                &bucket.timed,
                &bucket.slow,
            ] {
                counter.store(0, Relaxed);
            }
        }
        if let Some(error) = error {
            bucket.requests.fetch_add(1, Relaxed);
            if error {
                bucket.errors.fetch_add(1, Relaxed);
            }
        }
        if let Some(slow) = slow {
            bucket.timed.fetch_add(1, Relaxed);
            if slow {
                bucket.slow.fetch_add(1, Relaxed);
            }
        }
    }

    /// Sum of the buckets that fall inside the window ending at `now`.
    pub fn totals(&self, now: Duration) -> Totals {
        let current = nanos(now) / self.bucket_nanos;
        let oldest = current.saturating_sub(BUCKETS - 1);
        let mut t = Totals::default();
        for b in self.buckets.iter() {
            let epoch = b.epoch.load(Relaxed);
            if (oldest..=current).contains(&epoch) {
                t.requests += b.requests.load(Relaxed);
                t.errors += b.errors.load(Relaxed);
                t.timed += b.timed.load(Relaxed);
                t.slow += b.slow.load(Relaxed);
            }
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// The judgments of `stable` (the target) and `canary` under `policy`.
    fn pair(policy: &str) -> (Judgment, Judgment) {
        let text = format!(
            "[versions.stable]\nupstream = \"http://127.0.0.1:1\"\nweight = 90\n\n\
             [versions.canary]\nupstream = \"http://127.0.0.1:2\"\nweight = 10\n\n\
             [rollback]\ntarget = \"stable\"\n{policy}"
        );
        let table = routes::parse(text.as_bytes()).expect("valid test routes");
        let p = table.rollback.as_ref().unwrap();
        (
            Judgment::new(p.window, Some(p), false),
            Judgment::new(p.window, Some(p), true),
        )
    }

    fn answer(error: bool, waited: Duration) -> Outcome {
        Outcome {
            error: Some(error),
            waited: Some(waited),
            unanswered: false,
        }
    }

    /// Feed `canary` answers until it trips; how many it took.
    fn until_trip(
        canary: &Judgment,
        target: &Judgment,
        now: Duration,
        limit: usize,
        mut next: impl FnMut(usize) -> Outcome,
    ) -> Option<(usize, Trip)> {
        (1..=limit).find_map(|i| canary.record(now, next(i), Some(target)).map(|t| (i, t)))
    }

    #[test]
    fn the_steps_are_the_log_likelihood_ratios() {
        // At a line of 5% and odds ratio 2, the alternative is 2*(5/95) odds.
        let (up, down) = steps(0.05, 2.0);
        let alt = (2.0 * 0.05 / 0.95) / (1.0 + 2.0 * 0.05 / 0.95);
        assert!((up - (alt / 0.05_f64).ln()).abs() < 1e-12);
        assert!((down - ((1.0 - alt) / 0.95_f64).ln()).abs() < 1e-12);
        assert!(up > 0.0 && down < 0.0);
        // Nothing is above a line of 1: the criterion never moves.
        assert_eq!(steps(1.0, 6.0), (0.0, 0.0));
    }

    #[test]
    fn every_error_trips_in_a_handful_and_not_before_the_floor() {
        let (stable, canary) = pair("error_rate = 0.05\nmin_requests = 1");
        let (n, trip) = until_trip(&canary, &stable, S(1), 100, |_| answer(true, MS(1))).unwrap();
        // ln(2e5) = 12.2 at ln(0.24/0.05) = 1.57 per error: 8 errors.
        assert_eq!(n, 8);
        assert_eq!(trip.criterion, Criterion::Errors);
        assert_eq!(
            trip.window,
            Counts {
                samples: 8,
                hits: 8
            }
        );
        assert_eq!(trip.judged, 8);

        let (stable, canary) = pair("error_rate = 0.05\nmin_requests = 30");
        let (n, _) = until_trip(&canary, &stable, S(1), 100, |_| answer(true, MS(1))).unwrap();
        assert_eq!(n, 30, "min_requests is a floor under any evidence");
    }

    #[test]
    fn good_answers_never_trip_and_wash_evidence_out() {
        let (stable, canary) = pair("error_rate = 0.05");
        for _ in 0..100_000 {
            assert_eq!(
                canary.record(S(1), answer(false, MS(1)), Some(&stable)),
                None
            );
        }
        assert_eq!(canary.evidence(Criterion::Errors), Some(0.0));
        // Some errors raise the evidence; good answers bring it back to 0.
        for _ in 0..4 {
            canary.record(S(2), answer(true, MS(1)), Some(&stable));
        }
        let raised = canary.evidence(Criterion::Errors).unwrap();
        assert!(raised > 0.3 && raised < 1.0, "{raised}");
        for _ in 0..2000 {
            canary.record(S(3), answer(false, MS(1)), Some(&stable));
        }
        assert_eq!(canary.evidence(Criterion::Errors), Some(0.0));
    }

    #[test]
    fn the_target_is_tested_but_never_trips_and_no_policy_only_counts() {
        let (stable, _) = pair("error_rate = 0.05");
        assert!(!stable.is_judged());
        for _ in 0..1000 {
            assert_eq!(stable.record(S(1), answer(true, MS(1)), None), None);
        }
        assert_eq!(stable.totals(S(1)).errors, 1000);
        // Its evidence is kept, for the hold, and capped at the trip point.
        assert_eq!(stable.evidence(Criterion::Errors), Some(1.0));
        let off = Judgment::new(S(30), None, true);
        assert!(!off.is_judged());
        assert_eq!(off.record(S(1), answer(true, MS(1)), None), None);
        assert_eq!(off.evidence(Criterion::Errors), None);
    }

    #[test]
    fn a_shared_outage_is_held_and_judging_resumes_when_the_target_recovers() {
        let (stable, canary) = pair("error_rate = 0.05\nwindow = \"10s\"");
        // Both fail half their answers: stable 9 for every canary answer.
        for i in 0..2000u64 {
            let now = MS(i * 10);
            for j in 0..9 {
                stable.record(now, answer((i + j) % 2 == 0, MS(1)), None);
            }
            assert_eq!(
                canary.record(now, answer(i % 2 == 0, MS(1)), Some(&stable)),
                None,
                "held, answer {i}"
            );
        }
        let now = MS(20_000);
        assert!(canary.held(Criterion::Errors, now, S(10)));
        assert!(canary.evidence(Criterion::Errors).unwrap() > 0.9);
        // The target recovers; once its window no longer fails, the canary,
        // still failing, trips at once instead of after the evidence it
        // piled up decays.
        let mut t = 20_000;
        let trip = loop {
            t += 10;
            for _ in 0..9 {
                stable.record(MS(t), answer(false, MS(1)), None);
            }
            if let Some(trip) = canary.record(MS(t), answer(t % 20 == 0, MS(1)), Some(&stable)) {
                break trip;
            }
            assert!(t < 40_000, "no trip 20 s after the target recovered");
        };
        assert_eq!(trip.criterion, Criterion::Errors);
        assert!(
            t - 20_000 <= 11_000,
            "tripped {} ms after the recovery",
            t - 20_000
        );
    }

    #[test]
    fn an_outage_that_starts_mid_flight_is_held_from_its_first_seconds() {
        // Both healthy for a full window, then both fail half their answers
        // at the same rate: the windows still show the healthy past when the
        // canary's statistic first crosses, the target's statistics do not.
        let (stable, canary) = pair("error_rate = 0.05\nwindow = \"30s\"");
        for i in 0..3000u64 {
            stable.record(MS(i * 10), answer(false, MS(1)), None);
            assert_eq!(
                canary.record(MS(i * 10), answer(false, MS(1)), Some(&stable)),
                None
            );
        }
        let mut rng = fastrand::Rng::with_seed(7);
        for i in 3000..9000u64 {
            stable.record(MS(i * 10), answer(rng.bool(), MS(1)), None);
            assert_eq!(
                canary.record(MS(i * 10), answer(rng.bool(), MS(1)), Some(&stable)),
                None,
                "answer {i}"
            );
        }
        assert!(canary.held(Criterion::Errors, MS(90_000), S(30)));
    }

    #[test]
    fn both_recovering_together_does_not_trip_the_version() {
        let (stable, canary) = pair("error_rate = 0.05\nwindow = \"10s\"");
        for i in 0..1000u64 {
            for _ in 0..9 {
                stable.record(MS(i * 10), answer(true, MS(1)), None);
            }
            assert_eq!(
                canary.record(MS(i * 10), answer(true, MS(1)), Some(&stable)),
                None
            );
        }
        // Both healthy again: the evidence held at the trip point washes out
        // while the target's window still shows the outage.
        for i in 1000..5000u64 {
            for _ in 0..9 {
                stable.record(MS(i * 10), answer(false, MS(1)), None);
            }
            assert_eq!(
                canary.record(MS(i * 10), answer(false, MS(1)), Some(&stable)),
                None,
                "answer {i}"
            );
        }
    }

    #[test]
    fn a_version_clearly_worse_than_a_failing_target_trips() {
        let (stable, canary) = pair("error_rate = 0.05\nwindow = \"10s\"");
        // The target fails 10%, above the line; the canary fails everything.
        for i in 0..1000u64 {
            stable.record(MS(i), answer(i % 10 == 0, MS(1)), None);
        }
        let (n, _) = until_trip(&canary, &stable, MS(1000), 200, |_| answer(true, MS(1))).unwrap();
        assert!(n <= 20, "{n}");
    }

    #[test]
    fn compare_target_false_never_holds() {
        let (stable, canary) = pair("error_rate = 0.05\ncompare_target = false");
        for i in 0..1000u64 {
            stable.record(MS(i), answer(true, MS(1)), None);
        }
        assert!(until_trip(&canary, &stable, MS(1000), 100, |_| answer(true, MS(1))).is_some());
    }

    #[test]
    fn slow_answers_trip_the_latency_criterion() {
        let (stable, canary) = pair("slower_than = \"250ms\"\nslow_rate = 0.01");
        assert_eq!(
            canary.criteria().collect::<Vec<_>>(),
            [Criterion::Errors, Criterion::Latency]
        );
        let (n, trip) =
            until_trip(&canary, &stable, S(1), 1000, |_| answer(false, MS(400))).unwrap();
        assert_eq!(trip.criterion, Criterion::Latency);
        assert!(n <= 10, "{n}");
        assert_eq!(canary.totals(S(1)).slow, n as u64);
        // Exactly at the limit is not slower than it.
        let (stable, canary) = pair("slower_than = \"250ms\"\nslow_rate = 0.01");
        assert_eq!(
            until_trip(&canary, &stable, S(1), 10_000, |_| answer(false, MS(250))),
            None
        );
    }

    #[test]
    fn a_client_that_gave_up_is_evidence_of_slowness_only_past_the_limit() {
        let (stable, canary) = pair("slower_than = \"250ms\"");
        let gave_up = |after| Outcome {
            error: None,
            waited: Some(after),
            unanswered: true,
        };
        canary.record(S(1), gave_up(MS(100)), Some(&stable));
        assert_eq!(canary.totals(S(1)), Totals::default(), "says nothing");
        canary.record(S(1), gave_up(MS(300)), Some(&stable));
        let t = canary.totals(S(1));
        assert_eq!((t.requests, t.timed, t.slow), (0, 1, 1));
        // And a client fault says nothing at all.
        canary.record(S(1), Outcome::default(), Some(&stable));
        assert_eq!(canary.totals(S(1)), t);
        assert_eq!(canary.judged(Criterion::Errors), Some(0));
    }

    #[test]
    fn held_is_reported_for_the_window_after_the_last_hold() {
        let (stable, canary) = pair("error_rate = 0.05\nwindow = \"10s\"\nmin_requests = 1");
        for i in 0..100u64 {
            stable.record(MS(i), answer(true, MS(1)), None);
        }
        assert!(until_trip(&canary, &stable, S(1), 50, |_| answer(true, MS(1))).is_none());
        assert!(canary.held(Criterion::Errors, S(1), S(10)));
        assert!(canary.held(Criterion::Errors, S(11), S(10)));
        assert!(!canary.held(Criterion::Errors, S(12), S(10)));
        assert!(!canary.held(Criterion::Latency, S(1), S(10)));
    }

    #[test]
    fn window_counts_slide_and_reused_slots_start_from_zero() {
        let w = Window::new(S(10)); // 1 s buckets
        w.record(S(0), Some(true), None);
        w.record(S(5), Some(false), Some(true));
        assert_eq!(w.totals(S(9)).requests, 2);
        // At t=10 the bucket of t=0 is out of the window; t=5 is still in.
        assert_eq!(
            w.totals(S(10)),
            Totals {
                requests: 1,
                errors: 0,
                timed: 1,
                slow: 1
            }
        );
        assert_eq!(w.totals(S(15)).requests, 0);
        // t=11 maps to the slot of t=1; the old counts must not leak in.
        let w = Window::new(S(10));
        w.record(S(1), Some(true), None);
        w.record(S(11), Some(false), None);
        assert_eq!(
            w.totals(S(11)).of(Criterion::Errors),
            Counts {
                samples: 1,
                hits: 0
            }
        );
    }
}
