//! `/v1/auth`: roles, principals, role assignments and API tokens (docs/api.md 4.6 and decision 9).

use super::{App, HandlerResult, json_body, require, uuid_param};
use crate::clock::Timestamp;
use crate::http::{Request, Response, problem};
use crate::model::PrincipalKind;
use crate::store::auth::{ACTION_AUTH_MANAGE, roles as all_roles};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct CreatePrincipalRequest {
    kind: String,
    display_name: String,
    attributes: Option<serde_json::Map<String, serde_json::Value>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct IssueTokenRequest {
    name: String,
    expires_at: String,
}

#[derive(Serialize)]
struct Roles<T> {
    roles: Vec<T>,
}
#[derive(Serialize)]
struct Principals<T> {
    principals: Vec<T>,
}
#[derive(Serialize)]
struct Tokens<T> {
    api_tokens: Vec<T>,
}

pub fn roles(app: &App, req: &mut Request) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    Ok(Response::json(200, &Roles { roles: all_roles() }))
}

pub fn list_principals(app: &App, req: &mut Request) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    Ok(Response::json(
        200,
        &Principals {
            principals: app.store.principals()?,
        },
    ))
}

pub fn create_principal(app: &App, req: &mut Request) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    let b: CreatePrincipalRequest = json_body(req)?;
    let kind = match b.kind.as_str() {
        "user" => PrincipalKind::User,
        "service" => PrincipalKind::Service,
        _ => {
            return Err(problem(
                400,
                "auth invalid input: kind must be user or service",
            ));
        }
    };
    let p = app
        .store
        .create_principal(kind, &b.display_name, b.attributes)?;
    Ok(Response::json(201, &p))
}

pub fn get_principal(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    let id = uuid_param(id, "principal id")?;
    Ok(Response::json(200, &app.store.principal(id)?))
}

pub fn set_role(app: &App, req: &mut Request, id: &str, role: &str, grant: bool) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    let id = uuid_param(id, "principal id")?;
    app.store.set_role(id, role, grant)?;
    Ok(Response::no_content())
}

pub fn list_tokens(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    let id = uuid_param(id, "principal id")?;
    Ok(Response::json(
        200,
        &Tokens {
            api_tokens: app.store.tokens_of(id)?,
        },
    ))
}

pub fn issue_token(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    let id = uuid_param(id, "principal id")?;
    let b: IssueTokenRequest = json_body(req)?;
    let expires_at = Timestamp::parse_rfc3339(&b.expires_at).ok_or_else(|| {
        problem(
            400,
            "auth invalid input: expires_at must be an RFC 3339 date-time",
        )
    })?;
    if expires_at <= Timestamp::now() {
        return Err(problem(
            400,
            "auth invalid input: expires_at must be in the future",
        ));
    }
    let token = app.store.issue_token(id, &b.name, expires_at)?;
    Ok(Response::json(201, &token))
}

pub fn revoke_token(app: &App, req: &mut Request, id: &str) -> HandlerResult {
    require(app, req, ACTION_AUTH_MANAGE)?;
    let id = uuid_param(id, "api token id")?;
    app.store.revoke_token(id)?;
    Ok(Response::no_content())
}
