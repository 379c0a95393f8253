//! The embedded store (redb in the data directory): policies with a revision counter, join
//! tokens (hashed), and which identity may fetch which workload's configuration.

use crate::error::ControlError;
use crate::tokens::{TokenError, TokenRecord, same_hash};
use bulkhead_policy::model::{Resource, ResourceName};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const POLICIES: TableDefinition<&str, &str> = TableDefinition::new("policies");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const BINDINGS: TableDefinition<&str, u64> = TableDefinition::new("bindings");

pub(crate) struct Store {
    db: Database,
    path: PathBuf,
}

/// How one resource in an apply changed the stored set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    Created,
    Configured,
    Unchanged,
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
            txn.open_table(POLICIES)?;
            txn.open_table(META)?;
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

    /// The current revision and every stored policy resource.
    pub(crate) fn policies(&self) -> Result<(u64, Vec<Resource>), ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let revision = meta
            .get("revision")
            .map_err(|e| self.err(e))?
            .map(|v| v.value())
            .unwrap_or(0);
        let table = txn.open_table(POLICIES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (key, json) = row.map_err(|e| self.err(e))?;
            let res = Resource::from_json(json.value()).map_err(|e| ControlError::Store {
                path: self.path.clone(),
                message: format!("stored resource {} is unreadable: {e}", key.value()),
            })?;
            out.push(res);
        }
        Ok((revision, out))
    }

    /// Upserts `resources` in one transaction, bumping the revision if anything changed.
    pub(crate) fn apply(
        &self,
        resources: &[Resource],
    ) -> Result<(u64, Vec<(String, Change)>), ControlError> {
        self.write(|txn| {
            let mut table = txn.open_table(POLICIES)?;
            let mut changes = Vec::with_capacity(resources.len());
            for res in resources {
                let key = res.key();
                let json = res.to_json();
                let change = match table.get(key.as_str())? {
                    None => Change::Created,
                    Some(old) if old.value() == json => Change::Unchanged,
                    Some(_) => Change::Configured,
                };
                if change != Change::Unchanged {
                    table.insert(key.as_str(), json.as_str())?;
                }
                changes.push((key, change));
            }
            let mut meta = txn.open_table(META)?;
            let current = meta.get("revision")?.map(|v| v.value()).unwrap_or(0);
            let revision = if changes.iter().any(|(_, c)| *c != Change::Unchanged) {
                current + 1
            } else {
                current
            };
            meta.insert("revision", revision)?;
            Ok((revision, changes))
        })
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
