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
//!
//! # Limits
//!
//! The file comes from whoever can edit the ConfigMap, and a broken one (a
//! generator gone wrong, the wrong file mounted) must not cost the proxy
//! more than a bounded amount of memory and CPU. So, before anything whose
//! cost grows faster than the input, [`parse`] checks [`MAX_FILE_BYTES`]
//! (before even the UTF-8 check; [`read`] reads no more than one byte past
//! it), then, right after the TOML syntax pass (linear, and nested at most
//! 80 deep by the toml crate), [`MAX_VERSIONS`] and [`MAX_NAME_LEN`] for the
//! version names and `rollback.target`. The "did you mean" edit distance
//! costs the product of the two lengths, so [`suggest`] also bounds the
//! words it compares and how many. docs/routes.md ("Limits") lists them.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use indexmap::IndexMap;
use serde::Deserialize;

use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::grpc_status::GrpcCodes;
use crate::upstream::Protocol;

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

/// The largest routes file accepted, in bytes: 1 MiB, the most a Kubernetes
/// ConfigMap can hold (all its keys together), so no file the proxy is meant
/// to read from one is refused. A real file needs about 60 bytes per version.
pub(crate) const MAX_FILE_BYTES: usize = 1 << 20;
/// The most versions one file may declare. A canary or blue-green release
/// uses two or three; each version is a `version` label on every per-version
/// metric, a judgment and an upstream pool, so a few thousand of them are a
/// broken generator, not a release. 256 leaves two orders of magnitude of
/// room and bounds the "did you mean" over version names.
pub(crate) const MAX_VERSIONS: usize = 256;
/// A version name is an RFC 1123 DNS label, at most 63 characters (all
/// ASCII, so bytes). Checked on its length alone before anything else reads
/// the name, so an absurd one is refused at once.
pub(crate) const MAX_NAME_LEN: usize = 63;
/// "Did you mean" compares no word longer than this, on either side: every
/// key and version name fits, and the edit distance, which costs the product
/// of the two lengths, stays at most 64 x 64 per candidate.
const SUGGEST_MAX_LEN: usize = 64;
/// ...and at most this many candidates: all the versions a file may have.
const SUGGEST_MAX_CANDIDATES: usize = MAX_VERSIONS;

/// A validated routes file. Built once per (re)load and never mutated.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RouteTable {
    /// In file order.
    pub versions: Vec<VersionSpec>,
    /// `None` when the file has no `[rollback]` table: automatic rollback is off.
    pub rollback: Option<RollbackPolicy>,
    /// `[sticky]`: requests with the same key go to the same version.
    pub(crate) sticky: Option<Sticky>,
    /// `[override]`: a request header that names the version.
    pub(crate) override_: Option<Override>,
    /// `[mirror]`: copies of other versions' requests to one version.
    pub(crate) mirror: Option<Mirror>,
    /// `[progress]`: one version's weight in steps, on good evidence.
    pub(crate) progress: Option<ProgressSpec>,
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
    /// How the proxy speaks to the upstream.
    pub(crate) protocol: Protocol,
    /// `discovery = "dns"`: the upstream names a headless Service, and
    /// every address it resolves to is an endpoint (see `endpoints`).
    pub(crate) discovery: bool,
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
    /// The gRPC statuses that count as errors (see `forward::grpc`).
    pub(crate) grpc_error_codes: GrpcCodes,
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
    // The io error is in the message, and deliberately not a `source`: a
    // chain printer (`{:#}`) would say it a second time.
    #[error("cannot read routes file {}: {error}; check the path (flag --routes) and that the ConfigMap is mounted as a directory", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
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
///
/// At most one byte past [`MAX_FILE_BYTES`] is read: enough for [`parse`]
/// to refuse the file as too large, without holding a huge file (or an
/// endless one such as `/dev/zero`) in memory first.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, RoutesError> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut bytes))
        .map_err(|error| RoutesError::Read {
            path: path.to_owned(),
            error,
        })?;
    Ok(bytes)
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
    if bytes.len() > MAX_FILE_BYTES {
        return Err(vec![Problem {
            key: String::new(),
            line: None,
            message: format!(
                "the file is larger than {MAX_FILE_BYTES} bytes (1 MiB, the most a Kubernetes ConfigMap holds); a routes file needs about 60 bytes per version, so check that this is the right file"
            ),
        }]);
    }
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
    // The limits come before anything that costs more than the input's size.
    let beyond = beyond_limits(doc.get_ref(), &lines);
    if !beyond.is_empty() {
        return Err(beyond);
    }
    let mut unknown = unknown_keys(doc.get_ref(), &lines);
    unknown.extend(not_tables(doc.get_ref(), &lines));
    if !unknown.is_empty() {
        unknown.sort_by_key(|p| p.line);
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
    sticky: Option<Spanned<routing::RawSticky>>,
    #[serde(rename = "override")]
    override_: Option<Spanned<routing::RawOverride>>,
    mirror: Option<Spanned<routing::RawMirror>>,
    progress: Option<Spanned<steps::RawProgress>>,
}

/// A table of the routes file whose keys are all read as spanned values and
/// checked by `validate`. The macro writes the key list from the fields, so
/// the keys accepted and the keys suggested ("did you mean") are one list.
macro_rules! raw_table {
    ($(#[$doc:meta])* $vis:vis $name:ident { $($key:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(serde::Deserialize)]
        $vis struct $name {
            $($key: Option<toml::Spanned<toml::Value>>,)+
        }

        impl $name {
            $vis const KEYS: &'static [&'static str] = &[$(stringify!($key)),+];
        }
    };
}

// After the macro: it is in scope by its text's order.
mod routing;
mod steps;
pub(crate) use routing::{Mirror, Override, Sticky, StickyKey};
pub(crate) use steps::ProgressSpec;

