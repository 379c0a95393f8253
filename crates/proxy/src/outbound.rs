//! The outbound side: the local app's connections, plain, either to a per-upstream listener
//! (explicit mode) or redirected by `bulkhead-proxy init` to one listener that reads each
//! connection's original destination (transparent mode). Egress policy is judged here, then
//! the connection goes over mTLS to the destination's sidecar, which must present the
//! identity declared for it. Destinations outside the mesh get opaque TCP, if policy allows.

use crate::authz::{Judgement, Snapshot};
use crate::clients::Alpn;
use crate::config::UpstreamSpec;
use crate::deadline::{Clock, ReqBody, response_head};
use crate::detect::{Sniffed, sniff};
use crate::flows::Seen;
use crate::http::{Answered, answered, content_length, grpc_status, head_refused, head_too_large};
use crate::http::{
    Body, DECISION_HEADER, HeaderView, Link, SOURCE_HEADER, XFCC_HEADER, accept_loop,
    canonical_request, denial, listen, origin_form, protocol_of, proxy_response, response_body,
    serve_http, set_target,
};
use crate::metrics::{Parties, Refusal};
use crate::tcp::{Flow, Reset};
use crate::upgrade::{self, OpenedBy};
use crate::{HANDSHAKE_TIMEOUT, ProxyError, Shared};
use bulkhead_identity::SpiffeId;
use bulkhead_identity::tls::server_name;
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_policy::{CanonicalRequest, Peer, Protocol, Request as PolicyRequest};
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
    /// Transparent mode: the revision of the address table this destination was found in.
    /// `None` for an explicit upstream, which the operator declared.
    pub routed_at: Option<u64>,
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
            routed_at: None,
        }
    }

    /// A captured connection's destination: in the mesh if a Workload declares its address.
    fn of_original(orig: SocketAddr, snapshot: &Snapshot) -> Dest {
        let endpoint = snapshot.endpoints().get(orig.ip());
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
            routed_at: Some(snapshot.revision()),
        }
    }

    /// Whether `snapshot` still routes this destination as it was routed when its connection
    /// was accepted: same workload and identity at its address. A request is judged and sent
    /// from one snapshot, so a destination the new address table moved is not served under
    /// the new revision's rules.
    fn routed_as_in(&self, snapshot: &Snapshot) -> bool {
        match self.routed_at {
            None => true,
            Some(revision) if revision == snapshot.revision() => true,
            Some(_) => {
                let now = snapshot.endpoints().get(self.address.ip());
                now.map(|e| &e.workload) == self.workload.as_ref()
                    && now.map(|e| e.identity.as_str())
                        == self.identity.as_ref().map(SpiffeId::as_str)
            }
        }
    }

    /// The protocol the destination's Workload declares for its port. A captured
    /// destination is found by its address. An explicit upstream is found by its
    /// `workload=`, or without one by its identity, in the mesh's address table and in the
    /// declarations this proxy was sent: the protocol they all declare for the port (none if
    /// they differ, or one does not declare it).
    fn declared_protocol(&self, snapshot: &Snapshot) -> Option<Protocol> {
        if self.routed_at.is_some() {
            let w = self.workload.as_ref()?;
            return snapshot
                .endpoints()
                .get(self.address.ip())
                .filter(|e| &e.workload == w)
                .and_then(|e| e.protocol(self.port))
                .or_else(|| snapshot.declared_protocol(w, self.port));
        }
        let identity = self.identity.as_ref()?.as_str();
        let by_name = |w: &WorkloadRef| match &self.workload {
            Some(named) => named == w,
            None => true,
        };
        let policy_workloads: Vec<&WorkloadRef> = match &self.workload {
            Some(w) => vec![w],
            None => snapshot.workloads_with_identity(identity).iter().collect(),
        };
        let mut declared = snapshot
            .endpoints()
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e.identity == identity && by_name(&e.workload))
            .map(|e| e.protocol(self.port))
            .chain(
                policy_workloads
                    .into_iter()
                    .filter_map(|w| snapshot.declared_protocol(w, self.port).map(Some)),
            );
        let first = declared.next()??;
        declared.all(|p| p == Some(first)).then_some(first)
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
                    let dest = Arc::new(Dest::of_original(orig, &shared.snapshot.load()));
                    tracing::debug!(
                        dst.name = dest.name,
                        in_mesh = dest.identity.is_some(),
                        "captured outbound connection"
                    );
                    serve(tcp, dest, shared).await
                }
                Err(why) => {
                    shared.metrics.reset("outbound", "not_redirected");
                    if let Some(unlogged) =
                        shared.refuse("outbound", Refusal::NoOriginalDestination)
                    {
                        tracing::warn!(
                            reason = "not_redirected",
                            unlogged,
                            "connection refused: {why}"
                        );
                    }
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
    // The relays are boxed (as `serve_http` boxes its connections): a connection's task is
    // as large as the largest branch it could take, and every keep-alive HTTP connection
    // would otherwise hold room for a relay's upstream handshake it never makes.
    if dest.identity.is_none() {
        return Box::pin(relay_outside(tcp, dest, shared)).await;
    }
    let declared = dest.declared_protocol(&shared.snapshot.load());
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
        // An idle or non-HTTP connection to a port declared for HTTP: the peer's sidecar
        // would refuse it after a handshake, so it is refused here without dialling.
        Sniffed::Tls | Sniffed::Opaque if declared.is_some_and(Protocol::is_http) => {
            if let Some(unlogged) = shared.refuse("outbound", Refusal::NotHttp) {
                tracing::warn!(
                    dst.name = dest.name,
                    port = dest.port,
                    reason = Refusal::NotHttp.label(),
                    unlogged,
                    "connection refused: the destination port is declared for HTTP but the app \
                     sent no HTTP within the detection timeout"
                );
            }
            tcp.reset()
        }
        Sniffed::Tls | Sniffed::Opaque => Box::pin(relay_mesh(tcp, dest, shared)).await,
    }
}

