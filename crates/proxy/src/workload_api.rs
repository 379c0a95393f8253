//! The SPIFFE Workload API on a Unix socket (`--workload-api PATH`), for an app that wants
//! an X.509-SVID of its own: the sidecar's identity, with a key made for the app.
//!
//! The app's key is generated here, in the sidecar, and certified through the proxy's own
//! renewal call (`Identity.Renew`, over mTLS with the sidecar's SVID), so the control plane
//! issues it exactly the sidecar's identity and records it on the same proxy instance
//! (revoking the proxy revokes it too). The key leaves this process only on the local socket
//! (0600, bound in a private directory and renamed into place), never to the control plane
//! and never in a log. The sidecar's own key is never handed out.
//!
//! Each open `FetchX509SVID` stream gets a new message when the app's SVID is renewed (at
//! about half its life, and soon after the sidecar moves to another signing CA) and when the
//! trust bundle changes; `FetchX509Bundles` streams follow the bundle. Every call must carry
//! `workload.spiffe.io: true` (INVALID_ARGUMENT otherwise, as the spec says).
//!
//! JWT-SVIDs: `FetchJWTSVID` asks the control plane (`Identity.SignJwtSvid`, over the
//! sidecar's mTLS channel) to sign a token for the sidecar's own identity; the signing key
//! never leaves the control plane. `FetchJWTBundles` streams the JWT keys the control plane
//! pushes with the trust bundle; `ValidateJWTSVID` checks a token against them.
//!
//! Some clients (grpc-core for `unix:` targets, so py-spiffe) send the socket's path as
//! `:authority`, which h2 refuses before any service sees it; [`authority`] rewrites it to
//! `localhost` in the client's HTTP/2 header blocks, since a Unix socket has no authority.

mod authority;

use crate::credentials::{self, control_channel};
use crate::{ProxyError, Shared};
use bulkhead_api::spiffe_workload as pb;
use bulkhead_api::spiffe_workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use bulkhead_api::v1::identity_client::IdentityClient;
use bulkhead_identity::jwt::JwtBundle;
use bulkhead_identity::{Svid, TrustBundle, fingerprint};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Notify, watch};
use tokio_stream::{Stream, StreamExt, wrappers::WatchStream};
use tonic::{Request, Response, Status};

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the app is given: its SVID and the roots of its trust domain, replaced whole.
pub(crate) struct Issued {
    svid: Svid,
    bundle: TrustBundle,
}

/// The app's identity, as every open stream follows it.
pub(crate) struct AppIdentity {
    current: watch::Sender<Option<Arc<Issued>>>,
    /// The bundle alone, for `FetchX509Bundles` (known before the app's first SVID).
    bundle: watch::Sender<TrustBundle>,
    /// The JWT-SVID keys of our trust domain and each federated one, as the control plane
    /// pushes them.
    jwt: watch::Sender<BTreeMap<String, JwtBundle>>,
    /// Renew the app's SVID now (the sidecar moved to another signing CA).
    wake: Notify,
}

impl AppIdentity {
    pub(crate) fn new(bundle: TrustBundle) -> AppIdentity {
        AppIdentity {
            current: watch::Sender::new(None),
            bundle: watch::Sender::new(bundle),
            jwt: watch::Sender::new(BTreeMap::new()),
            wake: Notify::new(),
        }
    }

    /// The control plane's JWT keys: every FetchJWTBundles stream gets them when they change.
    pub(crate) fn jwt_keys(&self, bundle: BTreeMap<String, JwtBundle>) {
        self.jwt.send_if_modified(|current| {
            let changed = *current != bundle;
            *current = bundle;
            changed
        });
    }

    /// A new trust bundle reached the sidecar: every stream gets it.
    pub(crate) fn bundle_changed(&self, bundle: &TrustBundle) {
        self.bundle.send_replace(bundle.clone());
        self.current.send_modify(|current| {
            if let Some(issued) = current {
                *current = Some(Arc::new(Issued {
                    svid: issued.svid.clone(),
                    bundle: bundle.clone(),
                }));
            }
        });
    }

