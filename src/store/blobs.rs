//! Blobs: verified byte strings addressed by their sha256, stored as ordered chunk lists.
//!
//! Blob record layout (value of `BLOBS`), big-endian:
//! `u8 layout version (1) | u64 size | i64 verified_at (unix seconds) | u16 media type length |
//!  media type bytes | u32 chunk count | count x (32-byte chunk key, u32 chunk length)`.

use super::Store;
use super::chunks::{self, ChunkRef};
use super::refcount::BlobRefs;
use super::shared::{Chunk, SharedChunks};
use super::tables::{BLOB_REFS, BLOBS, CHUNK_SUMS, CHUNKS};
use crate::clock::Timestamp;
use crate::digest::Digest;
use crate::error::{Error, Result};
use redb::{ReadOnlyTable, ReadableTable, WriteTransaction};
use sha2::{Digest as _, Sha256};
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The longest media type a blob record can hold: its length is stored as a u16.
pub const MAX_MEDIA_TYPE_LEN: usize = u16::MAX as usize;

/// Counts chunks that failed verification while being served (exported as a metric).
pub static VERIFY_FAILURES: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone)]
pub struct BlobRecord {
    pub size: u64,
    pub verified_at: Timestamp,
    pub media_type: Option<String>,
    pub chunks: Vec<ChunkRef>,
}

impl BlobRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mt = self.media_type.as_deref().unwrap_or("").as_bytes();
        let mut out = Vec::with_capacity(23 + mt.len() + self.chunks.len() * 36);
        out.push(1);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.verified_at.unix_seconds().to_be_bytes());
        out.extend_from_slice(&(mt.len() as u16).to_be_bytes());
        out.extend_from_slice(mt);
        chunks::encode_list(&mut out, &self.chunks);
        out
    }

    pub fn decode(b: &[u8]) -> Result<BlobRecord> {
        let bad = || Error::internal("stored blob record is unreadable");
        if b.first() != Some(&1) || b.len() < 19 {
            return Err(bad());
        }
        let size = u64::from_be_bytes(b[1..9].try_into().unwrap());
        let verified = i64::from_be_bytes(b[9..17].try_into().unwrap());
        let mt_len = u16::from_be_bytes(b[17..19].try_into().unwrap()) as usize;
        let mt = b.get(19..19 + mt_len).ok_or_else(bad)?;
        let media_type = if mt.is_empty() {
            None
        } else {
            Some(String::from_utf8(mt.to_vec()).map_err(|_| bad())?)
        };
        let (chunks, _) = chunks::decode_list(&b[19 + mt_len..])?;
        Ok(BlobRecord {
            size,
            verified_at: Timestamp::from_unix_seconds(verified),
            media_type,
            chunks,
        })
    }
}

/// Looks up a trusted blob inside an existing transaction.
pub fn get_in(
    table: &impl ReadableTable<&'static [u8; 32], &'static [u8]>,
    digest: &[u8; 32],
) -> Result<Option<BlobRecord>> {
    match table.get(digest)? {
        Some(v) => Ok(Some(BlobRecord::decode(v.value())?)),
        None => Ok(None),
    }
}

/// Counts one more catalog reference (an artifact or attachment) to a digest.
pub fn add_ref(txn: &WriteTransaction, digest: &Digest) -> Result<()> {
    BlobRefs::open(txn)?.increment(digest.as_bytes())
}

/// Drops one catalog reference to a digest, collecting the blob when it was the last and no
/// upload session holds it.
pub fn drop_ref(txn: &WriteTransaction, digest: &Digest) -> Result<()> {
    if BlobRefs::open(txn)?.decrement(digest.as_bytes())? == 0 {
        collect_if_unused(txn, digest.as_bytes(), Timestamp::now())?;
    }
    Ok(())
}

/// Keeps a blob alive at least until `until` (a ready upload session's expiry).
pub fn hold_until(txn: &WriteTransaction, digest: &[u8; 32], until: Timestamp) -> Result<()> {
    BlobRefs::open(txn)?.hold_until(digest, until)
}

