//! Publishing and publish jobs (docs/api.md 4.4, section 8, decisions 4 and 5).

use crate::util::tables::CHUNKS;
use crate::util::*;
use serde_json::{Value, json};
use std::path::Path;

const UNKNOWN: &str = "00000000-0000-4000-8000-000000000000";

fn publish(s: &Server, w: &str, image: &str, version: &str) -> Resp {
    s.call(
        "POST",
        &format!("/v1/images/{image}/versions/{version}/publish"),
        w,
        &Value::Null,
    )
}

fn get_job(s: &Server, w: &str, id: &str) -> Value {
    json_ok(
        &s.call("GET", &format!("/v1/publish-jobs/{id}"), w, &Value::Null),
        200,
    )
}

fn attach(s: &Server, w: &str, image: &str, version: &str, artifact: &Value, data: &[u8]) {
    let d = sha256_digest(data);
    let aid = artifact["id"].as_str().unwrap();
    let r = s.call(
        "POST",
        &format!("/v1/images/{image}/versions/{version}/artifacts/{aid}/attachments"),
        w,
        &json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                "blob_digest": d, "blob_size_bytes": data.len()}),
    );
    json_ok(&r, 201);
}

fn step_names(job: &Value) -> Vec<&str> {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect()
}

#[test]
fn publish_creates_a_job_that_succeeds() {
    let s = Server::start();
    let w = s.writer_token();
    let disk = bytes(5000, 1);
    let meta = bytes(300, 2);
    let art = draft_with_artifact(&s, &w, "img", "1.0", &disk);
    s.upload(&w, &meta);
    attach(&s, &w, "img", "1.0", &art, &meta);
    let draft = json_ok(&s.get("/v1/images/img/versions/1.0"), 200);

    // 202 with a queued job and three queued blocking steps; the request body is ignored.
    let auth = format!("Bearer {w}");
    let r = s.request(
        "POST",
        "/v1/images/img/versions/1.0/publish",
        &[("Authorization", &auth)],
        b"ignored {",
    );
    let job = json_ok(&r, 202);
    let id = id_of(&job["id"]);
    assert_eq!(job["version_id"], draft["version"]["id"]);
    assert_eq!(job["image_name"], "img");
    assert_eq!(job["version"], "1.0");
    assert_eq!(job["state"], "queued");
    for absent in ["started_at", "finished_at", "failure_message"] {
        assert!(job.get(absent).is_none(), "{absent} in {job}");
    }
    ts(&job["created_at"]);
    ts(&job["updated_at"]);
    assert_eq!(
        step_names(&job),
        ["validate_catalog", "incus_index", "finalize_publish"]
    );
    for (step, seq) in job["steps"].as_array().unwrap().iter().zip([10, 20, 30]) {
        id_of(&step["id"]);
        assert_eq!(step["job_id"], id.as_str());
        assert_eq!(step["state"], "queued");
        assert_eq!(step["blocking"], true);
        assert_eq!(step["sequence"], seq);
        assert_eq!(step["attempt_count"], 0);
        ts(&step["created_at"]);
        ts(&step["updated_at"]);
        let mut keys: Vec<&str> = step
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "attempt_count",
                "blocking",
                "created_at",
                "id",
                "job_id",
                "name",
                "sequence",
                "state",
                "updated_at"
            ]
        );
    }

    // Publishing again answers 200 with the same job (docs/api.md, decision 4), whatever its progress.
    let again = json_ok(&publish(&s, &w, "img", "1.0"), 200);
    assert_eq!(again["id"], id.as_str());

    let done = s.wait_job(&w, &id);
    assert_eq!(done["state"], "succeeded", "{done}");
    let started = ts(&done["started_at"]);
    let finished = ts(&done["finished_at"]);
    assert!(started <= finished);
    assert!(done.get("failure_message").is_none());
    for step in done["steps"].as_array().unwrap() {
        assert_eq!(step["state"], "succeeded", "{step}");
        assert_eq!(step["attempt_count"], 1);
        assert!(ts(&step["started_at"]) <= ts(&step["finished_at"]));
        assert!(step.get("failure_message").is_none());
    }

    let m = json_ok(&s.get("/v1/images/img/versions/1.0"), 200);
    assert_eq!(m["version"]["state"], "published");
    assert!(ts(&m["version"]["published_at"]) <= finished);
    // The manifest did not change by publishing, apart from the version's state.
    assert_eq!(m["artifacts"], draft["artifacts"]);

    let after = json_ok(&publish(&s, &w, "img", "1.0"), 200);
    assert_eq!(after, done);
}

