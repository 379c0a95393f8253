//! The outbound side: the local app's connections, plain, either to a per-upstream listener
//! (explicit mode) or redirected by `bulkhead-proxy init` to one listener that reads each
//! connection's original destination (transparent mode). Egress policy is judged here, then
//! the connection goes over mTLS to the destination's sidecar, which must present the
//! identity declared for it. Destinations outside the mesh get opaque TCP, if policy allows.

use crate::clients::Alpn;
use crate::config::UpstreamSpec;
use crate::detect::{Sniffed, sniff};
use crate::flows::Seen;
use crate::http::{
    Body, DECISION_HEADER, HeaderView, Link, SOURCE_HEADER, accept_loop, canonical_request, denial,
    forward_upgrade, is_upgrade, listen, origin_form, protocol_of, proxy_response, response_body,
    serve_http, set_target, strip_hop_by_hop,
};
use crate::http::{content_length, grpc_status};
use crate::metrics::{LabelText, Parties};
use crate::tcp::{Flow, Reset};
use crate::{HANDSHAKE_TIMEOUT, ProxyError, Shared};
use bulkhead_identity::SpiffeId;
use bulkhead_identity::tls::server_name;
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_policy::{CanonicalRequest, Decision, Peer, Protocol, Request as PolicyRequest};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Where an outbound connection goes.
#[derive(Debug)]
pub(crate) struct Dest {
    /// For logs and errors: the upstream's name or the address.
    pub name: String,
    pub address: SocketAddr,
    /// The identity its sidecar must present; `None` for a destination outside the mesh.
    pub identity: Option<SpiffeId>,
    pub workload: Option<WorkloadRef>,
    /// The destination port policy sees.
    pub port: u16,
    /// The identity, shared, to find this destination's multiplexed connection.
    pub mux_key: Arc<str>,
}

impl Dest {
    fn of_upstream(spec: &UpstreamSpec) -> Dest {
        Dest {
            name: spec.name.clone(),
            address: spec.address,
            identity: Some(spec.identity.clone()),
            workload: spec.workload.clone(),
            port: spec.port,
            mux_key: Arc::from(spec.identity.as_str()),
        }
    }

    /// A captured connection's destination: in the mesh if a Workload declares its address.
    fn of_original(orig: SocketAddr, shared: &Shared) -> Dest {
        let endpoints = shared.endpoints.load();
        let endpoint = endpoints.get(orig.ip());
        Dest {
            name: match endpoint {
                Some(e) => format!("{}@{orig}", e.workload),
                None => orig.to_string(),
            },
            address: orig,
            identity: endpoint.and_then(|e| SpiffeId::parse(&e.identity).ok()),
            workload: endpoint.map(|e| e.workload.clone()),
            port: orig.port(),
            mux_key: Arc::from(endpoint.map_or("", |e| e.identity.as_str())),
        }
    }

    fn declared_protocol(&self, shared: &Shared) -> Option<Protocol> {
        let w = self.workload.as_ref()?;
        shared
            .endpoints
            .load()
            .get(self.address.ip())
            .filter(|e| &e.workload == w)
            .and_then(|e| e.protocol(self.port))
            .or_else(|| shared.policies.load().declared_protocol(w, self.port))
    }
}

/// An explicit upstream's listener.
pub(crate) async fn spawn(
    spec: &UpstreamSpec,
    shared: Arc<Shared>,
) -> Result<SocketAddr, ProxyError> {
    let (listener, addr) = listen(spec.listen, &format!("upstream {}", spec.name)).await?;
    let dest = Arc::new(Dest::of_upstream(spec));
    tracing::info!(listen = %addr, upstream = spec.name, address = %spec.address, identity = %spec.identity, "outbound listener ready");
    let state = shared.clone();
    accept_loop(listener, shared, "outbound", move |tcp, remote| {
        let span = tracing::info_span!("outbound", src.addr = %remote, dst.name = dest.name, dst.addr = %dest.address);
        (serve(tcp, dest.clone(), state.clone()), span)
    });
    Ok(addr)
}

