//! The gRPC services: Identity (join), Config (watch) and Admin.

use crate::datadir::DataDir;
use crate::error::ControlError;
use crate::listener::PeerInfo;
use crate::store::{Change, Store};
use crate::tokens::{self, TokenError, TokenRecord};
use bulkhead_api::channel::{ADMIN_ID_PATH, CONTROL_ID_PATH};
use bulkhead_api::resource_to_wire;
use bulkhead_api::v1::{
    self as pb, admin_server::Admin, config_server::Config, identity_server::Identity,
};
use bulkhead_identity::{IdentityError, SpiffeId, Svid};
use bulkhead_policy::model::{Resource, ResourceName};
use futures_util::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
const MAX_TOKEN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The policy set every proxy's view is cut from.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub revision: u64,
    pub resources: Vec<Resource>,
}

pub(crate) struct State {
    dir: DataDir,
    store: Store,
    svid_lifetime: Duration,
    snapshot: watch::Sender<Arc<Snapshot>>,
    admin_id: SpiffeId,
}

impl State {
    pub(crate) fn new(
        dir: DataDir,
        store: Store,
        svid_lifetime: Duration,
    ) -> Result<State, ControlError> {
        let (revision, resources) = store.policies()?;
        tracing::info!(revision, policies = resources.len(), dir = %dir.path().display(), "loaded policies");
        let admin_id = SpiffeId::parse(&format!(
            "spiffe://{}{ADMIN_ID_PATH}",
            dir.ca.trust_domain()
        ))?;
        Ok(State {
            dir,
            store,
            svid_lifetime,
            snapshot: watch::Sender::new(Arc::new(Snapshot {
                revision,
                resources,
            })),
            admin_id,
        })
    }

    pub(crate) fn trust_domain(&self) -> &str {
        self.dir.ca.trust_domain()
    }

    pub(crate) fn svid_lifetime(&self) -> Duration {
        self.svid_lifetime
    }

    /// The control plane's own serving SVID, made with a key that never leaves this process.
    pub(crate) fn issue_serving_svid(&self) -> Result<Svid, IdentityError> {
        let id = SpiffeId::parse(&format!(
            "spiffe://{}{CONTROL_ID_PATH}",
            self.trust_domain()
        ))?;
        self.dir
            .ca
            .issue_local(&id, self.svid_lifetime, SystemTime::now())
    }

    pub(crate) fn bundle_der(&self) -> Vec<Vec<u8>> {
        vec![self.dir.ca.cert_der().to_vec()]
    }

    fn require_admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        match caller(req)? {
            id if id == self.admin_id => Ok(()),
            id => Err(Status::permission_denied(format!(
                "this call needs the admin credential; {id} is not an admin"
            ))),
        }
    }
}

fn caller<T>(req: &Request<T>) -> Result<SpiffeId, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.identity.clone())
        .ok_or_else(|| Status::unauthenticated("this call needs a client certificate (mTLS)"))
}

