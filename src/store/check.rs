//! `imgsrv check`: verifies a stopped database (or a backup copy) from one read transaction.
//!
//! What is checked, and why each matters:
//! - every chunk's bytes against its key (BLAKE3, or sha256 for chunks stored before schema 3) and its stored xxh3 sum, its length, and
//!   the `meta` counters of chunks and bytes (metrics and space estimates rely on them);
//! - every chunk reference count against the references actually held by blob chunk lists,
//!   upload parts and staging rows (a count too low deletes bytes still in use, one too high
//!   leaks them);
//! - every blob's chunk list (chunks present, lengths adding up to the size) and every blob
//!   reference count against the artifacts and attachments that name the digest, whatever
//!   state their version is in (drafts, published, retired but still in its grace period);
//! - every catalog reference: versions to images, artifacts to versions, attachments to
//!   artifacts, aliases to published versions, jobs to versions, Simple Streams rows to
//!   artifacts and attachments, retirement records, and the index tables in both directions;
//! - that every record decodes.
//!
//! A damaged page can make redb panic: each section runs under `handle::guarded`, so damage
//! met in one table is reported and the other tables are still checked.

use super::blobs::BlobRecord;
use super::chunks::{self, CHUNK_SIZE, ChunkRef};
use super::retire::RetiredVersion;
use super::tables::*;
use super::{SCHEMA_VERSION, decode};
use crate::digest::Digest;
use crate::digest::hex;
use crate::error::Result;
use crate::model::*;
use redb::{ReadTransaction, ReadableTable};
use std::collections::{BTreeMap, BTreeSet};
use uuid::Uuid;

/// The outcome of a check.
#[derive(Debug, Default)]
pub struct Report {
    /// One readable sentence per problem found.
    pub problems: Vec<String>,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub blobs: u64,
    pub images: u64,
    pub versions: u64,
    pub jobs: u64,
}

type Hash = [u8; 32];

#[derive(Default)]
struct State {
    report: Report,
    /// Stored chunks and their lengths.
    chunks: BTreeMap<Hash, usize>,
    /// Chunks whose bytes do not match their key (BLAKE3, or sha256 before schema 3).
    damaged: Vec<Hash>,
    /// References held by blob chunk lists, parts and staging rows.
    chunk_uses: BTreeMap<Hash, u64>,
    /// Trusted blobs and their sizes.
    blobs: BTreeMap<Hash, u64>,
    images: BTreeMap<Uuid, Image>,
    versions: BTreeMap<Uuid, ImageVersion>,
    artifacts: BTreeMap<Uuid, Artifact>,
    attachments: BTreeMap<Uuid, Attachment>,
    retired: BTreeMap<(Uuid, String), RetiredVersion>,
    version_keys: BTreeMap<(Uuid, String), Uuid>,
    jobs_of: BTreeMap<Uuid, Uuid>,
}

impl State {
    fn problem(&mut self, p: String) {
        self.report.problems.push(p);
    }

    /// Runs one section; an error or a panic (a damaged page) becomes a problem.
    fn section(&mut self, what: &str, f: impl FnOnce(&mut State) -> Result<()>) {
        match super::handle::guarded(|| f(self)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.problem(format!("{what}: cannot be read: {e}")),
            Err(panic) => self.problem(format!("{what}: damaged page ({panic})")),
        }
    }

    /// Whether a version is a retired one whose grace period is not over (its rows remain).
    fn retired_in_grace(&self, v: &ImageVersion) -> bool {
        self.retired
            .get(&(v.image_id, v.version.clone()))
            .is_some_and(|r| r.version_id == v.id && r.purged_at.is_none())
    }

    /// Whether `id` names a retired version whose rows were purged after its grace.
    fn purged(&self, id: Uuid) -> bool {
        self.retired
            .values()
            .any(|r| r.version_id == id && r.purged_at.is_some())
    }

