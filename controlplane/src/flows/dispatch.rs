//! `run.dispatch`: hands a turn to the node. Written by
//! `POST /v1/sessions/{id}:prompt` with the run row: `dispatching` when the
//! API runs the step itself, else `queued` until a runner takes it. The node
//! taking the turn moves the run to `streaming` (with the step's end); its
//! end is recorded later by the run follower (`crate::runs`) from the
//! session's event log.

use crate::domain::Code;
use serde::{Deserialize, Serialize};

use agentd_proto::node::PromptRequest;

use super::{deadline, failed, fence, within, node_error, ok, store_error, transient};
use crate::AppState;
use crate::domain::Refusal;
use crate::store::outbox::Tx;
use crate::store::{StoreError, now_ms};
use crate::store::states::{Entity, run};
use crate::workflow::{StepContext, StepError, StepResult};

#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    pub session_id: String,
    pub run_id: String,
    /// ACP content blocks, as a JSON array.
    pub prompt_json: String,
}

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let r = app.store.get_run(&payload.run_id).await.map_err(store_error)?;
    let ended = match r.state.as_str() {
        // A runner took the dispatch the API could not run itself.
        run::QUEUED => match app.store.run_dispatching(&r.id).await {
            Ok(()) => None,
            Err(StoreError::Illegal(e)) => Some(e.current),
            Err(e) => return Err(store_error(e)),
        },
        // Dispatching: the API's own try, or a retry; streaming: a retry
        // whose first try reached the node (its fence answers it).
        run::DISPATCHING | run::STREAMING => None,
        _ => Some(r.state),
    };
    if let Some(state) = ended {
        // Ended before it was handed over (its container was deleted, say).
        let detail = format!("run {} is {state}", payload.run_id);
        return Ok(failed(&Refusal::conflict(Code::IllegalState, detail)));
    }
    let request = PromptRequest {
        container_id: ctx.entity_id.clone(),
        session_id: payload.session_id.clone(),
        run_id: payload.run_id.clone(),
        acp_prompt: payload.prompt_json.clone(),
        fence: fence(&ctx, "prompt"),
    };
    let (_, mut node) = app.nodes.of_container(&ctx.entity_id).await.map_err(|e| super::node_error("reach node", &e))?;
    match within(deadline(&app), node.prompt(request)).await {
        Ok(_) => {
            app.store.metrics().run_started();
            // The node took the turn: its events flow. Recorded with the
            // step's end, after the caller has its answer.
            let (run_id, taken_at) = (payload.run_id.clone(), now_ms());
            ctx.complete_with(move |tx| {
                let run_id = run_id.clone();
                Box::pin(async move { streaming(tx, &run_id, taken_at).await })
            });
            Ok(ok())
        }
        Err(status) if transient(&status) && !ctx.is_last_attempt() => Err(node_error("prompt", &status)),
        Err(status) => {
            let problem = Refusal::from_node(&status);
            app.store.run_failed(&payload.run_id, &problem.detail).await.map_err(store_error)?;
            Ok(failed(&problem))
        }
    }
}

/// Moves a dispatched run to streaming, unless the run follower recorded
/// its end first (a short turn), and records when the node took it
/// (`taken_at`) either way.
async fn streaming(tx: &mut Tx, run_id: &str, taken_at: i64) -> Result<(), StoreError> {
    match tx.transition(Entity::Run, run_id, run::STREAMING, None, "").await {
        Ok(_) | Err(StoreError::Illegal(_)) => {}
        Err(e) => return Err(e),
    }
    tx.set_run_started_at(run_id, taken_at).await
}
