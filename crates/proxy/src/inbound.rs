//! The inbound side: mTLS in from other sidecars (or plaintext on a permissive port),
//! authorization, then the local app over HTTP/1.1, HTTP/2 (h2c) or opaque TCP.
//!
//! The protocol inside mTLS is what the sending sidecar negotiated (ALPN), except that a
//! port the workload declares `tcp` is always relayed opaquely, and a port declared for HTTP
//! never accepts an opaque relay (its HTTP rules could not be enforced).

use crate::clients::Alpn;
use crate::config::{InboundSpec, InboundTarget};
use crate::deadline::{Clock, ReqBody, response_head};
use crate::detect::{Sniffed, sniff};
use crate::flows::Seen;
use crate::http::{Answered, answered, content_length, grpc_status, head_refused, head_too_large};
use crate::http::{
    Body, DECISION_HEADER, DecisionHeaders, HeaderView, Link, SOURCE_HEADER, XFCC_HEADER,
    accept_loop, canonical_request, denial, listen, origin_form, protocol_of, proxy_response,
    response_body, serve_http, set_target,
};
use crate::metrics::{Parties, Refusal, TlsFailure};
use crate::tcp::{Flow, Reset};
use crate::upgrade::{self, OpenedBy};
use crate::{HANDSHAKE_TIMEOUT, ProxyError, Shared};
use bulkhead_identity::SpiffeId;
use bulkhead_identity::tls::peer_identity_in;
use bulkhead_policy::model::{Direction, WorkloadRef};
use bulkhead_policy::{Peer, Protocol, Request as PolicyRequest};
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

/// The label the metrics give a caller without mTLS (permissive ports only).
pub(crate) const PLAINTEXT_PEER: &str = "plaintext";

pub(crate) async fn spawn(
    spec: &InboundSpec,
    shared: Arc<Shared>,
) -> Result<SocketAddr, ProxyError> {
    let (listener, addr) = listen(spec.listen, "inbound").await?;
    let target = spec.target;
    let permissive: Arc<[u16]> = spec.permissive_ports.clone().into();
    match target {
        InboundTarget::App { app, port } => {
            tracing::info!(listen = %addr, %app, port, "inbound listener ready")
        }
        InboundTarget::Transparent => {
            tracing::info!(listen = %addr, "inbound listener ready (transparent)")
        }
    }
    let state = shared.clone();
    accept_loop(listener, shared, "inbound", move |tcp, remote| {
        let span = tracing::info_span!("inbound", src.addr = %remote);
        (
            serve(tcp, remote, target, permissive.clone(), state.clone()),
            span,
        )
    });
    Ok(addr)
}

/// What a connection is for, once its target is known.
#[derive(Clone, Copy)]
struct Target {
    app: SocketAddr,
    port: u16,
    remote: SocketAddr,
}

