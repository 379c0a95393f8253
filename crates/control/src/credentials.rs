//! The Credentials service (`bulkhead token list|delete`, `bulkhead revoke`, `unrevoke`,
//! `get revocations`) and the list of who is refused although their certificates chain to the
//! bundle.
//!
//! A revocation is made in the store with its audit entry (`store/trust.rs`), then the list is
//! rebuilt from the store and published: every configuration stream pushes it to its proxy at
//! once (which refuses new handshakes from the revoked and closes their open connections),
//! every call made with a revoked certificate is refused in words that say why, and a stream
//! of a revoked proxy is ended. Join and Renew check the store itself, in the transaction that records the
//! certificate, so a certificate issued while a revocation is made never leaves.

use crate::error::ControlError;
use crate::proxies::unix_now;
use crate::service::{State, internal};
use crate::store::Store;
use crate::store::trust::{Revocation, RevocationKind, RevokeError, RevokeOrder};
use crate::tokens::TokenRecord;
use bulkhead_api::v1::{self as pb, credentials_server::Credentials};
use bulkhead_identity::{RevokedSet, SpiffeId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// How often expired certificates leave the list and instances whose certificates all
/// expired are forgotten.
const UPKEEP_EVERY: Duration = Duration::from_secs(60);

/// The revoked identities and the serials of revoked instances' certificates that may still
/// be valid; every call made with a certificate asks it.
#[derive(Debug)]
pub(crate) struct Revoked {
    list: watch::Sender<Arc<RevokedSet>>,
}

impl Revoked {
    pub(crate) fn load(store: &Store, now_unix: u64) -> Result<Revoked, ControlError> {
        Ok(Revoked {
            list: watch::Sender::new(Arc::new(current(store, now_unix)?)),
        })
    }

    /// Rebuilds the list from the store; publishes it if it changed.
    pub(crate) fn refresh(&self, store: &Store, now_unix: u64) -> Result<bool, ControlError> {
        let next = current(store, now_unix)?;
        Ok(self.list.send_if_modified(|held| {
            if **held == next {
                return false;
            }
            *held = Arc::new(next.clone());
            true
        }))
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<RevokedSet>> {
        self.list.subscribe()
    }

    /// Whether the certificate of `id` with `serial` is refused now.
    pub(crate) fn refuses(&self, id: &str, serial: &str) -> bool {
        self.list.borrow().refuses(id, serial)
    }
}

fn current(store: &Store, now_unix: u64) -> Result<RevokedSet, ControlError> {
    let identities = store
        .revocations()?
        .into_iter()
        .filter(|r| r.kind == RevocationKind::Identity)
        .map(|r| r.subject);
    Ok(RevokedSet::new(
        identities,
        store.revoked_serials(now_unix)?,
    ))
}

/// The list as a configuration message carries it.
pub(crate) fn to_wire(set: &RevokedSet) -> pb::Revocations {
    pb::Revocations {
        identities: set.identities().map(str::to_string).collect(),
        serials: set.serials().map(str::to_string).collect(),
    }
}

/// Every minute: expired certificates leave the pushed list, and instances whose every
/// certificate expired are forgotten (their revocations stay).
pub(crate) fn spawn_upkeep(state: Arc<State>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            let now = unix_now();
            let slack = crate::store::trust::EXPIRY_SLACK_SECS;
            if let Err(e) = state.store.prune_instances(now.saturating_sub(slack)) {
                tracing::warn!(error = %e, "could not forget expired proxy instances");
            }
            if let Err(e) = state.revoked.refresh(&state.store, now) {
                tracing::error!(error = %e, "could not rebuild the revocation list");
            }
        }
    });
}

fn token_info(id: String, t: TokenRecord) -> pb::TokenInfo {
    pb::TokenInfo {
        id,
        spiffe_id: t.spiffe_id.into(),
        namespace: t.namespace,
        workload: t.workload,
        uses_left: t.uses_left,
        expires_unix: t.expires_unix,
    }
}

pub(crate) fn revocation_to_wire(r: Revocation) -> pb::Revocation {
    pb::Revocation {
        kind: r.kind.word().to_string(),
        subject: r.subject,
        reason: r.reason,
        actor: r.actor,
        time_unix: r.time_unix,
        spiffe_id: r.spiffe_id,
        namespace: r.namespace,
        workload: r.workload,
        certs_valid_until_unix: r.certs_valid_until_unix,
    }
}

fn refused(e: RevokeError) -> Status {
    match e {
        RevokeError::AlreadyRevoked(_) => Status::already_exists(e.to_string()),
        RevokeError::UnknownInstance(_) | RevokeError::NotRevoked(_) => {
            Status::not_found(e.to_string())
        }
        RevokeError::TooEarly { .. } => Status::failed_precondition(e.to_string()),
    }
}

