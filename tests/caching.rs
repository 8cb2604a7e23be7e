//! HTTP caching of the JSON reads: strong `ETag`s computed from the document, `Cache-Control`
//! per route family, `304 Not Modified` on revalidation, `HEAD` agreeing with `GET`; and a real
//! nginx cache in front of the binary that picks up a moved alias on its next revalidation.

use crate::util::*;
use serde_json::{Value, json};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

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

fn put_alias(s: &Server, w: &str, alias: &str, version: &str) {
    let r = s.call(
        "PUT",
        &format!("/v1/images/img/aliases/{alias}"),
        w,
        &json!({"version": version}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn catalog_reads_are_tagged_and_revalidate() {
    let s = Server::start();
    let w = s.writer_token();
    let v1 = s.publish_image(&w, "img", "1.0", b"disk one", b"meta one");
    s.publish_image(&w, "img", "2.0", b"disk two", b"meta two");
    put_alias(&s, &w, "latest", "1.0");
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
    put_alias(&s, &w, "latest", "2.0");
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
    let meta = s.upload(&w, b"meta");
    let aid = a["id"].as_str().unwrap();
    let r = s.call(
        "POST",
        &format!("{path}/artifacts/{aid}/attachments"),
        &w,
        &json!({"name": "incus.tar.xz", "media_type": "application/x-xz",
                "blob_digest": meta, "blob_size_bytes": 4}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let t1 = changed_tag(&s, path, &t0);
    let r = s.call(
        "DELETE",
        &format!("{path}/artifacts/{aid}"),
        &w,
        &Value::Null,
    );
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
    let begin = s.call(
        "POST",
        "/v1/uploads",
        &w,
        &json!({"expected_digest": sha256_digest(data), "expected_size_bytes": data.len()}),
    );
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
    let p = s.call(
        "POST",
        "/v1/images/img/versions/1.0/publish",
        &w,
        &Value::Null,
    );
    assert_eq!(p.status, 202, "{}", p.text());
    let job = p.json()["id"].as_str().unwrap().to_string();
    s.wait_job(&w, &job);
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
    let pid = s.call(
        "POST",
        "/v1/auth/principals",
        &admin,
        &json!({"kind": "service", "display_name": "x"}),
    );
    assert_eq!(pid.header("Cache-Control"), Some("no-store"));
    let pid = pid.json()["id"].as_str().unwrap().to_string();
    let t = s.call(
        "POST",
        &format!("/v1/auth/principals/{pid}/api-tokens"),
        &admin,
        &json!({"name": "t", "expires_at": "2099-01-01T00:00:00Z"}),
    );
    assert_eq!(t.status, 201, "{}", t.text());
    assert_eq!(t.header("Cache-Control"), Some("no-store"));
}

#[test]
fn downloads_and_streams_keep_their_own_headers() {
    let s = Server::start();
    let w = s.writer_token();
    let m = s.publish_image(&w, "img", "1.0", b"disk", b"meta");
    let art = m.artifact_id.as_str();
    let d = s.get(&format!(
        "/v1/images/img/versions/1.0/artifacts/{art}/download"
    ));
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

/// An nginx reverse proxy with its own prefix, config and cache in a temporary directory,
/// stopped (and its files removed) when dropped.
struct Nginx {
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// Listeners: one that caches every 200 for a second whatever the response says, and one
    /// that honours `Cache-Control` but would keep a 200 for an hour.
    forced: String,
    honouring: String,
}

impl Nginx {
    fn start(upstream: &str) -> Nginx {
        // As root, the workers would switch to `nobody` and lose access to the temporary
        // directory; keep them as the current user.
        let user = if id("-u") == "0" {
            format!("user {} {};", id("-un"), id("-gn"))
        } else {
            String::new()
        };
        for _ in 0..10 {
            let dir = tempfile::tempdir().expect("tempdir");
            let d = dir.path().display().to_string();
            let (a, b) = (free_port(), free_port());
            // `proxy_ignore_headers Cache-Control` plus `proxy_cache_valid` is what a CDN's
            // default lifetime amounts to; `proxy_cache_revalidate` makes nginx send the stored
            // ETag as If-None-Match once that lifetime is over.
            let conf = format!(
                "daemon off;
{user}
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    log_format cache '$request_uri $status $upstream_status $upstream_cache_status';
    access_log {d}/access.log cache;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    proxy_cache_path {d}/cache-forced keys_zone=forced:1m;
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
    }}
}}
"
            );
            std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
            let child = spawn_nginx(dir.path());
            let mut n = Nginx {
                dir,
                child: Some(child),
                forced: format!("127.0.0.1:{a}"),
                honouring: format!("127.0.0.1:{b}"),
            };
            if n.wait_listening() {
                return n;
            }
            // Another process took a port between our probe and nginx's bind: try others.
            let log = n.error_log();
            assert!(log.contains("in use"), "nginx did not start:\n{log}");
        }
        panic!("nginx found no free ports");
    }

    fn wait_listening(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                return false;
            }
            let up = [&self.forced, &self.honouring]
                .iter()
                .all(|a| std::net::TcpStream::connect(a.as_str()).is_ok());
            if up {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// SIGTERM (fast shutdown: the master stops its worker too), then SIGKILL if it lingers.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            stop_daemon(child);
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn id(flag: &str) -> String {
    let out = Command::new("id").arg(flag).output().expect("id");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// imgsrv's request log lines for `route` with `status` (the line is written just after the
/// response, so wait a little for it).
fn logged(s: &Server, route: &str, status: u16, at_least: usize) -> usize {
    let needle = format!("route={route} ");
    let status = format!("status={status} ");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let n = s
            .log_text()
            .lines()
            .filter(|l| l.contains(" request ") && l.contains(&needle) && l.contains(&status))
            .count();
        if n >= at_least || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
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
    put_alias(&s, &w, "latest", "1.0");
    let nginx = Nginx::start(&s.addr);
    let proxy = nginx.forced.clone();

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
    std::thread::sleep(EXPIRE);
    for path in [ALIAS, REF] {
        let (r, st) = via(&proxy, path, &[]);
        assert_eq!(
            (version(path, &r), st.as_str()),
            ("1.0".into(), "REVALIDATED"),
            "{path}"
        );
    }
    assert_eq!(logged(&s, ALIAS_ROUTE, 304, 1), 1, "{}", nginx.access_log());
    assert_eq!(logged(&s, REF_ROUTE, 304, 1), 1, "{}", nginx.access_log());

    // The move: within the forced second the old answer may still be served, but the first
    // revalidation after it gets the new document in full (the stored tag no longer matches).
    put_alias(&s, &w, "latest", "2.0");
    std::thread::sleep(EXPIRE);
    for path in [ALIAS, REF] {
        let (r, st) = via(&proxy, path, &[]);
        assert_eq!(
            (version(path, &r), st.as_str()),
            ("2.0".into(), "EXPIRED"),
            "{path}"
        );
    }
    std::thread::sleep(EXPIRE);
    for path in [ALIAS, REF] {
        let (r, st) = via(&proxy, path, &[]);
        assert_eq!(
            (version(path, &r), st.as_str()),
            ("2.0".into(), "REVALIDATED"),
            "{path}"
        );
    }
    // Every revalidation was answered by imgsrv with a 304 and no body, the changed one by a
    // 200: two 304s and two 200s per route (the first fill and the changed document).
    assert_eq!(logged(&s, ALIAS_ROUTE, 304, 2), 2, "{}", nginx.access_log());
    assert_eq!(logged(&s, REF_ROUTE, 304, 2), 2, "{}", nginx.access_log());

    // A cache that honours Cache-Control never stores these documents, even with an hour of
    // default lifetime: the next move is visible at once.
    let honouring = nginx.honouring.clone();
    let (r, _) = via(&honouring, ALIAS, &[]);
    assert_eq!(version(ALIAS, &r), "2.0");
    put_alias(&s, &w, "latest", "1.0");
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

    let log = nginx.error_log();
    assert!(
        !log.contains("[emerg]") && !log.contains("[alert]") && !log.contains("[crit]"),
        "{log}"
    );
}
