//! Snapshots of the whole set at recent revisions, for rollback, kept apart from the
//! revision log and pruned by count and age ([`HistoryRetention`]).
//!
//! A snapshot is the list of its resources' versions; each version (one resource's JSON) is
//! stored once however many snapshots hold it, with a count of them, and goes with the last
//! snapshot that held it. So a change of one resource in a large set costs one version and
//! a list of ids, not the whole set again, and the store's size follows what changed.
//!
//! Pruning never touches the revision log, nor any audit record kept elsewhere in the store.

use super::{META, REVISIONS, RevisionRecord, SetAt, Store};
use crate::error::ControlError;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use sha2::{Digest, Sha256};
use std::time::Duration;

/// Revision → the ids of its resources' versions, as a JSON array, in key order.
const SNAPSHOTS: TableDefinition<u64, &str> = TableDefinition::new("snapshots");
/// Revision → when it was made (Unix seconds), for every snapshot kept: pruning reads this,
/// never the snapshots.
const SNAPSHOT_TIMES: TableDefinition<u64, u64> = TableDefinition::new("snapshot_times");
/// Version id (SHA-256 of the JSON, first 128 bits, hex) → one resource's JSON.
const VERSIONS: TableDefinition<&str, &str> = TableDefinition::new("resource_versions");
/// Version id → how many kept snapshots hold it.
const VERSION_REFS: TableDefinition<&str, u64> = TableDefinition::new("resource_version_refs");

/// The revision log keeps at most this many entries…
pub const LOG_MAX_ENTRIES: u64 = 10_000;
/// …and none older than this (one year): it outlives the snapshots by far.
pub const LOG_MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
/// An entry names at most this many changed resources, then says how many more there were.
pub const LOG_CHANGES_PER_ENTRY: usize = 100;

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

pub(super) fn create(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(SNAPSHOTS)?;
    txn.open_table(SNAPSHOT_TIMES)?;
    txn.open_table(VERSIONS)?;
    txn.open_table(VERSION_REFS)?;
    Ok(())
}

