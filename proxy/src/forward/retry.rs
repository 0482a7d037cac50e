//! The one retry: a request whose attempt on a version failed before any
//! response is sent once more, to the rollback target, so the client sees
//! the stable answer instead of a 502. The failure still counts against the
//! version that failed.

use http::{HeaderMap, Method, Uri};

use super::Failure;

/// What a retry on the rollback target resends after a reset: a copy of a
/// bodiless request. (A failure to connect hands back the request itself.)
pub(super) struct Retry {
    pub(super) method: Method,
    pub(super) uri: Uri,
    pub(super) headers: HeaderMap,
}

impl Retry {
    /// Whether the request may go to the target after `failure`.
    pub(super) fn allowed_after(&self, failure: &Failure) -> bool {
        match failure {
            // Nothing of the request reached the failed version.
            Failure::Connect(_) => true,
            // The connection died before a response head (a killed pod, a
            // reset pooled connection), or the version answered with a 101
            // nobody asked for: either way it may have acted on the request
            // and gave no answer. HTTP lets a client repeat an idempotent
            // request (RFC 9110 9.2.2), and this one had no body.
            Failure::Reset(_) | Failure::UnaskedUpgrade => is_idempotent(&self.method),
            // A timeout may have reached the version; the client's own
            // failures are not retried (the client is gone, or its body is).
            Failure::Timeout(_) | Failure::Client(..) => false,
        }
    }
}

/// Methods a client may repeat without changing the outcome (RFC 9110 9.2.2).
pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_methods_are_repeated_after_a_reset() {
        let idempotent = ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"];
        for m in [
            "GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE", "POST", "PATCH",
        ] {
            let method: Method = m.parse().unwrap();
            assert_eq!(is_idempotent(&method), idempotent.contains(&m), "{m}");
        }
    }
}
