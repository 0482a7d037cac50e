//! The answers the proxy makes itself, for a failure or a refusal: the
//! status, a short text that says what went wrong in the client's terms and
//! never changes with the cause's details, and a request id.
//!
//! The details (the version, its upstream's address, the error chain) stay
//! in the log: an error body is read by whoever sent the request, and the
//! addresses inside the cluster and the errors of the libraries are none of
//! their business. The request id ties the two together: it is in the
//! answer's body, in its [`REQUEST_ID`] header, and in the log line of that
//! failure (unless the log rate limit of `log_limit` held that line back;
//! its summary line still counts it).
//!
//! The id is 64 random bits, printed as 16 hex digits. Only these answers
//! make one, so a request that succeeds costs nothing.

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

/// The response header that carries the id of a failed or refused request.
pub(crate) const REQUEST_ID: HeaderName = HeaderName::from_static("x-canary-proxy-request-id");

/// The id of one failed or refused request, as the client and the log see
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RequestId(u64);

impl RequestId {
    /// A fresh random id. Not a secret and not unique by construction: 64
    /// random bits make two alike among the failures of a day unlikely
    /// enough to find a log line by.
    pub(crate) fn new() -> Self {
        RequestId(fastrand::u64(..))
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The proxy's own answer: `502 Bad Gateway: the upstream failed; request
/// id 8f3a…`, plain text, with the id in [`REQUEST_ID`] too.
pub(crate) fn response(status: StatusCode, text: &str, id: RequestId) -> Response<Full<Bytes>> {
    // 499 has no standard reason phrase; NGINX's name for it is the one
    // people search for.
    let reason = status
        .canonical_reason()
        .unwrap_or(if status.as_u16() == 499 {
            "Client Closed Request"
        } else {
            "Error"
        });
    let body = format!("{} {reason}: {text}; request id {id}\n", status.as_u16());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    tag(headers, id);
    resp
}

/// Put the request id on one of the proxy's own answers, as the log line
/// of its failure has it.
pub(super) fn tag(headers: &mut http::HeaderMap, id: RequestId) {
    headers.insert(
        REQUEST_ID,
        HeaderValue::from_str(&id.to_string()).expect("hex digits are a valid header value"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_and_the_header_carry_the_same_id() {
        let id = RequestId(0x8f3a_0000_0000_0001);
        let resp = response(StatusCode::BAD_GATEWAY, "the upstream failed", id);
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(resp.headers()[REQUEST_ID], "8f3a000000000001");
        let body = resp.body().clone();
        let text = futures_util::FutureExt::now_or_never(http_body_util::BodyExt::collect(body))
            .expect("a full body is ready")
            .expect("infallible")
            .to_bytes();
        assert_eq!(
            &text[..],
            b"502 Bad Gateway: the upstream failed; request id 8f3a000000000001\n"
        );
        let gone = response(
            StatusCode::from_u16(499).unwrap(),
            "the client went away",
            id,
        );
        assert_eq!(gone.status().as_u16(), 499);
    }

    #[test]
    fn ids_are_sixteen_hex_digits() {
        for _ in 0..100 {
            let id = RequestId::new().to_string();
            assert_eq!(id.len(), 16, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
    }
}
