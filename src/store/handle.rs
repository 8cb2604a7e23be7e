//! The database handle and its health: opening the file (refusing a damaged one cleanly,
//! falling back to read-only on a full disk), classifying redb's failures into the domain's
//! error kinds, and recovering from an I/O error by closing and reopening the file while the
//! process keeps running.
//!
//! Why recovery is needed: after any I/O error (a full disk, most often) redb refuses every
//! later operation, reads included, with "Previous I/O error occurred. Please close and re-open
//! the database." Left alone, one failed write would turn the whole server into a 500
//! machine. Instead the failing request gets its 507 or 500, the error is noted, and the
//! storage doctor (`jobs::start_doctor`) swaps in a freshly opened handle within milliseconds.
//! New transactions wait for nothing: while the swap runs they are answered 503.

use crate::error::{Error, Kind, Result};
use redb::{
    Builder, Database, DatabaseError, ReadOnlyDatabase, ReadTransaction, ReadableDatabase,
    WriteTransaction,
};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// What the store can do right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Reads and writes work.
    Writable = 0,
    /// Only reads work: the file could not be opened for writing (the disk is full).
    ReadOnly = 1,
    /// The handle is being reopened after an I/O error; nothing works for a moment.
    Recovering = 2,
}

enum Db {
    Writable(Database),
    ReadOnly(ReadOnlyDatabase),
}

/// Why the database could not be opened at start-up.
#[derive(Debug)]
pub enum OpenError {
    /// The file is damaged: redb reported corruption or panicked on it.
    Damaged(String),
    /// Anything else (another process holds it, permissions, I/O).
    Other(String),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Damaged(m) | OpenError::Other(m) => f.write_str(m),
        }
    }
}

/// Storage failures by class, exported as `imgsrv_storage_errors_total{kind}`.
pub static NO_SPACE_ERRORS: AtomicU64 = AtomicU64::new(0);
pub static IO_ERRORS: AtomicU64 = AtomicU64::new(0);
pub static DAMAGE_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Completed reopenings of the database file after an I/O error.
pub static RECOVERIES: AtomicU64 = AtomicU64::new(0);

/// Set when redb reported an I/O error: the handle is poisoned and must be reopened. There is
/// one database per process, so a process-wide flag is exact.
static NEEDS_REOPEN: AtomicBool = AtomicBool::new(false);

/// The I/O error that last asked for a reopen, for the log line that reports it.
static LAST_FAULT: Mutex<String> = Mutex::new(String::new());

pub(crate) fn needs_reopen() -> bool {
    NEEDS_REOPEN.load(Ordering::SeqCst)
}

/// Notes an I/O error: the handle must be reopened.
fn fault(cause: &str) {
    if let Ok(mut last) = LAST_FAULT.lock() {
        cause.clone_into(&mut last);
    }
    NEEDS_REOPEN.store(true, Ordering::SeqCst);
}

/// The I/O error that last asked for a reopen.
pub fn last_fault() -> String {
    LAST_FAULT.lock().map(|s| s.clone()).unwrap_or_default()
}

pub(crate) struct Handle {
    path: PathBuf,
    cache_bytes: usize,
    db: RwLock<Option<Arc<Db>>>,
    health: AtomicU8,
    /// Serialises recoveries.
    recovering: Mutex<()>,
}

const RECOVERING: &str = "storage is recovering from an I/O error; retry in a moment";

impl Handle {
    /// Opens the file for writing; on a full disk, releases the headroom file and tries again,
    /// then falls back to read-only so that at least downloads are served.
    pub(crate) fn open(
        path: &Path,
        cache_bytes: usize,
        release_headroom: &dyn Fn() -> bool,
    ) -> std::result::Result<Handle, OpenError> {
        let db = open_file(path, cache_bytes, release_headroom)?;
        let health = match db {
            Db::Writable(_) => Health::Writable,
            Db::ReadOnly(_) => Health::ReadOnly,
        };
        Ok(Handle {
            path: path.to_path_buf(),
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
            health: AtomicU8::new(health as u8),
            recovering: Mutex::new(()),
        })
    }

