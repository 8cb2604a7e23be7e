//! The shipped nginx cache configuration (`packaging/nginx/imgsrv-cache.conf`) in front of a
//! real imgsrv, over TLS 1.3: downloads come from the cache (imgsrv sees each once), byte ranges
//! through it are right, catalog and Simple Streams documents are revalidated with imgsrv so an
//! alias move shows at once, and the real Incus client lists and exports through it.
//!
//! The test's nginx configuration is the shipped file with its ports and paths substituted, so
//! what is shipped is what is tested.

use crate::push::*;
use crate::util::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const SHIPPED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/packaging/nginx/imgsrv-cache.conf"
);

/// Replaces `from` (which must occur exactly once) with `to`.
fn subst(conf: &str, from: &str, to: &str) -> String {
    assert_eq!(
        conf.matches(from).count(),
        1,
        "the shipped imgsrv-cache.conf no longer has exactly one {from:?}"
    );
    conf.replace(from, to)
}

/// nginx with the shipped configuration, its one listener, cache, upstream and certificate
/// substituted.
fn start_cache(upstream: &str, cert: &Path, key: &Path) -> Nginx {
    let shipped = std::fs::read_to_string(SHIPPED).unwrap();
    Nginx::start(1, |d, ports| {
        let mut conf = subst(&shipped, "/var/cache/nginx/imgsrv", &format!("{d}/cache"));
        conf = subst(
            &conf,
            "server 127.0.0.1:8080;",
            &format!("server {upstream};"),
        );
        conf = subst(
            &conf,
            "listen 443 ssl;",
            &format!("listen 127.0.0.1:{} ssl;", ports[0]),
        );
        conf = subst(&conf, "listen [::]:443 ssl;", "");
        conf = subst(
            &conf,
            "/etc/nginx/tls/imgsrv.crt",
            &cert.display().to_string(),
        );
        conf = subst(
            &conf,
            "/etc/nginx/tls/imgsrv.key",
            &key.display().to_string(),
        );
        std::fs::write(Path::new(d).join("imgsrv-cache.conf"), conf).unwrap();
        format!("    include {d}/imgsrv-cache.conf;")
    })
}

/// A GET through nginx with curl over TLS 1.3 (pinning the certificate): status, headers
/// (lowercase names) and body.
fn get(
    n: &Nginx,
    cert: &Path,
    path: &str,
    headers: &[&str],
) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let body = n.dir().join("curl.body");
    // curl writes no file for an empty body: never read the previous one.
    let _ = std::fs::remove_file(&body);
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--tlsv1.3", "--cacert"])
        .arg(cert)
        .args(["-D", "-", "-o"])
        .arg(&body);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = output_ok(cmd.arg(format!("https://{}{path}", n.addrs[0])));
    let r = parse_response(&out.stdout, true);
    let status = r.status;
    let hs = r
        .headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let b = std::fs::read(&body).unwrap_or_default();
    (status, hs, b)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

