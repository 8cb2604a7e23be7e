//! Live backup: a logical dump of every table from ONE read transaction, and the restore that
//! writes such a dump into a fresh redb file.
//!
//! Why a logical dump rather than a copy of the file: redb locks its file for one process, and
//! the alternative that lets a second process read alongside the writer (redb's
//! `ConcurrencyMode::SingleWriter`) refuses `Durability::None` commits, which every chunk of a
//! part upload uses. A read transaction, on the other hand, is a consistent snapshot that
//! neither waits for writers nor makes them wait, so the running server streams the dump over
//! its admin socket (`crate::admin`) and the `imgsrv backup` command restores it into the
//! output file. With no server running, the command opens the database itself and runs the
//! very same dump into the very same restore through a pipe.
//!
//! The copy is a fresh file: it holds only live data (a compacted copy, in effect), and is
//! written with large non-durable transactions and one durable commit at the end, so that it
//! runs at disk speed.
//!
//! Stream format (integers big-endian):
//! `MAGIC | u32 FORMAT | u64 estimated bytes | u32 table count`, then per table
//! `'T' | u16 name length | name | u64 rows` followed by the rows as
//! `'R' | u32 key length | key | u32 value length | value` and `'E'`; at the end
//! `'Z' | u64 rows | u64 bytes`. `'X' | u32 length | message` in place of any frame reports a
//! failure on the dumping side. Keys and values are redb's own byte encodings of their types.

use super::Store;
use super::tables::*;
use crate::error::{Error, Result};
use redb::{
    Builder, Database, Durability, Key, ReadTransaction, ReadableDatabase, ReadableTable,
    ReadableTableMetadata, TableDefinition, TableHandle, Value, WriteTransaction,
};
use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: &[u8; 12] = b"imgsrv-dump\n";
const FORMAT: u32 = 1;

/// The buffer size for the stream on either side. Smaller than a chunk on purpose: `BufWriter`
/// and `BufReader` pass a write or read at least this large straight through, so chunk bytes
/// are not copied into and out of the buffers, while the small frames around them still are
/// gathered into few system calls.
pub const STREAM_BUFFER: usize = 64 * 1024;

/// Restored bytes per non-durable transaction: large enough that commits cost nothing, small
/// enough that the pages a transaction holds in memory stay bounded.
const COMMIT_EVERY: u64 = 64 * 1024 * 1024;

/// What a dump or a restore moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Summary {
    pub tables: u32,
    pub rows: u64,
    /// Key and value bytes.
    pub bytes: u64,
}

