//! What operators and their probes read: `/healthz` (the process answers),
//! `/readyz` (it can serve: the store answers and a node is alive) and
//! `/metrics` (Prometheus, [`crate::metrics`]).

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::Problem;
use crate::AppState;
use crate::domain::Code;

pub async fn healthz() -> &'static str {
    "ok"
}

/// 200 once the store answers and at least one node is alive; else 503
/// with a problem saying which.
pub async fn readyz(State(app): State<AppState>) -> Result<&'static str, Problem> {
    let unready = |code, detail: String| Problem::new(StatusCode::SERVICE_UNAVAILABLE, code, detail);
    match app.store.alive_nodes().await {
        Ok(0) => Err(unready(Code::NoNodeAlive, "no node is alive: nothing can be scheduled".into())),
        Ok(_) => Ok("ok"),
        Err(e) => Err(unready(Code::StoreUnavailable, format!("the store does not answer: {e}"))),
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
        .fallback(|| async { Problem::not_found(Code::NotFound, "this address serves /metrics, /healthz and /readyz") })
        .with_state(state)
}

