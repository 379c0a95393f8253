//! The embedded store (redb in the data directory): the current resources, every revision
//! of the set with who made it and when (the audit log, and what rollback restores), join
//! tokens (hashed), which identity may fetch which workload's configuration, and the traffic
//! edges proxies report, per hour (bounded by a retention window and a row count), and the
//! anomalies found in them (`events`, bounded the same way).
//!
//! Each revision keeps the whole set, so a rollback restores it exactly. That costs the size
//! of the set per change; pruning old revisions is future work.

use crate::error::ControlError;
use crate::flows::{BUCKET_SECS, FlowRetention, MAX_CLOCK_SKEW_SECS, bucket_of};
use crate::tokens::{TokenError, TokenRecord, same_hash};
use bulkhead_insight::events::Event;
use bulkhead_insight::{Edge, EdgeKey, EdgeStats};
use bulkhead_policy::model::{Resource, ResourceName};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// Issue 13: the audit log of credential changes, proxy instances and revocations.
mod audit;
mod trust;
pub(crate) use audit::{AuditEntry, NewEntry};
pub(crate) use trust::{
    EXPIRY_SLACK_SECS, Instance, IssueRefusal, IssuedCert, Revocation, RevocationKind,
    RevokeError, RevokeOrder,
};

const RESOURCES: TableDefinition<&str, &str> = TableDefinition::new("resources");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISIONS: TableDefinition<u64, &str> = TableDefinition::new("revisions");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");
const BINDINGS: TableDefinition<&str, u64> = TableDefinition::new("bindings");
/// (start of the hour of `last_seen`, JSON of the `EdgeKey`) → JSON of the `EdgeStats`.
const EDGES: TableDefinition<(u64, &str), &str> = TableDefinition::new("edges");
/// Sequence number → JSON of an anomaly `Event`.
const EVENTS: TableDefinition<u64, &str> = TableDefinition::new("events");
/// In META: the last event sequence number given out (kept when its row is deleted, so
/// numbers are never reused), and when the first flow report was stored.
const EVENT_SEQ: &str = "event_seq";
const LEARNING_START: &str = "anomaly_learning_start";

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

/// What one report did to the stored edges.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct EdgesWritten {
    /// Edges merged into the row of their key and hour.
    pub stored: u64,
    /// Edges not stored because their hour is outside the retention window: older than it,
    /// or ahead of this clock by more than the allowed skew.
    pub outside_window: u64,
    /// Rows deleted because their hour left the retention window.
    pub expired: u64,
    /// Rows deleted, oldest hours first, to stay within the row bound.
    pub evicted: u64,
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
            txn.open_table(EDGES)?;
            txn.open_table(EVENTS)?;
            trust::create_tables(txn)?;
            audit::create_table(txn)?;
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

impl Store {
    /// Merges `edges` into their hour buckets (the hour of each edge's `last_seen`), then
    /// deletes the hours past the retention window and, while there are more rows than the
    /// bound, the oldest hours. One transaction.
    pub(crate) fn merge_edges(
        &self,
        edges: &[Edge],
        now_unix: u64,
        retention: &FlowRetention,
    ) -> Result<EdgesWritten, ControlError> {
        let oldest = retention.oldest_bucket(now_unix);
        let newest = bucket_of(now_unix.saturating_add(MAX_CLOCK_SKEW_SECS));
        let mut written = EdgesWritten::default();
        // Equal keys within one report become one row update.
        let mut rows: BTreeMap<(u64, String), EdgeStats> = BTreeMap::new();
        for edge in edges {
            let bucket = bucket_of(edge.stats.last_seen);
            if bucket < oldest || bucket > newest {
                written.outside_window += 1;
                continue;
            }
            let key = serde_json::to_string(&edge.key).map_err(|e| ControlError::Store {
                path: self.path.clone(),
                message: format!("cannot encode an edge key: {e}"),
            })?;
            rows.entry((bucket, key)).or_default().merge(&edge.stats);
            written.stored += 1;
        }
        self.write(|txn| {
            let mut table = txn.open_table(EDGES)?;
            for ((bucket, key), stats) in &rows {
                if stats.count == 0 {
                    continue;
                }
                let mut merged = table
                    .get((*bucket, key.as_str()))?
                    .and_then(|v| serde_json::from_str::<EdgeStats>(v.value()).ok())
                    .unwrap_or_default();
                merged.merge(stats);
                // Plain numbers: serialising them cannot fail.
                let json = serde_json::to_string(&merged).unwrap_or_default();
                table.insert((*bucket, key.as_str()), json.as_str())?;
            }

            let before = table.len()?;
            table.retain_in((0, "")..(oldest, ""), |_, _| false)?;
            let mut len = table.len()?;
            written.expired = before - len;

            while len > retention.max_rows {
                let Some(first) = table.first()?.map(|(k, _)| k.value().0) else {
                    break;
                };
                let last = table.last()?.map(|(k, _)| k.value().0).unwrap_or(first);
                if first < last {
                    table.retain_in((first, "")..(first + BUCKET_SECS, ""), |_, _| false)?;
                } else {
                    // One hour alone is over the bound: trim it, in key order.
                    while table.len()? > retention.max_rows {
                        table.pop_first()?;
                    }
                }
                let now = table.len()?;
                written.evicted += len - now;
                len = now;
            }
            Ok(written)
        })
    }