/// The transparent outbound listener.
pub(crate) async fn spawn_transparent(
    listen_on: SocketAddr,
    shared: Arc<Shared>,
) -> Result<SocketAddr, ProxyError> {
    let (listener, addr) = listen(listen_on, "outbound (transparent)").await?;
    tracing::info!(listen = %addr, "outbound listener ready (transparent)");
    let state = shared.clone();
    accept_loop(listener, shared, "outbound", move |tcp, remote| {
        let span = tracing::info_span!("outbound", src.addr = %remote);
        let shared = state.clone();
        let conn = async move {
            match redirected_here(&tcp) {
                Ok(orig) => {
                    let dest = Arc::new(Dest::of_original(orig, &shared));
                    tracing::debug!(
                        dst.name = dest.name,
                        in_mesh = dest.identity.is_some(),
                        "captured outbound connection"
                    );
                    serve(tcp, dest, shared).await
                }
                Err(why) => {
                    shared.metrics.reset("outbound", "not_redirected");
                    tracing::warn!(reason = "not_redirected", "connection refused: {why}");
                    tcp.reset()
                }
            }
        };
        (conn, span)
    });
    Ok(addr)
}

/// The original destination of a connection that `init`'s OUTPUT rules redirected to the
/// transparent listener. Such a connection arrives on loopback; anything else (a connection
/// from another host, or straight to the listener's own port, which would be relayed back
/// to the listener) is refused.
fn redirected_here(tcp: &TcpStream) -> Result<SocketAddr, String> {
    let local = tcp
        .local_addr()
        .map(crate::capture::canonical)
        .map_err(|e| e.to_string())?;
    let orig = crate::capture::original_dst(tcp).map_err(|e| {
        format!("no original destination ({e}); is this listener the target of `bulkhead-proxy init`'s rules?")
    })?;
    if !local.ip().is_loopback() {
        return Err(format!(
            "arrived at {local}: only this namespace's redirected connections (on loopback) are served"
        ));
    }
    if !crate::capture::was_redirected(local, orig) {
        return Err(format!(
            "{orig} is the proxy's own outbound port, not a redirected destination"
        ));
    }
    Ok(orig)
}

async fn serve(tcp: TcpStream, dest: Arc<Dest>, shared: Arc<Shared>) {
    let _ = tcp.set_nodelay(true);
    if dest.identity.is_none() {
        return relay_outside(tcp, dest, shared).await;
    }
    let declared = dest.declared_protocol(&shared);
    let sniffed = match declared {
        Some(Protocol::Tcp) => Sniffed::Opaque,
        _ => match sniff(&tcp, shared.limits.detect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "connection closed before it said anything");
                return;
            }
        },
    };
    match sniffed {
        Sniffed::Http1 | Sniffed::H2 => {
            serve_http_out(tcp, sniffed == Sniffed::H2, dest, shared).await
        }
        Sniffed::Tls | Sniffed::Opaque => relay_mesh(tcp, dest, shared).await,
    }
}

fn tcp_flow(dest: &Dest) -> Flow {
    Flow {
        direction: Direction::Egress,
        peer_identity: dest.identity.as_ref().map(|i| i.as_str().to_string()),
        peer_ip: Some(dest.address.ip()),
        peer_workload: dest.workload.clone(),
        port: dest.port,
    }
}

/// Opaque TCP to a mesh destination, over mTLS. Refused with a reset when egress policy
/// denies it or the destination's sidecar does not take it; a reset from the far side is
/// passed on as a reset.
async fn relay_mesh(tcp: TcpStream, dest: Arc<Dest>, shared: Arc<Shared>) {
    let flow = tcp_flow(&dest);
    let decision = flow.decide(&shared);
    flow.log(&decision, &shared);
    if !decision.is_allow() {
        shared.metrics.reset("outbound", "denied");
        return tcp.reset();
    }
    match connect_upstream(dest.clone(), Alpn::Tcp, shared.clone()).await {
        Ok(up) => relay_or_reset(&shared, flow, tcp, up).await,
        Err(e) => {
            tracing::warn!(dst.name = dest.name, error = %e, "upstream unreachable");
            shared.metrics.reset("outbound", "unreachable");
            tcp.reset()
        }
    }
}

