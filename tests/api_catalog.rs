//! Images, versions, manifests, artifacts and attachments (docs/api.md 4.2, 4.3, sections 5 and 8):
//! success shapes, visibility rules and every documented error class.

use crate::util::*;
use serde_json::{Value, json};

const UNKNOWN: &str = "00000000-0000-4000-8000-000000000000";

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
    k.sort();
    k
}

fn create_image(s: &Server, w: &str, body: Value) -> Resp {
    s.call("POST", "/v1/images", w, &body)
}

fn create_version(s: &Server, w: &str, image: &str, version: &str) -> Resp {
    s.call(
        "POST",
        &format!("/v1/images/{image}/versions"),
        w,
        &json!({"version": version}),
    )
}

fn artifact_body(variant: Option<&str>, os: &str, arch: &str, format: &str) -> Value {
    let mut b = json!({"operating_system": os, "architecture": arch, "format": format,
        "primary_blob_digest": format!("sha256:{}", "ab".repeat(32)),
        "primary_blob_size_bytes": 10, "primary_media_type": "application/octet-stream"});
    if let Some(v) = variant {
        b["variant"] = json!(v);
    }
    b
}

fn attachment_body(name: &str) -> Value {
    json!({"name": name, "media_type": "text/plain",
           "blob_digest": format!("sha256:{}", "cd".repeat(32)), "blob_size_bytes": 3})
}

#[test]
fn create_image_shapes_and_conflicts() {
    let s = Server::start();
    let w = s.writer_token();
    let r = create_image(&s, &w, json!({"name": "debian-bookworm"}));
    let j = json_ok(&r, 201);
    id_of(&j["id"]);
    assert_eq!(j["name"], "debian-bookworm");
    assert_eq!(ts(&j["created_at"]), ts(&j["updated_at"]));
    // Unset optional members are omitted, not null.
    assert_eq!(keys(&j), ["created_at", "id", "name", "updated_at"]);

    let r = create_image(
        &s,
        &w,
        json!({"name": "a.b_c-9", "display_name": "Debian 12", "description": "Stable."}),
    );
    let j = json_ok(&r, 201);
    assert_eq!(j["display_name"], "Debian 12");
    assert_eq!(j["description"], "Stable.");
    // The longest legal name.
    json_ok(&create_image(&s, &w, json!({"name": "a".repeat(128)})), 201);

    // Duplicate name: 409, naming the image; creation is not idempotent.
    let r = create_image(&s, &w, json!({"name": "debian-bookworm"}));
    r.assert_problem(
        409,
        "catalog conflict: image \"debian-bookworm\" already exists",
    );
    assert_eq!(r.json()["title"], "Conflict");
}

#[test]
fn create_image_validation() {
    let s = Server::start();
    let w = s.writer_token();
    let pattern = "catalog invalid input: image name must match ^[a-z0-9][a-z0-9._-]{0,127}$";
    let cases: Vec<(Value, &str)> = vec![
        (json!({}), pattern),
        (json!({"name": ""}), pattern),
        (json!({"name": "Debian"}), pattern),
        (json!({"name": "-debian"}), pattern),
        (json!({"name": ".debian"}), pattern),
        (json!({"name": "deb ian"}), pattern),
        (json!({"name": "deb/ian"}), pattern),
        (json!({"name": "deb+ian"}), pattern),
        (json!({"name": "a".repeat(129)}), pattern),
        (
            json!({"name": "ok", "display_name": ""}),
            "catalog invalid input: display name must not be blank",
        ),
        (
            json!({"name": "ok", "display_name": " \t"}),
            "display name must not be blank",
        ),
        (
            json!({"name": "ok", "description": "  "}),
            "catalog invalid input: description must not be blank",
        ),
    ];
    for (body, detail) in cases {
        create_image(&s, &w, body).assert_problem(400, detail);
    }
    // Nothing was created by the rejected requests.
    json_ok(&create_image(&s, &w, json!({"name": "ok"})), 201);
}

