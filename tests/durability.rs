//! Faults and races the durable control plane must survive without losing
//! or doubling anything, counted at the node: a control plane killed in the
//! middle of a workflow step, PostgreSQL restarted under load, and
//! concurrent API calls on one session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::daemon::{NodeProcess, ServerProcess};
use crate::support::{Agentd, session_body};

async fn get(http: &reqwest::Client, url: &str) -> Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// Polls `url` until `check` accepts the body.
async fn wait_for(http: &reqwest::Client, url: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = get(http, url).await;
        if check(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGKILL of the control plane after the node built the sandbox and before
/// the step recorded anything; the restarted control plane finishes the
/// create: the session is ready and usable, and the node built one sandbox
/// (the repeated call was answered with its first result).
async fn killed_mid_create_finishes_after_restart(database_url: Option<String>) {
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path()).await;
    let cp_state = dir.path().join("cp");
    let mut env: Vec<(&str, &str)> = Vec::new();
    if let Some(url) = &database_url {
        env.push(("AGENTD_DATABASE_URL", url));
    }
    let mut paused = env.clone();
    paused.push(("AGENTD_TEST_PAUSE_STEP", "session.create/sandbox"));
    let mut server = ServerProcess::start(&cp_state, &node.socket, &paused).await;
    let http = server.http.clone();
    let create = tokio::spawn(http.post(server.url("/v1/sessions")).json(&session_body(&[])).send());
    server.daemon.wait_for_line("step paused for a fault test").await;
    node.daemon.wait_for_line("sandbox created").await;
    assert_eq!(node.sandboxes_created(), 1, "{}\n{}", node.daemon.log(), server.daemon.log());
    server.daemon.kill9();
    assert!(create.await.unwrap().is_err(), "the client of the killed control plane got no answer");

    let mut server = ServerProcess::start(&cp_state, &node.socket, &env).await;
    let list = wait_for(&http, &server.url("/v1/sessions"), "the interrupted session to become ready", |l| {
        l["sessions"][0]["state"] == "ready"
    })
    .await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{list}");
    let id = list["sessions"][0]["id"].as_str().unwrap().to_string();
    assert!(server.daemon.log().contains("resuming steps this control plane was running"), "{}", server.daemon.log());
    assert_eq!(node.sandboxes_created(), 1, "exactly one sandbox built; node log:\n{}", node.daemon.log());
    assert!(node.daemon.count(&["repeated call answered with its first result"]) >= 1, "{}", node.daemon.log());
    assert_eq!(node.sandbox_dirs().len(), 1);

    // The session works end to end.
    prompt_then_delete(&http, &server, &node, &id, "after the crash").await;
    server.daemon.interrupt();
    node.daemon.interrupt();
}

/// One turn on the session, then its delete: no sandbox is left and the node
/// still counts one sandbox built.
async fn prompt_then_delete(http: &reqwest::Client, server: &ServerProcess, node: &NodeProcess, id: &str, text: &str) {
    let prompt = http.post(server.url(&format!("/v1/sessions/{id}:prompt"))).json(&json!({"prompt": text})).send().await.unwrap();
    assert_eq!(prompt.status(), StatusCode::ACCEPTED);
    wait_for(http, &server.url(&format!("/v1/sessions/{id}")), "the run to complete", |s| s["runs"][0]["state"] == "completed").await;
    let deleted = http.delete(server.url(&format!("/v1/sessions/{id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    assert_eq!(node.sandboxes_created(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_mid_create_on_sqlite() {
    killed_mid_create_finishes_after_restart(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_mid_create_on_postgresql() {
    let pg = agentd_testkit::postgres::TempPostgres::start().expect("start postgres");
    killed_mid_create_finishes_after_restart(Some(pg.url())).await;
}

/// A node call that times out and then succeeds: the node builds the
/// sandbox but takes 4 s to finish the call, past the control plane's 1 s
/// deadline; the step's attempts time out and are retried with backoff
/// under the same idempotency key, the node finishes the first call anyway
/// and answers the retry from memory: the session ends ready with one
/// sandbox built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_call_that_times_out_then_succeeds_builds_once() {
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start_with(dir.path(), &[("AGENTD_TEST_DELAY_ANSWER", "create_sandbox:4000")]).await;
    let env = [("AGENTD_NODE_CALL_TIMEOUT_MS", "1000")];
    let mut server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &env).await;
    let http = server.http.clone();
    let created = http.post(server.url("/v1/sessions")).json(&session_body(&[])).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED, "{}", server.daemon.log());
    let session: Value = created.json().await.unwrap();
    assert_eq!(session["state"], "ready", "{session}");
    let id = session["id"].as_str().unwrap();

    let server_log = server.daemon.log();
    assert!(node.daemon.log().contains("answer delayed for a fault test"), "{}", node.daemon.log());
    assert!(
        server_log.contains("step failed; will retry") && server_log.contains("no answer within 1000 ms"),
        "the first attempt timed out and was retried: {server_log}"
    );
    assert_eq!(node.sandboxes_created(), 1, "exactly one sandbox built; node log:\n{}", node.daemon.log());
    assert!(node.daemon.count(&["repeated call answered with its first result"]) >= 1, "{}", node.daemon.log());
    assert_eq!(node.sandbox_dirs().len(), 1);

    prompt_then_delete(&http, &server, &node, id, "after the timeout").await;
    server.daemon.interrupt();
    node.daemon.interrupt();
}

/// Hibernate and resume through the API run as fenced workflow steps: a
/// freeze whose answer comes past the deadline is retried and answered from
/// the node's memory; illegal moves get 409 naming the state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hibernate_and_resume_run_as_fenced_steps() {
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start_with(dir.path(), &[("AGENTD_TEST_DELAY_ANSWER", "freeze_sandbox:2500")]).await;
    let env = [("AGENTD_NODE_CALL_TIMEOUT_MS", "1000")];
    let mut server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &env).await;
    let http = server.http.clone();
    let created = http.post(server.url("/v1/sessions")).json(&session_body(&[])).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let session: Value = created.json().await.unwrap();
    let id = session["id"].as_str().unwrap();
    let container = session["container_id"].as_str().unwrap();
    let post = async |action: &str| {
        let r = http.post(server.url(&format!("/v1/containers/{container}:{action}"))).send().await.unwrap();
        let status = r.status();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    };

    let (status, problem) = post("resume").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::CONFLICT, Some("illegal_state")), "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("is ready"), "{problem}");

    let (status, body) = post("hibernate").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}\n{}", server.daemon.log());
    let c = get(&http, &server.url(&format!("/v1/containers/{container}"))).await;
    assert_eq!((c["state"].as_str(), c["usage"]["frozen"].as_bool()), (Some("hibernated"), Some(true)), "{c}");
    let log = server.daemon.log();
    assert!(log.contains("step failed; will retry") && log.contains("no answer within 1000 ms"), "{log}");
    assert!(node.daemon.count(&["repeated call answered with its first result"]) >= 1, "{}", node.daemon.log());
    let (status, problem) = post("hibernate").await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("is hibernated"), "{problem}");
    let prompt = http.post(server.url(&format!("/v1/sessions/{id}:prompt"))).json(&json!({"prompt": "frozen"})).send().await.unwrap();
    assert_eq!(prompt.status(), StatusCode::CONFLICT);

    let (status, body) = post("resume").await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let c = get(&http, &server.url(&format!("/v1/containers/{container}"))).await;
    assert_eq!((c["state"].as_str(), c["usage"]["frozen"].as_bool()), (Some("ready"), Some(false)), "{c}");
    let prompt = http.post(server.url(&format!("/v1/sessions/{id}:prompt"))).json(&json!({"prompt": "thawed"})).send().await.unwrap();
    assert_eq!(prompt.status(), StatusCode::ACCEPTED);
    let completed = |s: &Value| s["runs"].as_array().is_some_and(|runs| runs.iter().any(|r| r["state"] == "completed"));
    wait_for(&http, &server.url(&format!("/v1/sessions/{id}")), "the run to complete", completed).await;
    for kind in ["container.freeze", "container.thaw"] {
        assert!(server.daemon.count(&["step done", kind]) >= 1, "{kind} ran as a step: {}", server.daemon.log());
    }
    let deleted = http.delete(server.url(&format!("/v1/sessions/{id}"))).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    server.daemon.interrupt();
    node.daemon.interrupt();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prompts_at_once_one_runs_the_other_is_refused() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&["--delay-ms", "50"]).await;
    let id = session["id"].as_str().unwrap();
    for round in 0..3 {
        let ((a, a_body), (b, b_body)) = tokio::join!(agentd.prompt(id, "a b c d e f"), agentd.prompt(id, "g h i j k l"));
        let mut statuses = [a, b];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::ACCEPTED, StatusCode::CONFLICT], "round {round}: {a_body} {b_body}");
        let refused = if a == StatusCode::CONFLICT { &a_body } else { &b_body };
        assert_eq!(refused["code"], "run_active", "{refused}");
        let runs = round + 1;
        agentd
            .wait_for(&format!("/v1/sessions/{id}"), |s| {
                s["runs"].as_array().is_some_and(|r| r.len() == runs && r.iter().all(|r| r["state"] == "completed"))
            })
            .await;
    }
}

