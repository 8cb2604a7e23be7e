//! The v1 API: routing, authentication, JSON bodies and the handlers, one file per resource
//! family. Handlers are plain functions from a request to a response; errors become
//! problem+json through `From<Error> for Response`.

mod aliases;
mod auth;
mod cache;
mod catalog;
mod downloads;
mod page;
mod publish;
mod retention;
mod streams;
mod uploads;

pub use uploads::withholds_body;

use crate::error::Error;
use crate::http::{Request, Response, percent_decode, problem};
use crate::store::Store;
use crate::store::auth::Caller;
use crossbeam_channel::Sender;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use uuid::Uuid;

/// What every handler can reach.
pub struct App {
    pub store: Arc<Store>,
    pub upload_ttl: Duration,
    /// How long a retired version's files stay downloadable by their direct URLs.
    pub retire_grace: Duration,
    /// Publish jobs to run; the worker pool receives them.
    pub jobs: Sender<Uuid>,
    pub ready: AtomicBool,
    /// The Simple Streams documents and the catalog generation they were rendered at.
    pub streams_cache: std::sync::Mutex<Option<(u64, Arc<crate::streams::Rendered>)>>,
    /// Whether this server terminates TLS itself (the catalog page's commands then say
    /// `https://`).
    pub tls: bool,
}

/// The OpenAPI document served at `/openapi/v1.yaml`, compiled into the binary.
pub const OPENAPI_YAML: &str = include_str!("../../openapi/v1.yaml");

/// Largest JSON request body (API.md 1.2).
pub const MAX_JSON_BODY: u64 = 1024 * 1024;

type HandlerResult = Result<Response, Response>;

/// Wraps a domain error for `?` in handlers.
fn err(e: Error) -> Response {
    e.into()
}

/// The routes. Path parameters are percent-decoded single segments.
enum Route {
    Page,
    Healthz,
    Readyz,
    OpenApi,
    StreamsIndex,
    StreamsImages,
    Uploads,
    Upload(String),
    UploadPart(String, String),
    UploadComplete(String),
    UploadAbort(String),
    Blob(String),
    Images,
    Image(String),
    Versions(String),
    Version(String, String),
    Artifacts(String, String),
    Artifact(String, String, String),
    ArtifactDownload(String, String, String, Option<String>),
    Attachments(String, String, String),
    Attachment(String, String, String, String),
    AttachmentDownload(String, String, String, String, Option<String>),
    Publish(String, String),
    Job(String),
    JobRetry(String),
    Aliases(String),
    Alias(String, String),
    Ref(String, String),
    Retention(String),
    RetentionPreview(String),
    Roles,
    Principals,
    Principal(String),
    PrincipalRole(String, String),
    PrincipalTokens(String),
    Token(String),
}