impl State {
    /// The identity `subject` names, if this control plane may revoke it: in its trust
    /// domain, and not one the mesh reserves for itself (revoking the admin or control
    /// identity would lock every operator out).
    fn revocable_identity(&self, subject: &str) -> Result<SpiffeId, Status> {
        let id = SpiffeId::parse(subject).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if id.trust_domain() != self.trust_domain() {
            return Err(Status::invalid_argument(format!(
                "{id} is outside this control plane's trust domain {}",
                self.trust_domain()
            )));
        }
        id.refuse_reserved().map_err(|_| {
            Status::invalid_argument(format!(
                "{id} is an identity the mesh reserves for itself and cannot be revoked; to replace the admin credential, add and switch to a new CA (`bulkhead ca add`, `bulkhead ca switch`)"
            ))
        })?;
        Ok(id)
    }

    /// Republishes the list after a change in the store, so that proxies get it now.
    /// With replicas on etcd, takes up the revocations made (and identities' lifted) on
    /// other replicas, and publishes the list if it changed.
    pub(crate) async fn sync_revocations(&self) -> Result<(), ControlError> {
        use crate::store::etcd::SharedRevocation;
        let Some(etcd) = &self.shared else {
            return Ok(());
        };
        let now = unix_now();
        let mut changed = false;
        for shared in etcd.revocations().await? {
            changed |= match &shared {
                SharedRevocation::Revoked(r) => self.store.import_revocation(r, now)?,
                SharedRevocation::Instance {
                    revocation,
                    instance,
                } => {
                    // The instance first: the list built from the revocation names its
                    // certificates' serials.
                    let live =
                        instance.valid_until() + crate::store::trust::EXPIRY_SLACK_SECS >= now;
                    let renewed = live && self.store.import_instance(instance)?;
                    self.store.import_revocation(revocation, now)? || renewed
                }
                SharedRevocation::Lifted {
                    subject,
                    actor,
                    time_unix,
                } => self.store.lift_imported(subject, *time_unix, actor, now)?,
            };
        }
        if changed {
            self.revoked.refresh(&self.store, now)?;
            tracing::warn!(
                "took up revocations made or lifted on another replica; pushed to every proxy"
            );
        }
        Ok(())
    }

    fn publish_revocations(&self) -> Result<(), Status> {
        self.revoked
            .refresh(&self.store, unix_now())
            .map(|_| ())
            .map_err(internal)
    }

    /// Refuses a call made with a certificate that is revoked (an HTTP/2 connection opened
    /// before the revocation outlives it; its calls do not).
    pub(crate) fn refuse_revoked<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let Some(peer) = req.extensions().get::<crate::listener::PeerInfo>() else {
            return Ok(());
        };
        let Some(id) = &peer.identity else {
            return Ok(());
        };
        let serial = peer.cert_serial.as_deref().unwrap_or_default();
        if !self.revoked.refuses(id.as_str(), serial) {
            return Ok(());
        }
        // Refused either way; the store says by whom and why.
        let instance = self
            .store
            .instance_by_serial(serial)
            .ok()
            .flatten()
            .map(|i| i.id);
        let why = self.store.revocations().ok().and_then(|all| {
            all.into_iter().find(|r| match r.kind {
                RevocationKind::Identity => r.subject == id.as_str(),
                RevocationKind::Proxy => instance.as_deref() == Some(r.subject.as_str()),
            })
        });
        Err(Status::permission_denied(match why {
            Some(r) => format!(
                "the certificate of {id} (serial {serial}) is refused: {}",
                r.describe()
            ),
            None => format!(
                "the certificate of {id} (serial {serial}) is revoked; `bulkhead get revocations` says why"
            ),
        }))
    }
}

