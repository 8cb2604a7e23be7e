//! The real Incus client (`incus`, no daemon needed) against imgsrv over TLS: the Simple
//! Streams projection must list, describe and export published images exactly as the README's
//! "Use with Incus" section says. Publishing happens over plain HTTP; the same data directory is then served over TLS
//! (Incus refuses `http://` remotes and needs TLS 1.3).

use crate::incusd::Daemon;
use crate::util::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tiny valid VM image: a qcow2 disk and an `incus.tar.xz` with a `metadata.yaml`.
pub(crate) struct Fixture {
    pub disk: Vec<u8>,
    pub meta: Vec<u8>,
}

pub(crate) fn fixture(dir: &Path, name: &str, arch: &str, disk_mib: u32) -> Fixture {
    let root = dir.join(name);
    std::fs::create_dir_all(&root).unwrap();
    let disk = root.join("disk.qcow2");
    output_ok(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg(format!("{disk_mib}M")),
    );
    Fixture {
        disk: std::fs::read(&disk).unwrap(),
        meta: incus_tar_xz(&root.join("img"), arch, "debian", name),
    }
}

pub(crate) fn fingerprint(f: &Fixture) -> String {
    let mut both = f.meta.clone();
    both.extend_from_slice(&f.disk);
    sha256_hex(&both)
}

/// Adds a qcow2 artifact (and optionally its `incus.tar.xz`) to a draft version.
#[allow(clippy::too_many_arguments)]
fn add_artifact(
    s: &Server,
    w: &str,
    image: &str,
    version: &str,
    arch: &str,
    variant: &str,
    format: &str,
    f: &Fixture,
    with_meta: bool,
) {
    let d = s.upload(w, &f.disk);
    let a = s.call(
        "POST",
        &format!("/v1/images/{image}/versions/{version}/artifacts"),
        w,
        &json!({"variant": variant, "operating_system": "debian", "architecture": arch, "format": format,
                "primary_blob_digest": d, "primary_blob_size_bytes": f.disk.len(),
                "primary_media_type": "application/octet-stream"}),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    if with_meta {
        let aid = a.json()["id"].as_str().unwrap().to_string();
        s.attach_incus_tar_xz(w, image, version, &aid, &f.meta);
    }
}

/// An isolated Incus client configuration with the server's certificate pinned, talking to a
/// private daemon when it has one.
pub(crate) struct Client {
    dir: tempfile::TempDir,
    daemon: Option<PathBuf>,
}

impl Client {
    pub(crate) fn new(s: &Server, cert: &Path) -> Client {
        Client::connect(s, cert, None)
    }

    /// A client whose `local:` is this daemon.
    pub(crate) fn with_daemon(s: &Server, cert: &Path, daemon: &Daemon) -> Client {
        Client::connect(s, cert, Some(daemon.dir().to_path_buf()))
    }

    fn connect(s: &Server, cert: &Path, daemon: Option<PathBuf>) -> Client {
        let dir = tempfile::tempdir().unwrap();
        let c = Client { dir, daemon };
        std::fs::create_dir_all(c.conf().join("servercerts")).unwrap();
        std::fs::copy(cert, c.conf().join("servercerts/imgsrv.crt")).unwrap();
        let url = format!("https://{}", s.addr);
        let out = c.run(&["remote", "add", "imgsrv", &url, "--protocol=simplestreams"]);
        assert!(out.0, "remote add failed: {}", out.2);
        c
    }
    fn conf(&self) -> PathBuf {
        self.dir.path().join("conf")
    }
    /// Runs `incus ARGS`; returns (success, stdout, stderr).
    pub(crate) fn run(&self, args: &[&str]) -> (bool, String, String) {
        let mut cmd = Command::new("incus");
        cmd.args(args)
            .env("INCUS_CONF", self.conf())
            .env("INCUS_CACHE", self.dir.path().join("cache"))
            .env("HOME", self.dir.path())
            .stdin(std::process::Stdio::null());
        if let Some(d) = &self.daemon {
            cmd.env("INCUS_DIR", d);
        }
        let out = cmd.output().expect("running incus");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    /// Runs `incus ARGS` and asserts success; returns stdout.
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "incus {args:?} failed: {err}");
        out
    }
    fn list(&self) -> Vec<Value> {
        let (ok, out, err) = self.run(&["image", "list", "imgsrv:", "--format", "json"]);
        assert!(ok, "image list failed: {err}");
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
    pub(crate) fn info_fingerprint(&self, alias: &str) -> String {
        let (ok, out, err) = self.run(&["image", "info", &format!("imgsrv:{alias}")]);
        assert!(ok, "image info {alias} failed: {err}");
        assert!(!err.contains("More than one match"), "{err}");
        out.lines()
            .find_map(|l| l.strip_prefix("Fingerprint: "))
            .unwrap_or_else(|| panic!("no fingerprint in: {out}"))
            .trim()
            .to_string()
    }
}

fn aliases_of(img: &Value) -> Vec<String> {
    img["aliases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect()
}

fn by_fingerprint<'a>(list: &'a [Value], fp: &str) -> &'a Value {
    list.iter()
        .find(|i| i["fingerprint"] == fp)
        .unwrap_or_else(|| panic!("fingerprint {fp} not listed in {list:#?}"))
}

