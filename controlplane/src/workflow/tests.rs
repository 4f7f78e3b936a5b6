//! The outbox and the runner, every check written once as an async function
//! of a `&Store` and run against a fresh SQLite file and a fresh PostgreSQL
//! server, as `workflow::tests::sqlite::<check>` and `...::postgres::<check>`
//! (the pattern of `store::conformance`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::store::outbox::{Failed, NewStep, OutboxError, OutboxRow, step_state};
use crate::store::states::{Entity, container};
use crate::store::{Store, StoreError};

use crate::store::conformance::{postgres, sqlite};

backend_suite!(
    enqueue_claim_complete,
    enqueue_is_idempotent_by_key,
    transition_and_enqueue_is_atomic,
    claims_keep_entity_order,
    stale_epochs_are_fenced,
    failures_retry_with_backoff_then_fail,
    reaper_returns_expired_leases,
    pruning_deletes_old_finished_rows,
    runner_retries_until_max_attempts,
    runner_keeps_entity_order_and_runs_entities_in_parallel,
    two_runners_run_every_step_once,
    runner_is_woken_without_polling,
    runner_shutdown_releases_unfinished_steps,
    runner_survives_panics_and_unknown_kinds,
    inline_steps_are_leased_in_order_and_recorded,
    handler_transactions_record_their_step_done,
    completion_writes_commit_with_the_step_end,
);

const LONG: Duration = Duration::from_secs(60);

fn step<'a>(entity_id: &'a str, kind: &'a str, key: &'a str) -> NewStep<'a> {
    NewStep::new("test", entity_id, kind, key, json!({ "key": key }))
}

fn db_now_bound() -> i64 {
    crate::store::now_ms()
}

fn assert_stale<T: std::fmt::Debug>(result: Result<T, OutboxError>, id: i64, epoch: i64) {
    match result {
        Err(OutboxError::StaleLease { id: i, epoch: e }) => assert_eq!((i, e), (id, epoch)),
        other => panic!("expected a stale lease on {id}@{epoch}, got {other:?}"),
    }
}

/// Polls `check` until it holds or `timeout` passes.
async fn wait_for<F: AsyncFnMut() -> bool>(what: &str, timeout: Duration, mut check: F) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn step_row(store: &Store, key: &str) -> OutboxRow {
    store.get_step_by_key(key).await.unwrap().unwrap_or_else(|| panic!("no step {key}"))
}

fn keys(rows: &[OutboxRow]) -> Vec<&str> {
    rows.iter().map(|r| r.idempotency_key.as_str()).collect()
}

/// A runner config for tests: quick janitor, short polls.
fn config(owner: &str) -> RunnerConfig {
    let mut c = RunnerConfig {
        owner: owner.to_string(),
        workers: 8,
        lease: Duration::from_secs(30),
        poll_interval: Duration::from_millis(50),
        backoff: Backoff { base: Duration::from_millis(20), cap: Duration::from_millis(200) },
        drain_timeout: Duration::from_secs(5),
        ..RunnerConfig::default()
    };
    c.janitor.reap_interval = Duration::from_millis(100);
    c
}

fn store_url(pool: &sqlx::PgPool) -> String {
    let o = pool.connect_options();
    format!("postgres://postgres@{}:{}/{}", o.get_host(), o.get_port(), o.get_database().unwrap_or("postgres"))
}

/// When a handler ran, and which attempt it was.
type Call = (Instant, i64);

/// How often each idempotency key's handler ran.
#[derive(Clone, Default)]
struct Calls(Arc<Mutex<HashMap<String, Vec<Call>>>>);

impl Calls {
    fn record(&self, ctx: &StepContext) {
        self.0.lock().unwrap().entry(ctx.idempotency_key.clone()).or_default().push((Instant::now(), ctx.attempt));
    }
    fn of(&self, key: &str) -> Vec<Call> {
        self.0.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
    fn total(&self) -> usize {
        self.0.lock().unwrap().values().map(Vec::len).sum()
    }
}

fn spawn_runner(store: &Store, registry: Registry, config: RunnerConfig) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(Runner::new(store.clone(), registry, config).run(shutdown.clone()));
    (shutdown, handle)
}

async fn stop(runner: (CancellationToken, tokio::task::JoinHandle<()>)) {
    runner.0.cancel();
    tokio::time::timeout(Duration::from_secs(20), runner.1).await.expect("runner stops").unwrap();
}

