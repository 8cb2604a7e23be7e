//! HTTP caching of the API's JSON reads: one policy per route, applied in one place after the
//! handler has rendered its answer, so handlers stay plain functions that build a document.
//!
//! A successful `GET`/`HEAD` of a cacheable route gets a strong `ETag` computed from the body
//! bytes already rendered and a `Cache-Control` that makes every cache revalidate before reuse;
//! an `If-None-Match` that matches it is answered `304 Not Modified` with the same headers and
//! no body. `HEAD` runs the same handler as `GET`, so both carry the same tag.
//!
//! The tag hashes the rendered bytes rather than deriving it from the catalog generation:
//! the generation moves only with published content and aliases, while a draft manifest, an
//! upload session or a publish job changes without bumping it, so only the bytes are an exact
//! source for every route. Hashing them costs one pass over a buffer that is in cache already,
//! next to the read transaction and the JSON encoding that produced it.
//!
//! Downloads and the Simple Streams documents set their own headers (an immutable digest tag,
//! a per-generation rendering) and are left alone here.

use crate::clock::Timestamp;
use crate::http::{Body, Request, Response, not_modified};

/// How responses of one route may be cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Policy {
    /// The handler sets its own caching headers (downloads, Simple Streams), or the answer is a
    /// probe that no cache should be taught anything about.
    Own,
    /// The same document for every client, whatever its `Authorization` header: shared caches
    /// may store it but must revalidate each use (`no-cache`), so a moved alias or an edited
    /// draft is seen on the next request.
    Shared,
    /// Per-client state (an upload session, a publish job): only the client's own cache may keep
    /// it (`private, no-cache`), and `Vary: Authorization` keys it by credentials there too.
    Private,
    /// Never stored anywhere (`no-store`): principals, roles and API tokens, on every method,
    /// since a token's plaintext is answered once by a `POST`.
    NoStore,
}

/// Adds the route's caching headers to `resp`, answering 304 when the request's
/// `If-None-Match` names the current tag. `read` is whether the request is a `GET` or `HEAD`.
pub(super) fn apply(policy: Policy, req: &Request, read: bool, resp: Response) -> Response {
    // A handler that chose its own policy keeps it.
    if resp.headers.iter().any(|(k, _)| is(k, "Cache-Control")) {
        return resp;
    }
    let cache_control = match policy {
        Policy::Own => return resp,
        Policy::NoStore => return resp.header("Cache-Control", "no-store"),
        // A write's answer is not reused for later reads: caches store a `POST` response only
        // with explicit freshness, which none is given, and drop what they hold for the URL.
        _ if !read => return resp,
        Policy::Shared => "no-cache",
        Policy::Private => "private, no-cache",
    };
    let vary = policy == Policy::Private;
    let etag = match (&resp.status, &resp.body) {
        (200, Body::Bytes(body)) => Some(etag_of(body)),
        _ => None,
    };
    // Errors carry the directive too: a 404 for an alias about to be created must not be kept
    // by a cache that applies a default lifetime.
    let Some(etag) = etag else {
        return with_headers(resp, cache_control, None, vary);
    };
    // If-Modified-Since is not consulted: these documents carry no date, only the tag.
    if not_modified(req.header("If-None-Match"), None, &etag, Timestamp(0)) {
        return with_headers(Response::new(304), cache_control, Some(etag), vary);
    }
    with_headers(resp, cache_control, Some(etag), vary)
}

fn with_headers(
    mut resp: Response,
    cache_control: &str,
    etag: Option<String>,
    vary: bool,
) -> Response {
    if let Some(etag) = etag {
        resp = resp.header("ETag", etag);
    }
    resp = resp.header("Cache-Control", cache_control);
    if vary {
        resp = resp.header("Vary", "Authorization");
    }
    resp
}

/// The strong entity tag of a rendered body: its XXH3-128, quoted, as 32 lowercase hex digits.
///
/// The tag only has to tell successive states of one URL apart, not resist forgery: 128 bits
/// make an accidental collision negligible, and crafting one would take write access to the
/// catalog, which already lets the writer change the document at will. XXH3 is several times
/// faster than sha256 (the chunk checksums use it for that reason), and this hash runs on
/// every read of every document, revalidations included, where sha256 would buy nothing.
/// The tags are opaque to clients; their shape differs from a download's `"sha256:..."` so
/// nobody mistakes one for a content digest.
pub(super) fn etag_of(body: &[u8]) -> String {
    format!("\"{:032x}\"", twox_hash::XxHash3_128::oneshot(body))
}

