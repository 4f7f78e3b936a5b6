//! `session.create`: sandbox, agent and ACP session on the node, then the
//! container and session recorded ready. Written by `POST /v1/sessions`
//! with the container (`provisioning`) and session (`creating`) rows.

use crate::domain::Code;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use agentd_proto::common::PermissionMode;
use crate::fleet::nodes::NodeClient;
use agentd_proto::node::{AgentInstance, AgentPlan, CreateSandboxRequest, CreateSessionRequest, DeleteSandboxRequest, SandboxPlan, StartAgentRequest};

use super::{agent_deadline, deadline, fence, failed, within, node_error, ok, store_error, test_pause, transient};
use crate::AppState;
use crate::domain::{Class, Refusal};
use crate::plan::Compiled;
use crate::store::StoreError;
use crate::store::states::{container, session};
use crate::workflow::{StepContext, StepError, StepResult};

/// How a session opens: the parts of its create body the agent gets.
#[derive(Debug, Default, Clone)]
pub struct OpenOptions {
    pub mcp_servers_json: String,
    pub load_acp_session_id: String,
    pub resume_acp_session_id: String,
    pub additional_directories: Vec<String>,
}

/// What the step needs, fixed when the API accepted the request: the plans
/// exactly as compiled then (protobuf, base64), so a retry runs the same plan.
#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    pub session_id: String,
    pub agent_instance_id: String,
    pub sandbox_plan: String,
    pub agent_plan: String,
    pub working_dir: String,
    pub permission_policy: String,
    pub permission_timeout_ms: u32,
    /// The validated ACP `mcpServers` (JSON array); empty for none.
    #[serde(default)]
    pub mcp_servers_json: String,
    /// An ACP session to `session/load` instead of `session/new`.
    #[serde(default)]
    pub load_acp_session_id: String,
    /// An ACP session to `session/resume` instead of `session/new`.
    #[serde(default)]
    pub resume_acp_session_id: String,
    /// The session's further file roots (validated).
    #[serde(default)]
    pub additional_directories: Vec<String>,
}

/// The session's permission policy (checked by the API: allow, deny, ask).
fn permission_mode(policy: &str) -> PermissionMode {
    match policy {
        "allow" => PermissionMode::Allow,
        "deny" => PermissionMode::Deny,
        _ => PermissionMode::Ask,
    }
}

impl Payload {
    pub fn new(compiled: &Compiled, session_id: &str, agent_instance_id: &str, permissions: (String, u32), open: &OpenOptions) -> Self {
        Self {
            mcp_servers_json: open.mcp_servers_json.clone(),
            load_acp_session_id: open.load_acp_session_id.clone(),
            resume_acp_session_id: open.resume_acp_session_id.clone(),
            additional_directories: open.additional_directories.clone(),
            session_id: session_id.to_string(),
            agent_instance_id: agent_instance_id.to_string(),
            sandbox_plan: B64.encode(compiled.sandbox.encode_to_vec()),
            agent_plan: B64.encode(compiled.agent.encode_to_vec()),
            working_dir: compiled.working_dir.clone(),
            permission_policy: permissions.0,
            permission_timeout_ms: permissions.1,
        }
    }

    pub(super) fn agent_plan(&self) -> Result<AgentPlan, String> {
        let agent = B64.decode(&self.agent_plan).map_err(|e| e.to_string())?;
        AgentPlan::decode(agent.as_slice()).map_err(|e| e.to_string())
    }

    /// The `CreateSession` call of this session on `agent_instance_id`.
    pub(super) fn create_session(&self, ctx: &StepContext, container_id: &str, agent_instance_id: &str) -> CreateSessionRequest {
        CreateSessionRequest {
            container_id: container_id.to_string(),
            agent_instance_id: agent_instance_id.to_string(),
            session_id: self.session_id.clone(),
            cwd: self.working_dir.clone(),
            permission_mode: permission_mode(&self.permission_policy).into(),
            permission_timeout_ms: self.permission_timeout_ms,
            acp_mcp_servers: self.mcp_servers_json.clone(),
            load_acp_session_id: self.load_acp_session_id.clone(),
            resume_acp_session_id: self.resume_acp_session_id.clone(),
            additional_directories: self.additional_directories.clone(),
            fence: fence(ctx, "session"),
        }
    }

