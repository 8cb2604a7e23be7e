//! HTTP caching of the JSON reads: strong `ETag`s computed from the document, `Cache-Control`
//! per route family, `304 Not Modified` on revalidation, `HEAD` agreeing with `GET`; and a real
//! nginx cache in front of the binary that picks up a moved alias on its next revalidation.

use crate::util::*;
use serde_json::Value;
use std::time::Duration;

/// Reads `path` twice and with `HEAD`, checks the headers every cacheable 200 carries and that
/// they agree, then revalidates with the tag (strong, weak, in a list, and `*`). Returns the
/// tag and the response.
fn check_cacheable(
    s: &Server,
    path: &str,
    headers: &[(&str, &str)],
    policy: &str,
) -> (String, Resp) {
    let r = s.get_with(path, headers);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let etag = r
        .header("ETag")
        .unwrap_or_else(|| panic!("{path}: no ETag"))
        .to_string();
    assert!(
        etag.len() == 34 && etag.starts_with('"') && etag.ends_with('"'),
        "{path}: {etag} is not a strong quoted tag"
    );
    assert_eq!(r.header("Cache-Control"), Some(policy), "{path}");
    let private = policy.starts_with("private");
    assert_eq!(
        r.header("Vary"),
        private.then_some("Authorization"),
        "{path}: Vary"
    );
    let again = s.get_with(path, headers);
    assert_eq!(
        again.header("ETag"),
        Some(etag.as_str()),
        "{path}: tag not stable"
    );
    assert_eq!(again.body, r.body, "{path}");

    let head = s.request("HEAD", path, headers, b"");
    assert_eq!(head.status, 200, "{path}");
    assert!(head.body.is_empty(), "{path}: HEAD has a body");
    for h in [
        "ETag",
        "Cache-Control",
        "Vary",
        "Content-Type",
        "Content-Length",
    ] {
        assert_eq!(head.header(h), r.header(h), "{path}: HEAD {h}");
    }

    let weak = format!("W/{etag}");
    let listed = format!("\"0123\", {etag}");
    for inm in [etag.as_str(), &weak, &listed, "*"] {
        for method in ["GET", "HEAD"] {
            let mut h = headers.to_vec();
            h.push(("If-None-Match", inm));
            let nm = s.request(method, path, &h, b"");
            assert_eq!(
                nm.status,
                304,
                "{method} {path} If-None-Match {inm}: {}",
                nm.text()
            );
            assert!(nm.body.is_empty(), "{path}: 304 with a body");
            assert_eq!(nm.header("ETag"), Some(etag.as_str()), "{path}: 304 ETag");
            assert_eq!(nm.header("Cache-Control"), Some(policy), "{path}: 304");
            assert_eq!(nm.header("Vary"), r.header("Vary"), "{path}: 304 Vary");
            assert_eq!(nm.header("Content-Length"), None, "{path}: 304 length");
        }
    }
    let mut h = headers.to_vec();
    h.push(("If-None-Match", "\"0123\""));
    let other = s.get_with(path, &h);
    assert_eq!(
        other.status, 200,
        "{path}: a stale tag must get the document"
    );
    assert_eq!(other.body, r.body);
    (etag, r)
}

/// The current tag of `path`, after checking that revalidating with `old` now gets the whole
/// new document, not a 304.
fn changed_tag(s: &Server, path: &str, old: &str) -> String {
    let r = s.get_with(path, &[("If-None-Match", old)]);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    let etag = r.header("ETag").unwrap().to_string();
    assert_ne!(etag, old, "{path}: tag did not change with the document");
    etag
}

fn tag(s: &Server, path: &str) -> String {
    let r = s.get(path);
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.header("ETag").unwrap().to_string()
}

