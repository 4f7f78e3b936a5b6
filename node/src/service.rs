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
use agentd_proto::trace::Traced;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::Node;
use crate::event_log::{EventLog, now_ms};
use crate::journal::Journal;
use crate::sandboxes::{Sandbox as NodeSandbox, valid_id};
use crate::sessions::{NodeSession, SessionFile};

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
        tokio::spawn(agentd_proto::trace::carry(async move { node.fences.run(&entity, fence.as_ref(), op(service)).await }))
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
        let dir = sandbox.sessions_dir();
        let log = EventLog::create(&r.session_id, &SessionFile::log_path(&dir, &r.session_id), &self.node.log_writer);
        // A loaded session's history opens its stream, before any turn.
        for update in answer.acp_replay {
            log.append("", Event::SessionUpdate(SessionUpdate { acp_update: update }));
        }
        let file = SessionFile {
            session_id: r.session_id.clone(),
            container_id: r.container_id,
            agent_instance_id: r.agent_instance_id,
            acp_session_id: answer.acp_session_id,
            created_at_ms: now_ms(),
            closed_at_ms: None,
        };
        // Its state on disk before the answer: a node that restarts right
        // after takes back every session it answered for.
        let session = NodeSession::create(file, SessionFile::path(&dir, &r.session_id), log)
            .map_err(|e| status(Code::Internal, "internal", format!("cannot write the session's state: {e}")))?;
        let session = self.node.sessions.insert(session);
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
        if !session.begin_run(&r.run_id)? {
            // Taken before the node restarted (its answer lost with it): the
            // turn runs or ran, taken up by the restart.
            tracing::info!(run_id = r.run_id, session = r.session_id, "prompt repeated after a restart: already taken");
            return Ok(PromptAccepted { run_id: r.run_id });
        }
        tracing::info!(session_id = r.session_id, run_id = r.run_id, "turn started");
        let log = &session.log;
        let started = log.append(&r.run_id, Event::RunStarted(RunStarted {}));
        // On disk before the supervisor hears of the turn: a node that
        // restarts finds every turn the agent may be running in its logs.
        log.written(started).await;
        let request = sup::PromptRequest {
            agent_instance_id: session.agent_instance_id.clone(),
            acp_session_id: session.acp_session_id.clone(),
            acp_prompt: r.acp_prompt,
            turn_id: r.run_id.clone(),
        };
        match sandbox.supervisor.clone().prompt(request).await {
            Ok(events) => {
                let turn = Turn { node: Arc::clone(&self.node), session: Arc::clone(&session), sandbox: Arc::clone(&sandbox), run_id: r.run_id.clone() };
                // Carried: the turn's log lines keep the prompt's trace id.
                tokio::spawn(agentd_proto::trace::carry(turn.pump(Some(events.into_inner()), 0)));
                Ok(PromptAccepted { run_id: r.run_id })
            }
            Err(e) => {
                end_turn(&self.node.journal, &session, &r.run_id, failed(e.message(), ""), 0);
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
/// the journal for the control plane (the one path a run's end takes to the
/// store), in its log for clients, then frees the session for the next turn.
/// Journaled first: a node that dies in between finds the turn still
/// running in its log, takes it up again and ends it once more (recording
/// an end twice changes nothing); the other way round, a logged end might
/// never reach the store.
fn end_turn(journal: &Journal, session: &NodeSession, run_id: &str, end: Event, turn: u64) {
    let outcome = match &end {
        Event::RunCompleted(c) => run_ended::Outcome::Completed(c.clone()),
        Event::RunFailed(f) => run_ended::Outcome::Failed(f.clone()),
        other => unreachable!("a turn ends with run.completed or run.failed, not {}", agentd_proto::events::kind(other)),
    };
    tracing::info!(session_id = session.session_id, run_id, outcome = agentd_proto::events::kind(&end), "turn ended");
    journal.append(Fact::RunEnded(RunEnded {
        container_id: session.container_id.clone(),
        session_id: session.session_id.clone(),
        run_id: run_id.to_string(),
        outcome: Some(outcome),
    }));
    session.log.append_turn(run_id, end, turn);
    session.end_run();
}

/// How often a turn whose stream broke is asked for again while its sandbox
/// runs, and how long apart: a supervisor that answers again within that
/// (its connection was reset) loses the node nothing.
const ATTACH_TRIES: u32 = 5;
const ATTACH_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// One turn, whose events the node copies from the supervisor into the
/// session's log.
pub(crate) struct Turn {
    pub node: Arc<Node>,
    pub session: Arc<NodeSession>,
    pub sandbox: Arc<NodeSandbox>,
    pub run_id: String,
}

/// How reading one stream of a turn ended.
enum Read {
    /// With the turn's terminal event, and its number.
    Ended(Event, u64),
    /// The stream broke or ended early.
    Broke,
}

impl Turn {
    /// Copies the turn's events into the log, from `stream` (the Prompt
    /// answer), or by attaching to the turn after `last` (the number of the
    /// last event logged: a turn taken up after a restart), and attaching
    /// again whenever a stream breaks while the sandbox runs; then makes sure
    /// the log gets exactly one terminal event whatever happens. A node that
    /// is stopping with its sandboxes left running (live restore) leaves the
    /// turn to its next start.
    pub async fn pump(self, stream: Option<Streaming<sup::PromptEvent>>, mut last: u64) {
        let oom_before = self.sandbox.oom_kills();
        let mut stream = stream;
        let mut tries = 0;
        let end = loop {
            let mut events = match stream.take() {
                Some(events) => events,
                None => match self.attach(last).await {
                    Ok(events) => events,
                    Err(e) if agentd_proto::error::code_of(&e) == Some("turn_not_found") => {
                        let why = format!("the node restarted before the agent received the prompt ({})", e.message());
                        break Some((failed(why, "node_restarted"), last));
                    }
                    Err(e) if agentd_proto::error::code_of(&e) == Some("agent_not_found") => {
                        break Some((failed(format!("the agent is gone: {}", e.message()), ""), last));
                    }
                    Err(e) => {
                        tries += 1;
                        if tries > ATTACH_TRIES || !self.sandbox.is_running() || self.node.is_detached() {
                            tracing::warn!(run_id = self.run_id, error = %e, "cannot take the turn up again");
                            break None;
                        }
                        tokio::time::sleep(ATTACH_RETRY).await;
                        continue;
                    }
                },
            };
            let before = last;
            match self.read(&mut events, &mut last).await {
                Read::Ended(end, index) => break Some((end, index)),
                Read::Broke if self.node.is_detached() => break None,
                // A stream that got somewhere earns a fresh set of tries;
                // one that keeps breaking at once uses them up.
                Read::Broke if last > before => tries = 0,
                Read::Broke => {
                    tries += 1;
                    if tries > ATTACH_TRIES {
                        break None;
                    }
                    tokio::time::sleep(ATTACH_RETRY).await;
                }
            }
        };
        if self.node.is_detached() {
            // The node stops, leaving the sandbox running: its next start
            // takes the turn up from what the log holds.
            return;
        }
        let explain = |error: &str| self.explain(oom_before, error);
        let (end, index) = match end {
            Some((Event::RunFailed(f), index)) if f.code.is_empty() => (failed(explain(&f.error), ""), index),
            Some(end) => end,
            None => (failed(explain("the sandbox stopped during the run"), "sandbox_stopped"), last),
        };
        end_turn(&self.node.journal, &self.session, &self.run_id, end, index);
    }

    async fn attach(&self, after: u64) -> Result<Streaming<sup::PromptEvent>, Status> {
        let request = sup::AttachTurnRequest {
            agent_instance_id: self.session.agent_instance_id.clone(),
            acp_session_id: self.session.acp_session_id.clone(),
            turn_id: self.run_id.clone(),
            after,
        };
        let events = self.sandbox.supervisor.clone().attach_turn(request).await?.into_inner();
        tracing::info!(run_id = self.run_id, session = self.session.session_id, after, "turn taken up again");
        Ok(events)
    }

    /// Logs one stream's events; events numbered at or below `last` are
    /// ones the log has (a stream attached again may repeat them).
    async fn read(&self, events: &mut Streaming<sup::PromptEvent>, last: &mut u64) -> Read {
        let log = &self.session.log;
        let run_id = self.run_id.as_str();
        while let Some(item) = events.next().await {
            let e = match item {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(run_id, error = %e, "turn stream broke");
                    return Read::Broke;
                }
            };
            let index = e.index;
            if index != 0 {
                if index <= *last {
                    continue;
                }
                if index > *last + 1 {
                    tracing::warn!(run_id, from = *last + 1, to = index - 1, "events of the turn were lost while the node was away (past what the supervisor keeps)");
                }
                *last = index;
            }
            match e.event {
                Some(prompt_event::Event::AcpUpdate(update)) => {
                    log.append_turn(run_id, Event::SessionUpdate(SessionUpdate { acp_update: update }), index);
                }
                Some(prompt_event::Event::StopReason(stop_reason)) => return Read::Ended(Event::RunCompleted(RunCompleted { stop_reason }), index),
                // Explained (an OOM kill named) by the caller.
                Some(prompt_event::Event::Error(error)) => return Read::Ended(failed(error, ""), index),
                Some(prompt_event::Event::PermissionRequested(e)) => {
                    log.append_turn(run_id, Event::PermissionRequested(e), index);
                }
                Some(prompt_event::Event::PermissionResolved(e)) => {
                    log.append_turn(run_id, Event::PermissionResolved(e), index);
                }
                Some(prompt_event::Event::AgentProtocolError(e)) => {
                    log.append_turn(run_id, Event::AgentProtocolError(e), index);
                }
                None => {}
            }
        }
        Read::Broke
    }

    /// A turn whose agent died in an OOM kill says so, never just "exited".
    fn explain(&self, oom_before: u64, error: &str) -> String {
        if self.sandbox.oom_kills() > oom_before {
            let limit = self.sandbox.memory_max().map(|b| format!(" of {} MiB", b >> 20)).unwrap_or_default();
            format!("out of memory: the sandbox hit its memory limit{limit} and the kernel killed the agent ({error})")
        } else {
            error.to_string()
        }
    }
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
    fn session_supervisor(&self, session_id: &str) -> Result<(Arc<NodeSession>, SupervisorClient<Traced>), Status> {
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
