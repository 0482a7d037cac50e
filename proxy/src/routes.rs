//! The routes file: TOML text -> raw serde types -> a validated [`RouteTable`].
//!
//! Parsing happens in two steps, as rpxy does: serde reads loosely typed raw
//! structs (so a wrong type becomes our own message, not serde's), then
//! [`validate`] turns them into domain types or a list of [`Problem`]s. Every
//! problem names the key, the line where we know it, and what is accepted,
//! because the person reading it is an operator about to `kubectl apply`.
//!
//! Unknown keys are found on a spanned parse of the document before serde
//! runs, so that they get a line number and a "did you mean" suggestion.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use indexmap::IndexMap;
use serde::Deserialize;

use sha2::{Digest, Sha256};
use toml::Spanned;

/// Weights are relative; this cap keeps sums far from overflow and catches
/// a stray digit (a weight of 10 billion is a typo, not a policy).
pub(crate) const MAX_WEIGHT: u64 = 1_000_000;

const DEFAULT_ERROR_RATE: f64 = 0.05;
/// The judgment is safe on few answers (docs/rollback.md); this floor only
/// keeps a handful of answers from deciding, however bad.
const DEFAULT_MIN_REQUESTS: u64 = 10;
const DEFAULT_WINDOW: Duration = Duration::from_secs(30);
/// The odds of the evidence at which a version trips (see `guard`); chosen
/// with bench/detection to meet the false-rollback goals with a margin.
pub(crate) const DEFAULT_TRIP_ODDS: f64 = 1e5;
const TRIP_ODDS_RANGE: (f64, f64) = (100.0, 1e12);
const DEFAULT_SLOW_RATE: f64 = 0.05;

/// A validated routes file. Built once per (re)load and never mutated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouteTable {
    /// In file order.
    pub versions: Vec<VersionSpec>,
    /// `None` when the file has no `[rollback]` table: automatic rollback is off.
    pub rollback: Option<RollbackPolicy>,
    /// Hex SHA-256 prefix of the file's bytes: what `/status` and
    /// `canary_proxy_config_info{hash}` show, so an operator can compare it
    /// with `sha256sum routes.toml`.
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VersionSpec {
    pub name: String,
    pub upstream: Upstream,
    pub weight: u64,
    /// Send the upstream's authority as `Host` instead of the client's.
    pub rewrite_host: bool,
}

/// An upstream base URL reduced to what the proxy uses: scheme and authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Upstream {
    pub scheme: Scheme,
    pub authority: Authority,
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RollbackPolicy {
    /// Index into [`RouteTable::versions`] of the version that takes over.
    pub(crate) target: usize,
    /// The line a version's true error rate must not cross.
    pub(crate) error_rate: f64,
    /// No rollback before a version has this many answers judged.
    pub(crate) min_requests: u64,
    /// The span of the counts the target comparison and `/status` use.
    pub(crate) window: Duration,
    pub(crate) error_codes: ErrorCodes,
    /// How strong the evidence must be (see `guard`).
    pub(crate) trip_odds: f64,
    /// Hold a decision while the target fails at least as much.
    pub(crate) compare_target: bool,
    pub(crate) latency: Option<LatencyObjective>,
}

/// "At most `slow_rate` of answers slower than `slower_than`."
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LatencyObjective {
    pub(crate) slower_than: Duration,
    pub(crate) slow_rate: f64,
}

/// The set of upstream status codes that count as errors for rollback.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ErrorCodes {
    // One bit per status code 0..=639; a lookup on the hot path is a shift.
    bits: [u64; 10],
    spec: Vec<String>,
}

impl ErrorCodes {
    pub(crate) fn contains(&self, code: u16) -> bool {
        let code = code as usize;
        code < 640 && self.bits[code / 64] & (1 << (code % 64)) != 0
    }

