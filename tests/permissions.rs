//! `session/request_permission` under each policy, answered over HTTP.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, Sse, SseEvent, said, session_body};

async fn session(agentd: &Agentd, policy: Value) -> (String, Sse) {
    let mut body = session_body(&[]);
    body["policy"] = policy;
    agentd.create_streaming(&body).await
}


fn resolved(events: &[SseEvent]) -> Value {
    events.iter().find(|e| e.event == "permission.resolved").map(|e| e.json()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_and_deny_policies_answer_without_asking() {
    let agentd = Agentd::start().await;
    for (policy, option) in [("allow", "allow"), ("deny", "reject")] {
        let (id, mut events) = session(&agentd, json!({"permissions": policy})).await;
        let (status, _) = agentd.prompt(&id, "/ask delete everything").await;
        assert_eq!(status, StatusCode::ACCEPTED);
        let got = events.until_run_end().await;
        assert!(got.iter().all(|e| e.event != "permission.requested"), "{policy}: nobody is asked");
        assert_eq!(said(&got), format!("permission: selected {option}"), "{policy}");
        assert_eq!(resolved(&got)["by"], "policy");
    }
    let mut body = session_body(&[]);
    body["policy"] = json!({"permissions": "sometimes"});
    let (status, problem) = agentd.post("/v1/sessions", &body).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_goes_out_on_the_stream_and_a_client_answers_over_http() {
    let agentd = Agentd::start().await;
    let (id, mut events) = session(&agentd, json!({"permissions": "ask"})).await;
    let (status, _) = agentd.prompt(&id, "/ask rm -rf /tmp/x").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let asked = loop {
        let e = events.next().await.expect("stream open");
        if e.event == "permission.requested" {
            break e.json();
        }
    };
    assert_eq!(asked["tool_call"]["title"], "rm -rf /tmp/x");
    let options: Vec<&str> = asked["options"].as_array().unwrap().iter().map(|o| o["optionId"].as_str().unwrap()).collect();
    assert_eq!(options, ["allow", "reject"]);
    let request_id = asked["request_id"].as_str().unwrap();
    let url = format!("/v1/sessions/{id}/permissions/{request_id}");

    let (status, problem) = agentd.post(&url, &json!({"option_id": "maybe"})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_option")), "{problem}");
    let (status, problem) = agentd.post(&url, &json!({})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")));
    let (status, _) = agentd.post(&url, &json!({"option_id": "allow"})).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let got = events.until_run_end().await;
    assert_eq!(said(&got), "permission: selected allow");
    assert_eq!(resolved(&got)["by"], "client");
    assert_eq!(got.last().unwrap().json()["stop_reason"], "end_turn");

    let (status, problem) = agentd.post(&url, &json!({"option_id": "allow"})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("permission_request_not_found")));
    let (status, problem) = agentd.post(&format!("/v1/sessions/{id}/permissions/perm_999"), &json!({"option_id": "allow"})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("permission_request_not_found")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_ask_times_out_to_deny_and_cancel_answers_cancelled() {
    let agentd = Agentd::start().await;
    let (id, mut events) = session(&agentd, json!({"permissions": "ask", "ask_timeout_ms": 300})).await;
    let (status, _) = agentd.prompt(&id, "/ask something").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = events.until_run_end().await;
    assert!(got.iter().any(|e| e.event == "permission.requested"));
    assert_eq!(said(&got), "permission: selected reject");
    assert_eq!(resolved(&got)["by"], "timeout");

    let (status, _) = agentd.prompt(&id, "/ask again").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    loop {
        if events.next().await.expect("stream open").event == "permission.requested" {
            break;
        }
    }
    let (status, _) = agentd.post(&format!("/v1/sessions/{id}:cancel"), &json!({})).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = events.until_run_end().await;
    assert_eq!(resolved(&got)["outcome"]["outcome"], "cancelled", "{got:?}");
    assert_eq!(got.last().unwrap().json()["stop_reason"], "cancelled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_the_agent_withdraws_is_answered_request_cancelled() {
    let agentd = Agentd::start().await;
    let (id, mut events) = session(&agentd, json!({"permissions": "ask"})).await;
    // The agent sends $/cancel_request for its permission request after 300 ms.
    let (status, _) = agentd.prompt(&id, "/ask --cancel-after 300 deploy").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let got = events.until_run_end().await;
    let asked = got.iter().find(|e| e.event == "permission.requested").expect("asked").json();
    assert_eq!(resolved(&got)["by"], "agent", "{got:?}");
    assert_eq!(said(&got), "error -32800: request cancelled", "the supervisor answered the cancelled request");
    assert_eq!(got.last().unwrap().json()["stop_reason"], "end_turn");
    let url = format!("/v1/sessions/{id}/permissions/{}", asked["request_id"].as_str().unwrap());
    let (status, problem) = agentd.post(&url, &json!({"option_id": "allow"})).await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::NOT_FOUND, Some("permission_request_not_found")));
}