async fn enqueue_claim_complete(store: &Store) {
    let before = db_now_bound();
    let row = store.enqueue(step("e1", "greet", "k1").max_attempts(3)).await.unwrap();
    assert_eq!((row.state.as_str(), row.attempts, row.lease_epoch, row.max_attempts), (step_state::PENDING, 0, 0, 3));
    assert_eq!((row.entity_kind.as_str(), row.entity_id.as_str(), row.kind.as_str()), ("test", "e1", "greet"));
    assert_eq!(row.payload, json!({ "key": "k1" }));
    assert!(row.created_at >= before - 1000 && row.available_at == row.created_at, "{row:?}");

    let claimed = store.claim("w1", 10, LONG).await.unwrap();
    assert_eq!(claimed.len(), 1);
    let c = &claimed[0];
    assert_eq!((c.id, c.state.as_str(), c.lease_owner.as_deref()), (row.id, step_state::LEASED, Some("w1")));
    assert_eq!((c.lease_epoch, c.attempts), (1, 1));
    let expires = c.lease_expires_at.unwrap();
    assert!(expires >= c.created_at + LONG.as_millis() as i64 - 1000, "lease expires {expires}");
    assert!(store.claim("w2", 10, LONG).await.unwrap().is_empty(), "a leased row is not claimed twice");

    store.complete(c.id, c.lease_epoch, &json!({ "ok": true })).await.unwrap();
    let done = store.get_step(c.id).await.unwrap().unwrap();
    assert_eq!((done.state.as_str(), done.result), (step_state::DONE, Some(json!({ "ok": true }))));
    assert!(done.completed_at.unwrap() >= done.created_at);
    assert_eq!(done.lease_expires_at, None);
    assert_stale(store.complete(c.id, c.lease_epoch, &json!(null)).await, c.id, c.lease_epoch);
    assert!(store.claim("w1", 10, LONG).await.unwrap().is_empty(), "a done row is not claimed");
    assert_eq!(store.count_steps(step_state::DONE).await.unwrap(), 1);

    // Delayed steps wait.
    let delayed = store.enqueue(step("e2", "greet", "k2").delay(Duration::from_millis(300))).await.unwrap();
    assert!(delayed.available_at >= delayed.created_at + 300);
    assert!(store.claim("w1", 10, LONG).await.unwrap().is_empty(), "not due yet");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(keys(&store.claim("w1", 10, LONG).await.unwrap()), ["k2"]);
}

async fn enqueue_is_idempotent_by_key(store: &Store) {
    let first = store.enqueue(step("e1", "greet", "same")).await.unwrap();
    let mut other = step("e9", "other", "same");
    other.payload = json!("different");
    let again = store.enqueue(other).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!((again.entity_id.as_str(), again.kind.as_str(), again.payload.clone()), ("e1", "greet", json!({ "key": "same" })));
    assert_eq!(store.count_steps(step_state::PENDING).await.unwrap(), 1);

    // Also once done: the existing row comes back unchanged, nothing re-runs.
    let c = store.claim("w", 1, LONG).await.unwrap().remove(0);
    store.complete(c.id, c.lease_epoch, &json!(1)).await.unwrap();
    let again = store.enqueue(step("e1", "greet", "same")).await.unwrap();
    assert_eq!((again.id, again.state.as_str()), (first.id, step_state::DONE));
    assert!(store.claim("w", 1, LONG).await.unwrap().is_empty());

    // Concurrent enqueues of one key: one row, every caller gets it.
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.enqueue(step("e2", "greet", "raced")).await.unwrap().id })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(store.steps_of_entity("test", "e2").await.unwrap().len(), 1);
}

async fn transition_and_enqueue_is_atomic(store: &Store) {
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    let ready = NewStep::new("container", "ctr_1", "announce", "ctr_1/ready", json!({}));
    let row = store.transition_and_enqueue(Entity::Container, "ctr_1", container::READY, "sandbox up", ready.clone()).await.unwrap();
    assert_eq!(store.get_container("ctr_1").await.unwrap().state, container::READY);
    assert_eq!((row.kind.as_str(), row.state.as_str()), ("announce", step_state::PENDING));
    let history = store.transitions_of("container", "ctr_1").await.unwrap();
    assert_eq!(history.len(), 1);
    let h = &history[0];
    assert_eq!((h.from_state.as_str(), h.to_state.as_str(), h.reason.as_deref()), (container::PROVISIONING, container::READY, Some("sandbox up")));

    // A repeat is harmless: no second history row, the same step.
    let again = store.transition_and_enqueue(Entity::Container, "ctr_1", container::READY, "again", ready).await.unwrap();
    assert_eq!(again.id, row.id);
    assert_eq!(store.transitions_of("container", "ctr_1").await.unwrap().len(), 1);

    // An illegal transition writes nothing, the step included.
    store.container_deleted("ctr_1").await.unwrap();
    let revive = NewStep::new("container", "ctr_1", "announce", "ctr_1/revive", json!({}));
    match store.transition_and_enqueue(Entity::Container, "ctr_1", container::READY, "revive", revive).await {
        Err(StoreError::Illegal(e)) => assert_eq!(e.current, container::DELETED),
        other => panic!("expected an illegal transition, got {other:?}"),
    }
    assert!(store.get_step_by_key("ctr_1/revive").await.unwrap().is_none());
    let missing = NewStep::new("container", "ctr_x", "announce", "ctr_x", json!({}));
    let result = store.transition_and_enqueue(Entity::Container, "ctr_x", container::READY, "?", missing).await;
    assert!(matches!(result, Err(StoreError::NotFound { .. })), "{result:?}");
    assert!(store.get_step_by_key("ctr_x").await.unwrap().is_none());

    // A closure transaction: an error after both writes rolls both back...
    store.insert_container("ctr_2", "local", "{}").await.unwrap();
    let result: Result<(), StoreError> = store
        .transaction(async |tx| {
            tx.transition(Entity::Container, "ctr_2", container::READY, None, "tx").await?;
            tx.enqueue(NewStep::new("container", "ctr_2", "announce", "ctr_2/a", json!({}))).await?;
            Err(StoreError::NotFound { entity: Entity::Session, id: "ses_x".into() })
        })
        .await;
    assert!(result.is_err());
    assert_eq!(store.get_container("ctr_2").await.unwrap().state, container::PROVISIONING);
    assert!(store.get_step_by_key("ctr_2/a").await.unwrap().is_none());
    assert!(store.transitions_of("container", "ctr_2").await.unwrap().is_empty());
    // ... and success commits both, with several steps at once.
    let ids = store
        .transaction(async |tx| -> Result<Vec<i64>, StoreError> {
            tx.transition(Entity::Container, "ctr_2", container::READY, None, "tx").await?;
            let a = tx.enqueue(NewStep::new("container", "ctr_2", "announce", "ctr_2/a", json!({}))).await?;
            let b = tx.enqueue(NewStep::new("container", "ctr_2", "announce", "ctr_2/b", json!({}))).await?;
            Ok(vec![a.id, b.id])
        })
        .await
        .unwrap();
    assert!(ids[0] < ids[1]);
    assert_eq!(store.get_container("ctr_2").await.unwrap().state, container::READY);
    assert_eq!(store.steps_of_entity("container", "ctr_2").await.unwrap().len(), 2);

    // Dropping an explicit transaction rolls back.
    let mut tx = store.begin().await.unwrap();
    tx.enqueue(NewStep::new("container", "ctr_2", "announce", "ctr_2/dropped", json!({}))).await.unwrap();
    drop(tx);
    assert!(store.get_step_by_key("ctr_2/dropped").await.unwrap().is_none());
}