/// `Idempotency-Key`: a create or prompt sent again with its key answers the
/// first request (the same session or run, no second one), also when the
/// repeats race the first; the key with another request is 422.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_repeated_with_an_idempotency_key_run_once() {
    let agentd = Agentd::start().await;
    let keyed = |path: &str, key: &str, body: &Value| agentd.http.post(agentd.url(path)).header("Idempotency-Key", key).json(body);
    let replayed = |r: &reqwest::Response| r.headers().get("idempotent-replayed").is_some_and(|v| v == "true");

    // Create: three at once with one key, then once more: one session.
    let body = session_body(&["--delay-ms", "20"]);
    let (a, b, c) = tokio::join!(
        keyed("/v1/sessions", "create-1", &body).send(),
        keyed("/v1/sessions", "create-1", &body).send(),
        keyed("/v1/sessions", "create-1", &body).send()
    );
    let mut ids = Vec::new();
    let mut replays = 0;
    for r in [a, b, c] {
        let r = r.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        replays += usize::from(replayed(&r));
        ids.push(r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_string());
    }
    ids.dedup();
    assert_eq!((ids.len(), replays), (1, 2), "one session, two answers replayed: {ids:?}");
    let id = ids.remove(0);
    let r = keyed("/v1/sessions", "create-1", &body).send().await.unwrap();
    assert!(replayed(&r));
    assert_eq!((r.status(), r.json::<Value>().await.unwrap()["state"].clone()), (StatusCode::CREATED, json!("ready")));
    assert_eq!(agentd.sandbox_dirs().len(), 1, "one sandbox built");
    let (_, list) = agentd.get("/v1/sessions").await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1, "{list}");
    // The key with another body: refused, nothing made.
    let (status, _, problem) = agentd.send(keyed("/v1/sessions", "create-1", &session_body(&[]))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused")), "{problem}");
    let (status, _, problem) = agentd.send(keyed("/v1/sessions", "bad key", &body)).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_idempotency_key")), "{problem}");

    // Prompt: repeated (also racing the first), one run; a string prompt and
    // its one text block are the same request.
    let path = format!("/v1/sessions/{id}:prompt");
    let text = json!({"prompt": "one two"});
    let blocks = json!({"prompt": [{"type": "text", "text": "one two"}]});
    let (a, b) = tokio::join!(keyed(&path, "p-1", &text).send(), keyed(&path, "p-1", &blocks).send());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!((a.status(), b.status()), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    assert_eq!(usize::from(replayed(&a)) + usize::from(replayed(&b)), 1);
    let (a, b) = (a.json::<Value>().await.unwrap(), b.json::<Value>().await.unwrap());
    assert_eq!(a, b, "the same answer");
    let run = a["run_id"].as_str().unwrap().to_string();
    let view = agentd
        .wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"].as_array().is_some_and(|r| r.iter().all(|r| r["state"] == "completed")))
        .await;
    let r = keyed(&path, "p-1", &text).send().await.unwrap();
    assert!(replayed(&r));
    assert_eq!((r.status(), r.json::<Value>().await.unwrap()["run_id"].as_str()), (StatusCode::ACCEPTED, Some(run.as_str())));
    let (status, _, problem) = agentd.send(keyed(&path, "p-1", &json!({"prompt": "three"}))).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("idempotency_key_reused")), "{problem}");
    // A new key is a new prompt.
    let (status, _, second) = agentd.send(keyed(&path, "p-2", &text)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{second}");
    assert_ne!(second["run_id"].as_str(), Some(run.as_str()));
    let runs = agentd
        .wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"].as_array().is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["state"] == "completed")))
        .await;
    assert_eq!(view["runs"].as_array().unwrap().len(), 1, "{view}");
    assert_eq!(runs["runs"][0]["id"].as_str(), Some(run.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_deletes_at_once_delete_once_and_both_succeed() {
    let agentd = Agentd::start().await;
    let session = agentd.create_session(&[]).await;
    let id = session["id"].as_str().unwrap();
    let path = format!("/v1/sessions/{id}");
    let ((a, a_body), (b, b_body)) = tokio::join!(agentd.delete(&path), agentd.delete(&path));
    // Deletes are idempotent: the loser of the race sees the winner's delete
    // (done, or still being confirmed by the node).
    for status in [a, b] {
        assert!(matches!(status, StatusCode::NO_CONTENT | StatusCode::ACCEPTED), "{a_body} {b_body}");
    }
    agentd.wait_for(&path, |s| s["state"] == "closed").await;
    let (status, body) = agentd.delete(&path).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (_, container) = agentd.get(&format!("/v1/containers/{}", session["container_id"].as_str().unwrap())).await;
    assert_eq!(container["state"], "deleted");
    assert!(agentd.sandbox_dirs().is_empty(), "{:?}", agentd.sandbox_dirs());
    assert_eq!(agentd.log().matches("sandbox created").count(), 1);
}

/// A node that stops answering is marked lost after the heartbeat timeout,
/// and what ran on it fails with that reason; when it answers again, the
/// sandbox of the failed container is reaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_lost_its_sessions_fail_and_its_leftovers_are_reaped() {
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path()).await;
    let env = [("AGENTD_NODE_CHECK_INTERVAL_MS", "200"), ("AGENTD_NODE_HEARTBEAT_TIMEOUT_MS", "1500")];
    let mut server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &env).await;
    let http = server.http.clone();
    let created = http.post(server.url("/v1/sessions")).json(&session_body(&["--delay-ms", "200"])).send().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let session: Value = created.json().await.unwrap();
    let id = session["id"].as_str().unwrap();
    let container = session["container_id"].as_str().unwrap();
    let words = "a b c d e f g h i j k l m n o p q r s t u v w x y z";
    let prompt = http.post(server.url(&format!("/v1/sessions/{id}:prompt"))).json(&json!({"prompt": words})).send().await.unwrap();
    assert_eq!(prompt.status(), StatusCode::ACCEPTED);

    node.daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let started = Instant::now();
    let failed = wait_for(&http, &server.url(&format!("/v1/sessions/{id}")), "the session to fail", |s| s["state"] == "failed").await;
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1000), "failed only after the timeout: {waited:?}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("lost") && error.contains("no heartbeat"), "{failed}");
    assert_eq!(failed["runs"][0]["state"], "failed", "{failed}");
    assert_eq!(failed["runs"][0]["error"].as_str(), Some(error));
    let c = get(&http, &server.url(&format!("/v1/containers/{container}"))).await;
    assert_eq!(c["state"], "failed", "{c}");

    node.daemon.signal(nix::sys::signal::Signal::SIGCONT);
    wait_for(&http, &server.url(&format!("/v1/containers/{container}")), "the leftover to be reaped", |c| c["state"] == "deleted").await;
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    assert!(server.daemon.log().contains("reaping a sandbox the store does not account for"), "{}", server.daemon.log());
    server.daemon.interrupt();
    node.daemon.interrupt();
}

