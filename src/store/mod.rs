//! The only code that names redb. One database file holds chunks, blobs, upload sessions, the
//! catalog, publish jobs and tokens; `tables.rs` documents every table.
//!
//! Invariants kept here:
//! - A write transaction never spans network I/O: callers read bytes first, then call in.
//! - Acknowledged writes end with a `Durability::Immediate` commit, which also makes every
//!   earlier `Durability::None` commit durable.
//! - Every write transaction enables quick repair, so the first open after a crash takes
//!   milliseconds instead of a full-file scan.

mod aliases;
pub mod auth;
pub mod backup;
pub mod blobs;
pub mod catalog;
pub mod check;
pub mod chunks;
pub mod handle;
pub mod jobs;
pub mod listing;
mod migrate;
mod read;
mod refcount;
pub mod retention;
pub mod retire;
pub mod scrub;
pub mod shared;
pub mod space;
pub mod stats;
pub mod streams;
pub mod tables;
pub mod uploads;
mod writeback;

pub use handle::{Health, OpenError};

use crate::error::{Error, Result};
use redb::{Durability, ReadTransaction, ReadableTable, WriteTransaction};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use tables::*;

/// The database handle shared by every request thread and worker.
pub struct Store {
    handle: handle::Handle,
    space: space::Space,
    /// Flushes chunk data written by part uploads in the background (`writeback.rs`).
    writeback: writeback::Writeback,
    /// Verified chunks that concurrent downloads share (`shared.rs`).
    shared: std::sync::Arc<shared::SharedChunks>,
}

/// Chunk bytes between two background flushes of the database file: small next to a part
/// (so its closing durable commit waits for little), large enough that flushes stay few.
const WRITEBACK_EVERY: u64 = 4 * 1024 * 1024;

/// The name of the database file inside the data directory.
pub const DB_FILE: &str = "imgsrv.redb";

impl Store {
    /// Opens (or creates) the database, checks the schema version and releases the chunks of
    /// part uploads that a crash interrupted. `reserve` is the free space writes must leave on
    /// the data directory's filesystem (see `space.rs`). On a full disk the store may come up
    /// read-only; a damaged file is refused with [`OpenError::Damaged`].
    pub fn open(
        path: &Path,
        cache_bytes: usize,
        reserve: u64,
    ) -> std::result::Result<Store, OpenError> {
        let space = space::Space::new(path, reserve);
        let handle = handle::Handle::open(path, cache_bytes, &|| space.release_headroom())?;
        let writeback = writeback::Writeback::new(
            Some(writeback::Target::Path(path.to_path_buf())),
            WRITEBACK_EVERY,
        );
        let store = Store {
            handle,
            space,
            writeback,
            shared: std::sync::Arc::new(shared::SharedChunks::new(shared::LIMIT)),
        };
        // Walk the small tables once under a guard: damage in the file's first pages then
        // refuses the start with a clear message instead of panicking a request later. A
        // panic, or an error `is_damage` says is damage, refuses the file as damaged; any other
        // error refuses the start with that error.
        let guarded_step = |step: &dyn Fn() -> Result<()>, is_damage: &dyn Fn(&Error) -> bool| {
            match handle::guarded(step) {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if is_damage(&e) => Err(handle::damaged(path, &e.detail)),
                Ok(Err(e)) => Err(OpenError::Other(format!(
                    "cannot open database {}: {e}",
                    path.display()
                ))),
                Err(panic) => Err(handle::damaged(path, &panic)),
            }
        };
        let damage_errors = || handle::DAMAGE_ERRORS.load(std::sync::atomic::Ordering::Relaxed);
        let damage_before = damage_errors();
        guarded_step(&|| store.init_schema(), &|_| {
            damage_errors() > damage_before
        })?;
        guarded_step(&|| store.walk_metadata(), &|e| {
            e.kind == crate::error::Kind::Internal
        })?;
        if let Err(e) = store.release_staging() {
            crate::log::warn(&format!("cannot release interrupted part uploads yet: {e}"));
        }
        store.space.ensure_headroom();
        Ok(store)
    }

    /// What the store can do right now (read and write, read only, or recovering).
    pub fn health(&self) -> Health {
        self.handle.health()
    }

    /// Whether a write could be stored now: the handle is writable and at least one chunk
    /// fits within the reserve (what `/readyz` reports).
    pub fn can_write(&self) -> bool {
        self.health() == Health::Writable && self.usable_bytes() >= chunks::CHUNK_SIZE as u64
    }

    /// Whether an I/O error asked for the database to be reopened.
    pub fn needs_recovery(&self) -> bool {
        handle::needs_reopen() || self.health() != Health::Writable
    }

    /// Reopens the database after an I/O error (or to leave read-only mode once space is
    /// back), releasing the headroom file if the disk is too full to open it.
    pub fn recover(&self) -> Health {
        let health = self.handle.recover(&|| self.space.release_headroom());
        if health == Health::Writable {
            self.space.ensure_headroom();
        }
        health
    }