async fn claims_keep_entity_order(store: &Store) {
    for key in ["a1", "a2", "a3"] {
        store.enqueue(step("A", "s", key)).await.unwrap();
    }
    store.enqueue(step("B", "s", "b1")).await.unwrap();
    // One per entity, different entities together.
    let first = store.claim("w", 10, LONG).await.unwrap();
    assert_eq!(keys(&first), ["a1", "b1"]);
    assert!(store.claim("w", 10, LONG).await.unwrap().is_empty(), "a2 waits behind leased a1");
    store.complete(first[0].id, first[0].lease_epoch, &json!(null)).await.unwrap();
    let second = store.claim("w", 10, LONG).await.unwrap();
    assert_eq!(keys(&second), ["a2"]);
    // A step waiting out its backoff still holds its entity's later steps back.
    let failed = store.fail(second[0].id, second[0].lease_epoch, "flaky", Some(Duration::from_secs(3600))).await.unwrap();
    assert!(matches!(failed, Failed::Retry { .. }), "{failed:?}");
    assert!(store.claim("w", 10, LONG).await.unwrap().is_empty(), "a3 waits behind pending a2");
    // A step that failed for good does not block its entity for ever.
    let mut tx = store.begin().await.unwrap();
    tx.enqueue(step("C", "s", "c1").max_attempts(1)).await.unwrap();
    tx.enqueue(step("C", "s", "c2")).await.unwrap();
    tx.commit().await.unwrap();
    let c1 = store.claim("w", 10, LONG).await.unwrap().remove(0);
    assert_eq!(c1.idempotency_key, "c1");
    assert_eq!(store.fail(c1.id, c1.lease_epoch, "broken", Some(Duration::ZERO)).await.unwrap(), Failed::Final);
    assert_eq!(keys(&store.claim("w", 10, LONG).await.unwrap()), ["c2"]);

    // Many claimers at once never lease two steps of one entity.
    for e in 0..20 {
        for n in 0..5 {
            store.enqueue(step(&format!("E{e}"), "s", &format!("E{e}/{n}"))).await.unwrap();
        }
    }
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move { store.claim(&format!("w{w}"), 5, LONG).await.unwrap() })
        })
        .collect();
    let mut leased = Vec::new();
    for t in tasks {
        leased.extend(t.await.unwrap());
    }
    let mut entities: Vec<&str> = leased.iter().filter(|r| r.entity_id.starts_with('E')).map(|r| r.entity_id.as_str()).collect();
    let claimed = entities.len();
    entities.sort();
    entities.dedup();
    assert_eq!(entities.len(), claimed, "two steps of one entity leased together");
    assert_eq!(claimed, 20, "every entity's first step is claimable");
    assert!(leased.iter().filter(|r| r.entity_id.starts_with('E')).all(|r| r.idempotency_key.ends_with("/0")));
}

async fn stale_epochs_are_fenced(store: &Store) {
    let row = store.enqueue(step("e1", "s", "k")).await.unwrap();
    let old = store.claim("old", 1, Duration::from_millis(50)).await.unwrap().remove(0);
    assert_eq!(old.lease_epoch, 1);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.reap_expired_leases().await.unwrap(), 1);
    let new = store.claim("new", 1, LONG).await.unwrap().remove(0);
    assert_eq!((new.id, new.lease_epoch, new.attempts), (row.id, 2, 2));
    // The old worker wakes up: every fenced write is refused.
    assert_stale(store.complete(row.id, 1, &json!("late")).await, row.id, 1);
    assert_stale(store.fail(row.id, 1, "late", None).await, row.id, 1);
    assert_stale(store.extend_lease(row.id, 1, LONG).await, row.id, 1);
    assert_stale(store.release(row.id, 1, "late").await, row.id, 1);
    let r = store.get_step(row.id).await.unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.lease_owner.as_deref(), r.lease_epoch), (step_state::LEASED, Some("new"), 2));
    // The current holder is not.
    store.extend_lease(row.id, 2, LONG).await.unwrap();
    store.complete(row.id, 2, &json!("fresh")).await.unwrap();
    assert_eq!(store.get_step(row.id).await.unwrap().unwrap().result, Some(json!("fresh")));
    // Unknown rows and epochs from the future are stale too.
    assert_stale(store.complete(9_999, 1, &json!(null)).await, 9_999, 1);
    assert_stale(store.complete(row.id, 3, &json!(null)).await, row.id, 3);
}