    /// Every stored edge in the hours from the one `from_unix` falls in on, with equal keys
    /// merged across hours; sorted by key.
    pub(crate) fn edges_since(&self, from_unix: u64) -> Result<Vec<Edge>, ControlError> {
        let mut edges = Vec::new();
        self.each_edge_row(from_unix, |_, edge| edges.push(edge))?;
        Ok(bulkhead_insight::merge_edges(edges))
    }

    /// Calls `f` with every readable stored row (one edge key in one hour: the hour's
    /// start, and the edge) in the hours from the one `from_unix` falls in on, oldest first.
    pub(crate) fn each_edge_row(
        &self,
        from_unix: u64,
        mut f: impl FnMut(u64, Edge),
    ) -> Result<(), ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(EDGES).map_err(|e| self.err(e))?;
        let range = table
            .range((bucket_of(from_unix), "")..)
            .map_err(|e| self.err(e))?;
        for row in range {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (bucket, key) = k.value();
            let decoded = serde_json::from_str::<EdgeKey>(key).and_then(|key| {
                serde_json::from_str::<EdgeStats>(v.value()).map(|stats| Edge { key, stats })
            });
            match decoded {
                Ok(edge) => f(bucket, edge),
                Err(e) => {
                    tracing::warn!(bucket, error = %e, "skipping an unreadable stored edge")
                }
            }
        }
        Ok(())
    }
}

/// How long anomaly events are kept, and how many at most.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EventRetention {
    pub window_secs: u64,
    pub max_rows: u64,
}

/// A page of stored events.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct EventPage {
    pub events: Vec<Event>,
    /// Where a follower continues from: the last event of the page if the page was cut
    /// short by its limit, else the last sequence number given out.
    pub last: u64,
}