    pub(crate) fn health(&self) -> Health {
        match self.health.load(Ordering::SeqCst) {
            0 => Health::Writable,
            1 => Health::ReadOnly,
            _ => Health::Recovering,
        }
    }

    fn current(&self) -> Result<Arc<Db>> {
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or_else(|| Error::unavailable(RECOVERING))
    }

    pub(crate) fn begin_read(&self) -> Result<ReadTransaction> {
        let db = self.current()?;
        let txn = match &*db {
            Db::Writable(d) => d.begin_read(),
            Db::ReadOnly(d) => d.begin_read(),
        };
        Ok(txn?)
    }

    pub(crate) fn begin_write(&self) -> Result<WriteTransaction> {
        let db = self.current()?;
        match &*db {
            Db::Writable(d) => Ok(d.begin_write()?),
            Db::ReadOnly(_) => Err(Error::insufficient_storage(
                "the store is read-only because its disk was full when the database was opened; \
                 writes resume once space is freed",
            )),
        }
    }

    /// Closes the current handle and opens the file again. Transactions already running on
    /// the old handle fail (their clients see an error or a short body, as they would have
    /// anyway on a poisoned handle); new ones get 503 until the swap is done.
    pub(crate) fn recover(&self, release_headroom: &dyn Fn() -> bool) -> Health {
        let _one = self.recovering.lock().unwrap_or_else(|p| p.into_inner());
        NEEDS_REOPEN.store(false, Ordering::SeqCst);
        let before = self.health();
        self.health
            .store(Health::Recovering as u8, Ordering::SeqCst);
        let old = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(old) = old {
            close(old);
        }
        match open_file(&self.path, self.cache_bytes, release_headroom) {
            Ok(db) => {
                let health = match db {
                    Db::Writable(_) => Health::Writable,
                    Db::ReadOnly(_) => Health::ReadOnly,
                };
                *self.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
                self.health.store(health as u8, Ordering::SeqCst);
                RECOVERIES.fetch_add(1, Ordering::Relaxed);
                if health != before || before == Health::Writable {
                    crate::log::warn(&format!(
                        "database {} reopened {}",
                        self.path.display(),
                        match health {
                            Health::Writable => "for reading and writing",
                            _ => "read-only (the disk is still full)",
                        }
                    ));
                }
                health
            }
            Err(e) => {
                // Try again at the next tick of the doctor.
                NEEDS_REOPEN.store(true, Ordering::SeqCst);
                crate::log::error(&format!(
                    "cannot reopen database {}: {e}",
                    self.path.display()
                ));
                Health::Recovering
            }
        }
    }

    /// Closes the database for good (shutdown), so the file is released before the process
    /// exits even if a straggling reader still holds a transaction.
    pub(crate) fn close(&self) {
        if let Some(old) = self.db.write().unwrap_or_else(|p| p.into_inner()).take() {
            close(old);
        }
    }
}

