//! `/v1/containers`: make a container on its own (the original agentd's
//! explicit create: a profile and a capacity of sessions), list them, read
//! and delete one, list the ACP sessions an agent of one keeps
//! (`session/list`).

use crate::domain::Code;
use axum::Json;
use super::ApiPath as Path;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use super::Problem;
use crate::AppState;
use crate::store::states::{container, session};
use crate::flows::suspend::Action;
use crate::store::placement::Demand;
use agentd_proto::node::{GetSandboxRequest, ListAgentSessionsRequest};
use super::ApiQuery as Query;
use serde::Deserialize;

/// The most sessions `capacity` may name.
const MAX_CAPACITY: u32 = 1024; // also in `CreateBody`'s schema

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    #[serde(default)]
    pub profile: Option<Value>,
    /// The same as `profile` (the name sessions use for it).
    #[serde(default)]
    pub container_profile: Option<Value>,
    /// The most sessions it holds (409 `container_full` past it); absent:
    /// no limit.
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1024)]
    pub capacity: Option<u32>,
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// How long a create waits for its sandbox before answering 202.
const CREATE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /v1/containers`: a ready sandbox shaped by the profile, holding up
/// to `capacity` sessions, placed as a session's container would be.
pub async fn create(
    State(app): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    super::ApiJson(body): super::ApiJson<CreateBody>,
) -> Result<axum::response::Response, Problem> {
    use axum::response::IntoResponse;
    let field = if body.container_profile.is_some() { "container_profile" } else { "profile" };
    let value = match (body.profile, body.container_profile) {
        (Some(_), Some(_)) => return Err(Problem::invalid(Code::InvalidRequest, "give profile or container_profile, not both")),
        (a, b) => a.or(b).unwrap_or_else(|| json!({})),
    };
    let profile = agentd_plan::Profile::from_json(&value).map_err(|e| Problem::invalid(Code::parse(e.code()).unwrap_or(Code::InvalidProfile), e.to_string()))?;
    let who = super::auth::authority(&app, caller.as_deref());
    crate::powers::check_profile(who, &app.allowances, field, &profile, value.get("network").is_some(), false)?;
    let capacity = match body.capacity {
        Some(0) => return Err(Problem::invalid(Code::InvalidRequest, "capacity must be at least 1")),
        Some(n) if n > MAX_CAPACITY => return Err(Problem::invalid(Code::InvalidRequest, format!("capacity must be at most {MAX_CAPACITY}"))),
        other => other.map(i64::from),
    };
    let labels = body.labels.unwrap_or_default();
    super::listing::check_labels(&labels)?;
    let id = crate::new_id("ctr");
    let plan = crate::plan::compile_sandbox(&id, &profile);
    let demand = Demand {
        memory: profile.memory_bytes.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        cpus: profile.cpus.unwrap_or(0.0),
        node_id: profile.node_id.clone(),
        selector: profile.node_selector.clone(),
    };
    let node_id = app.store.preview_placement(&demand, app.placement).await?;
    super::sessions::check_on_node(&app, &node_id, &plan).await?;
    let key = format!("{}:{id}", crate::flows::CONTAINER_CREATE);
    let payload = serde_json::to_value(crate::flows::container_create::Payload::new(&plan)).expect("payload serializes");
    let profile_text = value.to_string();
    app.store
        .transaction(async |tx| -> Result<(), Problem> {
            let node_id = tx.choose_node(&demand, app.placement, true).await?;
            tx.insert_placed_container(&id, &node_id, &profile_text, &demand).await?;
            tx.set_container_shape(&id, capacity, &labels).await?;
            tx.enqueue(crate::store::outbox::NewStep::new(crate::flows::CONTAINER, &id, crate::flows::CONTAINER_CREATE, &key, payload)).await?;
            Ok(())
        })
        .await?;
    let location = format!("/v1/containers/{id}");
    let status = match crate::flows::wait_for_step(&app, &key, CREATE_WAIT).await? {
        crate::flows::Waited::Finished(outcome) => {
            outcome?;
            StatusCode::CREATED
        }
        crate::flows::Waited::Pending => StatusCode::ACCEPTED,
    };
    let Json(view) = get(State(app), Path(id)).await?;
    Ok((status, [(axum::http::header::LOCATION, location)], Json(view)).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub state: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    /// Only those on this node.
    pub node_id: Option<String>,
}

/// `GET /v1/containers[?state=S][&node_id=N][&label=k=v]...[&limit=N][&cursor=C]`.
pub async fn list(State(app): State<AppState>, Query(q): Query<ListQuery>, uri: axum::http::Uri) -> Result<Json<Value>, Problem> {
    let page = super::listing::Query { state: q.state, limit: q.limit, cursor: q.cursor };
    let filter = super::listing::filter("containers", &page, q.node_id, uri.query())?;
    let rows = app.store.list_containers(&filter).await?;
    let last = rows.last().map(|c| (c.created_at, c.id.as_str()));
    let next = super::listing::next_cursor("containers", filter.limit, last, rows.len());
    let containers: Vec<Value> = rows
        .iter()
        .map(|c| {
            let mut row = serde_json::to_value(c).expect("a row serializes");
            row["container_profile"] = serde_json::from_str(&c.profile_json).unwrap_or(Value::Null);
            row
        })
        .collect();
    Ok(Json(json!({ "containers": containers, "next_cursor": next })))
}

/// Live usage from the node, for containers that still run.
async fn usage(app: &AppState, id: &str, state: &str) -> Value {
    if state != container::READY && state != container::HIBERNATED {
        return Value::Null;
    }
    let node = match app.nodes.of_container(id).await {
        Ok((_, node)) => node,
        Err(e) => return json!({"error": e.message()}),
    };
    match node.clone().get_sandbox(GetSandboxRequest { container_id: id.to_string() }).await {
        Ok(s) => {
            let s = s.into_inner();
            let u = s.usage.unwrap_or_default();
            // An egress sandbox's traffic through its node's gateway.
            let egress = u.egress.map(|e| {
                json!({
                    "connections_allowed": e.connections_allowed, "connections_denied": e.connections_denied,
                    "bytes_out": e.bytes_out, "bytes_in": e.bytes_in,
                    "names_allowed": e.names_allowed, "names_denied": e.names_denied,
                    "datagrams_denied": e.datagrams_denied,
                })
            });
            json!({
                "frozen": s.frozen,
                "memory_bytes": u.memory_current, "memory_max_bytes": u.memory_max,
                "cpu_usage_usec": u.cpu_usage_usec,
                "pids": u.pids_current, "pids_max": u.pids_max,
                "oom_kills": u.oom_kills,
                "egress": egress,
            })
        }
        Err(e) => json!({"error": e.message()}),
    }
}

pub async fn get(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    let c = app.store.get_container(&id).await?;
    let usage = usage(&app, &c.id, &c.state).await;
    let rows = app.store.sessions_of_container(&id).await?;
    let sessions: Vec<String> = rows.iter().map(|s| s.id.clone()).collect();
    // The agents its open sessions run on, each with those sessions.
    let mut agents: Vec<Value> = Vec::new();
    for s in rows.iter().filter(|s| s.state == session::READY || s.state == session::CREATING) {
        match agents.iter_mut().find(|a| a["instance_id"] == s.agent_instance_id.as_str()) {
            Some(a) => a["sessions"].as_array_mut().expect("an array").push(json!(s.id)),
            None => agents.push(json!({"instance_id": s.agent_instance_id, "id": s.agent_id, "version": s.agent_version, "sessions": [s.id]})),
        }
    }
    // Each with its state as last observed (at start, then every node check).
    for instance in app.store.agent_instances_of_container(&id).await? {
        if let Some(a) = agents.iter_mut().find(|a| a["instance_id"] == instance.id.as_str()) {
            a["state"] = json!(instance.state);
            a["restarts"] = json!(instance.restarts);
            a["observed_at"] = json!(instance.updated_at);
        }
    }
    let profile: Value = serde_json::from_str(&c.profile_json).unwrap_or(Value::Null);
    Ok(Json(json!({
        "id": c.id,
        "node_id": c.node_id,
        "state": c.state,
        "supervisor_pid": c.supervisor_pid,
        "error": c.error,
        "error_code": c.error_code,
        "capacity": c.capacity,
        "labels": serde_json::from_str::<Value>(&c.labels).unwrap_or_else(|_| json!({})),
        "container_profile": profile,
        "sessions": sessions,
        "agents": agents,
        "usage": usage,
        "created_at": c.created_at,
        "updated_at": c.updated_at,
    })))
}

pub async fn delete(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    app.store.get_container(&id).await?;
    Ok(deleted_status(crate::flows::delete::request(&app, &id, "container deleted").await?))
}

/// 204 when the sandbox is gone, 202 while the node has yet to confirm
/// (the delete is retried until it does): the same for every DELETE of it.
pub fn deleted_status(deleted: crate::flows::delete::Deleted) -> StatusCode {
    match deleted {
        crate::flows::delete::Deleted::Done => StatusCode::NO_CONTENT,
        crate::flows::delete::Deleted::Pending => StatusCode::ACCEPTED,
    }
}

/// `POST /v1/containers/{id}:hibernate` freezes every process of the sandbox
/// (memory and state intact); `:resume` thaws it. Both run as workflow
/// steps (`flows::suspend`): the state change and the step in one
/// transaction, the node call fenced, ordered with the container's other
/// steps.
pub async fn action(State(app): State<AppState>, Path(target): Path<String>) -> Result<StatusCode, Problem> {
    let Some((id, verb)) = target.rsplit_once(':') else {
        return Err(Problem::method_not_allowed("GET, DELETE", "POST {id}:hibernate or {id}:resume"));
    };
    let action = match verb {
        "hibernate" => Action::Hibernate,
        "resume" => Action::Resume,
        other => return Err(Problem::not_found(Code::UnknownAction, format!("no container action {other:?} (try hibernate or resume)"))),
    };
    // 404 for an unknown container before anything else.
    app.store.get_container(id).await?;
    crate::flows::suspend::request(&app, id, action).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
pub struct AgentSessionsQuery {
    /// Only sessions with this working directory (absolute).
    #[serde(default)]
    pub cwd: Option<String>,
    /// The `next_cursor` of a previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// `GET /v1/containers/{id}/agents/{instance_id}/sessions`: the agent's
/// ACP `session/list` (the sessions it keeps, including ones no agentd
/// session has open: `session.load_session_id` opens one), where the agent
/// advertises it; 409 `not_supported` otherwise.
pub async fn agent_sessions(
    State(app): State<AppState>,
    Path((id, instance_id)): Path<(String, String)>,
    Query(query): Query<AgentSessionsQuery>,
) -> Result<Json<Value>, Problem> {
    let c = app.store.get_container(&id).await?;
    let known = app.store.sessions_of_container(&id).await?.iter().any(|s| s.agent_instance_id == instance_id && s.state == session::READY);
    if !known {
        return Err(Problem::not_found(Code::AgentNotFound, format!("container {id} has no agent {instance_id} with an open session")));
    }
    if c.state != container::READY {
        return Err(Problem::conflict(Code::IllegalState, format!("container {id} is {}", c.state)));
    }
    let cwd = query.cwd.unwrap_or_default();
    if !cwd.is_empty() && !cwd.starts_with('/') {
        return Err(Problem::invalid(Code::InvalidRequest, format!("cwd must be an absolute path, got {cwd:?}")));
    }
    let request = ListAgentSessionsRequest { container_id: id, agent_instance_id: instance_id.clone(), cwd, cursor: query.cursor.unwrap_or_default() };
    let (_, mut node) = app.nodes.of_container(&c.id).await?;
    let answer = node.list_agent_sessions(request).await?.into_inner();
    let answer: Value = serde_json::from_str(&answer.acp_answer).unwrap_or_else(|_| json!({}));
    Ok(Json(json!({
        "agent_instance_id": instance_id,
        "sessions": answer.get("sessions").cloned().unwrap_or_else(|| json!([])),
        "next_cursor": answer.get("nextCursor").cloned().unwrap_or(Value::Null),
    })))
}
