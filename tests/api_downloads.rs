//! Blob and catalog downloads (docs/api.md section 6 and decision 6): representation headers,
//! ranges, conditional requests, HEAD and errors, identically on every download route.

use crate::util::*;
use serde_json::{Value, json};
use std::time::{SystemTime, UNIX_EPOCH};

const UNKNOWN: &str = "00000000-0000-4000-8000-000000000000";
const CACHE: &str = "public, max-age=31536000, immutable";

/// One download route and what it must describe.
struct Target {
    path: String,
    data: Vec<u8>,
    etag: String,
    content_type: String,
    /// Unix seconds of Last-Modified.
    last_modified: i64,
    filename: Option<String>,
}

fn http_date_secs(s: &str) -> i64 {
    let t = httpdate::parse_http_date(s).unwrap_or_else(|e| panic!("bad HTTP-date {s:?}: {e}"));
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn http_date(secs: i64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
}

/// Publishes `img` 1.0 with a disk of `disk_len` bytes and returns the six routes that serve
/// its bytes (two blobs, and each catalog download with and without its file name).
fn fixture(s: &Server, w: &str, disk_len: usize) -> Vec<Target> {
    let disk = bytes(disk_len, 21);
    let meta = bytes(2000, 22);
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let m = s.publish_image(w, "img", "1.0", &disk, &meta);
    let a = &m.manifest["artifacts"][0]["artifact"];
    let t = &m.manifest["artifacts"][0]["attachments"][0];
    let aid = a["id"].as_str().unwrap();
    let tid = t["id"].as_str().unwrap();
    let art_lm = ts(&a["updated_at"]).unix_timestamp();
    let att_lm = ts(&t["updated_at"]).unix_timestamp();
    let base = format!("/v1/images/img/versions/1.0/artifacts/{aid}");
    let blob = |data: &Vec<u8>| Target {
        path: format!("/v1/blobs/{}", sha256_digest(data)),
        data: data.clone(),
        etag: format!("\"{}\"", sha256_digest(data)),
        content_type: "application/octet-stream".into(),
        // Filled in below from a HEAD request.
        last_modified: 0,
        filename: None,
    };
    let art = |suffix: &str| Target {
        path: format!("{base}/download{suffix}"),
        data: disk.clone(),
        etag: format!("\"{}\"", sha256_digest(&disk)),
        content_type: "application/x-qemu-disk".into(),
        last_modified: art_lm,
        filename: Some("disk.qcow2".into()),
    };
    let att = |suffix: &str| Target {
        path: format!("{base}/attachments/{tid}/download{suffix}"),
        data: meta.clone(),
        etag: format!("\"{}\"", sha256_digest(&meta)),
        content_type: "application/x-xz".into(),
        last_modified: att_lm,
        filename: Some("incus.tar.xz".into()),
    };
    let mut targets = vec![
        blob(&disk),
        blob(&meta),
        art(""),
        art("/disk.qcow2"),
        att(""),
        att("/incus.tar.xz"),
    ];
    // Blob Last-Modified is the verification time: between the upload and now.
    for t in &mut targets[..2] {
        let lm = http_date_secs(s.head(&t.path).header("Last-Modified").unwrap());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(lm >= before && lm <= now, "{lm} not in {before}..={now}");
        t.last_modified = lm;
    }
    targets
}

/// The representation headers every 200/206 (and HEAD) carries.
fn assert_repr(t: &Target, r: &Resp) {
    assert_eq!(r.header("ETag"), Some(t.etag.as_str()), "{}", t.path);
    assert_eq!(
        r.header("Content-Type"),
        Some(t.content_type.as_str()),
        "{}",
        t.path
    );
    assert_eq!(r.header("Cache-Control"), Some(CACHE), "{}", t.path);
    assert_eq!(r.header("Accept-Ranges"), Some("bytes"), "{}", t.path);
    let lm = r.header("Last-Modified").expect("Last-Modified");
    assert!(lm.ends_with(" GMT"), "{lm}");
    assert_eq!(http_date_secs(lm), t.last_modified, "{}", t.path);
    let cd = t
        .filename
        .as_ref()
        .map(|f| format!("attachment; filename=\"{f}\""));
    assert_eq!(r.header("Content-Disposition"), cd.as_deref(), "{}", t.path);
}

#[test]
fn full_downloads_and_head() {
    let s = Server::start();
    let w = s.writer_token();
    for t in fixture(&s, &w, 2 * CHUNK_SIZE + 1000) {
        let r = s.get(&t.path);
        assert_eq!(r.status, 200, "{}: {}", t.path, r.text());
        assert_repr(&t, &r);
        assert_eq!(
            r.header("Content-Length"),
            Some(t.data.len().to_string().as_str())
        );
        assert_eq!(r.header("Content-Range"), None);
        assert_eq!(r.header("Transfer-Encoding"), None);
        assert!(r.body == t.data, "{}: body differs", t.path);

        let h = s.head(&t.path);
        assert_eq!(h.status, 200);
        assert_repr(&t, &h);
        assert_eq!(
            h.header("Content-Length"),
            Some(t.data.len().to_string().as_str())
        );
        assert!(h.body.is_empty(), "{}: HEAD sent a body", t.path);
    }
}

#[test]
fn blob_media_type_comes_from_the_upload_hint() {
    let s = Server::start();
    let w = s.writer_token();
    let data = bytes(50, 23);
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": sha256_digest(&data), "expected_size_bytes": 50,
                "media_type_hint": "application/x-test"}),
    );
    let id = json_ok(&r, 201)["id"].as_str().unwrap().to_string();
    let e = json_ok(&put_part(&s, &w, &id, "1", &data), 200)["etag"].clone();
    let r = s.call(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        &w,
        &json!({"parts": [{"number": 1, "etag": e, "size_bytes": 50}]}),
    );
    assert_eq!(json_ok(&r, 200)["state"], "ready");
    let r = s.get(&format!("/v1/blobs/{}", sha256_digest(&data)));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Type"), Some("application/x-test"));

    // An empty blob downloads as an empty 200, and any range on it is 416.
    let d = s.upload(&w, b"");
    let r = s.get(&format!("/v1/blobs/{d}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Length"), Some("0"));
    assert!(r.body.is_empty());
    for range in ["bytes=0-0", "bytes=-1", "bytes=0-"] {
        let r = s.get_with(&format!("/v1/blobs/{d}"), &[("Range", range)]);
        r.assert_problem(416, "range is unsatisfiable for an empty blob");
        assert_eq!(r.header("Content-Range"), Some("bytes */0"));
    }
    // The grammar checks before the size: a list is still "multiple ranges".
    let r = s.get_with(&format!("/v1/blobs/{d}"), &[("Range", "bytes=0-1,2-3")]);
    r.assert_problem(416, "multiple ranges are not supported");
}

