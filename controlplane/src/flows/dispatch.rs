//! `run.dispatch`: hands a turn to the node. Written by
//! `POST /v1/sessions/{id}:prompt` with the run row (`running`); the run's
//! end is recorded later by the run follower (`crate::runs`) from the
//! session's event log.

use serde::{Deserialize, Serialize};

use agentd_proto::node::PromptRequest;

use super::{deadline, failed, fence, within, node_error, ok, store_error, transient};
use crate::AppState;
use crate::api::Problem;
use crate::store::StoreError;
use crate::store::states::run;
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
    if r.state == run::QUEUED {
        match app.store.run_dispatching(&r.id).await {
            Ok(()) | Err(StoreError::Illegal(_)) => {}
            Err(e) => return Err(store_error(e)),
        }
    }
    let r = app.store.get_run(&payload.run_id).await.map_err(store_error)?;
    if r.state != run::DISPATCHING && r.state != run::STREAMING {
        // Ended before it was handed over (its container was deleted, say).
        let detail = format!("run {} is {}", r.id, r.state);
        return Ok(failed(&Problem::conflict("illegal_state", detail)));
    }
    let request = PromptRequest {
        container_id: ctx.entity_id.clone(),
        session_id: payload.session_id.clone(),
        run_id: payload.run_id.clone(),
        prompt_json: payload.prompt_json.clone(),
        fence: fence(&ctx, "prompt"),
    };
    match within(deadline(&app), app.node.clone().prompt(request)).await {
        Ok(_) => Ok(ok()),
        Err(status) if transient(&status) && !ctx.is_last_attempt() => Err(node_error("prompt", &status)),
        Err(status) => {
            let problem = Problem::from(status);
            app.store.run_failed(&payload.run_id, &problem.detail).await.map_err(store_error)?;
            Ok(failed(&problem))
        }
    }
}
