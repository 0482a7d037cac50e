//! The `[progress]` table: weight steps that advance on good evidence
//! (docs/progressive.md; the run itself is in `crate::progress`).

use std::time::{Duration, SystemTime};

use toml::Spanned;

use super::{bool_key, show, version_named, Problems, RollbackPolicy, VersionSpec};

const MAX_STEPS: usize = 100;
const STEP_TIME_RANGE: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(24 * 3600));
/// Answers judged in a step before it may advance, by default: enough that
/// a step rests on more than a handful of answers. A clearly bad version
/// trips the rollback on far fewer; one just over its line needs hundreds
/// (docs/rollback.md), which is what several steps add up to.
const DEFAULT_MIN_REQUESTS: u64 = 100;
const MAX_MIN_REQUESTS: u64 = 1_000_000;

/// `[progress]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProgressSpec {
    /// Index of the version whose weight steps up.
    pub(crate) version: usize,
    /// Percent of all traffic, strictly increasing, 0 to 100.
    pub(crate) steps: Vec<u64>,
    pub(crate) step_time: Duration,
    pub(crate) min_requests: u64,
    /// The schedule's origin, the same on every replica.
    pub(crate) start: Option<SystemTime>,
    pub(crate) paused: bool,
}

impl ProgressSpec {
    /// Everything but `paused`: a change of it restarts the run; pausing
    /// and resuming do not.
    pub(crate) fn same_run(&self, other: &ProgressSpec) -> bool {
        ProgressSpec {
            paused: false,
            ..self.clone()
        } == ProgressSpec {
            paused: false,
            ..other.clone()
        }
    }
}

raw_table!(
    /// `[progress]`
    pub(super) RawProgress { version, steps, step_time, min_requests, start, paused }
);