fn parse_route(path: &str) -> Option<Route> {
    if path == "/" {
        return Some(Route::Page);
    }
    let rest = path.strip_prefix('/')?;
    let raw: Vec<&str> = rest.split('/').collect();
    let mut segs = Vec::with_capacity(raw.len());
    for s in &raw {
        segs.push(percent_decode(s)?);
    }
    if segs.iter().any(|s| s.is_empty()) {
        return None;
    }
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    let o = |x: &str| x.to_string();
    use Route::*;
    Some(match s.as_slice() {
        ["healthz"] => Healthz,
        ["readyz"] => Readyz,
        ["openapi", "v1.yaml"] => OpenApi,
        ["streams", "v1", "index.json"] => StreamsIndex,
        ["streams", "v1", "images.json"] => StreamsImages,
        ["v1", "uploads"] => Uploads,
        ["v1", "uploads", id] => Upload(o(id)),
        ["v1", "uploads", id, "parts", n] => UploadPart(o(id), o(n)),
        ["v1", "uploads", id, "complete"] => UploadComplete(o(id)),
        ["v1", "uploads", id, "abort"] => UploadAbort(o(id)),
        ["v1", "blobs", d] => Blob(o(d)),
        ["v1", "images"] => Images,
        ["v1", "images", n] => Image(o(n)),
        ["v1", "images", n, "versions"] => Versions(o(n)),
        ["v1", "images", n, "versions", v] => Version(o(n), o(v)),
        ["v1", "images", n, "versions", v, "artifacts"] => Artifacts(o(n), o(v)),
        ["v1", "images", n, "versions", v, "artifacts", a] => Artifact(o(n), o(v), o(a)),
        ["v1", "images", n, "versions", v, "artifacts", a, "download"] => {
            ArtifactDownload(o(n), o(v), o(a), None)
        }
        [
            "v1",
            "images",
            n,
            "versions",
            v,
            "artifacts",
            a,
            "download",
            f,
        ] => ArtifactDownload(o(n), o(v), o(a), Some(o(f))),
        [
            "v1",
            "images",
            n,
            "versions",
            v,
            "artifacts",
            a,
            "attachments",
        ] => Attachments(o(n), o(v), o(a)),
        [
            "v1",
            "images",
            n,
            "versions",
            v,
            "artifacts",
            a,
            "attachments",
            t,
        ] => Attachment(o(n), o(v), o(a), o(t)),
        [
            "v1",
            "images",
            n,
            "versions",
            v,
            "artifacts",
            a,
            "attachments",
            t,
            "download",
        ] => AttachmentDownload(o(n), o(v), o(a), o(t), None),
        [
            "v1",
            "images",
            n,
            "versions",
            v,
            "artifacts",
            a,
            "attachments",
            t,
            "download",
            f,
        ] => AttachmentDownload(o(n), o(v), o(a), o(t), Some(o(f))),
        ["v1", "images", n, "versions", v, "publish"] => Publish(o(n), o(v)),
        ["v1", "publish-jobs", id] => Job(o(id)),
        ["v1", "publish-jobs", id, "retry"] => JobRetry(o(id)),
        ["v1", "images", n, "aliases"] => Aliases(o(n)),
        ["v1", "images", n, "aliases", a] => Alias(o(n), o(a)),
        ["v1", "images", n, "refs", r] => Ref(o(n), o(r)),
        ["v1", "images", n, "retention"] => Retention(o(n)),
        ["v1", "images", n, "retention", "preview"] => RetentionPreview(o(n)),
        ["v1", "auth", "roles"] => Roles,
        ["v1", "auth", "principals"] => Principals,
        ["v1", "auth", "principals", id] => Principal(o(id)),
        ["v1", "auth", "principals", id, "roles", r] => PrincipalRole(o(id), o(r)),
        ["v1", "auth", "principals", id, "api-tokens"] => PrincipalTokens(o(id)),
        ["v1", "auth", "api-tokens", id] => Token(o(id)),
        _ => return None,
    })
}

/// Methods registered for a route (GET implies HEAD).
fn methods(route: &Route) -> &'static [&'static str] {
    use Route::*;
    match route {
        Uploads | Images => match route {
            Uploads => &["POST"],
            _ => &["GET", "POST"],
        },
        UploadPart(..) => &["PUT"],
        UploadComplete(..) | UploadAbort(..) | Publish(..) | JobRetry(..)
        | RetentionPreview(..) => &["POST"],
        Versions(..) | Artifacts(..) | Attachments(..) => match route {
            Attachments(..) => &["POST"],
            _ => &["GET", "POST"],
        },
        Artifact(..) | Version(..) => &["GET", "DELETE"],
        Attachment(..) | Token(..) => &["DELETE"],
        Alias(..) | Retention(..) => &["GET", "PUT", "DELETE"],
        Principals | PrincipalTokens(..) => &["GET", "POST"],
        PrincipalRole(..) => &["PUT", "DELETE"],
        _ => &["GET"],
    }
}

