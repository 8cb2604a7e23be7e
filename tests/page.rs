//! The catalog page at `/`: served as HTML with a strong ETag per catalog generation, loaded
//! in a real headless Chromium, whose download links must resolve to the published bytes.

use crate::util::*;
use serde_json::json;
use std::process::Command;

/// Runs headless Chromium with a fresh profile and returns its stdout. The flags are what
/// Chromium needs to run as root in a container without a display, and to stay off the network.
fn chromium(args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = output_ok(
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(args),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `(href, data-sha256)` of every download link in a DOM dump, in page order.
fn download_links(dom: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for piece in dom.split("<a class=\"download\" ").skip(1) {
        let attr = |name: &str| {
            let start = piece.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
            piece[start..start + piece[start..].find('"').unwrap()].replace("&amp;", "&")
        };
        out.push((attr("href"), attr("data-sha256")));
    }
    out
}

#[test]
fn catalog_page_in_a_browser() {
    let s = Server::start();
    let w = s.writer_token();
    // A display name that would be markup if it were not escaped.
    let name = "Debian <b>12</b> & \"friends\"";
    s.create_image(&w, &json!({"name": "deb", "display_name": name}));
    let (disk, meta, root) = (bytes(300_000, 1), bytes(2000, 2), bytes(150_000, 3));
    s.publish_image(&w, "deb", "12.5", &disk, &meta);
    s.put_alias(&w, "deb", "latest", "12.5");

    let page = s.get("/");
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(
        page.header("Content-Type"),
        Some("text/html; charset=utf-8")
    );
    let etag = page.header("ETag").unwrap().to_string();
    assert!(etag.starts_with("\"page-"), "{etag}");
    let html = page.text();
    assert!(html.contains("Debian &lt;b&gt;12&lt;/b&gt; &amp; &quot;friends&quot;"));
    assert!(html.contains(&format!(
        "incus remote add imgsrv http://{} --protocol=simplestreams",
        s.addr
    )));
    assert!(html.contains("incus launch imgsrv:deb/12.5 my-vm --vm"));
    // Same generation, same tag: 304 without a body; HEAD carries the same tag.
    let again = s.get_with("/", &[("If-None-Match", &etag)]);
    assert_eq!(again.status, 304);
    assert!(again.body.is_empty());
    assert_eq!(s.head("/").header("ETag"), Some(etag.as_str()));
    // Behind a TLS-terminating proxy the commands say https, and the tag differs.
    let other = s.get_with("/", &[("X-Forwarded-Proto", "https")]);
    assert!(
        other
            .text()
            .contains(&format!("incus remote add imgsrv https://{} ", s.addr))
    );
    assert_ne!(other.header("ETag"), Some(etag.as_str()));
    // Each base URL has its own kept page: the plain one is still the http one.
    let plain_again = s.get("/");
    assert_eq!(plain_again.header("ETag"), Some(etag.as_str()));
    assert_eq!(plain_again.body, page.body);

    // A client that accepts gzip gets the same page compressed, under its own tag.
    assert_eq!(page.header("Vary"), Some("Accept-Encoding"));
    let gz = s.get_with("/", &[("Accept-Encoding", "gzip, deflate, br")]);
    assert_eq!(gz.status, 200);
    assert_eq!(gz.header("Content-Encoding"), Some("gzip"));
    assert_eq!(gz.header("Vary"), Some("Accept-Encoding"));
    assert!(gz.body.len() < page.body.len(), "not compressed");
    assert_eq!(gunzip(&gz.body), page.body);
    let gz_etag = gz.header("ETag").unwrap().to_string();
    assert_eq!(gz_etag, format!("{}-gzip\"", etag.trim_end_matches('"')));
    let gz_again = s.get_with(
        "/",
        &[("Accept-Encoding", "gzip"), ("If-None-Match", &gz_etag)],
    );
    assert_eq!(gz_again.status, 304);
    assert_eq!(gz_again.header("Vary"), Some("Accept-Encoding"));
    // The gzip tag does not validate the plain representation.
    assert_eq!(s.get_with("/", &[("If-None-Match", &gz_etag)]).status, 200);

    // A second version (with a container root file system) is a new generation.
    let a = draft_with_artifact(&s, &w, "deb", "12.6", &disk);
    assert!(a["id"].is_string());
    let rd = s.upload(&w, &root);
    let r = s.call(
        "POST",
        "/v1/images/deb/versions/12.6/artifacts",
        &w,
        &json!({"operating_system": "debian", "architecture": "x86_64", "format": "squashfs",
                "primary_blob_digest": rd, "primary_blob_size_bytes": root.len(),
                "primary_media_type": "application/vnd.squashfs"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    s.publish(&w, "deb", "12.6");
    let moved = s.get_with("/", &[("If-None-Match", &etag)]);
    assert_eq!(moved.status, 200, "a publish must change the tag");
    assert!(
        moved.text().contains("/v1/images/deb/versions/12.6/"),
        "the kept page went stale"
    );
    let moved_gz = s.get_with("/", &[("Accept-Encoding", "gzip")]);
    assert_eq!(gunzip(&moved_gz.body), moved.body);

    if !require_tool("chromium") {
        return;
    }
    let url = s.url("/");
    let dom = chromium(&["--dump-dom", &url]);
    assert!(dom.contains("<h1>Images</h1>"), "{dom}");
    // The browser parsed the escaped name as text: no <b> element came out of it.
    assert!(
        dom.contains("Debian &lt;b&gt;12&lt;/b&gt; &amp; \"friends\""),
        "{dom}"
    );
    let links = download_links(&dom);
    // 12.6: qcow2 and squashfs; 12.5: qcow2 and its incus.tar.xz.
    assert_eq!(links.len(), 4, "{links:?}");
    let want = [&disk[..], &root, &disk, &meta];
    for ((href, sha), bytes) in links.iter().zip(want) {
        assert!(href.starts_with("/v1/images/deb/versions/"), "{href}");
        let r = s.get(href);
        assert_eq!(r.status, 200, "{href}: {}", r.text());
        assert_eq!(&sha256_hex(&r.body), sha, "{href}");
        assert_eq!(r.body, bytes, "{href}");
    }
    assert!(
        links[1].0.ends_with("/download/rootfs.squashfs"),
        "{links:?}"
    );

    // A phone-sized screenshot, for people looking at the page while changing it.
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("page.png");
    chromium(&[
        &format!("--screenshot={}", png.display()),
        "--window-size=390,1600",
        "--hide-scrollbars",
        &url,
    ]);
    let bytes = std::fs::read(&png).expect("chromium wrote no screenshot");
    assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
    if let Some(keep) = std::env::var_os("IMGSRV_PAGE_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
}

#[test]
fn a_public_url_replaces_the_host_on_the_page() {
    // Without one, the commands follow the name the client used.
    let s = Server::start();
    let html = s.get_with("/", &[("Host", "img.example:8080")]).text();
    assert!(
        html.contains("incus remote add imgsrv http://img.example:8080 --protocol"),
        "{html}"
    );
    drop(s);

    // With one, every name (and a proxy's scheme) gets the same page under the same tag.
    let s = Server::start_with(&["--public-url", "https://images.example.org/"]);
    let w = s.writer_token();
    s.create_image(&w, &json!({"name": "deb"}));
    s.publish_image(&w, "deb", "12.5", &bytes(20_000, 1), &bytes(500, 2));
    let page = s.get_with("/", &[("Host", "made-up.example")]);
    assert_eq!(page.status, 200);
    let html = page.text();
    assert!(
        html.contains("incus remote add imgsrv https://images.example.org --protocol"),
        "{html}"
    );
    assert!(html.contains("https://images.example.org/v1/images/deb/versions/12.5/"));
    assert!(!html.contains("made-up.example"));
    let tag = page.header("ETag").unwrap();
    for (host, proto) in [("other.example", "http"), (s.addr.as_str(), "https")] {
        let again = s.get_with(
            "/",
            &[
                ("Host", host),
                ("X-Forwarded-Proto", proto),
                ("If-None-Match", tag),
            ],
        );
        assert_eq!(again.status, 304, "{host} {proto}");
    }
    drop(s);

    // A URL the page could not use is refused at start, as a usage error.
    for bad in ["images.example.org", "ftp://x", "https://x/?q=1"] {
        let out = Command::new(binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--public-url", bad])
            .env("IMGSRV_DATA_DIR", "/nonexistent/never-created")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("public URL"), "{bad}: {err}");
    }
}
