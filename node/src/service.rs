//! The `Node` gRPC service.

use std::pin::Pin;
use std::sync::Arc;

use agentd_proto::error::status;
use agentd_proto::node::node_server;
use agentd_proto::node::*;
use agentd_proto::supervisor::supervisor_client::SupervisorClient;
use agentd_proto::supervisor::{self as sup, prompt_event};
use agentd_proto::common;
use agentd_proto::node::journal_entry::Fact;
use agentd_proto::node::session_event::Event;
use futures::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Node;
use crate::event_log::EventLog;
use crate::journal::Journal;
use crate::sandboxes::{Sandbox as NodeSandbox, valid_id};
use crate::sessions::NodeSession;

pub struct NodeService {
    node: Arc<Node>,
}

impl NodeService {
    pub fn new(node: Arc<Node>) -> Self {
        Self { node }
    }

    /// Runs a fenced operation (see `fence.rs`) on a task of its own: a
    /// control plane that stops waiting (its deadline passed, its process
    /// died) does not cancel the operation half-way; it finishes, its answer
    /// is remembered, and the retry, queued on the entity's fence meanwhile,
    /// gets that answer.
    async fn fenced<T, F, Fut>(&self, entity: String, fence: Option<Fence>, op: F) -> Result<T, Status>
    where
        T: prost::Message + Default + Send + 'static,
        F: FnOnce(NodeService) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Status>> + Send + 'static,
    {
        let node = Arc::clone(&self.node);
        let service = NodeService { node: Arc::clone(&self.node) };
        tokio::spawn(async move { node.fences.run(&entity, fence.as_ref(), op(service)).await })
            .await
            .map_err(|e| status(Code::Internal, "internal", format!("fenced call: {e}")))?
    }

    // The operations behind the fenced calls.

    async fn start_agent_unfenced(&self, r: StartAgentRequest) -> Result<AgentInstance, Status> {
        let agent = r.agent.ok_or_else(|| status(Code::InvalidArgument, "invalid_request", "agent plan is required"))?;
        let sandbox = self.node.sandboxes.get(&r.container_id)?;
        let command = crate::delivery::command(&self.node, &sandbox, &agent).await?;
        // The secrets' endpoints and placeholders, over whatever the plan says.
        let mut env = agent.env;
        env.extend(sandbox.proxies.env());
        let answer = sandbox
            .supervisor
            .clone()
            .start_agent(sup::StartAgentRequest {
                agent_instance_id: r.agent_instance_id.clone(),
                command,
                args: agent.args,
                env,
                cwd: agent.cwd,
                initialize_timeout_ms: agent.initialize_timeout_ms,
                seccomp: sandbox.seccomp.clone(),
                policy: agent.policy,
                reuse: r.reuse,
            })
            .await?
            .into_inner();
        Ok(AgentInstance {
            agent_instance_id: if answer.agent_instance_id.is_empty() { r.agent_instance_id } else { answer.agent_instance_id },
            state: common::AgentState::Ready.into(),
            pid: answer.pid,
            protocol_version: answer.protocol_version,
            acp_initialize: answer.acp_initialize,
        })
    }

    async fn create_session_unfenced(&self, r: CreateSessionRequest) -> Result<SessionInfo, Status> {
        if !valid_id(&r.session_id) {
            return Err(status(Code::InvalidArgument, "invalid_request", format!("invalid session id {:?}", r.session_id)));
        }
        if let Ok(existing) = self.node.sessions.get(&r.session_id) {
            return Ok(SessionInfo { session_id: r.session_id, acp_session_id: existing.acp_session_id.clone() });
        }
        let sandbox = self.node.sandboxes.get(&r.container_id)?;
        let answer = sandbox
            .supervisor
            .clone()
            .new_session(sup::NewSessionRequest {
                agent_instance_id: r.agent_instance_id.clone(),
                cwd: r.cwd,
                permission_mode: r.permission_mode,
                permission_timeout_ms: r.permission_timeout_ms,
                acp_mcp_servers: r.acp_mcp_servers,
                load_session_id: r.load_acp_session_id,
                additional_directories: r.additional_directories,
                resume_session_id: r.resume_acp_session_id,
            })
            .await?
            .into_inner();
        let log = EventLog::open(&r.session_id, &sandbox.sessions_dir().join(format!("{}.jsonl", r.session_id)));
        // A loaded session's history opens its stream, before any turn.
        for update in answer.acp_replay {
            log.append("", Event::SessionUpdate(SessionUpdate { acp_update: update }));
        }
        let session = self.node.sessions.insert(NodeSession::new(
            r.session_id.clone(),
            r.container_id,
            r.agent_instance_id,
            answer.acp_session_id,
            log,
        ));
        Ok(SessionInfo { session_id: r.session_id, acp_session_id: session.acp_session_id.clone() })
    }

