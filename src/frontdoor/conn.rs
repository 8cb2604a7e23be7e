//! One client connection: read a bounded head, check it, relay the request to tiny_http on a
//! fresh backend connection (`Connection: close`, so tiny_http ends it after the response),
//! relay the response back, and keep the client connection alive when both sides allow it.

use super::FrontDoor;
use super::head::{self, HeadError, RequestHead};
use crate::log;
use rustls::{ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A client stream: plain TCP or TLS over TCP, with access to the socket for timeouts.
trait Client: Read + Write {
    fn tcp(&self) -> &TcpStream;
    /// The socket to `splice` response bodies into, when bytes go to it unchanged (plain TCP).
    fn splice_target(&self) -> Option<&TcpStream> {
        None
    }
    /// Whether a read would return data without touching the socket. Polling the socket alone
    /// would miss plaintext that TLS has already decrypted and buffered.
    fn buffered(&mut self) -> bool {
        false
    }
}

impl Client for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    fn splice_target(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Client for StreamOwned<ServerConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
    fn buffered(&mut self) -> bool {
        // A TLS error is reported by the next read, so it counts as something to read.
        self.conn
            .process_new_packets()
            .map_or(true, |s| s.plaintext_bytes_to_read() > 0)
    }
}

/// Relay buffer size: large enough that blob bodies move in few system calls.
const RELAY_BUF: usize = 256 * 1024;

pub fn serve(door: &FrontDoor, sock: TcpStream) {
    let _ = sock.set_nodelay(true);
    let _ = sock.set_write_timeout(Some(door.limits.io_timeout));
    match &door.tls {
        None => serve_stream(door, sock),
        Some(cfg) => match ServerConnection::new(cfg.clone()) {
            Ok(conn) => serve_stream(door, StreamOwned::new(conn, sock)),
            Err(e) => log::event("debug", 3, &format!("TLS session setup failed: {e}"), &[]),
        },
    }
}

/// A minimal complete response written by the front door itself (problem+json).
pub fn simple_response(status: u16, detail: &str, keep_alive: bool) -> Vec<u8> {
    let body = format!(
        "{{\"type\":\"about:blank\",\"title\":\"{}\",\"status\":{status},\"detail\":{}}}\n",
        crate::http::reason(status),
        serde_json::Value::from(detail)
    );
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nServer: imgsrv\r\nDate: {}\r\nX-Request-ID: {}\r\nContent-Type: application/problem+json\r\nContent-Length: {}\r\n",
        crate::http::reason(status),
        httpdate::fmt_http_date(std::time::SystemTime::now()),
        uuid::Uuid::new_v4(),
        body.len()
    );
    if !keep_alive {
        out.push_str("Connection: close\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    out.into_bytes()
}

fn reject<C: Client>(client: &mut C, status: u16, detail: &str) {
    let _ = client.write_all(&simple_response(status, detail, false));
    let _ = client.flush();
    log::event(
        "info",
        2,
        "request rejected at the front door",
        &[
            ("status", status.to_string()),
            ("detail", detail.to_string()),
        ],
    );
}

/// Hop-by-hop headers the front door owns; they are not forwarded.
fn hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "expect",
        "transfer-encoding",
    ]
    .iter()
    .any(|h| name.eq_ignore_ascii_case(h))
}

fn is_part_upload(head: &RequestHead) -> bool {
    head.method == "PUT"
        && head.target.starts_with("/v1/uploads/")
        && head.target.contains("/parts/")
}

