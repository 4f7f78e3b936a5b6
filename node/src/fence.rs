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
//! The whole map is kept across the node's restarts, in `fences.bin`
//! (length-delimited [`FenceRecord`]s, appended as pairs and answers change,
//! rewritten whole at start and when it grows): with live restore a
//! sandbox outlives the node process, and so must what was answered about
//! it, so that a step retried after the restart is answered, not run
//! again, and a stale worker is still refused. Appends are not fsynced, as
//! the journal's: they must survive the daemon's crash, which keeps the
//! page cache; a host crash ends the sandboxes too. Answers about a sandbox
//! that did not come back (stopped at start, or lost) are dropped at start
//! ([`Fences::forget_answers_except`]): the control plane's retry must then
//! build it again; its pair is kept, still fencing stale workers.
//! Failures are not stored: a failed operation leaves nothing behind, so
//! running it again is safe.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agentd_proto::error::status;
use agentd_proto::node::Fence;
use prost::Message;
use tonic::{Code, Status};

/// Entities remembered at most; the oldest are forgotten first. An entity's
/// steps finish long before ten thousand others start.
const MAX_ENTITIES: usize = 10_000;
/// Answers remembered per entity at most (a long session prompts often).
const MAX_ANSWERS: usize = 256;
/// Records appended before the file is rewritten with only what is kept.
const COMPACT_AFTER: usize = 65_536;

/// One line of `fences.bin`: an entity's highest pair, and the answer to a
/// key if it has one.
#[derive(Clone, PartialEq, prost::Message)]
struct FenceRecord {
    #[prost(string, tag = "1")]
    entity: String,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(int64, tag = "3")]
    epoch: i64,
    /// Empty: the record only moves the pair.
    #[prost(string, tag = "4")]
    key: String,
    #[prost(bytes = "vec", tag = "5")]
    answer: Vec<u8>,
}

#[derive(Default)]
struct FenceState {
    /// The highest (step, epoch) seen.
    highest: (i64, i64),
    /// Idempotency key -> the encoded first answer, oldest first.
    answers: VecDeque<(String, Vec<u8>)>,
}

impl FenceState {
    fn remember(&mut self, key: String, answer: Vec<u8>) {
        if self.answers.len() >= MAX_ANSWERS {
            self.answers.pop_front();
        }
        self.answers.push_back((key, answer));
    }
}

#[derive(Default)]
struct EntityFence {
    /// Held across the operation: one call of the entity at a time.
    turn: tokio::sync::Mutex<()>,
    /// What is remembered; locked briefly, never across an await, so the
    /// file can be rewritten from it while an operation runs.
    state: Mutex<FenceState>,
}

#[derive(Default)]
pub struct Fences {
    entities: Mutex<Entities>,
    /// `None` in memory-only use (tests).
    file: Mutex<Option<FenceFile>>,
}

#[derive(Default)]
struct Entities {
    by_id: HashMap<String, Arc<EntityFence>>,
    /// Insertion order, for forgetting the oldest.
    order: VecDeque<String>,
}

struct FenceFile {
    path: PathBuf,
    file: File,
    appended: usize,
}

impl Entities {
    fn get_or_insert(&mut self, id: &str) -> Arc<EntityFence> {
        if let Some(e) = self.by_id.get(id) {
            return Arc::clone(e);
        }
        if self.order.len() >= MAX_ENTITIES
            && let Some(old) = self.order.pop_front()
        {
            self.by_id.remove(&old);
        }
        self.order.push_back(id.to_string());
        Arc::clone(self.by_id.entry(id.to_string()).or_default())
    }
}

