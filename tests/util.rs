//! Shared helpers for the integration tests: start the real binary on an ephemeral loopback
//! port with a fresh data directory, talk raw HTTP/1.1 to it, set up the usual fixtures (a
//! content-writer token, an uploaded blob, a published version), and take the API's other
//! steps (drafts, publishing, aliases, retention, tokens) one call each.
#![allow(dead_code)]

mod images;
mod nginx;
pub mod tables;
mod tls;

pub use images::{image_dir, incus_tar_xz};
pub use nginx::Nginx;
pub use tls::{ec_req, self_signed_cert, sign};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Mirrors `store::chunks::CHUNK_SIZE` (1 MiB - 64 bytes).
pub const CHUNK_SIZE: usize = 1024 * 1024 - 64;

/// The binary under test: `IMGSRV_BIN` (e.g. the static musl build) or Cargo's debug build.
pub fn binary() -> PathBuf {
    std::env::var_os("IMGSRV_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_imgsrv")))
}

/// A running imgsrv process with its own data directory.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub child: Option<Child>,
    pub log: Arc<Mutex<String>>,
    pub extra: Vec<String>,
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(&[])
    }

    /// Starts with extra `serve` flags (e.g. `["--upload-ttl", "2s"]`).
    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_in(tempfile::tempdir().expect("tempdir"), extra)
    }

    /// Starts with a data directory the caller made (say, on a filesystem it mounted).
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Server {
        let mut s = Server {
            dir,
            addr: String::new(),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// Starts serving TLS only, with a fresh self-signed certificate for localhost and
    /// 127.0.0.1 made in `dir`, plus `extra` flags. Returns the server and the certificate a
    /// client must trust.
    pub fn start_tls(dir: &Path, extra: &[&str]) -> (Server, PathBuf) {
        let (cert, key) = self_signed_cert(dir);
        let (c, k) = (cert.display().to_string(), key.display().to_string());
        let mut args = vec!["--tls-cert", c.as_str(), "--tls-key", k.as_str()];
        args.extend_from_slice(extra);
        (Server::start_with(&args), cert)
    }

    /// Another handle on this running server, for a thread of its own: it sends requests to the
    /// same address and owns no process, so dropping it stops nothing.
    pub fn handle(&self) -> Server {
        Server {
            dir: tempfile::tempdir().expect("tempdir"),
            addr: self.addr.clone(),
            child: None,
            log: Default::default(),
            extra: Vec::new(),
        }
    }

    /// SIGTERM, then waits for the exit (a clean stop closes the database).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().ok().flatten().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "imgsrv did not stop after SIGTERM"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Starts again on the same data directory after `kill9` or `terminate`.
    pub fn start_again(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("imgsrv.redb")
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(binary());
        cmd.arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.dir.path())
            .args(if self.extra.iter().any(|a| a == "--metrics-listen") {
                &[][..]
            } else {
                &["--metrics-listen", ""][..]
            })
            .args(["--sweep-interval", "1s"])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning imgsrv");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log = self.log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // With TLS the line says `https://`.
                let at = ["listening on http://", "listening on https://"]
                    .iter()
                    .find_map(|p| line.find(p).map(|i| i + p.len()));
                if !sent && let Some(i) = at {
                    // The address ends at the first character that cannot be part of it
                    // (a space in text logs, a quote in JSON logs).
                    let addr: String = line[i..]
                        .chars()
                        .take_while(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']')
                        })
                        .collect();
                    let _ = tx.send(addr);
                    sent = true;
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("imgsrv did not start; log:\n{}", self.log.lock().unwrap()));
        self.addr = addr;
        self.child = Some(child);
    }

    /// SIGKILL: the crash every durability test simulates.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts on the same data directory (after `kill9`).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// How many request log lines name `route` (a route template) with `status`. A line is
    /// written just after its response, so this waits up to five seconds for `at_least` of
    /// them, then a moment longer so that a line too many shows too.
    pub fn logged(&self, route: &str, status: u16, at_least: usize) -> usize {
        let needle = format!("route={route} ");
        let status = format!("status={status} ");
        let count = || {
            self.log_text()
                .lines()
                .filter(|l| l.contains(" request ") && l.contains(&needle) && l.contains(&status))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while count() < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        count()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn bootstrap_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bootstrap-token"))
            .expect("bootstrap-token file")
            .trim()
            .to_string()
    }

    /// Sends one request (with `Connection: close`) and reads the whole response.
    pub fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        raw_request(&self.addr, method, path, headers, Some(body))
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &[], b"")
    }

    pub fn head(&self, path: &str) -> Resp {
        self.request("HEAD", path, &[], b"")
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        self.request("GET", path, headers, b"")
    }

    /// An authenticated request with a JSON body (`Value::Null` sends no body).
    pub fn call(&self, method: &str, path: &str, token: &str, body: &Value) -> Resp {
        let auth = format!("Bearer {token}");
        let bytes = if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        };
        self.request(
            method,
            path,
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            &bytes,
        )
    }

    /// A principal with the content-writer role and a token for it.
    pub fn writer_token(&self) -> String {
        self.token_with_roles(&["content-writer"])
    }

    pub fn token_with_roles(&self, roles: &[&str]) -> String {
        let admin = self.bootstrap_token();
        let p = self.new_principal(&admin, "test");
        assert_eq!(p.status, 201, "{}", p.text());
        let id = p.json()["id"].as_str().unwrap().to_string();
        for r in roles {
            let r = self.call(
                "PUT",
                &format!("/v1/auth/principals/{id}/roles/{r}"),
                &admin,
                &Value::Null,
            );
            assert_eq!(r.status, 204, "{}", r.text());
        }
        let t = self.issue_token(&admin, &id);
        assert_eq!(t.status, 201, "{}", t.text());
        t.json()["plaintext"].as_str().unwrap().to_string()
    }

    /// Asks (with an auth manager's token) for a new service principal and returns the
    /// answer, for the caller to judge.
    pub fn new_principal(&self, admin: &str, display_name: &str) -> Resp {
        self.call(
            "POST",
            "/v1/auth/principals",
            admin,
            &json!({"kind": "service", "display_name": display_name}),
        )
    }

    /// Asks (with an auth manager's token) for an API token of a principal, valid until 2099,
    /// and returns the answer, for the caller to judge.
    pub fn issue_token(&self, admin: &str, principal_id: &str) -> Resp {
        self.call(
            "POST",
            &format!("/v1/auth/principals/{principal_id}/api-tokens"),
            admin,
            &json!({"name": "t", "expires_at": "2099-01-01T00:00:00Z"}),
        )
    }

    /// Asks for an upload session for `data` (its digest and size) and returns the answer, for
    /// the caller to judge.
    pub fn begin_upload(&self, token: &str, data: &[u8]) -> Resp {
        self.call(
            "POST",
            "/v1/uploads",
            token,
            &json!({"expected_digest": sha256_digest(data), "expected_size_bytes": data.len()}),
        )
    }

    /// Asks for an upload session to be aborted and returns the answer, for the caller to
    /// judge.
    pub fn abort_upload(&self, token: &str, id: &str) -> Resp {
        self.call(
            "POST",
            &format!("/v1/uploads/{id}/abort"),
            token,
            &Value::Null,
        )
    }

    /// Uploads `data` as the given parts (byte ranges, uploaded in the given order) and completes.
    /// Returns the final session JSON.
    pub fn upload_parts(
        &self,
        token: &str,
        data: &[u8],
        parts: &[(u32, std::ops::Range<usize>)],
    ) -> Value {
        let begin = self.begin_upload(token, data);
        assert!(
            begin.status == 201 || begin.status == 200,
            "{}",
            begin.text()
        );
        let session = begin.json();
        if session["state"] == "ready" {
            return session;
        }
        let id = session["id"].as_str().unwrap().to_string();
        let mut listed = Vec::new();
        for (n, range) in parts {
            let auth = format!("Bearer {token}");
            let r = self.request(
                "PUT",
                &format!("/v1/uploads/{id}/parts/{n}"),
                &[("Authorization", &auth)],
                &data[range.clone()],
            );
            assert_eq!(r.status, 200, "{}", r.text());
            listed.push(json!({"number": n, "etag": r.json()["etag"], "size_bytes": range.len()}));
        }
        let c = self.call(
            "POST",
            &format!("/v1/uploads/{id}/complete"),
            token,
            &json!({"parts": listed}),
        );
        assert_eq!(c.status, 200, "{}", c.text());
        c.json()
    }

    /// Uploads `data` in one part; asserts it ends `ready`. Returns its digest.
    pub fn upload(&self, token: &str, data: &[u8]) -> String {
        let s = self.upload_parts(token, data, &[(1, 0..data.len())]);
        assert_eq!(s["state"], "ready", "{s}");
        sha256_digest(data)
    }

    /// Creates image/version/artifact (qcow2, x86_64) plus an `incus.tar.xz` attachment from
    /// the given bytes, publishes and waits for success.
    pub fn publish_image(
        &self,
        token: &str,
        image: &str,
        version: &str,
        disk: &[u8],
        meta: &[u8],
    ) -> Published {
        let a = draft_with_artifact(self, token, image, version, disk);
        let aid = a["id"].as_str().unwrap();
        self.attach_incus_tar_xz(token, image, version, aid, meta);
        self.publish(token, image, version);
        let manifest = json_ok(
            &self.get(&format!("/v1/images/{image}/versions/{version}")),
            200,
        );
        Published {
            artifact_id: id_of(&manifest["artifacts"][0]["artifact"]["id"]),
            attachment_id: id_of(&manifest["artifacts"][0]["attachments"][0]["id"]),
            version_id: id_of(&manifest["version"]["id"]),
            manifest,
        }
    }

    /// Creates an image from its JSON description (`name`, optionally `display_name`).
    pub fn create_image(&self, token: &str, image: &Value) {
        let r = self.call("POST", "/v1/images", token, image);
        assert_eq!(r.status, 201, "{}", r.text());
    }

    /// Asks for a new draft version of an image and returns the answer, for the caller to
    /// judge.
    pub fn request_version(&self, token: &str, image: &str, version: &str) -> Resp {
        self.call(
            "POST",
            &format!("/v1/images/{image}/versions"),
            token,
            &json!({"version": version}),
        )
    }

    /// Creates a draft version of an existing image.
    pub fn create_version(&self, token: &str, image: &str, version: &str) {
        let r = self.request_version(token, image, version);
        assert_eq!(r.status, 201, "{}", r.text());
    }

    /// Uploads `meta` and attaches it to a draft's artifact as its `incus.tar.xz`.
    pub fn attach_incus_tar_xz(
        &self,
        token: &str,
        image: &str,
        version: &str,
        artifact_id: &str,
        meta: &[u8],
    ) {
        let m = self.upload(token, meta);
        let t = self.call(
            "POST",
            &format!("/v1/images/{image}/versions/{version}/artifacts/{artifact_id}/attachments"),
            token,
            &json!({"name": "incus.tar.xz", "media_type": "application/x-xz", "blob_digest": m, "blob_size_bytes": meta.len()}),
        );
        assert_eq!(t.status, 201, "{}", t.text());
    }

    /// Asks for a draft version to be published and returns the answer, for the caller to
    /// judge.
    pub fn request_publish(&self, token: &str, image: &str, version: &str) -> Resp {
        self.call(
            "POST",
            &format!("/v1/images/{image}/versions/{version}/publish"),
            token,
            &Value::Null,
        )
    }

    /// Publishes a draft version and waits for its job to succeed. Returns the finished job.
    pub fn publish(&self, token: &str, image: &str, version: &str) -> Value {
        let p = self.request_publish(token, image, version);
        assert_eq!(p.status, 202, "{}", p.text());
        let done = self.wait_job(token, p.json()["id"].as_str().unwrap());
        assert_eq!(done["state"], "succeeded", "{done}");
        done
    }

    /// Points an alias at a version; asserts a JSON success response and returns its body.
    pub fn put_alias(&self, token: &str, image: &str, alias: &str, version: &str) -> Value {
        let r = self.call(
            "PUT",
            &format!("/v1/images/{image}/aliases/{alias}"),
            token,
            &json!({"version": version}),
        );
        json_ok(&r, 200)
    }

    /// Deletes an alias and returns the answer, for the caller to judge.
    pub fn delete_alias(&self, token: &str, image: &str, alias: &str) -> Resp {
        self.call(
            "DELETE",
            &format!("/v1/images/{image}/aliases/{alias}"),
            token,
            &Value::Null,
        )
    }

    /// Stores an image's retention policy and returns the answer, for the caller to judge.
    pub fn put_retention(&self, token: &str, image: &str, policy: &Value) -> Resp {
        self.call(
            "PUT",
            &format!("/v1/images/{image}/retention"),
            token,
            policy,
        )
    }

    /// Previews an image's retention, of the stored policy (`Value::Null`) or of a proposed
    /// one, and returns the answer, for the caller to judge.
    pub fn preview_retention(&self, token: &str, image: &str, policy: &Value) -> Resp {
        self.call(
            "POST",
            &format!("/v1/images/{image}/retention/preview"),
            token,
            policy,
        )
    }

    /// Retires a version (`DELETE` of the version) and returns the answer, for the caller to
    /// judge.
    pub fn retire(&self, token: &str, image: &str, version: &str) -> Resp {
        self.call(
            "DELETE",
            &format!("/v1/images/{image}/versions/{version}"),
            token,
            &Value::Null,
        )
    }

    /// Polls a publish job until it leaves queued/running (30 s limit).
    pub fn wait_job(&self, token: &str, job: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let j = self
                .call(
                    "GET",
                    &format!("/v1/publish-jobs/{job}"),
                    token,
                    &Value::Null,
                )
                .json();
            if j["state"] != "queued" && j["state"] != "running" {
                return j;
            }
            assert!(Instant::now() < deadline, "job did not finish: {j}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What `Server::publish_image` published: the version's manifest and the ids tests build
/// paths from.
pub struct Published {
    pub manifest: Value,
    pub version_id: String,
    pub artifact_id: String,
    pub attachment_id: String,
}

impl Published {
    /// The download path of the artifact's disk, by artifact id.
    pub fn download_path(&self) -> String {
        let image = self.manifest["image"]["name"].as_str().unwrap();
        let version = self.manifest["version"]["version"].as_str().unwrap();
        let aid = &self.artifact_id;
        format!("/v1/images/{image}/versions/{version}/artifacts/{aid}/download")
    }
}

/// Stops a helper daemon (nginx): SIGTERM, which lets its master stop the workers, then SIGKILL
/// if it lingers past ten seconds.
pub fn stop_daemon(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Polls `f` every 50 ms until it returns true; panics with `what` after `secs` seconds.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port nobody listens on at the moment (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd` to its end and fails the test, naming the command and showing its error output,
/// unless it succeeded. Returns the output.
pub fn output_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The metrics listener's address, from the server's `metrics on http://...` log line (start the
/// server with `--metrics-listen 127.0.0.1:0`).
pub fn metrics_addr(s: &Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // The last such line: after a restart the listener has a new port.
        if let Some(line) = s
            .log_text()
            .lines()
            .rev()
            .find(|l| l.contains("metrics on http://"))
        {
            let rest =
                &line[line.find("metrics on http://").unwrap() + "metrics on http://".len()..];
            return rest.split('/').next().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no metrics line in log:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A parsed HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// Asserts a problem+json error with this status whose detail contains `detail`.
    pub fn assert_problem(&self, status: u16, detail: &str) {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("Content-Type"),
            Some("application/problem+json"),
            "{}",
            self.text()
        );
        let j = self.json();
        assert_eq!(j["status"], status);
        assert_eq!(j["type"], "about:blank");
        assert!(
            j["detail"].as_str().unwrap_or("").contains(detail),
            "detail {:?} lacks {detail:?}",
            j["detail"]
        );
    }
}

/// One request on a fresh connection. `body == None` sends no Content-Length at all.
pub fn raw_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Resp {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    // The server's address as `Host`, unless the caller sends another (a client reaching the
    // server under another name).
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("Host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        s.write_all(b).unwrap();
    }
    read_response(&mut s, method == "HEAD")
}

/// Reads a response until the server closes the connection.
pub fn read_response(s: &mut TcpStream, head_only: bool) -> Resp {
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw, head_only)
}

pub fn parse_response(raw: &[u8], _head_only: bool) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| {
            panic!(
                "no header end in response: {:?}",
                String::from_utf8_lossy(raw)
            )
        });
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// A gzip body decompressed.
pub fn gunzip(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(body)
        .read_to_end(&mut out)
        .expect("a gzip body");
    out
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Whether an external tool is on PATH. In CI (`CI=true`) a missing tool fails the test;
/// locally it is skipped with a loud message.
pub fn require_tool(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("required tool {tool:?} is missing in CI");
        }
        eprintln!("\n!!!!!!!! SKIPPING: {tool} is not installed (CI=true would fail) !!!!!!!!\n");
    }
    found
}

/// Asserts a JSON success response (docs/api.md section 1): this status, `Content-Type: application/json`
/// exactly, a body that ends with exactly one `\n`. Returns the decoded body.
pub fn json_ok(r: &Resp, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.header("Content-Type"),
        Some("application/json"),
        "{}",
        r.text()
    );
    assert!(
        r.body.ends_with(b"\n") && !r.body.ends_with(b"\n\n"),
        "body must end with one newline: {:?}",
        r.text()
    );
    r.json()
}