raw_table!(
    /// `[versions.NAME]`
    RawVersion { upstream, weight, rewrite_host, protocol, discovery }
);

raw_table!(
    /// `[rollback]`
    RawRollback {
        grpc_error_codes,
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
const TOP_KEYS: &[&str] = &[
    "versions", "rollback", "sticky", "override", "mirror", "progress",
];

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
    // Every version the file names, valid or not: the rollback target is
    // checked against these, so that a target whose own entry is broken is
    // not also called "not a version".
    let declared: Vec<String> = raw_versions.keys().cloned().collect();
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
        let protocol = match raw.protocol {
            None => Protocol::Http1,
            Some(v) => match v.get_ref().as_str() {
                Some("http1") => Protocol::Http1,
                Some("h2c") => Protocol::H2c,
                _ => {
                    problems.add(
                        format!("{key}.protocol"),
                        Some(v.span()),
                        format!("{} is not a protocol; use \"http1\" (HTTP/1.1, the default) or \"h2c\" (HTTP/2 with prior knowledge, for gRPC)", show(v.get_ref())),
                    );
                    Protocol::Http1
                }
            },
        };
        let discovery = match raw.discovery {
            None => false,
            Some(v) => match v.get_ref().as_str() {
                Some("dns") => true,
                Some("none") => false,
                _ => {
                    problems.add(
                        format!("{key}.discovery"),
                        Some(v.span()),
                        format!("{} is not a discovery mode; use \"dns\" (the upstream names a headless Service: balance over every address it resolves to) or leave it out (connect to the upstream as written)", show(v.get_ref())),
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
                protocol,
                discovery,
            });
        }
    }
    if !versions.is_empty() && problems.list.is_empty() && versions.iter().all(|v| v.weight == 0) {
        problems.add("versions", None, "all weights are zero, so no version could take traffic; give at least one version a weight above 0");
    }

    let rollback = raw
        .rollback
        .and_then(|r| validate_rollback(r, &versions, &declared, &mut problems));
    let sticky = raw
        .sticky
        .and_then(|r| routing::validate_sticky(r, &mut problems));
    let override_ = raw
        .override_
        .and_then(|r| routing::validate_override(r, &mut problems));
    let mirror = raw
        .mirror
        .and_then(|r| routing::validate_mirror(r, &versions, &declared, &mut problems));
    let progress = raw.progress.and_then(|r| {
        steps::validate_progress(r, &versions, &declared, rollback.as_ref(), &mut problems)
    });
    if problems.list.is_empty() {
        Ok(RouteTable {
            versions,
            rollback,
            sticky,
            override_,
            mirror,
            progress,
            hash: String::new(),
        })
    } else {
        Err(problems.list)
    }
}

/// A TOML array as strings: strings as they are, anything else (a number)
/// as written, for the code parsers to accept or name; `None` when the
/// value is not an array.
fn list_items(value: &toml::Value) -> Option<Vec<String>> {
    value.as_array().map(|a| {
        a.iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| i.to_string())
            })
            .collect()
    })
}

