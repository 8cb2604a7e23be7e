//! Upload sessions (docs/api.md 4.1, sections 5 and 8, decisions 2 and 3): begin, parts, complete,
//! abort and get, with every documented error class.

use crate::storage::part_etag;
use crate::util::*;
use serde_json::{Value, json};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use time::OffsetDateTime;

/// A well-formed UUID that names no session.
const UNKNOWN: &str = "00000000-0000-4000-8000-000000000000";

fn begin(s: &Server, w: &str, data: &[u8]) -> Value {
    let r = s.call(
        "POST",
        "/v1/uploads",
        w,
        &json!({"expected_digest": sha256_digest(data), "expected_size_bytes": data.len()}),
    );
    json_ok(&r, 201)
}

fn complete(s: &Server, w: &str, id: &str, body: &Value) -> Resp {
    s.call("POST", &format!("/v1/uploads/{id}/complete"), w, body)
}

/// Sends a part PUT that declares `length` bytes and trickles a few KiB of them until the server
/// answers (which it does before reading the body), so no test sends gigabytes.
fn declared_only_part(s: &Server, w: &str, path: &str, length: u64) -> Resp {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    write!(
        c,
        "PUT {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {w}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n",
        s.addr
    )
    .unwrap();
    // Each block is given time to reach the server and be answered before the next one, so
    // no unread byte is pending when the server closes (which would reset the connection).
    c.set_read_timeout(Some(Duration::from_millis(250)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut first = [0u8; 1];
    loop {
        assert!(
            Instant::now() < deadline,
            "no answer to a {length}-byte part"
        );
        // Write errors are expected once the server has answered and closed.
        let _ = c.write_all(&[0u8; 1024]);
        match c.read(&mut first) {
            Ok(1) => break,
            Ok(_) => panic!("connection closed without an answer"),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading the answer: {e}"),
        }
    }
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut raw = first.to_vec();
    let _ = c.read_to_end(&mut raw);
    parse_response(&raw, false)
}

#[test]
fn begin_creates_a_session() {
    let s = Server::start();
    let w = s.writer_token();
    let data = bytes(100, 1);
    let before = OffsetDateTime::now_utc();
    let j = begin(&s, &w, &data);
    let after = OffsetDateTime::now_utc();
    let id = id_of(&j["id"]);
    assert_eq!(j["expected_digest"], sha256_digest(&data));
    assert_eq!(j["expected_size_bytes"], 100);
    assert_eq!(j["state"], "created");
    // The default upload TTL is 24 h.
    let exp = ts(&j["expires_at"]);
    let ttl = time::Duration::hours(24);
    assert!(
        exp >= before + ttl - time::Duration::seconds(1)
            && exp <= after + ttl + time::Duration::seconds(1),
        "{exp}"
    );
    // Unset optional members are omitted, and there is nothing beyond the documented members.
    let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "expected_digest",
            "expected_size_bytes",
            "expires_at",
            "id",
            "state"
        ]
    );

    // GET is anonymous and shows the same session; the path accepts an uppercase UUID.
    assert_eq!(json_ok(&s.get(&format!("/v1/uploads/{id}")), 200), j);
    let upper = s.get(&format!("/v1/uploads/{}", id.to_uppercase()));
    assert_eq!(json_ok(&upper, 200), j);

    // Hints are echoed; a missing expected_size_bytes is the zero value, which is valid.
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": sha256_digest(b""), "media_type_hint": "application/x-qemu-disk",
                "filename_hint": "disk.qcow2"}),
    );
    let j2 = json_ok(&r, 201);
    assert_eq!(j2["expected_size_bytes"], 0);
    assert_eq!(j2["media_type_hint"], "application/x-qemu-disk");
    assert_eq!(j2["filename_hint"], "disk.qcow2");

    // Begin is not idempotent: the same request mints another session.
    let again = begin(&s, &w, &data);
    assert_ne!(again["id"], j["id"]);
}

