//! Proxy instances, the certificates each holds, revocations and the listing of join tokens:
//! what the control plane decides who is refused by.
//!
//! An instance is what one Join made: an id, its identity and workload, and the serial and
//! expiry of every certificate issued to it (the join's, then each renewal's, until they
//! expire). A revocation names an identity (every certificate of it) or an instance (the
//! certificates it holds). Recording an issued certificate checks the revocations in the same
//! transaction, and a revocation reads the instances' certificates in its own; transactions
//! run one at a time, so a certificate issued while a revocation is made is either among the
//! revoked or refused before it leaves. Each change is in the audit log, in its transaction.
//!
//! Nothing here holds a secret: token records keep only a hash, and listings leave even that
//! out.

use super::audit::{self, AuditEntry, NewEntry};
use super::{BINDINGS, Store, TOKENS};
use crate::cas::utc;
use crate::error::ControlError;
use crate::tokens::TokenRecord;
use bulkhead_policy::model::ResourceName;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Instance id → JSON of an [`Instance`].
const INSTANCES: TableDefinition<&str, &str> = TableDefinition::new("instances");
/// Certificate serial → the instance it was issued to.
const SERIALS: TableDefinition<&str, &str> = TableDefinition::new("serials");
/// `identity|<spiffe id>` or `proxy|<instance id>` → JSON of a [`Revocation`].
const REVOCATIONS: TableDefinition<&str, &str> = TableDefinition::new("revocations");

/// A revoked certificate stays on the list pushed to proxies this long after it expires, for
/// peers whose clocks run behind.
pub(crate) const EXPIRY_SLACK_SECS: u64 = 300;

/// What one Join made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Instance {
    pub id: String,
    pub spiffe_id: String,
    pub namespace: String,
    pub workload: String,
    pub joined_unix: u64,
    /// The join token that made it; empty when a certificate from before instances existed
    /// was renewed (the instance is then made at that renewal).
    pub token_id: String,
    /// The certificates it may still hold, oldest first.
    pub certs: Vec<IssuedCert>,
}

impl Instance {
    /// When its newest certificate expires (0 if it holds none).
    pub(crate) fn valid_until(&self) -> u64 {
        self.certs
            .iter()
            .map(|c| c.not_after_unix)
            .max()
            .unwrap_or(0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct IssuedCert {
    /// Colon-separated hex, as `bulkhead_identity::serial_of` gives it.
    pub serial: String,
    pub not_after_unix: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RevocationKind {
    Identity,
    Proxy,
}

impl RevocationKind {
    pub(crate) fn word(self) -> &'static str {
        match self {
            RevocationKind::Identity => "identity",
            RevocationKind::Proxy => "proxy",
        }
    }

    pub(crate) fn parse(word: &str) -> Option<RevocationKind> {
        match word {
            "identity" => Some(RevocationKind::Identity),
            "proxy" => Some(RevocationKind::Proxy),
            _ => None,
        }
    }
}

/// One revocation, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Revocation {
    pub kind: RevocationKind,
    /// The SPIFFE ID, or the instance id.
    pub subject: String,
    pub reason: String,
    pub actor: String,
    pub time_unix: u64,
    /// The identity revoked, or the instance's; and the instance's workload.
    pub spiffe_id: String,
    pub namespace: String,
    pub workload: String,
    /// Certificates issued before the revocation may be valid until then.
    pub certs_valid_until_unix: u64,
}

impl Revocation {
    fn key(&self) -> String {
        key(self.kind, &self.subject)
    }

    /// The refusal a caller gets, in words.
    pub(crate) fn describe(&self) -> String {
        let what = match self.kind {
            RevocationKind::Identity => format!("identity {}", self.subject),
            RevocationKind::Proxy => format!(
                "proxy instance {} ({}, workload {}/{})",
                self.subject, self.spiffe_id, self.namespace, self.workload
            ),
        };
        format!(
            "{what} was revoked at {} by {}: {}",
            utc(self.time_unix),
            self.actor,
            if self.reason.is_empty() {
                "no reason given"
            } else {
                &self.reason
            }
        )
    }
}

fn key(kind: RevocationKind, subject: &str) -> String {
    format!("{}|{subject}", kind.word())
}

/// Why a certificate may not be issued or recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum IssueRefusal {
    Revoked(Revocation),
    /// The instance is gone (pruned after its certificates expired).
    UnknownInstance(String),
}

/// Why a revocation (or lifting one) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RevokeError {
    #[error("{} is already revoked: {}", .0.subject, .0.describe())]
    AlreadyRevoked(Revocation),
    #[error("there is no proxy instance {0}; `bulkhead get proxies` shows each proxy's instance")]
    UnknownInstance(String),
    #[error("{0} is not revoked; `bulkhead get revocations` lists what is")]
    NotRevoked(String),
    #[error(
        "{subject} cannot be unrevoked before {} (until then a certificate issued to it before its revocation may still be valid, and would be accepted again); give the workload a new identity if it cannot wait",
        utc(*.until)
    )]
    TooEarly { subject: String, until: u64 },
}

