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
    s.call(
        "DELETE",
        "/v1/images/fixture/versions/1.1",
        &w,
        &Value::Null,
    )
    .assert_problem(409, "is the target of alias latest");
    let r = s.call(
        "PUT",
        "/v1/images/fixture/retention",
        &w,
        &json!({"keep_last": 1}),
    );
    json_ok(&r, 200);
    let p = json_ok(
        &s.call(
            "POST",
            "/v1/images/fixture/retention/preview",
            &w,
            &Value::Null,
        ),
        200,
    );
    assert_eq!(p["retire"][0]["version"], "1.0", "{p}");
    assert_eq!(p["retire"].as_array().unwrap().len(), 1);
    // The sweeper applies the stored policy.
    let deadline = Instant::now() + Duration::from_secs(20);
    while version_names(&s) != ["1.1"] {
        assert!(Instant::now() < deadline, "the policy was not applied");
        std::thread::sleep(Duration::from_millis(200));
    }
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
    s.call(
        "POST",
        "/v1/images/fixture/versions",
        &w,
        &json!({"version": "1.0"}),
    )
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
    assert_eq!(schema_version(&s.db_path()), 2);
    set_schema_version(&s.db_path(), 3);

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
        stderr.contains("database schema version 3 is newer than this imgsrv supports (schema 2)"),
        "{stderr}"
    );
    assert!(!stderr.contains("listening on"), "{stderr}");
    // The refused file keeps its schema version: nothing was "upgraded" or rewritten.
    assert_eq!(schema_version(&s.db_path()), 3);
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
