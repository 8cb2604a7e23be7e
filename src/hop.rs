//! The private hop between the front door (`frontdoor/`, which owns every client socket) and the
//! request server (`server.rs`, tiny_http on a private Unix socket): what is forwarded, what
//! comes back and what never crosses it. Both sides use this module and nothing else to talk to
//! each other, so the wire format of the hop has one owner.
//!
//! Request heads are forwarded normalised by [`request_head`]: hop-by-hop headers and every
//! header in the internal `X-Imgsrv-` namespace a client may have sent are dropped, so only the
//! front door can set an internal header. A response head is written by [`write_response`] (the
//! request server uses it for every answer, the front door for the answers it renders from a
//! part upload) and read back by the pure [`parse_response_head`].
//!
//! Bodies that are only moved between the client and the store do not cross the hop. This is
//! nginx's `X-Accel-Redirect` pattern: the request server decides the answer (authentication,
//! validation, status and headers) and, instead of a body, returns an internal response header,
//! [`DIRECTIVE_HEADER`], carrying one typed [`Directive`]; the front door removes it and moves
//! the bytes itself. `blob` streams a blob range from the store to the client (through the
//! [`BlobSource`] trait the store implements). `receive` asks for a part body the front door
//! withheld (announced by the request header [`WITHHELD_HEADER`]): the front door reads it from
//! the client and feeds it to the API's own receiver, which writes it into the store and renders
//! the final answer.
//!
//! The request log line and the request metrics are written once per request by
//! [`Exchange::finish`]. For an answer with a directive, the request server parks its
//! `Exchange` (and the receiver) under the directive's token and the front door claims it,
//! moves the body and finishes it with the bytes really moved, so a download cut short logs
//! and counts what the client got.

use crate::frontdoor::head::RequestHead;
use crate::http::{Body, Response, reason};
use crate::log;
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The response header carrying a [`Directive`] from the request server to the front door. It
/// never reaches a client.
pub const DIRECTIVE_HEADER: &str = "X-Imgsrv-Hop";

/// The request header by which the front door tells the request server that it withheld a body
/// of this many bytes (the forwarded head says `Content-Length: 0`). It never comes from a
/// client: the front door drops every inbound `X-Imgsrv-` header.
pub const WITHHELD_HEADER: &str = "X-Imgsrv-Withheld";

/// The internal header namespace.
const INTERNAL_PREFIX: &str = "x-imgsrv-";

/// What the front door is asked to do instead of relaying a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Directive {
    /// Stream bytes `start..end` (exclusive) of the blob with this sha256 from the store.
    Blob {
        token: u64,
        digest: [u8; 32],
        start: u64,
        end: u64,
    },
    /// Read the withheld body of `length` bytes from the client and hand it to the receiver
    /// parked under `token`, whose response is the final answer.
    Receive { token: u64, length: u64 },
}

impl Directive {
    /// The header value: `blob <token> <sha256 hex> <start> <end>` or
    /// `receive <token> <length>`.
    pub fn encode(&self) -> String {
        match self {
            Directive::Blob {
                token,
                digest,
                start,
                end,
            } => format!("blob {token} {} {start} {end}", crate::digest::hex(digest)),
            Directive::Receive { token, length } => format!("receive {token} {length}"),
        }
    }

    pub fn parse(v: &str) -> Option<Directive> {
        let mut f = v.split_ascii_whitespace();
        let kind = f.next()?;
        let token = f.next()?.parse().ok()?;
        let d = match kind {
            "blob" => {
                let digest =
                    *crate::digest::Digest::parse(&format!("sha256:{}", f.next()?))?.as_bytes();
                let start = f.next()?.parse().ok()?;
                let end = f.next()?.parse().ok()?;
                if start > end {
                    return None;
                }
                Directive::Blob {
                    token,
                    digest,
                    start,
                    end,
                }
            }
            "receive" => Directive::Receive {
                token,
                length: f.next()?.parse().ok()?,
            },
            _ => return None,
        };
        f.next().is_none().then_some(d)
    }

    pub fn token(&self) -> u64 {
        match self {
            Directive::Blob { token, .. } | Directive::Receive { token, .. } => *token,
        }
    }
}

/// Where blob bodies come from, as the front door sees the store. The store implements it; the
/// front door holds it weakly, so that a shutdown can close the database.
pub trait BlobSource: Send + Sync {
    /// Opens a blob for streaming, or `None` when it no longer exists (collected since the
    /// request server looked): then the answer is still a clean 404, not a short body.
    fn open(&self, digest: &[u8; 32]) -> Result<Option<Box<dyn BlobBody>>, String>;
}

/// An opened blob.
pub trait BlobBody {
    /// Writes bytes `start..end` to `out`, verifying each chunk before any of its bytes are
    /// written. An error ends the body short.
    fn write_range(&self, out: &mut dyn Write, start: u64, end: u64) -> io::Result<()>;
}