    async fn close_session_unfenced(&self, r: CloseSessionRequest) -> Result<CloseSessionResponse, Status> {
        let sandbox = self.node.sandboxes.get(&r.container_id)?;
        let session = self.node.sessions.get(&r.session_id).ok();
        let (agent_instance_id, acp_session_id) = match &session {
            Some(s) => (s.agent_instance_id.clone(), s.acp_session_id.clone()),
            None if !r.agent_instance_id.is_empty() => (r.agent_instance_id.clone(), String::new()),
            None => return Ok(CloseSessionResponse::default()),
        };
        let request = sup::CloseSessionRequest { agent_instance_id, acp_session_id };
        let answer = match sandbox.supervisor.clone().close_session(request).await {
            Ok(answer) => answer.into_inner(),
            // Gone already (stopped with its last session): nothing to close.
            Err(e) if agentd_proto::error::code_of(&e) == Some("agent_not_found") => sup::CloseSessionResponse::default(),
            Err(e) => return Err(e),
        };
        self.node.sessions.close_one(&r.session_id).await;
        Ok(CloseSessionResponse { closed_by_agent: answer.closed_by_agent, agent_stopped: answer.agent_stopped })
    }

    async fn prompt_unfenced(&self, r: PromptRequest) -> Result<PromptAccepted, Status> {
        let session = self.node.sessions.get(&r.session_id)?;
        let sandbox = self.node.sandboxes.get(&session.container_id)?;
        if sandbox.is_frozen() {
            return Err(status(Code::FailedPrecondition, "container_hibernated", "the sandbox is hibernated: resume it first"));
        }
        session.begin_run(&r.run_id)?;
        let log = &session.log;
        log.append(&r.run_id, Event::RunStarted(RunStarted {}));
        let request = sup::PromptRequest {
            agent_instance_id: session.agent_instance_id.clone(),
            acp_session_id: session.acp_session_id.clone(),
            acp_prompt: r.acp_prompt,
        };
        match sandbox.supervisor.clone().prompt(request).await {
            Ok(events) => {
                let journal = Arc::clone(&self.node.journal);
                tokio::spawn(pump_turn(journal, Arc::clone(&session), Arc::clone(&sandbox), r.run_id.clone(), events.into_inner()));
                Ok(PromptAccepted { run_id: r.run_id })
            }
            Err(e) => {
                end_turn(&self.node.journal, &session, &r.run_id, failed(e.message(), ""));
                Err(e)
            }
        }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<SessionEvent, Status>> + Send>>;
type JournalStream = Pin<Box<dyn Stream<Item = Result<JournalEntry, Status>> + Send>>;

fn failed(error: impl Into<String>, code: &str) -> Event {
    Event::RunFailed(RunFailed { error: error.into(), code: code.to_string() })
}

/// Ends the session's turn with `end` (`run.completed` or `run.failed`): in
/// its log for clients, in the journal for the control plane (the one path
/// a run's end takes to the store), then frees the session for the next turn.
fn end_turn(journal: &Journal, session: &NodeSession, run_id: &str, end: Event) {
    let outcome = match &end {
        Event::RunCompleted(c) => run_ended::Outcome::Completed(c.clone()),
        Event::RunFailed(f) => run_ended::Outcome::Failed(f.clone()),
        other => unreachable!("a turn ends with run.completed or run.failed, not {}", agentd_proto::events::kind(other)),
    };
    session.log.append(run_id, end);
    journal.append(Fact::RunEnded(RunEnded {
        container_id: session.container_id.clone(),
        session_id: session.session_id.clone(),
        run_id: run_id.to_string(),
        outcome: Some(outcome),
    }));
    session.end_run();
}

/// Copies one turn's events from the supervisor into the session's log, and
/// makes sure the log gets exactly one terminal event whatever happens.
async fn pump_turn(journal: Arc<Journal>, session: Arc<NodeSession>, sandbox: Arc<NodeSandbox>, run_id: String, mut events: Streaming<sup::PromptEvent>) {
    let log = &session.log;
    let oom_before = sandbox.oom_kills();
    // A turn whose agent died in an OOM kill says so, never just "exited".
    let explain = |error: &str| {
        if sandbox.oom_kills() > oom_before {
            let limit = sandbox.memory_max().map(|b| format!(" of {} MiB", b >> 20)).unwrap_or_default();
            format!("out of memory: the sandbox hit its memory limit{limit} and the kernel killed the agent ({error})")
        } else {
            error.to_string()
        }
    };
    let mut end = None;
    while let Some(item) = events.next().await {
        match item.map(|e| e.event) {
            Ok(Some(prompt_event::Event::AcpUpdate(update))) => {
                log.append(&run_id, Event::SessionUpdate(SessionUpdate { acp_update: update }));
            }
            Ok(Some(prompt_event::Event::StopReason(stop_reason))) => {
                end = Some(Event::RunCompleted(RunCompleted { stop_reason }));
                break;
            }
            Ok(Some(prompt_event::Event::Error(error))) => {
                end = Some(failed(explain(&error), ""));
                break;
            }
            Ok(Some(prompt_event::Event::PermissionRequested(e))) => {
                log.append(&run_id, Event::PermissionRequested(e));
            }
            Ok(Some(prompt_event::Event::PermissionResolved(e))) => {
                log.append(&run_id, Event::PermissionResolved(e));
            }
            Ok(Some(prompt_event::Event::AgentProtocolError(e))) => {
                log.append(&run_id, Event::AgentProtocolError(e));
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(run_id, error = %e, "turn stream broke");
                break;
            }
        }
    }
    let end = end.unwrap_or_else(|| failed(explain("the sandbox stopped during the run"), "sandbox_stopped"));
    end_turn(&journal, &session, &run_id, end);
}

impl NodeService {
    /// The session's agent as its supervisor reports it.
    async fn agent_state(&self, session: &NodeSession) -> Option<AgentReport> {
        let sandbox = self.node.sandboxes.get(&session.container_id).ok()?;
        // A frozen (hibernated) sandbox's supervisor cannot answer.
        let mut supervisor = sandbox.supervisor.clone();
        let status = supervisor.status(sup::StatusRequest {});
        let answer = tokio::time::timeout(std::time::Duration::from_millis(500), status).await.ok()?.ok()?.into_inner();
        let mut a = answer.agents.into_iter().find(|a| a.agent_instance_id == session.agent_instance_id)?;
        let settings = a.session_settings.remove(&session.acp_session_id);
        Some(AgentReport { state: a.state, restarts: a.restarts, last_error: a.last_error, pid: a.pid, settings })
    }

    /// A session and the supervisor of its sandbox, for calls about it.
    fn session_supervisor(&self, session_id: &str) -> Result<(Arc<NodeSession>, SupervisorClient<Channel>), Status> {
        let session = self.node.sessions.get(session_id)?;
        let supervisor = self.node.sandboxes.get(&session.container_id)?.supervisor.clone();
        Ok((session, supervisor))
    }
}

#[tonic::async_trait]
impl node_server::Node for NodeService {
    async fn create_sandbox(&self, req: Request<CreateSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let r = req.into_inner();
        let plan = r.plan.ok_or_else(|| status(Code::InvalidArgument, "invalid_request", "plan is required"))?;
        let id = plan.container_id.clone();
        let create = |s: NodeService| async move {
            let stage = if plan.bundles.is_empty() { crate::setup::STARTING } else { crate::setup::INSTALLING };
            let _stage = s.node.setups.enter(&plan.container_id, stage);
            let info = s.node.sandboxes.create(plan).await?.info();
            crate::fence::test_delay_first_answer("create_sandbox").await;
            Ok(info)
        };
        let info = self.fenced(id, r.fence, create).await?;
        Ok(Response::new(info))
    }

    async fn check_sandbox_plan(&self, req: Request<CheckSandboxPlanRequest>) -> Result<Response<CheckSandboxPlanResponse>, Status> {
        let plan = req.into_inner().plan.ok_or_else(|| status(Code::InvalidArgument, "invalid_request", "plan is required"))?;
        self.node.sandboxes.check(&plan)?;
        Ok(Response::new(CheckSandboxPlanResponse {}))
    }

    async fn delete_sandbox(&self, req: Request<DeleteSandboxRequest>) -> Result<Response<DeleteSandboxResponse>, Status> {
        let r = req.into_inner();
        let id = r.container_id.clone();
        let delete = |s: NodeService| async move { Ok(DeleteSandboxResponse { existed: s.node.delete_sandbox(&id).await }) };
        Ok(Response::new(self.fenced(r.container_id, r.fence, delete).await?))
    }

    async fn get_sandbox(&self, req: Request<GetSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        Ok(Response::new(self.node.sandboxes.get(&req.into_inner().container_id)?.info()))
    }

    async fn get_node_info(&self, _req: Request<GetNodeInfoRequest>) -> Result<Response<NodeInfo>, Status> {
        let config = self.node.sandboxes.config();
        Ok(Response::new(NodeInfo {
            node_id: config.node_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            labels: config.labels.clone().into_iter().collect(),
            capacity: Some(self.node.sandboxes.capacity()),
            sandboxes: self.node.sandboxes.list().iter().map(|s| s.info()).collect(),
            journal_id: self.node.journal.id().to_string(),
        }))
    }

    async fn list_sandboxes(&self, _req: Request<ListSandboxesRequest>) -> Result<Response<ListSandboxesResponse>, Status> {
        let sandboxes = self.node.sandboxes.list().iter().map(|s| s.info()).collect();
        Ok(Response::new(ListSandboxesResponse { sandboxes }))
    }

    async fn start_agent(&self, req: Request<StartAgentRequest>) -> Result<Response<AgentInstance>, Status> {
        let r = req.into_inner();
        let fence = r.fence.clone();
        let container_id = r.container_id.clone();
        let start = |s: NodeService| async move {
            let installs = r.agent.as_ref().is_some_and(|a| crate::setup::installs(&a.command));
            let stage = if installs { crate::setup::INSTALLING } else { crate::setup::STARTING };
            let _stage = s.node.setups.enter(&r.container_id, stage);
            let answer = s.start_agent_unfenced(r).await;
            crate::fence::test_delay_first_answer("start_agent").await;
            answer
        };
        Ok(Response::new(self.fenced(container_id, fence, start).await?))
    }

    async fn create_session(&self, req: Request<CreateSessionRequest>) -> Result<Response<SessionInfo>, Status> {
        let r = req.into_inner();
        let fence = r.fence.clone();
        let container_id = r.container_id.clone();
        let create = |s: NodeService| async move {
            let answer = s.create_session_unfenced(r).await;
            crate::fence::test_delay_first_answer("create_session").await;
            answer
        };
        Ok(Response::new(self.fenced(container_id, fence, create).await?))
    }

    async fn get_setup_stage(&self, req: Request<GetSetupStageRequest>) -> Result<Response<SetupStage>, Status> {
        let stage = self.node.setups.get(&req.into_inner().container_id).unwrap_or_default();
        Ok(Response::new(SetupStage { stage: stage.into() }))
    }

    async fn close_session(&self, req: Request<CloseSessionRequest>) -> Result<Response<CloseSessionResponse>, Status> {
        let r = req.into_inner();
        let fence = r.fence.clone();
        let container_id = r.container_id.clone();
        let close = |s: NodeService| async move {
            let answer = s.close_session_unfenced(r).await;
            crate::fence::test_delay_first_answer("close_session").await;
            answer
        };
        Ok(Response::new(self.fenced(container_id, fence, close).await?))
    }

    async fn list_agent_sessions(&self, req: Request<ListAgentSessionsRequest>) -> Result<Response<ListAgentSessionsResponse>, Status> {
        let r = req.into_inner();
        let sandbox = self.node.sandboxes.get(&r.container_id)?;
        let request = sup::ListSessionsRequest { agent_instance_id: r.agent_instance_id, cwd: r.cwd, cursor: r.cursor };
        let answer = sandbox.supervisor.clone().list_sessions(request).await?.into_inner();
        Ok(Response::new(ListAgentSessionsResponse { acp_answer: answer.acp_answer }))
    }

    async fn prompt(&self, req: Request<PromptRequest>) -> Result<Response<PromptAccepted>, Status> {
        let r = req.into_inner();
        let fence = r.fence.clone();
        let container_id = r.container_id.clone();
        let prompt = |s: NodeService| async move { s.prompt_unfenced(r).await };
        Ok(Response::new(self.fenced(container_id, fence, prompt).await?))
    }

    async fn cancel(&self, req: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let r = req.into_inner();
        let session = self.node.sessions.get(&r.session_id)?;
        let sandbox = self.node.sandboxes.get(&session.container_id)?;
        let answer = sandbox
            .supervisor
            .clone()
            .cancel(sup::CancelRequest {
                agent_instance_id: session.agent_instance_id.clone(),
                acp_session_id: session.acp_session_id.clone(),
            })
            .await?
            .into_inner();
        Ok(Response::new(CancelResponse { was_running: answer.was_running }))
    }

    async fn get_session(&self, req: Request<GetSessionRequest>) -> Result<Response<SessionState>, Status> {
        let r = req.into_inner();
        let session = self.node.sessions.get(&r.session_id)?;
        let agent = if r.with_agent { self.agent_state(&session).await } else { None };
        Ok(Response::new(SessionState {
            session_id: session.session_id.clone(),
            acp_session_id: session.acp_session_id.clone(),
            active_run_id: session.active_run().unwrap_or_default(),
            last_seq: session.log.last_seq(),
            agent,
        }))
    }

    async fn freeze_sandbox(&self, req: Request<FreezeSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let r = req.into_inner();
        let id = r.container_id.clone();
        let freeze = |s: NodeService| async move {
            let sandbox = s.node.sandboxes.get(&id)?;
            sandbox.freeze()?;
            crate::fence::test_delay_first_answer("freeze_sandbox").await;
            Ok(sandbox.info())
        };
        Ok(Response::new(self.fenced(r.container_id, r.fence, freeze).await?))
    }

    async fn thaw_sandbox(&self, req: Request<ThawSandboxRequest>) -> Result<Response<Sandbox>, Status> {
        let r = req.into_inner();
        let id = r.container_id.clone();
        let thaw = |s: NodeService| async move {
            let sandbox = s.node.sandboxes.get(&id)?;
            sandbox.thaw()?;
            crate::fence::test_delay_first_answer("thaw_sandbox").await;
            Ok(sandbox.info())
        };
        Ok(Response::new(self.fenced(r.container_id, r.fence, thaw).await?))
    }

    async fn set_session_mode(&self, req: Request<SetSessionModeRequest>) -> Result<Response<SessionSettingResponse>, Status> {
        let r = req.into_inner();
        let (session, mut supervisor) = self.session_supervisor(&r.session_id)?;
        let answer = supervisor
            .set_session_mode(sup::SetSessionModeRequest {
                agent_instance_id: session.agent_instance_id.clone(),
                acp_session_id: session.acp_session_id.clone(),
                mode_id: r.mode_id,
            })
            .await?
            .into_inner();
        Ok(Response::new(SessionSettingResponse { acp_answer: answer.acp_answer, settings: answer.settings }))
    }

    async fn set_session_config_option(
        &self,
        req: Request<SetSessionConfigOptionRequest>,
    ) -> Result<Response<SessionSettingResponse>, Status> {
        let r = req.into_inner();
        let (session, mut supervisor) = self.session_supervisor(&r.session_id)?;
        let answer = supervisor
            .set_session_config_option(sup::SetSessionConfigOptionRequest {
                agent_instance_id: session.agent_instance_id.clone(),
                acp_session_id: session.acp_session_id.clone(),
                config_id: r.config_id,
                acp_value: r.acp_value,
            })
            .await?
            .into_inner();
        Ok(Response::new(SessionSettingResponse { acp_answer: answer.acp_answer, settings: answer.settings }))
    }

    async fn answer_permission(&self, req: Request<AnswerPermissionRequest>) -> Result<Response<AnswerPermissionResponse>, Status> {
        let r = req.into_inner();
        let session = self.node.sessions.get(&r.session_id)?;
        let sandbox = self.node.sandboxes.get(&session.container_id)?;
        sandbox
            .supervisor
            .clone()
            .answer_permission(sup::AnswerPermissionRequest {
                agent_instance_id: session.agent_instance_id.clone(),
                request_id: r.request_id,
                option_id: r.option_id,
            })
            .await?;
        Ok(Response::new(AnswerPermissionResponse {}))
    }

    type StreamEventsStream = EventStream;
    type WatchJournalStream = JournalStream;

    async fn watch_journal(&self, req: Request<WatchJournalRequest>) -> Result<Response<Self::WatchJournalStream>, Status> {
        let r = req.into_inner();
        let stream = Arc::clone(&self.node.journal).follow(&r.journal_id, r.after_seq).map(|e| Ok((*e).clone()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stream_events(&self, req: Request<StreamEventsRequest>) -> Result<Response<Self::StreamEventsStream>, Status> {
        let r = req.into_inner();
        let session = self.node.sessions.get(&r.session_id)?;
        let stream = Arc::clone(&session.log).follow(r.after_seq).map(|e| Ok((*e).clone()));
        Ok(Response::new(Box::pin(stream)))
    }
}
