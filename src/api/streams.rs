//! `GET|HEAD /streams/v1/index.json` and `/streams/v1/images.json`: the Incus Simple Streams
//! documents, anonymous, with a strong `ETag`, `Cache-Control: no-cache` and `If-None-Match`.
//!
//! Each document is served gzip-compressed to clients that accept it (`Vary:
//! Accept-Encoding`; the gzip representation has its own tag), plain otherwise.
//!
//! The rendered pair is cached per catalog generation. Every change a consumer can see (a
//! publish, an alias moved or deleted) bumps the generation in the same transaction, so an
//! unchanged catalog costs one small read transaction per request, and a changed one is
//! rendered once, by the first request that notices.

use super::App;
use crate::http::{Request, Response, not_modified, problem};
use crate::log;
use crate::streams::{Document, Rendered, render};
use std::sync::Arc;

/// Which of the two documents a route serves.
#[derive(Clone, Copy)]
pub enum Which {
    Index,
    Images,
}

pub fn serve(app: &App, req: &Request, which: Which) -> Response {
    let rendered = match current(app) {
        Ok(r) => r,
        Err(detail) => return problem(500, &detail),
    };
    let doc: &Document = match which {
        Which::Index => &rendered.index,
        Which::Images => &rendered.images,
    };
    let gzip = accepts_gzip(req.header("Accept-Encoding"));
    let etag = if gzip { &doc.gzip_etag } else { &doc.etag };
    // If-Modified-Since is deliberately not consulted: the documents carry no date, only
    // the entity tag, so `If-None-Match` alone decides.
    if not_modified(
        req.header("If-None-Match"),
        None,
        etag,
        crate::clock::Timestamp(0),
    ) {
        return Response::new(304)
            .header("ETag", etag.clone())
            .header("Cache-Control", "no-cache")
            .header("Vary", "Accept-Encoding");
    }
    let body = if gzip { &doc.gzip } else { &doc.body };
    let mut resp = Response::bytes(200, "application/json", body.clone())
        .header("ETag", etag.clone())
        .header("Cache-Control", "no-cache")
        .header("Vary", "Accept-Encoding");
    if gzip {
        resp = resp.header("Content-Encoding", "gzip");
    }
    resp
}

/// Whether an `Accept-Encoding` value accepts gzip: `gzip`, `x-gzip` or `*` listed without
/// `q=0`. No header means identity only (RFC 9110 allows any coding then, but a client that
/// says nothing is safest served the plain document).
pub(super) fn accepts_gzip(header: Option<&str>) -> bool {
    let Some(h) = header else {
        return false;
    };
    let mut gzip = None;
    let mut star = None;
    for item in h.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
            .filter_map(|q| q.trim().parse::<f32>().ok())
            .next()
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => gzip = Some(q > 0.0),
            "*" => star = Some(q > 0.0),
            _ => {}
        }
    }
    gzip.or(star).unwrap_or(false)
}

/// The documents for the current generation, rendered now if the cache is stale.
fn current(app: &App) -> Result<Arc<Rendered>, String> {
    let generation = app.store.generation().map_err(|e| e.detail)?;
    // A panic while rendering poisons the lock; the slot is still a valid cache (it is only
    // replaced whole), so keep using it.
    let mut slot = app
        .streams_cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // A pair rendered by another request at a newer generation than the one read above is at
    // least as fresh, so it serves too.
    if let Some((g, rendered)) = slot.as_ref()
        && *g >= generation
    {
        return Ok(rendered.clone());
    }
    // Rendering happens under the lock on purpose: requests that arrive meanwhile need the
    // same new pair, and waiting for it is cheaper than rendering it once each.
    let snapshot = app.store.streams_snapshot().map_err(|e| e.detail)?;
    let rendered = Arc::new(render(&snapshot).map_err(|e| e.detail)?);
    for w in &rendered.warnings {
        log::warn(w);
    }
    // The snapshot may be newer than the generation read above; it is keyed by its own
    // generation, so the next request at that generation is a cache hit.
    *slot = Some((rendered.generation, rendered.clone()));
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::accepts_gzip;

    #[test]
    fn accept_encoding_negotiation() {
        for (h, want) in [
            (None, false),
            (Some(""), false),
            (Some("gzip"), true),
            (Some("gzip, deflate, br"), true),
            (Some("deflate, GZIP;q=0.5"), true),
            (Some("x-gzip"), true),
            (Some("gzip;q=0"), false),
            (Some("gzip; q=0.0, *"), false),
            (Some("*"), true),
            (Some("*;q=0"), false),
            (Some("identity"), false),
            (Some("br"), false),
        ] {
            assert_eq!(accepts_gzip(h), want, "{h:?}");
        }
    }
}
