//! The front door against hostile clients (the README's Architecture section; docs/api.md, decision 13): huge
//! declared bodies, huge heads, idle and slow clients, garbage on the TLS port, file-descriptor
//! exhaustion, early answers to large uploads and to clients that wait before sending a body
//! (with or without `Expect: 100-continue`), keep-alive, chunked bodies and the connection
//! limit. After every hostile client the process must still be alive, its memory bounded, and a
//! normal request must succeed.

use crate::util::*;
use serde_json::json;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The resident-set ceiling every hostile test holds the server to.
const RSS_LIMIT_KIB: u64 = 200 * 1024;

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn rss_kib(pid: u32) -> u64 {
    status_field(pid, "VmRSS").unwrap_or(0)
}

/// The process exists, is not a zombie (an unreaped crash), and its RSS is under the ceiling.
/// Returns the RSS in KiB.
fn assert_alive(s: &Server) -> u64 {
    let pid = s.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|_| panic!("imgsrv (pid {pid}) is gone; log:\n{}", s.log_text()));
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(
        !state.starts_with('Z') && !state.starts_with('X'),
        "imgsrv (pid {pid}) died ({state}); log:\n{}",
        s.log_text()
    );
    let rss = rss_kib(pid);
    assert!(rss < RSS_LIMIT_KIB, "RSS {rss} KiB is over the ceiling");
    rss
}

/// A normal request on a fresh connection succeeds.
fn assert_serving(s: &Server) {
    let r = s.get("/healthz");
    assert_eq!(r.status, 204, "{}", r.text());
    let r = s.get("/v1/images");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_alive(s);
}

/// Polls until a normal request succeeds (after the server has had to notice closed clients).
fn wait_serving(s: &Server, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = try_get(&s.addr, "/healthz")
            && r.status == 204
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not recover; log:\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_serving(s);
}

/// A GET on a fresh connection that reports failures instead of panicking.
fn try_get(addr: &str, path: &str) -> Option<Resp> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .ok()?;
    let (raw, _) = read_all(&mut c);
    raw.windows(4)
        .any(|w| w == b"\r\n\r\n")
        .then(|| parse_response(&raw, false))
}

/// Samples the server's RSS every 10 ms in the background; `peak()` stops and reports the peak.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let (st, pk) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                pk.fetch_max(rss_kib(pid), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        RssWatch {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let peak = self.peak.load(Ordering::SeqCst);
        assert!(peak < RSS_LIMIT_KIB, "RSS peaked at {peak} KiB");
        peak
    }
}

/// Reads until EOF or an error (a reset after the answer is expected from a server that closes
/// a connection with unread input). Returns the bytes and the error, if any.
fn read_all(s: &mut TcpStream) -> (Vec<u8>, Option<std::io::Error>) {
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => return (raw, None),
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return (raw, Some(e)),
        }
    }
}

/// Waits for the server to close `s` (EOF or reset). Returns what it sent and how long it took.
fn wait_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let (raw, err) = read_all(s);
    if let Some(e) = err {
        assert!(
            !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "the server did not close the connection within {within:?} (got {:?})",
            String::from_utf8_lossy(&raw)
        );
    }
    (raw, started.elapsed())
}

/// Reads exactly one response from a kept-alive connection; bytes after it stay in `buf`.
fn read_one(s: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> Resp {
    let mut chunk = [0u8; 16384];
    let end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk).expect("reading a response head");
        assert!(
            n > 0,
            "connection closed before a whole response head: {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = parse_response(&buf[..end], true);
    let len: usize = if head_only || matches!(head.status, 100..=199 | 204 | 304) {
        0
    } else {
        head.header("Content-Length")
            .expect("a kept-alive response has a Content-Length")
            .parse()
            .unwrap()
    };
    while buf.len() < end + len {
        let n = s.read(&mut chunk).expect("reading a response body");
        assert!(n > 0, "connection closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    Resp {
        status: head.status,
        headers: head.headers,
        body,
    }
}

fn connect(addr: &str) -> TcpStream {
    let c = TcpStream::connect(addr).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// A GET on a kept-alive connection.
fn get_on(c: &mut TcpStream, buf: &mut Vec<u8>, path: &str) -> Resp {
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    read_one(c, buf, false)
}

/// Raises this process's soft file-descriptor limit (servers started later inherit it).
fn raise_nofile(want: u64) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if lim.current.is_none_or(|c| c >= want) {
        return;
    }
    let target = lim.maximum.map_or(want, |m| m.min(want));
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: lim.maximum,
        },
    )
    .expect("raising RLIMIT_NOFILE");
}