async fn failures_retry_with_backoff_then_fail(store: &Store) {
    let row = store.enqueue(step("e1", "s", "k").max_attempts(3)).await.unwrap();
    for attempt in 1..=3 {
        let c = store.claim("w", 1, LONG).await.unwrap();
        assert_eq!(c.len(), 1, "attempt {attempt}");
        assert_eq!((c[0].attempts, c[0].lease_epoch), (attempt, attempt));
        let before = db_now_bound();
        let failed = store.fail(row.id, attempt, &format!("boom {attempt}"), Some(Duration::from_millis(200))).await.unwrap();
        if attempt < 3 {
            let Failed::Retry { available_at } = failed else { panic!("attempt {attempt}: {failed:?}") };
            assert!(available_at >= before + 150, "backoff respected: {available_at} vs {before}");
            assert!(store.claim("w", 1, LONG).await.unwrap().is_empty(), "not due during backoff");
            let r = store.get_step(row.id).await.unwrap().unwrap();
            assert_eq!((r.state.as_str(), r.last_error.clone(), r.completed_at), (step_state::PENDING, Some(format!("boom {attempt}")), None));
            tokio::time::sleep(Duration::from_millis(250)).await;
        } else {
            assert_eq!(failed, Failed::Final);
        }
    }
    let r = store.get_step(row.id).await.unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.attempts, r.last_error.as_deref()), (step_state::FAILED, 3, Some("boom 3")));
    assert!(r.completed_at.is_some());
    assert!(store.claim("w", 1, LONG).await.unwrap().is_empty());

    // A permanent error fails at once, attempts left or not.
    let p = store.enqueue(step("e2", "s", "p")).await.unwrap();
    let c = store.claim("w", 1, LONG).await.unwrap().remove(0);
    assert_eq!(store.fail(p.id, c.lease_epoch, "bad request", None).await.unwrap(), Failed::Final);
    let r = store.get_step(p.id).await.unwrap().unwrap();
    assert_eq!((r.state.as_str(), r.attempts, r.last_error.as_deref()), (step_state::FAILED, 1, Some("bad request")));
}

async fn reaper_returns_expired_leases(store: &Store) {
    let a = store.enqueue(step("e1", "s", "a")).await.unwrap();
    let b = store.enqueue(step("e2", "s", "b").max_attempts(1)).await.unwrap();
    let c = store.enqueue(step("e3", "s", "c")).await.unwrap();
    let short = store.claim("crashed", 2, Duration::from_millis(100)).await.unwrap();
    assert_eq!(keys(&short), ["a", "b"]);
    let long = store.claim("alive", 1, LONG).await.unwrap();
    assert_eq!(keys(&long), ["c"]);
    assert_eq!(store.reap_expired_leases().await.unwrap(), 0, "nothing expired yet");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(store.reap_expired_leases().await.unwrap(), 2);
    let ra = store.get_step(a.id).await.unwrap().unwrap();
    assert_eq!((ra.state.as_str(), ra.last_error.as_deref()), (step_state::PENDING, Some("lease of crashed expired")));
    assert_eq!(ra.lease_expires_at, None);
    // Out of attempts: failed, not retried.
    let rb = store.get_step(b.id).await.unwrap().unwrap();
    assert_eq!((rb.state.as_str(), rb.last_error.as_deref()), (step_state::FAILED, Some("lease of crashed expired")));
    assert_eq!(store.get_step(c.id).await.unwrap().unwrap().state, step_state::LEASED, "a live lease stays");
    assert_eq!(keys(&store.claim("next", 5, LONG).await.unwrap()), ["a"]);
    assert_eq!(store.reap_expired_leases().await.unwrap(), 0);
}

