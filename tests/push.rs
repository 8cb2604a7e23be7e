//! `imgsrv push` with the real binary on both sides: publish and download, a rerun that changes
//! nothing, a conflicting version refused, an upload killed mid-way and resumed without resending
//! acknowledged parts, and the documented exit codes.

use crate::util::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A client command (`push`, `mirror`) of the binary under test with its own state directory.
pub fn client(state: &Path, token: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env("XDG_STATE_HOME", state)
        .env_remove("IMGSRV_TOKEN")
        .stdin(Stdio::null());
    if let Some(t) = token {
        cmd.env("IMGSRV_TOKEN", t);
    }
    cmd
}

pub fn run(mut cmd: Command) -> Output {
    cmd.output().expect("running imgsrv")
}

pub fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Body bytes the server has received on upload parts so far (its own counter).
pub fn part_bytes(metrics: &str) -> u64 {
    let text = raw_request(metrics, "GET", "/metrics", &[], None).text();
    let series = "imgsrv_http_request_body_bytes_total{route=\"/v1/uploads/{upload_id}/parts/{part_number}\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(series))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0)
}

/// Acknowledged parts recorded in the single state file under `state` (0 when there is none).
pub fn acked_parts(state: &Path) -> usize {
    let dir = state.join("imgsrv/uploads");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<Value>(&t).ok())
        .map(|v| v["parts"].as_object().map(|m| m.len()).unwrap_or(0))
        .max()
        .unwrap_or(0)
}

/// Starts `cmd`, SIGKILLs it once its state file records at least `parts` acknowledged parts,
/// and returns how many were recorded at the kill.
pub fn kill_after_parts(mut cmd: Command, state: &Path, parts: usize) -> usize {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if acked_parts(state) >= parts {
            child.kill().unwrap();
            child.wait().unwrap();
            // The kill may land between a part's answer and the state write: count what the
            // file says afterwards, which is what a rerun will trust.
            return acked_parts(state);
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the client finished ({st}) before it could be interrupted");
        }
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// An interrupted transfer to `t` resumed: runs `cmd()` until `parts` parts are acknowledged
/// and kills it, then runs `cmd()` again to its successful end, and checks that the second run
/// sent no acknowledged part again (of `total` bytes, parts of a MiB). Returns the second run's
/// output.
pub fn interrupt_and_resume(
    what: &str,
    t: &Target,
    cmd: impl Fn() -> Command,
    parts: usize,
    total: u64,
) -> Output {
    let acked = kill_after_parts(cmd(), &t.state, parts);
    // Let the server notice the cut connection before reading its counter.
    std::thread::sleep(Duration::from_millis(500));
    let first = t.part_bytes();
    assert!(first >= (acked * MIB) as u64, "{first} < {acked} parts");
    let o = run_ok(cmd());
    let second = t.part_bytes() - first;
    let most = total - (acked * MIB) as u64;
    eprintln!(
        "{what} resume: first run sent {first} bytes ({acked} parts acknowledged), the resumed run {second} of {total}"
    );
    assert!(
        second <= most,
        "the resumed run sent {second} bytes, at most {most} expected ({acked} parts were acknowledged)\n{}",
        show(&o)
    );
    o
}

pub const MIB: usize = 1024 * 1024;

/// A server a client command writes to, with what the command needs: a content writer's token
/// and a scratch directory holding the image files and the client's state.
pub struct Target {
    pub s: Server,
    pub w: String,
    pub work: tempfile::TempDir,
    pub state: PathBuf,
}

impl Target {
    pub fn new(s: Server) -> Target {
        let w = s.writer_token();
        let work = tempfile::tempdir().unwrap();
        let state = work.path().join("state");
        Target { s, w, work, state }
    }

    /// A server with its metrics listener on, for tests that count the bytes it received.
    pub fn with_metrics() -> Target {
        Target::new(Server::start_with(&["--metrics-listen", "127.0.0.1:0"]))
    }

    /// Body bytes the server has received on upload parts so far (`with_metrics` only).
    pub fn part_bytes(&self) -> u64 {
        part_bytes(&metrics_addr(&self.s))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.s.addr)
    }

    /// A directory of image files in the scratch directory (see `image_dir`).
    pub fn image_dir(&self, name: &str, disk: &[u8], arch: &str) -> PathBuf {
        image_dir(self.work.path(), name, disk, arch)
    }

    /// `imgsrv push --server URL ARGS...` with the writer's token.
    pub fn push(&self, args: &[&str]) -> Command {
        let url = self.url();
        let mut all = vec!["push", "--server", &url];
        all.extend_from_slice(args);
        client(&self.state, Some(&self.w), &all)
    }

    /// `imgsrv mirror --from UP --to URL --part-size-mib 1 ARGS...` with the writer's token.
    pub fn mirror_from(&self, up: &Server, args: &[&str]) -> Command {
        let (from, to) = (format!("http://{}", up.addr), self.url());
        let mut all = vec![
            "mirror",
            "--from",
            &from,
            "--to",
            &to,
            "--part-size-mib",
            "1",
        ];
        all.extend_from_slice(args);
        client(&self.state, Some(&self.w), &all)
    }
}

