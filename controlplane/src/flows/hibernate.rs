//! `container.hibernate`: freezes an idle container's sandbox (memory and
//! processes kept). Enqueued by node checks for containers idle longer than
//! `hibernate_after`; ordered with the container's other steps, so it never
//! overtakes a prompt's dispatch, and skipped when a turn runs by then.

use serde_json::json;

use agentd_proto::node::FreezeSandboxRequest;

use super::{deadline, fence, within, node_error, store_error, transient};
use crate::AppState;
use crate::store::StoreError;
use crate::store::states::container;
use crate::workflow::{StepContext, StepError, StepResult};

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let id = ctx.entity_id.as_str();
    let c = app.store.get_container(id).await.map_err(store_error)?;
    if c.state != container::READY {
        return Ok(json!({"skipped": format!("container is {}", c.state)}));
    }
    for s in app.store.sessions_of_container(id).await.map_err(store_error)? {
        if !app.store.running_runs_of_session(&s.id).await.map_err(store_error)?.is_empty() {
            return Ok(json!({"skipped": "a turn is running"}));
        }
    }
    let request = FreezeSandboxRequest { container_id: id.to_string(), fence: fence(&ctx, "freeze") };
    let mut node = super::node_for(&app, &c.node_id).await?;
    match within(deadline(&app), node.freeze_sandbox(request)).await {
        Ok(_) => {}
        Err(status) if transient(&status) => return Err(node_error("freeze", &status)),
        Err(status) => return Err(StepError::permanent(format!("freeze: {}", status.message()))),
    }
    match app.store.container_hibernated(id).await {
        Ok(()) | Err(StoreError::Illegal(_)) => {}
        Err(e) => return Err(store_error(e)),
    }
    tracing::info!(container_id = id, "idle container hibernated");
    Ok(json!({"hibernated": true}))
}