async fn pruning_deletes_old_finished_rows(store: &Store) {
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    store
        .transition_and_enqueue(Entity::Container, "ctr_1", container::READY, "up", step("e0", "s", "t"))
        .await
        .unwrap();
    for key in ["d1", "d2", "f1", "p1"] {
        store.enqueue(step(key, "s", key).max_attempts(1)).await.unwrap();
    }
    for c in store.claim("w", 10, LONG).await.unwrap() {
        match c.idempotency_key.as_str() {
            "f1" => drop(store.fail(c.id, c.lease_epoch, "x", None).await.unwrap()),
            "p1" => store.release(c.id, c.lease_epoch, "later").await.unwrap(),
            _ => store.complete(c.id, c.lease_epoch, &json!(null)).await.unwrap(),
        }
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(store.prune_outbox(Duration::from_secs(3600), Duration::from_secs(3600)).await.unwrap(), (0, 0), "nothing old enough");
    assert_eq!(store.prune_outbox(Duration::from_millis(5), Duration::from_secs(3600)).await.unwrap(), (3, 0));
    for (key, kept) in [("t", false), ("d1", false), ("d2", false), ("f1", true), ("p1", true)] {
        assert_eq!(store.get_step_by_key(key).await.unwrap().is_some(), kept, "{key}");
    }
    assert_eq!(store.prune_outbox(Duration::from_millis(5), Duration::from_millis(5)).await.unwrap(), (0, 1));
    assert!(store.transitions_of("container", "ctr_1").await.unwrap().is_empty());
    // A pruned key is free again: ids are never reused, so stale epochs stay stale.
    let again = store.enqueue(step("d1", "s", "d1")).await.unwrap();
    assert_eq!(again.state, step_state::PENDING);
}

async fn runner_retries_until_max_attempts(store: &Store) {
    let calls = Calls::default();
    let mut registry = Registry::new();
    let c = calls.clone();
    registry.register("flaky", move |ctx: StepContext| {
        let c = c.clone();
        async move {
            c.record(&ctx);
            if ctx.payload["succeed_on"].as_i64() == Some(ctx.attempt) {
                Ok(json!({ "attempt": ctx.attempt }))
            } else {
                Err(StepError::retryable(format!("attempt {} failed", ctx.attempt)))
            }
        }
    });
    let runner = spawn_runner(store, registry, config("r1"));
    let hopeless = NewStep::new("test", "e1", "flaky", "hopeless", json!({})).max_attempts(4);
    let recovers = NewStep::new("test", "e2", "flaky", "recovers", json!({ "succeed_on": 3 })).max_attempts(4);
    store.enqueue(hopeless).await.unwrap();
    store.enqueue(recovers).await.unwrap();
    wait_for("both steps to finish", Duration::from_secs(20), async || {
        store.count_steps(step_state::FAILED).await.unwrap() + store.count_steps(step_state::DONE).await.unwrap() == 2
    })
    .await;
    stop(runner).await;

    let r = step_row(store, "hopeless").await;
    assert_eq!((r.state.as_str(), r.attempts, r.last_error.as_deref()), (step_state::FAILED, 4, Some("attempt 4 failed")));
    let runs = calls.of("hopeless");
    assert_eq!(runs.iter().map(|r| r.1).collect::<Vec<_>>(), [1, 2, 3, 4]);
    // Equal jitter: each wait is at least half its exponential ceiling (20, 40, 80 ms).
    for (n, pair) in runs.windows(2).enumerate() {
        let gap = pair[1].0 - pair[0].0;
        let floor = Duration::from_millis(10 << n);
        assert!(gap >= floor, "wait after attempt {} was {gap:?}, under {floor:?}", n + 1);
    }
    let r = step_row(store, "recovers").await;
    assert_eq!((r.state.as_str(), r.attempts, r.result.clone()), (step_state::DONE, 3, Some(json!({ "attempt": 3 }))));
    assert_eq!(r.last_error.as_deref(), Some("attempt 2 failed"), "the last failure stays on record");

    // A permanent error is not retried.
    let calls = Calls::default();
    let mut registry = Registry::new();
    let c = calls.clone();
    registry.register("bad", move |ctx: StepContext| {
        let c = c.clone();
        async move {
            c.record(&ctx);
            Err(StepError::permanent("invalid"))
        }
    });
    let runner = spawn_runner(store, registry, config("r2"));
    store.enqueue(NewStep::new("test", "e3", "bad", "bad", json!({}))).await.unwrap();
    wait_for("the step to fail", Duration::from_secs(10), async || step_row(store, "bad").await.state == step_state::FAILED).await;
    stop(runner).await;
    assert_eq!(calls.of("bad").len(), 1);
}

async fn runner_keeps_entity_order_and_runs_entities_in_parallel(store: &Store) {
    const ENTITIES: usize = 12;
    const STEPS: usize = 6;
    let running: Arc<Mutex<HashMap<String, bool>>> = Default::default();
    let order: Arc<Mutex<HashMap<String, Vec<i64>>>> = Default::default();
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut registry = Registry::new();
    {
        let (running, order, now, peak) = (running.clone(), order.clone(), now.clone(), peak.clone());
        registry.register("ordered", move |ctx: StepContext| {
            let (running, order, now, peak) = (running.clone(), order.clone(), now.clone(), peak.clone());
            async move {
                // Recorded, not asserted here: a panicking handler is only retried.
                if running.lock().unwrap().insert(ctx.entity_id.clone(), true).unwrap_or(false) {
                    order.lock().unwrap().entry("overlaps".into()).or_default().push(ctx.id);
                }
                peak.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                order.lock().unwrap().entry(ctx.entity_id.clone()).or_default().push(ctx.payload["n"].as_i64().unwrap());
                now.fetch_sub(1, Ordering::SeqCst);
                running.lock().unwrap().insert(ctx.entity_id.clone(), false);
                Ok(json!(null))
            }
        });
    }
    let runner = spawn_runner(store, registry, config("r1"));
    // Enqueued interleaved, each entity's steps in one transaction.
    for e in 0..ENTITIES {
        let entity = format!("ent{e}");
        let mut tx = store.begin().await.unwrap();
        for n in 0..STEPS {
            let key = format!("{entity}/{n}");
            tx.enqueue(NewStep::new("test", &entity, "ordered", &key, json!({ "n": n }))).await.unwrap();
        }
        tx.commit().await.unwrap();
    }
    wait_for("every step to finish", Duration::from_secs(30), async || {
        store.count_steps(step_state::DONE).await.unwrap() == (ENTITIES * STEPS) as i64
    })
    .await;
    stop(runner).await;
    let order = order.lock().unwrap();
    assert_eq!(order.get("overlaps"), None, "steps of one entity ran together");
    for e in 0..ENTITIES {
        assert_eq!(order[&format!("ent{e}")], (0..STEPS as i64).collect::<Vec<_>>(), "ent{e} ran out of order");
    }
    let peak = peak.load(Ordering::SeqCst);
    assert!(peak > 1, "different entities ran in parallel (peak {peak})");
}

/// Two runners on one database share 500 steps: every step runs exactly once.
async fn two_runners_run_every_step_once(store: &Store) {
    const STEPS: usize = 500;
    let calls = Calls::default();
    let registry = |calls: Calls| {
        let mut registry = Registry::new();
        registry.register("count", move |ctx: StepContext| {
            let calls = calls.clone();
            async move {
                calls.record(&ctx);
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(json!(null))
            }
        });
        registry
    };
    let a = spawn_runner(store, registry(calls.clone()), config("runner-a"));
    let b = spawn_runner(store, registry(calls.clone()), config("runner-b"));
    // 100 entities of 5 steps, enqueued while both run.
    for i in 0..STEPS {
        let (entity, key) = (format!("ent{}", i % 100), format!("step{i}"));
        store.enqueue(NewStep::new("test", &entity, "count", &key, json!({}))).await.unwrap();
    }
    wait_for("500 steps done", Duration::from_secs(60), async || store.count_steps(step_state::DONE).await.unwrap() == STEPS as i64)
        .await;
    stop(a).await;
    stop(b).await;
    assert_eq!(calls.total(), STEPS, "handler invocations");
    for i in 0..STEPS {
        assert_eq!(calls.of(&format!("step{i}")).len(), 1, "step{i}");
        let r = step_row(store, &format!("step{i}")).await;
        assert_eq!((r.attempts, r.lease_epoch), (1, 1), "step{i} claimed once");
    }
    let mut owners: HashMap<String, usize> = HashMap::new();
    for i in 0..STEPS {
        *owners.entry(step_row(store, &format!("step{i}")).await.lease_owner.unwrap()).or_default() += 1;
    }
    // On SQLite both runners queue for this process's one writer, and which
    // claims first is down to task scheduling: one may take every step.
    if store.backend() == "postgres" {
        assert!(owners.len() == 2, "both runners took steps: {owners:?}");
    }
}

/// With polling all but off, an enqueue still reaches the runner at once:
/// in process through the watch channel and, on PostgreSQL, from another
/// connection through NOTIFY alone.
async fn runner_is_woken_without_polling(store: &Store) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut registry = Registry::new();
    registry.register("ping", move |ctx: StepContext| {
        let tx = tx.clone();
        async move {
            tx.send((ctx.idempotency_key, Instant::now())).unwrap();
            Ok(json!(null))
        }
    });
    let mut cfg = config("r1");
    cfg.poll_interval = Duration::from_secs(3600);
    let runner = spawn_runner(store, registry, cfg);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for n in 0..3 {
        let key = format!("ping{n}");
        let sent = Instant::now();
        store.enqueue(NewStep::new("test", "e", "ping", &key, json!({}))).await.unwrap();
        let (got, at) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("woken").unwrap();
        assert_eq!(got, key);
        assert!(at - sent < Duration::from_secs(2));
    }
    if let Some(pool) = store.pg_pool() {
        // This process's enqueues reach other control planes by NOTIFY, sent by the runner.
        let mut listener = sqlx::postgres::PgListener::connect(&store_url(&pool)).await.unwrap();
        listener.listen(crate::store::outbox::CHANNEL).await.unwrap();
        store.enqueue(NewStep::new("test", "e", "ping", "heard", json!({}))).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), listener.recv()).await.expect("NOTIFY forwarded").unwrap();
        assert_eq!(tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap().0, "heard");
        drop(listener);
        // Another control plane's enqueue: a raw insert and NOTIFY, no local wake-up.
        let mut tx = pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO outbox (entity_kind, entity_id, kind, payload, idempotency_key, state, max_attempts, available_at, created_at) \
             VALUES ('test', 'remote', 'ping', '{}', 'remote', 'pending', 1, 0, 0)",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query("NOTIFY agentd_outbox").execute(&mut *tx).await.unwrap();
        tx.commit().await.unwrap();
        let (got, _) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("woken by NOTIFY").unwrap();
        assert_eq!(got, "remote");
    }
    stop(runner).await;
}