/// Dumps one table, typed by its definition.
type DumpFn = fn(&ReadTransaction, &mut Dumper<'_>) -> Result<()>;
/// Restores the rows of one table from the stream.
type RestoreFn = fn(&mut Restorer<'_>, u64) -> Result<()>;

struct TableOps {
    name: String,
    dump: DumpFn,
    restore: RestoreFn,
}

macro_rules! ops {
    ($($def:ident),* $(,)?) => {
        vec![$(TableOps {
            name: $def.name().to_string(),
            dump: |txn, d| dump_table(txn, $def, d),
            restore: |r, rows| restore_table(r, $def, rows),
        }),*]
    };
}

/// The chunk table holds nearly all the bytes: its values are read from the stream straight
/// into the pages redb reserves for them, saving a copy of every byte.
fn chunk_ops() -> TableOps {
    TableOps {
        name: CHUNKS.name().to_string(),
        dump: |txn, d| dump_table(txn, CHUNKS, d),
        restore: restore_chunks,
    }
}

/// Every table of `tables.rs`. A table missing here would be missing from every backup, so a
/// dump refuses a database that holds a table this list does not name (a test backs up a
/// database with every table in use).
fn all_tables() -> Vec<TableOps> {
    ops!(
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
    .chain([chunk_ops()])
    .collect()
}

/// The writing side of a dump. `stop` is polled between rows so that a server shutting down
/// ends a dump promptly.
pub struct Dumper<'a> {
    out: &'a mut dyn Write,
    stop: &'a dyn Fn() -> bool,
    summary: Summary,
}

impl Dumper<'_> {
    fn table(&mut self, name: &str, rows: u64) -> Result<()> {
        let mut head = Vec::with_capacity(11 + name.len());
        head.push(b'T');
        head.extend_from_slice(&(name.len() as u16).to_be_bytes());
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(&rows.to_be_bytes());
        self.write(&head)
    }

    fn row(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if self.summary.rows.is_multiple_of(64) && (self.stop)() {
            return Err(Error::unavailable(
                "the server is shutting down; the backup was not finished",
            ));
        }
        let mut head = [0u8; 5];
        head[0] = b'R';
        head[1..].copy_from_slice(&(key.len() as u32).to_be_bytes());
        self.write(&head)?;
        self.write(key)?;
        self.write(&(value.len() as u32).to_be_bytes())?;
        self.write(value)?;
        self.summary.rows += 1;
        self.summary.bytes += (key.len() + value.len()) as u64;
        Ok(())
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out
            .write_all(b)
            .map_err(|e| Error::internal(format!("sending the backup stream: {e}")))
    }
}

fn dump_table<K: Key + 'static, V: Value + 'static>(
    txn: &ReadTransaction,
    def: TableDefinition<K, V>,
    d: &mut Dumper<'_>,
) -> Result<()> {
    let table = match txn.open_table(def) {
        Ok(t) => t,
        // A database that never had this table (created before it existed and not yet opened
        // by a newer server) simply has no rows in it.
        Err(redb::TableError::TableDoesNotExist(_)) => {
            d.table(def.name(), 0)?;
            return d.write(b"E");
        }
        Err(e) => return Err(e.into()),
    };
    d.table(def.name(), table.len()?)?;
    for row in table.iter()? {
        let (k, v) = row?;
        let (key, value) = (k.value(), v.value());
        d.row(K::as_bytes(&key).as_ref(), V::as_bytes(&value).as_ref())?;
    }
    d.write(b"E")
}

/// Writes the dump of the snapshot `txn` to `out`. On failure an error frame is written (if
/// the stream still works) so the reading side reports the cause.
pub(crate) fn dump_txn(
    txn: &ReadTransaction,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<Summary> {
    let result = super::handle::guarded(|| dump_inner(txn, out, stop)).unwrap_or_else(|panic| {
        Err(Error::internal(format!(
            "the database is damaged ({panic}); check it with `imgsrv check`"
        )))
    });
    if let Err(e) = &result {
        let msg = e.detail.as_bytes();
        let mut frame = vec![b'X'];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(msg);
        let _ = out.write_all(&frame).and_then(|_| out.flush());
    }
    result
}

fn dump_inner(
    txn: &ReadTransaction,
    out: &mut dyn Write,
    stop: &dyn Fn() -> bool,
) -> Result<Summary> {
    let tables = all_tables();
    // Refuse rather than leave a table out of the copy.
    for handle in txn.list_tables()? {
        let name = handle.name().to_string();
        if !tables.iter().any(|t| t.name == name) {
            return Err(Error::internal(format!(
                "the database holds a table {name:?} that this imgsrv cannot back up; \
                 use the imgsrv binary that wrote it"
            )));
        }
    }
    // Chunk bytes dominate; the estimate only drives the progress display.
    let estimate = match txn.open_table(META) {
        Ok(meta) => meta.get("chunk_bytes")?.map(|v| v.value()).unwrap_or(0),
        Err(_) => 0,
    };
    let mut d = Dumper {
        out,
        stop,
        summary: Summary::default(),
    };
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&FORMAT.to_be_bytes());
    head.extend_from_slice(&estimate.to_be_bytes());
    head.extend_from_slice(&(tables.len() as u32).to_be_bytes());
    d.write(&head)?;
    for t in &tables {
        (t.dump)(txn, &mut d)?;
        d.summary.tables += 1;
    }
    let mut end = vec![b'Z'];
    end.extend_from_slice(&d.summary.rows.to_be_bytes());
    end.extend_from_slice(&d.summary.bytes.to_be_bytes());
    d.write(&end)?;
    d.out
        .flush()
        .map_err(|e| Error::internal(format!("sending the backup stream: {e}")))?;
    Ok(d.summary)
}

impl Store {
    /// Streams a consistent dump of the whole database to `out` from one read transaction:
    /// downloads and writes carry on meanwhile. `stop` aborts it between rows.
    pub fn dump(&self, out: &mut dyn Write, stop: &dyn Fn() -> bool) -> Result<Summary> {
        let txn = self.begin_read()?;
        dump_txn(&txn, out, stop)
    }
}

/// The reading side: decodes the stream into a new database file.
pub struct Restorer<'a> {
    input: &'a mut dyn Read,
    db: &'a Database,
    txn: Option<WriteTransaction>,
    since_commit: u64,
    key: Vec<u8>,
    value: Vec<u8>,
    summary: Summary,
    estimate: u64,
    progress: &'a mut dyn FnMut(u64, u64),
    flusher: Flusher,
}

fn stream_error(e: io::Error) -> Error {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Error::internal("the backup stream ended early (did the server stop?)")
    } else {
        Error::internal(format!("reading the backup stream: {e}"))
    }
}