#[test]
fn images_are_visible_only_with_a_published_version() {
    let s = Server::start();
    let w = s.writer_token();
    assert_eq!(json_ok(&s.get("/v1/images"), 200), json!({"images": []}));

    json_ok(&create_image(&s, &w, json!({"name": "c-draft-only"})), 201);
    json_ok(&create_version(&s, &w, "c-draft-only", "1.0"), 201);
    assert_eq!(json_ok(&s.get("/v1/images"), 200), json!({"images": []}));
    s.get("/v1/images/c-draft-only")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/c-draft-only/versions")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/nope")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/Bad")
        .assert_problem(400, "image name must match");

    // Published images are listed by name, whatever the creation order.
    json_ok(
        &create_image(&s, &w, json!({"name": "b-img", "display_name": "B"})),
        201,
    );
    s.publish_image(&w, "b-img", "1", b"disk-b", b"meta-b");
    s.publish_image(&w, "a-img", "1", b"disk-a", b"meta-a");
    let list = json_ok(&s.get("/v1/images"), 200);
    let names: Vec<&str> = list["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a-img", "b-img"]);
    let b = json_ok(&s.get("/v1/images/b-img"), 200);
    assert_eq!(b, list["images"][1]);
    assert_eq!(b["display_name"], "B");
    assert!(list["images"][0].get("display_name").is_none());
}

#[test]
fn versions_create_and_list_newest_first() {
    let s = Server::start();
    let w = s.writer_token();
    create_version(&s, &w, "missing", "1").assert_problem(404, "catalog not found");
    json_ok(&create_image(&s, &w, json!({"name": "img"})), 201);

    let r = create_version(&s, &w, "img", "12.5.0+build:1");
    let v = json_ok(&r, 201);
    id_of(&v["id"]);
    id_of(&v["image_id"]);
    assert_eq!(v["version"], "12.5.0+build:1");
    assert_eq!(v["state"], "draft");
    assert_eq!(
        keys(&v),
        [
            "created_at",
            "id",
            "image_id",
            "state",
            "updated_at",
            "version"
        ]
    );
    ts(&v["created_at"]);
    create_version(&s, &w, "img", "12.5.0+build:1").assert_problem(
        409,
        "catalog conflict: version \"12.5.0+build:1\" of image \"img\" already exists",
    );

    let pattern = "catalog invalid input: version must match ^[A-Za-z0-9][A-Za-z0-9._+:-]{0,127}$";
    for bad in [
        "".to_string(),
        "_1".into(),
        "-1".into(),
        "1 2".into(),
        "1/2".into(),
        "v".repeat(129),
    ] {
        create_version(&s, &w, "img", &bad).assert_problem(400, pattern);
    }
    create_version(&s, &w, "Bad", "1").assert_problem(400, "image name must match");
    json_ok(&create_version(&s, &w, "img", &"v".repeat(128)), 201);

    // Only published versions are listed, newest created first.
    s.publish_image(&w, "img", "1.0", b"d1", b"m1");
    s.publish_image(&w, "img", "2.0", b"d2", b"m2");
    json_ok(&create_version(&s, &w, "img", "3.0"), 201);
    let list = json_ok(&s.get("/v1/images/img/versions"), 200);
    let vs = list["versions"].as_array().unwrap();
    let names: Vec<&str> = vs.iter().map(|v| v["version"].as_str().unwrap()).collect();
    assert_eq!(names, ["2.0", "1.0"]);
    for v in vs {
        assert_eq!(v["state"], "published");
        assert!(ts(&v["published_at"]) >= ts(&v["created_at"]));
    }
    assert!(ts(&vs[0]["created_at"]) > ts(&vs[1]["created_at"]));
    s.get("/v1/images/BAD/versions")
        .assert_problem(400, "image name must match");
}

