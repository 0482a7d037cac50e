//! The `/status` document, as typed views: this file is its one definition.
//! docs/operations.md describes it field by field; tests read it by these
//! names.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::control::{ProgressRun, ReloadStatus};
use crate::guard::{Counts, Criterion, Judgment, Totals};
use crate::routes::{RollbackPolicy, StickyKey};
use crate::snapshot::{RollbackRecord, Snapshot, VersionRuntime};

#[derive(Debug, Serialize)]
pub(crate) struct Status {
    /// Seconds since the proxy started.
    pub(crate) uptime_seconds: f64,
    pub(crate) routes: RoutesView,
    pub(crate) versions: Vec<VersionView>,
    /// `null` when the routes file has no `[rollback]` table.
    pub(crate) rollback: Option<PolicyView>,
    /// The routing tables (docs/routing.md); `null` when absent.
    pub(crate) sticky: Option<StickyView>,
    #[serde(rename = "override")]
    pub(crate) override_: Option<OverrideView>,
    pub(crate) mirror: Option<MirrorView>,
    /// The `[progress]` run; `null` without the table.
    pub(crate) progress: Option<ProgressView>,
    pub(crate) reload: ReloadView,
}

/// `[progress]`: where the run stands (docs/progressive.md).
#[derive(Debug, Serialize)]
pub(crate) struct ProgressView {
    pub(crate) version: String,
    /// progressing, waiting_for_evidence, paused, complete or rolled_back.
    pub(crate) state: &'static str,
    /// 1-based index into `steps`; 0 before the schedule's start.
    pub(crate) step: usize,
    pub(crate) steps: Vec<u64>,
    /// The version's share of traffic now, in percent.
    pub(crate) weight_percent: u64,
    pub(crate) step_started_at: Option<String>,
    /// When the current step's time is up; `null` when complete, rolled
    /// back or paused.
    pub(crate) next_step_at: Option<String>,
    /// Answers of the version judged in the current step, and how many it
    /// needs before it may advance.
    pub(crate) judged: u64,
    pub(crate) min_requests: u64,
    pub(crate) reason: String,
}

impl ProgressView {
    pub(crate) fn new(p: &ProgressRun, name: &str, now: Duration, wall: SystemTime) -> Self {
        // Clock instants to wall time, by their distance from now.
        let at = |ns: i128| {
            let now_ns = now.as_nanos() as i128;
            let t = if ns >= now_ns {
                wall + Duration::from_nanos((ns - now_ns) as u64)
            } else {
                wall - Duration::from_nanos((now_ns - ns) as u64)
            };
            rfc3339(t)
        };
        ProgressView {
            version: name.to_owned(),
            state: p.run.state().as_str(),
            step: p.run.step(),
            steps: p.spec.steps.clone(),
            // A rolled-back version takes nothing, whatever its step.
            weight_percent: match p.run.state() {
                crate::progress::State::RolledBack => 0,
                _ => p.run.percent(&p.spec),
            },
            step_started_at: p.run.step_started().map(|d| at(d.as_nanos() as i128)),
            next_step_at: p.run.next_step_at(&p.spec).map(at),
            judged: p.run.judged_in_step(),
            min_requests: p.spec.min_requests,
            reason: p.run.reason().to_owned(),
        }
    }
}

/// `[sticky]`.
#[derive(Debug, Serialize)]
pub(crate) struct StickyView {
    /// `header`, `cookie` or `client_address`.
    pub(crate) key: &'static str,
    /// The header's or cookie's name; `null` for `client_address`.
    pub(crate) name: Option<String>,
    pub(crate) set_cookie: bool,
    /// The Max-Age of the cookie it sets; `null` without `set_cookie`.
    pub(crate) max_age_seconds: Option<u64>,
}

/// `[override]`.
#[derive(Debug, Serialize)]
pub(crate) struct OverrideView {
    pub(crate) header: String,
    pub(crate) forward_header: bool,
    /// Networks allowed to use it; empty: any client.
    pub(crate) allow_from: Vec<String>,
}

/// `[mirror]`.
#[derive(Debug, Serialize)]
pub(crate) struct MirrorView {
    pub(crate) version: String,
    pub(crate) share: f64,
    pub(crate) methods: Vec<String>,
    pub(crate) max_body: u64,
    pub(crate) timeout_seconds: f64,
    pub(crate) max_in_flight: u64,
    /// False while the mirror version is rolled back: no copies are sent.
    pub(crate) active: bool,
}

