//! `container.freeze` and `container.thaw`: hibernate and resume asked for
//! through the API (`POST /v1/containers/{id}:hibernate` / `:resume`).
//!
//! The request moves the container (`ready` -> `hibernated`, or back) and
//! writes the step in one transaction, then waits for the step, which makes
//! the fenced node call. The state is written first so that the container's
//! steps order around it: a prompt accepted after a resume is dispatched
//! behind the thaw, and one refused after a hibernate never reaches the
//! node. A node that refuses puts the state back and its problem is the
//! answer, as when the API called the node itself.

use crate::domain::Code;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use agentd_proto::node::{FreezeSandboxRequest, ThawSandboxRequest};

use super::{CONTAINER, CONTAINER_FREEZE, CONTAINER_THAW, Waited, deadline, failed, fence, node_error, ok, store_error, transient, wait_for_step, within};
use crate::AppState;
use crate::domain::{Class, Refusal};
use crate::store::StoreError;
use crate::store::outbox::NewStep;
use crate::store::states::{Entity, container};
use crate::workflow::{StepContext, StepError, StepResult};

/// Freezing or thawing a cgroup is quick; the rest is a slow node.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Hibernate,
    Resume,
}

impl Action {
    /// The state the container must be in, the state it moves to, the step kind.
    fn plan(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Action::Hibernate => (container::READY, container::HIBERNATED, CONTAINER_FREEZE),
            Action::Resume => (container::HIBERNATED, container::READY, CONTAINER_THAW),
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Hibernate => "hibernates",
            Action::Resume => "resumes",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Payload {
    pub action: Action,
}

/// Moves the container and writes its step in one transaction, then waits
/// for the step. Anything but the one legal source state is 409 naming the
/// container's state, a repeat included (hibernating a hibernated container).
pub async fn request(app: &AppState, container_id: &str, action: Action) -> Result<(), Refusal> {
    let (from, to, kind) = action.plan();
    let key = format!("{kind}:{container_id}:{}", uuid::Uuid::now_v7().simple());
    let payload = serde_json::to_value(Payload { action }).expect("payload serializes");
    let refused = |state: &str| {
        Refusal::conflict(Code::IllegalState, format!("container {container_id} is {state}; only a {from} one {}", action.verb()))
    };
    let reason = format!("{kind} requested");
    app.store
        .transaction(async |tx| {
            match tx.transition(Entity::Container, container_id, to, None, &reason).await {
                Ok(Some(_)) => {}
                Ok(None) => return Err(refused(to)),
                Err(StoreError::Illegal(e)) => return Err(refused(&e.current)),
                Err(e) => return Err(e.into()),
            }
            tx.enqueue(NewStep::new(CONTAINER, container_id, kind, &key, payload)).await?;
            Ok(())
        })
        .await?;
    match wait_for_step(app, &key, WAIT).await? {
        Waited::Finished(outcome) => outcome,
        Waited::Pending => Err(Refusal::new(
            Class::Unavailable,
            Code::NodeUnavailable,
            format!("container {container_id} is {to}; the node has not confirmed yet (it will be retried)"),
        )),
    }
}

pub async fn run(app: AppState, ctx: StepContext) -> StepResult {
    let payload: Payload = serde_json::from_value(ctx.payload.clone()).map_err(|e| StepError::permanent(format!("bad payload: {e}")))?;
    let id = ctx.entity_id.as_str();
    let c = app.store.get_container(id).await.map_err(store_error)?;
    // Deleted or failed meanwhile: nothing left to freeze or thaw. Any other
    // state is what the steps before this one left; they ran in order.
    if matches!(c.state.as_str(), container::STOPPING | container::DELETED | container::FAILED) {
        let detail = format!("container {id} is {}", c.state);
        return Ok(failed(&Refusal::conflict(Code::IllegalState, detail)));
    }
    let mut node = super::node_for(&app, &c.node_id).await?;
    let answer = match payload.action {
        Action::Hibernate => {
            let request = FreezeSandboxRequest { container_id: id.to_string(), fence: fence(&ctx, "freeze") };
            within(deadline(&app), node.freeze_sandbox(request)).await
        }
        Action::Resume => {
            let request = ThawSandboxRequest { container_id: id.to_string(), fence: fence(&ctx, "thaw") };
            within(deadline(&app), node.thaw_sandbox(request)).await
        }
    };
    match answer {
        Ok(_) => Ok(ok()),
        Err(status) if transient(&status) && !ctx.is_last_attempt() => Err(node_error("freeze/thaw", &status)),
        Err(status) => {
            // The node did not do it: the container is as it was.
            let (from, _, _) = payload.action.plan();
            let back = app.store.transaction(async |tx| {
                tx.transition(Entity::Container, id, from, None, "node refused").await.map(|_| ())
            });
            match back.await {
                Ok(()) | Err(StoreError::Illegal(_)) => {}
                Err(e) => return Err(store_error(e)),
            }
            Ok(failed(&Refusal::from_node(&status)))
        }
    }
}