/// Idle containers hibernate after `hibernate_after` and are stopped after
/// their TTL, by the periodic node check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_containers_hibernate_then_stop_after_their_ttl() {
    let agentd = Agentd::start_with(&[
        ("AGENTD_NODE_CHECK_INTERVAL_MS", "100"),
        ("AGENTD_HIBERNATE_AFTER_MS", "600"),
        ("AGENTD_CONTAINER_TTL_MS", "3000"),
    ])
    .await;
    let session = agentd.create_session(&[]).await;
    let id = session["id"].as_str().unwrap();
    let container = format!("/v1/containers/{}", session["container_id"].as_str().unwrap());
    let (status, _) = agentd.prompt(id, "hello").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"][0]["state"] == "completed").await;
    let turn_ended = Instant::now();

    let c = agentd.wait_for(&container, |c| c["state"] == "hibernated").await;
    assert!(turn_ended.elapsed() >= Duration::from_millis(500), "hibernated only once idle: {:?}", turn_ended.elapsed());
    assert_eq!(c["usage"]["frozen"], true, "{c}");
    let (status, body) = agentd.prompt(id, "while frozen").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("container_hibernated")), "{body}");
    let (_, s) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(s["runs"].as_array().unwrap().len(), 1, "a refused prompt records no run: {s}");
    let (status, _) = agentd.post(&format!("{container}:resume"), &json!({})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, c) = agentd.get(&container).await;
        if c["state"] == "deleted" {
            break;
        }
        assert!(Instant::now() < deadline, "not stopped after its TTL: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, s) = agentd.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(s["state"], "closed", "{s}");
    assert!(agentd.sandbox_dirs().is_empty(), "{:?}", agentd.sandbox_dirs());
    assert!(agentd.log().contains("idle for longer than its TTL"), "{}", agentd.log());
}

