//! HTTP/1.1 plumbing shared by the inbound and outbound sides: one upstream connection per
//! downstream connection, hop-by-hop header hygiene, and the responses the proxy itself makes.

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Mutex;

/// Either the peer's streamed body or one the proxy wrote.
pub(crate) type Body = Either<Incoming, Full<Bytes>>;

/// Set on requests to the app: the caller's verified SPIFFE ID. Any incoming copy is dropped.
pub(crate) const SOURCE_HEADER: &str = "x-bulkhead-source";
/// Set on responses the proxy denies: `deny; policy=…; rule=…; revision=…`.
pub(crate) const DECISION_HEADER: &str = "x-bulkhead-decision";

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
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
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// A response made by the proxy, with a plain-text body that ends in a newline.
pub(crate) fn proxy_response(
    status: StatusCode,
    decision: Option<&str>,
    text: String,
) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(text + "\n"))));
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

/// Refuses paths whose meaning an app might read differently from the policy: dot segments,
/// empty segments and encoded separators. Returns why.
pub(crate) fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("path must start with '/'");
    }
    // Case-insensitive, without copying the path: this runs on every request.
    let bytes = path.as_bytes();
    let encoded = |pat: &[u8]| {
        bytes
            .windows(pat.len())
            .any(|w| w.eq_ignore_ascii_case(pat))
    };
    if path.contains('\\') || [b"%2e", b"%2f", b"%5c", b"%00"].iter().any(|p| encoded(*p)) {
        return Err("path holds an encoded '.', '/', '\\' or NUL");
    }
    // One trailing slash is fine ("/a/b/"); any other empty segment is not.
    let body = path[1..].strip_suffix('/').unwrap_or(&path[1..]);
    if !body.is_empty()
        && body
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
    {
        return Err("path holds '.', '..' or empty segments");
    }
    Ok(())
}

/// An HTTP/1.1 server configured with the proxy's limits: request heads over the limit get
/// 431, and a client that does not finish one within the timeout is disconnected.
pub(crate) fn server(limits: &crate::config::Limits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
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
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((listener, bound))
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
                    let (conn, span) = serve(tcp, remote);
                    tokio::spawn(async move {
                        conn.instrument(span).await;
                        drop(permit);
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
            tracing::warn!(
                direction,
                limit = shared.limits.max_connections,
                "connection refused: too many open connections"
            );
            None
        }
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

/// The upstream side of one downstream connection, dialled on first use and re-dialled if
/// it closed. HTTP/1.1 is serial per connection, so the lock is never contended.
#[derive(Default)]
pub(crate) struct Link {
    sender: Mutex<Option<SendRequest<Incoming>>>,
}

impl Link {
    pub(crate) async fn send<F, Fut, Io>(
        &self,
        req: Request<Incoming>,
        connect: F,
    ) -> Result<Response<Incoming>, LinkError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<Io>>,
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut guard = self.sender.lock().await;
        let sender = match guard.take() {
            Some(s) if !s.is_closed() => guard.insert(s),
            _ => {
                let io = connect().await.map_err(LinkError::Connect)?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "upstream connection ended");
                    }
                });
                guard.insert(sender)
            }
        };
        sender.ready().await?;
        Ok(sender.send_request(req).await?)
    }
}

/// Request headers as the policy engine reads them.
pub(crate) struct HeaderView<'a>(pub &'a HeaderMap);

impl bulkhead_policy::Headers for HeaderView<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The request's host, lower case and without a port (from the URI or the Host header).
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = req.uri().host().map(str::to_string).or_else(|| {
        req.headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    })?;
    let host = match raw.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
        None => match raw.rsplit_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                h.to_string()
            }
            _ => raw,
        },
    };
    Some(host.to_ascii_lowercase())
}

/// Keeps only path and query of the request target (origin form), dropping any authority.
pub(crate) fn origin_form(req: &mut Request<Incoming>) {
    if let Some(pq) = req.uri().path_and_query().cloned() {
        *req.uri_mut() = http::Uri::from(pq);
    }
}

pub(crate) fn response_body(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Either::Left(body))
}

/// One structured event per decision: the decision log.
pub(crate) fn log_decision(
    direction: &'static str,
    decision: &bulkhead_policy::Decision,
    peer: &str,
    shared: &crate::Shared,
    req: &Request<Incoming>,
) {
    let verdict = match (decision.is_allow(), decision.would_deny()) {
        (true, true) => "allow (audit: would deny)",
        (true, false) => "allow",
        (false, _) => "deny",
    };
    shared.metrics.decision(direction, decision);
    tracing::info!(
        target: "bulkhead::decision",
        direction,
        verdict,
        peer.id = %peer,
        workload = %shared.workload,
        http.method = %req.method(),
        http.path = req.uri().path(),
        decision = %decision,
        "authorization decision"
    );
}

#[cfg(test)]
mod tests {
    use super::check_path;

    #[test]
    fn ambiguous_paths_are_refused() {
        for ok in ["/", "/charge", "/orders/1", "/a/b/"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "/a/../admin",
            "/./admin",
            "/a//b",
            "/%2e%2e/admin",
            "/a%2Fb",
            "/a\\b",
            "x",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
