//! Rewriting a request for its upstream and a response for its client: the
//! hop-by-hop headers (RFC 9110 section 7.6.1), the forwarding headers, the
//! `Host`, the framing of a response, and the request line.
//!
//! # The forwarding headers
//!
//! One rule: a header that lists the hops is appended to, a header that
//! states one fact about the client's request is replaced by what the proxy
//! saw, and a header the proxy does not write is removed, so a client cannot
//! pass a claim off as the proxy's.
//! - `X-Forwarded-For`: appended to. The client's values stay first (every
//!   line of it, joined; all of them are dropped if one is not printable
//!   ASCII) and the address the proxy saw is last: the only entry to trust.
//! - `X-Forwarded-Proto`: replaced, `http` or `https` as the client's
//!   connection to the proxy was.
//! - `X-Forwarded-Host`: replaced by the host the request is for (see
//!   `target`), or removed when it names none.
//! - `Forwarded` (RFC 7239) and `X-Real-IP`: removed. The proxy writes
//!   neither. Appending to `Forwarded` as RFC 7239 section 4 allows would
//!   keep the client's element first, and the frameworks that read
//!   `Forwarded` take `host` and `proto` from the first element: a client
//!   could choose them. `X-Real-IP` is single-valued, and the last
//!   `X-Forwarded-For` entry already says the same thing.
//!
//! The proxy trusts no forwarding header from anyone: it assumes it is the
//! first HTTP hop (behind a TCP load balancer), so with an HTTP proxy in
//! front of it, that proxy's `X-Forwarded-Proto` and `X-Forwarded-Host`
//! are replaced too.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use super::{ConnInfo, UpstreamBody};
use crate::snapshot::VersionRuntime;
use crate::upstream::Protocol;

/// Headers that describe one connection, not the message (RFC 9110
/// section 7.6.1). A proxy must not forward them. A `static`: a `const`
/// array would be built and dropped again at every use.
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Look before removing: most requests carry none of these, most
    // responses only `Connection: keep-alive`, and every `remove` hashes a
    // name. Removing all six by name on both sides was about 2,600
    // instructions a request (callgrind), 5% of the proxy's.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    // Tokens that are hop-by-hop names already ("keep-alive", "upgrade")
    // go with the rest below, without a lookup each.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty() && !names_hop_by_hop(token))
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    // At most six rounds, each removing one name found present.
    while let Some(name) = headers.keys().find(|name| is_hop_by_hop(name)).cloned() {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Whether a `Connection` token names one of HOP_BY_HOP (tokens are
/// case-insensitive).
fn names_hop_by_hop(token: &str) -> bool {
    HOP_BY_HOP
        .iter()
        .any(|name| name.as_str().eq_ignore_ascii_case(token))
}

/// The client's headers as the upstream gets them: hop-by-hop ones gone
/// (but an upgrade's), forwarding headers set by the rule of the module
/// doc. `host` is the host the request is for (`target::host_of`).
pub(super) fn prepare_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
    upgrade: bool,
) {
    let upgrade_value = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(headers);
    if let Some(value) = upgrade_value {
        // An upgrade is the one hop-by-hop exchange a proxy passes on, so
        // the upstream can agree to it (RFC 9110 7.8).
        headers.insert(header::UPGRADE, value);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Append, so a chain of proxies keeps its history (the client's claim
    // stays first; the address we saw is last and the one to trust).
    let xff = claimed_for(headers)
        .and_then(|prev| HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok())
        .unwrap_or_else(|| conn.peer_ip.clone());
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host.clone());
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    headers.remove(header::FORWARDED);
    headers.remove(X_REAL_IP);
}

/// The client's `X-Forwarded-For` lines, joined as one list (RFC 9110
/// 5.3: several lines of a list field mean their values joined by commas),
/// or `None` if there is none, or one is not printable ASCII.
fn claimed_for(headers: &HeaderMap) -> Option<String> {
    let mut joined: Option<String> = None;
    for value in headers.get_all(X_FORWARDED_FOR) {
        let value = value.to_str().ok()?.trim();
        if value.is_empty() {
            continue;
        }
        match &mut joined {
            Some(list) => {
                list.push_str(", ");
                list.push_str(value);
            }
            None => joined = Some(value.to_owned()),
        }
    }
    joined
}

/// The upstream's response headers as the client gets them.
///
/// A response with both `Transfer-Encoding` and `Content-Length` is framed
/// by the Transfer-Encoding (RFC 9112 section 6.3, rule 3), and hyper has
/// read it so. Its `Content-Length` must go: passed on beside a body that is
/// no longer chunked, it makes hyper cut the answer off (the client got 0
/// bytes and a close, and the metrics a 200). Removing it and forwarding is
/// what the same rule asks of an intermediary that forwards such a message.
/// The proxy does that rather than answer 502: the body was read without
/// ambiguity and the client gets it framed one way only, so no hop after the
/// proxy can read it differently (the smuggling 6.3 warns about), and an
/// upstream framework's header quirk is not turned into an outage and a
/// rollback. This must run before the hop-by-hop stripping removes the
/// `Transfer-Encoding` that tells.
pub(super) fn prepare_response(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers);
}

/// The request as it goes to `version`.
pub(super) fn build_request(
    method: http::Method,
    uri: &Uri,
    mut headers: HeaderMap,
    version: &VersionRuntime,
    host: Option<&HeaderValue>,
    te_trailers: bool,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    // Reuse the parsed path instead of formatting and re-parsing a URI.
    let path = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    // Host as the client sent it, unless the version asks for rewriting.
    let host = if version.rewrite_host {
        Some(&version.authority_header)
    } else {
        host
    };
    let host = host.unwrap_or(&version.authority_header);
    let mut req = Request::new(body);
    *req.method_mut() = method;
    match version.protocol {
        Protocol::Http1 => {
            // hyper writes the URI as given: origin-form (`/path?query`),
            // what an HTTP/1.1 request to an origin server carries (RFC 9112
            // 3.2.1). An h2 client is downgraded here.
            *req.uri_mut() = Uri::from(path);
            *req.version_mut() = Version::HTTP_11;
            headers.insert(header::HOST, host.clone());
        }
        Protocol::H2c => {
            // HTTP/2 names the host in `:authority`, which hyper takes from
            // the URI's authority (RFC 9113 8.3.1); a Host header beside it
            // would have to agree, so there is none.
            let authority = http::uri::Authority::try_from(host.as_bytes())
                .unwrap_or_else(|_| version.authority.clone());
            *req.uri_mut() = Uri::builder()
                .scheme(http::uri::Scheme::HTTP)
                .authority(authority)
                .path_and_query(path)
                .build()
                .expect("scheme, authority and path make a URI");
            *req.version_mut() = Version::HTTP_2;
            headers.remove(header::HOST);
            // The one TE value HTTP/2 allows (RFC 9113 8.2.2), and the one a
            // gRPC server requires: passed on when the client sent it.
            if te_trailers {
                headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
        }
    }
    *req.headers_mut() = headers;
    req
}

/// Whether the client's TE header asks for trailers, read before the
/// hop-by-hop headers go.
pub(super) fn wants_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    })
}