    /// Recreates the headroom file when space allows (called periodically).
    pub fn maintain_headroom(&self) {
        self.space.ensure_headroom();
    }

    /// Closes the database file (at shutdown).
    pub fn close(&self) {
        self.handle.close();
    }

    /// Reads every row of the metadata tables (everything but chunk bytes), so that damage
    /// there is found at start-up. Costs one pass over small records.
    fn walk_metadata(&self) -> Result<()> {
        let txn = self.begin_read()?;
        fn walk<K: redb::Key + 'static, V: redb::Value + 'static>(
            txn: &ReadTransaction,
            def: redb::TableDefinition<K, V>,
        ) -> Result<()> {
            for row in txn.open_table(def)?.iter()? {
                row?;
            }
            Ok(())
        }
        walk(&txn, META)?;
        walk(&txn, IMAGES)?;
        walk(&txn, IMAGE_NAMES)?;
        walk(&txn, VERSIONS)?;
        walk(&txn, VERSION_KEYS)?;
        walk(&txn, ARTIFACTS)?;
        walk(&txn, VERSION_ARTIFACTS)?;
        walk(&txn, ATTACHMENTS)?;
        walk(&txn, ARTIFACT_ATTACHMENTS)?;
        walk(&txn, ALIASES)?;
        walk(&txn, JOBS)?;
        walk(&txn, VERSION_JOBS)?;
        walk(&txn, INCUS_ROWS)?;
        walk(&txn, PRINCIPALS)?;
        walk(&txn, TOKENS)?;
        walk(&txn, UPLOADS)?;
        walk(&txn, BLOBS)?;
        walk(&txn, BLOB_REFS)?;
        walk(&txn, RETENTION)?;
        walk(&txn, RETIRED)?;
        Ok(())
    }

    fn init_schema(&self) -> Result<()> {
        // A database that is already at this schema needs no write: that keeps a start on a
        // full disk (or a read-only open) possible.
        {
            let txn = self.begin_read()?;
            let current = match txn.open_table(META) {
                Ok(meta) => meta.get("schema_version")?.map(|v| v.value()),
                Err(redb::TableError::TableDoesNotExist(_)) => None,
                Err(e) => return Err(e.into()),
            };
            if current == Some(SCHEMA_VERSION) {
                return Ok(());
            }
        }
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let current = meta.get("schema_version")?.map(|v| v.value());
            match current {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                    meta.insert("generation", 0)?;
                }
                Some(v) => migrate::upgrade(&txn, &mut meta, v)?,
            }
            // Create every table so that read transactions never meet a missing one.
            txn.open_table(CHUNKS)?;
            txn.open_table(CHUNK_REFS)?;
            txn.open_table(CHUNK_SUMS)?;
            txn.open_table(BLOBS)?;
            txn.open_table(BLOB_REFS)?;
            txn.open_table(UPLOADS)?;
            txn.open_table(PARTS)?;
            txn.open_table(STAGING)?;
            txn.open_table(IMAGES)?;
            txn.open_table(IMAGE_NAMES)?;
            txn.open_table(VERSIONS)?;
            txn.open_table(VERSION_KEYS)?;
            txn.open_table(ARTIFACTS)?;
            txn.open_table(VERSION_ARTIFACTS)?;
            txn.open_table(ATTACHMENTS)?;
            txn.open_table(ARTIFACT_ATTACHMENTS)?;
            txn.open_table(ALIASES)?;
            txn.open_table(JOBS)?;
            txn.open_table(VERSION_JOBS)?;
            txn.open_table(INCUS_ROWS)?;
            txn.open_table(COMBINED)?;
            txn.open_table(PRINCIPALS)?;
            txn.open_table(TOKENS)?;
            txn.open_table(RETENTION)?;
            txn.open_table(RETIRED)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// A write transaction with quick repair on; durable when committed unless the caller
    /// lowers it with [`Store::begin_write_cheap`].
    pub(crate) fn begin_write(&self) -> Result<WriteTransaction> {
        let mut txn = self.handle.begin_write()?;
        txn.set_quick_repair(true);
        Ok(txn)
    }

    /// A write transaction that becomes durable only with the next durable commit. Used for
    /// the chunks of a part upload, whose acknowledgement ends with a durable commit.
    pub(crate) fn begin_write_cheap(&self) -> Result<WriteTransaction> {
        let mut txn = self.handle.begin_write()?;
        txn.set_durability(Durability::None)?;
        Ok(txn)
    }

    pub(crate) fn begin_read(&self) -> Result<ReadTransaction> {
        self.handle.begin_read()
    }

