//! Reading and checking an HTTP/1.x message head with hard limits. Pure parsing plus a reader
//! that enforces a total deadline (so a client trickling one byte a second cannot hold a
//! connection open) and a size cap.

use std::io::{self, Read};
use std::time::Instant;

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    pub target: String,
    pub version: String,
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header contains `token` (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The declared body length: `Ok(None)` when absent, `Err` when malformed or conflicting.
    pub fn content_length(&self) -> Result<Option<u64>, BadLength> {
        let mut found: Option<u64> = None;
        for (k, v) in &self.headers {
            if !k.eq_ignore_ascii_case("Content-Length") {
                continue;
            }
            for part in v.split(',') {
                let p = part.trim();
                if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
                    return Err(BadLength);
                }
                let n: u64 = p.parse().map_err(|_| BadLength)?;
                if found.is_some_and(|f| f != n) {
                    return Err(BadLength);
                }
                found = Some(n);
            }
        }
        Ok(found)
    }

    /// HTTP/1.1 keeps the connection unless `close`; HTTP/1.0 only with `keep-alive`.
    pub fn keep_alive(&self) -> bool {
        if self.has_token("Connection", "close") {
            return false;
        }
        self.version == "HTTP/1.1" || self.has_token("Connection", "keep-alive")
    }
}

/// A `Content-Length` that is not one non-negative integer.
#[derive(Debug, PartialEq, Eq)]
pub struct BadLength;

/// Why a head could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadError {
    /// The peer closed (or the idle timeout passed) before sending a byte: close quietly.
    Idle,
    /// The deadline passed after some bytes arrived: 408.
    Timeout,
    /// The head exceeded the size limit: 431.
    TooLarge,
    /// Not HTTP/1.x: 400.
    Malformed(&'static str),
    /// A transport error (reset, TLS failure): close quietly.
    Io(io::ErrorKind),
}

/// Parses a complete head (without the final blank line).
pub fn parse(head: &[u8]) -> Result<RequestHead, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::Malformed("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::Malformed("malformed request line"));
    };
    if method.is_empty()
        || !method.bytes().all(|c| c.is_ascii_uppercase())
        || target.is_empty()
        || !target.bytes().all(|c| c.is_ascii_graphic())
        || !(version == "HTTP/1.1" || version == "HTTP/1.0")
    {
        return Err(HeadError::Malformed("malformed request line"));
    }
    let mut headers = Vec::new();
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Err(HeadError::Malformed("malformed header line"));
        };
        if k.is_empty() || !k.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(HeadError::Malformed("malformed header name"));
        }
        if v.bytes().any(|c| c.is_ascii_control() && c != b'\t') {
            return Err(HeadError::Malformed("control character in header value"));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok(RequestHead {
        method: method.to_string(),
        target: target.to_string(),
        version: version.to_string(),
        headers,
    })
}

/// Reads from `r` into `buf` until a blank line ends the head. Returns the head's length
/// including the blank line; bytes after it stay in `buf` (the start of the body or of a
/// pipelined request). `set_timeout` is called before each read with the time left. While no
/// byte has arrived, reads wait in slices of at most `SLICE` so that `stopping()` (a shutdown)
/// ends an idle wait promptly.
pub fn read_head<R: Read>(
    r: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    first_byte_deadline: Instant,
    head_deadline_after_first: std::time::Duration,
    set_timeout: &mut dyn FnMut(std::time::Duration) -> io::Result<()>,
    stopping: &dyn Fn() -> bool,
) -> Result<usize, HeadError> {
    const SLICE: std::time::Duration = std::time::Duration::from_millis(250);
    let mut deadline = if buf.is_empty() {
        first_byte_deadline
    } else {
        Instant::now() + head_deadline_after_first
    };
    let mut scanned = 0;
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(pos) = find_end(buf, scanned) {
            return Ok(pos);
        }
        scanned = buf.len().saturating_sub(3);
        if buf.len() > max {
            return Err(HeadError::TooLarge);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(if buf.is_empty() {
                HeadError::Idle
            } else {
                HeadError::Timeout
            });
        }
        let wait = if buf.is_empty() {
            left.min(SLICE)
        } else {
            left
        };
        set_timeout(wait).map_err(|e| HeadError::Io(e.kind()))?;
        match r.read(&mut chunk) {
            Ok(0) => {
                return Err(if buf.is_empty() {
                    HeadError::Idle
                } else {
                    HeadError::Io(io::ErrorKind::UnexpectedEof)
                });
            }
            Ok(n) => {
                if buf.is_empty() {
                    deadline = Instant::now() + head_deadline_after_first;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if buf.is_empty() {
                    if stopping() || Instant::now() >= deadline {
                        return Err(HeadError::Idle);
                    }
                    continue;
                }
                return Err(HeadError::Timeout);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeadError::Io(e.kind())),
        }
    }
}

/// Position just past `\r\n\r\n`, searching from `from`.
fn find_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| from + p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_heads() {
        let h = parse(b"GET /v1/images HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5").unwrap();
        assert_eq!(h.method, "GET");
        assert_eq!(h.content_length(), Ok(Some(5)));
        assert!(h.keep_alive());
        let cases: &[&[u8]] = &[
            b"GET /x HTTP/2.0",
            b"get /x HTTP/1.1",
            b"GET  /x HTTP/1.1",
            b"GET /x HTTP/1.1\r\nNoColon",
            b"GET /x HTTP/1.1\r\nBad\x01: v",
            b"\xff\xfe",
        ];
        for c in cases {
            assert!(matches!(parse(c), Err(HeadError::Malformed(_))), "{c:?}");
        }
    }

    #[test]
    fn content_length_rules() {
        let cl = |v: &str| {
            parse(format!("PUT / HTTP/1.1\r\nContent-Length: {v}").as_bytes())
                .unwrap()
                .content_length()
        };
        assert_eq!(cl("0"), Ok(Some(0)));
        assert_eq!(cl("100000000000"), Ok(Some(100_000_000_000)));
        assert_eq!(cl("-1"), Err(BadLength));
        assert_eq!(cl("1, 2"), Err(BadLength));
        assert_eq!(cl("99999999999999999999999"), Err(BadLength));
        assert_eq!(parse(b"GET / HTTP/1.1").unwrap().content_length(), Ok(None));
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |s: &[u8]| parse(s).unwrap().keep_alive();
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: close"));
        assert!(!ka(b"GET / HTTP/1.0"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive"));
    }

    #[test]
    fn reads_until_blank_line_and_keeps_the_rest() {
        let mut input: &[u8] = b"GET / HTTP/1.1\r\nA: b\r\n\r\nBODY";
        let mut buf = Vec::new();
        let far = Instant::now() + std::time::Duration::from_secs(5);
        let n = read_head(
            &mut input,
            &mut buf,
            1024,
            far,
            std::time::Duration::from_secs(5),
            &mut |_| Ok(()),
            &|| false,
        )
        .unwrap();
        assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\nA: b\r\n\r\n");
        assert_eq!(&buf[n..], b"BODY");
        let mut big: &[u8] = &[b'a'; 5000];
        let mut buf = Vec::new();
        assert_eq!(
            read_head(
                &mut big,
                &mut buf,
                1024,
                far,
                std::time::Duration::from_secs(5),
                &mut |_| Ok(()),
                &|| false,
            ),
            Err(HeadError::TooLarge)
        );
    }
}
