//! The embedded store (redb in the data directory): the current resources, the revision log
//! (who changed the set, when and how), snapshots of the whole set at recent revisions (what
//! rollback restores), join tokens (hashed), which identity may fetch which workload's
//! configuration, the traffic edges proxies report (`edges.rs`: per hour, bounded per edge,
//! per workload and mesh-wide) and the anomalies found in them (`events.rs`).
//!
//! Everything it keeps is bounded: snapshots by count and age ([`HistoryRetention`]; the
//! current revision's always stays), the revision log by [`LOG_MAX_ENTRIES`] and
//! [`LOG_MAX_AGE`], edges and events by their retention. Pruning snapshots never touches the
//! revision log or any other audit record. The file is compacted when it holds over twice
//! what is live (`db.rs`), and a write that failed for lack of disk space is followed by
//! writes that succeed once space is freed, without a restart.

mod db;
mod edges;
pub(crate) mod etcd;
pub(crate) mod etcd_audit;
pub(crate) mod etcd_ca;
pub(crate) mod etcd_client;
pub(crate) mod etcd_instances;
pub(crate) mod events;
mod history;

pub(crate) use edges::EdgesWritten;
pub(crate) use events::EventRetention;
pub use history::{HistoryRetention, LOG_CHANGES_PER_ENTRY, LOG_MAX_AGE, LOG_MAX_ENTRIES};

use crate::error::ControlError;
use crate::tokens::{TokenError, TokenRecord};
use bulkhead_policy::model::{Resource, ResourceName};

use redb::{ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub(crate) mod audit;
pub(crate) mod trust;

const RESOURCES: TableDefinition<&str, &str> = TableDefinition::new("resources");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Revision → JSON of its [`RevisionRecord`] (who, when, what changed; no set).
const REVISIONS: TableDefinition<u64, &str> = TableDefinition::new("revisions");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const BINDINGS: TableDefinition<&str, u64> = TableDefinition::new("bindings");

pub(crate) struct Store {
    db: db::Db,
    path: PathBuf,
    history: HistoryRetention,
    /// Edge rows in hours before this are known to be deleted: expiring runs again only
    /// when the retention window has moved past it.
    edges_expired_before: std::sync::atomic::AtomicU64,
}

/// How one resource changed between two sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Created,
    Configured,
    Unchanged,
    Deleted,
}

impl Change {
    pub(crate) fn word(self) -> &'static str {
        match self {
            Change::Created => "created",
            Change::Configured => "configured",
            Change::Unchanged => "unchanged",
            Change::Deleted => "deleted",
        }
    }
}

/// How each resource changes from `old` to `new` (key → JSON), in key order, deletions last.
pub(crate) fn changes(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<(String, Change)> {
    let mut changes = Vec::new();
    for (key, json) in new {
        let change = match old.get(key) {
            None => Change::Created,
            Some(o) if o == json => Change::Unchanged,
            Some(_) => Change::Configured,
        };
        changes.push((key.clone(), change));
    }
    for key in old.keys().filter(|k| !new.contains_key(*k)) {
        changes.push((key.clone(), Change::Deleted));
    }
    changes
}

/// The JSON of each resource of `set`, by key, as the store keeps them.
pub(crate) fn by_key(set: &[Resource]) -> Result<BTreeMap<String, String>, String> {
    set.iter()
        .map(|r| r.to_json().map(|j| (r.key(), j)))
        .collect()
}

/// One entry of the revision log: a revision of the set, who made it, when and how.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RevisionRecord {
    pub revision: u64,
    pub time_unix: u64,
    pub actor: String,
    pub action: String,
    pub changes: Vec<String>,
    /// The whole set, in entries written before snapshots were kept apart; moved out (or
    /// pruned) when the store is opened.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resources: Vec<String>,
}

/// The set at a revision, if it is still kept.
#[derive(Debug)]
pub(crate) enum SetAt {
    Kept(Vec<Resource>),
    /// The revision was made but its snapshot was pruned; `oldest_kept` is the oldest one
    /// still kept.
    Pruned {
        oldest_kept: u64,
    },
    /// There is no such revision (yet).
    Missing,
}

impl SetAt {
    /// The set, if it is known: kept, or empty before the first revision. `None` when its
    /// snapshot was pruned.
    pub(crate) fn known(self) -> Option<Vec<Resource>> {
        match self {
            SetAt::Kept(set) => Some(set),
            SetAt::Missing => Some(Vec::new()),
            SetAt::Pruned { .. } => None,
        }
    }
}

/// What one commit did.
#[derive(Debug)]
pub(crate) struct Committed {
    pub revision: u64,
    pub changes: Vec<(String, Change)>,
    /// Snapshots pruned by this commit.
    pub pruned: u64,
}

impl Store {
    /// Opens the store with the default [`HistoryRetention`].
    #[cfg(test)]
    pub(crate) fn open(path: &Path) -> Result<Store, ControlError> {
        Store::open_with(path, HistoryRetention::default())
    }

