//! The API's OpenAPI 3.1 description, served at `/openapi.json` (no token):
//! every operation of [`super::router`] with its request body's schema (the
//! handlers' own body types, `utoipa::ToSchema`), its answers, the bearer
//! scheme and, for every problem, the closed list of stable codes
//! ([`Code`]). Built once, from [`OPERATIONS`]; the test below fails when a
//! route of the router is missing here.
//!
//! Answers that are views built with `json!` are described as JSON objects;
//! problems are described exactly, since clients act on them.

use std::sync::LazyLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref, RefOr, Required, ResponseBuilder};
use utoipa::{PartialSchema, ToSchema};

use crate::domain::Code;

/// What an operation takes and answers.
#[derive(Clone, Copy)]
enum Body {
    None,
    /// A JSON body of this schema (the handler's own type).
    Json(fn() -> RefOr<Schema>, bool),
}

#[derive(Clone, Copy)]
enum Answer {
    /// A JSON object, with these statuses.
    Json(&'static [u16]),
    NoContent,
    /// `text/event-stream`.
    Events,
    Text,
    /// 200 with a body of this media type.
    Media(&'static str),
}

/// One operation: method, path (actions as `{id}:verb`), summary, body, answer, whether it needs a token.
struct Operation(HttpMethod, &'static str, &'static str, Body, Answer, bool);

fn schema<T: PartialSchema>() -> RefOr<Schema> {
    T::schema()
}

fn json_body<T: PartialSchema>() -> Body {
    Body::Json(schema::<T>, true)
}

fn optional_body<T: PartialSchema>() -> Body {
    Body::Json(schema::<T>, false)
}

fn any_object() -> RefOr<Schema> {
    ObjectBuilder::new().schema_type(SchemaType::Type(Type::Object)).into()
}

use super::{containers, nodes, registry, sessions, tokens};
use Answer::{Events, Json, Media, NoContent, Text};
use HttpMethod::{Delete, Get, Post};

/// Every operation of the router, in its order.
static OPERATIONS: LazyLock<Vec<Operation>> = LazyLock::new(|| {
    let ok = Json(&[200]);
    let created = Json(&[201, 202]);
    vec![
        Operation(Get, "/healthz", "Liveness: answers `ok`", Body::None, Text, false),
        Operation(Get, "/readyz", "Readiness: the store answers and a node is alive (else 503)", Body::None, Text, false),
        Operation(Get, "/metrics", "Prometheus metrics (OpenMetrics text; read)", Body::None, Media("application/openmetrics-text"), true),
        Operation(Get, "/ui", "The web dashboard", Body::None, Media("text/html"), false),
        Operation(Get, "/ui/", "The web dashboard", Body::None, Media("text/html"), false),
        Operation(Get, "/ui/{path}", "The dashboard's static files", Body::None, Media("*/*"), false),
        Operation(Get, "/openapi.json", "This description", Body::None, ok, false),
        Operation(Get, "/v1/sessions", "List sessions (filters: state, node, container, label=k=v; paged by cursor)", Body::None, ok, true),
        Operation(Post, "/v1/sessions", "Create a session (a sandbox, an agent, an ACP session)", json_body::<sessions::CreateSessionBody>(), created, true),
        Operation(Get, "/v1/sessions/{id}", "A session", Body::None, ok, true),
        Operation(Delete, "/v1/sessions/{id}", "Close a session (and its container with its last session)", Body::None, NoContent, true),
        Operation(Post, "/v1/sessions/{id}:prompt", "Start a turn", json_body::<sessions::PromptBody>(), Json(&[202]), true),
        Operation(Post, "/v1/sessions/{id}:cancel", "Cancel the running turn", optional_body::<sessions::CancelBody>(), Json(&[202]), true),
        Operation(Post, "/v1/sessions/{id}:set_mode", "Set the agent's mode", json_body::<sessions::SetModeBody>(), ok, true),
        Operation(Post, "/v1/sessions/{id}:set_config_option", "Set an agent config option", json_body::<sessions::SetConfigOptionBody>(), ok, true),
        Operation(Get, "/v1/sessions/{id}/events", "The session's events (SSE; Last-Event-ID or ?after= resumes)", Body::None, Events, true),
        Operation(Get, "/v1/runs/{id}", "A run (one turn)", Body::None, ok, true),
        Operation(Post, "/v1/sessions/{id}/permissions/{request_id}", "Answer the agent's permission request", json_body::<sessions::PermissionAnswer>(), NoContent, true),
        Operation(Get, "/v1/registry/agents", "The agent registry", Body::None, ok, true),
        Operation(Get, "/v1/registry/agents/{id}", "One registry agent", Body::None, ok, true),
        Operation(Post, "/v1/registry:sync", "Fetch the registry again: the configured source (write), or `source` (admin, or a source the operator allows)", optional_body::<registry::SyncBody>(), ok, true),
        Operation(Get, "/v1/containers", "List containers (filters: state, node, label=k=v; paged by cursor)", Body::None, ok, true),
        Operation(Post, "/v1/containers", "Create a ready container holding up to `capacity` sessions", json_body::<containers::CreateBody>(), created, true),
        Operation(Get, "/v1/containers/{id}", "A container", Body::None, ok, true),
        Operation(Delete, "/v1/containers/{id}", "Delete a container and its sessions", Body::None, NoContent, true),
        Operation(Post, "/v1/containers/{id}:hibernate", "Freeze a ready container", Body::None, NoContent, true),
        Operation(Post, "/v1/containers/{id}:resume", "Thaw a hibernated container", Body::None, NoContent, true),
        Operation(Get, "/v1/audit", "Audit records (admin)", Body::None, ok, true),
        Operation(Get, "/v1/tokens", "API tokens, without their values (admin)", Body::None, ok, true),
        Operation(Post, "/v1/tokens", "Make a token; its value is shown once (admin)", json_body::<tokens::CreateBody>(), Json(&[201]), true),
        Operation(Delete, "/v1/tokens/{id}", "Revoke a token (admin)", Body::None, NoContent, true),
        Operation(Get, "/v1/nodes", "The fleet's nodes", Body::None, ok, true),
        Operation(Post, "/v1/nodes:join", "A node joins with a join token (no bearer token: the join token is the proof)", Body::Json(any_object, true), Json(&[201]), false),
        Operation(Get, "/v1/nodes/{id}", "A node", Body::None, ok, true),
        Operation(Delete, "/v1/nodes/{id}", "Remove a node that holds no containers (admin)", Body::None, NoContent, true),
        Operation(Post, "/v1/nodes/{id}:cordon", "Place nothing new on the node (admin)", Body::None, ok, true),
        Operation(Post, "/v1/nodes/{id}:uncordon", "Place on the node again (admin)", Body::None, ok, true),
        Operation(Post, "/v1/nodes/{id}:drain", "Move the node's work away (admin)", optional_body::<nodes::DrainBody>(), ok, true),
        Operation(Get, "/v1/bundles", "Agent bundles the nodes hold", Body::None, ok, true),
        Operation(Get, "/v1/containers/{id}/agents/{instance_id}/sessions", "The ACP sessions an agent keeps (session/list)", Body::None, ok, true),
    ]
});

/// The problem+json body every refusal has.
fn problem_schema() -> RefOr<Schema> {
    let string = || ObjectBuilder::new().schema_type(SchemaType::Type(Type::String));
    ObjectBuilder::new()
        .schema_type(SchemaType::Type(Type::Object))
        .description(Some("RFC 9457 problem details; `code` is stable, `detail` is for people."))
        .property("type", string())
        .property("title", string())
        .property("status", ObjectBuilder::new().schema_type(SchemaType::Type(Type::Integer)))
        .property("code", Ref::from_schema_name(Code::name()))
        .property("detail", string())
        .property("instance", string())
        .required("type")
        .required("title")
        .required("status")
        .required("code")
        .required("detail")
        .into()
}

fn parameters_of(path: &str) -> Vec<utoipa::openapi::path::Parameter> {
    path.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
        .map(|name| {
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)).min_length(Some(1))))
                .build()
        })
        .collect()
}

