//! Digest at complete (docs/api.md, decision 18): a session begun without `expected_digest`
//! takes the digest in `complete`, and `imgsrv push` uses it to upload a file while it hashes
//! it.

use crate::push::{
    Target, acked_parts, archivers_present, kill_after_parts, part_bytes, run, show,
};
use crate::storage::{metric, put_part_ok, stop_and_read};
use crate::util::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MIB: usize = 1024 * 1024;

/// Begins a session without a digest; returns its JSON.
fn begin_late(s: &Server, w: &str, size: usize) -> Value {
    let r = s.call(
        "POST",
        "/v1/uploads",
        w,
        &json!({"expected_size_bytes": size, "filename_hint": "disk.qcow2"}),
    );
    json_ok(&r, 201)
}

fn complete_with(s: &Server, w: &str, id: &str, parts: &[Value], digest: Option<&str>) -> Resp {
    let mut body = json!({ "parts": parts });
    if let Some(d) = digest {
        body["digest"] = json!(d);
    }
    s.call("POST", &format!("/v1/uploads/{id}/complete"), w, &body)
}

fn rehashed(metrics: &str) -> f64 {
    metric(metrics, "imgsrv_upload_complete_rehashed_bytes_total")
}

#[test]
fn a_session_begun_without_a_digest_is_verified_at_complete() {
    let mut s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&s);
    let w = s.writer_token();
    let parts = [
        bytes(CHUNK_SIZE + 5, 1),
        bytes(7000, 2),
        bytes(2 * CHUNK_SIZE, 3),
    ];
    let data = parts.concat();
    let digest = sha256_digest(&data);

    let j = begin_late(&s, &w, data.len());
    let id = id_of(&j["id"]);
    assert_eq!(j["state"], "created");
    assert_eq!(j["expected_size_bytes"], data.len());
    // The digest is absent until it is known, never null.
    assert!(j.get("expected_digest").is_none(), "{j}");
    assert_eq!(json_ok(&s.get(&format!("/v1/uploads/{id}")), 200), j);

    let listed: Vec<Value> = (0..3)
        .map(|i| put_part_ok(&s, &w, &id, i as u32 + 1, &parts[i]))
        .collect();
    let done = json_ok(&complete_with(&s, &w, &id, &listed, Some(&digest)), 200);
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(done["expected_digest"], digest);
    assert_eq!(json_ok(&s.get(&format!("/v1/uploads/{id}")), 200), done);
    // Parts sent in order carried the hash: complete read nothing back.
    assert_eq!(rehashed(&metrics), 0.0);
    let blob = s.get(&format!("/v1/blobs/{digest}"));
    assert_eq!(blob.status, 200);
    assert!(blob.body == data, "downloaded blob differs");
    // Completing again answers the session as it is.
    let again = complete_with(&s, &w, &id, &listed, None);
    assert_eq!(json_ok(&again, 200), done);

    let db = stop_and_read(&mut s);
    db.check(true);
    assert!(db.parts.is_empty());
    assert_eq!(db.blob(&digest).map(|b| b.0), Some(data.len() as u64));
}

#[test]
fn late_digest_rules() {
    let s = Server::start();
    let w = s.writer_token();
    let data = bytes(3000, 4);
    let digest = sha256_digest(&data);

    // Without a digest the size must be given.
    let r = s.call("POST", "/v1/uploads", &w, &json!({}));
    r.assert_problem(
        400,
        "upload invalid input: expected size is required when the digest is given at complete",
    );
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_size_bytes": -1}),
    );
    r.assert_problem(
        400,
        "upload invalid input: expected size must be non-negative",
    );

    let id = id_of(&begin_late(&s, &w, data.len())["id"]);
    let listed = vec![put_part_ok(&s, &w, &id, 1, &data)];
    // No digest: 400, and the session is left as it was.
    complete_with(&s, &w, &id, &listed, None).assert_problem(
        400,
        "upload invalid input: digest is required to complete a session begun without expected_digest",
    );
    complete_with(&s, &w, &id, &listed, Some("sha256:nope")).assert_problem(
        400,
        "upload invalid input: digest must match sha256:<64 lowercase hex chars>",
    );
    // A wrong type is a JSON error.
    let r = s.call(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        &w,
        &json!({"parts": listed, "digest": 5}),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON request body")
    );
    assert_eq!(
        s.get(&format!("/v1/uploads/{id}")).json()["state"],
        "uploading"
    );

    // A digest the bytes do not have: failed, naming both; the claimed digest is shown.
    let wrong = sha256_digest(b"something else");
    let failed = json_ok(&complete_with(&s, &w, &id, &listed, Some(&wrong)), 200);
    assert_eq!(failed["state"], "failed", "{failed}");
    assert_eq!(failed["expected_digest"], wrong);
    let why = failed["failure_message"].as_str().unwrap();
    assert!(why.contains(&digest) && why.contains(&wrong), "{why}");
    assert_eq!(s.get(&format!("/v1/blobs/{wrong}")).status, 404);
    assert_eq!(s.get(&format!("/v1/blobs/{digest}")).status, 404);

    // A session begun with a digest: the same digest at complete is fine, another one 412.
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": digest, "expected_size_bytes": data.len()}),
    );
    let id = id_of(&json_ok(&r, 201)["id"]);
    let listed = vec![put_part_ok(&s, &w, &id, 1, &data)];
    complete_with(&s, &w, &id, &listed, Some(&wrong)).assert_problem(
        412,
        &format!("complete gives digest {wrong}, the session expects {digest}"),
    );
    let done = json_ok(&complete_with(&s, &w, &id, &listed, Some(&digest)), 200);
    assert_eq!(done["state"], "ready", "{done}");
}

