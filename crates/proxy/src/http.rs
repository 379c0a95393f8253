//! HTTP/1.1 plumbing shared by the inbound and outbound sides: one upstream connection per
//! downstream connection, hop-by-hop header hygiene, and the responses the proxy itself makes.

use crate::authz::Permit;
use crate::deadline::{BodyFailure, Clock, IdleWhenDone, ReqBody};
use crate::metrics::Refusal;
use bytes::Bytes;
use http::header::{
    CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE,
    TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

/// A response body: the peer's, streamed, or one the proxy wrote; with what must happen
/// when it has been written (or dropped).
pub(crate) struct Body {
    inner: Inner,
    /// The downstream HTTP/1.1 connection goes back to waiting for a request.
    idle_when_done: Option<IdleWhenDone>,
    /// The stream it came on frees its place on a shared connection.
    stream: Option<crate::mux::StreamSlot>,
    /// The app connection it comes on goes back to the pool when it has ended (boxed: only
    /// the receiving side's bodies have one, and every body would carry its room).
    app: Option<Box<crate::mux::AppLoan>>,
}

enum Inner {
    Peer(Incoming),
    Own(Option<Bytes>),
}

impl Body {
    pub(crate) fn peer(body: Incoming) -> Body {
        Body {
            inner: Inner::Peer(body),
            idle_when_done: None,
            stream: None,
            app: None,
        }
    }

    pub(crate) fn own(bytes: Bytes) -> Body {
        Body {
            inner: Inner::Own(Some(bytes).filter(|b| !b.is_empty())),
            idle_when_done: None,
            stream: None,
            app: None,
        }
    }

    pub(crate) fn set_idle_when_done(&mut self, guard: IdleWhenDone) {
        self.idle_when_done = Some(guard);
    }

    pub(crate) fn set_stream(&mut self, slot: crate::mux::StreamSlot) {
        self.stream = Some(slot);
    }

    pub(crate) fn set_app_loan(&mut self, loan: Box<crate::mux::AppLoan>) {
        self.app = Some(loan);
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // A body that was complete from the start (no content, a 204, a HEAD's answer) is
        // dropped unread: its connection is as free as one whose body was read to the end.
        if let Some(loan) = self.app.take()
            && let Inner::Peer(body) = &self.inner
            && hyper::body::Body::is_end_stream(body)
        {
            (*loan).give_back();
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = match &mut this.inner {
            Inner::Peer(body) => Pin::new(body).poll_frame(cx),
            Inner::Own(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
        };
        if let Poll::Ready(None) = polled {
            // Done: the stream and the app connection are free at once, not when hyper gets
            // round to dropping us.
            this.stream = None;
            if let Some(loan) = this.app.take() {
                (*loan).give_back();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Peer(body) => body.is_end_stream(),
            Inner::Own(bytes) => bytes.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Peer(body) => body.size_hint(),
            Inner::Own(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

// The mesh's own header names are `HeaderName`s, not `&str`: a `HeaderMap` lookup by `&str`
// parses the name again on every call (BENCHMARKS.md, "Per-request cost").

/// Set on requests to the app: the caller's verified SPIFFE ID. Any incoming copy is dropped.
pub(crate) const SOURCE_HEADER: HeaderName = HeaderName::from_static("x-bulkhead-source");
/// Set on responses the proxy denies: `deny; policy=…; rule=…; revision=…`.
pub(crate) const DECISION_HEADER: HeaderName = HeaderName::from_static("x-bulkhead-decision");
/// Owned by the mesh like `x-bulkhead-source`: dropped from every request a caller sends, on
/// both sides; the receiving sidecar sets it from the verified peer, in Envoy's shape
/// (`By=<the receiving workload's SPIFFE ID>;URI=<the caller's SPIFFE ID>`), for apps that
/// read it. A plaintext caller (permissive port) gets none.
pub(crate) const XFCC_HEADER: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

static HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// Removes hop-by-hop headers, including any the `Connection` header names.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A response made by the proxy, with a plain-text body that ends in a newline.
pub(crate) fn proxy_response(
    status: StatusCode,
    decision: Option<&str>,
    text: String,
) -> Response<Body> {
    let mut resp = Response::new(Body::own(Bytes::from(text + "\n")));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(value) = decision.and_then(|d| HeaderValue::from_str(d).ok()) {
        h.insert(DECISION_HEADER, value);
    }
    resp
}

/// The request policy judges, built by the policy crate from what arrived (method, target,
/// authority, every `Host` header): canonical path, upper-case method, host without port.
/// A request it refuses (dot segments, encoded separators, path parameters, a lower-case
/// method, two hosts …) is answered 400 before any policy, with the reason.
pub(crate) fn canonical_request<B>(
    req: &Request<B>,
) -> Result<bulkhead_policy::CanonicalRequest<'_>, bulkhead_policy::Refusal> {
    let uri = req.uri();
    let raw = bulkhead_policy::RawRequest {
        method: req.method().as_str(),
        target: uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()),
        authority: uri.authority().map(|a| a.as_str()),
    };
    let hosts = req.headers().get_all(http::header::HOST).iter();
    bulkhead_policy::CanonicalRequest::new(raw, hosts.map(|h| h.as_bytes()))
}

/// Replaces the request target's path and query with `target` (the canonical path and the
/// query as received), keeping any scheme and authority: what policy judged is what is sent.
pub(crate) fn set_target<B>(req: &mut Request<B>, target: &str) -> Result<(), http::Error> {
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(target)?);
    *req.uri_mut() = http::Uri::from_parts(parts)?;
    Ok(())
}

/// An HTTP/1.1 server configured with the proxy's limits: request heads over the limit get
/// 431, however they arrive (the head's size is checked, not only the read buffer's). The
/// head and keep-alive deadlines are [`crate::deadline::Timed`]'s: hyper's header timer
/// starts as soon as a connection waits, so it would cut idle keep-alive connections. It is
/// kept only as a backstop that never fires first (keep-alive plus head time), because with
/// it set hyper reads as soon as a connection goes idle, which starts `Timed`'s clock.
pub(crate) fn server(limits: &crate::config::Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.keepalive_timeout + limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        // hyper's floor for the read buffer is 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192));
    b
}

/// Binds a listener; errors name what it was for.
pub(crate) async fn listen(
    addr: std::net::SocketAddr,
    what: &str,
) -> Result<(tokio::net::TcpListener, std::net::SocketAddr), crate::ProxyError> {
    let bind_err = |source| crate::ProxyError::Bind {
        what: what.to_string(),
        addr,
        source,
    };
    let listener = match addr {
        // `[::]` takes IPv4 too, whatever the host's `bindv6only` says: one listener for both
        // families (IPv4 peers appear as `::ffff:a.b.c.d`; handlers make them canonical).
        std::net::SocketAddr::V6(v6) if v6.ip().is_unspecified() => {
            dual_stack(addr).map_err(bind_err)?
        }
        _ => tokio::net::TcpListener::bind(addr)
            .await
            .map_err(bind_err)?,
    };
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((listener, bound))
}

/// A listener on `[::]:port` that accepts IPv4 as well (`IPV6_V6ONLY` off).
fn dual_stack(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    tokio::net::TcpListener::from_std(socket.into())
}

/// Accepts forever. Each connection within `max_connections` is served by the future
/// `serve` returns, on its own task and in its span; accept errors back off briefly.
pub(crate) fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    shared: Arc<crate::Shared>,
    direction: &'static str,
    mut serve: F,
) where
    F: FnMut(tokio::net::TcpStream, std::net::SocketAddr) -> (Fut, tracing::Span) + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    let slots = Arc::new(tokio::sync::Semaphore::new(shared.limits.max_connections));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, remote)) => {
                    let Some(permit) = admit(&slots, &shared, direction) else {
                        continue;
                    };
                    let open = shared.metrics.opened(direction);
                    let (conn, span) = serve(tcp, remote);
                    tokio::spawn(async move {
                        conn.instrument(span).await;
                        drop((permit, open));
                    });
                }
                Err(e) => {
                    tracing::warn!(direction, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
}

/// Takes a slot for a new connection, or refuses it when `max_connections` are open.
fn admit(
    slots: &Arc<tokio::sync::Semaphore>,
    shared: &crate::Shared,
    direction: &'static str,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    match slots.clone().try_acquire_owned() {
        Ok(permit) => Some(permit),
        Err(_) => {
            shared.metrics.refused_connection(direction);
            let reason = crate::metrics::Refusal::TooManyConnections;
            if let Some(unlogged) = shared.refuse(direction, reason) {
                tracing::warn!(
                    direction,
                    reason = reason.label(),
                    limit = shared.limits.max_connections,
                    unlogged,
                    "connection refused: too many open connections"
                );
            }
            None
        }
    }
}

/// The `x-bulkhead-decision` value of the last rule that decided on a connection. Requests
/// on one connection mostly match the same rule, so its header is formatted once per rule
/// and revision rather than once per request.
#[derive(Default)]
pub(crate) struct DecisionHeaders(std::sync::Mutex<Option<LastRule>>);

struct LastRule {
    revision: u64,
    policy: Arc<bulkhead_policy::model::ResourceName>,
    rule: Arc<str>,
    value: HeaderValue,
}

impl DecisionHeaders {
    pub(crate) fn get(&self, d: &bulkhead_policy::Decision) -> Option<HeaderValue> {
        let fresh = || HeaderValue::from_str(&d.header_value()).ok();
        let bulkhead_policy::Reason::Rule { policy, rule, .. } = &d.reason else {
            return fresh();
        };
        if d.audit.is_some() {
            return fresh();
        }
        let mut last = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(l) = last.as_ref()
            && l.revision == d.revision
            && Arc::ptr_eq(&l.policy, policy)
            && Arc::ptr_eq(&l.rule, rule)
        {
            return Some(l.value.clone());
        }
        let value = fresh()?;
        *last = Some(LastRule {
            revision: d.revision,
            policy: policy.clone(),
            rule: rule.clone(),
            value: value.clone(),
        });
        Some(value)
    }
}

/// Why forwarding failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LinkError {
    #[error("{0}")]
    Connect(std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

/// The upstream side of one downstream connection, dialled on first use and re-dialled if
/// it closed, speaking the downstream's HTTP version. HTTP/1.1 is serial per connection, so
/// the lock is never contended; HTTP/2 streams share one connection and only take the lock
/// to find it.
pub(crate) struct Link {
    h2: bool,
    sender: Mutex<Option<Sender>>,
}

impl Link {
    pub(crate) fn new(h2: bool) -> Link {
        Link {
            h2,
            sender: Mutex::new(None),
        }
    }

    /// Whether it speaks HTTP/2 (to the app or upstream), else HTTP/1.1.
    pub(crate) fn h2(&self) -> bool {
        self.h2
    }

    pub(crate) async fn send<F, Fut, Io>(
        &self,
        _permit: Permit,
        req: Request<ReqBody>,
        connect: F,
    ) -> Result<Response<Incoming>, LinkError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<Io>>,
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut guard = self.sender.lock().await;
        let open = match guard.as_ref() {
            Some(Sender::H1(s)) => !s.is_closed(),
            Some(Sender::H2(s)) => !s.is_closed(),
            None => false,
        };
        if !open {
            // Boxed: dialling happens once per connection, and unboxed its handshake would
            // size every request's future (see `serve_http` on request futures).
            *guard = Some(Box::pin(dial(self.h2, connect)).await?);
        }
        match guard.as_mut() {
            Some(Sender::H2(s)) => {
                let mut s = s.clone();
                drop(guard);
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            Some(Sender::H1(s)) => {
                s.ready().await?;
                Ok(s.send_request(req).await?)
            }
            None => Err(LinkError::Connect(std::io::Error::other(
                "no upstream connection",
            ))),
        }
    }
}

/// Dials a [`Link`]'s connection and runs its handshake; the connection's task is spawned.
async fn dial<F, Fut, Io>(h2: bool, connect: F) -> Result<Sender, LinkError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::io::Result<Io>>,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = connect().await.map_err(LinkError::Connect)?;
    if !h2 {
        return Ok(Sender::H1(handshake_h1(io).await?));
    }
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await?;
    spawn_conn(conn);
    Ok(Sender::H2(sender))
}

/// An HTTP/1.1 client connection on `io`, its task spawned.
pub(crate) async fn handshake_h1<Io>(
    io: Io,
) -> Result<hyper::client::conn::http1::SendRequest<ReqBody>, LinkError>
where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    spawn_conn(conn);
    Ok(sender)
}

pub(crate) fn spawn_conn<C, E>(conn: C)
where
    C: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
}