    /// Opens (or creates) the store; moves the sets out of revision entries written before
    /// snapshots were kept apart, keeping those `history` keeps, and builds the edge indexes
    /// of a store written before they existed.
    pub(crate) fn open_with(path: &Path, history: HistoryRetention) -> Result<Store, ControlError> {
        let db = db::Db::open(path).map_err(|e| ControlError::Store {
            path: path.to_path_buf(),
            message: redb::Error::from(e).to_string(),
        })?;
        let store = Store {
            db,
            path: path.to_path_buf(),
            history,
            edges_expired_before: std::sync::atomic::AtomicU64::new(0),
        };
        store.write(|txn| {
            txn.open_table(RESOURCES)?;
            txn.open_table(META)?;
            txn.open_table(REVISIONS)?;
            history::create(txn)?;
            txn.open_table(TOKENS)?;
            txn.open_table(BINDINGS)?;
            edges::create(txn)?;
            events::create(txn)?;
            trust::create_tables(txn)?;
            audit::create_table(txn)?;
            Ok(())
        })?;
        store.migrate_snapshots()?;
        store.migrate_edges()?;
        Ok(store)
    }

    /// Maps a redb error for a caller: a full disk says so; any error after which redb
    /// must be re-opened has the next transaction re-open it.
    fn err(&self, e: impl Into<redb::Error>) -> ControlError {
        let e = e.into();
        self.db.saw(&e);
        if db::is_disk_full(&e) {
            return ControlError::DiskFull {
                path: self.path.clone(),
                detail: e.to_string(),
            };
        }
        ControlError::Store {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn read(&self) -> Result<redb::ReadTransaction, ControlError> {
        self.db.begin_read().map_err(|e| self.err(e))
    }

    /// Runs `f` in a write transaction and commits it. If redb says it must be re-opened
    /// (an I/O error, a full disk), it is, and `f` runs once more in a new transaction: a
    /// first write after space was freed succeeds. Nothing is committed unless `f` and the
    /// commit succeed.
    fn write<T>(
        &self,
        mut f: impl FnMut(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, ControlError> {
        match self.try_write(&mut f) {
            Ok(out) => Ok(out),
            Err(e) => {
                let again = matches!(
                    e,
                    redb::Error::PreviousIo | redb::Error::Io(_) | redb::Error::DatabaseClosed
                );
                self.db.saw(&e);
                if !again {
                    return Err(self.err(e));
                }
                tracing::warn!(path = %self.path.display(), error = %e, "store write failed; re-opening the store and trying once more");
                self.try_write(&mut f).map_err(|e| self.err(e))
            }
        }
    }

    /// [`Store::write`] for work that must not run twice: no retry (the next write re-opens
    /// the store if it must be).
    fn write_once<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, ControlError> {
        let attempt = || -> Result<T, redb::Error> {
            let txn = self.db.begin_write()?;
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        };
        attempt().map_err(|e| self.err(e))
    }

    fn try_write<T>(
        &self,
        f: &mut impl FnMut(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, redb::Error> {
        let txn = self.db.begin_write()?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// How long and how many revision snapshots are kept.
    pub(crate) fn history_retention(&self) -> &HistoryRetention {
        &self.history
    }

    /// Gives space back when the file holds much more than is live (after pruning).
    fn compact_if_it_pays(&self) {
        self.db.compact_if_it_pays();
    }

    /// The current revision and every stored resource.
    pub(crate) fn resources(&self) -> Result<(u64, Vec<Resource>), ControlError> {
        let txn = self.read()?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let revision = meta
            .get("revision")
            .map_err(|e| self.err(e))?
            .map(|v| v.value())
            .unwrap_or(0);
        let table = txn.open_table(RESOURCES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, json) = row.map_err(|e| self.err(e))?;
            out.push(self.decode(key.value(), json.value())?);
        }
        Ok((revision, out))
    }

    fn decode(&self, key: &str, json: &str) -> Result<Resource, ControlError> {
        Resource::from_json(json).map_err(|e| ControlError::Store {
            path: self.path.clone(),
            message: format!("stored resource {key} is unreadable: {e}"),
        })
    }

    /// Makes `set` the current set as a new revision, recording who did it and how, with a
    /// snapshot of the set, and prunes the snapshots and log entries past their retention,
    /// in one transaction. Returns the revision and what changed per resource; nothing is
    /// written if nothing changed.
    pub(crate) fn commit(
        &self,
        set: &[Resource],
        actor: &str,
        action: &str,
        now_unix: u64,
    ) -> Result<Committed, ControlError> {
        let new: BTreeMap<String, String> = by_key(set).map_err(|message| ControlError::Store {
            path: self.path.clone(),
            message,
        })?;
        let committed = self.write(|txn| {
            let mut table = txn.open_table(RESOURCES)?;
            let mut old = BTreeMap::new();
            for row in table.iter()? {
                let (k, v) = row?;
                old.insert(k.value().to_string(), v.value().to_string());
            }
            let changes = changes(&old, &new);
            let mut meta = txn.open_table(META)?;
            let current = meta.get("revision")?.map(|v| v.value()).unwrap_or(0);
            if changes.iter().all(|(_, c)| *c == Change::Unchanged) {
                return Ok(Committed {
                    revision: current,
                    changes,
                    pruned: 0,
                });
            }
            for (key, change) in &changes {
                match change {
                    Change::Deleted => {
                        table.remove(key.as_str())?;
                    }
                    Change::Created | Change::Configured => {
                        table.insert(key.as_str(), new[key].as_str())?;
                    }
                    Change::Unchanged => {}
                }
            }
            let revision = current + 1;
            meta.insert("revision", revision)?;
            let record = RevisionRecord {
                revision,
                time_unix: now_unix,
                actor: actor.to_string(),
                action: action.to_string(),
                changes: log_lines(&changes),
                resources: Vec::new(),
            };
            // Strings and numbers: serialising them cannot fail.
            let json = serde_json::to_string(&record).unwrap_or_default();
            txn.open_table(REVISIONS)?.insert(revision, json.as_str())?;
            history::put_snapshot(txn, revision, now_unix, new.values().map(String::as_str))?;
            let pruned = history::prune_snapshots(txn, revision, now_unix, &self.history)?;
            history::prune_log(txn, now_unix)?;
            Ok(Committed {
                revision,
                changes,
                pruned,
            })
        })?;
        if committed.pruned > 0 {
            self.compact_if_it_pays();
        }
        Ok(committed)
    }

    /// The newest `limit` revisions, newest first, without their sets.
    pub(crate) fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, ControlError> {
        let txn = self.read()?;
        let table = txn.open_table(REVISIONS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))?.rev().take(limit) {
            let (_, json) = row.map_err(|e| self.err(e))?;
            if let Ok(mut rec) = serde_json::from_str::<RevisionRecord>(json.value()) {
                rec.resources.clear();
                out.push(rec);
            }
        }
        Ok(out)
    }
}

/// The changes a log entry keeps: the first [`LOG_CHANGES_PER_ENTRY`], then how many more.
fn log_lines(changes: &[(String, Change)]) -> Vec<String> {
    let changed: Vec<String> = changes
        .iter()
        .filter(|(_, c)| *c != Change::Unchanged)
        .map(|(k, c)| format!("{k} {}", c.word()))
        .collect();
    if changed.len() <= LOG_CHANGES_PER_ENTRY {
        return changed;
    }
    let more = changed.len() - LOG_CHANGES_PER_ENTRY;
    let mut kept: Vec<String> = changed.into_iter().take(LOG_CHANGES_PER_ENTRY).collect();
    kept.push(format!(
        "… and {more} more (the revision's snapshot has them all)"
    ));
    kept
}

impl Store {
    /// Checks a token, runs `issue` with its record, and spends one use only if `issue`
    /// succeeds, all in one transaction.
    pub(crate) fn redeem_token<T, E: From<TokenError>>(
        &self,
        id: &str,
        secret_hash: &str,
        now_unix: u64,
        issue: impl FnOnce(&TokenRecord) -> Result<T, E>,
    ) -> Result<Result<(TokenRecord, T), E>, ControlError> {
        self.write_once(|txn| {
            let mut table = txn.open_table(TOKENS)?;
            let record: Option<TokenRecord> = table
                .get(id)?
                .and_then(|v| serde_json::from_str(v.value()).ok());
            let (record, issued) = match crate::tokens::spend(record, secret_hash, now_unix, issue)
            {
                Ok(spent) => spent,
                Err(e) => return Ok(Err(e)),
            };
            let json = serde_json::to_string(&record).unwrap_or_default();
            table.insert(id, json.as_str())?;
            Ok(Ok((record, issued)))
        })
    }

    /// Records that `spiffe_id` may fetch the configuration of `workload`.
    pub(crate) fn bind(
        &self,
        spiffe_id: &str,
        workload: &ResourceName,
        now_unix: u64,
    ) -> Result<(), ControlError> {
        let key = format!("{spiffe_id}|{workload}");
        self.write(|txn| {
            txn.open_table(BINDINGS)?.insert(key.as_str(), now_unix)?;
            Ok(())
        })
    }

    /// Whether the store answers a read (for `/ready`): a read transaction, which never
    /// waits for a writer.
    pub(crate) fn answers(&self) -> Result<(), ControlError> {
        self.read().map(|_| ())
    }

    /// Whether any join token ever bound `spiffe_id` to a workload.
    pub(crate) fn has_identity(&self, spiffe_id: &str) -> Result<bool, ControlError> {
        let prefix = format!("{spiffe_id}|");
        let txn = self.read()?;
        let table = txn.open_table(BINDINGS).map_err(|e| self.err(e))?;
        let mut range = table.range(prefix.as_str()..).map_err(|e| self.err(e))?;
        Ok(match range.next() {
            Some(row) => row.map_err(|e| self.err(e))?.0.value().starts_with(&prefix),
            None => false,
        })
    }

    pub(crate) fn is_bound(
        &self,
        spiffe_id: &str,
        workload: &ResourceName,
    ) -> Result<bool, ControlError> {
        let key = format!("{spiffe_id}|{workload}");
        let txn = self.read()?;
        let table = txn.open_table(BINDINGS).map_err(|e| self.err(e))?;
        Ok(table.get(key.as_str()).map_err(|e| self.err(e))?.is_some())
    }
}