async fn runner_shutdown_releases_unfinished_steps(store: &Store) {
    let started = Arc::new(tokio::sync::Notify::new());
    let mut registry = Registry::new();
    let s = started.clone();
    registry.register("quick", |_ctx: StepContext| async { Ok(json!("quick")) });
    registry.register("stuck", move |_ctx: StepContext| {
        let s = s.clone();
        async move {
            s.notify_one();
            std::future::pending::<()>().await;
            Ok(json!(null))
        }
    });
    let mut cfg = config("r1");
    cfg.drain_timeout = Duration::from_millis(200);
    let runner = spawn_runner(store, registry, cfg);
    store.enqueue(NewStep::new("test", "e1", "stuck", "stuck", json!({}))).await.unwrap();
    store.enqueue(NewStep::new("test", "e2", "quick", "quick", json!({}))).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), started.notified()).await.expect("stuck step started");
    wait_for("quick step done", Duration::from_secs(5), async || step_row(store, "quick").await.state == step_state::DONE).await;
    let t = Instant::now();
    stop(runner).await;
    assert!(t.elapsed() < Duration::from_secs(3), "drain bounded: {:?}", t.elapsed());
    let r = step_row(store, "stuck").await;
    assert_eq!((r.state.as_str(), r.attempts), (step_state::PENDING, 0), "released, the attempt not counted");
    assert_eq!(r.last_error.as_deref(), Some("runner shut down before the step finished"));
    assert_eq!(keys(&store.claim("next", 5, LONG).await.unwrap()), ["stuck"], "claimable again at once");
}

