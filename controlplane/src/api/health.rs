//! What operators and their probes read: `/healthz` (the process answers),
//! `/readyz` (it can serve: the store answers and a node is alive) and
//! `/metrics` (Prometheus, [`crate::metrics`]).

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Problem;
use crate::AppState;

pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 once the store answers and at least one node is alive; else 503
/// with a problem saying which.
pub async fn readyz(State(app): State<AppState>) -> Result<&'static str, Problem> {
    let unready = |code, detail: String| Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail);
    match app.store.alive_nodes().await {
        Ok(0) => Err(unready("no_node_alive", "no node is alive: nothing can be scheduled".into())),
        Ok(_) => Ok("ok"),
        Err(e) => Err(unready("store_unavailable", format!("the store does not answer: {e}"))),
    }
}

/// The registry, its store gauges read now. A store that does not answer
/// leaves those at their last reading and says so in `agentd_store_up`;
/// the process's own counters are served either way.
pub async fn metrics(State(app): State<AppState>) -> Response {
    let metrics = app.store.metrics();
    match app.store.gauges().await {
        Ok(gauges) => metrics.set_store_gauges(&gauges),
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read the store's gauges");
            metrics.store_unreachable();
        }
    }
    let mut response = metrics.encode().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
    response
}

/// The router of `--metrics-listen`: metrics and probes, open to whoever
/// reaches that address.
pub fn open_router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(healthz))
        .route("/readyz", axum::routing::get(readyz))
        .fallback(|| async { Problem::not_found("not_found", "this address serves /metrics, /healthz and /readyz") })
        .with_state(state)
}

#[cfg(test)]
mod tests {
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
}