impl Restorer<'_> {
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        self.input.read_exact(&mut b).map_err(stream_error)?;
        Ok(b)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        let mut b = [0u8; 4];
        self.input.read_exact(&mut b).map_err(stream_error)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.input.read_exact(&mut b).map_err(stream_error)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads a frame tag; an error frame becomes the error it carries.
    fn tag(&mut self) -> Result<u8> {
        let tag = self.u8()?;
        if tag == b'X' {
            let n = self.u32()? as usize;
            let msg = self.bytes(n.min(64 * 1024))?;
            return Err(Error::internal(format!(
                "the dump failed: {}",
                String::from_utf8_lossy(&msg)
            )));
        }
        Ok(tag)
    }

    /// Reads one row into the key and value buffers.
    fn row(&mut self) -> Result<()> {
        let n = self.row_head()?;
        self.value.resize(n, 0);
        self.input
            .read_exact(&mut self.value)
            .map_err(stream_error)?;
        self.count(n);
        Ok(())
    }

    /// Reads a row's tag and key into the key buffer; returns the length of its value, which
    /// the caller reads next.
    fn row_head(&mut self) -> Result<usize> {
        match self.tag()? {
            b'R' => {}
            t => return Err(bad_stream(&format!("expected a row, found {t:#x}"))),
        }
        let n = self.u32()? as usize;
        self.key.resize(n, 0);
        self.input.read_exact(&mut self.key).map_err(stream_error)?;
        Ok(self.u32()? as usize)
    }

    fn count(&mut self, value_len: usize) {
        self.count_bytes(self.key.len() + value_len);
    }

    fn count_bytes(&mut self, len: usize) {
        let len = len as u64;
        self.summary.rows += 1;
        self.summary.bytes += len;
        self.since_commit += len;
        if self.summary.rows.is_multiple_of(32) {
            (self.progress)(self.summary.bytes, self.estimate);
        }
    }

    /// The running batch transaction, begun if there is none; hand it back with `self.txn`.
    fn take_txn(&mut self) -> Result<WriteTransaction> {
        match self.txn.take() {
            Some(txn) => Ok(txn),
            None => {
                let mut txn = self.db.begin_write()?;
                txn.set_durability(Durability::None)?;
                Ok(txn)
            }
        }
    }

    /// Commits the running transaction if it has grown past the batch size.
    fn due(&self) -> bool {
        self.since_commit >= COMMIT_EVERY
    }

    fn commit(&mut self, durability: Durability) -> Result<()> {
        if let Some(mut txn) = self.txn.take() {
            txn.set_durability(durability)?;
            txn.commit()?;
        }
        self.since_commit = 0;
        if matches!(durability, Durability::None) {
            self.flusher.kick();
        }
        Ok(())
    }
}

/// Writes the new file's dirty pages to disk in the background while the copy goes on, so the
/// final durable commit finds little left to write: the kernel would otherwise hold the whole
/// copy in its page cache and write it all at that last `fsync`, after the copying is done.
struct Flusher {
    kick: Option<std::sync::mpsc::SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    fn new(path: &Path) -> Flusher {
        let Ok(file) = std::fs::File::open(path) else {
            return Flusher {
                kick: None,
                thread: None,
            };
        };
        // One pending request is enough: a flush that starts later covers every batch before.
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("backup-flush".into())
            .spawn(move || {
                while rx.recv().is_ok() {
                    let _ = file.sync_data();
                }
            })
            .ok();
        Flusher {
            kick: Some(tx),
            thread,
        }
    }