    fn parse(items: &[String]) -> Result<Self, String> {
        let mut set = ErrorCodes {
            bits: [0; 10],
            spec: items.to_vec(),
        };
        for item in items {
            let range = match item.as_bytes() {
                [c @ b'1'..=b'5', b'x' | b'X', b'x' | b'X'] => {
                    let base = u16::from(c - b'0') * 100;
                    base..=base + 99
                }
                _ => match item.parse::<u16>() {
                    Ok(code) if (100..=599).contains(&code) => code..=code,
                    _ => {
                        return Err(format!(
                            "`{item}` is not a status code: use a code like \"429\" or a class like \"5xx\""
                        ))
                    }
                },
            };
            for code in range {
                set.bits[code as usize / 64] |= 1 << (code % 64);
            }
        }
        Ok(set)
    }
}

impl Default for ErrorCodes {
    fn default() -> Self {
        ErrorCodes::parse(&["5xx".to_string()]).expect("5xx is a valid class")
    }
}

impl fmt::Debug for ErrorCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.spec)
    }
}

impl fmt::Display for ErrorCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec.join(", "))
    }
}

/// One thing wrong with a routes file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `versions.canary.weight`; empty for the whole file.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.key.is_empty()) {
            (Some(line), false) => write!(f, "line {line}: `{}`: {}", self.key, self.message),
            (Some(line), true) => write!(f, "line {line}: {}", self.message),
            (None, false) => write!(f, "`{}`: {}", self.key, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    #[error("cannot read routes file {}: {source}; check the path (flag --routes) and that the ConfigMap is mounted as a directory", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", format_problems(.path, .problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

impl RoutesError {
    /// The problems found, or none for a read error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            RoutesError::Read { .. } => &[],
            RoutesError::Invalid { problems, .. } => problems,
        }
    }
}

fn format_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!("invalid routes file {}:", path.display());
    for p in problems {
        out.push_str("\n  - ");
        out.push_str(&p.to_string());
    }
    out
}

/// Read a routes file: the one place the proxy reads it from disk (start-up,
/// `check`, and every hot reload).
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, RoutesError> {
    std::fs::read(path).map_err(|source| RoutesError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Read and validate a routes file from disk.
pub(crate) fn load(path: &Path) -> Result<RouteTable, RoutesError> {
    parse_at(path, &read(path)?)
}

/// Validate content read from `path` (which only names the file in errors).
pub(crate) fn parse_at(path: &Path, bytes: &[u8]) -> Result<RouteTable, RoutesError> {
    parse(bytes).map_err(|problems| RoutesError::Invalid {
        path: path.to_owned(),
        problems,
    })
}

/// Validate routes file content. This is the one function behind `check`,
/// start-up and every hot reload, so they can never disagree.
pub(crate) fn parse(bytes: &[u8]) -> Result<RouteTable, Vec<Problem>> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        vec![Problem {
            key: String::new(),
            line: None,
            message: format!("not UTF-8 text ({e}); save the file as UTF-8"),
        }]
    })?;
    if text.trim().is_empty() {
        return Err(vec![Problem {
            key: String::new(),
            line: None,
            message: "the file is empty; it needs at least one [versions.NAME] table with upstream and weight".into(),
        }]);
    }
    let lines = LineIndex::new(text);
    // Parsed once, with spans: the unknown-key check reads the spanned
    // document, then serde reads the same document into the raw structs.
    let doc = toml::de::DeTable::parse(text).map_err(|e| vec![toml_problem(text, &lines, &e)])?;
    let unknown = unknown_keys(doc.get_ref(), &lines);
    if !unknown.is_empty() {
        return Err(unknown);
    }
    let raw = RawRoutes::deserialize(toml::de::Deserializer::from(doc))
        .map_err(|e| vec![toml_problem(text, &lines, &e)])?;
    let mut table = validate(raw, &lines)?;
    table.hash = content_hash(bytes);
    Ok(table)
}

/// Hex SHA-256 of the content, shortened: 16 hex digits are plenty to tell
/// configs apart and short enough for a metric label.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

