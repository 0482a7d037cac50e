//! Which host a request is for, and the requests the proxy refuses to
//! forward. A refused request is answered by the proxy itself (see
//! `answer`), never reaches a version and never counts against one.
//!
//! The rules, in the order they are checked:
//! - `CONNECT` asks the proxy to open a tunnel to the host it names (RFC
//!   9110 section 9.3.6). A reverse proxy in front of two versions of one
//!   service has no such tunnels, for any target, so it answers `501 Not
//!   Implemented` (RFC 9110 15.6.2: the method is not supported for any
//!   resource) rather than `405`, whose `Allow` header would have to list
//!   every other method as allowed.
//! - A request with more than one `Host` line, or a `Host` that is not
//!   `host[:port]`, is `400` (RFC 9112 section 3.2: a server MUST answer 400
//!   to any such request). So is an HTTP/1.1 request with no `Host` at all
//!   (same section); HTTP/1.0 may leave it out.
//! - An absolute-form target (`GET http://example.com/ HTTP/1.1`) names the
//!   host itself, and the `Host` header is ignored (RFC 9112 3.2.2: a server
//!   MUST ignore Host then). Its scheme must be `http` or `https` and its
//!   authority `host[:port]`, without the `user@` part that RFC 9110 4.2.4
//!   asks a recipient to treat as an error: else `400`.
//! - HTTP/2 names the host in `:authority` (hyper puts it in the URI); a
//!   `Host` header beside it must name the same host (RFC 9113 8.3.1), or the
//!   request is malformed: `400`.
//!
//! An empty `Host` is valid (RFC 9112 3.2 lets a client send one when the
//! target has no authority): the request is forwarded as if it had none.

use std::net::Ipv6Addr;

use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Version};

use crate::metrics::ClientErrorKind;

/// Why the proxy refuses to forward a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Connect,
    MissingHost,
    DuplicateHost,
    InvalidHost,
    InvalidTarget,
    HostMismatch,
}

impl Refusal {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Refusal::Connect => StatusCode::NOT_IMPLEMENTED,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// The short text of the answer: what the client got wrong, nothing
    /// about the proxy's insides.
    pub(crate) fn text(self) -> &'static str {
        match self {
            Refusal::Connect => "this proxy does not open CONNECT tunnels",
            Refusal::MissingHost => "an HTTP/1.1 request needs a Host header",
            Refusal::DuplicateHost => "the request has more than one Host header",
            Refusal::InvalidHost => "the Host header is not a valid host[:port]",
            Refusal::InvalidTarget => {
                "the request target's authority is not a valid http(s) host[:port]"
            }
            Refusal::HostMismatch => "the Host header differs from :authority",
        }
    }

    /// The `kind` of the log line.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::Connect => "connect_method",
            Refusal::MissingHost => "missing_host",
            Refusal::DuplicateHost => "duplicate_host",
            Refusal::InvalidHost => "invalid_host",
            Refusal::InvalidTarget => "invalid_target",
            Refusal::HostMismatch => "host_mismatch",
        }
    }

    /// The `canary_proxy_client_errors_total` kind it is counted under.
    /// A bad Host is a malformed request, answered 400 like the other
    /// `malformed` ones. A CONNECT is a well-formed request for something
    /// this proxy does not do; no existing kind says that, so it is only
    /// logged.
    pub(crate) fn client_error(self) -> Option<ClientErrorKind> {
        match self {
            Refusal::Connect => None,
            _ => Some(ClientErrorKind::Malformed),
        }
    }
}

/// The host the request is for, as the upstream's `Host` (and
/// `X-Forwarded-Host`) should carry it, or why the request is refused.
/// `None`: the request names no host (HTTP/1.0 without one, an empty Host).
pub(crate) fn host_of<B>(req: &Request<B>) -> Result<Option<HeaderValue>, Refusal> {
    if req.method() == Method::CONNECT {
        return Err(Refusal::Connect);
    }
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(Refusal::DuplicateHost);
    }
    if let Some(h) = host {
        if !h.is_empty() && !valid_host(h.as_bytes()) {
            return Err(Refusal::InvalidHost);
        }
    }
    if host.is_none() && req.version() == Version::HTTP_11 {
        return Err(Refusal::MissingHost);
    }
    let Some(authority) = req.uri().authority() else {
        return Ok(host.filter(|h| !h.is_empty()).cloned());
    };
    // Absolute-form (HTTP/1) or :authority (HTTP/2): the target's
    // authority is the host.
    let scheme_ok = req
        .uri()
        .scheme_str()
        .is_none_or(|s| s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https"));
    if !scheme_ok || !valid_host(authority.as_str().as_bytes()) {
        return Err(Refusal::InvalidTarget);
    }
    if req.version() == Version::HTTP_2 {
        if let Some(h) = host {
            if !h
                .as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
            {
                return Err(Refusal::HostMismatch);
            }
        }
    }
    Ok(Some(
        HeaderValue::from_str(authority.as_str()).map_err(|_| Refusal::InvalidTarget)?,
    ))
}

