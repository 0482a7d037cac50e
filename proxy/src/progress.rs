//! Progressive delivery: the `[progress]` table's weight steps, each held
//! for `step_time` and left only on good evidence (docs/progressive.md).
//!
//! Pure, like `guard`: the caller passes the time and the version's
//! evidence, and publishes the weight. A step advances when its time is up
//! *and* the version's judgment has at least `min_requests` answers judged
//! during the step *and* shows no regression: not rolled back, no decision
//! held, and every criterion's evidence below half the trip point (the
//! level at which the shipped alert calls a version suspect). Too little
//! traffic means waiting for evidence, never promotion.
//!
//! The schedule is anchored at `start` (the same instant on every replica)
//! or, without it, when this replica first saw the table: step `k` (1-based)
//! ends no sooner than `anchor + k x step_time`, plus the time spent paused.
//! A replica that waited for evidence, restarted, or saw the table late is
//! behind that schedule and climbs one step each time a step's evidence is
//! in, so it catches up by evidence, never by time alone.

use std::time::Duration;

use crate::routes::ProgressSpec;

/// Where a progress stands; the `state` label of
/// `canary_proxy_progress_state` and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// On a step whose time is not up yet (or before `start`).
    Progressing,
    /// The step's time is up, but its evidence is too thin or not clean.
    WaitingForEvidence,
    Paused,
    /// On the last step: the version keeps its weight.
    Complete,
    /// The version was rolled back: the progress stops until its entry
    /// changes.
    RolledBack,
}

impl State {
    pub(crate) const ALL: [State; 5] = [
        State::Progressing,
        State::WaitingForEvidence,
        State::Paused,
        State::Complete,
        State::RolledBack,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Progressing => "progressing",
            State::WaitingForEvidence => "waiting_for_evidence",
            State::Paused => "paused",
            State::Complete => "complete",
            State::RolledBack => "rolled_back",
        }
    }
}

/// What the judgment says of the version now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Evidence {
    /// Answers judged since the judgment started.
    pub(crate) judged: u64,
    /// No regression: no decision held, every criterion's evidence below
    /// half the trip point.
    pub(crate) clean: bool,
    pub(crate) rolled_back: bool,
}

/// A change of step or state, to log once with its reason.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition {
    pub(crate) from: (usize, State),
    pub(crate) to: (usize, State),
    pub(crate) reason: String,
}

/// One replica's run of a `[progress]` table.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    /// 0 before the schedule starts; then 1..=steps.len().
    step: usize,
    state: State,
    /// The schedule's origin, in nanoseconds of the clock (before its base
    /// when `start` is in the past).
    anchor: i128,
    paused_since: Option<Duration>,
    paused_total: Duration,
    step_started: Option<Duration>,
    /// `Evidence::judged` when the step started.
    judged_at_step: u64,
    /// Answers judged in this step, as of the last update.
    judged_in_step: u64,
    reason: String,
}

impl Progress {
    /// A run that starts now, or at `start` (`since_start` is how long ago
    /// that was; negative while it is ahead).
    pub(crate) fn new(now: Duration, since_start: Option<i128>) -> Self {
        let now_ns = now.as_nanos() as i128;
        Progress {
            step: 0,
            state: State::Progressing,
            anchor: now_ns - since_start.unwrap_or(0),
            paused_since: None,
            paused_total: Duration::ZERO,
            step_started: None,
            judged_at_step: 0,
            judged_in_step: 0,
            reason: "waiting for the schedule's start".into(),
        }
    }