// ---- raw serde types: loose on purpose, validate() is strict ----

#[derive(Deserialize)]
struct RawRoutes {
    #[serde(default)]
    versions: Option<Spanned<IndexMap<String, Spanned<RawVersion>>>>,
    rollback: Option<Spanned<RawRollback>>,
}

/// A table of the routes file whose keys are all read as spanned values and
/// checked by `validate`. The macro writes the key list from the fields, so
/// the keys accepted and the keys suggested ("did you mean") are one list.
macro_rules! raw_table {
    ($(#[$doc:meta])* $name:ident { $($key:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Deserialize)]
        struct $name {
            $($key: Option<Spanned<toml::Value>>,)+
        }

        impl $name {
            const KEYS: &'static [&'static str] = &[$(stringify!($key)),+];
        }
    };
}

raw_table!(
    /// `[versions.NAME]`
    RawVersion { upstream, weight, rewrite_host }
);

raw_table!(
    /// `[rollback]`
    RawRollback {
        target,
        error_rate,
        min_requests,
        window,
        error_codes,
        slower_than,
        slow_rate,
        trip_odds,
        compare_target,
    }
);

/// The top level: the tables above.
const TOP_KEYS: &[&str] = &["versions", "rollback"];

struct Problems<'a> {
    lines: &'a LineIndex,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn add(
        &mut self,
        key: impl Into<String>,
        span: Option<Range<usize>>,
        message: impl Into<String>,
    ) {
        let line = span.map(|s| self.lines.line_of(s.start));
        self.list.push(Problem {
            key: key.into(),
            line,
            message: message.into(),
        });
    }
}

fn validate(raw: RawRoutes, lines: &LineIndex) -> Result<RouteTable, Vec<Problem>> {
    let mut problems = Problems {
        lines,
        list: Vec::new(),
    };
    let mut versions = Vec::new();

    let raw_versions = raw.versions.map(|v| v.into_inner()).unwrap_or_default();
    if raw_versions.is_empty() {
        problems.add(
            "versions",
            None,
            "no versions: add at least one table like [versions.stable] with upstream = \"http://host:port\" and weight = 100",
        );
    }
    for (name, spanned) in raw_versions {
        let span = spanned.span();
        let raw = spanned.into_inner();
        let key = format!("versions.{name}");
        if let Err(why) = check_dns_label(&name) {
            problems.add(&key, Some(span.clone()), format!("version name `{name}` {why}; it becomes a metric label, so use a DNS label like `stable` or `canary-v2`"));
        }
        let upstream = match raw.upstream {
            None => {
                problems.add(
                    format!("{key}.upstream"),
                    Some(span.clone()),
                    "missing; set a base URL like upstream = \"http://ping-canary:8080\"",
                );
                None
            }
            Some(v) => match v
                .get_ref()
                .as_str()
                .ok_or_else(|| "must be a string".to_string())
                .and_then(parse_upstream)
            {
                Ok(u) => Some(u),
                Err(why) => {
                    problems.add(format!("{key}.upstream"), Some(v.span()), why);
                    None
                }
            },
        };
        let weight = match raw.weight {
            None => {
                problems.add(
                    format!("{key}.weight"),
                    Some(span.clone()),
                    "missing; set a non-negative integer like weight = 10 (weights are relative)",
                );
                None
            }
            Some(v) => {
                match v.get_ref() {
                    toml::Value::Integer(w) if (0..=MAX_WEIGHT as i64).contains(w) => {
                        Some(*w as u64)
                    }
                    toml::Value::Integer(w) if *w < 0 => {
                        problems.add(format!("{key}.weight"), Some(v.span()), format!("{w} is negative; weights are non-negative integers such as 0, 10 or 90"));
                        None
                    }
                    toml::Value::Integer(w) => {
                        problems.add(format!("{key}.weight"), Some(v.span()), format!("{w} is too large; weights are relative integers up to {MAX_WEIGHT}"));
                        None
                    }
                    other => {
                        problems.add(format!("{key}.weight"), Some(v.span()), format!("{} is not an integer; weights are non-negative integers such as 10 or 90 (9999 and 1 give a 0.01% share)", show(other)));
                        None
                    }
                }
            }
        };
        let rewrite_host = match raw.rewrite_host {
            None => false,
            Some(v) => match v.get_ref() {
                toml::Value::Boolean(b) => *b,
                other => {
                    problems.add(
                        format!("{key}.rewrite_host"),
                        Some(v.span()),
                        format!("{} is not a boolean; use true or false", show(other)),
                    );
                    false
                }
            },
        };
        if let (Some(upstream), Some(weight)) = (upstream, weight) {
            versions.push(VersionSpec {
                name,
                upstream,
                weight,
                rewrite_host,
            });
        }
    }
    if !versions.is_empty() && problems.list.is_empty() && versions.iter().all(|v| v.weight == 0) {
        problems.add("versions", None, "all weights are zero, so no version could take traffic; give at least one version a weight above 0");
    }

    let rollback = raw
        .rollback
        .and_then(|r| validate_rollback(r, &versions, &mut problems));
    if problems.list.is_empty() {
        Ok(RouteTable {
            versions,
            rollback,
            hash: String::new(),
        })
    } else {
        Err(problems.list)
    }
}

