//! The routing tables of the routes file: `[sticky]`, `[override]` and
//! `[mirror]` (docs/routing.md). Each is optional; each is read from loose
//! raw values into a domain type, or into problems that name the key, its
//! line and the fix, as the rest of the file is.

use std::time::Duration;

use http::{HeaderName, Method};
use ipnet::IpNet;
use toml::Spanned;

use super::{bool_key, number, show, version_named, Problems, VersionSpec};

/// Max-Age of the cookie `set_cookie` gives, by default: a week covers a
/// canary's life; the key only has to outlive the release.
const DEFAULT_COOKIE_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// RFC 6265bis caps a cookie's lifetime at 400 days; browsers clamp to it.
const MAX_COOKIE_MAX_AGE: Duration = Duration::from_secs(400 * 24 * 3600);

/// A copy's body is buffered whole before it is sent; 64 KiB covers the
/// JSON bodies of most APIs.
const DEFAULT_MIRROR_MAX_BODY: u64 = 64 * 1024;
/// With `MAX_MIRROR_IN_FLIGHT`, the most copies can hold: 1 GiB.
const MAX_MIRROR_MAX_BODY: u64 = 1024 * 1024;
const DEFAULT_MIRROR_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_MIRROR_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MIRROR_IN_FLIGHT: u64 = 64;
const MAX_MIRROR_IN_FLIGHT: u64 = 1024;

/// `[sticky]`: what keys a request to its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sticky {
    pub(crate) key: StickyKey,
    /// `set_cookie = true` (cookie keys only): a request without the
    /// cookie gets a random key, and its answer sets the cookie for this
    /// long.
    pub(crate) set_cookie: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StickyKey {
    Header(HeaderName),
    Cookie(String),
    ClientAddress,
}

/// `[override]`: a header that names the version, for testing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Override {
    pub(crate) header: HeaderName,
    /// Send the header on to the upstream (default: removed).
    pub(crate) forward_header: bool,
    /// Only clients in these networks may use it; empty: any client.
    pub(crate) allow_from: Vec<IpNet>,
}

/// `[mirror]`: copies of a share of the other versions' requests.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Mirror {
    /// Index into the versions of the version that gets the copies.
    pub(crate) version: usize,
    pub(crate) share: f64,
    pub(crate) methods: Vec<Method>,
    pub(crate) max_body: u64,
    pub(crate) timeout: Duration,
    pub(crate) max_in_flight: u64,
}

raw_table!(
    /// `[sticky]`
    pub(super) RawSticky { header, cookie, client_address, set_cookie, max_age }
);

raw_table!(
    /// `[override]`
    pub(super) RawOverride { header, forward_header, allow_from }
);

raw_table!(
    /// `[mirror]`
    pub(super) RawMirror { version, share, methods, max_body, timeout, max_in_flight }
);