#[test]
fn incus_lists_describes_and_exports_published_images() {
    if !(require_tool("incus")
        && require_tool("qemu-img")
        && require_tool("xz")
        && require_tool("openssl"))
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed_cert(work.path());
    let x86 = fixture(work.path(), "x86", "x86_64", 64);
    let arm = fixture(work.path(), "arm", "aarch64", 64);
    let cloud = fixture(work.path(), "cloud", "x86_64", 80);
    let v3 = fixture(work.path(), "v3", "x86_64", 96);
    let skipped = fixture(work.path(), "skipped", "x86_64", 112);

    let mut s = Server::start();
    let w = s.writer_token();
    let img = "debian-bookworm";
    s.create_image(&w, &json!({"name": img, "display_name": "Debian 12"}));
    // 1.0: default x86_64, aarch64, a non-default variant, a raw artifact and a qcow2 without
    // incus.tar.xz (both must be skipped).
    s.create_version(&w, img, "1.0");
    add_artifact(&s, &w, img, "1.0", "x86_64", "", "qcow2", &x86, true);
    add_artifact(&s, &w, img, "1.0", "aarch64", "", "qcow2", &arm, true);
    add_artifact(&s, &w, img, "1.0", "x86_64", "cloud", "qcow2", &cloud, true);
    add_artifact(
        &s, &w, img, "1.0", "x86_64", "rawonly", "raw", &skipped, true,
    );
    add_artifact(
        &s, &w, img, "1.0", "x86_64", "nometa", "qcow2", &skipped, false,
    );
    s.publish(&w, img, "1.0");
    // 2.0 has exactly the bytes of 1.0's default x86_64 image: one fingerprint, merged aliases.
    s.create_version(&w, img, "2.0");
    add_artifact(&s, &w, img, "2.0", "x86_64", "", "qcow2", &x86, true);
    s.publish(&w, img, "2.0");
    s.create_version(&w, img, "3.0");
    add_artifact(&s, &w, img, "3.0", "x86_64", "", "qcow2", &v3, true);
    s.publish(&w, img, "3.0");
    s.put_alias(&w, img, "latest", "1.0");

    // Serve the same database over TLS.
    let plain = s.extra.clone();
    let tls = vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
    ];
    s.extra = tls.clone();
    s.restart();
    let c = Client::new(&s, &cert);
    let list = c.list();
    let (fx, fa, fc, f3) = (
        fingerprint(&x86),
        fingerprint(&arm),
        fingerprint(&cloud),
        fingerprint(&v3),
    );
    let mut fps: Vec<&str> = list
        .iter()
        .map(|i| i["fingerprint"].as_str().unwrap())
        .collect();
    fps.sort();
    let mut want = vec![fx.as_str(), fa.as_str(), fc.as_str(), f3.as_str()];
    want.sort();
    assert_eq!(
        fps, want,
        "exactly the eligible images, each fingerprint once"
    );
    for i in &list {
        assert_eq!(i["type"], "virtual-machine", "{i}");
    }
    let x = by_fingerprint(&list, &fx);
    assert_eq!(x["architecture"], "x86_64");
    let xa = aliases_of(x);
    for a in [
        format!("{img}/1.0"),
        format!("{img}/2.0"),
        format!("{img}/latest"),
    ] {
        assert!(xa.contains(&a), "{a} missing from {xa:?}");
    }
    let desc = x["properties"]["description"].as_str().unwrap();
    assert!(
        desc.contains("Debian 12") && desc.contains("amd64"),
        "{desc}"
    );
    let a = by_fingerprint(&list, &fa);
    assert_eq!(a["architecture"], "aarch64");
    // On an amd64 client a foreign architecture's image keeps only the `/arm64` alias forms,
    // so the bare `{img}/1.0` stays unambiguous.
    assert!(aliases_of(a).contains(&format!("{img}/1.0/arm64")), "{a:#}");
    let cl = aliases_of(by_fingerprint(&list, &fc));
    assert!(
        cl.contains(&format!("{img}/1.0/cloud")) && cl.contains(&format!("{img}/latest/cloud")),
        "{cl:?}"
    );
    assert!(
        !cl.contains(&format!("{img}/1.0")),
        "the variant must not claim the default alias: {cl:?}"
    );

    assert_eq!(c.info_fingerprint(&format!("{img}/1.0")), fx);
    assert_eq!(c.info_fingerprint(&format!("{img}/latest")), fx);
    assert_eq!(c.info_fingerprint(&format!("{img}/2.0")), fx);
    assert_eq!(c.info_fingerprint(&format!("{img}/1.0/cloud")), fc);

    // Export verifies every file's sha256 and the fingerprint; the two files must be distinct.
    let out = work.path().join("export");
    std::fs::create_dir_all(&out).unwrap();
    let (ok, _, err) = c.run(&[
        "image",
        "export",
        &format!("imgsrv:{img}/1.0"),
        &format!("{}/", out.display()),
    ]);
    assert!(ok, "export failed: {err}");
    assert_eq!(std::fs::read(out.join("disk.qcow2")).unwrap(), x86.disk);
    assert_eq!(std::fs::read(out.join("incus.tar.xz")).unwrap(), x86.meta);

    // Move `latest` (over plain HTTP), then look again with a fresh client cache.
    s.extra = plain;
    s.restart();
    s.put_alias(&w, img, "latest", "3.0");
    s.extra = tls;
    s.restart();
    let c = Client::new(&s, &cert);
    assert_eq!(c.info_fingerprint(&format!("{img}/latest")), f3);
    assert_eq!(
        c.info_fingerprint(&format!("{img}/1.0")),
        fx,
        "the old version stays listed"
    );
    let list = c.list();
    assert!(!aliases_of(by_fingerprint(&list, &fx)).contains(&format!("{img}/latest")));
    // Incus tries plain HTTP first on the TLS port; that must not have disturbed the server.
    assert!(std::fs::metadata(format!("/proc/{}", s.pid())).is_ok());
}

