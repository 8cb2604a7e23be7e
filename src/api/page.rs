//! `GET|HEAD /`: the catalog page, anonymous, rendered from one catalog listing.
//!
//! Its strong `ETag` names the catalog generation, the binary's version and the base URL the
//! commands show, which together determine the bytes, so a conditional request is answered
//! with 304 after one small read transaction and without rendering anything.
//!
//! The page is rendered once per catalog generation and base URL and kept gzip-compressed:
//! at 10,000 versions it is 13.9 MB of HTML and took 0.2-0.3 s to render, on every request
//! before, so an anonymous client could keep a core busy by asking for it. Browsers accept
//! gzip and get the kept bytes; a client that does not is sent them decompressed, which
//! costs a fraction of a render. The gzip representation has its own tag (`-gzip` inside the
//! quotes, as for the Simple Streams documents) and both answers carry `Vary:
//! Accept-Encoding`.
//!
//! With a configured public URL (`--public-url`) every request gets the page for that URL,
//! so one page is kept whatever `Host` a client sends.

use super::App;
use super::streams::accepts_gzip;
use crate::http::{Request, Response, not_modified, problem};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Base URLs whose page is kept at once. A server is usually reached under one or two names
/// (and through a TLS-terminating proxy); a request under yet another name renders its page
/// and pushes out the page used least recently among those asked for only once, or failing
/// that the one used least recently. So a client making up `Host` values pushes out its own
/// pages rather than those of the names people use. Each kept page costs about 1.8 MB of
/// gzip at 10,000 versions.
const PAGES_KEPT: usize = 4;

/// The catalog page as last rendered for each of the latest base URLs, newest first.
#[derive(Default)]
pub struct PageCache(Mutex<VecDeque<Kept>>);

/// A rendered page: the generation it was rendered at and its gzip bytes.
type Page = (u64, Arc<Vec<u8>>);

struct Kept {
    base: String,
    /// Whether the page was asked for again after the request that made the entry.
    again: bool,
    /// The page, once rendered. Shared with the requests rendering or reading it, so that
    /// they hold its lock and not the list's.
    page: Arc<Mutex<Option<Page>>>,
}

impl PageCache {
    /// The page for `base` at `generation` or later, gzip-compressed, with the generation it
    /// was rendered at: kept, or rendered now by `render`.
    fn get_or_render(
        &self,
        base: &str,
        generation: u64,
        render: impl FnOnce() -> Result<(u64, Vec<u8>), String>,
    ) -> Result<Page, String> {
        let slot = {
            // Entries are only ever replaced whole, so a list whose holder panicked is usable.
            let mut kept = self.0.lock().unwrap_or_else(|p| p.into_inner());
            let entry = match kept.iter().position(|k| k.base == base) {
                Some(i) => {
                    let mut entry = kept.remove(i).expect("position is in range");
                    entry.again = true;
                    entry
                }
                None => Kept {
                    base: base.to_string(),
                    again: false,
                    page: Default::default(),
                },
            };
            let slot = entry.page.clone();
            kept.push_front(entry);
            // A page pushed out while a request renders into it lives on with that request
            // and is dropped after it.
            if kept.len() > PAGES_KEPT {
                match kept.iter().skip(1).rposition(|k| !k.again) {
                    Some(i) => drop(kept.remove(i + 1)),
                    None => drop(kept.pop_back()),
                }
            }
            slot
        };
        // Rendering happens under the page's lock on purpose, as for the Simple Streams
        // documents: requests for the same base URL that arrive meanwhile want the same page,
        // and waiting for it is cheaper than rendering it once each. Requests for another base
        // URL (a kept page, or a client making up `Host` values) do not wait for it.
        let mut page = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((g, gzip)) = page.as_ref()
            && *g >= generation
        {
            return Ok((*g, gzip.clone()));
        }
        let (generation, html) = render()?;
        // Level 2: as quick as level 1 was with miniz_oxide and smaller (`streams::gzip`).
        let gzip = Arc::new(crate::streams::gzip(&html, flate2::Compression::new(2)));
        *page = Some((generation, gzip.clone()));
        Ok((generation, gzip))
    }
}

/// The absolute URL the page's commands use: the configured public URL, else the scheme a
/// TLS-terminating proxy reports in `X-Forwarded-Proto` (or this server's own) and the
/// request's `Host`. A `Host` with characters no host name or address has is replaced, so the
/// page never shows garbage.
fn base_url(app: &App, req: &Request) -> String {
    if let Some(url) = &app.public_url {
        return url.clone();
    }
    let scheme = match req.header("X-Forwarded-Proto").map(str::trim) {
        Some(p) if p.eq_ignore_ascii_case("https") => "https",
        Some(p) if p.eq_ignore_ascii_case("http") => "http",
        _ if app.tls => "https",
        _ => "http",
    };
    let host = req
        .header("Host")
        .map(str::trim)
        .filter(|h| crate::http::is_host(h))
        .unwrap_or("localhost");
    format!("{scheme}://{host}")
}

