//! The console's listener: HTTPS with a certificate the control plane issues itself from the
//! mesh's CA (`spiffe://<td>/bulkhead/console`, with the console's host names), re-issued at
//! half-life and on every CA change; or plain HTTP on loopback when asked. Client
//! certificates are optional: the admin credential's is one way in.
//!
//! Every response carries the security headers (a strict CSP, nosniff, no referrer, no
//! framing); a request naming a host the console does not serve is refused before anything
//! else (a DNS-rebinding page cannot reach it through a name of its own).

use super::auth::{self, Access, LoginError, PLAIN_COOKIE, SECURE_COOKIE};
use super::{ConsoleOptions, ConsoleTransport, Served, assets, live, views};
use crate::error::ControlError;
use crate::listener::{next_connection, stopped};
use crate::proxies::unix_now;
use crate::service::State;
use arc_swap::ArcSwap;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State as Ext};
use axum::middleware::{Next, from_fn_with_state, map_response};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bulkhead_identity::SpiffeId;
use bulkhead_identity::tls::{ClientAuth, peer_identity, server_config};
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};

/// The console's own identity, in the mesh's reserved space.
const CONSOLE_ID_PATH: &str = "/bulkhead/console";
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;
/// A login request is a token in a small JSON object.
const MAX_LOGIN_BODY: usize = 4096;

pub(super) const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// What every handler gets.
#[derive(Clone)]
pub(super) struct App {
    pub state: Arc<State>,
    pub served: Served,
}

/// The other end of a connection, as every request sees it.
#[derive(Clone, Debug)]
struct Peer {
    identity: Option<SpiffeId>,
}

/// Binds the console, records where it is served, and serves it until `stop`.
pub(crate) async fn spawn(
    state: Arc<State>,
    options: &ConsoleOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<Served, ControlError> {
    let mut names = options.names()?;
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let (tcp, addr) = crate::listener::bind(options.listen).await?;
    let secure = options.transport == ConsoleTransport::Https;
    let scheme = if secure { "https" } else { "http" };
    let authority = |name: &str| match name.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]:{}", addr.port()),
        _ => format!("{name}:{}", addr.port()),
    };
    let hosts: Vec<String> = names.iter().map(|n| authority(n)).collect();
    let served = Served {
        url: format!("{scheme}://{}/", hosts[0]),
        secure,
        origins: hosts.iter().map(|h| format!("{scheme}://{h}")).collect(),
        hosts,
    };
    let tls = match secure {
        true => {
            let config = Arc::new(ArcSwap::from_pointee(tls_config(&state, &names)?));
            let also = names.clone();
            crate::issuer::keep_current(
                state.clone(),
                "console".into(),
                move |state| tls_config(state, &also),
                config.clone(),
            );
            Some(config)
        }
        false => None,
    };
    if state.console.served.set(served.clone()).is_err() {
        return Err(ControlError::Console(
            "the console is served already".into(),
        ));
    }
    let app = App {
        state: state.clone(),
        served: served.clone(),
    };
    let router = router(app);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tracing::info!(listen = %addr, url = served.url, "console listening");
    tokio::spawn(async move {
        while let Some((permit, tcp, remote)) =
            next_connection(&tcp, &slots, &mut stop, "console").await
        {
            let _ = tcp.set_nodelay(true);
            let router = router.clone();
            let tls = tls.as_ref().map(|t| t.load_full());
            let trust_domain = state.trust_domain().to_string();
            let mut stop = stop.clone();
            tokio::spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = stopped(&mut stop) => {}
                    _ = connection(tcp, remote, tls, &trust_domain, router) => {}
                }
            });
        }
    });
    Ok(served)
}

/// One connection: the TLS handshake (when served over HTTPS), then HTTP/1.1 or HTTP/2.
async fn connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    tls: Option<Arc<ServerConfig>>,
    trust_domain: &str,
    router: Router,
) {
    let serve = |peer: Peer| {
        let router = router.clone();
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            let router = router.clone();
            async move {
                use tower::ServiceExt;
                router.oneshot(req.map(Body::new)).await
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let result = match tls {
        None => {
            let peer = Peer { identity: None };
            builder
                .serve_connection_with_upgrades(TokioIo::new(tcp), serve(peer))
                .await
        }
        Some(config) => {
            let Some(stream) = crate::listener::tls_handshake(config, tcp, remote, "console").await
            else {
                return;
            };
            let identity = match stream.get_ref().1.peer_certificates() {
                None => None,
                Some(certs) => match peer_identity(Some(certs), trust_domain) {
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::info!(%remote, reason = %e, "console client certificate refused");
                        return;
                    }
                },
            };
            builder
                .serve_connection_with_upgrades(TokioIo::new(stream), serve(Peer { identity }))
                .await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "console connection ended");
    }
}

/// A serving configuration with a fresh certificate from the signing CA: TLS 1.3, HTTP/2 or
/// HTTP/1.1, client certificates optional and checked against the bundle.
fn tls_config(state: &State, names: &[String]) -> Result<ServerConfig, ControlError> {
    let id = SpiffeId::parse(&format!(
        "spiffe://{}{CONSOLE_ID_PATH}",
        state.trust_domain()
    ))?;
    let svid = state.signer().issue_local_for_hosts(
        &id,
        names,
        state.svid_lifetime(),
        std::time::SystemTime::now(),
    )?;
    let cas = state.cas.borrow().clone();
    Ok(server_config(
        &svid,
        cas.bundle(),
        ClientAuth::Optional,
        &[b"h2", b"http/1.1"],
    )?)
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(shell))
        .route("/assets/{file}", get(assets::asset))
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/session", get(session))
        .route("/api/view/{view}", get(views::view))
        .route("/api/live/{view}", get(live::live))
        .route("/api/tap", get(live::tap))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such page") })
        .layer(from_fn_with_state(app.clone(), guard))
        .layer(map_response(security_headers))
        .with_state(app)
}

