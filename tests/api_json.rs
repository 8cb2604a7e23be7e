//! Strict JSON request bodies (docs/api.md 1.2) on every JSON-body endpoint.

use crate::util::*;
use serde_json::{Value, json};

const PREFIX: &str = "invalid JSON request body";
const MIB: usize = 1024 * 1024;

/// A JSON-body endpoint: method, path, auth token, a valid body and a body with a wrongly
/// typed member.
struct Endpoint {
    method: &'static str,
    path: String,
    token: String,
    valid: Value,
    wrong_type: Value,
}

fn send(s: &Server, e: &Endpoint, body: &[u8], content_type: Option<&str>) -> Resp {
    let auth = format!("Bearer {}", e.token);
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(ct) = content_type {
        headers.push(("Content-Type", ct));
    }
    s.request(e.method, &e.path, &headers, body)
}

fn assert_json_error(r: &Resp, what: &str, contains: &str) {
    assert_eq!(r.status, 400, "{what}: {}", r.text());
    r.assert_problem(400, contains);
    let detail = r.json()["detail"].as_str().unwrap().to_string();
    assert!(detail.starts_with(PREFIX), "{what}: {detail}");
}

fn endpoints(s: &Server) -> Vec<Endpoint> {
    let w = s.writer_token();
    let am = s.bootstrap_token();
    s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let draft = draft_with_artifact(s, &w, "img", "2.0", b"disk");
    let did = draft["id"].as_str().unwrap();
    let upload = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": sha256_digest(b"abc"), "expected_size_bytes": 3}),
    );
    let uid = json_ok(&upload, 201)["id"].as_str().unwrap().to_string();
    let etag = json_ok(&put_part(s, &w, &uid, "1", b"abc"), 200)["etag"].clone();
    let principal = json_ok(
        &s.call(
            "POST",
            "/v1/auth/principals",
            &am,
            &json!({"kind": "user", "display_name": "p"}),
        ),
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let digest = sha256_digest(b"disk");
    let e = |method, path: String, token: &str, valid: Value, wrong_type: Value| Endpoint {
        method,
        path,
        token: token.to_string(),
        valid,
        wrong_type,
    };
    vec![
        e(
            "POST",
            "/v1/uploads".into(),
            &w,
            json!({"expected_digest": digest, "expected_size_bytes": 4}),
            json!({"expected_digest": digest, "expected_size_bytes": "4"}),
        ),
        e(
            "POST",
            format!("/v1/uploads/{uid}/complete"),
            &w,
            json!({"parts": [{"number": 1, "etag": etag, "size_bytes": 3}]}),
            json!({"parts": {"number": 1}}),
        ),
        e(
            "POST",
            "/v1/images".into(),
            &w,
            json!({"name": "new"}),
            json!({"name": 5}),
        ),
        e(
            "POST",
            "/v1/images/img/versions".into(),
            &w,
            json!({"version": "3.0"}),
            json!({"version": 3.0}),
        ),
        e(
            "POST",
            "/v1/images/img/versions/2.0/artifacts".into(),
            &w,
            json!({"operating_system": "debian", "architecture": "x86_64", "format": "raw",
                   "primary_blob_digest": digest, "primary_blob_size_bytes": 4,
                   "primary_media_type": "application/octet-stream"}),
            json!({"operating_system": "debian", "architecture": "x86_64", "format": "raw",
                   "primary_blob_digest": digest, "primary_blob_size_bytes": 4.5,
                   "primary_media_type": "application/octet-stream"}),
        ),
        e(
            "POST",
            format!("/v1/images/img/versions/2.0/artifacts/{did}/attachments"),
            &w,
            json!({"name": "sums", "media_type": "text/plain", "blob_digest": digest,
                   "blob_size_bytes": 4}),
            json!({"name": ["sums"], "media_type": "text/plain", "blob_digest": digest,
                   "blob_size_bytes": 4}),
        ),
        e(
            "PUT",
            "/v1/images/img/aliases/latest".into(),
            &w,
            json!({"version": "1.0"}),
            json!({"version": true}),
        ),
        e(
            "POST",
            "/v1/auth/principals".into(),
            &am,
            json!({"kind": "service", "display_name": "svc"}),
            json!({"kind": "service", "display_name": "svc", "attributes": "x"}),
        ),
        e(
            "POST",
            format!("/v1/auth/principals/{principal}/api-tokens"),
            &am,
            json!({"name": "t", "expires_at": "2099-01-01T00:00:00Z"}),
            json!({"name": 1, "expires_at": "2099-01-01T00:00:00Z"}),
        ),
    ]
}