/// `uri-host [ ":" port ]` (RFC 9110 section 7.2, with the URI grammar of
/// RFC 3986 section 3.2.2): an IPv6 literal in brackets, or a reg-name
/// (which covers IPv4 addresses and DNS names), then an optional port that
/// fits in 16 bits. No `user@`, no path, no spaces, no control bytes.
fn valid_host(value: &[u8]) -> bool {
    let (host_ok, rest) = match value.strip_prefix(b"[") {
        Some(inner) => {
            let Some(end) = inner.iter().position(|&b| b == b']') else {
                return false;
            };
            let literal = std::str::from_utf8(&inner[..end]).ok();
            (
                literal.is_some_and(|s| s.parse::<Ipv6Addr>().is_ok()),
                &inner[end + 1..],
            )
        }
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            (reg_name(&value[..end]), &value[end..])
        }
    };
    host_ok
        && match rest {
            [] => true,
            // port = *DIGIT: an empty port is allowed by the grammar.
            [b':', port @ ..] => {
                port.is_empty()
                    || (port.len() <= 5
                        && port.iter().all(u8::is_ascii_digit)
                        && std::str::from_utf8(port)
                            .ok()
                            .and_then(|p| p.parse::<u16>().ok())
                            .is_some())
            }
            _ => false,
        }
}

/// `reg-name = *( unreserved / pct-encoded / sub-delims )`, not empty here.
fn reg_name(name: &[u8]) -> bool {
    let mut i = 0;
    while i < name.len() {
        match name[i] {
            b'%' => {
                let hex = |j: usize| name.get(j).is_some_and(u8::is_ascii_hexdigit);
                if !(hex(i + 1) && hex(i + 2)) {
                    return false;
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() => {}
            b'-' | b'.' | b'_' | b'~' => {}
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' => {}
            _ => return false,
        }
        i += 1;
    }
    !name.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http11(target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::get(target).version(Version::HTTP_11);
        for h in hosts {
            b = b.header(header::HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn host_values() {
        for ok in [
            "example.com",
            "example.com:8080",
            "example.com:",
            "10.0.0.1:80",
            "[::1]",
            "[2001:db8::7]:443",
            "xn--bcher-kva.example",
            "a%2Db.example",
            "UPPER.example",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok} is valid");
        }
        for bad in [
            "",
            ":80",
            "user@example.com",
            "example.com:99999",
            "example.com:80a",
            "example.com:80:81",
            "example.com/path",
            "exa mple.com",
            "[::1",
            "[not-v6]",
            "[::1]x",
            "a%zz",
            "example.com\t",
            "ex\u{e9}.com",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?} is invalid");
        }
    }

    #[test]
    fn http11_needs_exactly_one_valid_host() {
        assert_eq!(
            host_of(&http11("/", &["a.example"])),
            Ok(Some(HeaderValue::from_static("a.example")))
        );
        assert_eq!(host_of(&http11("/", &[])), Err(Refusal::MissingHost));
        assert_eq!(
            host_of(&http11("/", &["a.example", "b.example"])),
            Err(Refusal::DuplicateHost)
        );
        assert_eq!(
            host_of(&http11("/", &["a.example", "a.example"])),
            Err(Refusal::DuplicateHost)
        );
        assert_eq!(
            host_of(&http11("/", &["u@a.example"])),
            Err(Refusal::InvalidHost)
        );
        assert_eq!(host_of(&http11("/", &[""])), Ok(None), "empty is valid");
        let old = Request::get("/")
            .version(Version::HTTP_10)
            .body(())
            .unwrap();
        assert_eq!(host_of(&old), Ok(None), "HTTP/1.0 may omit Host");
    }

    #[test]
    fn absolute_form_wins_over_host() {
        assert_eq!(
            host_of(&http11("http://abs.example:81/x", &["other.example"])),
            Ok(Some(HeaderValue::from_static("abs.example:81")))
        );
        assert_eq!(
            host_of(&http11("http://u:p@abs.example/x", &["abs.example"])),
            Err(Refusal::InvalidTarget)
        );
        assert_eq!(
            host_of(&http11("ftp://abs.example/x", &["abs.example"])),
            Err(Refusal::InvalidTarget)
        );
        assert_eq!(
            host_of(&http11("http://abs.example/x", &[])),
            Err(Refusal::MissingHost),
            "RFC 9112 3.2: every HTTP/1.1 request carries Host"
        );
    }

    #[test]
    fn h2_authority_and_host_must_agree() {
        let h2 = |hosts: &[&str]| {
            let mut b = Request::get("http://a.example/x").version(Version::HTTP_2);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).unwrap()
        };
        let a = Ok(Some(HeaderValue::from_static("a.example")));
        assert_eq!(host_of(&h2(&[])), a);
        assert_eq!(host_of(&h2(&["A.example"])), a);
        assert_eq!(host_of(&h2(&["b.example"])), Err(Refusal::HostMismatch));
    }

    #[test]
    fn connect_is_refused() {
        let p = Request::connect("example.com:443")
            .header(header::HOST, "example.com:443")
            .body(())
            .unwrap();
        assert_eq!(host_of(&p), Err(Refusal::Connect));
        assert_eq!(Refusal::Connect.status(), StatusCode::NOT_IMPLEMENTED);
    }
}
