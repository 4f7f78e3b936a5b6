//! `session.close`: one session of a container that keeps running. The node
//! cancels the session's turn if one runs, sends `session/close` when the
//! agent advertises it (else only forgets the session), stops the agent if
//! it has no session left, and closes the session's event log; the store
//! records the session closed and a turn still running failed. Written by
//! `DELETE /v1/sessions/{id}` while the container has other sessions (the
//! last session's delete removes the whole container, `flows::delete`).

use crate::domain::Code;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use agentd_proto::node::CloseSessionRequest;

use super::{CONTAINER, SESSION_CLOSE, Waited, deadline, fence, node_error, ok, store_error, transient, wait_for_step, within};
use crate::AppState;
use crate::domain::{Class, Refusal};
use crate::store::StoreError;
use crate::store::outbox::NewStep;
use crate::store::states::{container, session};
use crate::workflow::{StepContext, StepError, StepResult};

#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    pub session_id: String,
}

/// How long a DELETE waits for its step: a `session/close` answer, an
/// agent's exit (2 s grace), a turn's drain.
const WAIT: Duration = Duration::from_secs(30);

/// Writes the session's close step (one per session: a repeated DELETE
/// waits for the same step) and waits for it.
pub async fn request(app: &AppState, container_id: &str, session_id: &str) -> Result<(), Refusal> {
    let key = format!("{SESSION_CLOSE}:{session_id}");
    let payload = serde_json::to_value(Payload { session_id: session_id.to_string() }).expect("payload serializes");
    app.store.enqueue(NewStep::new(CONTAINER, container_id, SESSION_CLOSE, &key, payload)).await?;
    match wait_for_step(app, &key, WAIT).await? {
        Waited::Finished(outcome) => outcome,
        Waited::Pending => Err(Refusal::new(
            Class::Unavailable,
            Code::NodeUnavailable,
            format!("session {session_id} is being closed; the node has not confirmed yet (it will be retried)"),
        )),
    }
}

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let container_id = ctx.entity_id.as_str();
    let s = app.store.get_session(&payload.session_id).await.map_err(store_error)?;
    if s.state == session::CLOSED {
        return Ok(ok());
    }
    let c = app.store.get_container(container_id).await.map_err(store_error)?;
    // A sandbox that is gone or not built has nothing of the session left.
    if c.state == container::READY {
        // The node forgets the session's log when it closes it.
        super::archive::archive_or_warn(&app, &s.id).await;
        let close = CloseSessionRequest {
            container_id: container_id.to_string(),
            session_id: s.id.clone(),
            agent_instance_id: s.agent_instance_id.clone(),
            fence: fence(&ctx, "session"),
        };
        let mut node = super::node_for(&app, &c.node_id).await?;
        match within(deadline(&app), node.close_session(close)).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                tracing::info!(session = s.id, closed_by_agent = answer.closed_by_agent, agent_stopped = answer.agent_stopped, "session closed");
            }
            Err(status) if transient(&status) && !ctx.is_last_attempt() => return Err(node_error("close session", &status)),
            // The node no longer knows the sandbox or the session: forgotten already.
            Err(status) => tracing::warn!(session = s.id, error = %status.message(), "closing the session on the node failed; recording it closed"),
        }
    }
    let record = async {
        for run in app.store.running_runs_of_session(&s.id).await? {
            // The run follower may record the turn's own end first.
            match app.store.run_failed(&run.id, "session closed").await {
                Ok(()) | Err(StoreError::Illegal(_)) => {}
                Err(e) => return Err(e),
            }
        }
        app.store.session_closed(&s.id).await
    };
    match record.await {
        Ok(()) | Err(StoreError::Illegal(_)) => Ok(ok()),
        Err(e) => Err(store_error(e)),
    }
}
