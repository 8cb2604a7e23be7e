//! `/v1/uploads`: begin, parts, complete, abort, get (docs/api.md 4.1, decisions 2, 3 and 18).

use super::{App, HandlerResult, Object, json_body, require, uuid_param};
use crate::http::{Request, Response, problem};
use crate::store::Store;
use crate::store::auth::ACTION_CONTENT_WRITE;
use crate::store::uploads::{BeginUpload, FeedError, MAX_PART_SIZE};
use serde::Deserialize;
use std::io::Read;
use uuid::Uuid;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CompletePart {
    #[serde(deserialize_with = "crate::model::integer")]
    number: i64,
    etag: String,
    #[serde(deserialize_with = "crate::model::integer")]
    size_bytes: i64,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CompleteUploadRequest {
    parts: Vec<Object<CompletePart>>,
    /// The blob's digest, for a session begun without one (docs/api.md, decision 18).
    digest: Option<String>,
}

pub fn begin(app: &App, req: &mut Request) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let begin: BeginUpload = json_body(req)?;
    let (session, fresh) = app.store.begin_upload(begin, app.upload_ttl)?;
    Ok(Response::json(if fresh { 201 } else { 200 }, &session))
}

pub fn get(app: &App, id: &str) -> HandlerResult {
    let id = uuid_param(id, "upload id")?;
    Ok(Response::json(200, &app.store.upload(id)?))
}

/// Whether the front door withholds a request's body from the request server: only a part's,
/// which goes straight into the store (see `hop`). Every other body is small JSON, relayed.
pub fn withholds_body(method: &str, path: &str) -> bool {
    method == "PUT" && super::route_template(path) == "/v1/uploads/{upload_id}/parts/{part_number}"
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
    app.store.check_accepts_parts(id)?;
    // Refuse with 507 before reading a byte when the part would eat into the disk reserve;
    // the claim holds its space against concurrent uploads until this part is stored (it
    // moves into the receiver, which may run after this handler has returned).
    let claim = app.store.admit_owned(length)?;
    let store = app.store.clone();
    let receive = move |body: &mut dyn Read| -> Response {
        let _claim = claim;
        match store_part(&store, id, number as u32, length, body) {
            Ok(r) | Err(r) => r,
        }
    };
    if req.body_withheld {
        // The front door reads the body from the client and runs the receiver with it.
        return Ok(Response::receive(Box::new(receive)));
    }
    Ok(receive(req.body))
}

/// Streams a part body into the store through the part writer's pipeline and answers with the
/// part: memory per request is a few chunk buffers, and each chunk is committed in its own short
/// transaction while the next one is read from the socket.
fn store_part(
    store: &Store,
    id: Uuid,
    number: u32,
    length: u64,
    body: &mut dyn Read,
) -> HandlerResult {
    let mut writer = store.part_writer(id, number);
    writer.write_from(body, length).map_err(|e| match e {
        FeedError::Body { error, missing } => problem(
            400,
            &format!("reading part body: {error} ({missing} bytes missing)"),
        ),
        FeedError::Store(e) => e.into(),
    })?;
    let part = writer.finish()?;
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
    let session = app
        .store
        .complete_upload(id, &listed, body.digest.as_deref())?;
    Ok(Response::json(200, &session))
}

pub fn abort(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(id, "upload id")?;
    Ok(Response::json(200, &app.store.abort_upload(id)?))
}
