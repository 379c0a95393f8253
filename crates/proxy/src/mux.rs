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

use crate::authz::Permit;
use crate::http::{LinkError, spawn_conn};

use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::io::{AsyncRead, AsyncWrite};

/// One slot per destination; the async lock is held while dialling, so concurrent first
/// requests open one connection, not many.
type Slot = Arc<tokio::sync::Mutex<Option<SendRequest<Incoming>>>>;

/// At most this many destinations keep a slot; past it, slots with closed connections are
/// dropped.
const MAX_SLOTS: usize = 4096;

/// The shared connections of the outbound side, by destination address and identity.
#[derive(Default)]
pub(crate) struct Mux {
    slots: Mutex<HashMap<(SocketAddr, Arc<str>), Slot>>,
}

impl Mux {
    fn slot(&self, addr: SocketAddr, identity: &Arc<str>) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        if slots.len() >= MAX_SLOTS {
            slots.retain(|_, slot| {
                slot.try_lock()
                    .map_or(true, |s| s.as_ref().is_some_and(|s| !s.is_closed()))
            });
        }
        slots.entry((addr, identity.clone())).or_default().clone()
    }

    /// Sends an HTTP/1.1 request as a stream of the destination's shared connection,
    /// dialling it with `connect` if there is none or it closed. The response comes back as
    /// HTTP/1.1.
    pub(crate) async fn send<F, Fut, Io>(
        &self,
        _permit: Permit,
        addr: SocketAddr,
        identity: &Arc<str>,
        mut req: Request<Incoming>,
        connect: F,
    ) -> Result<Response<Incoming>, LinkError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<Io>>,
        Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut sender = {
            let slot = self.slot(addr, identity);
            let mut guard = slot.lock().await;
            match guard.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let io = TokioIo::new(connect().await.map_err(LinkError::Connect)?);
                    let (sender, conn) =
                        hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                            .timer(TokioTimer::new())
                            .adaptive_window(true)
                            .handshake(io)
                            .await?;
                    spawn_conn(conn);
                    *guard = Some(sender.clone());
                    sender
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
        Ok(resp)
    }

    /// Open shared connections, for the admin page.
    pub(crate) fn open(&self) -> usize {
        let slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots
            .values()
            .filter(|slot| {
                slot.try_lock()
                    .is_ok_and(|s| s.as_ref().is_some_and(|s| !s.is_closed()))
            })
            .count()
    }
}

/// The receiving side: HTTP/1.1 connections to the local app, reused across the streams of
/// every multiplexed connection.
pub(crate) struct AppPool {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Incoming,
    >,
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
        AppPool { client }
    }

    /// Forwards a stream's request to the app at `app` as HTTP/1.1.
    pub(crate) async fn send(
        &self,
        _permit: Permit,
        app: SocketAddr,
        mut req: Request<Incoming>,
    ) -> Result<Response<Incoming>, LinkError> {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        *req.uri_mut() = http::Uri::builder()
            .scheme("http")
            .authority(app.to_string())
            .path_and_query(path)
            .build()
            .map_err(|e| LinkError::Connect(std::io::Error::other(e)))?;
        *req.version_mut() = Version::HTTP_11;
        let mut resp = self.client.request(req).await?;
        *resp.version_mut() = Version::HTTP_2;
        Ok(resp)
    }
}
