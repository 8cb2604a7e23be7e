//! Storage: byte-exact round trips around chunk boundaries, deduplication and garbage
//! collection proven by reading the redb file, the upload sweeper (docs/api.md, decision 3) and verified
//! streaming of a corrupted chunk (docs/api.md, decision 8).
//!
//! The database is inspected only while the server is stopped (redb locks the file). Table
//! names, key types and value layouts mirror `src/store/tables.rs`, `blobs.rs` and `uploads.rs`.

use crate::util::tables::{BLOBS, CHUNK_REFS, CHUNKS, META, PARTS, STAGING};
use crate::util::*;
use redb::{ReadableDatabase, ReadableTable};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

pub type Hash = [u8; 32];

/// The storage tables of a stopped server's database, decoded.
#[derive(Debug)]
pub struct Db {
    /// Chunk key -> (stored bytes, whether they still hash to the key).
    pub chunks: BTreeMap<Hash, (usize, bool)>,
    /// Chunk key -> reference count.
    pub refs: BTreeMap<Hash, u64>,
    /// Blob sha256 -> (size, ordered chunk list).
    pub blobs: BTreeMap<Hash, (u64, Vec<Hash>)>,
    /// (upload id, part number) -> chunk list.
    pub parts: BTreeMap<(u128, u32), Vec<Hash>>,
    /// Chunk references of part uploads still streaming in (left by a crash).
    pub staging: Vec<Hash>,
    /// The `meta` counters of stored chunks and their bytes (kept for metrics).
    pub counters: (u64, u64),
}

/// Decodes a count-prefixed chunk list (`u32 n | n x (sha256, u32 len)`).
fn chunk_list(b: &[u8]) -> Vec<Hash> {
    let n = u32::from_be_bytes(b[..4].try_into().unwrap()) as usize;
    assert_eq!(b.len(), 4 + n * 36, "chunk list length");
    b[4..]
        .chunks_exact(36)
        .map(|e| e[..32].try_into().unwrap())
        .collect()
}