impl Store {
    /// When the first flow report was stored, if one was.
    pub(crate) fn learning_start(&self) -> Result<Option<u64>, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let start = meta.get(LEARNING_START).map_err(|e| self.err(e))?;
        Ok(start.map(|v| v.value()))
    }

    /// Records when the first flow report was stored, unless that is already recorded.
    pub(crate) fn set_learning_start(&self, unix: u64) -> Result<(), ControlError> {
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            if meta.get(LEARNING_START)?.is_none() {
                meta.insert(LEARNING_START, unix)?;
            }
            Ok(())
        })
    }

    /// Numbers and stores `events`, then deletes the oldest past the retention window and
    /// the row bound. One transaction. Returns the events with their sequence numbers.
    pub(crate) fn append_events(
        &self,
        mut events: Vec<Event>,
        now_unix: u64,
        retention: &EventRetention,
    ) -> Result<Vec<Event>, ControlError> {
        let oldest = now_unix.saturating_sub(retention.window_secs);
        self.write(|txn| {
            let mut meta = txn.open_table(META)?;
            let mut seq = meta.get(EVENT_SEQ)?.map(|v| v.value()).unwrap_or(0);
            let mut table = txn.open_table(EVENTS)?;
            for event in &mut events {
                seq += 1;
                event.seq = seq;
                // Strings and numbers: serialising them cannot fail.
                let json = serde_json::to_string(&*event).unwrap_or_default();
                table.insert(seq, json.as_str())?;
            }
            meta.insert(EVENT_SEQ, seq)?;
            // Sequence numbers follow arrival time, so the old ones come first.
            loop {
                // An unreadable row is of no use to anyone: it goes too.
                let expired = match table.first()? {
                    Some((_, json)) => {
                        serde_json::from_str::<Event>(json.value()).map_or(true, |e| e.at < oldest)
                    }
                    None => break,
                };
                if !expired && table.len()? <= retention.max_rows {
                    break;
                }
                table.pop_first()?;
            }
            Ok(events)
        })
    }

    /// Up to `limit` events numbered above `after` and from `since` on, oldest first.
    pub(crate) fn events(
        &self,
        after: u64,
        since: u64,
        limit: usize,
    ) -> Result<EventPage, ControlError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let last_given = meta
            .get(EVENT_SEQ)
            .map_err(|e| self.err(e))?
            .map_or(0, |v| v.value());
        let table = txn.open_table(EVENTS).map_err(|e| self.err(e))?;
        let mut page = EventPage {
            events: Vec::new(),
            last: last_given.max(after),
        };
        let range = table
            .range(after.saturating_add(1)..)
            .map_err(|e| self.err(e))?;
        for row in range {
            let (seq, json) = row.map_err(|e| self.err(e))?;
            if page.events.len() >= limit {
                page.last = page.events.last().map_or(after, |e| e.seq);
                break;
            }
            match serde_json::from_str::<Event>(json.value()) {
                Ok(event) if event.at >= since => page.events.push(event),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(seq = seq.value(), error = %e, "skipping an unreadable stored event")
                }
            }
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::flows::tests::edge;
    use bulkhead_policy::model::Direction::{Egress, Ingress};
    use std::time::Duration;

    /// 2024-05-01 10:00 UTC: the start of an hour.
    const T0: u64 = 1_714_557_600;
    const H: u64 = 3600;

    struct TempStore {
        store: Store,
        dir: PathBuf,
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn temp_store(name: &str) -> TempStore {
        let dir = std::env::temp_dir().join(format!(
            "bulkhead-store-{name}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("state.redb")).unwrap();
        TempStore { store, dir }
    }

    fn retention(window_hours: u64, max_rows: u64) -> FlowRetention {
        FlowRetention {
            window: Duration::from_secs(window_hours * H),
            max_rows,
        }
    }

    /// `(hour, path, count)` of every stored row, in key order.
    fn rows(store: &Store) -> Vec<(u64, String, u64)> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(EDGES).unwrap();
        table
            .iter()
            .unwrap()
            .map(|row| {
                let (k, v) = row.unwrap();
                let (hour, key) = k.value();
                let key: EdgeKey = serde_json::from_str(key).unwrap();
                let stats: EdgeStats = serde_json::from_str(v.value()).unwrap();
                (hour, key.path.unwrap(), stats.count)
            })
            .collect()
    }

    fn counts(edges: &[Edge]) -> Vec<(&str, u64)> {
        edges
            .iter()
            .map(|e| (e.key.path.as_deref().unwrap(), e.stats.count))
            .collect()
    }

    #[test]
    fn reports_of_one_edge_merge_into_one_row() {
        let t = temp_store("merge");
        let keep = retention(24, 1000);
        let first = t
            .store
            .merge_edges(
                &[
                    edge("frontend", "orders", Ingress, "/a", T0 + 10),
                    edge("frontend", "orders", Ingress, "/a", T0 + 20),
                ],
                T0 + 30,
                &keep,
            )
            .unwrap();
        assert_eq!(first.stored, 2);
        let second = t
            .store
            .merge_edges(
                &[
                    edge("frontend", "orders", Ingress, "/a", T0 + 40),
                    edge("frontend", "orders", Ingress, "/b", T0 + 50),
                ],
                T0 + 60,
                &keep,
            )
            .unwrap();
        assert_eq!(second.stored, 2);
        assert_eq!(
            rows(&t.store),
            vec![(T0, "/a".into(), 3), (T0, "/b".into(), 1)]
        );
        let edges = t.store.edges_since(0).unwrap();
        assert_eq!(counts(&edges), vec![("/a", 3), ("/b", 1)]);
        assert_eq!(edges[0].stats.first_seen, T0 + 10);
        assert_eq!(edges[0].stats.last_seen, T0 + 40);
        assert_eq!(edges[0].stats.bytes_in, 30);
    }

    #[test]
    fn edges_are_kept_per_hour_and_since_picks_hours() {
        let t = temp_store("hours");
        let keep = retention(24, 1000);
        t.store
            .merge_edges(
                &[
                    edge("frontend", "orders", Ingress, "/a", T0 + 5),
                    edge("frontend", "orders", Ingress, "/a", T0 + H + 5),
                    edge("frontend", "orders", Ingress, "/a", T0 + 2 * H + 5),
                    edge("orders", "db", Egress, "/q", T0 + 2 * H + 6),
                ],
                T0 + 2 * H + 10,
                &keep,
            )
            .unwrap();
        assert_eq!(
            rows(&t.store),
            vec![
                (T0, "/a".into(), 1),
                (T0 + H, "/a".into(), 1),
                (T0 + 2 * H, "/a".into(), 1),
                (T0 + 2 * H, "/q".into(), 1),
            ]
        );
        // Across hours, equal keys are one edge.
        let all = t.store.edges_since(0).unwrap();
        assert_eq!(counts(&all), vec![("/a", 3), ("/q", 1)]);
        assert_eq!(all[0].stats.first_seen, T0 + 5);
        // `since` counts from the start of its hour.
        let recent = t.store.edges_since(T0 + H + 1800).unwrap();
        assert_eq!(counts(&recent), vec![("/a", 2), ("/q", 1)]);
        assert!(t.store.edges_since(T0 + 3 * H).unwrap().is_empty());
    }

    #[test]
    fn hours_past_the_window_are_deleted_on_a_report_and_not_stored() {
        let t = temp_store("retention");
        let keep = retention(2, 1000);
        t.store
            .merge_edges(
                &[
                    edge("frontend", "orders", Ingress, "/old", T0 + 5),
                    edge("frontend", "orders", Ingress, "/newer", T0 + H + 5),
                ],
                T0 + H + 10,
                &keep,
            )
            .unwrap();
        assert_eq!(rows(&t.store).len(), 2);

        // Three hours later the window starts at T0 + H: the hour of T0 goes.
        let now = T0 + 3 * H + 10;
        let written = t
            .store
            .merge_edges(
                &[
                    edge("frontend", "orders", Ingress, "/now", now),
                    edge("frontend", "orders", Ingress, "/too-old", T0 + 100),
                    edge("frontend", "orders", Ingress, "/future", now + 2 * H),
                ],
                now,
                &keep,
            )
            .unwrap();
        assert_eq!(
            written,
            EdgesWritten {
                stored: 1,
                outside_window: 2,
                expired: 1,
                evicted: 0,
            }
        );
        assert_eq!(
            rows(&t.store),
            vec![(T0 + H, "/newer".into(), 1), (T0 + 3 * H, "/now".into(), 1)]
        );
    }

    #[test]
    fn the_row_bound_deletes_the_oldest_hours_first() {
        let t = temp_store("bound");
        let keep = retention(24, 3);
        let at = |hour: u64, path: &str| edge("frontend", "orders", Ingress, path, T0 + hour * H);
        t.store
            .merge_edges(&[at(0, "/a"), at(0, "/b"), at(1, "/c")], T0 + H, &keep)
            .unwrap();
        assert_eq!(rows(&t.store).len(), 3);

        // One row over: the whole oldest hour goes, not just one of its rows.
        let written = t.store.merge_edges(&[at(1, "/d")], T0 + H, &keep).unwrap();
        assert_eq!(written.evicted, 2);
        assert_eq!(
            rows(&t.store),
            vec![(T0 + H, "/c".into(), 1), (T0 + H, "/d".into(), 1)]
        );

        // One hour alone over the bound: older hours go, then it is trimmed to the bound.
        let new_hour: Vec<Edge> = ["/e", "/f", "/g", "/h", "/i"]
            .iter()
            .map(|p| at(2, p))
            .collect();
        let written = t.store.merge_edges(&new_hour, T0 + 2 * H, &keep).unwrap();
        assert_eq!(written.stored, 5);
        assert_eq!(written.evicted, 4);
        let left = rows(&t.store);
        assert_eq!(left.len(), 3);
        assert!(left.iter().all(|(hour, _, _)| *hour == T0 + 2 * H));
    }
}
