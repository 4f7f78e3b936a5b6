//! Recording a container gone (its sessions closed, their running turns
//! failed), and deleting one directly, outside the runner: `agentd up` does
//! that on shutdown, after its runner has stopped. The API deletes through
//! the `container.delete` workflow step (`crate::flows::delete`).

use agentd_proto::node::DeleteSandboxRequest;

use crate::AppState;
use crate::domain::Refusal;
use crate::store::StoreError;
use crate::store::states::session;

pub async fn delete_container(app: &AppState, container_id: &str, reason: &str) -> Result<(), Refusal> {
    let (_, node) = app.nodes.of_container(container_id).await.map_err(|s| Refusal::from_node(&s))?;
    node.clone()
        .delete_sandbox(DeleteSandboxRequest { container_id: container_id.to_string(), fence: None })
        .await
        .map_err(|s| Refusal::from_node(&s))?;
    record_gone(app, container_id, reason).await?;
    Ok(())
}

/// Records that a container's sandbox no longer exists.
pub async fn record_gone(app: &AppState, container_id: &str, reason: &str) -> Result<(), StoreError> {
    for s in app.store.sessions_of_container(container_id).await? {
        for run in app.store.running_runs_of_session(&s.id).await? {
            app.store.run_failed(&run.id, reason).await?;
        }
        if s.state != session::CLOSED {
            app.store.session_closed(&s.id).await?;
        }
    }
    crate::flows::agents::container_gone(app, container_id, reason).await?;
    app.store.container_deleted(container_id).await
}