#[test]
fn ranges() {
    let s = Server::start();
    let w = s.writer_token();
    // Two chunks, so that a range can straddle the boundary.
    for t in fixture(&s, &w, CHUNK_SIZE + 1000) {
        let n = t.data.len();
        // The chunk boundary where there is one, else the middle.
        let c = if n > CHUNK_SIZE + 10 {
            CHUNK_SIZE
        } else {
            n / 2
        };
        // (Range header, served start..end or None for a full 200)
        let ok: Vec<(String, Option<(usize, usize)>)> = vec![
            ("bytes=0-0".into(), Some((0, 1))),
            ("bytes=0-99".into(), Some((0, 100))),
            ("bytes=100-".into(), Some((100, n))),
            (format!("bytes={}-", n - 1), Some((n - 1, n))),
            ("bytes=-100".into(), Some((n - 100, n))),
            (format!("bytes=-{n}"), Some((0, n))),
            (format!("bytes=-{}", n + 5), Some((0, n))),
            (format!("bytes=10-{}", n + 100), Some((10, n))),
            (format!("bytes=0-{}", n - 1), Some((0, n))),
            (
                format!("bytes={}-{}", c - 10, c + 10),
                Some((c - 10, c + 11)),
            ),
            ("".into(), None),
            ("   ".into(), None),
        ];
        for (range, want) in ok {
            let r = s.get_with(&t.path, &[("Range", &range)]);
            match want {
                Some((a, b)) => {
                    assert_eq!(r.status, 206, "{} {range}: {}", t.path, r.text());
                    assert_eq!(
                        r.header("Content-Range"),
                        Some(format!("bytes {a}-{}/{n}", b - 1).as_str()),
                        "{range}"
                    );
                    assert_eq!(
                        r.header("Content-Length"),
                        Some((b - a).to_string().as_str())
                    );
                    assert!(r.body == t.data[a..b], "{} {range}: wrong bytes", t.path);
                }
                None => {
                    assert_eq!(r.status, 200, "{range:?}");
                    assert!(r.body == t.data);
                }
            }
            assert_repr(&t, &r);
        }

        let bad: Vec<(String, &str)> = vec![
            ("items=0-1".into(), "range unit must be bytes"),
            ("Bytes=0-1".into(), "range unit must be bytes"),
            ("0-1".into(), "range unit must be bytes"),
            ("bytes=".into(), "range must not be empty"),
            ("bytes=0-1,3-4".into(), "multiple ranges are not supported"),
            ("bytes=0-1,".into(), "multiple ranges are not supported"),
            (
                "bytes=-0".into(),
                "suffix range must use a positive integer length",
            ),
            (
                "bytes=-x".into(),
                "suffix range must use a positive integer length",
            ),
            (
                "bytes=-".into(),
                "suffix range must use a positive integer length",
            ),
            (
                "bytes=x-5".into(),
                "range start must be a non-negative integer",
            ),
            (
                "bytes=1.5-".into(),
                "range start must be a non-negative integer",
            ),
            (format!("bytes={n}-"), "range start exceeds blob size"),
            (
                format!("bytes={}-{}", n + 1, n + 2),
                "range start exceeds blob size",
            ),
            (
                "bytes=1-x".into(),
                "range end must be a non-negative integer",
            ),
            (
                "bytes=1--2".into(),
                "range end must be a non-negative integer",
            ),
            (
                "bytes=5-4".into(),
                "range end must be greater than or equal to range start",
            ),
            ("bytes=5".into(), "range must use start-end syntax"),
        ];
        for (range, detail) in bad {
            let r = s.get_with(&t.path, &[("Range", &range)]);
            assert_eq!(r.status, 416, "{} {range}: {}", t.path, r.text());
            r.assert_problem(416, detail);
            assert_eq!(r.json()["title"], "Range Not Satisfiable");
            assert_eq!(
                r.header("Content-Range"),
                Some(format!("bytes */{n}").as_str()),
                "{range}"
            );
            // HEAD: the same status and headers, an empty body, and still problem+json.
            let h = s.request("HEAD", &t.path, &[("Range", &range)], b"");
            assert_eq!(h.status, 416);
            assert_eq!(h.header("Content-Type"), Some("application/problem+json"));
            assert_eq!(
                h.header("Content-Range"),
                Some(format!("bytes */{n}").as_str())
            );
            assert!(h.body.is_empty());
        }

        // HEAD with a range: 206 headers, no body.
        let h = s.request("HEAD", &t.path, &[("Range", "bytes=5-14")], b"");
        assert_eq!(h.status, 206);
        assert_eq!(
            h.header("Content-Range"),
            Some(format!("bytes 5-14/{n}").as_str())
        );
        assert_eq!(h.header("Content-Length"), Some("10"));
        assert_repr(&t, &h);
        assert!(h.body.is_empty());
    }
}