impl Db {
    /// Reads the storage tables. The server must be stopped.
    pub fn read(path: &Path) -> Db {
        match redb::ReadOnlyDatabase::open(path) {
            Ok(db) => Db::read_from(&db),
            // A crash after non-durable commits can leave the allocator state stale; let redb
            // repair the file exactly as the server's next open would.
            Err(redb::DatabaseError::RepairAborted) => {
                Db::read_from(&redb::Database::open(path).expect("opening for repair"))
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }

    fn read_from(db: &impl ReadableDatabase) -> Db {
        let txn = db.begin_read().unwrap();
        let mut out = Db {
            chunks: BTreeMap::new(),
            refs: BTreeMap::new(),
            blobs: BTreeMap::new(),
            parts: BTreeMap::new(),
            staging: Vec::new(),
            counters: (0, 0),
        };
        for row in txn.open_table(CHUNKS).unwrap().iter().unwrap() {
            let (k, v) = row.unwrap();
            // New chunks are keyed by BLAKE3; chunks of an upgraded schema-2 file keep sha256.
            let intact = blake3::hash(v.value()).as_bytes() == k.value()
                || Sha256::digest(v.value()).as_slice() == k.value();
            out.chunks.insert(*k.value(), (v.value().len(), intact));
        }
        for row in txn.open_table(CHUNK_REFS).unwrap().iter().unwrap() {
            let (k, v) = row.unwrap();
            out.refs.insert(*k.value(), v.value());
        }
        for row in txn.open_table(BLOBS).unwrap().iter().unwrap() {
            // u8 version | u64 size | i64 verified_at | u16 media type length | media type | list
            let (k, v) = row.unwrap();
            let b = v.value();
            assert_eq!(b[0], 1, "blob record layout version");
            let size = u64::from_be_bytes(b[1..9].try_into().unwrap());
            let mt = u16::from_be_bytes(b[17..19].try_into().unwrap()) as usize;
            out.blobs
                .insert(*k.value(), (size, chunk_list(&b[19 + mt..])));
        }
        for row in txn.open_table(PARTS).unwrap().iter().unwrap() {
            // u8 layout (3) | u64 size | etag | u16 n + start state | u16 m + end state | list
            let (k, v) = row.unwrap();
            let b = v.value();
            assert_eq!(b[0], 3, "part record layout");
            let mut at = 41;
            for _ in 0..2 {
                at += 2 + u16::from_be_bytes(b[at..at + 2].try_into().unwrap()) as usize;
            }
            out.parts.insert(k.value(), chunk_list(&b[at..]));
        }
        for row in txn.open_table(STAGING).unwrap().iter().unwrap() {
            let (_, v) = row.unwrap();
            out.staging.push(v.value()[..32].try_into().unwrap());
        }
        let meta = txn.open_table(META).unwrap();
        let get = |k: &str| meta.get(k).unwrap().map(|v| v.value()).unwrap_or(0);
        out.counters = (get("chunk_count"), get("chunk_bytes"));
        out
    }

    /// The storage invariants of `tables.rs`: a chunk row and its count exist together, every
    /// count equals the references held by blob chunk lists, upload parts and staging rows,
    /// every referenced chunk is stored, and the `meta` counters match the chunk table. With
    /// `intact`, every stored chunk also hashes to its key.
    pub fn check(&self, intact: bool) {
        let mut expected: BTreeMap<Hash, u64> = BTreeMap::new();
        let lists = self
            .blobs
            .values()
            .map(|(_, l)| l)
            .chain(self.parts.values())
            .chain(std::iter::once(&self.staging));
        for list in lists {
            for h in list {
                *expected.entry(*h).or_default() += 1;
            }
        }
        assert_eq!(
            self.refs, expected,
            "chunk_refs differ from the references held by blobs, parts and staging rows"
        );
        let stored: Vec<&Hash> = self.chunks.keys().collect();
        let counted: Vec<&Hash> = self.refs.keys().collect();
        assert_eq!(
            stored, counted,
            "chunks and chunk_refs name different chunks"
        );
        if intact {
            assert!(
                self.chunks.values().all(|(_, ok)| *ok),
                "a stored chunk does not match its key"
            );
        }
    }

    pub fn blob(&self, digest: &str) -> Option<&(u64, Vec<Hash>)> {
        self.blobs.get(&hash_of_digest(digest))
    }

    pub fn has_chunk(&self, h: &Hash) -> bool {
        self.chunks.contains_key(h)
    }

    pub fn count(&self, h: &Hash) -> u64 {
        self.refs.get(h).copied().unwrap_or(0)
    }
}

pub fn hash_of_digest(digest: &str) -> Hash {
    let hex = digest.strip_prefix("sha256:").expect("sha256: digest");
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}

/// The chunk keys a part of these bytes is stored as: the BLAKE3 of each `CHUNK_SIZE` piece
/// from its start.
pub fn chunk_hashes(part: &[u8]) -> Vec<Hash> {
    part.chunks(CHUNK_SIZE)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

/// A part's etag: the quoted lowercase hex BLAKE3 of its chunk list, that is of each
/// `CHUNK_SIZE` piece's BLAKE3 followed by the piece's length as a big-endian u32.
pub fn part_etag(data: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    for c in data.chunks(CHUNK_SIZE) {
        h.update(blake3::hash(c).as_bytes());
        h.update(&(c.len() as u32).to_be_bytes());
    }
    format!("\"{}\"", h.finalize().to_hex())
}

/// Stops the server (SIGKILL; there is no other way to stop it) and reads its database.
pub fn stop_and_read(s: &mut Server) -> Db {
    s.kill9();
    Db::read(&s.db_path())
}

/// One sample of an unlabelled series from the metrics endpoint.
pub fn metric(metrics: &str, name: &str) -> f64 {
    let r = raw_request(metrics, "GET", "/metrics", &[], None);
    assert_eq!(r.status, 200);
    let text = r.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("series {name} missing in:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Begins an upload session for `data`; returns its id.
pub fn begin(s: &Server, token: &str, data: &[u8]) -> String {
    let r = s.begin_upload(token, data);
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["state"], "created");
    r.json()["id"].as_str().unwrap().to_string()
}

/// PUTs one part and returns the response.
pub fn put_part(s: &Server, token: &str, id: &str, n: u32, body: &[u8]) -> Resp {
    let auth = format!("Bearer {token}");
    s.request(
        "PUT",
        &format!("/v1/uploads/{id}/parts/{n}"),
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/octet-stream"),
        ],
        body,
    )
}

/// PUTs one part, asserts the UploadPart answer and returns its complete-list entry.
pub fn put_part_ok(s: &Server, token: &str, id: &str, n: u32, body: &[u8]) -> Value {
    let r = put_part(s, token, id, n, body);
    assert_eq!(r.status, 200, "{}", r.text());
    let p = r.json();
    assert_eq!(p["etag"], part_etag(body), "{p}");
    assert_eq!(p["size_bytes"], body.len(), "{p}");
    assert_eq!(p["part_number"], n, "{p}");
    json!({"number": n, "etag": p["etag"], "size_bytes": body.len()})
}

pub fn complete(s: &Server, token: &str, id: &str, parts: &[Value]) -> Resp {
    s.call(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        token,
        &json!({ "parts": parts }),
    )
}

/// Downloads a blob whole, then with ranges that straddle each given offset (chunk and
/// part boundaries) plus suffix and open-ended ranges; every byte must match `data`.
pub fn assert_downloads(s: &Server, data: &[u8], boundaries: &[usize]) {
    let digest = sha256_digest(data);
    let path = format!("/v1/blobs/{digest}");
    let r = s.get(&path);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("Content-Length"),
        Some(data.len().to_string().as_str())
    );
    assert_eq!(r.body.len(), data.len(), "whole download of {digest}");
    assert!(r.body == data, "whole download of {digest} differs");
    let h = s.head(&path);
    assert_eq!(h.status, 200);
    assert_eq!(
        h.header("Content-Length"),
        Some(data.len().to_string().as_str())
    );
    assert!(h.body.is_empty());
    if data.is_empty() {
        let r = s.get_with(&path, &[("Range", "bytes=0-0")]);
        r.assert_problem(416, "range is unsatisfiable for an empty blob");
        return;
    }
    let n = data.len();
    // Reading a chunk verifies all of it, which is slow in debug builds: keep the ranges few.
    let mut ranges: Vec<(usize, usize)> = vec![(0, 0), (n - 1, n - 1)];
    for &b in boundaries.iter().filter(|&&b| b > 0 && b < n) {
        // The first byte after the boundary, and spans across it.
        for (before, after) in [(0, 1), (1, 1), (7, 300)] {
            ranges.push((b.saturating_sub(before), (b + after).min(n) - 1));
        }
    }
    for (start, end) in ranges {
        let spec = format!("bytes={start}-{end}");
        let r = s.get_with(&path, &[("Range", &spec)]);
        assert_eq!(r.status, 206, "{spec}: {}", r.text());
        assert_eq!(
            r.header("Content-Range"),
            Some(format!("bytes {start}-{end}/{n}").as_str()),
            "{spec}"
        );
        assert!(r.body == data[start..=end], "{spec} of {n} bytes differs");
    }
    let suffix = (CHUNK_SIZE + 3).min(n);
    let r = s.get_with(&path, &[("Range", &format!("bytes=-{suffix}"))]);
    assert_eq!(r.status, 206);
    assert!(r.body == data[n - suffix..], "suffix range differs");
    let from = n / 2;
    let r = s.get_with(&path, &[("Range", &format!("bytes={from}-"))]);
    assert_eq!(r.status, 206);
    assert!(r.body == data[from..], "open-ended range differs");
}

#[test]
fn empty_blob_round_trip() {
    let mut s = Server::start();
    let w = s.writer_token();
    let data: Vec<u8> = Vec::new();
    let id = begin(&s, &w, &data);
    let p = put_part_ok(&s, &w, &id, 1, &data);
    let c = complete(&s, &w, &id, &[p]);
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["state"], "ready", "{}", c.text());
    assert_downloads(&s, &data, &[]);

    let db = stop_and_read(&mut s);
    db.check(true);
    let (size, list) = db.blob(&sha256_digest(&data)).expect("empty blob stored");
    assert_eq!((*size, list.len()), (0, 0));
    assert!(db.chunks.is_empty(), "an empty blob stores no chunk");
}

#[test]
fn chunk_boundary_round_trips() {
    let mut s = Server::start();
    let w = s.writer_token();
    // The same seed makes every blob a prefix of the longest, so whole chunks are shared.
    let sizes = [
        1,
        CHUNK_SIZE - 1,
        CHUNK_SIZE,
        CHUNK_SIZE + 1,
        2 * CHUNK_SIZE + 5,
    ];
    let longest = bytes(*sizes.iter().max().unwrap(), 7);
    for &n in &sizes {
        let data = &longest[..n];
        s.upload(&w, data);
        assert_downloads(&s, data, &[CHUNK_SIZE, 2 * CHUNK_SIZE]);
    }

    let db = stop_and_read(&mut s);
    db.check(true);
    let mut all = std::collections::BTreeSet::new();
    for &n in &sizes {
        let data = &longest[..n];
        let (size, list) = db.blob(&sha256_digest(data)).expect("blob stored");
        assert_eq!(*size, n as u64);
        assert_eq!(*list, chunk_hashes(data), "chunk list of the {n}-byte blob");
        all.extend(list.iter().copied());
    }
    // Blobs of CHUNK_SIZE, CHUNK_SIZE + 1 and 2 * CHUNK_SIZE + 5 bytes share their first chunk.
    let first = chunk_hashes(&longest[..CHUNK_SIZE])[0];
    assert_eq!(
        db.count(&first),
        3,
        "the shared first chunk is counted per blob"
    );
    assert_eq!(
        db.chunks.len(),
        all.len(),
        "each distinct chunk is stored once"
    );
    assert!(db.parts.is_empty() && db.staging.is_empty());
}

#[test]
fn parts_out_of_order_resent_and_empty() {
    let mut s = Server::start();
    let w = s.writer_token();
    let data = bytes(3 * CHUNK_SIZE + 1000, 11);
    // Part 1 ends inside the second chunk, part 2 is empty, part 3 spans a chunk boundary of
    // its own, part 4 is the rest: the blob's chunk list has short chunks in the middle.
    let cuts = [
        0,
        CHUNK_SIZE + 10,
        CHUNK_SIZE + 10,
        2 * CHUNK_SIZE + 20,
        data.len(),
    ];
    let part = |n: usize| &data[cuts[n - 1]..cuts[n]];
    let id = begin(&s, &w, &data);

    // Part 3 first with wrong bytes of the right length, later re-sent with the right ones.
    let wrong = bytes(part(3).len(), 99);
    let stale = put_part_ok(&s, &w, &id, 3, &wrong);
    let p1 = put_part_ok(&s, &w, &id, 1, part(1));
    let p4 = put_part_ok(&s, &w, &id, 4, part(4));
    let p2 = put_part_ok(&s, &w, &id, 2, part(2));
    assert_eq!(
        s.get(&format!("/v1/uploads/{id}")).json()["state"],
        "uploading"
    );
    let p3 = put_part_ok(&s, &w, &id, 3, part(3));
    // The replaced part is gone: completing with its etag is refused and changes nothing.
    let r = complete(&s, &w, &id, &[p4.clone(), p2.clone(), stale, p1.clone()]);
    r.assert_problem(412, "etag");
    assert_eq!(
        s.get(&format!("/v1/uploads/{id}")).json()["state"],
        "uploading"
    );
    // Parts may be listed in any order.
    let r = complete(&s, &w, &id, &[p4, p2, p3, p1]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "ready", "{}", r.text());

    let mut boundaries = cuts.to_vec();
    boundaries.extend([CHUNK_SIZE, cuts[3] + CHUNK_SIZE]);
    assert_downloads(&s, &data, &boundaries);

    let db = stop_and_read(&mut s);
    db.check(true);
    let expected: Vec<Hash> = (1..=4).flat_map(|n| chunk_hashes(part(n))).collect();
    let (size, list) = db.blob(&sha256_digest(&data)).expect("blob stored");
    assert_eq!(*size, data.len() as u64);
    assert_eq!(
        *list, expected,
        "chunk list follows part order, not upload order"
    );
    for h in chunk_hashes(&wrong) {
        assert!(
            !db.has_chunk(&h),
            "chunks of the replaced part 3 were not released"
        );
    }
    assert_eq!(db.chunks.len(), expected.len());
    assert!(db.parts.is_empty() && db.staging.is_empty());
}

#[test]
fn shared_chunks_are_stored_once_and_abort_releases() {
    let mut s = Server::start();
    let w = s.writer_token();
    // B shares A's first two chunks and differs in its tail.
    let a = bytes(2 * CHUNK_SIZE + 500, 21);
    let mut b = a[..2 * CHUNK_SIZE].to_vec();
    b.extend(bytes(700, 22));
    s.upload(&w, &a);
    s.upload(&w, &b);
    let ha = chunk_hashes(&a);
    let hb = chunk_hashes(&b);
    let (a1, a2) = (ha[0], ha[1]);
    assert_eq!(&ha[..2], &hb[..2]);

    // An unfinished session holding both shared chunks around a chunk of its own.
    let unique = bytes(CHUNK_SIZE, 23);
    let c = [
        &a[..CHUNK_SIZE],
        &unique[..],
        &a[CHUNK_SIZE..2 * CHUNK_SIZE],
    ]
    .concat();
    let id = begin(&s, &w, &c);
    put_part_ok(&s, &w, &id, 1, &c[..CHUNK_SIZE]);
    put_part_ok(&s, &w, &id, 2, &c[CHUNK_SIZE..2 * CHUNK_SIZE]);
    put_part_ok(&s, &w, &id, 3, &c[2 * CHUNK_SIZE..]);
    let u = chunk_hashes(&unique)[0];

    let db = stop_and_read(&mut s);
    db.check(true);
    assert_eq!((db.count(&a1), db.count(&a2), db.count(&u)), (3, 3, 1));
    assert_eq!(db.count(&ha[2]), 1);
    assert_eq!(db.count(&hb[2]), 1);
    assert_eq!(
        db.chunks.len(),
        5,
        "a1, a2, A's tail, B's tail, the session's chunk"
    );
    assert_eq!(db.parts.len(), 3);

    s.restart();
    let r = s.call("POST", &format!("/v1/uploads/{id}/abort"), &w, &Value::Null);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "aborted");
    assert_downloads(&s, &a, &[CHUNK_SIZE, 2 * CHUNK_SIZE]);
    assert_downloads(&s, &b, &[2 * CHUNK_SIZE]);

