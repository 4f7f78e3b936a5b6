//! The API's workflows on the outbox runner: an API call writes the state
//! change and the step that carries it out in one transaction, a runner
//! (this process's or another control plane's on the same database) runs the
//! step, and the call waits for the step's outcome so that clients see the
//! same contract as when the API called the node itself.
//!
//! - [`create`]: `session.create`: build the sandbox, start the agent, open
//!   the ACP session, record them ready (or failed, with the node's problem).
//! - [`open`]: `session.open`: a further session in a ready container, on
//!   a running agent of the same plan or a new one beside it.
//! - [`close`]: `session.close`: one session of a container that goes on.
//! - [`delete`]: `container.delete`: remove the sandbox, record it gone.
//! - [`container_create`]: `container.create`: a container made on its own.
//! - [`dispatch`]: `run.dispatch`: hand a prompt to the node.
//! - [`hibernate`]: `container.hibernate`: freeze an idle container.
//! - [`suspend`]: `container.freeze` / `container.thaw`: hibernate and
//!   resume asked for through the API.
//! - [`node_check`]: `node.check`, periodic: heartbeats, lost nodes,
//!   orphan sandboxes, idle containers (hibernate, stop after their TTL).
//! - [`registry_sync`]: `registry.sync`, periodic: the configured agent
//!   registry synced again.
//!
//! Every step orders on its container (`entity_kind` `container`), so a
//! delete never overtakes the create before it. Each node call carries a
//! [`Fence`]: the step's idempotency key (one per call), its row and lease
//! epoch; the node answers a repeated key with its first answer and refuses
//! a worker whose lease was taken over (see `node/src/fence.rs`). A step
//! whose runner died mid-way therefore runs again from the top, and every
//! call it already made is answered, not repeated.
//!
//! A step's outcome is its result: `{"ok": true}`, or the problem the client
//! should see (`{"ok": false, "status", "code", "detail"}`) once the
//! entities are in a true state. Only what may pass (the node or the store
//! unreachable) is a retryable step error; on the last attempt it becomes a
//! recorded failure like any other.

pub mod agents;
pub mod archive;
pub mod close;
pub mod container_create;
pub mod create;
pub mod delete;
pub mod dispatch;
pub mod hibernate;
pub mod node_check;
pub mod open;
pub mod registry_sync;
pub mod suspend;

use crate::domain::Code;
use std::time::Duration;

use agentd_proto::node::Fence;
use crate::fleet::nodes::NodeClient;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::domain::{Class, Outcome, Refusal};
use crate::store::outbox::{NewStep, step_state};
use crate::store::{StoreError, now_ms};
use crate::workflow::{Registry, StepContext, StepError};

/// The ordering key of every API workflow step.
pub const CONTAINER: &str = "container";
/// The ordering key of node checks.
pub const NODE: &str = "node";
/// The ordering key of registry syncs.
pub const REGISTRY: &str = "registry";

/// Step kinds.
pub const SESSION_CREATE: &str = "session.create";
pub const SESSION_OPEN: &str = "session.open";
pub const SESSION_CLOSE: &str = "session.close";
pub const CONTAINER_DELETE: &str = "container.delete";
pub const CONTAINER_CREATE: &str = "container.create";
pub const RUN_DISPATCH: &str = "run.dispatch";
pub const NODE_CHECK: &str = "node.check";
pub const REGISTRY_SYNC: &str = "registry.sync";
pub const CONTAINER_HIBERNATE: &str = "container.hibernate";
pub const CONTAINER_FREEZE: &str = "container.freeze";
pub const CONTAINER_THAW: &str = "container.thaw";