fn assert_304(t: &Target, r: &Resp, what: &str) {
    assert_eq!(r.status, 304, "{} {what}: {}", t.path, r.text());
    assert_eq!(r.header("ETag"), Some(t.etag.as_str()), "{what}");
    assert_eq!(r.header("Cache-Control"), Some(CACHE), "{what}");
    assert_eq!(r.header("Accept-Ranges"), Some("bytes"), "{what}");
    assert!(r.header("Last-Modified").is_some(), "{what}");
    assert_eq!(r.header("Content-Type"), None, "{what}");
    assert_eq!(r.header("Content-Length"), None, "{what}");
    assert!(r.body.is_empty(), "{what}");
}

#[test]
fn conditional_requests() {
    let s = Server::start();
    let w = s.writer_token();
    for t in fixture(&s, &w, 3000) {
        let lm = t.last_modified;
        let weak = format!("W/{}", t.etag);
        let list = format!("\"nope\", {}", t.etag);
        let list_weak = format!("\"a\",W/{} , \"b\"", t.etag);
        let at = http_date(lm);
        let later = http_date(lm + 86400);
        let earlier = http_date(lm - 1);
        // (headers, whether the answer is 304)
        let cases: Vec<(Vec<(&str, &str)>, bool)> = vec![
            (vec![("If-None-Match", &t.etag)], true),
            (vec![("If-None-Match", &weak)], true),
            (vec![("If-None-Match", &list)], true),
            (vec![("If-None-Match", &list_weak)], true),
            (vec![("If-None-Match", "*")], true),
            (vec![("If-None-Match", "\"other\"")], false),
            (vec![("If-None-Match", "W/\"other\"")], false),
            // If-None-Match alone decides: a non-match ignores If-Modified-Since.
            (
                vec![
                    ("If-None-Match", "\"other\""),
                    ("If-Modified-Since", &later),
                ],
                false,
            ),
            (
                vec![("If-None-Match", &t.etag), ("If-Modified-Since", &earlier)],
                true,
            ),
            (vec![("If-Modified-Since", &at)], true),
            (vec![("If-Modified-Since", &later)], true),
            (vec![("If-Modified-Since", &earlier)], false),
            (vec![("If-Modified-Since", "yesterday")], false),
            // The conditional is evaluated before the range, even an invalid one.
            (
                vec![("If-None-Match", &t.etag), ("Range", "bytes=0-9")],
                true,
            ),
            (vec![("If-None-Match", &t.etag), ("Range", "bytes=x")], true),
        ];
        for (headers, not_modified) in &cases {
            for method in ["GET", "HEAD"] {
                let r = s.request(method, &t.path, headers, b"");
                if *not_modified {
                    assert_304(&t, &r, &format!("{method} {headers:?}"));
                } else {
                    assert_eq!(r.status, 200, "{} {method} {headers:?}", t.path);
                    assert_repr(&t, &r);
                    if method == "GET" {
                        assert!(r.body == t.data);
                    }
                }
            }
        }
    }
}

