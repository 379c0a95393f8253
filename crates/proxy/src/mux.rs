//! Multiplexing between sidecars. The HTTP/1.1 requests that a workload's app connections
//! send to one destination share a single mTLS connection to that destination's sidecar,
//! as HTTP/2 streams (ALPN `bulkhead.dev/h1-mux`); the receiving sidecar forwards each to its
//! app as HTTP/1.1 over a small pool of app connections.
//!
//! Why: with a connection per app connection, every request pays its own TLS records and
//! system calls on the hop between sidecars, and every idle keep-alive connection holds a
//! TLS session and buffers in both sidecars. Sharing one connection batches concurrent
//! requests into fewer writes and keeps memory per app connection to the downstream side.
//!
//! Every request is still judged on its own, by both sidecars: the stream's identity is the
//! connection's verified peer, exactly as on a connection of its own.
//!
//! Fair shares: an HTTP/1.1 app connection carries one request at a time, so one caller
//! (one downstream connection) holds at most one stream of a shared connection. Streams are
//! counted per shared connection until their response has ended; when every connection to a
//! destination has `--max-concurrent-streams` streams open, another is dialled rather than
//! making new requests queue behind slow ones. Stuck streams are cut by the request body and
//! response deadlines (`crate::deadline`). The number of shared connections is bounded by the
//! downstream connections (`--max-connections`) divided by the streams each may carry.

use crate::authz::Permit;
use crate::deadline::ReqBody;
use crate::http::{Body, LinkError, handshake_h1, response_body, spawn_conn};

use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// One shared connection and how many of its streams are open.
struct Shared {
    sender: SendRequest<ReqBody>,
    streams: Arc<AtomicUsize>,
}

/// One slot per destination, holding its shared connections; the async lock is held while
/// dialling, so concurrent requests that need a new connection open one, not many.
type Slot = Arc<tokio::sync::Mutex<Vec<Shared>>>;

/// At most this many destinations keep a slot; past it, slots with no open connection are
/// dropped.
const MAX_SLOTS: usize = 4096;

/// A stream's place on a shared connection, given back when dropped (when its response has
/// ended, or its request failed).
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The shared connections of the outbound side, by destination address and identity.
pub(crate) struct Mux {
    slots: Mutex<HashMap<(SocketAddr, Arc<str>), Slot>>,
    /// Streams one shared connection carries before another is dialled.
    streams_per_connection: usize,
}

impl Mux {
    pub(crate) fn new(streams_per_connection: u32) -> Mux {
        Mux {
            slots: Mutex::default(),
            streams_per_connection: (streams_per_connection as usize).max(1),
        }
    }