#[test]
fn begin_rejects_bad_input() {
    let s = Server::start();
    let w = s.writer_token();
    let good = sha256_digest(b"x");
    let digest_detail = "upload invalid input: digest must match sha256:<64 lowercase hex chars>";
    let cases: Vec<(Value, &str)> = vec![
        // Without a digest (given at complete then, decision 18) the size must be given.
        (
            json!({}),
            "upload invalid input: expected size is required when the digest is given at complete",
        ),
        (json!({"expected_digest": ""}), digest_detail),
        (
            json!({"expected_digest": format!("sha256:{}", "A".repeat(64))}),
            digest_detail,
        ),
        (
            json!({"expected_digest": format!("sha256:{}", "a".repeat(63))}),
            digest_detail,
        ),
        (
            json!({"expected_digest": format!("sha256:{}", "a".repeat(65))}),
            digest_detail,
        ),
        (
            json!({"expected_digest": format!("md5:{}", "a".repeat(32))}),
            digest_detail,
        ),
        (
            json!({"expected_digest": format!("SHA256:{}", "a".repeat(64))}),
            digest_detail,
        ),
        // The digest is checked before the size.
        (
            json!({"expected_digest": "nope", "expected_size_bytes": -1}),
            digest_detail,
        ),
        (
            json!({"expected_digest": good, "expected_size_bytes": -1}),
            "upload invalid input: expected size must be non-negative",
        ),
        (
            json!({"expected_digest": good, "media_type_hint": ""}),
            "media type hint is required",
        ),
        (
            json!({"expected_digest": good, "media_type_hint": " \t "}),
            "media type hint is required",
        ),
        (
            json!({"expected_digest": good, "filename_hint": ""}),
            "filename hint is required",
        ),
        (
            json!({"expected_digest": good, "filename_hint": "\n"}),
            "filename hint is required",
        ),
    ];
    for (body, detail) in cases {
        let r = s.call("POST", "/v1/uploads", &w, &body);
        r.assert_problem(400, detail);
        assert_eq!(r.json()["title"], "Bad Request", "{body}");
    }
}

#[test]
fn begin_short_circuits_on_a_trusted_digest() {
    let s = Server::start();
    let w = s.writer_token();
    let data = bytes(100, 2);
    let first = s.upload_parts(&w, &data, &[(1, 0..100)]);
    assert_eq!(first["state"], "ready");

    // Same digest and size: 200 with a new session id directly in `ready`.
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": sha256_digest(&data), "expected_size_bytes": 100,
                "filename_hint": "x.img"}),
    );
    let j = json_ok(&r, 200);
    let id = id_of(&j["id"]);
    assert_ne!(j["id"], first["id"]);
    assert_eq!(j["state"], "ready");
    assert_eq!(j["filename_hint"], "x.img");
    ts(&j["expires_at"]);
    assert_eq!(json_ok(&s.get(&format!("/v1/uploads/{id}")), 200), j);

    // Same digest, other size: 412 naming both sizes.
    let r = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": sha256_digest(&data), "expected_size_bytes": 101}),
    );
    r.assert_problem(412, "trusted blob size is 100 bytes, expected 101 bytes");
    assert_eq!(r.json()["title"], "Precondition Failed");
}