/// Serves one downstream connection with HTTP/1.1 (upgrades allowed) or HTTP/2, under the
/// proxy's limits. HTTP/1.1 runs under `clock`'s head and keep-alive deadlines (the service
/// marks requests busy and their responses done with it). HTTP/2 bounds concurrent streams
/// and header lists, and closes a connection that resets streams faster than it lets them
/// finish (rapid reset). How the connection ended, if it was a refusal, is counted.
///
/// Memory per open connection (issue #19, figures in BENCHMARKS.md): hyper's HTTP/1.1 server
/// keeps its service's future in a box made once per connection, sized for that future's
/// largest state, for as long as the connection stays open. Services therefore box a
/// request's handling (policy, the upstream exchange, metrics; a few KiB) per request, so
/// an idle keep-alive connection holds a box of a few hundred bytes; and the rare branches
/// inside it (dialling and its TLS and HTTP/2 handshakes, upgrades) are boxed where they
/// run, so that the per-request box and its copy stay small. The connection futures below
/// are boxed for the same reason: a task is as large as the largest branch it could take.
pub(crate) async fn serve_http<I, S>(
    io: I,
    h2: bool,
    clock: Option<Clock>,
    shared: &crate::Shared,
    direction: &'static str,
    service: S,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let limits = &shared.limits;
    let result = match (h2, clock) {
        (false, Some(clock)) => {
            let io = crate::deadline::Timed::new(
                io,
                clock,
                limits.header_read_timeout,
                limits.keepalive_timeout,
            );
            Box::pin(
                server(limits)
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            )
            .await
        }
        (false, None) => {
            Box::pin(
                server(limits)
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            )
            .await
        }
        (true, _) => {
            let conn =
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .max_concurrent_streams(limits.max_concurrent_streams)
                    .max_header_list_size(h2_header_list_limit(limits))
                    .max_pending_accept_reset_streams(Some(limits.max_pending_resets))
                    .max_local_error_reset_streams(Some(limits.max_pending_resets))
                    .serve_connection(TokioIo::new(io), service);
            Box::pin(conn).await
        }
    };
    let Err(e) = result else {
        return;
    };
    match connection_refusal(&e) {
        Some(reason) => {
            if let Some(unlogged) = shared.refuse(direction, reason) {
                tracing::warn!(
                    direction,
                    reason = reason.label(),
                    error = %e,
                    unlogged,
                    "connection closed: {}",
                    match reason {
                        Refusal::HeaderTimeout => "the request head did not arrive in time",
                        Refusal::HeaderTooLarge => "the request head is over the size limit (431)",
                        Refusal::RapidReset => "the client reset HTTP/2 streams faster than it let them finish",
                        _ => "refused",
                    }
                );
            }
        }
        None => tracing::debug!(error = %e, "connection ended with an error"),
    }
}