    fn slot(&self, addr: SocketAddr, identity: &Arc<str>) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slots.len() >= MAX_SLOTS {
            slots.retain(|_, slot| {
                slot.try_lock()
                    .map_or(true, |conns| conns.iter().any(|c| !c.sender.is_closed()))
            });
        }
        slots.entry((addr, identity.clone())).or_default().clone()
    }

    /// Sends an HTTP/1.1 request as a stream of one of the destination's shared connections
    /// (the first with room), dialling one with `connect` if none has room. The response
    /// comes back as HTTP/1.1, with the stream's place, to be held until it has ended.
    pub(crate) async fn send<F, Fut, Io>(
        &self,
        _permit: Permit,
        addr: SocketAddr,
        identity: &Arc<str>,
        mut req: Request<ReqBody>,
        connect: F,
    ) -> Result<(Response<Incoming>, StreamSlot), LinkError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<Io>>,
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, place) = {
            let slot = self.slot(addr, identity);
            let mut conns = slot.lock().await;
            conns.retain(|c| !c.sender.is_closed());
            let room = conns
                .iter()
                .find(|c| c.streams.load(Ordering::Relaxed) < self.streams_per_connection);
            match room {
                Some(c) => {
                    c.streams.fetch_add(1, Ordering::Relaxed);
                    (c.sender.clone(), StreamSlot(c.streams.clone()))
                }
                None => {
                    // Boxed: dialling is rare, and unboxed its handshake would size every
                    // request's future (and the box hyper keeps per app connection for it).
                    let sender = Box::pin(dial(connect)).await?;
                    if !conns.is_empty() {
                        tracing::debug!(
                            %addr,
                            connections = conns.len() + 1,
                            "every shared connection to this destination is full; dialled another"
                        );
                    }
                    let streams = Arc::new(AtomicUsize::new(1));
                    conns.push(Shared {
                        sender: sender.clone(),
                        streams: streams.clone(),
                    });
                    (sender, StreamSlot(streams))
                }
            }
        };
        sender.ready().await?;
        // HTTP/2 needs the scheme and authority the HTTP/1.1 request carries in `Host`.
        let authority = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .unwrap_or_else(|| {
                // An address always parses as an authority.
                http::uri::Authority::try_from(addr.to_string())
                    .unwrap_or_else(|_| http::uri::Authority::from_static("localhost"))
            });
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query = Some(path);
        *req.uri_mut() = http::Uri::from_parts(parts).map_err(|e| {
            LinkError::Connect(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?;
        *req.version_mut() = Version::HTTP_2;
        let mut resp = sender.send_request(req).await?;
        *resp.version_mut() = Version::HTTP_11;
        Ok((resp, place))
    }

    /// Open shared connections, for the admin page.
    pub(crate) fn open(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .values()
            .map(|slot| {
                slot.try_lock().map_or(0, |conns| {
                    conns.iter().filter(|c| !c.sender.is_closed()).count()
                })
            })
            .sum()
    }
}

/// The receiving side: HTTP/1.1 connections to the local app, reused across the streams of
/// every multiplexed connection.
///
/// A stream takes an idle connection (the newest that is ready), or dials one, for one
/// exchange, and the response body gives it back when it has ended ([`AppLoan`]); one whose
/// body is dropped before its end is closed with it, as HTTP/1.1 cannot cut one exchange
/// short. So a request costs no hashing and no task of its own (hyper-util's pool hashed its
/// key three times per request and spawned a task to see each connection idle again:
/// BENCHMARKS.md, "Per-request cost"). What the app sees is what that pool sent: the
/// request in origin form, `Host` set to the app's address when the caller sent none, and
/// a request that found its pooled connection closed before it was written sent again on a
/// new one. Connections idle for longer than the idle timeout are closed.
#[derive(Clone)]
pub(crate) struct AppPool(Arc<PoolInner>);

struct PoolInner {
    idle: Mutex<Idle>,
    idle_timeout: Duration,
    /// The last app address and its `Host` value: a sidecar's streams go to one app address
    /// (a few in transparent mode), so a request reuses it rather than formatting it again.
    host: Mutex<Option<(SocketAddr, HeaderValue)>>,
}

#[derive(Default)]
struct Idle {
    conns: Vec<IdleApp>,
    /// Whether a task is closing the connections idle for too long.
    sweeping: bool,
}

struct IdleApp {
    app: SocketAddr,
    sender: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// An app connection on loan for one exchange, given back to the pool when the response has
/// ended; dropped, it closes.
pub(crate) struct AppLoan {
    pool: Arc<PoolInner>,
    app: SocketAddr,
    sender: http1::SendRequest<ReqBody>,
}

impl AppLoan {
    pub(crate) fn give_back(self) {
        let AppLoan { pool, app, sender } = self;
        if sender.is_closed() {
            return;
        }
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.conns.push(IdleApp {
            app,
            sender,
            since: Instant::now(),
        });
        if !idle.sweeping {
            // A body dropped where no runtime runs (at shutdown) keeps no connection.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                idle.conns.pop();
                return;
            };
            idle.sweeping = true;
            runtime.spawn(sweep(pool.clone()));
        }
    }
}

/// Closes the connections idle for longer than the idle timeout, every idle timeout, until
/// none is left.
async fn sweep(pool: Arc<PoolInner>) {
    loop {
        tokio::time::sleep(pool.idle_timeout).await;
        let mut idle = pool.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        idle.conns
            .retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < pool.idle_timeout);
        if idle.conns.is_empty() {
            idle.sweeping = false;
            return;
        }
    }
}

impl AppPool {
    pub(crate) fn new(idle_timeout: Duration) -> AppPool {
        AppPool(Arc::new(PoolInner {
            idle: Mutex::default(),
            idle_timeout,
            host: Mutex::default(),
        }))
    }

    /// The `Host` a request without one gets: the app's address, its port left out when it
    /// is 80.
    fn host(&self, app: SocketAddr) -> Result<HeaderValue, LinkError> {
        let mut last = self.0.host.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((addr, host)) = &*last
            && *addr == app
        {
            return Ok(host.clone());
        }
        let text = match app.port() {
            80 => match app {
                SocketAddr::V4(a) => a.ip().to_string(),
                SocketAddr::V6(a) => format!("[{}]", a.ip()),
            },
            _ => app.to_string(),
        };
        let host = HeaderValue::try_from(text)
            .map_err(|e| LinkError::Connect(std::io::Error::other(e)))?;
        *last = Some((app, host.clone()));
        Ok(host)
    }

