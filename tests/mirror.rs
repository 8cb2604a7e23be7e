//! `imgsrv mirror` between two real servers: a first copy, then an alias move, a new version and
//! a retirement upstream applied by the next run; an interrupted run resumed; the Simple Streams
//! documents of both sides list the same products and fingerprints.

use crate::push::*;
use crate::util::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Product key -> sorted fingerprints, from a server's `images.json`.
fn products(s: &Server) -> BTreeMap<String, Vec<String>> {
    let doc = s.get("/streams/v1/images.json").json();
    let mut out = BTreeMap::new();
    for (key, p) in doc["products"].as_object().unwrap() {
        let mut fps: Vec<String> = p["versions"]
            .as_object()
            .unwrap()
            .values()
            .filter_map(|v| {
                v["items"]["incus.tar.xz"]["combined_disk-kvm-img_sha256"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        fps.sort();
        let aliases = p["aliases"].as_str().unwrap_or_default().to_string();
        fps.push(format!("aliases={aliases}"));
        out.insert(key.clone(), fps);
    }
    out
}

/// Pushes the image files in `dir` to `t` as `image` `version`.
fn push_dir(t: &Target, image: &str, version: &str, dir: &Path) {
    let d = dir.display().to_string();
    run_ok(t.push(&[image, version, &d, "--part-size-mib", "1"]));
}

fn version_list(s: &Server, image: &str) -> Vec<String> {
    let mut v: Vec<String> = s.get(&format!("/v1/images/{image}/versions")).json()["versions"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|v| v["version"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn mirror_copies_versions_and_follows_alias_moves_and_retirements() {
    if !archivers_present() {
        return;
    }
    let (upstream, downstream) = (Target::new(Server::start()), Target::with_metrics());
    let (up, down, uw) = (&upstream.s, &downstream.s, &upstream.w);
    up.create_image(uw, &json!({"name": "debian", "display_name": "Debian 12"}));
    let one = upstream.image_dir("one", &bytes(2 * CHUNK_SIZE + 5, 11), "x86_64");
    let arm = upstream.image_dir("arm", &bytes(300_000, 12), "aarch64");
    let two = upstream.image_dir("two", &bytes(CHUNK_SIZE + 99, 13), "x86_64");
    push_dir(&upstream, "debian", "1.0", &one);
    push_dir(&upstream, "debian", "1.1", &arm);
    push_dir(&upstream, "other", "0.1", &two);
    up.put_alias(uw, "debian", "latest", "1.0");
    let mirror = |args: &[&str]| run_ok(downstream.mirror_from(up, args));

    mirror(&["--image", "debian"]);
    assert_eq!(version_list(down, "debian"), vec!["1.0", "1.1"]);
    assert_eq!(down.get("/v1/images/other").status, 404, "not selected");
    assert_eq!(
        down.get("/v1/images/debian").json()["display_name"],
        "Debian 12"
    );
    assert_eq!(
        down.get("/v1/images/debian/aliases/latest").json()["version"],
        "1.0"
    );
    let mut debian_up = products(up);
    debian_up.retain(|k, _| k.starts_with("debian:"));
    assert_eq!(products(down), debian_up);
    let disk = std::fs::read(one.join("disk.qcow2")).unwrap();
    let m = down.get("/v1/images/debian/refs/latest").json();
    let aid = m["artifacts"][0]["artifact"]["id"].as_str().unwrap();
    let got = down.get(&format!(
        "/v1/images/debian/versions/1.0/artifacts/{aid}/download"
    ));
    assert!(got.body == disk, "mirrored disk differs");
    let sent = downstream.part_bytes();

    // A rerun transfers nothing.
    let o = mirror(&["--image", "debian"]);
    assert_eq!(downstream.part_bytes(), sent, "{}", show(&o));

    // Upstream: a new version, the alias moved to it, 1.0 retired.
    push_dir(&upstream, "debian", "2.0", &two);
    up.put_alias(uw, "debian", "latest", "2.0");
    up.put_alias(uw, "debian", "stable", "1.1");
    let r = up.retire(uw, "debian", "1.0");
    assert_eq!(r.status, 204, "{}", r.text());

    // Only x86_64 this time: 1.1 (aarch64 only) is not touched, 2.0 comes over.
    let o = mirror(&["--arch", "amd64"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("retired debian 1.0"), "{}", show(&o));
    assert!(out.contains("alias debian/latest -> 2.0"), "{}", show(&o));
    assert_eq!(version_list(down, "debian"), vec!["1.1", "2.0"]);
    assert_eq!(version_list(down, "other"), vec!["0.1"]);
    assert_eq!(
        down.get("/v1/images/debian/aliases/latest").json()["version"],
        "2.0"
    );
    assert_eq!(
        down.get("/v1/images/debian/aliases/stable").json()["version"],
        "1.1",
        "1.1 was mirrored before, so its alias follows"
    );
    assert_eq!(products(down), products(up));

    // Bytes the mirror has are not fetched again: 2.0's disk was pushed upstream as
    // `other` 0.1 already, and came over with it.
    mirror(&[]);
    assert_eq!(products(down), products(up));
}

#[test]
fn mirror_interrupted_resumes() {
    if !archivers_present() {
        return;
    }
    let (up, down) = (Target::new(Server::start()), Target::with_metrics());
    let disk = bytes(32 * MIB + 3, 21);
    let dir = up.image_dir("big", &disk, "x86_64");
    push_dir(&up, "big", "1.0", &dir);

    let meta = std::fs::metadata(dir.join("incus.tar.xz")).unwrap().len();
    let total = disk.len() as u64 + meta;
    let cmd = || down.mirror_from(&up.s, &["--parallel", "2"]);
    interrupt_and_resume("mirror", &down, cmd, 6, total);
    let m = down.s.get("/v1/images/big/versions/1.0").json();
    assert_eq!(m["version"]["state"], "published", "{m}");
    assert_eq!(
        m["artifacts"][0]["artifact"]["primary_blob_digest"],
        sha256_digest(&disk)
    );
    assert_eq!(products(&down.s), products(&up.s));
}
