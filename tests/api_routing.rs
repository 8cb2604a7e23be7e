//! Routing, probes, the OpenAPI document and X-Request-ID (docs/api.md sections 1, 3 and 7).

use crate::util::*;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};

const UNKNOWN: &str = "00000000-0000-4000-8000-000000000000";

fn assert_router_404(r: &Resp, what: &str) {
    assert_eq!(r.status, 404, "{what}: {}", r.text());
    assert!(
        r.header("Content-Type")
            .unwrap_or("")
            .starts_with("text/plain"),
        "{what}: {:?}",
        r.header("Content-Type")
    );
    assert_eq!(r.text().trim_end(), "404 page not found", "{what}");
}

#[test]
fn unknown_paths_are_plain_404() {
    let s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let paths = [
        "/v1",
        "/v1/",
        "/v2/images",
        "/healthz/",
        "/v1/images/",
        "/v1/images/img/",
        "/v1/images/img/versions/",
        "/v1/images//versions",
        "/v1/images/img/versions/1.0/artifacts/x/download/a/b",
        "/v1/uploads/x/parts",
        "/v1/blobs",
        "/streams/v1/",
        "/openapi/v1.json",
        "/V1/images",
        "/v1/auth/oidc-provisioning-rules",
        "/v1/auth/oidc-provisioning-rules/x/reconcile",
        "/v1/images/a%ZZb",
    ];
    for path in paths {
        for method in ["GET", "POST", "DELETE"] {
            let r = s.call(method, path, &w, &Value::Null);
            assert_router_404(&r, &format!("{method} {path}"));
        }
        let h = s.head(path);
        assert_eq!(h.status, 404, "HEAD {path}");
        assert!(h.body.is_empty());
    }
    // Wildcards are percent-decoded single segments.
    assert_eq!(json_ok(&s.get("/v1/images/%69mg"), 200)["name"], "img");
    assert_eq!(
        json_ok(&s.get("/v1/images/img/versions/1%2E0"), 200)["version"]["version"],
        "1.0"
    );
    // A query string is not part of the path (and there are no query parameters).
    assert_eq!(
        json_ok(&s.get("/v1/images?limit=1"), 200)["images"][0]["name"],
        "img"
    );
}

/// Every route in the OpenAPI document, with the methods it documents; a route answers 405
/// with `Allow` to every other method, and never the router's 404 to a documented one.
#[test]
fn openapi_routes_and_405() {
    if !require_tool("python3") {
        return;
    }
    let s = Server::start();
    let w = s.writer_token();
    let doc = s.get("/openapi/v1.yaml");
    assert_eq!(doc.status, 200);
    assert!(
        doc.header("Content-Type").unwrap_or("").contains("yaml"),
        "{:?}",
        doc.header("Content-Type")
    );
    // Parse with a real YAML parser (PyYAML ships with the machine image) and return the
    // version and the documented methods per path as JSON.
    let mut py = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml\n\
             d = yaml.safe_load(sys.stdin)\n\
             print(json.dumps({'openapi': str(d['openapi']), 'paths': {p: sorted(k.upper() for k in v if k != 'parameters') for p, v in d['paths'].items()}}))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin.take().unwrap().write_all(&doc.body).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenAPI document is not valid YAML"
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        parsed["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        parsed["openapi"]
    );
    let paths = parsed["paths"].as_object().unwrap();
    assert!(paths.len() >= 35, "{}", paths.len());

    let all = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"];
    for (template, methods) in paths {
        let path = template
            .replace("{upload_id}", UNKNOWN)
            .replace("{part_number}", "1")
            .replace("{digest}", &sha256_digest(b"none"))
            .replace("{name}", "img")
            .replace("{version}", "1.0")
            .replace("{artifact_id}", UNKNOWN)
            .replace("{attachment_id}", UNKNOWN)
            .replace("{filename}", "disk.qcow2")
            .replace("{job_id}", UNKNOWN)
            .replace("{alias}", "latest")
            .replace("{ref}", "latest")
            .replace("{principal_id}", UNKNOWN)
            .replace("{role_id}", "content-writer")
            .replace("{token_id}", UNKNOWN);
        assert!(!path.contains('{'), "unsubstituted parameter in {template}");
        let mut documented: BTreeSet<String> = methods
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect();
        // Every GET route also answers HEAD.
        if documented.contains("GET") {
            documented.insert("HEAD".into());
        }
        for method in all {
            let r = s.call(method, &path, &w, &Value::Null);
            if documented.contains(method) {
                assert_ne!(r.status, 405, "{method} {template}");
                let router_404 = r.status == 404
                    && r.header("Content-Type")
                        .unwrap_or("")
                        .starts_with("text/plain");
                // The Simple Streams documents are outside this suite (section 9).
                if !template.starts_with("/streams/") {
                    assert!(!router_404, "{method} {template} is not routed");
                }
            } else {
                assert_eq!(r.status, 405, "{method} {template}: {}", r.text());
                assert!(
                    r.header("Content-Type")
                        .unwrap_or("")
                        .starts_with("text/plain"),
                    "{method} {template}"
                );
                if method != "HEAD" {
                    assert_eq!(r.text().trim_end(), "Method Not Allowed");
                }
                let allow: BTreeSet<String> = r
                    .header("Allow")
                    .unwrap_or_else(|| panic!("{method} {template}: no Allow"))
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .collect();
                assert_eq!(allow, documented, "{method} {template}");
            }
        }
    }
}

