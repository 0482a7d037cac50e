//! The terminal view of a `/status` document: a pure function of the parsed
//! JSON, so it is tested without a proxy.
//!
//! Fields are read by name from a `serde_json::Value`, not through the
//! proxy's own types: the proxy at the other end may be an older or newer
//! release than this binary. Unknown fields are ignored; a missing one is
//! shown as `-`.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

/// What a document says about the release, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// No version is rolled back (the release is going well, or complete).
    Healthy,
    /// A version is rolled back, or the progress schedule says so.
    RolledBack,
}

pub(crate) fn health(doc: &Value) -> Health {
    let versions = doc["versions"].as_array().map_or(&[][..], Vec::as_slice);
    let rolled_back = versions.iter().any(|v| v["rolled_back"] == true)
        || doc["progress"]["state"] == "rolled_back";
    if rolled_back {
        Health::RolledBack
    } else {
        Health::Healthy
    }
}

/// The whole view: a header (routes, reload, policy, progress), then one
/// block per version in the file's order.
pub(crate) fn render(doc: &Value) -> String {
    let mut out = String::new();
    let routes = &doc["routes"];
    let uptime = doc["uptime_seconds"].as_f64().map_or_else(dash, |s| {
        // Whole seconds: the view is redrawn every few seconds at most.
        humantime::format_duration(Duration::from_secs(s as u64)).to_string()
    });
    field(
        &mut out,
        "routes",
        format!(
            "hash {}  generation {}  loaded {}  uptime {uptime}",
            text(&routes["hash"]),
            text(&routes["generation"]),
            text(&routes["loaded_at"]),
        ),
    );
    field(&mut out, "reload", reload(&doc["reload"]));
    field(&mut out, "rollback", policy(&doc["rollback"]));
    field(&mut out, "progress", progress(&doc["progress"]));
    // Slow answers are only counted against a latency objective.
    let timed = !doc["rollback"]["slower_than_seconds"].is_null();
    for v in doc["versions"].as_array().into_iter().flatten() {
        out.push('\n');
        version(&mut out, v, timed);
    }
    out
}

fn version(out: &mut String, v: &Value, timed: bool) {
    let flag = if v["rolled_back"] == true {
        "  ROLLED BACK"
    } else {
        ""
    };
    let _ = writeln!(out, "{}  {}{flag}", text(&v["name"]), text(&v["upstream"]));
    let mut sub = |name: &str, value: String| {
        let _ = writeln!(out, "  {name:<9} {value}");
    };
    sub(
        "weight",
        format!(
            "{} ({})  effective {} ({})",
            text(&v["weight"]),
            percent(&v["share"]),
            text(&v["effective_weight"]),
            percent(&v["effective_share"]),
        ),
    );
    let w = &v["window"];
    let mut window = format!(
        "{} requests  {} errors ({})",
        text(&w["requests"]),
        text(&w["errors"]),
        percent(&w["error_ratio"]),
    );
    if timed {
        let _ = write!(
            window,
            "  {} timed  {} slow ({})",
            text(&w["timed"]),
            text(&w["slow"]),
            percent(&w["slow_ratio"]),
        );
    }
    sub("window", window);
    let j = &v["judgment"];
    let mut judgment = text(&j["decision"]);
    for criterion in ["errors", "latency"] {
        let c = &j[criterion];
        if c.is_null() {
            continue;
        }
        let _ = write!(
            judgment,
            "  {criterion}: evidence {} of the trip point, {} judged, line {}{}",
            percent(&c["evidence"]),
            text(&c["judged"]),
            percent(&c["threshold"]),
            if c["held"] == true { ", held" } else { "" },
        );
    }
    sub("judgment", judgment);
    let r = &v["rollback"];
    sub(
        "rollback",
        if r.is_null() {
            dash()
        } else {
            format!(
                "at {} on {}: {}; its traffic goes to {}",
                text(&r["at"]),
                text(&r["criterion"]),
                text(&r["reason"]),
                text(&r["target"]),
            )
        },
    );
}

fn reload(r: &Value) -> String {
    let counts = format!(
        "reloads {} ok, {} failed",
        text(&r["successes"]),
        text(&r["failures"])
    );
    let e = &r["last_error"];
    if e.is_null() {
        format!("ok at {}  {counts}", text(&r["last_success"]))
    } else {
        format!(
            "FAILED at {}: {}; the last good routes stay in force  {counts}",
            text(&e["at"]),
            text(&e["message"]),
        )
    }
}

