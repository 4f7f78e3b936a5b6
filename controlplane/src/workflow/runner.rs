//! The runner: claims due steps while it has free workers, runs each in a
//! task of its own, and on shutdown drains them within a bound.
//!
//! One claim loop per runner leases as many steps as it has idle workers
//! (at most `max_batch`), so under load one statement claims a batch and
//! when idle the loop sleeps until woken: by a committed enqueue in this
//! process, a PostgreSQL notification, a finished step (its entity's next
//! step may now be claimable), or the poll interval, whichever comes first.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

use super::janitor::{self, JanitorConfig};
use super::registry::Registry;
use super::step::{self, Shared};
use super::{Backoff, wake};

/// Wait after a failed claim before the next, so an unavailable database is
/// not hammered.
const CLAIM_ERROR_PAUSE: Duration = Duration::from_millis(500);

/// Under a backlog (the last claim got all it asked for), how long the claim
/// loop waits for more workers to free up before it claims, so that one
/// statement leases a batch instead of one row per finished step. Without a
/// backlog a claim goes out at once: an idle runner adds no latency.
const BATCH_WAIT: Duration = Duration::from_millis(2);

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Written into `lease_owner`: which runner holds a step.
    pub owner: String,
    /// Steps run at once. Each running step may hold one of the store's
    /// pooled connections (its own transaction, then its completion), and
    /// the claim loop and janitor one each. On PostgreSQL keep it below the
    /// pool size (16) so API requests are not starved (sqlx's pool is not
    /// fair under contention); SQLite serializes writers anyway, so there
    /// more workers only help steps that wait on the network.
    pub workers: usize,
    /// Steps leased by one claim at most.
    pub max_batch: u32,
    /// How long a claim holds without a heartbeat; a crashed runner's steps
    /// are claimable again this long after its last heartbeat.
    pub lease: Duration,
    /// The fallback when no wake-up arrives (LISTEN unavailable, another
    /// process's step finished, a backoff ran out).
    pub poll_interval: Duration,
    pub backoff: Backoff,
    /// On shutdown, how long running steps may take to finish before they
    /// are released.
    pub drain_timeout: Duration,
    pub janitor: JanitorConfig,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            owner: crate::new_id("runner"),
            workers: 16,
            max_batch: 32,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
            backoff: Backoff::default(),
            drain_timeout: Duration::from_secs(10),
            janitor: JanitorConfig::default(),
        }
    }
}

pub struct Runner {
    store: Store,
    registry: Registry,
    config: RunnerConfig,
}

impl Runner {
    pub fn new(store: Store, registry: Registry, config: RunnerConfig) -> Self {
        Self { store, registry, config }
    }

    /// Runs until `shutdown`, then stops claiming, waits up to the drain
    /// timeout for running steps, releases the ones still running, and
    /// returns.
    pub async fn run(self, shutdown: CancellationToken) {
        let Self { store, registry, config } = self;
        let workers = config.workers.max(1);
        let shared = Arc::new(Shared {
            store: store.clone(),
            registry,
            lease: config.lease,
            backoff: config.backoff,
            abandon: CancellationToken::new(),
        });
        let mut background = JoinSet::new();
        background.spawn(wake::listen(store.clone(), shutdown.clone()));
        background.spawn(wake::forward(store.clone(), shutdown.clone()));
        background.spawn(janitor::run(store.clone(), config.janitor, shutdown.clone()));

        let idle = Arc::new(Semaphore::new(workers));
        let mut steps = JoinSet::new();
        let mut wakeups = store.outbox_wakeups();
        // Workers to gather before claiming under a backlog.
        let batch = (workers / 4).clamp(1, config.max_batch.max(1) as usize);
        let mut backlog = false;
        tracing::info!(owner = config.owner, workers, backend = store.backend(), "workflow runner started");
        'claiming: loop {
            let first = tokio::select! {
                permit = idle.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = shutdown.cancelled() => break 'claiming,
            };
            let mut permits = vec![first];
            let gather_until = tokio::time::Instant::now() + BATCH_WAIT;
            while permits.len() < config.max_batch.max(1) as usize {
                match idle.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) if backlog && permits.len() < batch => tokio::select! {
                        permit = idle.clone().acquire_owned() => permits.push(permit.expect("the semaphore is never closed")),
                        _ = tokio::time::sleep_until(gather_until) => break,
                        _ = shutdown.cancelled() => break,
                    },
                    Err(_) => break,
                }
            }
            // Wake-ups from here on are for rows this claim may not see.
            wakeups.borrow_and_update();
            let wanted = permits.len();
            let claimed = match store.claim(&config.owner, wanted as u32, config.lease).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot claim steps");
                    drop(permits);
                    tokio::select! {
                        _ = tokio::time::sleep(CLAIM_ERROR_PAUSE) => continue 'claiming,
                        _ = shutdown.cancelled() => break 'claiming,
                    }
                }
            };
            let drained = claimed.len() < wanted;
            backlog = !drained;
            for row in claimed {
                let permit = permits.pop().expect("no more rows than permits");
                let shared = shared.clone();
                steps.spawn(async move {
                    step::run(shared, row).await;
                    drop(permit);
                });
            }
            drop(permits);
            while steps.try_join_next().is_some() {}
            if drained {
                tokio::select! {
                    _ = wakeups.changed() => {}
                    _ = tokio::time::sleep(config.poll_interval) => {}
                    _ = shutdown.cancelled() => break 'claiming,
                }
            }
        }

        tracing::info!(owner = config.owner, running = steps.len(), "workflow runner draining");
        let drained = tokio::time::timeout(config.drain_timeout, async { while steps.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(owner = config.owner, running = steps.len(), "drain timeout: releasing unfinished steps");
            shared.abandon.cancel();
            // Each abandoned step makes one short release statement.
            let released = tokio::time::timeout(Duration::from_secs(5), async { while steps.join_next().await.is_some() {} }).await;
            if released.is_err() {
                steps.abort_all();
            }
        }
        // The listener and the janitor end on the shutdown signal themselves.
        let stopped = tokio::time::timeout(Duration::from_secs(5), async { while background.join_next().await.is_some() {} }).await;
        if stopped.is_err() {
            background.abort_all();
        }
        tracing::info!(owner = config.owner, "workflow runner stopped");
    }
}
