//! Follows each live session's event log on its node and records how each run
//! ends. The run's end in the store is derived from the log, which is the
//! one place a turn's end is written.

use std::time::Duration;

use agentd_proto::node::session_event::Event;
use agentd_proto::node::{SessionEvent, StreamEventsRequest};
use futures::StreamExt;

use crate::AppState;
use crate::store::StoreError;

const RETRY: Duration = Duration::from_millis(500);

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
        let request = StreamEventsRequest { session_id: session_id.to_string(), after_seq };
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
                match record(app, &event).await {
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

async fn record(app: &AppState, event: &SessionEvent) -> Result<(), StoreError> {
    match &event.event {
        Some(Event::RunCompleted(c)) => app.store.run_completed(&event.run_id, &c.stop_reason).await,
        Some(Event::RunFailed(f)) => app.store.run_failed(&event.run_id, if f.error.is_empty() { "run failed" } else { &f.error }).await,
        _ => Ok(()),
    }
}