/// The handlers of the API's steps, for a runner serving `app`.
pub fn registry(app: &AppState, fleet: node_check::FleetConfig) -> Registry {
    let mut registry = Registry::new();
    let a = app.clone();
    registry.register(SESSION_CREATE, move |ctx| create::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(SESSION_OPEN, move |ctx| open::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(SESSION_CLOSE, move |ctx| close::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(CONTAINER_DELETE, move |ctx| delete::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(CONTAINER_CREATE, move |ctx| container_create::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(RUN_DISPATCH, move |ctx| dispatch::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(CONTAINER_HIBERNATE, move |ctx| hibernate::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(CONTAINER_FREEZE, move |ctx| suspend::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(CONTAINER_THAW, move |ctx| suspend::run(a.clone(), ctx));
    let a = app.clone();
    registry.register(NODE_CHECK, move |ctx| node_check::run(a.clone(), fleet, ctx));
    let a = app.clone();
    registry.register(REGISTRY_SYNC, move |ctx| registry_sync::run(a.clone(), ctx));
    registry
}

/// A step enqueued every `interval`.
pub struct Periodic {
    pub kind: &'static str,
    pub entity_kind: &'static str,
    pub entity_id: String,
    pub payload: Value,
    pub interval: Duration,
    /// The first is enqueued this long after start.
    pub first_after: Duration,
}

/// Enqueues `p`'s step every interval until `shutdown`, under a key naming
/// the interval's slot: however many control planes share the database,
/// one runs per slot. One try each: the next slot's step is the retry.
pub async fn schedule_periodic(app: AppState, p: Periodic, shutdown: CancellationToken) {
    let interval_ms = i64::try_from(p.interval.as_millis()).unwrap_or(i64::MAX).max(1);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + p.first_after, p.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let key = format!("{}:{}:{}", p.kind, p.entity_id, now_ms() / interval_ms);
        let step = NewStep::new(p.entity_kind, &p.entity_id, p.kind, &key, p.payload.clone()).max_attempts(1);
        if let Err(e) = app.store.enqueue(step).await {
            tracing::debug!(kind = p.kind, error = %e, "cannot schedule a periodic step");
        }
    }
}

/// The fence of one node call made by the step `ctx`; `call` names the call
/// within the step (each gets its own key).
pub fn fence(ctx: &StepContext, call: &str) -> Option<Fence> {
    Some(Fence { idempotency_key: format!("{}/{call}", ctx.idempotency_key), step: ctx.id, epoch: ctx.epoch })
}

/// Bounds one node call of a step by `deadline`: a node that does not
/// answer in time fails the attempt with `DeadlineExceeded` (transient), so
/// the runner retries the step with backoff and the call goes out again
/// under the same idempotency key: the node answers it with the first
/// result if the late call did finish there.
pub async fn within<T>(
    deadline: Duration,
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<tonic::Response<T>, tonic::Status> {
    match tokio::time::timeout(deadline, call).await {
        Ok(answer) => answer,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!("no answer within {} ms", deadline.as_millis()))),
    }
}

/// The deadline of a step's node call.
pub fn deadline(app: &AppState) -> Duration {
    app.node_call_timeout
}

/// The deadline of a node call that waits for the agent (its `initialize`,
/// `session/new`): the agent's initialize timeout on top.
pub fn agent_deadline(app: &AppState) -> Duration {
    app.node_call_timeout + Duration::from_millis(u64::from(app.defaults.initialize_timeout_ms))
}

/// A step outcome that succeeded.
pub fn ok() -> Value {
    Outcome::Done.to_value()
}

/// A step outcome that failed with `refusal`, after the entities were
/// recorded in a true state.
pub fn failed(refusal: &Refusal) -> Value {
    Outcome::Refused(refusal.clone()).to_value()
}

/// Whether a node call's failure may pass on its own (the node unreachable
/// or slow, or our lease taken over), as opposed to an answer.
pub fn transient(status: &tonic::Status) -> bool {
    match agentd_proto::error::code_of(status) {
        Some(code) => code == Code::StaleEpoch.as_str(),
        None => matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
        ),
    }
}

/// A store failure inside a step: always worth retrying (the database may
/// come back); the entity stays as it was.
pub fn store_error(e: StoreError) -> StepError {
    StepError::retryable(format!("store: {e}"))
}

/// A node failure that may pass, as a retryable step error.
pub fn node_error(what: &str, status: &tonic::Status) -> StepError {
    StepError::retryable(format!("{what}: node: {}", status.message()))
}

/// The client of the node `node_id`; a node the store cannot name or reach
/// yet is a failure that may pass.
pub async fn node_for(app: &AppState, node_id: &str) -> Result<NodeClient, StepError> {
    app.nodes.client(node_id).await.map_err(|e| node_error("reach node", &e))
}

/// Fault tests only: a step that reaches the point `AGENTD_TEST_PAUSE_STEP`
/// names (e.g. `session.create/sandbox`) stops there for good, so that the
/// test can kill the control plane in the middle of the step.
#[cfg(not(feature = "faults"))]
pub async fn test_pause(_point: &str) {}

/// See the other `test_pause`: the `faults` feature's, which test builds
/// turn on and release builds never have.
#[cfg(feature = "faults")]
pub async fn test_pause(point: &str) {
    if std::env::var("AGENTD_TEST_PAUSE_STEP").is_ok_and(|p| p == point) {
        tracing::warn!(point, "step paused for a fault test (AGENTD_TEST_PAUSE_STEP)");
        std::future::pending::<()>().await;
    }
}

/// How often a waiting API call looks at its step when no wake-up comes
/// (another control plane may run it).
const WAIT_POLL: Duration = Duration::from_millis(100);

/// What a waiting API call learned about its step.
pub enum Waited {
    /// The step finished: its outcome, refused if it failed.
    Finished(Result<(), Refusal>),
    /// Still running when the wait ended.
    Pending,
}

/// Waits up to `timeout` for the step with `key` to finish.
pub async fn wait_for_step(app: &AppState, key: &str, timeout: Duration) -> Result<Waited, StoreError> {
    let deadline = tokio::time::Instant::now() + timeout;
    // Step ends in this process bump the wake-up signal.
    let mut wakeups = app.store.outbox_wakeups();
    loop {
        wakeups.borrow_and_update();
        let Some(step) = app.store.get_step_by_key(key).await? else {
            return Ok(Waited::Finished(Err(Refusal::new(Class::Internal, Code::Internal, format!("step {key} vanished")))));
        };
        match step.state.as_str() {
            step_state::DONE => return Ok(Waited::Finished(outcome(step.result.as_ref()))),
            step_state::FAILED => {
                let error = step.last_error.unwrap_or_default();
                return Ok(Waited::Finished(Err(Refusal::new(Class::Unavailable, Code::NodeUnavailable, error))));
            }
            _ => {}
        }
        tokio::select! {
            _ = wakeups.changed() => {}
            _ = tokio::time::sleep(WAIT_POLL) => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(Waited::Pending),
        }
    }
}

/// A finished step's result as the API's answer.
pub fn outcome(result: Option<&Value>) -> Result<(), Refusal> {
    Outcome::from_value(result).into_result()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_deadline_fails_transiently() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(tonic::Response::new(()))
        };
        let status = within(Duration::from_millis(20), slow).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(transient(&status), "retried by the runner, not recorded as the node's answer");
        let fast = async { Ok(tonic::Response::new(7)) };
        assert_eq!(within(Duration::from_secs(5), fast).await.unwrap().into_inner(), 7);
    }
}
