//! Upload sessions and their parts.
//!
//! A part streams in chunk by chunk: each chunk is stored with a cheap (non-durable) commit and
//! recorded in `STAGING` under a per-request nonce, so a write transaction never waits on the
//! socket. When the part's last byte has arrived, one durable transaction turns the staged
//! rows into the part record (replacing an earlier part of that number). `complete` builds the
//! blob's chunk list from the parts without copying bytes, verifies the whole blob's sha256 and
//! moves the session to `ready` or `failed`.
//!
//! Part record layout (value of `PARTS`), big-endian:
//! `u64 size | 32-byte sha256 of the part | u32 chunk count | count x (sha256, u32 length)`.

use super::blobs::{self, BlobRecord};
use super::chunks::{self, ChunkRef};
use super::tables::{BLOBS, PARTS, STAGING, UPLOADS};
use super::{Store, begin_write_scope, load, save};
use crate::clock::Timestamp;
use crate::digest::{Digest, hex};
use crate::error::{Error, Result};
use crate::model::{UploadPart, UploadSession, UploadState};
use crate::validate;
use redb::{ReadableTable, WriteTransaction};
use sha2::{Digest as _, Sha256};
use std::time::Duration;
use uuid::Uuid;

pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

struct PartRecord {
    size: u64,
    sha256: [u8; 32],
    chunks: Vec<ChunkRef>,
}

impl PartRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(44 + self.chunks.len() * 36);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.sha256);
        chunks::encode_list(&mut out, &self.chunks);
        out
    }

    fn decode(b: &[u8]) -> Result<PartRecord> {
        if b.len() < 44 {
            return Err(Error::internal("stored part record is truncated"));
        }
        let (chunks, _) = chunks::decode_list(&b[40..])?;
        Ok(PartRecord {
            size: u64::from_be_bytes(b[..8].try_into().unwrap()),
            sha256: b[8..40].try_into().unwrap(),
            chunks,
        })
    }

    fn etag(&self) -> String {
        format!("\"{}\"", hex(&self.sha256))
    }
}

/// The blob's chunk list assembled from the listed parts, and the record of each part (so that
/// `complete` can check that no part changed before it commits).
type Assembly = (Vec<ChunkRef>, Vec<(u32, PartRecord)>);

/// What a caller asks for when beginning an upload: also the request body of
/// `POST /v1/uploads`, checked by `begin_upload`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BeginUpload {
    pub expected_digest: String,
    #[serde(deserialize_with = "crate::model::integer")]
    pub expected_size_bytes: i64,
    pub media_type_hint: Option<String>,
    pub filename_hint: Option<String>,
}

fn not_found(id: Uuid) -> Error {
    Error::not_found(format!("upload not found: {id}"))
}

fn load_session(txn: &WriteTransaction, id: Uuid) -> Result<UploadSession> {
    let t = txn.open_table(UPLOADS)?;
    load(&t, id.as_u128(), "upload")?.ok_or_else(|| not_found(id))
}

fn store_session(txn: &WriteTransaction, s: &UploadSession) -> Result<()> {
    let mut t = txn.open_table(UPLOADS)?;
    save(&mut t, s.id.as_u128(), s)
}

fn accepts_parts(s: &UploadSession, now: Timestamp) -> Result<()> {
    if !matches!(s.state, UploadState::Created | UploadState::Uploading) {
        return Err(Error::precondition(format!(
            "upload session does not accept parts from {}",
            s.state
        )));
    }
    if s.expires_at <= now {
        return Err(Error::precondition(format!(
            "upload session expired at {}",
            s.expires_at.rfc3339()
        )));
    }
    Ok(())
}

/// Removes every part of a session and releases their chunks.
fn drop_parts(txn: &WriteTransaction, id: Uuid) -> Result<()> {
    let key = id.as_u128();
    let mut parts = txn.open_table(PARTS)?;
    let mut lists = Vec::new();
    for row in parts.extract_from_if((key, 0u32)..=(key, u32::MAX), |_, _| true)? {
        let (_, v) = row?;
        lists.push(PartRecord::decode(v.value())?.chunks);
    }
    drop(parts);
    for list in lists {
        chunks::release(txn, &list)?;
    }
    Ok(())
}

