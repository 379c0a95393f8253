//! The front end, built from `console/` (`npm run build`) into `console/dist/` and embedded
//! here, so that the console needs nothing installed at run time and a fresh clone builds
//! without Node. `dev/test` rebuilds it and fails if the result differs from what is
//! committed.
//!
//! These files are the same for everyone and hold no data: they are the only answers given
//! without a session. Nothing here is generated per request.

use axum::extract::Path;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use sha2::{Digest, Sha256};
use std::sync::OnceLock;

const INDEX: &[u8] = include_bytes!("../../../../console/dist/index.html");

/// `(name, content type, bytes)` of every file under `/assets/`.
const FILES: &[(&str, &str, &[u8])] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../../../console/dist/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_bytes!("../../../../console/dist/app.css"),
    ),
    (
        "icon.svg",
        "image/svg+xml",
        include_bytes!("../../../../console/dist/icon.svg"),
    ),
];

/// The page every console address starts from; its script does the rest.
pub(super) fn shell() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response()
}

/// A strong validator per file, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        FILES
            .iter()
            .map(|(_, _, bytes)| {
                let digest = Sha256::digest(bytes);
                let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

/// `GET /assets/{file}`: revalidated on every load (no-cache), answered 304 when unchanged.
pub(super) async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    let Some(i) = FILES.iter().position(|(name, _, _)| *name == file) else {
        return super::serve::error(StatusCode::NOT_FOUND, "no such file");
    };
    let (_, content_type, bytes) = FILES[i];
    let etag = &etags()[i];
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut res = match fresh {
        true => StatusCode::NOT_MODIFIED.into_response(),
        false => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    res
}