/// Routes a request. Unknown paths answer a plain-text 404, unregistered methods a plain-text
/// 405 with `Allow`; neither is a problem document.
pub fn handle(app: &App, req: &mut Request) -> Response {
    let Some(route) = parse_route(&req.path) else {
        return Response::text(404, "404 page not found\n");
    };
    let allowed = methods(&route);
    let method = if req.method == "HEAD" && allowed.contains(&"GET") {
        "GET".to_string()
    } else {
        req.method.clone()
    };
    if !allowed.contains(&method.as_str()) {
        let mut allow: Vec<&str> = allowed.to_vec();
        if allow.contains(&"GET") {
            allow.insert(allow.iter().position(|m| *m == "GET").unwrap() + 1, "HEAD");
        }
        return Response::text(405, "Method Not Allowed\n").header("Allow", allow.join(", "));
    }
    let policy = cache::policy(&route);
    // Every write that stores something leaves the disk reserve alone: while the disk is too
    // full, it is refused with 507 before its body is read. Part uploads are admitted by
    // their declared length in their handler, and completing them only records what their
    // admission already counted; aborts and deletes free space. Those always run.
    let admitted = if matches!(method.as_str(), "POST" | "PUT")
        && !matches!(
            route,
            Route::UploadPart(..) | Route::UploadAbort(..) | Route::UploadComplete(..)
        ) {
        app.store.admit(MAX_JSON_BODY).map(drop)
    } else {
        Ok(())
    };
    let response = match admitted {
        Err(e) => e.into(),
        Ok(()) => match dispatch(app, req, route, &method) {
            Ok(r) | Err(r) => r,
        },
    };
    cache::apply(policy, req, method == "GET", response)
}

fn dispatch(app: &App, req: &mut Request, route: Route, method: &str) -> HandlerResult {
    use Route::*;
    match (route, method) {
        (Page, _) => Ok(page::serve(app, req)),
        (Healthz, _) => Ok(Response::no_content()),
        // Ready means able to take writes too: not starting or stopping, the database open
        // for writing (not recovering, not read-only) and room left beyond the disk reserve.
        (Readyz, _) => Ok(
            if app.ready.load(Ordering::SeqCst) && app.store.can_write() {
                Response::no_content()
            } else {
                Response::text(503, "Service Unavailable\n")
            },
        ),
        (OpenApi, _) => Ok(Response::bytes(
            200,
            "application/yaml",
            OPENAPI_YAML.as_bytes().to_vec(),
        )),
        (StreamsIndex, _) => Ok(streams::serve(app, req, streams::Which::Index)),
        (StreamsImages, _) => Ok(streams::serve(app, req, streams::Which::Images)),
        (Uploads, _) => uploads::begin(app, req),
        (Upload(id), _) => uploads::get(app, &id),
        (UploadPart(id, n), _) => uploads::put_part(app, req, &id, &n),
        (UploadComplete(id), _) => uploads::complete(app, req, &id),
        (UploadAbort(id), _) => uploads::abort(app, req, &id),
        (Blob(d), _) => downloads::blob(app, req, &d),
        (Images, "GET") => catalog::list_images(app),
        (Images, _) => catalog::create_image(app, req),
        (Image(n), _) => catalog::get_image(app, &n),
        (Versions(n), "GET") => catalog::list_versions(app, &n),
        (Versions(n), _) => catalog::create_version(app, req, &n),
        (Version(n, v), "DELETE") => retention::retire(app, req, &n, &v),
        (Version(n, v), _) => catalog::manifest(app, &n, &v),
        (Artifacts(n, v), "GET") => catalog::list_artifacts(app, &n, &v),
        (Artifacts(n, v), _) => catalog::add_artifact(app, req, &n, &v),
        (Artifact(n, v, a), "GET") => catalog::get_artifact(app, &n, &v, &a),
        (Artifact(n, v, a), _) => catalog::delete_artifact(app, req, &n, &v, &a),
        (ArtifactDownload(n, v, a, f), _) => {
            downloads::artifact(app, req, &n, &v, &a, f.as_deref())
        }
        (Attachments(n, v, a), _) => catalog::add_attachment(app, req, &n, &v, &a),
        (Attachment(n, v, a, t), _) => catalog::delete_attachment(app, req, &n, &v, &a, &t),
        (AttachmentDownload(n, v, a, t, f), _) => {
            downloads::attachment(app, req, &n, &v, &a, &t, f.as_deref())
        }
        (Publish(n, v), _) => publish::publish(app, req, &n, &v),
        (Job(id), _) => publish::get_job(app, req, &id),
        (JobRetry(id), _) => publish::retry(app, req, &id),
        (Aliases(n), _) => aliases::list(app, &n),
        (Alias(n, a), "GET") => aliases::get(app, &n, &a),
        (Alias(n, a), "PUT") => aliases::put(app, req, &n, &a),
        (Alias(n, a), _) => aliases::delete(app, req, &n, &a),
        (Ref(n, r), _) => catalog::resolve_ref(app, &n, &r),
        (Retention(n), "GET") => retention::get(app, &n),
        (Retention(n), "PUT") => retention::put(app, req, &n),
        (Retention(n), _) => retention::delete(app, req, &n),
        (RetentionPreview(n), _) => retention::preview(app, req, &n),
        (Roles, _) => auth::roles(app, req),
        (Principals, "GET") => auth::list_principals(app, req),
        (Principals, _) => auth::create_principal(app, req),
        (Principal(id), _) => auth::get_principal(app, req, &id),
        (PrincipalRole(id, r), m) => auth::set_role(app, req, &id, &r, m == "PUT"),
        (PrincipalTokens(id), "GET") => auth::list_tokens(app, req, &id),
        (PrincipalTokens(id), _) => auth::issue_token(app, req, &id),
        (Token(id), _) => auth::revoke_token(app, req, &id),
    }
}