fn serve_stream<C: Client>(door: &FrontDoor, mut client: C) {
    let limits = &door.limits;
    // Grown on demand: an idle connection then holds no heap buffer (with mimalloc an eager
    // 8 KiB buffer cost about 60 KiB of resident memory per connection thread).
    let mut buf: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        if !first && door.stop.load(Ordering::SeqCst) {
            return;
        }
        // The first request (and the TLS handshake) must arrive within the header timeout;
        // later ones may wait the idle timeout before starting.
        let wait = if first {
            limits.header_timeout
        } else {
            limits.idle_timeout
        };
        let first_byte_deadline = Instant::now() + wait;
        let head_len = {
            let tcp = client.tcp().try_clone();
            let Ok(tcp) = tcp else { return };
            let mut set = |d: Duration| tcp.set_read_timeout(Some(d.max(Duration::from_millis(1))));
            match head::read_head(
                &mut client,
                &mut buf,
                limits.max_header_bytes,
                first_byte_deadline,
                limits.header_timeout,
                &mut set,
                &|| door.stop.load(Ordering::SeqCst),
            ) {
                Ok(n) => n,
                Err(HeadError::Idle) | Err(HeadError::Io(_)) => return,
                Err(HeadError::Timeout) => {
                    return reject(&mut client, 408, "request head not received in time");
                }
                Err(HeadError::TooLarge) => {
                    return reject(
                        &mut client,
                        431,
                        &format!("request head exceeds {} bytes", limits.max_header_bytes),
                    );
                }
                Err(HeadError::Malformed(why)) => return reject(&mut client, 400, why),
            }
        };
        first = false;
        let head = match head::parse(&buf[..head_len - 4]) {
            Ok(h) => h,
            Err(HeadError::Malformed(why)) => return reject(&mut client, 400, why),
            Err(_) => return reject(&mut client, 400, "malformed request head"),
        };
        buf.drain(..head_len);

        if head.header("Transfer-Encoding").is_some() {
            // Chunked request bodies are not supported; the connection cannot be reused because
            // the body's end is unknown.
            return if is_part_upload(&head) {
                reject(&mut client, 400, "content length is required")
            } else {
                reject(
                    &mut client,
                    411,
                    "a Content-Length is required for request bodies",
                )
            };
        }
        let length = match head.content_length() {
            Ok(n) => n.unwrap_or(0),
            Err(head::BadLength) => return reject(&mut client, 400, "invalid Content-Length"),
        };
        if length > limits.max_body_bytes {
            return reject(
                &mut client,
                413,
                &format!(
                    "request body of {length} bytes exceeds the limit of {} bytes",
                    limits.max_body_bytes
                ),
            );
        }
        let keep_alive = head.keep_alive();
        match relay(door, &mut client, &head, length, &mut buf) {
            Ok(true) if keep_alive => continue,
            Ok(_) => return,
            Err(e) => {
                log::event("debug", 3, &format!("connection ended: {e}"), &[]);
                return;
            }
        }
    }
}

