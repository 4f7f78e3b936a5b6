//! `/v1/sessions`: create (sandbox, agent, ACP session), read, prompt, cancel,
//! delete.

use crate::domain::Code;
use axum::Json;
use super::{ApiPath as Path, ApiQuery as Query};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::idempotency::{self, Keyed};
use super::{ApiJson, Problem};
use crate::agent_spec::{AgentSpec, Launch, this_platform};
use crate::plan::{self, PlanError, ProfileInput, SessionOptions};
use agentd_plan::Profile;
use crate::store::states::{container, run as run_state, session as session_state};
use crate::store::outbox::{NewStep, OutboxRow};
use crate::store::{NewSession, SessionRow, StoreError};
use crate::{AppState, flows, new_id, workflow};
use crate::store::placement::Demand;
use agentd_proto::common::{AcpSettings, AgentPolicy, RestartPolicy};
use agentd_proto::convert::agent_state_name;
use agentd_proto::node::{setup_stage, 
    AnswerPermissionRequest, CancelRequest, CheckSandboxPlanRequest, GetSessionRequest, GetSetupStageRequest, SessionSettingResponse, SetSessionConfigOptionRequest, SetSessionModeRequest,
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct CreateSessionBody {
    /// An agent given inline, in the registry's shape or the original agentd's.
    #[serde(default)]
    pub manual_agent: Option<Value>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub container_profile: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub session: Option<SessionOptions>,
    #[serde(default)]
    #[schema(inline)]
    pub policy: Option<PolicyBody>,
    /// Open the session in this container (ready) instead of a new one: on
    /// its agent of the same definition if one runs, else on a new agent
    /// beside the others.
    #[serde(default)]
    pub container_id: Option<String>,
    /// String labels listings filter on.
    #[serde(default)]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
}

/// How the session answers the agent's `session/request_permission`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// allow | deny | ask (the default: clients answer over HTTP).
    #[serde(default)]
    pub permissions: Option<String>,
    /// How long an `ask` waits for a client before denying.
    #[serde(default)]
    pub ask_timeout_ms: Option<u32>,
    /// never | on_failure (the default) | always: when a crashed agent is
    /// started again.
    #[serde(default)]
    pub restart: Option<String>,
    /// Restarts in a row before the agent counts as failed.
    #[serde(default)]
    pub max_restarts: Option<u32>,
    /// The first wait before a restart, doubled for each one in a row.
    #[serde(default)]
    pub restart_backoff_ms: Option<u32>,
    /// How long the agent may take over any request but a prompt.
    #[serde(default)]
    pub request_timeout_ms: Option<u32>,
    /// The agent's `authMethods` id to authenticate with; by default the
    /// supervisor picks one whose credentials the agent's env provides.
    #[serde(default)]
    pub auth_method: Option<String>,
}