/// Authenticates the bearer token and checks the action. Runs before any validation.
pub(crate) fn require(app: &App, req: &Request, action: &str) -> Result<Caller, Response> {
    let unauthorized = || problem(401, "invalid bearer token").header("WWW-Authenticate", "Bearer");
    let header = req.header("Authorization").ok_or_else(unauthorized)?;
    let mut fields = header.split_ascii_whitespace();
    let (Some(scheme), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(unauthorized());
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized());
    }
    let caller = app
        .store
        .authenticate(token)
        .map_err(err)?
        .ok_or_else(unauthorized)?;
    if !caller.actions.contains(&action) {
        return Err(problem(
            403,
            &format!("principal is not authorized for action {action}"),
        ));
    }
    Ok(caller)
}

/// Reads and decodes a JSON body under the strict rules of API.md 1.2.
pub(crate) fn json_body<T: DeserializeOwned>(req: &mut Request) -> Result<T, Response> {
    let bad = |m: &str| problem(400, &format!("invalid JSON request body: {m}"));
    if req.content_length.is_some_and(|n| n > MAX_JSON_BODY) {
        return Err(bad("request body too large (limit 1048576 bytes)"));
    }
    let mut buf = Vec::new();
    req.body
        .take(MAX_JSON_BODY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| bad(&format!("reading body: {e}")))?;
    if buf.len() as u64 > MAX_JSON_BODY {
        return Err(bad("request body too large (limit 1048576 bytes)"));
    }
    let mut de = serde_json::Deserializer::from_slice(&buf);
    let Object(value) = Object::<T>::deserialize(&mut de).map_err(|e| bad(&json_message(&e)))?;
    de.end().map_err(|_| bad("multiple JSON values"))?;
    Ok(value)
}

/// A request struct that must arrive as a JSON object. serde's derived structs also accept a
/// JSON array of their members in declaration order (so `[]` or `["sha256:..", 5]` would
/// decode); the wire contract, like the Go decoder it mirrors, treats any non-object as a
/// wrong JSON type (400). Use it for every struct in a request body, nested ones included.
pub(crate) struct Object<T>(pub T);

impl<'de, T: DeserializeOwned> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::deserialize(d)?;
        T::deserialize(serde_json::Value::Object(map))
            .map(Object)
            .map_err(D::Error::custom)
    }
}