fn validate_rollback(
    raw: Spanned<RawRollback>,
    versions: &[VersionSpec],
    problems: &mut Problems<'_>,
) -> Option<RollbackPolicy> {
    let span = raw.span();
    let raw = raw.into_inner();
    let names = || {
        versions
            .iter()
            .map(|v| format!("`{}`", v.name))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let target = match &raw.target {
        None => {
            problems.add("rollback.target", Some(span.clone()), format!("missing; name the version that takes the traffic of a rolled-back one, one of {}", names()));
            None
        }
        Some(v) => match v.get_ref().as_str() {
            Some(name) => match versions.iter().position(|x| x.name == name) {
                Some(i) => Some(i),
                None => {
                    let hint = suggest(name, versions.iter().map(|v| v.name.as_str()));
                    problems.add(
                        "rollback.target",
                        Some(v.span()),
                        format!("`{name}` is not a version{hint}; use one of {}", names()),
                    );
                    None
                }
            },
            None => {
                problems.add(
                    "rollback.target",
                    Some(v.span()),
                    format!("must be a string naming a version, one of {}", names()),
                );
                None
            }
        },
    };
    let error_rate = match &raw.error_rate {
        None => DEFAULT_ERROR_RATE,
        Some(v) => match number(v.get_ref()) {
            Some(x) if x > 0.0 && x <= 1.0 => x,
            _ => {
                problems.add(
                    "rollback.error_rate",
                    Some(v.span()),
                    format!(
                        "{} is out of range; use a fraction with 0 < x <= 1, like 0.05 for 5%",
                        show(v.get_ref())
                    ),
                );
                DEFAULT_ERROR_RATE
            }
        },
    };
    let min_requests = match &raw.min_requests {
        None => DEFAULT_MIN_REQUESTS,
        Some(v) => match v.get_ref() {
            toml::Value::Integer(n) if *n >= 1 => *n as u64,
            other => {
                problems.add(
                    "rollback.min_requests",
                    Some(v.span()),
                    format!(
                        "{} is out of range; use an integer >= 1, like 10 (the default)",
                        show(other)
                    ),
                );
                DEFAULT_MIN_REQUESTS
            }
        },
    };
    let window = match &raw.window {
        None => DEFAULT_WINDOW,
        Some(v) => match v.get_ref().as_str().map(humantime::parse_duration) {
            Some(Ok(d)) if d >= Duration::from_secs(1) && d <= Duration::from_secs(3600) => d,
            _ => {
                problems.add("rollback.window", Some(v.span()), format!("{} is not accepted; use a duration string from \"1s\" to \"1h\", like \"30s\"", show(v.get_ref())));
                DEFAULT_WINDOW
            }
        },
    };
    let error_codes = match &raw.error_codes {
        None => ErrorCodes::default(),
        Some(v) => {
            let items: Option<Vec<String>> = v.get_ref().as_array().map(|a| {
                a.iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| i.to_string())
                    })
                    .collect()
            });
            match items.ok_or_else(|| "must be a list of strings like [\"5xx\", \"429\"]".to_string()).and_then(|i| {
                if i.is_empty() {
                    Err("is empty, so nothing would count as an error; use a list like [\"5xx\"]".to_string())
                } else {
                    ErrorCodes::parse(&i)
                }
            }) {
                Ok(set) => set,
                Err(why) => {
                    problems.add("rollback.error_codes", Some(v.span()), why);
                    ErrorCodes::default()
                }
            }
        }
    };
    let trip_odds = match &raw.trip_odds {
        None => DEFAULT_TRIP_ODDS,
        Some(v) => match number(v.get_ref()) {
            Some(x) if (TRIP_ODDS_RANGE.0..=TRIP_ODDS_RANGE.1).contains(&x) => x,
            _ => {
                problems.add("rollback.trip_odds", Some(v.span()), format!("{} is out of range; use a number from 100 to 1e12, like 100000 (the default; higher is slower to act and wrong less often)", show(v.get_ref())));
                DEFAULT_TRIP_ODDS
            }
        },
    };
    let compare_target = match &raw.compare_target {
        None => true,
        Some(v) => match v.get_ref() {
            toml::Value::Boolean(b) => *b,
            other => {
                problems.add(
                    "rollback.compare_target",
                    Some(v.span()),
                    format!("{} is not a boolean; use true or false", show(other)),
                );
                true
            }
        },
    };
    let slower_than = raw.slower_than.as_ref().and_then(|v| {
        match v.get_ref().as_str().map(humantime::parse_duration) {
            Some(Ok(d)) if d >= Duration::from_millis(1) && d <= Duration::from_secs(3600) => Some(d),
            _ => {
                problems.add("rollback.slower_than", Some(v.span()), format!("{} is not accepted; use a duration string from \"1ms\" to \"1h\", like \"250ms\"", show(v.get_ref())));
                None
            }
        }
    });
    let slow_rate = raw.slow_rate.as_ref().map(|v| match number(v.get_ref()) {
        Some(x) if x > 0.0 && x < 1.0 => x,
        _ => {
            problems.add(
                "rollback.slow_rate",
                Some(v.span()),
                format!(
                    "{} is out of range; use a fraction with 0 < x < 1, like 0.01 for 1%",
                    show(v.get_ref())
                ),
            );
            DEFAULT_SLOW_RATE
        }
    });
    if let (None, Some(v)) = (&raw.slower_than, &raw.slow_rate) {
        problems.add(
            "rollback.slow_rate",
            Some(v.span()),
            "has no effect without slower_than; add slower_than = \"250ms\" (the latency that counts as slow), or remove slow_rate",
        );
    }
    let latency = slower_than.map(|slower_than| LatencyObjective {
        slower_than,
        slow_rate: slow_rate.unwrap_or(DEFAULT_SLOW_RATE),
    });
    target.map(|target| RollbackPolicy {
        target,
        error_rate,
        min_requests,
        window,
        error_codes,
        trip_odds,
        compare_target,
        latency,
    })
}