#[test]
fn part_checks_run_in_the_documented_order() {
    let s = Server::start();
    let w = s.writer_token();
    let id = id_of(&begin(&s, &w, &bytes(10, 3))["id"]);
    let auth = format!("Bearer {w}");
    let body: Option<&[u8]> = Some(b"0123456789");
    let cases: Vec<(String, Option<&[u8]>, u16, &str)> = vec![
        // Upload id first, then part number, then Content-Length, then the session.
        (
            "/v1/uploads/not-a-uuid/parts/1".into(),
            body,
            400,
            "upload id must be a UUID",
        ),
        (
            "/v1/uploads/not-a-uuid/parts/x".into(),
            None,
            400,
            "upload id must be a UUID",
        ),
        (
            format!("/v1/uploads/{{{UNKNOWN}}}/parts/1"),
            body,
            400,
            "upload id must be a UUID",
        ),
        (
            format!("/v1/uploads/{}/parts/1", UNKNOWN.replace('-', "")),
            body,
            400,
            "upload id must be a UUID",
        ),
        (
            format!("/v1/uploads/{id}/parts/abc"),
            body,
            400,
            "part number must be an integer",
        ),
        (
            format!("/v1/uploads/{id}/parts/1.5"),
            body,
            400,
            "part number must be an integer",
        ),
        (
            format!("/v1/uploads/{id}/parts/x"),
            None,
            400,
            "part number must be an integer",
        ),
        (
            format!("/v1/uploads/{id}/parts/0"),
            body,
            400,
            "part number must be between 1 and 10000",
        ),
        (
            format!("/v1/uploads/{id}/parts/-1"),
            body,
            400,
            "part number must be between 1 and 10000",
        ),
        (
            format!("/v1/uploads/{id}/parts/10001"),
            None,
            400,
            "part number must be between 1 and 10000",
        ),
        (
            format!("/v1/uploads/{id}/parts/1"),
            None,
            400,
            "content length is required",
        ),
        (
            format!("/v1/uploads/{UNKNOWN}/parts/1"),
            None,
            400,
            "content length is required",
        ),
        (
            format!("/v1/uploads/{UNKNOWN}/parts/1"),
            body,
            404,
            "upload not found",
        ),
    ];
    for (path, body, status, detail) in cases {
        let r = raw_request(&s.addr, "PUT", &path, &[("Authorization", &auth)], body);
        assert_eq!(r.status, status, "{path}: {}", r.text());
        r.assert_problem(status, detail);
    }

    // Part size: more than 5 GiB is 400 before the session is looked up; exactly 5 GiB passes
    // the size rule and reaches the session lookup.
    let r = declared_only_part(
        &s,
        &w,
        &format!("/v1/uploads/{UNKNOWN}/parts/1"),
        5 * 1024 * 1024 * 1024 + 1,
    );
    r.assert_problem(400, "part size must be at most 5368709120 bytes");
    let r = declared_only_part(
        &s,
        &w,
        &format!("/v1/uploads/{UNKNOWN}/parts/1"),
        5 * 1024 * 1024 * 1024,
    );
    r.assert_problem(404, "upload not found");

    // The bounds themselves are valid part numbers, and none of the above touched the session.
    assert_eq!(
        json_ok(&s.get(&format!("/v1/uploads/{id}")), 200)["state"],
        "created"
    );
    for n in ["1", "10000", "+2"] {
        let r = put_part(&s, &w, &id, n, b"abc");
        json_ok(&r, 200);
    }
}

#[test]
fn parts_upload_replace_and_complete() {
    let s = Server::start();
    let w = s.writer_token();
    let data = bytes(3000, 4);
    let session = begin(&s, &w, &data);
    let id = id_of(&session["id"]);

    // A part answers UploadPart; its etag is the quoted lowercase hex BLAKE3 of its chunk list.
    let r = put_part(&s, &w, &id, "1", &data[..1000]);
    let p = json_ok(&r, 200);
    assert_eq!(p["upload_id"], id.as_str());
    assert_eq!(p["part_number"], 1);
    assert_eq!(p["etag"], part_etag(&data[..1000]));
    assert_eq!(p["size_bytes"], 1000);
    let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["etag", "part_number", "size_bytes", "upload_id"]);
    assert_eq!(
        json_ok(&s.get(&format!("/v1/uploads/{id}")), 200)["state"],
        "uploading"
    );

    // Re-PUT of a number replaces the part: the first bytes were wrong. Parts have no minimum
    // size and may be empty; the uppercase session id is accepted too.
    let wrong = put_part(&s, &w, &id, "3", &bytes(2000, 99)).json();
    let p2 = json_ok(&put_part(&s, &w, &id, "2", b""), 200);
    assert_eq!(p2["size_bytes"], 0);
    assert_eq!(p2["etag"], part_etag(b""));
    let p3 = json_ok(
        &put_part(&s, &w, &id.to_uppercase(), "3", &data[1000..]),
        200,
    );
    assert_ne!(p3["etag"], wrong["etag"]);

    // The stale etag of the replaced part does not complete.
    let stale = json!({"parts": [
        {"number": 1, "etag": p["etag"], "size_bytes": 1000},
        {"number": 2, "etag": p2["etag"], "size_bytes": 0},
        {"number": 3, "etag": wrong["etag"], "size_bytes": 2000},
    ]});
    complete(&s, &w, &id, &stale).assert_problem(412, "etag");

    // Parts may be listed in any order.
    let listed = json!({"parts": [
        {"number": 3, "etag": p3["etag"], "size_bytes": 2000},
        {"number": 1, "etag": p["etag"], "size_bytes": 1000},
        {"number": 2, "etag": p2["etag"], "size_bytes": 0},
    ]});
    let done = json_ok(&complete(&s, &w, &id, &listed), 200);
    assert_eq!(done["state"], "ready");
    assert_eq!(done["id"], id.as_str());
    assert!(done.get("failure_message").is_none(), "{done}");
    assert_eq!(json_ok(&s.get(&format!("/v1/uploads/{id}")), 200), done);

    // The verified blob serves exactly the assembled bytes.
    let b = s.get(&format!("/v1/blobs/{}", sha256_digest(&data)));
    assert_eq!(b.status, 200);
    assert!(b.body == data);

    // Complete is idempotent from `ready`, without re-checking the part list; JSON decoding
    // still applies.
    let again = complete(&s, &w, &id, &json!({"parts": []}));
    assert_eq!(json_ok(&again, 200), done);
    let auth = format!("Bearer {w}");
    s.request(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        &[("Authorization", &auth)],
        b"{",
    )
    .assert_problem(400, "invalid JSON request body");

    // A ready session takes no more parts and cannot be aborted.
    put_part(&s, &w, &id, "1", b"x")
        .assert_problem(412, "upload session does not accept parts from ready");
    s.abort_upload(&w, &id)
        .assert_problem(412, "upload session cannot be aborted from ready");
}

