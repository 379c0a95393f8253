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
pub(crate) mod events;

pub(crate) use edges::EdgesWritten;
pub(crate) use events::EventRetention;

use crate::error::ControlError;
use crate::tokens::{TokenError, TokenRecord, same_hash};
use bulkhead_policy::model::{Resource, ResourceName};

use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

const RESOURCES: TableDefinition<&str, &str> = TableDefinition::new("resources");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Revision → JSON of its [`RevisionRecord`] (who, when, what changed; no set).
const REVISIONS: TableDefinition<u64, &str> = TableDefinition::new("revisions");
/// Revision → the whole set at that revision, as a JSON array of resource JSON strings.
const SNAPSHOTS: TableDefinition<u64, &str> = TableDefinition::new("snapshots");
/// Revision → when it was made (Unix seconds), for every snapshot kept: pruning reads this,
/// never the sets.
const SNAPSHOT_TIMES: TableDefinition<u64, u64> = TableDefinition::new("snapshot_times");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const BINDINGS: TableDefinition<&str, u64> = TableDefinition::new("bindings");

/// The revision log keeps at most this many entries…
pub const LOG_MAX_ENTRIES: u64 = 10_000;
/// …and none older than this (one year): it outlives the snapshots by far.
pub const LOG_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);

/// How many snapshots of the whole set are kept for rollback, and how long. A snapshot goes
/// when it is not among the newest `max_revisions` or is older than `max_age`; the current
/// revision's snapshot always stays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRetention {
    pub max_revisions: u64,
    pub max_age: Duration,
}