async fn serve(
    tcp: TcpStream,
    remote: SocketAddr,
    target: InboundTarget,
    permissive: Arc<[u16]>,
    shared: Arc<Shared>,
) {
    let _ = tcp.set_nodelay(true);
    let remote = crate::capture::canonical(remote);
    let (app, port) = match target {
        InboundTarget::App { app, port } => (app, port),
        InboundTarget::Transparent => match transparent_target(&tcp, &shared) {
            Some(orig) => (orig, orig.port()),
            None => return tcp.reset(),
        },
    };
    let t = Target { app, port, remote };
    let declared = shared
        .snapshot
        .load()
        .declared_protocol(&shared.workload, port);
    if permissive.contains(&port) {
        match sniff(&tcp, shared.limits.detect_timeout).await {
            Ok(Sniffed::Tls) => {}
            Ok(plain) => {
                shared
                    .metrics
                    .plaintext
                    .get_or_create(&crate::metrics::PortLabels { port })
                    .inc();
                tracing::info!(port, "plaintext connection accepted (permissive port)");
                let h2 = plain == Sniffed::H2;
                match (declared, plain) {
                    (Some(Protocol::Tcp), _) | (None, Sniffed::Opaque) => {
                        relay(tcp, None, t, shared).await
                    }
                    (_, Sniffed::Http1 | Sniffed::H2) => {
                        serve_app_http(tcp, None, AppSide::Own(Link::new(h2)), t, shared).await
                    }
                    _ => {
                        if let Some(unlogged) = shared.refuse("inbound", Refusal::OpaqueToHttpPort)
                        {
                            tracing::warn!(
                                port,
                                reason = Refusal::OpaqueToHttpPort.label(),
                                unlogged,
                                "connection refused: port is declared for HTTP but the client did not speak HTTP"
                            )
                        }
                    }
                }
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection closed before it said anything");
                return;
            }
        }
    }
    let acceptor = TlsAcceptor::from(shared.tls.load().server.clone());
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
    let session = tls.get_ref().1;
    let peer = match peer_identity_in(session.peer_certificates(), &shared.tls.load().bundle) {
        Ok(id) => id,
        Err(e) => {
            let reason = TlsFailure::of_svid(&e);
            shared.metrics.tls_failure("inbound", reason);
            tracing::warn!(reason = reason.label(), error = %e, "connection refused: peer certificate is not an acceptable SVID");
            return;
        }
    };
    let alpn = Alpn::of(session.alpn_protocol());
    let serial = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|leaf| bulkhead_identity::serial_of(leaf))
        .unwrap_or_default();
    shared.metrics.connection("inbound");
    tracing::debug!(src.id = %peer, ?alpn, "mTLS connection accepted");
    // A peer revoked while its connection is open loses it at once: the connection, its
    // streams and any relay are dropped.
    let revoked = shared.revoked.clone();
    let peer_id = peer.clone();
    let metrics_shared = shared.clone();
    tokio::select! {
        () = serve_tls(tls, peer, declared, alpn, t, shared) => {}
        () = revoked.until_revoked(&peer_id, &serial) => {
            metrics_shared.metrics.reset("inbound", "revoked");
            tracing::warn!(src.id = %peer_id, serial, reason = "revoked", "closed an open connection: its peer was revoked");
        }
    }
}

/// An accepted mTLS connection from `peer`, served as its protocol says.
async fn serve_tls(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SpiffeId,
    declared: Option<Protocol>,
    alpn: Option<Alpn>,
    t: Target,
    shared: Arc<Shared>,
) {
    let port = t.port;
    match (declared, alpn) {
        (Some(Protocol::Tcp), _) | (None, Some(Alpn::Tcp)) => {
            relay(tls, Some(peer), t, shared).await
        }
        (Some(_), Some(Alpn::Tcp)) => {
            if let Some(unlogged) = shared.refuse("inbound", Refusal::OpaqueToHttpPort) {
                tracing::warn!(src.id = %peer, port, reason = Refusal::OpaqueToHttpPort.label(), unlogged, "connection refused: an opaque TCP relay to a port declared for HTTP (its HTTP rules could not be enforced)");
            }
        }
        (_, Some(Alpn::Mux)) => serve_app_http(tls, Some(peer), AppSide::Pool, t, shared).await,
        (_, alpn) => {
            let side = AppSide::Own(Link::new(alpn == Some(Alpn::H2)));
            serve_app_http(tls, Some(peer), side, t, shared).await
        }
    }
}