#[test]
fn every_json_endpoint_is_strict() {
    let s = Server::start();
    for e in endpoints(&s) {
        let what = format!("{} {}", e.method, e.path);
        let valid = serde_json::to_vec(&e.valid).unwrap();

        let mut unknown = e.valid.clone();
        unknown["zzz"] = json!(1);
        let r = send(&s, &e, unknown.to_string().as_bytes(), None);
        assert_json_error(&r, &what, "json: unknown field \"zzz\"");

        for trailing in [
            format!("{} {{}}", e.valid),
            format!("{}x", e.valid),
            format!("{}\n{}", e.valid, e.valid),
        ] {
            let r = send(&s, &e, trailing.as_bytes(), None);
            assert_json_error(&r, &what, "multiple JSON values");
        }

        assert_json_error(&send(&s, &e, b"", None), &what, "EOF");
        assert_json_error(&send(&s, &e, b"   \n", None), &what, PREFIX);
        for broken in [&b"{"[..], b"{\"a\":}", b"nul", b"\xff\xfe"] {
            assert_json_error(&send(&s, &e, broken, None), &what, PREFIX);
        }
        for wrong in [
            e.wrong_type.to_string(),
            "[]".into(),
            "\"text\"".into(),
            "42".into(),
        ] {
            assert_json_error(&send(&s, &e, wrong.as_bytes(), None), &what, PREFIX);
        }

        // Over 1 MiB is refused, valid JSON or not (trailing whitespace pads it).
        let mut big = valid.clone();
        big.resize(MIB + 1, b' ');
        assert_json_error(&send(&s, &e, &big, None), &what, PREFIX);
    }
}

#[test]
fn limits_content_type_and_defaults() {
    let s = Server::start();
    let w = s.writer_token();
    let e = Endpoint {
        method: "POST",
        path: "/v1/images".into(),
        token: w.clone(),
        valid: Value::Null,
        wrong_type: Value::Null,
    };
    // Exactly 1 MiB is accepted; whitespace around the value is fine.
    let mut body = b"\n {\"name\": \"padded\"}".to_vec();
    body.resize(MIB, b' ');
    json_ok(&send(&s, &e, &body, None), 201);
    let mut body = b"{\"name\": \"x\"}".to_vec();
    body.resize(MIB + 1, b'\t');
    let r = send(&s, &e, &body, None);
    assert_json_error(&r, "1 MiB + 1", "too large");

    // The request Content-Type is not checked.
    for (i, ct) in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "nonsense",
    ]
    .iter()
    .enumerate()
    {
        let body = json!({"name": format!("ct-{i}")}).to_string();
        json_ok(&send(&s, &e, body.as_bytes(), Some(ct)), 201);
    }
    let r = s.request(
        "POST",
        "/v1/images",
        &[("Authorization", &format!("Bearer {w}"))],
        b"{\"name\": \"no-ct\"}",
    );
    json_ok(&r, 201);

    // Missing members take zero values, which then meet domain validation.
    s.call("POST", "/v1/images", &w, &json!({}))
        .assert_problem(400, "catalog invalid input: image name must match");
    s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_size_bytes": 1, "expected_digest": ""}),
    )
    .assert_problem(400, "upload invalid input: digest must match");
    // Except the size of a session whose digest comes at complete (decision 18).
    s.call("POST", "/v1/uploads", &w, &json!({}))
        .assert_problem(400, "upload invalid input: expected size is required");
    json_ok(
        &s.call("POST", "/v1/images", &w, &json!({"name": "v"})),
        201,
    );
    s.call("POST", "/v1/images/v/versions", &w, &json!({}))
        .assert_problem(400, "catalog invalid input: version must match");
    // Optional members may be null, which is the same as omitting them.
    let r = s.call(
        "POST",
        "/v1/images",
        &w,
        &json!({"name": "nulls", "display_name": null, "description": null}),
    );
    let j = json_ok(&r, 201);
    assert!(j.get("display_name").is_none() && j.get("description").is_none());
}

