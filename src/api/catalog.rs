//! Images, versions, manifests, artifacts and attachments (docs/api.md 4.2 and 4.3).

use super::{App, HandlerResult, json_body, require, uuid_param};
use crate::http::{Request, Response};
use crate::store::auth::ACTION_CONTENT_WRITE;
use crate::store::catalog::{NewArtifact, NewAttachment};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CreateImageRequest {
    name: String,
    display_name: Option<String>,
    description: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CreateVersionRequest {
    version: String,
}

#[derive(Serialize)]
struct Images<T> {
    images: Vec<T>,
}
#[derive(Serialize)]
struct Versions<T> {
    versions: Vec<T>,
}
#[derive(Serialize)]
struct Artifacts<T> {
    artifacts: Vec<T>,
}

pub fn create_image(app: &App, req: &mut Request) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let b: CreateImageRequest = json_body(req)?;
    let image = app
        .store
        .create_image(&b.name, b.display_name, b.description)?;
    Ok(Response::json(201, &image))
}

pub fn list_images(app: &App) -> HandlerResult {
    Ok(Response::json(
        200,
        &Images {
            images: app.store.list_images()?,
        },
    ))
}

pub fn get_image(app: &App, name: &str) -> HandlerResult {
    Ok(Response::json(200, &app.store.published_image(name)?))
}

pub fn create_version(app: &App, req: &mut Request, name: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let b: CreateVersionRequest = json_body(req)?;
    Ok(Response::json(
        201,
        &app.store.create_version(name, &b.version)?,
    ))
}

pub fn list_versions(app: &App, name: &str) -> HandlerResult {
    Ok(Response::json(
        200,
        &Versions {
            versions: app.store.list_published_versions(name)?,
        },
    ))
}

pub fn manifest(app: &App, name: &str, version: &str) -> HandlerResult {
    Ok(Response::json(
        200,
        &app.store.manifest(name, version, false)?,
    ))
}

pub fn resolve_ref(app: &App, name: &str, reference: &str) -> HandlerResult {
    Ok(Response::json(
        200,
        &app.store.resolve_ref(name, reference)?,
    ))
}

pub fn list_artifacts(app: &App, name: &str, version: &str) -> HandlerResult {
    Ok(Response::json(
        200,
        &Artifacts {
            artifacts: app.store.published_artifacts(name, version)?,
        },
    ))
}

pub fn get_artifact(app: &App, name: &str, version: &str, artifact: &str) -> HandlerResult {
    let id = uuid_param(artifact, "artifact id")?;
    let (_, a) = app.store.published_artifact(name, version, id)?;
    Ok(Response::json(200, &a))
}

pub fn add_artifact(app: &App, req: &mut Request, name: &str, version: &str) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let new: NewArtifact = json_body(req)?;
    Ok(Response::json(
        201,
        &app.store.add_artifact(name, version, new)?,
    ))
}

pub fn delete_artifact(
    app: &App,
    req: &mut Request,
    name: &str,
    version: &str,
    artifact: &str,
) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(artifact, "artifact id")?;
    app.store.delete_artifact(name, version, id)?;
    Ok(Response::no_content())
}

pub fn add_attachment(
    app: &App,
    req: &mut Request,
    name: &str,
    version: &str,
    artifact: &str,
) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let id = uuid_param(artifact, "artifact id")?;
    let new: NewAttachment = json_body(req)?;
    Ok(Response::json(
        201,
        &app.store.add_attachment(name, version, id, new)?,
    ))
}

pub fn delete_attachment(
    app: &App,
    req: &mut Request,
    name: &str,
    version: &str,
    artifact: &str,
    attachment: &str,
) -> HandlerResult {
    require(app, req, ACTION_CONTENT_WRITE)?;
    let artifact = uuid_param(artifact, "artifact id")?;
    let attachment = uuid_param(attachment, "attachment id")?;
    app.store
        .delete_attachment(name, version, artifact, attachment)?;
    Ok(Response::no_content())
}