/// `{"error": "…"}` with `status`.
pub(super) fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

/// Checks the Host, then the credential, for everything but the static assets and the
/// login itself; the request carries its [`Access`] on.
async fn guard(Ext(app): Ext<App>, mut req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .map(str::to_ascii_lowercase);
    if !host.is_some_and(|h| app.served.hosts.contains(&h)) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "this console is not served under that host name",
        );
    }
    let path = req.uri().path();
    let public =
        path.starts_with("/assets/") || (path == "/api/login" && req.method() == Method::POST);
    if public {
        return next.run(req).await;
    }
    match access(&app, &req) {
        Some(access) => {
            req.extensions_mut().insert(access);
            next.run(req).await
        }
        None if path == "/" => {
            // The page itself, with no data: its script shows the login.
            let mut shell = assets::shell();
            *shell.status_mut() = StatusCode::UNAUTHORIZED;
            shell
        }
        None => error(
            StatusCode::UNAUTHORIZED,
            "log in first: open the address `bulkhead console token` prints, or present the admin client certificate",
        ),
    }
}

/// The admin client certificate, else an open session named by the cookie.
fn access(app: &App, req: &Request) -> Option<Access> {
    let peer = req.extensions().get::<Peer>();
    if let Some(id) = peer.and_then(|p| p.identity.as_ref())
        && *id == app.state.admin_id
    {
        return Some(Access {
            actor: id.to_string(),
            via: "certificate",
            expires_unix: 0,
            session: None,
        });
    }
    let name = if app.served.secure {
        SECURE_COOKIE
    } else {
        PLAIN_COOKIE
    };
    let id = auth::cookie(req.headers(), name)?;
    app.state.console.auth.session(id, unix_now())
}

async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, name: &'static str, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(h, "content-security-policy", CSP);
    set(h, "x-content-type-options", "nosniff");
    set(h, "referrer-policy", "no-referrer");
    set(h, "x-frame-options", "DENY");
    set(h, "cross-origin-opener-policy", "same-origin");
    set(h, "cross-origin-resource-policy", "same-origin");
    set(
        h,
        "permissions-policy",
        "camera=(), microphone=(), geolocation=()",
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    res
}

async fn shell() -> Response {
    assets::shell()
}

#[derive(serde::Deserialize)]
struct Login {
    token: String,
}

/// `POST /api/login {"token": "…"}`: spends the token, sets the session cookie.
async fn login(Ext(app): Ext<App>, headers: HeaderMap, body: Bytes) -> Response {
    if !auth::same_origin(&headers, &app.served.origins) {
        return error(
            StatusCode::FORBIDDEN,
            "a login must come from the console's own page",
        );
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json || body.len() > MAX_LOGIN_BODY {
        return error(
            StatusCode::BAD_REQUEST,
            "send the token as JSON: {\"token\": \"…\"}",
        );
    }
    let Ok(Login { token }) = serde_json::from_slice::<Login>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send the token as JSON: {\"token\": \"…\"}",
        );
    };
    match app.state.console.auth.exchange(&token, unix_now()) {
        Ok((id, access)) => {
            let cookie = auth::set_cookie(app.served.secure, Some(&id));
            let mut res = axum::Json(access).into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                res.headers_mut().insert(header::SET_COOKIE, v);
            }
            res
        }
        Err(e) => {
            tracing::warn!(reason = %e, "console login refused");
            let status = match e {
                LoginError::Unknown => StatusCode::UNAUTHORIZED,
                LoginError::Throttled => StatusCode::TOO_MANY_REQUESTS,
            };
            error(status, &e.to_string())
        }
    }
}

/// `POST /api/logout`: ends the session and clears its cookie.
async fn logout(
    Ext(app): Ext<App>,
    axum::Extension(access): axum::Extension<Access>,
    headers: HeaderMap,
) -> Response {
    if !auth::same_origin(&headers, &app.served.origins) {
        return error(
            StatusCode::FORBIDDEN,
            "a logout must come from the console's own page",
        );
    }
    app.state.console.auth.close(&access);
    let mut res = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::set_cookie(app.served.secure, None)) {
        res.headers_mut().insert(header::SET_COOKIE, v);
    }
    res
}

/// `GET /api/session`: who is looking, and until when.
async fn session(axum::Extension(access): axum::Extension<Access>) -> Response {
    axum::Json(access).into_response()
}