/// Reads a withheld request body and renders the final answer: built by the API handler that
/// accepted the head, run by the front door with the client's body.
pub type Receiver = Box<dyn FnOnce(&mut dyn Read) -> Response + Send>;

/// One request as the log line and the metrics describe it. Finished exactly once: by the
/// request server when it answered with a body of its own, otherwise by the front door once the
/// body has been moved (or, should that never happen, when it is dropped).
pub struct Exchange {
    pub request_id: String,
    pub method: String,
    pub route: &'static str,
    pub path: String,
    /// The status logged; set by `finish`, or beforehand for an exchange that is dropped.
    pub status: u16,
    pub started: Instant,
    finished: bool,
}

impl Exchange {
    pub fn new(
        request_id: String,
        method: String,
        route: &'static str,
        path: String,
        started: Instant,
    ) -> Exchange {
        Exchange {
            request_id,
            method,
            route,
            path,
            status: 0,
            started,
            finished: false,
        }
    }

    /// Records the request: `received` body bytes read, `sent` body bytes the client was given
    /// (or why the body was cut short, after `n` bytes).
    pub fn finish(mut self, status: u16, received: u64, sent: Result<u64, (u64, String)>) {
        self.status = status;
        self.emit(received, sent);
    }

    fn emit(&mut self, received: u64, sent: Result<u64, (u64, String)>) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        let bytes = match &sent {
            Ok(n) | Err((n, _)) => *n,
        };
        crate::metrics::record_request(
            self.route,
            &self.method,
            self.status,
            elapsed,
            received,
            bytes,
        );
        log::event(
            "info",
            2,
            "request",
            &[
                ("request_id", std::mem::take(&mut self.request_id)),
                ("method", std::mem::take(&mut self.method)),
                ("route", self.route.to_string()),
                ("path", std::mem::take(&mut self.path)),
                ("status", self.status.to_string()),
                (
                    "bytes",
                    match sent {
                        Ok(n) => n.to_string(),
                        Err((n, e)) => format!("{n} (cut: {e})"),
                    },
                ),
                (
                    "duration_ms",
                    format!("{:.3}", elapsed.as_secs_f64() * 1000.0),
                ),
            ],
        );
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if !self.finished {
            self.emit(0, Err((0, "abandoned on the private hop".into())));
        }
    }
}

/// What the request server parks for the front door under a directive's token.
pub struct Handoff {
    pub exchange: Exchange,
    pub receiver: Option<Receiver>,
}

fn parked() -> &'static Mutex<HashMap<u64, Handoff>> {
    static P: OnceLock<Mutex<HashMap<u64, Handoff>>> = OnceLock::new();
    P.get_or_init(Mutex::default)
}

/// Parks a handoff until the front door claims it; returns its token. The request server parks
/// before it writes the head naming the token and takes the handoff back itself when the
/// write fails, so nothing stays parked for a head nobody read.
pub fn park(handoff: Handoff) -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let token = NEXT.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut p) = parked().lock() {
        p.insert(token, handoff);
    }
    token
}

