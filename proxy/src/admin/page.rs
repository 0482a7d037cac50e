//! The status page at `/`: one HTML, one JS and one CSS file, compiled into
//! the binary, that draw `/status` and `/metrics` once a second in a
//! browser. Nothing is fetched from anywhere else, so the page works offline
//! and through `kubectl port-forward`; the strict Content-Security-Policy
//! below holds it to that (no inline script or style, no other origin).

use bytes::Bytes;
use http::{header, HeaderValue, Response};
use http_body_util::Full;

pub(super) struct Asset {
    body: &'static str,
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_str!("ui/index.html"),
    content_type: "text/html; charset=utf-8",
};
const SCRIPT: Asset = Asset {
    body: include_str!("ui/app.js"),
    content_type: "text/javascript; charset=utf-8",
};
const STYLE: Asset = Asset {
    body: include_str!("ui/app.css"),
    content_type: "text/css; charset=utf-8",
};

/// Scripts, styles and fetches from this origin only; no plugins, frames,
/// forms or base rewriting. Inline SVG is built by the script, not loaded.
pub(super) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

pub(super) fn asset(path: &str) -> Option<&'static Asset> {
    match path {
        "/" | "/index.html" => Some(&INDEX),
        "/ui/app.js" => Some(&SCRIPT),
        "/ui/app.css" => Some(&STYLE),
        _ => None,
    }
}

pub(super) fn response(asset: &Asset) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(asset.body.as_bytes())));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(asset.content_type),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    // A new binary may bring a new page: always ask again.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
