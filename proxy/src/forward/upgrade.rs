//! Upgraded connections (WebSocket): the `101` exchange is forwarded like
//! any other, then both sides become one byte tunnel that outlives the
//! request. Tunnels are tracked so that shutdown can wait for them.

use std::sync::Arc;

use http::{header, Request, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;

use super::log_limit::{self, LogKind};

/// Whether the client asks to switch protocols on this HTTP/1.1 request.
pub(super) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .map(|s| {
                    s.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                })
                .unwrap_or(false)
        })
}

/// Join the client's and the upstream's upgraded connections and copy bytes
/// both ways until either closes.
pub(super) fn spawn_tunnel(
    tunnels: &TaskTracker,
    client: OnUpgrade,
    upstream: OnUpgrade,
    version: Arc<str>,
) {
    tunnels.spawn(async move {
        let (client, upstream) = tokio::join!(client, upstream);
        match (client, upstream) {
            (Ok(c), Ok(u)) => {
                let (mut c, mut u) = (TokioIo::new(c), TokioIo::new(u));
                match tokio::io::copy_bidirectional(&mut c, &mut u).await {
                    Ok((up, down)) => tracing::debug!(%version, up, down, "tunnel closed"),
                    Err(e) => tracing::debug!(%version, error = %e, "tunnel ended with an error"),
                }
            }
            (c, u) => {
                if log_limit::allow(Some(&version), LogKind::Upgrade) {
                    tracing::warn!(%version, client = ?c.err(), upstream = ?u.err(), "upgrade failed")
                }
            }
        }
    });
}