/// The HTTP/2 header list size hyper enforces itself: above the proxy's limit, so that heads
/// between the two reach the service, which answers 431 and counts it (an over-size head
/// that h2 refused by itself could not be counted).
fn h2_header_list_limit(limits: &crate::config::Limits) -> u32 {
    limits
        .max_header_bytes
        .saturating_mul(2)
        .min(u32::MAX as usize) as u32
}

/// The size of a request head as HTTP/2 counts it (RFC 9113 §6.5.2: name, value and 32
/// bytes per field), for the 431 of HTTP/2 requests.
pub(crate) fn header_list_size<B>(req: &Request<B>) -> usize {
    req.headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len())
}

/// Whether an HTTP/2 request's head is over the limit: answered 431 by the caller.
pub(crate) fn head_too_large<B>(req: &Request<B>, limits: &crate::config::Limits) -> bool {
    req.version() == http::Version::HTTP_2 && header_list_size(req) > limits.max_header_bytes
}

/// Which refusal ended a served connection, if one did.
fn connection_refusal(e: &hyper::Error) -> Option<Refusal> {
    if e.is_parse_too_large() {
        return Some(Refusal::HeaderTooLarge);
    }
    if e.is_timeout() {
        // hyper's backstop header timer (see `server`): only a head that started late.
        return Some(Refusal::HeaderTimeout);
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // An io::Error's own `source` skips what it wraps: look inside.
        let inner = s
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|i| i.downcast_ref::<crate::deadline::Expired>());
        if let Some(expired) = inner {
            return (*expired == crate::deadline::Expired::Head).then_some(Refusal::HeaderTimeout);
        }
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM))
                .then_some(Refusal::RapidReset);
        }
        source = s.source();
    }
    None
}

