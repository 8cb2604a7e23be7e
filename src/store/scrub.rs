//! The scrubber's reads: verifies stored chunks against their sha256 in key order, a batch per
//! short read transaction, so that a pass over a large database never holds a snapshot (and so
//! the pages writers free) for long and never makes a writer wait. The pacing and the metrics
//! live in `crate::scrub`.

use super::Store;
use super::chunks;
use super::tables::{CHUNK_SUMS, CHUNKS, META};
use crate::clock::Timestamp;
use crate::error::{Error, Result};
use std::ops::Bound;
use std::time::{Duration, Instant};

/// The `meta` key holding when the last full pass ended (unix seconds), so that a restart
/// does not start the next pass early or put it off by a whole interval.
const PASS_KEY: &str = "scrub_completed_at";

/// A damaged chunk found by the scrubber.
#[derive(Debug)]
pub struct Damage {
    pub chunk: [u8; 32],
    pub len: usize,
    /// What is wrong, in words.
    pub what: &'static str,
    /// The blobs that use the chunk, each with the versions that name the blob.
    pub users: Vec<([u8; 32], Vec<String>)>,
}

/// What one batch verified.
#[derive(Debug, Default)]
pub struct Batch {
    /// The last chunk verified; `None` when the pass is over.
    pub last: Option<[u8; 32]>,
    pub chunks: u64,
    pub bytes: u64,
    pub damaged: Vec<Damage>,
}

impl Store {
    /// Verifies chunks after `after` (from the first when `None`) until `max_bytes` have been
    /// read or `max_time` has passed, in one read transaction.
    pub fn scrub_batch(
        &self,
        after: Option<[u8; 32]>,
        max_bytes: u64,
        max_time: Duration,
    ) -> Result<Batch> {
        let txn = self.begin_read()?;
        let run = || -> Result<Batch> {
            let table = txn.open_table(CHUNKS)?;
            let sums = txn.open_table(CHUNK_SUMS)?;
            let started = Instant::now();
            let mut batch = Batch::default();
            let start = match &after {
                Some(k) => Bound::Excluded(k),
                None => Bound::Unbounded,
            };
            let mut found_all = true;
            for row in table.range::<&[u8; 32]>((start, Bound::Unbounded))? {
                let (k, v) = row?;
                let (hash, data) = (*k.value(), v.value());
                let what = if !chunks::key_matches(&hash, data) {
                    Some("its stored bytes do not match its key")
                } else {
                    match sums.get(&hash)?.map(|s| s.value()) {
                        Some(sum) if sum == chunks::checksum(data) => None,
                        Some(_) => Some(
                            "its stored xxh3 checksum does not match its (intact) bytes, so \
                             downloads of it fail",
                        ),
                        None => Some("it has no stored checksum"),
                    }
                };
                if let Some(what) = what {
                    let users = super::check::chunk_users(&txn, &hash)?;
                    batch.damaged.push(Damage {
                        chunk: hash,
                        len: data.len(),
                        what,
                        users,
                    });
                }
                batch.chunks += 1;
                batch.bytes += data.len() as u64;
                batch.last = Some(hash);
                if batch.bytes >= max_bytes || started.elapsed() >= max_time {
                    found_all = false;
                    break;
                }
            }
            if found_all {
                batch.last = None;
            }
            Ok(batch)
        };
        match super::handle::guarded(run) {
            Ok(r) => r,
            Err(panic) => Err(Error::internal(format!(
                "damaged database page met while scrubbing ({panic}); run `imgsrv check` on a backup"
            ))),
        }
    }

    /// Bytes of stored chunks: what a full pass reads.
    pub fn chunk_bytes(&self) -> Result<u64> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get("chunk_bytes")?.map(|v| v.value()).unwrap_or(0))
    }

    /// When the last full scrub pass ended, if one ever did.
    pub fn last_scrub_pass(&self) -> Result<Option<Timestamp>> {
        let txn = self.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta
            .get(PASS_KEY)?
            .map(|v| Timestamp::from_unix_seconds(v.value() as i64)))
    }

    /// Records the end of a full pass.
    pub fn record_scrub_pass(&self, at: Timestamp) -> Result<()> {
        super::begin_write_scope(self, |txn| {
            txn.open_table(META)?
                .insert(PASS_KEY, at.unix_seconds().max(0) as u64)?;
            Ok(())
        })
    }
}
