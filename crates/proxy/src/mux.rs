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
use crate::http::{LinkError, spawn_conn};

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncRead, AsyncWrite};

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
pub(crate) struct AppPool {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        ReqBody,
    >,
    /// The last app address and its authority: a sidecar's streams go to one app address (a
    /// few in transparent mode), so a request reuses it rather than formatting and parsing
    /// the address again.
    authority: Mutex<Option<(SocketAddr, http::uri::Authority)>>,
}

impl AppPool {
    pub(crate) fn new(idle: std::time::Duration) -> AppPool {
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle)
            .http1_preserve_header_case(false)
            .build(connector);
        AppPool {
            client,
            authority: Mutex::default(),
        }
    }

    fn authority(&self, app: SocketAddr) -> Result<http::uri::Authority, LinkError> {
        let mut last = self
            .authority
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((addr, authority)) = &*last
            && *addr == app
        {
            return Ok(authority.clone());
        }
        let authority = http::uri::Authority::try_from(app.to_string())
            .map_err(|e| LinkError::Connect(std::io::Error::other(e)))?;
        *last = Some((app, authority.clone()));
        Ok(authority)
    }

    /// Forwards a stream's request to the app at `app` as HTTP/1.1.
    pub(crate) async fn send(
        &self,
        _permit: Permit,
        app: SocketAddr,
        mut req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, LinkError> {
        // The same URI as `http://{app}{path and query}`, from parts already parsed: the
        // path and query share the request's bytes.
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority(app)?);
        parts.path_and_query = Some(
            req.uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        *req.uri_mut() = http::Uri::from_parts(parts)
            .map_err(|e| LinkError::Connect(std::io::Error::other(e)))?;
        *req.version_mut() = Version::HTTP_11;
        let mut resp = self.client.request(req).await?;
        *resp.version_mut() = Version::HTTP_2;
        Ok(resp)
    }
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
