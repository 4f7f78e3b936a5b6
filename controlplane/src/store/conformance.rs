//! The store conformance suite: every check is written once, as an async
//! function of a `&Store`, and `suite!` runs each against a fresh SQLite file
//! and a fresh PostgreSQL server (`agentd_testkit::postgres::TempPostgres`),
//! as `store::conformance::sqlite::<check>` and `...::postgres::<check>`.
//!
//! Backend-specific behaviour (opening by URL, an unreachable server) is
//! tested at the end of this file.

use std::sync::Arc;
use std::time::Duration;

use agentd_testkit::postgres::TempPostgres;

use super::states::{container, run, session};
use super::*;

/// A migrated SQLite store in a temp dir, which goes with the dir.
pub(crate) async fn sqlite() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("agentd.db")).await.unwrap();
    (dir, store)
}

/// A migrated PostgreSQL store on a server of its own, which stops on drop.
pub(crate) async fn postgres() -> (TempPostgres, Store) {
    let pg = tokio::task::spawn_blocking(TempPostgres::start)
        .await
        .unwrap()
        .expect("start a throwaway PostgreSQL (initdb and postgres from /usr/lib/postgresql/*/bin)");
    let store = Store::open_postgres(&pg.url()).await.unwrap();
    (pg, store)
}

backend_suite!(
    inserts_and_reads,
    container_transitions,
    session_transitions,
    run_transitions,
    a_queued_run_goes_through_every_state_with_its_times,
    illegal_transition_names_the_current_state,
    repeated_transitions_are_harmless,
    missing_rows_are_not_found,
    one_running_run_per_session,
    concurrent_starts_of_a_turn_one_wins,
    run_completion_follows_the_stop_reason,
    listings_filter_and_order,
    registry_sync_replaces_the_whole_registry,
    a_failed_registry_sync_keeps_the_old_registry,
    audit_records_page_filter_and_prune,
    agent_instances_follow_their_state_machine,
    bundles_count_their_uses_per_node,
    idempotency_keys_are_stored_with_runs_and_sessions,
    racing_transitions_move_and_record_once,
);

fn new_session<'a>(id: &'a str, container_id: &'a str) -> NewSession<'a> {
    NewSession {
        id,
        container_id,
        agent_id: "echo",
        agent_version: "1.2.3",
        agent_instance_id: "agi_1",
        working_dir: "/workspace",
    }
}

/// A container and one session on it.
async fn seed(store: &Store, container_id: &str, session_id: &str) {
    store.insert_container(container_id, "local", "{}").await.unwrap();
    store.insert_session(new_session(session_id, container_id)).await.unwrap();
}

/// Asserts `result` is an illegal transition of `id` from `current` to `to`.
fn assert_illegal(result: Result<(), StoreError>, id: &str, current: &str, to: &str) {
    match result {
        Err(StoreError::Illegal(e)) => {
            assert_eq!((e.id.as_str(), e.current.as_str(), e.to.as_str()), (id, current, to), "{e}");
        }
        other => panic!("{id}: expected {current} -> {to} to be illegal, got {other:?}"),
    }
}

fn assert_not_found(result: Result<impl std::fmt::Debug, StoreError>, entity: Entity, id: &str) {
    match result {
        Err(StoreError::NotFound { entity: e, id: i }) => assert_eq!((e, i.as_str()), (entity, id)),
        other => panic!("expected {entity} {id} not to be found, got {other:?}"),
    }
}

async fn inserts_and_reads(store: &Store) {
    let before = now_ms();
    let profile = r#"{"memory":"512M","label":"ünïcødé"}"#;
    store.insert_container("ctr_1", "node-a", profile).await.unwrap();
    store.insert_session(new_session("ses_1", "ctr_1")).await.unwrap();
    let after = now_ms();

    let c = store.get_container("ctr_1").await.unwrap();
    assert_eq!((c.id.as_str(), c.node_id.as_str(), c.state.as_str()), ("ctr_1", "node-a", container::PROVISIONING));
    assert_eq!(c.profile_json, profile);
    assert_eq!((c.supervisor_pid, c.error), (None, None));
    assert!((before..=after).contains(&c.created_at), "created_at {} not in {before}..={after}", c.created_at);
    assert_eq!(c.updated_at, c.created_at);

    let s = store.get_session("ses_1").await.unwrap();
    assert_eq!((s.id.as_str(), s.container_id.as_str(), s.state.as_str()), ("ses_1", "ctr_1", session::CREATING));
    assert_eq!((s.agent_id.as_str(), s.agent_version.as_str(), s.agent_instance_id.as_str()), ("echo", "1.2.3", "agi_1"));
    assert_eq!((s.working_dir.as_str(), s.acp_session_id, s.error), ("/workspace", None, None));
    assert!((before..=after).contains(&s.created_at));
    assert_eq!(s.updated_at, s.created_at);

    store.container_ready("ctr_1", i32::MAX).await.unwrap();
    store.session_ready("ses_1", "acp-42").await.unwrap();
    let c = store.get_container("ctr_1").await.unwrap();
    assert_eq!((c.state.as_str(), c.supervisor_pid), (container::READY, Some(i64::from(i32::MAX))));
    assert!(c.updated_at >= c.created_at);
    let s = store.get_session("ses_1").await.unwrap();
    assert_eq!((s.state.as_str(), s.acp_session_id.as_deref()), (session::READY, Some("acp-42")));

    store.insert_run("run_1", "ses_1").await.unwrap();
    let runs = store.runs_of_session("ses_1").await.unwrap();
    assert_eq!(runs.len(), 1);
    let r = &runs[0];
    assert_eq!((r.id.as_str(), r.session_id.as_str(), r.state.as_str()), ("run_1", "ses_1", run::DISPATCHING));
    assert_eq!((r.stop_reason.as_deref(), r.error.as_deref(), r.completed_at), (None, None, None));
    assert!(r.created_at >= before);
}