#[test]
fn catalog_reads_are_tagged_and_revalidate() {
    let s = Server::start();
    let w = s.writer_token();
    let v1 = s.publish_image(&w, "img", "1.0", b"disk one", b"meta one");
    s.publish_image(&w, "img", "2.0", b"disk two", b"meta two");
    s.put_alias(&w, "img", "latest", "1.0");
    let art = v1.artifact_id.as_str();

    let shared = |p: &str| check_cacheable(&s, p, &[], "no-cache");
    let (images, _) = shared("/v1/images");
    shared("/v1/images/img");
    let (versions, _) = shared("/v1/images/img/versions");
    shared("/v1/images/img/versions/1.0");
    shared("/v1/images/img/versions/1.0/artifacts");
    shared(&format!("/v1/images/img/versions/1.0/artifacts/{art}"));
    let (aliases, _) = shared("/v1/images/img/aliases");
    let (alias, a) = shared("/v1/images/img/aliases/latest");
    assert_eq!(a.json()["version"], "1.0");
    let (latest, m) = shared("/v1/images/img/refs/latest");
    assert_eq!(m.json()["version"]["version"], "1.0");
    shared("/openapi/v1.yaml");

    // A writer's token changes nothing about a public document: same tag, no Vary.
    let auth = format!("Bearer {w}");
    let (with_token, _) = check_cacheable(
        &s,
        "/v1/images/img/aliases/latest",
        &[("Authorization", &auth)],
        "no-cache",
    );
    assert_eq!(with_token, alias);

    // Moving the alias changes exactly the documents that show it.
    s.put_alias(&w, "img", "latest", "2.0");
    changed_tag(&s, "/v1/images/img/aliases/latest", &alias);
    changed_tag(&s, "/v1/images/img/aliases", &aliases);
    let moved = changed_tag(&s, "/v1/images/img/refs/latest", &latest);
    assert_eq!(
        s.get("/v1/images/img/refs/latest").json()["version"]["version"],
        "2.0"
    );
    assert_eq!(
        tag(&s, "/v1/images"),
        images,
        "the image list did not change"
    );
    assert_eq!(tag(&s, "/v1/images/img/versions"), versions);

    // A new version changes the version list, not the moved ref.
    s.publish_image(&w, "img", "3.0", b"disk three", b"meta three");
    changed_tag(&s, "/v1/images/img/versions", &versions);
    assert_eq!(tag(&s, "/v1/images/img/refs/latest"), moved);

    // A failed read is marked too, so a cache with a default lifetime does not keep a 404 for
    // an alias about to be created; it has no tag and never answers 304.
    let missing = s.get_with("/v1/images/img/aliases/stable", &[("If-None-Match", "*")]);
    missing.assert_problem(404, "alias");
    assert_eq!(missing.header("Cache-Control"), Some("no-cache"));
    assert_eq!(missing.header("ETag"), None);
}

#[test]
fn draft_manifest_tag_follows_every_edit() {
    let s = Server::start();
    let w = s.writer_token();
    let a = draft_with_artifact(&s, &w, "img", "1.0", b"disk");
    let path = "/v1/images/img/versions/1.0";
    let (t0, m) = check_cacheable(&s, path, &[], "no-cache");
    assert_eq!(m.json()["version"]["state"], "draft");

    // Editing a draft does not move the catalog generation, yet the tag must follow it.
    let aid = a["id"].as_str().unwrap();
    s.attach_incus_tar_xz(&w, "img", "1.0", aid, b"meta");
    let t1 = changed_tag(&s, path, &t0);
    let artifact = format!("{path}/artifacts/{aid}");
    let r = s.call("DELETE", &artifact, &w, &Value::Null);
    assert_eq!(r.status, 204, "{}", r.text());
    let t2 = changed_tag(&s, path, &t1);
    assert_ne!(t2, t0);
}

