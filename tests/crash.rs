//! Crash consistency: SIGKILL at chosen moments, restart on the same redb file, and check that
//! every acknowledged write survived, that interrupted work is cleaned up or resumed, and that
//! no reader ever sees a half-published version (docs/api.md, decision 5).

use crate::storage::{
    Db, begin, chunk_hashes, complete, metric, put_part, put_part_ok, stop_and_read,
};
use crate::util::tables::JOBS;
use crate::util::*;
use redb::ReadableDatabase;
use serde_json::{Value, json};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn kill_during_part_upload() {
    let mut s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&s);
    let w = s.writer_token();
    let part1 = bytes(2 * CHUNK_SIZE + 100, 61);
    let part2 = bytes(4 * CHUNK_SIZE + 50, 62);
    let data = [&part1[..], &part2[..]].concat();
    let id = begin(&s, &w, &data);
    let p1 = put_part_ok(&s, &w, &id, 1, &part1);
    let stored = metric(&metrics, "imgsrv_chunks");

    // Part 2: the head and two and a half chunks of its body, then silence.
    let mut conn = TcpStream::connect(&s.addr).unwrap();
    write!(
        conn,
        "PUT /v1/uploads/{id}/parts/2 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {w}\r\n\
         Content-Length: {}\r\n\r\n",
        s.addr,
        part2.len()
    )
    .unwrap();
    let sent = 2 * CHUNK_SIZE + CHUNK_SIZE / 2;
    conn.write_all(&part2[..sent]).unwrap();
    // The chunk counter is written in each chunk's own (cheap) commit, so it shows what the
    // server has staged.
    wait_until(30, "the server stages two chunks", || {
        metric(&metrics, "imgsrv_chunks") == stored + 2.0
    });
    // A durable commit by another request makes the part's cheap chunk commits durable too,
    // so the crash leaves staging rows behind.
    begin(&s, &w, b"another session");
    s.kill9();
    drop(conn);

    let staged = &chunk_hashes(&part2)[..2];
    let db = Db::read(&s.db_path());
    db.check(true);
    assert_eq!(
        db.staging, staged,
        "the crash should leave the two staged chunks"
    );
    assert_eq!(db.parts.len(), 1, "only part 1 was acknowledged");

    // The next start releases them.
    s.restart();
    let db = stop_and_read(&mut s);
    db.check(true);
    assert!(db.staging.is_empty(), "staging rows survived a restart");
    for h in staged {
        assert!(
            !db.has_chunk(h),
            "a staged chunk of the interrupted part was not released"
        );
    }
    for h in chunk_hashes(&part1) {
        assert_eq!(db.count(&h), 1, "part 1's chunks must be intact");
    }
    assert_eq!(db.chunks.len(), 3);

    // The session still takes part 2, and completes with the acknowledged part 1.
    s.restart();
    let session = s.get(&format!("/v1/uploads/{id}")).json();
    assert_eq!(session["state"], "uploading", "{session}");
    let p2 = put_part_ok(&s, &w, &id, 2, &part2);
    let r = complete(&s, &w, &id, &[p1, p2]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "ready", "{}", r.text());
    let r = s.get(&format!("/v1/blobs/{}", sha256_digest(&data)));
    assert_eq!(r.status, 200);
    assert!(r.body == data, "the blob assembled after the crash differs");

    let db = stop_and_read(&mut s);
    db.check(true);
    assert_eq!(
        db.chunks.len(),
        chunk_hashes(&part1).len() + chunk_hashes(&part2).len()
    );
    assert!(db.parts.is_empty() && db.staging.is_empty());
    crate::ops::assert_check_clean(s.data_dir());
}

/// SIGKILL right after the 2xx, then start again on the same file.
fn crash(s: &mut Server) {
    s.kill9();
    s.restart();
}

