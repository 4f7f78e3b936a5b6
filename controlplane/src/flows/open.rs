//! `session.open`: a new session in a container that is already ready. The
//! node starts the session's agent, or reuses one of the sandbox's agents
//! started from the same plan, then opens the ACP session (`session/new`,
//! or `session/load` with its replay on the stream); the store records the
//! session ready on the agent used. Written by `POST /v1/sessions` with
//! `container_id`, with the session row (`creating`).
//!
//! A node refusal fails only the session: the container and its other
//! sessions go on, and an agent started for this session alone is stopped.

use crate::domain::Code;
use agentd_proto::node::{CloseSessionRequest, StartAgentRequest};

use super::{agent_deadline, deadline, failed, fence, node_error, ok, store_error, transient, within};
use crate::AppState;
use crate::domain::Refusal;
use crate::store::StoreError;
use crate::store::states::{container, session};
use crate::workflow::{StepContext, StepError, StepResult};

/// The create step's payload serves here too: the same plan fields, and
/// `agent_instance_id` is the id a newly started agent gets.
pub type Payload = super::create::Payload;

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let container_id = ctx.entity_id.as_str();
    let s = app.store.get_session(&payload.session_id).await.map_err(store_error)?;
    if s.state != session::CREATING {
        return Ok(already_settled(&s));
    }
    let c = app.store.get_container(container_id).await.map_err(store_error)?;
    if c.state != container::READY {
        let problem = Refusal::conflict(Code::IllegalState, format!("container {container_id} is {}; only a ready container takes new sessions", c.state));
        record_failed(&app, &payload.session_id, &problem).await?;
        return Ok(failed(&problem));
    }
    let agent_plan = payload.agent_plan().map_err(|e| StepError::permanent(format!("bad plan in payload: {e}")))?;

    let mut node = super::node_for(&app, &c.node_id).await?;
    let mut instance_id = payload.agent_instance_id.clone();
    let mut started = None;
    let opened: Result<String, tonic::Status> = async {
        let start = node.start_agent(StartAgentRequest {
            container_id: container_id.to_string(),
            agent_instance_id: payload.agent_instance_id.clone(),
            agent: Some(agent_plan),
            reuse: true,
            fence: fence(&ctx, "agent"),
        });
        let agent = within(agent_deadline(&app), start).await?.into_inner();
        instance_id = agent.agent_instance_id.clone();
        started = Some(agent);
        let open = node.create_session(payload.create_session(&ctx, container_id, &instance_id));
        Ok(within(agent_deadline(&app), open).await?.into_inner().acp_session_id)
    }
    .await;

    match opened {
        Ok(acp_session_id) => {
            let recorded = async {
                app.store.set_session_agent_instance(&payload.session_id, &instance_id).await?;
                if let Some(agent) = &started {
                    let s = app.store.get_session(&payload.session_id).await?;
                    super::agents::observe_started(&app, &s, &instance_id, agent).await?;
                }
                app.store.session_ready(&payload.session_id, &acp_session_id).await
            };
            match recorded.await {
                Ok(()) => {}
                Err(StoreError::Illegal(e)) => return Ok(failed(&Refusal::conflict(Code::IllegalState, format!("{e} (closed while being opened)")))),
                Err(e) => return Err(store_error(e)),
            }
            Ok(ok())
        }
        Err(status) if transient(&status) && !ctx.is_last_attempt() => Err(node_error("open session", &status)),
        Err(status) => {
            let problem = Refusal::from_node(&status);
            // Stops the agent if this session was to be its first.
            let close = CloseSessionRequest {
                container_id: container_id.to_string(),
                session_id: payload.session_id.clone(),
                agent_instance_id: instance_id,
                fence: fence(&ctx, "undo"),
            };
            if let Err(e) = within(deadline(&app), node.clone().close_session(close)).await {
                tracing::warn!(container_id, error = %e, "cannot release the agent of a failed session open");
            }
            record_failed(&app, &payload.session_id, &problem).await?;
            Ok(failed(&problem))
        }
    }
}

async fn record_failed(app: &AppState, session_id: &str, problem: &Refusal) -> Result<(), StepError> {
    match app.store.session_failed_with(session_id, &problem.detail, problem.code.as_str()).await {
        Ok(()) | Err(StoreError::Illegal(_)) => Ok(()),
        Err(e) => Err(store_error(e)),
    }
}

/// An earlier attempt finished (its runner died before recording the step
/// done), or a delete overtook it: answers what the first attempt would have.
fn already_settled(s: &crate::store::SessionRow) -> serde_json::Value {
    if s.state == session::READY {
        return ok();
    }
    let detail = s.error.clone().unwrap_or_else(|| format!("session {} is {}", s.id, s.state));
    failed(&Refusal::conflict(Code::IllegalState, detail))
}
