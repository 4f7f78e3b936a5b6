//! Follows each live session's event log on its node and records how each run
//! ends. The run's end in the store is derived from the log, which is the
//! one place a turn's end is written.

use std::time::Duration;

use agentd_proto::node::StreamEventsRequest;
use futures::StreamExt;
use serde::Deserialize;

use crate::AppState;
use crate::store::StoreError;

const RETRY: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
struct RunEnd {
    run_id: String,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// Starts following `session_id` until its log closes or agentd shuts down.
pub fn watch_session(app: AppState, session_id: String) {
    tokio::spawn(async move {
        let shutdown = app.shutdown.clone();
        tokio::select! {
            _ = follow(&app, &session_id) => {}
            _ = shutdown.cancelled() => {}
        }
    });
}

async fn follow(app: &AppState, session_id: &str) {
    let mut after_seq = 0;
    loop {
        let kinds = vec!["run.completed".to_string(), "run.failed".to_string()];
        let request = StreamEventsRequest { session_id: session_id.to_string(), after_seq, kinds };
        let mut events = match app.node.clone().stream_events(request).await {
            Ok(events) => events.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return,
            Err(status) => {
                tracing::warn!(session_id, error = %status, "cannot follow session events; retrying");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        while let Some(item) = events.next().await {
            let Ok(event) = item else { break };
            // The log is the only place a turn's end is written: an end not
            // recorded because the store is down is retried until it is
            // back, or the run would stay running for good.
            loop {
                match record(app, &event.kind, &event.data_json).await {
                    Ok(()) => break,
                    Err(e @ StoreError::Db(_)) => {
                        tracing::warn!(session_id, seq = event.seq, error = %e, "cannot record run end; retrying");
                        tokio::time::sleep(RETRY).await;
                    }
                    Err(e) => {
                        tracing::warn!(session_id, seq = event.seq, error = %e, "cannot record run end");
                        break;
                    }
                }
            }
            after_seq = event.seq;
        }
        // A clean end means the log was closed: the session is over.
        if events.trailers().await.is_ok() {
            return;
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn record(app: &AppState, kind: &str, data: &str) -> Result<(), StoreError> {
    if kind != "run.completed" && kind != "run.failed" {
        return Ok(());
    }
    let Ok(end) = serde_json::from_str::<RunEnd>(data) else {
        tracing::warn!(kind, data, "malformed run end event");
        return Ok(());
    };
    match (kind, end.stop_reason, end.error) {
        ("run.completed", Some(reason), _) => app.store.run_completed(&end.run_id, &reason).await,
        (_, _, error) => app.store.run_failed(&end.run_id, error.as_deref().unwrap_or("run failed")).await,
    }
}
