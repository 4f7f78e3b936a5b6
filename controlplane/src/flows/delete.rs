//! `container.delete`: the node removes the sandbox, then the store records
//! the container deleted, its sessions closed and their running turns failed.
//! Written by `DELETE /v1/sessions/{id}` and `DELETE /v1/containers/{id}`
//! with the container moved to `stopping`.

use crate::domain::Code;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use agentd_proto::node::DeleteSandboxRequest;

use super::{CONTAINER, CONTAINER_DELETE, Waited, deadline, fence, within, node_error, ok, store_error, test_pause, transient, wait_for_step};
use crate::AppState;
use crate::domain::Refusal;
use crate::store::outbox::NewStep;
use crate::store::states::{Entity, container};
use crate::workflow::{StepContext, StepError, StepResult};

#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    /// Why, for the runs it fails.
    pub reason: String,
}

/// How long a DELETE waits for its step (killing a sandbox takes well under
/// a second; the rest is a node that is slow to answer).
const WAIT: Duration = Duration::from_secs(30);

/// The idempotency key of a container's delete step: one per container.
pub fn key(container_id: &str) -> String {
    format!("{CONTAINER_DELETE}:{container_id}")
}

/// Where a delete stands when its request answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The sandbox is gone and the store says so.
    Done,
    /// The step is written and retried until the node confirms.
    Pending,
}

/// Moves the container to `stopping` and writes its delete step, in one
/// transaction, then waits for the step. Idempotent: a delete that finds
/// the container `stopping` waits for the delete under way (its step has
/// one key per container), one that finds it `deleted` is done.
pub async fn request(app: &AppState, container_id: &str, reason: &str) -> Result<Deleted, Refusal> {
    let key = match begin(app, container_id, reason).await {
        Ok(key) => key,
        Err(refused) if refused.code == Code::IllegalState => match app.store.get_container(container_id).await?.state.as_str() {
            container::DELETED => return Ok(Deleted::Done),
            container::STOPPING => key(container_id),
            _ => return Err(refused),
        },
        Err(refused) => return Err(refused),
    };
    match wait_for_step(app, &key, WAIT).await? {
        Waited::Finished(outcome) => outcome.map(|()| Deleted::Done),
        Waited::Pending => Ok(Deleted::Pending),
    }
}

/// The transaction of [`request`], without the wait; returns the step's key.
pub async fn begin(app: &AppState, container_id: &str, reason: &str) -> Result<String, Refusal> {
    let key = key(container_id);
    let payload = serde_json::to_value(Payload { reason: reason.to_string() }).expect("payload serializes");
    app.store
        .transaction(async |tx| {
            match tx.transition(Entity::Container, container_id, container::STOPPING, None, reason).await? {
                Some(_) => {}
                None => {
                    let detail = format!("container {container_id} is {}: a delete is under way", container::STOPPING);
                    return Err(Refusal::conflict(Code::IllegalState, detail));
                }
            }
            tx.enqueue(NewStep::new(CONTAINER, container_id, CONTAINER_DELETE, &key, payload)).await?;
            Ok(())
        })
        .await?;
    Ok(key)
}

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let container_id = ctx.entity_id.as_str();
    test_pause("container.delete/start").await;
    super::archive::archive_container(&app, container_id).await;
    let request = DeleteSandboxRequest { container_id: container_id.to_string(), fence: fence(&ctx, "sandbox") };
    let (_, mut node) = app.nodes.of_container(container_id).await.map_err(|e| super::node_error("reach node", &e))?;
    match within(deadline(&app), node.delete_sandbox(request)).await {
        Ok(_) => {}
        Err(status) if transient(&status) => return Err(node_error("delete sandbox", &status)),
        Err(status) => return Err(StepError::permanent(format!("delete sandbox: {}", status.message()))),
    }
    crate::teardown::record_gone(&app, container_id, &payload.reason).await.map_err(store_error)?;
    Ok(ok())
}
