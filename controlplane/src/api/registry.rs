//! `/v1/registry`: the agents of the last registry sync, and the sync itself
//! (`POST /v1/registry:sync`, from the configured source or a given one).

use crate::domain::Code;
use axum::Json;
use super::ApiPath as Path;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Problem;
use crate::AppState;
use crate::agent_registry::{self, RegistryError};
use crate::agent_spec::{AgentSpec, Launch, this_platform};
use crate::store::registry::RegistryAgentRow;

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SyncBody {
    /// A file path or URL; the configured `registry` when absent.
    #[serde(default)]
    pub source: Option<String>,
}

impl From<RegistryError> for Problem {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Fetch { .. } => Problem::new(StatusCode::BAD_GATEWAY, Code::RegistryUnavailable, e.to_string()),
            RegistryError::Parse { .. } | RegistryError::Entry { .. } | RegistryError::Duplicate { .. } => {
                Problem::invalid(Code::InvalidRegistry, e.to_string())
            }
            RegistryError::Store(e) => e.into(),
        }
    }
}

/// The stored entry as the registry gave it, with what agentd makes of it.
fn view(row: &RegistryAgentRow) -> Value {
    let entry: Value = serde_json::from_str(&row.entry_json).unwrap_or(Value::Null);
    let launch = AgentSpec::from_json(&entry).ok().and_then(|spec| match spec.launch_for(&this_platform()) {
        Ok(Launch::Archive(_)) => Some("binary"),
        Ok(Launch::Local(_)) => Some("local"),
        Ok(Launch::Npx(_)) => Some("npx"),
        Ok(Launch::Uvx(_)) => Some("uvx"),
        Err(_) => None,
    });
    json!({
        "id": row.id,
        "name": row.name,
        "version": row.version,
        "description": row.description,
        "distribution": entry.get("distribution"),
        // How a session of this agent would run here; null: no distribution for this platform.
        "launch": launch,
        "source": row.source,
        "synced_at": row.synced_at,
    })
}

pub async fn list(State(app): State<AppState>) -> Result<Json<Value>, Problem> {
    let agents = app.store.registry_agents().await?;
    Ok(Json(json!({"platform": this_platform(), "agents": agents.iter().map(view).collect::<Vec<_>>()})))
}

pub async fn get(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    let row = app.store.registry_agent(&id).await?.ok_or_else(|| unknown_agent(&id))?;
    Ok(Json(view(&row)))
}

pub fn unknown_agent(id: &str) -> Problem {
    Problem::not_found(Code::UnknownAgent, format!("the registry has no agent {id:?} (see GET /v1/registry/agents)"))
}

/// `POST /v1/registry:sync`, optionally with `{"source": "<path or URL>"}`.
pub async fn sync(
    State(app): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, Problem> {
    let body: SyncBody = if body.iter().all(u8::is_ascii_whitespace) {
        SyncBody::default()
    } else {
        super::sessions::parse_body(&body)?
    };
    let who = super::auth::authority(&app, caller.as_deref());
    crate::powers::check_registry_source(who, &app.allowances, body.source.as_deref())?;
    let source = body.source.or_else(|| app.registry_source.clone()).ok_or_else(|| {
        Problem::invalid(Code::RegistryNotConfigured, "no registry configured (config key `registry`): give {\"source\": \"<path or URL>\"}")
    })?;
    let report = agent_registry::sync(&app.store, &app.http, &source).await?;
    Ok(Json(json!(report)))
}

/// `GET /v1/bundles`: the agent bundles each node was given, most recently
/// used first.
pub async fn bundles(State(app): State<AppState>) -> Result<Json<Value>, Problem> {
    let bundles = app.store.bundles().await?;
    Ok(Json(json!({"bundles": bundles})))
}
