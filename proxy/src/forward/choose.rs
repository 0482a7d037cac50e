//! Which version a request goes to: the `[override]` header if it names
//! one, else the `[sticky]` key's version, else a random pick by the
//! effective weights (docs/routing.md). A version the first two name that is
//! rolled back gives way to the rollback target: the rollback always wins.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderValue};

use crate::routes::{Override, StickyKey};
use crate::snapshot::Snapshot;

/// The choice, and what the answer must carry because of it.
#[derive(Debug)]
pub(super) struct Choice {
    pub(super) index: usize,
    /// Chosen by the override header (counted on its own).
    pub(super) overridden: bool,
    /// The `Set-Cookie` that gives a browser the key it was routed by.
    pub(super) set_cookie: Option<HeaderValue>,
}

/// The request's version; `None` only if every weight is 0. Removes the
/// override header unless the file says to forward it.
pub(super) fn choose(
    snap: &Snapshot,
    headers: &mut HeaderMap,
    peer: IpAddr,
    peer_text: &HeaderValue,
    tls: bool,
) -> Option<Choice> {
    if let Some(o) = &snap.table.override_ {
        if let Some(index) = overridden(snap, o, headers, peer) {
            return Some(Choice {
                index: snap.serving(index),
                overridden: true,
                set_cookie: None,
            });
        }
    }
    if let (Some(sticky), Some(rendezvous)) = (&snap.table.sticky, &snap.sticky) {
        let key = match &sticky.key {
            StickyKey::Header(name) => headers.get(name).map(HeaderValue::as_bytes),
            StickyKey::Cookie(name) => cookie(headers, name),
            StickyKey::ClientAddress => Some(peer_text.as_bytes()),
        }
        .filter(|k| !k.is_empty());
        if let Some(key) = key {
            return rendezvous.pick(key).map(|index| Choice {
                index: snap.serving(index),
                overridden: false,
                set_cookie: None,
            });
        }
        if let (StickyKey::Cookie(name), Some(max_age)) = (&sticky.key, sticky.set_cookie) {
            // A browser's first request: a fresh key, routed by it, so that
            // this answer and every later one come from the same version.
            let key = format!("{:032x}", fastrand::u128(..));
            let mut cookie = format!(
                "{name}={key}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax",
                max_age.as_secs()
            );
            if tls {
                cookie.push_str("; Secure");
            }
            return rendezvous.pick(key.as_bytes()).map(|index| Choice {
                index: snap.serving(index),
                overridden: false,
                set_cookie: HeaderValue::from_str(&cookie).ok(),
            });
        }
    }
    snap.split.pick_random().map(|index| Choice {
        index,
        overridden: false,
        set_cookie: None,
    })
}

/// The version the override header names, for a client allowed to use it.
fn overridden(
    snap: &Snapshot,
    o: &Override,
    headers: &mut HeaderMap,
    peer: IpAddr,
) -> Option<usize> {
    let value = if o.forward_header {
        headers.get(&o.header).cloned()
    } else {
        headers.remove(&o.header)
    }?;
    // An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d.
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    if !o.allow_from.is_empty() && !o.allow_from.iter().any(|net| net.contains(&peer)) {
        return None;
    }
    let name = value.to_str().ok()?.trim();
    snap.table
        .versions
        .iter()
        .position(|v| v.name.eq_ignore_ascii_case(name))
}

/// The value of cookie `name` in the request's `Cookie` headers (HTTP/2
/// may split them, RFC 9113 8.2.3), without the quotes RFC 6265 allows.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(header::COOKIE).iter().find_map(|h| {
        h.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            let (k, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
            (k == name.as_bytes()).then(|| {
                v.strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(v)
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(header::COOKIE, HeaderValue::from_str(c).unwrap());
        }
        h
    }

    #[test]
    fn cookie_is_found_among_others_and_across_headers() {
        let h = headers(&["a=1; canary-key=abc; b=2"]);
        assert_eq!(cookie(&h, "canary-key"), Some(&b"abc"[..]));
        let h = headers(&["a=1", "canary-key=\"q\""]);
        assert_eq!(cookie(&h, "canary-key"), Some(&b"q"[..]));
        let h = headers(&["canary-keyx=1; xcanary-key=2"]);
        assert_eq!(cookie(&h, "canary-key"), None);
        assert_eq!(cookie(&headers(&[]), "canary-key"), None);
    }
}
