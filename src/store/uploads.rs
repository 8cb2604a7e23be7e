//! Upload sessions and their parts.
//!
//! A part streams in chunk by chunk: each chunk is stored with a cheap (non-durable) commit and
//! recorded in `STAGING` under a per-request nonce, so a write transaction never waits on the
//! socket. When the part's last byte has arrived, one durable transaction turns the staged
//! rows into the part record (replacing an earlier part of that number). `complete` builds the
//! blob's chunk list from the parts without copying bytes, checks the whole blob's sha256 and
//! moves the session to `ready` or `failed`.
//!
//! Each byte is hashed with sha256 once. The blob's sha256 is carried from part to part: a
//! part starts from the hash state its predecessor (the highest-numbered part below it) ended
//! with, and its record keeps both its start and its end state. `complete` walks the listed
//! parts in order and takes a part's end state whenever the part started where the walk
//! stands; only parts that did not (uploaded out of order, or whose predecessor was replaced
//! after they were written) are read back and hashed again. A part's etag is the BLAKE3 of its
//! chunk list, which the chunk keys (BLAKE3 of each chunk) give for free.
//!
//! Part record layout (value of `PARTS`, schema 3), big-endian:
//! `u8 layout (3) | u64 size | 32-byte etag | u16 n + n bytes start state | u16 m + m bytes end
//! state | u32 chunk count | count x (32-byte chunk key, u32 length)`; a state is the
//! serialised sha256 state (`SerializableState`), absent (length 0) when the part was not
//! hashed on arrival. Schema 2 records (`u64 size | 32-byte sha256 of the part | chunk list`)
//! are rewritten by the upgrade with their sha256 as the etag and no states.

use super::blobs::{self, BlobRecord};
use super::chunks::{self, CHUNK_SIZE, ChunkRef};
use super::tables::{BLOBS, PARTS, STAGING, UPLOADS};
use super::{Store, begin_write_scope, load, save};
use crate::clock::Timestamp;
use crate::digest::{Digest, hex};
use crate::error::{Error, Result};
use crate::model::{UploadPart, UploadSession, UploadState};
use crate::validate;
use redb::{ReadableTable, WriteTransaction};
use sha2::digest::common::hazmat::{SerializableState, SerializedState};
use sha2::{Digest as _, Sha256};
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use uuid::Uuid;

pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;

/// Bytes that `complete` had to read back and hash because their part did not continue the
/// blob's hash state (parts sent out of order or replaced); exported as a metric.
pub static COMPLETE_REHASHED_BYTES: AtomicU64 = AtomicU64::new(0);

const PART_LAYOUT: u8 = 3;

pub(crate) struct PartRecord {
    pub(crate) size: u64,
    /// The etag's 32 bytes: BLAKE3 of the chunk list (sha256 of the bytes for parts written
    /// before schema 3).
    pub(crate) etag: [u8; 32],
    /// The serialised sha256 state the part's bytes were hashed from, and the state after them;
    /// empty when the part was not hashed on arrival.
    pub(crate) start: Vec<u8>,
    pub(crate) end: Vec<u8>,
    pub(crate) chunks: Vec<ChunkRef>,
}