    let db = stop_and_read(&mut s);
    db.check(true);
    assert!(
        !db.has_chunk(&u),
        "the aborted session's own chunk was not deleted"
    );
    assert_eq!((db.count(&a1), db.count(&a2)), (2, 2));
    assert_eq!(db.chunks.len(), 4);
    assert!(db.parts.is_empty() && db.staging.is_empty());
}

/// Adds a qcow2 artifact for `digest` to a draft version; returns its id.
fn add_artifact(s: &Server, w: &str, path: &str, arch: &str, digest: &str, size: usize) -> String {
    let r = s.call(
        "POST",
        &format!("{path}/artifacts"),
        w,
        &json!({"operating_system": "debian", "architecture": arch, "format": "qcow2",
                "primary_blob_digest": digest, "primary_blob_size_bytes": size,
                "primary_media_type": "application/x-qemu-disk"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

#[test]
fn deleted_draft_artifact_releases_its_blob_after_the_ttl() {
    let mut s = Server::start_with(&["--upload-ttl", "2s"]);
    let w = s.writer_token();
    let a = bytes(CHUNK_SIZE + 100, 31);
    let mut b = a[..CHUNK_SIZE].to_vec();
    b.extend(bytes(200, 32));
    let (da, db_) = (sha256_digest(&a), sha256_digest(&b));
    let r = s.call("POST", "/v1/images", &w, &json!({"name": "gc"}));
    assert_eq!(r.status, 201, "{}", r.text());
    let r = s.call(
        "POST",
        "/v1/images/gc/versions",
        &w,
        &json!({"version": "1"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // The draft references the digests before they are uploaded, so no hold can lapse first.
    let path = "/v1/images/gc/versions/1";
    add_artifact(&s, &w, path, "x86_64", &da, a.len());
    let y = add_artifact(&s, &w, path, "aarch64", &db_, b.len());
    s.upload(&w, &a);
    s.upload(&w, &b);

    let r = s.call("DELETE", &format!("{path}/artifacts/{y}"), &w, &Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    // B's hold is its upload session's expiry; the sweeper deletes it after that.
    wait_until(20, "the sweeper deletes the unreferenced blob", || {
        s.head(&format!("/v1/blobs/{db_}")).status == 404
    });
    // A's hold lapsed earlier, but the draft still references it.
    assert_downloads(&s, &a, &[CHUNK_SIZE]);

    let db = stop_and_read(&mut s);
    db.check(true);
    let ha = chunk_hashes(&a);
    assert!(db.blob(&db_).is_none());
    assert!(db.blob(&da).is_some());
    assert!(
        !db.has_chunk(&chunk_hashes(&b)[1]),
        "B's own chunk was not deleted"
    );
    assert_eq!((db.count(&ha[0]), db.count(&ha[1])), (1, 1));
    assert_eq!(db.chunks.len(), 2);
}

#[test]
fn sweeper_aborts_expired_sessions() {
    let mut s = Server::start_with(&["--upload-ttl", "2s"]);
    let w = s.writer_token();
    // Small, so that the part is surely in before the session expires.
    let data = bytes(5000, 41);
    let id = begin(&s, &w, &data);
    let p1 = put_part_ok(&s, &w, &id, 1, &data[..4000]);
    let session = format!("/v1/uploads/{id}");
    assert_eq!(s.get(&session).json()["state"], "uploading");
    wait_until(20, "the sweeper aborts the expired session", || {
        s.get(&session).json()["state"] == "aborted"
    });
    put_part(&s, &w, &id, 2, &data[4000..])
        .assert_problem(412, "upload session does not accept parts from aborted");
    let p2 = json!({"number": 2, "etag": part_etag(&data[4000..]),
                    "size_bytes": 1000});
    complete(&s, &w, &id, &[p1, p2])
        .assert_problem(412, "upload session cannot be completed from aborted");
    wait_until(10, "the sweeper logs what it did", || {
        s.log_text()
            .contains("sweeper aborted 1 expired upload sessions")
    });

    let db = stop_and_read(&mut s);
    db.check(true);
    assert!(
        db.chunks.is_empty(),
        "the swept session's chunks were not released"
    );
    assert!(db.parts.is_empty() && db.staging.is_empty());
}

/// Flips one byte of a stored chunk, rewriting the value under the same key (the server must
/// be stopped).
pub fn damage_chunk(db_path: &Path, hash: &Hash) {
    let db = redb::Database::open(db_path).expect("opening the database");
    let txn = db.begin_write().unwrap();
    {
        let mut chunks = txn.open_table(CHUNKS).unwrap();
        let mut value = chunks
            .get(hash)
            .unwrap()
            .expect("chunk stored")
            .value()
            .to_vec();
        value[12345] ^= 0x40;
        chunks.insert(hash, value.as_slice()).unwrap();
    }
    txn.commit().unwrap();
}

#[test]
fn corrupted_chunk_is_never_served() {
    let mut s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let w = s.writer_token();
    let data = bytes(3 * CHUNK_SIZE + 100, 51);
    let digest = s.upload(&w, &data);
    let n = data.len();
    s.kill9();

    // Flip one byte of the second chunk.
    damage_chunk(&s.db_path(), &chunk_hashes(&data)[1]);
    s.restart();

    let path = format!("/v1/blobs/{digest}");
    let r = s.get_with(&path, &[("X-Request-ID", "cut-download")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Length"), Some(n.to_string().as_str()));
    assert!(r.body.len() < n, "a corrupted blob was served whole");
    assert!(
        r.body.len() <= CHUNK_SIZE,
        "bytes of the corrupted chunk were sent"
    );
    // The request log line and the byte counter tell what the client really got (the first
    // chunk), not the length the head announced.
    let mut line = String::new();
    wait_until(10, "the request is logged", || {
        line = s
            .log_text()
            .lines()
            .find(|l| l.contains("request_id=cut-download"))
            .unwrap_or_default()
            .to_string();
        !line.is_empty()
    });
    assert!(
        line.contains(&format!("bytes=\"{CHUNK_SIZE} (cut: ")),
        "the log line claims other bytes: {line}"
    );
    let sent = metric(
        &metrics_addr(&s),
        "imgsrv_http_response_body_bytes_total{route=\"/v1/blobs/{digest}\"}",
    );
    assert_eq!(
        sent, CHUNK_SIZE as f64,
        "the byte counter counts what was sent"
    );
    assert!(r.body == data[..r.body.len()], "a wrong byte was served");
    // The log line is written as the download is cut; the test reads stderr on a thread.
    wait_until(10, "the log names the blob", || {
        s.log_text()
            .lines()
            .any(|l| l.contains("checksum verification") && l.contains(&digest))
    });
    let failures = metric(
        &metrics_addr(&s),
        "imgsrv_chunk_verification_failures_total",
    );
    assert_eq!(failures, 1.0, "the metric counts the failed chunk");

    // Ranges over intact chunks still work; one touching the bad chunk is cut short too.
    for (start, end) in [
        (0, CHUNK_SIZE - 1),
        (2 * CHUNK_SIZE - 1 + 1, n - 1),
        (5, 50),
    ] {
        let spec = format!("bytes={start}-{end}");
        let r = s.get_with(&path, &[("Range", &spec)]);
        assert_eq!(r.status, 206, "{spec}");
        assert!(r.body == data[start..=end], "{spec}");
    }
    let r = s.get_with(
        &path,
        &[(
            "Range",
            &format!("bytes={}-{}", CHUNK_SIZE - 10, CHUNK_SIZE + 10),
        )],
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("Content-Length"), Some("21"));
    assert!(r.body.len() <= 10 && r.body == data[CHUNK_SIZE - 10..CHUNK_SIZE - 10 + r.body.len()]);
}

#[test]
fn concurrent_uploads_keep_chunk_counts_exact() {
    // Small parts are single chunks, so parts drawn from a pool share chunks across sessions
    // and blobs. Four clients race begin/part/re-part/complete/abort; afterwards every count
    // must equal the references that blobs and parts hold.
    let mut s = Server::start();
    let w = s.writer_token();
    let pool: Vec<Vec<u8>> = (0..4).map(|i| bytes(700 + i, 100 + i as u64)).collect();
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let (s, w, pool) = (&s, &w, &pool);
            scope.spawn(move || {
                let mut x = t * 7 + 3;
                let mut next = || {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) as usize
                };
                for _ in 0..12 {
                    let picks: Vec<usize> = (0..3).map(|_| next() % pool.len()).collect();
                    let data: Vec<u8> = picks.iter().flat_map(|&p| pool[p].clone()).collect();
                    let r = s.call(
                        "POST",
                        "/v1/uploads",
                        w,
                        &json!({"expected_digest": sha256_digest(&data),
                                "expected_size_bytes": data.len()}),
                    );
                    if r.status == 200 {
                        continue; // Already a trusted blob.
                    }
                    assert_eq!(r.status, 201, "{}", r.text());
                    let id = r.json()["id"].as_str().unwrap().to_string();
                    let mut listed = Vec::new();
                    for (i, &p) in picks.iter().enumerate() {
                        let n = i as u32 + 1;
                        if next() % 3 == 0 {
                            put_part_ok(s, w, &id, n, &pool[(p + 1) % pool.len()]);
                        }
                        listed.push(put_part_ok(s, w, &id, n, &pool[p]));
                    }
                    match next() % 3 {
                        0 => {
                            let r =
                                s.call("POST", &format!("/v1/uploads/{id}/abort"), w, &Value::Null);
                            assert_eq!(r.status, 200, "{}", r.text());
                        }
                        1 => {
                            let r = complete(s, w, &id, &listed);
                            assert_eq!(r.status, 200, "{}", r.text());
                            assert_eq!(r.json()["state"], "ready", "{}", r.text());
                        }
                        _ => {} // Left uploading.
                    }
                }
            });
        }
    });
    let db = stop_and_read(&mut s);
    db.check(true);
    assert!(db.chunks.len() <= pool.len());
    s.restart();
    let db = stop_and_read(&mut s);
    db.check(true);
}

#[test]
fn media_type_hint_longer_than_the_blob_record_holds_is_refused() {
    // Regression: the blob record stores the media type behind a u16 length. A 70000-byte
    // hint was accepted, the record was written with a truncated length, and the blob that
    // `complete` had acknowledged as `ready` answered every download with a 500.
    let mut s = Server::start();
    let w = s.writer_token();
    let data = bytes(CHUNK_SIZE + 1, 111);
    let digest = sha256_digest(&data);
    let begin_with = |hint: &str| {
        s.call(
            "POST",
            "/v1/uploads",
            &w,
            &json!({"expected_digest": digest, "expected_size_bytes": data.len(),
                    "media_type_hint": hint}),
        )
    };
    let too_long = format!("application/x-{}", "a".repeat(70000));
    for len in [too_long.len(), 65536] {
        let r = begin_with(&too_long[..len]);
        // Checked first so that a failure does not print the echoed hint.
        assert_eq!(r.status, 400, "a {len}-byte media type hint was accepted");
        r.assert_problem(400, "media type hint must be at most 65535 bytes");
    }

    let longest = &too_long[..65535];
    let r = begin_with(longest);
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let p = put_part_ok(&s, &w, &id, 1, &data);
    let r = complete(&s, &w, &id, &[p]);
    assert_eq!(r.json()["state"], "ready", "{}", r.text());
    let r = s.get(&format!("/v1/blobs/{digest}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some(longest));
    assert!(r.body == data);
    stop_and_read(&mut s).check(true);
}

#[test]
fn uploading_a_damaged_chunk_again_repairs_it() {
    // A blob whose second chunk was damaged on disk, then another upload that shares that
    // chunk. The client sends correct bytes, so its session must end `ready`; and since the
    // fresh bytes hash to the chunk's key, they repair the stored copy for the first blob too.
    let mut s = Server::start();
    let w = s.writer_token();
    let a = bytes(2 * CHUNK_SIZE + 10, 121);
    let mut b = a[..2 * CHUNK_SIZE].to_vec();
    b.extend(bytes(20, 122));
    s.upload(&w, &a);
    s.kill9();
    let damaged = chunk_hashes(&a)[1];
    damage_chunk(&s.db_path(), &damaged);
    s.restart();
    let r = s.get(&format!("/v1/blobs/{}", sha256_digest(&a)));
    assert!(r.body.len() < a.len(), "the damage is served");

    let session = s.upload_parts(&w, &b, &[(1, 0..b.len())]);
    assert_eq!(
        session["state"], "ready",
        "a correct upload failed: {session}"
    );
    assert_downloads(&s, &b, &[CHUNK_SIZE, 2 * CHUNK_SIZE]);
    assert_downloads(&s, &a, &[CHUNK_SIZE, 2 * CHUNK_SIZE]);
    wait_until(10, "the repair is logged", || {
        s.log_text().contains("repaired a damaged chunk")
    });

    let db = stop_and_read(&mut s);
    db.check(true);
    assert_eq!(db.count(&damaged), 2);
}

#[test]
fn one_unreadable_blob_record_does_not_stop_garbage_collection() {
    // Two unreferenced blobs; the record of the one that the collector meets first (the lower
    // digest) is damaged. The other must still be collected once its hold has passed.
    let mut s = Server::start_with(&["--upload-ttl", "2s"]);
    let w = s.writer_token();
    let (mut x, mut y) = (bytes(100, 131), bytes(100, 132));
    if sha256_digest(&x) > sha256_digest(&y) {
        std::mem::swap(&mut x, &mut y);
    }
    let dx = s.upload(&w, &x);
    let dy = s.upload(&w, &y);
    s.kill9();
    {
        let db = redb::Database::open(s.db_path()).expect("opening the database");
        let txn = db.begin_write().unwrap();
        {
            // Keep the header (layout, size, time, media type) and drop the chunk list.
            let mut blobs = txn.open_table(BLOBS).unwrap();
            let key = hash_of_digest(&dx);
            let value = blobs.get(&key).unwrap().expect("blob stored").value()[..19].to_vec();
            blobs.insert(&key, value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    s.restart();
    wait_until(20, "the sweeper collects the intact blob", || {
        s.head(&format!("/v1/blobs/{dy}")).status == 404
    });
    wait_until(10, "the damaged record is logged", || {
        s.log_text()
            .lines()
            .any(|l| l.contains("error") && l.contains(&dx))
    });
}

/// What `complete` has read back and hashed again since the server started.
fn rehashed(metrics: &str) -> f64 {
    metric(metrics, "imgsrv_upload_complete_rehashed_bytes_total")
}

/// Parts sent in order carry the blob's sha256 from one to the next, so `complete` reads
/// nothing back, even across a crash (kill -9) between two parts: the hash state is stored
/// with each part.
#[test]
fn in_order_parts_carry_the_hash_across_a_restart() {
    let mut s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let w = s.writer_token();
    let parts = [
        bytes(CHUNK_SIZE + 70, 81),
        bytes(3000, 82),
        bytes(2 * CHUNK_SIZE, 83),
    ];
    let data = parts.concat();
    let id = begin(&s, &w, &data);
    let mut listed = vec![put_part_ok(&s, &w, &id, 1, &parts[0])];
    s.restart();
    listed.push(put_part_ok(&s, &w, &id, 2, &parts[1]));
    s.restart();
    listed.push(put_part_ok(&s, &w, &id, 3, &parts[2]));
    let metrics = metrics_addr(&s);
    let r = complete(&s, &w, &id, &listed);
    assert_eq!(json_ok(&r, 200)["state"], "ready", "{}", r.text());
    assert_eq!(rehashed(&metrics), 0.0, "in-order parts were read back");
    assert_downloads(
        &s,
        &data,
        &[parts[0].len(), parts[0].len() + parts[1].len()],
    );
    stop_and_read(&mut s).check(true);
}

/// Parts sent out of order have no hash state to continue from: `complete` reads back the
/// parts that do not continue where the previous one ended, and only those, and still
/// verifies the whole blob.
#[test]
fn out_of_order_parts_fall_back_to_reading_back() {
    let s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&s);
    let w = s.writer_token();
    let parts = [bytes(5000, 84), bytes(CHUNK_SIZE + 9, 85), bytes(700, 86)];
    let data = parts.concat();
    let id = begin(&s, &w, &data);
    // Part 2 first (nothing to continue from), then 1, then 3 (which follows part 2, itself
    // not hashed on arrival).
    let p2 = put_part_ok(&s, &w, &id, 2, &parts[1]);
    let p1 = put_part_ok(&s, &w, &id, 1, &parts[0]);
    let p3 = put_part_ok(&s, &w, &id, 3, &parts[2]);
    let r = complete(&s, &w, &id, &[p3, p1, p2]);
    assert_eq!(json_ok(&r, 200)["state"], "ready", "{}", r.text());
    assert_eq!(
        rehashed(&metrics),
        (parts[1].len() + parts[2].len()) as f64,
        "exactly parts 2 and 3 should have been read back"
    );
    assert_downloads(&s, &data, &[parts[0].len()]);
}

/// A part replaced after its successor was written leaves the successor's stored start state
/// stale; `complete` notices, reads the successor back and gets the right digest, and a
/// successor that started from bytes that are no longer listed never yields a wrong `ready`.
#[test]
fn replaced_predecessor_breaks_the_chain_safely() {
    let s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&s);
    let w = s.writer_token();
    let (good1, part2) = (bytes(4000, 87), bytes(6000, 88));
    let data = [&good1[..], &part2[..]].concat();
    let id = begin(&s, &w, &data);
    put_part_ok(&s, &w, &id, 1, &bytes(4000, 89));
    let p2 = put_part_ok(&s, &w, &id, 2, &part2);
    let p1 = put_part_ok(&s, &w, &id, 1, &good1);
    let r = complete(&s, &w, &id, &[p1, p2]);
    assert_eq!(json_ok(&r, 200)["state"], "ready", "{}", r.text());
    assert_eq!(rehashed(&metrics), part2.len() as f64);
    assert_downloads(&s, &data, &[good1.len()]);
}
