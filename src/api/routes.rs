//! The route table: every route of the API declared once, with its path template, the methods
//! it answers and their handlers, its cache policy and whether its writes must pass the disk
//! admission. Dispatch, the 405's `Allow` header, the route label of logs and metrics, the
//! caching headers and the admission check all read this one table, so a route cannot be
//! served without also being labelled, cached and admitted as declared here. A unit test
//! compares the table with the paths of `openapi/v1.yaml`.

use super::cache::Policy;
use super::{
    App, HandlerResult, aliases, auth, catalog, downloads, page, publish, retention, streams,
    uploads,
};
use crate::http::{Request, Response, percent_decode};
use std::sync::atomic::Ordering;

/// A handler as the table calls it: the path parameters are the percent-decoded segments that
/// stand for the template's `{...}` placeholders, in order.
pub(super) type Handler = fn(&App, &mut Request, &[String]) -> HandlerResult;

/// Whether a route's `POST` and `PUT` requests are refused with 507 before their body is read
/// while the disk is too full (docs/api.md 1.2 bounds such a body at `MAX_JSON_BODY`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// The write stores a JSON document: it needs room for one.
    JsonBody,
    /// The handler admits the write itself (a part upload, by its declared length), or the
    /// write only records what an earlier admission counted or frees space.
    Handler,
}

pub(super) struct Route {
    /// The OpenAPI path template, also the bounded label of logs and metrics.
    pub template: &'static str,
    /// The methods and their handlers. `GET` implies `HEAD`, which runs the `GET` handler.
    pub methods: &'static [(&'static str, Handler)],
    pub cache: Policy,
    pub admission: Admission,
}

impl Route {
    /// The handler for `method`, with the method it runs as (`HEAD` runs as `GET`).
    pub fn handler(&self, method: &str) -> Option<(&'static str, Handler)> {
        let wanted = if method == "HEAD" { "GET" } else { method };
        self.methods
            .iter()
            .find(|(m, _)| *m == wanted)
            .map(|&(m, h)| (m, h))
    }

    /// The `Allow` header of a 405: the declared methods, with `HEAD` right after `GET`.
    pub fn allow(&self) -> String {
        let mut allow = Vec::new();
        for (m, _) in self.methods {
            allow.push(*m);
            if *m == "GET" {
                allow.push("HEAD");
            }
        }
        allow.join(", ")
    }
}

use Admission::{Handler as SelfAdmitted, JsonBody};
use Policy::{NoStore, Own, Private, Shared};

const ARTIFACT: &str = "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}";

