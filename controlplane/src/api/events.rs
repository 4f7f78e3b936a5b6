//! `GET /v1/sessions/{id}/events`: the session's event log as SSE, with
//! per-session monotonic ids and `Last-Event-ID` resume; a closed session's
//! archived log ([`crate::flows::archive`]) is replayed and the stream ends.
//! Keep-alives, the `retry:` hint and the cut-off of a subscriber that falls
//! behind: [`super::sse`].

use crate::domain::Code;
use std::time::Duration;

use super::{ApiPath as Path, ApiQuery as Query};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::response::sse::Event;
use futures::StreamExt;
use serde::Deserialize;

use super::Problem;
use super::sse::{self, Item};
use crate::AppState;
use crate::flows::archive::ArchivedEvent;
use crate::store::states::session;
use agentd_proto::node::StreamEventsRequest;
use crate::fleet::nodes::NodeClient;
use agentd_proto::node::session_event::Event as SessionEventKind;

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
            .ok_or_else(|| Problem::new(axum::http::StatusCode::BAD_REQUEST, Code::InvalidRequest, "Last-Event-ID must be an event id")),
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
    if s.state == session::CREATING {
        let events = setup_then_follow(app.clone(), id, after_seq).take_until(app.shutdown.clone().cancelled_owned());
        return Ok(sse::respond(app.store.metrics(), app.sse, events, true));
    }
    if s.state != session::READY {
        // A closed session's history, if it was archived: replayed, then the stream ends.
        if let Some(archive) = app.store.get_session_archive(&id).await? {
            let events: Vec<Item> = archive
                .events
                .lines()
                .filter_map(|line| serde_json::from_str::<ArchivedEvent>(line).ok())
                .filter(|e| e.seq > after_seq)
                .map(|e| sse_event(e.seq, e.kind, e.data.get().to_string()))
                .collect();
            return Ok(sse::respond(app.store.metrics(), app.sse, futures::stream::iter(events), false));
        }
        return Err(Problem::new(axum::http::StatusCode::GONE, Code::SessionClosed, format!("session {id} is {}; its events are gone", s.state)));
    }
    let (_, node) = app.nodes.of_container(&s.container_id).await?;
    let first = match node.clone().stream_events(StreamEventsRequest { session_id: id.clone(), after_seq }).await {
        Ok(events) => Some(events.into_inner()),
        Err(status) if status.code() == tonic::Code::NotFound => return Err(status.into()),
        // The node does not answer: the stream waits for it, or for its loss.
        Err(_) => None,
    };
    let events = follow(app.store.clone(), node, id, after_seq, first).take_until(app.shutdown.clone().cancelled_owned());
    Ok(sse::respond(app.store.metrics(), app.sse, events, true))
}

/// How often a stream of a session being created looks at how far it got.
const SETUP_POLL: Duration = Duration::from_millis(250);

/// The longest a stream waits for its session's creation (its steps give up
/// well before: an agent's install and start are bounded by the runner).
const SETUP_WAIT: Duration = Duration::from_secs(30 * 60);

/// A session's stream opened while it is being created: each stage of its
/// setup as it changes (`session.setup`, without an id: they are not part of
/// its log), then its events as [`follow`] serves them once it is ready, or
/// `session.failed` (its code and error) if its creation failed.
fn setup_then_follow(app: AppState, id: String, after_seq: u64) -> impl futures::Stream<Item = Item> + Send + 'static {
    async_stream::stream! {
        let deadline = tokio::time::Instant::now() + SETUP_WAIT;
        let mut last_stage = serde_json::Value::Null;
        let container_id = loop {
            let s = match app.store.get_session(&id).await {
                Ok(s) => s,
                Err(crate::store::StoreError::NotFound { .. }) => return,
                Err(_) => {
                    tokio::time::sleep(NODE_RETRY).await;
                    continue;
                }
            };
            if s.state == session::READY {
                break s.container_id;
            }
            if s.state != session::CREATING {
                let data = serde_json::json!({"state": s.state, "code": s.error_code, "error": s.error});
                yield (None, Event::default().event(agentd_proto::events::SESSION_FAILED).data(data.to_string()));
                return;
            }
            let stage = super::sessions::setup_stage(&app, &s).await;
            if !stage.is_null() && stage != last_stage {
                yield (None, Event::default().event(agentd_proto::events::SESSION_SETUP).data(stage.to_string()));
                last_stage = stage;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(session_id = id, "the session is still being created; its stream ends");
                return;
            }
            tokio::time::sleep(SETUP_POLL).await;
        };
        let Ok((_, node)) = app.nodes.of_container(&container_id).await else { return };
        let first = node.clone().stream_events(StreamEventsRequest { session_id: id.clone(), after_seq }).await.ok().map(|s| s.into_inner());
        let mut events = std::pin::pin!(follow(app.store.clone(), node, id, after_seq, first));
        while let Some(event) = events.next().await {
            yield event;
        }
    }
}

/// How often a stream whose node went away looks for it, and at the store.
const NODE_RETRY: Duration = Duration::from_millis(500);

/// How long a stream whose node no longer has the session's log, a turn
/// still open, waits for the store to record why before it ends anyway.
const GONE_WAIT: Duration = Duration::from_secs(30);

