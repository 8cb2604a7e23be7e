//! Downloads of blobs, artifacts and attachments with the HTTP semantics of docs/api.md section 6:
//! strong ETags, conditional requests, single ranges, HEAD, and the trailing file-name route
//! with `Content-Disposition` of docs/api.md, decision 6. Bytes stream from redb and every chunk is verified
//! before it is sent.

use super::{App, HandlerResult, uuid_param};
use crate::clock::Timestamp;
use crate::digest::Digest;
use crate::http::{
    Body, RangeOutcome, Request, Response, if_range_allows, not_modified, parse_range, problem,
};
use crate::store::blobs::BlobRecord;
use crate::validate;

/// What is served and how it is described.
struct Representation {
    digest: Digest,
    content_type: String,
    last_modified: Timestamp,
    filename: Option<String>,
}

/// The blob's record (404 when it does not exist). Its bytes are opened by the front door,
/// which streams them, in one snapshot with the record it checks again there.
fn load_blob(app: &App, digest: &Digest) -> Result<BlobRecord, Response> {
    app.store
        .blob(digest.as_bytes())?
        .ok_or_else(|| problem(404, &format!("blob not found: {digest}")))
}

/// Answers for a representation whose blob record was already loaded.
fn serve(req: &Request, rep: Representation, size: u64) -> HandlerResult {
    let etag = format!("\"{}\"", rep.digest);
    let mut base = Response::new(200)
        .header("ETag", etag.clone())
        .header("Last-Modified", rep.last_modified.http_date())
        .header("Cache-Control", "public, max-age=31536000, immutable")
        .header("Accept-Ranges", "bytes");
    if not_modified(
        req.header("If-None-Match"),
        req.header("If-Modified-Since"),
        &etag,
        rep.last_modified,
    ) {
        base.status = 304;
        return Ok(base);
    }
    if let Some(name) = &rep.filename {
        base = base.header(
            "Content-Disposition",
            format!("attachment; filename=\"{name}\""),
        );
    }
    let range = if if_range_allows(req.header("If-Range"), &etag, rep.last_modified) {
        parse_range(req.header("Range"), size)
    } else {
        RangeOutcome::Full
    };
    let (start, end) = match range {
        RangeOutcome::Full => (0, size),
        RangeOutcome::Partial(s, e) => {
            base.status = 206;
            base = base.header("Content-Range", format!("bytes {s}-{e}/{size}"));
            (s, e + 1)
        }
        RangeOutcome::Unsatisfiable(detail) => {
            return Err(problem(416, detail).header("Content-Range", format!("bytes */{size}")));
        }
    };
    base = base.header("Content-Type", rep.content_type);
    base.content_length = Some(end - start);
    base.body = Body::Blob {
        digest: *rep.digest.as_bytes(),
        start,
        end,
    };
    Ok(base)
}

pub fn blob(app: &App, req: &Request, digest: &str) -> HandlerResult {
    let digest = Digest::parse(digest).ok_or_else(|| {
        problem(
            400,
            &format!("upload invalid input: {}", validate::DIGEST_RULE),
        )
    })?;
    let record = load_blob(app, &digest)?;
    let rep = Representation {
        digest,
        content_type: record
            .media_type
            .unwrap_or_else(|| "application/octet-stream".to_string()),
        last_modified: record.verified_at,
        filename: None,
    };
    serve(req, rep, record.size)
}

fn check_filename(given: Option<&str>, canonical: &str) -> Result<(), Response> {
    match given {
        Some(f) if f != canonical => Err(problem(
            404,
            &format!("catalog not found: file name {f:?} (expected {canonical:?})"),
        )),
        _ => Ok(()),
    }
}

pub fn artifact(
    app: &App,
    req: &Request,
    name: &str,
    version: &str,
    artifact: &str,
    filename: Option<&str>,
) -> HandlerResult {
    let id = uuid_param(artifact, "artifact id")?;
    // A retired version's files stay downloadable here for the grace period.
    let found = app
        .store
        .artifact_for_download(name, version, id, Timestamp::now())?;
    let a = super::retention::served(name, found)?;
    let canonical = validate::artifact_file_name(&a.format);
    check_filename(filename, &canonical)?;
    let record = load_blob(app, &a.primary_blob_digest)?;
    let rep = Representation {
        digest: a.primary_blob_digest,
        content_type: a.primary_media_type,
        last_modified: a.updated_at,
        filename: Some(canonical),
    };
    serve(req, rep, record.size)
}

pub fn attachment(
    app: &App,
    req: &Request,
    name: &str,
    version: &str,
    artifact: &str,
    attachment: &str,
    filename: Option<&str>,
) -> HandlerResult {
    let artifact = uuid_param(artifact, "artifact id")?;
    let attachment = uuid_param(attachment, "attachment id")?;
    let found =
        app.store
            .attachment_for_download(name, version, artifact, attachment, Timestamp::now())?;
    let att = super::retention::served(name, found)?;
    check_filename(filename, &att.name)?;
    let record = load_blob(app, &att.blob_digest)?;
    let rep = Representation {
        digest: att.blob_digest,
        content_type: att.media_type,
        last_modified: att.updated_at,
        filename: Some(att.name),
    };
    serve(req, rep, record.size)
}