#[test]
fn uploads_and_jobs_are_private_and_auth_is_never_stored() {
    let s = Server::start();
    let w = s.writer_token();
    let auth = format!("Bearer {w}");

    // An upload session: anonymous, but nobody else's business; its tag follows its parts.
    let data = b"some bytes";
    let begin = s.begin_upload(&w, data);
    assert_eq!(begin.status, 201, "{}", begin.text());
    assert_eq!(begin.header("ETag"), None, "a write is not tagged");
    let id = begin.json()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/uploads/{id}");
    let (t0, _) = check_cacheable(&s, &path, &[], "private, no-cache");
    assert_eq!(put_part(&s, &w, &id, "1", data).status, 200);
    changed_tag(&s, &path, &t0);

    // A publish job: only its writer may read it, and a matching tag without credentials is
    // still a 401, never a 304.
    draft_with_artifact(&s, &w, "img", "1.0", b"disk");
    let job = s.publish(&w, "img", "1.0")["id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/v1/publish-jobs/{job}");
    let (t, _) = check_cacheable(&s, &path, &[("Authorization", &auth)], "private, no-cache");
    let anon = s.get_with(&path, &[("If-None-Match", &t)]);
    anon.assert_problem(401, "bearer");
    assert_eq!(anon.header("ETag"), None);
    assert_eq!(anon.header("Cache-Control"), Some("private, no-cache"));

    // Principals, roles and tokens are never stored, issuing included (it shows the secret).
    let admin = s.bootstrap_token();
    let admin_auth = format!("Bearer {admin}");
    for path in ["/v1/auth/roles", "/v1/auth/principals"] {
        let r = s.get_with(
            path,
            &[("Authorization", &admin_auth), ("If-None-Match", "*")],
        );
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.header("Cache-Control"), Some("no-store"), "{path}");
        assert_eq!(r.header("ETag"), None, "{path}");
    }
    let pid = s.new_principal(&admin, "x");
    assert_eq!(pid.header("Cache-Control"), Some("no-store"));
    let pid = pid.json()["id"].as_str().unwrap().to_string();
    let t = s.issue_token(&admin, &pid);
    assert_eq!(t.status, 201, "{}", t.text());
    assert_eq!(t.header("Cache-Control"), Some("no-store"));
}

#[test]
fn downloads_and_streams_keep_their_own_headers() {
    let s = Server::start();
    let w = s.writer_token();
    let m = s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let d = s.get(&m.download_path());
    assert_eq!(d.status, 200);
    assert_eq!(
        d.header("Cache-Control"),
        Some("public, max-age=31536000, immutable")
    );
    assert_eq!(
        d.header("ETag"),
        Some(format!("\"{}\"", sha256_digest(b"disk")).as_str())
    );
    let st = s.get("/streams/v1/images.json");
    assert_eq!(st.header("Cache-Control"), Some("no-cache"));
    assert_eq!(
        st.header("ETag"),
        Some(format!("\"{}\"", sha256_hex(&st.body)).as_str())
    );
    assert_eq!(s.get("/healthz").header("Cache-Control"), None);
}