fn number(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Float(f) => Some(*f),
        toml::Value::Integer(i) => Some(*i as f64),
        _ => None,
    }
}

/// A value as the operator wrote it, for messages.
fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("\"{s}\""),
        other => other.to_string(),
    }
}

/// RFC 1123 label: what Kubernetes accepts as a name, and safe as a metric label.
fn check_dns_label(name: &str) -> Result<(), &'static str> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return Err("must be 1 to 63 characters");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err("may contain only lowercase letters, digits and '-'");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

fn parse_upstream(s: &str) -> Result<Upstream, String> {
    let form = "use a base URL with scheme, host and port, like \"http://ping-canary:8080\"";
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("\"{s}\" is not a URL ({e}); {form}"))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| format!("\"{s}\" has no scheme; {form}"))?;
    if scheme == Scheme::HTTPS {
        return Err(format!(
            "\"{s}\": https upstreams are not supported yet (the proxy speaks plain HTTP to upstreams inside the cluster); use http://"
        ));
    }
    if scheme != Scheme::HTTP {
        return Err(format!("\"{s}\": scheme `{scheme}` is not supported; only http:// (and, later, https://) upstreams are accepted"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("\"{s}\" has no host; {form}"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "\"{s}\" has user info; credentials in upstream URLs are not supported"
        ));
    }
    if authority.host().is_empty() {
        return Err(format!("\"{s}\" has no host; {form}"));
    }
    if let Some(pq) = uri.path_and_query() {
        if pq.as_str() != "/" && !pq.as_str().is_empty() {
            return Err(format!("\"{s}\" has a path or query (`{pq}`); upstreams are base URLs, the client's path is kept as sent"));
        }
    }
    Ok(Upstream { scheme, authority })
}

