//! `imgsrv mirror` between two real servers: a first copy, then an alias move, a new version and
//! a retirement upstream applied by the next run; an interrupted run resumed; the Simple Streams
//! documents of both sides list the same products and fingerprints.

use crate::push::*;
use crate::util::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

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

fn push_dir(s: &Server, token: &str, state: &Path, image: &str, version: &str, dir: &Path) {
    let url = format!("http://{}", s.addr);
    let d = dir.display().to_string();
    let o = run(client(
        state,
        Some(token),
        &[
            "push",
            "--server",
            &url,
            image,
            version,
            &d,
            "--part-size-mib",
            "1",
        ],
    ));
    assert!(o.status.success(), "{}", show(&o));
}

fn mirror(
    up: &Server,
    down: &Server,
    token: &str,
    state: &Path,
    extra: &[&str],
) -> std::process::Output {
    let (from, to) = (
        format!("http://{}", up.addr),
        format!("http://{}", down.addr),
    );
    let mut args = vec![
        "mirror",
        "--from",
        &from,
        "--to",
        &to,
        "--part-size-mib",
        "1",
    ];
    args.extend_from_slice(extra);
    run(client(state, Some(token), &args))
}

fn put_alias(s: &Server, w: &str, image: &str, alias: &str, version: &str) {
    let r = s.call(
        "PUT",
        &format!("/v1/images/{image}/aliases/{alias}"),
        w,
        &json!({ "version": version }),
    );
    assert_eq!(r.status, 200, "{}", r.text());
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
    if !require_tool("tar") || !require_tool("xz") {
        return;
    }
    let up = Server::start();
    let down = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&down);
    let uw = up.writer_token();
    let dw = down.writer_token();
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    let r = up.call(
        "POST",
        "/v1/images",
        &uw,
        &json!({"name": "debian", "display_name": "Debian 12"}),
    );
    assert_eq!(r.status, 201);
    let one = image_dir(work.path(), "one", &bytes(2 * CHUNK_SIZE + 5, 11), "x86_64");
    let arm = image_dir(work.path(), "arm", &bytes(300_000, 12), "aarch64");
    let two = image_dir(work.path(), "two", &bytes(CHUNK_SIZE + 99, 13), "x86_64");
    push_dir(&up, &uw, &state, "debian", "1.0", &one);
    push_dir(&up, &uw, &state, "debian", "1.1", &arm);
    push_dir(&up, &uw, &state, "other", "0.1", &two);
    put_alias(&up, &uw, "debian", "latest", "1.0");

    let o = mirror(&up, &down, &dw, &state, &["--image", "debian"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(version_list(&down, "debian"), vec!["1.0", "1.1"]);
    assert_eq!(down.get("/v1/images/other").status, 404, "not selected");
    assert_eq!(
        down.get("/v1/images/debian").json()["display_name"],
        "Debian 12"
    );
    assert_eq!(
        down.get("/v1/images/debian/aliases/latest").json()["version"],
        "1.0"
    );
    let mut debian_up = products(&up);
    debian_up.retain(|k, _| k.starts_with("debian:"));
    assert_eq!(products(&down), debian_up);
    let disk = std::fs::read(one.join("disk.qcow2")).unwrap();
    let m = down.get("/v1/images/debian/refs/latest").json();
    let aid = m["artifacts"][0]["artifact"]["id"].as_str().unwrap();
    let got = down.get(&format!(
        "/v1/images/debian/versions/1.0/artifacts/{aid}/download"
    ));
    assert!(got.body == disk, "mirrored disk differs");
    let sent = part_bytes(&metrics);

    // A rerun transfers nothing.
    let o = mirror(&up, &down, &dw, &state, &["--image", "debian"]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(part_bytes(&metrics), sent, "{}", show(&o));

    // Upstream: a new version, the alias moved to it, 1.0 retired.
    push_dir(&up, &uw, &state, "debian", "2.0", &two);
    put_alias(&up, &uw, "debian", "latest", "2.0");
    put_alias(&up, &uw, "debian", "stable", "1.1");
    let r = up.call(
        "DELETE",
        "/v1/images/debian/versions/1.0",
        &uw,
        &Value::Null,
    );
    assert_eq!(r.status, 204, "{}", r.text());

    // Only x86_64 this time: 1.1 (aarch64 only) is not touched, 2.0 comes over.
    let o = mirror(&up, &down, &dw, &state, &["--arch", "amd64"]);
    assert!(o.status.success(), "{}", show(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("retired debian 1.0"), "{}", show(&o));
    assert!(out.contains("alias debian/latest -> 2.0"), "{}", show(&o));
    assert_eq!(version_list(&down, "debian"), vec!["1.1", "2.0"]);
    assert_eq!(version_list(&down, "other"), vec!["0.1"]);
    assert_eq!(
        down.get("/v1/images/debian/aliases/latest").json()["version"],
        "2.0"
    );
    assert_eq!(
        down.get("/v1/images/debian/aliases/stable").json()["version"],
        "1.1",
        "1.1 was mirrored before, so its alias follows"
    );
    assert_eq!(products(&down), products(&up));

    // Bytes the mirror has are not fetched again: 2.0's disk was pushed upstream as
    // `other` 0.1 already, and came over with it.
    let o = mirror(&up, &down, &dw, &state, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(products(&down), products(&up));
}

#[test]
fn mirror_interrupted_resumes() {
    if !require_tool("tar") || !require_tool("xz") {
        return;
    }
    let up = Server::start();
    let down = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = metrics_addr(&down);
    let uw = up.writer_token();
    let dw = down.writer_token();
    let work = tempfile::tempdir().unwrap();
    let state = work.path().join("state");
    const MIB: usize = 1024 * 1024;
    let disk = bytes(32 * MIB + 3, 21);
    let dir = image_dir(work.path(), "big", &disk, "x86_64");
    push_dir(
        &up,
        &uw,
        &work.path().join("push-state"),
        "big",
        "1.0",
        &dir,
    );

    let (from, to) = (
        format!("http://{}", up.addr),
        format!("http://{}", down.addr),
    );
    let cmd = || {
        client(
            &state,
            Some(&dw),
            &[
                "mirror",
                "--from",
                &from,
                "--to",
                &to,
                "--part-size-mib",
                "1",
                "--parallel",
                "2",
            ],
        )
    };
    let acked = kill_after_parts(cmd(), &state, 6);
    std::thread::sleep(Duration::from_millis(500));
    let first = part_bytes(&metrics);
    let o = run(cmd());
    assert!(o.status.success(), "{}", show(&o));
    let second = part_bytes(&metrics) - first;
    let meta = std::fs::metadata(dir.join("incus.tar.xz")).unwrap().len();
    let total = disk.len() as u64 + meta;
    eprintln!(
        "mirror resume: first run sent {first} bytes ({acked} parts acknowledged), the resumed run {second} of {total}"
    );
    assert!(
        second <= total - (acked * MIB) as u64,
        "resent acknowledged parts: {second}\n{}",
        show(&o)
    );
    let m = down.get("/v1/images/big/versions/1.0").json();
    assert_eq!(m["version"]["state"], "published", "{m}");
    assert_eq!(
        m["artifacts"][0]["artifact"]["primary_blob_digest"],
        sha256_digest(&disk)
    );
    assert_eq!(products(&down), products(&up));
}