#[test]
fn manifests_show_any_state_in_order() {
    let s = Server::start();
    let w = s.writer_token();
    json_ok(&create_image(&s, &w, json!({"name": "img"})), 201);
    json_ok(&create_version(&s, &w, "img", "1.0"), 201);

    // A draft manifest is visible anonymously, with an empty artifact array.
    let m = json_ok(&s.get("/v1/images/img/versions/1.0"), 200);
    assert_eq!(m["version"]["state"], "draft");
    assert!(m["version"].get("published_at").is_none());
    assert_eq!(m["image"]["name"], "img");
    assert_eq!(m["artifacts"], json!([]));
    assert_eq!(keys(&m), ["artifacts", "image", "version"]);

    // Artifacts sort by variant, os, architecture, format; attachments by name (byte order).
    let base = "/v1/images/img/versions/1.0/artifacts";
    let adds = [
        (None, "debian", "x86_64", "raw"),
        (Some("cloud"), "debian", "x86_64", "qcow2"),
        (None, "debian", "aarch64", "qcow2"),
        (Some(""), "alpine", "x86_64", "qcow2"),
        (None, "debian", "x86_64", "qcow2"),
    ];
    let mut ids = Vec::new();
    for (variant, os, arch, format) in adds {
        let r = s.call("POST", base, &w, &artifact_body(variant, os, arch, format));
        ids.push(json_ok(&r, 201)["id"].as_str().unwrap().to_string());
    }
    for name in ["sha256sums", "incus.tar.xz", "SIGNATURE"] {
        let r = s.call(
            "POST",
            &format!("{base}/{}/attachments", ids[4]),
            &w,
            &attachment_body(name),
        );
        json_ok(&r, 201);
    }
    let m = json_ok(&s.get("/v1/images/img/versions/1.0"), 200);
    let order: Vec<(String, String, String, String)> = m["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = &a["artifact"];
            (
                a["variant"].as_str().unwrap().into(),
                a["operating_system"].as_str().unwrap().into(),
                a["architecture"].as_str().unwrap().into(),
                a["format"].as_str().unwrap().into(),
            )
        })
        .collect();
    let t = |v: &str, o: &str, a: &str, f: &str| (v.into(), o.into(), a.into(), f.into());
    assert_eq!(
        order,
        vec![
            t("cloud", "debian", "x86_64", "qcow2"),
            t("default", "alpine", "x86_64", "qcow2"),
            t("default", "debian", "aarch64", "qcow2"),
            t("default", "debian", "x86_64", "qcow2"),
            t("default", "debian", "x86_64", "raw"),
        ]
    );
    for a in m["artifacts"].as_array().unwrap() {
        assert_eq!(keys(a), ["artifact", "attachments"]);
        assert!(a["attachments"].is_array(), "{a}");
    }
    let atts: Vec<&str> = m["artifacts"][3]["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(atts, ["SIGNATURE", "incus.tar.xz", "sha256sums"]);

    s.get("/v1/images/img/versions/9.9")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/nope/versions/1.0")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/img/versions/_bad")
        .assert_problem(400, "version must match");

    // After publishing, the same endpoint shows the published state.
    let m = s.publish_image(&w, "pub", "1", b"d", b"m");
    assert_eq!(m.manifest["version"]["state"], "published");
    ts(&m.manifest["version"]["published_at"]);
}