impl PolicyBody {
    fn agent_policy(&self) -> Result<AgentPolicy, Problem> {
        let restart = match self.restart.as_deref().unwrap_or_default() {
            "" | "on_failure" => RestartPolicy::OnFailure,
            "never" => RestartPolicy::Never,
            "always" => RestartPolicy::Always,
            other => return Err(Problem::invalid(Code::InvalidRequest, format!("policy.restart must be never, on_failure or always, got {other:?}"))),
        };
        Ok(AgentPolicy {
            restart: restart.into(),
            max_restarts: self.max_restarts.unwrap_or(0),
            restart_backoff_ms: self.restart_backoff_ms.unwrap_or(0),
            request_timeout_ms: self.request_timeout_ms.unwrap_or(0),
            auth_method: self.auth_method.clone().unwrap_or_default(),
        })
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PermissionAnswer {
    pub option_id: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct PromptBody {
    pub prompt: Value,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetModeBody {
    pub mode_id: String,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetConfigOptionBody {
    pub config_id: String,
    /// An option id (string) or a boolean, as the option's kind wants.
    pub value: Value,
}

/// How long a session's view waits for its agent's live state.
const LIVE_STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// What the session's node says of it now.
struct Live {
    /// The agent's state (with its announced `settings`), or as last stored.
    agent: Value,
    /// The id of the session's latest event, when the node answered: a
    /// client streaming `?after=` it sees only what comes next.
    last_event_id: Option<u64>,
}

/// The agent's live state from its supervisor, for a ready session.
async fn agent_state(app: &AppState, s: &SessionRow) -> Live {
    let stored = async |error: Option<String>| Live { agent: stored_agent_state(app, s, error).await, last_event_id: None };
    if s.state == session_state::CREATING {
        return Live { agent: setup_stage(app, s).await, last_event_id: None };
    }
    if s.state != session_state::READY {
        return stored(None).await;
    }
    let request = GetSessionRequest { session_id: s.id.clone(), with_agent: true };
    // A GET must answer even when the node is stopped or lost (the node
    // check fails its sessions a while later), so the live part is optional:
    // without it, the state last observed, marked as such.
    let node = match app.nodes.of_container(&s.container_id).await {
        Ok((_, node)) => node,
        Err(e) => return stored(Some(e.message().to_string())).await,
    };
    let Ok(answer) = tokio::time::timeout(LIVE_STATE_WAIT, node.clone().get_session(request)).await else {
        return stored(Some(format!("the node did not answer within {LIVE_STATE_WAIT:?}"))).await;
    };
    match answer.map(|r| r.into_inner()) {
        Ok(answer) => {
            let agent = match answer.agent {
                Some(a) => json!({"state": agent_state_name(a.state()), "restarts": a.restarts, "pid": a.pid,
                    "last_error": if a.last_error.is_empty() { Value::Null } else { Value::String(a.last_error) },
                    "settings": acp_settings(a.settings.as_ref())}),
                None => stored_agent_state(app, s, None).await,
            };
            Live { agent, last_event_id: Some(answer.last_seq) }
        }
        Err(e) => stored(Some(e.message().to_string())).await,
    }
}

/// A session's modes and config options as the API shows them: the
/// agent's own JSON, `null` where it announced none.
fn acp_settings(settings: Option<&AcpSettings>) -> Value {
    let raw = |json: &str| if json.is_empty() { Value::Null } else { serde_json::from_str(json).unwrap_or(Value::Null) };
    match settings {
        Some(s) => json!({"modes": raw(&s.acp_modes), "config_options": raw(&s.acp_config_options)}),
        None => json!({"modes": null, "config_options": null}),
    }
}

/// The session's agent as the store last recorded it (`observed_at`), with
/// why the live state is missing, if it was asked for.
async fn stored_agent_state(app: &AppState, s: &SessionRow, error: Option<String>) -> Value {
    let mut view = match app.store.get_agent_instance(&s.agent_instance_id).await {
        Ok(Some(a)) => json!({"state": a.state, "restarts": a.restarts, "pid": a.pid, "last_error": a.error, "observed_at": a.updated_at}),
        _ => json!({}),
    };
    if let Some(error) = error {
        view["error"] = Value::String(error);
    }
    if view.as_object().is_some_and(|o| o.is_empty()) { Value::Null } else { view }
}

/// A session being created: what its container's creation or its agent's
/// start is doing (`installing`, `starting`), as the node reports it.
pub(super) async fn setup_stage(app: &AppState, s: &SessionRow) -> Value {
    let request = GetSetupStageRequest { container_id: s.container_id.clone() };
    let Ok((_, node)) = app.nodes.of_container(&s.container_id).await else { return Value::Null };
    match tokio::time::timeout(LIVE_STATE_WAIT, node.clone().get_setup_stage(request)).await {
        Ok(Ok(stage)) => match stage.into_inner().stage() {
            setup_stage::Stage::None => Value::Null,
            setup_stage::Stage::Installing => json!({"state": "installing"}),
            setup_stage::Stage::Starting => json!({"state": "starting"}),
        },
        _ => Value::Null,
    }
}

/// A session as clients see it, with its runs.
pub async fn view(app: &AppState, s: &SessionRow) -> Result<Value, Problem> {
    let runs = app.store.runs_of_session(&s.id).await?;
    let Live { agent: live, last_event_id } = agent_state(app, s).await;
    let mut agent = json!({"id": s.agent_id, "version": s.agent_version, "instance_id": s.agent_instance_id});
    // The modes and config options the agent announced for the session.
    let mut settings = json!({"modes": null, "config_options": null});
    if let Value::Object(mut live) = live {
        if let Some(Value::Object(announced)) = live.remove("settings") {
            settings = Value::Object(announced);
        }
        agent.as_object_mut().expect("an object").extend(live);
    }
    Ok(json!({
        "id": s.id,
        "container_id": s.container_id,
        "state": s.state,
        "agent": agent,
        "acp_session_id": s.acp_session_id,
        "modes": settings["modes"],
        "config_options": settings["config_options"],
        "working_dir": s.working_dir,
        "error": s.error,
        "error_code": s.error_code,
        "labels": serde_json::from_str::<Value>(&s.labels).unwrap_or_else(|_| json!({})),
        "created_at": s.created_at,
        "updated_at": s.updated_at,
        "runs": runs,
        "last_event_id": last_event_id,
    }))
}

#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    pub state: Option<String>,
    pub limit: Option<i64>,
    pub cursor: Option<String>,
    /// Only this container's sessions.
    pub container_id: Option<String>,
}

/// `GET /v1/sessions[?state=S][&container_id=C][&label=k=v]...[&limit=N][&cursor=C]`:
/// newest first, a page at a time (`next_cursor`).
pub async fn list(State(app): State<AppState>, Query(q): Query<ListQuery>, uri: axum::http::Uri) -> Result<Json<Value>, Problem> {
    let page = super::listing::Query { state: q.state, limit: q.limit, cursor: q.cursor };
    let filter = super::listing::filter("sessions", &page, q.container_id, uri.query())?;
    let sessions = app.store.list_sessions_page(&filter).await?;
    let last = sessions.last().map(|s| (s.created_at, s.id.as_str()));
    let next = super::listing::next_cursor("sessions", filter.limit, last, sessions.len());
    Ok(Json(json!({ "sessions": sessions, "next_cursor": next })))
}

pub async fn get(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    let s = app.store.get_session(&id).await?;
    Ok(Json(view(&app, &s).await?))
}

pub async fn create(
    State(app): State<AppState>,
    caller: Option<axum::Extension<crate::auth::Caller>>,
    headers: HeaderMap,
    ApiJson(raw): ApiJson<Value>,
) -> Result<Response, Problem> {
    let keyed = idempotency::from_headers(&headers, &raw)?;
    if let Some(k) = &keyed
        && let Some(first) = app.store.session_by_idempotency_key(&k.key).await?
    {
        return replay_create(&app, k, first, &headers).await;
    }
    let body: CreateSessionBody = serde_json::from_value(raw).map_err(|e| Problem::invalid(Code::InvalidRequest, e.to_string()))?;
    let labels = body.labels.clone().unwrap_or_default();
    super::listing::check_labels(&labels)?;
    let who = super::auth::authority(&app, caller.as_deref());
    let manual = body.manual_agent.is_some();
    let agent = match (body.manual_agent, body.agent_id) {
        (Some(_), Some(_)) => return Err(Problem::invalid(Code::InvalidRequest, "give manual_agent or agent_id, not both")),
        (Some(value), None) => {
            let agent = AgentSpec::from_json(&value).map_err(|e| Problem::invalid(Code::InvalidRequest, e.to_string()))?;
            crate::powers::check_manual_agent(who, &app.allowances, &agent, &this_platform())?;
            agent
        }
        (None, Some(id)) => {
            let row = app.store.registry_agent(&id).await?.ok_or_else(|| super::registry::unknown_agent(&id))?;
            let entry: Value = serde_json::from_str(&row.entry_json)
                .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, format!("stored registry entry {id}: {e}")))?;
            AgentSpec::from_json(&entry)
                .map_err(|e| Problem::new(StatusCode::INTERNAL_SERVER_ERROR, Code::Internal, format!("stored registry entry {id}: {e}")))?
        }
        (None, None) => return Err(Problem::invalid(Code::InvalidRequest, "give manual_agent or agent_id")),
    };
    // A further session in an existing container: its profile stays.
    let existing = match &body.container_id {
        None => None,
        Some(_) if body.container_profile.is_some() => {
            return Err(Problem::invalid(Code::InvalidRequest, "container_profile shapes a new container; leave it out with container_id"));
        }
        Some(id) => {
            let c = app.store.get_container(id).await?;
            if c.state != container::READY {
                return Err(Problem::conflict(Code::IllegalState, format!("container {id} is {}; only a ready container takes new sessions", c.state)));
            }
            Some(c)
        }
    };
    let profile_value = match &existing {
        Some(c) => Some(serde_json::from_str::<Value>(&c.profile_json).unwrap_or_else(|_| json!({}))),
        None => body.container_profile.clone(),
    };
    let profile = match &profile_value {
        Some(value) => Profile::from_json(value).map_err(|e| Problem::invalid(Code::parse(e.code()).unwrap_or(Code::InvalidProfile), e.to_string()))?,
        None => Profile::default(),
    };
    if existing.is_none() {
        // A registry agent's download over the host's network is the
        // operator's choice (the registry is theirs); a caller's own is not.
        let downloads = manual && matches!(agent.launch_for(&this_platform()), Ok(Launch::Npx(_) | Launch::Uvx(_)));
        let network_given = profile_value.as_ref().is_some_and(|p| p.get("network").is_some());
        crate::powers::check_profile(who, &app.allowances, "container_profile", &profile, network_given, downloads)?;
    }
    let session_options = body.session.unwrap_or_default();
    let open = flows::create::OpenOptions {
        mcp_servers_json: match &session_options.mcp_servers {
            None => String::new(),
            Some(servers) => crate::mcp::validate(servers).map_err(|e| Problem::invalid(Code::InvalidMcpServer, e.to_string()))?.to_string(),
        },
        load_acp_session_id: match session_options.load_session_id.as_deref() {
            Some("") => return Err(Problem::invalid(Code::InvalidRequest, "session.load_session_id must not be empty")),
            other => other.unwrap_or_default().to_string(),
        },
        resume_acp_session_id: match session_options.resume_session_id.as_deref() {
            Some("") => return Err(Problem::invalid(Code::InvalidRequest, "session.resume_session_id must not be empty")),
            Some(_) if session_options.load_session_id.is_some() => {
                return Err(Problem::invalid(Code::InvalidRequest, "give session.load_session_id or session.resume_session_id, not both"));
            }
            other => other.unwrap_or_default().to_string(),
        },
        additional_directories: plan::additional_directories(&session_options).map_err(|e| Problem::invalid(Code::InvalidAdditionalDirectory, e))?,
    };
    let policy = body.policy.unwrap_or_default();
    let agent_policy = policy.agent_policy()?;
    let permission_policy = policy.permissions.unwrap_or_else(|| "ask".into());
    if !["allow", "deny", "ask"].contains(&permission_policy.as_str()) {
        return Err(Problem::invalid(Code::InvalidRequest, format!("policy.permissions must be allow, deny or ask, got {permission_policy:?}")));
    }
    let permissions = (permission_policy, policy.ask_timeout_ms.unwrap_or(0));
    let container_id = existing.as_ref().map_or_else(|| new_id("ctr"), |c| c.id.clone());
    let session_id = new_id("ses");
    let instance_id = new_id("agi");
    let network_given = profile_value.as_ref().is_some_and(|p| p.get("network").is_some());
    let mut compiled = plan::compile(
        &container_id,
        &agent,
        &this_platform(),
        &session_options,
        ProfileInput { profile: &profile, network_given },
        &app.defaults,
    )
    .map_err(|e| match e {
        PlanError::NoDistribution(e) => Problem::invalid(Code::NoDistribution, e.to_string()),
        e @ PlanError::SecretsNeedOwnNetwork(_) => Problem::invalid(Code::InvalidSecret, e.to_string()),
        e => Problem::invalid(Code::InvalidRequest, e.to_string()),
    })?;
    compiled.agent.policy = Some(agent_policy);
    if existing.is_some() {
        compiled.agent = plan::delivered(&compiled);
    }
    let demand = Demand {
        memory: profile.memory_bytes.map_or(0, |b| i64::try_from(b).unwrap_or(i64::MAX)),
        cpus: profile.cpus.unwrap_or(0.0),
        node_id: profile.node_id.clone(),
        selector: profile.node_selector.clone(),
    };
    if existing.is_none() {
        let node_id = app.store.preview_placement(&demand, app.placement).await?;
        check_on_node(&app, &node_id, &compiled.sandbox).await?;
    }

    let profile = body.container_profile.unwrap_or_else(|| json!({})).to_string();
    // The rows and the step that builds them, in one transaction; a runner
    // (this process's, or another control plane's) runs the step.
    let kind = if existing.is_some() { flows::SESSION_OPEN } else { flows::SESSION_CREATE };
    let step_key = format!("{kind}:{session_id}");
    let payload = serde_json::to_value(flows::create::Payload::new(&compiled, &session_id, &instance_id, permissions, &open)).expect("payload serializes");
    let written: Result<(), Problem> = app.store
        .transaction(async |tx| {
            if existing.is_none() {
                let node_id = tx.choose_node(&demand, app.placement, true).await?;
                tx.insert_placed_container(&container_id, &node_id, &profile, &demand).await?;
            } else {
                // Its capacity holds against sessions opened at once.
                tx.lock_container_state(&container_id).await?;
                if let (Some(capacity), open) = tx.container_load(&container_id).await?
                    && open >= capacity
                {
                    return Err(Problem::conflict(Code::ContainerFull, format!("container {container_id} holds {capacity} sessions, all open")));
                }
            }
            tx.insert_session(NewSession {
                id: &session_id,
                container_id: &container_id,
                agent_id: &agent.id,
                agent_version: &agent.version,
                agent_instance_id: &instance_id,
                working_dir: &compiled.working_dir,
            })
            .await?;
            if let Some(k) = &keyed {
                tx.set_session_idempotency_key(&session_id, &k.key, &k.digest).await?;
            }
            if !labels.is_empty() {
                tx.set_session_labels(&session_id, &labels).await?;
            }
            tx.enqueue(NewStep::new(flows::CONTAINER, &container_id, kind, &step_key, payload)).await?;
            Ok(())
        })
        .await;
    if let (Err(p), Some(k)) = (&written, &keyed)
        && p.code == Code::IdempotencyKeyInUse
        && let Some(first) = app.store.session_by_idempotency_key(&k.key).await?
    {
        // A create with the same key committed first: answer as it does.
        return replay_create(&app, k, first, &headers).await;
    }
    written?;
    let location = format!("/v1/sessions/{session_id}");
    if prefers_async(&headers) {
        // The client follows the Location (`state` `creating` until the step
        // ends; the same request again with its Idempotency-Key waits for
        // the outcome); the step runs as it would otherwise.
        let s = app.store.get_session(&session_id).await?;
        return Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], [async_applied()], Json(view(&app, &s).await?)).into_response());
    }

    // The step runs to its end even if the client goes away, so nothing is
    // left half-created; the request waits for it to keep the contract (201
    // with the session, or the node's problem).
    let wait = CREATE_WAIT + std::time::Duration::from_millis(u64::from(app.defaults.initialize_timeout_ms));
    let waited = flows::wait_for_step(&app, &step_key, wait).await?;
    let s = app.store.get_session(&session_id).await?;
    match waited {
        flows::Waited::Finished(outcome) => outcome?,
        // Still being built (a slow or unreachable node): the client follows the Location.
        flows::Waited::Pending => {
            return Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(view(&app, &s).await?)).into_response());
        }
    }
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(view(&app, &s).await?)).into_response())
}

