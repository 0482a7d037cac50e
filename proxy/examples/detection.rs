//! The detection bench (`bench/detection`): how often the rollback judgment
//! rolls back a healthy version, and how fast it catches a bad one.
//!
//! It drives the real decision code (`canary_proxy::bench::Judgment`, built
//! from a routes file exactly as the proxy builds it) with simulated time
//! and simulated answers: Poisson arrivals, Bernoulli errors or slow
//! answers. No network, no sleeping. Beside every cell it runs the rule the
//! proxy used before (a 30 s sliding window, trip when the ratio is above
//! the threshold with at least 50 requests in it), re-implemented here on
//! the real window, since the proxy no longer has it.
//!
//! Where a cell cannot be simulated long enough to see a rare event, it is
//! bounded exactly: see `exact` below.
//!
//! ```sh
//! cargo run --release -p canary-proxy --example detection -- [--quick] [--out FILE]
//! ```
//!
//! Deterministic: fixed seeds, so the same build prints the same numbers.

use std::fmt::Write as _;
use std::time::Duration;

use canary_proxy::bench::{judgments, Criterion, Judgment, Outcome, Window};

/// The default policy, as an operator writes it: only the target. `LATENCY`
/// adds the latency objective at its default share (0.05), `P99` at 0.01.
const POLICY: &str = "target = \"stable\"\n";
const LATENCY: &str = "target = \"stable\"\nslower_than = \"250ms\"\n";
const P99: &str = "target = \"stable\"\nslower_than = \"250ms\"\nslow_rate = 0.01\n";
const ERROR_RATE: f64 = 0.05;
/// What the old rule was configured with by default.
const OLD_MIN_REQUESTS: u64 = 50;
const OLD_WINDOW: Duration = Duration::from_secs(30);
const SLOW: Duration = Duration::from_millis(400);
const FAST: Duration = Duration::from_millis(10);
const HOUR: f64 = 3600.0;
/// A detection run gives up after this many canary requests.
const DETECTION_LIMIT: u64 = 20_000;

fn routes(rollback: &str) -> String {
    format!(
        "[versions.stable]\nupstream = \"http://127.0.0.1:1\"\nweight = 50\n\n\
         [versions.canary]\nupstream = \"http://127.0.0.1:2\"\nweight = 50\n\n\
         [rollback]\n{rollback}"
    )
}

/// The canary's and the target's fresh judgments under `rollback`.
fn fresh(rollback: &str) -> (Judgment, Judgment) {
    let mut j = judgments(&routes(rollback)).expect("the bench's routes are valid");
    let canary = j.pop().unwrap();
    let stable = j.pop().unwrap();
    (canary, stable)
}

/// Which criterion a scenario degrades.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Errors,
    Latency,
}

impl Kind {
    /// One answer, bad with probability `p`.
    fn answer(self, bad: bool) -> Outcome {
        match self {
            Kind::Errors => Outcome {
                error: Some(bad),
                waited: Some(FAST),
                unanswered: false,
            },
            Kind::Latency => Outcome {
                error: Some(false),
                waited: Some(if bad { SLOW } else { FAST }),
                unanswered: false,
            },
        }
    }
}

/// Two Poisson streams, canary and target, merged; simulated time in ns.
struct Traffic {
    rng: fastrand::Rng,
    now: f64,
    /// Requests per second to each.
    canary_rate: f64,
    target_rate: f64,
}

impl Traffic {
    fn new(seed: u64, canary_rate: f64, target_rate: f64) -> Self {
        Traffic {
            rng: fastrand::Rng::with_seed(seed),
            now: 0.0,
            canary_rate,
            target_rate,
        }
    }

    /// The next arrival: (time, is it the canary's).
    fn next(&mut self) -> (Duration, bool) {
        let total = self.canary_rate + self.target_rate;
        // Exponential inter-arrival; 1 - u is in (0, 1].
        self.now += -(1.0 - self.rng.f64()).ln() / total;
        let canary = self.rng.f64() * total < self.canary_rate;
        (Duration::from_secs_f64(self.now), canary)
    }