fn internal(e: ControlError) -> Status {
    tracing::error!(error = %e, "internal error");
    Status::internal(e.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a join was refused.
#[derive(Debug, thiserror::Error)]
enum JoinRefusal {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

#[tonic::async_trait]
impl Identity for State {
    async fn join(
        &self,
        req: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let remote = req.extensions().get::<PeerInfo>().map(|p| p.remote);
        let r = req.into_inner();
        let (token_id, secret) =
            tokens::parse(&r.token).map_err(|e| Status::unauthenticated(e.to_string()))?;
        let now = SystemTime::now();
        let outcome = self
            .store
            .redeem_token(
                token_id,
                &tokens::hash(secret),
                unix_now(),
                |record: &TokenRecord| {
                    let id = SpiffeId::parse(&record.spiffe_id)?;
                    let chain = self
                        .dir
                        .ca
                        .sign_csr(&r.csr_der, &id, self.svid_lifetime, now)?;
                    Ok::<_, JoinRefusal>((id, chain))
                },
            )
            .map_err(internal)?;
        let (record, (id, chain)) = match outcome {
            Ok(ok) => ok,
            Err(refusal) => {
                tracing::warn!(?remote, token_id, reason = %refusal, "join refused");
                return Err(match refusal {
                    JoinRefusal::Token(e) => Status::unauthenticated(e.to_string()),
                    JoinRefusal::Identity(e @ IdentityError::IdentityMismatch { .. }) => {
                        Status::permission_denied(e.to_string())
                    }
                    JoinRefusal::Identity(e) => Status::invalid_argument(e.to_string()),
                });
            }
        };
        let workload = ResourceName {
            namespace: record.namespace.clone(),
            name: record.workload.clone(),
        };
        self.store
            .bind(id.as_str(), &workload, unix_now())
            .map_err(internal)?;
        tracing::info!(?remote, spiffe_id = %id, %workload, lifetime_s = self.svid_lifetime.as_secs(), "issued SVID");
        Ok(Response::new(pb::JoinResponse {
            cert_chain_der: chain.iter().map(|c| c.to_vec()).collect(),
            trust_bundle_der: self.bundle_der(),
            spiffe_id: id.to_string(),
            namespace: record.namespace,
            workload: record.workload,
        }))
    }
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<pb::ProxyConfig, Status>> + Send>>;

#[tonic::async_trait]
impl Config for State {
    type WatchStream = ConfigStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<ConfigStream>, Status> {
        let id = caller(&req)?;
        let r = req.into_inner();
        let workload = ResourceName {
            namespace: r.namespace,
            name: r.workload,
        };
        if !self
            .store
            .is_bound(id.as_str(), &workload)
            .map_err(internal)?
        {
            return Err(Status::permission_denied(format!(
                "{id} may not read the configuration of workload {workload}: no join token bound it to that workload"
            )));
        }
        tracing::info!(spiffe_id = %id, %workload, "proxy watching configuration");
        let rx = self.snapshot.subscribe();
        let stream = futures_util::stream::unfold((rx, true), move |(mut rx, first)| {
            let workload = workload.clone();
            async move {
                if !first && rx.changed().await.is_err() {
                    return None;
                }
                let snap = rx.borrow_and_update().clone();
                Some((Ok(config_for(&snap, &workload)), (rx, false)))
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The part of the snapshot that concerns `workload`.
fn config_for(snap: &Snapshot, workload: &ResourceName) -> pb::ProxyConfig {
    pb::ProxyConfig {
        revision: snap.revision,
        resources: bulkhead_policy::relevant_to(&snap.resources, workload)
            .iter()
            .map(resource_to_wire)
            .collect(),
    }
}

#[tonic::async_trait]
impl Admin for State {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let id =
            SpiffeId::parse(&r.spiffe_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if id.trust_domain() != self.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "{id} is outside this control plane's trust domain {}",
                self.trust_domain()
            )));
        }
        let pick = |given: String, derived: Option<&str>, what: &str| {
            let v = if given.is_empty() {
                derived.unwrap_or_default().to_string()
            } else {
                given
            };
            if v.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{id} is not of the form spiffe://<td>/ns/<namespace>/sa/<account>; pass --{what}"
                )));
            }
            if !bulkhead_policy::is_valid_name(&v) {
                return Err(Status::invalid_argument(format!(
                    "{what} {v:?} is not a valid name (lowercase letters, digits, '-')"
                )));
            }
            Ok(v)
        };
        let namespace = pick(r.namespace, id.namespace(), "namespace")?;
        let workload = pick(r.workload, id.service_account(), "workload")?;
        let ttl = match r.ttl_seconds {
            0 => DEFAULT_TOKEN_TTL,
            s => Duration::from_secs(s),
        };
        if ttl > MAX_TOKEN_TTL {
            return Err(Status::invalid_argument(
                "token lifetime may be at most 30 days",
            ));
        }
        let uses = if r.max_uses == 0 { 1 } else { r.max_uses };
        let (token_id, secret_sha256, token) = tokens::mint();
        let expires_unix = unix_now() + ttl.as_secs();
        let record = TokenRecord {
            secret_sha256,
            spiffe_id: id.to_string(),
            namespace,
            workload,
            expires_unix,
            uses_left: uses,
        };
        self.store
            .insert_token(&token_id, &record)
            .map_err(internal)?;
        tracing::info!(token_id, spiffe_id = %id, namespace = record.namespace, workload = record.workload, uses, "join token created");
        Ok(Response::new(pb::CreateTokenResponse {
            token,
            expires_unix,
        }))
    }

    async fn apply(
        &self,
        req: Request<pb::ApplyRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        self.require_admin(&req)?;
        let r = req.into_inner();
        let parsed = bulkhead_policy::parse_file(&r.file, &r.yaml)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The whole set after this apply must compile: a change that would leave any policy
        // unenforceable (say, a port re-declared as tcp under an HTTP rule) is refused.
        let current = self.snapshot.borrow().resources.clone();
        let new_keys: std::collections::HashSet<String> =
            parsed.iter().map(|(r, _)| r.key()).collect();
        let mut merged: Vec<Resource> = Vec::new();
        let mut origins = Vec::new();
        for r in current.into_iter().filter(|r| !new_keys.contains(&r.key())) {
            merged.push(r);
            origins.push(None);
        }
        for (r, o) in &parsed {
            merged.push(r.clone());
            origins.push(Some(o.clone()));
        }
        if let Err(errors) = bulkhead_policy::PolicySet::compile_with_origins(&merged, &origins, 0)
        {
            let text: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
            return Err(Status::invalid_argument(text.join("\n")));
        }
        let resources: Vec<Resource> = parsed.into_iter().map(|(r, _)| r).collect();
        let (revision, changes) = self.store.apply(&resources).map_err(internal)?;
        let (revision, all) = match changes.iter().any(|(_, c)| *c != Change::Unchanged) {
            true => self.store.policies().map_err(internal)?,
            false => (revision, self.snapshot.borrow().resources.clone()),
        };
        self.snapshot.send_replace(Arc::new(Snapshot {
            revision,
            resources: all,
        }));
        let applied = changes
            .iter()
            .map(|(key, change)| {
                let verb = match change {
                    Change::Created => "created",
                    Change::Configured => "configured",
                    Change::Unchanged => "unchanged",
                };
                format!("{key} {verb}")
            })
            .collect();
        tracing::info!(revision, file = r.file, "policy applied");
        Ok(Response::new(pb::ApplyResponse { revision, applied }))
    }

    async fn list_policies(
        &self,
        req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        self.require_admin(&req)?;
        let snap = self.snapshot.borrow().clone();
        Ok(Response::new(pb::ListPoliciesResponse {
            revision: snap.revision,
            resources: snap.resources.iter().map(resource_to_wire).collect(),
        }))
    }
}