impl PartRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(49 + self.start.len() + self.end.len() + self.chunks.len() * 36);
        out.push(PART_LAYOUT);
        out.extend_from_slice(&self.size.to_be_bytes());
        out.extend_from_slice(&self.etag);
        for state in [&self.start, &self.end] {
            out.extend_from_slice(&(state.len() as u16).to_be_bytes());
            out.extend_from_slice(state);
        }
        chunks::encode_list(&mut out, &self.chunks);
        out
    }

    pub(crate) fn decode(b: &[u8]) -> Result<PartRecord> {
        let bad = || Error::internal("stored part record is unreadable");
        if b.first() != Some(&PART_LAYOUT) || b.len() < 45 {
            return Err(bad());
        }
        let size = u64::from_be_bytes(b[1..9].try_into().unwrap());
        let etag: [u8; 32] = b[9..41].try_into().unwrap();
        let mut at = 41;
        let mut state = || -> Result<Vec<u8>> {
            let n = u16::from_be_bytes(b.get(at..at + 2).ok_or_else(bad)?.try_into().unwrap());
            let v = b.get(at + 2..at + 2 + n as usize).ok_or_else(bad)?.to_vec();
            at += 2 + n as usize;
            Ok(v)
        };
        let start = state()?;
        let end = state()?;
        let (chunks, _) = chunks::decode_list(b.get(at..).ok_or_else(bad)?)?;
        Ok(PartRecord {
            size,
            etag,
            start,
            end,
            chunks,
        })
    }

    /// Decodes a schema-2 record (`u64 size | sha256 of the part | chunk list`) for the
    /// upgrade to schema 3.
    pub(crate) fn decode_schema2(b: &[u8]) -> Result<PartRecord> {
        if b.len() < 44 {
            return Err(Error::internal("stored part record is truncated"));
        }
        let (chunks, _) = chunks::decode_list(&b[40..])?;
        Ok(PartRecord {
            size: u64::from_be_bytes(b[..8].try_into().unwrap()),
            etag: b[8..40].try_into().unwrap(),
            start: Vec::new(),
            end: Vec::new(),
            chunks,
        })
    }

    fn etag(&self) -> String {
        format!("\"{}\"", hex(&self.etag))
    }
}

/// A part's etag: the BLAKE3 of its chunk list (each chunk's 32-byte key and u32 big-endian
/// length, in order). The chunk keys are BLAKE3 hashes of the chunks, so this identifies the
/// part's bytes as surely as a hash of them would, without another pass over them.
fn part_etag(list: &[ChunkRef]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for c in list {
        h.update(&c.encode());
    }
    *h.finalize().as_bytes()
}

fn save_state(h: &Sha256) -> Vec<u8> {
    h.serialize().to_vec()
}

fn load_state(b: &[u8]) -> Option<Sha256> {
    let state = SerializedState::<Sha256>::try_from(b).ok()?;
    Sha256::deserialize(&state).ok()
}

/// The blob's chunk list assembled from the listed parts, and the record of each part (so that
/// `complete` can check that no part changed before it commits).
type Assembly = (Vec<ChunkRef>, Vec<(u32, PartRecord)>);

