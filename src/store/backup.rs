//! Live backup: a copy of every table from ONE read transaction into a new redb file.
//!
//! Why a logical copy rather than a copy of the file: redb locks its file for one process, and
//! the alternative that lets a second process read alongside the writer (redb's
//! `ConcurrencyMode::SingleWriter`) refuses `Durability::None` commits, which every chunk of a
//! part upload uses. A read transaction, on the other hand, is a consistent snapshot that
//! neither waits for writers nor makes them wait.
//!
//! So the process that has the database open writes the copy: the running server, into a file
//! that `imgsrv backup` creates and hands it over the admin socket (`crate::admin`), or, with
//! no server running, the command itself. Either way the rows go from the snapshot's pages
//! straight into the new file's pages, with no stream in between: an earlier design streamed a
//! dump over the socket and spent a third of its time copying bytes through the kernel.
//!
//! The copy is a fresh file: it holds only live data (a compacted copy, in effect), written in
//! batches that each page reaches exactly once, flushed in the background as it goes, and made
//! durable by one real sync at the end, so that it runs at disk speed.
//!
//! Why each batch is an `Immediate` commit whose sync is put off (`DeferredSync`, below) rather than
//! a `Durability::None` commit: redb keeps the pages of a non-durable commit in its write
//! buffer, so after a few batches the buffer is full and every new page pushes an older one out
//! to the file, often a page of the batch still being written. At commit redb recomputes the
//! checksum of each page the batch wrote through a mutable handle, which reads an evicted page
//! back from the file and writes it out again. Traced on a 1 GiB copy: 1,734 page writes and
//! 700 read-backs for 1,025 chunks, and the rewrites of pages the background flush had just
//! sent to the disk waited for that write to finish (ext4 keeps pages stable during
//! writeback): the copy took 1.1 s on a quiet disk and 5-13 s on a busy one, where `cp` took
//! 0.5 s. A durable commit empties the buffer instead, so with batches smaller than the buffer
//! no page is evicted early and each is written once (1,024 writes, no reads, 0.8-0.9 s).

use super::Store;
use super::tables::*;
use super::writeback::{Flusher, Target};
use crate::error::{Error, Result};
use redb::{
    AccessGuard, Builder, Database, Key, ReadTransaction, ReadableDatabase, ReadableTable,
    TableDefinition, TableHandle, Value, WriteTransaction,
};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Copied bytes per batch transaction: large enough that commits cost little, and well under
/// the half of [`CACHE_BYTES`] that redb lets its write buffer hold, so that no page of a
/// batch leaves the buffer before the batch commits (see the module docs).
const COMMIT_EVERY: u64 = 16 * 1024 * 1024;

/// The copy's redb cache.
const CACHE_BYTES: usize = 64 * 1024 * 1024;

/// What a backup copied.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub tables: u32,
    pub rows: u64,
    /// Key and value bytes.
    pub bytes: u64,
}

/// How a backup is driven.
pub struct Pace<'a> {
    /// At most this many bytes a second (`imgsrv backup --rate`), so that a backup can leave
    /// most of the disk to downloads; `None` copies as fast as the disk goes.
    pub rate: Option<u64>,
    /// Told the bytes copied so far and the estimated total.
    pub progress: &'a mut dyn FnMut(u64, u64),
    /// Polled between rows, so that a server shutting down (or a client gone) ends a backup
    /// promptly.
    pub stop: &'a dyn Fn() -> bool,
}

/// Writes the snapshot `txn` as a new database into `file` (empty, opened for reading and
/// writing). The file is complete and durable when this returns Ok.
pub fn write_copy(txn: &ReadTransaction, file: File, pace: Pace<'_>) -> Result<Summary> {
    let result = super::handle::guarded(|| -> Result<Summary> {
        let flush = file.try_clone().ok();
        let file = redb::backends::FileBackend::new(file)
            .map_err(|e| Error::internal(format!("cannot create the copy: {e}")))?;
        let sync_now = Arc::new(AtomicBool::new(false));
        let backend = DeferredSync {
            file,
            sync_now: sync_now.clone(),
        };
        copy_into(txn, backend, &sync_now, flush, pace)
    });
    result.unwrap_or_else(|panic| {
        Err(Error::internal(format!(
            "the database is damaged ({panic}); check it with `imgsrv check`"
        )))
    })
}

impl Store {
    /// Writes a consistent copy of the whole database into `file` from one read transaction
    /// (see [`write_copy`]): downloads and writes carry on meanwhile.
    pub fn backup_into(&self, file: File, pace: Pace<'_>) -> Result<Summary> {
        let txn = self.begin_read()?;
        write_copy(&txn, file, pace)
    }
}