    /// The newest idle connection to `app` that is ready for a request. Closed and expired
    /// ones are dropped on the way; one still finishing its last exchange is left.
    fn take(&self, app: SocketAddr) -> Option<http1::SendRequest<ReqBody>> {
        let mut idle = self.0.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let mut i = idle.conns.len();
        while i > 0 {
            i -= 1;
            let c = &idle.conns[i];
            if c.app != app {
                continue;
            }
            if c.sender.is_closed() || now.duration_since(c.since) >= self.0.idle_timeout {
                idle.conns.remove(i);
            } else if c.sender.is_ready() {
                return Some(idle.conns.remove(i).sender);
            }
        }
        None
    }

    /// Forwards a stream's request to the app at `app` as HTTP/1.1, on an idle connection or
    /// one dialled with `connect`. The response's body gives the connection back.
    pub(crate) async fn send<F, Fut>(
        &self,
        _permit: Permit,
        app: SocketAddr,
        mut req: Request<ReqBody>,
        connect: F,
    ) -> Result<Response<Body>, LinkError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<TcpStream>>,
    {
        if !req.headers().contains_key(http::header::HOST) {
            req.headers_mut()
                .insert(http::header::HOST, self.host(app)?);
        }
        // Origin form: the path and query share the request's bytes.
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = http::Uri::from(path);
        *req.version_mut() = Version::HTTP_11;
        if let Some(mut sender) = self.take(app) {
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.lent(resp, app, sender)),
                Err(mut e) => match e.take_message() {
                    // The app closed it before the request was written: once more, on a
                    // new connection.
                    Some(unsent) => req = unsent,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // Boxed: dialling is rare, and unboxed its handshake would size every request's
        // future.
        let mut sender = Box::pin(dial_app(connect)).await?;
        let resp = sender.send_request(req).await?;
        Ok(self.lent(resp, app, sender))
    }

    fn lent(
        &self,
        resp: Response<Incoming>,
        app: SocketAddr,
        sender: http1::SendRequest<ReqBody>,
    ) -> Response<Body> {
        let mut resp = response_body(resp);
        *resp.version_mut() = Version::HTTP_2;
        resp.body_mut().set_app_loan(Box::new(AppLoan {
            pool: self.0.clone(),
            app,
            sender,
        }));
        resp
    }
}

async fn dial_app<F, Fut>(connect: F) -> Result<http1::SendRequest<ReqBody>, LinkError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::io::Result<TcpStream>>,
{
    handshake_h1(connect().await.map_err(LinkError::Connect)?).await
}

/// Dials a shared connection and runs its HTTP/2 handshake; the connection's task is spawned.
async fn dial<F, Fut, Io>(connect: F) -> Result<SendRequest<ReqBody>, LinkError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = std::io::Result<Io>>,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(connect().await.map_err(LinkError::Connect)?);
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .handshake(io)
        .await?;
    spawn_conn(conn);
    Ok(sender)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// An HTTP/2 server that holds every request until `release` is notified; returns its
    /// address and how many connections it accepted.
    async fn holding_server(release: Arc<tokio::sync::Notify>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let release = release.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let release = release.clone();
                        async move {
                            release.notified().await;
                            Ok::<_, std::convert::Infallible>(Response::new(
                                http_body_util::Empty::<bytes::Bytes>::new(),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<ReqBody> {
        Request::get("/held").body(ReqBody::empty()).unwrap()
    }

    /// An HTTP/1.1 app that answers `/empty` with a 204 and anything else with what it was
    /// asked (`{target} {host}`), closing each connection after `per_connection` answers;
    /// returns its address, the connections it accepted, and those that have closed.
    async fn http1_app(per_connection: usize) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, c) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                a.fetch_add(1, Ordering::Relaxed);
                let c = c.clone();
                let answered = Arc::new(AtomicUsize::new(0));
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let n = answered.fetch_add(1, Ordering::Relaxed) + 1;
                        let host = req.headers().get(http::header::HOST).cloned();
                        let said = format!(
                            "{} {}",
                            req.uri(),
                            host.as_ref().map_or("-", |h| h.to_str().unwrap())
                        );
                        async move {
                            let mut resp = if req.uri().path() == "/empty" {
                                let mut r =
                                    Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                                *r.status_mut() = http::StatusCode::NO_CONTENT;
                                r
                            } else {
                                Response::new(http_body_util::Full::new(bytes::Bytes::from(said)))
                            };
                            if n >= per_connection {
                                resp.headers_mut().insert(
                                    http::header::CONNECTION,
                                    HeaderValue::from_static("close"),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                    c.fetch_add(1, Ordering::Relaxed);
                });
            }
        });
        (addr, accepted, closed)
    }