fn unknown_keys(doc: &toml::de::DeTable<'_>, lines: &LineIndex) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut report = |key: String, span: Range<usize>, accepted: &[&str]| {
        let last = key.rsplit('.').next().unwrap_or(&key).to_string();
        let hint = suggest(&last, accepted.iter().copied());
        out.push(Problem {
            key,
            line: Some(lines.line_of(span.start)),
            message: format!(
                "unknown key{hint}; accepted keys here: {}",
                accepted.join(", ")
            ),
        });
    };
    for (k, v) in doc {
        let name = k.get_ref().as_ref();
        match name {
            "versions" => {
                if let toml::de::DeValue::Table(versions) = v.get_ref() {
                    for (vk, vv) in versions {
                        if let toml::de::DeValue::Table(fields) = vv.get_ref() {
                            for (fk, _) in fields {
                                if !RawVersion::KEYS.contains(&fk.get_ref().as_ref()) {
                                    report(
                                        format!("versions.{}.{}", vk.get_ref(), fk.get_ref()),
                                        fk.span(),
                                        RawVersion::KEYS,
                                    );
                                }
                            }
                        }
                    }
                }
            }
            "rollback" => {
                if let toml::de::DeValue::Table(fields) = v.get_ref() {
                    for (fk, _) in fields {
                        if !RawRollback::KEYS.contains(&fk.get_ref().as_ref()) {
                            report(
                                format!("rollback.{}", fk.get_ref()),
                                fk.span(),
                                RawRollback::KEYS,
                            );
                        }
                    }
                }
            }
            other => report(other.to_string(), k.span(), TOP_KEYS),
        }
    }
    out
}

/// " (did you mean `x`?)" when a known word is close to what was written.
fn suggest<'a>(written: &str, known: impl Iterator<Item = &'a str>) -> String {
    known
        .map(|k| (strsim::damerau_levenshtein(written, k), k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

/// A TOML syntax error, with the offending line quoted: the parser's
/// message alone ("duplicate key") does not say which key.
fn toml_problem(text: &str, lines: &LineIndex, e: &toml::de::Error) -> Problem {
    let line = e.span().map(|s| lines.line_of(s.start));
    let quoted = line
        .and_then(|l| text.lines().nth(l - 1))
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| format!(" in `{l}`"))
        .unwrap_or_default();
    let reason = e.message().trim();
    let hint = if reason.contains("duplicate") {
        "; each [versions.NAME] table and each key may appear once: rename or merge the two"
    } else {
        "; see docs/routes.md for the accepted form"
    };
    Problem {
        key: String::new(),
        line,
        message: format!("not valid TOML: {reason}{quoted}{hint}"),
    }
}

/// Byte offset -> 1-based line number.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }
    fn line_of(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset)
    }
}