    fn bad(&mut self, p: f64) -> bool {
        self.rng.f64() < p
    }
}

/// The rule before this judgment, on the real window: trip when at least
/// 50 requests in the last 30 s and their error ratio is above the line.
struct OldRule {
    window: Window,
}

impl OldRule {
    fn new() -> Self {
        OldRule {
            window: Window::new(OLD_WINDOW),
        }
    }

    fn record(&self, now: Duration, bad: bool) -> bool {
        self.window.record(now, Some(bad), None);
        let t = self.window.totals(now);
        t.requests >= OLD_MIN_REQUESTS && t.ratio() > ERROR_RATE
    }
}

/// A version under test: the new judgment and the old rule side by side,
/// each restarted after each of its rollbacks (as an operator's reset
/// would), so a long run counts every false rollback.
struct Judged {
    rollback: &'static str,
    new: (Judgment, Judgment),
    old: OldRule,
    new_trips: u64,
    old_trips: u64,
}

impl Judged {
    fn new(rollback: &'static str) -> Self {
        Judged {
            rollback,
            new: fresh(rollback),
            old: OldRule::new(),
            new_trips: 0,
            old_trips: 0,
        }
    }

    /// Record one canary answer; which rules tripped on it.
    fn canary(&mut self, now: Duration, kind: Kind, bad: bool) -> (bool, bool) {
        let new = self
            .new
            .0
            .record(now, kind.answer(bad), Some(&self.new.1))
            .is_some();
        if new {
            self.new_trips += 1;
            // A reset starts fresh evidence; the target keeps its counts.
            self.new.0 = fresh(self.rollback).0;
        }
        // The old rule judged errors only.
        let old = kind == Kind::Errors && self.old.record(now, bad);
        if old {
            self.old_trips += 1;
            self.old = OldRule::new();
        }
        (new, old)
    }

    fn target(&self, now: Duration, kind: Kind, bad: bool) {
        self.new.1.record(now, kind.answer(bad), None);
    }
}

/// Run `hours` of simulated traffic at `rate` to each version, the canary
/// bad with probability `p`, the target with `target_p`. Returns the new
/// and the old rule's rollbacks.
fn long_run(
    seed: u64,
    rollback: &'static str,
    kind: Kind,
    rate: f64,
    p: f64,
    target_p: f64,
    hours: f64,
) -> (u64, u64) {
    let mut traffic = Traffic::new(seed, rate, rate);
    let mut judged = Judged::new(rollback);
    let end = Duration::from_secs_f64(hours * HOUR);
    loop {
        let (now, canary) = traffic.next();
        if now > end {
            return (judged.new_trips, judged.old_trips);
        }
        if canary {
            let bad = traffic.bad(p);
            judged.canary(now, kind, bad);
        } else {
            let bad = traffic.bad(target_p);
            judged.target(now, kind, bad);
        }
    }
}

/// Requests and seconds until each rule first trips, the canary bad with
/// probability `p` from the start, the target healthy. `None`: not within
/// `limit` canary requests.
fn time_to_trip(
    seed: u64,
    rollback: &'static str,
    kind: Kind,
    rate: f64,
    p: f64,
    target_p: f64,
    limit: u64,
) -> [Option<(u64, f64)>; 2] {
    let mut traffic = Traffic::new(seed, rate, rate);
    let mut judged = Judged::new(rollback);
    let mut found = [None, None];
    let mut n = 0;
    while n < limit && found.iter().any(Option::is_none) {
        let (now, canary) = traffic.next();
        if !canary {
            let bad = traffic.bad(target_p);
            judged.target(now, kind, bad);
            continue;
        }
        n += 1;
        let bad = traffic.bad(p);
        let (new, old) = judged.canary(now, kind, bad);
        for (slot, tripped) in found.iter_mut().zip([new, old]) {
            if tripped && slot.is_none() {
                *slot = Some((n, now.as_secs_f64()));
            }
        }
    }
    found
}