/// The answer when a request could not be forwarded because of its own body: 408 when it
/// stalled or took too long (the caller is slow), 400 when it is malformed (the caller's
/// fault) — never a 502 that would blame the upstream. Counted, unless the caller simply
/// went away.
pub(crate) fn body_failed(
    failure: BodyFailure,
    shared: &crate::Shared,
    direction: &'static str,
) -> Response<Body> {
    let limits = &shared.limits;
    let (reason, status, text) = match failure {
        BodyFailure::Idle => (
            Refusal::BodyIdleTimeout,
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "bulkhead: the request body stalled for more than {} s (--body-idle-timeout-secs)",
                limits.body_idle_timeout.as_secs()
            ),
        ),
        BodyFailure::Total => (
            Refusal::BodyTimeout,
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "bulkhead: the request body did not arrive within {} s (--body-timeout-secs)",
                limits.body_timeout.as_secs()
            ),
        ),
        BodyFailure::Malformed => (
            Refusal::BadRequestBody,
            StatusCode::BAD_REQUEST,
            "bulkhead: the request body is malformed (bad chunked encoding, or more bytes than declared)".to_string(),
        ),
        BodyFailure::Abandoned => {
            // Nobody is left to read this; not a refusal.
            tracing::debug!(direction, "the caller went away before its request body was complete");
            let mut resp = proxy_response(
                StatusCode::BAD_REQUEST,
                None,
                "bulkhead: the request body was cut short by the caller".to_string(),
            );
            resp.headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
    };
    if let Some(unlogged) = shared.refuse(direction, reason) {
        tracing::warn!(
            direction,
            reason = reason.label(),
            unlogged,
            "request refused: {text}"
        );
    }
    let mut resp = proxy_response(status, None, text);
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// What a forwarded request got.
pub(crate) enum Answered<T> {
    /// The answer, or the link's error.
    Sent(T),
    /// In its place, the refusal its caller gets.
    Refused(Response<Body>),
}