/// What a caller asks for when beginning an upload: also the request body of
/// `POST /v1/uploads`, checked by `begin_upload`.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BeginUpload {
    /// Absent: the digest is given at `complete` (docs/api.md, decision 18).
    pub expected_digest: Option<String>,
    /// Absent is 0 when a digest is given (section 1.2), and an error without one.
    #[serde(deserialize_with = "crate::model::optional_integer")]
    pub expected_size_bytes: Option<i64>,
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
        let digest = match &req.expected_digest {
            Some(d) => Some(Digest::parse(d).ok_or_else(|| invalid(validate::DIGEST_RULE))?),
            None => None,
        };
        // Without a digest nothing else says how many bytes are coming: the size must be given.
        let size = match (req.expected_size_bytes, digest) {
            (Some(size), _) => size,
            (None, Some(_)) => 0,
            (None, None) => {
                return Err(invalid(
                    "expected size is required when the digest is given at complete",
                ));
            }
        };
        if size < 0 {
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
            expected_size_bytes: size,
            state: UploadState::Created,
            expires_at: now.add(ttl),
            media_type_hint: req.media_type_hint,
            filename_hint: req.filename_hint,
            failure_message: None,
        };
        begin_write_scope(self, |txn| {
            // A session without a digest cannot be matched with a stored blob yet: that
            // happens at complete.
            let existing = match digest {
                Some(d) => blobs::get_in(&txn.open_table(BLOBS)?, d.as_bytes())?.map(|b| (d, b)),
                None => None,
            };
            let fresh = match existing {
                Some((digest, blob)) if blob.size as i64 == session.expected_size_bytes => {
                    session.state = UploadState::Ready;
                    blobs::hold_until(txn, digest.as_bytes(), session.expires_at)?;
                    false
                }
                Some((_, blob)) => {
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

    /// Starts writing one part; feed it chunks with [`PartWriter::write_chunk`] or a whole body
    /// with [`PartWriter::write_from`].
    pub fn part_writer(&self, id: Uuid, number: u32) -> PartWriter<'_> {
        // A lookup that fails only costs the carried hash: `complete` then reads the part back.
        let start = self.chain_start(id, number).unwrap_or(None);
        PartWriter {
            store: self,
            upload: id,
            number,
            nonce: Uuid::new_v4().as_u128(),
            index: 0,
            size: 0,
            start: start.as_ref().map(save_state).unwrap_or_default(),
            hasher: start,
            finished: false,
        }
    }

    /// The sha256 state part `number` continues from: the initial state for part 1, the end
    /// state of the highest-numbered part below it otherwise. `None` when that part does not
    /// exist (yet) or was itself not hashed on arrival: then the part is not hashed now, and
    /// `complete` reads it back.
    fn chain_start(&self, id: Uuid, number: u32) -> Result<Option<Sha256>> {
        if number <= 1 {
            return Ok(Some(Sha256::new()));
        }
        let txn = self.begin_read()?;
        let parts = txn.open_table(PARTS)?;
        let key = id.as_u128();
        let Some(row) = parts.range((key, 0u32)..(key, number))?.next_back() else {
            return Ok(None);
        };
        let rec = PartRecord::decode(row?.1.value())?;
        Ok(load_state(&rec.end))
    }

    /// Completes a session (docs/api.md, decision 2): assembles the listed parts, verifies size and sha256
    /// and answers with the session in `ready` or `failed`. `digest` is the one the request
    /// gives: required when the session was begun without one, and then the digest verified;
    /// when the session has one, it must be the same (decision 18).
    pub fn complete_upload(
        &self,
        id: Uuid,
        listed: &[(u32, String, i64)],
        digest: Option<&str>,
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
        let given = match digest {
            Some(d) => Some(Digest::parse(d).ok_or_else(|| {
                Error::invalid(format!("upload invalid input: {}", validate::DIGEST_RULE))
            })?),
            None => None,
        };
        let effective = match (session.expected_digest, given) {
            (Some(expected), Some(given)) if expected != given => {
                return Err(Error::precondition(format!(
                    "complete gives digest {given}, the session expects {expected}"
                )));
            }
            (Some(expected), _) => expected,
            (None, Some(given)) => given,
            (None, None) => {
                return Err(Error::invalid(
                    "upload invalid input: digest is required to complete a session begun without expected_digest",
                ));
            }
        };
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
        let digest = *effective.as_bytes();

        let (size, actual) = self.blob_sha256(&records, &digest)?;

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
                if now.map(|p| p.etag) != Some(rec.etag) {
                    return Err(Error::precondition(format!(
                        "upload part {n} changed while completing; retry"
                    )));
                }
            }
            drop(parts);
            // The digest is known from now on, whatever the verification finds.
            s.expected_digest = Some(effective);
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
                    effective
                ));
            }
            drop_parts(txn, id)?;
            store_session(txn, &s)?;
            Ok(s)
        })
    }

    /// The size and sha256 of the listed parts' bytes, in order. Parts that continue the hash
    /// state where the previous one left it contribute their stored end state; the others are
    /// read back in a read transaction (nothing is locked meanwhile) and hashed.
    fn blob_sha256(
        &self,
        records: &[(u32, PartRecord)],
        digest: &[u8; 32],
    ) -> Result<(u64, [u8; 32])> {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        for (_, rec) in records {
            let continues = !rec.start.is_empty() && rec.start == save_state(&hasher);
            match load_state(&rec.end).filter(|_| continues) {
                Some(end) => hasher = end,
                None => {
                    let reader = self.assembly_reader(rec.chunks.clone(), digest)?;
                    let read = reader
                        .hash_into(&mut hasher)
                        .map_err(|e| Error::internal(format!("assembling upload: {e}")))?;
                    if read != rec.size {
                        return Err(Error::internal(format!(
                            "stored part holds {read} bytes, its record says {}",
                            rec.size
                        )));
                    }
                    COMPLETE_REHASHED_BYTES.fetch_add(read, Ordering::Relaxed);
                }
            }
            size += rec.size;
        }
        Ok((size, hasher.finalize().into()))
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
        let abort = |txn: &WriteTransaction| {
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
        };
        super::freeing_write_scope(self, &format!("abort upload {id}"), abort)
    }

    /// Moves expired sessions that are still taking parts to `aborted` and releases their
    /// bytes (docs/api.md, decision 3). Returns how many sessions were aborted.
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
            let aborted = super::spending_headroom(self, "abort an expired upload", |txn| {
                let mut s = load_session(txn, id)?;
                if !(matches!(s.state, UploadState::Created | UploadState::Uploading)
                    && s.expires_at <= now)
                {
                    return Ok(false);
                }
                s.state = UploadState::Aborted;
                drop_parts(txn, id)?;
                store_session(txn, &s)?;
                Ok(true)
            })?;
            n += usize::from(aborted);
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
    /// The blob's running sha256, continued from the previous part; `None` when there is no
    /// state to continue from (see [`Store::part_writer`]).
    hasher: Option<Sha256>,
    /// The serialised state `hasher` started from (empty when `hasher` is `None`).
    start: Vec<u8>,
    finished: bool,
}