/// Median and 95th percentile of the trips found; "never" if fewer than
/// half (or 95%) tripped within the limit.
fn quantiles(found: &[Option<(u64, f64)>], pick: impl Fn((u64, f64)) -> f64) -> (String, String) {
    let mut v: Vec<f64> = found
        .iter()
        .map(|f| f.map_or(f64::INFINITY, &pick))
        .collect();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let x = v[((v.len() as f64 - 1.0) * q).round() as usize];
        if x.is_finite() {
            if x >= 100.0 {
                format!("{x:.0}")
            } else {
                format!("{x:.1}")
            }
        } else {
            "never".to_string()
        }
    };
    (at(0.5), at(0.95))
}

/// Exact bounds on the false-rollback rate of the new rule, from its
/// definition rather than by simulation.
///
/// Each alternative's CUSUM is a Markov chain on [0, h). Rounding every
/// step up to a lattice of width `DELTA` (the yes-step up, the no-step
/// towards zero, the threshold down) gives a chain that is never below the
/// real one, so its expected run length to the threshold (solved exactly
/// from the linear first-step equations, a banded system) is a lower bound
/// on the real one. A CUSUM started at 0 is a stochastically monotone chain
/// started at its lowest state, so its run length is NBU (Brown and
/// Chaganty 1983), hence NBUE, and the expected number of crossings in T
/// answers is at most T / ARL (Barlow and Proschan). The rule trips when
/// either alternative crosses, so the bound is the sum over both. The
/// floor and the hold only ever delay a trip, so they are left out.
mod exact {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

    /// The lattice's width: finer is tighter and slower. --quick uses 0.01.
    static DELTA_BITS: AtomicU64 = AtomicU64::new(0x3F60_624D_D2F1_A9FC); // 0.002

    pub fn set_lattice(delta: f64) {
        DELTA_BITS.store(delta.to_bits(), Relaxed);
    }

    fn delta() -> f64 {
        f64::from_bits(DELTA_BITS.load(Relaxed))
    }

    /// The steps of each alternative, and the threshold, as the proxy
    /// computes them (canary_proxy's guard module; re-derived here from
    /// the same formulas and checked against the real judgment in main).
    pub fn alternatives(line: f64, trip_odds: f64) -> (Vec<(f64, f64)>, f64) {
        let steps = [2.0, 6.0]
            .iter()
            .map(|ratio| {
                let odds = ratio * line / (1.0 - line);
                let alt = odds / (1.0 + odds);
                ((alt / line).ln(), ((1.0 - alt) / (1.0 - line)).ln())
            })
            .collect();
        (steps, (2.0 * trip_odds).ln())
    }