/// Parses an RFC 3339 UTC timestamp member (`Z` suffix required); never string-compare them.
pub fn ts(v: &Value) -> time::OffsetDateTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("timestamp is not a string: {v}"));
    assert!(
        s.ends_with('Z'),
        "timestamp {s:?} is not UTC with a Z suffix"
    );
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {s:?} is not RFC 3339: {e}"))
}

/// Asserts an id member is a lowercase hyphenated UUID and returns it.
pub fn id_of(v: &Value) -> String {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("id is not a string: {v}"));
    let u = uuid::Uuid::parse_str(s).unwrap_or_else(|e| panic!("id {s:?} is not a UUID: {e}"));
    assert_eq!(
        s,
        u.hyphenated().to_string(),
        "id must be lowercase hyphenated"
    );
    s.to_string()
}

/// PUTs one upload part with the writer's token.
pub fn put_part(s: &Server, token: &str, upload: &str, number: &str, data: &[u8]) -> Resp {
    let auth = format!("Bearer {token}");
    s.request(
        "PUT",
        &format!("/v1/uploads/{upload}/parts/{number}"),
        &[("Authorization", &auth)],
        data,
    )
}

/// Creates (or reuses) an image and creates a draft version of it with one qcow2 artifact whose
/// primary blob is `disk` (uploaded first). Returns the artifact JSON.
pub fn draft_with_artifact(
    s: &Server,
    token: &str,
    image: &str,
    version: &str,
    disk: &[u8],
) -> Value {
    let d = s.upload(token, disk);
    let r = s.call("POST", "/v1/images", token, &json!({"name": image}));
    assert!(r.status == 201 || r.status == 409, "{}", r.text());
    s.create_version(token, image, version);
    let a = s.call(
        "POST",
        &format!("/v1/images/{image}/versions/{version}/artifacts"),
        token,
        &json!({"operating_system": "debian", "architecture": "x86_64", "format": "qcow2",
                "primary_blob_digest": d, "primary_blob_size_bytes": disk.len(),
                "primary_media_type": "application/x-qemu-disk"}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    a.json()
}