fn policy(p: &Value) -> String {
    if p.is_null() {
        return "off (no [rollback] table)".to_owned();
    }
    let mut line = format!(
        "to {} above {} errors ({})  min {} answers  window {}",
        text(&p["target"]),
        percent(&p["error_rate"]),
        text(&p["error_codes"]),
        text(&p["min_requests"]),
        seconds(&p["window_seconds"]),
    );
    if !p["slower_than_seconds"].is_null() {
        let _ = write!(
            line,
            "  or above {} slower than {}",
            percent(&p["slow_rate"]),
            seconds(&p["slower_than_seconds"]),
        );
    }
    line
}

/// `canary  step 3/6 (10%)  waiting_for_evidence  next step 10:10:00Z
/// evidence 57/100 judged  — reason`; `-` without a schedule (`null`, or a
/// proxy that predates the field).
fn progress(p: &Value) -> String {
    if p.is_null() {
        return dash();
    }
    let steps = p["steps"]
        .as_array()
        .map_or_else(dash, |s| s.len().to_string());
    let weight = match &p["weight_percent"] {
        Value::Null => dash(),
        w => format!("{}%", text(w)),
    };
    // The time of day is enough: a step lasts minutes, not days.
    let next = match p["next_step_at"].as_str() {
        Some(t) => t.split_once('T').map_or(t, |(_, time)| time).to_owned(),
        None => dash(),
    };
    format!(
        "{}  step {}/{steps} ({weight})  {}  next step {next}  evidence {}/{} judged  — {}",
        text(&p["version"]),
        text(&p["step"]),
        text(&p["state"]),
        text(&p["judged"]),
        text(&p["min_requests"]),
        text(&p["reason"]),
    )
}

/// A header line: the name in a column of its own.
fn field(out: &mut String, name: &str, value: String) {
    let _ = writeln!(out, "{name:<9} {value}");
}