    pub(crate) fn step(&self) -> usize {
        self.step
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    pub(crate) fn reason(&self) -> &str {
        &self.reason
    }

    pub(crate) fn judged_in_step(&self) -> u64 {
        self.judged_in_step
    }

    pub(crate) fn step_started(&self) -> Option<Duration> {
        self.step_started
    }

    /// The version's share of traffic, in percent.
    pub(crate) fn percent(&self, spec: &ProgressSpec) -> u64 {
        match self.step {
            0 => 0,
            k => spec.steps[k - 1],
        }
    }

    /// When the current step's time is up (clock time; `None` when no
    /// further step is due: complete, rolled back or paused).
    pub(crate) fn next_step_at(&self, spec: &ProgressSpec) -> Option<i128> {
        match self.state {
            State::Complete | State::RolledBack | State::Paused => None,
            _ => Some(self.step_end(spec, self.step)),
        }
    }

    /// The nominal end of step `k` (for 0: the schedule's start).
    fn step_end(&self, spec: &ProgressSpec, k: usize) -> i128 {
        self.anchor
            + (k as i128) * spec.step_time.as_nanos() as i128
            + self.paused_total.as_nanos() as i128
    }

    /// Bring the run up to `now`; the transition, if the step or the state
    /// changed.
    pub(crate) fn update(
        &mut self,
        spec: &ProgressSpec,
        now: Duration,
        evidence: Evidence,
    ) -> Option<Transition> {
        let before = (self.step, self.state);
        let now_ns = now.as_nanos() as i128;
        self.judged_in_step = evidence.judged.saturating_sub(self.judged_at_step);
        if evidence.rolled_back {
            self.state = State::RolledBack;
            self.reason = "the version was rolled back; change its entry to start again".into();
        } else if self.state == State::RolledBack {
            // Only a new run (a changed entry) leaves this state.
        } else if spec.paused {
            self.paused_since.get_or_insert(now);
            self.state = State::Paused;
            self.reason = "paused = true holds the step; remove it to resume".into();
        } else {
            if let Some(since) = self.paused_since.take() {
                self.paused_total += now.saturating_sub(since);
            }
            if self.step == 0 && now_ns >= self.step_end(spec, 0) {
                self.enter(1, now, evidence.judged);
            }
            let last = spec.steps.len();
            // At most one step per update: a new step needs answers of its
            // own, and this update's answers were all counted in the last.
            let mut passed = None;
            loop {
                if self.step == 0 {
                    self.state = State::Progressing;
                    self.reason = "waiting for the schedule's start".into();
                } else if self.step == last {
                    self.state = State::Complete;
                    self.reason = format!("on the last step, {}%", spec.steps[last - 1]);
                } else if now_ns < self.step_end(spec, self.step) {
                    self.state = State::Progressing;
                    self.reason = format!(
                        "on step {} of {}; {} of {} answers judged in this step",
                        self.step, last, self.judged_in_step, spec.min_requests
                    );
                } else if self.judged_in_step < spec.min_requests {
                    self.state = State::WaitingForEvidence;
                    self.reason = format!(
                        "waiting for evidence: {} of {} answers judged in this step",
                        self.judged_in_step, spec.min_requests
                    );
                } else if !evidence.clean {
                    self.state = State::WaitingForEvidence;
                    self.reason = "waiting for evidence: the judgment suspects a regression (evidence at half the trip point or more, or a decision held)".into();
                } else if passed.is_none() {
                    passed = Some((self.step, self.judged_in_step));
                    self.enter(self.step + 1, now, evidence.judged);
                    continue;
                }
                break;
            }
            if let Some((step, judged)) = passed {
                if (self.step, self.state) != before {
                    self.reason = format!(
                        "step {step} passed: its time is up and {judged} answers judged in it show no regression; now {}",
                        self.reason
                    );
                }
            }
        }
        (before != (self.step, self.state)).then(|| Transition {
            from: before,
            to: (self.step, self.state),
            reason: self.reason.clone(),
        })
    }

    fn enter(&mut self, step: usize, now: Duration, judged: u64) {
        self.step = step;
        self.step_started = Some(now);
        self.judged_at_step = judged;
        self.judged_in_step = 0;
    }

    /// Count answers judged from `judged` on (the judgment's count when
    /// the run starts), not the ones before the run.
    pub(crate) fn start_count(&mut self, judged: u64) {
        self.judged_at_step = judged;
    }

    /// The judgment was replaced (a policy change): count from its start.
    pub(crate) fn judgment_restarted(&mut self) {
        self.judged_at_step = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(steps: &[u64], paused: bool) -> ProgressSpec {
        ProgressSpec {
            version: 1,
            steps: steps.to_vec(),
            step_time: Duration::from_secs(10),
            min_requests: 20,
            start: None,
            paused,
        }
    }

    fn ev(judged: u64) -> Evidence {
        Evidence {
            judged,
            clean: true,
            rolled_back: false,
        }
    }

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_healthy_version_walks_every_step_to_complete() {
        let sp = spec(&[5, 25, 100], false);
        let mut p = Progress::new(s(0), None);
        p.update(&sp, s(0), ev(0));
        assert_eq!(
            (p.step(), p.state(), p.percent(&sp)),
            (1, State::Progressing, 5)
        );
        // Enough answers, but the time is not up.
        assert!(p.update(&sp, s(9), ev(100)).is_none());
        assert_eq!(p.step(), 1);
        let t = p.update(&sp, s(10), ev(100)).expect("a transition");
        assert_eq!(t.to, (2, State::Progressing));
        assert!(t.reason.contains("100 answers judged"), "{}", t.reason);
        assert_eq!(p.percent(&sp), 25);
        // Step 2 ends at anchor + 20 s, and counts from its own start.
        p.update(&sp, s(20), ev(119));
        assert_eq!((p.step(), p.state()), (2, State::WaitingForEvidence));
        p.update(&sp, s(21), ev(120));
        assert_eq!(
            (p.step(), p.state(), p.percent(&sp)),
            (3, State::Complete, 100)
        );
        assert_eq!(p.next_step_at(&sp), None);
    }

    #[test]
    fn thin_traffic_waits_for_evidence_and_never_advances_on_time_alone() {
        let sp = spec(&[5, 100], false);
        let mut p = Progress::new(s(0), None);
        p.update(&sp, s(0), ev(0));
        for t in (10..100_000).step_by(997) {
            p.update(&sp, s(t), ev(19));
            assert_eq!((p.step(), p.state()), (1, State::WaitingForEvidence));
        }
        assert!(p.reason().contains("19 of 20"), "{}", p.reason());
        p.update(&sp, s(100_001), ev(20));
        assert_eq!(p.state(), State::Complete);
    }

    #[test]
    fn a_suspected_regression_holds_the_step() {
        let sp = spec(&[5, 100], false);
        let mut p = Progress::new(s(0), None);
        p.update(&sp, s(0), ev(0));
        let suspect = Evidence {
            judged: 500,
            clean: false,
            rolled_back: false,
        };
        p.update(&sp, s(60), suspect);
        assert_eq!((p.step(), p.state()), (1, State::WaitingForEvidence));
        assert!(p.reason().contains("regression"));
        p.update(&sp, s(61), ev(500));
        assert_eq!(p.state(), State::Complete);
    }

    #[test]
    fn a_rollback_mid_way_stops_the_progress_for_good() {
        let sp = spec(&[5, 25, 100], false);
        let mut p = Progress::new(s(0), None);
        p.update(&sp, s(0), ev(0));
        p.update(&sp, s(10), ev(50));
        assert_eq!(p.step(), 2);
        let rb = Evidence {
            judged: 60,
            clean: false,
            rolled_back: true,
        };
        let t = p.update(&sp, s(12), rb).unwrap();
        assert_eq!(t.to, (2, State::RolledBack));
        // Even with clean evidence later (a fresh judgment), it stays.
        for t in [30, 60, 600] {
            p.update(&sp, s(t), ev(10_000));
            assert_eq!((p.step(), p.state()), (2, State::RolledBack));
        }
        assert_eq!(p.next_step_at(&sp), None);
    }

    #[test]
    fn pause_holds_the_step_and_resume_adds_the_paused_time() {
        let mut sp = spec(&[5, 25, 100], false);
        let mut p = Progress::new(s(0), None);
        p.update(&sp, s(0), ev(0));
        sp.paused = true;
        p.update(&sp, s(5), ev(10));
        for t in [10, 100, 1000] {
            p.update(&sp, s(t), ev(1000));
            assert_eq!((p.step(), p.state()), (1, State::Paused));
        }
        sp.paused = false;
        // Paused 995 s: step 1 now ends at 10 + 995.
        p.update(&sp, s(1000), ev(1000));
        assert_eq!((p.step(), p.state()), (1, State::Progressing));
        assert_eq!(p.next_step_at(&sp), Some(s(1005).as_nanos() as i128));
        p.update(&sp, s(1005), ev(1000));
        assert_eq!(p.step(), 2);
    }

    #[test]
    fn a_start_in_the_future_waits_at_zero_and_a_past_one_is_caught_up_by_evidence() {
        let sp = spec(&[5, 25, 100], false);
        let mut p = Progress::new(s(100), Some(-30_000_000_000));
        p.update(&sp, s(100), ev(0));
        assert_eq!(
            (p.step(), p.percent(&sp), p.state()),
            (0, 0, State::Progressing)
        );
        p.update(&sp, s(130), ev(0));
        assert_eq!(p.step(), 1);

        // A replica that comes up 25 s after the start: the schedule says
        // step 3, but each step still needs its own answers.
        let mut late = Progress::new(s(0), Some(25_000_000_000));
        late.update(&sp, s(0), ev(0));
        assert_eq!((late.step(), late.state()), (1, State::WaitingForEvidence));
        late.update(&sp, s(1), ev(20));
        assert_eq!((late.step(), late.state()), (2, State::WaitingForEvidence));
        late.update(&sp, s(2), ev(39));
        assert_eq!(late.step(), 2);
        late.update(&sp, s(3), ev(40));
        assert_eq!(late.step(), 3);
    }

    #[test]
    fn two_replicas_with_the_same_start_change_step_at_the_same_instant() {
        let sp = spec(&[5, 25, 50, 100], false);
        // One replica's clock started 7 s before the other's.
        let mut a = Progress::new(s(10), Some(0));
        let mut b = Progress::new(s(3), Some(0));
        for t in 0..45u64 {
            a.update(&sp, s(10 + t), ev(1000 * t));
            b.update(&sp, s(3 + t), ev(1000 * t));
            assert_eq!(a.step(), b.step(), "at {t} s after the start");
        }
        assert_eq!(a.state(), State::Complete);
    }
}
