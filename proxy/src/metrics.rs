//! Every Prometheus series the proxy exports, owned by one [`Metrics`] over
//! an explicit registry (no global macros, so tests can run many proxies in
//! one process).
//!
//! The hot path never looks a label up: each snapshot carries a
//! [`VersionMetrics`] with the handles of its version ready, and status-code
//! counters are created on first use and then cached in a lock-free slot.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::guard::Criterion;

/// Buckets from 0.5 ms to 10 s: a proxy hop on loopback is sub-millisecond,
/// a slow upstream is seconds, and the default buckets (5 ms first) would
/// hide the difference between a healthy and a degraded hop.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Why an upstream exchange failed; the `kind` label of
/// `canary_proxy_upstream_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UpstreamErrorKind {
    Connect,
    Timeout,
    Reset,
}

/// A request that failed because of its client; the `kind` label of
/// `canary_proxy_client_errors_total`. None of them is evidence against a
/// version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientErrorKind {
    /// The request body's framing is invalid (a bad chunk): 400.
    Malformed,
    /// The client closed the connection or reset the stream mid-body: 499.
    Aborted,
    /// The body was still arriving when the upstream deadline passed: 408.
    Timeout,
    /// The client gave up before the answer came: 499.
    Cancelled,
}

impl ClientErrorKind {
    const ALL: [ClientErrorKind; 4] = [
        ClientErrorKind::Malformed,
        ClientErrorKind::Aborted,
        ClientErrorKind::Timeout,
        ClientErrorKind::Cancelled,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ClientErrorKind::Malformed => "malformed",
            ClientErrorKind::Aborted => "aborted",
            ClientErrorKind::Timeout => "timeout",
            ClientErrorKind::Cancelled => "cancelled",
        }
    }

    /// The status the proxy answers (or, for a client that is gone, logs
    /// and counts: 499, as NGINX does).
    pub(crate) fn status(self) -> http::StatusCode {
        match self {
            ClientErrorKind::Malformed => http::StatusCode::BAD_REQUEST,
            ClientErrorKind::Timeout => http::StatusCode::REQUEST_TIMEOUT,
            ClientErrorKind::Aborted | ClientErrorKind::Cancelled => {
                http::StatusCode::from_u16(499).expect("499 is in the valid range")
            }
        }
    }

    pub(crate) fn describe(self) -> &'static str {
        match self {
            ClientErrorKind::Malformed => "the client's request body is malformed",
            ClientErrorKind::Aborted => "the client went away mid-body",
            ClientErrorKind::Timeout => {
                "the client's request body was still arriving at the upstream timeout"
            }
            ClientErrorKind::Cancelled => "the client gave up before the answer",
        }
    }
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 3] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    /// `canary_proxy_client_errors_total` by kind, in the order of
    /// `ClientErrorKind::ALL`.
    client_errors: [IntCounter; 4],
    grpc_requests: IntCounterVec,
    pub(crate) connections: IntGauge,
    pub(crate) connections_rejected: IntCounter,
    pub(crate) max_connections: IntGauge,
    rollback_evidence: GaugeVec,
    rollback_held: IntGaugeVec,
    rollback_tripped: IntGaugeVec,
    requests: IntCounterVec,
    duration: HistogramVec,
    upstream_errors: IntCounterVec,
    in_flight: IntGaugeVec,
    weight: GaugeVec,
    effective_weight: GaugeVec,
    error_ratio: GaugeVec,
    pub error_ratio_threshold: Gauge,
    config_reloads: IntCounterVec,
    pub config_last_success: Gauge,
    /// 1 while the routes file on disk is the one in force, 0 from a failed
    /// reload until the next good read (restoring the last good content
    /// included, which counts no reload: it changes nothing).
    pub(crate) config_last_reload_ok: IntGauge,
    config_info: IntGaugeVec,
    rollbacks: IntCounterVec,
    rollback_active: IntGaugeVec,
    rollback_resets: IntCounterVec,
    retries: IntCounterVec,
    endpoints: IntGaugeVec,
    endpoint_ejections: IntCounterVec,
    dns_refreshes: IntCounterVec,
    upstream_connections: IntCounterVec,
    tls_reloads: IntCounterVec,
    override_requests: IntCounterVec,
    progress_step: IntGaugeVec,
    progress_state: IntGaugeVec,
    mirror_requests: IntCounterVec,
    mirror_dropped: IntCounterVec,
    /// Copies being sent now, all versions: the count `[mirror]
    /// max_in_flight` bounds (see `forward::mirror`).
    pub(crate) mirror_in_flight: IntGauge,
    pub tls_cert_expiry: Gauge,
    /// As `config_last_reload_ok`, for the TLS certificate and key.
    pub(crate) tls_last_reload_ok: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Register `collector` in `registry` and hand it back: each metric is