pub(super) fn validate_sticky(
    raw: Spanned<RawSticky>,
    problems: &mut Problems<'_>,
) -> Option<Sticky> {
    let span = raw.span();
    let raw = raw.into_inner();
    let forms =
        "set exactly one of header = \"x-user-id\", cookie = \"NAME\" or client_address = true";
    let mut keys = Vec::new();
    if let Some(v) = &raw.header {
        match v.get_ref().as_str().map(header_name) {
            Some(Ok(name)) => keys.push(StickyKey::Header(name)),
            Some(Err(why)) => problems.add("sticky.header", Some(v.span()), why),
            None => problems.add(
                "sticky.header",
                Some(v.span()),
                format!(
                    "{} is not a string; name a request header, like header = \"x-user-id\"",
                    show(v.get_ref())
                ),
            ),
        }
    }
    if let Some(v) = &raw.cookie {
        match v.get_ref().as_str() {
            Some(name) if is_cookie_name(name) => keys.push(StickyKey::Cookie(name.to_owned())),
            _ => problems.add("sticky.cookie", Some(v.span()), format!("{} is not a cookie name; use letters, digits and '-' or '_', like cookie = \"canary-key\"", show(v.get_ref()))),
        }
    }
    if let Some(v) = &raw.client_address {
        match v.get_ref() {
            toml::Value::Boolean(true) => keys.push(StickyKey::ClientAddress),
            // `false` says "not this form"; it is no key, and no error.
            toml::Value::Boolean(false) => {}
            other => problems.add(
                "sticky.client_address",
                Some(v.span()),
                format!(
                    "{} is not a boolean; use client_address = true",
                    show(other)
                ),
            ),
        }
    }
    let set_cookie = bool_key(raw.set_cookie.as_ref(), "sticky.set_cookie", problems);
    let max_age = match &raw.max_age {
        None => DEFAULT_COOKIE_MAX_AGE,
        Some(v) => match duration(v, Duration::from_secs(1), MAX_COOKIE_MAX_AGE) {
            Some(d) => d,
            None => {
                problems.add("sticky.max_age", Some(v.span()), format!("{} is not accepted; use a duration from \"1s\" to \"400d\" (browsers keep a cookie at most 400 days), like \"7d\"", show(v.get_ref())));
                DEFAULT_COOKIE_MAX_AGE
            }
        },
    };
    let key = match keys.len() {
        1 => keys.pop(),
        // Each form that was written is valid or already reported.
        0 if raw.header.is_some() || raw.cookie.is_some() => None,
        0 => {
            problems.add("sticky", Some(span), format!("no key; {forms}"));
            None
        }
        _ => {
            problems.add("sticky", Some(span), format!("more than one key; {forms}"));
            None
        }
    }?;
    let cookie_key = matches!(key, StickyKey::Cookie(_));
    if set_cookie && !cookie_key {
        let v = raw.set_cookie.as_ref().expect("set_cookie was read");
        problems.add("sticky.set_cookie", Some(v.span()), "works only with cookie = \"NAME\" (the cookie it sets is that one); remove set_cookie, or key by a cookie");
    }
    if let (Some(v), false) = (&raw.max_age, set_cookie) {
        problems.add(
            "sticky.max_age",
            Some(v.span()),
            "has no effect without set_cookie = true; add it, or remove max_age",
        );
    }
    Some(Sticky {
        key,
        set_cookie: (set_cookie && cookie_key).then_some(max_age),
    })
}

pub(super) fn validate_override(
    raw: Spanned<RawOverride>,
    problems: &mut Problems<'_>,
) -> Option<Override> {
    let span = raw.span();
    let raw = raw.into_inner();
    let header = match &raw.header {
        None => {
            problems.add(
                "override.header",
                Some(span),
                "missing; name the request header that picks the version, like header = \"x-canary-version\"",
            );
            None
        }
        Some(v) => match v.get_ref().as_str().map(header_name) {
            Some(Ok(name)) => Some(name),
            Some(Err(why)) => {
                problems.add("override.header", Some(v.span()), why);
                None
            }
            None => {
                problems.add("override.header", Some(v.span()), format!("{} is not a string; name a request header, like header = \"x-canary-version\"", show(v.get_ref())));
                None
            }
        },
    };
    let forward_header = bool_key(
        raw.forward_header.as_ref(),
        "override.forward_header",
        problems,
    );
    let mut allow_from = Vec::new();
    if let Some(v) = &raw.allow_from {
        let fix = "use a list of networks in CIDR form, like allow_from = [\"10.0.0.0/8\", \"192.168.1.7/32\"]";
        match v.get_ref().as_array() {
            Some(items) if !items.is_empty() => {
                for item in items {
                    match item.as_str().map(|s| s.trim().parse::<IpNet>()) {
                        Some(Ok(net)) => allow_from.push(net.trunc()),
                        _ => problems.add(
                            "override.allow_from",
                            Some(v.span()),
                            format!("{} is not a network; {fix}", show(item)),
                        ),
                    }
                }
            }
            Some(_) => problems.add("override.allow_from", Some(v.span()), format!("is empty, which would let no client use the header; {fix}, or remove allow_from to let any client")),
            None => problems.add("override.allow_from", Some(v.span()), format!("{} is not a list; {fix}", show(v.get_ref()))),
        }
    }
    Some(Override {
        header: header?,
        forward_header,
        allow_from,
    })
}

