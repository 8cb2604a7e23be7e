//! One client connection: read a bounded head, check it, relay the request to tiny_http on a
//! fresh backend connection (`Connection: close`, so tiny_http ends it after the response),
//! relay the response back, and keep the client connection alive when both sides allow it.
//! When the answer carries a `hop` directive, the body is moved here instead: a blob range
//! streamed from the store, or a withheld part body read from the client into the API's
//! receiver.

use super::FrontDoor;
use super::head::{self, HeadError, RequestHead};
use crate::hop::{self, Directive};
use crate::http::problem;
use crate::log;
use rustls::{ServerConnection, StreamOwned};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
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

/// A minimal complete response written by the front door itself (problem+json), in the same
/// wire format as the request server's answers.
pub fn simple_response(status: u16, detail: &str, keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let id = uuid::Uuid::new_v4().to_string();
    let _ = hop::write_response(
        &mut out,
        problem(status, detail),
        &id,
        false,
        !keep_alive,
        None,
    );
    out
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
            let path = head.target.split('?').next().unwrap_or("");
            return if (door.withholds_body)(&head.method, path) {
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
    let mut backend = match UnixStream::connect(&door.socket) {
        Ok(b) => b,
        Err(e) => {
            reject(client, 503, "server is busy or shutting down");
            return Err(e);
        }
    };
    // A body the API stores as it is (a part) is withheld: the request server decides on the
    // head alone and asks for the body with a `receive` directive, and the front door moves it
    // into the store itself instead of through the private socket and tiny_http.
    let path = head.target.split('?').next().unwrap_or("");
    let withheld = length > 0 && (door.withholds_body)(&head.method, path);
    // `100 Continue` must promise only what the handler will accept. For a withheld body the
    // front door sends it once the request server asked for the body; otherwise the expectation
    // is passed on: tiny_http sends its interim answer when the handler first reads the body,
    // and a handler that refuses the request without reading sends the final status instead.
    // An HTTP/1.0 expectation is ignored (RFC 9110 10.1.1), as is one on a request without a
    // body.
    let expect =
        length > 0 && head.version == "HTTP/1.1" && head.has_token("Expect", "100-continue");
    backend.write_all(&hop::request_head(head, length, expect, withheld))?;

    let mut rbuf = Vec::with_capacity(4096);
    let (remaining, answered) = if withheld {
        (length, None)
    } else {
        send_body(door, client, &mut backend, length, buf, expect, &mut rbuf)?
    };
    // The backend answered before the whole body arrived (e.g. 401 to a large upload): the
    // rest of the body is not read and the client connection is closed after the response.
    // (A withheld body is read later if the answer asks for it.)
    if remaining == 0 || withheld {
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
    let resp = hop::parse_response_head(&rbuf[..rhead_len - 4]);
    let http10 = head.version == "HTTP/1.0";
    match resp.directive {
        Some(Directive::Receive { token, length: n }) if withheld && n == length => {
            drop(backend);
            return receive(door, client, head, token, length, buf, expect);
        }
        Some(Directive::Blob {
            token,
            digest,
            start,
            end,
        }) if remaining == 0 => {
            drop(backend);
            let reuse = head.keep_alive();
            return send_blob(
                door,
                client,
                &resp,
                token,
                &digest,
                start..end,
                reuse,
                http10,
            );
        }
        Some(d) => {
            hop::claim(d.token());
            reject(
                client,
                500,
                "internal error: unexpected directive on the private hop",
            );
            return Ok(false);
        }
        None if resp.bad_directive => {
            reject(
                client,
                500,
                "internal error: unreadable directive on the private hop",
            );
            return Ok(false);
        }
        None => {}
    }
    let early = remaining > 0;
    let bodyless = head.method == "HEAD" || matches!(resp.status, 204 | 304) || resp.status < 200;
    // A client that asked to close is told so in the answer (RFC 9112 9.6). Without a length
    // the body ends when the backend closes, so the client connection cannot be reused.
    let reuse = !early && head.keep_alive() && (bodyless || resp.content_length.is_some());
    client.write_all(&resp.for_client(!reuse, http10))?;
    if !bodyless && !relay_body(client, &backend, &rbuf[rhead_len..], resp.content_length)? {
        return Ok(false);
    }
    client.flush()?;
    if early {
        // Give the client a moment to read the answer before the close resets the connection,
        // discarding what it still sends.
        drain_briefly(client, remaining);
    }
    Ok(reuse)
}

/// Relays a response body the request server wrote itself: `already` (read with the head),
/// then the rest from the backend, `length` bytes in all or, without one, until it closes.
/// Returns false when the backend ended the body early: the client must then see a short body
/// and a closed connection, never a reused one.
fn relay_body<C: Client>(
    client: &mut C,
    backend: &UnixStream,
    already: &[u8],
    length: Option<u64>,
) -> io::Result<bool> {
    let mut left = length.unwrap_or(u64::MAX);
    if !already.is_empty() {
        let n = (already.len() as u64).min(left) as usize;
        client.write_all(&already[..n])?;
        left -= n as u64;
    }
    client.flush()?;
    if left > 0
        && length.is_some()
        && let Some(sock) = client.splice_target()
    {
        match splice_body(backend, sock, left)? {
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
    let mut backend = backend;
    while left > 0 {
        let want = left.min(RELAY_BUF as u64) as usize;
        let n = match backend.read(&mut block[..want]) {
            Ok(0) if length.is_none() => break,
            Ok(0) => return Ok(false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        client.write_all(&block[..n])?;
        left -= n as u64;
    }
    Ok(true)
}

/// Streams a blob range straight from the store after the request server's head (minus the
/// directive), then finishes the request's log line and metrics with the bytes really sent.
#[allow(clippy::too_many_arguments)]
fn send_blob<C: Client>(
    door: &FrontDoor,
    client: &mut C,
    resp: &hop::ResponseHead,
    token: u64,
    digest: &[u8; 32],
    range: std::ops::Range<u64>,
    reuse: bool,
    http10: bool,
) -> io::Result<bool> {
    let Some(handoff) = hop::claim(token) else {
        reject(
            client,
            500,
            "internal error: lost handoff on the private hop",
        );
        return Ok(false);
    };
    let exchange = handoff.exchange;
    // Open the blob before anything is sent, so that one collected since the request server
    // looked is still a clean 404 rather than a short body.
    let opened = door.blobs.upgrade().map(|s| s.open(digest));
    let Some(Ok(Some(body))) = opened else {
        let r = client.write_all(&simple_response(404, "blob not found", false));
        exchange.finish(404, 0, r.map(|_| 0).map_err(|e| (0, e.to_string())));
        return Ok(false);
    };
    let mut out = Counting {
        inner: client,
        n: 0,
    };
    let sent = out
        .inner
        .write_all(&resp.for_client(!reuse, http10))
        .and_then(|_| body.write_range(&mut out, range.start, range.end))
        .and_then(|_| out.flush());
    let n = out.n;
    match sent {
        Ok(()) => {
            exchange.finish(resp.status, 0, Ok(n));
            Ok(reuse)
        }
        Err(e) => {
            // A chunk failed verification (already logged and counted) or the client went
            // away: the client must see a short body and a closed connection.
            log::event("debug", 3, &format!("blob body cut short: {e}"), &[]);
            exchange.finish(resp.status, 0, Err((n, e.to_string())));
            Ok(false)
        }
    }
}

/// Counts the bytes written through it.
struct Counting<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.n += n as u64;
        Ok(n)
    }
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        // The inner `write_all` (one call per TLS record batch or socket write) rather than the
        // default loop of `write` calls; on failure the bytes it took are not known, so none of
        // that slice counts.
        self.inner.write_all(b)?;
        self.n += b.len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a withheld part body from the client into the API's receiver (which writes it into
/// the store chunk by chunk), then sends the receiver's answer and finishes the request's log
/// line and metrics with the bytes received.
fn receive<C: Client>(
    door: &FrontDoor,
    client: &mut C,
    head: &RequestHead,
    token: u64,
    length: u64,
    buf: &mut Vec<u8>,
    expect: bool,
) -> io::Result<bool> {
    let Some(hop::Handoff {
        exchange,
        receiver: Some(receiver),
    }) = hop::claim(token)
    else {
        reject(
            client,
            500,
            "internal error: lost handoff on the private hop",
        );
        return Ok(false);
    };
    // The API accepted the head: now the client may send the body.
    if expect {
        client.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        client.flush()?;
    }
    client
        .tcp()
        .set_read_timeout(Some(door.limits.io_timeout))?;
    let mut body = ClientBody {
        client: &mut *client,
        buf,
        left: length,
    };
    let response = catch_unwind(AssertUnwindSafe(|| receiver(&mut body))).unwrap_or_else(|_| {
        log::error(&format!(
            "part receiver panicked request_id={}",
            exchange.request_id
        ));
        problem(500, "internal error while storing the part")
    });
    let rest = body.left;
    let received = length - rest;
    // A body not read to its end (a refusal mid-body, a client that stopped) leaves the
    // connection unusable. An HTTP/1.0 client is not offered keep-alive here.
    let close = rest > 0 || !head.keep_alive() || head.version == "HTTP/1.0";
    let status = response.status;
    let mut out = Vec::with_capacity(1024);
    let n = hop::write_response(&mut out, response, &exchange.request_id, false, close, None)?;
    let sent = client.write_all(&out).and_then(|_| client.flush());
    exchange.finish(
        status,
        received,
        sent.as_ref().map(|_| n).map_err(|e| (0, e.to_string())),
    );
    sent?;
    if rest > 0 {
        drain_briefly(client, rest);
    }
    Ok(!close)
}

/// The client's request body as a reader: first what was read with the head, then the socket,
/// up to the declared length. A stall longer than the I/O timeout and an early end are errors.
struct ClientBody<'a, C: Client> {
    client: &'a mut C,
    buf: &'a mut Vec<u8>,
    left: u64,
}

impl<C: Client> Read for ClientBody<'_, C> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let want = (out.len() as u64).min(self.left) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = if !self.buf.is_empty() {
            let n = want.min(self.buf.len());
            out[..n].copy_from_slice(&self.buf[..n]);
            self.buf.drain(..n);
            n
        } else {
            match self.client.read(&mut out[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed mid-body",
                    ));
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "client stalled mid-body",
                    ));
                }
                Err(e) => return Err(e),
            }
        };
        self.left -= n as u64;
        Ok(n)
    }
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