#[test]
fn artifact_add_rules() {
    let s = Server::start();
    let w = s.writer_token();
    json_ok(&create_image(&s, &w, json!({"name": "img"})), 201);
    json_ok(&create_version(&s, &w, "img", "1.0"), 201);
    let base = "/v1/images/img/versions/1.0/artifacts";

    // The variant defaults to `default`; the digest need not exist in CAS yet; the size is not
    // checked here.
    let r = s.call(
        "POST",
        base,
        &w,
        &artifact_body(None, "debian", "x86_64", "qcow2"),
    );
    let a = json_ok(&r, 201);
    id_of(&a["id"]);
    let version = json_ok(&s.get("/v1/images/img/versions/1.0"), 200)["version"].clone();
    assert_eq!(a["version_id"], version["id"]);
    assert_eq!(a["variant"], "default");
    assert_eq!(a["operating_system"], "debian");
    assert_eq!(a["architecture"], "x86_64");
    assert_eq!(a["format"], "qcow2");
    assert_eq!(
        a["primary_blob_digest"],
        format!("sha256:{}", "ab".repeat(32))
    );
    assert_eq!(a["primary_blob_size_bytes"], 10);
    assert_eq!(a["primary_media_type"], "application/octet-stream");
    assert_eq!(
        keys(&a),
        [
            "architecture",
            "created_at",
            "format",
            "id",
            "operating_system",
            "primary_blob_digest",
            "primary_blob_size_bytes",
            "primary_media_type",
            "updated_at",
            "variant",
            "version_id"
        ]
    );
    ts(&a["created_at"]);

    // Identity is (variant, os, arch, format): an empty variant is `default` too.
    for variant in [None, Some(""), Some("default")] {
        let r = s.call(
            "POST",
            base,
            &w,
            &artifact_body(variant, "debian", "x86_64", "qcow2"),
        );
        r.assert_problem(
            409,
            "catalog conflict: version \"1.0\" of image \"img\" already has artifact ",
        );
        r.assert_problem(
            409,
            "with variant \"default\", operating system \"debian\", architecture \"x86_64\" and format \"qcow2\"",
        );
    }
    for (variant, os, arch, format) in [
        (None, "debian", "x86_64", "raw"),
        (None, "debian", "x86_64", "raw.gz"),
        (Some("cloud"), "debian", "x86_64", "qcow2"),
        (None, "ubuntu", "x86_64", "qcow2"),
        (None, "debian", "aarch64", "qcow2"),
        (Some("arm64+v8"), "Debian_12", "x86_64", "qcow2"),
    ] {
        let r = s.call("POST", base, &w, &artifact_body(variant, os, arch, format));
        json_ok(&r, 201);
    }

    // Validation: the handler checks the digest first, then the store checks image name,
    // version, variant, os, arch, format, digest, size and media type, in that order.
    let digest = "catalog invalid input: digest must match sha256:<64 lowercase hex chars>";
    let token = "must match ^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$";
    let with = |k: &str, v: Value| {
        let mut b = artifact_body(Some("x"), "debian", "x86_64", "qcow2");
        b[k] = v;
        b
    };
    let cases: Vec<(&str, Value, String)> = vec![
        (
            "/v1/images/BAD/versions/1.0/artifacts",
            with("primary_blob_digest", json!("sha256:XYZ")),
            digest.into(),
        ),
        (
            "/v1/images/BAD/versions/1.0/artifacts",
            with("variant", json!("y")),
            "image name must match".into(),
        ),
        (
            "/v1/images/img/versions/_1/artifacts",
            with("variant", json!("-")),
            "version must match".into(),
        ),
        (
            base,
            with("variant", json!("a/b")),
            format!("catalog invalid input: variant {token}"),
        ),
        (
            base,
            with("variant", json!("v".repeat(65))),
            format!("variant {token}"),
        ),
        (
            base,
            with("operating_system", json!("")),
            format!("catalog invalid input: operating system {token}"),
        ),
        (
            base,
            with("operating_system", json!("_x")),
            format!("operating system {token}"),
        ),
        (
            base,
            with("architecture", json!("x86 64")),
            format!("catalog invalid input: architecture {token}"),
        ),
        (
            base,
            with("format", json!("vmdk")),
            "catalog invalid input: unsupported artifact format \"vmdk\"".into(),
        ),
        (
            base,
            with("format", json!("")),
            "unsupported artifact format \"\"".into(),
        ),
        (
            base,
            with("format", json!("QCOW2")),
            "unsupported artifact format \"QCOW2\"".into(),
        ),
        (base, with("primary_blob_digest", json!("")), digest.into()),
        (
            base,
            with("primary_blob_size_bytes", json!(-1)),
            "catalog invalid input: primary blob size must be non-negative".into(),
        ),
        (
            base,
            with("primary_media_type", json!(" ")),
            "catalog invalid input: primary media type is required".into(),
        ),
        (
            base,
            with("primary_media_type", json!("")),
            "primary media type is required".into(),
        ),
    ];
    for (path, body, detail) in &cases {
        s.call("POST", path, &w, body).assert_problem(400, detail);
    }

    // Missing image or version: 404.
    let good = artifact_body(Some("z"), "debian", "x86_64", "qcow2");
    s.call("POST", "/v1/images/nope/versions/1.0/artifacts", &w, &good)
        .assert_problem(404, "catalog not found");
    s.call("POST", "/v1/images/img/versions/2.0/artifacts", &w, &good)
        .assert_problem(404, "catalog not found");

    // A version that is no longer a draft: 412.
    s.publish_image(&w, "img", "pub", b"disk", b"meta");
    let r = s.call("POST", "/v1/images/img/versions/pub/artifacts", &w, &good);
    r.assert_problem(412, "version manifest can only change while draft");
    assert_eq!(r.json()["title"], "Precondition Failed");
}