    /// A lower bound on the expected answers before the CUSUM with steps
    /// (`up` with probability `p`, else `down`) reaches `h` from 0.
    pub fn arl_lower_bound(up: f64, down: f64, h: f64, p: f64) -> f64 {
        if p == 0.0 {
            return f64::INFINITY;
        }
        let delta = delta();
        let up = (up / delta).ceil() as usize;
        let down = ((-down / delta).floor() as usize).max(1); // towards zero
        let n = (h / delta).floor() as usize;
        // x[i] = expected answers to reach n from lattice state i:
        //   x[i] = 1 + p x[i + up] + (1 - p) x[max(0, i - down)],
        // with x = 0 from n on. (I - Q) x = 1 is banded: `down` below the
        // diagonal (a no from i < down lands on 0, still within the band)
        // and `up` above it, so elimination makes no fill-in outside the
        // band. No pivoting is needed: I - Q is a diagonally dominant
        // M-matrix.
        let width = down + up + 1;
        let at = |i: usize, j: usize| i * width + (j + down - i);
        let mut a = vec![0.0f64; n * width];
        let mut rhs = vec![1.0f64; n];
        for i in 0..n {
            a[at(i, i)] += 1.0;
            if i + up < n {
                a[at(i, i + up)] -= p;
            }
            a[at(i, i.saturating_sub(down))] -= 1.0 - p;
        }
        for k in 0..n {
            let pivot = a[at(k, k)];
            let last_col = (k + up).min(n - 1);
            for i in k + 1..=(k + down).min(n - 1) {
                let f = a[at(i, k)] / pivot;
                if f == 0.0 {
                    continue;
                }
                for j in k..=last_col {
                    a[at(i, j)] -= f * a[at(k, j)];
                }
                rhs[i] -= f * rhs[k];
            }
        }
        let mut x = vec![0.0f64; n];
        for i in (0..n).rev() {
            let mut s = rhs[i];
            for j in i + 1..=(i + up).min(n - 1) {
                s -= a[at(i, j)] * x[j];
            }
            x[i] = s / a[at(i, i)];
        }
        x[0]
    }

    /// An upper bound on expected false rollbacks in `answers` answers at
    /// true rate `p` against `line`.
    pub fn false_rollbacks_bound(line: f64, trip_odds: f64, p: f64, answers: f64) -> f64 {
        answers * rate_bound(line, trip_odds, p)
    }

    /// False rollbacks per answer, at most; memoised, since every cell of a
    /// row asks for the same rates.
    fn rate_bound(line: f64, trip_odds: f64, p: f64) -> f64 {
        use std::collections::HashMap;
        use std::sync::Mutex;
        static MEMO: Mutex<Option<HashMap<[u64; 3], f64>>> = Mutex::new(None);
        let key = [line.to_bits(), trip_odds.to_bits(), p.to_bits()];
        if let Some(v) = MEMO
            .lock()
            .unwrap()
            .get_or_insert_with(HashMap::new)
            .get(&key)
        {
            return *v;
        }
        let (steps, h) = alternatives(line, trip_odds);
        let v = steps
            .iter()
            .map(|&(up, down)| 1.0 / arl_lower_bound(up, down, h, p))
            .sum();
        MEMO.lock().unwrap().as_mut().unwrap().insert(key, v);
        v
    }
}

struct Args {
    quick: bool,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = it.next(),
            other => {
                eprintln!("detection: unknown argument {other}; use --quick and --out FILE");
                std::process::exit(2);
            }
        }
    }
    a
}

fn main() {
    let args = args();
    let started = std::time::Instant::now();
    // Simulated canary requests per false-rollback cell, and runs per
    // detection cell. The full run takes a few minutes on one core.
    let (cell_requests, runs) = if args.quick {
        (20_000.0, 10)
    } else {
        (20_000_000.0, 400)
    };
    if args.quick {
        exact::set_lattice(0.01);
    }
    let trip_odds = 1e5;
    sanity_check(trip_odds);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Detection bench: the rollback judgment against the rule it replaced\n"
    );
    let _ = writeln!(out, "Generated by `bench/detection`{} (proxy/examples/detection.rs), which drives the proxy's own decision code", if args.quick { " --quick (a smoke run: too few runs and hours to rely on)" } else { "" });
    let _ = writeln!(out, "with simulated time: Poisson arrivals at the same rate to the canary and to the target, Bernoulli errors");
    let _ = writeln!(out, "or slow answers. Default policy: `error_rate = 0.05`, `min_requests = 10`, `trip_odds = 1e5`,");
    let _ = writeln!(out, "`compare_target = true`; for latency, `slower_than = \"250ms\"` with `slow_rate` 0.05 (the default) or 0.01.");
    let _ = writeln!(out, "The old rule: a 30 s window, trip when it holds at least 50 requests and their error ratio is above 0.05.\n");

    false_rollbacks(
        &mut out,
        Kind::Errors,
        POLICY,
        ERROR_RATE,
        cell_requests,
        trip_odds,
    );
    detection(&mut out, Kind::Errors, POLICY, ERROR_RATE, runs);
    detection_against(
        &mut out,
        Kind::Errors,
        POLICY,
        ERROR_RATE,
        runs,
        0.5,
        &[2.0, 10.0],
    );
    shared_outage(&mut out, if args.quick { 1 } else { 100 });
    false_rollbacks(
        &mut out,
        Kind::Latency,
        LATENCY,
        ERROR_RATE,
        cell_requests,
        trip_odds,
    );
    detection(&mut out, Kind::Latency, LATENCY, ERROR_RATE, runs);
    let _ = writeln!(
        out,
        "### A tighter latency objective: `slow_rate = 0.01` (a p99 objective)\n"
    );
    let _ = writeln!(out, "Not a goal: at a line 5 times lower, each answer carries about 5 times less evidence, so detection takes about 5 times more answers.\n");
    detection(&mut out, Kind::Latency, P99, 0.01, runs);
    let _ = writeln!(out, "Bench time: {:.0} s.", started.elapsed().as_secs_f64());

    match &args.out {
        Some(path) => {
            std::fs::write(path, &out).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
            eprintln!("detection: wrote {path}");
        }
        None => print!("{out}"),
    }
}