/// Every (from, to) pair of container states: the legal ones move the row,
/// a repeat is a no-op, anything else is refused and leaves the row alone.
async fn container_transitions(store: &Store) {
    const LEGAL: &[(&str, &str)] = &[
        (container::PROVISIONING, container::READY),
        (container::HIBERNATED, container::READY),
        (container::READY, container::HIBERNATED),
        (container::PROVISIONING, container::FAILED),
        (container::READY, container::FAILED),
        (container::HIBERNATED, container::FAILED),
        (container::PROVISIONING, container::DELETED),
        (container::READY, container::DELETED),
        (container::HIBERNATED, container::DELETED),
        (container::FAILED, container::DELETED),
    ];
    /// One transition, straight from wherever the row is.
    async fn to(store: &Store, id: &str, state: &str) -> Result<(), StoreError> {
        match state {
            container::PROVISIONING => Ok(()),
            container::READY => store.container_ready(id, 7).await,
            container::HIBERNATED => store.container_hibernated(id).await,
            container::FAILED => store.container_failed(id, "boom").await,
            container::DELETED => store.container_deleted(id).await,
            _ => unreachable!("{state}"),
        }
    }
    /// A fresh row walked to `state` along legal moves.
    async fn reach(store: &Store, id: &str, state: &str) -> Result<(), StoreError> {
        if state == container::HIBERNATED {
            to(store, id, container::READY).await?;
        }
        to(store, id, state).await
    }
    let all = [container::PROVISIONING, container::READY, container::HIBERNATED, container::FAILED, container::DELETED];
    for from in all {
        for target in &all[1..] {
            let id = format!("ctr_{from}_{target}");
            store.insert_container(&id, "local", "{}").await.unwrap();
            reach(store, &id, from).await.unwrap();
            let result = to(store, &id, target).await;
            let state = store.get_container(&id).await.unwrap().state;
            if LEGAL.contains(&(from, target)) || from == *target {
                result.unwrap_or_else(|e| panic!("{from} -> {target}: {e}"));
                assert_eq!(state, *target);
            } else {
                assert_illegal(result, &id, from, target);
                assert_eq!(state, from);
            }
        }
    }
}

async fn session_transitions(store: &Store) {
    const LEGAL: &[(&str, &str)] = &[
        (session::CREATING, session::READY),
        (session::CREATING, session::FAILED),
        (session::READY, session::FAILED),
        (session::CREATING, session::CLOSED),
        (session::READY, session::CLOSED),
        (session::FAILED, session::CLOSED),
    ];
    async fn to(store: &Store, id: &str, state: &str) -> Result<(), StoreError> {
        match state {
            session::CREATING => Ok(()),
            session::READY => store.session_ready(id, "acp").await,
            session::FAILED => store.session_failed(id, "boom").await,
            session::CLOSED => store.session_closed(id).await,
            _ => unreachable!("{state}"),
        }
    }
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    let all = [session::CREATING, session::READY, session::FAILED, session::CLOSED];
    for from in all {
        for target in &all[1..] {
            let id = format!("ses_{from}_{target}");
            store.insert_session(new_session(&id, "ctr_1")).await.unwrap();
            to(store, &id, from).await.unwrap();
            let result = to(store, &id, target).await;
            let state = store.get_session(&id).await.unwrap().state;
            if LEGAL.contains(&(from, target)) || from == *target {
                result.unwrap_or_else(|e| panic!("{from} -> {target}: {e}"));
                assert_eq!(state, *target);
            } else {
                assert_illegal(result, &id, from, target);
                assert_eq!(state, from);
            }
        }
    }
}

