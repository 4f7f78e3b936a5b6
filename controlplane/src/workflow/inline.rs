//! Running a step where it was enqueued, for a caller that waits for its
//! outcome (the API's prompt): waking a runner, its claim and the caller's
//! read-back of the result cost a few milliseconds per step.
//!
//! The caller leases the step in the transaction that enqueues it
//! ([`Tx::claim_enqueued`](crate::store::outbox::Tx::claim_enqueued): the
//! same ordering rule as a runner's claim, so it does not lease a step with
//! an older one of its entity still open) and hands the row to [`run`],
//! which runs it exactly as a runner would: on a task of its own (a client
//! that goes away does not cancel it half-way), the lease kept alive by
//! heartbeats, the outcome recorded under the lease's epoch, a failure that
//! may pass retried later by the runners with backoff. The lease is held
//! under the runner's owner name, so a control plane that dies mid-step
//! gives it back when it restarts, as it does its runner's steps.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::store::outbox::OutboxRow;

use super::registry::{Handler, Registry};
use super::step::{self, Shared};
use super::{Backoff, RunnerConfig, StepContext, StepResult};

/// How steps run where they are enqueued: the lease they are claimed with,
/// and the backoff a failure is retried after.
#[derive(Debug, Clone)]
pub struct InlineConfig {
    /// The `lease_owner`: this control plane's runner's.
    pub owner: String,
    pub lease: Duration,
    pub backoff: Backoff,
}

impl InlineConfig {
    /// Runs steps under `runner`'s owner name and settings.
    pub fn of(runner: &RunnerConfig) -> Self {
        Self { owner: runner.owner.clone(), lease: runner.lease, backoff: runner.backoff }
    }
}

impl Default for InlineConfig {
    fn default() -> Self {
        Self::of(&RunnerConfig::default())
    }
}

/// Runs the step `row`, leased by its caller under `config`, with `handler`,
/// and returns the handler's outcome as soon as it is known; recording it
/// goes on in the background. A caller that gets `Err` (or `None`: the
/// task died) should wait for the step's recorded end: a failure that may
/// pass is retried by the runners.
pub async fn run<F, Fut>(store: &Store, config: &InlineConfig, row: OutboxRow, handler: F) -> Option<StepResult>
where
    F: Fn(StepContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = StepResult> + Send + 'static,
{
    let shared = Shared {
        store: store.clone(),
        registry: Registry::new(),
        lease: config.lease,
        backoff: config.backoff,
        // Never cancelled: a step run here ends, or its process does.
        abandon: CancellationToken::new(),
    };
    let handler: Handler = Arc::new(move |ctx| Box::pin(handler(ctx)));
    let (tx, rx) = tokio::sync::oneshot::channel();
    // Carried: the step's node calls belong to the request's trace.
    tokio::spawn(agentd_proto::trace::carry(async move {
        step::execute(&shared, row, Some(handler), |outcome| {
            let _ = tx.send(outcome.clone());
        })
        .await;
    }));
    rx.await.ok()
}