fn is(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn check(policy: Policy, method_is_read: bool, inm: Option<&str>, resp: Response) -> Response {
        let mut empty = Cursor::new(Vec::new());
        let req = Request {
            method: "GET".into(),
            path: "/".into(),
            headers: inm
                .map(|v| vec![("If-None-Match".to_string(), v.to_string())])
                .unwrap_or_default(),
            content_length: None,
            body_withheld: false,
            body: &mut empty,
            request_id: "t".into(),
        };
        apply(policy, &req, method_is_read, resp)
    }

    fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
        r.headers
            .iter()
            .find(|(k, _)| is(k, name))
            .map(|(_, v)| v.as_str())
    }

    fn doc() -> Response {
        Response::bytes(200, "application/json", b"{\"a\":1}\n".to_vec())
    }

    #[test]
    fn tags() {
        let a = etag_of(b"{\"a\":1}\n");
        assert_eq!(a.len(), 34);
        assert!(a.starts_with('"') && a.ends_with('"'));
        assert_eq!(a, etag_of(b"{\"a\":1}\n"));
        assert_ne!(a, etag_of(b"{\"a\":2}\n"));
    }

    #[test]
    fn policies() {
        let tag = etag_of(b"{\"a\":1}\n");
        // (policy, read, If-None-Match, status, Cache-Control, ETag present, Vary)
        type Case<'a> = (
            Policy,
            bool,
            Option<&'a str>,
            u16,
            Option<&'a str>,
            bool,
            bool,
        );
        let weak = format!("W/{tag}");
        let listed = format!("\"x\", {tag}");
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (Policy::Shared,  true,  None,          200, Some("no-cache"),          true,  false),
            (Policy::Shared,  true,  Some(&tag),    304, Some("no-cache"),          true,  false),
            (Policy::Shared,  true,  Some(&weak),   304, Some("no-cache"),          true,  false),
            (Policy::Shared,  true,  Some(&listed), 304, Some("no-cache"),          true,  false),
            (Policy::Shared,  true,  Some("*"),     304, Some("no-cache"),          true,  false),
            (Policy::Shared,  true,  Some("\"x\""), 200, Some("no-cache"),          true,  false),
            (Policy::Shared,  false, Some(&tag),    200, None,                      false, false),
            (Policy::Private, true,  None,          200, Some("private, no-cache"), true,  true),
            (Policy::Private, true,  Some(&tag),    304, Some("private, no-cache"), true,  true),
            (Policy::NoStore, true,  Some(&tag),    200, Some("no-store"),          false, false),
            (Policy::NoStore, false, None,          200, Some("no-store"),          false, false),
            (Policy::Own,     true,  Some(&tag),    200, None,                      false, false),
        ];
        for (i, (policy, read, inm, status, cc, has_tag, vary)) in cases.iter().enumerate() {
            let r = check(*policy, *read, *inm, doc());
            assert_eq!(r.status, *status, "case {i}");
            assert_eq!(header(&r, "Cache-Control"), *cc, "case {i}");
            assert_eq!(header(&r, "ETag").is_some(), *has_tag, "case {i}");
            if *has_tag {
                assert_eq!(header(&r, "ETag"), Some(tag.as_str()), "case {i}");
            }
            assert_eq!(header(&r, "Vary").is_some(), *vary, "case {i}");
            if r.status == 304 {
                assert!(matches!(r.body, Body::Empty), "case {i}");
            }
        }
    }

    #[test]
    fn errors_and_own_headers() {
        // A problem document gets the directive but no tag, and is never a 304.
        let r = check(
            Policy::Shared,
            true,
            Some("*"),
            crate::http::problem(404, "gone"),
        );
        assert_eq!(r.status, 404);
        assert_eq!(header(&r, "Cache-Control"), Some("no-cache"));
        assert_eq!(header(&r, "ETag"), None);
        // A handler's own Cache-Control wins.
        let r = check(
            Policy::Shared,
            true,
            None,
            doc().header("Cache-Control", "max-age=5"),
        );
        assert_eq!(header(&r, "Cache-Control"), Some("max-age=5"));
        assert_eq!(header(&r, "ETag"), None);
    }
}
