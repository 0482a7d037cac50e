//! Rewriting a request for its upstream and a response for its client: the
//! hop-by-hop headers (RFC 9110 section 7.6.1), the `X-Forwarded-*` headers,
//! the `Host`, and the request line.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri, Version};

use super::{ConnInfo, UpstreamBody};
use crate::snapshot::VersionRuntime;

/// Headers that describe one connection, not the message (RFC 9110
/// section 7.6.1). A proxy must not forward them.
const HOP_BY_HOP: [HeaderName; 6] = [
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

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too (RFC 9110 7.6.1).
    if let Some(named) = headers
        .get_all(header::CONNECTION)
        .iter()
        .map(|v| v.to_str().unwrap_or("").to_owned())
        .reduce(|a, b| a + "," + &b)
    {
        for name in named.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if let Ok(name) = HeaderName::from_bytes(name.as_bytes()) {
                headers.remove(name);
            }
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The host the client asked for: the Host header (HTTP/1.1) or the
/// `:authority` (h2, which hyper puts in the URI).
pub(super) fn host_of(headers: &HeaderMap, uri: &Uri) -> Option<HeaderValue> {
    headers.get(header::HOST).cloned().or_else(|| {
        uri.authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

/// The client's headers as the upstream gets them: hop-by-hop ones gone
/// (but an upgrade's), forwarding headers added.
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
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
        None => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
}

/// The request as it goes to `version`.
pub(super) fn build_request(
    method: http::Method,
    uri: &Uri,
    mut headers: HeaderMap,
    version: &VersionRuntime,
    host: Option<&HeaderValue>,
    body: UpstreamBody,
) -> Request<UpstreamBody> {
    // Reuse the parsed path instead of formatting and re-parsing a URI.
    // hyper writes the URI as given: origin-form (`/path?query`), which is
    // what an HTTP/1.1 request to an origin server carries (RFC 9112 3.2.1).
    let upstream_uri = Uri::from(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    // Host as the client sent it, unless the version asks for rewriting.
    let host = if version.rewrite_host {
        Some(&version.authority_header)
    } else {
        host
    };
    let host = host.unwrap_or(&version.authority_header);
    headers.insert(header::HOST, host.clone());
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = upstream_uri;
    // Upstreams speak HTTP/1.1; an h2 client is downgraded here.
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
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
}