#[test]
fn publish_requires_verified_blobs() {
    let s = Server::start();
    let w = s.writer_token();
    let disk = bytes(1000, 3);
    let meta = bytes(100, 4);
    let missing = bytes(700, 5);
    let d = s.upload(&w, &disk);
    s.upload(&w, &meta);
    json_ok(
        &s.call("POST", "/v1/images", &w, &json!({"name": "img"})),
        201,
    );

    let artifact = |version: &str, digest: &str, size: usize| {
        let r = s.call(
            "POST",
            "/v1/images/img/versions",
            &w,
            &json!({"version": version}),
        );
        json_ok(&r, 201);
        let r = s.call(
            "POST",
            &format!("/v1/images/img/versions/{version}/artifacts"),
            &w,
            &json!({"operating_system": "debian", "architecture": "x86_64", "format": "qcow2",
                    "primary_blob_digest": digest, "primary_blob_size_bytes": size,
                    "primary_media_type": "application/x-qemu-disk"}),
        );
        json_ok(&r, 201)
    };
    let json_ok_version = |version: &str| {
        let r = s.call(
            "POST",
            "/v1/images/img/versions",
            &w,
            &json!({"version": version}),
        );
        json_ok(&r, 201);
    };

    json_ok_version("empty");
    artifact("primary-missing", &sha256_digest(&missing), missing.len());
    artifact("primary-size", &d, disk.len() + 1);
    let a = artifact("attachment-missing", &d, disk.len());
    attach(&s, &w, "img", "attachment-missing", &a, &missing);
    let a = artifact("attachment-size", &d, disk.len());
    let aid = a["id"].as_str().unwrap();
    let r = s.call(
        "POST",
        &format!("/v1/images/img/versions/attachment-size/artifacts/{aid}/attachments"),
        &w,
        &json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                "blob_digest": sha256_digest(&meta), "blob_size_bytes": meta.len() - 1}),
    );
    json_ok(&r, 201);

    let cases = [
        (
            "empty",
            "published image_versions require at least one release_artifact",
        ),
        (
            "primary-missing",
            "published image_versions require verified primary blobs",
        ),
        (
            "primary-size",
            "published image_versions require verified primary blobs",
        ),
        (
            "attachment-missing",
            "published image_versions require verified attachment blobs",
        ),
        (
            "attachment-size",
            "published image_versions require verified attachment blobs",
        ),
    ];
    for (version, detail) in cases {
        let r = publish(&s, &w, "img", version);
        r.assert_problem(412, detail);
        assert_eq!(r.json()["title"], "Precondition Failed");
        // Nothing changed: still a draft, and a second attempt fails the same way.
        let m = json_ok(&s.get(&format!("/v1/images/img/versions/{version}")), 200);
        assert_eq!(m["version"]["state"], "draft", "{version}");
        publish(&s, &w, "img", version).assert_problem(412, detail);
    }

    // The digest only has to exist by publish time: uploading the missing bytes fixes it.
    s.upload(&w, &missing);
    let job = json_ok(&publish(&s, &w, "img", "primary-missing"), 202);
    let done = s.wait_job(&w, job["id"].as_str().unwrap());
    assert_eq!(done["state"], "succeeded", "{done}");
}

#[test]
fn publish_input_errors() {
    let s = Server::start();
    let w = s.writer_token();
    json_ok(
        &s.call("POST", "/v1/images", &w, &json!({"name": "img"})),
        201,
    );
    let cases = [
        (
            "BAD",
            "1.0",
            400,
            "publish invalid input: catalog invalid input: image name must match ^[a-z0-9][a-z0-9._-]{0,127}$",
        ),
        (
            "img",
            "_1.0",
            400,
            "publish invalid input: catalog invalid input: version must match ^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$",
        ),
        ("nope", "1.0", 404, "publish not found"),
        ("img", "1.0", 404, "publish not found"),
    ];
    for (image, version, status, detail) in cases {
        publish(&s, &w, image, version).assert_problem(status, detail);
    }
}

