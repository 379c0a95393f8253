//! The sidecar-injection webhook served for real: HTTPS on `bulkhead control
//! --webhook-listen`, `POST /inject`, with a certificate the control plane issues from the
//! mesh's CA for the webhook Service's DNS names (`spiffe://<td>/bulkhead/webhook`), re-issued
//! at half-life and at every CA change; and the MutatingWebhookConfiguration that points the
//! API server at it (`configuration`), whose `caBundle` is the mesh's bundle.
//!
//! It must never panic or hang on what it is sent: a body that is not an AdmissionReview v1
//! gets an HTTP error in words (`admission`), a slow or huge one is cut off, and the number
//! of open connections is bounded. It asks for no client certificate (the API server does
//! not present one by default) and changes nothing but the pod it answers for.

mod configuration;

pub use configuration::{WebhookConfig, configuration_yaml};

use crate::admission::{self, AdmissionError, Answer, MAX_REVIEW_BYTES};
use crate::inject::InjectConfig;
use bulkhead_control::{Issuer, ServingTls};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// The path the API server posts AdmissionReviews to.
pub const INJECT_PATH: &str = "/inject";
/// The name under `spiffe://<td>/bulkhead/` the webhook's certificate carries.
pub const WEBHOOK_ID_NAME: &str = "webhook";
/// The webhook Service's name, namespace and the DNS name the API server verifies.
pub const DEFAULT_SERVICE: &str = "bulkhead-webhook";
pub const DEFAULT_NAMESPACE: &str = "bulkhead-system";
pub const DEFAULT_HOST: &str = "bulkhead-webhook.bulkhead-system.svc";

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole request, body included, must arrive within this (the API server's own timeout
/// for a webhook call is at most 30 s).
const BODY_TIMEOUT: Duration = Duration::from_secs(15);
const MAX_CONNECTIONS: usize = 128;

/// `bulkhead control --webhook-listen ADDR [--webhook-host NAME]… --inject-image …`.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    pub listen: SocketAddr,
    /// The DNS names (or addresses) the API server reaches the webhook by; they go into its
    /// certificate.
    pub hosts: Vec<String>,
    /// What injection puts into a pod; its trust bundle is replaced by the current one at
    /// every request.
    pub inject: InjectConfig,
}

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the injection webhook cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the injection webhook's certificate: {0}")]
    Certificate(#[from] bulkhead_control::ControlError),
    #[error("--webhook-host: give at least one DNS name the API server reaches the webhook by")]
    NoHost,
}

/// A running webhook listener.
pub struct Webhook {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    /// Stops accepting; connections in progress are dropped.
    pub fn abort(&self) {
        self.task.abort();
    }
}

#[derive(Clone)]
struct App {
    issuer: Issuer,
    inject: Arc<InjectConfig>,
}

/// Binds the webhook and serves it in the background.
pub async fn spawn(issuer: Issuer, options: WebhookOptions) -> Result<Webhook, WebhookError> {
    if options.hosts.is_empty() {
        return Err(WebhookError::NoHost);
    }
    let tls = issuer.serving(WEBHOOK_ID_NAME, &options.hosts, &[b"h2", b"http/1.1"])?;
    let tcp = TcpListener::bind(options.listen)
        .await
        .map_err(|source| WebhookError::Bind {
            addr: options.listen,
            source,
        })?;
    let addr = tcp.local_addr().map_err(|source| WebhookError::Bind {
        addr: options.listen,
        source,
    })?;
    let app = App {
        issuer,
        inject: Arc::new(options.inject),
    };
    tracing::info!(listen = %addr, hosts = ?options.hosts, "injection webhook listening (POST {INJECT_PATH})");
    let task = tokio::spawn(accept(tcp, tls, app));
    Ok(Webhook { addr, task })
}

async fn accept(tcp: TcpListener, tls: ServingTls, app: App) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, remote) = match tcp.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "webhook accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let config = tls.config();
        let app = app.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Some(stream) =
                bulkhead_control::tls_handshake(config, stream, remote, "webhook").await
            else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&app, req).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%remote, error = %e, "webhook connection ended");
            }
        });
    }
}

/// One request: `POST /inject` with an AdmissionReview, or an error in words.
async fn handle(app: &App, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() != INJECT_PATH {
        return error(&AdmissionError {
            status: 404,
            message: format!("no such path; the injection webhook serves POST {INJECT_PATH}"),
        });
    }
    if req.method() != Method::POST {
        let mut res = error(&AdmissionError {
            status: 405,
            message: format!("{INJECT_PATH} takes POST"),
        });
        res.headers_mut()
            .insert(header::ALLOW, http::HeaderValue::from_static("POST"));
        return res;
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = admission::check_content_type(content_type) {
        return error(&e);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_REVIEW_BYTES as u64) {
        return error(&admission::too_large());
    }
    let body = Limited::new(req.into_body(), MAX_REVIEW_BYTES);
    let body = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return error(&admission::too_large());
        }
        Ok(Err(e)) => {
            return error(&AdmissionError {
                status: 400,
                message: format!("the request body could not be read: {e}"),
            });
        }
        Err(_) => {
            return error(&AdmissionError {
                status: 408,
                message: format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            });
        }
    };
    let mut config = (*app.inject).clone();
    config.trust_bundle_pem = app.issuer.bundle_pem();
    match admission::answer(&body, &config) {
        Ok((review, answer)) => {
            let uid = review["response"]["uid"].as_str().unwrap_or_default();
            match &answer {
                Answer::Injected(_) => tracing::info!(uid, "pod injected"),
                Answer::Unchanged(why) => {
                    tracing::info!(uid, reason = %why, "pod admitted unchanged")
                }
                Answer::Refused(why) => tracing::warn!(uid, reason = %why, "pod refused"),
            }
            json(StatusCode::OK, &review)
        }
        Err(e) => {
            tracing::warn!(status = e.status, reason = %e.message, "webhook request refused");
            error(&e)
        }
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    res
}

fn error(e: &AdmissionError) -> Response<Full<Bytes>> {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    json(status, &serde_json::json!({ "error": e.message }))
}