    fn version_name(&self, id: Uuid) -> String {
        match self.versions.get(&id) {
            Some(v) => {
                let image = self
                    .images
                    .get(&v.image_id)
                    .map(|i| i.name.clone())
                    .unwrap_or_else(|| v.image_id.to_string());
                let state = if self.retired_in_grace(v) {
                    "retired".to_string()
                } else {
                    v.state.to_string()
                };
                format!("{image} {} ({state})", v.version)
            }
            None => format!("version {id}"),
        }
    }
}

/// Checks the snapshot `txn`. `progress` is told the chunk bytes verified and the expected
/// total (chunk hashing is where the time goes).
pub(crate) fn check_txn(txn: &ReadTransaction, progress: &mut dyn FnMut(u64, u64)) -> Report {
    let mut s = State::default();
    let mut counters = (0u64, 0u64);
    let mut schema_ok = false;
    s.section("meta", |s| {
        let meta = txn.open_table(META)?;
        let get = |k: &str| -> Result<Option<u64>> { Ok(meta.get(k)?.map(|v| v.value())) };
        match get("schema_version")? {
            Some(SCHEMA_VERSION) => schema_ok = true,
            Some(v) if v < SCHEMA_VERSION => s.problem(format!(
                "the database has schema {v}; start `imgsrv serve` on it once to upgrade it to \
                 {SCHEMA_VERSION}, then check again"
            )),
            Some(v) => s.problem(format!(
                "the database has schema {v}, newer than this imgsrv knows ({SCHEMA_VERSION}); \
                 check it with the imgsrv that wrote it"
            )),
            None => s.problem("meta: schema_version is missing".into()),
        }
        counters = (
            get("chunk_count")?.unwrap_or(0),
            get("chunk_bytes")?.unwrap_or(0),
        );
        Ok(())
    });
    if !schema_ok {
        return s.report;
    }
    s.section("chunks", |s| {
        let sums = txn.open_table(CHUNK_SUMS)?;
        let refs = txn.open_table(CHUNK_REFS)?;
        let mut done = 0u64;
        for row in txn.open_table(CHUNKS)?.iter()? {
            let (k, v) = row?;
            let (hash, data) = (*k.value(), v.value());
            s.report.chunks += 1;
            s.report.chunk_bytes += data.len() as u64;
            s.chunks.insert(hash, data.len());
            let sha_ok = chunks::key_matches(&hash, data);
            if !sha_ok {
                s.damaged.push(hash);
            }
            if data.len() > CHUNK_SIZE {
                s.problem(format!(
                    "chunk {} is {} bytes, more than a chunk holds",
                    hex(&hash),
                    data.len()
                ));
            }
            match sums.get(&hash)?.map(|x| x.value()) {
                None => s.problem(format!("chunk {} has no stored checksum", hex(&hash))),
                Some(sum) if sha_ok && sum != chunks::checksum(data) => s.problem(format!(
                    "chunk {}: its stored xxh3 checksum is wrong (its bytes are intact; \
                     downloads of it fail until it is uploaded again)",
                    hex(&hash)
                )),
                Some(_) => {}
            }
            if refs.get(&hash)?.is_none() {
                s.problem(format!("chunk {} has no reference count", hex(&hash)));
            }
            done += data.len() as u64;
            progress(done, counters.1);
        }
        Ok(())
    });
    if (s.report.chunks, s.report.chunk_bytes) != counters {
        let (c, b) = (s.report.chunks, s.report.chunk_bytes);
        s.problem(format!(
            "meta counters say {} chunks of {} bytes, the chunk table holds {c} chunks of {b} bytes",
            counters.0, counters.1
        ));
    }
    s.section("chunk_sums", |s| {
        for row in txn.open_table(CHUNK_SUMS)?.iter()? {
            let hash = *row?.0.value();
            if !s.chunks.contains_key(&hash) {
                s.problem(format!(
                    "chunk_sums has a row for chunk {} that is not stored",
                    hex(&hash)
                ));
            }
        }
        Ok(())
    });
    s.section("blobs", |s| {
        for row in txn.open_table(BLOBS)?.iter()? {
            let (k, v) = row?;
            let digest = *k.value();
            let record = match BlobRecord::decode(v.value()) {
                Ok(r) => r,
                Err(e) => {
                    s.problem(format!("blob {}: {e}", Digest::from(digest)));
                    continue;
                }
            };
            s.report.blobs += 1;
            s.blobs.insert(digest, record.size);
            list_uses(s, &record.chunks, &format!("blob {}", Digest::from(digest)));
            let total: u64 = record.chunks.iter().map(|c| c.len as u64).sum();
            if total != record.size {
                s.problem(format!(
                    "blob {} is recorded as {} bytes but its chunks add up to {total}",
                    Digest::from(digest),
                    record.size
                ));
            }
        }
        Ok(())
    });
    s.section("upload sessions and parts", |s| {
        let mut sessions = BTreeMap::new();
        for row in txn.open_table(UPLOADS)?.iter()? {
            let (k, v) = row?;
            match decode::<UploadSession>(v.value(), "upload") {
                Ok(u) if u.id.as_u128() == k.value() => {
                    sessions.insert(u.id, u.state);
                }
                Ok(u) => s.problem(format!(
                    "upload session row {} holds {}",
                    key(k.value()),
                    u.id
                )),
                Err(e) => s.problem(format!("upload session {}: {e}", key(k.value()))),
            }
        }
        for row in txn.open_table(PARTS)?.iter()? {
            let (k, v) = row?;
            let (upload, n) = k.value();
            let what = format!("part {n} of upload {}", key(upload));
            match sessions.get(&Uuid::from_u128(upload)) {
                Some(UploadState::Created | UploadState::Uploading) => {}
                Some(state) => s.problem(format!("{what} is kept although the session is {state}")),
                None => s.problem(format!("{what} belongs to no upload session")),
            }
            match super::uploads::PartRecord::decode(v.value()) {
                Ok(part) => list_uses(s, &part.chunks, &what),
                Err(_) => s.problem(format!("{what}: its record is unreadable")),
            }
        }
        for row in txn.open_table(STAGING)?.iter()? {
            let (_, v) = row?;
            let c = ChunkRef::decode(v.value());
            list_uses(s, &[c], "a part upload interrupted by a crash");
        }
        Ok(())
    });
    s.section("chunk_refs", |s| {
        for row in txn.open_table(CHUNK_REFS)?.iter()? {
            let (k, v) = row?;
            let (hash, count) = (*k.value(), v.value());
            let held = s.chunk_uses.get(&hash).copied().unwrap_or(0);
            if !s.chunks.contains_key(&hash) {
                s.problem(format!(
                    "chunk_refs counts {count} for chunk {} that is not stored",
                    hex(&hash)
                ));
            } else if count != held {
                s.problem(format!(
                    "chunk {} has reference count {count} but {held} references are held",
                    hex(&hash)
                ));
            }
        }
        Ok(())
    });
    check_catalog(txn, &mut s);
    let damaged = std::mem::take(&mut s.damaged);
    for hash in damaged {
        let users = match super::handle::guarded(|| chunk_users(txn, &hash)) {
            Ok(Ok(u)) => u,
            _ => Vec::new(),
        };
        s.problem(format!(
            "chunk {}: its stored bytes do not match its key{}",
            hex(&hash),
            describe_users(&users)
        ));
    }
    s.report
}