/// A request that failed to connect, sent to `version` instead: the same
/// method, path, headers and body (none of which left the proxy).
pub(super) fn retarget(
    req: Request<UpstreamBody>,
    version: &VersionRuntime,
    host: Option<&HeaderValue>,
    te_trailers: bool,
) -> Request<UpstreamBody> {
    let (parts, body) = req.into_parts();
    build_request(
        parts.method,
        &parts.uri,
        parts.headers,
        version,
        host,
        te_trailers,
        body,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn every_connection_line_names_headers_and_hop_by_hop_ones_go_without_it() {
        // Connection over two lines: both name headers to remove.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-one"));
        h.append(header::CONNECTION, HeaderValue::from_static(" , X-Two "));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        // No Connection header: the hop-by-hop ones still go.
        let mut h = HeaderMap::new();
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept"]);

        // None of them: every header and every value of it stays.
        let mut h = HeaderMap::new();
        h.append(header::ACCEPT, HeaderValue::from_static("a/b"));
        h.append(header::ACCEPT, HeaderValue::from_static("c/d"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        let conn = ConnInfo::new("127.0.0.7:5000".parse().unwrap(), false);
        prepare_headers(
            &mut h,
            &conn,
            Some(&HeaderValue::from_static("example.com")),
            false,
        );
        assert_eq!(h[X_FORWARDED_FOR], "10.0.0.1, 127.0.0.7");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "example.com");
    }

    #[test]
    fn the_clients_claims_are_appended_to_replaced_or_removed() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static(" "));
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_static("10.0.0.2, 10.0.0.3"),
        );
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(X_FORWARDED_HOST, HeaderValue::from_static("evil.example"));
        h.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=1.2.3.4;host=evil.example"),
        );
        h.insert(X_REAL_IP, HeaderValue::from_static("1.2.3.4"));
        let conn = ConnInfo::new("[2001:db8::7]:5000".parse().unwrap(), true);
        prepare_headers(&mut h, &conn, None, false);
        assert_eq!(
            h[X_FORWARDED_FOR],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 2001:db8::7"
        );
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        for gone in [X_FORWARDED_HOST, header::FORWARDED, X_REAL_IP] {
            assert!(!h.contains_key(&gone), "{gone} is removed");
        }
        // A value that is not printable ASCII drops the client's claim.
        let mut h = HeaderMap::new();
        h.insert(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"10.0.0.1\xff").unwrap(),
        );
        prepare_headers(&mut h, &conn, None, false);
        assert_eq!(h[X_FORWARDED_FOR], "2001:db8::7");
    }

    #[test]
    fn transfer_encoding_overrides_content_length_in_a_response() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("100"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        prepare_response(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);
        // Without Transfer-Encoding, Content-Length is the framing: kept.
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("4"));
        prepare_response(&mut h);
        assert_eq!(h[header::CONTENT_LENGTH], "4");
    }
}
