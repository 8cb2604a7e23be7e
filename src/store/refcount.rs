//! Reference counts of chunks (`CHUNK_REFS`) and blobs (`BLOB_REFS`), changed one reference at
//! a time and only through these types, inside the caller's write transaction.
//!
//! A count that would drop below zero is a bug (a reference released twice, or one never
//! taken): the decrement fails with an internal error naming the key, which rolls the
//! transaction back, rather than clamping at zero and letting the bug free a chunk or a blob
//! that something still uses.

use super::tables::{BLOB_REFS, CHUNK_REFS};
use crate::clock::Timestamp;
use crate::digest::Digest;
use crate::error::{Error, Result};
use redb::{ReadableTable, Table, WriteTransaction};

/// One fewer than `count`, or the error that names what had no reference left.
fn one_less(count: u64, what: impl FnOnce() -> String) -> Result<u64> {
    count.checked_sub(1).ok_or_else(|| {
        Error::internal(format!(
            "{} has no reference left to drop; its reference count is wrong",
            what()
        ))
    })
}

/// The number of references to each stored chunk: blob chunk lists, upload parts and staged
/// part chunks. A chunk's row goes when its count reaches zero.
pub(super) struct ChunkRefs<'txn>(Table<'txn, &'static [u8; 32], u64>);

impl<'txn> ChunkRefs<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self> {
        Ok(ChunkRefs(txn.open_table(CHUNK_REFS)?))
    }

    pub fn count(&self, hash: &[u8; 32]) -> Result<u64> {
        Ok(self.0.get(hash)?.map_or(0, |v| v.value()))
    }

    /// Takes one reference. Returns the count before, so 0 means the chunk was not stored.
    pub fn increment(&mut self, hash: &[u8; 32]) -> Result<u64> {
        let count = self.count(hash)?;
        self.0.insert(hash, count + 1)?;
        Ok(count)
    }

    /// Drops one reference and returns how many are left; at zero the row is removed and the
    /// caller deletes the chunk.
    pub fn decrement(&mut self, hash: &[u8; 32]) -> Result<u64> {
        let left = one_less(self.count(hash)?, || {
            format!("chunk {}", Digest::from(*hash))
        })?;
        if left == 0 {
            self.0.remove(hash)?;
        } else {
            self.0.insert(hash, left)?;
        }
        Ok(left)
    }
}

/// The catalog references to each blob digest (artifacts and attachments, drafts included,
/// even before the blob exists) and the time until which a ready upload session holds it.
pub(super) struct BlobRefs<'txn>(Table<'txn, &'static [u8; 32], (u64, i64)>);

impl<'txn> BlobRefs<'txn> {
    pub fn open(txn: &'txn WriteTransaction) -> Result<Self> {
        Ok(BlobRefs(txn.open_table(BLOB_REFS)?))
    }

    /// The number of catalog references and the hold time (unix seconds).
    pub fn get(&self, digest: &[u8; 32]) -> Result<(u64, i64)> {
        Ok(self.0.get(digest)?.map_or((0, 0), |v| v.value()))
    }

    pub fn increment(&mut self, digest: &[u8; 32]) -> Result<()> {
        let (count, hold) = self.get(digest)?;
        self.0.insert(digest, (count + 1, hold))?;
        Ok(())
    }

    /// Drops one catalog reference and returns how many are left. The row stays at zero (it
    /// still carries the hold) until the blob is collected.
    pub fn decrement(&mut self, digest: &[u8; 32]) -> Result<u64> {
        let (count, hold) = self.get(digest)?;
        let left = one_less(count, || format!("blob {}", Digest::from(*digest)))?;
        self.0.insert(digest, (left, hold))?;
        Ok(left)
    }

    /// Keeps the blob at least until `until`; an earlier hold never shortens a later one.
    pub fn hold_until(&mut self, digest: &[u8; 32], until: Timestamp) -> Result<()> {
        let (count, hold) = self.get(digest)?;
        self.0
            .insert(digest, (count, hold.max(until.unix_seconds())))?;
        Ok(())
    }

    /// Forgets a blob that is being collected: only called at zero references.
    pub fn remove(&mut self, digest: &[u8; 32]) -> Result<()> {
        self.0.remove(digest)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::begin_write_scope;

    #[test]
    fn counts_move_one_step_and_never_below_zero() {
        let (_dir, store) = crate::store::scratch_store();
        let key = *Digest::of(b"x").as_bytes();
        begin_write_scope(&store, |txn| {
            let mut chunks = ChunkRefs::open(txn)?;
            assert_eq!(chunks.increment(&key)?, 0);
            assert_eq!(chunks.increment(&key)?, 1);
            assert_eq!(chunks.decrement(&key)?, 1);
            assert_eq!(chunks.decrement(&key)?, 0);
            let err = chunks.decrement(&key).unwrap_err();
            assert!(err.detail.contains(&Digest::of(b"x").to_string()), "{err}");

            let mut blobs = BlobRefs::open(txn)?;
            blobs.increment(&key)?;
            blobs.hold_until(&key, Timestamp::from_unix_seconds(7))?;
            assert_eq!(blobs.get(&key)?, (1, 7));
            assert_eq!(blobs.decrement(&key)?, 0);
            assert_eq!(blobs.get(&key)?, (0, 7));
            let err = blobs.decrement(&key).unwrap_err();
            assert_eq!(err.kind, crate::error::Kind::Internal);
            Ok(())
        })
        .unwrap();
    }
}