/// Ends an exchange, for both sidecars: what was sent back, or the refusal in its place, 504
/// when no response head came in time, or the request body's own failure (408 or 400) when
/// that is why forwarding failed.
pub(crate) fn answered<T, E>(
    sent: Result<Result<T, E>, crate::deadline::ResponseTimeout>,
    body: Option<&crate::deadline::BodyState>,
    shared: &crate::Shared,
    direction: &'static str,
    whom: impl FnOnce() -> String,
) -> Answered<Result<T, E>> {
    match sent {
        Err(crate::deadline::ResponseTimeout) => {
            Answered::Refused(response_timed_out(shared, direction, &whom()))
        }
        Ok(Err(e)) => match body.and_then(|b| b.failure()) {
            Some(failure) => Answered::Refused(body_failed(failure, shared, direction)),
            None => Answered::Sent(Err(e)),
        },
        Ok(answer) => Answered::Sent(answer),
    }
}

/// The answer when the app or upstream sent no response head in time: 504, counted.
pub(crate) fn response_timed_out(
    shared: &crate::Shared,
    direction: &'static str,
    whom: &str,
) -> Response<Body> {
    let reason = Refusal::ResponseTimeout;
    let text = format!(
        "bulkhead: {whom} did not answer within {} s (--response-timeout-secs)",
        shared.limits.response_timeout.as_secs()
    );
    if let Some(unlogged) = shared.refuse(direction, reason) {
        tracing::warn!(
            direction,
            reason = reason.label(),
            unlogged,
            "request cut: {text}"
        );
    }
    proxy_response(StatusCode::GATEWAY_TIMEOUT, None, text)
}

/// The answer to an HTTP/2 request whose head is over `--max-header-bytes`: 431, counted.
pub(crate) fn head_refused(shared: &crate::Shared, direction: &'static str) -> Response<Body> {
    let reason = Refusal::HeaderTooLarge;
    if let Some(unlogged) = shared.refuse(direction, reason) {
        tracing::warn!(
            direction,
            reason = reason.label(),
            unlogged,
            "request refused: its head is over the size limit (431)"
        );
    }
    proxy_response(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        None,
        format!(
            "bulkhead: the request head is over {} bytes (--max-header-bytes)",
            shared.limits.max_header_bytes
        ),
    )
}

/// Whether a request is gRPC (its content type), so a denial is answered the gRPC way.
pub(crate) fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// For a gRPC call, the `grpc-status` of a response that carries it in its headers (a
/// trailers-only response: a denial, or a call that failed before any message). Other
/// responses are not looked at.
pub(crate) fn grpc_status(protocol: bulkhead_policy::Protocol, headers: &HeaderMap) -> Option<u32> {
    if protocol != bulkhead_policy::Protocol::Grpc {
        return None;
    }
    headers.get("grpc-status")?.to_str().ok()?.parse().ok()
}