#[test]
fn complete_enforces_the_part_list_rules() {
    let s = Server::start();
    let w = s.writer_token();
    let data = bytes(10, 5);
    let id = id_of(&begin(&s, &w, &data)["id"]);
    let e = json_ok(&put_part(&s, &w, &id, "1", &data), 200)["etag"].clone();
    let part =
        |n: Value, etag: Value, size: Value| json!({"number": n, "etag": etag, "size_bytes": size});
    let max = 5_368_709_120i64;
    let cases: Vec<(Value, u16, String)> = vec![
        (
            json!({"parts": []}),
            400,
            "upload invalid input: at least one complete part is required".into(),
        ),
        (
            json!({}),
            400,
            "at least one complete part is required".into(),
        ),
        (
            json!({"parts": [part(json!(0), e.clone(), json!(10))]}),
            400,
            "part number must be between 1 and 10000".into(),
        ),
        (
            json!({"parts": [part(json!(10001), e.clone(), json!(10))]}),
            400,
            "part number must be between 1 and 10000".into(),
        ),
        (
            json!({"parts": [part(json!(-3), e.clone(), json!(10))]}),
            400,
            "part number must be between 1 and 10000".into(),
        ),
        (
            json!({"parts": [part(json!(1), json!(""), json!(10))]}),
            400,
            "upload invalid input: etag is required".into(),
        ),
        (
            json!({"parts": [part(json!(1), json!("  "), json!(10))]}),
            400,
            "etag is required".into(),
        ),
        (
            json!({"parts": [{"number": 1, "size_bytes": 10}]}),
            400,
            "etag is required".into(),
        ),
        (
            json!({"parts": [part(json!(1), e.clone(), json!(-1))]}),
            400,
            "part size must be between 0 and 5368709120 bytes".into(),
        ),
        (
            json!({"parts": [part(json!(1), e.clone(), json!(max + 1))]}),
            400,
            "part size must be between 0 and 5368709120 bytes".into(),
        ),
        (
            json!({"parts": [part(json!(1), e.clone(), json!(5)), part(json!(1), e.clone(), json!(5))]}),
            400,
            "upload invalid input: duplicate complete part 1".into(),
        ),
        (
            json!({"parts": [part(json!(1), e.clone(), json!(9))]}),
            412,
            "complete part sizes total 9 bytes, expected 10 bytes".into(),
        ),
        (
            json!({"parts": [part(json!(1), e.clone(), json!(10)), part(json!(2), e.clone(), json!(5))]}),
            412,
            "complete part sizes total 15 bytes, expected 10 bytes".into(),
        ),
        // A listed part that was never uploaded.
        (
            json!({"parts": [part(json!(1), e.clone(), json!(4)), part(json!(2), e.clone(), json!(6))]}),
            412,
            "upload part".into(),
        ),
    ];
    for (body, status, detail) in &cases {
        let r = complete(&s, &w, &id, body);
        assert_eq!(r.status, *status, "{body}: {}", r.text());
        r.assert_problem(*status, detail);
    }
    // None of the rejected lists changed the session; the right list completes it.
    assert_eq!(
        json_ok(&s.get(&format!("/v1/uploads/{id}")), 200)["state"],
        "uploading"
    );
    let ok = complete(
        &s,
        &w,
        &id,
        &json!({"parts": [part(json!(1), e, json!(10))]}),
    );
    assert_eq!(json_ok(&ok, 200)["state"], "ready");
}