fn version_id(json: &str) -> String {
    Sha256::digest(json.as_bytes())[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Keeps the set `jsons` (resource JSON, in key order) as the snapshot of `revision`.
pub(super) fn put_snapshot<'a>(
    txn: &WriteTransaction,
    revision: u64,
    time_unix: u64,
    jsons: impl IntoIterator<Item = &'a str>,
) -> Result<(), redb::Error> {
    let mut versions = txn.open_table(VERSIONS)?;
    let mut refs = txn.open_table(VERSION_REFS)?;
    let mut ids = Vec::new();
    for json in jsons {
        let id = version_id(json);
        let held = refs.get(id.as_str())?.map_or(0, |v| v.value());
        if held == 0 {
            versions.insert(id.as_str(), json)?;
        }
        refs.insert(id.as_str(), held + 1)?;
        ids.push(id);
    }
    // Strings: serialising them cannot fail.
    let list = serde_json::to_string(&ids).unwrap_or_default();
    txn.open_table(SNAPSHOTS)?.insert(revision, list.as_str())?;
    txn.open_table(SNAPSHOT_TIMES)?
        .insert(revision, time_unix)?;
    Ok(())
}

/// Deletes the snapshot of `revision`, and every version no other snapshot holds.
fn drop_snapshot(txn: &WriteTransaction, revision: u64) -> Result<(), redb::Error> {
    txn.open_table(SNAPSHOT_TIMES)?.remove(revision)?;
    let list = txn
        .open_table(SNAPSHOTS)?
        .remove(revision)?
        .map(|v| v.value().to_string());
    let ids: Vec<String> = list
        .and_then(|l| serde_json::from_str(&l).ok())
        .unwrap_or_default();
    let mut versions = txn.open_table(VERSIONS)?;
    let mut refs = txn.open_table(VERSION_REFS)?;
    for id in &ids {
        let held = refs.get(id.as_str())?.map_or(0, |v| v.value());
        match held {
            0 | 1 => {
                refs.remove(id.as_str())?;
                versions.remove(id.as_str())?;
            }
            n => {
                refs.insert(id.as_str(), n - 1)?;
            }
        }
    }
    Ok(())
}

/// Deletes the snapshots past `history` (not among the newest `max_revisions`, or older
/// than `max_age`), never the one of `current`. Returns how many went.
pub(super) fn prune_snapshots(
    txn: &WriteTransaction,
    current: u64,
    now_unix: u64,
    history: &HistoryRetention,
) -> Result<u64, redb::Error> {
    let oldest_time = now_unix.saturating_sub(history.max_age.as_secs());
    let newest_kept_from = current.saturating_sub(history.max_revisions.saturating_sub(1));
    let mut doomed = Vec::new();
    for row in txn.open_table(SNAPSHOT_TIMES)?.iter()? {
        let (revision, time) = row?;
        let (revision, time) = (revision.value(), time.value());
        if revision != current && (revision < newest_kept_from || time < oldest_time) {
            doomed.push(revision);
        }
    }
    for revision in &doomed {
        drop_snapshot(txn, *revision)?;
    }
    Ok(doomed.len() as u64)
}

/// Deletes the oldest revision-log entries past [`LOG_MAX_ENTRIES`] or [`LOG_MAX_AGE`].
pub(super) fn prune_log(txn: &WriteTransaction, now_unix: u64) -> Result<(), redb::Error> {
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
        let Some(list) = table.get(revision).map_err(|e| self.err(e))? else {
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
        let ids: Vec<String> =
            serde_json::from_str(list.value()).map_err(|e| unreadable(e.to_string()))?;
        let versions = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
        let mut set = Vec::with_capacity(ids.len());
        for id in &ids {
            let json = versions
                .get(id.as_str())
                .map_err(|e| self.err(e))?
                .ok_or_else(|| unreadable(format!("resource version {id} is missing")))?;
            set.push(self.decode(&format!("in revision {revision}"), json.value())?);
        }
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

    /// How many resource versions the kept snapshots hold between them.
    #[cfg(test)]
    pub(crate) fn kept_versions(&self) -> Result<u64, ControlError> {
        let txn = self.read()?;
        let table = txn.open_table(VERSIONS).map_err(|e| self.err(e))?;
        table.len().map_err(|e| self.err(e))
    }

    /// Moves the sets out of revision entries written before snapshots were kept apart:
    /// the ones retention keeps become snapshots, the others are dropped; the entries stay
    /// in the log without them. One transaction; nothing to do on a store written since.
    pub(super) fn migrate_snapshots(&self) -> Result<(), ControlError> {
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
        let current = self.resources()?.0;
        let newest_kept_from = current.saturating_sub(self.history.max_revisions.saturating_sub(1));
        let moved = self.write(|txn| {
            let mut moved = 0u64;
            for &revision in &legacy {
                let raw = txn
                    .open_table(REVISIONS)?
                    .get(revision)?
                    .map(|v| v.value().to_string());
                let Some(raw) = raw else { continue };
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
                if revision >= newest_kept_from || revision == current {
                    put_snapshot(txn, revision, rec.time_unix, set.iter().map(String::as_str))?;
                    moved += 1;
                }
                let json = serde_json::to_string(&rec).unwrap_or_default();
                txn.open_table(REVISIONS)?.insert(revision, json.as_str())?;
            }
            let pruned = prune_snapshots(txn, current, now, &self.history)?;
            Ok((moved, pruned))
        })?;
        tracing::info!(
            revisions = legacy.len(),
            snapshots = moved.0 - moved.1,
            "kept revision snapshots apart from the revision log"
        );
        // Sets taken out of every entry leave most of an old file free.
        self.db.compact_now(0);
        Ok(())
    }
}
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::store::Committed;
    use crate::testing::TempDir;
    use bulkhead_policy::model::Resource;
    use std::path::Path;

    /// 2024-05-01 10:00 UTC.
    const T0: u64 = 1_714_557_600;
    const DAY: u64 = 24 * 3600;

    /// `n` deny policies for shop/orders (`p0`, `p1`, …), the `round`th version of each.
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
        let d = TempDir::new("store-retention");
        let store = Store::open_with(&d.path().join("state.redb"), keep(3, 10)).unwrap();
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
        let d = TempDir::new("store-current");
        let store = Store::open_with(&d.path().join("state.redb"), keep(0, 0)).unwrap();
        for round in 1..=3 {
            store.commit(&set(1, round), "alice", "apply", T0).unwrap();
        }
        assert_eq!(store.kept_snapshots().unwrap(), vec![3]);
        assert!(matches!(store.set_at(3).unwrap(), SetAt::Kept(s) if s.len() == 1));
    }

    #[test]
    fn a_resource_version_is_stored_once_however_many_snapshots_hold_it() {
        let d = TempDir::new("store-versions");
        let store = Store::open_with(&d.path().join("state.redb"), keep(10, 30)).unwrap();
        // 50 policies; each revision changes the first one only.
        let versioned = |round: usize| {
            let mut s = set(50, 0);
            s[0] = set(1, round).remove(0);
            s
        };
        for round in 1..=30 {
            let c: Committed = store
                .commit(&versioned(round), "alice", "apply", T0)
                .unwrap();
            assert_eq!(c.revision, round as u64);
        }
        // Ten snapshots kept: the 49 shared versions once, and ten of the first policy.
        assert_eq!(store.kept_versions().unwrap(), 49 + 10);
        let json = |set: &[Resource]| {
            let mut all: Vec<(String, String)> = set
                .iter()
                .map(|r| (r.key(), r.to_json().unwrap()))
                .collect();
            all.sort();
            all
        };
        match store.set_at(25).unwrap() {
            SetAt::Kept(s) => assert!(json(&s) == json(&versioned(25)), "revision 25 restored"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn revisions_written_with_their_sets_are_split_on_open() {
        let d = TempDir::new("store-legacy");
        let path = d.path().join("state.redb");
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
        let d = TempDir::new("store-bounded");
        let path = d.path().join("state.redb");
        let size = |p: &Path| std::fs::metadata(p).unwrap().len();
        // 100 policies of about 400 bytes, one of them changed in every revision.
        let one_changed = |round: usize| {
            let mut s = set(100, 0);
            s[0] = set(1, round).remove(0);
            s
        };
        let (after_100, after_300) = {
            let store = Store::open_with(&path, keep(5, 30)).unwrap();
            let mut after_100 = 0;
            for round in 1..=300 {
                store
                    .commit(&one_changed(round), "alice", "apply", T0)
                    .unwrap();
                if round == 100 {
                    after_100 = size(&path);
                }
            }
            assert_eq!(
                store.kept_snapshots().unwrap(),
                vec![296, 297, 298, 299, 300]
            );
            assert_eq!(store.kept_versions().unwrap(), 99 + 5);
            (after_100, size(&path))
        };
        assert_eq!(
            after_300, after_100,
            "pruned, the file stops growing: {after_100} then {after_300} bytes"
        );

        // Kept unpruned, the file grows (past 32 MiB); pruned later, compaction gives the
        // space back.
        let big = d.path().join("big.redb");
        {
            let store = Store::open_with(&big, keep(1000, 30)).unwrap();
            for round in 1..=300 {
                store
                    .commit(&set(100, round), "alice", "apply", T0)
                    .unwrap();
            }
        }
        let grown = size(&big);
        assert!(
            grown > 32 * 1024 * 1024,
            "{grown} bytes unpruned, {after_300} pruned"
        );
        let store = Store::open_with(&big, keep(2, 30)).unwrap();
        // The commit that prunes the file to a fraction of itself compacts it (it is over
        // 32 MiB and over twice what it holds).
        store.commit(&set(100, 301), "alice", "apply", T0).unwrap();
        let compacted = size(&big);
        assert!(compacted < grown / 3, "{compacted} of {grown} bytes");
        assert!(matches!(store.set_at(300).unwrap(), SetAt::Kept(_)));
        assert!(!store.db.compact_now(0), "nothing more to give back");
    }

    #[test]
    fn a_full_disk_is_named_and_makes_the_next_transaction_reopen() {
        let full = redb::Error::Io(std::io::Error::from_raw_os_error(28));
        assert!(crate::store::db::is_disk_full(&full));
        assert!(!crate::store::db::is_disk_full(&redb::Error::PreviousIo));
        let d = TempDir::new("store-full");
        let store = Store::open(&d.path().join("state.redb")).unwrap();
        let err = store.err(full);
        assert!(matches!(err, ControlError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("is full"), "{err}");
        // The store re-opens before its next transaction and works on.
        store.commit(&set(1, 1), "alice", "apply", T0).unwrap();
        assert_eq!(store.resources().unwrap().0, 1);
    }
}
