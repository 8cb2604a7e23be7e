//! Retiring published versions and per-image retention policies:
//! `DELETE /v1/images/{name}/versions/{version}`, `/v1/images/{name}/retention` and
//! `/v1/images/{name}/retention/preview`. The rules live in `store/retire.rs` and
//! `store/retention.rs`; these handlers only authenticate, decode and answer.

use super::{App, HandlerResult, json_body, require};
use crate::clock::Timestamp;
use crate::http::{Request, Response, problem};
use crate::store::auth::ACTION_CONTENT_WRITE;
use crate::store::retention;
use crate::store::retire::{Found, RetiredVersion, Retirer};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PolicyRequest {
    keep_last: Option<i64>,
    keep_days: Option<i64>,
}

/// `DELETE /v1/images/{name}/versions/{version}`: retires a published version (204), or 409
/// naming the aliases that still point at it (or saying that it is a draft or publishing).
pub fn retire(app: &App, req: &mut Request, name: &str, version: &str) -> HandlerResult {
    let caller = require(app, req, ACTION_CONTENT_WRITE)?;
    app.store.retire_version(
        name,
        version,
        Retirer::Principal {
            principal_id: caller.principal_id,
        },
        app.retire_grace,
    )?;
    Ok(Response::no_content())
}

pub fn get(app: &App, name: &str) -> HandlerResult {
    Ok(Response::json(200, &app.store.retention(name)?))
}

pub fn put(app: &App, req: &mut Request, name: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let b: PolicyRequest = json_body(req)?;
    let policy = retention::policy(b.keep_last, b.keep_days)?;
    Ok(Response::json(200, &app.store.put_retention(name, policy)?))
}

pub fn delete(app: &App, req: &mut Request, name: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    app.store.delete_retention(name)?;
    Ok(Response::no_content())
}

/// `POST .../retention/preview`: with no body, what the stored policy would retire now; with a
/// policy body, what that policy would retire. Changes nothing.
pub fn preview(app: &App, req: &mut Request, name: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let policy = if req.content_length.unwrap_or(0) == 0 {
        None
    } else {
        let b: PolicyRequest = json_body(req)?;
        Some(retention::policy(b.keep_last, b.keep_days)?)
    };
    Ok(Response::json(
        200,
        &app.store
            .preview_retention(name, policy, Timestamp::now())?,
    ))
}

/// The answer for a direct download URL of a version retired longer ago than the grace.
pub(crate) fn gone(name: &str, r: &RetiredVersion) -> Response {
    problem(
        410,
        &format!(
            "catalog gone: version {:?} of image {name:?} was retired at {}; its files were downloadable until {}",
            r.version,
            r.retired_at.rfc3339(),
            r.downloadable_until.rfc3339()
        ),
    )
}

/// Unwraps what a download lookup found, answering 410 for a version past its grace.
pub(crate) fn served<T>(name: &str, found: Found<T>) -> Result<T, Response> {
    match found {
        Found::Served(x) => Ok(x),
        Found::Gone(r) => Err(gone(name, &r)),
    }
}