/// Relays one request and its response. Returns whether the client connection may be reused.
fn relay<C: Client>(
    door: &FrontDoor,
    client: &mut C,
    head: &RequestHead,
    length: u64,
    buf: &mut Vec<u8>,
) -> io::Result<bool> {
    let mut backend = match UnixStream::connect(&door.backend.path) {
        Ok(b) => b,
        Err(e) => {
            reject(client, 503, "server is busy or shutting down");
            return Err(e);
        }
    };
    // `100 Continue` must promise only what the handler will accept, so the expectation is
    // passed on: tiny_http sends its interim answer when the handler first reads the body, and a
    // handler that refuses the request without reading sends the final status instead. An
    // HTTP/1.0 expectation is ignored (RFC 9110 10.1.1), as is one on a request without a body.
    let expect =
        length > 0 && head.version == "HTTP/1.1" && head.has_token("Expect", "100-continue");
    let mut out = Vec::with_capacity(1024);
    write!(out, "{} {} {}\r\n", head.method, head.target, head.version)?;
    for (k, v) in &head.headers {
        // The length goes once, normalised: tiny_http cannot parse a list such as `3, 3`.
        // tiny_http drops the whole connection without an answer on a header value that is not
        // ASCII; no header the API reads can carry such a value meaningfully, so the line is
        // left out (an `X-Request-ID` like that is replaced by a fresh one, as API.md says).
        if !hop_by_hop(k) && !k.eq_ignore_ascii_case("Content-Length") && v.is_ascii() {
            write!(out, "{k}: {v}\r\n")?;
        }
    }
    if head.header("Content-Length").is_some() {
        write!(out, "Content-Length: {length}\r\n")?;
    }
    if expect {
        out.extend_from_slice(b"Expect: 100-continue\r\n");
    }
    // `upgrade` makes tiny_http hand the handler the plain socket instead of a reader bounded
    // by Content-Length, whose drop drains the unread rest of a body into one allocation of
    // that size: a 401 to a 5 GiB part would abort the process wherever 5 GiB cannot be
    // allocated. The body is bounded here instead: the backend reads EOF right after it.
    out.extend_from_slice(b"Connection: close, upgrade\r\n\r\n");
    backend.write_all(&out)?;

    let mut rbuf = Vec::with_capacity(4096);
    let (remaining, answered) =
        send_body(door, client, &mut backend, length, buf, expect, &mut rbuf)?;
    // The backend answered before the whole body arrived (e.g. 401 to a large upload): the
    // rest of the body is not read and the client connection is closed after the response.
    let early = remaining > 0;
    if !early {
        let _ = backend.shutdown(std::net::Shutdown::Write);
    }
    let rhead_len = match answered {
        Some(n) => n,
        None => loop {
            // Interim answers after the whole body was sent tell the client nothing.
            let n = backend_head(&mut backend, &mut rbuf)?;
            if status_of(&rbuf[..n]) >= 200 {
                break n;
            }
            rbuf.drain(..n);
        },
    };
    let text = String::from_utf8_lossy(&rbuf[..rhead_len - 4]).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(502);
    let mut resp_len: Option<u64> = None;
    // A client that asked to close is told so in the answer (RFC 9112 9.6).
    let reuse = !early && head.keep_alive();
    let mut blob: Option<([u8; 32], u64, u64)> = None;
    let mut rhead = Vec::with_capacity(rhead_len + 32);
    rhead.extend_from_slice(status_line.as_bytes());
    rhead.extend_from_slice(b"\r\n");
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("Connection") {
            continue;
        }
        if k.eq_ignore_ascii_case("Content-Length") {
            resp_len = v.trim().parse().ok();
        }
        if k.eq_ignore_ascii_case(super::BLOB_BODY_HEADER) {
            blob = parse_blob_directive(v);
            continue;
        }
        rhead.extend_from_slice(l.as_bytes());
        rhead.extend_from_slice(b"\r\n");
    }
    let bodyless = head.method == "HEAD" || matches!(status, 204 | 304) || status < 200;
    // Without a length the body ends when the backend closes, so the client connection cannot
    // be reused.
    let reuse = reuse && (bodyless || resp_len.is_some());
    if !reuse {
        rhead.extend_from_slice(b"Connection: close\r\n");
    } else if head.version == "HTTP/1.0" {
        // An HTTP/1.0 client keeps the connection only when the answer says so.
        rhead.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    rhead.extend_from_slice(b"\r\n");
    if let (Some((digest, start, end)), false) = (blob, bodyless) {
        // Open the blob before anything is sent, so that one collected since the request
        // server looked is still a clean 404 rather than a short body.
        let opened = door.store.upgrade().map(|s| s.open_blob(&digest));
        let Some(Ok(Some((_, reader)))) = opened else {
            client.write_all(&simple_response(404, "blob not found", false))?;
            return Ok(false);
        };
        client.write_all(&rhead)?;
        if let Err(e) = reader.write_range(client, start, end) {
            // A chunk failed verification (already logged and counted) or the client went
            // away: the client must see a short body and a closed connection.
            log::event("debug", 3, &format!("blob body cut short: {e}"), &[]);
            return Ok(false);
        }
        client.flush()?;
        return Ok(reuse);
    }
    client.write_all(&rhead)?;

    if !bodyless {
        let mut left = resp_len.unwrap_or(u64::MAX);
        let extra = rbuf.len() - rhead_len;
        if extra > 0 {
            let n = (extra as u64).min(left) as usize;
            client.write_all(&rbuf[rhead_len..rhead_len + n])?;
            left -= n as u64;
        }
        client.flush()?;
        if left > 0
            && resp_len.is_some()
            && let Some(sock) = client.splice_target()
        {
            match splice_body(&backend, sock, left)? {
                Spliced::All => left = 0,
                Spliced::CutShort => return Ok(false),
                Spliced::Unsupported(done) => left -= done,
            }
        }
        let mut block = if left > 0 {
            vec![0u8; RELAY_BUF]
        } else {
            Vec::new()
        };
        while left > 0 {
            let want = left.min(RELAY_BUF as u64) as usize;
            let n = match backend.read(&mut block[..want]) {
                Ok(0) if resp_len.is_none() => break,
                // The backend ended the body early (a chunk failed verification): the client
                // must see a short body and a closed connection, never a reused one.
                Ok(0) => return Ok(false),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            client.write_all(&block[..n])?;
            left -= n as u64;
        }
    }
    client.flush()?;
    if early {
        // Give the client a moment to read the answer before the close resets the connection,
        // discarding what it still sends.
        drain_briefly(client, remaining);
    }
    Ok(reuse)
}

/// Parses `<sha256 hex> <start> <end>`.
fn parse_blob_directive(v: &str) -> Option<([u8; 32], u64, u64)> {
    let mut parts = v.split_whitespace();
    let digest = crate::validate::digest_bytes(&format!("sha256:{}", parts.next()?))?;
    let start = parts.next()?.parse().ok()?;
    let end = parts.next()?.parse().ok()?;
    (start <= end).then_some((digest, start, end))
}

enum Spliced {
    All,
    /// The backend ended before the declared length (a chunk failed verification).
    CutShort,
    /// The kernel refused to splice; this many bytes went through before. Copy the rest.
    Unsupported(u64),
}

/// Moves `len` response-body bytes from the backend socket to the client socket through a
/// pipe with `splice`, so blob bodies are relayed without being copied through user space.
fn splice_body(backend: &UnixStream, client: &TcpStream, len: u64) -> io::Result<Spliced> {
    use rustix::pipe::{SpliceFlags, pipe, splice};
    let (pr, pw) = pipe()?;
    // A 1 MiB pipe moves a whole chunk per call; the default 64 KiB works too, only slower.
    let _ = rustix::pipe::fcntl_setpipe_size(&pw, 1024 * 1024);
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(1024 * 1024) as usize;
        let n = match splice(
            backend,
            None,
            &pw,
            None,
            want,
            SpliceFlags::MOVE | SpliceFlags::MORE,
        ) {
            Ok(0) => return Ok(Spliced::CutShort),
            Ok(n) => n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::INVAL) if done == 0 => return Ok(Spliced::Unsupported(0)),
            Err(e) => return Err(e.into()),
        };
        let mut in_pipe = n;
        while in_pipe > 0 {
            let more = if done + (n as u64) < len {
                SpliceFlags::MORE
            } else {
                SpliceFlags::empty()
            };
            match splice(&pr, None, client, None, in_pipe, SpliceFlags::MOVE | more) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "client closed")),
                Ok(m) => in_pipe -= m,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client stopped reading",
                    ));
                }
                Err(e) => return Err(e.into()),
            }
        }
        done += n as u64;
    }
    Ok(Spliced::All)
}