#[tonic::async_trait]
impl Credentials for State {
    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        self.require_admin(&req)?;
        let tokens = match &self.shared {
            Some(etcd) => etcd.tokens().await,
            None => self.store.tokens(),
        }
        .map_err(internal)?
        .into_iter()
        .map(|(id, t)| token_info(id, t))
        .collect();
        Ok(Response::new(pb::ListTokensResponse { tokens }))
    }

    async fn delete_token(
        &self,
        req: Request<pb::DeleteTokenRequest>,
    ) -> Result<Response<pb::DeleteTokenResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let id = req.into_inner().id;
        let local = self
            .store
            .delete_token(&id, &actor, unix_now())
            .map_err(internal)?;
        let deleted = match &self.shared {
            Some(etcd) => etcd.delete_token(&id).await.map_err(internal)?,
            None => local,
        };
        match deleted {
            Some(record) => {
                tracing::info!(
                    actor,
                    token_id = id,
                    spiffe_id = record.spiffe_id.as_str(),
                    "join token deleted"
                );
                Ok(Response::new(pb::DeleteTokenResponse {
                    token: Some(token_info(id, record)),
                }))
            }
            None => Err(Status::not_found(format!(
                "there is no join token {id}; `bulkhead token list` shows them"
            ))),
        }
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        let kind = RevocationKind::parse(&r.kind).ok_or_else(|| {
            Status::invalid_argument(format!(
                "cannot revoke a {:?}: revoke an `identity` (a SPIFFE ID) or a `proxy` (an instance id from `bulkhead get proxies`)",
                r.kind
            ))
        })?;
        let subject = match kind {
            RevocationKind::Identity => self.revocable_identity(&r.subject)?.to_string(),
            RevocationKind::Proxy => r.subject.trim().to_string(),
        };
        if let (Some(etcd), RevocationKind::Proxy) = (&self.shared, kind) {
            // The instance may have joined or renewed on another replica: etcd's record is
            // the one that counts.
            if let Some(instance) = etcd.instance(&subject).await.map_err(internal)? {
                self.store.import_instance(&instance).map_err(internal)?;
            }
        }
        let now = unix_now();
        let order = RevokeOrder {
            kind,
            subject: &subject,
            reason: r.reason.trim(),
            actor: &actor,
            // A certificate of the identity issued before instances were recorded is valid
            // at most one SVID lifetime from now.
            valid_until_floor: now + self.svid_lifetime().as_secs(),
        };
        let done = match self.store.revoke(&order, now).map_err(internal)? {
            Ok(done) => done,
            Err(RevokeError::AlreadyRevoked(known)) => {
                if let (Some(etcd), RevocationKind::Proxy) = (&self.shared, kind) {
                    // Made here before, when etcd may not have answered: shared now if it
                    // is not yet (a put of a proxy's revocation is never undone).
                    let _already = etcd.revoke_instance(&known).await.map_err(internal)?;
                }
                return Err(refused(RevokeError::AlreadyRevoked(known)));
            }
            Err(e) => return Err(refused(e)),
        };
        self.publish_revocations()?;
        let mut done = done;
        match (&self.shared, kind) {
            (Some(etcd), RevocationKind::Identity) => {
                // For every replica: it refuses the identity too, and no token for it is left.
                let revoked =
                    crate::store::etcd::SharedRevocation::Revoked(done.revocation.clone());
                etcd.put_revocation(&subject, &revoked)
                    .await
                    .map_err(internal)?;
                for id in etcd.delete_tokens_of(&subject).await.map_err(internal)? {
                    if !done.tokens_deleted.contains(&id) {
                        done.tokens_deleted.push(id);
                    }
                }
            }
            (Some(etcd), RevocationKind::Proxy) => {
                // For every replica, with the certificates the instance holds in etcd (a
                // renewal on another replica meanwhile is in them, or refused).
                let revoked = match etcd
                    .revoke_instance(&done.revocation)
                    .await
                    .map_err(internal)?
                {
                    Ok(instance) => instance,
                    // Revoked on another replica at the same moment: revoked either way.
                    Err(RevokeError::AlreadyRevoked(_)) => etcd
                        .instance(&subject)
                        .await
                        .map_err(internal)?
                        .ok_or_else(|| {
                            Status::not_found(format!("proxy instance {subject} is gone from etcd"))
                        })?,
                    Err(e) => return Err(refused(e)),
                };
                if self.store.import_instance(&revoked).map_err(internal)? {
                    self.publish_revocations()?;
                }
                let now = unix_now();
                done.serials = revoked
                    .certs
                    .iter()
                    .filter(|c| c.not_after_unix + crate::store::trust::EXPIRY_SLACK_SECS >= now)
                    .map(|c| c.serial.clone())
                    .collect();
            }
            (None, _) => {}
        }
        tracing::warn!(
            actor,
            kind = kind.word(),
            subject,
            reason = order.reason,
            tokens_deleted = done.tokens_deleted.len(),
            serials = done.serials.len(),
            "revoked: pushed to every proxy; its handshakes are refused and its open connections closed"
        );
        Ok(Response::new(pb::RevokeResponse {
            revocation: Some(revocation_to_wire(done.revocation)),
            tokens_deleted: done.tokens_deleted,
            serials: done.serials,
        }))
    }

    async fn unrevoke(
        &self,
        req: Request<pb::UnrevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let actor = self.require_admin(&req)?;
        let r = req.into_inner();
        if RevocationKind::parse(&r.kind) != Some(RevocationKind::Identity) {
            return Err(Status::invalid_argument(
                "only an identity's revocation can be lifted; a proxy instance's is permanent (join again with a new token)",
            ));
        }
        let subject = self.revocable_identity(&r.subject)?.to_string();
        let (lifted, _) = self
            .store
            .unrevoke_identity(&subject, &actor, unix_now())
            .map_err(internal)?
            .map_err(refused)?;
        self.publish_revocations()?;
        if let Some(etcd) = &self.shared {
            let lifted = crate::store::etcd::SharedRevocation::Lifted {
                subject: subject.clone(),
                actor: actor.clone(),
                time_unix: unix_now(),
            };
            etcd.put_revocation(&subject, &lifted)
                .await
                .map_err(internal)?;
        }
        tracing::warn!(actor, subject, "revocation lifted");
        Ok(Response::new(pb::RevokeResponse {
            revocation: Some(revocation_to_wire(lifted)),
            tokens_deleted: Vec::new(),
            serials: Vec::new(),
        }))
    }

    async fn list_revocations(
        &self,
        req: Request<pb::ListRevocationsRequest>,
    ) -> Result<Response<pb::ListRevocationsResponse>, Status> {
        self.require_admin(&req)?;
        let revocations = self
            .store
            .revocations()
            .map_err(internal)?
            .into_iter()
            .map(revocation_to_wire)
            .collect();
        Ok(Response::new(pb::ListRevocationsResponse { revocations }))
    }
}