/// How long a create waits for the node's check of its plan.
const PLAN_CHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Asks the node whether it can build the plan (limits against its memory
/// and CPUs, the rootfs, mount sources), so that a plan it would refuse is
/// refused before any row or step is written. A node that does not answer
/// in time is no refusal: the step runs the same check when it reaches it.
pub(super) async fn check_on_node(app: &AppState, node_id: &str, sandbox: &agentd_proto::node::SandboxPlan) -> Result<(), Problem> {
    let request = CheckSandboxPlanRequest { plan: Some(sandbox.clone()) };
    let node = match app.nodes.client(node_id).await {
        Ok(node) => node,
        Err(status) => {
            tracing::debug!(node_id, error = %status, "cannot reach the node to check the plan; the create step will");
            return Ok(());
        }
    };
    match tokio::time::timeout(PLAN_CHECK_WAIT, node.clone().check_sandbox_plan(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) if !flows::transient(&status) => Err(Problem::from(status)),
        Ok(Err(status)) => {
            tracing::debug!(error = %status, "the node could not check the plan; the create step will");
            Ok(())
        }
        Err(_) => {
            tracing::debug!("the node did not check the plan in time; the create step will");
            Ok(())
        }
    }
}

/// Whether the client asked not to wait for the create (RFC 7240's
/// `Prefer: respond-async`).
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.split(';').next().is_some_and(|token| token.trim().eq_ignore_ascii_case("respond-async")))
}