/// Creates the copy's database on `backend` and copies the snapshot `txn` into it.
fn copy_into(
    txn: &ReadTransaction,
    backend: impl redb::StorageBackend,
    sync_now: &AtomicBool,
    flush: Option<File>,
    pace: Pace<'_>,
) -> Result<Summary> {
    let db = Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create_with_backend(backend)
        .map_err(|e| Error::internal(format!("cannot create the copy: {e}")))?;
    let summary = copy_snapshot(txn, &db, flush, pace, sync_now)?;
    db.close()
        .map_err(|e| Error::internal(format!("closing the copy: {e}")))?;
    Ok(summary)
}

/// Copies every table of the snapshot `txn` into the new database `dst`, in batches; sets
/// `sync_now` before the last commit, the one that makes the copy durable.
fn copy_snapshot(
    txn: &ReadTransaction,
    dst: &Database,
    flush: Option<std::fs::File>,
    pace: Pace<'_>,
    sync_now: &AtomicBool,
) -> Result<Summary> {
    // Refuse rather than leave a table out of the copy.
    let tables = copied_tables();
    for handle in txn.list_tables()? {
        if !tables.iter().any(|(name, _)| name == handle.name()) {
            return Err(Error::internal(format!(
                "the database holds a table {:?} that this imgsrv cannot back up; \
                 use the imgsrv binary that wrote it",
                handle.name()
            )));
        }
    }
    // Chunk bytes dominate; the estimate only drives the progress display.
    let estimate = match txn.open_table(META) {
        Ok(meta) => meta.get("chunk_bytes")?.map(|v| v.value()).unwrap_or(0),
        Err(_) => 0,
    };
    let mut c = Copier {
        db: dst,
        txn: None,
        since_commit: 0,
        summary: Summary::default(),
        estimate,
        pace,
        started: std::time::Instant::now(),
        flusher: Flusher::new(flush.map(Target::File)),
    };
    for (_, copy) in &tables {
        copy(txn, &mut c)?;
        c.summary.tables += 1;
    }
    // Every table is created even in an empty database, so this last commit always runs; its
    // syncs are the real ones and make every batch before it durable too.
    let txn = c.take_txn()?;
    c.txn = Some(txn);
    sync_now.store(true, Ordering::SeqCst);
    c.commit()?;
    (c.pace.progress)(c.summary.bytes, c.estimate.max(c.summary.bytes));
    Ok(c.summary)
}

/// Copies one table, typed by its definition.
type CopyFn = fn(&ReadTransaction, &mut Copier<'_, '_>) -> Result<()>;

macro_rules! copies {
    ($($def:ident),* $(,)?) => {
        vec![$(($def.name().to_string(), (|txn, c| copy_table(txn, $def, c)) as CopyFn)),*]
    };
}

/// Every table of `tables.rs`. A table missing here would be missing from every backup, so a
/// backup refuses a database that holds a table this list does not name; a server creates all
/// its tables when it opens a database, so every backup test checks that this list is whole.
fn copied_tables() -> Vec<(String, CopyFn)> {
    copies!(
        META,
        IMAGES,
        IMAGE_NAMES,
        VERSIONS,
        VERSION_KEYS,
        ARTIFACTS,
        VERSION_ARTIFACTS,
        ATTACHMENTS,
        ARTIFACT_ATTACHMENTS,
        ALIASES,
        JOBS,
        VERSION_JOBS,
        INCUS_ROWS,
        COMBINED,
        PRINCIPALS,
        TOKENS,
        RETENTION,
        RETIRED,
        UPLOADS,
        PARTS,
        STAGING,
        BLOBS,
        BLOB_REFS,
        CHUNK_REFS,
        CHUNK_SUMS,
    )
    .into_iter()
    .chain([(CHUNKS.name().to_string(), copy_chunks as CopyFn)])
    .collect()
}

/// The writing side of a copy: the batch transaction and what has been copied so far.
struct Copier<'d, 'p> {
    db: &'d Database,
    txn: Option<WriteTransaction>,
    since_commit: u64,
    summary: Summary,
    estimate: u64,
    pace: Pace<'p>,
    started: std::time::Instant,
    flusher: Flusher,
}

impl Copier<'_, '_> {
    /// The running batch transaction, begun if there is none; hand it back with `self.txn`.
    fn take_txn(&mut self) -> Result<WriteTransaction> {
        match self.txn.take() {
            Some(txn) => Ok(txn),
            None => Ok(self.db.begin_write()?),
        }
    }