#[test]
fn complete_with_the_wrong_bytes_fails_the_session() {
    let s = Server::start();
    let w = s.writer_token();
    let expected = bytes(64, 6);
    let actual = bytes(64, 7);
    let id = id_of(&begin(&s, &w, &expected)["id"]);
    let e = json_ok(&put_part(&s, &w, &id, "1", &actual), 200)["etag"].clone();
    let r = complete(
        &s,
        &w,
        &id,
        &json!({"parts": [{"number": 1, "etag": e, "size_bytes": 64}]}),
    );
    let j = json_ok(&r, 200);
    assert_eq!(j["state"], "failed");
    let msg = j["failure_message"].as_str().expect("failure_message");
    assert!(msg.contains(&sha256_digest(&expected)), "{msg}");
    assert_eq!(json_ok(&s.get(&format!("/v1/uploads/{id}")), 200), j);

    // `failed` is terminal, and neither digest became a trusted blob.
    complete(
        &s,
        &w,
        &id,
        &json!({"parts": [{"number": 1, "etag": "x", "size_bytes": 64}]}),
    )
    .assert_problem(412, "upload session cannot be completed from failed");
    s.abort_upload(&w, &id)
        .assert_problem(412, "upload session cannot be aborted from failed");
    put_part(&s, &w, &id, "1", &expected)
        .assert_problem(412, "upload session does not accept parts from failed");
    for d in [sha256_digest(&expected), sha256_digest(&actual)] {
        assert_eq!(s.get(&format!("/v1/blobs/{d}")).status, 404);
    }
    // A new upload of the same digest is the recovery.
    s.upload(&w, &expected);
}

#[test]
fn abort_is_idempotent_and_terminal() {
    let s = Server::start();
    let w = s.writer_token();
    let data = bytes(10, 8);

    // From `created`, and again from `aborted`: 200 unchanged. A body is not needed and is
    // ignored.
    let created = begin(&s, &w, &data);
    let id = id_of(&created["id"]);
    let a = json_ok(&s.abort_upload(&w, &id), 200);
    assert_eq!(a["state"], "aborted");
    assert_eq!(a["id"], id.as_str());
    assert_eq!(a["expires_at"], created["expires_at"]);
    let auth = format!("Bearer {w}");
    let again = s.request(
        "POST",
        &format!("/v1/uploads/{id}/abort"),
        &[("Authorization", &auth)],
        b"not json",
    );
    assert_eq!(json_ok(&again, 200), a);
    assert_eq!(json_ok(&s.get(&format!("/v1/uploads/{id}")), 200), a);

    // From `uploading`.
    let id2 = id_of(&begin(&s, &w, &data)["id"]);
    let e = json_ok(&put_part(&s, &w, &id2, "1", &data), 200)["etag"].clone();
    assert_eq!(json_ok(&s.abort_upload(&w, &id2), 200)["state"], "aborted");

    // `aborted` is terminal.
    put_part(&s, &w, &id2, "1", &data)
        .assert_problem(412, "upload session does not accept parts from aborted");
    complete(
        &s,
        &w,
        &id2,
        &json!({"parts": [{"number": 1, "etag": e, "size_bytes": 10}]}),
    )
    .assert_problem(412, "upload session cannot be completed from aborted");

    s.abort_upload(&w, UNKNOWN)
        .assert_problem(404, "upload not found");
    s.abort_upload(&w, "12345")
        .assert_problem(400, "upload id must be a UUID");
    complete(&s, &w, UNKNOWN, &json!({"parts": []})).assert_problem(404, "upload not found");
    complete(&s, &w, "x", &json!({"parts": []})).assert_problem(400, "upload id must be a UUID");
}

