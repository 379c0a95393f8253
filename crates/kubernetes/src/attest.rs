//! Service-account token attestation: a sidecar presents the projected token of its pod
//! (audience `bulkhead`); the control plane asks the API server about it with a TokenReview
//! (`POST /apis/authentication.k8s.io/v1/tokenreviews`, with its own service-account token)
//! and maps what the API server vouches for to exactly one SPIFFE ID,
//! `spiffe://<td>/ns/<ns>/sa/<sa>` ([`identity_of`]).
//!
//! A token is never taken on its own word: its signature, expiry, audience and the pod it is
//! bound to are the API server's to check, and this module refuses everything the API server
//! did not affirm: an unauthenticated review (an expired token, another audience, a pod that
//! no longer exists), an answer without our audience, a user that is not a service account,
//! and a token not bound to a pod (a long-lived Secret token). `bulkhead control
//! --kubernetes-attest` hands a [`TokenReviewer`] to the control plane as its
//! [`Attestor`]: Identity.Join with a service-account token asks it.

use bulkhead_control::{Attestation, AttestationError, Attestor};
use bulkhead_identity::SpiffeId;
use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

/// Where a pod finds its own service-account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The TokenReview endpoint.
pub const TOKEN_REVIEW_PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// `user.extra` keys the API server sets for a token bound to a pod.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";
const SERVICE_ACCOUNT_PREFIX: &str = "system:serviceaccount:";
const TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// Why a token gives no identity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the API server did not authenticate the token: {0}")]
    Unauthenticated(String),
    #[error(
        "the token is not for audience {wanted:?} (the API server vouched for {got:?}); the sidecar must present its projected token for audience {wanted:?}"
    )]
    Audience { wanted: String, got: Vec<String> },
    #[error("{0:?} is not a service account; only service-account tokens are attested")]
    NotServiceAccount(String),
    #[error(
        "the token of {0} is not bound to a pod (a long-lived Secret token?); only a pod's projected token is attested"
    )]
    NotBoundToPod(String),
    #[error("namespace {namespace:?} and service account {account:?} make no SPIFFE ID: {reason}")]
    BadName {
        namespace: String,
        account: String,
        reason: String,
    },
}

/// Why a TokenReview could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("in-cluster configuration: {0}")]
    InCluster(String),
    #[error("--kubernetes-api {url:?} {why}: expected https://HOST[:PORT]")]
    ApiUrl { url: String, why: &'static str },
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TokenReview to {server}: {message}")]
    Transport { server: String, message: String },
    #[error("TokenReview to {server} answered {status}: {message}")]
    Status {
        server: String,
        status: u16,
        message: String,
    },
}

/// An attested workload: its identity and the pod its token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attested {
    pub id: SpiffeId,
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: Option<String>,
}