/// A run born queued (its dispatch not leased with it), then dispatching,
/// streaming (`started_at`) and completed (`completed_at`), each move in the
/// history; no way back.
async fn a_queued_run_goes_through_every_state_with_its_times(store: &Store) {
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    store.insert_session(new_session("ses_1", "ctr_1")).await.unwrap();
    store
        .transaction(async |tx| tx.insert_run("run_1", "ses_1", run::QUEUED).await)
        .await
        .unwrap();
    let run_1 = async || store.get_run("run_1").await.unwrap();
    let queued = run_1().await;
    assert_eq!((queued.state.as_str(), queued.started_at, queued.completed_at), (run::QUEUED, None, None));
    assert_eq!(queued.updated_at, Some(queued.created_at));
    // Still the session's one active run.
    assert!(matches!(store.insert_run("run_2", "ses_1").await, Err(StoreError::RunActive { .. })));
    store.run_dispatching("run_1").await.unwrap();
    assert_eq!(run_1().await.started_at, None);
    store.run_streaming("run_1").await.unwrap();
    let streaming = run_1().await;
    assert_eq!((streaming.state.as_str(), streaming.completed_at), (run::STREAMING, None));
    let started = streaming.started_at.expect("started_at set by streaming");
    assert_illegal(store.run_dispatching("run_1").await, "run_1", run::STREAMING, run::DISPATCHING);
    store.run_completed("run_1", "end_turn").await.unwrap();
    let done = run_1().await;
    assert_eq!((done.state.as_str(), done.started_at), (run::COMPLETED, Some(started)));
    assert!(done.completed_at.is_some_and(|at| at >= started) && done.updated_at == done.completed_at, "{done:?}");
    let moves: Vec<_> = store.transitions_of("run", "run_1").await.unwrap().into_iter().map(|t| (t.from_state, t.to_state)).collect();
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(moves, [pair(run::QUEUED, run::DISPATCHING), pair(run::DISPATCHING, run::STREAMING), pair(run::STREAMING, run::COMPLETED)]);
}

async fn run_transitions(store: &Store) {
    async fn to(store: &Store, id: &str, state: &str) -> Result<(), StoreError> {
        match state {
            run::DISPATCHING => Ok(()),
            run::STREAMING => store.run_streaming(id).await,
            run::COMPLETED => store.run_completed(id, "end_turn").await,
            run::CANCELLED => store.run_completed(id, "cancelled").await,
            run::FAILED => store.run_failed(id, "boom").await,
            _ => unreachable!("{state}"),
        }
    }
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    let all = [run::DISPATCHING, run::STREAMING, run::COMPLETED, run::CANCELLED, run::FAILED];
    for from in all {
        for target in &all[1..] {
            // A session per case: each keeps its run running until driven on.
            let (session_id, id) = (format!("ses_{from}_{target}"), format!("run_{from}_{target}"));
            store.insert_session(new_session(&session_id, "ctr_1")).await.unwrap();
            store.insert_run(&id, &session_id).await.unwrap();
            to(store, &id, from).await.unwrap();
            let result = to(store, &id, target).await;
            let state = store.runs_of_session(&session_id).await.unwrap().remove(0).state;
            // Only an active run has a way out, and only forward.
            if run::ACTIVE.contains(&from) || from == *target {
                result.unwrap_or_else(|e| panic!("{from} -> {target}: {e}"));
                assert_eq!(state, *target);
            } else {
                assert_illegal(result, &id, from, target);
                assert_eq!(state, from);
            }
        }
    }
}

async fn illegal_transition_names_the_current_state(store: &Store) {
    seed(store, "ctr_1", "ses_1").await;
    store.container_deleted("ctr_1").await.unwrap();
    match store.container_ready("ctr_1", 42).await {
        Err(e @ StoreError::Illegal(_)) => {
            assert_eq!(e.to_string(), "container ctr_1 is deleted; it cannot become ready");
        }
        other => panic!("expected an illegal transition, got {other:?}"),
    }
    store.session_closed("ses_1").await.unwrap();
    let e = store.session_ready("ses_1", "acp").await.unwrap_err();
    assert_eq!(e.to_string(), "session ses_1 is closed; it cannot become ready");
}