#[test]
fn if_range() {
    let s = Server::start();
    let w = s.writer_token();
    for t in fixture(&s, &w, 3000) {
        let lm = t.last_modified;
        let weak = format!("W/{}", t.etag);
        let at = http_date(lm);
        let later = http_date(lm + 3600);
        let earlier = http_date(lm - 1);
        // (If-Range, Range, whether the range is honoured)
        let cases: Vec<(&str, &str, bool)> = vec![
            (&t.etag, "bytes=0-9", true),
            (&weak, "bytes=0-9", false),
            ("\"other\"", "bytes=0-9", false),
            (&at, "bytes=0-9", true),
            (&later, "bytes=0-9", true),
            (&earlier, "bytes=0-9", false),
            ("not a date", "bytes=0-9", false),
            // An ignored range is never parsed, so even an invalid one yields a full 200.
            ("\"other\"", "bytes=5", false),
        ];
        for (if_range, range, honoured) in cases {
            let r = s.get_with(&t.path, &[("If-Range", if_range), ("Range", range)]);
            if honoured {
                assert_eq!(r.status, 206, "{} If-Range {if_range}", t.path);
                assert!(r.body == t.data[0..10]);
            } else {
                assert_eq!(r.status, 200, "{} If-Range {if_range}", t.path);
                assert_eq!(r.header("Content-Range"), None);
                assert!(r.body == t.data);
            }
            assert_repr(&t, &r);
        }
        // A matching If-Range does not rescue an invalid range.
        let r = s.get_with(&t.path, &[("If-Range", &t.etag), ("Range", "bytes=5")]);
        r.assert_problem(416, "range must use start-end syntax");
    }
}