pub(super) fn validate_progress(
    raw: Spanned<RawProgress>,
    versions: &[VersionSpec],
    declared: &[String],
    rollback: Option<&RollbackPolicy>,
    problems: &mut Problems<'_>,
) -> Option<ProgressSpec> {
    let span = raw.span();
    let raw = raw.into_inner();
    if rollback.is_none() {
        problems.add("progress", Some(span.clone()), "needs a [rollback] table: a step advances only on the judgment's evidence, which [rollback] defines; add [rollback] with target = \"stable\"");
    }
    let version = version_named(
        "progress.version",
        raw.version.as_ref(),
        span.clone(),
        "the version whose weight steps up",
        (versions, declared),
        problems,
    );
    let version = match (version, rollback) {
        (Some(i), Some(r)) if r.target == i => {
            let v = raw.version.as_ref().expect("a version was named");
            problems.add("progress.version", Some(v.span()), format!("`{}` is the rollback target, which is never judged, so no step could ever pass; name the new version", versions[i].name));
            None
        }
        (version, _) => version,
    };
    let fix = "use a list of percentages of traffic, strictly increasing, from 0 to 100, like steps = [1, 5, 10, 25, 50, 100]";
    let steps = match &raw.steps {
        None => {
            problems.add(
                "progress.steps",
                Some(span.clone()),
                format!("missing; {fix}"),
            );
            None
        }
        Some(v) => {
            let items = v.get_ref().as_array();
            let parsed: Option<Vec<u64>> = items.and_then(|items| {
                items
                    .iter()
                    .map(|i| {
                        i.as_integer()
                            .filter(|x| (0..=100).contains(x))
                            .map(|x| x as u64)
                    })
                    .collect()
            });
            match parsed {
                Some(steps)
                    if !steps.is_empty()
                        && steps.len() <= MAX_STEPS
                        && steps.windows(2).all(|w| w[0] < w[1]) =>
                {
                    Some(steps)
                }
                _ => {
                    problems.add(
                        "progress.steps",
                        Some(v.span()),
                        format!("{} is not accepted; {fix}", show(v.get_ref())),
                    );
                    None
                }
            }
        }
    };
    let step_time = match &raw.step_time {
        None => {
            problems.add(
                "progress.step_time",
                Some(span.clone()),
                "missing; set how long each step lasts at least, like step_time = \"5m\"",
            );
            None
        }
        Some(v) => {
            match v.get_ref().as_str().map(humantime::parse_duration) {
                Some(Ok(d)) if (STEP_TIME_RANGE.0..=STEP_TIME_RANGE.1).contains(&d) => Some(d),
                _ => {
                    problems.add("progress.step_time", Some(v.span()), format!("{} is not accepted; use a duration from \"1s\" to \"24h\", like \"5m\"", show(v.get_ref())));
                    None
                }
            }
        }
    };
    let min_requests = match &raw.min_requests {
        None => DEFAULT_MIN_REQUESTS,
        Some(v) => match v.get_ref().as_integer() {
            Some(n) if (1..=MAX_MIN_REQUESTS as i64).contains(&n) => n as u64,
            _ => {
                problems.add("progress.min_requests", Some(v.span()), format!("{} is out of range; use an integer from 1 to 1000000, like 100 (the default): the answers the version must have judged in a step before it may advance", show(v.get_ref())));
                DEFAULT_MIN_REQUESTS
            }
        },
    };
    let start = raw.start.as_ref().and_then(|v| {
        match v.get_ref().as_str().map(humantime::parse_rfc3339) {
            Some(Ok(t)) => Some(t),
            _ => {
                problems.add("progress.start", Some(v.span()), format!("{} is not a time; use RFC 3339 in UTC, like start = \"2026-12-01T10:00:00Z\" (the same on every replica), or leave it out to start when each replica reads the file", show(v.get_ref())));
                None
            }
        }
    });
    let paused = bool_key(raw.paused.as_ref(), "progress.paused", problems);
    let (version, steps) = (version?, steps?);
    // Below 100%, the rest of the traffic goes to the other versions by
    // their weights, so one of them needs a weight.
    let others: u64 = versions
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != version)
        .map(|(_, v)| v.weight)
        .sum();
    if others == 0 && steps.iter().any(|&s| s < 100) {
        problems.add("progress.steps", raw.steps.as_ref().map(|v| v.span()), "the steps below 100% give the rest of the traffic to the other versions by their weights, but every other version has weight 0; give `stable` (or the version that serves now) a weight, like weight = 100");
        return None;
    }
    Some(ProgressSpec {
        version,
        steps,
        step_time: step_time?,
        min_requests,
        start,
        paused,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{parse, tests::GOOD, Problem};
    use super::*;

    fn problems(extra: &str) -> Vec<Problem> {
        parse(format!("{GOOD}\n{extra}").as_bytes()).expect_err("should be invalid")
    }

    #[test]
    fn a_full_table_parses() {
        let t = parse(
            format!("{GOOD}\n[progress]\nversion = \"canary\"\nsteps = [0, 5, 100]\nstep_time = \"5m\"\nmin_requests = 50\nstart = \"2026-12-01T10:00:00Z\"\npaused = true\n").as_bytes(),
        )
        .unwrap();
        let p = t.progress.unwrap();
        assert_eq!(
            (p.version, p.steps.as_slice(), p.min_requests),
            (1, &[0, 5, 100][..], 50)
        );
        assert_eq!(p.step_time, Duration::from_secs(300));
        assert!(p.paused && p.start.is_some());
    }

    #[test]
    fn steps_must_rise_within_0_to_100() {
        for steps in [
            "[]", "[5, 5]", "[50, 10]", "[1, 101]", "[-1, 5]", "[\"5\"]", "5",
        ] {
            let p = problems(&format!(
                "[progress]\nversion = \"canary\"\nsteps = {steps}\nstep_time = \"1m\"\n"
            ));
            assert_eq!(p[0].key, "progress.steps", "{steps}: {p:?}");
            assert!(p[0].message.contains("strictly increasing"), "{}", p[0]);
        }
    }

    #[test]
    fn the_version_must_be_judged_and_the_times_valid() {
        let p =
            problems("[progress]\nversion = \"stable\"\nsteps = [5, 100]\nstep_time = \"1m\"\n");
        assert!(p[0].message.contains("rollback target"), "{}", p[0]);
        let p = problems("[progress]\nversion = \"canry\"\nsteps = [5]\nstep_time = \"0s\"\nstart = \"tomorrow\"\nmin_requests = 0\n");
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "progress.version",
                "progress.step_time",
                "progress.min_requests",
                "progress.start"
            ]
        );
        assert!(p[0].message.contains("did you mean `canary`"), "{}", p[0]);
        let no_policy = "[versions.stable]\nupstream = \"http://a:1\"\nweight = 1\n[versions.canary]\nupstream = \"http://b:1\"\nweight = 0\n[progress]\nversion = \"canary\"\nsteps = [5]\nstep_time = \"1m\"\n";
        let p = parse(no_policy.as_bytes()).unwrap_err();
        assert!(
            p[0].message.contains("needs a [rollback] table"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn pausing_is_the_same_run_and_other_edits_are_not() {
        let base = "[progress]\nversion = \"canary\"\nsteps = [5, 100]\nstep_time = \"1m\"\n";
        let p = |extra: &str| {
            parse(format!("{GOOD}\n{base}{extra}").as_bytes())
                .unwrap()
                .progress
                .unwrap()
        };
        assert!(p("").same_run(&p("paused = true\n")));
        assert!(!p("").same_run(&p("min_requests = 7\n")));
    }
}
