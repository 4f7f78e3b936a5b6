//! The audit trail's writer: records handed over by the API's middleware
//! (`api::audit`) are inserted in batches (one multi-row INSERT per batch)
//! by a task of their own, so a request pays a channel send, not a database
//! round trip. The price is that records still queued when the process dies
//! are lost; while the store is down the writer keeps its batch and retries,
//! and past [`QUEUE`] queued records new ones are dropped with an error in
//! the log. At shutdown nothing is dropped silently: what the store will
//! not take within [`FINAL_TRIES`] goes to the log, a record per line.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::store::audit::NewAuditRecord;

/// Records queued for the writer before new ones are dropped.
const QUEUE: usize = 16_384;
/// Records per batch.
const BATCH: usize = 256;
/// Pause before writing a batch again after a store failure.
const RETRY: Duration = Duration::from_millis(500);
/// Writes of the last batch at shutdown before it goes to the log instead.
const FINAL_TRIES: u32 = 10;

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

    pub fn record(&self, record: NewAuditRecord) {
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
            // The batch a failing store kept, and whatever was queued
            // before shutdown.
            rx.close();
            while rx.try_recv().map(|r| batch.push(r)).is_ok() {}
            write_last(&store, &batch).await;
            return;
        }
        let mut written = false;
        while !written {
            match store.insert_audit_records(&batch).await {
                Ok(()) => written = true,
                Err(e) => {
                    tracing::warn!(error = %e, records = batch.len(), "cannot write audit records; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        // Kept for the last write.
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
        }
        if written {
            batch.clear();
        }
    }
}

/// The last write, at shutdown: retried a few times, then logged record by
/// record so that none is lost without a trace.
async fn write_last(store: &Store, batch: &[NewAuditRecord]) {
    if batch.is_empty() {
        return;
    }
    for attempt in 1..=FINAL_TRIES {
        match store.insert_audit_records(batch).await {
            Ok(()) => return,
            Err(e) if attempt == FINAL_TRIES => {
                tracing::error!(error = %e, records = batch.len(), "the store would not take the last audit records; they follow in the log");
            }
            Err(_) => tokio::time::sleep(RETRY).await,
        }
    }
    for r in batch {
        tracing::error!(
            at = r.at, token_id = r.token_id.as_deref(), actor = r.actor.as_deref(), peer = r.peer.as_deref(), method = r.method,
            path = r.path, status = r.status, code = r.code.as_deref(), "audit record not stored"
        );
    }
}
