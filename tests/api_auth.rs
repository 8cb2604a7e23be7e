//! Authentication and authorisation (docs/api.md section 2, 4.6 and decision 9).

use crate::util::*;
use serde_json::{Value, json};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const UNKNOWN: &str = "00000000-0000-4000-8000-000000000000";

/// A 401 whose detail says whether the token was missing or invalid.
fn assert_401(r: &Resp, what: &str, detail: &str) {
    assert_eq!(r.status, 401, "{what}: {}", r.text());
    r.assert_problem(401, detail);
    assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"), "{what}");
    assert_eq!(r.json()["title"], "Unauthorized");
}

fn assert_403(r: &Resp, action: &str) {
    r.assert_problem(
        403,
        &format!("principal is not authorized for action {action}"),
    );
    assert_eq!(r.header("WWW-Authenticate"), None);
    assert_eq!(r.json()["title"], "Forbidden");
}

/// POST /v1/images with an Authorization header value (or none).
fn create_image(s: &Server, auth: Option<&str>, name: &str) -> Resp {
    let mut headers = vec![];
    if let Some(a) = auth {
        headers.push(("Authorization", a));
    }
    s.request(
        "POST",
        "/v1/images",
        &headers,
        json!({"name": name}).to_string().as_bytes(),
    )
}

fn new_principal(s: &Server, am: &str, name: &str) -> Value {
    let r = s.call(
        "POST",
        "/v1/auth/principals",
        am,
        &json!({"kind": "user", "display_name": name}),
    );
    json_ok(&r, 201)
}

fn issue(s: &Server, am: &str, principal: &str, name: &str, expires: &str) -> Resp {
    s.call(
        "POST",
        &format!("/v1/auth/principals/{principal}/api-tokens"),
        am,
        &json!({"name": name, "expires_at": expires}),
    )
}

#[test]
fn bearer_token_variants() {
    let s = Server::start();
    let w = s.writer_token();
    let am = s.bootstrap_token();

    // A token that expires in a moment, and a revoked one.
    let p = new_principal(&s, &am, "short-lived");
    let pid = p["id"].as_str().unwrap();
    let r = s.call(
        "PUT",
        &format!("/v1/auth/principals/{pid}/roles/content-writer"),
        &am,
        &Value::Null,
    );
    assert_eq!(r.status, 204);
    let soon = OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let expiring = json_ok(
        &issue(&s, &am, pid, "soon", &soon.format(&Rfc3339).unwrap()),
        201,
    );
    let expiring = expiring["plaintext"].as_str().unwrap().to_string();
    // It works until it expires.
    json_ok(
        &create_image(&s, Some(&format!("Bearer {expiring}")), "before-expiry"),
        201,
    );
    let revoked = json_ok(&issue(&s, &am, pid, "revoked", "2099-01-01T00:00:00Z"), 201);
    let r = s.call(
        "DELETE",
        &format!("/v1/auth/api-tokens/{}", revoked["id"].as_str().unwrap()),
        &am,
        &Value::Null,
    );
    assert_eq!(r.status, 204);
    let revoked = revoked["plaintext"].as_str().unwrap().to_string();

    // Working forms: the scheme is case-insensitive and fields are whitespace separated.
    let good = [
        format!("Bearer {w}"),
        format!("bearer {w}"),
        format!("BEARER {w}"),
        format!("Bearer   {w}"),
    ];
    for (i, h) in good.iter().enumerate() {
        let r = create_image(&s, Some(h), &format!("ok-{i}"));
        json_ok(&r, 201);
    }

    let wait = soon - OffsetDateTime::now_utc() + time::Duration::milliseconds(50);
    std::thread::sleep(Duration::try_from(wait).unwrap_or_default());
    // A fake token with the right shape but an unknown id or wrong secret.
    let forged = format!("imgsrv_at_{}_{}", "0".repeat(32), "a".repeat(64));
    let mut wrong_secret = w.clone();
    let last = wrong_secret.pop().unwrap();
    wrong_secret.push(if last == '0' { '1' } else { '0' });
    let bad: Vec<Option<String>> = vec![
        None,
        Some(String::new()),
        Some(format!("Basic {w}")),
        Some(format!("Token {w}")),
        Some(w.clone()),
        Some("Bearer".into()),
        Some("Bearer ".into()),
        Some(format!("Bearer {w} extra")),
        Some(format!("Bearer Bearer {w}")),
        Some("Bearer unknown".into()),
        Some(format!("Bearer {forged}")),
        Some(format!("Bearer {wrong_secret}")),
        Some(format!("Bearer {expiring}")),
        Some(format!("Bearer {revoked}")),
    ];
    for h in &bad {
        let r = create_image(&s, h.as_deref(), "never");
        let detail = if h.is_none() {
            "missing bearer token"
        } else {
            "invalid bearer token"
        };
        assert_401(&r, &format!("{h:?}"), detail);
    }
    // None of the rejected requests created anything.
    json_ok(
        &create_image(&s, Some(&format!("Bearer {w}")), "never"),
        201,
    );
}

