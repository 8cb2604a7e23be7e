//! Aliases (docs/api.md 4.5): mutable pointers to published versions of the same image.

use crate::util::*;
use serde_json::{Value, json};

fn put(s: &Server, w: &str, image: &str, alias: &str, body: &Value) -> Resp {
    s.call(
        "PUT",
        &format!("/v1/images/{image}/aliases/{alias}"),
        w,
        body,
    )
}

#[test]
fn alias_create_move_list_and_delete() {
    let s = Server::start();
    let w = s.writer_token();
    let v1 = s.publish_image(&w, "img", "1.0", b"d1", b"m1");
    let v2 = s.publish_image(&w, "img", "2.0", b"d2", b"m2");

    // The image exists, so an empty list is 200 with `[]`.
    assert_eq!(
        json_ok(&s.get("/v1/images/img/aliases"), 200),
        json!({"aliases": []})
    );

    let a = json_ok(
        &put(&s, &w, "img", "latest", &json!({"version": "1.0"})),
        200,
    );
    let id = id_of(&a["id"]);
    assert_eq!(a["image_id"], v1.manifest["image"]["id"]);
    assert_eq!(a["alias"], "latest");
    assert_eq!(a["version_id"], v1.manifest["version"]["id"]);
    assert_eq!(a["version"], "1.0");
    assert_eq!(ts(&a["created_at"]), ts(&a["updated_at"]));
    let mut keys: Vec<&str> = a.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "alias",
            "created_at",
            "id",
            "image_id",
            "updated_at",
            "version",
            "version_id"
        ]
    );
    assert_eq!(json_ok(&s.get("/v1/images/img/aliases/latest"), 200), a);

    // A move keeps id and created_at and bumps updated_at.
    std::thread::sleep(std::time::Duration::from_millis(5));
    let b = json_ok(
        &put(&s, &w, "img", "latest", &json!({"version": "2.0"})),
        200,
    );
    assert_eq!(b["id"], id.as_str());
    assert_eq!(b["created_at"], a["created_at"]);
    assert!(ts(&b["updated_at"]) > ts(&a["updated_at"]), "{a} {b}");
    assert_eq!(b["version"], "2.0");
    assert_eq!(b["version_id"], v2.manifest["version"]["id"]);
    assert_eq!(json_ok(&s.get("/v1/images/img/aliases/latest"), 200), b);
    // PUT to the same target again is still a 200 upsert.
    let c = json_ok(
        &put(&s, &w, "img", "latest", &json!({"version": "2.0"})),
        200,
    );
    assert_eq!(c["id"], id.as_str());

    // The list is ordered by alias name, whatever the creation order.
    for alias in ["stable", "Beta", "1.x", "a-b_c.d"] {
        json_ok(&put(&s, &w, "img", alias, &json!({"version": "1.0"})), 200);
    }
    let list = json_ok(&s.get("/v1/images/img/aliases"), 200);
    let names: Vec<&str> = list["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alias"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["1.x", "Beta", "a-b_c.d", "latest", "stable"]);
    assert_eq!(list["aliases"][3], c);

    // DELETE: 204 with no body, then the alias is gone and a second DELETE is 404.
    let r = s.call("DELETE", "/v1/images/img/aliases/latest", &w, &Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    s.get("/v1/images/img/aliases/latest")
        .assert_problem(404, "catalog not found");
    s.call("DELETE", "/v1/images/img/aliases/latest", &w, &Value::Null)
        .assert_problem(404, "catalog not found");
    assert_eq!(
        json_ok(&s.get("/v1/images/img/aliases"), 200)["aliases"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
}

#[test]
fn alias_errors() {
    let s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", b"d1", b"m1");
    s.publish_image(&w, "other", "5.0", b"d5", b"m5");
    let r = s.call(
        "POST",
        "/v1/images/img/versions",
        &w,
        &json!({"version": "2.0"}),
    );
    json_ok(&r, 201);
    let alias_pattern = "catalog invalid input: alias must match ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$";
    let version_pattern = "catalog invalid input: version must match";
    let long = "a".repeat(65);
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        // A draft is not a valid target.
        (
            "img",
            "latest",
            json!({"version": "2.0"}),
            412,
            "aliases must target a published version for the same image",
        ),
        // Missing target version, a version of another image, a missing image.
        (
            "img",
            "latest",
            json!({"version": "9.9"}),
            404,
            "catalog not found",
        ),
        (
            "img",
            "latest",
            json!({"version": "5.0"}),
            404,
            "catalog not found",
        ),
        (
            "nope",
            "latest",
            json!({"version": "1.0"}),
            404,
            "catalog not found",
        ),
        // Alias names exclude `+` and `:` and are at most 64 characters.
        ("img", "v1+x", json!({"version": "1.0"}), 400, alias_pattern),
        ("img", "v1:x", json!({"version": "1.0"}), 400, alias_pattern),
        ("img", "-x", json!({"version": "1.0"}), 400, alias_pattern),
        (
            "img",
            "a%20b",
            json!({"version": "1.0"}),
            400,
            alias_pattern,
        ),
        ("img", &long, json!({"version": "1.0"}), 400, alias_pattern),
        ("img", "ok", json!({"version": "_1"}), 400, version_pattern),
        ("img", "ok", json!({}), 400, version_pattern),
        (
            "IMG",
            "ok",
            json!({"version": "1.0"}),
            400,
            "image name must match",
        ),
    ];
    for (image, alias, body, status, detail) in &cases {
        let r = put(&s, &w, image, alias, body);
        assert_eq!(r.status, *status, "{image}/{alias} {body}: {}", r.text());
        r.assert_problem(*status, detail);
    }
    // None of them created an alias; the longest legal name works.
    assert_eq!(
        json_ok(&s.get("/v1/images/img/aliases"), 200),
        json!({"aliases": []})
    );
    json_ok(
        &put(&s, &w, "img", &"a".repeat(64), &json!({"version": "1.0"})),
        200,
    );

    s.get("/v1/images/nope/aliases")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/img/aliases/missing")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/nope/aliases/latest")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/img/aliases/a:b")
        .assert_problem(400, "alias must match");
    s.call("DELETE", "/v1/images/img/aliases/missing", &w, &Value::Null)
        .assert_problem(404, "catalog not found");
    s.call("DELETE", "/v1/images/nope/aliases/latest", &w, &Value::Null)
        .assert_problem(404, "catalog not found");
    s.call("DELETE", "/v1/images/img/aliases/a+b", &w, &Value::Null)
        .assert_problem(400, "alias must match");

    // An image without any published version still lists its (empty) aliases.
    json_ok(
        &s.call("POST", "/v1/images", &w, &json!({"name": "fresh"})),
        201,
    );
    assert_eq!(
        json_ok(&s.get("/v1/images/fresh/aliases"), 200),
        json!({"aliases": []})
    );
}
