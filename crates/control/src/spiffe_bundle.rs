//! The trust bundle in the SPIFFE bundle format (a JWK Set: one `x509-svid` key per root,
//! `spiffe_sequence`, `spiffe_refresh_hint`), as `bulkhead ca bundle -o spiffe` prints it
//! and the bundle endpoint (`bulkhead control --bundle-endpoint ADDR`) serves it at `/`.
//!
//! The endpoint follows the `https_spiffe` profile of SPIFFE federation: HTTPS (TLS 1.3)
//! with a certificate the control plane issues itself from the signing CA for
//! `spiffe://<td>/bulkhead/bundle-endpoint`, re-issued at half-life and on every CA change.
//! It serves only the public document: GET `/`, nothing else, no secret.

use crate::cas::{CaSet, CaState};
use crate::error::ControlError;
use crate::listener::next_connection;
use crate::service::State;
use bulkhead_identity::jwk::{KeyParams, x509_svid_key};
use http::{Method, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// The endpoint's identity is `spiffe://<td>/bulkhead/<this>` (one of the mesh's own).
const BUNDLE_ENDPOINT_NAME: &str = "bundle-endpoint";
/// How often a federated trust domain should fetch the bundle again (seconds), unless
/// `bulkhead control --bundle-refresh-hint` says otherwise.
pub const REFRESH_HINT_SECS: u64 = 300;
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_CONNECTIONS: usize = 64;

/// The sequence number of a CA set's bundle: it grows by one each time a root enters the
/// bundle (a CA added) or leaves it (a CA retired), and records are never deleted.
pub(crate) fn sequence(set: &CaSet) -> u64 {
    set.members()
        .iter()
        .map(|m| 1 + u64::from(m.record.state == CaState::Retired))
        .sum()
}

/// The SPIFFE bundle document of a CA set. A root whose key the format cannot carry is left
/// out and logged (the PEM bundle still has it); every root Bulkhead generates is EC P-256.
/// The document also carries the JWT-SVID signing key's public half (`use: jwt-svid`, with
/// its `kid`), so that a federating trust domain can validate our JWT-SVIDs.
pub(crate) fn document(
    set: &CaSet,
    refresh_hint: u64,
    jwt: &[bulkhead_identity::jwt::JwtPublicKey],
) -> serde_json::Value {
    let keys: Vec<serde_json::Value> = set
        .bundle()
        .roots()
        .iter()
        .filter_map(|root| match x509_svid_key(root) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(error = %e, "a root left out of the SPIFFE bundle");
                None
            }
        })
        .map(|key| {
            let mut jwk = serde_json::json!({ "use": "x509-svid", "x5c": [key.x5c] });
            match key.params {
                KeyParams::Ec { crv, x, y } => {
                    jwk["kty"] = "EC".into();
                    jwk["crv"] = crv.into();
                    jwk["x"] = x.into();
                    jwk["y"] = y.into();
                }
                KeyParams::Rsa { n, e } => {
                    jwk["kty"] = "RSA".into();
                    jwk["n"] = n.into();
                    jwk["e"] = e.into();
                }
            }
            jwk
        })
        .chain(jwt.iter().map(|k| k.to_json()))
        .collect();
    serde_json::json!({
        "keys": keys,
        "spiffe_sequence": sequence(set),
        "spiffe_refresh_hint": refresh_hint,
    })
}

/// The document as served and printed: pretty JSON and a final newline.
pub(crate) fn document_text(
    set: &CaSet,
    refresh_hint: u64,
    jwt: &[bulkhead_identity::jwt::JwtPublicKey],
) -> String {
    let mut text =
        serde_json::to_string_pretty(&document(set, refresh_hint, jwt)).unwrap_or_default();
    text.push('\n');
    text
}

/// Binds the bundle endpoint and serves it until `stop`.
pub(crate) async fn spawn(
    state: Arc<State>,
    listen: SocketAddr,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr, ControlError> {
    let (tcp, addr) = crate::listener::bind(listen).await?;
    // An SVID for spiffe://<td>/bulkhead/bundle-endpoint, kept current; no client certificate.
    let tls =
        crate::Issuer::new(state.clone()).serving(BUNDLE_ENDPOINT_NAME, &[], &[b"http/1.1"])?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(listen = %addr, "SPIFFE bundle endpoint listening (https_spiffe)");
    tokio::spawn(async move {
        while let Some((permit, tcp, remote)) =
            next_connection(&tcp, &slots, &mut stop, "bundle endpoint").await
        {
            let config = tls.config();
            let state = state.clone();
            tokio::spawn(async move {
                let _permit = permit;
                connection(tcp, remote, config, state).await;
            });
        }
    });
    Ok(addr)
}

async fn connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    config: Arc<ServerConfig>,
    state: Arc<State>,
) {
    let Some(stream) = crate::listener::tls_handshake(config, tcp, remote, "bundle endpoint").await
    else {
        return;
    };
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(answer(&state, req.method(), req.uri().path())) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%remote, error = %e, "bundle endpoint connection ended");
    }
}

fn answer(state: &State, method: &Method, path: &str) -> http::Response<Full<Bytes>> {
    let (status, body, kind) = match (method, path) {
        (&Method::GET, "/") => (
            StatusCode::OK,
            document_text(
                &state.cas.borrow(),
                state.bundle_refresh_hint,
                &state.jwt.load().public(crate::proxies::unix_now()),
            ),
            "application/json",
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "the SPIFFE bundle is served at /\n".to_string(),
            "text/plain; charset=utf-8",
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET\n".to_string(),
            "text/plain; charset=utf-8",
        ),
    };
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(kind) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}