/// HEAD on every GET route: the same status and headers as GET, and no body.
#[test]
fn head_mirrors_get() {
    let s = Server::start();
    let w = s.writer_token();
    let am = s.bootstrap_token();
    let m = s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let aid = m.artifact_id.as_str();
    let tid = m.attachment_id.as_str();
    let r = s.call(
        "PUT",
        "/v1/images/img/aliases/latest",
        &w,
        &json!({"version": "1.0"}),
    );
    json_ok(&r, 200);
    let job = json_ok(
        &s.call(
            "POST",
            "/v1/images/img/versions/1.0/publish",
            &w,
            &Value::Null,
        ),
        200,
    );
    let upload = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": sha256_digest(b"x")}),
    );
    let uid = json_ok(&upload, 201)["id"].as_str().unwrap().to_string();
    let principals = json_ok(
        &s.call("GET", "/v1/auth/principals", &am, &Value::Null),
        200,
    );
    let pid = principals["principals"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let base = format!("/v1/images/img/versions/1.0/artifacts/{aid}");
    let routes: Vec<(String, Option<&str>)> = vec![
        ("/".into(), None),
        ("/healthz".into(), None),
        ("/readyz".into(), None),
        ("/openapi/v1.yaml".into(), None),
        (format!("/v1/uploads/{uid}"), None),
        (format!("/v1/uploads/{UNKNOWN}"), None),
        (format!("/v1/blobs/{}", sha256_digest(b"disk")), None),
        ("/v1/images".into(), None),
        ("/v1/images/img".into(), None),
        ("/v1/images/img/versions".into(), None),
        ("/v1/images/img/versions/1.0".into(), None),
        ("/v1/images/img/versions/1.0/artifacts".into(), None),
        (base.clone(), None),
        (format!("{base}/download"), None),
        (format!("{base}/download/disk.qcow2"), None),
        (format!("{base}/attachments/{tid}/download"), None),
        (
            format!("{base}/attachments/{tid}/download/incus.tar.xz"),
            None,
        ),
        (
            format!("/v1/publish-jobs/{}", job["id"].as_str().unwrap()),
            Some(&w),
        ),
        ("/v1/images/img/aliases".into(), None),
        ("/v1/images/img/aliases/latest".into(), None),
        ("/v1/images/img/refs/latest".into(), None),
        ("/v1/auth/roles".into(), Some(&am)),
        ("/v1/auth/principals".into(), Some(&am)),
        (format!("/v1/auth/principals/{pid}"), Some(&am)),
        (format!("/v1/auth/principals/{pid}/api-tokens"), Some(&am)),
        ("/v1/auth/roles".into(), None),
        ("/v1/images/nope".into(), None),
    ];
    let comparable = |r: &Resp| -> Vec<(String, String)> {
        let mut h: Vec<(String, String)> = r
            .headers
            .iter()
            .filter(|(k, _)| {
                !k.eq_ignore_ascii_case("Date") && !k.eq_ignore_ascii_case("X-Request-ID")
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        h.sort();
        h
    };
    for (path, token) in &routes {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|a| ("Authorization", a.as_str())).collect();
        let g = s.request("GET", path, &headers, b"");
        let h = s.request("HEAD", path, &headers, b"");
        assert_eq!(h.status, g.status, "HEAD {path}");
        assert_eq!(comparable(&h), comparable(&g), "HEAD {path}");
        assert!(h.body.is_empty(), "HEAD {path} sent a body");
        if g.status != 204 {
            assert_eq!(
                g.header("Content-Length"),
                Some(g.body.len().to_string().as_str()),
                "{path}"
            );
        }
    }
}

#[test]
fn probes() {
    let s = Server::start();
    for path in ["/healthz", "/readyz"] {
        for method in ["GET", "HEAD"] {
            let r = s.request(method, path, &[], b"");
            assert_eq!(r.status, 204, "{method} {path}");
            assert!(r.body.is_empty());
            assert!(r.header("X-Request-ID").is_some());
        }
    }
}

#[test]
fn request_ids() {
    let s = Server::start();
    let long = "x".repeat(128);
    let too_long = "x".repeat(129);
    let visible: String = (0x21u8..=0x7e).map(char::from).collect();
    // (inbound value, echoed value or None for a fresh UUID)
    let cases: Vec<(Option<&str>, Option<&str>)> = vec![
        (Some("abc-123"), Some("abc-123")),
        (Some("  padded  "), Some("padded")),
        (Some(&long), Some(&long)),
        (Some(&visible), Some(&visible)),
        (Some(&too_long), None),
        (Some("has space"), None),
        (Some("tab\there"), None),
        (Some("bell\x07"), None),
        (Some(""), None),
        (None, None),
    ];
    for path in ["/healthz", "/v1/images", "/nope", "/v1/uploads/x"] {
        let mut seen = BTreeSet::new();
        for (inbound, echoed) in &cases {
            let headers: Vec<(&str, &str)> = inbound.iter().map(|v| ("X-Request-ID", *v)).collect();
            let r = s.request("GET", path, &headers, b"");
            let got = r.header("X-Request-ID").expect("X-Request-ID").to_string();
            match echoed {
                Some(e) => assert_eq!(got, *e, "{path} {inbound:?}"),
                None => {
                    let u = uuid::Uuid::parse_str(&got)
                        .unwrap_or_else(|_| panic!("{path} {inbound:?}: {got:?} is not a UUID"));
                    assert_eq!(got, u.hyphenated().to_string());
                    assert!(seen.insert(got), "fresh ids must differ");
                }
            }
        }
    }
}

/// Section 7: every API error is a problem document with exactly `type`, `title` (the reason
/// phrase), `status` and `detail`; never `instance`.
#[test]
fn problem_document_shape() {
    let s = Server::start();
    let w = s.writer_token();
    let am = s.bootstrap_token();
    s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let blob = format!("/v1/blobs/{}", sha256_digest(b"disk"));
    let cases: Vec<(Resp, u16, &str)> = vec![
        (s.get("/v1/uploads/x"), 400, "Bad Request"),
        (
            s.call("POST", "/v1/images", "nope", &json!({"name": "x"})),
            401,
            "Unauthorized",
        ),
        (
            s.call("POST", "/v1/images", &am, &json!({"name": "x"})),
            403,
            "Forbidden",
        ),
        (s.get("/v1/images/none"), 404, "Not Found"),
        (
            s.call("POST", "/v1/images", &w, &json!({"name": "img"})),
            409,
            "Conflict",
        ),
        (
            s.call(
                "POST",
                "/v1/images/img/versions/1.0/artifacts",
                &w,
                &json!({"operating_system": "x", "architecture": "y", "format": "raw",
                        "primary_blob_digest": sha256_digest(b"disk"),
                        "primary_blob_size_bytes": 4, "primary_media_type": "z"}),
            ),
            412,
            "Precondition Failed",
        ),
        (
            s.get_with(&blob, &[("Range", "bytes=9-")]),
            416,
            "Range Not Satisfiable",
        ),
    ];
    for (r, status, title) in cases {
        assert_eq!(r.status, status, "{}", r.text());
        assert_eq!(r.header("Content-Type"), Some("application/problem+json"));
        let j = r.json();
        let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["detail", "status", "title", "type"], "{j}");
        assert_eq!(j["type"], "about:blank");
        assert_eq!(j["title"], title);
        assert_eq!(j["status"], status);
        assert!(!j["detail"].as_str().unwrap().is_empty());
    }
}
