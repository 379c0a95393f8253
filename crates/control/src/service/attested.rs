//! Identity.Join by attestation: the proxy presents a platform credential (a pod's projected
//! service-account token) instead of a join token; the [`crate::Attestor`] asks the
//! platform, and the SVID is issued for exactly the identity it vouched for, bound to the
//! one Workload that declares that identity, as a join token's binding would be.
//!
//! The credential is never logged. Reserved and revoked identities are refused as with a
//! join token, and so is an identity no Workload declares.

use super::{State, internal, issued};
use crate::AttestationError;
use crate::proxies::unix_now;
use bulkhead_api::v1 as pb;
use bulkhead_identity::{IdentityError, SpiffeId};
use bulkhead_policy::model::{Resource, ResourceName};
use std::net::SocketAddr;
use std::time::SystemTime;
use tonic::{Response, Status};

/// A projected service-account token is a JWT of a few KiB; anything far larger is not one.
const MAX_CREDENTIAL_BYTES: usize = 64 * 1024;

impl State {
    pub(super) async fn join_attested(
        &self,
        remote: Option<SocketAddr>,
        r: pb::JoinRequest,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let Some(attestor) = self.attestor.clone() else {
            tracing::warn!(
                ?remote,
                "join refused: a service-account token, and attestation is not configured"
            );
            return Err(Status::failed_precondition(
                "this control plane does not accept service-account tokens: start it with --kubernetes-attest (it then checks them with a Kubernetes TokenReview), or join with a join token from `bulkhead token create` (--token-file)",
            ));
        };
        if r.service_account_token.len() > MAX_CREDENTIAL_BYTES {
            return Err(Status::invalid_argument(format!(
                "the service-account token is {} bytes, more than any projected token ({MAX_CREDENTIAL_BYTES} at most)",
                r.service_account_token.len()
            )));
        }
        let attested = attestor
            .attest(self.trust_domain(), r.service_account_token.trim())
            .await
            .map_err(|e| match e {
                AttestationError::Refused { reason } => {
                    tracing::warn!(
                        ?remote,
                        reason,
                        "join refused: the service-account token was not attested"
                    );
                    Status::unauthenticated(format!(
                        "the service-account token was refused: {reason}"
                    ))
                }
                AttestationError::Unreachable { reason } => {
                    tracing::warn!(
                        ?remote,
                        reason,
                        "join refused: the service-account token could not be checked"
                    );
                    Status::unavailable(format!(
                        "the control plane could not check the service-account token: {reason}"
                    ))
                }
            })?;
        let id = attested.id;
        let subject = attested.subject;
        let refuse = |message: String| {
            tracing::warn!(?remote, spiffe_id = %id, subject, reason = message, "join refused");
            Status::permission_denied(message)
        };
        if id.trust_domain() != self.trust_domain() {
            return Err(refuse(format!(
                "{id} is outside this control plane's trust domain {}",
                self.trust_domain()
            )));
        }
        id.refuse_reserved().map_err(|e| refuse(e.to_string()))?;
        let workload = self.declaring_workload(&id).map_err(|message| {
            tracing::warn!(?remote, spiffe_id = %id, subject, reason = message, "join refused");
            Status::failed_precondition(message)
        })?;
        let chain =
            self.signer()
                .sign_csr(&r.csr_der, &id, self.svid_lifetime, SystemTime::now())
                .map_err(|e| match e {
                    e @ (IdentityError::IdentityMismatch { .. }
                    | IdentityError::Reserved { .. }) => refuse(e.to_string()),
                    e => Status::invalid_argument(e.to_string()),
                })?;
        // Recorded in the transaction that checks the revocations: a certificate of an
        // identity revoked meanwhile never leaves.
        let instance = self
            .store
            .new_instance(
                id.as_str(),
                &workload,
                &format!("attested {subject}"),
                issued(&chain),
                unix_now(),
            )
            .map_err(internal)?
            .map_err(|revoked| refuse(revoked.describe()))?;
        self.share_instance(&instance).await?;
        self.bind(id.as_str(), &workload).await?;
        tracing::info!(?remote, spiffe_id = %id, subject, %workload, instance = instance.id, lifetime_s = self.svid_lifetime.as_secs(), proxy_version = r.proxy_version, "issued SVID by attestation");
        Ok(self.joined(&id, &chain, workload, instance.id))
    }

    /// The one Workload of the current revision that declares `id`: if several do, the one
    /// in the identity's own namespace; none, or several still, is refused in words.
    fn declaring_workload(&self, id: &SpiffeId) -> Result<ResourceName, String> {
        let snapshot = self.snapshot.borrow().clone();
        let mut declaring: Vec<ResourceName> = snapshot
            .resources
            .iter()
            .filter(|r| match r {
                Resource::Workload(doc) => doc.spec.exact_identity() == Some(id),
                _ => false,
            })
            .map(Resource::name)
            .collect();
        if declaring.len() > 1 {
            let own: Vec<ResourceName> = declaring
                .iter()
                .filter(|w| Some(w.namespace.as_str()) == id.namespace())
                .cloned()
                .collect();
            if !own.is_empty() {
                declaring = own;
            }
        }
        let namespace = id.namespace().unwrap_or("NAMESPACE");
        match declaring.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(format!(
                "no Workload declares {id}: apply a Workload (in namespace {namespace}) with `spec.identity: {id}` for the proxies of this service account to join"
            )),
            many => Err(format!(
                "several Workloads declare {id} ({}); a proxy joining by its service-account token is bound to one: declare the identity in one Workload",
                many.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}