    /// Commits the batch (durable as far as redb knows; see [`DeferredSync`]) and starts the
    /// background flush of what it wrote.
    fn commit(&mut self) -> Result<()> {
        if let Some(txn) = self.txn.take() {
            txn.commit()?;
        }
        self.since_commit = 0;
        self.flusher.kick();
        Ok(())
    }

    /// Counts one copied row of `len` bytes, reports progress and honours `stop`; true when
    /// the batch is due for its commit.
    fn copied(&mut self, len: usize) -> Result<bool> {
        self.summary.rows += 1;
        self.summary.bytes += len as u64;
        self.since_commit += len as u64;
        if self.summary.rows.is_multiple_of(32) {
            (self.pace.progress)(self.summary.bytes, self.estimate);
            self.check_stop()?;
        }
        if let Some(rate) = self.pace.rate {
            self.keep_to(rate)?;
        }
        Ok(self.since_commit >= COMMIT_EVERY)
    }

    fn check_stop(&self) -> Result<()> {
        if (self.pace.stop)() {
            return Err(Error::unavailable(
                "the server is shutting down; the backup was not finished",
            ));
        }
        Ok(())
    }

    /// Sleeps while the copy is ahead of `rate` bytes a second, still reporting progress (a
    /// server learns so that its client went away) and honouring a stop.
    fn keep_to(&mut self, rate: u64) -> Result<()> {
        let due = crate::pace::due(self.started, self.summary.bytes, rate);
        let (bytes, estimate) = (self.summary.bytes, self.estimate);
        let pace = &mut self.pace;
        if crate::pace::sleep_until(due, &mut || {
            (pace.progress)(bytes, estimate);
            !(pace.stop)()
        }) {
            Ok(())
        } else {
            self.check_stop()
        }
    }
}

/// Copies the rows of one table (none if the snapshot predates the table, which is then
/// created empty, as the server's open does).
fn copy_table<K: Key + 'static, V: Value + 'static>(
    src: &ReadTransaction,
    def: TableDefinition<K, V>,
    c: &mut Copier<'_, '_>,
) -> Result<()> {
    let table = match src.open_table(def) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut rows = match &table {
        Some(t) => Some(t.iter()?),
        None => None,
    };
    in_batches(c, def, |out, c| {
        if let Some(rows) = rows.as_mut() {
            for row in rows.by_ref() {
                let (k, v) = row?;
                let (key, value) = (k.value(), v.value());
                let len = K::as_bytes(&key).as_ref().len() + V::as_bytes(&value).as_ref().len();
                out.insert(key, value)?;
                if c.copied(len)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    })
}

/// Runs `fill` on the table `def` in one batch transaction after another, committing each
/// batch (see [`Copier::commit`]) when `fill` returns true (it is due) and stopping when it
/// returns false (no rows left).
fn in_batches<'d, 'p, K: Key + 'static, V: Value + 'static>(
    c: &mut Copier<'d, 'p>,
    def: TableDefinition<K, V>,
    mut fill: impl FnMut(&mut redb::Table<'_, K, V>, &mut Copier<'d, 'p>) -> Result<bool>,
) -> Result<()> {
    loop {
        let txn = c.take_txn()?;
        let due = {
            let mut out = txn.open_table(def)?;
            fill(&mut out, c)?
        };
        c.txn = Some(txn);
        if !due {
            return Ok(());
        }
        c.commit()?;
    }
}

/// Chunks read ahead of the writer: enough to keep both threads busy, few enough that the
/// memory they hold stays small (a chunk is at most 1 MiB).
const CHUNKS_AHEAD: usize = 8;

/// A chunk read from the snapshot: its key and the guard of its value in the snapshot's page.
type ChunkRow<'t> = Result<([u8; 32], AccessGuard<'t, &'static [u8]>)>;

/// Copies the chunk table, which holds nearly all the bytes, on two threads: one reads the
/// snapshot's pages while this one writes them into the copy. Reading a page out of the
/// source file and writing one into the new file each cost about as much as the other, so the
/// copy runs at nearly twice the speed of a single thread. The reader hands over redb's own
/// guards of the values, so a chunk is copied once, from the page it was read into to the
/// page it is written from.
fn copy_chunks(src: &ReadTransaction, c: &mut Copier<'_, '_>) -> Result<()> {
    let table = match src.open_table(CHUNKS) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => {
            return copy_table(src, CHUNKS, c);
        }
        Err(e) => return Err(e.into()),
    };
    let (rows_tx, rows) = crossbeam_channel::bounded::<ChunkRow<'_>>(CHUNKS_AHEAD);
    let table = &table;
    std::thread::scope(|scope| {
        // Owns the sending side, so the writer sees the end of the rows when it returns.
        let reader = scope.spawn(move || {
            let read = || -> Result<()> {
                for row in table.iter()? {
                    let (k, v) = row?;
                    if rows_tx.send(Ok((*k.value(), v))).is_err() {
                        // The writer stopped; it reports why.
                        return Ok(());
                    }
                }
                Ok(())
            };
            if let Err(e) = read() {
                let _ = rows_tx.send(Err(e));
            }
        });
        let written = write_chunks(&rows, c);
        // Unblocks a reader still sending when the writer stopped early.
        drop(rows);
        let _ = reader.join();
        written
    })
}

fn write_chunks(
    rows: &crossbeam_channel::Receiver<ChunkRow<'_>>,
    c: &mut Copier<'_, '_>,
) -> Result<()> {
    in_batches(c, CHUNKS, |out, c| {
        for row in rows.iter() {
            let (key, value) = row?;
            let value = value.value();
            out.insert(&key, value)?;
            if c.copied(key.len() + value.len())? {
                return Ok(true);
            }
        }
        Ok(false)
    })
}

/// The copy's file, as redb sees it, with every sync but the last put off: see the module
/// docs for why each batch commits durably. Skipping those syncs cannot cost the copy its
/// consistency: the copy is a new file that nothing opens until [`write_copy`] returns, after
/// the last commit has really synced, so a crash before then leaves only a partial file for
/// the command to remove, never a database that anyone relies on. Until then the background
/// flush ([`Flusher`]) writes the batches out as they come, so the last sync finds little
/// left to do.
#[derive(Debug)]
struct DeferredSync {
    file: redb::backends::FileBackend,
    /// Set before the last commit: from then on syncs are real.
    sync_now: Arc<AtomicBool>,
}

impl redb::StorageBackend for DeferredSync {
    fn len(&self) -> io::Result<u64> {
        self.file.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        if self.sync_now.load(Ordering::SeqCst) {
            self.file.sync_data()
        } else {
            Ok(())
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.file.close()
    }
}

/// A database opened by a command while no server runs: read-only when the file was closed
/// cleanly, otherwise opened for writing so that redb recovers it exactly as `imgsrv serve`
/// would (after a crash).
pub enum Offline {
    ReadOnly(redb::ReadOnlyDatabase),
    Writable(Database),
}

/// Why a command could not open the database itself.
#[derive(Debug)]
pub enum OfflineError {
    /// A process (the server) has the file open.
    InUse,
    /// The file is damaged beyond opening.
    Damaged(String),
    Other(String),
}

impl std::fmt::Display for OfflineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OfflineError::InUse => {
                f.write_str("the database is open in another process (a running imgsrv serve?)")
            }
            OfflineError::Damaged(m) | OfflineError::Other(m) => f.write_str(m),
        }
    }
}