/// A repeat succeeds and changes nothing: the first write's values stay.
async fn repeated_transitions_are_harmless(store: &Store) {
    seed(store, "ctr_1", "ses_1").await;
    store.container_ready("ctr_1", 42).await.unwrap();
    let first = store.get_container("ctr_1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(3)).await;
    store.container_ready("ctr_1", 43).await.unwrap();
    let again = store.get_container("ctr_1").await.unwrap();
    assert_eq!((again.supervisor_pid, again.updated_at), (Some(42), first.updated_at));

    store.container_failed("ctr_1", "first").await.unwrap();
    store.container_failed("ctr_1", "second").await.unwrap();
    assert_eq!(store.get_container("ctr_1").await.unwrap().error.as_deref(), Some("first"));
    store.container_deleted("ctr_1").await.unwrap();
    store.container_deleted("ctr_1").await.unwrap();
    let c = store.get_container("ctr_1").await.unwrap();
    assert_eq!((c.state.as_str(), c.error.as_deref()), (container::DELETED, Some("first")), "deleting keeps the error");

    store.session_ready("ses_1", "acp-1").await.unwrap();
    store.session_ready("ses_1", "acp-2").await.unwrap();
    assert_eq!(store.get_session("ses_1").await.unwrap().acp_session_id.as_deref(), Some("acp-1"));
    store.session_closed("ses_1").await.unwrap();
    store.session_closed("ses_1").await.unwrap();

    store.insert_run("run_1", "ses_1").await.unwrap();
    store.run_completed("run_1", "end_turn").await.unwrap();
    store.run_completed("run_1", "max_tokens").await.unwrap();
    let r = store.runs_of_session("ses_1").await.unwrap().remove(0);
    assert_eq!((r.state.as_str(), r.stop_reason.as_deref()), (run::COMPLETED, Some("end_turn")));
    store.insert_run("run_2", "ses_1").await.unwrap();
    store.run_failed("run_2", "node lost").await.unwrap();
    store.run_failed("run_2", "again").await.unwrap();
    assert_eq!(store.runs_of_session("ses_1").await.unwrap()[1].error.as_deref(), Some("node lost"));

    // Every move is in the history once, repeats are not; failures give their reason.
    let moves = async |kind: &str, id: &str| {
        let history = store.transitions_of(kind, id).await.unwrap();
        history.into_iter().map(|h| (h.from_state, h.to_state, h.reason.unwrap_or_default())).collect::<Vec<_>>()
    };
    let m = |from: &str, to: &str, reason: &str| (from.to_string(), to.to_string(), reason.to_string());
    assert_eq!(
        moves("container", "ctr_1").await,
        [m(container::PROVISIONING, container::READY, ""), m(container::READY, container::FAILED, "first"), m(container::FAILED, container::DELETED, "")]
    );
    assert_eq!(moves("session", "ses_1").await, [m(session::CREATING, session::READY, ""), m(session::READY, session::CLOSED, "")]);
    assert_eq!(moves("run", "run_1").await, [m(run::DISPATCHING, run::COMPLETED, "")]);
    assert_eq!(moves("run", "run_2").await, [m(run::DISPATCHING, run::FAILED, "node lost")]);
}

async fn missing_rows_are_not_found(store: &Store) {
    assert_not_found(store.get_container("ctr_x").await, Entity::Container, "ctr_x");
    assert_not_found(store.get_session("ses_x").await, Entity::Session, "ses_x");
    assert_not_found(store.container_ready("ctr_x", 1).await, Entity::Container, "ctr_x");
    assert_not_found(store.container_failed("ctr_x", "e").await, Entity::Container, "ctr_x");
    assert_not_found(store.container_deleted("ctr_x").await, Entity::Container, "ctr_x");
    assert_not_found(store.session_ready("ses_x", "acp").await, Entity::Session, "ses_x");
    assert_not_found(store.session_failed("ses_x", "e").await, Entity::Session, "ses_x");
    assert_not_found(store.session_closed("ses_x").await, Entity::Session, "ses_x");
    assert_not_found(store.run_completed("run_x", "end_turn").await, Entity::Run, "run_x");
    assert_not_found(store.run_completed("run_x", "cancelled").await, Entity::Run, "run_x");
    assert_not_found(store.run_failed("run_x", "e").await, Entity::Run, "run_x");
    // Rows that would hang off a missing parent: the parent is not found.
    assert_not_found(store.insert_session(new_session("ses_1", "ctr_x")).await, Entity::Container, "ctr_x");
    assert_not_found(store.insert_run("run_1", "ses_x").await, Entity::Session, "ses_x");
    assert!(store.list_sessions().await.unwrap().is_empty());
    assert!(store.sessions_of_container("ctr_x").await.unwrap().is_empty());
    assert!(store.runs_of_session("ses_x").await.unwrap().is_empty());
    assert!(store.running_runs_of_session("ses_x").await.unwrap().is_empty());
}

async fn one_running_run_per_session(store: &Store) {
    seed(store, "ctr_1", "ses_1").await;
    store.insert_session(new_session("ses_2", "ctr_1")).await.unwrap();
    store.insert_run("run_1", "ses_1").await.unwrap();
    match store.insert_run("run_2", "ses_1").await {
        Err(StoreError::RunActive { session_id }) => assert_eq!(session_id, "ses_1"),
        other => panic!("expected RunActive, got {other:?}"),
    }
    // Another session is not affected.
    store.insert_run("run_3", "ses_2").await.unwrap();
    store.run_completed("run_1", "cancelled").await.unwrap();
    store.insert_run("run_2", "ses_1").await.unwrap();
    assert!(matches!(store.run_failed("run_1", "late").await, Err(StoreError::Illegal(_))));
    let running: Vec<String> = store.running_runs_of_session("ses_1").await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(running, ["run_2"]);
}

/// Twenty writers move one container to the same state at once, then to
/// two different states at once: one move each time, one history row per
/// move, the losers told it is done already or illegal now.
async fn racing_transitions_move_and_record_once(store: &Store) {
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    store.container_ready("ctr_1", 1).await.unwrap();
    let race = async |targets: &[&'static str]| {
        let barrier = Arc::new(tokio::sync::Barrier::new(20));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let (store, barrier, to) = (store.clone(), barrier.clone(), targets[i % targets.len()]);
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.transaction(async |tx| tx.transition(Entity::Container, "ctr_1", to, None, "race").await).await
                })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        results
    };
    let results = race(&[container::HIBERNATED]).await;
    assert_eq!(results.iter().filter(|r| matches!(r, Ok(Some(_)))).count(), 1, "{results:?}");
    assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    // hibernated -> ready or -> failed: whichever wins, the other is refused or repeats.
    let results = race(&[container::READY, container::STOPPING]).await;
    let moved = results.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
    assert!((1..=2).contains(&moved), "ready then stopping may both move: {results:?}");
    let history = store.transitions_of("container", "ctr_1").await.unwrap();
    assert_eq!(history.len(), 2 + moved, "{history:?}");
    for pair in history.windows(2) {
        assert_eq!(pair[0].to_state, pair[1].from_state, "history chains: {history:?}");
    }
}

