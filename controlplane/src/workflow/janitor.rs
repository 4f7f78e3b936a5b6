//! Keeping the outbox healthy: expired leases go back to pending, finished
//! rows, old history and old audit records are deleted.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::store::Store;

#[derive(Debug, Clone, Copy)]
pub struct JanitorConfig {
    /// How often expired leases are looked for.
    pub reap_interval: Duration,
    /// How often finished rows are pruned.
    pub prune_interval: Duration,
    /// Done steps older than this are deleted.
    pub retention: Duration,
    /// Transition history older than this is deleted.
    pub history_retention: Duration,
    /// Audit records older than this are deleted.
    pub audit_retention: Duration,
}

impl Default for JanitorConfig {
    fn default() -> Self {
        Self {
            reap_interval: Duration::from_secs(5),
            prune_interval: Duration::from_secs(600),
            retention: Duration::from_secs(24 * 3600),
            history_retention: Duration::from_secs(30 * 24 * 3600),
            audit_retention: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// One reaping pass and, on its own schedule, one pruning pass, until
/// `shutdown`. Several runners may do this at once: both are idempotent.
pub async fn run(store: Store, config: JanitorConfig, shutdown: CancellationToken) {
    let mut reap = tokio::time::interval(config.reap_interval);
    let mut prune = tokio::time::interval(config.prune_interval);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = reap.tick() => match store.reap_expired_leases().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(steps = n, "expired leases reaped"),
                Err(e) => tracing::warn!(error = %e, "cannot reap expired leases"),
            },
            _ = prune.tick() => {
                match store.prune_outbox(config.retention, config.history_retention).await {
                    Ok((0, 0)) => {}
                    Ok((steps, transitions)) => tracing::info!(steps, transitions, "outbox pruned"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune the outbox"),
                }
                match store.prune_audit(config.audit_retention).await {
                    Ok(0) => {}
                    Ok(records) => tracing::info!(records, "audit records pruned"),
                    Err(e) => tracing::warn!(error = %e, "cannot prune audit records"),
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