/// What the API server answered → the one identity it vouches for, or why none.
pub fn identity_of(
    trust_domain: &str,
    audience: &str,
    status: &TokenReviewStatus,
) -> Result<Attested, Refusal> {
    if status.authenticated != Some(true) {
        return Err(Refusal::Unauthenticated(
            status
                .error
                .clone()
                .unwrap_or_else(|| "no reason given".into()),
        ));
    }
    let got = status.audiences.clone().unwrap_or_default();
    if !got.iter().any(|a| a == audience) {
        return Err(Refusal::Audience {
            wanted: audience.into(),
            got,
        });
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some((namespace, account)) = username
        .strip_prefix(SERVICE_ACCOUNT_PREFIX)
        .and_then(|rest| rest.split_once(':'))
    else {
        return Err(Refusal::NotServiceAccount(username));
    };
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let Some(pod_name) = one(POD_NAME_EXTRA) else {
        return Err(Refusal::NotBoundToPod(username.clone()));
    };
    let bad = |reason: String| Refusal::BadName {
        namespace: namespace.into(),
        account: account.into(),
        reason,
    };
    // Kubernetes names them as DNS subdomains; anything else (a `/` above all) would make
    // another path of the ID than `ns/<ns>/sa/<sa>`.
    if !is_dns_subdomain(namespace) || !is_dns_subdomain(account) {
        return Err(bad(
            "Kubernetes names are lower-case letters, digits, '-' and '.'".into(),
        ));
    }
    let id = SpiffeId::parse(&format!(
        "spiffe://{trust_domain}/ns/{namespace}/sa/{account}"
    ))
    .map_err(|e| bad(e.to_string()))?;
    Ok(Attested {
        id,
        namespace: namespace.into(),
        service_account: account.into(),
        pod_name,
        pod_uid: one(POD_UID_EXTRA),
    })
}

/// A Kubernetes DNS-subdomain name (RFC 1123): what namespaces and service accounts are.
fn is_dns_subdomain(name: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    name.len() <= 253
        && edge(name.chars().next())
        && edge(name.chars().last())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

/// The API server as a pod reaches it: `KUBERNETES_SERVICE_HOST`/`_PORT`, and the
/// service-account CA and token under [`SERVICE_ACCOUNT_DIR`].
#[derive(Clone, Debug)]
pub struct InCluster {
    /// `host:port` (an IPv6 host in brackets).
    pub server: String,
    pub host: String,
    pub ca_pem: String,
    /// Re-read at every call: the kubelet rotates it.
    pub token_file: PathBuf,
}

impl InCluster {
    /// Reads the environment through `env` and the files under `dir`.
    pub fn load(
        env: impl Fn(&str) -> Option<String>,
        dir: &Path,
    ) -> Result<InCluster, ReviewError> {
        let var = |name: &str| {
            env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
                ReviewError::InCluster(format!(
                    "{name} is not set: not running in a pod, or the API server's Service is not visible to it"
                ))
            })
        };
        let host = var("KUBERNETES_SERVICE_HOST")?;
        let port: u16 = var("KUBERNETES_SERVICE_PORT")?
            .parse()
            .map_err(|_| ReviewError::InCluster("KUBERNETES_SERVICE_PORT is not a port".into()))?;
        let server = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        let ca_file = dir.join("ca.crt");
        let ca_pem = std::fs::read_to_string(&ca_file).map_err(|source| ReviewError::File {
            path: ca_file,
            source,
        })?;
        Ok(InCluster {
            server,
            host,
            ca_pem,
            token_file: dir.join("token"),
        })
    }
}

impl InCluster {
    /// The API server at `url` (`https://HOST[:PORT]`, 443 by default), trusted through the
    /// CA certificates in `ca_file`, called with the token in `token_file` (re-read at every
    /// call): a control plane outside the cluster, or a test's API server.
    pub fn explicit(
        url: &str,
        ca_file: &Path,
        token_file: &Path,
    ) -> Result<InCluster, ReviewError> {
        let bad = |why: &'static str| ReviewError::ApiUrl {
            url: url.into(),
            why,
        };
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| bad("is not an https:// URL"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad("has a path, query or user, or no host"));
        }
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("has no closing ']'"))?;
                let port = match after {
                    "" => None,
                    p => Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("has junk after ']'"))?,
                    ),
                };
                (host, port)
            }
            None => match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            },
        };
        let port: u16 = match port {
            None => 443,
            Some(p) => p.parse().map_err(|_| bad("has no valid port"))?,
        };
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let server = match host.contains(':') {
            true => format!("[{host}]:{port}"),
            false => format!("{host}:{port}"),
        };
        let ca_pem = std::fs::read_to_string(ca_file).map_err(|source| ReviewError::File {
            path: ca_file.to_path_buf(),
            source,
        })?;
        Ok(InCluster {
            server,
            host: host.into(),
            ca_pem,
            token_file: token_file.to_path_buf(),
        })
    }
}

/// Makes TokenReviews with the control plane's own credentials.
#[derive(Clone)]
pub struct TokenReviewer {
    cluster: InCluster,
    tls: Arc<ClientConfig>,
    audience: String,
}

