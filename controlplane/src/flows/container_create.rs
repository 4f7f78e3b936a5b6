//! `container.create`: a container made on its own (`POST /v1/containers`,
//! the original agentd's explicit create): build its sandbox from the plan
//! the API compiled, record it ready. Its sessions come later and bring
//! their agents (`session.open`). A node refusal removes what was built and
//! records the container failed, with the node's reason as the outcome.

use crate::domain::Code;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use prost::Message;
use serde::{Deserialize, Serialize};

use agentd_proto::node::{CreateSandboxRequest, DeleteSandboxRequest, SandboxPlan};

use super::{deadline, failed, fence, node_error, ok, store_error, transient, within};
use crate::AppState;
use crate::domain::Refusal;
use crate::store::StoreError;
use crate::store::states::container;
use crate::workflow::{StepContext, StepError, StepResult};

#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    /// The compiled `SandboxPlan`, protobuf in base64.
    pub sandbox_plan: String,
}

impl Payload {
    pub fn new(plan: &SandboxPlan) -> Self {
        Self { sandbox_plan: B64.encode(plan.encode_to_vec()) }
    }

    fn plan(&self) -> Result<SandboxPlan, String> {
        let bytes = B64.decode(&self.sandbox_plan).map_err(|e| e.to_string())?;
        SandboxPlan::decode(bytes.as_slice()).map_err(|e| e.to_string())
    }
}

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let container_id = ctx.entity_id.as_str();
    let c = app.store.get_container(container_id).await.map_err(store_error)?;
    if c.state != container::PROVISIONING {
        // An earlier attempt finished, or a delete overtook it.
        return Ok(if c.state == container::READY {
            ok()
        } else {
            failed(&Refusal::conflict(Code::IllegalState, c.error.unwrap_or_else(|| format!("container {container_id} is {}", c.state))))
        });
    }
    let plan = payload.plan().map_err(|e| StepError::permanent(format!("bad plan in payload: {e}")))?;
    let mut node = super::node_for(&app, &c.node_id).await?;
    let create = node.create_sandbox(CreateSandboxRequest { plan: Some(plan), fence: fence(&ctx, "sandbox") });
    let started = std::time::Instant::now();
    match within(deadline(&app), create).await {
        Ok(sandbox) => {
            app.store.metrics().sandbox_created(started.elapsed());
            match app.store.container_ready(container_id, sandbox.into_inner().supervisor_pid).await {
                Ok(()) => Ok(ok()),
                Err(StoreError::Illegal(e)) => Ok(failed(&Refusal::conflict(Code::IllegalState, format!("{e} (deleted while being created)")))),
                Err(e) => Err(store_error(e)),
            }
        }
        Err(status) if transient(&status) && !ctx.is_last_attempt() => Err(node_error("create container", &status)),
        Err(status) => {
            let refusal = Refusal::from_node(&status);
            let undo = DeleteSandboxRequest { container_id: container_id.to_string(), fence: fence(&ctx, "undo") };
            if let Err(e) = within(deadline(&app), node.delete_sandbox(undo)).await {
                tracing::warn!(container_id, error = %e, "cannot remove the sandbox of a failed create");
            }
            let recorded = async {
                app.store.container_failed(container_id, &refusal.detail).await?;
                app.store.container_deleted(container_id).await
            };
            match recorded.await {
                Ok(()) | Err(StoreError::Illegal(_)) => Ok(failed(&refusal)),
                Err(e) => Err(store_error(e)),
            }
        }
    }
}