    async fn pool_send(
        pool: &AppPool,
        app: SocketAddr,
        target: &str,
        host: Option<&str>,
    ) -> Response<Body> {
        let mut req = Request::get(target);
        if let Some(h) = host {
            req = req.header(http::header::HOST, h);
        }
        pool.send(
            Permit::for_tests(),
            app,
            req.body(ReqBody::empty()).unwrap(),
            move || tokio::net::TcpStream::connect(app),
        )
        .await
        .unwrap()
    }

    async fn pool_get(
        pool: &AppPool,
        app: SocketAddr,
        target: &str,
        host: Option<&str>,
    ) -> (http::StatusCode, String) {
        use http_body_util::BodyExt;
        let resp = pool_send(pool, app, target, host).await;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn app_connections_are_reused_in_origin_form_with_a_host() {
        let (app, accepted, _) = http1_app(usize::MAX).await;
        let pool = AppPool::new(Duration::from_secs(60));
        // As a stream arrives: absolute form, no Host. The app gets origin form and its
        // own address as Host; a caller's Host is kept.
        let (status, said) = pool_get(&pool, app, "http://orders.shop/a?b=1", None).await;
        assert_eq!(status, http::StatusCode::OK);
        assert_eq!(said, format!("/a?b=1 {app}"));
        let (_, said) = pool_get(&pool, app, "http://orders.shop/c", Some("orders.shop")).await;
        assert_eq!(said, "/c orders.shop");
        // An answer with no body is not read, only dropped (as hyper's HTTP/2 server does):
        // its connection is free too.
        let resp = pool_send(&pool, app, "/empty", None).await;
        assert_eq!(resp.status(), http::StatusCode::NO_CONTENT);
        drop(resp);
        for _ in 0..5 {
            let (status, _) = pool_get(&pool, app, "/d", None).await;
            assert_eq!(status, http::StatusCode::OK);
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one app connection for every request"
        );
    }

    #[tokio::test]
    async fn an_app_closing_its_connections_costs_no_request() {
        // The app closes every connection after its answer (`Connection: close`): the pool
        // never lends such a connection again; each request dials a new one.
        let (app, accepted, _) = http1_app(1).await;
        let pool = AppPool::new(Duration::from_secs(60));
        for i in 0..20 {
            let (status, said) = pool_get(&pool, app, &format!("/n{i}"), None).await;
            assert_eq!(status, http::StatusCode::OK, "request {i}");
            assert_eq!(said, format!("/n{i} {app}"));
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 20);
    }

    #[tokio::test]
    async fn idle_app_connections_close_after_the_idle_timeout() {
        let (app, accepted, closed) = http1_app(usize::MAX).await;
        let pool = AppPool::new(Duration::from_millis(100));
        pool_get(&pool, app, "/a", None).await;
        pool_get(&pool, app, "/b", None).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(closed.load(Ordering::Relaxed), 0);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            closed.load(Ordering::Relaxed),
            1,
            "the idle connection was closed"
        );
        // The next request dials again.
        pool_get(&pool, app, "/c", None).await;
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_full_shared_connection_spills_to_another_and_streams_come_back() {
        let release = Arc::new(tokio::sync::Notify::new());
        let (addr, accepted) = holding_server(release.clone()).await;
        let mux = Arc::new(Mux::new(2));
        let key: Arc<str> = Arc::from("spiffe://td/ns/shop/sa/orders");
        let connect = move || tokio::net::TcpStream::connect(addr);
        // Five held requests at two streams per connection: three connections.
        let mut held = Vec::new();
        for _ in 0..5 {
            let (mux, key) = (mux.clone(), key.clone());
            held.push(tokio::spawn(async move {
                mux.send(Permit::for_tests(), addr, &key, get(), connect)
                    .await
                    .map(|(resp, place)| (resp.status(), place))
            }));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
        assert_eq!(mux.open(), 3);
        // Answered, and their places dropped: the next requests need no new connection.
        release.notify_waiters();
        for h in held {
            let (status, place) = h.await.unwrap().unwrap();
            assert_eq!(status, http::StatusCode::OK);
            drop(place);
        }
        let (mux2, key2) = (mux.clone(), key.clone());
        let next = tokio::spawn(async move {
            mux2.send(Permit::for_tests(), addr, &key2, get(), connect)
                .await
                .map(|(resp, _)| resp.status())
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        release.notify_waiters();
        assert_eq!(next.await.unwrap().unwrap(), http::StatusCode::OK);
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
    }
}