impl TokenReviewer {
    /// A reviewer asking about tokens for `audience`, trusting only the cluster's CA.
    pub fn new(cluster: InCluster, audience: &str) -> Result<TokenReviewer, ReviewError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(cluster.ca_pem.as_bytes()) {
            let cert = cert.map_err(|e| ReviewError::InCluster(format!("ca.crt: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| ReviewError::InCluster(format!("ca.crt: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ReviewError::InCluster("ca.crt holds no certificate".into()));
        }
        let tls = ClientConfig::builder_with_provider(bulkhead_identity::tls::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ReviewError::InCluster(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TokenReviewer {
            cluster,
            tls: Arc::new(tls),
            audience: audience.into(),
        })
    }

    /// Asks the API server about `token`, then maps its answer ([`identity_of`]).
    pub async fn attest(
        &self,
        trust_domain: &str,
        token: &str,
    ) -> Result<Result<Attested, Refusal>, ReviewError> {
        let status = self.review(token).await?;
        Ok(identity_of(trust_domain, &self.audience, &status))
    }

    /// One TokenReview: what the API server says of `token`.
    pub async fn review(&self, token: &str) -> Result<TokenReviewStatus, ReviewError> {
        let server = self.cluster.server.clone();
        let transport = |message: String| ReviewError::Transport {
            server: server.clone(),
            message,
        };
        let own = std::fs::read_to_string(&self.cluster.token_file).map_err(|source| {
            ReviewError::File {
                path: self.cluster.token_file.clone(),
                source,
            }
        })?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.into()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let mut body = serde_json::to_value(&review).map_err(|e| transport(e.to_string()))?;
        body["apiVersion"] = "authentication.k8s.io/v1".into();
        body["kind"] = "TokenReview".into();
        let body = serde_json::to_vec(&body).map_err(|e| transport(e.to_string()))?;
        let request = Request::post(TOKEN_REVIEW_PATH)
            .header(header::HOST, &self.cluster.server)
            .header(header::AUTHORIZATION, format!("Bearer {}", own.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| transport(e.to_string()))?;
        let name = ServerName::try_from(self.cluster.host.clone())
            .map_err(|e| transport(format!("{:?} is not a server name: {e}", self.cluster.host)))?;
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(&self.cluster.server)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| transport(format!("TLS: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| transport(e.to_string()))?;
            tokio::spawn(conn);
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| transport(e.to_string()))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| transport(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, ReviewError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| transport(format!("no answer within {TIMEOUT:?}")))??;
        if status != StatusCode::CREATED && status != StatusCode::OK {
            // A Status object; its message says why (403: RBAC, 401: our own token).
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ReviewError::Status {
                server,
                status: status.as_u16(),
                message,
            });
        }
        let answer: TokenReview = serde_json::from_slice(&bytes)
            .map_err(|e| transport(format!("the answer is not a TokenReview: {e}")))?;
        answer
            .status
            .ok_or_else(|| transport("the TokenReview has no status".into()))
    }
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("server", &self.cluster.server)
            .field("token_file", &self.cluster.token_file)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// The control plane's check of a service-account token (`--kubernetes-attest`): what the
/// API server refuses or does not affirm is [`AttestationError::Refused`] with its reason;
/// an API server that cannot be asked is [`AttestationError::Unreachable`].
impl Attestor for TokenReviewer {
    fn describe(&self) -> &str {
        "Kubernetes service-account tokens (TokenReview)"
    }

    fn attest<'a>(&'a self, trust_domain: &'a str, credential: &'a str) -> Attestation<'a> {
        Box::pin(async move {
            match TokenReviewer::attest(self, trust_domain, credential).await {
                Ok(Ok(a)) => Ok(bulkhead_control::Attested {
                    id: a.id,
                    subject: format!("pod {}/{}", a.namespace, a.pod_name),
                }),
                Ok(Err(refusal)) => Err(AttestationError::Refused {
                    reason: refusal.to_string(),
                }),
                Err(e) => Err(AttestationError::Unreachable {
                    reason: e.to_string(),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests;