/// Opaque TCP to a destination outside the mesh: plain, if egress policy allows it; refused
/// with a reset otherwise, or when the destination refuses it.
async fn relay_outside(tcp: TcpStream, dest: Arc<Dest>, shared: Arc<Shared>) {
    let flow = tcp_flow(&dest);
    let decision = flow.decide(&shared);
    flow.log(&decision, &shared);
    if !decision.is_allow() {
        shared.metrics.reset("outbound", "denied");
        return tcp.reset();
    }
    match TcpStream::connect(dest.address).await {
        Ok(up) => {
            let _ = up.set_nodelay(true);
            relay_or_reset(&shared, flow, tcp, up).await
        }
        Err(e) => {
            tracing::warn!(dst.name = dest.name, error = %e, "destination unreachable");
            shared.metrics.reset("outbound", "unreachable");
            tcp.reset()
        }
    }
}

/// Relays the app's connection; if either side fails (the far side reset), resets both.
async fn relay_or_reset<U: Reset + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    shared: &Shared,
    flow: Flow,
    mut app: TcpStream,
    mut up: U,
) {
    if crate::tcp::relay(shared, flow, &mut app, &mut up).await == "error" {
        shared.metrics.reset("outbound", "relay_error");
        app.reset();
        up.reset();
    }
}

async fn serve_http_out(tcp: TcpStream, h2: bool, dest: Arc<Dest>, shared: Arc<Shared>) {
    let link = Arc::new(Link::new(h2));
    let limits = shared.limits;
    let parties = Arc::new(Parties {
        source: shared.identity.clone(),
        destination: LabelText::new(dest.identity.as_ref().map_or("-", SpiffeId::as_str)),
    });
    let service = service_fn(move |req| {
        let (link, dest, shared, parties) =
            (link.clone(), dest.clone(), shared.clone(), parties.clone());
        async move {
            let start = std::time::Instant::now();
            let resp = handle(req, link, h2, dest, shared.clone()).await;
            if let Ok(r) = &resp {
                shared
                    .metrics
                    .request("outbound", &parties, r.status().as_u16(), start.elapsed());
            }
            resp
        }
    });
    serve_http(tcp, h2, &limits, service).await;
}

