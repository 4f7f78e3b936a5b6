//! The HTTP API: one module per resource, gathered by [`router`].

pub mod audit;
pub mod auth;
pub mod containers;
pub mod events;
pub mod health;
pub mod idempotency;
pub mod listing;
pub mod nodes;
pub mod openapi;
pub mod problem;
pub mod registry;
pub mod sessions;
pub mod sse;
pub mod telemetry;
#[cfg(test)]
mod tests;
pub mod tokens;
pub mod ui;

use crate::domain::Code;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::get;

use crate::AppState;
pub use problem::Problem;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/ui", get(ui::index))
        .route("/ui/", get(ui::index))
        .route("/ui/{*path}", get(ui::asset))
        .route("/openapi.json", get(openapi::serve))
        .route("/v1/sessions", get(sessions::list).post(sessions::create))
        .route("/v1/sessions/{id}", get(sessions::get).delete(sessions::delete).post(sessions::action))
        .route("/v1/sessions/{id}/events", get(events::stream))
        .route("/v1/runs/{id}", get(sessions::get_run))
        .route("/v1/sessions/{id}/permissions/{request_id}", axum::routing::post(sessions::answer_permission))
        .route("/v1/registry/agents", get(registry::list))
        .route("/v1/registry/agents/{id}", get(registry::get))
        .route("/v1/registry:sync", axum::routing::post(registry::sync))
        .route("/v1/containers", get(containers::list).post(containers::create))
        .route("/v1/containers/{id}", get(containers::get).delete(containers::delete).post(containers::action))
        .route("/v1/audit", get(audit::list))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{id}", axum::routing::delete(tokens::revoke))
        .route("/v1/nodes", get(nodes::list))
        .route("/v1/nodes:join", axum::routing::post(nodes::join))
        .route("/v1/nodes/{id}", get(nodes::get).delete(nodes::delete).post(nodes::action))
        .route("/v1/bundles", get(registry::bundles))
        .route("/v1/containers/{id}/agents/{instance_id}/sessions", get(containers::agent_sessions))
        .fallback(|| async { Problem::not_found(Code::NotFound, "no such resource") })
        // axum adds `Allow`; the body is a problem like every other refusal.
        .method_not_allowed_fallback(|| async { Problem::new(StatusCode::METHOD_NOT_ALLOWED, Code::MethodNotAllowed, "this resource does not take this method") })
        // Outermost first: the audit sees every answer, refusals included.
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit::record))
        // Outermost: ids, trace and span cover the audit and auth too.
        .layer(axum::middleware::from_fn_with_state(state.clone(), telemetry::observe))
        .with_state(state)
}

/// `Json` whose rejections are problems with stable codes.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(JsonRejection::JsonSyntaxError(e)) => {
                Err(Problem::new(StatusCode::BAD_REQUEST, Code::InvalidJson, format!("body is not valid JSON: {}", e.body_text())))
            }
            Err(JsonRejection::JsonDataError(e)) => Err(Problem::invalid(Code::InvalidRequest, e.body_text())),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                Code::UnsupportedMediaType,
                "send the body as JSON with Content-Type: application/json",
            )),
            Err(e) => Err(Problem::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, e.body_text())),
        }
    }
}

/// `Query` whose rejection is a problem (400 `invalid_request`), not axum's
/// plain text. Handlers import it as `Query`.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(Problem::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, e.body_text())),
        }
    }
}

/// `Path` whose rejection (a segment that is not UTF-8 once decoded, say)
/// is a problem. Handlers import it as `Path`.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: serde::de::DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(e) => Err(Problem::new(StatusCode::BAD_REQUEST, Code::InvalidRequest, e.body_text())),
        }
    }
}