fn key(id: u128) -> Uuid {
    Uuid::from_u128(id)
}

/// Counts the references a chunk list holds and reports chunks it names that are missing or
/// stored with another length.
fn list_uses(s: &mut State, list: &[ChunkRef], what: &str) {
    for c in list {
        *s.chunk_uses.entry(c.hash).or_default() += 1;
        match s.chunks.get(&c.hash) {
            None => s.problem(format!(
                "{what} names chunk {} which is missing",
                hex(&c.hash)
            )),
            Some(&len) if len != c.len as usize => s.problem(format!(
                "{what} names chunk {} as {} bytes but it is stored with {len}",
                hex(&c.hash),
                c.len
            )),
            Some(_) => {}
        }
    }
}

/// Reads every row of a JSON table keyed by UUID, reporting rows that do not decode.
fn json_rows<T: serde::de::DeserializeOwned>(
    txn: &ReadTransaction,
    def: redb::TableDefinition<u128, &[u8]>,
    what: &str,
    s: &mut State,
) -> Result<Vec<(Uuid, T)>> {
    let mut out = Vec::new();
    for row in txn.open_table(def)?.iter()? {
        let (k, v) = row?;
        match decode::<T>(v.value(), what) {
            Ok(x) => out.push((key(k.value()), x)),
            Err(e) => s.problem(format!("{what} {}: {e}", key(k.value()))),
        }
    }
    Ok(out)
}