impl Store {
    /// Begins an upload session. Returns the session and whether it was created fresh (201)
    /// rather than short-circuited to `ready` by an existing trusted blob (200).
    pub fn begin_upload(&self, req: BeginUpload, ttl: Duration) -> Result<(UploadSession, bool)> {
        let invalid = |rule: &str| Error::invalid(format!("upload invalid input: {rule}"));
        let digest =
            Digest::parse(&req.expected_digest).ok_or_else(|| invalid(validate::DIGEST_RULE))?;
        if req.expected_size_bytes < 0 {
            return Err(invalid("expected size must be non-negative"));
        }
        let blank =
            |hint: &Option<String>| hint.as_deref().is_some_and(|h| !validate::non_blank(h));
        if blank(&req.media_type_hint) {
            return Err(invalid("media type hint is required"));
        }
        if blank(&req.filename_hint) {
            return Err(invalid("filename hint is required"));
        }
        // The hint becomes the blob record's media type, whose length is a u16: a longer one
        // would be written truncated and make the blob unreadable after it was acknowledged.
        if req
            .media_type_hint
            .as_ref()
            .is_some_and(|m| m.len() > blobs::MAX_MEDIA_TYPE_LEN)
        {
            return Err(Error::invalid(format!(
                "upload invalid input: media type hint must be at most {} bytes",
                blobs::MAX_MEDIA_TYPE_LEN
            )));
        }
        let now = Timestamp::now();
        let mut session = UploadSession {
            id: Uuid::new_v4(),
            expected_digest: digest,
            expected_size_bytes: req.expected_size_bytes,
            state: UploadState::Created,
            expires_at: now.add(ttl),
            media_type_hint: req.media_type_hint,
            filename_hint: req.filename_hint,
            failure_message: None,
        };
        begin_write_scope(self, |txn| {
            let existing = blobs::get_in(&txn.open_table(BLOBS)?, digest.as_bytes())?;
            let fresh = match existing {
                Some(blob) if blob.size as i64 == session.expected_size_bytes => {
                    session.state = UploadState::Ready;
                    blobs::hold_until(txn, digest.as_bytes(), session.expires_at)?;
                    false
                }
                Some(blob) => {
                    return Err(Error::precondition(format!(
                        "trusted blob size is {} bytes, expected {} bytes",
                        blob.size, session.expected_size_bytes
                    )));
                }
                None => true,
            };
            store_session(txn, &session)?;
            Ok((session.clone(), fresh))
        })
    }

    pub fn upload(&self, id: Uuid) -> Result<UploadSession> {
        let txn = self.begin_read()?;
        load(&txn.open_table(UPLOADS)?, id.as_u128(), "upload")?.ok_or_else(|| not_found(id))
    }

    /// Checks that a session takes parts now, before any body byte is read.
    pub fn check_accepts_parts(&self, id: Uuid) -> Result<()> {
        accepts_parts(&self.upload(id)?, Timestamp::now())
    }