/// What a revocation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Revoked {
    pub revocation: Revocation,
    /// Unused join tokens of the identity, deleted with it.
    pub tokens_deleted: Vec<String>,
    /// The instance's certificates that may still be valid.
    pub serials: Vec<String>,
    pub audit: AuditEntry,
}

/// A revocation to make.
pub(crate) struct RevokeOrder<'a> {
    pub kind: RevocationKind,
    pub subject: &'a str,
    pub reason: &'a str,
    pub actor: &'a str,
    /// For an identity: certificates of it may be valid until at least then, recorded or
    /// not (one issued before instances were recorded).
    pub valid_until_floor: u64,
}

pub(super) fn create_tables(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(INSTANCES)?;
    txn.open_table(SERIALS)?;
    txn.open_table(REVOCATIONS)?;
    Ok(())
}

fn read_json<T: serde::de::DeserializeOwned>(json: &str) -> Option<T> {
    serde_json::from_str(json).ok()
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Strings and numbers: serialising them cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// The revocation refusing `spiffe_id` or `instance`, if any, within `txn`.
fn refusal(
    txn: &redb::WriteTransaction,
    spiffe_id: &str,
    instance: Option<&str>,
) -> Result<Option<Revocation>, redb::Error> {
    let table = txn.open_table(REVOCATIONS)?;
    let mut keys = vec![key(RevocationKind::Identity, spiffe_id)];
    keys.extend(instance.map(|i| key(RevocationKind::Proxy, i)));
    for k in keys {
        if let Some(found) = table.get(k.as_str())?.and_then(|v| read_json(v.value())) {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// Puts `instance` in place of what `txn` holds of it, its serials with it; false if it held
/// exactly that.
fn upsert_instance(txn: &redb::WriteTransaction, instance: &Instance) -> Result<bool, redb::Error> {
    let mut instances = txn.open_table(INSTANCES)?;
    let held = instances
        .get(instance.id.as_str())?
        .and_then(|v| read_json::<Instance>(v.value()));
    if held.as_ref() == Some(instance) {
        return Ok(false);
    }
    let mut serials = txn.open_table(SERIALS)?;
    for c in held.iter().flat_map(|h| &h.certs) {
        serials.remove(c.serial.as_str())?;
    }
    for c in &instance.certs {
        serials.insert(c.serial.as_str(), instance.id.as_str())?;
    }
    instances.insert(instance.id.as_str(), to_json(instance).as_str())?;
    Ok(true)
}

fn new_instance_id(txn: &redb::WriteTransaction) -> Result<String, redb::Error> {
    let table = txn.open_table(INSTANCES)?;
    loop {
        let id: String = rand::random::<[u8; 6]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if table.get(id.as_str())?.is_none() {
            return Ok(id);
        }
    }
}

impl Store {
    /// Records a new instance holding `cert`, unless `spiffe_id` is revoked.
    pub(crate) fn new_instance(
        &self,
        spiffe_id: &str,
        workload: &ResourceName,
        token_id: &str,
        cert: IssuedCert,
        now_unix: u64,
    ) -> Result<Result<Instance, Revocation>, ControlError> {
        self.write(|txn| {
            if let Some(revoked) = refusal(txn, spiffe_id, None)? {
                return Ok(Err(revoked));
            }
            let instance = Instance {
                id: new_instance_id(txn)?,
                spiffe_id: spiffe_id.to_string(),
                namespace: workload.namespace.clone(),
                workload: workload.name.clone(),
                joined_unix: now_unix,
                token_id: token_id.to_string(),
                certs: vec![cert.clone()],
            };
            for c in &instance.certs {
                txn.open_table(SERIALS)?
                    .insert(c.serial.as_str(), instance.id.as_str())?;
            }
            txn.open_table(INSTANCES)?
                .insert(instance.id.as_str(), to_json(&instance).as_str())?;
            Ok(Ok(instance))
        })
    }

    /// Records a renewal's certificate for `instance`, unless it or its identity is revoked;
    /// certificates it held that have expired are forgotten.
    pub(crate) fn add_cert(
        &self,
        instance: &str,
        cert: IssuedCert,
        now_unix: u64,
    ) -> Result<Result<Instance, IssueRefusal>, ControlError> {
        self.write(|txn| {
            let mut instances = txn.open_table(INSTANCES)?;
            let Some(mut record) = instances
                .get(instance)?
                .and_then(|v| read_json::<Instance>(v.value()))
            else {
                return Ok(Err(IssueRefusal::UnknownInstance(instance.to_string())));
            };
            if let Some(revoked) = refusal(txn, record.spiffe_id.as_str(), Some(instance))? {
                return Ok(Err(IssueRefusal::Revoked(revoked)));
            }
            let mut serials = txn.open_table(SERIALS)?;
            let (gone, kept): (Vec<IssuedCert>, Vec<IssuedCert>) = record
                .certs
                .drain(..)
                .partition(|c| c.not_after_unix + EXPIRY_SLACK_SECS < now_unix);
            for c in gone {
                serials.remove(c.serial.as_str())?;
            }
            record.certs = kept;
            serials.insert(cert.serial.as_str(), instance)?;
            record.certs.push(cert.clone());
            instances.insert(instance, to_json(&record).as_str())?;
            Ok(Ok(record))
        })
    }

    pub(crate) fn instance(&self, id: &str) -> Result<Option<Instance>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(INSTANCES).map_err(|e| self.err(e))?;
        let found = table.get(id).map_err(|e| self.err(e))?;
        Ok(found.and_then(|v| read_json(v.value())))
    }

    /// The instance a certificate was issued to, if it was recorded.
    pub(crate) fn instance_by_serial(
        &self,
        serial: &str,
    ) -> Result<Option<Instance>, ControlError> {
        let id = {
            let txn = self.db.begin_read().map_err(|e| self.err(e))?;
            let table = txn.open_table(SERIALS).map_err(|e| self.err(e))?;
            let found = table.get(serial).map_err(|e| self.err(e))?;
            match found {
                Some(v) => v.value().to_string(),
                None => return Ok(None),
            }
        };
        self.instance(&id)
    }

    /// Every workload a join token bound `spiffe_id` to.
    pub(crate) fn bound_workloads(
        &self,
        spiffe_id: &str,
    ) -> Result<Vec<ResourceName>, ControlError> {
        let prefix = format!("{spiffe_id}|");
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BINDINGS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.range(prefix.as_str()..).map_err(|e| self.err(e))? {
            let (k, _) = row.map_err(|e| self.err(e))?;
            let Some(workload) = k.value().strip_prefix(&prefix) else {
                break;
            };
            if let Some((namespace, name)) = workload.split_once('/') {
                out.push(ResourceName {
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                });
            }
        }
        Ok(out)
    }

    /// Makes a revocation, with its audit entry, in one transaction. An identity's unused
    /// join tokens are deleted with it.
    pub(crate) fn revoke(
        &self,
        order: &RevokeOrder<'_>,
        now_unix: u64,
    ) -> Result<Result<Revoked, RevokeError>, ControlError> {
        self.write(|txn| {
            let mut revocations = txn.open_table(REVOCATIONS)?;
            let k = key(order.kind, order.subject);
            if let Some(known) = revocations
                .get(k.as_str())?
                .and_then(|v| read_json::<Revocation>(v.value()))
            {
                return Ok(Err(RevokeError::AlreadyRevoked(known)));
            }
            let instances: Vec<Instance> = txn
                .open_table(INSTANCES)?
                .iter()?
                .filter_map(|row| row.ok().and_then(|(_, v)| read_json(v.value())))
                .collect();
            let mut revocation = Revocation {
                kind: order.kind,
                subject: order.subject.to_string(),
                reason: order.reason.to_string(),
                actor: order.actor.to_string(),
                time_unix: now_unix,
                spiffe_id: order.subject.to_string(),
                namespace: String::new(),
                workload: String::new(),
                certs_valid_until_unix: 0,
            };
            let mut detail = Vec::new();
            let mut tokens_deleted = Vec::new();
            let mut serials = Vec::new();
            match order.kind {
                RevocationKind::Identity => {
                    revocation.certs_valid_until_unix = instances
                        .iter()
                        .filter(|i| i.spiffe_id == order.subject)
                        .map(Instance::valid_until)
                        .fold(order.valid_until_floor, u64::max);
                    let mut tokens = txn.open_table(TOKENS)?;
                    tokens.retain(|id, json| {
                        let bound = read_json::<TokenRecord>(json)
                            .is_some_and(|t| t.spiffe_id.as_str() == order.subject);
                        if bound {
                            tokens_deleted.push(id.to_string());
                        }
                        !bound
                    })?;
                    detail.push(format!(
                        "every proxy refuses every certificate of it; its joins and renewals are refused; certificates issued before may be valid until {}",
                        utc(revocation.certs_valid_until_unix)
                    ));
                    if !tokens_deleted.is_empty() {
                        detail.push(format!(
                            "join tokens deleted: {}",
                            tokens_deleted.join(", ")
                        ));
                    }
                }
                RevocationKind::Proxy => {
                    let Some(instance) = instances.iter().find(|i| i.id == order.subject) else {
                        return Ok(Err(RevokeError::UnknownInstance(order.subject.to_string())));
                    };
                    revocation.spiffe_id = instance.spiffe_id.clone();
                    revocation.namespace = instance.namespace.clone();
                    revocation.workload = instance.workload.clone();
                    revocation.certs_valid_until_unix = instance.valid_until();
                    serials = instance
                        .certs
                        .iter()
                        .filter(|c| c.not_after_unix + EXPIRY_SLACK_SECS >= now_unix)
                        .map(|c| c.serial.clone())
                        .collect();
                    detail.push(format!(
                        "{}, workload {}/{}; its renewals are refused; certificates refused: {}",
                        instance.spiffe_id,
                        instance.namespace,
                        instance.workload,
                        if serials.is_empty() {
                            "none left unexpired".to_string()
                        } else {
                            serials.join(", ")
                        }
                    ));
                }
            }
            detail.insert(0, format!("reason: {}", order.reason));
            revocations.insert(k.as_str(), to_json(&revocation).as_str())?;
            let audit = audit::append(
                txn,
                NewEntry {
                    actor: order.actor.to_string(),
                    action: format!("revoke {} {}", order.kind.word(), order.subject),
                    detail,
                    revision: None,
                },
                now_unix,
            )?;
            Ok(Ok(Revoked {
                revocation: revocation.clone(),
                tokens_deleted,
                serials,
                audit,
            }))
        })
    }

    /// Lifts an identity's revocation, once no certificate issued before it can be valid.
    pub(crate) fn unrevoke_identity(
        &self,
        subject: &str,
        actor: &str,
        now_unix: u64,
    ) -> Result<Result<(Revocation, AuditEntry), RevokeError>, ControlError> {
        self.write(|txn| {
            let mut revocations = txn.open_table(REVOCATIONS)?;
            let k = key(RevocationKind::Identity, subject);
            let Some(known) = revocations
                .get(k.as_str())?
                .and_then(|v| read_json::<Revocation>(v.value()))
            else {
                return Ok(Err(RevokeError::NotRevoked(subject.to_string())));
            };
            if now_unix < known.certs_valid_until_unix {
                return Ok(Err(RevokeError::TooEarly {
                    subject: subject.to_string(),
                    until: known.certs_valid_until_unix,
                }));
            }
            revocations.remove(known.key().as_str())?;
            let audit = audit::append(
                txn,
                NewEntry {
                    actor: actor.to_string(),
                    action: format!("unrevoke identity {subject}"),
                    detail: vec![format!("lifted: {}", known.describe())],
                    revision: None,
                },
                now_unix,
            )?;
            Ok(Ok((known, audit)))
        })
    }

    /// Records `instance` as another replica shared it in etcd (made or renewed there), in
    /// place of what this store held of it; false if it held exactly that already.
    pub(crate) fn import_instance(&self, instance: &Instance) -> Result<bool, ControlError> {
        self.write(|txn| upsert_instance(txn, instance))
    }

    /// [`Store::import_instance`] for a certificate about to be handed out: refused, in the
    /// same transaction, if the instance or its identity is revoked here.
    pub(crate) fn import_issuing(
        &self,
        instance: &Instance,
    ) -> Result<Result<(), Revocation>, ControlError> {
        self.write(|txn| {
            if let Some(revoked) = refusal(txn, &instance.spiffe_id, Some(&instance.id))? {
                return Ok(Err(revoked));
            }
            upsert_instance(txn, instance)?;
            Ok(Ok(()))
        })
    }

    /// Records a revocation made on another replica (replicas on etcd), with an
    /// audit entry; false if this subject is already revoked here.
    pub(crate) fn import_revocation(
        &self,
        revocation: &Revocation,
        now_unix: u64,
    ) -> Result<bool, ControlError> {
        self.write(|txn| {
            let mut revocations = txn.open_table(REVOCATIONS)?;
            if revocations.get(revocation.key().as_str())?.is_some() {
                return Ok(false);
            }
            revocations.insert(revocation.key().as_str(), to_json(revocation).as_str())?;
            audit::append(
                txn,
                NewEntry {
                    actor: revocation.actor.clone(),
                    action: format!(
                        "revoke {} {} {}",
                        revocation.kind.word(),
                        revocation.subject,
                        super::etcd_audit::TAKEN_UP
                    ),
                    detail: vec![revocation.reason.clone()],
                    revision: None,
                },
                now_unix,
            )?;
            Ok(true)
        })
    }

    /// Removes the identity revocation of `subject` made at or before `made_before_unix`
    /// (lifted on another replica), with an audit entry; false if there is none such.
    pub(crate) fn lift_imported(
        &self,
        subject: &str,
        made_before_unix: u64,
        actor: &str,
        now_unix: u64,
    ) -> Result<bool, ControlError> {
        self.write(|txn| {
            let mut revocations = txn.open_table(REVOCATIONS)?;
            let k = key(RevocationKind::Identity, subject);
            let known = revocations
                .get(k.as_str())?
                .and_then(|v| read_json::<Revocation>(v.value()));
            match known {
                Some(r) if r.time_unix <= made_before_unix => {}
                _ => return Ok(false),
            }
            revocations.remove(k.as_str())?;
            audit::append(
                txn,
                NewEntry {
                    actor: actor.to_string(),
                    action: format!("unrevoke {subject} {}", super::etcd_audit::TAKEN_UP),
                    detail: Vec::new(),
                    revision: None,
                },
                now_unix,
            )?;
            Ok(true)
        })
    }

    /// Every revocation, identities first, each in key order.
    pub(crate) fn revocations(&self) -> Result<Vec<Revocation>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(REVOCATIONS).map_err(|e| self.err(e))?;
        let mut out: Vec<Revocation> = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match read_json(v.value()) {
                Some(r) => out.push(r),
                // An unreadable revocation is not a reason to accept anyone: say so loudly.
                None => tracing::error!(key = k.value(), "a stored revocation is unreadable"),
            }
        }
        out.sort_by_key(|r| (r.kind != RevocationKind::Identity, r.subject.clone()));
        Ok(out)
    }

    /// The serials of revoked instances' certificates that may still be valid at `now_unix`
    /// (with [`EXPIRY_SLACK_SECS`]).
    pub(crate) fn revoked_serials(&self, now_unix: u64) -> Result<Vec<String>, ControlError> {
        let revoked: Vec<String> = self
            .revocations()?
            .into_iter()
            .filter(|r| r.kind == RevocationKind::Proxy)
            .map(|r| r.subject)
            .collect();
        let mut out = Vec::new();
        for id in revoked {
            if let Some(instance) = self.instance(&id)? {
                out.extend(
                    instance
                        .certs
                        .into_iter()
                        .filter(|c| c.not_after_unix + EXPIRY_SLACK_SECS >= now_unix)
                        .map(|c| c.serial),
                );
            }
        }
        out.sort();
        Ok(out)
    }

    /// Forgets instances whose every certificate expired before `expired_before` (they can
    /// neither renew nor be presented), with their serials. Their revocations stay listed.
    pub(crate) fn prune_instances(&self, expired_before: u64) -> Result<usize, ControlError> {
        self.write(|txn| {
            let mut instances = txn.open_table(INSTANCES)?;
            let mut gone: Vec<Instance> = Vec::new();
            instances.retain(|_, json| match read_json::<Instance>(json) {
                Some(i) if i.valid_until() < expired_before => {
                    gone.push(i);
                    false
                }
                _ => true,
            })?;
            let mut serials = txn.open_table(SERIALS)?;
            for c in gone.iter().flat_map(|i| &i.certs) {
                serials.remove(c.serial.as_str())?;
            }
            Ok(gone.len())
        })
    }

    /// Stores a new join token, with its audit entry; refused if its identity is revoked.
    pub(crate) fn create_token(
        &self,
        id: &str,
        record: &TokenRecord,
        actor: &str,
        now_unix: u64,
    ) -> Result<Result<(), Revocation>, ControlError> {
        self.write(|txn| {
            if let Some(revoked) = refusal(txn, record.spiffe_id.as_str(), None)? {
                return Ok(Err(revoked));
            }
            txn.open_table(TOKENS)?
                .insert(id, to_json(record).as_str())?;
            audit::append(
                txn,
                NewEntry {
                    actor: actor.to_string(),
                    action: format!("token create {id}"),
                    detail: vec![describe_token(record)],
                    revision: None,
                },
                now_unix,
            )?;
            Ok(Ok(()))
        })
    }

    /// Every stored join token by id, in id order.
    pub(crate) fn tokens(&self) -> Result<Vec<(String, TokenRecord)>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(TOKENS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            if let Some(record) = read_json(v.value()) {
                out.push((k.value().to_string(), record));
            }
        }
        Ok(out)
    }

    /// Deletes a join token, with its audit entry; `None` if there is no such token.
    pub(crate) fn delete_token(
        &self,
        id: &str,
        actor: &str,
        now_unix: u64,
    ) -> Result<Option<TokenRecord>, ControlError> {
        self.write(|txn| {
            let removed = txn
                .open_table(TOKENS)?
                .remove(id)?
                .and_then(|v| read_json::<TokenRecord>(v.value()));
            let Some(record) = removed else {
                return Ok(None);
            };
            audit::append(
                txn,
                NewEntry {
                    actor: actor.to_string(),
                    action: format!("token delete {id}"),
                    detail: vec![describe_token(&record)],
                    revision: None,
                },
                now_unix,
            )?;
            Ok(Some(record))
        })
    }
}