fn offline_error(path: &Path, e: redb::DatabaseError) -> OfflineError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => OfflineError::InUse,
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)) => {
            OfflineError::Damaged(format!("database {} is damaged: {m}", path.display()))
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == io::ErrorKind::InvalidData =>
        {
            OfflineError::Damaged(format!("database {} is damaged: {io}", path.display()))
        }
        redb::DatabaseError::UpgradeRequired(_) => OfflineError::Damaged(format!(
            "{} is not a database this imgsrv can read",
            path.display()
        )),
        other => OfflineError::Other(format!("cannot open {}: {other}", path.display())),
    }
}

impl Offline {
    /// Opens `path` without a server. `writable` asks for a handle that can write (compaction).
    pub fn open(path: &Path, writable: bool) -> std::result::Result<Offline, OfflineError> {
        if !path.exists() {
            return Err(OfflineError::Other(format!(
                "no database at {}",
                path.display()
            )));
        }
        let guard = |r: std::result::Result<
            std::result::Result<Offline, redb::DatabaseError>,
            String,
        >| match r {
            Ok(Ok(db)) => Ok(db),
            Ok(Err(e)) => Err(offline_error(path, e)),
            Err(panic) => Err(OfflineError::Damaged(format!(
                "database {} is damaged ({panic})",
                path.display()
            ))),
        };
        let cache = 64 * 1024 * 1024;
        if !writable {
            let ro = super::handle::guarded(|| {
                Builder::new()
                    .set_cache_size(cache)
                    .open_read_only(path)
                    .map(Offline::ReadOnly)
            });
            match ro {
                // Not closed cleanly: recover it below, as a server start would.
                Ok(Err(redb::DatabaseError::RepairAborted)) => {}
                other => return guard(other),
            }
        }
        guard(super::handle::guarded(|| {
            Builder::new()
                .set_cache_size(cache)
                .open(path)
                .map(Offline::Writable)
        }))
    }

