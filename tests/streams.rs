//! The Incus Simple Streams documents over HTTP: eligibility, item paths that download the
//! listed bytes, fingerprints, caching headers, aliases resolved at render time, and that only
//! published versions appear.

use crate::util::tables::VERSIONS;
use crate::util::*;
use serde_json::{Map, Value, json};

const INDEX: &str = "/streams/v1/index.json";
const IMAGES: &str = "/streams/v1/images.json";

/// One artifact to create in a draft version.
struct Art<'a> {
    format: &'a str,
    arch: &'a str,
    variant: &'a str,
    disk: &'a [u8],
    attachments: Vec<(&'a str, &'a [u8])>,
}

/// A qcow2 x86_64 `default` artifact with an `incus.tar.xz` attachment.
fn eligible<'a>(disk: &'a [u8], meta: &'a [u8]) -> Art<'a> {
    Art {
        format: "qcow2",
        arch: "x86_64",
        variant: "default",
        disk,
        attachments: vec![("incus.tar.xz", meta)],
    }
}

/// Creates the image (if needed) and a draft version holding `arts`. Returns the artifact ids.
fn draft(s: &Server, token: &str, image: &str, version: &str, arts: &[Art]) -> Vec<String> {
    let r = s.call("POST", "/v1/images", token, &json!({"name": image}));
    assert!(r.status == 201 || r.status == 409, "{}", r.text());
    let r = s.call(
        "POST",
        &format!("/v1/images/{image}/versions"),
        token,
        &json!({"version": version}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let mut ids = Vec::new();
    for a in arts {
        let d = s.upload(token, a.disk);
        let r = s.call(
            "POST",
            &format!("/v1/images/{image}/versions/{version}/artifacts"),
            token,
            &json!({"operating_system": "debian", "architecture": a.arch, "format": a.format,
                    "variant": a.variant, "primary_blob_digest": d,
                    "primary_blob_size_bytes": a.disk.len(),
                    "primary_media_type": "application/octet-stream"}),
        );
        assert_eq!(r.status, 201, "{}", r.text());
        let aid = r.json()["id"].as_str().unwrap().to_string();
        for (name, data) in &a.attachments {
            let digest = s.upload(token, data);
            let r = s.call(
                "POST",
                &format!("/v1/images/{image}/versions/{version}/artifacts/{aid}/attachments"),
                token,
                &json!({"name": name, "media_type": "application/octet-stream",
                        "blob_digest": digest, "blob_size_bytes": data.len()}),
            );
            assert_eq!(r.status, 201, "{}", r.text());
        }
        ids.push(aid);
    }
    ids
}

/// Fetches a document, checks the headers every 200 carries, and returns it with its ETag.
fn fetch(s: &Server, path: &str) -> (Value, String) {
    let r = s.get(path);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.header("Cache-Control"), Some("no-cache"));
    assert!(r.body.ends_with(b"}\n"), "{}", r.text());
    let etag = r.header("ETag").expect("ETag").to_string();
    assert_eq!(etag, format!("\"{}\"", sha256_hex(&r.body)));
    (r.json(), etag)
}

fn product_keys(s: &Server) -> Vec<String> {
    let (index, _) = fetch(s, INDEX);
    let listed: Vec<String> = index["index"]["images"]
        .get("products")
        .map(|p| {
            p.as_array()
                .unwrap()
                .iter()
                .map(|k| k.as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    let (images, _) = fetch(s, IMAGES);
    let keys: Vec<String> = images["products"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(listed, keys, "index.json and images.json disagree");
    keys
}

fn products(s: &Server) -> Map<String, Value> {
    fetch(s, IMAGES).0["products"].as_object().unwrap().clone()
}

/// The one version entry of a product (there is exactly one per product).
fn only_version(product: &Value) -> (String, Value) {
    let versions = product["versions"].as_object().unwrap();
    assert_eq!(versions.len(), 1, "{product}");
    let (k, v) = versions.iter().next().unwrap();
    (k.clone(), v.clone())
}

#[test]
fn empty_catalog_lists_nothing() {
    let s = Server::start();
    let (index, _) = fetch(&s, INDEX);
    assert_eq!(
        index,
        json!({"format": "index:1.0", "index": {"images": {"datatype": "image-downloads",
               "format": "products:1.0", "path": "streams/v1/images.json"}}})
    );
    let (images, _) = fetch(&s, IMAGES);
    assert_eq!(
        images,
        json!({"content_id": "images", "datatype": "image-downloads",
               "format": "products:1.0", "products": {}})
    );
}

#[test]
fn only_eligible_artifacts_are_listed() {
    let s = Server::start();
    let w = s.writer_token();
    let meta = bytes(500, 1);
    let (d1, d2, d3) = (bytes(3000, 2), bytes(3001, 3), bytes(3002, 4));
    let sums = b"not incus metadata".to_vec();
    draft(
        &s,
        &w,
        "img",
        "1.0",
        &[
            eligible(&d1, &meta),
            // A raw disk is not something Incus can boot from these documents.
            Art {
                format: "raw",
                arch: "x86_64",
                variant: "default",
                disk: &d2,
                attachments: vec![("incus.tar.xz", &meta)],
            },
            // A qcow2 without `incus.tar.xz` has no Incus metadata and no fingerprint.
            Art {
                format: "qcow2",
                arch: "aarch64",
                variant: "default",
                disk: &d3,
                attachments: vec![("SHA256SUMS", &sums)],
            },
        ],
    );
    s.publish(&w, "img", "1.0");
    assert_eq!(product_keys(&s), ["img:1.0:amd64:default"]);
    let p = &products(&s)["img:1.0:amd64:default"];
    assert_eq!(p["arch"], "amd64");
    assert_eq!(p["os"], "debian");
    assert_eq!(p["release"], "1.0");
    assert_eq!(p["release_title"], "img 1.0");
    assert_eq!(p["variant"], "default");
    assert_eq!(p["aliases"], "img/1.0");
    assert_eq!(p["requirements"], json!({}));
}

#[test]
fn items_download_the_listed_bytes() {
    let s = Server::start();
    let w = s.writer_token();
    let disk = bytes(2 * CHUNK_SIZE + 5, 11);
    let meta = bytes(4321, 12);
    let m = s.publish_image(&w, "debian-bookworm", "12.5.0+b1", &disk, &meta);
    let (aid, tid) = (m.artifact_id, m.attachment_id);
    let products = products(&s);
    assert_eq!(
        products.keys().collect::<Vec<_>>(),
        ["debian-bookworm:12.5.0+b1:amd64:default"]
    );
    let (serial, version) = only_version(&products["debian-bookworm:12.5.0+b1:amd64:default"]);
    // The version key is the publish time, `YYYYMMDD_HH:MM` in UTC.
    let published = time::OffsetDateTime::parse(
        m.manifest["version"]["published_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert_eq!(
        serial,
        format!(
            "{:04}{:02}{:02}_{:02}:{:02}",
            published.year(),
            u8::from(published.month()),
            published.day(),
            published.hour(),
            published.minute()
        )
    );
    assert_eq!(version["label"], "12.5.0+b1");
    let items = version["items"].as_object().unwrap();
    assert_eq!(items.len(), 2, "{version}");

    let disk_item = &items["disk-kvm.img"];
    assert_eq!(disk_item["ftype"], "disk-kvm.img");
    assert_eq!(
        disk_item["path"],
        format!(
            "v1/images/debian-bookworm/versions/12.5.0%2Bb1/artifacts/{aid}/download/disk.qcow2"
        )
    );
    let meta_item = &items["incus.tar.xz"];
    assert_eq!(meta_item["ftype"], "incus.tar.xz");
    assert_eq!(
        meta_item["path"],
        format!(
            "v1/images/debian-bookworm/versions/12.5.0%2Bb1/artifacts/{aid}/attachments/{tid}/download/incus.tar.xz"
        )
    );
    let mut combined = meta.clone();
    combined.extend_from_slice(&disk);
    assert_eq!(
        meta_item["combined_disk-kvm-img_sha256"],
        sha256_hex(&combined)
    );
    assert!(disk_item.get("combined_disk-kvm-img_sha256").is_none());

    for (item, expected) in [(disk_item, &disk), (meta_item, &meta)] {
        let path = item["path"].as_str().unwrap();
        let r = s.get(&format!("/{path}"));
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert!(r.body == *expected, "{path} served different bytes");
        assert_eq!(item["sha256"], sha256_hex(&r.body));
        assert_eq!(item["size"], r.body.len());
    }
}

#[test]
fn documents_carry_etag_no_cache_and_answer_304_and_head() {
    let s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", &bytes(2000, 21), &bytes(300, 22));
    for path in [INDEX, IMAGES] {
        let r = s.get(path);
        assert_eq!(r.status, 200);
        let etag = r.header("ETag").unwrap().to_string();
        assert!(
            etag.starts_with('"') && etag.ends_with('"') && etag.len() == 66,
            "{etag}"
        );

        let nm = s.get_with(path, &[("If-None-Match", &etag)]);
        assert_eq!(nm.status, 304, "{}", nm.text());
        assert!(nm.body.is_empty());
        assert_eq!(nm.header("ETag"), Some(etag.as_str()));
        assert_eq!(nm.header("Cache-Control"), Some("no-cache"));
        let weak = format!("W/{etag}");
        let listed = format!("\"other\", {etag}");
        for v in [weak.as_str(), listed.as_str(), "*"] {
            assert_eq!(s.get_with(path, &[("If-None-Match", v)]).status, 304, "{v}");
        }
        let other = s.get_with(path, &[("If-None-Match", "\"other\"")]);
        assert_eq!(other.status, 200);
        assert!(other.body == r.body);
        // A date alone never answers 304: the documents carry no Last-Modified.
        let dated = s.get_with(
            path,
            &[("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")],
        );
        assert_eq!(dated.status, 200);

        let h = s.head(path);
        assert_eq!(h.status, 200);
        assert!(h.body.is_empty());
        assert_eq!(h.header("ETag"), Some(etag.as_str()));
        assert_eq!(h.header("Content-Type"), Some("application/json"));
        assert_eq!(h.header("Cache-Control"), Some("no-cache"));
        assert_eq!(
            h.header("Content-Length"),
            Some(r.body.len().to_string().as_str())
        );
        // Anonymous: no Authorization was sent, and writes are not routes here.
        assert_eq!(s.request("POST", path, &[], b"").status, 405);
    }
}

#[test]
fn aliases_are_resolved_at_render_time() {
    let s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", &bytes(2000, 31), &bytes(300, 32));
    s.publish_image(&w, "img", "1.1", &bytes(2000, 33), &bytes(300, 34));
    let (_, index0) = fetch(&s, INDEX);
    let (_, e0) = fetch(&s, IMAGES);

    s.put_alias(&w, "img", "latest", "1.0");
    let p = products(&s);
    assert_eq!(p["img:1.0:amd64:default"]["aliases"], "img/1.0,img/latest");
    assert_eq!(p["img:1.1:amd64:default"]["aliases"], "img/1.1");
    let (_, e1) = fetch(&s, IMAGES);
    assert_ne!(e0, e1);
    // A client holding the old document gets the new one.
    assert_eq!(s.get_with(IMAGES, &[("If-None-Match", &e0)]).status, 200);

    s.put_alias(&w, "img", "latest", "1.1");
    let p = products(&s);
    assert_eq!(p["img:1.0:amd64:default"]["aliases"], "img/1.0");
    assert_eq!(p["img:1.1:amd64:default"]["aliases"], "img/1.1,img/latest");
    let (_, e2) = fetch(&s, IMAGES);
    assert_ne!(e1, e2);
    assert_eq!(s.get_with(IMAGES, &[("If-None-Match", &e1)]).status, 200);
    assert_eq!(s.get_with(IMAGES, &[("If-None-Match", &e2)]).status, 304);

    let r = s.call("DELETE", "/v1/images/img/aliases/latest", &w, &Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    let p = products(&s);
    assert_eq!(p["img:1.1:amd64:default"]["aliases"], "img/1.1");
    // Back to the state before any alias existed, byte for byte.
    assert_eq!(fetch(&s, IMAGES).1, e0);
    // Alias moves never change the product list, so index.json stayed the same throughout.
    assert_eq!(fetch(&s, INDEX).1, index0);
}

#[test]
fn identical_bytes_are_listed_once() {
    let s = Server::start();
    let w = s.writer_token();
    let (disk, meta) = (bytes(5000, 41), bytes(400, 42));
    s.publish_image(&w, "img", "1.0", &disk, &meta);
    s.publish_image(&w, "img", "1.1", &disk, &meta);
    s.put_alias(&w, "img", "latest", "1.1");
    let p = products(&s);
    assert_eq!(p.keys().collect::<Vec<_>>(), ["img:1.0:amd64:default"]);
    assert_eq!(
        p["img:1.0:amd64:default"]["aliases"],
        "img/1.0,img/1.1,img/latest"
    );
    let mut combined = meta.clone();
    combined.extend_from_slice(&disk);
    let body = s.get(IMAGES).text();
    assert_eq!(body.matches(&sha256_hex(&combined)).count(), 1, "{body}");
}

#[test]
fn versions_that_are_not_published_never_appear() {
    let mut s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", &bytes(2000, 51), &bytes(300, 52));
    // An eligible draft.
    let (d, meta) = (bytes(2000, 53), bytes(300, 54));
    draft(&s, &w, "img", "2.0", &[eligible(&d, &meta)]);
    assert_eq!(product_keys(&s), ["img:1.0:amd64:default"]);

    // A version that is `publishing` while its Simple Streams rows exist: publish one, then
    // set it back to `publishing` in the database file while the server is down. The rows
    // alone must not make it visible.
    let m = s.publish_image(&w, "img", "3.0", &bytes(2000, 55), &bytes(300, 56));
    assert_eq!(
        product_keys(&s),
        ["img:1.0:amd64:default", "img:3.0:amd64:default"]
    );
    let vid = uuid::Uuid::parse_str(&m.version_id).unwrap().as_u128();
    s.kill9();
    {
        use redb::ReadableTable;
        let db = redb::Database::open(s.db_path()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(VERSIONS).unwrap();
            let mut v: Value =
                serde_json::from_slice(t.get(vid).unwrap().unwrap().value()).unwrap();
            v["state"] = json!("publishing");
            v.as_object_mut().unwrap().remove("published_at");
            t.insert(vid, serde_json::to_vec(&v).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    s.restart();
    assert_eq!(
        s.get("/v1/images/img/versions/3.0").json()["version"]["state"],
        "publishing"
    );
    assert_eq!(product_keys(&s), ["img:1.0:amd64:default"]);
}

#[test]
fn unknown_architectures_are_left_out_and_logged_once_per_render() {
    let s = Server::start();
    let w = s.writer_token();
    let (d1, d2, meta) = (bytes(2000, 61), bytes(2000, 62), bytes(300, 63));
    draft(
        &s,
        &w,
        "img",
        "1.0",
        &[
            eligible(&d1, &meta),
            Art {
                format: "qcow2",
                arch: "pdp11",
                variant: "default",
                disk: &d2,
                attachments: vec![("incus.tar.xz", &meta)],
            },
        ],
    );
    s.publish(&w, "img", "1.0");
    // The log is read by another thread, so wait until a line arrives before counting.
    let warned = |at_least: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let n = s
                .log_text()
                .matches("architectures Incus does not know: pdp11")
                .count();
            if n >= at_least || std::time::Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    for _ in 0..3 {
        assert_eq!(product_keys(&s), ["img:1.0:amd64:default"]);
    }
    // Both documents come from one render, cached until the catalog changes.
    assert_eq!(warned(1), 1, "{}", s.log_text());
    s.put_alias(&w, "img", "latest", "1.0");
    assert_eq!(product_keys(&s), ["img:1.0:amd64:default"]);
    assert_eq!(warned(2), 2, "{}", s.log_text());
}

/// Adds one x86_64 `default` artifact with an `incus.tar.xz` attachment to a draft.
fn add_incus_artifact(
    s: &Server,
    token: &str,
    version: &str,
    format: &str,
    primary: &[u8],
    meta: &[u8],
    requirements: Value,
) {
    let d = s.upload(token, primary);
    let mut body = json!({"operating_system": "debian", "architecture": "x86_64", "format": format,
                          "primary_blob_digest": d, "primary_blob_size_bytes": primary.len(),
                          "primary_media_type": "application/octet-stream"});
    if !requirements.is_null() {
        body["incus_requirements"] = requirements;
    }
    let v = format!("/v1/images/uni/versions/{version}");
    let r = s.call("POST", &format!("{v}/artifacts"), token, &body);
    assert_eq!(r.status, 201, "{}", r.text());
    let aid = r.json()["id"].as_str().unwrap().to_string();
    let m = s.upload(token, meta);
    let r = s.call(
        "POST",
        &format!("{v}/artifacts/{aid}/attachments"),
        token,
        &json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                "blob_digest": m, "blob_size_bytes": meta.len()}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
}

#[test]
fn a_unified_version_is_one_product_with_both_images() {
    let s = Server::start();
    let w = s.writer_token();
    let (disk, root, meta) = (bytes(5000, 1), bytes(3000, 2), bytes(300, 3));
    draft(&s, &w, "uni", "1.0", &[]);
    add_incus_artifact(
        &s,
        &w,
        "1.0",
        "qcow2",
        &disk,
        &meta,
        json!({"secureboot": "false"}),
    );
    add_incus_artifact(&s, &w, "1.0", "squashfs", &root, &meta, Value::Null);
    s.publish(&w, "uni", "1.0");
    let (images, _) = fetch(&s, IMAGES);
    let p = &images["products"]["uni:1.0:amd64:default"];
    assert_eq!(p["requirements"], json!({"secureboot": "false"}));
    let items = p["versions"].as_object().unwrap().values().next().unwrap()["items"].clone();
    let combined = |primary: &[u8]| {
        let mut both = meta.clone();
        both.extend_from_slice(primary);
        sha256_hex(&both)
    };
    assert_eq!(
        items["incus.tar.xz"]["combined_disk-kvm-img_sha256"],
        combined(&disk)
    );
    assert_eq!(
        items["incus.tar.xz"]["combined_squashfs_sha256"],
        combined(&root)
    );
    assert_eq!(items["root.squashfs"]["ftype"], "squashfs");
    // Every item path downloads the listed bytes, under a real file name.
    for (name, want) in [
        ("disk-kvm.img", &disk),
        ("root.squashfs", &root),
        ("incus.tar.xz", &meta),
    ] {
        let path = items[name]["path"].as_str().unwrap();
        let r = s.get(&format!("/{path}"));
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(&r.body, want, "{path}");
        assert_eq!(items[name]["sha256"], sha256_hex(want));
    }
    assert!(
        items["root.squashfs"]["path"]
            .as_str()
            .unwrap()
            .ends_with("/download/rootfs.squashfs")
    );
}

#[test]
fn a_unified_version_needs_one_metadata_file_and_agreeing_requirements() {
    let s = Server::start();
    let w = s.writer_token();
    let (disk, root) = (bytes(5000, 1), bytes(3000, 2));
    draft(&s, &w, "uni", "1.0", &[]);
    add_incus_artifact(&s, &w, "1.0", "qcow2", &disk, b"meta one", Value::Null);
    add_incus_artifact(&s, &w, "1.0", "squashfs", &root, b"meta two", Value::Null);
    s.request_publish(&w, "uni", "1.0")
        .assert_problem(412, "carry different incus.tar.xz bytes");
    assert_eq!(
        s.get("/v1/images/uni/versions/1.0").json()["version"]["state"],
        "draft",
        "the version stays a draft"
    );

    draft(&s, &w, "uni", "2.0", &[]);
    add_incus_artifact(
        &s,
        &w,
        "2.0",
        "qcow2",
        &disk,
        b"meta",
        json!({"secureboot": "false"}),
    );
    add_incus_artifact(
        &s,
        &w,
        "2.0",
        "squashfs",
        &root,
        b"meta",
        json!({"secureboot": "true"}),
    );
    s.request_publish(&w, "uni", "2.0")
        .assert_problem(412, "secureboot");

    // Requirements belong to the formats Incus lists, and must be plain short text.
    let d = s.upload(&w, &disk);
    for (format, req, detail) in [
        (
            "raw",
            json!({"secureboot": "false"}),
            "only accepted on qcow2 and squashfs",
        ),
        ("qcow2", json!({"bad/name": "x"}), "incus requirement name"),
        ("qcow2", json!({"secureboot": ""}), "printable ASCII"),
        (
            "qcow2",
            json!({"secureboot": false}),
            "invalid JSON request body",
        ),
    ] {
        let r = s.call(
            "POST",
            "/v1/images/uni/versions/2.0/artifacts",
            &w,
            &json!({"operating_system": "other", "architecture": "x86_64", "format": format,
                    "primary_blob_digest": d, "primary_blob_size_bytes": disk.len(),
                    "primary_media_type": "application/octet-stream",
                    "incus_requirements": req}),
        );
        r.assert_problem(400, detail);
    }
}

/// Clients that accept gzip (Incus's Go client does) get each document compressed, with its
/// own strong tag and `Vary: Accept-Encoding`; the bytes are the plain document's.
#[test]
fn documents_are_served_gzip_to_clients_that_accept_it() {
    let s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    for path in [INDEX, IMAGES] {
        let plain = s.get(path);
        assert_eq!(plain.status, 200);
        assert_eq!(plain.header("Content-Encoding"), None, "{path}");
        assert_eq!(plain.header("Vary"), Some("Accept-Encoding"), "{path}");
        let plain_tag = plain.header("ETag").unwrap().to_string();

        let z = s.get_with(path, &[("Accept-Encoding", "deflate, gzip")]);
        assert_eq!(z.status, 200, "{path}");
        assert_eq!(z.header("Content-Encoding"), Some("gzip"), "{path}");
        assert_eq!(z.header("Vary"), Some("Accept-Encoding"), "{path}");
        assert_eq!(z.header("Cache-Control"), Some("no-cache"), "{path}");
        assert_eq!(gunzip(&z.body), plain.body, "{path}");
        let tag = z.header("ETag").unwrap().to_string();
        assert_eq!(
            tag,
            format!("\"{}-gzip\"", plain_tag.trim_matches('"')),
            "{path}"
        );

        // Each representation revalidates against its own tag only.
        let h = [("Accept-Encoding", "gzip"), ("If-None-Match", tag.as_str())];
        let nm = s.get_with(path, &h);
        assert_eq!(nm.status, 304, "{path}");
        assert_eq!(nm.header("ETag"), Some(tag.as_str()));
        let h = [("If-None-Match", tag.as_str())];
        assert_eq!(s.get_with(path, &h).status, 200, "{path}");
        // A coding refused with q=0 gets the plain document.
        let refused = s.get_with(path, &[("Accept-Encoding", "gzip;q=0")]);
        assert_eq!(refused.header("Content-Encoding"), None);
        assert_eq!(refused.body, plain.body);
    }
}
