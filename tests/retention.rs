//! Retiring published versions (`DELETE` of a version) and retention policies, over HTTP
//! against the real binary: what disappears at once, what stays downloadable for the grace
//! period, what is reclaimed after it, and what is never retired.

use crate::util::*;
use serde_json::{Value, json};
use std::time::Duration;

const INDEX: &str = "/streams/v1/index.json";
const IMAGES: &str = "/streams/v1/images.json";

fn versions(s: &Server, image: &str) -> Vec<String> {
    let r = s.get(&format!("/v1/images/{image}/versions"));
    if r.status == 404 {
        return Vec::new();
    }
    json_ok(&r, 200)["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_str().unwrap().to_string())
        .collect()
}

fn metrics(s: &Server) -> String {
    raw_request(&metrics_addr(s), "GET", "/metrics", &[], None).text()
}

/// `(version, reason)` of each entry of a retention preview's `keep` or `retire` list.
fn decisions(list: &Value) -> Vec<(&str, &str)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["version"].as_str().unwrap(),
                k["reason"].as_str().unwrap(),
            )
        })
        .collect()
}

/// The download URLs of a published version's first artifact: by id, by file name, and of its
/// first attachment.
fn download_urls(image: &str, manifest: &Value) -> [String; 3] {
    let version = manifest["version"]["version"].as_str().unwrap();
    let a = &manifest["artifacts"][0];
    let aid = a["artifact"]["id"].as_str().unwrap();
    let tid = a["attachments"][0]["id"].as_str().unwrap();
    let base = format!("/v1/images/{image}/versions/{version}/artifacts/{aid}");
    [
        format!("{base}/download"),
        format!("{base}/download/disk.qcow2"),
        format!("{base}/attachments/{tid}/download/incus.tar.xz"),
    ]
}

#[test]
fn retired_version_leaves_the_catalog_at_once_and_its_files_after_the_grace() {
    // Upload sessions hold their blobs until they expire: a short TTL lets collection run
    // within the test once the grace has passed.
    let s = Server::start_with(&[
        "--retire-grace",
        "5s",
        "--upload-ttl",
        "5s",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let w = s.writer_token();
    let disk_old = bytes(3000, 1);
    let disk_new = bytes(3000, 2);
    // Both versions share the metadata bytes: the shared blob must survive the retirement.
    let meta = b"shared incus metadata".to_vec();
    let old = s.publish_image(&w, "ret", "1.0", &disk_old, &meta);
    s.publish_image(&w, "ret", "2.0", &disk_new, &meta);
    s.put_alias(&w, "ret", "latest", "2.0");
    s.put_alias(&w, "ret", "stable", "1.0");
    s.put_alias(&w, "ret", "old", "1.0");

    // Aliased: 409 naming every alias; nothing changes.
    s.retire(&w, "ret", "1.0").assert_problem(
        409,
        "is the target of aliases old, stable; move or delete them first",
    );
    assert_eq!(versions(&s, "ret"), ["2.0", "1.0"]);
    for a in ["old", "stable"] {
        assert_eq!(s.delete_alias(&w, "ret", a).status, 204);
    }
    // Without a token, and with a token that may not write: nothing changes either.
    s.retire("", "ret", "1.0")
        .assert_problem(401, "invalid bearer token");
    let reader = s.token_with_roles(&[]);
    s.retire(&reader, "ret", "1.0")
        .assert_problem(403, "content.write");

    let index_before = s.get(INDEX);
    let images_before = s.get(IMAGES);
    assert!(images_before.text().contains("ret:1.0:amd64:default"));
    assert!(index_before.text().contains("ret:1.0:amd64:default"));

    let r = s.retire(&w, "ret", "1.0");
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());

    // Gone from every catalog read at once.
    assert_eq!(versions(&s, "ret"), ["2.0"]);
    s.get("/v1/images/ret/versions/1.0")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/ret/refs/1.0")
        .assert_problem(404, "catalog not found");
    s.get(&format!(
        "/v1/images/ret/versions/1.0/artifacts/{}",
        old.artifact_id.as_str()
    ))
    .assert_problem(404, "catalog not found");
    for (doc, before) in [(INDEX, &index_before), (IMAGES, &images_before)] {
        let after = s.get(doc);
        assert_eq!(after.status, 200);
        assert!(
            !after.text().contains("ret:1.0:"),
            "{doc}: {}",
            after.text()
        );
        assert!(after.text().contains("ret:2.0:amd64:default"), "{doc}");
        assert_ne!(after.header("ETag"), before.header("ETag"), "{doc}");
    }
    // The name stays reserved, and a second DELETE is a 404.
    s.request_version(&w, "ret", "1.0")
        .assert_problem(409, "was retired at");
    s.retire(&w, "ret", "1.0")
        .assert_problem(404, "already retired");

    // Within the grace, every direct download URL still serves the bytes.
    let urls = download_urls("ret", &old.manifest);
    let disk_blob = format!("/v1/blobs/{}", sha256_digest(&disk_old));
    let meta_blob = format!("/v1/blobs/{}", sha256_digest(&meta));
    for url in urls.iter().take(2).chain([&disk_blob]) {
        let r = s.get(url);
        assert_eq!(r.status, 200, "{url}: {}", r.text());
        assert_eq!(r.body, disk_old, "{url}");
    }
    let r = s.get(&urls[2]);
    assert_eq!((r.status, &r.body), (200, &meta), "{}", urls[2]);
    let r = s.get_with(&urls[0], &[("Range", "bytes=10-19")]);
    assert_eq!((r.status, &r.body[..]), (206, &disk_old[10..20]));

    // Logged with who and why, and counted.
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("version retired"))
        .unwrap_or_else(|| panic!("no retirement log line:\n{log}"));
    assert!(
        line.contains("version=1.0") && line.contains("image=ret"),
        "{line}"
    );
    assert!(line.contains("retired_by=principal:"), "{line}");
    assert!(line.contains("reason=\"retired by request\""), "{line}");
    let m = metrics(&s);
    assert!(
        m.contains("imgsrv_versions_retired_total{reason=\"request\"} 1\n"),
        "{m}"
    );
    assert!(m.contains("imgsrv_versions_retired_total{reason=\"policy\"} 0\n"));

    // After the grace: the catalog URLs answer 410, and the bytes only the retired version
    // used are reclaimed; the shared metadata blob and the other version stay.
    wait_until(20, "the grace has passed", || s.get(&urls[0]).status == 410);
    s.get(&urls[1]).assert_problem(410, "was retired at");
    s.get(&urls[2])
        .assert_problem(410, "its files were downloadable until");
    let h = s.head(&urls[0]);
    assert_eq!(h.status, 410);
    assert!(h.body.is_empty());
    wait_until(20, "the retired disk is collected", || {
        s.get(&disk_blob).status == 404
    });
    let r = s.get(&meta_blob);
    assert_eq!((r.status, &r.body), (200, &meta));
    let r = s.get(&format!("/v1/blobs/{}", sha256_digest(&disk_new)));
    assert_eq!((r.status, &r.body), (200, &disk_new));
    assert_eq!(versions(&s, "ret"), ["2.0"]);
    // The name is still reserved after the purge, and the log says the sweeper purged it.
    s.request_version(&w, "ret", "1.0")
        .assert_problem(409, "a retired version's name is never reused");
    assert!(s.log_text().contains("sweeper purged 1 retired versions"));
}