/// The protocol policy sees for an HTTP request.
pub(crate) fn protocol_of<B>(req: &Request<B>) -> bulkhead_policy::Protocol {
    if is_grpc(req) {
        bulkhead_policy::Protocol::Grpc
    } else if req.version() == http::Version::HTTP_2 {
        bulkhead_policy::Protocol::Http2
    } else {
        bulkhead_policy::Protocol::Http
    }
}

/// A denial: 403 with the explanation, or for gRPC a trailers-only response with
/// `grpc-status: 7` (PERMISSION_DENIED) and the explanation in `grpc-message`.
pub(crate) fn denial<B>(
    req: &Request<B>,
    decision: &bulkhead_policy::Decision,
    text: String,
) -> Response<Body> {
    let header = decision.header_value();
    if !is_grpc(req) {
        let mut resp = proxy_response(StatusCode::FORBIDDEN, Some(&header), text);
        resp.extensions_mut().insert(MeshDenial);
        return resp;
    }
    let mut resp = Response::new(Body::own(Bytes::new()));
    resp.extensions_mut().insert(MeshDenial);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    h.insert("grpc-status", HeaderValue::from_static("7"));
    if let Ok(v) = HeaderValue::from_str(&grpc_percent_encode(&text)) {
        h.insert("grpc-message", v);
    }
    if let Ok(v) = HeaderValue::from_str(&header) {
        h.insert(DECISION_HEADER, v);
    }
    resp
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 protocol asks.
fn grpc_percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Request headers as the policy engine reads them: every value of a repeated header, as
/// bytes (a value that is not text is still a value, never an absent header).
pub(crate) struct HeaderView<'a>(pub &'a HeaderMap);

impl bulkhead_policy::Headers for HeaderView<'_> {
    fn each_value(&self, name: &str, each: &mut dyn FnMut(&[u8])) {
        for v in self.0.get_all(name) {
            each(v.as_bytes());
        }
    }
}

/// Keeps only path and query of the request target (origin form), dropping any authority.
/// HTTP/2 requests keep their scheme and authority (HTTP/2 needs them).
pub(crate) fn origin_form(req: &mut Request<Incoming>) {
    if req.version() == http::Version::HTTP_2 {
        return;
    }
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = http::Uri::from(pq);
    }
}

pub(crate) fn response_body(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::peer(body))
}

/// The body size a message declares, or 0 (streamed bodies are not counted).
pub(crate) fn content_length(headers: &HeaderMap) -> u64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Counts a decision (`bulkhead_authz_decisions_total`) when it is made.
pub(crate) fn count_decision(
    direction: &'static str,
    decision: &bulkhead_policy::Decision,
    parties: &crate::metrics::Parties,
    shared: &crate::Shared,
) {
    shared.metrics.decision(direction, decision, parties);
}

/// Counts a response this sidecar gives its caller (`from_sidecar`: as [`response_flags`]
/// reads it) and tells the connection's clock what comes after it: none after a `101` (the
/// connection is the tunnel's now), else idle once the response body is done.
pub(crate) fn served(
    resp: &mut Response<Body>,
    shared: &crate::Shared,
    direction: &'static str,
    parties: &crate::metrics::Parties,
    from_sidecar: bool,
    started: std::time::Instant,
    clock: Option<&Clock>,
) {
    shared.metrics.request(
        direction,
        parties,
        resp.status().as_u16(),
        response_flags(resp, from_sidecar),
        started.elapsed(),
    );
    match clock {
        Some(c) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => c.off(),
        Some(c) => resp.body_mut().set_idle_when_done(c.idle_when_done()),
        None => {}
    }
}

/// Whether an answer is a mesh denial (`response_flags="RBAC"`): this sidecar's own denial
/// (marked by [`denial`]), or, from a destination's sidecar (`from_sidecar`), a response
/// carrying its `x-bulkhead-decision: deny…`, which a receiving sidecar never lets its app set.
pub(crate) fn response_flags<B>(
    resp: &Response<B>,
    from_sidecar: bool,
) -> crate::metrics::ResponseFlags {
    let denied_here = resp.extensions().get::<MeshDenial>().is_some();
    let denied_there = from_sidecar
        && resp
            .headers()
            .get(DECISION_HEADER)
            .is_some_and(|v| v.as_bytes().starts_with(b"deny"));
    match denied_here || denied_there {
        true => crate::metrics::ResponseFlags::Rbac,
        false => crate::metrics::ResponseFlags::None,
    }
}

