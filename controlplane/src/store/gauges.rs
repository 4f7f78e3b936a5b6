//! What a metrics scrape and a readiness probe read: small statements on
//! indexes (live rows by state, the outbox's partial indexes, the nodes
//! table), so scraping stays cheap however much history the store holds.

use std::time::Duration;

use super::states::{container, session};
use super::{Backend, Store, StoreError};
use crate::metrics::StoreGauges;

fn in_list(states: &[&str]) -> String {
    states.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
}

fn age(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

impl Store {
    /// Live containers and sessions by state, the outbox's depth and the
    /// wait of its oldest due step, each node's heartbeat age.
    pub async fn gauges(&self) -> Result<StoreGauges, StoreError> {
        // Audited: the lists are the crate's own state constants.
        let containers = sqlx::AssertSqlSafe(format!(
            "SELECT state, COUNT(*) FROM containers WHERE state IN ({}) GROUP BY state",
            in_list(container::LIVE)
        ));
        let sessions =
            sqlx::AssertSqlSafe(format!("SELECT state, COUNT(*) FROM sessions WHERE state IN ({}) GROUP BY state", in_list(session::LIVE)));
        let containers: Vec<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(containers).fetch_all(pool).await)?;
        let sessions: Vec<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(sessions).fetch_all(pool).await)?;
        // One count per state: each matches a partial index exactly.
        let mut outbox = Vec::new();
        for state in ["pending", "leased"] {
            let n: i64 = with_pool!(self, |pool| sqlx::query_scalar("SELECT COUNT(*) FROM outbox WHERE state = $1").bind(state).fetch_one(pool).await)?;
            outbox.push((state.to_string(), n));
        }
        // Due steps only: a delayed step (a periodic check) is not backlog.
        let waiting = self.sql("SELECT COALESCE(NOW_MS - MIN(available_at), 0) FROM outbox WHERE state = 'pending' AND available_at <= NOW_MS");
        let oldest: i64 = with_pool!(self, |pool| sqlx::query_scalar(waiting).fetch_one(pool).await)?;
        let heartbeats = self.sql("SELECT id, NOW_MS - last_heartbeat_at FROM nodes ORDER BY id");
        let nodes: Vec<(String, i64)> = with_pool!(self, |pool| sqlx::query_as(heartbeats).fetch_all(pool).await)?;
        Ok(StoreGauges {
            containers,
            sessions,
            outbox,
            oldest_pending_age: age(oldest),
            heartbeat_ages: nodes.into_iter().map(|(id, ms)| (id, age(ms))).collect(),
        })
    }

    /// How many nodes are alive; an error: the store does not answer.
    pub async fn alive_nodes(&self) -> Result<i64, StoreError> {
        let sql = "SELECT COUNT(*) FROM nodes WHERE state = 'alive'";
        Ok(with_pool!(self, |pool| sqlx::query_scalar(sql).fetch_one(pool).await)?)
    }
}
