//! Exactly-once effects for workflow steps: epoch fencing and idempotency
//! keys on the calls that change something (see `Fence` in node.proto).
//!
//! Per entity (a container id) the node keeps the highest (step, epoch) pair
//! it has seen and the answers it gave to idempotency keys. A call with a
//! lower pair comes from a worker whose lease was taken over: refused with
//! `stale_epoch`. A call repeating a key that succeeded gets the stored answer
//! and does nothing. Calls of one entity are serialized, so two copies of a
//! step that race each other cannot both run the operation.
//!
//! Kept in memory: a restarted node kills the sandboxes an earlier run left
//! (HACKING.md), so answers about them must not outlive it; the control
//! plane's retry then builds the sandbox again on the new node process.
//! Failures are not stored: a failed operation leaves nothing behind, so
//! running it again is safe.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use agentd_proto::error::status;
use agentd_proto::node::Fence;
use tonic::{Code, Status};

/// Entities remembered at most; the oldest are forgotten first. An entity's
/// steps finish long before ten thousand others start.
const MAX_ENTITIES: usize = 10_000;
/// Answers remembered per entity at most (a long session prompts often).
const MAX_ANSWERS: usize = 256;

#[derive(Default)]
struct EntityFence {
    /// The highest (step, epoch) seen.
    highest: (i64, i64),
    /// Idempotency key -> the encoded first answer, oldest first.
    answers: VecDeque<(String, Vec<u8>)>,
}

#[derive(Default)]
pub struct Fences {
    entities: Mutex<Entities>,
}

#[derive(Default)]
struct Entities {
    by_id: HashMap<String, Arc<tokio::sync::Mutex<EntityFence>>>,
    /// Insertion order, for forgetting the oldest.
    order: VecDeque<String>,
}

impl Fences {
    fn entity(&self, id: &str) -> Arc<tokio::sync::Mutex<EntityFence>> {
        let mut entities = self.entities.lock().unwrap();
        if let Some(e) = entities.by_id.get(id) {
            return Arc::clone(e);
        }
        if entities.order.len() >= MAX_ENTITIES {
            if let Some(old) = entities.order.pop_front() {
                entities.by_id.remove(&old);
            }
        }
        entities.order.push_back(id.to_string());
        Arc::clone(entities.by_id.entry(id.to_string()).or_default())
    }

    /// Runs `op` for `entity` under `fence`: refused if the fence is stale,
    /// answered from memory if its key already succeeded, else run and its
    /// success remembered. Without a fence, just runs `op`.
    pub async fn run<T, F>(&self, entity: &str, fence: Option<&Fence>, op: F) -> Result<T, Status>
    where
        T: prost::Message + Default,
        F: Future<Output = Result<T, Status>>,
    {
        let Some(fence) = fence.filter(|f| !f.idempotency_key.is_empty()) else { return op.await };
        let entity_fence = self.entity(entity);
        let mut guard = entity_fence.lock().await;
        let token = (fence.step, fence.epoch);
        if token < guard.highest {
            let (step, epoch) = guard.highest;
            return Err(status(
                Code::FailedPrecondition,
                "stale_epoch",
                format!("{entity}: step {} epoch {} is older than step {step} epoch {epoch}, already seen", token.0, token.1),
            ));
        }
        guard.highest = token;
        if let Some((_, answer)) = guard.answers.iter().find(|(k, _)| *k == fence.idempotency_key) {
            tracing::info!(entity, key = fence.idempotency_key, epoch = fence.epoch, "repeated call answered with its first result");
            return T::decode(answer.as_slice()).map_err(|e| status(Code::Internal, "internal", format!("stored answer: {e}")));
        }
        let answer = op.await?;
        if guard.answers.len() >= MAX_ANSWERS {
            guard.answers.pop_front();
        }
        guard.answers.push_back((fence.idempotency_key.clone(), answer.encode_to_vec()));
        Ok(answer)
    }
}

/// Fault tests only (the `faults` feature, which test builds turn on and
/// release builds never have): `AGENTD_TEST_DELAY_ANSWER=<rpc>:<ms>` (e.g.
/// `create_sandbox:3000`) makes the first `rpc` operation take `ms` longer
/// (after its effect, before its answer), as a node that is slow to answer:
/// the control plane's call times out, the operation must still finish (the
/// node runs it on a task of its own), and the retry, waiting on the
/// entity's fence, must be answered from memory, not run again.
#[cfg(not(feature = "faults"))]
pub async fn test_delay_first_answer(_rpc: &str) {}

#[cfg(feature = "faults")]
pub async fn test_delay_first_answer(rpc: &str) {
    static DELAYED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let Ok(spec) = std::env::var("AGENTD_TEST_DELAY_ANSWER") else { return };
    let Some((name, ms)) = spec.split_once(':') else { return };
    let Ok(ms) = ms.parse::<u64>() else { return };
    if name != rpc || DELAYED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    tracing::warn!(rpc, ms, "answer delayed for a fault test (AGENTD_TEST_DELAY_ANSWER)");
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentd_proto::node::DeleteSandboxResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn fence(key: &str, step: i64, epoch: i64) -> Fence {
        Fence { idempotency_key: key.into(), step, epoch }
    }

    #[tokio::test]
    async fn repeated_keys_get_the_first_answer_and_stale_epochs_are_refused() {
        let fences = Fences::default();
        let runs = AtomicUsize::new(0);
        let runs = &runs;
        let op = |existed| async move {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(DeleteSandboxResponse { existed })
        };
        let first = fences.run("ctr_1", Some(&fence("k1", 7, 1)), op(true)).await.unwrap();
        // The same step again, re-claimed (epoch 2): the first answer, no second run.
        let again = fences.run("ctr_1", Some(&fence("k1", 7, 2)), op(false)).await.unwrap();
        assert_eq!((first.existed, again.existed, runs.load(Ordering::SeqCst)), (true, true, 1));
        // The worker that held epoch 1 comes back late with a new key: refused.
        let stale = fences.run("ctr_1", Some(&fence("k2", 7, 1)), op(false)).await.unwrap_err();
        assert_eq!(agentd_proto::error::code_of(&stale), Some("stale_epoch"));
        // A later step of the entity starts over at epoch 1: its row id is higher.
        fences.run("ctr_1", Some(&fence("k3", 8, 1)), op(false)).await.unwrap();
        // Other entities and unfenced calls are unaffected.
        fences.run("ctr_2", Some(&fence("k1", 1, 1)), op(false)).await.unwrap();
        fences.run("ctr_1", None, op(false)).await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn failures_are_not_remembered() {
        let fences = Fences::default();
        let failed: Result<DeleteSandboxResponse, _> =
            fences.run("ctr_1", Some(&fence("k", 1, 1)), async { Err(Status::unavailable("x")) }).await;
        assert!(failed.is_err());
        let ok = fences.run("ctr_1", Some(&fence("k", 1, 2)), async { Ok(DeleteSandboxResponse { existed: true }) }).await;
        assert!(ok.unwrap().existed);
    }
}
