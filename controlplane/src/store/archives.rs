//! Session archives: a closed session's event log kept in the store (see
//! [`crate::flows::archive`]).

use serde::Serialize;
use sqlx::FromRow;

use super::{Backend, Store, StoreError, now_ms};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, FromRow)]
pub struct SessionArchiveRow {
    pub session_id: String,
    /// JSON lines, one event each, in sequence order.
    pub events: String,
    pub event_count: i64,
    pub last_seq: i64,
    pub first_seq: i64,
    pub archived_at: i64,
}

impl Store {
    /// Stores (or replaces: a retried archive copies the log again) the
    /// archive of `session_id`.
    pub async fn put_session_archive(&self, session_id: &str, events: &str, event_count: i64, first_seq: i64, last_seq: i64) -> Result<(), StoreError> {
        let sql = "INSERT INTO session_archives (session_id, events, event_count, last_seq, first_seq, archived_at) \
                   VALUES ($1, $2, $3, $4, $5, $6) \
                   ON CONFLICT (session_id) DO UPDATE SET events = excluded.events, event_count = excluded.event_count, \
                   last_seq = excluded.last_seq, first_seq = excluded.first_seq, archived_at = excluded.archived_at";
        with_pool!(self, |pool| sqlx::query(sql)
            .bind(session_id)
            .bind(events)
            .bind(event_count)
            .bind(last_seq)
            .bind(first_seq)
            .bind(now_ms())
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    pub async fn get_session_archive(&self, session_id: &str) -> Result<Option<SessionArchiveRow>, StoreError> {
        let sql = "SELECT * FROM session_archives WHERE session_id = $1";
        Ok(with_pool!(self, |pool| sqlx::query_as(sql).bind(session_id).fetch_optional(pool).await)?)
    }
}
