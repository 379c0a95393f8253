//! Reported traffic edges in the store: one row per edge key and hour, kept under the
//! workload whose sidecar decided it (the destination for ingress, the source for egress).
//!
//! Three bounds keep one noisy workload from crowding out the others' history, which
//! `recommend`, `impact`, `promote` and `reach --observed` rely on:
//! - per edge: at most [`FlowRetention::max_paths_per_edge`] distinct path templates (an
//!   edge being its key without the path); a new one past that is counted into the edge's
//!   [`FOLDED_PATH`] template instead (`edge_paths` indexes the templates held);
//! - per workload: at most [`FlowRetention::max_rows_per_workload`] rows; over it, that
//!   workload's oldest hours go first;
//! - mesh-wide: at most [`FlowRetention::max_rows`] rows; over it, the oldest hours go.
//!
//! Rows whose hour left the retention window are deleted when a report comes. Nothing here
//! trusts a report beyond what `flows.rs` checked; a row that no longer decodes is skipped.

use super::Store;
use crate::error::ControlError;
use crate::flows::{FlowRetention, MAX_CLOCK_SKEW_SECS, bucket_of};
use bulkhead_insight::{Edge, EdgeKey, EdgeStats, FOLDED_PATH};
use bulkhead_policy::model::Direction;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

/// (owner workload `ns/name`, start of the hour of `last_seen`, JSON of the `EdgeKey`) →
/// JSON of the `EdgeStats`.
const EDGES: TableDefinition<(&str, u64, &str), &str> = TableDefinition::new("workload_edges");
/// Owner → how many rows it has in [`EDGES`].
const OWNER_ROWS: TableDefinition<&str, u64> = TableDefinition::new("edge_owner_rows");
/// (JSON of an `EdgeKey` without its path, a path template) → the newest hour that holds a
/// row of it.
const EDGE_PATHS: TableDefinition<(&str, &str), u64> = TableDefinition::new("edge_paths");
/// Where edges were kept before they were kept per workload: moved on open.
const LEGACY_EDGES: TableDefinition<(u64, &str), &str> = TableDefinition::new("edges");

pub(super) fn create(txn: &WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(EDGES)?;
    txn.open_table(OWNER_ROWS)?;
    txn.open_table(EDGE_PATHS)?;
    Ok(())
}

/// What one report did to the stored edges.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct EdgesWritten {
    /// Edges merged into the row of their key and hour.
    pub stored: u64,
    /// Edges not stored because their hour is outside the retention window: older than it,
    /// or ahead of this clock by more than the allowed skew.
    pub outside_window: u64,
    /// Edges whose path was counted into their edge's `/*` template: the edge already held
    /// as many distinct templates as it may.
    pub folded: u64,
    /// Rows deleted because their hour left the retention window.
    pub expired: u64,
    /// Rows deleted, the workload's oldest hours first, to keep a workload within its bound.
    pub evicted_in_workload: u64,
    /// Rows deleted, oldest hours first, to keep the mesh within its bound.
    pub evicted: u64,
}

/// The workload whose sidecar decided `key`: its rows count against that workload's bound.
fn owner(key: &EdgeKey) -> String {
    match (key.direction, &key.source_workload) {
        (Direction::Egress, Some(source)) => source.to_string(),
        _ => key.destination.to_string(),
    }
}

/// The edge `key` belongs to for the per-edge path bound: the key without its path.
fn shape(key: &EdgeKey) -> Result<String, serde_json::Error> {
    serde_json::to_string(&key.without_path())
}

fn encode_err(e: serde_json::Error) -> redb::Error {
    redb::Error::Corrupted(format!("cannot encode an edge key: {e}"))
}

