//! The life of the data, as an operator runs it: `imgsrv backup` while the server works and
//! while it is stopped, `imgsrv check` on clean and damaged copies, the background scrub
//! finding a damaged chunk (and an upload repairing it), and `imgsrv compact` returning the
//! space of retired and collected data.

use crate::storage::{Db, chunk_hashes, damage_chunk, hash_of_digest, metric};
use crate::util::*;
use redb::{ReadableTable, TableDefinition};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const CHUNK_REFS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("chunk_refs");
const BLOB_REFS: TableDefinition<&[u8; 32], (u64, i64)> = TableDefinition::new("blob_refs");

/// Runs `imgsrv ARGS`; returns the exit code, stdout and stderr.
fn imgsrv(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running imgsrv");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `imgsrv check` on a data directory; asserts it is clean.
pub fn assert_check_clean(dir: &Path) {
    let (code, out, err) = imgsrv(&["check", "--data-dir", path_str(dir)]);
    assert_eq!(code, 0, "imgsrv check found problems:\n{out}{err}");
    assert!(out.contains("no problems found"), "{out}");
}

/// What a consumer sees of the catalog: images, their published versions and manifests.
fn catalog(s: &Server) -> Value {
    let images = s.get("/v1/images").json();
    let mut out = Vec::new();
    for image in images["images"].as_array().unwrap() {
        let name = image["name"].as_str().unwrap();
        let versions = s.get(&format!("/v1/images/{name}/versions")).json();
        let mut manifests = Vec::new();
        for v in versions["versions"].as_array().unwrap() {
            let v = v["version"].as_str().unwrap();
            manifests.push(s.get(&format!("/v1/images/{name}/versions/{v}")).json());
        }
        let aliases = s.get(&format!("/v1/images/{name}/aliases")).json();
        out.push(json!({"image": image, "versions": versions, "manifests": manifests, "aliases": aliases}));
    }
    Value::Array(out)
}

/// A directory holding a copy as `imgsrv.redb`, as `imgsrv serve` expects it.
fn copy_dir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn backup_under_uploads_and_downloads_is_consistent() {
    let s = Server::start();
    let w = s.writer_token();
    let disk = bytes(6 * CHUNK_SIZE + 123, 1);
    let meta = bytes(4000, 2);
    s.publish_image(&w, "deb", "1.0", &disk, &meta);
    let disk2 = bytes(3 * CHUNK_SIZE + 7, 3);
    s.publish_image(&w, "deb", "2.0", &disk2, &meta);
    s.put_alias(&w, "deb", "latest", "2.0");
    let r = s.put_retention(&w, "deb", &json!({"keep_last": 5}));
    assert_eq!(r.status, 200, "{}", r.text());
    // A draft and a blob that only an upload session holds are part of the data too.
    draft_with_artifact(&s, &w, "deb", "3.0-rc", &bytes(CHUNK_SIZE + 1, 4));
    let held = bytes(2 * CHUNK_SIZE, 5);
    s.upload(&w, &held);
    let before: Vec<Vec<u8>> = vec![disk.clone(), meta.clone(), disk2.clone(), held.clone()];

    // Threads hammer the server while the backup runs: uploads of new blobs, downloads of
    // the published ones (each checked byte for byte).
    let stop = Arc::new(AtomicBool::new(false));
    let (uploads, downloads) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut threads = Vec::new();
    for t in 0..2u64 {
        let (stop, uploads, w) = (stop.clone(), uploads.clone(), w.clone());
        let s2 = s.handle();
        threads.push(std::thread::spawn(move || {
            let mut i = 0;
            while !stop.load(Ordering::SeqCst) {
                s2.upload(&w, &bytes(2 * CHUNK_SIZE + 99, 1000 + t * 1000 + i));
                uploads.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        }));
    }
    for _ in 0..2 {
        let (stop, downloads) = (stop.clone(), downloads.clone());
        let s2 = s.handle();
        let disk = disk.clone();
        threads.push(std::thread::spawn(move || {
            let path = format!("/v1/blobs/{}", sha256_digest(&disk));
            while !stop.load(Ordering::SeqCst) {
                let r = s2.get(&path);
                assert_eq!(r.status, 200);
                assert!(r.body == disk, "a download during the backup differs");
                downloads.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    wait_until(30, "the hammering starts", || {
        uploads.load(Ordering::SeqCst) >= 1
    });
    let out = copy_dir();
    let started = Instant::now();
    let (code, stdout, stderr) = imgsrv(&[
        "backup",
        "--data-dir",
        path_str(s.data_dir()),
        path_str(out.path()),
    ]);
    let took = started.elapsed();
    let (during_up, during_down) = (
        uploads.load(Ordering::SeqCst),
        downloads.load(Ordering::SeqCst),
    );
    // Keep going a little: the server must be unaffected after the backup too.
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("a hammering thread failed");
    }
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("(the running server)"), "{stdout}");
    eprintln!(
        "{stdout}backup took {took:?}; {during_up} uploads and {during_down} downloads had completed by its end"
    );
    assert!(!out.path().join("imgsrv.redb.partial").exists());

    // The copy is consistent on its own...
    assert_check_clean(out.path());
    let copy_db = Db::read(&out.path().join("imgsrv.redb"));
    copy_db.check(true);
    for data in &before {
        assert!(
            copy_db.blob(&sha256_digest(data)).is_some(),
            "a blob stored before the backup is missing"
        );
    }
    // ...and a second server serves it: the same catalog, and every blob's bytes.
    let copy = Server::start_in(out, &[]);
    assert_eq!(
        catalog(&copy),
        catalog(&s),
        "the catalog of the copy differs"
    );
    for digest in copy_db.blobs.keys() {
        let d = format!("sha256:{}", hex(digest));
        let a = copy.get(&format!("/v1/blobs/{d}"));
        assert_eq!(a.status, 200, "{d} in the copy");
        assert_eq!(
            sha256_digest(&a.body),
            d,
            "the copy serves wrong bytes for {d}"
        );
        let b = s.get(&format!("/v1/blobs/{d}"));
        assert!(
            a.body == b.body,
            "{d} differs between the server and its copy"
        );
    }
    assert!(copy_db.blobs.len() >= before.len());
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn backup_of_a_stopped_database_and_its_refusals() {
    let mut s = Server::start();
    let w = s.writer_token();
    let disk = bytes(2 * CHUNK_SIZE + 5, 11);
    let meta = bytes(700, 12);
    let m = s.publish_image(&w, "off", "1.0", &disk, &meta);
    let listed = catalog(&s);
    s.terminate();
    let dir = path_str(s.data_dir()).to_string();

    // Into a file name...
    let out = copy_dir();
    let file = out.path().join("imgsrv.redb");
    let (code, stdout, stderr) = imgsrv(&["backup", "--data-dir", &dir, path_str(&file)]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("(the stopped database)"), "{stdout}");
    // ...never over an existing one.
    let (code, _, stderr) = imgsrv(&["backup", "--data-dir", &dir, path_str(&file)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    // Into a directory: the copy is named imgsrv.redb there.
    let out2 = copy_dir();
    let (code, stdout, stderr) = imgsrv(&["backup", "--data-dir", &dir, path_str(out2.path())]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(out2.path().join("imgsrv.redb").is_file());
    // No database, or no such output directory: clear failures, nothing written.
    let empty = tempfile::tempdir().unwrap();
    let (code, _, stderr) = imgsrv(&[
        "backup",
        "--data-dir",
        path_str(empty.path()),
        path_str(&empty.path().join("x.redb")),
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("no database"), "{stderr}");
    assert!(!empty.path().join("x.redb").exists() && !empty.path().join("x.redb.partial").exists());
    let (code, _, stderr) = imgsrv(&["backup", "--data-dir", &dir, "/nonexistent-dir/x.redb"]);
    assert_eq!(code, 1, "{stderr}");
    let (code, _, _) = imgsrv(&["backup", "--data-dir", &dir]);
    assert_eq!(code, 2, "a missing OUT is a usage error");

    assert_check_clean(out.path());
    assert_check_clean(s.data_dir());
    let copy = Server::start_in(out, &[]);
    assert_eq!(catalog(&copy), listed);
    let r = copy.get(&m.download_path());
    assert!(
        r.status == 200 && r.body == disk,
        "the copy's download differs"
    );
    // The token minted by the original still works on the copy.
    assert_eq!(
        copy.call(
            "GET",
            &format!("/v1/uploads/{}", uuid::Uuid::nil()),
            &w,
            &Value::Null
        )
        .status,
        404
    );
}

/// A stopped server's database with a published version, a draft and a held upload.
fn reference(seed: u64) -> (Server, Vec<u8>) {
    let mut s = Server::start();
    let w = s.writer_token();
    let disk = bytes(3 * CHUNK_SIZE + 10, seed);
    s.publish_image(&w, "img", "1.0", &disk, &bytes(900, seed + 1));
    draft_with_artifact(&s, &w, "img", "2.0", &bytes(1000, seed + 2));
    s.terminate();
    (s, disk)
}

/// Copies a stopped server's database into a fresh directory.
fn copy_of(s: &Server) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(s.db_path(), d.path().join("imgsrv.redb")).unwrap();
    d
}

#[test]
fn check_reports_damage_and_wrong_counts() {
    let (mut s, disk) = reference(21);
    assert_check_clean(s.data_dir());

    // A flipped byte inside a chunk's stored bytes: the chunk, its blob and its version.
    let damaged = copy_of(&s);
    let chunk = chunk_hashes(&disk)[1];
    damage_chunk(&damaged.path().join("imgsrv.redb"), &chunk);
    let (code, out, err) = imgsrv(&["check", "--data-dir", path_str(damaged.path())]);
    assert_eq!(code, 1, "{out}{err}");
    let line = out
        .lines()
        .find(|l| l.contains(&hex(&chunk)))
        .unwrap_or_else(|| panic!("the damaged chunk is not named:\n{out}"));
    assert!(line.contains("do not match its key"), "{line}");
    assert!(line.contains(&sha256_digest(&disk)), "{line}");
    assert!(line.contains("img 1.0 (published)"), "{line}");
    assert!(out.contains("1 problems found"), "{out}");
    assert!(err.contains("problems found"), "{err}");

    // Reference counts edited through redb: one chunk count and one blob count.
    let counts = copy_of(&s);
    {
        let db = redb::Database::open(counts.path().join("imgsrv.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(CHUNK_REFS).unwrap();
            let n = t.get(&chunk).unwrap().unwrap().value();
            t.insert(&chunk, n + 1).unwrap();
            let mut b = txn.open_table(BLOB_REFS).unwrap();
            let d = hash_of_digest(&sha256_digest(&disk));
            let (n, hold) = b.get(&d).unwrap().unwrap().value();
            b.insert(&d, (n + 5, hold)).unwrap();
        }
        txn.commit().unwrap();
    }
    let (code, out, _) = imgsrv(&["check", "--data-dir", path_str(counts.path())]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "chunk {} has reference count 2 but 1 references are held",
            hex(&chunk)
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "blob {} has reference count 6 but 1 artifacts",
            sha256_digest(&disk)
        )),
        "{out}"
    );
    assert!(out.contains("2 problems found"), "{out}");

    // A file damaged beyond opening: a clear message and a nonzero exit, no panic.
    let broken = copy_of(&s);
    let path = broken.path().join("imgsrv.redb");
    let mut raw = std::fs::read(&path).unwrap();
    for b in &mut raw[..64] {
        *b ^= 0xA5;
    }
    std::fs::write(&path, &raw).unwrap();
    let (code, out, err) = imgsrv(&["check", "--data-dir", path_str(broken.path())]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("imgsrv check:") && err.contains("restore it from a backup"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    // Refused while the server runs, naming the way out.
    s.start_again();
    let (code, _, err) = imgsrv(&["check", "--data-dir", path_str(s.data_dir())]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("a server is running") && err.contains("imgsrv backup"),
        "{err}"
    );
    let (code, _, err) = imgsrv(&["compact", "--data-dir", path_str(s.data_dir())]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("a server is running"), "{err}");
    s.terminate();
    assert!(
        !s.data_dir().join("imgsrv-admin.sock").exists(),
        "the admin socket outlived the server"
    );
}

#[test]
fn scrub_finds_a_damaged_chunk_and_an_upload_repairs_it() {
    let flags = [
        "--scrub-interval",
        "1s",
        "--scrub-rate",
        "1GiB",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let mut s = Server::start_with(&flags);
    let w = s.writer_token();
    let disk = bytes(3 * CHUNK_SIZE + 10, 31);
    s.publish_image(&w, "scrubbed", "1.0", &disk, &bytes(500, 32));
    s.kill9();
    let chunk = chunk_hashes(&disk)[1];
    damage_chunk(&s.db_path(), &chunk);
    s.restart();
    let metrics = metrics_addr(&s);
    wait_until(30, "the scrub reports the damaged chunk", || {
        s.log_text().contains("scrub found a damaged chunk")
    });
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("scrub found a damaged chunk"))
        .unwrap();
    assert!(line.contains(" error "), "{line}");
    assert!(line.contains(&hex(&chunk)), "{line}");
    assert!(line.contains(&sha256_digest(&disk)), "{line}");
    assert!(line.contains("scrubbed 1.0 (published)"), "{line}");
    wait_until(30, "the pass completes", || {
        metric(&metrics, "imgsrv_scrub_passes_total") >= 1.0
    });
    assert!(metric(&metrics, "imgsrv_scrub_damaged_chunks_total") >= 1.0);
    assert_eq!(
        metric(&metrics, "imgsrv_scrub_last_pass_damaged_chunks"),
        1.0
    );
    assert!(metric(&metrics, "imgsrv_scrub_chunks_verified_total") >= 4.0);
    assert!(
        metric(
            &metrics,
            "imgsrv_scrub_last_pass_completed_timestamp_seconds"
        ) > 1.7e9
    );

    // An upload that holds the true bytes of that chunk (the same first two chunks, another
    // tail) replaces the stored copy; the next pass finds nothing.
    let mut other = disk[..2 * CHUNK_SIZE].to_vec();
    other.extend(bytes(333, 33));
    s.upload(&w, &other);
    let passes = metric(&metrics, "imgsrv_scrub_passes_total");
    wait_until(30, "a clean pass after the repair", || {
        metric(&metrics, "imgsrv_scrub_passes_total") > passes
            && metric(&metrics, "imgsrv_scrub_last_pass_damaged_chunks") == 0.0
    });
    let r = s.get(&format!("/v1/blobs/{}", sha256_digest(&disk)));
    assert!(
        r.status == 200 && r.body == disk,
        "the repaired blob is not served whole"
    );
    s.terminate();
    assert_check_clean(s.data_dir());
}

#[test]
fn compaction_returns_the_space_of_a_retired_version() {
    let mut s = Server::start_with(&[
        "--retire-grace",
        "1s",
        // Short enough that the ready upload's hold on the big blob ends within the wait
        // below, long enough that a loaded machine still attaches the blobs before it does.
        "--upload-ttl",
        "8s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let metrics = metrics_addr(&s);
    let w = s.writer_token();
    let big = bytes(24 * CHUNK_SIZE, 41);
    let meta = bytes(800, 42);
    s.publish_image(&w, "cmp", "1.0", &big, &meta);
    let small = bytes(CHUNK_SIZE / 2, 43);
    let m2 = s.publish_image(&w, "cmp", "2.0", &small, &meta);
    let r = s.call("DELETE", "/v1/images/cmp/versions/1.0", &w, &Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    let path = format!("/v1/blobs/{}", sha256_digest(&big));
    wait_until(30, "the retired version's blob is collected", || {
        s.get(&path).status == 404
    });
    // The metrics show the live data next to the file's size (which redb may already have
    // trimmed at its end, so only the order between the two is certain).
    let live = metric(&metrics, "imgsrv_database_live_bytes");
    assert!(live < (2 * CHUNK_SIZE) as f64, "{live}");
    assert!(metric(&metrics, "imgsrv_database_file_bytes") >= live);
    s.terminate();

    let before = std::fs::metadata(s.db_path()).unwrap().len();
    let (code, out, err) = imgsrv(&["compact", "--data-dir", path_str(s.data_dir())]);
    assert_eq!(code, 0, "{out}{err}");
    let after = std::fs::metadata(s.db_path()).unwrap().len();
    eprintln!("{out}file size {before} -> {after} bytes");
    assert!(out.contains("returned to the filesystem"), "{out}");
    // redb already gives back free pages at the end of the file when it closes cleanly, so
    // what compaction returns is what sits in the middle; afterwards the file is close to the
    // live data (half a chunk, the metadata and redb's own pages).
    assert!(
        after <= before && after <= 4 * 1024 * 1024,
        "compaction returned too little: {before} -> {after}"
    );
    assert_check_clean(s.data_dir());
    s.start_again();
    let r = s.get(&m2.download_path());
    assert!(
        r.status == 200 && r.body == small,
        "the kept version is damaged by compaction"
    );
}

/// Starts `imgsrv backup --rate RATE` of the server's data directory into `out`, in the
/// background, and waits until the server has begun it.
fn start_slow_backup(s: &Server, out: &Path, rate: &str) -> std::process::Child {
    let before = s.log_text().matches("backup requested").count();
    let child = Command::new(binary())
        .args([
            "backup",
            "--rate",
            rate,
            "--data-dir",
            path_str(s.data_dir()),
            path_str(out),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(20, "the server to begin the backup", || {
        s.log_text().matches("backup requested").count() > before
    });
    child
}

#[test]
fn one_backup_at_a_time_and_shutdown_cuts_a_running_one() {
    let mut s = Server::start();
    let w = s.writer_token();
    let body = bytes(12 * CHUNK_SIZE, 51);
    s.upload(&w, &body);
    let out = copy_dir();

    // A backup held to 1 MiB a second needs about 12 s for these 12 chunks.
    let first = out.path().join("first.redb");
    let running = start_slow_backup(&s, &first, "1MiB");
    assert!(
        s.log_text()
            .contains("copying a snapshot of the database at up to 1048576 bytes a second"),
        "{}",
        s.log_text()
    );
    let second = out.path().join("second.redb");
    let (code, _, err) = imgsrv(&[
        "backup",
        "--data-dir",
        path_str(s.data_dir()),
        path_str(&second),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("another backup is running"), "{err}");
    assert!(!second.exists() && !out.path().join("second.redb.partial").exists());

    // A shutdown does not wait for the backup: it stops, its client says so and leaves no
    // file behind, and the socket is removed.
    let started = Instant::now();
    s.terminate();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited for the backup"
    );
    let done = running.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&done.stderr);
    assert_eq!(done.status.code(), Some(1), "{err}");
    assert!(err.contains("shutting down"), "{err}");
    assert!(!first.exists() && !out.path().join("first.redb.partial").exists());
    assert!(!s.data_dir().join("imgsrv-admin.sock").exists());
    assert!(s.log_text().contains("stopped cleanly"), "{}", s.log_text());
}

#[test]
fn a_backup_whose_client_is_killed_stops_and_a_slow_one_completes() {
    let s = Server::start();
    let w = s.writer_token();
    let body = bytes(6 * CHUNK_SIZE, 52);
    let digest = s.upload(&w, &body);
    let out = copy_dir();

    // The server notices that its client is gone at its next progress report and lets go of
    // the snapshot; a later backup is not refused as "another backup is running".
    let killed = out.path().join("killed.redb");
    let mut running = start_slow_backup(&s, &killed, "1MiB");
    running.kill().unwrap();
    running.wait().unwrap();
    wait_until(10, "the server to end the backup", || {
        s.log_text()
            .contains("backup not finished: the client went away")
    });

    // A rate-limited backup that runs to the end is a whole copy.
    let slow = out.path().join("imgsrv.redb");
    let child = start_slow_backup(&s, &slow, "64MiB");
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(String::from_utf8_lossy(&done.stdout).contains("(the running server)"));
    assert_check_clean(out.path());
    let copy = Server::start_in(out, &[]);
    let r = copy.get(&format!("/v1/blobs/{digest}"));
    assert_eq!(r.status, 200, "the copy lacks the blob");
    assert!(r.body == body, "the copy's blob differs");

    // A rate that is not a size is refused as a usage error, before anything is written.
    let rejected = copy_dir();
    let (code, _, err) = imgsrv(&[
        "backup",
        "--rate",
        "fast",
        "--data-dir",
        path_str(s.data_dir()),
        path_str(&rejected.path().join("x.redb")),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--rate \"fast\""), "{err}");
    assert!(!rejected.path().join("x.redb").exists());
}