fn async_applied() -> (header::HeaderName, header::HeaderValue) {
    (header::HeaderName::from_static("preference-applied"), header::HeaderValue::from_static("respond-async"))
}

/// A create repeated with its idempotency key: the first create's session,
/// answered as the first was once its step ends (201, or its problem; 202
/// while it is still being built), with the session as it is now. With
/// `Prefer: respond-async`, a session still being created is 202 at once.
async fn replay_create(app: &AppState, keyed: &Keyed, (session_id, digest): (String, Option<String>), headers: &HeaderMap) -> Result<Response, Problem> {
    idempotency::check_same(keyed, digest.as_deref(), "session create")?;
    if prefers_async(headers) {
        let s = app.store.get_session(&session_id).await?;
        if s.state == session_state::CREATING {
            let location = format!("/v1/sessions/{session_id}");
            let headers = [idempotency::replayed(), async_applied()];
            return Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], headers, Json(view(app, &s).await?)).into_response());
        }
    }
    let mut status = StatusCode::CREATED;
    // A new container's create, or an open in an existing one. The step
    // may be pruned long after: the session then says how it went.
    let mut step_key = None;
    for kind in [flows::SESSION_CREATE, flows::SESSION_OPEN] {
        let key = format!("{kind}:{session_id}");
        if app.store.get_step_by_key(&key).await?.is_some() {
            step_key = Some(key);
            break;
        }
    }
    if let Some(step_key) = step_key {
        let wait = CREATE_WAIT + std::time::Duration::from_millis(u64::from(app.defaults.initialize_timeout_ms));
        match flows::wait_for_step(app, &step_key, wait).await? {
            flows::Waited::Finished(outcome) => outcome?,
            flows::Waited::Pending => status = StatusCode::ACCEPTED,
        }
    }
    let s = app.store.get_session(&session_id).await?;
    let location = format!("/v1/sessions/{session_id}");
    Ok((status, [(header::LOCATION, location)], [idempotency::replayed()], Json(view(app, &s).await?)).into_response())
}

