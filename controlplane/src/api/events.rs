//! `GET /v1/sessions/{id}/events`: the session's event log as SSE, with
//! per-session monotonic ids and `Last-Event-ID` resume; a closed session's
//! archived log ([`crate::flows::archive`]) is replayed and the stream ends.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use super::Problem;
use crate::AppState;
use crate::flows::archive::ArchivedEvent;
use crate::store::states::session;
use agentd_proto::node::StreamEventsRequest;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Resume after this event id, for clients that cannot set Last-Event-ID.
    #[serde(default)]
    pub after: Option<u64>,
}

fn resume_point(headers: &HeaderMap, query: &EventsQuery) -> Result<u64, Problem> {
    match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Problem::new(axum::http::StatusCode::BAD_REQUEST, "invalid_request", "Last-Event-ID must be an event id")),
        None => Ok(query.after.unwrap_or(0)),
    }
}

pub async fn stream(
    State(app): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let after_seq = resume_point(&headers, &query)?;
    let s = app.store.get_session(&id).await?;
    if s.state != session::READY {
        // A closed session's history, if it was archived: replayed, then the stream ends.
        if let Some(archive) = app.store.get_session_archive(&id).await? {
            let events: Vec<Result<Event, Infallible>> = archive
                .events
                .lines()
                .filter_map(|line| serde_json::from_str::<ArchivedEvent>(line).ok())
                .filter(|e| e.seq > after_seq)
                .map(|e| Ok(sse_event(e.seq, e.kind, e.data.get().to_string())))
                .collect();
            return Ok(Sse::new(futures::stream::iter(events)).into_response());
        }
        return Err(Problem::new(axum::http::StatusCode::GONE, "session_closed", format!("session {id} is {}; its events are gone", s.state)));
    }
    let events = app.node.clone().stream_events(StreamEventsRequest { session_id: id, after_seq }).await?.into_inner();
    let events = events
        .take_while(|item| std::future::ready(item.is_ok()))
        .filter_map(|item| async move { item.ok() })
        .filter_map(|e| async move { agentd_proto::events::wire(&e).map(|(kind, data)| Ok::<_, Infallible>(sse_event(e.seq, kind.to_string(), data))) })
        .take_until(app.shutdown.clone().cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)).into_response())
}

fn sse_event(seq: u64, kind: String, data: String) -> Event {
    // Agents' JSON arrives on one line; a stray CR would break SSE framing.
    let data = if data.contains('\r') { data.replace('\r', " ") } else { data };
    Event::default().id(seq.to_string()).event(kind).data(data)
}
