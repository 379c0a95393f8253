//! The audit log of changes to the mesh's credentials: join tokens made and deleted,
//! identities and proxies revoked, CAs added, switched and retired. Who did it, when, and
//! what it did, shown by `bulkhead history` beside the policy revisions.
//!
//! A table of its own (`audit`: sequence number → JSON entry), apart from the revisions and
//! their full snapshots, so that each can be pruned on its own terms: the audit log is small
//! (no snapshot) and bounded by its row count alone. An entry is written in the same
//! transaction as the change it records wherever the change is in the store, so neither is
//! ever without the other. It never holds a secret: no token, no key.

use super::{META, Store};
use crate::error::ControlError;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

/// Sequence number → JSON of an [`AuditEntry`].
const AUDIT: TableDefinition<u64, &str> = TableDefinition::new("audit");
/// In META: the last audit sequence number given out (never reused).
const AUDIT_SEQ: &str = "audit_seq";
/// The most entries kept; past it the oldest go. At a few hundred bytes each, 100,000
/// entries are tens of MiB at most.
pub(crate) const MAX_AUDIT_ROWS: u64 = 100_000;

/// One change, as the audit log keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct AuditEntry {
    pub seq: u64,
    pub time_unix: u64,
    /// The verified admin identity, and the user name the CLI claimed.
    pub actor: String,
    /// What was done, e.g. `revoke identity spiffe://…`.
    pub action: String,
    /// What it did and why, one line each.
    pub detail: Vec<String>,
    /// The policy revision it made, if it made one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
}

/// An entry to be numbered and written.
#[derive(Clone, Debug, Default)]
pub(crate) struct NewEntry {
    pub actor: String,
    pub action: String,
    pub detail: Vec<String>,
    pub revision: Option<u64>,
}

pub(super) fn create_table(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(AUDIT)?;
    Ok(())
}

/// Numbers and writes `entry` within `txn`, then trims the log to its bound.
pub(super) fn append(
    txn: &redb::WriteTransaction,
    entry: NewEntry,
    now_unix: u64,
) -> Result<AuditEntry, redb::Error> {
    let mut meta = txn.open_table(META)?;
    let seq = meta.get(AUDIT_SEQ)?.map_or(0, |v| v.value()) + 1;
    meta.insert(AUDIT_SEQ, seq)?;
    let entry = AuditEntry {
        seq,
        time_unix: now_unix,
        actor: entry.actor,
        action: entry.action,
        detail: entry.detail,
        revision: entry.revision,
    };
    // Strings and numbers: serialising them cannot fail.
    let json = serde_json::to_string(&entry).unwrap_or_default();
    let mut table = txn.open_table(AUDIT)?;
    table.insert(seq, json.as_str())?;
    while table.len()? > MAX_AUDIT_ROWS {
        table.pop_first()?;
    }
    Ok(entry)
}

impl Store {
    /// Records a change that is not itself in the store (a CA change, which lives in the data
    /// directory), in a transaction of its own.
    pub(crate) fn audit(&self, entry: NewEntry, now_unix: u64) -> Result<AuditEntry, ControlError> {
        self.write(|txn| append(txn, entry.clone(), now_unix))
    }

    /// Up to `limit` entries numbered above `after`, oldest first.
    pub(crate) fn audit_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(AUDIT).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let from = after.saturating_add(1);
        for row in table.range(from..).map_err(|e| self.err(e))?.take(limit) {
            let (_, json) = row.map_err(|e| self.err(e))?;
            if let Ok(entry) = serde_json::from_str::<AuditEntry>(json.value()) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// The newest `limit` entries, newest first.
    pub(crate) fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(AUDIT).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))?.rev().take(limit) {
            let (seq, json) = row.map_err(|e| self.err(e))?;
            match serde_json::from_str::<AuditEntry>(json.value()) {
                Ok(entry) => out.push(entry),
                Err(e) => {
                    tracing::warn!(seq = seq.value(), error = %e, "skipping an unreadable audit entry")
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::testing::temp_store;

    fn entry(action: &str) -> NewEntry {
        NewEntry {
            actor: "spiffe://td/bulkhead/admin (user alice)".into(),
            action: action.into(),
            detail: vec!["why".into()],
            revision: None,
        }
    }

    #[test]
    fn entries_are_numbered_and_listed_newest_first() {
        let t = temp_store("audit");
        assert!(t.store.audit_log(10).unwrap().is_empty());
        let first = t.store.audit(entry("ca add 1234"), 100).unwrap();
        let second = t.store.audit(entry("ca switch 1234"), 200).unwrap();
        assert_eq!((first.seq, second.seq), (1, 2));
        let log = t.store.audit_log(10).unwrap();
        assert_eq!(
            log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
            ["ca switch 1234", "ca add 1234"]
        );
        assert_eq!(log[1].time_unix, 100);
        assert_eq!(log[0].actor, "spiffe://td/bulkhead/admin (user alice)");
        assert_eq!(t.store.audit_log(1).unwrap(), vec![second]);
    }

    #[test]
    fn the_log_keeps_its_newest_rows_and_never_reuses_a_number() {
        let t = temp_store("audit-bound");
        t.store
            .write(|txn| {
                // Pretend the log is at its bound.
                let mut table = txn.open_table(AUDIT)?;
                for seq in 1..=MAX_AUDIT_ROWS {
                    table.insert(seq, "{}")?;
                }
                txn.open_table(META)?.insert(AUDIT_SEQ, MAX_AUDIT_ROWS)?;
                Ok(())
            })
            .unwrap();
        let next = t.store.audit(entry("token delete x"), 5).unwrap();
        assert_eq!(next.seq, MAX_AUDIT_ROWS + 1);
        let txn = t.store.db.begin_read().unwrap();
        let table = txn.open_table(AUDIT).unwrap();
        assert_eq!(table.len().unwrap(), MAX_AUDIT_ROWS);
        assert_eq!(table.first().unwrap().unwrap().0.value(), 2);
        // Unreadable rows are skipped, not fatal.
        drop(table);
        drop(txn);
        assert_eq!(t.store.audit_log(3).unwrap(), vec![next]);
    }
}
