//! `/v1/tokens` (admin): make a token (shown once), list them (never their
//! secrets), revoke one.

use crate::domain::Code;
use axum::Json;
use super::ApiPath as Path;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiJson, Problem};
use crate::AppState;
use crate::auth::Scope;

/// The longest a token may last: a year.
const MAX_TTL_SECONDS: u64 = 366 * 24 * 3600;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub scope: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Seconds from now; absent: no expiry.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
}

pub async fn create(State(app): State<AppState>, ApiJson(body): ApiJson<CreateBody>) -> Result<(StatusCode, Json<Value>), Problem> {
    let scope: Scope = body.scope.parse().map_err(|e: String| Problem::invalid(Code::InvalidRequest, e))?;
    let name = body.name.unwrap_or_default();
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(Problem::invalid(Code::InvalidRequest, "name must be at most 128 printable characters"));
    }
    let ttl_ms = match body.ttl_seconds {
        None => None,
        Some(0) => return Err(Problem::invalid(Code::InvalidRequest, "ttl_seconds must be positive")),
        Some(s) if s > MAX_TTL_SECONDS => return Err(Problem::invalid(Code::InvalidRequest, format!("ttl_seconds must be at most {MAX_TTL_SECONDS}"))),
        Some(s) => Some(i64::try_from(s * 1000).unwrap_or(i64::MAX)),
    };
    let (token, row) = crate::auth::create(&app.store, scope, &name, ttl_ms).await?;
    let mut view = serde_json::to_value(&row).expect("a token row serializes");
    view["token"] = json!(token);
    Ok((StatusCode::CREATED, Json(view)))
}

pub async fn list(State(app): State<AppState>) -> Result<Json<Value>, Problem> {
    Ok(Json(json!({ "tokens": app.store.list_tokens().await? })))
}

pub async fn revoke(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    if !app.store.revoke_token(&id).await? {
        return Err(Problem::not_found(Code::TokenNotFound, format!("no token {id}")));
    }
    Ok(StatusCode::NO_CONTENT)
}