/// Deletes a blob and releases its chunks when no catalog row references it and no ready
/// upload session holds it any more. Returns whether it was deleted.
pub fn collect_if_unused(
    txn: &WriteTransaction,
    digest: &[u8; 32],
    now: Timestamp,
) -> Result<bool> {
    let mut refs = BlobRefs::open(txn)?;
    let (count, hold) = refs.get(digest)?;
    if count > 0 || hold > now.unix_seconds() {
        return Ok(false);
    }
    refs.remove(digest)?;
    drop(refs);
    let mut blobs = txn.open_table(BLOBS)?;
    let record = match blobs.remove(digest)? {
        Some(v) => BlobRecord::decode(v.value())?,
        None => return Ok(false),
    };
    drop(blobs);
    chunks::release(txn, &record.chunks)?;
    Ok(true)
}

impl Store {
    /// A trusted blob's record (size, verification time, media type, chunk list).
    pub fn blob(&self, digest: &[u8; 32]) -> Result<Option<BlobRecord>> {
        let txn = self.begin_read()?;
        get_in(&txn.open_table(BLOBS)?, digest)
    }

    /// Looks up a blob and opens a verified reader over its chunks in one read transaction, so
    /// a blob collected between the two steps is reported missing (a 404) rather than served
    /// as a short body.
    pub fn open_blob(&self, digest: &[u8; 32]) -> Result<Option<(BlobRecord, BlobReader)>> {
        let txn = self.begin_read()?;
        let Some(record) = get_in(&txn.open_table(BLOBS)?, digest)? else {
            return Ok(None);
        };
        let reader = BlobReader {
            chunks: txn.open_table(CHUNKS)?,
            sums: Some(txn.open_table(CHUNK_SUMS)?),
            shared: Some(self.shared.clone()),
            list: record.chunks.clone(),
            digest: *digest,
        };
        Ok(Some((record, reader)))
    }

    /// A reader over a chunk list that is not (yet) a blob, such as assembled upload parts.
    /// Chunk checks are skipped because the caller verifies the digest of the whole.
    pub fn assembly_reader(&self, list: Vec<ChunkRef>, digest: &[u8; 32]) -> Result<BlobReader> {
        let txn = self.begin_read()?;
        Ok(BlobReader {
            chunks: txn.open_table(CHUNKS)?,
            sums: None,
            shared: None,
            list,
            digest: *digest,
        })
    }

    /// Deletes unreferenced blobs whose hold has passed. Returns how many were deleted.
    pub fn collect_garbage(&self, now: Timestamp) -> Result<usize> {
        let candidates: Vec<[u8; 32]> = {
            let txn = self.begin_read()?;
            let refs = txn.open_table(BLOB_REFS)?;
            let mut out = Vec::new();
            for row in refs.iter()? {
                let (k, v) = row?;
                let (count, hold) = v.value();
                if count == 0 && hold <= now.unix_seconds() {
                    out.push(*k.value());
                }
            }
            out
        };
        Ok(super::free_each(
            self,
            "collect garbage",
            &candidates,
            |txn, digest| collect_if_unused(txn, digest, now),
            |digest| format!("garbage collection skipped blob {}", Digest::from(*digest)),
        ))
    }
}