/// Keys of prompts are per session, keys of creates global; a key is
/// stored once, and a second holder is refused without writing anything.
async fn idempotency_keys_are_stored_with_runs_and_sessions(store: &Store) {
    seed(store, "ctr_1", "ses_1").await;
    store.insert_session(new_session("ses_2", "ctr_1")).await.unwrap();
    assert_eq!(store.run_by_idempotency_key("ses_1", "k").await.unwrap(), None);
    let start = async |run: &str, session: &str, key: &str, digest: &str| {
        store
            .transaction(async |tx| {
                tx.insert_run(run, session, run::DISPATCHING).await?;
                tx.set_run_idempotency_key(run, key, digest).await
            })
            .await
    };
    start("run_1", "ses_1", "k", "d1").await.unwrap();
    assert_eq!(store.run_by_idempotency_key("ses_1", "k").await.unwrap(), Some(("run_1".into(), Some("d1".into()))));
    // The same key on another session is another prompt.
    start("run_2", "ses_2", "k", "d2").await.unwrap();
    assert_eq!(store.run_by_idempotency_key("ses_2", "k").await.unwrap(), Some(("run_2".into(), Some("d2".into()))));
    // Reused on its session once the first run ended: refused, and the
    // transaction's run with it.
    store.run_completed("run_1", "end_turn").await.unwrap();
    match start("run_3", "ses_1", "k", "d3").await {
        Err(StoreError::KeyTaken { key }) => assert_eq!(key, "k"),
        other => panic!("expected KeyTaken, got {other:?}"),
    }
    assert_not_found(store.get_run("run_3").await, Entity::Run, "run_3");
    assert_eq!(store.run_by_idempotency_key("ses_1", "k").await.unwrap(), Some(("run_1".into(), Some("d1".into()))));
    // Runs without a key never collide.
    store.insert_run("run_4", "ses_1").await.unwrap();
    store.run_completed("run_4", "end_turn").await.unwrap();
    store.insert_run("run_5", "ses_1").await.unwrap();

    let keyed = async |session: &str, key: &str| store.transaction(async |tx| tx.set_session_idempotency_key(session, key, "dc").await).await;
    keyed("ses_1", "create-1").await.unwrap();
    assert_eq!(store.session_by_idempotency_key("create-1").await.unwrap(), Some(("ses_1".into(), Some("dc".into()))));
    assert!(matches!(keyed("ses_2", "create-1").await, Err(StoreError::KeyTaken { .. })), "create keys are global");
    assert_eq!(store.session_by_idempotency_key("create-2").await.unwrap(), None);
    assert_not_found(keyed("ses_9", "create-3").await, Entity::Session, "ses_9");
}

