//! Disk space: what the data directory's filesystem has free, the reserve that writes must
//! leave, admission of writes before their bytes are read, and the headroom file.
//!
//! The reserve (`--disk-reserve`) keeps the filesystem from being filled to the last byte by
//! uploads, so that small catalog writes, redb's own bookkeeping and a restart keep working.
//! A part upload is admitted only when its declared length fits in what the database file
//! can reuse plus what the filesystem has free beyond the reserve; parts being received count
//! against that until they finish, so two concurrent uploads cannot both take the same space.
//!
//! The headroom file (`imgsrv.headroom`, `min(reserve, 32 MiB)` of allocated blocks) is
//! space imgsrv holds back for itself: when the disk fills anyway (another process wrote to
//! it) and the database cannot be opened or reopened for lack of space, imgsrv deletes it and
//! tries again. It is recreated once the filesystem has room for it beyond the reserve.

use super::Store;
use super::chunks::CHUNK_SIZE;
use super::tables::META;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The name of the headroom file inside the data directory.
pub const HEADROOM_FILE: &str = "imgsrv.headroom";
const MAX_HEADROOM: u64 = 32 * 1024 * 1024;

pub(crate) struct Space {
    dir: PathBuf,
    db_file: PathBuf,
    reserve: u64,
    /// Bytes of part uploads admitted and still being received.
    in_flight: AtomicU64,
}

/// A part upload's claim on space; released when the upload ends, however it ends.
pub struct Admission<'a> {
    space: &'a Space,
    bytes: u64,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        self.space.in_flight.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// An [`Admission`] that owns its store, for a claim that outlives the request handler: a part
/// body the front door receives after the handler has answered with a `receive` directive.
pub struct OwnedAdmission {
    store: Arc<Store>,
    bytes: u64,
}

impl Drop for OwnedAdmission {
    fn drop(&mut self) {
        self.store
            .space
            .in_flight
            .fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl Space {
    pub(crate) fn new(db_file: &Path, reserve: u64) -> Space {
        Space {
            dir: db_file.parent().unwrap_or(Path::new(".")).to_path_buf(),
            db_file: db_file.to_path_buf(),
            reserve,
            in_flight: AtomicU64::new(0),
        }
    }

    pub(crate) fn headroom_bytes(&self) -> u64 {
        self.reserve.min(MAX_HEADROOM)
    }

    fn headroom_path(&self) -> PathBuf {
        self.dir.join(HEADROOM_FILE)
    }

    /// Deletes the headroom file; returns whether there was one to delete.
    pub(crate) fn release_headroom(&self) -> bool {
        std::fs::remove_file(self.headroom_path()).is_ok()
    }

    /// Creates the headroom file when it is missing and the filesystem can spare it beyond the
    /// reserve. Its blocks are allocated (not a sparse file), so deleting it really frees them.
    pub(crate) fn ensure_headroom(&self) {
        let size = self.headroom_bytes();
        let path = self.headroom_path();
        if size == 0 || path.exists() {
            return;
        }
        match filesystem_free(&self.dir) {
            Ok(free) if free >= self.reserve + size => {}
            _ => return,
        }
        let tmp = self.dir.join(format!("{HEADROOM_FILE}.tmp"));
        let made = std::fs::File::create(&tmp).and_then(|f| {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size)?;
            f.sync_all()
        });
        match made.and_then(|_| std::fs::rename(&tmp, &path)) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                crate::log::warn(&format!(
                    "cannot create the headroom file {}: {e}",
                    path.display()
                ));
            }
        }
    }

    pub(crate) fn filesystem_free(&self) -> u64 {
        filesystem_free(&self.dir).unwrap_or(0)
    }

    pub(crate) fn file_bytes(&self) -> u64 {
        std::fs::metadata(&self.db_file)
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// The bytes of the database file that the filesystem has actually allocated. redb grows
    /// its file with `set_len`, so the tail past what it wrote is a hole that takes no space
    /// yet: only allocated blocks can be reused without taking more of the disk.
    pub(crate) fn file_allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&self.db_file)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0)
    }

    pub(crate) fn reserve(&self) -> u64 {
        self.reserve
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn filesystem_free(dir: &Path) -> std::io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

impl Store {
    /// A conservative estimate of the space inside the database file that redb can reuse:
    /// the file's allocated bytes minus a full page for every stored chunk (a chunk takes at
    /// most one 1 MiB page, which also over-counts the small last chunk of each part enough to
    /// cover the catalog and redb's own pages) and a small margin. Measured on a 96 MiB file
    /// of 100 chunks: 0.25 MiB of pages besides the chunks'. Should it guess high, the write
    /// meets a real "no space" error, answered 507 and recovered from like any other. Space freed by an abort
    /// or by garbage collection shows up here at once, without waiting for a compaction.
    fn reusable_in_file(&self) -> u64 {
        let chunks = self
            .begin_read()
            .and_then(|txn| {
                let meta = txn.open_table(META)?;
                Ok(meta.get("chunk_count")?.map(|v| v.value()).unwrap_or(0))
            })
            .unwrap_or(u64::MAX / (2 * 1024 * 1024));
        let file = self.space.file_allocated_bytes();
        let page = (CHUNK_SIZE as u64 + 64).next_power_of_two();
        file.saturating_sub(chunks.saturating_mul(page))
            .saturating_sub(file / 256 + 1024 * 1024)
    }

    /// Bytes a new write may use now: what the file can reuse, plus what the filesystem has
    /// free beyond the reserve, minus parts already admitted and still arriving.
    pub fn usable_bytes(&self) -> u64 {
        let free = self.space.filesystem_free();
        (self.reusable_in_file() + free.saturating_sub(self.space.reserve()))
            .saturating_sub(self.space.in_flight.load(Ordering::SeqCst))
    }

    /// Admits a write of `bytes`, or refuses it with 507 before anything is read or stored.
    /// The claim lasts as long as the returned guard.
    pub fn admit(&self, bytes: u64) -> Result<Admission<'_>> {
        self.claim(bytes)?;
        Ok(Admission {
            space: &self.space,
            bytes,
        })
    }

    /// [`Store::admit`] with a claim that holds the store itself.
    pub fn admit_owned(self: &Arc<Self>, bytes: u64) -> Result<OwnedAdmission> {
        self.claim(bytes)?;
        Ok(OwnedAdmission {
            store: self.clone(),
            bytes,
        })
    }

    fn claim(&self, bytes: u64) -> Result<()> {
        let usable = self.usable_bytes();
        if bytes > usable {
            let free = self.space.filesystem_free();
            crate::log::warn(&format!(
                "refused a {bytes}-byte write with 507: {usable} bytes usable, {free} free on \
                 the filesystem of {} ({} kept in reserve)",
                self.space.dir().display(),
                self.space.reserve()
            ));
            return Err(Error::insufficient_storage(format!(
                "insufficient storage: the write needs {bytes} bytes but only {usable} are \
                 usable ({free} bytes free on the data filesystem, {} kept in reserve)",
                self.space.reserve()
            )));
        }
        self.space.in_flight.fetch_add(bytes, Ordering::SeqCst);
        Ok(())
    }

    /// Free bytes on the data directory's filesystem (exported as a metric).
    pub fn filesystem_free(&self) -> u64 {
        self.space.filesystem_free()
    }

    /// The size of the database file (exported as a metric).
    pub fn file_bytes(&self) -> u64 {
        self.space.file_bytes()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.space.dir()
    }

    /// The configured reserve in bytes.
    pub fn reserve_bytes(&self) -> u64 {
        self.space.reserve()
    }
}