/// Runs a client command and asserts that it succeeded.
pub fn run_ok(cmd: Command) -> Output {
    let o = run(cmd);
    assert!(o.status.success(), "{}", show(&o));
    o
}

fn download(s: &Server, manifest: &Value, i: usize) -> (Vec<u8>, Vec<u8>) {
    let v = &manifest["version"]["version"];
    let img = &manifest["image"]["name"];
    let a = &manifest["artifacts"][i];
    let aid = a["artifact"]["id"].as_str().unwrap();
    let tid = a["attachments"][0]["id"].as_str().unwrap();
    let base = format!(
        "/v1/images/{}/versions/{}/artifacts/{aid}",
        img.as_str().unwrap(),
        v.as_str().unwrap()
    );
    let disk = s.get(&format!("{base}/download"));
    assert_eq!(disk.status, 200);
    let meta = s.get(&format!("{base}/attachments/{tid}/download"));
    assert_eq!(meta.status, 200);
    (disk.body, meta.body)
}

/// Whether tar and xz, which make the `incus.tar.xz` files, are installed.
pub fn archivers_present() -> bool {
    require_tool("tar") && require_tool("xz")
}

#[test]
fn push_publishes_and_a_rerun_changes_nothing() {
    if !archivers_present() {
        return;
    }
    let t = Target::with_metrics();
    let s = &t.s;
    let disk = bytes(3 * CHUNK_SIZE + 1234, 301);
    let dir = t.image_dir("img", &disk, "aarch64");
    let meta = std::fs::read(dir.join("incus.tar.xz")).unwrap();

    let push = |extra: &[&str]| {
        let mut args = vec!["debian-bookworm", "12.5.0", "--part-size-mib", "1"];
        args.extend_from_slice(extra);
        t.push(&args)
    };
    let dir_s = dir.display().to_string();
    let o = run_ok(push(&[&dir_s, "--alias", "latest", "--alias", "stable"]));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("published debian-bookworm 12.5.0"), "{out}");
    assert!(out.contains(&sha256_digest(&disk)), "{out}");
    let sent = t.part_bytes();
    assert_eq!(
        sent,
        (disk.len() + meta.len()) as u64,
        "each byte sent once"
    );

    // os and architecture come from metadata.yaml.
    let m = s.get("/v1/images/debian-bookworm/refs/latest").json();
    assert_eq!(m["version"]["state"], "published", "{m}");
    let a = &m["artifacts"][0]["artifact"];
    assert_eq!(a["architecture"], "aarch64");
    assert_eq!(a["operating_system"], "Debian");
    assert_eq!(a["format"], "qcow2");
    assert_eq!(a["variant"], "default");
    assert_eq!(m["artifacts"][0]["attachments"][0]["name"], "incus.tar.xz");
    let (got_disk, got_meta) = download(s, &m, 0);
    assert!(got_disk == disk, "disk differs");
    assert_eq!(got_meta, meta);
    assert_eq!(
        s.get("/v1/images/debian-bookworm/aliases/stable").json()["version"],
        "12.5.0"
    );
    let alias_before = s.get("/v1/images/debian-bookworm/aliases/latest").json();
    let manifest_before = s.get("/v1/images/debian-bookworm/versions/12.5.0").body;

    // The same command again, with the files named one by one: nothing sent, nothing changed.
    let d = dir.join("disk.qcow2").display().to_string();
    let meta_file = dir.join("incus.tar.xz").display().to_string();
    let o = run_ok(push(&[&d, &meta_file, "--alias", "latest"]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("already published"),
        "{}",
        show(&o)
    );
    assert_eq!(t.part_bytes(), sent, "a rerun sent bytes");
    assert_eq!(
        s.get("/v1/images/debian-bookworm/aliases/latest").json(),
        alias_before
    );
    assert_eq!(
        s.get("/v1/images/debian-bookworm/versions/12.5.0").body,
        manifest_before
    );

    // A new version of the same files: the blobs are on the server already, so nothing is
    // sent (begin answers ready), and the alias moves.
    let o = run_ok(t.push(&["debian-bookworm", "12.6.0", &dir_s, "--alias", "latest"]));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already on the server"),
        "{}",
        show(&o)
    );
    assert_eq!(t.part_bytes(), sent);
    assert_eq!(
        s.get("/v1/images/debian-bookworm/aliases/latest").json()["version"],
        "12.6.0"
    );
}