/// Twenty callers start a turn of the same session at once, three times over:
/// each time exactly one wins and the rest are told a run is active.
async fn concurrent_starts_of_a_turn_one_wins(store: &Store) {
    const CALLERS: usize = 20;
    seed(store, "ctr_1", "ses_1").await;
    for round in 0..3 {
        let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
        let tasks: Vec<_> = (0..CALLERS)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                let id = format!("run_{round}_{i:02}");
                tokio::spawn(async move {
                    barrier.wait().await;
                    store.insert_run(&id, "ses_1").await.map(|()| id)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(id) => winners.push(id),
                Err(StoreError::RunActive { session_id }) => assert_eq!(session_id, "ses_1"),
                Err(e) => panic!("round {round}: expected RunActive, got {e:?}"),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        let running: Vec<String> = store.running_runs_of_session("ses_1").await.unwrap().into_iter().map(|r| r.id).collect();
        assert_eq!(running, winners);
        assert_eq!(store.runs_of_session("ses_1").await.unwrap().len(), round + 1, "losers left no rows");
        store.run_completed(&winners[0], "end_turn").await.unwrap();
    }
}

async fn run_completion_follows_the_stop_reason(store: &Store) {
    seed(store, "ctr_1", "ses_1").await;
    let cases = [
        ("run_1", Ok("cancelled"), run::CANCELLED),
        ("run_2", Ok("end_turn"), run::COMPLETED),
        ("run_3", Ok("max_tokens"), run::COMPLETED),
        ("run_4", Err("supervisor gone"), run::FAILED),
    ];
    for (id, end, state) in cases {
        let before = now_ms();
        store.insert_run(id, "ses_1").await.unwrap();
        match end {
            Ok(stop_reason) => store.run_completed(id, stop_reason).await.unwrap(),
            Err(error) => store.run_failed(id, error).await.unwrap(),
        }
        assert!(store.running_runs_of_session("ses_1").await.unwrap().is_empty());
        let r = store.runs_of_session("ses_1").await.unwrap().into_iter().find(|r| r.id == id).unwrap();
        assert_eq!(r.state, state, "{id}");
        assert_eq!(r.stop_reason.as_deref(), end.ok(), "{id}");
        assert_eq!(r.error.as_deref(), end.err(), "{id}");
        let completed_at = r.completed_at.expect("completed_at set");
        assert!(completed_at >= before && completed_at >= r.created_at, "{id}");
    }
}

async fn listings_filter_and_order(store: &Store) {
    // Ids sort against insertion order, so only created_at can order them.
    let tick = || tokio::time::sleep(Duration::from_millis(3));
    store.insert_container("ctr_b", "local", "{}").await.unwrap();
    tick().await;
    store.insert_container("ctr_a", "local", "{}").await.unwrap();
    for (id, container_id) in [("ses_c", "ctr_b"), ("ses_b", "ctr_a"), ("ses_a", "ctr_b")] {
        tick().await;
        store.insert_session(new_session(id, container_id)).await.unwrap();
    }
    let ids = |rows: Vec<SessionRow>| rows.into_iter().map(|s| s.id).collect::<Vec<_>>();
    assert_eq!(ids(store.list_sessions().await.unwrap()), ["ses_a", "ses_b", "ses_c"], "newest first");
    assert_eq!(ids(store.sessions_of_container("ctr_b").await.unwrap()), ["ses_c", "ses_a"], "oldest first");
    assert_eq!(ids(store.sessions_of_container("ctr_a").await.unwrap()), ["ses_b"]);

    store.session_ready("ses_a", "acp-a").await.unwrap();
    store.session_ready("ses_c", "acp-c").await.unwrap();
    assert_eq!(ids(store.sessions_in_state(session::READY).await.unwrap()), ["ses_c", "ses_a"]);
    assert_eq!(ids(store.sessions_in_state(session::CREATING).await.unwrap()), ["ses_b"]);
    assert!(store.sessions_in_state(session::CLOSED).await.unwrap().is_empty());

    let cids = |rows: Vec<ContainerRow>| rows.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(cids(store.containers_in_state(container::PROVISIONING).await.unwrap()), ["ctr_b", "ctr_a"]);
    store.container_ready("ctr_a", 1).await.unwrap();
    assert_eq!(cids(store.containers_in_state(container::READY).await.unwrap()), ["ctr_a"]);
    assert_eq!(cids(store.containers_in_state(container::PROVISIONING).await.unwrap()), ["ctr_b"]);

    for id in ["run_z", "run_y", "run_x"] {
        tick().await;
        store.insert_run(id, "ses_a").await.unwrap();
        store.run_completed(id, "end_turn").await.unwrap();
    }
    let runs: Vec<String> = store.runs_of_session("ses_a").await.unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(runs, ["run_z", "run_y", "run_x"], "oldest first");
    assert!(store.runs_of_session("ses_b").await.unwrap().is_empty());
}

// Backend-specific behaviour.

/// Commits never checkpoint the SQLite WAL (that took milliseconds inside
/// whichever commit crossed 1000 pages); the store's own checkpoints keep
/// it from growing without bound.
#[tokio::test]
async fn sqlite_checkpoints_keep_the_wal_short_off_the_commit_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.db");
    let store = Store::open_sqlite(&path).await.unwrap();
    let wal = dir.path().join("agentd.db-wal");
    let wal_len = || std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    let super::Backend::Sqlite(pool) = &store.backend else { unreachable!("a SQLite store") };
    let autocheckpoint: i64 = sqlx::query_scalar("PRAGMA wal_autocheckpoint").fetch_one(pool).await.unwrap();
    assert_eq!(autocheckpoint, 0, "commits do not checkpoint");
    // Rounds of writes with pauses longer than the checkpoint interval: the
    // WAL is started over after each round's checkpoint.
    let mut longest = Vec::new();
    for round in 0..4 {
        for i in 0..300 {
            store.insert_container(&format!("ctr_{round}_{i}"), "local", &"x".repeat(2000)).await.unwrap();
        }
        longest.push(wal_len());
        tokio::time::sleep(super::checkpoint::EVERY * 3).await;
    }
    let first = longest[0];
    assert!(first > 0, "the WAL is in use");
    assert!(longest.iter().all(|&len| len <= first * 3 / 2), "the WAL grows round after round: {longest:?}");
    assert_eq!(store.containers_in_state(container::PROVISIONING).await.unwrap().len(), 1200);
    store.close().await;
}

#[tokio::test]
async fn open_picks_the_backend_by_location() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("by-path.db");
    let store = Store::open(path.to_str().unwrap()).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    store.close().await;
    // Reopening migrates nothing twice and keeps the data.
    for location in [format!("sqlite://{}", path.display()), format!("sqlite:{}", path.display())] {
        let store = Store::open(&location).await.unwrap();
        assert_eq!(store.backend(), "sqlite", "{location}");
        assert_eq!(store.get_container("ctr_1").await.unwrap().id, "ctr_1");
        store.close().await;
    }

    let pg = tokio::task::spawn_blocking(TempPostgres::start).await.unwrap().unwrap();
    let url = pg.url();
    let store = Store::open(&url).await.unwrap();
    assert_eq!(store.backend(), "postgres");
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    store.close().await;
    let store = Store::open(&url.replacen("postgres://", "postgresql://", 1)).await.unwrap();
    assert_eq!(store.backend(), "postgres");
    assert_eq!(store.get_container("ctr_1").await.unwrap().id, "ctr_1");
    store.close().await;

    match Store::open("mysql://localhost/agentd").await {
        Err(StoreError::Db(sqlx::Error::Configuration(e))) => assert!(e.to_string().contains("mysql"), "{e}"),
        other => panic!("expected a configuration error, got {:?}", other.map(|s| s.backend())),
    }
}

