//! Counts for metrics, read in one read transaction.

use super::Store;
use super::tables::*;
use crate::error::Result;
use crate::model::{PublishJob, UploadSession};
use redb::ReadableTable;
use std::collections::BTreeMap;

/// A snapshot of what the database holds.
#[derive(Debug, Default)]
pub struct StoreStats {
    pub uploads_by_state: BTreeMap<&'static str, u64>,
    pub jobs_by_state: BTreeMap<&'static str, u64>,
    pub steps_by_state: BTreeMap<(&'static str, &'static str), u64>,
    pub blobs: u64,
    /// Sum of blob sizes: the bytes clients uploaded (before deduplication).
    pub blob_bytes: u64,
    pub chunks: u64,
    /// Bytes of distinct chunks actually stored.
    pub chunk_bytes: u64,
    pub generation: u64,
}

impl Store {
    pub fn stats(&self) -> Result<StoreStats> {
        let txn = self.begin_read()?;
        let mut s = StoreStats::default();
        for row in txn.open_table(UPLOADS)?.iter()? {
            let u: UploadSession = super::decode(row?.1.value(), "upload")?;
            *s.uploads_by_state.entry(u.state.as_str()).or_default() += 1;
        }
        for row in txn.open_table(JOBS)?.iter()? {
            let j: PublishJob = super::decode(row?.1.value(), "publish job")?;
            *s.jobs_by_state.entry(j.state.as_str()).or_default() += 1;
            for step in &j.steps {
                *s.steps_by_state
                    .entry((step.name.as_str(), step.state.as_str()))
                    .or_default() += 1;
            }
        }
        for row in txn.open_table(BLOBS)?.iter()? {
            let (_, v) = row?;
            let b = v.value();
            // The size is the u64 after the layout byte (see blobs.rs); no need to decode the
            // chunk list.
            if b.len() >= 9 {
                s.blobs += 1;
                s.blob_bytes += u64::from_be_bytes(b[1..9].try_into().unwrap());
            }
        }
        let meta = txn.open_table(META)?;
        let get = |k: &str| -> Result<u64> { Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0)) };
        s.chunks = get("chunk_count")?;
        s.chunk_bytes = get("chunk_bytes")?;
        s.generation = get("generation")?;
        Ok(s)
    }
}