#[test]
fn acknowledged_writes_survive_kill9() {
    let mut s = Server::start();
    let admin = s.bootstrap_token();

    // Auth writes: principal, role grant, token issue.
    let r = s.call(
        "POST",
        "/v1/auth/principals",
        &admin,
        &json!({"kind": "service", "display_name": "ci"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let principal = r.json()["id"].as_str().unwrap().to_string();
    crash(&mut s);
    let ppath = format!("/v1/auth/principals/{principal}");
    assert_eq!(s.call("GET", &ppath, &admin, &Value::Null).status, 200);
    let r = s.call(
        "PUT",
        &format!("{ppath}/roles/content-writer"),
        &admin,
        &Value::Null,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    crash(&mut s);
    let p = s.call("GET", &ppath, &admin, &Value::Null).json();
    assert_eq!(p["role_ids"], json!(["content-writer"]), "{p}");
    let r = s.call(
        "POST",
        &format!("{ppath}/api-tokens"),
        &admin,
        &json!({"name": "ci", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let w = r.json()["plaintext"].as_str().unwrap().to_string();
    crash(&mut s);

    // Upload writes: begin, part, complete (the token issued above must still work).
    let disk = bytes(2 * CHUNK_SIZE + 1, 71);
    let meta = bytes(3000, 72);
    let (dd, md) = (sha256_digest(&disk), sha256_digest(&meta));
    let id = begin(&s, &w, &disk);
    crash(&mut s);
    let upath = format!("/v1/uploads/{id}");
    assert_eq!(s.get(&upath).json()["state"], "created");
    let p1 = put_part_ok(&s, &w, &id, 1, &disk);
    crash(&mut s);
    assert_eq!(s.get(&upath).json()["state"], "uploading");
    let r = complete(&s, &w, &id, &[p1]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "ready");
    crash(&mut s);
    assert_eq!(s.get(&upath).json()["state"], "ready");
    let r = s.get(&format!("/v1/blobs/{dd}"));
    assert!(
        r.status == 200 && r.body == disk,
        "the completed blob is lost"
    );
    s.upload(&w, &meta);
    crash(&mut s);

    // Catalog writes: image, version, artifact, attachment.
    let r = s.call("POST", "/v1/images", &w, &json!({"name": "crashy"}));
    assert_eq!(r.status, 201, "{}", r.text());
    crash(&mut s);
    let r = s.call("POST", "/v1/images", &w, &json!({"name": "crashy"}));
    assert_eq!(r.status, 409, "the image is lost: {}", r.text());
    let r = s.call(
        "POST",
        "/v1/images/crashy/versions",
        &w,
        &json!({"version": "1.0"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    crash(&mut s);
    let vpath = "/v1/images/crashy/versions/1.0";
    assert_eq!(s.get(vpath).json()["version"]["state"], "draft");
    let r = s.call(
        "POST",
        &format!("{vpath}/artifacts"),
        &w,
        &json!({"operating_system": "debian", "architecture": "x86_64", "format": "qcow2",
                "primary_blob_digest": dd, "primary_blob_size_bytes": disk.len(),
                "primary_media_type": "application/x-qemu-disk"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let aid = r.json()["id"].as_str().unwrap().to_string();
    crash(&mut s);
    let m = s.get(vpath).json();
    assert_eq!(m["artifacts"][0]["artifact"]["id"], aid.as_str(), "{m}");
    let r = s.call(
        "POST",
        &format!("{vpath}/artifacts/{aid}/attachments"),
        &w,
        &json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                "blob_digest": md, "blob_size_bytes": meta.len()}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let att = r.json()["id"].as_str().unwrap().to_string();
    crash(&mut s);
    let m = s.get(vpath).json();
    assert_eq!(
        m["artifacts"][0]["attachments"][0]["id"],
        att.as_str(),
        "{m}"
    );

    // Publish: the job was acknowledged (202) and runs to the end after the restart.
    let r = s.call("POST", &format!("{vpath}/publish"), &w, &Value::Null);
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json()["id"].as_str().unwrap().to_string();
    crash(&mut s);
    let done = s.wait_job(&w, &job);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(s.get(vpath).json()["version"]["state"], "published");

    // Alias.
    let r = s.call(
        "PUT",
        "/v1/images/crashy/aliases/latest",
        &w,
        &json!({"version": "1.0"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    crash(&mut s);
    let a = s.get("/v1/images/crashy/aliases/latest");
    assert_eq!(a.status, 200, "the alias is lost: {}", a.text());
    assert_eq!(a.json()["version"], "1.0");
    let r = s.get(&format!(
        "/v1/images/crashy/versions/1.0/artifacts/{aid}/download"
    ));
    assert!(
        r.status == 200 && r.body == disk,
        "the published disk is lost"
    );

    let db = stop_and_read(&mut s);
    db.check(true);
    // The operator's own check agrees after the crash cycles.
    crate::ops::assert_check_clean(s.data_dir());
}

/// One GET or HEAD that tolerates the server being down (it is killed while this runs).
fn try_request(addr: &str, method: &str, path: &str) -> Option<Resp> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut c, &mut raw).ok()?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let r = parse_response(&raw, method == "HEAD");
    let len: usize = r.header("Content-Length")?.parse().ok()?;
    let body = if method == "HEAD" { 0 } else { len };
    (raw.len() == end + 4 + body).then_some(r)
}

/// What a reader may see of a version while it is being published: a draft or publishing
/// version, or a fully published one whose manifest is complete and whose bytes are served.
fn check_reader_view(addr: &str, path: &str, disk_len: usize) -> Option<String> {
    let r = try_request(addr, "GET", path)?;
    assert_eq!(r.status, 200, "{}", r.text());
    let m = r.json();
    let state = m["version"]["state"].as_str().unwrap().to_string();
    match state.as_str() {
        "draft" | "publishing" => assert!(m["version"].get("published_at").is_none(), "{m}"),
        "published" => {
            assert!(m["version"]["published_at"].is_string(), "{m}");
            let arts = m["artifacts"].as_array().unwrap();
            assert_eq!(arts.len(), 1, "{m}");
            assert_eq!(arts[0]["attachments"][0]["name"], "incus.tar.xz", "{m}");
            let aid = arts[0]["artifact"]["id"].as_str().unwrap();
            let download = format!("{path}/artifacts/{aid}/download");
            if let Some(h) = try_request(addr, "HEAD", &download) {
                assert_eq!(h.status, 200, "published but not downloadable");
                assert_eq!(
                    h.header("Content-Length"),
                    Some(disk_len.to_string().as_str())
                );
            }
        }
        other => panic!("unexpected version state {other}: {m}"),
    }
    Some(state)
}

#[test]
fn kill_during_publish_job_resumes() {
    let mut s = Server::start();
    let w = s.writer_token();
    // Big enough that incus_index (which hashes every byte) takes a moment.
    let disk = bytes(20 * 1024 * 1024, 81);
    let meta = bytes(5000, 82);
    let digest = s.upload(&w, &disk);
    let md = s.upload(&w, &meta);
    assert_eq!(
        s.call("POST", "/v1/images", &w, &json!({"name": "big"}))
            .status,
        201
    );
    let vpath = "/v1/images/big/versions/2.0";
    let r = s.call(
        "POST",
        "/v1/images/big/versions",
        &w,
        &json!({"version": "2.0"}),
    );
    assert_eq!(r.status, 201);
    let r = s.call(
        "POST",
        &format!("{vpath}/artifacts"),
        &w,
        &json!({"operating_system": "debian", "architecture": "x86_64", "format": "qcow2",
                "primary_blob_digest": digest, "primary_blob_size_bytes": disk.len(),
                "primary_media_type": "application/x-qemu-disk"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let aid = r.json()["id"].as_str().unwrap().to_string();
    let r = s.call(
        "POST",
        &format!("{vpath}/artifacts/{aid}/attachments"),
        &w,
        &json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                "blob_digest": md, "blob_size_bytes": meta.len()}),
    );
    assert_eq!(r.status, 201, "{}", r.text());

    // A reader polls the manifest throughout, across the crash and the restart.
    let addr = Arc::new(Mutex::new(s.addr.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (addr, stop) = (addr.clone(), stop.clone());
        let len = disk.len();
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let a = addr.lock().unwrap().clone();
                if let Some(state) = check_reader_view(&a, vpath, len)
                    && seen.last() != Some(&state)
                {
                    seen.push(state);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        })
    };

    let r = s.call("POST", &format!("{vpath}/publish"), &w, &Value::Null);
    assert_eq!(r.status, 202, "{}", r.text());
    let job = r.json()["id"].as_str().unwrap().to_string();
    let jpath = format!("/v1/publish-jobs/{job}");
    // Kill while incus_index hashes the disk. Poll without pausing: with an optimised binary
    // the step takes only milliseconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = s.call("GET", &jpath, &w, &Value::Null).json();
        let indexing = j["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|st| st["name"] == "incus_index" && st["state"] == "running");
        if indexing {
            break;
        }
        match j["state"].as_str() {
            Some("queued" | "running") => {
                assert!(Instant::now() < deadline, "incus_index never ran: {j}")
            }
            _ => panic!("the job ended before it could be interrupted: {j}"),
        }
    }
    s.kill9();

    // What the crash left: the job record exactly as of the kill.
    let before: Value = {
        let db = match redb::ReadOnlyDatabase::open(s.db_path()) {
            Ok(db) => Box::new(db) as Box<dyn ReadableDatabase>,
            Err(_) => Box::new(redb::Database::open(s.db_path()).unwrap()),
        };
        let txn = db.begin_read().unwrap();
        let jobs = txn.open_table(JOBS).unwrap();
        let key = uuid_u128(&job);
        serde_json::from_slice(jobs.get(key).unwrap().expect("job stored").value()).unwrap()
    };
    assert_eq!(before["state"], "running", "killed too late: {before}");
    let running: Vec<&Value> = before["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|st| st["state"] == "running")
        .collect();
    assert_eq!(running.len(), 1, "{before}");
    let (step, attempts) = (
        running[0]["name"].as_str().unwrap().to_string(),
        running[0]["attempt_count"].as_i64().unwrap(),
    );
    eprintln!("killed while {step} was running (attempt {attempts})");

    s.restart();
    *addr.lock().unwrap() = s.addr.clone();
    let done = s.wait_job(&w, &job);
    assert_eq!(done["state"], "succeeded", "{done}");
    let after = done["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|st| st["name"] == step.as_str())
        .unwrap();
    assert_eq!(after["state"], "succeeded", "{done}");
    assert_eq!(
        after["attempt_count"].as_i64().unwrap(),
        attempts + 1,
        "the interrupted step must be claimed again: {done}"
    );
    for st in done["steps"].as_array().unwrap() {
        assert!(st["attempt_count"].as_i64().unwrap() >= 1, "{done}");
    }
    eprintln!(
        "attempt counts after resume: {:?}",
        done["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|st| (st["name"].clone(), st["attempt_count"].clone()))
            .collect::<Vec<_>>()
    );

    wait_until(10, "the reader sees the version published", || {
        check_reader_view(&s.addr, vpath, disk.len()).as_deref() == Some("published")
    });
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::SeqCst);
    let seen = reader
        .join()
        .expect("the reader saw an inconsistent version");
    eprintln!("the reader saw: {seen:?}");
    assert_eq!(seen.last().map(String::as_str), Some("published"));
    assert!(seen.iter().any(|st| st == "publishing"), "{seen:?}");
    let r = s.get(&format!("{vpath}/artifacts/{aid}/download"));
    assert!(r.body == disk, "the published disk differs");
    let db = stop_and_read(&mut s);
    db.check(true);
    // The operator's own check agrees after the crash cycles.
    crate::ops::assert_check_clean(s.data_dir());
}

fn uuid_u128(id: &str) -> u128 {
    u128::from_str_radix(&id.replace('-', ""), 16).unwrap()
}

#[test]
fn client_gone_mid_part_releases_staged_chunks() {
    // Not a crash: the client goes away mid-body. The server must release what it staged.
    let mut s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&s);
    let w = s.writer_token();
    let part = bytes(3 * CHUNK_SIZE, 91);
    let id = begin(&s, &w, &part);
    {
        let mut conn = TcpStream::connect(&s.addr).unwrap();
        write!(
            conn,
            "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {w}\r\n\
             Content-Length: {}\r\n\r\n",
            s.addr,
            part.len()
        )
        .unwrap();
        conn.write_all(&part[..CHUNK_SIZE + 5]).unwrap();
        wait_until(30, "the server stages the first chunk", || {
            metric(&metrics, "imgsrv_chunks") == 1.0
        });
    }
    wait_until(30, "the server releases the staged chunk", || {
        metric(&metrics, "imgsrv_chunks") == 0.0
    });
    // The session is untouched and still takes the part.
    assert_eq!(
        s.get(&format!("/v1/uploads/{id}")).json()["state"],
        "created"
    );
    let r = put_part(&s, &w, &id, 1, &part[..10]);
    assert_eq!(r.status, 200, "{}", r.text());
    let db = stop_and_read(&mut s);
    db.check(true);
    assert_eq!(
        db.chunks.len(),
        1,
        "only the 10-byte part's chunk may remain"
    );
    crate::ops::assert_check_clean(s.data_dir());
}