fn check_catalog(txn: &ReadTransaction, s: &mut State) {
    s.section("images", |s| {
        for (id, image) in json_rows::<Image>(txn, IMAGES, "image", s)? {
            if image.id != id {
                s.problem(format!("image row {id} holds image {}", image.id));
            }
            s.images.insert(id, image);
        }
        let mut named = BTreeSet::new();
        for row in txn.open_table(IMAGE_NAMES)?.iter()? {
            let (k, v) = row?;
            let (name, id) = (k.value().to_string(), key(v.value()));
            match s.images.get(&id) {
                Some(i) if i.name == name => {
                    named.insert(id);
                }
                Some(i) => s.problem(format!(
                    "image name {name:?} points at image {id} named {:?}",
                    i.name
                )),
                None => s.problem(format!("image name {name:?} points at missing image {id}")),
            }
        }
        let unnamed: Vec<String> = s
            .images
            .values()
            .filter(|i| !named.contains(&i.id))
            .map(|i| format!("image {} ({:?}) has no name row", i.id, i.name))
            .collect();
        s.report.problems.extend(unnamed);
        s.report.images = s.images.len() as u64;
        Ok(())
    });
    s.section("retired versions", |s| {
        for row in txn.open_table(RETIRED)?.iter()? {
            let (k, v) = row?;
            let (image, version) = k.value();
            let (image, version) = (key(image), version.to_string());
            match decode::<RetiredVersion>(v.value(), "retired version") {
                Ok(r) => {
                    if !s.images.contains_key(&image) {
                        s.problem(format!(
                            "retired version {version:?} belongs to missing image {image}"
                        ));
                    }
                    s.retired.insert((image, version), r);
                }
                Err(e) => s.problem(format!("retired version {version:?} of {image}: {e}")),
            }
        }
        Ok(())
    });
    s.section("versions", |s| {
        for (id, v) in json_rows::<ImageVersion>(txn, VERSIONS, "version", s)? {
            if v.id != id {
                s.problem(format!("version row {id} holds version {}", v.id));
            }
            if !s.images.contains_key(&v.image_id) {
                s.problem(format!(
                    "version {:?} ({id}) belongs to missing image {}",
                    v.version, v.image_id
                ));
            }
            s.versions.insert(id, v);
        }
        for row in txn.open_table(VERSION_KEYS)?.iter()? {
            let (k, v) = row?;
            let (image, version) = k.value();
            let (image, version, id) = (key(image), version.to_string(), key(v.value()));
            match s.versions.get(&id) {
                Some(x) if x.image_id == image && x.version == version => {}
                Some(x) => s.problem(format!(
                    "version key {version:?} of image {image} points at version {id}, which is {:?} of image {}",
                    x.version, x.image_id
                )),
                None => s.problem(format!(
                    "version key {version:?} of image {image} points at missing version {id}"
                )),
            }
            if s.retired.contains_key(&(image, version.clone())) {
                s.problem(format!(
                    "version {version:?} of image {image} is both current and retired"
                ));
            }
            s.version_keys.insert((image, version), id);
        }
        let mut lost = Vec::new();
        for v in s.versions.values() {
            let keyed = s.version_keys.get(&(v.image_id, v.version.clone())) == Some(&v.id);
            if !keyed && !s.retired_in_grace(v) {
                lost.push(format!(
                    "version {:?} ({}) is neither named by a version key nor a retired version in its grace period",
                    v.version, v.id
                ));
            }
        }
        s.report.problems.extend(lost);
        let mut purged_rows = Vec::new();
        for r in s.retired.values() {
            if r.purged_at.is_some() && s.versions.contains_key(&r.version_id) {
                purged_rows.push(format!(
                    "retired version {:?} ({}) was purged but its version row remains",
                    r.version, r.version_id
                ));
            }
            if r.purged_at.is_none() && !s.versions.contains_key(&r.version_id) {
                purged_rows.push(format!(
                    "retired version {:?} ({}) is within its grace period but its version row is missing",
                    r.version, r.version_id
                ));
            }
        }
        s.report.problems.extend(purged_rows);
        s.report.versions = s.versions.len() as u64;
        Ok(())
    });
    s.section("artifacts", |s| {
        check_children(
            txn,
            s,
            &Children {
                rows: ARTIFACTS,
                index: VERSION_ARTIFACTS,
                names: ["artifact", "version", "version_artifacts"],
                ids: |a: &Artifact| (a.id, a.version_id),
                records: |s| &mut s.artifacts,
                parent_exists: |s, v| s.versions.contains_key(&v),
            },
        )
    });
    s.section("attachments", |s| {
        check_children(
            txn,
            s,
            &Children {
                rows: ATTACHMENTS,
                index: ARTIFACT_ATTACHMENTS,
                names: ["attachment", "artifact", "artifact_attachments"],
                ids: |t: &Attachment| (t.id, t.artifact_id),
                records: |s| &mut s.attachments,
                parent_exists: |s, a| s.artifacts.contains_key(&a),
            },
        )
    });
    s.section("blob references", |s| check_blob_refs(txn, s));
    s.section("aliases", |s| {
        for row in txn.open_table(ALIASES)?.iter()? {
            let (k, v) = row?;
            let (image, name) = k.value();
            let (image, name) = (key(image), name.to_string());
            let a: Alias = match decode(v.value(), "alias") {
                Ok(a) => a,
                Err(e) => {
                    s.problem(format!("alias {name:?} of image {image}: {e}"));
                    continue;
                }
            };
            let what = format!("alias {name:?} of image {image}");
            if a.image_id != image || a.alias != name {
                s.problem(format!("{what} holds the record of alias {:?}", a.alias));
            }
            if !s.images.contains_key(&image) {
                s.problem(format!("{what} belongs to a missing image"));
            }
            match s.versions.get(&a.version_id) {
                None => s.problem(format!("{what} points at missing version {}", a.version_id)),
                Some(v) if v.image_id != image || v.version != a.version => s.problem(format!(
                    "{what} points at version {} which is {:?} of image {}",
                    v.id, v.version, v.image_id
                )),
                Some(v) if v.state != VersionState::Published => {
                    s.problem(format!("{what} points at a {} version", v.state))
                }
                Some(v) if s.retired_in_grace(v) => {
                    s.problem(format!("{what} points at a retired version"))
                }
                Some(_) => {}
            }
        }
        Ok(())
    });
    s.section("publish jobs", |s| {
        let jobs = json_rows::<PublishJob>(txn, JOBS, "publish job", s)?;
        for row in txn.open_table(VERSION_JOBS)?.iter()? {
            let (k, v) = row?;
            s.jobs_of.insert(key(k.value()), key(v.value()));
        }
        s.report.jobs = jobs.len() as u64;
        let ids: BTreeSet<Uuid> = jobs.iter().map(|(id, _)| *id).collect();
        for (id, job) in &jobs {
            let what = format!("publish job {id}");
            if job.id != *id {
                s.problem(format!("{what} holds job {}", job.id));
            }
            if s.jobs_of.get(&job.version_id) != Some(id) {
                s.problem(format!(
                    "{what} is not the job recorded for its version {}",
                    job.version_id
                ));
            }
            match s.versions.get(&job.version_id) {
                None if s.purged(job.version_id) => {}
                None => s.problem(format!("{what} names missing version {}", job.version_id)),
                Some(v)
                    if job.state == JobState::Succeeded && v.state != VersionState::Published =>
                {
                    s.problem(format!("{what} succeeded but its version is {}", v.state))
                }
                Some(v) if v.state == VersionState::Draft => {
                    s.problem(format!("{what} exists but its version is a draft"))
                }
                Some(_) => {}
            }
        }
        let mut found = Vec::new();
        for (v, j) in &s.jobs_of {
            if !ids.contains(j) {
                found.push(format!("version {v} names missing publish job {j}"));
            }
        }
        for v in s.versions.values() {
            if v.state != VersionState::Draft && !s.jobs_of.contains_key(&v.id) {
                found.push(format!(
                    "version {:?} ({}) is {} but has no publish job",
                    v.version, v.id, v.state
                ));
            }
        }
        s.report.problems.extend(found);
        Ok(())
    });
    s.section("incus rows", |s| {
        for row in txn.open_table(INCUS_ROWS)?.iter()? {
            let (k, v) = row?;
            let (version, artifact) = k.value();
            let (version, artifact) = (key(version), key(artifact));
            let what = format!("Simple Streams row of version {version}, artifact {artifact}");
            match s.versions.get(&version) {
                Some(v) if v.state == VersionState::Published && !s.retired_in_grace(v) => {}
                Some(v) => s.problem(format!(
                    "{what}: the version is not published or is retired ({})",
                    v.state
                )),
                None => s.problem(format!("{what}: the version is missing")),
            }
            if s.artifacts.get(&artifact).map(|a| a.version_id) != Some(version) {
                s.problem(format!(
                    "{what}: the artifact is missing or not of that version"
                ));
            }
            match decode::<IncusRow>(v.value(), "Simple Streams row") {
                Ok(r) => {
                    if s.attachments.get(&r.attachment_id).map(|t| t.artifact_id) != Some(artifact)
                    {
                        s.problem(format!(
                            "{what}: its attachment {} is missing or not of that artifact",
                            r.attachment_id
                        ));
                    }
                }
                Err(e) => s.problem(format!("{what}: {e}")),
            }
        }
        Ok(())
    });
    s.section("retention policies", |s| {
        for row in txn.open_table(RETENTION)?.iter()? {
            let image = key(row?.0.value());
            if !s.images.contains_key(&image) {
                s.problem(format!(
                    "a retention policy belongs to missing image {image}"
                ));
            }
        }
        Ok(())
    });
    s.section("principals and tokens", |s| {
        let principals: BTreeSet<Uuid> =
            json_rows::<AuthPrincipal>(txn, PRINCIPALS, "principal", s)?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
        for (id, t) in json_rows::<StoredToken>(txn, TOKENS, "token", s)? {
            if !principals.contains(&t.token.principal_id) {
                s.problem(format!(
                    "token {id} belongs to missing principal {}",
                    t.token.principal_id
                ));
            }
        }
        Ok(())
    });
}

