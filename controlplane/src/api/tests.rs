//! The API's probes, metrics and request ids through the whole router
//! (health.rs, telemetry.rs), on an SQLite store without nodes.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use crate::store::nodes::NodeRegistration;

async fn call(app: &crate::AppState, request: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let response = crate::app(app.clone()).oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    (parts.status, parts.headers, axum::body::to_bytes(body, 1 << 20).await.unwrap().to_vec())
}

fn get(path: &str) -> Request<Body> {
    Request::get(path).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn readyz_wants_a_live_node_and_says_why_not() {
    let (_dir, store) = crate::store::conformance::sqlite().await;
    let app = crate::outage_tests::state(&store);
    let (status, headers, body) = call(&app, get("/readyz")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["content-type"], "application/problem+json");
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["code"], "no_node_alive", "{problem}");

    store.register_node(&NodeRegistration { id: "node-1".into(), address: "unix:/nowhere".into(), ..Default::default() }).await.unwrap();
    let (status, _, body) = call(&app, get("/readyz")).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    store.close().await;
}

#[tokio::test]
async fn request_ids_are_taken_or_made_echoed_and_named_in_problems() {
    let (_dir, store) = crate::store::conformance::sqlite().await;
    let app = crate::outage_tests::state(&store);
    let given = Request::get("/v1/sessions/ses_nope").header("x-request-id", "req-abc.123").body(Body::empty()).unwrap();
    let (status, headers, body) = call(&app, given).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(headers["x-request-id"], "req-abc.123");
    let problem: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(problem["instance"], "urn:agentd:request:req-abc.123", "{problem}");

    // Unusable (a space) or absent: a new id, a UUID.
    for request in [Request::get("/v1/sessions/ses_nope").header("x-request-id", "a b").body(Body::empty()).unwrap(), get("/v1/sessions/ses_nope")] {
        let (_, headers, body) = call(&app, request).await;
        let id = headers["x-request-id"].to_str().unwrap().to_string();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        let problem: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(problem["instance"], format!("urn:agentd:request:{id}"));
    }
    store.close().await;
}

#[tokio::test]
async fn metrics_count_requests_by_route_template_and_read_the_store() {
    let (_dir, store) = crate::store::conformance::sqlite().await;
    let app = crate::outage_tests::state(&store);
    store.insert_container("ctr_1", "node-1", "{}").await.unwrap();
    for id in ["ses_a", "ses_b"] {
        call(&app, get(&format!("/v1/sessions/{id}"))).await;
    }
    call(&app, Request::post("/v1/sessions/ses_a:frobnicate").body(Body::empty()).unwrap()).await;
    let (status, headers, body) = call(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], crate::metrics::CONTENT_TYPE);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains(r#"agentd_http_requests_total{method="GET",route="/v1/sessions/{id}",status="404"} 2"#), "{text}");
    assert!(text.contains(r#"route="/v1/sessions/{id}:other""#), "an unknown verb is not a label value of its own: {text}");
    assert!(!text.contains("ses_a"), "never a raw path: {text}");
    assert!(text.contains(r#"agentd_containers{state="provisioning"} 1"#), "{text}");
    assert!(text.contains("agentd_store_up 1"), "{text}");
    store.close().await;
}
