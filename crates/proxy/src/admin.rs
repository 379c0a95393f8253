//! The admin port: `/metrics` (Prometheus text), `/live`, `/ready`, and `/config` (what is in
//! force: identity, certificate serial and expiry, policy revision). Plain HTTP; bind it to
//! loopback or a port only the node's monitoring can reach.

use crate::{ProxyError, Shared};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

pub(crate) async fn spawn(
    listen: SocketAddr,
    shared: Arc<Shared>,
) -> Result<SocketAddr, ProxyError> {
    // `[::]:PORT` is one dual-stack socket, as for the other listeners.
    let (listener, addr) = crate::http::listen(listen, "admin").await?;
    tracing::info!(listen = %addr, "admin listener ready (/metrics /ready /live /config)");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let shared = shared.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(req, shared.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}

/// Why the proxy is not ready, if it is not.
pub(crate) fn not_ready(shared: &Shared) -> Option<String> {
    let tls = shared.tls.load();
    if tls.svid.not_after() <= SystemTime::now() {
        return Some(format!(
            "SVID {} expired at {} (Unix); renewal has not succeeded",
            tls.svid.serial(),
            crate::unix_seconds(tls.svid.not_after())
        ));
    }
    if shared.snapshot.load().revision() == 0 {
        return Some("no policy revision received from the control plane yet".into());
    }
    None
}

/// The control-plane replicas given and the one in use, for `/config`.
fn control_replica(shared: &Shared) -> serde_json::Value {
    let on = shared.control.watch().borrow().clone();
    serde_json::json!({
        "given": shared.control.given().to_string(),
        "replica": on.as_ref().map(|r| r.addr.to_string()),
        "replicaGiven": on.as_ref().map(|r| r.given.clone()),
        "sinceUnix": on.as_ref().map(|r| crate::unix_seconds(r.since)),
        "moves": on.as_ref().map_or(0, |r| r.moves),
        "movedBecause": on.as_ref().and_then(|r| r.why.clone()),
    })
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => {
            let format = bulkhead_api::exposition::Format::negotiate(
                req.headers()
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            reply(
                StatusCode::OK,
                format.content_type(),
                format.render(bulkhead_api::process::with_process_families(
                    shared.metrics.encode(),
                    "proxy",
                )),
            )
        }
        "/live" => reply(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => match not_ready(&shared) {
            None => reply(StatusCode::OK, "text/plain", "ready\n".into()),
            Some(why) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            ),
        },
        "/config" => {
            let tls = shared.tls.load();
            let snapshot = shared.snapshot.load();
            let body = serde_json::json!({
                "spiffeId": tls.svid.id().to_string(),
                "workload": shared.workload.to_string(),
                "certificate": {
                    "serial": tls.svid.serial(),
                    "issuerSha256": tls.signer,
                    "notBeforeUnix": crate::unix_seconds(tls.svid.not_before()),
                    "notAfterUnix": crate::unix_seconds(tls.svid.not_after()),
                },
                "trustDomain": shared.tls.load().bundle.trust_domain(),
                "trustBundleSha256": tls.roots,
                "federatedTrustBundles": tls.bundle.federated().iter().map(|(td, roots)| {
                    (td.clone(), roots.iter().map(|r| bulkhead_identity::fingerprint(r)).collect::<Vec<_>>())
                }).collect::<std::collections::BTreeMap<_, _>>(),
                "policyRevision": snapshot.revision(),
                "meshEndpoints": snapshot.endpoints().len(),
                "openTcpRelays": shared.relays.len(),
                "sharedUpstreamConnections": shared.mux.open(),
                "flowEdgesHeld": shared.flows.held(),
                "controlPlane": control_replica(&shared),
                "ready": not_ready(&shared).is_none(),
            });
            reply(StatusCode::OK, "application/json", format!("{body:#}\n"))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /metrics, /ready, /live or /config\n".into(),
        ),
    })
}