impl Default for HistoryRetention {
    fn default() -> HistoryRetention {
        HistoryRetention {
            max_revisions: 100,
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

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
            txn.open_table(SNAPSHOTS)?;
            txn.open_table(SNAPSHOT_TIMES)?;
            txn.open_table(TOKENS)?;
            txn.open_table(BINDINGS)?;
            edges::create(txn)?;
            events::create(txn)?;
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
        let new: BTreeMap<String, String> = set
            .iter()
            .map(|r| r.to_json().map(|j| (r.key(), j)))
            .collect::<Result<_, _>>()
            .map_err(|message| ControlError::Store {
                path: self.path.clone(),
                message,
            })?;
        // The set as JSON strings, as every snapshot stores it: strings, so this cannot fail.
        let snapshot = serde_json::to_string(&new.values().collect::<Vec<_>>()).unwrap_or_default();
        let committed = self.write(|txn| {
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
                changes: changes
                    .iter()
                    .filter(|(_, c)| *c != Change::Unchanged)
                    .map(|(k, c)| format!("{k} {}", c.word()))
                    .collect(),
                resources: Vec::new(),
            };
            // Strings and numbers: serialising them cannot fail.
            let json = serde_json::to_string(&record).unwrap_or_default();
            txn.open_table(REVISIONS)?.insert(revision, json.as_str())?;
            txn.open_table(SNAPSHOTS)?
                .insert(revision, snapshot.as_str())?;
            txn.open_table(SNAPSHOT_TIMES)?.insert(revision, now_unix)?;
            let pruned = prune_snapshots(txn, revision, now_unix, &self.history)?;
            prune_log(txn, now_unix)?;
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

    /// The whole set as it was at `revision` (0 is the empty set before the first change),
    /// if its snapshot is still kept.
    pub(crate) fn set_at(&self, revision: u64) -> Result<SetAt, ControlError> {
        if revision == 0 {
            return Ok(SetAt::Kept(Vec::new()));
        }
        let txn = self.read()?;
        let current = txn
            .open_table(META)
            .map_err(|e| self.err(e))?
            .get("revision")
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value());
        if revision > current {
            return Ok(SetAt::Missing);
        }
        let table = txn.open_table(SNAPSHOTS).map_err(|e| self.err(e))?;
        let Some(json) = table.get(revision).map_err(|e| self.err(e))? else {
            let oldest_kept = table
                .first()
                .map_err(|e| self.err(e))?
                .map_or(current, |(k, _)| k.value());
            return Ok(SetAt::Pruned { oldest_kept });
        };
        let unreadable = |e: String| ControlError::Store {
            path: self.path.clone(),
            message: format!("the snapshot of revision {revision} is unreadable: {e}"),
        };
        let resources: Vec<String> =
            serde_json::from_str(json.value()).map_err(|e| unreadable(e.to_string()))?;
        let set = resources
            .iter()
            .map(|j| self.decode(&format!("in revision {revision}"), j))
            .collect::<Result<_, _>>()?;
        Ok(SetAt::Kept(set))
    }

    /// The revisions whose snapshots are kept, oldest first.
    #[cfg(test)]
    pub(crate) fn kept_snapshots(&self) -> Result<Vec<u64>, ControlError> {
        let txn = self.read()?;
        let table = txn.open_table(SNAPSHOT_TIMES).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            out.push(row.map_err(|e| self.err(e))?.0.value());
        }
        Ok(out)
    }

    /// Moves the sets out of revision entries written before snapshots were kept apart:
    /// the ones retention keeps become snapshots, the others are dropped; the entries stay
    /// in the log without them. One transaction; nothing to do on a store written since.
    fn migrate_snapshots(&self) -> Result<(), ControlError> {
        let legacy: Vec<u64> = {
            let txn = self.read()?;
            let table = txn.open_table(REVISIONS).map_err(|e| self.err(e))?;
            let mut out = Vec::new();
            for row in table.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                if v.value().contains("\"resources\"") {
                    out.push(k.value());
                }
            }
            out
        };
        if legacy.is_empty() {
            return Ok(());
        }
        let now = crate::proxies::unix_now();
        let moved = self.write(|txn| {
            let mut revisions = txn.open_table(REVISIONS)?;
            let mut snapshots = txn.open_table(SNAPSHOTS)?;
            let mut times = txn.open_table(SNAPSHOT_TIMES)?;
            let mut moved = 0u64;
            for &revision in &legacy {
                let Some(raw) = revisions.get(revision)?.map(|v| v.value().to_string()) else {
                    continue;
                };
                // Only an entry that holds the field carries a set (which may be empty).
                let holds_set = serde_json::from_str::<serde_json::Value>(&raw)
                    .is_ok_and(|v| v.get("resources").is_some());
                let Some(mut rec) = serde_json::from_str::<RevisionRecord>(&raw)
                    .ok()
                    .filter(|_| holds_set)
                else {
                    continue;
                };
                let set = std::mem::take(&mut rec.resources);
                let json = serde_json::to_string(&set).unwrap_or_default();
                snapshots.insert(revision, json.as_str())?;
                times.insert(revision, rec.time_unix)?;
                let json = serde_json::to_string(&rec).unwrap_or_default();
                revisions.insert(revision, json.as_str())?;
                moved += 1;
            }
            drop((revisions, snapshots, times));
            let current = txn
                .open_table(META)?
                .get("revision")?
                .map_or(0, |v| v.value());
            let pruned = prune_snapshots(txn, current, now, &self.history)?;
            Ok((moved, pruned))
        })?;
        tracing::info!(
            revisions = moved.0,
            pruned = moved.1,
            "kept revision snapshots apart from the revision log"
        );
        // Sets taken out of every entry leave most of an old file free.
        self.db.compact_now(0);
        Ok(())
    }
}

/// Deletes the snapshots past `history` (not among the newest `max_revisions`, or older
/// than `max_age`), never the one of `current`. Returns how many went.
fn prune_snapshots(
    txn: &redb::WriteTransaction,
    current: u64,
    now_unix: u64,
    history: &HistoryRetention,
) -> Result<u64, redb::Error> {
    let oldest_time = now_unix.saturating_sub(history.max_age.as_secs());
    let newest_kept_from = current.saturating_sub(history.max_revisions.saturating_sub(1));
    let mut times = txn.open_table(SNAPSHOT_TIMES)?;
    let mut doomed = Vec::new();
    for row in times.iter()? {
        let (revision, time) = row?;
        let (revision, time) = (revision.value(), time.value());
        if revision != current && (revision < newest_kept_from || time < oldest_time) {
            doomed.push(revision);
        }
    }
    let mut snapshots = txn.open_table(SNAPSHOTS)?;
    for revision in &doomed {
        times.remove(revision)?;
        snapshots.remove(revision)?;
    }
    Ok(doomed.len() as u64)
}

