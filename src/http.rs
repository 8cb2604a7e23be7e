//! Protocol values independent of the server library: requests, responses, problem
//! documents, byte ranges and conditional requests (docs/api.md sections 6 and 7).

use crate::clock::Timestamp;
use crate::error::{Error, Kind};
use serde::Serialize;
use std::io::Read;

/// An inbound request as the API sees it.
pub struct Request<'a> {
    pub method: String,
    /// The path without the query string, still percent-encoded.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub content_length: Option<u64>,
    pub body: &'a mut dyn Read,
    pub request_id: String,
    /// The front door withheld the body (`content_length` bytes): `body` is empty, and a
    /// handler that wants the bytes answers with [`Body::Receive`] instead of reading them.
    pub body_withheld: bool,
}

impl Request<'_> {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response body.
pub enum Body {
    Empty,
    Bytes(Vec<u8>),
    /// Bytes `start..end` of the blob with this sha256. The front door streams them from the
    /// store (verifying each chunk), so the response carries only what to send.
    Blob {
        digest: [u8; 32],
        start: u64,
        end: u64,
    },
    /// Not a body: the request's withheld body is to be read by the front door and given to
    /// the receiver, whose response is the final answer (see `hop`).
    Receive(crate::hop::Receiver),
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// Set when a HEAD request must not carry a body but keeps the headers (incl. length).
    pub content_length: Option<u64>,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: Body::Empty,
            content_length: None,
        }
    }

    pub fn header(mut self, k: &str, v: impl Into<String>) -> Response {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    pub fn bytes(status: u16, content_type: &str, body: Vec<u8>) -> Response {
        let len = body.len() as u64;
        Response {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: Body::Bytes(body),
            content_length: Some(len),
        }
    }

    /// A JSON body from a streaming encoder, ending with one newline.
    pub fn json<T: Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec(value) {
            Ok(mut b) => {
                b.push(b'\n');
                Response::bytes(status, "application/json", b)
            }
            Err(e) => problem(500, &format!("encoding response: {e}")),
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::bytes(
            status,
            "text/plain; charset=utf-8",
            body.as_bytes().to_vec(),
        )
    }

    pub fn no_content() -> Response {
        Response::new(204)
    }

    /// Asks the front door for the withheld request body: `receiver` gets it and renders the
    /// final answer.
    pub fn receive(receiver: crate::hop::Receiver) -> Response {
        let mut r = Response::new(200);
        r.body = Body::Receive(receiver);
        r
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        416 => "Range Not Satisfiable",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// An RFC 9457 problem document (`type` is always `about:blank`, no `instance`).
pub fn problem(status: u16, detail: &str) -> Response {
    #[derive(Serialize)]
    struct Problem<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        title: &'static str,
        status: u16,
        #[serde(skip_serializing_if = "str::is_empty")]
        detail: &'a str,
    }
    let mut body = serde_json::to_vec(&Problem {
        kind: "about:blank",
        title: reason(status),
        status,
        detail,
    })
    .unwrap_or_default();
    body.push(b'\n');
    Response::bytes(status, "application/problem+json", body)
}

pub fn status_of(kind: Kind) -> u16 {
    match kind {
        Kind::Invalid => 400,
        Kind::NotFound => 404,
        Kind::Conflict => 409,
        Kind::Precondition => 412,
        Kind::InsufficientStorage => 507,
        Kind::Unavailable => 503,
        Kind::Internal => 500,
    }
}

impl From<Error> for Response {
    fn from(e: Error) -> Response {
        problem(status_of(e.kind), &e.detail)
    }
}

/// Whether `h` could be a host name or address with an optional port (`Host`'s value): no
/// characters that could break out of a URL or markup where it is shown.
pub fn is_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b".-:[]_".contains(&c))
}

/// Decodes `%XX` escapes of one path segment; `None` for malformed escapes or non-UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Escapes a path segment for use in a relative URL.
pub fn percent_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// The outcome of evaluating `Range`/`If-Range` against a representation of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Serve everything (no range, or the range was ignored).
    Full,
    /// Serve bytes `start..=end`.
    Partial(u64, u64),
    /// 416 with this detail.
    Unsatisfiable(&'static str),
}

/// Applies the `If-Range` gate: whether a present `Range` is honoured.
pub fn if_range_allows(if_range: Option<&str>, etag: &str, last_modified: Timestamp) -> bool {
    let Some(v) = if_range.map(str::trim) else {
        return true;
    };
    if v.starts_with('"') || v.starts_with("W/") {
        return v == etag;
    }
    match Timestamp::parse_http_date(v) {
        Some(date) => last_modified.unix_seconds() <= date.unix_seconds(),
        None => false,
    }
}