async fn handle(
    mut req: Request<Incoming>,
    link: Arc<Link>,
    h2: bool,
    dest: Arc<Dest>,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    // What policy judges, and the destination receives: the canonical request.
    let canonical = match canonical_request(&req) {
        Ok(c) => c,
        Err(why) => {
            tracing::warn!(
                path = req.uri().path(),
                why = why.label(),
                "request refused: {why}"
            );
            return Ok(proxy_response(
                StatusCode::BAD_REQUEST,
                None,
                format!("bulkhead: {why}"),
            ));
        }
    };
    // Egress policy: the sending side judges the request before it leaves.
    let decision = egress_decision(&canonical, &req, &dest, &shared);
    let rewrite = canonical
        .path_rewritten()
        .then(|| canonical.target().into_owned());
    if let Some(target) = rewrite
        && let Err(e) = set_target(&mut req, &target)
    {
        tracing::warn!(error = %e, "request refused: its canonical target is not a URI");
        return Ok(proxy_response(
            StatusCode::BAD_REQUEST,
            None,
            "bulkhead: the request target cannot be forwarded".into(),
        ));
    }
    let peer = dest.identity.as_ref().map_or("-", SpiffeId::as_str);
    crate::http::log_decision("outbound", &decision, peer, &shared, &req);
    // Kept for the flow record after `req` is sent on: a `Uri` clone shares the request's
    // bytes (a reference count), where copying the path into a `String` would allocate.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let (protocol, bytes_in) = (protocol_of(&req), content_length(req.headers()));
    let record = |latency, bytes_out, status: StatusCode, headers: &http::HeaderMap| {
        // Destinations outside the mesh have no workload to draw an edge to.
        let Some(destination) = dest.workload.as_ref() else {
            return;
        };
        shared.observe(&Seen {
            direction: Direction::Egress,
            source_identity: Some(shared.identity.as_str()),
            source_workload: Some(&shared.workload),
            destination,
            port: dest.port,
            protocol,
            method: Some(method.as_str()),
            path: Some(uri.path()),
            decision: &decision,
            bytes_in,
            bytes_out,
            latency,
            status: Some(status.as_u16()),
            grpc_status: grpc_status(protocol, headers),
        })
    };
    if !decision.is_allow() {
        let resp = denial(&req, &decision, format!("bulkhead: egress {decision}"));
        record(std::time::Duration::ZERO, 0, resp.status(), resp.headers());
        return Ok(resp);
    }
    req.headers_mut().remove(DECISION_HEADER);
    origin_form(&mut req);
    let upgrade = is_upgrade(&req);
    if !upgrade {
        strip_hop_by_hop(req.headers_mut());
    }
    // Only the receiving sidecar may say who the caller is.
    req.headers_mut().remove(SOURCE_HEADER);
    let alpn = if h2 { Alpn::H2 } else { Alpn::Http1 };
    let sent = if upgrade {
        let connect = connect_upstream(dest.clone(), alpn, shared.clone());
        forward_upgrade(req, connect, shared.limits.idle_timeout).await
    } else if h2 {
        link.send(req, || connect_upstream(dest.clone(), alpn, shared.clone()))
            .await
            .map(response_body)
    } else {
        // HTTP/1.1 shares the destination's one multiplexed connection.
        shared
            .mux
            .send(dest.address, &dest.mux_key, req, || {
                connect_upstream(dest.clone(), Alpn::Mux, shared.clone())
            })
            .await
            .map(response_body)
    };
    match sent {
        Ok(resp) => {
            record(
                started.elapsed(),
                content_length(resp.headers()),
                resp.status(),
                resp.headers(),
            );
            Ok(resp)
        }
        Err(e) => {
            tracing::warn!(upstream = dest.name, error = %e, "upstream unreachable");
            let resp = proxy_response(
                StatusCode::BAD_GATEWAY,
                None,
                format!(
                    "bulkhead: upstream {} at {} (expected identity {}) failed: {e}",
                    dest.name, dest.address, peer
                ),
            );
            record(started.elapsed(), 0, resp.status(), resp.headers());
            Ok(resp)
        }
    }
}

fn egress_decision(
    canonical: &CanonicalRequest<'_>,
    req: &Request<Incoming>,
    dest: &Dest,
    shared: &Shared,
) -> Decision {
    let headers = HeaderView(req.headers());
    shared.policies.load().evaluate(&PolicyRequest {
        direction: Direction::Egress,
        subject: &shared.workload,
        peer: Peer {
            identity: dest.identity.as_ref().map(SpiffeId::as_str),
            ip: Some(bulkhead_policy::canonical::peer_ip(dest.address.ip())),
            workload: dest.workload.as_ref(),
        },
        port: dest.port,
        protocol: protocol_of(req),
        http: Some(canonical.http(&headers)),
    })
}

/// Dials `dest` over mTLS, requiring its identity, with the given application protocol.
async fn connect_upstream(
    dest: Arc<Dest>,
    alpn: Alpn,
    shared: Arc<Shared>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let identity = dest
        .identity
        .as_ref()
        .ok_or_else(|| std::io::Error::other("destination is outside the mesh"))?;
    // The current certificate, for each new upstream connection.
    let set = shared.tls.load_full();
    let tls = shared
        .clients
        .get(&set, identity, alpn)
        .map_err(std::io::Error::other)?;
    let connector = TlsConnector::from(tls);
    let addr = dest.address;
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name(), tcp)).await {
        Ok(Ok(tls)) => {
            shared.metrics.connection("outbound");
            Ok(tls)
        }
        Ok(Err(e)) => {
            let reason = crate::metrics::TlsFailure::of_io(&e);
            shared.metrics.tls_failure("outbound", reason);
            Err(std::io::Error::new(
                e.kind(),
                format!(
                    "mTLS handshake failed (reason={}): {}",
                    reason.label(),
                    tls_reason(&e)
                ),
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
