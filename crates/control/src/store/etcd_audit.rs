//! The credential audit log shared by replicas on etcd: each replica copies the entries it
//! made (token, revocation and CA changes; not those it took up from another replica) to
//! `audit/<time, 20 digits>-<digest>`, and `bulkhead history` on any replica lists the
//! union. An entry's key is derived from its content, so copying one again never makes a
//! second. The leader trims the log to [`MAX_SHARED_AUDIT`] entries, oldest first.
//!
//! Nothing here is secret: the entries name token ids and identities, never a secret.

use super::audit::AuditEntry;
use super::etcd::{EtcdStore, PREFIX};
use super::etcd_client::{get_newest, put, txn};
use crate::error::ControlError;
use bulkhead_api::etcd::etcdserverpb as pb;
use sha2::{Digest, Sha256};

/// The most entries etcd keeps (each replica's own store keeps up to 100,000 of its own).
pub(crate) const MAX_SHARED_AUDIT: usize = 10_000;
/// Puts per transaction (etcd's default `--max-txn-ops` is 128).
const PUTS_PER_TXN: usize = 100;

/// What an entry recorded on one replica says when another takes it up.
pub(crate) const TAKEN_UP: &str = "(on another replica)";

fn audit_prefix() -> String {
    format!("{PREFIX}audit/")
}

/// The key of `entry`: its time, then a digest of what it says (not of its number, which
/// is the replica's own).
pub(crate) fn audit_key(entry: &AuditEntry) -> String {
    let mut h = Sha256::new();
    for part in [&entry.actor, &entry.action] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for d in &entry.detail {
        h.update(d.as_bytes());
        h.update([0]);
    }
    h.update(entry.revision.unwrap_or(0).to_be_bytes());
    let digest: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{}{:020}-{digest}", audit_prefix(), entry.time_unix)
}

/// Whether this replica made `entry` (rather than took it up from another).
pub(crate) fn made_here(entry: &AuditEntry) -> bool {
    !entry.action.ends_with(TAKEN_UP)
}

impl EtcdStore {
    /// Copies `entries` (made on this replica) to etcd.
    pub(crate) async fn put_audit(&self, entries: &[AuditEntry]) -> Result<(), ControlError> {
        for chunk in entries.chunks(PUTS_PER_TXN) {
            let ops = chunk
                .iter()
                .map(|e| put(audit_key(e), serde_json::to_vec(e).unwrap_or_default(), 0))
                .collect();
            self.txn(txn(Vec::new(), ops)).await?;
        }
        Ok(())
    }

    /// The newest `limit` shared entries, newest first.
    pub(crate) async fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, ControlError> {
        self.newest_json(audit_prefix(), limit).await
    }

    /// The leader's upkeep: deletes the shared entries past the newest
    /// [`MAX_SHARED_AUDIT`]; how many.
    pub(crate) async fn trim_audit(&self) -> Result<u64, ControlError> {
        let got = self
            .get(pb::RangeRequest {
                keys_only: true,
                ..get_newest(audit_prefix(), MAX_SHARED_AUDIT + 1)
            })
            .await?;
        let Some(oldest_kept) = got.kvs.get(MAX_SHARED_AUDIT.saturating_sub(1)) else {
            return Ok(0);
        };
        if got.kvs.len() <= MAX_SHARED_AUDIT {
            return Ok(0);
        }
        self.delete_range(audit_prefix().into_bytes(), oldest_kept.key.clone())
            .await
    }
}

/// `local` (this replica's own, newest first) and `shared` (etcd's, newest first) as one
/// log, newest first, each entry once, at most `limit`.
pub(crate) fn merged(
    local: Vec<AuditEntry>,
    shared: Vec<AuditEntry>,
    limit: usize,
) -> Vec<AuditEntry> {
    let mut by_key = std::collections::BTreeMap::new();
    for e in shared
        .into_iter()
        .chain(local.into_iter().filter(made_here))
    {
        by_key.entry(audit_key(&e)).or_insert(e);
    }
    by_key.into_values().rev().take(limit).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn entry(seq: u64, time_unix: u64, action: &str) -> AuditEntry {
        AuditEntry {
            seq,
            time_unix,
            actor: "spiffe://td/bulkhead/admin (user alice)".into(),
            action: action.into(),
            detail: vec!["reason: stolen".into()],
            revision: None,
        }
    }

    #[test]
    fn the_union_holds_each_entry_once_newest_first_without_taken_up_copies() {
        let a = entry(7, 100, "revoke identity spiffe://td/ns/a/sa/b");
        let copy_elsewhere = AuditEntry {
            seq: 3,
            ..a.clone()
        };
        let taken_up = entry(
            4,
            101,
            "revoke identity spiffe://td/ns/a/sa/b (on another replica)",
        );
        let newer = entry(8, 102, "token create abc");
        let all = merged(
            vec![newer.clone(), taken_up, a.clone()],
            vec![copy_elsewhere, a.clone()],
            10,
        );
        let actions: Vec<&str> = all.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            ["token create abc", "revoke identity spiffe://td/ns/a/sa/b"]
        );
        assert_eq!(merged(vec![newer, a], Vec::new(), 1).len(), 1);
    }
}