impl Fences {
    /// The fences an earlier node process kept in `dir` (`keep`), or none
    /// (without live restore its sandboxes are stopped at start, and answers
    /// about them must not outlive them).
    pub fn open(dir: &Path, keep: bool) -> std::io::Result<Fences> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("fences.bin");
        let fences = Fences::default();
        if keep {
            let mut entities = fences.entities.lock().unwrap();
            for r in crate::state_file::read_delimited::<FenceRecord>(&path, "fences") {
                let entity = entities.get_or_insert(&r.entity);
                let mut state = entity.state.lock().unwrap();
                state.highest = state.highest.max((r.step, r.epoch));
                if !r.key.is_empty() {
                    state.remember(r.key, r.answer);
                }
            }
        }
        let file = fences.rewrite(&path)?;
        *fences.file.lock().unwrap() = Some(FenceFile { path, file, appended: 0 });
        Ok(fences)
    }

    /// Drops the answers about entities not in `live` (sandboxes that did not
    /// come back), keeping their pairs.
    pub fn forget_answers_except(&self, live: &HashSet<String>) {
        let entities = self.entities.lock().unwrap();
        let mut forgot = false;
        for (id, entity) in &entities.by_id {
            let mut state = entity.state.lock().unwrap();
            if !live.contains(id) && !state.answers.is_empty() {
                state.answers.clear();
                forgot = true;
            }
        }
        drop(entities);
        if !forgot {
            return;
        }
        let mut file = self.file.lock().unwrap();
        if let Some(f) = file.as_mut() {
            match self.rewrite(&f.path) {
                Ok(new) => *f = FenceFile { path: f.path.clone(), file: new, appended: 0 },
                Err(e) => tracing::error!(error = %e, "cannot rewrite the fences file"),
            }
        }
    }

    /// Writes everything kept to `path` whole (a temp file renamed over it)
    /// and returns it opened for appending.
    fn rewrite(&self, path: &Path) -> std::io::Result<File> {
        let mut buf = Vec::new();
        let entities = self.entities.lock().unwrap();
        for id in &entities.order {
            let Some(entity) = entities.by_id.get(id) else { continue };
            let state = entity.state.lock().unwrap();
            let (step, epoch) = state.highest;
            let record = |key: &str, answer: &[u8]| FenceRecord { entity: id.clone(), step, epoch, key: key.to_string(), answer: answer.to_vec() };
            record("", &[]).encode_length_delimited(&mut buf).expect("a Vec grows");
            for (key, answer) in &state.answers {
                record(key, answer).encode_length_delimited(&mut buf).expect("a Vec grows");
            }
        }
        drop(entities);
        crate::state_file::write_atomic(path, &buf)?;
        OpenOptions::new().append(true).open(path)
    }

    /// Appends `record`; rewrites the file once it has grown enough.
    fn persist(&self, record: FenceRecord) {
        let mut file = self.file.lock().unwrap();
        let Some(f) = file.as_mut() else { return };
        let mut buf = Vec::new();
        record.encode_length_delimited(&mut buf).expect("a Vec grows");
        if let Err(e) = f.file.write_all(&buf) {
            tracing::error!(error = %e, entity = record.entity, "cannot write the fences file: this answer lasts only as long as the node process");
        }
        f.appended += 1;
        if f.appended >= COMPACT_AFTER {
            match self.rewrite(&f.path) {
                Ok(new) => *f = FenceFile { path: f.path.clone(), file: new, appended: 0 },
                Err(e) => tracing::error!(error = %e, "cannot rewrite the fences file"),
            }
        }
    }

    fn entity(&self, id: &str) -> Arc<EntityFence> {
        self.entities.lock().unwrap().get_or_insert(id)
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
        let _turn = entity_fence.turn.lock().await;
        let token = (fence.step, fence.epoch);
        let stored = {
            let mut state = entity_fence.state.lock().unwrap();
            if token < state.highest {
                let (step, epoch) = state.highest;
                return Err(status(
                    Code::FailedPrecondition,
                    "stale_epoch",
                    format!("{entity}: step {} epoch {} is older than step {step} epoch {epoch}, already seen", token.0, token.1),
                ));
            }
            let moved = token > state.highest;
            state.highest = token;
            let stored = state.answers.iter().find(|(k, _)| *k == fence.idempotency_key).map(|(_, a)| a.clone());
            (moved, stored)
        };
        let record = |key: &str, answer: Vec<u8>| FenceRecord { entity: entity.to_string(), step: token.0, epoch: token.1, key: key.to_string(), answer };
        match stored {
            (moved, Some(answer)) => {
                if moved {
                    self.persist(record("", Vec::new()));
                }
                tracing::info!(entity, key = fence.idempotency_key, epoch = fence.epoch, "repeated call answered with its first result");
                T::decode(answer.as_slice()).map_err(|e| status(Code::Internal, "internal", format!("stored answer: {e}")))
            }
            (moved, None) => {
                if moved {
                    self.persist(record("", Vec::new()));
                }
                let answer = op.await?;
                let encoded = answer.encode_to_vec();
                entity_fence.state.lock().unwrap().remember(fence.idempotency_key.clone(), encoded.clone());
                self.persist(record(&fence.idempotency_key, encoded));
                Ok(answer)
            }
        }
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

    #[tokio::test]
    async fn answers_and_pairs_outlive_the_process_for_sandboxes_that_came_back() {
        let dir = tempfile::tempdir().unwrap();
        let fences = Fences::open(dir.path(), true).unwrap();
        let answer = |existed| async move { Ok(DeleteSandboxResponse { existed }) };
        fences.run("ctr_live", Some(&fence("k1", 5, 2)), answer(true)).await.unwrap();
        fences.run("ctr_gone", Some(&fence("k1", 9, 1)), answer(true)).await.unwrap();
        drop(fences);
        // A torn record at the end, as a crash mid-write leaves.
        let path = dir.path().join("fences.bin");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0x40, 0x0a]);
        std::fs::write(&path, &bytes).unwrap();

        let fences = Fences::open(dir.path(), true).unwrap();
        fences.forget_answers_except(&HashSet::from(["ctr_live".to_string()]));
        let again = fences.run("ctr_live", Some(&fence("k1", 5, 3)), answer(false)).await.unwrap();
        assert!(again.existed, "answered from before the restart");
        let stale = fences.run("ctr_live", Some(&fence("k9", 5, 1)), answer(false)).await.unwrap_err();
        assert_eq!(agentd_proto::error::code_of(&stale), Some("stale_epoch"));
        let rerun = fences.run("ctr_gone", Some(&fence("k1", 9, 2)), answer(false)).await.unwrap();
        assert!(!rerun.existed, "the sandbox did not come back: run again");
        let stale = fences.run("ctr_gone", Some(&fence("k2", 8, 1)), answer(false)).await.unwrap_err();
        assert_eq!(agentd_proto::error::code_of(&stale), Some("stale_epoch"), "its pair is kept");
        drop(fences);

        let fresh = Fences::open(dir.path(), false).unwrap();
        let fresh_answer = fresh.run("ctr_live", Some(&fence("k1", 1, 1)), answer(false)).await.unwrap();
        assert!(!fresh_answer.existed, "without live restore nothing is kept");
    }
}