/// A late session whose bytes are already stored ends `ready` and keeps nothing of its own.
#[test]
fn a_late_digest_of_a_stored_blob_is_deduplicated_at_complete() {
    let mut s = Server::start();
    let w = s.writer_token();
    let data = bytes(2 * CHUNK_SIZE + 99, 5);
    let digest = s.upload(&w, &data);

    let id = id_of(&begin_late(&s, &w, data.len())["id"]);
    let listed = vec![
        put_part_ok(&s, &w, &id, 1, &data[..CHUNK_SIZE]),
        put_part_ok(&s, &w, &id, 2, &data[CHUNK_SIZE..]),
    ];
    let done = json_ok(&complete_with(&s, &w, &id, &listed, Some(&digest)), 200);
    assert_eq!(done["state"], "ready", "{done}");
    assert_eq!(done["expected_digest"], digest);
    // A session begun with the digest now answers ready at once.
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": digest, "expected_size_bytes": data.len()}),
    );
    assert_eq!(json_ok(&r, 200)["state"], "ready");
    let blob = s.get(&format!("/v1/blobs/{digest}"));
    assert!(blob.body == data, "downloaded blob differs");

    let db = stop_and_read(&mut s);
    db.check(true);
    assert!(db.parts.is_empty(), "the late session's parts are kept");
    assert_eq!(db.blobs.len(), 1);
}

/// What the push tests start from: a server with its metrics listener on (a [`Target`]), the
/// address of its metrics, and an image directory `img` holding `disk` and an `incus.tar.xz`.
struct Pushing {
    t: Target,
    metrics: String,
    dir: PathBuf,
}

impl Pushing {
    /// `None` where tar or xz, which make the `incus.tar.xz`, are not installed.
    fn new(disk: &[u8]) -> Option<Pushing> {
        if !archivers_present() {
            return None;
        }
        let t = Target::with_metrics();
        let metrics = metrics_addr(&t.s);
        let dir = t.image_dir("img", disk, "x86_64");
        Some(Pushing { t, metrics, dir })
    }

    /// The size of the image directory's `incus.tar.xz`.
    fn meta_len(&self) -> u64 {
        std::fs::metadata(self.dir.join("incus.tar.xz"))
            .unwrap()
            .len()
    }

    /// `imgsrv push` of the image directory as img `version`, with 1 MiB parts.
    fn push(&self, version: &str, extra: &[&str]) -> Command {
        let p = self.dir.display().to_string();
        let mut args = vec!["img", version, &p, "--part-size-mib", "1"];
        args.extend_from_slice(extra);
        self.t.push(&args)
    }
}

/// Files larger than 8 MiB are sent while they are hashed, in order, so the server carries
/// the hash and complete reads nothing back; a rerun and a push of the same files under a new
/// version send nothing.
#[test]
fn push_hashes_while_it_sends() {
    let disk = bytes(12 * MIB + 321, 6);
    let Some(p) = Pushing::new(&disk) else { return };
    let (s, metrics, state) = (&p.t.s, &p.metrics, &p.t.state);
    let meta_len = p.meta_len();

    let o = run(p.push("1.0", &["--parallel", "1"]));
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&sha256_digest(&disk)),
        "{}",
        show(&o)
    );
    let sent = part_bytes(metrics);
    assert_eq!(sent, disk.len() as u64 + meta_len, "each byte sent once");
    assert_eq!(rehashed(metrics), 0.0, "complete read parts back");
    let m = s.get("/v1/images/img/versions/1.0").json();
    assert_eq!(m["version"]["state"], "published", "{m}");
    assert_eq!(
        m["artifacts"][0]["artifact"]["primary_blob_digest"],
        sha256_digest(&disk)
    );
    let aid = m["artifacts"][0]["artifact"]["id"].as_str().unwrap();
    let got = s.get(&format!(
        "/v1/images/img/versions/1.0/artifacts/{aid}/download"
    ));
    assert!(got.body == disk, "downloaded disk differs");
    assert_eq!(acked_parts(state), 0, "the state file is removed once done");

    // Again: nothing sent, nothing changed.
    let o = run(p.push("1.0", &[]));
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already published"),
        "{}",
        show(&o)
    );
    assert_eq!(part_bytes(metrics), sent);

    // Under a new version: this client pushed these files to this server, so it hashes them
    // first, and begin answers that the server has them.
    let o = run(p.push("1.1", &[]));
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("disk.qcow2: already on the server, not sent"),
        "{}",
        show(&o)
    );
    assert_eq!(part_bytes(metrics), sent);
    assert_eq!(
        s.get("/v1/images/img/versions/1.1").json()["version"]["state"],
        "published"
    );
}