    /// Makes pages freed by the last commit reusable now. redb hands pages a commit frees to
    /// its allocator only at the next durable commit (readers may still see them until then),
    /// and the chunk writes of a part upload are not durable commits: without this, space
    /// freed by an abort or a collection would not be reused until some later catalog write,
    /// and on a full disk the next upload would fail although the file has room.
    pub(crate) fn settle_freed_pages(&self) {
        if let Ok(txn) = self.begin_write() {
            let _ = txn.commit();
        }
    }

    /// The catalog generation: changes whenever published content or aliases change.
    pub fn generation(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("generation")?.map(|v| v.value()).unwrap_or(0))
    }
}

pub(crate) fn bump_generation(txn: &WriteTransaction) -> Result<()> {
    let mut meta = txn.open_table(META)?;
    let g = meta.get("generation")?.map(|v| v.value()).unwrap_or(0);
    meta.insert("generation", g + 1)?;
    Ok(())
}

fn corrupt(what: &str, e: serde_json::Error) -> Error {
    Error::internal(format!("stored {what} record is unreadable: {e}"))
}

/// Reads a JSON record keyed by a UUID.
pub(crate) fn load<T: DeserializeOwned>(
    table: &impl ReadableTable<u128, &'static [u8]>,
    id: u128,
    what: &str,
) -> Result<Option<T>> {
    match table.get(id)? {
        Some(v) => Ok(Some(
            serde_json::from_slice(v.value()).map_err(|e| corrupt(what, e))?,
        )),
        None => Ok(None),
    }
}

/// A store on a fresh database in a temporary directory, for unit tests; the directory goes
/// when the returned guard is dropped.
#[cfg(test)]
pub(crate) fn scratch_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.redb"), 1 << 20, 0).unwrap();
    (dir, store)
}

/// Writes a JSON record keyed by a UUID.
pub(crate) fn save<T: Serialize>(
    table: &mut redb::Table<u128, &'static [u8]>,
    id: u128,
    value: &T,
) -> Result<()> {
    let bytes =
        serde_json::to_vec(value).map_err(|e| Error::internal(format!("encoding record: {e}")))?;
    table.insert(id, bytes.as_slice())?;
    Ok(())
}

pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(what, e))
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("encoding record: {e}")))
}

/// Runs a write that frees space (an abort, a delete, a retirement) and makes the pages it
/// freed reusable at once (see [`spending_headroom`]).
pub(crate) fn freeing_write_scope<T>(
    store: &Store,
    what: &str,
    f: impl Fn(&WriteTransaction) -> Result<T>,
) -> Result<T> {
    let value = spending_headroom(store, what, f)?;
    store.settle_freed_pages();
    Ok(value)
}

/// Runs a write that frees space. Such a write must not be refused by the full disk it would
/// relieve, yet its own commit needs a few pages, and whether redb finds them inside the file or
/// must write past its allocated end depends on the page layout. So on "no space" it may spend
/// the headroom file (recreated once there is room again): release it, reopen the database
/// after the failed commit, and run `f` once more. Loops that free many things use this per
/// item and settle the freed pages once at the end.
pub(crate) fn spending_headroom<T>(
    store: &Store,
    what: &str,
    f: impl Fn(&WriteTransaction) -> Result<T>,
) -> Result<T> {
    match begin_write_scope(store, &f) {
        Err(e)
            if e.kind == crate::error::Kind::InsufficientStorage
                && store.space.release_headroom() =>
        {
            crate::log::warn(&format!(
                "the disk is full: released the headroom file to {what}"
            ));
            store.recover();
            begin_write_scope(store, &f)
        }
        r => r,
    }
}

/// Frees space item by item: one transaction each ([`spending_headroom`]), then the freed pages
/// settled once at the end. An item that fails (say, its record is unreadable) is logged with
/// `failed` and skipped: failing the whole sweep would stop it at the same item every time and
/// leave every item after it on disk for good. Returns how many items `free` reports freed.
pub(crate) fn free_each<T>(
    store: &Store,
    what: &str,
    items: &[T],
    free: impl Fn(&WriteTransaction, &T) -> Result<bool>,
    failed: impl Fn(&T) -> String,
) -> usize {
    let mut freed = 0;
    for item in items {
        match spending_headroom(store, what, |txn| free(txn, item)) {
            Ok(true) => freed += 1,
            Ok(false) => {}
            Err(e) => crate::log::error(&format!("{}: {e}", failed(item))),
        }
    }
    if freed > 0 {
        store.settle_freed_pages();
    }
    freed
}

/// Runs `f` in a durable write transaction and commits it when `f` succeeds. An error aborts
/// the transaction, so a failed operation leaves the data unchanged.
pub(crate) fn begin_write_scope<T>(
    store: &Store,
    f: impl FnOnce(&WriteTransaction) -> Result<T>,
) -> Result<T> {
    let txn = store.begin_write()?;
    match f(&txn) {
        Ok(v) => {
            txn.commit()?;
            Ok(v)
        }
        Err(e) => {
            let _ = txn.abort();
            Err(e)
        }
    }
}
