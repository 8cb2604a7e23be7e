//! Schema upgrades: a database written by the schema-1 release (`tests/fixtures/schema1.redb`,
//! see the README beside it) is upgraded in place and keeps its catalog and bytes; a database
//! with a newer schema is refused with a clear message.

use crate::util::tables::META;
use crate::util::*;
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A server on a copy of the schema-1 fixture. The server first starts on an empty data
/// directory (the harness needs one of its own), is killed, and restarts on the fixture.
fn server_on_fixture() -> Server {
    let mut s = Server::start();
    s.kill9();
    std::fs::copy(fixture("schema1.redb"), s.db_path()).expect("copying the fixture");
    s.restart();
    s
}

fn version_names(s: &Server) -> Vec<String> {
    json_ok(&s.get("/v1/images/fixture/versions"), 200)["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn schema1_database_is_upgraded_in_place() {
    let mut s = server_on_fixture();
    assert!(
        s.log_text()
            .contains("upgrading database schema from 1 to 2"),
        "{}",
        s.log_text()
    );

    // The catalog as the old release left it.
    let images = json_ok(&s.get("/v1/images"), 200);
    assert_eq!(images["images"][0]["name"], "fixture");
    assert_eq!(images["images"][0]["display_name"], "Schema 1 fixture");
    assert_eq!(version_names(&s), ["1.1", "1.0"]);
    let alias = json_ok(&s.get("/v1/images/fixture/aliases/latest"), 200);
    assert_eq!(alias["version"], "1.1");
    // Every byte, by every route, through the verified reader.
    let mut manifests = Vec::new();
    for version in ["1.0", "1.1"] {
        let m = json_ok(
            &s.get(&format!("/v1/images/fixture/versions/{version}")),
            200,
        );
        assert_eq!(m["version"]["state"], "published");
        let a = &m["artifacts"][0];
        let aid = a["artifact"]["id"].as_str().unwrap();
        let tid = a["attachments"][0]["id"].as_str().unwrap();
        let disk = format!("imgsrv schema 1 fixture disk {version}\n");
        let meta = format!("imgsrv schema 1 fixture metadata {version}\n");
        assert_eq!(
            a["artifact"]["primary_blob_digest"],
            sha256_digest(disk.as_bytes())
        );
        let base = format!("/v1/images/fixture/versions/{version}/artifacts/{aid}");
        let r = s.get(&format!("{base}/download/disk.qcow2"));
        assert_eq!((r.status, r.text()), (200, disk.clone()));
        let r = s.get(&format!("{base}/attachments/{tid}/download/incus.tar.xz"));
        assert_eq!((r.status, r.text()), (200, meta));
        let r = s.get(&format!("/v1/blobs/{}", sha256_digest(disk.as_bytes())));
        assert_eq!((r.status, r.text()), (200, disk));
        manifests.push(m);
    }
    let images_json = s.get("/streams/v1/images.json").text();
    assert!(
        images_json.contains("fixture:1.0:amd64:default"),
        "{images_json}"
    );
    assert!(images_json.contains("fixture:1.1:amd64:default"));

    // Retirement and retention work on the upgraded file, with the fixture's own writer token.
    let w = std::fs::read_to_string(fixture("schema1.token"))
        .unwrap()
        .trim()
        .to_string();
    s.retire(&w, "fixture", "1.1")
        .assert_problem(409, "is the target of alias latest");
    json_ok(
        &s.put_retention(&w, "fixture", &json!({"keep_last": 1})),
        200,
    );
    let p = json_ok(&s.preview_retention(&w, "fixture", &Value::Null), 200);
    assert_eq!(p["retire"][0]["version"], "1.0", "{p}");
    assert_eq!(p["retire"].as_array().unwrap().len(), 1);
    // The sweeper applies the stored policy.
    wait_until(20, "the sweeper applies the policy", || {
        version_names(&s) == ["1.1"]
    });
    assert!(
        !s.get("/streams/v1/images.json")
            .text()
            .contains("fixture:1.0:")
    );
    // Within the (default, two-hour) grace the retired version's files are still served.
    let old = &manifests[0]["artifacts"][0]["artifact"]["id"];
    let r = s.get(&format!(
        "/v1/images/fixture/versions/1.0/artifacts/{}/download",
        old.as_str().unwrap()
    ));
    assert_eq!(r.status, 200);

    // A restart opens the now current file without upgrading it again; nothing is lost.
    s.restart();
    assert_eq!(
        s.log_text()
            .matches("upgrading database schema from 1 to 2")
            .count(),
        1
    );
    assert_eq!(version_names(&s), ["1.1"]);
    assert_eq!(
        json_ok(&s.get("/v1/images/fixture/retention"), 200)["keep_last"],
        1
    );
    s.request_version(&w, "fixture", "1.0")
        .assert_problem(409, "was retired at");
}

/// Writes `schema_version` into a database file's `meta` table, as a later release would.
fn set_schema_version(db: &Path, version: u64) {
    let db = redb::Database::open(db).expect("opening the database");
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert("schema_version", version)
        .unwrap();
    txn.commit().unwrap();
}

#[test]
fn newer_schema_is_refused_with_a_clear_message() {
    let mut s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    s.kill9();
    assert_eq!(schema_version(&s.db_path()), 3);
    set_schema_version(&s.db_path(), 4);

    let mut child = Command::new(binary())
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .arg("--data-dir")
        .arg(s.data_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning imgsrv");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("imgsrv kept running on a database with a newer schema");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("database schema version 4 is newer than this imgsrv supports (schema 3)"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    // The refused file keeps its schema version: nothing was "upgraded" or rewritten.
    assert_eq!(schema_version(&s.db_path()), 4);
}

fn schema_version(db: &Path) -> u64 {
    use redb::ReadableDatabase;
    let db = redb::Database::open(db).expect("opening the database");
    let txn = db.begin_read().unwrap();
    txn.open_table(META)
        .unwrap()
        .get("schema_version")
        .unwrap()
        .unwrap()
        .value()
}

/// Writes parts the way schema 2 stored them into a stopped server's database: chunks keyed
/// by their sha256 (with reference counts, read checksums and the `meta` counters), part
/// records `u64 size | sha256 of the part | u32 n | n x (chunk sha256, u32 length)`, and
/// schema version 2.
fn write_schema2_parts(db: &Path, upload: &str, parts: &[&[u8]]) {
    use redb::{ReadableTable, TableDefinition};
    use sha2::{Digest, Sha256};
    const CHUNKS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("chunks");
    const REFS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("chunk_refs");
    const SUMS: TableDefinition<&[u8; 32], u128> = TableDefinition::new("chunk_sums");
    const PARTS: TableDefinition<(u128, u32), &[u8]> = TableDefinition::new("upload_parts");
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    let id = uuid_u128(upload);
    let db = redb::Database::open(db).expect("opening the database");
    let txn = db.begin_write().unwrap();
    {
        let (mut chunks, mut refs, mut sums) = (
            txn.open_table(CHUNKS).unwrap(),
            txn.open_table(REFS).unwrap(),
            txn.open_table(SUMS).unwrap(),
        );
        let (mut parts_t, mut meta) = (
            txn.open_table(PARTS).unwrap(),
            txn.open_table(META).unwrap(),
        );
        let (mut count, mut stored) = (0u64, 0u64);
        for (i, part) in parts.iter().enumerate() {
            let mut record = (part.len() as u64).to_be_bytes().to_vec();
            record.extend_from_slice(&Sha256::digest(part));
            let pieces: Vec<&[u8]> = part.chunks(CHUNK_SIZE).collect();
            record.extend_from_slice(&(pieces.len() as u32).to_be_bytes());
            for c in pieces {
                let key: [u8; 32] = Sha256::digest(c).into();
                let n = refs.get(&key).unwrap().map(|v| v.value()).unwrap_or(0);
                if n == 0 {
                    chunks.insert(&key, c).unwrap();
                    sums.insert(&key, twox_hash::XxHash3_128::oneshot(c))
                        .unwrap();
                    count += 1;
                    stored += c.len() as u64;
                }
                refs.insert(&key, n + 1).unwrap();
                record.extend_from_slice(&key);
                record.extend_from_slice(&(c.len() as u32).to_be_bytes());
            }
            parts_t
                .insert((id, i as u32 + 1), record.as_slice())
                .unwrap();
        }
        for (k, d) in [("chunk_count", count), ("chunk_bytes", stored)] {
            let now = meta.get(k).unwrap().map(|v| v.value()).unwrap_or(0);
            meta.insert(k, now + d).unwrap();
        }
        meta.insert("schema_version", 2).unwrap();
    }
    txn.commit().unwrap();
}

fn uuid_u128(id: &str) -> u128 {
    u128::from_str_radix(&id.replace('-', ""), 16).unwrap()
}

/// An upload left unfinished by the schema-2 release (parts stored, not completed) survives
/// the upgrade to schema 3: its parts keep their sha256 etags, which its client holds, and
/// `complete` reads them back (they carry no hash state) and verifies the blob. The chunks keep
/// their sha256 keys and are served and checked like new ones.
#[test]
fn schema2_unfinished_upload_completes_after_the_upgrade() {
    let mut s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let w = s.writer_token();
    let parts = [bytes(CHUNK_SIZE + 500, 91), bytes(3000, 92)];
    let data = parts.concat();
    let id = crate::storage::begin(&s, &w, &data);
    s.kill9();
    write_schema2_parts(&s.db_path(), &id, &[&parts[0], &parts[1]]);
    s.restart();
    assert!(
        s.log_text()
            .contains("upgrading database schema from 2 to 3"),
        "{}",
        s.log_text()
    );
    let metrics = metrics_addr(&s);
    let listed: Vec<Value> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"number": i + 1, "etag": format!("\"{}\"", sha256_hex(p)), "size_bytes": p.len()}))
        .collect();
    let r = crate::storage::complete(&s, &w, &id, &listed);
    assert_eq!(json_ok(&r, 200)["state"], "ready", "{}", r.text());
    assert_eq!(
        crate::storage::metric(&metrics, "imgsrv_upload_complete_rehashed_bytes_total"),
        data.len() as f64
    );
    crate::storage::assert_downloads(&s, &data, &[parts[0].len()]);
    // The same bytes uploaded now are stored under BLAKE3 keys, next to the old chunks.
    let again = s.upload_parts(
        &w,
        &[&data[..], b"!"].concat(),
        &[(1, 0..parts[0].len()), (2, parts[0].len()..data.len() + 1)],
    );
    assert_eq!(again["state"], "ready", "{again}");
    let db = crate::storage::stop_and_read(&mut s);
    db.check(true);
    assert!(db.has_chunk(&crate::storage::chunk_hashes(&parts[0])[0]));
}