    fn kick(&self) {
        if let Some(tx) = &self.kick {
            let _ = tx.try_send(());
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.kick = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn bad_stream(what: &str) -> Error {
    Error::internal(format!("the backup stream is malformed: {what}"))
}

fn restore_table<K: Key + 'static, V: Value + 'static>(
    r: &mut Restorer<'_>,
    def: TableDefinition<K, V>,
    rows: u64,
) -> Result<()> {
    let mut left = rows;
    loop {
        let txn = r.take_txn()?;
        {
            // Creates the table even when it has no rows, as the server's open does.
            let mut table = txn.open_table(def)?;
            while left > 0 && !r.due() {
                r.row()?;
                table.insert(K::from_bytes(&r.key), V::from_bytes(&r.value))?;
                left -= 1;
            }
        }
        r.txn = Some(txn);
        if left == 0 {
            break;
        }
        r.commit(Durability::None)?;
    }
    match r.tag()? {
        b'E' => Ok(()),
        t => Err(bad_stream(&format!(
            "table {} has more rows than announced ({t:#x})",
            def.name()
        ))),
    }
}

/// Like `restore_table` for `CHUNKS`, with each value read into its reserved page.
fn restore_chunks(r: &mut Restorer<'_>, rows: u64) -> Result<()> {
    let mut left = rows;
    loop {
        let txn = r.take_txn()?;
        {
            let mut table = txn.open_table(CHUNKS)?;
            while left > 0 && !r.due() {
                let n = r.row_head()?;
                let key: [u8; 32] =
                    r.key.as_slice().try_into().map_err(|_| {
                        bad_stream(&format!("a chunk key of {} bytes", r.key.len()))
                    })?;
                let mut page = table.insert_reserve(&key, n)?;
                r.input.read_exact(page.as_mut()).map_err(stream_error)?;
                drop(page);
                r.count(n);
                left -= 1;
            }
        }
        r.txn = Some(txn);
        if left == 0 {
            break;
        }
        r.commit(Durability::None)?;
    }
    match r.tag()? {
        b'E' => Ok(()),
        t => Err(bad_stream(&format!(
            "the chunk table has more rows than announced ({t:#x})"
        ))),
    }
}

/// Reads a dump from `input` and writes it as a new database at `out` (which must not exist).
/// `progress` is told the bytes restored so far and the estimated total. The file is complete
/// and durable when this returns; the caller renames it into place.
pub fn restore(
    input: &mut dyn Read,
    out: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Summary> {
    let mut magic = [0u8; 12];
    input.read_exact(&mut magic[..1]).map_err(stream_error)?;
    if magic[0] == b'X' {
        // Refused before it began (another backup runs, say): the frame says why.
        let mut len = [0u8; 4];
        input.read_exact(&mut len).map_err(stream_error)?;
        let mut msg = vec![0u8; (u32::from_be_bytes(len) as usize).min(64 * 1024)];
        input.read_exact(&mut msg).map_err(stream_error)?;
        return Err(Error::internal(format!(
            "the server refused: {}",
            String::from_utf8_lossy(&msg)
        )));
    }
    input.read_exact(&mut magic[1..]).map_err(stream_error)?;
    if &magic != MAGIC {
        return Err(bad_stream("it does not start like an imgsrv dump"));
    }
    let db = Builder::new()
        .set_cache_size(64 * 1024 * 1024)
        .create(out)
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", out.display())))?;
    let tables = all_tables();
    let mut r = Restorer {
        input,
        db: &db,
        txn: None,
        since_commit: 0,
        key: Vec::new(),
        value: Vec::new(),
        summary: Summary::default(),
        estimate: 0,
        progress,
        flusher: Flusher::new(out),
    };
    let format = r.u32()?;
    if format != FORMAT {
        return Err(bad_stream(&format!(
            "format {format}, this imgsrv reads format {FORMAT}; use the server's own binary"
        )));
    }
    r.estimate = r.u64()?;
    let count = r.u32()?;
    for _ in 0..count {
        match r.tag()? {
            b'T' => {}
            t => return Err(bad_stream(&format!("expected a table, found {t:#x}"))),
        }
        let n = r.bytes(2)?;
        let name = r.bytes(u16::from_be_bytes([n[0], n[1]]) as usize)?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let rows = r.u64()?;
        let ops = tables.iter().find(|t| t.name == name).ok_or_else(|| {
            Error::internal(format!(
                "the dump holds a table {name:?} that this imgsrv does not know; \
                 run the backup with the server's own binary"
            ))
        })?;
        (ops.restore)(&mut r, rows)?;
        r.summary.tables += 1;
    }
    match r.tag()? {
        b'Z' => {}
        t => return Err(bad_stream(&format!("expected the end, found {t:#x}"))),
    }
    let (rows, bytes) = (r.u64()?, r.u64()?);
    if (rows, bytes) != (r.summary.rows, r.summary.bytes) {
        return Err(bad_stream(&format!(
            "the dump announced {rows} rows and {bytes} bytes, {} and {} arrived",
            r.summary.rows, r.summary.bytes
        )));
    }
    // Every table is created even in an empty database, so one durable commit always runs:
    // it makes the non-durable batches before it durable too.
    let txn = r.take_txn()?;
    r.txn = Some(txn);
    r.commit(Durability::Immediate)?;
    (r.progress)(r.summary.bytes, r.estimate.max(r.summary.bytes));
    let summary = r.summary;
    drop(r);
    db.close()
        .map_err(|e| Error::internal(format!("closing {}: {e}", out.display())))?;
    Ok(summary)
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

    /// Dumps the database (see [`Store::dump`]).
    pub fn dump(&self, out: &mut dyn Write) -> Result<Summary> {
        let txn = self.begin_read()?;
        dump_txn(&txn, out, &|| false)
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
