//! Digest at complete (docs/api.md, decision 18): a session begun without `expected_digest`
//! takes the digest in `complete`.

use crate::storage::{metric, put_part_ok, stop_and_read};
use crate::util::*;
use serde_json::{Value, json};

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
