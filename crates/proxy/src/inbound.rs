//! The inbound side: mTLS in from other sidecars, authorization, plain HTTP to the local app.

use crate::config::InboundSpec;
use crate::http::{
    Body, DECISION_HEADER, HeaderView, Link, SOURCE_HEADER, accept_loop, check_path, listen,
    origin_form, proxy_response, request_host, response_body, server, strip_hop_by_hop,
};
use crate::metrics::TlsFailure;
use crate::{HANDSHAKE_TIMEOUT, ProxyError, Shared};
use bulkhead_identity::SpiffeId;
use bulkhead_identity::tls::peer_identity;
use bulkhead_policy::model::Direction;
use bulkhead_policy::{Http, Peer, Protocol, Request as PolicyRequest};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

pub(crate) async fn spawn(
    spec: &InboundSpec,
    shared: Arc<Shared>,
) -> Result<SocketAddr, ProxyError> {
    let (listener, addr) = listen(spec.listen, "inbound").await?;
    let (app, port) = (spec.app, spec.port);
    tracing::info!(listen = %addr, %app, port, "inbound listener ready");
    let state = shared.clone();
    accept_loop(listener, shared, "inbound", move |tcp, remote| {
        let span = tracing::info_span!("inbound", src.addr = %remote, dst.app = %app);
        // The current certificate, at every accept: rotation reaches new connections, open
        // ones keep theirs.
        let acceptor = TlsAcceptor::from(state.tls.load().server.clone());
        (
            serve(tcp, remote, acceptor, (app, port), state.clone()),
            span,
        )
    });
    Ok(addr)
}

async fn serve(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    (app, port): (SocketAddr, u16),
    shared: Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let reason = TlsFailure::of_io(&e);
            shared.metrics.tls_failure("inbound", reason);
            tracing::warn!(reason = reason.label(), error = %e, "connection refused: mTLS handshake failed");
            return;
        }
        Err(_) => {
            shared.metrics.tls_failure("inbound", TlsFailure::Timeout);
            tracing::warn!(
                reason = "timeout",
                "connection refused: mTLS handshake timed out"
            );
            return;
        }
    };
    let peer = match peer_identity(
        tls.get_ref().1.peer_certificates(),
        shared.tls.load().bundle.trust_domain(),
    ) {
        Ok(id) => id,
        Err(e) => {
            let reason = TlsFailure::of_svid(&e);
            shared.metrics.tls_failure("inbound", reason);
            tracing::warn!(reason = reason.label(), error = %e, "connection refused: peer certificate is not an acceptable SVID");
            return;
        }
    };
    shared.metrics.connection("inbound");
    tracing::debug!(src.id = %peer, "mTLS connection accepted");
    let link = Arc::new(Link::default());
    let http = server(&shared.limits);
    let service = service_fn(move |req| {
        let (peer, link, shared) = (peer.clone(), link.clone(), shared.clone());
        async move {
            let start = Instant::now();
            let resp = handle(
                req,
                (peer.clone(), remote),
                link,
                (app, port),
                shared.clone(),
            )
            .await;
            if let Ok(r) = &resp {
                shared.metrics.request(
                    "inbound",
                    peer.as_str(),
                    r.status().as_u16(),
                    start.elapsed(),
                );
            }
            resp
        }
    });
    let conn = http.serve_connection(TokioIo::new(tls), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "inbound connection ended with an error");
    }
}

async fn handle(
    mut req: Request<Incoming>,
    (peer, remote): (SpiffeId, SocketAddr),
    link: Arc<Link>,
    (app, port): (SocketAddr, u16),
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    if let Err(why) = check_path(req.uri().path()) {
        tracing::warn!(src.id = %peer, path = req.uri().path(), why, "request refused: ambiguous path");
        return Ok(proxy_response(
            StatusCode::BAD_REQUEST,
            None,
            format!("bulkhead: {why}"),
        ));
    }
    let host = request_host(&req);
    let headers = HeaderView(req.headers());
    let decision = shared.policies.load().evaluate(&PolicyRequest {
        direction: Direction::Ingress,
        subject: &shared.workload,
        peer: Peer {
            identity: Some(peer.as_str()),
            ip: Some(remote.ip()),
            workload: None,
        },
        port,
        protocol: Protocol::Http,
        http: Some(Http {
            method: req.method().as_str(),
            path: req.uri().path(),
            host: host.as_deref(),
            headers: &headers,
        }),
    });
    crate::http::log_decision("inbound", &decision, peer.as_str(), &shared, &req);
    if !decision.is_allow() {
        return Ok(proxy_response(
            StatusCode::FORBIDDEN,
            Some(&decision.header_value()),
            format!("bulkhead: {decision}"),
        ));
    }
    origin_form(&mut req);
    let headers = req.headers_mut();
    strip_hop_by_hop(headers);
    headers.remove(DECISION_HEADER);
    if let Ok(v) = HeaderValue::from_str(peer.as_str()) {
        headers.insert(SOURCE_HEADER, v);
    }
    match link.send(req, || connect_app(app)).await {
        Ok(resp) => {
            let mut resp = response_body(resp);
            if let Ok(v) = HeaderValue::from_str(&decision.header_value()) {
                resp.headers_mut().insert(DECISION_HEADER, v);
            }
            Ok(resp)
        }
        Err(e) => {
            tracing::warn!(%app, error = %e, "local app unreachable");
            Ok(proxy_response(
                StatusCode::BAD_GATEWAY,
                None,
                format!("bulkhead: the local app at {app} did not answer: {e}"),
            ))
        }
    }
}

async fn connect_app(app: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(app).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}
