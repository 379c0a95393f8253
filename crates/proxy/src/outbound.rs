//! The outbound side: plain HTTP in from the local app on a per-upstream port, mTLS out to
//! that upstream's sidecar, which must present the declared SPIFFE ID.

use crate::config::UpstreamSpec;
use crate::http::{
    Body, DECISION_HEADER, HeaderView, Link, SOURCE_HEADER, accept_loop, check_path, listen,
    origin_form, proxy_response, request_host, response_body, server, strip_hop_by_hop,
};
use crate::{HANDSHAKE_TIMEOUT, ProxyError, Shared};
use bulkhead_identity::tls::server_name;
use bulkhead_policy::model::Direction;
use bulkhead_policy::{Decision, Http, Peer, Protocol, Request as PolicyRequest};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub(crate) async fn spawn(
    spec: &UpstreamSpec,
    shared: Arc<Shared>,
) -> Result<SocketAddr, ProxyError> {
    let (listener, addr) = listen(spec.listen, &format!("upstream {}", spec.name)).await?;
    let spec = Arc::new(spec.clone());
    tracing::info!(listen = %addr, upstream = spec.name, address = %spec.address, identity = %spec.identity, "outbound listener ready");
    let state = shared.clone();
    accept_loop(listener, shared, "outbound", move |tcp, remote| {
        let span = tracing::info_span!("outbound", src.addr = %remote, dst.name = spec.name, dst.addr = %spec.address);
        (serve(tcp, spec.clone(), state.clone()), span)
    });
    Ok(addr)
}

async fn serve(tcp: TcpStream, spec: Arc<UpstreamSpec>, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    let link = Arc::new(Link::default());
    let http = server(&shared.limits);
    let service = service_fn(move |req| {
        let (link, spec, shared) = (link.clone(), spec.clone(), shared.clone());
        async move {
            let start = std::time::Instant::now();
            let resp = handle(req, link, spec.clone(), shared.clone()).await;
            if let Ok(r) = &resp {
                let status = r.status().as_u16();
                shared
                    .metrics
                    .request("outbound", spec.identity.as_str(), status, start.elapsed());
            }
            resp
        }
    });
    if let Err(e) = http.serve_connection(TokioIo::new(tcp), service).await {
        tracing::debug!(error = %e, "outbound connection ended with an error");
    }
}

async fn handle(
    mut req: Request<Incoming>,
    link: Arc<Link>,
    spec: Arc<UpstreamSpec>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    if let Err(why) = check_path(req.uri().path()) {
        return Ok(proxy_response(
            StatusCode::BAD_REQUEST,
            None,
            format!("bulkhead: {why}"),
        ));
    }
    // Egress policy: the sending side judges the request before it leaves.
    let decision = egress_decision(&req, &spec, &shared);
    crate::http::log_decision("outbound", &decision, spec.identity.as_str(), &shared, &req);
    if let Decision {
        verdict: bulkhead_policy::Verdict::Deny,
        ..
    } = &decision
    {
        return Ok(proxy_response(
            StatusCode::FORBIDDEN,
            Some(&decision.header_value()),
            format!("bulkhead: egress {decision}"),
        ));
    }
    req.headers_mut().remove(DECISION_HEADER);
    origin_form(&mut req);
    strip_hop_by_hop(req.headers_mut());
    // Only the receiving sidecar may say who the caller is.
    req.headers_mut().remove(SOURCE_HEADER);
    match link
        .send(req, || {
            // The current certificate, for each new upstream connection.
            let tls = shared.tls.load().upstreams.get(&spec.name).cloned();
            connect_upstream(tls, spec.address, shared.clone())
        })
        .await
    {
        Ok(resp) => Ok(response_body(resp)),
        Err(e) => {
            tracing::warn!(upstream = spec.name, error = %e, "upstream unreachable");
            Ok(proxy_response(
                StatusCode::BAD_GATEWAY,
                None,
                format!(
                    "bulkhead: upstream {} at {} (expected identity {}) failed: {e}",
                    spec.name, spec.address, spec.identity
                ),
            ))
        }
    }
}

fn egress_decision(req: &Request<Incoming>, spec: &UpstreamSpec, shared: &Shared) -> Decision {
    let host = request_host(req);
    let headers = HeaderView(req.headers());
    shared.policies.load().evaluate(&PolicyRequest {
        direction: Direction::Egress,
        subject: &shared.workload,
        peer: Peer {
            identity: Some(spec.identity.as_str()),
            ip: Some(spec.address.ip()),
            workload: spec.workload.as_ref(),
        },
        port: spec.port,
        protocol: Protocol::Http,
        http: Some(Http {
            method: req.method().as_str(),
            path: req.uri().path(),
            host: host.as_deref(),
            headers: &headers,
        }),
    })
}

async fn connect_upstream(
    tls: Option<Arc<rustls::ClientConfig>>,
    addr: SocketAddr,
    shared: Arc<Shared>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(
        tls.ok_or_else(|| std::io::Error::other("no TLS configuration for this upstream"))?,
    );
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name(), tcp)).await {
        Ok(Ok(tls)) => {
            shared.metrics.connection("outbound");
            Ok(tls)
        }
        Ok(Err(e)) => {
            shared
                .metrics
                .tls_failure("outbound", crate::metrics::TlsFailure::of_io(&e));
            Err(std::io::Error::new(
                e.kind(),
                format!("mTLS handshake failed: {}", tls_reason(&e)),
            ))
        }
        Err(_) => {
            shared
                .metrics
                .tls_failure("outbound", crate::metrics::TlsFailure::Timeout);
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "mTLS handshake timed out",
            ))
        }
    }
}

/// The reason a handshake failed, in words: our own SVID checks say what they found.
fn tls_reason(e: &std::io::Error) -> String {
    use rustls::{CertificateError, Error as TlsError};
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<TlsError>())
    {
        Some(TlsError::InvalidCertificate(CertificateError::Other(other))) => other.0.to_string(),
        Some(TlsError::InvalidCertificate(reason)) => {
            format!("peer certificate refused: {reason:?}")
        }
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}