/// The tables a report writes, opened once per transaction.
struct Tables<'t> {
    edges: redb::Table<'t, (&'static str, u64, &'static str), &'static str>,
    owners: redb::Table<'t, &'static str, u64>,
    paths: redb::Table<'t, (&'static str, &'static str), u64>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, redb::Error> {
        Ok(Tables {
            edges: txn.open_table(EDGES)?,
            owners: txn.open_table(OWNER_ROWS)?,
            paths: txn.open_table(EDGE_PATHS)?,
        })
    }

    /// How many distinct templates the edge `shape` holds, counting up to `at_most`.
    fn templates(&self, shape: &str, at_most: u64) -> Result<u64, redb::Error> {
        let mut n = 0;
        for row in self.paths.range((shape, "")..)? {
            if row?.0.value().0 != shape || n >= at_most {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Notes that the edge `shape` has a row with `template` in `bucket`.
    fn hold_template(
        &mut self,
        shape: &str,
        template: &str,
        bucket: u64,
    ) -> Result<(), redb::Error> {
        let newest = self.paths.get((shape, template))?.map(|v| v.value());
        if newest.is_none_or(|n| n < bucket) {
            self.paths.insert((shape, template), bucket)?;
        }
        Ok(())
    }

    /// Adds `stats` to the row of `key_json` in `bucket`, creating it if needed.
    fn merge(
        &mut self,
        owner: &str,
        bucket: u64,
        key_json: &str,
        stats: &EdgeStats,
    ) -> Result<(), redb::Error> {
        let existing = self
            .edges
            .get((owner, bucket, key_json))?
            .map(|v| v.value().to_string());
        let mut merged = match &existing {
            Some(json) => serde_json::from_str::<EdgeStats>(json).unwrap_or_default(),
            None => EdgeStats::default(),
        };
        merged.merge(stats);
        // Plain numbers: serialising them cannot fail.
        let json = serde_json::to_string(&merged).unwrap_or_default();
        self.edges
            .insert((owner, bucket, key_json), json.as_str())?;
        if existing.is_none() {
            let n = self.owners.get(owner)?.map_or(0, |v| v.value());
            self.owners.insert(owner, n + 1)?;
        }
        Ok(())
    }

    /// Deletes one row and what indexes it: the owner's count, and the template entry if
    /// this row was its newest (rows go oldest first, so then it was its last).
    fn remove(&mut self, owner: &str, bucket: u64, key_json: &str) -> Result<bool, redb::Error> {
        if self.edges.remove((owner, bucket, key_json))?.is_none() {
            return Ok(false);
        }
        let n = self.owners.get(owner)?.map_or(0, |v| v.value());
        if n <= 1 {
            self.owners.remove(owner)?;
        } else {
            self.owners.insert(owner, n - 1)?;
        }
        if let Ok(key) = serde_json::from_str::<EdgeKey>(key_json)
            && let Some(template) = &key.path
            && let Ok(shape) = shape(&key)
        {
            let newest = self
                .paths
                .get((shape.as_str(), template.as_str()))?
                .map(|v| v.value());
            if newest.is_some_and(|n| n <= bucket) {
                self.paths.remove((shape.as_str(), template.as_str()))?;
            }
        }
        Ok(true)
    }

    /// The oldest and newest hour `owner` has rows in.
    fn hours_of(&self, owner: &str) -> Result<Option<(u64, u64)>, redb::Error> {
        let mut range = self.edges.range((owner, 0, "")..=(owner, u64::MAX, ""))?;
        let first = match range.next() {
            Some(row) => row?.0.value().1,
            None => return Ok(None),
        };
        let last = match range.next_back() {
            Some(row) => row?.0.value().1,
            None => first,
        };
        Ok(Some((first, last)))
    }

    /// The keys of `owner`'s rows in `bucket`, in key order, at most `limit`.
    fn keys_in_hour(
        &self,
        owner: &str,
        bucket: u64,
        limit: u64,
    ) -> Result<Vec<String>, redb::Error> {
        let mut keys = Vec::new();
        for row in self
            .edges
            .range((owner, bucket, "")..(owner, bucket.saturating_add(1), ""))?
        {
            if keys.len() as u64 >= limit {
                break;
            }
            keys.push(row?.0.value().2.to_string());
        }
        Ok(keys)
    }

    /// Deletes up to `limit` of `owner`'s rows in `bucket`, in key order.
    fn remove_in_hour(&mut self, owner: &str, bucket: u64, limit: u64) -> Result<u64, redb::Error> {
        let mut removed = 0;
        for key in self.keys_in_hour(owner, bucket, limit)? {
            removed += u64::from(self.remove(owner, bucket, &key)?);
        }
        Ok(removed)
    }

    fn owner_list(&self) -> Result<Vec<(String, u64)>, redb::Error> {
        let mut out = Vec::new();
        for row in self.owners.iter()? {
            let (k, v) = row?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }

    /// Deletes every row of an hour before `oldest`, and the templates held only there.
    fn expire(&mut self, oldest: u64) -> Result<u64, redb::Error> {
        let mut expired = 0;
        for (owner, _) in self.owner_list()? {
            while let Some((first, _)) = self.hours_of(&owner)? {
                if first >= oldest {
                    break;
                }
                expired += self.remove_in_hour(&owner, first, u64::MAX)?;
            }
        }
        self.paths.retain(|_, newest| newest >= oldest)?;
        Ok(expired)
    }

    /// Keeps `owner` within `max` rows: its oldest hour goes while it has older and newer
    /// ones; an hour alone over the bound is trimmed in key order.
    fn bound_owner(&mut self, owner: &str, max: u64) -> Result<u64, redb::Error> {
        let mut evicted = 0;
        loop {
            let rows = self.owners.get(owner)?.map_or(0, |v| v.value());
            if rows <= max {
                return Ok(evicted);
            }
            let Some((first, last)) = self.hours_of(owner)? else {
                return Ok(evicted);
            };
            let limit = if first < last { u64::MAX } else { rows - max };
            let removed = self.remove_in_hour(owner, first, limit)?;
            if removed == 0 {
                return Ok(evicted);
            }
            evicted += removed;
        }
    }

    /// Keeps the mesh within `max` rows: the oldest hour goes (for every workload) while
    /// there are newer ones; an hour alone over the bound is trimmed from the workloads
    /// with the most rows first.
    fn bound_mesh(&mut self, max: u64) -> Result<u64, redb::Error> {
        let mut evicted = 0;
        while self.edges.len()? > max {
            let owners = self.owner_list()?;
            let mut hours = Vec::new();
            for (owner, _) in &owners {
                hours.extend(self.hours_of(owner)?);
            }
            let (Some(oldest), Some(newest)) = (
                hours.iter().map(|h| h.0).min(),
                hours.iter().map(|h| h.1).max(),
            ) else {
                break;
            };
            let mut removed = 0;
            if oldest < newest {
                for (owner, _) in &owners {
                    removed += self.remove_in_hour(owner, oldest, u64::MAX)?;
                }
            } else if let Some((owner, rows)) = owners.iter().max_by_key(|(_, rows)| *rows) {
                let over = self.edges.len()? - max;
                removed = self.remove_in_hour(owner, oldest, over.min(*rows))?;
            }
            if removed == 0 {
                break;
            }
            evicted += removed;
        }
        Ok(evicted)
    }
}

impl Store {
    /// Merges `edges` into their hour buckets (the hour of each edge's `last_seen`) under
    /// the workload that decided them, folding paths past the per-edge bound into the
    /// edge's `/*` template (in `edges` too, so that what is observed next is what was
    /// stored); then deletes the hours past the retention window and, over the bounds, the
    /// oldest hours of the workloads over theirs and of the mesh. One transaction.
    pub(crate) fn merge_edges(
        &self,
        edges: &mut [Edge],
        now_unix: u64,
        retention: &FlowRetention,
    ) -> Result<EdgesWritten, ControlError> {
        let oldest = retention.oldest_bucket(now_unix);
        let newest = bucket_of(now_unix.saturating_add(MAX_CLOCK_SKEW_SECS));
        // Expiring walks every workload's rows: only when the window moved on.
        let expire = self.edges_expired_before.load(Ordering::Relaxed) < oldest;
        let (written, folded) = self.write(|txn| {
            let mut written = EdgesWritten::default();
            let mut folded = Vec::new();
            let mut t = Tables::open(txn)?;
            // First, so that templates held only by expired rows no longer count.
            if expire {
                written.expired = t.expire(oldest)?;
            }
            // Equal keys within one report become one row update.
            let mut rows: BTreeMap<(String, u64, String), EdgeStats> = BTreeMap::new();
            for (i, edge) in edges.iter().enumerate() {
                let bucket = bucket_of(edge.stats.last_seen);
                if bucket < oldest || bucket > newest {
                    written.outside_window += 1;
                    continue;
                }
                written.stored += 1;
                if edge.stats.count == 0 {
                    continue;
                }
                let mut key = edge.key.clone();
                if let Some(path) = &edge.key.path {
                    let shape = shape(&key).map_err(encode_err)?;
                    let held = t.paths.get((shape.as_str(), path.as_str()))?.is_some();
                    let template = if held
                        || t.templates(&shape, retention.max_paths_per_edge)?
                            < retention.max_paths_per_edge
                    {
                        path.as_str()
                    } else {
                        folded.push(i);
                        FOLDED_PATH
                    };
                    t.hold_template(&shape, template, bucket)?;
                    key.path = Some(template.to_string());
                }
                let key_json = serde_json::to_string(&key).map_err(encode_err)?;
                rows.entry((owner(&key), bucket, key_json))
                    .or_default()
                    .merge(&edge.stats);
            }
            let mut touched = BTreeSet::new();
            for ((owner, bucket, key), stats) in &rows {
                t.merge(owner, *bucket, key, stats)?;
                touched.insert(owner.as_str());
            }
            for owner in touched {
                written.evicted_in_workload +=
                    t.bound_owner(owner, retention.max_rows_per_workload)?;
            }
            written.evicted = t.bound_mesh(retention.max_rows)?;
            Ok((written, folded))
        })?;
        if expire {
            self.edges_expired_before
                .fetch_max(oldest, Ordering::Relaxed);
        }
        for &i in &folded {
            if let Some(edge) = edges.get_mut(i) {
                edge.key.path = Some(FOLDED_PATH.to_string());
            }
        }
        let written = EdgesWritten {
            folded: folded.len() as u64,
            ..written
        };
        if written.expired + written.evicted + written.evicted_in_workload > 0 {
            self.compact_if_it_pays();
        }
        Ok(written)
    }

    /// Every stored edge in the hours from the one `from_unix` falls in on, with equal keys
    /// merged across hours; sorted by key.
    pub(crate) fn edges_since(&self, from_unix: u64) -> Result<Vec<Edge>, ControlError> {
        let mut edges = Vec::new();
        self.each_edge_row(from_unix, |_, edge| edges.push(edge))?;
        Ok(bulkhead_insight::merge_edges(edges))
    }

    /// Calls `f` with every readable stored row (one edge key in one hour: the hour's
    /// start, and the edge) in the hours from the one `from_unix` falls in on, workload by
    /// workload.
    pub(crate) fn each_edge_row(
        &self,
        from_unix: u64,
        mut f: impl FnMut(u64, Edge),
    ) -> Result<(), ControlError> {
        let from = bucket_of(from_unix);
        let txn = self.read()?;
        let table = txn.open_table(EDGES).map_err(|e| self.err(e))?;
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            let (_, bucket, key) = k.value();
            if bucket < from {
                continue;
            }
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

    /// Moves the edges of a store written before they were kept per workload. One
    /// transaction; nothing to do on a store written since.
    pub(super) fn migrate_edges(&self) -> Result<(), ControlError> {
        let legacy = {
            let txn = self.read()?;
            match txn.open_table(LEGACY_EDGES) {
                Ok(table) => table.len().map_err(|e| self.err(e))?,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
                Err(e) => return Err(self.err(e)),
            }
        };
        let moved = self.write(|txn| {
            let mut moved = 0u64;
            {
                let legacy = txn.open_table(LEGACY_EDGES)?;
                let mut t = Tables::open(txn)?;
                for row in legacy.iter()? {
                    let (k, v) = row?;
                    let (bucket, key_json) = k.value();
                    let Ok(key) = serde_json::from_str::<EdgeKey>(key_json) else {
                        continue;
                    };
                    let Ok(stats) = serde_json::from_str::<EdgeStats>(v.value()) else {
                        continue;
                    };
                    if let Some(template) = &key.path {
                        let shape = shape(&key).map_err(encode_err)?;
                        t.hold_template(&shape, template, bucket)?;
                    }
                    t.merge(&owner(&key), bucket, key_json, &stats)?;
                    moved += 1;
                }
            }
            txn.delete_table(LEGACY_EDGES)?;
            Ok(moved)
        })?;
        tracing::info!(
            rows = legacy,
            moved,
            "stored edges are now kept per workload"
        );
        Ok(())
    }
}
#[cfg(test)]
mod tests;
