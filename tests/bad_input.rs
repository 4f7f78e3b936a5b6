//! Bad input gets a clear problem with a stable code, never a hang, and leaves
//! nothing half-created.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::host::wait_no_sandbox_cgroups;
use crate::support::{Agentd, session_body};

fn assert_problem(status: StatusCode, body: &Value, want_status: StatusCode, want_code: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["code"], want_code, "{body}");
    assert_eq!(body["status"], want_status.as_u16());
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_and_unknown_ids() {
    let agentd = Agentd::start().await;
    let url = agentd.url("/v1/sessions");
    let (status, content_type, body) =
        agentd.send(agentd.http.post(&url).header("content-type", "application/json").body("{\"manual_agent\": ")).await;
    assert_problem(status, &body, StatusCode::BAD_REQUEST, "invalid_json");
    assert_eq!(content_type.as_deref(), Some("application/problem+json"));

    let (status, body) = agentd.post("/v1/sessions", &json!({"manual_agent": {"id": "x"}})).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");
    assert!(body["detail"].as_str().unwrap().contains("version"), "names the missing field: {body}");
    let (status, body) = agentd.post("/v1/sessions", &json!({})).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");

    let mut relative = session_body(&[]);
    relative["manual_agent"]["distribution"]["binary"]["executable"] = json!("echo-agent");
    let (status, body) = agentd.post("/v1/sessions", &relative).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_request");

    for (status, body) in [
        agentd.get("/v1/sessions/ses_nope").await,
        agentd.prompt("ses_nope", "hi").await,
        agentd.post("/v1/sessions/ses_nope:cancel", &json!({})).await,
        agentd.get("/v1/sessions/ses_nope/events").await,
        agentd.delete("/v1/sessions/ses_nope").await,
    ] {
        assert_problem(status, &body, StatusCode::NOT_FOUND, "session_not_found");
    }
    for (status, body) in [agentd.get("/v1/containers/ctr_nope").await, agentd.delete("/v1/containers/ctr_nope").await] {
        assert_problem(status, &body, StatusCode::NOT_FOUND, "container_not_found");
    }
    let (status, body) = agentd.post("/v1/sessions/ses_nope:explode", &json!({})).await;
    assert_problem(status, &body, StatusCode::NOT_FOUND, "unknown_action");

    let session = agentd.create_session(&[]).await;
    let id = session["id"].as_str().unwrap();
    let (status, body) = agentd.post(&format!("/v1/sessions/{id}:prompt"), &json!({"prompt": 42})).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "invalid_prompt");
    let (status, _, body) = agentd
        .send(agentd.http.post(agentd.url(&format!("/v1/sessions/{id}:prompt"))).body("not json"))
        .await;
    assert_problem(status, &body, StatusCode::BAD_REQUEST, "invalid_json");

    let container = session["container_id"].as_str().unwrap();
    let (status, _) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = agentd.delete(&format!("/v1/containers/{container}")).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "deleting a deleted container is done already: {body}");
    let (status, body) = agentd.prompt(id, "hello?").await;
    assert_problem(status, &body, StatusCode::CONFLICT, "illegal_state");
    assert!(body["detail"].as_str().unwrap().contains("closed"), "names the state: {body}");
    // Its (empty) history was archived: the stream replays it and ends.
    let mut events = agentd.events(id, None).await;
    assert!(events.next().await.is_none(), "a session without turns has no events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_cannot_start_leave_nothing_behind() {
    let agentd = Agentd::start_with(&[("AGENTD_INITIALIZE_TIMEOUT_MS", "1500")]).await;

    let mut missing = session_body(&[]);
    missing["manual_agent"]["distribution"]["binary"]["executable"] = json!("/nonexistent/echo-agent");
    let (status, body) = agentd.post("/v1/sessions", &missing).await;
    assert_problem(status, &body, StatusCode::UNPROCESSABLE_ENTITY, "agent_executable_not_found");
    assert!(body["detail"].as_str().unwrap().contains("/nonexistent/echo-agent"));

    for (mode, says) in [
        ("garbage", "not JSON-RPC"),
        ("exit", "exit code 3"),
        ("error", "answered with error"),
        ("hang", "did not answer initialize"),
    ] {
        let (status, body) = agentd.post("/v1/sessions", &session_body(&["--fail-initialize", mode])).await;
        assert_problem(status, &body, StatusCode::BAD_GATEWAY, "agent_init_failed");
        assert!(body["detail"].as_str().unwrap().contains(says), "{mode}: {body}");
    }

    assert!(agentd.sandbox_dirs().is_empty(), "failed creates left sandboxes: {:?}", agentd.sandbox_dirs());
    wait_no_sandbox_cgroups(&agentd.subtree).await;
    // The missing executable was refused before any row was written (the
    // node checks plans first); the others failed in their sandbox.
    let (_, list) = agentd.get("/v1/sessions").await;
    let sessions = list["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 4, "{list}");
    for s in sessions {
        assert_eq!(s["state"], "failed", "{s}");
        let (_, c) = agentd.get(&format!("/v1/containers/{}", s["container_id"].as_str().unwrap())).await;
        assert_eq!(c["state"], "deleted", "{c}");
    }
}