/// Every route, in no particular order: no path matches two templates (a test checks).
pub(super) static ROUTES: &[Route] = &[
    Route {
        template: "/",
        methods: &[("GET", |app, req, _| Ok(page::serve(app, req)))],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/healthz",
        methods: &[("GET", |_, _, _| Ok(Response::no_content()))],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/readyz",
        methods: &[("GET", |app, _, _| Ok(readyz(app)))],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/openapi/v1.yaml",
        methods: &[("GET", |_, _, _| {
            Ok(Response::bytes(
                200,
                "application/yaml",
                super::OPENAPI_YAML.as_bytes().to_vec(),
            ))
        })],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/streams/v1/index.json",
        methods: &[("GET", |app, req, _| {
            Ok(streams::serve(app, req, streams::Which::Index))
        })],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/streams/v1/images.json",
        methods: &[("GET", |app, req, _| {
            Ok(streams::serve(app, req, streams::Which::Images))
        })],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/v1/uploads",
        methods: &[("POST", |app, req, _| uploads::begin(app, req))],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/uploads/{upload_id}",
        methods: &[("GET", |app, _, p| uploads::get(app, &p[0]))],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/uploads/{upload_id}/parts/{part_number}",
        methods: &[("PUT", |app, req, p| {
            uploads::put_part(app, req, &p[0], &p[1])
        })],
        cache: Private,
        admission: SelfAdmitted,
    },
    Route {
        template: "/v1/uploads/{upload_id}/complete",
        methods: &[("POST", |app, req, p| uploads::complete(app, req, &p[0]))],
        cache: Private,
        admission: SelfAdmitted,
    },
    Route {
        template: "/v1/uploads/{upload_id}/abort",
        methods: &[("POST", |app, req, p| uploads::abort(app, req, &p[0]))],
        cache: Private,
        admission: SelfAdmitted,
    },
    Route {
        template: "/v1/blobs/{digest}",
        methods: &[("GET", |app, req, p| downloads::blob(app, req, &p[0]))],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images",
        methods: &[
            ("GET", |app, _, _| catalog::list_images(app)),
            ("POST", |app, req, _| catalog::create_image(app, req)),
        ],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}",
        methods: &[("GET", |app, _, p| catalog::get_image(app, &p[0]))],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions",
        methods: &[
            ("GET", |app, _, p| catalog::list_versions(app, &p[0])),
            ("POST", |app, req, p| {
                catalog::create_version(app, req, &p[0])
            }),
        ],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}",
        methods: &[
            ("GET", |app, _, p| catalog::manifest(app, &p[0], &p[1])),
            ("DELETE", |app, req, p| {
                retention::retire(app, req, &p[0], &p[1])
            }),
        ],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/artifacts",
        methods: &[
            ("GET", |app, _, p| {
                catalog::list_artifacts(app, &p[0], &p[1])
            }),
            ("POST", |app, req, p| {
                catalog::add_artifact(app, req, &p[0], &p[1])
            }),
        ],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: ARTIFACT,
        methods: &[
            ("GET", |app, _, p| {
                catalog::get_artifact(app, &p[0], &p[1], &p[2])
            }),
            ("DELETE", |app, req, p| {
                catalog::delete_artifact(app, req, &p[0], &p[1], &p[2])
            }),
        ],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/download",
        methods: &[("GET", |app, req, p| {
            downloads::artifact(app, req, &p[0], &p[1], &p[2], None)
        })],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/download/{filename}",
        methods: &[("GET", |app, req, p| {
            downloads::artifact(app, req, &p[0], &p[1], &p[2], Some(&p[3]))
        })],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/attachments",
        methods: &[("POST", |app, req, p| {
            catalog::add_attachment(app, req, &p[0], &p[1], &p[2])
        })],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/attachments/{attachment_id}",
        methods: &[("DELETE", |app, req, p| {
            catalog::delete_attachment(app, req, &p[0], &p[1], &p[2], &p[3])
        })],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/attachments/{attachment_id}/download",
        methods: &[("GET", |app, req, p| {
            downloads::attachment(app, req, &p[0], &p[1], &p[2], &p[3], None)
        })],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/artifacts/{artifact_id}/attachments/{attachment_id}/download/{filename}",
        methods: &[("GET", |app, req, p| {
            downloads::attachment(app, req, &p[0], &p[1], &p[2], &p[3], Some(&p[4]))
        })],
        cache: Own,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/versions/{version}/publish",
        methods: &[("POST", |app, req, p| {
            publish::publish(app, req, &p[0], &p[1])
        })],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/publish-jobs/{job_id}",
        methods: &[("GET", |app, req, p| publish::get_job(app, req, &p[0]))],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/publish-jobs/{job_id}/retry",
        methods: &[("POST", |app, req, p| publish::retry(app, req, &p[0]))],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/aliases",
        methods: &[("GET", |app, _, p| aliases::list(app, &p[0]))],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/aliases/{alias}",
        methods: &[
            ("GET", |app, _, p| aliases::get(app, &p[0], &p[1])),
            ("PUT", |app, req, p| aliases::put(app, req, &p[0], &p[1])),
            ("DELETE", |app, req, p| {
                aliases::delete(app, req, &p[0], &p[1])
            }),
        ],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/refs/{ref}",
        methods: &[("GET", |app, _, p| catalog::resolve_ref(app, &p[0], &p[1]))],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/retention",
        methods: &[
            ("GET", |app, _, p| retention::get(app, &p[0])),
            ("PUT", |app, req, p| retention::put(app, req, &p[0])),
            ("DELETE", |app, req, p| retention::delete(app, req, &p[0])),
        ],
        cache: Shared,
        admission: JsonBody,
    },
    Route {
        template: "/v1/images/{name}/retention/preview",
        methods: &[("POST", |app, req, p| retention::preview(app, req, &p[0]))],
        cache: Private,
        admission: JsonBody,
    },
    Route {
        template: "/v1/auth/roles",
        methods: &[("GET", |app, req, _| auth::roles(app, req))],
        cache: NoStore,
        admission: JsonBody,
    },
    Route {
        template: "/v1/auth/principals",
        methods: &[
            ("GET", |app, req, _| auth::list_principals(app, req)),
            ("POST", |app, req, _| auth::create_principal(app, req)),
        ],
        cache: NoStore,
        admission: JsonBody,
    },
    Route {
        template: "/v1/auth/principals/{principal_id}",
        methods: &[("GET", |app, req, p| auth::get_principal(app, req, &p[0]))],
        cache: NoStore,
        admission: JsonBody,
    },
    Route {
        template: "/v1/auth/principals/{principal_id}/roles/{role_id}",
        methods: &[
            ("PUT", |app, req, p| {
                auth::set_role(app, req, &p[0], &p[1], true)
            }),
            ("DELETE", |app, req, p| {
                auth::set_role(app, req, &p[0], &p[1], false)
            }),
        ],
        cache: NoStore,
        admission: JsonBody,
    },
    Route {
        template: "/v1/auth/principals/{principal_id}/api-tokens",
        methods: &[
            ("GET", |app, req, p| auth::list_tokens(app, req, &p[0])),
            ("POST", |app, req, p| auth::issue_token(app, req, &p[0])),
        ],
        cache: NoStore,
        admission: JsonBody,
    },
    Route {
        template: "/v1/auth/api-tokens/{token_id}",
        methods: &[("DELETE", |app, req, p| auth::revoke_token(app, req, &p[0]))],
        cache: NoStore,
        admission: JsonBody,
    },
];