/// How long a create waits for its step besides the agent's initialize
/// timeout: building the sandbox, and a retry or two of an unreachable node.
const CREATE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `POST /v1/sessions/{id}:prompt` and `POST /v1/sessions/{id}:cancel`.
pub async fn action(State(app): State<AppState>, Path(target): Path<String>, headers: HeaderMap, body: axum::body::Bytes) -> Result<Response, Problem> {
    let Some((id, verb)) = target.rsplit_once(':') else {
        return Err(Problem::method_not_allowed("GET, DELETE", "POST a session action: {id}:prompt, :cancel, :set_mode or :set_config_option"));
    };
    match verb {
        "prompt" => {
            let body: PromptBody = parse_body(&body)?;
            prompt(app, id, &headers, body).await
        }
        "cancel" => {
            let body: CancelBody = if body.is_empty() { CancelBody::default() } else { parse_body(&body)? };
            cancel(app, id, body.run_id).await
        }
        "set_mode" => {
            let body: SetModeBody = parse_body(&body)?;
            let s = app.store.get_session(id).await?;
            require_ready(&s)?;
            let (_, mut node) = app.nodes.of_container(&s.container_id).await?;
            let answer = node_call(&app, node.set_session_mode(SetSessionModeRequest { session_id: s.id.clone(), mode_id: body.mode_id })).await?;
            Ok(settings(&s.id, answer))
        }
        "set_config_option" => {
            let body: SetConfigOptionBody = parse_body(&body)?;
            let s = app.store.get_session(id).await?;
            require_ready(&s)?;
            let request = SetSessionConfigOptionRequest { session_id: s.id.clone(), config_id: body.config_id, acp_value: body.value.to_string() };
            let (_, mut node) = app.nodes.of_container(&s.container_id).await?;
            let answer = node_call(&app, node.set_session_config_option(request)).await?;
            Ok(settings(&s.id, answer))
        }
        other => Err(Problem::not_found(
            Code::UnknownAction,
            format!("no session action {other:?} (try prompt, cancel, set_mode or set_config_option)"),
        )),
    }
}