/// A scalar as the view shows it: strings without quotes, `-` for missing.
fn text(v: &Value) -> String {
    match v {
        Value::Null => dash(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A fraction (0.05) as a percentage (5%), one decimal only where it shows.
fn percent(v: &Value) -> String {
    let Some(f) = v.as_f64() else {
        return dash();
    };
    let p = f * 100.0;
    if (p - p.round()).abs() < 0.05 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

/// Seconds as `60s` or `0.25s` (JSON writes 60 seconds as `60.0`).
fn seconds(v: &Value) -> String {
    v.as_f64().map_or_else(dash, |s| format!("{s}s"))
}

fn dash() -> String {
    "-".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A document as a proxy with a `[progress]` table would serve it (the
    /// field is newer than the proxy this is tested against), with a field
    /// this view does not know and one it knows left out.
    fn progressing() -> Value {
        json!({
            "uptime_seconds": 125.7,
            "routes": {"hash": "3f1c2a9b8d7e6f50", "loaded_at": "2026-12-01T10:00:00.000Z", "generation": 4},
            "versions": [
                {
                    "name": "stable", "upstream": "http://ping-stable:8080",
                    "weight": 90, "share": 0.9, "effective_weight": 90, "effective_share": 0.9,
                    "window": {"requests": 612, "errors": 1, "error_ratio": 0.0016339869281045752,
                               "timed": 612, "slow": 0, "slow_ratio": 0.0},
                    "rolled_back": false, "rollback": null,
                    "judgment": {"decision": "not_judged",
                                 "errors": {"threshold": 0.05, "evidence": 0.0, "judged": 612, "held": false},
                                 "latency": null},
                    "a_field_from_the_future": [1, 2, 3]
                },
                {
                    "name": "canary", "upstream": "http://ping-canary:8080",
                    "weight": 10, "share": 0.1, "effective_weight": 10, "effective_share": 0.1,
                    "window": {"requests": 57, "errors": 2, "error_ratio": 0.03508771929824561,
                               "timed": 57, "slow": 3},
                    "rolled_back": false, "rollback": null,
                    "judgment": {"decision": "watching",
                                 "errors": {"threshold": 0.05, "evidence": 0.25, "judged": 57, "held": false},
                                 "latency": {"threshold": 0.1, "evidence": 0.125, "judged": 57, "held": true}}
                }
            ],
            "rollback": {"target": "stable", "error_rate": 0.05, "min_requests": 100, "window_seconds": 60.0,
                         "error_codes": "5xx", "trip_odds": 1000.0, "compare_target": true,
                         "slower_than_seconds": 0.25, "slow_rate": 0.1},
            "reload": {"successes": 3, "failures": 0, "last_success": "2026-12-01T10:00:00.000Z", "last_error": null},
            "progress": {
                "version": "canary", "state": "waiting_for_evidence", "step": 3,
                "steps": [1, 5, 10, 25, 50, 100], "weight_percent": 10,
                "step_started_at": "2026-12-01T10:05:00Z", "next_step_at": "2026-12-01T10:10:00Z",
                "judged": 57, "min_requests": 100,
                "reason": "waiting for evidence: 57 of 100 answers judged in this step"
            }
        })
    }

    fn line<'a>(view: &'a str, start: &str) -> &'a str {
        view.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?} in:\n{view}"))
    }

    #[test]
    fn the_progress_line_shows_the_step_its_weight_and_why() {
        let view = render(&progressing());
        assert_eq!(
            line(&view, "progress"),
            "progress  canary  step 3/6 (10%)  waiting_for_evidence  next step 10:10:00Z  \
             evidence 57/100 judged  — waiting for evidence: 57 of 100 answers judged in this step"
        );
        assert_eq!(health(&progressing()), Health::Healthy);
    }

    #[test]
    fn progress_before_the_start_and_without_a_schedule() {
        let mut doc = progressing();
        doc["progress"] = json!({
            "version": "canary", "state": "progressing", "step": 0, "steps": [5, 100],
            "weight_percent": 0, "step_started_at": null, "next_step_at": null,
            "judged": 0, "min_requests": 100, "reason": "starts at 10:00"
        });
        assert!(line(&render(&doc), "progress").starts_with(
            "progress  canary  step 0/2 (0%)  progressing  next step -  evidence 0/100 judged"
        ));
        doc["progress"] = Value::Null;
        assert_eq!(line(&render(&doc), "progress"), "progress  -");
        doc.as_object_mut().unwrap().remove("progress");
        assert_eq!(line(&render(&doc), "progress"), "progress  -");
    }

    #[test]
    fn versions_show_weights_counts_and_evidence() {
        let view = render(&progressing());
        assert!(view.contains("stable  http://ping-stable:8080\n"), "{view}");
        assert!(view.contains("  weight    10 (10%)  effective 10 (10%)\n"));
        // The missing slow_ratio is a dash; 2/57 is shown to one decimal.
        assert!(view.contains("  window    57 requests  2 errors (3.5%)  57 timed  3 slow (-)\n"));
        assert!(view.contains(
            "  judgment  watching  errors: evidence 25% of the trip point, 57 judged, line 5%  \
             latency: evidence 12.5% of the trip point, 57 judged, line 10%, held\n"
        ));
        assert_eq!(
            line(&view, "routes"),
            "routes    hash 3f1c2a9b8d7e6f50  generation 4  loaded 2026-12-01T10:00:00.000Z  uptime 2m 5s"
        );
        assert_eq!(
            line(&view, "rollback"),
            "rollback  to stable above 5% errors (5xx)  min 100 answers  window 60s  or above 10% slower than 0.25s"
        );
        assert!(!view.contains("a_field_from_the_future"));
    }

    #[test]
    fn a_rollback_says_when_why_and_where_the_traffic_went() {
        let mut doc = progressing();
        doc["versions"][1]["rolled_back"] = json!(true);
        doc["versions"][1]["rollback"] = json!({
            "at": "2026-12-01T10:07:00.000Z", "criterion": "errors",
            "reason": "error ratio 0.3 above threshold 0.05", "target": "stable"
        });
        doc["progress"]["state"] = json!("rolled_back");
        let view = render(&doc);
        assert!(
            view.contains("canary  http://ping-canary:8080  ROLLED BACK\n"),
            "{view}"
        );
        assert!(view.contains(
            "  rollback  at 2026-12-01T10:07:00.000Z on errors: error ratio 0.3 above threshold 0.05; \
             its traffic goes to stable\n"
        ));
        assert_eq!(health(&doc), Health::RolledBack);
        // Either signal alone is enough.
        doc["progress"] = Value::Null;
        assert_eq!(health(&doc), Health::RolledBack);
    }

    #[test]
    fn a_failed_reload_and_a_missing_policy_are_shown() {
        let mut doc = progressing();
        doc["reload"]["last_error"] = json!({"at": "2026-12-01T10:06:00.000Z", "message": "routes.toml: unknown key `wieght`"});
        doc["rollback"] = Value::Null;
        let view = render(&doc);
        assert!(line(&view, "reload")
            .contains("FAILED at 2026-12-01T10:06:00.000Z: routes.toml: unknown key `wieght`"));
        assert_eq!(
            line(&view, "rollback"),
            "rollback  off (no [rollback] table)"
        );
        // Without a latency objective, no timed/slow columns.
        assert!(!view.contains("timed"), "{view}");
    }

    #[test]
    fn a_nearly_empty_document_renders_dashes() {
        let view = render(&json!({"versions": [{"name": "v1"}]}));
        assert!(view.contains("v1  -\n"), "{view}");
        assert!(
            view.contains("  weight    - (-)  effective - (-)\n"),
            "{view}"
        );
        assert_eq!(health(&json!({"versions": []})), Health::Healthy);
    }
}
