//! A rate limit on the request path's per-request log lines, so that a dead
//! upstream at 10 000 requests a second does not write 10 000 lines a second.
//!
//! The rule: in each one-second window, at most [`LINES_PER_SECOND`] lines
//! of one kind for one version are logged; the rest of that window's lines
//! of the kind are counted instead. The first line of the kind logged in a
//! later window is preceded by one summary line, `log lines suppressed by
//! the rate limit`, with the count (`suppressed=N`), the version and the
//! kind (`lines=...`). So every line held back is reported exactly once,
//! one window late at the earliest, and no background task is needed; the
//! price is that the count of the last busy window waits for the next line
//! of its kind. The metrics are counted separately and stay exact.
//!
//! The kinds ([`LogKind`]) are the line's cause: each kind of upstream
//! failure, a retry, a body broken mid-stream, a failed upgrade, each kind
//! of client fault, each reason to refuse a request (those have no
//! version).
//!
//! The limit is one per process ([`allow`]), like the log it protects: with
//! `--threads N` the event loops share it, so N threads do not mean N times
//! the lines. The hot path (a line that may be logged) is lock-free: one
//! read of the version list (an `ArcSwap`), then one compare-and-swap on
//! the kind's counter. A version seen for the first time is added by a
//! copy-on-write of that list; the list keeps at most [`MAX_VERSIONS`]
//! names (versions removed from the routes file keep their place), and any
//! further versions share one budget.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use arc_swap::ArcSwap;

use super::target::Refusal;
use crate::metrics::{ClientErrorKind, UpstreamErrorKind};

/// Lines of one kind for one version logged per one-second window.
pub(crate) const LINES_PER_SECOND: u32 = 10;

/// Version names with a budget of their own; beyond this, one shared one.
pub(crate) const MAX_VERSIONS: usize = 64;

/// What a rate-limited line is about; each has its own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogKind {
    /// The upstream failed before answering (the 502/504 lines).
    Upstream(UpstreamErrorKind),
    /// A request retried on the rollback target.
    Retry,
    /// The upstream's response body broke off.
    MidBody,
    /// A WebSocket upgrade that could not be joined.
    Upgrade,
    /// A request that failed because of its client.
    Client(ClientErrorKind),
    /// A request the proxy refused to forward (no version).
    Refused(Refusal),
    /// No version to send a request to (no version).
    NoVersion,
}

const KINDS: usize = 17;

impl LogKind {
    /// The kind's counter. Written out variant by variant, so a kind added
    /// to the metrics' vocabulary fails to compile here instead of sharing
    /// another kind's budget.
    fn index(self) -> usize {
        match self {
            LogKind::Upstream(UpstreamErrorKind::Connect) => 0,
            LogKind::Upstream(UpstreamErrorKind::Timeout) => 1,
            LogKind::Upstream(UpstreamErrorKind::Reset) => 2,
            LogKind::Retry => 3,
            LogKind::MidBody => 4,
            LogKind::Upgrade => 5,
            LogKind::Client(ClientErrorKind::Malformed) => 6,
            LogKind::Client(ClientErrorKind::Aborted) => 7,
            LogKind::Client(ClientErrorKind::Timeout) => 8,
            LogKind::Client(ClientErrorKind::Cancelled) => 9,
            LogKind::Refused(Refusal::Connect) => 10,
            LogKind::Refused(Refusal::MissingHost) => 11,
            LogKind::Refused(Refusal::DuplicateHost) => 12,
            LogKind::Refused(Refusal::InvalidHost) => 13,
            LogKind::Refused(Refusal::InvalidTarget) => 14,
            LogKind::Refused(Refusal::HostMismatch) => 15,
            LogKind::NoVersion => 16,
        }
    }