/// A server that is gone makes the store unavailable (`Db`, which the API
/// answers with 503), both for a running store and for opening one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_unavailable() {
    let (pg, store) = postgres().await;
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    let url = pg.url();
    tokio::task::spawn_blocking(move || drop(pg)).await.unwrap();
    let started = std::time::Instant::now();
    let (read, opened) = tokio::join!(store.get_container("ctr_1"), Store::open_postgres(&url));
    assert!(matches!(read, Err(StoreError::Db(_))), "{read:?}");
    assert!(matches!(opened, Err(StoreError::Db(_))), "{:?}", opened.map(|s| s.backend()));
    assert!(started.elapsed() < ACQUIRE_TIMEOUT + Duration::from_secs(5), "gave up in {:?}", started.elapsed());
}

fn registry_agent<'a>(id: &'a str, version: &'a str, entry_json: &'a str) -> registry::NewRegistryAgent<'a> {
    registry::NewRegistryAgent { id, name: "An agent", version, description: "ünïcødé description", entry_json }
}

async fn registry_sync_replaces_the_whole_registry(store: &Store) {
    assert!(store.registry_agents().await.unwrap().is_empty());
    assert_eq!(store.registry_agent("codex-acp").await.unwrap(), None);
    let before = now_ms();
    let entry = r#"{"id":"codex-acp","distribution":{"npx":{"package":"x"}}}"#;
    store
        .replace_registry("file:///a.json", &[registry_agent("zed-echo", "1.0.0", "{}"), registry_agent("codex-acp", "0.5.1", entry)])
        .await
        .unwrap();
    let agents = store.registry_agents().await.unwrap();
    assert_eq!(agents.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), ["codex-acp", "zed-echo"], "ordered by id");
    let codex = store.registry_agent("codex-acp").await.unwrap().unwrap();
    assert_eq!((codex.version.as_str(), codex.entry_json.as_str(), codex.source.as_str()), ("0.5.1", entry, "file:///a.json"));
    assert_eq!(codex.description, "ünïcødé description");
    assert!(codex.synced_at >= before);

    // The next sync replaces everything: gone entries go, changed ones change.
    store.replace_registry("https://x/registry.json", &[registry_agent("codex-acp", "0.6.0", "{}")]).await.unwrap();
    let agents = store.registry_agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!((agents[0].version.as_str(), agents[0].source.as_str()), ("0.6.0", "https://x/registry.json"));
    assert_eq!(store.registry_agent("zed-echo").await.unwrap(), None);
    store.replace_registry("empty", &[]).await.unwrap();
    assert!(store.registry_agents().await.unwrap().is_empty());
}

async fn a_failed_registry_sync_keeps_the_old_registry(store: &Store) {
    store.replace_registry("first", &[registry_agent("a", "1", "{}"), registry_agent("b", "1", "{}")]).await.unwrap();
    let duplicate = [registry_agent("c", "2", "{}"), registry_agent("c", "3", "{}")];
    assert!(matches!(store.replace_registry("second", &duplicate).await, Err(StoreError::Db(_))));
    let agents = store.registry_agents().await.unwrap();
    assert_eq!(agents.iter().map(|a| (a.id.as_str(), a.source.as_str())).collect::<Vec<_>>(), [("a", "first"), ("b", "first")]);
}

fn audit_record(at: i64, path: &str, entity_id: Option<&str>, code: Option<&str>) -> audit::NewAuditRecord {
    audit::NewAuditRecord {
        at,
        actor: Some("ops@example".into()),
        token_id: Some("0123456789abcdef".into()),
        peer: None,
        method: "POST".into(),
        path: path.into(),
        entity_kind: entity_id.map(|_| "session".into()),
        entity_id: entity_id.map(str::to_string),
        status: if code.is_some() { 409 } else { 200 },
        code: code.map(str::to_string),
        duration_us: 1234,
    }
}

async fn audit_records_page_filter_and_prune(store: &Store) {
    let now = now_ms();
    // More rows than one INSERT binds, to cross a chunk boundary.
    let mut records: Vec<_> = (0..250).map(|i| audit_record(now - 10, &format!("/v1/sessions/ses_{i}:prompt"), Some(&format!("ses_{i}")), None)).collect();
    records.push(audit_record(now, "/v1/sessions/ses_7", Some("ses_7"), Some("illegal_state")));
    store.insert_audit_records(&records).await.unwrap();

    let newest = store.audit_records(&audit::AuditQuery { after: None, entity: None, limit: 2 }).await.unwrap();
    assert_eq!(newest.len(), 2);
    assert!(newest[0].id < newest[1].id, "oldest first within a page");
    let last = &newest[1].record;
    assert_eq!((last.path.as_str(), last.code.as_deref(), last.status), ("/v1/sessions/ses_7", Some("illegal_state"), 409));
    assert_eq!((last.actor.as_deref(), last.duration_us), (Some("ops@example"), 1234));

    // Paging from the start with a cursor visits every record once, in order.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_records(&audit::AuditQuery { after: Some(after), entity: None, limit: 100 }).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.id;
        seen.extend(page.into_iter().map(|r| r.record.path));
    }
    assert_eq!(seen.len(), 251);
    assert_eq!(seen[0], "/v1/sessions/ses_0:prompt");

    let one = store
        .audit_records(&audit::AuditQuery { after: None, entity: Some(("session".into(), "ses_7".into())), limit: 10 })
        .await
        .unwrap();
    assert_eq!(one.iter().map(|r| r.record.path.as_str()).collect::<Vec<_>>(), ["/v1/sessions/ses_7:prompt", "/v1/sessions/ses_7"]);

    // Pruning by age keeps the newer record.
    store.insert_audit_records(&[audit_record(now - 3_600_000, "/v1/registry:sync", None, None)]).await.unwrap();
    assert_eq!(store.prune_audit(Duration::from_secs(60)).await.unwrap(), 1);
    assert_eq!(store.audit_records(&audit::AuditQuery { after: Some(0), entity: None, limit: 1000 }).await.unwrap().len(), 251);
}