#[test]
fn get_upload_errors() {
    let s = Server::start();
    for path in [
        "/v1/uploads/nope".to_string(),
        format!("/v1/uploads/{}", &UNKNOWN[1..]),
        format!("/v1/uploads/urn:uuid:{UNKNOWN}"),
    ] {
        s.get(&path).assert_problem(400, "upload id must be a UUID");
    }
    let r = s.get(&format!("/v1/uploads/{UNKNOWN}"));
    r.assert_problem(404, "upload not found");
    assert_eq!(r.json()["title"], "Not Found");
    let h = s.head(&format!("/v1/uploads/{UNKNOWN}"));
    assert_eq!(h.status, 404);
    assert_eq!(h.header("Content-Type"), Some("application/problem+json"));
    assert!(h.body.is_empty());
}

/// docs/api.md decision 3 and 4.1: an expired session answers 412 to parts and complete, and the sweeper
/// then moves it to `aborted`. The sweeper runs every second in tests, so each attempt first
/// locks onto its phase (by watching a probe session get swept) and then acts in the window
/// between a session's expiry and the next sweep. On a loaded machine the sweeper can still
/// win that race, which is the other legitimate 412 (`aborted`); the attempt is then repeated.
#[test]
fn expired_sessions_refuse_parts_and_complete_then_get_swept() {
    let s = Server::start_with(&["--upload-ttl", "1500ms"]);
    let w = s.writer_token();
    let data = bytes(10, 9);
    let get_state = |id: &str| json_ok(&s.get(&format!("/v1/uploads/{id}")), 200)["state"].clone();
    let wait_aborted = |id: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while get_state(id) != "aborted" {
            assert!(Instant::now() < deadline, "the sweeper never aborted {id}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    let expired_or_swept = |r: &Resp, swept: &str| -> bool {
        assert_eq!(r.status, 412, "{}", r.text());
        let detail = r.json()["detail"].as_str().unwrap().to_string();
        if detail == swept {
            return false;
        }
        r.assert_problem(412, "upload session expired at ");
        true
    };

    let (mut part_expired, mut complete_expired) = (false, false);
    let mut last = Vec::new();
    for _attempt in 0..6 {
        let probe = id_of(&begin(&s, &w, &data)["id"]);
        wait_aborted(&probe);
        // A sweep just ran; the next ones come about 1 s and 2 s from now. These sessions
        // expire about 1.5 s from now.
        let a = begin(&s, &w, &data);
        let b = begin(&s, &w, &data);
        let (a_id, b_id) = (id_of(&a["id"]), id_of(&b["id"]));
        let e = json_ok(&put_part(&s, &w, &b_id, "1", &data), 200)["etag"].clone();
        let exp = ts(&a["expires_at"]);
        let wait = exp - OffsetDateTime::now_utc() + time::Duration::milliseconds(100);
        std::thread::sleep(Duration::try_from(wait).unwrap_or_default());

        let r = put_part(&s, &w, &a_id, "1", &data);
        if expired_or_swept(&r, "upload session does not accept parts from aborted") {
            part_expired = true;
            let detail = r.json()["detail"].as_str().unwrap().to_string();
            let when = detail.trim_start_matches("upload session expired at ");
            assert_eq!(ts(&json!(when)), exp, "{detail}");
        }
        let r = complete(
            &s,
            &w,
            &b_id,
            &json!({"parts": [{"number": 1, "etag": e, "size_bytes": 10}]}),
        );
        if expired_or_swept(&r, "upload session cannot be completed from aborted") {
            complete_expired = true;
        }
        last = vec![a_id, b_id];
        if part_expired && complete_expired {
            break;
        }
    }
    assert!(
        part_expired && complete_expired,
        "never inside the expiry window"
    );

    // The sweeper moves both to `aborted`, after which parts meet that state.
    for id in &last {
        wait_aborted(id);
    }
    put_part(&s, &w, &last[0], "1", &data)
        .assert_problem(412, "upload session does not accept parts from aborted");
}