/// An upload session for a 3-byte blob (so part PUTs have a real target).
fn session(s: &Server, token: &str) -> String {
    let r = s.begin_upload(token, b"abc");
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// Starts the server through a wrapper command (e.g. `prlimit --nofile=64:64 --`), which must
/// exec it so that the child's pid is the server's.
fn start_wrapped(wrapper: &[&str], extra: &[&str]) -> Server {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(wrapper[0]);
    cmd.args(&wrapper[1..])
        .arg(binary())
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", ""])
        .arg("--data-dir")
        .arg(dir.path())
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning imgsrv");
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(i) = line.find("listening on http://") {
                let rest = &line[i + "listening on http://".len()..];
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            let mut l = l.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let mut s = Server {
        dir,
        addr: String::new(),
        child: Some(child),
        log,
        extra: Vec::new(),
    };
    s.addr = rx
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| panic!("imgsrv did not start; log:\n{}", s.log_text()));
    s
}

#[test]
fn huge_declared_length_is_413_and_an_early_close_is_survived() {
    let s = Server::start();
    let w = s.writer_token();
    let id = session(&s, &w);
    let watch = RssWatch::start(s.pid());
    let head = |len: u64| {
        format!(
            "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\nContent-Length: {len}\r\n\r\nabc"
        )
    };

    // 1e11 declared, 3 bytes sent, then the client closes its side.
    let mut c = connect(&s.addr);
    c.write_all(head(100_000_000_000).as_bytes()).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (raw, _) = read_all(&mut c);
    let r = parse_response(&raw, false);
    r.assert_problem(413, "exceeds the limit");
    assert_eq!(r.header("Connection"), Some("close"));
    assert_alive(&s);

    // One byte over the limit (5 GiB + 1 MiB) is refused too, and the limit itself is not.
    let limit: u64 = 5 * 1024 * 1024 * 1024 + 1024 * 1024;
    let mut c = connect(&s.addr);
    c.write_all(head(limit + 1).as_bytes()).unwrap();
    let (raw, _) = read_all(&mut c);
    parse_response(&raw, false).assert_problem(413, "exceeds the limit");

    // Declared sizes the front door lets through (the largest allowed, and a 4 GiB part),
    // cut off after 3 bytes: tiny_http sees a body that ends early and must not take the
    // process down draining it.
    for len in [limit, 4 << 30] {
        let mut c = connect(&s.addr);
        c.write_all(head(len).as_bytes()).unwrap();
        drop(c);
        assert_serving(&s);
    }
    // The part was never stored: the session still has no parts and accepts a real one.
    let r = put_part(&s, &w, &id, "1", b"abc");
    assert_eq!(r.status, 200, "{}", r.text());
    let peak = watch.peak();
    assert_serving(&s);
    eprintln!("huge declared length: RSS peak {peak} KiB");
}

#[test]
fn huge_header_line_is_431_before_it_is_sent() {
    let s = Server::start();
    let watch = RssWatch::start(s.pid());
    let mut c = connect(&s.addr);
    let mut reader = c.try_clone().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let answered_at = Arc::new(AtomicU64::new(u64::MAX));
    let (wr, at) = (written.clone(), answered_at.clone());
    let reading = std::thread::spawn(move || {
        let mut first = [0u8; 1];
        let n = reader.read(&mut first).unwrap_or(0);
        at.store(wr.load(Ordering::SeqCst), Ordering::SeqCst);
        let (mut raw, _) = read_all(&mut reader);
        raw.splice(0..0, first[..n].iter().copied());
        raw
    });
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        .unwrap();
    let block = vec![b'a'; 64 * 1024];
    let total: u64 = 256 << 20;
    let mut error = None;
    while written.load(Ordering::SeqCst) < total {
        match c.write(&block) {
            Ok(n) => {
                written.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let raw = reading.join().unwrap();
    let r = parse_response(&raw, false);
    r.assert_problem(431, "request head exceeds 65536 bytes");
    let sent = written.load(Ordering::SeqCst);
    let at = answered_at.load(Ordering::SeqCst);
    assert!(
        error.is_some() && sent < 64 << 20,
        "the server kept reading: {sent} bytes written ({error:?})"
    );
    let peak = watch.peak();
    assert_serving(&s);
    eprintln!(
        "256 MiB header: answered 431 after {at} bytes, {sent} written before {error:?}; RSS peak {peak} KiB"
    );
}

#[test]
fn a_thousand_idle_connections_then_timeouts_close_them() {
    raise_nofile(8192);
    let s = Server::start();
    let base_threads = status_field(s.pid(), "Threads").unwrap();
    let (mut idle, _) = open_paced(&s.addr, 1000);
    // Wait until the server has accepted all of them (one thread each).
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_field(s.pid(), "Threads").unwrap() < base_threads + 1000 {
        assert!(Instant::now() < deadline, "connections not accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
    let threads = status_field(s.pid(), "Threads").unwrap();
    let rss = assert_alive(&s);
    assert_serving(&s);
    // The idle connections are still usable.
    for c in idle.iter_mut().step_by(333) {
        let r = get_on(c, &mut Vec::new(), "/healthz");
        assert_eq!(r.status, 204);
    }
    drop(idle);
    eprintln!("1000 idle connections: {threads} threads, RSS {rss} KiB");

    // With short timeouts the server closes idle clients by itself: connections that never
    // send a byte after the header timeout, kept-alive ones after the idle timeout.
    let s = Server::start_with(&["--idle-timeout", "1s", "--header-timeout", "1s"]);
    let (mut idle, opened) = open_paced(&s.addr, 1000);
    let mut kept = connect(&s.addr);
    let r = get_on(&mut kept, &mut Vec::new(), "/healthz");
    assert_eq!(r.status, 204);
    let answered = Instant::now();
    let mut slowest = Duration::ZERO;
    for (c, at) in idle.iter_mut().zip(&opened) {
        let (raw, _) = wait_closed(c, Duration::from_secs(10));
        assert!(raw.is_empty(), "{:?}", String::from_utf8_lossy(&raw));
        slowest = slowest.max(at.elapsed());
    }
    let (raw, _) = wait_closed(&mut kept, Duration::from_secs(10));
    assert!(raw.is_empty());
    let kept_closed = answered.elapsed();
    assert!(
        slowest < Duration::from_secs(4),
        "an idle connection was closed {slowest:?} after it was opened"
    );
    assert!(kept_closed < Duration::from_secs(4), "{kept_closed:?}");
    drop(idle);
    wait_serving(&s, Duration::from_secs(5));
    eprintln!(
        "timeouts: every idle connection closed within {slowest:?} of opening; the kept-alive one {kept_closed:?} after its response"
    );
}

/// Opens `n` connections in bursts of 100 (under the listen backlog of 128, so that none
/// waits for a SYN-ACK retransmission) and returns them with the times they were opened.
fn open_paced(addr: &str, n: usize) -> (Vec<TcpStream>, Vec<Instant>) {
    let mut conns = Vec::with_capacity(n);
    let mut opened = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 && i % 100 == 0 {
            std::thread::sleep(Duration::from_millis(30));
        }
        conns.push(connect(addr));
        opened.push(Instant::now());
    }
    (conns, opened)
}

#[test]
fn slowloris_clients_get_408_while_others_are_served() {
    let s = Server::start_with(&["--header-timeout", "2s"]);
    let done = Arc::new(AtomicBool::new(false));
    let addr = s.addr.clone();
    let d = done.clone();
    // 20 clients, each trickling one byte of a never-ending head every 200 ms.
    let slow = std::thread::spawn(move || {
        let text = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ".to_vec();
        let mut conns: Vec<(TcpStream, Vec<u8>, Option<Duration>)> = (0..20)
            .map(|_| (connect(&addr), Vec::new(), None))
            .collect();
        for (c, _, _) in &conns {
            c.set_nonblocking(true).unwrap();
        }
        let started = Instant::now();
        let mut i = 0;
        while conns.iter().any(|(_, _, t)| t.is_none())
            && started.elapsed() < Duration::from_secs(8)
        {
            let byte = [*text.get(i).unwrap_or(&b'a')];
            i += 1;
            for (c, got, closed) in &mut conns {
                if closed.is_some() {
                    continue;
                }
                let mut chunk = [0u8; 4096];
                loop {
                    match c.read(&mut chunk) {
                        Ok(0) => {
                            *closed = Some(started.elapsed());
                            break;
                        }
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            *closed = Some(started.elapsed());
                            break;
                        }
                    }
                }
                if closed.is_none() && c.write(&byte).is_err() {
                    *closed = Some(started.elapsed());
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        d.store(true, Ordering::SeqCst);
        conns
    });
    let mut served = 0;
    while !done.load(Ordering::SeqCst) {
        let r = s.get("/healthz");
        assert_eq!(r.status, 204);
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let conns = slow.join().unwrap();
    let mut times = Vec::new();
    for (_, got, closed) in &conns {
        let t = closed.expect("a slowloris client was never cut off");
        assert!(t < Duration::from_millis(3500), "cut off after {t:?}");
        if !got.is_empty() {
            let r = parse_response(got, false);
            r.assert_problem(408, "request head not received in time");
            assert_eq!(r.header("Connection"), Some("close"));
        }
        times.push(t);
    }
    let with_408 = conns.iter().filter(|(_, g, _)| !g.is_empty()).count();
    assert!(with_408 > 0, "no slowloris client saw a 408");
    assert!(
        served >= 10,
        "only {served} normal requests were served meanwhile"
    );
    assert_serving(&s);
    eprintln!(
        "slowloris: {with_408}/20 got 408, cut off after {:?}..{:?}; {served} normal requests served meanwhile",
        times.iter().min().unwrap(),
        times.iter().max().unwrap()
    );
}

fn cat(dir: &Path, out: &str, parts: &[&str]) {
    let mut all = Vec::new();
    for p in parts {
        all.extend(std::fs::read(dir.join(p)).unwrap());
    }
    std::fs::write(dir.join(out), all).unwrap();
}

/// `curl` over TLS 1.3 trusting only `ca`; returns (stdout, stderr) and asserts success.
fn curl(ca: &Path, urls: &[String]) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "-v", "--tlsv1.3", "--max-time", "10", "--cacert"])
        .arg(ca)
        .args(["-w", "%{http_code} %{http_version}\\n"])
        .args(urls)
        .output()
        .expect("running curl");
    let (o, e) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "curl failed: {o}\n{e}");
    (o, e)
}

#[test]
fn tls_port_survives_garbage_and_speaks_tls13() {
    if !require_tool("openssl") || !require_tool("curl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (s, cert) = Server::start_tls(d, &["--header-timeout", "2s"]);

    // Garbage, a plain-text request, and a client that sends nothing: each is closed without
    // an HTTP answer (at most a TLS alert), and the process lives on.
    let garbage = bytes(4096, 7);
    let plain = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    for (what, input) in [
        ("garbage", garbage),
        ("plain HTTP", plain),
        ("silence", vec![]),
    ] {
        let mut c = connect(&s.addr);
        c.write_all(&input).unwrap();
        let (raw, took) = wait_closed(&mut c, Duration::from_secs(5));
        assert!(
            !raw.starts_with(b"HTTP/"),
            "{what}: {:?}",
            String::from_utf8_lossy(&raw)
        );
        assert!(raw.len() < 64, "{what}: {} bytes back", raw.len());
        eprintln!(
            "TLS port, {what}: closed after {took:?} with {} bytes",
            raw.len()
        );
        assert_alive(&s);
    }

    // A real HTTPS client negotiates TLS 1.3 and reuses the connection for a second request.
    let base = format!("https://{}", s.addr);
    let (out, err) = curl(
        &cert,
        &[format!("{base}/healthz"), format!("{base}/v1/images")],
    );
    assert!(out.contains("204 1.1") && out.contains("200 1.1"), "{out}");
    assert!(err.contains("TLSv1.3"), "{err}");
    assert!(
        err.contains("Re-using existing connection") || err.contains("Reusing existing"),
        "{err}"
    );
    assert_alive(&s);
    drop(s);

    // A chain file: a leaf signed by a CA, leaf then CA in the certificate file. And a leaf
    // signed by an intermediate, where the client trusts only the root: the server must send
    // the intermediate.
    ec_req(
        d,
        "ca",
        "imgsrv test CA",
        &[
            "-x509",
            "-days",
            "2",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let leaf_ext = "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                    keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n";
    ec_req(d, "leaf", "127.0.0.1", &[]);
    sign(d, "leaf", "ca", leaf_ext);
    cat(d, "leaf-chain.pem", &["leaf.crt", "ca.pem"]);
    ec_req(d, "inter", "imgsrv test intermediate", &[]);
    sign(
        d,
        "inter",
        "ca",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    );
    std::fs::copy(d.join("inter.crt"), d.join("inter2.pem")).unwrap();
    std::fs::copy(d.join("inter.key"), d.join("inter2.key")).unwrap();
    ec_req(d, "leaf2", "127.0.0.1", &[]);
    sign(d, "leaf2", "inter2", leaf_ext);
    cat(d, "leaf2-chain.pem", &["leaf2.crt", "inter.crt"]);
    for (chain, key) in [
        ("leaf-chain.pem", "leaf.key"),
        ("leaf2-chain.pem", "leaf2.key"),
    ] {
        let s = Server::start_with(&[
            "--tls-cert",
            d.join(chain).to_str().unwrap(),
            "--tls-key",
            d.join(key).to_str().unwrap(),
        ]);
        let (out, err) = curl(&d.join("ca.pem"), &[format!("https://{}/healthz", s.addr)]);
        assert!(out.contains("204 1.1"), "{chain}: {out}");
        assert!(err.contains("TLSv1.3"), "{chain}: {err}");
        assert_alive(&s);
    }
}

/// Opens `n` connections, each sending a keep-alive request, and classifies the answers.
/// Returns (204 answers, 503 answers, closed without an answer) and the connections that were
/// served (still open, kept alive).
fn flood(addr: &str, n: usize) -> ((usize, usize, usize), Vec<TcpStream>) {
    let mut conns = Vec::new();
    for _ in 0..n {
        if let Ok(mut c) = TcpStream::connect(addr) {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
            conns.push(c);
        }
    }
    let (mut ok, mut busy, mut closed) = (0, 0, 0);
    let mut served = Vec::new();
    for mut c in conns {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let status = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break Some(parse_response(&buf[..p + 4], true).status);
            }
            match c.read(&mut chunk) {
                Ok(0) => break None,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                Err(e) => {
                    assert!(
                        !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                        "a flooding connection got neither an answer nor a close"
                    );
                    break None;
                }
            }
        };
        match status {
            Some(204) => {
                ok += 1;
                served.push(c);
            }
            Some(503) => busy += 1,
            None => closed += 1,
            Some(other) => panic!("unexpected status {other}"),
        }
    }
    ((ok, busy, closed), served)
}

#[test]
fn file_descriptor_exhaustion_is_survived() {
    if !require_tool("prlimit") {
        return;
    }
    // The limit lowered under a running server.
    let s = Server::start();
    let pid = s.pid().to_string();
    let st = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=64:64"])
        .status()
        .unwrap();
    assert!(st.success());
    for round in 0..2 {
        let ((ok, busy, closed), conns) = flood(&s.addr, 200);
        assert_alive(&s);
        assert!(ok > 0, "no connection was served under the limit");
        assert!(busy > 0, "none was refused");
        drop(conns);
        wait_serving(&s, Duration::from_secs(5));
        eprintln!(
            "fd limit lowered to 64, flood {round}: {ok} served, {busy} got 503, {closed} closed"
        );
    }

    // Truly out of descriptors: the limit lowered to the lowest free descriptor number while
    // served connections are held. accept() fails with EMFILE and is retried; once descriptors
    // come back the waiting client is taken. (No request is sent on a held connection meanwhile:
    // its backend connection could take the last descriptor and tiny_http's accept thread
    // panics when it cannot clone the accepted socket; see the report.)
    let (_, held) = flood(&s.addr, 200);
    let used: Vec<usize> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let lowest_free = (0..).find(|n| !used.contains(n)).unwrap();
    let st = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={lowest_free}:64")])
        .status()
        .unwrap();
    assert!(st.success());
    let mut waiting = connect(&s.addr);
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.log_text().contains("accept failed, retrying") {
        assert!(Instant::now() < deadline, "no accept error");
        std::thread::sleep(Duration::from_millis(20));
    }
    waiting
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(
        waiting.read(&mut [0u8; 1]).is_err(),
        "answered while out of descriptors"
    );
    drop(held);
    let (raw, _) = wait_closed(&mut waiting, Duration::from_secs(5));
    let status = parse_response(&raw, false).status;
    assert!(status == 204 || status == 503, "{status}");
    assert_alive(&s);
    let st = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=64:64"])
        .status()
        .unwrap();
    assert!(st.success());
    wait_serving(&s, Duration::from_secs(5));
    eprintln!(
        "out of descriptors (limit {lowest_free}): accept retried, the waiting client got {status} once they came back"
    );
    assert!(!s.log_text().contains("exiting for a restart"));

    // Started under the limit.
    let s = start_wrapped(&["prlimit", "--nofile=64:64", "--"], &[]);
    assert_serving(&s);
    for round in 0..2 {
        let ((ok, busy, closed), conns) = flood(&s.addr, 200);
        assert_alive(&s);
        assert!(ok > 0 && busy > 0, "{ok} served, {busy} refused");
        drop(conns);
        wait_serving(&s, Duration::from_secs(5));
        eprintln!(
            "started with 64 fds, flood {round}: {ok} served, {busy} got 503, {closed} closed"
        );
    }
    assert!(!s.log_text().contains("exiting for a restart"));
}

#[test]
fn early_401_to_a_2gib_part_stops_the_upload() {
    let s = Server::start();
    let w = s.writer_token();
    let id = session(&s, &w);
    let watch = RssWatch::start(s.pid());
    let head = format!(
        "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer imgsrv_at_wrong\r\nContent-Length: 2147483648\r\n\r\n"
    );
    let (r, at, total, took) = stream_until_answer(&s.addr, &head, 2 << 30);
    r.assert_problem(401, "invalid bearer token");
    assert_eq!(r.header("WWW-Authenticate"), Some("Bearer"));
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(at < 64 << 20, "the 401 came after {at} body bytes");
    assert!(total < 128 << 20, "the client could send {total} bytes");
    let peak = watch.peak();
    assert_serving(&s);
    eprintln!(
        "401 to a 2 GiB part: answered after {at} body bytes ({took:?}); {total} written in all; RSS peak {peak} KiB"
    );
}

/// Sends `head`, then zeros (up to `max` bytes) until the server answers or stops reading.
/// Returns the answer, the body bytes written when it arrived, in all, and how long it took.
fn stream_until_answer(addr: &str, head: &str, max: u64) -> (Resp, u64, u64, Duration) {
    let mut c = connect(addr);
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    let mut reader = c.try_clone().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let answered_at = Arc::new(AtomicU64::new(u64::MAX));
    let done = Arc::new(AtomicBool::new(false));
    let (wr, at, dn) = (written.clone(), answered_at.clone(), done.clone());
    let started = Instant::now();
    let reading = std::thread::spawn(move || {
        let mut first = [0u8; 1];
        let n = reader.read(&mut first).unwrap_or(0);
        at.store(wr.load(Ordering::SeqCst), Ordering::SeqCst);
        let took = started.elapsed();
        let (mut raw, _) = read_all(&mut reader);
        raw.splice(0..0, first[..n].iter().copied());
        dn.store(true, Ordering::SeqCst);
        (raw, took)
    });
    let block = vec![0u8; 256 * 1024];
    while written.load(Ordering::SeqCst) < max && !done.load(Ordering::SeqCst) {
        match c.write(&block) {
            Ok(n) => {
                written.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(_) => break,
        }
    }
    let (raw, took) = reading.join().unwrap();
    let at = answered_at.load(Ordering::SeqCst);
    (
        parse_response(&raw, false),
        at,
        written.load(Ordering::SeqCst),
        took,
    )
}

#[test]
fn keep_alive_pipelining_and_close() {
    let s = Server::start();
    let w = s.writer_token();
    let mut c = connect(&s.addr);
    let mut buf = Vec::new();
    // Two requests in one write, the first with a body, then a third on the same connection.
    let body = serde_json::to_vec(
        &json!({"expected_digest": sha256_digest(b"x"), "expected_size_bytes": 1}),
    )
    .unwrap();
    let mut two = format!(
        "POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    two.extend_from_slice(&body);
    two.extend_from_slice(b"GET /v1/images HTTP/1.1\r\nHost: x\r\n\r\n");
    c.write_all(&two).unwrap();
    let r1 = read_one(&mut c, &mut buf, false);
    assert_eq!(r1.status, 201, "{}", r1.text());
    let id = r1.json()["id"].as_str().unwrap().to_string();
    let r2 = read_one(&mut c, &mut buf, false);
    assert_eq!(r2.status, 200, "{}", r2.text());
    assert_eq!(r2.header("Connection"), None);
    let r3 = get_on(&mut c, &mut buf, &format!("/v1/uploads/{id}"));
    assert_eq!(r3.status, 200, "{}", r3.text());
    c.write_all(b"HEAD /v1/images HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let r4 = read_one(&mut c, &mut buf, true);
    assert_eq!(r4.status, 200);
    assert!(r4.body.is_empty());
    // `Connection: close`: the answer says so and the connection ends after it.
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_one(&mut c, &mut buf, false);
    assert_eq!(r.status, 204);
    assert_eq!(r.header("Connection"), Some("close"));
    let (rest, _) = wait_closed(&mut c, Duration::from_secs(5));
    assert!(rest.is_empty() && buf.is_empty());

    // HTTP/1.0 closes after the response, unless it asks for keep-alive (and is told so).
    let mut c = connect(&s.addr);
    c.write_all(b"GET /v1/images HTTP/1.0\r\n\r\n").unwrap();
    let (raw, took) = wait_closed(&mut c, Duration::from_secs(5));
    let r = parse_response(&raw, false);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(took < Duration::from_secs(2));
    let mut c = connect(&s.addr);
    let mut buf = Vec::new();
    for _ in 0..2 {
        c.write_all(b"GET /v1/images HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap();
        let r = read_one(&mut c, &mut buf, false);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("Connection"), Some("keep-alive"));
    }
    assert_alive(&s);
}

#[test]
fn chunked_request_bodies_are_refused() {
    let s = Server::start();
    let w = s.writer_token();
    let id = session(&s, &w);
    let send = |head: String| {
        let mut c = connect(&s.addr);
        c.write_all(head.as_bytes()).unwrap();
        c.write_all(b"3\r\nabc\r\n0\r\n\r\n").unwrap();
        let (raw, _) = wait_closed(&mut c, Duration::from_secs(5));
        parse_response(&raw, false)
    };
    let part = format!(
        "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let r = send(part);
    r.assert_problem(400, "content length is required");
    assert_eq!(r.header("Connection"), Some("close"));
    // Both framings at once is refused the same way (request smuggling).
    let both = format!(
        "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    send(both).assert_problem(400, "content length is required");
    let image = format!(
        "POST /v1/images HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    let r = send(image);
    r.assert_problem(411, "Content-Length is required");
    assert_eq!(r.header("Connection"), Some("close"));
    // Nothing was stored.
    assert_eq!(
        s.get(&format!("/v1/uploads/{id}")).json()["state"],
        "created"
    );
    // A list of equal lengths is that length (RFC 9112 6.3); unequal ones are refused.
    let listed = |cl: &str| {
        let mut c = connect(&s.addr);
        c.write_all(
            format!(
                "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\nContent-Length: {cl}\r\nConnection: close\r\n\r\nabc"
            )
            .as_bytes(),
        )
        .unwrap();
        let (raw, _) = wait_closed(&mut c, Duration::from_secs(5));
        parse_response(&raw, false)
    };
    let r = listed("3, 3");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["size_bytes"], 3);
    listed("3, 4").assert_problem(400, "invalid Content-Length");
    assert_serving(&s);
}

#[test]
fn over_the_connection_limit_is_503() {
    let s = Server::start_with(&["--max-connections", "5"]);
    let mut held: Vec<(TcpStream, Vec<u8>)> = Vec::new();
    for _ in 0..5 {
        let mut c = connect(&s.addr);
        let mut buf = Vec::new();
        assert_eq!(get_on(&mut c, &mut buf, "/healthz").status, 204);
        held.push((c, buf));
    }
    // The sixth: a request, answered 503 without being read, and closed.
    let mut c = connect(&s.addr);
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (raw, _) = wait_closed(&mut c, Duration::from_secs(5));
    let r = parse_response(&raw, false);
    r.assert_problem(503, "connection limit");
    assert_eq!(r.header("Connection"), Some("close"));
    // The held ones still work.
    for (c, buf) in &mut held {
        assert_eq!(get_on(c, buf, "/healthz").status, 204);
    }
    drop(held);
    wait_serving(&s, Duration::from_secs(5));
}

/// tiny_http drains an unread body through one buffer of the declared size, so a 401 to a
/// declared 5 GiB part, or a client that stops sending one, used to abort the process wherever
/// that much memory cannot be allocated. An address-space limit below 5 GiB stands in for a
/// small host.

#[test]
fn declared_bodies_are_never_drained_into_one_allocation() {
    if !require_tool("prlimit") {
        return;
    }
    let s = start_wrapped(&["prlimit", "--as=4294967296", "--"], &[]);
    let w = s.writer_token();
    let id = session(&s, &w);
    let limit: u64 = 5 * 1024 * 1024 * 1024 + 1024 * 1024;
    let put = |token: &str, len: u64| {
        format!(
            "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {len}\r\n\r\nabc"
        )
    };
    // Answered before the body is read.
    for len in [limit, 4500 << 20] {
        let (r, _, _, _) = stream_until_answer(&s.addr, &put("imgsrv_at_wrong", len), len);
        r.assert_problem(401, "invalid bearer token");
        assert_serving(&s);
    }
    // Read by the handler, then cut off by the client.
    for len in [limit, 4500 << 20] {
        let mut c = connect(&s.addr);
        c.write_all(put(&w, len).as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        drop(c);
        assert_serving(&s);
    }
    let r = put_part(&s, &w, &id, "1", b"abc");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        !s.log_text().contains("memory allocation"),
        "{}",
        s.log_text()
    );
}

/// Sends a request head (no body) and reads one answer, timing it. The client then just waits,
/// as a client holding back a large body until it knows the answer would.
fn answer_to_head(addr: &str, head: &str) -> (TcpStream, Vec<u8>, Resp, Duration) {
    let mut c = connect(addr);
    let started = Instant::now();
    c.write_all(head.as_bytes()).unwrap();
    let mut buf = Vec::new();
    let r = read_one(&mut c, &mut buf, false);
    (c, buf, r, started.elapsed())
}

/// An answer decided before the body is read reaches a client that sent only the head at
/// once, with or without `Expect: 100-continue`; a client that expects `100 Continue` gets it
/// only when the request will be accepted.
#[test]
fn decided_answers_reach_a_waiting_client_at_once() {
    // A long I/O timeout: an answer that waited for the client's next bytes, or for the
    // timeout, would take far longer than the second allowed.
    let s = Server::start_with(&["--io-timeout", "30s"]);
    let w = s.writer_token();
    let id = session(&s, &w);
    let unknown = uuid::Uuid::new_v4();
    let gib: u64 = 1 << 30;
    let part = |upload: &str, auth: &str, len: u64, expect: bool| {
        format!(
            "PUT /v1/uploads/{upload}/parts/1 HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {len}\r\n{}\r\n",
            if expect {
                "Expect: 100-continue\r\n"
            } else {
                ""
            }
        )
    };
    let bearer = format!("Authorization: Bearer {w}\r\n");
    let cases: [(String, u64, u16, &str); 4] = [
        // One byte over the largest part, but under the front door's own limit: the API's 400.
        (id.clone(), 5 * gib + 1, 400, "part size must be at most"),
        (id.clone(), 4 * gib, 401, "missing bearer token"),
        (unknown.to_string(), 4 * gib, 404, ""),
        // Over the front door's limit: its own 413.
        (id.clone(), 6 * gib, 413, "exceeds the limit"),
    ];
    for expect in [false, true] {
        for (upload, len, status, detail) in &cases {
            let auth = if *status == 401 { "" } else { bearer.as_str() };
            let (mut c, buf, r, took) = answer_to_head(&s.addr, &part(upload, auth, *len, expect));
            assert_ne!(r.status, 100, "a refused request was told to continue");
            r.assert_problem(*status, detail);
            assert_eq!(r.header("Connection"), Some("close"));
            assert!(
                took < Duration::from_secs(1),
                "{status} (expect {expect}) took {took:?}"
            );
            // The body was never sent, so the connection cannot be reused: it is closed.
            let (rest, _) = wait_closed(&mut c, Duration::from_secs(5));
            assert!(rest.is_empty() && buf.is_empty(), "{rest:?}");
        }
    }
    // Accepted: `100 Continue` at once, then the final answer once the body is sent, and the
    // connection stays usable.
    let (mut c, mut buf, r, took) = answer_to_head(&s.addr, &part(&id, &bearer, 3, true));
    assert_eq!(r.status, 100, "{:?}", r.headers);
    assert!(r.headers.is_empty(), "{:?}", r.headers);
    assert!(took < Duration::from_secs(1), "100 Continue took {took:?}");
    c.write_all(b"abc").unwrap();
    let r = read_one(&mut c, &mut buf, false);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["size_bytes"], 3);
    assert_eq!(r.header("Connection"), None);
    assert_eq!(get_on(&mut c, &mut buf, "/healthz").status, 204);
    // A client that does not wait for `100 Continue` is served as well (an interim answer may
    // come first: it is allowed at any time before the final one).
    let mut c = connect(&s.addr);
    let mut head = part(&id, &bearer, 3, true).into_bytes();
    head.extend_from_slice(b"abc");
    c.write_all(&head).unwrap();
    let mut buf = Vec::new();
    let mut r = read_one(&mut c, &mut buf, true);
    if r.status == 100 {
        r = read_one(&mut c, &mut buf, false);
    } else {
        let len: usize = r.header("Content-Length").unwrap().parse().unwrap();
        while buf.len() < len {
            let mut chunk = [0u8; 4096];
            let n = c.read(&mut chunk).unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        r.body = buf[..len].to_vec();
    }
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["size_bytes"], 3);
    // HTTP/1.0 has no interim answers: the expectation is ignored.
    let mut c = connect(&s.addr);
    c.write_all(
        format!(
            "PUT /v1/uploads/{id}/parts/1 HTTP/1.0\r\n{bearer}Content-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
        )
        .as_bytes(),
    )
    .unwrap();
    let (raw, _) = wait_closed(&mut c, Duration::from_secs(5));
    let r = parse_response(&raw, false);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_serving(&s);
}

/// `curl -T` of a file over 1 MiB with `Expect: 100-continue`, waiting up to 10 s for the
/// interim answer. Returns the status, the body bytes curl sent and the time it took.
fn curl_expect_put(url: &str, ca: Option<&Path>, token: &str, file: &Path) -> (u16, u64, f64) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "/dev/null", "--max-time", "30"])
        .args(["--expect100-timeout", "10", "-H", "Expect: 100-continue"])
        .args(["-w", "%{http_code} %{size_upload} %{time_total}"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg("-T")
        .arg(file);
    if let Some(ca) = ca {
        cmd.arg("--cacert").arg(ca);
    }
    let out = cmd.arg(url).output().expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut f = text.split_whitespace();
    let parsed = (|| {
        Some((
            f.next()?.parse().ok()?,
            f.next()?.parse().ok()?,
            f.next()?.parse().ok()?,
        ))
    })();
    parsed.unwrap_or_else(|| panic!("curl: {text} {}", String::from_utf8_lossy(&out.stderr)))
}

/// A real client that waits for `100 Continue`, over plain TCP and over TLS: a refused upload
/// is answered at once and its body is never sent; an accepted one is sent after the interim
/// answer.
#[test]
fn curl_waiting_for_100_continue_is_answered_at_once() {
    if !require_tool("curl") || !require_tool("openssl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let data = bytes(3 << 20, 11);
    let file = d.join("part");
    std::fs::write(&file, &data).unwrap();

    let s = Server::start();
    let w = s.writer_token();
    let r = s.begin_upload(&w, &data);
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let url = |addr: &str, scheme: &str, upload: &str| {
        format!("{scheme}://{addr}/v1/uploads/{upload}/parts/1")
    };
    let unknown = uuid::Uuid::new_v4().to_string();
    for (token, upload, status) in [("imgsrv_at_wrong", &id, 401), (w.as_str(), &unknown, 404)] {
        let (got, sent, took) = curl_expect_put(&url(&s.addr, "http", upload), None, token, &file);
        assert_eq!((got, sent), (status, 0), "plain {status}");
        assert!(took < 2.0, "plain {status} took {took} s");
    }
    let (got, sent, took) = curl_expect_put(&url(&s.addr, "http", &id), None, &w, &file);
    assert_eq!((got, sent), (200, data.len() as u64));
    assert!(
        took < 5.0,
        "the accepted upload took {took} s (no 100 Continue?)"
    );
    drop(s);

    let (s, cert) = Server::start_tls(d, &[]);
    let (got, sent, took) = curl_expect_put(
        &url(&s.addr, "https", &id),
        Some(&cert),
        "imgsrv_at_wrong",
        &file,
    );
    assert_eq!((got, sent), (401, 0), "TLS 401");
    assert!(took < 2.0, "TLS 401 took {took} s");
    assert_alive(&s);
}

/// The private hop's internal headers (`X-Imgsrv-...`: the directive by which the request
/// server hands a body to the front door, the withheld-body marker) never reach a client,
/// whatever the answer: downloads whole, ranged, HEAD, 304, 416 and 404, part uploads accepted
/// (with and without `Expect: 100-continue`) and refused, over plain TCP and TLS. Internal
/// headers a client sends are dropped before the request server sees them, so they change
/// nothing.
#[test]
fn internal_hop_headers_never_reach_a_client() {
    if !require_tool("openssl") || !require_tool("curl") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    ec_req(
        d,
        "self",
        "imgsrv-test",
        &[
            "-x509",
            "-days",
            "2",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
    );
    let cert = d.join("self.pem");
    let data = bytes(2 * CHUNK_SIZE + 10, 61);
    // Set up over plain HTTP, then serve the same data over plain TCP and over TLS.
    let mut s = Server::start();
    let w = s.writer_token();
    let digest = s.upload(&w, &data);
    let id = session(&s, &w);
    for tls in [false, true] {
        if tls {
            s.extra = [
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                d.join("self.key").to_str().unwrap(),
            ]
            .map(String::from)
            .to_vec();
            s.start_again();
        }
        let base = format!("{}://{}", if tls { "https" } else { "http" }, s.addr);
        let blob = format!("{base}/v1/blobs/{digest}");
        let part = format!("{base}/v1/uploads/{id}/parts/1");
        let bearer = format!("Authorization: Bearer {w}");
        let inm = format!("If-None-Match: \"{digest}\"");
        let missing = format!("{base}/v1/blobs/sha256:{}", "0".repeat(64));
        let put = ["-X", "PUT", "--data-binary", "abc"];
        let cases: Vec<(Vec<&str>, u16, usize)> = vec![
            (vec![&blob], 200, data.len()),
            (vec!["-r", "5-20", &blob], 206, 16),
            (
                vec!["-r", "0-", "-H", "X-Imgsrv-Hop: blob 1 x 0 1", &blob],
                206,
                data.len(),
            ),
            (vec!["-I", &blob], 200, 0),
            (vec!["-H", &inm, &blob], 304, 0),
            (vec!["-r", "99999999-", &blob], 416, 0),
            (vec![&missing], 404, 0),
            ([&put[..], &["-H", &bearer, &part]].concat(), 200, 0),
            (
                [
                    &put[..],
                    &[
                        "-H",
                        &bearer,
                        "-H",
                        "Expect: 100-continue",
                        "-H",
                        "X-Imgsrv-Withheld: 0",
                        "-H",
                        "X-Imgsrv-Hop: receive 1 3",
                        &part,
                    ],
                ]
                .concat(),
                200,
                0,
            ),
            (
                [
                    &put[..],
                    &["-H", "Authorization: Bearer imgsrv_at_wrong", &part],
                ]
                .concat(),
                401,
                0,
            ),
        ];
        for (i, (args, status, len)) in cases.iter().enumerate() {
            let (head, body) = (d.join(format!("head.{i}")), d.join(format!("body.{i}")));
            let mut cmd = Command::new("curl");
            cmd.args(["-sS", "--max-time", "20", "-D"])
                .arg(&head)
                .arg("-o")
                .arg(&body)
                .args(["-w", "%{http_code}"]);
            if tls {
                cmd.arg("--cacert").arg(&cert);
            }
            let out = cmd.args(args).output().expect("running curl");
            let got = String::from_utf8_lossy(&out.stdout).into_owned();
            let what = format!("case {i} (tls {tls}): {args:?}");
            assert_eq!(
                got,
                status.to_string(),
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let head = std::fs::read_to_string(&head).unwrap();
            let body = std::fs::read(&body).unwrap_or_default();
            assert!(head.contains("X-Request-ID"), "{what}: {head}");
            for line in head.lines() {
                assert!(
                    !line.to_ascii_lowercase().starts_with("x-imgsrv"),
                    "{what}: an internal header reached the client: {line}"
                );
            }
            if *len > 0 {
                assert_eq!(body.len(), *len, "{what}");
            }
            if *status == 200 && args.contains(&"PUT") {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(v["size_bytes"], 3, "{what}: {v}");
            }
            if body.len() < 4096 {
                let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
                assert!(!text.contains("x-imgsrv"), "{what}: {text}");
            }
        }
        assert_alive(&s);
    }
}

/// A part body the front door reads into the store that stalls past the I/O timeout, or ends
/// early, is answered 400 and the connection closed; nothing of it is kept, and the server
/// keeps serving.
#[test]
fn a_stalled_or_short_part_body_is_refused_and_nothing_kept() {
    let s = Server::start_with(&["--io-timeout", "1s"]);
    let w = s.writer_token();
    let id = session(&s, &w);
    let head = format!(
        "PUT /v1/uploads/{id}/parts/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {w}\r\nContent-Length: 100\r\n\r\nab"
    );
    // Stalled: two bytes of a hundred, then silence.
    let mut c = connect(&s.addr);
    let started = Instant::now();
    c.write_all(head.as_bytes()).unwrap();
    let (raw, _) = wait_closed(&mut c, Duration::from_secs(10));
    let took = started.elapsed();
    let r = parse_response(&raw, false);
    r.assert_problem(400, "client stalled mid-body");
    assert_eq!(r.header("Connection"), Some("close"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "answered after {took:?}"
    );
    // Short: the client closes its sending side after two bytes.
    let mut c = connect(&s.addr);
    c.write_all(head.as_bytes()).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let (raw, _) = wait_closed(&mut c, Duration::from_secs(10));
    parse_response(&raw, false).assert_problem(400, "client closed mid-body");
    // Neither left a part behind.
    let r = s.call(
        "POST",
        &format!("/v1/uploads/{id}/complete"),
        &w,
        &json!({"parts": [{"number": 1, "etag": "\"x\"", "size_bytes": 3}]}),
    );
    r.assert_problem(412, "upload part 1 has not been uploaded");
    assert_eq!(put_part(&s, &w, &id, "1", b"abc").status, 200);
    assert_serving(&s);
}