    fn plans(&self) -> Result<(SandboxPlan, AgentPlan), String> {
        let sandbox = B64.decode(&self.sandbox_plan).map_err(|e| e.to_string())?;
        let agent = B64.decode(&self.agent_plan).map_err(|e| e.to_string())?;
        let sandbox = SandboxPlan::decode(sandbox.as_slice()).map_err(|e| e.to_string())?;
        let agent = AgentPlan::decode(agent.as_slice()).map_err(|e| e.to_string())?;
        Ok((sandbox, agent))
    }
}

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let container_id = ctx.entity_id.as_str();
    let c = app.store.get_container(container_id).await.map_err(store_error)?;
    if c.state != container::PROVISIONING {
        return already_settled(&app, &ctx, &payload, &c.state).await;
    }
    let (sandbox_plan, agent_plan) = payload.plans().map_err(|e| StepError::permanent(format!("bad plan in payload: {e}")))?;
    let bundles: Vec<(String, String)> = sandbox_plan.bundles.iter().map(|b| (b.archive_url.clone(), b.sha256.clone())).collect();

    let mut node = super::node_for(&app, &c.node_id).await?;
    let made: Result<(i32, String, AgentInstance), tonic::Status> = async {
        let create = node.create_sandbox(CreateSandboxRequest { plan: Some(sandbox_plan), fence: fence(&ctx, "sandbox") });
        let started = std::time::Instant::now();
        let sandbox = within(deadline(&app), create).await?.into_inner();
        app.store.metrics().sandbox_created(started.elapsed());
        test_pause("session.create/sandbox").await;
        let start = node.start_agent(StartAgentRequest {
            container_id: container_id.to_string(),
            agent_instance_id: payload.agent_instance_id.clone(),
            agent: Some(agent_plan),
            reuse: false,
            fence: fence(&ctx, "agent"),
        });
        let agent = within(agent_deadline(&app), start).await?.into_inner();
        let open = node.create_session(payload.create_session(&ctx, container_id, &payload.agent_instance_id));
        let info = within(agent_deadline(&app), open).await?.into_inner();
        Ok((sandbox.supervisor_pid, info.acp_session_id, agent))
    }
    .await;

    match made {
        Ok((pid, acp_session_id, agent)) => {
            let s = app.store.get_session(&payload.session_id).await.map_err(store_error)?;
            super::agents::observe_started(&app, &s, &payload.agent_instance_id, &agent).await.map_err(store_error)?;
            for (url, sha256) in &bundles {
                app.store.bundle_used(&c.node_id, url, sha256).await.map_err(store_error)?;
            }
            record_ready(&app, container_id, &payload.session_id, pid, &acp_session_id).await
        }
        Err(status) if transient(&status) && !ctx.is_last_attempt() => Err(node_error("create session", &status)),
        Err(status) => {
            let problem = Refusal::from_node(&status);
            undo(&app, &ctx, &mut node, container_id, &payload.session_id, &problem).await?;
            Ok(failed(&problem))
        }
    }
}

async fn record_ready(app: &AppState, container_id: &str, session_id: &str, pid: i32, acp_session_id: &str) -> StepResult {
    match app.store.container_and_session_ready(container_id, pid, session_id, acp_session_id).await {
        Ok(()) => {}
        // A delete overtook the create: its step, queued behind this one,
        // removes the sandbox and closes the session.
        Err(StoreError::Illegal(e)) => {
            return Ok(failed(&Refusal::conflict(Code::IllegalState, format!("{e} (deleted while being created)"))));
        }
        Err(e) => return Err(store_error(e)),
    }
    Ok(ok())
}

/// The node refused: remove what was built and record the failure.
async fn undo(
    app: &AppState,
    ctx: &StepContext,
    node: &mut NodeClient,
    container_id: &str,
    session_id: &str,
    problem: &Refusal,
) -> Result<(), StepError> {
    let delete = DeleteSandboxRequest { container_id: container_id.to_string(), fence: fence(ctx, "undo") };
    if let Err(e) = within(deadline(app), node.delete_sandbox(delete)).await {
        tracing::warn!(container_id, error = %e, "cannot remove the sandbox of a failed create");
    }
    let record = async {
        app.store.container_failed_with(container_id, &problem.detail, problem.code.as_str()).await?;
        app.store.container_deleted(container_id).await?;
        app.store.session_failed_with(session_id, &problem.detail, problem.code.as_str()).await
    };
    match record.await {
        Ok(()) | Err(StoreError::Illegal(_)) => Ok(()),
        Err(e) => Err(store_error(e)),
    }
}

/// The container left `provisioning` before this attempt: an earlier attempt
/// finished (its runner died before recording the step done), or a delete
/// overtook it. Answers what the first attempt would have.
async fn already_settled(app: &AppState, ctx: &StepContext, payload: &Payload, state: &str) -> StepResult {
    let s = app.store.get_session(&payload.session_id).await.map_err(store_error)?;
    if s.state == session::READY {
        return Ok(ok());
    }
    let detail = s.error.unwrap_or_else(|| format!("container {} is {state}", ctx.entity_id));
    let (class, code) =
        if state == container::DELETED || state == container::STOPPING { (Class::Conflict, Code::IllegalState) } else { (Class::BadGateway, Code::SandboxFailed) };
    Ok::<Value, StepError>(failed(&Refusal::new(class, code, detail)))
}
