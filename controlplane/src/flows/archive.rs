//! Session archives: before a session closes or its sandbox is deleted, its
//! event log is copied from the node into the store, so that its history
//! outlives the sandbox: `GET /v1/sessions/{id}/events` of a closed session
//! replays the archive, then ends.
//!
//! Archiving is part of the close and delete steps but never blocks them:
//! a node that cannot give the log (gone, or too slow) costs the archive,
//! with a warning, not the delete. An archive over [`MAX_ARCHIVE_BYTES`]
//! keeps the newest events (`first_seq` says where it starts).

use std::collections::VecDeque;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use agentd_proto::node::{GetSessionRequest, SessionEvent, StreamEventsRequest};

use super::{deadline, within};
use crate::AppState;
use crate::store::states::session;

/// The most bytes of events one archive keeps.
pub const MAX_ARCHIVE_BYTES: usize = 64 << 20;

/// One archived event: a line of the archive.
#[derive(Debug, Serialize, Deserialize)]
pub struct ArchivedEvent {
    pub seq: u64,
    pub kind: String,
    pub run_id: String,
    pub ts_ms: i64,
    /// The event's data exactly as the node logged it.
    pub data: Box<RawValue>,
}

/// Archives every open session of `container_id` (its sandbox is about to
/// go). Failures are logged.
pub async fn archive_container(app: &AppState, container_id: &str) {
    let sessions = match app.store.sessions_of_container(container_id).await {
        Ok(sessions) => sessions,
        Err(e) => {
            tracing::warn!(container_id, error = %e, "cannot list sessions to archive");
            return;
        }
    };
    for s in sessions.iter().filter(|s| s.state == session::READY) {
        archive_or_warn(app, &s.id).await;
    }
}

/// Archives `session_id`, logging a failure.
pub async fn archive_or_warn(app: &AppState, session_id: &str) {
    match archive_session(app, session_id).await {
        Ok(Some(events)) => tracing::info!(session_id, events, "session archived"),
        Ok(None) => tracing::debug!(session_id, "the node no longer has this session's log; nothing to archive"),
        Err(why) => tracing::warn!(session_id, why, "session not archived; its events go with its sandbox"),
    }
}

/// Copies the session's log, up to the last event the node has recorded,
/// into the store. `None` when the node does not know the session.
pub async fn archive_session(app: &AppState, session_id: &str) -> Result<Option<usize>, String> {
    let request = GetSessionRequest { session_id: session_id.to_string(), with_agent: false };
    let s = app.store.get_session(session_id).await.map_err(|e| e.to_string())?;
    let (_, node) = app.nodes.of_container(&s.container_id).await.map_err(|e| format!("node: {}", e.message()))?;
    let last_seq = match within(deadline(app), node.clone().get_session(request)).await {
        Ok(answer) => answer.into_inner().last_seq,
        Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
        Err(status) => return Err(format!("node: {}", status.message())),
    };
    let mut lines: VecDeque<String> = VecDeque::new();
    let mut bytes = 0;
    if last_seq > 0 {
        let request = StreamEventsRequest { session_id: session_id.to_string(), after_seq: 0 };
        let collect = async {
            let mut events = node.clone().stream_events(request).await.map_err(|s| format!("node: {}", s.message()))?.into_inner();
            while let Some(event) = events.next().await {
                let event = event.map_err(|s| format!("node: {}", s.message()))?;
                let seq = event.seq;
                let line = line_of(event)?;
                bytes += line.len() + 1;
                lines.push_back(line);
                while bytes > MAX_ARCHIVE_BYTES {
                    let Some(dropped) = lines.pop_front() else { break };
                    bytes -= dropped.len() + 1;
                }
                if seq >= last_seq {
                    return Ok(());
                }
            }
            Err("the node's event stream ended early".to_string())
        };
        tokio::time::timeout(deadline(app), collect).await.map_err(|_| format!("the log was not read within {:?}", deadline(app)))??;
    }
    let first_seq = lines.front().and_then(|l| serde_json::from_str::<ArchivedEvent>(l).ok()).map_or(last_seq + 1, |e| e.seq);
    let count = lines.len();
    let mut text = String::with_capacity(bytes);
    for line in &lines {
        text.push_str(line);
        text.push('\n');
    }
    let (first, last) = (i64::try_from(first_seq).unwrap_or(i64::MAX), i64::try_from(last_seq).unwrap_or(i64::MAX));
    app.store.put_session_archive(session_id, &text, count as i64, first, last).await.map_err(|e| e.to_string())?;
    Ok(Some(count))
}

fn line_of(e: SessionEvent) -> Result<String, String> {
    let (kind, data) = agentd_proto::events::wire(&e).ok_or_else(|| format!("event {} has no kind", e.seq))?;
    let data = RawValue::from_string(data).map_err(|err| format!("event {} is not JSON: {err}", e.seq))?;
    let event = ArchivedEvent { seq: e.seq, kind: kind.to_string(), run_id: e.run_id, ts_ms: e.ts_ms, data };
    serde_json::to_string(&event).map_err(|err| err.to_string())
}