#[test]
fn publish_job_endpoints_need_content_write() {
    let s = Server::start();
    let w = s.writer_token();
    let am = s.bootstrap_token();
    let m = s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let job = json_ok(&publish(&s, &w, "img", "1.0"), 200);
    let id = id_of(&job["id"]);
    assert_eq!(m.manifest["version"]["id"], job["version_id"]);

    // GET is protected even though it is a read.
    let r = s.get(&format!("/v1/publish-jobs/{id}"));
    r.assert_problem(401, "missing bearer token");
    assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
    let r = s.call("GET", &format!("/v1/publish-jobs/{id}"), &am, &Value::Null);
    r.assert_problem(403, "principal is not authorized for action content.write");
    assert_eq!(r.header("WWW-Authenticate"), None);
    assert_eq!(get_job(&s, &w, &id), job);
    assert_eq!(get_job(&s, &w, &id.to_uppercase()), job);

    let cases = [
        (
            "GET",
            format!("/v1/publish-jobs/{UNKNOWN}"),
            404,
            "publish not found",
        ),
        (
            "GET",
            "/v1/publish-jobs/1".to_string(),
            400,
            "publish job id must be a UUID",
        ),
        (
            "POST",
            format!("/v1/publish-jobs/{UNKNOWN}/retry"),
            404,
            "publish not found",
        ),
        (
            "POST",
            "/v1/publish-jobs/x/retry".to_string(),
            400,
            "publish job id must be a UUID",
        ),
        (
            "POST",
            format!("/v1/publish-jobs/{id}/retry"),
            412,
            "publish job is not failed",
        ),
    ];
    for (method, path, status, detail) in cases {
        s.call(method, &path, &w, &Value::Null)
            .assert_problem(status, detail);
    }
    let r = s.call(
        "POST",
        &format!("/v1/publish-jobs/{id}/retry"),
        &am,
        &Value::Null,
    );
    r.assert_problem(403, "content.write");
    let r = s.request("POST", &format!("/v1/publish-jobs/{id}/retry"), &[], b"");
    r.assert_problem(401, "missing bearer token");
}

/// Replaces the stored bytes of the single chunk of `data` (which is smaller than a chunk).
/// The API has no way to make a publish step fail, so this test damages stored bytes the way a
/// disk fault would, with the server stopped.
fn overwrite_chunk(db: &Path, data: &[u8], with: &[u8]) {
    assert!(data.len() < CHUNK_SIZE);
    let key: [u8; 32] = *blake3::hash(data).as_bytes();
    let db = redb::Database::open(db).expect("opening the stopped server's database");
    let txn = db.begin_write().unwrap();
    {
        let mut t = txn.open_table(CHUNKS).unwrap();
        let old = t.insert(&key, with).unwrap();
        assert!(old.is_some(), "the chunk was not stored under its BLAKE3");
    }
    txn.commit().unwrap();
}