/// Regression: serde's derived structs also decode a JSON array of their members in
/// declaration order, so `["sha256:..", 4]` used to begin an upload and `[[1, etag, 3]]`
/// used to complete one. Request structs are JSON objects only, at every depth.
#[test]
fn request_structs_must_be_objects() {
    let s = Server::start();
    let w = s.writer_token();
    let data = b"abc";
    let digest = sha256_digest(data);
    s.call("POST", "/v1/uploads", &w, &json!([digest, 3]))
        .assert_problem(400, PREFIX);
    s.call("POST", "/v1/images", &w, &json!(["positional"]))
        .assert_problem(400, PREFIX);
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": digest, "expected_size_bytes": 3}),
    );
    let id = json_ok(&r, 201)["id"].as_str().unwrap().to_string();
    let etag = json_ok(&put_part(&s, &w, &id, "1", data), 200)["etag"].clone();
    let path = format!("/v1/uploads/{id}/complete");
    let r = s.call("POST", &path, &w, &json!({"parts": [[1, etag, 3]]}));
    assert_json_error(&r, "positional part", PREFIX);
    assert_eq!(
        json_ok(&s.get(&format!("/v1/uploads/{id}")), 200)["state"],
        "uploading"
    );
    let r = s.call(
        "POST",
        &path,
        &w,
        &json!({"parts": [{"number": 1, "etag": etag, "size_bytes": 3, "extra": 1}]}),
    );
    assert_json_error(&r, "unknown nested member", "json: unknown field \"extra\"");
    let r = s.call(
        "POST",
        &path,
        &w,
        &json!({"parts": [{"number": 1, "etag": etag, "size_bytes": 3}]}),
    );
    assert_eq!(json_ok(&r, 200)["state"], "ready");
}

/// JSON has one number type: an integer member accepts an integral number written with a
/// fraction or an exponent (`3.0`, `3e0`), as JSON Schema's `integer` does. A fraction, or a
/// value outside 64 bits, is still a wrong type.
#[test]
fn integral_numbers_are_integers() {
    let s = Server::start();
    let w = s.writer_token();
    let auth = format!("Bearer {w}");
    let post = |path: &str, body: &str| {
        s.request("POST", path, &[("Authorization", &auth)], body.as_bytes())
    };
    let digest = sha256_digest(b"abc");
    for bad in ["3.5", "1e19", "-1e19", "true"] {
        let r = post(
            "/v1/uploads",
            &format!(r#"{{"expected_digest": "{digest}", "expected_size_bytes": {bad}}}"#),
        );
        assert_json_error(&r, bad, PREFIX);
    }
    let r = post(
        "/v1/uploads",
        &format!(r#"{{"expected_digest": "{digest}", "expected_size_bytes": 3.0}}"#),
    );
    let id = json_ok(&r, 201)["id"].as_str().unwrap().to_string();
    assert_eq!(json_ok(&r, 201)["expected_size_bytes"], 3);
    let etag = json_ok(&put_part(&s, &w, &id, "1", b"abc"), 200)["etag"].clone();
    let complete = |number: &str, size: &str| {
        post(
            &format!("/v1/uploads/{id}/complete"),
            &format!(
                r#"{{"parts": [{{"number": {number}, "etag": {etag}, "size_bytes": {size}}}]}}"#
            ),
        )
    };
    assert_json_error(&complete("1.5", "3"), "part number 1.5", PREFIX);
    assert_json_error(&complete("1", "3.25"), "size 3.25", PREFIX);
    assert_eq!(json_ok(&complete("1.0", "3e0"), 200)["state"], "ready");

    json_ok(
        &s.call("POST", "/v1/images", &w, &json!({"name": "img"})),
        201,
    );
    json_ok(
        &s.call(
            "POST",
            "/v1/images/img/versions",
            &w,
            &json!({"version": "1.0"}),
        ),
        201,
    );
    let artifact = |size: &str| {
        post(
            "/v1/images/img/versions/1.0/artifacts",
            &format!(
                r#"{{"operating_system": "debian", "architecture": "x86_64", "format": "raw",
                    "primary_blob_digest": "{digest}", "primary_blob_size_bytes": {size},
                    "primary_media_type": "application/octet-stream"}}"#
            ),
        )
    };
    assert_json_error(&artifact("3.000001"), "artifact size", PREFIX);
    let a = json_ok(&artifact("3.0"), 201);
    assert_eq!(a["primary_blob_size_bytes"], 3);
    let aid = a["id"].as_str().unwrap();
    let attachment = |name: &str, size: &str| {
        post(
            &format!("/v1/images/img/versions/1.0/artifacts/{aid}/attachments"),
            &format!(
                r#"{{"name": "{name}", "media_type": "text/plain", "blob_digest": "{digest}",
                    "blob_size_bytes": {size}}}"#
            ),
        )
    };
    assert_json_error(&attachment("sums", "2.5"), "attachment size", PREFIX);
    let t = json_ok(&attachment("sums", "0.03e2"), 201);
    assert_eq!(t["blob_size_bytes"], 3);
}