#[test]
fn nginx_cache_serves_downloads_and_revalidates_the_catalog() {
    for tool in ["nginx", "openssl", "curl", "tar", "xz", "incus"] {
        if !require_tool(tool) {
            return;
        }
    }
    let t = Target::new(Server::start());
    let (s, w, work) = (&t.s, &t.w, t.work.path());
    let (cert, key) = self_signed_cert(work);
    let disk = bytes(3 * CHUNK_SIZE + 17, 41);
    let one = t.image_dir("one", &disk, "x86_64");
    let two = t.image_dir("two", &bytes(CHUNK_SIZE, 42), "x86_64");
    for (v, dir) in [("1.0", &one), ("2.0", &two)] {
        let d = dir.display().to_string();
        run_ok(t.push(&["debian", v, &d, "--alias", "latest"]));
    }
    s.put_alias(w, "debian", "latest", "1.0");
    let n = start_cache(&s.addr, &cert, &key);

    // Downloads: the second read is a cache hit; imgsrv served the file once.
    let m = s.get("/v1/images/debian/versions/1.0").json();
    let aid = m["artifacts"][0]["artifact"]["id"].as_str().unwrap();
    let tid = m["artifacts"][0]["attachments"][0]["id"].as_str().unwrap();
    let dl = format!("/v1/images/debian/versions/1.0/artifacts/{aid}/download/disk.qcow2");
    const DL_ROUTE: &str =
        "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/download/{filename}";
    let (st, h, b) = get(&n, &cert, &dl, &[]);
    assert_eq!((st, header(&h, "x-cache-status")), (200, Some("MISS")));
    assert!(b == disk, "first download differs");
    let (st, h, b) = get(&n, &cert, &dl, &[]);
    assert_eq!(
        (st, header(&h, "x-cache-status")),
        (200, Some("HIT")),
        "{}",
        n.log("access.log")
    );
    assert!(b == disk, "cached download differs");
    let served = s.logged(DL_ROUTE, 200, 1);
    assert_eq!(
        served,
        1,
        "imgsrv must see the download once:\n{}",
        n.log("access.log")
    );

    // Byte ranges from the cache, and on a file not cached yet.
    for (range, want) in [
        ("bytes=100-199", &disk[100..200]),
        ("bytes=-50", &disk[disk.len() - 50..]),
        ("bytes=3000000-", &disk[3_000_000..]),
    ] {
        let (st, h, b) = get(&n, &cert, &dl, &[&format!("Range: {range}")]);
        assert_eq!(st, 206, "{range}");
        assert_eq!(header(&h, "x-cache-status"), Some("HIT"), "{range}");
        assert!(b == want, "{range}: wrong bytes");
    }
    let meta = std::fs::read(one.join("incus.tar.xz")).unwrap();
    let att = format!("/v1/images/debian/versions/1.0/artifacts/{aid}/attachments/{tid}/download");
    let (st, _, b) = get(&n, &cert, &att, &["Range: bytes=10-19"]);
    assert!(
        (st == 206 && b == meta[10..20]) || (st == 200 && b == meta),
        "range on a cold cache: {st}"
    );
    let (st, h, b) = get(&n, &cert, &att, &["Range: bytes=10-19"]);
    assert_eq!((st, header(&h, "x-cache-status")), (206, Some("HIT")));
    assert_eq!(b, meta[10..20]);
    let (_, _, b) = get(
        &n,
        &cert,
        &format!("/v1/blobs/{}", sha256_digest(&disk)),
        &[],
    );
    assert!(b == disk);

    // Documents that can change are revalidated with imgsrv on every read: a client's
    // If-None-Match reaches it and is answered 304, and a moved alias shows at once.
    let docs = [
        (
            "/v1/images/debian/versions/1.0",
            "/v1/images/{name}/versions/{version}",
        ),
        (
            "/v1/images/debian/aliases/latest",
            "/v1/images/{name}/aliases/{alias}",
        ),
        (
            "/v1/images/debian/refs/latest",
            "/v1/images/{name}/refs/{ref}",
        ),
        ("/streams/v1/index.json", "/streams/v1/index.json"),
        ("/streams/v1/images.json", "/streams/v1/images.json"),
    ];
    let revalidate =
        |path: &str, etag: &str| get(&n, &cert, path, &[&format!("If-None-Match: {etag}")]);
    let mut tags = Vec::new();
    for (path, route) in docs {
        let (st, h, _) = get(&n, &cert, path, &[]);
        assert_eq!(st, 200, "{path}");
        let etag = header(&h, "etag").unwrap().to_string();
        assert_eq!(header(&h, "cache-control"), Some("no-cache"), "{path}");
        let before = s.logged(route, 304, 0);
        let (st, _, b) = revalidate(path, &etag);
        assert_eq!(st, 304, "{path}");
        assert!(b.is_empty());
        assert_eq!(
            s.logged(route, 304, before + 1),
            before + 1,
            "{path}: imgsrv did not revalidate"
        );
        tags.push(etag);
    }
    s.put_alias(w, "debian", "latest", "2.0");
    let (_, _, b) = get(&n, &cert, "/v1/images/debian/aliases/latest", &[]);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["version"],
        "2.0"
    );
    let (st, _, b) = revalidate("/v1/images/debian/refs/latest", &tags[2]);
    assert_eq!(st, 200, "a stale tag gets the new document");
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap()["version"]["version"],
        "2.0"
    );
    let (st, _, b) = revalidate("/streams/v1/images.json", &tags[4]);
    assert_eq!(st, 200);
    let doc: Value = serde_json::from_slice(&b).unwrap();
    let aliases = doc["products"]["debian:2.0:amd64:default"]["aliases"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(aliases.contains("debian/latest"), "{doc}");

    // The real Incus client, through the cache over TLS 1.3, with the certificate pinned.
    let home = tempfile::tempdir().unwrap();
    let conf = home.path().join("conf");
    std::fs::create_dir_all(conf.join("servercerts")).unwrap();
    std::fs::copy(&cert, conf.join("servercerts/cache.crt")).unwrap();
    let incus = |args: &[&str]| {
        let out = Command::new("incus")
            .args(args)
            .env("INCUS_CONF", &conf)
            .env("INCUS_CACHE", home.path().join("cache"))
            .env("HOME", home.path())
            .output()
            .expect("running incus");
        assert!(
            out.status.success(),
            "incus {args:?}: {}\n--- nginx access log\n{}",
            String::from_utf8_lossy(&out.stderr),
            n.log("access.log")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    incus(&[
        "remote",
        "add",
        "cache",
        &format!("https://{}", n.addrs[0]),
        "--protocol=simplestreams",
    ]);
    let list: Value =
        serde_json::from_str(&incus(&["image", "list", "cache:", "--format", "json"])).unwrap();
    let mut both = meta.clone();
    both.extend_from_slice(&disk);
    let fp = sha256_hex(&both);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|i| i["fingerprint"] == fp.as_str()),
        "{fp} not listed: {list:#}"
    );
    let out = work.join("export");
    std::fs::create_dir_all(&out).unwrap();
    incus(&[
        "image",
        "export",
        "cache:debian/1.0",
        &format!("{}/", out.display()),
    ]);
    assert!(std::fs::read(out.join("disk.qcow2")).unwrap() == disk);
    assert_eq!(std::fs::read(out.join("incus.tar.xz")).unwrap(), meta);
    // The disk Incus fetched was the cached one: imgsrv still served it once.
    assert_eq!(s.logged(DL_ROUTE, 200, 1), 1, "{}", n.log("access.log"));

    n.assert_no_severe_errors();
}
