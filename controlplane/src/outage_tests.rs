//! A database that goes away and comes back: the API answers 503
//! problem+json with `Retry-After` while it is down (never 500), and both the
//! API and the workflow runner carry on by themselves once it is back.
//! PostgreSQL only: an embedded SQLite file cannot be "down".

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::store::conformance::postgres;
use crate::store::outbox::{NewStep, step_state};
use crate::store::Store;
use crate::workflow::{Backoff, Registry, Runner, RunnerConfig};
use crate::{AppState, app};

pub(crate) fn state(store: &Store) -> AppState {
    AppState {
        store: store.clone(),
        auth: false,
        // No node is registered: these requests never reach one.
        nodes: crate::fleet::Nodes::new(store.clone(), None),
        placement: Default::default(),
        defaults: crate::plan::PlanDefaults { initialize_timeout_ms: 1_000 },
        node_call_timeout: std::time::Duration::from_secs(5),
        registry_source: None,
        allowances: Default::default(),
        http: reqwest::Client::new(),
        shutdown: CancellationToken::new(),
        audit: crate::audit::AuditLog::start(store.clone()),
        steps: crate::workflow::InlineConfig::default(),
        sse: Default::default(),
    }
}

async fn get(state: &AppState, path: &str) -> (StatusCode, Option<String>, Option<String>, Value) {
    let response = app(state.clone()).oneshot(Request::get(path).body(Body::empty()).unwrap()).await.unwrap();
    let status = response.status();
    let header_of = |name| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (content_type, retry_after) = (header_of(header::CONTENT_TYPE), header_of(header::RETRY_AFTER));
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, content_type, retry_after, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_503_while_the_store_is_down_and_recovers() {
    let (mut pg, store) = postgres().await;
    let state = state(&store);
    store.insert_container("ctr_1", "local", "{}").await.unwrap();
    assert_eq!(get(&state, "/v1/containers/ctr_1").await.0, StatusCode::OK);

    let mut pg = tokio::task::spawn_blocking(move || {
        pg.stop();
        pg
    })
    .await
    .unwrap();
    for path in ["/v1/sessions", "/v1/containers/ctr_1", "/v1/sessions/ses_x"] {
        let (status, content_type, retry_after, body) = get(&state, path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert_eq!(content_type.as_deref(), Some("application/problem+json"));
        assert_eq!(body["code"], "store_unavailable", "{body}");
        assert!(retry_after.is_some_and(|s| s.parse::<u32>().is_ok()), "Retry-After in seconds");
    }

    let pg = tokio::task::spawn_blocking(move || {
        pg.resume().expect("resume postgres");
        pg
    })
    .await
    .unwrap();
    let (status, _, _, body) = get(&state, "/v1/containers/ctr_1").await;
    assert_eq!(status, StatusCode::OK, "the API recovers without a restart: {body}");
    assert_eq!(body["state"], "provisioning");
    store.close().await;
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_resumes_when_the_store_comes_back() {
    let (pg, store) = postgres().await;
    let runs = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    registry.register("count", {
        let runs = runs.clone();
        move |_ctx| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok(json!({}))
            }
        }
    });
    let config = RunnerConfig {
        owner: "outage".into(),
        workers: 4,
        poll_interval: Duration::from_millis(50),
        backoff: Backoff { base: Duration::from_millis(20), cap: Duration::from_millis(200) },
        ..RunnerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let runner = tokio::spawn(Runner::new(store.clone(), registry, config).run(shutdown.clone()));

    // Due while the database is down.
    store.enqueue(NewStep::new("test", "a", "count", "before", json!({})).delay(Duration::from_millis(500))).await.unwrap();
    let mut pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.stop();
        pg
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    pg = tokio::task::spawn_blocking(move || {
        pg.resume().expect("resume postgres");
        pg
    })
    .await
    .unwrap();

    store.enqueue(NewStep::new("test", "b", "count", "after", json!({}))).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let before = store.get_step_by_key("before").await.ok().flatten().map(|r| r.state);
        let after = store.get_step_by_key("after").await.ok().flatten().map(|r| r.state);
        if before.as_deref() == Some(step_state::DONE) && after.as_deref() == Some(step_state::DONE) {
            break;
        }
        assert!(Instant::now() < deadline, "steps not run after the store came back: {before:?} {after:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 2, "each step ran once");
    shutdown.cancel();
    runner.await.unwrap();
    store.close().await;
    drop(pg);
}

/// Records made while the store is down, and a shutdown that begins before
/// it is back: the writer's kept batch and the queue are written by the last
/// write, none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_survive_a_shutdown_while_the_store_is_down() {
    let (pg, store) = postgres().await;
    let audit = crate::audit::AuditLog::start(store.clone());
    let mut pg = tokio::task::spawn_blocking(move || {
        let mut pg = pg;
        pg.stop();
        pg
    })
    .await
    .unwrap();
    let record = |i: i64| crate::store::audit::NewAuditRecord {
        at: crate::store::now_ms(),
        actor: None,
        token_id: Some("tok_test".into()),
        peer: None,
        method: "POST".into(),
        path: format!("/v1/sessions/ses_{i}:prompt"),
        entity_kind: Some("session".into()),
        entity_id: Some(format!("ses_{i}")),
        status: 202,
        code: None,
        duration_us: 10,
    };
    audit.record(record(1));
    // The writer has failed at least once and holds its batch.
    tokio::time::sleep(Duration::from_millis(700)).await;
    audit.record(record(2));
    let closing = tokio::spawn({
        let audit = audit.clone();
        async move { audit.close().await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    pg = tokio::task::spawn_blocking(move || {
        pg.resume().expect("resume postgres");
        pg
    })
    .await
    .unwrap();
    closing.await.unwrap();
    let stored = store.audit_records(&crate::store::audit::AuditQuery { after: None, entity: None, limit: 10 }).await.unwrap();
    let mut paths: Vec<_> = stored.iter().map(|r| r.record.path.as_str()).collect();
    paths.sort();
    assert_eq!(paths, ["/v1/sessions/ses_1:prompt", "/v1/sessions/ses_2:prompt"]);
    store.close().await;
    drop(pg);
}
