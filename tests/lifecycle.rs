//! The process lifecycle under systemd's protocols, tested on the real binary: readiness and
//! stopping notifications on NOTIFY_SOCKET, socket activation with LISTEN_FDS, and a graceful
//! SIGTERM that lets an in-flight download finish and exits 0 after closing the database.

use crate::util::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child if a test fails before it exits by itself.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child's stderr, line by line, read on a thread so the pipe never fills.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

fn sigterm(pid: u32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits for the child to exit; returns its exit code.
fn wait_exit(child: &mut std::process::Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit in {within:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn notify_ready_then_graceful_sigterm_finishes_inflight_download() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let child = Command::new(binary())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "",
            "--shutdown-timeout",
            "20s",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let rx = stderr_lines(&mut child.0);
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no READY=1 notification: {e}; log: {:?}",
            rx.try_iter().collect::<Vec<_>>()
        )
    });
    assert_eq!(&buf[..n], b"READY=1");
    let mut log = Vec::new();
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        log.push(line.clone());
        if let Some(i) = line.find("listening on http://") {
            break line[i + 20..].trim().to_string();
        }
    };

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o700,
        "a data directory imgsrv creates is private"
    );
    // A 24 MiB blob, read slowly so the download is still running when SIGTERM arrives.
    let mut s = Server {
        dir: tempfile::tempdir().unwrap(),
        addr: addr.clone(),
        child: None,
        log: Default::default(),
        extra: vec![],
    };
    let token = {
        let admin = std::fs::read_to_string(dir.path().join("data/bootstrap-token")).unwrap();
        let fake = tempfile::tempdir().unwrap();
        std::fs::write(fake.path().join("bootstrap-token"), admin).unwrap();
        s.dir = fake;
        s.writer_token()
    };
    let data = bytes(24 * 1024 * 1024, 77);
    let digest = s.upload(&token, &data);
    let mut conn = TcpStream::connect(&addr).unwrap();
    write!(conn, "GET /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = vec![0u8; 64 * 1024];
    let got = conn.read(&mut first).unwrap();
    assert!(got > 0);
    sigterm(child.0.id());
    let n = notify.recv(&mut buf).expect("STOPPING=1 notification");
    assert_eq!(&buf[..n], b"STOPPING=1");
    // New connections are refused once the accept loop has stopped.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(&addr).is_ok() {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The in-flight download still completes, byte-identical.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    let mut raw = first[..got].to_vec();
    raw.extend_from_slice(&rest);
    let resp = parse_response(&raw, false);
    assert_eq!(resp.status, 200);
    assert!(
        resp.body == data,
        "download cut by the shutdown ({} of {} bytes)",
        resp.body.len(),
        data.len()
    );
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(20)), 0);
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(2)) {
        log.push(line);
    }
    let log = log.join("\n");
    assert!(log.contains("stopped cleanly"), "{log}");
    s.child = None;

    // The database reopens without repair and still holds the blob.
    let s2 = Server::start();
    drop(s2);
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    if !require_tool("systemd-socket-activate") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Find a free port, then let systemd-socket-activate bind it and pass it as fd 3.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}")])
        .arg(binary())
        .args(["serve", "--listen", "127.0.0.1:1", "--metrics-listen", ""])
        .arg("--data-dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let rx = stderr_lines(&mut child.0);
    // The socket exists before imgsrv starts: the first request starts it (activation).
    let r = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
                c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                break read_response(&mut c, false);
            }
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(r.status, 204);
    let mut log = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(500)) {
        log.push(line);
    }
    let log = log.join("\n");
    // --listen 127.0.0.1:1 was not used: the passed socket was.
    assert!(log.contains("using the socket passed by systemd"), "{log}");
    assert!(
        log.contains(&format!("listening on http://127.0.0.1:{port}")),
        "{log}"
    );
    sigterm(child.0.id());
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(20)), 0);
}