/// An nginx reverse proxy to `upstream` with two listeners: the first caches every 200 for a
/// second whatever the response says, the second honours `Cache-Control` but would keep a 200
/// for an hour.
fn start_proxy(upstream: &str) -> Nginx {
    Nginx::start(2, |d, ports| {
        let (a, b) = (ports[0], ports[1]);
        // `proxy_ignore_headers Cache-Control` plus `proxy_cache_valid` is what a CDN's default
        // lifetime amounts to; `proxy_cache_revalidate` makes nginx send the stored ETag as
        // If-None-Match once that lifetime is over.
        format!(
            "    proxy_cache_path {d}/cache-forced keys_zone=forced:1m;
    proxy_cache_path {d}/cache-honouring keys_zone=honouring:1m;
    proxy_http_version 1.1;
    server {{
        listen 127.0.0.1:{a};
        location / {{
            proxy_pass http://{upstream};
            proxy_cache forced;
            proxy_cache_valid 200 1s;
            proxy_cache_revalidate on;
            proxy_ignore_headers Cache-Control Expires;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
    server {{
        listen 127.0.0.1:{b};
        location / {{
            proxy_pass http://{upstream};
            proxy_cache honouring;
            proxy_cache_valid 200 1h;
            proxy_cache_revalidate on;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}"
        )
    })
}

/// A GET through the proxy: the response and nginx's cache status.
fn via(proxy: &str, path: &str, headers: &[(&str, &str)]) -> (Resp, String) {
    let r = raw_request(proxy, "GET", path, headers, Some(b""));
    let status = r.header("X-Cache-Status").unwrap_or("").to_string();
    (r, status)
}

/// Longer than `proxy_cache_valid 200 1s` can keep an entry (nginx counts whole seconds).
const EXPIRE: Duration = Duration::from_millis(2100);

#[test]
fn nginx_cache_revalidates_and_sees_a_moved_alias() {
    if !require_tool("nginx") {
        return;
    }
    let s = Server::start();
    let w = s.writer_token();
    s.publish_image(&w, "img", "1.0", b"disk one", b"meta one");
    s.publish_image(&w, "img", "2.0", b"disk two", b"meta two");
    s.put_alias(&w, "img", "latest", "1.0");
    let nginx = start_proxy(&s.addr);
    let proxy = nginx.addrs[0].clone();

    const ALIAS: &str = "/v1/images/img/aliases/latest";
    const REF: &str = "/v1/images/img/refs/latest";
    const ALIAS_ROUTE: &str = "/v1/images/{name}/aliases/{alias}";
    const REF_ROUTE: &str = "/v1/images/{name}/refs/{ref}";
    let version = |path: &str, r: &Resp| -> String {
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        let j = r.json();
        let v = if path == ALIAS {
            &j["version"]
        } else {
            &j["version"]["version"]
        };
        v.as_str().unwrap().to_string()
    };

    for path in [ALIAS, REF] {
        let (r, st) = via(&proxy, path, &[]);
        assert_eq!((version(path, &r), st.as_str()), ("1.0".into(), "MISS"));
        let (r, st) = via(&proxy, path, &[]);
        assert_eq!((version(path, &r), st.as_str()), ("1.0".into(), "HIT"));
    }
    // Reads both documents through the forced cache once what it stored has expired.
    let after_expiry = |want: &str, cache_status: &str| {
        std::thread::sleep(EXPIRE);
        for path in [ALIAS, REF] {
            let (r, st) = via(&proxy, path, &[]);
            assert_eq!(
                (version(path, &r), st.as_str()),
                (want.to_string(), cache_status),
                "{path}"
            );
        }
    };
    // imgsrv answered `n` revalidations of each document with a 304.
    let not_modified = |n: usize| {
        for route in [ALIAS_ROUTE, REF_ROUTE] {
            assert_eq!(s.logged(route, 304, n), n, "{}", nginx.log("access.log"));
        }
    };
    after_expiry("1.0", "REVALIDATED");
    not_modified(1);

    // The move: within the forced second the old answer may still be served, but the first
    // revalidation after it gets the new document in full (the stored tag no longer matches).
    s.put_alias(&w, "img", "latest", "2.0");
    after_expiry("2.0", "EXPIRED");
    after_expiry("2.0", "REVALIDATED");
    // Every revalidation was answered by imgsrv with a 304 and no body, the changed one by a
    // 200: two 304s and two 200s per route (the first fill and the changed document).
    not_modified(2);

    // A cache that honours Cache-Control never stores these documents, even with an hour of
    // default lifetime: the next move is visible at once.
    let honouring = nginx.addrs[1].clone();
    let (r, _) = via(&honouring, ALIAS, &[]);
    assert_eq!(version(ALIAS, &r), "2.0");
    s.put_alias(&w, "img", "latest", "1.0");
    let (r, st) = via(&honouring, ALIAS, &[]);
    assert_eq!((version(ALIAS, &r), st.as_str()), ("1.0".into(), "MISS"));

    // Nor a publish job read with a token: an anonymous client behind the same cache gets 401.
    let p = s.call(
        "POST",
        "/v1/images/img/versions/2.0/publish",
        &w,
        &Value::Null,
    );
    let job = p.json()["id"].as_str().unwrap().to_string();
    let path = format!("/v1/publish-jobs/{job}");
    let auth = format!("Bearer {w}");
    let (r, _) = via(&honouring, &path, &[("Authorization", &auth)]);
    assert_eq!(r.status, 200, "{}", r.text());
    let (r, _) = via(&honouring, &path, &[]);
    assert_eq!(r.status, 401, "{}", r.text());

    nginx.assert_no_severe_errors();
}
