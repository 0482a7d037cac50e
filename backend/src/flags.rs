//! The command line. Every flag can also be given as a `PING_*` env var, which is
//! how a Kubernetes Deployment sets them. A bad value is rejected by clap with one
//! line that names the flag and the accepted form, e.g.
//! `error: invalid value '1.5' for '--error-rate <F>': must be a fraction between 0.0 and 1.0 (e.g. 0.25)`.

use std::time::Duration;

use clap::Parser;

use crate::Config;

/// A flag value that cannot be used. The messages are what clap prints after
/// `invalid value 'X' for '--flag <VALUE>':`, so each one states the accepted form.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FlagError {
    #[error("must be a fraction between 0.0 and 1.0 (e.g. 0.25)")]
    ErrorRate,
    #[error("must be a duration like 250ms, 5s or 1m30s ({0})")]
    Duration(String),
    #[error("must be a non-empty name of visible ASCII characters (e.g. v2 or canary-2024-06)")]
    Version,
}

/// ping-backend answers `GET /ping` with `pong`, made fit for rolling updates.
#[derive(Debug, Parser)]
#[command(
    name = "ping-backend",
    // `--version` is a value flag here (the version name to report), so clap's
    // automatic `--version` must not claim it; the build's own version is
    // `-V` / `--build-version` instead.
    version,
    disable_version_flag = true,
    arg(
        clap::Arg::new("build-version")
            .short('V')
            .long("build-version")
            .action(clap::ArgAction::Version)
            .help("Print this binary's own version (--version names the version it reports)")
    ),
    after_help = "Serves HTTP/1.1 and h2c (HTTP/2 with prior knowledge, as gRPC clients and canary-proxy's protocol = \"h2c\" speak it) on the same port.\n\nEndpoints:\n  GET  /ping     200 pong with x-ping-version (500 for the error rate)\n  POST /upload   the same as GET /ping, after reading the whole request body\n  POST /echo     streams the request body back\n  GET  /healthz  200 while the process is alive\n  GET  /readyz   200 while accepting traffic, 503 while draining\n\nOn SIGTERM or SIGINT: /readyz turns 503, /ping is served for the drain delay,\nthen the listener closes and in-flight requests get up to the shutdown timeout."
)]
pub struct Flags {
    /// Address to listen on, as HOST:PORT (e.g. 0.0.0.0:8080; port 0 picks a free port).
    #[arg(
        long,
        env = "PING_LISTEN",
        value_name = "ADDR",
        default_value = "0.0.0.0:8080"
    )]
    pub listen: String,

    /// Version name sent in the x-ping-version header of each /ping answer (e.g. v1, v2).
    #[arg(long, env = "PING_VERSION", value_name = "NAME", default_value = "v1", value_parser = parse_version)]
    pub version: String,

    /// Fraction of /ping requests answered with 500, from 0.0 to 1.0 (e.g. 0.25).
    #[arg(long, env = "PING_ERROR_RATE", value_name = "F", default_value = "0.0", value_parser = parse_error_rate)]
    pub error_rate: f64,

    /// Delay added to each /ping answer, as a duration like 250ms or 2s.
    #[arg(long, env = "PING_LATENCY", value_name = "DURATION", default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,

    /// After SIGTERM, how long /ping is still served while /readyz says 503, as a duration like 5s.
    #[arg(long, env = "PING_DRAIN_DELAY", value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub drain_delay: Duration,

    /// After the drain delay, how long in-flight requests get to finish, as a duration like 25s.
    #[arg(long, env = "PING_SHUTDOWN_TIMEOUT", value_name = "DURATION", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

impl Flags {
    /// The serving settings; `listen` stays with the caller, which binds it.
    pub fn config(&self) -> Config {
        Config {
            version: self.version.clone(),
            error_rate: self.error_rate,
            latency: self.latency,
            drain_delay: self.drain_delay,
            shutdown_timeout: self.shutdown_timeout,
        }
    }
}

/// A fraction in `0.0..=1.0`. NaN and infinities are refused like any other
/// out-of-range value.
pub fn parse_error_rate(value: &str) -> Result<f64, FlagError> {
    match value.trim().parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(FlagError::ErrorRate),
    }
}

/// A duration in humantime's form (`250ms`, `5s`, `1m30s`).
pub fn parse_duration(value: &str) -> Result<Duration, FlagError> {
    humantime::parse_duration(value.trim()).map_err(|err| FlagError::Duration(err.to_string()))
}

/// The version goes into a response header, so it must be a valid header value;
/// refusing it here beats a server that cannot answer /ping.
pub fn parse_version(value: &str) -> Result<String, FlagError> {
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(value.to_owned())
    } else {
        Err(FlagError::Version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Flags, clap::Error> {
        Flags::try_parse_from(std::iter::once("ping-backend").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_config_default() {
        // Env vars from the surrounding shell would change the defaults; the test
        // runner does not set PING_*, and the crate's tests never do either.
        let flags = parse(&[]).unwrap();
        assert_eq!(flags.listen, "0.0.0.0:8080");
        assert_eq!(flags.config(), Config::default());
    }

    #[test]
    fn all_flags_parse() {
        let flags = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--version",
            "v2",
            "--error-rate",
            "0.25",
            "--latency",
            "250ms",
            "--drain-delay",
            "1s",
            "--shutdown-timeout",
            "1m30s",
        ])
        .unwrap();
        assert_eq!(flags.listen, "127.0.0.1:0");
        assert_eq!(
            flags.config(),
            Config {
                version: "v2".into(),
                error_rate: 0.25,
                latency: Duration::from_millis(250),
                drain_delay: Duration::from_secs(1),
                shutdown_timeout: Duration::from_secs(90),
            }
        );
    }

    #[test]
    fn error_rate_bounds() {
        assert_eq!(parse_error_rate("0"), Ok(0.0));
        assert_eq!(parse_error_rate("1.0"), Ok(1.0));
        for bad in ["1.5", "-0.1", "NaN", "inf", "a quarter", ""] {
            assert_eq!(parse_error_rate(bad), Err(FlagError::ErrorRate), "{bad:?}");
        }
    }

    #[test]
    fn bad_values_name_the_flag_and_the_form() {
        let err = parse(&["--error-rate", "1.5"]).unwrap_err().to_string();
        assert!(
            err.starts_with("error: invalid value '1.5' for '--error-rate <F>': must be a fraction between 0.0 and 1.0 (e.g. 0.25)"),
            "{err}"
        );
        let err = parse(&["--latency", "abc"]).unwrap_err().to_string();
        assert!(err.contains("'--latency <DURATION>'"), "{err}");
        assert!(err.contains("like 250ms, 5s"), "{err}");
        let err = parse(&["--version", "has space"]).unwrap_err().to_string();
        assert!(err.contains("'--version <NAME>'"), "{err}");
    }

    #[test]
    fn version_is_a_value_flag_not_clap_s_version() {
        assert!(parse(&["--version"]).is_err(), "--version needs a value");
        assert_eq!(parse(&["--version", "v9"]).unwrap().version, "v9");
    }

    #[test]
    fn clap_definition_is_consistent() {
        use clap::CommandFactory;
        Flags::command().debug_assert();
    }
}