#[test]
fn only_published_versions_are_retired() {
    let s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", b"disk-1", b"meta-1");
    draft_with_artifact(&s, &w, "img", "2.0-draft", b"disk-2");
    s.retire(&w, "img", "2.0-draft")
        .assert_problem(409, "is a draft");
    // The draft is untouched: still there and still editable.
    let m = json_ok(&s.get("/v1/images/img/versions/2.0-draft"), 200);
    assert_eq!(m["version"]["state"], "draft");
    s.retire(&w, "img", "9.9")
        .assert_problem(404, "catalog not found");
    s.retire(&w, "nope", "1.0")
        .assert_problem(404, "catalog not found");
    s.retire(&w, "Bad", "1.0")
        .assert_problem(400, "image name must match");
    // The newest (and only) published version may be retired by request when no alias
    // points at it; the image then disappears from the public listings.
    assert_eq!(s.retire(&w, "img", "1.0").status, 204);
    s.get("/v1/images/img")
        .assert_problem(404, "catalog not found");
    assert_eq!(json_ok(&s.get("/v1/images"), 200), json!({"images": []}));
}

#[test]
fn retention_policy_crud_and_validation() {
    let s = Server::start();
    let w = s.writer_token();
    let put = |image: &str, body: Value| s.put_retention(&w, image, &body);
    put("nope", json!({"keep_last": 3})).assert_problem(404, "catalog not found");
    s.create_image(&w, &json!({"name": "pol"}));
    s.get("/v1/images/pol/retention")
        .assert_problem(404, "has no retention policy");
    for (body, detail) in [
        (json!({}), "give keep_last, keep_days or both"),
        (json!({"keep_last": 0}), "keep_last must be between 1 and"),
        (json!({"keep_days": -1}), "keep_days must be between 1 and"),
        (
            json!({"keep_days": 36501}),
            "keep_days must be between 1 and",
        ),
        (json!({"keep_last": 1, "keep": 2}), "unknown field"),
        (json!({"keep_last": "3"}), "invalid JSON request body"),
        (json!([3]), "invalid JSON request body"),
    ] {
        put("pol", body).assert_problem(400, detail);
    }
    s.put_retention("", "pol", &json!({"keep_last": 3}))
        .assert_problem(401, "invalid bearer token");

    // Set before the image has any published version; read anonymously.
    let j = json_ok(&put("pol", json!({"keep_last": 3, "keep_days": 30})), 200);
    assert_eq!(
        (j["keep_last"].clone(), j["keep_days"].clone()),
        (json!(3), json!(30))
    );
    ts(&j["updated_at"]);
    assert_eq!(json_ok(&s.get("/v1/images/pol/retention"), 200), j);
    // Replaced whole: an omitted rule is unset.
    let j = json_ok(&put("pol", json!({"keep_days": 7})), 200);
    assert_eq!(j.get("keep_last"), None, "{j}");
    assert_eq!(
        json_ok(&s.get("/v1/images/pol/retention"), 200)["keep_days"],
        7
    );

    let del = |token: &str| s.call("DELETE", "/v1/images/pol/retention", token, &Value::Null);
    del("").assert_problem(401, "invalid bearer token");
    assert_eq!(del(&w).status, 204);
    s.get("/v1/images/pol/retention")
        .assert_problem(404, "has no retention policy");
    del(&w).assert_problem(404, "has no retention policy");
}

