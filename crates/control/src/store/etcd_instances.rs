//! Proxy instances and their revocations, shared by replicas on etcd: a proxy that joined
//! on one replica renews at another (after a failover) as the same instance, and an
//! instance revoked on one replica is refused by every replica and every replica's proxies.
//!
//! | key (under `/bulkhead/`) | value |
//! |---|---|
//! | `instances/<id>` | the instance: identity, workload, the certificates it may still hold |
//! | `serials/<serial>` | the id of the instance that certificate was issued to |
//! | `revocations/proxy/<id>` | the instance's revocation with the instance as revoked (a put, never deleted) |
//!
//! A renewal adds its certificate in a transaction that compares the instance's etcd
//! revision and the absence of its revocation; a revocation is put by a transaction that
//! compares the same two. So a certificate renewed while the instance is revoked on another
//! replica either is in the revocation's instance (its serial refused everywhere) or never
//! leaves, and after a revocation the instance never changes again.
//!
//! Nothing here is secret: serials and identities are in every certificate.

use super::etcd::{EtcdStore, PREFIX, SharedRevocation};
use super::etcd_client::{delete, get, get_prefix, mod_revision_is, put, txn, version_is};
use super::trust::{
    EXPIRY_SLACK_SECS, Instance, IssueRefusal, IssuedCert, Revocation, RevokeError,
};
use crate::error::ControlError;

fn instance_key(id: &str) -> String {
    format!("{PREFIX}instances/{id}")
}

fn serial_key(serial: &str) -> String {
    format!("{PREFIX}serials/{serial}")
}

/// Where a proxy instance's revocation is kept (beside the identities' `revocations/<spiffe
/// id>`, which never start with `proxy/`, so one watch sees both).
pub(crate) fn proxy_revocation_key(id: &str) -> String {
    format!("{PREFIX}revocations/proxy/{id}")
}

impl EtcdStore {
    /// Records a new instance (a join on this replica), unless its id is taken.
    pub(crate) async fn put_instance(&self, instance: &Instance) -> Result<(), ControlError> {
        let key = instance_key(&instance.id);
        let json = serde_json::to_string(instance).unwrap_or_default();
        let mut ops = vec![put(key.clone(), json, 0)];
        ops.extend(
            instance
                .certs
                .iter()
                .map(|c| put(serial_key(&c.serial), instance.id.clone(), 0)),
        );
        let done = self.txn(txn(vec![version_is(key, 0)], ops)).await?;
        if !done.succeeded {
            return Err(ControlError::Store {
                path: format!("etcd {}", self.endpoints()).into(),
                message: format!(
                    "proxy instance id {} was made on another replica too; the proxy should join again",
                    instance.id
                ),
            });
        }
        Ok(())
    }

    /// The instance and its etcd revision, if etcd holds it.
    async fn instance_at(&self, id: &str) -> Result<Option<(Instance, i64)>, ControlError> {
        self.json_at(instance_key(id)).await
    }

    /// The instance a certificate was issued to, on any replica.
    pub(crate) async fn instance_by_serial(
        &self,
        serial: &str,
    ) -> Result<Option<Instance>, ControlError> {
        if serial.is_empty() {
            return Ok(None);
        }
        let got = self.get(get(serial_key(serial))).await?;
        let Some(id) = got
            .kvs
            .first()
            .and_then(|kv| String::from_utf8(kv.value.clone()).ok())
        else {
            return Ok(None);
        };
        Ok(self.instance_at(&id).await?.map(|(i, _)| i))
    }

    /// The revocation of instance `id`, if it was revoked on any replica.
    async fn proxy_revocation(&self, id: &str) -> Result<Option<Revocation>, ControlError> {
        let got = self.get(get(proxy_revocation_key(id))).await?;
        Ok(got.kvs.first().map(|kv| {
            match serde_json::from_slice::<SharedRevocation>(&kv.value) {
                Ok(SharedRevocation::Instance { revocation, .. }) => revocation,
                // Present but unreadable: still revoked, never "not revoked".
                _ => unreadable_revocation(id),
            }
        }))
    }