/// The session's modes and config options after a change.
fn settings(session_id: &str, answer: SessionSettingResponse) -> Response {
    let mut body = acp_settings(answer.settings.as_ref());
    body["session_id"] = json!(session_id);
    (StatusCode::OK, Json(body)).into_response()
}

pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Problem> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| Problem::new(StatusCode::BAD_REQUEST, Code::InvalidJson, format!("body is not valid JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| Problem::invalid(Code::InvalidRequest, e.to_string()))
}

/// A prompt is a string (one text block) or ACP content blocks.
fn content_blocks(prompt: Value) -> Result<Value, Problem> {
    match prompt {
        Value::String(text) => Ok(json!([{"type": "text", "text": text}])),
        Value::Array(blocks) if !blocks.is_empty() && blocks.iter().all(|b| b.get("type").is_some_and(Value::is_string)) => {
            Ok(Value::Array(blocks))
        }
        _ => Err(Problem::invalid(Code::InvalidPrompt, "prompt must be a string or a non-empty array of ACP content blocks")),
    }
}

fn require_ready(s: &SessionRow) -> Result<(), Problem> {
    if s.state != session_state::READY {
        return Err(Problem::conflict(Code::IllegalState, format!("session {} is {}", s.id, s.state)));
    }
    Ok(())
}

async fn prompt(app: AppState, id: &str, headers: &HeaderMap, body: PromptBody) -> Result<Response, Problem> {
    let blocks = content_blocks(body.prompt)?;
    let keyed = idempotency::from_headers(headers, &blocks)?;
    let s = app.store.get_session(id).await?;
    if let Some(k) = &keyed
        && let Some(first) = app.store.run_by_idempotency_key(&s.id, &k.key).await?
    {
        return replay_prompt(&app, &s, k, first).await;
    }
    require_ready(&s)?;
    let run_id = new_id("run");
    let key = format!("{}:{run_id}", flows::RUN_DISPATCH);
    let payload = flows::dispatch::Payload { session_id: s.id.clone(), run_id: run_id.clone(), prompt_json: blocks.to_string() };
    let payload = serde_json::to_value(payload).expect("payload serializes");
    let dispatch = NewStep::new(flows::CONTAINER, &s.container_id, flows::RUN_DISPATCH, &key, payload);
    let claimed = match claim_run(&app, &s, &run_id, dispatch, keyed.as_ref()).await {
        Ok(claimed) => claimed,
        Err(problem) => {
            // A prompt with the same key that committed first (its run is
            // the running one) is the answer.
            if let Some(k) = &keyed
                && let Some(first) = app.store.run_by_idempotency_key(&s.id, &k.key).await?
            {
                return replay_prompt(&app, &s, k, first).await;
            }
            return Err(problem);
        }
    };
    // Waits for the node to take the prompt, so that its refusals (a
    // hibernated container, say) reach the client as before. The step runs
    // here when it could be leased with the run, else on a runner.
    let ran = match claimed {
        Some(step) => {
            let a = app.clone();
            workflow::inline::run(&app.store, &app.steps, step, move |ctx| flows::dispatch::run(a.clone(), ctx)).await
        }
        None => None,
    };
    let state = match ran {
        Some(Ok(result)) => flows::outcome(Some(&result)).map(|()| TAKEN.to_string())?,
        // A failure that may pass is retried by the runners: wait for them.
        _ => wait_for_dispatch(&app, &key, &run_id).await?,
    };
    Ok((StatusCode::ACCEPTED, Json(prompt_answer(&run_id, &s.id, &state))).into_response())
}

/// The state a prompt answers with once the node took its turn: its events
/// flow (the store records it with the dispatch step's end, a moment later).
const TAKEN: &str = run_state::STREAMING;

/// Waits for a prompt's dispatch step on the runners; the run's state to
/// answer with.
async fn wait_for_dispatch(app: &AppState, key: &str, run_id: &str) -> Result<String, Problem> {
    match flows::wait_for_step(app, key, DISPATCH_WAIT).await? {
        flows::Waited::Finished(outcome) => Ok(outcome.map(|()| TAKEN.to_string())?),
        flows::Waited::Pending => {
            tracing::warn!(run_id, "prompt not yet taken by the node; answering 202 anyway");
            Ok(app.store.get_run(run_id).await?.state)
        }
    }
}

fn prompt_answer(run_id: &str, session_id: &str, state: &str) -> Value {
    json!({"run_id": run_id, "session_id": session_id, "state": state})
}

/// A prompt repeated with its idempotency key: the first prompt's run,
/// answered as the first was (202 once the node took it, or its problem).
async fn replay_prompt(app: &AppState, s: &SessionRow, keyed: &Keyed, (run_id, digest): (String, Option<String>)) -> Result<Response, Problem> {
    idempotency::check_same(keyed, digest.as_deref(), "prompt")?;
    let key = format!("{}:{run_id}", flows::RUN_DISPATCH);
    // The step may be pruned long after: the node took the prompt then.
    let state = match app.store.get_step_by_key(&key).await? {
        Some(_) => wait_for_dispatch(app, &key, &run_id).await?,
        None => app.store.get_run(&run_id).await?.state,
    };
    Ok((StatusCode::ACCEPTED, [idempotency::replayed()], Json(prompt_answer(&run_id, &s.id, &state))).into_response())
}

/// How long a prompt waits for its dispatch step before answering 202
/// regardless (the step goes on).
const DISPATCH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Records a new running run; a run the store calls active is the answer
/// (409 `run_active`). The store learns a turn's end from the node's journal
/// (`fleet::watch`, the one path run ends take), and the event stream shows
/// a client `run.completed` only once the store has it (`api::events`), so a
/// client that prompts again on seeing the end finds the session free.
///
/// The run and its dispatch step are written in one transaction, which also
/// leases the step to this control plane when nothing older of its container
/// is open: the prompt then runs it itself. Returns the leased step. The
/// prompt's idempotency key, if any, is stored with the run.
async fn claim_run(app: &AppState, s: &SessionRow, run_id: &str, dispatch: NewStep<'_>, keyed: Option<&Keyed>) -> Result<Option<OutboxRow>, Problem> {
    let inserted = app
        .store
        .transaction(async |tx| {
            let container_state = tx.lock_container_state(&s.container_id).await?;
            if container_state != container::READY {
                return Ok(Err(container_not_ready(&s.container_id, &container_state)));
            }
            // The step is leased here unless an older step of the
            // container holds it back: the run then waits for a runner.
            let step = tx.enqueue(dispatch.clone()).await?;
            let claimed = tx.claim_enqueued(&step, &app.steps.owner, app.steps.lease).await?;
            let first = if claimed.is_some() { run_state::DISPATCHING } else { run_state::QUEUED };
            tx.insert_run(run_id, &s.id, first).await?;
            if let Some(k) = keyed {
                tx.set_run_idempotency_key(run_id, &k.key, &k.digest).await?;
            }
            Ok(Ok(claimed))
        })
        .await;
    match inserted {
        Err(StoreError::RunActive { .. }) => {
            let active = app.store.running_runs_of_session(&s.id).await?;
            let running = active.first().map_or("a run", |r| r.id.as_str());
            Err(Problem::conflict(Code::RunActive, format!("{running} is still running on session {}", s.id)))
        }
        other => other?,
    }
}

/// Why a turn cannot start in a container that is not ready; no run is
/// recorded for it.
fn container_not_ready(id: &str, state: &str) -> Problem {
    if state == container::HIBERNATED {
        return Problem::conflict(Code::ContainerHibernated, format!("container {id} is hibernated: resume it first"));
    }
    Problem::conflict(Code::IllegalState, format!("container {id} is {state}"))
}

/// `:cancel`'s body: the run to cancel, as the original agentd named it.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelBody {
    #[serde(default)]
    pub run_id: Option<String>,
}