#[test]
fn authorisation_is_per_action() {
    let s = Server::start();
    let w = s.writer_token();
    let am = s.bootstrap_token();
    let nobody = s.token_with_roles(&[]);
    let both = s.token_with_roles(&["content-writer", "auth-manager"]);

    // A content writer cannot manage auth; an auth manager cannot write content.
    for path in [
        "/v1/auth/roles",
        "/v1/auth/principals",
        &format!("/v1/auth/principals/{UNKNOWN}"),
    ] {
        assert_403(&s.call("GET", path, &w, &Value::Null), "auth.manage");
        assert_403(&s.call("GET", path, &nobody, &Value::Null), "auth.manage");
        json_ok(&s.call("GET", "/v1/auth/roles", &both, &Value::Null), 200);
    }
    assert_403(
        &s.call(
            "POST",
            "/v1/auth/principals",
            &w,
            &json!({"kind": "user", "display_name": "x"}),
        ),
        "auth.manage",
    );
    assert_403(
        &s.call("POST", "/v1/images", &am, &json!({"name": "x"})),
        "content.write",
    );
    assert_403(
        &s.call("POST", "/v1/images", &nobody, &json!({"name": "x"})),
        "content.write",
    );
    assert_403(
        &s.call(
            "POST",
            "/v1/uploads",
            &am,
            &json!({"expected_digest": sha256_digest(b"")}),
        ),
        "content.write",
    );
    json_ok(
        &s.call("POST", "/v1/images", &both, &json!({"name": "x"})),
        201,
    );
}

/// The auth check runs before path and body validation: bad input from an unauthenticated
/// (or unauthorised) caller is 401 (or 403), never 400.
#[test]
fn auth_runs_before_validation() {
    let s = Server::start();
    let w = s.writer_token();
    let cases: Vec<(&str, String, &[u8], &str)> = vec![
        ("POST", "/v1/uploads".into(), b"{bad json", "content.write"),
        (
            "PUT",
            "/v1/uploads/not-a-uuid/parts/x".into(),
            b"data",
            "content.write",
        ),
        (
            "POST",
            "/v1/uploads/not-a-uuid/complete".into(),
            b"[",
            "content.write",
        ),
        (
            "POST",
            "/v1/uploads/not-a-uuid/abort".into(),
            b"",
            "content.write",
        ),
        ("POST", "/v1/images".into(), b"{\"x\":1}", "content.write"),
        (
            "POST",
            "/v1/images/BAD/versions".into(),
            b"null",
            "content.write",
        ),
        (
            "POST",
            "/v1/images/BAD/versions/_/artifacts".into(),
            b"",
            "content.write",
        ),
        (
            "DELETE",
            "/v1/images/a/versions/1/artifacts/bad".into(),
            b"",
            "content.write",
        ),
        (
            "POST",
            "/v1/images/a/versions/1/artifacts/bad/attachments".into(),
            b"{",
            "content.write",
        ),
        (
            "DELETE",
            "/v1/images/a/versions/1/artifacts/bad/attachments/bad".into(),
            b"",
            "content.write",
        ),
        (
            "POST",
            "/v1/images/BAD/versions/_/publish".into(),
            b"",
            "content.write",
        ),
        ("GET", "/v1/publish-jobs/bad".into(), b"", "content.write"),
        (
            "POST",
            "/v1/publish-jobs/bad/retry".into(),
            b"",
            "content.write",
        ),
        (
            "PUT",
            "/v1/images/BAD/aliases/a+b".into(),
            b"{",
            "content.write",
        ),
        (
            "DELETE",
            "/v1/images/BAD/aliases/a+b".into(),
            b"",
            "content.write",
        ),
        ("POST", "/v1/auth/principals".into(), b"{", "auth.manage"),
        ("GET", "/v1/auth/principals/bad".into(), b"", "auth.manage"),
        (
            "PUT",
            "/v1/auth/principals/bad/roles/nope".into(),
            b"",
            "auth.manage",
        ),
        (
            "DELETE",
            "/v1/auth/principals/bad/roles/nope".into(),
            b"",
            "auth.manage",
        ),
        (
            "GET",
            "/v1/auth/principals/bad/api-tokens".into(),
            b"",
            "auth.manage",
        ),
        (
            "POST",
            "/v1/auth/principals/bad/api-tokens".into(),
            b"{",
            "auth.manage",
        ),
        (
            "DELETE",
            "/v1/auth/api-tokens/bad".into(),
            b"",
            "auth.manage",
        ),
    ];
    let writer = format!("Bearer {w}");
    for (method, path, body, action) in &cases {
        let r = s.request(method, path, &[], body);
        assert_401(&r, &format!("{method} {path}"), "missing bearer token");
        let r = s.request(
            method,
            path,
            &[("Authorization", "Bearer imgsrv_at_nonsense")],
            body,
        );
        assert_401(&r, &format!("{method} {path}"), "invalid bearer token");
        if *action == "auth.manage" {
            let r = s.request(method, path, &[("Authorization", &writer)], body);
            assert_403(&r, action);
        }
    }
}