#[test]
fn push_of_a_conflicting_version_is_refused_and_changes_nothing() {
    if !archivers_present() {
        return;
    }
    let t = Target::with_metrics();
    let one = t.image_dir("one", &bytes(100_000, 1), "x86_64");
    let two = t.image_dir("two", &bytes(100_000, 2), "x86_64");
    let push = |dir: &Path| {
        let d = dir.display().to_string();
        run(t.push(&["img", "1.0", &d, "--alias", "latest"]))
    };
    let o = push(&one);
    assert!(o.status.success(), "{}", show(&o));
    let before = t.s.get("/v1/images/img/versions/1.0").body;
    let sent = t.part_bytes();

    let o = push(&two);
    assert_eq!(o.status.code(), Some(4), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already published with other content"),
        "{err}"
    );
    assert_eq!(t.s.get("/v1/images/img/versions/1.0").body, before);
    assert_eq!(t.part_bytes(), sent, "nothing may be uploaded");
    // The refused files are not stored: their digest is unknown to the server.
    let disk_two = std::fs::read(two.join("disk.qcow2")).unwrap();
    assert_eq!(
        t.s.get(&format!("/v1/blobs/{}", sha256_digest(&disk_two)))
            .status,
        404
    );
}

#[test]
fn push_killed_mid_upload_resumes_without_resending_acknowledged_parts() {
    if !archivers_present() {
        return;
    }
    let t = Target::with_metrics();
    let disk = bytes(40 * MIB + 777, 7);
    let dir = t.image_dir("big", &disk, "x86_64");
    let meta_len = std::fs::metadata(dir.join("incus.tar.xz")).unwrap().len();
    let d = dir.display().to_string();
    let cmd = || t.push(&["img", "1.0", &d, "--part-size-mib", "1", "--parallel", "2"]);
    let total = disk.len() as u64 + meta_len;
    let o = interrupt_and_resume("push", &t, cmd, 8, total);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("resuming"),
        "{}",
        show(&o)
    );
    let m = t.s.get("/v1/images/img/versions/1.0").json();
    assert_eq!(m["version"]["state"], "published");
    let (got, _) = download(&t.s, &m, 0);
    assert!(got == disk, "downloaded disk differs");
    assert_eq!(
        acked_parts(&t.state),
        0,
        "the state file is removed once done"
    );
}

#[test]
fn push_errors_have_documented_exit_codes() {
    if !archivers_present() {
        return;
    }
    let t = Target::new(Server::start());
    let (s, w, state) = (&t.s, &t.w, &t.state);
    let reader = s.token_with_roles(&[]);
    let dir = t.image_dir("img", b"disk bytes", "x86_64");
    let d = dir.display().to_string();
    let url = t.url();
    let args = ["push", "--server", &url, "img", "1.0", &d];

    let check = |token: Option<&str>, args: &[&str], code: i32, needle: &str| {
        let o = run(client(state, token, args));
        assert_eq!(o.status.code(), Some(code), "{}", show(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{needle:?} not in {}", show(&o));
    };
    check(None, &args, 2, "IMGSRV_TOKEN");
    check(Some("imgsrv_at_nope"), &args, 3, "401");
    check(Some(&reader), &args, 3, "content-writer");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    check(
        Some(w),
        &["push", "--server", &nowhere, "img", "1.0", &d],
        6,
        &format!("cannot talk to {nowhere}"),
    );
    // Any other file in the directory is named, and nothing is sent.
    let stray = dir.join("notes.txt");
    std::fs::write(&stray, "x").unwrap();
    check(Some(w), &args, 2, "notes.txt");
    std::fs::remove_file(&stray).unwrap();
    let disk_only = dir.join("disk.qcow2").display().to_string();
    check(
        Some(w),
        &["push", "--server", &url, "img", "1.0", &disk_only],
        2,
        "--os",
    );
    // The token file works like the variable, and --os/--arch stand in for metadata.
    let tf = t.work.path().join("token");
    std::fs::write(&tf, format!("{w}\n")).unwrap();
    let tf_s = tf.display().to_string();
    run_ok(client(
        state,
        None,
        &[
            "push",
            "--server",
            &url,
            "img",
            "1.0",
            &disk_only,
            "--os",
            "debian",
            "--arch",
            "amd64",
            "--token-file",
            &tf_s,
        ],
    ));
    let m = s.get("/v1/images/img/versions/1.0").json();
    assert_eq!(m["artifacts"][0]["artifact"]["architecture"], "x86_64");
    assert_eq!(m["artifacts"][0]["attachments"], serde_json::json!([]));
    // A retired version's name is a conflict too.
    let r = s.retire(w, "img", "1.0");
    assert_eq!(r.status, 204, "{}", r.text());
    check(Some(w), &args, 4, "retired");
}

#[test]
fn push_of_rootfs_squashfs_names_the_format() {
    if !archivers_present() {
        return;
    }
    // squashfs is a known artifact format on servers that have it; a server without it
    // answers 400, which push reports clearly. Either way the file is recognised.
    let t = Target::new(Server::start());
    let dir = t.work.path().join("ct");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("rootfs.squashfs"), bytes(5000, 9)).unwrap();
    let meta = incus_tar_xz(
        &t.work.path().join("meta-ct"),
        "x86_64",
        "Alpine",
        "Alpine ct",
    );
    std::fs::write(dir.join("incus.tar.xz"), meta).unwrap();
    let d = dir.display().to_string();
    let o = run(t.push(&["alpine", "3.20", &d]));
    if o.status.success() {
        let m = t.s.get("/v1/images/alpine/versions/3.20").json();
        assert_eq!(m["artifacts"][0]["artifact"]["format"], "squashfs", "{m}");
        assert_eq!(
            m["artifacts"][0]["artifact"]["primary_media_type"],
            "application/vnd.squashfs"
        );
    } else {
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("refused a squashfs artifact"),
            "{}",
            show(&o)
        );
    }
}