pub(super) fn validate_mirror(
    raw: Spanned<RawMirror>,
    versions: &[VersionSpec],
    declared: &[String],
    problems: &mut Problems<'_>,
) -> Option<Mirror> {
    let span = raw.span();
    let raw = raw.into_inner();
    let version = version_named(
        "mirror.version",
        raw.version.as_ref(),
        span.clone(),
        "the version that gets the copies",
        (versions, declared),
        problems,
    );
    let share = match &raw.share {
        None => {
            problems.add("mirror.share", Some(span), "missing; set the share of the other versions' requests to copy, from 0 to 1, like share = 0.05 for 5%");
            None
        }
        Some(v) => match number(v.get_ref()) {
            Some(x) if (0.0..=1.0).contains(&x) => Some(x),
            _ => {
                problems.add(
                    "mirror.share",
                    Some(v.span()),
                    format!(
                        "{} is out of range; use a fraction from 0 to 1, like 0.05 for 5%",
                        show(v.get_ref())
                    ),
                );
                None
            }
        },
    };
    let methods = match &raw.methods {
        None => vec![Method::GET, Method::HEAD, Method::OPTIONS],
        Some(v) => {
            let fix = "use a list of HTTP methods in capitals, like methods = [\"GET\", \"HEAD\", \"OPTIONS\"] (the default)";
            match v.get_ref().as_array() {
                Some(items) if !items.is_empty() => items
                    .iter()
                    .filter_map(|item| match item.as_str() {
                        Some(m) if is_method(m) => Method::from_bytes(m.as_bytes()).ok(),
                        _ => {
                            problems.add(
                                "mirror.methods",
                                Some(v.span()),
                                format!("{} is not an HTTP method; {fix}", show(item)),
                            );
                            None
                        }
                    })
                    .collect(),
                Some(_) => {
                    problems.add(
                        "mirror.methods",
                        Some(v.span()),
                        format!("is empty, so nothing would be copied; {fix}, or set share = 0"),
                    );
                    Vec::new()
                }
                None => {
                    problems.add(
                        "mirror.methods",
                        Some(v.span()),
                        format!("{} is not a list; {fix}", show(v.get_ref())),
                    );
                    Vec::new()
                }
            }
        }
    };
    let max_body = int_key(
        &raw.max_body,
        "mirror.max_body",
        (0, MAX_MIRROR_MAX_BODY),
        DEFAULT_MIRROR_MAX_BODY,
        "bytes from 0 (bodiless requests only) to 1048576 (1 MiB), like 65536 (the default)",
        problems,
    );
    let timeout = match &raw.timeout {
        None => DEFAULT_MIRROR_TIMEOUT,
        Some(v) => match duration(v, Duration::from_millis(1), MAX_MIRROR_TIMEOUT) {
            Some(d) => d,
            None => {
                problems.add("mirror.timeout", Some(v.span()), format!("{} is not accepted; use a duration from \"1ms\" to \"60s\", like \"5s\" (the default)", show(v.get_ref())));
                DEFAULT_MIRROR_TIMEOUT
            }
        },
    };
    let max_in_flight = int_key(
        &raw.max_in_flight,
        "mirror.max_in_flight",
        (1, MAX_MIRROR_IN_FLIGHT),
        DEFAULT_MIRROR_IN_FLIGHT,
        "an integer from 1 to 1024, like 64 (the default)",
        problems,
    );
    Some(Mirror {
        version: version?,
        share: share?,
        methods,
        max_body,
        timeout,
        max_in_flight,
    })
}