#[test]
fn reads_ignore_authorization() {
    let s = Server::start();
    let w = s.writer_token();
    let m = s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let aid = m.artifact_id.as_str();
    let digest = sha256_digest(b"disk");
    for path in [
        "/v1/images".to_string(),
        "/v1/images/img".into(),
        "/v1/images/img/versions".into(),
        "/v1/images/img/versions/1.0".into(),
        "/v1/images/img/versions/1.0/artifacts".into(),
        format!("/v1/images/img/versions/1.0/artifacts/{aid}"),
        format!("/v1/images/img/versions/1.0/artifacts/{aid}/download"),
        "/v1/images/img/aliases".into(),
        "/v1/images/img/refs/1.0".into(),
        format!("/v1/blobs/{digest}"),
        "/healthz".into(),
    ] {
        let plain = s.get(&path);
        assert!(plain.status == 200 || plain.status == 204, "{path}");
        for garbage in ["garbage", "Bearer nope", "Basic Zm9vOmJhcg==", "Bearer"] {
            let r = s.get_with(&path, &[("Authorization", garbage)]);
            assert_eq!(r.status, plain.status, "{path} with {garbage}");
            assert_eq!(r.body, plain.body, "{path} with {garbage}");
        }
    }
}

#[test]
fn roles_are_listed() {
    let s = Server::start();
    let am = s.bootstrap_token();
    let r = s.call("GET", "/v1/auth/roles", &am, &Value::Null);
    assert_eq!(
        json_ok(&r, 200),
        json!({"roles": [
            {"id": "auth-manager", "display_name": "Auth manager",
             "description": "Can manage imgsrv authentication policy.", "actions": ["auth.manage"]},
            {"id": "content-writer", "display_name": "Content writer",
             "description": "Can write imgsrv content.", "actions": ["content.write"]},
        ]})
    );
}