/// A catalog table whose records belong to parent records through a `(parent, child)` index
/// table: artifacts under versions, attachments under artifacts.
struct Children<'t, T> {
    rows: redb::TableDefinition<'t, u128, &'static [u8]>,
    index: redb::TableDefinition<'t, (u128, u128), ()>,
    /// What the messages call a record, its parent and the index table.
    names: [&'static str; 3],
    /// A record's own id and its parent's.
    ids: fn(&T) -> (Uuid, Uuid),
    /// Where the checked records are kept, for the sections after this one.
    records: fn(&mut State) -> &mut BTreeMap<Uuid, T>,
    parent_exists: fn(&State, Uuid) -> bool,
}

/// Checks a table of child records: each row holds the record its key names, each record's
/// parent exists, and the index lists every record, each under its own parent.
fn check_children<T: serde::de::DeserializeOwned>(
    txn: &ReadTransaction,
    s: &mut State,
    t: &Children<'_, T>,
) -> Result<()> {
    let [child, parent, index] = t.names;
    for (id, x) in json_rows::<T>(txn, t.rows, child, s)? {
        let (own, parent_id) = (t.ids)(&x);
        if own != id {
            s.problem(format!("{child} row {id} holds {child} {own}"));
        }
        if !(t.parent_exists)(s, parent_id) {
            s.problem(format!(
                "{child} {id} belongs to missing {parent} {parent_id}"
            ));
        }
        (t.records)(s).insert(id, x);
    }
    let listed = pair_rows(txn, t.index)?;
    for (p, c) in &listed {
        if (t.records)(s).get(c).map(|x| (t.ids)(x).1) != Some(*p) {
            s.problem(format!(
                "{index} lists {child} {c} under {parent} {p}, which does not hold it"
            ));
        }
    }
    let unlisted: Vec<String> = (t.records)(s)
        .values()
        .map(t.ids)
        .filter(|(id, p)| !listed.contains(&(*p, *id)))
        .map(|(id, _)| format!("{child} {id} is not listed under its {parent}"))
        .collect();
    s.report.problems.extend(unlisted);
    Ok(())
}