    /// Adds a renewal's certificate to instance `id`, unless it is revoked (compared in the
    /// same transaction); its certificates expired since are forgotten. The instance as
    /// recorded, or why not.
    pub(crate) async fn add_cert(
        &self,
        id: &str,
        cert: IssuedCert,
        now_unix: u64,
    ) -> Result<Result<Instance, IssueRefusal>, ControlError> {
        for _ in 0..crate::change::COMMIT_ATTEMPTS {
            let Some((mut record, at)) = self.instance_at(id).await? else {
                return Ok(Err(IssueRefusal::UnknownInstance(id.to_string())));
            };
            if let Some(revoked) = self.proxy_revocation(id).await? {
                return Ok(Err(IssueRefusal::Revoked(revoked)));
            }
            let (gone, kept): (Vec<IssuedCert>, Vec<IssuedCert>) = record
                .certs
                .drain(..)
                .partition(|c| c.not_after_unix + EXPIRY_SLACK_SECS < now_unix);
            record.certs = kept;
            record.certs.push(cert.clone());
            let mut ops = vec![
                put(
                    instance_key(id),
                    serde_json::to_string(&record).unwrap_or_default(),
                    0,
                ),
                put(serial_key(&cert.serial), id.to_string(), 0),
            ];
            ops.extend(gone.iter().map(|c| delete(serial_key(&c.serial))));
            let guard = vec![
                mod_revision_is(instance_key(id), at),
                version_is(proxy_revocation_key(id), 0),
            ];
            if self.txn(txn(guard, ops)).await?.succeeded {
                return Ok(Ok(record));
            }
        }
        Err(busy(self, id))
    }

    /// Puts `revocation` of a proxy instance, with the instance as etcd holds it then,
    /// unless another replica revoked it first. The instance as revoked.
    pub(crate) async fn revoke_instance(
        &self,
        revocation: &Revocation,
    ) -> Result<Result<Instance, RevokeError>, ControlError> {
        let id = revocation.subject.as_str();
        for _ in 0..crate::change::COMMIT_ATTEMPTS {
            let Some((instance, at)) = self.instance_at(id).await? else {
                return Ok(Err(RevokeError::UnknownInstance(id.to_string())));
            };
            if let Some(known) = self.proxy_revocation(id).await? {
                return Ok(Err(RevokeError::AlreadyRevoked(known)));
            }
            let value = SharedRevocation::Instance {
                revocation: revocation.clone(),
                instance: instance.clone(),
            };
            let guard = vec![
                mod_revision_is(instance_key(id), at),
                version_is(proxy_revocation_key(id), 0),
            ];
            let ops = vec![put(
                proxy_revocation_key(id),
                serde_json::to_string(&value).unwrap_or_default(),
                0,
            )];
            if self.txn(txn(guard, ops)).await?.succeeded {
                return Ok(Ok(instance));
            }
        }
        Err(busy(self, id))
    }

    /// The instance `id` as etcd holds it.
    pub(crate) async fn instance(&self, id: &str) -> Result<Option<Instance>, ControlError> {
        Ok(self.instance_at(id).await?.map(|(i, _)| i))
    }

    /// The leader's upkeep: forgets the instances whose every certificate expired before
    /// `expired_before`, with their serials (a renewal meanwhile keeps one: each deletion
    /// compares its etcd revision). Their revocations stay. How many.
    pub(crate) async fn prune_instances(&self, expired_before: u64) -> Result<u64, ControlError> {
        let got = self.get(get_prefix(instance_key(""))).await?;
        let mut gone = 0;
        for kv in got.kvs {
            let Ok(instance) = serde_json::from_slice::<Instance>(&kv.value) else {
                continue;
            };
            if instance.valid_until() >= expired_before {
                continue;
            }
            let mut ops = vec![delete(kv.key.clone())];
            ops.extend(instance.certs.iter().map(|c| delete(serial_key(&c.serial))));
            let guard = vec![mod_revision_is(kv.key.clone(), kv.mod_revision)];
            if self.txn(txn(guard, ops)).await?.succeeded {
                gone += 1;
            }
        }
        Ok(gone)
    }
}

fn busy(store: &EtcdStore, id: &str) -> ControlError {
    ControlError::Store {
        path: format!("etcd {}", store.endpoints()).into(),
        message: format!(
            "proxy instance {id} kept changing in etcd while this replica recorded a change to it; nothing was written, try again"
        ),
    }
}

/// What a present but unreadable revocation of instance `id` stands for: a refusal.
fn unreadable_revocation(id: &str) -> Revocation {
    tracing::error!(
        instance = id,
        "a proxy revocation in etcd is unreadable; refusing the instance"
    );
    Revocation {
        kind: super::trust::RevocationKind::Proxy,
        subject: id.to_string(),
        reason: "its revocation in etcd is unreadable".to_string(),
        actor: String::new(),
        time_unix: 0,
        spiffe_id: String::new(),
        namespace: String::new(),
        workload: String::new(),
        certs_valid_until_unix: 0,
    }
}