#[test]
fn keep_last_runs_after_publish_and_spares_aliases_and_the_newest() {
    let s = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let w = s.writer_token();
    s.publish_image(&w, "app", "1", b"disk-1", b"meta");
    s.publish_image(&w, "app", "2", b"disk-2", b"meta");
    s.put_alias(&w, "app", "stable", "1");
    json_ok(&s.put_retention(&w, "app", &json!({"keep_last": 1})), 200);

    // The stored policy, previewed: 2 is the newest, 1 carries an alias; nothing to retire.
    let preview = || json_ok(&s.preview_retention(&w, "app", &Value::Null), 200);
    let p = preview();
    assert_eq!(p["retire"], json!([]), "{p}");
    assert_eq!(
        decisions(&p["keep"]),
        [
            ("2", "newest published version"),
            ("1", "alias target (stable)")
        ]
    );
    assert_eq!(p["policy"]["keep_last"], 1);
    ts(&p["evaluated_at"]);

    // Publishing 3 applies the policy at once: 2 is beyond the newest 1 and unprotected.
    s.publish_image(&w, "app", "3", b"disk-3", b"meta");
    assert_eq!(versions(&s, "app"), ["3", "1"]);
    s.get("/v1/images/app/versions/2")
        .assert_problem(404, "catalog not found");
    let log = s.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("version retired") && l.contains("version=2"))
        .unwrap_or_else(|| panic!("no retirement line:\n{log}"));
    assert!(line.contains("retired_by=retention-policy"), "{line}");
    assert!(line.contains("not among the newest 1"), "{line}");

    // Once the alias goes, the sweeper retires 1 as well; 3, the newest, always stays.
    assert_eq!(s.delete_alias(&w, "app", "stable").status, 204);
    wait_until(20, "the sweeper applies the policy", || {
        versions(&s, "app") == ["3"]
    });
    let m = metrics(&s);
    assert!(
        m.contains("imgsrv_versions_retired_total{reason=\"policy\"} 2\n"),
        "{m}"
    );
    assert!(m.contains("imgsrv_versions_retired_total{reason=\"request\"} 0\n"));
    let p = preview();
    assert_eq!(p["retire"], json!([]));
    assert_eq!(p["keep"][0]["version"], "3");
}

#[test]
fn preview_of_a_proposed_policy_changes_nothing() {
    let s = Server::start();
    let w = s.writer_token();
    for v in ["1", "2", "3"] {
        s.publish_image(&w, "pre", v, format!("disk-{v}").as_bytes(), b"meta");
    }
    let preview = |body: Value| s.preview_retention(&w, "pre", &body);
    // No stored policy and no body: nothing to preview.
    preview(Value::Null).assert_problem(404, "has no retention policy");
    preview(json!({"keep_last": 0})).assert_problem(400, "keep_last must be between");
    s.preview_retention("", "pre", &json!({"keep_last": 1}))
        .assert_problem(401, "invalid bearer token");

    let p = json_ok(&preview(json!({"keep_last": 2})), 200);
    assert_eq!(
        decisions(&p["retire"]),
        [("1", "retention policy: not among the newest 2")]
    );
    assert_eq!(p["keep"].as_array().unwrap().len(), 2);

    // keep_days counts from publish time: versions published moments ago are all young, so
    // with both rules nothing is retired (a version must break both), and keep_days alone
    // keeps them too.
    let p = json_ok(&preview(json!({"keep_last": 1, "keep_days": 1})), 200);
    assert_eq!(p["retire"], json!([]), "{p}");
    assert_eq!(p["keep"][1]["reason"], "published less than 1 day ago");
    let p = json_ok(&preview(json!({"keep_days": 30})), 200);
    assert_eq!(p["retire"], json!([]), "{p}");

    // Nothing changed: no policy stored, every version still listed.
    s.get("/v1/images/pre/retention")
        .assert_problem(404, "has no retention policy");
    assert_eq!(versions(&s, "pre"), ["3", "2", "1"]);
    // A stored keep_days policy leaves young versions alone through publishes and sweeps.
    json_ok(&s.put_retention(&w, "pre", &json!({"keep_days": 1})), 200);
    s.publish_image(&w, "pre", "4", b"disk-4", b"meta");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(versions(&s, "pre"), ["4", "3", "2", "1"]);
}
