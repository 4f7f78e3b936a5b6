//! Containers as the original agentd had them: made on their own with a
//! profile and a capacity of sessions, whose sessions' agents bring their
//! files; listings filtered and paged; a run cancelled by id; and the
//! original's smoke-test requests as written.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, said, session_body};

/// A session body that opens in `container_id`.
fn in_container(container_id: &str) -> Value {
    let mut body = session_body(&["--delay-ms", "5"]);
    body.as_object_mut().unwrap().remove("container_profile");
    body["container_id"] = json!(container_id);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_made_on_its_own_holds_its_capacity_of_sessions() {
    let agentd = Agentd::start().await;
    // The original agentd's smoke test, as written.
    let (status, c) = agentd.post("/v1/containers", &json!({"profile": {"node_id": "node-1"}, "capacity": 2, "labels": {"team": "a"}})).await;
    assert_eq!(status, StatusCode::CREATED, "{c}");
    assert_eq!((c["state"].as_str(), c["node_id"].as_str(), c["capacity"].as_i64()), (Some("ready"), Some("node-1"), Some(2)), "{c}");
    assert_eq!(c["labels"], json!({"team": "a"}));
    assert!(c["supervisor_pid"].as_i64().is_some(), "a real sandbox: {c}");
    let ctr = c["id"].as_str().unwrap().to_string();

    // Its sessions' agent was never among its mounts: its file is delivered.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (status, s) = agentd.post("/v1/sessions", &in_container(&ctr)).await;
        assert_eq!(status, StatusCode::CREATED, "{s}");
        ids.push(s["id"].as_str().unwrap().to_string());
    }
    let (status, refused) = agentd.post("/v1/sessions", &in_container(&ctr)).await;
    assert_eq!((status, refused["code"].as_str()), (StatusCode::CONFLICT, Some("container_full")), "{refused}");
    let mut events = agentd.events(&ids[0], None).await;
    let (status, run) = agentd.prompt(&ids[0], "delivered and running").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{run}");
    assert_eq!(said(&events.until_run_end().await), "delivered and running");
    let run_id = run["run_id"].as_str().unwrap();
    let (status, r) = agentd.get(&format!("/v1/runs/{run_id}")).await;
    assert_eq!((status, r["state"].as_str(), r["session_id"].as_str()), (StatusCode::OK, Some("completed"), Some(ids[0].as_str())), "{r}");
    let (status, r) = agentd.get("/v1/runs/run_nope").await;
    assert_eq!((status, r["code"].as_str()), (StatusCode::NOT_FOUND, Some("run_not_found")));

    // A cancel naming a run that is not the active one is refused.
    let (status, body) = agentd.post(&format!("/v1/sessions/{}:cancel", ids[1]), &json!({"run_id": run_id})).await;
    assert_eq!((status, body["code"].as_str()), (StatusCode::CONFLICT, Some("run_not_active")), "{body}");

    // Closing one frees a place.
    let (status, _) = agentd.delete(&format!("/v1/sessions/{}", ids[1])).await;
    assert!(status.is_success());
    let (status, s) = agentd.post("/v1/sessions", &in_container(&ctr)).await;
    assert_eq!(status, StatusCode::CREATED, "{s}");

    // Bad requests make nothing.
    for (body, code) in [
        (json!({"profile": {"node_id": "node-9"}}), "unknown_node"),
        (json!({"profile": {}, "capacity": 0}), "invalid_request"),
        (json!({"profile": {}, "container_profile": {}}), "invalid_request"),
        (json!({"profile": {"memory": "1K"}}), "invalid_profile"),
        (json!({"labels": {"bad key": "x"}}), "invalid_labels"),
    ] {
        let (status, p) = agentd.post("/v1/containers", &body).await;
        assert_eq!((status, p["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some(code)), "{body}: {p}");
    }
    let (_, all) = agentd.get("/v1/containers").await;
    assert_eq!(all["containers"].as_array().unwrap().len(), 1, "nothing was made by the refusals: {all}");
    let (status, _) = agentd.delete(&format!("/v1/containers/{ctr}")).await;
    assert!(status.is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_filter_by_state_and_labels_and_page_by_cursor() {
    let agentd = Agentd::start().await;
    for team in ["a", "a", "b"] {
        let mut body = session_body(&[]);
        body["labels"] = json!({"team": team});
        // The original agentd's session: pinned to its node, working in ".".
        body["container_profile"] = json!({"node_id": "node-1"});
        body["session"] = json!({"working_dir": "."});
        let (status, s) = agentd.post("/v1/sessions", &body).await;
        assert_eq!(status, StatusCode::CREATED, "{s}");
    }
    let (_, a) = agentd.get("/v1/sessions?label=team=a").await;
    assert_eq!(a["sessions"].as_array().unwrap().len(), 2, "{a}");
    assert!(a["sessions"].as_array().unwrap().iter().all(|s| s["labels"]["team"] == "a" && s["working_dir"] == "/workspace"));
    let (_, ready) = agentd.get("/v1/sessions?state=ready&label=team=b").await;
    assert_eq!(ready["sessions"].as_array().unwrap().len(), 1, "{ready}");
    let (_, none) = agentd.get("/v1/sessions?state=closed").await;
    assert!(none["sessions"].as_array().unwrap().is_empty());

    // Pages of one cover all three, newest first, once each.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let path = match &cursor {
            Some(c) => format!("/v1/sessions?limit=1&cursor={c}"),
            None => "/v1/sessions?limit=1".to_string(),
        };
        let (status, page) = agentd.get(&path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(page["sessions"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!((seen.len(), unique.len()), (3, 3), "{seen:?}");
    let (_, page) = agentd.get("/v1/sessions?limit=1").await;
    let sessions_cursor = page["next_cursor"].as_str().unwrap().to_string();
    for bad in ["garbage!".to_string(), sessions_cursor] {
        let (status, p) = agentd.get(&format!("/v1/containers?cursor={bad}")).await;
        assert_eq!((status, p["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_cursor")), "{bad}: {p}");
    }
    let (status, p) = agentd.get("/v1/sessions?limit=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{p}");
    let (_, on_node) = agentd.get("/v1/containers?node_id=node-1&state=ready").await;
    assert_eq!(on_node["containers"].as_array().unwrap().len(), 3, "{on_node}");
}