    /// The sidecar renewed: if its new SVID comes from another CA than the app's, the app's
    /// is renewed too, so that the old CA can be retired on the same schedule.
    pub(crate) fn sidecar_renewed(&self, signer: Option<&str>) {
        let app_signer = self
            .current
            .borrow()
            .as_ref()
            .and_then(|i| i.svid.issuer_fingerprint());
        if app_signer.is_some() && app_signer.as_deref() != signer {
            self.wake.notify_one();
        }
    }

    fn publish(&self, svid: Svid) {
        let bundle = self.bundle.borrow().clone();
        self.current
            .send_replace(Some(Arc::new(Issued { svid, bundle })));
    }
}

/// Binds the socket and serves the Workload API; obtains and renews the app's SVID.
pub(crate) async fn spawn(
    path: &Path,
    control: Arc<bulkhead_api::channel::Replicas>,
    shared: Arc<Shared>,
    app: Arc<AppIdentity>,
) -> Result<PathBuf, ProxyError> {
    let listener = bind_private(path).map_err(|source| ProxyError::WorkloadApi {
        path: path.to_path_buf(),
        source,
    })?;
    tokio::spawn(renewal(control.clone(), shared.clone(), app.clone()));
    let service = SpiffeWorkloadApiServer::new(Api {
        app,
        control: control.clone(),
        shared: shared.clone(),
    });
    let incoming =
        tokio_stream::wrappers::UnixListenerStream::new(listener).map(|conn| conn.map(relay));
    let shown = path.display().to_string();
    tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(incoming)
            .await;
        if let Err(e) = served {
            tracing::error!(socket = shown, error = %e, "the SPIFFE Workload API stopped");
        }
    });
    tracing::info!(socket = %path.display(), "serving the SPIFFE Workload API");
    Ok(path.to_path_buf())
}