/// Sends the request body to the backend while watching the backend for an answer, so that an
/// answer decided before the body was read (401, 404, 507, ...) reaches the client at once,
/// whatever the client does next. A `100 Continue` from the backend is passed on. Returns the
/// body bytes not sent (more than zero when the backend answered first) and, when the final
/// response head arrived meanwhile, its length at the start of `rbuf`.
fn send_body<C: Client>(
    door: &FrontDoor,
    client: &mut C,
    backend: &mut UnixStream,
    length: u64,
    buf: &mut Vec<u8>,
    expect: bool,
    rbuf: &mut Vec<u8>,
) -> io::Result<(u64, Option<usize>)> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let io_timeout = door.limits.io_timeout;
    let mut remaining = length;
    // What is already buffered goes first.
    let take = (buf.len() as u64).min(remaining) as usize;
    if take > 0 {
        // tiny_http closes its end once it has answered without reading the body.
        let failed = backend.write_all(&buf[..take]).is_err();
        buf.drain(..take);
        if failed {
            return Ok((remaining, None));
        }
        remaining -= take as u64;
    }
    if remaining == 0 {
        return Ok((0, None));
    }
    client.tcp().set_read_timeout(Some(io_timeout))?;
    // A client waiting for `100 Continue` is not stalling: its silence is not timed until it
    // has been told to go on (or has started anyway).
    let mut waiting = expect;
    let mut continued = false;
    let mut stall_deadline = Instant::now() + io_timeout;
    let mut block = Vec::new();
    while remaining > 0 {
        let buffered = client.buffered();
        let (client_ready, backend_ready) = if !rbuf.is_empty() {
            (false, true)
        } else {
            let wait = if buffered {
                Some(Duration::ZERO)
            } else if waiting {
                None
            } else {
                Some(stall_deadline.saturating_duration_since(Instant::now()))
            };
            let wait = wait.map(|d| Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as _,
            });
            let mut fds = [
                PollFd::new(client.tcp(), PollFlags::IN),
                PollFd::new(&*backend, PollFlags::IN),
            ];
            match poll(&mut fds, wait.as_ref()) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
            (
                buffered || !fds[0].revents().is_empty(),
                !fds[1].revents().is_empty(),
            )
        };
        if backend_ready {
            let n = backend_head(backend, rbuf)?;
            if status_of(&rbuf[..n]) >= 200 {
                return Ok((remaining, Some(n)));
            }
            // An interim answer: the handler has started reading the body.
            if expect && !continued {
                client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
                client.flush()?;
                continued = true;
            }
            rbuf.drain(..n);
            waiting = false;
            stall_deadline = Instant::now() + io_timeout;
            continue;
        }
        if !client_ready {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stalled mid-body",
            ));
        }
        if block.is_empty() {
            block = vec![0u8; RELAY_BUF];
        }
        let want = remaining.min(RELAY_BUF as u64) as usize;
        let n = match client.read(&mut block[..want]) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed mid-body",
                ));
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if backend.write_all(&block[..n]).is_err() {
            // The backend stopped reading: it has answered or failed; read its answer.
            return Ok((remaining, None));
        }
        remaining -= n as u64;
        waiting = false;
        stall_deadline = Instant::now() + io_timeout;
    }
    Ok((0, None))
}

