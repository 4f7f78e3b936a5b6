//! The audit trail: every state-changing API call (any method but GET and
//! HEAD) leaves a record of who asked, what, when and how it ended, and
//! `GET /v1/audit` reads them back.
//!
//! Records are written off the request's path: the middleware hands each to
//! a writer task that inserts them in batches (one multi-row INSERT per
//! batch), so a prompt pays a channel send, not a database round trip. The
//! price is that records still queued when the process dies are lost; while
//! the store is down the writer keeps its batch and retries, and past
//! [`QUEUE`] queued records new ones are dropped with an error in the log.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Problem;
use super::problem::ProblemCode;
use crate::AppState;
use crate::store::audit::{AuditQuery, NewAuditRecord};
use crate::store::{Store, now_ms};

/// The header a caller names itself in (recorded as given: agentd has no
/// authentication of its own yet, so it is a claim, not an identity).
pub const ACTOR_HEADER: &str = "x-agentd-actor";

/// Records queued for the writer before new ones are dropped.
const QUEUE: usize = 16_384;
/// Records per batch.
const BATCH: usize = 256;
/// Pause before writing a batch again after a store failure.
const RETRY: Duration = Duration::from_millis(500);
/// The most records one `GET /v1/audit` returns.
const MAX_PAGE: i64 = 1_000;

/// The sending side of the writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<NewAuditRecord>,
    writer: Arc<Writer>,
}

struct Writer {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl AuditLog {
    /// Starts the writer for `store`; [`AuditLog::close`] stops it.
    pub fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = CancellationToken::new();
        let task = tokio::spawn(write_batches(store, rx, stop.clone()));
        Self { tx, writer: Arc::new(Writer { stop, task: Mutex::new(Some(task)) }) }
    }

    /// Writes what is queued and stops the writer: call it once the API
    /// has stopped serving, before the store closes.
    pub async fn close(&self) {
        self.writer.stop.cancel();
        let task = self.writer.task.lock().expect("audit writer lock").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    fn record(&self, record: NewAuditRecord) {
        if let Err(e) = self.tx.try_send(record) {
            let lost = match e {
                mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r) => r,
            };
            tracing::error!(method = lost.method, path = lost.path, status = lost.status, "audit record dropped: the writer is behind or gone");
        }
    }
}

async fn write_batches(store: Store, mut rx: mpsc::Receiver<NewAuditRecord>, shutdown: CancellationToken) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let stopping = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n == 0,
            _ = shutdown.cancelled() => true,
        };
        if stopping {
            // Whatever was queued before shutdown, one last time.
            while rx.try_recv().map(|r| batch.push(r)).is_ok() {}
            if let Err(e) = store.insert_audit_records(&batch).await {
                tracing::error!(error = %e, records = batch.len(), "audit records lost at shutdown");
            }
            return;
        }
        while let Err(e) = store.insert_audit_records(&batch).await {
            tracing::warn!(error = %e, records = batch.len(), "cannot write audit records; retrying");
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        batch.clear();
    }
}

/// Middleware: records every call that may change state.
pub async fn record(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let at = now_ms();
    let started = Instant::now();
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let actor = request.headers().get(ACTOR_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
    let peer = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string());
    let response = next.run(request).await;
    // A create names what it made in its Location.
    let location = response.headers().get(header::LOCATION).and_then(|v| v.to_str().ok());
    let (entity_kind, entity_id) = entity_of(location.unwrap_or(&path)).map(|(k, id)| (k.to_string(), id.to_string())).unzip();
    app.audit.record(NewAuditRecord {
        at,
        actor,
        peer,
        method,
        path,
        entity_kind,
        entity_id,
        status: i64::from(response.status().as_u16()),
        code: response.extensions().get::<ProblemCode>().map(|c| c.0.clone()),
        duration_us: i64::try_from(started.elapsed().as_micros()).unwrap_or(i64::MAX),
    });
    response
}

/// The entity an API path names: `/v1/sessions/{id}[:action][/...]` ->
/// (`session`, id); the same for containers; the registry as a whole.
fn entity_of(path: &str) -> Option<(&'static str, &str)> {
    let mut parts = path.strip_prefix("/v1/")?.split('/');
    let collection = parts.next()?;
    let kind = match collection.split(':').next()? {
        "sessions" => "session",
        "containers" => "container",
        "registry" => return Some(("registry", "registry")),
        _ => return None,
    };
    let id = parts.next()?.split(':').next()?;
    (!id.is_empty()).then_some((kind, id))
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    after: Option<i64>,
    limit: Option<i64>,
    entity_kind: Option<String>,
    entity_id: Option<String>,
}

/// `GET /v1/audit[?after=ID][&limit=N][&entity_kind=K&entity_id=ID]`: the
/// newest records, or those after a cursor (page with `next_after`).
pub async fn list(State(app): State<AppState>, Query(q): Query<ListQuery>) -> Result<Json<Value>, Problem> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Problem::invalid("invalid_request", format!("limit must be 1 to {MAX_PAGE}, got {limit}")));
    }
    let entity = match (q.entity_kind, q.entity_id) {
        (Some(kind), Some(id)) => Some((kind, id)),
        (None, None) => None,
        _ => return Err(Problem::invalid("invalid_request", "give entity_kind and entity_id together")),
    };
    let records = app.store.audit_records(&AuditQuery { after: q.after, entity, limit }).await?;
    let next_after = records.last().map(|r| r.id).or(q.after);
    Ok(Json(json!({"records": records, "next_after": next_after})))
}

#[cfg(test)]
mod tests {
    use super::entity_of;

    #[test]
    fn paths_name_their_entity() {
        assert_eq!(entity_of("/v1/sessions/ses_1"), Some(("session", "ses_1")));
        assert_eq!(entity_of("/v1/sessions/ses_1:prompt"), Some(("session", "ses_1")));
        assert_eq!(entity_of("/v1/sessions/ses_1/permissions/req_2"), Some(("session", "ses_1")));
        assert_eq!(entity_of("/v1/containers/ctr_1:hibernate"), Some(("container", "ctr_1")));
        assert_eq!(entity_of("/v1/registry:sync"), Some(("registry", "registry")));
        assert_eq!(entity_of("/v1/sessions"), None);
        assert_eq!(entity_of("/v1/sessions/"), None);
        assert_eq!(entity_of("/healthz"), None);
    }
}