fn pair_rows(
    txn: &ReadTransaction,
    def: redb::TableDefinition<(u128, u128), ()>,
) -> Result<BTreeSet<(Uuid, Uuid)>> {
    let mut out = BTreeSet::new();
    for row in txn.open_table(def)?.iter()? {
        let (a, b) = row?.0.value();
        out.insert((key(a), key(b)));
    }
    Ok(out)
}

/// Blob reference counts equal the artifacts and attachments naming each digest; versions past
/// draft name only trusted blobs of the declared size.
fn check_blob_refs(txn: &ReadTransaction, s: &mut State) -> Result<()> {
    let mut expected: BTreeMap<Hash, u64> = BTreeMap::new();
    let mut named: Vec<(Hash, i64, Uuid, String)> = Vec::new();
    for a in s.artifacts.values() {
        let d = *a.primary_blob_digest.as_bytes();
        *expected.entry(d).or_default() += 1;
        named.push((
            d,
            a.primary_blob_size_bytes,
            a.version_id,
            format!("artifact {}", a.id),
        ));
    }
    for t in s.attachments.values() {
        let d = *t.blob_digest.as_bytes();
        *expected.entry(d).or_default() += 1;
        let version = s.artifacts.get(&t.artifact_id).map(|a| a.version_id);
        if let Some(v) = version {
            named.push((d, t.blob_size_bytes, v, format!("attachment {}", t.id)));
        }
    }
    let mut counted = BTreeSet::new();
    for row in txn.open_table(BLOB_REFS)?.iter()? {
        let (k, v) = row?;
        let (digest, (count, _hold)) = (*k.value(), v.value());
        counted.insert(digest);
        let want = expected.get(&digest).copied().unwrap_or(0);
        if count != want {
            s.problem(format!(
                "blob {} has reference count {count} but {want} artifacts and attachments name it",
                Digest::from(digest)
            ));
        }
    }
    for (d, n) in &expected {
        if !counted.contains(d) {
            s.problem(format!(
                "blob {} is named by {n} artifacts and attachments but has no reference count",
                Digest::from(*d)
            ));
        }
    }
    let uncounted: Vec<String> = s
        .blobs
        .keys()
        .filter(|d| !counted.contains(*d))
        .map(|d| {
            format!(
                "blob {} has no reference row, so it would never be collected",
                Digest::from(*d)
            )
        })
        .collect();
    s.report.problems.extend(uncounted);
    for (d, size, version, what) in named {
        let Some(v) = s.versions.get(&version) else {
            continue;
        };
        if v.state == VersionState::Draft {
            continue;
        }
        match s.blobs.get(&d) {
            None => s.problem(format!(
                "{what} of {} names blob {} which is not stored",
                s.version_name(version),
                Digest::from(d)
            )),
            Some(&stored) if stored as i64 != size => s.problem(format!(
                "{what} of {} declares {size} bytes for blob {} which holds {stored}",
                s.version_name(version),
                Digest::from(d)
            )),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Where a chunk is used: each blob whose chunk list names it, with the versions (as
/// `image version (state)`) whose artifacts or attachments name that blob. For the reports of
/// `imgsrv check` and of the scrubber.
pub(crate) fn chunk_users(txn: &ReadTransaction, hash: &Hash) -> Result<Vec<(Hash, Vec<String>)>> {
    let mut blobs = Vec::new();
    for row in txn.open_table(BLOBS)?.iter()? {
        let (k, v) = row?;
        if let Ok(r) = BlobRecord::decode(v.value())
            && r.chunks.iter().any(|c| &c.hash == hash)
        {
            blobs.push(*k.value());
        }
    }
    if blobs.is_empty() {
        return Ok(Vec::new());
    }
    let mut version_of_artifact = BTreeMap::new();
    let mut by_digest: BTreeMap<Hash, BTreeSet<Uuid>> = BTreeMap::new();
    for row in txn.open_table(ARTIFACTS)?.iter()? {
        let Ok(a) = decode::<Artifact>(row?.1.value(), "artifact") else {
            continue;
        };
        version_of_artifact.insert(a.id, a.version_id);
        by_digest
            .entry(*a.primary_blob_digest.as_bytes())
            .or_default()
            .insert(a.version_id);
    }
    for row in txn.open_table(ATTACHMENTS)?.iter()? {
        let Ok(t) = decode::<Attachment>(row?.1.value(), "attachment") else {
            continue;
        };
        if let Some(v) = version_of_artifact.get(&t.artifact_id) {
            by_digest
                .entry(*t.blob_digest.as_bytes())
                .or_default()
                .insert(*v);
        }
    }
    let versions = txn.open_table(VERSIONS)?;
    let images = txn.open_table(IMAGES)?;
    let retired = txn.open_table(RETIRED)?;
    let mut out = Vec::new();
    for d in blobs {
        let mut names = Vec::new();
        for id in by_digest.get(&d).into_iter().flatten() {
            let Some(v) = super::load::<ImageVersion>(&versions, id.as_u128(), "version")? else {
                continue;
            };
            let image = super::load::<Image>(&images, v.image_id.as_u128(), "image")?
                .map(|i| i.name)
                .unwrap_or_else(|| v.image_id.to_string());
            let is_retired = retired
                .get((v.image_id.as_u128(), v.version.as_str()))?
                .and_then(|r| decode::<RetiredVersion>(r.value(), "retired version").ok())
                .is_some_and(|r| r.version_id == v.id);
            let state = if is_retired {
                "retired".to_string()
            } else {
                v.state.to_string()
            };
            names.push(format!("{image} {} ({state})", v.version));
        }
        out.push((d, names));
    }
    Ok(out)
}

/// "; used by blob sha256:... (in debian 12.5 (published))" or "; used by no blob".
pub(crate) fn describe_users(users: &[(Hash, Vec<String>)]) -> String {
    if users.is_empty() {
        return "; no blob uses it".into();
    }
    let parts: Vec<String> = users
        .iter()
        .map(|(d, versions)| {
            if versions.is_empty() {
                format!("blob {} (in no version)", Digest::from(*d))
            } else {
                format!("blob {} (in {})", Digest::from(*d), versions.join(", "))
            }
        })
        .collect();
    format!("; used by {}", parts.join("; "))
}

impl super::backup::Offline {
    /// Checks the database (see the module comment).
    pub fn check(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<Report> {
        let txn = self.begin_read()?;
        Ok(check_txn(&txn, progress))
    }
}