/// Why [`PartWriter::write_from`] stopped.
#[derive(Debug)]
pub enum FeedError {
    /// Reading the body failed or it ended early, `missing` bytes short.
    Body { error: std::io::Error, missing: u64 },
    /// Storing a chunk failed.
    Store(Error),
}

/// How many filled chunk buffers may wait for the store while the next one is read: enough to
/// keep both threads busy, and memory per part at `PIPELINE_DEPTH + 1` chunk buffers.
const PIPELINE_DEPTH: usize = 2;

impl PartWriter<'_> {
    /// Stores one chunk (at most `CHUNK_SIZE` bytes) in a short non-durable transaction.
    pub fn write_chunk(&mut self, data: &[u8]) -> Result<()> {
        if let Some(h) = &mut self.hasher {
            h.update(data);
        }
        store_chunk(self.store, self.nonce, self.index, data)?;
        self.index += 1;
        self.size += data.len() as u64;
        Ok(())
    }

    /// Reads `len` bytes from `body` and stores them as the part's chunks, reading the next
    /// chunk while the previous one is keyed and committed: this thread reads and carries the
    /// blob's sha256, a scoped writer thread computes chunk keys and commits. At most
    /// `PIPELINE_DEPTH + 1` chunk buffers exist at once. Each chunk is still committed in its
    /// own short transaction, so no write transaction waits on the socket.
    pub fn write_from(
        &mut self,
        body: &mut dyn Read,
        len: u64,
    ) -> std::result::Result<(), FeedError> {
        use crossbeam_channel::bounded;
        let (full_tx, full_rx) = bounded::<(Vec<u8>, usize)>(PIPELINE_DEPTH);
        let (free_tx, free_rx) = bounded::<Vec<u8>>(PIPELINE_DEPTH + 1);
        let (store, nonce, first) = (self.store, self.nonce, self.index);
        let hasher = &mut self.hasher;
        let (read_result, stored) = std::thread::scope(|scope| {
            let writer = scope.spawn(move || -> (u32, u64, Result<()>) {
                let (mut index, mut size) = (first, 0u64);
                for (buf, n) in full_rx {
                    if let Err(e) = store_chunk(store, nonce, index, &buf[..n]) {
                        return (index - first, size, Err(e));
                    }
                    index += 1;
                    size += n as u64;
                    // The reader may have stopped; a buffer it no longer wants is freed here.
                    let _ = free_tx.try_send(buf);
                }
                (index - first, size, Ok(()))
            });
            let mut allocated = 0;
            let mut remaining = len;
            let mut result = Ok(());
            while remaining > 0 {
                let want = remaining.min(CHUNK_SIZE as u64) as usize;
                let mut buf = match free_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) if allocated <= PIPELINE_DEPTH => {
                        allocated += 1;
                        vec![0u8; CHUNK_SIZE]
                    }
                    Err(_) => match free_rx.recv() {
                        Ok(b) => b,
                        // The writer stopped on an error, which its join reports.
                        Err(_) => break,
                    },
                };
                if let Err(error) = read_full(body, &mut buf[..want]) {
                    result = Err(FeedError::Body {
                        error,
                        missing: remaining,
                    });
                    break;
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&buf[..want]);
                }
                if full_tx.send((buf, want)).is_err() {
                    break;
                }
                remaining -= want as u64;
            }
            drop(full_tx);
            let stored = match writer.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            (result, stored)
        });
        let (count, size, store_result) = stored;
        self.index += count;
        self.size += size;
        store_result.map_err(FeedError::Store)?;
        read_result
    }

    /// Turns the staged chunks into the part (durably) and marks the session `uploading`.
    pub fn finish(mut self) -> Result<UploadPart> {
        self.finished = true;
        let end = self.hasher.as_ref().map(save_state).unwrap_or_default();
        let start = std::mem::take(&mut self.start);
        let (upload, number, nonce, size) = (self.upload, self.number, self.nonce, self.size);
        let result = begin_write_scope(self.store, |txn| {
            let mut s = load_session(txn, upload)?;
            accepts_parts(&s, Timestamp::now())?;
            let list = take_staged(txn, (nonce, 0)..=(nonce, u32::MAX))?;
            let record = PartRecord {
                size,
                etag: part_etag(&list),
                start,
                end,
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

/// Stores one chunk of a streaming part and stages its reference under the part's nonce, in a
/// short non-durable transaction.
fn store_chunk(store: &Store, nonce: u128, index: u32, data: &[u8]) -> Result<()> {
    let chunk = ChunkRef::of(data);
    let txn = store.begin_write_cheap()?;
    chunks::acquire(&txn, &chunk, data)?;
    txn.open_table(STAGING)?
        .insert((nonce, index), &chunk.encode())?;
    txn.commit()?;
    store.writeback.wrote(data.len() as u64);
    Ok(())
}

/// Fills `buf` from `r`; a body that ends first is an `UnexpectedEof` error.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "body ended early",
                ));
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hash state saved after one part and loaded for the next gives the digest of the
    /// whole, as a single pass would.
    #[test]
    fn saved_state_continues_the_hash() {
        let (a, b) = (vec![7u8; 1000], vec![9u8; 3333]);
        let mut h = Sha256::new();
        h.update(&a);
        let saved = save_state(&h);
        let mut resumed = load_state(&saved).expect("a saved state loads");
        resumed.update(&b);
        let whole: [u8; 32] = Sha256::digest([a, b].concat()).into();
        assert_eq!(<[u8; 32]>::from(resumed.finalize()), whole);
        assert!(load_state(&[]).is_none());
        assert!(load_state(&saved[1..]).is_none());
    }

    #[test]
    fn part_records_round_trip_and_schema2_records_upgrade() {
        let chunk = ChunkRef {
            hash: [3; 32],
            len: 77,
        };
        let rec = PartRecord {
            size: 77,
            etag: part_etag(&[chunk]),
            start: save_state(&Sha256::new()),
            end: vec![1, 2, 3],
            chunks: vec![chunk],
        };
        let back = PartRecord::decode(&rec.encode()).unwrap();
        assert_eq!(
            (back.size, back.etag, back.start, back.end, back.chunks),
            (rec.size, rec.etag, rec.start, rec.end, rec.chunks)
        );
        // Schema 2: u64 size | sha256 of the part | u32 n | n x (key, u32 length).
        let mut old = 77u64.to_be_bytes().to_vec();
        old.extend_from_slice(&[5; 32]);
        chunks::encode_list(&mut old, &[chunk]);
        let up = PartRecord::decode_schema2(&old).unwrap();
        assert_eq!((up.size, up.etag, up.chunks), (77, [5; 32], vec![chunk]));
        assert!(up.start.is_empty() && up.end.is_empty());
        assert!(PartRecord::decode(&old).is_err(), "no layout byte");
    }
}