/// The imgsrv API over TLS, driven with curl (the test harness speaks plain HTTP only), for
/// tests that keep one TLS server running while they publish and move aliases.
pub(crate) struct TlsApi {
    pub base: String,
    cert: PathBuf,
    auth: String,
}

impl TlsApi {
    /// Connects with a fresh content-writer token minted with the bootstrap token.
    pub(crate) fn new(s: &Server, cert: &Path) -> TlsApi {
        let mut api = TlsApi {
            base: format!("https://{}", s.addr),
            cert: cert.to_path_buf(),
            auth: format!("Authorization: Bearer {}", s.bootstrap_token()),
        };
        let p = api.call(
            "POST",
            "/v1/auth/principals",
            &json!({"kind": "service", "display_name": "ci"}),
        );
        let pid = p["id"].as_str().unwrap().to_string();
        api.call(
            "PUT",
            &format!("/v1/auth/principals/{pid}/roles/content-writer"),
            &Value::Null,
        );
        let t = api.call(
            "POST",
            &format!("/v1/auth/principals/{pid}/api-tokens"),
            &json!({"name": "ci", "expires_at": "2099-01-01T00:00:00Z"}),
        );
        api.auth = format!("Authorization: Bearer {}", t["plaintext"].as_str().unwrap());
        api
    }