/// written once, where it is built.
fn registered<C: Collector + Clone + 'static>(
    registry: &Registry,
    collector: prometheus::Result<C>,
) -> C {
    let collector = collector.expect("metric definitions are valid");
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique");
    collector
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let registry = Registry::new();
        let r = &registry;
        let v = &["version"];
        let client_errors = registered(r, IntCounterVec::new(opts("canary_proxy_client_errors_total", "Requests that failed because of the client (malformed, aborted, timeout, cancelled); never counted against a version."), &["kind"]));
        let m = Metrics {
            client_errors: ClientErrorKind::ALL
                .map(|k| client_errors.with_label_values(&[k.as_str()])),
            grpc_requests: registered(r, IntCounterVec::new(opts("canary_proxy_grpc_requests_total", "gRPC calls answered, by version and the grpc-status the client got (its name; 'other' for a value outside the 17 codes)."), &["version", "grpc_status"])),
            connections: registered(r, IntGauge::with_opts(opts("canary_proxy_connections", "Client connections open now (traffic and HTTPS listeners)."))),
            connections_rejected: registered(r, IntCounter::with_opts(opts("canary_proxy_connections_rejected_total", "Client connections closed at once because --max-connections were open."))),
            max_connections: registered(r, IntGauge::with_opts(opts("canary_proxy_max_connections", "The --max-connections limit in force (set, or derived from the memory and descriptor limits)."))),
            rollback_evidence: registered(r, GaugeVec::new(opts("canary_proxy_rollback_evidence", "How close the evidence that a version breaks its objective is to the trip point, 0..1, by version and criterion (errors, latency)."), &["version", "criterion"])),
            rollback_held: registered(r, IntGaugeVec::new(opts("canary_proxy_rollback_held", "1 while a rollback decision of the version is held because the target is failing at least as much."), v)),
            rollback_tripped: registered(r, IntGaugeVec::new(opts("canary_proxy_rollback_tripped", "1 while a latched rollback of the version was tripped by this criterion (errors, latency)."), &["version", "criterion"])),
            requests: registered(r, IntCounterVec::new(opts("canary_proxy_requests_total", "Requests answered, by version and the status code returned to the client (including 502/504 made by the proxy)."), &["version", "code"])),
            duration: registered(r, HistogramVec::new(HistogramOpts::new("canary_proxy_request_duration_seconds", "Time from receiving a request to the end of its response body, by version.").buckets(DURATION_BUCKETS.to_vec()), v)),
            upstream_errors: registered(r, IntCounterVec::new(opts("canary_proxy_upstream_errors_total", "Failed upstream exchanges, by version and kind (connect, timeout, reset); only the upstream's faults."), &["version", "kind"])),
            in_flight: registered(r, IntGaugeVec::new(opts("canary_proxy_in_flight_requests", "Requests being served, by version."), v)),
            weight: registered(r, GaugeVec::new(opts("canary_proxy_weight", "Configured traffic share of each version, 0..1."), v)),
            effective_weight: registered(r, GaugeVec::new(opts("canary_proxy_effective_weight", "Traffic share of each version after rollback decisions, 0..1."), v)),
            error_ratio: registered(r, GaugeVec::new(opts("canary_proxy_error_ratio", "Error ratio of each version over the rollback window (answers judged on errors only)."), v)),
            error_ratio_threshold: registered(r, Gauge::with_opts(opts("canary_proxy_error_ratio_threshold", "The configured rollback.error_rate (0 when rollback is off)."))),
            config_reloads: registered(r, IntCounterVec::new(opts("canary_proxy_config_reloads_total", "Routes reload attempts after start-up, by result (success, failure)."), &["result"])),
            config_last_success: registered(r, Gauge::with_opts(opts("canary_proxy_config_last_reload_success_timestamp_seconds", "Unix time of the last successful routes load."))),
            config_last_reload_ok: registered(r, IntGauge::with_opts(opts("canary_proxy_config_last_reload_successful", "1 if the last routes reload succeeded (the file in force is the one on disk), 0 if it failed (the last good routes are served)."))),
            config_info: registered(r, IntGaugeVec::new(opts("canary_proxy_config_info", "Always 1; the hash label is the content hash of the active routes file."), &["hash"])),
            rollbacks: registered(r, IntCounterVec::new(opts("canary_proxy_rollbacks_total", "Automatic rollbacks, by the version rolled back."), v)),
            rollback_active: registered(r, IntGaugeVec::new(opts("canary_proxy_rollback_active", "1 while a rollback of the version is latched."), v)),
            rollback_resets: registered(r, IntCounterVec::new(opts("canary_proxy_rollback_resets_total", "Latched rollbacks cleared because the operator changed the version's entry."), v)),
            retries: registered(r, IntCounterVec::new(opts("canary_proxy_retries_total", "Requests retried on the rollback target after a connect failure, by the version that failed."), v)),
            endpoints: registered(r, IntGaugeVec::new(opts("canary_proxy_endpoints", "A version's endpoints (one without discovery; a pod each with discovery = \"dns\"), by state: healthy or ejected."), &["version", "state"])),
            endpoint_ejections: registered(r, IntCounterVec::new(opts("canary_proxy_endpoint_ejections_total", "Endpoints ejected after failing several times in a row, by version."), v)),
            dns_refreshes: registered(r, IntCounterVec::new(opts("canary_proxy_dns_refreshes_total", "DNS lookups of a version's upstream for discovery, by result (success, failure)."), &["version", "result"])),
            upstream_connections: registered(r, IntCounterVec::new(opts("canary_proxy_upstream_connections_opened_total", "Connections opened to a version's upstream; it grows with the peak of concurrent requests, then only when the pool cannot reuse one."), v)),
            tls_reloads: registered(r, IntCounterVec::new(opts("canary_proxy_tls_reloads_total", "TLS certificate reload attempts, by result (success, failure)."), &["result"])),
            progress_step: registered(r, IntGaugeVec::new(opts("canary_proxy_progress_step", "The [progress] version's current step, 1-based (0 before the schedule's start)."), v)),
            progress_state: registered(r, IntGaugeVec::new(opts("canary_proxy_progress_state", "1 for the [progress] version's current state (progressing, waiting_for_evidence, paused, complete, rolled_back), 0 for the others."), &["version", "state"])),
            override_requests: registered(r, IntCounterVec::new(opts("canary_proxy_override_requests_total", "Requests routed by the [override] header, by the version that served them (the rollback target when the named version is rolled back)."), v)),
            mirror_requests: registered(r, IntCounterVec::new(opts("canary_proxy_mirror_requests_total", "Copies sent by [mirror] that ended, by version and code: the HTTP status of the copy's answer, or connect, reset or timeout when it got none. Not in canary_proxy_requests_total."), &["version", "code"])),
            mirror_dropped: registered(r, IntCounterVec::new(opts("canary_proxy_mirror_dropped_total", "Copies [mirror] chose but did not send, by version and reason: full (max_in_flight reached), body_too_large (above max_body), body_incomplete (the request body failed or was not read to its end)."), &["version", "reason"])),
            mirror_in_flight: registered(r, IntGauge::with_opts(opts("canary_proxy_mirror_in_flight", "Copies of [mirror] being buffered or sent now, all versions; [mirror] max_in_flight bounds it."))),
            tls_cert_expiry: registered(r, Gauge::with_opts(opts("canary_proxy_tls_cert_expiry_timestamp_seconds", "Unix time at which the served TLS certificate expires."))),
            tls_last_reload_ok: registered(r, IntGauge::with_opts(opts("canary_proxy_tls_last_reload_successful", "1 if the last TLS certificate reload succeeded (or TLS is off), 0 if it failed (the previous certificate is served)."))),
            registry,
        };
        m.registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");
        // Both results exist from the start, so rate() and absent() alerts
        // work before the first reload.
        m.config_reloads.with_label_values(&["success"]);
        m.config_reloads.with_label_values(&["failure"]);
        // Start-up loads both or exits, so nothing has failed yet.
        m.config_last_reload_ok.set(1);
        m.tls_last_reload_ok.set(1);
        Arc::new(m)
    }

    /// Handles for one version, created when the version first appears.
    pub fn version(&self, name: &str) -> VersionMetrics {
        VersionMetrics {
            name: name.to_owned(),
            requests: self.requests.clone(),
            codes: (0..CODE_SLOTS).map(|_| OnceLock::new()).collect(),
            duration: self.duration.with_label_values(&[name]),
            in_flight: self.in_flight.with_label_values(&[name]),
            upstream_errors: UpstreamErrorKind::ALL
                .map(|k| self.upstream_errors.with_label_values(&[name, k.as_str()])),
            retries: self.retries.with_label_values(&[name]),
            endpoint_ejections: self.endpoint_ejections.with_label_values(&[name]),
            dns_refreshes: ["success", "failure"]
                .map(|r| self.dns_refreshes.with_label_values(&[name, r])),
            upstream_connections: self.upstream_connections.with_label_values(&[name]),
            rollbacks: self.rollbacks.with_label_values(&[name]),
            rollback_resets: self.rollback_resets.with_label_values(&[name]),
            grpc_requests: self.grpc_requests.clone(),
            grpc: (0..GRPC_SLOTS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Drop every series of a version that left the routes file, so a
    /// removed version stops being exported instead of going stale.
    pub(crate) fn forget_version(&self, vm: &VersionMetrics) {
        let name = vm.name.as_str();
        for code in vm
            .codes
            .iter()
            .filter_map(|c| c.get().map(|(code, _)| *code))
        {
            let _ = self.requests.remove_label_values(&[name, code_label(code)]);
        }
        for (label, _) in vm.grpc.iter().filter_map(|c| c.get()) {
            let _ = self.grpc_requests.remove_label_values(&[name, label]);
        }
        for kind in UpstreamErrorKind::ALL {
            let _ = self
                .upstream_errors
                .remove_label_values(&[name, kind.as_str()]);
        }
        let _ = self.duration.remove_label_values(&[name]);
        let _ = self.in_flight.remove_label_values(&[name]);
        let _ = self.rollback_active.remove_label_values(&[name]);
        let _ = self.rollback_held.remove_label_values(&[name]);
        for criterion in Criterion::ALL {
            let _ = self
                .rollback_evidence
                .remove_label_values(&[name, criterion.as_str()]);
            let _ = self
                .rollback_tripped
                .remove_label_values(&[name, criterion.as_str()]);
        }
        for vec in [&self.weight, &self.effective_weight, &self.error_ratio] {
            let _ = vec.remove_label_values(&[name]);
        }
        for vec in [
            &self.rollbacks,
            &self.rollback_resets,
            &self.retries,
            &self.upstream_connections,
            &self.endpoint_ejections,
        ] {
            let _ = vec.remove_label_values(&[name]);
        }
        for label in ["success", "failure"] {
            let _ = self.dns_refreshes.remove_label_values(&[name, label]);
        }
        let _ = self.override_requests.remove_label_values(&[name]);
        for reason in MIRROR_DROP_REASONS {
            let _ = self.mirror_dropped.remove_label_values(&[name, reason]);
        }
        // The codes a copy ended with are not tracked per version: a
        // version leaves rarely, so try every label a copy can have.
        for code in (100..600).map(code_label).chain(MIRROR_FAILURES) {
            let _ = self.mirror_requests.remove_label_values(&[name, code]);
        }
        for state in ["healthy", "ejected"] {
            let _ = self.endpoints.remove_label_values(&[name, state]);
        }
    }

    /// A version's endpoints by state, set just before a scrape.
    pub(crate) fn set_endpoints(&self, name: &str, healthy: usize, ejected: usize) {
        self.endpoints
            .with_label_values(&[name, "healthy"])
            .set(healthy as i64);
        self.endpoints
            .with_label_values(&[name, "ejected"])
            .set(ejected as i64);
    }

    /// The routing state of a version, as a snapshot publishes it.
    /// `tripped` is the criterion of its latched rollback, if any.
    pub(crate) fn set_shares(
        &self,
        name: &str,
        configured: f64,
        effective: f64,
        tripped: Option<Criterion>,
    ) {
        self.weight.with_label_values(&[name]).set(configured);
        self.effective_weight
            .with_label_values(&[name])
            .set(effective);
        self.rollback_active
            .with_label_values(&[name])
            .set(tripped.is_some() as i64);
        for criterion in Criterion::ALL {
            self.rollback_tripped
                .with_label_values(&[name, criterion.as_str()])
                .set((tripped == Some(criterion)) as i64);
        }
    }

    /// The judgment of a version, refreshed before a scrape: the evidence
    /// per criterion judged, and whether a decision is held.
    pub(crate) fn set_judgment(&self, name: &str, evidence: &[(Criterion, f64)], held: bool) {
        for criterion in Criterion::ALL {
            match evidence.iter().find(|(c, _)| *c == criterion) {
                Some((_, value)) => self
                    .rollback_evidence
                    .with_label_values(&[name, criterion.as_str()])
                    .set(*value),
                // No longer judged on it (rollback or the latency objective
                // turned off): its series goes, rather than keep a stale value.
                None => {
                    let _ = self
                        .rollback_evidence
                        .remove_label_values(&[name, criterion.as_str()]);
                }
            }
        }
        self.rollback_held
            .with_label_values(&[name])
            .set(held as i64);
    }

    /// Where the `[progress]` run of `version` stands.
    pub(crate) fn set_progress(&self, version: &str, step: usize, state: crate::progress::State) {
        self.progress_step
            .with_label_values(&[version])
            .set(step as i64);
        for s in crate::progress::State::ALL {
            self.progress_state
                .with_label_values(&[version, s.as_str()])
                .set((s == state) as i64);
        }
    }

    /// The `[progress]` run of `version` ended: its series go.
    pub(crate) fn forget_progress(&self, version: &str) {
        let _ = self.progress_step.remove_label_values(&[version]);
        for s in crate::progress::State::ALL {
            let _ = self
                .progress_state
                .remove_label_values(&[version, s.as_str()]);
        }
    }

    /// A request the override header sent to `version`.
    pub(crate) fn override_request(&self, version: &str) {
        self.override_requests.with_label_values(&[version]).inc();
    }

    /// A copy to `version` that ended: with an answer's status, or with
    /// the upstream failure that left it without one.
    pub(crate) fn mirror_ended(&self, version: &str, how: Result<u16, UpstreamErrorKind>) {
        let code = match how {
            Ok(status) => code_label(status),
            Err(kind) => kind.as_str(),
        };
        self.mirror_requests
            .with_label_values(&[version, code])
            .inc();
    }

    /// `[mirror]` names `version`: its drop counts exist from the start,
    /// so that rate() and alerts on them work before the first drop.
    pub(crate) fn mirror_configured(&self, version: &str) {
        for reason in MIRROR_DROP_REASONS {
            self.mirror_dropped.with_label_values(&[version, reason]);
        }
    }

    /// A copy to `version` chosen but not sent; `reason` is one of
    /// [`MIRROR_DROP_REASONS`].
    pub(crate) fn mirror_dropped(&self, version: &str, reason: &'static str) {
        debug_assert!(MIRROR_DROP_REASONS.contains(&reason));
        self.mirror_dropped
            .with_label_values(&[version, reason])
            .inc();
    }

    pub(crate) fn client_error(&self, kind: ClientErrorKind) {
        self.client_errors[kind as usize].inc();
    }

    pub fn set_error_ratio(&self, name: &str, ratio: f64) {
        self.error_ratio.with_label_values(&[name]).set(ratio);
    }

    pub fn set_config_hash(&self, old: Option<&str>, new: &str) {
        if let Some(old) = old {
            let _ = self.config_info.remove_label_values(&[old]);
        }
        self.config_info.with_label_values(&[new]).set(1);
    }

    pub fn config_reload(&self, success: bool) {
        self.config_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    pub fn tls_reload(&self, success: bool) {
        self.tls_reloads
            .with_label_values(&[if success { "success" } else { "failure" }])
            .inc();
    }

    /// TLS is on: both reload results exist from the start, as for the
    /// routes, so rate() and absent() alerts work before the first rotation.
    pub fn tls_enabled(&self) {
        self.tls_reloads.with_label_values(&["success"]);
        self.tls_reloads.with_label_values(&["failure"]);
    }

    /// The text exposition format, as `/metrics` serves it.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

/// The `reason` label values of `canary_proxy_mirror_dropped_total`.
pub(crate) const MIRROR_DROP_REASONS: [&str; 3] = ["full", "body_too_large", "body_incomplete"];
/// The `code` of a copy that got no answer.
const MIRROR_FAILURES: [&str; 3] = ["connect", "reset", "timeout"];

/// Status codes 100..=599 get a cached counter each; anything else (hyper
/// only produces valid codes, but be safe) shares the last slot.
const CODE_SLOTS: usize = 501;

fn code_label(code: u16) -> &'static str {
    // Status codes as label values without a per-request allocation.
    static LABELS: OnceLock<Vec<String>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| (0..600).map(|c| c.to_string()).collect());
    labels
        .get(code as usize)
        .map(String::as_str)
        .unwrap_or("other")
}

/// The handles one version records into; built once per version name and
/// shared by every snapshot that contains it.
pub struct VersionMetrics {
    pub name: String,
    requests: IntCounterVec,
    codes: Box<[OnceLock<(u16, IntCounter)>]>,
    duration: Histogram,
    pub in_flight: IntGauge,
    upstream_errors: [IntCounter; 3],
    pub retries: IntCounter,
    pub(crate) endpoint_ejections: IntCounter,
    /// `canary_proxy_dns_refreshes_total`: success, failure.
    dns_refreshes: [IntCounter; 2],
    pub upstream_connections: IntCounter,
    pub rollbacks: IntCounter,
    pub rollback_resets: IntCounter,
    grpc_requests: IntCounterVec,
    /// `canary_proxy_grpc_requests_total` of this version by status slot
    /// (the 17 codes, then "other"), created on first use.
    grpc: Box<[OnceLock<(&'static str, IntCounter)>]>,
}

impl std::fmt::Debug for VersionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VersionMetrics({})", self.name)
    }
}

/// The 17 gRPC status codes and "other".
const GRPC_SLOTS: usize = 18;

impl VersionMetrics {
    /// One discovery lookup of the version's upstream.
    pub(crate) fn dns_refresh(&self, ok: bool) {
        self.dns_refreshes[usize::from(!ok)].inc();
    }

    /// One gRPC call answered with `grpc_status` (its slot and label).
    pub(crate) fn grpc_answered(&self, slot: usize, label: &'static str) {
        let (_, counter) = self.grpc[slot.min(GRPC_SLOTS - 1)].get_or_init(|| {
            (
                label,
                self.grpc_requests
                    .with_label_values(&[self.name.as_str(), label]),
            )
        });
        counter.inc();
    }

    /// One answered request: counted by code, and its duration observed.
    pub fn answered(&self, code: u16, elapsed: Duration) {
        let slot = (code as usize)
            .checked_sub(100)
            .filter(|&i| i < CODE_SLOTS - 1)
            .unwrap_or(CODE_SLOTS - 1);
        let (_, counter) = self.codes[slot].get_or_init(|| {
            (
                code,
                self.requests
                    .with_label_values(&[self.name.as_str(), code_label(code)]),
            )
        });
        counter.inc();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// (answered requests, of which 5xx) so far; for the demo's live view.
    pub fn counts(&self) -> (u64, u64) {
        self.codes
            .iter()
            .filter_map(|c| c.get())
            .fold((0, 0), |(all, errors), (code, counter)| {
                let n = counter.get();
                (all + n, errors + if *code >= 500 { n } else { 0 })
            })
    }

    pub(crate) fn upstream_error(&self, kind: UpstreamErrorKind) {
        // `upstream_errors` is built in the order of `UpstreamErrorKind::ALL`.
        self.upstream_errors[kind as usize].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics) -> String {
        String::from_utf8(m.encode()).unwrap()
    }

    #[test]
    fn codes_are_counted_per_version_and_forgotten_on_removal() {
        let m = Metrics::new();
        let canary = m.version("canary");
        canary.answered(200, Duration::from_millis(1));
        canary.answered(200, Duration::from_millis(1));
        canary.answered(503, Duration::from_millis(1));
        let text = scrape(&m);
        assert!(
            text.contains("canary_proxy_requests_total{code=\"200\",version=\"canary\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("canary_proxy_requests_total{code=\"503\",version=\"canary\"} 1"),
            "{text}"
        );
        m.forget_version(&canary);
        let text = scrape(&m);
        assert!(!text.contains("version=\"canary\""), "{text}");
    }
}