async fn cancel(app: AppState, id: &str, run_id: Option<String>) -> Result<Response, Problem> {
    let s = app.store.get_session(id).await?;
    require_ready(&s)?;
    if let Some(run_id) = &run_id {
        let active = app.store.running_runs_of_session(&s.id).await?;
        if !active.iter().any(|r| &r.id == run_id) {
            let what = active.first().map_or("no run is".to_string(), |r| format!("run {} is", r.id));
            return Err(Problem::conflict(Code::RunNotActive, format!("run {run_id} is not the session's active run: {what} active")));
        }
    }
    let (_, mut node) = app.nodes.of_container(&s.container_id).await?;
    let answer = node_call(&app, node.cancel(CancelRequest { container_id: s.container_id.clone(), session_id: s.id.clone() })).await?;
    if !answer.was_running {
        return Err(Problem::conflict(Code::NoActiveRun, format!("session {id} has no running turn")));
    }
    Ok((StatusCode::ACCEPTED, Json(json!({"session_id": s.id, "cancelling": true}))).into_response())
}

pub async fn delete(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, Problem> {
    use super::containers::deleted_status;
    let s = app.store.get_session(&id).await?;
    // Deleting a session again is answered as the first delete was.
    if s.state == session_state::CLOSED {
        return Ok(StatusCode::NO_CONTENT);
    }
    let c = app.store.get_container(&s.container_id).await?;
    if c.state == container::DELETED {
        app.store.session_closed(&id).await?;
        return Ok(StatusCode::NO_CONTENT);
    }
    if c.state == container::STOPPING {
        // Its container is being deleted, and the session with it.
        return Ok(deleted_status(flows::delete::request(&app, &c.id, "session deleted").await?));
    }
    if open_sessions_besides(&app, &c.id, &s.id).await? == 0 {
        // The container's last session: the sandbox goes with it, after the
        // agent had its session/close (a ready sandbox only: a frozen one
        // cannot answer).
        if c.state == container::READY && s.state == session_state::READY {
            flows::close::request(&app, &c.id, &s.id).await?;
            // A create with this container_id that came in meanwhile keeps it.
            if open_sessions_besides(&app, &c.id, &s.id).await? > 0 {
                return Ok(StatusCode::NO_CONTENT);
            }
        }
        return Ok(deleted_status(flows::delete::request(&app, &c.id, "session deleted").await?));
    }
    if c.state != container::READY {
        return Err(Problem::conflict(Code::IllegalState, format!("container {} is {}: resume it before closing one of its sessions", c.id, c.state)));
    }
    flows::close::request(&app, &c.id, &s.id).await?;
    // Two deletes at once may each have seen the other's session open: the
    // one that finds none left afterwards removes the container.
    if open_sessions_besides(&app, &c.id, &s.id).await? == 0 {
        return Ok(deleted_status(flows::delete::request(&app, &c.id, "session deleted").await?));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How many sessions of the container besides `session_id` are open
/// (creating or ready).
async fn open_sessions_besides(app: &AppState, container_id: &str, session_id: &str) -> Result<usize, Problem> {
    let open = [session_state::CREATING, session_state::READY];
    let sessions = app.store.sessions_of_container(container_id).await?;
    Ok(sessions.iter().filter(|o| o.id != session_id && open.contains(&o.state.as_str())).count())
}

/// `GET /v1/runs/{id}`: one run, with its state and times.
pub async fn get_run(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, Problem> {
    Ok(Json(serde_json::to_value(app.store.get_run(&id).await?).expect("a run serializes")))
}

/// `POST /v1/sessions/{id}/permissions/{request_id}` with `{"option_id": ...}`:
/// a client's answer to a `permission.requested` event.
pub async fn answer_permission(
    State(app): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    ApiJson(body): ApiJson<PermissionAnswer>,
) -> Result<StatusCode, Problem> {
    let s = app.store.get_session(&id).await?;
    require_ready(&s)?;
    let (_, mut node) = app.nodes.of_container(&s.container_id).await?;
    node_call(&app, node.answer_permission(AnswerPermissionRequest { session_id: s.id.clone(), request_id, option_id: body.option_id })).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A node call a request makes itself, under the deadline of every node
/// call: a node that does not answer is 504 `node_timeout`, not a request
/// that hangs.
async fn node_call<T>(
    app: &AppState,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Problem> {
    match tokio::time::timeout(app.node_call_timeout, call).await {
        Ok(answer) => Ok(answer?.into_inner()),
        Err(_) => Err(Problem::new(
            StatusCode::GATEWAY_TIMEOUT,
            Code::NodeTimeout,
            format!("the node did not answer within {:?}", app.node_call_timeout),
        )),
    }
}