    /// Starts writing one part; feed it chunks with [`PartWriter::write_chunk`].
    pub fn part_writer(&self, id: Uuid, number: u32) -> PartWriter<'_> {
        PartWriter {
            store: self,
            upload: id,
            number,
            nonce: Uuid::new_v4().as_u128(),
            index: 0,
            size: 0,
            hasher: Sha256::new(),
            finished: false,
        }
    }

    /// Completes a session (Decision 2): assembles the listed parts, verifies size and sha256
    /// and answers with the session in `ready` or `failed`.
    pub fn complete_upload(
        &self,
        id: Uuid,
        listed: &[(u32, String, i64)],
    ) -> Result<UploadSession> {
        let session = self.upload(id)?;
        match session.state {
            UploadState::Completed | UploadState::Ingesting | UploadState::Ready => {
                return Ok(session);
            }
            UploadState::Created | UploadState::Uploading => {}
            other => {
                return Err(Error::precondition(format!(
                    "upload session cannot be completed from {other}"
                )));
            }
        }
        validate_complete_list(listed)?;
        let total: i64 = listed.iter().map(|p| p.2).sum();
        if total != session.expected_size_bytes {
            return Err(Error::precondition(format!(
                "complete part sizes total {total} bytes, expected {} bytes",
                session.expected_size_bytes
            )));
        }
        if session.expires_at <= Timestamp::now() {
            return Err(Error::precondition(format!(
                "upload session expired at {}",
                session.expires_at.rfc3339()
            )));
        }
        let mut order: Vec<&(u32, String, i64)> = listed.iter().collect();
        order.sort_by_key(|p| p.0);
        let (list, records) = self.listed_parts(id, &order)?;
        let digest = *session.expected_digest.as_bytes();

        // A single part is the whole blob, and its sha256 was computed from its bytes as they
        // arrived: no need to read it all again. Otherwise hash the assembled bytes in a read
        // transaction (nothing is locked meanwhile).
        let (size, actual): (u64, [u8; 32]) = if let [(_, only)] = records.as_slice() {
            (only.size, only.sha256)
        } else {
            let mut hasher = Sha256::new();
            let reader = self.assembly_reader(list.clone(), &digest)?;
            let size = reader
                .hash_into(&mut hasher)
                .map_err(|e| Error::internal(format!("assembling upload: {e}")))?;
            (size, hasher.finalize().into())
        };

        begin_write_scope(self, |txn| {
            let mut s = load_session(txn, id)?;
            if !matches!(s.state, UploadState::Created | UploadState::Uploading) {
                // Raced with another complete or an abort: answer with what won.
                return Ok(s);
            }
            // The parts must still be the ones that were hashed.
            let parts = txn.open_table(PARTS)?;
            for (n, rec) in &records {
                let now = parts
                    .get((id.as_u128(), *n))?
                    .map(|v| PartRecord::decode(v.value()))
                    .transpose()?;
                if now.map(|p| p.sha256) != Some(rec.sha256) {
                    return Err(Error::precondition(format!(
                        "upload part {n} changed while completing; retry"
                    )));
                }
            }
            drop(parts);
            if actual == digest && size == s.expected_size_bytes as u64 {
                let mut blobs_t = txn.open_table(BLOBS)?;
                let exists = blobs_t.get(&digest)?.is_some();
                if !exists {
                    let record = BlobRecord {
                        size,
                        verified_at: Timestamp::now(),
                        media_type: s.media_type_hint.clone(),
                        chunks: list.clone(),
                    };
                    blobs_t.insert(&digest, record.encode().as_slice())?;
                    // The blob now owns the listed parts' chunk references.
                    chunks::add_refs(txn, &list)?;
                }
                drop(blobs_t);
                s.state = UploadState::Ready;
                blobs::hold_until(txn, &digest, s.expires_at)?;
            } else {
                s.state = UploadState::Failed;
                s.failure_message = Some(format!(
                    "assembled blob is {size} bytes with digest {}, expected {} bytes with digest {}",
                    Digest::from(actual),
                    s.expected_size_bytes,
                    s.expected_digest
                ));
            }
            drop_parts(txn, id)?;
            store_session(txn, &s)?;
            Ok(s)
        })
    }

    fn listed_parts(&self, id: Uuid, order: &[&(u32, String, i64)]) -> Result<Assembly> {
        let txn = self.begin_read()?;
        let parts = txn.open_table(PARTS)?;
        let mut list = Vec::new();
        let mut records = Vec::new();
        for (n, etag, size) in order.iter().map(|p| (&p.0, &p.1, &p.2)) {
            let rec = parts
                .get((id.as_u128(), *n))?
                .map(|v| PartRecord::decode(v.value()))
                .transpose()?
                .ok_or_else(|| {
                    Error::precondition(format!("upload part {n} has not been uploaded"))
                })?;
            if rec.size as i64 != *size {
                return Err(Error::precondition(format!(
                    "upload part {n} is {} bytes, complete lists {size} bytes",
                    rec.size
                )));
            }
            let ours = rec.etag();
            if etag.trim_matches('"') != ours.trim_matches('"') {
                return Err(Error::precondition(format!(
                    "upload part {n} etag {etag} does not match stored etag {ours}"
                )));
            }
            list.extend_from_slice(&rec.chunks);
            records.push((*n, rec));
        }
        Ok((list, records))
    }

    pub fn abort_upload(&self, id: Uuid) -> Result<UploadSession> {
        let session = begin_write_scope(self, |txn| {
            let mut s = load_session(txn, id)?;
            match s.state {
                UploadState::Aborted => Ok(s),
                UploadState::Created | UploadState::Uploading => {
                    s.state = UploadState::Aborted;
                    drop_parts(txn, id)?;
                    store_session(txn, &s)?;
                    Ok(s)
                }
                other => Err(Error::precondition(format!(
                    "upload session cannot be aborted from {other}"
                ))),
            }
        })?;
        self.settle_freed_pages();
        Ok(session)
    }

    /// Moves expired sessions that are still taking parts to `aborted` and releases their
    /// bytes (Decision 3). Returns how many sessions were aborted.
    pub fn sweep_expired_uploads(&self, now: Timestamp) -> Result<usize> {
        let expired: Vec<Uuid> = {
            let txn = self.begin_read()?;
            let t = txn.open_table(UPLOADS)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (_, v) = row?;
                let s: UploadSession = super::decode(v.value(), "upload")?;
                if matches!(s.state, UploadState::Created | UploadState::Uploading)
                    && s.expires_at <= now
                {
                    out.push(s.id);
                }
            }
            out
        };
        let mut n = 0;
        for id in expired {
            begin_write_scope(self, |txn| {
                let mut s = load_session(txn, id)?;
                if matches!(s.state, UploadState::Created | UploadState::Uploading)
                    && s.expires_at <= now
                {
                    s.state = UploadState::Aborted;
                    drop_parts(txn, id)?;
                    store_session(txn, &s)?;
                    n += 1;
                }
                Ok(())
            })?;
        }
        if n > 0 {
            self.settle_freed_pages();
        }
        Ok(n)
    }

    /// Releases chunks staged by part uploads that a crash interrupted. Only called at open,
    /// when no request can be streaming.
    pub(crate) fn release_staging(&self) -> Result<()> {
        // Nothing to release after a clean stop; skipping the write keeps a start on a full
        // disk possible.
        if self.begin_read()?.open_table(STAGING)?.first()?.is_none() {
            return Ok(());
        }
        begin_write_scope(self, |txn| {
            let list = take_staged(txn, (0, 0)..=(u128::MAX, u32::MAX))?;
            chunks::release(txn, &list)
        })
    }
}