/// Marks a response this sidecar made to refuse a request by policy (never sent).
#[derive(Clone, Copy, Debug)]
pub(crate) struct MeshDenial;

/// One HTTP request, once its answer is known: what the access and decision log says.
pub(crate) struct Access<'a> {
    pub direction: &'static str,
    pub source: Option<&'a str>,
    pub destination: Option<&'a str>,
    pub source_workload: Option<&'a bulkhead_policy::model::WorkloadRef>,
    pub destination_workload: Option<&'a bulkhead_policy::model::WorkloadRef>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub decision: &'a bulkhead_policy::Decision,
    pub trace_id: Option<[u8; 16]>,
    pub duration: std::time::Duration,
}

/// The decision's verdict, policy and rule as the logs name them.
pub(crate) fn verdict_policy_rule(d: &bulkhead_policy::Decision) -> (&'static str, String, String) {
    let verdict = match (d.is_allow(), d.would_deny()) {
        (true, true) => "allow (audit: would deny)",
        (true, false) => "allow",
        (false, _) => "deny",
    };
    match &d.reason {
        bulkhead_policy::Reason::Rule { policy, rule, .. } => {
            (verdict, policy.to_string(), rule.to_string())
        }
        bulkhead_policy::Reason::Posture { .. } => (verdict, "-".into(), "-".into()),
    }
}

/// Writes the access line of one HTTP request (target `bulkhead::access`; the schema is in
/// docs/observability.md). The path is its template (`/orders/{id}`), as flows name it, so a
/// log holds no identifier a path carried.
pub(crate) fn log_access(a: &Access<'_>) {
    // Once per request: nothing is formatted when the access log is filtered out.
    if !tracing::enabled!(target: "bulkhead::access", tracing::Level::INFO) {
        return;
    }
    let (verdict, policy, rule) = verdict_policy_rule(a.decision);
    let workload = |w: Option<&bulkhead_policy::model::WorkloadRef>| {
        w.map_or_else(|| "-".to_string(), ToString::to_string)
    };
    tracing::info!(
        target: "bulkhead::access",
        direction = a.direction,
        protocol = "http",
        source = a.source.unwrap_or("-"),
        source_workload = %workload(a.source_workload),
        destination = a.destination.unwrap_or("-"),
        destination_workload = %workload(a.destination_workload),
        method = a.method,
        path = %bulkhead_insight::template(a.path),
        status = a.status,
        verdict,
        policy = %policy,
        rule = %rule,
        revision = a.decision.revision,
        trace_id = %a
            .trace_id
            .map_or_else(|| "-".to_string(), |t| bulkhead_api::otlp::hex(&t)),
        duration_ms = a.duration.as_secs_f64() * 1000.0,
        // A denial's explanation (with its nearest miss, which names the path as sent).
        decision = (!a.decision.is_allow()).then(|| a.decision.to_string()),
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::{canonical_request, grpc_percent_encode, set_target};

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_percent_encode("deny 100% é"), "deny 100%25 %C3%A9");
    }

    #[test]
    fn requests_are_judged_and_sent_canonical() {
        let req = |target: &str| {
            http::Request::builder()
                .uri(target)
                .header("host", "Orders.Shop:8080")
                .body(())
                .unwrap()
        };
        let mut r = req("/%61dmin/users?q=%2F");
        let c = canonical_request(&r).unwrap();
        assert_eq!((c.path(), c.host()), ("/admin/users", Some("orders.shop")));
        let target = c.target().into_owned();
        set_target(&mut r, &target).unwrap();
        assert_eq!(r.uri().to_string(), "/admin/users?q=%2F");
        for bad in ["/a/../b", "/orders/..;/admin", "/a%2Fb", "/a//b"] {
            assert!(canonical_request(&req(bad)).is_err(), "{bad}");
        }
        let mut h2 = http::Request::builder()
            .uri("http://orders.shop/%7Euser")
            .body(())
            .unwrap();
        let c = canonical_request(&h2).unwrap();
        let target = c.target().into_owned();
        set_target(&mut h2, &target).unwrap();
        assert_eq!(h2.uri().to_string(), "http://orders.shop/~user");
    }
}
