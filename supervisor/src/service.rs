//! The `Supervisor` gRPC service: one method per request, each a thin call into
//! [`Agents`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use agentd_proto::common;
use agentd_proto::supervisor::supervisor_server::Supervisor;
use agentd_proto::supervisor::*;
use futures::Stream;
use tokio::sync::watch;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::agents::{Agents, DEFAULT_REQUEST_TIMEOUT, Existing, OpenSpec, StartSpec};
use super::permissions::Policy;
use super::restart::RestartPolicy;

/// Used when a request leaves the initialize timeout unset.
const DEFAULT_INITIALIZE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct SupervisorService {
    agents: Arc<Agents>,
    /// Set to the grace period to stop the supervisor.
    stop: watch::Sender<Option<Duration>>,
}

impl SupervisorService {
    pub fn new(agents: Arc<Agents>, stop: watch::Sender<Option<Duration>>) -> Self {
        Self { agents, stop }
    }
}

impl SupervisorService {
    fn settings(&self, agent_id: &str, session_id: &str, answer: serde_json::Value) -> SessionSettingResponse {
        let settings = self.agents.get(agent_id).ok().map(|a| a.session_settings(session_id));
        SessionSettingResponse { acp_answer: answer.to_string(), settings }
    }
}

/// An agent's state as the contract spells it.
fn agent_state(state: &str) -> common::AgentState {
    match state {
        "starting" => common::AgentState::Starting,
        "ready" => common::AgentState::Ready,
        "running" => common::AgentState::Running,
        "auth_required" => common::AgentState::AuthRequired,
        "exited" => common::AgentState::Exited,
        "failed" => common::AgentState::Failed,
        _ => common::AgentState::Unspecified,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<PromptEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Supervisor for SupervisorService {
    async fn start_agent(&self, req: Request<StartAgentRequest>) -> Result<Response<StartAgentResponse>, Status> {
        let r = req.into_inner();
        let timeout = match r.initialize_timeout_ms {
            0 => DEFAULT_INITIALIZE_TIMEOUT,
            ms => Duration::from_millis(ms.into()),
        };
        let policy = r.policy.unwrap_or_default();
        let invalid = |e: String| agentd_proto::error::status(tonic::Code::InvalidArgument, "invalid_request", e);
        let restart = RestartPolicy::new(policy.restart(), policy.max_restarts, policy.restart_backoff_ms);
        let seccomp_json = match &r.seccomp {
            None => None,
            Some(policy) => Some(agentd_proto::convert::seccomp(policy).map_err(invalid)?.to_json()),
        };
        let spec = StartSpec {
            id: r.agent_instance_id,
            command: r.command,
            args: r.args,
            env: r.env,
            cwd: r.cwd,
            initialize_timeout: timeout,
            seccomp_json,
            restart,
            request_timeout: match policy.request_timeout_ms {
                0 => DEFAULT_REQUEST_TIMEOUT,
                ms => Duration::from_millis(ms.into()),
            },
            auth_method: (!policy.auth_method.is_empty()).then_some(policy.auth_method),
        };
        let agent = self.agents.start(spec, r.reuse).await?;
        let initialized = agent.initialized().unwrap_or_default();
        Ok(Response::new(StartAgentResponse {
            pid: agent.pid(),
            protocol_version: initialized.protocol_version as u32,
            acp_initialize: initialized.raw,
            agent_instance_id: agent.id.clone(),
        }))
    }

    async fn new_session(&self, req: Request<NewSessionRequest>) -> Result<Response<NewSessionResponse>, Status> {
        let r = req.into_inner();
        let policy = Policy::new(r.permission_mode(), r.permission_timeout_ms);
        let mcp_servers = match r.acp_mcp_servers.as_str() {
            "" => serde_json::json!([]),
            json => serde_json::from_str(json)
                .map_err(|e| agentd_proto::error::status(tonic::Code::InvalidArgument, "invalid_mcp_server", format!("mcpServers is not JSON: {e}")))?,
        };
        let existing = match (r.load_session_id.is_empty(), r.resume_session_id.is_empty()) {
            (true, true) => None,
            (false, true) => Some(Existing::Load(r.load_session_id)),
            (true, false) => Some(Existing::Resume(r.resume_session_id)),
            (false, false) => {
                return Err(agentd_proto::error::status(tonic::Code::InvalidArgument, "invalid_request", "load a session or resume it, not both"));
            }
        };
        let open = OpenSpec { cwd: r.cwd, policy, mcp_servers, additional_directories: r.additional_directories, existing };
        let opened = self.agents.new_session(&r.agent_instance_id, open).await?;
        Ok(Response::new(NewSessionResponse { acp_session_id: opened.acp_session_id, acp_replay: opened.replay }))
    }

    async fn close_session(&self, req: Request<CloseSessionRequest>) -> Result<Response<CloseSessionResponse>, Status> {
        let r = req.into_inner();
        let (closed_by_agent, agent_stopped) = self.agents.close_session(&r.agent_instance_id, &r.acp_session_id).await?;
        Ok(Response::new(CloseSessionResponse { closed_by_agent, agent_stopped }))
    }

    async fn list_sessions(&self, req: Request<ListSessionsRequest>) -> Result<Response<ListSessionsResponse>, Status> {
        let r = req.into_inner();
        let answer = self.agents.list_sessions(&r.agent_instance_id, &r.cwd, &r.cursor).await?;
        Ok(Response::new(ListSessionsResponse { acp_answer: answer.to_string() }))
    }

    type PromptStream = EventStream;

    async fn prompt(&self, req: Request<PromptRequest>) -> Result<Response<Self::PromptStream>, Status> {
        let r = req.into_inner();
        let turn = self.agents.prompt(&r.agent_instance_id, &r.acp_session_id, &r.acp_prompt, &r.turn_id)?;
        Ok(Response::new(Box::pin(turn.follow(0).map(Ok))))
    }

    type AttachTurnStream = EventStream;

    async fn attach_turn(&self, req: Request<AttachTurnRequest>) -> Result<Response<Self::AttachTurnStream>, Status> {
        let r = req.into_inner();
        let turn = self.agents.attach(&r.agent_instance_id, &r.acp_session_id, &r.turn_id)?;
        // The node has logged these: they need not be kept any longer.
        turn.forget_through(r.after);
        tracing::info!(turn = turn.id, after = r.after, finished = turn.is_finished(), "the node takes up a turn again");
        Ok(Response::new(Box::pin(turn.follow(r.after).map(Ok))))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let r = req.into_inner();
        let was_running = self.agents.cancel(&r.agent_instance_id, &r.acp_session_id)?;
        Ok(Response::new(CancelResponse { was_running }))
    }

    async fn answer_permission(&self, req: Request<AnswerPermissionRequest>) -> Result<Response<AnswerPermissionResponse>, Status> {
        let r = req.into_inner();
        self.agents.answer_permission(&r.agent_instance_id, &r.request_id, &r.option_id)?;
        Ok(Response::new(AnswerPermissionResponse {}))
    }

    async fn set_session_mode(&self, req: Request<SetSessionModeRequest>) -> Result<Response<SessionSettingResponse>, Status> {
        let r = req.into_inner();
        let answer = self.agents.set_mode(&r.agent_instance_id, &r.acp_session_id, &r.mode_id).await?;
        Ok(Response::new(self.settings(&r.agent_instance_id, &r.acp_session_id, answer)))
    }

    async fn set_session_config_option(
        &self,
        req: Request<SetSessionConfigOptionRequest>,
    ) -> Result<Response<SessionSettingResponse>, Status> {
        let r = req.into_inner();
        let value = serde_json::from_str(&r.acp_value)
            .map_err(|e| agentd_proto::error::status(tonic::Code::InvalidArgument, "invalid_request", format!("value is not JSON: {e}")))?;
        let answer = self.agents.set_config_option(&r.agent_instance_id, &r.acp_session_id, &r.config_id, value).await?;
        Ok(Response::new(self.settings(&r.agent_instance_id, &r.acp_session_id, answer)))
    }

    async fn status(&self, _req: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let agents = self
            .agents
            .list()
            .iter()
            .map(|a| {
                let s = a.status();
                AgentStatus {
                    agent_instance_id: a.id.clone(),
                    pid: a.pid(),
                    state: agent_state(s.state).into(),
                    restarts: s.restarts,
                    last_error: s.last_error.unwrap_or_default(),
                    session_settings: a.all_session_settings(),
                }
            })
            .collect();
        Ok(Response::new(StatusResponse { agents }))
    }

    /// Stops the agents before answering, so that the caller learns how they
    /// ended and may kill the sandbox as soon as it has the answer; the
    /// supervisor then exits.
    async fn shutdown(&self, req: Request<ShutdownRequest>) -> Result<Response<ShutdownResponse>, Status> {
        let grace = Duration::from_millis(req.into_inner().grace_ms.into());
        let stopped = self.agents.stop_all(grace).await;
        let _ = self.stop.send(Some(grace));
        let agents = stopped
            .into_iter()
            .map(|s| AgentStopped {
                agent_instance_id: s.agent_id,
                pid: s.pid,
                exit: s.exit.map(|e| e.to_string()).unwrap_or_default(),
                after_ms: s.after.as_millis().min(u32::MAX as u128) as u32,
                killed: s.killed,
                stderr_tail: s.stderr_tail,
            })
            .collect();
        Ok(Response::new(ShutdownResponse { agents }))
    }
}