async fn runner_survives_panics_and_unknown_kinds(store: &Store) {
    let mut registry = Registry::new();
    registry.register("panics", |ctx: StepContext| async move {
        if ctx.attempt == 1 {
            panic!("handler bug");
        }
        Ok(json!("second time lucky"))
    });
    let runner = spawn_runner(store, registry, config("r1"));
    store.enqueue(NewStep::new("test", "e1", "panics", "panics", json!({}))).await.unwrap();
    store.enqueue(NewStep::new("test", "e2", "nobody", "nobody", json!({})).max_attempts(2)).await.unwrap();
    wait_for("both settled", Duration::from_secs(10), async || {
        step_row(store, "panics").await.state == step_state::DONE && step_row(store, "nobody").await.state == step_state::FAILED
    })
    .await;
    stop(runner).await;
    let p = step_row(store, "panics").await;
    assert_eq!((p.attempts, p.last_error.as_deref()), (2, Some("step handler panicked")));
    let n = step_row(store, "nobody").await;
    assert!(n.last_error.unwrap().contains("no handler"), "unknown kinds fail retryably");
    assert_eq!(n.attempts, 2);
}

/// A step its enqueuer runs itself: leased in the enqueuing transaction only
/// when its entity has nothing older open, run and recorded under that lease
/// (fenced, retried by runners on a failure that may pass), and the outcome
/// handed back before it is recorded.
async fn inline_steps_are_leased_in_order_and_recorded(store: &Store) {
    let inline = InlineConfig { owner: "api".into(), lease: LONG, backoff: Backoff { base: Duration::from_millis(20), cap: Duration::from_millis(50) } };
    let enqueue_and_claim = async |key: &str, entity: &str| {
        let mut tx = store.begin().await.unwrap();
        let row = tx.enqueue(step(entity, "s", key)).await.unwrap();
        let leased = tx.claim_enqueued(&row, &inline.owner, inline.lease).await.unwrap();
        tx.commit().await.unwrap();
        leased
    };
    // Leased at once, by the enqueuer, with the claim's epoch and attempt.
    let a1 = enqueue_and_claim("a1", "A").await.expect("nothing older: leased");
    assert_eq!((a1.state.as_str(), a1.lease_owner.as_deref(), a1.lease_epoch, a1.attempts), (step_state::LEASED, Some("api"), 1, 1));
    assert!(store.claim("w", 10, LONG).await.unwrap().is_empty(), "a runner does not claim it again");
    // Behind an open step of its entity it is left to the runners.
    assert!(enqueue_and_claim("a2", "A").await.is_none(), "a1 is still open");
    assert_eq!(step_row(store, "a2").await.state, step_state::PENDING);
    // A repeated key's existing row is not leased again.
    assert!(enqueue_and_claim("a1", "A").await.is_none());

    // Run here: the outcome comes back, the step is recorded done.
    let outcome = inline::run(store, &inline, a1, |ctx: StepContext| async move { Ok(json!({"ran": ctx.idempotency_key})) }).await;
    assert_eq!(outcome, Some(Ok(json!({"ran": "a1"}))));
    wait_for("a1 recorded done", Duration::from_secs(5), async || step_row(store, "a1").await.state == step_state::DONE).await;
    assert_eq!(step_row(store, "a1").await.result, Some(json!({"ran": "a1"})));
    // Its entity's next step is now a runner's.
    assert_eq!(keys(&store.claim("w", 10, LONG).await.unwrap()), ["a2"]);

    // A failure that may pass goes back to pending for the runners, with backoff.
    let b1 = enqueue_and_claim("b1", "B").await.unwrap();
    let outcome = inline::run(store, &inline, b1, |_| async { Err(StepError::retryable("node away")) }).await;
    assert_eq!(outcome, Some(Err(StepError::retryable("node away"))));
    wait_for("b1 back to pending", Duration::from_secs(5), async || step_row(store, "b1").await.state == step_state::PENDING).await;
    let b1 = step_row(store, "b1").await;
    assert_eq!((b1.attempts, b1.last_error.as_deref()), (1, Some("node away")));

    // Fenced like any lease: taken over (the process died, its owner's leases
    // were released and re-claimed), the late outcome is dropped.
    let c1 = enqueue_and_claim("c1", "C").await.unwrap();
    assert_eq!(store.release_leases_of("api").await.unwrap(), 1);
    let taken = store.claim("w", 10, LONG).await.unwrap();
    let taken = taken.iter().find(|r| r.idempotency_key == "c1").expect("c1 claimable again");
    assert_eq!(taken.lease_epoch, 2);
    let outcome = inline::run(store, &inline, c1, |_| async { Ok(json!("late")) }).await;
    assert_eq!(outcome, Some(Ok(json!("late"))), "the handler's outcome is handed back");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c1 = step_row(store, "c1").await;
    assert_eq!((c1.state.as_str(), c1.lease_epoch, c1.result), (step_state::LEASED, 2, None), "the stale outcome is not recorded");
}

fn context_of(row: &OutboxRow) -> StepContext {
    StepContext {
        id: row.id,
        epoch: row.lease_epoch,
        idempotency_key: row.idempotency_key.clone(),
        entity_kind: row.entity_kind.clone(),
        entity_id: row.entity_id.clone(),
        kind: row.kind.clone(),
        payload: row.payload.clone(),
        attempt: row.attempts,
        max_attempts: row.max_attempts,
        recorded: Default::default(),
        completion_writes: Default::default(),
    }
}

