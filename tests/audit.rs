//! The audit trail: every state-changing call is recorded with its caller,
//! the entity it touched and how it ended; reads are not.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{Agentd, session_body};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_calls_leave_audit_records() {
    let agentd = Agentd::start().await;
    let create = agentd.http.post(agentd.url("/v1/sessions")).header("X-Agentd-Actor", "ci@example").json(&session_body(&[]));
    let (status, _, session) = agentd.send(create).await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let id = session["id"].as_str().unwrap().to_string();
    let mut events = agentd.events(&id, None).await;
    let (status, _) = agentd.prompt(&id, "hello").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    events.until_run_end().await;
    agentd.get(&format!("/v1/sessions/{id}")).await;
    let (status, _) = agentd.post("/v1/sessions/ses_nope:prompt", &json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = agentd.delete(&format!("/v1/sessions/{id}")).await;
    assert!(status.is_success(), "{status}");

    // Written off the request path, in batches: wait for the last one.
    let page = agentd.wait_for("/v1/audit", |b| b["records"].as_array().is_some_and(|r| r.len() >= 4)).await;
    let records = page["records"].as_array().unwrap();
    let summary: Vec<(String, String, u64, Value)> = records
        .iter()
        .map(|r| (r["method"].as_str().unwrap().into(), r["path"].as_str().unwrap().into(), r["status"].as_u64().unwrap(), r["code"].clone()))
        .collect();
    assert_eq!(
        summary,
        [
            ("POST".into(), "/v1/sessions".into(), 201, Value::Null),
            ("POST".into(), format!("/v1/sessions/{id}:prompt"), 202, Value::Null),
            ("POST".into(), "/v1/sessions/ses_nope:prompt".into(), 404, json!("session_not_found")),
            ("DELETE".into(), format!("/v1/sessions/{id}"), records[3]["status"].as_u64().unwrap(), Value::Null),
        ],
        "only the four state-changing calls, in order: {page}"
    );
    // The create names the session it made (from its Location) and its caller.
    assert_eq!((&records[0]["entity_kind"], &records[0]["entity_id"]), (&json!("session"), &json!(id)));
    assert_eq!(records[0]["actor"], "ci@example");
    assert!(records[0]["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{}", records[0]);
    assert!(records.iter().all(|r| r["duration_us"].as_u64().is_some() && r["at"].as_i64().is_some()));

    // One entity's records, and paging by cursor.
    let (_, mine) = agentd.get(&format!("/v1/audit?entity_kind=session&entity_id={id}")).await;
    assert_eq!(mine["records"].as_array().unwrap().len(), 3);
    let first = records[0]["id"].as_i64().unwrap();
    let (_, rest) = agentd.get(&format!("/v1/audit?after={first}&limit=2")).await;
    let rest_ids: Vec<i64> = rest["records"].as_array().unwrap().iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert_eq!(rest_ids, [records[1]["id"].as_i64().unwrap(), records[2]["id"].as_i64().unwrap()]);
    assert_eq!(rest["next_after"], records[2]["id"]);

    let (status, problem) = agentd.get("/v1/audit?limit=0").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")));
    let (status, problem) = agentd.get("/v1/audit?entity_kind=session").await;
    assert_eq!((status, problem["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_request")));
}
