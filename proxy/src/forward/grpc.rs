//! gRPC on the request path. A gRPC call is an HTTP/2 request whose
//! `content-type` is `application/grpc` (or `application/grpc+…`); the proxy
//! forwards it like any request, and knows three more things about it:
//!
//! - **Its outcome is in the trailers.** A call that fails still answers
//!   HTTP 200; the failure is the `grpc-status` in the trailers, or in the
//!   headers of a trailers-only answer. The observation reads it there, so
//!   a version failing every call is not 100% healthy to the judgment.
//! - **Its deadline.** `grpc-timeout` bounds how long the proxy waits for
//!   the upstream's answer, below `--upstream-timeout`.
//! - **How to fail it.** A call the proxy cannot serve (connect failure,
//!   timeout, reset) gets what gRPC clients expect from a proxy: HTTP 200,
//!   `content-type: application/grpc`, and `grpc-status` 14 (UNAVAILABLE)
//!   or 4 (DEADLINE_EXCEEDED) in a trailers-only answer, as Envoy does.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::answer::{self, RequestId};
pub(crate) use crate::grpc_status::{Code, GrpcCodes, DEADLINE_EXCEEDED, UNAVAILABLE};

const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// Whether a request is a gRPC call.
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc").is_some_and(|rest| {
                rest.is_empty() || rest.starts_with('+') || rest.starts_with(';')
            })
        })
}

/// The `grpc-status` in a header map (trailers, or the headers of a
/// trailers-only answer).
pub(crate) fn status_of(headers: &HeaderMap) -> Option<Code> {
    let value = headers.get(GRPC_STATUS)?.to_str().ok()?;
    Some(value.trim().parse::<u8>().map(Code).unwrap_or(Code::OTHER))
}

/// The call's deadline from `grpc-timeout` (gRPC over HTTP/2: at most 8
/// digits and a unit: H, M, S, m, u or n). A malformed value is ignored, as
/// gRPC servers do.
pub(crate) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The proxy's own answer to a gRPC call it could not serve: trailers-only,
/// HTTP 200, `grpc-status` and `grpc-message` in the headers, the request id
/// in its header (and in the log line of the failure).
pub(crate) fn failure_response(code: u8, text: &str, id: RequestId) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(GRPC_STATUS, HeaderValue::from(u16::from(code)));
    // grpc-message is percent-encoded; the proxy's texts are plain ASCII
    // words, so only the request id's separator needs no care.
    let message = format!("{text}; request id {id}").replace('%', "%25");
    if let Ok(v) = HeaderValue::from_str(&message) {
        headers.insert(GRPC_MESSAGE, v);
    }
    answer::tag(headers, id);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn grpc_calls_are_known_by_content_type() {
        assert!(is_grpc(&headers(&[("content-type", "application/grpc")])));
        assert!(is_grpc(&headers(&[(
            "content-type",
            "application/grpc+proto"
        )])));
        assert!(!is_grpc(&headers(&[("content-type", "application/grpcx")])));
        assert!(!is_grpc(&headers(&[("content-type", "application/json")])));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn deadlines_follow_the_grpc_timeout_grammar() {
        let t = |v: &str| timeout(&headers(&[("grpc-timeout", v)]));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("5u"), Some(Duration::from_micros(5)));
        assert_eq!(t("123456789m"), None, "at most 8 digits");
        assert_eq!(t("10x"), None);
        assert_eq!(t("m"), None);
        assert_eq!(t(""), None);
    }

    #[test]
    fn statuses_are_read_and_bounded() {
        assert_eq!(
            status_of(&headers(&[("grpc-status", "13")])),
            Some(Code(13))
        );
        assert_eq!(
            status_of(&headers(&[("grpc-status", "99")])).map(Code::label),
            Some("other")
        );
        assert_eq!(
            status_of(&headers(&[("grpc-status", "x")])),
            Some(Code::OTHER)
        );
        assert_eq!(status_of(&HeaderMap::new()), None);
        assert_eq!(Code(0).label(), "OK");
        assert_eq!(Code(16).label(), "UNAUTHENTICATED");
    }

    #[test]
    fn the_default_error_set_is_the_server_faults() {
        let set = GrpcCodes::default();
        for code in [2, 4, 13, 14, 15] {
            assert!(set.contains(Code(code)), "{}", Code(code));
        }
        for code in [0, 1, 3, 5, 7, 12, 16] {
            assert!(!set.contains(Code(code)), "{}", Code(code));
        }
        assert!(!set.contains(Code::OTHER));
        let set = GrpcCodes::parse(&["internal".into(), "5".into()]).unwrap();
        assert!(set.contains(Code(13)) && set.contains(Code(5)));
        assert!(GrpcCodes::parse(&["BOGUS".into()]).is_err());
        assert!(GrpcCodes::parse(&["17".into()]).is_err());
    }

    #[test]
    fn a_failed_call_is_a_trailers_only_answer() {
        let resp = failure_response(UNAVAILABLE, "the upstream failed", RequestId::new());
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "application/grpc");
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert!(resp.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .starts_with("the upstream failed; request id "));
    }
}