/// Transparent mode: where a redirected connection goes, which is where it was sent — the
/// workload's own address and port, never loopback, so that a listener the app bound to
/// 127.0.0.1 or ::1 stays out of reach from other hosts. `None` (logged and counted; the
/// caller resets the connection) when it did not come through `init`'s rules, was not for
/// an address of this namespace, or is for a port the workload does not declare while it
/// declares some (refused before policy: a rule without `ports:` covers declared ports only).
fn transparent_target(tcp: &TcpStream, shared: &Shared) -> Option<SocketAddr> {
    let refuse = |reason: &'static str, why: &str| {
        shared.metrics.reset("inbound", reason);
        tracing::warn!(reason, "connection refused: {why}");
        None
    };
    let (orig, local) = match (crate::capture::original_dst(tcp), tcp.local_addr()) {
        (Ok(orig), Ok(local)) => (orig, crate::capture::canonical(local)),
        (Err(e), _) | (_, Err(e)) => {
            return refuse(
                "not_redirected",
                &format!(
                    "no original destination ({e}); is this listener the target of `bulkhead-proxy init`'s rules?"
                ),
            );
        }
    };
    if !crate::capture::was_redirected(local, orig) || orig.port() == local.port() {
        return refuse(
            "not_redirected",
            &format!("{orig} is the proxy's own inbound port, not a port of the app"),
        );
    }
    if orig.ip().is_loopback() || !crate::capture::is_local_address(orig.ip()) {
        return refuse(
            "not_local",
            &format!("the original destination {orig} is not an address of this network namespace"),
        );
    }
    let snapshot = shared.snapshot.load();
    if snapshot.declares_ports(&shared.workload)
        && snapshot
            .declared_protocol(&shared.workload, orig.port())
            .is_none()
    {
        return refuse(
            "undeclared_port",
            &format!(
                "port {} is not one that workload {} declares",
                orig.port(),
                shared.workload
            ),
        );
    }
    Some(orig)
}