/// Deletes the oldest revision-log entries past [`LOG_MAX_ENTRIES`] or [`LOG_MAX_AGE`].
fn prune_log(txn: &redb::WriteTransaction, now_unix: u64) -> Result<(), redb::Error> {
    let oldest_time = now_unix.saturating_sub(LOG_MAX_AGE.as_secs());
    let mut log = txn.open_table(REVISIONS)?;
    loop {
        let too_old = match log.first()? {
            Some((_, json)) => serde_json::from_str::<RevisionRecord>(json.value())
                .map_or(true, |r| r.time_unix < oldest_time),
            None => break,
        };
        if !too_old && log.len()? <= LOG_MAX_ENTRIES {
            break;
        }
        log.pop_first()?;
    }
    Ok(())
}

impl Store {
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
        self.write_once(|txn| {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// 2024-05-01 10:00 UTC.
    const T0: u64 = 1_714_557_600;
    const DAY: u64 = 24 * 3600;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-store-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    /// `n` deny policies for shop/orders, the `round`th version of each.
    fn set(n: usize, round: usize) -> Vec<Resource> {
        let mut yaml = String::new();
        for i in 0..n {
            yaml.push_str(&format!(
                "---\napiVersion: bulkhead.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: p{i}, namespace: shop}}\nspec:\n  selector: {{workload: orders}}\n  action: deny\n  rules:\n    - name: r\n      to: {{paths: [\"/blocked/{i}/{round}/{}\"]}}\n",
                "x".repeat(200)
            ));
        }
        bulkhead_policy::parse_documents("test.yaml", &yaml).unwrap()
    }

    fn keep(max_revisions: u64, max_age_days: u64) -> HistoryRetention {
        HistoryRetention {
            max_revisions,
            max_age: Duration::from_secs(max_age_days * DAY),
        }
    }

    #[test]
    fn snapshots_are_kept_by_count_and_age_and_the_log_outlives_them() {
        let d = dir("retention");
        let store = Store::open_with(&d.0.join("state.redb"), keep(3, 10)).unwrap();
        for round in 1..=6 {
            let c = store
                .commit(&set(2, round), "alice", "apply", T0 + round as u64)
                .unwrap();
            assert_eq!(c.revision, round as u64);
        }
        assert_eq!(store.kept_snapshots().unwrap(), vec![4, 5, 6]);
        assert!(matches!(
            store.set_at(2).unwrap(),
            SetAt::Pruned { oldest_kept: 4 }
        ));
        assert!(matches!(store.set_at(7).unwrap(), SetAt::Missing));
        assert!(matches!(store.set_at(0).unwrap(), SetAt::Kept(s) if s.is_empty()));
        match store.set_at(5).unwrap() {
            SetAt::Kept(s) => assert_eq!(
                s.iter().map(|r| r.to_json().unwrap()).collect::<Vec<_>>(),
                set(2, 5)
                    .iter()
                    .map(|r| r.to_json().unwrap())
                    .collect::<Vec<_>>()
            ),
            other => panic!("{other:?}"),
        }
        // Who changed what is still there for every revision.
        let log = store.history(100).unwrap();
        assert_eq!(log.len(), 6);
        assert_eq!(log[5].changes.len(), 2);

        // Twenty days on, the older snapshots are past their age; the new one stays.
        store
            .commit(&set(2, 7), "bob", "apply", T0 + 20 * DAY)
            .unwrap();
        assert_eq!(store.kept_snapshots().unwrap(), vec![7]);
        // An unchanged set makes no revision and prunes nothing.
        let c = store
            .commit(&set(2, 7), "bob", "apply", T0 + 21 * DAY)
            .unwrap();
        assert_eq!((c.revision, c.pruned), (7, 0));
    }

    #[test]
    fn the_current_revision_is_always_kept() {
        let d = dir("current");
        let store = Store::open_with(&d.0.join("state.redb"), keep(0, 0)).unwrap();
        for round in 1..=3 {
            store.commit(&set(1, round), "alice", "apply", T0).unwrap();
        }
        assert_eq!(store.kept_snapshots().unwrap(), vec![3]);
        assert!(matches!(store.set_at(3).unwrap(), SetAt::Kept(s) if s.len() == 1));
    }

    #[test]
    fn revisions_written_with_their_sets_are_split_on_open() {
        let d = dir("legacy");
        let path = d.0.join("state.redb");
        {
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut revisions = txn.open_table(REVISIONS).unwrap();
                for revision in 1..=4u64 {
                    let resources: Vec<String> = set(1, revision as usize)
                        .iter()
                        .map(|r| r.to_json().unwrap())
                        .collect();
                    let json = serde_json::json!({
                        "revision": revision, "time_unix": crate::proxies::unix_now(),
                        "actor": "alice", "action": "apply", "changes": ["x configured"],
                        "resources": resources,
                    });
                    revisions
                        .insert(revision, json.to_string().as_str())
                        .unwrap();
                }
                txn.open_table(META).unwrap().insert("revision", 4).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open_with(&path, keep(2, 30)).unwrap();
        assert_eq!(store.kept_snapshots().unwrap(), vec![3, 4]);
        assert!(matches!(
            store.set_at(1).unwrap(),
            SetAt::Pruned { oldest_kept: 3 }
        ));
        assert!(matches!(store.set_at(3).unwrap(), SetAt::Kept(s) if s.len() == 1));
        let log = store.history(10).unwrap();
        assert_eq!(log.len(), 4, "the log keeps every entry");
        // The sets left the log entries: opening again finds nothing to move.
        drop(store);
        let store = Store::open_with(&path, keep(2, 30)).unwrap();
        assert_eq!(store.kept_snapshots().unwrap(), vec![3, 4]);
    }

    #[test]
    fn many_revisions_of_a_large_set_leave_the_file_bounded_and_compaction_gives_space_back() {
        let d = dir("bounded");
        let path = d.0.join("state.redb");
        let size = || std::fs::metadata(&path).unwrap().len();
        // 100 policies of about 500 bytes: a 50 KB set.
        {
            let store = Store::open_with(&path, keep(5, 30)).unwrap();
            for round in 1..=200 {
                store
                    .commit(&set(100, round), "alice", "apply", T0)
                    .unwrap();
            }
            assert_eq!(
                store.kept_snapshots().unwrap(),
                vec![196, 197, 198, 199, 200]
            );
        }
        let bounded = size();
        // Unpruned, 200 snapshots would be over 10 MB; pruned, the file holds a few.
        assert!(bounded < 4 * 1024 * 1024, "{bounded} bytes");

        // Kept unpruned, the file grows; pruned later, compaction gives the space back.
        let big = d.0.join("big.redb");
        {
            let store = Store::open_with(&big, keep(1000, 30)).unwrap();
            for round in 1..=200 {
                store
                    .commit(&set(100, round), "alice", "apply", T0)
                    .unwrap();
            }
        }
        let grown = std::fs::metadata(&big).unwrap().len();
        assert!(grown > 8 * 1024 * 1024, "{grown} bytes");
        let store = Store::open_with(&big, keep(2, 30)).unwrap();
        store.commit(&set(100, 201), "alice", "apply", T0).unwrap();
        assert!(
            store.db.compact_now(0),
            "over twice what it holds: it compacts"
        );
        let compacted = std::fs::metadata(&big).unwrap().len();
        assert!(compacted < grown / 4, "{compacted} of {grown} bytes");
        assert!(matches!(store.set_at(200).unwrap(), SetAt::Kept(_)));
        assert!(!store.db.compact_now(0), "nothing more to give back");
    }

    #[test]
    fn a_full_disk_is_named_and_makes_the_next_transaction_reopen() {
        let full = redb::Error::Io(std::io::Error::from_raw_os_error(28));
        assert!(db::is_disk_full(&full));
        assert!(!db::is_disk_full(&redb::Error::PreviousIo));
        let d = dir("full");
        let store = Store::open(&d.0.join("state.redb")).unwrap();
        let err = store.err(full);
        assert!(matches!(err, ControlError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("is full"), "{err}");
        // The store re-opens before its next transaction and works on.
        store.commit(&set(1, 1), "alice", "apply", T0).unwrap();
        assert_eq!(store.resources().unwrap().0, 1);
    }
}