fn observation<'a>(state: &'a str, restarts: i64, pid: Option<i64>, error: Option<&'a str>) -> agents::AgentObservation<'a> {
    agents::AgentObservation { id: "agi_1", container_id: "ctr_1", agent_id: "echo", agent_version: "1.2.3", state, restarts, pid, error }
}

async fn agent_instances_follow_their_state_machine(store: &Store) {
    use states::agent_instance::*;
    store.insert_container("ctr_1", "node-a", "{}").await.unwrap();
    // First seen: inserted as reported.
    assert!(store.observe_agent(&observation(READY, 0, Some(2), None)).await.unwrap());
    let a = store.get_agent_instance("agi_1").await.unwrap().unwrap();
    assert_eq!((a.state.as_str(), a.restarts, a.pid, a.container_id.as_str()), (READY, 0, Some(2), "ctr_1"));
    // The same report again changes nothing.
    assert!(!store.observe_agent(&observation(READY, 0, Some(2), None)).await.unwrap());
    // A crash seen late: restarted once, a new pid, the reason kept.
    assert!(store.observe_agent(&observation(STARTING, 1, Some(9), Some("exited with status 70"))).await.unwrap());
    assert!(store.observe_agent(&observation(READY, 1, Some(9), None)).await.unwrap());
    let a = store.get_agent_instance("agi_1").await.unwrap().unwrap();
    assert_eq!((a.state.as_str(), a.restarts, a.pid, a.error.as_deref()), (READY, 1, Some(9), Some("exited with status 70")));
    let history: Vec<(String, String)> =
        store.transitions_of("agent_instance", "agi_1").await.unwrap().into_iter().map(|t| (t.from_state, t.to_state)).collect();
    assert_eq!(history, [(READY.to_string(), STARTING.to_string()), (STARTING.to_string(), READY.to_string())]);
    // An unknown state is refused and changes nothing.
    assert!(matches!(store.observe_agent(&observation("dancing", 1, Some(9), None)).await, Err(StoreError::Illegal(_))));

    // Stopped is final: later reports are illegal, a repeat is harmless, the pid goes.
    store.agent_stopped("agi_1", "no open session left").await.unwrap();
    store.agent_stopped("agi_1", "again").await.unwrap();
    let a = store.get_agent_instance("agi_1").await.unwrap().unwrap();
    assert_eq!((a.state.as_str(), a.pid), (STOPPED, None));
    match store.observe_agent(&observation(READY, 1, Some(9), None)).await {
        Err(StoreError::Illegal(e)) => assert_eq!(e.current, STOPPED),
        other => panic!("expected an illegal transition, got {other:?}"),
    }
    // A lost node fails the live ones only.
    store.observe_agent(&agents::AgentObservation { id: "agi_2", ..observation(RUNNING, 0, Some(3), None) }).await.unwrap();
    assert_eq!(store.agents_of_container_failed("ctr_1", "node lost").await.unwrap(), 1);
    let states: Vec<(String, String)> =
        store.agent_instances_of_container("ctr_1").await.unwrap().into_iter().map(|a| (a.id, a.state)).collect();
    assert_eq!(states, [("agi_1".to_string(), STOPPED.to_string()), ("agi_2".to_string(), FAILED.to_string())]);
    // An instance must belong to a known container.
    let orphan = agents::AgentObservation { id: "agi_3", container_id: "ctr_nope", ..observation(READY, 0, None, None) };
    assert!(store.observe_agent(&orphan).await.is_err());
}

async fn bundles_count_their_uses_per_node(store: &Store) {
    assert!(store.bundles().await.unwrap().is_empty());
    store.bundle_used("node-a", "https://x/a.tar.gz", "ab12").await.unwrap();
    store.bundle_used("node-a", "https://x/a.tar.gz", "ab12").await.unwrap();
    store.bundle_used("node-a", "https://x/a.tar.gz", "").await.unwrap();
    store.bundle_used("node-b", "https://x/a.tar.gz", "ab12").await.unwrap();
    let mut rows: Vec<(String, String, i64)> = store.bundles().await.unwrap().into_iter().map(|b| (b.node_id, b.sha256, b.uses)).collect();
    rows.sort();
    assert_eq!(
        rows,
        [("node-a".into(), String::new(), 1), ("node-a".into(), "ab12".into(), 2), ("node-b".into(), "ab12".into(), 1)]
    );
    let newest = &store.bundles().await.unwrap()[0];
    assert!(newest.last_used_at >= newest.first_used_at);
}