/// Reads one response head from the backend into `rbuf`. Returns its length (with the blank
/// line); bytes after it stay in `rbuf`. The backend is trusted to answer: no deadline.
fn backend_head(backend: &mut UnixStream, rbuf: &mut Vec<u8>) -> io::Result<usize> {
    let far = Instant::now() + Duration::from_secs(24 * 3600);
    head::read_head(
        backend,
        rbuf,
        256 * 1024,
        far,
        Duration::from_secs(24 * 3600),
        &mut |_| Ok(()),
        &|| false,
    )
    .map_err(|e| io::Error::other(format!("backend response: {e:?}")))
}

/// The status code of a response head (502 when unreadable).
fn status_of(head: &[u8]) -> u16 {
    let line = head.split(|&b| b == b'\r').next().unwrap_or(head);
    line.split(|&b| b == b' ')
        .nth(1)
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(502)
}

fn drain_briefly<C: Client>(client: &mut C, remaining: u64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut left = remaining.min(16 * 1024 * 1024);
    let mut block = [0u8; 16384];
    while left > 0 && Instant::now() < deadline {
        let _ = client
            .tcp()
            .set_read_timeout(Some(Duration::from_millis(200)));
        match client.read(&mut block) {
            Ok(0) | Err(_) => break,
            Ok(n) => left = left.saturating_sub(n as u64),
        }
    }
}
