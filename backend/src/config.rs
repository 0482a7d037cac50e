//! The settings of one running backend, independent of how they were given
//! (flags, env vars, or a test building a [`Config`] by hand).

use std::time::Duration;

/// How a backend answers and how it shuts down.
///
/// The defaults match the binary's flag defaults. Tests usually want
/// `drain_delay: Duration::ZERO`, since the 5 s default exists for Kubernetes
/// (see [`Config::drain_delay`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Sent in the `x-ping-version` header of every `/ping` answer, so a caller
    /// (or the proxy's tests) can tell which version answered. It must be a valid
    /// HTTP header value; [`crate::serve`] refuses to start otherwise.
    pub version: String,
    /// Fraction of `/ping` requests answered with `500`. Meant to be within
    /// `0.0..=1.0`: values above 1 behave as 1, values below 0 (and NaN) as 0.
    pub error_rate: f64,
    /// Added to each `/ping` answer, to stand in for a slow version.
    pub latency: Duration,
    /// How long `/ping` keeps being served after shutdown begins, while `/readyz`
    /// already says 503. Kubernetes removes a terminating pod from its endpoints
    /// asynchronously, so traffic keeps arriving for a while after SIGTERM.
    pub drain_delay: Duration,
    /// How long, once the listener is closed, in-flight requests get to finish
    /// before the remaining connections are dropped. Keep it below the pod's
    /// `terminationGracePeriodSeconds` minus the drain delay.
    pub shutdown_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            version: "v1".to_owned(),
            error_rate: 0.0,
            latency: Duration::ZERO,
            drain_delay: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(25),
        }
    }
}