/// What L4 policy sees of a connection to `dest`.
fn tcp_flow(dest: &Dest) -> Flow {
    Flow {
        direction: Direction::Egress,
        peer_identity: dest.identity.clone(),
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
    let Some(permit) = flow.admit(&shared) else {
        return tcp.reset();
    };
    match connect_upstream(dest.clone(), Alpn::Tcp, shared.clone()).await {
        Ok(up) => relay_or_reset(&shared, permit, flow, tcp, up).await,
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
    let Some(permit) = flow.admit(&shared) else {
        return tcp.reset();
    };
    match TcpStream::connect(dest.address).await {
        Ok(up) => {
            let _ = up.set_nodelay(true);
            relay_or_reset(&shared, permit, flow, tcp, up).await
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
    permit: crate::authz::Permit,
    flow: Flow,
    mut app: TcpStream,
    mut up: U,
) {
    if crate::tcp::relay(shared, permit, flow, &mut app, &mut up).await == "error" {
        shared.metrics.reset("outbound", "relay_error");
        app.reset();
        up.reset();
    }
}

async fn serve_http_out(tcp: TcpStream, h2: bool, dest: Arc<Dest>, shared: Arc<Shared>) {
    let link = Arc::new(Link::new(h2));
    let parties = Arc::new(Parties::with_peer(
        false,
        &shared.identity,
        &shared.place,
        dest.identity.as_ref().map(SpiffeId::as_str),
        dest.workload.as_ref(),
    ));
    // HTTP/1.1 only: its head and keep-alive deadlines, marked by each request.
    let clock = (!h2).then(Clock::new);
    let conn_clock = clock.clone();
    let state = shared.clone();
    let service = service_fn(move |req| {
        let (link, dest, shared, parties) =
            (link.clone(), dest.clone(), shared.clone(), parties.clone());
        let clock = conn_clock.clone();
        async move {
            let start = std::time::Instant::now();
            if let Some(c) = &clock {
                c.busy();
            }
            let in_mesh = dest.identity.is_some();
            // Boxed for each request: see `crate::http::serve_http` on request futures.
            let mut resp = Box::pin(handle(req, link, h2, dest, &parties, shared.clone())).await;
            if let Ok(r) = &mut resp {
                let clock = clock.as_ref();
                crate::http::served(r, &shared, "outbound", &parties, in_mesh, start, clock);
            }
            resp
        }
    });
    serve_http(tcp, h2, clock, &state, "outbound", service).await;
}

async fn handle(
    mut req: Request<Incoming>,
    link: Arc<Link>,
    h2: bool,
    dest: Arc<Dest>,
    parties: &Parties,
    shared: Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let started_at = std::time::SystemTime::now();
    if head_too_large(&req, &shared.limits) {
        return Ok(head_refused(&shared, "outbound"));
    }
    // What policy judges, and the destination receives: the canonical request.
    let canonical = match canonical_request(&req) {
        Ok(c) => c,
        Err(why) => {
            if let Some(unlogged) = shared.refuse("outbound", Refusal::BadPath) {
                tracing::warn!(
                    path = req.uri().path(),
                    why = why.label(),
                    unlogged,
                    "request refused: {why}"
                );
            }
            return Ok(proxy_response(
                StatusCode::BAD_REQUEST,
                None,
                format!("bulkhead: {why}"),
            ));
        }
    };
    // Egress policy: the sending side judges the request before it leaves, and routes it,
    // from one snapshot.
    let (decision, permit) = {
        let snapshot = shared.snapshot.load();
        if !dest.routed_as_in(&snapshot) {
            return Ok(route_changed(&dest, &snapshot, &shared));
        }
        egress_decision(&canonical, &req, &dest, &snapshot, &shared).into_parts()
    };
    // The host as policy read it, for judging an upgraded tunnel again later; only a request
    // with an `Upgrade` header can open one (`upgrade::switch_to`), so no other copies it.
    let host = req
        .headers()
        .contains_key(http::header::UPGRADE)
        .then(|| canonical.host().map(str::to_string))
        .flatten();
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
    crate::http::count_decision("outbound", &decision, parties, &shared);
    // Kept for the flow record after `req` is sent on: a `Uri` clone shares the request's
    // bytes (a reference count), where copying the path into a `String` would allocate.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let (protocol, bytes_in) = (protocol_of(&req), content_length(req.headers()));
    let span = crate::trace::Pending::begin(
        shared.tracer.as_ref(),
        req.headers_mut(),
        bulkhead_api::otlp::SpanKind::Client,
        started_at,
    );
    let record = |latency, bytes_out, status: StatusCode, headers: &http::HeaderMap| {
        crate::http::log_access(&crate::http::Access {
            direction: "outbound",
            source: Some(shared.identity.as_str()),
            destination: dest.identity.as_ref().map(SpiffeId::as_str),
            source_workload: Some(&shared.workload),
            destination_workload: dest.workload.as_ref(),
            method: method.as_str(),
            path: uri.path(),
            status: status.as_u16(),
            decision: &decision,
            trace_id: span.trace_id(),
            duration: started.elapsed(),
        });
        span.end(&crate::trace::Outcome {
            direction: "outbound",
            method: method.as_str(),
            path: uri.path(),
            port: dest.port,
            source: Some(shared.identity.as_str()),
            destination: dest.identity.as_ref().map(SpiffeId::as_str),
            decision: &decision,
            status: status.as_u16(),
        });
        // Destinations outside the mesh have no workload to draw an edge to.
        let Some(destination) = dest.workload.as_ref() else {
            return;
        };
        shared.observe(&Seen {
            direction: Direction::Egress,
            source_identity: Some(&shared.spiffe_id),
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
    let Some(permit) = permit else {
        let resp = denial(&req, &decision, format!("bulkhead: egress {decision}"));
        record(std::time::Duration::ZERO, 0, resp.status(), resp.headers());
        return Ok(resp);
    };
    origin_form(&mut req);
    let switch = upgrade::switch_to(&req, &shared, "outbound");
    // A tunnel keeps the request that opened it, to judge it again on policy changes.
    let opened = switch
        .as_ref()
        .map(|up| OpenedBy::of(&req, tcp_flow(&dest), host, up));
    let headers = req.headers_mut();
    upgrade::prepare(headers, switch.as_ref());
    // Only the receiving sidecar may say who the caller is.
    headers.remove(DECISION_HEADER);
    headers.remove(SOURCE_HEADER);
    headers.remove(XFCC_HEADER);
    let alpn = if h2 { Alpn::H2 } else { Alpn::Http1 };
    let deadline = shared.limits.response_timeout;
    let whom = || format!("upstream {}", dest.name);
    let (sent, body) = match (switch, opened) {
        (Some(up), Some(opened)) => {
            let connect = connect_upstream(dest.clone(), alpn, shared.clone());
            let send = upgrade::forward(permit, req, connect, up, opened, shared.clone(), whom());
            (send.await, None)
        }
        _ => {
            let (req, watched) = ReqBody::of_request(req, &shared.limits.deadlines());
            let send = async {
                if h2 {
                    link.send(permit, req, || {
                        connect_upstream(dest.clone(), alpn, shared.clone())
                    })
                    .await
                    .map(response_body)
                } else {
                    // HTTP/1.1 shares the destination's multiplexed connections; the stream's
                    // place is held until the response has ended.
                    shared
                        .mux
                        .send(permit, dest.address, &dest.mux_key, req, || {
                            connect_upstream(dest.clone(), Alpn::Mux, shared.clone())
                        })
                        .await
                        .map(|(resp, place)| {
                            let mut resp = response_body(resp);
                            resp.body_mut().set_stream(place);
                            resp
                        })
                }
            };
            let sent = response_head(send, watched.as_ref(), deadline).await;
            let sent = sent.map(|r| upgrade::unasked(r, &shared, "outbound", whom));
            (sent, watched)
        }
    };
    let sent = match answered(sent, body.as_ref(), &shared, "outbound", || {
        format!("upstream {}", dest.name)
    }) {
        Answered::Sent(sent) => sent,
        Answered::Refused(resp) => {
            record(started.elapsed(), 0, resp.status(), resp.headers());
            return Ok(resp);
        }
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
    snapshot: &Snapshot,
    shared: &Shared,
) -> Judgement {
    let headers = HeaderView(req.headers());
    snapshot.judge(&PolicyRequest {
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

/// A captured connection's destination moved in the address table since it was accepted
/// (another workload, or out of the mesh): its requests are not judged against rules meant
/// for the address's new owner. The app reconnects, and the new connection is routed anew.
fn route_changed(dest: &Dest, snapshot: &Snapshot, shared: &Shared) -> Response<Body> {
    if let Some(unlogged) = shared.refuse("outbound", Refusal::RouteChanged) {
        tracing::warn!(
            dst.name = dest.name,
            revision = snapshot.revision(),
            unlogged,
            "request refused: the destination's address changed owner in this revision; closing the connection"
        );
    }
    let mut resp = proxy_response(
        StatusCode::SERVICE_UNAVAILABLE,
        None,
        format!(
            "bulkhead: {} is no longer routed as it was when this connection opened (revision {}); reconnect",
            dest.name,
            snapshot.revision()
        ),
    );
    resp.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    resp
}

/// Dials `dest` over mTLS, requiring its identity, with the given application protocol.
async fn connect_upstream(
    dest: Arc<Dest>,
    alpn: Alpn,
    shared: Arc<Shared>,
) -> std::io::Result<crate::revoked::Watched<TlsStream<TcpStream>>> {
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
            let serial = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| bulkhead_identity::serial_of(leaf))
                .unwrap_or_default();
            Ok(crate::revoked::Watched::new(
                tls,
                identity.clone(),
                serial,
                &shared,
            ))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bulkhead_policy::{Endpoint, Endpoints, PolicySet};

    /// A snapshot at `revision` whose address table puts `owner` (if any) at 10.0.0.5.
    fn snapshot(revision: u64, owner: Option<&str>) -> Snapshot {
        let mut endpoints = Endpoints::default();
        if let Some(name) = owner {
            endpoints.insert(
                "10.0.0.5".parse().unwrap(),
                Endpoint {
                    workload: bulkhead_policy::model::parse_workload(&format!("shop/{name}"))
                        .unwrap(),
                    identity: format!("spiffe://td/ns/shop/sa/{name}"),
                    ports: vec![(8080, Protocol::Http)],
                },
            );
        }
        Snapshot::new(PolicySet::compile(&[], revision).unwrap(), endpoints)
    }

    #[test]
    fn a_request_is_sent_only_where_its_snapshot_routes_it() {
        let orig: SocketAddr = "10.0.0.5:8080".parse().unwrap();
        let dest = Dest::of_original(orig, &snapshot(1, Some("orders")));
        assert_eq!(
            dest.identity.as_ref().unwrap().as_str(),
            "spiffe://td/ns/shop/sa/orders"
        );
        assert_eq!(
            dest.declared_protocol(&snapshot(1, Some("orders"))),
            Some(Protocol::Http)
        );
        // Same revision, or a later one that routes the address the same way: served.
        assert!(dest.routed_as_in(&snapshot(1, Some("orders"))));
        assert!(dest.routed_as_in(&snapshot(2, Some("orders"))));
        // The address changed owner, or left the mesh: not judged under the new rules.
        assert!(!dest.routed_as_in(&snapshot(3, Some("payments"))));
        assert!(!dest.routed_as_in(&snapshot(4, None)));
        // Outside the mesh at first, in it later: also a different route.
        let outside = Dest::of_original(orig, &snapshot(1, None));
        assert!(outside.identity.is_none());
        assert!(outside.routed_as_in(&snapshot(2, None)));
        assert!(!outside.routed_as_in(&snapshot(3, Some("orders"))));
    }

    #[test]
    fn an_explicit_upstream_is_routed_by_its_declaration() {
        let spec: UpstreamSpec =
            "name=orders,listen=127.0.0.1:0,address=10.0.0.5:8080,identity=spiffe://td/ns/shop/sa/orders"
                .parse()
                .unwrap();
        let dest = Dest::of_upstream(&spec);
        assert!(dest.routed_as_in(&snapshot(7, Some("payments"))));
    }
}