/// Opaque TCP in: judged once by L4 policy (and again on every policy change), then relayed.
/// Refused with a reset when policy denies it or the app does not accept it.
async fn relay<I>(mut downstream: I, peer: Option<SpiffeId>, t: Target, shared: Arc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Reset,
{
    let flow = Flow {
        direction: Direction::Ingress,
        peer_identity: peer,
        peer_ip: Some(t.remote.ip()),
        peer_workload: None,
        port: t.port,
    };
    let Some(permit) = flow.admit(&shared) else {
        return downstream.reset();
    };
    match connect_app(t.app).await {
        Ok(mut app) => {
            let ended = crate::tcp::relay(&shared, permit, flow, &mut downstream, &mut app).await;
            if ended == "error" {
                shared.metrics.reset("inbound", "relay_error");
                downstream.reset();
                app.reset();
            }
        }
        Err(e) => {
            tracing::warn!(app = %t.app, error = %e, "local app unreachable");
            shared.metrics.reset("inbound", "unreachable");
            downstream.reset();
        }
    }
}

/// How requests of one downstream connection reach the app.
enum AppSide {
    /// A connection of its own, speaking the downstream's HTTP version.
    Own(Link),
    /// A multiplexed connection from another sidecar: HTTP/2 in, each stream forwarded as
    /// HTTP/1.1 over the shared pool of app connections.
    Pool,
}

impl AppSide {
    fn serves_h2(&self) -> bool {
        match self {
            AppSide::Own(link) => link.h2(),
            AppSide::Pool => true,
        }
    }
}

async fn serve_app_http<I>(
    io: I,
    peer: Option<SpiffeId>,
    side: AppSide,
    t: Target,
    shared: Arc<Shared>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let h2 = side.serves_h2();
    let link = Arc::new(side);
    // HTTP/1.1 only: its head and keep-alive deadlines, marked by each request.
    let clock = (!h2).then(Clock::new);
    let conn_clock = clock.clone();
    // Made once per connection: the caller never changes on it.
    let source_workload = shared
        .snapshot
        .load()
        .endpoints()
        .get(t.remote.ip())
        .filter(|e| peer.as_ref().is_some_and(|p| p.as_str() == e.identity))
        .map(|e| e.workload.clone());
    let conn = Arc::new(Caller {
        source_header: peer
            .as_ref()
            .and_then(|p| HeaderValue::from_str(p.as_str()).ok()),
        xfcc: peer.as_ref().and_then(|p| {
            let by = shared.identity.as_str();
            HeaderValue::from_str(&format!("By={by};URI={p}")).ok()
        }),
        parties: Parties::with_peer(
            true,
            &shared.identity,
            &shared.place,
            peer.as_ref().map(SpiffeId::as_str),
            source_workload.as_ref(),
        ),
        decision_header: DecisionHeaders::default(),
        source_workload,
        peer,
    });
    let state = shared.clone();
    let service = service_fn(move |req| {
        let (conn, link, shared) = (conn.clone(), link.clone(), shared.clone());
        let clock = conn_clock.clone();
        async move {
            let start = Instant::now();
            if let Some(c) = &clock {
                c.busy();
            }
            // Boxed for each request: see `crate::http::serve_http` on request futures.
            let mut resp = Box::pin(handle(req, &conn, link, t, &shared)).await;
            if let Ok(r) = &mut resp {
                let clock = clock.as_ref();
                crate::http::served(r, &shared, "inbound", &conn.parties, false, start, clock);
            }
            resp
        }
    });
    serve_http(io, h2, clock, &state, "inbound", service).await;
}

/// One inbound connection's caller, and what is derived from it once rather than per request.
struct Caller {
    peer: Option<SpiffeId>,
    /// The verified caller, for the app (`x-bulkhead-source`).
    source_header: Option<HeaderValue>,
    /// The same in Envoy's `x-forwarded-client-cert` shape, `By=<this sidecar>;URI=<caller>`.
    xfcc: Option<HeaderValue>,
    parties: Parties,
    decision_header: DecisionHeaders,
    /// The caller's workload, when its address is a declared one with the caller's identity.
    source_workload: Option<WorkloadRef>,
}

async fn handle(
    mut req: Request<Incoming>,
    conn: &Caller,
    link: Arc<AppSide>,
    t: Target,
    shared: &Arc<Shared>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let started_at = std::time::SystemTime::now();
    let peer = conn.peer.as_ref();
    let peer_label = peer.map_or(PLAINTEXT_PEER, SpiffeId::as_str);
    if head_too_large(&req, &shared.limits) {
        return Ok(head_refused(shared, "inbound"));
    }
    // What policy judges, and the app receives: the canonical request.
    let canonical = match canonical_request(&req) {
        Ok(c) => c,
        Err(why) => {
            if let Some(unlogged) = shared.refuse("inbound", Refusal::BadPath) {
                tracing::warn!(
                    src.id = peer_label,
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
    let headers = HeaderView(req.headers());
    // A multiplexed stream is an HTTP/1.1 request of the caller's app, whatever the framing
    // between the sidecars.
    let protocol = match &*link {
        AppSide::Pool => Protocol::Http,
        AppSide::Own(_) => protocol_of(&req),
    };
    // One snapshot for the whole decision; the permit is what forwarding below requires.
    let (decision, permit) = shared
        .snapshot
        .load()
        .judge(&PolicyRequest {
            direction: Direction::Ingress,
            subject: &shared.workload,
            peer: Peer {
                identity: peer.map(SpiffeId::as_str),
                ip: Some(bulkhead_policy::canonical::peer_ip(t.remote.ip())),
                workload: None,
            },
            port: t.port,
            protocol,
            http: Some(canonical.http(&headers)),
        })
        .into_parts();
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
        tracing::warn!(src.id = peer_label, error = %e, "request refused: its canonical target is not a URI");
        return Ok(proxy_response(
            StatusCode::BAD_REQUEST,
            None,
            "bulkhead: the request target cannot be forwarded".into(),
        ));
    }
    crate::http::count_decision("inbound", &decision, &conn.parties, shared);
    // Kept for the flow record after `req` is sent on: a `Uri` clone shares the request's
    // bytes (a reference count), where copying the path into a `String` would allocate.
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let bytes_in = content_length(req.headers());
    let span = crate::trace::Pending::begin(
        shared.tracer.as_ref(),
        req.headers_mut(),
        bulkhead_api::otlp::SpanKind::Server,
        started_at,
    );
    let record = |latency, bytes_out, status: StatusCode, headers: &http::HeaderMap| {
        crate::http::log_access(&crate::http::Access {
            direction: "inbound",
            source: peer.map(SpiffeId::as_str),
            destination: Some(shared.identity.as_str()),
            source_workload: conn.source_workload.as_ref(),
            destination_workload: Some(&shared.workload),
            method: method.as_str(),
            path: uri.path(),
            status: status.as_u16(),
            decision: &decision,
            trace_id: span.trace_id(),
            duration: started.elapsed(),
        });
        span.end(&crate::trace::Outcome {
            direction: "inbound",
            method: method.as_str(),
            path: uri.path(),
            port: t.port,
            source: peer.map(SpiffeId::as_str),
            destination: Some(shared.identity.as_str()),
            decision: &decision,
            status: status.as_u16(),
        });
        shared.observe(&Seen {
            direction: Direction::Ingress,
            source_identity: peer,
            source_workload: conn.source_workload.as_ref(),
            destination: &shared.workload,
            port: t.port,
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
        let resp = denial(&req, &decision, format!("bulkhead: {decision}"));
        record(Duration::ZERO, 0, resp.status(), resp.headers());
        return Ok(resp);
    };
    origin_form(&mut req);
    let switch = upgrade::switch_to(&req, shared, "inbound");
    // A tunnel keeps the request that opened it, to judge it again on policy changes.
    let opened = switch.as_ref().map(|up| {
        let flow = Flow {
            direction: Direction::Ingress,
            peer_identity: peer.cloned(),
            peer_ip: Some(t.remote.ip()),
            peer_workload: None,
            port: t.port,
        };
        OpenedBy::of(&req, flow, host.clone(), up)
    });
    let headers = req.headers_mut();
    upgrade::prepare(headers, switch.as_ref());
    // Who the caller is, only as this sidecar verified it.
    headers.remove(DECISION_HEADER);
    headers.remove(SOURCE_HEADER);
    headers.remove(XFCC_HEADER);
    if let Some(v) = &conn.source_header {
        headers.insert(SOURCE_HEADER, v.clone());
    }
    if let Some(v) = &conn.xfcc {
        headers.insert(XFCC_HEADER, v.clone());
    }
    let app = t.app;
    let deadline = shared.limits.response_timeout;
    let whom = || format!("the local app at {app}");
    let (sent, body) = match (switch, opened) {
        (Some(up), Some(opened)) => {
            let connect = connect_app(app);
            let send = upgrade::forward(permit, req, connect, up, opened, shared.clone(), whom());
            (send.await, None)
        }
        _ => {
            let (req, watched) = ReqBody::of_request(req, &shared.limits.deadlines());
            let send = async {
                match &*link {
                    AppSide::Own(link) => link
                        .send(permit, req, || connect_app(app))
                        .await
                        .map(response_body),
                    AppSide::Pool => {
                        shared
                            .app_pool
                            .send(permit, app, req, || connect_app(app))
                            .await
                    }
                }
            };
            let sent = response_head(send, watched.as_ref(), deadline).await;
            let sent = sent.map(|r| upgrade::unasked(r, shared, "inbound", whom));
            (sent, watched)
        }
    };
    let sent = match answered(sent, body.as_ref(), shared, "inbound", || {
        format!("the local app at {app}")
    }) {
        Answered::Sent(sent) => sent,
        Answered::Refused(resp) => {
            record(started.elapsed(), 0, resp.status(), resp.headers());
            return Ok(resp);
        }
    };
    match sent {
        Ok(mut resp) => {
            record(
                started.elapsed(),
                content_length(resp.headers()),
                resp.status(),
                resp.headers(),
            );
            // Only the mesh says what the mesh decided: an app's copy never passes.
            resp.headers_mut().remove(DECISION_HEADER);
            if let Some(v) = conn.decision_header.get(&decision) {
                resp.headers_mut().insert(DECISION_HEADER, v);
            }
            Ok(resp)
        }
        Err(e) => {
            tracing::warn!(%app, error = %e, "local app unreachable");
            let resp = proxy_response(
                StatusCode::BAD_GATEWAY,
                None,
                format!("bulkhead: the local app at {app} did not answer: {e}"),
            );
            record(started.elapsed(), 0, resp.status(), resp.headers());
            Ok(resp)
        }
    }
}

async fn connect_app(app: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(app).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}