/// PostgreSQL restarted under `agentd up --database-url`: while it is down
/// the API answers 503 `store_unavailable` with Retry-After, and once it is
/// back the same process serves the session again, runner included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_agentd_up() {
    let mut pg = agentd_testkit::postgres::TempPostgres::start().expect("start postgres");
    let agentd = Agentd::start_with(&[("AGENTD_DATABASE_URL", &pg.url())]).await;
    let session = agentd.create_session(&[]).await;
    let id = session["id"].as_str().unwrap();

    pg.stop();
    let response = agentd.http.get(agentd.url(&format!("/v1/sessions/{id}"))).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
    assert!(retry_after.is_some_and(|v| v.parse::<u32>().is_ok()), "Retry-After in seconds");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], "store_unavailable", "{body}");
    let (status, body) = agentd.prompt(id, "while the database is down").await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("store_unavailable")), "{body}");

    pg.resume().expect("resume postgres");
    let (status, body) = agentd.prompt(id, "after the restart").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}\n{}", agentd.log());
    let view = agentd.wait_for(&format!("/v1/sessions/{id}"), |s| s["runs"].as_array().is_some_and(|r| r.iter().any(|r| r["state"] == "completed"))).await;
    assert_eq!(view["runs"].as_array().unwrap().len(), 1, "the refused prompt left no run: {view}");
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(agentd.sandbox_dirs().is_empty());
}

