//! A small HTTP service for the demo and the tests: it answers every request with who it is,
//! what was asked and who asked (the sidecar's `x-bulkhead-source`), after reading the
//! request's body whole (as an upload handler would). With a downstream URL, each POST first
//! calls that URL with POST and reports the answer, so requests chain across services. It
//! speaks HTTP/1.1 and HTTP/2 (h2c).
//!
//! Upgrades, as a real server would take them: `Upgrade: h2c` is answered with 101 and the
//! connection then speaks HTTP/2, served like any other (what an attacker smuggles requests
//! through); any other `Upgrade` is answered with 101 and the connection then echoes bytes (a
//! stand-in for WebSocket). For tests of the sidecar, a request may ask the app to misbehave
//! or to show what reached it: `x-sample-upgrade-as: P` answers an upgrade with 101 for
//! protocol P whatever was asked, and `x-echo-headers` adds the request's headers to the
//! answer. Each upgrade it accepts is logged (`upgraded to …`). With `tcp_echo` it is instead
//! a plain TCP echo server, for opaque TCP.
//!
//! A crate of its own so that the CLI, which starts it (`bulkhead sample-app`, `bulkhead
//! demo`), opens no socket itself: the sockets are here, in `proxy`, in `control` and in
//! `api::channel` (ARCHITECTURE.md's invariants). Never part of the mesh itself.

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// What went wrong, worded as the demo and `bulkhead sample-app` print it.
#[derive(Debug, thiserror::Error)]
pub enum SampleAppError {
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("URL has no host")]
    NoHost,
    #[error("cannot connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    #[error(transparent)]
    Request(#[from] http::Error),
}

pub type Result<T, E = SampleAppError> = std::result::Result<T, E>;

#[derive(Clone, Debug)]
pub struct AppSpec {
    pub name: String,
    /// Echo raw TCP instead of serving HTTP.
    pub tcp_echo: bool,
    /// `http://IP:PORT/path` to POST to on every POST we receive.
    pub downstream: Option<http::Uri>,
}

/// Binds the app's port (so a sidecar can be pointed at it before the app serves).
pub async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .map_err(|source| SampleAppError::Listen {
            addr: listen,
            source,
        })
}

/// Serves on `listener` in the background; returns its address.
pub fn serve(spec: AppSpec, listener: TcpListener) -> Result<SocketAddr> {
    let addr = listener.local_addr()?;
    let spec = Arc::new(spec);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let spec = spec.clone();
            tokio::spawn(async move {
                if spec.tcp_echo {
                    let (mut r, mut w) = tcp.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    return;
                }
                let svc = service_fn(move |req| handle(req, spec.clone()));
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    Ok(addr)
}

/// Answers an upgrade with 101. For `h2c`, the connection then speaks HTTP/2 and each of
/// its requests is served by [`handle`]; for anything else it echoes what the client sends.
fn upgrade(req: Request<Incoming>, spec: Arc<AppSpec>) -> Response<Full<Bytes>> {
    let asked = req.headers().get(http::header::UPGRADE).cloned();
    let protocol = req
        .headers()
        .get("x-sample-upgrade-as")
        .cloned()
        .or(asked)
        .unwrap_or_else(|| http::HeaderValue::from_static("websocket"));
    let h2c = protocol.as_bytes().eq_ignore_ascii_case(b"h2c");
    tracing::info!(
        app = spec.name,
        path = req.uri().path(),
        protocol = ?protocol,
        "upgraded to {}",
        if h2c { "h2c" } else { "an echo" }
    );
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        if h2c {
            let svc = service_fn(move |req| serve_boxed(req, spec.clone()));
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(upgraded, svc)
                .await;
        } else {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            let _ = tokio::io::copy(&mut r, &mut w).await;
        }
    });
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("upgrade"),
    );
    h.insert(http::header::UPGRADE, protocol);
    resp
}

type Answer = Result<Response<Full<Bytes>>, Infallible>;

/// [`handle`] behind a box, for the HTTP/2 connections an h2c upgrade starts from inside it.
fn serve_boxed(
    req: Request<Incoming>,
    spec: Arc<AppSpec>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Answer> + Send>> {
    Box::pin(handle(req, spec))
}

async fn handle(
    req: Request<Incoming>,
    spec: Arc<AppSpec>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.headers().contains_key(http::header::UPGRADE) {
        return Ok(upgrade(req, spec));
    }
    let caller = req
        .headers()
        .get("x-bulkhead-source")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("outside the mesh")
        .to_string();
    let mut text = format!(
        "{}: {} {} from {caller} ({:?})",
        spec.name,
        req.method(),
        req.uri().path(),
        req.version()
    );
    if req.headers().contains_key("x-echo-headers") {
        for (k, v) in req.headers() {
            text.push_str(&format!(
                "\n  {k}: {}",
                String::from_utf8_lossy(v.as_bytes())
            ));
        }
    }
    // `x-sample-status: 403`: the app answers that status itself, with a forged
    // `x-bulkhead-decision` that its sidecar must drop, so that tests can tell an app's own
    // 403 from a mesh denial (`response_flags` in the sidecars' metrics).
    let own_status = req
        .headers()
        .get("x-sample-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|v| StatusCode::from_u16(v).ok());
    // An upload is read whole before it is answered.
    let method = req.method().clone();
    if let Err(e) = req.into_body().collect().await {
        let mut resp = Response::new(Full::new(Bytes::from(format!(
            "{}: could not read the request body: {e}\n",
            spec.name
        ))));
        *resp.status_mut() = StatusCode::BAD_REQUEST;
        return Ok(resp);
    }
    let mut status = StatusCode::OK;
    if let (http::Method::POST, Some(down)) = (method, &spec.downstream) {
        match post(down).await {
            Ok((s, body)) => {
                if !s.is_success() {
                    status = StatusCode::BAD_GATEWAY;
                }
                text.push_str(&format!(
                    "\n  -> POST {} answered {}: {}",
                    down.path(),
                    s.as_u16(),
                    body.trim()
                ));
            }
            Err(e) => {
                status = StatusCode::BAD_GATEWAY;
                text.push_str(&format!("\n  -> POST {down} failed: {}", chain(&e)));
            }
        }
    }
    let mut resp = Response::new(Full::new(Bytes::from(text + "\n")));
    *resp.status_mut() = status;
    if let Some(own) = own_status {
        *resp.status_mut() = own;
        resp.headers_mut().insert(
            "x-bulkhead-decision",
            http::HeaderValue::from_static("deny; forged by the app"),
        );
    }
    Ok(resp)
}

/// One plain HTTP/1.1 request on a fresh connection; returns status and body text.
pub async fn request(
    method: http::Method,
    uri: &http::Uri,
) -> Result<(StatusCode, String, http::HeaderMap)> {
    let host = uri.host().ok_or(SampleAppError::NoHost)?;
    let port = uri.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|source| SampleAppError::Connect {
            host: host.to_string(),
            port,
            source,
        })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .body(Full::new(Bytes::new()))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned(), headers))
}

/// The error and its causes, each after a colon (as `anyhow` writes `{:#}`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

async fn post(uri: &http::Uri) -> Result<(StatusCode, String)> {
    let (s, body, _) = request(http::Method::POST, uri).await?;
    Ok((s, body))
}