/// Waits briefly for threads that are between cloning the handle and starting their
/// transaction, then closes it. A handle still shared after that closes when its last user
/// drops it; the reopen then fails as "already open" and is retried.
fn close(old: Arc<Db>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut old = old;
    loop {
        match Arc::try_unwrap(old) {
            Ok(Db::Writable(d)) => {
                let _ = d.close();
                return;
            }
            Ok(Db::ReadOnly(d)) => {
                let _ = d.close();
                return;
            }
            Err(shared) if Instant::now() < deadline => {
                old = shared;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(_) => return,
        }
    }
}

fn open_file(
    path: &Path,
    cache_bytes: usize,
    release_headroom: &dyn Fn() -> bool,
) -> std::result::Result<Db, OpenError> {
    let writable = || {
        guarded(|| {
            Builder::new()
                .set_cache_size(cache_bytes)
                .create(path)
                .map(Db::Writable)
        })
    };
    let mut result = writable();
    if matches!(&result, Ok(Err(e)) if database_error_is_no_space(e)) && release_headroom() {
        crate::log::warn("the disk is full: released the headroom file to open the database");
        result = writable();
    }
    let first = match result {
        Ok(Ok(db)) => return Ok(db),
        Ok(Err(e)) => e,
        Err(panic) => return Err(damaged(path, &panic)),
    };
    if database_error_is_no_space(&first) {
        // A file that was closed cleanly can still be read without writing anything.
        match guarded(|| {
            Builder::new()
                .set_cache_size(cache_bytes)
                .open_read_only(path)
        }) {
            Ok(Ok(db)) => {
                crate::log::error(&format!(
                    "the disk holding {} is full: opened the database read-only; \
                     downloads and listings are served, writes answer 507 until space is freed",
                    path.display()
                ));
                return Ok(Db::ReadOnly(db));
            }
            Ok(Err(e)) => {
                return Err(OpenError::Other(format!(
                    "cannot open database {}: the disk is full ({first}) and it cannot be \
                     opened read-only ({e}); free some space on its filesystem",
                    path.display()
                )));
            }
            Err(panic) => return Err(damaged(path, &panic)),
        }
    }
    Err(match first {
        DatabaseError::DatabaseAlreadyOpen => OpenError::Other(format!(
            "database {} is already open by another process (is imgsrv already running?)",
            path.display()
        )),
        DatabaseError::Storage(redb::StorageError::Corrupted(m)) => damaged(path, &m),
        DatabaseError::UpgradeRequired(_) => damaged(path, "not a database this imgsrv can read"),
        DatabaseError::Storage(redb::StorageError::Io(e))
            if e.kind() == std::io::ErrorKind::InvalidData =>
        {
            damaged(path, &e.to_string())
        }
        other => OpenError::Other(format!("cannot open database {}: {other}", path.display())),
    })
}

pub(crate) fn damaged(path: &Path, what: &str) -> OpenError {
    OpenError::Damaged(format!(
        "database {} is damaged ({what}); check it with `imgsrv check --data-dir {}` \
         and restore it from a backup",
        path.display(),
        path.parent().unwrap_or(Path::new(".")).display()
    ))
}

fn database_error_is_no_space(e: &DatabaseError) -> bool {
    match e {
        DatabaseError::Storage(redb::StorageError::Io(io)) => io_is_no_space(io),
        _ => false,
    }
}

fn io_is_no_space(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

thread_local! {
    /// Set while a call that may meet a damaged file runs under [`guarded`], so the panic hook
    /// stays quiet: the panic is turned into an error that says what happened.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the current thread is inside [`guarded`] (the panic hook consults it).
pub fn panic_is_guarded() -> bool {
    GUARDED.with(|g| g.get())
}

/// Runs `f`, turning a panic into `Err(message)`. redb may panic on a damaged page (it trusts
/// what it wrote); this is how damage met at start-up or while serving a blob becomes a clean
/// refusal or a short response instead of a crashed thread.
pub fn guarded<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    let was = GUARDED.with(|g| g.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    r.map_err(|p| {
        DAMAGE_ERRORS.fetch_add(1, Ordering::Relaxed);
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the storage engine panicked".into())
    })
}

/// Classifies a redb failure. An I/O error poisons redb's handle, so it also asks for a
/// reopen; a full disk is a 507; damage is reported as such (never as wrong data).
impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        match e {
            redb::Error::Io(io) if io_is_no_space(&io) => {
                NO_SPACE_ERRORS.fetch_add(1, Ordering::Relaxed);
                fault(&io.to_string());
                Error::insufficient_storage(
                    "insufficient storage: the data directory's filesystem is full; \
                     the write was not stored",
                )
            }
            redb::Error::Io(io) => {
                IO_ERRORS.fetch_add(1, Ordering::Relaxed);
                fault(&io.to_string());
                Error::internal(format!("storage failure: I/O error: {io}"))
            }
            redb::Error::PreviousIo => {
                NEEDS_REOPEN.store(true, Ordering::SeqCst);
                Error::unavailable(RECOVERING)
            }
            redb::Error::DatabaseClosed => Error::unavailable(RECOVERING),
            redb::Error::Corrupted(m) => {
                DAMAGE_ERRORS.fetch_add(1, Ordering::Relaxed);
                Error::new(Kind::Internal, format!("stored data is damaged: {m}"))
            }
            other => Error::internal(format!("storage failure: {other}")),
        }
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::from(redb::Error::from(e))
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::DatabaseError,
    redb::SetDurabilityError
);
