//! The audit trail: every state-changing API call (any method but GET and
//! HEAD) leaves a record of who asked, what, when and how it ended, and
//! `GET /v1/audit` reads them back.
//!
//! Records are written off the request's path, by the writer in
//! [`crate::audit`].

use crate::domain::Code;
use std::net::SocketAddr;
use std::time::Instant;

use axum::Json;
use super::ApiQuery as Query;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Problem;
use super::problem::ProblemCode;
use crate::AppState;
use crate::store::audit::{AuditQuery, NewAuditRecord};
pub use crate::audit::AuditLog;
use crate::store::now_ms;

/// The header a caller may name itself in, recorded beside its token's id
/// (a claim, where the token id is the identity).
pub const ACTOR_HEADER: &str = "x-agentd-actor";

/// The most records one `GET /v1/audit` returns.
const MAX_PAGE: i64 = 1_000;

/// Middleware: records every call that may change state.
pub async fn record(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let at = now_ms();
    let started = Instant::now();
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let actor = request.headers().get(ACTOR_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string());
    let response = next.run(request).await;
    // The token's id, never the token.
    let token_id = response.extensions().get::<crate::auth::Caller>().map(|c| c.token_id.clone());
    // A create names what it made in its Location.
    let location = response.headers().get(header::LOCATION).and_then(|v| v.to_str().ok());
    let (entity_kind, entity_id) = entity_of(location.unwrap_or(&path)).map(|(k, id)| (k.to_string(), id.to_string())).unzip();
    app.audit.record(NewAuditRecord {
        at,
        actor,
        token_id,
        peer,
        method,
        path,
        entity_kind,
        entity_id,
        status: i64::from(response.status().as_u16()),
        code: response.extensions().get::<ProblemCode>().map(|c| c.0.clone()),
        duration_us: i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX),
    });
    response
}

/// The entity an API path names: `/v1/sessions/{id}[:action][/...]` ->
/// (`session`, id); the same for containers; the registry as a whole.
fn entity_of(path: &str) -> Option<(&'static str, &str)> {
    let mut parts = path.strip_prefix("/v1/")?.split('/');
    let collection = parts.next()?;
    let kind = match collection.split(':').next()? {
        "sessions" => "session",
        "containers" => "container",
        "registry" => return Some(("registry", "registry")),
        _ => return None,
    };
    let id = parts.next()?.split(':').next()?;
    (!id.is_empty()).then_some((kind, id))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<i64>,
    limit: Option<i64>,
    entity_kind: Option<String>,
    entity_id: Option<String>,
}

/// `GET /v1/audit[?after=ID][&limit=N][&entity_kind=K&entity_id=ID]`: the
/// newest records, or those after a cursor (page with `next_after`).
pub async fn list(State(app): State<AppState>, Query(q): Query<ListQuery>) -> Result<Json<Value>, Problem> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Problem::invalid(Code::InvalidRequest, format!("limit must be 1 to {MAX_PAGE}, got {limit}")));
    }
    let entity = match (q.entity_kind, q.entity_id) {
        (Some(kind), Some(id)) => Some((kind, id)),
        (None, None) => None,
        _ => return Err(Problem::invalid(Code::InvalidRequest, "give entity_kind and entity_id together")),
    };
    let records = app.store.audit_records(&AuditQuery { after: q.after, entity, limit }).await?;
    let next_after = records.last().map(|r| r.id).or(q.after);
    Ok(Json(json!({"records": records, "next_after": next_after})))
}

#[cfg(test)]
mod tests {
    use super::entity_of;

    #[test]
    fn paths_name_their_entity() {
        assert_eq!(entity_of("/v1/sessions/ses_1"), Some(("session", "ses_1")));
        assert_eq!(entity_of("/v1/sessions/ses_1:prompt"), Some(("session", "ses_1")));
        assert_eq!(entity_of("/v1/sessions/ses_1/permissions/req_2"), Some(("session", "ses_1")));
        assert_eq!(entity_of("/v1/containers/ctr_1:hibernate"), Some(("container", "ctr_1")));
        assert_eq!(entity_of("/v1/registry:sync"), Some(("registry", "registry")));
        assert_eq!(entity_of("/v1/sessions"), None);
        assert_eq!(entity_of("/v1/sessions/"), None);
        assert_eq!(entity_of("/healthz"), None);
    }
}