#[test]
fn push_over_tls_trusts_ca_cert() {
    if !archivers_present() || !require_tool("openssl") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let (s, cert) = Server::start_tls(work.path(), &[]);
    let c = cert.display().to_string();
    let w = {
        // Tokens are made over plain HTTP by the helpers; this server speaks TLS only, so
        // read the bootstrap token and make a writer with the client's own HTTP stack: curl.
        let admin = s.bootstrap_token();
        let curl = |args: &[&str]| -> Value {
            let out = Command::new("curl")
                .args([
                    "-sS",
                    "--cacert",
                    &c,
                    "-H",
                    &format!("Authorization: Bearer {admin}"),
                ])
                .args(args)
                .output()
                .unwrap();
            serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
        };
        let base = format!("https://{}", s.addr);
        let p = curl(&[
            "-d",
            r#"{"kind":"service","display_name":"t"}"#,
            &format!("{base}/v1/auth/principals"),
        ]);
        let id = p["id"].as_str().unwrap().to_string();
        curl(&[
            "-X",
            "PUT",
            &format!("{base}/v1/auth/principals/{id}/roles/content-writer"),
        ]);
        let t = curl(&[
            "-d",
            r#"{"name":"t","expires_at":"2099-01-01T00:00:00Z"}"#,
            &format!("{base}/v1/auth/principals/{id}/api-tokens"),
        ]);
        t["plaintext"].as_str().unwrap().to_string()
    };
    let state = work.path().join("state");
    let dir = image_dir(work.path(), "img", &bytes(200_000, 5), "x86_64");
    let d = dir.display().to_string();
    let url = format!("https://{}", s.addr);
    let push = |extra: &[&str]| {
        let mut args = vec!["push", "--server", &url, "img", "1.0", &d];
        args.extend_from_slice(extra);
        run(client(&state, Some(&w), &args))
    };
    let o = push(&[]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "an unknown certificate: {}",
        show(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("certificate"),
        "{}",
        show(&o)
    );
    let o = push(&["--ca-cert", &c]);
    assert!(o.status.success(), "{}", show(&o));
}

#[test]
fn push_to_a_full_server_exits_5() {
    if !archivers_present() {
        return;
    }
    // A reserve larger than any disk: every write is refused with 507 (a part before its body
    // is read). The token is made before the restart that sets it.
    let mut t = Target::new(Server::start());
    t.s.terminate();
    t.s.extra = vec!["--disk-reserve".into(), "1000TiB".into()];
    t.s.start_again();
    let dir = t.image_dir("img", &bytes(50_000, 3), "x86_64");
    let d = dir.display().to_string();
    let o = run(t.push(&["img", "1.0", &d]));
    assert_eq!(o.status.code(), Some(5), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("507") && err.contains("disk space"), "{err}");
}