/// The front door streams blob bodies through this, knowing the store only as a blob source.
impl crate::hop::BlobSource for Store {
    fn open(
        &self,
        digest: &[u8; 32],
    ) -> std::result::Result<Option<Box<dyn crate::hop::BlobBody>>, String> {
        match self.open_blob(digest) {
            Ok(Some((_, reader))) => Ok(Some(Box::new(reader))),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl crate::hop::BlobBody for BlobReader {
    fn write_range(&self, out: &mut dyn Write, start: u64, end: u64) -> io::Result<()> {
        BlobReader::write_range(self, out, start, end)
    }
}

/// For each entry of a chunk list, whether the same chunk comes again later in the list.
fn needed_again(list: &[ChunkRef]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(list.len());
    let mut again = vec![false; list.len()];
    for (i, c) in list.iter().enumerate().rev() {
        again[i] = !seen.insert(c.hash);
    }
    again
}

/// Classifies a read failure (so an I/O error asks for a reopen) and keeps its message.
fn read_error(e: redb::StorageError) -> io::Error {
    io::Error::other(Error::from(e).detail)
}

/// Streams a byte range of a blob, verifying each chunk against its stored checksum (or, for a
/// chunk without one, its key) before any of its bytes are written.
pub struct BlobReader {
    chunks: ReadOnlyTable<&'static [u8; 32], &'static [u8]>,
    /// `None` when the caller verifies the whole instead (assembling an upload).
    sums: Option<ReadOnlyTable<&'static [u8; 32], u128>>,
    /// Chunks verified by other downloads (only where this reader verifies chunks itself).
    shared: Option<Arc<SharedChunks>>,
    list: Vec<ChunkRef>,
    digest: [u8; 32],
}

impl BlobReader {
    /// Writes bytes `start..end` (exclusive) to `out`. A chunk that is missing or fails its
    /// digest ends the stream with an error before any of its bytes are sent, so a client sees
    /// a short body, never wrong bytes.
    pub fn write_range(&self, out: &mut dyn Write, start: u64, end: u64) -> io::Result<()> {
        // Taken at the first chunk of the range, so other downloads see where this one starts.
        let mut seat = None;
        let mut offset = 0u64;
        for (index, c) in self.list.iter().enumerate() {
            let c_start = offset;
            let c_end = offset + c.len as u64;
            offset = c_end;
            if c_end <= start {
                continue;
            }
            if c_start >= end {
                break;
            }
            let chunk = match &self.shared {
                Some(shared) => {
                    let seat = seat.get_or_insert_with(|| {
                        shared.seat(&self.digest, index, || needed_again(&self.list))
                    });
                    shared.get_or_read(seat, index, &c.hash, || self.verified_chunk(c))?
                }
                None => self.verified_chunk(c)?,
            };
            let data = chunk.value();
            if data.len() != c.len as usize {
                return Err(self.fail("chunk of the wrong length"));
            }
            let a = start.saturating_sub(c_start) as usize;
            let b = (end.min(c_end) - c_start) as usize;
            out.write_all(&data[a..b])?;
        }
        Ok(())
    }

    /// Reads a chunk and checks it (unless the caller checks the whole); an error names what
    /// went wrong, after it is logged and counted.
    fn verified_chunk(&self, c: &ChunkRef) -> io::Result<Chunk> {
        // A damaged page can make redb panic or report corruption; either way this response
        // ends here, and the process and its other connections carry on.
        let read = super::handle::guarded(|| -> io::Result<Option<_>> {
            let Some(guard) = self.chunks.get(&c.hash).map_err(read_error)? else {
                return Ok(None);
            };
            let intact =
                guard.value().len() == c.len as usize && self.intact(&c.hash, guard.value())?;
            Ok(Some((guard, intact)))
        });
        match read {
            Ok(Ok(Some((guard, true)))) => Ok(Arc::new(guard)),
            Ok(Ok(Some((_, false)))) => Err(self.fail("chunk failed checksum verification")),
            Ok(Ok(None)) => Err(self.fail("missing chunk")),
            Ok(Err(e)) => Err(self.fail(&format!("cannot read chunk ({e})"))),
            Err(panic) => Err(self.fail(&format!("damaged database page ({panic})"))),
        }
    }

    /// Whether a chunk's bytes match what was stored.
    fn intact(&self, hash: &[u8; 32], data: &[u8]) -> io::Result<bool> {
        let Some(sums) = &self.sums else {
            return Ok(true);
        };
        let sum = sums.get(hash).map_err(read_error)?;
        Ok(match sum {
            Some(sum) => chunks::checksum(data) == sum.value(),
            // No stored sum: check the key itself, which is the chunk's BLAKE3 (schema 3 on)
            // or its sha256 (chunks stored before).
            None => chunks::key_matches(hash, data),
        })
    }

    fn fail(&self, what: &str) -> io::Error {
        VERIFY_FAILURES.fetch_add(1, Ordering::Relaxed);
        let digest = Digest::from(self.digest);
        crate::log::error(&format!(
            "{what} while serving blob {digest}; download cut short"
        ));
        io::Error::other(format!("{what} in blob {digest}"))
    }

    /// Hashes the whole blob (used to verify an assembled upload and for Incus fingerprints).
    pub fn hash_into(&self, hasher: &mut Sha256) -> io::Result<u64> {
        struct HashWriter<'a>(&'a mut Sha256, u64);
        impl Write for HashWriter<'_> {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.update(b);
                self.1 += b.len() as u64;
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut w = HashWriter(hasher, 0);
        self.write_range(&mut w, 0, u64::MAX)?;
        Ok(w.1)
    }
}
