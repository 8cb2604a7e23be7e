//! `GET|HEAD /`: the catalog page, anonymous, rendered from one catalog listing.
//!
//! Its strong `ETag` names the catalog generation, the binary's version and the base URL the
//! commands show, which together determine the bytes, so a conditional request is answered
//! with 304 after one small read transaction and without rendering anything.

use super::App;
use crate::http::{Request, Response, not_modified, problem};
use sha2::{Digest, Sha256};

/// The absolute URL the page's commands use: the scheme a TLS-terminating proxy reports in
/// `X-Forwarded-Proto`, else this server's own, and the request's `Host`. A `Host` with
/// characters no host name or address has is replaced, so the page never shows garbage.
fn base_url(app: &App, req: &Request) -> String {
    let scheme = match req.header("X-Forwarded-Proto").map(str::trim) {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(p) if p.eq_ignore_ascii_case("http") => "http",
        _ if app.tls => "https",
        _ => "http",
    };
    let host = req
        .header("Host")
        .map(str::trim)
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b".-:[]_".contains(&c))
        })
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

fn etag(generation: u64, base: &str) -> String {
    let base_hash = crate::digest::hex(&Sha256::digest(base.as_bytes()));
    format!(
        "\"page-{}-{generation}-{}\"",
        env!("CARGO_PKG_VERSION"),
        &base_hash[..16]
    )
}

fn headers(r: Response, etag: String) -> Response {
    r.header("ETag", etag)
        .header("Cache-Control", "no-cache")
        // Nothing on the page runs or loads from elsewhere; say so to the browser too.
        .header(
            "Content-Security-Policy",
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'",
        )
        .header("X-Content-Type-Options", "nosniff")
}

pub fn serve(app: &App, req: &Request) -> Response {
    let base = base_url(app, req);
    let generation = match app.store.generation() {
        Ok(g) => g,
        Err(e) => return problem(500, &e.detail),
    };
    let tag = etag(generation, &base);
    if not_modified(
        req.header("If-None-Match"),
        None,
        &tag,
        crate::clock::Timestamp(0),
    ) {
        return headers(Response::new(304), tag);
    }
    // The listing may be newer than the generation read above; the tag follows the listing.
    let listing = match app.store.listing() {
        Ok(l) => l,
        Err(e) => return problem(500, &e.detail),
    };
    let body = crate::page::render(&listing, &base).into_bytes();
    headers(
        Response::bytes(200, "text/html; charset=utf-8", body),
        etag(listing.generation, &base),
    )
}