/// Two control planes on one PostgreSQL database and one node race for the
/// same outbox: every session is built exactly once, whichever runner took
/// its step, and either API answers for any session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_on_one_database_build_each_session_once() {
    let pg = agentd_testkit::postgres::TempPostgres::start().expect("start postgres");
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path()).await;
    let env = [("AGENTD_DATABASE_URL", pg.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut a = ServerProcess::start(&dir.path().join("cp-a"), &node.socket, &env).await;
    let mut b = ServerProcess::start(&dir.path().join("cp-b"), &node.socket, &env).await;
    let http = a.http.clone();

    const SESSIONS: usize = 6;
    let creates = (0..SESSIONS).map(|i| {
        let url = if i % 2 == 0 { a.url("/v1/sessions") } else { b.url("/v1/sessions") };
        let http = http.clone();
        async move {
            let response = http.post(url).json(&session_body(&[])).send().await.unwrap();
            (response.status(), response.json::<Value>().await.unwrap())
        }
    });
    let created = futures::future::join_all(creates).await;
    let mut ids = Vec::new();
    for (status, body) in &created {
        assert_eq!(*status, StatusCode::CREATED, "{body}\n{}\n{}", a.daemon.log(), b.daemon.log());
        assert_eq!(body["state"], "ready");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    assert_eq!(node.sandboxes_created(), SESSIONS, "one sandbox per session; node log:\n{}", node.daemon.log());
    let ran = |log: String| log.matches("sandbox created").count();
    assert_eq!(ran(a.daemon.log()) + ran(b.daemon.log()), 0, "the servers build nothing themselves");

    // Deleted through the other API than the one that created each.
    for (i, id) in ids.iter().enumerate() {
        let url = if i % 2 == 0 { b.url(&format!("/v1/sessions/{id}")) } else { a.url(&format!("/v1/sessions/{id}")) };
        let response = http.delete(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    assert_eq!(node.sandboxes_created(), SESSIONS);
    a.daemon.interrupt();
    b.daemon.interrupt();
    node.daemon.interrupt();
}

/// Every answer one load client got, and what it was promised.
#[derive(Default)]
struct Seen {
    /// (request, status, Retry-After, problem code) of every answer.
    answers: Vec<(String, StatusCode, Option<String>, Option<String>)>,
    /// Sessions answered 201 (or 202, built later).
    created: Vec<String>,
    /// (session, run) answered 202.
    accepted: Vec<(String, String)>,
}

impl Seen {
    /// Sends until the answer is not a 503, waiting Retry-After between tries.
    async fn send(&mut self, what: &str, request: impl Fn() -> reqwest::RequestBuilder) -> (StatusCode, Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let response = request().send().await.unwrap_or_else(|e| panic!("{what}: {e}"));
            let status = response.status();
            let retry_after = response.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_string);
            let body = response.json::<Value>().await.unwrap_or(Value::Null);
            self.answers.push((what.to_string(), status, retry_after.clone(), body["code"].as_str().map(str::to_string)));
            if status != StatusCode::SERVICE_UNAVAILABLE {
                return (status, body);
            }
            assert!(Instant::now() < deadline, "{what}: still 503 after 30 s: {body}");
            let secs = retry_after.and_then(|v| v.parse::<u64>().ok()).unwrap_or(1);
            tokio::time::sleep(Duration::from_secs(secs)).await;
        }
    }

    /// Polls the session (through 503s) until it is built and no run of it
    /// is running.
    async fn wait_settled(&mut self, http: &reqwest::Client, url: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, s) = self.send("GET session", || http.get(url)).await;
            assert_eq!(status, StatusCode::OK, "{s}");
            let running = s["runs"].as_array().is_some_and(|runs| runs.iter().any(|r| ["queued", "dispatching", "streaming"].contains(&r["state"].as_str().unwrap_or(""))));
            if s["state"] != "creating" && !running {
                return s;
            }
            assert!(Instant::now() < deadline, "not settled after 30 s: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One load client: creates sessions and prompts each a few times, one turn
/// at a time, riding out 503s. With `keyed` (a name) every request carries
/// an `Idempotency-Key`, the same on each retry of it.
async fn load_client(http: reqwest::Client, base: String, sessions: usize, prompts: usize, accepted: Arc<AtomicUsize>, keyed: Option<String>) -> Seen {
    let mut seen = Seen::default();
    let with_key = |request: reqwest::RequestBuilder, key: String| match &keyed {
        Some(client) => request.header("Idempotency-Key", format!("{client}/{key}")),
        None => request,
    };
    for n in 0..sessions {
        let create = || with_key(http.post(format!("{base}/v1/sessions")).json(&session_body(&["--delay-ms", "30"])), format!("create-{n}"));
        let (status, body) = seen.send("create", create).await;
        assert!(matches!(status, StatusCode::CREATED | StatusCode::ACCEPTED), "create: {status} {body}");
        let id = body["id"].as_str().unwrap().to_string();
        let url = format!("{base}/v1/sessions/{id}");
        let s = seen.wait_settled(&http, &url).await;
        assert_eq!(s["state"], "ready", "{s}");
        seen.created.push(id.clone());
        for p in 0..prompts {
            let prompt = || with_key(http.post(format!("{url}:prompt")).json(&json!({"prompt": format!("turn {p} a b c")})), format!("{id}/{p}"));
            let (status, body) = seen.send("prompt", prompt).await;
            match status {
                StatusCode::ACCEPTED => {
                    seen.accepted.push((id.clone(), body["run_id"].as_str().unwrap().to_string()));
                    accepted.fetch_add(1, Ordering::SeqCst);
                }
                // An attempt answered 503 after its run was recorded: that
                // run goes on. With a key the retry answers that run instead.
                StatusCode::CONFLICT if body["code"] == "run_active" && keyed.is_none() => {}
                _ => panic!("prompt: {status} {body}"),
            }
            seen.wait_settled(&http, &url).await;
        }
    }
    seen
}

/// PostgreSQL restarted under load: four clients create sessions and prompt
/// them against `agentd server` and `agentd node` (separate processes) while
/// PostgreSQL goes down for 2 s. Requests in the outage get 503 with
/// Retry-After, never a 500; every session built is built once, every run
/// starts once at the node and ends (none stuck running); deleting
/// everything leaves no sandbox. Half the clients send `Idempotency-Key`s:
/// their retries after a 503 make no second session or run, so they end
/// with exactly the sessions and runs they asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load_loses_and_doubles_nothing() {
    const CLIENTS: usize = 4;
    const SESSIONS: usize = 2;
    const PROMPTS: usize = 3;
    let mut pg = agentd_testkit::postgres::TempPostgres::start().expect("start postgres");
    let dir = tempfile::Builder::new().prefix("agentd-e2e-").tempdir().unwrap();
    let mut node = NodeProcess::start(dir.path()).await;
    let url = pg.url();
    let mut server = ServerProcess::start(&dir.path().join("cp"), &node.socket, &[("AGENTD_DATABASE_URL", &url)]).await;
    let http = server.http.clone();

    let accepted = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let keyed = (c % 2 == 0).then(|| format!("client-{c}"));
            tokio::spawn(load_client(http.clone(), server.base.clone(), SESSIONS, PROMPTS, Arc::clone(&accepted), keyed))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while accepted.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no load before the outage:\n{}", server.daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg.stop();
    let down = Instant::now();
    // The clients may all be inside a create that waits out the outage; one
    // request of our own is sure to meet it.
    let response = http.get(server.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().get("retry-after").is_some_and(|v| v.to_str().is_ok_and(|v| v.parse::<u32>().is_ok())));
    assert_eq!(response.json::<Value>().await.unwrap()["code"], "store_unavailable");
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(down.elapsed())).await;
    pg.resume().expect("resume postgres");
    let mut seen = Vec::new();
    for client in clients {
        seen.push(client.await.unwrap_or_else(|e| panic!("a load client failed: {e}\nserver log:\n{}", server.daemon.log())));
    }

    // During the outage: 503 `store_unavailable` with Retry-After, never another 5xx.
    let answers: Vec<_> = seen.iter().flat_map(|s| &s.answers).collect();
    let unavailable: Vec<_> = answers.iter().filter(|a| a.1 == StatusCode::SERVICE_UNAVAILABLE).collect();
    for (what, status, retry_after, code) in &answers {
        assert!(!status.is_server_error() || *status == StatusCode::SERVICE_UNAVAILABLE, "{what}: {status} {code:?}\n{}", server.daemon.log());
        if *status == StatusCode::SERVICE_UNAVAILABLE {
            assert!(retry_after.as_deref().is_some_and(|v| v.parse::<u32>().is_ok()), "{what}: 503 without Retry-After");
            assert_eq!(code.as_deref(), Some("store_unavailable"), "{what}");
        }
    }

    // The store: every session (also those whose create was answered 503
    // after its rows were written) built and ready, no run left running.
    let list = get(&http, &server.url("/v1/sessions")).await;
    let mut views = Vec::new();
    for s in list["sessions"].as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        let view = Seen::default().wait_settled(&http, &server.url(&format!("/v1/sessions/{id}"))).await;
        assert_eq!(view["state"], "ready", "{view}");
        for run in view["runs"].as_array().unwrap() {
            let ended = run["state"] == "completed" || (run["state"] == "failed" && run["error"].as_str().is_some_and(|e| !e.is_empty()));
            assert!(ended, "a run ended completed, or failed with a reason: {run}\n{}", server.daemon.log());
        }
        views.push(view);
    }
    let run_state = |session: &str, run: &str| {
        let view = views.iter().find(|v| v["id"] == session).unwrap_or_else(|| panic!("session {session} answered 201 is listed"));
        let run = view["runs"].as_array().unwrap().iter().find(|r| r["id"] == run);
        run.unwrap_or_else(|| panic!("run {run:?} answered 202 is listed: {view}"))["state"].as_str().unwrap().to_string()
    };
    let created: Vec<_> = seen.iter().flat_map(|s| &s.created).collect();
    assert_eq!(created.len(), CLIENTS * SESSIONS);
    for id in &created {
        assert!(views.iter().any(|v| v["id"] == id.as_str()), "session {id} answered 201 is listed");
    }
    let accepted: Vec<_> = seen.iter().flat_map(|s| &s.accepted).collect();
    for (session, run) in &accepted {
        assert_eq!(run_state(session, run), "completed", "a run answered 202 completed");
    }
    // The keyed clients: exactly what they asked for, however many retries.
    for keyed in seen.iter().step_by(2) {
        for id in &keyed.created {
            let view = views.iter().find(|v| v["id"] == id.as_str()).unwrap();
            assert_eq!(view["runs"].as_array().unwrap().len(), PROMPTS, "one run per keyed prompt: {view}");
        }
        assert_eq!(keyed.accepted.len(), SESSIONS * PROMPTS);
    }
    let keyed_retries = seen.iter().step_by(2).flat_map(|s| &s.answers).filter(|a| a.1 == StatusCode::SERVICE_UNAVAILABLE).count();
    eprintln!("keyed clients rode out {keyed_retries} 503s; all clients {}", unavailable.len());

    // The node: one sandbox per container the store shows, one run.started per run.
    let containers: std::collections::BTreeSet<_> = views.iter().map(|v| v["container_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(containers.len(), views.len(), "one container per session");
    assert_eq!(node.sandboxes_created(), containers.len(), "one sandbox per container; node log:\n{}", node.daemon.log());
    let mut started: std::collections::BTreeMap<String, usize> = Default::default();
    for line in node.event_log_lines().iter().filter(|l| l["kind"] == "run.started") {
        *started.entry(line["run_id"].as_str().unwrap().to_string()).or_default() += 1;
    }
    assert!(started.values().all(|n| *n == 1), "each run started once at the node: {started:?}");
    for view in &views {
        for run in view["runs"].as_array().unwrap().iter().filter(|r| r["state"] == "completed") {
            assert_eq!(started.get(run["id"].as_str().unwrap()), Some(&1), "{run}");
        }
    }
    let completed = views.iter().flat_map(|v| v["runs"].as_array().unwrap()).filter(|r| r["state"] == "completed").count();
    assert!(completed >= accepted.len(), "{completed} completed, {} accepted", accepted.len());
    let failed = views.iter().flat_map(|v| v["runs"].as_array().unwrap()).filter(|r| r["state"] == "failed").count();
    let by_request = |what: &str| unavailable.iter().filter(|a| a.0 == what).count();
    eprintln!(
        "load: {} sessions, {} runs accepted, {completed} completed, {failed} failed; 503s: {} (create {}, prompt {}, get {}); run_active conflicts: {}",
        views.len(),
        accepted.len(),
        unavailable.len(),
        by_request("create"),
        by_request("prompt"),
        by_request("GET session"),
        answers.iter().filter(|a| a.3.as_deref() == Some("run_active")).count(),
    );

    for view in &views {
        let response = http.delete(server.url(&format!("/v1/sessions/{}", view["id"].as_str().unwrap()))).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    assert!(node.sandbox_dirs().is_empty(), "{:?}", node.sandbox_dirs());
    assert_eq!(node.sandboxes_created(), containers.len(), "nothing built after the fact");
    server.daemon.interrupt();
    node.daemon.interrupt();
}