/// The active routes file.
#[derive(Debug, Serialize)]
pub(crate) struct RoutesView {
    /// Content hash, as `canary-proxy check` prints it.
    pub(crate) hash: String,
    pub(crate) loaded_at: String,
    /// Bumped on every publish: reload or rollback.
    pub(crate) generation: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct VersionView {
    pub(crate) name: String,
    pub(crate) upstream: String,
    /// How the proxy speaks to it: "http1" or "h2c".
    pub(crate) protocol: &'static str,
    /// Where its requests go: one endpoint (the upstream as written)
    /// without discovery, one per address with `discovery = "dns"`.
    pub(crate) endpoints: Vec<EndpointView>,
    /// DNS discovery's last lookups; `null` without discovery.
    pub(crate) discovery: Option<DiscoveryView>,
    /// As configured, and its share of the configured total (0..1).
    pub(crate) weight: u64,
    pub(crate) share: f64,
    /// After rollback decisions, and its share of the effective total.
    pub(crate) effective_weight: u64,
    pub(crate) effective_share: f64,
    /// Counts over the rollback window (30 s without a policy).
    pub(crate) window: WindowView,
    pub(crate) rolled_back: bool,
    pub(crate) rollback: Option<RollbackView>,
    pub(crate) judgment: JudgmentView,
}

#[derive(Debug, Serialize)]
pub(crate) struct EndpointView {
    /// IP and port; for an upstream written as a name (no discovery),
    /// the name as written.
    pub(crate) address: String,
    /// `healthy`, or `ejected` after failing several times in a row.
    pub(crate) state: &'static str,
    pub(crate) in_flight: usize,
}

#[derive(Debug, Serialize)]
pub(crate) struct DiscoveryView {
    pub(crate) last_success: Option<String>,
    /// The last failed lookup; the last good endpoints stay in use.
    pub(crate) last_error: Option<ReloadErrorView>,
}

#[derive(Debug, Serialize)]
pub(crate) struct WindowView {
    /// Answers judged on errors, and the errors among them.
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) error_ratio: f64,
    /// Answers timed against `slower_than` (0 without a latency
    /// objective), and the slow ones among them.
    pub(crate) timed: u64,
    pub(crate) slow: u64,
    pub(crate) slow_ratio: f64,
}

/// A latched rollback.
#[derive(Debug, Serialize)]
pub(crate) struct RollbackView {
    pub(crate) at: String,
    /// The criterion that tripped: `errors` or `latency`.
    pub(crate) criterion: &'static str,
    /// One line, as the log says it.
    pub(crate) reason: String,
    /// The criterion's ratio over the window when it tripped.
    pub(crate) ratio: f64,
    /// For `errors`: the errors in the window; for `latency`: the slow answers.
    pub(crate) errors: u64,
    /// The answers judged on the criterion in the window.
    pub(crate) requests: u64,
    /// The answers judged on the criterion since the judgment started.
    pub(crate) judged: u64,
    /// The criterion's line: `error_rate` or `slow_rate`.
    pub(crate) threshold: f64,
    pub(crate) target: String,
}

/// The judgment of a version: the decision, and the evidence per criterion.
#[derive(Debug, Serialize)]
pub(crate) struct JudgmentView {
    /// `not_judged` (the target, or rollback off), `watching`, `held` (a
    /// crossing waits because the target fails at least as much), or
    /// `rolled_back`.
    pub(crate) decision: &'static str,
    /// `null` for a criterion this version is not judged on.
    pub(crate) errors: Option<CriterionView>,
    pub(crate) latency: Option<CriterionView>,
}

#[derive(Debug, Serialize)]
pub(crate) struct CriterionView {
    /// The line the true rate must not cross.
    pub(crate) threshold: f64,
    /// How close the evidence is to the trip point: 0 to 1.
    pub(crate) evidence: f64,
    /// Answers judged on this criterion since the judgment started.
    pub(crate) judged: u64,
    /// A crossing on this criterion was held within the last window.
    pub(crate) held: bool,
}