    /// The `lines` field of the summary.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LogKind::Upstream(UpstreamErrorKind::Connect) => "upstream_connect",
            LogKind::Upstream(UpstreamErrorKind::Timeout) => "upstream_timeout",
            LogKind::Upstream(UpstreamErrorKind::Reset) => "upstream_reset",
            LogKind::Retry => "retry",
            LogKind::MidBody => "mid_body",
            LogKind::Upgrade => "upgrade",
            LogKind::Client(ClientErrorKind::Malformed) => "client_malformed",
            LogKind::Client(ClientErrorKind::Aborted) => "client_aborted",
            LogKind::Client(ClientErrorKind::Timeout) => "client_timeout",
            LogKind::Client(ClientErrorKind::Cancelled) => "client_cancelled",
            LogKind::Refused(r) => r.as_str(),
            LogKind::NoVersion => "no_version",
        }
    }

    /// The version's faults are warnings; the client's are information.
    fn warns(self) -> bool {
        !matches!(self, LogKind::Client(_) | LogKind::Refused(_))
    }
}

/// Whether a line of `kind` about `version` may be logged now. Logs the
/// summary of the lines held back since the last one first, if any.
pub(crate) fn allow(version: Option<&str>, kind: LogKind) -> bool {
    static LIMIT: LazyLock<LogLimit> = LazyLock::new(LogLimit::new);
    let second = LIMIT.start.elapsed().as_secs();
    let admitted = LIMIT.admit(version, kind, second);
    if admitted.suppressed > 0 {
        let (version, lines, suppressed) =
            (version.unwrap_or(""), kind.as_str(), admitted.suppressed);
        let per_second = LINES_PER_SECOND;
        if kind.warns() {
            tracing::warn!(version = %version, lines, suppressed, per_second, "log lines suppressed by the rate limit");
        } else {
            tracing::info!(version = %version, lines, suppressed, per_second, "log lines suppressed by the rate limit");
        }
    }
    admitted.log
}

/// The budgets: one set of counters per version, one for requests with no
/// version, one shared by the versions past [`MAX_VERSIONS`].
struct LogLimit {
    start: Instant,
    versions: ArcSwap<Vec<(Arc<str>, Arc<Counters>)>>,
    unversioned: Counters,
    overflow: Counters,
}

/// One counter per kind: the window (a second since `start`) in the high
/// 32 bits, the lines of the kind seen in it in the low 32 bits.
struct Counters([AtomicU64; KINDS]);