impl RouteTable {
    pub(crate) fn total_weight(&self) -> u64 {
        self.versions.iter().map(|v| v.weight).sum()
    }

    pub(crate) fn index_of(&self, name: &str) -> Option<usize> {
        self.versions.iter().position(|v| v.name == name)
    }

    /// The human summary `check` prints on success.
    pub(crate) fn describe(&self) -> String {
        let total = self.total_weight() as f64;
        let mut out = format!("routes OK (hash {})\nversions:\n", self.hash);
        for v in &self.versions {
            let share = 100.0 * v.weight as f64 / total;
            out.push_str(&format!(
                "  {:<16} weight {:>7}  {:>8.3}%  -> {}{}\n",
                v.name,
                v.weight,
                share,
                v.upstream,
                if v.rewrite_host {
                    " (Host rewritten)"
                } else {
                    ""
                }
            ));
        }
        match &self.rollback {
            Some(r) => {
                out.push_str(&format!(
                    "rollback: to `{}` when a version's error rate is shown above {} at odds {}:1, after >= {} requests judged; counts over {} (errors: status {}, connect failures, timeouts, resets)\n",
                    self.versions[r.target].name,
                    r.error_rate,
                    r.trip_odds,
                    r.min_requests,
                    humantime::format_duration(r.window),
                    r.error_codes
                ));
                if let Some(l) = &r.latency {
                    out.push_str(&format!(
                        "latency: also when more than {} of its answers are shown slower than {} (time to the response head)\n",
                        l.slow_rate,
                        humantime::format_duration(l.slower_than)
                    ));
                }
                out.push_str(if r.compare_target {
                    "hold: a decision waits while the target fails at least as much (compare_target = true)\n"
                } else {
                    "hold: off (compare_target = false)\n"
                });
            }
            None => out.push_str("rollback: off (no [rollback] table)\n"),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<Problem> {
        parse(text.as_bytes()).expect_err("should be invalid")
    }

    const GOOD: &str = r#"
[versions.stable]
upstream = "http://ping-stable:8080"
weight = 90

[versions.canary]
upstream = "http://ping-canary:8080"
weight = 10

[rollback]
target = "stable"
error_rate = 0.05
min_requests = 50
window = "30s"
"#;

    #[test]
    fn good_file_parses_in_file_order() {
        let t = parse(GOOD.as_bytes()).unwrap();
        let names: Vec<_> = t.versions.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["stable", "canary"]);
        assert_eq!(
            t.versions[1].upstream.to_string(),
            "http://ping-canary:8080"
        );
        let r = t.rollback.unwrap();
        assert_eq!(
            (r.target, r.min_requests, r.window),
            (0, 50, Duration::from_secs(30))
        );
        assert_eq!(t.hash, content_hash(GOOD.as_bytes()));
        assert_eq!(t.hash.len(), 16);
    }

    #[test]
    fn unknown_key_gets_line_and_suggestion() {
        let p = problems(&GOOD.replace("weight = 10", "wieght = 10"));
        assert_eq!(p[0].key, "versions.canary.wieght");
        assert_eq!(p[0].line, Some(8));
        assert!(
            p[0].message.contains("did you mean `weight`"),
            "{}",
            p[0].message
        );
    }

    #[test]
    fn error_codes_classes_and_codes() {
        let set = ErrorCodes::parse(&["5xx".into(), "429".into()]).unwrap();
        assert!(set.contains(500) && set.contains(599) && set.contains(429));
        assert!(!set.contains(428) && !set.contains(404) && !set.contains(200));
        assert!(ErrorCodes::parse(&["6xx".into()]).is_err());
    }

    #[test]
    fn line_index_is_one_based() {
        let l = LineIndex::new("a\nb\nc");
        assert_eq!((l.line_of(0), l.line_of(2), l.line_of(4)), (1, 2, 3));
    }
}
