//! Content-addressed chunks with reference counts.
//!
//! A chunk is at most `CHUNK_SIZE` bytes, keyed by its BLAKE3 hash (chunks written before
//! schema 3 keep their sha256 keys: a key is an opaque 256-bit identity once stored, and reads
//! verify chunks against their xxh3-128 sums, not their keys). redb never splits a value
//! across pages and rounds a value's page up to a power of two, so a chunk of exactly 1 MiB
//! would occupy 2 MiB on disk; 1 MiB - 64 bytes leaves room for the key and the page header
//! and costs about 3 %.

use super::refcount::ChunkRefs;
use super::tables::{CHUNK_SUMS, CHUNKS, META};
use crate::error::{Error, Result};
use redb::{ReadableTable, WriteTransaction};

pub const CHUNK_SIZE: usize = 1024 * 1024 - 64;

/// One entry of a chunk list: the chunk's key (BLAKE3, or sha256 for chunks stored before
/// schema 3) and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub hash: [u8; 32],
    pub len: u32,
}

impl ChunkRef {
    pub const ENCODED_LEN: usize = 36;

    /// The reference under which `data` is stored now: its BLAKE3 hash. BLAKE3 is collision
    /// resistant like sha256, which content addressing across tenants needs (a crafted
    /// collision would let one upload replace another's bytes), and runs at several times its
    /// speed; see the README's on-disk format.
    pub fn of(data: &[u8]) -> ChunkRef {
        ChunkRef {
            hash: *blake3::hash(data).as_bytes(),
            len: data.len() as u32,
        }
    }

    pub fn encode(&self) -> [u8; 36] {
        let mut out = [0u8; 36];
        out[..32].copy_from_slice(&self.hash);
        out[32..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> ChunkRef {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[..32]);
        ChunkRef {
            hash,
            len: u32::from_be_bytes([b[32], b[33], b[34], b[35]]),
        }
    }
}

/// Whether `data` are the bytes a chunk key names. A key is the BLAKE3 of the bytes, or their
/// sha256 for chunks stored before schema 3 (those keep their keys; nothing is rewritten). A
/// BLAKE3 key and a sha256 key of different bytes cannot meet: that would take a 256-bit
/// collision across the two functions.
pub fn key_matches(key: &[u8; 32], data: &[u8]) -> bool {
    use sha2::Digest as _;
    blake3::hash(data).as_bytes() == key || sha2::Sha256::digest(data).as_slice() == key
}

pub fn encode_list(out: &mut Vec<u8>, list: &[ChunkRef]) {
    out.extend_from_slice(&(list.len() as u32).to_be_bytes());
    for c in list {
        out.extend_from_slice(&c.encode());
    }
}

/// Decodes a count-prefixed chunk list; returns the list and the bytes consumed.
pub fn decode_list(b: &[u8]) -> Result<(Vec<ChunkRef>, usize)> {
    let bad = || Error::internal("stored chunk list is truncated");
    let n = u32::from_be_bytes(b.get(..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
    let end = 4 + n * ChunkRef::ENCODED_LEN;
    let body = b.get(4..end).ok_or_else(bad)?;
    Ok((
        body.chunks_exact(ChunkRef::ENCODED_LEN)
            .map(ChunkRef::decode)
            .collect(),
        end,
    ))
}

/// Stores a chunk (or finds it already stored) and takes one reference to it. `data` are the
/// chunk's bytes, which hash to `chunk.hash`.
pub fn acquire(txn: &WriteTransaction, chunk: &ChunkRef, data: &[u8]) -> Result<()> {
    let count = ChunkRefs::open(txn)?.increment(&chunk.hash)?;
    let mut chunks = txn.open_table(CHUNKS)?;
    if count == 0 {
        chunks.insert(&chunk.hash, data)?;
        store_sum(txn, &chunk.hash, data)?;
        count_stored(txn, 1, data.len() as i64)?;
    } else {
        // A stored copy that differs from the fresh bytes was damaged on disk. Left alone, it
        // would make every later upload that shares the chunk fail verification at `complete`
        // although its client sent the right bytes; replacing it also repairs the blobs that
        // already use it.
        let same = chunks.get(&chunk.hash)?.map(|v| v.value() == data);
        match same {
            Some(true) => {}
            found => {
                chunks.insert(&chunk.hash, data)?;
                store_sum(txn, &chunk.hash, data)?;
                if found.is_none() {
                    count_stored(txn, 1, data.len() as i64)?;
                }
                crate::log::warn(&format!(
                    "repaired a damaged chunk {} with freshly uploaded bytes",
                    crate::digest::Digest::from(chunk.hash)
                ));
            }
        }
    }
    Ok(())
}

/// Takes one more reference to each chunk of a list that is already stored.
pub fn add_refs(txn: &WriteTransaction, list: &[ChunkRef]) -> Result<()> {
    let mut refs = ChunkRefs::open(txn)?;
    for c in list {
        if refs.increment(&c.hash)? == 0 {
            return Err(Error::internal(format!(
                "chunk list names chunk {} that is not stored",
                crate::digest::Digest::from(c.hash)
            )));
        }
    }
    Ok(())
}

/// Drops one reference to each chunk of a list, deleting chunks nobody references any more.
/// Every list released here took its references when it was built (a staged chunk by
/// `acquire`, a blob's list by `add_refs`), so a chunk without one is a bug and fails the
/// transaction. Runs inside the caller's serializable write transaction, so no concurrent
/// upload can take a reference between the count reaching zero and the delete.
pub fn release(txn: &WriteTransaction, list: &[ChunkRef]) -> Result<()> {
    let mut refs = ChunkRefs::open(txn)?;
    let mut chunks = txn.open_table(CHUNKS)?;
    let mut sums = txn.open_table(CHUNK_SUMS)?;
    let (mut freed, mut freed_bytes) = (0i64, 0i64);
    for c in list {
        if refs.decrement(&c.hash)? == 0 {
            chunks.remove(&c.hash)?;
            sums.remove(&c.hash)?;
            freed += 1;
            freed_bytes += c.len as i64;
        }
    }
    drop((refs, chunks, sums));
    if freed > 0 {
        count_stored(txn, -freed, -freed_bytes)?;
    }
    Ok(())
}

/// Keeps `meta` counters of stored chunks and their bytes up to date, in the same transaction
/// as the change, so metrics need not scan the chunk table.
fn count_stored(txn: &WriteTransaction, chunks: i64, bytes: i64) -> Result<()> {
    let mut meta = txn.open_table(META)?;
    for (key, delta) in [("chunk_count", chunks), ("chunk_bytes", bytes)] {
        let now = meta.get(key)?.map(|v| v.value()).unwrap_or(0) as i64;
        meta.insert(key, (now + delta).max(0) as u64)?;
    }
    Ok(())
}

/// The read-time checksum of a chunk's bytes (see `CHUNK_SUMS`).
pub fn checksum(data: &[u8]) -> u128 {
    twox_hash::XxHash3_128::oneshot(data)
}

fn store_sum(txn: &WriteTransaction, hash: &[u8; 32], data: &[u8]) -> Result<()> {
    txn.open_table(CHUNK_SUMS)?.insert(hash, checksum(data))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read checksum is the standard XXH3-128 (reference value for empty input), so stored
    /// sums stay valid whichever implementation computes them.
    #[test]
    fn checksum_is_standard_xxh3_128() {
        assert_eq!(checksum(b""), 0x99aa06d3014798d86001c324468d497f);
        assert_ne!(checksum(b"a"), checksum(b"b"));
    }
}
