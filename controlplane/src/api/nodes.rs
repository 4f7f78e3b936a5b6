//! `/v1/nodes`: the fleet's nodes, their operations (cordon, uncordon,
//! drain, remove), and `POST /v1/nodes:join`, where a node with a join token
//! gets its certificate (the token's proof is its credential).

use crate::domain::Code;
use axum::Json;
use super::ApiPath as Path;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiJson, Problem};
use crate::AppState;
use crate::fleet::join::{JoinError, JoinRequest};
use crate::store::cluster::TokenRefusal;
use crate::store::nodes::{NodeAdminError, NodeRow, node_admin, node_state};
use crate::store::states::container;

/// How long a drain waits for busy sessions when the body names no deadline.
const DEFAULT_DRAIN_DEADLINE_MS: u64 = 5 * 60 * 1000;

/// The state clients see: `lost` when it does not answer, else what the
/// operator made of it (`alive` for an active node).
fn presented_state(n: &NodeRow) -> &str {
    if n.state == node_state::LOST {
        return node_state::LOST;
    }
    if n.admin == node_admin::ACTIVE { node_state::ALIVE } else { n.admin.as_str() }
}

fn view(n: &NodeRow) -> Value {
    json!({
        "id": n.id,
        "state": presented_state(n),
        "address": n.address,
        "labels": n.labels(),
        "version": n.version,
        "capacity": {"slots": n.capacity_slots, "memory_bytes": n.capacity_memory, "cpus": n.capacity_cpus},
        "usage": serde_json::from_str::<Value>(&n.usage).unwrap_or(Value::Null),
        "last_heartbeat_at": n.last_heartbeat_at,
        "drain_deadline": n.drain_deadline,
        "error": n.error,
        "created_at": n.created_at,
        "updated_at": n.updated_at,
    })
}

impl From<NodeAdminError> for Problem {
    fn from(e: NodeAdminError) -> Self {
        match e {
            NodeAdminError::NotFound(_) => Problem::not_found(Code::NodeNotFound, e.to_string()),
            NodeAdminError::Illegal { .. } => Problem::conflict(Code::IllegalState, e.to_string()),
            NodeAdminError::Busy(_) => Problem::conflict(Code::NodeBusy, e.to_string()),
            NodeAdminError::Store(e) => e.into(),
        }
    }
}

pub async fn list(State(app): State<AppState>) -> Result<Json<Value>, Problem> {
    let nodes: Vec<Value> = app.store.list_nodes().await?.iter().map(view).collect();
    Ok(Json(json!({ "nodes": nodes })))
}

pub async fn get(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    let n = app.store.get_node(&id).await?.ok_or_else(|| Problem::not_found(Code::NodeNotFound, format!("no node {id}")))?;
    let mut body = view(&n);
    let mut containers = Vec::new();
    for state in [container::PROVISIONING, container::READY, container::HIBERNATED, container::STOPPING] {
        for c in app.store.containers_of_node_in_state(&id, state).await? {
            containers.push(json!({"id": c.id, "state": c.state}));
        }
    }
    body["containers"] = json!(containers);
    Ok(Json(body))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DrainBody {
    /// How long busy sessions get before their containers are deleted anyway.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

/// `POST /v1/nodes/{id}:cordon`, `:uncordon`, `:drain`.
pub async fn action(State(app): State<AppState>, Path(target): Path<String>, body: axum::body::Bytes) -> Result<Json<Value>, Problem> {
    let Some((id, verb)) = target.rsplit_once(':') else {
        return Err(Problem::method_not_allowed("GET, DELETE", "POST {id}:cordon, :uncordon or :drain"));
    };
    use node_admin::{ACTIVE, CORDONED, DRAINED, DRAINING};
    match verb {
        "cordon" => app.store.set_node_admin(id, &[ACTIVE], CORDONED, None).await?,
        "uncordon" => app.store.set_node_admin(id, &[CORDONED, DRAINING, DRAINED], ACTIVE, None).await?,
        "drain" => {
            let body: DrainBody = if body.is_empty() { DrainBody::default() } else { super::sessions::parse_body(&body)? };
            let deadline_ms = body.deadline_ms.unwrap_or(DEFAULT_DRAIN_DEADLINE_MS);
            let deadline = crate::store::now_ms().saturating_add(i64::try_from(deadline_ms).unwrap_or(i64::MAX / 4));
            app.store.set_node_admin(id, &[ACTIVE, CORDONED], DRAINING, Some(deadline)).await?
        }
        other => return Err(Problem::not_found(Code::UnknownAction, format!("no node action {other:?} (try cordon, uncordon or drain)"))),
    };
    let n = app.store.get_node(id).await?.ok_or_else(|| Problem::not_found(Code::NodeNotFound, format!("no node {id}")))?;
    Ok(Json(view(&n)))
}

/// `DELETE /v1/nodes/{id}`: only a lost or drained node, holding nothing.
pub async fn delete(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    app.store.remove_node(&id).await?;
    app.nodes.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

impl From<JoinError> for Problem {
    fn from(e: JoinError) -> Self {
        match &e {
            JoinError::Token(TokenRefusal::Unknown) | JoinError::BadProof => {
                Problem::new(StatusCode::UNAUTHORIZED, Code::InvalidJoinToken, e.to_string())
            }
            JoinError::Token(TokenRefusal::Used(_)) => Problem::new(StatusCode::UNAUTHORIZED, Code::JoinTokenUsed, e.to_string()),
            JoinError::Token(TokenRefusal::Expired(_)) => Problem::new(StatusCode::UNAUTHORIZED, Code::JoinTokenExpired, e.to_string()),
            JoinError::BadNodeId(_) | JoinError::BadAddress(_) | JoinError::BadLabel(_) => Problem::invalid(Code::InvalidRequest, e.to_string()),
            JoinError::BadCsr(_) => Problem::invalid(Code::InvalidCsr, e.to_string()),
            JoinError::NodeIdInUse(_) => Problem::conflict(Code::NodeIdInUse, e.to_string()),
            JoinError::Ca(_) => Problem::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, e.to_string()),
            JoinError::Store(_) => {
                let JoinError::Store(e) = e else { unreachable!() };
                e.into()
            }
        }
    }
}

/// `POST /v1/nodes:join`.
pub async fn join(State(app): State<AppState>, ApiJson(request): ApiJson<JoinRequest>) -> Result<(StatusCode, Json<Value>), Problem> {
    let answer = crate::fleet::join::join(&app.store, &request).await?;
    Ok((StatusCode::CREATED, Json(serde_json::to_value(answer).expect("an answer serializes"))))
}