#[test]
fn principals_and_roles() {
    let s = Server::start();
    let am = s.bootstrap_token();
    let r = s.call(
        "POST",
        "/v1/auth/principals",
        &am,
        &json!({"kind": "service", "display_name": "ci"}),
    );
    let p = json_ok(&r, 201);
    let id = id_of(&p["id"]);
    assert_eq!(p["kind"], "service");
    assert_eq!(p["display_name"], "ci");
    assert_eq!(p["role_ids"], json!([]));
    assert!(p.get("attributes").is_none(), "{p}");

    let r = s.call(
        "POST",
        "/v1/auth/principals",
        &am,
        &json!({"kind": "user", "display_name": "Alice", "attributes": {"email": "a@example.org", "n": 1}}),
    );
    let alice = json_ok(&r, 201);
    assert_eq!(alice["kind"], "user");
    assert_eq!(
        alice["attributes"],
        json!({"email": "a@example.org", "n": 1})
    );

    let list = json_ok(
        &s.call("GET", "/v1/auth/principals", &am, &Value::Null),
        200,
    );
    let ids: Vec<&str> = list["principals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&id.as_str()) && ids.contains(&alice["id"].as_str().unwrap()));
    // The bootstrap principal is there too, holding auth-manager.
    assert!(
        list["principals"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["role_ids"] == json!(["auth-manager"])),
        "{list}"
    );
    let get = |pid: &str| {
        s.call(
            "GET",
            &format!("/v1/auth/principals/{pid}"),
            &am,
            &Value::Null,
        )
    };
    assert_eq!(json_ok(&get(&id), 200), p);
    get(UNKNOWN).assert_problem(404, "not found");
    get("nope").assert_problem(400, "principal id must be a UUID");

    let bad: Vec<Value> = vec![
        json!({"display_name": "x"}),
        json!({"kind": "robot", "display_name": "x"}),
        json!({"kind": "User", "display_name": "x"}),
        json!({"kind": "user"}),
        json!({"kind": "user", "display_name": "  "}),
    ];
    for body in &bad {
        let r = s.call("POST", "/v1/auth/principals", &am, body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        r.assert_problem(400, "auth invalid input");
    }
    s.call(
        "POST",
        "/v1/auth/principals",
        &am,
        &json!({"kind": "user", "display_name": "x", "attributes": [1]}),
    )
    .assert_problem(400, "invalid JSON request body");

    // Role assignment: PUT and DELETE are idempotent 204s with empty bodies.
    let role = |method: &str, pid: &str, role: &str| {
        s.call(
            method,
            &format!("/v1/auth/principals/{pid}/roles/{role}"),
            &am,
            &Value::Null,
        )
    };
    for _ in 0..2 {
        let r = role("PUT", &id, "content-writer");
        assert_eq!(r.status, 204, "{}", r.text());
        assert!(r.body.is_empty());
    }
    role("PUT", &id, "auth-manager");
    assert_eq!(
        json_ok(&get(&id), 200)["role_ids"],
        json!(["auth-manager", "content-writer"])
    );
    let t = json_ok(&issue(&s, &am, &id, "ci", "2099-01-01T00:00:00Z"), 201);
    let token = t["plaintext"].as_str().unwrap().to_string();
    json_ok(
        &s.call("POST", "/v1/images", &token, &json!({"name": "img"})),
        201,
    );
    for _ in 0..2 {
        let r = role("DELETE", &id, "content-writer");
        assert_eq!(r.status, 204, "{}", r.text());
    }
    assert_eq!(json_ok(&get(&id), 200)["role_ids"], json!(["auth-manager"]));
    // Roles are read at every request: the same token lost content.write at once.
    assert_403(
        &s.call("POST", "/v1/images", &token, &json!({"name": "img2"})),
        "content.write",
    );
    role("PUT", UNKNOWN, "content-writer").assert_problem(404, "not found");
    role("PUT", &id, "admin").assert_problem(404, "not found");
    role("DELETE", &id, "admin").assert_problem(404, "not found");
    role("PUT", "x", "content-writer").assert_problem(400, "principal id must be a UUID");
}

#[test]
fn api_tokens_issue_list_and_revoke() {
    let s = Server::start();
    let am = s.bootstrap_token();
    let p = new_principal(&s, &am, "deployer");
    let pid = p["id"].as_str().unwrap();
    let r = s.call(
        "PUT",
        &format!("/v1/auth/principals/{pid}/roles/content-writer"),
        &am,
        &Value::Null,
    );
    assert_eq!(r.status, 204);

    let t = json_ok(&issue(&s, &am, pid, "ci", "2099-01-01T00:00:00Z"), 201);
    let tid = id_of(&t["id"]);
    assert_eq!(t["principal_id"], pid);
    assert_eq!(t["name"], "ci");
    assert_eq!(
        ts(&t["expires_at"]),
        OffsetDateTime::parse("2099-01-01T00:00:00Z", &Rfc3339).unwrap()
    );
    let plaintext = t["plaintext"].as_str().unwrap().to_string();
    assert!(plaintext.starts_with("imgsrv_at_"), "{plaintext}");
    assert!(t.get("last_used_at").is_none() && t.get("revoked_at").is_none());

    // A second token with a name omitted (it is optional); tokens are distinct.
    let t2 = json_ok(
        &s.call(
            "POST",
            &format!("/v1/auth/principals/{pid}/api-tokens"),
            &am,
            &json!({"expires_at": "2098-06-01T12:00:00.5Z"}),
        ),
        201,
    );
    assert_ne!(t2["plaintext"], t["plaintext"]);

    json_ok(
        &s.call("POST", "/v1/images", &plaintext, &json!({"name": "img"})),
        201,
    );

    // The list never shows plaintext; the used token shows last_used_at.
    let list_path = format!("/v1/auth/principals/{pid}/api-tokens");
    let list = json_ok(&s.call("GET", &list_path, &am, &Value::Null), 200);
    let tokens = list["api_tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    for tok in tokens {
        assert!(tok.get("plaintext").is_none(), "{tok}");
        assert!(tok.get("revoked_at").is_none(), "{tok}");
    }
    let used = tokens.iter().find(|x| x["id"] == tid.as_str()).unwrap();
    ts(&used["last_used_at"]);
    let unused = tokens.iter().find(|x| x["id"] == t2["id"]).unwrap();
    assert!(unused.get("last_used_at").is_none(), "{unused}");
    // A principal without tokens lists `[]`.
    let other = new_principal(&s, &am, "idle");
    let r = s.call(
        "GET",
        &format!(
            "/v1/auth/principals/{}/api-tokens",
            other["id"].as_str().unwrap()
        ),
        &am,
        &Value::Null,
    );
    assert_eq!(json_ok(&r, 200), json!({"api_tokens": []}));

    // Revoke: 204, the token stops working at once, the list shows revoked_at.
    let r = s.call(
        "DELETE",
        &format!("/v1/auth/api-tokens/{tid}"),
        &am,
        &Value::Null,
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    assert_401(
        &s.call("POST", "/v1/images", &plaintext, &json!({"name": "img2"})),
        "revoked",
        "invalid bearer token",
    );
    let list = json_ok(&s.call("GET", &list_path, &am, &Value::Null), 200);
    let revoked = list["api_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == tid.as_str())
        .unwrap()
        .clone();
    ts(&revoked["revoked_at"]);
    s.call(
        "DELETE",
        &format!("/v1/auth/api-tokens/{tid}"),
        &am,
        &Value::Null,
    )
    .assert_problem(404, "not found");
    s.call(
        "DELETE",
        &format!("/v1/auth/api-tokens/{UNKNOWN}"),
        &am,
        &Value::Null,
    )
    .assert_problem(404, "not found");

    // Issue errors.
    let cases: Vec<(String, Value, u16, &str)> = vec![
        (pid.to_string(), json!({"name": "x"}), 400, "expires_at"),
        (
            pid.to_string(),
            json!({"name": "x", "expires_at": "tomorrow"}),
            400,
            "expires_at",
        ),
        (
            pid.to_string(),
            json!({"name": "x", "expires_at": "2001-01-01T00:00:00Z"}),
            400,
            "expires_at",
        ),
        (
            pid.to_string(),
            json!({"name": "x", "expires_at": 5}),
            400,
            "invalid JSON request body",
        ),
        (
            UNKNOWN.to_string(),
            json!({"name": "x", "expires_at": "2099-01-01T00:00:00Z"}),
            404,
            "not found",
        ),
        (
            "x".to_string(),
            json!({"name": "x", "expires_at": "2099-01-01T00:00:00Z"}),
            400,
            "principal id must be a UUID",
        ),
    ];
    for (principal, body, status, detail) in &cases {
        let r = s.call(
            "POST",
            &format!("/v1/auth/principals/{principal}/api-tokens"),
            &am,
            body,
        );
        r.assert_problem(*status, detail);
    }
    s.call(
        "GET",
        &format!("/v1/auth/principals/{UNKNOWN}/api-tokens"),
        &am,
        &Value::Null,
    )
    .assert_problem(404, "not found");
}

#[test]
fn bootstrap_token_file() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start();
    let path = s.data_dir().join("bootstrap-token");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
    let token = s.bootstrap_token();
    assert!(token.starts_with("imgsrv_at_"), "{token}");
    // The log names the file, never the token.
    let log = s.log_text();
    assert!(log.contains("bootstrap-token"), "{log}");
    assert!(!log.contains(&token), "the token leaked into the log");

    // It is an auth-manager token that expires in 24 h.
    json_ok(&s.call("GET", "/v1/auth/roles", &token, &Value::Null), 200);
    let list = json_ok(
        &s.call("GET", "/v1/auth/principals", &token, &Value::Null),
        200,
    );
    let boot = &list["principals"][0];
    assert_eq!(boot["role_ids"], json!(["auth-manager"]));
    let toks = json_ok(
        &s.call(
            "GET",
            &format!(
                "/v1/auth/principals/{}/api-tokens",
                boot["id"].as_str().unwrap()
            ),
            &token,
            &Value::Null,
        ),
        200,
    );
    let exp = ts(&toks["api_tokens"][0]["expires_at"]);
    let left = exp - OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::hours(23) && left <= time::Duration::hours(24),
        "{left}"
    );

    // OIDC provisioning rules are not implemented.
    for (method, path) in [
        ("GET", "/v1/auth/oidc-provisioning-rules"),
        ("POST", "/v1/auth/oidc-provisioning-rules"),
        ("GET", "/v1/auth/oidc-provisioning-rules/x"),
    ] {
        let r = s.call(method, path, &token, &Value::Null);
        assert_eq!(r.status, 404, "{method} {path}");
    }
}
