//! Middleware around every request: its id, its trace, its span, its
//! metrics.
//!
//! - `X-Request-Id`: the caller's if it is usable (1 to 128 visible ASCII
//!   characters), else a new UUIDv7; echoed on the response and named in
//!   every problem's `instance` (`urn:agentd:request:<id>`).
//! - W3C `traceparent`: the caller's trace, or a new one; node calls made
//!   for the request carry it on ([`agentd_proto::trace`]).
//! - A `request` span with both ids, the method and the route template: every
//!   log line of the request shows them.
//! - `agentd_http_requests_total` and `agentd_http_request_duration_seconds`
//!   by route template, never by raw path.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use agentd_proto::trace::TraceContext;

use crate::AppState;

pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The longest request id taken from a caller.
const MAX_REQUEST_ID: usize = 128;

/// The `:verb`s of the routes that have them: the route label names the
/// verb only when it is one of these, so callers cannot mint series.
const VERBS: &[&str] = &["prompt", "cancel", "set_mode", "set_config_option", "hibernate", "resume", "cordon", "uncordon", "drain"];

tokio::task_local! {
    static REQUEST_ID: Arc<str>;
}

/// The id of the request the running task serves, if any.
pub fn current_request_id() -> Option<Arc<str>> {
    REQUEST_ID.try_with(Arc::clone).ok()
}

/// A caller's request id, if it is one to keep: it goes into logs and
/// headers as it is, so only visible ASCII, and not too long.
fn usable(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let ok = (1..=MAX_REQUEST_ID).contains(&bytes.len()) && bytes.iter().all(|b| (0x21..=0x7e).contains(b));
    ok.then(|| value.to_str().ok()).flatten()
}

/// The route a request matched, as a label: its template, with a known
/// `:verb` of a `{id}:verb` path.
fn route_of(request: &Request) -> String {
    let Some(template) = request.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()) else {
        return "unmatched".into();
    };
    if template.ends_with('}')
        && let Some((_, verb)) = request.uri().path().rsplit('/').next().unwrap_or("").rsplit_once(':')
    {
        let verb = if VERBS.contains(&verb) { verb } else { "other" };
        return format!("{template}:{verb}");
    }
    template
}

pub async fn observe(State(app): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id: Arc<str> = match request.headers().get(REQUEST_ID_HEADER).and_then(usable) {
        Some(given) => Arc::from(given),
        None => Arc::from(uuid::Uuid::now_v7().to_string()),
    };
    let trace = TraceContext::from_headers(request.headers()).map(|t| t.child()).unwrap_or_else(TraceContext::new_root);
    let method = request.method().clone();
    let route = route_of(&request);
    let span = tracing::info_span!("request", request_id = %id, trace_id = %trace.trace_id(), method = %method, route = %route);
    let handled = REQUEST_ID.scope(Arc::clone(&id), agentd_proto::trace::scope(Some(trace), next.run(request)));
    let mut response = handled.instrument(span.clone()).await;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    let took = started.elapsed();
    let status = response.status().as_u16();
    app.store.metrics().http_request(method.as_str(), &route, status, took);
    // Changes are few and worth a line each; reads (polls, scrapes) are many.
    let _entered = span.enter();
    if matches!(method, Method::GET | Method::HEAD) {
        tracing::debug!(status, ms = took.as_millis() as u64, "answered");
    } else {
        tracing::info!(status, ms = took.as_millis() as u64, "answered");
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_short_visible_ascii_ids_are_taken() {
        let take = |s: &[u8]| HeaderValue::from_bytes(s).ok().as_ref().and_then(usable).map(str::to_string);
        assert_eq!(take(b"abc-123_XYZ.:/="), Some("abc-123_XYZ.:/=".into()));
        assert_eq!(take(&[b'a'; 128]).map(|s| s.len()), Some(128));
        assert_eq!(take(&[b'a'; 129]), None, "too long");
        assert_eq!(take(b"has space"), None);
        assert_eq!(take(b"tab\there"), None);
        assert_eq!(take(&[0xc3, 0xa9]), None, "not ASCII");
        assert_eq!(take(b""), None);
    }
}