impl Counters {
    fn new() -> Self {
        Counters(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Admitted {
    log: bool,
    /// Lines held back in the window this one closed.
    suppressed: u64,
}

impl LogLimit {
    fn new() -> Self {
        LogLimit {
            start: Instant::now(),
            versions: ArcSwap::from_pointee(Vec::new()),
            unversioned: Counters::new(),
            overflow: Counters::new(),
        }
    }

    /// One line of `kind` for `version` in window `second`.
    fn admit(&self, version: Option<&str>, kind: LogKind, second: u64) -> Admitted {
        let i = kind.index();
        let Some(name) = version else {
            return admit(&self.unversioned.0[i], second);
        };
        {
            let versions = self.versions.load();
            if let Some((_, counters)) = versions.iter().find(|(n, _)| **n == *name) {
                return admit(&counters.0[i], second);
            }
            if versions.len() >= MAX_VERSIONS {
                return admit(&self.overflow.0[i], second);
            }
        }
        // First line about this version: add it. `rcu` retries on a race,
        // and the check inside keeps a name from being added twice.
        self.versions.rcu(|versions| {
            if versions.len() >= MAX_VERSIONS || versions.iter().any(|(n, _)| **n == *name) {
                return Arc::clone(versions);
            }
            let mut next = Vec::clone(versions);
            next.push((Arc::from(name), Arc::new(Counters::new())));
            Arc::new(next)
        });
        // Once more, now that the name is in (or the list is full): this
        // recursion ends at the lookup above.
        self.admit(version, kind, second)
    }
}

/// Count one line against `counter` in window `second`.
fn admit(counter: &AtomicU64, second: u64) -> Admitted {
    // 2^32 seconds is 136 years of uptime.
    let now = second as u32;
    let mut out = Admitted {
        log: false,
        suppressed: 0,
    };
    // `fetch_update` retries the closure until its compare-and-swap wins,
    // so `out` is what the winning attempt saw.
    let _ = counter.fetch_update(Relaxed, Relaxed, |packed| {
        let (window, seen) = ((packed >> 32) as u32, packed as u32);
        // A thread that read the clock just before another one opened the
        // next window counts in that window rather than going back.
        if window >= now {
            out = Admitted {
                log: seen < LINES_PER_SECOND,
                suppressed: 0,
            };
            Some(((window as u64) << 32) | seen.saturating_add(1) as u64)
        } else {
            out = Admitted {
                log: true,
                suppressed: seen.saturating_sub(LINES_PER_SECOND) as u64,
            };
            Some(((now as u64) << 32) | 1)
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECT: LogKind = LogKind::Upstream(UpstreamErrorKind::Connect);

    fn logged(limit: &LogLimit, version: &str, kind: LogKind, second: u64, n: u32) -> (u32, u64) {
        let (mut lines, mut suppressed) = (0, 0);
        for _ in 0..n {
            let a = limit.admit(Some(version), kind, second);
            lines += a.log as u32;
            suppressed += a.suppressed;
        }
        (lines, suppressed)
    }

    #[test]
    fn a_window_logs_its_budget_and_the_next_line_reports_the_rest() {
        let limit = LogLimit::new();
        assert_eq!(
            logged(&limit, "canary", CONNECT, 0, 1000),
            (LINES_PER_SECOND, 0)
        );
        // The next window's first line carries the count, once.
        assert_eq!(
            limit.admit(Some("canary"), CONNECT, 1),
            Admitted {
                log: true,
                suppressed: 1000 - LINES_PER_SECOND as u64
            }
        );
        assert_eq!(logged(&limit, "canary", CONNECT, 1, 5), (5, 0));
        // A quiet window in between changes nothing: nothing was held back.
        assert_eq!(limit.admit(Some("canary"), CONNECT, 7).suppressed, 0);
    }

    #[test]
    fn versions_and_kinds_have_budgets_of_their_own() {
        let limit = LogLimit::new();
        logged(&limit, "canary", CONNECT, 3, 100);
        assert_eq!(
            logged(&limit, "stable", CONNECT, 3, 100).0,
            LINES_PER_SECOND
        );
        assert_eq!(
            logged(&limit, "canary", LogKind::Retry, 3, 100).0,
            LINES_PER_SECOND
        );
        assert_eq!(
            limit.admit(None, LogKind::Refused(Refusal::MissingHost), 3),
            Admitted {
                log: true,
                suppressed: 0
            }
        );
    }

    #[test]
    fn versions_past_the_cap_share_one_budget() {
        let limit = LogLimit::new();
        for v in 0..MAX_VERSIONS {
            assert!(limit.admit(Some(&format!("v{v}")), CONNECT, 0).log);
        }
        assert_eq!(limit.versions.load().len(), MAX_VERSIONS);
        let (a, _) = logged(&limit, "extra-a", CONNECT, 0, 6);
        let (b, _) = logged(&limit, "extra-b", CONNECT, 0, 6);
        assert_eq!(a + b, LINES_PER_SECOND, "one budget for both");
        assert_eq!(limit.versions.load().len(), MAX_VERSIONS);
    }

    #[test]
    fn every_line_is_logged_or_reported_exactly_once_under_contention() {
        let limit = Arc::new(LogLimit::new());
        // 4 threads x 3 windows x 500 lines, then one closing line.
        let per_window = 500u32;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let limit = limit.clone();
                std::thread::spawn(move || {
                    let mut seen = (0u64, 0u64);
                    for second in 0..3 {
                        for _ in 0..per_window {
                            let a = limit.admit(Some("canary"), CONNECT, second);
                            seen.0 += a.log as u64;
                            seen.1 += a.suppressed;
                        }
                    }
                    seen
                })
            })
            .collect();
        let (mut lines, mut suppressed) = (0, 0);
        for t in threads {
            let (l, s) = t.join().unwrap();
            lines += l;
            suppressed += s;
        }
        let last = limit.admit(Some("canary"), CONNECT, 3);
        lines += last.log as u64;
        suppressed += last.suppressed;
        assert_eq!(lines + suppressed, 4 * 3 * per_window as u64 + 1);
        assert!(lines <= 4 * LINES_PER_SECOND as u64, "{lines} lines logged");
    }
}
