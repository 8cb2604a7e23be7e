//! The only module that names tiny_http: its private Unix-socket listener (the front door in
//! `frontdoor/` owns the network), the request worker threads, turning a tiny_http request into
//! an `http::Request` and writing `http::Response`s in the hop's format (`hop`).
//!
//! Responses are written through `into_writer()` with our own status line and headers, so
//! every response carries `Content-Length` (tiny_http would switch to chunked encoding at
//! 32 KiB). Blob bodies and part bodies never pass here: the answer carries a `hop` directive
//! instead and the front door moves the bytes between the client and the store. The exception
//! to `into_writer()` is an answer to a request whose relayed body was not read (e.g. a 401 to
//! a large JSON body): tiny_http's `respond()` writes the answer *before* it drains the unread
//! body, so the front door sees the answer early and stops sending the body, whereas
//! `into_writer()` would drain first.

use crate::api::{self, App};
use crate::hop;
use crate::http::{Body, Request, Response, problem};
use crate::log;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// The running request server; dropping it does not stop the worker threads.
pub struct RequestServer {
    server: Arc<tiny_http::Server>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl RequestServer {
    /// Wakes every worker blocked waiting for a request and waits for them to return (each
    /// finishes the request it is handling first). Call after setting the stop flag.
    pub fn stop(self) {
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers {
            let _ = w.join();
        }
    }
}

/// Binds tiny_http to a private Unix socket at `path` (replacing a stale one) and starts
/// `threads` request workers. If tiny_http's accept loop ever fails, the process exits with
/// status 70 so that systemd restarts it: tiny_http never accepts again after one failure.
pub fn start(
    path: &Path,
    app: Arc<App>,
    threads: usize,
    stopping: Arc<AtomicBool>,
) -> Result<RequestServer, String> {
    if path.exists() {
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove stale socket {}: {e}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", path.display()))?;
    let server = Arc::new(
        tiny_http::Server::from_listener(listener, None)
            .map_err(|e| format!("cannot start the request server: {e}"))?,
    );
    let mut workers = Vec::new();
    for i in 0..threads.max(1) {
        let server = server.clone();
        let app = app.clone();
        let stopping = stopping.clone();
        let h = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                loop {
                    match server.recv() {
                        Ok(rq) => handle_one(&app, rq),
                        Err(_) if stopping.load(Ordering::SeqCst) => return,
                        Err(e) => {
                            log::error(&format!(
                                "the request server stopped accepting: {e}; exiting for a restart"
                            ));
                            std::process::exit(70);
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
        workers.push(h);
    }
    Ok(RequestServer { server, workers })
}

/// The request body, opened on the handler's first read, counting the bytes read (to know
/// whether the handler left some unread). Opening it lazily matters: tiny_http answers
/// `Expect: 100-continue` from `as_reader()`, so a handler that refuses a request without
/// reading its body sends the final status instead of a `100 Continue` it does not mean.
struct LazyBody<'a> {
    rq: &'a mut tiny_http::Request,
    read: u64,
}

impl Read for LazyBody<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.rq.as_reader().read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// `X-Request-ID`: the inbound value if, trimmed, it is 1..128 visible ASCII characters.
fn request_id(inbound: Option<&str>) -> String {
    match inbound.map(str::trim) {
        Some(v)
            if (1..=128).contains(&v.len()) && v.bytes().all(|c| (0x21..=0x7e).contains(&c)) =>
        {
            v.to_string()
        }
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

fn handle_one(app: &App, mut rq: tiny_http::Request) {
    let started = Instant::now();
    let method = rq.method().as_str().to_ascii_uppercase();
    let url = rq.url().to_string();
    let path = url.split('?').next().unwrap_or("").to_string();
    let mut withheld: Option<u64> = None;
    let mut headers: Vec<(String, String)> = Vec::with_capacity(rq.headers().len());
    for h in rq.headers() {
        let (k, v) = (h.field.as_str().as_str(), h.value.as_str());
        // Only the front door can have set this: it drops every internal header a client sends.
        if k.eq_ignore_ascii_case(hop::WITHHELD_HEADER) {
            withheld = v.trim().parse().ok();
            continue;
        }
        headers.push((k.to_string(), v.to_string()));
    }
    let id = request_id(
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("X-Request-ID"))
            .map(|(_, v)| v.as_str()),
    );
    // What tiny_http will deliver, and what the API is told was declared.
    let relayed_length = rq.body_length().map(|n| n as u64);
    let content_length = withheld.or(relayed_length);
    let close = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("Connection") && v.to_ascii_lowercase().contains("close")
    });
    let mut exchange = hop::Exchange::new(
        id.clone(),
        method.clone(),
        api::route_template(&path),
        path.clone(),
        started,
    );

    let (response, body_read) = {
        let mut counting = LazyBody {
            rq: &mut rq,
            read: 0,
        };
        let mut empty = std::io::empty();
        let mut req = Request {
            method: method.clone(),
            path: path.clone(),
            headers,
            content_length,
            body: if withheld.is_some() {
                &mut empty
            } else {
                &mut counting
            },
            request_id: id.clone(),
            body_withheld: withheld.is_some(),
        };
        let response = match catch_unwind(AssertUnwindSafe(|| api::handle(app, &mut req))) {
            Ok(r) => r,
            Err(_) => {
                log::error(&format!("handler panicked request_id={id} path={path}"));
                problem(500, "internal error while handling the request")
            }
        };
        (response, counting.read)
    };
    let status = response.status;
    let head_only = method == "HEAD";
    let unread_body = relayed_length.unwrap_or(0) > body_read;
    // A body the front door moves itself is announced by a directive, and the exchange is
    // parked for the front door to finish once it knows the bytes really moved.
    let mut response = response;
    let handoff = match std::mem::replace(&mut response.body, Body::Empty) {
        Body::Receive(receiver) => {
            // The final status and headers are the receiver's; this head only carries the
            // directive.
            response = Response::new(200);
            Some((Some(receiver), None))
        }
        Body::Blob { digest, start, end } if !head_only => Some((None, Some((digest, start, end)))),
        body => {
            response.body = body;
            None
        }
    };
    if let Some((receiver, blob)) = handoff {
        // Should the front door never finish it, the exchange is logged with this status.
        exchange.status = status;
        let token = hop::park(hop::Handoff { exchange, receiver });
        let directive = match blob {
            Some((digest, start, end)) => hop::Directive::Blob {
                token,
                digest,
                start,
                end,
            },
            None => hop::Directive::Receive {
                token,
                length: content_length.unwrap_or(0),
            },
        };
        let written = write_head_only(rq.into_writer(), response, &id, close, &directive);
        if let Err(e) = written
            && let Some(h) = hop::claim(token)
        {
            h.exchange
                .finish(status, body_read, Err((0, e.to_string())));
        }
        return;
    }
    let sent = if unread_body {
        respond_before_drain(rq, response, &id)
    } else {
        write_response(rq.into_writer(), response, &id, head_only, close)
    };
    let sent = sent.map_err(|e| (0, e.to_string()));
    exchange.finish(status, body_read, sent);
}

/// Answers through tiny_http's `respond()`, which writes the response before draining the
/// unread request body.
fn respond_before_drain(rq: tiny_http::Request, resp: Response, id: &str) -> std::io::Result<u64> {
    let data = match resp.body {
        Body::Bytes(b) => b,
        _ => Vec::new(),
    };
    let len = data.len() as u64;
    let mut out = tiny_http::Response::from_data(data)
        .with_status_code(resp.status)
        .with_chunked_threshold(usize::MAX);
    let extra = [
        ("Server", "imgsrv"),
        ("X-Request-ID", id),
        ("Connection", "close"),
    ];
    for (k, v) in resp
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra)
    {
        if let Ok(h) = tiny_http::Header::from_bytes(k.as_bytes(), v.as_bytes()) {
            out.add_header(h);
        }
    }
    rq.respond(out)?;
    Ok(len)
}

/// Writes a whole response (see `hop::write_response`). Returns the body bytes sent.
fn write_response(
    writer: Box<dyn Write + Send>,
    resp: Response,
    id: &str,
    head_only: bool,
    close: bool,
) -> std::io::Result<u64> {
    let mut w = BufWriter::with_capacity(16 * 1024, writer);
    let sent = hop::write_response(&mut w, resp, id, head_only, close, None)?;
    w.flush()?;
    Ok(sent)
}

/// Writes the head of an answer whose body the front door moves, with its directive.
fn write_head_only(
    mut writer: Box<dyn Write + Send>,
    resp: Response,
    id: &str,
    close: bool,
    directive: &hop::Directive,
) -> std::io::Result<()> {
    hop::write_response(&mut writer, resp, id, true, close, Some(directive))?;
    writer.flush()
}
