//! `/v1/containers/{id}`: read and delete sandboxes.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::Problem;
use crate::AppState;
use crate::store::states::container;
use crate::flows::suspend::Action;
use agentd_proto::node::GetSandboxRequest;

/// Live usage from the node, for containers that still run.
async fn usage(app: &AppState, id: &str, state: &str) -> Value {
    if state != container::READY && state != container::HIBERNATED {
        return Value::Null;
    }
    match app.node.clone().get_sandbox(GetSandboxRequest { container_id: id.to_string() }).await {
        Ok(s) => {
            let s = s.into_inner();
            let u = s.usage.unwrap_or_default();
            json!({
                "frozen": s.frozen,
                "memory_bytes": u.memory_current, "memory_max_bytes": u.memory_max,
                "cpu_usage_usec": u.cpu_usage_usec,
                "pids": u.pids_current, "pids_max": u.pids_max,
                "oom_kills": u.oom_kills,
            })
        }
        Err(e) => json!({"error": e.message()}),
    }
}

pub async fn get(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    let c = app.store.get_container(&id).await?;
    let usage = usage(&app, &c.id, &c.state).await;
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
        "usage": usage,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    })))
}

pub async fn delete(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    let c = app.store.get_container(&id).await?;
    if c.state == container::DELETED {
        return Err(Problem::conflict("illegal_state", format!("container {id} is already deleted")));
    }
    crate::flows::delete::request(&app, &id, "container deleted").await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/containers/{id}:hibernate` freezes every process of the sandbox
/// (memory and state intact); `:resume` thaws it. Both run as workflow
/// steps (`flows::suspend`): the state change and the step in one
/// transaction, the node call fenced, ordered with the container's other
/// steps.
pub async fn action(State(app): State<AppState>, Path(target): Path<String>) -> Result<StatusCode, Problem> {
    let Some((id, verb)) = target.rsplit_once(':') else {
        return Err(Problem::new(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "POST {id}:hibernate or {id}:resume"));
    };
    let action = match verb {
        "hibernate" => Action::Hibernate,
        "resume" => Action::Resume,
        other => return Err(Problem::not_found("unknown_action", format!("no container action {other:?} (try hibernate or resume)"))),
    };
    // 404 for an unknown container before anything else.
    app.store.get_container(id).await?;
    crate::flows::suspend::request(&app, id, action).await?;
    Ok(StatusCode::NO_CONTENT)
}
