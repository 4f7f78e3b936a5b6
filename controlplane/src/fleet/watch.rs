//! Each node's journal (`node/src/journal.rs`: turn ends, sandboxes lost),
//! recorded in the store by exactly one control plane at a time: the one
//! holding the node's watch lease (`nodes.watcher`, renewed on the
//! database's clock). It reads the journal from the stored cursor, applies
//! each entry and then moves the cursor, fenced by the lease: a control
//! plane that lost its lease can no longer move it, and stops. Entries are
//! applied at least once and their effects are idempotent (a run already
//! ended stays as it ended), so each is recorded once.
//!
//! This is the one path by which a run's end reaches the store, whichever
//! control plane created the session or dispatched the turn.

use std::collections::HashMap;
use std::time::Duration;

use agentd_proto::node::journal_entry::Fact;
use agentd_proto::node::{GetSessionRequest, JournalEntry, WatchJournalRequest, run_ended};
use futures::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::store::nodes::JournalCursor;
use crate::store::states::run;
use crate::domain::Code;
use crate::store::StoreError;

/// How long a watch lease lasts, and how often it is renewed.
#[derive(Debug, Clone, Copy)]
pub struct WatchConfig {
    pub lease: Duration,
    pub renew: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self { lease: Duration::from_secs(10), renew: Duration::from_secs(2) }
    }
}

/// Between tries when the node or the store does not answer.
const RETRY: Duration = Duration::from_millis(500);

struct Watching {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// Keeps the journal of every registered node recorded while this control
/// plane holds its lease, until `shutdown`; then gives the leases back.
pub async fn run(app: AppState, owner: String, config: WatchConfig, shutdown: CancellationToken) {
    let mut watching: HashMap<String, Watching> = HashMap::new();
    let mut tick = tokio::time::interval(config.renew);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        let nodes = match app.store.list_nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!(error = %e, "cannot list nodes to watch");
                continue;
            }
        };
        let registered: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        watching.retain(|id, w| {
            let keep = registered.contains(id) && !w.task.is_finished();
            if !keep {
                w.stop.cancel();
            }
            keep
        });
        for node in nodes {
            match app.store.claim_node_watch(&node.id, &owner, config.lease).await {
                Ok(Some(cursor)) if !watching.contains_key(&node.id) => {
                    tracing::debug!(node_id = node.id, owner, "watching the node's journal");
                    let stop = shutdown.child_token();
                    let task = tokio::spawn(follow(app.clone(), node.id.clone(), owner.clone(), cursor, stop.clone()));
                    watching.insert(node.id, Watching { stop, task });
                }
                Ok(Some(_)) => {}
                Ok(None) => {
                    if let Some(w) = watching.remove(&node.id) {
                        tracing::info!(node_id = node.id, "another control plane took the node's watch");
                        w.stop.cancel();
                    }
                }
                Err(e) => tracing::debug!(node_id = node.id, error = %e, "cannot renew the node's watch"),
            }
        }
    }
    for (id, w) in watching {
        w.stop.cancel();
        let _ = w.task.await;
        let _ = app.store.release_node_watch(&id, &owner).await;
    }
}

/// Reads `node_id`'s journal from `cursor` and records it until `stop`, or
/// until the lease is found taken.
async fn follow(app: AppState, node_id: String, owner: String, mut cursor: JournalCursor, stop: CancellationToken) {
    let read = async {
        loop {
            let client = match app.nodes.client(&node_id).await {
                Ok(client) => client,
                Err(e) => {
                    tracing::debug!(node_id, error = e.message(), "cannot reach the node's journal");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            let after_seq = u64::try_from(cursor.journal_seq).unwrap_or(0);
            let request = WatchJournalRequest { journal_id: cursor.journal_id.clone(), after_seq };
            let mut entries = match client.clone().watch_journal(request).await {
                Ok(entries) => entries.into_inner(),
                Err(e) => {
                    tracing::debug!(node_id, error = e.message(), "cannot read the node's journal; retrying");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            while let Some(Ok(entry)) = entries.next().await {
                // A journal made anew since the cursor: its predecessor's
                // tail is gone, as with a gap.
                let renewed = !cursor.journal_id.is_empty() && entry.journal_id != cursor.journal_id;
                if entry.gap_before || renewed {
                    reconcile_gap(&app, &node_id).await;
                }
                apply(&app, &node_id, &entry).await;
                cursor = JournalCursor { journal_id: entry.journal_id.clone(), journal_seq: i64::try_from(entry.seq).unwrap_or(i64::MAX) };
                loop {
                    match app.store.advance_journal(&node_id, &owner, &cursor).await {
                        Ok(true) => break,
                        Ok(false) => {
                            tracing::info!(node_id, "the node's watch was taken over; stopping");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(node_id, error = %e, "cannot record the journal cursor; retrying");
                            tokio::time::sleep(RETRY).await;
                        }
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    };
    tokio::select! {
        () = read => {}
        () = stop.cancelled() => {}
    }
}

/// Applies one journal entry, retrying while the store is down: an entry not
/// recorded would leave its run running for good.
async fn apply(app: &AppState, node_id: &str, entry: &JournalEntry) {
    loop {
        let applied = match &entry.fact {
            Some(Fact::RunEnded(ended)) => match &ended.outcome {
                Some(run_ended::Outcome::Completed(c)) => app.store.run_completed(&ended.run_id, &c.stop_reason).await,
                Some(run_ended::Outcome::Failed(f)) => {
                    let error = if f.error.is_empty() { "run failed" } else { f.error.as_str() };
                    let code = (!f.code.is_empty()).then_some(f.code.as_str());
                    app.store.run_failed_with(&ended.run_id, error, code).await
                }
                None => Ok(()),
            },
            Some(Fact::SandboxLost(lost)) => {
                tracing::warn!(node_id, container_id = lost.container_id, reason = lost.reason, "the node lost a sandbox");
                app.store.fail_container_work(&lost.container_id, &lost.reason, Code::SandboxLost.as_str()).await.map(|_| ())
            }
            None => Ok(()),
        };
        match applied {
            Ok(()) | Err(StoreError::Illegal(_) | StoreError::NotFound { .. }) => return,
            Err(e) => {
                tracing::warn!(node_id, seq = entry.seq, error = %e, "cannot record a journal entry; retrying");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Entries of the node's journal were lost (it kept only its newest, or was
/// made anew): each run the store calls active on the node is asked for,
/// and one the node no longer runs is failed.
async fn reconcile_gap(app: &AppState, node_id: &str) {
    tracing::warn!(node_id, "the node's journal has a gap: reconciling its running turns");
    let Ok(client) = app.nodes.client(node_id).await else { return };
    let Ok(runs) = app.store.active_runs_of_node(node_id).await else { return };
    for r in runs {
        if r.state == run::QUEUED {
            continue;
        }
        let request = GetSessionRequest { session_id: r.session_id.clone(), with_agent: false };
        let running = match client.clone().get_session(request).await {
            Ok(s) => s.into_inner().active_run_id == r.id,
            Err(e) if e.code() == tonic::Code::NotFound => false,
            Err(_) => continue,
        };
        if !running {
            let error = "the run ended while its end could not be recorded (the node's journal has a gap)";
            let _ = app.store.run_failed_with(&r.id, error, Some(Code::RunEndLost.as_str())).await;
        }
    }
}