/// The query parameters of the GETs that take some (integers marked), as
/// their handlers' query types have them.
fn query_of(method: &HttpMethod, path: &str) -> Vec<utoipa::openapi::path::Parameter> {
    let names: &[(&str, bool)] = match (method, path) {
        (HttpMethod::Get, "/v1/sessions") => &[("state", false), ("container_id", false), ("limit", true), ("cursor", false)],
        (HttpMethod::Get, "/v1/containers") => &[("state", false), ("node_id", false), ("limit", true), ("cursor", false)],
        (HttpMethod::Get, "/v1/audit") => &[("after", true), ("limit", true), ("entity_kind", false), ("entity_id", false)],
        (HttpMethod::Get, "/v1/sessions/{id}/events") => &[("after", true)],
        (HttpMethod::Get, "/v1/containers/{id}/agents/{instance_id}/sessions") => &[("cwd", false), ("cursor", false)],
        _ => &[],
    };
    names
        .iter()
        .map(|(name, integer)| {
            let kind = if *integer { Type::Integer } else { Type::String };
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .schema(Some(ObjectBuilder::new().schema_type(SchemaType::Type(kind))))
                .build()
        })
        .collect()
}

fn operation(op: &Operation) -> utoipa::openapi::path::Operation {
    let Operation(method, path, summary, body, answer, auth) = op;
    let parameters = parameters_of(path).into_iter().chain(query_of(method, path));
    let mut b = OperationBuilder::new().summary(Some(*summary)).parameters(Some(parameters));
    if let Body::Json(schema, required) = body {
        let required = if *required { Required::True } else { Required::False };
        b = b.request_body(Some(
            RequestBodyBuilder::new().content("application/json", ContentBuilder::new().schema(Some(schema())).build()).required(Some(required)).build(),
        ));
    }
    let json = || ContentBuilder::new().schema(Some(any_object())).build();
    b = match answer {
        Json(statuses) => statuses.iter().fold(b, |b, s| b.response(s.to_string(), ResponseBuilder::new().description("OK").content("application/json", json()))),
        NoContent => b.response("204", ResponseBuilder::new().description("Done")),
        Events => b.response(
            "200",
            ResponseBuilder::new().description("Server-sent events").content(
                "text/event-stream",
                ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)))).build(),
            ),
        ),
        Media(media) => b.response(
            "200",
            ResponseBuilder::new()
                .description("OK")
                .content(*media, ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)))).build()),
        ),
        Text => b.response(
            "200",
            ResponseBuilder::new()
                .description("ok")
                .content("text/plain", ContentBuilder::new().schema(Some(ObjectBuilder::new().schema_type(SchemaType::Type(Type::String)))).build()),
        ),
    };
    b = b.response(
        "default",
        ResponseBuilder::new()
            .description("A problem (RFC 9457) with a stable `code`")
            .content("application/problem+json", ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build()),
    );
    // No token: an empty requirement overrides the document's bearer one.
    if !auth {
        b = b.securities(Some([SecurityRequirement::default()]));
    }
    b.build()
}