/// Takes a parked handoff.
pub fn claim(token: u64) -> Option<Handoff> {
    parked().lock().ok()?.remove(&token)
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

fn internal(name: &str) -> bool {
    name.len() >= INTERNAL_PREFIX.len()
        && name[..INTERNAL_PREFIX.len()].eq_ignore_ascii_case(INTERNAL_PREFIX)
}

/// The head forwarded to the request server for a client's request head with a body of
/// `length` bytes. `expect`: pass `Expect: 100-continue` on (the body follows once the handler
/// reads it). `withheld`: the body does not follow; the request server learns its length from
/// [`WITHHELD_HEADER`].
pub fn request_head(head: &RequestHead, length: u64, expect: bool, withheld: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let _ = write!(out, "{} {} {}\r\n", head.method, head.target, head.version);
    for (k, v) in &head.headers {
        // The length goes once, normalised: tiny_http cannot parse a list such as `3, 3`.
        // tiny_http drops the whole connection without an answer on a header value that is not
        // ASCII; no header the API reads can carry such a value meaningfully, so the line is
        // left out (an `X-Request-ID` like that is replaced by a fresh one, as docs/api.md
        // says).
        if !hop_by_hop(k)
            && !internal(k)
            && !k.eq_ignore_ascii_case("Content-Length")
            && v.is_ascii()
        {
            let _ = write!(out, "{k}: {v}\r\n");
        }
    }
    if withheld {
        let _ = write!(out, "Content-Length: 0\r\n{WITHHELD_HEADER}: {length}\r\n");
    } else if head.header("Content-Length").is_some() {
        let _ = write!(out, "Content-Length: {length}\r\n");
    }
    if expect && !withheld {
        out.extend_from_slice(b"Expect: 100-continue\r\n");
    }
    // `upgrade` makes tiny_http hand the handler the plain socket instead of a reader bounded
    // by Content-Length, whose drop drains the unread rest of a body into one allocation of
    // that size: a 401 to a 5 GiB part would abort the process wherever 5 GiB cannot be
    // allocated. The body is bounded by the front door instead: the request server reads EOF
    // right after it.
    out.extend_from_slice(b"Connection: close, upgrade\r\n\r\n");
    out
}

/// Writes a response: status line, the headers every answer carries, the response's own, the
/// directive if any, `Content-Length` (unless the status has no body) and the body unless
/// `head_only`. A blob body is never written here (its directive says where it comes from).
/// Returns the body bytes written.
pub fn write_response(
    w: &mut dyn Write,
    resp: Response,
    request_id: &str,
    head_only: bool,
    close: bool,
    directive: Option<&Directive>,
) -> io::Result<u64> {
    let mut head = Vec::with_capacity(512);
    let _ = write!(
        head,
        "HTTP/1.1 {} {}\r\nServer: imgsrv\r\nDate: {}\r\nX-Request-ID: {request_id}\r\n",
        resp.status,
        reason(resp.status),
        httpdate::fmt_http_date(std::time::SystemTime::now())
    );
    for (k, v) in &resp.headers {
        let _ = write!(head, "{k}: {v}\r\n");
    }
    if let Some(d) = directive {
        let _ = write!(head, "{DIRECTIVE_HEADER}: {}\r\n", d.encode());
    }
    let bodyless = matches!(resp.status, 204 | 304) || (100..200).contains(&resp.status);
    if !bodyless {
        let len = resp.content_length.unwrap_or(match &resp.body {
            Body::Bytes(b) => b.len() as u64,
            _ => 0,
        });
        let _ = write!(head, "Content-Length: {len}\r\n");
    }
    if close {
        head.extend_from_slice(b"Connection: close\r\n");
    }
    head.extend_from_slice(b"\r\n");
    match resp.body {
        Body::Bytes(b) if !head_only && !bodyless => {
            // One write for small answers: the head and body go out in one segment.
            head.extend_from_slice(&b);
            w.write_all(&head)?;
            Ok(b.len() as u64)
        }
        _ => {
            w.write_all(&head)?;
            Ok(0)
        }
    }
}

/// A response head as the request server wrote it, ready to be passed on.
#[derive(Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// The status line and the header lines to pass on, each without its line end. The
    /// `Connection` header (the front door's to set) and the directive are not among them.
    pub lines: Vec<String>,
    pub content_length: Option<u64>,
    /// The directive, when the header carried a valid one.
    pub directive: Option<Directive>,
    /// Whether a directive header was present but unreadable (a bug: answer 500, not the head).
    pub bad_directive: bool,
}

/// Parses a response head (without its final blank line). An unreadable status is 502.
pub fn parse_response_head(raw: &[u8]) -> ResponseHead {
    let text = String::from_utf8_lossy(raw);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(502);
    let mut out = ResponseHead {
        status,
        lines: vec![status_line.to_string()],
        content_length: None,
        directive: None,
        bad_directive: false,
    };
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.eq_ignore_ascii_case("Connection") {
            continue;
        }
        if internal(k) {
            if k.eq_ignore_ascii_case(DIRECTIVE_HEADER) {
                out.directive = Directive::parse(v.trim());
                out.bad_directive = out.directive.is_none();
            }
            continue;
        }
        if k.eq_ignore_ascii_case("Content-Length") {
            out.content_length = v.trim().parse().ok();
        }
        out.lines.push(l.to_string());
    }
    out
}