#[test]
fn attachment_add_rules() {
    let s = Server::start();
    let w = s.writer_token();
    json_ok(&create_image(&s, &w, json!({"name": "img"})), 201);
    json_ok(&create_version(&s, &w, "img", "1.0"), 201);
    json_ok(&create_version(&s, &w, "img", "2.0"), 201);
    let art = |v: &str| {
        let r = s.call(
            "POST",
            &format!("/v1/images/img/versions/{v}/artifacts"),
            &w,
            &artifact_body(None, "debian", "x86_64", "qcow2"),
        );
        json_ok(&r, 201)["id"].as_str().unwrap().to_string()
    };
    let a1 = art("1.0");
    let a2 = art("2.0");
    let path = format!("/v1/images/img/versions/1.0/artifacts/{a1}/attachments");

    let r = s.call("POST", &path, &w, &attachment_body("incus.tar.xz"));
    let att = json_ok(&r, 201);
    id_of(&att["id"]);
    assert_eq!(att["artifact_id"], a1.as_str());
    assert_eq!(att["name"], "incus.tar.xz");
    assert_eq!(att["media_type"], "text/plain");
    assert_eq!(att["blob_digest"], format!("sha256:{}", "cd".repeat(32)));
    assert_eq!(att["blob_size_bytes"], 3);
    assert_eq!(
        keys(&att),
        [
            "artifact_id",
            "blob_digest",
            "blob_size_bytes",
            "created_at",
            "id",
            "media_type",
            "name",
            "updated_at"
        ]
    );
    ts(&att["updated_at"]);

    // The same name on the same artifact conflicts; on another artifact it does not.
    let r = s.call("POST", &path, &w, &attachment_body("incus.tar.xz"));
    r.assert_problem(409, "catalog conflict: artifact ");
    r.assert_problem(409, "already has an attachment named \"incus.tar.xz\"");
    let other = format!("/v1/images/img/versions/2.0/artifacts/{a2}/attachments");
    json_ok(
        &s.call("POST", &other, &w, &attachment_body("incus.tar.xz")),
        201,
    );

    // Check order: artifact id (before the body is even decoded), JSON, digest, store rules.
    let auth = format!("Bearer {w}");
    let r = s.request(
        "POST",
        "/v1/images/img/versions/1.0/artifacts/nope/attachments",
        &[("Authorization", &auth)],
        b"{not json",
    );
    r.assert_problem(400, "artifact id must be a UUID");
    let r = s.request("POST", &path, &[("Authorization", &auth)], b"{not json");
    r.assert_problem(400, "invalid JSON request body");
    let with = |k: &str, v: Value| {
        let mut b = attachment_body("sig");
        b[k] = v;
        b
    };
    let digest = "catalog invalid input: digest must match sha256:<64 lowercase hex chars>";
    let token = "must match ^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$";
    let cases: Vec<(Value, String)> = vec![
        (
            {
                let mut b = with("blob_digest", json!("sha256:1"));
                b["name"] = json!("/bad");
                b
            },
            digest.into(),
        ),
        (
            with("name", json!("")),
            format!("catalog invalid input: attachment name {token}"),
        ),
        (
            with("name", json!("n".repeat(65))),
            format!("attachment name {token}"),
        ),
        (
            with("name", json!("a b")),
            format!("attachment name {token}"),
        ),
        (
            with("media_type", json!(" ")),
            "catalog invalid input: media type is required".into(),
        ),
        (with("blob_digest", json!("")), digest.into()),
        (
            with("blob_size_bytes", json!(-5)),
            "catalog invalid input: blob size must be non-negative".into(),
        ),
    ];
    for (body, detail) in &cases {
        s.call("POST", &path, &w, body).assert_problem(400, detail);
    }
    json_ok(
        &s.call("POST", &path, &w, &with("name", json!("n".repeat(64)))),
        201,
    );

    // The artifact must belong to that image and version.
    for p in [
        format!("/v1/images/img/versions/2.0/artifacts/{a1}/attachments"),
        format!("/v1/images/img/versions/9.0/artifacts/{a1}/attachments"),
        format!("/v1/images/nope/versions/1.0/artifacts/{a1}/attachments"),
        format!("/v1/images/img/versions/1.0/artifacts/{UNKNOWN}/attachments"),
    ] {
        s.call("POST", &p, &w, &attachment_body("x"))
            .assert_problem(404, "catalog not found");
    }

    // Not a draft any more: 412.
    let m = s.publish_image(&w, "img", "pub", b"disk", b"meta");
    let pa = m.artifact_id.as_str();
    s.call(
        "POST",
        &format!("/v1/images/img/versions/pub/artifacts/{pa}/attachments"),
        &w,
        &attachment_body("extra"),
    )
    .assert_problem(412, "version manifest can only change while draft");
}

