//! Anomaly events (`bulkhead events`) in the store: numbered in arrival order, kept for a
//! window and up to a row bound, with the sequence number and the learning start in META.

use super::{META, Store};
use crate::error::ControlError;
use bulkhead_insight::events::Event;
use redb::{ReadableTable, ReadableTableMetadata, TableDefinition};

/// Sequence number → JSON of an anomaly `Event`.
const EVENTS: TableDefinition<u64, &str> = TableDefinition::new("events");
/// In META: the last event sequence number given out (kept when its row is deleted, so
/// numbers are never reused), and when the first flow report was stored.
const EVENT_SEQ: &str = "event_seq";
const LEARNING_START: &str = "anomaly_learning_start";

pub(super) fn create(txn: &redb::WriteTransaction) -> Result<(), redb::Error> {
    txn.open_table(EVENTS)?;
    Ok(())
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
        let txn = self.read()?;
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
        events: Vec<Event>,
        now_unix: u64,
        retention: &EventRetention,
    ) -> Result<Vec<Event>, ControlError> {
        let oldest = now_unix.saturating_sub(retention.window_secs);
        self.write(|txn| {
            // Numbered afresh in each attempt: a retried write must not skip numbers.
            let mut events = events.clone();
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
        let txn = self.read()?;
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
