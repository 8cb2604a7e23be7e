//! The only module that names tiny_http: the listener, the request worker threads, turning a
//! tiny_http request into an `http::Request` and writing `http::Response`s.
//!
//! Responses are written through `into_writer()` with our own status line and headers, so
//! every response carries `Content-Length` (tiny_http would switch to chunked encoding at
//! 32 KiB) and blob bodies go to the socket in chunk-sized `write_all` calls.

use crate::api::{self, App};
use crate::http::{Body, Request, Response, problem, reason};
use crate::log;
use std::io::{BufWriter, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

/// Binds the listener; returns the server and its bound address.
pub fn bind(listen: &str) -> Result<(tiny_http::Server, String), String> {
    let server =
        tiny_http::Server::http(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    let addr = match server.server_addr() {
        tiny_http::ListenAddr::IP(a) => a.to_string(),
        #[allow(unreachable_patterns)]
        other => format!("{other:?}"),
    };
    Ok((server, addr))
}

/// Serves requests on `threads` worker threads until the listener fails.
pub fn run(server: tiny_http::Server, app: Arc<App>, threads: usize) -> Result<(), String> {
    let server = Arc::new(server);
    let mut handles = Vec::new();
    for i in 0..threads.max(1) {
        let server = server.clone();
        let app = app.clone();
        let h = std::thread::Builder::new()
            .name(format!("http-{i}"))
            .spawn(move || {
                loop {
                    match server.recv() {
                        Ok(rq) => handle_one(&app, rq),
                        Err(e) => return format!("accepting requests failed: {e}"),
                    }
                }
            })
            .map_err(|e| format!("cannot start worker thread: {e}"))?;
        handles.push(h);
    }
    let mut first_err = None;
    for h in handles {
        let msg = h.join().unwrap_or_else(|_| "worker thread panicked".into());
        first_err.get_or_insert(msg);
    }
    Err(first_err.unwrap_or_default())
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
    let headers: Vec<(String, String)> = rq
        .headers()
        .iter()
        .map(|h| {
            (
                h.field.as_str().as_str().to_string(),
                h.value.as_str().to_string(),
            )
        })
        .collect();
    let id = request_id(
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("X-Request-ID"))
            .map(|(_, v)| v.as_str()),
    );
    let content_length = rq.body_length().map(|n| n as u64);
    let close = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("Connection") && v.to_ascii_lowercase().contains("close")
    });

    let response = {
        let mut req = Request {
            method: method.clone(),
            path: path.clone(),
            headers,
            content_length,
            body: rq.as_reader(),
            request_id: id.clone(),
        };
        match catch_unwind(AssertUnwindSafe(|| api::handle(app, &mut req))) {
            Ok(r) => r,
            Err(_) => {
                log::error(&format!("handler panicked request_id={id} path={path}"));
                problem(500, "internal error while handling the request")
            }
        }
    };
    let status = response.status;
    let head_only = method == "HEAD";
    let writer = rq.into_writer();
    let sent = write_response(writer, response, &id, head_only, close);
    log::event(
        "info",
        2,
        "request",
        &[
            ("request_id", id),
            ("method", method),
            ("path", path),
            ("status", status.to_string()),
            (
                "bytes",
                sent.as_ref()
                    .map(|n| n.to_string())
                    .unwrap_or_else(|e| format!("cut: {e}")),
            ),
            (
                "duration_ms",
                format!("{:.3}", started.elapsed().as_secs_f64() * 1000.0),
            ),
        ],
    );
}

/// Writes status line, headers and body. Returns the body bytes sent.
fn write_response(
    writer: Box<dyn Write + Send>,
    resp: Response,
    id: &str,
    head_only: bool,
    close: bool,
) -> std::io::Result<u64> {
    let mut w = BufWriter::with_capacity(16 * 1024, writer);
    write!(w, "HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status))?;
    write!(
        w,
        "Server: imgsrv\r\nDate: {}\r\nX-Request-ID: {id}\r\n",
        httpdate::fmt_http_date(std::time::SystemTime::now())
    )?;
    for (k, v) in &resp.headers {
        write!(w, "{k}: {v}\r\n")?;
    }
    let bodyless = matches!(resp.status, 204 | 304) || (100..200).contains(&resp.status);
    if !bodyless {
        let len = resp.content_length.unwrap_or(match &resp.body {
            Body::Bytes(b) => b.len() as u64,
            _ => 0,
        });
        write!(w, "Content-Length: {len}\r\n")?;
    }
    if close {
        w.write_all(b"Connection: close\r\n")?;
    }
    w.write_all(b"\r\n")?;
    if head_only || bodyless {
        w.flush()?;
        return Ok(0);
    }
    let sent = match resp.body {
        Body::Empty => 0,
        Body::Bytes(b) => {
            w.write_all(&b)?;
            b.len() as u64
        }
        Body::Blob { reader, start, end } => {
            // Flush the head, then let chunk-sized writes bypass the buffer.
            w.flush()?;
            let mut raw = w.into_inner().map_err(|e| e.into_error())?;
            reader.write_range(&mut raw, start, end)?;
            raw.flush()?;
            return Ok(end - start);
        }
    };
    w.flush()?;
    Ok(sent)
}