fn validate_rollback(
    raw: Spanned<RawRollback>,
    versions: &[VersionSpec],
    declared: &[String],
    problems: &mut Problems<'_>,
) -> Option<RollbackPolicy> {
    let span = raw.span();
    let raw = raw.into_inner();
    let target = version_named(
        "rollback.target",
        raw.target.as_ref(),
        span.clone(),
        "the version that takes the traffic of a rolled-back one",
        (versions, declared),
        problems,
    );
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
            let items = list_items(v.get_ref());
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
    let grpc_error_codes = match &raw.grpc_error_codes {
        None => GrpcCodes::default(),
        Some(v) => {
            let items = list_items(v.get_ref());
            match items
                .ok_or_else(|| "must be a list like [\"INTERNAL\", \"UNAVAILABLE\"]".to_string())
                .and_then(|i| GrpcCodes::parse(&i))
            {
                Ok(set) => set,
                Err(why) => {
                    problems.add("rollback.grpc_error_codes", Some(v.span()), why);
                    GrpcCodes::default()
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
        grpc_error_codes,
        trip_odds,
        compare_target,
        latency,
    })
}

/// The index of the version a key names (`rollback.target`,
/// `mirror.version`, `progress.version`), or a problem: missing (at the
/// table), not a string, or not a version ("did you mean", and the
/// choices). A version whose own entry is broken is already reported, so
/// naming it adds nothing.
fn version_named(
    key: &str,
    value: Option<&Spanned<toml::Value>>,
    table: Range<usize>,
    role: &str,
    (versions, declared): (&[VersionSpec], &[String]),
    problems: &mut Problems<'_>,
) -> Option<usize> {
    let names = || {
        declared
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(v) = value else {
        problems.add(
            key,
            Some(table),
            format!("missing; name {role}, one of {}", names()),
        );
        return None;
    };
    let Some(name) = v.get_ref().as_str() else {
        problems.add(
            key,
            Some(v.span()),
            format!("must be a string naming a version, one of {}", names()),
        );
        return None;
    };
    if let Some(i) = versions.iter().position(|x| x.name == name) {
        return Some(i);
    }
    if !declared.iter().any(|d| d == name) {
        let hint = suggest(name, declared.iter().map(String::as_str));
        problems.add(
            key,
            Some(v.span()),
            format!("`{name}` is not a version{hint}; use one of {}", names()),
        );
    }
    None
}

/// A boolean key, `false` when absent; a problem if it is not a boolean.
fn bool_key(v: Option<&Spanned<toml::Value>>, key: &str, problems: &mut Problems<'_>) -> bool {
    match v.map(|v| (v, v.get_ref())) {
        None => false,
        Some((_, toml::Value::Boolean(b))) => *b,
        Some((v, other)) => {
            problems.add(
                key,
                Some(v.span()),
                format!("{} is not a boolean; use true or false", show(other)),
            );
            false
        }
    }
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
    check_port(s, &authority)?;
    if let Some(pq) = uri.path_and_query() {
        if pq.as_str() != "/" && !pq.as_str().is_empty() {
            return Err(format!("\"{s}\" has a path or query (`{pq}`); upstreams are base URLs, the client's path is kept as sent"));
        }
    }
    Ok(Upstream { scheme, authority })
}

/// [`MAX_VERSIONS`], and [`MAX_NAME_LEN`] for each version name and for
/// `rollback.target` (which must be one of them): checked on the spanned
/// document, in time linear in its size, before any "did you mean".
fn beyond_limits(doc: &toml::de::DeTable<'_>, lines: &LineIndex) -> Vec<Problem> {
    let mut out = Vec::new();
    for (k, v) in doc {
        match (k.get_ref().as_ref(), v.get_ref()) {
            ("versions", toml::de::DeValue::Table(versions)) => {
                if let Some((first_extra, _)) = versions.iter().nth(MAX_VERSIONS) {
                    // One problem, at the first version past the limit: the
                    // fix is the same whatever the rest say.
                    out.push(Problem {
                        key: "versions".into(),
                        line: Some(lines.line_of(first_extra.span().start)),
                        message: format!(
                            "{} versions, more than the {MAX_VERSIONS} accepted (a release needs two or three; each version is a metric label, a judgment and an upstream pool); remove the versions that take no traffic",
                            versions.len()
                        ),
                    });
                    return out;
                }
                for (name, _) in versions {
                    let name_len = name.get_ref().len();
                    if name_len > MAX_NAME_LEN {
                        out.push(Problem {
                            key: format!("versions.{}", clip(name.get_ref())),
                            line: Some(lines.line_of(name.span().start)),
                            message: format!(
                                "the version name is {name_len} bytes long, more than the {MAX_NAME_LEN} accepted: it becomes a metric label, so use a DNS label like `stable` or `canary-v2`"
                            ),
                        });
                    }
                }
            }
            ("rollback", toml::de::DeValue::Table(fields)) => {
                for (fk, fv) in fields {
                    if let ("target", toml::de::DeValue::String(target)) =
                        (fk.get_ref().as_ref(), fv.get_ref())
                    {
                        if target.len() > MAX_NAME_LEN {
                            out.push(Problem {
                                key: "rollback.target".into(),
                                line: Some(lines.line_of(fv.span().start)),
                                message: format!(
                                    "\"{}\" ({} bytes) cannot be a version: version names are at most {MAX_NAME_LEN} characters; name the version that takes the traffic of a rolled-back one, like \"stable\"",
                                    clip(target),
                                    target.len()
                                ),
                            });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// At most the first 32 characters of `s`, and "..." if there were more:
/// an oversized value is named in a message, not copied into it whole.
fn clip(s: &str) -> String {
    const SHOWN: usize = 32;
    match s.char_indices().nth(SHOWN) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s.to_string(),
    }
}

/// A port written after the host must be 1 to 65535; with none, the port
/// is 80 (`upstream` connects to `port_u16().unwrap_or(80)`).
///
/// `http::Uri` does not check this: it takes any text after the last ':'
/// (`99999`, `-1`, `0`, nothing), and `port_u16()` reads one that is not a
/// `u16` as no port at all, so `http://svc:99999` would silently go to port
/// 80. Hence the port is read here from the authority's text.
fn check_port(s: &str, authority: &Authority) -> Result<(), String> {
    let text = authority.as_str();
    // An IPv6 host is in brackets and full of ':'; a port comes after them.
    let host_end = text.rfind(']').map_or(0, |i| i + 1);
    let Some(colon) = text[host_end..].rfind(':') else {
        return Ok(());
    };
    let port = &text[host_end + colon + 1..];
    let fix = "use a port from 1 to 65535, like \"http://ping-canary:8080\", or no port for 80";
    if port.is_empty() {
        return Err(format!("\"{s}\" has an empty port after ':'; {fix}"));
    }
    // Digits only: `u16::from_str` would also take a leading '+'.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("\"{s}\": port `{port}` is not a number; {fix}"));
    }
    match port.parse::<u16>() {
        Ok(1..) => Ok(()),
        _ => Err(format!("\"{s}\": port {port} is out of range; {fix}")),
    }
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
            "sticky" | "override" | "mirror" | "progress" => {
                let accepted = match name {
                    "sticky" => routing::RawSticky::KEYS,
                    "override" => routing::RawOverride::KEYS,
                    "mirror" => routing::RawMirror::KEYS,
                    _ => steps::RawProgress::KEYS,
                };
                if let toml::de::DeValue::Table(fields) = v.get_ref() {
                    for (fk, _) in fields {
                        if !accepted.contains(&fk.get_ref().as_ref()) {
                            report(format!("{name}.{}", fk.get_ref()), fk.span(), accepted);
                        }
                    }
                }
            }
            other => report(other.to_string(), k.span(), TOP_KEYS),
        }
    }
    out
}

/// `versions`, each `versions.NAME` and `rollback` must be tables. Serde
/// would also read a struct from an array, by position (`canary =
/// ["http://a:1", 10]` was a valid version), which no doc describes and
/// whose problems could not name the key they are about.
fn not_tables(doc: &toml::de::DeTable<'_>, lines: &LineIndex) -> Vec<Problem> {
    use toml::de::DeValue;
    let mut out = Vec::new();
    let mut report = |key: String, span: Range<usize>, value: &DeValue<'_>, fix: &str| {
        let kind = value.type_str();
        let article = if kind.starts_with(['a', 'i']) {
            "an"
        } else {
            "a"
        };
        out.push(Problem {
            key,
            line: Some(lines.line_of(span.start)),
            message: format!("is {article} {kind} where a table is expected; {fix}"),
        });
    };
    for (k, v) in doc {
        match (k.get_ref().as_ref(), v.get_ref()) {
            ("versions", DeValue::Table(versions)) => {
                for (name, version) in versions {
                    if !version.get_ref().is_table() {
                        report(
                            format!("versions.{}", clip(name.get_ref())),
                            name.span(),
                            version.get_ref(),
                            "write one table per version, like [versions.canary] with upstream = \"http://ping-canary:8080\" and weight = 10",
                        );
                    }
                }
            }
            ("versions", other) => report(
                "versions".into(),
                k.span(),
                other,
                "write one table per version, like [versions.canary] with upstream = \"http://ping-canary:8080\" and weight = 10",
            ),
            ("rollback", other) if !other.is_table() => report(
                "rollback".into(),
                k.span(),
                other,
                "write [rollback] with target = \"stable\" and the keys of docs/routes.md",
            ),
            (name @ ("sticky" | "override" | "mirror" | "progress"), other)
                if !other.is_table() =>
            {
                report(
                name.into(),
                k.span(),
                other,
                    &format!("write [{name}] with the keys of docs/routes.md"),
                )
            }
            _ => {}
        }
    }
    out
}

/// " (did you mean `x`?)" when a known word is close to what was written.
///
/// The edit distance costs the product of the two words' lengths, so a word
/// longer than [`SUGGEST_MAX_LEN`] (no key or version name is that long, so
/// it is no near miss of one) gets no suggestion, and only the first
/// [`SUGGEST_MAX_CANDIDATES`] candidates are considered: at most about a
/// million steps a call, whatever the file.
fn suggest<'a>(written: &str, known: impl Iterator<Item = &'a str>) -> String {
    if written.len() > SUGGEST_MAX_LEN {
        return String::new();
    }
    known
        .take(SUGGEST_MAX_CANDIDATES)
        .filter(|k| k.len() <= SUGGEST_MAX_LEN)
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
                "  {:<16} weight {:>7}  {:>8.3}%  -> {}{}{}{}\n",
                v.name,
                v.weight,
                share,
                v.upstream,
                if v.discovery {
                    " (every address from DNS)"
                } else {
                    ""
                },
                match v.protocol {
                    Protocol::Http1 => "",
                    Protocol::H2c => " over h2c",
                },
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
                out.push_str(&format!(
                    "grpc: calls that end with grpc-status {} are errors too\n",
                    r.grpc_error_codes
                ));
                if let Some(l) = &r.latency {
                    out.push_str(&format!(
                        "latency: also when more than {} of its answers are shown slower than {} (time to the response head; for a gRPC call, to its first message or its trailers)\n",
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
        out.push_str(&routing::describe(
            &self.versions,
            self.sticky.as_ref(),
            self.override_.as_ref(),
            self.mirror.as_ref(),
        ));
        if let Some(p) = &self.progress {
            let steps: Vec<String> = p.steps.iter().map(|s| format!("{s}%")).collect();
            out.push_str(&format!(
                "progress: `{}` steps through {}, each for at least {} and until {} of its answers judged in the step show no regression{}{}; its weight above is replaced by the step's share\n",
                self.versions[p.version].name,
                steps.join(" -> "),
                humantime::format_duration(p.step_time),
                p.min_requests,
                match p.start {
                    Some(t) => format!("; the schedule starts at {}", humantime::format_rfc3339_seconds(t)),
                    None => "; each replica starts the schedule when it reads the file".to_string(),
                },
                if p.paused { " (paused)" } else { "" }
            ));
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

    pub(super) const GOOD: &str = r#"
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

    #[test]
    fn upstream_ports_are_1_to_65535_and_80_when_left_out() {
        // Before issue 15 each of these was accepted, and the out-of-range
        // ones connected to port 80.
        for (upstream, why) in [
            ("http://127.0.0.1:99999", "port 99999 is out of range"),
            ("http://127.0.0.1:65536", "port 65536 is out of range"),
            ("http://ping:0", "port 0 is out of range"),
            ("http://ping:-1", "port `-1` is not a number"),
            ("http://ping:+80", "port `+80` is not a number"),
            ("http://ping:", "has an empty port after ':'"),
            ("http://[::1]:70000", "port 70000 is out of range"),
        ] {
            let p = problems(&format!(
                "[versions.canary]\nupstream = \"{upstream}\"\nweight = 1\n"
            ));
            assert_eq!(p.len(), 1, "{upstream}: {p:?}");
            assert_eq!(
                (p[0].key.as_str(), p[0].line),
                ("versions.canary.upstream", Some(2)),
                "{upstream}"
            );
            let shown = p[0].to_string();
            for fragment in [upstream, why, "1 to 65535", "no port for 80"] {
                assert!(shown.contains(fragment), "{fragment:?} in {shown}");
            }
        }
        // No port is port 80: the upstream pool connects to
        // `port_u16().unwrap_or(80)`.
        for (upstream, port) in [
            ("http://ping:1", Some(1)),
            ("http://ping:65535", Some(65535)),
            ("http://ping:08080", Some(8080)),
            ("http://ping", None),
            ("http://ping/", None),
            ("http://[::1]:8080", Some(8080)),
            ("http://[::1]", None),
        ] {
            let table = parse(
                format!("[versions.canary]\nupstream = \"{upstream}\"\nweight = 1\n").as_bytes(),
            )
            .unwrap_or_else(|p| panic!("{upstream}: {p:?}"));
            assert_eq!(
                table.versions[0].upstream.authority.port_u16(),
                port,
                "{upstream}"
            );
        }
    }

    /// `n` versions named `canary-build-NNNNN` (18 characters, 66 bytes a
    /// version), then a `[rollback]` table with `target`.
    fn many_versions(n: usize, target: &str) -> String {
        let mut text = String::new();
        for i in 0..n {
            text.push_str(&format!(
                "[versions.canary-build-{i:05}]\nupstream = \"http://p:1\"\nweight = 1\n\n"
            ));
        }
        text.push_str(&format!("[rollback]\ntarget = \"{target}\"\n"));
        text
    }

    // The file of issue 15: 230 KB, 2000 versions and a 100 KB
    // `rollback.target`. The old code computed "did you mean" for the target
    // against every version name at full length, 2000 x 18 x 100,000 steps:
    // 6 s in a release build and 2 minutes in a debug one (measured with
    // `check` on this very file). No wall-clock assertion here (speed goals
    // live in bench/): a regression shows up as a hang that the test
    // harness's timeout catches.
    #[test]
    fn the_issue_15_file_is_refused_on_the_version_limit() {
        let text = many_versions(2000, &"x".repeat(100_000));
        assert!((225_000..240_000).contains(&text.len()), "{}", text.len());
        let p = problems(&text);
        assert_eq!(p.len(), 1, "one problem, not one per version: {p:?}");
        // The first version past the limit, the 257th, starts on line 1025.
        assert_eq!((p[0].key.as_str(), p[0].line), ("versions", Some(1025)));
        let shown = p[0].to_string();
        for fragment in ["2000 versions", "more than the 256 accepted"] {
            assert!(shown.contains(fragment), "{fragment:?} in {shown}");
        }
    }

    #[test]
    fn the_version_limit_is_256() {
        let target = "canary-build-00000";
        assert_eq!(
            parse(many_versions(MAX_VERSIONS, target).as_bytes()).map(|t| t.versions.len()),
            Ok(256)
        );
        let p = problems(&many_versions(MAX_VERSIONS + 1, target));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].to_string()
                .contains("257 versions, more than the 256 accepted"),
            "{}",
            p[0]
        );
    }

    // As many versions as allowed, and a target of a million bytes: the old
    // code's suggestion took 256 x 18 x 1,000,000 steps (8 s in a release
    // build, measured; minutes in a debug one); now the target is refused
    // on its length alone.
    #[test]
    fn a_target_longer_than_any_name_is_refused_on_its_length() {
        let text = many_versions(MAX_VERSIONS, &"x".repeat(1_000_000));
        assert!(text.len() <= MAX_FILE_BYTES);
        let p = problems(&text);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].key.as_str(), p[0].line),
            ("rollback.target", Some(4 * MAX_VERSIONS + 2))
        );
        let shown = p[0].to_string();
        for fragment in [
            "(1000000 bytes) cannot be a version",
            "at most 63 characters",
        ] {
            assert!(shown.contains(fragment), "{fragment:?} in {shown}");
        }
        assert!(
            shown.len() < 400,
            "the value is clipped, not copied: {shown}"
        );
    }

    // Two names of 500 KB: the old code compared them in a suggestion,
    // 500,000 x 500,000 edit-distance steps (7 minutes of CPU in a release
    // build, measured). Now both are refused on their length.
    #[test]
    fn a_version_name_longer_than_63_is_refused_on_its_length() {
        let name = "a".repeat(500_000);
        let target = "b".repeat(500_000);
        let text = format!(
            "[versions.{name}]\nupstream = \"http://p:1\"\nweight = 1\n\n[rollback]\ntarget = \"{target}\"\n"
        );
        let p = problems(&text);
        assert_eq!(p.len(), 2, "{p:?}");
        let name_problem = p[0].to_string();
        assert_eq!(p[0].line, Some(1));
        for fragment in [
            "`versions.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...`",
            "500000 bytes long, more than the 63 accepted",
            "DNS label",
        ] {
            assert!(
                name_problem.contains(fragment),
                "{fragment:?} in {name_problem}"
            );
        }
        assert_eq!((p[1].key.as_str(), p[1].line), ("rollback.target", Some(6)));
        assert!(
            name_problem.len() < 400 && p[1].to_string().len() < 400,
            "{p:?}"
        );
        // 63 is still a name, 64 is not.
        let at = |n: usize| {
            parse(
                format!(
                    "[versions.{}]\nupstream = \"http://p:1\"\nweight = 1\n",
                    "a".repeat(n)
                )
                .as_bytes(),
            )
        };
        assert!(at(63).is_ok());
        assert!(at(64).unwrap_err()[0].message.contains("64 bytes long"));
    }

    #[test]
    fn the_file_size_limit_is_1_mib() {
        let valid = "[versions.stable]\nupstream = \"http://p:1\"\nweight = 1\n# ";
        let padded = |len: usize| format!("{valid}{}\n", "x".repeat(len - valid.len() - 1));
        let at_limit = padded(MAX_FILE_BYTES);
        assert_eq!(at_limit.len(), 1 << 20);
        assert!(parse(at_limit.as_bytes()).is_ok());
        let p = problems(&padded(MAX_FILE_BYTES + 1));
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!((p[0].key.as_str(), p[0].line), ("", None));
        for fragment in ["larger than 1048576 bytes", "1 MiB", "ConfigMap"] {
            assert!(p[0].message.contains(fragment), "{fragment:?} in {}", p[0]);
        }
        // Checked before the UTF-8 check: the size is the first thing known.
        assert!(problems_of(&vec![0xff; MAX_FILE_BYTES + 1])[0]
            .message
            .contains("1 MiB"));
    }

    fn problems_of(bytes: &[u8]) -> Vec<Problem> {
        parse(bytes).expect_err("should be invalid")
    }

    #[test]
    fn read_stops_one_byte_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.toml");
        std::fs::write(&path, vec![b'#'; 3 * MAX_FILE_BYTES]).unwrap();
        assert_eq!(read(&path).unwrap().len(), MAX_FILE_BYTES + 1);
        std::fs::write(&path, b"# small").unwrap();
        assert_eq!(read(&path).unwrap(), b"# small");
    }

    // Found by the property tests below: serde reads a struct from an array
    // by position, so `canary = ["http://a:1", 10, false]` was a valid
    // version, and a problem in it named a key that was nowhere written.
    #[test]
    fn versions_and_rollback_must_be_tables_not_arrays() {
        let p = problems("[versions]\ncanary = [\"http://a:1\", 10, false]\n");
        assert_eq!((p[0].key.as_str(), p[0].line), ("versions.canary", Some(2)));
        assert!(
            p[0].message
                .starts_with("is an array where a table is expected"),
            "{}",
            p[0]
        );
        let p = problems("[[versions.a]]\nupstream = \"http://a:1\"\nweight = 1\n\n[[rollback]]\ntarget = \"a\"\n");
        let found: Vec<_> = p.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(found, [("versions.a", Some(1)), ("rollback", Some(5))]);
        let p = problems("versions = 5\n");
        assert_eq!((p[0].key.as_str(), p[0].line), ("versions", Some(1)));
        assert!(p[0].message.starts_with("is an integer where"), "{}", p[0]);
    }

    #[test]
    fn did_you_mean_compares_only_short_words_and_only_so_many() {
        // Typos of keys and names keep their suggestion.
        assert_eq!(
            suggest("wieght", RawVersion::KEYS.iter().copied()),
            " (did you mean `weight`?)"
        );
        assert_eq!(
            suggest("canary-v3", ["stable", "canary-v2"].into_iter()),
            " (did you mean `canary-v2`?)"
        );
        // A word longer than any key or name is not compared at all: a
        // million bytes against 256 names of 63 was 16 billion steps.
        let names: Vec<String> = (0..MAX_VERSIONS).map(|i| format!("{i:0>63}")).collect();
        let huge = "0".repeat(1_000_000);
        assert_eq!(suggest(&huge, names.iter().map(String::as_str)), "");
        // Nor is a candidate that long, however close.
        let word = "a".repeat(SUGGEST_MAX_LEN);
        let near = format!("{word}b");
        assert_eq!(suggest(&word, std::iter::once(near.as_str())), "");
        assert_eq!(
            suggest(&word[1..], std::iter::once(word.as_str())),
            format!(" (did you mean `{word}`?)")
        );
        // Only the first SUGGEST_MAX_CANDIDATES candidates are looked at.
        let far: Vec<String> = (0..SUGGEST_MAX_CANDIDATES)
            .map(|i| format!("zzzzzz{i}"))
            .collect();
        let known = || far.iter().map(String::as_str);
        assert_eq!(suggest("stabel", known().chain(["stable"])), "");
        assert_eq!(
            suggest(
                "stabel",
                known().take(SUGGEST_MAX_CANDIDATES - 1).chain(["stable"])
            ),
            " (did you mean `stable`?)"
        );
    }
}

/// Property tests of [`parse`], the one function behind `check`, start-up and
/// reload: on arbitrary bytes, arbitrary text and near-valid TOML it never
/// panics, and every problem it reports says where it is.
///
/// Runtime is bounded by the case counts (a few thousand parses of inputs
/// of at most a few KB), not by a clock. A failure prints the smallest
/// input proptest found: add it to `tests` above as a plain case. Failures
/// are not persisted to files in the source tree.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn config(cases: u32) -> ProptestConfig {
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// The problems about the file as a whole rather than a place in it:
    /// these, and only these, come without a line. Too large, not UTF-8 and
    /// empty; no versions at all, and all weights zero (a property of every
    /// version together). Everything else is about a key that is in the file
    /// or about TOML syntax, and names its line.
    fn is_whole_file(p: &Problem) -> bool {
        let starts = |prefixes: &[&str]| prefixes.iter().any(|s| p.message.starts_with(s));
        match p.key.as_str() {
            "" => starts(&["the file is larger than", "not UTF-8", "the file is empty"]),
            "versions" => starts(&["no versions", "all weights are zero"]),
            _ => false,
        }
    }

    /// What any outcome of `parse` must satisfy.
    fn check_outcome(bytes: &[u8]) -> Result<(), TestCaseError> {
        match parse(bytes) {
            Ok(table) => {
                prop_assert!((1..=MAX_VERSIONS).contains(&table.versions.len()));
                prop_assert!(table.total_weight() > 0);
                for v in &table.versions {
                    prop_assert!(check_dns_label(&v.name).is_ok(), "{}", v.name);
                    prop_assert!(v.weight <= MAX_WEIGHT);
                    // The port connected to is the one written, or 80
                    // when none is: never a written one read as none.
                    let authority = v.upstream.authority.as_str();
                    let host_end = authority.rfind(']').map_or(0, |i| i + 1);
                    match v.upstream.authority.port_u16() {
                        Some(port) => prop_assert!(port >= 1, "{}", authority),
                        None => prop_assert!(!authority[host_end..].contains(':'), "{}", authority),
                    }
                }
                if let Some(r) = &table.rollback {
                    prop_assert!(r.target < table.versions.len());
                }
                prop_assert_eq!(table.hash, content_hash(bytes));
            }
            Err(problems) => {
                prop_assert!(!problems.is_empty());
                // Lines are numbered from 1; a span at the very end of the
                // file is on the line after its last newline.
                let lines = bytes.iter().filter(|b| **b == b'\n').count() + 1;
                for p in &problems {
                    let shown = p.to_string();
                    prop_assert!(!p.message.is_empty());
                    if is_whole_file(p) {
                        prop_assert_eq!(p.line, None, "{}", shown);
                        prop_assert!(!shown.starts_with("line "), "{}", shown);
                    } else {
                        let Some(line) = p.line else {
                            return Err(TestCaseError::fail(format!("no line: {shown}")));
                        };
                        prop_assert!(
                            (1..=lines).contains(&line),
                            "line {} of {}: {}",
                            line,
                            lines,
                            shown
                        );
                        let prefix = format!("line {line}: ");
                        prop_assert!(shown.starts_with(&prefix), "{}", shown);
                        prop_assert!(names_its_line(bytes, p, line), "{}", shown);
                    }
                }
            }
        }
        Ok(())
    }

    /// The line a problem gives is where its key is written: the line
    /// holds the key's last part (`weight` for `versions.canary.weight`),
    /// or for a missing key, the table it is missing from. Checked where
    /// that part is a bare key, so that it appears in the file as is.
    fn names_its_line(bytes: &[u8], p: &Problem, line: usize) -> bool {
        let mut parts = p.key.rsplit('.');
        let (last, parent) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let written = if p.message.starts_with("missing") {
            parent
        } else {
            last
        };
        let bare = |k: &str| {
            !k.is_empty()
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if !bare(written) {
            return true;
        }
        let text = bytes
            .split(|b| *b == b'\n')
            .nth(line - 1)
            .unwrap_or_default();
        String::from_utf8_lossy(text).contains(written)
    }

    // ---- near-valid TOML, built from the real keys ----

    /// Every key the file accepts, at any level.
    fn real_keys() -> Vec<&'static str> {
        [TOP_KEYS, RawVersion::KEYS, RawRollback::KEYS].concat()
    }

    /// A real key, a near miss of one (a letter dropped, doubled, swapped or
    /// replaced), or a word of its own.
    fn key() -> impl Strategy<Value = String> {
        let typo = (
            prop::sample::select(real_keys()),
            any::<prop::sample::Index>(),
            0..4u8,
            prop::char::range('a', 'z'),
        )
            .prop_map(|(k, at, how, c)| {
                let mut k: Vec<char> = k.chars().collect();
                let i = at.index(k.len());
                match how {
                    0 => {
                        k.remove(i);
                    }
                    1 => k.insert(i, k[i]),
                    2 if i + 1 < k.len() => k.swap(i, i + 1),
                    _ => k[i] = c,
                }
                k.into_iter().collect()
            });
        prop_oneof![
            4 => prop::sample::select(real_keys()).prop_map(str::to_string),
            3 => typo,
            1 => "[a-z_]{1,12}",
            1 => "[ -~]{0,16}",
        ]
    }

    /// A key as TOML writes it: bare when it can be, quoted otherwise.
    fn render_key(k: &str) -> String {
        let bare = !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if bare {
            k.to_string()
        } else {
            toml::Value::String(k.to_string()).to_string()
        }
    }

    /// A version name: good ones, ones the DNS-label rule refuses, and ones
    /// past the length limit.
    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["stable", "canary", "canary-v2", "blue", "green"])
                .prop_map(str::to_string),
            2 => "[a-z0-9][a-z0-9-]{0,8}",
            1 => "[A-Za-z0-9_.-]{0,70}",
        ]
    }

    fn quoted(s: &str) -> String {
        toml::Value::String(s.to_string()).to_string()
    }

    /// A value of any TOML type, often one a key of the file accepts.
    fn value() -> impl Strategy<Value = String> {
        let strings = prop::sample::select(vec![
            "http://ping-canary:8080",
            "http://127.0.0.1:99999",
            "http://ping:0",
            "http://ping:-1",
            "http://ping:",
            "http://[::1]:8080",
            "http://ping",
            "https://ping:8443",
            "ftp://files:21",
            "http://ping:8080/api",
            "http://user@ping:1",
            "ping:8080",
            "30s",
            "250ms",
            "2h",
            "0s",
            "forever",
            "5xx",
            "429",
            "6xx",
            "stable",
            "canary",
            "stabel",
            "",
        ]);
        let leaf = prop_oneof![
            4 => strings.prop_map(quoted),
            1 => "[ -~]{0,24}".prop_map(|s| quoted(&s)),
            2 => (-5i64..2_000_000).prop_map(|i| i.to_string()),
            1 => any::<i64>().prop_map(|i| i.to_string()),
            1 => prop::sample::select(vec![
                "0.0", "0.05", "1.0", "1.5", "-0.1", "1e5", "1e12", "1e13", "nan", "inf", "-inf",
            ])
            .prop_map(str::to_string),
            1 => (0.0f64..2.0).prop_map(|f| format!("{f:?}")),
            1 => any::<bool>().prop_map(|b| b.to_string()),
            1 => Just("1979-05-27T07:32:00Z".to_string()),
        ];
        leaf.prop_recursive(2, 12, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|items| format!("[{}]", items.join(", "))),
                prop::collection::vec((key(), inner), 0..3).prop_map(|pairs| {
                    let pairs: Vec<String> = pairs
                        .iter()
                        .map(|(k, v)| format!("{} = {v}", render_key(k)))
                        .collect();
                    format!("{{ {} }}", pairs.join(", "))
                }),
            ]
        })
    }

    /// Up to `n` lines `key = value`, none most of the time: a stray key
    /// is an unknown-key problem, reported alone, which would hide the rest.
    fn entries(keys: impl Strategy<Value = String>, n: usize) -> impl Strategy<Value = String> {
        let lines = prop::collection::vec((keys, value()), 1..=n).prop_map(|pairs| {
            pairs
                .iter()
                .map(|(k, v)| format!("{} = {v}\n", render_key(k)))
                .collect::<String>()
        });
        prop::option::weighted(0.06, lines).prop_map(Option::unwrap_or_default)
    }

    /// The value of `key`, mostly one it accepts, sometimes anything.
    fn value_for(good: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![12 => prop::sample::select(good).prop_map(str::to_string), 1 => value()]
    }

    const UPSTREAMS: &[&str] = &[
        "\"http://ping-stable:8080\"",
        "\"http://ping-canary:8080\"",
        "\"http://127.0.0.1:1\"",
        "\"http://[::1]:65535\"",
        "\"http://ping\"",
    ];
    const BAD_PORTS: &[&str] = &[
        "http://ping:0",
        "http://ping:99999",
        "http://ping:-1",
        "http://ping:",
        "http://[::1]:65536",
    ];
    const WEIGHTS: &[&str] = &["0", "1", "10", "90", "9999", "1000000"];

    /// A `[versions.NAME]` table as (name, text), usually with its two
    /// required keys.
    fn version_table() -> impl Strategy<Value = (String, String)> {
        (
            name(),
            prop::option::weighted(
                0.95,
                prop_oneof![
                    12 => value_for(UPSTREAMS),
                    1 => prop::sample::select(BAD_PORTS).prop_map(quoted),
                ],
            ),
            prop::option::weighted(0.95, value_for(WEIGHTS)),
            prop::option::weighted(0.2, value_for(&["true", "false"])),
            entries(key(), 2),
        )
            .prop_map(|(name, upstream, weight, rewrite_host, rest)| {
                let mut t = format!("[versions.{}]\n", render_key(&name));
                for (k, v) in [
                    ("upstream", upstream),
                    ("weight", weight),
                    ("rewrite_host", rewrite_host),
                ] {
                    if let Some(v) = v {
                        t.push_str(&format!("{k} = {v}\n"));
                    }
                }
                (name, t + &rest)
            })
    }

    /// A `[rollback]` table: usually a target, then some of its keys.
    fn rollback_table() -> impl Strategy<Value = String> {
        let good: &[(&str, &[&str])] = &[
            ("error_rate", &["0.05", "1", "0.5", "1e-3"]),
            ("min_requests", &["1", "10", "50"]),
            ("window", &["\"30s\"", "\"1h\"", "\"1s\""]),
            (
                "error_codes",
                &["[\"5xx\"]", "[\"5xx\", \"429\"]", "[\"1XX\", \"599\"]"],
            ),
            ("slower_than", &["\"250ms\"", "\"1ms\"", "\"1h\""]),
            ("slow_rate", &["0.01", "0.5"]),
            ("trip_odds", &["100", "1e5", "1e12"]),
            ("compare_target", &["true", "false"]),
        ];
        let keys: Vec<_> = good
            .iter()
            .map(|(k, values)| {
                prop::option::weighted(0.3, value_for(values))
                    .prop_map(move |v| v.map(|v| format!("{k} = {v}\n")).unwrap_or_default())
            })
            .collect();
        (prop::option::weighted(0.9, name()), keys, entries(key(), 2)).prop_map(
            |(target, keys, rest)| {
                let target = target.map(|t| format!("target = {}\n", quoted(&t)));
                format!(
                    "[rollback]\n{}{}{rest}",
                    target.unwrap_or_default(),
                    keys.concat()
                )
            },
        )
    }

    /// Any other table header: a typo of a real one, `[versions]` itself,
    /// an array of tables, or nonsense.
    fn other_table() -> impl Strategy<Value = String> {
        let header = prop_oneof![
            key().prop_map(|k| format!("[{}]", render_key(&k))),
            (key(), name()).prop_map(|(k, n)| format!("[{}.{}]", render_key(&k), render_key(&n))),
            Just("[versions]".to_string()),
            name().prop_map(|n| format!("[[versions.{}]]", render_key(&n))),
            Just("[[rollback]]".to_string()),
        ];
        (header, entries(key(), 3)).prop_map(|(h, rest)| format!("{h}\n{rest}"))
    }

    /// A whole file: perhaps top-level keys, then one to four versions (of
    /// distinct names, as a real file has), perhaps a `[rollback]`, perhaps
    /// another table, in any order; sometimes one table twice.
    fn document() -> impl Strategy<Value = String> {
        (
            entries(key(), 2),
            prop::collection::vec(version_table(), 1..5),
            prop::option::weighted(0.6, rollback_table()),
            prop::option::weighted(0.1, other_table()),
            prop::option::weighted(0.1, any::<prop::sample::Index>()),
        )
            .prop_flat_map(|(top, versions, rollback, other, duplicate)| {
                let mut seen = std::collections::HashSet::new();
                let mut tables: Vec<String> = versions
                    .into_iter()
                    .filter(|(name, _)| seen.insert(name.clone()))
                    .map(|(_, text)| text)
                    .chain(rollback)
                    .chain(other)
                    .collect();
                if let Some(at) = duplicate {
                    tables.push(tables[at.index(tables.len())].clone());
                }
                (Just(top), Just(tables).prop_shuffle())
            })
            .prop_map(|(top, tables)| format!("{top}\n{}", tables.join("\n")))
    }

    // Case counts: all of these together take about 6 s in a debug build
    // on a 2-core machine, most of it generating near-valid files.
    proptest! {
        #![proptest_config(config(8000))]

        #[test]
        fn near_valid_toml(text in document()) {
            check_outcome(text.as_bytes())?;
        }
    }

    proptest! {
        #![proptest_config(config(4000))]

        #[test]
        fn any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            check_outcome(&bytes)?;
        }

        #[test]
        fn any_text(text in any::<String>()) {
            check_outcome(text.as_bytes())?;
        }

        #[test]
        fn text_of_toml_characters(text in "[\\[\\]{}.=\"'a-z0-9_ \n\t,#:/+-]{0,300}") {
            check_outcome(text.as_bytes())?;
        }

        /// A valid file with a few bytes changed, inserted or removed.
        #[test]
        fn a_valid_file_mutated(edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0..3u8), 1..6)) {
            let mut bytes = tests::GOOD.as_bytes().to_vec();
            for (at, byte, how) in edits {
                let i = at.index(bytes.len());
                match how {
                    0 => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => {
                        bytes.remove(i);
                    }
                }
            }
            check_outcome(&bytes)?;
        }
    }
}
