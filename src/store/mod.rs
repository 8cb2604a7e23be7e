//! The only code that names redb. One database file holds chunks, blobs, upload sessions, the
//! catalog, publish jobs and tokens; `tables.rs` documents every table.
//!
//! Invariants kept here:
//! - A write transaction never spans network I/O: callers read bytes first, then call in.
//! - Acknowledged writes end with a `Durability::Immediate` commit, which also makes every
//!   earlier `Durability::None` commit durable.
//! - Every write transaction enables quick repair, so the first open after a crash takes
//!   milliseconds instead of a full-file scan.

pub mod auth;
pub mod blobs;
pub mod catalog;
pub mod chunks;
pub mod jobs;
pub mod listing;
pub mod stats;
pub mod streams;
pub mod tables;
pub mod uploads;

use crate::error::{Error, Result};
use redb::{
    Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable, WriteTransaction,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::Path;
use tables::*;

/// The database handle shared by every request thread and worker.
pub struct Store {
    db: Database,
}

/// The name of the database file inside the data directory.
pub const DB_FILE: &str = "imgsrv.redb";

impl Store {
    /// Opens (or creates) the database, checks the schema version and releases the chunks of
    /// part uploads that a crash interrupted.
    pub fn open(path: &Path, cache_bytes: usize) -> Result<Store> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => Error::internal(
                    "database is already open by another process (is imgsrv already running?)",
                ),
                other => Error::internal(format!("cannot open database: {other}")),
            })?;
        let store = Store { db };
        store.init_schema()?;
        store.release_staging()?;
        Ok(store)
    }

    fn init_schema(&self) -> Result<()> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let current = meta.get("schema_version")?.map(|v| v.value());
            match current {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)?;
                    meta.insert("generation", 0)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                Some(v) => {
                    return Err(Error::internal(format!(
                        "database schema version {v} is not supported by this imgsrv (expects {SCHEMA_VERSION}); no upgrade path exists"
                    )));
                }
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
        }
        txn.commit()?;
        Ok(())
    }

    /// A write transaction with quick repair on; durable when committed unless the caller
    /// lowers it with [`Store::begin_write_cheap`].
    pub(crate) fn begin_write(&self) -> Result<WriteTransaction> {
        let mut txn = self.db.begin_write()?;
        txn.set_quick_repair(true);
        Ok(txn)
    }

    /// A write transaction that becomes durable only with the next durable commit. Used for
    /// the chunks of a part upload, whose acknowledgement ends with a durable commit.
    pub(crate) fn begin_write_cheap(&self) -> Result<WriteTransaction> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        Ok(txn)
    }

    pub(crate) fn begin_read(&self) -> Result<ReadTransaction> {
        Ok(self.db.begin_read()?)
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