impl ResponseHead {
    /// The head as the client gets it, with the front door's `Connection` header: `close`, or
    /// `keep-alive` for an HTTP/1.0 client that keeps the connection.
    pub fn for_client(&self, close: bool, http10: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        for l in &self.lines {
            out.extend_from_slice(l.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if http10 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontdoor::head;

    #[test]
    fn directives_round_trip_and_reject_garbage() {
        let blob = Directive::Blob {
            token: 7,
            digest: [0xab; 32],
            start: 3,
            end: 10,
        };
        let receive = Directive::Receive {
            token: 9,
            length: 5 << 30,
        };
        for d in [&blob, &receive] {
            assert_eq!(Directive::parse(&d.encode()).as_ref(), Some(d));
        }
        assert_eq!(blob.encode(), format!("blob 7 {} 3 10", "ab".repeat(32)));
        assert_eq!(receive.encode(), "receive 9 5368709120");
        for bad in [
            "",
            "blob",
            "blob 1 abc 0 1",
            &format!("blob 1 {} 5 4", "ab".repeat(32)),
            &format!("blob 1 {} 0 4 extra", "ab".repeat(32)),
            &format!("blob x {} 0 4", "ab".repeat(32)),
            "receive 1",
            "receive 1 -3",
            "send 1 2",
        ] {
            assert_eq!(Directive::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn response_heads_lose_the_directive_and_connection() {
        let raw = format!(
            "HTTP/1.1 206 Partial Content\r\nETag: \"x\"\r\nx-imgsrv-hop: blob 4 {} 0 9\r\nContent-Length: 9\r\nConnection: close\r\nX-Imgsrv-Other: y",
            "cd".repeat(32)
        );
        let h = parse_response_head(raw.as_bytes());
        assert_eq!(h.status, 206);
        assert_eq!(h.content_length, Some(9));
        assert_eq!(
            h.directive,
            Some(Directive::Blob {
                token: 4,
                digest: [0xcd; 32],
                start: 0,
                end: 9
            })
        );
        assert!(!h.bad_directive);
        assert_eq!(
            h.lines,
            [
                "HTTP/1.1 206 Partial Content",
                "ETag: \"x\"",
                "Content-Length: 9"
            ]
        );
        assert_eq!(
            h.for_client(false, false),
            b"HTTP/1.1 206 Partial Content\r\nETag: \"x\"\r\nContent-Length: 9\r\n\r\n"
        );
        assert!(
            String::from_utf8(h.for_client(true, false))
                .unwrap()
                .ends_with("Content-Length: 9\r\nConnection: close\r\n\r\n")
        );
        assert!(
            String::from_utf8(h.for_client(false, true))
                .unwrap()
                .ends_with("Connection: keep-alive\r\n\r\n")
        );

        let bad = parse_response_head(b"HTTP/1.1 200 OK\r\nX-Imgsrv-Hop: blob nonsense");
        assert!(bad.bad_directive && bad.directive.is_none());
        let garbage = parse_response_head(b"what");
        assert_eq!(garbage.status, 502);
        assert_eq!(garbage.content_length, None);
    }

    #[test]
    fn forwarded_heads_drop_internal_and_hop_by_hop_headers() {
        let h = head::parse(
            b"PUT /v1/uploads/u/parts/1 HTTP/1.1\r\nHost: x\r\nX-Imgsrv-Withheld: 1\r\nx-imgsrv-hop: receive 1 1\r\nExpect: 100-continue\r\nContent-Length: 5, 5\r\nTE: trailers\r\nX-Note: caf\xc3\xa9",
        )
        .unwrap();
        let text = |v: Vec<u8>| String::from_utf8(v).unwrap();
        let relayed = text(request_head(&h, 5, true, false));
        assert_eq!(
            relayed,
            "PUT /v1/uploads/u/parts/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close, upgrade\r\n\r\n"
        );
        let withheld = text(request_head(&h, 5, true, true));
        assert_eq!(
            withheld,
            "PUT /v1/uploads/u/parts/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nX-Imgsrv-Withheld: 5\r\nConnection: close, upgrade\r\n\r\n"
        );
        let get = head::parse(b"GET / HTTP/1.0\r\nConnection: keep-alive").unwrap();
        assert_eq!(
            text(request_head(&get, 0, false, false)),
            "GET / HTTP/1.0\r\nConnection: close, upgrade\r\n\r\n"
        );
    }

    #[test]
    fn responses_are_written_with_length_and_without_bodies_where_none_belongs() {
        let mut out = Vec::new();
        let n = write_response(
            &mut out,
            Response::text(200, "hi"),
            "rid",
            false,
            true,
            None,
        )
        .unwrap();
        assert_eq!(n, 2);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.starts_with("HTTP/1.1 200 OK\r\nServer: imgsrv\r\nDate: "),
            "{s}"
        );
        assert!(
            s.ends_with(
                "X-Request-ID: rid\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
            ),
            "{s}"
        );
        let mut out = Vec::new();
        let mut r = Response::new(206);
        r.content_length = Some(9);
        r.body = Body::Blob {
            digest: [1; 32],
            start: 0,
            end: 9,
        };
        let d = Directive::Blob {
            token: 1,
            digest: [1; 32],
            start: 0,
            end: 9,
        };
        assert_eq!(
            write_response(&mut out, r, "rid", false, false, Some(&d)).unwrap(),
            0
        );
        let h = parse_response_head(&out[..out.len() - 4]);
        assert_eq!(h.directive, Some(d));
        assert_eq!(h.content_length, Some(9));
        let mut out = Vec::new();
        write_response(&mut out, Response::new(304), "rid", false, false, None).unwrap();
        assert!(!String::from_utf8(out).unwrap().contains("Content-Length"));
    }
}