#[test]
fn deletes_cascade_and_respect_state() {
    let s = Server::start();
    let w = s.writer_token();
    json_ok(&create_image(&s, &w, json!({"name": "img"})), 201);
    json_ok(&create_version(&s, &w, "img", "1.0"), 201);
    let base = "/v1/images/img/versions/1.0/artifacts";
    let a = json_ok(
        &s.call(
            "POST",
            base,
            &w,
            &artifact_body(None, "debian", "x86_64", "qcow2"),
        ),
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let b = json_ok(
        &s.call(
            "POST",
            base,
            &w,
            &artifact_body(None, "debian", "x86_64", "raw"),
        ),
        201,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    let add = |art: &str, name: &str| {
        let r = s.call(
            "POST",
            &format!("{base}/{art}/attachments"),
            &w,
            &attachment_body(name),
        );
        json_ok(&r, 201)["id"].as_str().unwrap().to_string()
    };
    let a1 = add(&a, "one");
    let a2 = add(&a, "two");
    let b1 = add(&b, "one");

    // Bad ids are 400; ids in the wrong place are 404.
    let del = |p: &str| s.call("DELETE", p, &w, &Value::Null);
    del(&format!("{base}/xyz")).assert_problem(400, "artifact id must be a UUID");
    del(&format!("{base}/xyz/attachments/{a1}")).assert_problem(400, "artifact id must be a UUID");
    del(&format!("{base}/{a}/attachments/xyz")).assert_problem(400, "attachment id must be a UUID");
    for p in [
        format!("{base}/{UNKNOWN}"),
        format!("/v1/images/img/versions/2.0/artifacts/{a}"),
        format!("/v1/images/other/versions/1.0/artifacts/{a}"),
        format!("{base}/{a}/attachments/{UNKNOWN}"),
        format!("{base}/{a}/attachments/{b1}"),
        format!("{base}/{b}/attachments/{a1}"),
    ] {
        del(&p).assert_problem(404, "catalog not found");
    }

    // Deleting an attachment: 204 with an empty body, then 404.
    let r = del(&format!("{base}/{a}/attachments/{a1}"));
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    del(&format!("{base}/{a}/attachments/{a1}")).assert_problem(404, "catalog not found");

    // Deleting an artifact cascades to its attachments.
    let r = del(&format!("{base}/{a}"));
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
    del(&format!("{base}/{a}")).assert_problem(404, "catalog not found");
    del(&format!("{base}/{a}/attachments/{a2}")).assert_problem(404, "catalog not found");
    let m = json_ok(&s.get("/v1/images/img/versions/1.0"), 200);
    assert_eq!(m["artifacts"].as_array().unwrap().len(), 1);
    assert_eq!(m["artifacts"][0]["artifact"]["id"], b.as_str());
    assert_eq!(m["artifacts"][0]["attachments"][0]["id"], b1.as_str());

    // A published manifest can delete nothing.
    let m = s.publish_image(&w, "img", "pub", b"disk", b"meta");
    let pa = m.artifact_id.as_str();
    let pt = m.attachment_id.as_str();
    let pbase = "/v1/images/img/versions/pub/artifacts";
    del(&format!("{pbase}/{pa}/attachments/{pt}"))
        .assert_problem(412, "version manifest can only change while draft");
    del(&format!("{pbase}/{pa}"))
        .assert_problem(412, "version manifest can only change while draft");
    assert_eq!(
        json_ok(&s.get("/v1/images/img/versions/pub"), 200),
        m.manifest
    );
}

#[test]
fn artifact_reads_see_published_versions_only() {
    let s = Server::start();
    let w = s.writer_token();
    let draft = draft_with_artifact(&s, &w, "img", "draft", b"draft-disk");
    let did = draft["id"].as_str().unwrap();
    s.get("/v1/images/img/versions/draft/artifacts")
        .assert_problem(404, "catalog not found");
    s.get(&format!("/v1/images/img/versions/draft/artifacts/{did}"))
        .assert_problem(404, "catalog not found");

    let m = s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let list = json_ok(&s.get("/v1/images/img/versions/1.0/artifacts"), 200);
    assert_eq!(keys(&list), ["artifacts"]);
    assert_eq!(list["artifacts"].as_array().unwrap().len(), 1);
    assert_eq!(list["artifacts"][0], m.manifest["artifacts"][0]["artifact"]);
    let aid = m.artifact_id.as_str();
    let one = json_ok(
        &s.get(&format!("/v1/images/img/versions/1.0/artifacts/{aid}")),
        200,
    );
    assert_eq!(one, m.manifest["artifacts"][0]["artifact"]);

    s.get("/v1/images/img/versions/1.0/artifacts/nope")
        .assert_problem(400, "artifact id must be a UUID");
    for p in [
        format!("/v1/images/img/versions/1.0/artifacts/{UNKNOWN}"),
        format!("/v1/images/img/versions/1.0/artifacts/{did}"),
        format!("/v1/images/img/versions/draft/artifacts/{aid}"),
        format!("/v1/images/other/versions/1.0/artifacts/{aid}"),
        "/v1/images/img/versions/9/artifacts".to_string(),
    ] {
        s.get(&p).assert_problem(404, "catalog not found");
    }
}

#[test]
fn refs_resolve_versions_then_aliases() {
    let s = Server::start();
    let w = s.writer_token();
    let v1 = s.publish_image(&w, "img", "1.0", b"d1", b"m1");
    let v2 = s.publish_image(&w, "img", "2.0", b"d2", b"m2");
    json_ok(&create_version(&s, &w, "img", "3.0"), 201);

    // An exact published version.
    assert_eq!(json_ok(&s.get("/v1/images/img/refs/1.0"), 200), v1.manifest);
    // An alias (resolved at request time).
    let put = |alias: &str, version: &str| {
        let r = s.call(
            "PUT",
            &format!("/v1/images/img/aliases/{alias}"),
            &w,
            &json!({"version": version}),
        );
        json_ok(&r, 200);
    };
    put("latest", "2.0");
    assert_eq!(
        json_ok(&s.get("/v1/images/img/refs/latest"), 200),
        v2.manifest
    );
    put("latest", "1.0");
    assert_eq!(
        json_ok(&s.get("/v1/images/img/refs/latest"), 200),
        v1.manifest
    );

    // A draft never resolves, but an alias of the same name as a draft version does.
    s.get("/v1/images/img/refs/3.0")
        .assert_problem(404, "catalog not found");
    put("3.0", "2.0");
    assert_eq!(json_ok(&s.get("/v1/images/img/refs/3.0"), 200), v2.manifest);

    s.get("/v1/images/img/refs/nothing")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/nope/refs/1.0")
        .assert_problem(404, "catalog not found");
    s.get("/v1/images/img/refs/_bad")
        .assert_problem(400, "version must match");
    s.get("/v1/images/img/refs/a%20b")
        .assert_problem(400, "version must match");
    s.get("/v1/images/IMG/refs/1.0")
        .assert_problem(400, "image name must match");
    // A ref may use the version pattern's `+` and `:`.
    s.get("/v1/images/img/refs/1.0+b:1")
        .assert_problem(404, "catalog not found");
}