fn describe_token(record: &TokenRecord) -> String {
    format!(
        "for {}, workload {}/{}, {} use(s) left, expires {}",
        record.spiffe_id,
        record.namespace,
        record.workload,
        record.uses_left,
        utc(record.expires_unix)
    )
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::temp_store;

    const ADMIN: &str = "spiffe://td/bulkhead/admin (user alice)";
    const ORDERS: &str = "spiffe://td/ns/shop/sa/orders";

    fn orders() -> ResourceName {
        ResourceName {
            namespace: "shop".into(),
            name: "orders".into(),
        }
    }

    fn cert(serial: &str, not_after_unix: u64) -> IssuedCert {
        IssuedCert {
            serial: serial.into(),
            not_after_unix,
        }
    }

    fn order<'a>(kind: RevocationKind, subject: &'a str) -> RevokeOrder<'a> {
        RevokeOrder {
            kind,
            subject,
            reason: "key leaked",
            actor: ADMIN,
            valid_until_floor: 0,
        }
    }

    fn token(spiffe_id: &str) -> TokenRecord {
        TokenRecord {
            secret_sha256: "ab".repeat(32),
            spiffe_id: bulkhead_identity::SpiffeId::parse(spiffe_id).unwrap(),
            namespace: "shop".into(),
            workload: "orders".into(),
            expires_unix: 10_000,
            uses_left: 1,
        }
    }

    #[test]
    fn an_instance_keeps_its_unexpired_certificates_and_is_found_by_each() {
        let t = temp_store("instances");
        let s = &t.store;
        let i = s
            .new_instance(ORDERS, &orders(), "tok", cert("01", 1000), 100)
            .unwrap()
            .unwrap();
        assert_eq!(i.id.len(), 12);
        let again = s.add_cert(&i.id, cert("02", 2000), 900).unwrap().unwrap();
        assert_eq!(again.certs, vec![cert("01", 1000), cert("02", 2000)]);
        assert_eq!(s.instance_by_serial("01").unwrap().unwrap().id, i.id);
        // Long after the first expired, a renewal forgets it.
        let later = s
            .add_cert(&i.id, cert("03", 3000), 1000 + EXPIRY_SLACK_SECS + 1)
            .unwrap()
            .unwrap();
        assert_eq!(later.certs, vec![cert("02", 2000), cert("03", 3000)]);
        assert_eq!(s.instance_by_serial("01").unwrap(), None);
        assert_eq!(s.instance_by_serial("03").unwrap().unwrap().id, i.id);
        // Two joins of one workload are two instances.
        let other = s
            .new_instance(ORDERS, &orders(), "tok2", cert("10", 1000), 100)
            .unwrap()
            .unwrap();
        assert_ne!(other.id, i.id);
        // Once all its certificates expired, an instance is forgotten.
        assert_eq!(s.prune_instances(2500).unwrap(), 1);
        assert_eq!(s.instance(&other.id).unwrap(), None);
        assert_eq!(s.instance_by_serial("10").unwrap(), None);
        assert!(s.instance(&i.id).unwrap().is_some());
        assert_eq!(
            s.add_cert(&other.id, cert("11", 5000), 2600).unwrap(),
            Err(IssueRefusal::UnknownInstance(other.id.clone()))
        );
    }

    #[test]
    fn a_revoked_identity_gets_no_instance_certificate_or_token() {
        let t = temp_store("revoke-identity");
        let s = &t.store;
        let i = s
            .new_instance(ORDERS, &orders(), "tok", cert("01", 5000), 100)
            .unwrap()
            .unwrap();
        assert_eq!(
            s.create_token("t1", &token(ORDERS), ADMIN, 100).unwrap(),
            Ok(())
        );
        s.create_token("t2", &token("spiffe://td/ns/shop/sa/other"), ADMIN, 100)
            .unwrap()
            .unwrap();
        let mut o = order(RevocationKind::Identity, ORDERS);
        o.valid_until_floor = 4000;
        let done = s.revoke(&o, 200).unwrap().unwrap();
        assert_eq!(done.tokens_deleted, vec!["t1".to_string()]);
        assert_eq!(
            done.revocation.certs_valid_until_unix, 5000,
            "the newest recorded certificate"
        );
        assert_eq!(done.audit.action, format!("revoke identity {ORDERS}"));
        assert_eq!(done.audit.detail[0], "reason: key leaked");
        assert_eq!(
            s.tokens()
                .unwrap()
                .into_iter()
                .map(|(id, _)| id)
                .collect::<Vec<_>>(),
            ["t2"]
        );

        let refused = |r: Result<Instance, IssueRefusal>| match r {
            Err(IssueRefusal::Revoked(r)) => r.subject,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(s.add_cert(&i.id, cert("02", 6000), 300).unwrap()),
            ORDERS
        );
        assert!(
            s.new_instance(ORDERS, &orders(), "tok", cert("03", 6000), 300)
                .unwrap()
                .is_err()
        );
        assert!(
            s.create_token("t3", &token(ORDERS), ADMIN, 300)
                .unwrap()
                .is_err()
        );
        assert!(matches!(
            s.revoke(&o, 300).unwrap(),
            Err(RevokeError::AlreadyRevoked(_))
        ));

        // Unrevoking waits for every certificate issued before to expire.
        let err = s
            .unrevoke_identity(ORDERS, ADMIN, 4999)
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, RevokeError::TooEarly { until: 5000, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("cannot be unrevoked before"),
            "{err}"
        );
        let (lifted, audit) = s.unrevoke_identity(ORDERS, ADMIN, 5000).unwrap().unwrap();
        assert_eq!(lifted.reason, "key leaked");
        assert_eq!(audit.action, format!("unrevoke identity {ORDERS}"));
        assert!(s.revocations().unwrap().is_empty());
        assert!(matches!(
            s.unrevoke_identity(ORDERS, ADMIN, 5001).unwrap(),
            Err(RevokeError::NotRevoked(_))
        ));
        let actions: Vec<String> = s
            .audit_log(10)
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(
            actions,
            [
                format!("unrevoke identity {ORDERS}"),
                format!("revoke identity {ORDERS}"),
                "token create t2".to_string(),
                "token create t1".to_string(),
            ]
        );
    }

    #[test]
    fn a_revoked_instance_refuses_its_renewals_and_lists_its_live_serials() {
        let t = temp_store("revoke-proxy");
        let s = &t.store;
        let a = s
            .new_instance(ORDERS, &orders(), "t", cert("0a", 1000), 100)
            .unwrap()
            .unwrap();
        s.add_cert(&a.id, cert("0b", 2000), 500).unwrap().unwrap();
        let b = s
            .new_instance(ORDERS, &orders(), "t", cert("0c", 2000), 100)
            .unwrap()
            .unwrap();
        let done = s
            .revoke(&order(RevocationKind::Proxy, &a.id), 600)
            .unwrap()
            .unwrap();
        assert_eq!(done.serials, ["0a", "0b"]);
        assert_eq!(done.revocation.spiffe_id, ORDERS);
        assert_eq!(done.revocation.workload, "orders");
        assert_eq!(done.revocation.certs_valid_until_unix, 2000);
        assert!(matches!(
            s.add_cert(&a.id, cert("0d", 3000), 700).unwrap(),
            Err(IssueRefusal::Revoked(_))
        ));
        // The other instance of the same workload is untouched.
        s.add_cert(&b.id, cert("0e", 3000), 700).unwrap().unwrap();
        assert_eq!(s.revoked_serials(700).unwrap(), ["0a", "0b"]);
        assert_eq!(
            s.revoked_serials(1000 + EXPIRY_SLACK_SECS + 1).unwrap(),
            ["0b"],
            "an expired certificate leaves the list"
        );
        assert!(matches!(
            s.revoke(&order(RevocationKind::Proxy, "nope"), 700)
                .unwrap(),
            Err(RevokeError::UnknownInstance(_))
        ));
        assert!(
            s.revoke(&order(RevocationKind::Proxy, &a.id), 700)
                .unwrap()
                .is_err()
        );
        // The revocation outlives the instance.
        s.prune_instances(2500).unwrap();
        assert_eq!(s.revocations().unwrap().len(), 1);
        assert!(s.revoked_serials(2500).unwrap().is_empty());
    }

    #[test]
    fn tokens_are_listed_and_deleted_without_their_secrets_leaving() {
        let t = temp_store("tokens");
        let s = &t.store;
        s.create_token("b", &token(ORDERS), ADMIN, 1)
            .unwrap()
            .unwrap();
        s.create_token("a", &token(ORDERS), ADMIN, 1)
            .unwrap()
            .unwrap();
        let ids: Vec<String> = s.tokens().unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(s.delete_token("a", ADMIN, 2).unwrap(), Some(token(ORDERS)));
        assert_eq!(s.delete_token("a", ADMIN, 3).unwrap(), None);
        let log = s.audit_log(1).unwrap();
        assert_eq!(log[0].action, "token delete a");
        assert!(!log[0].detail.join(" ").contains(&"ab".repeat(32)));
        assert_eq!(
            s.bound_workloads(ORDERS).unwrap(),
            Vec::<ResourceName>::new()
        );
        s.bind(ORDERS, &orders(), 1).unwrap();
        assert_eq!(s.bound_workloads(ORDERS).unwrap(), vec![orders()]);
        assert!(
            s.bound_workloads("spiffe://td/ns/shop/sa/order")
                .unwrap()
                .is_empty()
        );
    }
}
