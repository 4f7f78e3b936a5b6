//! SQLite WAL checkpoints off the commit path.
//!
//! By default SQLite checkpoints inside the commit that takes the WAL past
//! 1000 pages: that commit copies the pages back into the database and
//! fsyncs both files, 2-17 ms on this machine's disk, about once every 30
//! prompts, which made the prompt latency's p99. Here commits never
//! checkpoint (`wal_autocheckpoint` 0 on every connection) and a task of the
//! store's runs a `PASSIVE` checkpoint every [`EVERY`]: it waits for no
//! reader or writer, and writers go on appending to the WAL meanwhile. Once
//! a checkpoint has copied every frame, the next writer starts the WAL
//! over, so the file stays about one interval's writes long.

use std::time::Duration;

use sqlx::SqlitePool;

/// How often the checkpoint runs. A store that has not written since the
/// last one makes it a read of the WAL index.
pub const EVERY: Duration = Duration::from_millis(250);

/// Checkpoints `pool`'s database every [`EVERY`] until the pool closes (or
/// the runtime ends).
pub fn spawn(pool: SqlitePool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
                tracing::warn!(error = %e, "SQLite checkpoint failed; the next one retries");
            }
        }
    });
}