/// Decodes an integer member of a request body. JSON has one number type, and JSON Schema's
/// `integer` includes integral values written with a fraction or an exponent (`473.0`, `4.73e2`),
/// which clients and generators emit; they are accepted as that integer. A non-integral number
/// (`473.5`) or one outside `i64` stays a wrong type (400). Use it on every integer member of a
/// request struct: `#[serde(deserialize_with = "super::integer")]`.
pub(crate) fn integer<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    struct Integer;
    impl serde::de::Visitor<'_> for Integer {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<i64, E> {
            // 2^63 is exactly representable; every integral f64 below it fits in an i64.
            if v.fract() == 0.0 && v >= i64::MIN as f64 && v < 9_223_372_036_854_775_808.0 {
                Ok(v as i64)
            } else {
                Err(E::invalid_type(serde::de::Unexpected::Float(v), &self))
            }
        }
    }
    d.deserialize_any(Integer)
}

fn json_message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    if e.is_eof() && e.line() == 1 && e.column() == 0 {
        return "EOF".to_string();
    }
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some(name) = rest.split('`').next()
    {
        return format!("json: unknown field \"{name}\"");
    }
    msg
}

/// Parses a path UUID, answering 400 with `<what> must be a UUID`.
pub(crate) fn uuid_param(s: &str, what: &str) -> Result<Uuid, Response> {
    // Only the canonical hyphenated form (any case) is accepted.
    if s.len() != 36 {
        return Err(problem(400, &format!("{what} must be a UUID")));
    }
    Uuid::parse_str(s).map_err(|_| problem(400, &format!("{what} must be a UUID")))
}

/// The route template of a path, for bounded metric labels and logs (never the raw path).
pub fn route_template(path: &str) -> &'static str {
    use Route::*;
    let Some(route) = parse_route(path) else {
        return "unmatched";
    };
    match route {
        Page => "/",
        Healthz => "/healthz",
        Readyz => "/readyz",
        OpenApi => "/openapi/v1.yaml",
        StreamsIndex => "/streams/v1/index.json",
        StreamsImages => "/streams/v1/images.json",
        Uploads => "/v1/uploads",
        Upload(..) => "/v1/uploads/{upload_id}",
        UploadPart(..) => "/v1/uploads/{upload_id}/parts/{part_number}",
        UploadComplete(..) => "/v1/uploads/{upload_id}/complete",
        UploadAbort(..) => "/v1/uploads/{upload_id}/abort",
        Blob(..) => "/v1/blobs/{digest}",
        Images => "/v1/images",
        Image(..) => "/v1/images/{name}",
        Versions(..) => "/v1/images/{name}/versions",
        Version(..) => "/v1/images/{name}/versions/{version}",
        Artifacts(..) => "/v1/images/{name}/versions/{version}/artifacts",
        Artifact(..) => "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}",
        ArtifactDownload(..) => {
            "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/download"
        }
        Attachments(..) => {
            "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/attachments"
        }
        Attachment(..) => {
            "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/attachments/{attachment_id}"
        }
        AttachmentDownload(..) => {
            "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/attachments/{attachment_id}/download"
        }
        Publish(..) => "/v1/images/{name}/versions/{version}/publish",
        Job(..) => "/v1/publish-jobs/{job_id}",
        JobRetry(..) => "/v1/publish-jobs/{job_id}/retry",
        Aliases(..) => "/v1/images/{name}/aliases",
        Alias(..) => "/v1/images/{name}/aliases/{alias}",
        Ref(..) => "/v1/images/{name}/refs/{ref}",
        Retention(..) => "/v1/images/{name}/retention",
        RetentionPreview(..) => "/v1/images/{name}/retention/preview",
        Roles => "/v1/auth/roles",
        Principals => "/v1/auth/principals",
        Principal(..) => "/v1/auth/principals/{principal_id}",
        PrincipalRole(..) => "/v1/auth/principals/{principal_id}/roles/{role_id}",
        PrincipalTokens(..) => "/v1/auth/principals/{principal_id}/api-tokens",
        Token(..) => "/v1/auth/api-tokens/{token_id}",
    }
}