/// A client that has not pushed the file before learns from the digest, once its hash is done,
/// that the server holds the blob: it stops sending and aborts its session.
#[test]
fn push_stops_sending_once_the_digest_shows_the_blob_is_there() {
    let disk = bytes(64 * MIB, 7);
    let Some(mut p) = Pushing::new(&disk) else {
        return;
    };
    p.t.s.upload(&p.t.w, &disk);
    let before = part_bytes(&p.metrics);

    // The client's state directory is still empty: it has not pushed the file before.
    let o = run(p.push("1.0", &["--parallel", "1"]));
    assert!(o.status.success(), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already on the server, the rest not sent"),
        "{}",
        show(&o)
    );
    let sent = part_bytes(&p.metrics) - before;
    eprintln!(
        "sent {sent} of {} bytes before the digest was known",
        disk.len()
    );
    assert!(sent < disk.len() as u64, "{sent} bytes sent\n{}", show(&o));
    let m = p.t.s.get("/v1/images/img/versions/1.0").json();
    assert_eq!(m["version"]["state"], "published", "{m}");
    assert_eq!(acked_parts(&p.t.state), 0);

    // The late session was aborted: no part is kept.
    let db = stop_and_read(&mut p.t.s);
    db.check(true);
    assert!(
        db.parts.is_empty(),
        "parts of the abandoned session are kept"
    );
}

/// An interrupted late upload resumes without resending acknowledged parts; a file that
/// changed since is sent afresh, and the new bytes are what gets published.
#[test]
fn push_resumes_a_late_upload_and_starts_over_for_a_changed_file() {
    let disk = bytes(24 * MIB + 5, 8);
    let Some(p) = Pushing::new(&disk) else { return };
    let (s, metrics, state, dir) = (&p.t.s, &p.metrics, &p.t.state, &p.dir);
    let meta_len = p.meta_len();
    let cmd = |version: &str| p.push(version, &["--parallel", "1"]);

    let acked = kill_after_parts(cmd("1.0"), state, 6);
    std::thread::sleep(Duration::from_millis(500));
    let first = part_bytes(metrics);
    let o = run(cmd("1.0"));
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("resuming"),
        "{}",
        show(&o)
    );
    let second = part_bytes(metrics) - first;
    let most = disk.len() as u64 + meta_len - (acked * MIB) as u64;
    assert!(
        second <= most,
        "resumed run sent {second}, at most {most} expected"
    );
    assert_published(s, "1.0", &disk);

    // A new file, interrupted; the state file is then made to record another digest, as if
    // the file had changed in place since: the next run notices when its hash is done and
    // starts over with a new session.
    let changed = bytes(24 * MIB + 5, 9);
    std::fs::write(dir.join("disk.qcow2"), &changed).unwrap();
    kill_after_parts(cmd("2.0"), state, 4);
    let file = single_state_file(state);
    let mut st: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    st["digest"] = json!(sha256_digest(b"other bytes"));
    std::fs::write(&file, st.to_string()).unwrap();
    let o = run(cmd("2.0"));
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("the file changed since the interrupted run"),
        "{}",
        show(&o)
    );
    assert_published(s, "2.0", &changed);

    // Interrupted, then rewritten for real (same size): a new file to push, whose bytes are
    // what gets published.
    let third = bytes(24 * MIB + 5, 10);
    std::fs::write(dir.join("disk.qcow2"), &third).unwrap();
    kill_after_parts(cmd("3.0"), state, 4);
    let fourth = bytes(24 * MIB + 5, 11);
    std::fs::write(dir.join("disk.qcow2"), &fourth).unwrap();
    let o = run(cmd("3.0"));
    assert!(o.status.success(), "{}", show(&o));
    assert_published(s, "3.0", &fourth);
}

/// The one resumable-upload state file under `state`.
fn single_state_file(state: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(state.join("imgsrv/uploads"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

fn assert_published(s: &Server, version: &str, disk: &[u8]) {
    let m = s.get(&format!("/v1/images/img/versions/{version}")).json();
    assert_eq!(m["version"]["state"], "published", "{m}");
    let a = &m["artifacts"][0]["artifact"];
    assert_eq!(a["primary_blob_digest"], sha256_digest(disk));
    let aid = a["id"].as_str().unwrap();
    let got = s.get(&format!(
        "/v1/images/img/versions/{version}/artifacts/{aid}/download"
    ));
    assert!(got.body == disk, "downloaded disk of {version} differs");
}
