//! PostgreSQL LISTEN/NOTIFY as wake-up hints between control planes.
//!
//! [`listen`] turns notifications into wake-ups of this process's runners;
//! [`forward`] sends one NOTIFY for the steps this process enqueued since its
//! last one, outside their transactions. Notifications are only hints (LISTEN
//! does not pass through PgBouncer in transaction mode, and one lost while
//! reconnecting is gone): runners poll as well.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::store::outbox::{CHANNEL, notifier_id};

/// Wait between attempts to (re)connect the listener.
const RETRY: Duration = Duration::from_secs(1);

/// How long the notifier lets commits gather before one NOTIFY tells other
/// control planes of them all (each NOTIFY is a statement, and its commit
/// takes a global lock); they poll as well, so this only bounds how soon
/// they hear.
const COALESCE: Duration = Duration::from_millis(1);

/// Forwards notifications on the outbox channel into the store's in-process
/// wake-up signal until `shutdown`. Returns at once on SQLite.
pub async fn listen(store: Store, shutdown: CancellationToken) {
    let Some(store_pool) = store.pg_pool() else { return };
    // A connection of its own, outside the store's pool: a LISTEN holds its
    // connection for as long as it listens.
    let options = (*store_pool.connect_options()).clone();
    let pool = PgPoolOptions::new().max_connections(1).idle_timeout(None).max_lifetime(None).connect_lazy_with(options);
    while !shutdown.is_cancelled() {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect the outbox listener; polling only");
                tokio::select! { _ = tokio::time::sleep(RETRY) => continue, _ = shutdown.cancelled() => return }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!(error = %e, "cannot LISTEN on {CHANNEL}; polling only");
            tokio::select! { _ = tokio::time::sleep(RETRY) => continue, _ = shutdown.cancelled() => return }
        }
        // Anything enqueued while we were not listening is found by the first claim.
        store.wake_outbox();
        loop {
            tokio::select! {
                received = listener.recv() => match received {
                    // Our own: this process's runners were woken already.
                    Ok(n) if n.payload() == notifier_id() => {}
                    Ok(_) => store.wake_outbox(),
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox listener lost; reconnecting");
                        break;
                    }
                },
                _ = shutdown.cancelled() => break,
            }
        }
    }
    pool.close().await;
}

/// Sends a NOTIFY whenever steps were enqueued in this process, until
/// `shutdown`: one per wake-up, so commits that happen while a NOTIFY is in
/// flight share the next. Returns at once on SQLite.
pub async fn forward(store: Store, shutdown: CancellationToken) {
    if store.pg_pool().is_none() {
        return;
    }
    let mut enqueued = store.outbox_enqueued();
    loop {
        tokio::select! {
            changed = enqueued.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(COALESCE) => {}
            _ = shutdown.cancelled() => return,
        }
        enqueued.borrow_and_update();
        if let Err(e) = store.notify_outbox().await {
            tracing::debug!(error = %e, "cannot NOTIFY the outbox channel");
        }
    }
}