/// Parses a single-range `Range` header (docs/api.md section 6, step 4).
pub fn parse_range(header: Option<&str>, size: u64) -> RangeOutcome {
    let Some(h) = header.map(str::trim).filter(|h| !h.is_empty()) else {
        return RangeOutcome::Full;
    };
    use RangeOutcome::Unsatisfiable as U;
    let Some(spec) = h.strip_prefix("bytes=") else {
        return U("range unit must be bytes");
    };
    let spec = spec.trim();
    if spec.is_empty() {
        return U("range must not be empty");
    }
    if spec.contains(',') {
        return U("multiple ranges are not supported");
    }
    if size == 0 {
        return U("range is unsatisfiable for an empty blob");
    }
    let Some((a, b)) = spec.split_once('-') else {
        return U("range must use start-end syntax");
    };
    let (a, b) = (a.trim(), b.trim());
    let int = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok().or(Some(u64::MAX))
        }
    };
    if a.is_empty() {
        return match int(b) {
            Some(n) if n > 0 => RangeOutcome::Partial(size - n.min(size), size - 1),
            _ => U("suffix range must use a positive integer length"),
        };
    }
    let Some(start) = int(a) else {
        return U("range start must be a non-negative integer");
    };
    if start >= size {
        return U("range start exceeds blob size");
    }
    if b.is_empty() {
        return RangeOutcome::Partial(start, size - 1);
    }
    let Some(end) = int(b) else {
        return U("range end must be a non-negative integer");
    };
    if end < start {
        return U("range end must be greater than or equal to range start");
    }
    RangeOutcome::Partial(start, end.min(size - 1))
}

/// `If-None-Match` (weak comparison, `*`, comma lists) then `If-Modified-Since`.
pub fn not_modified(
    if_none_match: Option<&str>,
    if_modified_since: Option<&str>,
    etag: &str,
    last_modified: Timestamp,
) -> bool {
    if let Some(inm) = if_none_match {
        let bare = etag.trim_start_matches("W/");
        return inm
            .split(',')
            .map(str::trim)
            .any(|t| t == "*" || t.trim_start_matches("W/") == bare);
    }
    if let Some(ims) = if_modified_since
        && let Some(date) = Timestamp::parse_http_date(ims)
    {
        return last_modified.unix_seconds() <= date.unix_seconds();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeOutcome::*;

    #[test]
    fn ranges() {
        let cases: &[(&str, u64, RangeOutcome)] = &[
            ("", 10, Full),
            ("bytes=0-0", 10, Partial(0, 0)),
            ("bytes=2-", 10, Partial(2, 9)),
            ("bytes=-3", 10, Partial(7, 9)),
            ("bytes=-30", 10, Partial(0, 9)),
            ("bytes=5-100", 10, Partial(5, 9)),
            ("items=0-1", 10, Unsatisfiable("range unit must be bytes")),
            ("bytes=", 10, Unsatisfiable("range must not be empty")),
            (
                "bytes=0-1,3-4",
                10,
                Unsatisfiable("multiple ranges are not supported"),
            ),
            (
                "bytes=0-1",
                0,
                Unsatisfiable("range is unsatisfiable for an empty blob"),
            ),
            (
                "bytes=-0",
                10,
                Unsatisfiable("suffix range must use a positive integer length"),
            ),
            (
                "bytes=-x",
                10,
                Unsatisfiable("suffix range must use a positive integer length"),
            ),
            (
                "bytes=x-",
                10,
                Unsatisfiable("range start must be a non-negative integer"),
            ),
            (
                "bytes=10-",
                10,
                Unsatisfiable("range start exceeds blob size"),
            ),
            (
                "bytes=1-x",
                10,
                Unsatisfiable("range end must be a non-negative integer"),
            ),
            (
                "bytes=5-4",
                10,
                Unsatisfiable("range end must be greater than or equal to range start"),
            ),
            (
                "bytes=5",
                10,
                Unsatisfiable("range must use start-end syntax"),
            ),
        ];
        for (h, size, want) in cases {
            assert_eq!(&parse_range(Some(h), *size), want, "{h} size {size}");
        }
    }

    #[test]
    fn conditionals() {
        let lm = Timestamp::parse_rfc3339("2026-05-05T18:00:00Z").unwrap();
        let etag = "\"sha256:ab\"";
        assert!(not_modified(Some("\"sha256:ab\""), None, etag, lm));
        assert!(not_modified(Some("W/\"sha256:ab\""), None, etag, lm));
        assert!(not_modified(Some("\"x\", \"sha256:ab\""), None, etag, lm));
        assert!(not_modified(Some("*"), None, etag, lm));
        assert!(!not_modified(
            Some("\"x\""),
            Some("Tue, 05 May 2026 18:00:00 GMT"),
            etag,
            lm
        ));
        assert!(not_modified(
            None,
            Some("Tue, 05 May 2026 18:00:00 GMT"),
            etag,
            lm
        ));
        assert!(!not_modified(
            None,
            Some("Tue, 05 May 2026 17:59:59 GMT"),
            etag,
            lm
        ));
        assert!(!not_modified(None, Some("garbage"), etag, lm));
        assert!(if_range_allows(None, etag, lm));
        assert!(if_range_allows(Some(etag), etag, lm));
        assert!(!if_range_allows(Some("W/\"sha256:ab\""), etag, lm));
        assert!(if_range_allows(
            Some("Tue, 05 May 2026 18:00:00 GMT"),
            etag,
            lm
        ));
        assert!(!if_range_allows(
            Some("Tue, 05 May 2026 17:00:00 GMT"),
            etag,
            lm
        ));
        assert!(!if_range_allows(Some("nonsense"), etag, lm));
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode("a%2Eb").as_deref(), Some("a.b"));
        assert_eq!(percent_decode("a%2"), None);
        assert_eq!(percent_encode_segment("a+b:c"), "a%2Bb%3Ac");
    }
}