/// The session's events from its node, from `after_seq` on. A node that
/// goes away is waited for: the stream resumes where it was when the node
/// answers again, or ends with the failure of the turn that was running
/// (its code, `node_lost`, says why) once the store gives the node up. A
/// node that answers without the session's log while a turn was open (a
/// restarted node, whose sandboxes are gone; a sandbox deleted mid-turn)
/// is not asked again: the store hears why from the node's journal, and
/// the stream ends with the turn's failure (`sandbox_lost`) once it has.
fn follow(
    store: crate::store::Store,
    node: NodeClient,
    session_id: String,
    after_seq: u64,
    first: Option<tonic::Streaming<agentd_proto::node::SessionEvent>>,
) -> impl futures::Stream<Item = Item> + Send + 'static {
    async_stream::stream! {
        let mut after = after_seq;
        // The run whose first event after run.started is still to come.
        let mut awaiting_first: Option<String> = None;
        let mut open_run: Option<String> = None;
        let mut events = first;
        // Since when the node has had no log of the session, a turn open.
        let mut gone_since: Option<tokio::time::Instant> = None;
        loop {
            if let Some(mut stream) = events.take() {
                loop {
                    match stream.message().await {
                        Ok(Some(e)) => {
                            after = e.seq;
                            match &e.event {
                                Some(SessionEventKind::RunStarted(_)) => {
                                    open_run = Some(e.run_id.clone());
                                    awaiting_first = Some(e.run_id.clone());
                                }
                                Some(end) if agentd_proto::events::is_run_end(end) => {
                                    wait_recorded(&store, &e.run_id).await;
                                    open_run = None;
                                }
                                _ => {}
                            }
                            if let Some((kind, data)) = agentd_proto::events::wire(&e) {
                                yield sse_event(e.seq, kind.to_string(), data);
                            }
                            if !matches!(e.event, Some(SessionEventKind::RunStarted(_)))
                                && awaiting_first.as_deref() == Some(e.run_id.as_str())
                            {
                                awaiting_first = None;
                                first_event_seen(&store, &e.run_id, e.ts_ms).await;
                            }
                        }
                        // The log was closed: the session is over, unless a
                        // turn was still open (its end is the store's to say).
                        Ok(None) if open_run.is_none() => return,
                        Ok(None) => {
                            gone_since.get_or_insert_with(tokio::time::Instant::now);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            // Has the store given the session up, or (the node having no
            // log of it) recorded the open turn's end?
            let given_up = matches!(store.get_session(&session_id).await, Ok(s) if s.state != session::READY);
            let open = match &open_run {
                Some(run_id) => store.get_run(run_id).await.ok(),
                None => None,
            };
            let run_over = gone_since.is_some() && open.as_ref().is_some_and(|r| !crate::store::states::run::ACTIVE.contains(&r.state.as_str()));
            if given_up || run_over {
                if let (Some(run_id), Some(r)) = (open_run.take(), open)
                    && r.state == crate::store::states::run::FAILED
                {
                    let end = agentd_proto::node::session_event::Event::RunFailed(agentd_proto::node::RunFailed {
                        error: r.error.unwrap_or_default(),
                        code: r.error_code.unwrap_or_default(),
                    });
                    yield sse_event(after + 1, agentd_proto::events::kind(&end).to_string(), agentd_proto::events::data_json(&run_id, &end));
                }
                return;
            }
            tokio::time::sleep(NODE_RETRY).await;
            if let Some(since) = gone_since {
                if since.elapsed() >= GONE_WAIT {
                    tracing::warn!(session_id, run_id = open_run.as_deref(), "the node has no log of the session and the store no end of its turn; the stream ends");
                    return;
                }
                continue;
            }
            match node.clone().stream_events(StreamEventsRequest { session_id: session_id.clone(), after_seq: after }).await {
                Ok(stream) => events = Some(stream.into_inner()),
                Err(status) if status.code() == tonic::Code::NotFound && open_run.is_none() => return,
                Err(status) if status.code() == tonic::Code::NotFound => gone_since = Some(tokio::time::Instant::now()),
                Err(_) => {}
            }
        }
    }
}

/// The longest a run's end waits on the stream for the store to record it.
const RECORD_WAIT: Duration = Duration::from_secs(5);

/// Holds a run's end back until the store has recorded it (from the node's
/// journal, by whichever control plane watches the node), so that a client
/// that prompts again on seeing the end finds the session free. Bounded: a
/// store that is down delays the event, never loses it.
async fn wait_recorded(store: &crate::store::Store, run_id: &str) {
    let deadline = tokio::time::Instant::now() + RECORD_WAIT;
    let mut ended = store.runs_ended();
    loop {
        ended.borrow_and_update();
        match store.get_run(run_id).await {
            Ok(r) if !crate::store::states::run::ACTIVE.contains(&r.state.as_str()) => return,
            Err(crate::store::StoreError::NotFound { .. }) => return,
            _ => {}
        }
        tokio::select! {
            _ = ended.changed() => {}
            // Another control plane's recording is seen at the next look.
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

fn sse_event(seq: u64, kind: String, data: String) -> Item {
    // Agents' JSON arrives on one line; a stray CR would break SSE framing.
    let data = if data.contains('\r') { data.replace('\r', " ") } else { data };
    (Some(seq), Event::default().id(seq.to_string()).event(kind).data(data))
}

/// A stream saw the first event of `run_id` after its `run.started`, one
/// the node appended at `at_ms`: `agentd_prompt_first_event_seconds` gets
/// the time from the prompt (the run's creation) to it, once per run (the
/// first stream to see it). An event appended long ago is a replay of
/// history, measured when it was live (or by a process since gone).
async fn first_event_seen(store: &crate::store::Store, run_id: &str, at_ms: i64) {
    if crate::store::now_ms().saturating_sub(at_ms) > REPLAY_AGE_MS || !store.metrics().claim_first_event(run_id) {
        return;
    }
    if let Ok(run) = store.get_run(run_id).await {
        let waited = at_ms.saturating_sub(run.created_at).max(0);
        store.metrics().first_event(Duration::from_millis(waited as u64));
    }
}

/// An event older than this when a stream reads it is history, not news.
const REPLAY_AGE_MS: i64 = 60_000;