    pub(crate) fn begin_read(&self) -> Result<ReadTransaction> {
        Ok(match self {
            Offline::ReadOnly(d) => d.begin_read()?,
            Offline::Writable(d) => d.begin_read()?,
        })
    }

    /// Writes a copy of the database into `file` (see [`write_copy`]).
    pub fn backup_into(&self, file: File, pace: Pace<'_>) -> Result<Summary> {
        let txn = self.begin_read()?;
        write_copy(&txn, file, pace)
    }

    /// Compacts the file until redb finds nothing more to move. Needs a writable open.
    pub fn compact(self) -> Result<()> {
        let Offline::Writable(mut db) = self else {
            return Err(Error::internal(
                "compaction needs the database open for writing",
            ));
        };
        let r = super::handle::guarded(|| -> Result<()> {
            while db
                .compact()
                .map_err(|e| Error::internal(format!("compaction failed: {e}")))?
            {}
            Ok(())
        });
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                return Err(Error::internal(format!(
                    "the database is damaged ({panic}); check it with `imgsrv check`"
                )));
            }
        }
        db.close()
            .map_err(|e| Error::internal(format!("closing the database: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableTableMetadata;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// The copy's backend, counting the writes at each offset and the large reads.
    #[derive(Debug)]
    struct Counting {
        inner: DeferredSync,
        writes: Arc<Mutex<HashMap<u64, u32>>>,
        large_reads: Arc<Mutex<u32>>,
        syncs: Arc<Mutex<u32>>,
    }

    /// Writes and reads this large are chunk pages.
    const LARGE: usize = 512 * 1024;

    impl redb::StorageBackend for Counting {
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
            if out.len() >= LARGE {
                *self.large_reads.lock().unwrap() += 1;
            }
            self.inner.read(offset, out)
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&self) -> io::Result<()> {
            if self.inner.sync_now.load(Ordering::SeqCst) {
                *self.syncs.lock().unwrap() += 1;
            }
            self.inner.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            if data.len() >= LARGE {
                *self.writes.lock().unwrap().entry(offset).or_default() += 1;
            }
            self.inner.write(offset, data)
        }
    }

    /// A copy larger than redb's write buffer writes each chunk page once and reads none back
    /// (the batches of non-durable commits it replaced wrote most pages twice; module docs),
    /// syncs only at the end, and holds every chunk.
    #[test]
    fn a_copy_writes_each_chunk_page_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = Database::create(dir.path().join("src.redb")).unwrap();
        const N: u32 = 80;
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let txn = src.begin_write().unwrap();
        {
            let mut t = txn.open_table(CHUNKS).unwrap();
            let mut value = vec![0u8; super::super::chunks::CHUNK_SIZE];
            for i in 0..N {
                for b in value.iter_mut() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }
                let mut key = [0u8; 32];
                key[..4].copy_from_slice(&i.to_be_bytes());
                t.insert(&key, value.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();

        let out = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("copy.redb"))
            .unwrap();
        let sync_now = Arc::new(AtomicBool::new(false));
        let backend = Counting {
            inner: DeferredSync {
                file: redb::backends::FileBackend::new(out).unwrap(),
                sync_now: sync_now.clone(),
            },
            writes: Arc::default(),
            large_reads: Arc::default(),
            syncs: Arc::default(),
        };
        let (writes, large_reads, syncs) = (
            backend.writes.clone(),
            backend.large_reads.clone(),
            backend.syncs.clone(),
        );
        let snapshot = src.begin_read().unwrap();
        let summary = copy_into(
            &snapshot,
            backend,
            &sync_now,
            None,
            Pace {
                rate: None,
                progress: &mut |_, _| {},
                stop: &|| false,
            },
        )
        .unwrap();
        assert_eq!(summary.rows, u64::from(N));

        let writes = writes.lock().unwrap();
        let twice: Vec<_> = writes.iter().filter(|(_, n)| **n > 1).collect();
        assert!(twice.is_empty(), "pages written more than once: {twice:?}");
        assert_eq!(writes.len(), N as usize, "one large write per chunk");
        assert_eq!(*large_reads.lock().unwrap(), 0, "chunk pages read back");
        assert!(*syncs.lock().unwrap() >= 1, "the last commit syncs");

        let copy = Database::open(dir.path().join("copy.redb")).unwrap();
        let read = copy.begin_read().unwrap();
        let t = read.open_table(CHUNKS).unwrap();
        assert_eq!(ReadableTableMetadata::len(&t).unwrap(), u64::from(N));
    }
}