/// A real failed job: the disk blob's only chunk is damaged, so `incus_index` (which reads and
/// verifies the bytes) fails. Then retry semantics, and a successful retry once the bytes are
/// repaired.
#[test]
fn failed_job_retry_semantics() {
    let mut s = Server::start();
    let w = s.writer_token();
    let disk = bytes(5000, 11);
    let meta = bytes(300, 12);
    let art = draft_with_artifact(&s, &w, "img", "1.0", &disk);
    s.upload(&w, &meta);
    attach(&s, &w, "img", "1.0", &art, &meta);
    s.kill9();
    let mut damaged = disk.clone();
    damaged[0] ^= 0xff;
    overwrite_chunk(&s.db_path(), &disk, &damaged);
    s.restart();

    // Publish only checks blob records, so it is accepted; the job then fails.
    let job = json_ok(&publish(&s, &w, "img", "1.0"), 202);
    let id = id_of(&job["id"]);
    let failed = s.wait_job(&w, &id);
    assert_eq!(failed["state"], "failed", "{failed}");
    let msg = failed["failure_message"].as_str().expect("failure_message");
    assert!(msg.contains(&sha256_digest(&disk)), "{msg}");
    let started = ts(&failed["started_at"]);
    assert!(ts(&failed["finished_at"]) >= started);
    let steps = failed["steps"].as_array().unwrap();
    assert_eq!(steps[0]["state"], "succeeded");
    assert_eq!(steps[0]["attempt_count"], 1);
    assert_eq!(steps[1]["state"], "failed");
    assert_eq!(steps[1]["attempt_count"], 1);
    assert_eq!(steps[1]["failure_message"], msg);
    ts(&steps[1]["finished_at"]);
    assert_eq!(steps[2]["state"], "queued");
    assert_eq!(steps[2]["attempt_count"], 0);
    assert!(steps[2].get("started_at").is_none());

    // The version stays `publishing`: visible by exact manifest, nowhere else; publish answers
    // the existing job and aliases refuse it.
    let m = json_ok(&s.get("/v1/images/img/versions/1.0"), 200);
    assert_eq!(m["version"]["state"], "publishing");
    assert!(m["version"].get("published_at").is_none());
    assert_eq!(json_ok(&publish(&s, &w, "img", "1.0"), 200), failed);
    s.get("/v1/images/img/refs/1.0")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/img/versions/1.0/artifacts")
        .assert_problem(404, "catalog not found");
    s.call(
        "PUT",
        "/v1/images/img/aliases/latest",
        &w,
        &json!({"version": "1.0"}),
    )
    .assert_problem(
        412,
        "aliases must target a published version for the same image",
    );

    // Retry: 202, the job queued with failure and finish cleared, the failed step and those
    // after it queued (attempt_count and started_at kept), earlier successes untouched.
    let retry = |s: &Server| {
        s.call(
            "POST",
            &format!("/v1/publish-jobs/{id}/retry"),
            &w,
            &Value::Null,
        )
    };
    let r = json_ok(&retry(&s), 202);
    assert_eq!(r["id"], id.as_str());
    assert_eq!(r["state"], "queued");
    assert!(r.get("finished_at").is_none(), "{r}");
    assert!(r.get("failure_message").is_none(), "{r}");
    assert_eq!(ts(&r["started_at"]), started);
    let rs = r["steps"].as_array().unwrap();
    assert_eq!(rs[0], steps[0]);
    assert_eq!(rs[1]["state"], "queued");
    assert_eq!(rs[1]["attempt_count"], 1);
    assert_eq!(rs[1]["started_at"], steps[1]["started_at"]);
    assert!(rs[1].get("finished_at").is_none(), "{}", rs[1]);
    assert!(rs[1].get("failure_message").is_none(), "{}", rs[1]);
    assert_eq!(rs[2]["state"], "queued");

    // Still damaged: it fails again in the same step, which was attempted twice.
    let again = s.wait_job(&w, &id);
    assert_eq!(again["state"], "failed", "{again}");
    assert_eq!(again["steps"][0], steps[0]);
    assert_eq!(again["steps"][1]["attempt_count"], 2);

    // Repair the bytes; a retry now publishes.
    s.kill9();
    overwrite_chunk(&s.db_path(), &disk, &disk);
    s.restart();
    json_ok(&retry(&s), 202);
    let done = s.wait_job(&w, &id);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["steps"][1]["attempt_count"], 3);
    assert_eq!(done["steps"][2]["attempt_count"], 1);
    assert!(done.get("failure_message").is_none());
    let m = json_ok(&s.get("/v1/images/img/versions/1.0"), 200);
    assert_eq!(m["version"]["state"], "published");
    let aid = art["id"].as_str().unwrap();
    let dl = s.get(&format!(
        "/v1/images/img/versions/1.0/artifacts/{aid}/download"
    ));
    assert_eq!(dl.status, 200);
    assert!(dl.body == disk);
    retry(&s).assert_problem(412, "publish job is not failed");
}
