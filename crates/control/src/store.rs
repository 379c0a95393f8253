//! The embedded store (redb in the data directory): the current resources, every revision
//! of the set with who made it and when (the audit log, and what rollback restores), join
//! tokens (hashed), and which identity may fetch which workload's configuration.
//!
//! Each revision keeps the whole set, so a rollback restores it exactly. That costs the size
//! of the set per change; pruning old revisions is future work.

use crate::error::ControlError;
use crate::tokens::{TokenError, TokenRecord, same_hash};
use bulkhead_policy::model::{Resource, ResourceName};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const RESOURCES: TableDefinition<&str, &str> = TableDefinition::new("resources");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISIONS: TableDefinition<u64, &str> = TableDefinition::new("revisions");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const BINDINGS: TableDefinition<&str, u64> = TableDefinition::new("bindings");

pub(crate) struct Store {
    db: Database,
    path: PathBuf,
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

/// One entry of the audit log: a revision of the set, who made it, when and how.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RevisionRecord {
    pub revision: u64,
    pub time_unix: u64,
    pub actor: String,
    pub action: String,
    pub changes: Vec<String>,
    /// The whole set at this revision, as resource JSON.
    pub resources: Vec<String>,
}

impl Store {
    pub(crate) fn open(path: &Path) -> Result<Store, ControlError> {
        let err = |e: redb::Error| ControlError::Store {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        store.write(|txn| {
            txn.open_table(RESOURCES)?;
            txn.open_table(META)?;
            txn.open_table(REVISIONS)?;
            txn.open_table(TOKENS)?;
            txn.open_table(BINDINGS)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, e: impl Into<redb::Error>) -> ControlError {
        ControlError::Store {
            path: self.path.clone(),
            message: e.into().to_string(),
        }
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, ControlError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    /// The current revision and every stored resource.
    pub(crate) fn resources(&self) -> Result<(u64, Vec<Resource>), ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
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

    /// Makes `set` the current set as a new revision, recording who did it and how, in one
    /// transaction. Returns the revision and what changed per resource; nothing is written
    /// if nothing changed.
    pub(crate) fn commit(
        &self,
        set: &[Resource],
        actor: &str,
        action: &str,
        now_unix: u64,
    ) -> Result<(u64, Vec<(String, Change)>), ControlError> {
        let new: BTreeMap<String, String> = set
            .iter()
            .map(|r| r.to_json().map(|j| (r.key(), j)))
            .collect::<Result<_, _>>()
            .map_err(|message| ControlError::Store {
                path: self.path.clone(),
                message,
            })?;
        self.write(|txn| {
            let mut table = txn.open_table(RESOURCES)?;
            let mut old = BTreeMap::new();
            for row in table.iter()? {
                let (k, v) = row?;
                old.insert(k.value().to_string(), v.value().to_string());
            }
            let mut changes = Vec::new();
            for (key, json) in &new {
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
            let mut meta = txn.open_table(META)?;
            let current = meta.get("revision")?.map(|v| v.value()).unwrap_or(0);
            if changes.iter().all(|(_, c)| *c == Change::Unchanged) {
                return Ok((current, changes));
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
                changes: changes
                    .iter()
                    .filter(|(_, c)| *c != Change::Unchanged)
                    .map(|(k, c)| format!("{k} {}", c.word()))
                    .collect(),
                resources: new.values().cloned().collect(),
            };
            let json = serde_json::to_string(&record).unwrap_or_default();
            txn.open_table(REVISIONS)?.insert(revision, json.as_str())?;
            Ok((revision, changes))
        })
    }

    /// The newest `limit` revisions, newest first, without their sets.
    pub(crate) fn history(&self, limit: usize) -> Result<Vec<RevisionRecord>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
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

    /// The whole set as it was at `revision` (0 is the empty set before the first change).
    pub(crate) fn set_at(&self, revision: u64) -> Result<Option<Vec<Resource>>, ControlError> {
        if revision == 0 {
            return Ok(Some(Vec::new()));
        }
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(REVISIONS).map_err(|e| self.err(e))?;
        let Some(json) = table.get(revision).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let rec: RevisionRecord =
            serde_json::from_str(json.value()).map_err(|e| ControlError::Store {
                path: self.path.clone(),
                message: format!("revision {revision} is unreadable: {e}"),
            })?;
        let set = rec
            .resources
            .iter()
            .map(|j| self.decode(&format!("in revision {revision}"), j))
            .collect::<Result<_, _>>()?;
        Ok(Some(set))
    }

    pub(crate) fn insert_token(&self, id: &str, record: &TokenRecord) -> Result<(), ControlError> {
        let json = serde_json::to_string(record).unwrap_or_default();
        self.write(|txn| {
            txn.open_table(TOKENS)?.insert(id, json.as_str())?;
            Ok(())
        })
    }

    /// Checks a token, runs `issue` with its record, and spends one use only if `issue`
    /// succeeds, all in one transaction.
    pub(crate) fn redeem_token<T, E: From<TokenError>>(
        &self,
        id: &str,
        secret_hash: &str,
        now_unix: u64,
        issue: impl FnOnce(&TokenRecord) -> Result<T, E>,
    ) -> Result<Result<(TokenRecord, T), E>, ControlError> {
        self.write(|txn| {
            let mut table = txn.open_table(TOKENS)?;
            let record: Option<TokenRecord> = table
                .get(id)?
                .and_then(|v| serde_json::from_str(v.value()).ok());
            let mut record = match record {
                Some(r) if same_hash(&r.secret_sha256, secret_hash) => r,
                _ => return Ok(Err(TokenError::Unknown.into())),
            };
            if now_unix >= record.expires_unix {
                return Ok(Err(TokenError::Expired.into()));
            }
            if record.uses_left == 0 {
                return Ok(Err(TokenError::UsedUp.into()));
            }
            let issued = match issue(&record) {
                Ok(t) => t,
                Err(e) => return Ok(Err(e)),
            };
            record.uses_left -= 1;
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

    /// Whether any join token ever bound `spiffe_id` to a workload.
    pub(crate) fn has_identity(&self, spiffe_id: &str) -> Result<bool, ControlError> {
        let prefix = format!("{spiffe_id}|");
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
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
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(BINDINGS).map_err(|e| self.err(e))?;
        Ok(table.get(key.as_str()).map_err(|e| self.err(e))?.is_some())
    }
}