fn etag(generation: u64, base: &str, gzip: bool) -> String {
    let base_hash = crate::digest::hex(&Sha256::digest(base.as_bytes()));
    format!(
        "\"page-{}-{generation}-{}{}\"",
        env!("CARGO_PKG_VERSION"),
        &base_hash[..16],
        if gzip { "-gzip" } else { "" }
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
        .header("Vary", "Accept-Encoding")
}

pub fn serve(app: &App, req: &Request) -> Response {
    let base = base_url(app, req);
    let gzip = accepts_gzip(req.header("Accept-Encoding"));
    let generation = match app.store.generation() {
        Ok(g) => g,
        Err(e) => return problem(500, &e.detail),
    };
    let tag = etag(generation, &base, gzip);
    if not_modified(
        req.header("If-None-Match"),
        None,
        &tag,
        crate::clock::Timestamp(0),
    ) {
        return headers(Response::new(304), tag);
    }
    let page = app.page_cache.get_or_render(&base, generation, || {
        let listing = app.store.listing().map_err(|e| e.detail)?;
        Ok((
            listing.generation,
            crate::page::render(&listing, &base).into_bytes(),
        ))
    });
    // The page may be newer than the generation read above; the tag follows the page.
    let (generation, compressed) = match page {
        Ok(p) => p,
        Err(detail) => return problem(500, &detail),
    };
    let tag = etag(generation, &base, gzip);
    if gzip {
        let r = Response::bytes(200, "text/html; charset=utf-8", compressed.to_vec());
        return headers(r.header("Content-Encoding", "gzip"), tag);
    }
    match crate::streams::gunzip(&compressed) {
        Ok(html) => headers(Response::bytes(200, "text/html; charset=utf-8", html), tag),
        // The bytes were compressed in memory by this process a moment ago.
        Err(e) => problem(
            500,
            &format!("cannot decompress the kept catalog page: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    fn gunzip(b: &[u8]) -> Vec<u8> {
        crate::streams::gunzip(b).unwrap()
    }

    /// A page is rendered once per base URL and generation, kept for the latest
    /// `PAGES_KEPT` bases, and rendered again when the catalog moves on.
    #[test]
    fn pages_are_kept_per_base_and_generation() {
        let cache = PageCache::default();
        let renders = Cell::new(0);
        let get = |base: &str, generation: u64| {
            let (g, gz) = cache
                .get_or_render(base, generation, || {
                    renders.set(renders.get() + 1);
                    Ok((generation, format!("{base} at {generation}").into_bytes()))
                })
                .unwrap();
            (g, String::from_utf8(gunzip(&gz)).unwrap())
        };
        assert_eq!(get("http://a", 1), (1, "http://a at 1".to_string()));
        assert_eq!(get("http://a", 1), (1, "http://a at 1".to_string()));
        assert_eq!(renders.get(), 1);
        // A page newer than the generation asked for serves too.
        assert_eq!(get("http://a", 0).0, 1);
        assert_eq!(renders.get(), 1);
        assert_eq!(get("http://a", 2), (2, "http://a at 2".to_string()));
        assert_eq!(renders.get(), 2);
        // Other bases have pages of their own, up to the limit; the one used least recently
        // goes first.
        for i in 0..PAGES_KEPT - 1 {
            get(&format!("http://b{i}"), 2);
        }
        assert_eq!(renders.get(), 2 + PAGES_KEPT - 1);
        get("http://a", 2);
        assert_eq!(
            renders.get(),
            2 + PAGES_KEPT - 1,
            "http://a should still be kept"
        );
        // One more base: http://b0, used least recently, goes; http://a, used just now, stays.
        get("http://c", 2);
        get("http://a", 2);
        assert_eq!(
            renders.get(),
            2 + PAGES_KEPT,
            "http://a should still be kept"
        );
        get("http://b0", 2);
        assert_eq!(
            renders.get(),
            2 + PAGES_KEPT + 1,
            "http://b0 should have gone"
        );
    }

    /// Base URLs asked for only once (a client making up `Host` values) push out each other,
    /// not the pages asked for again.
    #[test]
    fn pages_asked_for_once_go_first() {
        let cache = PageCache::default();
        let renders = Cell::new(0);
        let get = |base: &str| {
            cache
                .get_or_render(base, 1, || {
                    renders.set(renders.get() + 1);
                    Ok((1, base.as_bytes().to_vec()))
                })
                .unwrap();
        };
        get("http://a");
        get("http://a");
        for i in 0..100 {
            get(&format!("http://made-up-{i}"));
        }
        assert_eq!(renders.get(), 101);
        get("http://a");
        assert_eq!(renders.get(), 101, "http://a was pushed out");
    }

    /// While one base URL's page renders, a kept page of another base URL is served.
    #[test]
    fn a_render_does_not_hold_up_other_base_urls() {
        let cache = PageCache::default();
        cache
            .get_or_render("http://a", 1, || Ok((1, b"a".to_vec())))
            .unwrap();
        let (started_tx, started) = std::sync::mpsc::channel();
        let (release, release_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|scope| {
            let cache = &cache;
            scope.spawn(move || {
                cache
                    .get_or_render("http://slow", 1, || {
                        started_tx.send(()).unwrap();
                        release_rx.recv().unwrap();
                        Ok((1, b"slow".to_vec()))
                    })
                    .unwrap();
            });
            started.recv().unwrap();
            let (done_tx, done) = std::sync::mpsc::channel();
            scope.spawn(move || {
                let got = cache.get_or_render("http://a", 1, || Err("rendered again".into()));
                done_tx.send(got.map(|(g, gz)| (g, gunzip(&gz)))).unwrap();
            });
            let got = done.recv_timeout(std::time::Duration::from_secs(30));
            release.send(()).unwrap();
            assert_eq!(
                got.expect("held up by another render"),
                Ok((1, b"a".to_vec()))
            );
        });
    }

    #[test]
    fn a_failed_render_keeps_nothing() {
        let cache = PageCache::default();
        let failed = cache.get_or_render("http://a", 1, || Err("no listing".to_string()));
        assert_eq!(failed.unwrap_err(), "no listing");
        let (g, _) = cache
            .get_or_render("http://a", 1, || Ok((1, b"page".to_vec())))
            .unwrap();
        assert_eq!(g, 1);
    }
}
