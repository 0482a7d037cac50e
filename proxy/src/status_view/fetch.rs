//! One `GET /status` from a proxy's admin port, bounded by a timeout.
//!
//! Plain HTTP/1.1 over a TCP connection of its own (hyper's connection API,
//! no pooled client): the admin port is reached directly or through
//! `kubectl port-forward`, and a fresh connection per fetch notices a
//! dropped port-forward at the next fetch instead of reusing a dead socket.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

/// A /status of hundreds of versions and endpoints is well under this; more
/// means the address answers with something else.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// `--admin`: `http://HOST:PORT`, nothing else. The admin port speaks plain
/// HTTP only, and always serves `/status` at its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUrl {
    /// As written: a name, an IPv4 address, or an IPv6 address in brackets.
    host: String,
    port: u16,
}

/// Why an `--admin` value is not an `http://HOST:PORT` URL.
#[derive(Debug, thiserror::Error)]
#[error("{problem}; give the admin address as http://HOST:PORT, e.g. http://127.0.0.1:9090")]
pub struct AdminUrlError {
    problem: &'static str,
}

impl FromStr for AdminUrl {
    type Err = AdminUrlError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |problem| Err(AdminUrlError { problem });
        if s.starts_with("https://") {
            return bad("https is not supported: the admin port speaks plain HTTP");
        }
        let Some(rest) = s.strip_prefix("http://") else {
            return bad("it does not start with http://");
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return bad("a path is not allowed: /status is always at the admin port's root");
        }
        if authority.contains('@') {
            return bad("user information is not supported");
        }
        let Some((host, port)) = authority.rsplit_once(':') else {
            return bad("it has no port");
        };
        let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
        if host.is_empty() || (host.contains(':') && !bracketed) {
            return bad("it has no host (an IPv6 address goes in brackets: http://[::1]:9090)");
        }
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(AdminUrl {
                host: host.to_owned(),
                port,
            }),
            _ => bad("its port is not a number from 1 to 65535"),
        }
    }
}

impl fmt::Display for AdminUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}:{}", self.host, self.port)
    }
}

/// What to check when the address does not answer at all.
const FIX_UNREACHABLE: &str = "Is the proxy running, with its admin port at that address? \
Through Kubernetes, is `kubectl -n canary-proxy port-forward deploy/canary-proxy 9090:9090` running? \
Is --admin (or CANARY_PROXY_ADMIN) right?";

/// What to check when something answers, but not a proxy's admin port.
const FIX_NOT_STATUS: &str = "Does --admin (or CANARY_PROXY_ADMIN) name the proxy's admin port \
(9090 in the manifests), not its traffic port, and is it a canary-proxy?";

/// Why no /status document came back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    #[error("cannot connect to {url}: {source}")]
    Connect { url: String, source: std::io::Error },
    #[error("{url} did not answer /status within {}", humantime::format_duration(*after))]
    Timeout { url: String, after: Duration },
    #[error("{url}/status: the HTTP exchange failed: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("{url}/status answered {status}, not a /status document")]
    Status { url: String, status: StatusCode },
    #[error("{url}/status is not a /status document: {problem}")]
    NotStatus { url: String, problem: String },
}

impl FetchError {
    /// One line naming what to check.
    pub(crate) fn fix(&self) -> &'static str {
        match self {
            FetchError::Connect { .. } | FetchError::Timeout { .. } | FetchError::Http { .. } => {
                FIX_UNREACHABLE
            }
            FetchError::Status { .. } | FetchError::NotStatus { .. } => FIX_NOT_STATUS,
        }
    }
}

/// A /status document: the bytes as received, and their parse.
pub(crate) struct Document {
    pub(crate) raw: Bytes,
    pub(crate) value: Value,
}

/// GET `url`/status, connect and answer within `timeout`.
pub(crate) async fn status(url: &AdminUrl, timeout: Duration) -> Result<Document, FetchError> {
    match tokio::time::timeout(timeout, exchange(url)).await {
        Ok(result) => result,
        Err(_) => Err(FetchError::Timeout {
            url: url.to_string(),
            after: timeout,
        }),
    }
}

async fn exchange(url: &AdminUrl) -> Result<Document, FetchError> {
    let http = |source| FetchError::Http {
        url: url.to_string(),
        source,
    };
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let stream = TcpStream::connect((host, url.port))
        .await
        .map_err(|source| FetchError::Connect {
            url: url.to_string(),
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let request = Request::get("/status")
        .header(header::HOST, format!("{}:{}", url.host, url.port))
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .expect("a GET with two valid headers builds");
    let answer = async {
        let resp = sender.send_request(request).await.map_err(http)?;
        if resp.status() != StatusCode::OK {
            return Err(FetchError::Status {
                url: url.to_string(),
                status: resp.status(),
            });
        }
        Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|body| body.to_bytes())
            .map_err(|e| match e.downcast::<hyper::Error>() {
                Ok(e) => http(*e),
                Err(_) => FetchError::NotStatus {
                    url: url.to_string(),
                    problem: format!("it is more than {MAX_BODY} bytes"),
                },
            })
    };
    // The connection future does the socket I/O; it is polled alongside the
    // exchange, in this task, so nothing outlives a fetch that timed out.
    tokio::pin!(answer);
    let raw = tokio::select! {
        raw = &mut answer => raw?,
        done = conn => {
            done.map_err(http)?;
            answer.await?
        }
    };
    let not_status = |problem: String| FetchError::NotStatus {
        url: url.to_string(),
        problem,
    };
    let value: Value =
        serde_json::from_slice(&raw).map_err(|e| not_status(format!("not JSON ({e})")))?;
    if !value["versions"].is_array() {
        return Err(not_status("it has no `versions` list".to_owned()));
    }
    Ok(Document { raw, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_are_http_host_port_only() {
        for ok in [
            "http://127.0.0.1:9090",
            "http://127.0.0.1:9090/",
            "http://localhost:9090",
            "http://[::1]:9090",
        ] {
            let url: AdminUrl = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(url.to_string(), ok.trim_end_matches('/'));
        }
        for (bad, why) in [
            ("https://127.0.0.1:9090", "https"),
            ("127.0.0.1:9090", "http://"),
            ("http://127.0.0.1", "no port"),
            ("http://127.0.0.1:9090/status", "path"),
            ("http://127.0.0.1:0", "1 to 65535"),
            ("http://127.0.0.1:x", "1 to 65535"),
            ("http://:9090", "no host"),
            ("http://::1:9090", "brackets"),
            ("http://u:p@127.0.0.1:9090", "user"),
        ] {
            let e = bad.parse::<AdminUrl>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }
}