/// The description, built from [`OPERATIONS`].
pub fn description() -> OpenApi {
    let mut paths = PathsBuilder::new();
    let mut by_path: Vec<(&str, PathItem)> = Vec::new();
    for op in OPERATIONS.iter() {
        let item = PathItem::new(op.0.clone(), operation(op));
        match by_path.iter_mut().find(|(p, _)| *p == op.1) {
            Some((_, existing)) => existing.merge_operations(item),
            None => by_path.push((op.1, item)),
        }
    }
    for (path, item) in by_path {
        paths = paths.path(path, item);
    }
    let bearer = SecurityScheme::Http(
        HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("An agentd token (`agentd token create`); scopes read < write < admin"))
            .build(),
    );
    OpenApiBuilder::new()
        .info(InfoBuilder::new().title("agentd").version(env!("CARGO_PKG_VERSION")).build())
        .paths(paths.build())
        .components(Some(
            ComponentsBuilder::new()
                .schema(Code::name(), Code::schema())
                .schema("Problem", problem_schema())
                .security_scheme("bearer", bearer)
                .build(),
        ))
        .security(Some([SecurityRequirement::new("bearer", Vec::<String>::new())]))
        .build()
}

static DESCRIPTION: LazyLock<String> = LazyLock::new(|| description().to_json().expect("the description serializes"));

/// `GET /openapi.json`.
pub async fn serve() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DESCRIPTION.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// (method, path) of every route `router` declares, read from its
    /// source: a `.route("/p", get(a).post(b))` line each.
    fn router_routes() -> Vec<(String, String)> {
        let source = include_str!("mod.rs");
        let body = source.split("pub fn router").nth(1).expect("api/mod.rs has router").split("\n}\n").next().unwrap();
        let mut routes = Vec::new();
        for line in body.lines().map(str::trim).filter(|l| l.starts_with(".route(\"")) {
            let path = line[".route(\"".len()..].split('"').next().unwrap().replace("{*", "{");
            for method in ["get", "post", "delete", "put", "patch"] {
                let called = [format!(", {method}("), format!(".{method}("), format!("routing::{method}(")];
                if called.iter().any(|c| line.contains(c.as_str())) {
                    routes.push((method.to_string(), path.clone()));
                }
            }
        }
        assert!(routes.len() > 20, "read too few routes from api/mod.rs: {routes:?}");
        routes
    }

    #[test]
    fn every_route_of_the_router_is_described() {
        let doc: Value = serde_json::from_str(&DESCRIPTION).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().unwrap();
        for (method, path) in router_routes() {
            // A POST on `/x/{id}` serves the actions `/x/{id}:verb`.
            let described = paths.get(&path).is_some_and(|item| item.get(&method).is_some())
                || (method == "post" && paths.iter().any(|(p, item)| p.starts_with(&format!("{path}:")) && item.get("post").is_some()));
            assert!(described, "{} {path} is routed but not in the OpenAPI description", method.to_uppercase());
        }
    }

    #[test]
    fn every_code_problems_and_the_bearer_scheme_are_described() {
        let doc: Value = serde_json::from_str(&DESCRIPTION).unwrap();
        let listed: Vec<&str> = doc["components"]["schemas"]["Code"]["enum"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert_eq!(listed, Code::ALL.iter().map(|c| c.as_str()).collect::<Vec<_>>());
        assert_eq!(doc["components"]["schemas"]["Problem"]["properties"]["code"]["$ref"], "#/components/schemas/Code");
        assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
        assert_eq!(doc["paths"]["/healthz"]["get"]["security"], serde_json::json!([{}]));
        let create = &doc["paths"]["/v1/containers"]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert!(create["properties"]["capacity"].is_object(), "request bodies have their types' schemas: {create}");
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                assert!(op["responses"]["default"].is_object(), "{method} {path} describes no problem");
            }
        }
    }
}
