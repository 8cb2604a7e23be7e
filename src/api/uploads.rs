//! `/v1/uploads`: begin, parts, complete, abort, get (docs/api.md 4.1, decisions 2 and 3).

use super::{App, HandlerResult, Object, err, json_body, require, uuid_param};
use crate::http::{Request, Response, problem};
use crate::store::auth::ACTION_CONTENT_WRITE;
use crate::store::uploads::{BeginUpload, FeedError, MAX_PART_SIZE};
use crate::validate;
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct BeginUploadRequest {
    expected_digest: String,
    #[serde(deserialize_with = "super::integer")]
    expected_size_bytes: i64,
    media_type_hint: Option<String>,
    filename_hint: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CompletePart {
    #[serde(deserialize_with = "super::integer")]
    number: i64,
    etag: String,
    #[serde(deserialize_with = "super::integer")]
    size_bytes: i64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CompleteUploadRequest {
    parts: Vec<Object<CompletePart>>,
}

fn upload_invalid(msg: &str) -> Response {
    problem(400, &format!("upload invalid input: {msg}"))
}

pub fn begin(app: &App, req: &mut Request) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let body: BeginUploadRequest = json_body(req)?;
    if !validate::digest(&body.expected_digest) {
        return Err(upload_invalid(
            "digest must match sha256:<64 lowercase hex chars>",
        ));
    }
    if body.expected_size_bytes < 0 {
        return Err(upload_invalid("expected size must be non-negative"));
    }
    if body
        .media_type_hint
        .as_deref()
        .is_some_and(|h| !validate::non_blank(h))
    {
        return Err(upload_invalid("media type hint is required"));
    }
    if body
        .filename_hint
        .as_deref()
        .is_some_and(|h| !validate::non_blank(h))
    {
        return Err(upload_invalid("filename hint is required"));
    }
    let (session, fresh) = app
        .store
        .begin_upload(
            BeginUpload {
                expected_digest: body.expected_digest,
                expected_size_bytes: body.expected_size_bytes,
                media_type_hint: body.media_type_hint,
                filename_hint: body.filename_hint,
            },
            app.upload_ttl,
        )
        .map_err(err)?;
    Ok(Response::json(if fresh { 201 } else { 200 }, &session))
}

pub fn get(app: &App, id: &str) -> HandlerResult {
    let id = uuid_param(id, "upload id")?;
    Ok(Response::json(200, &app.store.upload(id).map_err(err)?))
}

pub fn put_part(app: &App, req: &mut Request, id: &str, number: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(id, "upload id")?;
    let number: i64 = number
        .parse()
        .map_err(|_| problem(400, "part number must be an integer"))?;
    if !(1..=10000).contains(&number) {
        return Err(problem(400, "part number must be between 1 and 10000"));
    }
    let Some(length) = req.content_length else {
        return Err(problem(400, "content length is required"));
    };
    if length > MAX_PART_SIZE {
        return Err(problem(
            400,
            &format!("part size must be at most {MAX_PART_SIZE} bytes"),
        ));
    }
    app.store.check_accepts_parts(id).map_err(err)?;
    // Refuse with 507 before reading a byte when the part would eat into the disk reserve;
    // the claim holds its space against concurrent uploads until this part is stored.
    let _claim = app.store.admit(length).map_err(err)?;

    // Stream the body through the part writer's pipeline: memory per request is a few chunk
    // buffers, and each chunk is committed in its own short transaction while the next one is
    // read from the socket.
    let mut writer = app.store.part_writer(id, number as u32);
    writer.write_from(req.body, length).map_err(|e| match e {
        FeedError::Body { error, missing } => problem(
            400,
            &format!("reading part body: {error} ({missing} bytes missing)"),
        ),
        FeedError::Store(e) => err(e),
    })?;
    let part = writer.finish().map_err(err)?;
    Ok(Response::json(200, &part))
}

pub fn complete(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(id, "upload id")?;
    let body: CompleteUploadRequest = json_body(req)?;
    let listed: Vec<(u32, String, i64)> = body
        .parts
        .into_iter()
        .map(|Object(p)| {
            let n = if (1..=10000).contains(&p.number) {
                p.number as u32
            } else {
                0
            };
            (n, p.etag, p.size_bytes)
        })
        .collect();
    let session = app.store.complete_upload(id, &listed).map_err(err)?;
    Ok(Response::json(200, &session))
}

pub fn abort(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(id, "upload id")?;
    Ok(Response::json(
        200,
        &app.store.abort_upload(id).map_err(err)?,
    ))
}
