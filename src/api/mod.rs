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
mod routes;
mod streams;
mod uploads;

pub use page::PageCache;
pub use uploads::withholds_body;

use crate::http::{Request, Response, problem};
use crate::store::Store;
use crate::store::auth::Caller;
use crossbeam_channel::Sender;
use routes::Admission;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
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
    /// The catalog page as last rendered for each of the latest base URLs.
    pub page_cache: PageCache,
    /// Whether this server terminates TLS itself (the catalog page's commands then say
    /// `https://`).
    pub tls: bool,
    /// The base URL the catalog page's commands show, when the operator configured one.
    pub public_url: Option<String>,
}

/// The OpenAPI document served at `/openapi/v1.yaml`, compiled into the binary.
pub const OPENAPI_YAML: &str = include_str!("../../openapi/v1.yaml");

/// Largest JSON request body (docs/api.md 1.2).
pub const MAX_JSON_BODY: u64 = 1024 * 1024;

type HandlerResult = Result<Response, Response>;

/// Routes a request through the route table. Unknown paths answer a plain-text 404,
/// undeclared methods a plain-text 405 with `Allow`; neither is a problem document.
pub fn handle(app: &App, req: &mut Request) -> Response {
    let Some((route, params)) = routes::find(&req.path) else {
        return Response::text(404, "404 page not found\n");
    };
    let Some((method, handler)) = route.handler(&req.method) else {
        return Response::text(405, "Method Not Allowed\n").header("Allow", route.allow());
    };
    // Every write that stores something leaves the disk reserve alone: while the disk is too
    // full, it is refused with 507 before its body is read. Routes whose handler admits its
    // own writes, or whose writes only free space or record what was admitted already, are
    // marked so in the table; deletes always run.
    let admitted = if matches!(method, "POST" | "PUT") && route.admission == Admission::JsonBody {
        app.store.admit(MAX_JSON_BODY).map(drop)
    } else {
        Ok(())
    };
    let response = match admitted {
        Err(e) => e.into(),
        Ok(()) => match handler(app, req, &params) {
            Ok(r) | Err(r) => r,
        },
    };
    cache::apply(route.cache, req, method == "GET", response)
}

/// The route template of a path, for bounded metric labels and logs (never the raw path).
pub fn route_template(path: &str) -> &'static str {
    routes::find(path).map_or("unmatched", |(route, _)| route.template)
}

/// Authenticates the bearer token and checks the action. Runs before any validation.
pub(crate) fn require(app: &App, req: &Request, action: &str) -> Result<Caller, Response> {
    let refuse = |detail| problem(401, detail).header("WWW-Authenticate", "Bearer");
    let unauthorized = || refuse("invalid bearer token");
    // A client that sent no credentials is told so: it is a different mistake from a token
    // that is malformed, unknown, expired or revoked.
    let header = req
        .header("Authorization")
        .ok_or_else(|| refuse("missing bearer token"))?;
    let mut fields = header.split_ascii_whitespace();
    let (Some(scheme), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(unauthorized());
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized());
    }
    let caller = app.store.authenticate(token)?.ok_or_else(unauthorized)?;
    if !caller.actions.contains(&action) {
        return Err(problem(
            403,
            &format!("principal is not authorized for action {action}"),
        ));
    }
    Ok(caller)
}

/// Reads and decodes a JSON body under the strict rules of docs/api.md 1.2.
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
