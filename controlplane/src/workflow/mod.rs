//! The workflow runner, in place of Temporal: a transactional outbox drained
//! by leased, fenced, retrying workers.
//!
//! A state change and the steps it needs are written in one transaction
//! ([`Store::begin`](crate::store::Store::begin),
//! [`Tx::enqueue`](crate::store::outbox::Tx::enqueue),
//! [`Store::transition_and_enqueue`](crate::store::Store::transition_and_enqueue));
//! a [`Runner`] claims due steps, runs each kind's handler from its
//! [`Registry`], and records the outcome under the lease's epoch. The store
//! side (schema, claim SQL, ordering and fencing rules) is documented in
//! [`crate::store::outbox`].
//!
//! Layout:
//! - [`registry`]: step kind -> async handler.
//! - [`runner`]: the claim loop, bounded concurrency, graceful shutdown.
//! - [`step`]: one claimed step: heartbeat, handler, complete or fail.
//! - [`inline`]: a step run by the caller that enqueued it (claimed in the
//!   enqueuing transaction), for an API call that waits for its outcome.
//! - [`backoff`]: exponential backoff with jitter between attempts.
//! - [`wake`]: PostgreSQL LISTEN/NOTIFY as wake-up hints between control planes.
//! - [`janitor`]: the lease reaper and pruning of finished rows.
//!
//! No transaction is open while a handler runs: the claim commits before the
//! handler starts, and the completion is one short statement after it ends.
//! A handler may run more than once for a step (a lease expired, a runner
//! died after the handler's side effect but before completing), so it must be
//! idempotent: it gets the step's idempotency key and lease epoch to pass on
//! (the node rejects stale epochs).

pub mod backoff;
pub mod inline;
pub mod janitor;
pub mod registry;
pub mod runner;
pub mod step;
pub mod wake;

#[cfg(test)]
mod tests;

pub use backoff::Backoff;
pub use inline::InlineConfig;
pub use registry::Registry;
pub use runner::{Runner, RunnerConfig};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::Value;

use crate::store::StoreError;
use crate::store::outbox::Tx;

/// What a handler gets: the claimed step.
#[derive(Debug, Clone)]
pub struct StepContext {
    /// The outbox row.
    pub id: i64,
    /// The lease epoch this run holds; pass it to whatever the step calls.
    pub epoch: i64,
    /// Stable across retries: the receiver's deduplication key.
    pub idempotency_key: String,
    pub entity_kind: String,
    pub entity_id: String,
    pub kind: String,
    pub payload: Value,
    /// 1 on the first try.
    pub attempt: i64,
    /// The attempt after which a failure is final.
    pub max_attempts: i64,
    /// Set once a transaction of the handler's recorded the step done
    /// ([`Tx::complete_step`](crate::store::outbox::Tx::complete_step)) and
    /// committed: the runner then records nothing more.
    pub(crate) recorded: Arc<AtomicBool>,
    /// Writes to commit with the step's completion ([`Self::complete_with`]).
    pub(crate) completion_writes: CompletionWrites,
}

impl StepContext {
    /// Whether a failure of this attempt ends the step for good: a handler
    /// that must leave its entity in a true state records the failure then.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// Whether a transaction of the handler's already recorded the step done.
    pub fn recorded(&self) -> bool {
        self.recorded.load(Ordering::Acquire)
    }

    /// Has `writes` committed in the transaction that records this step
    /// done, should the handler succeed: a state change that follows from
    /// the step's success then costs no transaction of its own, and its
    /// caller (who answers from the outcome, before the recording) does not
    /// wait for it. The writes may run more than once (the recording is
    /// retried while the store is down) and not at all (the lease was lost,
    /// the process died): they must be idempotent, and nothing may depend on
    /// them but what the step's own retry would redo.
    /// Records this step done with `result` in `tx` (see
    /// [`Tx::complete_step`]): the handler's writes and the step's end
    /// commit together.
    pub async fn complete_in(&self, tx: &mut Tx, result: &serde_json::Value) -> Result<(), StoreError> {
        tx.complete_step(self.id, self.epoch, &self.recorded, result).await
    }

    pub fn complete_with(&self, writes: impl for<'t> Fn(&'t mut Tx) -> BoxFuture<'t, Result<(), StoreError>> + Send + Sync + 'static) {
        *self.completion_writes.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(writes));
    }
}

pub use crate::store::outbox::CompletionWriteFn;

#[derive(Clone, Default)]
pub(crate) struct CompletionWrites(Arc<Mutex<Option<CompletionWriteFn>>>);

impl CompletionWrites {
    pub(crate) fn take(&self) -> Option<CompletionWriteFn> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for CompletionWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().map(|w| w.is_some()).unwrap_or(false);
        f.debug_tuple("CompletionWrites").field(&if set { "set" } else { "none" }).finish()
    }
}

/// Why a handler gave up on this attempt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// Try again after a backoff (until attempts run out), or fail for good.
    pub retryable: bool,
    pub message: String,
}

impl StepError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self { retryable: true, message: message.into() }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self { retryable: false, message: message.into() }
    }
}

/// What a handler returns; the value is stored as the step's result.
pub type StepResult = Result<Value, StepError>;
