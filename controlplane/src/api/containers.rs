//! `/v1/containers/{id}`: read and delete sandboxes.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::Problem;
use crate::AppState;
use crate::store::states::container;

pub async fn get(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    let c = app.store.get_container(&id).await?;
    let sessions: Vec<String> = app.store.sessions_of_container(&id).await?.into_iter().map(|s| s.id).collect();
    let profile: Value = serde_json::from_str(&c.profile_json).unwrap_or(Value::Null);
    Ok(Json(json!({
        "id": c.id,
        "node_id": c.node_id,
        "state": c.state,
        "supervisor_pid": c.supervisor_pid,
        "error": c.error,
        "container_profile": profile,
        "sessions": sessions,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    })))
}

pub async fn delete(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    let c = app.store.get_container(&id).await?;
    if c.state == container::DELETED {
        return Err(Problem::conflict("illegal_state", format!("container {id} is already deleted")));
    }
    crate::teardown::delete_container(&app, &id, "container deleted").await?;
    Ok(StatusCode::NO_CONTENT)
}