/// A header name as a request carries it; hyper keeps names in lower case.
fn header_name(s: &str) -> Result<HeaderName, String> {
    match HeaderName::from_bytes(s.trim().as_bytes()) {
        Ok(name) if !s.trim().is_empty() => Ok(name),
        _ => Err(format!(
            "\"{s}\" is not a header name; use letters, digits and '-', like \"x-user-id\""
        )),
    }
}

/// A cookie name: an RFC 9110 token (RFC 6265 4.1.1).
fn is_cookie_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(is_tchar)
}

/// A method: a token too (RFC 9110 9.1); in capitals, as they are sent.
fn is_method(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.bytes().all(|b| is_tchar(b) && !b.is_ascii_lowercase())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn int_key(
    v: &Option<Spanned<toml::Value>>,
    key: &str,
    (min, max): (u64, u64),
    default: u64,
    what: &str,
    problems: &mut Problems<'_>,
) -> u64 {
    match v {
        None => default,
        Some(v) => match v.get_ref() {
            toml::Value::Integer(i) if (min as i64..=max as i64).contains(i) => *i as u64,
            other => {
                problems.add(
                    key,
                    Some(v.span()),
                    format!("{} is out of range; use {what}", show(other)),
                );
                default
            }
        },
    }
}

fn duration(v: &Spanned<toml::Value>, min: Duration, max: Duration) -> Option<Duration> {
    let d = humantime::parse_duration(v.get_ref().as_str()?).ok()?;
    (min..=max).contains(&d).then_some(d)
}

/// The lines `check` prints for the routing tables.
pub(super) fn describe(
    versions: &[VersionSpec],
    sticky: Option<&Sticky>,
    override_: Option<&Override>,
    mirror: Option<&Mirror>,
) -> String {
    let mut out = String::new();
    match sticky {
        None => out.push_str("sticky: off (each request is split at random)\n"),
        Some(s) => {
            let key = match &s.key {
                StickyKey::Header(h) => format!("value of the request header `{h}`"),
                StickyKey::Cookie(c) => format!("value of the cookie `{c}`"),
                StickyKey::ClientAddress => "client IP address".to_string(),
            };
            out.push_str(&format!(
                "sticky: requests with the same {key} go to the same version while the weights stay{}\n",
                match s.set_cookie {
                    Some(age) => format!(
                        "; a request without it gets a random key, set as a cookie for {}",
                        humantime::format_duration(age)
                    ),
                    None => "; requests without it are split at random".to_string(),
                }
            ));
        }
    }
    if let Some(o) = override_ {
        out.push_str(&format!(
            "override: a request whose `{}` header names a version goes to it (unless rolled back){}{}\n",
            o.header,
            if o.allow_from.is_empty() {
                ", from any client".to_string()
            } else {
                let nets: Vec<String> = o.allow_from.iter().map(|n| n.to_string()).collect();
                format!(", from clients in {}", nets.join(", "))
            },
            if o.forward_header {
                "; the header is passed on"
            } else {
                "; the header is removed before the upstream"
            }
        ));
    }
    if let Some(m) = mirror {
        let methods: Vec<&str> = m.methods.iter().map(|m| m.as_str()).collect();
        out.push_str(&format!(
            "mirror: a copy of {}% of the other versions' {} requests goes to `{}` (bodies up to {} bytes, at most {} in flight, {} each); its answers are judged and dropped\n",
            m.share * 100.0,
            methods.join("/"),
            versions[m.version].name,
            m.max_body,
            m.max_in_flight,
            humantime::format_duration(m.timeout)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{parse, tests::GOOD, Problem};
    use super::*;

    fn problems(extra: &str) -> Vec<Problem> {
        parse(format!("{GOOD}\n{extra}").as_bytes()).expect_err("should be invalid")
    }

    fn table(extra: &str) -> super::super::RouteTable {
        parse(format!("{GOOD}\n{extra}").as_bytes()).expect("valid")
    }

    #[test]
    fn each_sticky_form_parses() {
        let t = table("[sticky]\nheader = \"X-User-Id\"\n");
        assert_eq!(
            t.sticky.unwrap().key,
            StickyKey::Header(HeaderName::from_static("x-user-id"))
        );
        let t = table("[sticky]\ncookie = \"k\"\nset_cookie = true\nmax_age = \"1h\"\n");
        let s = t.sticky.unwrap();
        assert_eq!(
            (s.key, s.set_cookie),
            (
                StickyKey::Cookie("k".into()),
                Some(Duration::from_secs(3600))
            )
        );
        let t = table("[sticky]\nclient_address = true\n");
        assert_eq!(t.sticky.unwrap().key, StickyKey::ClientAddress);
    }

    #[test]
    fn sticky_needs_exactly_one_key_and_set_cookie_a_cookie() {
        let p = problems("[sticky]\nheader = \"a\"\ncookie = \"b\"\n");
        assert_eq!(p[0].key, "sticky");
        assert!(p[0].message.contains("more than one key"), "{}", p[0]);
        let p = problems("[sticky]\nset_cookie = true\n");
        assert!(
            p[0].message.contains("no key; set exactly one of"),
            "{}",
            p[0]
        );
        let p = problems("[sticky]\nheader = \"x-user-id\"\nset_cookie = true\n");
        assert_eq!(p[0].key, "sticky.set_cookie");
        let p = problems("[sticky]\ncookie = \"a b\"\n");
        assert_eq!((p[0].key.as_str(), p[0].line), ("sticky.cookie", Some(17)));
        let p = problems("[sticky]\ncookie = \"k\"\nset_cookie = true\nmax_age = \"500d\"\n");
        assert!(p[0].message.contains("400d"), "{}", p[0]);
        let p = problems("[sticky]\nheadr = \"x\"\n");
        assert!(p[0].message.contains("did you mean `header`"), "{}", p[0]);
    }

    #[test]
    fn override_keys_are_checked() {
        let t = table("[override]\nheader = \"x-canary-version\"\nallow_from = [\"10.1.2.3/8\", \"::1/128\"]\n");
        let o = t.override_.unwrap();
        assert_eq!(o.allow_from[0].to_string(), "10.0.0.0/8");
        assert!(!o.forward_header);
        let p = problems("[override]\nallow_from = [\"10.0.0.0/33\"]\n");
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["override.header", "override.allow_from"]);
        let p = problems("[override]\nheader = \"x\"\nallow_from = []\n");
        assert!(p[0].message.contains("is empty"), "{}", p[0]);
        let p = parse(format!("override = 1\n{GOOD}").as_bytes()).unwrap_err();
        assert!(
            p[0].message.contains("where a table is expected"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn mirror_keys_are_checked() {
        let t = table("[mirror]\nversion = \"canary\"\nshare = 0.05\n");
        let m = t.mirror.unwrap();
        assert_eq!((m.version, m.share, m.max_body), (1, 0.05, 65536));
        assert_eq!(m.methods, [Method::GET, Method::HEAD, Method::OPTIONS]);
        let p = problems("[mirror]\nversion = \"canry\"\nshare = 2\n");
        assert!(p[0].message.contains("did you mean `canary`"), "{}", p[0]);
        assert_eq!(p[1].key, "mirror.share");
        let p = problems("[mirror]\nversion = \"canary\"\nshare = 0.1\nmethods = [\"get\"]\nmax_body = 2000000\nmax_in_flight = 0\ntimeout = \"2m\"\n");
        let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "mirror.methods",
                "mirror.max_body",
                "mirror.timeout",
                "mirror.max_in_flight"
            ]
        );
        let p = problems("[mirror]\nshare = 0.1\n");
        assert!(
            p[0].message.contains("one of `stable`, `canary`"),
            "{}",
            p[0]
        );
    }
}