/// A handler that writes the store records its step done in the same
/// transaction: both commit or neither does, a stale lease rolls its writes
/// back, and the runner records nothing more.
async fn handler_transactions_record_their_step_done(store: &Store) {
    store.insert_container("c1", "n", "{}").await.unwrap();
    store.container_ready("c1", 7).await.unwrap();
    store.enqueue(step("c1", "s", "k1")).await.unwrap();
    let row = store.claim("w", 1, Duration::from_millis(50)).await.unwrap().remove(0);
    let ctx = context_of(&row);
    // Rolled back: neither the move nor the step's end.
    let mut tx = store.begin().await.unwrap();
    tx.transition(Entity::Container, "c1", container::HIBERNATED, None, "idle").await.unwrap();
    ctx.complete_in(&mut tx, &json!("first")).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(!ctx.recorded());
    assert_eq!(step_row(store, "k1").await.state, step_state::LEASED);
    assert_eq!(store.get_container("c1").await.unwrap().state, container::READY);
    // The lease expires and another worker takes the step: the first
    // worker's transaction is refused and leaves nothing.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.reap_expired_leases().await.unwrap(), 1);
    let fresh = store.claim("w2", 1, LONG).await.unwrap().remove(0);
    let stale = store
        .transaction(async |tx| {
            tx.transition(Entity::Container, "c1", container::HIBERNATED, None, "idle").await?;
            ctx.complete_in(tx, &json!("stale")).await
        })
        .await;
    assert!(matches!(stale, Err(StoreError::StaleLease { id, epoch: 1 }) if id == row.id), "{stale:?}");
    assert_eq!(store.get_container("c1").await.unwrap().state, container::READY);
    assert!(store.transitions_of("container", "c1").await.unwrap().iter().all(|t| t.to_state != container::HIBERNATED));
    // The current holder's commits both.
    let current = context_of(&fresh);
    store
        .transaction(async |tx| {
            tx.transition(Entity::Container, "c1", container::HIBERNATED, None, "idle").await?;
            current.complete_in(tx, &json!("done")).await
        })
        .await
        .unwrap();
    assert!(current.recorded());
    let done = step_row(store, "k1").await;
    assert_eq!((done.state.as_str(), done.result), (step_state::DONE, Some(json!("done"))));
    assert_eq!(store.get_container("c1").await.unwrap().state, container::HIBERNATED);

    // Through a runner: the handler's commit is the step's end; the runner
    // records nothing more.
    let mut registry = Registry::new();
    let s = store.clone();
    registry.register("move", move |ctx: StepContext| {
        let s = s.clone();
        async move {
            s.transaction(async |tx| {
                tx.transition(Entity::Container, "c1", container::READY, None, "resume").await?;
                ctx.complete_in(tx, &json!({"moved": true})).await
            })
            .await
            .map_err(|e| StepError::retryable(e.to_string()))?;
            Ok(json!("ignored: recorded by the transaction"))
        }
    });
    store.enqueue(step("c1", "move", "k2")).await.unwrap();
    let runner = spawn_runner(store, registry, config("w3"));
    wait_for("k2 done", Duration::from_secs(10), async || step_row(store, "k2").await.state == step_state::DONE).await;
    stop(runner).await;
    let k2 = step_row(store, "k2").await;
    assert_eq!((k2.result, k2.attempts), (Some(json!({"moved": true})), 1));
    assert_eq!(store.get_container("c1").await.unwrap().state, container::READY);
}

/// Writes a handler leaves to its step's completion commit with it: after a
/// success only, and never under a lease taken over.
async fn completion_writes_commit_with_the_step_end(store: &Store) {
    fn hibernate(ctx: &StepContext) {
        ctx.complete_with(|tx| Box::pin(async move { tx.transition(Entity::Container, "c1", container::HIBERNATED, None, "idle").await.map(|_| ()) }));
    }
    store.insert_container("c1", "n", "{}").await.unwrap();
    store.container_ready("c1", 7).await.unwrap();
    let mut registry = Registry::new();
    registry.register("fail", |ctx: StepContext| async move {
        hibernate(&ctx);
        Err(StepError::permanent("refused"))
    });
    registry.register("succeed", |ctx: StepContext| async move {
        hibernate(&ctx);
        Ok(json!("moved"))
    });
    store.enqueue(step("c1", "fail", "k1").max_attempts(1)).await.unwrap();
    store.enqueue(step("c1", "succeed", "k2")).await.unwrap();
    let runner = spawn_runner(store, registry, config("w"));
    wait_for("k2 done", Duration::from_secs(10), async || step_row(store, "k2").await.state == step_state::DONE).await;
    stop(runner).await;
    assert_eq!(step_row(store, "k1").await.state, step_state::FAILED);
    assert_eq!(step_row(store, "k2").await.result, Some(json!("moved")));
    let moves = store.transitions_of("container", "c1").await.unwrap();
    assert_eq!(moves.iter().filter(|t| t.to_state == container::HIBERNATED).count(), 1, "{moves:?}");
    assert_eq!(store.get_container("c1").await.unwrap().state, container::HIBERNATED);

    // A stale worker's writes roll back with its refused completion.
    store.container_resumed("c1").await.unwrap();
    store.enqueue(step("c1", "s", "k3")).await.unwrap();
    let row = store.claim("w1", 1, Duration::from_millis(50)).await.unwrap().remove(0);
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.reap_expired_leases().await.unwrap(), 1);
    store.claim("w2", 1, LONG).await.unwrap().remove(0);
    let stale = context_of(&row);
    hibernate(&stale);
    let writes = stale.completion_writes.take().expect("writes left");
    assert_stale(store.complete_with(row.id, row.lease_epoch, &json!("stale"), &writes).await, row.id, row.lease_epoch);
    assert_eq!(store.get_container("c1").await.unwrap().state, container::READY);
}