/// The `[rollback]` policy in force.
#[derive(Debug, Serialize)]
pub(crate) struct PolicyView {
    pub(crate) target: String,
    pub(crate) error_rate: f64,
    pub(crate) min_requests: u64,
    pub(crate) window_seconds: f64,
    pub(crate) error_codes: String,
    pub(crate) trip_odds: f64,
    pub(crate) compare_target: bool,
    /// `null` without a latency objective.
    pub(crate) slower_than_seconds: Option<f64>,
    pub(crate) slow_rate: Option<f64>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReloadView {
    pub(crate) successes: u64,
    pub(crate) failures: u64,
    pub(crate) last_success: Option<String>,
    pub(crate) last_error: Option<ReloadErrorView>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ReloadErrorView {
    pub(crate) at: String,
    pub(crate) message: String,
}

impl Status {
    /// The view of `snap` at monotonic time `now`.
    pub(crate) fn new(
        snap: &Snapshot,
        reload: &ReloadStatus,
        now: Duration,
        progress: Option<ProgressView>,
    ) -> Status {
        let versions = snap
            .versions
            .iter()
            .zip(snap.table.versions.iter())
            .map(|(rt, spec)| {
                let totals = rt.judgment.totals(now);
                let (share, effective_share) = snap.shares(rt.index);
                VersionView {
                    name: spec.name.clone(),
                    upstream: spec.upstream.to_string(),
                    protocol: spec.protocol.as_str(),
                    endpoints: rt
                        .endpoints
                        .list()
                        .iter()
                        .map(|ep| EndpointView {
                            address: if rt.endpoints.discovery {
                                ep.addr.to_string()
                            } else {
                                ep.authority.to_string()
                            },
                            state: if rt.endpoints.is_ejected(ep) {
                                "ejected"
                            } else {
                                "healthy"
                            },
                            in_flight: ep.in_flight(),
                        })
                        .collect(),
                    discovery: rt.endpoints.discovery.then(|| {
                        let r = rt.endpoints.refresh_state();
                        DiscoveryView {
                            last_success: r.last_success.map(rfc3339),
                            last_error: r.last_error.map(|(at, message)| ReloadErrorView {
                                at: rfc3339(at),
                                message,
                            }),
                        }
                    }),
                    weight: spec.weight,
                    share,
                    effective_weight: snap.effective[rt.index],
                    effective_share,
                    window: WindowView::new(totals),
                    rolled_back: rt.rollback.is_some(),
                    rollback: rt.rollback.as_deref().map(RollbackView::new),
                    judgment: JudgmentView::new(rt, snap.policy(), now),
                }
            })
            .collect();
        let rollback = snap.policy().map(|r| PolicyView {
            target: snap.table.versions[r.target].name.clone(),
            error_rate: r.error_rate,
            min_requests: r.min_requests,
            window_seconds: r.window.as_secs_f64(),
            error_codes: r.error_codes.to_string(),
            trip_odds: r.trip_odds,
            compare_target: r.compare_target,
            slower_than_seconds: r.latency.as_ref().map(|l| l.slower_than.as_secs_f64()),
            slow_rate: r.latency.as_ref().map(|l| l.slow_rate),
        });
        Status {
            uptime_seconds: now.as_secs_f64(),
            routes: RoutesView {
                hash: snap.table.hash.clone(),
                loaded_at: rfc3339(snap.loaded_at),
                generation: snap.generation,
            },
            versions,
            rollback,
            sticky: snap.table.sticky.as_ref().map(|s| {
                let (key, name) = match &s.key {
                    StickyKey::Header(h) => ("header", Some(h.to_string())),
                    StickyKey::Cookie(c) => ("cookie", Some(c.clone())),
                    StickyKey::ClientAddress => ("client_address", None),
                };
                StickyView {
                    key,
                    name,
                    set_cookie: s.set_cookie.is_some(),
                    max_age_seconds: s.set_cookie.map(|d| d.as_secs()),
                }
            }),
            override_: snap.table.override_.as_ref().map(|o| OverrideView {
                header: o.header.to_string(),
                forward_header: o.forward_header,
                allow_from: o.allow_from.iter().map(|n| n.to_string()).collect(),
            }),
            mirror: snap.table.mirror.as_ref().map(|m| MirrorView {
                version: snap.table.versions[m.version].name.clone(),
                share: m.share,
                methods: m.methods.iter().map(|x| x.to_string()).collect(),
                max_body: m.max_body,
                timeout_seconds: m.timeout.as_secs_f64(),
                max_in_flight: m.max_in_flight,
                active: snap.versions[m.version].rollback.is_none(),
            }),
            progress,
            reload: ReloadView {
                successes: reload.successes,
                failures: reload.failures,
                last_success: reload.last_success.map(rfc3339),
                last_error: reload.last_error.as_ref().map(|(at, msg)| ReloadErrorView {
                    at: rfc3339(*at),
                    message: msg.clone(),
                }),
            },
        }
    }
}

impl WindowView {
    fn new(t: Totals) -> Self {
        WindowView {
            requests: t.requests,
            errors: t.errors,
            error_ratio: t.ratio(),
            timed: t.timed,
            slow: t.slow,
            slow_ratio: t.slow_ratio(),
        }
    }
}

impl RollbackView {
    fn new(r: &RollbackRecord) -> Self {
        let c: Counts = r.counts;
        RollbackView {
            at: rfc3339(r.at),
            criterion: r.criterion.as_str(),
            reason: r.reason(),
            ratio: c.ratio(),
            errors: c.hits,
            requests: c.samples,
            judged: r.judged,
            threshold: r.threshold,
            target: r.target.clone(),
        }
    }
}

impl JudgmentView {
    pub(crate) fn new(v: &VersionRuntime, policy: Option<&RollbackPolicy>, now: Duration) -> Self {
        let j: &Judgment = &v.judgment;
        let window = policy.map_or(Duration::ZERO, |p| p.window);
        let criterion = |c: Criterion| {
            let line = match c {
                Criterion::Errors => policy?.error_rate,
                Criterion::Latency => policy?.latency.as_ref()?.slow_rate,
            };
            Some(CriterionView {
                threshold: line,
                evidence: j.evidence(c)?,
                judged: j.judged(c)?,
                held: j.held(c, now, window),
            })
        };
        let (errors, latency) = (criterion(Criterion::Errors), criterion(Criterion::Latency));
        let held = [&errors, &latency]
            .iter()
            .any(|c| c.as_ref().is_some_and(|c| c.held));
        let decision = if v.rollback.is_some() {
            "rolled_back"
        } else if !j.is_judged() {
            "not_judged"
        } else if held {
            "held"
        } else {
            "watching"
        };
        JudgmentView {
            decision,
            errors,
            latency,
        }
    }

    /// Whether the version's decision is held right now.
    pub(crate) fn is_held(&self) -> bool {
        self.decision == "held"
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