/// Binds a Unix socket at `path` that only this user can connect to: bound inside a new
/// private (0700) directory beside it, made 0600, then renamed into place, so it is never
/// reachable with looser permissions. A stale socket at `path` is replaced; any other file
/// there is refused.
fn bind_private(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let private = parent.join(format!(
        ".bulkhead-workload-api.{}.{:x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("socket");
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_file(&staged);
    std::fs::remove_dir(&private)?;
    bound
}

/// Obtains the app's first SVID, then renews it at about half its life, with backoff while
/// the control plane cannot be reached (the current one is served meanwhile).
async fn renewal(
    control: Arc<bulkhead_api::channel::Replicas>,
    shared: Arc<Shared>,
    app: Arc<AppIdentity>,
) {
    let mut client = IdentityClient::new(control_channel(control, &shared));
    let mut backoff = Duration::from_millis(250);
    loop {
        // A new key for the app, certified for the sidecar's own identity.
        let ours = shared.tls.load().svid.id().clone();
        match credentials::certified(&mut client, &ours).await {
            Ok(svid) => {
                tracing::info!(
                    spiffe_id = %svid.id(),
                    serial = svid.serial(),
                    not_after = ?svid.not_after(),
                    "issued the app's X.509-SVID (Workload API)"
                );
                let wait = credentials::renew_after(&svid, SystemTime::now());
                app.publish(svid);
                backoff = Duration::from_millis(250);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = app.wake.notified() => {
                        tracing::info!("another CA signs the sidecar's SVID now; renewing the app's");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "could not obtain the app's X.509-SVID; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The roots, DER concatenated, as the Workload API carries a bundle.
fn concat_der(certs: &[rustls::pki_types::CertificateDer<'static>]) -> Vec<u8> {
    certs.iter().flat_map(|c| c.iter().copied()).collect()
}

/// The bundle map's key for a trust domain: its SPIFFE ID, as the spec names it.
fn trust_domain_key(bundle: &TrustBundle) -> String {
    format!("spiffe://{}", bundle.trust_domain())
}

fn x509_svid_response(issued: &Issued) -> pb::X509svidResponse {
    let roots = issued.bundle.fingerprints();
    // Leaf and intermediates; the root is in the bundle.
    let chain: Vec<_> = issued
        .svid
        .chain()
        .iter()
        .enumerate()
        .filter(|(i, c)| *i == 0 || !roots.contains(&fingerprint(c)))
        .map(|(_, c)| c.clone())
        .collect();
    let key = issued.svid.private_key();
    pb::X509svidResponse {
        svids: vec![pb::X509svid {
            spiffe_id: issued.svid.id().to_string(),
            x509_svid: concat_der(&chain),
            x509_svid_key: key.secret_der().to_vec(),
            bundle: concat_der(issued.bundle.roots()),
            hint: String::new(),
        }],
        crl: Vec::new(),
        federated_bundles: federated_bundles(&issued.bundle),
    }
}

/// Each federated trust domain's roots, keyed by its SPIFFE ID.
fn federated_bundles(bundle: &TrustBundle) -> HashMap<String, Vec<u8>> {
    bundle
        .federated()
        .iter()
        .map(|(td, roots)| (format!("spiffe://{td}"), concat_der(roots)))
        .collect()
}

fn x509_bundles_response(bundle: &TrustBundle) -> pb::X509BundlesResponse {
    pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles: federated_bundles(bundle)
            .into_iter()
            .chain([(trust_domain_key(bundle), concat_der(bundle.roots()))])
            .collect(),
    }
}

/// Refuses a call without `workload.spiffe.io: true`, as the Workload API spec requires
/// (it keeps a browser or an SSRF-style relay from reaching the socket's API by accident).
fn require_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(pb::HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "security header missing from request: a Workload API call must carry the metadata {}: true",
            pb::HEADER
        ))),
    }
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

struct Api {
    app: Arc<AppIdentity>,
    control: Arc<bulkhead_api::channel::Replicas>,
    shared: Arc<Shared>,
}

/// The JWT bundles (ours and each federated domain's) as the Workload API carries them: a
/// JWK Set per trust domain.
fn jwt_bundles_response(bundles: &BTreeMap<String, JwtBundle>) -> pb::JwtBundlesResponse {
    pb::JwtBundlesResponse {
        bundles: bundles
            .iter()
            .map(|(td, b)| {
                (
                    format!("spiffe://{td}"),
                    b.to_jwks().to_string().into_bytes(),
                )
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for Api {
    type FetchX509SVIDStream = Streamed<pb::X509svidResponse>;
    type FetchX509BundlesStream = Streamed<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Streamed<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        require_header(&req)?;
        let updates = WatchStream::new(self.app.current.subscribe())
            .filter_map(|issued| issued.map(|i| Ok(x509_svid_response(&i))));
        Ok(Response::new(Box::pin(updates)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        require_header(&req)?;
        let updates = WatchStream::new(self.app.bundle.subscribe())
            .map(|bundle| Ok(x509_bundles_response(&bundle)));
        Ok(Response::new(Box::pin(updates)))
    }

    /// A JWT-SVID for the sidecar's identity: the control plane signs it (the key never
    /// leaves it), asked over this sidecar's mTLS channel, so it names no other identity.
    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        require_header(&req)?;
        let r = req.into_inner();
        let ours = self.shared.tls.load().svid.id().clone();
        if !r.spiffe_id.is_empty() && r.spiffe_id != ours.as_str() {
            return Err(Status::permission_denied(format!(
                "this sidecar holds {ours} only; it cannot obtain a JWT-SVID for {}",
                r.spiffe_id
            )));
        }
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("a JWT-SVID needs an audience"));
        }
        let mut client = IdentityClient::new(control_channel(self.control.clone(), &self.shared));
        let signed = client
            .sign_jwt_svid(bulkhead_api::v1::JwtSvidRequest {
                audience: r.audience.clone(),
            })
            .await
            .map_err(|s| {
                tracing::warn!(error = %s.message(), "the control plane did not sign a JWT-SVID");
                Status::new(
                    s.code(),
                    format!(
                        "the control plane did not sign the JWT-SVID: {}",
                        s.message()
                    ),
                )
            })?
            .into_inner();
        tracing::info!(spiffe_id = signed.spiffe_id, audience = ?r.audience, expires_at_unix = signed.expires_at_unix, "issued the app a JWT-SVID (Workload API)");
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: signed.spiffe_id,
                svid: signed.token,
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        require_header(&req)?;
        let updates = WatchStream::new(self.app.jwt.subscribe())
            .filter(|b| !b.is_empty())
            .map(|bundles| Ok(jwt_bundles_response(&bundles)));
        Ok(Response::new(Box::pin(updates)))
    }

    /// Validates a JWT-SVID for `audience` against the JWT bundle of the trust domain its
    /// `sub` names: ours or a federated one's, never another's.
    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        require_header(&req)?;
        let r = req.into_inner();
        if r.audience.is_empty() || r.svid.is_empty() {
            return Err(Status::invalid_argument("give an audience and a JWT-SVID"));
        }
        let td = bulkhead_identity::jwt::subject_trust_domain(&r.svid).ok_or_else(|| {
            Status::invalid_argument("the JWT-SVID is not valid: no SPIFFE ID in its sub claim")
        })?;
        let bundle = self.app.jwt.borrow().get(&td).cloned().ok_or_else(|| {
            Status::invalid_argument(format!(
                "the JWT-SVID is not valid: its trust domain {td} is neither ours nor federated"
            ))
        })?;
        let claims = bundle
            .validate(&r.svid, &r.audience, &td, std::time::SystemTime::now())
            .map_err(|e| Status::invalid_argument(format!("the JWT-SVID is not valid: {e}")))?;
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: claims.sub.to_string(),
            claims: Some(bulkhead_api::spiffe_workload::claims_struct(&claims.claims)),
        }))
    }
}

/// Puts the [`authority::Rewriter`] between a client and the gRPC server: what the client
/// sends goes through it, what the server answers is copied back as it is.
fn relay(client: tokio::net::UnixStream) -> tokio::io::DuplexStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = tokio::io::split(ours);
    tokio::spawn(async move {
        let mut rewriter = authority::Rewriter::default();
        let mut buf = vec![0u8; 16 * 1024];
        let mut out = Vec::with_capacity(16 * 1024);
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            out.clear();
            if let Err(e) = rewriter.feed(&buf[..n], &mut out) {
                tracing::info!(error = %e, "Workload API client refused");
                break;
            }
            if to_server.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = to_server.shutdown().await;
    });
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        let _ = to_client.shutdown().await;
    });
    theirs
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead_identity::{Ca, SpiffeId};

    #[test]
    fn the_response_carries_the_app_key_leaf_and_bundle_but_not_the_root_in_the_chain() {
        let now = SystemTime::now();
        let ca = Ca::generate("td", now).unwrap();
        let id = SpiffeId::parse("spiffe://td/ns/a/sa/b").unwrap();
        let svid = ca.issue_local(&id, Duration::from_secs(60), now).unwrap();
        let bundle = TrustBundle::for_trust_domain("td", vec![ca.cert_der().clone()]).unwrap();
        let issued = Issued {
            svid: svid.clone(),
            bundle: bundle.clone(),
        };
        let r = x509_svid_response(&issued);
        assert_eq!(r.svids.len(), 1);
        let s = &r.svids[0];
        assert_eq!(s.spiffe_id, "spiffe://td/ns/a/sa/b");
        assert_eq!(s.x509_svid, svid.chain()[0].to_vec(), "the leaf alone");
        assert_eq!(s.bundle, ca.cert_der().to_vec());
        assert_eq!(s.x509_svid_key, svid.private_key().secret_der().to_vec());
        let b = x509_bundles_response(&bundle);
        assert_eq!(
            b.bundles.get("spiffe://td").map(Vec::as_slice),
            Some(ca.cert_der().as_ref())
        );
    }

    #[test]
    fn a_call_without_the_security_header_is_refused() {
        let mut req = Request::new(pb::X509svidRequest {});
        let refused = require_header(&req).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        req.metadata_mut()
            .insert(pb::HEADER, "false".parse().unwrap());
        assert!(require_header(&req).is_err());
        req.metadata_mut()
            .insert(pb::HEADER, "true".parse().unwrap());
        assert!(require_header(&req).is_ok());
    }

    #[tokio::test]
    async fn the_socket_is_private_and_replaces_a_stale_one_but_no_other_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("bh-wapi-{}", rand::random::<u64>()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("api.sock");
        let first = bind_private(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(first);
        let _again = bind_private(&path).unwrap();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, "x").unwrap();
        assert!(bind_private(&file).is_err());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
