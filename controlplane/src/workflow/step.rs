//! One claimed step: run its handler under a kept-alive lease, then record
//! the outcome with the lease's epoch.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};
use crate::store::outbox::{Failed, OutboxError, OutboxRow};

use super::registry::{Handler, Registry};
use super::{Backoff, CompletionWriteFn, StepContext, StepError, StepResult};

/// What a step task needs besides its row; shared by all of a runner's steps.
pub(crate) struct Shared {
    pub store: Store,
    pub registry: Registry,
    /// How long a claim holds; the heartbeat renews it every third of it.
    pub lease: Duration,
    pub backoff: Backoff,
    /// Cancelled when the drain bound has passed: unfinished steps are given
    /// back (released) instead of completing.
    pub abandon: CancellationToken,
}

/// Runs `row`'s handler and records how it ended. Never fails: a step whose
/// outcome cannot be recorded keeps its lease until it expires, and the
/// reaper makes it claimable again.
pub(crate) async fn run(shared: Arc<Shared>, row: OutboxRow) {
    let handler = shared.registry.get(&row.kind).cloned();
    execute(&shared, row, handler, |_| {}).await;
}

/// [`run`] with the handler given: `seen` gets the handler's outcome as soon
/// as it is known, before it is recorded (a caller waiting for the step may
/// answer from it: a step whose outcome is lost with its process runs again,
/// and its node calls are answered from the node's memory).
pub(crate) async fn execute(shared: &Shared, row: OutboxRow, handler: Option<Handler>, seen: impl FnOnce(&StepResult)) {
    let (id, epoch) = (row.id, row.lease_epoch);
    let ctx = StepContext {
        id,
        epoch,
        idempotency_key: row.idempotency_key,
        entity_kind: row.entity_kind,
        entity_id: row.entity_id,
        kind: row.kind,
        payload: row.payload,
        attempt: row.attempts,
        max_attempts: row.max_attempts,
        recorded: Default::default(),
        completion_writes: Default::default(),
    };
    let kind = ctx.kind.clone();
    let recorded = ctx.recorded.clone();
    let completion_writes = ctx.completion_writes.clone();

    let outcome = match handler {
        None => Err(StepError::retryable(format!("no handler for step kind {kind:?} in this runner"))),
        Some(handler) => {
            let handler = AssertUnwindSafe(handler(ctx)).catch_unwind();
            match heartbeat(shared, id, epoch, handler).await {
                Some(Ok(outcome)) => outcome,
                Some(Err(_panic)) => Err(StepError::retryable("step handler panicked")),
                None => {
                    // Abandoned at shutdown: give the step back for another runner.
                    if let Err(e) = shared.store.release(id, epoch, "runner shut down before the step finished").await {
                        tracing::warn!(id, epoch, kind, error = %e, "cannot release step");
                    }
                    return;
                }
            }
        }
    };
    seen(&outcome);
    if recorded.load(std::sync::atomic::Ordering::Acquire) {
        // Its handler's transaction recorded it done, with its state change.
        tracing::debug!(id, epoch, kind, "step done");
    } else {
        let writes = if outcome.is_ok() { completion_writes.take() } else { None };
        record(shared, id, epoch, &kind, row.attempts, outcome, writes).await;
    }
    // The entity's next step, held back behind this one, may be claimable now.
    shared.store.wake_outbox();
}

/// Drives `handler`, renewing the lease every third of its length; `None`
/// if the runner abandoned the step first.
async fn heartbeat<F: Future>(shared: &Shared, id: i64, epoch: i64, handler: F) -> Option<F::Output> {
    let period = (shared.lease / 3).max(Duration::from_millis(10));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut handler = std::pin::pin!(handler);
    loop {
        tokio::select! {
            outcome = &mut handler => return Some(outcome),
            _ = shared.abandon.cancelled() => return None,
            _ = beat.tick() => match shared.store.extend_lease(id, epoch, shared.lease).await {
                Ok(()) => {}
                // Someone else holds the step now; its outcome here will be refused.
                Err(e @ OutboxError::StaleLease { .. }) => tracing::warn!(error = %e, "lease lost while the step ran"),
                Err(e) => tracing::warn!(id, epoch, error = %e, "cannot renew lease"),
            },
        }
    }
}

/// How often an outcome the store refused for being down is tried again.
const RECORD_RETRY: Duration = Duration::from_millis(250);

async fn record(shared: &Shared, id: i64, epoch: i64, kind: &str, attempt: i64, outcome: StepResult, writes: Option<CompletionWriteFn>) {
    let retry_in = outcome.as_ref().err().and_then(|e| e.retryable.then(|| shared.backoff.delay(attempt)));
    // A store that is down briefly (a PostgreSQL restart) is waited for
    // while the lease would still be held: leaving the outcome to the lease's
    // expiry would redo the step, and hold up whoever waits for it, for a
    // whole lease. The epoch keeps a late write safe.
    let give_up = tokio::time::Instant::now() + shared.lease;
    let recorded = loop {
        let recorded = match &outcome {
            Ok(result) => match &writes {
                None => shared.store.complete(id, epoch, result).await,
                Some(writes) => shared.store.complete_with(id, epoch, result, writes).await,
            }
            .map(|()| None),
            Err(e) => shared.store.fail(id, epoch, &e.message, retry_in).await.map(|failed| Some((failed, e))),
        };
        match recorded {
            Err(OutboxError::Store(StoreError::Db(e))) if tokio::time::Instant::now() < give_up && !shared.abandon.is_cancelled() => {
                tracing::warn!(id, epoch, kind, error = %e, "cannot record step outcome yet; retrying");
                tokio::time::sleep(RECORD_RETRY).await;
            }
            recorded => break recorded,
        }
    };
    match recorded {
        Ok(None) => tracing::debug!(id, epoch, kind, "step done"),
        Ok(Some((Failed::Retry { available_at }, e))) => {
            shared.store.metrics().step_retried(kind);
            tracing::info!(id, epoch, kind, attempt, available_at, error = %e, "step failed; will retry")
        }
        Ok(Some((Failed::Final, e))) => tracing::warn!(id, epoch, kind, attempt, error = %e, "step failed for good"),
        Err(e @ OutboxError::StaleLease { .. }) => tracing::warn!(kind, error = %e, "step outcome dropped"),
        Err(e) => tracing::warn!(id, epoch, kind, error = %e, "cannot record step outcome; its lease will expire"),
    }
}
