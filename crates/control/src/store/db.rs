//! The redb database under the store, with what it takes to keep running through a full
//! disk and to keep the file from growing without bound.
//!
//! After an I/O error (a full disk, say), redb refuses every later operation until the
//! database is closed and opened again. [`Db`] does that itself: an error that says so
//! marks the database broken, and the next transaction re-opens it first, so a write that
//! failed for lack of space is followed by writes that succeed once space is freed, without
//! a restart. It never deletes or rewrites the file to get there: re-opening is redb's own
//! recovery.
//!
//! redb reuses the pages a transaction frees, so a store whose content stops growing stops
//! growing on disk; [`Db::compact_if_it_pays`] gives space back after the content shrank a
//! lot (history pruned, edges expired), when the file is over twice what it holds.

use redb::{Database, ReadTransaction, ReadableDatabase, TransactionError, WriteTransaction};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

/// redb's page cache holds at most this much of the file in memory (its default is 1 GiB,
/// which a store of revisions and edges would fill over days).
const CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Compaction is considered only when the file is larger than this…
const COMPACT_MIN_FILE_BYTES: u64 = 32 * 1024 * 1024;
/// …and more than this many times the bytes its live pages take…
const COMPACT_RATIO: u64 = 2;
/// …and at most once in this many seconds.
const COMPACT_EVERY_SECS: u64 = 60;

/// The store's database: re-opened after redb reports that a previous I/O error left it
/// unusable, and compacted when that pays.
pub(crate) struct Db {
    path: PathBuf,
    /// `None` while closed: the last re-open failed (the disk may still be full).
    inner: RwLock<Option<Database>>,
    /// Set by an error after which redb must be re-opened; the next transaction does it.
    broken: AtomicBool,
    /// Why the last re-open failed: what a transaction reports while the database is closed.
    closed_by: Mutex<Option<(std::io::ErrorKind, String)>>,
    last_compaction_check: AtomicU64,
}

fn open(path: &Path) -> Result<Database, redb::DatabaseError> {
    Database::builder().set_cache_size(CACHE_BYTES).create(path)
}

impl Db {
    pub(crate) fn open(path: &Path) -> Result<Db, redb::DatabaseError> {
        Ok(Db {
            path: path.to_path_buf(),
            inner: RwLock::new(Some(open(path)?)),
            broken: AtomicBool::new(false),
            closed_by: Mutex::new(None),
            last_compaction_check: AtomicU64::new(0),
        })
    }

    /// Begins a read transaction, re-opening the database first if it must be.
    pub(crate) fn begin_read(&self) -> Result<ReadTransaction, TransactionError> {
        self.heal();
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let db = inner.as_ref().ok_or_else(|| self.closed_error())?;
        db.begin_read()
    }

    /// Begins a write transaction, re-opening the database first if it must be.
    pub(crate) fn begin_write(&self) -> Result<WriteTransaction, TransactionError> {
        self.heal();
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let db = inner.as_ref().ok_or_else(|| self.closed_error())?;
        db.begin_write()
    }

    /// What a transaction reports while the database is closed: why the last re-open failed
    /// (a full disk, say).
    fn closed_error(&self) -> TransactionError {
        let why = self
            .closed_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        TransactionError::Storage(match why {
            Some((kind, message)) => redb::StorageError::Io(std::io::Error::new(kind, message)),
            None => redb::StorageError::DatabaseClosed,
        })
    }

    /// Notes an error: if it is one after which redb must be re-opened, the next
    /// transaction re-opens it.
    pub(crate) fn saw(&self, e: &redb::Error) {
        if must_reopen(e) {
            self.broken.store(true, Ordering::SeqCst);
        }
    }

    /// Re-opens the database if an error said it must be, or if the last attempt failed.
    fn heal(&self) {
        let closed = self
            .inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none();
        if !closed && !self.broken.load(Ordering::SeqCst) {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        // Another caller may have re-opened it while this one waited for the lock.
        if inner.is_some() && !self.broken.swap(false, Ordering::SeqCst) {
            return;
        }
        // The old handle must be gone before the file can be opened again.
        if let Some(old) = inner.take()
            && let Err(e) = old.close()
        {
            tracing::warn!(path = %self.path.display(), error = %e, "closing the store after an I/O error");
        }
        match open(&self.path) {
            Ok(db) => {
                tracing::warn!(path = %self.path.display(), "re-opened the store after an I/O error");
                *inner = Some(db);
                *self
                    .closed_by
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = None;
            }
            Err(e) => {
                let kind = match &e {
                    redb::DatabaseError::Storage(redb::StorageError::Io(io)) => io.kind(),
                    _ => std::io::ErrorKind::Other,
                };
                *self
                    .closed_by
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some((
                    kind,
                    format!("the store is closed and cannot be re-opened: {e}"),
                ));
                tracing::error!(path = %self.path.display(), error = %e, "cannot re-open the store yet; the next change tries again");
            }
        }
    }

    /// Compacts the file when it is over [`COMPACT_RATIO`] times what its live pages take
    /// and over [`COMPACT_MIN_FILE_BYTES`], at most once a minute. Skipped, to be tried
    /// later, while any transaction is open. Returns whether it compacted.
    pub(crate) fn compact_if_it_pays(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_compaction_check.load(Ordering::Relaxed);
        if now < last.saturating_add(COMPACT_EVERY_SECS)
            || self
                .last_compaction_check
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return false;
        }
        self.compact_now(COMPACT_MIN_FILE_BYTES)
    }

    /// Compacts if the file is over `min_file_bytes` and [`COMPACT_RATIO`] times its live
    /// pages.
    pub(crate) fn compact_now(&self, min_file_bytes: u64) -> bool {
        let Ok(file_bytes) = std::fs::metadata(&self.path).map(|m| m.len()) else {
            return false;
        };
        if file_bytes <= min_file_bytes {
            return false;
        }
        let live = match self.live_bytes() {
            Ok(live) => live,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the store's page counts");
                return false;
            }
        };
        if file_bytes <= live.saturating_mul(COMPACT_RATIO) {
            return false;
        }
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        let Some(db) = inner.as_mut() else {
            return false;
        };
        match db.compact() {
            Ok(_) => {
                let after = std::fs::metadata(&self.path).map_or(0, |m| m.len());
                tracing::info!(
                    path = %self.path.display(),
                    before_bytes = file_bytes,
                    after_bytes = after,
                    "compacted the store"
                );
                true
            }
            Err(redb::CompactionError::TransactionInProgress) => false,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not compact the store");
                self.saw(&e.into());
                false
            }
        }
    }

    /// The bytes the database's allocated pages take.
    fn live_bytes(&self) -> Result<u64, redb::Error> {
        let txn = self.begin_write()?;
        let stats = txn.stats()?;
        txn.abort()?;
        Ok(stats
            .allocated_pages()
            .saturating_mul(stats.page_size() as u64))
    }
}

/// Whether redb must be closed and re-opened before it works again after `e`.
fn must_reopen(e: &redb::Error) -> bool {
    matches!(
        e,
        redb::Error::PreviousIo | redb::Error::Io(_) | redb::Error::DatabaseClosed
    )
}

/// Whether `e` comes from a full disk (or a used-up quota).
pub(crate) fn is_disk_full(e: &redb::Error) -> bool {
    let full = |io: &std::io::Error| {
        io.kind() == std::io::ErrorKind::StorageFull
            || io.kind() == std::io::ErrorKind::QuotaExceeded
    };
    if let redb::Error::Io(io) = e
        && full(io)
    {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().is_some_and(full) {
            return true;
        }
        source = s.source();
    }
    false
}