/// Removes the staging rows in `range` and returns their chunk references in order; the caller
/// either hands them to a part (which then owns their references) or releases them.
fn take_staged(
    txn: &WriteTransaction,
    range: std::ops::RangeInclusive<(u128, u32)>,
) -> Result<Vec<ChunkRef>> {
    let mut staging = txn.open_table(STAGING)?;
    let mut list = Vec::new();
    for row in staging.extract_from_if(range, |_, _| true)? {
        let (_, v) = row?;
        list.push(ChunkRef::decode(v.value()));
    }
    Ok(list)
}

fn validate_complete_list(listed: &[(u32, String, i64)]) -> Result<()> {
    if listed.is_empty() {
        return Err(Error::invalid(
            "upload invalid input: at least one complete part is required",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (n, etag, size) in listed {
        if !(1..=10000).contains(n) {
            return Err(Error::invalid(
                "upload invalid input: part number must be between 1 and 10000",
            ));
        }
        if !validate::non_blank(etag) {
            return Err(Error::invalid("upload invalid input: etag is required"));
        }
        if *size < 0 || *size as u64 > MAX_PART_SIZE {
            return Err(Error::invalid(format!(
                "upload invalid input: part size must be between 0 and {MAX_PART_SIZE} bytes"
            )));
        }
        if !seen.insert(*n) {
            return Err(Error::invalid(format!(
                "upload invalid input: duplicate complete part {n}"
            )));
        }
    }
    Ok(())
}

/// Streams one part into the store. Dropping it without [`PartWriter::finish`] releases the
/// chunks written so far.
pub struct PartWriter<'a> {
    store: &'a Store,
    upload: Uuid,
    number: u32,
    nonce: u128,
    index: u32,
    size: u64,
    hasher: Sha256,
    finished: bool,
}

impl PartWriter<'_> {
    /// Stores one chunk (at most `CHUNK_SIZE` bytes) in a short non-durable transaction.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<()> {
        self.hasher.update(data);
        let chunk = ChunkRef::of(data);
        let txn = self.store.begin_write_cheap()?;
        chunks::acquire(&txn, &chunk, data)?;
        txn.open_table(STAGING)?
            .insert((self.nonce, self.index), &chunk.encode())?;
        txn.commit()?;
        self.index += 1;
        self.size += data.len() as u64;
        Ok(())
    }

    /// Turns the staged chunks into the part (durably) and marks the session `uploading`.
    pub fn finish(mut self) -> Result<UploadPart> {
        self.finished = true;
        let sha256: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
        let (upload, number, nonce, size) = (self.upload, self.number, self.nonce, self.size);
        let result = begin_write_scope(self.store, |txn| {
            let mut s = load_session(txn, upload)?;
            accepts_parts(&s, Timestamp::now())?;
            let list = take_staged(txn, (nonce, 0)..=(nonce, u32::MAX))?;
            let record = PartRecord {
                size,
                sha256,
                chunks: list,
            };
            let mut parts = txn.open_table(PARTS)?;
            let old = parts
                .insert((upload.as_u128(), number), record.encode().as_slice())?
                .map(|v| PartRecord::decode(v.value()))
                .transpose()?;
            drop(parts);
            if let Some(old) = old {
                chunks::release(txn, &old.chunks)?;
            }
            s.state = UploadState::Uploading;
            store_session(txn, &s)?;
            Ok(UploadPart {
                upload_id: upload,
                part_number: number,
                etag: record.etag(),
                size_bytes: size as i64,
            })
        });
        if result.is_err() {
            self.release();
        }
        result
    }

    fn release(&self) {
        let nonce = self.nonce;
        let r = begin_write_scope(self.store, |txn| {
            let list = take_staged(txn, (nonce, 0)..=(nonce, u32::MAX))?;
            chunks::release(txn, &list)
        });
        if let Err(e) = r {
            crate::log::error(&format!("releasing an interrupted part upload: {e}"));
        }
    }
}

impl Drop for PartWriter<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.release();
        }
    }
}
