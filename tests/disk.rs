//! A full disk and a damaged database file, met as an operator meets them: the data directory
//! on a small tmpfs that the test mounts and fills, and copies of a real database with bytes
//! flipped in the header, the first pages, a chunk's bytes and random pages.

use crate::util::*;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tmpfs mounted on a fresh temporary directory, unmounted and removed on drop.
struct Tmpfs {
    dir: Option<tempfile::TempDir>,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB; `None` (a loud skip, or a failure in CI) when this process
    /// may not mount.
    fn mount(mib: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot mount a tmpfs in CI (the suite runs as root there)"
            );
            eprintln!("\n!!!!!!!! SKIPPING: cannot mount a tmpfs (not root?) !!!!!!!!\n");
            return None;
        }
        Some(Tmpfs { dir: Some(dir) })
    }

    fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let dir = self.dir.take().unwrap();
        let _ = Command::new("umount").arg(dir.path()).status();
        drop(dir);
    }
}

/// Writes zeros to `path` until the filesystem is full; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(_) => break,
        }
    }
    // Fill the last partial page too.
    for _ in 0..256 {
        match f.write(&block[..4096]) {
            Ok(n) if n > 0 => written += n as u64,
            _ => break,
        }
    }
    written
}

/// Sends a part upload's head, waits up to a second for an answer decided before the body
/// (a 507 must come then), else sends the body and reads the answer. Returns the answer and
/// whether it came before the body was sent.
fn send_part_waiting(s: &Server, token: &str, upload: &str, data: &[u8]) -> (Resp, bool) {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let head = format!(
        "PUT /v1/uploads/{upload}/parts/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut first = [0u8; 1];
    let early = matches!(c.peek(&mut first), Ok(n) if n > 0);
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    if !early {
        let _ = c.write_all(data);
    }
    (read_response(&mut c, false), early)
}

/// Sends a part upload and reads the answer.
fn send_part(s: &Server, token: &str, upload: &str, data: &[u8]) -> Resp {
    send_part_waiting(s, token, upload, data).0
}

fn begin(s: &Server, token: &str, data: &[u8]) -> String {
    let r = s.begin_upload(token, data);
    assert!(
        r.status == 201 || r.status == 200,
        "{}\n{}",
        r.text(),
        s.log_text()
    );
    r.json()["id"].as_str().unwrap().to_string()
}

fn complete(s: &Server, token: &str, upload: &str, part: &Resp, len: usize) -> Resp {
    s.call(
        "POST",
        &format!("/v1/uploads/{upload}/complete"),
        token,
        &json!({"parts": [{"number": 1, "etag": part.json()["etag"], "size_bytes": len}]}),
    )
}

/// Every acknowledged blob downloads byte-identical (retrying briefly while the store
/// reopens after an I/O error).
fn assert_blobs_intact(s: &Server, acked: &[Vec<u8>]) {
    for data in acked {
        let path = format!("/v1/blobs/{}", sha256_digest(data));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = s.get(&path);
            if r.status == 200 && r.body.len() == data.len() {
                assert!(r.body == *data, "wrong bytes served for {path}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: {} with {} bytes\n{}",
                r.status,
                r.body.len(),
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn wait_ready(s: &Server, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let st = s.get("/readyz").status;
        if st == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {st}, wanted {want}\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_507(r: &Resp) {
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(r.header("Content-Type"), Some("application/problem+json"));
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("insufficient storage"),
        "{}",
        r.text()
    );
}

#[test]
fn full_disk_refuses_early_keeps_serving_and_recovers_without_restart() {
    let Some(fs) = Tmpfs::mount(128) else { return };
    const MIB: usize = 1 << 20;
    let data_dir = tempfile::tempdir_in(fs.path()).unwrap();
    let filler = fs.path().join("filler");
    let mut s = Server::start_in(
        data_dir,
        &["--disk-reserve", "8MiB", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = metrics_addr(&s);
    let token = s.writer_token();
    assert!(
        s.data_dir().join("imgsrv.headroom").exists(),
        "the headroom file is made at start"
    );

    // 1. Uploads of 24 MiB until one is refused: 507 before the body is stored, with what
    // is free and what was asked.
    let mut acked = Vec::new();
    let refused = loop {
        let data = bytes(24 * MIB, acked.len() as u64 + 1);
        let id = begin(&s, &token, &data);
        let started = Instant::now();
        let (r, early) = send_part_waiting(&s, &token, &id, &data);
        if r.status == 507 {
            eprintln!("507 after {:?}, before the body", started.elapsed());
            assert!(early, "the 507 came only after the body was sent");
            break r;
        }
        assert!(!early, "{}", r.text());
        assert_eq!(r.status, 200, "{}", r.text());
        let c = complete(&s, &token, &id, &r, data.len());
        assert_eq!(c.status, 200, "{}", c.text());
        acked.push(data);
        assert!(acked.len() < 8, "a 128 MiB filesystem never filled");
    };
    assert_507(&refused);
    let detail = refused.json()["detail"].as_str().unwrap().to_string();
    assert!(
        detail.contains(&format!("needs {} bytes", 24 * MIB)) && detail.contains("free"),
        "{detail}"
    );
    assert!(acked.len() >= 2, "only {} uploads fitted", acked.len());
    // Reads and small writes still work: the reserve is untouched.
    assert_eq!(s.get("/v1/images").status, 200);
    assert_blobs_intact(&s, &acked);
    assert_eq!(
        s.call("POST", "/v1/images", &token, &json!({"name": "small"}))
            .status,
        201
    );

    // 2. Another process fills the disk while a part is streaming: the write fails with 507,
    // the store reopens itself, reads go on, /readyz says 503 while nothing can be written.
    let data = bytes(4 * MIB, 100);
    let id = begin(&s, &token, &data);
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(
        format!(
            "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
            data.len()
        )
        .as_bytes(),
    )
    .unwrap();
    c.write_all(&data[..MIB]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    fill(&filler);
    let _ = c.write_all(&data[MIB..]);
    let r = read_response(&mut c, false);
    assert_507(&r);
    assert_blobs_intact(&s, &acked);
    assert_eq!(s.get("/v1/images").status, 200);
    wait_ready(&s, 503, Duration::from_secs(5));
    assert!(s.get("/healthz").status == 204);
    let log = s.log_text();
    assert!(
        log.contains("ERROR") || log.contains("error"),
        "the cause is logged at error level:\n{log}"
    );
    assert!(
        log.contains("storage error (No space left on device")
            && log.contains("reopening the database in")
            && log.contains("bytes free on its filesystem"),
        "{log}"
    );
    // Metrics say what happened: the failure, the reopening, no space left.
    let m = raw_request(&metrics, "GET", "/metrics", &[], None).text();
    let sample = |series: &str| crate::metrics::sample(&m, series);
    assert!(
        sample("imgsrv_storage_errors_total{kind=\"no_space\"}") >= 1.0,
        "{m}"
    );
    assert!(sample("imgsrv_storage_recoveries_total") >= 1.0, "{m}");
    assert!(
        sample("imgsrv_data_filesystem_free_bytes") < (1 << 20) as f64,
        "{m}"
    );
    assert_eq!(sample("imgsrv_data_reserve_bytes"), (8 << 20) as f64);
    assert_eq!(
        sample("imgsrv_storage_state"),
        0.0,
        "reopened read-write: {m}"
    );
    // Small writes are refused too while the reserve is gone.
    assert_507(&s.call("POST", "/v1/images", &token, &json!({"name": "later"})));

    // 3. Space freed by an abort is reusable at once: abort a session holding a part, and a
    // part of the same size fits again although the filesystem is still full.
    std::fs::remove_file(&filler).unwrap();
    wait_ready(&s, 204, Duration::from_secs(5));
    let held = bytes(12 * MIB, 200);
    let held_id = begin(&s, &token, &held);
    assert_eq!(send_part(&s, &token, &held_id, &held).status, 200);
    let next = bytes(6 * MIB, 201);
    let next_id = begin(&s, &token, &next);
    fill(&filler);
    assert_507(&send_part(&s, &token, &next_id, &next));
    let a = s.abort_upload(&token, &held_id);
    assert_eq!(a.status, 200, "{}", a.text());
    let p = send_part(&s, &token, &next_id, &next);
    assert_eq!(
        p.status,
        200,
        "freed space not reusable: {}\n{}",
        p.text(),
        s.log_text()
    );
    let c = complete(&s, &token, &next_id, &p, next.len());
    assert_eq!(c.status, 200, "{}", c.text());
    acked.push(next);
    assert_blobs_intact(&s, &acked);

    // 4. A crash and a restart on the full disk: the server comes back and serves every
    // acknowledged byte.
    s.kill9();
    s.start_again();
    assert_blobs_intact(&s, &acked);
    assert_eq!(s.get("/v1/images").status, 200);
    // A clean stop and a start with no headroom left at all: still serving reads.
    s.terminate();
    let _ = std::fs::remove_file(s.data_dir().join("imgsrv.headroom"));
    let mut more = std::fs::OpenOptions::new()
        .append(true)
        .open(&filler)
        .unwrap();
    let _ = more.write_all(&vec![0u8; 64 * MIB]);
    drop(more);
    s.start_again();
    assert_blobs_intact(&s, &acked);
    wait_ready(&s, 503, Duration::from_secs(5));

    // 5. Space comes back: writes resume without a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_ready(&s, 204, Duration::from_secs(10));
    let last = bytes(3 * MIB, 300);
    s.upload(&token, &last);
    acked.push(last);
    assert_blobs_intact(&s, &acked);
    assert!(!s.log_text().contains("panicked"), "{}", s.log_text());
    s.terminate();
}

/// A real database with a published image and two more blobs, stopped cleanly.
fn reference_database() -> (tempfile::TempDir, Vec<Vec<u8>>) {
    let mut s = Server::start();
    let token = s.writer_token();
    let disk = bytes(3 * CHUNK_SIZE + 1000, 7);
    let meta = bytes(5000, 8);
    s.publish_image(&token, "damage", "1.0", &disk, &meta);
    let other = bytes(2 * CHUNK_SIZE, 9);
    s.upload(&token, &other);
    s.terminate();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(s.db_path(), dir.path().join("imgsrv.redb")).unwrap();
    (dir, vec![disk, meta, other])
}

enum Started {
    Serving(
        std::process::Child,
        String,
        std::sync::mpsc::Receiver<String>,
    ),
    Exited(i32, String),
}

/// Starts the binary on `dir` and returns once it listens or has exited.
fn start_on(dir: &Path) -> Started {
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .arg("--data-dir")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                log.push_str(&line);
                log.push('\n');
                if let Some(i) = line.find("listening on http://") {
                    let addr = line[i + 20..]
                        .split_whitespace()
                        .next()
                        .unwrap()
                        .to_string();
                    return Started::Serving(child, addr, rx);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let code = child.wait().unwrap().code().unwrap_or(-1);
                return Started::Exited(code, log);
            }
            Err(_) => {}
        }
        if let Some(st) = child.try_wait().unwrap() {
            while let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                log.push_str(&line);
                log.push('\n');
            }
            return Started::Exited(st.code().unwrap_or(-1), log);
        }
        assert!(
            Instant::now() < deadline,
            "neither serving nor exited:\n{log}"
        );
    }
}

fn get(addr: &str, path: &str) -> Resp {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw);
    if raw.is_empty() {
        return Resp {
            status: 0,
            headers: vec![],
            body: vec![],
        };
    }
    parse_response(&raw, false)
}

#[test]
fn damaged_database_never_panics_and_never_serves_wrong_bytes() {
    let (reference, blobs) = reference_database();
    let original = std::fs::read(reference.path().join("imgsrv.redb")).unwrap();
    // Where a chunk's bytes sit in the file: search for a stretch of the disk blob.
    let probe = &blobs[0][CHUNK_SIZE + 4096..CHUNK_SIZE + 4160];
    let chunk_at = original
        .windows(probe.len())
        .position(|w| w == probe)
        .expect("chunk bytes are stored verbatim");
    let mut places: Vec<(&str, usize)> = vec![
        ("magic number", 0),
        ("header", 96),
        ("first pages", 4096),
        ("first pages", 2 * 4096 + 100),
        ("a chunk's bytes", chunk_at),
    ];
    // Random live pages (a fixed seed, so a failure reproduces).
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in 0..12 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // Half of them in the first 256 KiB, where the tables' small pages sit.
        let span = if i % 2 == 0 {
            256 * 1024
        } else {
            original.len() as u64 - 64
        };
        places.push(("a random page", (x % span) as usize));
    }
    for (what, at) in places {
        let dir = tempfile::tempdir().unwrap();
        let mut damaged = original.clone();
        for b in &mut damaged[at..at + 32] {
            *b ^= 0xA5;
        }
        std::fs::write(dir.path().join("imgsrv.redb"), &damaged).unwrap();
        // Named before the start, so that a start that hangs says where the damage was.
        eprintln!("{what} at {at}: starting");
        match start_on(dir.path()) {
            Started::Exited(code, log) => {
                assert!(!log.contains("panicked"), "{what} at {at}: a panic\n{log}");
                assert_eq!(code, 3, "{what} at {at}: exit code\n{log}");
                let lines: Vec<&str> = log.lines().filter(|l| l.contains("damaged")).collect();
                assert_eq!(lines.len(), 1, "{what} at {at}: one clear line\n{log}");
                assert!(
                    lines[0].contains("imgsrv check") && lines[0].contains("backup"),
                    "{log}"
                );
                eprintln!("{what} at {at}: refused to start (exit 3)");
            }
            Started::Serving(mut child, addr, rx) => {
                let mut outcomes = Vec::new();
                for data in &blobs {
                    let r = get(&addr, &format!("/v1/blobs/{}", sha256_digest(data)));
                    if r.status == 200 {
                        assert!(
                            r.body.len() <= data.len() && r.body[..] == data[..r.body.len()],
                            "{what} at {at}: wrong bytes served"
                        );
                    }
                    outcomes.push((r.status, r.body.len()));
                }
                // The process and its other connections are healthy afterwards.
                assert_eq!(get(&addr, "/healthz").status, 204, "{what} at {at}");
                let listed = get(&addr, "/v1/images");
                assert!(
                    listed.status == 200 || listed.status == 500,
                    "{what} at {at}: {}",
                    listed.status
                );
                assert_eq!(get(&addr, "/healthz").status, 204, "{what} at {at}");
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "{what} at {at}: exited"
                );
                let _ = child.kill();
                let _ = child.wait();
                let log: Vec<String> = rx.try_iter().collect();
                let log = log.join("\n");
                assert!(!log.contains("panicked"), "{what} at {at}: a panic\n{log}");
                eprintln!("{what} at {at}: served {outcomes:?}");
            }
        }
    }
}