/// Ready means able to take writes too: not starting or stopping, the database open for
/// writing (not recovering, not read-only) and room left beyond the disk reserve.
fn readyz(app: &App) -> Response {
    if app.ready.load(Ordering::SeqCst) && app.store.can_write() {
        Response::no_content()
    } else {
        Response::text(503, "Service Unavailable\n")
    }
}

/// The segments of a path or template: none for `/`, else what lies between the slashes.
fn segments(path: &str) -> Option<Vec<&str>> {
    match path {
        "/" => Some(Vec::new()),
        _ => path.strip_prefix('/').map(|rest| rest.split('/').collect()),
    }
}

/// The parameters of `route` if the decoded segments of a path match its template.
fn params(route: &Route, decoded: &[String]) -> Option<Vec<String>> {
    let template = segments(route.template)?;
    if template.len() != decoded.len() {
        return None;
    }
    let mut params = Vec::new();
    for (t, s) in template.iter().zip(decoded) {
        if t.starts_with('{') {
            params.push(s.clone());
        } else if t != s {
            return None;
        }
    }
    Some(params)
}

/// The route a path names and its parameters. Each segment is percent-decoded on its own, so
/// an encoded `/` stays inside its segment; an empty segment or a malformed escape matches
/// nothing.
pub(super) fn find(path: &str) -> Option<(&'static Route, Vec<String>)> {
    let decoded: Vec<String> = segments(path)?
        .into_iter()
        .map(percent_decode)
        .collect::<Option<_>>()?;
    if decoded.iter().any(String::is_empty) {
        return None;
    }
    ROUTES
        .iter()
        .find_map(|route| Some((route, params(route, &decoded)?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// The paths of `openapi/v1.yaml` and their methods, read by a line scan: each path is a
    /// two-space-indented key of the `paths:` section and each method a four-space-indented one.
    fn documented() -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut current = None;
        let mut in_paths = false;
        for line in super::super::OPENAPI_YAML.lines() {
            if !line.starts_with(' ') && !line.is_empty() {
                in_paths = line == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                current = Some(format!("/{p}"));
                out.entry(format!("/{p}")).or_default();
            } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':'))
                && ["get", "head", "post", "put", "delete", "patch"].contains(&m)
                && let Some(p) = &current
            {
                out.get_mut(p).unwrap().insert(m.to_ascii_uppercase());
            }
        }
        out
    }

    #[test]
    fn table_matches_openapi() {
        let mut doc = documented();
        assert!(doc.len() >= 35, "{doc:?}");
        for methods in doc.values_mut() {
            if methods.contains("GET") {
                methods.insert("HEAD".into());
            }
        }
        let table: BTreeMap<String, BTreeSet<String>> = ROUTES
            .iter()
            .map(|r| {
                let mut methods: BTreeSet<String> =
                    r.methods.iter().map(|(m, _)| m.to_string()).collect();
                if methods.contains("GET") {
                    methods.insert("HEAD".into());
                }
                (r.template.to_string(), methods)
            })
            .collect();
        assert_eq!(table.len(), ROUTES.len(), "a template is declared twice");
        for (path, methods) in &doc {
            assert_eq!(table.get(path), Some(methods), "{path} in openapi/v1.yaml");
        }
        for path in table.keys() {
            assert!(doc.contains_key(path), "{path} is not in openapi/v1.yaml");
        }
    }

    /// Each template, with its placeholders filled in, matches its own route and no other, so
    /// the order of the table does not matter.
    #[test]
    fn templates_are_distinct() {
        for route in ROUTES {
            let sample: Vec<String> = segments(route.template)
                .unwrap()
                .iter()
                .map(|s| if s.starts_with('{') { "x" } else { s }.to_string())
                .collect();
            let matching: Vec<&str> = ROUTES
                .iter()
                .filter(|r| params(r, &sample).is_some())
                .map(|r| r.template)
                .collect();
            assert_eq!(matching, [route.template]);
        }
    }

    #[test]
    fn matching() {
        type Case<'a> = (&'a str, Option<(&'a str, &'a [&'a str])>);
        let cases: &[Case] = &[
            ("/", Some(("/", &[]))),
            ("/healthz", Some(("/healthz", &[]))),
            ("/healthz/", None),
            ("/v1/images/%69mg", Some(("/v1/images/{name}", &["img"]))),
            ("/v1/images/a%2Fb", Some(("/v1/images/{name}", &["a/b"]))),
            ("/v1/images/a%ZZb", None),
            ("/v1/images//versions", None),
            ("", None),
            ("/V1/images", None),
        ];
        for (path, want) in cases {
            let got = find(path).map(|(r, p)| (r.template, p));
            let want = want.map(|(t, p)| (t, p.iter().map(|s| s.to_string()).collect()));
            assert_eq!(got, want, "{path:?}");
        }
    }
}