/// The bounds below re-derive the judgment's steps; make sure they match
/// the real judgment, so the exact column describes the code that runs.
fn sanity_check(trip_odds: f64) {
    let (canary, stable) = fresh(POLICY);
    let (steps, h) = exact::alternatives(ERROR_RATE, trip_odds);
    // All errors: the first crossing comes after ceil(h / largest step).
    let largest = steps.iter().map(|s| s.0).fold(0.0, f64::max);
    let expect = (h / largest).ceil() as u64;
    let n = (1..=1000u64)
        .find(|_| {
            canary
                .record(
                    Duration::from_secs(1),
                    Kind::Errors.answer(true),
                    Some(&stable),
                )
                .is_some()
        })
        .expect("all errors trip");
    // The floor (min_requests = 10) can only make it later.
    assert_eq!(
        n,
        expect.max(10),
        "the bench's formulas must match the judgment"
    );
}

fn false_rollbacks(
    out: &mut String,
    kind: Kind,
    rollback: &'static str,
    line: f64,
    cell_requests: f64,
    trip_odds: f64,
) {
    let what = match kind {
        Kind::Errors => "error rate",
        Kind::Latency => "share of slow answers",
    };
    let _ = writeln!(out, "## False rollbacks: {what}\n");
    let _ = writeln!(out, "A canary whose true {what} is 0, 0.25 or 0.5 times the line ({line}), at 1 to 1000 requests/s; the target healthy.");
    let _ = writeln!(out, "Rollbacks per 1000 simulated hours, with the simulated hours behind each cell. **Bound**: the exact upper bound");
    let _ = writeln!(out, "on the expected false rollbacks per 1000 hours (see `exact` in the source), for the cells too rare to simulate.\n");
    let _ = writeln!(out, "| req/s | true rate | hours simulated | new rule: per 1000 h | new rule: bound per 1000 h | old rule: per 1000 h |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
    for (i, rate) in [1.0, 10.0, 100.0, 1000.0].into_iter().enumerate() {
        for (j, share) in [0.0, 0.25, 0.5].into_iter().enumerate() {
            let p = share * line;
            let hours = cell_requests / rate / HOUR;
            let (new, old) = long_run(
                1000 + (i * 10 + j) as u64,
                rollback,
                kind,
                rate,
                p,
                0.0,
                hours,
            );
            let bound = exact::false_rollbacks_bound(line, trip_odds, p, rate * HOUR * 1000.0);
            let old = if kind == Kind::Errors {
                format!("{:.1}", old as f64 / hours * 1000.0)
            } else {
                "— (had no latency rule)".into()
            };
            let _ = writeln!(
                out,
                "| {rate} | {share}× | {hours:.0} | {:.2} ({new} in {hours:.0} h) | {} | {old} |",
                new as f64 / hours * 1000.0,
                fmt_bound(bound)
            );
        }
    }
    // Between the goals and the line: not goals, but what an operator
    // should know about a version just under its line.
    let _ = writeln!(out, "\nAbove 0.5× the bound is no longer small, by design: a version at 0.75× or at the line is close to it, and");
    let _ = writeln!(out, "telling it apart takes thousands of answers. Expected answers between false rollbacks (exact lower bound):\n");
    let _ = writeln!(out, "| true rate | answers per false rollback, at least |");
    let _ = writeln!(out, "|---:|---:|");
    for share in [0.5, 0.75, 0.9, 1.0] {
        let per = 1.0 / exact::false_rollbacks_bound(line, trip_odds, share * line, 1.0);
        let _ = writeln!(out, "| {share}× | {per:.3e} |");
    }
    let _ = writeln!(out);
}

fn fmt_bound(b: f64) -> String {
    if b == 0.0 {
        "0 (no bad answer can happen)".into()
    } else if b < 1e-3 {
        format!("{b:.1e}")
    } else {
        format!("{b:.3}")
    }
}

fn detection(out: &mut String, kind: Kind, rollback: &'static str, line: f64, runs: u64) {
    detection_against(
        out,
        kind,
        rollback,
        line,
        runs,
        0.0,
        &[1.5, 2.0, 5.0, 10.0, 20.0],
    );
}

/// The same, with the target failing `target_share` times the line itself.
fn detection_against(
    out: &mut String,
    kind: Kind,
    rollback: &'static str,
    line: f64,
    runs: u64,
    target_share: f64,
    multiples: &[f64],
) {
    let what = match kind {
        Kind::Errors => "error rate",
        Kind::Latency => "share of slow answers",
    };
    if target_share == 0.0 {
        let _ = writeln!(out, "## Detection: {what}, line {line}\n");
        let _ = writeln!(out, "A canary bad from its first request, the target healthy. Canary requests and seconds until the trip, median / p95 over {runs} runs;");
    } else {
        let _ = writeln!(
            out,
            "### The same with a target that has errors of its own ({target_share}× the line)\n"
        );
        let _ = writeln!(out, "The hold waits while the target shows any evidence against itself, so a target that fails now and then costs some delay;");
    }
    let _ = writeln!(
        out,
        "\"never\": not within {DETECTION_LIMIT} canary requests.\n"
    );
    let _ = writeln!(out, "| true rate | req/s | new rule: requests | new rule: seconds | old rule: requests | old rule: seconds |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|");
    for (i, &multiple) in multiples.iter().enumerate() {
        let p = (multiple * line).min(1.0);
        for (j, rate) in [1.0, 10.0, 100.0].into_iter().enumerate() {
            let found: Vec<[Option<(u64, f64)>; 2]> = (0..runs)
                .map(|r| {
                    time_to_trip(
                        50_000 + (i * 1000 + j * 100) as u64 * runs + r,
                        rollback,
                        kind,
                        rate,
                        p,
                        target_share * line,
                        DETECTION_LIMIT,
                    )
                })
                .collect();
            let new: Vec<_> = found.iter().map(|f| f[0]).collect();
            let old: Vec<_> = found.iter().map(|f| f[1]).collect();
            let (nr50, nr95) = quantiles(&new, |(n, _)| n as f64);
            let (ns50, ns95) = quantiles(&new, |(_, s)| s);
            let old_cells = if kind == Kind::Errors {
                let (or50, or95) = quantiles(&old, |(n, _)| n as f64);
                let (os50, os95) = quantiles(&old, |(_, s)| s);
                format!("{or50} / {or95} | {os50} / {os95}")
            } else {
                "— | —".into()
            };
            let _ = writeln!(out, "| {multiple}× ({p:.3}) | {rate} | {nr50} / {nr95} | {ns50} / {ns95} | {old_cells} |");
        }
    }
    let _ = writeln!(out);
}

/// Both healthy for ten minutes, then both fail at 6 times the line for an
/// hour: the decision must be held, not rolled back, also in the first
/// seconds, while the windows still show the healthy past. Then either the
/// target recovers while the canary stays bad (the canary must trip), or
/// both recover (it must not).
fn shared_outage(out: &mut String, hours: u64) {
    let rate = 10.0;
    let p = 6.0 * ERROR_RATE;
    let _ = writeln!(out, "## Shared outage\n");
    let _ = writeln!(out, "Target and canary at {rate} requests/s each: healthy for 10 minutes, then both fail {:.0}% of answers (6× the line)", p * 100.0);
    let _ = writeln!(out, "for one simulated hour, then 10 more minutes in which either the target recovers and the canary stays bad, or");
    let _ = writeln!(
        out,
        "both recover. {hours} independent runs of each ending.\n"
    );
    let mut rows = [[0u64; 2]; 2]; // [ending][new, old] rollbacks during the outage
    let mut held = 0;
    let mut to_trip = Vec::new();
    let mut after_both = [0u64; 2];
    let start = Duration::from_secs(600);
    let outage_end = start + Duration::from_secs(3600);
    let end = outage_end + Duration::from_secs(600);
    for (ending, row) in rows.iter_mut().enumerate() {
        for h in 0..hours {
            let mut traffic = Traffic::new(7_000 + h * 2 + ending as u64, rate, rate);
            let mut judged = Judged::new(POLICY);
            let mut was_held = false;
            let mut tripped_after = None;
            loop {
                let (now, canary) = traffic.next();
                if now > end {
                    break;
                }
                let phase = if now < start {
                    0
                } else if now <= outage_end {
                    1
                } else {
                    2
                };
                let p_canary = match (phase, ending) {
                    (1, _) | (2, 0) => p,
                    _ => 0.0,
                };
                let p_target = if phase == 1 { p } else { 0.0 };
                if canary {
                    let bad = traffic.bad(p_canary);
                    let (new, old) = judged.canary(now, Kind::Errors, bad);
                    match phase {
                        1 => {
                            row[0] += new as u64;
                            row[1] += old as u64;
                            was_held |= judged.new.0.held(Criterion::Errors, now, OLD_WINDOW);
                        }
                        2 => {
                            if new && tripped_after.is_none() {
                                tripped_after = Some((now - outage_end).as_secs_f64());
                            }
                            if ending == 1 {
                                after_both[0] += new as u64;
                                after_both[1] += old as u64;
                            }
                        }
                        _ => {}
                    }
                } else {
                    let bad = traffic.bad(p_target);
                    judged.target(now, Kind::Errors, bad);
                }
            }
            held += was_held as u64;
            if ending == 0 {
                to_trip.push(tripped_after.map(|s| (0, s)));
            }
        }
    }
    let (t50, t95) = quantiles(&to_trip, |(_, s)| s);
    let _ = writeln!(out, "| | new rule | old rule |");
    let _ = writeln!(out, "|---|---:|---:|");
    let _ = writeln!(
        out,
        "| rollbacks during {} outage hours | {} | {} |",
        2 * hours,
        rows[0][0] + rows[1][0],
        rows[0][1] + rows[1][1]
    );
    let _ = writeln!(
        out,
        "| outage hours in which the decision was reported held | {held} of {} | — |",
        2 * hours
    );
    let _ = writeln!(out, "| target recovers, canary still bad: seconds to the trip, median / p95 | {t50} / {t95} | — |");
    let _ = writeln!(
        out,
        "| both recover: rollbacks in the 10 minutes after | {} | {} |",
        after_both[0], after_both[1]
    );
    let _ = writeln!(out);
}