#[test]
fn download_errors() {
    let s = Server::start();
    let w = s.writer_token();
    let m = s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let (aid, tid) = (m.artifact_id, m.attachment_id);
    // A draft with a downloadable-looking artifact and attachment.
    let draft = draft_with_artifact(&s, &w, "img", "2.0", b"disk");
    let did = draft["id"].as_str().unwrap().to_string();
    let r = s.call(
        "POST",
        &format!("/v1/images/img/versions/2.0/artifacts/{did}/attachments"),
        &w,
        &json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                "blob_digest": sha256_digest(b"meta"), "blob_size_bytes": 4}),
    );
    let dtid = json_ok(&r, 201)["id"].as_str().unwrap().to_string();

    let v1 = "/v1/images/img/versions/1.0/artifacts";
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("/v1/blobs/sha256:{}", "A".repeat(64)),
            400,
            "upload invalid input: digest must match sha256:<64 lowercase hex chars>",
        ),
        ("/v1/blobs/abc".into(), 400, "digest must match"),
        (
            format!("/v1/blobs/sha256:{}", "0".repeat(64)),
            404,
            "not found",
        ),
        (
            format!("{v1}/xyz/download"),
            400,
            "artifact id must be a UUID",
        ),
        (
            format!("{v1}/{aid}/attachments/xyz/download"),
            400,
            "attachment id must be a UUID",
        ),
        (
            format!("{v1}/xyz/attachments/{tid}/download"),
            400,
            "artifact id must be a UUID",
        ),
        (format!("{v1}/{UNKNOWN}/download"), 404, "catalog not found"),
        (
            format!("{v1}/{aid}/attachments/{UNKNOWN}/download"),
            404,
            "catalog not found",
        ),
        (
            format!("/v1/images/img/versions/9.9/artifacts/{aid}/download"),
            404,
            "catalog not found",
        ),
        (
            format!("/v1/images/other/versions/1.0/artifacts/{aid}/download"),
            404,
            "catalog not found",
        ),
        // Drafts are not downloadable.
        (
            format!("/v1/images/img/versions/2.0/artifacts/{did}/download"),
            404,
            "catalog not found",
        ),
        (
            format!("/v1/images/img/versions/2.0/artifacts/{did}/download/disk.qcow2"),
            404,
            "catalog not found",
        ),
        (
            format!("/v1/images/img/versions/2.0/artifacts/{did}/attachments/{dtid}/download"),
            404,
            "catalog not found",
        ),
        (
            format!("/v1/images/img/versions/1.0/artifacts/{did}/download"),
            404,
            "catalog not found",
        ),
        // The trailing file name must be the canonical one.
        (
            format!("{v1}/{aid}/download/disk.raw"),
            404,
            "catalog not found",
        ),
        (
            format!("{v1}/{aid}/download/disk.qcow2.gz"),
            404,
            "catalog not found",
        ),
        (
            format!("{v1}/{aid}/download/DISK.QCOW2"),
            404,
            "catalog not found",
        ),
        (
            format!("{v1}/{aid}/download/download"),
            404,
            "catalog not found",
        ),
        (
            format!("{v1}/{aid}/attachments/{tid}/download/meta.tar.xz"),
            404,
            "catalog not found",
        ),
        (
            format!("{v1}/{aid}/attachments/{tid}/download/disk.qcow2"),
            404,
            "catalog not found",
        ),
    ];
    for (path, status, detail) in &cases {
        let r = s.get(path);
        assert_eq!(r.status, *status, "{path}: {}", r.text());
        r.assert_problem(*status, detail);
        assert_eq!(r.header("Content-Range"), None);
        // HEAD keeps the status and the problem content type, without a body.
        let h = s.head(path);
        assert_eq!(h.status, *status, "HEAD {path}");
        assert_eq!(h.header("Content-Type"), Some("application/problem+json"));
        assert!(h.body.is_empty(), "HEAD {path}");
    }
    // A percent-encoded canonical file name is the same segment.
    let r = s.get(&format!("{v1}/{aid}/download/disk%2Eqcow2"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"disk");
}

#[test]
fn file_name_follows_the_artifact_format() {
    let s = Server::start();
    let w = s.writer_token();
    let disk = bytes(300, 24);
    let d = s.upload(&w, &disk);
    json_ok(
        &s.call("POST", "/v1/images", &w, &json!({"name": "raw"})),
        201,
    );
    json_ok(
        &s.call(
            "POST",
            "/v1/images/raw/versions",
            &w,
            &json!({"version": "1"}),
        ),
        201,
    );
    let mut ids = Vec::new();
    for format in ["raw", "raw.gz"] {
        let r = s.call(
            "POST",
            "/v1/images/raw/versions/1/artifacts",
            &w,
            &json!({"operating_system": "linux", "architecture": "x86_64", "format": format,
                    "primary_blob_digest": d, "primary_blob_size_bytes": 300,
                    "primary_media_type": "application/octet-stream"}),
        );
        ids.push(json_ok(&r, 201)["id"].as_str().unwrap().to_string());
    }
    let job = json_ok(
        &s.call(
            "POST",
            "/v1/images/raw/versions/1/publish",
            &w,
            &Value::Null,
        ),
        202,
    );
    assert_eq!(
        s.wait_job(&w, job["id"].as_str().unwrap())["state"],
        "succeeded"
    );
    for (id, name) in ids.iter().zip(["disk.raw", "disk.raw.gz"]) {
        let base = format!("/v1/images/raw/versions/1/artifacts/{id}/download");
        for path in [base.clone(), format!("{base}/{name}")] {
            let r = s.get(&path);
            assert_eq!(r.status, 200, "{path}");
            assert_eq!(
                r.header("Content-Disposition"),
                Some(format!("attachment; filename=\"{name}\"").as_str())
            );
            assert!(r.body == disk);
        }
        assert_eq!(s.get(&format!("{base}/disk.qcow2")).status, 404);
    }
}