    fn curl(&self, args: &[&str]) -> Value {
        let out = output_ok(
            Command::new("curl")
                .args(["-fsS", "--cacert"])
                .arg(&self.cert)
                .args(["-H", &self.auth])
                .args(args),
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// A JSON request (`Value::Null` sends no body); asserts a 2xx and returns the body.
    pub(crate) fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        let url = format!("{}{path}", self.base);
        if body.is_null() {
            self.curl(&["-X", method, &url])
        } else {
            self.curl(&["-X", method, "-d", &body.to_string(), &url])
        }
    }

    /// Uploads bytes in one part; returns their digest.
    pub(crate) fn upload(&self, bytes: &[u8]) -> String {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), bytes).unwrap();
        let d = sha256_digest(bytes);
        let u = self.call(
            "POST",
            "/v1/uploads",
            &json!({"expected_digest": d, "expected_size_bytes": bytes.len()}),
        );
        if u["state"] == "ready" {
            return d;
        }
        let id = u["id"].as_str().unwrap();
        let part = self.curl(&[
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", file.path().display()),
            &format!("{}/v1/uploads/{id}/parts/1", self.base),
        ]);
        let done = self.call(
            "POST",
            &format!("/v1/uploads/{id}/complete"),
            &json!({"parts": [{"number": 1, "etag": part["etag"], "size_bytes": bytes.len()}]}),
        );
        assert_eq!(done["state"], "ready");
        d
    }

    /// Creates the image if needed and publishes a version holding one artifact per entry
    /// (format, primary bytes, incus.tar.xz bytes, incus requirements), all x86_64 `default`.
    pub(crate) fn publish(
        &self,
        image: &str,
        version: &str,
        artifacts: &[(&str, &[u8], &[u8], Value)],
    ) {
        let _ = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "--cacert"])
            .arg(&self.cert)
            .args(["-H", &self.auth, "-d", &json!({"name": image}).to_string()])
            .arg(format!("{}/v1/images", self.base))
            .status();
        self.call(
            "POST",
            &format!("/v1/images/{image}/versions"),
            &json!({"version": version}),
        );
        let v = format!("/v1/images/{image}/versions/{version}");
        for (format, primary, meta, requirements) in artifacts {
            let d = self.upload(primary);
            let mut body = json!({"operating_system": "busybox", "architecture": "x86_64", "format": format,
                "primary_blob_digest": d, "primary_blob_size_bytes": primary.len(),
                "primary_media_type": if *format == "squashfs" { "application/vnd.squashfs" } else { "application/x-qemu-disk" }});
            if !requirements.is_null() {
                body["incus_requirements"] = requirements.clone();
            }
            let a = self.call("POST", &format!("{v}/artifacts"), &body);
            let aid = a["id"].as_str().unwrap();
            let m = self.upload(meta);
            self.call(
                "POST",
                &format!("{v}/artifacts/{aid}/attachments"),
                &json!({"name": "incus.tar.xz", "media_type": "application/x-xz", "blob_digest": m, "blob_size_bytes": meta.len()}),
            );
        }
        let job = self.call("POST", &format!("{v}/publish"), &Value::Null);
        let job_id = job["id"].as_str().unwrap().to_string();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let j = self.call("GET", &format!("/v1/publish-jobs/{job_id}"), &Value::Null);
            if j["state"] == "succeeded" {
                return;
            }
            assert!(
                j["state"] != "failed" && std::time::Instant::now() < deadline,
                "publish did not succeed: {j}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub(crate) fn put_alias(&self, image: &str, alias: &str, version: &str) {
        self.call(
            "PUT",
            &format!("/v1/images/{image}/aliases/{alias}"),
            &json!({"version": version}),
        );
    }
}

/// What the tests that need an Incus daemon start from: the daemon, a TLS-only imgsrv whose API
/// a writer drives over curl, and a scratch directory. The fields drop in this order, so the
/// server stops before its certificate's directory goes.
pub(crate) struct WithDaemon {
    pub daemon: Daemon,
    pub s: Server,
    pub cert: PathBuf,
    pub api: TlsApi,
    pub work: tempfile::TempDir,
}

impl WithDaemon {
    /// `None` (the test is skipped, loudly) where one of `tools` or the daemon is missing.
    pub(crate) fn start(tools: &[&str]) -> Option<WithDaemon> {
        if !tools.iter().all(|t| require_tool(t)) {
            return None;
        }
        let daemon = Daemon::start()?;
        let work = tempfile::tempdir().unwrap();
        let (s, cert) = Server::start_tls(work.path(), &[]);
        let api = TlsApi::new(&s, &cert);
        Some(WithDaemon {
            daemon,
            s,
            cert,
            api,
            work,
        })
    }

    /// An Incus client whose `local:` is the daemon and whose `imgsrv:` remote is the server.
    pub(crate) fn client(&self) -> Client {
        Client::with_daemon(&self.s, &self.cert, &self.daemon)
    }
}

#[test]
fn incusd_copies_a_published_image_and_stores_its_fingerprint() {
    let tools = ["incus", "qemu-img", "xz", "openssl", "curl"];
    let Some(t) = WithDaemon::start(&tools) else {
        return;
    };
    let f = fixture(t.work.path(), "copy", "x86_64", 64);
    t.api.publish(
        "copytest",
        "1.0",
        &[("qcow2", &f.disk, &f.meta, Value::Null)],
    );

    let c = t.client();
    c.ok(&["image", "copy", "imgsrv:copytest/1.0", "local:"]);
    let list: Value =
        serde_json::from_str(&c.ok(&["image", "list", "local:", "--format", "json"])).unwrap();
    let stored: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["fingerprint"].as_str().unwrap())
        .collect();
    assert_eq!(
        stored,
        vec![fingerprint(&f).as_str()],
        "the daemon stored the image under its fingerprint"
    );
    t.daemon.shutdown();
}
