//! `/v1/images/{name}/aliases` (docs/api.md 4.5). Aliases are mutable pointers to published versions.

use super::{App, HandlerResult, json_body, require};
use crate::http::{Request, Response};
use crate::store::auth::ACTION_CONTENT_WRITE;
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct PutAliasRequest {
    version: String,
}

#[derive(Serialize)]
struct AliasList<T> {
    aliases: Vec<T>,
}

pub fn list(app: &App, name: &str) -> HandlerResult {
    Ok(Response::json(
        200,
        &AliasList {
            aliases: app.store.list_aliases(name)?,
        },
    ))
}

pub fn get(app: &App, name: &str, alias: &str) -> HandlerResult {
    Ok(Response::json(200, &app.store.alias(name, alias)?))
}

pub fn put(app: &App, req: &mut Request, name: &str, alias: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let b: PutAliasRequest = json_body(req)?;
    Ok(Response::json(
        200,
        &app.store.put_alias(name, alias, &b.version)?,
    ))
}

pub fn delete(app: &App, req: &mut Request, name: &str, alias: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    app.store.delete_alias(name, alias)?;
    Ok(Response::no_content())
}
